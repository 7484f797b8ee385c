//! The worker: everything that decides what runs. `Worker::start` wires it
//! together (store, broker topology, consumers, scheduler) and hands every
//! long-lived task to a supervisor; a graceful shutdown lets running turns
//! finish (within a grace period) and hands unfinished work back.
//!
//! The stages, in data-path order: `consume` (deliveries in) → `accept`
//! (validate, persist, ack) → `schedule` (leases, session tasks; `lease`
//! keeps them) → `turn` (one job's typed stages, driving `crate::claude`) →
//! events out through `crate::broker::publish`. `control` handles control
//! messages; `running` is the registry of turns they act on; `ending`
//! ends jobs that never ran.

pub(crate) mod accept;
pub(crate) mod admin;
pub(crate) mod broker_watch;
pub(crate) mod consume;
pub mod context;
pub use context::{Hooks, JobHook};
mod accept_feed;
pub(crate) mod control;
pub(crate) mod ending;
pub(crate) mod lease;
pub mod lifecycle;
pub(crate) mod outbox;
pub mod retention;
pub(crate) mod running;
pub(crate) mod schedule;
mod supervise;
pub(crate) mod transcript;
pub(crate) mod turn;

use std::sync::Arc;
use std::time::Duration;

use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::broker::publish::AmqpSink;
use crate::broker::{self, AmqpError, Topology};
use crate::config::Settings;
use crate::store;
use consume::Stream;
use context::{default_worker_id, Context};
use schedule::Shutdown;
use supervise::Supervisor;

/// How long each step of stopping (a task, closing a channel or the
/// connection, turns after they were killed) may take before it is cut.
const STOP_STEP_BOUND: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("could not open the database at {url}: {reason}. {hint}")]
    Database {
        url: String,
        reason: String,
        hint: &'static str,
    },
    /// Anything else the store refused at start-up (a migration, say).
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Amqp(#[from] AmqpError),
    #[error(
        "the Claude CLI `{path}` could not be run: {reason}. Install it with \
         `npm install -g @anthropic-ai/claude-code` or set CLAUDE_WORKER__CLAUDE__PATH"
    )]
    Cli { path: String, reason: String },
    #[error(transparent)]
    Ops(#[from] crate::ops::OpsError),
}

/// What a user reads when the database cannot be opened at start-up: where
/// (without credentials), why, and what to do.
fn database_error(url: &str, e: store::StoreError) -> StartError {
    let hint = if url.starts_with("sqlite:") {
        "The SQLite file's directory must exist and be writable by the worker."
    } else {
        "Is PostgreSQL running and reachable, and does the database exist? Start one with \
         `docker compose up -d postgres`, or point CLAUDE_WORKER__DATABASE__URL at yours."
    };
    StartError::Database {
        url: crate::config::redact_db_url(url),
        reason: e.to_string(),
        hint,
    }
}

/// A started worker. `shutdown()` begins a graceful stop; `wait()` returns
/// when everything has stopped.
pub struct Worker {
    pub id: String,
    pub topology: Topology,
    pub context: Arc<Context>,
    /// Where the admin port (`ops.listen`) listens, if it is on.
    pub ops_addr: Option<std::net::SocketAddr>,
    shutdown: CancellationToken,
    done: tokio::task::JoinHandle<Result<(), String>>,
}

/// What the worker holds of the broker.
struct Broker {
    conn: Connection,
    jobs_channel: Channel,
    jobs: Consumer,
    control_channel: Channel,
    control: Consumer,
    /// Accept announcements for this worker (see `accept_feed`).
    accepts: Consumer,
}

impl Worker {
    pub async fn start(settings: Settings) -> Result<Worker, StartError> {
        Self::start_with(settings, Hooks::default()).await
    }

