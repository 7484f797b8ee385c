//! Cost that adds up, and budgets (issue 14): real RabbitMQ, SQLite or
//! PostgreSQL, the real CLI against the mock API reporting a fixed usage
//! per answer, so every turn's cost is known in advance.
//!
//! The CLI reports `total_cost_usd` as a running total of the Claude
//! session (across a warm process's turns and across a cold `--resume` or
//! fork); `completed.total_cost_usd` must be what each turn cost.

use claude_worker::protocol::{ErrorKind, EventBody, EventV1};
use claude_worker::store::{utc_time, SessionStore};
use claude_worker::worker::Worker;
use serde_json::{json, Value};

use crate::common::world::wait_until;
use crate::harness::{cli_pids, Backend, TestEnv};
use crate::mock_api::Usage;

const MODEL: &str = "claude-sonnet-4-5";
/// Its list prices, USD per million tokens: input, output, cache write (5 min), cache read.
const SONNET_PRICES: (f64, f64, f64, f64) = (3.0, 15.0, 3.75, 0.30);
const USAGE: Usage = Usage {
    input_tokens: 1000,
    output_tokens: 100,
    cache_creation_input_tokens: 200,
    cache_read_input_tokens: 300,
};

/// What one answer of the mock costs: $0.00534.
fn per_answer() -> f64 {
    USAGE.cost_usd(SONNET_PRICES)
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

async fn env_with_usage(backend: Backend) -> TestEnv {
    let env = TestEnv::new(backend).await;
    env.mock.set_usage(USAGE);
    env
}

/// Publishes a job with the test model and returns its events.
async fn run(env: &mut TestEnv, key: &str, prompt: &str, extra: Value) -> Vec<EventV1> {
    let mut extra = extra;
    extra["options"]["model"] = json!(MODEL);
    let job = env.publish_job(key, prompt, extra).await;
    env.events_until_terminal(&job).await
}

/// `(total_cost_usd, session_cost_usd, input_tokens)` of a completed job.
async fn completed(env: &mut TestEnv, key: &str, prompt: &str, extra: Value) -> (f64, f64, i64) {
    let ev = run(env, key, prompt, extra).await;
    match &ev.last().unwrap().body {
        EventBody::Completed {
            total_cost_usd,
            session_cost_usd,
            usage,
            ..
        } => (
            *total_cost_usd,
            session_cost_usd.expect("session_cost_usd is set"),
            usage["input_tokens"].as_i64().unwrap(),
        ),
        other => panic!("{prompt}: expected completed, got {other:?}"),
    }
}

/// `(error, message, retryable)` of a failed job.
fn failure(ev: &[EventV1]) -> (ErrorKind, String, bool) {
    match &ev.last().unwrap().body {
        EventBody::Failed {
            error,
            message,
            retryable,
        } => (*error, message.clone(), *retryable),
        other => panic!("expected failed, got {other:?}"),
    }
}

async fn store_of(env: &TestEnv) -> std::sync::Arc<dyn SessionStore> {
    let s = claude_worker::store::connect(&env.settings().database.url, 1)
        .await
        .unwrap();
    s.migrate().await.unwrap();
    s
}

/// Seven turns of one conversation, each answered once by the mock: two
/// warm turns, a warm process SIGKILLed and replaced (its transcript has no
/// saved running total, so the CLI's total starts over), a cold resume
/// after a worker restart (the CLI's total continues from the transcript),
/// a fork (the CLI continues from the parent's total), and a move to
/// another worker with its own CLI config dir (the transcript from the
/// database). Each turn costs exactly one answer; the session's sum is
/// seven answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cost_is_per_turn_across_warm_cold_replaced_forked_and_moved_turns() {
    let mut env = env_with_usage(Backend::Sqlite).await;
    let key = "cost:turns";
    let one = per_answer();
    let mut costs = Vec::new();
    let mut sums = Vec::new();
    let mut turn = |c: (f64, f64, i64)| {
        assert_eq!(c.2, 1000, "usage is per turn");
        costs.push(c.0);
        sums.push(c.1);
    };

    let w1 = env.start_worker().await;
    for p in ["cold first", "warm second", "warm third"] {
        turn(completed(&mut env, key, p, json!({})).await);
    }
    let s = w1.context.warm.stats();
    assert_eq!((s.spawns, s.hits), (1, 2), "{s:?}");
    // The warm process dies between turns: replaced by a cold resume.
    wait_until("the process is back in the pool", || {
        w1.context.warm.stats().idle == 1
    })
    .await;
    let pids = cli_pids(&env.prefix);
    assert_eq!(pids.len(), 1, "{pids:?}");
    // SAFETY: signalling a process this test's worker started.
    unsafe { libc::kill(pids[0], libc::SIGKILL) };
    turn(completed(&mut env, key, "after a kill", json!({})).await);
    w1.shutdown();
    w1.wait().await.unwrap();

    // A restarted worker resumes cold from its own transcript.
    let w1 = env.start_worker().await;
    turn(completed(&mut env, key, "after a restart", json!({})).await);
    turn(
        completed(
            &mut env,
            key,
            "a fork",
            json!({"session": {"mode": "fork"}}),
        )
        .await,
    );
    w1.shutdown();
    w1.wait().await.unwrap();

    // Another worker, with its own HOME and CLI config dir.
    let other = env.dir.path().join("other");
    let mut settings = env.settings_for(&other.join("home"), &other.join("work"), &env.prefix);
    settings.worker.id = "cost-w2".into();
    let w2 = Worker::start(settings).await.expect("worker starts");
    turn(completed(&mut env, key, "on another worker", json!({})).await);
    w2.shutdown();
    w2.wait().await.unwrap();

    assert_eq!(env.mock.requests().len(), 7, "one answer per turn");
    assert!(
        costs.iter().all(|c| close(*c, one)),
        "per turn {one}: {costs:?}"
    );
    let expected: Vec<f64> = (1..=7).map(|n| n as f64 * one).collect();
    assert!(
        sums.iter().zip(&expected).all(|(a, b)| close(*a, *b)),
        "session_cost_usd {sums:?}, expected {expected:?}"
    );
    let session = store_of(&env)
        .await
        .get_session(key)
        .await
        .unwrap()
        .unwrap();
    assert!(close(session.cost_usd, 7.0 * one), "{}", session.cost_usd);
    assert_eq!((session.turns, session.input_tokens), (7, 7000));
    // Context use: input plus cache tokens of the last call, of sonnet's window.
    assert_eq!(
        (session.context_tokens, session.context_window),
        (Some(1500), Some(200_000))
    );
    env.cleanup().await;
}

