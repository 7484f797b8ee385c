//! One job's lifecycle under a session lease, as typed stages:
//!
//! `prepare` (profile, attempts lost with a worker, which Claude session to
//! resume, the warm process, the transcript) → `Prepared` → `budget` (a
//! job past its session or identity budget ends here) → `compact` (a
//! session near its window, or whose job asks, is compacted first) →
//! `attempts` (the attempt loop with retry; each `attempt` drives one CLI
//! run) → `Ended` → `outcome` (record the outcome, then publish the
//! terminal event).
//!
//! Every event goes through `events`: its seq comes from a block reserved
//! under the lease epoch (one fenced write per block), and it is published
//! only while the lease is surely held, so a worker that lost the session
//! publishes nothing more.

mod attempt;
mod attempts;
mod budget;
mod cli_run;
mod compact;
mod events;
mod grants;
mod outcome;
mod prepare;
mod prompt;
pub(crate) mod retry;
mod spoken;
mod superseded;

use std::time::Duration;

use tracing::instrument;

use crate::broker::publish::PublishError;
use crate::store::{AfterFinish, JobRecord, Lease, NextJob, SessionRecord, StoreError};
use crate::worker::context::Context;
pub(crate) use crate::worker::lease::Stop;

use events::JobEvents;

/// How long a CLI gets to exit after its result before its group is killed.
const EXIT_GRACE: Duration = Duration::from_secs(5);
/// How long the CLI gets to answer an interrupt with its result, which
/// carries what the cut turn cost: on a loaded machine it has taken over
/// 3 s (CI, `budget::a_cancelled_turns_cost_counts_for_its_session`).
const INTERRUPT_ANSWER: Duration = Duration::from_secs(10);
/// The later steps of interrupting a turn (SIGINT, SIGTERM) each get this
/// long before the next, harsher one.
const INTERRUPT_GRACE: Duration = Duration::from_secs(3);
/// A CLI stopped for good (timeout, lease lost, shutdown) gets this long
/// after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Why a job stopped without an outcome. The job stays in the database
/// (running or requeued) and runs again later, here or elsewhere.
#[derive(Debug, thiserror::Error)]
pub enum TurnAbort {
    #[error("the session's lease was lost")]
    LeaseLost,
    #[error("the worker is shutting down")]
    Shutdown,
    #[error(transparent)]
    Store(StoreError),
    #[error(transparent)]
    Publish(#[from] PublishError),
}

impl From<StoreError> for TurnAbort {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::LeaseLost { .. } => TurnAbort::LeaseLost,
            other => TurnAbort::Store(other),
        }
    }
}

/// Runs a job to its outcome (or aborts, leaving it for later), and says
/// what the outcome's transaction saw for after it (None: this run wrote
/// no outcome).
#[instrument(skip_all)]
pub async fn run_job(
    ctx: &Context,
    lease: &Lease,
    next: NextJob,
    stop: &Stop,
) -> Result<Option<AfterFinish>, TurnAbort> {
    let NextJob { job, session } = next;
    let mut events = JobEvents::new(ctx, lease, stop, &job);
    run_job_stages(ctx, lease, job, session, &mut events).await?;
    Ok(events.take_after())
}

async fn run_job_stages(
    ctx: &Context,
    lease: &Lease,
    job: JobRecord,
    session: SessionRecord,
    events: &mut JobEvents<'_>,
) -> Result<(), TurnAbort> {
    let Some(mut prepared) = prepare::prepare(ctx, &job, session, events).await? else {
        return Ok(());
    };
    if !budget::admit(ctx, &job, &mut prepared, events).await? {
        return Ok(());
    }
    compact::before_turn(ctx, lease, &job, &mut prepared, events).await?;
    let ended = attempts::run(ctx, lease, &job, &mut prepared, events).await?;
    outcome::record(ctx, lease, &job, prepared, ended, events).await
}
