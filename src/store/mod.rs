//! The session store: the database owns accepted jobs, sessions and the
//! per-session leases that keep one turn at a time per session.
//!
//! Two backends behind one trait: SQLite (embedded default, one host) and
//! Postgres (a fleet). Both take the clock as an argument (`now_ms`, Unix
//! milliseconds) so tests can move time, and every write a lease holder
//! makes is fenced by the lease epoch: once another worker has claimed the
//! session, the old holder's writes fail with [`StoreError::LeaseLost`].

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::error::DatabaseError;

use crate::config::{EffectiveOptions, Secret};
use crate::protocol::{PermissionMode, SessionMode};

pub mod lifecycle;
mod postgres;
pub mod prompts;
mod rows;
mod sql;
mod sqlite;
mod sqlite_fast;

pub use lifecycle::{
    EndReason, IdleRule, IdleSession, PruneReport, PruneRequest, RetentionRule, SessionLifecycle,
    StoredSessionEvent,
};
pub use postgres::PostgresStore;
pub use prompts::{PromptRecord, PromptStore};
pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The lease this write was fenced with is no longer held: another
    /// worker owns the session now. Stop working on it; do not retry.
    #[error("lease lost for session {session_key} (epoch {epoch})")]
    LeaseLost { session_key: String, epoch: i64 },
    /// The database could not be reached or the statement failed in a way
    /// that may pass (connection, pool timeout, busy). Retry later.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The job is no longer queued or running (e.g. it was cancelled while
    /// waiting): skip it.
    #[error("job {0} is no longer runnable")]
    NotRunnable(String),
    /// A transcript append continues a stored transcript that is no longer
    /// the stored one (another worker stored the session meanwhile): write
    /// the transcript whole instead. Nothing was written.
    #[error("the stored transcript of {0} changed; write it whole")]
    TranscriptChanged(String),
    /// A row did not have the shape this code expects (a bug or a newer schema).
    #[error("database error: {0}")]
    Other(String),
}

impl StoreError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        // sqlx errors never contain the connection URL, so they are safe to show.
        match e {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Tls(_) => StoreError::Unavailable(e.to_string()),
            sqlx::Error::Database(ref db) if is_transient(db.as_ref()) => {
                StoreError::Unavailable(e.to_string())
            }
            other => StoreError::Other(other.to_string()),
        }
    }
}

/// Database errors that may pass if the statement is tried again.
fn is_transient(db: &(dyn DatabaseError + 'static)) -> bool {
    if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
        let code = pg.code();
        // 40001 serialization failure, 40P01 deadlock, 08xxx connection
        // exceptions, 53300 too many connections, 57P0x server shutting down.
        return matches!(
            code,
            "40001" | "40P01" | "53300" | "57P01" | "57P02" | "57P03" | "55P03"
        ) || code.starts_with("08");
    }
    if let Some(code) = db
        .try_downcast_ref::<sqlx::sqlite::SqliteError>()
        .and_then(|e| e.code())
    {
        // Extended result codes: the primary code is the low byte.
        if let Ok(n) = code.parse::<i32>() {
            return matches!(n & 0xff, 5 | 6); // SQLITE_BUSY, SQLITE_LOCKED
        }
    }
    let msg = db.message().to_ascii_lowercase();
    msg.contains("database is locked") || msg.contains("busy")
}

/// Everything the worker needs to run a job, stored with it (as JSON) when
/// it is accepted. A domain type, not the wire type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub prompt: String,
    pub mode: SessionMode,
    /// For `resume` and `fork`: the Claude session to start from.
    pub claude_session_id: Option<String>,
    pub profile: String,
    pub model: Option<String>,
    pub max_turns: u32,
    pub permission_mode: PermissionMode,
    /// Echoed on every event.
    pub metadata: Value,
    /// Routing key for reply events.
    pub reply_to: Option<String>,
    /// Double-texting policy (absent in jobs stored before it existed).
    #[serde(default)]
    pub on_busy: crate::protocol::OnBusy,
    /// Images sent with the prompt (absent in jobs stored before them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<crate::protocol::AttachmentV1>,
    /// The per-turn cost cap (`--max-budget-usd`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_budget_usd: Option<f64>,
    /// Whose budget the job spends (the job's `identity`), if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Compact the session's context before the turn (`options.compact`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub compact: bool,
    /// AMQP users who may answer the job's permission prompts (empty:
    /// anyone who may publish control messages).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prompt_answerers: Vec<String>,
}

