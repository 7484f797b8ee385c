//! Compaction, a stage between `budget` and `attempts`: a session whose
//! context use reached its profile's `compact_at_percent`, or whose job
//! asks for it (`options.compact`), is compacted before the job's turn.
//!
//! The CLI does the work: `/compact` sent as a user message (on the
//! session's warm process, else on a CLI resuming the session) makes it ask
//! the API for a summary and continue the session from it. It answers with
//! `system/status` (compacting), `system/compact_boundary` (`pre_tokens`,
//! `post_tokens`) and a `result` with `num_turns: 0` (verified against
//! 2.1.330 in `tests/it/mock_selftest.rs`). The worker publishes
//! `compacted`, stores the transcript (the next turn may run anywhere) and
//! runs the turn, on the same process when it was warm.
//!
//! Compaction is an optimisation, never a reason to lose a job: if it
//! fails (the CLI dies, errs or hangs past the turn timeout) the process is
//! dropped, the local transcript is checked against the stored one, and
//! the turn runs on the uncompacted session.

use tokio::time::{timeout_at, Instant};
use tracing::{debug, info, instrument, warn};

use super::events::JobEvents;
use super::prepare::Prepared;
use super::{TurnAbort, EXIT_GRACE, STOP_GRACE};
use crate::claude::warm::{WarmProcess, CLOSE_GRACE};
use crate::claude::{CliMessage, CliProcess, TurnRequest};
use crate::protocol::{CompactTrigger, EventBody};
use crate::store::{now_ms, JobRecord, Lease};
use crate::worker::context::Context;
use crate::worker::transcript;

/// The user message that makes the CLI compact its session.
const COMPACT_PROMPT: &str = "/compact";

/// A failed compaction of the session to wait out: threshold compaction
/// is tried again once `retry_ms` have passed since it, or once the
/// context grew by a tenth of the window since (each try is a summary
/// request of the whole context, so it is not made before every job).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Backoff {
    /// `(at_ms, context_tokens)` of the last failure.
    pub failed: Option<(i64, u64)>,
    pub now_ms: i64,
    pub retry_ms: i64,
}

impl Backoff {
    fn allows(&self, used: u64, window: u64) -> bool {
        let Some((at_ms, tokens)) = self.failed else {
            return true;
        };
        self.now_ms.saturating_sub(at_ms) >= self.retry_ms
            || used >= tokens.saturating_add(window / 10)
    }
}

/// Why this job's session should be compacted first, if it should.
pub(crate) fn trigger(
    asked: bool,
    compact_at_percent: Option<u8>,
    context: Option<(u64, u64)>,
    backoff: Backoff,
) -> Option<CompactTrigger> {
    if asked {
        return Some(CompactTrigger::Requested);
    }
    let threshold = u64::from(compact_at_percent?);
    let (used, window) = context?;
    (window > 0
        && used.saturating_mul(100) >= threshold.saturating_mul(window)
        && backoff.allows(used, window))
    .then_some(CompactTrigger::Threshold)
}

/// How a compaction ended.
enum Outcome {
    /// The CLI compacted: the figures of its `compact_boundary`.
    Compacted { pre_tokens: u64, post_tokens: u64 },
    /// The CLI answered without compacting (e.g. nothing to compact).
    Skipped,
    /// The CLI could not compact (its summary request failed); the
    /// process and the session are as they were.
    Refused(String),
    /// The CLI died, erred or hung; `why` is for the log.
    Failed(String),
    /// The job was cancelled meanwhile: the attempts stage ends it.
    Cancelled,
}

/// The CLI that compacts: the session's warm process (it then runs the
/// turn) or one started for the compaction.
enum Compactor {
    Warm(WarmProcess),
    Cold(CliProcess),
}

impl Compactor {
    fn proc(&mut self) -> &mut CliProcess {
        match self {
            Compactor::Warm(w) => &mut w.proc,
            Compactor::Cold(p) => p,
        }
    }

    /// After a compaction: a warm process goes on to run the turn; a CLI
    /// started for it exits (flushing its transcript) and the turn resumes
    /// the compacted session like any turn.
    async fn keep(self, prepared: &mut Prepared) {
        match self {
            Compactor::Warm(mut w) => {
                w.turns += 1;
                prepared.warm = Some(w);
            }
            Compactor::Cold(mut p) => {
                let how = p.close(CLOSE_GRACE.max(EXIT_GRACE)).await;
                debug!(how, "the CLI that compacted the session exited");
            }
        }
    }
}

