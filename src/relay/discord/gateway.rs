//! The gateway side: twilight's shard (it heartbeats, reconnects and
//! resumes by itself) and what each message does: placeholder reply
//! first, then the job, so the job's metadata can name the reply.

use std::sync::{Arc, OnceLock};

use twilight_gateway::{
    ConfigBuilder, Event, EventTypeFlags, Intents, Shard, ShardId, StreamExt as _,
};
use twilight_model::application::interaction::InteractionType;
use twilight_model::channel::Message;
use twilight_model::id::marker::ApplicationMarker;
use twilight_model::id::Id;

use super::route::{self, Facts, ReplyMeta, Verdict};
use super::{commands, lock, prompt, render, RelayError, Shared};
use crate::client::amqp_user;
use crate::config::Secret;
use crate::protocol::{AttachmentV1, JobV1, SessionMode, SessionSpec, PROTOCOL_VERSION};

/// The bot's own ids, known from READY.
#[derive(Debug, Clone, Copy)]
pub struct Me {
    pub user: u64,
    pub app: Id<ApplicationMarker>,
}

pub struct Gateway {
    shared: Arc<Shared>,
    token: Secret,
    me: Arc<OnceLock<Me>>,
}

impl Gateway {
    pub fn new(shared: Arc<Shared>, token: Secret) -> Gateway {
        Gateway {
            shared,
            token,
            me: Arc::new(OnceLock::new()),
        }
    }

    fn shard(&self) -> Shard {
        // Message content is privileged; mentions and DMs carry it anyway,
        // so only threads answered without a mention need the intent.
        let mut intents = Intents::GUILD_MESSAGES | Intents::DIRECT_MESSAGES;
        if self.shared.settings.threads {
            intents |= Intents::MESSAGE_CONTENT;
        }
        let mut config = ConfigBuilder::new(self.token.expose().to_string(), intents);
        if let Some(url) = &self.shared.settings.gateway_url {
            config = config.proxy_url(url.clone());
        }
        Shard::with_config(ShardId::ONE, config.build())
    }

    /// Reads gateway events until shutdown; a fatal gateway error (a bad
    /// token, disallowed intents) ends the relay.
    pub async fn run(self) -> Result<(), RelayError> {
        let mut shard = self.shard();
        let wanted = EventTypeFlags::READY
            | EventTypeFlags::MESSAGE_CREATE
            | EventTypeFlags::INTERACTION_CREATE;
        loop {
            let item = tokio::select! {
                _ = self.shared.shutdown.cancelled() => return Ok(()),
                item = shard.next_event(wanted) => item,
            };
            match item {
                None => {
                    return Err(RelayError::Gateway(
                        "Discord closed it for good (a bad token, or intents the \
                         application may not use?)"
                            .into(),
                    ))
                }
                Some(Err(e)) => {
                    // twilight reconnects by itself; a fatal close ends the stream next.
                    tracing::warn!(error = %e, "Discord gateway error; reconnecting");
                }
                Some(Ok(event)) => self.dispatch(event),
            }
        }
    }

    fn dispatch(&self, event: Event) {
        match event {
            Event::Ready(ready) => {
                let me = Me {
                    user: ready.user.id.get(),
                    app: ready.application.id,
                };
                let _ = self.me.set(me);
                tracing::info!("connected to the Discord gateway");
                if self.shared.settings.register_commands {
                    let shared = Arc::clone(&self.shared);
                    tokio::spawn(async move { commands::register(&shared, me.app).await });
                }
            }
            Event::MessageCreate(msg) => {
                let Some(me) = self.me.get().copied() else {
                    return;
                };
                let shared = Arc::clone(&self.shared);
                // Each message on its own task: a slow Discord call for one
                // conversation does not hold up the gateway.
                tokio::spawn(async move { on_message(&shared, me, &msg).await });
            }
            Event::InteractionCreate(i) => {
                let Some(me) = self.me.get().copied() else {
                    return;
                };
                let shared = Arc::clone(&self.shared);
                let i = (*i).0;
                if i.kind == InteractionType::MessageComponent {
                    tokio::spawn(async move { prompt::on_component(&shared, me, i).await });
                } else {
                    tokio::spawn(async move { commands::on_interaction(&shared, me, i).await });
                }
            }
            _ => {}
        }
    }
}

