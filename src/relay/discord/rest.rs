//! Discord REST. twilight-http builds each request (routes, bodies,
//! validation); the relay sends it itself, through one loop
//! ([`Rest::send`]) that handles every answer the same way:
//! - 429s are waited out by the relay: `retry_after` from the JSON body
//!   (or the `Retry-After` header), on the request's route, or on every
//!   route when Discord says the limit is global; a route whose
//!   `X-RateLimit-Remaining` reaches 0 waits `X-RateLimit-Reset-After`.
//!   Waits are bounded ([`MAX_RATE_WAIT`], [`MAX_RATE_LIMITED`]).
//!   (twilight's own client retries a 429 at once unless its headers name a
//!   bucket, so a body-only or global 429 would be hammered.)
//! - 5xx answers, timeouts and connection errors are retried with backoff.
//! - A permanent refusal (missing access, unknown message or channel) is
//!   `RestError::Permanent`, which the caller handles once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use hyper::StatusCode;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use tokio::time::Instant;
use twilight_http::request::{Request, TryIntoRequest};
use twilight_http::Client as Http;
use twilight_model::application::command::Command;
use twilight_model::channel::message::{AllowedMentions, Component, MessageFlags};
use twilight_model::channel::{Channel, Message};
use twilight_model::http::attachment::Attachment;
use twilight_model::http::interaction::{
    InteractionResponse, InteractionResponseData, InteractionResponseType,
};
use twilight_model::id::marker::{
    ApplicationMarker, ChannelMarker, InteractionMarker, MessageMarker,
};
use twilight_model::id::Id;

use crate::config::{DiscordSettings, Secret};

#[derive(Debug, thiserror::Error)]
pub enum RestError {
    /// Discord refused for good (e.g. 403 missing access, 404 unknown
    /// message): retrying will not help.
    #[error("Discord refused the request (HTTP {status})")]
    Permanent { status: u16 },
    /// 5xx, timeouts, connection errors and rate limits, after the retries
    /// and waits allowed.
    #[error("Discord did not answer the request: {0}")]
    Transient(String),
    /// The request could not be built, or the answer not read.
    #[error("Discord's answer could not be read: {0}")]
    Body(String),
}

/// Tries per request (the first included) on 5xx and timeouts.
const TRIES: u32 = 3;
/// 429s one request waits out before it gives up.
const MAX_RATE_LIMITED: u32 = 5;
/// The longest rate-limit wait a request sits through; a longer one fails
/// it at once (the route or all stay held for the whole time).
pub const MAX_RATE_WAIT: Duration = Duration::from_secs(30);
/// Discord wants `DiscordBot (url, version)`.
const USER_AGENT_VALUE: &str = concat!(
    "DiscordBot (claude-worker, ",
    env!("CARGO_PKG_VERSION"),
    ")"
);
/// Largest answer body read.
const MAX_BODY_BYTES: usize = 4 << 20;

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

#[derive(Clone)]
pub struct Rest {
    /// Builds requests only; never sends.
    builder: Arc<Http>,
    client: HyperClient<Https, Full<Bytes>>,
    /// `https://discord.com/api/v10`, or the test proxy's `http://…`.
    base: String,
    auth: HeaderValue,
    timeout: Duration,
    limits: Arc<Limits>,
}

pub type MessageId = Id<MessageMarker>;
pub type ChannelId = Id<ChannelMarker>;

impl Rest {
    pub fn new(settings: &DiscordSettings, token: &Secret) -> Rest {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .build();
        let base = match &settings.http_proxy {
            Some(proxy) => format!("http://{proxy}/api/v{}", twilight_http::API_VERSION),
            None => format!("https://discord.com/api/v{}", twilight_http::API_VERSION),
        };
        let token = token.expose();
        let value = if token.starts_with("Bot ") || token.starts_with("Bearer ") {
            token.to_string()
        } else {
            format!("Bot {token}")
        };
        let mut auth = HeaderValue::from_str(&value).unwrap_or(HeaderValue::from_static(""));
        auth.set_sensitive(true);
        Rest {
            builder: Arc::new(Http::builder().ratelimiter(None).build()),
            client: HyperClient::builder(TokioExecutor::new()).build(https),
            base,
            auth,
            timeout: Duration::from_millis(settings.request_timeout_ms),
            limits: Arc::default(),
        }
    }

