//! What one turn cost, from the CLI's figures.
//!
//! The CLI's `total_cost_usd` and `modelUsage` are **running totals**: of
//! every turn of a process (a warm process's turns add up) and, after a
//! cold `--resume` or a `--fork-session`, continuing from the totals the
//! resumed transcript saved (the CLI appends a `cost-state` line to the
//! transcript when a process exits; a process that was killed saves none,
//! and then the next resume starts lower). `usage` is per turn.
//!
//! A turn's cost is therefore taken, in this order, from
//! 1. the result's `model_usage_since_last_result` (CLI 2.1.330 and later
//!    on stream-json runs): per-model usage and cost of the calls counted
//!    since the process's previous result — the sum of its `costUSD`;
//! 2. otherwise the difference of `total_cost_usd` from the running total
//!    this process reported last, or, for a process's first result, from
//!    the total the CLI restored: the last `cost-state` of the transcript
//!    it resumed (or forked) from, 0 for a new session.

use std::io::BufRead;
use std::path::PathBuf;

use serde_json::Value;

use super::stream::{call_context, context_window, ContextUse, TurnResult};

/// Sum of `costUSD` over the models of `model_usage_since_last_result`;
/// `None` when the result does not carry it.
pub(crate) fn per_turn_cost(result: &Value) -> Option<f64> {
    let models = result.get("model_usage_since_last_result")?.as_object()?;
    Some(
        models
            .values()
            .filter_map(|m| m.get("costUSD").and_then(Value::as_f64))
            .filter(|c| c.is_finite() && *c > 0.0)
            .sum(),
    )
}

/// The running total the CLI restores when it resumes the transcript at
/// `path`: its last `cost-state` line's `totalCostUSD` (0 without one or
/// without the file).
pub(crate) fn restored_total(path: &std::path::Path) -> f64 {
    let Ok(file) = std::fs::File::open(path) else {
        return 0.0;
    };
    let mut last = 0.0;
    for line in std::io::BufReader::new(file).lines() {
        let Ok(line) = line else { break };
        if !line.contains("\"cost-state\"") {
            continue;
        }
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if v.get("type").and_then(Value::as_str) == Some("cost-state") {
            if let Some(total) = v.get("totalCostUSD").and_then(Value::as_f64) {
                last = total;
            }
        }
    }
    last
}

/// The context a `system/compact_boundary` line says the compaction left.
fn compacted_context(line: &Value) -> Option<u64> {
    if line.get("type").and_then(Value::as_str) != Some("system")
        || line.get("subtype").and_then(Value::as_str) != Some("compact_boundary")
    {
        return None;
    }
    line["compact_metadata"]
        .get("post_tokens")
        .and_then(Value::as_u64)
}

/// Per process: turns its results into per-turn costs and keeps what it
/// reported that nobody has accounted yet.
#[derive(Debug, Default)]
pub(crate) struct CostMeter {
    /// The running total of the process's previous result, once there is one.
    seen_total: Option<f64>,
    /// Where the CLI's restored running total is, for a process's first
    /// result without a per-turn figure (the transcript it resumed).
    restored_from: Option<PathBuf>,
    /// Per-turn costs of results not yet taken (see [`CostMeter::take`]).
    unclaimed: f64,
    /// The context of the current turn's latest top-level API call, and its model.
    last_call: Option<(u64, Option<String>)>,
}

impl CostMeter {
    /// A meter for a process that resumes (or forks) the transcript at
    /// `restored_from`, or starts a new session (`None`).
    pub fn new(restored_from: Option<PathBuf>) -> CostMeter {
        CostMeter {
            restored_from,
            ..CostMeter::default()
        }
    }

    /// Notes the context an assistant message's API call used, or what a
    /// compaction left (until the next call says otherwise).
    pub fn observe(&mut self, line: &Value) {
        if let Some(call) = call_context(line) {
            self.last_call = Some(call);
        } else if let Some(after) = compacted_context(line) {
            self.last_call = Some((after, None));
        }
    }

    /// Sets `result.turn_cost_usd` and `result.context` (from the raw
    /// result `line`) and remembers the running total.
    pub fn on_result(&mut self, result: &mut TurnResult, line: &Value) {
        result.context = self.last_call.take().map(|(tokens, model)| ContextUse {
            tokens,
            window: context_window(line, model.as_deref()),
        });
        let total = result.total_cost_usd.max(0.0);
        let cost = match result.per_turn_cost_usd {
            Some(c) => c,
            None => {
                let before = match self.seen_total {
                    Some(t) => t,
                    None => self
                        .restored_from
                        .as_deref()
                        .map(restored_total)
                        .unwrap_or(0.0),
                };
                // A total below what came before: the CLI restored less
                // than we expected (or started over), so all of it is new.
                if total + 1e-12 >= before {
                    total - before
                } else {
                    total
                }
            }
        };
        self.seen_total = Some(total);
        result.turn_cost_usd = cost;
        self.unclaimed += cost;
    }

    /// The cost of the results since the last call (for budget accounting).
    pub fn take(&mut self) -> f64 {
        std::mem::take(&mut self.unclaimed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::claude::stream::{parse_line, CliMessage};

    fn result(total: f64, since_last: Option<f64>) -> TurnResult {
        result_and_line(total, since_last).0
    }

    fn result_and_line(total: f64, since_last: Option<f64>) -> (TurnResult, Value) {
        let mut v = serde_json::json!({"type": "result", "subtype": "success", "total_cost_usd": total,
            "usage": {"input_tokens": 1}});
        if let Some(c) = since_last {
            v["model_usage_since_last_result"] = serde_json::json!({"claude-sonnet-4-5": {"costUSD": c}, "claude-haiku-4-5": {"costUSD": 0.0}});
        }
        match parse_line(&v.to_string()).unwrap() {
            CliMessage::Result(r) => (r, v),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_clis_per_turn_figure_wins() {
        let mut meter = CostMeter::default();
        let mut r = result(0.30, Some(0.05));
        meter.on_result(&mut r, &Value::Null);
        assert_eq!(r.turn_cost_usd, 0.05);
        assert_eq!(r.total_cost_usd, 0.30, "the running total is kept as is");
        assert_eq!(meter.take(), 0.05);
        assert_eq!(meter.take(), 0.0);
    }

    #[test]
    fn without_it_the_running_total_is_differenced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jsonl");
        std::fs::write(
            &path,
            "{\"type\":\"user\",\"message\":\"cost-state\"}\n\
             {\"type\":\"cost-state\",\"totalCostUSD\":0.1}\n\
             {\"type\":\"cost-state\",\"totalCostUSD\":0.2}\n",
        )
        .unwrap();
        assert_eq!(restored_total(&path), 0.2);
        assert_eq!(restored_total(&dir.path().join("missing")), 0.0);
        let mut meter = CostMeter::new(Some(path));
        let costs: Vec<f64> = [0.25, 0.32, 0.40]
            .iter()
            .map(|t| {
                let mut r = result(*t, None);
                meter.on_result(&mut r, &Value::Null);
                (r.turn_cost_usd * 1e6).round() / 1e6
            })
            .collect();
        assert_eq!(costs, vec![0.05, 0.07, 0.08]);
        // A restore that did not happen (the total starts over): all new.
        let mut meter = CostMeter::new(Some(dir.path().join("t.jsonl")));
        let mut r = result(0.03, None);
        meter.on_result(&mut r, &Value::Null);
        assert_eq!(r.turn_cost_usd, 0.03);
    }
}
