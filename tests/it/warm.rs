//! Warm CLI processes: a session's CLI stays alive between turns and its
//! next turn on the worker reuses it (real RabbitMQ, SQLite, real CLI +
//! mock API).

use claude_worker::protocol::{EventBody, EventV1};
use claude_worker::worker::Worker;
use claude_worker::WarmStats;
use serde_json::{json, Value};

use crate::common::world::{wait_until, wait_until_async};
use crate::harness::{cli_pids, Backend, TestEnv};

/// Runs one job to its terminal event; checks it completed with the echo
/// of `prompt`, with contiguous seqs and exactly one `started`.
async fn run_ok(env: &mut TestEnv, key: &str, prompt: &str, extra: Value) -> Vec<EventV1> {
    let job = env.publish_job(key, prompt, extra).await;
    let ev = env.events_until_terminal(&job).await;
    let seqs: Vec<u64> = ev.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (0..ev.len() as u64).collect::<Vec<_>>(), "{ev:#?}");
    match &ev.last().unwrap().body {
        EventBody::Completed { result, .. } => assert_eq!(result, &format!("echo: {prompt}")),
        other => panic!("expected completed for {prompt:?}, got {other:?}"),
    }
    let text: String = ev
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::Text { text } => Some(text.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(text, format!("echo: {prompt}"));
    let started = ev
        .iter()
        .filter(|e| matches!(e.body, EventBody::Started { .. }))
        .count();
    assert_eq!(started, 1, "exactly one started event: {ev:#?}");
    assert!(
        !ev.iter()
            .any(|e| matches!(e.body, EventBody::Retrying { .. })),
        "no retrying event: {ev:#?}"
    );
    ev
}

/// `(permission_mode, model, resumed)` of the job's `started` event.
fn started_of(ev: &[EventV1]) -> (Option<String>, Option<String>, bool) {
    ev.iter()
        .find_map(|e| match &e.body {
            EventBody::Started {
                permission_mode,
                model,
                resumed,
                ..
            } => Some((permission_mode.clone(), model.clone(), *resumed)),
            _ => None,
        })
        .expect("a started event")
}

/// `(user texts, assistant texts)` of the mock request that carried `prompt`.
fn conversation_seen(env: &TestEnv, prompt: &str) -> (Vec<String>, Vec<String>) {
    let reqs = env.mock.requests();
    let req = reqs
        .iter()
        .rev()
        .find(|r| r.last_user_text().as_deref() == Some(prompt))
        .unwrap_or_else(|| panic!("the mock saw no request for {prompt:?}"));
    (req.user_texts(), req.assistant_texts())
}

/// Whether no worker holds the session's lease (SQLite worlds).
async fn lease_free(db_url: &str, key: &str) -> bool {
    use sqlx::Connection;
    let mut conn = sqlx::SqliteConnection::connect(db_url)
        .await
        .expect("open the test database");
    let owner: Option<Option<String>> =
        sqlx::query_scalar("SELECT lease_owner FROM sessions WHERE session_key = ?")
            .bind(key)
            .fetch_optional(&mut conn)
            .await
            .expect("read the session's lease");
    let _ = conn.close().await;
    owner.flatten().is_none()
}

