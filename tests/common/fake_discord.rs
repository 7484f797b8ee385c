//! A fake Discord on loopback, for the relay's tests: a gateway websocket
//! that speaks the real protocol (HELLO op 10, IDENTIFY op 2, READY with
//! `resume_gateway_url`, heartbeat op 1 / ACK op 11, RESUME op 6, and the
//! MESSAGE_CREATE and INTERACTION_CREATE dispatches a test sends), and the
//! REST routes the relay uses (messages with their components, listing a
//! channel's messages, typing, threads, commands, interaction callbacks,
//! follow-ups and `@original` edits), every call recorded. A test clicks a
//! button or menu of a message as a MESSAGE_COMPONENT interaction
//! (`click`) and reads the callbacks the relay sent (`callbacks`,
//! `followups`). An edit can be answered 429 with `retry_after` and
//! rate-limit headers.
//! Real twilight talks to it: the gateway through `proxy_url`, REST
//! through the client's plain-HTTP proxy setting.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_websockets::Message as WsMessage;

use super::world::WAIT;

pub const BOT_ID: u64 = 4242;
pub const APP_ID: u64 = 777;
pub const GUILD: u64 = 100;
/// The heartbeat interval the fake asks for: short, so tests see heartbeats.
const HEARTBEAT_MS: u64 = 1000;

/// One REST call the relay made.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: String,
    pub path: String,
    pub body: Value,
    pub status: u16,
    pub at: Instant,
}

/// A message as the fake holds it: its content now and every edit.
#[derive(Debug, Clone)]
pub struct Msg {
    pub id: u64,
    pub channel: u64,
    pub content: String,
    pub edits: Vec<String>,
    pub reply_to: Option<u64>,
    /// Files uploaded with it: (file name, bytes).
    pub files: Vec<(String, Vec<u8>)>,
    /// Its components now (action rows, as Discord's JSON; `null`: none).
    pub components: Value,
}

impl Msg {
    /// The `custom_id`s of its buttons and menus, in order.
    pub fn custom_ids(&self) -> Vec<String> {
        self.items()
            .iter()
            .filter_map(|c| c["custom_id"].as_str().map(String::from))
            .collect()
    }

