//! The store methods whose SQL is the same on both backends, written once.
//!
//! `session_store_impl!` writes a backend's whole `SessionStore` impl: the
//! methods below, and the backend's own (claims, lease renewal and release,
//! accepting: what truly differs) passed in as they are. Each backend also
//! provides `fenced(lease)`, the honest difference in fencing: SQLite
//! takes the write lock up front (`BEGIN IMMEDIATE`), PostgreSQL locks the
//! session row (`FOR UPDATE`); the fenced writes themselves are shared. Parameters are
//! numbered (`$1`), which sqlx's SQLite driver accepts as well as
//! PostgreSQL's; names resolve where the macro is used, so each backend
//! imports the row types. The shared store suite (`tests/it/store.rs`)
//! runs every method on both.

use std::sync::LazyLock;

use super::rows::{JOB_COLUMNS, SESSION_COLUMNS};

/// Holds when `$2` holds the lease of session `$1` at epoch `$3`.
pub(crate) const FENCE: &str =
    "SELECT 1 FROM sessions WHERE session_key = $1 AND lease_owner = $2 AND lease_epoch = $3";

/// Hands a session's lease back; the epoch stays (the next claim makes it
/// grow). Used by release, yield and abandon on both backends.
pub(crate) const RELEASE_LEASE: &str = "UPDATE sessions SET lease_owner = NULL, \
     lease_expires_at_ms = NULL, status = 'idle', updated_at_ms = $1 WHERE session_key = $2";

/// Another session with runnable jobs waits for a worker (its lease free
/// or expired): `$1` this session, `$2` now.
pub(crate) const OTHERS_WAITING: &str = "SELECT 1 FROM sessions s WHERE s.session_key <> $1 \
       AND (s.lease_owner IS NULL OR s.lease_expires_at_ms IS NULL OR s.lease_expires_at_ms < $2) \
       AND s.session_key IN (SELECT j.session_key FROM jobs j \
                             WHERE j.status IN ('queued', 'running')) LIMIT 1";

/// The claim: `$1` owner, `$2` expiry, `$3` now, `$4` session. Returns
/// the new epoch.
pub(crate) const CLAIM_TAKE: &str = "UPDATE sessions SET lease_owner = $1, lease_epoch = lease_epoch + 1, lease_expires_at_ms = $2, \
       status = CASE WHEN EXISTS (SELECT 1 FROM jobs j WHERE j.session_key = sessions.session_key \
                                  AND j.status = 'running') \
                THEN 'interrupted' ELSE 'active' END, \
       updated_at_ms = $3, last_served_at_ms = $3 \
     WHERE session_key = $4 RETURNING lease_epoch";

/// `$1` new expiry, `$2` session, `$3` owner, `$4` epoch.
pub(crate) const RENEW: &str = "UPDATE sessions SET lease_expires_at_ms = $1 \
     WHERE session_key = $2 AND lease_owner = $3 AND lease_epoch = $4";

/// The session still has a queued or running job (`$1` session).
pub(crate) const RUNNABLE: &str =
    "SELECT 1 FROM jobs WHERE session_key = $1 AND status IN ('queued', 'running') LIMIT 1";

/// `$2`'s terminal event reached the broker at `$1`.
pub(crate) const TERMINAL_PUBLISHED: &str = "UPDATE jobs SET terminal_published_at_ms = $1 \
     WHERE job_id = $2 AND terminal_published_at_ms IS NULL";

/// A transcript written whole: the base row replaced (chunks dropped next).
pub(crate) const TRANSCRIPT_PUT: &str = "INSERT INTO transcripts (claude_session_id, session_key, data, size_bytes, sha256, updated_at_ms, chunks) \
     VALUES ($1, $2, $3, $4, $5, $6, 0) \
     ON CONFLICT (claude_session_id) DO UPDATE SET session_key = EXCLUDED.session_key, \
       data = EXCLUDED.data, size_bytes = EXCLUDED.size_bytes, \
       sha256 = EXCLUDED.sha256, updated_at_ms = EXCLUDED.updated_at_ms, chunks = 0";

pub(crate) const TRANSCRIPT_DROP_CHUNKS: &str =
    "DELETE FROM transcript_chunks WHERE claude_session_id = $1";

