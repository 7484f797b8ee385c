//! Watches the broker connection. While it is down (or blocked by a
//! broker alarm) the scheduler claims no session it could not serve; once
//! it has been down longer than `amqp.recovery_limit_secs` this task ends,
//! and the supervisor stops the worker (its process supervisor restarts
//! it) rather than let it hold leases it cannot serve.
//!
//! The connection state is polled: during lapin's recovery a consumer
//! stream just waits, so the consumers alone never learn how long the
//! broker has been away.

use std::sync::Arc;
use std::time::Duration;

use lapin::ConnectionStatus;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::worker::context::Context;

const POLL: Duration = Duration::from_millis(200);

/// Why the watch ended the worker.
#[derive(Debug, thiserror::Error)]
#[error("the broker connection has been down for more than {limit_secs} s")]
pub struct BrokerGone {
    pub limit_secs: u64,
}

pub async fn run(
    ctx: Arc<Context>,
    status: ConnectionStatus,
    shutdown: CancellationToken,
) -> Result<(), BrokerGone> {
    let limit = Duration::from_secs(ctx.settings.amqp.recovery_limit_secs);
    let mut down_since: Option<Instant> = None;
    loop {
        let up = status.connected() && !status.blocked();
        match (up, down_since) {
            (true, Some(since)) => {
                info!(
                    down_ms = since.elapsed().as_millis() as u64,
                    "the broker connection is back"
                );
                down_since = None;
                ctx.set_broker_up(true);
                // Accept announcements sent meanwhile are lost: holders look.
                ctx.nudge_all_holders();
            }
            (false, None) => {
                warn!(
                    blocked = status.blocked(),
                    "the broker connection is down; no new sessions are claimed until it is back"
                );
                down_since = Some(Instant::now());
                ctx.set_broker_up(false);
            }
            (false, Some(since)) if since.elapsed() > limit => {
                let gone = BrokerGone {
                    limit_secs: limit.as_secs(),
                };
                error!(error = %gone, "stopping the worker: its leases go back to the fleet");
                return Err(gone);
            }
            _ => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}
