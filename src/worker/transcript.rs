//! Session transcripts in the database, so a session continues on any
//! worker, on any host, whatever its CLI config dir.
//!
//! The CLI keeps a session's conversation in
//! `<config dir>/projects/<project dir of the cwd>/<session id>.jsonl`.
//! After every completed turn the lease holder stores that file, gzipped,
//! with its SHA-256, in a fenced write ([`save`]), before the turn's outcome:
//! the stored copy is the session's current transcript. Before a cold turn
//! resumes a session, the local copy is kept only if it *is* that one (same
//! digest); otherwise the stored copy replaces it ([`materialise`]). Size
//! says nothing: a local copy padded by attempts that never completed can
//! be larger than the current one and still miss turns run elsewhere.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;
use sha2::{Digest, Sha256};
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
    /// Over `claude.transcript_max_bytes`: only its identity is recorded.
    TooLarge {
        size: u64,
        sha256: String,
    },
    Read {
        gz: Vec<u8>,
        size: u64,
        sha256: String,
    },
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of `bytes`, lowercase hex: a transcript's identity.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// SHA-256 of the file at `path`, read in pieces; `None` if it is missing.
fn sha256_file(path: &Path) -> std::io::Result<Option<String>> {
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(Some(hex(&hasher.finalize())));
        }
        hasher.update(&buf[..n]);
    }
}

fn read_local(path: &Path, max_bytes: u64) -> std::io::Result<Local> {
    let size = match std::fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Local::Missing),
        Err(e) => return Err(e),
    };
    if size > max_bytes {
        return Ok(match sha256_file(path)? {
            Some(sha256) => Local::TooLarge { size, sha256 },
            None => Local::Missing,
        });
    }
    let raw = std::fs::read(path)?;
    Ok(Local::Read {
        size: raw.len() as u64,
        sha256: sha256_hex(&raw),
        gz: compress(&raw)?,
    })
}

/// After a completed turn: stores the session's transcript with its
/// identity (SHA-256). Fenced: fails with `LeaseLost` once another worker
/// holds the session. One over `claude.transcript_max_bytes` is recorded
/// by identity only, so no older copy stands in for it; a missing or
/// unreadable file is logged and skipped.
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
    let read = tokio::task::spawn_blocking(move || read_local(&path, max))
        .await
        .map_err(|e| StoreError::Other(format!("transcript task failed: {e}")))?;
    let (data, size, sha256) = match read {
        Ok(Local::Missing) => {
            warn!(claude_session_id = %session_id, "the CLI left no transcript; not stored");
            return Ok(());
        }
        Err(e) => {
            warn!(claude_session_id = %session_id, error = %e, "could not read the transcript; not stored");
            return Ok(());
        }
        Ok(Local::TooLarge { size, sha256 }) => {
            warn!(claude_session_id = %session_id, size_bytes = size, max_bytes = max,
                  "transcript larger than claude.transcript_max_bytes; only its identity is stored, so the session continues only where its CLI files are");
            (Vec::new(), size, sha256)
        }
        Ok(Local::Read { gz, size, sha256 }) => {
            debug!(claude_session_id = %session_id, size_bytes = size, stored_bytes = gz.len(), "storing transcript");
            (gz, size, sha256)
        }
    };
    let transcript = Transcript {
        claude_session_id: session_id.to_string(),
        session_key: lease.session_key.clone(),
        data,
        size_bytes: size as i64,
        sha256: Some(sha256),
        updated_at_ms: now_ms(),
    };
    ctx.store.put_transcript(lease, &transcript).await
}

/// What [`materialise`] did with the local copy.
#[derive(Debug, PartialEq)]
enum Materialised {
    /// The local copy is the stored one: kept.
    Current,
    /// The stored copy was written over a missing or diverged local one.
    Restored,
    /// The stored transcript has no data (too large) and the local copy is
    /// not it: the local copy was moved aside, so the CLI reports the
    /// session missing rather than resume a diverged conversation.
    SetAside,
    /// Nothing stored to restore and nothing local.
    Nothing,
}

