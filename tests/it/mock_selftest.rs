//! Self-tests of the mock Messages API, driven by the real Claude Code CLI.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::mock_api::{Behavior, MockApi};
use crate::support::{
    cli_command, is_text_delta, result_line, run_cli, run_cli_with_env, session_id, text_deltas,
    user_line, CliProcess, CLI_TIMEOUT,
};

const WAIT: Duration = Duration::from_secs(60);

fn home() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp HOME")
}

fn describe(lines: &[Value], stderr: &str) -> String {
    let lines: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    format!("stdout:\n{}\nstderr:\n{stderr}", lines.join("\n"))
}

#[tokio::test]
async fn echo_turn() {
    let mock = MockApi::start().await;
    let home = home();
    let t0 = Instant::now();
    let (status, lines, stderr) = run_cli(&mock, home.path(), &[], &[user_line("hi there")]).await;
    let wall = t0.elapsed();
    eprintln!("cold echo turn: {wall:?}");
    let ctx = describe(&lines, &stderr);
    assert!(status.success(), "{ctx}");
    let result = result_line(&lines).unwrap_or_else(|| panic!("no result line\n{ctx}"));
    assert_eq!(result["result"], "echo: hi there", "{ctx}");
    assert_eq!(result["is_error"], false, "{ctx}");
    assert_eq!(text_deltas(&lines), "echo: hi there", "{ctx}");
    assert_eq!(
        lines.iter().filter(|l| is_text_delta(l)).count(),
        4,
        "{ctx}"
    );

    let reqs = mock.requests();
    assert_eq!(reqs.len(), 1, "{ctx}");
    let r = &reqs[0];
    assert_eq!(r.path, "/v1/messages");
    assert_eq!(r.query.as_deref(), Some("beta=true"));
    assert_eq!(r.body["stream"], true);
    assert_eq!(r.user_texts(), vec!["hi there".to_string()]);
    assert_eq!(r.last_user_text().as_deref(), Some("hi there"));
    assert!(r.assistant_texts().is_empty());
    assert_eq!(r.marker(), None);
    assert_eq!(r.header("x-api-key"), Some("sk-test"));
    let finished = r.finished.expect("response body should have ended");
    assert!(finished >= r.started);
    // Nothing but the one Messages call with non-essential traffic off.
    let others: Vec<_> = mock
        .all_requests()
        .into_iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .filter(|p| p != "POST /v1/messages")
        .collect();
    eprintln!("other requests: {others:?}");
}

#[tokio::test]
async fn resume_sends_earlier_turns() {
    let mock = MockApi::start().await;
    let home = home();
    mock.push_behavior(Behavior::reply("Hello world"));
    let (status, lines, stderr) = run_cli(&mock, home.path(), &[], &[user_line("hi there")]).await;
    let ctx = describe(&lines, &stderr);
    assert!(status.success(), "{ctx}");
    assert_eq!(
        result_line(&lines).unwrap()["result"],
        "Hello world",
        "{ctx}"
    );
    let sid = session_id(&lines).expect("session id");

    let resume = format!("--resume={sid}");
    let (status, lines, stderr) =
        run_cli(&mock, home.path(), &[&resume], &[user_line("second msg")]).await;
    let ctx = describe(&lines, &stderr);
    assert!(status.success(), "{ctx}");
    assert_eq!(
        result_line(&lines).unwrap()["result"],
        "echo: second msg",
        "{ctx}"
    );
    assert_eq!(session_id(&lines).as_deref(), Some(sid.as_str()), "{ctx}");

    let reqs = mock.requests();
    assert_eq!(reqs.len(), 2);
    let r = &reqs[1];
    assert_eq!(
        r.user_texts(),
        vec!["hi there".to_string(), "second msg".to_string()]
    );
    assert_eq!(r.assistant_texts(), vec!["Hello world".to_string()]);
    assert_eq!(r.last_user_text().as_deref(), Some("second msg"));
}

async fn status_case(code: u16, error_type: &str) {
    let mock = MockApi::start().await;
    let home = home();
    mock.push_behavior(Behavior::status(code, error_type, "mock failure"));
    let (_status, lines, stderr) = run_cli(&mock, home.path(), &[], &[user_line("hi there")]).await;
    let ctx = describe(&lines, &stderr);
    let result = result_line(&lines).unwrap_or_else(|| panic!("no result line\n{ctx}"));
    assert_eq!(result["is_error"], true, "{ctx}");
    assert_eq!(result["api_error_status"], code, "{ctx}");
    eprintln!("status {code}: exit {_status:?}, result {result}");
    // CLAUDE_CODE_MAX_RETRIES=0: no retry.
    assert_eq!(mock.requests().len(), 1, "{ctx}");
}

#[tokio::test]
async fn status_errors_are_reported() {
    tokio::join!(
        status_case(500, "api_error"),
        status_case(401, "authentication_error")
    );
}

