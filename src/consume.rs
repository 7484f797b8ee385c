//! Consuming the jobs queue: each delivery is accepted (validated and
//! persisted) and then acked; a delivery that cannot be persisted is
//! nacked back to the queue after a pause, so nothing is lost while the
//! database is down.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::{Channel, Consumer};
use tokio_util::sync::CancellationToken;
use tracing::{error, info_span, warn, Instrument};

use crate::accept::{accept, Accepted};
use crate::context::Context;

/// Pause before handing back a delivery we could not persist, so an
/// outage is not a hot redelivery loop.
const REQUEUE_PAUSE: Duration = Duration::from_secs(1);

/// One step: accept a delivery, then ack or nack it. Never panics on
/// input; returns what happened for tests and logs.
pub async fn handle_delivery(ctx: &Context, delivery: &Delivery) -> Option<Accepted> {
    match accept(ctx, delivery).await {
        Ok(accepted) => {
            if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
                // The broker will redeliver; the job_id makes that harmless.
                warn!(error = %e, "ack failed after the job was accepted");
            }
            if let Accepted::Queued { session_key, .. } = &accepted {
                ctx.wake_scheduler(Some(session_key));
            }
            Some(accepted)
        }
        Err(e) => {
            error!(error = %e, "could not accept a job; returning it to the queue");
            tokio::time::sleep(REQUEUE_PAUSE).await;
            let _ = delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await;
            None
        }
    }
}

/// The consume loop: deliveries until shutdown.
pub async fn run(
    ctx: Arc<Context>,
    channel: Channel,
    mut consumer: Consumer,
    shutdown: CancellationToken,
) {
    loop {
        let next = tokio::select! {
            d = consumer.next() => d,
            _ = shutdown.cancelled() => break,
        };
        match next {
            Some(Ok(delivery)) => {
                let span = info_span!(
                    "delivery",
                    delivery_tag = delivery.delivery_tag,
                    redelivered = delivery.redelivered
                );
                handle_delivery(&ctx, &delivery).instrument(span).await;
            }
            Some(Err(e)) => {
                if let Err(e) = channel.wait_for_recovery(e).await {
                    error!(error = %e, "the jobs consumer failed and did not recover");
                    break;
                }
            }
            None => {
                warn!("the jobs consumer was cancelled by the broker");
                break;
            }
        }
    }
}
