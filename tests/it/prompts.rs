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

use std::path::PathBuf;

use claude_worker::config::PermissionPrompts;
use claude_worker::protocol::{
    ControlOutcome, ControlResultV1, ErrorKind, EventBody, EventV1, PermissionBehavior,
    PromptQuestion, ResolvedBy,
};
use claude_worker::worker::Worker;

use crate::harness::{Backend, TestEnv};
use crate::pipeline::{assert_contiguous, completed, on_both_backends};

on_both_backends!(
    a_person_allows_or_denies_a_tool_call,
    a_worker_killed_while_waiting_retries_and_asks_again,
);

/// A worker whose profiles ask a person, who has `timeout_secs`.
async fn asking_worker(env: &TestEnv, timeout_secs: u64) -> Worker {
    env.start_worker_with(|s| asking(s, timeout_secs)).await
}

fn asking(s: &mut claude_worker::config::Settings, timeout_secs: u64) {
    for p in s.profiles.values_mut() {
        p.permission_prompts = PermissionPrompts::Ask;
        p.permission_timeout_secs = timeout_secs;
    }
}

async fn stop(env: TestEnv, worker: Worker) {
    worker.shutdown();
    worker.wait().await.unwrap();
    env.cleanup().await;
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

/// A job waiting on its first prompt, and its events so far.
struct Asked {
    job: String,
    seen: Vec<EventV1>,
    prompt: Prompt,
}

/// The prompt of every test job: `[[mock:KEY]] go`, in session `ask:KEY`.
fn prompt_of(key: &str) -> String {
    format!("[[mock:{key}]] go")
}

/// Publishes a job in session `ask:KEY` whose turn calls `tool` with
/// `input`, and reads its events up to the prompt.
async fn ask(env: &mut TestEnv, key: &str, tool: &str, input: Value) -> Asked {
    ask_then(env, key, tool, input, None).await
}

/// [`ask`], with what the mock answers once the tool ran (else it echoes).
async fn ask_then(
    env: &mut TestEnv,
    key: &str,
    tool: &str,
    input: Value,
    then: Option<Behavior>,
) -> Asked {
    env.mock
        .push_behavior_for(key, Behavior::tool_use(tool, input));
    if let Some(b) = then {
        env.mock.push_behavior_for(key, b);
    }
    let job = env
        .publish_job(&format!("ask:{key}"), &prompt_of(key), json!({}))
        .await;
    let mut seen = Vec::new();
    let prompt = next_prompt(env, &job, &mut seen).await;
    Asked { job, seen, prompt }
}

/// A file in the working directory of session `ask:KEY`.
fn in_session(env: &TestEnv, key: &str, name: &str) -> PathBuf {
    let workdir = env.settings().profiles["default"].workdir.clone();
    claude_worker::session_dir(&workdir, &format!("ask:{key}")).join(name)
}

/// The rest of `job`'s events, appended to `seen`.
async fn finish(env: &mut TestEnv, job: &str, mut seen: Vec<EventV1>) -> Vec<EventV1> {
    seen.extend(env.events_until_terminal(job).await);
    assert_contiguous(&seen);
    seen
}

type Resolution = (String, PermissionBehavior, ResolvedBy, Option<String>);

fn resolved(events: &[EventV1]) -> Vec<Resolution> {
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

/// Publishes a control message and returns its result.
async fn control(env: &mut TestEnv, body: Value) -> ControlResultV1 {
    env.publish_control(body).await;
    env.next_control_result().await
}

fn outcome(r: &ControlResultV1) -> (bool, ControlOutcome) {
    (r.ok, r.outcome)
}

/// The last tool result the mock saw for `key`'s requests.
fn last_tool_result(env: &TestEnv, key: &str) -> Value {
    let reqs = env.mock.requests_for(key);
    let results = reqs.last().expect("a request").tool_results();
    results.last().cloned().expect("a tool result")
}

const ANSWERED: (bool, ControlOutcome) = (true, ControlOutcome::Answered);

/// Allow: the tool runs (the file appears) and the turn completes; an
/// unknown request id is refused while the prompt waits. Deny: the tool
/// result is an error carrying the message, and a second answer to the
/// same prompt is refused as already settled.
async fn a_person_allows_or_denies_a_tool_call(backend: Backend) {
    let mut env = TestEnv::new(backend).await;
    let worker = asking_worker(&env, 120).await;

    let file = in_session(&env, "allow", "made.txt");
    let path = file.display().to_string();
    let input = json!({"file_path": path, "content": "one\ntwo\n"});
    let a = ask(&mut env, "allow", "Write", input).await;
    assert_eq!(a.prompt.tool_name, "Write");
    assert_eq!(a.prompt.summary, format!("{path}: write 2 line(s)"));
    let now = claude_worker::store::now_ms();
    let expires = a.prompt.expires_at_ms;
    assert!(
        expires > now + 100_000 && expires <= now + 120_000,
        "{expires}"
    );
    assert!(!file.exists(), "nothing runs before the answer");

    // An answer for a prompt the job does not have is refused.
    let r = control(&mut env, answer(&a.job, "no-such-prompt", "allow")).await;
    assert_eq!(outcome(&r), (false, ControlOutcome::Unknown), "{r:?}");
    assert!(!file.exists());

    let r = control(&mut env, answer(&a.job, &a.prompt.request_id, "allow")).await;
    assert_eq!(outcome(&r), ANSWERED, "{r:?}");
    let ev = finish(&mut env, &a.job, a.seen).await;
    let by_person = (PermissionBehavior::Allow, ResolvedBy::Person);
    let want = (a.prompt.request_id.clone(), by_person.0, by_person.1, None);
    assert_eq!(resolved(&ev), vec![want]);
    assert_eq!(completed(&ev).0, "echo: [[mock:allow]] go");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "one\ntwo\n");
    // Answering a finished job's prompt again: refused.
    let r = control(&mut env, answer(&a.job, &a.prompt.request_id, "deny")).await;
    assert!(!r.ok, "{r:?}");
    let late = [ControlOutcome::AlreadyFinished, ControlOutcome::Refused];
    assert!(late.contains(&r.outcome), "{r:?}");

    // Deny, with the follow-up held so the turn is still running when the
    // same prompt is answered again.
    let refused = in_session(&env, "deny", "refused.txt");
    let command = format!("echo no > {}", refused.display());
    let held = Some(Behavior::hold("understood, not running it"));
    let a = ask_then(&mut env, "deny", "Bash", json!({"command": command}), held).await;
    assert_eq!(a.prompt.tool_name, "Bash");
    assert_eq!(a.prompt.summary, command, "the whole command");
    let mut deny = answer(&a.job, &a.prompt.request_id, "deny");
    deny["message"] = json!("a person said no");
    let r = control(&mut env, deny).await;
    assert_eq!(outcome(&r), ANSWERED, "{r:?}");
    env.mock.wait_for_held(1, WAIT).await;
    let r = control(&mut env, answer(&a.job, &a.prompt.request_id, "allow")).await;
    assert_eq!(outcome(&r), (false, ControlOutcome::Refused), "{r:?}");
    env.mock.release_held();
    let ev = finish(&mut env, &a.job, a.seen).await;
    let said = Some("a person said no".to_string());
    let want = (
        a.prompt.request_id.clone(),
        PermissionBehavior::Deny,
        ResolvedBy::Person,
        said,
    );
    assert_eq!(resolved(&ev), vec![want]);
    assert_eq!(completed(&ev).0, "understood, not running it");
    assert!(!refused.exists(), "a denied command never runs");
    let result = last_tool_result(&env, "deny");
    assert_eq!(result["is_error"], true, "{result}");
    assert!(result.to_string().contains("a person said no"), "{result}");

    stop(env, worker).await;
}

/// An edited input (`updated_input`) is what the tool runs with: the file
/// gets the edited content, and the command that ran is the edited one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_input_is_what_runs() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let worker = asking_worker(&env, 120).await;

    let file = in_session(&env, "edit", "notes.txt");
    let path = file.display().to_string();
    let input = json!({"file_path": path, "content": "as Claude wrote it\n"});
    let a = ask(&mut env, "edit", "Write", input).await;
    let mut body = answer(&a.job, &a.prompt.request_id, "allow");
    body["updated_input"] = json!({"file_path": path, "content": "as a person edited it\n"});
    assert_eq!(outcome(&control(&mut env, body).await), ANSWERED);
    let ev = finish(&mut env, &a.job, a.seen).await;
    assert_eq!(completed(&ev).0, "echo: [[mock:edit]] go");
    let written = std::fs::read_to_string(&file).unwrap();
    assert_eq!(written, "as a person edited it\n");

    // Bash: the command Claude asked for never runs; the edited one does,
    // and its output is what the mock got back as the tool result.
    // (Commands that write a file: a plain `echo` runs without asking.)
    let asked = in_session(&env, "cmd", "a.txt");
    let edited = in_session(&env, "cmd", "b.txt");
    let command = format!("echo claude-wrote-this > {}", asked.display());
    let a = ask(&mut env, "cmd", "Bash", json!({"command": command})).await;
    assert_eq!(a.prompt.summary, command);
    let mut body = answer(&a.job, &a.prompt.request_id, "allow");
    let command = format!("echo a-person-edited-this | tee {}", edited.display());
    body["updated_input"] = json!({"command": command});
    assert_eq!(outcome(&control(&mut env, body).await), ANSWERED);
    let ev = finish(&mut env, &a.job, a.seen).await;
    assert_eq!(completed(&ev).0, "echo: [[mock:cmd]] go");
    let result = last_tool_result(&env, "cmd");
    let text = result.to_string();
    assert_ne!(result["is_error"], true, "{result}");
    assert!(text.contains("a-person-edited-this"), "{result}");
    assert!(!text.contains("claude-wrote-this"), "{result}");
    assert!(!asked.exists(), "the command Claude asked for never ran");
    let written = std::fs::read_to_string(&edited).unwrap();
    assert_eq!(written, "a-person-edited-this\n");

    stop(env, worker).await;
}

