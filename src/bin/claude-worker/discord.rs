//! `claude-worker discord`: run the Discord relay until SIGINT/SIGTERM.

use anyhow::Context as _;
use claude_worker::config::Settings;
use claude_worker::relay::discord::{load_token, Relay};
use tokio::signal::unix::{signal, SignalKind};

pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let token = load_token(&settings.discord)?;
    let relay = Relay::start(settings.amqp, settings.discord, token)
        .await
        .context("the Discord relay could not start")?;
    let stop = relay.shutdown_token();
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutdown requested; stopping the relay");
        stop.cancel();
    });
    relay.wait().await?;
    Ok(())
}