fn stats(w: &Worker) -> WarmStats {
    w.context.warm.stats()
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_turns_run_on_one_cli_process() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let worker = env.start_worker().await;
    let key = "warm:reuse";
    let mut pids = Vec::new();
    for (i, prompt) in ["warm one", "warm two", "warm three"].iter().enumerate() {
        let ev = run_ok(&mut env, key, prompt, json!({})).await;
        assert_eq!(started_of(&ev).2, i > 0, "later turns continue the session");
        pids.push(cli_pids(&env.prefix));
    }
    assert_eq!(pids[0].len(), 1, "one CLI process stays alive: {pids:?}");
    assert!(
        pids.iter().all(|p| *p == pids[0]),
        "every turn ran on the same process: {pids:?}"
    );
    // The process goes back to the pool just after `completed` is out.
    wait_until("the process is back in the pool", || {
        stats(&worker).idle == 1
    })
    .await;
    let s = stats(&worker);
    assert_eq!((s.spawns, s.hits, s.idle), (1, 2, 1), "{s:?}");
    // The mock saw one CLI session throughout, and the third request
    // carries the whole conversation.
    let reqs = env.mock.requests();
    let ids: Vec<_> = reqs
        .iter()
        .map(|r| r.header("x-claude-code-session-id").map(str::to_string))
        .collect();
    assert_eq!(ids.len(), 3, "{ids:?}");
    assert!(
        ids[0].is_some() && ids.iter().all(|i| *i == ids[0]),
        "{ids:?}"
    );
    let (users, assistants) = conversation_seen(&env, "warm three");
    assert_eq!(users, vec!["warm one", "warm two", "warm three"]);
    assert_eq!(assistants, vec!["echo: warm one", "echo: warm two"]);
    worker.shutdown();
    worker.wait().await.unwrap();
    assert!(
        cli_pids(&env.prefix).is_empty(),
        "no CLI outlives the worker"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_ttl_closes_the_process_and_the_next_turn_resumes_cold() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let worker = env
        .start_worker_with(|s| s.claude.warm_idle_ttl_secs = 1)
        .await;
    let key = "warm:ttl";
    run_ok(&mut env, key, "ttl one", json!({})).await;
    let pids = cli_pids(&env.prefix);
    assert_eq!(pids.len(), 1, "{pids:?}");
    wait_until("the idle process is closed after its TTL", || {
        !alive(pids[0])
    })
    .await;
    assert_eq!(stats(&worker).expirations, 1, "{:?}", stats(&worker));
    let ev = run_ok(&mut env, key, "ttl two", json!({})).await;
    assert!(started_of(&ev).2, "resumed");
    assert_eq!(
        conversation_seen(&env, "ttl two"),
        (
            vec!["ttl one".to_string(), "ttl two".to_string()],
            vec!["echo: ttl one".to_string()]
        )
    );
    let s = stats(&worker);
    assert_eq!((s.spawns, s.hits), (2, 0), "{s:?}");
    worker.shutdown();
    worker.wait().await.unwrap();
    assert!(cli_pids(&env.prefix).is_empty());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_evicts_the_least_recently_used_process() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let worker = env
        .start_worker_with(|s| s.claude.warm_max_processes = 2)
        .await;
    run_ok(&mut env, "warm:a", "lru a1", json!({})).await;
    let a = cli_pids(&env.prefix);
    run_ok(&mut env, "warm:b", "lru b1", json!({})).await;
    // `a` is used again, so `b` is now the least recently used.
    run_ok(&mut env, "warm:a", "lru a2", json!({})).await;
    assert_eq!(cli_pids(&env.prefix).len(), 2);
    let before_c: Vec<i32> = cli_pids(&env.prefix);
    let b: Vec<i32> = before_c
        .iter()
        .copied()
        .filter(|p| !a.contains(p))
        .collect();
    assert_eq!(b.len(), 1, "{a:?} {before_c:?}");
    run_ok(&mut env, "warm:c", "lru c1", json!({})).await;
    wait_until("the LRU process (session b) is closed", || !alive(b[0])).await;
    assert!(alive(a[0]), "session a's process stays warm");
    assert_eq!(cli_pids(&env.prefix).len(), 2);
    let s = stats(&worker);
    assert_eq!((s.evictions, s.idle), (1, 2), "{s:?}");
    // b resumes cold with its whole conversation.
    let ev = run_ok(&mut env, "warm:b", "lru b2", json!({})).await;
    assert!(started_of(&ev).2);
    assert_eq!(
        conversation_seen(&env, "lru b2").0,
        vec!["lru b1".to_string(), "lru b2".to_string()]
    );
    // b's process goes back to the pool just after `completed`, evicting one.
    wait_until("b's process evicts the LRU one", || {
        stats(&worker).evictions == 2
    })
    .await;
    let s = stats(&worker);
    assert_eq!((s.spawns, s.hits, s.evictions), (4, 1, 2), "{s:?}");
    worker.shutdown();
    worker.wait().await.unwrap();
    assert!(cli_pids(&env.prefix).is_empty());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_process_killed_between_turns_is_replaced_transparently() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let worker = env.start_worker().await;
    let key = "warm:killed";
    run_ok(&mut env, key, "killed one", json!({})).await;
    let pids = cli_pids(&env.prefix);
    assert_eq!(pids.len(), 1, "{pids:?}");
    // SAFETY: signalling a process this test's worker started.
    unsafe { libc::kill(pids[0], libc::SIGKILL) };
    wait_until("the killed CLI is gone", || !alive(pids[0])).await;
    // run_ok checks: completed, one started, no retrying.
    let ev = run_ok(&mut env, key, "killed two", json!({})).await;
    assert!(started_of(&ev).2, "resumed");
    assert!(ev.iter().all(|e| e.attempt == 1), "{ev:#?}");
    assert_eq!(
        conversation_seen(&env, "killed two").0,
        vec!["killed one".to_string(), "killed two".to_string()]
    );
    let s = stats(&worker);
    assert_eq!((s.spawns, s.hits, s.discards), (2, 0, 1), "{s:?}");
    worker.shutdown();
    worker.wait().await.unwrap();
    assert!(cli_pids(&env.prefix).is_empty());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_warm_process_is_replaced_transparently() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let worker = env.start_worker().await;
    let key = "warm:hung";
    run_ok(&mut env, key, "hung one", json!({})).await;
    let pids = cli_pids(&env.prefix);
    assert_eq!(pids.len(), 1, "{pids:?}");
    // Stopped, it still looks alive but never answers the next prompt.
    // SAFETY: signalling a process this test's worker started.
    unsafe { libc::kill(pids[0], libc::SIGSTOP) };
    let ev = run_ok(&mut env, key, "hung two", json!({})).await;
    assert!(started_of(&ev).2, "resumed");
    assert!(ev.iter().all(|e| e.attempt == 1), "{ev:#?}");
    assert!(!alive(pids[0]), "the hung process was killed");
    assert_eq!(
        conversation_seen(&env, "hung two").0,
        vec!["hung one".to_string(), "hung two".to_string()]
    );
    let s = stats(&worker);
    assert_eq!((s.spawns, s.hits, s.discards), (2, 0, 1), "{s:?}");
    worker.shutdown();
    worker.wait().await.unwrap();
    assert!(cli_pids(&env.prefix).is_empty());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permission_mode_and_model_changes_reach_the_warm_process() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let worker = env.start_worker().await;
    // Profile `discord`: default and ceiling acceptEdits.
    let key = "warm:options";
    let ev = run_ok(&mut env, key, "opts one", json!({"profile": "discord"})).await;
    assert_eq!(started_of(&ev).0.as_deref(), Some("acceptEdits"));
    let pid = cli_pids(&env.prefix);
    let ev = run_ok(
        &mut env,
        key,
        "opts two",
        json!({"profile": "discord", "options": {"permission_mode": "plan"}}),
    )
    .await;
    assert_eq!(
        started_of(&ev).0.as_deref(),
        Some("plan"),
        "the warm process switched its permission mode"
    );
    assert_eq!(cli_pids(&env.prefix), pid, "on the same process");
    let s = stats(&worker);
    assert_eq!((s.spawns, s.hits), (1, 1), "{s:?}");

    let model = "claude-haiku-4-5";
    let ev = run_ok(
        &mut env,
        key,
        "opts three",
        json!({"profile": "discord", "options": {"permission_mode": "plan", "model": model}}),
    )
    .await;
    assert_eq!(started_of(&ev).1.as_deref(), Some(model), "{ev:#?}");
    let req = env.mock.requests().pop().unwrap();
    assert_eq!(
        req.body["model"], model,
        "the API request used the new model"
    );
    assert_eq!(cli_pids(&env.prefix), pid, "still the same process");
    let s = stats(&worker);
    assert_eq!((s.spawns, s.hits), (1, 2), "{s:?}");
    worker.shutdown();
    worker.wait().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_flags_and_new_sessions_do_not_reuse() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let worker = env.start_worker().await;
    let key = "warm:flags";
    run_ok(&mut env, key, "flags one", json!({})).await;
    let first = cli_pids(&env.prefix);
    // max_turns cannot change on a running CLI: cold, with --resume.
    let ev = run_ok(
        &mut env,
        key,
        "flags two",
        json!({"options": {"max_turns": 3}}),
    )
    .await;
    assert!(started_of(&ev).2);
    assert!(!alive(first[0]), "the mismatching process was closed");
    assert_eq!(
        conversation_seen(&env, "flags two").0,
        vec!["flags one".to_string(), "flags two".to_string()]
    );
    // `new` never reuses.
    let ev = run_ok(
        &mut env,
        key,
        "flags three",
        json!({"options": {"max_turns": 3}, "session": {"mode": "new"}}),
    )
    .await;
    assert!(!started_of(&ev).2);
    assert_eq!(
        conversation_seen(&env, "flags three").0,
        vec!["flags three".to_string()]
    );
    let s = stats(&worker);
    assert_eq!((s.spawns, s.hits, s.discards), (3, 0, 2), "{s:?}");
    assert_eq!(cli_pids(&env.prefix).len(), 1);
    worker.shutdown();
    worker.wait().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_run_elsewhere_makes_the_warm_process_stale() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    // No lease affinity here: the point is a turn running elsewhere.
    let w1 = env
        .start_worker_with(|s| {
            s.worker.id = "warm-w1".into();
            s.worker.warm_affinity_ms = 0;
        })
        .await;
    let key = "warm:stale";
    run_ok(&mut env, key, "stale one", json!({})).await;
    wait_until("w1 keeps the process warm", || stats(&w1).idle == 1).await;
    // A second worker shares the queue and the database: the session's
    // turns now run on either, while w1 keeps its warm process.
    let w2 = env
        .start_worker_with(|s| {
            s.worker.id = "warm-w2".into();
            s.claude.warm_max_processes = 0;
        })
        .await;
    // Jobs go to whichever worker consumes them; publish until w2 ran one.
    // Each waits for w1 to release the lease first: a job published while
    // w1 still holds it is run by w1 whoever accepted it (under load that
    // was every job, and w2 never got one).
    let mut n = 0;
    while stats(&w2).spawns == 0 {
        n += 1;
        assert!(n < 20, "w2 never got a job");
        wait_until_async("the session's lease is released", || {
            lease_free(&env.db_url, key)
        })
        .await;
        run_ok(&mut env, key, &format!("stale x{n}"), json!({})).await;
    }
    w2.shutdown();
    w2.wait().await.unwrap();
    // w1's warm process last saw an earlier turn: it must not be reused.
    let ev = run_ok(&mut env, key, "stale last", json!({})).await;
    assert!(started_of(&ev).2);
    let (users, _) = conversation_seen(&env, "stale last");
    let mut expected = vec!["stale one".to_string()];
    expected.extend((1..=n).map(|i| format!("stale x{i}")));
    expected.push("stale last".into());
    assert_eq!(
        users, expected,
        "the full conversation, including w2's turn"
    );
    let s = stats(&w1);
    assert!(s.discards >= 1, "{s:?}");
    w1.shutdown();
    w1.wait().await.unwrap();
    assert!(cli_pids(&env.prefix).is_empty());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_affinity_keeps_a_conversation_on_its_warm_worker() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    // Two workers consume the same queue, so follow-ups are accepted by
    // either; the one holding the session warm keeps its lease briefly
    // after each turn and runs them all.
    let home_b = env.dir.path().join("home-b");
    std::fs::create_dir_all(home_b.join(".claude")).unwrap();
    let a = env
        .start_worker_with(|s| s.worker.id = "affinity-a".into())
        .await;
    let b = env
        .start_worker_with(|s| {
            s.worker.id = "affinity-b".into();
            let home = home_b.display().to_string();
            for p in s.profiles.values_mut() {
                p.env.insert(
                    "HOME".into(),
                    claude_worker::config::Secret::new(home.clone()),
                );
                p.env.insert(
                    "CLAUDE_CONFIG_DIR".into(),
                    claude_worker::config::Secret::new(format!("{home}/.claude")),
                );
            }
        })
        .await;
    let key = "warm:affinity";
    for i in 0..4 {
        run_ok(&mut env, key, &format!("affinity {i}"), json!({})).await;
    }
    let (sa, sb) = (stats(&a), stats(&b));
    assert_eq!(
        sa.spawns + sb.spawns,
        1,
        "one CLI for the whole conversation: {sa:?} {sb:?}"
    );
    assert_eq!(sa.hits + sb.hits, 3, "{sa:?} {sb:?}");
    let (users, _) = conversation_seen(&env, "affinity 3");
    assert_eq!(
        users,
        vec!["affinity 0", "affinity 1", "affinity 2", "affinity 3"]
    );
    for w in [a, b] {
        w.shutdown();
        w.wait().await.unwrap();
    }
    assert!(cli_pids(&env.prefix).is_empty());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_every_warm_process() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let worker = env.start_worker().await;
    run_ok(&mut env, "warm:s1", "bye one", json!({})).await;
    run_ok(&mut env, "warm:s2", "bye two", json!({})).await;
    assert_eq!(cli_pids(&env.prefix).len(), 2);
    wait_until("both processes are back in the pool", || {
        stats(&worker).idle == 2
    })
    .await;
    let ctx = worker.context.clone();
    worker.shutdown();
    worker.wait().await.unwrap();
    assert!(
        cli_pids(&env.prefix).is_empty(),
        "no CLI process outlives the worker"
    );
    assert_eq!(ctx.warm.stats().idle, 0);
    env.cleanup().await;
}
