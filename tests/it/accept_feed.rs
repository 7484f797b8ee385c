//! Accepts announced by the database (Postgres `LISTEN`/`NOTIFY`, see
//! `worker/accept_feed.rs`): a lease holder waiting for its session's
//! follow-up is woken when any worker accepts it, also after the database
//! restarted. The holder's own poll is set far beyond the test's bounds
//! (a test hook), so only an announcement can wake it in time; without
//! one the job would wait for the affinity window to end (60 s).

use std::sync::Arc;
use std::time::Duration;

use claude_worker::config::{Secret, Settings};
use claude_worker::protocol::EventBody;
use claude_worker::store::{self, now_ms, AcceptOutcome, NewJob, SessionStore};
use claude_worker::worker::Hooks;
use claude_worker::worker::Worker;
use serde_json::json;

use crate::common::pg_node::PgNode;
use crate::harness::{Backend, TestEnv, WAIT};

/// Well inside the affinity window and the hook's poll.
const WOKEN_WITHIN: Duration = Duration::from_secs(25);

fn holding_settings(env: &TestEnv, db_url: Option<String>) -> Settings {
    let mut s = env.settings();
    if let Some(url) = db_url {
        s.database.url = Secret::new(url);
    }
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

/// Runs a job through the broker to completion; returns its id.
async fn run_ok(env: &mut TestEnv, key: &str, prompt: &str) -> String {
    let job = env.publish_job(key, prompt, json!({})).await;
    let events = env.events_until_terminal(&job).await;
    match &events.last().unwrap().body {
        EventBody::Completed { .. } => job,
        other => panic!("{prompt}: {other:?}"),
    }
}

/// What another worker's accept does: the same store call, so the same
/// statement and announcement. The follow-up copies the first job's spec
/// (reply key, profile) with a new prompt.
async fn accept_elsewhere(store: &Arc<dyn SessionStore>, first: &str, prompt: &str) -> String {
    let mut spec = store.get_job(first).await.unwrap().unwrap().spec;
    spec.prompt = prompt.to_string();
    let job_id = uuid::Uuid::new_v4().to_string();
    let key = store.get_job(first).await.unwrap().unwrap().session_key;
    let out = store
        .accept_job(
            &NewJob {
                job_id: job_id.clone(),
                session_key: key,
                spec,
            },
            now_ms(),
        )
        .await
        .unwrap();
    assert_eq!(out, AcceptOutcome::Inserted);
    job_id
}

/// The follow-up completes on the holder, warm, well before its poll.
async fn completes_warm_on(env: &mut TestEnv, worker: &Worker, job: &str, hits_before: u64) {
    let events = tokio::time::timeout(WOKEN_WITHIN, env.events_until_terminal(job))
        .await
        .expect("the holder was woken by the announcement");
    assert!(
        matches!(events.last().unwrap().body, EventBody::Completed { .. }),
        "{events:#?}"
    );
    let stats = worker.context.warm.stats();
    assert_eq!(stats.spawns, 1, "one CLI for the conversation: {stats:?}");
    assert_eq!(stats.hits, hits_before + 1, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follow_up_accepted_by_another_worker_wakes_the_warm_holder() {
    let mut env = TestEnv::new(Backend::Postgres).await;
    let worker = Worker::start_with(holding_settings(&env, None), polls_never())
        .await
        .expect("worker starts");
    let key = "feed:other-worker";
    let first = run_ok(&mut env, key, "announced 0").await;
    // The holder now waits for a follow-up (window 60 s, poll 600 s).
    let store = Arc::clone(&worker.context.store);
    let job = accept_elsewhere(&store, &first, "announced 1").await;
    completes_warm_on(&mut env, &worker, &job, 0).await;
    // A follow-up accepted by this worker itself still wakes it too.
    run_ok(&mut env, key, "announced 2").await;
    assert_eq!(worker.context.warm.stats().hits, 2);

    worker.shutdown();
    tokio::time::timeout(WAIT, worker.wait())
        .await
        .expect("the worker stops")
        .expect("cleanly");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_postgres_restart_holders_are_woken_again() {
    let pg = PgNode::start();
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let worker = Worker::start_with(holding_settings(&env, Some(pg.url())), polls_never())
        .await
        .expect("worker starts");
    let key = "feed:pg-restart";
    let first = run_ok(&mut env, key, "before the restart").await;

    // The database goes away while the holder waits; the listening
    // connection breaks. The outage lasts a few seconds (the scenario, not
    // a synchronisation).
    tokio::task::block_in_place(|| pg.stop());
    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::task::block_in_place(|| pg.start_again());

    // Another worker accepts the follow-up once the database is back. The
    // feed listens again (and has holders look once): either way the
    // holder runs it, warm, long before its own poll.
    let other = store::connect(&Secret::new(pg.url()), 2)
        .await
        .expect("the database is back");
    let job = accept_elsewhere(&other, &first, "after the restart").await;
    completes_warm_on(&mut env, &worker, &job, 0).await;

    worker.shutdown();
    tokio::time::timeout(WAIT, worker.wait())
        .await
        .expect("the worker stops")
        .expect("cleanly");
    env.cleanup().await;
    drop(pg);
}
