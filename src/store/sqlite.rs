//! SQLite backend: the embedded default for one host.
//!
//! Several worker processes may share one database file: every claim, lease
//! change and fenced write runs in a `BEGIN IMMEDIATE` transaction, which
//! takes SQLite's write lock up front, so a fence check and the write it
//! guards can never interleave with another process's claim. Point the URL
//! at a file (`sqlite:///var/lib/claude-worker/db.sqlite`); an in-memory
//! database is per process and only useful for experiments.

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, Sqlite, SqliteConnection, SqlitePool, Transaction};

use super::rows::{
    lease_lost, seq_to_db, spec_json, JobRow, SessionRow, JOB_COLUMNS, SESSION_COLUMNS,
};
use super::sql::{check_transcript_session, RENEW, RUNNABLE};
use super::sqlite_fast::FastPath;
use super::{
    AcceptOutcome, AcceptReport, AfterFinish, JobFinish, JobRecord, JobStatus, Lease, NewJob,
    NextJob, ReleaseOutcome, SessionRecord, SessionStore, StartedAttempt, StoreError, Transcript,
    TranscriptAppend, TranscriptWrite, YieldOrder, YieldOutcome,
};
use crate::protocol::PermissionMode;

/// The session to claim: its lease free or run out (`$1` now), runnable
/// jobs; least recently served first (never served counts as oldest),
/// among equals the preferred session (`$2`), then the oldest runnable job.
pub(super) const CLAIM_PICK: &str = "SELECT s.session_key FROM sessions s \
     WHERE (s.lease_owner IS NULL OR s.lease_expires_at_ms IS NULL OR s.lease_expires_at_ms < $1) \
       AND s.session_key IN \
       (SELECT j.session_key FROM jobs j WHERE j.status IN ('queued', 'running')) \
     ORDER BY COALESCE(s.last_served_at_ms, 0), \
       CASE WHEN s.session_key = $2 THEN 0 ELSE 1 END, \
       (SELECT MIN(j.job_order) FROM jobs j WHERE j.session_key = s.session_key \
          AND j.status IN ('queued', 'running')) \
     LIMIT 1";

/// An accept's duplicate check: `$1` the job id.
pub(super) const ACCEPT_EXISTING: &str =
    "SELECT status, terminal_event FROM jobs WHERE job_id = $1";

/// An accept's session row (reopened if closed): `$1` key, `$2` profile,
/// `$3` now. Returns the lease, so the accept knows whom to tell.
pub(super) const ACCEPT_SESSION: &str =
    "INSERT INTO sessions (session_key, profile, status, created_at_ms, updated_at_ms) \
     VALUES ($1, $2, 'idle', $3, $3) \
     ON CONFLICT (session_key) DO UPDATE SET updated_at_ms = excluded.updated_at_ms, \
       status = CASE WHEN status = 'closed' THEN 'idle' ELSE status END \
     RETURNING lease_owner, lease_expires_at_ms";

/// `$1` job, `$2` session, `$3` spec, `$4` now.
pub(super) const ACCEPT_JOB: &str =
    "INSERT INTO jobs (job_id, session_key, status, attempts, next_seq, spec, created_at_ms) \
     VALUES ($1, $2, 'queued', 0, 0, $3, $4)";

pub struct SqliteStore {
    pool: SqlitePool,
    /// The turn path's own connection (`sqlite_fast.rs`), when it applies.
    fast: Option<FastPath>,
}

