//! Drives one Claude Code CLI process through one turn. The only module
//! that spawns processes.
//!
//! The CLI runs as `claude -p --input-format stream-json --output-format
//! stream-json --verbose --include-partial-messages …` in its own process
//! group, with a clean environment. The prompt goes in on stdin as a
//! stream-json user message (never on argv); stdout lines are parsed into
//! [`CliMessage`]s. Dropping a [`CliProcess`] kills its whole process group,
//! and the child also gets SIGKILL if the worker dies (PR_SET_PDEATHSIG),
//! so no CLI outlives the worker that spawned it.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::config::{ClaudeSettings, EffectiveOptions, Profile};

/// How much of the CLI's stderr is kept for error messages.
const STDERR_KEEP_BYTES: usize = 8 * 1024;

/// What one turn asks of the CLI.
#[derive(Debug, Clone)]
pub struct TurnRequest {
    pub prompt: String,
    pub cwd: PathBuf,
    /// Claude session to resume, if any.
    pub resume: Option<String>,
    /// With `resume`: continue in a new session forked from it.
    pub fork: bool,
    pub options: EffectiveOptions,
}

/// A stdout line of the CLI, reduced to what the worker uses.
#[derive(Debug, Clone, PartialEq)]
pub enum CliMessage {
    /// `system/init`: the session is known.
    Init {
        session_id: String,
        model: Option<String>,
        permission_mode: Option<String>,
    },
    /// A streamed text delta of the top-level assistant.
    TextDelta {
        message_id: Option<String>,
        text: String,
    },
    /// A complete top-level assistant message: its text (already streamed
    /// as deltas, unless the CLI fell back to a non-streaming request) and
    /// its tool calls.
    Assistant {
        message_id: Option<String>,
        text: String,
        tool_uses: Vec<(String, Value)>,
    },
    /// The CLI is retrying an API call itself.
    ApiRetry {
        attempt: u64,
        error_status: Option<u64>,
        error: String,
    },
    /// The turn's result.
    Result(TurnResult),
    /// The answer to a control request: `error` is `None` on success.
    ControlResponse {
        request_id: String,
        error: Option<String>,
    },
    /// Anything else (valid JSON the worker does not use).
    Other,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TurnResult {
    pub subtype: String,
    pub is_error: bool,
    pub result: Option<String>,
    pub session_id: Option<String>,
    pub api_error_status: Option<u64>,
    pub errors: Vec<String>,
    pub usage: Value,
    pub total_cost_usd: f64,
    pub duration_ms: u64,
    pub num_turns: u32,
}

/// Parses one stdout line. `Err` means the line is not JSON (the caller
/// logs it and carries on).
pub fn parse_line(line: &str) -> Result<CliMessage, serde_json::Error> {
    let v: Value = serde_json::from_str(line)?;
    let s = |key: &str| v.get(key).and_then(Value::as_str).map(str::to_string);
    Ok(match v.get("type").and_then(Value::as_str) {
        Some("system") => match v.get("subtype").and_then(Value::as_str) {
            Some("init") => match s("session_id") {
                Some(session_id) => CliMessage::Init {
                    session_id,
                    model: s("model"),
                    permission_mode: s("permissionMode"),
                },
                None => CliMessage::Other,
            },
            Some("api_retry") => CliMessage::ApiRetry {
                attempt: v.get("attempt").and_then(Value::as_u64).unwrap_or(0),
                error_status: v.get("error_status").and_then(Value::as_u64),
                error: s("error").unwrap_or_default(),
            },
            _ => CliMessage::Other,
        },
        Some("stream_event") if v.get("parent_tool_use_id").is_none_or(Value::is_null) => {
            let ev = &v["event"];
            if ev["type"] == "content_block_delta" && ev["delta"]["type"] == "text_delta" {
                match ev["delta"]["text"].as_str() {
                    Some(t) => CliMessage::TextDelta {
                        message_id: s("api_message_id"),
                        text: t.to_string(),
                    },
                    None => CliMessage::Other,
                }
            } else {
                CliMessage::Other
            }
        }
        Some("assistant") if v.get("parent_tool_use_id").is_none_or(Value::is_null) => {
            let blocks = v["message"]["content"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let text: String = blocks
                .iter()
                .filter(|b| b["type"] == "text")
                .filter_map(|b| b["text"].as_str())
                .collect();
            let tool_uses = blocks
                .iter()
                .filter(|b| b["type"] == "tool_use")
                .map(|b| {
                    (
                        b["name"].as_str().unwrap_or("?").to_string(),
                        b["input"].clone(),
                    )
                })
                .collect();
            CliMessage::Assistant {
                message_id: v["message"]["id"].as_str().map(str::to_string),
                text,
                tool_uses,
            }
        }
        Some("control_response") => {
            let r = &v["response"];
            match r["request_id"].as_str() {
                Some(id) => CliMessage::ControlResponse {
                    request_id: id.to_string(),
                    error: if r["subtype"] == "success" {
                        None
                    } else {
                        Some(r["error"].as_str().unwrap_or("unknown error").to_string())
                    },
                },
                None => CliMessage::Other,
            }
        }
        Some("result") => CliMessage::Result(TurnResult {
            subtype: s("subtype").unwrap_or_default(),
            is_error: v.get("is_error").and_then(Value::as_bool).unwrap_or(false),
            result: s("result"),
            session_id: s("session_id"),
            api_error_status: v.get("api_error_status").and_then(Value::as_u64),
            errors: v
                .get("errors")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|e| e.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
            usage: v.get("usage").cloned().unwrap_or(Value::Null),
            total_cost_usd: v
                .get("total_cost_usd")
                .and_then(Value::as_f64)
                .unwrap_or(0.0),
            duration_ms: v.get("duration_ms").and_then(Value::as_u64).unwrap_or(0),
            num_turns: v.get("num_turns").and_then(Value::as_u64).unwrap_or(0) as u32,
        }),
        _ => CliMessage::Other,
    })
}

/// A short, human-readable summary of a tool call's input.
pub fn summarize_tool_input(input: &Value) -> String {
    let pick = [
        "command",
        "file_path",
        "path",
        "pattern",
        "url",
        "query",
        "description",
    ]
    .iter()
    .find_map(|k| input.get(*k).and_then(Value::as_str));
    let text = match pick {
        Some(s) => s.to_string(),
        None => input.to_string(),
    };
    truncate_chars(&text, 200)
}

fn truncate_chars(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(max).collect();
        out.push('…');
        out
    }
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

/// Builds the CLI's argv (without the prompt, which goes on stdin).
pub fn cli_args(req: &TurnRequest, profile: &Profile) -> Vec<String> {
    let mut args: Vec<String> = [
        "-p",
        "--input-format",
        "stream-json",
        "--output-format",
        "stream-json",
        "--verbose",
        "--include-partial-messages",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
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
    // Before the tool lists: those take every following word as a value.
    args.extend(profile.extra_args.iter().cloned());
    if !profile.allowed_tools.is_empty() {
        args.push("--allowed-tools".into());
        args.extend(profile.allowed_tools.iter().cloned());
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

/// The stream-json user message carrying a prompt.
pub fn user_message_line(prompt: &str) -> String {
    let mut line = json!({
        "type": "user",
        "message": {"role": "user", "content": prompt},
    })
    .to_string();
    line.push('\n');
    line
}

/// A running CLI process. Dropping it kills the process group.
pub struct CliProcess {
    child: Child,
    pgid: Option<i32>,
    stdin: Option<ChildStdin>,
    stdout: Lines<BufReader<ChildStdout>>,
    stderr: Arc<Mutex<VecDeque<u8>>>,
    stderr_task: Option<tokio::task::JoinHandle<()>>,
}

impl CliProcess {
    /// Spawns the CLI for `req` and writes the prompt to its stdin.
    pub async fn spawn(
        settings: &ClaudeSettings,
        profile: &Profile,
        req: &TurnRequest,
    ) -> Result<CliProcess, SpawnError> {
        std::fs::create_dir_all(&req.cwd).map_err(|source| SpawnError::Workdir {
            path: req.cwd.display().to_string(),
            source,
        })?;
        let env = cli_env(&settings.env_passthrough, profile);
        if let Some(id) = &req.resume {
            // Best effort: if it fails the CLI reports the session missing
            // and the caller starts a new one.
            if let Err(e) = ensure_transcript(&env, &req.cwd, id) {
                tracing::warn!(error = %e, claude_session_id = %id, "could not make the transcript available");
            }
        }
        let mut cmd = Command::new(&settings.path);
        cmd.args(cli_args(req, profile))
            .current_dir(&req.cwd)
            .env_clear()
            .envs(env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                // The child dies with the worker even on SIGKILL.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| SpawnError::Io {
            path: settings.path.display().to_string(),
            source,
        })?;
        let pgid = child.id().map(|p| p as i32);
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
        let stderr_buf = Arc::new(Mutex::new(VecDeque::new()));
        let stderr_task = child.stderr.take().map(|mut err| {
            let buf = Arc::clone(&stderr_buf);
            tokio::spawn(async move {
                let mut chunk = [0u8; 4096];
                while let Ok(n) = err.read(&mut chunk).await {
                    if n == 0 {
                        break;
                    }
                    let mut b = buf.lock().unwrap_or_else(|p| p.into_inner());
                    b.extend(&chunk[..n]);
                    let excess = b.len().saturating_sub(STDERR_KEEP_BYTES);
                    b.drain(..excess);
                }
            })
        });
        let proc = CliProcess {
            child,
            pgid,
            stdin,
            stdout,
            stderr: stderr_buf,
            stderr_task,
        };
        Ok(proc)
    }

    pub fn pid(&self) -> Option<u32> {
        self.pgid.map(|p| p as u32)
    }

    /// Starts a turn: writes a user message to the CLI's stdin. The CLI
    /// answers with `init`, the turn's messages and a `result`; it then
    /// waits for the next user message until stdin is closed.
    pub async fn send_user_message(&mut self, prompt: &str) {
        self.write_stdin(&user_message_line(prompt)).await;
    }

    /// Sends a stream-json control request (`interrupt`,
    /// `set_permission_mode`, `set_model`, …); returns its request id. The
    /// CLI answers with a `control_response` line carrying that id.
    pub async fn send_control_request(&mut self, request: Value) -> String {
        let request_id = uuid::Uuid::new_v4().to_string();
        let mut line =
            json!({"type": "control_request", "request_id": request_id, "request": request})
                .to_string();
        line.push('\n');
        self.write_stdin(&line).await;
        request_id
    }

    /// Writes to the CLI's stdin. A closed pipe means the CLI died; that
    /// shows up as a missing result, so the error is not reported here.
    pub async fn write_stdin(&mut self, line: &str) {
        if let Some(stdin) = self.stdin.as_mut() {
            if stdin.write_all(line.as_bytes()).await.is_ok() {
                let _ = stdin.flush().await;
            }
        }
    }

    /// Closes stdin: the CLI ends once the current turn is done.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// The next stdout message; `None` at end of output. Non-JSON lines are
    /// logged and skipped.
    pub async fn next_message(&mut self) -> Option<CliMessage> {
        loop {
            match self.stdout.next_line().await {
                Ok(Some(line)) => {
                    if line.trim().is_empty() {
                        continue;
                    }
                    match parse_line(&line) {
                        Ok(msg) => return Some(msg),
                        Err(_) => {
                            tracing::debug!(line = %truncate_chars(&line, 300), "non-JSON line from the CLI");
                        }
                    }
                }
                Ok(None) => return None,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the CLI's stdout failed");
                    return None;
                }
            }
        }
    }

    /// The tail of what the CLI wrote to stderr.
    pub async fn stderr_tail(&mut self) -> String {
        // Give the reader a moment to drain what the process wrote last.
        if let Some(task) = self.stderr_task.take() {
            let _ = tokio::time::timeout(Duration::from_millis(500), task).await;
        }
        let b = self.stderr.lock().unwrap_or_else(|p| p.into_inner());
        let bytes: Vec<u8> = b.iter().copied().collect();
        String::from_utf8_lossy(&bytes).trim().to_string()
    }

    /// Waits for the process to exit after its turn, killing the group if
    /// it lingers past `grace`. Returns the exit description.
    pub async fn finish(&mut self, grace: Duration) -> String {
        self.close_stdin();
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(Ok(status)) => {
                self.kill_group();
                status.to_string()
            }
            Ok(Err(e)) => format!("wait failed: {e}"),
            Err(_) => {
                self.kill_group();
                let _ = self.child.wait().await;
                format!(
                    "did not exit within {} ms and was killed",
                    grace.as_millis()
                )
            }
        }
    }

    /// Interrupts the running turn gently, then harder: the stream-json
    /// `interrupt` control request (the CLI ends the turn and keeps the
    /// session resumable), then SIGINT, then SIGTERM and SIGKILL, each after
    /// `grace`. Returns true if the CLI ended the turn on request.
    pub async fn interrupt(&mut self, grace: Duration) -> bool {
        self.send_control_request(json!({"subtype": "interrupt"}))
            .await;
        let ended = tokio::time::timeout(grace, async {
            while let Some(msg) = self.next_message().await {
                if matches!(msg, CliMessage::Result(_)) {
                    return true;
                }
            }
            false
        })
        .await
        .unwrap_or(false);
        if ended {
            self.finish(grace).await;
            return true;
        }
        if let Some(pid) = self.pgid {
            // SAFETY: plain syscall on our child.
            unsafe { libc::kill(pid, libc::SIGINT) };
        }
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            self.terminate(grace).await;
        }
        self.kill_group();
        false
    }

    /// Stops the process: SIGTERM to the group, then SIGKILL after `grace`.
    pub async fn terminate(&mut self, grace: Duration) {
        self.close_stdin();
        if let Some(pgid) = self.pgid {
            // SAFETY: plain syscall on a process group we created.
            unsafe { libc::killpg(pgid, libc::SIGTERM) };
        }
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            self.kill_group();
            let _ = self.child.wait().await;
        }
        self.kill_group();
    }

