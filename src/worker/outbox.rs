//! The terminal-event outbox. `finish_job` commits a job's outcome with its
//! terminal event, then the turn publishes it and marks it published. A
//! worker that dies or stops in between leaves it unmarked; this sweep (on
//! every worker) publishes such events once they are older than a grace
//! that covers the original worker's own retries. A reader may see one
//! twice (same `message_id`, same `seq`): the protocol's dedup drops it.
//!
//! Marks are batched ([`Marks`]): a published terminal is marked within
//! [`MARK_BATCH`] together with the others published meanwhile, in one
//! commit, instead of a commit per job. The sweep's grace (seconds) is far
//! longer, so a batched mark never makes a sweep republish an event; one
//! lost with a crash only makes it publish the event once more.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::store::now_ms;
use crate::worker::context::Context;

/// How many events one sweep publishes at most.
const BATCH: i64 = 100;

/// How old an unpublished terminal event must be before the sweep takes
/// it: the publishing worker retries for a while itself.
pub fn grace(ctx: &Context) -> Duration {
    let publish = Duration::from_millis(ctx.settings.amqp.publish_timeout_ms) * 2;
    publish.max(ctx.settings.lease_ttl())
}

/// How long published terminals gather before they are marked together.
pub const MARK_BATCH: Duration = Duration::from_millis(100);
/// Marks held at most while the database does not answer; beyond, the
/// oldest are dropped (their events are only published once more).
const MAX_HELD_MARKS: usize = 10_000;

/// Terminal events published and not yet marked.
#[derive(Default)]
pub struct Marks {
    job_ids: std::sync::Mutex<Vec<String>>,
    added: Notify,
}

impl Marks {
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.job_ids.lock().expect("marks lock"))
    }
    fn put_back(&self, mut ids: Vec<String>) {
        let mut held = self.job_ids.lock().expect("marks lock");
        ids.append(&mut held);
        let excess = ids.len().saturating_sub(MAX_HELD_MARKS);
        ids.drain(..excess);
        *held = ids;
    }
}

pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    let mut sweeps = tokio::time::interval(ctx.settings.sweep_interval());
    sweeps.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    sweeps.tick().await;
    loop {
        tokio::select! {
            _ = sweeps.tick() => {
                if ctx.broker_up() {
                    sweep_once(&ctx).await;
                }
            }
            _ = ctx.marks.added.notified() => {
                tokio::select! {
                    _ = tokio::time::sleep(MARK_BATCH) => {}
                    _ = shutdown.cancelled() => {}
                }
            }
            _ = shutdown.cancelled() => return,
        }
        flush_marks(&ctx).await;
    }
}

/// Marks the terminals published since the last flush, in one commit.
pub async fn flush_marks(ctx: &Context) {
    let ids = ctx.marks.take();
    if ids.is_empty() {
        return;
    }
    if let Err(e) = ctx.store.mark_terminals_published(&ids, now_ms()).await {
        debug!(error = %e, count = ids.len(), "could not mark terminal events published; keeping them for the next batch");
        ctx.marks.put_back(ids);
    }
}

/// Publishes the terminal events left unpublished longer than [`grace`];
/// returns how many went out.
pub async fn sweep_once(ctx: &Context) -> usize {
    let before = now_ms() - grace(ctx).as_millis() as i64;
    let jobs = match ctx.store.unpublished_terminals(before, BATCH).await {
        Ok(jobs) => jobs,
        Err(e) => {
            debug!(error = %e, "outbox sweep: the store is not answering");
            return 0;
        }
    };
    let mut sent = 0;
    for job in jobs {
        let Some(event) = &job.terminal_event else {
            continue;
        };
        let key = job.spec.reply_to.as_deref().unwrap_or(&job.session_key);
        if let Err(e) = ctx
            .sink
            .publish_raw_event(key, &job.job_id, event.as_bytes())
            .await
        {
            warn!(error = %e, "outbox sweep: publishing a terminal event failed; the next sweep retries");
            break;
        }
        info!(job_id = %job.job_id, "published a terminal event its worker had not (it stopped or died after recording the outcome)");
        mark_published(ctx, &job.job_id).await;
        sent += 1;
    }
    sent
}

/// Queues the mark for the next batch. Best effort: an unmarked event is
/// only published once more.
pub async fn mark_published(ctx: &Context, job_id: &str) {
    ctx.marks
        .job_ids
        .lock()
        .expect("marks lock")
        .push(job_id.to_string());
    ctx.marks.added.notify_one();
}
