//! The example producers in `examples/`, run unchanged against a live
//! worker. Python comes from `$PYTHON`, else `.cache/venv/bin/python` in the
//! repository (what `.ci/run` creates, with pika), else `python3`; pika
//! missing is a failure, not a skip.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::harness::{Backend, TestEnv, AMQP_URL, WAIT};
use crate::mock_api::Behavior;

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("PYTHON") {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/venv/bin/python");
    if venv.exists() {
        return venv;
    }
    PathBuf::from("python3")
}

async fn run_python_producer(env: &TestEnv, session: &str, prompt: &str) -> (i32, String, String) {
    let py = python();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/python_producer.py");
    let check = tokio::process::Command::new(&py)
        .args(["-c", "import pika"])
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {} ({e}); set $PYTHON", py.display()));
    assert!(
        check.status.success(),
        "pika is not installed for {}: run .ci/run, or \
         `python3 -m venv .cache/venv && .cache/venv/bin/pip install pika==1.3.2`, \
         or set $PYTHON to a python with pika.\n{}",
        py.display(),
        String::from_utf8_lossy(&check.stderr)
    );
    let child = tokio::process::Command::new(&py)
        .arg(&script)
        .arg(prompt)
        .args([
            "--session",
            session,
            "--prefix",
            &env.prefix,
            "--amqp-url",
            AMQP_URL,
        ])
        .args(["--timeout", &WAIT.as_secs().to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("the python producer did not exit in time")
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_producer_streams_the_reply_and_exits_with_the_outcome() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let worker = env.start_worker().await;

    let (code, stdout, stderr) = run_python_producer(&env, "py:one", "hello from python").await;
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    assert_eq!(stdout, "echo: hello from python\n", "stderr: {stderr}");
    assert!(stderr.contains("[completed: 1 turn(s)"), "{stderr}");

    env.mock.push_behavior_for(
        "auth",
        Behavior::status(401, "authentication_error", "invalid x-api-key"),
    );
    let (code, stdout, stderr) = run_python_producer(&env, "py:one", "[[mock:auth]] hi").await;
    assert_eq!(code, 1, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stderr.contains("[failed (auth)"), "{stderr}");

    worker.shutdown();
    worker.wait().await.unwrap();
    env.cleanup().await;
}