    /// Starts a turn like [`send_user_message`](Self::send_user_message),
    /// but reports a CLI that is gone (a closed pipe) instead of leaving it
    /// to show up as a missing result.
    pub async fn try_send_user_message(&mut self, prompt: &str) -> std::io::Result<()> {
        let Some(stdin) = self.stdin.as_mut() else {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        };
        stdin
            .write_all(user_message_line(prompt).as_bytes())
            .await?;
        stdin.flush().await
    }

    /// Whether the process has exited (it is reaped if so).
    pub fn has_exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// Closes an idle process gracefully: stdin is closed (the CLI ends and
    /// flushes its transcript), then the group gets SIGTERM after `grace`
    /// and SIGKILL after another `grace`. Returns how it ended.
    pub async fn close(&mut self, grace: Duration) -> &'static str {
        self.close_stdin();
        let how = match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(_) => "exited",
            Err(_) => {
                if let Some(pgid) = self.pgid {
                    // SAFETY: plain syscall on a process group we created.
                    unsafe { libc::killpg(pgid, libc::SIGTERM) };
                }
                match tokio::time::timeout(grace, self.child.wait()).await {
                    Ok(_) => "terminated",
                    Err(_) => {
                        self.kill_group();
                        let _ = self.child.wait().await;
                        "killed"
                    }
                }
            }
        };
        // Tools the CLI left behind in its group.
        self.kill_group();
        how
    }

    fn kill_group(&mut self) {
        if let Some(pgid) = self.pgid {
            // The CLI's own children (tools, shells) are in its group too.
            // SAFETY: plain syscall; the group id stays reserved while any member lives.
            unsafe { libc::killpg(pgid, libc::SIGKILL) };
        }
    }
}

