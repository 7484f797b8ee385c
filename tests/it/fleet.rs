//! A fleet: several worker PROCESSES (the built binary) sharing one broker
//! and one database, each with its own HOME, CLI config dir and workspaces,
//! as if on separate hosts. Exclusion, order, fairness, fencing, crash
//! recovery and portability of sessions between workers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use claude_worker::config::Secret;
use claude_worker::protocol::{EventBody, EventV1};
use claude_worker::store::SessionStore;
use serde_json::json;
use tokio::process::Child;
use tokio::sync::Notify;

use crate::common::world;

use crate::harness::{cli_pids, Backend, TestEnv, WAIT};
use crate::mock_api::Behavior;

/// One `claude-worker worker` process.
pub(crate) struct WorkerProc {
    id: String,
    /// `CW_TEST_PREFIX` of its CLI processes, for [`cli_pids`].
    marker: String,
    child: Child,
    pid: i32,
    pub(crate) log: PathBuf,
}

impl WorkerProc {
    fn signal(&self, sig: i32) {
        // SAFETY: plain syscall on our own child.
        unsafe { libc::kill(self.pid, sig) };
    }

    /// SIGTERM, then waits (bounded) for a graceful exit.
    pub(crate) async fn stop(&mut self) {
        self.signal(libc::SIGTERM);
        tokio::time::timeout(WAIT, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("worker {} did not stop", self.id))
            .expect("wait for the worker");
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read(&self.log).unwrap_or_default();
        let start = log.len().saturating_sub(4000);
        String::from_utf8_lossy(&log[start..]).into_owned()
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        // Its CLI processes die with it (PR_SET_PDEATHSIG).
        self.signal(libc::SIGCONT);
        let _ = self.child.start_kill();
    }
}

/// Starts worker process `n` of this test with its own home and workspaces.
/// `vars` are extra `CLAUDE_WORKER__…` settings.
fn spawn_worker(env: &TestEnv, n: usize, vars: &[(&str, String)]) -> WorkerProc {
    let filter = std::env::var("FLEET_WORKER_LOG").unwrap_or_else(|_| "warn".into());
    spawn_worker_logging(env, n, vars, &filter)
}

/// [`spawn_worker`] with `RUST_LOG=rust_log`; its stderr goes to `log`.
pub(crate) fn spawn_worker_logging(
    env: &TestEnv,
    n: usize,
    vars: &[(&str, String)],
    rust_log: &str,
) -> WorkerProc {
    let base = env.dir.path().join(format!("worker{n}"));
    let home = base.join("home");
    let marker = format!("{}.w{n}", env.prefix);
    let mut settings = env.settings_for(&home, &base.join("work"), &marker);
    let id = format!("w{n}-{}", &uuid::Uuid::new_v4().simple().to_string()[..6]);
    settings.worker.id = id.clone();
    let config = base.join("config.toml");
    world::write_config(&settings, &config);
    let log = base.join("worker.log");
    let mut cmd = world::worker_command(&config, &home, rust_log);
    cmd.stderr(std::fs::File::create(&log).unwrap());
    for (k, v) in vars {
        cmd.env(format!("CLAUDE_WORKER__{k}"), v);
    }
    let child = cmd.spawn().expect("spawn claude-worker");
    let pid = child.id().expect("a running child") as i32;
    WorkerProc {
        id,
        marker,
        child,
        pid,
        log,
    }
}

/// Waits until `n` consumers are attached to the jobs queue.
pub(crate) async fn wait_for_consumers(env: &TestEnv, n: u32) {
    env.bus.wait_for_consumers(n).await
}

/// A reply event with the attribution headers it arrived with.
#[derive(Debug, Clone)]
struct Seen {
    event: EventV1,
    worker: Option<String>,
    epoch: Option<i64>,
    at: Instant,
}

/// Every reply event of this test, with headers, as it arrives.
#[derive(Clone)]
struct Replies {
    seen: Arc<Mutex<Vec<Seen>>>,
    changed: Arc<Notify>,
}

