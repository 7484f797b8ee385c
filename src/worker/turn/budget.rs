//! Budgets, a stage between `prepare` and `attempts`: a job whose
//! session's lifetime budget or whose identity's budget for the current
//! window is used up fails at once with `budget_exceeded`; with
//! `budget.overrun = "stop"` the turn is capped at what is left of them.
//!
//! The figures are the database's (what finished jobs cost, on every
//! worker), read when the job starts: a turn that crosses a budget
//! mid-way finishes (unless capped), and the next job is refused.

use tracing::{info, instrument};

use super::events::JobEvents;
use super::prepare::Prepared;
use super::TurnAbort;
use crate::config::{BudgetOverrun, BudgetSettings};
use crate::protocol::{ErrorKind, EventBody};
use crate::store::{now_ms, utc_time, EndReason, JobRecord, JobStatus};
use crate::worker::context::Context;

/// A budget that is used up, or what is left of one.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Standing {
    /// `session` or `identity` (for logs; no user data).
    pub which: &'static str,
    pub limit_usd: f64,
    pub spent_usd: f64,
    /// Unix ms when the budget starts afresh; `None`: never.
    pub resets_at_ms: Option<i64>,
}

impl Standing {
    pub fn left_usd(&self) -> f64 {
        (self.limit_usd - self.spent_usd).max(0.0)
    }

    pub fn used_up(&self) -> bool {
        self.spent_usd >= self.limit_usd
    }

    /// What the producer is told: which budget, what was spent, when it resets.
    pub fn refusal(&self, window_secs: u64) -> String {
        match self.resets_at_ms {
            None => format!(
                "the session's budget of ${:.4} is used up (${:.4} spent by this session key); \
                 it does not reset: continue in a new session key",
                self.limit_usd, self.spent_usd
            ),
            Some(at) => format!(
                "the identity's budget of ${:.4} per {} is used up (${:.4} spent in this window); \
                 it resets at {}",
                self.limit_usd,
                window_name(window_secs),
                self.spent_usd,
                utc_time(at)
            ),
        }
    }
}

fn window_name(secs: u64) -> String {
    match secs {
        86_400 => "day (UTC)".into(),
        3_600 => "hour".into(),
        s if s % 86_400 == 0 => format!("{} days", s / 86_400),
        s if s % 3_600 == 0 => format!("{} hours", s / 3_600),
        s => format!("{s} s"),
    }
}

/// The window (aligned to the Unix epoch) that `now_ms` falls in: its
/// start and its end (when the budget resets).
pub(crate) fn window(now_ms: i64, window_secs: u64) -> (i64, i64) {
    let len = (window_secs as i64).saturating_mul(1000).max(1);
    let start = now_ms - now_ms.rem_euclid(len);
    (start, start + len)
}

/// Runs the job only if its budgets allow it; `false` when it was ended
/// here (`failed`, `budget_exceeded`).
#[instrument(skip_all)]
pub(super) async fn admit(
    ctx: &Context,
    job: &JobRecord,
    prepared: &mut Prepared,
    events: &mut JobEvents<'_>,
) -> Result<bool, TurnAbort> {
    let budget = prepared.profile.budget.clone();
    let standings = standings(ctx, job, prepared, &budget).await?;
    if let Some(over) = standings.iter().find(|s| s.used_up()) {
        info!(budget = over.which, "job refused: budget used up");
        if over.which == "session" {
            // A session budget never resets: its conversation is over.
            let ended = ctx
                .store
                .end_conversation(
                    &job.session_key,
                    EndReason::Budget,
                    Some(&job.job_id),
                    now_ms(),
                )
                .await?;
            if ended {
                ctx.note_lifecycle_recorded();
            }
        }
        if let Some(warm) = prepared.warm.take() {
            // Nothing ran on it: it stays the session's warm process.
            ctx.warm.put(warm);
        }
        let message = over.refusal(budget.identity_window_secs);
        let body = EventBody::Failed {
            error: ErrorKind::BudgetExceeded,
            message: message.clone(),
            retryable: over.resets_at_ms.is_some(),
        };
        events
            .finish(JobStatus::Failed, body, Some(message), None)
            .await?;
        return Ok(false);
    }
    if budget.overrun == BudgetOverrun::Stop {
        let left = standings.iter().map(Standing::left_usd).reduce(f64::min);
        if let Some(left) = left {
            cap_turn(prepared, left).await;
        }
    }
    Ok(true)
}

/// The session and identity budgets that apply to the job.
async fn standings(
    ctx: &Context,
    job: &JobRecord,
    prepared: &Prepared,
    budget: &BudgetSettings,
) -> Result<Vec<Standing>, TurnAbort> {
    let mut out = Vec::new();
    if let Some(limit) = budget.session_usd {
        out.push(Standing {
            which: "session",
            limit_usd: limit,
            spent_usd: prepared.session_cost_usd,
            resets_at_ms: None,
        });
    }
    if let (Some(limit), Some(identity)) = (budget.identity_usd, &job.spec.identity) {
        let (start, end) = window(now_ms(), budget.identity_window_secs);
        let spent = ctx.store.identity_spend(identity, start).await?;
        out.push(Standing {
            which: "identity",
            limit_usd: limit,
            spent_usd: spent,
            resets_at_ms: Some(end),
        });
    }
    Ok(out)
}

/// Caps the turn at `left_usd` (narrowing any cap it has). A capped turn
/// needs a process of its own: the CLI counts the cap per process.
async fn cap_turn(prepared: &mut Prepared, left_usd: f64) {
    let options = &mut prepared.request.options;
    let cap = options.max_budget_usd.map_or(left_usd, |c| c.min(left_usd));
    options.max_budget_usd = Some(cap);
    if let Some(mut warm) = prepared.warm.take() {
        let how = warm.proc.close(super::EXIT_GRACE).await;
        tracing::debug!(how, "warm process closed: the turn is capped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_align_to_the_epoch_and_refusals_say_when_they_reset() {
        // 2024-02-29 12:34:56Z
        let now = 1_709_210_096_000;
        let (start, end) = window(now, 86_400);
        assert_eq!(utc_time(start), "2024-02-29 00:00:00Z");
        assert_eq!(utc_time(end), "2024-03-01 00:00:00Z");
        let (start, end) = window(now, 3_600);
        assert_eq!(
            (utc_time(start), end - start),
            ("2024-02-29 12:00:00Z".into(), 3_600_000)
        );
        let identity = Standing {
            which: "identity",
            limit_usd: 1.0,
            spent_usd: 1.25,
            resets_at_ms: Some(end),
        };
        assert!(identity.used_up());
        assert_eq!(identity.left_usd(), 0.0);
        assert_eq!(
            identity.refusal(3_600),
            "the identity's budget of $1.0000 per hour is used up ($1.2500 spent in this \
             window); it resets at 2024-02-29 13:00:00Z"
        );
        let session = Standing {
            which: "session",
            limit_usd: 0.5,
            spent_usd: 0.25,
            resets_at_ms: None,
        };
        assert!(!session.used_up());
        assert_eq!(session.left_usd(), 0.25);
        assert!(session.refusal(86_400).contains("does not reset"));
        assert_eq!(window_name(2 * 86_400), "2 days");
    }
}
