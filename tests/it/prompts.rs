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
        let args = [
            "--permission-prompt-tool",
            "stdio",
            "--permission-mode",
            "default",
        ];
        let mut child = cli_command(mock, home, &args)
            .spawn()
            .expect("spawn the CLI");
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
    assert!(
        tool_results[0].to_string().contains("Blue"),
        "{tool_results:?}"
    );
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

// ------------------------------------------------------------ the worker

use claude_worker::config::PermissionPrompts;
use claude_worker::protocol::{
    ControlOutcome, EventBody, EventV1, PermissionBehavior, PromptQuestion, ResolvedBy,
};

use crate::harness::{Backend, TestEnv};
use crate::pipeline::{assert_contiguous, completed};

/// A worker whose profiles ask a person, who has `timeout_secs`.
async fn asking_worker(env: &TestEnv, timeout_secs: u64) -> claude_worker::worker::Worker {
    env.start_worker_with(|s| {
        for p in s.profiles.values_mut() {
            p.permission_prompts = PermissionPrompts::Ask;
            p.permission_timeout_secs = timeout_secs;
        }
    })
    .await
}

/// A prompt as the tests look at it.
#[derive(Debug)]
struct Prompt {
    request_id: String,
    tool_name: String,
    summary: String,
    questions: Option<Vec<PromptQuestion>>,
    expires_at_ms: i64,
}

/// Reads `job`'s events up to its next `permission_request`.
async fn next_prompt(env: &mut TestEnv, job: &str, seen: &mut Vec<EventV1>) -> Prompt {
    loop {
        let (_, e) = env.next_event(job).await;
        seen.push(e.clone());
        match e.body {
            EventBody::PermissionRequest {
                request_id,
                tool_name,
                summary,
                questions,
                expires_at_ms,
                ..
            } => {
                return Prompt {
                    request_id,
                    tool_name,
                    summary,
                    questions,
                    expires_at_ms,
                }
            }
            b if b.is_terminal() => panic!("{job} ended without a prompt: {seen:#?}"),
            _ => {}
        }
    }
}

/// The rest of `job`'s events, appended to `seen`.
async fn finish(env: &mut TestEnv, job: &str, mut seen: Vec<EventV1>) -> Vec<EventV1> {
    seen.extend(env.events_until_terminal(job).await);
    assert_contiguous(&seen);
    seen
}

fn resolved(events: &[EventV1]) -> Vec<(String, PermissionBehavior, ResolvedBy, Option<String>)> {
    events
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::PermissionResolved {
                request_id,
                behavior,
                by,
                message,
            } => Some((request_id.clone(), *behavior, *by, message.clone())),
            _ => None,
        })
        .collect()
}

fn answer(job: &str, request_id: &str, behavior: &str) -> Value {
    json!({"v": 1, "type": "permission_response", "job_id": job,
        "request_id": request_id, "behavior": behavior})
}

