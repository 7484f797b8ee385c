//! A scriptable mock of the Anthropic Messages API, served on loopback, for
//! driving the real Claude Code CLI in integration tests.
//!
//! * `POST /v1/messages` (any query string, e.g. `?beta=true`) answers with
//!   the next scripted [`Behavior`]: per-marker queue first (see
//!   [`MockApi::push_behavior_for`]), otherwise the global FIFO script, and
//!   when that is empty the default behaviour ([`Behavior::Echo`] unless
//!   changed with [`MockApi::set_default`]).
//!   A request with `"stream": false` (the CLI's fallback after a stream
//!   broke) gets the same behaviour as one JSON message instead of SSE.
//! * `POST /v1/messages/count_tokens` answers `{"input_tokens": N}`.
//! * Anything else answers 404 with an Anthropic-style JSON error body.
//!
//! * A compaction request (the CLI asks for a summary of the conversation:
//!   `/compact`, or its own autocompact) never consumes the script or a
//!   marker's queue: it gets the next [`MockApi::push_compaction_behavior`],
//!   else a summary in the `<summary>` tags the CLI wants
//!   ([`MOCK_SUMMARY`]; without the tags 2.1.330 asks once more).
//!
//! Every request is recorded ([`MockApi::all_requests`]); the
//! `POST /v1/messages` ones are also in [`MockApi::requests`].
//!
//! Every accepted socket gets `TCP_NODELAY`, so streamed deltas are not held
//! back by Nagle's algorithm.
// Fixture API shared by many test modules; not every item is used by each.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use axum::serve::ListenerExt;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

/// What the mock does with one `POST /v1/messages` request.
#[derive(Debug, Clone, PartialEq)]
pub enum Behavior {
    /// Stream `text` split into `chunks` `text_delta` events (at least one
    /// event unless `text` is empty), then `stop_reason: "end_turn"`.
    Reply { text: String, chunks: usize },
    /// The default: reply `echo: <last user text>` in 4 chunks.
    Echo,
    /// Answer with a non-2xx `code` and the body
    /// `{"type":"error","error":{"type":error_type,"message":message}}`.
    Status {
        code: u16,
        error_type: String,
        message: String,
    },
    /// Send `message_start`, `content_block_start` and a first `text_delta`
    /// holding the first half of `text` (see [`Behavior::hold_first_delta`]),
    /// then wait for [`MockApi::release_held`], then stream the rest of
    /// `text` and end the turn. The assistant's whole reply is exactly `text`.
    Hold { text: String },
    /// Send the response head and `message_start`, then drop the connection
    /// mid-body. Note: the CLI (2.1.330) answers a broken stream with one
    /// immediate non-streaming retry (`"stream": false`), even with
    /// `CLAUDE_CODE_MAX_RETRIES=0`; that retry consumes the next behaviour.
    /// (For a non-streaming request, Disconnect sends the head and aborts.)
    Disconnect,
    /// Stream the first `after` of `text`'s 4 chunks as `text_delta`s, then
    /// drop the connection mid-body: a stream cut part-way through the
    /// answer. (A non-streaming request is dropped after the head.)
    Cut { text: String, after: usize },
    /// Answer with a single `tool_use` block (`stop_reason: "tool_use"`).
    /// The CLI runs the tool and sends a follow-up request, answered like
    /// any other request (script, then default).
    ToolUse { name: String, input: Value },
}

/// What the default answer to a compaction request summarises the
/// conversation as; the session continues from it.
pub const MOCK_SUMMARY: &str = "MOCK SUMMARY of the conversation so far";

/// Part of the prompt of the CLI's (2.1.330) summary request.
const COMPACTION_PROMPT: &str = "create a detailed summary of the conversation so far";

impl Behavior {
    /// A summary as the CLI wants it: an `<analysis>` block, then the
    /// summary in `<summary>` tags.
    pub fn summary(text: &str) -> Behavior {
        Behavior::Reply {
            text: format!("<analysis>mock</analysis>\n<summary>{text}</summary>"),
            chunks: 1,
        }
    }

