//! End-to-end: RabbitMQ → worker → real Claude CLI → mock API → reply
//! events, on SQLite and on Postgres.

use std::time::Duration;

use claude_worker::protocol::{ErrorKind, EventBody, EventV1};
use claude_worker::store::{now_ms, JobSpec, JobStatus, NewJob};
use serde_json::{json, Value};

use crate::harness::{cli_pids, Backend, TestEnv, WAIT};
use crate::mock_api::Behavior;

/// Generates a `sqlite` and a `postgres` test for each scenario.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name(Backend::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name(Backend::Postgres).await
            }
        }
    )*};
}

pub(crate) use on_both_backends;

on_both_backends!(
    session_modes_stream_and_resume,
    bad_input_is_dead_lettered_and_the_worker_goes_on,
    redelivered_job_id_runs_once,
    api_failure_is_retried_then_completes,
    auth_failure_fails_without_retry,
);

pub(crate) fn assert_contiguous(events: &[EventV1]) {
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    let expected: Vec<u64> = (0..events.len() as u64).collect();
    assert_eq!(seqs, expected, "seq must be contiguous from 0: {events:#?}");
    let terminals = events.iter().filter(|e| e.body.is_terminal()).count();
    assert_eq!(terminals, 1, "exactly one terminal event");
    assert!(
        events.last().unwrap().body.is_terminal(),
        "the terminal event is last"
    );
}

pub(crate) fn text_of(events: &[EventV1], attempt: u32) -> String {
    events
        .iter()
        .filter(|e| e.attempt == attempt)
        .filter_map(|e| match &e.body {
            EventBody::Text { text } => Some(text.as_str()),
            _ => None,
        })
        .collect()
}

pub(crate) fn started(events: &[EventV1]) -> (Option<String>, bool, Option<String>) {
    events
        .iter()
        .rev()
        .find_map(|e| match &e.body {
            EventBody::Started {
                claude_session_id,
                resumed,
                resume_failed,
                ..
            } => Some((claude_session_id.clone(), *resumed, resume_failed.clone())),
            _ => None,
        })
        .expect("a started event")
}

pub(crate) fn completed(events: &[EventV1]) -> (String, Option<String>, u32) {
    match &events.last().unwrap().body {
        EventBody::Completed {
            result,
            claude_session_id,
            num_turns,
            ..
        } => (result.clone(), claude_session_id.clone(), *num_turns),
        other => panic!("expected completed, got {other:?}"),
    }
}

/// Runs one job to its terminal event and checks the stream's shape.
pub(crate) async fn run(env: &mut TestEnv, key: &str, prompt: &str, extra: Value) -> Vec<EventV1> {
    let job = env.publish_job(key, prompt, extra).await;
    let events = env.events_until_terminal(&job).await;
    assert_contiguous(&events);
    events
}

/// The user texts the mock saw in the request that carried `prompt`.
pub(crate) fn conversation_seen(env: &TestEnv, prompt: &str) -> (Vec<String>, Vec<String>) {
    let reqs = env.mock.requests();
    let req = reqs
        .iter()
        .rev()
        .find(|r| r.last_user_text().as_deref() == Some(prompt))
        .unwrap_or_else(|| panic!("the mock saw no request for {prompt:?}"));
    (req.user_texts(), req.assistant_texts())
}

