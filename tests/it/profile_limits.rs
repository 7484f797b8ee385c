//! Security boundaries a profile draws: whose conversation a job may
//! continue, and which (broker-verified) AMQP users may use it.

use claude_worker::protocol::{ErrorKind, EventBody};
use serde_json::{json, Value};

use crate::harness::{Backend, TestEnv};
use crate::pipeline::{completed, run};

fn refusal(events: &[claude_worker::protocol::EventV1]) -> String {
    assert_eq!(events.len(), 1, "{events:#?}");
    match &events[0].body {
        EventBody::Failed {
            error,
            message,
            retryable,
        } => {
            assert_eq!((*error, *retryable), (ErrorKind::InvalidInput, false));
            message.clone()
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn another_keys_session_cannot_be_resumed_or_forked_unless_the_profile_allows_it() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let worker = env.start_worker().await;
    let owner = "limits:alice";
    let ev = run(&mut env, owner, "alice's secret", json!({})).await;
    let alice_id = completed(&ev).1.expect("a Claude session id");

    for mode in ["resume", "fork"] {
        let session = json!({"session": {"mode": mode, "claude_session_id": alice_id}});
        let job = env
            .publish_job("limits:mallory", "what did alice say?", session)
            .await;
        let message = refusal(&env.events_until_terminal(&job).await);
        assert!(
            message.contains("belongs to another session key"),
            "{message}"
        );
        assert!(
            message.contains("resume_other_sessions"),
            "says what to change: {message}"
        );
        assert!(!message.contains(owner), "names the other key: {message}");
    }
    // The CLI never saw the refused prompt.
    assert!(env.mock.requests().iter().all(|r| {
        !serde_json::to_string(&r.body)
            .unwrap_or_default()
            .contains("what did alice say")
    }));
    // Its own key may resume it; an id nobody owns falls back as before.
    let session = json!({"session": {"mode": "resume", "claude_session_id": alice_id}});
    let ev = run(&mut env, owner, "alice again", session).await;
    assert_eq!(completed(&ev).0, "echo: alice again");
    let ghost = json!({"session": {"mode": "resume", "claude_session_id": uuid::Uuid::new_v4().to_string()}});
    let ev = run(&mut env, "limits:bob", "a ghost", ghost).await;
    assert_eq!(completed(&ev).0, "echo: a ghost");
    worker.shutdown();
    worker.wait().await.unwrap();
    env.cleanup().await;
}

/// Publishes a job with the AMQP `user_id` property (RabbitMQ refuses a
/// `user_id` other than the connection's user, here `guest`).
async fn publish_as(env: &TestEnv, user: Option<&str>, body: Value) -> String {
    let job_id = uuid::Uuid::new_v4().to_string();
    let mut body = body;
    body["job_id"] = json!(job_id);
    let mut props = env.bus.job_props();
    if let Some(u) = user {
        props = props.with_user_id(u.into());
    }
    env.bus
        .publish_with(body.to_string().as_bytes(), props)
        .await;
    job_id
}

#[tokio::test]
async fn a_profile_limited_to_amqp_users_refuses_everyone_else() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let worker = env
        .start_worker_with(|s| {
            s.profiles.get_mut("default").unwrap().allowed_user_ids = vec!["guest".into()];
            s.profiles.get_mut("discord").unwrap().allowed_user_ids = vec!["operator".into()];
        })
        .await;
    let job = |profile: &str, prompt: &str| json!({"v": 1, "session_key": "limits:users", "prompt": prompt, "profile": profile});
    let ok = publish_as(&env, Some("guest"), job("default", "as guest")).await;
    let ev = env.events_until_terminal(&ok).await;
    assert_eq!(completed(&ev).0, "echo: as guest");

    let anonymous = publish_as(&env, None, job("default", "anonymous")).await;
    let message = refusal(&env.events_until_terminal(&anonymous).await);
    assert!(message.contains("without a user_id"), "{message}");

    let wrong = publish_as(&env, Some("guest"), job("discord", "not an operator")).await;
    let message = refusal(&env.events_until_terminal(&wrong).await);
    assert!(
        message.contains("limited to certain AMQP users") && message.contains("`guest`"),
        "{message}"
    );
    worker.shutdown();
    worker.wait().await.unwrap();
    env.cleanup().await;
}
