//! /reset, /stop, /status, /mode, /compact: as slash commands
//! (acknowledged at once as deferred, then the answer edited in) and as
//! text (`@bot /reset`).

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use twilight_model::application::command::Command;
use twilight_model::application::interaction::application_command::CommandOptionValue;
use twilight_model::application::interaction::{Interaction, InteractionData, InteractionType};
use twilight_model::id::marker::ApplicationMarker;
use twilight_model::id::Id;

use super::gateway::Me;
use super::route::{self, Facts, TextCommand};
use super::{lock, render, Shared};
use crate::client::{Client, Incoming, JobTracker, Step};
use crate::protocol::{
    ControlBody, ControlOutcome, ControlResultV1, EventBody, JobV1, PermissionMode, SessionMode,
    SessionSpec, PROTOCOL_VERSION,
};

/// How long /stop and /mode wait for a worker's answer.
const CONTROL_WAIT: Duration = Duration::from_secs(5);

/// How long /compact waits for its job: it queues behind the
/// conversation's running answer, and a slash command's answer can be
/// edited in for 15 minutes.
const COMPACT_WAIT: Duration = Duration::from_secs(600);

/// What /compact says of a conversation that has nothing to compact.
pub const NOTHING_TO_COMPACT: &str = "Nothing to compact: this conversation has no messages yet.";

/// The commands registered at start-up.
pub fn definitions() -> Vec<Command> {
    let modes: Vec<_> = [
        "plan",
        "dontAsk",
        "default",
        "acceptEdits",
        "auto",
        "bypassPermissions",
    ]
    .iter()
    .map(|m| json!({"name": m, "value": m}))
    .collect();
    let defs = json!([
        {"name": "reset", "description": "Start a new conversation with your next message", "type": 1, "version": "1", "default_member_permissions": null},
        {"name": "stop", "description": "Stop the answer in progress", "type": 1, "version": "1", "default_member_permissions": null},
        {"name": "status", "description": "This conversation's session, turns, cost and queue", "type": 1, "version": "1", "default_member_permissions": null},
        {"name": "compact", "description": "Summarise this conversation to free its context", "type": 1, "version": "1", "default_member_permissions": null},
        {"name": "mode", "description": "Set the permission mode (within the profile's ceiling)", "type": 1, "version": "1", "default_member_permissions": null,
         "options": [{"name": "mode", "description": "Permission mode", "type": 3, "required": true, "choices": modes}]}
    ]);
    // Written as JSON: the wire shape is what Discord documents.
    serde_json::from_value(defs).unwrap_or_default()
}

/// Registers the commands (bulk overwrite), globally or in one guild.
pub async fn register(shared: &Shared, app: Id<ApplicationMarker>) {
    let defs = definitions();
    match shared
        .rest
        .register(app, shared.settings.commands_guild, &defs)
        .await
    {
        Ok(()) => tracing::info!(count = defs.len(), "slash commands registered"),
        Err(e) => {
            tracing::warn!(error = %e, "could not register slash commands; text commands still work")
        }
    }
}

/// The text command of a slash command interaction.
fn command_of(i: &Interaction) -> Option<TextCommand> {
    let Some(InteractionData::ApplicationCommand(data)) = &i.data else {
        return None;
    };
    let cmd = match data.name.as_str() {
        "reset" => TextCommand::Reset,
        "stop" => TextCommand::Stop,
        "status" => TextCommand::Status,
        "compact" => TextCommand::Compact {
            user: i.author_id().map(Id::get).unwrap_or(0),
        },
        "mode" => {
            let mode = data.options.iter().find_map(|o| match &o.value {
                CommandOptionValue::String(s) if o.name == "mode" => Some(s.clone()),
                _ => None,
            });
            TextCommand::Mode(mode.unwrap_or_default())
        }
        _ => return None,
    };
    Some(cmd)
}

