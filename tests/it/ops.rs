//! The admin port (`ops.listen`): `/metrics` counts what happened,
//! `/readyz` follows the broker connection down and back, `/healthz`
//! answers, and a port in use fails start-up with a message.

use claude_worker::client::Client;
use claude_worker::config::Secret;
use claude_worker::protocol::{EventBody, JobV1};
use claude_worker::worker::Worker;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::broker_node::BrokerNode;
use crate::harness::{Backend, TestEnv, WAIT};
use crate::mock_api::Behavior;

/// `GET path` on the admin port: (status, body). HTTP/1.1 with
/// `Connection: close`, so the body is everything after the headers.
async fn get(worker: &Worker, path: &str) -> (u16, String) {
    let addr = worker.ops_addr.expect("the admin port is on");
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut raw = String::new();
        s.read_to_string(&mut raw).await.ok()?;
        let (head, body) = raw.split_once("\r\n\r\n")?;
        let status = head.split(' ').nth(1)?.parse().ok()?;
        Some((status, body.to_string()))
    };
    tokio::time::timeout(WAIT, exchange)
        .await
        .unwrap_or_else(|_| panic!("GET {path}: no answer within {WAIT:?}"))
        .unwrap_or_else(|| panic!("GET {path}: not an HTTP answer"))
}

async fn readyz(worker: &Worker) -> (u16, Value) {
    let (status, body) = get(worker, "/readyz").await;
    (
        status,
        serde_json::from_str(&body).expect("/readyz is JSON"),
    )
}

/// Polls `GET path` every 20 ms until `done(status, body)`, for at most
/// `WAIT` (the shared bounded wait); returns the last body.
async fn poll(worker: &Worker, path: &str, what: &str, done: impl Fn(u16, &str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, body) = get(worker, path).await;
        if done(status, &body) {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {WAIT:?}; last answer {status}:\n{body}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The value of the sample `series` (name and labels exactly as
/// rendered), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(series)?.strip_prefix(' ')?;
        rest.trim().parse().ok()
    })
}