impl Replies {
    async fn watch(env: &TestEnv) -> Replies {
        let mut incoming = env.bus.replies().await;
        let replies = Replies {
            seen: Arc::new(Mutex::new(Vec::new())),
            changed: Arc::new(Notify::new()),
        };
        let r = replies.clone();
        tokio::spawn(async move {
            while let Some(reply) = incoming.recv().await {
                let event: EventV1 = serde_json::from_value(reply.raw).expect("events are v1");
                r.seen.lock().unwrap().push(Seen {
                    event,
                    worker: reply.worker_id,
                    epoch: reply.lease_epoch,
                    at: reply.at,
                });
                r.changed.notify_waiters();
            }
        });
        replies
    }

    fn all(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits (up to `timeout`) until `done` holds over all events so far.
    async fn wait_until(&self, timeout: Duration, what: &str, done: impl Fn(&[Seen]) -> bool) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            if done(&self.seen.lock().unwrap()) {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!("{what}: not within {timeout:?}");
            }
        }
    }

    /// The first event of `job` matching `pred`, waiting for it.
    async fn wait_for(&self, job: &str, what: &str, pred: impl Fn(&EventV1) -> bool) -> Seen {
        let find = |all: &[Seen]| {
            all.iter()
                .find(|s| s.event.job_id == job && pred(&s.event))
                .cloned()
        };
        self.wait_until(WAIT, what, |all| find(all).is_some()).await;
        find(&self.all()).unwrap()
    }

    async fn terminal(&self, job: &str) -> Seen {
        self.wait_for(job, &format!("terminal event of {job}"), |e| {
            e.body.is_terminal()
        })
        .await
    }
}

fn is_completed(e: &EventV1) -> bool {
    matches!(e.body, EventBody::Completed { .. })
}

