//! `reset_session`: the session's next job starts a new Claude session.
//! Recorded in the store (not in the front-end), so it holds across a
//! front-end's restart and whichever worker runs that job. Jobs already
//! accepted keep the conversation they were sent to.

use tracing::{debug, info};

use super::Request;
use crate::protocol::ControlOutcome;
use crate::store::now_ms;
use crate::worker::ending::EndError;

pub(super) async fn apply(req: &Request<'_>, session_key: String) -> Result<(), EndError> {
    if !req.claim().await? {
        return Ok(());
    }
    let known = req
        .ctx
        .store
        .request_session_reset(&session_key, now_ms())
        .await?;
    info!(request_id = %req.id, known, "reset_session handled");
    debug!(%session_key, "reset_session handled");
    // An unknown session has nothing to continue: its first job starts
    // one anyway, so the reset holds either way.
    let message = if known {
        "the session's next job starts a new conversation"
    } else {
        "no session yet: its first job starts a new conversation"
    };
    req.answer()
        .send(
            true,
            ControlOutcome::Applied,
            message.to_string(),
            None,
            Some(session_key),
        )
        .await?;
    Ok(())
}
