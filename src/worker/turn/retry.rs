//! Which failures are worth another attempt, and how long to wait.
//!
//! The CLI already retries API errors itself (~10 times); our loop is the
//! outer one, for failures the CLI gave up on or could not see (a crash, a
//! timeout, a dead worker).

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use crate::claude::TurnResult;
use crate::config::RetrySettings;
use crate::protocol::ErrorKind;

/// Why an attempt failed, classified for the retry decision.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptFailure {
    pub kind: ErrorKind,
    pub message: String,
    pub retryable: bool,
}

impl AttemptFailure {
    pub fn new(kind: ErrorKind, message: impl Into<String>, retryable: bool) -> Self {
        AttemptFailure {
            kind,
            message: message.into(),
            retryable,
        }
    }

    /// Classifies a `result` line with `is_error` (or a non-success subtype).
    pub fn from_result(r: &TurnResult) -> AttemptFailure {
        let text = r
            .result
            .clone()
            .filter(|t| !t.is_empty())
            .or_else(|| (!r.errors.is_empty()).then(|| r.errors.join("; ")))
            .unwrap_or_else(|| format!("the CLI reported an error ({})", r.subtype));
        if r.subtype == "error_max_turns" {
            return AttemptFailure::new(
                ErrorKind::MaxTurns,
                format!("reached max_turns: {text}"),
                false,
            );
        }
        if r.subtype == "error_max_budget_usd" {
            return AttemptFailure::new(
                ErrorKind::MaxBudget,
                format!("reached the turn's cost cap (max_budget_usd): {text}"),
                false,
            );
        }
        match r.api_error_status {
            Some(401) | Some(403) => AttemptFailure::new(ErrorKind::Auth, text, false),
            Some(408) | Some(409) | Some(429) | Some(500..=599) => {
                AttemptFailure::new(ErrorKind::Api, text, true)
            }
            Some(_) => AttemptFailure::new(ErrorKind::Api, text, false),
            // An error without an API status: the connection dropped, the
            // execution failed… worth another try.
            None => AttemptFailure::new(ErrorKind::Api, text, true),
        }
    }
}

/// The retry schedule of one job: exponential, jittered, capped in attempts
/// and total time.
pub struct RetryPolicy {
    settings: RetrySettings,
}

impl RetryPolicy {
    pub fn new(settings: RetrySettings) -> Self {
        RetryPolicy { settings }
    }

    pub fn max_attempts(&self) -> u32 {
        self.settings.max_attempts
    }

    /// The delay before attempt `next_attempt` (2-based: the first retry),
    /// or `None` when attempts or total time are used up. `elapsed` is the
    /// time since the job's first attempt started.
    pub fn delay_before(&self, next_attempt: u32, elapsed: Duration) -> Option<Duration> {
        if next_attempt > self.settings.max_attempts {
            return None;
        }
        let mut builder = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(self.settings.min_delay_ms))
            .with_max_delay(Duration::from_millis(self.settings.max_delay_ms))
            .with_factor(2.0)
            .with_max_times(self.settings.max_attempts as usize);
        if self.settings.jitter {
            builder = builder.with_jitter();
        }
        let delay = builder
            .build()
            .nth(next_attempt.saturating_sub(2) as usize)?;
        if elapsed + delay > Duration::from_secs(self.settings.max_total_secs) {
            return None;
        }
        Some(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(status: Option<u64>, subtype: &str) -> TurnResult {
        TurnResult {
            subtype: subtype.into(),
            is_error: true,
            result: Some("boom".into()),
            session_id: None,
            api_error_status: status,
            errors: vec![],
            usage: serde_json::Value::Null,
            total_cost_usd: 0.0,
            per_turn_cost_usd: None,
            context: None,
            turn_cost_usd: 0.0,
            duration_ms: 0,
            num_turns: 0,
        }
    }

    #[test]
    fn classification_follows_the_contract() {
        assert!(AttemptFailure::from_result(&result(Some(529), "success")).retryable);
        assert!(AttemptFailure::from_result(&result(Some(429), "success")).retryable);
        assert!(AttemptFailure::from_result(&result(Some(500), "success")).retryable);
        let auth = AttemptFailure::from_result(&result(Some(401), "success"));
        assert_eq!((auth.kind, auth.retryable), (ErrorKind::Auth, false));
        assert!(!AttemptFailure::from_result(&result(Some(400), "success")).retryable);
        let mt = AttemptFailure::from_result(&result(None, "error_max_turns"));
        assert_eq!((mt.kind, mt.retryable), (ErrorKind::MaxTurns, false));
    }

    #[test]
    fn delays_grow_and_stop() {
        let p = RetryPolicy::new(RetrySettings {
            max_attempts: 4,
            min_delay_ms: 100,
            max_delay_ms: 1000,
            max_total_secs: 60,
            jitter: false,
        });
        let d2 = p.delay_before(2, Duration::ZERO).unwrap();
        let d3 = p.delay_before(3, Duration::ZERO).unwrap();
        assert_eq!(d2, Duration::from_millis(100));
        assert_eq!(d3.as_millis(), 200);
        assert!(p.delay_before(5, Duration::ZERO).is_none());
        assert!(p.delay_before(2, Duration::from_secs(60)).is_none());
    }
}
