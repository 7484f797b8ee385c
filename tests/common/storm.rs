//! The fault storm: a fleet of worker processes on a RabbitMQ node and a
//! PostgreSQL server of its own, serving jobs over many sessions while
//! CLI processes are killed, the API answers bursts of 529s and cuts
//! streams mid-answer, a worker is SIGKILLed (and restarted, as a process
//! supervisor would), another is SIGSTOPped past its lease, the broker
//! restarts and the database restarts. Everything is observed through a
//! durable tap and read with the client library's `JobTracker`; the report
//! counts what the product promises: nothing lost, one terminal per job,
//! no stale event past the reader, the text adds up, order per session.
//! Used by `tests/it/storm.rs` (CI size) and `benches/storm.rs` (longer).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use claude_worker::broker::Topology;
use claude_worker::client::{JobTracker, Step};
use claude_worker::config::Secret;
use claude_worker::protocol::{EventBody, EventV1};
use rand::Rng;
use serde_json::json;
use sqlx::Connection as _;
use tokio::process::Child;
use tokio::time::Instant;

use super::broker_node::BrokerNode;
use super::mock_api::{Behavior, MockApi};
use super::pg_node::PgNode;
use super::tap::{producer, tap, try_publish, Seen};
use super::world::{self, cli_pids, WorkerPlace};

const REPLY_KEY: &str = "storm.replies";
const LEASE_TTL_SECS: u64 = 3;

#[derive(Debug, Clone)]
pub struct StormConfig {
    pub jobs: usize,
    pub sessions: usize,
    pub workers: usize,
}

/// What the storm did and what the fleet made of it.
#[derive(Debug, Default)]
pub struct StormReport {
    pub jobs: usize,
    pub sessions: usize,
    pub workers: usize,
    pub completed: usize,
    pub failed: BTreeMap<String, usize>,
    /// Jobs with no terminal event by the deadline.
    pub lost: usize,
    /// Jobs with two different terminal events.
    pub conflicting_terminals: usize,
    /// Deliveries of a terminal event already seen (same seq): dropped by
    /// the reader's dedup.
    pub duplicate_deliveries: usize,
    /// Events that arrived after an event of the same job with a higher
    /// lease epoch, and how many of them the reader delivered.
    pub stale_arrived: usize,
    pub stale_delivered: usize,
    /// Completed jobs whose delivered text differs from `completed.result`.
    pub text_mismatches: usize,
    pub text_resets: usize,
    pub retrying_events: usize,
    /// Consecutive jobs of a session whose turns overlapped or ran out of
    /// acceptance order (from the database).
    pub order_violations: usize,
    pub cli_kills: usize,
    pub bursts_529: usize,
    pub stream_cuts: usize,
    pub worker_restarts: usize,
    pub duration: Duration,
}

impl StormReport {
    /// The promises: nothing lost, one terminal each, nothing stale past
    /// the reader, the text adds up, order held.
    pub fn holds(&self) -> bool {
        self.lost == 0
            && self.conflicting_terminals == 0
            && self.stale_delivered == 0
            && self.text_mismatches == 0
            && self.order_violations == 0
    }
}

impl fmt::Display for StormReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "storm: {} jobs over {} sessions on {} workers in {:.1} s",
            self.jobs,
            self.sessions,
            self.workers,
            self.duration.as_secs_f64()
        )?;
        writeln!(
            f,
            "  faults: {} CLI kills, {} bursts of 529s, {} stream cuts, 1 worker SIGKILL, 1 SIGSTOP past the lease, 1 broker restart, 1 PostgreSQL restart ({} worker restarts)",
            self.cli_kills, self.bursts_529, self.stream_cuts, self.worker_restarts
        )?;
        writeln!(
            f,
            "  outcome: {} completed, failed {:?}; {} lost, {} conflicting terminals, {} duplicate terminal deliveries (deduped)",
            self.completed, self.failed, self.lost, self.conflicting_terminals, self.duplicate_deliveries
        )?;
        write!(
            f,
            "  reader: {} stale events arrived, {} delivered; {} text mismatches; {} text_reset, {} retrying events; {} order violations",
            self.stale_arrived,
            self.stale_delivered,
            self.text_mismatches,
            self.text_resets,
            self.retrying_events,
            self.order_violations
        )
    }
}

/// A worker process slot; the storm's supervisor restarts its process when
/// it exits.
struct Slot {
    n: usize,
    child: Child,
    pid: i32,
    config: PathBuf,
    home: PathBuf,
    log: PathBuf,
}