impl SqliteStore {
    /// Opens (creating if missing) the database file named by `url`. A
    /// `synchronous=full` (or `normal`, the default) query parameter sets
    /// SQLite's `synchronous`: `full` syncs every commit to disk, so an
    /// operating-system crash or power loss loses no commit either.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let (url, synchronous) = synchronous_of(url)?;
        let fast_applies = synchronous == SqliteSynchronous::Normal && on_a_plain_file(&url);
        let options = SqliteConnectOptions::from_str(&url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(synchronous)
            // Other processes hold the write lock only for one short
            // transaction; waiting beats failing.
            .busy_timeout(Duration::from_secs(30))
            .foreign_keys(true);
        let path = options.get_filename().to_path_buf();
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections.max(1))
            // A connection to a file does not go stale: a ping before each
            // use would only cost a hand-off to its thread and back.
            .test_before_acquire(false)
            // A `begin_with` cancelled (a timeout, a `select!`, a heartbeat
            // dropped with its turn) after SQLite ran the BEGIN, while sqlx
            // checks the handle, leaves the connection in a transaction no
            // `Transaction` owns: with `BEGIN IMMEDIATE` it holds the write
            // lock, every later `begin_with` on it fails, and every other
            // writer waits out its busy timeout. sqlx 0.8.6 returns such a
            // connection to the pool; close it instead. The ping first lets
            // queued commands (a drop's rollback) run, so the depth is current.
            .after_release(|conn, _meta| {
                Box::pin(async move {
                    conn.ping().await?;
                    Ok(!conn.is_in_transaction())
                })
            })
            .connect_with(options)
            .await?;
        // The pool made the file and put it in WAL mode; without the fast
        // path (it failed to open) every call goes through sqlx, as before.
        let fast = if fast_applies {
            FastPath::open(&path, checkpointer(pool.clone()))
                .inspect_err(|e| tracing::warn!(error = %e, "sqlite fast path off"))
                .ok()
        } else {
            None
        };
        Ok(SqliteStore { pool, fast })
    }

    /// Runs `call` on the fast path (`sqlite_fast.rs`): its result, or
    /// `None` when the call should go through sqlx (no fast path here, or
    /// SQLite's write lock stayed busy). A busy lock is tried again a few
    /// times over a few milliseconds first: the writer holding it (a
    /// checkpoint, a call through sqlx) is usually done by then, and sending
    /// the call through sqlx would hold the lock longer still.
    async fn on_fast_path<T>(
        &self,
        call: impl Fn(&FastPath) -> Option<Result<T, StoreError>> + Send,
    ) -> Option<Result<T, StoreError>> {
        let fast = self.fast.as_ref()?;
        for wait_ms in [0, 1, 1, 2, 4] {
            if wait_ms > 0 {
                tokio::time::sleep(Duration::from_millis(wait_ms)).await;
            }
            if let Some(done) = call(fast) {
                return Some(done);
            }
        }
        tracing::debug!("sqlite write lock still busy; the call goes through sqlx");
        None
    }

    /// Whether the turn path's calls run on the store's own connection
    /// (`sqlite_fast.rs`): on a database file with `synchronous=normal`.
    pub fn uses_fast_path(&self) -> bool {
        self.fast.is_some()
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    async fn begin_immediate(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    /// A write transaction (holding SQLite's write lock).
    async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        self.begin_immediate().await
    }

    /// A write transaction holding SQLite's write lock, in which `lease`
    /// was checked: no claim can interleave before it commits.
    async fn fenced(&self, lease: &Lease) -> Result<Transaction<'static, Sqlite>, StoreError> {
        let mut tx = self.begin_immediate().await?;
        check_fence(&mut tx, lease).await?;
        Ok(tx)
    }
}

/// A WAL this long (frames, about 4 KiB each) is started over by a
/// `RESTART` checkpoint, which holds writers back for a moment.
const RESTART_ABOVE_FRAMES: i64 = 4_096;

/// Runs the checkpoints the fast path asks for on a pool connection (its
/// thread waits on the disk, not the runtime's). A passive one holds no
/// writer back, and the WAL starts over at the next write after it caught
/// up; under a steady stream of turns it never quite catches up, so past
/// `RESTART_ABOVE_FRAMES` a `RESTART` checkpoint waits for the writer of
/// the moment and has the next one start the WAL over. Ends when the fast
/// path is dropped with its store.
fn checkpointer(pool: SqlitePool) -> tokio::sync::mpsc::Sender<()> {
    let (asks, mut asked) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        while asked.recv().await.is_some() {
            if let Err(e) = checkpoint(&pool).await {
                tracing::warn!(error = %e, "sqlite checkpoint failed; the next one retries");
            }
        }
    });
    asks
}

async fn checkpoint(pool: &SqlitePool) -> Result<(), sqlx::Error> {
    // (busy, frames in the WAL, frames checkpointed)
    let (_, frames, _): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
        .fetch_one(pool)
        .await?;
    if frames > RESTART_ABOVE_FRAMES {
        sqlx::query("PRAGMA wal_checkpoint(RESTART)")
            .execute(pool)
            .await?;
    }
    Ok(())
}

/// A database file opened read-write, the fast path's case: not in memory
/// (a second connection would see another database), not read-only, not
/// through another VFS.
fn on_a_plain_file(url: &str) -> bool {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or(url);
    let (file, query) = rest.split_once('?').unwrap_or((rest, ""));
    let plain_params = query
        .split('&')
        .filter(|p| !p.is_empty())
        .all(|p| matches!(p, "mode=rwc" | "mode=rw" | "cache=private"));
    !file.is_empty() && file != ":memory:" && plain_params
}

/// Takes our `synchronous` parameter out of a SQLite URL (sqlx does not
/// know it): the URL without it, and the mode (`normal` when absent).
fn synchronous_of(url: &str) -> Result<(String, SqliteSynchronous), StoreError> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), SqliteSynchronous::Normal));
    };
    let mut mode = SqliteSynchronous::Normal;
    let mut rest = Vec::new();
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("synchronous", v)) => {
                mode = match v.to_ascii_lowercase().as_str() {
                    "normal" => SqliteSynchronous::Normal,
                    "full" => SqliteSynchronous::Full,
                    "extra" => SqliteSynchronous::Extra,
                    _ => {
                        return Err(StoreError::Other(format!(
                            "the SQLite URL's synchronous={v} is not one of normal, full, extra"
                        )))
                    }
                }
            }
            _ => rest.push(pair),
        }
    }
    let url = if rest.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    Ok((url, mode))
}

/// Fails with `LeaseLost` unless `lease` is the session's current lease.
async fn check_fence(conn: &mut SqliteConnection, lease: &Lease) -> Result<(), StoreError> {
    let held: Option<i64> = sqlx::query_scalar(super::sql::FENCE)
        .bind(&lease.session_key)
        .bind(&lease.owner)
        .bind(lease.epoch)
        .fetch_optional(&mut *conn)
        .await?;
    match held {
        Some(_) => Ok(()),
        None => Err(lease_lost(lease)),
    }
}