async fn session_modes_stream_and_resume(backend: Backend) {
    let mut env = TestEnv::new(backend).await;
    // This scenario resumes and forks across keys, which a profile must allow.
    let worker = env
        .start_worker_with(|s| {
            s.profiles.get_mut("default").unwrap().resume_other_sessions = true;
        })
        .await;
    let key = "discord:guild1:chan1:user1";

    // A first job streams started → text… → completed with the mock's text.
    let job = env
        .publish_job(key, "hello one", json!({"metadata": {"channel": "c1"}}))
        .await;
    let ev = env.events_until_terminal(&job).await;
    assert_contiguous(&ev);
    assert!(
        matches!(ev[0].body, EventBody::Started { resumed: false, .. }),
        "{:?}",
        ev[0]
    );
    let texts = ev
        .iter()
        .filter(|e| matches!(e.body, EventBody::Text { .. }))
        .count();
    assert!(
        texts >= 2,
        "the answer streams in several text events: {ev:#?}"
    );
    assert_eq!(text_of(&ev, 1), "echo: hello one");
    let (result, id1, turns) = completed(&ev);
    assert_eq!(result, "echo: hello one");
    assert_eq!(turns, 1);
    let id1 = id1.expect("completed carries the Claude session id");
    assert_eq!(started(&ev).0.as_deref(), Some(id1.as_str()));
    assert!(ev
        .iter()
        .all(|e| e.metadata == json!({"channel": "c1"}) && e.attempt == 1));
    assert!(ev.iter().all(|e| e.session_key == key && e.job_id == job));

    // The second job on the key resumes: the mock sees the earlier turn.
    let ev = run(&mut env, key, "hello two", json!({})).await;
    assert_eq!(started(&ev).0.as_deref(), Some(id1.as_str()));
    assert!(started(&ev).1, "resumed");
    assert_eq!(completed(&ev).0, "echo: hello two");
    let (users, assistants) = conversation_seen(&env, "hello two");
    assert_eq!(users, vec!["hello one", "hello two"]);
    assert_eq!(assistants, vec!["echo: hello one"]);

    // `new` starts fresh, and the key then continues the new session.
    let ev = run(
        &mut env,
        key,
        "fresh start",
        json!({"session": {"mode": "new"}}),
    )
    .await;
    let (id3, resumed, _) = started(&ev);
    let id3 = id3.unwrap();
    assert!(!resumed);
    assert_ne!(id3, id1);
    assert_eq!(
        conversation_seen(&env, "fresh start").0,
        vec!["fresh start"]
    );
    let ev = run(&mut env, key, "after reset", json!({})).await;
    assert_eq!(started(&ev).0.as_deref(), Some(id3.as_str()));
    assert_eq!(
        conversation_seen(&env, "after reset").0,
        vec!["fresh start", "after reset"]
    );

    // `resume` by id, from another key.
    let ev = run(
        &mut env,
        "webapp:other",
        "resume by id",
        json!({"session": {"mode": "resume", "claude_session_id": id1}}),
    )
    .await;
    assert_eq!(started(&ev), (Some(id1.clone()), true, None));
    assert_eq!(
        conversation_seen(&env, "resume by id").0,
        vec!["hello one", "hello two", "resume by id"]
    );

    // `fork`: the conversation so far, in a new session the key then follows.
    let ev = run(
        &mut env,
        "fork:key",
        "fork turn",
        json!({"session": {"mode": "fork", "claude_session_id": id3}}),
    )
    .await;
    let fork_id = completed(&ev).1.unwrap();
    assert_ne!(fork_id, id3, "a fork gets its own session id");
    assert_eq!(
        conversation_seen(&env, "fork turn").0,
        vec!["fresh start", "after reset", "fork turn"]
    );
    let ev = run(&mut env, "fork:key", "after fork", json!({})).await;
    assert_eq!(started(&ev).0.as_deref(), Some(fork_id.as_str()));
    assert_eq!(
        conversation_seen(&env, "after fork").0,
        vec!["fresh start", "after reset", "fork turn", "after fork"]
    );
    // The original is untouched by the fork.
    let ev = run(&mut env, key, "original again", json!({})).await;
    assert_eq!(started(&ev).0.as_deref(), Some(id3.as_str()));
    assert_eq!(
        conversation_seen(&env, "original again").0,
        vec!["fresh start", "after reset", "original again"]
    );

    // Resuming an id the CLI does not know starts a new session, and says so.
    let ghost = "0b5a3c1e-1111-4222-8333-444444444444";
    let ev = run(
        &mut env,
        "ghost:key",
        "resume a ghost",
        json!({"session": {"mode": "resume", "claude_session_id": ghost}}),
    )
    .await;
    let (id, resumed, failed) = started(&ev);
    assert!(!resumed);
    assert_ne!(id.as_deref(), Some(ghost));
    assert!(failed.unwrap().contains(ghost));
    assert_eq!(completed(&ev).0, "echo: resume a ghost");

    // The store kept the session's state.
    let session = worker
        .context
        .store
        .get_session(key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(session.claude_session_id.as_deref(), Some(id3.as_str()));
    assert_eq!(session.turns, 5);
    assert!(session.output_tokens > 0);

    worker.shutdown();
    worker.wait().await.unwrap();
    env.cleanup().await;
}

async fn bad_input_is_dead_lettered_and_the_worker_goes_on(backend: Backend) {
    let mut env = TestEnv::new(backend).await;
    let worker = env.start_worker().await;
    let good = |extra: Value| {
        let mut b = json!({"v": 1, "session_key": "bad:input", "prompt": "hi"});
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        b.to_string().into_bytes()
    };
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"\xff\xfe\x00 not utf-8".to_vec(), "not valid UTF-8"),
        (b"{\"v\":1, this is not json".to_vec(), "not valid JSON"),
        (
            json!({"v": 1, "session_key": "k"}).to_string().into_bytes(),
            "missing field `prompt`",
        ),
        (
            json!({"session_key": "k", "prompt": "p"})
                .to_string()
                .into_bytes(),
            "missing field `v`",
        ),
        (good(json!({"v": 2})), "unsupported protocol version"),
        (good(json!({"profile": "nope"})), "unknown profile `nope`"),
        (
            good(json!({"profile": "discord", "options": {"max_turns": 101}})),
            "cap of 100",
        ),
        (
            good(json!({"options": {"permission_mode": "bypassPermissions"}})),
            "ceiling",
        ),
        (
            good(json!({"session": {"mode": "resume"}})),
            "needs `session.claude_session_id`",
        ),
    ];
    for (body, reason) in &cases {
        let id = uuid::Uuid::new_v4().to_string();
        env.publish_raw(body, Some(&id)).await;
        let (dead_body, headers) = env.next_dead_letter().await;
        assert_eq!(&dead_body, body, "the dead letter is the original body");
        let header = headers.get("x-claude-worker-error").expect("reason header");
        assert!(
            header.contains(reason),
            "{header:?} should mention {reason:?}"
        );
        let (raw, event) = env.next_event(&id).await;
        match &event.body {
            EventBody::Failed {
                error,
                message,
                retryable,
            } => {
                assert_eq!(*error, ErrorKind::InvalidInput);
                assert!(!retryable);
                assert_eq!(message, header);
            }
            other => panic!("expected failed, got {other:?}"),
        }
        assert_eq!((event.seq, raw["type"].as_str()), (0, Some("failed")));
    }
    // …and the next good job is served.
    let ev = run(&mut env, "bad:after", "still alive?", json!({})).await;
    assert_eq!(completed(&ev).0, "echo: still alive?");
    worker.shutdown();
    worker.wait().await.unwrap();
    env.cleanup().await;
}

