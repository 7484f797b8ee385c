//! Session lifecycle events, idle expiry and the retention prune end to end
//! (issue 13): real RabbitMQ, SQLite, the real CLI against the mock API.
//! Lifecycle events are read from a queue bound with `session.#`, and each
//! is checked against its JSON Schema.

use std::process::Stdio;
use std::time::Duration;

use claude_worker::protocol::{EventBody, SessionEndReason, SessionEventKind, SessionEventV1};
use claude_worker::store::{self, SessionStatus};
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::common::world::{self, wait_until, wait_until_async, Reply};
use crate::harness::{Backend, TestEnv};

const WAIT: Duration = Duration::from_secs(30);

/// The lifecycle events of this test's broker prefix.
struct Observer {
    rx: UnboundedReceiver<Reply>,
    seen: Vec<SessionEventV1>,
}

impl Observer {
    async fn new(env: &TestEnv) -> Observer {
        let rx = world::subscribe(&env.bus.conn, &env.bus.topology, "session.#").await;
        Observer {
            rx,
            seen: Vec::new(),
        }
    }

    /// The next event of `key` that `pred` accepts (others are kept in
    /// `seen`); each is schema-checked. Duplicates (same `event_id`) are
    /// dropped, as the protocol tells readers.
    async fn next(&mut self, key: &str, pred: impl Fn(&SessionEventV1) -> bool) -> SessionEventV1 {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let reply = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "no matching session event for {key} within {WAIT:?}; seen {:#?}",
                        self.seen
                    )
                })
                .expect("subscription ended");
            crate::schema::assert_valid_reply(&reply.raw);
            let e: SessionEventV1 = serde_json::from_value(reply.raw).unwrap();
            if self.seen.iter().any(|s| s.event_id == e.event_id) {
                continue;
            }
            self.seen.push(e.clone());
            if e.session_key == key && pred(&e) {
                return e;
            }
        }
    }

    /// `(kind, reason)` of the events of `key` seen so far, idle ones left out.
    fn history(&self, key: &str) -> Vec<(SessionEventKind, Option<SessionEndReason>)> {
        self.seen
            .iter()
            .filter(|e| e.session_key == key && e.kind != SessionEventKind::Idle)
            .map(|e| (e.kind, e.reason))
            .collect()
    }
}

