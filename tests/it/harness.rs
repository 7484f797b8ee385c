//! Test harness: one isolated world per test — a random AMQP prefix, a
//! temp dir (SQLite file, HOME for the CLI, workspaces), a fresh Postgres
//! database when asked, and a mock Anthropic API — plus helpers to start a
//! worker in it, publish jobs and collect reply events.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use claude_worker::broker::Topology;
use claude_worker::config::Settings;
use claude_worker::protocol::{ControlResultV1, EventV1};
use claude_worker::worker::Worker;
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::{json, Value};
use sqlx::Connection as _;
use tempfile::TempDir;
use tokio::sync::mpsc;

use crate::mock_api::MockApi;
use crate::support::claude_bin;

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// How long a test waits for any one thing before failing.
pub const WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub fn postgres_admin_url() -> String {
    std::env::var("TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

pub struct TestEnv {
    pub prefix: String,
    pub dir: TempDir,
    pub mock: MockApi,
    pub db_url: String,
    pg_database: Option<String>,
    pub topology: Topology,
    pub conn: Connection,
    pub channel: Channel,
    /// Routing key this test's reply queue is bound to.
    pub reply_key: String,
    events: mpsc::UnboundedReceiver<(Value, EventV1)>,
    control_results: mpsc::UnboundedReceiver<ControlResultV1>,
    dead_letters: mpsc::UnboundedReceiver<(Vec<u8>, HashMap<String, String>)>,
    /// Events read but not yet returned, per job.
    pending: Vec<(Value, EventV1)>,
}

impl TestEnv {
    pub async fn new(backend: Backend) -> TestEnv {
        init_tracing();
        let id = uuid::Uuid::new_v4().simple().to_string();
        let prefix = format!("cwtest.{}", &id[..12]);
        let dir = tempfile::tempdir().expect("temp dir");
        let (db_url, pg_database) = match backend {
            Backend::Sqlite => (
                format!("sqlite:{}", dir.path().join("worker.db").display()),
                None,
            ),
            Backend::Postgres => {
                let name = format!("cw_test_{}", &id[..16]);
                let admin = postgres_admin_url();
                let mut c = sqlx::PgConnection::connect(&admin)
                    .await
                    .expect("connect to Postgres");
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&mut c)
                    .await
                    .expect("create db");
                let base = admin
                    .rsplit_once('/')
                    .map(|(b, _)| b.to_string())
                    .unwrap_or(admin);
                (format!("{base}/{name}"), Some(name))
            }
        };
        let mock = MockApi::start().await;
        let topology = Topology::from_prefix(&prefix, "prompt");
        let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
            .await
            .expect("RabbitMQ");
        let channel = conn.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        topology.declare(&channel).await.expect("declare topology");
        let reply_key = format!("test.{}", &id[..12]);
        let (events, control_results) = bind_reply_queue(&conn, &topology, &reply_key).await;
        let dead_letters = consume_dead_letters(&conn, &topology).await;
        TestEnv {
            prefix,
            dir,
            mock,
            db_url,
            pg_database,
            topology,
            conn,
            channel,
            reply_key,
            events,
            control_results,
            dead_letters,
            pending: Vec::new(),
        }
    }

    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    /// Settings for a worker in this world. `extra` is TOML layered on top.
    pub fn settings(&self, extra: &str) -> Settings {
        let toml = self.settings_toml(
            &self.home(),
            &self.dir.path().join("workspaces"),
            &self.prefix,
            extra,
        );
        Settings::from_toml_overrides(&toml).expect("test settings")
    }

    /// The TOML of [`TestEnv::settings`], for a worker whose CLI uses
    /// `home` (and `home/.claude` as its config dir) and works below
    /// `work`; its CLI processes carry `CW_TEST_PREFIX=<marker>`.
    pub fn settings_toml(
        &self,
        home: &std::path::Path,
        work: &std::path::Path,
        marker: &str,
        extra: &str,
    ) -> String {
        std::fs::create_dir_all(home.join(".claude")).unwrap();
        let mut profiles = String::new();
        for name in ["default", "discord", "webapp"] {
            profiles.push_str(&format!(
                r#"
[profiles.{name}]
workdir = "{work}/{name}"
[profiles.{name}.env]
ANTHROPIC_BASE_URL = "{base}"
ANTHROPIC_API_KEY = "sk-test-secret-key"
CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC = "1"
CLAUDE_CODE_MAX_RETRIES = "0"
HOME = "{home}"
CLAUDE_CONFIG_DIR = "{home}/.claude"
CW_TEST_PREFIX = "{prefix}"
"#,
                work = work.display(),
                base = self.mock.base_url(),
                home = home.display(),
                prefix = marker,
            ));
        }
        format!(
            r#"
[amqp]
url = "{AMQP_URL}"
prefix = "{prefix}"
[database]
url = "{db}"
max_connections = 4
[worker]
lease_ttl_secs = 10
sweep_interval_secs = 1
shutdown_grace_secs = 5
[claude]
path = "{cli}"
turn_timeout_secs = 120
[retry]
max_attempts = 3
min_delay_ms = 50
max_delay_ms = 200
max_total_secs = 120
{profiles}
{extra}
"#,
            prefix = self.prefix,
            db = self.db_url,
            cli = claude_bin().display(),
        )
    }

    pub async fn start_worker(&self) -> Worker {
        self.start_worker_with(|_| {}).await
    }

    /// Starts a worker after `tweak` has adjusted its settings.
    pub async fn start_worker_with(&self, tweak: impl FnOnce(&mut Settings)) -> Worker {
        let mut settings = self.settings("");
        tweak(&mut settings);
        settings.validate().expect("valid settings");
        Worker::start(settings).await.expect("worker starts")
    }

    /// Publishes a job body (any bytes) with reply_to = this test's key.
    pub async fn publish_raw(&self, body: &[u8], message_id: Option<&str>) {
        let mut props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_reply_to(self.reply_key.as_str().into())
            .with_delivery_mode(2);
        if let Some(id) = message_id {
            props = props.with_message_id(id.into());
        }
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

    /// Publishes a v1 job and returns its job_id.
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

    /// The next event of `job_id` (other jobs' events are kept for later).
    pub async fn next_event(&mut self, job_id: &str) -> (Value, EventV1) {
        if let Some(i) = self.pending.iter().position(|(_, e)| e.job_id == job_id) {
            return self.pending.remove(i);
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let got = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .unwrap_or_else(|_| panic!("no event for job {job_id} within {WAIT:?}"))
                .expect("reply consumer ended");
            if got.1.job_id == job_id {
                return got;
            }
            self.pending.push(got);
        }
    }

    /// All events of `job_id` up to and including its terminal event.
    pub async fn events_until_terminal(&mut self, job_id: &str) -> Vec<EventV1> {
        let mut out = Vec::new();
        loop {
            let (_, e) = self.next_event(job_id).await;
            let terminal = e.body.is_terminal();
            out.push(e);
            if terminal {
                return out;
            }
        }
    }

    /// Waits for one more event of `job_id` for at most `d`; `None` if none came.
    pub async fn maybe_event(&mut self, job_id: &str, d: Duration) -> Option<EventV1> {
        if let Some(i) = self.pending.iter().position(|(_, e)| e.job_id == job_id) {
            return Some(self.pending.remove(i).1);
        }
        let deadline = tokio::time::Instant::now() + d;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(got)) if got.1.job_id == job_id => return Some(got.1),
                Ok(Some(got)) => self.pending.push(got),
                _ => return None,
            }
        }
    }

    /// Publishes a control message (with reply_to = this test's key) and
    /// returns its request id.
    pub async fn publish_control(&self, body: Value) -> String {
        let request_id = uuid::Uuid::new_v4().to_string();
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id(request_id.as_str().into())
            .with_reply_to(self.reply_key.as_str().into());
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

    /// The next control result (they arrive in request order per worker).
    pub async fn next_control_result(&mut self) -> ControlResultV1 {
        tokio::time::timeout(WAIT, self.control_results.recv())
            .await
            .unwrap_or_else(|_| panic!("no control result within {WAIT:?}"))
            .expect("reply consumer ended")
    }

    /// The next dead-lettered message: (body, string headers).
    pub async fn next_dead_letter(&mut self) -> (Vec<u8>, HashMap<String, String>) {
        tokio::time::timeout(WAIT, self.dead_letters.recv())
            .await
            .unwrap_or_else(|_| panic!("no dead letter within {WAIT:?}"))
            .expect("dead-letter consumer ended")
    }

    /// Deletes this test's exchanges, queues and database.
    pub async fn cleanup(self) {
        self.topology.delete(&self.channel).await;
        let _ = self.conn.close(200, "test done".into()).await;
        if let Some(name) = self.pg_database {
            if let Ok(mut c) = sqlx::PgConnection::connect(&postgres_admin_url()).await {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut c)
                    .await;
            }
        }
    }
}