    /// Its buttons and menus (the action rows flattened).
    pub fn items(&self) -> Vec<Value> {
        let rows = self.components.as_array().cloned().unwrap_or_default();
        rows.iter()
            .flat_map(|r| r["components"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// The `custom_id` of the button labelled `label`.
    pub fn button(&self, label: &str) -> String {
        self.items()
            .iter()
            .find(|c| c["label"] == label)
            .and_then(|c| c["custom_id"].as_str().map(String::from))
            .unwrap_or_else(|| panic!("no button {label:?} in {:#}", self.components))
    }
}

/// An interaction callback the relay sent (`POST /interactions/…/callback`).
#[derive(Debug, Clone)]
pub struct Callback {
    pub token: String,
    /// The callback type (4 message, 6 deferred update, 7 update message…).
    pub kind: u64,
    pub data: Value,
}

#[derive(Default)]
struct State {
    next_id: u64,
    calls: Vec<Call>,
    messages: Vec<Msg>,
    /// REST calls to answer with this status (5xx) before one passes.
    fail_next: Vec<u16>,
    /// Edits to answer 429 (with this `retry_after`, seconds, and this
    /// shape) before one passes.
    edit_429: Vec<(f64, Limit)>,
    identifies: u32,
    /// The token of each IDENTIFY.
    tokens: Vec<String>,
    resumes: u32,
    heartbeats: u32,
    /// Dispatches go to the connected gateway session.
    session: Option<mpsc::UnboundedSender<Value>>,
    seq: u64,
    /// Files of the multipart request being routed.
    upload: Vec<(String, Vec<u8>)>,
    /// Threads the relay opened: thread → parent channel.
    threads: HashMap<u64, u64>,
    /// Channels the bot may not write to (403 Missing Access).
    forbidden: Vec<u64>,
    /// Files served at `/attachments/<name>`, as Discord's CDN would.
    files: HashMap<String, (String, Vec<u8>)>,
    /// The message each component interaction (by token) was on.
    clicked: HashMap<String, u64>,
}

/// The fake; dropping it stops its servers.
pub struct FakeDiscord {
    state: Arc<Mutex<State>>,
    changed: watch::Sender<u64>,
    pub gateway_url: String,
    pub http_addr: String,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for FakeDiscord {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn user(id: u64, bot: bool) -> Value {
    json!({"id": id.to_string(), "username": format!("user{id}"), "discriminator": "0",
           "avatar": null, "bot": bot, "public_flags": 0})
}

/// A message object as Discord sends it (what twilight deserialises).
pub fn message_json(
    id: u64,
    channel: u64,
    guild: Option<u64>,
    author: u64,
    content: &str,
    mentions: &[u64],
    roles: &[u64],
) -> Value {
    let mut m = json!({
        "id": id.to_string(), "channel_id": channel.to_string(),
        "author": user(author, author == BOT_ID), "content": content,
        "timestamp": "2025-01-01T00:00:00.000000+00:00", "edited_timestamp": null,
        "tts": false, "mention_everyone": false,
        "mentions": mentions.iter().map(|u| user(*u, *u == BOT_ID)).collect::<Vec<_>>(),
        "mention_roles": [], "attachments": [], "embeds": [], "pinned": false, "type": 0,
    });
    if let Some(g) = guild {
        m["guild_id"] = json!(g.to_string());
        m["member"] = json!({"roles": roles.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
            "joined_at": "2025-01-01T00:00:00.000000+00:00", "deaf": false, "mute": false,
            "flags": 0, "nick": null, "communication_disabled_until": null});
    }
    m
}

impl FakeDiscord {
    pub async fn start() -> FakeDiscord {
        let state = Arc::new(Mutex::new(State {
            next_id: 1_000_000,
            ..Default::default()
        }));
        let (changed, _) = watch::channel(0);
        let gw = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gateway_url = format!("ws://{}", gw.local_addr().unwrap());
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http_addr = http.local_addr().unwrap().to_string();
        let mut fake = FakeDiscord {
            state,
            changed,
            gateway_url,
            http_addr,
            tasks: Vec::new(),
        };
        let (st, ch, url) = (
            Arc::clone(&fake.state),
            fake.changed.clone(),
            fake.gateway_url.clone(),
        );
        fake.tasks
            .push(tokio::spawn(serve_gateway(gw, st, ch, url)));
        let (st, ch) = (Arc::clone(&fake.state), fake.changed.clone());
        let app = axum::Router::new().fallback(move |m: Method, u: Uri, h: HeaderMap, b: Bytes| {
            let (st, ch) = (Arc::clone(&st), ch.clone());
            async move { rest(&st, &ch, m, u, &h, b) }
        });
        fake.tasks.push(tokio::spawn(async move {
            let _ = axum::serve(http, app).await;
        }));
        fake
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// Waits (bounded by `WAIT`) until `pred` holds of the fake's state.
    pub async fn wait_for<T>(
        &self,
        what: &str,
        mut pred: impl FnMut(&FakeView<'_>) -> Option<T>,
    ) -> T {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            {
                let st = self.state.lock().unwrap();
                if let Some(v) = pred(&FakeView(&st)) {
                    return v;
                }
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                let st = self.state.lock().unwrap();
                panic!(
                    "{what}: not within {WAIT:?}; REST calls: {:#?}",
                    st.calls
                        .iter()
                        .map(|c| (&c.method, &c.path, c.status))
                        .collect::<Vec<_>>()
                );
            }
        }
    }

    /// Gateway sessions identified or resumed so far.
    pub fn sessions(&self) -> u32 {
        let st = self.state.lock().unwrap();
        st.identifies + st.resumes
    }

    /// Waits until a gateway session has identified (or resumed) `n` times in all.
    pub async fn wait_connected(&self, n: u32) {
        self.wait_for("gateway sessions", |v| {
            (v.0.identifies + v.0.resumes >= n && v.0.session.is_some()).then_some(())
        })
        .await
    }

    fn dispatch(&self, t: &str, d: Value) {
        let mut st = self.state.lock().unwrap();
        st.seq += 1;
        let frame = json!({"op": 0, "t": t, "s": st.seq, "d": d});
        let tx = st.session.as_ref().expect("no gateway session");
        tx.send(frame).expect("gateway session gone");
    }

    fn new_id(&self) -> u64 {
        let mut st = self.state.lock().unwrap();
        st.next_id += 1;
        st.next_id
    }

    /// A user's message in a guild channel (mentioning the bot if
    /// `mention`); returns its id.
    pub fn user_says(&self, channel: u64, author: u64, content: &str, mention: bool) -> u64 {
        self.user_says_with(channel, Some(GUILD), author, content, mention, &[])
    }

    /// A mention with files attached (`(name, content type, bytes)`).
    pub fn user_says_with_files(
        &self,
        channel: u64,
        author: u64,
        content: &str,
        files: &[(&str, &str, Vec<u8>)],
    ) -> u64 {
        let mut attachments = Vec::new();
        for (name, content_type, bytes) in files {
            let url = format!("http://{}/attachments/{name}", self.http_addr);
            attachments.push(json!({"id": self.new_id().to_string(), "filename": name,
                "size": bytes.len(), "url": url, "proxy_url": url, "content_type": content_type}));
            let file = (content_type.to_string(), bytes.clone());
            self.state
                .lock()
                .unwrap()
                .files
                .insert(name.to_string(), file);
        }
        let id = self.new_id();
        let text = format!("<@{BOT_ID}> {content}");
        let mut m = message_json(id, channel, Some(GUILD), author, &text, &[BOT_ID], &[]);
        m["attachments"] = json!(attachments);
        self.dispatch("MESSAGE_CREATE", m);
        id
    }

    pub fn user_says_with(
        &self,
        channel: u64,
        guild: Option<u64>,
        author: u64,
        content: &str,
        mention: bool,
        roles: &[u64],
    ) -> u64 {
        let id = self.new_id();
        let (text, mentions) = if mention {
            (format!("<@{BOT_ID}> {content}"), vec![BOT_ID])
        } else {
            (content.to_string(), vec![])
        };
        self.dispatch(
            "MESSAGE_CREATE",
            message_json(id, channel, guild, author, &text, &mentions, roles),
        );
        id
    }

    /// A slash command; returns the interaction's token.
    pub fn slash(&self, channel: u64, author: u64, name: &str, options: Value) -> String {
        let id = self.new_id();
        let token = format!("itoken{id}");
        let d = json!({
            "id": id.to_string(), "application_id": APP_ID.to_string(), "type": 2,
            "token": token, "version": 1, "attachment_size_limit": 8388608,
            "authorizing_integration_owners": {}, "entitlements": [],
            "guild_id": GUILD.to_string(),
            "channel": {"id": channel.to_string(), "type": 0},
            "member": {"user": user(author, false), "roles": [], "joined_at": "2025-01-01T00:00:00.000000+00:00",
                       "deaf": false, "mute": false, "flags": 0, "nick": null, "communication_disabled_until": null},
            "data": {"id": "9", "name": name, "type": 1, "options": options},
        });
        self.dispatch("INTERACTION_CREATE", d);
        token
    }

    /// A click on a component (`custom_id`) of the relay's message `msg`
    /// by `author` with `roles` (a menu's picks in `values`), as a
    /// MESSAGE_COMPONENT interaction; returns the interaction's token.
    pub fn click(
        &self,
        msg: u64,
        author: u64,
        roles: &[u64],
        custom_id: &str,
        values: &[&str],
    ) -> String {
        let (message, channel) = {
            let st = self.state.lock().unwrap();
            let m = st
                .messages
                .iter()
                .find(|m| m.id == msg)
                .expect("a message to click on");
            (stored_json(m), m.channel)
        };
        let id = self.new_id();
        let token = format!("ctoken{id}");
        self.state
            .lock()
            .unwrap()
            .clicked
            .insert(token.clone(), msg);
        let kind = if values.is_empty() { 2 } else { 3 };
        let d = json!({
            "id": id.to_string(), "application_id": APP_ID.to_string(), "type": 3,
            "token": token, "version": 1, "attachment_size_limit": 8388608,
            "authorizing_integration_owners": {}, "entitlements": [],
            "guild_id": GUILD.to_string(),
            "channel": {"id": channel.to_string(), "type": 0},
            "channel_id": channel.to_string(),
            "member": {"user": user(author, false), "roles": roles.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
                       "joined_at": "2025-01-01T00:00:00.000000+00:00",
                       "deaf": false, "mute": false, "flags": 0, "nick": null, "communication_disabled_until": null},
            "message": message,
            "data": {"custom_id": custom_id, "component_type": kind, "values": values},
        });
        self.dispatch("INTERACTION_CREATE", d);
        token
    }

    /// The callbacks the relay sent for the interaction `token`, in order.
    pub fn callbacks(&self, token: &str) -> Vec<Callback> {
        self.calls()
            .into_iter()
            .filter(|c| c.method == "POST" && c.path.ends_with(&format!("/{token}/callback")))
            .map(|c| Callback {
                token: token.to_string(),
                kind: c.body["type"].as_u64().unwrap_or(0),
                data: c.body["data"].clone(),
            })
            .collect()
    }

    /// The follow-up messages the relay sent for the interaction `token`.
    pub fn followups(&self, token: &str) -> Vec<Value> {
        self.calls()
            .into_iter()
            .filter(|c| {
                c.method == "POST" && c.path.ends_with(&format!("/webhooks/{APP_ID}/{token}"))
            })
            .map(|c| c.body)
            .collect()
    }

    /// The next `n` edits of channel messages answer 429 with `retry_after`
    /// (in the body and the headers).
    pub fn rate_limit_edits(&self, n: usize, retry_after: f64) {
        self.rate_limit_edits_as(n, retry_after, Limit::Headers);
    }

    /// The next `n` edits answer a 429 of this shape.
    pub fn rate_limit_edits_as(&self, n: usize, retry_after: f64, shape: Limit) {
        self.state
            .lock()
            .unwrap()
            .edit_429
            .extend(std::iter::repeat_n((retry_after, shape), n));
    }

    /// Closes the gateway session with `code` (the relay's shard
    /// reconnects, resuming where it can).
    pub fn close_session(&self, code: u16) {
        let tx = self.state.lock().unwrap().session.take();
        if let Some(tx) = tx {
            let _ = tx.send(json!({"__close": code}));
        }
    }

    /// Every call writing to `channel` answers 403 Missing Access.
    pub fn forbid(&self, channel: u64) {
        self.state.lock().unwrap().forbidden.push(channel);
    }

    /// The next `n` REST calls answer `status` (a 5xx).
    pub fn fail_next(&self, n: usize, status: u16) {
        self.state
            .lock()
            .unwrap()
            .fail_next
            .extend(std::iter::repeat_n(status, n));
    }

    /// Deletes a message, as a user or moderator would.
    pub fn delete_message(&self, id: u64) {
        self.state.lock().unwrap().messages.retain(|m| m.id != id);
        self.bump();
    }

    /// The tokens the relay identified with.
    pub fn identify_tokens(&self) -> Vec<String> {
        self.state.lock().unwrap().tokens.clone()
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    pub fn messages_in(&self, channel: u64) -> Vec<Msg> {
        let st = self.state.lock().unwrap();
        st.messages
            .iter()
            .filter(|m| m.channel == channel)
            .cloned()
            .collect()
    }

    pub fn heartbeats(&self) -> u32 {
        self.state.lock().unwrap().heartbeats
    }
}

/// Read access to the fake's state inside [`FakeDiscord::wait_for`].
pub struct FakeView<'a>(&'a State);

impl FakeView<'_> {
    pub fn calls(&self) -> &[Call] {
        &self.0.calls
    }
    pub fn messages_in(&self, channel: u64) -> Vec<&Msg> {
        self.0
            .messages
            .iter()
            .filter(|m| m.channel == channel)
            .collect()
    }
    pub fn message(&self, id: u64) -> Option<&Msg> {
        self.0.messages.iter().find(|m| m.id == id)
    }
    pub fn heartbeats(&self) -> u32 {
        self.0.heartbeats
    }
}

async fn serve_gateway(l: TcpListener, st: Arc<Mutex<State>>, ch: watch::Sender<u64>, url: String) {
    while let Ok((tcp, _)) = l.accept().await {
        tokio::spawn(gateway_session(
            tcp,
            Arc::clone(&st),
            ch.clone(),
            url.clone(),
        ));
    }
}

/// One gateway connection: HELLO, then IDENTIFY → READY (or RESUME →
/// RESUMED), heartbeats acknowledged, dispatches from the test forwarded.
async fn gateway_session(
    tcp: TcpStream,
    st: Arc<Mutex<State>>,
    ch: watch::Sender<u64>,
    url: String,
) {
    let Ok((_req, mut ws)) = tokio_websockets::ServerBuilder::new().accept(tcp).await else {
        return;
    };
    let hello = json!({"op": 10, "d": {"heartbeat_interval": HEARTBEAT_MS}});
    if ws.send(WsMessage::text(hello.to_string())).await.is_err() {
        return;
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<Value>();
    loop {
        tokio::select! {
            out = rx.recv() => {
                let Some(frame) = out else { return };
                if let Some(code) = frame["__close"].as_u64() {
                    // Closed by the test, as Discord closes a session it wants resumed.
                    let code = tokio_websockets::CloseCode::try_from(code as u16).ok();
                    let _ = ws.send(WsMessage::close(code, "closed by the test")).await;
                    return;
                }
                if ws.send(WsMessage::text(frame.to_string())).await.is_err() { return }
            }
            msg = ws.next() => {
                let Some(Ok(msg)) = msg else { return };
                let Some(text) = msg.as_text() else { continue };
                let Ok(v) = serde_json::from_str::<Value>(text) else { continue };
                let reply = on_gateway_op(&st, &v, &tx, &url);
                ch.send_modify(|n| *n += 1);
                if let Some(r) = reply {
                    if ws.send(WsMessage::text(r.to_string())).await.is_err() { return }
                }
            }
        }
    }
}

fn on_gateway_op(
    st: &Mutex<State>,
    v: &Value,
    tx: &mpsc::UnboundedSender<Value>,
    url: &str,
) -> Option<Value> {
    let mut st = st.lock().unwrap();
    match v["op"].as_u64()? {
        1 => {
            st.heartbeats += 1;
            Some(json!({"op": 11}))
        }
        2 => {
            st.identifies += 1;
            st.tokens
                .push(v["d"]["token"].as_str().unwrap_or("").to_string());
            st.session = Some(tx.clone());
            st.seq += 1;
            Some(json!({"op": 0, "t": "READY", "s": st.seq, "d": {
                "v": 10, "user": {"id": BOT_ID.to_string(), "username": "claude", "discriminator": "0",
                                   "avatar": null, "bot": true, "mfa_enabled": false},
                "guilds": [], "session_id": format!("sess{}", st.identifies),
                "resume_gateway_url": url, "shard": [0, 1],
                "application": {"id": APP_ID.to_string(), "flags": 0}}}))
        }
        6 => {
            st.resumes += 1;
            st.session = Some(tx.clone());
            st.seq += 1;
            Some(json!({"op": 0, "t": "RESUMED", "s": st.seq, "d": null}))
        }
        _ => None,
    }
}

fn ok(v: Value) -> Response {
    (StatusCode::OK, axum::Json(v)).into_response()
}

/// The REST routes, by method and path below `/api/v10`.
fn rest(
    st: &Mutex<State>,
    ch: &watch::Sender<u64>,
    m: Method,
    u: Uri,
    h: &HeaderMap,
    body: Bytes,
) -> Response {
    let content_type = h
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let (body, files) = match content_type.split_once("boundary=") {
        Some((_, boundary)) => multipart(&body, boundary),
        None => (
            serde_json::from_slice(&body).unwrap_or(Value::Null),
            Vec::new(),
        ),
    };
    let path = u.path().trim_start_matches("/api/v10").to_string();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let mut s = st.lock().unwrap();
    s.upload = files;
    let query = u.query().unwrap_or("").to_string();
    let resp = if s.fail_next.is_empty() {
        route(&mut s, &m, &parts, &query, &body)
    } else {
        let status = StatusCode::from_u16(s.fail_next.remove(0)).unwrap();
        (
            status,
            axum::Json(json!({"message": "server error", "code": 0})),
        )
            .into_response()
    };
    s.calls.push(Call {
        method: m.to_string(),
        path,
        body,
        status: resp.status().as_u16(),
        at: Instant::now(),
    });
    drop(s);
    ch.send_modify(|n| *n += 1);
    resp
}

/// A multipart/form-data body as Discord takes it: the `payload_json`
/// part, and the `files[n]` parts with their file names.
fn multipart(body: &[u8], boundary: &str) -> (Value, Vec<(String, Vec<u8>)>) {
    let text = String::from_utf8_lossy(body);
    let mut payload = Value::Null;
    let mut files = Vec::new();
    for part in text.split(&format!("--{}", boundary.trim_matches('"'))) {
        let Some((head, data)) = part.split_once("\r\n\r\n") else {
            continue;
        };
        let data = data.strip_suffix("\r\n").unwrap_or(data);
        if head.contains("name=\"payload_json\"") {
            payload = serde_json::from_str(data).unwrap_or(Value::Null);
        } else if let Some((_, rest)) = head.split_once("filename=\"") {
            let name = rest.split('"').next().unwrap_or("").to_string();
            files.push((name, data.as_bytes().to_vec()));
        }
    }
    (payload, files)
}

fn id(s: &str) -> u64 {
    s.parse().unwrap_or(0)
}

fn route(s: &mut State, m: &Method, parts: &[&str], query: &str, body: &Value) -> Response {
    if let ["channels", c, ..] = parts {
        if s.forbidden.contains(&id(c)) {
            let denied = json!({"message": "Missing Access", "code": 50001});
            return (StatusCode::FORBIDDEN, axum::Json(denied)).into_response();
        }
    }
    match (m.as_str(), parts) {
        ("POST", ["channels", c, "messages"]) => create_message(s, id(c), body),
        ("PATCH", ["channels", _, "messages", mid]) => edit_message(s, id(mid), body),
        ("POST", ["channels", _, "typing"]) => StatusCode::NO_CONTENT.into_response(),
        ("GET", ["attachments", name]) => match s.files.get(*name) {
            Some((content_type, bytes)) => {
                ([("content-type", content_type.clone())], bytes.clone()).into_response()
            }
            None => StatusCode::NOT_FOUND.into_response(),
        },
        ("GET", ["channels", c]) => match s.threads.get(&id(c)) {
            Some(parent) => ok(json!({"id": c, "type": 11, "guild_id": GUILD.to_string(),
                "parent_id": parent.to_string(), "name": "t", "owner_id": BOT_ID.to_string()})),
            None => {
                ok(json!({"id": c, "type": 0, "guild_id": GUILD.to_string(), "name": "general"}))
            }
        },
        ("POST", ["channels", c, "messages", _, "threads"]) => {
            s.next_id += 1;
            let thread = s.next_id;
            s.threads.insert(thread, id(c));
            ok(
                json!({"id": s.next_id.to_string(), "type": 11, "guild_id": GUILD.to_string(),
                      "parent_id": c, "name": body["name"], "owner_id": BOT_ID.to_string()}),
            )
        }
        ("PUT", ["applications", _, "commands"])
        | ("PUT", ["applications", _, "guilds", _, "commands"]) => set_commands(body),
        ("GET", ["channels", c, "messages"]) => list_messages(s, id(c), query),
        ("POST", ["interactions", _, token, "callback"]) => {
            // An UPDATE_MESSAGE (7) edits the message the component is on.
            if body["type"] == 7 {
                if let Some(mid) = s.clicked.get(*token).copied() {
                    return edit_message(s, mid, &body["data"]);
                }
            }
            StatusCode::NO_CONTENT.into_response()
        }
        ("POST", ["webhooks", _, _]) => {
            let content = body["content"].as_str().unwrap_or("");
            s.next_id += 1;
            ok(message_json(
                s.next_id,
                1,
                Some(GUILD),
                BOT_ID,
                content,
                &[],
                &[],
            ))
        }
        ("PATCH", ["webhooks", _, token, "messages", "@original"]) => {
            // A component's interaction edits the message it is on.
            if let Some(mid) = s.clicked.get(*token).copied() {
                return edit_message(s, mid, body);
            }
            let content = body["content"].as_str().unwrap_or("");
            ok(message_json(1, 1, Some(GUILD), BOT_ID, content, &[], &[]))
        }
        _ => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"message": "404: Not Found", "code": 0})),
        )
            .into_response(),
    }
}

fn create_message(s: &mut State, channel: u64, body: &Value) -> Response {
    s.next_id += 1;
    let content = body["content"].as_str().unwrap_or("").to_string();
    let reply_to = body["message_reference"]["message_id"].as_str().map(id);
    let files = std::mem::take(&mut s.upload);
    s.messages.push(Msg {
        id: s.next_id,
        channel,
        content: content.clone(),
        edits: vec![],
        reply_to,
        files,
        components: body["components"].clone(),
    });
    ok(stored_json(s.messages.last().unwrap()))
}

/// A stored message as Discord sends it, components included.
fn stored_json(m: &Msg) -> Value {
    let mut v = message_json(m.id, m.channel, Some(GUILD), BOT_ID, &m.content, &[], &[]);
    if !m.components.is_null() {
        v["components"] = m.components.clone();
    }
    v
}

/// `GET /channels/{c}/messages?after=&limit=`: newest first, as Discord.
fn list_messages(s: &State, channel: u64, query: &str) -> Response {
    let arg = |k: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.parse::<u64>().ok())
    };
    let after = arg("after").unwrap_or(0);
    let limit = arg("limit").unwrap_or(50) as usize;
    let mut list: Vec<&Msg> = s
        .messages
        .iter()
        .filter(|m| m.channel == channel && m.id > after)
        .collect();
    list.sort_by_key(|m| std::cmp::Reverse(m.id));
    ok(Value::Array(
        list.into_iter().take(limit).map(stored_json).collect(),
    ))
}

