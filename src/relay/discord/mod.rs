//! The Discord relay: Discord messages become prompt jobs, their reply
//! events become edited Discord messages. Built only on `client`,
//! `protocol` and `config` (ARCHITECTURE.md); twilight for Discord.
//!
//! Two supervised tasks: the gateway (`gateway.rs`: messages and slash
//! commands in, jobs out) and the events consumer (below: the relay's
//! durable reply queue, routed to one `reply` task per job). Nothing the
//! relay must remember lives only in memory: the job's `metadata` says
//! where its reply is, so a restarted relay finishes what another began.
//! /status and a pending /reset are the workers' (control messages answered
//! from their store); what is in memory (whether a session is busy) is a
//! hint that a restart forgets.

pub mod attach;
pub mod commands;
pub mod gateway;
pub mod prompt;
pub mod render;
pub mod reply;
pub mod rest;
pub mod route;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::client::{Client, ClientError, Incoming, ReplyConsumer};
use crate::config::{AmqpSettings, DiscordSettings, Secret};
use crate::protocol::EventV1;
use rest::Rest;
use route::ReplyMeta;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("the bot token is missing: set ${0} or discord.token_file")]
    NoToken(String),
    #[error("could not read the bot token file {0}: {1}")]
    TokenFile(String, std::io::Error),
    #[error(transparent)]
    Broker(#[from] ClientError),
    #[error("the Discord gateway connection ended: {0}")]
    Gateway(String),
    #[error("the relay's {0} task ended unexpectedly")]
    TaskEnded(&'static str),
}

/// Reads the bot token: `token_file` if set, else `$token_env`.
pub fn load_token(s: &DiscordSettings) -> Result<Secret, RelayError> {
    if let Some(path) = &s.token_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| RelayError::TokenFile(path.display().to_string(), e))?;
        return Ok(Secret::new(text.trim()));
    }
    match std::env::var(&s.token_env) {
        Ok(t) if !t.trim().is_empty() => Ok(Secret::new(t.trim())),
        _ => Err(RelayError::NoToken(s.token_env.clone())),
    }
}

/// The relay's view of one conversation: only a hint (whether a new
/// message waits behind another), which a restart forgets. What /status
/// shows and a pending /reset live in the workers' store.
#[derive(Debug, Clone, Default)]
pub struct SessionInfo {
    /// Jobs published and not yet ended.
    pub open_jobs: HashSet<String>,
}

/// Finished job ids remembered, so a republished terminal event does
/// not post an answer twice.
const FINISHED_MEMORY: usize = 4096;

/// What the relay's tasks share.
pub struct Shared {
    pub settings: DiscordSettings,
    pub amqp: AmqpSettings,
    pub rest: Rest,
    pub downloader: attach::Downloader,
    pub publisher: Client,
    pub shutdown: CancellationToken,
    tasks: TaskTracker,
    replies: Mutex<HashMap<String, mpsc::UnboundedSender<reply::Input>>>,
    finished: Mutex<VecDeque<String>>,
    pub sessions: Mutex<HashMap<String, SessionInfo>>,
    /// Channels looked at in thread mode: a thread the relay opened → its
    /// parent channel; anything else → `None`. Rebuilt from Discord after
    /// a restart (`gateway::own_thread`).
    pub threads: Mutex<HashMap<u64, Option<u64>>>,
    /// Who clicked which prompt, and the questions asked (hints).
    pub prompts: prompt::Book,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking holder leaves plain data behind; go on with it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// The reply task of `job_id`, started if there is none.
    pub fn reply_task(
        self: &Arc<Self>,
        job_id: &str,
        meta: &ReplyMeta,
    ) -> mpsc::UnboundedSender<reply::Input> {
        let mut replies = lock(&self.replies);
        replies.retain(|_, tx| !tx.is_closed());
        if let Some(tx) = replies.get(job_id) {
            return tx.clone();
        }
        let (tx, rx) = mpsc::unbounded_channel();
        replies.insert(job_id.to_string(), tx.clone());
        let shared = Arc::clone(self);
        let (job_id, meta) = (job_id.to_string(), meta.clone());
        self.tasks.spawn(reply::run(shared, job_id, meta, rx));
        tx
    }

    /// The job's reply is done (or abandoned): its task's input closes.
    pub(super) fn finished(&self, job_id: &str) {
        lock(&self.replies).remove(job_id);
        let mut f = lock(&self.finished);
        if f.len() >= FINISHED_MEMORY {
            f.pop_front();
        }
        f.push_back(job_id.to_string());
    }

    fn is_finished(&self, job_id: &str) -> bool {
        lock(&self.finished).iter().any(|j| j == job_id)
    }

    /// A job that ended no longer makes its session busy.
    fn note_event(&self, ev: &EventV1) {
        if !ev.body.is_terminal() {
            return;
        }
        if let Some(s) = lock(&self.sessions).get_mut(&ev.session_key) {
            s.open_jobs.remove(&ev.job_id);
        }
    }
}

/// A running relay.
pub struct Relay {
    shared: Arc<Shared>,
    ended: mpsc::Receiver<Result<&'static str, RelayError>>,
}

