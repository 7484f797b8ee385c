//! The retention prune: finished jobs, stored transcripts, answered control
//! requests, published lifecycle events and the CLI's transcript files past
//! their profile's `retention_secs`; sessions quiet that long are forgotten
//! (`session.ended`, reason `expired`).
//!
//! One at a time across the fleet: a run holds the database lease `prune`
//! (renewed before every bounded step, given up at the end with the time
//! it finished, so the fleet runs it once per `worker.prune_interval_secs`
//! whichever worker wins). A worker killed mid-run leaves its lease to
//! expire (`worker.lease_ttl_secs`) and the next run takes over. The CLI's
//! transcript files live on each host: every worker prunes its own after
//! the database part (and `claude-worker sessions prune` those of the host
//! it runs on). `claude-worker sessions prune` runs the same code.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::claude;
use crate::config::Settings;
use crate::ops::metrics::{PRUNED, PRUNE_RUNS};
use crate::store::{now_ms, PruneReport, PruneRequest, RetentionRule, SessionStore, StoreError};
use crate::worker::context::Context;

/// The maintenance lease's name.
pub const LEASE: &str = "prune";
/// Steps one run takes at most (each bounded by `worker.prune_batch` rows
/// of each kind); what is left waits for the next run.
const MAX_STEPS: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Another worker (or `sessions prune`) holds the prune lease.
    #[error("another prune is running (the fleet's prune lease is held)")]
    Busy,
    /// The lease was taken over mid-run (this run was too slow or paused).
    #[error("the prune lease was lost mid-run; the rest is left to the next run")]
    LeaseLost,
}

/// Who prunes and against what.
pub struct Pruner<'a> {
    pub settings: &'a Settings,
    pub store: &'a dyn SessionStore,
    /// The lease owner (a worker id, or the CLI's).
    pub owner: &'a str,
}

impl Pruner<'_> {
    /// One full run at `now_ms`: under the fleet's lease (taken only if the
    /// last run finished `min_interval` ago), steps until nothing is left
    /// or [`MAX_STEPS`], then this host's CLI files. Dry: counts what a run
    /// would remove and changes nothing (no lease needed).
    pub async fn run(
        &self,
        now_ms: i64,
        min_interval: Duration,
        dry_run: bool,
    ) -> Result<PruneReport, PruneError> {
        let mut report = PruneReport::default();
        if dry_run {
            report = self.store.prune(&self.request(now_ms, true)).await?;
            report.cli_files = prune_cli_files(self.settings, now_ms, true);
            return Ok(report);
        }
        let ttl_ms = self.settings.lease_ttl().as_millis() as i64;
        let store = self.store;
        let epoch = store
            .take_maintenance_lease(
                LEASE,
                self.owner,
                now_ms,
                ttl_ms,
                min_interval.as_millis() as i64,
            )
            .await?
            .ok_or(PruneError::Busy)?;
        let req = self.request(now_ms, false);
        for _ in 0..MAX_STEPS {
            // Fenced by the lease's epoch: a taken-over run stops here.
            if !store
                .renew_maintenance_lease(LEASE, self.owner, epoch, now_ms, ttl_ms)
                .await?
            {
                return Err(PruneError::LeaseLost);
            }
            let step = store.prune(&req).await?;
            report.add(&step);
            if step.total() == 0 {
                break;
            }
        }
        report.cli_files = prune_cli_files(self.settings, now_ms, false);
        store
            .release_maintenance_lease(LEASE, self.owner, epoch, now_ms)
            .await?;
        Ok(report)
    }

    fn request(&self, now_ms: i64, dry_run: bool) -> PruneRequest {
        let retention_ms = |secs: u64| (secs as i64).saturating_mul(1000);
        let rules = self
            .settings
            .profiles
            .iter()
            .map(|(name, p)| RetentionRule {
                profile: name.clone(),
                before_ms: now_ms - retention_ms(p.retention_secs),
            })
            .collect();
        // Shared rows outlive every profile's retention.
        let longest = self
            .settings
            .profiles
            .values()
            .map(|p| p.retention_secs)
            .max()
            .unwrap_or(0);
        PruneRequest {
            rules,
            shared_before_ms: now_ms - retention_ms(longest),
            batch: self.settings.worker.prune_batch,
            dry_run,
            now_ms,
        }
    }
}