fn edit_message(s: &mut State, mid: u64, body: &Value) -> Response {
    if !s.edit_429.is_empty() {
        let (retry_after, shape) = s.edit_429.remove(0);
        return rate_limited(retry_after, shape);
    }
    let Some(msg) = s.messages.iter_mut().find(|x| x.id == mid) else {
        let unknown = json!({"message": "Unknown Message", "code": 10008});
        return (StatusCode::NOT_FOUND, axum::Json(unknown)).into_response();
    };
    if let Some(c) = body.get("content") {
        msg.content = c.as_str().unwrap_or("").to_string();
    }
    if let Some(c) = body.get("components") {
        msg.components = c.clone();
    }
    msg.edits.push(msg.content.clone());
    ok(stored_json(msg))
}

/// A bulk overwrite answers the commands with ids, as Discord does.
fn set_commands(body: &Value) -> Response {
    let cmds: Vec<Value> = body
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            c["id"] = json!((500 + i).to_string());
            c["application_id"] = json!(APP_ID.to_string());
            c["version"] = json!("1");
            c
        })
        .collect();
    ok(Value::Array(cmds))
}

/// The shapes of a 429 Discord sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// A route's bucket: `retry_after` in the body and the headers.
    Headers,
    /// `retry_after` in the JSON body only (no rate-limit headers).
    BodyOnly,
    /// The global limit: every route must wait.
    Global,
}