/// Acknowledges a slash command within Discord's 3 s (deferred), then
/// edits the answer in. Not-allowed users get a short refusal.
pub async fn on_interaction(shared: &Arc<Shared>, me: Me, i: Interaction) {
    if i.kind != InteractionType::ApplicationCommand {
        return;
    }
    if let Err(e) = shared.rest.defer(me.app, i.id, &i.token).await {
        tracing::warn!(error = %e, "could not acknowledge an interaction");
        return;
    }
    let user = i.author_id().map(Id::get).unwrap_or(0);
    let roles: Vec<u64> = i
        .member
        .as_ref()
        .map(|m| m.roles.iter().map(|r| r.get()).collect())
        .unwrap_or_default();
    let channel = i.channel.as_ref().map(|c| c.id.get()).unwrap_or(0);
    let guild = i.guild_id.map(Id::get);
    let own_thread_parent = lock(&shared.threads).get(&channel).copied().flatten();
    let facts = Facts {
        author_id: user,
        guild_id: guild,
        channel_id: channel,
        own_thread_parent,
        role_ids: &roles,
        ..Default::default()
    };
    let answer = match command_of(&i) {
        Some(_) if !route::allowed(&shared.settings, &facts) => "Not available here.".to_string(),
        Some(cmd) => {
            let key = route::session_key(shared.settings.scope, guild, channel, user);
            run_text(shared, &key, cmd).await
        }
        None => "Unknown command.".to_string(),
    };
    if let Err(e) = shared.rest.answer(me.app, &i.token, &answer).await {
        tracing::warn!(error = %e, "could not answer an interaction");
    }
}

/// Runs a command for the session `key`; returns the answer to show.
/// Each asks the workers (control messages): what a session is and
/// whether it was reset lives in their store, not in the relay.
pub async fn run_text(shared: &Shared, key: &str, cmd: TextCommand) -> String {
    let session_key = key.to_string();
    match cmd {
        TextCommand::Reset => {
            let answer = ask(shared, ControlBody::ResetSession { session_key }).await;
            in_words(answer, |_| {
                "🆕 Your next message starts a new conversation.".into()
            })
        }
        TextCommand::Status => {
            // An unknown session is a status too: nothing yet.
            let answer = ask(shared, ControlBody::SessionStatus { session_key })
                .await
                .map(|r| r.map(unknown_is_empty));
            in_words(answer, |r| status(shared, r))
        }
        TextCommand::Stop => {
            let body = ControlBody::Cancel {
                job_id: None,
                session_key: Some(session_key),
                reason: Some("stopped from Discord".into()),
            };
            in_words(ask(shared, body).await, |r| format!("✅ {}", r.message))
        }
        TextCommand::Mode(mode) => {
            let Ok(mode) = serde_json::from_value::<PermissionMode>(json!(mode)) else {
                return "Modes: plan, dontAsk, default, acceptEdits, auto, bypassPermissions."
                    .into();
            };
            let body = ControlBody::SetPermissionMode { session_key, mode };
            in_words(ask(shared, body).await, |r| format!("✅ {}", r.message))
        }
        TextCommand::Compact { user } => compact(shared, session_key, user).await,
    }
}

/// /compact: a job whose prompt is `/compact` (the CLI's own command: a
/// compaction with no turn after it), queued in order like any message of
/// the conversation, and its outcome in words.
async fn compact(shared: &Shared, session_key: String, user: u64) -> String {
    // A conversation that has not begun has nothing to compact; a job
    // would start a Claude session only to be told so.
    let status = ask(
        shared,
        ControlBody::SessionStatus {
            session_key: session_key.clone(),
        },
    )
    .await
    .map(|r| r.map(unknown_is_empty));
    let begun = match &status {
        Ok(Some(r)) if r.ok => r
            .status
            .as_ref()
            .is_some_and(|s| s.claude_session_id.is_some() && !s.reset_pending),
        _ => return in_words(status, |_| String::new()),
    };
    if !begun {
        return NOTHING_TO_COMPACT.into();
    }
    match run_compaction(shared, session_key, user).await {
        Ok(answer) => answer,
        Err(e) => {
            tracing::warn!(error = %e, "a compaction job failed to run");
            "⚠️ No worker is reachable right now.".into()
        }
    }
}

