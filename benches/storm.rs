//! The fault storm, longer than CI's (`cargo bench --bench storm`):
//! `STORM_JOBS` jobs (default 1000) over `STORM_SESSIONS` sessions (default
//! 200) on 3 worker processes, with every fault of `tests/common/storm.rs`.
//! Needs what the integration tests need (RabbitMQ and PostgreSQL server
//! binaries, the CLI). Prints the report and the load average; exits
//! non-zero if a promise broke.

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use common::storm::{self, StormConfig};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let cfg = StormConfig {
        jobs: env_usize("STORM_JOBS", 1000),
        sessions: env_usize("STORM_SESSIONS", 200),
        workers: 3,
    };
    let report = storm::run(cfg).await;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("{report}");
    println!("  load average at the end: {}", load.trim());
    if !report.holds() {
        std::process::exit(1);
    }
}
