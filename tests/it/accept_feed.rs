//! Accept announcements between workers (through the broker, see
//! `worker/accept_feed.rs`): a lease holder waiting for its session's
//! follow-up is woken when another worker accepts it, also after a broker
//! restart. The holder's own poll is set far beyond the test's bounds (a
//! test hook), so only an announcement can wake it in time; without one the
//! job would wait for the affinity window to end (60 s).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use claude_worker::broker::Topology;
use claude_worker::config::{Secret, Settings};
use claude_worker::protocol::{EventBody, EventV1};
use claude_worker::store::{self, now_ms, AcceptAudience, AcceptOutcome, NewJob};
use claude_worker::worker::Hooks;
use claude_worker::worker::Worker;
use futures_util::FutureExt;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Mutex};

use crate::common::broker_node::BrokerNode;
use crate::common::tap::{producer, publish_job, tap, Seen};
use crate::harness::{Backend, TestEnv, WAIT};
use crate::mock_api::Behavior;

/// Well inside the affinity window and the hook's poll.
const WOKEN_WITHIN: Duration = Duration::from_secs(25);
/// Follow-ups published before giving up on the other worker accepting one
/// (the queue hands deliveries to its two consumers in turn).
const FOLLOW_UPS_MAX: usize = 8;

fn holding_settings(env: &TestEnv, id: &str, amqp_url: Option<&str>) -> Settings {
    let mut s = env.settings();
    if let Some(url) = amqp_url {
        s.amqp.url = Secret::new(url);
    }
    s.worker.id = id.into();
    s.worker.warm_affinity_ms = 60_000;
    s.validate().expect("valid settings");
    s
}

fn polls_never() -> Hooks {
    Hooks {
        affinity_poll: Some(Duration::from_secs(600)),
        ..Hooks::default()
    }
}

async fn start(settings: Settings) -> Worker {
    Worker::start_with(settings, polls_never())
        .await
        .expect("worker starts")
}

/// Runs a job through the broker to completion; returns its id.
async fn run_ok(env: &mut TestEnv, key: &str, prompt: &str) -> String {
    let job = env.publish_job(key, prompt, json!({})).await;
    let events = env.events_until_terminal(&job).await;
    match &events.last().unwrap().body {
        EventBody::Completed { .. } => job,
        other => panic!("{prompt}: {other:?}"),
    }
}

async fn stop(worker: Worker) {
    worker.shutdown();
    tokio::time::timeout(WAIT, worker.wait())
        .await
        .expect("the worker stops")
        .expect("cleanly");
}

/// Publishes follow-ups of a session `holder` holds until `other` has
/// accepted one; every one completes on the holder, warm (its one CLI
/// process: a hit each), within [`WOKEN_WITHIN`]. `publish` sends the
/// `n`th follow-up; `terminal` waits for a job's terminal event.
async fn follow_ups_reach_the_holder<P, PF, T, TF>(
    holder: &Worker,
    other: &Worker,
    mut publish: P,
    mut terminal: T,
) where
    P: FnMut(usize) -> PF,
    PF: std::future::Future<Output = String>,
    T: FnMut(String) -> TF,
    TF: std::future::Future<Output = EventV1>,
{
    let hits_before = holder.context.warm.stats().hits;
    for n in 0..FOLLOW_UPS_MAX {
        let mut accepted_there = std::pin::pin!(other.context.job_accepted());
        let job = publish(n).await;
        let last = tokio::time::timeout(WOKEN_WITHIN, terminal(job))
            .await
            .expect("the holder was woken in time");
        assert!(
            matches!(last.body, EventBody::Completed { .. }),
            "{last:#?}"
        );
        let stats = holder.context.warm.stats();
        assert_eq!(stats.spawns, 1, "one CLI for the conversation: {stats:?}");
        assert_eq!(stats.hits, hits_before + n as u64 + 1, "{stats:?}");
        if accepted_there.as_mut().now_or_never().is_some() {
            return;
        }
    }
    panic!("the other worker accepted none of {FOLLOW_UPS_MAX} follow-ups");
}

/// Two workers on one queue: a follow-up the other worker accepts is
/// announced to the holder, which runs it warm at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follow_up_accepted_by_another_worker_wakes_the_warm_holder() {
    let mut env = TestEnv::new(Backend::Postgres).await;
    let holder = start(holding_settings(&env, "feed-holder", None)).await;
    let key = "feed:other-worker";
    run_ok(&mut env, key, "announced 0").await;
    // The holder now waits for a follow-up (window 60 s, poll 600 s).
    let other = start(holding_settings(&env, "feed-other", None)).await;
    let env = Mutex::new(env);
    follow_ups_reach_the_holder(
        &holder,
        &other,
        |n| {
            let env = &env;
            async move {
                let prompt = format!("announced {}", n + 1);
                env.lock().await.publish_job(key, &prompt, json!({})).await
            }
        },
        |job| {
            let env = &env;
            async move {
                let events = env.lock().await.events_until_terminal(&job).await;
                events.last().unwrap().clone()
            }
        },
    )
    .await;

    stop(other).await;
    stop(holder).await;
    env.into_inner().cleanup().await;
}

