//! One warm process: what it was started with and last saw, whether it can
//! run a job, and setting a job's model and permission mode on it.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;

use crate::claude::{self, CliMessage, CliProcess, TurnRequest};
use crate::config::Profile;
use crate::protocol::PermissionMode;

/// How long a warm process may take to start a turn (its `init` line)
/// after the user message, and to answer a control request, before it is
/// considered hung and replaced by a cold start.
pub const WARM_RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Grace for each step of closing a warm process (stdin closed → SIGTERM →
/// SIGKILL).
pub const CLOSE_GRACE: Duration = Duration::from_secs(3);

/// What the database says of a session, as far as reusing its warm process
/// goes: which Claude session it continues and which job ran its last turn
/// (anywhere in the fleet).
#[derive(Debug, Clone, Default)]
pub struct SessionView {
    pub claude_session_id: Option<String>,
    pub last_job_id: Option<String>,
}

/// An idle CLI process and what it was started with and last saw.
pub struct WarmProcess {
    pub proc: CliProcess,
    pub session_key: String,
    pub profile: String,
    pub cwd: PathBuf,
    /// The CLI flags that cannot change on a running process.
    pub fixed_args: Vec<String>,
    /// The model and permission mode the process currently runs with.
    pub model: Option<String>,
    pub permission_mode: PermissionMode,
    /// The Claude session the process continues.
    pub claude_session_id: String,
    /// The last job whose turn the process ran.
    pub last_job_id: String,
    /// Turns the process has run.
    pub turns: u64,
}

impl WarmProcess {
    pub fn new(
        proc: CliProcess,
        session_key: &str,
        profile_name: &str,
        profile: &Profile,
        req: &TurnRequest,
        claude_session_id: String,
        last_job_id: &str,
    ) -> WarmProcess {
        WarmProcess {
            proc,
            session_key: session_key.to_string(),
            profile: profile_name.to_string(),
            cwd: req.cwd.clone(),
            fixed_args: fixed_args(req, profile),
            model: req.options.model.clone(),
            permission_mode: req.options.permission_mode,
            claude_session_id,
            last_job_id: last_job_id.to_string(),
            turns: 1,
        }
    }

    /// Why this process cannot run `req`, if it cannot (before control
    /// requests: model and permission mode may still differ).
    pub fn mismatch(
        &self,
        profile_name: &str,
        profile: &Profile,
        req: &TurnRequest,
        session: Option<&SessionView>,
    ) -> Option<&'static str> {
        if self.profile != profile_name {
            return Some("profile changed");
        }
        if self.cwd != req.cwd {
            return Some("working directory changed");
        }
        if req.fork {
            return Some("fork");
        }
        if req.resume.as_deref() != Some(self.claude_session_id.as_str()) {
            return Some("another Claude session");
        }
        let Some(session) = session else {
            return Some("session unknown");
        };
        if session.claude_session_id.as_deref() != Some(self.claude_session_id.as_str())
            || session.last_job_id.as_deref() != Some(self.last_job_id.as_str())
        {
            return Some("stale: the session ran a turn elsewhere");
        }
        if req.options.max_budget_usd.is_some() {
            // The CLI counts --max-budget-usd over the whole process.
            return Some("a per-turn cost cap needs a process of its own");
        }
        if self.fixed_args != fixed_args(req, profile) {
            return Some("CLI flags changed");
        }
        if req.options.model.is_none() && self.model.is_some() {
            return Some("model reset to the default");
        }
        None
    }
}

/// The CLI flags of `req` that a running process cannot change: everything
/// but the session to resume, the model and the permission mode (the last
/// two are set with control requests).
pub fn fixed_args(req: &TurnRequest, profile: &Profile) -> Vec<String> {
    let mut r = req.clone();
    r.prompt = String::new();
    r.resume = None;
    r.fork = false;
    r.options.model = None;
    r.options.permission_mode = PermissionMode::Default;
    // A session's warm process holds its grants in memory already.
    r.session_grants.clear();
    claude::cli_args(&r, profile)
}

/// Sets the model and permission mode a job asks for on a warm process
/// with control requests, and waits for the answers.
pub(super) async fn prepare(warm: &mut WarmProcess, req: &TurnRequest) -> Result<(), String> {
    let mut pending = Vec::new();
    if req.options.permission_mode != warm.permission_mode {
        let mode = req.options.permission_mode.to_string();
        let id = warm
            .proc
            .send_control_request(json!({"subtype": "set_permission_mode", "mode": mode}));
        pending.push((id, "set_permission_mode"));
    }
    if let Some(model) = &req.options.model {
        if warm.model.as_ref() != Some(model) {
            let id = warm
                .proc
                .send_control_request(json!({"subtype": "set_model", "model": model}));
            pending.push((id, "set_model"));
        }
    }
    let deadline = tokio::time::Instant::now() + WARM_RESPONSE_TIMEOUT;
    while !pending.is_empty() {
        let msg = tokio::time::timeout_at(deadline, warm.proc.next_message())
            .await
            .map_err(|_| "no answer to a control request".to_string())?;
        match msg {
            Some(CliMessage::ControlResponse { request_id, error }) => {
                if let Some(i) = pending.iter().position(|(id, _)| *id == request_id) {
                    let (_, what) = pending.remove(i);
                    if let Some(e) = error {
                        return Err(format!("{what} failed: {e}"));
                    }
                }
            }
            None => return Err("the process exited".into()),
            Some(CliMessage::Other) => {}
            Some(other) => return Err(format!("unexpected output between turns: {other:?}")),
        }
    }
    warm.permission_mode = req.options.permission_mode;
    warm.model = req.options.model.clone();
    Ok(())
}
