//! Session lifecycle and retention in the store (issue 13): the
//! lifecycle-event outbox (`session_events`), idle marking, the retention
//! prune and the fleet-wide maintenance lease it runs under.
//!
//! Every lifecycle event is written in the same transaction as the session
//! change it reports, so a worker that dies right after the change loses
//! no event: any worker's publisher sends it later (at least once; readers
//! dedup on `event_id`). `lifecycle_store_impl!` writes the methods once
//! for both backends (each provides `fenced` and `begin_write`).

use serde::Serialize;
use serde_json::{json, Value};

use super::{Lease, StoreError};
use crate::protocol::SessionMode;

/// Why a session's conversation ended (`session.ended`'s `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// A job with `session.mode = "new"` started a new conversation.
    Reset,
    /// Its retention ended: the stored transcript is gone.
    Expired,
    /// `claude-worker sessions delete`.
    Deleted,
    /// Its session budget is used up (it never resets).
    Budget,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Reset => "reset",
            EndReason::Expired => "expired",
            EndReason::Deleted => "deleted",
            EndReason::Budget => "budget",
        }
    }
}

/// A lifecycle event waiting in (or claimed from) the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredSessionEvent {
    pub event_id: i64,
    pub session_key: String,
    /// `session.started`, `session.idle` or `session.ended`: also the
    /// routing key it is published with.
    pub kind: String,
    /// The event's JSON without `event_id`.
    pub body: String,
}

impl StoredSessionEvent {
    /// The event as published: its body with `event_id` added.
    pub fn to_json(&self) -> Vec<u8> {
        let mut v: Value = serde_json::from_str(&self.body).unwrap_or_else(|_| json!({}));
        v["event_id"] = json!(self.event_id);
        serde_json::to_vec(&v).unwrap_or_default()
    }
}

/// Sessions of `profile` with no activity since `quiet_since_ms` are idle.
#[derive(Debug, Clone, PartialEq)]
pub struct IdleRule {
    pub profile: String,
    pub quiet_since_ms: i64,
    /// Reported in the event.
    pub idle_ttl_secs: u64,
}

/// A session marked idle (its `session.idle` recorded).
#[derive(Debug, Clone, PartialEq)]
pub struct IdleSession {
    pub session_key: String,
    pub profile: String,
}

/// What of `profile` finished before `before_ms` is past retention.
#[derive(Debug, Clone, PartialEq)]
pub struct RetentionRule {
    pub profile: String,
    pub before_ms: i64,
}

/// One prune step: at most `batch` rows of each kind.
#[derive(Debug, Clone, PartialEq)]
pub struct PruneRequest {
    pub rules: Vec<RetentionRule>,
    /// Answered control requests and published lifecycle events older
    /// than this go (they belong to no profile).
    pub shared_before_ms: i64,
    pub batch: i64,
    /// Count what would go, change nothing (counts are not bounded by
    /// `batch`).
    pub dry_run: bool,
    pub now_ms: i64,
}

/// What a prune removed (or, dry, would remove).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PruneReport {
    /// Finished jobs (their terminal event published).
    pub jobs: u64,
    /// Stored transcripts no live session continues.
    pub transcripts: u64,
    /// Answered control requests.
    pub control_requests: u64,
    /// Published lifecycle events.
    pub session_events: u64,
    /// Sessions whose conversation expired (forgotten, `session.ended`
    /// with reason `expired`).
    pub sessions_expired: u64,
    /// The CLI's own transcript files (counted by the caller, which owns
    /// the files: they are per host).
    pub cli_files: u64,
    /// Recorded permission prompts of ended jobs (or settled).
    pub permission_prompts: u64,
    /// "Allow for this session" rules of Claude sessions nothing continues.
    pub session_grants: u64,
}

impl PruneReport {
    pub fn total(&self) -> u64 {
        self.jobs
            + self.transcripts
            + self.control_requests
            + self.session_events
            + self.sessions_expired
            + self.cli_files
            + self.permission_prompts
            + self.session_grants
    }

    pub fn add(&mut self, o: &PruneReport) {
        self.jobs += o.jobs;
        self.transcripts += o.transcripts;
        self.control_requests += o.control_requests;
        self.session_events += o.session_events;
        self.sessions_expired += o.sessions_expired;
        self.cli_files += o.cli_files;
        self.permission_prompts += o.permission_prompts;
        self.session_grants += o.session_grants;
    }

