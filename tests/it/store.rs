//! One suite of `SessionStore` tests, run against both backends.
//!
//! SQLite tests use a database file in a temporary directory; Postgres tests
//! create a fresh database on `TEST_POSTGRES_URL` (default: the local server
//! with trust auth) and drop it afterwards, also when the test fails.

use std::future::Future;
use std::sync::Arc;

use claude_worker::config::Secret;
use claude_worker::protocol::{PermissionMode, SessionMode};
use claude_worker::store::{
    self, AcceptOutcome, AfterFinish, JobFinish, JobSpec, JobStatus, Lease, NewJob, ReleaseOutcome,
    SessionStatus, SessionStore, SessionUpdate, StoreError, Transcript,
};
use sqlx::{Connection, Executor};

const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const TTL: i64 = 30_000;

/// Where one test's database lives; `open` may be called more than once to
/// get independent stores (separate pools, like separate processes).
struct Ctx {
    url: String,
}

impl Ctx {
    async fn open(&self) -> Arc<dyn SessionStore> {
        let s = store::connect(&Secret::new(self.url.clone()), 8)
            .await
            .expect("connect");
        s.migrate().await.expect("migrate");
        s
    }
}

async fn run_sqlite<F, Fut>(case: F)
where
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("store.db").display());
    case(Ctx { url }).await;
}

/// SQLite with `synchronous=full`: every call goes through sqlx (the fast
/// path runs only with `normal`), so the suite covers both SQLite paths.
async fn run_sqlite_through_sqlx<F, Fut>(case: F)
where
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!(
        "sqlite://{}?synchronous=full",
        dir.path().join("store.db").display()
    );
    case(Ctx { url }).await;
}

/// `base` with its database name replaced by `db` (query string kept).
fn with_database(base: &str, db: &str) -> String {
    let (head, query) = match base.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (base, None),
    };
    let scheme_end = head.find("://").map(|i| i + 3).unwrap_or(0);
    let host_end = head[scheme_end..]
        .find('/')
        .map(|i| scheme_end + i)
        .unwrap_or(head.len());
    let mut url = format!("{}/{db}", &head[..host_end]);
    if let Some(q) = query {
        url.push('?');
        url.push_str(q);
    }
    url
}

async fn run_postgres<F, Fut>(case: F)
where
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let admin_url =
        std::env::var("TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_PG_URL.to_string());
    let mut admin = sqlx::PgConnection::connect(&admin_url)
        .await
        .expect("postgres is reachable (set TEST_POSTGRES_URL)");
    let db = format!("cw_test_{}", uuid::Uuid::new_v4().simple());
    admin
        .execute(format!("CREATE DATABASE {db}").as_str())
        .await
        .expect("create test database");
    // Run the case as a task so a failing assertion still reaches the drop.
    let outcome = tokio::spawn(case(Ctx {
        url: with_database(&admin_url, &db),
    }))
    .await;
    admin
        .execute(format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)").as_str())
        .await
        .expect("drop test database");
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// Generates `sqlite::<case>`, `sqlite_through_sqlx::<case>` and
/// `postgres::<case>` for every case.
macro_rules! store_tests {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    super::run_sqlite(super::$case).await
                }
            )*
        }
        mod sqlite_through_sqlx {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    super::run_sqlite_through_sqlx(super::$case).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    super::run_postgres(super::$case).await
                }
            )*
        }
    };
}

store_tests!(
    accept_and_duplicate,
    duplicate_changes_nothing,
    forget_closes_and_accept_reopens,
    claim_picks_oldest_and_prefer,
    claim_respects_live_lease_and_takes_expired,
    stale_epoch_writes_fail,
    renew_extends_only_our_lease,
    release_reports_more_work,
    abandon_requeues_running_jobs,
    finish_updates_counters_only_with_session_update,
    per_session_order_across_interleaved_sessions,
    listing,
    wrong_job_is_an_error,
    permission_prompts_and_grants,
    concurrent_claimers_one_wins,
    concurrent_claimers_share_sessions,
    release_and_accept_race_never_strands_a_job,
    concurrent_duplicate_accepts_insert_once,
    control_requests_are_claimed_once,
    queued_jobs_end_without_running,
    session_permission_mode_override,
    claims_go_least_recently_served_first,
    yield_hands_back_only_when_others_wait,
    finish_looks_ahead_without_giving_the_lease_up,
    transcripts_are_fenced_and_replaced,
    transcripts_grow_by_chunks_with_the_outcome,
    claude_sessions_belong_to_their_key,
    unpublished_terminals_until_marked,
    lifecycle_events_for_new_reset_idle_and_deleted,
    lifecycle_events_are_claimed_by_one_publisher,
    prune_with_a_moved_clock_and_a_dry_run,
    maintenance_lease_has_one_holder,
    reset_waits_for_a_later_jobs_turn_and_open_jobs_count,
);

// ---------------------------------------------------------------- helpers

fn spec(prompt: &str) -> JobSpec {
    JobSpec {
        prompt: prompt.to_string(),
        mode: SessionMode::Continue,
        claude_session_id: None,
        profile: "default".to_string(),
        model: Some("sonnet".to_string()),
        max_turns: 10,
        permission_mode: PermissionMode::Plan,
        metadata: serde_json::json!({ "chat": 42 }),
        reply_to: Some("replies.x".to_string()),
        on_busy: Default::default(),
        attachments: Vec::new(),
        max_budget_usd: None,
        identity: None,
        compact: false,
        prompt_answerers: Vec::new(),
    }
}

fn new_job(job_id: &str, session_key: &str) -> NewJob {
    NewJob {
        job_id: job_id.to_string(),
        session_key: session_key.to_string(),
        spec: spec(&format!("prompt of {job_id}")),
    }
}

async fn accept(s: &Arc<dyn SessionStore>, job_id: &str, session_key: &str, now: i64) {
    let out = s
        .accept_job(&new_job(job_id, session_key), now)
        .await
        .unwrap();
    assert_eq!(out, AcceptOutcome::Inserted, "{job_id}");
}

fn finish(job_id: &str, status: JobStatus, next_seq: u64, now: i64) -> JobFinish {
    JobFinish {
        job_id: job_id.to_string(),
        status,
        error: (status == JobStatus::Failed).then(|| "boom".to_string()),
        terminal_event: format!(
            "{{\"job_id\":\"{job_id}\",\"type\":\"{}\"}}",
            status.as_str()
        ),
        next_seq,
        session_update: None,
        cost_usd: 0.0,
        identity: None,
        transcript: None,
        now_ms: now,
    }
}

fn update(claude_session_id: &str, input: i64, output: i64) -> SessionUpdate {
    SessionUpdate {
        claude_session_id: claude_session_id.to_string(),
        cwd: "/work/sessions/s".to_string(),
        model: Some("opus".to_string()),
        input_tokens: input,
        output_tokens: output,
        context_tokens: Some(input),
        context_window: None,
    }
}

/// Runs the session's next job to success under `lease`; returns its id.
async fn run_next(s: &Arc<dyn SessionStore>, lease: &Lease, now: i64) -> Option<String> {
    let job = s.next_job(lease).await.unwrap()?;
    s.start_attempt(lease, &job.job_id, now).await.unwrap();
    s.finish_job(lease, &finish(&job.job_id, JobStatus::Succeeded, 2, now))
        .await
        .unwrap();
    Some(job.job_id)
}

fn assert_lease_lost<T: std::fmt::Debug>(r: Result<T, StoreError>, lease: &Lease) {
    match r {
        Err(StoreError::LeaseLost { session_key, epoch }) => {
            assert_eq!(session_key, lease.session_key);
            assert_eq!(epoch, lease.epoch);
        }
        other => panic!("expected LeaseLost, got {other:?}"),
    }
}

// ------------------------------------------------------------------ cases

async fn accept_and_duplicate(ctx: Ctx) {
    let s = ctx.open().await;
    accept(&s, "j1", "chat-1", 100).await;

    let job = s.get_job("j1").await.unwrap().expect("job stored");
    assert_eq!(job.session_key, "chat-1");
    assert_eq!(job.status, JobStatus::Queued);
    assert_eq!((job.attempts, job.next_seq), (0, 0));
    assert_eq!(job.spec, spec("prompt of j1"));
    assert_eq!(job.created_at_ms, 100);
    assert_eq!((job.started_at_ms, job.finished_at_ms), (None, None));
    assert_eq!((job.error, job.terminal_event), (None, None));

    let sess = s
        .get_session("chat-1")
        .await
        .unwrap()
        .expect("session created");
    assert_eq!(sess.status, SessionStatus::Idle);
    assert_eq!(sess.profile, "default");
    assert_eq!((sess.created_at_ms, sess.updated_at_ms), (100, 100));
    assert_eq!(
        (sess.lease_owner, sess.lease_epoch, sess.lease_expires_at_ms),
        (None, 0, None)
    );
    assert_eq!(
        (
            sess.turns,
            sess.input_tokens,
            sess.output_tokens,
            sess.cost_usd
        ),
        (0, 0, 0, 0.0)
    );

    // A redelivery before the job ran.
    let dup = s.accept_job(&new_job("j1", "chat-1"), 200).await.unwrap();
    assert_eq!(
        dup,
        AcceptOutcome::Duplicate {
            status: JobStatus::Queued,
            terminal_event: None
        }
    );

    // A redelivery after it finished carries the terminal event.
    let lease = s
        .claim_session("w1", 300, TTL, None)
        .await
        .unwrap()
        .unwrap();
    s.start_attempt(&lease, "j1", 310).await.unwrap();
    let fin = finish("j1", JobStatus::Succeeded, 5, 320);
    s.finish_job(&lease, &fin).await.unwrap();
    let dup = s.accept_job(&new_job("j1", "chat-1"), 400).await.unwrap();
    assert_eq!(
        dup,
        AcceptOutcome::Duplicate {
            status: JobStatus::Succeeded,
            terminal_event: Some(fin.terminal_event.clone())
        }
    );
    assert_eq!(s.list_jobs("chat-1", 10).await.unwrap().len(), 1);
}

