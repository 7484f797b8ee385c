//! `permission_response`: a person's answer to a `permission_request`.
//!
//! Every worker sees it; the one running the job hands it to the turn's
//! open prompt (see `worker::running::answer_prompt`) and answers. A
//! worker that does not run the job answers only when no worker can: the
//! job is unknown or already finished. While it runs elsewhere, that
//! worker answers.

use tracing::{debug, info};

use super::Request;
use crate::protocol::{ControlOutcome, PermissionResponseV1};
use crate::worker::ending::EndError;
use crate::worker::running::AnswerDelivery;

pub(super) async fn apply(req: &Request<'_>, answer: PermissionResponseV1) -> Result<(), EndError> {
    let ctx = req.ctx;
    let job_id = answer.job_id.clone();
    let request_id = answer.request_id.clone();
    let behavior = answer.behavior;
    let (ok, outcome, message) = match ctx.running.answer_prompt(answer, req.user_id.as_deref()) {
        AnswerDelivery::Delivered => (
            true,
            ControlOutcome::Answered,
            format!("{} passed to the waiting tool call", behavior.as_str()),
        ),
        AnswerDelivery::AlreadySettled => (
            false,
            ControlOutcome::Refused,
            format!("prompt {request_id} was already settled (answered, timed out or cancelled)"),
        ),
        AnswerDelivery::NotAllowed => (
            false,
            ControlOutcome::Refused,
            format!(
                "job {job_id}'s prompts may be answered only by its prompt_answerers; this \
                 answer was published {}",
                req.user_id
                    .as_deref()
                    .map_or("without a user_id property".into(), |u| format!("as `{u}`"))
            ),
        ),
        AnswerDelivery::Unknown => (
            false,
            ControlOutcome::Unknown,
            format!("job {job_id} has no open prompt {request_id}"),
        ),
        AnswerDelivery::NotHere => match ctx.store.get_job(&job_id).await? {
            None => (false, ControlOutcome::Unknown, format!("no job {job_id}")),
            Some(job) if job.status.is_terminal() => (
                false,
                ControlOutcome::AlreadyFinished,
                format!(
                    "job {job_id} already finished ({}); its prompts are settled",
                    job.status.as_str()
                ),
            ),
            // Queued or running elsewhere: the worker that runs it answers.
            Some(_) => return Ok(()),
        },
    };
    if !req.claim().await? {
        return Ok(());
    }
    info!(request_id = %req.id, ?outcome, "permission_response handled");
    debug!(%job_id, prompt = %request_id, "permission_response handled");
    req.answer()
        .send(ok, outcome, message, Some(job_id), None)
        .await?;
    Ok(())
}
