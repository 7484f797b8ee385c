//! The database's announcements of accepted jobs (Postgres `LISTEN`), so a
//! lease holder waiting for its session's follow-up learns at once that
//! another worker accepted it, and one holding a slot learns that a
//! session waits for a worker while this one is full. Without them (SQLite,
//! or while the listening connection is down) holders poll every 100 ms as
//! before; with them they poll only for what is not announced, backing off
//! (see `Context::affinity_poll`). Nothing depends on an announcement
//! arriving: a lost one costs at most a poll interval.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::store::AcceptFeed;
use crate::worker::context::Context;

/// Bounds the set-up of the listening connection.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(30);
/// Between attempts to listen again after a failure.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Runs until shutdown; never ends by itself (a backend without
/// announcements just waits), so the supervisor treats an end as a bug.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    let mut delay = RETRY_FIRST;
    loop {
        let listening = tokio::select! {
            r = tokio::time::timeout(LISTEN_TIMEOUT, ctx.store.listen_accepts(&ctx.worker_id)) => r,
            _ = shutdown.cancelled() => return,
        };
        match listening {
            Ok(Ok(None)) => {
                // This backend announces nothing: holders poll.
                shutdown.cancelled().await;
                return;
            }
            Ok(Ok(Some(feed))) => {
                delay = RETRY_FIRST;
                if follow(&ctx, feed, &shutdown).await.is_none() {
                    return;
                }
            }
            Ok(Err(e)) => {
                warn!(error = %e, retry_in_ms = delay.as_millis() as u64,
                    "could not listen for accepted jobs; lease holders poll meanwhile");
            }
            Err(_) => {
                warn!(
                    retry_in_ms = delay.as_millis() as u64,
                    "listening for accepted jobs timed out; lease holders poll meanwhile"
                );
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return,
        }
        delay = (delay * 2).min(RETRY_MAX);
    }
}

/// Hands announcements on until the feed fails (`Some`) or shutdown
/// (`None`).
async fn follow(ctx: &Context, mut feed: AcceptFeed, shutdown: &CancellationToken) -> Option<()> {
    ctx.set_accepts_pushed(true);
    // Anything accepted before the LISTEN took effect: look once.
    ctx.nudge_all_holders();
    let ended = loop {
        let next = tokio::select! {
            n = feed.next() => n,
            _ = shutdown.cancelled() => break None,
        };
        match next {
            Ok(Some(notice)) => ctx.on_accept_announced(&notice),
            Ok(None) => {
                // Reconnected; what was announced meanwhile is lost.
                debug!("the accept feed reconnected; holders look once");
                ctx.nudge_all_holders();
            }
            Err(e) => {
                warn!(error = %e, "the accept feed failed; lease holders poll until it is back");
                break Some(());
            }
        }
    };
    ctx.set_accepts_pushed(false);
    ended
}
