//! `claude-worker submit`: publish one prompt job and stream its reply.
//!
//! Human output: the answer's text on stdout as it arrives, tool calls on
//! their own (dimmed) lines, notices and a closing summary on stderr. On a
//! terminal the text streams live; when stdout is not a terminal, each
//! attempt's output is held back and written once the job completes, so a
//! pipe gets exactly the final answer and never the partial text of an
//! attempt that was retried. `--json` writes every event, as received, one
//! per line. Permission prompts (a profile with `permission_prompts =
//! "ask"`) are answered as `ask` says: on a terminal the person decides;
//! otherwise `--allow-tools` approves, and everything else is denied.

use std::io::{IsTerminal, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use claude_worker::client::{Client, ClientError, Incoming, JobTracker, Step};
use claude_worker::config::Settings;
use claude_worker::protocol::{
    ControlBody, EventBody, EventV1, JobOptions, JobV1, OnBusy, PermissionMode, SessionMode,
    SessionSpec, PROTOCOL_VERSION,
};

use crate::ask::{Asker, PromptView};
use crate::exit;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Session key (the conversation). Default: `cli:$USER`.
    #[arg(long, value_name = "KEY")]
    session: Option<String>,
    /// Start a new conversation for the key.
    #[arg(long, group = "mode")]
    new: bool,
    /// Resume this Claude session id (a UUID).
    #[arg(long, value_name = "ID", group = "mode")]
    resume: Option<String>,
    /// Fork this Claude session id into a new one.
    #[arg(long, value_name = "ID", group = "mode")]
    fork: Option<String>,
    /// Profile configured on the worker (default: `default`).
    #[arg(long, value_name = "P")]
    profile: Option<String>,
    /// Model, if the profile allows it.
    #[arg(long, value_name = "M")]
    model: Option<String>,
    /// Agentic turns, at most the profile's cap.
    #[arg(long, value_name = "N")]
    max_turns: Option<u32>,
    /// Permission mode: plan, dontAsk, default, acceptEdits, auto, bypassPermissions.
    #[arg(long, value_name = "M", value_parser = parse_mode)]
    permission_mode: Option<PermissionMode>,
    /// If the session is busy: enqueue, interrupt or reject.
    #[arg(long, value_name = "P", value_parser = parse_on_busy)]
    on_busy: Option<OnBusy>,
    /// Cost cap of this turn in USD (at most the profile's).
    #[arg(long, value_name = "USD")]
    max_budget_usd: Option<f64>,
    /// Compact the session's context before this turn.
    #[arg(long)]
    compact: bool,
    /// Whose budget the job spends (the profile's per-identity budget).
    #[arg(long, value_name = "ID")]
    identity: Option<String>,
    /// Job id (default: a new UUID). Publishing the same id again is safe:
    /// a finished job answers with its terminal event instead of running again.
    #[arg(long, value_name = "ID")]
    job_id: Option<String>,
    /// Print the events as JSON lines, exactly as received.
    #[arg(long)]
    json: bool,
    /// Tools approved without asking when Claude asks for permission
    /// (comma-separated or repeated; `*` for every tool). Without a
    /// terminal, any other tool call that asks is denied.
    #[arg(long = "allow-tools", value_name = "TOOLS")]
    allow_tools: Vec<String>,
    /// Seconds to wait for the first event before giving up (exit 4).
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    timeout: u64,
    /// Seconds to wait for the `cancelled` event after Ctrl-C.
    #[arg(long, value_name = "SECS", default_value_t = 5, hide = true)]
    cancel_wait: u64,
    /// The prompt; read from standard input when absent.
    prompt: Option<String>,
}

fn parse_mode(s: &str) -> Result<PermissionMode, String> {
    serde_json::from_value(serde_json::Value::String(s.into())).map_err(|_| {
        "expected one of plan, dontAsk, default, acceptEdits, auto, bypassPermissions".into()
    })
}

fn parse_on_busy(s: &str) -> Result<OnBusy, String> {
    serde_json::from_value(serde_json::Value::String(s.into()))
        .map_err(|_| "expected one of enqueue, interrupt, reject".into())
}

fn usage(msg: impl std::fmt::Display) -> anyhow::Result<u8> {
    eprintln!("claude-worker submit: {msg}");
    Ok(exit::USAGE)
}

