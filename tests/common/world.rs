//! What every test world and bench world is made of: the broker side (a
//! prefix's topology, a confirm channel, a private reply queue), a fresh
//! database, a worker's settings as a typed `Settings` (written as TOML
//! for worker processes), starting `claude-worker worker` processes, and
//! bounded waits.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use claude_worker::broker::Topology;
use claude_worker::config::{Secret, Settings};
use futures_util::StreamExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::{json, Value};
use sqlx::Connection as _;
use tokio::sync::mpsc;

use super::support::claude_bin;

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// How long a test waits for any one thing before failing.
pub const WAIT: Duration = Duration::from_secs(60);

pub fn postgres_admin_url() -> String {
    std::env::var("TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A random id for a world's names.
pub fn world_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Creates database `name` on the test server; returns its URL.
pub async fn create_database(name: &str) -> String {
    let admin = postgres_admin_url();
    let mut c = sqlx::PgConnection::connect(&admin)
        .await
        .expect("connect to Postgres");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut c)
        .await
        .expect("create the test database");
    let base = admin
        .rsplit_once('/')
        .map(|(b, _)| b.to_string())
        .unwrap_or(admin);
    format!("{base}/{name}")
}

pub async fn drop_database(name: &str) {
    if let Ok(mut c) = sqlx::PgConnection::connect(&postgres_admin_url()).await {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut c)
            .await;
    }
}

