//! Warm vs cold turns, end to end, against the raw CLI as the baseline.
//!
//! `cargo bench --bench warm`. Needs RabbitMQ on 127.0.0.1:5672 and the
//! Claude CLI (found like the integration tests do: `$CLAUDE_BIN`, the
//! pinned install under `.cache/claude-cli`, `/root/.cache/claude-cli`,
//! else `claude` on PATH). The mock Anthropic API of the integration tests
//! answers every request at once with 20 text deltas.
//!
//! The worker runs as a separate process (the built `claude-worker worker`
//! binary, release profile), so its own CPU time (utime+stime, not the
//! CLI's) and RSS can be read from /proc. Measured per turn, for
//! conversations of `MESSAGES` messages on one session key:
//!
//! * worker cold (`warm_max_processes = 0`) and worker warm: publish →
//!   first `text` event and publish → `completed`, as seen by a consumer of
//!   the replies exchange;
//! * raw CLI cold (`-p --resume` per message, stdin closed after the
//!   message) and raw CLI warm (one stream-json process): write → first
//!   text delta and write → `result` (cold also: → process exit).
//!
//! Warm figures are for messages 2.. (the first one starts the process).

#[path = "../tests/it/mock_api.rs"]
#[allow(unused_imports)]
mod mock_api;
#[path = "../tests/it/support.rs"]
mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use claude_worker::broker::Topology;
use claude_worker::protocol::{EventBody, EventV1};
use futures_util::StreamExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use mock_api::{Behavior, MockApi};
use support::claude_bin;

const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// Messages per conversation.
const MESSAGES: usize = 10;
/// Conversations per mode.
const CONVERSATIONS: usize = 2;
const TURN_LIMIT: Duration = Duration::from_secs(60);

/// One turn's timings, in milliseconds.
#[derive(Clone, Copy)]
struct Turn {
    first_text: f64,
    done: f64,
    exit: Option<f64>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

struct Series {
    name: &'static str,
    turns: Vec<Turn>,
}

impl Series {
    fn p(&self, f: impl Fn(&Turn) -> Option<f64>, p: f64) -> Option<f64> {
        let v: Vec<f64> = self.turns.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| pct(&v, p))
    }
}

// ---------------------------------------------------------------- raw CLI

struct RawEnv {
    home: PathBuf,
    base_url: String,
}