impl Relay {
    /// Connects to the broker (publisher and the durable reply queue) and
    /// starts the gateway and the events consumer.
    pub async fn start(
        amqp: AmqpSettings,
        settings: DiscordSettings,
        token: Secret,
    ) -> Result<Relay, RelayError> {
        let publisher = Client::connect(&amqp, &publisher_name(&amqp, &settings)).await?;
        // No prefetch limit: the events of running jobs are held unacked
        // until each job ends (see `consume`); a limit could fill with them
        // and hold back the terminal events that would release them.
        let consumer =
            ReplyConsumer::connect(&amqp, &settings.queue_name, &settings.reply_key(), 0).await?;
        let shared = Arc::new(Shared {
            rest: Rest::new(&settings, &token),
            downloader: attach::Downloader::new(Duration::from_millis(settings.request_timeout_ms)),
            settings,
            amqp,
            publisher,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            replies: Mutex::new(HashMap::new()),
            finished: Mutex::new(VecDeque::new()),
            sessions: Mutex::new(HashMap::new()),
            threads: Mutex::new(HashMap::new()),
            prompts: prompt::Book::default(),
        });
        let (tx, ended) = mpsc::channel(2);
        let gw = gateway::Gateway::new(Arc::clone(&shared), token);
        supervise(&shared, tx.clone(), "gateway", gw.run());
        supervise(
            &shared,
            tx,
            "events",
            consume(Arc::clone(&shared), consumer),
        );
        Ok(Relay { shared, ended })
    }

    /// Cancelled to stop the relay.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shared.shutdown.clone()
    }

    /// Runs until shutdown, or until a task ends (an error: the binary
    /// exits non-zero and its supervisor restarts it).
    pub async fn wait(mut self) -> Result<(), RelayError> {
        let first = tokio::select! {
            r = self.ended.recv() => r,
            _ = self.shared.shutdown.cancelled() => None,
        };
        self.stop().await;
        match first {
            Some(Ok(name)) if !self.shared.shutdown.is_cancelled() => {
                Err(RelayError::TaskEnded(name))
            }
            Some(Err(e)) => Err(e),
            _ => Ok(()),
        }
    }

    /// Stops at once: replies in progress are left to the events (unacked
    /// ones come again to the next relay). The consumer's connection closes
    /// with its task, the publisher's here. Bounded.
    pub async fn stop(&self) {
        self.shared.shutdown.cancel();
        self.shared.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.shared.tasks.wait()).await;
        let close = self.shared.publisher.close_shared();
        let _ = tokio::time::timeout(Duration::from_secs(5), close).await;
    }
}

/// The publisher connection's name on the broker: which relay it is.
pub fn publisher_name(amqp: &AmqpSettings, settings: &DiscordSettings) -> String {
    format!(
        "claude-worker discord ({}.{})",
        amqp.prefix, settings.queue_name
    )
}

/// Runs a long-lived task; its end (or panic) is reported on `ended`.
fn supervise<F>(
    shared: &Arc<Shared>,
    ended: mpsc::Sender<Result<&'static str, RelayError>>,
    name: &'static str,
    task: F,
) where
    F: std::future::Future<Output = Result<(), RelayError>> + Send + 'static,
{
    let handle = shared.tasks.spawn(task);
    shared.tasks.spawn(async move {
        let outcome = match handle.await {
            Ok(Ok(())) => Ok(name),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(RelayError::TaskEnded(name)),
        };
        let _ = ended.send(outcome).await;
    });
}

/// Reads the durable reply queue and hands each event to its job's reply
/// task. Events that are not the relay's (no Discord metadata) or of jobs
/// it has finished are acked and dropped.
async fn consume(shared: Arc<Shared>, mut consumer: ReplyConsumer) -> Result<(), RelayError> {
    let result = loop {
        let next = tokio::select! {
            _ = shared.shutdown.cancelled() => break Ok(()),
            next = consumer.recv(Duration::from_secs(60)) => next,
        };
        let (incoming, ack) = match next {
            Ok(Some(m)) => m,
            Ok(None) => continue,
            Err(e) => break Err(RelayError::Broker(e)),
        };
        let Incoming::Event {
            event, lease_epoch, ..
        } = incoming
        else {
            let _ = ack.ack().await;
            continue;
        };
        let meta = ReplyMeta::from_metadata(&event.metadata);
        let Some(meta) = meta.filter(|_| !shared.is_finished(&event.job_id)) else {
            let _ = ack.ack().await;
            continue;
        };
        // Every event of a job stays unacked until its terminal event is
        // shown (the reply task acks them then): a relay restarted
        // mid-answer is sent the whole answer so far again, and its live
        // view resumes with all of it, not a tail. (The queue is read
        // without a prefetch limit, so held events never stop the
        // terminal events that release them.)
        let tx = shared.reply_task(&event.job_id, &meta);
        let input = reply::Input {
            event,
            lease_epoch,
            ack: Some(ack),
        };
        // A reply task that ended drops its input unacked; it comes again.
        let _ = tx.send(input);
    };
    consumer.close().await;
    result
}