type Taps = Mutex<(mpsc::UnboundedReceiver<Seen>, HashMap<String, Vec<Value>>)>;

/// The same across a restart of the broker (a node of the test's own): the
/// announcements' queues and bindings come back with the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_broker_restart_holders_are_woken_again() {
    let node = BrokerNode::start().await;
    let env = TestEnv::new(Backend::Sqlite).await;
    let url = node.url();
    let topo = Topology::from_prefix(&env.prefix, "prompt");
    let taps: Taps = Mutex::new((
        tap(url.clone(), topo.clone(), format!("{}.tap", env.prefix)),
        HashMap::new(),
    ));
    let w1 = start(holding_settings(&env, "feed-w1", Some(&url))).await;
    let w2 = start(holding_settings(&env, "feed-w2", Some(&url))).await;
    let key = "feed:broker-restart";
    let reply_key = format!("{}.feed", env.prefix);
    let terminal = |job: String| {
        let taps = &taps;
        async move { wait_terminal(taps, &job).await }
    };

    // The first job: the worker that runs it holds the session afterwards.
    let ch = producer(&url, &topo).await;
    let first = publish_job(&ch, &topo, &reply_key, key, "before the restart").await;
    let last = terminal(first).await;
    assert!(
        matches!(last.body, EventBody::Completed { .. }),
        "{last:#?}"
    );
    let (holder, other) = if w1.context.warm.stats().spawns == 1 {
        (w1, w2)
    } else {
        (w2, w1)
    };

    // The restart. The outage lasts a few seconds (the scenario, not a
    // synchronisation).
    node.stop_app().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    node.start_app().await;
    // Both workers are back before the follow-ups go out: their
    // announcement queues bound again (else one sent meanwhile is lost: a
    // poll's worth), and both consuming the jobs queue (else the other one
    // accepts none).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let bindings = node
            .ctl(&["list_bindings", "source_name", "routing_key"])
            .await;
        let queues = node.ctl(&["list_queues", "name", "consumers"]).await;
        let bound = [&holder, &other]
            .iter()
            .all(|w| bindings.contains(&format!("{}\theld.{}", topo.workers_exchange, w.id)));
        let consuming = queues.contains(&format!("{}\t2", topo.jobs_queue));
        if bound && consuming {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not back after the restart: bound {bound}, two consumers {consuming}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let ch = producer(&url, &topo).await;
    follow_ups_reach_the_holder(
        &holder,
        &other,
        |n| {
            let (ch, topo, reply_key) = (&ch, &topo, &reply_key);
            async move {
                let prompt = format!("after the restart {n}");
                publish_job(ch, topo, reply_key, key, &prompt).await
            }
        },
        terminal,
    )
    .await;

    stop(other).await;
    stop(holder).await;
    env.cleanup().await;
    drop(node);
}

/// `job`'s terminal event as tapped (other jobs' events are kept).
async fn wait_terminal(taps: &Taps, job: &str) -> EventV1 {
    let mut guard = taps.lock().await;
    let (rx, kept) = &mut *guard;
    loop {
        let terminal = kept.get(job).into_iter().flatten().find_map(|raw| {
            let event: EventV1 = serde_json::from_value(raw.clone()).ok()?;
            event.body.is_terminal().then_some(event)
        });
        if let Some(event) = terminal {
            return event;
        }
        let (raw, _) = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("an event in time")
            .expect("the tap runs");
        if let Some(id) = raw.get("job_id").and_then(|v| v.as_str()) {
            kept.entry(id.to_string()).or_default().push(raw);
        }
    }
}

