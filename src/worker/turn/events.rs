//! A job's events, in order and fenced by the lease.
//!
//! Sequence numbers are reserved in blocks of [`SEQ_BLOCK`] with one fenced
//! write (the job's `next_seq` becomes the block's end), so a worker that
//! lost the session cannot reserve more, and a later run of the job starts
//! above every seq this one may have used. Between reservations, an event
//! goes out only while the lease is surely held (`Stop::lease_fresh`, checked
//! again right before the frame). Events are pipelined on the job's lane and
//! their confirms awaited before the outcome is recorded. Text deltas that
//! come within `amqp.text_coalesce_ms` of the last text event are joined.

use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;
use tracing::warn;

use super::{Stop, TurnAbort};
use crate::broker::lane::{ConfirmObserver, EventLane};
use crate::broker::publish::{Attribution, PublishError};
use crate::ops::metrics::{
    FIRST_TEXT, JOB_COST, PUBLISH_CONFIRM, QUEUE_WAIT, TURNS_RUNNING, TURN_DURATION,
};
use crate::ops::GaugeGuard;
use crate::protocol::{EventBody, EventV1, PROTOCOL_VERSION};
use crate::store::{
    now_ms, AfterFinish, JobFinish, JobRecord, JobStatus, Lease, SessionUpdate, StoreError,
};
use crate::worker::context::Context;
use crate::worker::running::TurnRegistration;
use crate::worker::transcript::Pending;

/// Sequence numbers reserved with one fenced write. A run that ends early
/// leaves at most this many unused (a gap before the next run's events).
pub(crate) const SEQ_BLOCK: u64 = 256;

/// Publishes a job's events in order, fenced by the lease.
pub(super) struct JobEvents<'a> {
    pub ctx: &'a Context,
    pub lease: &'a Lease,
    pub stop: &'a Stop,
    pub job_id: String,
    pub session_key: String,
    reply_to: String,
    metadata: Value,
    next_seq: u64,
    /// Seqs below this are reserved for this run (see [`SEQ_BLOCK`]).
    seq_reserved: u64,
    /// The job's non-terminal events go out here, pipelined (None: each
    /// is published and confirmed on its own).
    lane: Option<Box<dyn EventLane>>,
    /// Text not yet published, joined from deltas, and when it is due.
    pending_text: String,
    flush_at: Option<Instant>,
    /// When the last text event went out.
    last_text_at: Option<Instant>,
    pub attempt: u32,
    /// This job in the worker's registry of running turns (cancel, control).
    pub turn: TurnRegistration,
    /// What the job's turns cost so far (every CLI result, every attempt).
    pub spent_usd: f64,
    /// Whether the job may have recorded permission prompts: it ran before
    /// (on a worker that may have died asking), or this run asked.
    pub prompts_recorded: bool,
    identity: Option<String>,
    /// For the metrics: the job's profile, when it started here, whether
    /// it has spoken yet, and its place in `turns_running`.
    profile: String,
    began: std::time::Instant,
    spoke: bool,
    _running: GaugeGuard,
    /// What the outcome's transaction saw for after the job (None: no
    /// outcome was written here).
    after: Option<AfterFinish>,
}

impl<'a> JobEvents<'a> {
    pub fn new(ctx: &'a Context, lease: &'a Lease, stop: &'a Stop, job: &JobRecord) -> Self {
        let spec = &job.spec;
        if job.status == JobStatus::Queued && job.attempts == 0 {
            let waited = Duration::from_millis((now_ms() - job.created_at_ms).max(0) as u64);
            ctx.metrics
                .observe(QUEUE_WAIT, &[("profile", spec.profile.as_str())], waited);
        }
        JobEvents {
            ctx,
            lease,
            stop,
            job_id: job.job_id.clone(),
            session_key: job.session_key.clone(),
            reply_to: spec
                .reply_to
                .clone()
                .unwrap_or_else(|| job.session_key.clone()),
            metadata: spec.metadata.clone(),
            next_seq: job.next_seq,
            seq_reserved: job.next_seq,
            lane: ctx.sink.event_lane(confirm_observer(ctx)),
            pending_text: String::new(),
            flush_at: None,
            last_text_at: None,
            attempt: job.attempts,
            turn: ctx
                .running
                .register(&job.job_id, &job.session_key)
                .answered_by(spec.prompt_answerers.clone()),
            spent_usd: 0.0,
            prompts_recorded: job.attempts > 0,
            identity: spec.identity.clone(),
            profile: spec.profile.clone(),
            began: std::time::Instant::now(),
            spoke: false,
            _running: ctx.metrics.raise(TURNS_RUNNING),
            after: None,
        }
    }

