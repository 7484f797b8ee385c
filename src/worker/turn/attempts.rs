//! The second stage: attempts until one completes, fails for good, or the
//! job is cancelled. A retryable failure publishes `retrying` and waits the
//! retry policy's delay (which a cancel, lease loss or shutdown cuts short).

use std::time::{Duration, Instant};

use tracing::{debug, instrument, warn};

use super::attempt::{self, AttemptEnd, InitInfo};
use super::events::JobEvents;
use super::prepare::Prepared;
use super::retry::AttemptFailure;
use super::TurnAbort;
use crate::claude::{CliProcess, TurnResult};
use crate::protocol::EventBody;
use crate::store::lifecycle::needs_begin;
use crate::store::{now_ms, JobRecord, Lease, StartedAttempt, StoreError};
use crate::worker::context::Context;

/// How the attempts ended; `outcome` records it.
// One per attempt, moved once: boxing the large variant buys nothing.
#[allow(clippy::large_enum_variant)]
pub(super) enum Ended {
    Completed {
        result: TurnResult,
        init: Option<InitInfo>,
        /// The still-running CLI and the turns it has run, when it may go
        /// back to the warm pool.
        live: Option<(Box<CliProcess>, u64)>,
        attempt: u32,
        duration_ms: u64,
    },
    /// Failed for good: not retryable, or out of attempts or time.
    Failed {
        failure: AttemptFailure,
        attempt: u32,
        duration_ms: u64,
    },
    /// Cancelled while running (`init` if the CLI had started the session)
    /// or while waiting to retry.
    Cancelled {
        init: Option<InitInfo>,
        attempt: u32,
        duration_ms: u64,
    },
    /// The job ended elsewhere while it waited (cancelled): nothing to do.
    NotRunnable,
}

#[instrument(name = "attempts", skip_all)]
pub(super) async fn run(
    ctx: &Context,
    lease: &Lease,
    job: &JobRecord,
    prepared: &mut Prepared,
    events: &mut JobEvents<'_>,
) -> Result<Ended, TurnAbort> {
    loop {
        // The attempt's first block of seqs is reserved in the same commit.
        let reserve = events.seq_block_to_reserve();
        let started = ctx
            .store
            .start_attempt_reserving(lease, &job.job_id, now_ms(), reserve.unwrap_or(0))
            .await;
        let started = match started {
            Ok(started) => {
                if let Some(upto) = reserve {
                    events.seqs_reserved(upto);
                }
                started
            }
            Err(StoreError::NotRunnable(_)) => return Ok(Ended::NotRunnable),
            Err(e) => return Err(e.into()),
        };
        let attempt = started.attempt;
        events.attempt = attempt;
        events.stop.progressed();
        // Prompts an earlier attempt left open (it died or its CLI exited).
        super::superseded::resolve_left_open(events, Some(attempt)).await?;
        begin_conversation(ctx, lease, job, &started).await?;
        if let Some(hook) = &ctx.hooks.on_attempt {
            hook(job);
        }
        let started = Instant::now();
        let end = attempt::run(ctx, prepared, events).await?;
        let duration_ms = started.elapsed().as_millis() as u64;
        let failure = match end {
            AttemptEnd::Completed { result, init, live } => {
                return Ok(Ended::Completed {
                    result,
                    init,
                    live,
                    attempt,
                    duration_ms,
                })
            }
            AttemptEnd::Cancelled { init } => {
                return Ok(Ended::Cancelled {
                    init,
                    attempt,
                    duration_ms,
                })
            }
            AttemptEnd::Failed(failure) => failure,
        };
        let next = attempt + 1;
        let delay = if failure.retryable {
            ctx.retry
                .delay_before(next, prepared.first_started.elapsed())
        } else {
            None
        };
        let Some(delay) = delay else {
            return Ok(Ended::Failed {
                failure,
                attempt,
                duration_ms,
            });
        };
        // The message can quote the CLI's output: debug only (docs/LOGGING.md).
        warn!(attempt, duration_ms, kind = ?failure.kind, delay_ms = delay.as_millis() as u64,
              "attempt failed; retrying");
        debug!(error = %failure.message, "the failed attempt");
        let reason = crate::ops::metrics::error_kind(failure.kind);
        let retries = crate::ops::metrics::RETRIES;
        ctx.metrics
            .counter(retries, &[("reason", reason)])
            .increment(1);
        events
            .emit(EventBody::Retrying {
                next_attempt: next,
                delay_ms: delay.as_millis() as u64,
                reason: failure.message.clone(),
            })
            .await?;
        if !wait_before_retry(events, delay).await? {
            return Ok(Ended::Cancelled {
                init: None,
                attempt,
                duration_ms,
            });
        }
    }
}

/// Waits the retry delay. False if the job was cancelled meanwhile.
async fn wait_before_retry(events: &JobEvents<'_>, delay: Duration) -> Result<bool, TurnAbort> {
    tokio::select! {
        _ = tokio::time::sleep(delay) => Ok(true),
        _ = events.turn.cancel.cancelled() => Ok(false),
        _ = events.stop.lease_lost.cancelled() => Err(TurnAbort::LeaseLost),
        _ = events.stop.kill.cancelled() => Err(TurnAbort::Shutdown),
    }
}

/// Records `session.started` (and `session.ended` for a reset) when this
/// attempt begins a conversation; most turns continue one, which the
/// columns read by `start_attempt_reserving` tell without another read.
async fn begin_conversation(
    ctx: &Context,
    lease: &Lease,
    job: &JobRecord,
    started: &StartedAttempt,
) -> Result<(), TurnAbort> {
    let begins = needs_begin(
        started.lifecycle_started_at_ms,
        started.lifecycle_job_id.as_deref(),
        &job.job_id,
        job.spec.mode,
    );
    if begins
        && ctx
            .store
            .begin_conversation(lease, &job.job_id, job.spec.mode, now_ms())
            .await?
    {
        ctx.note_lifecycle_recorded();
    }
    Ok(())
}