/// "Allow for this session": the same tool call in the session's next
/// turns does not ask again — on the warm process, and after a cold
/// resume on a new worker. (The test removes the file the call makes
/// before each turn, to see that the call ran.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_for_session_holds_warm_and_after_a_cold_resume() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let worker = asking_worker(&env, 120).await;
    let file = in_session(&env, "grant", "made");
    let call = json!({"command": format!("touch {}", file.display())});
    let a = ask(&mut env, "grant", "Bash", call.clone()).await;
    let mut body = answer(&a.job, &a.prompt.request_id, "allow");
    body["allow_for_session"] = json!(true);
    assert_eq!(outcome(&control(&mut env, body).await), ANSWERED);
    let ev = finish(&mut env, &a.job, a.seen).await;
    assert_eq!(completed(&ev).0, "echo: [[mock:grant]] go");
    assert!(file.exists());

    // The next turn, on the session's warm process, then after a cold
    // resume on a new worker: the call runs without a prompt.
    let mut worker = worker;
    for cold in [false, true] {
        if cold {
            worker.shutdown();
            worker.wait().await.unwrap();
            worker = asking_worker(&env, 120).await;
        }
        std::fs::remove_file(&file).unwrap();
        env.mock
            .push_behavior_for("grant", Behavior::tool_use("Bash", call.clone()));
        let job = env
            .publish_job("ask:grant", &prompt_of("grant"), json!({}))
            .await;
        let mut ev = Vec::new();
        loop {
            let (_, e) = env.next_event(&job).await;
            let asked = matches!(e.body, EventBody::PermissionRequest { .. });
            assert!(!asked, "asked again (cold: {cold}): {ev:#?} {e:#?}");
            let end = e.body.is_terminal();
            ev.push(e);
            if end {
                break;
            }
        }
        assert_eq!(completed(&ev).0, "echo: [[mock:grant]] go");
        assert!(file.exists(), "the call ran (cold: {cold})");
        let resumed = |e: &EventV1| matches!(e.body, EventBody::Started { resumed: true, .. });
        assert!(ev.iter().any(resumed), "{ev:#?}");
        let warm = worker.context.warm.stats();
        let want = if cold { (1, 0) } else { (1, 1) };
        assert_eq!((warm.spawns, warm.hits), want, "cold: {cold}: {warm:?}");
    }

    stop(env, worker).await;
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
            asking(s, 10);
        })
        .await;
    let a = ask(&mut env, "late", "Bash", json!({"command": "touch late"})).await;
    let asked = std::time::Instant::now();
    let ev = finish(&mut env, &a.job, a.seen).await;
    let waited = asked.elapsed();
    let message = "nobody answered the permission prompt within 10 s".to_string();
    let by = (PermissionBehavior::Deny, ResolvedBy::Timeout);
    let want = (a.prompt.request_id, by.0, by.1, Some(message.clone()));
    assert_eq!(resolved(&ev), vec![want]);
    assert!(waited >= Duration::from_secs(9), "{waited:?}");
    assert_eq!(completed(&ev).0, "echo: [[mock:late]] go");
    let result = last_tool_result(&env, "late");
    assert_eq!(result["is_error"], true, "{result}");
    assert!(result.to_string().contains(&message), "{result}");

    stop(env, worker).await;
}