    #[doc(hidden)]
    pub async fn start_with(settings: Settings, hooks: Hooks) -> Result<Worker, StartError> {
        let settings = Arc::new(settings);
        let id = if settings.worker.id.is_empty() {
            default_worker_id()
        } else {
            settings.worker.id.clone()
        };
        let cli_version = check_cli(&settings).await?;
        let store = store::connect(&settings.database.url, settings.database.max_connections)
            .await
            .map_err(|e| database_error(settings.database.url.expose(), e))?;
        store.migrate().await?;
        // Bound before the broker, so a port in use fails start-up at once.
        let ops_listener = match settings.ops_listen() {
            Ok(Some(addr)) => Some(crate::ops::bind(addr).await?),
            _ => None,
        };
        let ops_addr = ops_listener.as_ref().and_then(|l| l.local_addr().ok());
        let topology = Topology::from_settings(&settings.amqp);
        let (broker, publish_channel) = connect_broker_retrying(&settings, &topology, &id).await?;
        let publish_timeout = Duration::from_millis(settings.amqp.publish_timeout_ms);
        let sink = AmqpSink::new(
            publish_channel.main,
            publish_channel.lanes,
            settings.amqp.max_unconfirmed_events,
            topology.clone(),
            publish_timeout,
            Some(publish_channel.announce),
        );
        let ctx = Context::new(Arc::clone(&settings), store, sink, id.clone(), hooks);
        info!(worker_id = %id, %cli_version, queue = %topology.jobs_queue,
              max_concurrent_turns = settings.worker.max_concurrent_turns,
              warm_max_processes = settings.claude.warm_max_processes, "worker started");
        let shutdown = CancellationToken::new();
        let done = tokio::spawn(run(
            Arc::clone(&ctx),
            broker,
            shutdown.clone(),
            ops_listener,
        ));
        Ok(Worker {
            id,
            topology,
            context: ctx,
            ops_addr,
            shutdown,
            done,
        })
    }

    /// Begins a graceful shutdown.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// A token that begins a graceful shutdown when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until the worker has stopped. `Err` (naming the task) if it
    /// stopped on its own because one of its tasks ended or panicked.
    pub async fn wait(self) -> Result<(), String> {
        self.done
            .await
            .map_err(|e| format!("worker task failed: {e}"))?
    }
}

/// How long start-up retries transient broker errors.
const STARTUP_RETRY: Duration = Duration::from_secs(30);

/// How long declaring the topology and starting the consumers may take on
/// one connection.
const SETUP_TIMEOUT: Duration = Duration::from_secs(15);