    /// Sends a request: rate limits waited out, transient failures
    /// retried, all bounded. The answer's body on success.
    async fn send(&self, request: impl TryIntoRequest) -> Result<Bytes, RestError> {
        let req = request
            .try_into_request()
            .map_err(|e| RestError::Body(format!("bad request: {e}")))?;
        let route = format!("{} {}", req.method().name(), route_of(req.path()));
        let (mut failures, mut limited) = (0, 0);
        let mut backoff = Duration::from_millis(200);
        loop {
            self.limits.wait(&route).await?;
            let failure = match tokio::time::timeout(self.timeout, self.once(&req)).await {
                Ok(Ok((status, headers, body))) => {
                    self.limits.note(&route, &headers);
                    if status.is_success() {
                        return Ok(body);
                    }
                    if status == StatusCode::TOO_MANY_REQUESTS {
                        limited += 1;
                        let limit = RateLimit::of(&headers, &body);
                        tracing::debug!(
                            wait_ms = limit.wait.as_millis() as u64,
                            global = limit.global,
                            "Discord rate limit; waiting"
                        );
                        self.limits.hold(&route, &limit);
                        if limited >= MAX_RATE_LIMITED {
                            return Err(RestError::Transient("still rate limited".into()));
                        }
                        continue;
                    }
                    if !status.is_server_error() {
                        return Err(RestError::Permanent {
                            status: status.as_u16(),
                        });
                    }
                    format!("HTTP {status}")
                }
                Ok(Err(e)) => e,
                Err(_) => "timed out".to_string(),
            };
            failures += 1;
            if failures >= TRIES {
                return Err(RestError::Transient(failure));
            }
            tracing::debug!(error = %failure, "Discord request failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff *= 3;
        }
    }

    /// One HTTP exchange.
    async fn once(&self, req: &Request) -> Result<(StatusCode, HeaderMap, Bytes), String> {
        let mut builder = hyper::Request::builder()
            .method(req.method().name())
            .uri(format!("{}/{}", self.base, req.path()))
            .header(USER_AGENT, USER_AGENT_VALUE);
        if req.use_authorization_token() {
            builder = builder.header(AUTHORIZATION, self.auth.clone());
        }
        for (name, value) in req.headers().into_iter().flatten() {
            builder = builder.header(name, value);
        }
        let body = if let Some(form) = req.form() {
            builder = builder.header(CONTENT_TYPE, form.content_type());
            Full::from(form.clone().build())
        } else if let Some(bytes) = req.body() {
            builder = builder.header(CONTENT_TYPE, "application/json");
            Full::from(bytes.to_vec())
        } else {
            Full::default()
        };
        let request = builder.body(body).map_err(|e| e.to_string())?;
        let resp = self
            .client
            .request(request)
            .await
            .map_err(|e| e.to_string())?;
        let (parts, body) = resp.into_parts();
        let bytes = Limited::new(body, MAX_BODY_BYTES)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((parts.status, parts.headers, bytes))
    }

    /// [`Rest::send`], and the answer read as `T`.
    async fn model<T: DeserializeOwned>(
        &self,
        request: impl TryIntoRequest,
    ) -> Result<T, RestError> {
        let body = self.send(request).await?;
        serde_json::from_slice(&body).map_err(|e| RestError::Body(e.to_string()))
    }

    /// Posts a message (as a reply to `reply_to`, if set); returns its id.
    pub async fn create(
        &self,
        channel: ChannelId,
        content: &str,
        reply_to: Option<MessageId>,
    ) -> Result<MessageId, RestError> {
        let mut req = self.builder.create_message(channel).content(content);
        if let Some(m) = reply_to {
            req = req.reply(m).fail_if_not_exists(false);
        }
        Ok(self.model::<Message>(req).await?.id)
    }

    /// Posts a file (no text); returns the message's id.
    pub async fn create_file(
        &self,
        channel: ChannelId,
        name: &str,
        bytes: &[u8],
    ) -> Result<MessageId, RestError> {
        let files = [Attachment::from_bytes(name.to_string(), bytes.to_vec(), 1)];
        let req = self.builder.create_message(channel).attachments(&files);
        Ok(self.model::<Message>(req).await?.id)
    }

    /// Replaces a message's content.
    pub async fn edit(
        &self,
        channel: ChannelId,
        message: MessageId,
        content: &str,
    ) -> Result<(), RestError> {
        let req = self
            .builder
            .update_message(channel, message)
            .content(Some(content));
        self.send(req).await.map(drop)
    }

    /// Shows "typing…" in a channel for about 10 s.
    pub async fn typing(&self, channel: ChannelId) -> Result<(), RestError> {
        let req = self.builder.create_typing_trigger(channel);
        self.send(req).await.map(drop)
    }

    /// The parent channel of `channel` if it is a thread `owner` opened.
    pub async fn own_thread_parent(
        &self,
        channel: ChannelId,
        owner: u64,
    ) -> Result<Option<u64>, RestError> {
        let ch: Channel = self.model(self.builder.channel(channel)).await?;
        let own = ch.kind.is_thread() && ch.owner_id.map(Id::get) == Some(owner);
        Ok(ch.parent_id.map(Id::get).filter(|_| own))
    }

    /// Opens a public thread on a message; returns the thread's id.
    pub async fn thread(
        &self,
        channel: ChannelId,
        message: MessageId,
        name: &str,
    ) -> Result<ChannelId, RestError> {
        let req = self
            .builder
            .create_thread_from_message(channel, message, name);
        Ok(self.model::<Channel>(req).await?.id)
    }

    /// Acknowledges an interaction with "thinking…" (deferred): Discord
    /// wants an answer within 3 s; the real one follows as an edit.
    pub async fn defer(
        &self,
        app: Id<ApplicationMarker>,
        id: Id<InteractionMarker>,
        token: &str,
    ) -> Result<(), RestError> {
        let response = InteractionResponse {
            kind: InteractionResponseType::DeferredChannelMessageWithSource,
            data: None,
        };
        let client = self.builder.interaction(app);
        let req = client.create_response(id, token, &response);
        self.send(req).await.map(drop)
    }

    /// Edits the deferred answer of an interaction (`@original`).
    pub async fn answer(
        &self,
        app: Id<ApplicationMarker>,
        token: &str,
        content: &str,
    ) -> Result<(), RestError> {
        let client = self.builder.interaction(app);
        let req = client.update_response(token).content(Some(content));
        self.send(req).await.map(drop)
    }

    /// Posts a message with components that mentions no one (its text
    /// may hold user ids and Claude's words); returns its id.
    pub async fn create_quiet(
        &self,
        channel: ChannelId,
        content: &str,
        components: &[Component],
    ) -> Result<MessageId, RestError> {
        let none = AllowedMentions::default();
        let req = self
            .builder
            .create_message(channel)
            .content(content)
            .components(components)
            .allowed_mentions(Some(&none));
        Ok(self.model::<Message>(req).await?.id)
    }

    /// Replaces a message's content and components (an empty list removes
    /// them), mentioning no one.
    pub async fn edit_quiet(
        &self,
        channel: ChannelId,
        message: MessageId,
        content: &str,
        components: &[Component],
    ) -> Result<(), RestError> {
        let none = AllowedMentions::default();
        let req = self
            .builder
            .update_message(channel, message)
            .content(Some(content))
            .components(Some(components))
            .allowed_mentions(Some(&none));
        self.send(req).await.map(drop)
    }

    /// Up to 100 messages of `channel` posted after `after`, newest first.
    pub async fn messages_after(
        &self,
        channel: ChannelId,
        after: MessageId,
    ) -> Result<Vec<Message>, RestError> {
        let req = self
            .builder
            .channel_messages(channel)
            .after(after)
            .limit(100);
        self.model(req).await
    }

    /// Answers an interaction at once: `kind` with `data` (e.g. an
    /// ephemeral refusal, or a deferred update of a component's message).
    pub async fn respond(
        &self,
        app: Id<ApplicationMarker>,
        id: Id<InteractionMarker>,
        token: &str,
        kind: InteractionResponseType,
        data: Option<InteractionResponseData>,
    ) -> Result<(), RestError> {
        let response = InteractionResponse { kind, data };
        let client = self.builder.interaction(app);
        let req = client.create_response(id, token, &response);
        self.send(req).await.map(drop)
    }

    /// A follow-up only the interaction's user sees (ephemeral).
    pub async fn followup_ephemeral(
        &self,
        app: Id<ApplicationMarker>,
        token: &str,
        content: &str,
    ) -> Result<(), RestError> {
        let none = AllowedMentions::default();
        let client = self.builder.interaction(app);
        let req = client
            .create_followup(token)
            .content(content)
            .flags(MessageFlags::EPHEMERAL)
            .allowed_mentions(Some(&none));
        self.send(req).await.map(drop)
    }

    /// Replaces the application's commands, globally or in one guild.
    pub async fn register(
        &self,
        app: Id<ApplicationMarker>,
        guild: Option<u64>,
        commands: &[Command],
    ) -> Result<(), RestError> {
        let client = self.builder.interaction(app);
        match guild.and_then(Id::new_checked) {
            Some(g) => self.send(client.set_guild_commands(g, commands)).await,
            None => self.send(client.set_global_commands(commands)).await,
        }
        .map(drop)
    }
}

/// A request's path without its query: the route its rate limit is kept
/// under (Discord's buckets are coarser; a route is never looser).
fn route_of(path: &str) -> &str {
    path.split_once('?').map_or(path, |(p, _)| p)
}

/// What a 429 asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimit {
    pub wait: Duration,
    /// Every route waits, not only the request's.
    pub global: bool,
}

