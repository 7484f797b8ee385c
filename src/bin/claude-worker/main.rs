//! The `claude-worker` binary: thin subcommands over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod ask;
mod cancel;
mod discord;
mod migrate;
mod sessions;
mod submit;
mod worker;

/// Exit codes shared by the client subcommands (see the README).
pub mod exit {
    /// The job completed; the control message was applied.
    pub const OK: u8 = 0;
    /// The job failed, the control message was refused, or the command
    /// itself failed (the message on stderr says which).
    pub const FAILED: u8 = 1;
    /// Invalid usage or configuration.
    pub const USAGE: u8 = 2;
    /// The job was cancelled.
    pub const CANCELLED: u8 = 3;
    /// No worker answered in time.
    pub const NO_ANSWER: u8 = 4;
    /// Interrupted with Ctrl-C and the job's end was not seen.
    pub const INTERRUPTED: u8 = 130;
}

#[derive(Parser)]
#[command(
    name = "claude-worker",
    version,
    about = "Claude Code behind a message queue"
)]
struct Cli {
    /// Extra config file, layered over config/default.toml (also: $CLAUDE_WORKER_CONFIG).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume prompt jobs and run them with the Claude Code CLI.
    Worker,
    /// Run the Discord relay: mentions become jobs, events become replies.
    Discord,
    /// Create or update the database schema, then exit.
    Migrate,
    /// Send a prompt job to the workers and stream the reply.
    Submit(submit::Args),
    /// Cancel a job, or every queued and running job of a session.
    Cancel(cancel::Args),
    /// List, show and forget sessions (reads the worker's database).
    #[command(subcommand)]
    Sessions(sessions::Command),
}

impl Command {
    /// Default log level: the worker logs its progress; the client
    /// commands only warnings, so their output stays readable.
    fn default_log_level(&self) -> &'static str {
        match self {
            Command::Worker | Command::Migrate | Command::Discord => "info",
            _ => "warn",
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match claude_worker::config::Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("claude-worker: {e}");
            return ExitCode::from(exit::USAGE);
        }
    };
    claude_worker::logging::init(settings.log.format, cli.command.default_log_level());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async {
        match cli.command {
            Command::Worker => worker::run(settings).await.map(|()| exit::OK),
            Command::Migrate => migrate::run(settings).await.map(|()| exit::OK),
            Command::Discord => discord::run(settings).await.map(|()| exit::OK),
            Command::Submit(args) => submit::run(settings, args).await,
            Command::Cancel(args) => cancel::run(settings, args).await,
            Command::Sessions(cmd) => sessions::run(settings, cmd).await,
        }
    });
    // Do not wait for blocking tasks (e.g. a stdin reader) at exit.
    runtime.shutdown_background();
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // Logged once, here, where it is handled.
            eprintln!("claude-worker: {e:#}");
            ExitCode::from(exit::FAILED)
        }
    }
}
