//! Warm CLI processes: after a successful turn a session's CLI process
//! stays alive (stream-json mode keeps running while its stdin is open),
//! and the session's next turn on this worker is written to it instead of
//! starting a new CLI with `--resume`.
//!
//! The pool is per worker, bounded (`claude.warm_max_processes`, least
//! recently used closed first) and expires idle processes
//! (`claude.warm_idle_ttl_secs`). A process is in the pool only while idle:
//! a turn takes it out ([`WarmPool::acquire`]) and only a successful turn
//! gives it back ([`WarmPool::put`]); anything else kills it. Closing is
//! graceful (stdin closed, then SIGTERM, then SIGKILL) so the CLI flushes
//! its transcript. Processes themselves are spawned by `process` only.
//!
//! A process is reused only when it matches the job: same session, profile,
//! working directory and CLI flags, continuing the same Claude session, and
//! no other turn of the session ran since (the session row's
//! `claude_session_id` and `last_job_id` are what the process last saw: if
//! another worker ran a turn meanwhile, the process's conversation is
//! stale). A different model or permission mode is set with stream-json
//! control requests; anything else that differs closes the process and the
//! turn starts cold.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};

use crate::claude::TurnRequest;
use crate::config::Profile;
use crate::logging::session_ref;

mod process;

use process::prepare;
pub use process::{SessionView, WarmProcess, CLOSE_GRACE, WARM_RESPONSE_TIMEOUT};

/// Counters, for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WarmStats {
    /// CLI processes started for turns (cold starts).
    pub spawns: u64,
    /// Turns run on a warm process.
    pub hits: u64,
    /// Turns that found no usable warm process.
    pub misses: u64,
    /// Warm processes closed because the pool was full (LRU).
    pub evictions: u64,
    /// Warm processes closed after `warm_idle_ttl_secs` idle.
    pub expirations: u64,
    /// Warm processes not reused: dead, hung, stale or not matching the job.
    pub discards: u64,
    /// Warm processes in the pool now.
    pub idle: u64,
}

#[derive(Default)]
struct Counters {
    spawns: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    expirations: AtomicU64,
    discards: AtomicU64,
}

struct Idle {
    warm: WarmProcess,
    since: Instant,
}

struct Inner {
    idle: HashMap<String, Idle>,
    closed: bool,
}

/// The worker's warm processes, keyed by session key. Held in `Context`.
pub struct WarmPool {
    max: usize,
    ttl: Duration,
    inner: Mutex<Inner>,
    counters: Counters,
    /// Background closes (evictions, expiries), awaited by `close_all`.
    closing: TaskTracker,
}

