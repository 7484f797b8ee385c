//! The worker's own cost per turn (`cargo bench --bench fastpath`), with a
//! stand-in CLI so that only the worker is measured.
//!
//! The stand-in is this bench's own executable: started with the CLI's
//! arguments (`--output-format …`, or `--version`) it speaks stream-json
//! like Claude Code 2.1.330 does for one text answer — `system/init`, the
//! partial-message stream events with `STANDIN_DELTAS` text deltas, the
//! `assistant` message, `result` — answers control requests, and appends
//! each turn to its transcript file, at next to no cost. It is never used
//! in behaviour tests (they run the real CLI).
//!
//! Measured, for 20 and 200 deltas per turn, SQLite and PostgreSQL, 1 and 2
//! worker processes: `SESSIONS` sessions × `TURNS` turns, every session's
//! next turn published when its previous one completed, all sessions at
//! once. Reported: turns/s, events/s and deltas/s (wall time, first publish
//! to last `completed`), worker CPU per turn (utime+stime of the worker
//! processes, not the stand-in's), and — on PostgreSQL — database commits
//! per turn (`pg_stat_database.xact_commit` of the run's database, which
//! counts every transaction, reads included, from the end of the warm-up
//! to the last `completed`, when the workers are stopped: a session's idle
//! affinity window after its last turn is not in it).
//!
//! `FASTPATH_BASELINE_BIN=/path/to/claude-worker` runs an older build the
//! same way in the same run, so the report can give ratios.
//! `FASTPATH_SESSIONS`, `FASTPATH_TURNS` change the load;
//! `FASTPATH_ONLY=sqlite|postgres` narrows it; `FASTPATH_RUST_LOG` sets
//! the workers' `RUST_LOG` (default `warn`; e.g. `warn,sqlx::query=debug`
//! lists every statement on stderr, to count them per turn).

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)] // its unit tests' imports
mod common;

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::world::{self, Bus, Reply, WorkerPlace};
use serde_json::{json, Value};
use tokio::process::Child;
use tokio::sync::mpsc;

const RUN_LIMIT: Duration = Duration::from_secs(300);
/// Longer than Postgres backends wait between reports of their counts.
const STATS_FLUSH: Duration = Duration::from_millis(1500);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--version") {
        println!("2.1.330 (Claude Code; fastpath stand-in)");
        return;
    }
    if args.iter().any(|a| a == "--output-format") {
        standin::run(&args);
        return;
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(bench());
}

/// The stand-in CLI: one process serves a session's turns, like a warm
/// Claude Code process in stream-json mode.
mod standin {
    use super::*;

