//! What the CLI is started with: argv (never the prompt), a clean
//! environment built from an allow-list, and the stream-json user message
//! that carries the prompt on stdin.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::json;

use crate::config::{ClaudeSettings, EffectiveOptions, PermissionPrompts, Profile};

/// What one turn asks of the CLI.
#[derive(Debug, Clone)]
pub struct TurnRequest {
    pub prompt: String,
    /// Images sent with the prompt, as image content blocks.
    pub images: Vec<crate::protocol::AttachmentV1>,
    pub cwd: PathBuf,
    /// Claude session to resume, if any.
    pub resume: Option<String>,
    /// With `resume`: continue in a new session forked from it.
    pub fork: bool,
    pub options: EffectiveOptions,
    /// Rules a person allowed "for this session" in the resumed Claude
    /// session (`Tool` or `Tool(content)`): the CLI keeps such rules only in
    /// its memory, so a cold resume passes them as allowed tools.
    pub session_grants: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("could not start the Claude CLI {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("could not create the working directory {path}: {source}")]
    Workdir {
        path: String,
        source: std::io::Error,
    },
}

impl SpawnError {
    /// A spawn that may pass on another try (resource exhaustion, a binary
    /// being replaced) as opposed to a missing or non-executable CLI.
    pub fn may_pass(&self) -> bool {
        match self {
            SpawnError::Io { source, .. } => !matches!(
                source.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
            ),
            SpawnError::Workdir { .. } => false,
        }
    }
}

/// The flags every CLI run starts with: print mode, stream-json both ways,
/// partial messages (text deltas). Public so benchmarks and tests run the
/// raw CLI exactly as the worker does.
pub const STREAM_JSON_ARGS: &[&str] = &[
    "-p",
    "--input-format",
    "stream-json",
    "--output-format",
    "stream-json",
    "--verbose",
    "--include-partial-messages",
];

/// Builds the CLI's argv (without the prompt, which goes on stdin).
pub fn cli_args(req: &TurnRequest, profile: &Profile) -> Vec<String> {
    let mut args: Vec<String> = STREAM_JSON_ARGS.iter().map(|s| s.to_string()).collect();
    if let Some(id) = &req.resume {
        // `=` form: an id can never be read as a flag.
        args.push(format!("--resume={id}"));
        if req.fork {
            args.push("--fork-session".into());
        }
    }
    if let Some(model) = &req.options.model {
        args.push(format!("--model={model}"));
    }
    args.push(format!("--max-turns={}", req.options.max_turns));
    args.push(format!("--permission-mode={}", req.options.permission_mode));
    if profile.permission_prompts == PermissionPrompts::Ask {
        // Tool calls that need approval come to the worker as
        // `can_use_tool` control requests (see `worker::turn::prompt`).
        args.push("--permission-prompt-tool=stdio".into());
    }
    if let Some(usd) = req.options.max_budget_usd {
        // Counted by the CLI per process: a capped turn never runs warm.
        args.push(format!("--max-budget-usd={usd}"));
    }
    if let Some(fallback) = &profile.fallback_model {
        // The CLI refuses a fallback equal to the main model.
        if req.options.model.as_ref() != Some(fallback) {
            args.push(format!("--fallback-model={fallback}"));
        }
    }
    // Before the tool lists: those take every following word as a value.
    args.extend(profile.extra_args.iter().cloned());
    if !profile.allowed_tools.is_empty() || !req.session_grants.is_empty() {
        args.push("--allowed-tools".into());
        args.extend(profile.allowed_tools.iter().cloned());
        args.extend(req.session_grants.iter().cloned());
    }
    if !profile.disallowed_tools.is_empty() {
        args.push("--disallowed-tools".into());
        args.extend(profile.disallowed_tools.iter().cloned());
    }
    args
}

/// The CLI's environment: the allow-listed part of ours plus the profile's.
pub fn cli_env(passthrough: &[String], profile: &Profile) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for (k, v) in std::env::vars() {
        let allowed = passthrough.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => k.starts_with(prefix),
            None => k == *p,
        });
        if allowed {
            env.insert(k, v);
        }
    }
    for (k, v) in &profile.env {
        env.insert(k.clone(), v.expose().to_string());
    }
    env
}

