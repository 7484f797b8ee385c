//! Postgres backend: for a fleet of workers sharing one database.
//!
//! Transactions run at READ COMMITTED. Claims lock the chosen session row
//! with `FOR UPDATE SKIP LOCKED`, so racing claimers never wait on each
//! other; fenced writes lock the session row (`FOR UPDATE`) while they
//! check the epoch, so a claim cannot slip in between check and write.
//! `accept_job` (whose upsert row-locks the session) and `release_lease`
//! serialise on that same row, so a job accepted while its session is
//! being released is either seen by the release (`MoreWork`) or lands on a
//! session that is already claimable.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgConnection, PgPool};

use super::rows::{
    lease_lost, seq_to_db, spec_json, JobRow, SessionRow, JOB_COLUMNS, SESSION_COLUMNS,
};
use super::{
    AcceptOutcome, JobFinish, JobRecord, JobStatus, Lease, NewJob, ReleaseOutcome, SessionRecord,
    SessionStore, StoreError, Transcript,
};
use crate::protocol::PermissionMode;

pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(Duration::from_secs(30))
            .connect(url)
            .await?;
        Ok(PostgresStore { pool })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// Fails with `LeaseLost` unless `lease` is the session's current lease.
/// With `lock`, the session row stays locked until the transaction ends,
/// which keeps a competing claim out until the guarded write commits.
async fn check_fence(conn: &mut PgConnection, lease: &Lease, lock: bool) -> Result<(), StoreError> {
    let sql = if lock {
        "SELECT 1 FROM sessions WHERE session_key = $1 AND lease_owner = $2 AND lease_epoch = $3 FOR UPDATE"
    } else {
        "SELECT 1 FROM sessions WHERE session_key = $1 AND lease_owner = $2 AND lease_epoch = $3"
    };
    let held: Option<i32> = sqlx::query_scalar(sql)
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

async fn existing_job(
    conn: &mut PgConnection,
    job_id: &str,
) -> Result<Option<AcceptOutcome>, StoreError> {
    let row: Option<(String, Option<String>)> =
        sqlx::query_as("SELECT status, terminal_event FROM jobs WHERE job_id = $1")
            .bind(job_id)
            .fetch_optional(&mut *conn)
            .await?;
    row.map(|(status, terminal_event)| {
        Ok(AcceptOutcome::Duplicate {
            status: JobStatus::parse(&status)?,
            terminal_event,
        })
    })
    .transpose()
}

#[async_trait]
impl SessionStore for PostgresStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("./migrations/postgres")
            .run(&self.pool)
            .await
            .map_err(|e| StoreError::Other(format!("postgres migration failed: {e}")))
    }

    async fn accept_job(&self, job: &NewJob, now_ms: i64) -> Result<AcceptOutcome, StoreError> {
        let spec = spec_json(&job.spec)?;
        // Redeliveries are common; answer them without taking any lock.
        if let Some(dup) = existing_job(&mut *self.pool.acquire().await?, &job.job_id).await? {
            return Ok(dup);
        }
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO sessions (session_key, profile, status, created_at_ms, updated_at_ms) \
             VALUES ($1, $2, 'idle', $3, $3) \
             ON CONFLICT (session_key) DO UPDATE SET updated_at_ms = EXCLUDED.updated_at_ms, \
               status = CASE WHEN sessions.status = 'closed' THEN 'idle' ELSE sessions.status END",
        )
        .bind(&job.session_key)
        .bind(&job.spec.profile)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        let inserted: Option<i64> = sqlx::query_scalar(
            "INSERT INTO jobs (job_id, session_key, status, attempts, next_seq, spec, created_at_ms) \
             VALUES ($1, $2, 'queued', 0, 0, $3, $4) \
             ON CONFLICT (job_id) DO NOTHING RETURNING job_order",
        )
        .bind(&job.job_id)
        .bind(&job.session_key)
        .bind(spec)
        .bind(now_ms)
        .fetch_optional(&mut *tx)
        .await?;
        if inserted.is_none() {
            // Lost a race with a concurrent accept of the same job_id (which
            // has committed by now): report it and undo the session upsert.
            let dup = existing_job(&mut tx, &job.job_id).await?;
            tx.rollback().await?;
            return dup.ok_or_else(|| {
                StoreError::Unavailable(format!("job {} vanished; retry", job.job_id))
            });
        }
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
        let mut tx = self.pool.begin().await?;
        // Least recently served first (never served counts as oldest);
        // among equals the preferred session, then the oldest runnable job.
        // Locked rows are skipped, and a row locked after a concurrent claim
        // committed is re-checked against the WHERE clause, so a live lease
        // is never claimed twice.
        let key: Option<String> = sqlx::query_scalar(
            "SELECT s.session_key FROM sessions s \
             WHERE (s.lease_owner IS NULL OR s.lease_expires_at_ms IS NULL OR s.lease_expires_at_ms < $1) \
               AND s.session_key IN (SELECT j.session_key FROM jobs j \
                                     WHERE j.status IN ('queued', 'running')) \
             ORDER BY COALESCE(s.last_served_at_ms, 0), \
               CASE WHEN s.session_key = $2 THEN 0 ELSE 1 END, \
               (SELECT MIN(j.job_order) FROM jobs j WHERE j.session_key = s.session_key \
                  AND j.status IN ('queued', 'running')) \
             LIMIT 1 \
             FOR UPDATE OF s SKIP LOCKED",
        )
        .bind(now_ms)
        .bind(prefer)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(session_key) = key else {
            tx.rollback().await?;
            return Ok(None);
        };
        let epoch: i64 = sqlx::query_scalar(
            "UPDATE sessions SET lease_owner = $1, lease_epoch = lease_epoch + 1, lease_expires_at_ms = $2, \
               status = CASE WHEN EXISTS (SELECT 1 FROM jobs j WHERE j.session_key = sessions.session_key \
                                          AND j.status = 'running') \
                        THEN 'interrupted' ELSE 'active' END, \
               updated_at_ms = $3, last_served_at_ms = $3 \
             WHERE session_key = $4 RETURNING lease_epoch",
        )
        .bind(owner)
        .bind(now_ms.saturating_add(ttl_ms))
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
        let done = sqlx::query(
            "UPDATE sessions SET lease_expires_at_ms = $1 \
             WHERE session_key = $2 AND lease_owner = $3 AND lease_epoch = $4",
        )
        .bind(now_ms.saturating_add(ttl_ms))
        .bind(&lease.session_key)
        .bind(&lease.owner)
        .bind(lease.epoch)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn release_lease(
        &self,
        lease: &Lease,
        now_ms: i64,
    ) -> Result<ReleaseOutcome, StoreError> {
        let mut tx = self.pool.begin().await?;
        // Locking the session row waits out any accept_job in flight for
        // it; the check below then runs on a fresh snapshot that sees its job.
        check_fence(&mut tx, lease, true).await?;
        let runnable: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM jobs WHERE session_key = $1 AND status IN ('queued', 'running') LIMIT 1",
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
               updated_at_ms = $1 WHERE session_key = $2",
        )
        .bind(now_ms)
        .bind(&lease.session_key)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(ReleaseOutcome::Released)
    }

    async fn yield_lease(&self, lease: &Lease, now_ms: i64) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        check_fence(&mut tx, lease, true).await?;
        let waiting: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM sessions s WHERE s.session_key <> $1 \
               AND (s.lease_owner IS NULL OR s.lease_expires_at_ms IS NULL OR s.lease_expires_at_ms < $2) \
               AND s.session_key IN (SELECT j.session_key FROM jobs j \
                                     WHERE j.status IN ('queued', 'running')) LIMIT 1",
        )
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
               updated_at_ms = $1 WHERE session_key = $2",
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
        let mut tx = self.pool.begin().await?;
        check_fence(&mut tx, lease, true).await?;
        sqlx::query(
            "INSERT INTO transcripts (claude_session_id, session_key, data, size_bytes, updated_at_ms) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (claude_session_id) DO UPDATE SET session_key = EXCLUDED.session_key, \
               data = EXCLUDED.data, size_bytes = EXCLUDED.size_bytes, \
               updated_at_ms = EXCLUDED.updated_at_ms",
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
             FROM transcripts WHERE claude_session_id = $1",
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
        let mut tx = self.pool.begin().await?;
        check_fence(&mut tx, lease, true).await?;
        sqlx::query(
            "UPDATE jobs SET status = 'queued' WHERE session_key = $1 AND status = 'running'",
        )
        .bind(&lease.session_key)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE sessions SET lease_owner = NULL, lease_expires_at_ms = NULL, status = 'idle', \
               updated_at_ms = $1 WHERE session_key = $2",
        )
        .bind(now_ms)
        .bind(&lease.session_key)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn next_job(&self, lease: &Lease) -> Result<Option<JobRecord>, StoreError> {
        let mut tx = self.pool.begin().await?;
        check_fence(&mut tx, lease, false).await?;
        let row: Option<JobRow> = sqlx::query_as(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE session_key = $1 AND status IN ('queued', 'running') \
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
        let mut tx = self.pool.begin().await?;
        check_fence(&mut tx, lease, true).await?;
        let attempts: Option<i64> = sqlx::query_scalar(
            "UPDATE jobs SET status = 'running', attempts = attempts + 1, \
               started_at_ms = COALESCE(started_at_ms, $1) \
             WHERE job_id = $2 AND session_key = $3 AND status IN ('queued', 'running') \
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
            "UPDATE sessions SET status = 'active', updated_at_ms = $1 WHERE session_key = $2",
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
        let mut tx = self.pool.begin().await?;
        check_fence(&mut tx, lease, true).await?;
        let done =
            sqlx::query("UPDATE jobs SET next_seq = $1 WHERE job_id = $2 AND session_key = $3")
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
        let mut tx = self.pool.begin().await?;
        check_fence(&mut tx, lease, true).await?;
        let done = sqlx::query(
            "UPDATE jobs SET status = $1, error = $2, terminal_event = $3, next_seq = $4, finished_at_ms = $5 \
             WHERE job_id = $6 AND session_key = $7",
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
                    "UPDATE sessions SET last_job_id = $1, updated_at_ms = $2, claude_session_id = $3, \
                       cwd = $4, model = $5, turns = turns + 1, input_tokens = input_tokens + $6, \
                       output_tokens = output_tokens + $7, cost_usd = cost_usd + $8 \
                     WHERE session_key = $9",
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
                sqlx::query("UPDATE sessions SET last_job_id = $1, updated_at_ms = $2 WHERE session_key = $3")
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
            sqlx::query_as(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = $1"))
                .bind(job_id)
                .fetch_optional(&self.pool)
                .await?;
        row.map(JobRecord::try_from).transpose()
    }

    async fn get_session(&self, session_key: &str) -> Result<Option<SessionRecord>, StoreError> {
        let row: Option<SessionRow> = sqlx::query_as(&format!(
            "SELECT {SESSION_COLUMNS} FROM sessions WHERE session_key = $1"
        ))
        .bind(session_key)
        .fetch_optional(&self.pool)
        .await?;
        row.map(SessionRecord::try_from).transpose()
    }

    async fn list_sessions(&self, limit: i64) -> Result<Vec<SessionRecord>, StoreError> {
        let rows: Vec<SessionRow> = sqlx::query_as(&format!(
            "SELECT {SESSION_COLUMNS} FROM sessions ORDER BY updated_at_ms DESC, session_key LIMIT $1"
        ))
        .bind(limit.max(0))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(SessionRecord::try_from).collect()
    }

    async fn list_jobs(&self, session_key: &str, limit: i64) -> Result<Vec<JobRecord>, StoreError> {
        let rows: Vec<JobRow> = sqlx::query_as(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE session_key = $1 ORDER BY job_order DESC LIMIT $2"
        ))
        .bind(session_key)
        .bind(limit.max(0))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().rev().map(JobRecord::try_from).collect()
    }

    async fn forget_session(&self, session_key: &str, now_ms: i64) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE sessions SET claude_session_id = NULL, status = 'closed', updated_at_ms = $1 \
             WHERE session_key = $2",
        )
        .bind(now_ms)
        .bind(session_key)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn claim_control(&self, request_id: &str, now_ms: i64) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO control_requests (request_id, created_at_ms) VALUES ($1, $2) \
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
            "UPDATE jobs SET status = $1, error = $2, terminal_event = $3, next_seq = $4, \
               finished_at_ms = $5 WHERE job_id = $6 AND status = 'queued'",
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
            "UPDATE sessions SET permission_mode = $1, updated_at_ms = $2 WHERE session_key = $3",
        )
        .bind(mode.map(|m| m.as_str()))
        .bind(now_ms)
        .bind(session_key)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }
}
