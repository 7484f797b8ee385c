//! Context management (issue 14): what the real CLI (2.1.330) does when it
//! compacts, pinned against the mock API, and the worker's compaction at a
//! profile's threshold, on demand and by the CLI itself.

use std::time::Duration;

use claude_worker::protocol::{CompactTrigger, EventBody, EventV1};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

use crate::common::world::wait_until;
use crate::harness::{cli_pids, Backend, TestEnv};
use crate::mock_api::{Behavior, MockApi, Usage, MOCK_SUMMARY};
use crate::support::{cli_command, user_line};

use crate::pipeline::on_both_backends;

// On both backends: the scenarios whose state lives in the store (stored
// context, transcripts, the compaction backoff); the others run on SQLite
// only, for CI's time.
on_both_backends!(
    a_session_past_the_threshold_is_compacted_before_its_next_job,
    a_failed_compaction_is_not_retried_before_every_job,
);

/// A model with a 200k window, so the mock's usage can fill it.
const MODEL: &str = "claude-sonnet-4-5";
const WINDOW: u64 = 200_000;
const WAIT: Duration = Duration::from_secs(60);

fn usage(input_tokens: u64) -> Usage {
    Usage {
        input_tokens,
        output_tokens: 5,
        cache_creation_input_tokens: 0,
        cache_read_input_tokens: 0,
    }
}

/// A CLI in stream-json mode whose stdin stays open between turns, as the
/// worker's warm processes are.
struct LiveCli {
    _child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl LiveCli {
    /// `model`: `None` for the CLI's default.
    async fn start(mock: &MockApi, home: &std::path::Path, model: Option<&str>) -> LiveCli {
        let model = model.map(|m| format!("--model={m}"));
        let args: Vec<&str> = model.iter().map(String::as_str).collect();
        let mut child = cli_command(mock, home, &args).spawn().expect("spawn CLI");
        LiveCli {
            stdin: child.stdin.take().unwrap(),
            lines: BufReader::new(child.stdout.take().unwrap()).lines(),
            _child: child,
        }
    }

    async fn send(&mut self, line: String) {
        self.stdin.write_all(line.as_bytes()).await.unwrap();
        self.stdin.write_all(b"\n").await.unwrap();
        self.stdin.flush().await.unwrap();
    }

    /// Every line up to and including the first that satisfies `pred`.
    async fn until(&mut self, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut seen = Vec::new();
        let read = async {
            while let Some(l) = self.lines.next_line().await.unwrap() {
                let Ok(v) = serde_json::from_str::<Value>(&l) else {
                    continue;
                };
                let done = pred(&v);
                seen.push(v);
                if done {
                    return;
                }
            }
            panic!("the CLI ended; lines: {seen:#?}");
        };
        tokio::time::timeout(WAIT, read)
            .await
            .expect("the CLI answered in time");
        seen
    }

    /// Sends a user message and returns the turn's lines up to its result.
    async fn turn(&mut self, text: &str) -> Vec<Value> {
        self.send(user_line(text)).await;
        self.until(|v| v["type"] == "result").await
    }

    /// The answer to a `get_context_usage` control request.
    async fn context_usage(&mut self) -> Value {
        let line = json!({"type": "control_request", "request_id": "ctx",
                          "request": {"subtype": "get_context_usage"}});
        self.send(line.to_string()).await;
        let lines = self.until(|v| v["type"] == "control_response").await;
        let r = &lines.last().unwrap()["response"];
        assert_eq!(r["subtype"], "success", "{r}");
        r["response"].clone()
    }
}

fn of_kind<'a>(lines: &'a [Value], kind: &str, subtype: &str) -> Vec<&'a Value> {
    lines
        .iter()
        .filter(|l| l["type"] == kind && l["subtype"] == subtype)
        .collect()
}

