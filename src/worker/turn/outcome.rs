//! The last stage: record the outcome (after a completed turn, with the
//! transcript), then publish the terminal event; give the CLI back to the
//! warm pool last.

use serde_json::Value;
use tracing::{debug, info, instrument, warn};

use super::attempt::InitInfo;
use super::attempts::Ended;
use super::events::JobEvents;
use super::prepare::Prepared;
use super::retry::AttemptFailure;
use super::{TurnAbort, EXIT_GRACE};
use crate::claude::stream::ContextUse;
use crate::claude::warm::WarmProcess;
use crate::claude::{CliProcess, TurnResult};
use crate::protocol::EventBody;
use crate::store::{JobRecord, JobStatus, Lease, SessionUpdate};
use crate::worker::context::Context;
use crate::worker::ending::{self, EndError};
use crate::worker::running::CancelReason;
use crate::worker::transcript;

#[instrument(skip_all)]
pub(super) async fn record(
    ctx: &Context,
    lease: &Lease,
    job: &JobRecord,
    prepared: Prepared,
    ended: Ended,
    events: &mut JobEvents<'_>,
) -> Result<(), TurnAbort> {
    match ended {
        Ended::NotRunnable => Ok(()),
        Ended::Completed {
            result,
            init,
            live,
            attempt,
            duration_ms,
        } => {
            info!(
                attempt,
                duration_ms,
                num_turns = result.num_turns,
                "job completed"
            );
            let tokens = crate::ops::metrics::TokenUsage::from_usage(&result.usage);
            ctx.metrics.tokens(&job.spec.profile, &tokens);
            let claude_session_id =
                completed(ctx, lease, &prepared, result, init, duration_ms, events).await?;
            keep_or_close(ctx, job, &prepared, live, claude_session_id).await;
            Ok(())
        }
        Ended::Failed {
            failure,
            attempt,
            duration_ms,
        } => {
            warn!(attempt, duration_ms, kind = ?failure.kind, "job failed");
            debug!(error = %failure.message, "the failure");
            failed(events, failure).await
        }
        Ended::Cancelled {
            init,
            attempt,
            duration_ms,
        } => {
            let reason = events.turn.cancel_reason();
            info!(attempt, duration_ms, "job cancelled");
            debug!(reason = %reason.text, "the cancel reason");
            // The interrupted turn is in the transcript: the key keeps it.
            let update =
                init.map(|i| session_update(&prepared, i.session_id, i.model, &Value::Null, None));
            cancelled(events, reason, update).await
        }
    }
}

/// Records the outcome with the transcript (one transaction, so the next
/// turn finds both on any worker), then publishes `completed`. Returns the
/// Claude session the turn ran in.
async fn completed(
    ctx: &Context,
    lease: &Lease,
    prepared: &Prepared,
    result: TurnResult,
    init: Option<InitInfo>,
    duration_ms: u64,
    events: &mut JobEvents<'_>,
) -> Result<Option<String>, TurnAbort> {
    let claude_session_id = result
        .session_id
        .clone()
        .or_else(|| init.as_ref().map(|i| i.session_id.clone()));
    let model = init.and_then(|i| i.model);
    let update = claude_session_id
        .clone()
        .map(|id| session_update(prepared, id, model, &result.usage, result.context));
    // The transcript is read while the turn's events are confirmed: both
    // must be done before the outcome commits, and neither waits on the other.
    let read = async {
        match &claude_session_id {
            Some(id) => {
                transcript::prepare_save(ctx, lease, &prepared.profile, &prepared.cwd, id).await
            }
            None => Ok(None),
        }
    };
    let (transcript, settled) = tokio::join!(read, events.settle());
    settled?;
    let transcript = transcript?;
    let body = EventBody::Completed {
        result: result.result.clone().unwrap_or_default(),
        claude_session_id: claude_session_id.clone(),
        usage: result.usage,
        // Per turn (the CLI's total_cost_usd is a running total), with
        // the compaction before it, if any.
        total_cost_usd: result.turn_cost_usd + prepared.compaction_cost_usd,
        session_cost_usd: Some(prepared.session_cost_usd + events.spent_usd),
        duration_ms: if result.duration_ms > 0 {
            result.duration_ms
        } else {
            duration_ms
        },
        num_turns: result.num_turns,
        context_tokens: result.context.map(|c| c.tokens),
        context_window_tokens: result.context.and_then(|c| c.window),
    };
    events
        .finish_with_transcript(JobStatus::Succeeded, body, None, update, transcript)
        .await?;
    Ok(claude_session_id)
}

/// Only now, with the outcome recorded, may the process serve the
/// session's next turn. Without warm reuse it exits here, off the
/// `completed` event's path but before the session's next turn can resume
/// its transcript.
async fn keep_or_close(
    ctx: &Context,
    job: &JobRecord,
    prepared: &Prepared,
    live: Option<(Box<CliProcess>, u64)>,
    claude_session_id: Option<String>,
) {
    match (live, claude_session_id) {
        // A capped turn's process is not reused (the CLI counts the cap
        // over the whole process).
        (Some((proc, turns)), Some(id))
            if ctx.warm.enabled() && prepared.request.options.max_budget_usd.is_none() =>
        {
            let mut warm = WarmProcess::new(
                *proc,
                &job.session_key,
                &job.spec.profile,
                &prepared.profile,
                &prepared.request,
                id,
                &job.job_id,
            );
            warm.turns = turns;
            ctx.warm.put(warm);
        }
        (Some((mut proc, _)), _) => {
            let _ = proc.finish(EXIT_GRACE).await;
        }
        (None, _) => {}
    }
}

fn session_update(
    prepared: &Prepared,
    claude_session_id: String,
    model: Option<String>,
    usage: &Value,
    context: Option<ContextUse>,
) -> SessionUpdate {
    let tokens = |k: &str| usage.get(k).and_then(Value::as_i64).unwrap_or(0);
    SessionUpdate {
        claude_session_id,
        cwd: prepared.cwd.display().to_string(),
        model,
        input_tokens: tokens("input_tokens"),
        output_tokens: tokens("output_tokens"),
        context_tokens: context.map(|c| c.tokens as i64),
        context_window: context.and_then(|c| c.window).map(|w| w as i64),
    }
}

async fn failed(events: &mut JobEvents<'_>, failure: AttemptFailure) -> Result<(), TurnAbort> {
    events
        .finish(
            JobStatus::Failed,
            EventBody::Failed {
                error: failure.kind,
                message: failure.message.clone(),
                retryable: failure.retryable,
            },
            Some(failure.message),
            None,
        )
        .await
}

/// Ends a cancelled job; after a session-wide cancel, its queued jobs go
/// too, before this worker could start the next one.
async fn cancelled(
    events: &mut JobEvents<'_>,
    reason: CancelReason,
    update: Option<SessionUpdate>,
) -> Result<(), TurnAbort> {
    events
        .finish(
            JobStatus::Cancelled,
            EventBody::Cancelled {
                reason: reason.text.clone(),
            },
            Some(reason.text.clone()),
            update,
        )
        .await?;
    if reason.session_wide {
        ending::cancel_session_jobs(events.ctx, &events.session_key, &reason.text)
            .await
            .map_err(|e| match e {
                EndError::Store(e) => TurnAbort::from(e),
                EndError::Publish(e) => TurnAbort::from(e),
            })?;
    }
    Ok(())
}