/// A cancel while a prompt waits: the prompt is resolved as cancelled,
/// then the job ends `cancelled`; a late answer is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_while_waiting_resolves_the_prompt() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let worker = asking_worker(&env, 120).await;
    let a = ask(&mut env, "stop", "Bash", json!({"command": "touch never"})).await;
    let r = control(&mut env, json!({"v": 1, "type": "cancel", "job_id": a.job})).await;
    assert_eq!(outcome(&r), (true, ControlOutcome::Cancelled), "{r:?}");
    let ev = finish(&mut env, &a.job, a.seen).await;
    let why = Some("the turn was cancelled".to_string());
    let want = (
        a.prompt.request_id.clone(),
        PermissionBehavior::Deny,
        ResolvedBy::Cancel,
        why,
    );
    assert_eq!(resolved(&ev), vec![want]);
    let last = &ev.last().unwrap().body;
    assert!(matches!(last, EventBody::Cancelled { .. }), "{ev:#?}");
    let r = control(&mut env, answer(&a.job, &a.prompt.request_id, "allow")).await;
    assert!(!r.ok, "{r:?}");
    let late = [ControlOutcome::AlreadyFinished, ControlOutcome::Refused];
    assert!(late.contains(&r.outcome), "{r:?}");

    stop(env, worker).await;
}

