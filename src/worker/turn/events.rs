//! A job's events, in order and fenced by the lease: each seq is recorded
//! under the lease epoch before its event is published, and nothing is
//! published past the time the lease is surely held.

use std::time::Duration;

use serde_json::Value;
use tracing::warn;

use super::{Stop, TurnAbort};
use crate::broker::publish::{Attribution, PublishError};
use crate::ops::metrics::{FIRST_TEXT, JOB_COST, QUEUE_WAIT, TURNS_RUNNING, TURN_DURATION};
use crate::ops::GaugeGuard;
use crate::protocol::{EventBody, EventV1, PROTOCOL_VERSION};
use crate::store::{now_ms, JobFinish, JobRecord, JobStatus, Lease, SessionUpdate};
use crate::worker::context::Context;
use crate::worker::running::TurnRegistration;

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
    pub attempt: u32,
    /// This job in the worker's registry of running turns (cancel, control).
    pub turn: TurnRegistration,
    /// What the job's turns cost so far (every CLI result, every attempt).
    pub spent_usd: f64,
    identity: Option<String>,
    /// For the metrics: the job's profile, when it started here, whether
    /// it has spoken yet, and its place in `turns_running`.
    profile: String,
    began: std::time::Instant,
    spoke: bool,
    _running: GaugeGuard,
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
            attempt: job.attempts,
            turn: ctx.running.register(&job.job_id, &job.session_key),
            spent_usd: 0.0,
            identity: spec.identity.clone(),
            profile: spec.profile.clone(),
            began: std::time::Instant::now(),
            spoke: false,
            _running: ctx.metrics.raise(TURNS_RUNNING),
        }
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

    /// Publishes one non-terminal event: the seq is recorded (fenced)
    /// first, and the lease must still be surely held when it goes out.
    pub async fn emit(&mut self, body: EventBody) -> Result<(), TurnAbort> {
        self.stop.progressed();
        if !self.spoke && matches!(body, EventBody::Text { .. }) {
            self.spoke = true;
            let labels = [("profile", self.profile.as_str())];
            self.ctx
                .metrics
                .observe(FIRST_TEXT, &labels, self.began.elapsed());
        }
        if self.stop.lease_lost.is_cancelled() {
            return Err(TurnAbort::LeaseLost);
        }
        let event = self.event(body);
        let bytes = serde_json::to_vec(&event).expect("events serialise");
        self.ctx
            .store
            .record_seq(self.lease, &self.job_id, self.next_seq + 1)
            .await?;
        let still_held = || !self.stop.lease_lost.is_cancelled() && self.stop.lease_fresh();
        if !still_held() {
            return Err(TurnAbort::LeaseLost);
        }
        // Checked again once the channel is ours, right before the frame.
        let from = Attribution {
            fence: Some(&still_held),
            ..self.attribution()
        };
        match self
            .ctx
            .sink
            .publish_event(&self.reply_to, &event, &bytes, &from)
            .await
        {
            Err(PublishError::Fenced) => return Err(TurnAbort::LeaseLost),
            sent => sent?,
        }
        self.next_seq += 1;
        Ok(())
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
            cost_usd: self.spent_usd,
            identity: self.identity.clone(),
            now_ms: now_ms(),
        };
        self.ctx.store.finish_job(self.lease, &finish).await?;
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
