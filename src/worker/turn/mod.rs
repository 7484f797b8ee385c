//! One job's lifecycle under a session lease: attempts with retry, the
//! events they publish, and the outcome the database records.
//!
//! Every event is fenced: its seq is recorded under the lease epoch before
//! it is published, so a worker that lost the session publishes nothing.

pub(crate) mod retry;

use std::collections::HashSet;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::time::timeout_at;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::broker::publish::{Attribution, PublishError};
use crate::claude::warm::{WarmProcess, WARM_RESPONSE_TIMEOUT};
use crate::claude::{self, CliMessage, CliProcess, TurnRequest, TurnResult};
use crate::protocol::{ErrorKind, EventBody, EventV1, SessionMode, PROTOCOL_VERSION};
use crate::store::{now_ms, JobFinish, JobRecord, JobStatus, Lease, SessionUpdate, StoreError};
use crate::worker::context::Context;
use crate::worker::control::{self, CancelReason, TurnRegistration};
use crate::worker::turn::retry::AttemptFailure;

/// How long a CLI gets to exit after its result before its group is killed.
const EXIT_GRACE: Duration = Duration::from_secs(5);
/// Each step of interrupting a turn (control request, SIGINT, SIGTERM)
/// gets this long before the next, harsher one.
const INTERRUPT_GRACE: Duration = Duration::from_secs(3);

/// Why a job stopped without an outcome. The job stays in the database
/// (running or requeued) and runs again later, here or elsewhere.
#[derive(Debug, thiserror::Error)]
pub enum TurnAbort {
    #[error("the session's lease was lost")]
    LeaseLost,
    #[error("the worker is shutting down")]
    Shutdown,
    #[error(transparent)]
    Store(StoreError),
    #[error(transparent)]
    Publish(#[from] PublishError),
}

impl From<StoreError> for TurnAbort {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::LeaseLost { .. } => TurnAbort::LeaseLost,
            other => TurnAbort::Store(other),
        }
    }
}

/// Signals a running job watches.
#[derive(Clone)]
pub struct Stop {
    /// The heartbeat found the lease gone: stop at once, publish nothing.
    pub lease_lost: CancellationToken,
    /// Shutdown's grace period is over: kill the turn, requeue the job.
    pub kill: CancellationToken,
    /// Until when (Unix ms, with a safety margin) the lease is surely ours,
    /// as of its last renewal. An event is published only before this, so
    /// a worker that was paused past its lease publishes nothing even if
    /// it wakes between the fenced `record_seq` and the publish.
    pub lease_valid_until: Arc<AtomicI64>,
}

impl Stop {
    fn lease_fresh(&self) -> bool {
        now_ms() < self.lease_valid_until.load(Ordering::SeqCst)
    }
}

/// Publishes a job's events in order, fenced by the lease.
struct JobEvents<'a> {
    ctx: &'a Context,
    lease: &'a Lease,
    stop: &'a Stop,
    job_id: String,
    session_key: String,
    reply_to: String,
    metadata: Value,
    next_seq: u64,
    attempt: u32,
    /// This job in the worker's registry of running turns (cancel, control).
    turn: TurnRegistration,
}

