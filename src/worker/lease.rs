//! Keeping a session's lease while its jobs run: the heartbeat, and the
//! time until which the lease is surely held (`Stop::lease_valid_until`).
//!
//! The heartbeat runs inside the session's own future ([`hold`]), not as a
//! task of its own: it stops when the session's work ends, whether it
//! returns or panics, so a broken session task can never keep renewing a
//! lease that no worker could then take over. And it renews only while the
//! session makes progress ([`Stop::progressed`]: a CLI message, an event, a
//! job or an attempt begun): a session stuck longer than any legitimate
//! wait ([`stall_limit`]) lets its lease go.

use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use crate::store::{now_ms, Lease, StoreError};
use crate::worker::context::Context;

/// Signals a running job watches.
#[derive(Clone)]
pub struct Stop {
    /// The heartbeat found the lease gone: stop at once, publish nothing.
    pub lease_lost: CancellationToken,
    /// Shutdown's grace period is over: kill the turn, requeue the job.
    pub kill: CancellationToken,
    /// Until when (Unix ms, with a safety margin) the lease is surely ours,
    /// as of its last renewal. An event is published only before this, so
    /// a worker that was paused past its lease publishes nothing even if
    /// it wakes between the fenced `record_seq` and the publish.
    pub lease_valid_until: Arc<AtomicI64>,
    /// When (Unix ms) the session last made progress.
    progress_at_ms: Arc<AtomicI64>,
}

impl Stop {
    /// For a lease claimed at `claimed_at_ms`.
    pub fn new(ctx: &Context, claimed_at_ms: i64, kill: CancellationToken) -> Stop {
        let ttl_ms = ctx.settings.lease_ttl().as_millis() as i64;
        Stop {
            lease_lost: CancellationToken::new(),
            kill,
            lease_valid_until: Arc::new(AtomicI64::new(
                claimed_at_ms + ttl_ms - lease_margin_ms(ttl_ms),
            )),
            progress_at_ms: Arc::new(AtomicI64::new(claimed_at_ms)),
        }
    }

    /// The session did something: the heartbeat may keep renewing.
    pub fn progressed(&self) {
        self.progress_at_ms.store(now_ms(), Ordering::SeqCst);
    }

    fn stalled_for_ms(&self) -> i64 {
        now_ms() - self.progress_at_ms.load(Ordering::SeqCst)
    }

    pub fn lease_fresh(&self) -> bool {
        now_ms() < self.lease_valid_until.load(Ordering::SeqCst)
    }
}

/// How long before its recorded expiry a lease is no longer trusted for
/// publishing (clock skew between hosts, time between check and publish).
fn lease_margin_ms(ttl_ms: i64) -> i64 {
    ttl_ms / 5
}

/// The longest a session may go without progress and still be waiting
/// legitimately: a CLI silent for the whole turn timeout, the longest retry
/// delay, a publish and its retry, plus slack for database calls.
pub fn stall_limit(ctx: &Context) -> std::time::Duration {
    let s = &ctx.settings;
    std::time::Duration::from_secs(s.claude.turn_timeout_secs + 30)
        + std::time::Duration::from_millis(s.retry.max_delay_ms + 2 * s.amqp.publish_timeout_ms)
}

/// Runs `work` while renewing the lease; the heartbeat is polled by the
/// same future, so it ends with `work`, panic included.
pub async fn hold<F: Future>(ctx: &Context, lease: &Lease, stop: &Stop, work: F) -> F::Output {
    let heartbeat = heartbeat(ctx, lease, stop);
    tokio::pin!(work);
    tokio::pin!(heartbeat);
    let mut beating = true;
    loop {
        tokio::select! {
            out = &mut work => return out,
            // Over once the lease is lost; `work` sees `lease_lost`.
            _ = &mut heartbeat, if beating => beating = false,
        }
    }
}

