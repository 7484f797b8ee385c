//! Control messages: cancel (the SDK's `interrupt()`) and runtime
//! permission-mode changes (`setPermissionMode()`).
//!
//! Control messages go to a fanout exchange, so every worker sees each one.
//! Each worker acts on its own running turns (interrupting them, or
//! forwarding a control request to their CLI); the one worker that records
//! the request id first in the database (`claim_control`) also does the
//! database part (cancelling queued jobs, storing the mode) and answers
//! with exactly one `control_result`. When it finds the job running it
//! re-broadcasts the message, so a worker that registered the turn just
//! after the first copy arrived still sees it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use lapin::message::Delivery;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::broker::publish::PublishError;
use crate::protocol::{
    self, ControlBody, ControlOutcome, ControlResultV1, EventBody, EventV1, PermissionMode,
    PROTOCOL_VERSION,
};
use crate::store::{now_ms, JobRecord, JobStatus, StoreError};
use crate::worker::context::Context;

/// Turns running on this worker, by job id.
#[derive(Default)]
pub struct RunningTurns {
    map: Mutex<HashMap<String, TurnHandle>>,
}

struct TurnHandle {
    session_key: String,
    cancel: CancellationToken,
    reason: Arc<Mutex<Option<CancelReason>>>,
    cli: mpsc::UnboundedSender<Value>,
}

/// A running job's side of the registry; unregisters on drop.
pub struct TurnRegistration {
    turns: Arc<RunningTurns>,
    job_id: String,
    /// Cancelled when the job is to be cancelled.
    pub cancel: CancellationToken,
    reason: Arc<Mutex<Option<CancelReason>>>,
    /// Control requests for the job's CLI (e.g. `set_permission_mode`).
    pub cli_requests: mpsc::UnboundedReceiver<Value>,
}

/// Why a turn is being cancelled.
#[derive(Debug, Clone)]
pub struct CancelReason {
    pub text: String,
    /// The whole session was cancelled: its queued jobs go too.
    pub session_wide: bool,
}

impl TurnRegistration {
    pub fn cancel_reason(&self) -> CancelReason {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| CancelReason {
                text: "cancelled by request".into(),
                session_wide: false,
            })
    }
}

impl Drop for TurnRegistration {
    fn drop(&mut self) {
        self.turns.lock().remove(&self.job_id);
    }
}

impl RunningTurns {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, TurnHandle>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn register(self: &Arc<Self>, job_id: &str, session_key: &str) -> TurnRegistration {
        let cancel = CancellationToken::new();
        let reason = Arc::new(Mutex::new(None));
        let (tx, rx) = mpsc::unbounded_channel();
        self.lock().insert(
            job_id.to_string(),
            TurnHandle {
                session_key: session_key.to_string(),
                cancel: cancel.clone(),
                reason: Arc::clone(&reason),
                cli: tx,
            },
        );
        TurnRegistration {
            turns: Arc::clone(self),
            job_id: job_id.to_string(),
            cancel,
            reason,
            cli_requests: rx,
        }
    }

    /// Cancels the job if it runs here; true if it did.
    pub fn cancel_job(&self, job_id: &str, reason: &str) -> bool {
        self.cancel(job_id, reason, false)
    }

    fn cancel(&self, job_id: &str, reason: &str, session_wide: bool) -> bool {
        match self.lock().get(job_id) {
            Some(h) => {
                h.reason
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert_with(|| CancelReason {
                        text: reason.to_string(),
                        session_wide,
                    });
                h.cancel.cancel();
                true
            }
            None => false,
        }
    }

    /// Cancels the session's running job if it runs here.
    pub fn cancel_session(&self, session_key: &str, reason: &str) -> Vec<String> {
        let ids: Vec<String> = self
            .lock()
            .iter()
            .filter(|(_, h)| h.session_key == session_key)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &ids {
            self.cancel(id, reason, true);
        }
        ids
    }

