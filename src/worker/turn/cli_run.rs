//! One CLI run: its output becomes events, while the turn's deadline,
//! cancel, lease loss and shutdown are watched at every wait.

use std::collections::HashSet;

use serde_json::Value;
use tokio::time::{timeout_at, Instant};
use tracing::debug;

use super::attempt::{AttemptEnd, InitInfo, RunEnd};
use super::events::JobEvents;
use super::prepare::Prepared;
use super::prompt::Prompts;
use super::retry::AttemptFailure;
use super::spoken::Spoken;
use super::{TurnAbort, EXIT_GRACE, INTERRUPT_ANSWER, INTERRUPT_GRACE, STOP_GRACE};
use crate::claude::warm::WARM_RESPONSE_TIMEOUT;
use crate::claude::{self, CliMessage, CliProcess, TurnResult};
use crate::protocol::{ErrorKind, EventBody, PermissionResponseV1};
use crate::worker::context::Context;

pub(super) struct CliRun {
    proc: CliProcess,
    /// Turns the process ran before, if it is a warm one.
    warm_turns: Option<u64>,
    /// A warm process must start the turn (`init`) by this.
    warm_deadline: Option<Instant>,
    deadline: Instant,
    init: Option<InitInfo>,
    /// Assistant messages whose text arrived as deltas.
    streamed: HashSet<String>,
    /// The text published so far, to restate after a cut stream.
    spoken: Spoken,
    /// Permission prompts waiting for a person.
    prompts: Prompts,
}

/// What the run waits for, whichever comes first.
enum Input {
    Message(Option<CliMessage>),
    TimedOut,
    LeaseLost,
    Kill,
    Cancel,
    /// A stream-json control request for the CLI (e.g. set_permission_mode).
    ControlRequest(Value),
    /// Text held back to join deltas is due.
    FlushText,
    /// A person answered a prompt.
    PromptAnswer(PermissionResponseV1),
    /// A prompt may have expired; the lease is kept meanwhile.
    PromptTick,
}

impl CliRun {
    pub fn new(proc: CliProcess, warm_turns: Option<u64>, deadline: Instant) -> CliRun {
        CliRun {
            proc,
            warm_deadline: warm_turns.map(|_| Instant::now() + WARM_RESPONSE_TIMEOUT),
            warm_turns,
            deadline,
            init: None,
            streamed: HashSet::new(),
            spoken: Spoken::default(),
            prompts: Prompts::default(),
        }
    }

    pub async fn drive(
        mut self,
        ctx: &Context,
        prepared: &Prepared,
        events: &mut JobEvents<'_>,
    ) -> Result<RunEnd, TurnAbort> {
        loop {
            let msg = match self.next_input(events).await {
                Input::Message(m) => {
                    events.stop.progressed();
                    m
                }
                Input::TimedOut => return Ok(self.timed_out(ctx).await),
                Input::LeaseLost => {
                    self.proc.terminate(STOP_GRACE).await;
                    return Err(TurnAbort::LeaseLost);
                }
                Input::Kill => {
                    self.proc.terminate(STOP_GRACE).await;
                    return Err(TurnAbort::Shutdown);
                }
                Input::Cancel => {
                    self.prompts.cancel_all(events).await?;
                    let graceful = self.proc.interrupt(INTERRUPT_ANSWER, INTERRUPT_GRACE).await;
                    events.spent_usd += self.proc.take_cost();
                    debug!(graceful, "turn interrupted");
                    let init = self.init;
                    return Ok(RunEnd::Attempt(AttemptEnd::Cancelled { init }));
                }
                Input::ControlRequest(request) => {
                    self.proc.send_control_request(request);
                    continue;
                }
                Input::FlushText => {
                    events.flush_text().await?;
                    continue;
                }
                Input::PromptAnswer(answer) => {
                    let (proc, init) = (&mut self.proc, self.init.as_ref());
                    let claude_session = init.map(|i| i.session_id.as_str());
                    let answered = self.prompts.on_answer(proc, events, answer, claude_session);
                    answered.await?;
                    continue;
                }
                Input::PromptTick => {
                    events.stop.progressed();
                    let (proc, profile) = (&mut self.proc, &prepared.profile);
                    self.prompts.expire(proc, profile, events).await?;
                    continue;
                }
            };
            if let Some(why) = self.warm_broken(&msg) {
                return Ok(RunEnd::WarmBroken(why));
            }
            match msg {
                Some(CliMessage::Result(result)) => {
                    events.spent_usd += self.proc.take_cost();
                    return Ok(self.on_result(prepared, result).await);
                }
                None => return Ok(self.on_exit().await),
                Some(m) => self.on_message(ctx, prepared, events, m).await?,
            }
        }
    }

