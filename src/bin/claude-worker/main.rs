//! The `claude-worker` binary: thin subcommands over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod migrate;
mod worker;

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
    /// Create or update the database schema, then exit.
    Migrate,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match claude_worker::config::Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("claude-worker: {e}");
            return ExitCode::from(2);
        }
    };
    init_tracing(settings.log.format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async {
        match cli.command {
            Command::Worker => worker::run(settings).await,
            Command::Migrate => migrate::run(settings).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Logged once, here, where it is handled.
            eprintln!("claude-worker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: claude_worker::config::LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        claude_worker::config::LogFormat::Json => builder.json().init(),
        claude_worker::config::LogFormat::Text => builder.init(),
    }
}
