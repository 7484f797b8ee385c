//! `cancel`: one job, or every queued and running job of a session.

use tracing::{debug, info};

use super::Request;
use crate::protocol::ControlOutcome;
use crate::worker::ending::{self, cancel_job, Cancelled, EndError};

const DEFAULT_REASON: &str = "cancelled by request";

pub(super) async fn job(
    req: &Request<'_>,
    job_id: String,
    reason: Option<String>,
) -> Result<(), EndError> {
    let ctx = req.ctx;
    let reason = reason.unwrap_or_else(|| DEFAULT_REASON.into());
    ctx.running.cancel_job(&job_id, &reason);
    if !req.claim().await? {
        return Ok(());
    }
    let (ok, outcome, message) = match ctx.store.get_job(&job_id).await? {
        None => (false, ControlOutcome::Unknown, format!("no job {job_id}")),
        Some(job) => match cancel_job(ctx, job, &reason).await? {
            Cancelled::Queued => (
                true,
                ControlOutcome::Cancelled,
                "cancelled before it ran".into(),
            ),
            Cancelled::Running => {
                req.rebroadcast().await?;
                (
                    true,
                    ControlOutcome::Cancelled,
                    "interrupting the running turn".into(),
                )
            }
            Cancelled::AlreadyFinished(status) => (
                false,
                ControlOutcome::AlreadyFinished,
                format!("job {job_id} already finished ({})", status.as_str()),
            ),
        },
    };
    info!(request_id = %req.id, %job_id, ?outcome, "cancel handled");
    req.answer()
        .send(ok, outcome, message, Some(job_id), None)
        .await?;
    Ok(())
}

pub(super) async fn session(
    req: &Request<'_>,
    key: String,
    reason: Option<String>,
) -> Result<(), EndError> {
    let ctx = req.ctx;
    let reason = reason.unwrap_or_else(|| DEFAULT_REASON.into());
    // A turn interrupted here may end, and end its session's queued jobs,
    // before the listing below sees them: they count as this request's.
    let interrupted_here = ctx.running.cancel_session(&key, &reason).len();
    if !req.claim().await? {
        return Ok(());
    }
    if ctx.store.get_session(&key).await?.is_none() {
        let message = format!("no session {key}");
        req.answer()
            .send(false, ControlOutcome::Unknown, message, None, Some(key))
            .await?;
        return Ok(());
    }
    let (queued, running) = ending::cancel_session_jobs(ctx, &key, &reason).await?;
    if running > 0 {
        req.rebroadcast().await?;
    }
    let running = running.max(interrupted_here);
    let ok = queued + running > 0;
    let (outcome, message) = if ok {
        (
            ControlOutcome::Cancelled,
            format!("cancelled {queued} queued job(s); interrupting {running} running turn(s)"),
        )
    } else {
        (
            ControlOutcome::AlreadyFinished,
            format!("session {key} has no queued or running jobs"),
        )
    };
    info!(request_id = %req.id, queued, running, "session cancel handled");
    debug!(session_key = %key, "session cancel handled");
    req.answer()
        .send(ok, outcome, message, None, Some(key))
        .await?;
    Ok(())
}