fn vars(pairs: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

async fn open_store(env: &TestEnv) -> Arc<dyn SessionStore> {
    claude_worker::store::connect(&Secret::new(env.db_url.clone()), 2)
        .await
        .expect("open the test database")
}

// ------------------------------------------------------------------ burst

/// 3 workers, 30 sessions × 5 jobs in a burst: exactly one terminal per
/// job, per-session order, no overlapping turns of a session, whole
/// conversations on every turn (sessions move between workers), and every
/// worker did work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_150_jobs_on_three_workers() {
    // Small enough for a loaded CI machine (500 jobs took 900 s at a load
    // average of ~30); `benches/fleet.rs` measures the fleet at scale.
    const SESSIONS: usize = 30;
    const JOBS: usize = 5;
    let env = TestEnv::new(Backend::Postgres).await;
    let replies = Replies::watch(&env).await;
    let v = vars(&[("WORKER__MAX_CONCURRENT_TURNS", "3")]);
    let workers: Vec<WorkerProc> = (0..3).map(|n| spawn_worker(&env, n, &v)).collect();
    wait_for_consumers(&env, 3).await;
    // A short reply in one chunk: the CLI's start-up is what costs.
    env.mock.set_default(Behavior::Reply {
        text: "ok".into(),
        chunks: 1,
    });

    let started = Instant::now();
    let mut jobs: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for j in 0..JOBS {
        for s in 0..SESSIONS {
            let prompt = format!("[[mock:s{s}]] job {j}");
            let id = env
                .publish_job(&format!("fleet:s{s}"), &prompt, json!({}))
                .await;
            jobs.insert(id, (s, j));
        }
    }
    let total = SESSIONS * JOBS;
    // About a minute on an idle 2-core machine: every turn is a real CLI
    // process (Node start-up is most of its cost). The bound is generous
    // because CI machines are shared.
    let deadline = Duration::from_secs(900);
    let progress = {
        let replies = replies.clone();
        tokio::spawn(async move {
            loop {
                // A progress report, not a synchronisation.
                tokio::time::sleep(Duration::from_secs(10)).await;
                let n = replies
                    .all()
                    .iter()
                    .filter(|s| s.event.body.is_terminal())
                    .count();
                eprintln!("burst: {n} terminal events after {:?}", started.elapsed());
            }
        })
    };
    replies
        .wait_until(deadline, "all 150 terminal events", |all| {
            all.iter().filter(|s| s.event.body.is_terminal()).count() >= total
        })
        .await;
    progress.abort();
    let elapsed = started.elapsed();
    // Nothing more may come: a second terminal would show up here.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let all = replies.all();

    let mut terminals: BTreeMap<&str, Vec<&Seen>> = BTreeMap::new();
    for s in all.iter().filter(|s| s.event.body.is_terminal()) {
        terminals.entry(&s.event.job_id).or_default().push(s);
    }
    assert_eq!(terminals.len(), total, "every job got a terminal event");
    for (job, t) in &terminals {
        assert!(jobs.contains_key(*job));
        assert_eq!(t.len(), 1, "job {job}: exactly one terminal: {t:#?}");
        assert!(is_completed(&t[0].event), "job {job}: {t:#?}");
    }

    // Attribution: every event carries its worker and epoch; all three worked.
    assert!(all.iter().all(|s| s.worker.is_some() && s.epoch.is_some()));
    let by_worker: BTreeSet<&str> = all.iter().filter_map(|s| s.worker.as_deref()).collect();
    for w in &workers {
        assert!(
            by_worker.contains(w.id.as_str()),
            "worker {} did no work; workers seen: {by_worker:?}",
            w.id
        );
    }

    // The mock's requests, per session: in acceptance order (the database's
    // job order; jobs of one session published back to back may be
    // accepted by different workers in either order), never overlapping,
    // each carrying the whole conversation so far.
    let store = open_store(&env).await;
    let reqs = env.mock.requests();
    for s in 0..SESSIONS {
        let accepted: Vec<usize> = store
            .list_jobs(&format!("fleet:s{s}"), 100)
            .await
            .unwrap()
            .iter()
            .map(|j| jobs[&j.job_id].1)
            .collect();
        let mut sorted = accepted.clone();
        sorted.sort();
        assert_eq!(sorted, (0..JOBS).collect::<Vec<_>>(), "session s{s}");
        let mut mine: Vec<_> = reqs
            .iter()
            .filter(|r| r.marker().as_deref() == Some(&format!("s{s}")))
            .collect();
        mine.sort_by_key(|r| r.started);
        let order: Vec<usize> = mine
            .iter()
            .map(|r| {
                let t = r.last_user_text().unwrap();
                t.rsplit(' ').next().unwrap().parse().unwrap()
            })
            .collect();
        assert_eq!(
            order, accepted,
            "session s{s}: one request per job, in acceptance order"
        );
        for pair in mine.windows(2) {
            let end = pair[0].finished.expect("every request finished");
            assert!(end <= pair[1].started, "session s{s}: two turns overlapped");
        }
        for (j, r) in mine.iter().enumerate() {
            assert_eq!(
                r.user_texts().len(),
                j + 1,
                "session s{s} job {j}: the whole conversation: {:?}",
                r.user_texts()
            );
        }
    }
    let per_worker: BTreeMap<&str, usize> = terminals
        .values()
        .filter_map(|t| t[0].worker.as_deref())
        .fold(BTreeMap::new(), |mut m, w| {
            *m.entry(w).or_default() += 1;
            m
        });
    eprintln!(
        "burst: {total} jobs in {:.1} s ({:.1} jobs/s); per worker: {per_worker:?}",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64()
    );
    drop(workers);
    env.cleanup().await;
}

// --------------------------------------------------------- crash recovery

/// A worker SIGKILLed mid-turn: another worker takes the job over as a new
/// attempt (`retrying`, `worker_lost`), and the session's next job still
/// sees the whole conversation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_worker_job_completes_elsewhere() {
    sigkilled_worker(Backend::Postgres).await
}

/// The same with both workers on one SQLite file: each process's fast path
/// (and its pool) share the file's write lock, and the killed one may die
/// inside a transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_worker_job_completes_elsewhere_on_one_sqlite_file() {
    sigkilled_worker(Backend::Sqlite).await
}