/// `/compact` sent as a user message on a warm (stream-json input)
/// process: `system/status` compacting, `system/compact_boundary` with
/// `pre_tokens`/`post_tokens`, a `result` with `num_turns: 0` and no text;
/// one summary request to the API, whose answer must carry `<summary>`
/// tags (without them the CLI asks once more); the next turn continues
/// from the summary. And `get_context_usage` before and after.
#[tokio::test]
async fn the_cli_compacts_on_slash_compact_and_reports_context_usage() {
    let mock = MockApi::start().await;
    let home = tempfile::tempdir().unwrap();
    mock.set_usage(usage(150_000));
    let mut cli = LiveCli::start(&mock, home.path(), Some(MODEL)).await;
    cli.turn("the first question").await;

    let before = cli.context_usage().await;
    assert_eq!(before["totalTokens"], 150_000, "{before}");
    assert_eq!(before["maxTokens"], WINDOW, "{before}");
    assert_eq!(before["percentage"], 75, "{before}");
    // The CLI compacts by itself at its window less a 33k buffer.
    assert_eq!(before["autoCompactThreshold"], WINDOW - 33_000, "{before}");
    assert_eq!(before["isAutoCompactEnabled"], true, "{before}");

    mock.set_usage(usage(10));
    let lines = cli.turn("/compact").await;
    let status: Vec<&Value> = of_kind(&lines, "system", "status");
    assert_eq!(status[0]["status"], "compacting", "{lines:#?}");
    assert!(
        status.iter().any(|s| s["compact_result"] == "success"),
        "{lines:#?}"
    );
    let boundary = of_kind(&lines, "system", "compact_boundary");
    assert_eq!(boundary.len(), 1, "{lines:#?}");
    let meta = &boundary[0]["compact_metadata"];
    assert_eq!(meta["trigger"], "manual");
    assert!(meta["pre_tokens"].as_u64().unwrap() >= 150_000, "{meta}");
    assert!(meta["post_tokens"].as_u64().unwrap() < 10_000, "{meta}");
    let result = lines.last().unwrap();
    assert_eq!(
        (&result["subtype"], &result["num_turns"], &result["result"]),
        (&json!("success"), &json!(0), &json!("")),
        "{result}"
    );
    assert_eq!(result["local_command"], "compact", "{result}");
    assert!(
        !lines.iter().any(|l| l["type"] == "stream_event"),
        "the summary is not streamed as an answer"
    );
    let summary_requests = mock.compaction_requests();
    assert_eq!(summary_requests.len(), 1);
    assert!(summary_requests[0].carries("the first question"));

    let after = cli.context_usage().await;
    assert!(after["totalTokens"].as_u64().unwrap() < 10_000, "{after}");

    cli.turn("after the compaction").await;
    let next = mock.requests().pop().unwrap();
    assert!(next.carries(MOCK_SUMMARY), "{:?}", next.user_texts());
    assert!(
        !next.carries("the first question"),
        "{:?}",
        next.user_texts()
    );

    // An answer without <summary> tags: the CLI asks once more.
    mock.push_compaction_behavior(Behavior::reply("no tags here"));
    cli.turn("/compact").await;
    assert_eq!(mock.compaction_requests().len(), 3);
}

/// The CLI's own autocompact: with its default model (a 1M window), a
/// context past `autoCompactThreshold` is compacted at the start of the
/// next turn (`compact_boundary` with trigger `auto`), and that turn's
/// request continues from the summary. (With claude-sonnet-4-5, 199k of
/// its 200k window did not autocompact in 2.1.330.)
#[tokio::test]
async fn the_cli_autocompacts_past_its_threshold() {
    let mock = MockApi::start().await;
    let home = tempfile::tempdir().unwrap();
    mock.set_usage(usage(980_000));
    let mut cli = LiveCli::start(&mock, home.path(), None).await;
    cli.turn("the first question").await;
    mock.set_usage(usage(10));
    let lines = cli.turn("the second question").await;
    let boundary = of_kind(&lines, "system", "compact_boundary");
    assert_eq!(boundary.len(), 1, "{lines:#?}");
    assert_eq!(boundary[0]["compact_metadata"]["trigger"], "auto");
    let answer = lines.iter().position(|l| l["type"] == "assistant").unwrap();
    let at = lines
        .iter()
        .position(|l| l["subtype"] == "compact_boundary")
        .unwrap();
    assert!(at < answer, "compacted before the turn's answer");
    assert_eq!(mock.compaction_requests().len(), 1);
    let last = mock.requests().pop().unwrap();
    assert!(last.carries(MOCK_SUMMARY));
    assert!(last.carries("the second question"));
}

