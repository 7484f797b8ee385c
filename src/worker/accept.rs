//! Accepting a delivery: validate, persist, ack. Once `accept` returns
//! `Ok`, the database owns the job (or it was dead-lettered with its
//! reason) and the delivery may be acked.

use lapin::message::Delivery;
use serde_json::Value;
use tracing::{info, warn};

use crate::broker::publish::{Attribution, PublishError};
use crate::ops::metrics::JOBS_ACCEPTED;
use crate::protocol::{
    self, ControlBody, ControlV1, ErrorKind, EventBody, EventV1, JobV1, OnBusy, SessionMode,
    PROTOCOL_VERSION,
};
use crate::store::{
    now_ms, AcceptAudience, AcceptOutcome, JobRecord, JobSpec, JobStatus, NewJob, StoreError,
};
use crate::worker::accept_feed;
use crate::worker::context::Context;
use crate::worker::ending::{self, EndError};

/// What happened to a delivery; each variant means "ack it".
#[derive(Debug, PartialEq)]
pub enum Accepted {
    /// Persisted and queued.
    Queued { job_id: String, session_key: String },
    /// Seen before; not run again (its terminal event was republished if
    /// it had one).
    Duplicate { job_id: String },
    /// Persisted, then failed at once with error `busy`: its session was
    /// busy and its on_busy policy is `reject`.
    RejectedBusy { job_id: String },
    /// Invalid; dead-lettered with the reason (and a `failed` event sent
    /// where a reply_to was readable).
    Rejected { reason: String },
}

