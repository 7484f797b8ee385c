//! A PostgreSQL restart mid-run, on a server of the test's own
//! (`common::pg_node`): turns in flight finish or run again, deliveries
//! that arrive while the database is down are not acked until persisted,
//! and the same worker carries on without a restart — every job ends with
//! exactly one terminal event.

use std::time::Duration;

use claude_worker::client::JobTracker;
use claude_worker::config::Secret;
use claude_worker::protocol::EventBody;
use serde_json::json;

use crate::common::pg_node::PgNode;
use crate::harness::{Backend, TestEnv, WAIT};
use crate::mock_api::Behavior;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_mid_run_loses_nothing() {
    let pg = PgNode::start();
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let worker = env
        .start_worker_with(|s| {
            s.database.url = Secret::new(pg.url());
            s.worker.id = "pg-restart".into();
            s.worker.max_concurrent_turns = 3;
            // Leases of the interrupted turns expire soon after the restart.
            s.worker.lease_ttl_secs = 3;
        })
        .await;

    let mut jobs = Vec::new();
    for s in 0..3 {
        env.mock
            .push_behavior_for(&format!("pg{s}"), Behavior::hold(format!("held {s}")));
        jobs.push(
            env.publish_job(
                &format!("pg:{s}"),
                &format!("[[mock:pg{s}]] first"),
                json!({}),
            )
            .await,
        );
    }
    env.mock.wait_for_held(3, WAIT).await;
    for s in 0..3 {
        jobs.push(
            env.publish_job(&format!("pg:{s}"), &format!("queued {s}"), json!({}))
                .await,
        );
    }

    // The database goes away with three turns mid-answer; they finish
    // while it is down, and new jobs arrive meanwhile.
    tokio::task::block_in_place(|| pg.stop());
    env.mock.release_held();
    for s in 0..4 {
        jobs.push(
            env.publish_job(
                &format!("pg:{}", s % 2 + 3),
                &format!("during {s}"),
                json!({}),
            )
            .await,
        );
    }
    // The outage lasts a few seconds (the scenario, not a synchronisation).
    tokio::time::sleep(Duration::from_secs(3)).await;
    tokio::task::block_in_place(|| pg.start_again());
    for s in 0..2 {
        jobs.push(
            env.publish_job(&format!("pg:{s}"), &format!("after {s}"), json!({}))
                .await,
        );
    }

    let mut retried = 0;
    for job in &jobs {
        let events = env.events_until_terminal(job).await;
        let mut tracker = JobTracker::new(job.clone());
        for e in &events {
            tracker.accept(e, None);
        }
        let terminals: Vec<_> = events.iter().filter(|e| e.body.is_terminal()).collect();
        assert_eq!(terminals.len(), 1, "{job}: {events:#?}");
        match &terminals[0].body {
            EventBody::Completed { result, .. } => assert_eq!(tracker.text(), result),
            other => panic!("{job}: {other:?}"),
        }
        retried += events
            .iter()
            .filter(|e| matches!(e.body, EventBody::Retrying { .. }))
            .count();
        // Nothing after the terminal event.
        assert!(env
            .maybe_event(job, Duration::from_millis(50))
            .await
            .is_none());
    }
    eprintln!(
        "postgres restart: {} jobs, one terminal each, {retried} retrying events",
        jobs.len()
    );

    // The same worker served all of it, and stops cleanly.
    worker.shutdown();
    tokio::time::timeout(WAIT, worker.wait())
        .await
        .expect("the worker stops")
        .expect("cleanly");
    env.cleanup().await;
    drop(pg);
}

/// The pool pings only a connection that sat idle (`PING_IF_IDLE_FOR`),
/// not one handed back a moment ago: after a restart, which leaves every
/// pooled connection dead, the next store calls get fresh connections
/// instead of failing on dead ones. (With a threshold longer than the
/// outage this fails: "terminating connection due to administrator command".)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connections_dead_after_a_restart_are_replaced_unseen() {
    use claude_worker::store::{PostgresStore, SessionStore};

    let pg = PgNode::start();
    let store = PostgresStore::connect(&pg.url(), 4).await.expect("connect");
    store.migrate().await.expect("migrate");
    // Three connections in the pool (held at once, so the pool must open
    // each), all idle once they are handed back.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(store.pool().acquire().await.expect("a connection"));
    }
    drop(held);
    assert!(store.get_session("a").await.expect("a read").is_none());
    assert!(
        store.pool().size() >= 2,
        "{} connections",
        store.pool().size()
    );

    // The outage outlasts the ping threshold (the scenario, not a
    // synchronisation): every pooled connection is dead and idle that long.
    tokio::task::block_in_place(|| pg.stop());
    tokio::time::sleep(PostgresStore::PING_IF_IDLE_FOR).await;
    tokio::task::block_in_place(|| pg.start_again());
    for key in ["a", "b", "c", "d", "e"] {
        let read = store.get_session(key).await;
        assert!(
            matches!(read, Ok(None)),
            "{key} after the restart: {read:?}"
        );
    }
    store.pool().close().await;
    drop(pg);
}
