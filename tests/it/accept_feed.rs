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
        .accept_job_by(
            &NewJob {
                job_id: job_id.clone(),
                session_key: key,
                spec,
            },
            now_ms(),
            Some("another-worker"),
        )
        .await
        .unwrap();
    assert_eq!(out, AcceptOutcome::Inserted);
    job_id
}

async fn stop(worker: Worker) {
    worker.shutdown();
    tokio::time::timeout(WAIT, worker.wait())
        .await
        .expect("the worker stops")
        .expect("cleanly");
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

    stop(worker).await;
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

    stop(worker).await;
    env.cleanup().await;
    drop(pg);
}

/// Who hears what: a job for a session whose lease another worker holds
/// goes to that worker only; the holder's own accept to nobody; a job whose
/// session waits for a worker to every listener. Announcements arrive in
/// commit order, so "not heard" is shown by the next one heard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_worker_hears_only_what_concerns_it() {
    let env = TestEnv::new(Backend::Postgres).await;
    let url = env.settings().database.url.clone();
    let s = store::connect(&url, 4).await.expect("connect");
    s.migrate().await.unwrap();
    let mut w1 = s
        .listen_accepts("w1")
        .await
        .unwrap()
        .expect("postgres announces");
    let mut w2 = s
        .listen_accepts("w2")
        .await
        .unwrap()
        .expect("postgres announces");
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
    // No lease: everyone hears that the session waits for a worker.
    s.accept_job_by(&job("a0", "A"), now, Some("w2"))
        .await
        .unwrap();
    for feed in [&mut w1, &mut w2] {
        let n = heard(feed).await;
        assert_eq!(
            (n.job_id.as_str(), n.session_key.as_str(), n.held),
            ("a0", "A", false)
        );
    }
    // w1 holds A.
    let lease = s
        .claim_session("w1", now, 30_000, Some("A"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lease.session_key, "A");
    // w1's own accept: nobody. w2's accept of A: w1 only.
    s.accept_job_by(&job("a1", "A"), now, Some("w1"))
        .await
        .unwrap();
    s.accept_job_by(&job("a2", "A"), now, Some("w2"))
        .await
        .unwrap();
    let n = heard(&mut w1).await;
    assert_eq!((n.job_id.as_str(), n.held), ("a2", true));
    // A job of a session nobody holds: both hear it, w2 with nothing before.
    s.accept_job_by(&job("b0", "B"), now, Some("w1"))
        .await
        .unwrap();
    assert_eq!(heard(&mut w2).await.job_id, "b0");
    assert_eq!(heard(&mut w1).await.job_id, "b0");
    // A redelivery (known job id) is not announced again.
    s.accept_job_by(&job("a2", "A"), now, Some("w2"))
        .await
        .unwrap();
    s.accept_job_by(&job("c0", "C"), now, Some("w2"))
        .await
        .unwrap();
    assert_eq!(heard(&mut w1).await.job_id, "c0");
    assert_eq!(heard(&mut w2).await.job_id, "c0");
    drop((w1, w2, s));
    env.cleanup().await;
}

async fn heard(feed: &mut store::AcceptFeed) -> store::AcceptNotice {
    tokio::time::timeout(WAIT, feed.next())
        .await
        .expect("an announcement")
        .unwrap()
        .expect("no reconnect")
}
