//! Session lifecycle on every worker: marks sessions idle past their
//! profile's `idle_ttl_secs` (recording `session.idle` and closing this
//! worker's warm process of the session) and publishes the lifecycle-event
//! outbox (`session_events`), which the store fills in the same
//! transaction as the session change each event reports.
//!
//! Guarantee: at least once. An event is claimed for a while before it is
//! published and marked after the broker's confirm; a worker that dies in
//! between leaves the claim to expire and another worker publishes it
//! again (same `event_id`, the reader's dedup key).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::ops::metrics::SESSION_EVENTS;
use crate::store::{now_ms, IdleRule};
use crate::worker::context::Context;

/// Events one sweep publishes at most.
const BATCH: i64 = 100;
/// Sessions of each profile one sweep marks idle at most.
const IDLE_BATCH: i64 = 200;

pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(ctx.settings.sweep_interval()) => {}
            _ = ctx.lifecycle_recorded() => {}
            _ = shutdown.cancelled() => return,
        }
        mark_idle(&ctx).await;
        if ctx.broker_up() {
            publish_pending(&ctx).await;
        }
    }
}

/// The idle rule of every profile, at `now_ms`.
pub fn idle_rules(ctx: &Context, now_ms: i64) -> Vec<IdleRule> {
    ctx.settings
        .profiles
        .iter()
        .map(|(name, p)| IdleRule {
            profile: name.clone(),
            quiet_since_ms: now_ms - (p.idle_ttl_secs as i64).saturating_mul(1000),
            idle_ttl_secs: p.idle_ttl_secs,
        })
        .collect()
}

/// Marks quiet sessions idle and closes this worker's warm processes of
/// them (another worker's warm process of the session expires by its own
/// `claude.warm_idle_ttl_secs`). Returns how many it marked.
pub async fn mark_idle(ctx: &Context) -> usize {
    let rules = idle_rules(ctx, now_ms());
    match ctx
        .store
        .mark_idle_sessions(&rules, now_ms(), IDLE_BATCH)
        .await
    {
        Ok(marked) => {
            for s in &marked {
                ctx.warm.release(&s.session_key);
            }
            if !marked.is_empty() {
                info!(count = marked.len(), "sessions idle past their TTL");
                ctx.note_lifecycle_recorded();
            }
            marked.len()
        }
        Err(e) => {
            ctx.metrics.store_error("lifecycle");
            debug!(error = %e, "idle sweep: the store is not answering");
            0
        }
    }
}

/// How long a publisher holds its claim on an event: longer than a
/// publish may take.
fn claim_for(ctx: &Context) -> Duration {
    Duration::from_millis(ctx.settings.amqp.publish_timeout_ms) * 2 + Duration::from_secs(5)
}

/// Publishes recorded lifecycle events in order; returns how many went out.
pub async fn publish_pending(ctx: &Context) -> usize {
    let claim_ms = claim_for(ctx).as_millis() as i64;
    let events = match ctx
        .store
        .claim_session_events(now_ms(), claim_ms, BATCH)
        .await
    {
        Ok(events) => events,
        Err(e) => {
            ctx.metrics.store_error("lifecycle");
            debug!(error = %e, "lifecycle publisher: the store is not answering");
            return 0;
        }
    };
    let mut sent = 0;
    let mut failed = false;
    for event in events {
        // After a failure the rest go back unpublished, keeping their order.
        let ok = !failed
            && match ctx
                .sink
                .publish_session_event(&event.kind, event.event_id, &event.to_json())
                .await
            {
                Ok(()) => true,
                Err(e) => {
                    warn!(error = %e, "publishing a session event failed; the next sweep retries");
                    failed = true;
                    false
                }
            };
        if ok {
            sent += 1;
            ctx.metrics
                .counter(SESSION_EVENTS, &[("type", event.kind.as_str())])
                .increment(1);
        }
        if let Err(e) = ctx
            .store
            .settle_session_event(event.event_id, ok, now_ms())
            .await
        {
            // Published but unmarked: published once more after the claim.
            debug!(error = %e, "could not settle a session event");
        }
    }
    sent
}