    pub fn reply(text: impl Into<String>) -> Behavior {
        Behavior::Reply {
            text: text.into(),
            chunks: 4,
        }
    }

    pub fn status(code: u16, error_type: &str, message: &str) -> Behavior {
        Behavior::Status {
            code,
            error_type: error_type.to_string(),
            message: message.to_string(),
        }
    }

    pub fn hold(text: impl Into<String>) -> Behavior {
        Behavior::Hold { text: text.into() }
    }

    pub fn cut(text: impl Into<String>, after: usize) -> Behavior {
        Behavior::Cut {
            text: text.into(),
            after,
        }
    }

    pub fn tool_use(name: &str, input: Value) -> Behavior {
        Behavior::ToolUse {
            name: name.to_string(),
            input,
        }
    }

    /// The text of the first delta a [`Behavior::Hold`] with `text` sends
    /// before it is released: the first half of its chars, rounded up.
    pub fn hold_first_delta(text: &str) -> String {
        let n = text.chars().count();
        text.chars().take(n.div_ceil(2)).collect()
    }
}

/// The token usage the mock reports for every `POST /v1/messages` answer
/// (see [`MockApi::set_usage`]). Without one it reports 10 input tokens
/// and one output token per streamed delta.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_input_tokens: u64,
    pub cache_read_input_tokens: u64,
}

impl Usage {
    /// What one answer with this usage costs at a model's list prices, in
    /// USD per million tokens: (input, output, cache write (5 min), cache read).
    pub fn cost_usd(&self, prices: (f64, f64, f64, f64)) -> f64 {
        (self.input_tokens as f64 * prices.0
            + self.output_tokens as f64 * prices.1
            + self.cache_creation_input_tokens as f64 * prices.2
            + self.cache_read_input_tokens as f64 * prices.3)
            / 1e6
    }

    fn json(&self, output_tokens: u64) -> Value {
        json!({"input_tokens": self.input_tokens, "output_tokens": output_tokens,
               "cache_creation_input_tokens": self.cache_creation_input_tokens,
               "cache_read_input_tokens": self.cache_read_input_tokens})
    }
}

/// One request the mock received.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    /// The path without the query string, e.g. `/v1/messages`.
    pub path: String,
    /// The query string, if any, e.g. `beta=true`.
    pub query: Option<String>,
    /// The JSON body (`Value::Null` when empty or not JSON).
    pub body: Value,
    /// Header names are lower case, in arrival order.
    pub headers: Vec<(String, String)>,
    pub started: Instant,
    /// When the response body ended (completed, aborted, or the client went
    /// away). `None` while the response is still streaming.
    pub finished: Option<Instant>,
}

impl RecordedRequest {
    fn messages(&self) -> impl Iterator<Item = &Value> {
        self.body
            .get("messages")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
    }

