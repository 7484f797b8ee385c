//! Context management (issue 14): what the real CLI (2.1.330) does when it
//! compacts, pinned against the mock API, and the worker's compaction at a
//! profile's threshold, on demand and by the CLI itself.

use std::time::Duration;

use claude_worker::protocol::{CompactTrigger, EventBody, EventV1};
use claude_worker::store::SessionStore;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

use crate::common::world::wait_until;
use crate::harness::{cli_pids, Backend, TestEnv};
use crate::mock_api::{Behavior, MockApi, Usage, MOCK_SUMMARY};
use crate::support::{cli_command, user_line};

/// A model with a 200k window, so the mock's usage can fill it.
const MODEL: &str = "claude-sonnet-4-5";
const WINDOW: u64 = 200_000;
const WAIT: Duration = Duration::from_secs(60);

fn usage(input_tokens: u64) -> Usage {
    Usage {
        input_tokens,
        output_tokens: 5,
        cache_creation_input_tokens: 0,
        cache_read_input_tokens: 0,
    }
}

/// A CLI in stream-json mode whose stdin stays open between turns, as the
/// worker's warm processes are.
struct LiveCli {
    _child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl LiveCli {
    /// `model`: `None` for the CLI's default.
    async fn start(mock: &MockApi, home: &std::path::Path, model: Option<&str>) -> LiveCli {
        let model = model.map(|m| format!("--model={m}"));
        let args: Vec<&str> = model.iter().map(String::as_str).collect();
        let mut child = cli_command(mock, home, &args).spawn().expect("spawn CLI");
        LiveCli {
            stdin: child.stdin.take().unwrap(),
            lines: BufReader::new(child.stdout.take().unwrap()).lines(),
            _child: child,
        }
    }

    async fn send(&mut self, line: String) {
        self.stdin.write_all(line.as_bytes()).await.unwrap();
        self.stdin.write_all(b"\n").await.unwrap();
        self.stdin.flush().await.unwrap();
    }

    /// Every line up to and including the first that satisfies `pred`.
    async fn until(&mut self, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut seen = Vec::new();
        let read = async {
            while let Some(l) = self.lines.next_line().await.unwrap() {
                let Ok(v) = serde_json::from_str::<Value>(&l) else {
                    continue;
                };
                let done = pred(&v);
                seen.push(v);
                if done {
                    return;
                }
            }
            panic!("the CLI ended; lines: {seen:#?}");
        };
        tokio::time::timeout(WAIT, read)
            .await
            .expect("the CLI answered in time");
        seen
    }

    /// Sends a user message and returns the turn's lines up to its result.
    async fn turn(&mut self, text: &str) -> Vec<Value> {
        self.send(user_line(text)).await;
        self.until(|v| v["type"] == "result").await
    }

    /// The answer to a `get_context_usage` control request.
    async fn context_usage(&mut self) -> Value {
        let line = json!({"type": "control_request", "request_id": "ctx",
                          "request": {"subtype": "get_context_usage"}});
        self.send(line.to_string()).await;
        let lines = self.until(|v| v["type"] == "control_response").await;
        let r = &lines.last().unwrap()["response"];
        assert_eq!(r["subtype"], "success", "{r}");
        r["response"].clone()
    }
}

fn of_kind<'a>(lines: &'a [Value], kind: &str, subtype: &str) -> Vec<&'a Value> {
    lines
        .iter()
        .filter(|l| l["type"] == kind && l["subtype"] == subtype)
        .collect()
}

