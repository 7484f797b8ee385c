//! Secrets never reach what a user or an operator reads: start-up errors,
//! command errors and logs. Each case runs the real binary with a
//! recognisable secret in a connection URL that cannot work, and checks
//! that the failure says what is wrong without the secret.

use std::process::Stdio;
use std::time::Duration;

use crate::support::claude_bin;

const SECRET: &str = "pw-S3CRET-do-not-print";

struct Run {
    code: i32,
    stderr: String,
    stdout: String,
}

async fn run(args: &[&str], vars: &[(&str, String)]) -> Run {
    let home = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_claude-worker"));
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", home.path())
        .env("RUST_LOG", "claude_worker=trace,sqlx=trace,lapin=trace")
        .env("NO_COLOR", "1")
        .env("CLAUDE_WORKER__CLAUDE__PATH", claude_bin())
        .env(
            "CLAUDE_WORKER__DATABASE__URL",
            format!("sqlite:{}", home.path().join("w.db").display()),
        )
        .current_dir(home.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(90), cmd.output())
        .await
        .expect("claude-worker did not exit within 90 s")
        .expect("claude-worker ran");
    Run {
        code: out.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
    }
}

fn assert_secret_free(what: &str, r: &Run, must_mention: &str) {
    assert_ne!(r.code, 0, "{what}: should fail\nstderr: {}", r.stderr);
    for (name, text) in [("stderr", &r.stderr), ("stdout", &r.stdout)] {
        assert!(
            !text.contains(SECRET),
            "{what}: the secret is in {name}:\n{text}"
        );
    }
    assert!(
        r.stderr.contains(must_mention),
        "{what}: the error should say what is wrong (mention {must_mention:?}):\n{}",
        r.stderr
    );
}

/// A port nothing listens on: bind, note the port, close.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn broker_and_database_passwords_never_reach_errors_or_logs() {
    let amqp = format!("amqp://guest:{SECRET}@127.0.0.1:{}/%2f", closed_port());
    let pg_closed = format!(
        "postgres://postgres:{SECRET}@127.0.0.1:{}/db",
        closed_port()
    );
    // A live server that refuses the database: the error comes from it.
    let pg_missing = format!(
        "postgres://postgres:{SECRET}@127.0.0.1:5432/cw_no_such_db_{}",
        uuid::Uuid::new_v4().simple()
    );
    let pg_query = format!(
        "postgres://postgres@127.0.0.1:{}/db?password={SECRET}",
        closed_port()
    );
    // (what, arguments, environment, what the error must mention)
    type Case<'a> = (&'a str, Vec<&'a str>, Vec<(&'a str, String)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "worker, broker down",
            vec!["worker"],
            vec![("CLAUDE_WORKER__AMQP__URL", amqp.clone())],
            "127.0.0.1",
        ),
        (
            "worker, database down",
            vec!["worker"],
            vec![("CLAUDE_WORKER__DATABASE__URL", pg_closed.clone())],
            "could not open the database at postgres://postgres:***@127.0.0.1:",
        ),
        (
            "worker, SQLite file in a missing directory",
            vec!["worker"],
            vec![(
                "CLAUDE_WORKER__DATABASE__URL",
                "sqlite:/nonexistent-cw-test-dir/w.db".to_string(),
            )],
            "directory must exist",
        ),
        (
            "worker, no such database",
            vec!["worker"],
            vec![("CLAUDE_WORKER__DATABASE__URL", pg_missing.clone())],
            "database",
        ),
        (
            "worker, password in the query",
            vec!["worker"],
            vec![("CLAUDE_WORKER__DATABASE__URL", pg_query.clone())],
            "/db?…",
        ),
        (
            "migrate, database down",
            vec!["migrate"],
            vec![("CLAUDE_WORKER__DATABASE__URL", pg_closed.clone())],
            "database",
        ),
        (
            "submit, broker down",
            vec!["submit", "--timeout", "5", "hello"],
            vec![("CLAUDE_WORKER__AMQP__URL", amqp.clone())],
            "127.0.0.1",
        ),
        (
            "cancel, broker down",
            vec!["cancel", "some-job"],
            vec![("CLAUDE_WORKER__AMQP__URL", amqp.clone())],
            "127.0.0.1",
        ),
        (
            "sessions, password in the query",
            vec!["sessions", "list"],
            vec![("CLAUDE_WORKER__DATABASE__URL", pg_query.clone())],
            "/db?…",
        ),
        (
            "migrate, password in the query",
            vec!["migrate"],
            vec![("CLAUDE_WORKER__DATABASE__URL", pg_query.clone())],
            "/db?…",
        ),
        (
            "sessions, database down",
            vec!["sessions", "list"],
            vec![("CLAUDE_WORKER__DATABASE__URL", pg_closed.clone())],
            "database",
        ),
    ];
    for (what, args, vars, mention) in cases {
        let r = run(&args, &vars).await;
        assert_secret_free(what, &r, mention);
    }
}