/// `AskUserQuestion`: the questions and options reach the front-end; the
/// person's choice reaches Claude.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_question_is_asked_and_answered_through_the_queue() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let worker = asking_worker(&env, 120).await;
    let a = ask(&mut env, "quiz", "AskUserQuestion", colour_question()).await;
    assert_eq!(a.prompt.tool_name, "AskUserQuestion");
    assert_eq!(a.prompt.summary, "Which colour?");
    let qs = a.prompt.questions.expect("questions");
    assert_eq!(qs.len(), 1);
    assert_eq!(qs[0].question, "Which colour?");
    let labels: Vec<&str> = qs[0].options.iter().map(|o| o.label.as_str()).collect();
    assert_eq!(labels, ["Red", "Blue"]);
    let mut body = answer(&a.job, &a.prompt.request_id, "allow");
    body["answers"] = json!({"Which colour?": "Blue"});
    assert_eq!(outcome(&control(&mut env, body).await), ANSWERED);
    let ev = finish(&mut env, &a.job, a.seen).await;
    assert_eq!(completed(&ev).0, "echo: [[mock:quiz]] go");
    let result = last_tool_result(&env, "quiz").to_string();
    assert!(
        result.contains("\\\"Which colour?\\\"=\\\"Blue\\\""),
        "{result}"
    );

    stop(env, worker).await;
}

fn colour_question() -> Value {
    json!({"questions": [{
        "question": "Which colour?", "header": "Colour", "multiSelect": false,
        "options": [{"label": "Red", "description": "warm"}, {"label": "Blue", "description": "cool"}]
    }]})
}

/// `submit` without a terminal: `--allow-tools` approves (the file
/// appears; `--json` passes the prompt events through), any other tool
/// call that asks is denied and the turn still completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_answers_prompts_without_a_terminal() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let worker = asking_worker(&env, 120).await;

    let file = in_session(&env, "cli1", "yes.txt");
    let write = |file: &PathBuf, content: &str| {
        Behavior::tool_use(
            "Write",
            json!({"file_path": file.display().to_string(), "content": content}),
        )
    };
    env.mock
        .push_behavior_for("cli1", write(&file, "approved\n"));
    let args = [
        "submit",
        "--session",
        "ask:cli1",
        "--json",
        "--allow-tools",
        "Read,Write",
    ];
    let out = crate::submit::run(&env, &[&args[..], &["[[mock:cli1]] write"]].concat()).await;
    assert_eq!(out.code, 0, "{out:?}");
    let events: Vec<EventV1> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let types: Vec<&str> = events.iter().map(|e| e.body.type_name()).collect();
    let pair = ["permission_request", "permission_resolved"];
    assert!(types.windows(2).any(|w| w == pair), "{types:?}");
    let r = resolved(&events);
    let allowed = (PermissionBehavior::Allow, ResolvedBy::Person);
    assert_eq!((r[0].1, r[0].2), allowed);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "approved\n");
    assert!(
        out.stderr.contains("[allowed Write (--allow-tools)"),
        "{out:?}"
    );

    let file = in_session(&env, "cli2", "no.txt");
    env.mock
        .push_behavior_for("cli2", write(&file, "refused\n"));
    let args = ["submit", "--session", "ask:cli2", "--allow-tools", "Read"];
    let out = crate::submit::run(&env, &[&args[..], &["[[mock:cli2]] write"]].concat()).await;
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
    let result = last_tool_result(&env, "cli2");
    assert_eq!(result["is_error"], true, "{result}");
    assert!(
        result.to_string().contains("nobody at the terminal"),
        "{result}"
    );

    stop(env, worker).await;
}

