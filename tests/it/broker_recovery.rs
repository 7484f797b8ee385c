//! A broker that drops a worker's connection — what a RabbitMQ restart
//! looks like from the worker — loses nothing and deafens nothing: the
//! turn in flight ends with exactly one terminal event, new jobs run, and
//! control messages (a consumer on a private queue, re-declared by name on
//! recovery) still reach the worker. The connection is closed by the
//! broker itself (`rabbitmqctl close_connection`), only this test's, so
//! parallel tests are not hit.

use std::time::Duration;

use claude_worker::client::{Client, Incoming};
use claude_worker::protocol::{ControlOutcome, EventBody, JobV1};
use serde_json::json;

use crate::harness::{Backend, TestEnv, WAIT};
use crate::mock_api::Behavior;

/// Asks the broker to close the connection whose client-provided name is
/// `name` (as a restart would, with CONNECTION_FORCED).
async fn broker_closes(name: &str) {
    let list = tokio::process::Command::new("rabbitmqctl")
        .args(["list_connections", "-q", "pid", "client_properties"])
        .output();
    let out = tokio::time::timeout(WAIT, list)
        .await
        .expect("rabbitmqctl answers")
        .expect("rabbitmqctl runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let needle = format!("\"{name}\"");
    let pid = text
        .lines()
        .find(|l| l.contains(&needle))
        .and_then(|l| l.split('\t').next())
        .unwrap_or_else(|| panic!("no connection named {name}:\n{text}"))
        .to_string();
    let close = tokio::process::Command::new("rabbitmqctl")
        .args([
            "close_connection",
            &pid,
            "test: the broker drops the connection",
        ])
        .output();
    let out = tokio::time::timeout(WAIT, close)
        .await
        .expect("rabbitmqctl answers")
        .expect("rabbitmqctl runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_broker_connection_loses_nothing_and_control_still_works() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let worker = env.start_worker().await;
    env.mock
        .push_behavior_for("hold", Behavior::hold("held answer"));
    let in_flight = env
        .publish_job("recover:a", "[[mock:hold]] in flight", json!({}))
        .await;
    env.mock.wait_for_held(1, WAIT).await;

    broker_closes(&format!("claude-worker {}", worker.id)).await;
    env.mock.release_held();
    let events = env.events_until_terminal(&in_flight).await;
    let terminals: Vec<&str> = events
        .iter()
        .filter(|e| e.body.is_terminal())
        .map(|e| e.body.type_name())
        .collect();
    assert_eq!(terminals, ["completed"], "{events:#?}");
    assert!(
        env.maybe_event(&in_flight, Duration::from_secs(1))
            .await
            .is_none(),
        "nothing after the terminal event"
    );

    // The jobs consumer and the control consumer came back.
    env.mock
        .push_behavior_for("hold2", Behavior::hold("second"));
    let job = env
        .publish_job("recover:b", "[[mock:hold2]] after", json!({}))
        .await;
    env.mock.wait_for_held(2, WAIT).await;
    env.publish_control(json!({"v": 1, "type": "cancel", "job_id": job}))
        .await;
    let result = env.next_control_result().await;
    assert!(result.ok, "{result:?}");
    assert_eq!(result.outcome, ControlOutcome::Cancelled);
    let events = env.events_until_terminal(&job).await;
    assert!(matches!(
        events.last().unwrap().body,
        EventBody::Cancelled { .. }
    ));

    worker.shutdown();
    worker.wait().await.expect("the worker stops cleanly");
    env.cleanup().await;
}

/// The client library's reply queue survives the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_reply_queue_survives_a_dropped_connection() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let worker = env.start_worker().await;
    let settings = env.settings();
    let name = format!("recovery-client-{}", env.prefix);
    let mut client = Client::connect(&settings.amqp, &name).await.unwrap();
    broker_closes(&name).await;
    let job: JobV1 = serde_json::from_value(json!({
        "v": 1, "job_id": uuid::Uuid::new_v4().to_string(),
        "session_key": "recover:client", "prompt": "after the drop",
        "reply_to": client.reply_key(),
    }))
    .unwrap();
    // Publishing may meet the recovering connection: retry, bounded.
    let deadline = tokio::time::Instant::now() + WAIT;
    let job_id = loop {
        match client.publish_job(&job).await {
            Ok(id) => break id,
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "publish during recovery; again");
                tokio::task::yield_now().await;
            }
            Err(e) => panic!("publishing after recovery: {e}"),
        }
    };
    let mut texts = String::new();
    loop {
        match client.recv(WAIT).await.expect("the reply queue works") {
            Some(Incoming::Event { event, .. }) if event.job_id == job_id => {
                if let EventBody::Text { text } = &event.body {
                    texts.push_str(text);
                }
                if event.body.is_terminal() {
                    assert_eq!(event.body.type_name(), "completed");
                    break;
                }
            }
            Some(_) => {}
            None => panic!("no reply within {WAIT:?} after the connection dropped"),
        }
    }
    assert_eq!(texts, "echo: after the drop");
    client.close().await;
    worker.shutdown();
    worker.wait().await.unwrap();
    env.cleanup().await;
}

