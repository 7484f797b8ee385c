//! The Discord relay end to end: a fake Discord on loopback
//! (`tests/common/fake_discord.rs`) that real twilight talks to, the relay
//! in-process, and behind it the real broker, worker, SQLite, CLI and mock
//! Messages API. Each test observes the relay's reply events on a private
//! queue bound to the relay's reply key, to compare what Discord shows
//! with what the worker said.

use std::collections::HashMap;
use std::time::Duration;

use claude_worker::config::{AmqpSettings, DiscordSettings, Secret};
use claude_worker::protocol::{EventBody, EventV1};
use claude_worker::relay::discord::Relay;
use claude_worker::worker::Worker;
use lapin::options::QueueDeleteOptions;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use claude_worker::relay::discord::render;

use crate::common::fake_discord::{FakeDiscord, Limit, Msg, GUILD};
use crate::common::world::{self, Reply};
use crate::harness::{Backend, TestEnv, WAIT};
use crate::mock_api::Behavior;

pub(crate) const CHAN: u64 = 555;
pub(crate) const ALICE: u64 = 11;
pub(crate) const BOB: u64 = 12;

pub(crate) struct World {
    pub(crate) env: TestEnv,
    pub(crate) fake: FakeDiscord,
    worker: Option<Worker>,
    relay: Option<Relay>,
    settings: DiscordSettings,
    /// The relay's reply events, as the worker published them.
    observed: mpsc::UnboundedReceiver<Reply>,
    /// Events read, by job id.
    pub(crate) events: HashMap<String, Vec<EventV1>>,
    queue: QueueGuard,
    /// The broker the relay uses (the shared one, or a test's own node).
    amqp: AmqpSettings,
}

async fn world(tweak: impl FnOnce(&mut DiscordSettings)) -> World {
    world_with(true, tweak).await
}

/// A world with a worker and no relay in-process (the binary runs one).
async fn world_without_relay() -> World {
    let mut w = world_with(true, |_| {}).await;
    w.kill_relay().await;
    w
}

/// A world whose worker starts now, or later (`World::start_worker`).
pub(crate) async fn world_with(
    start_worker: bool,
    tweak: impl FnOnce(&mut DiscordSettings),
) -> World {
    world_on(None, start_worker, tweak).await
}

/// A world whose worker and relay use the broker at `amqp_url` (a node of
/// the test's own), or the shared one. (The event observer stays on the
/// shared broker: on another, read what Discord shows instead.)
async fn world_on(
    amqp_url: Option<&str>,
    start_worker: bool,
    tweak: impl FnOnce(&mut DiscordSettings),
) -> World {
    let env = TestEnv::new(Backend::Sqlite).await;
    let mut amqp = env.settings().amqp;
    if let Some(url) = amqp_url {
        amqp.url = Secret::new(url);
        // A restart of the node (slow on a loaded machine) stays within
        // the publish timeout: turns in flight wait for it, not retry.
        amqp.publish_timeout_ms = 30_000;
    }
    let worker = if start_worker {
        let a = amqp.clone();
        Some(env.start_worker_with(|s| s.amqp = a).await)
    } else {
        None
    };
    let fake = FakeDiscord::start().await;
    let mut settings = env.settings().discord;
    settings.gateway_url = Some(fake.gateway_url.clone());
    settings.http_proxy = Some(fake.http_addr.clone());
    settings.edit_interval_ms = 300;
    settings.footer = false;
    tweak(&mut settings);
    let observed = world::subscribe(&env.bus.conn, &env.bus.topology, &settings.reply_key()).await;
    let queue = QueueGuard(format!(
        "{}.{}",
        env.bus.topology.replies_exchange, settings.queue_name
    ));
    let mut w = World {
        queue,
        env,
        fake,
        worker,
        relay: None,
        settings,
        observed,
        events: HashMap::new(),
        amqp,
    };
    w.start_relay().await;
    w
}

impl World {
    pub(crate) async fn start_relay(&mut self) {
        let n = self.fake.calls_to("PUT", "/commands").len();
        let sessions = self.fake.sessions();
        let amqp = self.amqp.clone();
        let relay = Relay::start(amqp, self.settings.clone(), Secret::new("test-token"))
            .await
            .expect("relay starts");
        self.relay = Some(relay);
        // Ready: identified, and (if asked) the commands registered.
        self.fake.wait_connected(sessions + 1).await;
        if self.settings.register_commands {
            self.fake
                .wait_for("commands registered", |v| {
                    let puts = v.calls().iter().filter(|c| c.method == "PUT").count();
                    (puts > n).then_some(())
                })
                .await;
        }
    }

    async fn start_worker(&mut self) {
        self.worker = Some(self.env.start_worker().await);
    }

    pub(crate) async fn start_worker_with(
        &mut self,
        tweak: impl FnOnce(&mut claude_worker::config::Settings),
    ) {
        self.worker = Some(self.env.start_worker_with(tweak).await);
    }

    /// Stops the relay at once, as a crash would: nothing more is acked.
    pub(crate) async fn kill_relay(&mut self) {
        let relay = self.relay.take().expect("a relay runs");
        relay.stop().await;
    }

    /// The events of `job_id` until its terminal one.
    pub(crate) async fn terminal(&mut self, job_id: &str) -> EventV1 {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(t) = self
                .events
                .get(job_id)
                .and_then(|es| es.iter().find(|e| e.body.is_terminal()))
            {
                return t.clone();
            }
            let r = tokio::time::timeout_at(deadline, self.observed.recv())
                .await
                .unwrap_or_else(|_| panic!("no terminal event of {job_id} within {WAIT:?}"))
                .expect("observer ended");
            let ev: EventV1 = serde_json::from_value(r.raw).expect("a v1 event");
            self.events.entry(ev.job_id.clone()).or_default().push(ev);
        }
    }

    /// Waits until the message `id` shows `content`.
    pub(crate) async fn shows(&self, id: u64, content: &str) -> Msg {
        self.fake
            .wait_for(&format!("message {id} showing {content:?}"), |v| {
                v.message(id).filter(|m| m.content == content).cloned()
            })
            .await
    }

    /// The placeholder the relay posted in `channel` replying to `msg`.
    pub(crate) async fn placeholder(&self, channel: u64, msg: u64) -> Msg {
        self.fake
            .wait_for("the placeholder reply", |v| {
                v.messages_in(channel)
                    .into_iter()
                    .find(|m| m.reply_to == Some(msg))
                    .cloned()
            })
            .await
    }

    pub(crate) async fn cleanup(mut self) {
        if let Some(r) = self.relay.take() {
            r.stop().await;
        }
        let _ = self
            .env
            .bus
            .channel
            .queue_delete(self.queue.0.as_str().into(), QueueDeleteOptions::default())
            .await;
        self.queue.0.clear();
        self.env.cleanup().await;
    }
}

