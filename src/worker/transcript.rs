//! Session transcripts in the database, so a session continues on any
//! worker, on any host, whatever its CLI config dir.
//!
//! The CLI keeps a session's conversation in
//! `<config dir>/projects/<project dir of the cwd>/<session id>.jsonl`.
//! After every completed turn the lease holder stores it with its SHA-256,
//! in the same fenced transaction as the turn's outcome
//! ([`prepare_save`] → `JobFinish::transcript`): the stored copy is the
//! session's current transcript. Stored incrementally: the CLI only
//! appends, so a [`Cursor`] remembers what this worker last stored (size,
//! identity, hash state, the last bytes) and the next save reads, hashes,
//! gzips and writes only what was appended, as a chunk; the store takes it
//! only if its transcript is still the one the chunk continues, else the
//! transcript is written whole. Every [`MAX_CHUNKS`] chunks it is written
//! whole again (consolidated). A turn's cost is thus O(what it added), not
//! O(the conversation). Before a cold turn resumes a session, the local
//! copy is kept only if it *is* the stored one (same digest); otherwise
//! the stored copy replaces it ([`materialise`]). Size says nothing: a
//! local copy padded by attempts that never completed can be larger than
//! the current one and still miss turns run elsewhere.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;
use sha2::{Digest, Sha256};
use tracing::{debug, warn};

use crate::claude;
use crate::config::Profile;
use crate::store::{now_ms, Lease, StoreError, Transcript, TranscriptAppend, TranscriptWrite};
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

/// A stored transcript is its base and its chunks, each a gzip member:
/// all members are read.
pub fn decompress(gz: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    MultiGzDecoder::new(gz).read_to_end(&mut out)?;
    Ok(out)
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of `bytes`, lowercase hex: a transcript's identity.
#[cfg(test)]
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

/// A stored transcript holds at most this many chunks; the save after
/// that writes it whole again (one O(size) write per this many turns).
const MAX_CHUNKS: u32 = 32;
/// How many bytes before the stored end a cursor remembers, to tell that
/// the local file still continues what was stored.
const TAIL_BYTES: usize = 64;

/// What this worker last stored of a Claude session's transcript, so the
/// next save reads, hashes and writes only what the CLI appended since:
/// the stored size, its identity, the hash state after those bytes (so the
/// new identity needs no re-read) and the bytes just before the end. Only
/// set once a write committed; the store still checks `sha256` before it
/// takes an append, so a stale cursor costs a whole write, never a wrong
/// transcript.
#[derive(Clone)]
pub struct Cursor {
    size: u64,
    sha256: String,
    hasher: Sha256,
    tail: Vec<u8>,
    chunks: u32,
    /// False when the stored transcript is its identity only (too large):
    /// then nothing is appended, but the identity still comes cheaply.
    has_data: bool,
}

/// This worker's cursors by Claude session id (bounded: when full it
/// forgets them all, which costs each session one whole write).
#[derive(Default)]
pub struct Cursors(std::sync::Mutex<std::collections::HashMap<String, Cursor>>);

const MAX_CURSORS: usize = 4096;

impl Cursors {
    fn get(&self, id: &str) -> Option<Cursor> {
        self.0.lock().expect("cursors lock").get(id).cloned()
    }
    fn set(&self, id: &str, cursor: Cursor) {
        let mut map = self.0.lock().expect("cursors lock");
        if map.len() >= MAX_CURSORS && !map.contains_key(id) {
            map.clear();
        }
        map.insert(id.to_string(), cursor);
    }
    pub fn forget(&self, id: &str) {
        self.0.lock().expect("cursors lock").remove(id);
    }
}

/// What reading the local transcript gave.
enum Local {
    Missing,
    /// Nothing appended since the stored copy: nothing to write.
    Unchanged,
    /// The bytes appended since the cursor's end, gzipped.
    Append {
        chunk: Vec<u8>,
        next: Cursor,
    },
    /// The whole transcript, gzipped; empty when over
    /// `claude.transcript_max_bytes` (only its identity is recorded).
    Whole {
        gz: Vec<u8>,
        next: Cursor,
    },
}

fn tail_of(prev: &[u8], new: &[u8]) -> Vec<u8> {
    let mut tail = Vec::with_capacity(TAIL_BYTES);
    let from_prev = TAIL_BYTES.saturating_sub(new.len()).min(prev.len());
    tail.extend_from_slice(&prev[prev.len() - from_prev..]);
    tail.extend_from_slice(&new[new.len().saturating_sub(TAIL_BYTES)..]);
    tail
}

/// Reads what the CLI appended after `cursor`, if the file still continues
/// it (at least as long, same bytes before the stored end); `None` if not.
fn read_appended(
    file: &mut std::fs::File,
    cursor: &Cursor,
    len: u64,
) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::{Seek, SeekFrom};
    if len < cursor.size {
        return Ok(None);
    }
    let mut tail = vec![0u8; cursor.tail.len()];
    file.seek(SeekFrom::Start(cursor.size - tail.len() as u64))?;
    file.read_exact(&mut tail)?;
    if tail != cursor.tail {
        return Ok(None);
    }
    let mut new = Vec::with_capacity((len - cursor.size) as usize);
    file.read_to_end(&mut new)?;
    Ok(Some(new))
}