/// A per-turn cost cap: the job may only narrow the profile's; a turn that
/// reaches it ends `failed` with `max_budget` (not retried), and its cost
/// still counts for the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_over_its_cost_cap_fails_with_max_budget() {
    let mut env = env_with_usage(Backend::Sqlite).await;
    let worker = env
        .start_worker_with(|s| {
            s.profiles.get_mut("default").unwrap().budget.turn_usd = Some(0.5);
        })
        .await;
    let key = "cost:cap";
    // Wider than the profile: invalid input, never run.
    let ev = run(
        &mut env,
        key,
        "too wide",
        json!({"options": {"max_budget_usd": 0.75}}),
    )
    .await;
    let (error, message, retryable) = failure(&ev);
    assert_eq!((error, retryable), (ErrorKind::InvalidInput, false));
    assert!(message.contains("per-turn cap of 0.5"), "{message}");
    let (_, headers) = env.next_dead_letter().await;
    assert!(headers["x-claude-worker-error"].contains("max_budget_usd"));
    // Under the cap's... cap: the CLI stops the turn after the first
    // answer ($0.00534 > $0.004).
    let ev = run(
        &mut env,
        key,
        "capped",
        json!({"options": {"max_budget_usd": 0.004}}),
    )
    .await;
    let (error, message, retryable) = failure(&ev);
    assert_eq!(
        (error, retryable),
        (ErrorKind::MaxBudget, false),
        "{message}"
    );
    assert!(message.contains("$0.004"), "{message}");
    assert!(ev.iter().all(|e| e.attempt == 1), "not retried: {ev:#?}");
    // The profile's cap alone lets a turn finish; capped turns never go warm.
    let (cost, sum, _) = completed(&mut env, key, "within the cap", json!({})).await;
    assert!(
        close(cost, per_answer()) && close(sum, 2.0 * per_answer()),
        "{cost} {sum}"
    );
    assert_eq!(env.mock.requests().len(), 2);
    let s = worker.context.warm.stats();
    assert_eq!((s.idle, s.hits), (0, 0), "{s:?}");
    worker.shutdown();
    worker.wait().await.unwrap();
    env.cleanup().await;
}