/// A worker (process) SIGKILLed while its prompt waits: the job is retried
/// on another worker, whose attempt first resolves the dead attempt's
/// prompt (`superseded`) and then asks again under a new request id; an
/// answer to the old prompt is refused and never reaches the new one.
async fn a_worker_killed_while_waiting_retries_and_asks_again(backend: Backend) {
    let mut env = TestEnv::new(backend).await;
    let vars = [
        ("PROFILES__DEFAULT__PERMISSION_PROMPTS", "ask".to_string()),
        ("WORKER__LEASE_TTL_SECS", "3".to_string()),
    ];
    let victim = crate::fleet::spawn_worker_logging(&env, 0, &vars, "warn");
    crate::fleet::wait_for_consumers(&env, 1).await;
    // The killed attempt's tool call, then the retry's.
    let input = |dir: &std::path::Path| {
        let file = claude_worker::session_dir(dir, "ask:crash").join("after.txt");
        let input = json!({"file_path": file.display().to_string(), "content": "x\n"});
        (file, input)
    };
    let (_, first_input) = input(&env.dir.path().join("worker0/work/default"));
    let first = ask(&mut env, "crash", "Write", first_input).await;
    let mut seen = first.seen;
    assert_eq!(seen.last().unwrap().attempt, 1);
    drop(victim); // SIGKILL; its CLI dies with it.

    let worker = env
        .start_worker_with(|s| {
            s.worker.lease_ttl_secs = 3;
            asking(s, 120);
        })
        .await;
    let (file, second_input) = input(&env.settings().profiles["default"].workdir);
    env.mock
        .push_behavior_for("crash", Behavior::tool_use("Write", second_input));
    let second = next_prompt(&mut env, &first.job, &mut seen).await;
    assert_ne!(second.request_id, first.prompt.request_id);
    let retried = |e: &EventV1| matches!(e.body, EventBody::Retrying { .. });
    assert!(seen.iter().any(retried), "{seen:#?}");
    assert_eq!(seen.last().unwrap().attempt, 2, "{seen:#?}");
    // The dead attempt's prompt was resolved before the new one was asked.
    let message = "the attempt that asked ended without an answer; the job's next attempt \
                   asks again under a new request id if it needs to";
    let by = (PermissionBehavior::Deny, ResolvedBy::Superseded);
    let old = first.prompt.request_id.clone();
    assert_eq!(
        resolved(&seen),
        vec![(old.clone(), by.0, by.1, Some(message.into()))]
    );
    let at = |id: &str| {
        seen.iter().position(|e| match &e.body {
            EventBody::PermissionRequest { request_id, .. }
            | EventBody::PermissionResolved { request_id, .. } => request_id == id,
            _ => false,
        })
    };
    assert!(at(&old) < at(&second.request_id), "{seen:#?}");

    // The old prompt's answer is refused, and does not settle the new one.
    let r = control(&mut env, answer(&first.job, &old, "allow")).await;
    assert_eq!(outcome(&r), (false, ControlOutcome::Refused), "{r:?}");
    assert!(r.message.contains("already settled (superseded)"), "{r:?}");
    assert!(!file.exists());
    let r = control(&mut env, answer(&first.job, &second.request_id, "allow")).await;
    assert_eq!(outcome(&r), ANSWERED, "{r:?}");
    // A job taken over from a dead worker may skip seqs (blocks are
    // reserved per worker); they still only grow.
    seen.extend(env.events_until_terminal(&first.job).await);
    assert!(seen.windows(2).all(|w| w[0].seq < w[1].seq), "{seen:#?}");
    assert_eq!(
        seen.last().unwrap().body.type_name(),
        "completed",
        "{seen:#?}"
    );
    // Every request was followed by its resolution, each exactly once.
    let mut ids: Vec<String> = resolved(&seen).into_iter().map(|r| r.0).collect();
    ids.sort();
    let mut want = vec![old, second.request_id];
    want.sort();
    assert_eq!(ids, want);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "x\n");

    stop(env, worker).await;
}

