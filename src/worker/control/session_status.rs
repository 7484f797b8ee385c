//! `session_status`: a session's stored state (Claude session, turns,
//! cost, queued and running jobs, a pending reset, context use), so a
//! front-end need not remember it. Read-only: answered by the one worker
//! that claims the request.

use tracing::debug;

use super::Request;
use crate::protocol::{ControlOutcome, SessionStatusV1};
use crate::store::StoreError;
use crate::worker::ending::EndError;

pub(super) async fn report(req: &Request<'_>, session_key: String) -> Result<(), EndError> {
    if !req.claim().await? {
        return Ok(());
    }
    debug!(%session_key, "session_status handled");
    match status_of(req, &session_key).await? {
        Some(status) => req.answer().send_status(session_key, status).await?,
        None => {
            let message = format!("no session {session_key}");
            req.answer()
                .send(
                    false,
                    ControlOutcome::Unknown,
                    message,
                    None,
                    Some(session_key),
                )
                .await?
        }
    }
    Ok(())
}

async fn status_of(
    req: &Request<'_>,
    session_key: &str,
) -> Result<Option<SessionStatusV1>, StoreError> {
    let store = &req.ctx.store;
    let Some(s) = store.get_session(session_key).await? else {
        return Ok(None);
    };
    let (queued_jobs, running_jobs) = store.count_open_jobs(session_key).await?;
    let reset_pending = s.reset_after_job_order.is_some();
    Ok(Some(SessionStatusV1 {
        // After a reset, the session continues nothing until its next turn.
        claude_session_id: s.claude_session_id.filter(|_| !reset_pending),
        profile: s.profile,
        turns: s.turns,
        cost_usd: s.cost_usd,
        queued_jobs,
        running_jobs,
        reset_pending,
        permission_mode: s.permission_mode,
        context_tokens: s.context_tokens,
        context_window: s.context_window,
    }))
}