/// Allow: the tool runs (the file appears) and the turn completes; an
/// unknown request id is refused while the prompt waits. Deny: the tool
/// result is an error carrying the message, and a second answer to the
/// same prompt is refused as already settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_allows_or_denies_a_tool_call() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let worker = asking_worker(&env, 120).await;
    let workdir = env.settings().profiles["default"].workdir.clone();

    let cwd = claude_worker::session_dir(&workdir, "ask:allow");
    let file = cwd.join("made.txt");
    let path = file.display().to_string();
    env.mock.push_behavior_for(
        "allow",
        Behavior::tool_use("Write", json!({"file_path": path, "content": "one\ntwo\n"})),
    );
    let job = env
        .publish_job("ask:allow", "[[mock:allow]] write it", json!({}))
        .await;
    let mut seen = Vec::new();
    let prompt = next_prompt(&mut env, &job, &mut seen).await;
    assert_eq!(prompt.tool_name, "Write");
    assert_eq!(prompt.summary, format!("{path}: write 2 line(s)"));
    let now = claude_worker::store::now_ms();
    assert!(
        prompt.expires_at_ms > now + 100_000 && prompt.expires_at_ms <= now + 120_000,
        "{prompt:?}"
    );
    assert!(!file.exists(), "nothing runs before the answer");

    // An answer for a prompt the job does not have is refused.
    env.publish_control(answer(&job, "no-such-prompt", "allow"))
        .await;
    let r = env.next_control_result().await;
    assert_eq!((r.ok, r.outcome), (false, ControlOutcome::Unknown), "{r:?}");
    assert!(!file.exists());

    env.publish_control(answer(&job, &prompt.request_id, "allow"))
        .await;
    let r = env.next_control_result().await;
    assert_eq!((r.ok, r.outcome), (true, ControlOutcome::Answered), "{r:?}");
    let ev = finish(&mut env, &job, seen).await;
    assert_eq!(
        resolved(&ev),
        vec![(
            prompt.request_id.clone(),
            PermissionBehavior::Allow,
            ResolvedBy::Person,
            None
        )]
    );
    assert_eq!(completed(&ev).0, "echo: [[mock:allow]] write it");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "one\ntwo\n");
    // Answering a finished job's prompt again: refused (as settled, if the
    // worker has not yet let go of the job after its terminal event).
    env.publish_control(answer(&job, &prompt.request_id, "deny"))
        .await;
    let r = env.next_control_result().await;
    assert!(!r.ok, "{r:?}");
    assert!(
        matches!(
            r.outcome,
            ControlOutcome::AlreadyFinished | ControlOutcome::Refused
        ),
        "{r:?}"
    );

    // Deny, with the follow-up held so the turn is still running when the
    // same prompt is answered again.
    let cwd = claude_worker::session_dir(&workdir, "ask:deny");
    let refused = cwd.join("refused.txt");
    env.mock.push_behavior_for(
        "deny",
        Behavior::tool_use(
            "Bash",
            json!({"command": format!("echo no > {}", refused.display())}),
        ),
    );
    env.mock
        .push_behavior_for("deny", Behavior::hold("understood, not running it"));
    let job = env
        .publish_job("ask:deny", "[[mock:deny]] run it", json!({}))
        .await;
    let mut seen = Vec::new();
    let prompt = next_prompt(&mut env, &job, &mut seen).await;
    assert_eq!(prompt.tool_name, "Bash");
    assert_eq!(
        prompt.summary,
        format!("echo no > {}", refused.display()),
        "the whole command"
    );
    let mut deny = answer(&job, &prompt.request_id, "deny");
    deny["message"] = json!("a person said no");
    env.publish_control(deny.clone()).await;
    let r = env.next_control_result().await;
    assert_eq!((r.ok, r.outcome), (true, ControlOutcome::Answered), "{r:?}");
    env.mock.wait_for_held(1, WAIT).await;
    env.publish_control(answer(&job, &prompt.request_id, "allow"))
        .await;
    let r = env.next_control_result().await;
    assert_eq!((r.ok, r.outcome), (false, ControlOutcome::Refused), "{r:?}");
    env.mock.release_held();
    let ev = finish(&mut env, &job, seen).await;
    assert_eq!(
        resolved(&ev),
        vec![(
            prompt.request_id.clone(),
            PermissionBehavior::Deny,
            ResolvedBy::Person,
            Some("a person said no".into())
        )]
    );
    assert_eq!(completed(&ev).0, "understood, not running it");
    assert!(!refused.exists(), "a denied command never runs");
    let results = env.mock.requests_for("deny").last().unwrap().tool_results();
    assert_eq!(results.len(), 1, "{results:?}");
    assert_eq!(results[0]["is_error"], true, "{results:?}");
    assert!(
        results[0].to_string().contains("a person said no"),
        "{results:?}"
    );

    worker.shutdown();
    worker.wait().await.unwrap();
    env.cleanup().await;
}

