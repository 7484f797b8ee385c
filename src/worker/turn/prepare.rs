//! The first stage: everything decided before an attempt starts — the
//! profile, attempts lost with a worker, which Claude session to resume or
//! fork, the session's warm process, and its transcript on this worker.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tracing::instrument;

use super::events::JobEvents;
use super::TurnAbort;
use crate::claude::warm::{SessionView, WarmProcess};
use crate::claude::{self, TurnRequest};
use crate::config::{PermissionPrompts, Profile};
use crate::protocol::{ErrorKind, EventBody, SessionMode};
use crate::store::{now_ms, JobRecord, JobStatus, SessionRecord};
use crate::worker::context::Context;
use crate::worker::transcript;

/// A job ready for its attempts.
pub(super) struct Prepared {
    pub profile: Profile,
    pub request: TurnRequest,
    pub cwd: PathBuf,
    /// The session's idle CLI, if it can run this turn.
    pub warm: Option<WarmProcess>,
    /// Set once the session to resume was not found and a new one started.
    pub resume_failed: Option<String>,
    /// When the job's first attempt began (anywhere), for the retry budget.
    pub first_started: Instant,
    /// What the session's turns cost before this job.
    pub session_cost_usd: f64,
    /// The session's context use after its last turn and its model's
    /// window (tokens), when both are known.
    pub context: Option<(u64, u64)>,
    /// What compacting the session before the turn cost (see `compact`).
    pub compaction_cost_usd: f64,
    /// The session's last failed compaction, `(at_ms, context_tokens)`.
    pub compact_failed: Option<(i64, u64)>,
}

/// `None` when the job already has its outcome (its profile is gone, or
/// its attempts were used up by lost workers).
#[instrument(skip_all)]
pub(super) async fn prepare(
    ctx: &Context,
    job: &JobRecord,
    session: SessionRecord,
    events: &mut JobEvents<'_>,
) -> Result<Option<Prepared>, TurnAbort> {
    let Some(profile) = ctx.settings.profiles.get(&job.spec.profile).cloned() else {
        // The profile was removed from the config after the job was accepted.
        let msg = format!(
            "profile `{}` no longer exists in this worker's configuration",
            job.spec.profile
        );
        fail(events, ErrorKind::InvalidInput, msg, false).await?;
        return Ok(None);
    };
    if !account_lost_attempts(ctx, job, events).await? {
        return Ok(None);
    }
    // `session` was read with the job (`next_turn`), under the lease.
    let mut request = turn_request(job, &profile, &session);
    if let (Some(id), PermissionPrompts::Ask) = (&request.resume, profile.permission_prompts) {
        // "Allow for this session" answers, for a CLI that resumes cold.
        request.session_grants = ctx.store.session_grants(id).await?;
    }
    let session_cost_usd = session.cost_usd;
    let context = (|| {
        let used = u64::try_from(session.context_tokens?).ok()?;
        let window = u64::try_from(session.context_window?).ok()?;
        Some((used, window))
    })();
    let compact_failed = session
        .compact_failed
        .map(|(at, tokens)| (at, u64::try_from(tokens).unwrap_or(0)));
    let view = Some(SessionView {
        claude_session_id: session.claude_session_id,
        last_job_id: session.last_job_id,
    });
    let warm = ctx
        .warm
        .acquire(
            &job.spec.profile,
            &profile,
            &request,
            &job.session_key,
            view.as_ref(),
        )
        .await;
    if let (None, Some(id)) = (&warm, &request.resume) {
        // A cold resume: the session may have run on another worker, so
        // fetch its stored transcript. (A warm process has it already.)
        transcript::materialise(ctx, &profile, &request.cwd, id).await;
    }
    Ok(Some(Prepared {
        cwd: request.cwd.clone(),
        profile,
        request,
        warm,
        resume_failed: None,
        first_started: first_started(job),
        session_cost_usd,
        context,
        compaction_cost_usd: 0.0,
        compact_failed,
    }))
}

/// A job found running, or queued after an earlier attempt, lost its
/// worker: that counts as a failed attempt. Running: its worker died.
/// Queued: its worker handed it back (shutdown, or the database or broker
/// failed mid-turn). False when that used up its attempts (the job failed).
async fn account_lost_attempts(
    ctx: &Context,
    job: &JobRecord,
    events: &mut JobEvents<'_>,
) -> Result<bool, TurnAbort> {
    if job.attempts == 0 {
        return Ok(true);
    }
    if job.attempts >= ctx.retry.max_attempts() {
        let msg = format!(
            "the job's worker was lost and its {} attempts are used up",
            job.attempts
        );
        fail(events, ErrorKind::WorkerLost, msg, true).await?;
        return Ok(false);
    }
    let reason = if job.status == JobStatus::Running {
        "worker_lost"
    } else {
        "interrupted"
    };
    let retries = crate::ops::metrics::RETRIES;
    events
        .ctx
        .metrics
        .counter(retries, &[("reason", reason)])
        .increment(1);
    events
        .emit(EventBody::Retrying {
            next_attempt: job.attempts + 1,
            delay_ms: 0,
            reason: reason.into(),
        })
        .await?;
    Ok(true)
}

/// Which Claude session the turn continues, in which directory, with which
/// options.
fn turn_request(job: &JobRecord, profile: &Profile, session: &SessionRecord) -> TurnRequest {
    let spec = &job.spec;
    let known_id = session.claude_session_id.clone();
    // A `reset_session` before this job was accepted: start afresh.
    let reset = session
        .reset_after_job_order
        .is_some_and(|after| job.order > after);
    let (resume, fork) = match spec.mode {
        SessionMode::Continue if reset => (None, false),
        SessionMode::Continue => (known_id, false),
        SessionMode::New => (None, false),
        SessionMode::Resume => (spec.claude_session_id.clone(), false),
        SessionMode::Fork => (spec.claude_session_id.clone().or(known_id), true),
    };
    let mut options = spec.options();
    // A mode set at runtime (set_permission_mode) holds for later turns.
    if let Some(mode) = session.permission_mode {
        options.permission_mode = mode;
    }
    TurnRequest {
        prompt: spec.prompt.clone(),
        images: spec.attachments.clone(),
        cwd: claude::session_dir(&profile.workdir, &job.session_key),
        resume,
        fork,
        options,
        session_grants: Vec::new(),
    }
}

fn first_started(job: &JobRecord) -> Instant {
    let ago_ms = job
        .started_at_ms
        .map(|t| (now_ms() - t).max(0) as u64)
        .unwrap_or(0);
    Instant::now() - Duration::from_millis(ago_ms)
}

/// Ends the job `failed` before any attempt.
async fn fail(
    events: &mut JobEvents<'_>,
    error: ErrorKind,
    message: String,
    retryable: bool,
) -> Result<(), TurnAbort> {
    events
        .finish(
            JobStatus::Failed,
            EventBody::Failed {
                error,
                message: message.clone(),
                retryable,
            },
            Some(message),
            None,
        )
        .await
}