/// Before a cold turn resumes `session_id` in `cwd`: makes this worker's
/// local copy the session's current transcript, i.e. the stored one. The
/// local copy is kept only when its SHA-256 equals the stored identity: a
/// copy of this worker's may be larger yet older (padded by attempts that
/// never completed, while the session completed turns elsewhere). Best
/// effort: on failure the CLI reports the session missing and the turn
/// starts a new one (`resume_failed`).
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
    match tokio::task::spawn_blocking(move || make_current(&path, &stored)).await {
        Ok(Ok(Materialised::Restored)) => {
            debug!(claude_session_id = %id, "transcript restored from the database")
        }
        Ok(Ok(Materialised::SetAside)) => {
            warn!(claude_session_id = %id, "the local transcript is not the session's current one and the current one was too large to store; the session starts anew")
        }
        Ok(Ok(Materialised::Current | Materialised::Nothing)) => {}
        Ok(Err(e)) => {
            warn!(claude_session_id = %id, error = %e, "could not restore the stored transcript")
        }
        Err(e) => warn!(claude_session_id = %id, error = %e, "transcript task failed"),
    }
}

fn make_current(path: &Path, stored: &Transcript) -> std::io::Result<Materialised> {
    let local = sha256_file(path)?;
    if local.is_some() && local == stored.sha256 {
        return Ok(Materialised::Current);
    }
    // Write beside, then rename: the CLI never sees half a file.
    let beside =
        |what: &str| path.with_extension(format!("jsonl.{what}.{}", uuid::Uuid::new_v4().simple()));
    if !stored.has_data() {
        if local.is_none() {
            return Ok(Materialised::Nothing);
        }
        std::fs::rename(path, beside("diverged"))?;
        return Ok(Materialised::SetAside);
    }
    let raw = decompress(&stored.data)?;
    std::fs::create_dir_all(path.parent().expect("a transcript path has a parent"))?;
    let tmp = beside("tmp");
    std::fs::write(&tmp, &raw)?;
    std::fs::rename(&tmp, path)?;
    Ok(Materialised::Restored)
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

    fn stored(raw: &[u8], with_data: bool) -> Transcript {
        Transcript {
            claude_session_id: "cs".into(),
            session_key: "k".into(),
            data: if with_data {
                compress(raw).unwrap()
            } else {
                Vec::new()
            },
            size_bytes: raw.len() as i64,
            sha256: Some(sha256_hex(raw)),
            updated_at_ms: 0,
        }
    }

    #[test]
    fn the_local_copy_is_kept_only_when_it_is_the_stored_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p").join("cs.jsonl");
        let current = b"turn 1\nturn 2\n";
        // Missing locally: restored.
        assert_eq!(
            make_current(&path, &stored(current, true)).unwrap(),
            Materialised::Restored
        );
        assert_eq!(std::fs::read(&path).unwrap(), current);
        // Identical: kept.
        assert_eq!(
            make_current(&path, &stored(current, true)).unwrap(),
            Materialised::Current
        );
        // Larger but diverged (padded by a failed attempt): the stored wins.
        std::fs::write(&path, b"turn 1\na failed attempt, longer than turn 2\n").unwrap();
        assert_eq!(
            make_current(&path, &stored(current, true)).unwrap(),
            Materialised::Restored
        );
        assert_eq!(std::fs::read(&path).unwrap(), current);
        // No identity recorded (an old row): the stored copy wins.
        let mut old = stored(current, true);
        old.sha256 = None;
        assert_eq!(make_current(&path, &old).unwrap(), Materialised::Restored);
    }

    #[test]
    fn a_diverged_copy_of_a_too_large_transcript_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cs.jsonl");
        let current = b"a transcript too large to store";
        assert_eq!(
            make_current(&path, &stored(current, false)).unwrap(),
            Materialised::Nothing
        );
        std::fs::write(&path, current).unwrap();
        assert_eq!(
            make_current(&path, &stored(current, false)).unwrap(),
            Materialised::Current
        );
        std::fs::write(&path, b"diverged").unwrap();
        assert_eq!(
            make_current(&path, &stored(current, false)).unwrap(),
            Materialised::SetAside
        );
        assert!(!path.exists());
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "kept beside, not deleted"
        );
    }
}