async fn sigkilled_worker(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let replies = Replies::watch(&env).await;
    let v = vars(&[("WORKER__LEASE_TTL_SECS", "3")]);
    let mut workers: Vec<WorkerProc> = (0..2).map(|n| spawn_worker(&env, n, &v)).collect();
    wait_for_consumers(&env, 2).await;
    let key = "fleet:crash";

    let j1 = env.publish_job(key, "first", json!({})).await;
    assert!(is_completed(&replies.terminal(&j1).await.event));

    env.mock
        .push_behavior_for("crash", Behavior::hold("never sent whole"));
    let p2 = "second [[mock:crash]]";
    let j2 = env.publish_job(key, p2, json!({})).await;
    env.mock.wait_for_held(1, WAIT).await;
    let first = replies
        .wait_for(&j2, "job 2 started", |e| {
            matches!(e.body, EventBody::Started { .. })
        })
        .await;
    let victim = workers
        .iter()
        .position(|w| Some(&w.id) == first.worker.as_ref())
        .expect("job 2 ran on one of the workers");
    let killed = workers.remove(victim);
    let killed_at = Instant::now();
    killed.signal(libc::SIGKILL);

    let retry = replies
        .wait_for(&j2, "retrying after the kill", |e| {
            matches!(e.body, EventBody::Retrying { .. })
        })
        .await;
    match &retry.event.body {
        EventBody::Retrying { reason, .. } => assert_eq!(reason, "worker_lost"),
        _ => unreachable!(),
    }
    assert_eq!(retry.worker.as_deref(), Some(workers[0].id.as_str()));
    assert!(
        retry.epoch > first.epoch,
        "a new lease: {retry:?} {first:?}"
    );
    let done = replies.terminal(&j2).await;
    assert!(is_completed(&done.event), "{done:?}");
    assert_eq!(done.event.attempt, 2);
    eprintln!(
        "recovery: kill -> retrying in {:.2} s",
        (retry.at - killed_at).as_secs_f64()
    );
    // The killed worker's CLI died with it.
    world::wait_until("the killed worker's CLI ends", || {
        cli_pids(&killed.marker).is_empty()
    })
    .await;
    drop(killed);

    let j3 = env.publish_job(key, "third", json!({})).await;
    assert!(is_completed(&replies.terminal(&j3).await.event));
    let req = env
        .mock
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.last_user_text().as_deref() == Some("third"))
        .expect("the mock saw job 3");
    assert_eq!(req.user_texts(), vec!["first", p2, "third"]);
    assert_eq!(
        req.assistant_texts(),
        vec!["echo: first".to_string(), format!("echo: {p2}")]
    );
    drop(workers);
    env.cleanup().await;
}

// ---------------------------------------------------------------- fencing

/// A worker SIGSTOPped past its lease, then SIGCONTed after another worker
/// finished its job: nothing it publishes under the stale epoch reaches
/// the reply exchange, and its CLI process is stopped.
///
/// Postgres only: a worker stopped inside a SQLite write transaction keeps
/// the file's write lock, so no other worker on the file could take over
/// until it resumes (README, Deployment). Under load the stop landed there
/// in about one run of three (a `BEGIN IMMEDIATE` through sqlx).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_worker_is_fenced_out() {
    let env = TestEnv::new(Backend::Postgres).await;
    let replies = Replies::watch(&env).await;
    let v = vars(&[("WORKER__LEASE_TTL_SECS", "3")]);
    let workers: Vec<WorkerProc> = (0..2).map(|n| spawn_worker(&env, n, &v)).collect();
    wait_for_consumers(&env, 2).await;

    env.mock
        .push_behavior_for("pause", Behavior::hold("late words"));
    let job = env
        .publish_job("fleet:pause", "hold on [[mock:pause]]", json!({}))
        .await;
    env.mock.wait_for_held(1, WAIT).await;
    let first = replies
        .wait_for(&job, "started", |e| {
            matches!(e.body, EventBody::Started { .. })
        })
        .await;
    let x = workers
        .iter()
        .find(|w| Some(&w.id) == first.worker.as_ref())
        .expect("the job ran on one of the workers");
    assert!(!cli_pids(&x.marker).is_empty(), "x's CLI is running");
    x.signal(libc::SIGSTOP);

    // The other worker takes over once the lease expires and finishes the job.
    let takeover = replies
        .wait_for(&job, "takeover", |e| {
            matches!(e.body, EventBody::Retrying { .. })
        })
        .await;
    assert_ne!(takeover.worker, first.worker);
    assert!(takeover.epoch > first.epoch);
    let done = replies.terminal(&job).await;
    assert!(is_completed(&done.event));
    assert_ne!(done.worker, first.worker);

    // While x sleeps its CLI gets the rest of the held answer: x wakes up
    // with text and a result to publish.
    env.mock.release_held();
    env.mock.wait_for_finished("pause", WAIT).await;
    x.signal(libc::SIGCONT);

    // x notices it lost the lease and stops its CLI.
    let what = format!("the fenced-out worker's CLI ends (log: {})", x.log_tail());
    world::wait_until(&what, || cli_pids(&x.marker).is_empty()).await;
    // Give anything x might still send time to arrive, then count.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stale: Vec<Seen> = replies
        .all()
        .into_iter()
        .filter(|s| s.at >= takeover.at && s.worker == first.worker)
        .collect();
    assert!(
        stale.is_empty(),
        "stale events after the takeover: {stale:#?}"
    );
    let terminals = replies
        .all()
        .iter()
        .filter(|s| s.event.job_id == job && s.event.body.is_terminal())
        .count();
    assert_eq!(terminals, 1);
    assert!(
        x.log_tail().contains("lease lost"),
        "x logs that it lost the lease: {}",
        x.log_tail()
    );
    drop(workers);
    env.cleanup().await;
}