/// A worker stopped (gracefully) while its prompt waits hands the job
/// back. When the job then ends without another attempt (here its
/// attempts are used up), the prompt is resolved (`superseded`) before the
/// terminal event, and a late answer to it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_ending_after_its_worker_stopped_resolves_the_prompt() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let worker = asking_worker(&env, 120).await;
    let file = in_session(&env, "halt", "never");
    let call = json!({"command": format!("touch {}", file.display())});
    let a = ask(&mut env, "halt", "Bash", call).await;
    worker.shutdown();
    worker.wait().await.unwrap();

    let worker = env
        .start_worker_with(|s| {
            asking(s, 120);
            s.retry.max_attempts = 1;
        })
        .await;
    let mut seen = a.seen;
    seen.extend(env.events_until_terminal(&a.job).await);
    assert!(seen.windows(2).all(|w| w[0].seq < w[1].seq), "{seen:#?}");
    let message = "the attempt that asked ended without an answer, and so did the job";
    let by = (PermissionBehavior::Deny, ResolvedBy::Superseded);
    let want = (
        a.prompt.request_id.clone(),
        by.0,
        by.1,
        Some(message.into()),
    );
    assert_eq!(resolved(&seen), vec![want]);
    let last = &seen.last().unwrap().body;
    let lost = matches!(
        last,
        EventBody::Failed {
            error: ErrorKind::WorkerLost,
            ..
        }
    );
    assert!(lost, "{seen:#?}");
    let before_last = &seen[seen.len() - 2].body;
    assert_eq!(before_last.type_name(), "permission_resolved", "{seen:#?}");
    assert!(!file.exists());
    let r = control(&mut env, answer(&a.job, &a.prompt.request_id, "allow")).await;
    assert_eq!(
        outcome(&r),
        (false, ControlOutcome::AlreadyFinished),
        "{r:?}"
    );

    stop(env, worker).await;
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
            "prompt": prompt_of(key)});
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
        let r = control(&mut env, answer(&job, &prompt.request_id, "allow")).await;
        assert_eq!(outcome(&r), (false, ControlOutcome::Refused), "{r:?}");
        assert!(r.message.contains("without a user_id"), "{r:?}");
        env.bus
            .publish_control_as(answer(&job, &prompt.request_id, "allow"), Some("guest"))
            .await;
        let r = env.next_control_result().await;
        if answerers.is_none() {
            // The publisher answers.
            assert_eq!(outcome(&r), ANSWERED, "{r:?}");
        } else {
            // Only `operator` may; nobody answers, so it is cancelled.
            assert_eq!(outcome(&r), (false, ControlOutcome::Refused), "{r:?}");
            assert!(r.message.contains("as `guest`"), "{r:?}");
            let r = control(&mut env, json!({"v": 1, "type": "cancel", "job_id": job})).await;
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

    stop(env, worker).await;
}

// ------------------------------------------------- a broker restart

