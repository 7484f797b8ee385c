//! Prompts that outlived the attempt that asked them: its worker died or
//! stopped, or its CLI exited, while a `permission_request` waited. Each
//! prompt is recorded in the store before its event goes out (see
//! `store::prompts`), so the job's next attempt — here or on another
//! worker — or its ending finds the ones still open and publishes their
//! `permission_resolved` (`superseded`): front-ends stop showing a prompt
//! nobody can answer any more. The next attempt asks again under a new id.

use tracing::warn;

use super::events::JobEvents;
use super::TurnAbort;
use crate::protocol::{EventBody, PermissionBehavior, ResolvedBy};

/// What a superseded prompt's `permission_resolved` says.
const RETRIED: &str = "the attempt that asked ended without an answer; the job's next \
                       attempt asks again under a new request id if it needs to";
const ENDED: &str = "the attempt that asked ended without an answer, and so did the job";

/// Resolves the job's open prompts of attempts before `attempt` (a new
/// attempt starts), or all of them (`None`: the job ends).
pub(super) async fn resolve_left_open(
    events: &mut JobEvents<'_>,
    attempt: Option<u32>,
) -> Result<(), TurnAbort> {
    if !events.prompts_recorded {
        // Neither this run nor (the job never ran before) another asked.
        return Ok(());
    }
    let open = events.ctx.store.open_prompts(&events.job_id).await?;
    let message = if attempt.is_some() { RETRIED } else { ENDED };
    for p in open
        .into_iter()
        .filter(|p| attempt.is_none_or(|a| p.attempt < a))
    {
        events
            .emit(EventBody::PermissionResolved {
                request_id: p.request_id.clone(),
                behavior: PermissionBehavior::Deny,
                by: ResolvedBy::Superseded,
                message: Some(message.into()),
            })
            .await?;
        mark_resolved(events, &p.request_id, ResolvedBy::Superseded).await;
    }
    Ok(())
}

/// Records that a prompt's `permission_resolved` went out. A failure is
/// only logged: the prompt then looks open, and a later attempt or the
/// job's ending resolves it again (a reader takes the first).
pub(super) async fn mark_resolved(events: &JobEvents<'_>, request_id: &str, by: ResolvedBy) {
    let store = &events.ctx.store;
    if let Err(e) = store.resolve_prompt(request_id, by.as_str()).await {
        warn!(error = %e, prompt = %request_id, "recording a settled permission prompt failed");
    }
}