impl RawEnv {
    fn command(&self, cwd: &Path, resume: Option<&str>) -> Command {
        let mut cmd = Command::new(claude_bin());
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", &self.home)
            .env("CLAUDE_CONFIG_DIR", self.home.join(".claude"))
            .env("ANTHROPIC_BASE_URL", &self.base_url)
            .env("ANTHROPIC_API_KEY", "sk-bench")
            .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
            .env("CLAUDE_CODE_MAX_RETRIES", "0")
            .current_dir(cwd)
            .args([
                "-p",
                "--input-format",
                "stream-json",
                "--output-format",
                "stream-json",
                "--verbose",
                "--include-partial-messages",
                "--max-turns=20",
                "--permission-mode=default",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        if let Some(id) = resume {
            cmd.arg(format!("--resume={id}"));
        }
        cmd
    }
}

fn user_line(text: &str) -> String {
    let mut l = json!({"type": "user", "message": {"role": "user", "content": text}}).to_string();
    l.push('\n');
    l
}

fn is_text_delta(v: &Value) -> bool {
    v["type"] == "stream_event" && v["event"]["delta"]["type"] == "text_delta"
}

/// Reads stdout lines until `result`; returns (first text delta, result, session id).
async fn read_turn(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    t0: Instant,
) -> (Duration, Duration, String) {
    let mut first = None;
    loop {
        let line = tokio::time::timeout(TURN_LIMIT, lines.next_line())
            .await
            .expect("the CLI answers in time")
            .expect("read stdout")
            .expect("the CLI ended without a result");
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if first.is_none() && is_text_delta(&v) {
            first = Some(t0.elapsed());
        }
        if v["type"] == "result" {
            assert_eq!(v["subtype"], "success", "{v}");
            let done = t0.elapsed();
            let id = v["session_id"].as_str().unwrap_or_default().to_string();
            return (first.expect("a text delta"), done, id);
        }
    }
}

async fn raw_cold(env: &RawEnv, cwd: &Path) -> Vec<Turn> {
    std::fs::create_dir_all(cwd).unwrap();
    let mut id: Option<String> = None;
    let mut out = Vec::new();
    for i in 0..MESSAGES {
        let t0 = Instant::now();
        let mut child: Child = env.command(cwd, id.as_deref()).spawn().expect("spawn CLI");
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(user_line(&format!("raw cold {i}")).as_bytes())
            .await
            .unwrap();
        drop(stdin);
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (first, done, sid) = read_turn(&mut lines, t0).await;
        while let Ok(Some(_)) = lines.next_line().await {}
        child.wait().await.unwrap();
        out.push(Turn {
            first_text: ms(first),
            done: ms(done),
            exit: Some(ms(t0.elapsed())),
        });
        id = Some(sid);
    }
    out
}

/// Returns the timings of messages 2.. and the process's RSS in kB.
async fn raw_warm(env: &RawEnv, cwd: &Path) -> (Vec<Turn>, u64) {
    std::fs::create_dir_all(cwd).unwrap();
    let mut child = env.command(cwd, None).spawn().expect("spawn CLI");
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut out = Vec::new();
    for i in 0..MESSAGES {
        let t0 = Instant::now();
        stdin
            .write_all(user_line(&format!("raw warm {i}")).as_bytes())
            .await
            .unwrap();
        stdin.flush().await.unwrap();
        let (first, done, _) = read_turn(&mut lines, t0).await;
        if i > 0 {
            out.push(Turn {
                first_text: ms(first),
                done: ms(done),
                exit: None,
            });
        }
    }
    let rss = rss_kb(child.id().unwrap() as i32);
    drop(stdin);
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    (out, rss)
}

// ----------------------------------------------------------------- worker

fn proc_stat_fields(pid: i32) -> Vec<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the `(comm)`.
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    rest.split_whitespace().map(str::to_string).collect()
}

/// utime + stime of the process itself (not its children), in ms.
fn cpu_ms(pid: i32) -> f64 {
    let f = proc_stat_fields(pid);
    // After `)`: state(0) ppid(1) … utime(11) stime(12).
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: plain sysconf query.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks as f64 * 1000.0 / hz
}

fn rss_kb(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() {
            let f = proc_stat_fields(p);
            if f.get(1).and_then(|pp| pp.parse::<i32>().ok()) == Some(pid) && f[0] != "Z" {
                out.push(p);
            }
        }
    }
    out
}

struct WorkerRun {
    name: &'static str,
    child: Child,
    pid: i32,
    prefix: String,
    topology: Topology,
    channel: Channel,
    reply_key: String,
    events: mpsc::UnboundedReceiver<(Instant, EventV1)>,
}

fn worker_config(
    dir: &Path,
    prefix: &str,
    base_url: &str,
    home: &Path,
    warm_max: usize,
) -> PathBuf {
    let cfg = dir.join(format!("{prefix}.toml"));
    let text = format!(
        r#"
[amqp]
url = "{AMQP_URL}"
prefix = "{prefix}"
[database]
url = "sqlite:{db}"
[worker]
max_concurrent_turns = 2
[claude]
path = "{cli}"
warm_max_processes = {warm_max}
[profiles.default]
workdir = "{work}"
[profiles.default.env]
ANTHROPIC_BASE_URL = "{base_url}"
ANTHROPIC_API_KEY = "sk-bench"
CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC = "1"
CLAUDE_CODE_MAX_RETRIES = "0"
HOME = "{home}"
CLAUDE_CONFIG_DIR = "{home}/.claude"
"#,
        db = dir.join(format!("{prefix}.db")).display(),
        cli = claude_bin().display(),
        work = dir.join(format!("{prefix}-work")).display(),
        home = home.display(),
    );
    std::fs::write(&cfg, text).unwrap();
    cfg
}

