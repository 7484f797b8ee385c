//! `claude-worker sessions`: list, show and forget sessions. Reads the
//! database named by `database.url`, the same one the workers use.

use std::sync::Arc;

use anyhow::Context as _;
use claude_worker::config::{redact_db_url, Settings};
use claude_worker::store::{JobRecord, SessionRecord, SessionStore};
use serde_json::{json, Value};

use crate::exit;

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Sessions, most recently active first.
    List {
        /// Only sessions with this status: active, idle, interrupted, closed.
        #[arg(long, value_name = "S")]
        status: Option<String>,
        /// Only sessions of this profile.
        #[arg(long, value_name = "P")]
        profile: Option<String>,
        /// At most this many rows.
        #[arg(long, value_name = "N", default_value_t = 50)]
        limit: i64,
        /// A JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One session's state and its recent jobs.
    Show {
        key: String,
        /// How many recent jobs to show.
        #[arg(long, value_name = "N", default_value_t = 10)]
        jobs: i64,
        #[arg(long)]
        json: bool,
    },
    /// Forget a session's conversation: its next job starts a new Claude session.
    Delete { key: String },
    /// Remove what is past retention (profiles' `retention_secs`): finished
    /// jobs, stored transcripts, answered control requests, published
    /// lifecycle events, this host's CLI transcript files; forget sessions
    /// quiet that long. Waits for no worker: fails if one is pruning now.
    Prune {
        /// Only count what would be removed; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// A JSON object instead of lines.
        #[arg(long)]
        json: bool,
        /// The clock to prune at, Unix ms (tests).
        #[arg(long, hide = true)]
        now_ms: Option<i64>,
    },
}

async fn open(settings: &Settings) -> anyhow::Result<Arc<dyn SessionStore>> {
    let raw = settings.database.url.expose();
    let url = redact_db_url(raw);
    if let Some(path) = raw.strip_prefix("sqlite:") {
        let path = path.trim_start_matches("//");
        let path = path.split('?').next().unwrap_or(path);
        if !path.is_empty() && path != ":memory:" && !std::path::Path::new(path).exists() {
            anyhow::bail!(
                "the database {url} does not exist (no worker has used it). \
                 Set database.url (e.g. CLAUDE_WORKER__DATABASE__URL) to the workers' database"
            );
        }
    }
    claude_worker::store::connect(&settings.database.url, 1)
        .await
        .with_context(|| format!("could not open the database {url}"))
}

pub async fn run(settings: Settings, cmd: Command) -> anyhow::Result<u8> {
    let store = open(&settings).await?;
    match cmd {
        Command::List {
            status,
            profile,
            limit,
            json,
        } => {
            if let Some(s) = &status {
                if claude_worker::store::SessionStatus::parse(s).is_err() {
                    eprintln!("claude-worker sessions list: unknown status {s:?} (active, idle, interrupted, closed)");
                    return Ok(exit::USAGE);
                }
            }
            let filtered = status.is_some() || profile.is_some();
            // Filters are applied here, so read every session when filtering.
            let fetch = if filtered { i64::MAX } else { limit.max(0) };
            let rows: Vec<SessionRecord> = store
                .list_sessions(fetch)
                .await
                .context("reading sessions")?
                .into_iter()
                .filter(|s| status.as_deref().is_none_or(|st| s.status.as_str() == st))
                .filter(|s| profile.as_deref().is_none_or(|p| s.profile == p))
                .take(limit.max(0) as usize)
                .collect();
            if json {
                let v: Vec<Value> = rows.iter().map(session_json).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_table(&rows);
            }
            Ok(exit::OK)
        }
        Command::Show { key, jobs, json } => {
            let Some(s) = store
                .get_session(&key)
                .await
                .context("reading the session")?
            else {
                eprintln!("claude-worker sessions show: no session {key:?}");
                return Ok(exit::FAILED);
            };
            let recent = store
                .list_jobs(&key, jobs.max(0))
                .await
                .context("reading the session's jobs")?;
            if json {
                let mut v = session_json(&s);
                v["jobs"] = recent.iter().map(job_json).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_session(&s, &recent);
            }
            Ok(exit::OK)
        }
        Command::Prune {
            dry_run,
            json,
            now_ms,
        } => prune(&settings, store.as_ref(), dry_run, json, now_ms).await,
        Command::Delete { key } => {
            let found = store
                .forget_session(&key, claude_worker::store::now_ms())
                .await
                .context("forgetting the session")?;
            if found {
                println!("forgot session {key}: its next job starts a new Claude session");
                Ok(exit::OK)
            } else {
                eprintln!("claude-worker sessions delete: no session {key:?}");
                Ok(exit::FAILED)
            }
        }
    }
}

async fn prune(
    settings: &Settings,
    store: &dyn SessionStore,
    dry_run: bool,
    json: bool,
    now_ms: Option<i64>,
) -> anyhow::Result<u8> {
    use claude_worker::worker::retention::{PruneError, Pruner};
    let owner = format!("cli-{}", std::process::id());
    let pruner = Pruner {
        settings,
        store,
        owner: &owner,
    };
    let now_ms = now_ms.unwrap_or_else(claude_worker::store::now_ms);
    // On demand: whenever the last run was.
    let report = match pruner.run(now_ms, std::time::Duration::ZERO, dry_run).await {
        Ok(r) => r,
        Err(PruneError::Busy) => {
            eprintln!("claude-worker sessions prune: a worker is pruning now; try again later");
            return Ok(exit::FAILED);
        }
        Err(e) => return Err(e).context("pruning"),
    };
    if json {
        let mut v = serde_json::to_value(report)?;
        v["dry_run"] = json!(dry_run);
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let verb = if dry_run { "would remove" } else { "removed" };
        for (kind, n) in report.kinds() {
            println!("{verb} {n} {}", kind.replace('_', " "));
        }
    }
    Ok(exit::OK)
}

