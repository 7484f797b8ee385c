//! Scheduling: claim a session's lease, run its queued jobs in order, keep
//! the lease alive with heartbeats, give it back. At most
//! `worker.max_concurrent_turns` sessions run at once on this worker; a
//! periodic sweep finds work other workers left (expired leases) or that
//! arrived through another worker.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info_span, warn, Instrument};

use crate::logging::session_ref;
use crate::store::{now_ms, Lease, NextJob, ReleaseOutcome, YieldOrder, YieldOutcome};
use crate::worker::context::Context;
use crate::worker::lease::{self, Stop};
use crate::worker::supervise::panic_message;
use crate::worker::turn::{run_job, TurnAbort};

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
    let slots = Arc::clone(&ctx.slots);
    let ttl_ms = ctx.settings.lease_ttl().as_millis() as i64;
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&slots).acquire_owned() => p.expect("semaphore is never closed"),
            _ = signals.shutdown.cancelled() => break,
        };
        if !ctx.broker_up() {
            // A session claimed now could not publish: leave it to the
            // fleet until the broker is back (or this worker gives up).
            tokio::select! {
                _ = ctx.broker_back() => {}
                _ = signals.shutdown.cancelled() => break,
            }
        }
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
                let span = info_span!("session", session = %session_ref(&lease.session_key), epoch = lease.epoch);
                tracker.spawn(
                    guarded_session(ctx, lease, claimed_at, permit, signals).instrument(span),
                );
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
        let mut woken = std::pin::pin!(ctx.woken());
        if woken.as_mut().now_or_never().is_some() {
            // A wake-up came while we looked: look again.
            continue;
        }
        if let Some(idle) = &ctx.hooks.scheduler_idle {
            idle.notify_one();
        }
        tokio::select! {
            _ = woken => {}
            _ = tokio::time::sleep(ctx.settings.sweep_interval()) => {}
            _ = signals.shutdown.cancelled() => break,
        }
    }
}

