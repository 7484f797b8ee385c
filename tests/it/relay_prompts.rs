//! Permission prompts in Discord end to end (issue 12): the real worker
//! (profiles with `permission_prompts = "ask"`), the real CLI calling a
//! tool through the mock API, the relay in-process and real twilight
//! against the fake Discord, which dispatches the clicks as
//! MESSAGE_COMPONENT interactions and records the callbacks.

use claude_worker::config::PermissionPrompts;
use claude_worker::protocol::{EventBody, EventV1, PermissionBehavior, PermissionMode, ResolvedBy};
use serde_json::{json, Value};

use crate::common::fake_discord::{Msg, GUILD};
use crate::harness::WAIT;
use crate::mock_api::Behavior;
use crate::relay::{job_of, result_of, world_with, World, ALICE, BOB, CHAN};

const CAROL: u64 = 13;
/// A role whose members may answer anyone's prompts (`prompt_roles`).
const MODERATOR: u64 = 77;

/// A world whose worker asks a person, who has `timeout_secs`.
async fn asking_world(timeout_secs: u64) -> World {
    let mut w = world_with(false, |s| s.prompt_roles = vec![MODERATOR]).await;
    w.start_worker_with(|s| {
        let p = s.profiles.get_mut(&s.discord.profile.clone()).unwrap();
        // The relay's profile accepts edits by default: ask instead.
        p.permission_mode = PermissionMode::Default;
        p.permission_prompts = PermissionPrompts::Ask;
        p.permission_timeout_secs = timeout_secs;
    })
    .await;
    w
}

/// The working directory of ALICE's conversation in CHAN.
fn alice_dir(w: &World) -> std::path::PathBuf {
    let s = w.env.settings();
    let workdir = &s.profiles[&s.discord.profile].workdir;
    claude_worker::session_dir(workdir, &format!("discord:{GUILD}:{CHAN}:{ALICE}"))
}

/// Scripts the mock so that a job marked `[[mock:<marker>]]` asks to
/// write `content` to `name` in Alice's conversation directory; returns
/// the file's path.
fn script_write(w: &World, marker: &str, name: &str, content: &str) -> std::path::PathBuf {
    let file = alice_dir(w).join(name);
    let path = file.display().to_string();
    w.env.mock.push_behavior_for(
        marker,
        Behavior::tool_use("Write", json!({"file_path": path, "content": content})),
    );
    file
}

/// The prompt message the relay posted in CHAN (the one with buttons).
async fn prompt_message(w: &World) -> Msg {
    w.fake
        .wait_for("a prompt message with buttons", |v| {
            v.messages_in(CHAN)
                .into_iter()
                .find(|m| !m.custom_ids().is_empty())
                .cloned()
        })
        .await
}

/// Waits until the prompt `id` shows `line` with every component disabled.
async fn settled(w: &World, id: u64, line: &str) -> Msg {
    w.fake
        .wait_for(&format!("prompt {id} settled with {line:?}"), |v| {
            v.message(id)
                .filter(|m| m.content.ends_with(line))
                .filter(|m| {
                    !m.items().is_empty() && m.items().iter().all(|c| c["disabled"] == true)
                })
                .cloned()
        })
        .await
}

fn labels(m: &Msg) -> Vec<String> {
    m.items()
        .iter()
        .map(|c| c["label"].as_str().unwrap_or("<menu>").to_string())
        .collect()
}

fn resolutions(events: &[EventV1]) -> Vec<(PermissionBehavior, ResolvedBy)> {
    events
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::PermissionResolved { behavior, by, .. } => Some((*behavior, *by)),
            _ => None,
        })
        .collect()
}

/// The callbacks of interaction `token`, once there are `n`.
async fn callbacks(w: &World, token: &str, n: usize) -> Vec<crate::common::fake_discord::Callback> {
    let path = format!("/{token}/callback");
    w.fake
        .wait_for(&format!("{n} callback(s) of {token}"), |v| {
            let count = v.calls().iter().filter(|c| c.path.ends_with(&path)).count();
            (count >= n).then_some(())
        })
        .await;
    w.fake.callbacks(token)
}

/// The follow-ups of interaction `token`, once there is one.
async fn followup(w: &World, token: &str) -> Value {
    let path = format!("/webhooks/{}/{token}", crate::common::fake_discord::APP_ID);
    w.fake
        .wait_for(&format!("a follow-up of {token}"), |v| {
            v.calls()
                .iter()
                .find(|c| c.method == "POST" && c.path.ends_with(&path))
                .map(|c| c.body.clone())
        })
        .await
}