/// An append's base row, only if it still has the digest `$6` the append
/// continues; returns the new chunk's number.
pub(crate) const TRANSCRIPT_APPEND: &str =
    "UPDATE transcripts SET session_key = $1, size_bytes = $2, sha256 = $3, \
       updated_at_ms = $4, chunks = chunks + 1 \
     WHERE claude_session_id = $5 AND sha256 = $6 \
     RETURNING CAST(chunks AS BIGINT)";

pub(crate) const TRANSCRIPT_CHUNK: &str =
    "INSERT INTO transcript_chunks (claude_session_id, seq, data) VALUES ($1, $2, $3)";

/// A job's attempt starts: `$1` now, `$2` job, `$3` session, `$4` the
/// seq reserved up to. Returns the attempt number.
pub(crate) const START_JOB: &str = "UPDATE jobs SET status = 'running', attempts = attempts + 1, \
       started_at_ms = COALESCE(started_at_ms, $1), \
       next_seq = CASE WHEN next_seq < $4 THEN $4 ELSE next_seq END \
     WHERE job_id = $2 AND session_key = $3 AND status IN ('queued', 'running') \
     RETURNING attempts";

pub(crate) const START_SESSION: &str =
    "UPDATE sessions SET status = 'active', updated_at_ms = $1 WHERE session_key = $2 \
     RETURNING lifecycle_started_at_ms, lifecycle_job_id";

/// The outcome: `$1` status, `$2` error, `$3` terminal event, `$4` next
/// seq, `$5` now, `$6` cost, `$7` identity, `$8` job, `$9` session.
pub(crate) const FINISH_JOB: &str = "UPDATE jobs SET status = $1, error = $2, terminal_event = $3, next_seq = $4, finished_at_ms = $5, \
       cost_usd = cost_usd + $6, identity = $7 \
     WHERE job_id = $8 AND session_key = $9";

pub(crate) const FINISH_SESSION: &str =
    "UPDATE sessions SET last_job_id = $1, updated_at_ms = $2, cost_usd = cost_usd + $3 \
     WHERE session_key = $4";

/// A completed turn's session update. A turn of a job accepted after a
/// reset consumes it.
pub(crate) const FINISH_SESSION_UPDATE: &str =
    "UPDATE sessions SET claude_session_id = $1, cwd = $2, model = $3, turns = turns + 1, \
       input_tokens = input_tokens + $4, output_tokens = output_tokens + $5, \
       context_tokens = COALESCE($6, context_tokens), \
       context_window = COALESCE($7, context_window), \
       compact_failed_at_ms = CASE WHEN claude_session_id = $1 THEN compact_failed_at_ms END, \
       compact_failed_tokens = CASE WHEN claude_session_id = $1 THEN compact_failed_tokens END, \
       reset_after_job_order = CASE WHEN reset_after_job_order < \
         (SELECT job_order FROM jobs WHERE job_id = $9) THEN NULL ELSE reset_after_job_order END \
     WHERE session_key = $8";

/// The session row, if `$2` holds its lease at epoch `$3`.
pub(crate) static HELD_SESSION: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {SESSION_COLUMNS} FROM sessions \
         WHERE session_key = $1 AND lease_owner = $2 AND lease_epoch = $3"
    )
});

/// A session's next runnable job: a `running` one left by a lost holder
/// first, else the oldest `queued`.
pub(crate) static NEXT_JOB: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE session_key = $1 AND status IN ('queued', 'running') \
         ORDER BY CASE status WHEN 'running' THEN 0 ELSE 1 END, job_order LIMIT 1"
    )
});

/// The lease holder's read of its session row and the session's next
/// runnable job (a `running` one left by a lost holder first, else the
/// oldest `queued`), inside transaction `$tx`; `LeaseLost` unless the
/// lease is still ours. Evaluates to `Result<Option<NextJob>, StoreError>`.
macro_rules! next_turn_in {
    ($tx:ident, $lease:expr) => {
        async {
            let lease: &Lease = $lease;
            let session: Option<SessionRow> =
                sqlx::query_as($crate::store::sql::HELD_SESSION.as_str())
                    .bind(&lease.session_key)
                    .bind(&lease.owner)
                    .bind(lease.epoch)
                    .fetch_optional(&mut *$tx)
                    .await?;
            let Some(session) = session else {
                return Err(lease_lost(lease));
            };
            let row: Option<JobRow> = sqlx::query_as($crate::store::sql::NEXT_JOB.as_str())
                .bind(&lease.session_key)
                .fetch_optional(&mut *$tx)
                .await?;
            let Some(row) = row else {
                return Ok(None);
            };
            Ok::<_, StoreError>(Some(NextJob {
                job: JobRecord::try_from(row)?,
                session: SessionRecord::try_from(session)?,
            }))
        }
    };
}
pub(crate) use next_turn_in;