/// The worker's prune task: tries a run every so often; only the worker
/// that gets the lease (and only once per interval fleet-wide) runs.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    let interval = Duration::from_secs(ctx.settings.worker.prune_interval_secs);
    let every = interval.clamp(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
        run_once(&ctx, now_ms(), interval).await;
    }
}

/// One attempt at a run; logs (no identifiers) and counts what it removed.
pub async fn run_once(ctx: &Context, now_ms: i64, min_interval: Duration) -> Option<PruneReport> {
    let pruner = Pruner {
        settings: &ctx.settings,
        store: ctx.store.as_ref(),
        owner: &ctx.worker_id,
    };
    match pruner.run(now_ms, min_interval, false).await {
        Ok(report) => {
            ctx.metrics.counter(PRUNE_RUNS, &[]).increment(1);
            for (kind, n) in report.kinds() {
                if n > 0 {
                    ctx.metrics.counter(PRUNED, &[("kind", kind)]).increment(n);
                }
            }
            info!(
                jobs = report.jobs,
                transcripts = report.transcripts,
                control_requests = report.control_requests,
                session_events = report.session_events,
                sessions_expired = report.sessions_expired,
                cli_files = report.cli_files,
                "retention prune done"
            );
            if report.sessions_expired > 0 {
                ctx.note_lifecycle_recorded();
            }
            Some(report)
        }
        Err(PruneError::Busy) => None,
        Err(e) => {
            if matches!(e, PruneError::Store(_)) {
                ctx.metrics.store_error("prune");
            }
            warn!(error = %e, "retention prune stopped");
            None
        }
    }
}

fn mtime_ms(path: &Path) -> Option<i64> {
    let t = std::fs::metadata(path).ok()?.modified().ok()?;
    Some(t.duration_since(UNIX_EPOCH).ok()?.as_millis() as i64)
}

/// The CLI's project folders a profile's sessions use: under its config
/// dir, named after a working directory below the profile's `workdir`.
fn project_dirs(settings: &Settings, profile: &crate::config::Profile) -> Vec<PathBuf> {
    let env = claude::command::cli_env(&settings.claude.env_passthrough, profile);
    let Some(projects) = claude::config_dir(&env).map(|c| c.join("projects")) else {
        return Vec::new();
    };
    let mut prefixes = vec![claude::project_dir_name(&profile.workdir)];
    if let Ok(abs) = std::path::absolute(&profile.workdir) {
        prefixes.push(claude::project_dir_name(&abs));
    }
    let Ok(entries) = std::fs::read_dir(&projects) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            prefixes.iter().any(|p| name.starts_with(&format!("{p}-")))
        })
        .map(|e| e.path())
        .collect()
}

/// Deletes (or, dry, counts) this host's CLI transcript files (`*.jsonl`)
/// not written within their profile's retention.
pub fn prune_cli_files(settings: &Settings, now_ms: i64, dry_run: bool) -> u64 {
    let mut removed = 0;
    for p in settings.profiles.values() {
        let before = now_ms - (p.retention_secs as i64).saturating_mul(1000);
        for dir in project_dirs(settings, p) {
            let Ok(files) = std::fs::read_dir(&dir) else {
                continue;
            };
            for f in files.flatten() {
                let path = f.path();
                let old = path.extension().is_some_and(|e| e == "jsonl")
                    && mtime_ms(&path).is_some_and(|m| m < before);
                if !old {
                    continue;
                }
                if dry_run {
                    removed += 1;
                } else if let Err(e) = std::fs::remove_file(&path) {
                    debug!(error = %e, "could not remove an old CLI transcript file");
                } else {
                    removed += 1;
                }
            }
        }
    }
    removed
}
