//! Fleet benchmark (`cargo bench --bench fleet`): throughput with 1, 2 and
//! 3 worker processes sharing one RabbitMQ and one PostgreSQL, on a fast
//! mock API (the real Claude CLI runs every turn), and recovery time after
//! a worker is SIGKILLed mid-turn (kill → the interrupted job's next event).
//!
//! Needs the same services as the integration tests (RabbitMQ on
//! localhost, `TEST_POSTGRES_URL`, the CLI via `CLAUDE_BIN` or
//! `.cache/claude-cli`). `FLEET_BENCH_JOBS` (default 40) sets the jobs per
//! run.

#[path = "../tests/it/mock_api.rs"]
#[allow(unused_imports)]
mod mock_api;
#[path = "../tests/it/support.rs"]
mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use claude_worker::broker::Topology;
use claude_worker::protocol::EventV1;
use futures_util::StreamExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use mock_api::{Behavior, MockApi};
use serde_json::json;
use sqlx::Connection as _;
use support::claude_bin;
use tokio::sync::mpsc;

const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const SLOTS_PER_WORKER: usize = 2;

fn pg_admin() -> String {
    std::env::var("TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// One isolated run: its own prefix, database, mock and temp dir.
struct World {
    prefix: String,
    dir: tempfile::TempDir,
    db_name: String,
    db_url: String,
    mock: MockApi,
    topology: Topology,
    conn: Connection,
    channel: Channel,
    reply_key: String,
    events: mpsc::UnboundedReceiver<(EventV1, Instant)>,
}

impl World {
    async fn new() -> World {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let prefix = format!("cwbench.{}", &id[..12]);
        let db_name = format!("cw_bench_{}", &id[..16]);
        let admin = pg_admin();
        let mut c = sqlx::PgConnection::connect(&admin).await.expect("Postgres");
        sqlx::query(&format!("CREATE DATABASE {db_name}"))
            .execute(&mut c)
            .await
            .expect("create db");
        let base = admin.rsplit_once('/').map(|(b, _)| b.to_string()).unwrap();
        let db_url = format!("{base}/{db_name}");
        let mock = MockApi::start().await;
        mock.set_default(Behavior::Reply {
            text: "ok".into(),
            chunks: 1,
        });
        let topology = Topology::from_prefix(&prefix, "prompt");
        let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
            .await
            .expect("RabbitMQ");
        let channel = conn.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        topology.declare(&channel).await.unwrap();
        let reply_key = format!("bench.{}", &id[..12]);
        let ch = conn.create_channel().await.unwrap();
        let mut consumer = claude_worker::broker::consume_private(
            &ch,
            &topology.replies_exchange,
            &reply_key,
            "",
            true,
        )
        .await
        .unwrap();
        let (tx, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let _keep = ch;
            while let Some(Ok(d)) = consumer.next().await {
                let e: EventV1 = serde_json::from_slice(&d.data).unwrap();
                if tx.send((e, Instant::now())).is_err() {
                    break;
                }
            }
        });
        World {
            prefix,
            dir: tempfile::tempdir().unwrap(),
            db_name,
            db_url,
            mock,
            topology,
            conn,
            channel,
            reply_key,
            events,
        }
    }

    fn spawn_worker(&self, n: usize, lease_ttl_secs: u64) -> Child {
        let base = self.dir.path().join(format!("w{n}"));
        let home = base.join("home");
        std::fs::create_dir_all(home.join(".claude")).unwrap();
        let toml = format!(
            r#"
[amqp]
url = "{AMQP_URL}"
prefix = "{prefix}"
[database]
url = "{db}"
max_connections = 4
[worker]
id = "bench-w{n}"
max_concurrent_turns = {SLOTS_PER_WORKER}
lease_ttl_secs = {lease_ttl_secs}
sweep_interval_secs = 1
shutdown_grace_secs = 5
[claude]
path = "{cli}"
[retry]
min_delay_ms = 50
max_delay_ms = 200
[profiles.default]
workdir = "{work}"
[profiles.default.env]
ANTHROPIC_BASE_URL = "{mock}"
ANTHROPIC_API_KEY = "sk-bench"
CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC = "1"
CLAUDE_CODE_MAX_RETRIES = "0"
HOME = "{home}"
CLAUDE_CONFIG_DIR = "{home}/.claude"
"#,
            prefix = self.prefix,
            db = self.db_url,
            cli = claude_bin().display(),
            work = base.join("work").display(),
            mock = self.mock.base_url(),
            home = home.display(),
        );
        let config = base.join("config.toml");
        std::fs::write(&config, toml).unwrap();
        Command::new(env!("CARGO_BIN_EXE_claude-worker"))
            .arg("--config")
            .arg(&config)
            .arg("worker")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", &home)
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn claude-worker")
    }

    async fn wait_for_consumers(&self, n: u32) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let q = self
                .channel
                .queue_declare(
                    self.topology.jobs_queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .unwrap();
            if q.consumer_count() >= n {
                return;
            }
            assert!(Instant::now() < deadline, "workers did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn publish(&self, session_key: &str, prompt: &str) -> String {
        let job_id = uuid::Uuid::new_v4().to_string();
        let body = json!({"v": 1, "job_id": job_id, "session_key": session_key, "prompt": prompt});
        self.channel
            .basic_publish(
                self.topology.jobs_exchange.as_str().into(),
                "prompt".into(),
                BasicPublishOptions::default(),
                body.to_string().as_bytes(),
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_reply_to(self.reply_key.as_str().into())
                    .with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        job_id
    }

    /// The next event, bounded.
    async fn next_event(&mut self) -> (EventV1, Instant) {
        tokio::time::timeout(Duration::from_secs(300), self.events.recv())
            .await
            .expect("an event within 300 s")
            .expect("reply consumer")
    }

    async fn cleanup(self) {
        self.topology.delete(&self.channel).await;
        let _ = self.conn.close(200, "bench done".into()).await;
        if let Ok(mut c) = sqlx::PgConnection::connect(&pg_admin()).await {
            let _ = sqlx::query(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.db_name
            ))
            .execute(&mut c)
            .await;
        }
    }
}

fn kill(children: &mut [Child]) {
    for c in children {
        let _ = c.kill();
        let _ = c.wait();
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
    kill(&mut children);
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
    let _ = children[victim].kill();
    let _ = children[victim].wait();
    let took = loop {
        let (e, at) = w.next_event().await;
        if e.job_id == job {
            break at - killed_at;
        }
    };
    kill(&mut children);
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
