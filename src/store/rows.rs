//! Raw row shapes shared by both backends, and their conversion into the
//! domain records. Both schemas store integers as 64-bit and times as
//! Unix milliseconds, so one row type decodes either.

use super::{JobRecord, JobSpec, JobStatus, SessionRecord, SessionStatus, StoreError};

pub(crate) const JOB_COLUMNS: &str = "job_id, session_key, job_order, status, attempts, next_seq, \
     spec, error, terminal_event, created_at_ms, started_at_ms, finished_at_ms, cost_usd";

pub(crate) const SESSION_COLUMNS: &str = "session_key, claude_session_id, profile, status, cwd, \
     model, created_at_ms, updated_at_ms, last_job_id, turns, input_tokens, output_tokens, \
     cost_usd, lease_owner, lease_epoch, lease_expires_at_ms, permission_mode, context_tokens, \
     context_window, reset_after_job_order, compact_failed_at_ms, compact_failed_tokens";

#[derive(sqlx::FromRow)]
pub(crate) struct JobRow {
    job_id: String,
    session_key: String,
    job_order: i64,
    status: String,
    attempts: i64,
    next_seq: i64,
    spec: String,
    error: Option<String>,
    terminal_event: Option<String>,
    created_at_ms: i64,
    started_at_ms: Option<i64>,
    finished_at_ms: Option<i64>,
    cost_usd: f64,
}

impl TryFrom<JobRow> for JobRecord {
    type Error = StoreError;

    fn try_from(r: JobRow) -> Result<Self, StoreError> {
        let spec: JobSpec = serde_json::from_str(&r.spec)
            .map_err(|e| StoreError::Other(format!("job {}: unreadable spec: {e}", r.job_id)))?;
        let attempts = u32::try_from(r.attempts).map_err(|_| {
            StoreError::Other(format!("job {}: bad attempts {}", r.job_id, r.attempts))
        })?;
        let next_seq = u64::try_from(r.next_seq).map_err(|_| {
            StoreError::Other(format!("job {}: bad next_seq {}", r.job_id, r.next_seq))
        })?;
        Ok(JobRecord {
            status: JobStatus::parse(&r.status)?,
            job_id: r.job_id,
            session_key: r.session_key,
            order: r.job_order,
            attempts,
            next_seq,
            spec,
            error: r.error,
            terminal_event: r.terminal_event,
            created_at_ms: r.created_at_ms,
            started_at_ms: r.started_at_ms,
            finished_at_ms: r.finished_at_ms,
            cost_usd: r.cost_usd,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct SessionRow {
    session_key: String,
    claude_session_id: Option<String>,
    profile: String,
    status: String,
    cwd: Option<String>,
    model: Option<String>,
    created_at_ms: i64,
    updated_at_ms: i64,
    last_job_id: Option<String>,
    turns: i64,
    input_tokens: i64,
    output_tokens: i64,
    cost_usd: f64,
    lease_owner: Option<String>,
    lease_epoch: i64,
    lease_expires_at_ms: Option<i64>,
    permission_mode: Option<String>,
    context_tokens: Option<i64>,
    context_window: Option<i64>,
    reset_after_job_order: Option<i64>,
    compact_failed_at_ms: Option<i64>,
    compact_failed_tokens: Option<i64>,
}

impl TryFrom<SessionRow> for SessionRecord {
    type Error = StoreError;

    fn try_from(r: SessionRow) -> Result<Self, StoreError> {
        Ok(SessionRecord {
            status: SessionStatus::parse(&r.status)?,
            session_key: r.session_key,
            claude_session_id: r.claude_session_id,
            profile: r.profile,
            cwd: r.cwd,
            model: r.model,
            created_at_ms: r.created_at_ms,
            updated_at_ms: r.updated_at_ms,
            last_job_id: r.last_job_id,
            turns: r.turns,
            input_tokens: r.input_tokens,
            output_tokens: r.output_tokens,
            cost_usd: r.cost_usd,
            lease_owner: r.lease_owner,
            lease_epoch: r.lease_epoch,
            lease_expires_at_ms: r.lease_expires_at_ms,
            context_tokens: r.context_tokens,
            context_window: r.context_window,
            reset_after_job_order: r.reset_after_job_order,
            compact_failed: r.compact_failed_at_ms.zip(r.compact_failed_tokens),
            permission_mode: r
                .permission_mode
                .map(|m| {
                    serde_json::from_value(serde_json::Value::String(m.clone()))
                        .map_err(|_| StoreError::Other(format!("unknown permission mode {m:?}")))
                })
                .transpose()?,
        })
    }
}

pub(crate) fn spec_json(spec: &JobSpec) -> Result<String, StoreError> {
    serde_json::to_string(spec)
        .map_err(|e| StoreError::Other(format!("cannot encode job spec: {e}")))
}

/// `u64` seqs are stored as signed 64-bit integers.
pub(crate) fn seq_to_db(next_seq: u64) -> Result<i64, StoreError> {
    i64::try_from(next_seq)
        .map_err(|_| StoreError::Other(format!("next_seq {next_seq} out of range")))
}

pub(crate) fn lease_lost(lease: &super::Lease) -> StoreError {
    StoreError::LeaseLost {
        session_key: lease.session_key.clone(),
        epoch: lease.epoch,
    }
}

impl JobRow {
    /// A row of `SELECT {JOB_COLUMNS}` read by SQLite's fast path.
    pub(crate) fn from_rusqlite(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobRow> {
        Ok(JobRow {
            job_id: r.get(0)?,
            session_key: r.get(1)?,
            job_order: r.get(2)?,
            status: r.get(3)?,
            attempts: r.get(4)?,
            next_seq: r.get(5)?,
            spec: r.get(6)?,
            error: r.get(7)?,
            terminal_event: r.get(8)?,
            created_at_ms: r.get(9)?,
            started_at_ms: r.get(10)?,
            finished_at_ms: r.get(11)?,
            cost_usd: r.get(12)?,
        })
    }
}

impl SessionRow {
    /// A row of `SELECT {SESSION_COLUMNS}` read by SQLite's fast path.
    pub(crate) fn from_rusqlite(r: &rusqlite::Row<'_>) -> rusqlite::Result<SessionRow> {
        Ok(SessionRow {
            session_key: r.get(0)?,
            claude_session_id: r.get(1)?,
            profile: r.get(2)?,
            status: r.get(3)?,
            cwd: r.get(4)?,
            model: r.get(5)?,
            created_at_ms: r.get(6)?,
            updated_at_ms: r.get(7)?,
            last_job_id: r.get(8)?,
            turns: r.get(9)?,
            input_tokens: r.get(10)?,
            output_tokens: r.get(11)?,
            cost_usd: r.get(12)?,
            lease_owner: r.get(13)?,
            lease_epoch: r.get(14)?,
            lease_expires_at_ms: r.get(15)?,
            permission_mode: r.get(16)?,
            context_tokens: r.get(17)?,
            context_window: r.get(18)?,
            reset_after_job_order: r.get(19)?,
            compact_failed_at_ms: r.get(20)?,
            compact_failed_tokens: r.get(21)?,
        })
    }
}