/// The relay's durable reply queue, deleted when dropped (a test that
/// failed included), from a thread of its own like `TestEnv`'s drop.
struct QueueGuard(String);

impl Drop for QueueGuard {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        let name = std::mem::take(&mut self.0);
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let work = async {
                    let props = lapin::ConnectionProperties::default();
                    if let Ok(conn) =
                        lapin::Connection::connect(crate::harness::AMQP_URL, props).await
                    {
                        if let Ok(ch) = conn.create_channel().await {
                            let _ = ch
                                .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                                .await;
                        }
                        let _ = conn.close(200, "test dropped".into()).await;
                    }
                };
                let _ = tokio::time::timeout(Duration::from_secs(20), work).await;
            });
        });
        let _ = cleanup.join();
    }
}

pub(crate) fn result_of(e: &EventV1) -> String {
    match &e.body {
        EventBody::Completed { result, .. } => result.clone(),
        other => panic!("not completed: {other:?}"),
    }
}

pub(crate) fn job_of(msg: u64) -> String {
    format!("discord-{msg}")
}

#[tokio::test]
async fn a_mention_streams_an_edited_reply_whose_final_content_is_the_result() {
    let mut w = world(|_| {}).await;
    let text = "The answer is forty-two, and that is final.";
    w.env.mock.push_behavior_for("a", Behavior::hold(text));
    let msg = w
        .fake
        .user_says(CHAN, ALICE, "[[mock:a]] what is the answer?", true);
    let ph = w.placeholder(CHAN, msg).await;
    assert_eq!(ph.content, "…", "the placeholder is posted first");

    // Mid-answer: the first half is shown, streamed into the placeholder.
    w.env.mock.wait_for_held(1, WAIT).await;
    w.shows(ph.id, &Behavior::hold_first_delta(text)).await;
    w.env.mock.release_held();
    let done = w.terminal(&job_of(msg)).await;
    assert_eq!(result_of(&done), text);
    let m = w.shows(ph.id, text).await;

    // The job named the reply and the user; the key is channel + user.
    let meta = &done.metadata["discord"];
    assert_eq!(meta["message_id"], ph.id.to_string());
    assert_eq!(meta["channel_id"], CHAN.to_string());
    assert_eq!(meta["user_id"], ALICE.to_string());
    assert_eq!(done.session_key, format!("discord:{GUILD}:{CHAN}:{ALICE}"));
    // Edited, not re-posted: one message, the partial then the final text.
    assert_eq!(w.fake.messages_in(CHAN).len(), 1);
    assert_eq!(
        m.edits.first().map(String::as_str),
        Some(&*Behavior::hold_first_delta(text))
    );
    assert_eq!(m.edits.last().map(String::as_str), Some(text));
    // At most one edit per interval.
    let edits = w.fake.calls_to("PATCH", &format!("/messages/{}", ph.id));
    for pair in edits.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(gap >= Duration::from_millis(290), "edits {gap:?} apart");
    }
    assert!(!w
        .fake
        .calls_to("POST", &format!("/channels/{CHAN}/typing"))
        .is_empty());
    w.fake.wait_heartbeat().await;
    w.cleanup().await;
}

#[tokio::test]
async fn allow_lists_ignore_others_and_publish_nothing() {
    let mut w = world(|s| {
        s.allowed_channels = vec![CHAN];
        s.allowed_users = vec![ALICE];
    })
    .await;
    let other_chan = w.fake.user_says(CHAN + 1, ALICE, "hello", true);
    let other_user = w.fake.user_says(CHAN, BOB, "hello", true);
    let unaddressed = w.fake.user_says(CHAN, ALICE, "hello", false);
    let ok = w.fake.user_says(CHAN, ALICE, "hello", true);
    let done = w.terminal(&job_of(ok)).await;
    assert_eq!(result_of(&done), "echo: hello");
    w.shows(w.placeholder(CHAN, ok).await.id, "echo: hello")
        .await;
    // Nothing was published for the others: one job reached the worker,
    // and Discord got nothing but the one reply.
    for m in [other_chan, other_user, unaddressed] {
        assert!(!w.events.contains_key(&job_of(m)));
    }
    assert_eq!(w.events.len(), 1, "{:?}", w.events.keys());
    assert_eq!(w.env.mock.requests().len(), 1);
    assert!(w.fake.messages_in(CHAN + 1).is_empty());
    assert_eq!(w.fake.messages_in(CHAN).len(), 1);
    // Slash commands keep to the allow-lists too.
    let refused = slash_as(&w, BOB, "status", json!([])).await;
    assert_eq!(refused, "Not available here.");
    w.cleanup().await;
}

#[tokio::test]
async fn two_users_in_one_channel_have_separate_sessions() {
    let mut w = world(|_| {}).await;
    let a1 = w.fake.user_says(CHAN, ALICE, "alpha one", true);
    let a1_done = w.terminal(&job_of(a1)).await;
    let b1 = w.fake.user_says(CHAN, BOB, "bravo one", true);
    let b1_done = w.terminal(&job_of(b1)).await;
    let a2 = w.fake.user_says(CHAN, ALICE, "alpha two", true);
    let a2_done = w.terminal(&job_of(a2)).await;
    assert_ne!(a1_done.session_key, b1_done.session_key);
    assert_eq!(a1_done.session_key, a2_done.session_key);
    // Alice's second turn carried her first, and nothing of Bob's.
    let last = w.env.mock.requests().last().cloned().expect("requests");
    let texts = last.user_texts().join("\n");
    assert!(
        texts.contains("alpha one") && texts.contains("alpha two"),
        "{texts}"
    );
    assert!(!texts.contains("bravo"), "{texts}");
    for (m, text) in [
        (a1, "echo: alpha one"),
        (b1, "echo: bravo one"),
        (a2, "echo: alpha two"),
    ] {
        w.shows(w.placeholder(CHAN, m).await.id, text).await;
    }
    w.cleanup().await;
}

/// An answer of about 4,500 characters with a Rust code block in the middle.
fn long_answer() -> String {
    let mut s = String::from("Here is the program you asked for, explained line by line.\n\n");
    s.push_str(&"This paragraph explains the reasoning in some detail. ".repeat(20));
    s.push_str("\n\n```rust\n");
    for i in 0..60 {
        s.push_str(&format!(
            "    let value_{i} = compute({i}) * 2; // step {i}\n"
        ));
    }
    s.push_str("```\n\n");
    s.push_str(&"A closing remark that wraps things up nicely. ".repeat(10));
    s
}