impl JobSpec {
    pub fn options(&self) -> EffectiveOptions {
        EffectiveOptions {
            model: self.model.clone(),
            max_turns: self.max_turns,
            permission_mode: self.permission_mode,
            on_busy: self.on_busy,
            max_budget_usd: self.max_budget_usd,
        }
    }
}

/// A job as accepted from the broker, about to be inserted.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub job_id: String,
    pub session_key: String,
    pub spec: JobSpec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }
    pub fn parse(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "queued" => JobStatus::Queued,
            "running" => JobStatus::Running,
            "succeeded" => JobStatus::Succeeded,
            "failed" => JobStatus::Failed,
            "cancelled" => JobStatus::Cancelled,
            other => return Err(StoreError::Other(format!("unknown job status {other:?}"))),
        })
    }
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionStatus {
    /// A lease holder is running (or about to run) one of its jobs.
    Active,
    /// Nothing running.
    Idle,
    /// A worker lost its lease mid-turn; the job will be picked up again.
    Interrupted,
    /// Forgotten by `sessions delete`; the next job starts fresh.
    Closed,
}

impl SessionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionStatus::Active => "active",
            SessionStatus::Idle => "idle",
            SessionStatus::Interrupted => "interrupted",
            SessionStatus::Closed => "closed",
        }
    }
    pub fn parse(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "active" => SessionStatus::Active,
            "idle" => SessionStatus::Idle,
            "interrupted" => SessionStatus::Interrupted,
            "closed" => SessionStatus::Closed,
            other => {
                return Err(StoreError::Other(format!(
                    "unknown session status {other:?}"
                )))
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    pub job_id: String,
    pub session_key: String,
    /// Acceptance order (global, increasing); a session's jobs run in this order.
    pub order: i64,
    pub status: JobStatus,
    /// Attempts started so far.
    pub attempts: u32,
    /// The seq the next event of this job gets.
    pub next_seq: u64,
    pub spec: JobSpec,
    pub error: Option<String>,
    /// The terminal event as published (JSON), kept to answer duplicates.
    pub terminal_event: Option<String>,
    pub created_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    /// What the job's turns cost, in USD (set when it finishes).
    pub cost_usd: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SessionRecord {
    pub session_key: String,
    pub claude_session_id: Option<String>,
    pub profile: String,
    pub status: SessionStatus,
    pub cwd: Option<String>,
    pub model: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub last_job_id: Option<String>,
    pub turns: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cost_usd: f64,
    pub lease_owner: Option<String>,
    pub lease_epoch: i64,
    pub lease_expires_at_ms: Option<i64>,
    /// Set at runtime by `set_permission_mode`; applies to later turns.
    pub permission_mode: Option<PermissionMode>,
    /// Context the last completed turn's last API call used (input plus
    /// cache tokens), and the model's window.
    pub context_tokens: Option<i64>,
    pub context_window: Option<i64>,
    /// A reset is pending: jobs accepted after this order start a new
    /// Claude session (`reset_session`).
    pub reset_after_job_order: Option<i64>,
    /// The last failed compaction, `(at_ms, context_tokens)`, until one
    /// succeeds (threshold compaction backs off from it).
    pub compact_failed: Option<(i64, i64)>,
}

/// Proof of holding a session's lease. `epoch` only grows; every fenced
/// write checks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub session_key: String,
    pub owner: String,
    pub epoch: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AcceptOutcome {
    /// New job, queued.
    Inserted,
    /// This job_id was accepted before; it is not run again.
    Duplicate {
        status: JobStatus,
        terminal_event: Option<String>,
    },
}

/// A session's next job and its session row, read together by the lease
/// holder (one transaction instead of two reads per turn).
#[derive(Debug, Clone, PartialEq)]
pub struct NextJob {
    pub job: JobRecord,
    pub session: SessionRecord,
}

/// What `yield_or_next` did between two jobs.
#[derive(Debug, Clone, PartialEq)]
pub enum YieldOutcome {
    /// Another session waits for a worker: the lease was given up.
    HandedBack,
    /// The lease is kept; the session's next job, if it has one.
    Kept(Option<Box<NextJob>>),
}

/// Who should hear that a job was accepted (see
/// [`SessionStore::accept_job_by`]): the broker carries the news, so a
/// lease holder waiting for its session's follow-up runs it at once, and a
/// full worker's holders learn that a session waits for a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AcceptAudience {
    /// Another worker holds the session's lease (it may be waiting for
    /// exactly this job).
    Holder(String),
    /// No lease is live: the session waits for any worker.
    Everyone,
}

/// An accept's outcome, and who should hear of it (`None`: nobody, as for
/// a duplicate or a job whose session's lease the accepting worker holds).
#[derive(Debug, Clone, PartialEq)]
pub struct AcceptReport {
    pub outcome: AcceptOutcome,
    pub audience: Option<AcceptAudience>,
}

impl AcceptReport {
    /// The report of an insert that saw `lease_owner` holding a live lease
    /// (or none), accepted by `by`.
    pub(crate) fn inserted(live_owner: Option<String>, by: Option<&str>) -> AcceptReport {
        let audience = match live_owner {
            Some(owner) if Some(owner.as_str()) == by => None,
            Some(owner) => Some(AcceptAudience::Holder(owner)),
            None => Some(AcceptAudience::Everyone),
        };
        AcceptReport {
            outcome: AcceptOutcome::Inserted,
            audience,
        }
    }

    pub(crate) fn known(outcome: AcceptOutcome) -> AcceptReport {
        AcceptReport {
            outcome,
            audience: None,
        }
    }
}

/// What `finish_job_and_look` saw once the job's outcome was written.
#[derive(Debug, Clone, PartialEq)]
pub struct AfterFinish {
    /// Another session waits for a worker. The lease is still held (the
    /// terminal event goes out first); the caller may hand it back with
    /// `yield_or_next`.
    pub others_waiting: bool,
    /// The session's next job, if it has one.
    pub next: Option<Box<NextJob>>,
}

/// Which runnable job `yield_or_next` prefers when both exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum YieldOrder {
    /// Right after a job: a waiting session goes first (fairness).
    OthersFirst,
    /// In the affinity window: this session's follow-up, if it came, runs
    /// here warm; otherwise hand back to a waiting session.
    OwnFirst,
}

