//! SQLite's turn path, run on the caller's thread.
//!
//! sqlx gives every SQLite connection a thread of its own, and each
//! statement, `BEGIN`, `COMMIT` and pool ping is a hand-off to that thread
//! and back (a futex and an eventfd wake-up): about 80 a turn, which cost
//! the worker more CPU than everything else it does for a turn, while the
//! statements themselves take microseconds (README, Performance). So the
//! store calls a turn makes (accept, claim, start, finish, yield, next
//! turn, renew, release, terminals published) run here instead: on one
//! connection of the store's own, synchronously, each in one transaction,
//! with the same SQL as the sqlx path (`sql.rs`, `sqlite.rs`), bound by
//! parameter number as sqlx binds it. In one process these calls never
//! contend for SQLite's write lock with each other: they take turns on the
//! connection's mutex, held only while statements run.
//!
//! It never makes the runtime wait on I/O or on another writer. The
//! connection's busy timeout is zero: when another connection (the pool's,
//! for the rarer calls left to sqlx, or another worker process's) holds
//! SQLite's write lock, a call answers `None`; the store tries it again a
//! few times over a few milliseconds (`SqliteStore::on_fast_path`) and then
//! runs the same statements through sqlx, which waits on its own thread.
//! Nor does it sync
//! to disk: it is used only with `synchronous=normal`, where a WAL commit
//! writes without syncing, and it leaves checkpoints (which sync) to the
//! pool (`wal_autocheckpoint = 0` here): every `CHECKPOINT_EVERY` commits
//! it asks the store's checkpointer task for one, which runs on a pool
//! connection's thread and keeps the WAL file from growing without bound.

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{CachedStatement, Connection, ErrorCode, OpenFlags, ToSql, TransactionBehavior};

use super::rows::{lease_lost, JobRow, SessionRow};
use super::sql::{
    CLAIM_TAKE, FENCE, FINISH_JOB, FINISH_SESSION, FINISH_SESSION_UPDATE, HELD_SESSION, NEXT_JOB,
    OTHERS_WAITING, RELEASE_LEASE, RENEW, RUNNABLE, START_JOB, START_SESSION, TERMINAL_PUBLISHED,
    TRANSCRIPT_APPEND, TRANSCRIPT_CHUNK, TRANSCRIPT_DROP_CHUNKS, TRANSCRIPT_PUT,
};
use super::sqlite::{ACCEPT_EXISTING, ACCEPT_JOB, ACCEPT_SESSION, CLAIM_PICK};
use super::{
    AcceptOutcome, AcceptReport, AfterFinish, JobFinish, JobRecord, JobStatus, Lease, NewJob,
    NextJob, ReleaseOutcome, SessionRecord, StartedAttempt, StoreError, TranscriptWrite,
    YieldOrder, YieldOutcome,
};

/// Commits between two checkpoint requests: the WAL then stays within a
/// few thousand pages (SQLite's own default checkpoints at 1,000).
const CHECKPOINT_EVERY: u32 = 200;

/// The store's own connection for the turn path.
pub struct FastPath {
    conn: Mutex<Connection>,
    commits: AtomicU32,
    /// Asks for a passive checkpoint (full: one is already asked for).
    checkpoint: tokio::sync::mpsc::Sender<()>,
}

/// Why a call did not complete here: SQLite's write lock (or this
/// connection) was busy, so the sqlx path should run it; or it failed.
enum Failure {
    Busy,
    Store(StoreError),
}

type Step<T> = Result<T, Failure>;

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure::Store(e)
    }
}

impl From<rusqlite::Error> for Failure {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => Failure::Busy,
            Some(
                ErrorCode::SystemIoFailure
                | ErrorCode::DiskFull
                | ErrorCode::CannotOpen
                | ErrorCode::ReadOnly
                | ErrorCode::OutOfMemory,
            ) => Failure::Store(StoreError::Unavailable(e.to_string())),
            _ => Failure::Store(StoreError::Other(e.to_string())),
        }
    }
}

fn other(what: &str) -> Failure {
    Failure::Store(StoreError::Other(what.to_string()))
}