#[tokio::test]
async fn an_answer_over_4000_chars_is_split_without_breaking_the_code_block() {
    let mut w = world(|_| {}).await;
    let text = long_answer();
    assert!(text.chars().count() > 4000, "{}", text.chars().count());
    w.env
        .mock
        .push_behavior_for("long", Behavior::reply(text.clone()));
    let msg = w
        .fake
        .user_says(CHAN, ALICE, "[[mock:long]] write it", true);
    let done = w.terminal(&job_of(msg)).await;
    let result = result_of(&done);
    assert_eq!(result, text);
    let ph = w.placeholder(CHAN, msg).await;
    let parts = w
        .fake
        .wait_for("the answer in three messages", |v| {
            let ms: Vec<String> = v
                .messages_in(CHAN)
                .iter()
                .map(|m| m.content.clone())
                .collect();
            (ms.len() == 3 && ms[0] != ph.content).then_some(ms)
        })
        .await;
    assert_eq!(
        parts,
        claude_worker::relay::discord::render::split(&result, 2000)
    );
    for (i, p) in parts.iter().enumerate() {
        assert!(p.chars().count() <= 2000, "part {i}: {}", p.chars().count());
        let fences = p
            .lines()
            .filter(|l| l.trim_start().starts_with("```"))
            .count();
        assert_eq!(fences % 2, 0, "part {i} leaves a fence open");
    }
    assert!(
        parts[1].contains("```rust\n"),
        "the code block starts in part 2"
    );
    let reopened = parts.iter().filter(|p| p.starts_with("```rust\n")).count();
    let closed_early = parts.iter().filter(|p| p.ends_with("\n```")).count();
    assert!(reopened >= 1 && closed_early >= 1, "{parts:#?}");
    // Nothing lost: the parts hold every line of code, in order.
    let joined = parts.concat();
    let mut at = 0;
    for i in 0..60 {
        let line = format!("let value_{i} = compute({i}) * 2;");
        at += joined[at..]
            .find(&line)
            .unwrap_or_else(|| panic!("line {i} missing or out of order"));
    }
    w.cleanup().await;
}

#[tokio::test]
async fn a_429_on_edit_is_waited_out() {
    let mut w = world(|_| {}).await;
    w.fake.rate_limit_edits(1, 0.6);
    let msg = w.fake.user_says(CHAN, ALICE, "rate me", true);
    let done = w.terminal(&job_of(msg)).await;
    let ph = w.placeholder(CHAN, msg).await;
    w.shows(ph.id, &result_of(&done)).await;
    let edits = w.fake.calls_to("PATCH", &format!("/messages/{}", ph.id));
    assert_eq!(edits[0].status, 429);
    let next = edits
        .iter()
        .find(|c| c.status == 200)
        .expect("an edit passed");
    let waited = next.at - edits[0].at;
    assert!(
        waited >= Duration::from_millis(550),
        "retried after {waited:?}"
    );
    assert_eq!(edits.iter().filter(|c| c.status == 429).count(), 1);
    w.cleanup().await;
}

#[tokio::test]
async fn a_relay_killed_mid_answer_and_restarted_delivers_the_final_answer() {
    let mut w = world(|_| {}).await;
    let text = "Survives a restart of the relay, every word of it.";
    w.env.mock.push_behavior_for("k", Behavior::hold(text));
    let msg = w.fake.user_says(CHAN, ALICE, "[[mock:k]] go", true);
    let ph = w.placeholder(CHAN, msg).await;
    w.env.mock.wait_for_held(1, WAIT).await;
    w.kill_relay().await;
    // The answer ends while no relay runs: its events wait in the queue.
    w.env.mock.release_held();
    let done = w.terminal(&job_of(msg)).await;
    assert_eq!(result_of(&done), text);
    let restarted = std::time::Instant::now();
    w.start_relay().await;
    let m = w.shows(ph.id, text).await;
    let final_edit = w
        .fake
        .calls_to("PATCH", &format!("/messages/{}", ph.id))
        .into_iter()
        .find(|c| c.body["content"] == text)
        .expect("the final edit");
    assert!(
        final_edit.at > restarted,
        "the final edit came from the restarted relay"
    );
    assert_eq!(m.reply_to, Some(msg));
    assert_eq!(w.fake.messages_in(CHAN).len(), 1, "edited, not posted anew");
    w.cleanup().await;
}

/// Sends a slash command and returns the answer edited into `@original`,
/// after checking it was acknowledged (deferred) first.
async fn slash(w: &World, name: &str, options: Value) -> String {
    slash_as(w, ALICE, name, options).await
}

async fn slash_as(w: &World, user: u64, name: &str, options: Value) -> String {
    let token = w.fake.slash(CHAN, user, name, options);
    let answer = w
        .fake
        .wait_for(&format!("/{name} answered"), |v| {
            v.calls()
                .iter()
                .find(|c| c.method == "PATCH" && c.path.contains(&token))
                .map(|c| c.body["content"].as_str().unwrap_or("").to_string())
        })
        .await;
    let calls = w.fake.calls();
    let ack = calls
        .iter()
        .position(|c| c.path.ends_with(&format!("{token}/callback")));
    let edit = calls
        .iter()
        .position(|c| c.path.contains(&token) && c.method == "PATCH");
    assert!(
        ack.is_some() && ack < edit,
        "/{name}: deferred ack before the answer"
    );
    let ack = &calls[ack.unwrap()];
    assert_eq!(ack.body["type"], 5, "deferred channel message");
    answer
}

#[tokio::test]
async fn slash_commands_reset_stop_status_and_mode() {
    let mut w = world(|_| {}).await;
    let registered = w.fake.calls_to(
        "PUT",
        &format!(
            "/applications/{}/commands",
            crate::common::fake_discord::APP_ID
        ),
    );
    let names: Vec<&str> = registered[0]
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["reset", "stop", "status", "mode"]);

    let m1 = w.fake.user_says(CHAN, ALICE, "first", true);
    let first = w.terminal(&job_of(m1)).await;
    let EventBody::Completed {
        claude_session_id: Some(sid),
        ..
    } = &first.body
    else {
        panic!()
    };
    // The relay has shown the answer, so it has counted the turn.
    w.shows(w.placeholder(CHAN, m1).await.id, "echo: first")
        .await;
    let status = slash(&w, "status", json!([])).await;
    assert!(
        status.contains(sid.as_str()) && status.contains("Turns: 1"),
        "{status}"
    );

    let mode = slash(
        &w,
        "mode",
        json!([{"name": "mode", "type": 3, "value": "plan"}]),
    )
    .await;
    assert!(mode.starts_with("✅"), "{mode}");
    // Above the profile's ceiling (acceptEdits): refused, and it says why.
    let over = json!([{"name": "mode", "type": 3, "value": "bypassPermissions"}]);
    let refused = slash(&w, "mode", over).await;
    assert!(
        refused.starts_with("⚠️") && refused.contains("ceiling"),
        "{refused}"
    );

    stop_cancels_the_answer_in_progress(&mut w).await;
    reset_starts_a_new_session(&mut w, sid).await;
    w.cleanup().await;
}