/// A prompt pending while RabbitMQ restarts (a broker node of the test's
/// own): the worker keeps waiting, the answer published once the broker is
/// back reaches it, and the turn completes with the allowed call run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_waits_through_a_broker_restart() {
    use crate::common::broker_node::BrokerNode;
    use crate::common::tap::{producer, publish, tap};
    use claude_worker::broker::Topology;
    use claude_worker::config::Secret;

    const REPLY_KEY: &str = "prompt.replies";
    let node = BrokerNode::start().await;
    let env = TestEnv::new(Backend::Sqlite).await;
    let url = node.url();
    let topo = Topology::from_prefix(&env.prefix, "prompt");
    let mut rx = tap(url.clone(), topo.clone(), format!("{}.tap", env.prefix));
    let mut s = env.settings();
    s.amqp.url = Secret::new(url.as_str());
    asking(&mut s, 120);
    s.validate().unwrap();
    let worker = Worker::start(s).await.expect("worker starts");

    let file = in_session(&env, "bounce", "after.txt");
    let input = json!({"file_path": file.display().to_string(), "content": "survived\n"});
    env.mock
        .push_behavior_for("bounce", Behavior::tool_use("Write", input));
    let job = uuid::Uuid::new_v4().to_string();
    let body =
        json!({"v": 1, "job_id": job, "session_key": "ask:bounce", "prompt": prompt_of("bounce")});
    let ch = producer(&url, &topo).await;
    let (jobs, key) = (&topo.jobs_exchange, &topo.jobs_routing_key);
    publish(&ch, jobs, key, REPLY_KEY, &body).await;
    let mut seen: Vec<Value> = Vec::new();
    let mut next = async || {
        let got = tokio::time::timeout(WAIT, rx.recv()).await;
        let (raw, _) = got.expect("no reply within WAIT").expect("the tap runs");
        crate::schema::assert_valid_reply(&raw);
        raw
    };
    let request_id = loop {
        let raw = next().await;
        seen.push(raw.clone());
        if raw["type"] == "permission_request" {
            break raw["request_id"].as_str().unwrap().to_string();
        }
    };

    node.stop_app().await;
    // The outage lasts a few seconds (the scenario, not a synchronisation).
    tokio::time::sleep(Duration::from_secs(3)).await;
    node.start_app().await;
    assert!(!file.exists(), "nothing ran without an answer");
    // A control message reaches the workers whose (exclusive) control
    // queues are bound: wait for the worker's to be declared again.
    let control_queue = format!("{}.private.", topo.control_exchange);
    crate::common::world::wait_until_async("the worker's control queue is back", || async {
        let queues = node.ctl(&["list_queues", "-q", "name", "consumers"]).await;
        queues
            .lines()
            .any(|l| l.starts_with(&control_queue) && !l.ends_with("\t0"))
    })
    .await;

    let ch = producer(&url, &topo).await;
    let allow = answer(&job, &request_id, "allow");
    publish(&ch, &topo.control_exchange, "", REPLY_KEY, &allow).await;
    let mut result = None;
    while result.is_none() || !seen.last().is_some_and(|e| e["type"] == "completed") {
        let raw = next().await;
        match raw["type"].as_str() {
            Some("control_result") => result = Some(raw),
            Some(t) if t.starts_with("session.") => {}
            _ => seen.push(raw),
        }
    }
    let result = result.unwrap();
    assert_eq!(
        (&result["ok"], &result["outcome"]),
        (&json!(true), &json!("answered")),
        "{result}"
    );
    let settled: Vec<&Value> = seen
        .iter()
        .filter(|e| e["type"] == "permission_resolved")
        .collect();
    assert_eq!(settled.len(), 1, "{seen:#?}");
    assert_eq!(settled[0]["request_id"], request_id.as_str());
    assert_eq!(
        (&settled[0]["by"], &settled[0]["behavior"]),
        (&json!("person"), &json!("allow"))
    );
    assert_eq!(seen.last().unwrap()["result"], "echo: [[mock:bounce]] go");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "survived\n");

    worker.shutdown();
    tokio::time::timeout(WAIT, worker.wait())
        .await
        .expect("the worker stops")
        .expect("cleanly");
    drop(rx);
    env.cleanup().await;
    drop(node);
}

// ------------------------------------------- `submit` on a terminal

/// A pseudo-terminal: `submit` gets its slave as stdin and stderr (where it
/// asks), the test reads and types on the master.
struct Tty {
    master: std::fs::File,
    slave: std::os::fd::OwnedFd,
    /// What the terminal showed so far.
    shown: String,
    chunks: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl Tty {
    fn open() -> Tty {
        use std::os::fd::FromRawFd;
        use std::ptr;
        let (mut m, mut s) = (0, 0);
        // SAFETY: openpty writes two new descriptors into m and s.
        let rc =
            unsafe { libc::openpty(&mut m, &mut s, ptr::null_mut(), ptr::null(), ptr::null()) };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        for fd in [m, s] {
            // Not inherited by the CLIs other tests start meanwhile.
            // SAFETY: fd is ours and open.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
        // SAFETY: both descriptors are open and owned by nobody else.
        let (master, slave) = unsafe {
            (
                std::fs::File::from_raw_fd(m),
                std::os::fd::OwnedFd::from_raw_fd(s),
            )
        };
        let mut reader = master.try_clone().unwrap();
        let (tx, chunks) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 4096];
            // Ends with EIO once no process has the terminal open.
            while let Ok(n @ 1..) = reader.read(&mut buf) {
                if tx
                    .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                    .is_err()
                {
                    break;
                }
            }
        });
        Tty {
            master,
            slave,
            shown: String::new(),
            chunks,
        }
    }

    /// Starts `claude-worker` with the terminal as its stdin and stderr.
    fn spawn(&self, env: &TestEnv, args: &[&str]) -> tokio::process::Child {
        let stdio = || std::process::Stdio::from(self.slave.try_clone().unwrap());
        let mut cmd = crate::submit::command(env, args);
        cmd.stdin(stdio()).stderr(stdio());
        cmd.spawn().expect("spawn claude-worker")
    }

    /// Waits until the terminal shows `text` (after what was read before).
    async fn expect(&mut self, text: &str) {
        let from = self.shown.len();
        let deadline = tokio::time::Instant::now() + WAIT;
        while !self.shown[from..].contains(text) {
            match tokio::time::timeout_at(deadline, self.chunks.recv()).await {
                Ok(Some(chunk)) => self.shown.push_str(&chunk),
                _ => panic!(
                    "the terminal never showed {text:?}; it showed:\n{}",
                    self.shown
                ),
            }
        }
    }

    fn type_line(&mut self, line: &str) {
        use std::io::Write;
        self.master
            .write_all(format!("{line}\n").as_bytes())
            .unwrap();
    }
}