    /// (kind, count) pairs, for logs and metrics.
    pub fn kinds(&self) -> [(&'static str, u64); 8] {
        [
            ("jobs", self.jobs),
            ("transcripts", self.transcripts),
            ("control_requests", self.control_requests),
            ("session_events", self.session_events),
            ("sessions_expired", self.sessions_expired),
            ("cli_files", self.cli_files),
            ("permission_prompts", self.permission_prompts),
            ("session_grants", self.session_grants),
        ]
    }
}

/// Whether the job's first attempt begins (or resets) the session's
/// conversation: not if this job already did, else when nothing has begun
/// it or the job asks for a new one.
pub(crate) fn needs_begin(
    started_at_ms: Option<i64>,
    begun_by: Option<&str>,
    job_id: &str,
    mode: SessionMode,
) -> bool {
    if begun_by == Some(job_id) {
        return false;
    }
    started_at_ms.is_none() || mode == SessionMode::New
}

pub(crate) fn started_body(
    key: &str,
    profile: &str,
    job_id: &str,
    mode: SessionMode,
    now_ms: i64,
) -> String {
    json!({"v": 1, "type": "session.started", "session_key": key, "profile": profile,
           "at_ms": now_ms, "job_id": job_id, "mode": mode.as_str()})
    .to_string()
}

pub(crate) fn idle_body(
    key: &str,
    profile: &str,
    last_activity_ms: i64,
    ttl_secs: u64,
    now_ms: i64,
) -> String {
    json!({"v": 1, "type": "session.idle", "session_key": key, "profile": profile,
           "at_ms": now_ms, "last_activity_ms": last_activity_ms, "idle_ttl_secs": ttl_secs})
    .to_string()
}

pub(crate) fn ended_body(
    key: &str,
    profile: &str,
    reason: EndReason,
    job_id: Option<&str>,
    now_ms: i64,
) -> String {
    let mut v = json!({"v": 1, "type": "session.ended", "session_key": key, "profile": profile,
                       "at_ms": now_ms, "reason": reason.as_str()});
    if let Some(job_id) = job_id {
        v["job_id"] = json!(job_id);
    }
    v.to_string()
}

/// The store's lifecycle and retention methods (a supertrait of
/// [`super::SessionStore`], so `dyn SessionStore` has them; import this
/// trait to call them).
#[async_trait::async_trait]
pub trait SessionLifecycle: Send + Sync + 'static {
    /// Before a job's attempt runs: begins the session's conversation if
    /// nothing has (records `session.started`), or — for a job with mode
    /// `new` on a begun one — ends it first (`session.ended`, reason
    /// `reset`). Once per job (a retried attempt records nothing again);
    /// `true` when it recorded events. Fenced.
    async fn begin_conversation(
        &self,
        lease: &Lease,
        job_id: &str,
        mode: SessionMode,
        now_ms: i64,
    ) -> Result<bool, StoreError>;

    /// Ends the session's conversation if it had begun (records
    /// `session.ended` with `reason`); `false` if it had not.
    async fn end_conversation(
        &self,
        session_key: &str,
        reason: EndReason,
        job_id: Option<&str>,
        now_ms: i64,
    ) -> Result<bool, StoreError>;

    /// Marks idle (records `session.idle` for) begun sessions with nothing
    /// to run and no activity since their rule's cutoff, once per quiet
    /// spell; at most `limit` per rule. Returns those it marked.
    async fn mark_idle_sessions(
        &self,
        rules: &[IdleRule],
        now_ms: i64,
        limit: i64,
    ) -> Result<Vec<IdleSession>, StoreError>;

    /// Claims unpublished lifecycle events (oldest first) for `claim_ms`:
    /// no other publisher takes them meanwhile.
    async fn claim_session_events(
        &self,
        now_ms: i64,
        claim_ms: i64,
        limit: i64,
    ) -> Result<Vec<StoredSessionEvent>, StoreError>;

    /// After a claim: marks the event published, or (`false`) gives the
    /// claim back so the next sweep retries it.
    async fn settle_session_event(
        &self,
        event_id: i64,
        published: bool,
        now_ms: i64,
    ) -> Result<(), StoreError>;