/// A session's lifetime budget: the turn that crosses it finishes, the next
/// job is refused at once (`budget_exceeded`, naming the budget, never
/// resetting). With `overrun = "stop"` the crossing turn is capped at what
/// is left instead, and ends `max_budget`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_budget_refuses_the_next_job_and_stop_caps_the_crossing_turn() {
    let mut env = env_with_usage(Backend::Sqlite).await;
    let worker = env
        .start_worker_with(|s| {
            s.profiles.get_mut("default").unwrap().budget.session_usd = Some(0.008);
            let discord = &mut s.profiles.get_mut("discord").unwrap().budget;
            discord.session_usd = Some(0.008);
            discord.overrun = claude_worker::config::BudgetOverrun::Stop;
        })
        .await;
    let one = per_answer();
    // Finish: $0.00534, then $0.01068 (crossing, allowed), then refused.
    let key = "cost:session";
    completed(&mut env, key, "first", json!({})).await;
    let (_, sum, _) = completed(&mut env, key, "crossing", json!({})).await;
    assert!(close(sum, 2.0 * one));
    let ev = run(&mut env, key, "refused", json!({})).await;
    assert_eq!(ev.len(), 1, "refused before any attempt: {ev:#?}");
    let (error, message, retryable) = failure(&ev);
    assert_eq!((error, retryable), (ErrorKind::BudgetExceeded, false));
    assert_eq!(
        message,
        format!(
            "the session's budget of $0.0080 is used up (${:.4} spent by this session key); \
             it does not reset: continue in a new session key",
            2.0 * one
        )
    );
    assert_eq!(
        env.mock.requests().len(),
        2,
        "the refused job never reached the API"
    );

    // Stop: the crossing turn may spend only the $0.00266 left.
    let key = "cost:session-stop";
    let discord = json!({"profile": "discord"});
    completed(&mut env, key, "stop first", discord.clone()).await;
    let ev = run(&mut env, key, "stop crossing", discord.clone()).await;
    let (error, message, _) = failure(&ev);
    assert_eq!(error, ErrorKind::MaxBudget, "{message}");
    let ev = run(&mut env, key, "stop refused", discord.clone()).await;
    assert_eq!(failure(&ev).0, ErrorKind::BudgetExceeded);
    let session = store_of(&env)
        .await
        .get_session(key)
        .await
        .unwrap()
        .unwrap();
    assert!(
        close(session.cost_usd, 2.0 * one),
        "the stopped turn's cost counts"
    );
    assert_eq!(env.mock.requests().len(), 4);
    worker.shutdown();
    worker.wait().await.unwrap();
    env.cleanup().await;
}

/// A per-identity budget over a day, kept in PostgreSQL: spent on one
/// worker by two sessions of the identity, refused on another worker for a
/// third session (with the time it resets); another identity still runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_budget_holds_across_sessions_and_workers() {
    let mut env = env_with_usage(Backend::Postgres).await;
    let budget = |s: &mut claude_worker::config::Settings| {
        let b = &mut s.profiles.get_mut("default").unwrap().budget;
        b.identity_usd = Some(0.006);
        b.identity_window_secs = 86_400;
    };
    let alice = json!({"identity": "discord:user:alice"});
    let w1 = env
        .start_worker_with(|s| {
            budget(s);
            s.worker.id = "identity-w1".into();
        })
        .await;
    completed(&mut env, "id:a", "alice one", alice.clone()).await;
    // $0.00534 < $0.006: allowed, and it crosses.
    completed(&mut env, "id:b", "alice two", alice.clone()).await;
    w1.shutdown();
    w1.wait().await.unwrap();

    let w2 = env
        .start_worker_with(|s| {
            budget(s);
            s.worker.id = "identity-w2".into();
        })
        .await;
    let ev = run(&mut env, "id:c", "alice three", alice.clone()).await;
    let (error, message, retryable) = failure(&ev);
    assert_eq!((error, retryable), (ErrorKind::BudgetExceeded, true));
    let day = 86_400_000;
    let now = claude_worker::store::now_ms();
    let resets = utc_time(now - now.rem_euclid(day) + day);
    assert_eq!(
        message,
        format!(
            "the identity's budget of $0.0060 per day (UTC) is used up (${:.4} spent in this \
             window); it resets at {resets}",
            2.0 * per_answer()
        )
    );
    assert_eq!(
        env.attribution(&ev[0].job_id, ev[0].seq)
            .unwrap()
            .worker_id
            .as_deref(),
        Some("identity-w2")
    );
    completed(
        &mut env,
        "id:d",
        "bob one",
        json!({"identity": "discord:user:bob"}),
    )
    .await;
    // Jobs without an identity are not limited by it.
    completed(&mut env, "id:e", "nobody", json!({})).await;
    assert_eq!(env.mock.requests().len(), 4);
    w2.shutdown();
    w2.wait().await.unwrap();
    env.cleanup().await;
}

