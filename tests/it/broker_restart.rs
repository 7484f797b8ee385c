//! A RabbitMQ restart with turns in flight, on a broker node of the test's
//! own (`common::broker_node`): two workers keep their jobs, publish each
//! job's one terminal event once the broker is back, take new jobs, answer
//! control messages, and stop cleanly afterwards. Observed through a
//! durable queue of the test's own, so nothing the broker confirmed is
//! missed while the test's own connection is down too.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use claude_worker::broker::Topology;
use claude_worker::client::JobTracker;
use claude_worker::config::Secret;
use claude_worker::protocol::{EventBody, EventV1};
use claude_worker::worker::Worker;
use lapin::Channel;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::common::broker_node::BrokerNode;
use crate::common::tap::{self, producer, publish, tap, Seen};
use crate::harness::{Backend, TestEnv, WAIT};
use crate::mock_api::Behavior;

const REPLY_KEY: &str = "restart.replies";

async fn publish_job(ch: &Channel, topo: &Topology, key: &str, prompt: &str) -> String {
    tap::publish_job(ch, topo, REPLY_KEY, key, prompt).await
}

/// Per job: the events the tap saw, by seq (duplicates folded), and the
/// epochs they came with.
#[derive(Default)]
struct Observed {
    events: HashMap<String, BTreeMap<u64, (EventV1, Option<i64>)>>,
    control: Vec<Value>,
}

impl Observed {
    fn add(&mut self, (raw, epoch): Seen) {
        if raw["type"] == "control_result" {
            self.control.push(raw);
            return;
        }
        // Session lifecycle events (`session.*`) are not job events.
        if raw["type"]
            .as_str()
            .is_some_and(|t| t.starts_with("session."))
        {
            return;
        }
        let ev: EventV1 = serde_json::from_value(raw).expect("an event");
        self.events
            .entry(ev.job_id.clone())
            .or_default()
            .insert(ev.seq, (ev, epoch));
    }

    fn terminals(&self, job: &str) -> Vec<&EventV1> {
        self.events
            .get(job)
            .map(|m| {
                m.values()
                    .map(|(e, _)| e)
                    .filter(|e| e.body.is_terminal())
                    .collect()
            })
            .unwrap_or_default()
    }
}

async fn start_worker(env: &TestEnv, url: &str, id: &str, publish_timeout_ms: u64) -> Worker {
    let mut s = env.settings();
    s.amqp.url = Secret::new(url);
    s.amqp.publish_timeout_ms = publish_timeout_ms;
    s.worker.id = id.into();
    s.worker.max_concurrent_turns = 3;
    s.validate().unwrap();
    Worker::start(s).await.expect("worker starts")
}

/// The outage (3 s, plus the reconnection) is well within
/// `amqp.publish_timeout_ms`: the turns in flight wait for the connection
/// and publish once it is back, without a retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_with_turns_in_flight_loses_nothing() {
    let retried = restart_scenario(30_000, Duration::from_secs(3)).await;
    assert!(retried.is_empty(), "{retried:?}");
}

/// The outage outlasts `amqp.publish_timeout_ms`: the turns in flight stop
/// (their jobs handed back to the database, `interrupted`) and run again
/// once the broker is back — still one terminal event each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_longer_than_the_publish_timeout_loses_nothing() {
    let retried = restart_scenario(1_000, Duration::from_secs(4)).await;
    assert!(
        retried.iter().any(|r| r == "interrupted"),
        "the held turns were interrupted and retried: {retried:?}"
    );
}