/// A session's task. A panic anywhere in it must not leave the session's
/// lease held or its job stuck: it is caught here and logged once, the
/// session is handed back (its running job is requeued and retried), and
/// the worker goes on serving other sessions. The heartbeat lived inside
/// the task, so it stopped with the panic.
async fn guarded_session(
    ctx: Arc<Context>,
    lease: Lease,
    claimed_at_ms: i64,
    permit: OwnedSemaphorePermit,
    signals: Shutdown,
) {
    // Lowered when the session task ends, also by a panic.
    let _held = ctx.metrics.raise(crate::ops::metrics::LEASES_HELD);
    let session = run_session(
        Arc::clone(&ctx),
        lease.clone(),
        claimed_at_ms,
        permit,
        signals,
    );
    if let Err(panic) = AssertUnwindSafe(session).catch_unwind().await {
        error!(panic = %panic_message(&*panic), "a session task panicked; handing the session back");
        if let Err(e) = ctx.store.abandon_lease(&lease, now_ms()).await {
            warn!(error = %e, "could not hand the session back; its lease will expire");
        }
        ctx.wake_scheduler(None);
    }
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
    let stop = Stop::new(&ctx, claimed_at_ms, signals.kill.clone());
    let work = session_loop(&ctx, &lease, &stop, &signals);
    let result = lease::hold(&ctx, &lease, &stop, work).await;
    match result {
        Ok(()) => {}
        Err(TurnAbort::LeaseLost) => {
            warn!("lease lost (taken over, or not renewable before it expired); stopped working on the session");
        }
        Err(TurnAbort::Shutdown) => {
            if let Err(e) = ctx.store.abandon_lease(&lease, now_ms()).await {
                warn!(error = %e, "could not hand the session back on shutdown; its lease will expire");
            }
        }
        Err(e @ (TurnAbort::Store(_) | TurnAbort::Publish(_))) => {
            if matches!(e, TurnAbort::Store(_)) {
                ctx.metrics.store_error("turn");
            }
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
    // Before the first look, so an accept in between is not missed.
    let accepts = ctx.watch_accepts(&lease.session_key);
    let mut next = ctx.store.next_turn(lease).await?.map(Box::new);
    loop {
        if signals.shutdown.is_cancelled() {
            return Err(TurnAbort::Shutdown);
        }
        let job = match next.take() {
            Some(job) => job,
            None => match keep_warm_session(ctx, lease, signals, &accepts.notify).await? {
                Affinity::JobArrived(job) => job,
                Affinity::Yielded => return Ok(()),
                Affinity::Over => match ctx.store.release_lease(lease, now_ms()).await? {
                    ReleaseOutcome::Released => return Ok(()),
                    ReleaseOutcome::MoreWork => {
                        next = ctx.store.next_turn(lease).await?.map(Box::new);
                        continue;
                    }
                },
            },
        };
        stop.progressed();
        let span = info_span!("job", job_id = %job.job.job_id);
        let after = run_job(ctx, lease, *job, stop).instrument(span).await?;
        // Fairness: another session waiting for a worker goes first when no
        // slot is free here (with one free, this worker's scheduler serves
        // it: handing the lease back would only make this session wait);
        // this one is claimed again in least-recently-served order. The
        // outcome's transaction looked already; if it saw someone waiting
        // and this worker is full, look again and hand the lease back.
        match after {
            Some(a) if !(a.others_waiting && ctx.slots_full()) => next = a.next,
            _ => match ctx
                .store
                .yield_or_next(lease, now_ms(), YieldOrder::OthersFirst)
                .await?
            {
                YieldOutcome::HandedBack => return Ok(()),
                YieldOutcome::Kept(job) => next = job,
            },
        }
    }
}

/// Lease affinity: when this worker holds the session's CLI warm, keep the
/// lease for `worker.warm_affinity_ms` after its last job, so a follow-up
/// runs here warm instead of cold on whichever worker accepted it. Never at
/// the cost of others: if another session waits for a slot the lease is
/// handed back at once.
async fn keep_warm_session(
    ctx: &Context,
    lease: &Lease,
    signals: &Shutdown,
    accepted: &Notify,
) -> Result<Affinity, TurnAbort> {
    let window = Duration::from_millis(ctx.settings.worker.warm_affinity_ms);
    if window.is_zero() || !ctx.warm.holds(&lease.session_key) {
        return Ok(Affinity::Over);
    }
    let deadline = tokio::time::Instant::now() + window;
    // The caller has just looked (and yielded if others waited).
    let mut look = false;
    let mut polls = 0;
    loop {
        if look && !ctx.slots_full() {
            // A session waiting for a worker gets a free slot here; only
            // this session's follow-up matters (a read).
            if let Some(job) = ctx.store.next_turn(lease).await? {
                return Ok(Affinity::JobArrived(Box::new(job)));
            }
        } else if look {
            match ctx
                .store
                .yield_or_next(lease, now_ms(), YieldOrder::OwnFirst)
                .await?
            {
                YieldOutcome::Kept(Some(job)) => return Ok(Affinity::JobArrived(job)),
                // Handed back: another session needs the slot.
                YieldOutcome::HandedBack => return Ok(Affinity::Yielded),
                YieldOutcome::Kept(None) => {}
            }
        }
        look = true;
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Ok(Affinity::Over);
        }
        // A job of this session accepted here wakes us at once (a permit
        // if it came while we looked), as does an announcement of one
        // accepted elsewhere or of a session waiting for a slot here
        // (`accept_feed`); the rest is seen at the next poll.
        tokio::select! {
            _ = accepted.notified() => {}
            _ = tokio::time::sleep(ctx.affinity_poll(polls).min(deadline - now)) => polls += 1,
            _ = signals.shutdown.cancelled() => return Ok(Affinity::Over),
        }
    }
}

enum Affinity {
    /// The session's next job arrived within the window.
    JobArrived(Box<NextJob>),
    /// The lease was handed back to let another session run.
    Yielded,
    /// Nothing arrived (or affinity does not apply): release as usual.
    Over,
}