/// The profile's `fallback_model` reaches the CLI: with the main model
/// overloaded (three 529s; the CLI's own retries on for this profile), the
/// turn is answered by the fallback, and its cost is the fallback's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profiles_fallback_model_answers_when_the_main_one_is_overloaded() {
    let mut env = env_with_usage(Backend::Sqlite).await;
    let worker = env
        .start_worker_with(|s| {
            let p = s.profiles.get_mut("default").unwrap();
            p.fallback_model = Some("claude-haiku-4-5".into());
            let retries = claude_worker::config::Secret::new("3");
            p.env.insert("CLAUDE_CODE_MAX_RETRIES".into(), retries);
        })
        .await;
    for _ in 0..3 {
        env.mock.push_behavior_for(
            "fb",
            crate::mock_api::Behavior::status(529, "overloaded_error", "Overloaded"),
        );
    }
    let (cost, _, _) = completed(&mut env, "cost:fallback", "[[mock:fb]] hello", json!({})).await;
    let models: Vec<String> = env
        .mock
        .requests_for("fb")
        .iter()
        .map(|r| r.body["model"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        models.last().map(String::as_str),
        Some("claude-haiku-4-5"),
        "{models:?}"
    );
    assert!(
        models[..models.len() - 1].iter().all(|m| m == MODEL),
        "{models:?}"
    );
    // Haiku 4.5's list prices.
    assert!(
        close(cost, USAGE.cost_usd((1.0, 5.0, 1.25, 0.10))),
        "{cost}"
    );
    worker.shutdown();
    worker.wait().await.unwrap();
    env.cleanup().await;
}

/// A turn cancelled mid-answer still cost something (the CLI counts a call
/// cut mid-response, estimating its output): the session's cost and the
/// job's include it, and the next turn's cost is its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_turns_cost_counts_for_its_session() {
    let mut env = env_with_usage(Backend::Sqlite).await;
    let worker = env.start_worker().await;
    let key = "cost:cancel";
    env.mock
        .push_behavior_for("held", crate::mock_api::Behavior::hold("a long answer"));
    let mut extra = json!({});
    extra["options"]["model"] = json!(MODEL);
    let job = env.publish_job(key, "[[mock:held]] go", extra).await;
    env.mock.wait_for_held(1, crate::harness::WAIT).await;
    // The answer's first text event: the CLI has read the answer's start
    // (its usage) by then. The mock holding is not enough: under load the
    // CLI had not read it yet, so the cut call cost nothing (CI).
    let mut ev = Vec::new();
    loop {
        let (_, e) = env.next_event(&job).await;
        let text = matches!(e.body, EventBody::Text { .. });
        ev.push(e);
        if text {
            break;
        }
    }
    env.publish_control(json!({"v": 1, "type": "cancel", "job_id": job}))
        .await;
    ev.extend(env.events_until_terminal(&job).await);
    assert!(
        matches!(ev.last().unwrap().body, EventBody::Cancelled { .. }),
        "{ev:#?}"
    );
    let store = store_of(&env).await;
    let cancelled = store.get_job(&job).await.unwrap().unwrap().cost_usd;
    // Input and cache tokens are known when the answer starts; output is estimated.
    let input_only = Usage {
        output_tokens: 0,
        ..USAGE
    }
    .cost_usd(SONNET_PRICES);
    assert!(
        cancelled >= input_only - 1e-9 && cancelled < 2.0 * per_answer(),
        "{cancelled}"
    );
    let (cost, sum, _) = completed(&mut env, key, "after the cancel", json!({})).await;
    assert!(close(cost, per_answer()), "{cost}");
    assert!(close(sum, cancelled + per_answer()), "{sum} {cancelled}");
    let session = store.get_session(key).await.unwrap().unwrap();
    assert!(close(session.cost_usd, sum));
    worker.shutdown();
    worker.wait().await.unwrap();
    env.cleanup().await;
}
