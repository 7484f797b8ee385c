//! Drives one Claude Code CLI process through one turn. The only module
//! that spawns processes.
//!
//! The CLI runs as `claude -p --input-format stream-json --output-format
//! stream-json --verbose --include-partial-messages …` in its own process
//! group, with a clean environment. The prompt goes in on stdin as a
//! stream-json user message (never on argv); stdout lines are parsed into
//! [`CliMessage`]s. Dropping a [`CliProcess`] kills its whole process group,
//! and the child also gets SIGKILL if the worker dies (PR_SET_PDEATHSIG),
//! so no CLI outlives the worker that spawned it.

use std::collections::VecDeque;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::mpsc;

use super::command::{cli_args, cli_env, user_message_line, SpawnError, TurnRequest};
use super::cost::CostMeter;
use super::paths::{ensure_transcript, transcript_path};
use super::stream::{parse_value, truncate_chars, CliMessage};
use crate::config::{ClaudeSettings, Profile};

/// How much of the CLI's stderr is kept for error messages.
const STDERR_KEEP_BYTES: usize = 8 * 1024;

/// A running CLI process. Dropping it kills the process group.
///
/// Writing to its stdin never blocks the caller: lines go to a writer task
/// that owns the pipe. A CLI that stops reading (a prompt is up to 1 MB; a
/// pipe holds 64 KiB) therefore cannot hold a turn past its deadline,
/// cancel, lease loss or shutdown: those are all watched while the turn
/// waits for the CLI's output, and they kill the process, which ends the
/// writer.
pub struct CliProcess {
    child: Child,
    pgid: Option<i32>,
    /// Lines for the writer task; `None` once stdin is closed.
    stdin: Option<mpsc::UnboundedSender<Vec<u8>>>,
    /// Set when writing to the pipe failed (the CLI is gone).
    stdin_broken: Arc<AtomicBool>,
    writer_task: Option<tokio::task::JoinHandle<()>>,
    stdout: Lines<BufReader<ChildStdout>>,
    stderr: Arc<Mutex<VecDeque<u8>>>,
    stderr_task: Option<tokio::task::JoinHandle<()>>,
    /// Per-turn costs and context use of its results (see `claude::cost`).
    cost: CostMeter,
}

