//! `permission_response`: a person's answer to a `permission_request`.
//!
//! Every worker sees it; the one running the job hands it to the turn's
//! open prompt (see `worker::running::answer_prompt`) and answers. A
//! prompt no worker holds open is judged from the store (every prompt is
//! recorded before it is published): unknown, already settled, or no
//! longer pending because the attempt that asked ended (its worker died
//! or stopped; the next attempt asks under a new id). While a live worker
//! runs the job with the prompt open, that worker answers.

use tracing::{debug, info};

use super::Request;
use crate::protocol::{ControlOutcome, PermissionResponseV1};
use crate::store::{now_ms, JobStatus};
use crate::worker::ending::EndError;
use crate::worker::running::AnswerDelivery;

pub(super) async fn apply(req: &Request<'_>, answer: PermissionResponseV1) -> Result<(), EndError> {
    let ctx = req.ctx;
    let job_id = answer.job_id.clone();
    let request_id = answer.request_id.clone();
    let behavior = answer.behavior;
    let delivery = ctx.running.answer_prompt(answer, req.user_id.as_deref());
    let (ok, outcome, message) = match delivery {
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
        AnswerDelivery::Unknown | AnswerDelivery::NotHere => {
            let elsewhere = delivery == AnswerDelivery::NotHere;
            match from_store(req, &job_id, &request_id, elsewhere).await? {
                Some(verdict) => verdict,
                // Running elsewhere with the prompt open: that worker answers.
                None => return Ok(()),
            }
        }
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

type Verdict = (bool, ControlOutcome, String);

/// What the store says of a prompt this worker does not hold open; `None`
/// when the worker running the job holds it open and answers.
async fn from_store(
    req: &Request<'_>,
    job_id: &str,
    request_id: &str,
    elsewhere: bool,
) -> Result<Option<Verdict>, EndError> {
    let store = &req.ctx.store;
    let Some(job) = store.get_job(job_id).await? else {
        return Ok(Some((
            false,
            ControlOutcome::Unknown,
            format!("no job {job_id}"),
        )));
    };
    if job.status.is_terminal() {
        let status = job.status.as_str();
        let msg = format!("job {job_id} already finished ({status}); its prompts are settled");
        return Ok(Some((false, ControlOutcome::AlreadyFinished, msg)));
    }
    // A live worker runs it: that one answers (from its open prompts, else
    // from here), so a prompt it settles for this very answer is never
    // called settled by another.
    let running = job.status == JobStatus::Running;
    if elsewhere && running && lease_is_live(req, &job.session_key).await? {
        return Ok(None);
    }
    let prompt = store.get_prompt(request_id).await?;
    let Some(prompt) = prompt.filter(|p| p.job_id == job_id) else {
        let msg = format!("job {job_id} has no prompt {request_id}");
        return Ok(Some((false, ControlOutcome::Unknown, msg)));
    };
    if let Some(by) = prompt.resolved_by {
        let msg = format!("prompt {request_id} was already settled ({by})");
        return Ok(Some((false, ControlOutcome::Refused, msg)));
    }
    let msg = format!(
        "prompt {request_id} is no longer pending: the attempt that asked ended without an \
         answer (its worker stopped or was lost); the job asks again under a new request id"
    );
    Ok(Some((false, ControlOutcome::Refused, msg)))
}

/// Whether some worker holds the session's lease now (and so runs its job).
async fn lease_is_live(req: &Request<'_>, session_key: &str) -> Result<bool, EndError> {
    let session = req.ctx.store.get_session(session_key).await?;
    Ok(session.is_some_and(|s| {
        s.lease_owner.is_some() && s.lease_expires_at_ms.is_some_and(|t| t > now_ms())
    }))
}