fn facts_of<'a>(shared: &Shared, msg: &'a Message, roles: &'a [u64], me: Me) -> Facts<'a> {
    let own_thread_parent = lock(&shared.threads)
        .get(&msg.channel_id.get())
        .copied()
        .flatten();
    Facts {
        author_id: msg.author.id.get(),
        author_is_bot: msg.author.bot,
        guild_id: msg.guild_id.map(Id::get),
        channel_id: msg.channel_id.get(),
        own_thread_parent,
        role_ids: roles,
        mentions_bot: msg.mentions.iter().any(|m| m.id.get() == me.user),
        content: &msg.content,
        has_attachments: !msg.attachments.is_empty(),
    }
}

/// Channels remembered in thread mode before the map is cleared.
const THREADS_MEMORY: usize = 10_000;

/// In thread mode, learns whether an unmentioned message's channel is a
/// thread the relay opened (asking Discord once per channel), so follow-ups
/// there are answered after a restart too.
async fn own_thread(shared: &Shared, me: Me, msg: &Message) {
    let mentioned = msg.mentions.iter().any(|m| m.id.get() == me.user);
    if !shared.settings.threads || msg.guild_id.is_none() || mentioned || msg.author.bot {
        return;
    }
    let channel = msg.channel_id.get();
    if lock(&shared.threads).contains_key(&channel) {
        return;
    }
    let parent = match shared.rest.own_thread_parent(msg.channel_id, me.user).await {
        Ok(parent) => parent,
        Err(e) => {
            tracing::debug!(error = %e, "could not look a channel up");
            return;
        }
    };
    let mut threads = lock(&shared.threads);
    if threads.len() >= THREADS_MEMORY {
        threads.retain(|_, parent| parent.is_some());
    }
    threads.insert(channel, parent);
}

async fn on_message(shared: &Arc<Shared>, me: Me, msg: &Message) {
    own_thread(shared, me, msg).await;
    let roles: Vec<u64> = msg
        .member
        .as_ref()
        .map(|m| m.roles.iter().map(|r| r.get()).collect())
        .unwrap_or_default();
    let facts = facts_of(shared, msg, &roles, me);
    match route::judge(&shared.settings, me.user, &facts) {
        Verdict::Ignore => {}
        Verdict::Command(cmd) => {
            let key = session_key_of(shared, &facts);
            let answer = commands::run_text(shared, &key, cmd).await;
            if let Err(e) = shared
                .rest
                .create(msg.channel_id, &answer, Some(msg.id))
                .await
            {
                tracing::warn!(error = %e, "could not answer a text command");
            }
        }
        Verdict::Prompt(prompt) => {
            let in_thread = facts.own_thread_parent.is_some();
            submit(shared, msg, &facts, prompt, in_thread).await
        }
    }
}

fn session_key_of(shared: &Shared, f: &Facts<'_>) -> String {
    route::session_key(shared.settings.scope, f.guild_id, f.channel_id, f.author_id)
}

/// Where the reply goes: a new thread on the message (thread mode, in a
/// guild channel), else the message's channel.
async fn reply_channel(shared: &Shared, msg: &Message, prompt: &str, in_thread: bool) -> u64 {
    if !shared.settings.threads || in_thread || msg.guild_id.is_none() {
        return msg.channel_id.get();
    }
    let name = render::thread_name(prompt);
    match shared.rest.thread(msg.channel_id, msg.id, &name).await {
        Ok(thread) => {
            lock(&shared.threads).insert(thread.get(), Some(msg.channel_id.get()));
            thread.get()
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not open a thread; answering in the channel");
            msg.channel_id.get()
        }
    }
}

