//! The worker's metrics: `metrics` handles registered on a Prometheus
//! recorder that belongs to this worker (never installed as the global
//! recorder), rendered by the admin port's `/metrics`.
//!
//! Why per worker: several workers run in one test process (and may in an
//! embedding program); a global recorder would mix their counts, and a
//! second install fails. Each worker's registry is its own, like its
//! `Context`. Labels are bounded sets only — profile, error kind, reason
//! class — never a session key, job id or free text.

use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, SharedString};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusRecorder};

use crate::claude::WarmStats;
use crate::protocol::{ErrorKind, EventBody};

/// Every metric: name, kind, help. Names follow Prometheus conventions
/// (`_total` counters, base units).
const METRICS: &[(&str, Kind, &str)] = &[
    (
        JOBS_ACCEPTED,
        Kind::Counter,
        "Jobs accepted (persisted), by profile.",
    ),
    (
        JOBS_COMPLETED,
        Kind::Counter,
        "Jobs that ended completed, by profile.",
    ),
    (
        JOBS_FAILED,
        Kind::Counter,
        "Jobs that ended failed, by profile and error kind.",
    ),
    (
        JOBS_CANCELLED,
        Kind::Counter,
        "Jobs that ended cancelled, by profile.",
    ),
    (
        DEAD_LETTERS,
        Kind::Counter,
        "Deliveries dead-lettered by this worker, by reason.",
    ),
    (
        RETRIES,
        Kind::Counter,
        "Attempts retried, by reason (the failed attempt's error kind, worker_lost, interrupted).",
    ),
    (
        QUEUE_WAIT,
        Kind::Histogram,
        "Time from a job's acceptance to its first start, by profile.",
    ),
    (
        FIRST_TEXT,
        Kind::Histogram,
        "Time from a job starting on this worker to its first text event, by profile.",
    ),
    (
        TURN_DURATION,
        Kind::Histogram,
        "Time a job ran on this worker until its outcome, by profile and outcome.",
    ),
    (
        JOB_COST,
        Kind::Histogram,
        "What a job's turns cost in USD, by profile (its _sum is the spend).",
    ),
    (
        PUBLISH_CONFIRM,
        Kind::Histogram,
        "Time from publishing a message to the broker's confirm, by kind.",
    ),
    (
        PUBLISH_ERRORS,
        Kind::Counter,
        "Publishes that failed (no confirm, nack, timeout, fenced), by kind.",
    ),
    (
        TURNS_RUNNING,
        Kind::Gauge,
        "Jobs running on this worker now.",
    ),
    (
        LEASES_HELD,
        Kind::Gauge,
        "Session leases this worker holds now.",
    ),
    (
        BROKER_UP,
        Kind::Gauge,
        "1 while the broker connection is up, else 0.",
    ),
    (
        WARM_PROCESSES,
        Kind::Gauge,
        "Idle warm CLI processes in the pool now.",
    ),
    (WARM_HITS, Kind::Counter, "Turns run on a warm CLI process."),
    (
        WARM_MISSES,
        Kind::Counter,
        "Turns that found no usable warm process.",
    ),
    (
        WARM_EVICTIONS,
        Kind::Counter,
        "Warm processes closed because the pool was full.",
    ),
    (
        WARM_EXPIRATIONS,
        Kind::Counter,
        "Warm processes closed after their idle TTL.",
    ),
    (
        CLI_SPAWNS,
        Kind::Counter,
        "CLI processes started for turns (cold starts).",
    ),
    (
        STORE_ERRORS,
        Kind::Counter,
        "Database errors met by the worker, by where they were met.",
    ),
    (
        TOKENS,
        Kind::Counter,
        "Tokens the CLI reported for finished turns, by profile and kind \
         (input, output, cache_read, cache_write).",
    ),
    (
        SESSION_EVENTS,
        Kind::Counter,
        "Session lifecycle events this worker published, by type.",
    ),
    (
        PRUNE_RUNS,
        Kind::Counter,
        "Retention prune runs this worker made (holding the fleet's prune lease).",
    ),
    (
        PRUNED,
        Kind::Counter,
        "Rows and files the retention prune removed, by kind.",
    ),
];

