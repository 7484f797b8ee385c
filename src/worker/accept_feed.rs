//! Accept announcements between workers, through the broker: a worker that
//! accepts a job for a session whose lease another worker holds tells that
//! worker (routing key `held.<worker id>` on the workers exchange), so a
//! lease holder waiting for its session's follow-up runs it at once. A job
//! whose session has no live lease, accepted by a worker with no free slot,
//! goes to every worker (`waiting`): one with a free slot claims it at once
//! (not at its next sweep), and a full one's holders hand their leases back.
//!
//! They are hints: sent without a confirm, read without an ack, and nothing
//! depends on one arriving — a lost one costs a lease holder at most a
//! poll interval. While they flow, holders poll only for what is not
//! announced, backing off (see `Context::affinity_poll`); while the broker
//! is away they poll every 100 ms, and look once when it is back.
//!
//! The broker, not the database, carries them: Postgres wakes every
//! listening backend of the database for each `NOTIFY` whatever its channel,
//! and each wake-up is a transaction, so announcements by `NOTIFY` cost the
//! database a commit per worker per accept.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::{Channel, Consumer};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use crate::broker::announce::ACCEPT_ANNOUNCEMENT_TYPE;
use crate::store::AcceptAudience;
use crate::worker::context::Context;

/// The routing key every worker binds: jobs of sessions waiting for one.
pub(crate) const WAITING_KEY: &str = "waiting";

/// The routing key a worker binds for jobs of sessions whose lease it holds.
pub(crate) fn holder_key(worker_id: &str) -> String {
    format!("held.{worker_id}")
}

/// Bounds sending one announcement (it is only written to the socket).
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// An accepted job, as announced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceptNotice {
    pub job_id: String,
    pub session_key: String,
    /// Whether the session's lease was live when the job was accepted:
    /// its holder may be waiting for it (lease affinity). Otherwise the
    /// session waits for a worker.
    pub held: bool,
}

/// Tells `audience` that `job_id` of `session_key` was accepted. A failure
/// is logged at debug and forgotten: the holder's poll finds the job.
pub(crate) async fn announce(
    ctx: &Context,
    job_id: &str,
    session_key: &str,
    audience: &AcceptAudience,
) {
    if !ctx.broker_up() {
        // Down or blocked by an alarm: it would only wait out its bound.
        return;
    }
    let (key, held) = match audience {
        AcceptAudience::Holder(owner) => (holder_key(owner), true),
        AcceptAudience::Everyone => (WAITING_KEY.to_string(), false),
    };
    let notice = AcceptNotice {
        job_id: job_id.to_string(),
        session_key: session_key.to_string(),
        held,
    };
    let Ok(body) = serde_json::to_vec(&notice) else {
        return;
    };
    let sent = tokio::time::timeout(SEND_TIMEOUT, ctx.sink.announce_accept(&key, &body)).await;
    match sent {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!(error = %e, "an accept announcement was not sent"),
        Err(_) => debug!("an accept announcement timed out"),
    }
}

/// Reads this worker's announcements until shutdown. Ends by itself only
/// if the broker connection does not recover (the broker watch stops the
/// worker then too).
pub async fn run(
    ctx: Arc<Context>,
    channel: Channel,
    mut consumer: Consumer,
    shutdown: CancellationToken,
) {
    ctx.set_accepts_pushed(true);
    // Anything accepted before the consumer started: look once.
    ctx.nudge_all_holders();
    loop {
        let next = tokio::select! {
            d = consumer.next() => d,
            _ = shutdown.cancelled() => break,
        };
        match next {
            Some(Ok(delivery)) => {
                let kind = delivery.properties.kind().as_ref().map(|k| k.as_str());
                if kind != Some(ACCEPT_ANNOUNCEMENT_TYPE) {
                    continue;
                }
                match serde_json::from_slice::<AcceptNotice>(&delivery.data) {
                    Ok(notice) => ctx.on_accept_announced(&notice),
                    Err(e) => debug!(error = %e, "an accept announcement did not parse"),
                }
            }
            Some(Err(e)) => {
                ctx.set_accepts_pushed(false);
                let limit = Duration::from_secs(ctx.settings.amqp.recovery_limit_secs);
                match tokio::time::timeout(limit, channel.wait_for_recovery(e)).await {
                    Ok(Ok(())) => {
                        // What was announced meanwhile is lost: look once.
                        debug!("accept announcements flow again; holders look once");
                        ctx.set_accepts_pushed(true);
                        ctx.nudge_all_holders();
                    }
                    Ok(Err(e)) => {
                        error!(error = %e, "the accept announcements' consumer did not recover");
                        break;
                    }
                    Err(_) => {
                        error!(
                            limit_secs = limit.as_secs(),
                            "the broker connection did not come back in time"
                        );
                        break;
                    }
                }
            }
            None => {
                warn!("the accept announcements' consumer was cancelled by the broker");
                break;
            }
        }
    }
    ctx.set_accepts_pushed(false);
}