impl RateLimit {
    /// Reads a 429: `retry_after` (seconds) from the JSON body, else the
    /// `Retry-After` header, else 1 s; global if the body's `global` flag,
    /// `X-RateLimit-Global` or `X-RateLimit-Scope: global` says so.
    pub fn of(headers: &HeaderMap, body: &[u8]) -> RateLimit {
        let json: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let secs = json["retry_after"]
            .as_f64()
            .or_else(|| header("retry-after")?.trim().parse().ok())
            .filter(|s: &f64| s.is_finite() && *s >= 0.0)
            .unwrap_or(1.0);
        let global = json["global"].as_bool() == Some(true)
            || header("x-ratelimit-global") == Some("true")
            || header("x-ratelimit-scope") == Some("global");
        RateLimit {
            // Capped so a wild value cannot overflow; waits past
            // MAX_RATE_WAIT fail the request anyway.
            wait: Duration::from_secs_f64(secs.min(3600.0)),
            global,
        }
    }
}

/// The rate limits in force: all routes (global) and per route.
#[derive(Default)]
struct Limits {
    inner: Mutex<LimitsInner>,
}

#[derive(Default)]
struct LimitsInner {
    global: Option<Instant>,
    routes: HashMap<String, Instant>,
}

/// Routes remembered before expired limits are dropped.
const ROUTES_MEMORY: usize = 1024;