/// The next reply event the client library receives, with its epoch.
async fn next_event(client: &mut claude_worker::client::Client) -> Option<(EventV1, Option<i64>)> {
    match client.recv(WAIT).await.unwrap() {
        Some(claude_worker::client::Incoming::Event {
            event, lease_epoch, ..
        }) => Some((event, lease_epoch)),
        _ => None,
    }
}

/// A worker SIGSTOPped past its lease wakes up *while* its successor is
/// streaming the same job: both publish at once. Whatever stale events the
/// paused one gets out, the client library's reader (`JobTracker`, the
/// protocol's reader rule) delivers none of them: its text and terminal
/// are the successor's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_ending_while_the_successor_streams_reaches_no_reader() {
    use claude_worker::client::{Client, Incoming, JobTracker, Step};
    use claude_worker::protocol::JobV1;
    let env = TestEnv::new(Backend::Postgres).await;
    let v = vars(&[("WORKER__LEASE_TTL_SECS", "3")]);
    let workers: Vec<WorkerProc> = (0..2).map(|n| spawn_worker(&env, n, &v)).collect();
    wait_for_consumers(&env, 2).await;
    let mut client = Client::connect(&env.settings().amqp, "pause-reader")
        .await
        .unwrap();
    // Both attempts hold mid-answer until released.
    env.mock
        .push_behavior_for("p2", Behavior::hold("the first worker's words"));
    env.mock
        .push_behavior_for("p2", Behavior::hold("the successor's words"));
    let job: JobV1 = serde_json::from_value(json!({
        "v": 1, "job_id": uuid::Uuid::new_v4().to_string(),
        "session_key": "fleet:pause2", "prompt": "[[mock:p2]] go",
        "reply_to": client.reply_key(),
    }))
    .unwrap();
    let job_id = client.publish_job(&job).await.unwrap();

    // Everything the reply queue delivers, in arrival order.
    let mut arrived: Vec<(EventV1, Option<i64>)> = Vec::new();
    macro_rules! until {
        ($what:expr, $pred:expr) => {
            loop {
                if arrived.iter().any($pred) {
                    break;
                }
                match next_event(&mut client).await {
                    Some(e) => arrived.push(e),
                    None => panic!("{}: not within {:?}", $what, WAIT),
                }
            }
        };
    }
    env.mock.wait_for_held(1, WAIT).await;
    until!("started", |(e, _): &(EventV1, Option<i64>)| matches!(
        e.body,
        EventBody::Started { .. }
    ));
    let first_epoch = arrived[0].1.expect("attributed");
    let x = workers
        .iter()
        .find(|w| !cli_pids(&w.marker).is_empty())
        .expect("one worker runs the CLI");
    x.signal(libc::SIGSTOP);

    // The successor takes over and streams up to its hold.
    until!("the successor's started", |(e, ep): &(
        EventV1,
        Option<i64>
    )| {
        matches!(e.body, EventBody::Started { .. }) && *ep > Some(first_epoch)
    });
    env.mock.wait_for_held(2, WAIT).await;
    // Both CLIs get the rest of their answers, and x wakes up now: the two
    // workers publish the same job's events at the same time.
    env.mock.release_held();
    x.signal(libc::SIGCONT);
    until!("the terminal", |(e, _): &(EventV1, Option<i64>)| e
        .body
        .is_terminal());
    let what = format!("the fenced-out worker's CLI ends (log: {})", x.log_tail());
    world::wait_until(&what, || cli_pids(&x.marker).is_empty()).await;
    // Anything x still sends arrives within this window; then count.
    let settle = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Ok(Ok(Some(Incoming::Event {
        event, lease_epoch, ..
    }))) = tokio::time::timeout_at(settle, client.recv(WAIT)).await
    {
        arrived.push((event, lease_epoch));
    }

    let mut tracker = JobTracker::new(job_id.clone());
    let mut delivered = Vec::new();
    for (ev, epoch) in &arrived {
        if tracker.accept(ev, *epoch) != Step::Skip {
            delivered.push((ev.clone(), *epoch));
        }
    }
    let takeover = delivered
        .iter()
        .position(|(_, ep)| *ep > Some(first_epoch))
        .expect("the successor's events were delivered");
    let stale_delivered: Vec<_> = delivered[takeover..]
        .iter()
        .filter(|(_, ep)| *ep <= Some(first_epoch))
        .collect();
    assert!(
        stale_delivered.is_empty(),
        "stale events delivered: {stale_delivered:#?}"
    );
    let terminals: Vec<_> = delivered
        .iter()
        .filter(|(e, _)| e.body.is_terminal())
        .collect();
    assert_eq!(terminals.len(), 1, "{delivered:#?}");
    match &terminals[0].0.body {
        EventBody::Completed { result, .. } => assert_eq!(result, "the successor's words"),
        other => panic!("{other:?}"),
    }
    assert!(terminals[0].1 > Some(first_epoch));
    assert_eq!(tracker.text(), "the successor's words");
    let stale_arrived = arrived
        .iter()
        .skip_while(|(_, ep)| *ep <= Some(first_epoch))
        .filter(|(_, ep)| *ep <= Some(first_epoch))
        .count();
    eprintln!(
        "pause ending mid-stream: {} events arrived, {stale_arrived} stale after the takeover, 0 delivered by the reader",
        arrived.len()
    );
    client.close().await;
    drop(workers);
    env.cleanup().await;
}