/// [`connect_broker`], retrying transient broker errors with backoff for
/// up to [`STARTUP_RETRY`]: several workers starting at once on a fresh
/// broker can make it fail one of them while they declare the topology. A
/// broker that is not there at all still fails at once.
async fn connect_broker_retrying(
    settings: &Settings,
    topology: &Topology,
    id: &str,
) -> Result<(Broker, PublishChannels), AmqpError> {
    let deadline = tokio::time::Instant::now() + STARTUP_RETRY;
    let mut delay = Duration::from_millis(200);
    loop {
        match connect_broker(settings, topology, id).await {
            Err(e) if e.is_transient() && tokio::time::Instant::now() + delay < deadline => {
                warn!(error = %e, delay_ms = delay.as_millis() as u64, "the broker failed the start-up; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            done => return done,
        }
    }
}

/// Connects, declares the topology, and starts consuming the jobs queue
/// and this worker's own control queue. Returns the publish channel apart.
/// A connection whose set-up failed is closed.
async fn connect_broker(
    settings: &Settings,
    topology: &Topology,
    id: &str,
) -> Result<(Broker, PublishChannels), AmqpError> {
    let conn = broker::connect(&settings.amqp, &format!("claude-worker {id}")).await?;
    // Every step is an exchange with the broker; bounded as a whole so a
    // stalled one fails (and is retried on a fresh connection) instead of
    // hanging start-up.
    let set_up = tokio::time::timeout(SETUP_TIMEOUT, set_up(&conn, settings, topology, id));
    let set_up = set_up.await.unwrap_or(Err(AmqpError::SetupTimeout {
        secs: SETUP_TIMEOUT.as_secs(),
    }));
    match set_up {
        Ok((publish_channel, jobs_channel, jobs, control_channel, control, accepts)) => {
            let broker = Broker {
                conn,
                jobs_channel,
                jobs,
                control_channel,
                control,
                accepts,
            };
            Ok((broker, publish_channel))
        }
        Err(e) => {
            let _ =
                tokio::time::timeout(STOP_STEP_BOUND, conn.close(200, "start-up failed".into()))
                    .await;
            Err(e)
        }
    }
}

/// The publish channels, and the consumers with their channels (the
/// control channel carries the accept announcements' consumer too).
type Channels = (
    PublishChannels,
    Channel,
    Consumer,
    Channel,
    Consumer,
    Consumer,
);

/// Confirm channels: one for one-at-a-time confirmed publishes, and the
/// pool the jobs' event lanes use; and a plain one for accept
/// announcements (hints, never confirmed).
pub(crate) struct PublishChannels {
    pub main: Channel,
    pub lanes: Vec<Channel>,
    pub announce: Channel,
}

async fn set_up(
    conn: &Connection,
    settings: &Settings,
    topology: &Topology,
    id: &str,
) -> Result<Channels, AmqpError> {
    let publish_channel = broker::confirm_channel(conn).await?;
    topology.declare(&publish_channel).await?;
    let mut lanes = Vec::with_capacity(settings.amqp.publish_channels);
    for _ in 0..settings.amqp.publish_channels {
        lanes.push(broker::confirm_channel(conn).await?);
    }
    let publish_channel = PublishChannels {
        main: publish_channel,
        lanes,
        announce: conn.create_channel().await?,
    };
    let jobs_channel = broker::consumer_channel(conn, settings.amqp.prefetch).await?;
    let jobs = jobs_channel
        .basic_consume(
            topology.jobs_queue.as_str().into(),
            id.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let control_channel = broker::consumer_channel(conn, 16).await?;
    let control = broker::consume_private(
        &control_channel,
        &topology.control_exchange,
        &[""],
        &format!("{id}-control"),
        false,
    )
    .await?;
    let held = accept_feed::holder_key(id);
    let accepts = broker::consume_private(
        &control_channel,
        &topology.workers_exchange,
        &[held.as_str(), accept_feed::WAITING_KEY],
        &format!("{id}-accepts"),
        true,
    )
    .await?;
    Ok((
        publish_channel,
        jobs_channel,
        jobs,
        control_channel,
        control,
        accepts,
    ))
}

/// Runs the worker's tasks under supervision until shutdown, or until one
/// of them ends by itself; then stops gracefully.
async fn run(
    ctx: Arc<Context>,
    broker: Broker,
    shutdown: CancellationToken,
    ops_listener: Option<tokio::net::TcpListener>,
) -> Result<(), String> {
    let signals = Shutdown {
        shutdown: shutdown.clone(),
        kill: CancellationToken::new(),
    };
    let tracker = TaskTracker::new();
    // Control keeps flowing until running turns are done (a cancel during
    // the shutdown grace period still works).
    let control_stop = CancellationToken::new();
    let Broker {
        conn,
        jobs_channel,
        jobs,
        control_channel,
        control,
        accepts,
    } = broker;
    let mut tasks = Supervisor::default();
    let c = Arc::clone(&ctx);
    tasks.spawn(
        "scheduler",
        schedule::run(c, signals.clone(), tracker.clone()),
    );
    let c = Arc::clone(&ctx);
    let jobs_stream = consume::run(
        c,
        jobs_channel.clone(),
        jobs,
        Stream::Jobs,
        shutdown.clone(),
    );
    tasks.spawn("jobs consumer", jobs_stream);
    let c = Arc::clone(&ctx);
    let control_stream = consume::run(
        c,
        control_channel.clone(),
        control,
        Stream::Control,
        control_stop.clone(),
    );
    tasks.spawn("control consumer", control_stream);
    let watch = broker_watch::run(Arc::clone(&ctx), conn.status().clone(), shutdown.clone());
    tasks.spawn("broker watch", async move {
        let _ = watch.await;
    });
    tasks.spawn("outbox", outbox::run(Arc::clone(&ctx), shutdown.clone()));
    tasks.spawn(
        "accept feed",
        accept_feed::run(
            Arc::clone(&ctx),
            control_channel.clone(),
            accepts,
            shutdown.clone(),
        ),
    );
    tasks.spawn(
        "lifecycle",
        lifecycle::run(Arc::clone(&ctx), shutdown.clone()),
    );
    tasks.spawn(
        "retention",
        retention::run(Arc::clone(&ctx), shutdown.clone()),
    );
    tasks.spawn(
        "warm reaper",
        Arc::clone(&ctx.warm).run_reaper(shutdown.clone()),
    );
    let admin = admin::AdminTask::spawn(&mut tasks, &ctx, ops_listener, &shutdown, &jobs_channel);
    // Work left by an earlier run or another worker starts right away.
    ctx.wake_scheduler(None);

    let failure = tokio::select! {
        biased;
        _ = shutdown.cancelled() => None,
        // A task that ends because shutdown began is not a failure.
        ended = tasks.first_exit() => (!shutdown.is_cancelled()).then_some(ended),
    };
    if let Some(why) = &failure {
        admin.task_failed();
        error!(reason = %why, "a worker task ended unexpectedly; stopping the worker");
    }
    signals.shutdown.cancel();
    // Unacked prefetched deliveries go back to the queue with the channel.
    let _ = tokio::time::timeout(
        STOP_STEP_BOUND,
        jobs_channel.close(200, "worker shutting down".into()),
    )
    .await;
    tasks.join("jobs consumer", STOP_STEP_BOUND).await;
    tasks.join("scheduler", STOP_STEP_BOUND).await;
    finish_turns(&ctx, &signals, &tracker).await;
    control_stop.cancel();
    tasks.join("control consumer", STOP_STEP_BOUND).await;
    tasks.join("warm reaper", STOP_STEP_BOUND).await;
    tasks.join("broker watch", STOP_STEP_BOUND).await;
    tasks.join("outbox", STOP_STEP_BOUND).await;
    // Turns that ended during the grace published their terminals.
    let _ = tokio::time::timeout(STOP_STEP_BOUND, outbox::flush_marks(&ctx)).await;
    tasks.join("retention", STOP_STEP_BOUND).await;
    // Last, so events recorded while turns finished still go out now.
    tasks.join("lifecycle", STOP_STEP_BOUND).await;
    if ctx.broker_up() {
        let _ = tokio::time::timeout(STOP_STEP_BOUND, lifecycle::publish_pending(&ctx)).await;
    }
    // No turn runs now: close the warm CLI processes (gracefully, so their
    // transcripts are complete) before the worker ends.
    ctx.warm.close_all().await;
    admin.stop(&mut tasks, STOP_STEP_BOUND).await;
    let _ = tokio::time::timeout(STOP_STEP_BOUND, conn.close(200, "worker stopped".into())).await;
    info!("worker stopped");
    failure.map_or(Ok(()), Err)
}

/// Lets running turns finish within the grace period, then kills them
/// (their jobs are handed back), bounded either way.
async fn finish_turns(ctx: &Context, signals: &Shutdown, tracker: &TaskTracker) {
    tracker.close();
    let grace = Duration::from_secs(ctx.settings.worker.shutdown_grace_secs);
    if tokio::time::timeout(grace, tracker.wait()).await.is_ok() {
        return;
    }
    warn!(
        grace_secs = grace.as_secs(),
        "turns still running after the grace period; stopping them"
    );
    signals.kill.cancel();
    if tokio::time::timeout(STOP_STEP_BOUND, tracker.wait())
        .await
        .is_err()
    {
        error!(
            bound_ms = STOP_STEP_BOUND.as_millis() as u64,
            "turns did not stop after being killed; their leases will expire"
        );
    }
}

/// Runs `claude --version` so a missing or broken CLI is reported at
/// start-up, not on the first job.
async fn check_cli(settings: &Settings) -> Result<String, StartError> {
    crate::claude::version(&settings.claude, &settings.profiles["default"])
        .await
        .map_err(|reason| StartError::Cli {
            path: settings.claude.path.display().to_string(),
            reason,
        })
}