pub async fn run(settings: Settings, args: Args) -> anyhow::Result<u8> {
    let prompt = match &args.prompt {
        Some(p) => p.clone(),
        None if std::io::stdin().is_terminal() => {
            return usage("give the prompt as an argument or on standard input")
        }
        None => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading the prompt from standard input")?;
            s
        }
    };
    let session_key = args.session.clone().unwrap_or_else(|| {
        format!(
            "cli:{}",
            std::env::var("USER").unwrap_or_else(|_| "default".into())
        )
    });
    let session = match (&args.new, &args.resume, &args.fork) {
        (true, _, _) => SessionSpec {
            mode: SessionMode::New,
            claude_session_id: None,
        },
        (_, Some(id), _) => SessionSpec {
            mode: SessionMode::Resume,
            claude_session_id: Some(id.clone()),
        },
        (_, _, Some(id)) => SessionSpec {
            mode: SessionMode::Fork,
            claude_session_id: Some(id.clone()),
        },
        _ => SessionSpec::default(),
    };
    let job = JobV1 {
        v: PROTOCOL_VERSION,
        job_id: Some(
            args.job_id
                .clone()
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        ),
        session_key,
        prompt,
        session,
        profile: args.profile.clone(),
        options: JobOptions {
            model: args.model.clone(),
            max_turns: args.max_turns,
            permission_mode: args.permission_mode,
            on_busy: args.on_busy,
            max_budget_usd: args.max_budget_usd,
            compact: args.compact.then_some(true),
        },
        metadata: None,
        reply_to: None,
        attachments: None,
        identity: args.identity.clone(),
        prompt_answerers: None,
    };
    let body = serde_json::to_vec(&job)?;
    if let Err(e) = claude_worker::protocol::decode_job(&body) {
        return usage(e);
    }

    let mut client = Client::connect(&settings.amqp, "claude-worker submit").await?;
    let start = Instant::now();
    let job_id = match client.publish_job(&job).await {
        Ok(id) => id,
        Err(ClientError::Invalid(m)) => return usage(m),
        Err(e) => return Err(e).context("publishing the job"),
    };
    let consumers = client.jobs_consumer_count().await.unwrap_or(0);
    tracing::debug!(%job_id, reply_key = client.reply_key(), consumers, "job published");

    let code = stream(&mut client, &args, &job_id, start, consumers).await;
    client.close().await;
    code
}

/// Reads the job's events until its terminal one (or a timeout, or Ctrl-C).
async fn stream(
    client: &mut Client,
    args: &Args,
    job_id: &str,
    start: Instant,
    consumers: u32,
) -> anyhow::Result<u8> {
    let mut tracker = JobTracker::new(job_id);
    let mut out = Renderer::new(args.json);
    let asker = Arc::new(Asker::new(&args.allow_tools));
    let spinner = Spinner::start();
    let first_deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout);
    let mut got_first = false;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let wait = if got_first {
            Duration::from_secs(3600)
        } else {
            first_deadline.saturating_duration_since(tokio::time::Instant::now())
        };
        let incoming = tokio::select! {
            r = client.recv(wait) => r?,
            _ = &mut ctrl_c => {
                spinner.stop();
                out.break_line();
                return cancel_on_interrupt(client, args, &mut tracker, &mut out, start).await;
            }
        };
        let Some(incoming) = incoming else {
            if got_first {
                continue;
            }
            spinner.stop();
            let queue = &client.topology().jobs_queue;
            if consumers == 0 {
                eprintln!(
                    "claude-worker submit: no worker answered within {} s: nothing consumes the queue {queue}. \
                     Start one with `claude-worker worker`. The job ({job_id}) stays queued and runs when a worker starts.",
                    args.timeout
                );
            } else {
                eprintln!(
                    "claude-worker submit: no event within {} s for job {job_id}, though {consumers} worker(s) consume {queue}; \
                     it may be queued behind the session's running turn. Check with `claude-worker sessions show`.",
                    args.timeout
                );
            }
            return Ok(exit::NO_ANSWER);
        };
        let (raw, event, lease_epoch) = match incoming {
            Incoming::Event {
                raw,
                event,
                lease_epoch,
            } => (raw, event, lease_epoch),
            Incoming::ControlResult { result, .. } => {
                if !result.ok {
                    eprintln!("[answer not taken: {}]", result.message);
                }
                continue;
            }
            _ => continue,
        };
        let step = tracker.accept(&event, lease_epoch);
        if step == Step::Skip {
            continue;
        }
        if !got_first {
            got_first = true;
            spinner.stop();
        }
        out.event(&raw, &event, &step);
        if step == Step::Terminal {
            return Ok(finish(&event, &mut out, start));
        }
        if let EventBody::PermissionRequest { .. } = &event.body {
            out.break_line();
            answer_prompt(client, &asker, &event).await;
        }
    }
}

