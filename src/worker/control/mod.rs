//! Control messages: cancel (the SDK's `interrupt()`), runtime
//! permission-mode changes (`setPermissionMode()`), a session's status and
//! its reset, one file per kind.
//!
//! Control messages go to a fanout exchange, so every worker sees each one.
//! Each worker acts on its own running turns (interrupting them, or
//! forwarding a control request to their CLI); the one worker that records
//! the request id first in the database (`claim_control`) also does the
//! database part (cancelling queued jobs, storing the mode) and answers
//! with exactly one `control_result`. When it finds the job running it
//! re-broadcasts the message, so a worker that registered the turn just
//! after the first copy arrived still sees it.

mod answer;
mod cancel;
mod permission_response;
mod reset_session;
mod session_status;
mod set_permission_mode;

use lapin::message::Delivery;
use serde_json::Value;
use tracing::{instrument, warn};

use crate::broker::publish::PublishError;
use crate::protocol::{self, ControlBody, ControlOutcome};
use crate::store::{now_ms, StoreError};
use crate::worker::context::Context;
use crate::worker::ending::EndError;
use answer::Answer;

/// One control delivery, as the handlers see it.
struct Request<'a> {
    ctx: &'a Context,
    /// The message id (or a digest of the body: every worker must agree).
    id: String,
    /// Where the answer goes, if anywhere.
    reply_to: Option<String>,
    /// The body as received, for re-broadcasting.
    data: &'a [u8],
    /// The AMQP `user_id` property (RabbitMQ checks it against the
    /// publishing connection's user).
    user_id: Option<String>,
}

impl Request<'_> {
    /// True for the one worker that answers this request.
    async fn claim(&self) -> Result<bool, StoreError> {
        self.ctx.store.claim_control(&self.id, now_ms()).await
    }

    fn answer(&self) -> Answer<'_> {
        Answer {
            ctx: self.ctx,
            request_id: &self.id,
            reply_to: self.reply_to.as_deref(),
        }
    }

    /// Sends the message to every worker again (same id: nobody answers
    /// twice), for a runner that registered its turn after the first copy.
    async fn rebroadcast(&self) -> Result<(), PublishError> {
        self.ctx
            .sink
            .publish_control(self.data, &self.id, self.reply_to.as_deref())
            .await
    }
}

/// Handles one control delivery. `Err` means "could not finish; redeliver".
#[instrument(skip_all)]
pub async fn handle(ctx: &Context, delivery: &Delivery) -> Result<(), EndError> {
    let req = request_of(ctx, delivery);
    let msg = match protocol::decode_control(&delivery.data) {
        Ok(m) => m,
        Err(e) => {
            if req.claim().await? {
                warn!(request_id = %req.id, error = %e, "invalid control message");
                req.answer()
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
        } => cancel::job(&req, job_id, reason).await,
        ControlBody::Cancel {
            session_key: Some(key),
            reason,
            ..
        } => cancel::session(&req, key, reason).await,
        ControlBody::Cancel { .. } => {
            // decode_control refuses a cancel with neither; answer anyway.
            if req.claim().await? {
                let text = "cancel needs `job_id` or `session_key`".to_string();
                req.answer()
                    .send(false, ControlOutcome::Invalid, text, None, None)
                    .await?;
            }
            Ok(())
        }
        ControlBody::SetPermissionMode { session_key, mode } => {
            set_permission_mode::apply(&req, session_key, mode).await
        }
        ControlBody::SessionStatus { session_key } => {
            session_status::report(&req, session_key).await
        }
        ControlBody::ResetSession { session_key } => reset_session::apply(&req, session_key).await,
        ControlBody::PermissionResponse(answer) => permission_response::apply(&req, answer).await,
    }
}

fn request_of<'a>(ctx: &'a Context, delivery: &'a Delivery) -> Request<'a> {
    let props = &delivery.properties;
    let id = props
        .message_id()
        .as_ref()
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|| format!("body-{:016x}", fnv64(&delivery.data)));
    let body: Option<Value> = serde_json::from_slice(&delivery.data).ok();
    let reply_to = props
        .reply_to()
        .as_ref()
        .map(|s| s.as_str().to_string())
        .or_else(|| body.as_ref()?.get("reply_to")?.as_str().map(str::to_string))
        .filter(|r| protocol::validate_reply_to(r).is_ok());
    Request {
        ctx,
        id,
        reply_to,
        data: &delivery.data,
        user_id: props.user_id().as_ref().map(|u| u.as_str().to_string()),
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
