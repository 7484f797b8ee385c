//! One attempt: start the CLI (the session's warm process, else a cold
//! one), stream its output into events, and classify how it ended.
//!
//! Two ends are internal and resolved here, so the stages above never see
//! them: a warm process that does not start the turn is replaced by a cold
//! start (nothing was published for it), and a session to resume that the
//! CLI cannot find is replaced, once, by a new session (noted in `started`).

use tokio::time::Instant;
use tracing::{debug, instrument, warn};

use super::cli_run::CliRun;
use super::events::JobEvents;
use super::prepare::Prepared;
use super::retry::AttemptFailure;
use super::TurnAbort;
use crate::claude::{CliProcess, TurnResult};
use crate::protocol::ErrorKind;
use crate::worker::context::Context;

/// How one attempt ended.
// One per attempt, moved once: boxing the large variant buys nothing.
#[allow(clippy::large_enum_variant)]
pub(super) enum AttemptEnd {
    Completed {
        result: TurnResult,
        init: Option<InitInfo>,
        /// The still-running CLI and the turns it has run, when it may go
        /// back to the warm pool.
        live: Option<(Box<CliProcess>, u64)>,
    },
    Failed(AttemptFailure),
    /// Cancelled by a control message (or a newer job's on_busy=interrupt).
    Cancelled {
        init: Option<InitInfo>,
    },
}

/// What the CLI said of the session when the turn started.
#[derive(Clone)]
pub(super) struct InitInfo {
    pub session_id: String,
    pub model: Option<String>,
}

/// How one CLI run ended: an attempt's end, or one of the two ends the
/// attempt resolves itself by running the CLI again.
// One per CLI run, moved once: boxing the large variant buys nothing.
#[allow(clippy::large_enum_variant)]
pub(super) enum RunEnd {
    Attempt(AttemptEnd),
    /// A warm process did not start the turn.
    WarmBroken(&'static str),
    /// The CLI could not find the session it was asked to resume.
    ResumeNotFound,
}

#[instrument(name = "attempt", skip_all)]
pub(super) async fn run(
    ctx: &Context,
    prepared: &mut Prepared,
    events: &mut JobEvents<'_>,
) -> Result<AttemptEnd, TurnAbort> {
    let deadline = Instant::now() + ctx.settings.turn_timeout();
    loop {
        let (proc, warm_turns) = match start(ctx, prepared, events).await {
            Ok(started) => started,
            Err(failure) => return Ok(AttemptEnd::Failed(failure)),
        };
        let run = CliRun::new(proc, warm_turns, deadline);
        match run.drive(ctx, prepared, events).await? {
            RunEnd::Attempt(end) => return Ok(end),
            RunEnd::WarmBroken(why) => {
                // Nothing was published for it; the process was killed
                // when it was dropped.
                ctx.warm.record_broken(&events.session_key, why);
            }
            RunEnd::ResumeNotFound if prepared.resume_failed.is_none() => {
                let request = &mut prepared.request;
                let id = request.resume.take().unwrap_or_default();
                request.fork = false;
                warn!(claude_session_id = %id, "session to resume not found; starting a new session");
                prepared.resume_failed = Some(format!(
                    "no conversation with session id {id} was found on this worker; started a new session"
                ));
            }
            RunEnd::ResumeNotFound => {
                // Already fell back once: never loop.
                return Ok(AttemptEnd::Failed(AttemptFailure::new(
                    ErrorKind::Internal,
                    "the CLI could not find a session it had just started",
                    true,
                )));
            }
        }
    }
}

/// Starts the turn on the session's warm process (taken from `prepared`),
/// else on a new CLI. Returns the process and, if warm, its turns so far.
/// Writing the prompt never waits (see `CliProcess`).
async fn start(
    ctx: &Context,
    prepared: &mut Prepared,
    events: &JobEvents<'_>,
) -> Result<(CliProcess, Option<u64>), AttemptFailure> {
    if let Some(w) = prepared.warm.take() {
        let mut proc = w.proc;
        match proc.try_send_user_message(&prepared.request) {
            Ok(()) => {
                debug!(pid = proc.pid(), "turn sent to the warm CLI process");
                return Ok((proc, Some(w.turns)));
            }
            Err(e) => ctx
                .warm
                .record_broken(&events.session_key, &format!("writing the prompt: {e}")),
        }
    }
    let mut proc = CliProcess::spawn(&ctx.settings.claude, &prepared.profile, &prepared.request)
        .await
        .map_err(|e| {
            let retryable = e.may_pass();
            AttemptFailure::new(ErrorKind::Spawn, e.to_string(), retryable)
        })?;
    ctx.warm.record_spawn();
    debug!(pid = proc.pid(), resume = ?prepared.request.resume, "CLI started");
    proc.send_user_message(&prepared.request);
    Ok((proc, None))
}