fn settings_with_ops(env: &TestEnv) -> claude_worker::config::Settings {
    let mut s = env.settings();
    s.ops.listen = "127.0.0.1:0".into();
    // Leases go back right after each job, so `leases_held` settles at 0.
    s.worker.warm_affinity_ms = 0;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_happened() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let worker = Worker::start(settings_with_ops(&env)).await.unwrap();
    let (status, body) = get(&worker, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, r#"{"alive":true}"#));
    env.mock.push_behavior_for(
        "flaky",
        Behavior::status(500, "api_error", "Internal server error"),
    );
    env.mock.push_behavior_for(
        "auth",
        Behavior::status(401, "authentication_error", "invalid x-api-key"),
    );
    env.mock
        .push_behavior_for("hold", Behavior::hold("never said"));
    let mut published = 0; // events the worker sent for these jobs
    let mut texted = [0, 0]; // jobs with a text event: default, webapp
    let runs: [(&str, &str, Value); 5] = [
        ("m:a", "hello", json!({})),
        ("m:a", "again", json!({})),
        ("m:b", "[[mock:flaky]] x", json!({})),
        ("m:c", "[[mock:auth]] x", json!({})),
        ("m:d", "planned", json!({"profile": "webapp"})),
    ];
    let mut last = Vec::new();
    let mut ran = Vec::new(); // (job id, webapp?) of the jobs that ran
    for (key, prompt, extra) in runs {
        let webapp = extra.get("profile").is_some();
        let job = env.publish_job(key, prompt, extra).await;
        ran.push((job.clone(), webapp));
        let events = env.events_until_terminal(&job).await;
        published += events.len();
        if events
            .iter()
            .any(|e| matches!(e.body, EventBody::Text { .. }))
        {
            texted[usize::from(webapp)] += 1;
        }
        last.push(events.last().unwrap().body.type_name());
    }
    assert_eq!(
        last,
        ["completed", "completed", "completed", "failed", "completed"]
    );

    // A running job cancelled; two deliveries dead-lettered.
    let held = env.publish_job("m:e", "[[mock:hold]] x", json!({})).await;
    ran.push((held.clone(), false));
    env.mock.wait_for_held(1, WAIT).await;
    env.publish_control(json!({"v": 1, "type": "cancel", "job_id": held}))
        .await;
    assert!(env.next_control_result().await.ok);
    let events = env.events_until_terminal(&held).await;
    published += events.len();
    // Its first delta may or may not have become a text event by then.
    if events
        .iter()
        .any(|e| matches!(e.body, EventBody::Text { .. }))
    {
        texted[0] += 1;
    }
    env.mock.release_held();
    env.publish_raw(b"not json", None).await;
    env.next_dead_letter().await;
    env.publish_job("m:f", "x", json!({"profile": "nope"}))
        .await;
    env.next_dead_letter().await;
    published += 2; // each dead letter is answered with a `failed` event

    // Leases go back (and gauges settle) just after the terminal events.
    let text = poll(
        &worker,
        "/metrics",
        "leases released, turns done, events counted",
        |_, t| {
            sample(t, "claude_worker_leases_held") == Some(0.0)
                && sample(t, "claude_worker_turns_running") == Some(0.0)
                && sample(
                    t,
                    "claude_worker_publish_confirm_seconds_count{kind=\"event\"}",
                ) == Some(published as f64)
        },
    )
    .await;
    let expect = [
        (
            "claude_worker_jobs_accepted_total{profile=\"default\"}",
            5.0,
        ),
        ("claude_worker_jobs_accepted_total{profile=\"webapp\"}", 1.0),
        (
            "claude_worker_jobs_completed_total{profile=\"default\"}",
            3.0,
        ),
        (
            "claude_worker_jobs_completed_total{profile=\"webapp\"}",
            1.0,
        ),
        (
            "claude_worker_jobs_failed_total{profile=\"default\",error_kind=\"auth\"}",
            1.0,
        ),
        (
            "claude_worker_jobs_cancelled_total{profile=\"default\"}",
            1.0,
        ),
        ("claude_worker_retries_total{reason=\"api\"}", 1.0),
        ("claude_worker_dead_letters_total{reason=\"decode\"}", 1.0),
        (
            "claude_worker_dead_letters_total{reason=\"unknown_profile\"}",
            1.0,
        ),
        (
            "claude_worker_queue_wait_seconds_count{profile=\"default\"}",
            5.0,
        ),
        (
            "claude_worker_queue_wait_seconds_count{profile=\"webapp\"}",
            1.0,
        ),
        (
            "claude_worker_turn_duration_seconds_count{profile=\"default\",outcome=\"completed\"}",
            3.0,
        ),
        (
            "claude_worker_turn_duration_seconds_count{profile=\"default\",outcome=\"failed\"}",
            1.0,
        ),
        (
            "claude_worker_turn_duration_seconds_count{profile=\"default\",outcome=\"cancelled\"}",
            1.0,
        ),
        (
            "claude_worker_time_to_first_text_seconds_count{profile=\"default\"}",
            texted[0] as f64,
        ),
        (
            "claude_worker_time_to_first_text_seconds_count{profile=\"webapp\"}",
            texted[1] as f64,
        ),
        (
            "claude_worker_publish_confirm_seconds_count{kind=\"control_result\"}",
            1.0,
        ),
        (
            "claude_worker_publish_confirm_seconds_count{kind=\"dead_letter\"}",
            2.0,
        ),
        ("claude_worker_broker_up", 1.0),
    ];
    // What the jobs cost, as the store recorded it, per profile.
    let mut cost = [0.0, 0.0];
    for (job_id, webapp) in &ran {
        let job = worker.context.store.get_job(job_id).await.unwrap().unwrap();
        cost[usize::from(*webapp)] += job.cost_usd;
    }
    for (profile, usd, jobs) in [("default", cost[0], 5.0), ("webapp", cost[1], 1.0)] {
        let series = format!("claude_worker_job_cost_usd_sum{{profile=\"{profile}\"}}");
        let got = sample(&text, &series).unwrap_or_else(|| panic!("{series} in\n{text}"));
        assert!(
            (got - usd).abs() < 1e-9,
            "{series}: {got} but the store says {usd}"
        );
        let series = format!("claude_worker_job_cost_usd_count{{profile=\"{profile}\"}}");
        assert_eq!(sample(&text, &series), Some(jobs), "{series} in\n{text}");
    }
    assert!(cost[0] > 0.0, "the mock's answers cost something");
    // Tokens of the completed turns, as the store's sessions summed them.
    for (profile, keys) in [
        ("default", &["m:a", "m:b", "m:c", "m:e"][..]),
        ("webapp", &["m:d"][..]),
    ] {
        let (mut input, mut output) = (0, 0);
        for key in keys {
            let s = worker
                .context
                .store
                .get_session(key)
                .await
                .unwrap()
                .unwrap();
            (input, output) = (input + s.input_tokens, output + s.output_tokens);
        }
        assert!(input > 0 && output > 0, "the mock reports usage");
        for (kind, n) in [("input", input), ("output", output)] {
            let series =
                format!("claude_worker_tokens_total{{profile=\"{profile}\",kind=\"{kind}\"}}");
            assert_eq!(
                sample(&text, &series),
                Some(n as f64),
                "{series} in\n{text}"
            );
        }
    }
    for (series, value) in expect {
        assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
    }
    let warm = worker.context.warm.stats();
    for (series, value) in [
        ("claude_worker_warm_hits_total", warm.hits),
        ("claude_worker_warm_misses_total", warm.misses),
        ("claude_worker_cli_spawns_total", warm.spawns),
        ("claude_worker_warm_processes", warm.idle),
    ] {
        assert_eq!(
            sample(&text, series),
            Some(value as f64),
            "{series} in\n{text}"
        );
    }
    assert!(
        warm.hits >= 1,
        "the session's second turn ran warm: {warm:?}"
    );
    assert!(text.contains("# TYPE claude_worker_turn_duration_seconds histogram"));
    // Bounded labels only: no session key or job id reaches a series.
    assert!(!text.contains("m:a") && !text.contains(&held), "{text}");

    worker.shutdown();
    worker.wait().await.expect("the worker stops cleanly");
    env.cleanup().await;
}

/// A worker's connection to a broker of the test's own: `/readyz` says
/// not ready (naming the broker) while the broker is stopped, and ready
/// again once it is back; `/healthz` stays alive throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_broker_down_and_back() {
    let node = BrokerNode::start().await;
    let env = TestEnv::new(Backend::Sqlite).await;
    let mut s = settings_with_ops(&env);
    s.amqp.url = Secret::new(node.url().as_str());
    s.amqp.recovery_limit_secs = 120;
    let worker = Worker::start(s).await.unwrap();
    let (status, body) = readyz(&worker).await;
    assert_eq!(status, 200, "{body}");
    let names: Vec<&str> = body["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["broker", "database", "cli", "accepting"]);

    node.stop_app().await;
    let body = poll(
        &worker,
        "/readyz",
        "/readyz fails while the broker is down",
        |status, _| status == 503,
    )
    .await;
    let last: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(last["ready"], false);
    assert_eq!(last["checks"][0]["name"], "broker");
    assert_eq!(last["checks"][0]["ok"], false, "{last}");
    assert_eq!(
        last["checks"][1]["ok"], true,
        "the database is fine: {last}"
    );
    assert_eq!(get(&worker, "/healthz").await.0, 200);
    // The gauge follows the connection (the check may have failed first
    // on the jobs channel).
    poll(&worker, "/metrics", "broker_up 0", |_, t| {
        sample(t, "claude_worker_broker_up") == Some(0.0)
    })
    .await;

    node.start_app().await;
    poll(
        &worker,
        "/readyz",
        "/readyz ready once the broker is back",
        |status, _| status == 200,
    )
    .await;

    worker.shutdown();
    worker.wait().await.expect("the worker stops cleanly");
    env.cleanup().await;
}

/// A supervised task that ends on its own (here the broker watch, after
/// the broker stayed down past `amqp.recovery_limit_secs`) turns
/// `/healthz` to 503 while the worker drains its turns, and the worker
/// then stops with an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_fails_once_a_supervised_task_ends() {
    let node = BrokerNode::start().await;
    let env = TestEnv::new(Backend::Sqlite).await;
    let mut s = settings_with_ops(&env);
    s.amqp.url = Secret::new(node.url().as_str());
    s.amqp.recovery_limit_secs = 1;
    // The drained turn's publishes fail fast with the broker gone.
    s.amqp.publish_timeout_ms = 1_000;
    let worker = Worker::start(s.clone()).await.unwrap();
    // A turn in flight keeps the worker draining (for the shutdown grace),
    // so the admin port is still up to say it is unhealthy.
    let client = Client::connect(&s.amqp, "ops-health-producer")
        .await
        .unwrap();
    env.mock.push_behavior_for("hh", Behavior::hold("late"));
    let job: JobV1 = serde_json::from_value(json!({
        "v": 1, "job_id": uuid::Uuid::new_v4().to_string(),
        "session_key": "health:a", "prompt": "[[mock:hh]] x",
    }))
    .unwrap();
    client.publish_job(&job).await.unwrap();
    env.mock.wait_for_held(1, WAIT).await;
    assert_eq!(get(&worker, "/healthz").await.0, 200);

    node.stop_app().await;
    let body = poll(&worker, "/healthz", "/healthz fails", |status, _| {
        status == 503
    })
    .await;
    assert_eq!(body, r#"{"alive":false}"#);
    env.mock.release_held();
    let err = tokio::time::timeout(WAIT, worker.wait())
        .await
        .expect("the worker stops within its bounds")
        .expect_err("it stops with an error");
    assert!(err.contains("broker watch"), "{err}");
    drop(client); // its broker is gone; nothing to close
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_port_in_use_fails_start_up_saying_so() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let mut s = env.settings();
    s.ops.listen = addr.to_string();
    let err = match Worker::start(s).await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a worker started on a port in use"),
    };
    assert!(
        err.contains(&format!("could not listen on ops.listen = {addr}"))
            && err.contains("ops.listen = \"\""),
        "{err}"
    );
    env.cleanup().await;
}