/// Renews the lease every third of its TTL. Signals `lease_lost` when the
/// store says it is gone, or when it could not be renewed before it
/// expired (the database unreachable): past that point another worker may
/// own the session.
async fn heartbeat(ctx: &Context, lease: &Lease, stop: &Stop) {
    let ttl = ctx.settings.lease_ttl();
    let ttl_ms = ttl.as_millis() as i64;
    let mut expires = now_ms() + ttl_ms;
    let stall_ms = stall_limit(ctx).as_millis() as i64;
    loop {
        tokio::time::sleep(ttl / 3).await;
        let stalled_ms = stop.stalled_for_ms();
        if stalled_ms > stall_ms {
            error!(stalled_ms, limit_ms = stall_ms,
                   "the session made no progress for longer than any legitimate wait; letting its lease go");
            stop.lease_lost.cancel();
            return;
        }
        let renewed_at = now_ms();
        match ctx.store.renew_lease(lease, renewed_at, ttl_ms).await {
            Ok(true) => {
                expires = renewed_at + ttl_ms;
                stop.lease_valid_until
                    .store(expires - lease_margin_ms(ttl_ms), Ordering::SeqCst);
            }
            Ok(false) | Err(StoreError::LeaseLost { .. }) => {
                stop.lease_lost.cancel();
                return;
            }
            Err(e) => {
                warn!(error = %e, "renewing the session lease failed");
                if now_ms() >= expires {
                    stop.lease_lost.cancel();
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures_util::FutureExt;

    use super::*;
    use crate::broker::publish::{Attribution, PublishError, ReplySink};
    use crate::config::{Secret, Settings};
    use crate::protocol::{EventV1, PermissionMode, SessionMode};
    use crate::store::{JobSpec, NewJob, SessionStore};

    /// Events go nowhere: only the lease is under test.
    struct NoSink;

    #[async_trait::async_trait]
    impl ReplySink for NoSink {
        async fn publish_event(
            &self,
            _: &str,
            _: &EventV1,
            _: &[u8],
            _: &Attribution<'_>,
        ) -> Result<(), PublishError> {
            Ok(())
        }
        async fn publish_raw_event(&self, _: &str, _: &str, _: &[u8]) -> Result<(), PublishError> {
            Ok(())
        }
        async fn publish_control_result(
            &self,
            _: &str,
            _: &str,
            _: &[u8],
        ) -> Result<(), PublishError> {
            Ok(())
        }
        async fn publish_control(
            &self,
            _: &[u8],
            _: &str,
            _: Option<&str>,
        ) -> Result<(), PublishError> {
            Ok(())
        }
        async fn dead_letter(
            &self,
            _: &lapin::message::Delivery,
            _: &str,
        ) -> Result<(), PublishError> {
            Ok(())
        }
    }

    /// A real SQLite store with one queued job in session `s`, claimed by
    /// `w1` with a 2 s lease (renewed every ~0.67 s).
    async fn claimed() -> (tempfile::TempDir, Arc<Context>, Lease) {
        let dir = tempfile::tempdir().unwrap();
        let url = Secret::new(format!("sqlite:{}", dir.path().join("t.db").display()));
        let store = crate::store::connect(&url, 2).await.unwrap();
        store.migrate().await.unwrap();
        let spec = JobSpec {
            prompt: "p".into(),
            mode: SessionMode::Continue,
            claude_session_id: None,
            profile: "default".into(),
            model: None,
            max_turns: 1,
            permission_mode: PermissionMode::Plan,
            metadata: serde_json::json!({}),
            reply_to: None,
            on_busy: Default::default(),
            attachments: Vec::new(),
            max_budget_usd: None,
            identity: None,
            compact: false,
            prompt_answerers: Vec::new(),
        };
        let job = NewJob {
            job_id: "j".into(),
            session_key: "s".into(),
            spec,
        };
        store.accept_job(&job, now_ms()).await.unwrap();
        let settings = Settings::from_toml_overrides("[worker]\nlease_ttl_secs = 2").unwrap();
        let ctx = Context::new(
            Arc::new(settings),
            Arc::clone(&store),
            Arc::new(NoSink),
            "w1".into(),
            Default::default(),
        );
        let ttl_ms = ctx.settings.lease_ttl().as_millis() as i64;
        let lease = store
            .claim_session("w1", now_ms(), ttl_ms, None)
            .await
            .unwrap()
            .unwrap();
        (dir, ctx, lease)
    }

    async fn expiry(store: &Arc<dyn SessionStore>) -> i64 {
        let s = store.get_session("s").await.unwrap().unwrap();
        s.lease_expires_at_ms.unwrap()
    }

    #[tokio::test]
    async fn the_heartbeat_renews_while_the_work_runs() {
        let (_dir, ctx, lease) = claimed().await;
        let stop = Stop::new(&ctx, now_ms(), CancellationToken::new());
        let before = expiry(&ctx.store).await;
        hold(
            &ctx,
            &lease,
            &stop,
            tokio::time::sleep(Duration::from_millis(1600)),
        )
        .await;
        assert!(
            expiry(&ctx.store).await > before,
            "the lease was not renewed"
        );
        assert!(!stop.lease_lost.is_cancelled());
    }

    #[tokio::test]
    async fn a_stalled_session_stops_renewing_its_lease() {
        let (_dir, ctx, lease) = claimed().await;
        let stop = Stop::new(&ctx, now_ms(), CancellationToken::new());
        let before = expiry(&ctx.store).await;
        // Progress last seen longer ago than any legitimate wait.
        let limit_ms = stall_limit(&ctx).as_millis() as i64;
        stop.progress_at_ms
            .store(now_ms() - limit_ms - 1, Ordering::SeqCst);
        let work = stop.lease_lost.cancelled();
        tokio::time::timeout(Duration::from_secs(5), hold(&ctx, &lease, &stop, work))
            .await
            .expect("the heartbeat lets a stalled session's lease go");
        assert_eq!(expiry(&ctx.store).await, before, "not renewed");
        // Progress keeps it renewing.
        let stop = Stop::new(&ctx, now_ms(), CancellationToken::new());
        let progressing = async {
            for _ in 0..8 {
                stop.progressed();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        hold(&ctx, &lease, &stop, progressing).await;
        assert!(!stop.lease_lost.is_cancelled());
        assert!(expiry(&ctx.store).await > before);
    }

    #[tokio::test]
    async fn the_heartbeat_dies_with_a_panicking_session() {
        let (_dir, ctx, lease) = claimed().await;
        let stop = Stop::new(&ctx, now_ms(), CancellationToken::new());
        let work = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            panic!("a bug in a turn");
        };
        let held = std::panic::AssertUnwindSafe(hold(&ctx, &lease, &stop, work)).catch_unwind();
        assert!(held.await.is_err(), "the panic propagates");
        let after_panic = expiry(&ctx.store).await;
        // Three renewal periods later nothing renewed the lease, and it has
        // expired: another worker can take the session over.
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert_eq!(
            expiry(&ctx.store).await,
            after_panic,
            "a heartbeat outlived its session"
        );
        let ttl_ms = ctx.settings.lease_ttl().as_millis() as i64;
        let taken = ctx
            .store
            .claim_session("w2", now_ms(), ttl_ms, None)
            .await
            .unwrap();
        assert_eq!(
            taken.map(|l| (l.owner, l.epoch)),
            Some(("w2".to_string(), lease.epoch + 1))
        );
    }
}