fn read_local(path: &Path, cursor: Option<&Cursor>, max_bytes: u64) -> std::io::Result<Local> {
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Local::Missing),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    if let Some(c) = cursor.filter(|c| !c.has_data || c.chunks < MAX_CHUNKS) {
        if let Some(new) = read_appended(&mut file, c, len)? {
            if new.is_empty() {
                return Ok(Local::Unchanged);
            }
            let mut hasher = c.hasher.clone();
            hasher.update(&new);
            let size = c.size + new.len() as u64;
            let mut next = Cursor {
                size,
                sha256: hex(&hasher.clone().finalize()),
                hasher,
                tail: tail_of(&c.tail, &new),
                chunks: c.chunks + 1,
                has_data: true,
            };
            if size > max_bytes {
                next.chunks = 0;
                next.has_data = false;
                return Ok(Local::Whole {
                    gz: Vec::new(),
                    next,
                });
            }
            if c.has_data {
                return Ok(Local::Append {
                    chunk: compress(&new)?,
                    next,
                });
            }
        }
        use std::io::Seek;
        file.rewind()?;
    }
    // Whole: one pass that hashes, and keeps the bytes if they may be stored.
    let mut raw = Vec::with_capacity(if len <= max_bytes { len as usize } else { 0 });
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    let mut tail = Vec::new();
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
        tail = tail_of(&tail, &buf[..n]);
        if size <= max_bytes {
            raw.extend_from_slice(&buf[..n]);
        }
    }
    let has_data = size <= max_bytes;
    let next = Cursor {
        size,
        sha256: hex(&hasher.clone().finalize()),
        hasher,
        tail,
        chunks: 0,
        has_data,
    };
    let gz = if has_data {
        compress(&raw)?
    } else {
        Vec::new()
    };
    Ok(Local::Whole { gz, next })
}

/// A transcript write prepared after a completed turn, to be committed
/// with the turn's outcome (`JobFinish::transcript`), then [`Pending::committed`].
pub struct Pending {
    pub write: Option<TranscriptWrite>,
    next: Option<Cursor>,
    path: PathBuf,
    session_id: String,
    session_key: String,
    max_bytes: u64,
}

impl Pending {
    /// The write is in the database: the cursor now describes it.
    pub fn committed(self, ctx: &Context) {
        if let Some(next) = self.next {
            ctx.transcripts.set(&self.session_id, next);
        }
    }

    /// The store refused the append (another copy was stored meanwhile):
    /// the same transcript, written whole.
    pub async fn whole(self, ctx: &Context) -> Result<Pending, StoreError> {
        ctx.transcripts.forget(&self.session_id);
        read(
            self.path,
            None,
            self.session_id,
            self.session_key,
            self.max_bytes,
        )
        .await
    }
}