    /// Takes the fleet-wide lease `name` if it is free (or expired) and its
    /// last run finished at least `min_interval_ms` ago; the new epoch.
    async fn take_maintenance_lease(
        &self,
        name: &str,
        owner: &str,
        now_ms: i64,
        ttl_ms: i64,
        min_interval_ms: i64,
    ) -> Result<Option<i64>, StoreError>;

    /// Extends a held maintenance lease; `false` when it is no longer ours
    /// (expired, or taken over).
    async fn renew_maintenance_lease(
        &self,
        name: &str,
        owner: &str,
        epoch: i64,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<bool, StoreError>;

    /// Gives a maintenance lease up and records that its run finished.
    async fn release_maintenance_lease(
        &self,
        name: &str,
        owner: &str,
        epoch: i64,
        now_ms: i64,
    ) -> Result<(), StoreError>;

    /// One bounded retention step (see [`PruneRequest`]).
    async fn prune(&self, req: &PruneRequest) -> Result<PruneReport, StoreError>;
}

pub(crate) const INSERT_EVENT: &str =
    "INSERT INTO session_events (session_key, type, body, created_at_ms) VALUES ($1, $2, $3, $4)";

/// Sessions whose conversation may expire: begun, quiet since before the
/// cutoff ($2), no lease, nothing to run. `$1` the profile, `$3` now.
pub(crate) const EXPIRABLE_SESSIONS: &str = "SELECT s.session_key FROM sessions s \
     WHERE s.profile = $1 AND s.updated_at_ms < $2 \
       AND (s.claude_session_id IS NOT NULL OR s.lifecycle_started_at_ms IS NOT NULL) \
       AND s.status IN ('idle', 'closed') \
       AND (s.lease_owner IS NULL OR s.lease_expires_at_ms IS NULL OR s.lease_expires_at_ms < $3) \
       AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.session_key = s.session_key \
                       AND j.status IN ('queued', 'running'))";

/// Stored transcripts of the profile ($1) not written since the cutoff
/// ($2) that no session active since the cutoff continues (a session quiet
/// longer expires in the same prune, so a dry run counts its transcript).
pub(crate) const PRUNABLE_TRANSCRIPTS: &str = "SELECT t.claude_session_id FROM transcripts t \
     JOIN sessions s ON s.session_key = t.session_key \
     WHERE s.profile = $1 AND t.updated_at_ms < $2 \
       AND NOT EXISTS (SELECT 1 FROM sessions c WHERE c.claude_session_id = t.claude_session_id \
                       AND c.updated_at_ms >= $2)";

/// Finished jobs of the profile ($1) before the cutoff ($2) whose terminal
/// event is published (the outbox still needs the others).
pub(crate) const PRUNABLE_JOBS: &str = "SELECT j.job_order FROM jobs j \
     JOIN sessions s ON s.session_key = j.session_key \
     WHERE s.profile = $1 AND j.finished_at_ms < $2 \
       AND j.status IN ('succeeded', 'failed', 'cancelled') \
       AND (j.terminal_event IS NULL OR j.terminal_published_at_ms IS NOT NULL)";

pub(crate) const PRUNABLE_CONTROL: &str =
    "SELECT request_id FROM control_requests WHERE created_at_ms < $1";

/// Prompts opened before the cutoff ($1) that are settled or whose job no
/// longer runs (nothing can answer or supersede them any more).
pub(crate) const PRUNABLE_PROMPTS: &str = "SELECT p.request_id FROM permission_prompts p \
     WHERE p.opened_at_ms < $1 AND (p.resolved_by IS NOT NULL OR NOT EXISTS \
       (SELECT 1 FROM jobs j WHERE j.job_id = p.job_id AND j.status IN ('queued', 'running')))";

/// Grants of Claude sessions neither a transcript written since the cutoff
/// ($1) nor a session active since then continues (like transcripts, a
/// session quiet longer expires in the same prune).
pub(crate) const PRUNABLE_GRANTS: &str = "SELECT g.claude_session_id FROM session_grants g \
     WHERE NOT EXISTS (SELECT 1 FROM transcripts t WHERE t.claude_session_id = g.claude_session_id \
                       AND t.updated_at_ms >= $1) \
       AND NOT EXISTS (SELECT 1 FROM sessions s WHERE s.claude_session_id = g.claude_session_id \
                       AND s.updated_at_ms >= $1)";

pub(crate) const PRUNABLE_EVENTS: &str =
    "SELECT event_id FROM session_events WHERE published_at_ms < $1";

macro_rules! lifecycle_store_impl {
    ($store:ty) => {
        #[async_trait::async_trait]
        impl $crate::store::lifecycle::SessionLifecycle for $store {
        async fn begin_conversation(
            &self,
            lease: &Lease,
            job_id: &str,
            mode: $crate::protocol::SessionMode,
            now_ms: i64,
        ) -> Result<bool, StoreError> {
            use $crate::store::lifecycle as lc;
            // Most turns continue a begun conversation: one read, no lock.
            let seen: Option<(Option<i64>, Option<String>)> = sqlx::query_as(
                "SELECT lifecycle_started_at_ms, lifecycle_job_id FROM sessions WHERE session_key = $1",
            )
            .bind(&lease.session_key)
            .fetch_optional(&self.pool)
            .await?;
            match &seen {
                Some((started, by)) if lc::needs_begin(*started, by.as_deref(), job_id, mode) => {}
                _ => return Ok(false),
            }
            let mut tx = self.fenced(lease).await?;
            let (started, by, profile): (Option<i64>, Option<String>, String) = sqlx::query_as(
                "SELECT lifecycle_started_at_ms, lifecycle_job_id, profile FROM sessions \
                 WHERE session_key = $1",
            )
            .bind(&lease.session_key)
            .fetch_one(&mut *tx)
            .await?;
            if !lc::needs_begin(started, by.as_deref(), job_id, mode) {
                return Ok(false);
            }
            let key = &lease.session_key;
            if started.is_some() {
                let body = lc::ended_body(key, &profile, lc::EndReason::Reset, Some(job_id), now_ms);
                sqlx::query(lc::INSERT_EVENT)
                    .bind(key).bind("session.ended").bind(body).bind(now_ms)
                    .execute(&mut *tx)
                    .await?;
            }
            let body = lc::started_body(key, &profile, job_id, mode, now_ms);
            sqlx::query(lc::INSERT_EVENT)
                .bind(key).bind("session.started").bind(body).bind(now_ms)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "UPDATE sessions SET lifecycle_started_at_ms = $1, lifecycle_job_id = $2 \
                 WHERE session_key = $3",
            )
            .bind(now_ms)
            .bind(job_id)
            .bind(key)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(true)
        }

        async fn end_conversation(
            &self,
            session_key: &str,
            reason: $crate::store::lifecycle::EndReason,
            job_id: Option<&str>,
            now_ms: i64,
        ) -> Result<bool, StoreError> {
            let mut tx = self.begin_write().await?;
            let ended = end_in(&mut tx, session_key, reason, job_id, now_ms).await?;
            tx.commit().await?;
            Ok(ended)
        }

        async fn mark_idle_sessions(
            &self,
            rules: &[$crate::store::lifecycle::IdleRule],
            now_ms: i64,
            limit: i64,
        ) -> Result<Vec<$crate::store::lifecycle::IdleSession>, StoreError> {
            use $crate::store::lifecycle as lc;
            let mut out = Vec::new();
            for rule in rules {
                let mut tx = self.begin_write().await?;
                let quiet: Vec<(String, i64)> = sqlx::query_as(
                    "SELECT s.session_key, s.updated_at_ms FROM sessions s \
                     WHERE s.profile = $1 AND s.updated_at_ms < $2 AND s.status = 'idle' \
                       AND s.lifecycle_started_at_ms IS NOT NULL \
                       AND (s.idle_marked_at_ms IS NULL OR s.idle_marked_at_ms <= s.updated_at_ms) \
                       AND (s.lease_owner IS NULL OR s.lease_expires_at_ms IS NULL OR s.lease_expires_at_ms < $3) \
                       AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.session_key = s.session_key \
                                       AND j.status IN ('queued', 'running')) \
                     ORDER BY s.updated_at_ms LIMIT $4",
                )
                .bind(&rule.profile)
                .bind(rule.quiet_since_ms)
                .bind(now_ms)
                .bind(limit)
                .fetch_all(&mut *tx)
                .await?;
                for (key, last) in quiet {
                    // Re-checked per row: another worker may have marked it.
                    let done = sqlx::query(
                        "UPDATE sessions SET idle_marked_at_ms = $1 WHERE session_key = $2 \
                           AND (idle_marked_at_ms IS NULL OR idle_marked_at_ms <= updated_at_ms) \
                           AND updated_at_ms = $3",
                    )
                    .bind(now_ms)
                    .bind(&key)
                    .bind(last)
                    .execute(&mut *tx)
                    .await?;
                    if done.rows_affected() == 0 {
                        continue;
                    }
                    let body = lc::idle_body(&key, &rule.profile, last, rule.idle_ttl_secs, now_ms);
                    sqlx::query(lc::INSERT_EVENT)
                        .bind(&key).bind("session.idle").bind(body).bind(now_ms)
                        .execute(&mut *tx)
                        .await?;
                    out.push(lc::IdleSession {
                        session_key: key,
                        profile: rule.profile.clone(),
                    });
                }
                tx.commit().await?;
            }
            Ok(out)
        }

        async fn claim_session_events(
            &self,
            now_ms: i64,
            claim_ms: i64,
            limit: i64,
        ) -> Result<Vec<$crate::store::lifecycle::StoredSessionEvent>, StoreError> {
            let mut tx = self.begin_write().await?;
            // Not while an older event of the same session is claimed by
            // someone else: a session's events go out in order.
            let rows: Vec<(i64, String, String, String)> = sqlx::query_as(
                "SELECT e.event_id, e.session_key, e.type, e.body FROM session_events e \
                 WHERE e.published_at_ms IS NULL \
                   AND (e.claimed_until_ms IS NULL OR e.claimed_until_ms < $1) \
                   AND NOT EXISTS (SELECT 1 FROM session_events o WHERE o.session_key = e.session_key \
                       AND o.event_id < e.event_id AND o.published_at_ms IS NULL \
                       AND o.claimed_until_ms >= $2) \
                 ORDER BY e.event_id LIMIT $3",
            )
            .bind(now_ms)
            .bind(now_ms)
            .bind(limit)
            .fetch_all(&mut *tx)
            .await?;
            let mut out = Vec::with_capacity(rows.len());
            for (event_id, session_key, kind, body) in rows {
                let done = sqlx::query(
                    "UPDATE session_events SET claimed_until_ms = $1 WHERE event_id = $2 \
                       AND published_at_ms IS NULL \
                       AND (claimed_until_ms IS NULL OR claimed_until_ms < $3)",
                )
                .bind(now_ms + claim_ms)
                .bind(event_id)
                .bind(now_ms)
                .execute(&mut *tx)
                .await?;
                if done.rows_affected() == 1 {
                    out.push($crate::store::lifecycle::StoredSessionEvent {
                        event_id,
                        session_key,
                        kind,
                        body,
                    });
                }
            }
            tx.commit().await?;
            Ok(out)
        }

        async fn settle_session_event(
            &self,
            event_id: i64,
            published: bool,
            now_ms: i64,
        ) -> Result<(), StoreError> {
            let sql = if published {
                "UPDATE session_events SET published_at_ms = $1 WHERE event_id = $2"
            } else {
                // Unclaimed: the next sweep (any worker's) tries again.
                "UPDATE session_events SET claimed_until_ms = NULL WHERE event_id = $2 AND $1 >= 0"
            };
            sqlx::query(sql)
                .bind(now_ms)
                .bind(event_id)
                .execute(&self.pool)
                .await?;
            Ok(())
        }

        async fn take_maintenance_lease(
            &self,
            name: &str,
            owner: &str,
            now_ms: i64,
            ttl_ms: i64,
            min_interval_ms: i64,
        ) -> Result<Option<i64>, StoreError> {
            let epoch: Option<i64> = sqlx::query_scalar(
                "INSERT INTO maintenance_leases (name, owner, epoch, expires_at_ms) VALUES ($1, $2, 1, $3) \
                 ON CONFLICT (name) DO UPDATE SET owner = EXCLUDED.owner, \
                   epoch = maintenance_leases.epoch + 1, expires_at_ms = EXCLUDED.expires_at_ms \
                 WHERE (maintenance_leases.owner IS NULL OR maintenance_leases.expires_at_ms IS NULL \
                        OR maintenance_leases.expires_at_ms < $4) \
                   AND (maintenance_leases.last_finished_at_ms IS NULL \
                        OR maintenance_leases.last_finished_at_ms <= $5) \
                 RETURNING epoch",
            )
            .bind(name)
            .bind(owner)
            .bind(now_ms + ttl_ms)
            .bind(now_ms)
            .bind(now_ms - min_interval_ms)
            .fetch_optional(&self.pool)
            .await?;
            Ok(epoch)
        }

        async fn renew_maintenance_lease(
            &self,
            name: &str,
            owner: &str,
            epoch: i64,
            now_ms: i64,
            ttl_ms: i64,
        ) -> Result<bool, StoreError> {
            let done = sqlx::query(
                "UPDATE maintenance_leases SET expires_at_ms = $1 \
                 WHERE name = $2 AND owner = $3 AND epoch = $4 AND expires_at_ms >= $5",
            )
            .bind(now_ms + ttl_ms)
            .bind(name)
            .bind(owner)
            .bind(epoch)
            .bind(now_ms)
            .execute(&self.pool)
            .await?;
            Ok(done.rows_affected() == 1)
        }

        async fn release_maintenance_lease(
            &self,
            name: &str,
            owner: &str,
            epoch: i64,
            now_ms: i64,
        ) -> Result<(), StoreError> {
            sqlx::query(
                "UPDATE maintenance_leases SET owner = NULL, expires_at_ms = NULL, \
                   last_finished_at_ms = $1 WHERE name = $2 AND owner = $3 AND epoch = $4",
            )
            .bind(now_ms)
            .bind(name)
            .bind(owner)
            .bind(epoch)
            .execute(&self.pool)
            .await?;
            Ok(())
        }

        async fn prune(
            &self,
            req: &$crate::store::lifecycle::PruneRequest,
        ) -> Result<$crate::store::lifecycle::PruneReport, StoreError> {
            use $crate::store::lifecycle as lc;
            let mut report = lc::PruneReport::default();
            for rule in &req.rules {
                report.sessions_expired += self.expire_sessions(rule, req).await?;
                report.transcripts += self
                    .prune_rows("transcripts", "claude_session_id", lc::PRUNABLE_TRANSCRIPTS, Some(&rule.profile), rule.before_ms, req)
                    .await?;
                report.jobs += self
                    .prune_rows("jobs", "job_order", lc::PRUNABLE_JOBS, Some(&rule.profile), rule.before_ms, req)
                    .await?;
            }
            report.control_requests += self
                .prune_rows("control_requests", "request_id", lc::PRUNABLE_CONTROL, None, req.shared_before_ms, req)
                .await?;
            report.session_events += self
                .prune_rows("session_events", "event_id", lc::PRUNABLE_EVENTS, None, req.shared_before_ms, req)
                .await?;
            report.permission_prompts += self
                .prune_rows("permission_prompts", "request_id", lc::PRUNABLE_PROMPTS, None, req.shared_before_ms, req)
                .await?;
            report.session_grants += self
                .prune_rows("session_grants", "claude_session_id", lc::PRUNABLE_GRANTS, None, req.shared_before_ms, req)
                .await?;
            Ok(report)
        }
        }
    };
}