pub const JOBS_ACCEPTED: &str = "claude_worker_jobs_accepted_total";
pub const JOBS_COMPLETED: &str = "claude_worker_jobs_completed_total";
pub const JOBS_FAILED: &str = "claude_worker_jobs_failed_total";
pub const JOBS_CANCELLED: &str = "claude_worker_jobs_cancelled_total";
pub const DEAD_LETTERS: &str = "claude_worker_dead_letters_total";
pub const RETRIES: &str = "claude_worker_retries_total";
pub const QUEUE_WAIT: &str = "claude_worker_queue_wait_seconds";
pub const FIRST_TEXT: &str = "claude_worker_time_to_first_text_seconds";
pub const TURN_DURATION: &str = "claude_worker_turn_duration_seconds";
pub const JOB_COST: &str = "claude_worker_job_cost_usd";
pub const PUBLISH_CONFIRM: &str = "claude_worker_publish_confirm_seconds";
pub const PUBLISH_ERRORS: &str = "claude_worker_publish_errors_total";
pub const TURNS_RUNNING: &str = "claude_worker_turns_running";
pub const LEASES_HELD: &str = "claude_worker_leases_held";
pub const BROKER_UP: &str = "claude_worker_broker_up";
pub const WARM_PROCESSES: &str = "claude_worker_warm_processes";
pub const WARM_HITS: &str = "claude_worker_warm_hits_total";
pub const WARM_MISSES: &str = "claude_worker_warm_misses_total";
pub const WARM_EVICTIONS: &str = "claude_worker_warm_evictions_total";
pub const WARM_EXPIRATIONS: &str = "claude_worker_warm_expirations_total";
pub const CLI_SPAWNS: &str = "claude_worker_cli_spawns_total";
pub const STORE_ERRORS: &str = "claude_worker_store_errors_total";
pub const TOKENS: &str = "claude_worker_tokens_total";
pub const SESSION_EVENTS: &str = "claude_worker_session_events_total";
pub const PRUNE_RUNS: &str = "claude_worker_prune_runs_total";
pub const PRUNED: &str = "claude_worker_pruned_total";

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Histogram buckets, in seconds: from a fast publish confirm (ms) to a
/// long turn (the default turn timeout is 900 s).
const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0,
];

/// Cost buckets, in USD: from a cached one-liner to a long agentic job.
const COST_BUCKETS: &[f64] = &[0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0];

const META: Metadata<'static> = Metadata::new(module_path!(), metrics::Level::INFO, None);

/// This worker's metrics. Disabled (every handle a no-op, nothing kept)
/// when the admin port is off, so nothing grows unread.
pub struct Metrics {
    recorder: Option<PrometheusRecorder>,
}

impl Metrics {
    pub fn new(enabled: bool) -> Metrics {
        let recorder = enabled.then(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(JOB_COST.into()), COST_BUCKETS)
                })
                .expect("the buckets are not empty")
                .build_recorder();
            for (name, kind, help) in METRICS {
                let key = KeyName::from_const_str(name);
                let help = SharedString::const_str(help);
                match kind {
                    Kind::Counter => recorder.describe_counter(key, None, help),
                    Kind::Gauge => recorder.describe_gauge(key, None, help),
                    Kind::Histogram => recorder.describe_histogram(key, None, help),
                }
            }
            recorder
        });
        Metrics { recorder }
    }

    pub fn enabled(&self) -> bool {
        self.recorder.is_some()
    }

    pub fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
        match &self.recorder {
            Some(r) => r.register_counter(&key(name, labels), &META),
            None => Counter::noop(),
        }
    }

    pub fn gauge(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Gauge {
        match &self.recorder {
            Some(r) => r.register_gauge(&key(name, labels), &META),
            None => Gauge::noop(),
        }
    }

    pub fn histogram(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Histogram {
        match &self.recorder {
            Some(r) => r.register_histogram(&key(name, labels), &META),
            None => Histogram::noop(),
        }
    }

    /// Records `d` in seconds (the base unit).
    pub fn observe(&self, name: &'static str, labels: &[(&'static str, &str)], d: Duration) {
        self.histogram(name, labels).record(d.as_secs_f64());
    }

    /// A gauge raised now and lowered when the guard drops (a lease held,
    /// a turn running), so a panic or an early return cannot leak it.
    pub fn raise(&self, name: &'static str) -> GaugeGuard {
        let gauge = self.gauge(name, &[]);
        gauge.increment(1.0);
        GaugeGuard(gauge)
    }

    /// A job reached its outcome: counts it by profile (and error kind);
    /// returns the outcome's name for labels.
    pub fn job_ended(&self, profile: &str, body: &EventBody) -> &'static str {
        match body {
            EventBody::Completed { .. } => self.counter(JOBS_COMPLETED, &[("profile", profile)]),
            EventBody::Failed { error, .. } => self.counter(
                JOBS_FAILED,
                &[("profile", profile), ("error_kind", error_kind(*error))],
            ),
            EventBody::Cancelled { .. } => self.counter(JOBS_CANCELLED, &[("profile", profile)]),
            _ => return "none",
        }
        .increment(1);
        body.type_name()
    }

    /// A database error met `at` a stage (accept, turn, readyz).
    pub fn store_error(&self, at: &'static str) {
        self.counter(STORE_ERRORS, &[("at", at)]).increment(1);
    }

    /// A finished turn's tokens, by profile and kind (zeros are skipped).
    pub fn tokens(&self, profile: &str, usage: &TokenUsage) {
        for (kind, n) in usage.kinds() {
            if n > 0 {
                self.counter(TOKENS, &[("profile", profile), ("kind", kind)])
                    .increment(n);
            }
        }
    }

    /// The warm pool's own counters, copied in before a scrape.
    pub fn set_warm(&self, s: &WarmStats) {
        self.gauge(WARM_PROCESSES, &[]).set(s.idle as f64);
        self.counter(WARM_HITS, &[]).absolute(s.hits);
        self.counter(WARM_MISSES, &[]).absolute(s.misses);
        self.counter(WARM_EVICTIONS, &[]).absolute(s.evictions);
        self.counter(WARM_EXPIRATIONS, &[]).absolute(s.expirations);
        self.counter(CLI_SPAWNS, &[]).absolute(s.spawns);
    }

    /// The Prometheus text exposition of everything recorded.
    pub fn render(&self) -> String {
        self.recorder
            .as_ref()
            .map(|r| r.handle().render())
            .unwrap_or_default()
    }

    /// Drains histogram samples into their buckets; without it they pile
    /// up between scrapes.
    pub fn upkeep(&self) {
        if let Some(r) = &self.recorder {
            r.handle().run_upkeep();
        }
    }
}