impl WarmPool {
    pub fn new(max: usize, ttl: Duration) -> WarmPool {
        WarmPool {
            max,
            ttl,
            inner: Mutex::new(Inner {
                idle: HashMap::new(),
                closed: false,
            }),
            counters: Counters::default(),
            closing: TaskTracker::new(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.max > 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn stats(&self) -> WarmStats {
        let c = &self.counters;
        WarmStats {
            spawns: c.spawns.load(Ordering::Relaxed),
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            evictions: c.evictions.load(Ordering::Relaxed),
            expirations: c.expirations.load(Ordering::Relaxed),
            discards: c.discards.load(Ordering::Relaxed),
            idle: self.lock().idle.len() as u64,
        }
    }

    /// Whether this worker holds `session_key`'s CLI warm.
    pub fn holds(&self, session_key: &str) -> bool {
        self.lock().idle.contains_key(session_key)
    }

    /// Pids of the idle warm processes.
    pub fn idle_pids(&self) -> Vec<u32> {
        self.lock()
            .idle
            .values()
            .filter_map(|i| i.warm.proc.pid())
            .collect()
    }

    /// A turn started a CLI process cold.
    pub fn record_spawn(&self) {
        self.counters.spawns.fetch_add(1, Ordering::Relaxed);
    }

    /// A turn runs on a warm process (it answered with `init`).
    pub fn record_hit(&self, session_key: &str, turns: u64) {
        self.counters.hits.fetch_add(1, Ordering::Relaxed);
        info!(
            session = %session_ref(session_key),
            turns, "warm hit: the turn runs on the session's live CLI process"
        );
    }

    /// A warm process taken for a turn did not start it (dead, hung or
    /// misbehaving); the turn starts cold.
    pub fn record_broken(&self, session_key: &str, why: &str) {
        self.counters.discards.fetch_add(1, Ordering::Relaxed);
        self.counters.misses.fetch_add(1, Ordering::Relaxed);
        info!(
            session = %session_ref(session_key),
            reason = why,
            "warm miss: the warm process failed to start the turn; starting cold"
        );
    }

    /// Takes the session's warm process for `req` if it can run it, after
    /// setting its model and permission mode. A process that cannot is
    /// closed (gracefully, before a cold start resumes its session).
    pub async fn acquire(
        &self,
        profile_name: &str,
        profile: &Profile,
        req: &TurnRequest,
        session_key: &str,
        session: Option<&SessionView>,
    ) -> Option<WarmProcess> {
        if !self.enabled() {
            return None;
        }
        let taken = self.lock().idle.remove(session_key);
        let Some(Idle { mut warm, .. }) = taken else {
            self.counters.misses.fetch_add(1, Ordering::Relaxed);
            debug!(session_key, "warm miss: no warm process for the session");
            return None;
        };
        let reason = if warm.proc.has_exited() {
            Some("the process exited")
        } else {
            warm.mismatch(profile_name, profile, req, session)
        };
        let reason = match reason {
            Some(r) => Some(r.to_string()),
            None => prepare(&mut warm, req).await.err(),
        };
        match reason {
            None => Some(warm),
            Some(why) => {
                self.counters.discards.fetch_add(1, Ordering::Relaxed);
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
                info!(session = %session_ref(session_key), reason = %why, "warm miss: closing the warm process; starting cold");
                let how = warm.proc.close(CLOSE_GRACE).await;
                debug!(session_key, how, "warm process closed");
                None
            }
        }
    }

    /// Gives a process back after a successful turn. When the pool is full
    /// the least recently used process is closed; after `close_all` (or
    /// with the pool disabled) the process itself is closed.
    pub fn put(&self, warm: WarmProcess) {
        let mut inner = self.lock();
        if inner.closed || !self.enabled() {
            drop(inner);
            self.close_in_background(warm, "pool closed");
            return;
        }
        let key = warm.session_key.clone();
        let previous = inner.idle.insert(
            key.clone(),
            Idle {
                warm,
                since: Instant::now(),
            },
        );
        let mut evicted = Vec::new();
        while inner.idle.len() > self.max {
            let lru = inner
                .idle
                .iter()
                .filter(|(k, _)| **k != key)
                .min_by_key(|(_, i)| i.since)
                .map(|(k, _)| k.clone());
            match lru.and_then(|k| inner.idle.remove(&k)) {
                Some(i) => evicted.push(i.warm),
                None => break,
            }
        }
        drop(inner);
        if let Some(p) = previous {
            // Cannot happen (one turn per session), but never leak a process.
            self.close_in_background(p.warm, "replaced");
        }
        for w in evicted {
            self.counters.evictions.fetch_add(1, Ordering::Relaxed);
            info!(session = %session_ref(&w.session_key), "warm pool full: closing the least recently used process");
            self.close_in_background(w, "evicted");
        }
    }

    fn close_in_background(&self, mut warm: WarmProcess, why: &'static str) {
        self.closing.spawn(async move {
            let how = warm.proc.close(CLOSE_GRACE).await;
            debug!(session_key = %warm.session_key, why, how, "warm process closed");
        });
    }

    /// Closes processes idle longer than the TTL (and reaps dead ones).
    pub fn expire(&self) {
        let now = Instant::now();
        let mut expired = Vec::new();
        let mut dead = Vec::new();
        {
            let mut inner = self.lock();
            let keys: Vec<String> = inner.idle.keys().cloned().collect();
            for k in keys {
                let i = inner.idle.get_mut(&k).expect("key just listed");
                if now.duration_since(i.since) >= self.ttl {
                    expired.push(inner.idle.remove(&k).expect("present").warm);
                } else if i.warm.proc.has_exited() {
                    dead.push(inner.idle.remove(&k).expect("present").warm);
                }
            }
        }
        for w in expired {
            self.counters.expirations.fetch_add(1, Ordering::Relaxed);
            info!(session = %session_ref(&w.session_key), ttl_secs = self.ttl.as_secs(), "warm process idle past its TTL: closing");
            self.close_in_background(w, "expired");
        }
        for w in dead {
            self.counters.discards.fetch_add(1, Ordering::Relaxed);
            info!(session = %session_ref(&w.session_key), "warm process exited while idle");
            self.close_in_background(w, "exited");
        }
    }

    /// Closes the session's idle process, if the pool holds one (its
    /// session went idle fleet-wide: `session.idle`). Counted as an expiry.
    pub fn release(&self, session_key: &str) -> bool {
        let Some(idle) = self.lock().idle.remove(session_key) else {
            return false;
        };
        self.counters.expirations.fetch_add(1, Ordering::Relaxed);
        info!(session = %session_ref(session_key), "session idle: closing its warm process");
        self.close_in_background(idle.warm, "session idle");
        true
    }

    /// Expires idle processes periodically until `stop`.
    pub async fn run_reaper(self: Arc<Self>, stop: CancellationToken) {
        if !self.enabled() {
            // Nothing to reap; a supervised task still runs until stopped.
            stop.cancelled().await;
            return;
        }
        let every = (self.ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => self.expire(),
                _ = stop.cancelled() => return,
            }
        }
    }

    /// Closes every warm process and waits until they are gone. Processes
    /// given back later are closed at once.
    pub async fn close_all(&self) {
        let all: Vec<WarmProcess> = {
            let mut inner = self.lock();
            inner.closed = true;
            inner.idle.drain().map(|(_, i)| i.warm).collect()
        };
        if !all.is_empty() {
            info!(count = all.len(), "closing warm processes");
        }
        for w in all {
            self.close_in_background(w, "shutdown");
        }
        self.closing.close();
        self.closing.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::process::fixed_args;
    use super::*;
    use crate::protocol::{JobOptions, PermissionMode};

    #[test]
    fn only_resume_model_and_permission_mode_may_differ_on_a_warm_process() {
        let s = crate::config::Settings::from_toml_overrides("").unwrap();
        let p = &s.profiles["discord"];
        let base = TurnRequest {
            prompt: "one".into(),
            images: Vec::new(),
            cwd: "/w/s".into(),
            resume: None,
            fork: false,
            options: p.resolve("discord", &JobOptions::default()).unwrap(),
            session_grants: Vec::new(),
        };
        let mut other = base.clone();
        other.prompt = "two".into();
        other.resume = Some("0b5a3c1e-0000-4000-8000-000000000000".into());
        other.options.model = Some("claude-haiku-4-5".into());
        other.options.permission_mode = PermissionMode::Plan;
        other.session_grants = vec!["Bash(make)".into()];
        assert_eq!(fixed_args(&base, p), fixed_args(&other, p));
        let mut turns = base.clone();
        turns.options.max_turns = 3;
        assert_ne!(fixed_args(&base, p), fixed_args(&turns, p));
    }

    #[test]
    fn a_disabled_pool_holds_nothing() {
        let pool = WarmPool::new(0, Duration::from_secs(60));
        assert!(!pool.enabled());
        assert_eq!(pool.stats(), WarmStats::default());
    }
}
