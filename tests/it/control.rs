//! Control on real parts: cancel (queued, running, whole session, finished,
//! unknown), runtime permission-mode changes, and the on_busy policies.

use claude_worker::protocol::{ControlOutcome, ErrorKind, EventBody, EventV1};
use serde_json::json;

use crate::harness::{cli_pids, Backend, TestEnv, WAIT};
use crate::mock_api::Behavior;
use crate::pipeline::{assert_contiguous, completed, conversation_seen, run, started};

/// Waits (bounded) until the worker has accepted `n` jobs of `key`: jobs
/// and control messages travel through different queues, so a cancel
/// must not overtake the jobs it is about.
async fn wait_accepted(worker: &claude_worker::worker::Worker, key: &str, n: usize) {
    let ctx = &worker.context;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        // Armed before looking, so an accept in between is not missed.
        let accepted = ctx.job_accepted();
        tokio::pin!(accepted);
        accepted.as_mut().enable();
        let jobs = ctx.store.list_jobs(key, 100).await.unwrap();
        if jobs.len() >= n {
            return;
        }
        if tokio::time::timeout_at(deadline, accepted).await.is_err() {
            panic!("{key}: {} of {n} jobs accepted within {WAIT:?}", jobs.len());
        }
    }
}

fn cancelled_reason(events: &[EventV1]) -> String {
    match &events.last().unwrap().body {
        EventBody::Cancelled { reason } => reason.clone(),
        other => panic!("expected cancelled, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_queued_running_finished_and_unknown_jobs() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let worker = env.start_worker().await;
    let key = "cancel:key";

    // A running turn (held mid-stream by the mock) and a job queued behind it.
    env.mock
        .push_behavior_for("hold", Behavior::hold("held answer"));
    let running = env
        .publish_job(key, "[[mock:hold]] long task", json!({}))
        .await;
    env.mock.wait_for_held(1, WAIT).await;
    let queued = env.publish_job(key, "queued task", json!({})).await;
    wait_accepted(&worker, key, 2).await;

    // Cancel the queued one: it ends `cancelled` without running.
    env.publish_control(json!({"v": 1, "type": "cancel", "job_id": queued}))
        .await;
    let result = env.next_control_result().await;
    assert!(result.ok, "{result:?}");
    assert_eq!(result.outcome, ControlOutcome::Cancelled);
    let ev = env.events_until_terminal(&queued).await;
    assert_contiguous(&ev);
    assert_eq!(
        ev.len(),
        1,
        "a queued job ends with its cancelled event only: {ev:#?}"
    );
    assert_eq!(cancelled_reason(&ev), "cancelled by request");

    // Cancel the running one: interrupted, `cancelled`, never retried.
    env.publish_control(
        json!({"v": 1, "type": "cancel", "job_id": running, "reason": "user pressed stop"}),
    )
    .await;
    let result = env.next_control_result().await;
    assert_eq!(
        (result.ok, result.outcome),
        (true, ControlOutcome::Cancelled),
        "{result:?}"
    );
    let ev = env.events_until_terminal(&running).await;
    assert_contiguous(&ev);
    assert_eq!(cancelled_reason(&ev), "user pressed stop");
    assert!(!ev
        .iter()
        .any(|e| matches!(e.body, EventBody::Retrying { .. })));
    let id = started(&ev).0.unwrap();
    // The CLI was stopped before the cancelled event went out.
    assert!(
        cli_pids(&env.prefix).is_empty(),
        "a CLI process outlived its cancelled turn"
    );
    env.mock.release_held();

    // The session stays resumable: the next job sees the interrupted turn.
    let ev = run(&mut env, key, "after the cancel", json!({})).await;
    assert_eq!(started(&ev).0.as_deref(), Some(id.as_str()));
    assert_eq!(completed(&ev).0, "echo: after the cancel");
    let (users, _) = conversation_seen(&env, "after the cancel");
    assert_eq!(
        users.first().map(String::as_str),
        Some("[[mock:hold]] long task")
    );
    assert!(
        !users.iter().any(|u| u == "queued task"),
        "the cancelled queued job never ran: {users:?}"
    );

    // Finished and unknown jobs: a clear no-op answer.
    env.publish_control(json!({"v": 1, "type": "cancel", "job_id": running}))
        .await;
    let result = env.next_control_result().await;
    assert_eq!(
        (result.ok, result.outcome),
        (false, ControlOutcome::AlreadyFinished),
        "{result:?}"
    );
    env.publish_control(json!({"v": 1, "type": "cancel", "job_id": "no-such-job"}))
        .await;
    let result = env.next_control_result().await;
    assert_eq!(
        (result.ok, result.outcome),
        (false, ControlOutcome::Unknown),
        "{result:?}"
    );
    // Invalid control messages are answered too.
    env.publish_control(json!({"v": 1, "type": "cancel"})).await;
    let result = env.next_control_result().await;
    assert_eq!(
        (result.ok, result.outcome),
        (false, ControlOutcome::Invalid),
        "{result:?}"
    );

    worker.shutdown();
    worker.wait().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_a_whole_session() {
    let mut env = TestEnv::new(Backend::Postgres).await;
    let worker = env.start_worker().await;
    let key = "cancel:session";
    env.mock
        .push_behavior_for("hold", Behavior::hold("held answer"));
    let running = env.publish_job(key, "[[mock:hold]] one", json!({})).await;
    env.mock.wait_for_held(1, WAIT).await;
    let q1 = env.publish_job(key, "two", json!({})).await;
    let q2 = env.publish_job(key, "three", json!({})).await;
    let other = env
        .publish_job("cancel:other", "unrelated", json!({}))
        .await;

    env.publish_control(json!({"v": 1, "type": "cancel", "session_key": key}))
        .await;
    let result = env.next_control_result().await;
    assert_eq!(
        (result.ok, result.outcome),
        (true, ControlOutcome::Cancelled),
        "{result:?}"
    );
    let ev = env.events_until_terminal(&running).await;
    assert!(
        matches!(ev.last().unwrap().body, EventBody::Cancelled { .. }),
        "{ev:#?}"
    );
    // The queued jobs end without ever starting.
    for job in [&q1, &q2] {
        let ev = env.events_until_terminal(job).await;
        assert_eq!(ev.len(), 1, "{ev:#?}");
        assert!(matches!(ev[0].body, EventBody::Cancelled { .. }), "{ev:#?}");
    }
    env.mock.release_held();
    let ev = env.events_until_terminal(&other).await;
    assert_eq!(
        completed(&ev).0,
        "echo: unrelated",
        "other sessions are untouched"
    );
    worker.shutdown();
    worker.wait().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permission_mode_changes_at_runtime_within_the_ceiling() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let worker = env.start_worker().await;
    let key = "mode:key";
    // Profile `discord`: acceptEdits by default, ceiling acceptEdits.
    let ev = run(&mut env, key, "first", json!({"profile": "discord"})).await;
    assert_eq!(mode_of(&ev), "acceptEdits");

    // Above the ceiling: refused.
    env.publish_control(json!({"v": 1, "type": "set_permission_mode", "session_key": key, "mode": "bypassPermissions"}))
        .await;
    let result = env.next_control_result().await;
    assert_eq!(
        (result.ok, result.outcome),
        (false, ControlOutcome::Refused),
        "{result:?}"
    );
    assert!(result.message.contains("ceiling"), "{}", result.message);

    // Within it, during a running turn: applied, and later turns start in it.
    env.mock.push_behavior_for("hold", Behavior::hold("held"));
    let held = env
        .publish_job(key, "[[mock:hold]] second", json!({"profile": "discord"}))
        .await;
    env.mock.wait_for_held(1, WAIT).await;
    env.publish_control(
        json!({"v": 1, "type": "set_permission_mode", "session_key": key, "mode": "plan"}),
    )
    .await;
    let result = env.next_control_result().await;
    assert_eq!(
        (result.ok, result.outcome),
        (true, ControlOutcome::Applied),
        "{result:?}"
    );
    env.mock.release_held();
    let ev = env.events_until_terminal(&held).await;
    assert_eq!(completed(&ev).0, "held");
    let ev = run(&mut env, key, "third", json!({"profile": "discord"})).await;
    assert_eq!(mode_of(&ev), "plan", "the CLI's init shows the new mode");

    // Unknown session.
    env.publish_control(
        json!({"v": 1, "type": "set_permission_mode", "session_key": "nope", "mode": "plan"}),
    )
    .await;
    let result = env.next_control_result().await;
    assert_eq!(
        (result.ok, result.outcome),
        (false, ControlOutcome::Unknown),
        "{result:?}"
    );
    worker.shutdown();
    worker.wait().await.unwrap();
    env.cleanup().await;
}

fn mode_of(events: &[EventV1]) -> String {
    events
        .iter()
        .find_map(|e| match &e.body {
            EventBody::Started {
                permission_mode, ..
            } => permission_mode.clone(),
            _ => None,
        })
        .expect("started carries the CLI's permission mode")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_busy_reject_and_interrupt() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let worker = env.start_worker().await;
    let key = "busy:key";
    env.mock
        .push_behavior_for("hold", Behavior::hold("held answer"));
    let first = env.publish_job(key, "[[mock:hold]] first", json!({})).await;
    env.mock.wait_for_held(1, WAIT).await;

    // reject: fails at once with `busy`; the running turn goes on.
    let rejected = env
        .publish_job(key, "rejected", json!({"options": {"on_busy": "reject"}}))
        .await;
    let ev = env.events_until_terminal(&rejected).await;
    assert_eq!(ev.len(), 1);
    match &ev[0].body {
        EventBody::Failed { error, message, .. } => {
            assert_eq!(*error, ErrorKind::Busy);
            assert!(message.contains(&first), "{message}");
        }
        other => panic!("{other:?}"),
    }

    // enqueue (the default, said explicitly here): waits its turn.
    let waiting = env
        .publish_job(
            key,
            "waits its turn",
            json!({"options": {"on_busy": "enqueue"}}),
        )
        .await;

    // interrupt: the running turn ends `cancelled`, then the jobs run in
    // order: the enqueued one, then this one.
    let newer = env
        .publish_job(key, "newer", json!({"options": {"on_busy": "interrupt"}}))
        .await;
    let ev = env.events_until_terminal(&first).await;
    assert!(cancelled_reason(&ev).contains(&newer), "{ev:#?}");
    let ev = env.events_until_terminal(&waiting).await;
    assert_eq!(completed(&ev).0, "echo: waits its turn");
    let ev = env.events_until_terminal(&newer).await;
    assert_eq!(completed(&ev).0, "echo: newer");
    let (users, _) = conversation_seen(&env, "newer");
    // The CLI records the interruption in the transcript itself.
    assert_eq!(
        users,
        vec![
            "[[mock:hold]] first",
            "[Request interrupted by user]",
            "waits its turn",
            "newer"
        ]
    );
    env.mock.release_held();
    worker.shutdown();
    worker.wait().await.unwrap();
    env.cleanup().await;
}

/// Events of jobs that never ran (refused as busy, cancelled while queued,
/// invalid) carry `x-worker-id` and `x-lease-epoch` like every other: the
/// session's epoch, or 0 for a body that never became a job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_jobs_that_never_ran_are_attributed() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let worker = env.start_worker().await;
    let key = "attrib:key";
    env.mock
        .push_behavior_for("hold", Behavior::hold("held answer"));
    let first = env.publish_job(key, "[[mock:hold]] first", json!({})).await;
    env.mock.wait_for_held(1, WAIT).await;
    // The CLI may send its API request before it prints `init`: wait for
    // the started event itself rather than read its headers at once.
    let (_, started) = env.next_event(&first).await;
    assert!(
        matches!(started.body, EventBody::Started { .. }),
        "{started:?}"
    );
    let held_by = env.attribution(&first, 0).expect("first's started event");
    assert_eq!(held_by.worker_id.as_deref(), Some(worker.id.as_str()));
    let epoch = held_by.lease_epoch.expect("an epoch");

    let busy = env
        .publish_job(key, "busy", json!({"options": {"on_busy": "reject"}}))
        .await;
    let ev = env.events_until_terminal(&busy).await;
    assert_eq!(ev.len(), 1);
    let queued = env.publish_job(key, "queued", json!({})).await;
    wait_accepted(&worker, key, 3).await;
    env.publish_control(json!({"v": 1, "type": "cancel", "job_id": queued}))
        .await;
    assert!(env.next_control_result().await.ok);
    let ev = env.events_until_terminal(&queued).await;
    assert_eq!(ev.len(), 1);
    for job in [&busy, &queued] {
        let from = env.attribution(job, 0).expect("received");
        assert_eq!(from.worker_id.as_deref(), Some(worker.id.as_str()), "{job}");
        assert_eq!(from.lease_epoch, Some(epoch), "{job}");
    }

    let invalid = uuid::Uuid::new_v4().to_string();
    let body = json!({"v": 1, "session_key": key, "prompt": "p", "surprise": 1});
    env.publish_raw(body.to_string().as_bytes(), Some(&invalid))
        .await;
    env.next_dead_letter().await;
    let (_, ev) = env.next_event(&invalid).await;
    assert_eq!(ev.body.type_name(), "failed");
    let from = env.attribution(&invalid, 0).expect("received");
    assert_eq!(from.worker_id.as_deref(), Some(worker.id.as_str()));
    assert_eq!(from.lease_epoch, Some(0));

    env.mock.release_held();
    let ev = env.events_until_terminal(&first).await;
    assert_eq!(ev.last().unwrap().body.type_name(), "completed");
    worker.shutdown();
    worker.wait().await.unwrap();
    env.cleanup().await;
}
