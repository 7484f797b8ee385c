//! `set_permission_mode`: a session's running turn and its later turns,
//! within the ceiling of the session's profile.

use serde_json::json;
use tracing::{debug, info};

use super::Request;
use crate::protocol::{ControlOutcome, PermissionMode};
use crate::store::{now_ms, StoreError};
use crate::worker::context::Context;
use crate::worker::ending::EndError;

pub(super) async fn apply(
    req: &Request<'_>,
    session_key: String,
    mode: PermissionMode,
) -> Result<(), EndError> {
    let ctx = req.ctx;
    let verdict = check_mode(ctx, &session_key, mode).await?;
    if verdict.is_ok() {
        let request = json!({"subtype": "set_permission_mode", "mode": mode.as_str()});
        ctx.running.send_to_session(&session_key, request);
    }
    if !req.claim().await? {
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
    info!(request_id = %req.id, %mode, ?outcome, "set_permission_mode handled");
    debug!(%session_key, "set_permission_mode handled");
    req.answer()
        .send(ok, outcome, message, None, Some(session_key))
        .await?;
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