impl CliProcess {
    /// Spawns the CLI for `req` and writes the prompt to its stdin.
    pub async fn spawn(
        settings: &ClaudeSettings,
        profile: &Profile,
        req: &TurnRequest,
    ) -> Result<CliProcess, SpawnError> {
        std::fs::create_dir_all(&req.cwd).map_err(|source| SpawnError::Workdir {
            path: req.cwd.display().to_string(),
            source,
        })?;
        let env = cli_env(&settings.env_passthrough, profile);
        let cost = transcript_and_meter(&env, req);
        let mut cmd = Command::new(&settings.path);
        cmd.args(cli_args(req, profile))
            .current_dir(&req.cwd)
            .env_clear()
            .envs(env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                // The child dies with the worker even on SIGKILL.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| SpawnError::Io {
            path: settings.path.display().to_string(),
            source,
        })?;
        let pgid = child.id().map(|p| p as i32);
        let stdin_broken = Arc::new(AtomicBool::new(false));
        let (stdin, writer_task) = match child.stdin.take() {
            Some(pipe) => {
                let (tx, rx) = mpsc::unbounded_channel();
                let task = tokio::spawn(write_lines(pipe, rx, Arc::clone(&stdin_broken)));
                (Some(tx), Some(task))
            }
            None => (None, None),
        };
        let stdout = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
        let stderr_buf = Arc::new(Mutex::new(VecDeque::new()));
        let stderr_task = child.stderr.take().map(|mut err| {
            let buf = Arc::clone(&stderr_buf);
            tokio::spawn(async move {
                let mut chunk = [0u8; 4096];
                while let Ok(n) = err.read(&mut chunk).await {
                    if n == 0 {
                        break;
                    }
                    let mut b = buf.lock().unwrap_or_else(|p| p.into_inner());
                    b.extend(&chunk[..n]);
                    let excess = b.len().saturating_sub(STDERR_KEEP_BYTES);
                    b.drain(..excess);
                }
            })
        });
        let proc = CliProcess {
            child,
            pgid,
            stdin,
            stdin_broken,
            writer_task,
            stdout,
            stderr: stderr_buf,
            stderr_task,
            cost,
        };
        Ok(proc)
    }

    pub fn pid(&self) -> Option<u32> {
        self.pgid.map(|p| p as u32)
    }

    /// Starts a turn: writes a user message to the CLI's stdin. The CLI
    /// answers with `init`, the turn's messages and a `result`; it then
    /// waits for the next user message until stdin is closed.
    pub fn send_user_message(&mut self, req: &TurnRequest) {
        self.write_stdin(&user_message_line(req));
    }

    /// Sends a stream-json control request (`interrupt`,
    /// `set_permission_mode`, `set_model`, …); returns its request id. The
    /// CLI answers with a `control_response` line carrying that id.
    pub fn send_control_request(&mut self, request: Value) -> String {
        let request_id = uuid::Uuid::new_v4().to_string();
        let mut line =
            json!({"type": "control_request", "request_id": request_id, "request": request})
                .to_string();
        line.push('\n');
        self.write_stdin(&line);
        request_id
    }

    /// Queues a line for the CLI's stdin; never waits. A CLI that died
    /// shows up as a missing result, so a failed write is not reported here
    /// (see [`try_send_user_message`](Self::try_send_user_message)).
    pub fn write_stdin(&mut self, line: &str) {
        if let Some(stdin) = &self.stdin {
            let _ = stdin.send(line.as_bytes().to_vec());
        }
    }

    /// Closes stdin: the CLI ends once the current turn is done (the writer
    /// task writes what is queued, then closes the pipe).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// The next stdout message; `None` at end of output. Non-JSON lines are
    /// logged and skipped.
    pub async fn next_message(&mut self) -> Option<CliMessage> {
        loop {
            match self.stdout.next_line().await {
                Ok(Some(line)) => {
                    if line.trim().is_empty() {
                        continue;
                    }
                    match serde_json::from_str::<Value>(&line) {
                        Ok(v) => return Some(self.message(&v)),
                        Err(_) => {
                            tracing::debug!(line = %truncate_chars(&line, 300), "non-JSON line from the CLI");
                        }
                    }
                }
                Ok(None) => return None,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the CLI's stdout failed");
                    return None;
                }
            }
        }
    }

    /// One stdout message; a result gets its turn's cost and context use.
    fn message(&mut self, v: &Value) -> CliMessage {
        self.cost.observe(v);
        match parse_value(v) {
            CliMessage::Result(mut r) => {
                self.cost.on_result(&mut r, v);
                CliMessage::Result(r)
            }
            msg => msg,
        }
    }

    /// What the turns of this process cost since the last call (every
    /// result counts once, also one read while interrupting).
    pub fn take_cost(&mut self) -> f64 {
        self.cost.take()
    }

    /// The tail of what the CLI wrote to stderr.
    pub async fn stderr_tail(&mut self) -> String {
        // Give the reader a moment to drain what the process wrote last.
        if let Some(task) = self.stderr_task.take() {
            let _ = tokio::time::timeout(Duration::from_millis(500), task).await;
        }
        let b = self.stderr.lock().unwrap_or_else(|p| p.into_inner());
        let bytes: Vec<u8> = b.iter().copied().collect();
        String::from_utf8_lossy(&bytes).trim().to_string()
    }

    /// Waits for the process to exit after its turn, killing the group if
    /// it lingers past `grace`. Returns the exit description.
    pub async fn finish(&mut self, grace: Duration) -> String {
        self.close_stdin();
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(Ok(status)) => {
                self.kill_group();
                status.to_string()
            }
            Ok(Err(e)) => format!("wait failed: {e}"),
            Err(_) => {
                self.kill_group();
                let _ = self.child.wait().await;
                format!(
                    "did not exit within {} ms and was killed",
                    grace.as_millis()
                )
            }
        }
    }

    /// Interrupts the running turn gently, then harder: the stream-json
    /// `interrupt` control request (the CLI ends the turn with a result and
    /// keeps the session resumable; it gets `answer_within`), then SIGINT,
    /// then SIGTERM and SIGKILL, each after `grace`. Returns true if the
    /// CLI ended the turn on request.
    pub async fn interrupt(&mut self, answer_within: Duration, grace: Duration) -> bool {
        self.send_control_request(json!({"subtype": "interrupt"}));
        let ended = tokio::time::timeout(answer_within, async {
            while let Some(msg) = self.next_message().await {
                if matches!(msg, CliMessage::Result(_)) {
                    return true;
                }
            }
            false
        })
        .await
        .unwrap_or(false);
        if ended {
            self.finish(grace).await;
            return true;
        }
        if let Some(pid) = self.pgid {
            // SAFETY: plain syscall on our child.
            unsafe { libc::kill(pid, libc::SIGINT) };
        }
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            self.terminate(grace).await;
        }
        self.kill_group();
        false
    }

    /// Stops the process: SIGTERM to the group, then SIGKILL after `grace`.
    pub async fn terminate(&mut self, grace: Duration) {
        self.close_stdin();
        if let Some(pgid) = self.pgid {
            // SAFETY: plain syscall on a process group we created.
            unsafe { libc::killpg(pgid, libc::SIGTERM) };
        }
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            self.kill_group();
            let _ = self.child.wait().await;
        }
        self.kill_group();
    }

    /// Starts a turn like [`send_user_message`](Self::send_user_message),
    /// but reports a CLI that is gone (a closed pipe) instead of leaving it
    /// to show up as a missing result.
    pub fn try_send_user_message(&mut self, req: &TurnRequest) -> std::io::Result<()> {
        let gone = self.stdin_broken.load(Ordering::SeqCst)
            || self.has_exited()
            || self
                .stdin
                .as_ref()
                .is_none_or(|tx| tx.send(user_message_line(req).into_bytes()).is_err());
        if gone {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        Ok(())
    }

    /// Whether the process has exited (it is reaped if so).
    pub fn has_exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// Closes an idle process gracefully: stdin is closed (the CLI ends and
    /// flushes its transcript), then the group gets SIGTERM after `grace`
    /// and SIGKILL after another `grace`. Returns how it ended.
    pub async fn close(&mut self, grace: Duration) -> &'static str {
        self.close_stdin();
        let how = match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(_) => "exited",
            Err(_) => {
                if let Some(pgid) = self.pgid {
                    // SAFETY: plain syscall on a process group we created.
                    unsafe { libc::killpg(pgid, libc::SIGTERM) };
                }
                match tokio::time::timeout(grace, self.child.wait()).await {
                    Ok(_) => "terminated",
                    Err(_) => {
                        self.kill_group();
                        let _ = self.child.wait().await;
                        "killed"
                    }
                }
            }
        };
        // Tools the CLI left behind in its group.
        self.kill_group();
        how
    }

    fn kill_group(&mut self) {
        if let Some(pgid) = self.pgid {
            // The CLI's own children (tools, shells) are in its group too.
            // SAFETY: plain syscall; the group id stays reserved while any member lives.
            unsafe { libc::killpg(pgid, libc::SIGKILL) };
        }
    }
}