    pub fn run(args: &[String]) {
        let deltas: usize = std::env::var("STANDIN_DELTAS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20);
        let resume = args
            .iter()
            .find_map(|a| a.strip_prefix("--resume="))
            .map(str::to_string);
        let fork = args.iter().any(|a| a == "--fork-session");
        let session_id = match (&resume, fork) {
            (Some(id), false) => id.clone(),
            _ => uuid::Uuid::new_v4().to_string(),
        };
        let transcript = transcript_path(&session_id);
        let stdin = std::io::stdin();
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        let mut turn = 0u64;
        for line in stdin.lock().lines() {
            let Ok(line) = line else { return };
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            match v["type"].as_str() {
                Some("user") => {
                    turn += 1;
                    // Like the real CLI, the transcript is written before
                    // the `result` the worker stores it after.
                    append_transcript(transcript.as_deref(), &line, turn, deltas);
                    answer(&mut out, &session_id, turn, deltas);
                }
                Some("control_request") => {
                    let reply = json!({"type": "control_response", "response": {
                        "subtype": "success", "request_id": v["request_id"], "response": {}}});
                    let _ = writeln!(out, "{reply}");
                    let _ = out.flush();
                }
                _ => {}
            }
        }
    }

    fn answer(out: &mut impl Write, session_id: &str, turn: u64, deltas: usize) {
        let msg_id = format!("msg_standin_{turn}");
        let mut lines = vec![
            json!({"type": "system", "subtype": "init", "session_id": session_id,
                   "model": "stand-in", "permissionMode": "default", "tools": []}),
            stream(
                session_id,
                &msg_id,
                json!({"type": "message_start", "message": {
                "id": msg_id, "type": "message", "role": "assistant", "model": "stand-in",
                "content": [], "usage": {"input_tokens": 10, "output_tokens": 1}}}),
            ),
            stream(
                session_id,
                &msg_id,
                json!({"type": "content_block_start", "index": 0,
                "content_block": {"type": "text", "text": ""}}),
            ),
        ];
        let mut text = String::new();
        for i in 0..deltas {
            let piece = format!("w{i} ");
            text.push_str(&piece);
            lines.push(stream(
                session_id,
                &msg_id,
                json!({"type": "content_block_delta",
                "index": 0, "delta": {"type": "text_delta", "text": piece}}),
            ));
        }
        let usage = json!({"input_tokens": 10, "cache_creation_input_tokens": 0,
                           "cache_read_input_tokens": 0, "output_tokens": deltas});
        lines.push(stream(
            session_id,
            &msg_id,
            json!({"type": "content_block_stop", "index": 0}),
        ));
        lines.push(
            json!({"type": "assistant", "parent_tool_use_id": null, "session_id": session_id,
            "message": {"id": msg_id, "type": "message", "role": "assistant", "model": "stand-in",
                        "content": [{"type": "text", "text": text}], "usage": usage}}),
        );
        lines.push(stream(
            session_id,
            &msg_id,
            json!({"type": "message_delta",
            "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": deltas}}),
        ));
        lines.push(stream(session_id, &msg_id, json!({"type": "message_stop"})));
        let cost = 0.0001 * deltas as f64;
        let model_usage = json!({"stand-in": {"inputTokens": 10, "outputTokens": deltas,
            "cacheReadInputTokens": 0, "cacheCreationInputTokens": 0, "costUSD": cost,
            "contextWindow": 200000}});
        lines.push(
            json!({"type": "result", "subtype": "success", "is_error": false,
            "duration_ms": 0, "num_turns": 1, "result": text, "session_id": session_id,
            "total_cost_usd": cost * turn as f64, "usage": usage,
            "modelUsage": model_usage, "model_usage_since_last_result": model_usage}),
        );
        // Line by line, as the CLI writes them.
        for l in lines {
            let _ = writeln!(out, "{l}");
            let _ = out.flush();
        }
    }

    fn stream(session_id: &str, msg_id: &str, event: Value) -> Value {
        json!({"type": "stream_event", "event": event, "parent_tool_use_id": null,
               "session_id": session_id, "api_message_id": msg_id})
    }

    /// Where Claude Code keeps the transcript: `<config dir>/projects/<cwd
    /// with every non-alphanumeric char as '-'>/<session id>.jsonl`.
    fn transcript_path(session_id: &str) -> Option<PathBuf> {
        let config = std::env::var("CLAUDE_CONFIG_DIR")
            .map(PathBuf::from)
            .or_else(|_| std::env::var("HOME").map(|h| Path::new(&h).join(".claude")))
            .ok()?;
        let cwd = std::env::current_dir().ok()?;
        let dir: String = cwd
            .to_string_lossy()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        Some(
            config
                .join("projects")
                .join(dir)
                .join(format!("{session_id}.jsonl")),
        )
    }

    fn append_transcript(path: Option<&Path>, user_line: &str, turn: u64, deltas: usize) {
        let Some(path) = path else { return };
        let _ = std::fs::create_dir_all(path.parent().unwrap());
        let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        else {
            return;
        };
        let answer = json!({"type": "assistant", "turn": turn, "text": "w ".repeat(deltas)});
        let _ = writeln!(f, "{user_line}\n{answer}");
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "Postgres",
        }
    }
}

struct Load {
    sessions: usize,
    turns: usize,
    deltas: usize,
    workers: usize,
    backend: Backend,
}

struct Figures {
    turns: usize,
    events: usize,
    text_events: usize,
    wall: Duration,
    worker_cpu_ms: f64,
    commits: Option<i64>,
}

