//! The fault storm at CI size (see `common::storm`): 300 jobs over 60
//! sessions on 3 worker processes with every fault at once. The longer
//! run is `cargo bench --bench storm`.

use crate::common::storm::{self, StormConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fault_storm_loses_nothing_and_confuses_no_one() {
    let report = storm::run(StormConfig {
        jobs: 300,
        sessions: 60,
        workers: 3,
    })
    .await;
    eprintln!("{report}");
    assert!(report.holds(), "{report}");
    assert_eq!(report.jobs, 300);
    assert_eq!(
        report.completed + report.failed.values().sum::<usize>(),
        300,
        "{report}"
    );
    // Faults really happened.
    assert!(
        report.cli_kills > 0 && report.stream_cuts > 0 && report.bursts_529 > 0,
        "{report}"
    );
}
