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

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqliteConnection, SqlitePool, Transaction};

use super::rows::{
    lease_lost, seq_to_db, spec_json, JobRow, SessionRow, JOB_COLUMNS, SESSION_COLUMNS,
};
use super::{
    AcceptOutcome, JobFinish, JobRecord, JobStatus, Lease, NewJob, ReleaseOutcome, SessionRecord,
    SessionStore, StoreError, Transcript,
};
use crate::protocol::PermissionMode;

/// Claimable: no lease, or one that ran out.
const LEASE_FREE: &str =
    "(s.lease_owner IS NULL OR s.lease_expires_at_ms IS NULL OR s.lease_expires_at_ms < ?)";

pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if missing) the database file named by `url`.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            // Other processes hold the write lock only for one short
            // transaction; waiting beats failing.
            .busy_timeout(Duration::from_secs(30))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections.max(1))
            .connect_with(options)
            .await?;
        Ok(SqliteStore { pool })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    async fn begin_immediate(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }
}

/// Fails with `LeaseLost` unless `lease` is the session's current lease.
async fn check_fence(conn: &mut SqliteConnection, lease: &Lease) -> Result<(), StoreError> {
    let held: Option<i64> = sqlx::query_scalar(
        "SELECT 1 FROM sessions WHERE session_key = ? AND lease_owner = ? AND lease_epoch = ?",
    )
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

#[async_trait]
impl SessionStore for SqliteStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("./migrations/sqlite")
            .run(&self.pool)
            .await
            .map_err(|e| StoreError::Other(format!("sqlite migration failed: {e}")))
    }

    async fn accept_job(&self, job: &NewJob, now_ms: i64) -> Result<AcceptOutcome, StoreError> {
        let spec = spec_json(&job.spec)?;
        let mut tx = self.begin_immediate().await?;
        // The write lock is held, so this check and the inserts are atomic.
        let existing: Option<(String, Option<String>)> =
            sqlx::query_as("SELECT status, terminal_event FROM jobs WHERE job_id = ?")
                .bind(&job.job_id)
                .fetch_optional(&mut *tx)
                .await?;
        if let Some((status, terminal_event)) = existing {
            tx.rollback().await?;
            return Ok(AcceptOutcome::Duplicate {
                status: JobStatus::parse(&status)?,
                terminal_event,
            });
        }
        sqlx::query(
            "INSERT INTO sessions (session_key, profile, status, created_at_ms, updated_at_ms) \
             VALUES (?, ?, 'idle', ?, ?) \
             ON CONFLICT (session_key) DO UPDATE SET updated_at_ms = excluded.updated_at_ms, \
               status = CASE WHEN status = 'closed' THEN 'idle' ELSE status END",
        )
        .bind(&job.session_key)
        .bind(&job.spec.profile)
        .bind(now_ms)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO jobs (job_id, session_key, status, attempts, next_seq, spec, created_at_ms) \
             VALUES (?, ?, 'queued', 0, 0, ?, ?)",
        )
        .bind(&job.job_id)
        .bind(&job.session_key)
        .bind(spec)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(AcceptOutcome::Inserted)
    }

    async fn claim_session(
        &self,
        owner: &str,
        now_ms: i64,
        ttl_ms: i64,
        prefer: Option<&str>,
    ) -> Result<Option<Lease>, StoreError> {
        let mut tx = self.begin_immediate().await?;
        // Least recently served first (never served counts as oldest);
        // among equals the preferred session, then the oldest runnable job.
        let key: Option<String> = sqlx::query_scalar(&format!(
            "SELECT s.session_key FROM sessions s \
             WHERE {LEASE_FREE} AND s.session_key IN \
               (SELECT j.session_key FROM jobs j WHERE j.status IN ('queued', 'running')) \
             ORDER BY COALESCE(s.last_served_at_ms, 0), \
               CASE WHEN s.session_key = ? THEN 0 ELSE 1 END, \
               (SELECT MIN(j.job_order) FROM jobs j WHERE j.session_key = s.session_key \
                  AND j.status IN ('queued', 'running')) \
             LIMIT 1"
        ))
        .bind(now_ms)
        .bind(prefer)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(session_key) = key else {
            tx.rollback().await?;
            return Ok(None);
        };
        let epoch: i64 = sqlx::query_scalar(
            "UPDATE sessions SET lease_owner = ?, lease_epoch = lease_epoch + 1, lease_expires_at_ms = ?, \
               status = CASE WHEN EXISTS (SELECT 1 FROM jobs j WHERE j.session_key = sessions.session_key \
                                          AND j.status = 'running') \
                        THEN 'interrupted' ELSE 'active' END, \
               updated_at_ms = ?, last_served_at_ms = ? \
             WHERE session_key = ? RETURNING lease_epoch",
        )
        .bind(owner)
        .bind(now_ms.saturating_add(ttl_ms))
        .bind(now_ms)
        .bind(now_ms)
        .bind(&session_key)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(Lease {
            session_key,
            owner: owner.to_string(),
            epoch,
        }))
    }

    async fn renew_lease(
        &self,
        lease: &Lease,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin_immediate().await?;
        let done = sqlx::query(
            "UPDATE sessions SET lease_expires_at_ms = ? \
             WHERE session_key = ? AND lease_owner = ? AND lease_epoch = ?",
        )
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
        let mut tx = self.begin_immediate().await?;
        check_fence(&mut tx, lease).await?;
        let runnable: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM jobs WHERE session_key = ? AND status IN ('queued', 'running') LIMIT 1",
        )
        .bind(&lease.session_key)
        .fetch_optional(&mut *tx)
        .await?;
        if runnable.is_some() {
            tx.rollback().await?;
            return Ok(ReleaseOutcome::MoreWork);
        }
        // The epoch stays: the next claim makes it grow.
        sqlx::query(
            "UPDATE sessions SET lease_owner = NULL, lease_expires_at_ms = NULL, status = 'idle', \
               updated_at_ms = ? WHERE session_key = ?",
        )
        .bind(now_ms)
        .bind(&lease.session_key)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(ReleaseOutcome::Released)
    }

    async fn yield_lease(&self, lease: &Lease, now_ms: i64) -> Result<bool, StoreError> {
        let mut tx = self.begin_immediate().await?;
        check_fence(&mut tx, lease).await?;
        let waiting: Option<i64> = sqlx::query_scalar(&format!(
            "SELECT 1 FROM sessions s WHERE s.session_key <> ? AND {LEASE_FREE} \
               AND s.session_key IN (SELECT j.session_key FROM jobs j \
                                     WHERE j.status IN ('queued', 'running')) LIMIT 1"
        ))
        .bind(&lease.session_key)
        .bind(now_ms)
        .fetch_optional(&mut *tx)
        .await?;
        if waiting.is_none() {
            tx.rollback().await?;
            return Ok(false);
        }
        sqlx::query(
            "UPDATE sessions SET lease_owner = NULL, lease_expires_at_ms = NULL, status = 'idle', \
               updated_at_ms = ? WHERE session_key = ?",
        )
        .bind(now_ms)
        .bind(&lease.session_key)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn put_transcript(
        &self,
        lease: &Lease,
        transcript: &Transcript,
    ) -> Result<(), StoreError> {
        if transcript.session_key != lease.session_key {
            return Err(StoreError::Other(format!(
                "transcript of session {} written under the lease of {}",
                transcript.session_key, lease.session_key
            )));
        }
        let mut tx = self.begin_immediate().await?;
        check_fence(&mut tx, lease).await?;
        sqlx::query(
            "INSERT INTO transcripts (claude_session_id, session_key, data, size_bytes, updated_at_ms) \
             VALUES (?, ?, ?, ?, ?) \
             ON CONFLICT (claude_session_id) DO UPDATE SET session_key = excluded.session_key, \
               data = excluded.data, size_bytes = excluded.size_bytes, \
               updated_at_ms = excluded.updated_at_ms",
        )
        .bind(&transcript.claude_session_id)
        .bind(&transcript.session_key)
        .bind(&transcript.data)
        .bind(transcript.size_bytes)
        .bind(transcript.updated_at_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn get_transcript(
        &self,
        claude_session_id: &str,
    ) -> Result<Option<Transcript>, StoreError> {
        let row: Option<(String, String, Vec<u8>, i64, i64)> = sqlx::query_as(
            "SELECT claude_session_id, session_key, data, size_bytes, updated_at_ms \
             FROM transcripts WHERE claude_session_id = ?",
        )
        .bind(claude_session_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| Transcript {
            claude_session_id: r.0,
            session_key: r.1,
            data: r.2,
            size_bytes: r.3,
            updated_at_ms: r.4,
        }))
    }

    async fn abandon_lease(&self, lease: &Lease, now_ms: i64) -> Result<(), StoreError> {
        let mut tx = self.begin_immediate().await?;
        check_fence(&mut tx, lease).await?;
        sqlx::query(
            "UPDATE jobs SET status = 'queued' WHERE session_key = ? AND status = 'running'",
        )
        .bind(&lease.session_key)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE sessions SET lease_owner = NULL, lease_expires_at_ms = NULL, status = 'idle', \
               updated_at_ms = ? WHERE session_key = ?",
        )
        .bind(now_ms)
        .bind(&lease.session_key)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn next_job(&self, lease: &Lease) -> Result<Option<JobRecord>, StoreError> {
        // A read: a deferred transaction gives one snapshot for both queries.
        let mut tx = self.pool.begin().await?;
        check_fence(&mut tx, lease).await?;
        let row: Option<JobRow> = sqlx::query_as(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE session_key = ? AND status IN ('queued', 'running') \
             ORDER BY CASE status WHEN 'running' THEN 0 ELSE 1 END, job_order LIMIT 1"
        ))
        .bind(&lease.session_key)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        row.map(JobRecord::try_from).transpose()
    }

    async fn start_attempt(
        &self,
        lease: &Lease,
        job_id: &str,
        now_ms: i64,
    ) -> Result<u32, StoreError> {
        let mut tx = self.begin_immediate().await?;
        check_fence(&mut tx, lease).await?;
        let attempts: Option<i64> = sqlx::query_scalar(
            "UPDATE jobs SET status = 'running', attempts = attempts + 1, \
               started_at_ms = COALESCE(started_at_ms, ?) \
             WHERE job_id = ? AND session_key = ? AND status IN ('queued', 'running') \
             RETURNING attempts",
        )
        .bind(now_ms)
        .bind(job_id)
        .bind(&lease.session_key)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(attempts) = attempts else {
            return Err(StoreError::NotRunnable(job_id.to_string()));
        };
        sqlx::query(
            "UPDATE sessions SET status = 'active', updated_at_ms = ? WHERE session_key = ?",
        )
        .bind(now_ms)
        .bind(&lease.session_key)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        u32::try_from(attempts)
            .map_err(|_| StoreError::Other(format!("job {job_id}: bad attempts {attempts}")))
    }

    async fn record_seq(
        &self,
        lease: &Lease,
        job_id: &str,
        next_seq: u64,
    ) -> Result<(), StoreError> {
        let next_seq = seq_to_db(next_seq)?;
        let mut tx = self.begin_immediate().await?;
        check_fence(&mut tx, lease).await?;
        let done = sqlx::query("UPDATE jobs SET next_seq = ? WHERE job_id = ? AND session_key = ?")
            .bind(next_seq)
            .bind(job_id)
            .bind(&lease.session_key)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(not_in_session(job_id, lease));
        }
        tx.commit().await?;
        Ok(())
    }

    async fn finish_job(&self, lease: &Lease, finish: &JobFinish) -> Result<(), StoreError> {
        if !finish.status.is_terminal() {
            return Err(StoreError::Other(format!(
                "finish_job with non-terminal status {}",
                finish.status.as_str()
            )));
        }
        let next_seq = seq_to_db(finish.next_seq)?;
        let mut tx = self.begin_immediate().await?;
        check_fence(&mut tx, lease).await?;
        let done = sqlx::query(
            "UPDATE jobs SET status = ?, error = ?, terminal_event = ?, next_seq = ?, finished_at_ms = ? \
             WHERE job_id = ? AND session_key = ?",
        )
        .bind(finish.status.as_str())
        .bind(&finish.error)
        .bind(&finish.terminal_event)
        .bind(next_seq)
        .bind(finish.now_ms)
        .bind(&finish.job_id)
        .bind(&lease.session_key)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(not_in_session(&finish.job_id, lease));
        }
        match &finish.session_update {
            Some(u) => {
                sqlx::query(
                    "UPDATE sessions SET last_job_id = ?, updated_at_ms = ?, claude_session_id = ?, \
                       cwd = ?, model = ?, turns = turns + 1, input_tokens = input_tokens + ?, \
                       output_tokens = output_tokens + ?, cost_usd = cost_usd + ? \
                     WHERE session_key = ?",
                )
                .bind(&finish.job_id)
                .bind(finish.now_ms)
                .bind(&u.claude_session_id)
                .bind(&u.cwd)
                .bind(&u.model)
                .bind(u.input_tokens)
                .bind(u.output_tokens)
                .bind(u.cost_usd)
                .bind(&lease.session_key)
                .execute(&mut *tx)
                .await?;
            }
            None => {
                sqlx::query(
                    "UPDATE sessions SET last_job_id = ?, updated_at_ms = ? WHERE session_key = ?",
                )
                .bind(&finish.job_id)
                .bind(finish.now_ms)
                .bind(&lease.session_key)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn get_job(&self, job_id: &str) -> Result<Option<JobRecord>, StoreError> {
        let row: Option<JobRow> =
            sqlx::query_as(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = ?"))
                .bind(job_id)
                .fetch_optional(&self.pool)
                .await?;
        row.map(JobRecord::try_from).transpose()
    }

    async fn get_session(&self, session_key: &str) -> Result<Option<SessionRecord>, StoreError> {
        let row: Option<SessionRow> = sqlx::query_as(&format!(
            "SELECT {SESSION_COLUMNS} FROM sessions WHERE session_key = ?"
        ))
        .bind(session_key)
        .fetch_optional(&self.pool)
        .await?;
        row.map(SessionRecord::try_from).transpose()
    }

    async fn list_sessions(&self, limit: i64) -> Result<Vec<SessionRecord>, StoreError> {
        let rows: Vec<SessionRow> = sqlx::query_as(&format!(
            "SELECT {SESSION_COLUMNS} FROM sessions ORDER BY updated_at_ms DESC, session_key LIMIT ?"
        ))
        .bind(limit.max(0))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(SessionRecord::try_from).collect()
    }

    async fn list_jobs(&self, session_key: &str, limit: i64) -> Result<Vec<JobRecord>, StoreError> {
        let rows: Vec<JobRow> = sqlx::query_as(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE session_key = ? ORDER BY job_order DESC LIMIT ?"
        ))
        .bind(session_key)
        .bind(limit.max(0))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().rev().map(JobRecord::try_from).collect()
    }

    async fn forget_session(&self, session_key: &str, now_ms: i64) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE sessions SET claude_session_id = NULL, status = 'closed', updated_at_ms = ? \
             WHERE session_key = ?",
        )
        .bind(now_ms)
        .bind(session_key)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn claim_control(&self, request_id: &str, now_ms: i64) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO control_requests (request_id, created_at_ms) VALUES (?, ?) \
             ON CONFLICT (request_id) DO NOTHING",
        )
        .bind(request_id)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn finish_queued_job(
        &self,
        job_id: &str,
        status: JobStatus,
        error: Option<&str>,
        terminal_event: &str,
        next_seq: u64,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE jobs SET status = ?, error = ?, terminal_event = ?, next_seq = ?, \
               finished_at_ms = ? WHERE job_id = ? AND status = 'queued'",
        )
        .bind(status.as_str())
        .bind(error)
        .bind(terminal_event)
        .bind(seq_to_db(next_seq)?)
        .bind(now_ms)
        .bind(job_id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn set_session_permission_mode(
        &self,
        session_key: &str,
        mode: Option<PermissionMode>,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE sessions SET permission_mode = ?, updated_at_ms = ? WHERE session_key = ?",
        )
        .bind(mode.map(|m| m.as_str()))
        .bind(now_ms)
        .bind(session_key)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }
}