/// What a compaction job's events came to.
#[derive(Debug, Default, PartialEq)]
struct Compaction {
    /// `(pre_tokens, post_tokens)` of its `compacted` event.
    compacted: Option<(u64, u64)>,
    /// What the CLI said instead of compacting (e.g. why it failed).
    said: String,
    /// The terminal event's body.
    ended: Option<EventBody>,
}

/// Publishes the compaction job on a short-lived client (its private
/// queue receives the job's events) and follows it to its end, bounded.
async fn run_compaction(
    shared: &Shared,
    session_key: String,
    user: u64,
) -> Result<String, crate::client::ClientError> {
    let mut client = Client::connect(&shared.amqp, "claude-worker discord compact").await?;
    let job = JobV1 {
        v: PROTOCOL_VERSION,
        job_id: Some(format!("discord-compact-{}", uuid::Uuid::new_v4())),
        session_key,
        prompt: "/compact".into(),
        session: SessionSpec {
            mode: SessionMode::Continue,
            ..Default::default()
        },
        profile: Some(shared.settings.profile.clone()),
        options: Default::default(),
        metadata: None,
        reply_to: None,
        attachments: None,
        // As the user's messages: budgets follow the user.
        identity: Some(route::identity(user)),
        prompt_answerers: None,
    };
    let result = follow(shared, &mut client, &job).await;
    client.close().await;
    Ok(compaction_in_words(&result?))
}

async fn follow(
    shared: &Shared,
    client: &mut Client,
    job: &JobV1,
) -> Result<Compaction, crate::client::ClientError> {
    let job_id = client.publish_job(job).await?;
    let mut tracker = JobTracker::new(job_id);
    let mut seen = Compaction::default();
    let deadline = tokio::time::Instant::now() + COMPACT_WAIT;
    while seen.ended.is_none() {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let next = tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            n = client.recv(left) => n?,
        };
        let Some(Incoming::Event {
            event, lease_epoch, ..
        }) = next
        else {
            if left.is_zero() {
                break;
            }
            continue;
        };
        match (tracker.accept(&event, lease_epoch), event.body) {
            (Step::Skip, _) => {}
            (Step::Terminal, body) => seen.ended = Some(body),
            (
                _,
                EventBody::Compacted {
                    pre_tokens,
                    post_tokens,
                    ..
                },
            ) => seen.compacted = Some((pre_tokens, post_tokens)),
            _ => {}
        }
        seen.said = tracker.text().to_string();
    }
    Ok(seen)
}

/// The answer to /compact; never empty.
fn compaction_in_words(c: &Compaction) -> String {
    match (&c.ended, c.compacted) {
        (None, _) => "⏳ The compaction is still waiting behind this conversation's answer; \
                      it will run, but its result will not be shown here."
            .into(),
        (Some(EventBody::Completed { .. }), Some((pre, post))) => format!(
            "🗜️ Compacted: {} → {} tokens.",
            thousands(pre),
            thousands(post)
        ),
        (Some(EventBody::Completed { .. }), None) => {
            let said = c.said.trim();
            if said.is_empty() || said.contains("No messages to compact") {
                NOTHING_TO_COMPACT.into()
            } else {
                // The CLI says why (e.g. the summary request failed) in
                // its first sentence; the rest is advice for an operator
                // (it can name the API's address).
                let first = said.split_inclusive(". ").next().unwrap_or(said);
                let said: String = first.trim_end().chars().take(300).collect();
                format!("⚠️ Not compacted; the conversation goes on as it was. {said}")
            }
        }
        (Some(EventBody::Failed { error, .. }), _) => {
            format!(
                "{} (The conversation was not compacted.)",
                render::failure(*error)
            )
        }
        (Some(_), _) => "⏹️ The compaction was stopped.".into(),
    }
}

/// `45120` → `45,120`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, d) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(d);
    }
    out
}