/// Answers a `permission_request` (asking on the terminal, if there is one).
async fn answer_prompt(client: &Client, asker: &Arc<Asker>, event: &EventV1) {
    let EventBody::PermissionRequest {
        request_id,
        tool_name,
        summary,
        questions,
        ..
    } = &event.body
    else {
        return;
    };
    let (asker, job_id) = (Arc::clone(asker), event.job_id.clone());
    let (request_id, tool_name) = (request_id.clone(), tool_name.clone());
    let (summary, questions) = (summary.clone(), questions.clone());
    // Reading the terminal blocks: off the async threads.
    let answer = tokio::task::spawn_blocking(move || {
        asker.answer(&PromptView {
            job_id: &job_id,
            request_id: &request_id,
            tool_name: &tool_name,
            summary: &summary,
            questions: questions.as_deref(),
        })
    })
    .await;
    let Ok(answer) = answer else {
        return;
    };
    if let Err(e) = client
        .publish_control(ControlBody::PermissionResponse(answer))
        .await
    {
        eprintln!("claude-worker submit: could not send the answer: {e}");
    }
}

/// Ctrl-C: ask the workers to cancel the job, then wait briefly for its
/// terminal event. A second Ctrl-C gives up at once.
async fn cancel_on_interrupt(
    client: &mut Client,
    args: &Args,
    tracker: &mut JobTracker,
    out: &mut Renderer,
    start: Instant,
) -> anyhow::Result<u8> {
    let job_id = tracker.job_id().to_string();
    eprintln!("cancelling job {job_id}… (Ctrl-C again to stop waiting)");
    let request_id = match client
        .publish_control(ControlBody::Cancel {
            job_id: Some(job_id.clone()),
            session_key: None,
            reason: Some("cancelled from the terminal (Ctrl-C)".into()),
        })
        .await
    {
        Ok(id) => id,
        Err(e) => {
            eprintln!("claude-worker submit: could not send the cancel: {e}");
            return Ok(exit::INTERRUPTED);
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.cancel_wait);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let incoming = tokio::select! {
            r = client.recv(left) => r?,
            _ = &mut ctrl_c => None,
        };
        match incoming {
            None => {
                eprintln!(
                    "claude-worker submit: the job did not end within {} s of the cancel; it may still be running (job {job_id})",
                    args.cancel_wait
                );
                return Ok(exit::INTERRUPTED);
            }
            Some(Incoming::ControlResult { result, .. }) if result.request_id == request_id => {
                if !result.ok {
                    eprintln!(
                        "cancel: {} ({})",
                        result.message,
                        serde_json::to_value(result.outcome)?
                            .as_str()
                            .unwrap_or_default()
                    );
                }
            }
            Some(Incoming::Event {
                raw,
                event,
                lease_epoch,
            }) => {
                let step = tracker.accept(&event, lease_epoch);
                if step == Step::Skip {
                    continue;
                }
                out.event(&raw, &event, &step);
                if step == Step::Terminal {
                    return Ok(finish(&event, out, start));
                }
            }
            Some(_) => {}
        }
    }
}

/// Prints the outcome of a terminal event and returns the exit code.
fn finish(event: &EventV1, out: &mut Renderer, start: Instant) -> u8 {
    let wall = start.elapsed().as_secs_f64();
    match &event.body {
        EventBody::Completed {
            usage,
            total_cost_usd,
            num_turns,
            ..
        } => {
            out.flush_answer();
            let tokens = |k: &str| usage.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
            let input = tokens("input_tokens")
                + tokens("cache_read_input_tokens")
                + tokens("cache_creation_input_tokens");
            eprintln!(
                "── completed: {num_turns} turn{} · {input} in / {} out tokens · ${total_cost_usd:.4} · {wall:.1} s",
                if *num_turns == 1 { "" } else { "s" },
                tokens("output_tokens"),
            );
            exit::OK
        }
        EventBody::Failed {
            error,
            message,
            retryable,
        } => {
            let kind = serde_json::to_value(error)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            eprintln!(
                "── failed ({kind}{}) after {wall:.1} s: {message}",
                if *retryable {
                    ", retryable: sending it again later may succeed"
                } else {
                    ""
                }
            );
            exit::FAILED
        }
        EventBody::Cancelled { reason } => {
            eprintln!("── cancelled after {wall:.1} s: {reason}");
            exit::CANCELLED
        }
        _ => exit::FAILED,
    }
}