/// A 429 as Discord sends it.
fn rate_limited(retry_after: f64, shape: Limit) -> Response {
    let mut h = HeaderMap::new();
    let secs = format!("{retry_after:.3}");
    match shape {
        Limit::Headers => {
            h.insert("x-ratelimit-scope", "user".parse().unwrap());
            h.insert("x-ratelimit-bucket", "edit-bucket".parse().unwrap());
            h.insert("x-ratelimit-limit", "5".parse().unwrap());
            h.insert("x-ratelimit-remaining", "0".parse().unwrap());
            h.insert("x-ratelimit-reset-after", secs.parse().unwrap());
            h.insert("retry-after", secs.parse().unwrap());
        }
        Limit::BodyOnly => {}
        Limit::Global => {
            h.insert("x-ratelimit-global", "true".parse().unwrap());
            h.insert("x-ratelimit-scope", "global".parse().unwrap());
            h.insert("retry-after", secs.parse().unwrap());
        }
    }
    let global = shape == Limit::Global;
    let body = json!({"message": "You are being rate limited.", "retry_after": retry_after, "global": global});
    (StatusCode::TOO_MANY_REQUESTS, h, axum::Json(body)).into_response()
}

impl FakeDiscord {
    /// Every message content the relay posted or edited into `channel`,
    /// in posting order (content as it is now).
    pub fn contents(&self, channel: u64) -> Vec<String> {
        self.messages_in(channel)
            .into_iter()
            .map(|m| m.content)
            .collect()
    }

    /// The calls whose method and path match, in order.
    pub fn calls_to(&self, method: &str, path_part: &str) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.method == method && c.path.contains(path_part))
            .collect()
    }

    pub fn messages_by_id(&self) -> HashMap<u64, Msg> {
        self.state
            .lock()
            .unwrap()
            .messages
            .iter()
            .map(|m| (m.id, m.clone()))
            .collect()
    }

    /// Waits for at least one heartbeat (and its ACK).
    pub async fn wait_heartbeat(&self) {
        self.wait_for("a heartbeat", |v| (v.heartbeats() > 0).then_some(()))
            .await
    }
}