async fn duplicate_changes_nothing(ctx: Ctx) {
    let s = ctx.open().await;
    accept(&s, "j1", "chat-1", 100).await;
    // Same job id under another key: no session, no job, no bump.
    let dup = s.accept_job(&new_job("j1", "chat-2"), 500).await.unwrap();
    assert!(matches!(dup, AcceptOutcome::Duplicate { .. }));
    assert!(s.get_session("chat-2").await.unwrap().is_none());
    assert_eq!(
        s.get_session("chat-1")
            .await
            .unwrap()
            .unwrap()
            .updated_at_ms,
        100
    );
    assert_eq!(
        s.get_job("j1").await.unwrap().unwrap().session_key,
        "chat-1"
    );
    assert_eq!(s.list_sessions(10).await.unwrap().len(), 1);

    // A second job for a known session only bumps updated_at.
    accept(&s, "j2", "chat-1", 600).await;
    let sess = s.get_session("chat-1").await.unwrap().unwrap();
    assert_eq!((sess.created_at_ms, sess.updated_at_ms), (100, 600));
    assert_eq!(sess.status, SessionStatus::Idle);
}

async fn forget_closes_and_accept_reopens(ctx: Ctx) {
    let s = ctx.open().await;
    assert!(!s.forget_session("nobody", 1).await.unwrap());

    accept(&s, "j1", "chat-1", 100).await;
    let lease = s
        .claim_session("w1", 110, TTL, None)
        .await
        .unwrap()
        .unwrap();
    let job = s.next_job(&lease).await.unwrap().unwrap();
    s.start_attempt(&lease, &job.job_id, 120).await.unwrap();
    let mut fin = finish("j1", JobStatus::Succeeded, 3, 130);
    fin.session_update = Some(update("c-1", 1, 2));
    s.finish_job(&lease, &fin).await.unwrap();
    assert_eq!(
        s.release_lease(&lease, 140).await.unwrap(),
        ReleaseOutcome::Released
    );

    assert!(s.forget_session("chat-1", 200).await.unwrap());
    let sess = s.get_session("chat-1").await.unwrap().unwrap();
    assert_eq!(sess.status, SessionStatus::Closed);
    assert_eq!(sess.claude_session_id, None);
    assert_eq!(sess.updated_at_ms, 200);
    assert_eq!(sess.turns, 1, "history counters are kept");

    accept(&s, "j2", "chat-1", 300).await;
    let sess = s.get_session("chat-1").await.unwrap().unwrap();
    assert_eq!(sess.status, SessionStatus::Idle);
    assert_eq!(sess.claude_session_id, None);
    assert_eq!(sess.updated_at_ms, 300);
}