impl FastPath {
    /// Opens the connection on the database file at `path`, which the
    /// pool has created (and put in WAL mode).
    pub(crate) fn open(
        path: &Path,
        checkpoint: tokio::sync::mpsc::Sender<()>,
    ) -> Result<FastPath, StoreError> {
        let open = || -> rusqlite::Result<Connection> {
            let conn = Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            conn.busy_timeout(Duration::ZERO)?;
            conn.pragma_update(None, "foreign_keys", "ON")?;
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            conn.pragma_update(None, "wal_autocheckpoint", 0)?;
            conn.set_prepared_statement_cache_capacity(32);
            Ok(conn)
        };
        let conn = open().map_err(|e| StoreError::Other(format!("sqlite fast path: {e}")))?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .map_err(|e| StoreError::Other(format!("sqlite fast path: {e}")))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Other(format!(
                "sqlite fast path needs WAL mode, the file is in {mode}"
            )));
        }
        Ok(FastPath {
            conn: Mutex::new(conn),
            commits: AtomicU32::new(0),
            checkpoint,
        })
    }

    /// Runs `f` in one transaction on this connection: its result, or
    /// `None` when the sqlx path should run the call instead (busy).
    fn run<T>(
        &self,
        behavior: TransactionBehavior,
        f: impl FnOnce(&Connection) -> Step<T>,
    ) -> Option<Result<T, StoreError>> {
        // Held only while statements run: with a zero busy timeout and no
        // checkpoints here, nothing under it waits on I/O or another lock.
        let mut conn = self.conn.lock().ok()?;
        let outcome = (|| {
            let tx = conn.transaction_with_behavior(behavior)?;
            let value = f(&tx)?;
            tx.commit()?;
            Ok(value)
        })();
        drop(conn);
        match outcome {
            Ok(value) => {
                if self.commits.fetch_add(1, Ordering::Relaxed) % CHECKPOINT_EVERY
                    == CHECKPOINT_EVERY - 1
                {
                    let _ = self.checkpoint.try_send(());
                }
                Some(Ok(value))
            }
            Err(Failure::Busy) => None,
            Err(Failure::Store(e)) => Some(Err(e)),
        }
    }

    /// A write transaction: SQLite's write lock taken up front, as the
    /// sqlx path's `BEGIN IMMEDIATE`.
    fn write<T>(&self, f: impl FnOnce(&Connection) -> Step<T>) -> Option<Result<T, StoreError>> {
        self.run(TransactionBehavior::Immediate, f)
    }

    pub(crate) fn accept_job_by(
        &self,
        job: &NewJob,
        spec: &str,
        now_ms: i64,
        worker_id: Option<&str>,
    ) -> Option<Result<AcceptReport, StoreError>> {
        self.write(|c| {
            let existing = query_opt(c, ACCEPT_EXISTING, &[&job.job_id], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?))
            })?;
            if let Some((status, terminal_event)) = existing {
                return Ok(AcceptReport::known(AcceptOutcome::Duplicate {
                    status: JobStatus::parse(&status)?,
                    terminal_event,
                }));
            }
            let session = [&job.session_key as &dyn ToSql, &job.spec.profile, &now_ms];
            let (owner, expires) = query_opt(c, ACCEPT_SESSION, &session, |r| {
                Ok((r.get::<_, Option<String>>(0)?, r.get::<_, Option<i64>>(1)?))
            })?
            .ok_or_else(|| other("the session upsert returned no row"))?;
            execute(
                c,
                ACCEPT_JOB,
                &[&job.job_id, &job.session_key, &spec, &now_ms],
            )?;
            let live_owner = owner.filter(|_| expires.is_some_and(|at| at >= now_ms));
            Ok(AcceptReport::inserted(live_owner, worker_id))
        })
    }

    pub(crate) fn start_attempt(
        &self,
        lease: &Lease,
        job_id: &str,
        now_ms: i64,
        reserve: i64,
    ) -> Option<Result<StartedAttempt, StoreError>> {
        self.write(|c| {
            fence(c, lease)?;
            let job = [&now_ms as &dyn ToSql, &job_id, &lease.session_key, &reserve];
            let attempts = query_opt(c, START_JOB, &job, |r| r.get::<_, i64>(0))?
                .ok_or_else(|| Failure::Store(StoreError::NotRunnable(job_id.to_string())))?;
            let (lifecycle_started_at_ms, lifecycle_job_id) =
                query_opt(c, START_SESSION, &[&now_ms, &lease.session_key], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?
                .ok_or_else(|| other("the started session has no row"))?;
            let attempt = u32::try_from(attempts)
                .map_err(|_| other(&format!("job {job_id}: bad attempts {attempts}")))?;
            Ok(StartedAttempt {
                attempt,
                lifecycle_started_at_ms,
                lifecycle_job_id,
            })
        })
    }

    pub(crate) fn next_turn(&self, lease: &Lease) -> Option<Result<Option<NextJob>, StoreError>> {
        // A read (a deferred transaction): one snapshot.
        self.run(TransactionBehavior::Deferred, |c| next_turn_in(c, lease))
    }

    pub(crate) fn yield_or_next(
        &self,
        lease: &Lease,
        now_ms: i64,
        order: YieldOrder,
    ) -> Option<Result<YieldOutcome, StoreError>> {
        self.write(|c| {
            fence(c, lease)?;
            if order == YieldOrder::OwnFirst {
                if let Some(next) = next_turn_in(c, lease)? {
                    return Ok(YieldOutcome::Kept(Some(Box::new(next))));
                }
            }
            if others_waiting(c, lease, now_ms)? {
                execute(c, RELEASE_LEASE, &[&now_ms, &lease.session_key])?;
                return Ok(YieldOutcome::HandedBack);
            }
            let next = match order {
                YieldOrder::OthersFirst => next_turn_in(c, lease)?,
                YieldOrder::OwnFirst => None,
            };
            Ok(YieldOutcome::Kept(next.map(Box::new)))
        })
    }

    pub(crate) fn claim_session(
        &self,
        owner: &str,
        now_ms: i64,
        ttl_ms: i64,
        prefer: Option<&str>,
    ) -> Option<Result<Option<Lease>, StoreError>> {
        self.write(|c| {
            let pick = [&now_ms as &dyn ToSql, &prefer];
            let Some(session_key) = query_opt(c, CLAIM_PICK, &pick, |r| r.get::<_, String>(0))?
            else {
                return Ok(None);
            };
            let expires = now_ms.saturating_add(ttl_ms);
            let take = [&owner as &dyn ToSql, &expires, &now_ms, &session_key];
            let epoch = query_opt(c, CLAIM_TAKE, &take, |r| r.get::<_, i64>(0))?
                .ok_or_else(|| other("the claimed session has no row"))?;
            Ok(Some(Lease {
                session_key,
                owner: owner.to_string(),
                epoch,
            }))
        })
    }

    pub(crate) fn renew_lease(
        &self,
        lease: &Lease,
        expires_at_ms: i64,
    ) -> Option<Result<bool, StoreError>> {
        self.write(|c| {
            let renew = [
                &expires_at_ms as &dyn ToSql,
                &lease.session_key,
                &lease.owner,
                &lease.epoch,
            ];
            Ok(execute(c, RENEW, &renew)? == 1)
        })
    }

    pub(crate) fn release_lease(
        &self,
        lease: &Lease,
        now_ms: i64,
    ) -> Option<Result<ReleaseOutcome, StoreError>> {
        self.write(|c| {
            fence(c, lease)?;
            let runnable = query_opt(c, RUNNABLE, &[&lease.session_key], |r| r.get::<_, i64>(0))?;
            if runnable.is_some() {
                return Ok(ReleaseOutcome::MoreWork);
            }
            // The epoch stays: the next claim makes it grow.
            execute(c, RELEASE_LEASE, &[&now_ms, &lease.session_key])?;
            Ok(ReleaseOutcome::Released)
        })
    }

    pub(crate) fn mark_terminals_published(
        &self,
        job_ids: &[String],
        now_ms: i64,
    ) -> Option<Result<(), StoreError>> {
        self.write(|c| {
            for job_id in job_ids {
                execute(c, TERMINAL_PUBLISHED, &[&now_ms, job_id])?;
            }
            Ok(())
        })
    }

    /// `finish_job_and_look`, its checks done: `next_seq` in range, the
    /// transcript (if any) the lease's session's.
    pub(crate) fn finish_job_and_look(
        &self,
        lease: &Lease,
        finish: &JobFinish,
        next_seq: i64,
    ) -> Option<Result<AfterFinish, StoreError>> {
        self.write(|c| {
            fence(c, lease)?;
            if let Some(write) = &finish.transcript {
                write_transcript(c, write)?;
            }
            let job: [&dyn ToSql; 9] = [
                &finish.status.as_str(),
                &finish.error,
                &finish.terminal_event,
                &next_seq,
                &finish.now_ms,
                &finish.cost_usd,
                &finish.identity,
                &finish.job_id,
                &lease.session_key,
            ];
            if execute(c, FINISH_JOB, &job)? == 0 {
                return Err(other(&format!(
                    "job {} is not a job of session {}",
                    finish.job_id, lease.session_key
                )));
            }
            let session: [&dyn ToSql; 4] = [
                &finish.job_id,
                &finish.now_ms,
                &finish.cost_usd,
                &lease.session_key,
            ];
            execute(c, FINISH_SESSION, &session)?;
            if let Some(u) = &finish.session_update {
                let update: [&dyn ToSql; 9] = [
                    &u.claude_session_id,
                    &u.cwd,
                    &u.model,
                    &u.input_tokens,
                    &u.output_tokens,
                    &u.context_tokens,
                    &u.context_window,
                    &lease.session_key,
                    &finish.job_id,
                ];
                execute(c, FINISH_SESSION_UPDATE, &update)?;
            }
            let others_waiting = others_waiting(c, lease, finish.now_ms)?;
            let next = next_turn_in(c, lease)?;
            Ok(AfterFinish {
                others_waiting,
                next: next.map(Box::new),
            })
        })
    }
}

