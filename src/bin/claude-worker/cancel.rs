//! `claude-worker cancel`: ask the workers to cancel a job, or every
//! queued and running job of a session, and print their answer.

use std::time::Duration;

use anyhow::Context as _;
use claude_worker::client::{Client, ClientError};
use claude_worker::config::Settings;
use claude_worker::protocol::ControlBody;

use crate::exit;

#[derive(clap::Args, Debug)]
#[command(group = clap::ArgGroup::new("target").required(true).args(["job_id", "session"]))]
pub struct Args {
    /// The job to cancel.
    job_id: Option<String>,
    /// Cancel every queued and running job of this session key instead.
    #[arg(long, value_name = "KEY")]
    session: Option<String>,
    /// Seconds to wait for the answer (exit 4 without one).
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    timeout: u64,
    /// Print the control_result as received (JSON).
    #[arg(long)]
    json: bool,
}

pub async fn run(settings: Settings, args: Args) -> anyhow::Result<u8> {
    let body = ControlBody::Cancel {
        job_id: args.job_id.clone(),
        session_key: args.session.clone(),
        reason: None,
    };
    let mut client = Client::connect(&settings.amqp, "claude-worker cancel").await?;
    let request_id = match client.publish_control(body).await {
        Ok(id) => id,
        Err(ClientError::Unroutable(m)) => {
            eprintln!("claude-worker cancel: {m}");
            client.close().await;
            return Ok(exit::NO_ANSWER);
        }
        Err(ClientError::Invalid(m)) => {
            eprintln!("claude-worker cancel: {m}");
            client.close().await;
            return Ok(exit::USAGE);
        }
        Err(e) => return Err(e).context("publishing the cancel"),
    };
    let answer = wait(&mut client, &request_id, args.timeout, args.json).await;
    client.close().await;
    answer
}

async fn wait(
    client: &mut Client,
    request_id: &str,
    timeout: u64,
    json: bool,
) -> anyhow::Result<u8> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match client.recv(left).await? {
            None => {
                eprintln!(
                    "claude-worker cancel: no answer within {timeout} s (control exchange {}); \
                     is a worker running? Start one with `claude-worker worker`.",
                    client.topology().control_exchange
                );
                return Ok(exit::NO_ANSWER);
            }
            Some(claude_worker::client::Incoming::ControlResult {
                raw,
                result,
                correlation_id,
            }) if result.request_id == request_id
                || correlation_id.as_deref() == Some(request_id) =>
            {
                let outcome = serde_json::to_value(result.outcome)?;
                if json {
                    println!("{raw}");
                } else {
                    let target = match (&result.job_id, &result.session_key) {
                        (Some(j), _) => format!("job {j}"),
                        (None, Some(k)) => format!("session {k}"),
                        _ => String::new(),
                    };
                    println!(
                        "{}: {}{}{}",
                        outcome.as_str().unwrap_or_default(),
                        target,
                        if target.is_empty() { "" } else { ": " },
                        result.message
                    );
                }
                return Ok(if result.ok { exit::OK } else { exit::FAILED });
            }
            Some(_) => {}
        }
    }
}