async fn claim_picks_oldest_and_prefer(ctx: Ctx) {
    let s = ctx.open().await;
    assert_eq!(s.claim_session("w1", 100, TTL, None).await.unwrap(), None);

    accept(&s, "b1", "B", 100).await;
    accept(&s, "a1", "A", 101).await;
    accept(&s, "b2", "B", 102).await;
    accept(&s, "c1", "C", 103).await;

    // `prefer` wins when claimable.
    let c = s
        .claim_session("w1", 200, TTL, Some("C"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        c,
        Lease {
            session_key: "C".into(),
            owner: "w1".into(),
            epoch: 1
        }
    );
    // Leased, unknown or workless preferences fall back to the oldest job.
    let b = s
        .claim_session("w1", 200, TTL, Some("C"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(b.session_key, "B");
    let a = s
        .claim_session("w1", 200, TTL, Some("nope"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.session_key, "A");
    assert_eq!(s.claim_session("w1", 200, TTL, None).await.unwrap(), None);

    let sess = s.get_session("B").await.unwrap().unwrap();
    assert_eq!(sess.status, SessionStatus::Active);
    assert_eq!(sess.lease_owner.as_deref(), Some("w1"));
    assert_eq!(sess.lease_epoch, 1);
    assert_eq!(sess.lease_expires_at_ms, Some(200 + TTL));

    // A session whose jobs are all finished is not claimable.
    while run_next(&s, &a, 300).await.is_some() {}
    assert_eq!(
        s.release_lease(&a, 310).await.unwrap(),
        ReleaseOutcome::Released
    );
    assert_eq!(
        s.claim_session("w2", 400, TTL, Some("A")).await.unwrap(),
        None
    );
}

async fn claim_respects_live_lease_and_takes_expired(ctx: Ctx) {
    let s = ctx.open().await;
    accept(&s, "j1", "S", 100).await;
    let l1 = s
        .claim_session("w1", 1_000, 100, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(l1.epoch, 1);
    assert_eq!(s.next_job(&l1).await.unwrap().unwrap().job_id, "j1");
    assert_eq!(s.start_attempt(&l1, "j1", 1_010).await.unwrap(), 1);

    // Live until (and including) its expiry instant.
    assert_eq!(s.claim_session("w2", 1_050, 100, None).await.unwrap(), None);
    assert_eq!(
        s.claim_session("w2", 1_100, 100, Some("S")).await.unwrap(),
        None
    );

    // Expired with a running job left behind: taken over, interrupted.
    let l2 = s
        .claim_session("w2", 1_101, 100, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        l2,
        Lease {
            session_key: "S".into(),
            owner: "w2".into(),
            epoch: 2
        }
    );
    let sess = s.get_session("S").await.unwrap().unwrap();
    assert_eq!(sess.status, SessionStatus::Interrupted);
    assert_eq!(sess.lease_owner.as_deref(), Some("w2"));
    assert_eq!(sess.lease_expires_at_ms, Some(1_201));

    // The running job is resumed first, and its attempt counted.
    accept(&s, "j2", "S", 1_150).await;
    let next = s.next_job(&l2).await.unwrap().unwrap();
    assert_eq!(
        (next.job_id.as_str(), next.status),
        ("j1", JobStatus::Running)
    );
    assert_eq!(s.start_attempt(&l2, "j1", 1_160).await.unwrap(), 2);
    let job = s.get_job("j1").await.unwrap().unwrap();
    assert_eq!(job.started_at_ms, Some(1_010), "first start is kept");
    assert_eq!(
        s.get_session("S").await.unwrap().unwrap().status,
        SessionStatus::Active
    );

    // An expired lease with only queued work is claimed as `active`.
    s.finish_job(&l2, &finish("j1", JobStatus::Succeeded, 1, 1_170))
        .await
        .unwrap();
    let l3 = s
        .claim_session("w3", 5_000, 100, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(l3.epoch, 3);
    assert_eq!(
        s.get_session("S").await.unwrap().unwrap().status,
        SessionStatus::Active
    );
}

async fn stale_epoch_writes_fail(ctx: Ctx) {
    let s = ctx.open().await;
    accept(&s, "j1", "S", 100).await;
    let old = s
        .claim_session("w1", 1_000, 100, None)
        .await
        .unwrap()
        .unwrap();
    s.start_attempt(&old, "j1", 1_001).await.unwrap();
    s.record_seq(&old, "j1", 3).await.unwrap();

    // The same owner re-claiming after expiry still fences the old epoch.
    let new = s
        .claim_session("w1", 2_000, 100, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(new.epoch, old.epoch + 1);

    assert_lease_lost(s.record_seq(&old, "j1", 9).await, &old);
    assert_lease_lost(
        s.finish_job(&old, &finish("j1", JobStatus::Failed, 9, 2_001))
            .await,
        &old,
    );
    assert_lease_lost(s.start_attempt(&old, "j1", 2_002).await, &old);
    assert_lease_lost(s.next_job(&old).await, &old);
    assert_lease_lost(s.release_lease(&old, 2_003).await, &old);
    assert_lease_lost(s.abandon_lease(&old, 2_004).await, &old);
    assert!(!s.renew_lease(&old, 2_005, 100).await.unwrap());

    // Nothing the old holder tried landed.
    let job = s.get_job("j1").await.unwrap().unwrap();
    assert_eq!(
        (job.status, job.attempts, job.next_seq),
        (JobStatus::Running, 1, 3)
    );
    assert_eq!(job.finished_at_ms, None);
    let sess = s.get_session("S").await.unwrap().unwrap();
    assert_eq!(
        (sess.lease_epoch, sess.lease_expires_at_ms),
        (new.epoch, Some(2_100))
    );
    assert_eq!(sess.last_job_id, None);

    // The new holder carries on.
    s.record_seq(&new, "j1", 4).await.unwrap();
    assert_eq!(s.start_attempt(&new, "j1", 2_010).await.unwrap(), 2);

    // A released lease is fenced too.
    s.finish_job(&new, &finish("j1", JobStatus::Succeeded, 6, 2_020))
        .await
        .unwrap();
    assert_eq!(
        s.release_lease(&new, 2_030).await.unwrap(),
        ReleaseOutcome::Released
    );
    assert_lease_lost(s.record_seq(&new, "j1", 7).await, &new);
    assert_lease_lost(s.next_job(&new).await, &new);
    assert_eq!(s.get_job("j1").await.unwrap().unwrap().next_seq, 6);
}

async fn renew_extends_only_our_lease(ctx: Ctx) {
    let s = ctx.open().await;
    accept(&s, "j1", "S", 100).await;
    let l = s
        .claim_session("w1", 1_000, 100, None)
        .await
        .unwrap()
        .unwrap();
    assert!(s.renew_lease(&l, 1_050, 100).await.unwrap());
    assert_eq!(
        s.get_session("S")
            .await
            .unwrap()
            .unwrap()
            .lease_expires_at_ms,
        Some(1_150)
    );
    // Expired but not yet claimed by anyone: still ours (fencing is by epoch).
    assert!(s.renew_lease(&l, 5_000, 100).await.unwrap());
    assert_eq!(s.claim_session("w2", 5_050, 100, None).await.unwrap(), None);

    let wrong_owner = Lease {
        owner: "w2".into(),
        ..l.clone()
    };
    assert!(!s.renew_lease(&wrong_owner, 5_060, 100).await.unwrap());
    let wrong_epoch = Lease {
        epoch: l.epoch + 1,
        ..l.clone()
    };
    assert!(!s.renew_lease(&wrong_epoch, 5_060, 100).await.unwrap());
    assert_eq!(
        s.get_session("S")
            .await
            .unwrap()
            .unwrap()
            .lease_expires_at_ms,
        Some(5_100)
    );
}

async fn release_reports_more_work(ctx: Ctx) {
    let s = ctx.open().await;
    accept(&s, "j1", "S", 100).await;
    let l = s
        .claim_session("w1", 1_000, TTL, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(run_next(&s, &l, 1_010).await.as_deref(), Some("j1"));
    assert_eq!(
        s.get_session("S").await.unwrap().unwrap().status,
        SessionStatus::Active
    );

    // A job arrived while the first ran: keep the lease.
    accept(&s, "j2", "S", 1_020).await;
    assert_eq!(
        s.release_lease(&l, 1_030).await.unwrap(),
        ReleaseOutcome::MoreWork
    );
    let sess = s.get_session("S").await.unwrap().unwrap();
    assert_eq!(
        (sess.lease_owner.as_deref(), sess.lease_epoch),
        (Some("w1"), 1)
    );
    assert_eq!(sess.status, SessionStatus::Active);
    assert_eq!(s.claim_session("w2", 1_040, TTL, None).await.unwrap(), None);

    assert_eq!(run_next(&s, &l, 1_050).await.as_deref(), Some("j2"));
    assert_eq!(s.next_job(&l).await.unwrap(), None);
    assert_eq!(
        s.release_lease(&l, 1_060).await.unwrap(),
        ReleaseOutcome::Released
    );
    let sess = s.get_session("S").await.unwrap().unwrap();
    assert_eq!(sess.status, SessionStatus::Idle);
    assert_eq!((sess.lease_owner, sess.lease_expires_at_ms), (None, None));
    assert_eq!(sess.lease_epoch, 1, "release keeps the epoch");
    assert_eq!(sess.updated_at_ms, 1_060);

    accept(&s, "j3", "S", 1_070).await;
    let l2 = s
        .claim_session("w2", 1_080, TTL, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(l2.epoch, 2);
}

async fn abandon_requeues_running_jobs(ctx: Ctx) {
    let s = ctx.open().await;
    accept(&s, "j1", "S", 100).await;
    accept(&s, "j2", "S", 101).await;
    let l = s
        .claim_session("w1", 1_000, TTL, None)
        .await
        .unwrap()
        .unwrap();
    s.start_attempt(&l, "j1", 1_010).await.unwrap();
    s.record_seq(&l, "j1", 2).await.unwrap();

    s.abandon_lease(&l, 1_020).await.unwrap();
    let job = s.get_job("j1").await.unwrap().unwrap();
    assert_eq!(
        (job.status, job.attempts, job.next_seq),
        (JobStatus::Queued, 1, 2)
    );
    assert_eq!(
        s.get_job("j2").await.unwrap().unwrap().status,
        JobStatus::Queued
    );
    let sess = s.get_session("S").await.unwrap().unwrap();
    assert_eq!(sess.status, SessionStatus::Idle);
    assert_eq!(
        (sess.lease_owner, sess.lease_expires_at_ms, sess.lease_epoch),
        (None, None, 1)
    );

    // Claimable at once, without waiting for the TTL, and not `interrupted`.
    let l2 = s
        .claim_session("w2", 1_030, TTL, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(l2.epoch, 2);
    assert_eq!(
        s.get_session("S").await.unwrap().unwrap().status,
        SessionStatus::Active
    );
    assert_eq!(s.next_job(&l2).await.unwrap().unwrap().job_id, "j1");
    assert_lease_lost(s.abandon_lease(&l, 1_040).await, &l);
}

async fn finish_updates_counters_only_with_session_update(ctx: Ctx) {
    let s = ctx.open().await;
    for (i, id) in ["j1", "j2", "j3"].iter().enumerate() {
        accept(&s, id, "S", 100 + i as i64).await;
    }
    let l = s
        .claim_session("w1", 1_000, TTL, None)
        .await
        .unwrap()
        .unwrap();

    s.start_attempt(&l, "j1", 1_010).await.unwrap();
    let mut f1 = finish("j1", JobStatus::Succeeded, 7, 1_020);
    f1.session_update = Some(update("c-1", 10, 20));
    f1.cost_usd = 0.5;
    f1.identity = Some("alice".into());
    s.finish_job(&l, &f1).await.unwrap();

    let job = s.get_job("j1").await.unwrap().unwrap();
    assert_eq!(job.status, JobStatus::Succeeded);
    assert_eq!(job.next_seq, 7);
    assert!((job.cost_usd - 0.5).abs() < 1e-9);
    assert_eq!(
        job.terminal_event.as_deref(),
        Some(f1.terminal_event.as_str())
    );
    assert_eq!(
        (job.started_at_ms, job.finished_at_ms),
        (Some(1_010), Some(1_020))
    );
    assert_eq!(job.error, None);
    let sess = s.get_session("S").await.unwrap().unwrap();
    assert_eq!(sess.claude_session_id.as_deref(), Some("c-1"));
    assert_eq!(sess.cwd.as_deref(), Some("/work/sessions/s"));
    assert_eq!(sess.model.as_deref(), Some("opus"));
    assert_eq!(
        (sess.turns, sess.input_tokens, sess.output_tokens),
        (1, 10, 20)
    );
    assert!((sess.cost_usd - 0.5).abs() < 1e-9);
    assert_eq!((sess.context_tokens, sess.context_window), (Some(10), None));
    assert_eq!(sess.last_job_id.as_deref(), Some("j1"));
    assert_eq!(sess.updated_at_ms, 1_020);
    assert_eq!(sess.status, SessionStatus::Active, "still held");

    // A failed turn: job outcome stored, session counters untouched but
    // for its cost (a turn that failed may still have cost money).
    s.start_attempt(&l, "j2", 1_030).await.unwrap();
    let mut f2 = finish("j2", JobStatus::Failed, 1, 1_040);
    f2.cost_usd = 0.125;
    f2.identity = Some("alice".into());
    s.finish_job(&l, &f2).await.unwrap();
    let job = s.get_job("j2").await.unwrap().unwrap();
    assert_eq!(
        (job.status, job.error.as_deref()),
        (JobStatus::Failed, Some("boom"))
    );
    let sess = s.get_session("S").await.unwrap().unwrap();
    assert_eq!(sess.claude_session_id.as_deref(), Some("c-1"));
    assert_eq!(
        (sess.turns, sess.input_tokens, sess.output_tokens),
        (1, 10, 20)
    );
    assert_eq!(sess.last_job_id.as_deref(), Some("j2"));
    assert_eq!(sess.updated_at_ms, 1_040);
    assert!((sess.cost_usd - 0.625).abs() < 1e-9, "{}", sess.cost_usd);

    // Counters add up.
    s.start_attempt(&l, "j3", 1_050).await.unwrap();
    let mut f3 = finish("j3", JobStatus::Succeeded, 4, 1_060);
    f3.session_update = Some(update("c-2", 5, 6));
    f3.cost_usd = 0.25;
    f3.identity = Some("bob".into());
    s.finish_job(&l, &f3).await.unwrap();
    let sess = s.get_session("S").await.unwrap().unwrap();
    assert_eq!(sess.claude_session_id.as_deref(), Some("c-2"));
    assert_eq!(
        (sess.turns, sess.input_tokens, sess.output_tokens),
        (2, 15, 26)
    );
    assert!((sess.cost_usd - 0.875).abs() < 1e-9);
    assert_eq!(sess.context_tokens, Some(5), "the last turn's context");

    // Per-identity spend over a window: the jobs that finished in it.
    let spend = |who: &'static str, since: i64| {
        let s = s.clone();
        async move { s.identity_spend(who, since).await.unwrap() }
    };
    assert!((spend("alice", 0).await - 0.625).abs() < 1e-9);
    assert!((spend("alice", 1_030).await - 0.125).abs() < 1e-9);
    assert_eq!(spend("alice", 1_041).await, 0.0);
    assert!((spend("bob", 1_060).await - 0.25).abs() < 1e-9);
    assert_eq!(spend("carol", 0).await, 0.0);
    let job = s.get_job("j3").await.unwrap().unwrap();
    assert_eq!(job.spec.identity, None, "the spec is as accepted");
}

async fn per_session_order_across_interleaved_sessions(ctx: Ctx) {
    let s = ctx.open().await;
    let plan = [
        ("a1", "A"),
        ("b1", "B"),
        ("a2", "A"),
        ("c1", "C"),
        ("b2", "B"),
        ("a3", "A"),
        ("c2", "C"),
    ];
    for (i, (id, key)) in plan.iter().enumerate() {
        accept(&s, id, key, 100 + i as i64).await;
    }
    let orders: Vec<i64> = {
        let mut v = Vec::new();
        for (id, _) in plan {
            v.push(s.get_job(id).await.unwrap().unwrap().order);
        }
        v
    };
    assert!(
        orders.windows(2).all(|w| w[0] < w[1]),
        "acceptance order grows: {orders:?}"
    );

    let mut ran: Vec<(String, Vec<String>)> = Vec::new();
    while let Some(l) = s.claim_session("w1", 1_000, TTL, None).await.unwrap() {
        let mut ids = Vec::new();
        while let Some(id) = run_next(&s, &l, 1_000).await {
            ids.push(id);
        }
        assert_eq!(
            s.release_lease(&l, 1_000).await.unwrap(),
            ReleaseOutcome::Released
        );
        ran.push((l.session_key.clone(), ids));
    }
    let expect = |k: &str, ids: &[&str]| {
        (
            k.to_string(),
            ids.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
    };
    assert_eq!(
        ran,
        vec![
            expect("A", &["a1", "a2", "a3"]),
            expect("B", &["b1", "b2"]),
            expect("C", &["c1", "c2"]),
        ]
    );
}

async fn listing(ctx: Ctx) {
    let s = ctx.open().await;
    for i in 0..5 {
        accept(&s, &format!("a{i}"), "A", 100 + i).await;
    }
    accept(&s, "b0", "B", 200).await;
    accept(&s, "c0", "C", 150).await;

    let jobs = s.list_jobs("A", 3).await.unwrap();
    let ids: Vec<&str> = jobs.iter().map(|j| j.job_id.as_str()).collect();
    assert_eq!(ids, ["a2", "a3", "a4"], "most recent three, oldest first");
    assert_eq!(s.list_jobs("A", 100).await.unwrap().len(), 5);
    assert!(s.list_jobs("nobody", 10).await.unwrap().is_empty());

    let keys: Vec<String> = s
        .list_sessions(10)
        .await
        .unwrap()
        .into_iter()
        .map(|x| x.session_key)
        .collect();
    assert_eq!(keys, ["B", "C", "A"]);
    let keys: Vec<String> = s
        .list_sessions(2)
        .await
        .unwrap()
        .into_iter()
        .map(|x| x.session_key)
        .collect();
    assert_eq!(keys, ["B", "C"]);
}

async fn wrong_job_is_an_error(ctx: Ctx) {
    let s = ctx.open().await;
    accept(&s, "a1", "A", 100).await;
    accept(&s, "b1", "B", 101).await;
    let la = s
        .claim_session("w1", 1_000, TTL, Some("A"))
        .await
        .unwrap()
        .unwrap();
    // Another session's job, an unknown job, a non-terminal finish.
    assert!(matches!(
        s.start_attempt(&la, "b1", 1_001).await,
        Err(StoreError::NotRunnable(_))
    ));
    assert!(matches!(
        s.record_seq(&la, "nope", 1).await,
        Err(StoreError::Other(_))
    ));
    assert!(matches!(
        s.finish_job(&la, &finish("a1", JobStatus::Running, 1, 1_002))
            .await,
        Err(StoreError::Other(_))
    ));
    assert_eq!(
        s.get_job("b1").await.unwrap().unwrap().status,
        JobStatus::Queued
    );
    assert_eq!(
        s.get_job("a1").await.unwrap().unwrap().status,
        JobStatus::Queued
    );
    // A finished job is not started again.
    run_next(&s, &la, 1_003).await.unwrap();
    assert!(matches!(
        s.start_attempt(&la, "a1", 1_004).await,
        Err(StoreError::NotRunnable(_))
    ));
    assert!(s.get_job("zzz").await.unwrap().is_none());
    assert!(s.get_session("zzz").await.unwrap().is_none());
}

async fn concurrent_claimers_one_wins(ctx: Ctx) {
    // Two stores on one database: two processes as far as the DB can tell.
    let stores = [ctx.open().await, ctx.open().await];
    accept(&stores[0], "j1", "S", 100).await;

    let mut tasks = Vec::new();
    for i in 0..8 {
        let s = stores[i % 2].clone();
        tasks.push(tokio::spawn(async move {
            s.claim_session(&format!("w{i}"), 1_000, TTL, Some("S"))
                .await
                .unwrap()
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        if let Some(l) = t.await.unwrap() {
            winners.push(l);
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    let sess = stores[1].get_session("S").await.unwrap().unwrap();
    assert_eq!(sess.lease_owner.as_deref(), Some(winners[0].owner.as_str()));
    assert_eq!((sess.lease_epoch, winners[0].epoch), (1, 1));
}

async fn concurrent_claimers_share_sessions(ctx: Ctx) {
    let stores = [ctx.open().await, ctx.open().await];
    for i in 0..12 {
        accept(
            &stores[i % 2],
            &format!("j{i}"),
            &format!("S{}", i % 6),
            100 + i as i64,
        )
        .await;
    }
    let mut tasks = Vec::new();
    for i in 0..8 {
        let s = stores[i % 2].clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(l) = s
                .claim_session(&format!("w{i}"), 1_000, TTL, None)
                .await
                .unwrap()
            {
                got.push(l.session_key);
            }
            got
        }));
    }
    let mut claimed = Vec::new();
    for t in tasks {
        claimed.extend(t.await.unwrap());
    }
    claimed.sort();
    let expect: Vec<String> = (0..6).map(|i| format!("S{i}")).collect();
    assert_eq!(claimed, expect, "every session claimed exactly once");
}

async fn release_and_accept_race_never_strands_a_job(ctx: Ctx) {
    let stores = [ctx.open().await, ctx.open().await];
    for round in 0..20i64 {
        let key = format!("S{round}");
        accept(&stores[0], &format!("first{round}"), &key, 100).await;
        let lease = stores[0]
            .claim_session("w1", 1_000, TTL, Some(&key))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(lease.session_key, key);
        run_next(&stores[0], &lease, 1_000).await.unwrap();

        let releaser = {
            let s = stores[0].clone();
            let lease = lease.clone();
            tokio::spawn(async move { s.release_lease(&lease, 1_001).await.unwrap() })
        };
        let accepter = {
            let s = stores[1].clone();
            let (id, key) = (format!("second{round}"), key.clone());
            tokio::spawn(async move { s.accept_job(&new_job(&id, &key), 1_001).await.unwrap() })
        };
        let released = releaser.await.unwrap();
        assert_eq!(accepter.await.unwrap(), AcceptOutcome::Inserted);

        // Either the holder was told about the job, or anyone can claim it.
        match released {
            ReleaseOutcome::MoreWork => {
                assert_eq!(
                    run_next(&stores[0], &lease, 1_002).await,
                    Some(format!("second{round}"))
                );
                assert_eq!(
                    stores[0].release_lease(&lease, 1_003).await.unwrap(),
                    ReleaseOutcome::Released
                );
            }
            ReleaseOutcome::Released => {
                let l2 = stores[1]
                    .claim_session("w2", 1_002, TTL, None)
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(l2.session_key, key);
                assert_eq!(
                    run_next(&stores[1], &l2, 1_002).await,
                    Some(format!("second{round}"))
                );
                assert_eq!(
                    stores[1].release_lease(&l2, 1_003).await.unwrap(),
                    ReleaseOutcome::Released
                );
            }
        }
        assert_eq!(
            stores[1]
                .get_job(&format!("second{round}"))
                .await
                .unwrap()
                .unwrap()
                .status,
            JobStatus::Succeeded
        );
    }
}

async fn concurrent_duplicate_accepts_insert_once(ctx: Ctx) {
    // A redelivery racing the original delivery on another worker.
    let stores = [ctx.open().await, ctx.open().await];
    let mut tasks = Vec::new();
    for i in 0..8 {
        let s = stores[i % 2].clone();
        tasks.push(tokio::spawn(async move {
            s.accept_job(&new_job("j1", "S"), 100 + i as i64)
                .await
                .unwrap()
        }));
    }
    let mut inserted = 0;
    for t in tasks {
        match t.await.unwrap() {
            AcceptOutcome::Inserted => inserted += 1,
            AcceptOutcome::Duplicate {
                status,
                terminal_event,
            } => {
                assert_eq!((status, terminal_event), (JobStatus::Queued, None));
            }
        }
    }
    assert_eq!(inserted, 1);
    assert_eq!(stores[0].list_jobs("S", 10).await.unwrap().len(), 1);
}

// ---------------------------------------------------------------- fleet

async fn claims_go_least_recently_served_first(ctx: Ctx) {
    let s = ctx.open().await;
    // A has many jobs, accepted first; B one, accepted later.
    for i in 0..5 {
        accept(&s, &format!("a{i}"), "A", 100 + i).await;
    }
    accept(&s, "b0", "B", 200).await;
    let a = s
        .claim_session("w1", 300, TTL, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.session_key, "A", "never served: oldest job first");
    assert_eq!(run_next(&s, &a, 310).await.as_deref(), Some("a0"));
    assert!(
        s.yield_lease(&a, 320).await.unwrap(),
        "B waits: A hands back"
    );
    // A was served at 300, B never: B goes first, even preferring A.
    let b = s
        .claim_session("w1", 330, TTL, Some("A"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(b.session_key, "B");
    let a2 = s
        .claim_session("w2", 340, TTL, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a2.session_key, "A");
    assert_eq!(a2.epoch, a.epoch + 1);
    assert_eq!(
        s.get_session("A").await.unwrap().unwrap().status,
        SessionStatus::Active
    );
    // The old holder's writes are refused after the hand-back.
    assert!(matches!(
        s.yield_lease(&a, 350).await,
        Err(StoreError::LeaseLost { .. })
    ));
}

async fn yield_hands_back_only_when_others_wait(ctx: Ctx) {
    let s = ctx.open().await;
    accept(&s, "a0", "A", 100).await;
    accept(&s, "a1", "A", 101).await;
    let a = s
        .claim_session("w1", 200, TTL, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(run_next(&s, &a, 210).await.as_deref(), Some("a0"));
    assert!(
        !s.yield_lease(&a, 220).await.unwrap(),
        "nobody waits: keep it"
    );
    // B's lease is live (held elsewhere): not waiting for a worker.
    accept(&s, "b0", "B", 230).await;
    let b = s
        .claim_session("w2", 240, TTL, Some("B"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(b.session_key, "B");
    assert!(!s.yield_lease(&a, 250).await.unwrap());
    // C is claimable: A hands back; its queued job stays queued.
    accept(&s, "c0", "C", 260).await;
    assert!(s.yield_lease(&a, 270).await.unwrap());
    let sess = s.get_session("A").await.unwrap().unwrap();
    assert_eq!(sess.lease_owner, None);
    assert_eq!(
        s.get_job("a1").await.unwrap().unwrap().status,
        JobStatus::Queued
    );
}

/// The outcome's transaction also looks ahead: nobody waits → the next job
/// (or none); someone waits → says so and keeps the lease (the terminal
/// event goes out before anyone else runs the session).
async fn finish_looks_ahead_without_giving_the_lease_up(ctx: Ctx) {
    let s = ctx.open().await;
    accept(&s, "a0", "A", 100).await;
    accept(&s, "a1", "A", 101).await;
    let a = s
        .claim_session("w1", 200, TTL, None)
        .await
        .unwrap()
        .unwrap();
    let a0 = s.next_job(&a).await.unwrap().unwrap();
    assert_eq!(a0.job_id, "a0");
    s.start_attempt(&a, "a0", 210).await.unwrap();
    let after = s
        .finish_job_and_look(&a, &finish("a0", JobStatus::Succeeded, 2, 220))
        .await
        .unwrap();
    assert!(!after.others_waiting, "nobody waits");
    let next = after.next.expect("a1 is next");
    assert_eq!(next.job.job_id, "a1");
    assert_eq!(next.job.status, JobStatus::Queued);
    assert_eq!(next.session.session_key, "A");
    let a0 = s.get_job("a0").await.unwrap().unwrap();
    assert_eq!(a0.status, JobStatus::Succeeded);
    assert_eq!(a0.next_seq, 2);

    // C is claimable: finishing a1 reports it and still holds A's lease
    // (and reads A's next job all the same; there is none).
    accept(&s, "c0", "C", 230).await;
    s.start_attempt(&a, "a1", 240).await.unwrap();
    let after = s
        .finish_job_and_look(&a, &finish("a1", JobStatus::Failed, 3, 250))
        .await
        .unwrap();
    assert!(after.others_waiting, "C waits for a worker");
    assert_eq!(after.next, None, "nothing left of A");
    assert_eq!(
        s.get_job("a1").await.unwrap().unwrap().status,
        JobStatus::Failed
    );
    let sess = s.get_session("A").await.unwrap().unwrap();
    assert_eq!(sess.lease_owner.as_deref(), Some("w1"));
    let c = s
        .claim_session("w2", 260, TTL, Some("C"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.session_key, "C");
    s.start_attempt(&c, "c0", 270).await.unwrap();
    assert_eq!(
        s.finish_job_and_look(&c, &finish("c0", JobStatus::Succeeded, 2, 280))
            .await
            .unwrap(),
        AfterFinish {
            others_waiting: false,
            next: None
        }
    );

    // Fenced: a stale lease writes nothing.
    accept(&s, "c1", "C", 290).await;
    let stale = Lease {
        epoch: c.epoch - 1,
        ..c.clone()
    };
    assert_lease_lost(
        s.finish_job_and_look(&stale, &finish("c1", JobStatus::Succeeded, 2, 300))
            .await,
        &stale,
    );
    assert_eq!(
        s.get_job("c1").await.unwrap().unwrap().status,
        JobStatus::Queued
    );
}

async fn transcripts_are_fenced_and_replaced(ctx: Ctx) {
    let s = ctx.open().await;
    assert_eq!(s.get_transcript("cs1").await.unwrap(), None);
    accept(&s, "j1", "S", 100).await;
    let l1 = s
        .claim_session("w1", 200, 100, None)
        .await
        .unwrap()
        .unwrap();
    let t = |data: &[u8], at: i64| Transcript {
        claude_session_id: "cs1".into(),
        session_key: "S".into(),
        data: data.to_vec(),
        size_bytes: data.len() as i64 * 10,
        sha256: Some(format!("{:064x}", data.len())),
        updated_at_ms: at,
    };
    s.put_transcript(&l1, &t(b"one", 210)).await.unwrap();
    s.put_transcript(&l1, &t(b"two\0bytes", 220)).await.unwrap();
    assert_eq!(
        s.get_transcript("cs1").await.unwrap(),
        Some(t(b"two\0bytes", 220))
    );
    // Another worker takes the expired lease: the old holder is refused.
    let l2 = s
        .claim_session("w2", 1_000, 100, None)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(
        s.put_transcript(&l1, &t(b"stale", 1_010)).await,
        Err(StoreError::LeaseLost { .. })
    ));
    // Only under the lease of its own session.
    let mut other = t(b"x", 1_020);
    other.session_key = "T".into();
    assert!(s.put_transcript(&l2, &other).await.is_err());
    assert_eq!(
        s.get_transcript("cs1").await.unwrap(),
        Some(t(b"two\0bytes", 220))
    );
}

/// A transcript stored as a base and chunks (gzip members), appended only
/// onto the transcript it continues, committed with the outcome.
async fn transcripts_grow_by_chunks_with_the_outcome(ctx: Ctx) {
    use claude_worker::store::{TranscriptAppend, TranscriptWrite};
    let s = ctx.open().await;
    for j in ["j1", "j2", "j3"] {
        accept(&s, j, "S", 100).await;
    }
    let l1 = s
        .claim_session("w1", 200, 100, None)
        .await
        .unwrap()
        .unwrap();
    let base = Transcript {
        claude_session_id: "cs1".into(),
        session_key: "S".into(),
        data: b"BASE".to_vec(),
        size_bytes: 4,
        sha256: Some("h1".into()),
        updated_at_ms: 210,
    };
    s.put_transcript(&l1, &base).await.unwrap();
    let chunk = |prev: &str, data: &[u8], size: i64, sha: &str| TranscriptAppend {
        claude_session_id: "cs1".into(),
        session_key: "S".into(),
        prev_sha256: prev.into(),
        chunk: data.to_vec(),
        size_bytes: size,
        sha256: sha.into(),
        updated_at_ms: 220,
    };
    // With the outcome, in one transaction.
    let mut f1 = finish("j1", JobStatus::Succeeded, 3, 215);
    f1.transcript = Some(TranscriptWrite::Append(chunk("h1", b"+one", 8, "h2")));
    s.finish_job(&l1, &f1).await.unwrap();
    s.append_transcript(&l1, &chunk("h2", b"+two", 12, "h3"))
        .await
        .unwrap();
    let got = s.get_transcript("cs1").await.unwrap().unwrap();
    assert_eq!(got.data, b"BASE+one+two");
    assert_eq!((got.size_bytes, got.sha256.as_deref()), (12, Some("h3")));
    // An append onto another transcript than the stored one: refused, and
    // with it the outcome it came with.
    let mut f2 = finish("j2", JobStatus::Succeeded, 3, 230);
    f2.transcript = Some(TranscriptWrite::Append(chunk("h2", b"+stale", 14, "hX")));
    assert!(matches!(
        s.finish_job(&l1, &f2).await,
        Err(StoreError::TranscriptChanged(_))
    ));
    assert_eq!(
        s.get_job("j2").await.unwrap().unwrap().status,
        JobStatus::Queued
    );
    assert_eq!(
        s.get_transcript("cs1").await.unwrap().unwrap().data,
        b"BASE+one+two"
    );
    // A whole write replaces base and chunks.
    f2.transcript = Some(TranscriptWrite::Full(Transcript {
        data: b"WHOLE".to_vec(),
        size_bytes: 5,
        sha256: Some("h4".into()),
        ..base.clone()
    }));
    s.finish_job(&l1, &f2).await.unwrap();
    let got = s.get_transcript("cs1").await.unwrap().unwrap();
    assert_eq!(
        (got.data.as_slice(), got.sha256.as_deref()),
        (&b"WHOLE"[..], Some("h4"))
    );
    // A lost lease writes nothing, chunk or outcome.
    let _l2 = s
        .claim_session("w2", 1_000, 100, None)
        .await
        .unwrap()
        .unwrap();
    let mut f3 = finish("j3", JobStatus::Succeeded, 3, 1_010);
    f3.transcript = Some(TranscriptWrite::Append(chunk("h4", b"+late", 10, "h5")));
    assert!(matches!(
        s.finish_job(&l1, &f3).await,
        Err(StoreError::LeaseLost { .. })
    ));
    assert_eq!(
        s.get_transcript("cs1").await.unwrap().unwrap().data,
        b"WHOLE"
    );
}

async fn control_requests_are_claimed_once(ctx: Ctx) {
    let s = ctx.open().await;
    let other = ctx.open().await;
    assert!(s.claim_control("req-1", 1).await.unwrap());
    assert!(!other.claim_control("req-1", 2).await.unwrap());
    assert!(other.claim_control("req-2", 3).await.unwrap());
}

async fn queued_jobs_end_without_running(ctx: Ctx) {
    let s = ctx.open().await;
    accept(&s, "q1", "S", 100).await;
    accept(&s, "q2", "S", 101).await;
    let done = s
        .finish_queued_job(
            "q2",
            JobStatus::Cancelled,
            Some("stop"),
            "{\"type\":\"cancelled\"}",
            1,
            200,
        )
        .await
        .unwrap();
    assert!(done);
    let q2 = s.get_job("q2").await.unwrap().unwrap();
    assert_eq!(
        (q2.status, q2.next_seq, q2.error.as_deref()),
        (JobStatus::Cancelled, 1, Some("stop"))
    );
    assert_eq!(
        q2.terminal_event.as_deref(),
        Some("{\"type\":\"cancelled\"}")
    );
    // A running job is not "queued": it is left alone, and a cancelled
    // job is not runnable any more.
    let lease = s
        .claim_session("w1", 300, TTL, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s.start_attempt(&lease, "q1", 301).await.unwrap(), 1);
    assert!(!s
        .finish_queued_job("q1", JobStatus::Cancelled, None, "{}", 1, 302)
        .await
        .unwrap());
    assert!(matches!(
        s.start_attempt(&lease, "q2", 303).await,
        Err(StoreError::NotRunnable(_))
    ));
    assert_eq!(s.next_job(&lease).await.unwrap().unwrap().job_id, "q1");
}

async fn session_permission_mode_override(ctx: Ctx) {
    let s = ctx.open().await;
    accept(&s, "m1", "S", 100).await;
    assert_eq!(
        s.get_session("S").await.unwrap().unwrap().permission_mode,
        None
    );
    assert!(s
        .set_session_permission_mode("S", Some(PermissionMode::Plan), 200)
        .await
        .unwrap());
    assert_eq!(
        s.get_session("S").await.unwrap().unwrap().permission_mode,
        Some(PermissionMode::Plan)
    );
    assert!(!s
        .set_session_permission_mode("nope", None, 201)
        .await
        .unwrap());
}

/// Who a Claude session id belongs to: the session that continues it, or
/// the one whose transcript of it is stored (an earlier id of the key).
async fn claude_sessions_belong_to_their_key(ctx: Ctx) {
    let s = ctx.open().await;
    assert_eq!(s.session_key_of("cs-old").await.unwrap(), None);
    accept(&s, "j1", "S", 100).await;
    let lease = s
        .claim_session("w1", 200, 100, None)
        .await
        .unwrap()
        .unwrap();
    let old = Transcript {
        claude_session_id: "cs-old".into(),
        session_key: "S".into(),
        data: b"t".to_vec(),
        size_bytes: 1,
        sha256: None,
        updated_at_ms: 210,
    };
    s.put_transcript(&lease, &old).await.unwrap();
    let job = s.next_job(&lease).await.unwrap().expect("j1 runs");
    s.start_attempt(&lease, &job.job_id, 220).await.unwrap();
    let mut done = finish("j1", JobStatus::Succeeded, 1, 230);
    done.session_update = Some(update("cs-new", 1, 1));
    s.finish_job(&lease, &done).await.unwrap();
    assert_eq!(
        s.session_key_of("cs-new").await.unwrap().as_deref(),
        Some("S")
    );
    assert_eq!(
        s.session_key_of("cs-old").await.unwrap().as_deref(),
        Some("S")
    );
    assert_eq!(s.session_key_of("cs-nobody").await.unwrap(), None);
}

/// The terminal-event outbox: finished jobs are listed until their event is
/// marked published, oldest first, only past the cut-off; queued jobs never.
async fn unpublished_terminals_until_marked(ctx: Ctx) {
    let s = ctx.open().await;
    for (i, id) in ["j1", "j2", "j3"].iter().enumerate() {
        accept(&s, id, "S", 100 + i as i64).await;
    }
    let lease = s
        .claim_session("w1", 200, 1_000, None)
        .await
        .unwrap()
        .unwrap();
    for (id, at) in [("j1", 300), ("j2", 400)] {
        let job = s.next_job(&lease).await.unwrap().unwrap();
        assert_eq!(job.job_id, id);
        s.start_attempt(&lease, id, at - 10).await.unwrap();
        s.finish_job(&lease, &finish(id, JobStatus::Succeeded, 1, at))
            .await
            .unwrap();
    }
    let ids = |jobs: Vec<claude_worker::store::JobRecord>| -> Vec<String> {
        jobs.into_iter().map(|j| j.job_id).collect()
    };
    assert_eq!(
        ids(s.unpublished_terminals(1_000, 10).await.unwrap()),
        ["j1", "j2"]
    );
    assert_eq!(ids(s.unpublished_terminals(350, 10).await.unwrap()), ["j1"]);
    assert_eq!(
        ids(s.unpublished_terminals(1_000, 1).await.unwrap()),
        ["j1"]
    );
    let listed = s.unpublished_terminals(1_000, 10).await.unwrap();
    assert_eq!(
        listed[0].terminal_event.as_deref(),
        Some(
            finish("j1", JobStatus::Succeeded, 1, 300)
                .terminal_event
                .as_str()
        )
    );
    s.mark_terminal_published("j1", 500).await.unwrap();
    s.mark_terminal_published("j1", 600).await.unwrap();
    assert_eq!(
        ids(s.unpublished_terminals(1_000, 10).await.unwrap()),
        ["j2"]
    );
    s.mark_terminal_published("j2", 500).await.unwrap();
    assert!(s
        .unpublished_terminals(i64::MAX, 10)
        .await
        .unwrap()
        .is_empty());
}

// ---------------------------------------------------------- lifecycle (issue 13)

const DAY_MS: i64 = 86_400_000;

/// The (type, reason) of every unpublished lifecycle event, claimed and
/// marked published, in order; event ids increase.
async fn drain_events(s: &Arc<dyn SessionStore>, now: i64) -> Vec<(String, String)> {
    let events = s.claim_session_events(now, 10_000, 100).await.unwrap();
    let mut last = 0;
    let mut out = Vec::new();
    for e in events {
        assert!(e.event_id > last, "event ids grow");
        last = e.event_id;
        let v: serde_json::Value = serde_json::from_slice(&e.to_json()).unwrap();
        assert_eq!(v["type"], e.kind.as_str());
        assert_eq!(v["event_id"], e.event_id);
        assert_eq!(v["session_key"], e.session_key.as_str());
        out.push((
            e.kind.clone(),
            v["reason"].as_str().unwrap_or("").to_string(),
        ));
        s.settle_session_event(e.event_id, true, now).await.unwrap();
    }
    out
}

fn ev(kind: &str, reason: &str) -> (String, String) {
    (kind.to_string(), reason.to_string())
}

fn idle_rule(quiet_since_ms: i64) -> Vec<store::IdleRule> {
    vec![store::IdleRule {
        profile: "default".into(),
        quiet_since_ms,
        idle_ttl_secs: 60,
    }]
}

/// Runs `job_id` (the session's next) under a fresh lease, beginning its
/// conversation as a worker does, and releases the lease.
async fn run_job_beginning(
    s: &Arc<dyn SessionStore>,
    key: &str,
    job_id: &str,
    mode: SessionMode,
    now: i64,
) {
    let lease = s
        .claim_session("w1", now, TTL, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lease.session_key, key);
    let job = s.next_job(&lease).await.unwrap().unwrap();
    assert_eq!(job.job_id, job_id);
    s.start_attempt(&lease, job_id, now).await.unwrap();
    s.begin_conversation(&lease, job_id, mode, now)
        .await
        .unwrap();
    // A retried attempt of the same job records nothing more.
    assert!(!s
        .begin_conversation(&lease, job_id, mode, now)
        .await
        .unwrap());
    let mut f = finish(job_id, JobStatus::Succeeded, 2, now);
    f.session_update = Some(update(&format!("cs-{job_id}"), 1, 1));
    s.finish_job(&lease, &f).await.unwrap();
    s.mark_terminal_published(job_id, now).await.unwrap();
    assert_eq!(
        s.release_lease(&lease, now).await.unwrap(),
        ReleaseOutcome::Released
    );
}

async fn lifecycle_events_for_new_reset_idle_and_deleted(ctx: Ctx) {
    let s = ctx.open().await;
    accept(&s, "j1", "K", 1_000).await;
    run_job_beginning(&s, "K", "j1", SessionMode::Continue, 2_000).await;
    assert_eq!(
        drain_events(&s, 2_000).await,
        vec![ev("session.started", "")]
    );
    // A continuing job begins nothing.
    accept(&s, "j2", "K", 3_000).await;
    run_job_beginning(&s, "K", "j2", SessionMode::Continue, 3_000).await;
    assert!(drain_events(&s, 3_000).await.is_empty());
    // Idle: not before the TTL, then once per quiet spell.
    assert!(s
        .mark_idle_sessions(&idle_rule(2_999), 10_000, 10)
        .await
        .unwrap()
        .is_empty());
    let marked = s
        .mark_idle_sessions(&idle_rule(3_001), 10_000, 10)
        .await
        .unwrap();
    assert_eq!(marked.len(), 1);
    assert_eq!(marked[0].session_key, "K");
    assert!(s
        .mark_idle_sessions(&idle_rule(9_000), 11_000, 10)
        .await
        .unwrap()
        .is_empty());
    // Another profile's rule does not touch it.
    let other = vec![store::IdleRule {
        profile: "webapp".into(),
        quiet_since_ms: 99_000,
        idle_ttl_secs: 1,
    }];
    assert!(s
        .mark_idle_sessions(&other, 100_000, 10)
        .await
        .unwrap()
        .is_empty());
    // A reset: the old conversation ends, a new one starts.
    let mut reset = new_job("j3", "K");
    reset.spec.mode = SessionMode::New;
    assert_eq!(
        s.accept_job(&reset, 12_000).await.unwrap(),
        AcceptOutcome::Inserted
    );
    run_job_beginning(&s, "K", "j3", SessionMode::New, 12_000).await;
    // Activity since the last mark: it may go idle again.
    let again = s
        .mark_idle_sessions(&idle_rule(13_000), 13_000, 10)
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    assert!(s.forget_session("K", 14_000).await.unwrap());
    // Deleting it again, or a budget end, records nothing: it has ended.
    assert!(s.forget_session("K", 14_100).await.unwrap());
    assert!(!s
        .end_conversation("K", store::EndReason::Budget, None, 14_200)
        .await
        .unwrap());
    assert_eq!(
        drain_events(&s, 15_000).await,
        vec![
            ev("session.idle", ""),
            ev("session.ended", "reset"),
            ev("session.started", ""),
            ev("session.idle", ""),
            ev("session.ended", "deleted"),
        ]
    );
    // The next job after a delete starts anew; a budget end ends it.
    accept(&s, "j4", "K", 16_000).await;
    run_job_beginning(&s, "K", "j4", SessionMode::Continue, 16_000).await;
    assert!(s
        .end_conversation("K", store::EndReason::Budget, Some("j5"), 17_000)
        .await
        .unwrap());
    assert_eq!(
        drain_events(&s, 18_000).await,
        vec![ev("session.started", ""), ev("session.ended", "budget")]
    );
    assert!(
        drain_events(&s, 19_000).await.is_empty(),
        "published events are not claimed again"
    );
}

async fn lifecycle_events_are_claimed_by_one_publisher(ctx: Ctx) {
    let s = ctx.open().await;
    for i in 0..5 {
        accept(&s, &format!("j{i}"), &format!("K{i}"), 1_000).await;
        run_job_beginning(
            &s,
            &format!("K{i}"),
            &format!("j{i}"),
            SessionMode::Continue,
            1_000 + i,
        )
        .await;
    }
    // Two publishers at once: each event is claimed by one.
    let (a, b) = tokio::join!(
        s.claim_session_events(2_000, 5_000, 100),
        s.claim_session_events(2_000, 5_000, 100)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.len() + b.len(), 5, "{a:?} {b:?}");
    // A claim given back (a failed publish) is claimed again at once; one
    // whose publisher died is claimed again once it runs out.
    let first = a.first().or(b.first()).unwrap().event_id;
    s.settle_session_event(first, false, 2_100).await.unwrap();
    let again = s.claim_session_events(2_200, 5_000, 100).await.unwrap();
    assert_eq!(
        again.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        vec![first]
    );
    let expired = s.claim_session_events(7_201, 5_000, 100).await.unwrap();
    assert_eq!(expired.len(), 5, "every claim ran out");
}

async fn prune_with_a_moved_clock_and_a_dry_run(ctx: Ctx) {
    let s = ctx.open().await;
    // OLD: three jobs and a transcript, quiet since day 1. NEW: active on day 40.
    for (i, at) in [(1, DAY_MS), (2, DAY_MS + 1), (3, DAY_MS + 2)] {
        accept(&s, &format!("old{i}"), "OLD", at).await;
        run_job_beginning(&s, "OLD", &format!("old{i}"), SessionMode::Continue, at).await;
    }
    let lease = s.claim_session("w1", DAY_MS + 3, TTL, None).await.unwrap();
    assert!(lease.is_none(), "nothing to run");
    // OLD's session.started, published on day 1.
    assert_eq!(
        drain_events(&s, DAY_MS + 3).await,
        vec![ev("session.started", "")]
    );
    accept(&s, "new1", "NEW", 40 * DAY_MS).await;
    run_job_beginning(&s, "NEW", "new1", SessionMode::Continue, 40 * DAY_MS).await;
    for (key, cs, at) in [
        ("OLD", "cs-old3", DAY_MS + 2),
        ("NEW", "cs-new1", 40 * DAY_MS),
    ] {
        accept(&s, &format!("t-{key}"), key, at).await;
        let l = s.claim_session("w1", at, TTL, None).await.unwrap().unwrap();
        let t = Transcript {
            claude_session_id: cs.into(),
            session_key: key.into(),
            data: b"x".to_vec(),
            size_bytes: 1,
            sha256: None,
            updated_at_ms: at,
        };
        s.put_transcript(&l, &t).await.unwrap();
        let job = s.next_job(&l).await.unwrap().unwrap();
        s.start_attempt(&l, &job.job_id, at).await.unwrap();
        // A prompt left open by a run that died, and a session grant.
        s.open_prompt(&l, &job.job_id, &format!("p-{key}"), 1, at)
            .await
            .unwrap();
        s.add_session_grants(cs, &["Bash".to_string(), "Write".to_string()])
            .await
            .unwrap();
        s.finish_job(&l, &finish(&job.job_id, JobStatus::Succeeded, 1, at))
            .await
            .unwrap();
        s.release_lease(&l, at).await.unwrap();
    }
    assert!(s.claim_control("r-old", DAY_MS).await.unwrap());
    assert!(s.claim_control("r-new", 40 * DAY_MS).await.unwrap());
    drain_events(&s, 40 * DAY_MS).await;
    let now = 40 * DAY_MS + 1;
    let req = |dry_run: bool, batch: i64| store::PruneRequest {
        rules: vec![store::RetentionRule {
            profile: "default".into(),
            before_ms: now - 30 * DAY_MS,
        }],
        shared_before_ms: now - 30 * DAY_MS,
        batch,
        dry_run,
        now_ms: now,
    };
    let dry = s.prune(&req(true, 1)).await.unwrap();
    // t-OLD is unpublished: the outbox still needs it.
    let expected = store::PruneReport {
        jobs: 3,
        transcripts: 1,
        control_requests: 1,
        session_events: 1,
        sessions_expired: 1,
        cli_files: 0,
        permission_prompts: 1,
        session_grants: 2,
    };
    assert_eq!(dry, expected);
    // The dry run touched nothing.
    assert!(s.get_job("old1").await.unwrap().is_some());
    assert!(s.get_transcript("cs-old3").await.unwrap().is_some());
    let old = s.get_session("OLD").await.unwrap().unwrap();
    assert_eq!(old.claude_session_id.as_deref(), Some("cs-old3"));
    assert!(drain_events(&s, now).await.is_empty());
    assert_eq!(s.prune(&req(true, 1)).await.unwrap(), expected);
    // Bounded steps: one row of each kind per step.
    let step = s.prune(&req(false, 1)).await.unwrap();
    assert_eq!(
        (step.jobs, step.sessions_expired, step.transcripts),
        (1, 1, 1)
    );
    let mut total = step;
    loop {
        let step = s.prune(&req(false, 1)).await.unwrap();
        if step.total() == 0 {
            break;
        }
        total.add(&step);
    }
    // The expiry's own session.ended is recorded now, so not pruned.
    assert_eq!(total, expected);
    for j in ["old1", "old2", "old3"] {
        assert!(s.get_job(j).await.unwrap().is_none(), "{j}");
    }
    assert!(
        s.get_job("t-OLD").await.unwrap().is_some(),
        "unpublished terminal kept"
    );
    assert!(s.get_transcript("cs-old3").await.unwrap().is_none());
    let old = s.get_session("OLD").await.unwrap().unwrap();
    assert_eq!(old.claude_session_id, None);
    assert_eq!(old.status, SessionStatus::Closed);
    // Within retention: untouched.
    assert!(s.get_job("new1").await.unwrap().is_some());
    assert!(s.get_transcript("cs-new1").await.unwrap().is_some());
    let new = s.get_session("NEW").await.unwrap().unwrap();
    assert_eq!(new.claude_session_id.as_deref(), Some("cs-new1"));
    assert!(s.get_prompt("p-OLD").await.unwrap().is_none());
    assert!(s.get_prompt("p-NEW").await.unwrap().is_some());
    assert!(s.session_grants("cs-old3").await.unwrap().is_empty());
    assert_eq!(
        s.session_grants("cs-new1").await.unwrap(),
        ["Bash", "Write"]
    );
    assert!(!s.claim_control("r-new", now).await.unwrap(), "r-new kept");
    assert!(s.claim_control("r-old", now).await.unwrap(), "r-old pruned");
    assert_eq!(
        drain_events(&s, now).await,
        vec![ev("session.ended", "expired")]
    );
}

async fn maintenance_lease_has_one_holder(ctx: Ctx) {
    let s = ctx.open().await;
    // Racing takers: exactly one wins.
    let takes = (0..6).map(|i| {
        let s = Arc::clone(&s);
        async move {
            s.take_maintenance_lease("prune", &format!("w{i}"), 1_000, 500, 0)
                .await
                .unwrap()
        }
    });
    let won: Vec<i64> = futures_util::future::join_all(takes)
        .await
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(won.len(), 1, "{won:?}");
    let e1 = won[0];
    assert!(s
        .take_maintenance_lease("prune", "x", 1_400, 500, 0)
        .await
        .unwrap()
        .is_none());
    // Held past its TTL without renewal (its holder died): taken over.
    let e2 = s
        .take_maintenance_lease("prune", "w9", 2_000, 500, 0)
        .await
        .unwrap()
        .unwrap();
    assert!(e2 > e1);
    for i in 0..6 {
        assert!(!s
            .renew_maintenance_lease("prune", &format!("w{i}"), e1, 2_100, 500)
            .await
            .unwrap());
        // The old holder's release does not free the new holder's lease.
        s.release_maintenance_lease("prune", &format!("w{i}"), e1, 2_100)
            .await
            .unwrap();
    }
    assert!(s
        .renew_maintenance_lease("prune", "w9", e2, 2_200, 500)
        .await
        .unwrap());
    assert!(s
        .take_maintenance_lease("prune", "x", 2_600, 500, 0)
        .await
        .unwrap()
        .is_none());
    s.release_maintenance_lease("prune", "w9", e2, 3_000)
        .await
        .unwrap();
    // Once per interval: not again until it has passed since the last run.
    assert!(s
        .take_maintenance_lease("prune", "x", 3_500, 500, 1_000)
        .await
        .unwrap()
        .is_none());
    assert!(s
        .take_maintenance_lease("prune", "x", 4_000, 500, 1_000)
        .await
        .unwrap()
        .is_some());
}

/// `reset_session`'s record: pending from the last accepted job on, kept
/// through the turns of jobs accepted before it (and failed ones), consumed
/// by a later job's completed turn. Open jobs counted by status.
async fn reset_waits_for_a_later_jobs_turn_and_open_jobs_count(ctx: Ctx) {
    let s = ctx.open().await;
    assert_eq!(s.count_open_jobs("S").await.unwrap(), (0, 0));
    for (i, id) in ["j1", "j2"].iter().enumerate() {
        accept(&s, id, "S", 100 + i as i64).await;
    }
    let l = s
        .claim_session("w1", 200, TTL, None)
        .await
        .unwrap()
        .unwrap();
    s.start_attempt(&l, "j1", 210).await.unwrap();
    assert_eq!(s.count_open_jobs("S").await.unwrap(), (1, 1));
    assert!(!s.request_session_reset("nobody", 220).await.unwrap());
    assert!(s.request_session_reset("S", 220).await.unwrap());
    let j2 = s.get_job("j2").await.unwrap().unwrap();
    let pending = |s: Arc<dyn SessionStore>| async move {
        let sess = s.get_session("S").await.unwrap().unwrap();
        sess.reset_after_job_order
    };
    assert_eq!(pending(s.clone()).await, Some(j2.order));

    // Jobs accepted before the reset keep it pending, a failed one too.
    let mut f1 = finish("j1", JobStatus::Succeeded, 2, 230);
    f1.session_update = Some(update("c-1", 1, 1));
    s.finish_job(&l, &f1).await.unwrap();
    assert_eq!(pending(s.clone()).await, Some(j2.order));
    accept(&s, "j3", "S", 240).await;
    accept(&s, "j4", "S", 241).await;
    s.start_attempt(&l, "j2", 250).await.unwrap();
    let mut f2 = finish("j2", JobStatus::Succeeded, 2, 260);
    f2.session_update = Some(update("c-1", 1, 1));
    s.finish_job(&l, &f2).await.unwrap();
    s.start_attempt(&l, "j3", 270).await.unwrap();
    s.finish_job(&l, &finish("j3", JobStatus::Failed, 1, 280))
        .await
        .unwrap();
    assert_eq!(pending(s.clone()).await, Some(j2.order));
    assert_eq!(s.count_open_jobs("S").await.unwrap(), (1, 0));
    // The first completed turn after it consumes it.
    s.start_attempt(&l, "j4", 290).await.unwrap();
    let mut f4 = finish("j4", JobStatus::Succeeded, 2, 300);
    f4.session_update = Some(update("c-2", 1, 1));
    s.finish_job(&l, &f4).await.unwrap();
    assert_eq!(pending(s.clone()).await, None);
    assert_eq!(s.count_open_jobs("S").await.unwrap(), (0, 0));
}

/// Permission prompts: recorded fenced, listed while open, resolved once;
/// "allow for this session" rules per Claude session.
async fn permission_prompts_and_grants(ctx: Ctx) {
    let s = ctx.open().await;
    accept(&s, "j1", "S", 100).await;
    let old = s
        .claim_session("w1", 1_000, 100, None)
        .await
        .unwrap()
        .unwrap();
    s.start_attempt(&old, "j1", 1_001).await.unwrap();
    s.open_prompt(&old, "j1", "p1", 1, 1_002).await.unwrap();
    s.open_prompt(&old, "j1", "p2", 1, 1_003).await.unwrap();
    let ids = |v: Vec<claude_worker::store::PromptRecord>| -> Vec<String> {
        v.into_iter().map(|p| p.request_id).collect()
    };
    assert_eq!(ids(s.open_prompts("j1").await.unwrap()), ["p1", "p2"]);
    assert!(s.resolve_prompt("p1", "person").await.unwrap());
    assert!(
        !s.resolve_prompt("p1", "timeout").await.unwrap(),
        "resolved once"
    );
    let p1 = s.get_prompt("p1").await.unwrap().unwrap();
    let got = (p1.job_id.as_str(), p1.attempt, p1.resolved_by.as_deref());
    assert_eq!(got, ("j1", 1, Some("person")));
    assert_eq!(ids(s.open_prompts("j1").await.unwrap()), ["p2"]);
    assert_eq!(s.get_prompt("nope").await.unwrap(), None);

    // A worker that lost the session records no prompt.
    let new = s
        .claim_session("w2", 2_000, 100, None)
        .await
        .unwrap()
        .unwrap();
    assert_lease_lost(s.open_prompt(&old, "j1", "p3", 1, 2_001).await, &old);
    assert_eq!(s.get_prompt("p3").await.unwrap(), None);
    s.open_prompt(&new, "j1", "p4", 2, 2_002).await.unwrap();
    let open = s.open_prompts("j1").await.unwrap();
    let attempts: Vec<u32> = open.iter().map(|p| p.attempt).collect();
    assert_eq!(
        (ids(open), attempts),
        (vec!["p2".into(), "p4".into()], vec![1, 2])
    );

    let rules = |r: &[&str]| r.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    s.add_session_grants("c1", &rules(&["Write", "Bash(make)"]))
        .await
        .unwrap();
    s.add_session_grants("c1", &rules(&["Write"]))
        .await
        .unwrap();
    assert_eq!(
        s.session_grants("c1").await.unwrap(),
        ["Bash(make)", "Write"]
    );
    assert!(s.session_grants("c2").await.unwrap().is_empty());
}

/// A cancelled `begin` must not strand a SQLite connection inside a
/// transaction. The window: SQLite ran the store's `BEGIN IMMEDIATE` (it
/// waited for another writer's lock) and the future was dropped while sqlx
/// checked the handle, before a `Transaction` existed — what a lease renewal
/// dropped with its turn, or any timeout, can do. Before the fix the pool got
/// the connection back still in that transaction: it held the write lock, and
/// every later write on it failed with "attempted to call begin_with at
/// non-zero transaction depth" (CI, warm tests, 2026-12-05).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_a_cancelled_begin_strands_no_transaction() {
    use sqlx::sqlite::SqliteConnectOptions;
    use std::str::FromStr;
    use std::time::Duration;

    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("store.db").display());
    // One connection, so the next write is served by the one the drop returned.
    let s = store::connect(&Secret::new(url.clone()), 1)
        .await
        .expect("connect");
    s.migrate().await.expect("migrate");
    let raw = |busy_ms: u64| {
        SqliteConnectOptions::from_str(&url)
            .unwrap()
            .busy_timeout(Duration::from_millis(busy_ms))
    };

    // Another writer holds the lock, so the store's BEGIN IMMEDIATE waits.
    let mut holder = sqlx::SqliteConnection::connect_with(&raw(5_000))
        .await
        .unwrap();
    holder.execute("BEGIN IMMEDIATE").await.unwrap();
    let cancelled = new_job("j-cancelled", "k");
    let mut pending = Box::pin(s.accept_job(&cancelled, 1_000));
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut pending)
            .await
            .is_err(),
        "the accept waits for the write lock"
    );
    holder.execute("COMMIT").await.unwrap();

    // Wait (bounded) until the store's connection has taken the lock: a
    // probe that does not wait is then refused. The pending future is not
    // polled, so sqlx's worker thread waits to hand it the BEGIN's answer.
    let mut probe = sqlx::SqliteConnection::connect_with(&raw(0)).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while probe.execute("BEGIN IMMEDIATE").await.is_ok() {
        probe.execute("ROLLBACK").await.unwrap();
        assert!(
            tokio::time::Instant::now() < deadline,
            "the store's BEGIN IMMEDIATE never took the lock"
        );
        // A poll interval, not synchronisation: the loop waits on the
        // lock's state and is bounded by the deadline.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // One more poll: the BEGIN's answer is read (depth 1), then sqlx waits
    // for the connection's handle to check the transaction began; dropped
    // there, no `Transaction` exists to roll it back.
    let once = std::future::poll_fn(|cx| {
        std::task::Poll::Ready(std::future::Future::poll(pending.as_mut(), cx))
    })
    .await;
    assert!(once.is_pending(), "the accept cannot finish in one poll");
    drop(pending);

    // The next write works, and then nobody holds the lock.
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        s.accept_job(&new_job("j-next", "k"), 2_000),
    )
    .await
    .expect("the next accept is not stuck behind a stranded lock")
    .expect("the next accept succeeds");
    assert_eq!(out, AcceptOutcome::Inserted);
    let mut free = sqlx::SqliteConnection::connect_with(&raw(5_000))
        .await
        .unwrap();
    free.execute("BEGIN IMMEDIATE").await.unwrap();
    free.execute("ROLLBACK").await.unwrap();
    assert_eq!(
        s.get_job("j-cancelled").await.unwrap().map(|j| j.job_id),
        None,
        "the cancelled accept wrote nothing"
    );
}

/// `?synchronous=full` on a SQLite URL makes every commit durable against
/// an operating-system crash too; the default stays `normal`; anything
/// else is refused with a message naming the parameter.
#[tokio::test]
async fn sqlite_synchronous_is_set_from_the_url() {
    use claude_worker::store::SqliteStore;

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store.db");
    let mode = |store: SqliteStore| async move {
        let n: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(store.pool())
            .await
            .expect("pragma");
        n
    };
    let normal = SqliteStore::connect(&format!("sqlite:{}", path.display()), 1)
        .await
        .expect("connect");
    assert_eq!(mode(normal).await, 1, "NORMAL by default");
    let full = SqliteStore::connect(
        &format!("sqlite:{}?mode=rwc&synchronous=full", path.display()),
        1,
    )
    .await
    .expect("connect with synchronous=full");
    assert_eq!(mode(full).await, 2, "FULL when asked");
    let bad = SqliteStore::connect(
        &format!("sqlite:{}?synchronous=sometimes", path.display()),
        1,
    )
    .await
    .err()
    .expect("refused");
    assert!(bad.to_string().contains("synchronous=sometimes"), "{bad}");
}

/// The turn path's store calls run on SQLite's own connection only on a
/// plain database file with `synchronous=normal` (the default).
#[tokio::test]
async fn sqlite_fast_path_applies_to_plain_files_only() {
    use claude_worker::store::SqliteStore;

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store.db");
    let fast = |url: String| async move {
        SqliteStore::connect(&url, 1)
            .await
            .expect("connect")
            .uses_fast_path()
    };
    assert!(fast(format!("sqlite:{}", path.display())).await);
    assert!(fast(format!("sqlite://{}?mode=rwc", path.display())).await);
    assert!(!fast(format!("sqlite:{}?synchronous=full", path.display())).await);
    assert!(!fast("sqlite::memory:".to_string()).await);
    assert!(!fast(format!("sqlite:{}?mode=ro", path.display())).await);
}

/// When another connection holds SQLite's write lock, a turn-path call
/// does not wait on the runtime's thread (the fast path's busy timeout is
/// zero): it goes through sqlx, which waits on its own thread, and
/// completes once the lock is free. On a current-thread runtime, so a
/// blocked thread would stall the timeout below as well.
#[tokio::test(flavor = "current_thread")]
async fn sqlite_a_busy_fast_path_falls_back_without_blocking() {
    use sqlx::sqlite::SqliteConnectOptions;
    use std::str::FromStr;
    use std::time::Duration;

    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("store.db").display());
    let s = claude_worker::store::SqliteStore::connect(&url, 2)
        .await
        .expect("connect");
    assert!(s.uses_fast_path());
    s.migrate().await.expect("migrate");
    s.accept_job(&new_job("j-1", "k"), 1_000)
        .await
        .expect("fast accept");

    let options = SqliteConnectOptions::from_str(&url).unwrap();
    let mut holder = sqlx::SqliteConnection::connect_with(&options)
        .await
        .unwrap();
    holder.execute("BEGIN IMMEDIATE").await.unwrap();
    let job = new_job("j-2", "k");
    let mut pending = Box::pin(s.accept_job(&job, 2_000));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut pending)
            .await
            .is_err(),
        "the accept waits for the write lock, and the runtime's thread is free meanwhile"
    );
    holder.execute("COMMIT").await.unwrap();
    let out = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .expect("the accept completes once the lock is free")
        .expect("accept");
    assert_eq!(out, AcceptOutcome::Inserted);
    let jobs = s.list_jobs("k", 10).await.expect("list");
    let ids: Vec<&str> = jobs.iter().map(|j| j.job_id.as_str()).collect();
    assert_eq!(ids, ["j-1", "j-2"], "each job stored once, in order");
}

/// The fast path leaves checkpoints to the pool (they sync to disk): every
/// few hundred commits it asks for one, so the WAL keeps being reused
/// instead of growing with every turn. Without it, nothing here would
/// checkpoint: every call below runs on the fast path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_the_fast_paths_wal_is_checkpointed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("store.db").display());
    let sqlite = Arc::new(
        claude_worker::store::SqliteStore::connect(&url, 2)
            .await
            .expect("connect"),
    );
    assert!(sqlite.uses_fast_path());
    let s: Arc<dyn SessionStore> = sqlite.clone();
    s.migrate().await.expect("migrate");
    accept(&s, "j", "k", 1_000).await;
    let lease = s
        .claim_session("w", 1_000, TTL, None)
        .await
        .expect("claim")
        .expect("claimed");
    // Past 4,096 frames a checkpoint starts the WAL over (`sqlite.rs`).
    const COMMITS: i64 = 20_000;
    for i in 0..COMMITS {
        assert!(s.renew_lease(&lease, 1_000 + i, TTL).await.expect("renew"));
    }
    // (busy, frames in the WAL since it was last reset, frames checkpointed)
    let (_, frames, _): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
        .fetch_one(sqlite.pool())
        .await
        .expect("checkpoint");
    assert!(
        frames < COMMITS / 2,
        "{frames} frames in the WAL after {COMMITS} commits: it was not checkpointed and reused"
    );
}