/// The stream-json user message carrying a prompt: plain text, or with
/// images, content blocks (the images first, as the Messages API advises).
pub fn user_message_line(req: &TurnRequest) -> String {
    let content = if req.images.is_empty() {
        json!(req.prompt)
    } else {
        let mut blocks: Vec<_> = req
            .images
            .iter()
            .map(|a| {
                json!({"type": "image", "source": {"type": "base64",
                       "media_type": a.media_type.as_str(), "data": a.data}})
            })
            .collect();
        blocks.push(json!({"type": "text", "text": req.prompt}));
        json!(blocks)
    };
    let mut line = json!({
        "type": "user",
        "message": {"role": "user", "content": content},
    })
    .to_string();
    line.push('\n');
    line
}

/// Runs `claude --version` (30 s at most) and returns what it printed, or
/// why it could not be run.
pub async fn version(settings: &ClaudeSettings, profile: &Profile) -> Result<String, String> {
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        tokio::process::Command::new(&settings.path)
            .arg("--version")
            .env_clear()
            .envs(cli_env(&settings.env_passthrough, profile))
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| "`--version` did not answer within 30 s".to_string())?
    .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "`--version` exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_never_reaches_argv_and_ids_cannot_be_flags() {
        let s = crate::config::Settings::from_toml_overrides("").unwrap();
        let p = &s.profiles["default"];
        let req = TurnRequest {
            prompt: "--dangerously-skip-permissions".into(),
            images: Vec::new(),
            cwd: "/tmp".into(),
            resume: Some("0b5a3c1e-0000-4000-8000-000000000000".into()),
            fork: true,
            options: p.resolve("default", &Default::default()).unwrap(),
            session_grants: vec!["Bash(touch /w/a)".into()],
        };
        let args = cli_args(&req, p);
        assert!(!args.iter().any(|a| a.contains("dangerously")));
        assert!(args.contains(&"--resume=0b5a3c1e-0000-4000-8000-000000000000".to_string()));
        assert!(args.contains(&"--fork-session".to_string()));
        let allowed = args.iter().position(|a| a == "--allowed-tools").unwrap();
        assert_eq!(args[allowed + 1..].last().unwrap(), "Bash(touch /w/a)");
        assert!(user_message_line(&req).ends_with('\n'));
    }

    #[test]
    fn cost_cap_and_fallback_model_come_from_the_options_and_profile() {
        let s = crate::config::Settings::from_toml_overrides("").unwrap();
        let mut p = s.profiles["default"].clone();
        let mut req = TurnRequest {
            prompt: "hi".into(),
            images: Vec::new(),
            cwd: "/tmp".into(),
            resume: None,
            fork: false,
            session_grants: Vec::new(),
            options: p.resolve("default", &Default::default()).unwrap(),
        };
        let args = cli_args(&req, &p);
        assert!(!args
            .iter()
            .any(|a| a.starts_with("--max-budget-usd") || a.starts_with("--fallback-model")));
        p.fallback_model = Some("claude-haiku-4-5".into());
        req.options.max_budget_usd = Some(0.25);
        let args = cli_args(&req, &p);
        assert!(
            args.contains(&"--max-budget-usd=0.25".to_string()),
            "{args:?}"
        );
        assert!(args.contains(&"--fallback-model=claude-haiku-4-5".to_string()));
        // Never the main model as its own fallback.
        req.options.model = Some("claude-haiku-4-5".into());
        assert!(!cli_args(&req, &p)
            .iter()
            .any(|a| a.starts_with("--fallback-model")));
    }
}