#[tokio::test]
async fn hold_streams_first_delta_then_waits_for_release() {
    let mock = MockApi::start().await;
    let home = home();
    let text = "first half, then the second half";
    mock.push_behavior(Behavior::hold(text));
    let mut cli = CliProcess::spawn(
        cli_command(&mock, home.path(), &[]),
        &[user_line("hi there")],
    )
    .await;

    mock.wait_for_held(1, WAIT).await;
    let delta = cli.read_until(WAIT, is_text_delta).await;
    assert_eq!(
        delta["event"]["delta"]["text"].as_str(),
        Some(Behavior::hold_first_delta(text).as_str())
    );
    assert!(result_line(&cli.seen).is_none());
    assert!(
        mock.requests()[0].finished.is_none(),
        "held response must still be open"
    );

    mock.release_held();
    let (status, lines, stderr) = cli.finish(CLI_TIMEOUT).await;
    let ctx = describe(&lines, &stderr);
    assert!(status.success(), "{ctx}");
    assert_eq!(result_line(&lines).unwrap()["result"], text, "{ctx}");
    assert_eq!(text_deltas(&lines), text, "{ctx}");
    let reqs = mock.wait_for_requests(1, WAIT).await;
    assert!(reqs[0].finished.is_some());
}

#[tokio::test]
async fn disconnect_mid_stream_is_an_error() {
    let mock = MockApi::start().await;
    let home = home();
    // The broken stream is followed by the CLI's own non-streaming retry:
    // break that one too.
    mock.push_behavior(Behavior::Disconnect);
    mock.push_behavior(Behavior::Disconnect);
    let (status, lines, stderr) = run_cli(&mock, home.path(), &[], &[user_line("hi there")]).await;
    let ctx = describe(&lines, &stderr);
    let result = result_line(&lines).unwrap_or_else(|| panic!("no result line\n{ctx}"));
    eprintln!(
        "disconnect x2: exit {status:?}, result {}",
        result["result"]
    );
    assert_eq!(result["is_error"], true, "{ctx}");
    assert!(!status.success(), "{ctx}");
    let reqs = mock.requests();
    assert_eq!(reqs.len(), 2, "{ctx}");
    assert!(reqs[0].is_streaming());
    assert!(!reqs[1].is_streaming());
    assert!(reqs.iter().all(|r| r.finished.is_some()));
}

#[tokio::test]
async fn disconnect_then_non_streaming_fallback_recovers() {
    let mock = MockApi::start().await;
    let home = home();
    mock.push_behavior(Behavior::Disconnect);
    let (status, lines, stderr) = run_cli(&mock, home.path(), &[], &[user_line("hi there")]).await;
    let ctx = describe(&lines, &stderr);
    let result = result_line(&lines).unwrap_or_else(|| panic!("no result line\n{ctx}"));
    eprintln!(
        "disconnect then echo: exit {status:?}, result {}",
        result["result"]
    );
    for l in lines.iter().filter(|l| l["type"] != "result") {
        eprintln!("  line: {}", &l.to_string()[..l.to_string().len().min(300)]);
    }
    let reqs = mock.requests();
    assert_eq!(reqs.len(), 2, "{ctx}");
    assert!(!reqs[1].is_streaming(), "{ctx}");
    assert_eq!(result["result"], "echo: hi there", "{ctx}");
    assert_eq!(result["is_error"], false, "{ctx}");
    // The recovered reply arrives as a whole `assistant` message: no
    // text_delta stream events at all.
    assert_eq!(text_deltas(&lines), "", "{ctx}");
}

#[tokio::test]
async fn one_retry_after_overloaded() {
    let mock = MockApi::start().await;
    let home = home();
    mock.push_behavior(Behavior::status(529, "overloaded_error", "Overloaded"));
    let t0 = Instant::now();
    let (status, lines, stderr) = run_cli_with_env(
        &mock,
        home.path(),
        &[],
        &[user_line("hi there")],
        &[("CLAUDE_CODE_MAX_RETRIES", "1")],
    )
    .await;
    let ctx = describe(&lines, &stderr);
    eprintln!("529 then echo with one retry: {:?}", t0.elapsed());
    assert!(status.success(), "{ctx}");
    assert_eq!(
        result_line(&lines).unwrap()["result"],
        "echo: hi there",
        "{ctx}"
    );
    let reqs = mock.requests();
    assert_eq!(reqs.len(), 2, "{ctx}");
    // The CLI retries by itself (x-stainless-retry-count stays "0") and says
    // so on stdout.
    let retry = lines
        .iter()
        .find(|l| l["type"] == "system" && l["subtype"] == "api_retry")
        .unwrap_or_else(|| panic!("no api_retry line\n{ctx}"));
    assert_eq!(retry["error_status"], 529, "{ctx}");
}

