//! Permission prompts and questions through the queue (issue 12).
//!
//! First the CLI facts the worker relies on, pinned against the real CLI
//! and the mock API: with `--permission-prompt-tool stdio` in `default`
//! mode a tool call that needs approval becomes a `can_use_tool` control
//! request on stdout, answered by a `control_response` on stdin.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

use crate::mock_api::{Behavior, MockApi};
use crate::support::{cli_command, user_line};

const WAIT: Duration = Duration::from_secs(60);

/// A CLI whose stdin stays open, so control responses can be written.
struct Interactive {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
    seen: Vec<Value>,
}

impl Interactive {
    async fn start(mock: &MockApi, home: &Path, prompt: &str) -> Interactive {
        let args = ["--permission-prompt-tool", "stdio", "--permission-mode", "default"];
        let mut child = cli_command(mock, home, &args).spawn().expect("spawn the CLI");
        let mut stdin = child.stdin.take().expect("piped stdin");
        let lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        stdin
            .write_all(format!("{}\n", user_line(prompt)).as_bytes())
            .await
            .unwrap();
        Interactive {
            child,
            stdin,
            lines,
            seen: Vec::new(),
        }
    }

    async fn read_until(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        let fut = async {
            while let Some(l) = self.lines.next_line().await.expect("read stdout") {
                let Ok(v) = serde_json::from_str::<Value>(&l) else {
                    continue;
                };
                self.seen.push(v.clone());
                if pred(&v) {
                    return v;
                }
            }
            panic!("stdout ended; lines: {:#?}", self.seen)
        };
        match tokio::time::timeout(WAIT, fut).await {
            Ok(v) => v,
            Err(_) => panic!("no matching line; lines: {:#?}", self.seen),
        }
    }

    async fn send(&mut self, v: Value) {
        let line = format!("{v}\n");
        self.stdin.write_all(line.as_bytes()).await.unwrap();
    }

    async fn answer(&mut self, request_id: &Value, response: Value) {
        self.send(json!({"type": "control_response", "response": {
            "subtype": "success", "request_id": request_id, "response": response}}))
            .await;
    }

    async fn close(mut self) {
        drop(self.stdin);
        let _ = tokio::time::timeout(WAIT, self.child.wait()).await;
    }
}

fn is_can_use_tool(v: &Value) -> bool {
    v["type"] == "control_request" && v["request"]["subtype"] == "can_use_tool"
}

fn is_result(v: &Value) -> bool {
    v["type"] == "result"
}

/// Allow (with the input as `updatedInput`) runs the tool; deny (with a
/// message) turns the tool call into an error result carrying the message.
#[tokio::test]
async fn the_cli_asks_over_stdio_and_takes_allow_and_deny() {
    let mock = MockApi::start().await;
    let home = tempfile::tempdir().unwrap();
    let file = home.path().join("made.txt");
    let input = json!({"file_path": file.to_str().unwrap(), "content": "made by a tool\n"});
    mock.push_behavior(Behavior::tool_use("Write", input.clone()));
    mock.push_behavior(Behavior::reply("written"));

    let mut cli = Interactive::start(&mock, home.path(), "write it").await;
    let req = cli.read_until(is_can_use_tool).await;
    eprintln!("can_use_tool request: {req}");
    let r = &req["request"];
    assert!(req["request_id"].is_string(), "{req}");
    assert_eq!(r["tool_name"], "Write", "{req}");
    assert_eq!(r["input"], input, "{req}");
    assert_eq!(r["tool_use_id"], "toolu_mock_0001", "{req}");
    assert!(r["permission_suggestions"].is_array(), "{req}");
    assert!(!file.exists(), "nothing is written before the answer");
    cli.answer(
        &req["request_id"],
        json!({"behavior": "allow", "updatedInput": input}),
    )
    .await;
    let result = cli.read_until(is_result).await;
    assert_eq!(result["result"], "written", "{result}");
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "made by a tool\n",
        "the tool ran after the allow"
    );
    cli.close().await;

    // Deny: the tool result is an error with the message.
    let file2 = home.path().join("refused.txt");
    let input2 = json!({"file_path": file2.to_str().unwrap(), "content": "no\n"});
    mock.push_behavior(Behavior::tool_use("Write", input2));
    mock.push_behavior(Behavior::reply("ok, not writing"));
    let mut cli = Interactive::start(&mock, home.path(), "write another").await;
    let req = cli.read_until(is_can_use_tool).await;
    cli.answer(
        &req["request_id"],
        json!({"behavior": "deny", "message": "a person said no"}),
    )
    .await;
    let result = cli.read_until(is_result).await;
    assert_eq!(result["result"], "ok, not writing", "{result}");
    assert!(!file2.exists());
    let reqs = mock.requests();
    let tool_results = reqs.last().unwrap().tool_results();
    eprintln!("denied tool_result: {tool_results:?}");
    assert_eq!(tool_results.len(), 1);
    assert_eq!(tool_results[0]["is_error"], true, "{tool_results:?}");
    assert!(
        tool_results[0].to_string().contains("a person said no"),
        "{tool_results:?}"
    );
    cli.close().await;
}