/// Writes events for people (or raw JSON lines with `--json`).
struct Renderer {
    json: bool,
    /// Stream live (stdout is a terminal) or hold each attempt back.
    live: bool,
    dim: bool,
    /// Whether the last thing written to stdout ended a line.
    at_line_start: bool,
    /// The current attempt's output, when not live.
    held: String,
}

impl Renderer {
    fn new(json: bool) -> Renderer {
        let tty = std::io::stdout().is_terminal();
        Renderer {
            json,
            live: tty,
            dim: tty && std::env::var_os("NO_COLOR").is_none(),
            at_line_start: true,
            held: String::new(),
        }
    }

    fn write(&mut self, s: &str) {
        if s.is_empty() {
            return;
        }
        self.at_line_start = s.ends_with('\n');
        if self.live {
            let mut o = std::io::stdout().lock();
            let _ = o.write_all(s.as_bytes());
            let _ = o.flush();
        } else {
            self.held.push_str(s);
        }
    }

    /// Ends the current line if something is on it.
    fn break_line(&mut self) {
        if !self.json && !self.at_line_start {
            self.write("\n");
        }
    }

    fn event(&mut self, raw: &str, event: &EventV1, step: &Step) {
        if self.json {
            let mut o = std::io::stdout().lock();
            let _ = writeln!(o, "{raw}");
            let _ = o.flush();
            return;
        }
        match &event.body {
            EventBody::Started {
                resume_failed: Some(why),
                ..
            } => eprintln!("note: {why}"),
            EventBody::Text { text } => self.write(text),
            EventBody::ToolUse {
                name,
                input_summary,
            } => {
                self.break_line();
                let line = format!("⚙ {name} {input_summary}");
                if self.dim {
                    self.write(&format!("\x1b[2m{line}\x1b[0m\n"));
                } else {
                    self.write(&format!("{line}\n"));
                }
            }
            EventBody::TextReset { .. } => {
                if self.live {
                    self.break_line();
                    eprintln!("[the API stream was cut: the answer is restated below]");
                } else {
                    self.held.clear();
                    self.at_line_start = true;
                }
            }
            EventBody::Retrying {
                next_attempt,
                reason,
                ..
            } => {
                if self.live {
                    self.break_line();
                    if let Step::Retry { discarded } = step {
                        if !discarded.is_empty() {
                            eprintln!("[the partial answer above is discarded]");
                        }
                    }
                } else {
                    self.held.clear();
                    self.at_line_start = true;
                }
                eprintln!("[retrying: attempt {next_attempt} follows ({reason})]");
            }
            EventBody::Compacted {
                trigger,
                pre_tokens,
                post_tokens,
            } => {
                if self.live {
                    self.break_line();
                }
                let why = format!("{trigger:?}").to_lowercase();
                eprintln!("[context compacted ({why}): {pre_tokens} → {post_tokens} tokens]");
            }
            EventBody::PermissionResolved {
                by: claude_worker::protocol::ResolvedBy::Timeout,
                ..
            } => {
                self.break_line();
                eprintln!("[the permission prompt expired: denied]");
            }
            EventBody::Failed { .. } | EventBody::Cancelled { .. } => {
                // What the failed attempt said is not an answer.
                if self.live {
                    self.break_line();
                } else {
                    self.held.clear();
                }
            }
            _ => {}
        }
    }

    /// Writes the held answer (when not live) and ends the last line.
    fn flush_answer(&mut self) {
        if self.json {
            return;
        }
        self.break_line();
        if !self.live {
            let mut o = std::io::stdout().lock();
            let _ = o.write_all(self.held.as_bytes());
            let _ = o.flush();
            self.held.clear();
        }
    }
}

/// A spinner on stderr while waiting for the first event (terminals only).
struct Spinner {
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Spinner {
    fn start() -> Spinner {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::io::stderr().is_terminal().then(|| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                const FRAMES: [&str; 10] = ["⠋", "⠙", "⠹", "⠸", "⠼", "⠴", "⠦", "⠧", "⠇", "⠏"];
                let started = Instant::now();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    eprint!(
                        "\r{} waiting for a worker… {}s",
                        FRAMES[i % FRAMES.len()],
                        started.elapsed().as_secs()
                    );
                    i += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                eprint!("\r\x1b[2K");
            })
        });
        Spinner {
            stop,
            thread: Mutex::new(thread),
        }
    }

    /// Stops the spinner and clears its line (idempotent).
    fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.lock().unwrap().take() {
            let _ = t.join();
        }
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.stop();
    }
}