/// Allow by the conversation's user: the click is acknowledged (deferred
/// update), the tool runs (the file appears), the turn completes, and the
/// prompt message says who allowed it, its buttons disabled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allow_click_by_the_user_runs_the_tool_and_settles_the_prompt() {
    let mut w = asking_world(120).await;
    let file = script_write(&w, "allow", "made.txt", "one\ntwo\n");
    let msg = w
        .fake
        .user_says(CHAN, ALICE, "[[mock:allow]] write it", true);
    let ph = w.placeholder(CHAN, msg).await;
    let p = prompt_message(&w).await;
    assert_ne!(p.id, ph.id, "the prompt is a message of its own");
    assert!(
        p.content.starts_with("🔐 **Claude asks to use Write**"),
        "{}",
        p.content
    );
    assert!(
        p.content
            .contains(&format!("```\n{}: write 2 line(s)\n```", file.display())),
        "{}",
        p.content
    );
    assert!(p.content.contains("-# Expires <t:"), "{}", p.content);
    assert!(
        p.content.contains(&format!("<@{ALICE}> can answer")),
        "{}",
        p.content
    );
    let l = labels(&p);
    assert_eq!(l.first().map(String::as_str), Some("Allow"), "{l:?}");
    assert_eq!(l.last().map(String::as_str), Some("Deny"), "{l:?}");
    // Posted without pinging anyone.
    let post = w
        .fake
        .calls_to("POST", &format!("/channels/{CHAN}/messages"))
        .into_iter()
        .find(|c| !c.body["components"].is_null())
        .expect("the prompt's post");
    assert_eq!(
        post.body["allowed_mentions"]["parse"],
        json!([]),
        "{}",
        post.body
    );
    assert!(!file.exists(), "nothing runs before the click");

    let token = w.fake.click(p.id, ALICE, &[], &p.button("Allow"), &[]);
    let done = w.terminal(&job_of(msg)).await;
    assert_eq!(result_of(&done), "echo: [[mock:allow]] write it");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "one\ntwo\n");
    let events = &w.events[&job_of(msg)];
    assert_eq!(
        resolutions(events),
        [(PermissionBehavior::Allow, ResolvedBy::Person)]
    );
    let m = settled(&w, p.id, &format!("✅ Allowed by <@{ALICE}>")).await;
    assert!(!m.content.contains("Expires"), "{}", m.content);
    assert!(
        m.content.starts_with("🔐 **Claude asks to use Write**"),
        "{}",
        m.content
    );
    let cb = callbacks(&w, &token, 1).await;
    assert_eq!(cb.len(), 1, "{cb:?}");
    assert_eq!(cb[0].kind, 6, "a deferred update: {cb:?}");
    assert!(w.fake.followups(&token).is_empty(), "no complaint");
    w.shows(ph.id, "echo: [[mock:allow]] write it").await;
    w.cleanup().await;
}

/// Someone else's click is refused (ephemeral, nothing published: the
/// prompt stays open); then the user denies: Claude is told, the command
/// never runs, and a late click is told the prompt is settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_click_by_someone_else_is_refused_and_the_users_deny_reaches_claude() {
    let mut w = asking_world(120).await;
    let refused = alice_dir(&w).join("refused.txt");
    let cmd = format!("echo no > {}", refused.display());
    w.env
        .mock
        .push_behavior_for("deny", Behavior::tool_use("Bash", json!({"command": cmd})));
    w.env
        .mock
        .push_behavior_for("deny", Behavior::reply("understood, not running it"));
    let msg = w.fake.user_says(CHAN, ALICE, "[[mock:deny]] run it", true);
    let p = prompt_message(&w).await;
    assert!(
        p.content.contains(&format!("```\n{cmd}\n```")),
        "the whole command: {}",
        p.content
    );

    let token = w.fake.click(p.id, BOB, &[], &p.button("Allow"), &[]);
    let cb = callbacks(&w, &token, 1).await;
    assert_eq!(cb[0].kind, 4, "{cb:?}");
    assert_eq!(cb[0].data["flags"], 64, "ephemeral: {cb:?}");
    let text = cb[0].data["content"].as_str().unwrap_or("");
    assert!(text.contains(&format!("Only <@{ALICE}>")), "{text}");
    assert_eq!(cb[0].data["allowed_mentions"]["parse"], json!([]), "{cb:?}");

    let token = w.fake.click(p.id, ALICE, &[], &p.button("Deny"), &[]);
    let done = w.terminal(&job_of(msg)).await;
    assert_eq!(result_of(&done), "understood, not running it");
    assert_eq!(callbacks(&w, &token, 1).await[0].kind, 6);
    // Bob's click never reached a worker: one resolution, Alice's deny.
    assert_eq!(
        resolutions(&w.events[&job_of(msg)]),
        [(PermissionBehavior::Deny, ResolvedBy::Person)]
    );
    assert!(!refused.exists(), "a denied command never runs");
    let results = w
        .env
        .mock
        .requests_for("deny")
        .last()
        .unwrap()
        .tool_results();
    assert_eq!(results.len(), 1, "{results:?}");
    assert_eq!(results[0]["is_error"], true, "{results:?}");
    assert!(
        results[0]
            .to_string()
            .contains("denied by the user in Discord"),
        "{results:?}"
    );
    settled(&w, p.id, &format!("❌ Denied by <@{ALICE}>")).await;

    // A stale click (a client that still shows the buttons): told so.
    let late = w.fake.click(p.id, ALICE, &[], &p.button("Allow"), &[]);
    let f = followup(&w, &late).await;
    assert_eq!(f["flags"], 64, "{f}");
    assert_eq!(
        f["content"], "This prompt was already answered, expired or cancelled.",
        "{f}"
    );
    assert_eq!(callbacks(&w, &late, 1).await[0].kind, 6);
    w.cleanup().await;
}

