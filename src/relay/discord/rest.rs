//! Discord REST through twilight-http, bounded and retried: 5xx answers and
//! timeouts are retried with backoff; 429s are waited out by twilight's
//! rate limiter (it reads the `X-RateLimit-*` headers and retries); a
//! permanent refusal (missing access, unknown message or channel) is
//! `RestError::Permanent`, which the caller handles once.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use twilight_http::error::ErrorType;
use twilight_http::Client as Http;
use twilight_model::application::command::Command;
use twilight_model::http::attachment::Attachment;
use twilight_model::http::interaction::{InteractionResponse, InteractionResponseType};
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
    /// 5xx, timeouts and connection errors, after the retries.
    #[error("Discord did not answer the request: {0}")]
    Transient(String),
    /// The answer could not be read.
    #[error("Discord's answer could not be read: {0}")]
    Body(String),
}

impl RestError {
    fn from_http(e: &twilight_http::Error) -> RestError {
        match e.kind() {
            ErrorType::Response { status, .. } if !status.is_server_error() => {
                RestError::Permanent {
                    status: status.get(),
                }
            }
            ErrorType::Unauthorized => RestError::Permanent { status: 401 },
            _ => RestError::Transient(e.to_string()),
        }
    }
}

/// Tries per request (the first included) on 5xx and timeouts.
const TRIES: u32 = 3;

#[derive(Clone)]
pub struct Rest {
    http: Arc<Http>,
    timeout: Duration,
}

pub type MessageId = Id<MessageMarker>;
pub type ChannelId = Id<ChannelMarker>;

impl Rest {
    pub fn new(settings: &DiscordSettings, token: &Secret) -> Rest {
        let timeout = Duration::from_millis(settings.request_timeout_ms);
        let mut builder = Http::builder()
            .token(token.expose().to_string())
            .timeout(timeout);
        if let Some(proxy) = &settings.http_proxy {
            builder = builder.proxy(proxy.clone(), true);
        }
        Rest {
            http: Arc::new(builder.build()),
            timeout,
        }
    }

    pub fn http(&self) -> &Http {
        &self.http
    }

    /// Runs `call` up to [`TRIES`] times while it fails transiently, with
    /// backoff, all within the request timeout (rate-limit waits included).
    async fn retried<T, F, Fut>(&self, mut call: F) -> Result<T, RestError>
    where
        F: FnMut(Arc<Http>) -> Fut,
        Fut: Future<Output = Result<T, RestError>>,
    {
        let work = async {
            let mut delay = Duration::from_millis(200);
            let mut tries = 0;
            loop {
                tries += 1;
                match call(Arc::clone(&self.http)).await {
                    Err(RestError::Transient(e)) if tries < TRIES => {
                        tracing::debug!(error = %e, "Discord request failed; retrying");
                        tokio::time::sleep(delay).await;
                        delay *= 3;
                    }
                    other => return other,
                }
            }
        };
        tokio::time::timeout(self.timeout * TRIES, work)
            .await
            .unwrap_or_else(|_| Err(RestError::Transient("timed out".into())))
    }

    /// Posts a message (as a reply to `reply_to`, if set); returns its id.
    pub async fn create(
        &self,
        channel: ChannelId,
        content: &str,
        reply_to: Option<MessageId>,
    ) -> Result<MessageId, RestError> {
        self.retried(|http| async move {
            let mut req = http.create_message(channel).content(content);
            if let Some(m) = reply_to {
                req = req.reply(m).fail_if_not_exists(false);
            }
            let resp = req.await.map_err(|e| RestError::from_http(&e))?;
            let msg = resp
                .model()
                .await
                .map_err(|e| RestError::Body(e.to_string()))?;
            Ok(msg.id)
        })
        .await
    }

    /// Posts a file (no text); returns the message's id.
    pub async fn create_file(
        &self,
        channel: ChannelId,
        name: &str,
        bytes: &[u8],
    ) -> Result<MessageId, RestError> {
        let files = [Attachment::from_bytes(name.to_string(), bytes.to_vec(), 1)];
        self.retried(|http| {
            let files = &files;
            async move {
                let resp = http
                    .create_message(channel)
                    .attachments(files)
                    .await
                    .map_err(|e| RestError::from_http(&e))?;
                let msg = resp
                    .model()
                    .await
                    .map_err(|e| RestError::Body(e.to_string()))?;
                Ok(msg.id)
            }
        })
        .await
    }

    /// Replaces a message's content.
    pub async fn edit(
        &self,
        channel: ChannelId,
        message: MessageId,
        content: &str,
    ) -> Result<(), RestError> {
        self.retried(|http| async move {
            http.update_message(channel, message)
                .content(Some(content))
                .await
                .map(drop)
                .map_err(|e| RestError::from_http(&e))
        })
        .await
    }

    /// Shows "typing…" in a channel for about 10 s.
    pub async fn typing(&self, channel: ChannelId) -> Result<(), RestError> {
        self.retried(|http| async move {
            http.create_typing_trigger(channel)
                .await
                .map(drop)
                .map_err(|e| RestError::from_http(&e))
        })
        .await
    }

    /// The parent channel of `channel` if it is a thread `owner` opened.
    pub async fn own_thread_parent(
        &self,
        channel: ChannelId,
        owner: u64,
    ) -> Result<Option<u64>, RestError> {
        self.retried(|http| async move {
            let resp = http
                .channel(channel)
                .await
                .map_err(|e| RestError::from_http(&e))?;
            let ch = resp
                .model()
                .await
                .map_err(|e| RestError::Body(e.to_string()))?;
            let own = ch.kind.is_thread() && ch.owner_id.map(Id::get) == Some(owner);
            Ok(ch.parent_id.map(Id::get).filter(|_| own))
        })
        .await
    }

    /// Opens a public thread on a message; returns the thread's id.
    pub async fn thread(
        &self,
        channel: ChannelId,
        message: MessageId,
        name: &str,
    ) -> Result<ChannelId, RestError> {
        self.retried(|http| async move {
            let resp = http
                .create_thread_from_message(channel, message, name)
                .await
                .map_err(|e| RestError::from_http(&e))?;
            let ch = resp
                .model()
                .await
                .map_err(|e| RestError::Body(e.to_string()))?;
            Ok(ch.id)
        })
        .await
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
        self.retried(|http| {
            let response = response.clone();
            async move {
                http.interaction(app)
                    .create_response(id, token, &response)
                    .await
                    .map(drop)
                    .map_err(|e| RestError::from_http(&e))
            }
        })
        .await
    }

    /// Edits the deferred answer of an interaction (`@original`).
    pub async fn answer(
        &self,
        app: Id<ApplicationMarker>,
        token: &str,
        content: &str,
    ) -> Result<(), RestError> {
        self.retried(|http| async move {
            http.interaction(app)
                .update_response(token)
                .content(Some(content))
                .await
                .map(drop)
                .map_err(|e| RestError::from_http(&e))
        })
        .await
    }

    /// Replaces the application's commands, globally or in one guild.
    pub async fn register(
        &self,
        app: Id<ApplicationMarker>,
        guild: Option<u64>,
        commands: &[Command],
    ) -> Result<(), RestError> {
        self.retried(|http| async move {
            let client = http.interaction(app);
            let sent = match guild.and_then(Id::new_checked) {
                Some(g) => client.set_guild_commands(g, commands).await,
                None => client.set_global_commands(commands).await,
            };
            sent.map(drop).map_err(|e| RestError::from_http(&e))
        })
        .await
    }
}