impl Drop for CliProcess {
    fn drop(&mut self) {
        self.kill_group();
    }
}

/// The CLI's config dir as the child will see it.
pub fn config_dir(env: &BTreeMap<String, String>) -> Option<PathBuf> {
    env.get("CLAUDE_CONFIG_DIR")
        .map(PathBuf::from)
        .or_else(|| env.get("HOME").map(|h| Path::new(h).join(".claude")))
}

/// The CLI files a session's transcript under
/// `<config dir>/projects/<cwd, every non-alphanumeric char as '-'>/<id>.jsonl`
/// and `--resume` only looks in the current cwd's folder.
pub fn project_dir_name(cwd: &Path) -> String {
    cwd.to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

/// Makes the transcript of `session_id` visible from `cwd`: a session
/// resumed by id from another key (another working directory) is copied
/// into this directory's project folder. Returns whether it is there now.
pub fn ensure_transcript(
    env: &BTreeMap<String, String>,
    cwd: &Path,
    session_id: &str,
) -> std::io::Result<bool> {
    let Some(config) = config_dir(env) else {
        return Ok(false);
    };
    let file = format!("{session_id}.jsonl");
    let projects = config.join("projects");
    let target = projects.join(project_dir_name(cwd)).join(&file);
    if target.exists() {
        return Ok(true);
    }
    let Ok(entries) = std::fs::read_dir(&projects) else {
        return Ok(false);
    };
    for entry in entries.flatten() {
        let candidate = entry.path().join(&file);
        if candidate.is_file() {
            std::fs::create_dir_all(target.parent().expect("target has a parent"))?;
            std::fs::copy(&candidate, &target)?;
            return Ok(true);
        }
    }
    Ok(false)
}

/// The directory a session works in: `<profile workdir>/<safe key>-<hash>`.
/// Stable for a key, so `--resume` finds the CLI's transcript (which the
/// CLI files under the working directory).
pub fn session_dir(workdir: &Path, session_key: &str) -> PathBuf {
    let safe: String = session_key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    // FNV-1a: distinguishes keys that sanitise to the same name.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in session_key.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    let base = std::path::absolute(workdir).unwrap_or_else(|_| workdir.to_path_buf());
    base.join(format!("{safe}-{:08x}", h as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_messages_the_worker_uses() {
        let init = r#"{"type":"system","subtype":"init","session_id":"s1","model":"m","permissionMode":"plan"}"#;
        assert_eq!(
            parse_line(init).unwrap(),
            CliMessage::Init {
                session_id: "s1".into(),
                model: Some("m".into()),
                permission_mode: Some("plan".into())
            }
        );
        let delta = r#"{"type":"stream_event","event":{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hel"}},"parent_tool_use_id":null,"api_message_id":"m1"}"#;
        assert_eq!(
            parse_line(delta).unwrap(),
            CliMessage::TextDelta {
                message_id: Some("m1".into()),
                text: "Hel".into()
            }
        );
        let sub = r#"{"type":"stream_event","event":{"type":"content_block_delta","delta":{"type":"text_delta","text":"x"}},"parent_tool_use_id":"t1"}"#;
        assert_eq!(parse_line(sub).unwrap(), CliMessage::Other);
        assert_eq!(
            parse_line(r#"{"type":"brand_new_kind"}"#).unwrap(),
            CliMessage::Other
        );
        assert!(parse_line("[claude-code:warning] not json").is_err());
        let ok = r#"{"type":"control_response","response":{"subtype":"success","request_id":"r1","response":{"mode":"plan"}}}"#;
        assert_eq!(
            parse_line(ok).unwrap(),
            CliMessage::ControlResponse {
                request_id: "r1".into(),
                error: None
            }
        );
        let err = r#"{"type":"control_response","response":{"subtype":"error","request_id":"r3","error":"Unsupported control request subtype: set_max_turns"}}"#;
        assert!(matches!(
            parse_line(err).unwrap(),
            CliMessage::ControlResponse { error: Some(e), .. } if e.contains("set_max_turns")
        ));
        let res = r#"{"type":"result","subtype":"success","is_error":true,"api_error_status":529,"result":"API Error: 529","num_turns":1}"#;
        match parse_line(res).unwrap() {
            CliMessage::Result(r) => {
                assert!(r.is_error);
                assert_eq!(r.api_error_status, Some(529));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn prompt_never_reaches_argv_and_ids_cannot_be_flags() {
        let s = crate::config::Settings::from_toml_overrides("").unwrap();
        let p = &s.profiles["default"];
        let req = TurnRequest {
            prompt: "--dangerously-skip-permissions".into(),
            cwd: "/tmp".into(),
            resume: Some("0b5a3c1e-0000-4000-8000-000000000000".into()),
            fork: true,
            options: p.resolve("default", &Default::default()).unwrap(),
        };
        let args = cli_args(&req, p);
        assert!(!args.iter().any(|a| a.contains("dangerously")));
        assert!(args.contains(&"--resume=0b5a3c1e-0000-4000-8000-000000000000".to_string()));
        assert!(args.contains(&"--fork-session".to_string()));
        assert!(user_message_line(&req.prompt).ends_with('\n'));
    }

    #[test]
    fn session_dirs_are_stable_and_distinct() {
        let a = session_dir(Path::new("/w"), "discord:1:2:3");
        assert_eq!(a, session_dir(Path::new("/w"), "discord:1:2:3"));
        assert_ne!(a, session_dir(Path::new("/w"), "discord_1_2_3"));
        assert!(a.starts_with("/w"));
    }
}