    async fn next_input(&mut self, events: &mut JobEvents<'_>) -> Input {
        // A person's time does not count against the turn's deadline.
        let deadline = self.deadline + self.prompts.waited();
        let until = match self.warm_deadline {
            Some(w) if self.init.is_none() => w.min(deadline),
            _ => deadline,
        };
        let asking = self.prompts.next_wake();
        let until = asking.unwrap_or(until);
        let stop = events.stop;
        let flush_at = events.flush_at();
        let turn = &mut events.turn;
        tokio::select! {
            _ = tokio::time::sleep_until(flush_at.unwrap_or(until)), if flush_at.is_some() => Input::FlushText,
            m = timeout_at(until, self.proc.next_message()) => match m {
                Ok(m) => Input::Message(m),
                Err(_) if asking.is_some() => Input::PromptTick,
                Err(_) => Input::TimedOut,
            },
            _ = stop.lease_lost.cancelled() => Input::LeaseLost,
            _ = stop.kill.cancelled() => Input::Kill,
            _ = turn.cancel.cancelled() => Input::Cancel,
            Some(request) = turn.cli_requests.recv() => Input::ControlRequest(request),
            Some(answer) = turn.prompt_answers.recv() => Input::PromptAnswer(answer),
        }
    }

    /// A warm process must answer the prompt with `init` before anything
    /// of the turn; otherwise it is replaced by a cold start.
    fn warm_broken(&self, msg: &Option<CliMessage>) -> Option<&'static str> {
        if self.warm_turns.is_none() || self.init.is_some() {
            return None;
        }
        match msg {
            Some(
                CliMessage::Init { .. }
                | CliMessage::Other
                | CliMessage::ControlResponse { .. }
                | CliMessage::CompactBoundary { .. },
            ) => None,
            None => Some("the process exited"),
            Some(_) => Some("turn output before init"),
        }
    }

    async fn timed_out(mut self, ctx: &Context) -> RunEnd {
        if self.warm_turns.is_some() && self.init.is_none() {
            return RunEnd::WarmBroken("no init");
        }
        self.proc.terminate(STOP_GRACE).await;
        let secs = ctx.settings.claude.turn_timeout_secs;
        RunEnd::Attempt(AttemptEnd::Failed(AttemptFailure::new(
            ErrorKind::Timeout,
            format!("the turn ran longer than {secs} s"),
            true,
        )))
    }

    async fn on_message(
        &mut self,
        ctx: &Context,
        prepared: &Prepared,
        events: &mut JobEvents<'_>,
        msg: CliMessage,
    ) -> Result<(), TurnAbort> {
        match msg {
            CliMessage::Init {
                session_id,
                model,
                permission_mode,
            } => {
                self.on_init(ctx, prepared, events, session_id, model, permission_mode)
                    .await
            }
            CliMessage::TextDelta {
                message_id,
                index,
                text,
            } => {
                self.spoken.push(message_id.as_deref(), index, &text);
                self.streamed.extend(message_id);
                events.emit(EventBody::Text { text }).await
            }
            CliMessage::Abandoned {
                message_id,
                from_block_index,
            } => {
                self.on_abandoned(events, &message_id, from_block_index)
                    .await
            }
            CliMessage::Assistant {
                message_id,
                text,
                tool_uses,
            } => self.on_assistant(events, message_id, text, tool_uses).await,
            CliMessage::CompactBoundary {
                trigger,
                pre_tokens,
                post_tokens,
            } => {
                events
                    .emit(super::compact::from_cli(&trigger, pre_tokens, post_tokens))
                    .await
            }
            CliMessage::ApiRetry {
                attempt,
                error_status,
                error,
            } => {
                debug!(cli_attempt = attempt, ?error_status, %error, "the CLI is retrying an API call");
                Ok(())
            }
            CliMessage::CanUseTool(request) => {
                let (proc, profile) = (&mut self.proc, &prepared.profile);
                self.prompts.ask(proc, profile, events, request).await
            }
            CliMessage::ControlCancel { request_id } => {
                self.prompts.withdrawn(events, &request_id).await
            }
            // A `/compact` prompt's or the CLI's own failed compaction: the
            // CLI says so in the turn's text; the turn goes on.
            CliMessage::Result(_)
            | CliMessage::Other
            | CliMessage::ControlResponse { .. }
            | CliMessage::CompactFailed { .. } => Ok(()),
        }
    }

    /// The first `init` of the run starts the job's `started` event.
    async fn on_init(
        &mut self,
        ctx: &Context,
        prepared: &Prepared,
        events: &mut JobEvents<'_>,
        session_id: String,
        model: Option<String>,
        permission_mode: Option<String>,
    ) -> Result<(), TurnAbort> {
        if self.init.is_some() {
            return Ok(());
        }
        if let Some(turns) = self.warm_turns {
            ctx.warm.record_hit(&events.session_key, turns + 1);
        }
        self.init = Some(InitInfo {
            session_id: session_id.clone(),
            model: model.clone(),
        });
        let request = &prepared.request;
        events
            .emit(EventBody::Started {
                claude_session_id: Some(session_id),
                resumed: request.resume.is_some() && !request.fork,
                resume_failed: prepared.resume_failed.clone(),
                model,
                permission_mode,
            })
            .await
    }

    async fn on_assistant(
        &mut self,
        events: &mut JobEvents<'_>,
        message_id: Option<String>,
        text: String,
        tool_uses: Vec<(String, Value)>,
    ) -> Result<(), TurnAbort> {
        // The message is complete, so no delta is left to join the held
        // text: it goes out now, and its confirm is usually back before the
        // `result` line, which then need not wait for it.
        events.flush_text().await?;
        // After a broken stream the CLI retries without streaming: the text
        // then arrives only here.
        let was_streamed = message_id
            .as_ref()
            .is_some_and(|id| self.streamed.contains(id));
        if !text.is_empty() && !was_streamed {
            self.spoken.push(message_id.as_deref(), 0, &text);
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
        Ok(())
    }

    /// A cut API stream the CLI retries within the attempt: take back what
    /// it said in the abandoned blocks and restate the rest (see `spoken`).
    async fn on_abandoned(
        &mut self,
        events: &mut JobEvents<'_>,
        message_id: &str,
        from_block_index: u64,
    ) -> Result<(), TurnAbort> {
        let Some(rest) = self.spoken.abandon(message_id, from_block_index) else {
            return Ok(());
        };
        debug!("the API stream was cut mid-answer; the CLI retries it");
        events
            .emit(EventBody::TextReset {
                reason: "the API stream was cut mid-answer and the CLI retried it".into(),
            })
            .await?;
        if !rest.is_empty() {
            events.emit(EventBody::Text { text: rest }).await?;
        }
        Ok(())
    }

    async fn on_result(self, prepared: &Prepared, result: TurnResult) -> RunEnd {
        let CliRun {
            mut proc,
            init,
            warm_turns,
            ..
        } = self;
        let ok = !result.is_error && result.subtype == "success";
        if ok && init.is_some() {
            // Kept alive for the session's next turn, or left to exit once
            // the outcome is recorded.
            let live = Some((Box::new(proc), warm_turns.unwrap_or(0) + 1));
            return RunEnd::Attempt(AttemptEnd::Completed { result, init, live });
        }
        let _ = proc.finish(EXIT_GRACE).await;
        if ok {
            return RunEnd::Attempt(AttemptEnd::Completed {
                result,
                init,
                live: None,
            });
        }
        if init.is_none() && prepared.request.resume.is_some() && resume_not_found(&result) {
            return RunEnd::ResumeNotFound;
        }
        RunEnd::Attempt(AttemptEnd::Failed(AttemptFailure::from_result(&result)))
    }

    async fn on_exit(self) -> RunEnd {
        let mut proc = self.proc;
        let status = proc.finish(EXIT_GRACE).await;
        let stderr = proc.stderr_tail().await;
        let mut msg = format!("the Claude CLI ended without a result ({status})");
        if !stderr.is_empty() {
            msg.push_str(": ");
            msg.push_str(&stderr);
        }
        RunEnd::Attempt(AttemptEnd::Failed(AttemptFailure::new(
            ErrorKind::CliCrashed,
            msg,
            true,
        )))
    }
}

fn resume_not_found(r: &TurnResult) -> bool {
    let text = |s: &str| s.contains("No conversation found");
    r.errors.iter().any(|e| text(e)) || r.result.as_deref().is_some_and(text)
}
