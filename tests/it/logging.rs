//! Text logs cannot be forged or coloured by what producers send: every
//! field value is escaped (docs/LOGGING.md).

use std::io::Write;
use std::sync::{Arc, Mutex};

use claude_worker::config::LogFormat;
use claude_worker::logging;
use serde_json::json;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::fleet::{spawn_worker_logging, wait_for_consumers};
use crate::harness::{Backend, TestEnv};

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Buffer {
    type Writer = Buffer;
    fn make_writer(&'a self) -> Buffer {
        self.clone()
    }
}

const FORGED: &str = "2026-01-01T00:00:00.000000Z  INFO claude_worker: forged line";

/// Raw control characters other than the newline that ends each line.
fn raw_controls(text: &str) -> Vec<char> {
    text.chars()
        .filter(|c| *c != '\n' && (c.is_control() || *c == '\u{2028}'))
        .collect()
}

#[test]
fn text_logs_escape_control_characters_in_fields_messages_and_spans() {
    let buf = Buffer::default();
    let sub = logging::subscriber(LogFormat::Text, EnvFilter::new("trace"), buf.clone(), false);
    let evil = format!("evil\n{FORGED}\r\u{1b}[31mred\u{2028}");
    tracing::subscriber::with_default(sub, || {
        let span = tracing::info_span!("session", session = %evil);
        let _in = span.enter();
        tracing::info!(session_key = %evil, other = ?evil, "accepted {}", evil);
        tracing::warn!(reason = evil.as_str(), "second");
    });
    let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    assert_eq!(out.lines().count(), 2, "one line per event:\n{out}");
    assert!(
        raw_controls(&out).is_empty(),
        "raw control characters in:\n{out:?}"
    );
    assert!(
        !out.lines().any(|l| l.starts_with(FORGED)),
        "a forged line:\n{out}"
    );
    assert!(
        out.contains("evil\\n2026-01-01"),
        "the value is kept, escaped:\n{out}"
    );
    assert!(out.contains("\\u{1b}[31mred"), "{out}");
}

#[test]
fn json_logs_stay_json() {
    let buf = Buffer::default();
    let sub = logging::subscriber(LogFormat::Json, EnvFilter::new("trace"), buf.clone(), false);
    tracing::subscriber::with_default(sub, || {
        tracing::info!(session_key = %format!("a\n{FORGED}"), "x");
    });
    let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    assert_eq!(out.lines().count(), 1, "{out}");
    let line: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(line["fields"]["session_key"], format!("a\n{FORGED}"));
}

/// End to end: a worker process at debug level, a job whose session key
/// carries a newline and an ANSI escape; the log has neither raw.
#[tokio::test]
async fn a_hostile_session_key_cannot_forge_a_worker_log_line() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let mut worker = spawn_worker_logging(&env, 1, &[], "claude_worker=debug");
    wait_for_consumers(&env, 1).await;
    let key = format!("log:evil\n{FORGED} \u{1b}[31m");
    let job = env.publish_job(&key, "hello", json!({})).await;
    let events = env.events_until_terminal(&job).await;
    assert_eq!(events.last().unwrap().body.type_name(), "completed");
    worker.stop().await;
    let log = std::fs::read_to_string(&worker.log).unwrap();
    assert!(
        log.contains("job accepted"),
        "the worker logged nothing useful:\n{log}"
    );
    assert!(
        !log.lines().any(|l| l.starts_with(FORGED)),
        "a forged line:\n{log}"
    );
    assert!(
        raw_controls(&log).is_empty(),
        "raw control characters:\n{log:?}"
    );
    // At debug the key is there, escaped; at info only its reference.
    assert!(log.contains("log:evil\\n2026-01-01"), "{log}");
    let session = logging::session_ref(&key);
    let at_info = |l: &&str| matches!(l.split_whitespace().nth(1), Some("INFO" | "WARN" | "ERROR"));
    assert!(
        log.lines().filter(at_info).any(|l| l.contains(&session)),
        "{log}"
    );
    assert!(
        !log.lines().filter(at_info).any(|l| l.contains("log:evil")),
        "the session key at info or above:\n{log}"
    );
    env.cleanup().await;
}