impl JobEvents<'_> {
    fn event(&self, body: EventBody) -> EventV1 {
        EventV1 {
            v: PROTOCOL_VERSION,
            job_id: self.job_id.clone(),
            session_key: self.session_key.clone(),
            seq: self.next_seq,
            attempt: self.attempt,
            body,
            metadata: self.metadata.clone(),
        }
    }

    async fn emit(&mut self, body: EventBody) -> Result<(), TurnAbort> {
        if self.stop.lease_lost.is_cancelled() {
            return Err(TurnAbort::LeaseLost);
        }
        let event = self.event(body);
        let bytes = serde_json::to_vec(&event).expect("events serialise");
        self.ctx
            .store
            .record_seq(self.lease, &self.job_id, self.next_seq + 1)
            .await?;
        if !self.stop.lease_fresh() {
            return Err(TurnAbort::LeaseLost);
        }
        self.ctx
            .sink
            .publish_event_as(&self.reply_to, &event, &bytes, &self.attribution())
            .await?;
        self.next_seq += 1;
        Ok(())
    }

    /// Records the outcome, then publishes the terminal event. The database
    /// commits first: a job is never run again once it has an outcome.
    async fn finish(
        &mut self,
        status: JobStatus,
        body: EventBody,
        error: Option<String>,
        session_update: Option<SessionUpdate>,
    ) -> Result<(), TurnAbort> {
        if self.stop.lease_lost.is_cancelled() {
            return Err(TurnAbort::LeaseLost);
        }
        let event = self.event(body);
        let bytes = serde_json::to_vec(&event).expect("events serialise");
        let finish = JobFinish {
            job_id: self.job_id.clone(),
            status,
            error,
            terminal_event: String::from_utf8(bytes.clone()).expect("JSON is UTF-8"),
            next_seq: self.next_seq + 1,
            session_update,
            now_ms: now_ms(),
        };
        self.ctx.store.finish_job(self.lease, &finish).await?;
        self.next_seq += 1;
        let from = self.attribution();
        publish_terminal(self.ctx, &self.reply_to, &event, &bytes, self.stop, &from).await;
        Ok(())
    }

    fn attribution(&self) -> Attribution<'_> {
        Attribution {
            worker_id: &self.ctx.worker_id,
            lease_epoch: self.lease.epoch,
        }
    }
}