/// Failures that mean "do not ack; let the broker redeliver later".
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("could not persist the job: {0}")]
    Store(#[from] StoreError),
    #[error("could not publish: {0}")]
    Publish(#[from] PublishError),
}

impl From<EndError> for AcceptError {
    fn from(e: EndError) -> Self {
        match e {
            EndError::Store(e) => AcceptError::Store(e),
            EndError::Publish(e) => AcceptError::Publish(e),
        }
    }
}

/// Validates and persists one delivery.
pub async fn accept(ctx: &Context, delivery: &Delivery) -> Result<Accepted, AcceptError> {
    let props = &delivery.properties;
    let prop_reply_to = props.reply_to().as_ref().map(|s| s.as_str().to_string());
    let prop_message_id = props.message_id().as_ref().map(|s| s.as_str().to_string());

    let job = match protocol::decode_job(&delivery.data) {
        Ok(job) => job,
        Err(e) => {
            return reject(
                ctx,
                delivery,
                (prop_reply_to, prop_message_id),
                "decode",
                e.0,
            )
            .await
        }
    };
    let profile_name = job.profile.clone().unwrap_or_else(|| "default".to_string());
    let Some(profile) = ctx.settings.profiles.get(&profile_name) else {
        let known: Vec<&str> = ctx.settings.profiles.keys().map(String::as_str).collect();
        let reason = format!(
            "unknown profile `{profile_name}` (this worker has: {})",
            known.join(", ")
        );
        let ids = (prop_reply_to, prop_message_id);
        return reject(ctx, delivery, ids, "unknown_profile", reason).await;
    };
    let options = match profile.resolve(&profile_name, &job.options) {
        Ok(o) => o,
        Err(reason) => {
            let ids = (prop_reply_to, prop_message_id);
            return reject(ctx, delivery, ids, "options_refused", reason).await;
        }
    };
    if let Some(reason) = refused_by_profile(ctx, delivery, &job, &profile_name, profile).await? {
        let ids = (prop_reply_to, prop_message_id);
        return reject(ctx, delivery, ids, "not_allowed", reason).await;
    }
    let job_id = match job.job_id.clone().or(prop_message_id.clone()) {
        Some(id) => match protocol::validate_job_id(&id) {
            Ok(()) => id,
            Err(e) => {
                return reject(ctx, delivery, (prop_reply_to, None), "invalid_job_id", e.0).await
            }
        },
        // Without an id a redelivery cannot be recognised; producers that
        // need exactly-once set job_id or message_id.
        None => uuid::Uuid::new_v4().to_string(),
    };
    let reply_to = prop_reply_to.or(job.reply_to.clone());
    let new = NewJob {
        job_id: job_id.clone(),
        session_key: job.session_key.clone(),
        spec: spec_of(
            &job,
            profile_name,
            options,
            reply_to.clone(),
            delivery.properties.user_id().as_ref().map(|u| u.as_str()),
        ),
    };
    // Our own `waiting` announcement comes back to us: recognised by this.
    ctx.note_accepting(&new.job_id);
    let report = ctx
        .store
        .accept_job_by(&new, now_ms(), Some(&ctx.worker_id))
        .await?;
    match report.outcome {
        AcceptOutcome::Inserted => {
            let profile = [("profile", new.spec.profile.as_str())];
            ctx.metrics.counter(JOBS_ACCEPTED, &profile).increment(1);
            info!(job_id = %job_id, session = %crate::logging::session_ref(&job.session_key), "job accepted");
            tracing::debug!(session_key = %job.session_key, "the accepted job's session");
            if apply_on_busy(ctx, &new).await? {
                return Ok(Accepted::RejectedBusy { job_id });
            }
            if let Some(audience) = report.audience.as_ref().filter(|a| announced(ctx, a)) {
                accept_feed::announce(ctx, &job_id, &job.session_key, audience).await;
            }
            Ok(Accepted::Queued {
                job_id,
                session_key: job.session_key,
            })
        }
        AcceptOutcome::Duplicate {
            status,
            terminal_event,
        } => {
            info!(job_id = %job_id, status = status.as_str(), "duplicate job_id; not run again");
            if let Some(event) = terminal_event {
                let key = reply_to.unwrap_or_else(|| job.session_key.clone());
                ctx.sink
                    .publish_raw_event(&key, &job_id, event.as_bytes())
                    .await?;
                crate::worker::outbox::mark_published(ctx, &job_id).await;
            }
            Ok(Accepted::Duplicate { job_id })
        }
    }
}

/// Whether others need to hear of an accept: its session's holder does; a
/// session waiting for any worker concerns the others only while this one
/// is full (with a free slot, its own scheduler claims it now).
fn announced(ctx: &Context, audience: &AcceptAudience) -> bool {
    match audience {
        AcceptAudience::Holder(_) => true,
        AcceptAudience::Everyone => ctx.slots_full(),
    }
}

/// Double texting: what a job does when its session already has work.
/// `enqueue` waits its turn; `interrupt` cancels the running turn (on
/// whichever worker runs it) and then waits; `reject` fails at once.
/// Returns true if the job was rejected.
async fn apply_on_busy(ctx: &Context, new: &NewJob) -> Result<bool, AcceptError> {
    if new.spec.on_busy == OnBusy::Enqueue {
        return Ok(false);
    }
    let others: Vec<JobRecord> = ctx
        .store
        .list_jobs(&new.session_key, 1000)
        .await?
        .into_iter()
        .filter(|j| j.job_id != new.job_id && !j.status.is_terminal())
        .collect();
    let running: Vec<&JobRecord> = others
        .iter()
        .filter(|j| j.status == JobStatus::Running)
        .collect();
    match new.spec.on_busy {
        OnBusy::Enqueue => Ok(false),
        OnBusy::Reject if others.is_empty() => Ok(false),
        OnBusy::Reject => {
            let Some(me) = ctx.store.get_job(&new.job_id).await? else {
                return Ok(false);
            };
            let busy_with = running
                .first()
                .copied()
                .or(others.first())
                .map(|j| j.job_id.as_str());
            let message = match busy_with {
                Some(id) => format!(
                    "the session is busy with job {id} and this job's on_busy policy is reject"
                ),
                None => "the session is busy and this job's on_busy policy is reject".into(),
            };
            let body = EventBody::Failed {
                error: ErrorKind::Busy,
                message: message.clone(),
                retryable: true,
            };
            Ok(ending::end_queued_job(ctx, &me, JobStatus::Failed, Some(&message), body).await?)
        }
        OnBusy::Interrupt => {
            let reason = format!("interrupted by job {} (on_busy=interrupt)", new.job_id);
            for job in running {
                ctx.running.cancel_job(&job.job_id, &reason);
                let cancel = ControlV1 {
                    v: PROTOCOL_VERSION,
                    body: ControlBody::Cancel {
                        job_id: Some(job.job_id.clone()),
                        session_key: None,
                        reason: Some(reason.clone()),
                    },
                    reply_to: None,
                };
                let bytes = serde_json::to_vec(&cancel).expect("control messages serialise");
                let request_id = uuid::Uuid::new_v4().to_string();
                ctx.sink.publish_control(&bytes, &request_id, None).await?;
            }
            Ok(false)
        }
    }
}

/// The profile's limits on who may use it and whose conversation a job
/// may continue. `Some(reason)` refuses the job (never naming the other
/// session's key: it is an end-user identifier).
async fn refused_by_profile(
    ctx: &Context,
    delivery: &Delivery,
    job: &JobV1,
    profile_name: &str,
    profile: &crate::config::Profile,
) -> Result<Option<String>, AcceptError> {
    if !profile.allowed_user_ids.is_empty() {
        let user = delivery.properties.user_id().as_ref().map(|u| u.as_str());
        if !user.is_some_and(|u| profile.allowed_user_ids.iter().any(|a| a == u)) {
            return Ok(Some(format!(
                "profile `{profile_name}` is limited to certain AMQP users; this job was \
                 published {}",
                user.map_or("without a user_id property".to_string(), |u| format!(
                    "as `{u}`"
                ))
            )));
        }
    }
    let explicit = matches!(job.session.mode, SessionMode::Resume | SessionMode::Fork);
    if let (true, false, Some(id)) = (
        explicit,
        profile.resume_other_sessions,
        job.session.claude_session_id.as_deref(),
    ) {
        let owner = ctx.store.session_key_of(id).await?;
        if owner.is_some_and(|k| k != job.session_key) {
            return Ok(Some(format!(
                "`session.claude_session_id` {id} belongs to another session key; profile \
                 `{profile_name}` does not allow continuing other sessions \
                 (profiles.{profile_name}.resume_other_sessions)"
            )));
        }
    }
    Ok(None)
}

fn spec_of(
    job: &JobV1,
    profile: String,
    options: crate::config::EffectiveOptions,
    reply_to: Option<String>,
    published_as: Option<&str>,
) -> JobSpec {
    JobSpec {
        prompt: job.prompt.clone(),
        mode: job.session.mode,
        claude_session_id: job.session.claude_session_id.clone(),
        profile,
        model: options.model,
        max_turns: options.max_turns,
        permission_mode: options.permission_mode,
        metadata: job
            .metadata
            .clone()
            .unwrap_or_else(|| Value::Object(Default::default())),
        reply_to,
        on_busy: options.on_busy,
        attachments: job.attachments.clone().unwrap_or_default(),
        max_budget_usd: options.max_budget_usd,
        identity: job.identity.clone(),
        compact: job.options.compact.unwrap_or(false),
        // Unset: whoever published the job (broker-verified) answers.
        prompt_answerers: job
            .prompt_answerers
            .clone()
            .unwrap_or_else(|| published_as.map(str::to_string).into_iter().collect()),
    }
}

/// Dead-letters an invalid job with its reason, and tells the producer
/// with a `failed` event if it said where to reply — unless the body's job
/// id is already taken: that id's events belong to the job accepted under
/// it, which has (or will have) its own one terminal event. `class` names
/// the rule broken, for the dead-letter metric (the reason is free text).
async fn reject(
    ctx: &Context,
    delivery: &Delivery,
    (reply_to, message_id): (Option<String>, Option<String>),
    class: &'static str,
    reason: String,
) -> Result<Accepted, AcceptError> {
    // Best effort: whatever of the body is readable addresses the event.
    let body: Option<Value> = serde_json::from_slice(&delivery.data).ok();
    let field = |k: &str| {
        body.as_ref()
            .and_then(|b| b.get(k))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let reply_to = reply_to
        .or_else(|| field("reply_to"))
        .filter(|r| protocol::validate_reply_to(r).is_ok());
    let job_id = field("job_id")
        .filter(|id| protocol::validate_job_id(id).is_ok())
        .or(message_id.filter(|id| protocol::validate_job_id(id).is_ok()));
    // Looked up before dead-lettering: if the database is down the delivery
    // is held and retried, and must not be dead-lettered twice.
    let id_taken = match (&reply_to, &job_id) {
        (Some(_), Some(id)) => ctx.store.get_job(id).await?.is_some(),
        _ => false,
    };
    warn!(%reason, "invalid job dead-lettered");
    ctx.sink.dead_letter(delivery, &reason).await?;
    let dead_letters = crate::ops::metrics::DEAD_LETTERS;
    ctx.metrics
        .counter(dead_letters, &[("reason", class)])
        .increment(1);
    let Some(reply_to) = reply_to.filter(|_| !id_taken) else {
        return Ok(Accepted::Rejected { reason });
    };
    let event = EventV1 {
        v: PROTOCOL_VERSION,
        job_id: job_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        session_key: field("session_key").unwrap_or_default(),
        seq: 0,
        attempt: 0,
        body: EventBody::Failed {
            error: ErrorKind::InvalidInput,
            message: reason.clone(),
            retryable: false,
        },
        metadata: echoed_metadata(body.as_ref()),
    };
    let bytes = serde_json::to_vec(&event).expect("events serialise");
    // A job that never ran: this worker speaks for it, under no lease.
    let from = Attribution {
        worker_id: &ctx.worker_id,
        lease_epoch: 0,
        fence: None,
    };
    ctx.sink
        .publish_event(&reply_to, &event, &bytes, &from)
        .await?;
    Ok(Accepted::Rejected { reason })
}

/// The body's `metadata`, if it is an object within the size limit (an
/// oversized one is part of what was refused), else `{}`.
fn echoed_metadata(body: Option<&Value>) -> Value {
    body.and_then(|b| b.get("metadata"))
        .filter(|m| m.is_object())
        .filter(|m| serde_json::to_vec(m).is_ok_and(|v| v.len() <= protocol::MAX_METADATA_BYTES))
        .cloned()
        .unwrap_or_else(|| Value::Object(Default::default()))
}