/// After a completed turn: reads what the CLI appended to the session's
/// transcript since this worker stored it (or all of it) and prepares the
/// write, with the transcript's identity (SHA-256). One over
/// `claude.transcript_max_bytes` is recorded by identity only, so no older
/// copy stands in for it; a missing or unreadable file is logged and
/// skipped (`write` is `None`).
pub async fn prepare_save(
    ctx: &Context,
    lease: &Lease,
    profile: &Profile,
    cwd: &Path,
    session_id: &str,
) -> Result<Option<Pending>, StoreError> {
    let Some(path) = local_path(ctx, profile, cwd, session_id) else {
        warn!(
            "no CLI config dir (CLAUDE_CONFIG_DIR or HOME) for this profile; transcript not stored"
        );
        return Ok(None);
    };
    let max = ctx.settings.claude.transcript_max_bytes;
    let cursor = ctx.transcripts.get(session_id);
    let pending = read(
        path,
        cursor,
        session_id.to_string(),
        lease.session_key.clone(),
        max,
    )
    .await?;
    Ok(Some(pending))
}

/// Stores the session's transcript on its own (fenced), outside a job's
/// outcome: what the CLI appended, or all of it when the stored copy is
/// not the one this worker last wrote.
pub async fn save(
    ctx: &Context,
    lease: &Lease,
    profile: &Profile,
    cwd: &Path,
    session_id: &str,
) -> Result<(), StoreError> {
    let Some(mut pending) = prepare_save(ctx, lease, profile, cwd, session_id).await? else {
        return Ok(());
    };
    let stored = match pending.write.take() {
        None => Ok(()),
        Some(TranscriptWrite::Full(t)) => ctx.store.put_transcript(lease, &t).await,
        Some(TranscriptWrite::Append(a)) => ctx.store.append_transcript(lease, &a).await,
    };
    match stored {
        Err(StoreError::TranscriptChanged(_)) => {
            let mut whole = pending.whole(ctx).await?;
            if let Some(TranscriptWrite::Full(t)) = whole.write.take() {
                ctx.store.put_transcript(lease, &t).await?;
            }
            whole.committed(ctx);
            Ok(())
        }
        Err(e) => {
            ctx.transcripts.forget(session_id);
            Err(e)
        }
        Ok(()) => {
            pending.committed(ctx);
            Ok(())
        }
    }
}

