//! Test harness: one isolated world per test — a random AMQP prefix, a
//! temp dir (SQLite file, HOME for the CLI, workspaces), a fresh Postgres
//! database when asked, and a mock Anthropic API — plus helpers to start a
//! worker in it, publish jobs and collect reply events. Built from the
//! shared world (`tests/common/world.rs`) the benches use too; everything
//! it made is removed when it is dropped, also when the test failed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use claude_worker::config::Settings;
use claude_worker::protocol::{ControlResultV1, EventV1};
use claude_worker::worker::Worker;
use futures_util::StreamExt;
use lapin::options::BasicConsumeOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use serde_json::Value;
use tempfile::TempDir;
use tokio::sync::mpsc;

use crate::common::world::{self, Bus, WorkerPlace};
pub use crate::common::world::{AMQP_URL, WAIT};
use crate::mock_api::MockApi;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
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
    /// The broker side: topology, confirm channel, this test's reply key.
    pub bus: Bus,
    events: mpsc::UnboundedReceiver<(Value, EventV1)>,
    control_results: mpsc::UnboundedReceiver<ControlResultV1>,
    dead_letters: mpsc::UnboundedReceiver<(Vec<u8>, HashMap<String, String>)>,
    /// Events read but not yet returned, per job.
    pending: Vec<(Value, EventV1)>,
    /// Set by `cleanup`; otherwise `Drop` removes what the test made.
    cleaned: bool,
    /// The attribution headers each event arrived with, by (job_id, seq).
    attribution: Arc<Mutex<HashMap<(String, u64), Attribution>>>,
}

/// An event's `x-worker-id` and `x-lease-epoch` headers.
#[derive(Debug, Clone, PartialEq)]
pub struct Attribution {
    pub worker_id: Option<String>,
    pub lease_epoch: Option<i64>,
}

impl TestEnv {
    pub async fn new(backend: Backend) -> TestEnv {
        init_tracing();
        let id = world::world_id();
        let dir = tempfile::tempdir().expect("temp dir");
        let (db_url, pg_database) = match backend {
            Backend::Sqlite => (
                format!("sqlite:{}", dir.path().join("worker.db").display()),
                None,
            ),
            Backend::Postgres => {
                let name = format!("cw_test_{}", &id[..16]);
                (world::create_database(&name).await, Some(name))
            }
        };
        let mock = MockApi::start().await;
        let bus = Bus::new("cwtest", &id).await;
        let attribution = Arc::new(Mutex::new(HashMap::new()));
        let (events, control_results) =
            split_replies(bus.replies().await, Arc::clone(&attribution));
        let dead_letters = consume_dead_letters(&bus).await;
        TestEnv {
            prefix: bus.prefix.clone(),
            dir,
            mock,
            db_url,
            pg_database,
            bus,
            events,
            control_results,
            dead_letters,
            pending: Vec::new(),
            cleaned: false,
            attribution,
        }
    }

    /// The headers event `seq` of `job_id` arrived with (once received).
    pub fn attribution(&self, job_id: &str, seq: u64) -> Option<Attribution> {
        self.attribution
            .lock()
            .unwrap()
            .get(&(job_id.to_string(), seq))
            .cloned()
    }

    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    /// Settings for a worker of this world, typed: change fields per test.
    pub fn settings(&self) -> Settings {
        self.settings_for(
            &self.home(),
            &self.dir.path().join("workspaces"),
            &self.prefix,
        )
    }

    /// [`TestEnv::settings`] for a worker whose CLI uses `home` and works
    /// below `work`; its CLI processes carry `CW_TEST_PREFIX=<marker>`.
    pub fn settings_for(
        &self,
        home: &std::path::Path,
        work: &std::path::Path,
        marker: &str,
    ) -> Settings {
        let api_url = self.mock.base_url();
        world::worker_settings(&WorkerPlace {
            prefix: &self.prefix,
            db_url: &self.db_url,
            api_url: &api_url,
            home,
            work,
            marker,
        })
    }

    pub async fn start_worker(&self) -> Worker {
        self.start_worker_with(|_| {}).await
    }

    /// Starts a worker after `tweak` has adjusted its settings.
    pub async fn start_worker_with(&self, tweak: impl FnOnce(&mut Settings)) -> Worker {
        let mut settings = self.settings();
        tweak(&mut settings);
        settings.validate().expect("valid settings");
        Worker::start(settings).await.expect("worker starts")
    }

    /// Publishes a job body (any bytes) with reply_to = this test's key.
    pub async fn publish_raw(&self, body: &[u8], message_id: Option<&str>) {
        self.bus.publish_raw(body, message_id).await
    }

    /// Publishes a v1 job and returns its job_id.
    pub async fn publish_job(&self, session_key: &str, prompt: &str, extra: Value) -> String {
        self.bus.publish_job(session_key, prompt, extra).await
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
        self.bus.publish_control(body).await
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

    /// Deletes this test's exchanges, queues and database now (dropping
    /// the `TestEnv` does the same, from a thread of its own).
    pub async fn cleanup(mut self) {
        self.bus.delete().await;
        if let Some(name) = self.pg_database.take() {
            world::drop_database(&name).await;
        }
        self.cleaned = true;
    }
}

impl Drop for TestEnv {
    /// A test that failed (or returned early) still removes its queues,
    /// exchanges and database: on a thread with its own runtime (this one
    /// may be shutting down), bounded, never panicking.
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        let topology = self.bus.topology.clone();
        let database = self.pg_database.take();
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let work = async {
                    if let Ok(conn) =
                        Connection::connect(AMQP_URL, ConnectionProperties::default()).await
                    {
                        if let Ok(ch) = conn.create_channel().await {
                            topology.delete(&ch).await;
                        }
                        let _ = conn.close(200, "test dropped".into()).await;
                    }
                    if let Some(name) = database {
                        world::drop_database(&name).await;
                    }
                };
                let _ = tokio::time::timeout(Duration::from_secs(20), work).await;
            });
        });
        let _ = cleanup.join();
    }
}

/// Splits the reply stream into events and control results, validating
/// every one against the JSON Schemas.
fn split_replies(
    mut replies: mpsc::UnboundedReceiver<world::Reply>,
    attribution: Arc<Mutex<HashMap<(String, u64), Attribution>>>,
) -> (
    mpsc::UnboundedReceiver<(Value, EventV1)>,
    mpsc::UnboundedReceiver<ControlResultV1>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(reply) = replies.recv().await {
            let raw = reply.raw;
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
            let from = Attribution {
                worker_id: reply.worker_id,
                lease_epoch: reply.lease_epoch,
            };
            attribution
                .lock()
                .unwrap()
                .insert((event.job_id.clone(), event.seq), from);
            if tx.send((raw, event)).is_err() {
                break;
            }
        }
    });
    (rx, control_rx)
}

async fn consume_dead_letters(
    bus: &Bus,
) -> mpsc::UnboundedReceiver<(Vec<u8>, HashMap<String, String>)> {
    let topology = &bus.topology;
    let ch = bus.conn.create_channel().await.unwrap();
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

pub use crate::common::world::cli_pids;