/// Makes a resumed session's transcript visible from its cwd, and the
/// process's cost meter: a resumed or forked session's running total
/// starts from what that transcript saved.
fn transcript_and_meter(
    env: &std::collections::BTreeMap<String, String>,
    req: &TurnRequest,
) -> CostMeter {
    let Some(id) = &req.resume else {
        return CostMeter::new(None);
    };
    // Best effort: if it fails the CLI reports the session missing and the
    // caller starts a new one.
    if let Err(e) = ensure_transcript(env, &req.cwd, id) {
        tracing::warn!(error = %e, claude_session_id = %id, "could not make the transcript available");
    }
    CostMeter::new(transcript_path(env, &req.cwd, id))
}

/// The writer task: writes queued lines to the CLI's stdin until the
/// queue is closed (then the pipe is closed: EOF for the CLI) or a write
/// fails (the CLI is gone).
async fn write_lines(
    mut pipe: ChildStdin,
    mut lines: mpsc::UnboundedReceiver<Vec<u8>>,
    broken: Arc<AtomicBool>,
) {
    while let Some(line) = lines.recv().await {
        if pipe.write_all(&line).await.is_err() || pipe.flush().await.is_err() {
            broken.store(true, Ordering::SeqCst);
            return;
        }
    }
}

impl Drop for CliProcess {
    fn drop(&mut self) {
        self.kill_group();
        if let Some(task) = self.writer_task.take() {
            task.abort();
        }
    }
}