/// /stop while an answer is held mid-stream.
async fn stop_cancels_the_answer_in_progress(w: &mut World) {
    w.env
        .mock
        .push_behavior_for("s", Behavior::hold("never finished, this one"));
    let m2 = w.fake.user_says(CHAN, ALICE, "[[mock:s]] long one", true);
    w.env.mock.wait_for_held(1, WAIT).await;
    let stop = slash(w, "stop", json!([])).await;
    assert!(stop.starts_with("✅"), "{stop}");
    let ended = w.terminal(&job_of(m2)).await;
    assert!(
        matches!(ended.body, EventBody::Cancelled { .. }),
        "{ended:?}"
    );
    // The job after /mode ran in the mode it set.
    let mode = w.events[&job_of(m2)].iter().find_map(|e| match &e.body {
        EventBody::Started {
            permission_mode, ..
        } => permission_mode.clone(),
        _ => None,
    });
    assert_eq!(mode.as_deref(), Some("plan"));
    let ph2 = w.placeholder(CHAN, m2).await;
    w.fake
        .wait_for("the stopped reply", |v| {
            v.message(ph2.id)
                .filter(|m| m.content.ends_with("Stopped."))
                .cloned()
        })
        .await;
    w.env.mock.release_held();
}

/// /reset: the next message starts a new Claude session.
async fn reset_starts_a_new_session(w: &mut World, sid: &str) {
    let reset = slash(w, "reset", json!([])).await;
    assert!(reset.contains("new conversation"), "{reset}");
    let m3 = w.fake.user_says(CHAN, ALICE, "fresh", true);
    let third = w.terminal(&job_of(m3)).await;
    let EventBody::Completed {
        claude_session_id: Some(sid3),
        ..
    } = &third.body
    else {
        panic!()
    };
    assert_ne!(sid3, sid);
    let started = w.events[&job_of(m3)].iter().find_map(|e| match &e.body {
        EventBody::Started { resumed, .. } => Some(*resumed),
        _ => None,
    });
    assert_eq!(started, Some(false));
}