/// `LeaseLost` unless `lease` is the session's current lease (the write
/// lock is held, so no claim can come in before the commit).
fn fence(c: &Connection, lease: &Lease) -> Step<()> {
    let held = [&lease.session_key as &dyn ToSql, &lease.owner, &lease.epoch];
    match query_opt(c, FENCE, &held, |r| r.get::<_, i64>(0))? {
        Some(_) => Ok(()),
        None => Err(Failure::Store(lease_lost(lease))),
    }
}

fn others_waiting(c: &Connection, lease: &Lease, now_ms: i64) -> Step<bool> {
    let waiting = query_opt(c, OTHERS_WAITING, &[&lease.session_key, &now_ms], |r| {
        r.get::<_, i64>(0)
    })?;
    Ok(waiting.is_some())
}

/// The holder's read of its session and the session's next runnable job,
/// as `sql::next_turn_in!`.
fn next_turn_in(c: &Connection, lease: &Lease) -> Step<Option<NextJob>> {
    let held = [&lease.session_key as &dyn ToSql, &lease.owner, &lease.epoch];
    let Some(session) = query_opt(c, &HELD_SESSION, &held, SessionRow::from_rusqlite)? else {
        return Err(Failure::Store(lease_lost(lease)));
    };
    let Some(job) = query_opt(c, &NEXT_JOB, &[&lease.session_key], JobRow::from_rusqlite)? else {
        return Ok(None);
    };
    Ok(Some(NextJob {
        job: JobRecord::try_from(job)?,
        session: SessionRecord::try_from(session)?,
    }))
}