impl Figures {
    fn line(&self, label: &str, load: &Load) -> String {
        let secs = self.wall.as_secs_f64();
        let commits = match self.commits {
            Some(c) => format!("{:.1}", c as f64 / self.turns as f64),
            None => "-".into(),
        };
        format!(
            "| {label} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.2} | {:.1} | {commits} |",
            load.backend.name(),
            load.workers,
            load.deltas,
            self.turns as f64 / secs,
            self.events as f64 / secs,
            (self.turns * load.deltas) as f64 / secs,
            self.worker_cpu_ms / self.turns as f64,
            self.text_events as f64 / self.turns as f64,
        )
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn bench() {
    let sessions = env_usize("FASTPATH_SESSIONS", 30);
    let turns = env_usize("FASTPATH_TURNS", 5);
    let only = std::env::var("FASTPATH_ONLY").unwrap_or_default();
    let mut builds = vec![(
        "this build".to_string(),
        PathBuf::from(env!("CARGO_BIN_EXE_claude-worker")),
    )];
    if let Ok(base) = std::env::var("FASTPATH_BASELINE_BIN") {
        builds.insert(0, ("baseline".to_string(), PathBuf::from(base)));
    }
    let me = std::env::current_exe().unwrap();
    println!(
        "fastpath: {sessions} sessions x {turns} turns, all at once; load average at start: {}",
        load_average()
    );
    println!("| build | store | workers | deltas/turn | turns/s | events/s | deltas/s | worker CPU ms/turn | text events/turn | DB commits/turn |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for backend in [Backend::Sqlite, Backend::Postgres] {
        if !only.is_empty() && !backend.name().eq_ignore_ascii_case(&only) {
            continue;
        }
        for workers in [1, 2] {
            for deltas in [20, 200] {
                if backend == Backend::Sqlite && workers == 2 {
                    continue; // one SQLite file is one worker's
                }
                let load = Load {
                    sessions,
                    turns,
                    deltas,
                    workers,
                    backend,
                };
                for (label, bin) in &builds {
                    let f = run(&load, bin, &me).await;
                    println!("{}", f.line(label, &load));
                }
            }
        }
    }
    println!("load average at end: {}", load_average());
}

fn label_is_baseline(bin: &Path) -> bool {
    std::env::var_os("FASTPATH_BASELINE_BIN").is_some_and(|b| Path::new(&b) == bin)
}

/// A baseline build predates the fast path's settings and refuses keys it
/// does not know: leave them out of its config (it has their behaviour
/// off anyway).
fn drop_new_settings(config: &Path) {
    const NEW: [&str; 5] = [
        "publish_channels",
        "max_unconfirmed_events",
        "text_coalesce_ms",
        "compact_retry_secs",
        "prompt_roles",
    ];
    let text = std::fs::read_to_string(config).unwrap();
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            !NEW.iter()
                .any(|k| l.trim_start().starts_with(&format!("{k} =")))
        })
        .collect();
    std::fs::write(config, kept.join("\n") + "\n").unwrap();
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

async fn run(load: &Load, bin: &Path, standin: &Path) -> Figures {
    let id = world::world_id();
    let dir = tempfile::tempdir().unwrap();
    let db_name = format!("cw_fast_{}", &id[..16]);
    let db_url = match load.backend {
        Backend::Postgres => world::create_database(&db_name).await,
        Backend::Sqlite => format!("sqlite:{}", dir.path().join("cw.db").display()),
    };
    let bus = Bus::new("cwbench", &id).await;
    let mut replies = bus.replies().await;
    let home = dir.path().join("home");
    let place = WorkerPlace {
        prefix: &bus.prefix,
        db_url: &db_url,
        api_url: "http://127.0.0.1:9",
        home: &home,
        work: &dir.path().join("work"),
        marker: &id,
    };
    let mut settings = world::worker_settings(&place);
    settings.claude.path = standin.to_path_buf();
    settings.claude.warm_max_processes = load.sessions + 4;
    settings.worker.max_concurrent_turns = load.sessions;
    settings.database.max_connections = 8;
    settings.amqp.prefetch = (load.sessions * 2) as u16;
    for profile in settings.profiles.values_mut() {
        profile.env.insert(
            "STANDIN_DELTAS".into(),
            claude_worker::config::Secret::new(load.deltas.to_string()),
        );
    }
    let mut children: Vec<Child> = Vec::new();
    for w in 0..load.workers {
        let mut s = settings.clone();
        s.worker.id = format!("fast-{w}");
        let config = dir.path().join(format!("worker-{w}.toml"));
        world::write_config(&s, &config);
        if label_is_baseline(bin) {
            drop_new_settings(&config);
        }
        let mut std_cmd = std::process::Command::new(bin);
        std_cmd
            .arg("--config")
            .arg(&config)
            .arg("worker")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", &home)
            .env("CLAUDE_CONFIG_DIR", home.join(".claude"))
            .env(
                "RUST_LOG",
                std::env::var("FASTPATH_RUST_LOG").unwrap_or("warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let mut cmd = tokio::process::Command::from(std_cmd);
        cmd.kill_on_drop(true);
        children.push(cmd.spawn().expect("worker starts"));
    }
    bus.wait_for_consumers(load.workers as u32).await;
    // One warm-up turn per session starts its process; measured from there.
    drive(&bus, &mut replies, load.sessions, 1).await;
    // Postgres backends report their counts at most once a second: let the
    // warm-up's reach `pg_stat_database` before reading where the run starts.
    tokio::time::sleep(STATS_FLUSH).await;
    let pids: Vec<i32> = children.iter().map(|c| c.id().unwrap() as i32).collect();
    let cpu_before: f64 = pids.iter().map(|p| cpu_ms(*p)).sum();
    let commits_before = commits(load.backend, &db_name).await;
    let began = Instant::now();
    let (events, text_events) = drive(&bus, &mut replies, load.sessions, load.turns).await;
    let wall = began.elapsed();
    let cpu_after: f64 = pids.iter().map(|p| cpu_ms(*p)).sum();
    // The run ends at its last `completed`: stop the workers there (their
    // backends report their counts as they exit), then read.
    for c in &mut children {
        let _ = c.start_kill();
        let _ = c.wait().await;
    }
    tokio::time::sleep(STATS_FLUSH).await;
    let commits_after = commits(load.backend, &db_name).await;
    bus.delete().await;
    if load.backend == Backend::Postgres {
        world::drop_database(&db_name).await;
    }
    Figures {
        turns: load.sessions * load.turns,
        events,
        text_events,
        wall,
        worker_cpu_ms: cpu_after - cpu_before,
        commits: commits_before.zip(commits_after).map(|(b, a)| a - b),
    }
}

/// Runs `turns` turns on each of `sessions` sessions (a session's next job
/// goes out when its previous one completed). Returns the events and the
/// `text` events received.
async fn drive(
    bus: &Bus,
    replies: &mut mpsc::UnboundedReceiver<Reply>,
    sessions: usize,
    turns: usize,
) -> (usize, usize) {
    let mut left = vec![turns; sessions];
    let mut job_session = std::collections::HashMap::new();
    for (s, n) in left.iter_mut().enumerate() {
        let job = bus.publish_job(&format!("s{s}"), "go", json!({})).await;
        job_session.insert(job, s);
        *n -= 1;
    }
    let mut open = sessions;
    let (mut events, mut texts) = (0, 0);
    let deadline = tokio::time::Instant::now() + RUN_LIMIT;
    while open > 0 {
        let r = tokio::time::timeout_at(deadline, replies.recv())
            .await
            .expect("the run finishes within its limit")
            .expect("replies flow");
        events += 1;
        match r.raw["type"].as_str() {
            Some("text") => texts += 1,
            Some("completed") => {
                let job = r.raw["job_id"].as_str().unwrap();
                let s = job_session.remove(job).expect("a job of this run");
                if left[s] == 0 {
                    open -= 1;
                } else {
                    left[s] -= 1;
                    let job = bus.publish_job(&format!("s{s}"), "go", json!({})).await;
                    job_session.insert(job, s);
                }
            }
            Some("failed") => panic!("a turn failed: {}", r.raw),
            _ => {}
        }
    }
    (events, texts)
}

/// Transactions committed in the run's PostgreSQL database so far (the
/// statistics are flushed by each backend within a second: wait them out).
async fn commits(backend: Backend, db_name: &str) -> Option<i64> {
    if backend != Backend::Postgres {
        return None;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let admin = world::postgres_admin_url();
    let pool = sqlx::PgPool::connect(&admin).await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT xact_commit FROM pg_stat_database WHERE datname = $1")
        .bind(db_name)
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    Some(n)
}

fn cpu_ms(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: plain sysconf query.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks as f64 * 1000.0 / hz
}