/// Whether a new message waits behind another job of its session (or for
/// any worker at all). A pending /reset is the workers' business: the
/// job goes as `continue` and the store decides.
async fn waiting(shared: &Shared, key: &str) -> bool {
    let busy = lock(&shared.sessions)
        .get(key)
        .is_some_and(|s| !s.open_jobs.is_empty());
    let no_worker = shared.publisher.jobs_consumer_count().await.unwrap_or(1) == 0;
    busy || no_worker
}

fn job(
    shared: &Shared,
    job_id: &str,
    key: String,
    prompt: String,
    meta: &ReplyMeta,
    images: Vec<AttachmentV1>,
) -> JobV1 {
    JobV1 {
        v: PROTOCOL_VERSION,
        job_id: Some(job_id.to_string()),
        session_key: key,
        prompt,
        session: SessionSpec {
            mode: SessionMode::Continue,
            ..Default::default()
        },
        profile: Some(shared.settings.profile.clone()),
        options: Default::default(),
        metadata: Some(meta.to_metadata()),
        reply_to: None,
        attachments: (!images.is_empty()).then_some(images),
        // Per-user budgets (the profile's `identity` budget) follow the user.
        identity: Some(format!("discord:user:{}", meta.user_id)),
        // Prompts are answered by the relay (as its AMQP user, which the
        // broker verifies); the relay decides which Discord users may click.
        prompt_answerers: amqp_user(&shared.amqp).map(|u| vec![u]),
    }
}

/// Placeholder, then the job (whose metadata names the placeholder).
async fn submit(
    shared: &Arc<Shared>,
    msg: &Message,
    facts: &Facts<'_>,
    prompt: String,
    in_thread: bool,
) {
    let channel = reply_channel(shared, msg, &prompt, in_thread).await;
    let key = route::session_key(
        shared.settings.scope,
        facts.guild_id,
        channel,
        facts.author_id,
    );
    let waiting = waiting(shared, &key).await;
    let files = shared
        .downloader
        .collect(&msg.attachments, prompt.len())
        .await;
    let prompt = prompt + &files.text;
    let mut first = if waiting {
        render::QUEUED
    } else {
        render::PLACEHOLDER
    }
    .to_string();
    if !files.skipped.is_empty() {
        first = format!("{first}\n{}", render::skipped_files(&files.skipped));
    }
    let Some(channel_id) = Id::new_checked(channel) else {
        return;
    };
    let reply_to = (channel == msg.channel_id.get()).then_some(msg.id);
    let placeholder = match shared.rest.create(channel_id, &first, reply_to).await {
        Ok(id) => id,
        Err(e) => {
            tracing::warn!(error = %e, "could not post a placeholder reply; the message is not answered");
            return;
        }
    };
    let meta = ReplyMeta {
        channel_id: channel,
        message_id: placeholder.get(),
        user_id: facts.author_id,
    };
    // The message id makes the job id: a message seen twice runs once.
    let job_id = format!("discord-{}", msg.id);
    let job = job(shared, &job_id, key.clone(), prompt, &meta, files.images);
    lock(&shared.sessions)
        .entry(key.clone())
        .or_default()
        .open_jobs
        .insert(job_id.clone());
    // The reply task starts now, so typing shows while the job waits.
    let _ = shared.reply_task(&job_id, &meta);
    let sent = shared
        .publisher
        .publish_job_to(&job, &shared.settings.reply_key())
        .await;
    if let Err(e) = sent {
        tracing::warn!(job_id = %job_id, error = %e, "could not publish a job");
        shared.finished(&job_id);
        if let Some(s) = lock(&shared.sessions).get_mut(&key) {
            s.open_jobs.remove(&job_id);
        }
        let failed = "⚠️ Could not queue this message; try again.";
        let _ = shared.rest.edit(channel_id, placeholder, failed).await;
    }
}
