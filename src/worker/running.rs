//! The turns running on this worker, by job id: what a cancel or a control
//! request needs to reach a running turn (its cancel token, the reason,
//! and a channel to its CLI). Depends on nothing else in `worker`, so the
//! `Context` that holds it and the `control` handlers that use it do not
//! depend on each other.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

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
}

/// Why a turn is being cancelled.
#[derive(Debug, Clone)]
pub struct CancelReason {
    pub text: String,
    /// The whole session was cancelled: its queued jobs go too.
    pub session_wide: bool,
}

impl TurnRegistration {
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
        self.lock().insert(
            job_id.to_string(),
            TurnHandle {
                session_key: session_key.to_string(),
                cancel: cancel.clone(),
                reason: Arc::clone(&reason),
                cli: tx,
            },
        );
        TurnRegistration {
            turns: Arc::clone(self),
            job_id: job_id.to_string(),
            cancel,
            reason,
            cli_requests: rx,
        }
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
