//! The one `control_result` a control message gets.

use crate::broker::publish::PublishError;
use crate::protocol::{ControlOutcome, ControlResultV1, SessionStatusV1, PROTOCOL_VERSION};
use crate::worker::context::Context;

pub(super) struct Answer<'a> {
    pub(super) ctx: &'a Context,
    pub(super) request_id: &'a str,
    pub(super) reply_to: Option<&'a str>,
}

impl Answer<'_> {
    pub(super) async fn send(
        &self,
        ok: bool,
        outcome: ControlOutcome,
        message: String,
        job_id: Option<String>,
        session_key: Option<String>,
    ) -> Result<(), PublishError> {
        self.publish(ControlResultV1 {
            v: PROTOCOL_VERSION,
            kind: "control_result".into(),
            request_id: self.request_id.to_string(),
            ok,
            outcome,
            message,
            job_id,
            session_key,
            status: None,
        })
        .await
    }

    /// The answer to `session_status`.
    pub(super) async fn send_status(
        &self,
        session_key: String,
        status: SessionStatusV1,
    ) -> Result<(), PublishError> {
        self.publish(ControlResultV1 {
            v: PROTOCOL_VERSION,
            kind: "control_result".into(),
            request_id: self.request_id.to_string(),
            ok: true,
            outcome: ControlOutcome::Reported,
            message: format!("session {session_key}"),
            job_id: None,
            session_key: Some(session_key),
            status: Some(status),
        })
        .await
    }

    async fn publish(&self, result: ControlResultV1) -> Result<(), PublishError> {
        let Some(reply_to) = self.reply_to else {
            return Ok(());
        };
        let bytes = serde_json::to_vec(&result).expect("results serialise");
        self.ctx
            .sink
            .publish_control_result(reply_to, self.request_id, &bytes)
            .await
    }
}