/// A claim's second half, on both backends: in `$tx`, where the session
/// `$session_key` was picked and locked, take its lease (a new epoch) and
/// commit. Evaluates to the claimed `Ok(Some(Lease))`; a macro, so both
/// backends' transaction types take it.
macro_rules! take_claim {
    ($tx:ident, $owner:expr, $now_ms:expr, $ttl_ms:expr, $session_key:ident) => {{
        let epoch: i64 = sqlx::query_scalar($crate::store::sql::CLAIM_TAKE)
            .bind($owner)
            .bind($now_ms.saturating_add($ttl_ms))
            .bind($now_ms)
            .bind(&$session_key)
            .fetch_one(&mut *$tx)
            .await?;
        $tx.commit().await?;
        Ok(Some(Lease {
            session_key: $session_key,
            owner: $owner.to_string(),
            epoch,
        }))
    }};
}
pub(crate) use take_claim;

/// The statements of a transcript write, inside the fenced transaction
/// `$tx` (a macro, so both backends' transaction types take it). A full
/// write replaces the base and drops the chunks; an append adds a chunk
/// only if the stored transcript is still the one it continues.
macro_rules! write_transcript {
    ($tx:ident, $lease:expr, $write:expr) => {
        match $write {
            TranscriptWrite::Full(t) => {
                sqlx::query($crate::store::sql::TRANSCRIPT_PUT)
                    .bind(&t.claude_session_id)
                    .bind(&t.session_key)
                    .bind(&t.data)
                    .bind(t.size_bytes)
                    .bind(&t.sha256)
                    .bind(t.updated_at_ms)
                    .execute(&mut *$tx)
                    .await?;
                sqlx::query($crate::store::sql::TRANSCRIPT_DROP_CHUNKS)
                    .bind(&t.claude_session_id)
                    .execute(&mut *$tx)
                    .await?;
            }
            TranscriptWrite::Append(a) => {
                let seq: Option<i64> = sqlx::query_scalar($crate::store::sql::TRANSCRIPT_APPEND)
                    .bind(&a.session_key)
                    .bind(a.size_bytes)
                    .bind(&a.sha256)
                    .bind(a.updated_at_ms)
                    .bind(&a.claude_session_id)
                    .bind(&a.prev_sha256)
                    .fetch_optional(&mut *$tx)
                    .await?;
                let Some(seq) = seq else {
                    return Err(StoreError::TranscriptChanged(a.claude_session_id.clone()));
                };
                sqlx::query($crate::store::sql::TRANSCRIPT_CHUNK)
                    .bind(&a.claude_session_id)
                    .bind(seq)
                    .bind(&a.chunk)
                    .execute(&mut *$tx)
                    .await?;
            }
        }
    };
}
pub(crate) use write_transcript;

/// A transcript is written only under its own session's lease.
pub(crate) fn check_transcript_session(
    write: &crate::store::TranscriptWrite,
    lease: &crate::store::Lease,
) -> Result<(), crate::store::StoreError> {
    if write.session_key() != lease.session_key {
        return Err(crate::store::StoreError::Other(format!(
            "transcript of session {} written under the lease of {}",
            write.session_key(),
            lease.session_key
        )));
    }
    Ok(())
}