impl Slot {
    fn spawn(n: usize, config: PathBuf, home: PathBuf, log: PathBuf) -> Slot {
        let mut cmd = world::worker_command(&config, &home, "warn");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        cmd.stderr(file);
        let child = cmd.spawn().expect("spawn claude-worker");
        let pid = child.id().expect("running") as i32;
        Slot {
            n,
            child,
            pid,
            config,
            home,
            log,
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: a plain syscall on our own child.
        unsafe { libc::kill(self.pid, sig) };
    }

    fn respawn(&mut self) {
        *self = Slot::spawn(
            self.n,
            self.config.clone(),
            self.home.clone(),
            self.log.clone(),
        );
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        let _ = self.child.start_kill();
    }
}

struct Job {
    id: String,
    session: usize,
}

/// Runs the storm; panics only on harness failures (a node that does not
/// boot), never on a broken promise — that is in the report.
pub async fn run(cfg: StormConfig) -> StormReport {
    let started = Instant::now();
    let node = BrokerNode::start().await;
    let pg = tokio::task::spawn_blocking(PgNode::start).await.unwrap();
    let mock = Arc::new(MockApi::start().await);
    let dir = tempfile::Builder::new()
        .prefix("cwstorm")
        .tempdir()
        .unwrap();
    let id = world::world_id();
    let prefix = format!("cwstorm.{}", &id[..12]);
    let topo = Topology::from_prefix(&prefix, "prompt");
    let url = node.url();
    let mut rx = tap(url.clone(), topo.clone(), format!("{prefix}.tap"));

    let slots = Arc::new(Mutex::new(
        (0..cfg.workers)
            .map(|n| spawn_slot(n, dir.path(), &prefix, &pg.url(), &url, &mock))
            .collect::<Vec<Slot>>(),
    ));
    let restarts = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let supervisor = tokio::spawn(supervise(slots.clone(), restarts.clone(), done.clone()));
    let markers = markers_of(&prefix, cfg.workers);
    let faults = Faults::default();
    let chaos = tokio::spawn(
        faults
            .clone()
            .background(mock.clone(), markers, done.clone()),
    );

    // Expected length of the run, to place the big faults inside it.
    let expected = Duration::from_secs_f64(cfg.jobs as f64 / 2.0);
    let jobs = Arc::new(Mutex::new(Vec::new()));
    let producing = tokio::spawn(produce(
        url.clone(),
        topo.clone(),
        cfg.clone(),
        expected / 2,
        jobs.clone(),
    ));
    big_faults(expected, &slots, &node, &pg).await;
    producing.await.unwrap();

    let jobs: Vec<Job> = std::mem::take(&mut *jobs.lock().unwrap());
    let arrived = collect(&mut rx, &jobs, expected * 3 + Duration::from_secs(120)).await;
    done.store(true, Ordering::SeqCst);
    let _ = chaos.await;
    let _ = supervisor.await;

    let mut report = judge(&jobs, &arrived);
    report.order_violations = order_violations(&pg.url()).await;
    report.jobs = jobs.len();
    report.sessions = cfg.sessions;
    report.workers = cfg.workers;
    report.cli_kills = faults.cli_kills.load(Ordering::SeqCst);
    report.bursts_529 = faults.bursts.load(Ordering::SeqCst);
    report.stream_cuts = faults.cuts.load(Ordering::SeqCst);
    report.worker_restarts = restarts.load(Ordering::SeqCst);
    report.duration = started.elapsed();
    stop_workers(&slots).await;
    // No CLI of the storm's outlives it (they die with their worker; this
    // is the belt to that).
    for m in &markers_of(&prefix, cfg.workers) {
        for pid in cli_pids(m) {
            // SAFETY: a plain syscall; the pid is a CLI of ours.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    drop(rx);
    drop(pg);
    drop(node);
    report
}

fn markers_of(prefix: &str, workers: usize) -> Vec<String> {
    (0..workers).map(|n| format!("{prefix}.w{n}")).collect()
}

fn spawn_slot(
    n: usize,
    base: &std::path::Path,
    prefix: &str,
    db_url: &str,
    amqp_url: &str,
    mock: &MockApi,
) -> Slot {
    let base = base.join(format!("w{n}"));
    let home = base.join("home");
    let api_url = mock.base_url();
    let marker = format!("{prefix}.w{n}");
    let mut s = world::worker_settings(&WorkerPlace {
        prefix,
        db_url,
        api_url: &api_url,
        home: &home,
        work: &base.join("work"),
        marker: &marker,
    });
    s.amqp.url = Secret::new(amqp_url);
    s.amqp.publish_timeout_ms = 2_000;
    s.worker.id = format!("storm-w{n}");
    s.worker.lease_ttl_secs = LEASE_TTL_SECS;
    s.worker.max_concurrent_turns = 4;
    s.retry.max_attempts = 10;
    s.retry.min_delay_ms = 50;
    s.retry.max_delay_ms = 500;
    s.retry.max_total_secs = 600;
    s.claude.turn_timeout_secs = 60;
    let config = base.join("config.toml");
    world::write_config(&s, &config);
    Slot::spawn(n, config, home, base.join("worker.log"))
}

/// Restarts a worker process that exited, like systemd would.
async fn supervise(
    slots: Arc<Mutex<Vec<Slot>>>,
    restarts: Arc<AtomicUsize>,
    done: Arc<AtomicBool>,
) {
    while !done.load(Ordering::SeqCst) {
        for slot in slots.lock().unwrap().iter_mut() {
            if let Ok(Some(_)) = slot.child.try_wait() {
                slot.respawn();
                restarts.fetch_add(1, Ordering::SeqCst);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[derive(Clone, Default)]
struct Faults {
    cli_kills: Arc<AtomicUsize>,
    bursts: Arc<AtomicUsize>,
    cuts: Arc<AtomicUsize>,
}

impl Faults {
    /// Small faults all along: a CLI killed every ~4 s, a burst of four
    /// 529s every ~7 s, a stream cut mid-answer every ~5 s.
    async fn background(self, mock: Arc<MockApi>, markers: Vec<String>, done: Arc<AtomicBool>) {
        let mut tick = 0u64;
        while !done.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(500)).await;
            tick += 1;
            if tick.is_multiple_of(8) {
                let pids: Vec<i32> = markers.iter().flat_map(|m| cli_pids(m)).collect();
                if !pids.is_empty() {
                    let pid = pids[rand::rng().random_range(0..pids.len())];
                    // SAFETY: a plain syscall; the pid is a CLI of ours.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    self.cli_kills.fetch_add(1, Ordering::SeqCst);
                }
            }
            if tick.is_multiple_of(14) {
                for _ in 0..4 {
                    mock.push_behavior(Behavior::status(529, "overloaded_error", "Overloaded"));
                }
                self.bursts.fetch_add(1, Ordering::SeqCst);
            }
            if tick % 10 == 5 {
                mock.push_behavior(Behavior::cut("a stream that is cut part-way", 2));
                self.cuts.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

/// The big faults, spread over the expected run: a worker SIGKILLed, one
/// SIGSTOPped for twice the lease TTL, the broker and the database each
/// down for a few seconds. (Sleeps here are the scenario's timeline.)
async fn big_faults(
    expected: Duration,
    slots: &Arc<Mutex<Vec<Slot>>>,
    node: &BrokerNode,
    pg: &PgNode,
) {
    let at = |f: f64| expected.mul_f64(f);
    let t0 = Instant::now();
    tokio::time::sleep_until(t0 + at(0.15)).await;
    slots.lock().unwrap()[0].signal(libc::SIGKILL);
    tokio::time::sleep_until(t0 + at(0.3)).await;
    let paused = slots.lock().unwrap().len() - 1;
    slots.lock().unwrap()[paused].signal(libc::SIGSTOP);
    tokio::time::sleep(Duration::from_secs(2 * LEASE_TTL_SECS)).await;
    slots.lock().unwrap()[paused].signal(libc::SIGCONT);
    tokio::time::sleep_until(t0 + at(0.45)).await;
    node.stop_app().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    node.start_app().await;
    tokio::time::sleep_until(t0 + at(0.6)).await;
    tokio::task::block_in_place(|| pg.stop());
    tokio::time::sleep(Duration::from_secs(3)).await;
    tokio::task::block_in_place(|| pg.start_again());
}

/// Publishes the jobs round-robin over the sessions, spread over `over`;
/// a publish that fails (the broker restarting) is retried with the same
/// job id on a new connection.
async fn produce(
    url: String,
    topo: Topology,
    cfg: StormConfig,
    over: Duration,
    jobs: Arc<Mutex<Vec<Job>>>,
) {
    let mut ch = producer(&url, &topo).await;
    let pause = over.div_f64(cfg.jobs as f64);
    for i in 0..cfg.jobs {
        let session = i % cfg.sessions;
        let id = uuid::Uuid::new_v4().to_string();
        let body = json!({"v": 1, "job_id": id, "session_key": format!("storm:{session}"),
                          "prompt": format!("storm job {i} of session {session}")});
        while !try_publish(
            &ch,
            &topo.jobs_exchange,
            &topo.jobs_routing_key,
            REPLY_KEY,
            &body,
        )
        .await
        {
            ch = producer(&url, &topo).await;
        }
        jobs.lock().unwrap().push(Job { id, session });
        tokio::time::sleep(pause).await;
    }
}

/// Everything the tap sees until every job has a terminal event (or the
/// deadline), then a short settle for stragglers; per job, in arrival order.
async fn collect(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Seen>,
    jobs: &[Job],
    limit: Duration,
) -> HashMap<String, Vec<(EventV1, Option<i64>)>> {
    let mut arrived: HashMap<String, Vec<(EventV1, Option<i64>)>> = HashMap::new();
    let mut open: std::collections::HashSet<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
    let deadline = Instant::now() + limit;
    let mut settle: Option<Instant> = None;
    loop {
        if open.is_empty() && settle.is_none() {
            settle = Some(Instant::now() + Duration::from_secs(3));
        }
        let until = settle.unwrap_or(deadline).min(deadline);
        let Ok(Some((raw, epoch))) = tokio::time::timeout_at(until, rx.recv()).await else {
            return arrived;
        };
        let Ok(ev) = serde_json::from_value::<EventV1>(raw) else {
            continue;
        };
        if ev.body.is_terminal() {
            open.remove(ev.job_id.as_str());
        }
        arrived
            .entry(ev.job_id.clone())
            .or_default()
            .push((ev, epoch));
    }
}

fn judge(jobs: &[Job], arrived: &HashMap<String, Vec<(EventV1, Option<i64>)>>) -> StormReport {
    let mut r = StormReport::default();
    let none = Vec::new();
    for job in jobs {
        let events = arrived.get(&job.id).unwrap_or(&none);
        let mut terminals: BTreeMap<u64, &EventV1> = BTreeMap::new();
        let mut max_epoch = None;
        let mut tracker = JobTracker::new(job.id.clone());
        let mut delivered_max = None;
        for (ev, epoch) in events {
            if epoch.is_some() && *epoch < max_epoch {
                r.stale_arrived += 1;
            }
            max_epoch = max_epoch.max(*epoch);
            if ev.body.is_terminal() && terminals.insert(ev.seq, ev).is_some() {
                r.duplicate_deliveries += 1;
            }
            if tracker.accept(ev, *epoch) != Step::Skip {
                if epoch.is_some() && *epoch < delivered_max {
                    r.stale_delivered += 1;
                }
                delivered_max = delivered_max.max(*epoch);
                match &ev.body {
                    EventBody::TextReset { .. } => r.text_resets += 1,
                    EventBody::Retrying { .. } => r.retrying_events += 1,
                    _ => {}
                }
            }
        }
        if terminals.len() > 1 {
            r.conflicting_terminals += 1;
        }
        match terminals.values().next().map(|e| &e.body) {
            None => r.lost += 1,
            Some(EventBody::Completed { result, .. }) => {
                r.completed += 1;
                if tracker.text() != result {
                    r.text_mismatches += 1;
                }
            }
            Some(EventBody::Failed { error, .. }) => {
                *r.failed.entry(format!("{error:?}")).or_default() += 1;
            }
            Some(other) => *r.failed.entry(other.type_name().to_string()).or_default() += 1,
        }
        let _ = job.session;
    }
    r
}

/// Consecutive jobs of a session (acceptance order) must not overlap: the
/// later one starts after the earlier one finished.
async fn order_violations(db_url: &str) -> usize {
    let mut conn = sqlx::PgConnection::connect(db_url)
        .await
        .expect("the storm's database");
    let rows: Vec<(String, i64, Option<i64>, Option<i64>)> = sqlx::query_as(
        "SELECT session_key, job_order, started_at_ms, finished_at_ms FROM jobs \
         ORDER BY session_key, job_order",
    )
    .fetch_all(&mut conn)
    .await
    .expect("jobs");
    rows.windows(2)
        .filter(|w| w[0].0 == w[1].0)
        .filter(|w| match (w[0].3, w[1].2) {
            (Some(finished), Some(next_started)) => next_started < finished,
            (None, Some(_)) => true,
            _ => false,
        })
        .count()
}

async fn stop_workers(slots: &Arc<Mutex<Vec<Slot>>>) {
    let mut slots: Vec<Slot> = std::mem::take(&mut *slots.lock().unwrap());
    for s in &slots {
        s.signal(libc::SIGCONT);
        s.signal(libc::SIGTERM);
    }
    for s in &mut slots {
        if tokio::time::timeout(Duration::from_secs(30), s.child.wait()).await.is_err() {
            let _ = s.child.kill().await;
        }
    }
}