async fn redelivered_job_id_runs_once(backend: Backend) {
    let mut env = TestEnv::new(backend).await;
    let worker = env.start_worker().await;
    let job_id = uuid::Uuid::new_v4().to_string();
    let body = json!({"v": 1, "job_id": job_id, "session_key": "dup:key", "prompt": "only once"})
        .to_string();
    // Three copies while the first is queued or running…
    for _ in 0..3 {
        env.publish_raw(body.as_bytes(), None).await;
    }
    let first = env.events_until_terminal(&job_id).await;
    assert_contiguous(&first);
    // …and one after it finished: its terminal event comes back, unchanged.
    env.publish_raw(body.as_bytes(), None).await;
    let (_, again) = env.next_event(&job_id).await;
    assert_eq!(&again, first.last().unwrap());
    assert!(
        env.maybe_event(&job_id, Duration::from_secs(2))
            .await
            .is_none(),
        "no second run"
    );
    let runs = env
        .mock
        .requests()
        .iter()
        .filter(|r| r.last_user_text().as_deref() == Some("only once"))
        .count();
    assert_eq!(runs, 1, "the CLI ran the job once");
    worker.shutdown();
    worker.wait().await.unwrap();
    env.cleanup().await;
}

async fn api_failure_is_retried_then_completes(backend: Backend) {
    let mut env = TestEnv::new(backend).await;
    let worker = env.start_worker().await;
    let five_hundred = || Behavior::Status {
        code: 500,
        error_type: "api_error".into(),
        message: "mock outage".into(),
    };

    // One failure the CLI gives up on: retrying, then completed.
    env.mock.push_behavior_for("flaky", five_hundred());
    let ev = run(&mut env, "retry:one", "[[mock:flaky]] hi", json!({})).await;
    let retrying: Vec<_> = ev
        .iter()
        .filter(|e| matches!(e.body, EventBody::Retrying { .. }))
        .collect();
    assert_eq!(retrying.len(), 1, "{ev:#?}");
    match &retrying[0].body {
        EventBody::Retrying {
            next_attempt,
            reason,
            ..
        } => {
            assert_eq!(*next_attempt, 2);
            assert!(reason.contains("500"), "{reason}");
        }
        _ => unreachable!(),
    }
    assert_eq!(ev.last().unwrap().attempt, 2);
    assert_eq!(text_of(&ev, 2), "echo: [[mock:flaky]] hi");
    assert_eq!(completed(&ev).0, "echo: [[mock:flaky]] hi");

    // Failures on every attempt: two retries, then failed.
    for _ in 0..3 {
        env.mock.push_behavior_for("down", five_hundred());
    }
    let ev = run(&mut env, "retry:all", "[[mock:down]] hi", json!({})).await;
    let kinds: Vec<&str> = ev
        .iter()
        .map(|e| e.body.type_name())
        .filter(|t| *t != "text")
        .collect();
    assert_eq!(
        kinds,
        vec!["started", "retrying", "started", "retrying", "started", "failed"]
    );
    match &ev.last().unwrap().body {
        EventBody::Failed {
            error, retryable, ..
        } => assert_eq!((*error, *retryable), (ErrorKind::Api, true)),
        _ => unreachable!(),
    }
    let job = worker
        .context
        .store
        .get_job(&ev[0].job_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((job.status, job.attempts), (JobStatus::Failed, 3));

    worker.shutdown();
    worker.wait().await.unwrap();
    env.cleanup().await;
}

async fn auth_failure_fails_without_retry(backend: Backend) {
    let mut env = TestEnv::new(backend).await;
    let worker = env.start_worker().await;
    env.mock.push_behavior_for(
        "auth",
        Behavior::Status {
            code: 401,
            error_type: "authentication_error".into(),
            message: "invalid x-api-key".into(),
        },
    );
    let ev = run(&mut env, "auth:key", "[[mock:auth]] hi", json!({})).await;
    assert!(
        !ev.iter()
            .any(|e| matches!(e.body, EventBody::Retrying { .. })),
        "{ev:#?}"
    );
    match &ev.last().unwrap().body {
        EventBody::Failed {
            error, retryable, ..
        } => assert_eq!((*error, *retryable), (ErrorKind::Auth, false)),
        other => panic!("{other:?}"),
    }
    let calls = env
        .mock
        .requests()
        .iter()
        .filter(|r| r.marker().as_deref() == Some("auth"))
        .count();
    assert_eq!(calls, 1);
    // The key never leaks into events.
    assert!(ev.iter().all(|e| !serde_json::to_string(e)
        .unwrap()
        .contains("sk-test-secret-key")));
    worker.shutdown();
    worker.wait().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_killed_mid_turn_is_retried() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let worker = env.start_worker().await;
    env.mock.push_behavior_for(
        "hold",
        Behavior::Hold {
            text: "never finished".into(),
        },
    );
    let job = env
        .publish_job("kill:key", "[[mock:hold]] hi", json!({}))
        .await;
    env.mock.wait_for_held(1, WAIT).await;
    let pids = cli_pids(&env.prefix);
    assert_eq!(pids.len(), 1, "one CLI process is running: {pids:?}");
    // SAFETY: signalling a process this test started.
    unsafe { libc::kill(pids[0], libc::SIGKILL) };
    let ev = env.events_until_terminal(&job).await;
    assert_contiguous(&ev);
    let reason = ev
        .iter()
        .find_map(|e| match &e.body {
            EventBody::Retrying {
                reason,
                next_attempt: 2,
                ..
            } => Some(reason.clone()),
            _ => None,
        })
        .expect("a retrying event");
    assert!(reason.contains("without a result"), "{reason}");
    assert_eq!(completed(&ev).0, "echo: [[mock:hold]] hi");
    env.mock.release_held();
    worker.shutdown();
    worker.wait().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_kills_the_cli_and_requeues_the_job() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let worker = env
        .start_worker_with(|s| s.worker.shutdown_grace_secs = 1)
        .await;
    env.mock.push_behavior_for(
        "hold",
        Behavior::Hold {
            text: "never finished".into(),
        },
    );
    let job = env
        .publish_job("shutdown:key", "[[mock:hold]] hi", json!({}))
        .await;
    env.mock.wait_for_held(1, WAIT).await;
    assert_eq!(cli_pids(&env.prefix).len(), 1);
    let store = worker.context.store.clone();
    worker.shutdown();
    worker.wait().await.unwrap();
    assert!(
        cli_pids(&env.prefix).is_empty(),
        "no CLI outlives the worker"
    );
    let row = store.get_job(&job).await.unwrap().unwrap();
    assert_eq!(
        (row.status, row.attempts),
        (JobStatus::Queued, 1),
        "the job went back to the queue"
    );
    env.mock.release_held();

    // The next worker picks it up as a new attempt.
    let worker = env.start_worker().await;
    let rest = env.events_until_terminal(&job).await;
    assert!(
        matches!(&rest.iter().find(|e| matches!(e.body, EventBody::Retrying { .. })).unwrap().body,
        EventBody::Retrying { reason, next_attempt: 2, .. } if reason == "interrupted")
    );
    assert_eq!(completed(&rest).0, "echo: [[mock:hold]] hi");
    worker.shutdown();
    worker.wait().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_workers_job_is_picked_up_after_its_lease_expires() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    // A "worker" that claimed a session, started a job, and died.
    let settings = env.settings();
    let store = claude_worker::store::connect(&settings.database.url, 2)
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let job_id = uuid::Uuid::new_v4().to_string();
    let spec = JobSpec {
        prompt: "left behind".into(),
        mode: Default::default(),
        claude_session_id: None,
        profile: "default".into(),
        model: None,
        max_turns: 5,
        permission_mode: claude_worker::protocol::PermissionMode::Default,
        metadata: json!({}),
        reply_to: Some(env.bus.reply_key.clone()),
        on_busy: Default::default(),
        attachments: Vec::new(),
        max_budget_usd: None,
        identity: None,
        compact: false,
        prompt_answerers: Vec::new(),
    };
    store
        .accept_job(
            &NewJob {
                job_id: job_id.clone(),
                session_key: "ghost:worker".into(),
                spec,
            },
            now_ms(),
        )
        .await
        .unwrap();
    let lease = store
        .claim_session("dead-worker", now_ms(), 1_000, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        store
            .start_attempt(&lease, &job_id, now_ms())
            .await
            .unwrap(),
        1
    );

    let worker = env.start_worker().await;
    let ev = env.events_until_terminal(&job_id).await;
    match &ev[0].body {
        EventBody::Retrying {
            reason,
            next_attempt,
            ..
        } => assert_eq!((reason.as_str(), *next_attempt), ("worker_lost", 2)),
        other => panic!("expected retrying first, got {other:?}"),
    }
    assert_eq!(completed(&ev).0, "echo: left behind");
    assert!(
        worker
            .context
            .store
            .get_session("ghost:worker")
            .await
            .unwrap()
            .unwrap()
            .lease_epoch
            >= 2
    );
    worker.shutdown();
    worker.wait().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_use_and_unstreamed_text_reach_the_reply() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let worker = env.start_worker().await;

    // A tool call shows up as a tool_use event; the CLI really ran it
    // (reading a file in the session's own working directory).
    let workdir = env.settings().profiles["default"].workdir.clone();
    let cwd = claude_worker::session_dir(&workdir, "tool:key");
    std::fs::create_dir_all(&cwd).unwrap();
    let file = cwd.join("notes.txt");
    std::fs::write(&file, "the secret word is turnip\n").unwrap();
    let path = file.display().to_string();
    env.mock.push_behavior_for(
        "tool",
        Behavior::tool_use("Read", json!({"file_path": path})),
    );
    let ev = run(&mut env, "tool:key", "[[mock:tool]] read it", json!({})).await;
    let tools: Vec<(String, String)> = ev
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::ToolUse {
                name,
                input_summary,
            } => Some((name.clone(), input_summary.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(tools, vec![("Read".to_string(), path.clone())]);
    assert_eq!(completed(&ev).0, "echo: [[mock:tool]] read it");
    let follow_up = env.mock.requests_for("tool");
    assert_eq!(follow_up.len(), 2, "the CLI sent the tool result back");
    let results = follow_up[1].tool_results();
    assert!(
        results.iter().any(|r| r.to_string().contains("turnip")),
        "{results:?}"
    );

    // A dropped stream makes the CLI retry without streaming: the text
    // then arrives whole, and still reaches the reply.
    env.mock.push_behavior_for("drop", Behavior::Disconnect);
    let ev = run(&mut env, "drop:key", "[[mock:drop]] hi", json!({})).await;
    assert!(!ev
        .iter()
        .any(|e| matches!(e.body, EventBody::Retrying { .. })));
    assert_eq!(text_of(&ev, 1), "echo: [[mock:drop]] hi");
    assert_eq!(completed(&ev).0, "echo: [[mock:drop]] hi");

    worker.shutdown();
    worker.wait().await.unwrap();
    env.cleanup().await;
}

/// The API stream is cut after two of four deltas and the CLI retries
/// inside the attempt — without streaming (`CLAUDE_CODE_MAX_RETRIES=0`) or
/// with a streamed retry (`=2`). The deltas of the cut stream were already
/// published: a `text_reset` takes them back, and the attempt's text after
/// it adds up to the answer, for the client library too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_stream_is_taken_back_and_restated() {
    use claude_worker::client::{JobTracker, Step};
    let mut env = TestEnv::new(Backend::Sqlite).await;
    for retries in ["0", "2"] {
        let worker = env
            .start_worker_with(|s| {
                for p in s.profiles.values_mut() {
                    p.env.insert(
                        "CLAUDE_CODE_MAX_RETRIES".into(),
                        claude_worker::config::Secret::new(retries),
                    );
                }
            })
            .await;
        let prompt = format!("[[mock:cut{retries}]] tell me");
        let answer = format!("echo: {prompt}");
        env.mock
            .push_behavior_for(&format!("cut{retries}"), Behavior::cut(answer.clone(), 2));
        let ev = run(&mut env, "cut:key", &prompt, json!({})).await;
        let kinds: Vec<&str> = ev.iter().map(|e| e.body.type_name()).collect();
        let reset = kinds
            .iter()
            .position(|k| *k == "text_reset")
            .unwrap_or_else(|| panic!("retries={retries}: no text_reset in {kinds:?}"));
        assert_eq!(kinds.iter().filter(|k| **k == "text_reset").count(), 1);
        assert_eq!(kinds[0], "started", "{kinds:?}");
        assert!(!kinds.contains(&"retrying"), "one attempt: {kinds:?}");
        // What was taken back: the first two of the cut stream's 4 chunks.
        let before = text_of(&ev[..reset], 1);
        assert!(
            !before.is_empty() && answer.starts_with(&before) && before != answer,
            "retries={retries}: {before:?}"
        );
        assert_eq!(text_of(&ev[reset..], 1), answer, "retries={retries}");
        assert_eq!(completed(&ev).0, answer);
        // The client library's reader ends with exactly the answer.
        let mut tracker = JobTracker::new(ev[0].job_id.clone());
        let steps: Vec<Step> = ev.iter().map(|e| tracker.accept(e, None)).collect();
        assert_eq!(
            steps[reset],
            Step::Retry {
                discarded: before.clone()
            }
        );
        assert_eq!(tracker.text(), answer);
        worker.shutdown();
        worker.wait().await.unwrap();
    }
    env.cleanup().await;
}