// ------------------------------------------------------------ portability

/// A session started on worker A continues on worker B (separate config
/// dirs and workspaces): the mock sees the earlier turns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_moves_between_workers() {
    let env = TestEnv::new(Backend::Postgres).await;
    let replies = Replies::watch(&env).await;
    let key = "fleet:moving";
    let mut a = spawn_worker(&env, 0, &[]);
    wait_for_consumers(&env, 1).await;
    let j1 = env.publish_job(key, "on a", json!({})).await;
    let t1 = replies.terminal(&j1).await;
    assert_eq!(t1.worker.as_deref(), Some(a.id.as_str()));
    let id1 = match &t1.event.body {
        EventBody::Completed {
            claude_session_id, ..
        } => claude_session_id.clone().unwrap(),
        other => panic!("{other:?}"),
    };
    a.stop().await;

    let b = spawn_worker(&env, 1, &[]);
    let j2 = env.publish_job(key, "on b", json!({})).await;
    let started = replies
        .wait_for(&j2, "started on b", |e| {
            matches!(e.body, EventBody::Started { .. })
        })
        .await;
    assert_eq!(started.worker.as_deref(), Some(b.id.as_str()));
    match &started.event.body {
        EventBody::Started {
            claude_session_id,
            resumed,
            resume_failed,
            ..
        } => {
            assert!(*resumed, "{started:?}");
            assert_eq!(resume_failed, &None);
            assert_eq!(claude_session_id.as_deref(), Some(id1.as_str()));
        }
        _ => unreachable!(),
    }
    assert!(is_completed(&replies.terminal(&j2).await.event));
    let req = env
        .mock
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.last_user_text().as_deref() == Some("on b"))
        .unwrap();
    assert_eq!(req.user_texts(), vec!["on a", "on b"]);
    assert_eq!(req.assistant_texts(), vec!["echo: on a"]);
    drop(b);
    env.cleanup().await;
}