fn not_in_session(job_id: &str, lease: &Lease) -> StoreError {
    StoreError::Other(format!(
        "job {job_id} is not a job of session {}",
        lease.session_key
    ))
}

super::lifecycle::lifecycle_store_helpers!(SqliteStore, Sqlite);

super::lifecycle::lifecycle_store_impl!(SqliteStore);

super::prompts::prompt_store_impl!(SqliteStore);

super::sql::session_store_impl!(SqliteStore, {
    async fn migrate(&self) -> Result<(), StoreError> {
        // Several workers sharing one file may start at once, and SQLite
        // has no advisory lock for sqlx's migrator (PostgreSQL does): the
        // loser of the race fails ("table … already exists") after the
        // winner committed. Each migration is one transaction, so running
        // again sees it applied. Bounded: a real error stays an error.
        let mut delay = Duration::from_millis(50);
        for _ in 0..6 {
            match sqlx::migrate!("./migrations/sqlite").run(&self.pool).await {
                Ok(()) => return Ok(()),
                Err(_) => {
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
            }
        }
        sqlx::migrate!("./migrations/sqlite")
            .run(&self.pool)
            .await
            .map_err(|e| StoreError::Other(format!("sqlite migration failed: {e}")))
    }

    async fn accept_job_by(
        &self,
        job: &NewJob,
        now_ms: i64,
        worker_id: Option<&str>,
    ) -> Result<AcceptReport, StoreError> {
        let spec = spec_json(&job.spec)?;
        if let Some(done) = self
            .on_fast_path(|f| f.accept_job_by(job, &spec, now_ms, worker_id))
            .await
        {
            return done;
        }
        let mut tx = self.begin_immediate().await?;
        // The write lock is held, so this check and the inserts are atomic.
        let existing: Option<(String, Option<String>)> = sqlx::query_as(ACCEPT_EXISTING)
            .bind(&job.job_id)
            .fetch_optional(&mut *tx)
            .await?;
        if let Some((status, terminal_event)) = existing {
            tx.rollback().await?;
            return Ok(AcceptReport::known(AcceptOutcome::Duplicate {
                status: JobStatus::parse(&status)?,
                terminal_event,
            }));
        }
        let (owner, expires): (Option<String>, Option<i64>) = sqlx::query_as(ACCEPT_SESSION)
            .bind(&job.session_key)
            .bind(&job.spec.profile)
            .bind(now_ms)
            .fetch_one(&mut *tx)
            .await?;
        sqlx::query(ACCEPT_JOB)
            .bind(&job.job_id)
            .bind(&job.session_key)
            .bind(spec)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        let live_owner = owner.filter(|_| expires.is_some_and(|at| at >= now_ms));
        Ok(AcceptReport::inserted(live_owner, worker_id))
    }

    async fn claim_session(
        &self,
        owner: &str,
        now_ms: i64,
        ttl_ms: i64,
        prefer: Option<&str>,
    ) -> Result<Option<Lease>, StoreError> {
        if let Some(done) = self
            .on_fast_path(|f| f.claim_session(owner, now_ms, ttl_ms, prefer))
            .await
        {
            return done;
        }
        let mut tx = self.begin_immediate().await?;
        let key: Option<String> = sqlx::query_scalar(CLAIM_PICK)
            .bind(now_ms)
            .bind(prefer)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(session_key) = key else {
            tx.rollback().await?;
            return Ok(None);
        };
        super::sql::take_claim!(tx, owner, now_ms, ttl_ms, session_key)
    }

    async fn renew_lease(
        &self,
        lease: &Lease,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<bool, StoreError> {
        if let Some(done) = self
            .on_fast_path(|f| f.renew_lease(lease, now_ms.saturating_add(ttl_ms)))
            .await
        {
            return done;
        }
        let mut tx = self.begin_immediate().await?;
        let done = sqlx::query(RENEW)
            .bind(now_ms.saturating_add(ttl_ms))
            .bind(&lease.session_key)
            .bind(&lease.owner)
            .bind(lease.epoch)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    async fn release_lease(
        &self,
        lease: &Lease,
        now_ms: i64,
    ) -> Result<ReleaseOutcome, StoreError> {
        if let Some(done) = self.on_fast_path(|f| f.release_lease(lease, now_ms)).await {
            return done;
        }
        let mut tx = self.begin_immediate().await?;
        check_fence(&mut tx, lease).await?;
        let runnable: Option<i64> = sqlx::query_scalar(RUNNABLE)
            .bind(&lease.session_key)
            .fetch_optional(&mut *tx)
            .await?;
        if runnable.is_some() {
            tx.rollback().await?;
            return Ok(ReleaseOutcome::MoreWork);
        }
        // The epoch stays: the next claim makes it grow.
        sqlx::query(super::sql::RELEASE_LEASE)
            .bind(now_ms)
            .bind(&lease.session_key)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(ReleaseOutcome::Released)
    }
});