/// Runs the restart scenario; returns the reasons of the `retrying` events.
async fn restart_scenario(publish_timeout_ms: u64, outage: Duration) -> Vec<String> {
    let node = BrokerNode::start().await;
    let env = TestEnv::new(Backend::Sqlite).await;
    let url = node.url();
    let topo = Topology::from_prefix(&env.prefix, "prompt");
    let mut rx = tap(url.clone(), topo.clone(), format!("{}.tap", env.prefix));
    let w1 = start_worker(&env, &url, "restart-w1", publish_timeout_ms).await;
    let w2 = start_worker(&env, &url, "restart-w2", publish_timeout_ms).await;

    // Before: 4 turns held open mid-answer, 8 more queued behind them or
    // running on other sessions.
    let ch = producer(&url, &topo).await;
    let mut jobs = Vec::new();
    for s in 0..4 {
        env.mock
            .push_behavior_for(&format!("h{s}"), Behavior::hold(format!("held answer {s}")));
        jobs.push(
            publish_job(
                &ch,
                &topo,
                &format!("restart:{s}"),
                &format!("[[mock:h{s}]] first {s}"),
            )
            .await,
        );
    }
    env.mock.wait_for_held(4, WAIT).await;
    for s in 0..8 {
        jobs.push(
            publish_job(
                &ch,
                &topo,
                &format!("restart:{}", s % 6),
                &format!("before {s}"),
            )
            .await,
        );
    }

    // The restart: the held turns finish while the broker is down.
    node.stop_app().await;
    env.mock.release_held();
    // The outage lasts a few seconds (the scenario, not a synchronisation).
    tokio::time::sleep(outage).await;
    node.start_app().await;

    // After: new jobs, and a cancel of a held one.
    let ch = producer(&url, &topo).await;
    for s in 0..6 {
        jobs.push(publish_job(&ch, &topo, &format!("restart:{s}"), &format!("after {s}")).await);
    }
    env.mock
        .push_behavior_for("hc", Behavior::hold("never finished"));
    let cancelled = publish_job(&ch, &topo, "restart:cancel", "[[mock:hc]] to cancel").await;
    env.mock.wait_for_held(5, WAIT).await;
    let request_id = uuid::Uuid::new_v4().to_string();
    let cancel = json!({"v": 1, "type": "cancel", "job_id": cancelled, "request_id": request_id});
    publish(&ch, &topo.control_exchange, "", REPLY_KEY, &cancel).await;

    let mut seen = Observed::default();
    let deadline = Instant::now() + Duration::from_secs(120);
    let all_done = |seen: &Observed| {
        jobs.iter()
            .chain([&cancelled])
            .all(|j| !seen.terminals(j).is_empty())
            && !seen.control.is_empty()
    };
    while !all_done(&seen) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(r)) => seen.add(r),
            _ => {
                let missing: Vec<&String> = jobs
                    .iter()
                    .filter(|j| seen.terminals(j).is_empty())
                    .collect();
                panic!(
                    "after the restart: no terminal for {missing:?} (cancel answered: {})",
                    !seen.control.is_empty()
                );
            }
        }
    }
    // Stragglers (a republished terminal, a late duplicate) would arrive now.
    while let Ok(Some(r)) = tokio::time::timeout(Duration::from_secs(1), rx.recv()).await {
        seen.add(r);
    }

    assert_eq!(seen.control.len(), 1, "one answer: {:?}", seen.control);
    assert_eq!(seen.control[0]["ok"], true, "{:?}", seen.control);
    for job in jobs.iter().chain([&cancelled]) {
        let events = &seen.events[job];
        let terminals = seen.terminals(job);
        assert_eq!(terminals.len(), 1, "{job}: one terminal: {events:#?}");
        let last = events.values().next_back().unwrap();
        assert!(
            last.0.body.is_terminal(),
            "{job}: nothing after the terminal"
        );
        // What the client library makes of it: one answer, the right one.
        let mut tracker = JobTracker::new(job.clone());
        for (ev, epoch) in events.values() {
            tracker.accept(ev, *epoch);
        }
        assert!(tracker.is_finished());
        match &terminals[0].body {
            EventBody::Completed { result, .. } => {
                assert_ne!(job, &cancelled);
                assert_eq!(tracker.text(), result, "{job}: the text adds up");
            }
            EventBody::Cancelled { .. } => assert_eq!(job, &cancelled),
            other => panic!("{job}: {other:?}"),
        }
    }

    let retried: Vec<String> = seen
        .events
        .values()
        .flat_map(|m| m.values())
        .filter_map(|(e, _)| match &e.body {
            EventBody::Retrying { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .collect();
    let gaps = seen
        .events
        .values()
        .filter(|m| m.keys().copied().ne(0..m.len() as u64))
        .count();
    eprintln!(
        "broker restart: {} jobs, each one terminal; retrying events {retried:?}; jobs with a seq gap (events lost with the broker) {gaps}",
        jobs.len() + 1
    );

    // Nobody wedged: both workers stop within their grace.
    for w in [w1, w2] {
        w.shutdown();
        tokio::time::timeout(WAIT, w.wait())
            .await
            .expect("the worker stops after the restart")
            .expect("cleanly");
    }
    drop(rx);
    env.cleanup().await;
    drop(node);
    retried
}

/// A broker that stays down past `amqp.recovery_limit_secs`: the worker
/// stops with an error (its supervisor restarts it) instead of holding
/// its leases, and the turn it had in flight runs again on a worker that
/// starts once the broker is back — one terminal event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_stays_down_stops_the_worker_and_nothing_is_lost() {
    let node = BrokerNode::start().await;
    let env = TestEnv::new(Backend::Sqlite).await;
    let url = node.url();
    let topo = Topology::from_prefix(&env.prefix, "prompt");
    let mut rx = tap(url.clone(), topo.clone(), format!("{}.tap", env.prefix));
    let mut s = env.settings();
    s.amqp.url = Secret::new(url.as_str());
    s.amqp.publish_timeout_ms = 1_000;
    s.amqp.recovery_limit_secs = 2;
    s.worker.id = "down-w1".into();
    let w1 = Worker::start(s.clone()).await.unwrap();
    let ch = producer(&url, &topo).await;
    env.mock
        .push_behavior_for("hd", Behavior::hold("the answer, at last"));
    let job = publish_job(&ch, &topo, "down:a", "[[mock:hd]] in flight").await;
    env.mock.wait_for_held(1, WAIT).await;

    node.stop_app().await;
    env.mock.release_held();
    let stopped = tokio::time::timeout(WAIT, w1.wait())
        .await
        .expect("the worker gives up within its limits");
    let err = stopped.expect_err("it ends with an error");
    assert!(
        err.to_lowercase().contains("broker") || err.contains("recover"),
        "{err}"
    );

    node.start_app().await;
    s.worker.id = "down-w2".into();
    let w2 = Worker::start(s).await.unwrap();
    let mut seen = Observed::default();
    let deadline = Instant::now() + WAIT;
    while seen.terminals(&job).is_empty() {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(r)) => seen.add(r),
            _ => panic!("no terminal for the job after the broker came back"),
        }
    }
    while let Ok(Some(r)) = tokio::time::timeout(Duration::from_secs(1), rx.recv()).await {
        seen.add(r);
    }
    let terminals = seen.terminals(&job);
    assert_eq!(terminals.len(), 1);
    match &terminals[0].body {
        // The held answer was lost with the broker; the retry answers anew.
        EventBody::Completed { result, .. } => assert_eq!(result, "echo: [[mock:hd]] in flight"),
        other => panic!("{other:?}"),
    }
    w2.shutdown();
    tokio::time::timeout(WAIT, w2.wait())
        .await
        .expect("stops")
        .expect("cleanly");
    drop(rx);
    env.cleanup().await;
    drop(node);
}