async fn read(
    path: PathBuf,
    cursor: Option<Cursor>,
    session_id: String,
    session_key: String,
    max: u64,
) -> Result<Pending, StoreError> {
    let prev = cursor.as_ref().map(|c| c.sha256.clone());
    let at = path.clone();
    let got = tokio::task::spawn_blocking(move || read_local(&at, cursor.as_ref(), max))
        .await
        .map_err(|e| StoreError::Other(format!("transcript task failed: {e}")))?;
    let mut pending = Pending {
        write: None,
        next: None,
        path,
        session_id,
        session_key,
        max_bytes: max,
    };
    let id = &pending.session_id;
    match got {
        Ok(Local::Missing) => {
            warn!(claude_session_id = %id, "the CLI left no transcript; not stored")
        }
        Err(e) => {
            warn!(claude_session_id = %id, error = %e, "could not read the transcript; not stored")
        }
        Ok(Local::Unchanged) => {}
        Ok(Local::Append { chunk, next }) => {
            debug!(claude_session_id = %id, size_bytes = next.size, chunk_bytes = chunk.len(), "storing what the transcript gained");
            pending.write = Some(TranscriptWrite::Append(TranscriptAppend {
                claude_session_id: id.clone(),
                session_key: pending.session_key.clone(),
                prev_sha256: prev.expect("an append continues a cursor"),
                chunk,
                size_bytes: next.size as i64,
                sha256: next.sha256.clone(),
                updated_at_ms: now_ms(),
            }));
            pending.next = Some(next);
        }
        Ok(Local::Whole { gz, next }) => {
            if next.has_data {
                debug!(claude_session_id = %id, size_bytes = next.size, stored_bytes = gz.len(), "storing the whole transcript");
            } else {
                warn!(claude_session_id = %id, size_bytes = next.size, max_bytes = max,
                      "transcript larger than claude.transcript_max_bytes; only its identity is stored, so the session continues only where its CLI files are");
            }
            pending.write = Some(TranscriptWrite::Full(Transcript {
                claude_session_id: id.clone(),
                session_key: pending.session_key.clone(),
                data: gz,
                size_bytes: next.size as i64,
                sha256: Some(next.sha256.clone()),
                updated_at_ms: now_ms(),
            }));
            pending.next = Some(next);
        }
    }
    Ok(pending)
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
    // A cold turn: whatever this worker stored before may have been
    // superseded elsewhere, so its next save writes the transcript whole.
    ctx.transcripts.forget(session_id);
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

    fn whole(read: Local) -> (Vec<u8>, Cursor) {
        match read {
            Local::Whole { gz, next } => (gz, next),
            _ => panic!("expected a whole write"),
        }
    }

    fn append(read: Local) -> (Vec<u8>, Cursor) {
        match read {
            Local::Append { chunk, next } => (chunk, next),
            _ => panic!("expected an append"),
        }
    }

    #[test]
    fn a_save_after_a_stored_one_reads_and_writes_only_what_was_appended() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cs.jsonl");
        std::fs::write(&path, b"{\"turn\":1}\n").unwrap();
        let (base, c1) = whole(read_local(&path, None, 1 << 20).unwrap());
        assert_eq!(c1.sha256, sha256_hex(b"{\"turn\":1}\n"));
        // Nothing new: nothing to write.
        assert!(matches!(
            read_local(&path, Some(&c1), 1 << 20).unwrap(),
            Local::Unchanged
        ));
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"{\"turn\":2}\n").unwrap();
        let (chunk, c2) = append(read_local(&path, Some(&c1), 1 << 20).unwrap());
        assert_eq!(decompress(&chunk).unwrap(), b"{\"turn\":2}\n");
        // The identity without a re-read equals the whole file's.
        assert_eq!(c2.sha256, sha256_hex(&std::fs::read(&path).unwrap()));
        assert_eq!((c2.size, c2.chunks), (22, 1));
        // Base and chunk, concatenated as the store returns them, are the file.
        let stored = [base, chunk].concat();
        assert_eq!(decompress(&stored).unwrap(), std::fs::read(&path).unwrap());
    }

    #[test]
    fn a_file_that_no_longer_continues_the_stored_one_is_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cs.jsonl");
        std::fs::write(&path, b"turn one\n").unwrap();
        let (_, c1) = whole(read_local(&path, None, 1 << 20).unwrap());
        // Rewritten (same length or longer), not appended.
        std::fs::write(&path, b"turn uno\nturn two\n").unwrap();
        let (gz, c2) = whole(read_local(&path, Some(&c1), 1 << 20).unwrap());
        assert_eq!(decompress(&gz).unwrap(), b"turn uno\nturn two\n");
        assert_eq!(c2.chunks, 0);
        // Shorter than stored.
        std::fs::write(&path, b"t\n").unwrap();
        whole(read_local(&path, Some(&c2), 1 << 20).unwrap());
    }

    #[test]
    fn chunks_are_consolidated_and_the_size_limit_holds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cs.jsonl");
        std::fs::write(&path, b"0\n").unwrap();
        let (_, mut c) = whole(read_local(&path, None, 200).unwrap());
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        for i in 1..=MAX_CHUNKS {
            f.write_all(format!("{i}\n").as_bytes()).unwrap();
            c = append(read_local(&path, Some(&c), 200).unwrap()).1;
        }
        f.write_all(b"x\n").unwrap();
        let (gz, c) = whole(read_local(&path, Some(&c), 200).unwrap());
        assert_eq!(decompress(&gz).unwrap(), std::fs::read(&path).unwrap());
        assert_eq!(c.chunks, 0);
        // Past the limit: identity only, still without a re-read.
        f.write_all(&[b'y'; 300]).unwrap();
        let (gz, big) = whole(read_local(&path, Some(&c), 200).unwrap());
        assert!(gz.is_empty());
        assert!(!big.has_data);
        assert_eq!(big.sha256, sha256_hex(&std::fs::read(&path).unwrap()));
        f.write_all(b"z").unwrap();
        let (gz, bigger) = whole(read_local(&path, Some(&big), 200).unwrap());
        assert!(gz.is_empty());
        assert_eq!(bigger.sha256, sha256_hex(&std::fs::read(&path).unwrap()));
    }

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
