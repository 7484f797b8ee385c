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
//! Each raw warm conversation is followed by a worker warm one, and their
//! turns are also compared message by message (paired medians). After
//! each conversation the bench also times the two broker hops
//! a warm turn makes (a job into a quorum queue, an event out to a reply
//! queue): the floor under what the worker adds. `WARM_CONVERSATIONS`
//! (default 2) sets the conversations per mode: more samples, less noise.
//! `WARM_RUST_LOG` sets the worker's `RUST_LOG` (default `warn`), e.g.
//! `claude_worker=debug` to see where a turn's time goes.

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)] // its unit tests' imports
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use claude_worker::protocol::{EventBody, EventV1};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use common::mock_api::{Behavior, MockApi};
use common::support;
use common::world::{self, Bus, Reply, WorkerPlace};

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
    api_url: String,
}

impl RawEnv {
    /// The raw CLI with the flags the worker passes for the default profile.
    fn command(&self, cwd: &Path, resume: Option<&str>) -> Command {
        let resume = resume.map(|id| format!("--resume={id}"));
        let mut args = vec!["--max-turns=20", "--permission-mode=default"];
        args.extend(resume.as_deref());
        let mut cmd = support::cli_command_at(&self.api_url, &self.home, &args);
        cmd.current_dir(cwd).stderr(Stdio::null());
        cmd
    }
}