type Replies = (
    mpsc::UnboundedReceiver<(Value, EventV1)>,
    mpsc::UnboundedReceiver<ControlResultV1>,
);

async fn bind_reply_queue(conn: &Connection, topology: &Topology, key: &str) -> Replies {
    let ch = conn.create_channel().await.unwrap();
    let mut consumer =
        claude_worker::broker::consume_private(&ch, &topology.replies_exchange, key, "", true)
            .await
            .unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let _keep = ch;
        while let Some(Ok(d)) = consumer.next().await {
            let raw: Value = serde_json::from_slice(&d.data).expect("events are JSON");
            crate::schema::assert_valid_reply(&raw);
            if raw["type"] == "control_result" {
                let result: ControlResultV1 =
                    serde_json::from_value(raw).expect("control results are v1");
                if control_tx.send(result).is_err() {
                    break;
                }
                continue;
            }
            let event: EventV1 = serde_json::from_value(raw.clone()).expect("events are v1");
            if tx.send((raw, event)).is_err() {
                break;
            }
        }
    });
    (rx, control_rx)
}

async fn consume_dead_letters(
    conn: &Connection,
    topology: &Topology,
) -> mpsc::UnboundedReceiver<(Vec<u8>, HashMap<String, String>)> {
    let ch = conn.create_channel().await.unwrap();
    let mut consumer = ch
        .basic_consume(
            topology.dead_letter_queue.as_str().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let _keep = ch;
        while let Some(Ok(d)) = consumer.next().await {
            let mut headers = HashMap::new();
            if let Some(h) = d.properties.headers() {
                for (k, v) in h.inner() {
                    if let AMQPValue::LongString(s) = v {
                        headers.insert(
                            k.as_str().to_string(),
                            String::from_utf8_lossy(s.as_bytes()).into_owned(),
                        );
                    }
                }
            }
            if tx.send((d.data.clone(), headers)).is_err() {
                break;
            }
        }
    });
    rx
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
