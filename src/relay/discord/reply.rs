//! One reply per job: a task that follows the job's events (from the
//! durable queue, in `seq` order) and edits the placeholder the relay
//! posted, coalescing text at a bounded rate, until the terminal event
//! makes the final edit. Everything it needs is in the event's `metadata`,
//! so a relay that restarts mid-answer carries on from the events.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};
use twilight_model::id::Id;

use super::prompt::{self, JobPrompts};
use super::render::{self, Throttle};
use super::rest::{ChannelId, MessageId, RestError};
use super::route::ReplyMeta;
use super::Shared;
use crate::client::{Ack, JobTracker, Step};
use crate::protocol::{EventBody, EventV1};

/// One event for a reply task, with its ack (sent once it is applied).
pub struct Input {
    pub event: EventV1,
    pub lease_epoch: Option<i64>,
    pub ack: Option<Ack>,
}

/// The typing indicator gives up after this long (a job queued that long
/// shows its placeholder alone).
const TYPING_MAX: Duration = Duration::from_secs(600);

/// A reply that hears nothing for this long stops (its job's later events
/// start a new one).
const IDLE: Duration = Duration::from_secs(3600);

struct Reply {
    job_id: String,
    channel: ChannelId,
    message: MessageId,
    tracker: JobTracker,
    /// The last tool call (or retry line), shown under the text.
    tool: Option<String>,
    throttle: Throttle,
    /// Something changed since the last edit.
    dirty: bool,
    /// What the message shows now.
    shown: String,
    /// Text is on its way: no more typing indicator (it shows while the
    /// job waits in a queue, starts, or runs tools before saying anything).
    talking: bool,
    /// Discord refused this reply for good: nothing more to show.
    gone: bool,
    /// The acks of the events applied so far, sent once the job's terminal
    /// event is shown: until then a restarted relay gets them all again.
    held: Vec<Ack>,
    /// Its permission prompts (messages of their own, after the reply).
    prompts: Option<JobPrompts>,
}

/// Follows one job until its terminal event (or shutdown, which leaves
/// unapplied events unacked for the next relay).
pub async fn run(
    shared: std::sync::Arc<Shared>,
    job_id: String,
    meta: ReplyMeta,
    mut rx: mpsc::UnboundedReceiver<Input>,
) {
    let (Some(channel), Some(message)) = (
        Id::new_checked(meta.channel_id),
        Id::new_checked(meta.message_id),
    ) else {
        return;
    };
    let mut r = Reply {
        prompts: JobPrompts::new(&job_id, channel, &meta),
        tracker: JobTracker::new(job_id.clone()),
        job_id,
        channel,
        message,
        tool: None,
        throttle: Throttle::new(Duration::from_millis(shared.settings.edit_interval_ms)),
        dirty: false,
        shown: String::new(),
        talking: false,
        gone: false,
        held: Vec::new(),
    };
    let typing_until = Instant::now() + TYPING_MAX;
    let mut typing =
        tokio::time::interval(Duration::from_millis(shared.settings.typing_interval_ms));
    // A slow typing call delays the next one rather than bunching them.
    typing.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let edit_at = r.throttle.next_at(Instant::now().into_std());
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            input = tokio::time::timeout(IDLE, rx.recv()) => {
                let Ok(Some(input)) = input else {
                    // Abandoned (idle for long): its events need not come again.
                    r.ack_held().await;
                    return;
                };
                let done = r.apply(&shared, input.event, input.lease_epoch).await;
                r.held.extend(input.ack);
                if done {
                    r.ack_held().await;
                    shared.finished(&r.job_id);
                    return;
                }
            }
            _ = sleep_until(edit_at.into()), if r.dirty && !r.gone => r.flush(&shared).await,
            _ = typing.tick(), if !r.talking && !r.gone && Instant::now() < typing_until => {
                // Best effort: a lost typing indicator is not worth a log line above debug.
                if let Err(e) = shared.rest.typing(r.channel).await {
                    tracing::debug!(error = %e, "typing indicator failed");
                }
            }
        }
    }
}

impl Reply {
    /// Acks the events held so far.
    async fn ack_held(&mut self) {
        for ack in std::mem::take(&mut self.held) {
            if let Err(e) = ack.ack().await {
                tracing::warn!(job_id = %self.job_id, error = %e, "could not ack a reply event; it will come again");
                return;
            }
        }
    }

