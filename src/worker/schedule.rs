//! Scheduling: claim a session's lease, run its queued jobs in order, keep
//! the lease alive with heartbeats, give it back. At most
//! `worker.max_concurrent_turns` sessions run at once on this worker; a
//! periodic sweep finds work other workers left (expired leases) or that
//! arrived through another worker.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info_span, warn, Instrument};

use crate::store::{now_ms, Lease, ReleaseOutcome, StoreError};
use crate::worker::context::Context;
use crate::worker::turn::{run_job, Stop, TurnAbort};

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
        let claimed_at = now_ms();
        match ctx
            .store
            .claim_session(&ctx.worker_id, claimed_at, ttl_ms, prefer.as_deref())
            .await
        {
            Ok(Some(lease)) => {
                let ctx = Arc::clone(&ctx);
                let signals = signals.clone();
                let span =
                    info_span!("session", session_key = %lease.session_key, epoch = lease.epoch);
                tracker
                    .spawn(run_session(ctx, lease, claimed_at, permit, signals).instrument(span));
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

/// How long before its recorded expiry a lease is no longer trusted for
/// publishing (clock skew between hosts, time between check and publish).
fn lease_margin_ms(ttl_ms: i64) -> i64 {
    ttl_ms / 5
}

/// Runs the leased session's jobs one after another, in order, then
/// releases the lease, or hands it back between two jobs when another
/// session is waiting for a worker.
async fn run_session(
    ctx: Arc<Context>,
    lease: Lease,
    claimed_at_ms: i64,
    _permit: OwnedSemaphorePermit,
    signals: Shutdown,
) {
    let ttl_ms = ctx.settings.lease_ttl().as_millis() as i64;
    let stop = Stop {
        lease_lost: CancellationToken::new(),
        kill: signals.kill.clone(),
        lease_valid_until: Arc::new(AtomicI64::new(
            claimed_at_ms + ttl_ms - lease_margin_ms(ttl_ms),
        )),
    };
    let heartbeat = tokio::spawn(heartbeat(
        Arc::clone(&ctx),
        lease.clone(),
        stop.lease_lost.clone(),
        Arc::clone(&stop.lease_valid_until),
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
                // Fairness: another session waiting for a worker goes first;
                // this one is claimed again in least-recently-served order.
                if ctx.store.yield_lease(lease, now_ms()).await? {
                    return Ok(());
                }
            }
            None => {
                match keep_warm_session(ctx, lease, signals).await? {
                    Affinity::JobArrived => continue,
                    Affinity::Yielded => return Ok(()),
                    Affinity::Over => {}
                }
                match ctx.store.release_lease(lease, now_ms()).await? {
                    ReleaseOutcome::Released => return Ok(()),
                    ReleaseOutcome::MoreWork => continue,
                }
            }
        }
    }
}

/// How often a lease holder in its affinity window looks for a follow-up
/// accepted by another worker (one accepted here wakes it at once).
const AFFINITY_POLL: Duration = Duration::from_millis(100);

/// Lease affinity: when this worker holds the session's CLI warm, keep the
/// lease for `worker.warm_affinity_ms` after its last job, so a follow-up
/// runs here warm instead of cold on whichever worker accepted it. Never at
/// the cost of others: if another session waits for a slot the lease is
/// handed back at once.
async fn keep_warm_session(
    ctx: &Context,
    lease: &Lease,
    signals: &Shutdown,
) -> Result<Affinity, TurnAbort> {
    let window = Duration::from_millis(ctx.settings.worker.warm_affinity_ms);
    if window.is_zero() || !ctx.warm.holds(&lease.session_key) {
        return Ok(Affinity::Over);
    }
    let deadline = tokio::time::Instant::now() + window;
    loop {
        // Armed before looking, so an accept in between is not missed.
        let accepted = ctx.job_accepted();
        tokio::pin!(accepted);
        accepted.as_mut().enable();
        if ctx.store.next_job(lease).await?.is_some() {
            return Ok(Affinity::JobArrived);
        }
        if ctx.store.yield_lease(lease, now_ms()).await? {
            // Handed back: another session needs the slot.
            return Ok(Affinity::Yielded);
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Ok(Affinity::Over);
        }
        // A job accepted here wakes us at once; one accepted by another
        // worker is seen at the next poll.
        tokio::select! {
            _ = accepted => {}
            _ = tokio::time::sleep(AFFINITY_POLL.min(deadline - now)) => {}
            _ = signals.shutdown.cancelled() => return Ok(Affinity::Over),
        }
    }
}

enum Affinity {
    /// The session's next job arrived within the window.
    JobArrived,
    /// The lease was handed back to let another session run.
    Yielded,
    /// Nothing arrived (or affinity does not apply): release as usual.
    Over,
}

/// Renews the lease every third of its TTL. Signals `lease_lost` when the
/// store says it is gone, or when it could not be renewed before it
/// expired (the database unreachable): past that point another worker may
/// own the session.
async fn heartbeat(
    ctx: Arc<Context>,
    lease: Lease,
    lease_lost: CancellationToken,
    valid_until: Arc<AtomicI64>,
) {
    let ttl = ctx.settings.lease_ttl();
    let ttl_ms = ttl.as_millis() as i64;
    let mut expires = now_ms() + ttl_ms;
    loop {
        tokio::time::sleep(ttl / 3).await;
        let renewed_at = now_ms();
        match ctx.store.renew_lease(&lease, renewed_at, ttl_ms).await {
            Ok(true) => {
                expires = renewed_at + ttl_ms;
                valid_until.store(expires - lease_margin_ms(ttl_ms), Ordering::SeqCst);
            }
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
