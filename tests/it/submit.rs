//! The client subcommands, as a user runs them: the built `claude-worker`
//! binary (`submit`, `cancel`, `sessions`) against a live in-process worker
//! of the test's world, configured through `CLAUDE_WORKER__…` variables.

use std::process::Stdio;

use claude_worker::protocol::{EventBody, EventV1};
use claude_worker::store::SessionStatus;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

use crate::harness::{Backend, TestEnv, AMQP_URL, WAIT};
use crate::mock_api::Behavior;

pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Debug for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// `claude-worker ARGS` in this test's world, configured only through the
/// environment, run in the test's temp dir.
pub fn command(env: &TestEnv, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_claude-worker"));
    cmd.args(args)
        .current_dir(env.dir.path())
        .env_remove("CLAUDE_WORKER_CONFIG")
        .env("CLAUDE_WORKER__AMQP__URL", AMQP_URL)
        .env("CLAUDE_WORKER__AMQP__PREFIX", &env.prefix)
        .env("CLAUDE_WORKER__DATABASE__URL", &env.db_url)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

async fn finish(child: tokio::process::Child) -> Output {
    let out = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("claude-worker did not exit in time")
        .expect("claude-worker ran");
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub async fn run(env: &TestEnv, args: &[&str]) -> Output {
    finish(command(env, args).spawn().expect("spawn claude-worker")).await
}

async fn run_with_stdin(env: &TestEnv, args: &[&str], stdin: &str) -> Output {
    let mut child = command(env, args)
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn claude-worker");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).await.unwrap();
    drop(input);
    finish(child).await
}

/// Parses `--json` output: each line a schema-valid v1 event.
fn json_events(out: &Output) -> Vec<EventV1> {
    out.stdout
        .lines()
        .map(|l| {
            let raw: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            crate::schema::assert_valid_reply(&raw);
            serde_json::from_value(raw).unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_streams_the_answer_and_sessions_show_it() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let worker = env.start_worker().await;

    // The answer on stdout, exactly; the summary on stderr.
    let out = run(&env, &["submit", "--session", "cli:one", "hello there"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout, "echo: hello there\n", "{out:?}");
    assert!(
        out.stderr.contains("completed: 1 turn ·") && out.stderr.contains("tokens"),
        "{out:?}"
    );

    // The prompt from standard input; same session, resumed.
    let out = run_with_stdin(&env, &["submit", "--session", "cli:one"], "second one\n").await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout, "echo: second one\n", "{out:?}");
    let (users, _) = {
        let reqs = env.mock.requests();
        let r = reqs.last().unwrap();
        (r.user_texts(), r.assistant_texts())
    };
    assert_eq!(users, vec!["hello there", "second one\n"]);

    // --json: the events as received, schema-valid, contiguous, ending in completed.
    let out = run(&env, &["submit", "--session", "cli:one", "--json", "third"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let events = json_events(&out);
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (0..events.len() as u64).collect::<Vec<_>>());
    assert!(matches!(
        events[0].body,
        EventBody::Started { resumed: true, .. }
    ));
    assert!(
        matches!(&events.last().unwrap().body, EventBody::Completed { result, .. } if result == "echo: third"),
        "{out:?}"
    );
    let job_id = events[0].job_id.clone();

    // The terminal event is published before the worker releases the
    // session: wait for it to go idle.
    let store = claude_worker::store::connect(&claude_worker::config::Secret::new(&env.db_url), 1)
        .await
        .unwrap();
    // The lease is released just after the terminal event: no event marks it.
    crate::common::world::wait_until_async("cli:one goes idle", || async {
        store.get_session("cli:one").await.unwrap().unwrap().status == SessionStatus::Idle
    })
    .await;

    // sessions list / --json / --status / --profile.
    let out = run(&env, &["sessions", "list"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let mut lines = out.stdout.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap()
        .split("  ")
        .filter(|s| !s.is_empty())
        .collect();
    assert_eq!(
        header.iter().map(|s| s.trim()).collect::<Vec<_>>(),
        ["KEY", "STATUS", "PROFILE", "TURNS", "COST", "LAST ACTIVITY"]
    );
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(&row[..4], ["cli:one", "idle", "default", "3"], "{out:?}");
    assert!(row[4].starts_with('$'), "{out:?}");

    let out = run(&env, &["sessions", "list", "--json"]).await;
    let list: Vec<Value> = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["session_key"], "cli:one");
    assert_eq!(list[0]["turns"], 3);
    let claude_session = list[0]["claude_session_id"].as_str().unwrap().to_string();
    for filter in [["--status", "closed"], ["--profile", "webapp"]] {
        let out = run(&env, &["sessions", "list", "--json", filter[0], filter[1]]).await;
        assert_eq!(out.stdout.trim(), "[]", "{filter:?}: {out:?}");
    }
    let out = run(&env, &["sessions", "list", "--status", "sleepy"]).await;
    assert_eq!(out.code, 2, "{out:?}");

    // sessions show: metadata and the recent jobs with their outcomes.
    let out = run(&env, &["sessions", "show", "cli:one"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains(&claude_session), "{out:?}");
    assert!(out.stdout.contains(&job_id), "{out:?}");
    assert_eq!(out.stdout.matches("succeeded").count(), 3, "{out:?}");
    let out = run(&env, &["sessions", "show", "cli:one", "--json"]).await;
    let shown: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(shown["jobs"].as_array().unwrap().len(), 3);
    assert_eq!(shown["jobs"][2]["job_id"], job_id.as_str());
    let out = run(&env, &["sessions", "show", "nobody"]).await;
    assert_eq!(out.code, 1, "{out:?}");

    // sessions delete: the next job starts a new Claude session.
    let out = run(&env, &["sessions", "delete", "cli:one"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let s = store.get_session("cli:one").await.unwrap().unwrap();
    assert_eq!(
        (s.status, s.claude_session_id),
        (SessionStatus::Closed, None)
    );
    let out = run(
        &env,
        &["submit", "--session", "cli:one", "--json", "after delete"],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    let events = json_events(&out);
    match &events[0].body {
        EventBody::Started {
            resumed,
            claude_session_id,
            ..
        } => {
            assert!(!resumed);
            assert_ne!(claude_session_id.as_deref(), Some(claude_session.as_str()));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        env.mock.requests().last().unwrap().user_texts(),
        vec!["after delete"]
    );
    let out = run(&env, &["sessions", "delete", "nobody"]).await;
    assert_eq!(out.code, 1, "{out:?}");

    worker.shutdown();
    worker.wait().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_exit_codes_for_failure_retry_and_usage() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let worker = env.start_worker().await;

    // failed → 1, with the error kind on stderr and nothing on stdout.
    env.mock.push_behavior_for(
        "auth",
        Behavior::status(401, "authentication_error", "invalid x-api-key"),
    );
    let out = run(
        &env,
        &["submit", "--session", "cli:auth", "[[mock:auth]] hi"],
    )
    .await;
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(out.stdout, "", "{out:?}");
    assert!(out.stderr.contains("failed (auth)"), "{out:?}");

    // A retried attempt: a notice, then the answer of the attempt that worked.
    env.mock.push_behavior_for(
        "flaky",
        Behavior::status(500, "api_error", "Internal server error"),
    );
    let out = run(
        &env,
        &["submit", "--session", "cli:flaky", "[[mock:flaky]] hi"],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout, "echo: [[mock:flaky]] hi\n", "{out:?}");
    assert!(
        out.stderr.contains("[retrying: attempt 2 follows"),
        "{out:?}"
    );

    // on_busy reaches the job: an invalid value is a usage error (clap).
    let out = run(&env, &["submit", "--on-busy", "later", "hi"]).await;
    assert_eq!(out.code, 2, "{out:?}");
    // Usage errors: conflicting modes, a blank prompt, a bad resume id, a bad job id.
    for args in [
        &[
            "submit",
            "--new",
            "--fork",
            "0b5a3c1e-7d2f-4e6a-8c1b-2f3e4d5a6b7c",
            "hi",
        ][..],
        &["submit", "--session", "k", "   "],
        &["submit", "--resume", "not-a-uuid", "hi"],
        &["submit", "--job-id", "has space", "hi"],
        &["cancel"],
    ] {
        let out = run(&env, args).await;
        assert_eq!(out.code, 2, "{args:?}: {out:?}");
    }

    worker.shutdown();
    worker.wait().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_and_cancel_without_a_worker_time_out_with_exit_4() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let out = run(
        &env,
        &["submit", "--timeout", "2", "--session", "k", "anyone?"],
    )
    .await;
    assert_eq!(out.code, 4, "{out:?}");
    assert!(
        out.stderr.contains(&env.bus.topology.jobs_queue)
            && out.stderr.contains("claude-worker worker"),
        "{out:?}"
    );
    // No worker listens on the control exchange: said at once.
    let out = run(&env, &["cancel", "--timeout", "2", "some-job"]).await;
    assert_eq!(out.code, 4, "{out:?}");
    assert!(out.stderr.contains("claude-worker worker"), "{out:?}");
    env.cleanup().await;
}

/// Ctrl-C while streaming cancels the job: the worker interrupts the turn
/// and `submit` exits with the cancelled code once `cancelled` arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_cancels_the_job() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let worker = env.start_worker().await;
    env.mock
        .push_behavior_for("hold", Behavior::hold("this answer never finishes"));
    let child = command(
        &env,
        &["submit", "--session", "cli:cancel", "[[mock:hold]] wait"],
    )
    .spawn()
    .unwrap();
    env.mock.wait_for_held(1, WAIT).await;
    // SAFETY: kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGINT) };
    assert_eq!(rc, 0);
    let out = finish(child).await;
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("cancelled"), "{out:?}");

    // `cancel` for a finished job answers already_finished.
    let out = run(
        &env,
        &["submit", "--session", "cli:cancel", "--json", "quick"],
    )
    .await;
    let job = json_events(&out)[0].job_id.clone();
    let out = run(&env, &["cancel", &job]).await;
    assert!(out.stdout.starts_with("already_finished"), "{out:?}");
    env.mock.release_held();
    worker.shutdown();
    worker.wait().await.unwrap();
    env.cleanup().await;
}