/// An event whose lease check fails by the time its frame would go out is
/// not published (`PublishError::Fenced`); one whose check holds is, with
/// its attribution headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_of_a_lost_lease_is_not_published() {
    use claude_worker::broker::publish::{AmqpSink, Attribution, PublishError, ReplySink};
    use claude_worker::protocol::EventV1;
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let ch = env.bus.conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let lane_ch = env.bus.conn.create_channel().await.unwrap();
    lane_ch.confirm_select(Default::default()).await.unwrap();
    let sink = AmqpSink::new(
        ch,
        vec![lane_ch],
        16,
        env.bus.topology.clone(),
        Duration::from_secs(5),
        None,
    );
    let event = |seq: u64| -> EventV1 {
        serde_json::from_value(json!({"v": 1, "job_id": "fence-job", "session_key": "k",
            "seq": seq, "attempt": 1, "type": "text", "text": format!("piece {seq}"),
            "metadata": {}}))
        .unwrap()
    };
    let lost = || false;
    let held = || true;
    for (seq, fence) in [(0u64, &lost as &(dyn Fn() -> bool + Sync)), (1, &held)] {
        let ev = event(seq);
        let body = serde_json::to_vec(&ev).unwrap();
        let from = Attribution {
            worker_id: "fence-worker",
            lease_epoch: 7,
            fence: Some(fence),
        };
        let sent = sink
            .publish_event(&env.bus.reply_key, &ev, &body, &from)
            .await;
        match seq {
            0 => assert!(matches!(sent, Err(PublishError::Fenced)), "{sent:?}"),
            _ => sent.unwrap(),
        }
    }
    let (_, got) = env.next_event("fence-job").await;
    assert_eq!(got.seq, 1, "only the event whose lease held went out");
    assert_eq!(
        env.attribution("fence-job", 1).unwrap().lease_epoch,
        Some(7)
    );
    // The same through a job's pipelined lane: the fence is checked right
    // before each frame, and `settle` waits for the confirms.
    let mut lane = sink.event_lane(None).expect("the AMQP sink has lanes");
    for (seq, fence) in [
        (2u64, &lost as &(dyn Fn() -> bool + Sync)),
        (3, &held),
        (4, &held),
    ] {
        let ev = event(seq);
        let body = serde_json::to_vec(&ev).unwrap();
        let from = Attribution {
            worker_id: "fence-worker",
            lease_epoch: 8,
            fence: Some(fence),
        };
        let sent = lane.send(&env.bus.reply_key, &ev, body, &from).await;
        match seq {
            2 => assert!(matches!(sent, Err(PublishError::Fenced)), "{sent:?}"),
            _ => sent.unwrap(),
        }
    }
    lane.settle(Some(&held)).await.unwrap();
    let lost_fence: &(dyn Fn() -> bool + Sync) = &lost;
    assert!(
        matches!(lane.settle(Some(lost_fence)).await, Ok(())),
        "nothing left to confirm, nothing to send"
    );
    let seqs = [
        env.next_event("fence-job").await.1.seq,
        env.next_event("fence-job").await.1.seq,
    ];
    assert_eq!(
        seqs,
        [3, 4],
        "only the lane's events whose lease held, in order"
    );
    assert_eq!(
        env.attribution("fence-job", 3).unwrap().lease_epoch,
        Some(8)
    );
    assert!(env
        .maybe_event("fence-job", Duration::from_millis(300))
        .await
        .is_none());
    env.cleanup().await;
}