#[tokio::test]
async fn tool_use_round_trip() {
    let mock = MockApi::start().await;
    let home = home();
    let file = home.path().join("note.txt");
    std::fs::write(&file, "mock file contents 42\n").unwrap();
    mock.push_behavior(Behavior::tool_use(
        "Read",
        json!({"file_path": file.to_str().unwrap()}),
    ));
    mock.push_behavior(Behavior::reply("done reading"));
    let (status, lines, stderr) = run_cli(&mock, home.path(), &[], &[user_line("read it")]).await;
    let ctx = describe(&lines, &stderr);
    assert!(status.success(), "{ctx}");
    let result = result_line(&lines).unwrap();
    assert_eq!(result["result"], "done reading", "{ctx}");
    assert_eq!(result["is_error"], false, "{ctx}");

    let reqs = mock.requests();
    assert_eq!(reqs.len(), 2, "{ctx}");
    let results = reqs[1].tool_results();
    eprintln!(
        "tool_result block: {}",
        serde_json::to_string(&results).unwrap()
    );
    eprintln!(
        "follow-up last 2 messages: {}",
        serde_json::to_string(
            &reqs[1].body["messages"]
                .as_array()
                .unwrap()
                .iter()
                .rev()
                .take(2)
                .collect::<Vec<_>>()
        )
        .unwrap()
    );
    assert_eq!(results.len(), 1);
    assert_eq!(results[0]["tool_use_id"], "toolu_mock_0001");
    assert!(
        results[0].to_string().contains("mock file contents 42"),
        "{}",
        results[0]
    );
    assert_eq!(reqs[1].last_user_text().as_deref(), Some("read it"));
}

#[tokio::test]
async fn markers_route_concurrent_sessions() {
    let mock = MockApi::start().await;
    // A global script entry that marked requests must not consume.
    mock.push_behavior(Behavior::reply("global"));
    mock.push_behavior_for("a", Behavior::reply("reply for a"));
    mock.set_default_for("b", Behavior::reply("default for b"));
    let (ha, hb) = (home(), home());
    let (la, lb) = ([user_line("one [[mock:a]]")], [user_line("two [[mock:b]]")]);
    let (ra, rb) = tokio::join!(
        run_cli(&mock, ha.path(), &[], &la),
        run_cli(&mock, hb.path(), &[], &lb),
    );
    assert_eq!(
        result_line(&ra.1).unwrap()["result"],
        "reply for a",
        "{}",
        describe(&ra.1, &ra.2)
    );
    assert_eq!(
        result_line(&rb.1).unwrap()["result"],
        "default for b",
        "{}",
        describe(&rb.1, &rb.2)
    );
    let a = mock.wait_for_requests_for("a", 1, WAIT).await;
    assert_eq!(a[0].marker().as_deref(), Some("a"));
    assert_eq!(mock.requests_for("b").len(), 1);

    // The global script is still intact for unmarked requests.
    let h = home();
    let (_, lines, _) = run_cli_with_env(
        &mock,
        h.path(),
        &[],
        &[user_line("plain")],
        &[("CLAUDE_CODE_MAX_RETRIES", "0")],
    )
    .await;
    assert_eq!(result_line(&lines).unwrap()["result"], "global");
    // Queue for "a" is empty now: falls back to the global default.
    mock.set_default(Behavior::reply("new default"));
    let (_, lines, _) = run_cli(&mock, h.path(), &[], &[user_line("again [[mock:a]]")]).await;
    assert_eq!(result_line(&lines).unwrap()["result"], "new default");
}

/// A stream cut mid-answer: the CLI prints the cut deltas, then marks the
/// message's blocks abandoned (`abandoned_blocks` on a `message_stop`
/// stream event) and retries — without streaming when it may not retry
/// (`CLAUDE_CODE_MAX_RETRIES=0`), else with a streamed retry. The worker
/// relies on that marker (`text_reset`).
#[tokio::test]
async fn a_cut_stream_is_marked_abandoned_then_retried() {
    let mock = MockApi::start().await;
    let home = home();
    for (retries, retry_streams) in [("0", false), ("2", true)] {
        let before = mock.requests().len();
        mock.push_behavior(Behavior::cut("echo: hi there", 2));
        let (status, lines, stderr) = run_cli_with_env(
            &mock,
            home.path(),
            &[],
            &[user_line("hi there")],
            &[("CLAUDE_CODE_MAX_RETRIES", retries)],
        )
        .await;
        let ctx = describe(&lines, &stderr);
        assert!(status.success(), "{ctx}");
        let cut = lines
            .iter()
            .find(|l| l["abandoned_blocks"].is_object())
            .unwrap_or_else(|| panic!("no abandoned_blocks line\n{ctx}"));
        assert_eq!(cut["abandoned_blocks"]["from_block_index"], 0, "{ctx}");
        let cut_id = cut["abandoned_blocks"]["api_message_id"].as_str().unwrap();
        let deltas_of = |id: &str| -> String {
            lines
                .iter()
                .filter(|l| {
                    l["api_message_id"] == id && l["event"]["delta"]["type"] == "text_delta"
                })
                .filter_map(|l| l["event"]["delta"]["text"].as_str())
                .collect()
        };
        assert_eq!(deltas_of(cut_id), "echo: h", "the two cut deltas\n{ctx}");
        assert_eq!(result_line(&lines).unwrap()["result"], "echo: hi there");
        let reqs = &mock.requests()[before..];
        assert_eq!(reqs.len(), 2, "{ctx}");
        assert_eq!(reqs[1].is_streaming(), retry_streams, "{ctx}");
    }
}