impl Limits {
    fn lock(&self) -> std::sync::MutexGuard<'_, LimitsInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until `route` may be used; fails at once if that is more
    /// than [`MAX_RATE_WAIT`] away. Loops: a limit may be extended while
    /// this waits.
    async fn wait(&self, route: &str) -> Result<(), RestError> {
        loop {
            let until = {
                let l = self.lock();
                l.global
                    .into_iter()
                    .chain(l.routes.get(route).copied())
                    .max()
            };
            let now = Instant::now();
            match until {
                Some(t) if t > now => {
                    if t - now > MAX_RATE_WAIT {
                        let secs = (t - now).as_secs();
                        return Err(RestError::Transient(format!("rate limited for {secs} s")));
                    }
                    tokio::time::sleep_until(t).await;
                }
                _ => return Ok(()),
            }
        }
    }

    /// Holds the route (or all of them) for the 429's wait.
    fn hold(&self, route: &str, limit: &RateLimit) {
        let until = Instant::now() + limit.wait;
        let mut l = self.lock();
        if limit.global {
            l.global = Some(l.global.map_or(until, |g| g.max(until)));
        } else {
            Self::hold_route(&mut l, route, until);
        }
    }

    /// A bucket used up (`X-RateLimit-Remaining: 0`) holds its route
    /// until it resets.
    fn note(&self, route: &str, headers: &HeaderMap) {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        if header("x-ratelimit-remaining").map(str::trim) != Some("0") {
            return;
        }
        let Some(secs) = header("x-ratelimit-reset-after")
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
        else {
            return;
        };
        let until = Instant::now() + Duration::from_secs_f64(secs.min(3600.0));
        Self::hold_route(&mut self.lock(), route, until);
    }

