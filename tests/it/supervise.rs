//! Supervision: a panic inside a turn does not strand its session, and a
//! worker whose long-lived task ends stops and says which one.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use claude_worker::protocol::EventBody;
use claude_worker::store::{JobRecord, JobStatus};
use claude_worker::worker::{Hooks, Worker};
use lapin::options::QueueDeleteOptions;
use serde_json::json;

use crate::common::world::wait_until_async;
use crate::harness::{Backend, TestEnv, WAIT};

/// A hook that panics in the first attempt it sees, and counts attempts.
fn panic_once() -> (Hooks, Arc<AtomicUsize>) {
    let attempts = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&attempts);
    let hook = move |_: &JobRecord| {
        if seen.fetch_add(1, Ordering::SeqCst) == 0 {
            panic!("test hook: a bug in the middle of a turn");
        }
    };
    let hooks = Hooks {
        on_attempt: Some(Arc::new(hook)),
        ..Hooks::default()
    };
    (hooks, attempts)
}

#[tokio::test]
async fn a_panic_in_a_turn_hands_the_session_back_and_the_job_completes() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let (hooks, attempts) = panic_once();
    let settings = env.settings();
    settings.validate().unwrap();
    let worker = Worker::start_with(settings, hooks).await.unwrap();
    let store = worker.context.store.clone();

    let job = env
        .publish_job("supervise:panic", "after the panic", json!({}))
        .await;
    let events = env.events_until_terminal(&job).await;
    let kinds: Vec<&str> = events.iter().map(|e| e.body.type_name()).collect();
    // The panicking attempt published nothing; the session was handed back
    // at once (not left to its lease's expiry) and the job retried.
    assert_eq!(kinds.first(), Some(&"retrying"), "{kinds:?}");
    match &events[0].body {
        EventBody::Retrying {
            next_attempt,
            reason,
            ..
        } => {
            assert_eq!((*next_attempt, reason.as_str()), (2, "interrupted"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(kinds.last(), Some(&"completed"), "{kinds:?}");
    assert_eq!(events.iter().filter(|e| e.body.is_terminal()).count(), 1);
    // Strictly increasing; the retry runs above the block of seqs the
    // panicking run had reserved (docs/protocol.md: a gap between runs).
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let retried: Vec<u64> = seqs[1..].to_vec();
    assert_eq!(
        retried,
        (seqs[1]..seqs[1] + retried.len() as u64).collect::<Vec<_>>(),
        "one run's events are contiguous"
    );
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        2,
        "one panicking attempt, one good"
    );
    // Claimed twice: the panicking holder's lease was given up, not renewed.
    let session = store.get_session("supervise:panic").await.unwrap().unwrap();
    assert_eq!(session.lease_epoch, 2);
    // The worker goes on serving.
    let next = env
        .publish_job("supervise:other", "still serving?", json!({}))
        .await;
    let events = env.events_until_terminal(&next).await;
    assert_eq!(events.last().unwrap().body.type_name(), "completed");

    worker.shutdown();
    worker.wait().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_worker_whose_jobs_consumer_ends_stops_and_says_so() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let worker = env.start_worker().await;
    // The broker cancels the consumer when its queue goes away.
    let conn = lapin::Connection::connect(crate::harness::AMQP_URL, Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_delete(
        worker.topology.jobs_queue.as_str().into(),
        QueueDeleteOptions::default(),
    )
    .await
    .unwrap();
    let ended = tokio::time::timeout(WAIT, worker.wait())
        .await
        .expect("the worker did not stop after its consumer ended");
    let err = ended.expect_err("the worker should report the ended task");
    assert!(err.contains("jobs consumer"), "{err}");
    let _ = conn.close(200, "done".into()).await;
    env.cleanup().await;
}

/// Several workers starting at once on a topology nobody declared yet all
/// start (a transient broker failure while they race to declare it is
/// retried, not fatal), and a job published then is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_starting_together_on_a_fresh_topology_all_start() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    for round in 0..3 {
        let prefix = format!("{}.fresh{round}", env.prefix);
        let settings = || {
            let mut s = env.settings();
            s.amqp.prefix = prefix.clone();
            s
        };
        let (a, b, c) = tokio::join!(
            Worker::start(settings()),
            Worker::start(settings()),
            Worker::start(settings())
        );
        let workers: Vec<Worker> = [a, b, c]
            .into_iter()
            .map(|w| w.expect("every worker starts"))
            .collect();
        let topology = workers[0].topology.clone();
        for w in workers {
            w.shutdown();
            tokio::time::timeout(WAIT, w.wait())
                .await
                .expect("stops")
                .expect("stops cleanly");
        }
        topology.delete(&env.bus.channel).await;
    }
    // The test's own topology still serves.
    let worker = env.start_worker().await;
    let job = env.publish_job("fresh:after", "hello", json!({})).await;
    let events = env.events_until_terminal(&job).await;
    assert_eq!(events.last().unwrap().body.type_name(), "completed");
    worker.shutdown();
    worker.wait().await.unwrap();
    env.cleanup().await;
}

/// A worker that records a job's outcome and then dies before publishing
/// its terminal event (the hook skips the publish; the worker is then
/// stopped): another worker's outbox sweep publishes the stored event,
/// once, and marks it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_event_its_worker_never_published_goes_out_from_the_outbox() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let mut settings = env.settings();
    settings.amqp.publish_timeout_ms = 1_000;
    settings.worker.lease_ttl_secs = 3;
    settings.validate().unwrap();
    let hooks = Hooks {
        skip_terminal_publish: true,
        ..Hooks::default()
    };
    let w1 = Worker::start_with(settings.clone(), hooks).await.unwrap();
    let store = w1.context.store.clone();
    let job = env
        .publish_job("supervise:outbox", "lost words", json!({}))
        .await;
    wait_until_async("the outcome is recorded", || {
        let store = store.clone();
        let job = job.clone();
        async move {
            store.get_job(&job).await.unwrap().map(|j| j.status) == Some(JobStatus::Succeeded)
        }
    })
    .await;
    w1.shutdown();
    w1.wait().await.unwrap();
    let recorded = store
        .get_job(&job)
        .await
        .unwrap()
        .unwrap()
        .terminal_event
        .unwrap();

    let w2 = Worker::start(settings).await.unwrap();
    let events = env.events_until_terminal(&job).await;
    let terminal = events.last().unwrap();
    assert!(
        matches!(terminal.body, EventBody::Completed { .. }),
        "{events:#?}"
    );
    assert_eq!(
        serde_json::to_value(terminal).unwrap(),
        serde_json::from_str::<serde_json::Value>(&recorded).unwrap()
    );
    assert_eq!(events.iter().filter(|e| e.body.is_terminal()).count(), 1);
    // Marked once the broker confirmed it (just after the event went out).
    wait_until_async("the outbox marks the event published", || {
        let store = store.clone();
        async move {
            store
                .unpublished_terminals(i64::MAX, 10)
                .await
                .unwrap()
                .is_empty()
        }
    })
    .await;
    assert!(
        env.maybe_event(&job, std::time::Duration::from_secs(3))
            .await
            .is_none(),
        "published once"
    );
    w2.shutdown();
    w2.wait().await.unwrap();
    env.cleanup().await;
}