/// A turn's tokens by kind, as the CLI's `usage` reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenUsage {
    pub input: u64,
    pub output: u64,
    pub cache_read: u64,
    pub cache_write: u64,
}

impl TokenUsage {
    /// From the CLI's `usage` object (missing fields count 0).
    pub fn from_usage(usage: &serde_json::Value) -> TokenUsage {
        let n = |k: &str| {
            usage
                .get(k)
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0)
        };
        TokenUsage {
            input: n("input_tokens"),
            output: n("output_tokens"),
            cache_read: n("cache_read_input_tokens"),
            cache_write: n("cache_creation_input_tokens"),
        }
    }

    pub fn kinds(&self) -> [(&'static str, u64); 4] {
        [
            ("input", self.input),
            ("output", self.output),
            ("cache_read", self.cache_read),
            ("cache_write", self.cache_write),
        ]
    }
}

/// The wire name of an error kind, as the `failed` event spells it: a
/// label. Exhaustive, so a new kind must be named here.
pub fn error_kind(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::InvalidInput => "invalid_input",
        ErrorKind::Auth => "auth",
        ErrorKind::Api => "api",
        ErrorKind::MaxTurns => "max_turns",
        ErrorKind::Timeout => "timeout",
        ErrorKind::CliCrashed => "cli_crashed",
        ErrorKind::Spawn => "spawn",
        ErrorKind::WorkerLost => "worker_lost",
        ErrorKind::Internal => "internal",
        ErrorKind::Busy => "busy",
        ErrorKind::MaxBudget => "max_budget",
        ErrorKind::BudgetExceeded => "budget_exceeded",
    }
}

/// Every metric's name (for the dashboard check and documentation).
pub fn names() -> impl Iterator<Item = &'static str> {
    METRICS.iter().map(|(name, _, _)| *name)
}

fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
    let labels: Vec<Label> = labels
        .iter()
        .map(|(k, v)| Label::new(*k, v.to_string()))
        .collect();
    Key::from_parts(name, labels)
}

/// Lowers its gauge by one when dropped.
pub struct GaugeGuard(Gauge);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histograms_and_gauges_with_help() {
        let m = Metrics::new(true);
        m.counter(JOBS_ACCEPTED, &[("profile", "default")])
            .increment(2);
        m.observe(
            QUEUE_WAIT,
            &[("profile", "default")],
            Duration::from_millis(30),
        );
        let held = m.raise(LEASES_HELD);
        let text = m.render();
        assert!(
            text.contains("claude_worker_jobs_accepted_total{profile=\"default\"} 2"),
            "{text}"
        );
        assert!(text.contains("# HELP claude_worker_jobs_accepted_total Jobs accepted"));
        assert!(
            text.contains(
                "claude_worker_queue_wait_seconds_bucket{profile=\"default\",le=\"0.05\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("claude_worker_leases_held 1"), "{text}");
        drop(held);
        assert!(m.render().contains("claude_worker_leases_held 0"));
    }

    #[test]
    fn error_kind_labels_are_the_wire_names() {
        use ErrorKind::*;
        let all = [
            InvalidInput,
            Auth,
            Api,
            MaxTurns,
            Timeout,
            CliCrashed,
            Spawn,
            WorkerLost,
            Internal,
            Busy,
            MaxBudget,
            BudgetExceeded,
        ];
        for kind in all {
            assert_eq!(
                serde_json::to_value(kind).unwrap(),
                serde_json::Value::String(error_kind(kind).into())
            );
        }
    }

    #[test]
    fn two_workers_do_not_share_counts_and_disabled_records_nothing() {
        let (a, b, off) = (Metrics::new(true), Metrics::new(true), Metrics::new(false));
        a.counter(RETRIES, &[("reason", "overloaded")]).increment(1);
        off.counter(RETRIES, &[("reason", "overloaded")])
            .increment(1);
        assert!(a
            .render()
            .contains("claude_worker_retries_total{reason=\"overloaded\"} 1"));
        assert!(!b.render().contains("claude_worker_retries_total{"));
        assert_eq!(off.render(), "");
    }
}