    fn texts_of_role(&self, role: &str) -> Vec<String> {
        let mut out = Vec::new();
        for m in self.messages() {
            if m.get("role").and_then(Value::as_str) != Some(role) {
                continue;
            }
            match m.get("content") {
                Some(Value::String(s)) => out.push(s.clone()),
                Some(Value::Array(blocks)) => {
                    for b in blocks {
                        if b.get("type").and_then(Value::as_str) == Some("text") {
                            if let Some(t) = b.get("text").and_then(Value::as_str) {
                                out.push(t.to_string());
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        out
    }

    /// Whether the request asked for an SSE stream (`"stream": true`).
    pub fn is_streaming(&self) -> bool {
        self.body.get("stream").and_then(Value::as_bool) == Some(true)
    }

    /// Text blocks of all `user` messages, in order, excluding those that
    /// start with `<system-reminder>`.
    pub fn user_texts(&self) -> Vec<String> {
        self.texts_of_role("user")
            .into_iter()
            .filter(|t| !t.starts_with("<system-reminder>"))
            .collect()
    }

    /// Text blocks of all `assistant` messages, in order.
    pub fn assistant_texts(&self) -> Vec<String> {
        self.texts_of_role("assistant")
    }

    pub fn last_user_text(&self) -> Option<String> {
        self.user_texts().pop()
    }

    /// All blocks of type `tool_result` in user messages, in order.
    pub fn tool_results(&self) -> Vec<Value> {
        self.messages()
            .filter(|m| m.get("role").and_then(Value::as_str) == Some("user"))
            .filter_map(|m| m.get("content").and_then(Value::as_array))
            .flatten()
            .filter(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"))
            .cloned()
            .collect()
    }

    /// Whether this is the CLI asking for a summary (compaction).
    pub fn is_compaction(&self) -> bool {
        self.last_user_text()
            .is_some_and(|t| t.contains(COMPACTION_PROMPT))
    }

    /// Whether any user text of the request contains `needle`.
    pub fn carries(&self, needle: &str) -> bool {
        self.user_texts().iter().any(|t| t.contains(needle))
    }

    /// `KEY` when the last user text contains `[[mock:KEY]]`.
    pub fn marker(&self) -> Option<String> {
        marker_in(&self.last_user_text()?)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn marker_in(text: &str) -> Option<String> {
    let start = text.find("[[mock:")? + "[[mock:".len();
    let len = text[start..].find("]]")?;
    Some(text[start..start + len].to_string())
}

#[derive(Default)]
struct Keyed {
    queue: VecDeque<Behavior>,
    default: Option<Behavior>,
}

struct Inner {
    /// Every request, in arrival order.
    all: Vec<RecordedRequest>,
    /// Indexes into `all` of the `POST /v1/messages` requests.
    messages: Vec<usize>,
    script: VecDeque<Behavior>,
    /// For compaction requests, before the default summary.
    compaction: VecDeque<Behavior>,
    keyed: HashMap<String, Keyed>,
    default: Behavior,
    /// How many Hold responses have sent their first delta (cumulative).
    held: usize,
    next_id: u64,
    usage: Option<Usage>,
}

struct Shared {
    inner: Mutex<Inner>,
    /// Bumped on every state change that waiters may care about.
    changed: watch::Sender<u64>,
    /// Bumped by `release_held`.
    release: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    fn mark_finished(&self, idx: usize) {
        {
            let mut inner = self.lock();
            let r = &mut inner.all[idx];
            if r.finished.is_none() {
                r.finished = Some(Instant::now());
            }
        }
        self.bump();
    }
}

pub struct MockApi {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for MockApi {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl MockApi {
    /// Binds `127.0.0.1:0` and serves in a background task until dropped.
    pub async fn start() -> MockApi {
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                all: Vec::new(),
                messages: Vec::new(),
                script: VecDeque::new(),
                compaction: VecDeque::new(),
                keyed: HashMap::new(),
                default: Behavior::Echo,
                held: 0,
                next_id: 0,
                usage: None,
            }),
            changed: watch::channel(0).0,
            release: watch::channel(0).0,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind mock API listener");
        let addr = listener.local_addr().expect("mock API local addr");
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(shared.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        MockApi {
            shared,
            addr,
            server,
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every `POST /v1/messages` request, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        let inner = self.shared.lock();
        inner
            .messages
            .iter()
            .map(|&i| inner.all[i].clone())
            .collect()
    }

    /// Every request of any method and path, in arrival order.
    pub fn all_requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().all.clone()
    }

    /// The `POST /v1/messages` requests whose [`RecordedRequest::marker`] is `key`.
    pub fn requests_for(&self, key: &str) -> Vec<RecordedRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.marker().as_deref() == Some(key))
            .collect()
    }

    /// Appends to the global script, consumed FIFO by unmarked requests.
    pub fn push_behavior(&self, b: Behavior) {
        self.shared.lock().script.push_back(b);
    }

    /// Appends to the queue of marker `key`, consumed FIFO by requests whose
    /// last user text contains `[[mock:key]]`. Marked requests never consume
    /// the global script: with their queue empty they get the key's default
    /// ([`MockApi::set_default_for`]) or else the global default.
    pub fn push_behavior_for(&self, key: &str, b: Behavior) {
        self.shared
            .lock()
            .keyed
            .entry(key.to_string())
            .or_default()
            .queue
            .push_back(b);
    }

    /// The answer to the next compaction request (then the default summary).
    pub fn push_compaction_behavior(&self, b: Behavior) {
        self.shared.lock().compaction.push_back(b);
    }

    /// Forgets the compaction behaviours not used yet (later compaction
    /// requests get the default summary).
    pub fn clear_compaction_behaviors(&self) {
        self.shared.lock().compaction.clear();
    }

    /// The compaction requests so far.
    pub fn compaction_requests(&self) -> Vec<RecordedRequest> {
        self.requests()
            .into_iter()
            .filter(RecordedRequest::is_compaction)
            .collect()
    }

    /// The usage every later answer reports (message_start and message_delta).
    pub fn set_usage(&self, usage: Usage) {
        self.shared.lock().usage = Some(usage);
    }

    /// The behaviour used when the global script is empty.
    pub fn set_default(&self, b: Behavior) {
        self.shared.lock().default = b;
    }

    /// The behaviour for marker `key` when its queue is empty.
    pub fn set_default_for(&self, key: &str, b: Behavior) {
        self.shared
            .lock()
            .keyed
            .entry(key.to_string())
            .or_default()
            .default = Some(b);
    }

    /// Waits until at least `n` `POST /v1/messages` requests have arrived
    /// and returns them all. Panics after `timeout`.
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) -> Vec<RecordedRequest> {
        self.wait_until(timeout, |inner| inner.messages.len() >= n)
            .await
            .unwrap_or_else(|| {
                panic!(
                    "mock API: wanted {n} /v1/messages requests within {timeout:?}, got {}",
                    self.requests().len()
                )
            });
        self.requests()
    }

    /// Waits until at least `n` `POST /v1/messages` requests carrying marker
    /// `key` have arrived and returns them. Panics after `timeout`.
    pub async fn wait_for_requests_for(
        &self,
        key: &str,
        n: usize,
        timeout: Duration,
    ) -> Vec<RecordedRequest> {
        let key = key.to_string();
        self.wait_until(timeout, |inner| {
            inner
                .messages
                .iter()
                .filter(|&&i| inner.all[i].marker().as_deref() == Some(key.as_str()))
                .count()
                >= n
        })
        .await
        .unwrap_or_else(|| {
            panic!("mock API: wanted {n} requests for [[mock:{key}]] within {timeout:?}")
        });
        self.requests_for(&key)
    }

    /// Waits until the first request carrying marker `key` has finished
    /// (its response body ended). Panics after `timeout`.
    pub async fn wait_for_finished(&self, key: &str, timeout: Duration) {
        let key = key.to_string();
        self.wait_until(timeout, |inner| {
            inner
                .messages
                .iter()
                .map(|&i| &inner.all[i])
                .find(|r| r.marker().as_deref() == Some(key.as_str()))
                .is_some_and(|r| r.finished.is_some())
        })
        .await
        .unwrap_or_else(|| {
            panic!("mock API: the [[mock:{key}]] response did not end within {timeout:?}")
        });
    }

    /// Lets every [`Behavior::Hold`] response that has already arrived
    /// continue. Holds arriving later wait for the next call.
    pub fn release_held(&self) {
        self.shared.release.send_modify(|v| *v += 1);
    }

    /// Waits until `n` Hold responses in total (since start) have sent their
    /// first delta, i.e. the CLI is mid-turn. Panics after `timeout`.
    pub async fn wait_for_held(&self, n: usize, timeout: Duration) {
        self.wait_until(timeout, |inner| inner.held >= n)
            .await
            .unwrap_or_else(|| {
                panic!(
                    "mock API: wanted {n} held responses within {timeout:?}, got {}",
                    self.shared.lock().held
                )
            });
    }

    async fn wait_until(&self, timeout: Duration, cond: impl Fn(&Inner) -> bool) -> Option<()> {
        let mut rx = self.shared.changed.subscribe();
        let fut = async {
            loop {
                // Mark the current value seen before checking, so a change
                // between the check and `changed()` is not missed.
                rx.borrow_and_update();
                if cond(&self.shared.lock()) {
                    return;
                }
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(timeout, fut).await.ok()
    }
}

fn error_body(error_type: &str, message: &str) -> String {
    json!({"type": "error", "error": {"type": error_type, "message": message}}).to_string()
}

fn json_response(status: StatusCode, body: String, request_id: &str) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("request-id", request_id)
        .body(Body::from(body))
        .expect("build response")
}

fn sse(event: &str, data: Value) -> Bytes {
    Bytes::from(format!("event: {event}\ndata: {data}\n\n"))
}

/// Splits `text` into `chunks` pieces of nearly equal char count (fewer when
/// `text` is shorter; none when it is empty).
fn split_chunks(text: &str, chunks: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    if chars.is_empty() {
        return Vec::new();
    }
    let n = chunks.clamp(1, chars.len());
    (0..n)
        .map(|i| {
            let a = i * chars.len() / n;
            let b = (i + 1) * chars.len() / n;
            chars[a..b].iter().collect()
        })
        .collect()
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = Instant::now();
    let body_json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let record = RecordedRequest {
        method: method.to_string(),
        path: uri.path().to_string(),
        query: uri.query().map(str::to_string),
        body: body_json,
        headers: headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        started,
        finished: None,
    };
    let is_messages = method == Method::POST && uri.path() == "/v1/messages";
    let (idx, id, behavior) = {
        let mut inner = shared.lock();
        inner.next_id += 1;
        let id = inner.next_id;
        let behavior = if is_messages && record.is_compaction() {
            Some(
                inner
                    .compaction
                    .pop_front()
                    .unwrap_or_else(|| Behavior::summary(MOCK_SUMMARY)),
            )
        } else if is_messages {
            Some(match record.marker() {
                Some(key) => {
                    let keyed = inner.keyed.entry(key).or_default();
                    match keyed.queue.pop_front() {
                        Some(b) => b,
                        None => keyed.default.clone().unwrap_or(inner.default.clone()),
                    }
                }
                None => match inner.script.pop_front() {
                    Some(b) => b,
                    None => inner.default.clone(),
                },
            })
        } else {
            None
        };
        let last_user = record.last_user_text();
        let streaming = record.is_streaming();
        let model = record
            .body
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or("claude-mock")
            .to_string();
        let usage = inner.usage;
        inner.all.push(record);
        let idx = inner.all.len() - 1;
        if is_messages {
            inner.messages.push(idx);
        }
        (
            idx,
            id,
            behavior.map(|b| (b, last_user, model, streaming, usage)),
        )
    };
    shared.bump();
    let request_id = format!("req_mock_{id:04}");

    let Some((behavior, last_user, model, streaming, usage)) = behavior else {
        let resp = if method == Method::POST && uri.path() == "/v1/messages/count_tokens" {
            json_response(
                StatusCode::OK,
                json!({"input_tokens": 10}).to_string(),
                &request_id,
            )
        } else {
            json_response(
                StatusCode::NOT_FOUND,
                error_body(
                    "not_found_error",
                    &format!("mock: no route for {method} {}", uri.path()),
                ),
                &request_id,
            )
        };
        shared.mark_finished(idx);
        return resp;
    };

    let stream_plan = match behavior {
        Behavior::Status {
            code,
            error_type,
            message,
        } => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let resp = json_response(status, error_body(&error_type, &message), &request_id);
            shared.mark_finished(idx);
            return resp;
        }
        Behavior::Echo => Plan::Text {
            chunks: split_chunks(&format!("echo: {}", last_user.unwrap_or_default()), 4),
            hold_after: None,
        },
        Behavior::Reply { text, chunks } => Plan::Text {
            chunks: split_chunks(&text, chunks),
            hold_after: None,
        },
        Behavior::Hold { text } => {
            let first = Behavior::hold_first_delta(&text);
            let rest: String = text.chars().skip(first.chars().count()).collect();
            let mut chunks = vec![first];
            chunks.extend(split_chunks(&rest, 2));
            Plan::Text {
                chunks,
                hold_after: Some(1),
            }
        }
        Behavior::Disconnect => Plan::Disconnect,
        Behavior::Cut { .. } if !streaming => Plan::Disconnect,
        Behavior::Cut { text, after } => Plan::Cut {
            chunks: split_chunks(&text, 4).into_iter().take(after).collect(),
        },
        Behavior::ToolUse { name, input } => Plan::ToolUse { name, input },
    };

    let release_rx = shared.release.subscribe();
    if !streaming {
        let head = Head { id, model, usage };
        return respond_whole(shared, release_rx, stream_plan, idx, head, request_id).await;
    }
    let (tx, rx) = mpsc::unbounded_channel::<Result<Bytes, std::io::Error>>();
    let producer_shared = shared.clone();
    let head = Head { id, model, usage };
    tokio::spawn(produce(producer_shared, tx, release_rx, stream_plan, head));

    let guard = FinishGuard {
        shared: shared.clone(),
        idx,
    };
    let stream = futures_util::stream::unfold((rx, guard), |(mut rx, guard)| async move {
        let item = rx.recv().await?;
        Some((item, (rx, guard)))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream; charset=utf-8")
        .header("cache-control", "no-cache")
        .header("request-id", request_id)
        .body(Body::from_stream(stream))
        .expect("build SSE response")
}

/// Answers a non-streaming (`"stream": false`) request with one JSON
/// message. The CLI sends these as a fallback after a streaming request
/// failed mid-stream.
/// What every answer to one request starts with.
struct Head {
    id: u64,
    model: String,
    usage: Option<Usage>,
}

impl Head {
    /// The answer's usage: the set one, else 10 in and `output` out.
    fn usage(&self, output: u64) -> Value {
        match &self.usage {
            Some(u) => u.json(u.output_tokens),
            None => json!({"input_tokens": 10, "output_tokens": output}),
        }
    }
}

async fn respond_whole(
    shared: Arc<Shared>,
    mut release_rx: watch::Receiver<u64>,
    plan: Plan,
    idx: usize,
    head: Head,
    request_id: String,
) -> Response {
    let Head { id, ref model, .. } = head;
    let guard = FinishGuard {
        shared: shared.clone(),
        idx,
    };
    let (content, stop_reason, output_tokens) = match plan {
        Plan::Disconnect | Plan::Cut { .. } => {
            // Send the head, then abort the body.
            let stream = futures_util::stream::once(async move {
                let _guard = guard;
                Err::<Bytes, _>(std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    "mock: disconnect",
                ))
            });
            return Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "application/json")
                .header("request-id", request_id)
                .body(Body::from_stream(stream))
                .expect("build response");
        }
        Plan::Text { chunks, hold_after } => {
            if hold_after.is_some() {
                shared.lock().held += 1;
                shared.bump();
                let _ = release_rx.changed().await;
            }
            let n = chunks.len();
            (
                json!([{"type": "text", "text": chunks.concat()}]),
                "end_turn",
                n,
            )
        }
        Plan::ToolUse { name, input } => (
            json!([{"type": "tool_use", "id": format!("toolu_mock_{id:04}"), "name": name, "input": input}]),
            "tool_use",
            2,
        ),
    };
    let body = json!({
        "id": format!("msg_mock_{id:04}"), "type": "message", "role": "assistant", "model": model,
        "content": content, "stop_reason": stop_reason, "stop_sequence": null,
        "usage": head.usage(output_tokens as u64)
    });
    let resp = json_response(StatusCode::OK, body.to_string(), &request_id);
    drop(guard);
    resp
}

/// Records `finished` when the response body stream is dropped: after its
/// last chunk, after an abort, or when the client goes away.
struct FinishGuard {
    shared: Arc<Shared>,
    idx: usize,
}

impl Drop for FinishGuard {
    fn drop(&mut self) {
        self.shared.mark_finished(self.idx);
    }
}

enum Plan {
    /// Text deltas; with `hold_after: Some(k)`, wait for a release after the
    /// first `k` deltas.
    Text {
        chunks: Vec<String>,
        hold_after: Option<usize>,
    },
    Disconnect,
    /// Text deltas, then a dropped connection.
    Cut {
        chunks: Vec<String>,
    },
    ToolUse {
        name: String,
        input: Value,
    },
}

async fn produce(
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<Result<Bytes, std::io::Error>>,
    mut release_rx: watch::Receiver<u64>,
    plan: Plan,
    head: Head,
) {
    let Head { id, ref model, .. } = head;
    // Releases that happened before this request arrived do not count.
    release_rx.borrow_and_update();
    let send = |b: Bytes| tx.send(Ok(b)).is_ok();
    let msg_id = format!("msg_mock_{id:04}");
    let mut output_tokens = 0usize;
    if !send(sse(
        "message_start",
        json!({"type": "message_start", "message": {
            "id": msg_id, "type": "message", "role": "assistant", "model": model,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": head.usage(1)
        }}),
    )) {
        return;
    }
    let stop_reason = match plan {
        Plan::Disconnect => {
            // An error from the body stream makes hyper abort the connection
            // without the terminating chunk.
            let _ = tx.send(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "mock: disconnect",
            )));
            return;
        }
        Plan::Cut { chunks } => {
            let _ = send(sse(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0,
                       "content_block": {"type": "text", "text": ""}}),
            )) && chunks.iter().all(|chunk| {
                send(sse(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 0,
                           "delta": {"type": "text_delta", "text": chunk}}),
                ))
            });
            // The stream stalls, then dies: the deltas reach the client
            // first, as they do when a real connection is cut.
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            let _ = tx.send(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "mock: cut mid-stream",
            )));
            return;
        }
        Plan::Text { chunks, hold_after } => {
            if !send(sse(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0,
                       "content_block": {"type": "text", "text": ""}}),
            )) {
                return;
            }
            for (i, chunk) in chunks.iter().enumerate() {
                if hold_after == Some(i) {
                    shared.lock().held += 1;
                    shared.bump();
                    tokio::select! {
                        _ = release_rx.changed() => {}
                        _ = tx.closed() => return,
                    }
                }
                output_tokens += 1;
                if !send(sse(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 0,
                           "delta": {"type": "text_delta", "text": chunk}}),
                )) {
                    return;
                }
            }
            if !send(sse(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            )) {
                return;
            }
            "end_turn"
        }
        Plan::ToolUse { name, input } => {
            let tool_id = format!("toolu_mock_{id:04}");
            let input_json = input.to_string();
            let mid = input_json.len() / 2;
            let mid = (mid..=input_json.len())
                .find(|&i| input_json.is_char_boundary(i))
                .unwrap_or(input_json.len());
            let mut events = vec![sse(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0,
                       "content_block": {"type": "tool_use", "id": tool_id, "name": name, "input": {}}}),
            )];
            for part in [&input_json[..mid], &input_json[mid..]] {
                events.push(sse(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 0,
                           "delta": {"type": "input_json_delta", "partial_json": part}}),
                ));
            }
            events.push(sse(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            ));
            for e in events {
                if !send(e) {
                    return;
                }
            }
            output_tokens = 2;
            "tool_use"
        }
    };
    let _ = send(sse(
        "message_delta",
        json!({"type": "message_delta",
               "delta": {"stop_reason": stop_reason, "stop_sequence": null},
               "usage": {"output_tokens": head.usage.map_or(output_tokens as u64, |u| u.output_tokens)}}),
    )) && send(sse("message_stop", json!({"type": "message_stop"})));
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn chunks_and_markers() {
        assert_eq!(split_chunks("abcdefgh", 4), vec!["ab", "cd", "ef", "gh"]);
        assert_eq!(split_chunks("ab", 4), vec!["a", "b"]);
        assert!(split_chunks("", 3).is_empty());
        assert_eq!(split_chunks("héllo", 0), vec!["héllo"]);
        assert_eq!(marker_in("x [[mock:k-1]] y").as_deref(), Some("k-1"));
        assert_eq!(marker_in("[[mock:open"), None);
        assert_eq!(Behavior::hold_first_delta("abcde"), "abc");
    }
}