impl WorkerRun {
    async fn start(
        conn: &Connection,
        name: &'static str,
        dir: &Path,
        base_url: &str,
        home: &Path,
        warm_max: usize,
    ) -> WorkerRun {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let prefix = format!("cwbench.{}", &id[..10]);
        let topology = Topology::from_prefix(&prefix, "prompt");
        let channel = conn.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        topology.declare(&channel).await.unwrap();
        let reply_key = format!("bench.{}", &id[..10]);
        let events = consume_replies(conn, &topology, &reply_key).await;
        let cfg = worker_config(dir, &prefix, base_url, home, warm_max);
        let child = Command::new(env!("CARGO_BIN_EXE_claude-worker"))
            .arg("worker")
            .arg("--config")
            .arg(&cfg)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start the worker binary");
        let pid = child.id().unwrap() as i32;
        WorkerRun {
            name,
            child,
            pid,
            prefix,
            topology,
            channel,
            reply_key,
            events,
        }
    }

    /// Publishes one job and waits for its terminal event.
    async fn turn(&mut self, key: &str, prompt: &str) -> Turn {
        let job_id = uuid::Uuid::new_v4().to_string();
        let body = json!({"v": 1, "job_id": job_id, "session_key": key, "prompt": prompt});
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_reply_to(self.reply_key.as_str().into())
            .with_delivery_mode(2);
        let t0 = Instant::now();
        self.channel
            .basic_publish(
                self.topology.jobs_exchange.as_str().into(),
                "prompt".into(),
                BasicPublishOptions::default(),
                body.to_string().as_bytes(),
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        let mut first = None;
        loop {
            let (at, ev) = tokio::time::timeout(TURN_LIMIT, self.events.recv())
                .await
                .unwrap_or_else(|_| panic!("{}: no event in time", self.name))
                .expect("reply consumer");
            if ev.job_id != job_id {
                continue;
            }
            match ev.body {
                EventBody::Text { .. } if first.is_none() => first = Some(at - t0),
                EventBody::Completed { .. } => {
                    return Turn {
                        first_text: ms(first.expect("a text event")),
                        done: ms(at - t0),
                        exit: None,
                    }
                }
                ref b if b.is_terminal() => panic!("{}: job ended with {b:?}", self.name),
                _ => {}
            }
        }
    }

    async fn stop(mut self) {
        // SAFETY: signalling the worker process this bench started.
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        let _ = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
        self.topology.delete(&self.channel).await;
        let _ = &self.prefix;
    }
}

async fn consume_replies(
    conn: &Connection,
    topology: &Topology,
    key: &str,
) -> mpsc::UnboundedReceiver<(Instant, EventV1)> {
    let ch = conn.create_channel().await.unwrap();
    let mut consumer =
        claude_worker::broker::consume_private(&ch, &topology.replies_exchange, key, "", true)
            .await
            .unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let _keep = ch;
        while let Some(Ok(d)) = consumer.next().await {
            let at = Instant::now();
            let ev: EventV1 = serde_json::from_slice(&d.data).expect("v1 event");
            if tx.send((at, ev)).is_err() {
                break;
            }
        }
    });
    rx
}

// ------------------------------------------------------------------- main

