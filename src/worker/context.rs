//! What every stage shares: settings, the store, the reply sink, this
//! worker's identity, the warm CLI processes and the scheduler's wake-up signal. No globals: one
//! `Context` is built at start-up and passed down.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};

use crate::broker::publish::ReplySink;
use crate::claude::warm::WarmPool;
use crate::config::Settings;
use crate::ops::Metrics;
use crate::store::JobRecord;
use crate::store::SessionStore;
use crate::worker::accept_feed::AcceptNotice;
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
    /// Job ids this worker is accepting or accepted lately (bounded): an
    /// announcement of one of them is not news here.
    accepting: Mutex<VecDeque<String>>,
    /// Whether accept announcements reach this worker now (see
    /// `accept_feed`); lease holders then poll less often.
    accepts_pushed: AtomicBool,
    /// One slot per session this worker may hold at once (the scheduler's).
    pub(crate) slots: Arc<Semaphore>,
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
        let slots = Arc::new(Semaphore::new(settings.worker.max_concurrent_turns));
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
            accepting: Mutex::new(VecDeque::new()),
            accepts_pushed: AtomicBool::new(false),
            slots,
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
            if !self.nudge_holder(key) && self.slots_full() {
                // Its session waits for a slot and none is free here: the
                // lease holders waiting for follow-ups look now (and give
                // theirs up, since a session waits).
                self.nudge_all_holders();
            }
        }
        self.wake.notify_one();
    }

    /// Wakes the holder of `session_key`'s lease if it waits here for a
    /// follow-up; false if none does. A permit if the holder is not
    /// waiting yet: not missed.
    pub(crate) fn nudge_holder(&self, session_key: &str) -> bool {
        let watching = self.affinity.lock().unwrap_or_else(|p| p.into_inner());
        match watching.get(session_key) {
            Some(holder) => {
                holder.notify_one();
                true
            }
            None => false,
        }
    }

    /// Wakes every lease holder waiting here for a follow-up: each looks
    /// once (its own next job, or another session waiting for a worker).
    pub(crate) fn nudge_all_holders(&self) {
        let watching = self.affinity.lock().unwrap_or_else(|p| p.into_inner());
        for holder in watching.values() {
            holder.notify_one();
        }
    }

    /// Called before this worker's accept of `job_id`, so an announcement
    /// of it (a redelivery accepted by another worker too) is recognised.
    pub(crate) fn note_accepting(&self, job_id: &str) {
        const KEPT: usize = 1024;
        let mut q = self.accepting.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() == KEPT {
            q.pop_front();
        }
        q.push_back(job_id.to_string());
    }

    /// A job accepted by another worker, as it announced it. One accepted
    /// here was handled by `wake_scheduler` already.
    pub(crate) fn on_accept_announced(&self, notice: &AcceptNotice) {
        let ours = self
            .accepting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|j| *j == notice.job_id);
        if ours {
            return;
        }
        if notice.held {
            // Its holder, if it waits here, runs it now and warm.
            self.nudge_holder(&notice.session_key);
        } else if self.slots_full() {
            // A session waits for a worker and this one is full: a holder
            // waiting for a follow-up here hands its lease back.
            self.nudge_all_holders();
        } else {
            // A session waits and the worker that accepted it is full: a
            // free slot here claims it now, not at the next sweep.
            self.wake.notify_one();
        }
    }

    /// No slot free on this worker: a session waiting for a worker can only
    /// get one here if a lease is handed back.
    pub(crate) fn slots_full(&self) -> bool {
        self.slots.available_permits() == 0
    }

    pub(crate) fn set_accepts_pushed(&self, pushed: bool) {
        self.accepts_pushed.store(pushed, Ordering::Release);
    }

    /// How long a lease holder in its affinity window waits before its
    /// `n`th look of its own (0-based). Polling finds a follow-up accepted by
    /// another worker and a session waiting for a slot; while accepts are
    /// announced (and the broker is up) those wake it at once, so it polls
    /// only for what is not announced (a lease that expired, one handed
    /// back) and backs off: 100, 200, 400, 800 ms, then every second.
    pub(crate) fn affinity_poll(&self, n: u32) -> Duration {
        const FIRST: Duration = Duration::from_millis(100);
        if let Some(fixed) = self.hooks.affinity_poll {
            return fixed;
        }
        if !self.accepts_pushed.load(Ordering::Acquire) || !self.broker_up() {
            return FIRST;
        }
        (FIRST * 2u32.saturating_pow(n.min(4))).min(Duration::from_secs(1))
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
    /// Replaces the affinity poll interval: a test that sets it long shows
    /// that only an announcement woke a lease holder.
    pub affinity_poll: Option<Duration>,
    /// Notified (a permit) each time the scheduler waits with nothing to
    /// claim: a test then knows only a wake-up makes it look again.
    pub scheduler_idle: Option<Arc<Notify>>,
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