/// An attempt started (see `start_attempt_reserving`), with what the
/// session's lifecycle needs to know, read in the same transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartedAttempt {
    /// 1-based.
    pub attempt: u32,
    pub lifecycle_started_at_ms: Option<i64>,
    pub lifecycle_job_id: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseOutcome {
    Released,
    /// Jobs arrived for the session meanwhile; the lease is still held.
    MoreWork,
}

/// What a finished job changes in its session (successful turns only).
#[derive(Debug, Clone, PartialEq)]
pub struct SessionUpdate {
    pub claude_session_id: String,
    pub cwd: String,
    pub model: Option<String>,
    /// This turn's tokens (the CLI's `usage` is per turn).
    pub input_tokens: i64,
    pub output_tokens: i64,
    /// The session's context use after this turn, if the CLI said.
    pub context_tokens: Option<i64>,
    pub context_window: Option<i64>,
}

/// A session's transcript as stored in the database: the CLI's JSONL file,
/// gzipped, so the session can continue on any worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Transcript {
    pub claude_session_id: String,
    pub session_key: String,
    /// The gzipped JSONL; empty when the transcript was too large to store
    /// (then only its digest and size are recorded).
    pub data: Vec<u8>,
    /// Uncompressed size.
    pub size_bytes: i64,
    /// SHA-256 (lowercase hex) of the uncompressed JSONL: the transcript's
    /// identity. `None` for rows stored before it was recorded.
    pub sha256: Option<String>,
    pub updated_at_ms: i64,
}

impl Transcript {
    /// False when only the transcript's digest was recorded.
    pub fn has_data(&self) -> bool {
        !self.data.is_empty()
    }
}

/// What the CLI appended to a stored transcript since it was stored: one
/// gzip member, stored as the transcript's next chunk.
#[derive(Debug, Clone, PartialEq)]
pub struct TranscriptAppend {
    pub claude_session_id: String,
    pub session_key: String,
    /// The identity of the stored transcript this continues; the append is
    /// refused (`TranscriptChanged`) if the stored one is another.
    pub prev_sha256: String,
    /// The appended bytes, gzipped.
    pub chunk: Vec<u8>,
    /// The whole transcript's uncompressed size and identity after it.
    pub size_bytes: i64,
    pub sha256: String,
    pub updated_at_ms: i64,
}

