//! Session transcripts in the database, so a session continues on any
//! worker, on any host, whatever its CLI config dir.
//!
//! The CLI keeps a session's conversation in
//! `<config dir>/projects/<project dir of the cwd>/<session id>.jsonl`.
//! After every completed turn the lease holder stores that file, gzipped,
//! with a fenced write ([`save`]); before a turn resumes a session, the
//! stored copy is written to this worker's config dir when the local copy
//! is missing or shorter ([`materialise`]). Transcripts only grow, so a
//! shorter local copy is an older one (left by an earlier turn here).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;
use tracing::{debug, warn};

use crate::claude;
use crate::config::Profile;
use crate::store::{now_ms, Lease, StoreError, Transcript};
use crate::worker::context::Context;

/// Where the CLI run for `profile` in `cwd` keeps `session_id`'s transcript.
pub fn local_path(
    ctx: &Context,
    profile: &Profile,
    cwd: &Path,
    session_id: &str,
) -> Option<PathBuf> {
    let env = claude::cli_env(&ctx.settings.claude.env_passthrough, profile);
    let config = claude::config_dir(&env)?;
    Some(
        config
            .join("projects")
            .join(claude::project_dir_name(cwd))
            .join(format!("{session_id}.jsonl")),
    )
}

pub fn compress(raw: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut enc = GzEncoder::new(Vec::with_capacity(raw.len() / 4 + 64), Compression::fast());
    enc.write_all(raw)?;
    enc.finish()
}

pub fn decompress(gz: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    GzDecoder::new(gz).read_to_end(&mut out)?;
    Ok(out)
}

/// What reading the local transcript gave.
enum Local {
    Missing,
    TooLarge(u64),
    Read { gz: Vec<u8>, size: u64 },
}

/// After a completed turn: stores the session's transcript. Fenced: fails
/// with `LeaseLost` once another worker holds the session. A missing file
/// or one over `claude.transcript_max_bytes` is logged and skipped (the
/// stored copy, if any, stays).
pub async fn save(
    ctx: &Context,
    lease: &Lease,
    profile: &Profile,
    cwd: &Path,
    session_id: &str,
) -> Result<(), StoreError> {
    let Some(path) = local_path(ctx, profile, cwd, session_id) else {
        warn!(
            "no CLI config dir (CLAUDE_CONFIG_DIR or HOME) for this profile; transcript not stored"
        );
        return Ok(());
    };
    let max = ctx.settings.claude.transcript_max_bytes;
    let read = tokio::task::spawn_blocking(move || -> std::io::Result<Local> {
        let size = match std::fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Local::Missing),
            Err(e) => return Err(e),
        };
        if size > max {
            return Ok(Local::TooLarge(size));
        }
        let raw = std::fs::read(&path)?;
        let size = raw.len() as u64;
        Ok(Local::Read {
            gz: compress(&raw)?,
            size,
        })
    })
    .await
    .map_err(|e| StoreError::Other(format!("transcript task failed: {e}")))?;
    match read {
        Ok(Local::Missing) => {
            warn!(claude_session_id = %session_id, "the CLI left no transcript; not stored");
            Ok(())
        }
        Ok(Local::TooLarge(size)) => {
            warn!(claude_session_id = %session_id, size_bytes = size, max_bytes = max,
                  "transcript larger than claude.transcript_max_bytes; not stored, the previous copy stays");
            Ok(())
        }
        Err(e) => {
            warn!(claude_session_id = %session_id, error = %e, "could not read the transcript; not stored");
            Ok(())
        }
        Ok(Local::Read { gz, size }) => {
            debug!(claude_session_id = %session_id, size_bytes = size, stored_bytes = gz.len(), "storing transcript");
            ctx.store
                .put_transcript(
                    lease,
                    &Transcript {
                        claude_session_id: session_id.to_string(),
                        session_key: lease.session_key.clone(),
                        data: gz,
                        size_bytes: size as i64,
                        updated_at_ms: now_ms(),
                    },
                )
                .await
        }
    }
}

/// Before a turn resumes `session_id` in `cwd`: writes the stored
/// transcript into this worker's config dir if the local copy is missing
/// or shorter. Best effort: on failure the CLI reports the session missing
/// and the turn starts a new one (`resume_failed`).
pub async fn materialise(ctx: &Context, profile: &Profile, cwd: &Path, session_id: &str) {
    let Some(path) = local_path(ctx, profile, cwd, session_id) else {
        return;
    };
    let stored = match ctx.store.get_transcript(session_id).await {
        Ok(Some(t)) => t,
        Ok(None) => return,
        Err(e) => {
            warn!(claude_session_id = %session_id, error = %e, "could not read the stored transcript");
            return;
        }
    };
    let id = session_id.to_string();
    let done = tokio::task::spawn_blocking(move || -> std::io::Result<bool> {
        let local = std::fs::metadata(&path).map(|m| m.len()).ok();
        if local.is_some_and(|n| n as i64 >= stored.size_bytes) {
            return Ok(false);
        }
        let raw = decompress(&stored.data)?;
        std::fs::create_dir_all(path.parent().expect("a transcript path has a parent"))?;
        // Write beside, then rename: the CLI never sees half a file.
        let tmp = path.with_extension(format!("jsonl.{}.tmp", uuid::Uuid::new_v4().simple()));
        std::fs::write(&tmp, &raw)?;
        std::fs::rename(&tmp, &path)?;
        Ok(true)
    })
    .await;
    match done {
        Ok(Ok(true)) => debug!(claude_session_id = %id, "transcript restored from the database"),
        Ok(Ok(false)) => {}
        Ok(Err(e)) => {
            warn!(claude_session_id = %id, error = %e, "could not restore the stored transcript")
        }
        Err(e) => warn!(claude_session_id = %id, error = %e, "transcript task failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compress_round_trips() {
        let raw = b"{\"type\":\"user\"}\n".repeat(100);
        let gz = compress(&raw).unwrap();
        assert!(gz.len() < raw.len());
        assert_eq!(decompress(&gz).unwrap(), raw);
    }
}