/// Helpers the lifecycle methods use, written once per backend (they need
/// the backend's transaction type).
macro_rules! lifecycle_store_helpers {
    ($store:ty, $db:ty) => {
        /// Ends the session's conversation in `tx`, if it had begun:
        /// records `session.ended` and forgets the begin.
        async fn end_in(
            tx: &mut sqlx::Transaction<'static, $db>,
            session_key: &str,
            reason: $crate::store::lifecycle::EndReason,
            job_id: Option<&str>,
            now_ms: i64,
        ) -> Result<bool, StoreError> {
            use $crate::store::lifecycle as lc;
            let profile: Option<String> = sqlx::query_scalar(
                "UPDATE sessions SET lifecycle_started_at_ms = NULL, lifecycle_job_id = NULL, \
                   idle_marked_at_ms = NULL \
                 WHERE session_key = $1 AND lifecycle_started_at_ms IS NOT NULL RETURNING profile",
            )
            .bind(session_key)
            .fetch_optional(&mut **tx)
            .await?;
            let Some(profile) = profile else {
                return Ok(false);
            };
            let body = lc::ended_body(session_key, &profile, reason, job_id, now_ms);
            sqlx::query(lc::INSERT_EVENT)
                .bind(session_key)
                .bind("session.ended")
                .bind(body)
                .bind(now_ms)
                .execute(&mut **tx)
                .await?;
            Ok(true)
        }

        impl $store {
            /// Forgets the conversations of the rule's sessions past
            /// retention (bounded), each with its `session.ended`.
            async fn expire_sessions(
                &self,
                rule: &$crate::store::lifecycle::RetentionRule,
                req: &$crate::store::lifecycle::PruneRequest,
            ) -> Result<u64, StoreError> {
                use $crate::store::lifecycle as lc;
                if req.dry_run {
                    let n: i64 = sqlx::query_scalar(&format!(
                        "SELECT COUNT(*) FROM ({}) AS c",
                        lc::EXPIRABLE_SESSIONS
                    ))
                    .bind(&rule.profile)
                    .bind(rule.before_ms)
                    .bind(req.now_ms)
                    .fetch_one(&self.pool)
                    .await?;
                    return Ok(n as u64);
                }
                let mut tx = self.begin_write().await?;
                let keys: Vec<String> = sqlx::query_scalar(&format!(
                    "{} ORDER BY s.updated_at_ms LIMIT $4",
                    lc::EXPIRABLE_SESSIONS
                ))
                .bind(&rule.profile)
                .bind(rule.before_ms)
                .bind(req.now_ms)
                .bind(req.batch)
                .fetch_all(&mut *tx)
                .await?;
                for key in &keys {
                    end_in(&mut tx, key, lc::EndReason::Expired, None, req.now_ms).await?;
                    sqlx::query(
                        "UPDATE sessions SET claude_session_id = NULL, status = 'closed' \
                         WHERE session_key = $1",
                    )
                    .bind(key)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(keys.len() as u64)
            }

            /// Deletes (or, dry, counts) the rows of `table` whose `key`
            /// `select` yields (`$1` the profile when given, then the
            /// cutoff), at most `req.batch`.
            async fn prune_rows(
                &self,
                table: &str,
                key: &str,
                select: &str,
                profile: Option<&str>,
                before_ms: i64,
                req: &$crate::store::lifecycle::PruneRequest,
            ) -> Result<u64, StoreError> {
                // The shared selects number their cutoff $1; the profile's $2.
                if req.dry_run {
                    let sql = format!("SELECT COUNT(*) FROM ({select}) AS c");
                    let mut q = sqlx::query_scalar::<_, i64>(&sql);
                    if let Some(p) = profile {
                        q = q.bind(p);
                    }
                    return Ok(q.bind(before_ms).fetch_one(&self.pool).await? as u64);
                }
                let limit_param = if profile.is_some() { "$3" } else { "$2" };
                let sql =
                    format!("DELETE FROM {table} WHERE {key} IN ({select} LIMIT {limit_param})");
                let mut q = sqlx::query(&sql);
                if let Some(p) = profile {
                    q = q.bind(p);
                }
                let done = q.bind(before_ms).bind(req.batch).execute(&self.pool).await?;
                Ok(done.rows_affected())
            }
        }
    };
}

pub(crate) use lifecycle_store_helpers;
pub(crate) use lifecycle_store_impl;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conversation_begins_once_per_job_and_again_on_new() {
        use SessionMode::*;
        assert!(needs_begin(None, None, "j1", Continue));
        assert!(!needs_begin(Some(1), Some("j1"), "j1", New));
        assert!(!needs_begin(Some(1), Some("j1"), "j2", Continue));
        assert!(needs_begin(Some(1), Some("j1"), "j2", New));
        assert!(needs_begin(None, Some("j1"), "j2", Resume));
    }

    #[test]
    fn a_published_event_carries_its_id() {
        let e = StoredSessionEvent {
            event_id: 7,
            session_key: "k".into(),
            kind: "session.ended".into(),
            body: ended_body("k", "default", EndReason::Deleted, None, 5),
        };
        let v: Value = serde_json::from_slice(&e.to_json()).unwrap();
        assert_eq!(v["event_id"], 7);
        assert_eq!(v["reason"], "deleted");
        assert!(v.get("job_id").is_none());
    }
}