/// `AskUserQuestion` comes through the same request; the answer travels
/// back in `updatedInput.answers` (question text → chosen label).
#[tokio::test]
async fn the_cli_asks_a_question_over_stdio() {
    let mock = MockApi::start().await;
    let home = tempfile::tempdir().unwrap();
    let questions = json!([{
        "question": "Which colour?", "header": "Colour", "multiSelect": false,
        "options": [{"label": "Red", "description": "warm"}, {"label": "Blue", "description": "cool"}]
    }]);
    mock.push_behavior(Behavior::tool_use(
        "AskUserQuestion",
        json!({"questions": questions}),
    ));
    mock.push_behavior(Behavior::reply("blue it is"));
    let mut cli = Interactive::start(&mock, home.path(), "ask me").await;
    let req = cli.read_until(is_can_use_tool).await;
    eprintln!("question request: {req}");
    assert_eq!(req["request"]["tool_name"], "AskUserQuestion", "{req}");
    assert_eq!(req["request"]["input"]["questions"], questions, "{req}");
    cli.answer(
        &req["request_id"],
        json!({"behavior": "allow", "updatedInput": {
            "questions": questions, "answers": {"Which colour?": "Blue"}}}),
    )
    .await;
    let result = cli.read_until(is_result).await;
    assert_eq!(result["result"], "blue it is", "{result}");
    let tool_results = mock.requests().last().unwrap().tool_results();
    eprintln!("question tool_result: {tool_results:?}");
    assert!(tool_results[0].to_string().contains("Blue"), "{tool_results:?}");
    assert_ne!(tool_results[0]["is_error"], true, "{tool_results:?}");
    cli.close().await;
}

/// An `interrupt` while a prompt is pending: the CLI cancels its request
/// (`control_cancel_request`) and ends the turn.
#[tokio::test]
async fn an_interrupt_cancels_a_pending_prompt() {
    let mock = MockApi::start().await;
    let home = tempfile::tempdir().unwrap();
    mock.push_behavior(Behavior::tool_use("Bash", json!({"command": "touch x"})));
    let mut cli = Interactive::start(&mock, home.path(), "run it").await;
    let req = cli.read_until(is_can_use_tool).await;
    assert_eq!(req["request"]["input"]["command"], "touch x", "{req}");
    cli.send(json!({"type": "control_request", "request_id": "int-1",
        "request": {"subtype": "interrupt"}}))
        .await;
    let id = req["request_id"].clone();
    let cancel = cli
        .read_until(move |v| v["type"] == "control_cancel_request" || is_result(v))
        .await;
    eprintln!("after interrupt: {cancel}");
    assert_eq!(cancel["type"], "control_cancel_request", "{cancel}");
    assert_eq!(cancel["request_id"], id, "{cancel}");
    cli.read_until(is_result).await;
    assert!(!home.path().join("x").exists());
    cli.close().await;
}
