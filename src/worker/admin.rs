//! What the worker gives the admin port (`crate::ops`): the [`Probe`]
//! behind `/healthz` and `/readyz`, and [`MeteredSink`], which times every
//! publish up to the broker's confirm.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::broker::publish::{Attribution, PublishError, ReplySink};
use crate::ops::metrics::{BROKER_UP, PUBLISH_CONFIRM, PUBLISH_ERRORS, STORE_ERRORS};
use crate::ops::{Check, Metrics, Probe};
use crate::protocol::EventV1;
use crate::worker::context::Context;

/// How long `/readyz` waits for the database before calling it unreachable.
const DATABASE_CHECK_BOUND: Duration = Duration::from_secs(2);

/// The worker as the admin port sees it.
pub(crate) struct WorkerProbe {
    pub ctx: Arc<Context>,
    /// False once a supervised task ended on its own (the worker is then
    /// stopping); set by `worker::run`.
    pub alive: Arc<AtomicBool>,
    /// Cancelled when the worker begins to stop: no longer ready.
    pub stopping: tokio_util::sync::CancellationToken,
    /// The channel the jobs consumer reads: open means it can consume.
    pub jobs: lapin::Channel,
}

#[async_trait]
impl Probe for WorkerProbe {
    fn alive(&self) -> bool {
        self.alive.load(Ordering::Relaxed)
    }

    async fn ready(&self) -> Vec<Check> {
        let broker = if !self.ctx.broker_up() {
            Check::failed("broker", "the broker connection is down or blocked")
        } else if !self.jobs.status().connected() && !self.stopping.is_cancelled() {
            Check::failed("broker", "the jobs consumer's channel is not open")
        } else {
            Check::ok("broker")
        };
        let database = match tokio::time::timeout(
            DATABASE_CHECK_BOUND,
            // Any read proves the database answers; this one is a key lookup.
            self.ctx.store.get_job("readyz-probe"),
        )
        .await
        {
            Ok(Ok(_)) => Check::ok("database"),
            Ok(Err(e)) => {
                self.ctx
                    .metrics
                    .counter(STORE_ERRORS, &[("at", "readyz")])
                    .increment(1);
                Check::failed("database", format!("the database failed a read: {e}"))
            }
            Err(_) => Check::failed(
                "database",
                format!("no answer within {} ms", DATABASE_CHECK_BOUND.as_millis()),
            ),
        };
        let cli = if cli_present(&self.ctx.settings.claude.path) {
            Check::ok("cli")
        } else {
            Check::failed("cli", "claude.path no longer names an executable file")
        };
        let running = if self.stopping.is_cancelled() {
            Check::failed("accepting", "the worker is shutting down")
        } else {
            Check::ok("accepting")
        };
        vec![broker, database, cli, running]
    }

    fn observe(&self, metrics: &Metrics) {
        metrics
            .gauge(BROKER_UP, &[])
            .set(if self.ctx.broker_up() { 1.0 } else { 0.0 });
        metrics.set_warm(&self.ctx.warm.stats());
    }
}

/// Whether `path` (a path, or a name looked up on `PATH`) is an
/// executable file now. Start-up ran `claude --version`; this only checks
/// that it has not gone away since, cheaply.
fn cli_present(path: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &std::path::Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if path.components().count() > 1 {
        return executable(path);
    }
    std::env::var_os("PATH")
        .is_some_and(|dirs| std::env::split_paths(&dirs).any(|d| executable(&d.join(path))))
}

/// A [`ReplySink`] that records how long each publish took until the
/// broker confirmed it (including the wait for the shared channel), by
/// kind, and counts failed publishes.
pub(crate) struct MeteredSink {
    pub inner: Arc<dyn ReplySink>,
    pub metrics: Arc<Metrics>,
}

impl MeteredSink {
    fn record<T>(
        &self,
        kind: &'static str,
        began: Instant,
        r: Result<T, PublishError>,
    ) -> Result<T, PublishError> {
        match &r {
            Ok(_) => self
                .metrics
                .observe(PUBLISH_CONFIRM, &[("kind", kind)], began.elapsed()),
            Err(_) => self
                .metrics
                .counter(PUBLISH_ERRORS, &[("kind", kind)])
                .increment(1),
        }
        r
    }
}