/// Nobody answers: the worker denies at the timeout and the prompt shows
/// as expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_prompt_shows_as_expired() {
    let mut w = asking_world(5).await;
    w.env.mock.push_behavior_for(
        "late",
        Behavior::tool_use("Bash", json!({"command": "touch late"})),
    );
    let msg = w.fake.user_says(CHAN, ALICE, "[[mock:late]] run it", true);
    let p = prompt_message(&w).await;
    let done = w.terminal(&job_of(msg)).await;
    assert_eq!(result_of(&done), "echo: [[mock:late]] run it");
    assert_eq!(
        resolutions(&w.events[&job_of(msg)]),
        [(PermissionBehavior::Deny, ResolvedBy::Timeout)]
    );
    let m = settled(&w, p.id, "⌛ Expired — denied").await;
    assert!(!m.content.contains("Expires"), "{}", m.content);
    w.cleanup().await;
}

/// Claude's question: one button per option; a member with a prompt role
/// picks one, and the choice reaches the CLI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_question_is_answered_with_an_option_button() {
    let mut w = asking_world(120).await;
    let questions = json!([{
        "question": "Which colour?", "header": "Colour", "multiSelect": false,
        "options": [{"label": "Red", "description": "warm"}, {"label": "Blue", "description": "cool"}]
    }]);
    w.env.mock.push_behavior_for(
        "quiz",
        Behavior::tool_use("AskUserQuestion", json!({"questions": questions})),
    );
    let msg = w
        .fake
        .user_says(CHAN, ALICE, "[[mock:quiz]] pick one", true);
    let p = prompt_message(&w).await;
    assert!(
        p.content.starts_with("❓ **Claude asks you**"),
        "{}",
        p.content
    );
    assert!(
        p.content
            .contains("**Colour** Which colour?\n1. Red — warm\n2. Blue — cool"),
        "{}",
        p.content
    );
    assert_eq!(labels(&p), ["Red", "Blue", "Don't answer"]);

    let token = w
        .fake
        .click(p.id, CAROL, &[MODERATOR], &p.button("Blue"), &[]);
    let done = w.terminal(&job_of(msg)).await;
    assert_eq!(result_of(&done), "echo: [[mock:quiz]] pick one");
    assert_eq!(callbacks(&w, &token, 1).await[0].kind, 6);
    let results = w
        .env
        .mock
        .requests_for("quiz")
        .last()
        .unwrap()
        .tool_results();
    assert!(
        results[0]
            .to_string()
            .contains("\\\"Which colour?\\\"=\\\"Blue\\\""),
        "{results:?}"
    );
    assert_ne!(results[0]["is_error"], true, "{results:?}");
    settled(&w, p.id, &format!("✅ Answered “Blue” by <@{CAROL}>")).await;

    // Several may be picked: a menu; the picks reach the CLI together.
    // (Bob's conversation: the mock takes the first marker of a request,
    // and Alice's would carry her first one.)
    let questions = json!([{
        "question": "Which toppings?", "header": "Toppings", "multiSelect": true,
        "options": [{"label": "Cheese", "description": "melted"},
                    {"label": "Olives", "description": "black"},
                    {"label": "Basil", "description": "fresh"}]
    }]);
    w.env.mock.push_behavior_for(
        "menu",
        Behavior::tool_use("AskUserQuestion", json!({"questions": questions})),
    );
    let msg = w.fake.user_says(CHAN, BOB, "[[mock:menu]] pick some", true);
    let m = w
        .fake
        .wait_for("the menu prompt", |v| {
            v.messages_in(CHAN)
                .into_iter()
                .find(|m| m.id != p.id && !m.custom_ids().is_empty())
                .cloned()
        })
        .await;
    let menu = m.items()[0].clone();
    assert_eq!(menu["type"], 3, "{menu}");
    assert_eq!(menu["max_values"], 3, "{menu}");
    assert_eq!(labels(&m), ["<menu>", "Don't answer"]);
    let id = menu["custom_id"].as_str().unwrap();
    let token = w.fake.click(m.id, BOB, &[], id, &["0", "2"]);
    let done = w.terminal(&job_of(msg)).await;
    assert_eq!(result_of(&done), "echo: [[mock:menu]] pick some");
    assert_eq!(callbacks(&w, &token, 1).await[0].kind, 6);
    let results = w
        .env
        .mock
        .requests_for("menu")
        .last()
        .unwrap()
        .tool_results();
    assert!(
        results[0]
            .to_string()
            .contains("\\\"Which toppings?\\\"=\\\"Cheese, Basil\\\""),
        "{results:?}"
    );
    settled(
        &w,
        m.id,
        &format!("✅ Answered “Cheese, Basil” by <@{BOB}>"),
    )
    .await;
    w.cleanup().await;
}