/// Compacts the session first when it should be; the job runs either way.
#[instrument(skip_all)]
pub(super) async fn before_turn(
    ctx: &Context,
    lease: &Lease,
    job: &JobRecord,
    prepared: &mut Prepared,
    events: &mut JobEvents<'_>,
) -> Result<(), TurnAbort> {
    if job.spec.prompt == COMPACT_PROMPT {
        // The turn itself is the CLI's compaction.
        return Ok(());
    }
    let backoff = Backoff {
        failed: prepared.compact_failed,
        now_ms: now_ms(),
        retry_ms: i64::try_from(prepared.profile.compact_retry_secs.saturating_mul(1000))
            .unwrap_or(i64::MAX),
    };
    let Some(trigger) = trigger(
        job.spec.compact,
        prepared.profile.compact_at_percent,
        prepared.context,
        backoff,
    ) else {
        return Ok(());
    };
    let Some(session_id) = prepared
        .request
        .resume
        .clone()
        .filter(|_| !prepared.request.fork)
    else {
        // A new session (or a fork, whose parent is not ours to change)
        // has nothing to compact yet.
        return Ok(());
    };
    let request = TurnRequest {
        prompt: COMPACT_PROMPT.into(),
        images: Vec::new(),
        ..prepared.request.clone()
    };
    let Some(mut compactor) = start(ctx, prepared, &request, &events.session_key).await else {
        return Ok(());
    };
    let outcome = run(ctx, compactor.proc(), events).await;
    let cost = compactor.proc().take_cost();
    events.spent_usd += cost;
    prepared.compaction_cost_usd += cost;
    let done = Done {
        trigger,
        session_id,
        compactor,
    };
    settle(ctx, lease, prepared, events, done, outcome?).await
}

/// A compaction that ran: why, on which Claude session, on which CLI.
struct Done {
    trigger: CompactTrigger,
    session_id: String,
    compactor: Compactor,
}

/// What follows a compaction's outcome: the event, the transcript and
/// the process kept, or the failure recorded for the backoff.
async fn settle(
    ctx: &Context,
    lease: &Lease,
    prepared: &mut Prepared,
    events: &mut JobEvents<'_>,
    done: Done,
    outcome: Outcome,
) -> Result<(), TurnAbort> {
    let Done {
        trigger,
        session_id,
        mut compactor,
    } = done;
    match outcome {
        Outcome::Compacted {
            pre_tokens,
            post_tokens,
        } => {
            info!(
                ?trigger,
                pre_tokens, post_tokens, "session compacted before the turn"
            );
            compactor.keep(prepared).await;
            transcript::save(ctx, lease, &prepared.profile, &prepared.cwd, &session_id).await?;
            if prepared.compact_failed.take().is_some() {
                ctx.store.set_compaction_failure(lease, None).await?;
            }
            events
                .emit(EventBody::Compacted {
                    trigger,
                    pre_tokens,
                    post_tokens,
                })
                .await
        }
        Outcome::Skipped => {
            debug!("the CLI did not compact the session");
            compactor.keep(prepared).await;
            Ok(())
        }
        Outcome::Cancelled => {
            compactor.proc().terminate(STOP_GRACE).await;
            Ok(())
        }
        Outcome::Refused(why) => {
            warn!(reason = %why, "the CLI could not compact; the turn runs on the uncompacted session");
            compactor.keep(prepared).await;
            record_failure(ctx, lease, prepared).await
        }
        Outcome::Failed(why) => {
            warn!(reason = %why, "compaction failed; the turn runs on the uncompacted session");
            compactor.proc().terminate(STOP_GRACE).await;
            // The local transcript may be a dead process's: keep it only if
            // it is the stored one.
            transcript::materialise(ctx, &prepared.profile, &prepared.cwd, &session_id).await;
            record_failure(ctx, lease, prepared).await
        }
    }
}

/// Notes the failure on the session, so threshold compaction backs off.
async fn record_failure(
    ctx: &Context,
    lease: &Lease,
    prepared: &Prepared,
) -> Result<(), TurnAbort> {
    let tokens = prepared.context.map_or(0, |(used, _)| used);
    let failure = (now_ms(), i64::try_from(tokens).unwrap_or(i64::MAX));
    ctx.store
        .set_compaction_failure(lease, Some(failure))
        .await?;
    Ok(())
}

/// The session's warm process with `/compact` written to it, else a new
/// CLI resuming the session. `None` when no CLI could be started (the
/// turn will say why).
async fn start(
    ctx: &Context,
    prepared: &mut Prepared,
    request: &TurnRequest,
    session_key: &str,
) -> Option<Compactor> {
    if let Some(mut w) = prepared.warm.take() {
        match w.proc.try_send_user_message(request) {
            Ok(()) => return Some(Compactor::Warm(w)),
            Err(e) => ctx
                .warm
                .record_broken(session_key, &format!("writing /compact: {e}")),
        }
    }
    match CliProcess::spawn(&ctx.settings.claude, &prepared.profile, request).await {
        Ok(mut proc) => {
            ctx.warm.record_spawn();
            proc.send_user_message(request);
            Some(Compactor::Cold(proc))
        }
        Err(e) => {
            warn!(error = %e, "could not start the CLI to compact; the turn runs without");
            None
        }
    }
}