/// /status from the worker's answer (its store's view of the session).
fn status(shared: &Shared, r: &ControlResultV1) -> String {
    let profile = &shared.settings.profile;
    let Some(s) = &r.status else {
        return format!("No conversation yet · Profile: `{profile}`");
    };
    let session = match (&s.claude_session_id, s.reset_pending) {
        (_, true) => "Your next message starts a new conversation.".to_string(),
        (Some(id), false) => format!("Session `{id}`"),
        (None, false) => "No conversation yet.".to_string(),
    };
    let context = match (s.context_tokens, s.context_window) {
        (Some(used), Some(window)) if window > 0 => {
            format!(" · Context: {used} of {window} tokens")
        }
        _ => String::new(),
    };
    format!(
        "{session}\nTurns: {} · Cost: ${:.4} · Profile: `{}` · Queued: {} · Running: {}{context}",
        s.turns, s.cost_usd, s.profile, s.queued_jobs, s.running_jobs
    )
}

/// `session_status` of a key the workers never saw: an empty status.
fn unknown_is_empty(mut r: ControlResultV1) -> ControlResultV1 {
    r.ok |= r.outcome == ControlOutcome::Unknown;
    r
}

/// Sends a control message and waits (bounded) for the worker's answer.
async fn ask(
    shared: &Shared,
    body: ControlBody,
) -> Result<Option<ControlResultV1>, crate::client::ClientError> {
    // A short-lived client: its private queue receives the one answer.
    let mut client = Client::connect(&shared.amqp, "claude-worker discord control").await?;
    let sent = client.publish_control(body).await;
    let result = match sent {
        Ok(id) => client.wait_control_result(&id, CONTROL_WAIT).await,
        Err(e) => Err(e),
    };
    client.close().await;
    result
}

/// The answer to show: `done` of a successful result, else the worker's
/// refusal or why no worker answered.
fn in_words(
    answer: Result<Option<ControlResultV1>, crate::client::ClientError>,
    done: impl FnOnce(&ControlResultV1) -> String,
) -> String {
    match answer {
        Ok(Some(r)) if r.ok => done(&r),
        Ok(Some(r)) => format!("⚠️ {}", r.message),
        Ok(None) => "⚠️ No worker answered; try again.".into(),
        Err(e) => {
            tracing::warn!(error = %e, "a control message failed");
            "⚠️ No worker is reachable right now.".into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ErrorKind;

    fn completed() -> EventBody {
        serde_json::from_value(serde_json::json!({
            "type": "completed", "result": "", "usage": {}, "total_cost_usd": 0.0,
            "duration_ms": 1, "num_turns": 0
        }))
        .unwrap()
    }

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(8_310), "8,310");
        assert_eq!(thousands(45_120), "45,120");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn every_compaction_ending_has_words() {
        let words = |compacted, said: &str, ended| {
            compaction_in_words(&Compaction {
                compacted,
                said: said.into(),
                ended,
            })
        };
        assert_eq!(
            words(Some((45_120, 8_310)), "", Some(completed())),
            "🗜️ Compacted: 45,120 → 8,310 tokens."
        );
        assert_eq!(words(None, "", Some(completed())), NOTHING_TO_COMPACT);
        assert_eq!(
            words(None, "Error: No messages to compact", Some(completed())),
            NOTHING_TO_COMPACT
        );
        let failed = words(None, "Error during compaction: boom", Some(completed()));
        assert!(failed.starts_with("⚠️ Not compacted") && failed.ends_with("boom"));
        let said = "Error during compaction: API Error: 500 boom. If it persists, check 10.0.0.1.";
        let failed = words(None, said, Some(completed()));
        assert!(failed.ends_with("500 boom."), "{failed}");
        let failed = EventBody::Failed {
            error: ErrorKind::BudgetExceeded,
            message: "m".into(),
            retryable: false,
        };
        assert!(words(None, "", Some(failed)).contains("budget"));
        assert!(words(None, "", None).starts_with("⏳"));
        let cancelled = EventBody::Cancelled { reason: "r".into() };
        assert!(words(None, "", Some(cancelled)).contains("stopped"));
    }
}