/// Who should hear of an accept: of a job for a session whose lease
/// another worker holds, that worker only; of the holder's own accept,
/// nobody; of a job whose session waits for a worker, every worker; of a
/// redelivery, nobody. On both backends, read by the accept itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_accept_names_who_should_hear_of_it() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let env = TestEnv::new(backend).await;
        let url = env.settings().database.url.clone();
        let s = store::connect(&url, 4).await.expect("connect");
        s.migrate().await.unwrap();
        let job = |id: &str, key: &str| NewJob {
            job_id: id.to_string(),
            session_key: key.to_string(),
            spec: serde_json::from_value(json!({
                "prompt": id, "mode": "continue", "claude_session_id": null,
                "profile": "default", "model": null, "max_turns": 5,
                "permission_mode": "default", "metadata": {}, "reply_to": null,
            }))
            .expect("a job spec"),
        };
        let now = now_ms();
        let accept = |id: &str, key: &str, by: &str, at: i64| {
            let (s, job, by) = (Arc::clone(&s), job(id, key), by.to_string());
            async move { s.accept_job_by(&job, at, Some(&by)).await.unwrap() }
        };
        // No lease: every worker should hear that the session waits.
        let r = accept("a0", "A", "w2", now).await;
        assert_eq!(r.outcome, AcceptOutcome::Inserted);
        assert_eq!(r.audience, Some(AcceptAudience::Everyone), "{backend:?}");
        // w1 holds A: its own accept, nobody; w2's accept, w1.
        let lease = s
            .claim_session("w1", now, 30_000, Some("A"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(lease.session_key, "A");
        assert_eq!(accept("a1", "A", "w1", now).await.audience, None);
        let r = accept("a2", "A", "w2", now).await;
        assert_eq!(r.audience, Some(AcceptAudience::Holder("w1".into())));
        // A redelivery (known job id): nobody.
        let r = accept("a2", "A", "w2", now).await;
        assert!(matches!(r.outcome, AcceptOutcome::Duplicate { .. }));
        assert_eq!(r.audience, None);
        // Once w1's lease has expired, A waits for any worker again.
        let r = accept("a3", "A", "w1", now + 60_000).await;
        assert_eq!(r.audience, Some(AcceptAudience::Everyone), "{backend:?}");
        drop(s);
        env.cleanup().await;
    }
}

/// A session accepted by a full worker is announced to the others, and a
/// worker with a free slot claims it at once. The free worker's sweep
/// (which would find it too) is set to 600 s, it keeps no lease after a
/// turn, and each job goes out only once its scheduler waits with nothing
/// to claim (a test hook), so only a wake-up can make it look in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_accepted_by_a_full_worker_is_claimed_at_once_by_a_free_one() {
    let mut env = TestEnv::new(Backend::Postgres).await;
    let settings = |id: &str| {
        let mut s = env.settings();
        s.worker.id = id.into();
        s.worker.max_concurrent_turns = 1;
        s.worker.sweep_interval_secs = 600;
        s.worker.warm_affinity_ms = 0;
        s.validate().expect("valid settings");
        s
    };
    // The full worker: its one slot runs a turn the mock holds open.
    let full = Worker::start(settings("feed-full")).await.expect("starts");
    env.mock
        .push_behavior_for("busy", Behavior::hold("held open"));
    let busy = env
        .publish_job("feed:busy", "[[mock:busy]] keep the slot", json!({}))
        .await;
    env.mock.wait_for_held(1, WAIT).await;
    let idle = Arc::new(tokio::sync::Notify::new());
    let hooks = Hooks {
        scheduler_idle: Some(Arc::clone(&idle)),
        ..Hooks::default()
    };
    let free = Worker::start_with(settings("feed-free"), hooks)
        .await
        .expect("starts");

    // New sessions until the full worker accepts one (the queue hands
    // deliveries to both in turn); each must complete, on the free worker.
    let mut accepted_by_full = false;
    for n in 0..FOLLOW_UPS_MAX {
        tokio::time::timeout(WAIT, idle.notified())
            .await
            .expect("the free worker's scheduler waits");
        let mut accepted_there = std::pin::pin!(full.context.job_accepted());
        let job = env
            .publish_job(&format!("feed:new-{n}"), "a new session", json!({}))
            .await;
        let events = tokio::time::timeout(WOKEN_WITHIN, env.events_until_terminal(&job))
            .await
            .expect("claimed in time");
        let last = events.last().unwrap();
        assert!(
            matches!(last.body, EventBody::Completed { .. }),
            "{last:#?}"
        );
        let by = env.attribution(&job, last.seq).and_then(|a| a.worker_id);
        assert_eq!(by.as_deref(), Some("feed-free"));
        if accepted_there.as_mut().now_or_never().is_some() {
            accepted_by_full = true;
            break;
        }
    }
    assert!(
        accepted_by_full,
        "the full worker accepted none of {FOLLOW_UPS_MAX}"
    );

    env.mock.release_held();
    let events = env.events_until_terminal(&busy).await;
    assert!(matches!(
        events.last().unwrap().body,
        EventBody::Completed { .. }
    ));
    stop(free).await;
    stop(full).await;
    env.cleanup().await;
}
