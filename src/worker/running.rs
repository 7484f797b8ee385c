//! The turns running on this worker, by job id: what a cancel or a control
//! request needs to reach a running turn (its cancel token, the reason,
//! and a channel to its CLI). Depends on nothing else in `worker`, so the
//! `Context` that holds it and the `control` handlers that use it do not
//! depend on each other.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::protocol::PermissionResponseV1;

/// Turns running on this worker, by job id.
#[derive(Default)]
pub struct RunningTurns {
    map: Mutex<HashMap<String, TurnHandle>>,
}

struct TurnHandle {
    session_key: String,
    cancel: CancellationToken,
    reason: Arc<Mutex<Option<CancelReason>>>,
    cli: mpsc::UnboundedSender<Value>,
    prompts: Arc<Mutex<PromptBook>>,
    answers: mpsc::UnboundedSender<PermissionResponseV1>,
}

/// A turn's permission prompts: the open ones, and the last settled ones
/// (so a late answer is told "already settled", not "unknown"). An answer
/// reaches the turn only while its prompt is open, once.
#[derive(Default)]
pub struct PromptBook {
    open: HashSet<String>,
    settled: VecDeque<String>,
    /// AMQP users who may answer (empty: anyone).
    answerers: Vec<String>,
}

/// How many settled prompt ids a turn remembers.
const SETTLED_KEEP: usize = 64;

impl PromptBook {
    fn settle(&mut self, id: &str) -> bool {
        let was_open = self.open.remove(id);
        if was_open {
            self.settled.push_back(id.to_string());
            if self.settled.len() > SETTLED_KEEP {
                self.settled.pop_front();
            }
        }
        was_open
    }
}

/// What became of a `permission_response` on this worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerDelivery {
    /// The job does not run here.
    NotHere,
    /// It reached its open prompt.
    Delivered,
    /// The prompt was already answered, timed out or cancelled.
    AlreadySettled,
    /// The job runs here but has no such prompt.
    Unknown,
    /// The answer's AMQP user may not answer this job's prompts.
    NotAllowed,
}

/// A running job's side of the registry; unregisters on drop.
pub struct TurnRegistration {
    turns: Arc<RunningTurns>,
    job_id: String,
    /// Cancelled when the job is to be cancelled.
    pub cancel: CancellationToken,
    reason: Arc<Mutex<Option<CancelReason>>>,
    /// Control requests for the job's CLI (e.g. `set_permission_mode`).
    pub cli_requests: mpsc::UnboundedReceiver<Value>,
    prompts: Arc<Mutex<PromptBook>>,
    /// Answers to the job's open permission prompts.
    pub prompt_answers: mpsc::UnboundedReceiver<PermissionResponseV1>,
}

/// Why a turn is being cancelled.
#[derive(Debug, Clone)]
pub struct CancelReason {
    pub text: String,
    /// The whole session was cancelled: its queued jobs go too.
    pub session_wide: bool,
}

impl TurnRegistration {
    fn book(&self) -> std::sync::MutexGuard<'_, PromptBook> {
        self.prompts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Only these AMQP users may answer the job's prompts (empty: anyone).
    pub fn answered_by(self, answerers: Vec<String>) -> Self {
        self.book().answerers = answerers;
        self
    }

    /// A prompt is published: answers for `id` may now reach the turn.
    pub fn open_prompt(&self, id: &str) {
        self.book().open.insert(id.to_string());
    }

    /// Settles a prompt (timed out, cancelled, or answered); true if it
    /// was still open, i.e. this call settled it.
    pub fn settle_prompt(&self, id: &str) -> bool {
        self.book().settle(id)
    }

    pub fn cancel_reason(&self) -> CancelReason {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| CancelReason {
                text: "cancelled by request".into(),
                session_wide: false,
            })
    }
}

impl Drop for TurnRegistration {
    fn drop(&mut self) {
        self.turns.lock().remove(&self.job_id);
    }
}

impl RunningTurns {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, TurnHandle>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn register(self: &Arc<Self>, job_id: &str, session_key: &str) -> TurnRegistration {
        let cancel = CancellationToken::new();
        let reason = Arc::new(Mutex::new(None));
        let (tx, rx) = mpsc::unbounded_channel();
        let (answers, prompt_answers) = mpsc::unbounded_channel();
        let prompts = Arc::new(Mutex::new(PromptBook::default()));
        self.lock().insert(
            job_id.to_string(),
            TurnHandle {
                session_key: session_key.to_string(),
                cancel: cancel.clone(),
                reason: Arc::clone(&reason),
                cli: tx,
                prompts: Arc::clone(&prompts),
                answers,
            },
        );
        TurnRegistration {
            turns: Arc::clone(self),
            job_id: job_id.to_string(),
            cancel,
            reason,
            cli_requests: rx,
            prompts,
            prompt_answers,
        }
    }

    /// Hands a person's answer to the job's open prompt, if the job runs
    /// here. The prompt is settled under the same lock, so two answers
    /// (or an answer and the timeout) never both count.
    /// `user` is the answer's broker-verified AMQP `user_id`.
    pub fn answer_prompt(
        &self,
        answer: PermissionResponseV1,
        user: Option<&str>,
    ) -> AnswerDelivery {
        let map = self.lock();
        let Some(h) = map.get(&answer.job_id) else {
            return AnswerDelivery::NotHere;
        };
        let mut book = h.prompts.lock().unwrap_or_else(|p| p.into_inner());
        let allowed = book.answerers.is_empty()
            || user.is_some_and(|u| book.answerers.iter().any(|a| a == u));
        if !allowed {
            return AnswerDelivery::NotAllowed;
        }
        if book.settled.contains(&answer.request_id) {
            return AnswerDelivery::AlreadySettled;
        }
        if !book.open.contains(&answer.request_id) {
            return AnswerDelivery::Unknown;
        }
        book.settle(&answer.request_id);
        // The turn still holds its receiver while it is registered.
        let _ = h.answers.send(answer);
        AnswerDelivery::Delivered
    }

    /// Cancels the job if it runs here; true if it did.
    pub fn cancel_job(&self, job_id: &str, reason: &str) -> bool {
        self.cancel(job_id, reason, false)
    }

    fn cancel(&self, job_id: &str, reason: &str, session_wide: bool) -> bool {
        match self.lock().get(job_id) {
            Some(h) => {
                h.reason
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert_with(|| CancelReason {
                        text: reason.to_string(),
                        session_wide,
                    });
                h.cancel.cancel();
                true
            }
            None => false,
        }
    }

    /// Cancels the session's running job if it runs here.
    pub fn cancel_session(&self, session_key: &str, reason: &str) -> Vec<String> {
        let ids: Vec<String> = self
            .lock()
            .iter()
            .filter(|(_, h)| h.session_key == session_key)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &ids {
            self.cancel(id, reason, true);
        }
        ids
    }

    /// Forwards a control request to the CLI of the session's running turn.
    pub fn send_to_session(&self, session_key: &str, request: Value) -> bool {
        let map = self.lock();
        let mut sent = false;
        for h in map.values().filter(|h| h.session_key == session_key) {
            sent |= h.cli.send(request.clone()).is_ok();
        }
        sent
    }
}