async fn complete(env: &mut TestEnv, key: &str, prompt: &str, extra: Value) -> String {
    let job = env.publish_job(key, prompt, extra).await;
    let ev = env.events_until_terminal(&job).await;
    assert!(
        matches!(ev.last().unwrap().body, EventBody::Completed { .. }),
        "{ev:#?}"
    );
    job
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lifecycle_events_for_new_reset_idle_expired_and_deleted_sessions() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let mut obs = Observer::new(&env).await;
    let worker = env
        .start_worker_with(|s| {
            let p = s.profiles.get_mut("default").unwrap();
            p.idle_ttl_secs = 2;
            p.retention_secs = 3_600;
        })
        .await;
    // New: the key's first job begins its conversation.
    let j1 = complete(&mut env, "life:a", "one", json!({})).await;
    let started = obs
        .next("life:a", |e| e.kind == SessionEventKind::Started)
        .await;
    assert_eq!(started.job_id.as_deref(), Some(j1.as_str()));
    assert_eq!(started.profile, "default");
    assert_eq!(started.mode.map(|m| m.as_str()), Some("continue"));
    // The turn's CLI went back to the warm pool...
    let ctx = std::sync::Arc::clone(&worker.context);
    wait_until("the warm pool holds the session", || {
        ctx.warm.holds("life:a")
    })
    .await;
    // ...and goes when the session is idle (after its TTL, 2 s).
    let idle = obs
        .next("life:a", |e| e.kind == SessionEventKind::Idle)
        .await;
    assert_eq!(idle.idle_ttl_secs, Some(2));
    assert!(
        idle.at_ms - idle.last_activity_ms.unwrap() >= 2_000,
        "{idle:?}"
    );
    wait_until("the idle session's warm process is closed", || {
        !ctx.warm.holds("life:a")
    })
    .await;
    // Still resumable: the next job continues the conversation (cold).
    complete(&mut env, "life:a", "two", json!({})).await;
    let reqs = env.mock.requests();
    let two = reqs
        .iter()
        .rev()
        .find(|r| r.last_user_text().as_deref() == Some("two"))
        .expect("the mock saw the turn");
    assert!(
        two.user_texts().contains(&"one".to_string()),
        "resumed: {:?}",
        two.user_texts()
    );
    // Reset: a job with mode new ends it and begins another.
    let j3 = complete(
        &mut env,
        "life:a",
        "three",
        json!({"session": {"mode": "new"}}),
    )
    .await;
    let ended = obs
        .next("life:a", |e| e.kind == SessionEventKind::Ended)
        .await;
    assert_eq!(ended.reason, Some(SessionEndReason::Reset));
    assert_eq!(ended.job_id.as_deref(), Some(j3.as_str()));
    let again = obs
        .next("life:a", |e| e.kind == SessionEventKind::Started)
        .await;
    assert_eq!(again.job_id.as_deref(), Some(j3.as_str()));
    assert!(again.event_id > ended.event_id);
    // Deleted (`sessions delete`, run as a process): a worker publishes it.
    let out = cli(&env, &["sessions", "delete", "life:a"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deleted = obs
        .next("life:a", |e| e.kind == SessionEventKind::Ended)
        .await;
    assert_eq!(deleted.reason, Some(SessionEndReason::Deleted));
    use SessionEventKind::*;
    assert_eq!(
        obs.history("life:a"),
        vec![
            (Started, None),
            (Ended, Some(SessionEndReason::Reset)),
            (Started, None),
            (Ended, Some(SessionEndReason::Deleted)),
        ]
    );
    worker.shutdown();
    worker.wait().await.unwrap();
    env.cleanup().await;
}

/// `claude-worker --config <this env's worker config> <args>`, with the
/// worker's HOME (so it sees the same CLI files).
async fn cli(env: &TestEnv, args: &[&str]) -> std::process::Output {
    let config = env.dir.path().join("cli.toml");
    world::write_config(&env.settings(), &config);
    let home = env.home();
    let cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_claude-worker"))
        .arg("--config")
        .arg(&config)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", &home)
        .env("CLAUDE_CONFIG_DIR", home.join(".claude"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(WAIT, cmd)
        .await
        .expect("claude-worker exits")
        .expect("claude-worker runs")
}

async fn prune_json(env: &TestEnv, now_ms: i64, dry_run: bool) -> Value {
    let now = now_ms.to_string();
    let mut args = vec!["sessions", "prune", "--json", "--now-ms", &now];
    if dry_run {
        args.push("--dry-run");
    }
    let out = cli(env, &args).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("prune --json prints JSON")
}

/// The CLI's transcript files below the test's HOME.
fn cli_transcripts(env: &TestEnv) -> Vec<std::path::PathBuf> {
    let projects = env.home().join(".claude/projects");
    let mut out = Vec::new();
    for dir in std::fs::read_dir(projects).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if f.path().extension().is_some_and(|e| e == "jsonl") {
                out.push(f.path());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_prune_with_a_moved_clock_and_a_dry_run_that_touches_nothing() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let mut obs = Observer::new(&env).await;
    let worker = env
        .start_worker_with(|s| s.claude.warm_max_processes = 0)
        .await;
    let j1 = complete(&mut env, "prune:a", "one", json!({})).await;
    obs.next("prune:a", |e| e.kind == SessionEventKind::Started)
        .await;
    let store = store::connect(&claude_worker::config::Secret::new(env.db_url.clone()), 1)
        .await
        .unwrap();
    let session = store.get_session("prune:a").await.unwrap().unwrap();
    let claude_id = session.claude_session_id.clone().expect("a Claude session");
    wait_until_async("the terminal event is marked published", || {
        let store = store.clone();
        let j1 = j1.clone();
        async move {
            store
                .unpublished_terminals(i64::MAX, 10)
                .await
                .unwrap()
                .iter()
                .all(|j| j.job_id != j1)
        }
    })
    .await;
    let files = cli_transcripts(&env);
    assert_eq!(files.len(), 1, "{files:?}");
    // Within retention (30 days by default): nothing to do.
    let now = store::now_ms();
    let within = prune_json(&env, now, true).await;
    for kind in ["jobs", "transcripts", "sessions_expired", "cli_files"] {
        assert_eq!(within[kind], 0, "{kind}: {within}");
    }
    // 31 days later, dry: everything counted, nothing touched.
    let later = now + 31 * 86_400_000;
    let dry = prune_json(&env, later, true).await;
    assert_eq!(dry["dry_run"], true);
    for kind in ["jobs", "transcripts", "sessions_expired", "cli_files"] {
        assert_eq!(dry[kind], 1, "{kind}: {dry}");
    }
    assert!(store.get_job(&j1).await.unwrap().is_some());
    assert!(store.get_transcript(&claude_id).await.unwrap().is_some());
    assert_eq!(cli_transcripts(&env), files);
    let s = store.get_session("prune:a").await.unwrap().unwrap();
    assert_eq!(s.claude_session_id.as_deref(), Some(claude_id.as_str()));
    // For real: the same counts, and it is gone.
    let done = prune_json(&env, later, false).await;
    for kind in ["jobs", "transcripts", "sessions_expired", "cli_files"] {
        assert_eq!(done[kind], dry[kind], "{kind}: {done}");
    }
    assert!(store.get_job(&j1).await.unwrap().is_none());
    assert!(store.get_transcript(&claude_id).await.unwrap().is_none());
    assert!(cli_transcripts(&env).is_empty());
    let s = store.get_session("prune:a").await.unwrap().unwrap();
    assert_eq!(
        (s.claude_session_id, s.status),
        (None, SessionStatus::Closed)
    );
    // The running worker publishes the expiry.
    let expired = obs
        .next("prune:a", |e| e.kind == SessionEventKind::Ended)
        .await;
    assert_eq!(expired.reason, Some(SessionEndReason::Expired));
    // Nothing left; the key's next job starts a new conversation.
    let again = prune_json(&env, later, false).await;
    assert_eq!(again["jobs"], 0, "{again}");
    let j2 = complete(&mut env, "prune:a", "two", json!({})).await;
    let started = obs
        .next("prune:a", |e| e.kind == SessionEventKind::Started)
        .await;
    assert_eq!(started.job_id.as_deref(), Some(j2.as_str()));
    worker.shutdown();
    worker.wait().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_pruners_lease_is_taken_over_by_one_worker_only() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    // Old data: a finished job, quiet past a 2 s retention.
    let setup = env.start_worker().await;
    let j1 = complete(&mut env, "lease:a", "one", json!({})).await;
    setup.shutdown();
    setup.wait().await.unwrap();
    let store = store::connect(&claude_worker::config::Secret::new(env.db_url.clone()), 1)
        .await
        .unwrap();
    // A pruner that died mid-run left the lease held for the lease TTL.
    let ttl_ms = env.settings().lease_ttl().as_millis() as i64;
    let dead_epoch = store
        .take_maintenance_lease("prune", "dead-worker", store::now_ms(), ttl_ms, 0)
        .await
        .unwrap()
        .expect("the lease is free");
    let taken_at = std::time::Instant::now();
    let tweak = |s: &mut claude_worker::config::Settings| {
        s.worker.prune_interval_secs = 1;
        for p in s.profiles.values_mut() {
            p.idle_ttl_secs = 1;
            p.retention_secs = 2;
        }
    };
    let (w1, w2) = (
        env.start_worker_with(tweak).await,
        env.start_worker_with(tweak).await,
    );
    wait_until_async("a worker took the prune over and removed the job", || {
        let store = store.clone();
        let j1 = j1.clone();
        async move { store.get_job(&j1).await.unwrap().is_none() }
    })
    .await;
    // Not before the dead holder's lease ran out.
    assert!(
        taken_at.elapsed() >= Duration::from_millis(ttl_ms as u64 - 200),
        "pruned {:?} after the lease was taken (TTL {ttl_ms} ms)",
        taken_at.elapsed()
    );
    // The dead holder can no longer renew it.
    assert!(!store
        .renew_maintenance_lease("prune", "dead-worker", dead_epoch, store::now_ms(), ttl_ms)
        .await
        .unwrap());
    for w in [w1, w2] {
        w.shutdown();
        w.wait().await.unwrap();
    }
    env.cleanup().await;
}

/// Lifecycle events recorded while the broker is down (here by a worker's
/// turn done through the store, and `sessions delete`) are published, in
/// order, once it is back: the outbox, across a real broker restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lifecycle_events_recorded_while_the_broker_is_down_go_out_when_it_returns() {
    use claude_worker::broker::Topology;
    use claude_worker::protocol::SessionMode;
    use lapin::options::{QueueBindOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;

    use crate::common::broker_node::BrokerNode;
    use crate::common::tap::{producer, tap};

    let node = BrokerNode::start().await;
    let env = TestEnv::new(Backend::Sqlite).await;
    let url = node.url();
    let topo = Topology::from_prefix(&env.prefix, "prompt");
    // The tap's durable queue, bound before anything is published.
    let queue = format!("{}.tap", env.prefix);
    let ch = producer(&url, &topo).await;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(queue.as_str().into(), durable, FieldTable::default())
        .await
        .unwrap();
    ch.queue_bind(
        queue.as_str().into(),
        topo.replies_exchange.as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut rx = tap(url.clone(), topo.clone(), queue);
    let worker = env
        .start_worker_with(|s| {
            s.amqp.url = claude_worker::config::Secret::new(url.as_str());
            s.amqp.recovery_limit_secs = 120;
        })
        .await;
    let store = store::connect(&claude_worker::config::Secret::new(env.db_url.clone()), 1)
        .await
        .unwrap();

    node.stop_app().await;
    let ctx = std::sync::Arc::clone(&worker.context);
    wait_until("the worker sees the broker down", || !ctx.broker_up()).await;
    // While it is down (no worker claims then): a conversation begins and
    // is deleted, as a worker's turn and `sessions delete` record them.
    let job = store::NewJob {
        job_id: "down-1".into(),
        session_key: "down:a".into(),
        spec: store::JobSpec {
            prompt: "x".into(),
            mode: SessionMode::Continue,
            claude_session_id: None,
            profile: "default".into(),
            model: None,
            max_turns: 1,
            permission_mode: claude_worker::protocol::PermissionMode::Default,
            metadata: json!({}),
            reply_to: None,
            on_busy: Default::default(),
            attachments: Vec::new(),
            max_budget_usd: None,
            identity: None,
            compact: false,
            prompt_answerers: Vec::new(),
        },
    };
    let now = store::now_ms();
    store.accept_job(&job, now).await.unwrap();
    let lease = store
        .claim_session("test", now, 10_000, None)
        .await
        .unwrap()
        .expect("the session is claimable");
    store.start_attempt(&lease, "down-1", now).await.unwrap();
    assert!(store
        .begin_conversation(&lease, "down-1", SessionMode::Continue, now)
        .await
        .unwrap());
    let finish = store::JobFinish {
        job_id: "down-1".into(),
        status: store::JobStatus::Cancelled,
        error: None,
        terminal_event: "{}".into(),
        next_seq: 1,
        session_update: None,
        cost_usd: 0.0,
        identity: None,
        transcript: None,
        now_ms: now,
    };
    store.finish_job(&lease, &finish).await.unwrap();
    store.mark_terminal_published("down-1", now).await.unwrap();
    store.release_lease(&lease, now).await.unwrap();
    assert!(store.forget_session("down:a", now + 1).await.unwrap());

    node.start_app().await;
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT * 2;
    while got.len() < 2 {
        let (raw, _) = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("the session events did not arrive; got {got:#?}"))
            .expect("tap runs");
        if raw["type"]
            .as_str()
            .is_some_and(|t| t.starts_with("session."))
        {
            crate::schema::assert_valid_reply(&raw);
            let e: SessionEventV1 = serde_json::from_value(raw).unwrap();
            if !got
                .iter()
                .any(|g: &SessionEventV1| g.event_id == e.event_id)
            {
                got.push(e);
            }
        }
    }
    assert_eq!(
        got.iter().map(|e| (e.kind, e.reason)).collect::<Vec<_>>(),
        vec![
            (SessionEventKind::Started, None),
            (SessionEventKind::Ended, Some(SessionEndReason::Deleted)),
        ]
    );
    assert!(got.iter().all(|e| e.session_key == "down:a"));
    // Marked published: nothing is left to claim.
    wait_until_async("the outbox is empty", || {
        let store = store.clone();
        async move {
            store
                .claim_session_events(store::now_ms(), 1, 10)
                .await
                .unwrap()
                .is_empty()
        }
    })
    .await;
    worker.shutdown();
    worker.wait().await.unwrap();
    env.cleanup().await;
}

/// A session whose budget is used up ends (`session.ended`, reason
/// `budget`), once, with the job that was refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_used_up_session_budget_ends_the_session() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let mut obs = Observer::new(&env).await;
    let worker = env
        .start_worker_with(|s| {
            s.profiles.get_mut("default").unwrap().budget.session_usd = Some(0.000_001);
        })
        .await;
    let j1 = complete(&mut env, "budget:a", "one", json!({})).await;
    obs.next("budget:a", |e| e.kind == SessionEventKind::Started)
        .await;
    let mut refused = Vec::new();
    for prompt in ["two", "three"] {
        let job = env.publish_job("budget:a", prompt, json!({})).await;
        let ev = env.events_until_terminal(&job).await;
        assert!(
            matches!(ev.last().unwrap().body, EventBody::Failed { .. }),
            "{ev:#?}"
        );
        refused.push(job);
    }
    let ended = obs
        .next("budget:a", |e| e.kind == SessionEventKind::Ended)
        .await;
    assert_eq!(ended.reason, Some(SessionEndReason::Budget));
    assert_eq!(ended.job_id.as_deref(), Some(refused[0].as_str()));
    assert_ne!(ended.job_id.as_deref(), Some(j1.as_str()));
    // A later event of another session: one publisher sends events in
    // order, so anything the second refusal recorded has arrived by then.
    complete(&mut env, "budget:b", "other", json!({})).await;
    obs.next("budget:b", |e| e.kind == SessionEventKind::Started)
        .await;
    worker.shutdown();
    worker.wait().await.unwrap();
    // Once: the second refusal recorded nothing more.
    assert_eq!(
        obs.history("budget:a"),
        vec![
            (SessionEventKind::Started, None),
            (SessionEventKind::Ended, Some(SessionEndReason::Budget)),
        ]
    );
    env.cleanup().await;
}