/// Publishes a job and returns its events up to the terminal one.
async fn run(env: &mut TestEnv, key: &str, prompt: &str, extra: Value) -> Vec<EventV1> {
    let job = env.publish_job(key, prompt, extra).await;
    env.events_until_terminal(&job).await
}

fn sonnet() -> Value {
    json!({"options": {"model": MODEL}})
}

/// The `compacted` events of a job, as (trigger, pre, post).
fn compactions(ev: &[EventV1]) -> Vec<(CompactTrigger, u64, u64)> {
    ev.iter()
        .filter_map(|e| match &e.body {
            EventBody::Compacted {
                trigger,
                pre_tokens,
                post_tokens,
            } => Some((*trigger, *pre_tokens, *post_tokens)),
            _ => None,
        })
        .collect()
}

/// `(result, num_turns, context_tokens, context_window_tokens)` of a completed job.
fn completed(ev: &[EventV1]) -> (String, u32, Option<u64>, Option<u64>) {
    match &ev.last().unwrap().body {
        EventBody::Completed {
            result,
            num_turns,
            context_tokens,
            context_window_tokens,
            ..
        } => (
            result.clone(),
            *num_turns,
            *context_tokens,
            *context_window_tokens,
        ),
        other => panic!("expected completed, got {other:?}"),
    }
}

/// The last request of a turn (not a summary request).
fn last_turn_request(mock: &MockApi) -> crate::mock_api::RecordedRequest {
    mock.requests()
        .into_iter()
        .rev()
        .find(|r| !r.is_compaction())
        .expect("a turn request")
}

async fn session_context(env: &TestEnv, key: &str) -> (Option<i64>, Option<i64>) {
    let store = claude_worker::store::connect(&env.settings().database.url, 1)
        .await
        .unwrap();
    let s = store.get_session(key).await.unwrap().unwrap();
    (s.context_tokens, s.context_window)
}

/// A session at 75% of its window with `compact_at_percent = 50` is
/// compacted on its warm process before its next job (`compacted`,
/// trigger `threshold`, before `started`); that turn continues from the
/// summary, the stored context drops, the next job does not compact, and
/// after a worker restart a cold resume continues the compacted session
/// from the stored transcript.
async fn a_session_past_the_threshold_is_compacted_before_its_next_job(backend: Backend) {
    let mut env = TestEnv::new(backend).await;
    let at_50 = |s: &mut claude_worker::config::Settings| {
        for p in s.profiles.values_mut() {
            p.compact_at_percent = Some(50);
        }
    };
    let w = env.start_worker_with(at_50).await;
    let key = "ctx:threshold";
    env.mock.set_usage(usage(150_000));
    let first = run(&mut env, key, "the first question", sonnet()).await;
    assert!(compactions(&first).is_empty());
    let (_, _, ctx, window) = completed(&first);
    assert_eq!((ctx, window), (Some(150_000), Some(WINDOW)));
    wait_until("the process is warm", || w.context.warm.stats().idle == 1).await;

    env.mock.set_usage(usage(10));
    let second = run(&mut env, key, "the second question", sonnet()).await;
    let c = compactions(&second);
    assert_eq!(c.len(), 1, "{second:#?}");
    assert_eq!(c[0].0, CompactTrigger::Threshold);
    assert!(c[0].1 >= 150_000 && c[0].2 < 10_000, "{c:?}");
    let pos = |t: &str| second.iter().position(|e| e.body.type_name() == t);
    assert!(
        pos("compacted") < pos("started"),
        "compacted before the turn"
    );
    let (result, _, ctx, _) = completed(&second);
    assert_eq!(result, "echo: the second question");
    // The turn's cost includes its compaction: two answers at sonnet's
    // list prices ($3 in, $15 out per million tokens).
    let EventBody::Completed { total_cost_usd, .. } = &second.last().unwrap().body else {
        unreachable!()
    };
    let one = (10.0 * 3.0 + 5.0 * 15.0) / 1e6;
    assert!(
        (total_cost_usd - 2.0 * one).abs() < 1e-9,
        "{total_cost_usd}"
    );
    assert!(ctx.unwrap() < 10_000, "{ctx:?}");
    assert_eq!(env.mock.compaction_requests().len(), 1);
    assert!(env.mock.compaction_requests()[0].carries("the first question"));
    let turn = last_turn_request(&env.mock);
    assert!(turn.carries(MOCK_SUMMARY), "{:?}", turn.user_texts());
    assert!(!turn.carries("the first question"));
    let s = w.context.warm.stats();
    assert_eq!(
        (s.spawns, s.hits),
        (1, 1),
        "compacted and ran on the warm process: {s:?}"
    );
    assert!(session_context(&env, key).await.0.unwrap() < 10_000);

    let third = run(&mut env, key, "the third question", sonnet()).await;
    assert!(compactions(&third).is_empty(), "under the threshold now");

    w.shutdown();
    w.wait().await.unwrap();
    let w = env.start_worker_with(at_50).await;
    let fourth = run(&mut env, key, "the fourth question", sonnet()).await;
    assert_eq!(completed(&fourth).0, "echo: the fourth question");
    let turn = last_turn_request(&env.mock);
    assert!(
        turn.carries(MOCK_SUMMARY),
        "a cold resume continues the compacted session"
    );
    assert!(turn.carries("the third question") && !turn.carries("the first question"));
    w.shutdown();
    w.wait().await.unwrap();
    env.cleanup().await;
}