fn user_line(text: &str) -> String {
    format!("{}\n", support::user_line(text))
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

/// One raw stream-json CLI process: a conversation's warm turns.
struct RawWarm {
    child: Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl RawWarm {
    fn start(env: &RawEnv, cwd: &Path) -> RawWarm {
        std::fs::create_dir_all(cwd).unwrap();
        let mut child = env.command(cwd, None).spawn().expect("spawn CLI");
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        RawWarm {
            child,
            stdin,
            lines,
        }
    }

    async fn turn(&mut self, text: &str) -> Turn {
        let t0 = Instant::now();
        self.stdin
            .write_all(user_line(text).as_bytes())
            .await
            .unwrap();
        self.stdin.flush().await.unwrap();
        let (first, done, _) = read_turn(&mut self.lines, t0).await;
        Turn {
            first_text: ms(first),
            done: ms(done),
            exit: None,
        }
    }

    /// Ends the process; returns its RSS in kB.
    async fn finish(mut self) -> u64 {
        let rss = rss_kb(self.child.id().unwrap() as i32);
        drop(self.stdin);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
        rss
    }
}

/// A conversation on the raw warm CLI; the timings of messages 2...
async fn raw_warm(env: &RawEnv, cwd: &Path) -> Vec<Turn> {
    let mut raw = RawWarm::start(env, cwd);
    let mut out = Vec::new();
    for i in 0..MESSAGES {
        let t = raw.turn(&format!("raw warm {i}")).await;
        if i > 0 {
            out.push(t);
        }
    }
    raw.finish().await;
    out
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
    bus: Bus,
    events: mpsc::UnboundedReceiver<Reply>,
}

impl WorkerRun {
    /// A worker process with its own prefix and SQLite file in `dir`.
    async fn start(
        name: &'static str,
        dir: &Path,
        api_url: &str,
        home: &Path,
        warm_max: usize,
    ) -> WorkerRun {
        let bus = Bus::new("cwbench", &world::world_id()).await;
        let events = bus.replies().await;
        let db_url = format!(
            "sqlite:{}",
            dir.join(format!("{}.db", bus.prefix)).display()
        );
        let work = dir.join(format!("{}-work", bus.prefix));
        let mut settings = world::worker_settings(&WorkerPlace {
            prefix: &bus.prefix,
            db_url: &db_url,
            api_url,
            home,
            work: &work,
            marker: &bus.prefix,
        });
        settings.worker.max_concurrent_turns = 2;
        settings.claude.warm_max_processes = warm_max;
        let cfg = dir.join(format!("{}.toml", bus.prefix));
        world::write_config(&settings, &cfg);
        let child = world::worker_command(
            &cfg,
            home,
            &std::env::var("WARM_RUST_LOG").unwrap_or("warn".into()),
        )
        .spawn()
        .expect("start the worker binary");
        let pid = child.id().unwrap() as i32;
        WorkerRun {
            name,
            child,
            pid,
            bus,
            events,
        }
    }

    /// Publishes one job and waits for its terminal event.
    async fn turn(&mut self, key: &str, prompt: &str) -> Turn {
        let t0 = Instant::now();
        let job_id = self.bus.publish_job(key, prompt, json!({})).await;
        let mut first = None;
        loop {
            let reply = tokio::time::timeout(TURN_LIMIT, self.events.recv())
                .await
                .unwrap_or_else(|_| panic!("{}: no event in time", self.name))
                .expect("reply consumer");
            let ev: EventV1 = serde_json::from_value(reply.raw).expect("a v1 event");
            if ev.job_id != job_id {
                continue;
            }
            match ev.body {
                EventBody::Text { .. } if first.is_none() => first = Some(reply.at - t0),
                EventBody::Completed { .. } => {
                    return Turn {
                        first_text: ms(first.expect("a text event")),
                        done: ms(reply.at - t0),
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
        self.bus.delete().await;
    }
}

// ------------------------------------------------------------- broker hop

/// Hops of each kind measured after each conversation's warm turns.
const HOPS: usize = 20;

/// Broker hops on this machine, as the worker's path makes them: a
/// persistent message published, to a consumer's receipt (ms). A warm turn
/// crosses the broker twice: the job in, through a quorum queue (the jobs
/// queue's type: it delivers a message once its log has committed it), and its
/// events out, through the replies exchange to a front-end's own queue.
/// Returns (quorum queue hops, reply hops).
async fn broker_hops(bus: &Bus) -> (Vec<f64>, Vec<f64>) {
    use futures_util::StreamExt;
    use lapin::options::{
        BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions,
    };
    use lapin::types::{AMQPValue, FieldTable};

    let id = uuid::Uuid::new_v4().simple().to_string();
    let key = format!("hop.{id}");
    let mut replies = world::subscribe(&bus.conn, &bus.topology, &key).await;
    let quorum = format!("{}.hop.{id}", bus.prefix);
    let ch = bus.conn.create_channel().await.expect("hop channel");
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(quorum.as_str().into(), durable, args)
        .await
        .expect("declare the hop's quorum queue");
    let mut jobs = ch
        .basic_consume(
            quorum.as_str().into(),
            "hop".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume the hop's quorum queue");

    let (mut in_hops, mut out_hops) = (Vec::new(), Vec::new());
    for i in 0..HOPS {
        for (exchange, routing_key) in [
            ("", quorum.as_str()),
            (bus.topology.replies_exchange.as_str(), key.as_str()),
        ] {
            let body = json!({ "hop": i }).to_string();
            let t0 = Instant::now();
            let confirm = bus
                .channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    lapin::BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .expect("publish a hop");
            if exchange.is_empty() {
                let d = tokio::time::timeout(TURN_LIMIT, jobs.next())
                    .await
                    .expect("the hop arrives in time")
                    .expect("hop consumer")
                    .expect("a delivery");
                in_hops.push(ms(t0.elapsed()));
                d.ack(Default::default()).await.expect("ack the hop");
            } else {
                let reply = tokio::time::timeout(TURN_LIMIT, replies.recv())
                    .await
                    .expect("the hop arrives in time")
                    .expect("hop consumer");
                out_hops.push(ms(reply.at - t0));
            }
            confirm.await.expect("the hop is confirmed");
        }
    }
    ch.queue_delete(quorum.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete the hop's queue");
    (in_hops, out_hops)
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
        api_url: mock.base_url(),
    };
    let mut cold = WorkerRun::start("worker cold", dir.path(), &mock.base_url(), &home, 0).await;
    let mut warm = WorkerRun::start("worker warm", dir.path(), &mock.base_url(), &home, 8).await;
    // Warm-up: both workers up and the CLI's files cached.
    cold.turn("warmup", "warm-up").await;
    warm.turn("warmup", "warm-up").await;
    raw_warm(&raw, &dir.path().join("raw-warmup")).await;
    let conversations: usize = std::env::var("WARM_CONVERSATIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(CONVERSATIONS);

    let mut series: HashMap<&str, Vec<Turn>> = HashMap::new();
    let mut cpu: HashMap<&str, (f64, usize)> = HashMap::new();
    let mut raw_rss = 0;
    let mut hops = (Vec::new(), Vec::new());
    // (raw warm, worker warm) of the same message of neighbouring conversations.
    let mut pairs: Vec<(Turn, Turn)> = Vec::new();
    for c in 0..conversations {
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

        // One conversation on the raw CLI, then one through the worker:
        // each turn meets only its own process's aftermath, as in use.
        let mut raw_conv = RawWarm::start(&raw, &dir.path().join(format!("raw-warm-{c}")));
        let mut raw_turns = Vec::new();
        for i in 0..MESSAGES {
            let t = raw_conv.turn(&format!("raw warm {c} {i}")).await;
            if i > 0 {
                raw_turns.push(t);
            }
        }
        raw_rss = raw_conv.finish().await;

        warm.turn(&format!("warm-{c}"), &format!("warm {c} first"))
            .await;
        let cpu0 = cpu_ms(warm.pid);
        for (i, r) in (1..MESSAGES).zip(raw_turns) {
            let w = warm
                .turn(&format!("warm-{c}"), &format!("warm {c} {i}"))
                .await;
            pairs.push((r, w));
            series.entry("raw CLI warm").or_default().push(r);
            series.entry("worker warm").or_default().push(w);
        }
        let e = cpu.entry("worker warm").or_default();
        e.0 += cpu_ms(warm.pid) - cpu0;
        e.1 += MESSAGES - 1;
        let (hops_in, hops_out) = broker_hops(&warm.bus).await;
        hops.0.extend(hops_in);
        hops.1.extend(hops_out);
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
        "claude-worker warm bench: {conversations} conversations × {MESSAGES} messages per mode \
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
    let (hop_in, hop_out) = (pct(&hops.0, 0.5), pct(&hops.1, 0.5));
    println!();
    println!(
        "broker hops, publish → consumer, p50 (p90) over {} each: into a quorum queue (a job's) \
         {hop_in:.2} ({:.2}) ms, to a reply queue (an event's) {hop_out:.2} ({:.2}) ms",
        hops.0.len(),
        pct(&hops.0, 0.9),
        pct(&hops.1, 0.9),
    );
    println!(
        "worker warm − raw warm (p50): first text {:.1} ms, completed {:.1} ms; the two hops: {:.1} ms",
        p50("worker warm", true) - p50("raw CLI warm", true),
        p50("worker warm", false) - p50("raw CLI warm", false),
        hop_in + hop_out,
    );
    // Per message, worker minus raw (neighbouring conversations, seconds
    // apart): steadier than a difference of two p50s under drifting load.
    let paired = |f: fn(&Turn) -> f64| {
        let d: Vec<f64> = pairs.iter().map(|(r, w)| f(w) - f(r)).collect();
        pct(&d, 0.5)
    };
    let (d_first, d_done) = (paired(|t| t.first_text), paired(|t| t.done));
    println!(
        "paired, median of (worker warm − raw warm) over {} messages: first text {d_first:.1} ms, \
         completed {d_done:.1} ms; as ratios on raw warm's p50: {:.2} and {:.2}",
        pairs.len(),
        (p50("raw CLI warm", true) + d_first) / p50("raw CLI warm", true),
        (p50("raw CLI warm", false) + d_done) / p50("raw CLI warm", false),
    );
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
    println!("bench ran {:.0} s", started.elapsed().as_secs_f64());
}
