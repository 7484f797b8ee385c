//! `claude-worker worker`: run until SIGINT/SIGTERM, then stop gracefully.

use anyhow::Context as _;
use claude_worker::config::Settings;
use claude_worker::worker::Worker;
use tokio::signal::unix::{signal, SignalKind};

pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let worker = Worker::start(settings)
        .await
        .context("the worker could not start")?;
    let token = worker.shutdown_token();
    tokio::spawn(async move {
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutdown requested; finishing running turns");
        token.cancel();
    });
    worker.wait().await.map_err(anyhow::Error::msg)
}