/// On demand, cold (no warm pool): `options.compact` compacts before the
/// turn (trigger `requested`); a prompt `/compact` is the CLI's own command
/// (its `compact_boundary` surfaced as `compacted`, `requested`; the job
/// completes with no text and `num_turns` 0); and the CLI's autocompact
/// near its default model's window is surfaced as `compacted`, `auto`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_on_demand_and_the_clis_own_are_published() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let w = env
        .start_worker_with(|s| s.claude.warm_max_processes = 0)
        .await;
    let key = "ctx:demand";
    run(&mut env, key, "the first question", json!({})).await;
    let asked = run(
        &mut env,
        key,
        "the second question",
        json!({"options": {"compact": true}}),
    )
    .await;
    let c = compactions(&asked);
    assert_eq!(c.len(), 1, "{asked:#?}");
    assert_eq!(c[0].0, CompactTrigger::Requested);
    assert_eq!(completed(&asked).0, "echo: the second question");
    let turn = last_turn_request(&env.mock);
    assert!(turn.carries(MOCK_SUMMARY) && !turn.carries("the first question"));

    let slash = run(&mut env, key, "/compact", json!({})).await;
    let c = compactions(&slash);
    assert_eq!(c.len(), 1, "{slash:#?}");
    assert_eq!(c[0].0, CompactTrigger::Requested);
    let (result, num_turns, _, _) = completed(&slash);
    assert_eq!((result.as_str(), num_turns), ("", 0));
    assert_eq!(env.mock.compaction_requests().len(), 2);

    env.mock.set_usage(usage(980_000));
    run(&mut env, key, "a big question", json!({})).await;
    env.mock.set_usage(usage(10));
    let auto = run(&mut env, key, "the next question", json!({})).await;
    let c = compactions(&auto);
    assert_eq!(c.len(), 1, "{auto:#?}");
    assert_eq!(c[0].0, CompactTrigger::Auto);
    assert!(c[0].1 >= 980_000, "{c:?}");
    assert_eq!(completed(&auto).0, "echo: the next question");
    assert_eq!(env.mock.compaction_requests().len(), 3);
    w.shutdown();
    w.wait().await.unwrap();
    env.cleanup().await;
}

