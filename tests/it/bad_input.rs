//! The bad-input corpus: job bodies a hostile or buggy producer might
//! publish. Each must be refused with a reason that says what to fix — by
//! the decoder (and then, where JSON Schema can express the rule, by
//! docs/schema/job.v1.json too, so the two never disagree) or by the
//! profile rules at acceptance — and none may crash a worker or lose the
//! next job. A proptest property checks decoder ⇄ schema agreement on
//! generated bodies, and that the decoder never panics.

use proptest::prelude::*;
use serde_json::{json, Value};

use crate::harness::{Backend, TestEnv};
use crate::pipeline::{completed, run};
use crate::schema::job;
use claude_worker::protocol::{
    decode_job, ErrorKind, EventBody, MAX_JSON_DEPTH, MAX_METADATA_BYTES,
};

/// Where a case is refused.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Stage {
    /// By `decode_job`; `schema` says whether the JSON Schema rejects it too
    /// (false: not JSON, or a rule the schema cannot express — bytes vs
    /// characters, duplicate keys, depth, metadata size).
    Decode { schema: bool },
    /// Valid wire shape, refused by the worker's profile rules.
    Profile,
}

struct Case {
    what: &'static str,
    body: Vec<u8>,
    stage: Stage,
    /// A part of the reason the producer gets.
    reason: &'static str,
}

fn base() -> Value {
    json!({"v": 1, "session_key": "bad:input", "prompt": "hi"})
}

/// `base()` with `patch` merged in; a `null` in the patch removes a key.
fn with(patch: Value) -> Vec<u8> {
    let mut b = base();
    for (k, v) in patch.as_object().unwrap() {
        if v.is_null() {
            b.as_object_mut().unwrap().remove(k);
        } else {
            b[k] = v.clone();
        }
    }
    b.to_string().into_bytes()
}

fn nested(depth: usize) -> Value {
    (0..depth).fold(json!(1), |inner, _| json!({ "a": inner }))
}

