//! Wiring a worker together: store, broker topology, consumer, scheduler,
//! and a graceful shutdown that lets running turns finish (within a grace
//! period) and hands unfinished work back.
//!
//! The stages, in data-path order: `consume` (deliveries in) → `accept`
//! (validate, persist, ack) → `schedule` (leases, session tasks) → `turn`
//! (one job's attempts, driving `crate::claude`) → events out through
//! `crate::broker::publish`. `control` handles control messages.

pub(crate) mod accept;
pub(crate) mod consume;
pub mod context;
pub(crate) mod control;
pub(crate) mod schedule;
pub(crate) mod transcript;
pub(crate) mod turn;

use std::sync::Arc;
use std::time::Duration;

use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::broker::publish::AmqpSink;
use crate::broker::{self, Topology};
use crate::config::Settings;
use crate::store;
use consume::Stream;
use context::{default_worker_id, Context};
use schedule::Shutdown;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("session store: {0}")]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Amqp(#[from] broker::AmqpError),
    #[error(
        "the Claude CLI `{path}` could not be run: {reason}. Install it with \
         `npm install -g @anthropic-ai/claude-code` or set CLAUDE_WORKER__CLAUDE__PATH"
    )]
    Cli { path: String, reason: String },
}

/// A started worker. `shutdown()` begins a graceful stop; `wait()` returns
/// when everything has stopped.
pub struct Worker {
    pub id: String,
    pub topology: Topology,
    pub context: Arc<Context>,
    shutdown: CancellationToken,
    done: tokio::task::JoinHandle<Result<(), String>>,
}

impl Worker {
    pub async fn start(settings: Settings) -> Result<Worker, StartError> {
        let settings = Arc::new(settings);
        let id = if settings.worker.id.is_empty() {
            default_worker_id()
        } else {
            settings.worker.id.clone()
        };
        let cli_version = check_cli(&settings).await?;
        let store =
            store::connect(&settings.database.url, settings.database.max_connections).await?;
        store.migrate().await?;

        let topology = Topology::from_settings(&settings.amqp);
        let conn = broker::connect(&settings.amqp, &format!("claude-worker {id}")).await?;
        let publish_channel = broker::confirm_channel(&conn).await?;
        topology
            .declare(&publish_channel)
            .await
            .map_err(broker::AmqpError::from)?;
        let sink = AmqpSink::new(publish_channel, topology.clone());
        let consume_channel = broker::consumer_channel(&conn, settings.amqp.prefetch).await?;
        let consumer = consume_channel
            .basic_consume(
                topology.jobs_queue.as_str().into(),
                id.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(broker::AmqpError::from)?;

        // Control messages: this worker's own queue on the fanout exchange.
        let control_channel = broker::consumer_channel(&conn, 16).await?;
        let control_consumer = broker::consume_private(
            &control_channel,
            &topology.control_exchange,
            "",
            &format!("{id}-control"),
            false,
        )
        .await
        .map_err(broker::AmqpError::from)?;

        let ctx = Context::new(Arc::clone(&settings), store, sink, id.clone());
        info!(worker_id = %id, %cli_version, queue = %topology.jobs_queue,
              max_concurrent_turns = settings.worker.max_concurrent_turns,
              warm_max_processes = settings.claude.warm_max_processes, "worker started");

        let shutdown = CancellationToken::new();
        let signals = Shutdown {
            shutdown: shutdown.clone(),
            kill: CancellationToken::new(),
        };
        let tracker = TaskTracker::new();
        let scheduler = tokio::spawn(schedule::run(
            Arc::clone(&ctx),
            signals.clone(),
            tracker.clone(),
        ));
        let consume = tokio::spawn(crate::worker::consume::run(
            Arc::clone(&ctx),
            consume_channel.clone(),
            consumer,
            Stream::Jobs,
            shutdown.clone(),
        ));
        // Control keeps flowing until running turns are done (a cancel
        // during the shutdown grace period still works).
        let control_stop = CancellationToken::new();
        let control = tokio::spawn(crate::worker::consume::run(
            Arc::clone(&ctx),
            control_channel.clone(),
            control_consumer,
            Stream::Control,
            control_stop.clone(),
        ));
        let reaper = tokio::spawn(Arc::clone(&ctx.warm).run_reaper(shutdown.clone()));
        // Work left by an earlier run or another worker starts right away.
        ctx.wake_scheduler(None);
        let warm = Arc::clone(&ctx.warm);

        let grace = Duration::from_secs(settings.worker.shutdown_grace_secs);
        let done = tokio::spawn(async move {
            let mut consume = consume;
            let consumer_failed = tokio::select! {
                _ = signals.shutdown.cancelled() => {
                    let _ = (&mut consume).await;
                    false
                }
                _ = &mut consume => !signals.shutdown.is_cancelled(),
            };
            signals.shutdown.cancel();
            // Unacked prefetched deliveries go back to the queue with the channel.
            let _ = consume_channel
                .close(200, "worker shutting down".into())
                .await;
            let _ = scheduler.await;
            tracker.close();
            if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
                warn!(
                    grace_secs = grace.as_secs(),
                    "turns still running after the grace period; stopping them"
                );
                signals.kill.cancel();
                tracker.wait().await;
            }
            control_stop.cancel();
            let _ = control.await;
            // No turn runs now: close the warm CLI processes (gracefully,
            // so their transcripts are complete) before the worker ends.
            let _ = reaper.await;
            warm.close_all().await;
            let _ = conn.close(200, "worker stopped".into()).await;
            info!("worker stopped");
            if consumer_failed {
                Err("the jobs consumer stopped (connection lost and not recovered, or the queue was deleted)".into())
            } else {
                Ok(())
            }
        });
        Ok(Worker {
            id,
            topology,
            context: ctx,
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

    /// Waits until the worker has stopped. `Err` if it stopped on its own
    /// because it could no longer consume.
    pub async fn wait(self) -> Result<(), String> {
        self.done
            .await
            .map_err(|e| format!("worker task failed: {e}"))?
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