/// The outcome is already recorded, so the terminal event must get out:
/// keep trying through broker outages until it does or the worker stops.
async fn publish_terminal(
    ctx: &Context,
    reply_to: &str,
    event: &EventV1,
    bytes: &[u8],
    stop: &Stop,
    from: &Attribution<'_>,
) {
    let mut delay = Duration::from_millis(200);
    loop {
        match ctx
            .sink
            .publish_event_as(reply_to, event, bytes, from)
            .await
        {
            Ok(()) => return,
            Err(e) => {
                warn!(error = %e, job_id = %event.job_id, "publishing a terminal event failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.kill.cancelled() => {
                        warn!(job_id = %event.job_id, "terminal event not published before shutdown; \
                              re-publishing the job with the same job_id returns it");
                        return;
                    }
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// How one attempt ended.
enum AttemptEnd {
    Completed {
        result: TurnResult,
        init: Option<InitInfo>,
        /// The still-running CLI and the turns it has run, when it may go
        /// back to the warm pool.
        live: Option<(Box<CliProcess>, u64)>,
    },
    Failed(AttemptFailure),
    /// The CLI could not find the session it was asked to resume.
    ResumeNotFound,
    /// Cancelled by a control message (or a newer job's on_busy=interrupt).
    Cancelled {
        init: Option<InitInfo>,
    },
    /// A warm process did not start the turn; it is replaced by a cold start.
    WarmBroken(&'static str),
}

#[derive(Clone)]
struct InitInfo {
    session_id: String,
    model: Option<String>,
}

/// Runs a job to its outcome (or aborts, leaving it for later).
pub async fn run_job(
    ctx: &Context,
    lease: &Lease,
    job: JobRecord,
    stop: &Stop,
) -> Result<(), TurnAbort> {
    let spec = job.spec.clone();
    let reply_to = spec
        .reply_to
        .clone()
        .unwrap_or_else(|| job.session_key.clone());
    let mut events = JobEvents {
        ctx,
        lease,
        stop,
        job_id: job.job_id.clone(),
        session_key: job.session_key.clone(),
        reply_to,
        metadata: spec.metadata.clone(),
        next_seq: job.next_seq,
        attempt: job.attempts,
        turn: ctx.running.register(&job.job_id, &job.session_key),
    };
    let Some(profile) = ctx.settings.profiles.get(&spec.profile).cloned() else {
        // The profile was removed from the config after the job was accepted.
        let msg = format!(
            "profile `{}` no longer exists in this worker's configuration",
            spec.profile
        );
        return events
            .finish(
                JobStatus::Failed,
                EventBody::Failed {
                    error: ErrorKind::InvalidInput,
                    message: msg.clone(),
                    retryable: false,
                },
                Some(msg),
                None,
            )
            .await;
    };

    // A job found running, or queued after an earlier attempt, lost its
    // worker: that counts as a failed attempt.
    if job.attempts > 0 {
        // Running: its worker died. Queued: its worker handed it back
        // (shutdown, or the database or broker failed mid-turn).
        let reason = if job.status == JobStatus::Running {
            "worker_lost"
        } else {
            "interrupted"
        };
        if job.attempts >= ctx.retry.max_attempts() {
            let msg = format!(
                "the job's worker was lost and its {} attempts are used up",
                job.attempts
            );
            return events
                .finish(
                    JobStatus::Failed,
                    EventBody::Failed {
                        error: ErrorKind::WorkerLost,
                        message: msg.clone(),
                        retryable: true,
                    },
                    Some(msg),
                    None,
                )
                .await;
        }
        events
            .emit(EventBody::Retrying {
                next_attempt: job.attempts + 1,
                delay_ms: 0,
                reason: reason.into(),
            })
            .await?;
    }

    let session = ctx.store.get_session(&job.session_key).await?;
    let known_id = session.as_ref().and_then(|s| s.claude_session_id.clone());
    let (resume, fork) = match spec.mode {
        SessionMode::Continue => (known_id, false),
        SessionMode::New => (None, false),
        SessionMode::Resume => (spec.claude_session_id.clone(), false),
        SessionMode::Fork => (spec.claude_session_id.clone().or(known_id), true),
    };
    let cwd = claude::session_dir(&profile.workdir, &job.session_key);
    let mut options = spec.options();
    // A mode set at runtime (set_permission_mode) holds for later turns.
    if let Some(mode) = session.as_ref().and_then(|s| s.permission_mode) {
        options.permission_mode = mode;
    }
    let mut request = TurnRequest {
        prompt: spec.prompt.clone(),
        cwd: cwd.clone(),
        resume,
        fork,
        options,
    };
    let first_started = Instant::now()
        - Duration::from_millis(
            job.started_at_ms
                .map(|t| (now_ms() - t).max(0) as u64)
                .unwrap_or(0),
        );
    let mut resume_failed: Option<String> = None;
    let mut warm = ctx
        .warm
        .acquire(
            &spec.profile,
            &profile,
            &request,
            &job.session_key,
            session.as_ref(),
        )
        .await;
    if let (None, Some(id)) = (&warm, &request.resume) {
        // A cold resume: the session may have run on another worker, so
        // fetch its stored transcript. (A warm process has it already.)
        crate::worker::transcript::materialise(ctx, &profile, &cwd, id).await;
    }

    loop {
        let attempt = match ctx.store.start_attempt(lease, &job.job_id, now_ms()).await {
            Ok(a) => a,
            // Cancelled (or otherwise ended) while it waited: nothing to run.
            Err(StoreError::NotRunnable(_)) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        events.attempt = attempt;
        let started = Instant::now();
        let end = run_attempt(
            ctx,
            &profile,
            &mut request,
            &mut resume_failed,
            &mut warm,
            &mut events,
        )
        .await?;
        let duration_ms = started.elapsed().as_millis() as u64;
        match end {
            AttemptEnd::Cancelled { init } => {
                let reason = events.turn.cancel_reason();
                info!(attempt, duration_ms, reason = %reason.text, "job cancelled");
                // The interrupted turn is in the transcript: the key keeps it.
                let update = init.map(|i| SessionUpdate {
                    claude_session_id: i.session_id,
                    cwd: cwd.display().to_string(),
                    model: i.model,
                    input_tokens: 0,
                    output_tokens: 0,
                    cost_usd: 0.0,
                });
                return finish_cancelled(&mut events, reason, update).await;
            }
            AttemptEnd::Completed { result, init, live } => {
                let claude_session_id = result
                    .session_id
                    .clone()
                    .or_else(|| init.as_ref().map(|i| i.session_id.clone()));
                let usage = result.usage.clone();
                let tokens = |k: &str| usage.get(k).and_then(Value::as_i64).unwrap_or(0);
                let update = claude_session_id.clone().map(|id| SessionUpdate {
                    claude_session_id: id,
                    cwd: cwd.display().to_string(),
                    model: init.as_ref().and_then(|i| i.model.clone()),
                    input_tokens: tokens("input_tokens"),
                    output_tokens: tokens("output_tokens"),
                    cost_usd: result.total_cost_usd,
                });
                info!(
                    attempt,
                    duration_ms,
                    num_turns = result.num_turns,
                    "job completed"
                );
                if let Some(id) = &claude_session_id {
                    // Before the outcome, so the next turn finds it anywhere.
                    crate::worker::transcript::save(ctx, lease, &profile, &cwd, id).await?;
                }
                events
                    .finish(
                        JobStatus::Succeeded,
                        EventBody::Completed {
                            result: result.result.clone().unwrap_or_default(),
                            claude_session_id: claude_session_id.clone(),
                            usage,
                            total_cost_usd: result.total_cost_usd,
                            duration_ms: if result.duration_ms > 0 {
                                result.duration_ms
                            } else {
                                duration_ms
                            },
                            num_turns: result.num_turns,
                        },
                        None,
                        update,
                    )
                    .await?;
                // Only now, with the outcome recorded, may the process
                // serve the session's next turn. Without warm reuse it
                // exits here, off the `completed` event's path but before
                // the session's next turn can resume its transcript.
                match (live, claude_session_id) {
                    (Some((proc, turns)), Some(id)) if ctx.warm.enabled() => {
                        let mut warm = WarmProcess::new(
                            *proc,
                            &job.session_key,
                            &spec.profile,
                            &profile,
                            &request,
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
                return Ok(());
            }
            AttemptEnd::ResumeNotFound | AttemptEnd::WarmBroken(_) => {
                unreachable!("run_attempt resolves it")
            }
            AttemptEnd::Failed(failure) => {
                let next = attempt + 1;
                let delay = if failure.retryable {
                    ctx.retry.delay_before(next, first_started.elapsed())
                } else {
                    None
                };
                match delay {
                    Some(delay) => {
                        warn!(attempt, duration_ms, error = %failure.message, delay_ms = delay.as_millis() as u64,
                              "attempt failed; retrying");
                        events
                            .emit(EventBody::Retrying {
                                next_attempt: next,
                                delay_ms: delay.as_millis() as u64,
                                reason: failure.message.clone(),
                            })
                            .await?;
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = events.turn.cancel.cancelled() => {
                                let reason = events.turn.cancel_reason();
                                                                return finish_cancelled(&mut events, reason, None).await;
                            }
                            _ = events.stop.lease_lost.cancelled() => return Err(TurnAbort::LeaseLost),
                            _ = events.stop.kill.cancelled() => return Err(TurnAbort::Shutdown),
                        }
                    }
                    None => {
                        warn!(attempt, duration_ms, error = %failure.message, kind = ?failure.kind, "job failed");
                        return events
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
                            .await;
                    }
                }
            }
        }
    }
}

/// Ends a cancelled job; after a session-wide cancel, its queued jobs go
/// too, before this worker could start the next one.
async fn finish_cancelled(
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
        control::cancel_session_jobs(events.ctx, &events.session_key, &reason.text)
            .await
            .map_err(|e| match e {
                control::ControlError::Store(e) => TurnAbort::from(e),
                control::ControlError::Publish(e) => TurnAbort::from(e),
            })?;
    }
    Ok(())
}

/// One attempt: spawn, stream, classify. If the session to resume does not
/// exist, starts a new one once (noted in `started`) instead of failing.
async fn run_attempt(
    ctx: &Context,
    profile: &crate::config::Profile,
    request: &mut TurnRequest,
    resume_failed: &mut Option<String>,
    warm: &mut Option<WarmProcess>,
    events: &mut JobEvents<'_>,
) -> Result<AttemptEnd, TurnAbort> {
    let deadline = tokio::time::Instant::now() + ctx.settings.turn_timeout();
    loop {
        // A warm process (the session's CLI, idle since its last turn) is
        // tried first; if it does not start the turn it is dropped (killed)
        // before any event was published, and the turn starts cold.
        let mut warm_turns: Option<u64> = None;
        let mut proc = match warm.take() {
            Some(w) => {
                let mut proc = w.proc;
                match proc.try_send_user_message(&request.prompt).await {
                    Ok(()) => {
                        warm_turns = Some(w.turns);
                        debug!(pid = proc.pid(), "turn sent to the warm CLI process");
                        proc
                    }
                    Err(e) => {
                        ctx.warm
                            .record_broken(&w.session_key, &format!("writing the prompt: {e}"));
                        continue;
                    }
                }
            }
            None => {
                let mut proc = match CliProcess::spawn(&ctx.settings.claude, profile, request).await
                {
                    Ok(p) => p,
                    Err(e) => {
                        let retryable = e.may_pass();
                        return Ok(AttemptEnd::Failed(AttemptFailure::new(
                            ErrorKind::Spawn,
                            e.to_string(),
                            retryable,
                        )));
                    }
                };
                ctx.warm.record_spawn();
                debug!(pid = proc.pid(), resume = ?request.resume, "CLI started");
                proc.send_user_message(&request.prompt).await;
                proc
            }
        };
        // A warm process must start the turn (`init`) promptly.
        let warm_deadline = warm_turns.map(|_| tokio::time::Instant::now() + WARM_RESPONSE_TIMEOUT);
        let mut init: Option<InitInfo> = None;
        // Assistant messages whose text arrived as deltas.
        let mut streamed: HashSet<String> = HashSet::new();
        let outcome = loop {
            let until = match warm_deadline {
                Some(w) if init.is_none() => w.min(deadline),
                _ => deadline,
            };
            let msg = tokio::select! {
                m = timeout_at(until, proc.next_message()) => match m {
                    Ok(m) => m,
                    Err(_) if warm_turns.is_some() && init.is_none() => break AttemptEnd::WarmBroken("no init"),
                    Err(_) => {
                        proc.terminate(Duration::from_secs(2)).await;
                        let secs = ctx.settings.claude.turn_timeout_secs;
                        break AttemptEnd::Failed(AttemptFailure::new(
                            ErrorKind::Timeout, format!("the turn ran longer than {secs} s"), true));
                    }
                },
                _ = events.stop.lease_lost.cancelled() => {
                    proc.terminate(Duration::from_secs(2)).await;
                    return Err(TurnAbort::LeaseLost);
                }
                _ = events.stop.kill.cancelled() => {
                    proc.terminate(Duration::from_secs(2)).await;
                    return Err(TurnAbort::Shutdown);
                }
                _ = events.turn.cancel.cancelled() => {
                    let graceful = proc.interrupt(INTERRUPT_GRACE).await;
                    debug!(graceful, "turn interrupted");
                    break AttemptEnd::Cancelled { init: init.clone() };
                }
                Some(request) = events.turn.cli_requests.recv() => {
                    proc.send_control_request(request).await;
                    continue;
                }
            };
            if warm_turns.is_some() && init.is_none() {
                match &msg {
                    Some(CliMessage::Init { .. }) | Some(CliMessage::Other) => {}
                    Some(CliMessage::ControlResponse { .. }) => {}
                    None => break AttemptEnd::WarmBroken("the process exited"),
                    Some(_) => break AttemptEnd::WarmBroken("turn output before init"),
                }
            }
            match msg {
                Some(CliMessage::Init {
                    session_id,
                    model,
                    permission_mode,
                }) => {
                    if init.is_none() {
                        if let Some(turns) = warm_turns {
                            ctx.warm.record_hit(&events.session_key, turns + 1);
                        }
                        init = Some(InitInfo {
                            session_id: session_id.clone(),
                            model: model.clone(),
                        });
                        events
                            .emit(EventBody::Started {
                                claude_session_id: Some(session_id),
                                resumed: request.resume.is_some() && !request.fork,
                                resume_failed: resume_failed.clone(),
                                model,
                                permission_mode,
                            })
                            .await?;
                    }
                }
                Some(CliMessage::TextDelta { message_id, text }) => {
                    streamed.extend(message_id);
                    events.emit(EventBody::Text { text }).await?
                }
                Some(CliMessage::Assistant {
                    message_id,
                    text,
                    tool_uses,
                }) => {
                    // After a broken stream the CLI retries without
                    // streaming: the text then arrives only here.
                    let was_streamed = message_id.as_ref().is_some_and(|id| streamed.contains(id));
                    if !text.is_empty() && !was_streamed {
                        events.emit(EventBody::Text { text }).await?;
                    }
                    for (name, input) in tool_uses {
                        let input_summary = claude::summarize_tool_input(&input);
                        events
                            .emit(EventBody::ToolUse {
                                name,
                                input_summary,
                            })
                            .await?;
                    }
                }
                Some(CliMessage::ApiRetry {
                    attempt,
                    error_status,
                    error,
                }) => {
                    debug!(cli_attempt = attempt, ?error_status, %error, "the CLI is retrying an API call");
                }
                Some(CliMessage::Result(result)) => {
                    let ok = !result.is_error && result.subtype == "success";
                    if ok && init.is_some() {
                        // Kept alive for the session's next turn, or left
                        // to exit once the outcome is recorded.
                        break AttemptEnd::Completed {
                            result,
                            init: init.clone(),
                            live: Some((Box::new(proc), warm_turns.unwrap_or(0) + 1)),
                        };
                    }
                    let _ = proc.finish(EXIT_GRACE).await;
                    if ok {
                        break AttemptEnd::Completed {
                            result,
                            init: init.clone(),
                            live: None,
                        };
                    }
                    if init.is_none() && request.resume.is_some() && resume_not_found(&result) {
                        break AttemptEnd::ResumeNotFound;
                    }
                    break AttemptEnd::Failed(AttemptFailure::from_result(&result));
                }
                Some(CliMessage::Other) | Some(CliMessage::ControlResponse { .. }) => {}
                None => {
                    let status = proc.finish(EXIT_GRACE).await;
                    let stderr = proc.stderr_tail().await;
                    let mut msg = format!("the Claude CLI ended without a result ({status})");
                    if !stderr.is_empty() {
                        msg.push_str(": ");
                        msg.push_str(&stderr);
                    }
                    break AttemptEnd::Failed(AttemptFailure::new(
                        ErrorKind::CliCrashed,
                        msg,
                        true,
                    ));
                }
            }
        };
        match outcome {
            AttemptEnd::WarmBroken(why) => {
                // Nothing was published for it; the process is killed
                // when `proc` goes out of scope.
                ctx.warm.record_broken(&events.session_key, why);
                continue;
            }
            AttemptEnd::ResumeNotFound if resume_failed.is_none() => {
                let id = request.resume.take().unwrap_or_default();
                request.fork = false;
                warn!(claude_session_id = %id, "session to resume not found; starting a new session");
                *resume_failed = Some(format!(
                    "no conversation with session id {id} was found on this worker; started a new session"
                ));
                continue;
            }
            AttemptEnd::ResumeNotFound => {
                // Already fell back once: never loop.
                return Ok(AttemptEnd::Failed(AttemptFailure::new(
                    ErrorKind::Internal,
                    "the CLI could not find a session it had just started",
                    true,
                )));
            }
            other => return Ok(other),
        }
    }
}

fn resume_not_found(r: &TurnResult) -> bool {
    let text = |s: &str| s.contains("No conversation found");
    r.errors.iter().any(|e| text(e)) || r.result.as_deref().is_some_and(text)
}