/// Runs `submit` in session `ask:KEY` on the terminal, answers its prompt
/// (shown as `asks`) with `typed`, and returns its stdout.
async fn submit_on_tty(env: &TestEnv, tty: &mut Tty, key: &str, asks: &str, typed: &str) -> String {
    let session = format!("ask:{key}");
    let child = tty.spawn(env, &["submit", "--session", &session, &prompt_of(key)]);
    tty.expect(asks).await;
    tty.type_line(typed);
    let out = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("submit exits")
        .unwrap();
    assert!(out.status.success(), "{out:?}\n{}", tty.shown);
    String::from_utf8(out.stdout).unwrap()
}

/// `submit` on a terminal asks y / n / a(lways), and shows a question's
/// options to pick by number; each answer reaches the tool call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_asks_on_a_terminal() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let worker = asking_worker(&env, 120).await;
    let mut tty = Tty::open();
    const ALLOW: &str = "allow? [y]es / [n]o / [a]lways this session: ";
    let write = |key: &str, name: &str| {
        let file = in_session(&env, key, name);
        let input = json!({"file_path": file.display().to_string(), "content": "typed\n"});
        env.mock
            .push_behavior_for(key, Behavior::tool_use("Write", input));
        file
    };

    // y: the call runs.
    let file = write("tty-y", "yes.txt");
    let out = submit_on_tty(&env, &mut tty, "tty-y", ALLOW, "y").await;
    assert!(
        tty.shown.contains("? Claude wants to use Write:"),
        "{}",
        tty.shown
    );
    assert!(out.ends_with("\necho: [[mock:tty-y]] go\n"), "{out}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "typed\n");

    // n: it does not, and Claude is told so.
    let file = write("tty-n", "no.txt");
    let out = submit_on_tty(&env, &mut tty, "tty-n", ALLOW, "n").await;
    assert!(out.ends_with("\necho: [[mock:tty-n]] go\n"), "{out}");
    assert!(!file.exists());
    let result = last_tool_result(&env, "tty-n");
    assert_eq!(result["is_error"], true, "{result}");
    assert!(
        result.to_string().contains("denied at the terminal"),
        "{result}"
    );

    // a: the call runs, and the session's next turn makes it again without
    // asking (run without a terminal: a prompt would be denied).
    let file = in_session(&env, "tty-a", "made");
    let call = json!({"command": format!("touch {}", file.display())});
    let touch = || Behavior::tool_use("Bash", call.clone());
    env.mock.push_behavior_for("tty-a", touch());
    submit_on_tty(&env, &mut tty, "tty-a", ALLOW, "a").await;
    assert!(file.exists());
    std::fs::remove_file(&file).unwrap();
    env.mock.push_behavior_for("tty-a", touch());
    let args = ["submit", "--session", "ask:tty-a", "[[mock:tty-a]] again"];
    let out = crate::submit::run(&env, &args).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(!out.stderr.contains("[denied"), "{out:?}");
    assert!(file.exists(), "the call ran again without asking: {out:?}");

    // A question: its options, picked by number.
    env.mock.push_behavior_for(
        "tty-q",
        Behavior::tool_use("AskUserQuestion", colour_question()),
    );
    let out = submit_on_tty(
        &env,
        &mut tty,
        "tty-q",
        "a number or your own answer: ",
        "2",
    )
    .await;
    assert!(tty.shown.contains("? Which colour?"), "{}", tty.shown);
    assert!(
        tty.shown.contains("1. Red — warm") && tty.shown.contains("2. Blue — cool"),
        "{}",
        tty.shown
    );
    assert!(out.ends_with("\necho: [[mock:tty-q]] go\n"), "{out}");
    let result = last_tool_result(&env, "tty-q").to_string();
    assert!(
        result.contains("\\\"Which colour?\\\"=\\\"Blue\\\""),
        "{result}"
    );

    stop(env, worker).await;
}