    /// Forwards a control request to the CLI of the session's running turn.
    pub fn send_to_session(&self, session_key: &str, request: Value) -> bool {
        let map = self.lock();
        let mut sent = false;
        for h in map.values().filter(|h| h.session_key == session_key) {
            sent |= h.cli.send(request.clone()).is_ok();
        }
        sent
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Publish(#[from] PublishError),
}

/// Handles one control delivery. `Err` means "could not finish; redeliver".
pub async fn handle(ctx: &Context, delivery: &Delivery) -> Result<(), ControlError> {
    let props = &delivery.properties;
    let request_id = props
        .message_id()
        .as_ref()
        .map(|s| s.as_str().to_string())
        // Without a message id, every worker must still agree on one.
        .unwrap_or_else(|| format!("body-{:016x}", fnv64(&delivery.data)));
    let body: Option<Value> = serde_json::from_slice(&delivery.data).ok();
    let reply_to = props
        .reply_to()
        .as_ref()
        .map(|s| s.as_str().to_string())
        .or_else(|| body.as_ref()?.get("reply_to")?.as_str().map(str::to_string))
        .filter(|r| protocol::validate_reply_to(r).is_ok());
    let answer = Answer {
        ctx,
        request_id: &request_id,
        reply_to: reply_to.as_deref(),
    };

    let msg = match protocol::decode_control(&delivery.data) {
        Ok(m) => m,
        Err(e) => {
            if ctx.store.claim_control(&request_id, now_ms()).await? {
                warn!(%request_id, error = %e, "invalid control message");
                answer
                    .send(false, ControlOutcome::Invalid, e.0, None, None)
                    .await?;
            }
            return Ok(());
        }
    };
    match msg.body {
        ControlBody::Cancel {
            job_id: Some(job_id),
            reason,
            ..
        } => {
            let reason = reason.unwrap_or_else(|| "cancelled by request".into());
            ctx.running.cancel_job(&job_id, &reason);
            if !ctx.store.claim_control(&request_id, now_ms()).await? {
                return Ok(());
            }
            let (ok, outcome, message) = match ctx.store.get_job(&job_id).await? {
                None => (false, ControlOutcome::Unknown, format!("no job {job_id}")),
                Some(job) => match cancel_job(ctx, job, &reason).await? {
                    Cancelled::Queued => (
                        true,
                        ControlOutcome::Cancelled,
                        "cancelled before it ran".into(),
                    ),
                    Cancelled::Running => {
                        ctx.sink
                            .publish_control(&delivery.data, &request_id, reply_to.as_deref())
                            .await?;
                        (
                            true,
                            ControlOutcome::Cancelled,
                            "interrupting the running turn".into(),
                        )
                    }
                    Cancelled::AlreadyFinished(status) => (
                        false,
                        ControlOutcome::AlreadyFinished,
                        format!("job {job_id} already finished ({})", status.as_str()),
                    ),
                },
            };
            info!(%request_id, %job_id, ?outcome, "cancel handled");
            answer
                .send(ok, outcome, message, Some(job_id), None)
                .await?;
        }
        ControlBody::Cancel {
            session_key: Some(key),
            reason,
            ..
        } => {
            let reason = reason.unwrap_or_else(|| "cancelled by request".into());
            ctx.running.cancel_session(&key, &reason);
            if !ctx.store.claim_control(&request_id, now_ms()).await? {
                return Ok(());
            }
            if ctx.store.get_session(&key).await?.is_none() {
                answer
                    .send(
                        false,
                        ControlOutcome::Unknown,
                        format!("no session {key}"),
                        None,
                        Some(key),
                    )
                    .await?;
                return Ok(());
            }
            let (queued, running) = cancel_session_jobs(ctx, &key, &reason).await?;
            if running > 0 {
                ctx.sink
                    .publish_control(&delivery.data, &request_id, reply_to.as_deref())
                    .await?;
            }
            let ok = queued + running > 0;
            let (outcome, message) = if ok {
                (
                    ControlOutcome::Cancelled,
                    format!(
                        "cancelled {queued} queued job(s); interrupting {running} running turn(s)"
                    ),
                )
            } else {
                (
                    ControlOutcome::AlreadyFinished,
                    format!("session {key} has no queued or running jobs"),
                )
            };
            info!(%request_id, session_key = %key, queued, running, "session cancel handled");
            answer.send(ok, outcome, message, None, Some(key)).await?;
        }
        ControlBody::Cancel { .. } => unreachable!("decode_control requires job_id or session_key"),
        ControlBody::SetPermissionMode { session_key, mode } => {
            let verdict = check_mode(ctx, &session_key, mode).await?;
            if verdict.is_ok() {
                let request = json!({"subtype": "set_permission_mode", "mode": mode.as_str()});
                ctx.running.send_to_session(&session_key, request);
            }
            if !ctx.store.claim_control(&request_id, now_ms()).await? {
                return Ok(());
            }
            let (ok, outcome, message) = match verdict {
                Ok(()) => {
                    ctx.store
                        .set_session_permission_mode(&session_key, Some(mode), now_ms())
                        .await?;
                    (
                        true,
                        ControlOutcome::Applied,
                        format!("permission mode is now {mode}"),
                    )
                }
                Err((outcome, message)) => (false, outcome, message),
            };
            info!(%request_id, %session_key, %mode, ?outcome, "set_permission_mode handled");
            answer
                .send(ok, outcome, message, None, Some(session_key))
                .await?;
        }
    }
    Ok(())
}

/// A mode is allowed up to the ceiling of the session's profile.
async fn check_mode(
    ctx: &Context,
    session_key: &str,
    mode: PermissionMode,
) -> Result<Result<(), (ControlOutcome, String)>, StoreError> {
    let Some(session) = ctx.store.get_session(session_key).await? else {
        return Ok(Err((
            ControlOutcome::Unknown,
            format!("no session {session_key}"),
        )));
    };
    let Some(profile) = ctx.settings.profiles.get(&session.profile) else {
        return Ok(Err((
            ControlOutcome::Refused,
            format!(
                "the session's profile `{}` no longer exists",
                session.profile
            ),
        )));
    };
    if mode > profile.max_permission_mode {
        return Ok(Err((
            ControlOutcome::Refused,
            format!(
                "permission mode {mode} is above profile `{}`'s ceiling {}",
                session.profile, profile.max_permission_mode
            ),
        )));
    }
    Ok(Ok(()))
}

/// Cancels every queued job of a session (publishing their `cancelled`
/// events); returns (cancelled queued, still running). Safe to run from
/// several workers at once: each queued job ends exactly once.
pub async fn cancel_session_jobs(
    ctx: &Context,
    session_key: &str,
    reason: &str,
) -> Result<(usize, usize), ControlError> {
    let (mut queued, mut running) = (0, 0);
    for job in ctx.store.list_jobs(session_key, 10_000).await? {
        match cancel_job(ctx, job, reason).await? {
            Cancelled::Queued => queued += 1,
            Cancelled::Running => running += 1,
            Cancelled::AlreadyFinished(_) => {}
        }
    }
    Ok((queued, running))
}

enum Cancelled {
    Queued,
    Running,
    AlreadyFinished(JobStatus),
}

/// Cancels a queued job in the database (publishing its `cancelled`
/// event), or reports it running or finished.
async fn cancel_job(
    ctx: &Context,
    job: JobRecord,
    reason: &str,
) -> Result<Cancelled, ControlError> {
    if job.status.is_terminal() {
        return Ok(Cancelled::AlreadyFinished(job.status));
    }
    if job.status == JobStatus::Running {
        return Ok(Cancelled::Running);
    }
    let body = EventBody::Cancelled {
        reason: reason.to_string(),
    };
    if end_queued_job(ctx, &job, JobStatus::Cancelled, None, body).await? {
        Ok(Cancelled::Queued)
    } else {
        // It started meanwhile.
        Ok(Cancelled::Running)
    }
}

/// Ends a job that has not started with a terminal event, and publishes
/// it. False if the job is no longer queued.
pub async fn end_queued_job(
    ctx: &Context,
    job: &JobRecord,
    status: JobStatus,
    error: Option<&str>,
    body: EventBody,
) -> Result<bool, ControlError> {
    let event = EventV1 {
        v: PROTOCOL_VERSION,
        job_id: job.job_id.clone(),
        session_key: job.session_key.clone(),
        seq: job.next_seq,
        attempt: job.attempts,
        body,
        metadata: job.spec.metadata.clone(),
    };
    let bytes = serde_json::to_vec(&event).expect("events serialise");
    let text = String::from_utf8(bytes.clone()).expect("JSON is UTF-8");
    if !ctx
        .store
        .finish_queued_job(
            &job.job_id,
            status,
            error,
            &text,
            job.next_seq + 1,
            now_ms(),
        )
        .await?
    {
        return Ok(false);
    }
    let reply_to = job
        .spec
        .reply_to
        .clone()
        .unwrap_or_else(|| job.session_key.clone());
    ctx.sink.publish_event(&reply_to, &event, &bytes).await?;
    Ok(true)
}

struct Answer<'a> {
    ctx: &'a Context,
    request_id: &'a str,
    reply_to: Option<&'a str>,
}

impl Answer<'_> {
    async fn send(
        &self,
        ok: bool,
        outcome: ControlOutcome,
        message: String,
        job_id: Option<String>,
        session_key: Option<String>,
    ) -> Result<(), PublishError> {
        let Some(reply_to) = self.reply_to else {
            return Ok(());
        };
        let result = ControlResultV1 {
            v: PROTOCOL_VERSION,
            kind: "control_result".into(),
            request_id: self.request_id.to_string(),
            ok,
            outcome,
            message,
            job_id,
            session_key,
        };
        let bytes = serde_json::to_vec(&result).expect("results serialise");
        self.ctx
            .sink
            .publish_control_result(reply_to, self.request_id, &bytes)
            .await
    }
}

fn fnv64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}
