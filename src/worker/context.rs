//! What every stage shares: settings, the store, the reply sink, this
//! worker's identity, the warm CLI processes and the scheduler's wake-up signal. No globals: one
//! `Context` is built at start-up and passed down.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::broker::publish::ReplySink;
use crate::claude::warm::WarmPool;
use crate::config::Settings;
use crate::ops::Metrics;
use crate::store::JobRecord;
use crate::store::SessionStore;
use crate::worker::admin::MeteredSink;
use crate::worker::running::RunningTurns;
use crate::worker::turn::retry::RetryPolicy;

pub struct Context {
    pub settings: Arc<Settings>,
    pub store: Arc<dyn SessionStore>,
    pub sink: Arc<dyn ReplySink>,
    pub worker_id: String,
    pub retry: RetryPolicy,
    /// Turns running on this worker (for cancel and control requests).
    pub running: Arc<RunningTurns>,
    /// Idle CLI processes kept for their sessions' next turns.
    pub warm: Arc<WarmPool>,
    /// This worker's metrics (recorded only when the admin port is on).
    pub metrics: Arc<Metrics>,
    /// What this worker last stored of each transcript (incremental saves).
    pub transcripts: crate::worker::transcript::Cursors,
    /// Published terminal events waiting to be marked (see `outbox`).
    pub(crate) marks: crate::worker::outbox::Marks,
    wake: Notify,
    preferred: Mutex<VecDeque<String>>,
    /// Signalled whenever this worker accepts a job (tests wait on it).
    accepted: Notify,
    /// Sessions whose lease holder waits for a follow-up (lease affinity):
    /// only that session's holder is woken by its accept, not every one.
    affinity: Mutex<std::collections::HashMap<String, Arc<Notify>>>,
    /// Whether the broker connection is up (see `broker_watch`).
    broker_up: tokio::sync::watch::Sender<bool>,
    /// Signalled when this worker recorded lifecycle events (the
    /// publisher sends them at once instead of at its next sweep).
    lifecycle: Notify,
    /// Test-only hooks (empty in production).
    pub(crate) hooks: Hooks,
}

impl Context {
    pub fn new(
        settings: Arc<Settings>,
        store: Arc<dyn SessionStore>,
        sink: Arc<dyn ReplySink>,
        worker_id: String,
        hooks: Hooks,
    ) -> Arc<Context> {
        let retry = RetryPolicy::new(settings.retry.clone());
        let warm = Arc::new(WarmPool::new(
            settings.claude.warm_max_processes,
            settings.warm_idle_ttl(),
        ));
        let metrics = Arc::new(Metrics::new(matches!(settings.ops_listen(), Ok(Some(_)))));
        let sink: Arc<dyn ReplySink> = if metrics.enabled() {
            Arc::new(MeteredSink {
                inner: sink,
                metrics: Arc::clone(&metrics),
            })
        } else {
            sink
        };
        Arc::new(Context {
            warm,
            metrics,
            settings,
            store,
            sink,
            worker_id,
            retry,
            running: Arc::new(RunningTurns::default()),
            transcripts: Default::default(),
            marks: Default::default(),
            wake: Notify::new(),
            preferred: Mutex::new(VecDeque::new()),
            accepted: Notify::new(),
            affinity: Mutex::new(Default::default()),
            broker_up: tokio::sync::watch::Sender::new(true),
            lifecycle: Notify::new(),
            hooks,
        })
    }

    pub(crate) fn set_broker_up(&self, up: bool) {
        self.broker_up.send_replace(up);
    }

    pub fn broker_up(&self) -> bool {
        *self.broker_up.borrow()
    }

    /// Returns once the broker connection is up.
    pub(crate) async fn broker_back(&self) {
        let mut rx = self.broker_up.subscribe();
        let _ = rx.wait_for(|up| *up).await;
    }

    /// Tells the scheduler there may be work, optionally naming the session
    /// (the one whose job was just accepted here, so it starts at once).
    pub fn wake_scheduler(&self, session_key: Option<&str>) {
        if let Some(key) = session_key {
            let mut q = self.preferred.lock().unwrap_or_else(|p| p.into_inner());
            if !q.iter().any(|k| k == key) {
                q.push_back(key.to_string());
            }
            drop(q);
            self.accepted.notify_waiters();
            let watching = self.affinity.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(holder) = watching.get(key) {
                // A permit if the holder is not waiting yet: not missed.
                holder.notify_one();
            }
        }
        self.wake.notify_one();
    }

    /// Wakes the returned `Notify` (a permit, so never missed) whenever a
    /// job of `session_key` is accepted here, until the guard drops.
    pub(crate) fn watch_accepts(&self, session_key: &str) -> AcceptWatch<'_> {
        let notify = Arc::new(Notify::new());
        self.affinity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(session_key.to_string(), Arc::clone(&notify));
        AcceptWatch {
            ctx: self,
            session_key: session_key.to_string(),
            notify,
        }
    }

    /// Resolves when this worker next accepts a job (a test can wait on it).
    pub fn job_accepted(&self) -> tokio::sync::futures::Notified<'_> {
        self.accepted.notified()
    }

    pub(crate) fn take_preferred(&self) -> Option<String> {
        self.preferred
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
    }

    /// Wakes the lifecycle publisher: events were recorded.
    pub(crate) fn note_lifecycle_recorded(&self) {
        self.lifecycle.notify_one();
    }

    pub(crate) async fn lifecycle_recorded(&self) {
        self.lifecycle.notified().await
    }

    pub(crate) async fn woken(&self) {
        self.wake.notified().await
    }
}

/// A default worker id: host, pid and a random suffix, so restarts and
/// several workers per host never share one.
pub fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into());
    let rand = &uuid::Uuid::new_v4().simple().to_string()[..8];
    format!("{host}-{}-{rand}", std::process::id())
}

/// A hook called with the job about to run.
pub type JobHook = Arc<dyn Fn(&JobRecord) + Send + Sync>;

/// Test-only hooks into a running worker (hidden from the docs: no
/// production code sets them).
#[doc(hidden)]
#[derive(Clone, Default)]
pub struct Hooks {
    /// Called on the session's task when an attempt of a job has started
    /// (the job is `running`), before the CLI is.
    pub on_attempt: Option<JobHook>,
    /// Skip publishing terminal events after their outcome is recorded: a
    /// worker dying in that window, without killing it.
    pub skip_terminal_publish: bool,
}

/// A lease holder's watch on its session's accepts (see
/// [`Context::watch_accepts`]).
pub(crate) struct AcceptWatch<'a> {
    ctx: &'a Context,
    session_key: String,
    pub notify: Arc<Notify>,
}

impl Drop for AcceptWatch<'_> {
    fn drop(&mut self) {
        self.ctx
            .affinity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.session_key);
    }
}
