//! Transcripts by identity: a worker resumes a session from its own CLI
//! files only when they are the session's current transcript (real
//! RabbitMQ, SQLite, real CLI + mock API).

use std::process::Stdio;

use claude_worker::protocol::{EventBody, EventV1};
use claude_worker::worker::Worker;
use serde_json::json;
use tokio::io::AsyncWriteExt;

use crate::harness::{Backend, TestEnv};
use crate::support::{cli_command, user_line, CLI_TIMEOUT};

const KEY: &str = "transcript:diverged";

async fn run_ok(env: &mut TestEnv, prompt: &str) -> Option<String> {
    let job = env.publish_job(KEY, prompt, json!({})).await;
    let ev: Vec<EventV1> = env.events_until_terminal(&job).await;
    match &ev.last().unwrap().body {
        EventBody::Completed {
            result,
            claude_session_id,
            ..
        } => {
            assert_eq!(result, &format!("echo: {prompt}"));
            claude_session_id.clone()
        }
        other => panic!("expected completed for {prompt:?}, got {other:?}"),
    }
}

async fn start(env: &TestEnv, home: &std::path::Path, id: &str) -> Worker {
    let mut s = env.settings_for(home, &env.dir.path().join("workspaces"), &env.prefix);
    s.worker.id = id.into();
    // Cold turns only: every turn resumes from a transcript file.
    s.claude.warm_max_processes = 0;
    s.validate().unwrap();
    Worker::start(s).await.unwrap()
}

async fn stop(w: Worker) {
    w.shutdown();
    w.wait().await.unwrap();
}

/// The session's turns: t1 on w1, then a turn on w1's CLI files that never
/// completed as a job (what a failed or fenced-out attempt leaves), then t2
/// on w2, then t3 back on w1 — whose local copy is larger than the stored
/// one but misses t2. The stored copy must win: Claude sees t1, t2, t3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_larger_but_diverged_local_transcript_loses_to_the_stored_one() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let home1 = env.home();
    let home2 = env.dir.path().join("home2");
    std::fs::create_dir_all(home2.join(".claude")).unwrap();

    let w1 = start(&env, &home1, "tr-w1").await;
    let id = run_ok(&mut env, "t1").await.expect("a Claude session id");
    stop(w1).await;

    // An attempt that wrote to w1's transcript but never completed.
    let ghost = format!("ghost {}", "x".repeat(4000));
    let cwd = claude_worker::session_dir(&env.settings().profiles["default"].workdir, KEY);
    let mut cmd = cli_command(&env.mock, &home1, &["--resume", &id]);
    cmd.current_dir(&cwd)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(user_line(&ghost).as_bytes()).await.unwrap();
    stdin.write_all(b"\n").await.unwrap();
    drop(stdin);
    let status = tokio::time::timeout(CLI_TIMEOUT, child.wait())
        .await
        .expect("the ghost CLI run ends")
        .unwrap();
    assert!(status.success());

    let w2 = start(&env, &home2, "tr-w2").await;
    assert_eq!(run_ok(&mut env, "t2").await.as_deref(), Some(id.as_str()));
    stop(w2).await;

    // The precondition that made size the wrong rule: w1's copy is larger.
    let local = std::fs::read_dir(home1.join(".claude/projects"))
        .unwrap()
        .map(|d| d.unwrap().path().join(format!("{id}.jsonl")))
        .find(|p| p.exists())
        .expect("w1's local transcript");
    let local_len = std::fs::metadata(&local).unwrap().len();
    let store = claude_worker::store::connect(&env.settings().database.url, 2)
        .await
        .unwrap();
    let stored = store.get_transcript(&id).await.unwrap().unwrap();
    assert!(
        local_len as i64 > stored.size_bytes,
        "local {local_len} vs stored {}",
        stored.size_bytes
    );

    let w1 = start(&env, &home1, "tr-w1").await;
    assert_eq!(run_ok(&mut env, "t3").await.as_deref(), Some(id.as_str()));
    let reqs = env.mock.requests();
    let req = reqs
        .iter()
        .rev()
        .find(|r| r.last_user_text().as_deref() == Some("t3"))
        .expect("the mock saw t3");
    assert_eq!(req.user_texts(), vec!["t1", "t2", "t3"]);
    assert_eq!(req.assistant_texts(), vec!["echo: t1", "echo: t2"]);
    stop(w1).await;
    env.cleanup().await;
}
