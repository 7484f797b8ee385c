//! The JSON Schemas in docs/schema/: they are valid draft 2020-12 schemas,
//! every example in docs/protocol.md validates against the right one (and
//! decodes with the Rust types), and — through `assert_valid_reply`, which
//! the harness's reply consumer calls — every event and control result the
//! end-to-end tests receive validates too.

use std::path::Path;
use std::sync::OnceLock;

use claude_worker::protocol::{
    decode_control, decode_job, ControlResultV1, EventV1, SessionEventV1,
};
use jsonschema::Validator;
use serde_json::{json, Value};

fn load(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("docs/schema")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

fn compile(name: &str) -> Validator {
    let schema = load(name);
    jsonschema::draft202012::new(&schema).unwrap_or_else(|e| panic!("{name} does not compile: {e}"))
}

pub fn job() -> &'static Validator {
    static V: OnceLock<Validator> = OnceLock::new();
    V.get_or_init(|| compile("job.v1.json"))
}

pub fn event() -> &'static Validator {
    static V: OnceLock<Validator> = OnceLock::new();
    V.get_or_init(|| compile("event.v1.json"))
}

pub fn session_event() -> &'static Validator {
    static V: OnceLock<Validator> = OnceLock::new();
    V.get_or_init(|| compile("session_event.v1.json"))
}

pub fn control() -> &'static Validator {
    static V: OnceLock<Validator> = OnceLock::new();
    V.get_or_init(|| compile("control.v1.json"))
}

/// Panics with every violation if `instance` does not validate.
pub fn assert_valid(v: &Validator, what: &str, instance: &Value) {
    let errors: Vec<String> = v
        .iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{what} does not match its schema:\n  {}\n{instance:#}",
        errors.join("\n  ")
    );
}

/// A message from a reply queue: an event, or a control result.
pub fn assert_valid_reply(raw: &Value) {
    if raw["type"] == "control_result" {
        assert_valid(control(), "control_result", raw);
    } else if raw["type"]
        .as_str()
        .is_some_and(|t| t.starts_with("session."))
    {
        assert_valid(session_event(), "session event", raw);
        serde_json::from_value::<SessionEventV1>(raw.clone())
            .unwrap_or_else(|e| panic!("session event does not decode: {e}\n{raw}"));
    } else {
        assert_valid(event(), "event", raw);
    }
}

/// The ```json blocks of docs/protocol.md.
fn protocol_examples() -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/protocol.md");
    let doc = std::fs::read_to_string(path).unwrap();
    let mut out = Vec::new();
    let mut block: Option<String> = None;
    for line in doc.lines() {
        match (&mut block, line.trim_start()) {
            (None, l) if l.starts_with("```json") => block = Some(String::new()),
            (Some(b), "```") => {
                out.push(
                    serde_json::from_str(b)
                        .unwrap_or_else(|e| panic!("a json example is not JSON ({e}):\n{b}")),
                );
                block = None;
            }
            (Some(b), _) => {
                b.push_str(line);
                b.push('\n');
            }
            _ => {}
        }
    }
    out
}

