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

use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool, Postgres, Transaction};

use super::rows::{
    lease_lost, seq_to_db, spec_json, JobRow, SessionRow, JOB_COLUMNS, SESSION_COLUMNS,
};
use super::sql::check_transcript_session;
use super::{
    AcceptOutcome, AcceptReport, AfterFinish, JobFinish, JobRecord, JobStatus, Lease, NewJob,
    NextJob, ReleaseOutcome, SessionRecord, SessionStore, StartedAttempt, StoreError, Transcript,
    TranscriptAppend, TranscriptWrite, YieldOrder, YieldOutcome,
};
use crate::protocol::PermissionMode;

pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// A pooled connection idle this long is pinged before it is used. sqlx
    /// pings each connection as it comes back to the pool, so one used less
    /// than this ago was alive then; only a restart or a dropped connection
    /// in between fails a call (retryably, as one mid-query always could).
    pub const PING_IF_IDLE_FOR: Duration = Duration::from_millis(100);

    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(Duration::from_secs(30))
            // sqlx would ping every connection it hands out: a round trip
            // per store call, about one in six of a turn's. One back in the
            // pool a moment ago is used as it is; one that sat idle (across
            // a server restart, say) is pinged, and replaced if dead.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= Self::PING_IF_IDLE_FOR {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
            .connect(url)
            .await?;
        Ok(PostgresStore { pool })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// SQLite's alone (`sqlite_fast.rs`): every call goes through sqlx.
    async fn on_fast_path<T>(
        &self,
        _call: impl Fn(&super::sqlite_fast::FastPath) -> Option<Result<T, StoreError>> + Send,
    ) -> Option<Result<T, StoreError>> {
        None
    }

    /// A write transaction.
    async fn begin_write(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        Ok(self.pool.begin().await?)
    }

    /// A transaction in which `lease` was checked and the session row is
    /// locked, which keeps a competing claim out until it commits.
    async fn fenced(&self, lease: &Lease) -> Result<Transaction<'static, Postgres>, StoreError> {
        let mut tx = self.pool.begin().await?;
        check_fence(&mut tx, lease, true).await?;
        Ok(tx)
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

super::lifecycle::lifecycle_store_helpers!(PostgresStore, Postgres);

super::lifecycle::lifecycle_store_impl!(PostgresStore);

super::prompts::prompt_store_impl!(PostgresStore);

super::sql::session_store_impl!(PostgresStore, {
    async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("./migrations/postgres")
            .run(&self.pool)
            .await
            .map_err(|e| StoreError::Other(format!("postgres migration failed: {e}")))
    }

    async fn accept_job_by(
        &self,
        job: &NewJob,
        now_ms: i64,
        worker_id: Option<&str>,
    ) -> Result<AcceptReport, StoreError> {
        let spec = spec_json(&job.spec)?;
        // One statement, so one commit per accepted job. A known job id
        // (redeliveries come in bursts, e.g. after a broker restart) is
        // answered from `known` without touching the session row, whose lock
        // a slow or stopped lease holder may hold. For a new job the session
        // upsert runs first (the insert reads its row), so the session's lock
        // is taken before the job's `job_order` is drawn, as in a transaction
        // of two statements: per session, commit order is `job_order` order.
        let row: (Option<i64>, Option<String>, Option<String>, Option<String>) = sqlx::query_as(
            "WITH known AS (SELECT status, terminal_event FROM jobs WHERE job_id = $1), \
             s AS (INSERT INTO sessions (session_key, profile, status, created_at_ms, updated_at_ms) \
                   SELECT $2, $3, 'idle', $4, $4 WHERE NOT EXISTS (SELECT 1 FROM known) \
                   ON CONFLICT (session_key) DO UPDATE SET updated_at_ms = EXCLUDED.updated_at_ms, \
                     status = CASE WHEN sessions.status = 'closed' THEN 'idle' ELSE sessions.status END \
                   RETURNING session_key, lease_owner, lease_expires_at_ms), \
             j AS (INSERT INTO jobs (job_id, session_key, status, attempts, next_seq, spec, created_at_ms) \
                   SELECT $1, s.session_key, 'queued', 0, 0, $5, $4 FROM s \
                   ON CONFLICT (job_id) DO NOTHING RETURNING job_order), \
             h AS (SELECT s.lease_owner FROM s, j \
                   WHERE s.lease_owner IS NOT NULL AND COALESCE(s.lease_expires_at_ms >= $4, FALSE)) \
             SELECT (SELECT job_order FROM j), (SELECT status FROM known), \
                    (SELECT terminal_event FROM known), (SELECT lease_owner FROM h)",
        )
        .bind(&job.job_id)
        .bind(&job.session_key)
        .bind(&job.spec.profile)
        .bind(now_ms)
        .bind(spec)
        .fetch_one(&self.pool)
        .await?;
        match row {
            (Some(_), _, _, live_owner) => Ok(AcceptReport::inserted(live_owner, worker_id)),
            (None, Some(status), terminal_event, _) => {
                Ok(AcceptReport::known(AcceptOutcome::Duplicate {
                    status: JobStatus::parse(&status)?,
                    terminal_event,
                }))
            }
            // A concurrent accept of the same job id committed between our
            // snapshot and our insert: it is known now.
            (None, None, _, _) => existing_job(&mut *self.pool.acquire().await?, &job.job_id)
                .await?
                .map(AcceptReport::known)
                .ok_or_else(|| {
                    StoreError::Unavailable(format!("job {} vanished; retry", job.job_id))
                }),
        }
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
        super::sql::take_claim!(tx, owner, now_ms, ttl_ms, session_key)
    }

    async fn renew_lease(
        &self,
        lease: &Lease,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(super::sql::RENEW)
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
        let runnable: Option<i32> = sqlx::query_scalar(super::sql::RUNNABLE)
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