fn corpus() -> Vec<Case> {
    use Stage::*;
    let d = |schema| Decode { schema };
    let c = |what, body, stage, reason| Case {
        what,
        body,
        stage,
        reason,
    };
    let raw = |s: &str| s.as_bytes().to_vec();
    let uuid = "0b5a3c1e-7d2f-4e6a-8c1b-2f3e4d5a6b7c";
    vec![
        // The envelope.
        c(
            "invalid UTF-8",
            b"\xff\xfe\x00 not utf-8".to_vec(),
            d(false),
            "not valid UTF-8",
        ),
        c(
            "not JSON",
            raw("{\"v\":1, this is not json"),
            d(false),
            "not valid JSON",
        ),
        c(
            "truncated JSON",
            raw(r#"{"v": 1, "session_key": "k", "prompt": "#),
            d(false),
            "not valid JSON",
        ),
        c(
            "trailing garbage",
            raw(r#"{"v": 1, "session_key": "k", "prompt": "p"} x"#),
            d(false),
            "not valid JSON",
        ),
        c("empty body", Vec::new(), d(false), "not valid JSON"),
        c("an array", raw("[1, 2]"), d(true), "must be a JSON object"),
        c(
            "a string",
            raw(r#""hello""#),
            d(true),
            "must be a JSON object",
        ),
        c("null", raw("null"), d(true), "must be a JSON object"),
        c(
            "a lone surrogate",
            raw(r#"{"v": 1, "session_key": "k", "prompt": "\ud800"}"#),
            d(false),
            "not valid JSON",
        ),
        c(
            "a duplicate key",
            raw(r#"{"v": 1, "session_key": "k", "prompt": "a", "prompt": "b"}"#),
            d(false),
            "duplicate key `prompt`",
        ),
        c(
            "a nested duplicate key",
            raw(
                r#"{"v": 1, "session_key": "k", "prompt": "a", "options": {"max_turns": 1, "max_turns": 2}}"#,
            ),
            d(false),
            "duplicate key `max_turns`",
        ),
        c(
            "nesting too deep",
            with(json!({"metadata": nested(MAX_JSON_DEPTH + 5)})),
            d(false),
            "nested deeper than",
        ),
        c(
            "metadata too large",
            with(json!({"metadata": {"blob": "x".repeat(MAX_METADATA_BYTES)}})),
            d(false),
            "the limit is 16384",
        ),
        // The version.
        c(
            "no v",
            with(json!({"v": null})),
            d(true),
            "missing field `v`",
        ),
        c(
            "v 2",
            with(json!({"v": 2})),
            d(true),
            "unsupported protocol version",
        ),
        c(
            "v as a string",
            with(json!({"v": "1"})),
            d(true),
            "unsupported protocol version",
        ),
        c(
            "v 0",
            with(json!({"v": 0})),
            d(true),
            "unsupported protocol version",
        ),
        c(
            "v 1.5",
            with(json!({"v": 1.5})),
            d(true),
            "unsupported protocol version",
        ),
        // Required fields.
        c(
            "no session_key",
            with(json!({"session_key": null})),
            d(true),
            "missing field `session_key`",
        ),
        c(
            "no prompt",
            with(json!({"prompt": null})),
            d(true),
            "missing field `prompt`",
        ),
        c(
            "empty session_key",
            with(json!({"session_key": ""})),
            d(true),
            "`session_key` must not be empty",
        ),
        c(
            "blank session_key",
            with(json!({"session_key": "  \t "})),
            d(true),
            "`session_key` must not be empty",
        ),
        c(
            "session_key of 256 chars",
            with(json!({"session_key": "k".repeat(256)})),
            d(true),
            "longer than 255 bytes",
        ),
        c(
            "session_key of 200 chars, 400 bytes",
            with(json!({"session_key": "é".repeat(200)})),
            d(false),
            "longer than 255 bytes",
        ),
        c(
            "session_key a number",
            with(json!({"session_key": 7})),
            d(true),
            "invalid type",
        ),
        c(
            "blank prompt",
            with(json!({"prompt": "\n\n"})),
            d(true),
            "`prompt` must not be empty",
        ),
        c(
            "prompt over the limit",
            with(json!({"prompt": "p".repeat(1_000_001)})),
            d(true),
            "the limit is 1000000",
        ),
        c(
            "prompt an object",
            with(json!({"prompt": {"text": "hi"}})),
            d(true),
            "invalid type",
        ),
        // Unknown fields, at every level.
        c(
            "an unknown field",
            with(json!({"surprise": 1})),
            d(true),
            "unknown field `surprise`",
        ),
        c(
            "a typo in options",
            with(json!({"options": {"max_turn": 3}})),
            d(true),
            "unknown field `max_turn`",
        ),
        c(
            "a typo in session",
            with(json!({"session": {"mod": "new"}})),
            d(true),
            "unknown field `mod`",
        ),
        // Ids and keys.
        c(
            "job_id with a space",
            with(json!({"job_id": "has space"})),
            d(true),
            "`job_id`",
        ),
        c(
            "job_id of 129 chars",
            with(json!({"job_id": "j".repeat(129)})),
            d(true),
            "`job_id`",
        ),
        c(
            "empty job_id",
            with(json!({"job_id": ""})),
            d(true),
            "`job_id`",
        ),
        c(
            "job_id a number",
            with(json!({"job_id": 42})),
            d(true),
            "invalid type",
        ),
        c(
            "empty reply_to",
            with(json!({"reply_to": ""})),
            d(true),
            "`reply_to` must be 1-255 bytes",
        ),
        c(
            "reply_to of 256 chars",
            with(json!({"reply_to": "r".repeat(256)})),
            d(true),
            "`reply_to` must be 1-255 bytes",
        ),
        c(
            "metadata an array",
            with(json!({"metadata": [1, 2]})),
            d(true),
            "`metadata` must be a JSON object",
        ),
        c(
            "metadata a string",
            with(json!({"metadata": "m"})),
            d(true),
            "`metadata` must be a JSON object",
        ),
        // Sessions.
        c(
            "resume without an id",
            with(json!({"session": {"mode": "resume"}})),
            d(true),
            "needs `session.claude_session_id`",
        ),
        c(
            "new with an id",
            with(json!({"session": {"mode": "new", "claude_session_id": uuid}})),
            d(true),
            "does not take",
        ),
        c(
            "an unknown mode",
            with(json!({"session": {"mode": "restart"}})),
            d(true),
            "unknown variant `restart`",
        ),
        c(
            "a session id that is no UUID",
            with(json!({"session": {"mode": "resume", "claude_session_id": "--help"}})),
            d(true),
            "is not a UUID",
        ),
        c(
            "session a string",
            with(json!({"session": "new"})),
            d(true),
            "`session` must be a JSON object",
        ),
        // Options.
        c(
            "max_turns -1",
            with(json!({"options": {"max_turns": -1}})),
            d(true),
            "invalid value",
        ),
        c(
            "max_turns 2.5",
            with(json!({"options": {"max_turns": 2.5}})),
            d(true),
            "invalid type",
        ),
        c(
            "max_turns a string",
            with(json!({"options": {"max_turns": "3"}})),
            d(true),
            "invalid type",
        ),
        c(
            "an unknown permission mode",
            with(json!({"options": {"permission_mode": "yolo"}})),
            d(true),
            "unknown variant `yolo`",
        ),
        c(
            "an unknown on_busy",
            with(json!({"options": {"on_busy": "later"}})),
            d(true),
            "unknown variant `later`",
        ),
        c(
            "options a list",
            with(json!({"options": ["model"]})),
            d(true),
            "`options` must be a JSON object",
        ),
        // Valid shape, refused by the profile.
        c(
            "an unknown profile",
            with(json!({"profile": "nope"})),
            Profile,
            "unknown profile `nope`",
        ),
        c(
            "max_turns over the cap",
            with(json!({"profile": "discord", "options": {"max_turns": 101}})),
            Profile,
            "cap of 100",
        ),
        c(
            "max_turns 0",
            with(json!({"options": {"max_turns": 0}})),
            d(true),
            "max_turns",
        ),
        c(
            "a mode above the ceiling",
            with(json!({"options": {"permission_mode": "bypassPermissions"}})),
            Profile,
            "ceiling",
        ),
        c(
            "a model that looks like a flag",
            with(json!({"options": {"model": "--dangerously-skip-permissions"}})),
            d(true),
            "model",
        ),
        c(
            "an empty model",
            with(json!({"options": {"model": ""}})),
            d(true),
            "model",
        ),
        // Attachments.
        c(
            "attachments not an array",
            with(json!({"attachments": {"type": "image"}})),
            d(true),
            "invalid job",
        ),
        c(
            "an attachment as an array",
            with(json!({"attachments": [["image", "image/png", "AAAA"]]})),
            d(true),
            "attachments",
        ),
        c(
            "five attachments",
            with(
                json!({"attachments": vec![json!({"type": "image", "media_type": "image/png", "data": "AAAA"}); 5]}),
            ),
            d(true),
            "limit is 4",
        ),
        c(
            "an attachment of an unknown type",
            with(
                json!({"attachments": [{"type": "pdf", "media_type": "image/png", "data": "AAAA"}]}),
            ),
            d(true),
            "unknown variant",
        ),
        c(
            "an image of an unsupported media type",
            with(
                json!({"attachments": [{"type": "image", "media_type": "image/tiff", "data": "AAAA"}]}),
            ),
            d(true),
            "image/tiff",
        ),
        c(
            "image data that is not base64",
            with(
                json!({"attachments": [{"type": "image", "media_type": "image/png", "data": "not base64!"}]}),
            ),
            d(true),
            "not standard base64",
        ),
        c(
            "image data without padding",
            with(
                json!({"attachments": [{"type": "image", "media_type": "image/png", "data": "AAA"}]}),
            ),
            d(true),
            "not standard base64",
        ),
        c(
            "empty image data",
            with(
                json!({"attachments": [{"type": "image", "media_type": "image/png", "data": ""}]}),
            ),
            d(true),
            "attachments[0].data",
        ),
        c(
            "image data over the limit",
            with(
                json!({"attachments": [{"type": "image", "media_type": "image/png", "data": "A".repeat(2_000_004)}]}),
            ),
            d(true),
            "2000000",
        ),
        c(
            "an unknown field in an attachment",
            with(
                json!({"attachments": [{"type": "image", "media_type": "image/png", "data": "AAAA", "url": "x"}]}),
            ),
            d(true),
            "unknown field",
        ),
        // Budgets.
        c(
            "max_budget_usd 0",
            with(json!({"options": {"max_budget_usd": 0}})),
            d(true),
            "max_budget_usd",
        ),
        c(
            "max_budget_usd -1",
            with(json!({"options": {"max_budget_usd": -1.5}})),
            d(true),
            "max_budget_usd",
        ),
        c(
            "max_budget_usd a string",
            with(json!({"options": {"max_budget_usd": "1"}})),
            d(true),
            "invalid type",
        ),
        c(
            "an empty identity",
            with(json!({"identity": ""})),
            d(true),
            "identity",
        ),
        c(
            "a blank identity",
            with(json!({"identity": " \t "})),
            d(true),
            "identity",
        ),
        c(
            "identity of 256 chars",
            with(json!({"identity": "i".repeat(256)})),
            d(true),
            "identity",
        ),
        c(
            "identity a number",
            with(json!({"identity": 7})),
            d(true),
            "invalid type",
        ),
    ]
}

/// Bodies both the decoder and the schema accept.
fn good_bodies() -> Vec<Value> {
    vec![
        base(),
        json!({"v": 1.0, "session_key": "k", "prompt": "v 1.0 is the number 1"}),
        json!({"v": 1, "session_key": "k", "prompt": "p", "options": {"max_turns": 3.0}}),
        json!({"v": 1, "session_key": "ключ", "prompt": "日本語のプロンプト", "metadata": null}),
        json!({"v": 1, "session_key": "k", "prompt": "p", "metadata": {"deep": nested(MAX_JSON_DEPTH - 3)}}),
        json!({"v": 1, "session_key": "k", "prompt": "p",
               "metadata": {"blob": "x".repeat(MAX_METADATA_BYTES - 20)}}),
        json!({"v": 1, "job_id": "a.b:c-d_e", "session_key": "k", "prompt": "p", "reply_to": "r",
               "profile": "default", "session": {"mode": "fork"},
               "options": {"model": "sonnet", "max_turns": 1, "permission_mode": "plan", "on_busy": "reject"}}),
        json!({"v": 1, "session_key": "k", "prompt": "p", "attachments": null}),
        json!({"v": 1, "session_key": "k", "prompt": "p", "attachments": [
            {"type": "image", "media_type": "image/png", "data": "iVBORw0KGgo="},
            {"type": "image", "media_type": "image/jpeg", "data": "/9j/4AAQ"},
            {"type": "image", "media_type": "image/gif", "data": "R0lGODlhAQ=="},
            {"type": "image", "media_type": "image/webp", "data": "UklGRg=="}]}),
        json!({"v": 1, "session_key": "k", "prompt": "p", "identity": "discord:user:1",
               "options": {"max_budget_usd": 0.25}}),
        json!({"v": 1, "session_key": "k", "prompt": "p", "identity": null,
               "options": {"max_budget_usd": null}}),
    ]
}

#[test]
fn the_corpus_is_large_enough() {
    let n = corpus().len();
    assert!(n >= 40, "only {n} bad-input cases");
}

#[test]
fn decoder_and_schema_agree_on_the_corpus() {
    let schema = job();
    for case in corpus() {
        let decoded = decode_job(&case.body);
        match case.stage {
            Stage::Decode { schema: checks } => {
                let err = decoded.expect_err(case.what).0;
                assert!(
                    err.contains(case.reason),
                    "{}: {err:?} should mention {:?}",
                    case.what,
                    case.reason
                );
                if checks {
                    let value: Value = serde_json::from_slice(&case.body).unwrap();
                    assert!(
                        !schema.is_valid(&value),
                        "{}: the schema accepts it",
                        case.what
                    );
                }
            }
            Stage::Profile => {
                decoded.unwrap_or_else(|e| panic!("{}: the decoder refuses it: {e}", case.what));
            }
        }
    }
    for good in good_bodies() {
        let bytes = serde_json::to_vec(&good).unwrap();
        decode_job(&bytes).unwrap_or_else(|e| panic!("decoder refuses {good}: {e}"));
        assert!(schema.is_valid(&good), "schema refuses {good}");
    }
}

/// Every case through a real worker: dead-lettered with its reason, a
/// `failed`/`invalid_input` event, and the next good job is served.
#[tokio::test]
async fn every_bad_input_is_dead_lettered_and_the_worker_goes_on() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let worker = env.start_worker().await;
    let cases = corpus();
    let mut ids = Vec::new();
    for case in &cases {
        let id = uuid::Uuid::new_v4().to_string();
        env.publish_raw(&case.body, Some(&id)).await;
        ids.push(id);
    }
    let mut dead = Vec::new();
    for _ in &cases {
        dead.push(env.next_dead_letter().await);
    }
    for (case, id) in cases.iter().zip(&ids) {
        let (_, headers) = dead
            .iter()
            .find(|(body, _)| body == &case.body)
            .unwrap_or_else(|| panic!("{}: no dead letter", case.what));
        let reason = &headers["x-claude-worker-error"];
        assert!(
            reason.contains(case.reason),
            "{}: {reason:?} should mention {:?}",
            case.what,
            case.reason
        );
        let (raw, event) = env.next_event(id).await;
        match &event.body {
            EventBody::Failed {
                error,
                message,
                retryable,
            } => {
                assert_eq!(
                    (*error, *retryable),
                    (ErrorKind::InvalidInput, false),
                    "{}",
                    case.what
                );
                assert_eq!(message, reason, "{}", case.what);
            }
            other => panic!("{}: expected failed, got {other:?}", case.what),
        }
        assert_eq!((event.seq, raw["type"].as_str()), (0, Some("failed")));
    }
    assert_eq!(dead.len(), cases.len());
    let ev = run(&mut env, "bad:after", "still alive?", json!({})).await;
    assert_eq!(completed(&ev).0, "echo: still alive?");
    worker.shutdown();
    worker.wait().await.unwrap();
    env.cleanup().await;
}

/// Values for one field: valid ones and the ways producers get them wrong.
fn field_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!(1)),
        Just(json!(1.0)),
        Just(json!(2)),
        Just(json!(0)),
        Just(json!(-1)),
        Just(json!(2.5)),
        Just(json!("")),
        Just(json!("   ")),
        Just(json!(null)),
        Just(json!(true)),
        Just(json!([])),
        Just(json!({})),
        Just(json!("0b5a3c1e-7d2f-4e6a-8c1b-2f3e4d5a6b7c")),
        Just(json!("resume")),
        Just(json!("new")),
        Just(json!("plan")),
        Just(json!("enqueue")),
        Just(json!(0.25)),
        Just(json!(-0.5)),
        "[a-z:._-]{1,12}".prop_map(Value::from),
        "[ -~]{0,20}".prop_map(Value::from),
        (0u64..300).prop_map(Value::from),
    ]
}

fn nested_field() -> impl Strategy<Value = Value> {
    let keys = prop::sample::select(vec![
        "mode",
        "claude_session_id",
        "model",
        "max_turns",
        "permission_mode",
        "on_busy",
        "max_budget_usd",
        "x",
    ]);
    prop_oneof![
        3 => prop::collection::btree_map(keys, field_value(), 0..4)
            .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
        1 => field_value(),
    ]
}

/// Generated job bodies, ASCII only (so bytes and characters agree and the
/// schema's length rules are the decoder's).
fn job_body() -> impl Strategy<Value = Value> {
    let keys = prop::sample::select(vec![
        "v",
        "job_id",
        "session_key",
        "prompt",
        "profile",
        "metadata",
        "reply_to",
        "identity",
        "session",
        "options",
        "extra",
    ]);
    prop::collection::btree_map(keys, nested_field(), 0..10).prop_map(|m| {
        let mut obj: serde_json::Map<String, Value> =
            m.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        // Mostly well-formed, so the deeper rules get exercised too.
        obj.entry("v").or_insert(json!(1));
        obj.entry("session_key").or_insert(json!("k"));
        obj.entry("prompt").or_insert(json!("p"));
        Value::Object(obj)
    })
}

proptest! {
    // 4,000 cases per property in CI; `PROPTEST_CASES=1000000` for a long run.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(4000),
        ..ProptestConfig::default()
    })]

    /// The decoder and the schema accept exactly the same generated bodies.
    #[test]
    fn decoder_and_schema_agree_on_generated_jobs(body in job_body()) {
        let decoded = decode_job(&serde_json::to_vec(&body).unwrap());
        let valid = job().is_valid(&body);
        prop_assert_eq!(decoded.is_ok(), valid, "decoder: {:?}, schema valid: {}, body: {}", decoded.err(), valid, body);
    }

    /// Arbitrary bytes never panic the decoder.
    #[test]
    fn the_decoder_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_job(&bytes);
    }

    /// Nor do arbitrary strings that look a bit like JSON.
    #[test]
    fn the_decoder_never_panics_on_jsonish_text(text in r#"[{}\[\]":,0-9a-z\\ .-]{0,200}"#) {
        let _ = decode_job(text.as_bytes());
    }
}

