//! Helpers for running the real Claude Code CLI against [`MockApi`].

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use super::mock_api::MockApi;

/// Upper bound for one CLI run in tests.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(90);

const DEFAULT_BIN: &str = "/root/.cache/claude-cli/node_modules/.bin/claude";

/// The Claude Code CLI: `$CLAUDE_BIN`, else the pinned install `.ci/run`
/// makes in the repo (`.cache/claude-cli`), else the one under
/// `/root/.cache/claude-cli`, else `claude` from `PATH`.
pub fn claude_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("CLAUDE_BIN").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let in_repo =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/claude-cli/node_modules/.bin/claude");
    if in_repo.exists() {
        return in_repo;
    }
    if Path::new(DEFAULT_BIN).exists() {
        return PathBuf::from(DEFAULT_BIN);
    }
    PathBuf::from("claude")
}

/// The standard arguments for a stream-json session: the worker's own.
pub const STREAM_ARGS: &[&str] = claude_worker::STREAM_JSON_ARGS;

/// A stream-json user message line.
pub fn user_line(text: &str) -> String {
    serde_json::json!({"type": "user", "message": {"role": "user", "content": text}}).to_string()
}

/// A `claude` command pointed at `mock`, with a clean environment, `HOME`
/// and cwd at `home`, `CLAUDE_CONFIG_DIR=<home>/.claude`, and
/// `CLAUDE_CODE_MAX_RETRIES=0` (override with `.env(..)`). Arguments after
/// `STREAM_ARGS` are `args`.
pub fn cli_command(mock: &MockApi, home: &Path, args: &[&str]) -> Command {
    cli_command_at(&mock.base_url(), home, args)
}

/// [`cli_command`] for the Messages API at `api_url`.
pub fn cli_command_at(api_url: &str, home: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(claude_bin());
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("CLAUDE_CONFIG_DIR", home.join(".claude"))
        .env("ANTHROPIC_BASE_URL", api_url)
        .env("ANTHROPIC_API_KEY", "sk-test")
        .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
        .env("CLAUDE_CODE_MAX_RETRIES", "0")
        .current_dir(home)
        .args(STREAM_ARGS)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

fn parse_line(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|_| Value::String(line.to_string()))
}

/// Runs the CLI once (see [`cli_command`]), writes `stdin_lines` and closes
/// stdin, and returns its exit status, its stdout lines parsed as JSON (a
/// line that is not JSON becomes a `Value::String`), and its stderr.
/// Panics if it runs longer than [`CLI_TIMEOUT`].
pub async fn run_cli(
    mock: &MockApi,
    home: &Path,
    args: &[&str],
    stdin_lines: &[String],
) -> (ExitStatus, Vec<Value>, String) {
    run_cli_with_env(mock, home, args, stdin_lines, &[]).await
}

/// [`run_cli`] with extra environment variables (e.g.
/// `("CLAUDE_CODE_MAX_RETRIES", "1")`).
pub async fn run_cli_with_env(
    mock: &MockApi,
    home: &Path,
    args: &[&str],
    stdin_lines: &[String],
    env: &[(&str, &str)],
) -> (ExitStatus, Vec<Value>, String) {
    let mut cmd = cli_command(mock, home, args);
    cmd.envs(env.iter().copied());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {:?}: {e}", claude_bin()));
    write_stdin(&mut child, stdin_lines).await;
    let out = tokio::time::timeout(CLI_TIMEOUT, child.wait_with_output())
        .await
        .expect("claude CLI timed out")
        .expect("wait for claude CLI");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines = stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(parse_line)
        .collect();
    (
        out.status,
        lines,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn write_stdin(child: &mut Child, stdin_lines: &[String]) {
    let mut stdin = child.stdin.take().expect("piped stdin");
    for line in stdin_lines {
        stdin.write_all(line.as_bytes()).await.expect("write stdin");
        stdin.write_all(b"\n").await.expect("write stdin");
    }
    stdin.shutdown().await.expect("close stdin");
}

/// A running CLI whose stdout is read line by line as it arrives.
pub struct CliProcess {
    pub child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    /// Every stdout line read so far.
    pub seen: Vec<Value>,
}

impl CliProcess {
    /// Spawns `cmd` (e.g. from [`cli_command`]), writes `stdin_lines`, and
    /// closes stdin.
    pub async fn spawn(mut cmd: Command, stdin_lines: &[String]) -> CliProcess {
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {:?}: {e}", claude_bin()));
        write_stdin(&mut child, stdin_lines).await;
        let stdout = child.stdout.take().expect("piped stdout");
        CliProcess {
            child,
            lines: BufReader::new(stdout).lines(),
            seen: Vec::new(),
        }
    }

    /// Reads stdout until a line satisfies `pred` and returns it; panics on
    /// EOF or after `timeout`.
    pub async fn read_until(&mut self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let fut = async {
            loop {
                match self.lines.next_line().await.expect("read CLI stdout") {
                    Some(l) if l.trim().is_empty() => {}
                    Some(l) => {
                        let v = parse_line(&l);
                        self.seen.push(v.clone());
                        if pred(&v) {
                            return v;
                        }
                    }
                    None => panic!("CLI stdout ended; lines so far: {:#?}", self.seen),
                }
            }
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(v) => v,
            Err(_) => panic!(
                "no matching CLI line within {timeout:?}; lines: {:#?}",
                self.seen
            ),
        }
    }

    /// Reads the rest of stdout and waits for exit; returns the status, all
    /// stdout lines (including those already seen) and stderr.
    pub async fn finish(mut self, timeout: Duration) -> (ExitStatus, Vec<Value>, String) {
        let fut = async {
            while let Some(l) = self.lines.next_line().await.expect("read CLI stdout") {
                if !l.trim().is_empty() {
                    self.seen.push(parse_line(&l));
                }
            }
            let mut stderr = String::new();
            if let Some(mut e) = self.child.stderr.take() {
                let _ = e.read_to_string(&mut stderr).await;
            }
            let status = self.child.wait().await.expect("wait for CLI");
            (status, stderr)
        };
        let (status, stderr) = tokio::time::timeout(timeout, fut)
            .await
            .expect("CLI did not exit in time");
        (status, self.seen, stderr)
    }
}

/// The last `{"type":"result"}` line.
pub fn result_line(lines: &[Value]) -> Option<&Value> {
    lines.iter().rev().find(|l| l["type"] == "result")
}

/// The `session_id` of the first line that has one.
pub fn session_id(lines: &[Value]) -> Option<String> {
    lines
        .iter()
        .find_map(|l| l["session_id"].as_str().map(str::to_string))
}

/// Is this a `stream_event` carrying a `text_delta`?
pub fn is_text_delta(line: &Value) -> bool {
    line["type"] == "stream_event" && line["event"]["delta"]["type"] == "text_delta"
}

/// The text of every `text_delta` stream event, concatenated.
pub fn text_deltas(lines: &[Value]) -> String {
    lines
        .iter()
        .filter(|l| is_text_delta(l))
        .filter_map(|l| l["event"]["delta"]["text"].as_str())
        .collect()
}