/// `/compact` sent as a user message on a warm (stream-json input)
/// process: `system/status` compacting, `system/compact_boundary` with
/// `pre_tokens`/`post_tokens`, a `result` with `num_turns: 0` and no text;
/// one summary request to the API, whose answer must carry `<summary>`
/// tags (without them the CLI asks once more); the next turn continues
/// from the summary. And `get_context_usage` before and after.
#[tokio::test]
async fn the_cli_compacts_on_slash_compact_and_reports_context_usage() {
    let mock = MockApi::start().await;
    let home = tempfile::tempdir().unwrap();
    mock.set_usage(usage(150_000));
    let mut cli = LiveCli::start(&mock, home.path(), Some(MODEL)).await;
    cli.turn("the first question").await;

    let before = cli.context_usage().await;
    assert_eq!(before["totalTokens"], 150_000, "{before}");
    assert_eq!(before["maxTokens"], WINDOW, "{before}");
    assert_eq!(before["percentage"], 75, "{before}");
    // The CLI compacts by itself at its window less a 33k buffer.
    assert_eq!(before["autoCompactThreshold"], WINDOW - 33_000, "{before}");
    assert_eq!(before["isAutoCompactEnabled"], true, "{before}");

    mock.set_usage(usage(10));
    let lines = cli.turn("/compact").await;
    let status: Vec<&Value> = of_kind(&lines, "system", "status");
    assert_eq!(status[0]["status"], "compacting", "{lines:#?}");
    assert!(
        status.iter().any(|s| s["compact_result"] == "success"),
        "{lines:#?}"
    );
    let boundary = of_kind(&lines, "system", "compact_boundary");
    assert_eq!(boundary.len(), 1, "{lines:#?}");
    let meta = &boundary[0]["compact_metadata"];
    assert_eq!(meta["trigger"], "manual");
    assert!(meta["pre_tokens"].as_u64().unwrap() >= 150_000, "{meta}");
    assert!(meta["post_tokens"].as_u64().unwrap() < 10_000, "{meta}");
    let result = lines.last().unwrap();
    assert_eq!(
        (&result["subtype"], &result["num_turns"], &result["result"]),
        (&json!("success"), &json!(0), &json!("")),
        "{result}"
    );
    assert_eq!(result["local_command"], "compact", "{result}");
    assert!(
        !lines.iter().any(|l| l["type"] == "stream_event"),
        "the summary is not streamed as an answer"
    );
    let summary_requests = mock.compaction_requests();
    assert_eq!(summary_requests.len(), 1);
    assert!(summary_requests[0].carries("the first question"));

    let after = cli.context_usage().await;
    assert!(after["totalTokens"].as_u64().unwrap() < 10_000, "{after}");

    cli.turn("after the compaction").await;
    let next = mock.requests().pop().unwrap();
    assert!(next.carries(MOCK_SUMMARY), "{:?}", next.user_texts());
    assert!(!next.carries("the first question"), "{:?}", next.user_texts());

    // An answer without <summary> tags: the CLI asks once more.
    mock.push_compaction_behavior(Behavior::reply("no tags here"));
    cli.turn("/compact").await;
    assert_eq!(mock.compaction_requests().len(), 3);
}

/// The CLI's own autocompact: with its default model (a 1M window), a
/// context past `autoCompactThreshold` is compacted at the start of the
/// next turn (`compact_boundary` with trigger `auto`), and that turn's
/// request continues from the summary. (With claude-sonnet-4-5, 199k of
/// its 200k window did not autocompact in 2.1.330.)
#[tokio::test]
async fn the_cli_autocompacts_past_its_threshold() {
    let mock = MockApi::start().await;
    let home = tempfile::tempdir().unwrap();
    mock.set_usage(usage(980_000));
    let mut cli = LiveCli::start(&mock, home.path(), None).await;
    cli.turn("the first question").await;
    mock.set_usage(usage(10));
    let lines = cli.turn("the second question").await;
    let boundary = of_kind(&lines, "system", "compact_boundary");
    assert_eq!(boundary.len(), 1, "{lines:#?}");
    assert_eq!(boundary[0]["compact_metadata"]["trigger"], "auto");
    let answer = lines.iter().position(|l| l["type"] == "assistant").unwrap();
    let at = lines
        .iter()
        .position(|l| l["subtype"] == "compact_boundary")
        .unwrap();
    assert!(at < answer, "compacted before the turn's answer");
    assert_eq!(mock.compaction_requests().len(), 1);
    let last = mock.requests().pop().unwrap();
    assert!(last.carries(MOCK_SUMMARY));
    assert!(last.carries("the second question"));
}