/// Nobody answers: the call is denied with a message once the profile's
/// timeout passes, and the wait (longer than the turn timeout) does not
/// time the turn out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_prompt_is_denied_after_the_timeout() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let worker = env
        .start_worker_with(|s| {
            s.claude.turn_timeout_secs = 8;
            for p in s.profiles.values_mut() {
                p.permission_prompts = PermissionPrompts::Ask;
                p.permission_timeout_secs = 10;
            }
        })
        .await;
    env.mock.push_behavior_for(
        "late",
        Behavior::tool_use("Bash", json!({"command": "touch late"})),
    );
    let job = env
        .publish_job("ask:late", "[[mock:late]] run it", json!({}))
        .await;
    let mut seen = Vec::new();
    let prompt = next_prompt(&mut env, &job, &mut seen).await;
    let asked = std::time::Instant::now();
    let ev = finish(&mut env, &job, seen).await;
    let waited = asked.elapsed();
    let message = "nobody answered the permission prompt within 10 s".to_string();
    assert_eq!(
        resolved(&ev),
        vec![(
            prompt.request_id,
            PermissionBehavior::Deny,
            ResolvedBy::Timeout,
            Some(message.clone())
        )]
    );
    assert!(waited >= Duration::from_secs(9), "{waited:?}");
    assert_eq!(completed(&ev).0, "echo: [[mock:late]] run it");
    let results = env.mock.requests_for("late").last().unwrap().tool_results();
    assert_eq!(results[0]["is_error"], true, "{results:?}");
    assert!(results[0].to_string().contains(&message), "{results:?}");

    worker.shutdown();
    worker.wait().await.unwrap();
    env.cleanup().await;
}

/// A cancel while a prompt waits: the prompt is resolved as cancelled,
/// then the job ends `cancelled`; a late answer is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_while_waiting_resolves_the_prompt() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let worker = asking_worker(&env, 120).await;
    env.mock.push_behavior_for(
        "stop",
        Behavior::tool_use("Bash", json!({"command": "touch never"})),
    );
    let job = env
        .publish_job("ask:stop", "[[mock:stop]] run it", json!({}))
        .await;
    let mut seen = Vec::new();
    let prompt = next_prompt(&mut env, &job, &mut seen).await;
    env.publish_control(json!({"v": 1, "type": "cancel", "job_id": job}))
        .await;
    let r = env.next_control_result().await;
    assert_eq!(
        (r.ok, r.outcome),
        (true, ControlOutcome::Cancelled),
        "{r:?}"
    );
    let ev = finish(&mut env, &job, seen).await;
    assert_eq!(
        resolved(&ev),
        vec![(
            prompt.request_id.clone(),
            PermissionBehavior::Deny,
            ResolvedBy::Cancel,
            Some("the turn was cancelled".into())
        )]
    );
    assert!(
        matches!(ev.last().unwrap().body, EventBody::Cancelled { .. }),
        "{ev:#?}"
    );
    env.publish_control(answer(&job, &prompt.request_id, "allow"))
        .await;
    let r = env.next_control_result().await;
    assert!(!r.ok, "{r:?}");
    assert!(
        matches!(
            r.outcome,
            ControlOutcome::AlreadyFinished | ControlOutcome::Refused
        ),
        "{r:?}"
    );

    worker.shutdown();
    worker.wait().await.unwrap();
    env.cleanup().await;
}

/// `AskUserQuestion`: the questions and options reach the front-end; the
/// person's choice reaches Claude.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_question_is_asked_and_answered_through_the_queue() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let worker = asking_worker(&env, 120).await;
    let questions = json!([{
        "question": "Which colour?", "header": "Colour", "multiSelect": false,
        "options": [{"label": "Red", "description": "warm"}, {"label": "Blue", "description": "cool"}]
    }]);
    env.mock.push_behavior_for(
        "quiz",
        Behavior::tool_use("AskUserQuestion", json!({"questions": questions})),
    );
    let job = env
        .publish_job("ask:quiz", "[[mock:quiz]] pick one", json!({}))
        .await;
    let mut seen = Vec::new();
    let prompt = next_prompt(&mut env, &job, &mut seen).await;
    assert_eq!(prompt.tool_name, "AskUserQuestion");
    assert_eq!(prompt.summary, "Which colour?");
    let qs = prompt.questions.expect("questions");
    assert_eq!(qs.len(), 1);
    assert_eq!(qs[0].question, "Which colour?");
    let labels: Vec<&str> = qs[0].options.iter().map(|o| o.label.as_str()).collect();
    assert_eq!(labels, ["Red", "Blue"]);
    let mut a = answer(&job, &prompt.request_id, "allow");
    a["answers"] = json!({"Which colour?": "Blue"});
    env.publish_control(a).await;
    let r = env.next_control_result().await;
    assert_eq!((r.ok, r.outcome), (true, ControlOutcome::Answered), "{r:?}");
    let ev = finish(&mut env, &job, seen).await;
    assert_eq!(completed(&ev).0, "echo: [[mock:quiz]] pick one");
    let results = env.mock.requests_for("quiz").last().unwrap().tool_results();
    assert!(
        results[0]
            .to_string()
            .contains("\\\"Which colour?\\\"=\\\"Blue\\\""),
        "{results:?}"
    );

    worker.shutdown();
    worker.wait().await.unwrap();
    env.cleanup().await;
}