fn fmt(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "–".into())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir_all(home.join(".claude")).unwrap();
    let mock = MockApi::start().await;
    let reply: String = (0..20).map(|i| format!("w{i} ")).collect();
    mock.set_default(Behavior::Reply {
        text: reply,
        chunks: 20,
    });
    let raw = RawEnv {
        home: home.clone(),
        base_url: mock.base_url(),
    };
    let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .expect("RabbitMQ on 127.0.0.1:5672");
    let mut cold =
        WorkerRun::start(&conn, "worker cold", dir.path(), &mock.base_url(), &home, 0).await;
    let mut warm =
        WorkerRun::start(&conn, "worker warm", dir.path(), &mock.base_url(), &home, 8).await;
    // Warm-up: both workers up and the CLI's files cached.
    cold.turn("warmup", "warm-up").await;
    warm.turn("warmup", "warm-up").await;
    raw_warm(&raw, &dir.path().join("raw-warmup")).await;

    let mut series: HashMap<&str, Vec<Turn>> = HashMap::new();
    let mut cpu: HashMap<&str, (f64, usize)> = HashMap::new();
    let mut raw_rss = 0;
    for c in 0..CONVERSATIONS {
        let turns = raw_cold(&raw, &dir.path().join(format!("raw-cold-{c}"))).await;
        series.entry("raw CLI cold").or_default().extend(turns);

        let cpu0 = cpu_ms(cold.pid);
        for i in 0..MESSAGES {
            let t = cold
                .turn(&format!("cold-{c}"), &format!("cold {c} {i}"))
                .await;
            series.entry("worker cold").or_default().push(t);
        }
        let e = cpu.entry("worker cold").or_default();
        e.0 += cpu_ms(cold.pid) - cpu0;
        e.1 += MESSAGES;

        let (turns, rss) = raw_warm(&raw, &dir.path().join(format!("raw-warm-{c}"))).await;
        raw_rss = rss;
        series.entry("raw CLI warm").or_default().extend(turns);

        warm.turn(&format!("warm-{c}"), &format!("warm {c} first"))
            .await;
        let cpu0 = cpu_ms(warm.pid);
        for i in 1..MESSAGES {
            let t = warm
                .turn(&format!("warm-{c}"), &format!("warm {c} {i}"))
                .await;
            series.entry("worker warm").or_default().push(t);
        }
        let e = cpu.entry("worker warm").or_default();
        e.0 += cpu_ms(warm.pid) - cpu0;
        e.1 += MESSAGES - 1;
    }
    let warm_children = children_of(warm.pid);
    let warm_cli_rss: Vec<u64> = warm_children.iter().map(|p| rss_kb(*p)).collect();
    let rss_cold = rss_kb(cold.pid);
    let rss_warm = rss_kb(warm.pid);

    let order = ["raw CLI cold", "worker cold", "raw CLI warm", "worker warm"];
    let all: Vec<Series> = order
        .iter()
        .map(|n| Series {
            name: n,
            turns: series.remove(n).unwrap_or_default(),
        })
        .collect();
    println!();
    println!(
        "claude-worker warm bench: {CONVERSATIONS} conversations × {MESSAGES} messages per mode \
         (warm: messages 2–{MESSAGES}); mock API 0 ms TTFT, 20 text deltas; worker as a separate \
         process (release build)"
    );
    println!();
    println!("| mode | n | first text p50 | p90 | completed/result p50 | p90 | exit p50 |");
    println!("|---|---|---|---|---|---|---|");
    for s in &all {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            s.name,
            s.turns.len(),
            fmt(s.p(|t| Some(t.first_text), 0.5)),
            fmt(s.p(|t| Some(t.first_text), 0.9)),
            fmt(s.p(|t| Some(t.done), 0.5)),
            fmt(s.p(|t| Some(t.done), 0.9)),
            fmt(s.p(|t| t.exit, 0.5)),
        );
    }
    let p50 = |name: &str, first: bool| {
        let s = all.iter().find(|s| s.name == name).unwrap();
        s.p(|t| Some(if first { t.first_text } else { t.done }), 0.5)
            .unwrap()
    };
    println!();
    println!("| ratio (p50) | first text | completed |");
    println!("|---|---|---|");
    for (label, a, b) in [
        ("worker warm / raw warm", "worker warm", "raw CLI warm"),
        ("worker cold / raw cold", "worker cold", "raw CLI cold"),
        ("worker warm / worker cold", "worker warm", "worker cold"),
    ] {
        println!(
            "| {label} | {:.2} | {:.2} |",
            p50(a, true) / p50(b, true),
            p50(a, false) / p50(b, false)
        );
    }
    println!();
    for (name, (ms, n)) in &cpu {
        println!(
            "{name}: worker CPU (utime+stime, CLI excluded) {:.1} ms per turn over {n} turns",
            ms / *n as f64
        );
    }
    println!(
        "worker RSS: cold {} MB, warm {} MB (with {} warm CLI processes held)",
        rss_cold / 1024,
        rss_warm / 1024,
        warm_children.len()
    );
    println!(
        "RSS of one warm CLI process: {} MB (raw stream-json CLI after {MESSAGES} turns: {} MB); pool's processes: {:?} MB",
        warm_cli_rss.first().copied().unwrap_or(0) / 1024,
        raw_rss / 1024,
        warm_cli_rss.iter().map(|r| r / 1024).collect::<Vec<_>>()
    );
    cold.stop().await;
    warm.stop().await;
    let _ = conn.close(200, "bench done".into()).await;
    println!("bench ran {:.0} s", started.elapsed().as_secs_f64());
}