#[async_trait]
impl ReplySink for MeteredSink {
    async fn publish_event(
        &self,
        routing_key: &str,
        event: &EventV1,
        body: &[u8],
        from: &Attribution<'_>,
    ) -> Result<(), PublishError> {
        let began = Instant::now();
        let r = self
            .inner
            .publish_event(routing_key, event, body, from)
            .await;
        self.record("event", began, r)
    }

    fn event_lane(
        &self,
        observe: Option<crate::broker::lane::ConfirmObserver>,
    ) -> Option<Box<dyn crate::broker::lane::EventLane>> {
        self.inner.event_lane(observe)
    }

    async fn announce_accept(&self, routing_key: &str, body: &[u8]) -> Result<(), PublishError> {
        // A hint without a confirm: no latency worth a histogram.
        self.inner.announce_accept(routing_key, body).await
    }

    async fn publish_raw_event(
        &self,
        routing_key: &str,
        job_id: &str,
        body: &[u8],
    ) -> Result<(), PublishError> {
        let began = Instant::now();
        let r = self
            .inner
            .publish_raw_event(routing_key, job_id, body)
            .await;
        self.record("event", began, r)
    }

    async fn publish_session_event(
        &self,
        kind: &str,
        event_id: i64,
        body: &[u8],
    ) -> Result<(), PublishError> {
        let began = Instant::now();
        let r = self.inner.publish_session_event(kind, event_id, body).await;
        self.record("session_event", began, r)
    }

    async fn publish_control_result(
        &self,
        routing_key: &str,
        request_id: &str,
        body: &[u8],
    ) -> Result<(), PublishError> {
        let began = Instant::now();
        let r = self
            .inner
            .publish_control_result(routing_key, request_id, body)
            .await;
        self.record("control_result", began, r)
    }

    async fn publish_control(
        &self,
        body: &[u8],
        request_id: &str,
        reply_to: Option<&str>,
    ) -> Result<(), PublishError> {
        let began = Instant::now();
        let r = self.inner.publish_control(body, request_id, reply_to).await;
        self.record("control", began, r)
    }

    async fn dead_letter(
        &self,
        original: &lapin::message::Delivery,
        reason: &str,
    ) -> Result<(), PublishError> {
        let began = Instant::now();
        let r = self.inner.dead_letter(original, reason).await;
        self.record("dead_letter", began, r)
    }
}

/// The admin port as one of the worker's supervised tasks.
pub(crate) struct AdminTask {
    alive: Arc<AtomicBool>,
    stop: tokio_util::sync::CancellationToken,
}

pub(crate) const TASK: &str = "admin port";

impl AdminTask {
    /// Starts serving on `listener` (if the port is on). It keeps serving
    /// while the worker drains — `/readyz` then says it is stopping —
    /// and is stopped last, by [`AdminTask::stop`].
    pub fn spawn(
        tasks: &mut super::supervise::Supervisor,
        ctx: &Arc<Context>,
        listener: Option<tokio::net::TcpListener>,
        shutdown: &tokio_util::sync::CancellationToken,
        jobs: &lapin::Channel,
    ) -> AdminTask {
        let admin = AdminTask {
            alive: Arc::new(AtomicBool::new(true)),
            stop: tokio_util::sync::CancellationToken::new(),
        };
        if let Some(listener) = listener {
            let probe = Arc::new(WorkerProbe {
                ctx: Arc::clone(ctx),
                alive: Arc::clone(&admin.alive),
                stopping: shutdown.clone(),
                jobs: jobs.clone(),
            });
            let metrics = Arc::clone(&ctx.metrics);
            let serve = crate::ops::serve(listener, probe, metrics, admin.stop.clone());
            tasks.spawn(TASK, serve);
        }
        admin
    }

    /// A supervised task ended on its own: `/healthz` fails from now on.
    pub fn task_failed(&self) {
        self.alive.store(false, Ordering::Relaxed);
    }

    pub async fn stop(self, tasks: &mut super::supervise::Supervisor, bound: Duration) {
        self.stop.cancel();
        tasks.join(TASK, bound).await;
    }
}