#[tokio::test]
async fn thread_mode_opens_one_thread_per_conversation() {
    let mut w = world(|s| s.threads = true).await;
    let m1 = w.fake.user_says(CHAN, ALICE, "Fix the build please", true);
    let done = w.terminal(&job_of(m1)).await;
    let threads = w
        .fake
        .calls_to("POST", &format!("/channels/{CHAN}/messages/{m1}/threads"));
    assert_eq!(threads.len(), 1);
    assert_eq!(threads[0].body["name"], "Fix the build please");
    let thread: u64 = done.metadata["discord"]["channel_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(thread, CHAN);
    w.fake
        .wait_for("the answer in the thread", |v| {
            v.messages_in(thread)
                .first()
                .filter(|m| m.content == "echo: Fix the build please")
                .map(|_| ())
        })
        .await;
    // In its thread the relay answers without a mention, in the same thread
    // and session; a new mention in the channel opens a second thread.
    let m2 = w.fake.user_says(thread, ALICE, "and the tests", false);
    let follow = w.terminal(&job_of(m2)).await;
    assert_eq!(follow.session_key, done.session_key);
    assert_eq!(w.fake.calls_to("POST", "/threads").len(), 1);
    let m3 = w.fake.user_says(CHAN, BOB, "Another topic", true);
    let other = w.terminal(&job_of(m3)).await;
    assert_ne!(
        other.metadata["discord"]["channel_id"],
        done.metadata["discord"]["channel_id"]
    );
    assert_eq!(w.fake.calls_to("POST", "/threads").len(), 2);
    assert!(
        w.fake.messages_in(CHAN).is_empty(),
        "nothing answered in the channel itself"
    );
    // A restarted relay asks Discord whose thread it is, and answers there.
    w.kill_relay().await;
    w.start_relay().await;
    let m4 = w.fake.user_says(thread, ALICE, "after a restart", false);
    let again = w.terminal(&job_of(m4)).await;
    assert_eq!(again.session_key, done.session_key);
    assert_eq!(
        w.fake.calls_to("GET", &format!("/channels/{thread}")).len(),
        1
    );
    // Not a thread of the relay: looked up once, then ignored.
    let elsewhere = CHAN + 3;
    let ignored = w.fake.user_says(elsewhere, ALICE, "chatter", false);
    w.fake
        .wait_for("the channel looked up", |v| {
            let path = format!("/channels/{elsewhere}");
            v.calls().iter().find(|c| c.path == path).map(|_| ())
        })
        .await;
    let again2 = w.fake.user_says(thread, ALICE, "and once more", false);
    w.terminal(&job_of(again2)).await;
    assert!(!w.events.contains_key(&job_of(ignored)));
    assert!(w.fake.messages_in(elsewhere).is_empty());
    w.cleanup().await;
}

#[tokio::test]
async fn a_fleet_that_is_down_shows_queued_then_answers_when_a_worker_starts() {
    let mut w = world_with(false, |_| {}).await;
    let msg = w.fake.user_says(CHAN, ALICE, "anyone there?", true);
    let ph = w.placeholder(CHAN, msg).await;
    assert_eq!(
        ph.content,
        render::QUEUED,
        "no worker: shown as queued, not silence"
    );
    w.start_worker().await;
    let done = w.terminal(&job_of(msg)).await;
    w.shows(ph.id, &result_of(&done)).await;
    w.cleanup().await;
}

#[tokio::test]
async fn double_texting_shows_the_second_message_queued_and_answers_both_in_order() {
    let mut w = world(|_| {}).await;
    w.env
        .mock
        .push_behavior_for("d", Behavior::hold("first answer, held a while"));
    let m1 = w.fake.user_says(CHAN, ALICE, "[[mock:d]] one", true);
    w.env.mock.wait_for_held(1, WAIT).await;
    let m2 = w.fake.user_says(CHAN, ALICE, "two", true);
    let ph2 = w.placeholder(CHAN, m2).await;
    assert_eq!(ph2.content, render::QUEUED);
    w.env.mock.release_held();
    let d1 = w.terminal(&job_of(m1)).await;
    let d2 = w.terminal(&job_of(m2)).await;
    assert_eq!(result_of(&d1), "first answer, held a while");
    assert_eq!(result_of(&d2), "echo: two");
    let ph1 = w.placeholder(CHAN, m1).await;
    w.shows(ph1.id, "first answer, held a while").await;
    w.shows(ph2.id, "echo: two").await;
    w.cleanup().await;
}

#[tokio::test]
async fn a_deleted_reply_is_posted_anew_and_failures_read_as_short_errors() {
    let mut w = world(|_| {}).await;
    let text = "An answer whose placeholder was deleted.";
    w.env.mock.push_behavior_for("del", Behavior::hold(text));
    let msg = w.fake.user_says(CHAN, ALICE, "[[mock:del]] go", true);
    let ph = w.placeholder(CHAN, msg).await;
    w.env.mock.wait_for_held(1, WAIT).await;
    w.fake.delete_message(ph.id);
    w.env.mock.release_held();
    let done = w.terminal(&job_of(msg)).await;
    assert_eq!(result_of(&done), text);
    w.fake
        .wait_for("the answer posted anew", |v| {
            v.messages_in(CHAN)
                .into_iter()
                .find(|m| m.content == text)
                .map(|_| ())
        })
        .await;
    assert_eq!(w.fake.messages_in(CHAN).len(), 1);

    // The API refuses the worker's key: the user reads a short error.
    w.env.mock.push_behavior_for(
        "auth",
        Behavior::status(401, "authentication_error", "bad key sk-secret"),
    );
    let bad = w.fake.user_says(CHAN, BOB, "[[mock:auth]] hi", true);
    let failed = w.terminal(&job_of(bad)).await;
    assert!(
        matches!(failed.body, EventBody::Failed { .. }),
        "{failed:?}"
    );
    let ph = w.placeholder(CHAN, bad).await;
    let m = w
        .shows(
            ph.id,
            render::failure(claude_worker::protocol::ErrorKind::Auth),
        )
        .await;
    assert!(!m.content.contains("sk-secret"));
    w.cleanup().await;
}

#[tokio::test]
async fn text_commands_work_where_slash_commands_are_not_registered() {
    let mut w = world(|s| s.register_commands = false).await;
    let m1 = w.fake.user_says(CHAN, ALICE, "hello", true);
    let done = w.terminal(&job_of(m1)).await;
    let EventBody::Completed {
        claude_session_id: Some(sid),
        ..
    } = &done.body
    else {
        panic!()
    };
    w.shows(w.placeholder(CHAN, m1).await.id, "echo: hello")
        .await;
    let cmd = w.fake.user_says(CHAN, ALICE, "/status", true);
    let answer = w.placeholder(CHAN, cmd).await;
    assert!(answer.content.contains(sid.as_str()), "{}", answer.content);
    assert!(w.fake.calls_to("PUT", "/commands").is_empty());
    assert!(
        !w.events.contains_key(&job_of(cmd)),
        "a command is not a prompt"
    );
    w.cleanup().await;
}

#[tokio::test]
async fn the_gateway_resumes_after_discord_closes_the_session() {
    let mut w = world(|_| {}).await;
    let before = w.fake.sessions();
    // 4000 (unknown error): Discord's "reconnect and resume".
    w.fake.close_session(4000);
    w.fake.wait_connected(before + 1).await;
    let msg = w.fake.user_says(CHAN, ALICE, "still there?", true);
    let done = w.terminal(&job_of(msg)).await;
    w.shows(w.placeholder(CHAN, msg).await.id, &result_of(&done))
        .await;
    assert_eq!(
        w.fake.identify_tokens(),
        ["Bot test-token"],
        "resumed, not identified again"
    );
    w.cleanup().await;
}

#[tokio::test]
async fn claude_worker_discord_runs_the_relay_and_never_logs_the_token_or_the_chat() {
    let mut w = world_without_relay().await;
    let token = "tok-S3CRET-relay-token";
    let token_file = w.env.dir.path().join("discord_token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_claude-worker"));
    cmd.arg("discord")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env("CLAUDE_WORKER__AMQP__PREFIX", &w.env.prefix)
        .env("CLAUDE_WORKER__DISCORD__TOKEN_FILE", &token_file)
        .env("CLAUDE_WORKER__DISCORD__GATEWAY_URL", &w.fake.gateway_url)
        .env("CLAUDE_WORKER__DISCORD__HTTP_PROXY", &w.fake.http_addr)
        .env("CLAUDE_WORKER__DISCORD__EDIT_INTERVAL_MS", "300")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().expect("claude-worker discord starts");
    let before = w.fake.sessions();
    w.fake.wait_connected(before + 1).await;
    assert_eq!(
        w.fake.identify_tokens().last().unwrap(),
        &format!("Bot {token}")
    );
    let prompt = "a very private question";
    // Ids long enough not to match a timestamp by chance.
    let (user, chan) = (987_654_321_012_345_678_u64, 876_543_210_987_654_321_u64);
    let msg = w.fake.user_says(chan, user, prompt, true);
    let done = w.terminal(&job_of(msg)).await;
    // The shipped settings add the footer.
    let EventBody::Completed {
        result,
        num_turns,
        total_cost_usd,
        context_tokens,
        context_window_tokens,
        ..
    } = &done.body
    else {
        panic!()
    };
    // With the session's context use (issue 14): `· ctx N%`.
    let ctx = render::context_part(*context_tokens, *context_window_tokens);
    assert!(ctx.starts_with(" · ctx ") && ctx.ends_with('%'), "{ctx:?}");
    let footer = render::footer(*num_turns, *total_cost_usd) + &ctx;
    let shown = format!("{result}\n\n{footer}");
    w.shows(w.placeholder(chan, msg).await.id, &shown).await;

    // SIGTERM: a clean stop, exit 0.
    let pid = child.id().expect("pid") as i32;
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let out = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("the relay stops on SIGTERM")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}\n{stderr}", out.status);
    assert!(
        stderr.contains("connected to the Discord gateway"),
        "{stderr}"
    );
    for secret in [token, prompt, &user.to_string(), &chan.to_string(), "echo:"] {
        assert!(
            !stderr.contains(secret),
            "{secret:?} is in the log:\n{stderr}"
        );
    }
    w.cleanup().await;
}

#[tokio::test]
async fn claude_worker_discord_without_a_token_says_what_to_set() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_claude-worker"))
        .arg("discord")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .output();
    let out = tokio::time::timeout(WAIT, out)
        .await
        .expect("exits")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("$DISCORD_TOKEN") && stderr.contains("discord.token_file"),
        "{stderr}"
    );
}

#[tokio::test]
async fn typing_shows_while_a_message_waits_and_5xx_answers_are_retried() {
    let mut w = world(|s| s.typing_interval_ms = 1000).await;
    w.env
        .mock
        .push_behavior_for("t", Behavior::hold("held first"));
    let m1 = w.fake.user_says(CHAN, ALICE, "[[mock:t]] one", true);
    w.env.mock.wait_for_held(1, WAIT).await;
    // The first answer is talking (its typing has stopped) …
    let ph1 = w.placeholder(CHAN, m1).await;
    w.shows(ph1.id, &Behavior::hold_first_delta("held first"))
        .await;
    // … and the second message waits behind it: its typing is re-sent.
    let m2 = w.fake.user_says(CHAN, ALICE, "two", true);
    w.placeholder(CHAN, m2).await;
    // From here on every typing call is the second message's.
    let after = std::time::Instant::now();
    let typing = format!("/channels/{CHAN}/typing");
    let times = w
        .fake
        .wait_for("typing re-sent while waiting", |v| {
            let t: Vec<_> = v
                .calls()
                .iter()
                .filter(|c| c.path == typing && c.at >= after)
                .map(|c| c.at)
                .collect();
            (t.len() >= 2).then_some(t)
        })
        .await;
    for pair in times.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(gap >= Duration::from_millis(900), "typing {gap:?} apart");
    }
    // Discord fails the next two calls with 5xx: retried, nothing lost.
    w.fake.fail_next(2, 502);
    w.env.mock.release_held();
    let d1 = w.terminal(&job_of(m1)).await;
    let d2 = w.terminal(&job_of(m2)).await;
    w.shows(w.placeholder(CHAN, m1).await.id, &result_of(&d1))
        .await;
    w.shows(w.placeholder(CHAN, m2).await.id, &result_of(&d2))
        .await;
    assert_eq!(w.fake.calls().iter().filter(|c| c.status == 502).count(), 2);
    w.cleanup().await;
}