/// `submit` without a terminal: `--allow-tools` approves (the file
/// appears; `--json` passes the prompt events through), any other tool
/// call that asks is denied and the turn still completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_answers_prompts_without_a_terminal() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let worker = asking_worker(&env, 120).await;
    let workdir = env.settings().profiles["default"].workdir.clone();

    let file = claude_worker::session_dir(&workdir, "ask:cli1").join("yes.txt");
    env.mock.push_behavior_for(
        "cli1",
        Behavior::tool_use(
            "Write",
            json!({"file_path": file.display().to_string(), "content": "approved\n"}),
        ),
    );
    let out = crate::submit::run(
        &env,
        &[
            "submit",
            "--session",
            "ask:cli1",
            "--json",
            "--allow-tools",
            "Read,Write",
            "[[mock:cli1]] write",
        ],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    let events: Vec<EventV1> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let types: Vec<&str> = events.iter().map(|e| e.body.type_name()).collect();
    assert!(
        types
            .windows(2)
            .any(|w| w == ["permission_request", "permission_resolved"]),
        "{types:?}"
    );
    let r = resolved(&events);
    assert_eq!(
        (r[0].1, r[0].2),
        (PermissionBehavior::Allow, ResolvedBy::Person)
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "approved\n");
    assert!(
        out.stderr.contains("[allowed Write (--allow-tools)"),
        "{out:?}"
    );

    let file = claude_worker::session_dir(&workdir, "ask:cli2").join("no.txt");
    env.mock.push_behavior_for(
        "cli2",
        Behavior::tool_use(
            "Write",
            json!({"file_path": file.display().to_string(), "content": "refused\n"}),
        ),
    );
    let out = crate::submit::run(
        &env,
        &[
            "submit",
            "--session",
            "ask:cli2",
            "--allow-tools",
            "Read",
            "[[mock:cli2]] write",
        ],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.ends_with("\necho: [[mock:cli2]] write\n"),
        "{out:?}"
    );
    assert!(
        out.stderr.contains("[denied Write: not a terminal"),
        "{out:?}"
    );
    assert!(!file.exists());
    let results = env.mock.requests_for("cli2").last().unwrap().tool_results();
    assert_eq!(results[0]["is_error"], true, "{results:?}");
    assert!(
        results[0].to_string().contains("nobody at the terminal"),
        "{results:?}"
    );

    worker.shutdown();
    worker.wait().await.unwrap();
    env.cleanup().await;
}

