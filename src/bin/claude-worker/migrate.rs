//! `claude-worker migrate`: apply the database migrations and exit.

use anyhow::Context as _;
use claude_worker::config::{redact_db_url, Settings};

pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let url = redact_db_url(settings.database.url.expose());
    let store = claude_worker::store::connect(&settings.database.url, 1)
        .await
        .with_context(|| format!("could not open the database {url}"))?;
    store
        .migrate()
        .await
        .with_context(|| format!("migrating {url} failed"))?;
    println!("database {url} is up to date");
    Ok(())
}