/// Reads the CLI's answer to `/compact` until its result, within the turn
/// timeout, while cancel, lease loss and shutdown are watched.
async fn run(
    ctx: &Context,
    proc: &mut CliProcess,
    events: &mut JobEvents<'_>,
) -> Result<Outcome, TurnAbort> {
    let deadline = Instant::now() + ctx.settings.turn_timeout();
    let mut boundary = None;
    let mut refused = None;
    loop {
        let stop = events.stop;
        let msg = tokio::select! {
            m = timeout_at(deadline, proc.next_message()) => match m {
                Ok(m) => m,
                Err(_) => return Ok(Outcome::Failed("no result within the turn timeout".into())),
            },
            _ = stop.lease_lost.cancelled() => {
                proc.terminate(STOP_GRACE).await;
                return Err(TurnAbort::LeaseLost);
            }
            _ = stop.kill.cancelled() => {
                proc.terminate(STOP_GRACE).await;
                return Err(TurnAbort::Shutdown);
            }
            _ = events.turn.cancel.cancelled() => return Ok(Outcome::Cancelled),
        };
        stop.progressed();
        match msg {
            None => return Ok(Outcome::Failed("the CLI ended without a result".into())),
            Some(CliMessage::CompactBoundary {
                pre_tokens,
                post_tokens,
                ..
            }) => boundary = Some((pre_tokens, post_tokens)),
            Some(CliMessage::CompactFailed { error }) => refused = Some(error),
            Some(CliMessage::Result(r)) if r.is_error || r.subtype != "success" => {
                return Ok(Outcome::Failed(format!(
                    "the CLI's result was {}",
                    r.subtype
                )))
            }
            Some(CliMessage::Result(_)) => {
                return Ok(match (boundary, refused) {
                    (Some((pre_tokens, post_tokens)), _) => Outcome::Compacted {
                        pre_tokens,
                        post_tokens,
                    },
                    (None, Some(why)) => Outcome::Refused(why),
                    (None, None) => Outcome::Skipped,
                })
            }
            Some(_) => {}
        }
    }
}

/// The CLI's own compaction (its autocompact, or a prompt `/compact`):
/// the same event as the worker's.
pub(super) fn from_cli(trigger: &str, pre_tokens: u64, post_tokens: u64) -> EventBody {
    let trigger = match trigger {
        "manual" => CompactTrigger::Requested,
        _ => CompactTrigger::Auto,
    };
    EventBody::Compacted {
        trigger,
        pre_tokens,
        post_tokens,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compaction_is_asked_for_or_due_at_the_threshold() {
        let t = |asked, pct, ctx| trigger(asked, pct, ctx, Backoff::default());
        assert_eq!(t(true, None, None), Some(CompactTrigger::Requested));
        assert_eq!(t(false, None, Some((990, 1000))), None, "no threshold set");
        assert_eq!(t(false, Some(50), None), None, "context unknown");
        assert_eq!(t(false, Some(50), Some((499, 1000))), None);
        assert_eq!(
            t(false, Some(50), Some((500, 1000))),
            Some(CompactTrigger::Threshold)
        );
        assert_eq!(t(false, Some(50), Some((500, 0))), None, "no window");
        assert_eq!(
            t(true, Some(50), Some((900, 1000))),
            Some(CompactTrigger::Requested),
            "asked wins"
        );
    }

    #[test]
    fn a_failed_compaction_is_waited_out_by_time_or_growth() {
        let backoff = |now_ms| Backoff {
            failed: Some((1_000, 150_000)),
            now_ms,
            retry_ms: 900_000,
        };
        let t = |ctx, now| trigger(false, Some(50), Some(ctx), backoff(now));
        assert_eq!(t((150_000, 200_000), 2_000), None, "just failed");
        assert_eq!(t((169_999, 200_000), 900_999), None, "grew, not enough");
        assert_eq!(
            t((170_000, 200_000), 2_000),
            Some(CompactTrigger::Threshold),
            "grew by a tenth of the window"
        );
        assert_eq!(
            t((150_000, 200_000), 901_000),
            Some(CompactTrigger::Threshold),
            "the backoff passed"
        );
        assert_eq!(
            trigger(true, Some(50), Some((150_000, 200_000)), backoff(2_000)),
            Some(CompactTrigger::Requested),
            "a job that asks is not held back"
        );
    }
}