/// A relay restarted while a prompt waits: it is sent the job's events
/// again, finds the prompt message instead of posting it twice, and a
/// click on it (its `custom_id` carries all a relay needs) still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_survives_a_relay_restart() {
    let mut w = asking_world(120).await;
    let file = script_write(&w, "restart", "later.txt", "after\n");
    let msg = w
        .fake
        .user_says(CHAN, ALICE, "[[mock:restart]] write it", true);
    let p = prompt_message(&w).await;
    let lookups = |w: &World| {
        w.fake
            .calls_to("GET", &format!("/channels/{CHAN}/messages"))
            .len()
    };
    let before = lookups(&w);
    w.kill_relay().await;
    w.start_relay().await;
    // The new relay looked for the prompt (its events came again)…
    w.fake
        .wait_for("the restarted relay looking for the prompt", |v| {
            let n = v
                .calls()
                .iter()
                .filter(|c| c.method == "GET" && c.path == format!("/channels/{CHAN}/messages"))
                .count();
            (n > before).then_some(())
        })
        .await;
    let token = w.fake.click(p.id, ALICE, &[], &p.button("Allow"), &[]);
    let done = w.terminal(&job_of(msg)).await;
    assert_eq!(result_of(&done), "echo: [[mock:restart]] write it");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "after\n");
    assert_eq!(callbacks(&w, &token, 1).await[0].kind, 6);
    settled(&w, p.id, &format!("✅ Allowed by <@{ALICE}>")).await;
    // …and did not post it twice.
    let prompts: Vec<Msg> = w
        .fake
        .messages_in(CHAN)
        .into_iter()
        .filter(|m| !m.custom_ids().is_empty())
        .collect();
    assert_eq!(prompts.len(), 1, "{prompts:#?}");
    w.cleanup().await;
}

