//! Scheduling: claim a session's lease, run its queued jobs in order, keep
//! the lease alive with heartbeats, give it back. At most
//! `worker.max_concurrent_turns` sessions run at once on this worker; a
//! periodic sweep finds work other workers left (expired leases) or that
//! arrived through another worker.

use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info_span, warn, Instrument};

use crate::context::Context;
use crate::store::{now_ms, Lease, ReleaseOutcome, StoreError};
use crate::turn::{run_job, Stop, TurnAbort};

/// Shutdown signals: `shutdown` stops taking new work; `kill` (after the
/// grace period) stops running turns.
#[derive(Clone)]
pub struct Shutdown {
    pub shutdown: CancellationToken,
    pub kill: CancellationToken,
}

/// The scheduler loop: claim while there is capacity, else wait for a
/// wake-up (a job accepted here, a session finished) or the sweep tick.
pub async fn run(ctx: Arc<Context>, signals: Shutdown, tracker: TaskTracker) {
    let slots = Arc::new(Semaphore::new(ctx.settings.worker.max_concurrent_turns));
    let ttl_ms = ctx.settings.lease_ttl().as_millis() as i64;
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&slots).acquire_owned() => p.expect("semaphore is never closed"),
            _ = signals.shutdown.cancelled() => break,
        };
        let prefer = ctx.take_preferred();
        match ctx
            .store
            .claim_session(&ctx.worker_id, now_ms(), ttl_ms, prefer.as_deref())
            .await
        {
            Ok(Some(lease)) => {
                let ctx = Arc::clone(&ctx);
                let signals = signals.clone();
                let span =
                    info_span!("session", session_key = %lease.session_key, epoch = lease.epoch);
                tracker.spawn(run_session(ctx, lease, permit, signals).instrument(span));
                continue;
            }
            Ok(None) => drop(permit),
            Err(e) => {
                warn!(error = %e, "claiming a session failed; will try again");
                drop(permit);
            }
        }
        if prefer.is_some() {
            // The preferred session was busy or gone; others may still wait.
            continue;
        }
        tokio::select! {
            _ = ctx.woken() => {}
            _ = tokio::time::sleep(ctx.settings.sweep_interval()) => {}
            _ = signals.shutdown.cancelled() => break,
        }
    }
}

/// Runs the leased session's jobs one after another, in order, then
/// releases the lease.
async fn run_session(
    ctx: Arc<Context>,
    lease: Lease,
    _permit: OwnedSemaphorePermit,
    signals: Shutdown,
) {
    let stop = Stop {
        lease_lost: CancellationToken::new(),
        kill: signals.kill.clone(),
    };
    let heartbeat = tokio::spawn(heartbeat(
        Arc::clone(&ctx),
        lease.clone(),
        stop.lease_lost.clone(),
    ));
    let result = session_loop(&ctx, &lease, &stop, &signals).await;
    heartbeat.abort();
    match result {
        Ok(()) => {}
        Err(TurnAbort::LeaseLost) => {
            warn!("lease lost to another worker; stopped working on the session");
        }
        Err(TurnAbort::Shutdown) => {
            if let Err(e) = ctx.store.abandon_lease(&lease, now_ms()).await {
                warn!(error = %e, "could not hand the session back on shutdown; its lease will expire");
            }
        }
        Err(e @ (TurnAbort::Store(_) | TurnAbort::Publish(_))) => {
            error!(error = %e, "session interrupted; its job stays queued and runs again later");
            if let Err(e) = ctx.store.abandon_lease(&lease, now_ms()).await {
                warn!(error = %e, "could not hand the session back; its lease will expire");
            }
            // Back off so a broken database or broker is not hammered.
            tokio::time::sleep(ctx.settings.sweep_interval()).await;
        }
    }
    ctx.wake_scheduler(None);
}

async fn session_loop(
    ctx: &Context,
    lease: &Lease,
    stop: &Stop,
    signals: &Shutdown,
) -> Result<(), TurnAbort> {
    loop {
        if signals.shutdown.is_cancelled() {
            return Err(TurnAbort::Shutdown);
        }
        match ctx.store.next_job(lease).await? {
            Some(job) => {
                let span = info_span!("job", job_id = %job.job_id, session_key = %job.session_key);
                run_job(ctx, lease, job, stop).instrument(span).await?;
            }
            None => match ctx.store.release_lease(lease, now_ms()).await? {
                ReleaseOutcome::Released => return Ok(()),
                ReleaseOutcome::MoreWork => continue,
            },
        }
    }
}

/// Renews the lease every third of its TTL. Signals `lease_lost` when the
/// store says it is gone, or when it could not be renewed before it
/// expired (the database unreachable): past that point another worker may
/// own the session.
async fn heartbeat(ctx: Arc<Context>, lease: Lease, lease_lost: CancellationToken) {
    let ttl = ctx.settings.lease_ttl();
    let ttl_ms = ttl.as_millis() as i64;
    let mut expires = now_ms() + ttl_ms;
    loop {
        tokio::time::sleep(ttl / 3).await;
        match ctx.store.renew_lease(&lease, now_ms(), ttl_ms).await {
            Ok(true) => expires = now_ms() + ttl_ms,
            Ok(false) | Err(StoreError::LeaseLost { .. }) => {
                lease_lost.cancel();
                return;
            }
            Err(e) => {
                warn!(error = %e, "renewing the session lease failed");
                if now_ms() >= expires {
                    lease_lost.cancel();
                    return;
                }
            }
        }
    }
}