/// A job id gets one terminal event: an invalid body published under the
/// id of a job that already ran is dead-lettered and answered with nothing
/// under that id; a valid re-publish still gets the stored terminal event.
#[tokio::test]
async fn an_invalid_body_under_a_taken_job_id_gets_no_second_terminal_event() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let worker = env.start_worker().await;
    let job = env.publish_job("taken:id", "first", json!({})).await;
    let events = env.events_until_terminal(&job).await;
    let done = events.last().unwrap().clone();
    assert_eq!(done.body.type_name(), "completed");

    let bad =
        json!({"v": 1, "job_id": job, "session_key": "taken:id", "prompt": "again", "surprise": 1});
    env.publish_raw(bad.to_string().as_bytes(), None).await;
    let (_, headers) = env.next_dead_letter().await;
    assert!(headers["x-claude-worker-error"].contains("unknown field `surprise`"));
    // Something that must not happen: a bounded wait, not a synchronisation.
    let late = env
        .maybe_event(&job, std::time::Duration::from_secs(2))
        .await;
    assert!(late.is_none(), "a second terminal event: {late:?}");

    let again = json!({"v": 1, "job_id": job, "session_key": "taken:id", "prompt": "again"});
    env.publish_raw(again.to_string().as_bytes(), None).await;
    let (_, republished) = env.next_event(&job).await;
    assert_eq!(republished, done, "the stored terminal event, unchanged");
    worker.shutdown();
    worker.wait().await.unwrap();
    env.cleanup().await;
}
