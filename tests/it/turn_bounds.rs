//! Every wait on the turn path is bounded: a CLI that never reads its
//! stdin (a prompt of almost 1 MB does not fit the 64 KiB pipe) cannot hold a turn
//! past its timeout, a cancel, or a shutdown.
//!
//! The real CLI always reads stdin, so these tests use a stand-in: a shell
//! script that answers `--version` like the CLI and otherwise sleeps
//! without reading, recording its pid so the test can check it is gone.

use std::path::{Path, PathBuf};

use claude_worker::protocol::{ControlOutcome, ErrorKind, EventBody};
use claude_worker::worker::Worker;
use serde_json::json;

use crate::harness::{Backend, TestEnv, WAIT};

/// A prompt just under the 1,000,000-byte limit: far over a pipe's buffer.
fn big_prompt() -> String {
    "never read. ".repeat(82_000)
}

/// Writes the stand-in CLI into `dir`; it appends its pid to `dir/pids`.
fn stand_in(dir: &Path) -> PathBuf {
    let script = dir.join("deaf-claude");
    let pids = dir.join("pids");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             if [ \"$1\" = \"--version\" ]; then echo '2.1.330 (Claude Code)'; exit 0; fi\n\
             echo $$ >> '{}'\n\
             exec sleep 600\n",
            pids.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

async fn start(env: &TestEnv, script: &Path, turn_timeout_secs: u64) -> Worker {
    let script = script.to_path_buf();
    env.start_worker_with(move |s| {
        s.claude.path = script;
        s.claude.turn_timeout_secs = turn_timeout_secs;
        s.claude.warm_max_processes = 0;
        s.retry.max_attempts = 1;
        s.worker.shutdown_grace_secs = 1;
    })
    .await
}

/// The stand-in's pid, once it has started (a file another process
/// writes: polled, bounded).
async fn stand_in_pid(dir: &Path) -> i32 {
    let file = dir.join("pids");
    let read = || {
        std::fs::read_to_string(&file)
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse().ok()))
    };
    crate::common::world::wait_until("the stand-in CLI starts", || read().is_some()).await;
    read().unwrap()
}

fn alive(pid: i32) -> bool {
    // Reaped children leave no /proc entry.
    Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test]
async fn a_cli_that_never_reads_its_prompt_times_out() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let dir = tempfile::tempdir().unwrap();
    let worker = start(&env, &stand_in(dir.path()), 2).await;
    let job = env
        .publish_job("bounds:timeout", &big_prompt(), json!({}))
        .await;
    let events = env.events_until_terminal(&job).await;
    assert_eq!(
        events.len(),
        1,
        "nothing but the terminal event: {events:?}"
    );
    match &events[0].body {
        EventBody::Failed { error, message, .. } => {
            assert_eq!(*error, ErrorKind::Timeout);
            assert!(message.contains("longer than 2 s"), "{message}");
        }
        other => panic!("expected failed/timeout, got {other:?}"),
    }
    let pid = stand_in_pid(dir.path()).await;
    assert!(!alive(pid), "the stand-in CLI {pid} outlived its turn");
    worker.shutdown();
    worker.wait().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_cancel_stops_a_turn_whose_cli_never_reads() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let dir = tempfile::tempdir().unwrap();
    let worker = start(&env, &stand_in(dir.path()), 300).await;
    let job = env
        .publish_job("bounds:cancel", &big_prompt(), json!({}))
        .await;
    let pid = stand_in_pid(dir.path()).await;
    env.publish_control(json!({"v": 1, "type": "cancel", "job_id": job, "reason": "stop it"}))
        .await;
    let result = env.next_control_result().await;
    assert!(result.ok, "{result:?}");
    assert_eq!(result.outcome, ControlOutcome::Cancelled);
    let events = env.events_until_terminal(&job).await;
    match &events.last().unwrap().body {
        EventBody::Cancelled { reason } => assert_eq!(reason, "stop it"),
        other => panic!("expected cancelled, got {other:?}"),
    }
    assert!(!alive(pid), "the stand-in CLI {pid} outlived the cancel");
    worker.shutdown();
    worker.wait().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn shutdown_stops_a_turn_whose_cli_never_reads() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let dir = tempfile::tempdir().unwrap();
    let worker = start(&env, &stand_in(dir.path()), 300).await;
    let store = worker.context.store.clone();
    let job = env
        .publish_job("bounds:shutdown", &big_prompt(), json!({}))
        .await;
    let pid = stand_in_pid(dir.path()).await;
    worker.shutdown();
    tokio::time::timeout(WAIT, worker.wait())
        .await
        .expect("the worker did not stop")
        .unwrap();
    assert!(!alive(pid), "the stand-in CLI {pid} outlived the worker");
    // Handed back, not lost: the job waits for the next worker.
    let record = store
        .get_job(&job)
        .await
        .unwrap()
        .expect("the job is stored");
    assert_eq!(record.status.as_str(), "queued");
    env.cleanup().await;
}
