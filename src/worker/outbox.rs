//! The terminal-event outbox. `finish_job` commits a job's outcome with its
//! terminal event, then the turn publishes it and marks it published. A
//! worker that dies or stops in between leaves it unmarked; this sweep (on
//! every worker) publishes such events once they are older than a grace
//! that covers the original worker's own retries. A reader may see one
//! twice (same `message_id`, same `seq`): the protocol's dedup drops it.

use std::sync::Arc;
use std::time::Duration;

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

pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(ctx.settings.sweep_interval()) => {}
            _ = shutdown.cancelled() => return,
        }
        if ctx.broker_up() {
            sweep_once(&ctx).await;
        }
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

/// Best effort: an unmarked event is only published once more.
pub async fn mark_published(ctx: &Context, job_id: &str) {
    if let Err(e) = ctx.store.mark_terminal_published(job_id, now_ms()).await {
        debug!(error = %e, %job_id, "could not mark a terminal event published");
    }
}