    /// What the outcome's transaction saw for after the job; None if no
    /// outcome was written by this run.
    pub fn take_after(&mut self) -> Option<AfterFinish> {
        self.after.take()
    }

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

    /// Publishes one non-terminal event (text may be held back for a few
    /// ms to join the deltas that follow; any other event first publishes
    /// the held text, so order is kept).
    pub async fn emit(&mut self, body: EventBody) -> Result<(), TurnAbort> {
        self.stop.progressed();
        if let EventBody::Text { text } = body {
            return self.emit_text(text).await;
        }
        self.flush_text().await?;
        self.publish(body).await
    }

    async fn emit_text(&mut self, text: String) -> Result<(), TurnAbort> {
        if !self.spoke {
            self.spoke = true;
            let labels = [("profile", self.profile.as_str())];
            self.ctx
                .metrics
                .observe(FIRST_TEXT, &labels, self.began.elapsed());
        }
        if !self.pending_text.is_empty() {
            self.pending_text.push_str(&text);
            return Ok(());
        }
        let window = Duration::from_millis(self.ctx.settings.amqp.text_coalesce_ms);
        match self.last_text_at {
            Some(last) if !window.is_zero() && last.elapsed() < window => {
                self.pending_text = text;
                self.flush_at = Some(last + window);
                Ok(())
            }
            _ => {
                self.last_text_at = Some(Instant::now());
                self.publish(EventBody::Text { text }).await
            }
        }
    }

    /// When held-back text is due to go out, if any is held.
    pub fn flush_at(&self) -> Option<Instant> {
        self.flush_at
    }

    /// Publishes the held-back text, if any.
    pub async fn flush_text(&mut self) -> Result<(), TurnAbort> {
        self.flush_at = None;
        if self.pending_text.is_empty() {
            return Ok(());
        }
        let text = std::mem::take(&mut self.pending_text);
        self.last_text_at = Some(Instant::now());
        self.publish(EventBody::Text { text }).await
    }

    /// A new block's end when fewer than half a block of seqs is left
    /// reserved: an attempt starting reserves it with its own commit.
    pub fn seq_block_to_reserve(&self) -> Option<u64> {
        (self.seq_reserved.saturating_sub(self.next_seq) < SEQ_BLOCK / 2)
            .then_some(self.next_seq + SEQ_BLOCK)
    }

    /// Seqs below `upto` are reserved for this run (committed elsewhere).
    pub fn seqs_reserved(&mut self, upto: u64) {
        self.seq_reserved = self.seq_reserved.max(upto);
    }

    /// Publishes one event under a reserved seq, while the lease is surely
    /// held.
    async fn publish(&mut self, body: EventBody) -> Result<(), TurnAbort> {
        if self.stop.lease_lost.is_cancelled() {
            return Err(TurnAbort::LeaseLost);
        }
        if self.next_seq >= self.seq_reserved {
            let reserved = self.next_seq + SEQ_BLOCK;
            self.ctx
                .store
                .record_seq(self.lease, &self.job_id, reserved)
                .await?;
            self.seq_reserved = reserved;
        }
        let event = self.event(body);
        let bytes = serde_json::to_vec(&event).expect("events serialise");
        let stop = self.stop;
        let still_held = || !stop.lease_lost.is_cancelled() && stop.lease_fresh();
        if !still_held() {
            return Err(TurnAbort::LeaseLost);
        }
        // Checked again once the channel is ours, right before the frame.
        let from = Attribution {
            fence: Some(&still_held),
            worker_id: &self.ctx.worker_id,
            lease_epoch: self.lease.epoch,
        };
        let sent = match self.lane.as_mut() {
            Some(lane) => lane.send(&self.reply_to, &event, bytes, &from).await,
            None => {
                self.ctx
                    .sink
                    .publish_event(&self.reply_to, &event, &bytes, &from)
                    .await
            }
        };
        match sent {
            Err(PublishError::Fenced) => return Err(TurnAbort::LeaseLost),
            sent => sent?,
        }
        self.next_seq += 1;
        Ok(())
    }

    /// Waits until every event published so far is confirmed: before the
    /// outcome is recorded, so a job never ends with an event unsent.
    pub(super) async fn settle(&mut self) -> Result<(), TurnAbort> {
        self.flush_text().await?;
        let Some(lane) = self.lane.as_mut() else {
            return Ok(());
        };
        let stop = self.stop;
        let still_held = || !stop.lease_lost.is_cancelled() && stop.lease_fresh();
        match lane.settle(Some(&still_held)).await {
            Err(PublishError::Fenced) => Err(TurnAbort::LeaseLost),
            settled => Ok(settled?),
        }
    }