/// A transcript write, committed with a job's outcome.
#[derive(Debug, Clone, PartialEq)]
pub enum TranscriptWrite {
    /// The whole transcript: replaces the stored one and its chunks.
    Full(Transcript),
    /// Only what was appended since the stored copy.
    Append(TranscriptAppend),
}

impl TranscriptWrite {
    pub fn session_key(&self) -> &str {
        match self {
            TranscriptWrite::Full(t) => &t.session_key,
            TranscriptWrite::Append(a) => &a.session_key,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct JobFinish {
    pub job_id: String,
    pub status: JobStatus,
    pub error: Option<String>,
    pub terminal_event: String,
    pub next_seq: u64,
    pub session_update: Option<SessionUpdate>,
    /// What the job's turns cost (every attempt the CLI reported a result
    /// for), in USD: added to the job and to its session's `cost_usd`,
    /// whatever the outcome.
    pub cost_usd: f64,
    /// The job's `identity` (for per-identity budgets), stored with its cost.
    pub identity: Option<String>,
    /// The session's transcript after a completed turn, stored in the same
    /// transaction as the outcome: the two never disagree.
    pub transcript: Option<TranscriptWrite>,
    pub now_ms: i64,
}

#[async_trait]
pub trait SessionStore: SessionLifecycle + PromptStore + Send + Sync + 'static {
    /// Runs the embedded migrations for this backend.
    async fn migrate(&self) -> Result<(), StoreError>;

    /// Inserts a queued job (and its session row if missing) in one
    /// transaction. A known `job_id` is not inserted again.
    async fn accept_job(&self, job: &NewJob, now_ms: i64) -> Result<AcceptOutcome, StoreError> {
        Ok(self.accept_job_by(job, now_ms, None).await?.outcome)
    }

    /// `accept_job` by the worker `worker_id`, saying who should hear of a
    /// new job: the worker holding its session's live lease unless that is
    /// `worker_id` itself, or, when no lease is live, every worker (the
    /// session waits for one). Read in the accept's own statement or
    /// transaction: no extra commit.
    async fn accept_job_by(
        &self,
        job: &NewJob,
        now_ms: i64,
        worker_id: Option<&str>,
    ) -> Result<AcceptReport, StoreError>;

    /// Claims the lease of a session that has runnable jobs (queued, or
    /// running under an expired lease) and no live lease: the least
    /// recently served session first (never served counts as oldest); among
    /// equals `prefer` (the session whose job was just accepted here), then
    /// the one whose oldest runnable job is oldest. Claiming marks the
    /// session served now, so a preference never jumps the fairness order.
    /// The new lease's epoch is one more than any before it. A session whose
    /// previous holder left a `running` job is marked `interrupted`.
    async fn claim_session(
        &self,
        owner: &str,
        now_ms: i64,
        ttl_ms: i64,
        prefer: Option<&str>,
    ) -> Result<Option<Lease>, StoreError>;

    /// Extends the lease; `Ok(false)` when it is no longer ours.
    async fn renew_lease(
        &self,
        lease: &Lease,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<bool, StoreError>;

    /// Gives the lease up unless runnable jobs arrived meanwhile (then
    /// `MoreWork`, lease kept). Sets the session `idle`.
    async fn release_lease(&self, lease: &Lease, now_ms: i64)
        -> Result<ReleaseOutcome, StoreError>;

    /// Between two jobs: gives the lease up if another session with runnable
    /// jobs is waiting for a worker (its lease free or expired), so capacity
    /// is shared fairly; `Ok(true)` when given up. The session's queued jobs
    /// stay queued and it is claimed again in least-recently-served order.
    /// Fenced.
    async fn yield_lease(&self, lease: &Lease, now_ms: i64) -> Result<bool, StoreError> {
        let outcome = self
            .yield_or_next(lease, now_ms, YieldOrder::OthersFirst)
            .await?;
        Ok(outcome == YieldOutcome::HandedBack)
    }

    /// `yield_lease` and, when the lease is kept, `next_turn`, in one
    /// transaction: the turn path's database work stays a handful of
    /// commits per turn. Fenced.
    async fn yield_or_next(
        &self,
        lease: &Lease,
        now_ms: i64,
        order: YieldOrder,
    ) -> Result<YieldOutcome, StoreError>;

    /// Stores (replaces) a session's transcript, dropping its chunks.
    /// Fenced by `lease`, which must be the lease of
    /// `transcript.session_key`.
    async fn put_transcript(
        &self,
        lease: &Lease,
        transcript: &Transcript,
    ) -> Result<(), StoreError>;

    /// Appends a chunk to a stored transcript (fenced like
    /// `put_transcript`); `TranscriptChanged` if the stored transcript is
    /// not `append.prev_sha256`.
    async fn append_transcript(
        &self,
        lease: &Lease,
        append: &TranscriptAppend,
    ) -> Result<(), StoreError>;

    /// The stored transcript of a Claude session, if any: its base and its
    /// chunks, read in one statement, as one multi-member gzip in `data`.
    async fn get_transcript(
        &self,
        claude_session_id: &str,
    ) -> Result<Option<Transcript>, StoreError>;

    /// Gives the lease up whatever is queued (shutdown). Running jobs of the
    /// session go back to `queued` so another worker takes them at once.
    async fn abandon_lease(&self, lease: &Lease, now_ms: i64) -> Result<(), StoreError>;

    /// The session's next job to run: a `running` one left by a lost
    /// holder first, else the oldest `queued`. Fenced.
    async fn next_job(&self, lease: &Lease) -> Result<Option<JobRecord>, StoreError> {
        Ok(self.next_turn(lease).await?.map(|next| next.job))
    }

    /// `next_job` with the session's row, read in one transaction. Fenced.
    async fn next_turn(&self, lease: &Lease) -> Result<Option<NextJob>, StoreError>;

    /// Marks the job running and counts the attempt; returns the attempt
    /// number (1-based). Sets the session `active`. Fenced.
    async fn start_attempt(
        &self,
        lease: &Lease,
        job_id: &str,
        now_ms: i64,
    ) -> Result<u32, StoreError> {
        let started = self
            .start_attempt_reserving(lease, job_id, now_ms, 0)
            .await?;
        Ok(started.attempt)
    }

    /// `start_attempt` that also raises the job's `next_seq` to at least
    /// `reserve_seq_to` in the same transaction (the attempt's first block
    /// of seqs, see `record_seq`), saving a commit per turn; it also
    /// returns the session's lifecycle columns, so `begin_conversation` is
    /// only called when a conversation begins.
    async fn start_attempt_reserving(
        &self,
        lease: &Lease,
        job_id: &str,
        now_ms: i64,
        reserve_seq_to: u64,
    ) -> Result<StartedAttempt, StoreError>;

    /// Reserves seqs up to `next_seq - 1` for the job's events (a block at
    /// a time), so a fenced-out worker can reserve, and publish, nothing
    /// more. Fenced.
    async fn record_seq(
        &self,
        lease: &Lease,
        job_id: &str,
        next_seq: u64,
    ) -> Result<(), StoreError>;

    /// Stores the job's outcome, terminal event, cost and identity, adds
    /// the cost to the session's and, for a successful turn, stores the
    /// session's new state and counters and its transcript, in one
    /// transaction. Fenced. `TranscriptChanged` (nothing written) when a
    /// transcript append no longer fits the stored transcript.
    async fn finish_job(&self, lease: &Lease, finish: &JobFinish) -> Result<(), StoreError> {
        self.finish_job_and_look(lease, finish).await.map(|_| ())
    }

    /// `finish_job` and, in the same transaction, the look that follows a
    /// job: whether another session waits for a worker, and this session's
    /// next job. The lease is never given up here, so no other worker runs
    /// the session before the caller has published the terminal event: one
    /// commit where `finish_job` + `yield_or_next` took two. Fenced.
    async fn finish_job_and_look(
        &self,
        lease: &Lease,
        finish: &JobFinish,
    ) -> Result<AfterFinish, StoreError>;

    /// Records a failed compaction of the lease's session, `(at_ms,
    /// context_tokens)`, or clears the record (`None`: one succeeded).
    /// Fenced.
    async fn set_compaction_failure(
        &self,
        lease: &Lease,
        failure: Option<(i64, i64)>,
    ) -> Result<(), StoreError>;

    /// What the jobs of `identity` that finished at or after `since_ms`
    /// cost, in USD (per-identity budgets).
    async fn identity_spend(&self, identity: &str, since_ms: i64) -> Result<f64, StoreError>;

    async fn get_job(&self, job_id: &str) -> Result<Option<JobRecord>, StoreError>;
    async fn get_session(&self, session_key: &str) -> Result<Option<SessionRecord>, StoreError>;
    /// Sessions, most recently updated first.
    async fn list_sessions(&self, limit: i64) -> Result<Vec<SessionRecord>, StoreError>;
    /// A session's jobs in acceptance order (most recent `limit`).
    async fn list_jobs(&self, session_key: &str, limit: i64) -> Result<Vec<JobRecord>, StoreError>;
    /// Forgets the session's Claude session (status `closed`); the next job
    /// starts fresh. Returns false if the key is unknown.
    async fn forget_session(&self, session_key: &str, now_ms: i64) -> Result<bool, StoreError>;

    /// Records a control request id; `false` if some worker already took
    /// it (control messages reach every worker; one answers).
    async fn claim_control(&self, request_id: &str, now_ms: i64) -> Result<bool, StoreError>;

    /// The session key a Claude session id belongs to: the session that
    /// continues it now, or the one whose transcript of it is stored.
    async fn session_key_of(&self, claude_session_id: &str) -> Result<Option<String>, StoreError>;

    /// Ends a job that has not started yet (status `queued`) with `status`
    /// and its terminal event; `false` if it is no longer queued.
    async fn finish_queued_job(
        &self,
        job_id: &str,
        status: JobStatus,
        error: Option<&str>,
        terminal_event: &str,
        next_seq: u64,
        now_ms: i64,
    ) -> Result<bool, StoreError>;

    /// Sets or clears the session's permission-mode override; `false` if
    /// the key is unknown.
    /// Records that the terminal event of `job_id` reached the broker.
    async fn mark_terminal_published(&self, job_id: &str, now_ms: i64) -> Result<(), StoreError> {
        self.mark_terminals_published(&[job_id.to_string()], now_ms)
            .await
    }

    /// `mark_terminal_published` for many jobs in one transaction (the
    /// worker marks in batches, see `worker::outbox`).
    async fn mark_terminals_published(
        &self,
        job_ids: &[String],
        now_ms: i64,
    ) -> Result<(), StoreError>;

    /// Jobs finished before `finished_before_ms` whose terminal event is not
    /// known to have reached the broker (the worker died or stopped between
    /// committing the outcome and publishing it), oldest first.
    async fn unpublished_terminals(
        &self,
        finished_before_ms: i64,
        limit: i64,
    ) -> Result<Vec<JobRecord>, StoreError>;

    async fn set_session_permission_mode(
        &self,
        session_key: &str,
        mode: Option<PermissionMode>,
        now_ms: i64,
    ) -> Result<bool, StoreError>;

    /// Marks a reset pending: the session's jobs accepted from now on start
    /// a new Claude session, until one of them completes a turn. `false`
    /// if the key is unknown.
    async fn request_session_reset(
        &self,
        session_key: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError>;

    /// The session's jobs that are queued, and those running.
    async fn count_open_jobs(&self, session_key: &str) -> Result<(i64, i64), StoreError>;
}

/// Opens the store named by `url` (`sqlite:` or `postgres://`). Does not
/// migrate; call [`SessionStore::migrate`] once at start-up.
pub async fn connect(
    url: &Secret,
    max_connections: u32,
) -> Result<Arc<dyn SessionStore>, StoreError> {
    let raw = url.expose();
    if raw.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::connect(raw, max_connections).await?))
    } else {
        probe_postgres(raw).await?;
        Ok(Arc::new(
            PostgresStore::connect(raw, max_connections).await?,
        ))
    }
}

/// One direct connection first: a server that is down or refuses us fails
/// start-up at once with its own reason, instead of the pool's 30 s
/// "timed out while waiting for an open connection".
async fn probe_postgres(url: &str) -> Result<(), StoreError> {
    use sqlx::Connection as _;
    const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
    match tokio::time::timeout(PROBE_TIMEOUT, sqlx::PgConnection::connect(url)).await {
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            Ok(())
        }
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(StoreError::Unavailable(format!(
            "no connection within {} s",
            PROBE_TIMEOUT.as_secs()
        ))),
    }
}

/// Current time in Unix milliseconds (the worker's clock).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SSZ` (UTC).
pub fn utc_time(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
