//! Consuming the jobs queue: each delivery is accepted (validated and
//! persisted) and then acked. A delivery that cannot be persisted (the
//! database or broker is down) is held and retried in place with backoff —
//! that also stops further deliveries — and only handed back to the queue
//! after `HOLD_LIMIT` or at shutdown, so an outage neither loses jobs nor
//! burns through the queue's delivery limit.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::{Channel, Consumer};
use tokio_util::sync::CancellationToken;
use tracing::{error, info_span, warn, Instrument};

use crate::worker::accept::{accept, AcceptError, Accepted};
use crate::worker::context::Context;

/// How long a delivery that cannot be persisted is held and retried
/// before it goes back to the queue.
const HOLD_LIMIT: Duration = Duration::from_secs(120);

/// One step: accept a delivery, then ack or nack it. Never panics on
/// input; returns what happened for tests and logs.
pub async fn handle_delivery(
    ctx: &Context,
    delivery: &Delivery,
    shutdown: &CancellationToken,
) -> Option<Accepted> {
    let started = tokio::time::Instant::now();
    let mut delay = Duration::from_millis(250);
    loop {
        match accept(ctx, delivery).await {
            Ok(accepted) => {
                if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
                    // The broker will redeliver; the job_id makes that harmless.
                    warn!(error = %e, "ack failed after the job was accepted");
                }
                if let Accepted::Queued { session_key, .. } = &accepted {
                    ctx.wake_scheduler(Some(session_key));
                }
                return Some(accepted);
            }
            Err(e) if started.elapsed() < HOLD_LIMIT && !shutdown.is_cancelled() => {
                if matches!(e, AcceptError::Store(_)) {
                    ctx.metrics.store_error("accept");
                }
                warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "could not accept a job; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => {}
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            Err(e) => {
                error!(error = %e, "could not accept a job; returning it to the queue");
                let _ = delivery
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await;
                return None;
            }
        }
    }
}

/// Which queue a consume loop serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// The shared jobs queue.
    Jobs,
    /// This worker's own queue on the control exchange.
    Control,
}

/// The consume loop: deliveries until shutdown.
pub async fn run(
    ctx: Arc<Context>,
    channel: Channel,
    mut consumer: Consumer,
    stream: Stream,
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
                    ?stream,
                    delivery_tag = delivery.delivery_tag,
                    redelivered = delivery.redelivered
                );
                match stream {
                    Stream::Jobs => {
                        handle_delivery(&ctx, &delivery, &shutdown)
                            .instrument(span)
                            .await;
                    }
                    Stream::Control => handle_control(&ctx, &delivery).instrument(span).await,
                }
            }
            Some(Err(e)) => {
                // Bounded: a worker whose broker stays away stops (its
                // supervisor restarts it) rather than holding leases it
                // cannot serve.
                let limit = Duration::from_secs(ctx.settings.amqp.recovery_limit_secs);
                match tokio::time::timeout(limit, channel.wait_for_recovery(e)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        error!(error = %e, ?stream, "a consumer failed and did not recover");
                        break;
                    }
                    Err(_) => {
                        error!(
                            ?stream,
                            limit_secs = limit.as_secs(),
                            "the broker connection did not come back in time"
                        );
                        break;
                    }
                }
            }
            None => {
                warn!(?stream, "a consumer was cancelled by the broker");
                break;
            }
        }
    }
}

/// One control delivery: handled, then acked. A failure (database or
/// broker down) hands it back once; control messages are best effort
/// beyond that, and the sender's wait times out with a clear message.
async fn handle_control(ctx: &Context, delivery: &Delivery) {
    match crate::worker::control::handle(ctx, delivery).await {
        Ok(()) => {
            let _ = delivery.ack(BasicAckOptions::default()).await;
        }
        Err(e) => {
            error!(error = %e, "handling a control message failed");
            let _ = delivery
                .nack(BasicNackOptions {
                    requeue: !delivery.redelivered,
                    ..Default::default()
                })
                .await;
        }
    }
}