/// The Grafana dashboard (`docs/grafana/claude-worker.json`) queries only
/// metrics the worker exports, and every one of them at least once.
#[test]
fn the_dashboard_shows_every_metric_and_only_those() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/grafana/claude-worker.json"
    );
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap())
        .expect("the dashboard is JSON");
    let known: std::collections::BTreeSet<&str> = claude_worker::ops::metrics::names().collect();
    let mut used = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for (i, _) in expr.match_indices("claude_worker_") {
                let name: String = expr[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                let base = ["_bucket", "_count", "_sum"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|b| known.contains(b)))
                    .unwrap_or(&name)
                    .to_string();
                assert!(
                    known.contains(base.as_str()),
                    "unknown metric {name} in {expr}"
                );
                used.insert(base);
            }
        }
    }
    let missing: Vec<&&str> = known.iter().filter(|k| !used.contains(**k)).collect();
    assert!(missing.is_empty(), "not on the dashboard: {missing:?}");
}

/// `/readyz`'s check `name` in `body` (JSON): its `ok`.
fn check_ok(body: &str, name: &str) -> Option<bool> {
    let v: Value = serde_json::from_str(body).ok()?;
    v["checks"].as_array()?.iter().find(|c| c["name"] == name)?["ok"].as_bool()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_fails_while_the_database_is_down_or_the_cli_is_gone() {
    // A PostgreSQL server of the test's own, and the CLI behind a link the
    // test can take away.
    let pg = crate::common::pg_node::PgNode::start();
    let env = TestEnv::new(Backend::Sqlite).await;
    let link = env.dir.path().join("claude-link");
    std::os::unix::fs::symlink(crate::support::claude_bin(), &link).unwrap();
    let mut s = settings_with_ops(&env);
    s.database.url = Secret::new(pg.url());
    s.claude.path = link.clone();
    let worker = Worker::start(s).await.unwrap();
    let ready =
        |want: bool| move |status: u16, body: &str| (status == 200) == want && !body.is_empty();
    poll(&worker, "/readyz", "ready at start", ready(true)).await;

    pg.stop();
    let body = poll(
        &worker,
        "/readyz",
        "/readyz fails while the database is down",
        ready(false),
    )
    .await;
    assert_eq!(check_ok(&body, "database"), Some(false), "{body}");
    assert_eq!(check_ok(&body, "broker"), Some(true), "{body}");
    assert_eq!(check_ok(&body, "cli"), Some(true), "{body}");
    assert_eq!(
        get(&worker, "/healthz").await.0,
        200,
        "alive, only not ready"
    );
    pg.start_again();
    poll(
        &worker,
        "/readyz",
        "ready once the database is back",
        ready(true),
    )
    .await;

    std::fs::remove_file(&link).unwrap();
    let body = poll(
        &worker,
        "/readyz",
        "/readyz fails without the CLI",
        ready(false),
    )
    .await;
    assert_eq!(check_ok(&body, "cli"), Some(false), "{body}");
    assert_eq!(check_ok(&body, "database"), Some(true), "{body}");
    std::os::unix::fs::symlink(crate::support::claude_bin(), &link).unwrap();
    poll(
        &worker,
        "/readyz",
        "ready once the CLI is back",
        ready(true),
    )
    .await;
    worker.shutdown();
    worker.wait().await.unwrap();
}