/// The warm CLI is SIGKILLed while it compacts (its summary request held):
/// the job still runs, cold, on the uncompacted session, and completes;
/// nothing is published for the failed compaction; the next job does not
/// try again at the same context, and the one after it grew does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cli_that_dies_while_compacting_loses_nothing() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let w = env
        .start_worker_with(|s| {
            for p in s.profiles.values_mut() {
                p.compact_at_percent = Some(50);
            }
        })
        .await;
    let key = "ctx:dies";
    env.mock.set_usage(usage(150_000));
    run(&mut env, key, "the first question", sonnet()).await;
    wait_until("the process is warm", || w.context.warm.stats().idle == 1).await;

    env.mock
        .push_compaction_behavior(Behavior::hold("never finished"));
    let job = env.publish_job(key, "the second question", sonnet()).await;
    env.mock.wait_for_held(1, WAIT).await;
    let pids = cli_pids(&env.prefix);
    assert_eq!(pids.len(), 1, "{pids:?}");
    // SAFETY: signalling a process this test's worker started.
    unsafe { libc::kill(pids[0], libc::SIGKILL) };
    let second = env.events_until_terminal(&job).await;
    assert!(compactions(&second).is_empty(), "{second:#?}");
    assert_eq!(completed(&second).0, "echo: the second question");
    let turn = last_turn_request(&env.mock);
    assert!(
        turn.carries("the first question") && !turn.carries(MOCK_SUMMARY),
        "the turn ran on the whole conversation"
    );

    // The failure is waited out: the next job does not try again at the
    // same context, and one after the context grew by a tenth does.
    env.mock.set_usage(usage(170_000));
    let third = run(&mut env, key, "the third question", sonnet()).await;
    assert!(compactions(&third).is_empty(), "{third:#?}");
    assert_eq!(completed(&third).0, "echo: the third question");
    assert_eq!(env.mock.compaction_requests().len(), 1);
    let fourth = run(&mut env, key, "the fourth question", sonnet()).await;
    let c = compactions(&fourth);
    assert_eq!(c.len(), 1, "{fourth:#?}");
    assert_eq!(c[0].0, CompactTrigger::Threshold);
    assert_eq!(completed(&fourth).0, "echo: the fourth question");
    let turn = last_turn_request(&env.mock);
    assert!(turn.carries(MOCK_SUMMARY) && turn.carries("the fourth question"));
    assert_eq!(env.mock.compaction_requests().len(), 2);
    w.shutdown();
    w.wait().await.unwrap();
    env.cleanup().await;
}

/// The worker stops (graceful shutdown, then its kill) while the session's
/// CLI compacts: the job is handed back without an outcome, and a new
/// worker compacts the session (cold, from the stored transcript) and
/// runs the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_while_compacting_hands_the_job_on() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let at_50 = |s: &mut claude_worker::config::Settings| {
        for p in s.profiles.values_mut() {
            p.compact_at_percent = Some(50);
        }
    };
    let w = env.start_worker_with(at_50).await;
    let key = "ctx:stopped";
    env.mock.set_usage(usage(150_000));
    run(&mut env, key, "the first question", sonnet()).await;
    wait_until("the process is warm", || w.context.warm.stats().idle == 1).await;

    env.mock
        .push_compaction_behavior(Behavior::hold("never finished"));
    let job = env.publish_job(key, "the second question", sonnet()).await;
    env.mock.wait_for_held(1, WAIT).await;
    w.shutdown();
    w.wait().await.unwrap();
    assert!(
        env.maybe_event(&job, Duration::from_millis(200))
            .await
            .is_none(),
        "nothing was published for the interrupted compaction"
    );

    env.mock.set_usage(usage(10));
    let w = env.start_worker_with(at_50).await;
    let second = env.events_until_terminal(&job).await;
    let c = compactions(&second);
    assert_eq!(c.len(), 1, "{second:#?}");
    assert_eq!(c[0].0, CompactTrigger::Threshold);
    assert_eq!(completed(&second).0, "echo: the second question");
    assert_eq!(env.mock.compaction_requests().len(), 2);
    let turn = last_turn_request(&env.mock);
    assert!(turn.carries(MOCK_SUMMARY) && !turn.carries("the first question"));
    w.shutdown();
    w.wait().await.unwrap();
    env.cleanup().await;
}

/// Moves the session's recorded compaction failure `ms` into the past, as
/// if that much time had gone by (the worker reads the real clock).
async fn age_compaction_failure(env: &TestEnv, key: &str, ms: i64) {
    use sqlx::Connection;
    let url = env.settings().database.url.expose().to_string();
    let sql = "UPDATE sessions SET compact_failed_at_ms = compact_failed_at_ms - $1 \
               WHERE session_key = $2";
    let done = if url.starts_with("sqlite:") {
        let mut c = sqlx::SqliteConnection::connect(&url).await.unwrap();
        sqlx::query(sql)
            .bind(ms)
            .bind(key)
            .execute(&mut c)
            .await
            .unwrap()
            .rows_affected()
    } else {
        let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
        sqlx::query(sql)
            .bind(ms)
            .bind(key)
            .execute(&mut c)
            .await
            .unwrap()
            .rows_affected()
    };
    assert_eq!(done, 1);
}