macro_rules! session_store_impl {
    ($store:ty, { $($specific:tt)* }) => {
        #[async_trait::async_trait]
        impl SessionStore for $store {
            $($specific)*

            async fn session_key_of(
                &self,
                claude_session_id: &str,
            ) -> Result<Option<String>, StoreError> {
                let key: Option<String> = sqlx::query_scalar(
                    "SELECT session_key FROM sessions WHERE claude_session_id = $1 \
                     UNION ALL SELECT session_key FROM transcripts WHERE claude_session_id = $2 \
                     LIMIT 1",
                )
                .bind(claude_session_id)
                .bind(claude_session_id)
                .fetch_optional(&self.pool)
                .await?;
                Ok(key)
            }

            // Fenced writes: `fenced` (each backend's own) begins a write
            // transaction in which the lease has been checked and is held.

            async fn record_seq(
                &self,
                lease: &Lease,
                job_id: &str,
                next_seq: u64,
            ) -> Result<(), StoreError> {
                let next_seq = seq_to_db(next_seq)?;
                let mut tx = self.fenced(lease).await?;
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

            async fn set_compaction_failure(
                &self,
                lease: &Lease,
                failure: Option<(i64, i64)>,
            ) -> Result<(), StoreError> {
                let mut tx = self.fenced(lease).await?;
                sqlx::query(
                    "UPDATE sessions SET compact_failed_at_ms = $1, compact_failed_tokens = $2 \
                     WHERE session_key = $3",
                )
                .bind(failure.map(|f| f.0))
                .bind(failure.map(|f| f.1))
                .bind(&lease.session_key)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(())
            }

            async fn abandon_lease(&self, lease: &Lease, now_ms: i64) -> Result<(), StoreError> {
                let mut tx = self.fenced(lease).await?;
                sqlx::query(
                    "UPDATE jobs SET status = 'queued' WHERE session_key = $1 AND status = 'running'",
                )
                .bind(&lease.session_key)
                .execute(&mut *tx)
                .await?;
                sqlx::query($crate::store::sql::RELEASE_LEASE)
                .bind(now_ms)
                .bind(&lease.session_key)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(())
            }

            async fn start_attempt_reserving(
                &self,
                lease: &Lease,
                job_id: &str,
                now_ms: i64,
                reserve_seq_to: u64,
            ) -> Result<StartedAttempt, StoreError> {
                let reserve = seq_to_db(reserve_seq_to)?;
                if let Some(done) = self.on_fast_path(|f| f.start_attempt(lease, job_id, now_ms, reserve)).await {
                    return done;
                }
                let mut tx = self.fenced(lease).await?;
                let attempts: Option<i64> = sqlx::query_scalar($crate::store::sql::START_JOB)
                .bind(now_ms)
                .bind(job_id)
                .bind(&lease.session_key)
                .bind(reserve)
                .fetch_optional(&mut *tx)
                .await?;
                let Some(attempts) = attempts else {
                    return Err(StoreError::NotRunnable(job_id.to_string()));
                };
                let (lifecycle_started_at_ms, lifecycle_job_id): (Option<i64>, Option<String>) =
                    sqlx::query_as($crate::store::sql::START_SESSION)
                    .bind(now_ms)
                    .bind(&lease.session_key)
                    .fetch_one(&mut *tx)
                    .await?;
                tx.commit().await?;
                let attempt = u32::try_from(attempts)
                    .map_err(|_| StoreError::Other(format!("job {job_id}: bad attempts {attempts}")))?;
                Ok(StartedAttempt { attempt, lifecycle_started_at_ms, lifecycle_job_id })
            }

            async fn next_turn(&self, lease: &Lease) -> Result<Option<NextJob>, StoreError> {
                if let Some(done) = self.on_fast_path(|f| f.next_turn(lease)).await {
                    return done;
                }
                // A read (on SQLite a deferred transaction): one snapshot.
                let mut tx = self.pool.begin().await?;
                let next = $crate::store::sql::next_turn_in!(tx, lease).await?;
                tx.commit().await?;
                Ok(next)
            }

            async fn yield_or_next(
                &self,
                lease: &Lease,
                now_ms: i64,
                order: YieldOrder,
            ) -> Result<YieldOutcome, StoreError> {
                if let Some(done) = self.on_fast_path(|f| f.yield_or_next(lease, now_ms, order)).await {
                    return done;
                }
                let mut tx = self.fenced(lease).await?;
                if order == YieldOrder::OwnFirst {
                    if let Some(next) = $crate::store::sql::next_turn_in!(tx, lease).await? {
                        tx.commit().await?;
                        return Ok(YieldOutcome::Kept(Some(Box::new(next))));
                    }
                }
                let waiting: Option<i32> = sqlx::query_scalar($crate::store::sql::OTHERS_WAITING)
                    .bind(&lease.session_key)
                    .bind(now_ms)
                    .fetch_optional(&mut *tx)
                    .await?;
                if waiting.is_some() {
                    sqlx::query($crate::store::sql::RELEASE_LEASE)
                        .bind(now_ms)
                        .bind(&lease.session_key)
                        .execute(&mut *tx)
                        .await?;
                    tx.commit().await?;
                    return Ok(YieldOutcome::HandedBack);
                }
                let next = match order {
                    YieldOrder::OthersFirst => $crate::store::sql::next_turn_in!(tx, lease).await?,
                    YieldOrder::OwnFirst => None,
                };
                tx.commit().await?;
                Ok(YieldOutcome::Kept(next.map(Box::new)))
            }

            async fn put_transcript(
                &self,
                lease: &Lease,
                transcript: &Transcript,
            ) -> Result<(), StoreError> {
                let write = TranscriptWrite::Full(transcript.clone());
                check_transcript_session(&write, lease)?;
                let mut tx = self.fenced(lease).await?;
                $crate::store::sql::write_transcript!(tx, lease, &write);
                tx.commit().await?;
                Ok(())
            }

            async fn append_transcript(
                &self,
                lease: &Lease,
                append: &TranscriptAppend,
            ) -> Result<(), StoreError> {
                let write = TranscriptWrite::Append(append.clone());
                check_transcript_session(&write, lease)?;
                let mut tx = self.fenced(lease).await?;
                $crate::store::sql::write_transcript!(tx, lease, &write);
                tx.commit().await?;
                Ok(())
            }

            async fn finish_job_and_look(
                &self,
                lease: &Lease,
                finish: &JobFinish,
            ) -> Result<AfterFinish, StoreError> {
                if !finish.status.is_terminal() {
                    return Err(StoreError::Other(format!(
                        "finish_job with non-terminal status {}",
                        finish.status.as_str()
                    )));
                }
                let next_seq = seq_to_db(finish.next_seq)?;
                if let Some(write) = &finish.transcript {
                    check_transcript_session(write, lease)?;
                }
                if let Some(done) = self.on_fast_path(|f| f.finish_job_and_look(lease, finish, next_seq)).await {
                    return done;
                }
                let mut tx = self.fenced(lease).await?;
                if let Some(write) = &finish.transcript {
                    $crate::store::sql::write_transcript!(tx, lease, write);
                }
                let done = sqlx::query($crate::store::sql::FINISH_JOB)
                .bind(finish.status.as_str())
                .bind(&finish.error)
                .bind(&finish.terminal_event)
                .bind(next_seq)
                .bind(finish.now_ms)
                .bind(finish.cost_usd)
                .bind(&finish.identity)
                .bind(&finish.job_id)
                .bind(&lease.session_key)
                .execute(&mut *tx)
                .await?;
                if done.rows_affected() == 0 {
                    return Err(not_in_session(&finish.job_id, lease));
                }
                sqlx::query($crate::store::sql::FINISH_SESSION)
                .bind(&finish.job_id)
                .bind(finish.now_ms)
                .bind(finish.cost_usd)
                .bind(&lease.session_key)
                .execute(&mut *tx)
                .await?;
                if let Some(u) = &finish.session_update {
                    // A turn of a job accepted after a reset consumes it.
                    sqlx::query($crate::store::sql::FINISH_SESSION_UPDATE)
                    .bind(&u.claude_session_id)
                    .bind(&u.cwd)
                    .bind(&u.model)
                    .bind(u.input_tokens)
                    .bind(u.output_tokens)
                    .bind(u.context_tokens)
                    .bind(u.context_window)
                    .bind(&lease.session_key)
                    .bind(&finish.job_id)
                    .execute(&mut *tx)
                    .await?;
                }
                let waiting: Option<i32> = sqlx::query_scalar($crate::store::sql::OTHERS_WAITING)
                    .bind(&lease.session_key)
                    .bind(finish.now_ms)
                    .fetch_optional(&mut *tx)
                    .await?;
                let next = $crate::store::sql::next_turn_in!(tx, lease).await?;
                tx.commit().await?;
                Ok(AfterFinish {
                    others_waiting: waiting.is_some(),
                    next: next.map(Box::new),
                })
            }

            async fn get_transcript(
                &self,
                claude_session_id: &str,
            ) -> Result<Option<Transcript>, StoreError> {
                // One statement, so base and chunks come from one snapshot.
                type Piece = (i64, Option<String>, Option<String>, Vec<u8>, Option<i64>, Option<String>, Option<i64>);
                let pieces: Vec<Piece> = sqlx::query_as(
                    "SELECT CAST(0 AS BIGINT) AS seq, claude_session_id, session_key, data, size_bytes, sha256, updated_at_ms \
                     FROM transcripts WHERE claude_session_id = $1 \
                     UNION ALL \
                     SELECT CAST(seq AS BIGINT), NULL, NULL, data, NULL, NULL, NULL \
                     FROM transcript_chunks WHERE claude_session_id = $2 \
                     ORDER BY seq",
                )
                .bind(claude_session_id)
                .bind(claude_session_id)
                .fetch_all(&self.pool)
                .await?;
                let mut pieces = pieces.into_iter();
                let Some(base) = pieces.next() else {
                    return Ok(None);
                };
                let (Some(id), Some(session_key), Some(size_bytes), Some(updated_at_ms)) =
                    (base.1, base.2, base.4, base.6)
                else {
                    return Err(StoreError::Other(format!(
                        "transcript {claude_session_id}: chunks without a base row"
                    )));
                };
                let mut data = base.3;
                for chunk in pieces {
                    data.extend_from_slice(&chunk.3);
                }
                Ok(Some(Transcript {
                    claude_session_id: id,
                    session_key,
                    data,
                    size_bytes,
                    sha256: base.5,
                    updated_at_ms,
                }))
            }

            async fn identity_spend(&self, identity: &str, since_ms: i64) -> Result<f64, StoreError> {
                let spent: Option<f64> = sqlx::query_scalar(
                    "SELECT SUM(cost_usd) FROM jobs WHERE identity = $1 AND finished_at_ms >= $2",
                )
                .bind(identity)
                .bind(since_ms)
                .fetch_one(&self.pool)
                .await?;
                Ok(spent.unwrap_or(0.0))
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
                // With its `session.ended` (reason `deleted`), in one transaction.
                let mut tx = self.begin_write().await?;
                end_in(&mut tx, session_key, $crate::store::EndReason::Deleted, None, now_ms).await?;
                let done = sqlx::query(
                    "UPDATE sessions SET claude_session_id = NULL, status = 'closed', updated_at_ms = $1 \
                     WHERE session_key = $2",
                )
                .bind(now_ms)
                .bind(session_key)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
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

            async fn mark_terminals_published(
                &self,
                job_ids: &[String],
                now_ms: i64,
            ) -> Result<(), StoreError> {
                if job_ids.is_empty() {
                    return Ok(());
                }
                if let Some(done) = self.on_fast_path(|f| f.mark_terminals_published(job_ids, now_ms)).await {
                    return done;
                }
                // One job (the usual case): one statement, no transaction.
                if let [job_id] = job_ids {
                    sqlx::query($crate::store::sql::TERMINAL_PUBLISHED)
                        .bind(now_ms)
                        .bind(job_id)
                        .execute(&self.pool)
                        .await?;
                    return Ok(());
                }
                let mut tx = self.pool.begin().await?;
                for job_id in job_ids {
                    sqlx::query($crate::store::sql::TERMINAL_PUBLISHED)
                    .bind(now_ms)
                    .bind(job_id)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(())
            }

            async fn unpublished_terminals(
                &self,
                finished_before_ms: i64,
                limit: i64,
            ) -> Result<Vec<JobRecord>, StoreError> {
                let rows: Vec<JobRow> = sqlx::query_as(&format!(
                    "SELECT {JOB_COLUMNS} FROM jobs WHERE terminal_event IS NOT NULL \
                       AND terminal_published_at_ms IS NULL AND finished_at_ms < $1 \
                     ORDER BY finished_at_ms LIMIT $2"
                ))
                .bind(finished_before_ms)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
                rows.into_iter().map(JobRecord::try_from).collect()
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

            async fn request_session_reset(&self, session_key: &str, now_ms: i64) -> Result<bool, StoreError> {
                let done = sqlx::query(
                    "UPDATE sessions SET updated_at_ms = $1, reset_after_job_order = \
                       (SELECT COALESCE(MAX(job_order), 0) FROM jobs WHERE session_key = $2) \
                     WHERE session_key = $2",
                )
                .bind(now_ms)
                .bind(session_key)
                .execute(&self.pool)
                .await?;
                Ok(done.rows_affected() > 0)
            }

            async fn count_open_jobs(&self, session_key: &str) -> Result<(i64, i64), StoreError> {
                let (queued, running): (i64, i64) = sqlx::query_as(
                    "SELECT \
                       COALESCE(SUM(CASE WHEN status = 'queued' THEN 1 ELSE 0 END), 0), \
                       COALESCE(SUM(CASE WHEN status = 'running' THEN 1 ELSE 0 END), 0) \
                     FROM jobs WHERE session_key = $1 AND status IN ('queued', 'running')",
                )
                .bind(session_key)
                .fetch_one(&self.pool)
                .await?;
                Ok((queued, running))
            }
        }
    };
}

pub(crate) use session_store_impl;