    fn hold_route(l: &mut LimitsInner, route: &str, until: Instant) {
        if l.routes.len() >= ROUTES_MEMORY {
            let now = Instant::now();
            l.routes.retain(|_, t| *t > now);
        }
        let t = l.routes.entry(route.to_string()).or_insert(until);
        *t = (*t).max(until);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (k.parse().unwrap(), HeaderValue::from_static(v)))
            .collect()
    }

    #[test]
    fn a_429_is_read_from_its_body_then_its_headers() {
        let body =
            br#"{"message": "You are being rate limited.", "retry_after": 0.25, "global": false}"#;
        let l = RateLimit::of(&HeaderMap::new(), body);
        assert_eq!(
            l,
            RateLimit {
                wait: Duration::from_millis(250),
                global: false
            }
        );
        let l = RateLimit::of(&headers(&[("retry-after", "2")]), b"not json");
        assert_eq!(
            l,
            RateLimit {
                wait: Duration::from_secs(2),
                global: false
            }
        );
        let l = RateLimit::of(
            &HeaderMap::new(),
            br#"{"retry_after": 1.5, "global": true}"#,
        );
        assert!(l.global);
        let scope = headers(&[("x-ratelimit-scope", "global"), ("retry-after", "3")]);
        assert_eq!(
            RateLimit::of(&scope, b""),
            RateLimit {
                wait: Duration::from_secs(3),
                global: true
            }
        );
        let flag = headers(&[("x-ratelimit-global", "true")]);
        assert!(RateLimit::of(&flag, b"{}").global);
        // Nothing usable: a second, rather than a hammering retry.
        let l = RateLimit::of(&HeaderMap::new(), br#"{"retry_after": -4}"#);
        assert_eq!(l.wait, Duration::from_secs(1));
        let l = RateLimit::of(&HeaderMap::new(), br#"{"retry_after": 1e300}"#);
        assert_eq!(l.wait, Duration::from_secs(3600));
    }

    #[test]
    fn routes_drop_their_query() {
        assert_eq!(
            route_of("channels/1/messages/2?wait=true"),
            "channels/1/messages/2"
        );
        assert_eq!(route_of("channels/1/typing"), "channels/1/typing");
    }

    #[tokio::test]
    async fn a_global_limit_holds_every_route_and_a_long_one_fails_at_once() {
        let ms = Duration::from_millis;
        let limits = Limits::default();
        let start = Instant::now();
        limits.hold(
            "PATCH a",
            &RateLimit {
                wait: ms(200),
                global: false,
            },
        );
        limits.wait("POST b").await.unwrap();
        assert!(start.elapsed() < ms(100), "another route is not held");
        limits.wait("PATCH a").await.unwrap();
        assert!(start.elapsed() >= ms(200));
        let start = Instant::now();
        limits.hold(
            "PATCH a",
            &RateLimit {
                wait: ms(200),
                global: true,
            },
        );
        limits.wait("POST b").await.unwrap();
        assert!(start.elapsed() >= ms(200), "a global limit holds all");
        let start = Instant::now();
        let used_up = headers(&[
            ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-reset-after", "0.2"),
        ]);
        limits.note("GET c", &used_up);
        limits.wait("GET c").await.unwrap();
        assert!(
            start.elapsed() >= ms(200),
            "a used-up bucket waits for its reset"
        );
        limits.hold(
            "x",
            &RateLimit {
                wait: MAX_RATE_WAIT * 2,
                global: true,
            },
        );
        let start = Instant::now();
        assert!(matches!(
            limits.wait("POST b").await,
            Err(RestError::Transient(_))
        ));
        assert!(start.elapsed() < ms(100), "failed without waiting");
    }
}