async fn compact_failed(env: &TestEnv, key: &str) -> Option<(i64, i64)> {
    let store = claude_worker::store::connect(&env.settings().database.url, 1)
        .await
        .unwrap();
    store
        .get_session(key)
        .await
        .unwrap()
        .unwrap()
        .compact_failed
}

/// The summary request of a threshold compaction fails (the CLI answers
/// `compact_result: failed` and a `success` result): the job still runs
/// and completes on the uncompacted session, and the failure is stored
/// with the session. The next job at the same context makes no summary
/// request (the mock's count stays at 1), on a restarted worker too; once
/// `compact_retry_secs` have passed (the record moved back in time), the
/// next job compacts again, and that success clears the record.
async fn a_failed_compaction_is_not_retried_before_every_job(backend: Backend) {
    let mut env = TestEnv::new(backend).await;
    let settings = |s: &mut claude_worker::config::Settings| {
        for p in s.profiles.values_mut() {
            p.compact_at_percent = Some(50);
            p.compact_retry_secs = 3_600;
        }
    };
    let w = env.start_worker_with(settings).await;
    let key = "ctx:backoff";
    env.mock.set_usage(usage(150_000));
    run(&mut env, key, "the first question", sonnet()).await;
    assert_eq!(compact_failed(&env, key).await, None);

    // Every summary request fails (the CLI may ask again by itself at once).
    for _ in 0..4 {
        let failing = Behavior::status(500, "api_error", "the summary failed");
        env.mock.push_compaction_behavior(failing);
    }
    let second = run(&mut env, key, "the second question", sonnet()).await;
    assert!(compactions(&second).is_empty(), "{second:#?}");
    assert_eq!(completed(&second).0, "echo: the second question");
    let tried = env.mock.compaction_requests().len();
    assert!((1..4).contains(&tried), "compaction was tried: {tried}");
    env.mock.clear_compaction_behaviors();
    let turn = last_turn_request(&env.mock);
    assert!(turn.carries("the first question") && !turn.carries(MOCK_SUMMARY));
    let (_, tokens) = compact_failed(&env, key)
        .await
        .expect("the failure is stored");
    assert_eq!(tokens, 150_000);

    let third = run(&mut env, key, "the third question", sonnet()).await;
    assert!(compactions(&third).is_empty(), "{third:#?}");
    assert_eq!(completed(&third).0, "echo: the third question");
    assert_eq!(
        env.mock.compaction_requests().len(),
        tried,
        "not tried again"
    );
    // The record is the store's: another worker waits it out too.
    w.shutdown();
    w.wait().await.unwrap();
    let w = env.start_worker_with(settings).await;
    let fourth = run(&mut env, key, "the fourth question", sonnet()).await;
    assert!(compactions(&fourth).is_empty(), "{fourth:#?}");
    assert_eq!(
        env.mock.compaction_requests().len(),
        tried,
        "not tried again"
    );

    age_compaction_failure(&env, key, 3_600_000).await;
    env.mock.set_usage(usage(10));
    let fifth = run(&mut env, key, "the fifth question", sonnet()).await;
    let c = compactions(&fifth);
    assert_eq!(c.len(), 1, "{fifth:#?}");
    assert_eq!(c[0].0, CompactTrigger::Threshold);
    assert_eq!(completed(&fifth).0, "echo: the fifth question");
    assert_eq!(env.mock.compaction_requests().len(), tried + 1);
    let turn = last_turn_request(&env.mock);
    assert!(turn.carries(MOCK_SUMMARY) && !turn.carries("the first question"));
    assert_eq!(compact_failed(&env, key).await, None, "a success clears it");
    w.shutdown();
    w.wait().await.unwrap();
    env.cleanup().await;
}