    /// Applies one event; true once the job's terminal event is shown.
    async fn apply(&mut self, shared: &Shared, ev: EventV1, epoch: Option<i64>) -> bool {
        let step = self.tracker.accept(&ev, epoch);
        if step == Step::Skip {
            return self.tracker.is_finished();
        }
        shared.note_event(&ev);
        match &ev.body {
            EventBody::Text { .. } => {
                self.dirty = true;
                self.talking = true;
            }
            EventBody::ToolUse {
                name,
                input_summary,
            } => {
                self.tool = Some(render::tool_line(name, input_summary));
                self.dirty = true;
            }
            // The CLI re-sent a cut stream: the tracker dropped the text,
            // the worker restates what stands.
            EventBody::TextReset { .. } => self.dirty = true,
            // Nothing to show mid-answer; the footer's ctx % says the rest.
            EventBody::Compacted { .. } => {}
            EventBody::Retrying { .. } => {
                self.tool = Some(render::RETRYING.to_string());
                self.dirty = true;
                // A retried attempt asks again under new ids.
                if let Some(p) = &mut self.prompts {
                    p.close(shared, prompt::RETRIED).await;
                }
            }
            EventBody::Completed {
                result,
                num_turns,
                total_cost_usd,
                context_tokens,
                context_window_tokens,
                ..
            } => {
                let footer = shared.settings.footer.then(|| {
                    render::footer(*num_turns, *total_cost_usd)
                        + &render::context_part(*context_tokens, *context_window_tokens)
                });
                let file_above = shared.settings.answer_file_above;
                match render::final_reply(result, footer.as_deref(), file_above) {
                    render::Final::Messages(parts) => self.finish(shared, &parts).await,
                    render::Final::File { preview, file } => {
                        self.finish_with_file(shared, &preview, &file).await
                    }
                }
            }
            EventBody::Failed { error, .. } => {
                self.finish(shared, &[render::failure(*error).to_string()])
                    .await;
            }
            EventBody::Cancelled { .. } => {
                let text = render::cancelled(self.tracker.text());
                self.finish(shared, &[text]).await;
            }
            EventBody::PermissionRequest { .. } | EventBody::PermissionResolved { .. } => {
                if let Some(p) = &mut self.prompts {
                    p.on_event(shared, &ev.body).await;
                }
            }
            EventBody::Started { .. } => {}
        }
        if step == Step::Terminal {
            if let Some(p) = &mut self.prompts {
                p.close(shared, prompt::ENDED).await;
            }
        }
        step == Step::Terminal
    }

    /// Shows the text so far (called at most once per edit interval).
    async fn flush(&mut self, shared: &Shared) {
        self.dirty = false;
        let view = render::streaming_view(self.tracker.text(), self.tool.as_deref());
        if view == self.shown {
            return;
        }
        if self.show(shared, &view).await {
            self.shown = view;
        }
    }

    /// Edits the reply to `content`; if the message can no longer be
    /// edited, posts it anew and goes on with the new one.
    /// Waits for the edit interval first (bounded by it), so the final
    /// edit keeps the rate too.
    async fn show(&mut self, shared: &Shared, content: &str) -> bool {
        sleep_until(self.throttle.next_at(Instant::now().into_std()).into()).await;
        self.throttle.sent(Instant::now().into_std());
        match shared.rest.edit(self.channel, self.message, content).await {
            Ok(()) => return true,
            Err(RestError::Permanent { status }) => {
                tracing::debug!(job_id = %self.job_id, status, "reply not editable; posting anew");
            }
            Err(e) => {
                tracing::warn!(job_id = %self.job_id, error = %e, "could not edit a reply; will try with the next change");
                self.dirty = true;
                return false;
            }
        }
        match shared.rest.create(self.channel, content, None).await {
            Ok(id) => {
                self.message = id;
                true
            }
            Err(e) => {
                // Logged once: the reply is dropped, other conversations go on.
                tracing::warn!(job_id = %self.job_id, error = %e, "a reply cannot be shown (deleted channel or missing permission?); dropping it");
                self.gone = true;
                false
            }
        }
    }

    /// The final edit as a preview, then the whole answer as a file.
    async fn finish_with_file(&mut self, shared: &Shared, preview: &str, file: &str) {
        if self.gone || !self.show(shared, preview).await {
            return;
        }
        let name = render::ANSWER_FILE;
        if let Err(e) = shared
            .rest
            .create_file(self.channel, name, file.as_bytes())
            .await
        {
            tracing::warn!(job_id = %self.job_id, error = %e, "could not attach an answer; dropping it");
        }
    }

    /// The final edit: the first part replaces the reply, the rest follow
    /// as new messages, in order.
    async fn finish(&mut self, shared: &Shared, parts: &[String]) {
        let Some((first, rest)) = parts.split_first() else {
            return;
        };
        if self.gone || !self.show(shared, first).await {
            return;
        }
        for part in rest {
            if let Err(e) = shared.rest.create(self.channel, part, None).await {
                tracing::warn!(job_id = %self.job_id, error = %e, "could not post the rest of an answer; dropping it");
                return;
            }
        }
    }
}