fn session_json(s: &SessionRecord) -> Value {
    json!({
        "session_key": s.session_key,
        "status": s.status.as_str(),
        "profile": s.profile,
        "claude_session_id": s.claude_session_id,
        "model": s.model,
        "cwd": s.cwd,
        "turns": s.turns,
        "input_tokens": s.input_tokens,
        "output_tokens": s.output_tokens,
        "cost_usd": s.cost_usd,
        "context_tokens": s.context_tokens,
        "context_window": s.context_window,
        "compact_failed_at_ms": s.compact_failed.map(|f| f.0),
        "created_at_ms": s.created_at_ms,
        "updated_at_ms": s.updated_at_ms,
        "last_job_id": s.last_job_id,
        "lease_owner": s.lease_owner,
        "lease_expires_at_ms": s.lease_expires_at_ms,
    })
}

fn job_json(j: &JobRecord) -> Value {
    json!({
        "job_id": j.job_id,
        "status": j.status.as_str(),
        "attempts": j.attempts,
        "error": j.error,
        "cost_usd": j.cost_usd,
        "identity": j.spec.identity,
        "prompt": j.spec.prompt,
        "created_at_ms": j.created_at_ms,
        "started_at_ms": j.started_at_ms,
        "finished_at_ms": j.finished_at_ms,
    })
}

fn print_table(rows: &[SessionRecord]) {
    let header = ["KEY", "STATUS", "PROFILE", "TURNS", "COST", "LAST ACTIVITY"];
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|s| {
            [
                s.session_key.clone(),
                s.status.as_str().to_string(),
                s.profile.clone(),
                s.turns.to_string(),
                format!("${:.4}", s.cost_usd),
                fmt_time(s.updated_at_ms),
            ]
        })
        .collect();
    let mut width = header.map(|h| h.chars().count());
    for row in &cells {
        for (w, c) in width.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |row: &[String]| {
        let mut out = String::new();
        for (i, (c, w)) in row.iter().zip(width).enumerate() {
            if i + 1 == row.len() {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(&header.map(String::from));
    for row in &cells {
        line(row);
    }
    if rows.is_empty() {
        eprintln!("(no sessions)");
    }
}

fn print_session(s: &SessionRecord, jobs: &[JobRecord]) {
    let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    println!("session            {}", s.session_key);
    println!("status             {}", s.status.as_str());
    println!("profile            {}", s.profile);
    println!("claude session id  {}", opt(&s.claude_session_id));
    println!("model              {}", opt(&s.model));
    println!("working directory  {}", opt(&s.cwd));
    println!("turns              {}", s.turns);
    println!(
        "tokens             {} in / {} out",
        s.input_tokens, s.output_tokens
    );
    // The sum of its turns' costs (failed and cancelled ones included).
    println!("cost               ${:.4}", s.cost_usd);
    if let Some(tokens) = s.context_tokens {
        match s.context_window.filter(|w| *w > 0) {
            Some(w) => println!(
                "context            {tokens} / {w} tokens ({:.1}%)",
                tokens as f64 * 100.0 / w as f64
            ),
            None => println!("context            {tokens} tokens"),
        }
    }
    if let Some((at, tokens)) = s.compact_failed {
        // Threshold compaction waits this out (`compact_retry_secs`).
        println!("compaction failed  {} at {tokens} tokens", fmt_time(at));
    }
    println!("created            {}", fmt_time(s.created_at_ms));
    println!("last activity      {}", fmt_time(s.updated_at_ms));
    if let Some(owner) = &s.lease_owner {
        println!(
            "lease              {owner} until {}",
            s.lease_expires_at_ms.map(fmt_time).unwrap_or_default()
        );
    }
    println!();
    if jobs.is_empty() {
        println!("no jobs");
        return;
    }
    println!("recent jobs (oldest first):");
    for j in jobs {
        let took = match (j.started_at_ms, j.finished_at_ms) {
            (Some(a), Some(b)) => format!(" in {:.1} s", (b - a) as f64 / 1000.0),
            _ => String::new(),
        };
        let error = j
            .error
            .as_deref()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        let mut prompt: String = j.spec.prompt.chars().take(60).collect();
        if j.spec.prompt.chars().count() > 60 {
            prompt.push('…');
        }
        println!(
            "  {}  {}  {}{}{} (attempts: {}, ${:.4})  {:?}",
            fmt_time(j.created_at_ms),
            j.job_id,
            j.status.as_str(),
            took,
            error,
            j.attempts,
            j.cost_usd,
            prompt.replace('\n', " ")
        );
    }
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SSZ` (UTC).
fn fmt_time(ms: i64) -> String {
    claude_worker::store::utc_time(ms)
}

#[cfg(test)]
mod tests {
    #[test]
    fn fmt_time_is_utc() {
        assert_eq!(super::fmt_time(0), "1970-01-01 00:00:00Z");
        assert_eq!(super::fmt_time(1_709_210_096_000), "2024-02-29 12:34:56Z");
    }
}
