//! Where things are on disk: a session's working directory and the CLI's
//! own file layout (config dir, per-project transcript folders).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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

/// Where the CLI running in `cwd` keeps (and resumes) the transcript of
/// `session_id`.
pub fn transcript_path(
    env: &BTreeMap<String, String>,
    cwd: &Path,
    session_id: &str,
) -> Option<PathBuf> {
    let config = config_dir(env)?;
    Some(
        config
            .join("projects")
            .join(project_dir_name(cwd))
            .join(format!("{session_id}.jsonl")),
    )
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
    fn session_dirs_are_stable_and_distinct() {
        let a = session_dir(Path::new("/w"), "discord:1:2:3");
        assert_eq!(a, session_dir(Path::new("/w"), "discord:1:2:3"));
        assert_ne!(a, session_dir(Path::new("/w"), "discord_1_2_3"));
        assert!(a.starts_with("/w"));
    }
}