/// Several questions: a menu each, whose picks the message keeps (each
/// pick is an UPDATE_MESSAGE) until Submit; Submit before every question
/// has a pick is refused; the answers reach the CLI together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_questions_are_answered_with_menus_then_submit() {
    let mut w = asking_world(120).await;
    let questions = json!([
        {"question": "Which colour?", "header": "Colour", "multiSelect": false,
         "options": [{"label": "Red", "description": "warm"}, {"label": "Blue", "description": "cool"}]},
        {"question": "Which size?", "header": "Size", "multiSelect": false,
         "options": [{"label": "Small", "description": "s"}, {"label": "Large", "description": "l"}]}
    ]);
    w.env.mock.push_behavior_for(
        "two",
        Behavior::tool_use("AskUserQuestion", json!({"questions": questions})),
    );
    let msg = w.fake.user_says(CHAN, ALICE, "[[mock:two]] pick", true);
    let p = prompt_message(&w).await;
    assert_eq!(labels(&p), ["<menu>", "<menu>", "Submit", "Don't answer"]);
    let menu = |m: &Msg, i: usize| m.items()[i]["custom_id"].as_str().unwrap().to_string();
    let picked = |m: &Msg, i: usize| -> Vec<String> {
        m.items()[i]["options"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|o| o["default"] == true)
            .map(|o| o["label"].as_str().unwrap().to_string())
            .collect()
    };

    let t = w.fake.click(p.id, ALICE, &[], &menu(&p, 0), &["1"]);
    let cb = callbacks(&w, &t, 1).await;
    assert_eq!(cb[0].kind, 7, "the pick updates the message: {cb:?}");
    let m = w
        .fake
        .wait_for("the first pick kept", |v| {
            v.message(p.id)
                .filter(|m| picked(m, 0) == ["Blue"])
                .cloned()
        })
        .await;
    assert!(picked(&m, 1).is_empty());
    assert_eq!(m.content, p.content, "the text stays");

    let early = w.fake.click(p.id, ALICE, &[], &m.button("Submit"), &[]);
    let cb = callbacks(&w, &early, 1).await;
    assert_eq!(
        (cb[0].kind, &cb[0].data["flags"]),
        (4, &json!(64)),
        "{cb:?}"
    );
    assert_eq!(cb[0].data["content"], "Answer every question first.");

    let t = w.fake.click(p.id, ALICE, &[], &menu(&m, 1), &["0"]);
    assert_eq!(callbacks(&w, &t, 1).await[0].kind, 7);
    let m = w
        .fake
        .wait_for("both picks kept", |v| {
            v.message(p.id)
                .filter(|m| picked(m, 0) == ["Blue"] && picked(m, 1) == ["Small"])
                .cloned()
        })
        .await;
    let t = w.fake.click(p.id, ALICE, &[], &m.button("Submit"), &[]);
    let done = w.terminal(&job_of(msg)).await;
    assert_eq!(result_of(&done), "echo: [[mock:two]] pick");
    assert_eq!(callbacks(&w, &t, 1).await[0].kind, 6);
    let results = w
        .env
        .mock
        .requests_for("two")
        .last()
        .unwrap()
        .tool_results();
    let text = results[0].to_string();
    assert!(
        text.contains("\\\"Which colour?\\\"=\\\"Blue\\\""),
        "{text}"
    );
    assert!(text.contains("\\\"Which size?\\\"=\\\"Small\\\""), "{text}");
    settled(
        &w,
        p.id,
        &format!("✅ Answered “Blue; Small” by <@{ALICE}>"),
    )
    .await;
    w.cleanup().await;
}

/// A relay restarted after a prompt was settled (the job still running):
/// the replayed events find the settled message and leave it as it is,
/// so it still says who allowed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settled_prompt_keeps_its_words_across_a_relay_restart() {
    let mut w = asking_world(120).await;
    script_write(&w, "kept", "kept.txt", "kept\n");
    w.env
        .mock
        .push_behavior_for("kept", Behavior::hold("written, all done"));
    let msg = w
        .fake
        .user_says(CHAN, ALICE, "[[mock:kept]] write it", true);
    let ph = w.placeholder(CHAN, msg).await;
    let p = prompt_message(&w).await;
    w.fake.click(p.id, ALICE, &[], &p.button("Allow"), &[]);
    let line = format!("✅ Allowed by <@{ALICE}>");
    settled(&w, p.id, &line).await;
    w.env.mock.wait_for_held(1, WAIT).await;

    w.kill_relay().await;
    let edits_before = w
        .fake
        .calls_to("PATCH", &format!("/messages/{}", p.id))
        .len();
    let lookups = w
        .fake
        .calls_to("GET", &format!("/channels/{CHAN}/messages"))
        .len();
    w.start_relay().await;
    w.fake
        .wait_for("the restarted relay looking for the prompt", |v| {
            let path = format!("/channels/{CHAN}/messages");
            let n = v
                .calls()
                .iter()
                .filter(|c| c.method == "GET" && c.path == path)
                .count();
            (n > lookups).then_some(())
        })
        .await;
    w.env.mock.release_held();
    let done = w.terminal(&job_of(msg)).await;
    assert_eq!(result_of(&done), "written, all done");
    // Shown in order: once the answer is, the replayed prompt events were too.
    w.shows(ph.id, "written, all done").await;
    let edits_after = w
        .fake
        .calls_to("PATCH", &format!("/messages/{}", p.id))
        .len();
    assert_eq!(
        edits_after, edits_before,
        "the settled prompt is left alone"
    );
    let m = settled(&w, p.id, &line).await;
    assert_eq!(
        w.fake
            .contents(CHAN)
            .iter()
            .filter(|c| c.contains("Claude asks"))
            .count(),
        1
    );
    assert!(m.content.starts_with("🔐 **Claude asks to use Write**"));
    w.cleanup().await;
}
