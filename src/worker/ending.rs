//! Ending jobs that never ran (cancelled while queued, refused as busy):
//! used by `accept`, the `control` handlers and the turn's outcome.

use crate::broker::publish::{Attribution, PublishError};
use crate::protocol::{EventBody, EventV1, PermissionBehavior, ResolvedBy, PROTOCOL_VERSION};
use crate::store::{now_ms, JobRecord, JobStatus, StoreError};
use crate::worker::context::Context;

/// A job could not be ended now: the database or the broker failed. The
/// caller hands the message back (or aborts) so it is tried again.
#[derive(Debug, thiserror::Error)]
pub enum EndError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Publish(#[from] PublishError),
}

/// Cancels every queued job of a session (publishing their `cancelled`
/// events); returns (cancelled queued, still running). Safe to run from
/// several workers at once: each queued job ends exactly once.
pub async fn cancel_session_jobs(
    ctx: &Context,
    session_key: &str,
    reason: &str,
) -> Result<(usize, usize), EndError> {
    let (mut queued, mut running) = (0, 0);
    for job in ctx.store.list_jobs(session_key, 10_000).await? {
        match cancel_job(ctx, job, reason).await? {
            Cancelled::Queued => queued += 1,
            Cancelled::Running => running += 1,
            Cancelled::AlreadyFinished(_) => {}
        }
    }
    Ok((queued, running))
}

pub(crate) enum Cancelled {
    Queued,
    Running,
    AlreadyFinished(JobStatus),
}

/// Cancels a queued job in the database (publishing its `cancelled`
/// event), or reports it running or finished.
pub(crate) async fn cancel_job(
    ctx: &Context,
    job: JobRecord,
    reason: &str,
) -> Result<Cancelled, EndError> {
    if job.status.is_terminal() {
        return Ok(Cancelled::AlreadyFinished(job.status));
    }
    if job.status == JobStatus::Running {
        return Ok(Cancelled::Running);
    }
    let body = EventBody::Cancelled {
        reason: reason.to_string(),
    };
    if end_queued_job(ctx, &job, JobStatus::Cancelled, None, body).await? {
        Ok(Cancelled::Queued)
    } else {
        // It started meanwhile.
        Ok(Cancelled::Running)
    }
}

/// Ends a job that has not started with a terminal event, and publishes
/// it. False if the job is no longer queued.
pub async fn end_queued_job(
    ctx: &Context,
    job: &JobRecord,
    status: JobStatus,
    error: Option<&str>,
    body: EventBody,
) -> Result<bool, EndError> {
    // A job handed back by a worker that stopped while a prompt waited:
    // its prompts are resolved before its terminal event.
    let left_open = match job.attempts {
        0 => Vec::new(),
        _ => ctx.store.open_prompts(&job.job_id).await?,
    };
    let event_at = |seq: u64, body: EventBody| EventV1 {
        v: PROTOCOL_VERSION,
        job_id: job.job_id.clone(),
        session_key: job.session_key.clone(),
        seq,
        attempt: job.attempts,
        body,
        metadata: job.spec.metadata.clone(),
    };
    let resolved: Vec<EventV1> = (job.next_seq..)
        .zip(&left_open)
        .map(|(seq, p)| event_at(seq, superseded(&p.request_id)))
        .collect();
    let event = event_at(job.next_seq + resolved.len() as u64, body);
    let bytes = serde_json::to_vec(&event).expect("events serialise");
    let text = String::from_utf8(bytes.clone()).expect("JSON is UTF-8");
    if !ctx
        .store
        .finish_queued_job(&job.job_id, status, error, &text, event.seq + 1, now_ms())
        .await?
    {
        return Ok(false);
    }
    ctx.metrics.job_ended(&job.spec.profile, &event.body);
    let reply_to = job
        .spec
        .reply_to
        .clone()
        .unwrap_or_else(|| job.session_key.clone());
    // Attributed like every event: this worker, and the session's epoch
    // (at least that of any event the job had before it was requeued, so
    // the reader's epoch rule keeps it).
    let lease_epoch = ctx
        .store
        .get_session(&job.session_key)
        .await?
        .map_or(0, |s| s.lease_epoch);
    let from = Attribution {
        worker_id: &ctx.worker_id,
        lease_epoch,
        fence: None,
    };
    for e in &resolved {
        let b = serde_json::to_vec(e).expect("events serialise");
        ctx.sink.publish_event(&reply_to, e, &b, &from).await?;
        if let EventBody::PermissionResolved { request_id, .. } = &e.body {
            ctx.store
                .resolve_prompt(request_id, ResolvedBy::Superseded.as_str())
                .await?;
        }
    }
    ctx.sink
        .publish_event(&reply_to, &event, &bytes, &from)
        .await?;
    crate::worker::outbox::mark_published(ctx, &job.job_id).await;
    Ok(true)
}

/// The `permission_resolved` of a prompt its job ended without settling.
fn superseded(request_id: &str) -> EventBody {
    EventBody::PermissionResolved {
        request_id: request_id.to_string(),
        behavior: PermissionBehavior::Deny,
        by: ResolvedBy::Superseded,
        message: Some("the attempt that asked ended without an answer, and so did the job".into()),
    }
}