/// A worker (process) SIGKILLed while its prompt waits: the job is retried
/// on another worker and asks again under a new request id; an answer to
/// the old prompt is refused and never reaches the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_while_waiting_retries_and_asks_again() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let vars = [
        ("PROFILES__DEFAULT__PERMISSION_PROMPTS", "ask".to_string()),
        ("WORKER__LEASE_TTL_SECS", "3".to_string()),
    ];
    let victim = crate::fleet::spawn_worker_logging(&env, 0, &vars, "warn");
    crate::fleet::wait_for_consumers(&env, 1).await;
    // The killed attempt's tool call, then the retry's.
    let input = |dir: &std::path::Path| {
        let file = claude_worker::session_dir(dir, "ask:crash").join("after.txt");
        (
            file.clone(),
            json!({"file_path": file.display().to_string(), "content": "x\n"}),
        )
    };
    let (_, first_input) = input(&env.dir.path().join("worker0/work/default"));
    env.mock
        .push_behavior_for("crash", Behavior::tool_use("Write", first_input));
    let job = env
        .publish_job("ask:crash", "[[mock:crash]] write", json!({}))
        .await;
    let mut seen = Vec::new();
    let first = next_prompt(&mut env, &job, &mut seen).await;
    assert_eq!(seen.last().unwrap().attempt, 1);
    drop(victim); // SIGKILL; its CLI dies with it.

    let worker = env
        .start_worker_with(|s| {
            s.worker.lease_ttl_secs = 3;
            for p in s.profiles.values_mut() {
                p.permission_prompts = PermissionPrompts::Ask;
            }
        })
        .await;
    let workdir = env.settings().profiles["default"].workdir.clone();
    let (file, second_input) = input(&workdir);
    env.mock
        .push_behavior_for("crash", Behavior::tool_use("Write", second_input));
    let second = next_prompt(&mut env, &job, &mut seen).await;
    assert_ne!(second.request_id, first.request_id);
    assert!(
        seen.iter()
            .any(|e| matches!(e.body, EventBody::Retrying { .. })),
        "{seen:#?}"
    );
    assert_eq!(seen.last().unwrap().attempt, 2, "{seen:#?}");

    // The old prompt's answer is refused, and does not settle the new one.
    env.publish_control(answer(&job, &first.request_id, "allow"))
        .await;
    let r = env.next_control_result().await;
    assert_eq!((r.ok, r.outcome), (false, ControlOutcome::Unknown), "{r:?}");
    assert!(!file.exists());
    env.publish_control(answer(&job, &second.request_id, "allow"))
        .await;
    let r = env.next_control_result().await;
    assert_eq!((r.ok, r.outcome), (true, ControlOutcome::Answered), "{r:?}");
    // A job taken over from a dead worker may skip seqs (blocks are
    // reserved per worker); they still only grow.
    seen.extend(env.events_until_terminal(&job).await);
    assert!(seen.windows(2).all(|w| w[0].seq < w[1].seq), "{seen:#?}");
    assert_eq!(
        seen.last().unwrap().body.type_name(),
        "completed",
        "{seen:#?}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "x\n");

    worker.shutdown();
    worker.wait().await.unwrap();
    env.cleanup().await;
}

/// Who may answer: a job published as an AMQP user takes answers from that
/// user only (the broker verifies `user_id`); a job's `prompt_answerers`
/// names them explicitly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_jobs_answerers_may_answer() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let worker = asking_worker(&env, 120).await;
    for (key, answerers) in [("who1", None), ("who2", Some(json!(["operator"])))] {
        env.mock.push_behavior_for(
            key,
            Behavior::tool_use("Bash", json!({"command": "touch answered"})),
        );
        let job = uuid::Uuid::new_v4().to_string();
        let mut body = json!({"v": 1, "job_id": job, "session_key": format!("ask:{key}"),
            "prompt": format!("[[mock:{key}]] run it")});
        if let Some(a) = answerers.clone() {
            body["prompt_answerers"] = a;
        }
        let props = env.bus.job_props().with_user_id("guest".into());
        env.bus
            .publish_with(body.to_string().as_bytes(), props)
            .await;
        let mut seen = Vec::new();
        let prompt = next_prompt(&mut env, &job, &mut seen).await;
        // No user_id: refused.
        env.publish_control(answer(&job, &prompt.request_id, "allow"))
            .await;
        let r = env.next_control_result().await;
        assert_eq!((r.ok, r.outcome), (false, ControlOutcome::Refused), "{r:?}");
        assert!(r.message.contains("without a user_id"), "{r:?}");
        env.bus
            .publish_control_as(answer(&job, &prompt.request_id, "allow"), Some("guest"))
            .await;
        let r = env.next_control_result().await;
        if answerers.is_none() {
            // The publisher answers.
            assert_eq!((r.ok, r.outcome), (true, ControlOutcome::Answered), "{r:?}");
        } else {
            // Only `operator` may; nobody answers, so it is cancelled.
            assert_eq!((r.ok, r.outcome), (false, ControlOutcome::Refused), "{r:?}");
            assert!(r.message.contains("as `guest`"), "{r:?}");
            env.publish_control(json!({"v": 1, "type": "cancel", "job_id": job}))
                .await;
            let r = env.next_control_result().await;
            assert_eq!(r.outcome, ControlOutcome::Cancelled, "{r:?}");
        }
        let ev = finish(&mut env, &job, seen).await;
        let by = resolved(&ev)[0].2;
        let end = ev.last().unwrap().body.type_name();
        match answerers {
            None => assert_eq!((by, end), (ResolvedBy::Person, "completed")),
            Some(_) => assert_eq!((by, end), (ResolvedBy::Cancel, "cancelled")),
        }
    }

    worker.shutdown();
    worker.wait().await.unwrap();
    env.cleanup().await;
}