#[test]
fn schemas_are_valid_draft_2020_12() {
    for name in [
        "job.v1.json",
        "event.v1.json",
        "control.v1.json",
        "session_event.v1.json",
    ] {
        let schema = load(name);
        assert_eq!(
            schema["$schema"], "https://json-schema.org/draft/2020-12/schema",
            "{name}"
        );
        jsonschema::meta::validate(&schema).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn every_protocol_example_validates_and_decodes() {
    let examples = protocol_examples();
    let (mut jobs, mut events, mut controls, mut results) = (0, 0, 0, 0);
    let mut session_events = 0;
    for ex in &examples {
        let bytes = serde_json::to_vec(ex).unwrap();
        let kind = ex["type"].as_str().unwrap_or_default();
        if ex.get("prompt").is_some() {
            assert_valid(job(), "job example", ex);
            decode_job(&bytes).unwrap_or_else(|e| panic!("job example does not decode: {e}\n{ex}"));
            jobs += 1;
        } else if kind == "control_result" {
            assert_valid(control(), "control_result example", ex);
            serde_json::from_value::<ControlResultV1>(ex.clone())
                .unwrap_or_else(|e| panic!("control_result example does not decode: {e}\n{ex}"));
            results += 1;
        } else if matches!(
            kind,
            "cancel"
                | "set_permission_mode"
                | "session_status"
                | "reset_session"
                | "permission_response"
        ) {
            assert_valid(control(), "control example", ex);
            decode_control(&bytes)
                .unwrap_or_else(|e| panic!("control example does not decode: {e}\n{ex}"));
            controls += 1;
        } else if kind.starts_with("session.") {
            assert_valid_reply(ex);
            session_events += 1;
        } else if ex.get("seq").is_some() {
            assert_valid(event(), "event example", ex);
            serde_json::from_value::<EventV1>(ex.clone())
                .unwrap_or_else(|e| panic!("event example does not decode: {e}\n{ex}"));
            events += 1;
        } else {
            panic!("cannot tell which schema this docs/protocol.md example is for:\n{ex:#}");
        }
    }
    assert!(jobs >= 2, "job examples: {jobs}");
    assert!(events >= 7, "event examples: {events}");
    assert!(controls >= 3, "control examples: {controls}");
    assert!(results >= 1, "control_result examples: {results}");
    assert!(
        session_events >= 3,
        "session event examples: {session_events}"
    );
}

#[test]
fn schemas_reject_what_the_decoder_rejects() {
    let base = json!({"v": 1, "session_key": "k", "prompt": "hi"});
    assert_valid(job(), "minimal job", &base);
    let bad_jobs = [
        json!({"v": 2, "session_key": "k", "prompt": "hi"}),
        json!({"v": 1, "session_key": "k"}),
        json!({"v": 1, "session_key": "k", "prompt": "hi", "surprise": 1}),
        json!({"v": 1, "session_key": "k", "prompt": "hi", "options": {"max_turn": 3}}),
        json!({"v": 1, "session_key": "k", "prompt": "hi", "options": {"on_busy": "later"}}),
        json!({"v": 1, "session_key": "k", "prompt": "hi", "options": {"permission_mode": "yolo"}}),
        json!({"v": 1, "session_key": "k", "prompt": "hi", "session": {"mode": "resume"}}),
        json!({"v": 1, "session_key": "k", "prompt": "hi",
               "session": {"mode": "new", "claude_session_id": "0b5a3c1e-7d2f-4e6a-8c1b-2f3e4d5a6b7c"}}),
        json!({"v": 1, "session_key": "k", "prompt": "hi", "job_id": "has space"}),
        json!({"v": 1, "session_key": "   ", "prompt": "hi"}),
    ];
    for bad in &bad_jobs {
        assert!(!job().is_valid(bad), "job schema accepts {bad}");
        assert!(
            decode_job(&serde_json::to_vec(bad).unwrap()).is_err(),
            "decoder accepts {bad}"
        );
    }
    let ok_event = json!({"v": 1, "job_id": "j", "session_key": "k", "seq": 0, "attempt": 1,
                          "type": "failed", "error": "busy", "message": "m", "retryable": false,
                          "metadata": {}});
    assert_valid(event(), "busy failure", &ok_event);
    for bad in [
        json!({"v": 1, "job_id": "j", "session_key": "k", "seq": 0, "attempt": 1,
               "type": "failed", "error": "oops", "message": "m", "retryable": false, "metadata": {}}),
        json!({"v": 1, "job_id": "j", "session_key": "k", "seq": 0, "attempt": 1,
               "type": "text", "metadata": {}}),
        json!({"v": 1, "job_id": "j", "session_key": "k", "seq": -1, "attempt": 1,
               "type": "text", "text": "x", "metadata": {}}),
        json!({"v": 1, "job_id": "j", "session_key": "k", "seq": 0, "attempt": 1,
               "type": "mystery", "metadata": {}}),
    ] {
        assert!(!event().is_valid(&bad), "event schema accepts {bad}");
    }
    for bad in [
        json!({"v": 1, "type": "cancel"}),
        json!({"v": 1, "type": "set_permission_mode", "session_key": "k", "mode": "yolo"}),
        json!({"v": 1, "type": "pause", "session_key": "k"}),
        json!({"v": 1, "type": "control_result", "request_id": "r", "ok": true,
               "outcome": "done", "message": ""}),
    ] {
        assert!(!control().is_valid(&bad), "control schema accepts {bad}");
    }
    // permission_response: the decoder and the schema refuse the same.
    for bad in [
        json!({"v": 1, "type": "permission_response", "job_id": "j", "request_id": "r"}),
        json!({"v": 1, "type": "permission_response", "job_id": "j", "request_id": "r",
               "behavior": "maybe"}),
        json!({"v": 1, "type": "permission_response", "job_id": "has space", "request_id": "r",
               "behavior": "allow"}),
        json!({"v": 1, "type": "permission_response", "job_id": "j", "request_id": "",
               "behavior": "allow"}),
        json!({"v": 1, "type": "permission_response", "job_id": "j", "request_id": "r",
               "behavior": "allow", "updated_input": "rm -rf /"}),
    ] {
        assert!(!control().is_valid(&bad), "control schema accepts {bad}");
        assert!(
            decode_control(&serde_json::to_vec(&bad).unwrap()).is_err(),
            "decoder accepts {bad}"
        );
    }
}