    /// Records the outcome, then publishes the terminal event. The database
    /// commits first: a job is never run again once it has an outcome.
    pub async fn finish(
        &mut self,
        status: JobStatus,
        body: EventBody,
        error: Option<String>,
        session_update: Option<SessionUpdate>,
    ) -> Result<(), TurnAbort> {
        self.finish_with_transcript(status, body, error, session_update, None)
            .await
    }

    /// [`finish`](Self::finish), storing the session's transcript in the
    /// outcome's transaction.
    pub async fn finish_with_transcript(
        &mut self,
        status: JobStatus,
        body: EventBody,
        error: Option<String>,
        session_update: Option<SessionUpdate>,
        mut transcript: Option<Pending>,
    ) -> Result<(), TurnAbort> {
        // No prompt outlives its job.
        super::superseded::resolve_left_open(self, None).await?;
        self.settle().await?;
        if self.stop.lease_lost.is_cancelled() {
            return Err(TurnAbort::LeaseLost);
        }
        let event = self.event(body);
        let bytes = serde_json::to_vec(&event).expect("events serialise");
        let mut finish = JobFinish {
            job_id: self.job_id.clone(),
            status,
            error,
            terminal_event: String::from_utf8(bytes.clone()).expect("JSON is UTF-8"),
            // Never below what this run reserved.
            next_seq: (self.next_seq + 1).max(self.seq_reserved),
            session_update,
            cost_usd: self.spent_usd,
            identity: self.identity.clone(),
            transcript: transcript.as_mut().and_then(|t| t.write.take()),
            now_ms: now_ms(),
        };
        let store = &self.ctx.store;
        let after = match store.finish_job_and_look(self.lease, &finish).await {
            Err(StoreError::TranscriptChanged(_)) if transcript.is_some() => {
                let whole = transcript.take().expect("checked").whole(self.ctx).await;
                let mut whole = whole?;
                finish.transcript = whole.write.take();
                let after = store.finish_job_and_look(self.lease, &finish).await?;
                transcript = Some(whole);
                after
            }
            after => after?,
        };
        self.after = Some(after);
        if let Some(t) = transcript {
            t.committed(self.ctx);
        }
        self.count_outcome(&event.body);
        self.next_seq += 1;
        self.publish_terminal(&event, &bytes).await;
        Ok(())
    }

    /// The outcome, the time the job ran here and what it cost, once its
    /// outcome is committed.
    fn count_outcome(&self, body: &EventBody) {
        let metrics = &self.ctx.metrics;
        let outcome = metrics.job_ended(&self.profile, body);
        let labels = [("profile", self.profile.as_str()), ("outcome", outcome)];
        metrics.observe(TURN_DURATION, &labels, self.began.elapsed());
        metrics
            .histogram(JOB_COST, &labels[..1])
            .record(self.spent_usd);
    }

    fn attribution(&self) -> Attribution<'_> {
        Attribution {
            worker_id: &self.ctx.worker_id,
            lease_epoch: self.lease.epoch,
            fence: None,
        }
    }

    /// The outcome is already recorded, so the terminal event must get out:
    /// keep trying through broker outages until it does or the worker stops.
    async fn publish_terminal(&self, event: &EventV1, bytes: &[u8]) {
        if self.ctx.hooks.skip_terminal_publish {
            return;
        }
        let from = self.attribution();
        let mut delay = Duration::from_millis(200);
        loop {
            let sent = self
                .ctx
                .sink
                .publish_event(&self.reply_to, event, bytes, &from)
                .await;
            let Err(e) = sent else {
                crate::worker::outbox::mark_published(self.ctx, &event.job_id).await;
                return;
            };
            warn!(error = %e, job_id = %event.job_id, "publishing a terminal event failed; retrying");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.stop.kill.cancelled() => {
                    warn!(job_id = %event.job_id, "terminal event not published before shutdown; \
                          a worker's outbox sweep publishes it later");
                    return;
                }
            }
            delay = (delay * 2).min(Duration::from_secs(10));
        }
    }
}

/// Records each event confirm's latency in the publish confirm histogram.
fn confirm_observer(ctx: &Context) -> Option<ConfirmObserver> {
    if !ctx.metrics.enabled() {
        return None;
    }
    let metrics = std::sync::Arc::clone(&ctx.metrics);
    Some(std::sync::Arc::new(move |took: Duration| {
        metrics.observe(PUBLISH_CONFIRM, &[("kind", "event")], took)
    }))
}