#[tokio::test]
async fn direct_messages_are_answered_only_when_enabled() {
    let mut w = world(|s| s.dms = true).await;
    let dm = 9_001;
    let msg = w.fake.user_says_with(dm, None, ALICE, "psst", false, &[]);
    let done = w.terminal(&job_of(msg)).await;
    assert_eq!(done.session_key, format!("discord:dm:{dm}:{ALICE}"));
    w.shows(w.placeholder(dm, msg).await.id, "echo: psst").await;
    w.cleanup().await;
}

#[tokio::test]
async fn a_fatal_gateway_close_stops_the_relay_with_an_error() {
    let mut w = world(|_| {}).await;
    // 4004: authentication failed; Discord will not take this token again.
    w.fake.close_session(4004);
    let relay = w.relay.take().unwrap();
    let ended = tokio::time::timeout(WAIT, relay.wait())
        .await
        .expect("the relay stops");
    let err = ended.expect_err("a fatal close is an error");
    assert!(err.to_string().contains("bad token"), "{err}");
    w.cleanup().await;
}

#[tokio::test]
async fn an_image_attachment_reaches_the_api_as_an_image_block_and_text_files_join_the_prompt() {
    let mut w = world(|_| {}).await;
    // A real (1x1) PNG and a text file; a zip is left out, and says so.
    let png: Vec<u8> = vec![
        0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0, 0, 0, 13, 0x49, 0x48, 0x44, 0x52, 0, 0,
        0, 1, 0, 0, 0, 1, 8, 6, 0, 0, 0, 0x1f, 0x15, 0xc4, 0x89, 0, 0, 0, 13, 0x49, 0x44, 0x41,
        0x54, 0x78, 0x9c, 0x63, 0xf8, 0xcf, 0xc0, 0xf0, 0x1f, 0, 0x05, 0, 0x01, 0xff, 0x89, 0x99,
        0x3d, 0x1d, 0, 0, 0, 0, 0x49, 0x45, 0x4e, 0x44, 0xae, 0x42, 0x60, 0x82,
    ];
    let files = [
        ("dot.png", "image/png", png.clone()),
        (
            "notes.txt",
            "text/plain; charset=utf-8",
            b"remember the milk".to_vec(),
        ),
        ("bundle.zip", "application/zip", vec![1, 2, 3]),
    ];
    let msg = w
        .fake
        .user_says_with_files(CHAN, ALICE, "what is this?", &files);
    let done = w.terminal(&job_of(msg)).await;
    assert!(matches!(done.body, EventBody::Completed { .. }), "{done:?}");
    // The placeholder said what was left out.
    let posted = w
        .fake
        .calls_to("POST", &format!("/channels/{CHAN}/messages"));
    let first = posted[0].body["content"].as_str().unwrap();
    assert!(
        first.contains("bundle.zip (not an image or text file)"),
        "{first}"
    );

    let req = w.env.mock.requests().last().cloned().expect("a request");
    // The CLI sends the prompt's blocks in a user message (with its own
    // blocks around them): find the image and the text among them.
    let content: Vec<Value> = req.body["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter(|m| m["role"] == "user")
        .filter_map(|m| m["content"].as_array())
        .flatten()
        .cloned()
        .collect();
    let image = content
        .iter()
        .find(|b| b["type"] == "image")
        .expect("an image block");
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
    assert_eq!(image["source"]["type"], "base64");
    assert_eq!(image["source"]["media_type"], "image/png");
    assert_eq!(image["source"]["data"], b64.as_str());
    let text: String = content
        .iter()
        .filter_map(|b| b["text"].as_str())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(text.contains("what is this?"), "{text}");
    assert!(
        text.contains("--- notes.txt ---\nremember the milk"),
        "{text}"
    );
    assert!(!text.contains("bundle"), "{text}");
    w.cleanup().await;
}

#[tokio::test]
async fn a_tool_call_shows_as_a_compact_line_under_the_streaming_text() {
    let mut w = world(|_| {}).await;
    let path = "/etc/hostname";
    w.env.mock.push_behavior_for(
        "tool",
        Behavior::tool_use("Read", json!({"file_path": path})),
    );
    w.env.mock.push_behavior_for(
        "tool",
        Behavior::hold("I read the file, it names the host."),
    );
    let msg = w.fake.user_says(CHAN, ALICE, "[[mock:tool]] read it", true);
    let ph = w.placeholder(CHAN, msg).await;
    w.env.mock.wait_for_held(1, WAIT).await;
    let half = Behavior::hold_first_delta("I read the file, it names the host.");
    let view = render::streaming_view(&half, Some(&render::tool_line("Read", path)));
    assert_eq!(view, format!("{half}\n-# 🔧 Read · {path}"));
    w.shows(ph.id, &view).await;
    w.env.mock.release_held();
    let done = w.terminal(&job_of(msg)).await;
    w.shows(ph.id, &result_of(&done)).await;
    w.cleanup().await;
}

#[tokio::test]
async fn a_channel_the_bot_may_not_write_to_blocks_no_other_conversation() {
    let mut w = world(|s| s.commands_guild = Some(GUILD)).await;
    // Commands were registered in the one guild (instant), not globally.
    let puts = w.fake.calls_to("PUT", "/commands");
    assert_eq!(puts.len(), 1);
    assert_eq!(
        puts[0].path,
        format!(
            "/applications/{}/guilds/{GUILD}/commands",
            crate::common::fake_discord::APP_ID
        )
    );

    let closed = CHAN + 7;
    w.fake.forbid(closed);
    let lost = w.fake.user_says(closed, ALICE, "hello?", true);
    let ok = w.fake.user_says(CHAN, BOB, "still fine", true);
    let done = w.terminal(&job_of(ok)).await;
    w.shows(w.placeholder(CHAN, ok).await.id, &result_of(&done))
        .await;
    // The refused placeholder was tried once, and no job was published.
    w.fake
        .wait_for("the refused placeholder", |v| {
            v.calls().iter().find(|c| c.status == 403).map(|_| ())
        })
        .await;
    assert_eq!(
        w.fake
            .calls_to("POST", &format!("/channels/{closed}/messages"))
            .len(),
        1
    );
    assert!(!w.events.contains_key(&job_of(lost)));
    assert_eq!(w.env.mock.requests().len(), 1);
    w.cleanup().await;
}

#[tokio::test]
async fn a_very_long_answer_can_come_as_a_file_under_a_preview() {
    let mut w = world(|s| s.answer_file_above = 3000).await;
    let text = long_answer();
    w.env
        .mock
        .push_behavior_for("file", Behavior::reply(text.clone()));
    let msg = w
        .fake
        .user_says(CHAN, ALICE, "[[mock:file]] write it", true);
    let done = w.terminal(&job_of(msg)).await;
    let ph = w.placeholder(CHAN, msg).await;
    let render::Final::File { preview, .. } = render::final_reply(&result_of(&done), None, 3000)
    else {
        panic!("not a file");
    };
    w.shows(ph.id, &preview).await;
    let file = w
        .fake
        .wait_for("the answer as a file", |v| {
            v.messages_in(CHAN)
                .into_iter()
                .find_map(|m| m.files.first().cloned())
        })
        .await;
    assert_eq!(file.0, render::ANSWER_FILE);
    assert_eq!(String::from_utf8(file.1).unwrap(), text);
    assert_eq!(
        w.fake.messages_in(CHAN).len(),
        2,
        "the preview and the file"
    );
    w.cleanup().await;
}

#[tokio::test]
async fn a_users_budget_follows_them_across_channels() {
    let mut w = world_with(false, |_| {}).await;
    w.start_worker_with(|s| {
        let b = &mut s.profiles.get_mut("discord").unwrap().budget;
        b.identity_usd = Some(0.000_001);
    })
    .await;
    // The first turn crosses the budget and finishes; the user's next job,
    // in another channel (another session), is refused.
    let m1 = w.fake.user_says(CHAN, ALICE, "first", true);
    let d1 = w.terminal(&job_of(m1)).await;
    assert!(matches!(d1.body, EventBody::Completed { .. }), "{d1:?}");
    let other = CHAN + 5;
    let m2 = w.fake.user_says(other, ALICE, "second", true);
    let d2 = w.terminal(&job_of(m2)).await;
    assert!(
        matches!(
            d2.body,
            EventBody::Failed {
                error: claude_worker::protocol::ErrorKind::BudgetExceeded,
                ..
            }
        ),
        "{d2:?}"
    );
    let ph = w.placeholder(other, m2).await;
    w.shows(
        ph.id,
        render::failure(claude_worker::protocol::ErrorKind::BudgetExceeded),
    )
    .await;
    // Bob is not Alice: his budget is his own.
    let m3 = w.fake.user_says(other, BOB, "third", true);
    let d3 = w.terminal(&job_of(m3)).await;
    assert!(matches!(d3.body, EventBody::Completed { .. }), "{d3:?}");
    w.cleanup().await;
}

fn session_of(e: &EventV1) -> String {
    match &e.body {
        EventBody::Completed {
            claude_session_id: Some(sid),
            ..
        } => sid.clone(),
        other => panic!("not completed with a session: {other:?}"),
    }
}

fn resumed_of(w: &World, job_id: &str) -> Option<bool> {
    w.events[job_id].iter().find_map(|e| match &e.body {
        EventBody::Started { resumed, .. } => Some(*resumed),
        _ => None,
    })
}

async fn restart_relay(w: &mut World) {
    w.kill_relay().await;
    w.start_relay().await;
}

#[tokio::test]
async fn status_and_a_pending_reset_survive_a_relay_restart() {
    let mut w = world(|_| {}).await;
    let m1 = w.fake.user_says(CHAN, ALICE, "first", true);
    let first = w.terminal(&job_of(m1)).await;
    let sid1 = session_of(&first);
    let EventBody::Completed {
        session_cost_usd: Some(cost1),
        ..
    } = first.body
    else {
        panic!("{first:?}")
    };
    restart_relay(&mut w).await;
    // The totals come from the workers' store, not the relay's memory.
    let status = slash(&w, "status", json!([])).await;
    assert!(status.contains(&format!("Session `{sid1}`")), "{status}");
    assert!(
        status.contains(&format!(
            "Turns: 1 · Cost: ${cost1:.4} · Profile: `discord`"
        )),
        "{status}"
    );
    assert!(status.contains("Queued: 0 · Running: 0"), "{status}");

    let reset = slash(&w, "reset", json!([])).await;
    assert!(reset.contains("new conversation"), "{reset}");
    restart_relay(&mut w).await;
    let status = slash(&w, "status", json!([])).await;
    assert!(
        status.starts_with("Your next message starts a new conversation."),
        "{status}"
    );
    // The reset survived the restart: the next message starts afresh...
    let m2 = w.fake.user_says(CHAN, ALICE, "fresh", true);
    let second = w.terminal(&job_of(m2)).await;
    let sid2 = session_of(&second);
    assert_ne!(sid2, sid1);
    assert_eq!(resumed_of(&w, &job_of(m2)), Some(false));
    // ...and only that one: the one after continues the new session.
    let m3 = w.fake.user_says(CHAN, ALICE, "again", true);
    let third = w.terminal(&job_of(m3)).await;
    assert_eq!(session_of(&third), sid2);
    assert_eq!(resumed_of(&w, &job_of(m3)), Some(true));
    w.shows(w.placeholder(CHAN, m3).await.id, "echo: again")
        .await;

    // Queued and running jobs, as the store counts them, after a restart.
    w.env
        .mock
        .push_behavior_for("q", Behavior::hold("held for the count"));
    let m4 = w.fake.user_says(CHAN, ALICE, "[[mock:q]] one", true);
    w.env.mock.wait_for_held(1, WAIT).await;
    let m5 = w.fake.user_says(CHAN, ALICE, "two", true);
    let store = claude_worker::store::connect(&w.env.settings().database.url, 1)
        .await
        .unwrap();
    world::wait_until_async("the second job accepted", || async {
        let job = store.get_job(&job_of(m5)).await.unwrap();
        job.is_some()
    })
    .await;
    restart_relay(&mut w).await;
    let status = slash(&w, "status", json!([])).await;
    assert!(status.contains(&format!("Session `{sid2}`")), "{status}");
    assert!(status.contains("Turns: 3"), "{status}");
    assert!(status.contains("Queued: 1 · Running: 1"), "{status}");
    w.env.mock.release_held();
    w.terminal(&job_of(m4)).await;
    w.terminal(&job_of(m5)).await;
    w.cleanup().await;
}

/// A 429 with `retry_after` only in its JSON body (no rate-limit headers):
/// the relay waits it out itself; nothing reaches the route meanwhile.
#[tokio::test]
async fn a_429_with_retry_after_only_in_its_body_holds_the_route() {
    let mut w = world(|_| {}).await;
    w.fake.rate_limit_edits_as(1, 1.0, Limit::BodyOnly);
    let msg = w.fake.user_says(CHAN, ALICE, "rate me", true);
    let done = w.terminal(&job_of(msg)).await;
    let ph = w.placeholder(CHAN, msg).await;
    w.shows(ph.id, &result_of(&done)).await;
    let edits = w.fake.calls_to("PATCH", &format!("/messages/{}", ph.id));
    assert_eq!(edits[0].status, 429);
    // The next request to the route came after the wait, and passed.
    let waited = edits[1].at - edits[0].at;
    assert!(
        waited >= Duration::from_millis(1000),
        "retried after {waited:?}"
    );
    assert_eq!(edits[1].status, 200);
    assert_eq!(edits.iter().filter(|c| c.status == 429).count(), 1);
    w.cleanup().await;
}

/// A global 429: no request to any route until it has passed, another
/// conversation's included; then both answers arrive.
#[tokio::test]
async fn a_global_429_holds_every_request_until_it_passes() {
    let mut w = world(|_| {}).await;
    let wait = Duration::from_millis(1500);
    w.fake
        .rate_limit_edits_as(1, wait.as_secs_f64(), Limit::Global);
    let m1 = w.fake.user_says(CHAN, ALICE, "rate me", true);
    let limited = w
        .fake
        .wait_for("the global 429", |v| {
            v.calls().iter().find(|c| c.status == 429).cloned()
        })
        .await;
    let m2 = w.fake.user_says(CHAN, BOB, "me too", true);
    let (d1, d2) = (w.terminal(&job_of(m1)).await, w.terminal(&job_of(m2)).await);
    w.shows(w.placeholder(CHAN, m1).await.id, &result_of(&d1))
        .await;
    let ph2 = w.placeholder(CHAN, m2).await;
    w.shows(ph2.id, &result_of(&d2)).await;
    let calls = w.fake.calls();
    let during: Vec<_> = calls
        .iter()
        .filter(|c| c.at > limited.at && c.at < limited.at + wait)
        .map(|c| (&c.method, &c.path))
        .collect();
    assert!(
        during.is_empty(),
        "requests during the global wait: {during:?}"
    );
    let posted = calls
        .iter()
        .find(|c| c.method == "POST" && c.at > limited.at)
        .expect("a request after the wait");
    assert!(posted.at >= limited.at + wait);
    w.cleanup().await;
}

/// The client-provided names of the broker's connections (as listed by
/// `rabbitmqctl`).
async fn broker_connections() -> String {
    let list = tokio::process::Command::new("rabbitmqctl")
        .args(["list_connections", "-q", "client_properties"])
        .output();
    let out = tokio::time::timeout(WAIT, list)
        .await
        .expect("rabbitmqctl answers")
        .expect("rabbitmqctl runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn stop_closes_the_relays_publishing_connection() {
    let mut w = world(|_| {}).await;
    let name = format!(
        "\"{}\"",
        claude_worker::relay::discord::publisher_name(&w.env.settings().amqp, &w.settings)
    );
    assert!(broker_connections().await.contains(&name), "{name} listed");
    let relay = w.relay.take().expect("a relay runs");
    relay.stop().await;
    // Still in scope: stop itself closed it, not a drop.
    world::wait_until_async("the publisher's connection closed", || async {
        !broker_connections().await.contains(&name)
    })
    .await;
    drop(relay);
    w.cleanup().await;
}

/// Killed mid-answer, the relay's successor resumes the live view with the
/// whole text so far (every event of the job is redelivered until its
/// end), never with only what came after the restart.
#[tokio::test]
async fn a_restarted_relay_resumes_the_live_view_with_the_whole_text_so_far() {
    let mut w = world(|_| {}).await;
    let text = "The first half of this answer came before the restart, the rest after.";
    let first = Behavior::hold_first_delta(text);
    w.env.mock.push_behavior_for("m", Behavior::hold(text));
    let msg = w.fake.user_says(CHAN, ALICE, "[[mock:m]] go", true);
    let ph = w.placeholder(CHAN, msg).await;
    w.env.mock.wait_for_held(1, WAIT).await;
    w.shows(ph.id, &first).await;
    w.kill_relay().await;
    let restarted = std::time::Instant::now();
    w.start_relay().await;
    // Before the answer goes on, the new relay shows all of it so far.
    let edit = format!("/messages/{}", ph.id);
    w.fake
        .wait_for("an edit after the restart", |v| {
            v.calls()
                .iter()
                .find(|c| c.method == "PATCH" && c.path.contains(&edit) && c.at > restarted)
                .cloned()
        })
        .await;
    w.env.mock.release_held();
    let done = w.terminal(&job_of(msg)).await;
    assert_eq!(result_of(&done), text);
    w.shows(ph.id, text).await;
    let after: Vec<String> = w
        .fake
        .calls_to("PATCH", &edit)
        .into_iter()
        .filter(|c| c.at > restarted && c.status == 200)
        .map(|c| c.body["content"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(after[0], first, "the first edit after the restart");
    for content in &after {
        assert!(content.starts_with(&first), "a truncated view: {content:?}");
    }
    assert_eq!(after.last().map(String::as_str), Some(text));
    w.cleanup().await;
}

/// A RabbitMQ restart (a node of the test's own) while the relay streams an
/// answer: the relay's consumer and publisher recover, the answer's final
/// edit arrives, and a message sent after the restart is answered too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_while_the_relay_streams_still_delivers_the_answer() {
    let node = crate::common::broker_node::BrokerNode::start().await;
    let w = world_on(Some(&node.url()), true, |_| {}).await;
    let text = "Streamed across a broker restart, and delivered whole.";
    w.env.mock.push_behavior_for("b", Behavior::hold(text));
    let msg = w.fake.user_says(CHAN, ALICE, "[[mock:b]] go", true);
    let ph = w.placeholder(CHAN, msg).await;
    w.env.mock.wait_for_held(1, WAIT).await;
    w.shows(ph.id, &Behavior::hold_first_delta(text)).await;

    node.stop_app().await;
    w.env.mock.release_held();
    // The outage lasts a few seconds (the scenario, not a synchronisation).
    tokio::time::sleep(Duration::from_secs(3)).await;
    node.start_app().await;

    w.shows(ph.id, text).await;
    let after = w.fake.user_says(CHAN, ALICE, "after the restart", true);
    let ph2 = w.placeholder(CHAN, after).await;
    w.shows(ph2.id, "echo: after the restart").await;
    assert_eq!(
        w.fake.messages_in(CHAN).len(),
        2,
        "each answer edited into its own reply"
    );
    w.cleanup().await;
    drop(node);
}