/// Waits until `done()` holds, polling every 20 ms, for at most `WAIT`;
/// fails saying `what` did not happen. Only for state with no event to
/// wait on (another process's files or rows, /proc).
pub async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// [`wait_until`] for a condition that needs I/O to check (a database row
/// another process writes).
pub async fn wait_until_async<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !done().await {
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The broker side of a world: its prefix's topology declared, a confirm
/// channel, and the routing key its replies come back on.
pub struct Bus {
    pub prefix: String,
    pub topology: Topology,
    pub conn: Connection,
    pub channel: Channel,
    pub reply_key: String,
}

impl Bus {
    /// `kind` starts the prefix (`cwtest`, `cwbench`), so leftovers are
    /// recognisable.
    pub async fn new(kind: &str, id: &str) -> Bus {
        let prefix = format!("{kind}.{}", &id[..12]);
        let topology = Topology::from_prefix(&prefix, "prompt");
        let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
            .await
            .expect("RabbitMQ on 127.0.0.1:5672");
        let channel = conn.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        topology.declare(&channel).await.expect("declare topology");
        let reply_key = format!("{kind}-reply.{}", &id[..12]);
        Bus {
            prefix,
            topology,
            conn,
            channel,
            reply_key,
        }
    }

    /// Publishes a job body (any bytes) with `reply_to` = this world's key,
    /// and waits for the broker's confirm.
    pub async fn publish_raw(&self, body: &[u8], message_id: Option<&str>) {
        let mut props = self.job_props();
        if let Some(id) = message_id {
            props = props.with_message_id(id.into());
        }
        self.publish_with(body, props).await
    }

    /// The properties a job is published with: JSON, persistent, replies
    /// to this world's key. Add to them for [`Bus::publish_with`].
    pub fn job_props(&self) -> BasicProperties {
        BasicProperties::default()
            .with_content_type("application/json".into())
            .with_reply_to(self.reply_key.as_str().into())
            .with_delivery_mode(2)
    }

    /// Publishes a job body with `props`, waiting for the broker's confirm.
    pub async fn publish_with(&self, body: &[u8], props: BasicProperties) {
        self.channel
            .basic_publish(
                self.topology.jobs_exchange.as_str().into(),
                "prompt".into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// Publishes a v1 job (`extra` merged into the body); returns its id.
    pub async fn publish_job(&self, session_key: &str, prompt: &str, extra: Value) -> String {
        let job_id = uuid::Uuid::new_v4().to_string();
        let mut body =
            json!({"v": 1, "job_id": job_id, "session_key": session_key, "prompt": prompt});
        if let (Value::Object(b), Value::Object(e)) = (&mut body, extra) {
            b.extend(e);
        }
        let job_id = body["job_id"].as_str().unwrap().to_string();
        self.publish_raw(body.to_string().as_bytes(), None).await;
        job_id
    }

    /// Publishes a control message (reply_to = this world's key) to every
    /// worker; returns its request id.
    pub async fn publish_control(&self, body: Value) -> String {
        self.publish_control_as(body, None).await
    }

    /// [`Bus::publish_control`] with the AMQP `user_id` property (RabbitMQ
    /// refuses one other than the connection's user, `guest`).
    pub async fn publish_control_as(&self, body: Value, user: Option<&str>) -> String {
        let request_id = uuid::Uuid::new_v4().to_string();
        let mut props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id(request_id.as_str().into())
            .with_reply_to(self.reply_key.as_str().into());
        if let Some(u) = user {
            props = props.with_user_id(u.into());
        }
        self.channel
            .basic_publish(
                self.topology.control_exchange.as_str().into(),
                "".into(),
                BasicPublishOptions::default(),
                body.to_string().as_bytes(),
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        request_id
    }

    /// Everything published to this world's reply key, as it arrives.
    pub async fn replies(&self) -> mpsc::UnboundedReceiver<Reply> {
        subscribe(&self.conn, &self.topology, &self.reply_key).await
    }

    /// Waits until `n` consumers are attached to the jobs queue (worker
    /// processes starting: the broker's count, polled, bounded).
    pub async fn wait_for_consumers(&self, n: u32) {
        let deadline = Instant::now() + WAIT;
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
            assert!(
                Instant::now() < deadline,
                "{n} workers did not start consuming"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Deletes the world's exchanges and queues and closes the connection.
    pub async fn delete(&self) {
        self.topology.delete(&self.channel).await;
        let _ = self.conn.close(200, "world done".into()).await;
    }
}

/// One message from a reply queue, with when it arrived and who sent it.
#[derive(Debug, Clone)]
pub struct Reply {
    pub raw: Value,
    pub at: Instant,
    pub worker_id: Option<String>,
    pub lease_epoch: Option<i64>,
}

/// Binds a private queue to `key` on the replies exchange and forwards
/// what arrives (JSON bodies; anything else ends the stream loudly).
pub async fn subscribe(
    conn: &Connection,
    topology: &Topology,
    key: &str,
) -> mpsc::UnboundedReceiver<Reply> {
    let ch = conn.create_channel().await.unwrap();
    let mut consumer =
        claude_worker::broker::consume_private(&ch, &topology.replies_exchange, &[key], "", true)
            .await
            .unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let _keep = ch;
        while let Some(Ok(d)) = consumer.next().await {
            let at = Instant::now();
            let raw: Value = serde_json::from_slice(&d.data).expect("replies are JSON");
            let headers = d.properties.headers().clone().unwrap_or_default();
            let worker_id = match headers.inner().get("x-worker-id") {
                Some(AMQPValue::LongString(s)) => Some(s.to_string()),
                _ => None,
            };
            let lease_epoch = match headers.inner().get("x-lease-epoch") {
                Some(AMQPValue::LongLongInt(n)) => Some(*n),
                _ => None,
            };
            let reply = Reply {
                raw,
                at,
                worker_id,
                lease_epoch,
            };
            if tx.send(reply).is_err() {
                break;
            }
        }
    });
    rx
}

/// Where a worker of a world lives.
pub struct WorkerPlace<'a> {
    pub prefix: &'a str,
    pub db_url: &'a str,
    /// The mock Messages API the CLI talks to.
    pub api_url: &'a str,
    /// The CLI's HOME (`<home>/.claude` is its config dir).
    pub home: &'a Path,
    /// Profile working directories go below this.
    pub work: &'a Path,
    /// `CW_TEST_PREFIX` of its CLI processes (to find them in /proc).
    pub marker: &'a str,
}

/// A worker's settings for a world, typed: the compiled-in defaults with
/// the world's broker prefix, database, CLI and mock API, short timings
/// (lease TTL 10 s, sweep 1 s, grace 5 s, retries 50-200 ms) and the three
/// shipped profiles pointed at the mock. Change fields per test.
pub fn worker_settings(place: &WorkerPlace) -> Settings {
    std::fs::create_dir_all(place.home.join(".claude")).unwrap();
    let mut s = Settings::from_toml_overrides("").expect("the compiled-in defaults load");
    s.amqp.url = Secret::new(AMQP_URL);
    s.amqp.prefix = place.prefix.to_string();
    s.database.url = Secret::new(place.db_url);
    s.database.max_connections = 4;
    s.worker.lease_ttl_secs = 10;
    s.worker.sweep_interval_secs = 1;
    s.worker.shutdown_grace_secs = 5;
    s.claude.path = claude_bin();
    s.claude.turn_timeout_secs = 120;
    s.retry.max_attempts = 3;
    s.retry.min_delay_ms = 50;
    s.retry.max_delay_ms = 200;
    s.retry.max_total_secs = 120;
    let home = place.home.display().to_string();
    for (name, profile) in s.profiles.iter_mut() {
        profile.workdir = place.work.join(name);
        for (k, v) in [
            ("ANTHROPIC_BASE_URL", place.api_url.to_string()),
            ("ANTHROPIC_API_KEY", "sk-test-secret-key".to_string()),
            ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1".to_string()),
            ("CLAUDE_CODE_MAX_RETRIES", "0".to_string()),
            ("HOME", home.clone()),
            ("CLAUDE_CONFIG_DIR", format!("{home}/.claude")),
            ("CW_TEST_PREFIX", place.marker.to_string()),
        ] {
            profile.env.insert(k.to_string(), Secret::new(v));
        }
    }
    s
}

/// Writes `settings` as a TOML file a worker process reads with `--config`.
pub fn write_config(settings: &Settings, path: &Path) {
    let text = toml::to_string(settings).expect("settings serialise as TOML");
    std::fs::write(path, text).unwrap();
}

/// `claude-worker --config <config> worker` with a clean environment
/// (PATH, HOME, CLAUDE_CONFIG_DIR, RUST_LOG) and stdout discarded; the
/// caller sets stderr and extra variables.
pub fn worker_command(config: &Path, home: &Path, rust_log: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_claude-worker"));
    cmd.arg("--config")
        .arg(config)
        .arg("worker")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("CLAUDE_CONFIG_DIR", home.join(".claude"))
        .env("RUST_LOG", rust_log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Pids of CLI processes started by this test's workers (found by the
/// marker env var the test profiles set).
pub fn cli_pids(prefix: &str) -> Vec<i32> {
    let needle = format!("CW_TEST_PREFIX={prefix}");
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) {
            if env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()) {
                // Skip zombies: they are dead, only not yet reaped.
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                if !stat.contains(") Z ") {
                    pids.push(pid);
                }
            }
        }
    }
    pids
}
