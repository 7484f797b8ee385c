//! Fleet benchmark (`cargo bench --bench fleet`): throughput with 1, 2 and
//! 3 worker processes sharing one RabbitMQ and one PostgreSQL, on a fast
//! mock API (the real Claude CLI runs every turn), and recovery time after
//! a worker is SIGKILLed mid-turn (kill → the interrupted job's next event).
//!
//! Needs the same services as the integration tests (RabbitMQ on
//! localhost, `TEST_POSTGRES_URL`, the CLI via `CLAUDE_BIN` or
//! `.cache/claude-cli`). `FLEET_BENCH_JOBS` (default 40) sets the jobs per
//! run.

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)] // its unit tests' imports
mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use claude_worker::protocol::EventV1;
use common::mock_api::{Behavior, MockApi};
use common::world::{self, Bus, Reply, WorkerPlace};
use serde_json::json;
use tokio::process::Child;
use tokio::sync::mpsc;

const SLOTS_PER_WORKER: usize = 2;

/// One isolated run: its own prefix, database, mock and temp dir.
struct World {
    dir: tempfile::TempDir,
    db_name: String,
    db_url: String,
    mock: MockApi,
    bus: Bus,
    events: mpsc::UnboundedReceiver<Reply>,
}

impl World {
    async fn new() -> World {
        let id = world::world_id();
        let db_name = format!("cw_bench_{}", &id[..16]);
        let db_url = world::create_database(&db_name).await;
        let mock = MockApi::start().await;
        mock.set_default(Behavior::Reply {
            text: "ok".into(),
            chunks: 1,
        });
        let bus = Bus::new("cwbench", &id).await;
        let events = bus.replies().await;
        World {
            dir: tempfile::tempdir().unwrap(),
            db_name,
            db_url,
            mock,
            bus,
            events,
        }
    }

    fn spawn_worker(&self, n: usize, lease_ttl_secs: u64) -> Child {
        let base = self.dir.path().join(format!("w{n}"));
        let home = base.join("home");
        let api_url = self.mock.base_url();
        let mut settings = world::worker_settings(&WorkerPlace {
            prefix: &self.bus.prefix,
            db_url: &self.db_url,
            api_url: &api_url,
            home: &home,
            work: &base.join("work"),
            marker: &self.bus.prefix,
        });
        settings.worker.id = format!("bench-w{n}");
        settings.worker.max_concurrent_turns = SLOTS_PER_WORKER;
        settings.worker.lease_ttl_secs = lease_ttl_secs;
        let config = base.join("config.toml");
        world::write_config(&settings, &config);
        world::worker_command(&config, &home, "error")
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn claude-worker")
    }

    async fn wait_for_consumers(&self, n: u32) {
        self.bus.wait_for_consumers(n).await
    }

    async fn publish(&self, session_key: &str, prompt: &str) -> String {
        self.bus.publish_job(session_key, prompt, json!({})).await
    }

    /// The next event, bounded.
    async fn next_event(&mut self) -> (EventV1, Instant) {
        let reply = tokio::time::timeout(Duration::from_secs(300), self.events.recv())
            .await
            .expect("an event within 300 s")
            .expect("reply consumer");
        (
            serde_json::from_value(reply.raw).expect("a v1 event"),
            reply.at,
        )
    }

    async fn cleanup(self) {
        self.bus.delete().await;
        world::drop_database(&self.db_name).await;
    }
}

async fn kill(children: &mut [Child]) {
    for c in children {
        let _ = c.start_kill();
        let _ = c.wait().await;
    }
}

/// Jobs/s with `workers` worker processes: `jobs` jobs over `jobs / 2`
/// sessions, published in a burst, timed from the first publish to the
/// last terminal event.
async fn throughput(workers: usize, jobs: usize) -> f64 {
    let mut w = World::new().await;
    let mut children: Vec<Child> = (0..workers).map(|n| w.spawn_worker(n, 30)).collect();
    w.wait_for_consumers(workers as u32).await;
    let sessions = (jobs / 2).max(1);
    let start = Instant::now();
    for j in 0..jobs {
        w.publish(&format!("bench:s{}", j % sessions), &format!("job {j}"))
            .await;
    }
    let mut done = 0;
    let mut last = start;
    while done < jobs {
        let (e, at) = w.next_event().await;
        if e.body.is_terminal() {
            done += 1;
            last = at;
        }
    }
    kill(&mut children).await;
    w.cleanup().await;
    jobs as f64 / (last - start).as_secs_f64()
}

/// Kill → next event of the interrupted job, with a 3 s lease and a 1 s sweep.
async fn recovery() -> Duration {
    let mut w = World::new().await;
    let mut children: Vec<Child> = (0..2).map(|n| w.spawn_worker(n, 3)).collect();
    w.wait_for_consumers(2).await;
    w.mock.push_behavior_for("crash", Behavior::hold("held"));
    let job = w.publish("bench:crash", "[[mock:crash]] hold").await;
    w.mock.wait_for_held(1, Duration::from_secs(120)).await;
    // Which worker runs it: the one whose CLI the mock is talking to is
    // unknown here, so ask the database.
    let store =
        claude_worker::store::connect(&claude_worker::config::Secret::new(w.db_url.clone()), 1)
            .await
            .unwrap();
    let owner = store
        .get_session("bench:crash")
        .await
        .unwrap()
        .and_then(|s| s.lease_owner)
        .expect("a lease holder");
    let victim = if owner == "bench-w0" { 0 } else { 1 };
    // Drain what arrived before the kill.
    while w.events.try_recv().is_ok() {}
    let killed_at = Instant::now();
    let _ = children[victim].start_kill();
    let _ = children[victim].wait().await;
    let took = loop {
        let (e, at) = w.next_event().await;
        if e.job_id == job {
            break at - killed_at;
        }
    };
    kill(&mut children).await;
    w.cleanup().await;
    took
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let jobs: usize = std::env::var("FLEET_BENCH_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    rt.block_on(async {
        let mut rates = Vec::new();
        for workers in 1..=3 {
            let rate = throughput(workers, jobs).await;
            println!(
                "fleet/throughput workers={workers} slots/worker={SLOTS_PER_WORKER} jobs={jobs}: {rate:.2} jobs/s"
            );
            rates.push(rate);
        }
        println!(
            "fleet/scaling 2 workers: {:.2}x, 3 workers: {:.2}x (vs 1)",
            rates[1] / rates[0],
            rates[2] / rates[0]
        );
        let r = recovery().await;
        println!(
            "fleet/recovery after SIGKILL (lease 3 s, sweep 1 s): {:.2} s",
            r.as_secs_f64()
        );
    });
}