// ------------------------------------------------- head-of-line, fairness

/// Session A's turn is held open; session B's job completes meanwhile, on
/// one worker with two slots and across two workers with one slot each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_turn_does_not_block_other_sessions() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let replies = Replies::watch(&env).await;

    // One worker, two slots.
    let one = spawn_worker(&env, 0, &vars(&[("WORKER__MAX_CONCURRENT_TURNS", "2")]));
    wait_for_consumers(&env, 1).await;
    env.mock
        .push_behavior_for("long1", Behavior::hold("long one"));
    let a = env
        .publish_job("hol:a", "slow [[mock:long1]]", json!({}))
        .await;
    env.mock.wait_for_held(1, WAIT).await;
    let b = env.publish_job("hol:b", "quick", json!({})).await;
    assert!(is_completed(&replies.terminal(&b).await.event));
    assert!(
        env.mock.requests_for("long1")[0].finished.is_none(),
        "A still held"
    );
    env.mock.release_held();
    assert!(is_completed(&replies.terminal(&a).await.event));
    drop(one);

    // Two workers, one slot each: B runs on the other worker.
    let v = vars(&[("WORKER__MAX_CONCURRENT_TURNS", "1")]);
    let two: Vec<WorkerProc> = (1..3).map(|n| spawn_worker(&env, n, &v)).collect();
    wait_for_consumers(&env, 2).await;
    env.mock
        .push_behavior_for("long2", Behavior::hold("long two"));
    let a = env
        .publish_job("hol:c", "slow [[mock:long2]]", json!({}))
        .await;
    env.mock.wait_for_held(2, WAIT).await;
    let b = env.publish_job("hol:d", "quick too", json!({})).await;
    let a_started = replies
        .wait_for(&a, "A started", |e| {
            matches!(e.body, EventBody::Started { .. })
        })
        .await;
    let b_done = replies.terminal(&b).await;
    assert!(is_completed(&b_done.event));
    assert_ne!(b_done.worker, a_started.worker);
    assert!(
        env.mock.requests_for("long2")[0].finished.is_none(),
        "A still held"
    );
    env.mock.release_held();
    assert!(is_completed(&replies.terminal(&a).await.event));
    drop(two);
    env.cleanup().await;
}

/// A session with many queued jobs does not starve one with a single job:
/// with one slot, B's job runs right after A's current one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_session_does_not_starve_another() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let replies = Replies::watch(&env).await;
    let store = open_store(&env).await;
    let w = spawn_worker(&env, 0, &vars(&[("WORKER__MAX_CONCURRENT_TURNS", "1")]));
    wait_for_consumers(&env, 1).await;
    env.mock
        .push_behavior_for("busy", Behavior::hold("first of many"));
    let a0 = env
        .publish_job("fair:a", "a0 [[mock:busy]]", json!({}))
        .await;
    env.mock.wait_for_held(1, WAIT).await;
    let mut a_jobs = vec![a0];
    for i in 1..10 {
        a_jobs.push(env.publish_job("fair:a", &format!("a{i}"), json!({})).await);
    }
    let b0 = env.publish_job("fair:b", "b0", json!({})).await;
    // Every job is accepted (in the database) before A's turn ends.
    world::wait_until_async("b0 is accepted", || async {
        store.get_job(&b0).await.unwrap().is_some()
    })
    .await;
    env.mock.release_held();
    let b_done = replies.terminal(&b0).await;
    let a1_done = replies.terminal(&a_jobs[1]).await;
    assert!(
        b_done.at < a1_done.at,
        "B ran before A's second job (least recently served first)"
    );
    for j in &a_jobs {
        assert!(is_completed(&replies.terminal(j).await.event));
    }
    drop(w);
    env.cleanup().await;
}