/// As `sql::write_transcript!`.
fn write_transcript(c: &Connection, write: &TranscriptWrite) -> Step<()> {
    match write {
        TranscriptWrite::Full(t) => {
            let row: [&dyn ToSql; 6] = [
                &t.claude_session_id,
                &t.session_key,
                &t.data,
                &t.size_bytes,
                &t.sha256,
                &t.updated_at_ms,
            ];
            execute(c, TRANSCRIPT_PUT, &row)?;
            execute(c, TRANSCRIPT_DROP_CHUNKS, &[&t.claude_session_id])?;
        }
        TranscriptWrite::Append(a) => {
            let base: [&dyn ToSql; 6] = [
                &a.session_key,
                &a.size_bytes,
                &a.sha256,
                &a.updated_at_ms,
                &a.claude_session_id,
                &a.prev_sha256,
            ];
            let Some(seq) = query_opt(c, TRANSCRIPT_APPEND, &base, |r| r.get::<_, i64>(0))? else {
                return Err(Failure::Store(StoreError::TranscriptChanged(
                    a.claude_session_id.clone(),
                )));
            };
            execute(c, TRANSCRIPT_CHUNK, &[&a.claude_session_id, &seq, &a.chunk])?;
        }
    }
    Ok(())
}

/// The statement `sql`, cached, with `values` bound by the numbers its
/// parameters name (`$1` is `values[0]`, wherever and however often it
/// appears), as sqlx binds them: both paths run the same SQL.
fn prepared<'c>(c: &'c Connection, sql: &str, values: &[&dyn ToSql]) -> Step<CachedStatement<'c>> {
    let mut stmt = c.prepare_cached(sql)?;
    for i in 1..=stmt.parameter_count() {
        let n = stmt
            .parameter_name(i)
            .and_then(|name| name.get(1..))
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| (1..=values.len()).contains(n))
            .ok_or_else(|| other(&format!("parameter {i} of a statement has no value")))?;
        stmt.raw_bind_parameter(i, values[n - 1])?;
    }
    Ok(stmt)
}

/// Runs a statement that returns no rows: the rows it changed.
fn execute(c: &Connection, sql: &str, values: &[&dyn ToSql]) -> Step<usize> {
    Ok(prepared(c, sql, values)?.raw_execute()?)
}

/// The first row of a statement (a `RETURNING` one makes its change on the
/// first step), read by `row`.
fn query_opt<T>(
    c: &Connection,
    sql: &str,
    values: &[&dyn ToSql],
    row: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> Step<Option<T>> {
    let mut stmt = prepared(c, sql, values)?;
    let mut rows = stmt.raw_query();
    let first = match rows.next()? {
        Some(r) => Some(row(r)?),
        None => None,
    };
    Ok(first)
}
