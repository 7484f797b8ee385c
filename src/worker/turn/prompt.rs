//! Permission prompts of a turn (profile `permission_prompts = "ask"`):
//! the CLI's `can_use_tool` request becomes a `permission_request` event;
//! a person's `permission_response` (through the control plane, see
//! `worker::control::permission_response`), the profile's timeout, or a
//! cancel settles it, and the CLI gets its answer.
//!
//! Each prompt gets a fresh id of ours, never the CLI's: a retried job
//! asks again under a new id, so an answer to the old prompt cannot reach
//! the new one. Each is recorded in the store before it is published and
//! marked once resolved; what an attempt leaves open is resolved by the
//! next one or the job's ending (`superseded`).

use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;
use tracing::debug;

use super::events::JobEvents;
use super::grants;
use super::superseded::mark_resolved;
use super::TurnAbort;
use crate::claude::{summarize_tool_input, CliProcess, ToolPermissionRequest};
use crate::config::{PermissionPrompts, Profile};
use crate::protocol::{
    EventBody, PermissionBehavior, PermissionResponseV1, PromptOption, PromptQuestion, ResolvedBy,
};
use crate::store::now_ms;

/// While a prompt waits, the run wakes this often to keep the lease
/// (the CLI is silent meanwhile).
const PROMPT_TICK: Duration = Duration::from_secs(5);

/// Longest summary of a tool call in a `permission_request`.
const SUMMARY_MAX_CHARS: usize = 4000;
/// At most this many of the CLI's suggestions are passed on.
const SUGGESTIONS_MAX: usize = 8;

/// The tool Claude uses to ask the user a multiple-choice question.
pub const ASK_USER_QUESTION: &str = "AskUserQuestion";

/// A CLI run's open prompts, and how long they have kept it waiting.
#[derive(Default)]
pub(super) struct Prompts {
    list: Vec<PendingPrompt>,
    /// Since when a prompt has been waiting (none settled since).
    waiting_since: Option<Instant>,
    /// Earlier waits, added to the turn's deadline.
    waited: Duration,
}

impl Prompts {
    /// How long prompts have kept the turn waiting (added to its deadline).
    pub fn waited(&self) -> Duration {
        self.waited + self.waiting_since.map_or(Duration::ZERO, |s| s.elapsed())
    }

    /// When the run must look at its prompts again, if any waits.
    pub fn next_wake(&self) -> Option<Instant> {
        let expires = self.list.iter().map(|p| p.expires).min()?;
        Some(expires.min(Instant::now() + PROMPT_TICK))
    }

    /// The CLI asks whether a tool call may run: publish the prompt (the
    /// answer comes later as an input of the run).
    pub async fn ask(
        &mut self,
        proc: &mut CliProcess,
        profile: &Profile,
        events: &mut JobEvents<'_>,
        request: ToolPermissionRequest,
    ) -> Result<(), TurnAbort> {
        if profile.permission_prompts != PermissionPrompts::Ask {
            // Not asked for (the flag is only passed with `ask`): refuse.
            let answer = deny("this profile does not ask for permission".into());
            proc.write_stdin(&response_line(&request.request_id, answer));
            return Ok(());
        }
        let wait = Duration::from_secs(profile.permission_timeout_secs);
        let pending = PendingPrompt::new(request, Instant::now() + wait);
        // Recorded before it goes out: whatever becomes of this attempt, a
        // `permission_resolved` follows (see `superseded`).
        let (store, attempt) = (&events.ctx.store, events.attempt);
        store
            .open_prompt(events.lease, &events.job_id, &pending.id, attempt, now_ms())
            .await?;
        events.prompts_recorded = true;
        events.turn.open_prompt(&pending.id);
        debug!(tool = %pending.cli.tool_name, request_id = %pending.id, "asking a person");
        let event = pending.event(now_ms() + wait.as_millis() as i64);
        if self.list.is_empty() {
            self.waiting_since = Some(Instant::now());
        }
        self.list.push(pending);
        events.emit(event).await
    }

    /// Removes a settled prompt; once none waits, the wait is banked.
    fn take(&mut self, id: &str) -> Option<PendingPrompt> {
        let i = self.list.iter().position(|p| p.id == id)?;
        let p = self.list.remove(i);
        if self.list.is_empty() {
            if let Some(since) = self.waiting_since.take() {
                self.waited += since.elapsed();
            }
        }
        Some(p)
    }

    /// A person's answer (already settled in the registry; a stale one
    /// matches no prompt and is dropped).
    pub async fn on_answer(
        &mut self,
        proc: &mut CliProcess,
        events: &mut JobEvents<'_>,
        answer: PermissionResponseV1,
        claude_session: Option<&str>,
    ) -> Result<(), TurnAbort> {
        let Some(p) = self.take(&answer.request_id) else {
            return Ok(());
        };
        proc.write_stdin(&response_line(&p.cli.request_id, p.cli_answer(&answer)));
        if answer.allow_for_session && answer.behavior == PermissionBehavior::Allow {
            grants::record(events, claude_session, &p.session_rules()).await;
        }
        let by = ResolvedBy::Person;
        events
            .emit(p.resolved(answer.behavior, by, answer.message))
            .await?;
        mark_resolved(events, &p.id, by).await;
        Ok(())
    }

    /// Denies the prompts nobody answered in time.
    pub async fn expire(
        &mut self,
        proc: &mut CliProcess,
        profile: &Profile,
        events: &mut JobEvents<'_>,
    ) -> Result<(), TurnAbort> {
        let now = Instant::now();
        let due: Vec<String> = self
            .list
            .iter()
            .filter(|p| p.expires <= now)
            .map(|p| p.id.clone())
            .collect();
        for id in due {
            if !events.turn.settle_prompt(&id) {
                // An answer got there first: it is on its way as an input.
                if let Some(p) = self.list.iter_mut().find(|p| p.id == id) {
                    p.expires = now + PROMPT_TICK;
                }
                continue;
            }
            let Some(p) = self.take(&id) else {
                continue;
            };
            let secs = profile.permission_timeout_secs;
            let message = format!("nobody answered the permission prompt within {secs} s");
            proc.write_stdin(&response_line(&p.cli.request_id, deny(message.clone())));
            let by = ResolvedBy::Timeout;
            events
                .emit(p.resolved(PermissionBehavior::Deny, by, Some(message)))
                .await?;
            mark_resolved(events, &p.id, by).await;
        }
        Ok(())
    }

    /// The turn is cancelled: its prompts are settled as such.
    pub async fn cancel_all(&mut self, events: &mut JobEvents<'_>) -> Result<(), TurnAbort> {
        let ids: Vec<String> = self.list.iter().map(|p| p.id.clone()).collect();
        for id in ids {
            self.settle_as_cancelled(events, &id, "the turn was cancelled")
                .await?;
        }
        Ok(())
    }

    /// The CLI withdrew a request (`control_cancel_request`).
    pub async fn withdrawn(
        &mut self,
        events: &mut JobEvents<'_>,
        cli_request_id: &str,
    ) -> Result<(), TurnAbort> {
        let id = self
            .list
            .iter()
            .find(|p| p.cli.request_id == cli_request_id)
            .map(|p| p.id.clone());
        match id {
            Some(id) => {
                self.settle_as_cancelled(events, &id, "the CLI withdrew the request")
                    .await
            }
            None => Ok(()),
        }
    }

    async fn settle_as_cancelled(
        &mut self,
        events: &mut JobEvents<'_>,
        id: &str,
        why: &str,
    ) -> Result<(), TurnAbort> {
        events.turn.settle_prompt(id);
        let Some(p) = self.take(id) else {
            return Ok(());
        };
        let message = Some(why.to_string());
        let by = ResolvedBy::Cancel;
        events
            .emit(p.resolved(PermissionBehavior::Deny, by, message))
            .await?;
        mark_resolved(events, &p.id, by).await;
        Ok(())
    }
}

/// A control response line for the CLI's stdin.
fn response_line(request_id: &str, response: Value) -> String {
    let mut line = json!({"type": "control_response", "response": {
        "subtype": "success", "request_id": request_id, "response": response}})
    .to_string();
    line.push('\n');
    line
}

/// A prompt published and not yet settled.
pub(super) struct PendingPrompt {
    /// Our id, in the events and the answer.
    pub id: String,
    pub cli: ToolPermissionRequest,
    /// Denied when nobody answers by then.
    pub expires: Instant,
}

impl PendingPrompt {
    pub fn new(cli: ToolPermissionRequest, expires: Instant) -> PendingPrompt {
        PendingPrompt {
            id: uuid::Uuid::new_v4().to_string(),
            cli,
            expires,
        }
    }

    /// The `permission_request` event.
    pub fn event(&self, expires_at_ms: i64) -> EventBody {
        let cli = &self.cli;
        EventBody::PermissionRequest {
            request_id: self.id.clone(),
            tool_name: cli.tool_name.clone(),
            summary: summary(&cli.tool_name, &cli.input),
            reason: cli.reason.clone(),
            suggestions: cli
                .suggestions
                .iter()
                .take(SUGGESTIONS_MAX)
                .cloned()
                .collect(),
            questions: questions(&cli.tool_name, &cli.input),
            expires_at_ms,
        }
    }

    /// The CLI's answer for a person's response.
    pub fn cli_answer(&self, answer: &PermissionResponseV1) -> Value {
        match answer.behavior {
            PermissionBehavior::Deny => deny(
                answer
                    .message
                    .clone()
                    .unwrap_or_else(|| "denied by a person".into()),
            ),
            PermissionBehavior::Allow => {
                let mut input = answer
                    .updated_input
                    .clone()
                    .unwrap_or_else(|| self.cli.input.clone());
                if let (Some(answers), Some(obj)) = (&answer.answers, input.as_object_mut()) {
                    obj.insert("answers".into(), json!(answers));
                }
                let mut out = json!({"behavior": "allow", "updatedInput": input});
                if answer.allow_for_session {
                    out["updatedPermissions"] = Value::Array(self.session_rules());
                }
                out
            }
        }
    }

    /// "Allow for this session": the CLI's suggestions scoped to the
    /// session, or a rule for the tool when it suggests none.
    pub fn session_rules(&self) -> Vec<Value> {
        let mut rules: Vec<Value> = self
            .cli
            .suggestions
            .iter()
            .filter(|s| s["type"] == "addRules" && s["behavior"] == "allow")
            .cloned()
            .map(|mut s| {
                s["destination"] = json!("session");
                s
            })
            .collect();
        if rules.is_empty() {
            rules.push(
                json!({"type": "addRules", "behavior": "allow", "destination": "session",
                "rules": [{"toolName": self.cli.tool_name}]}),
            );
        }
        rules
    }

    /// The `permission_resolved` event.
    pub fn resolved(
        &self,
        behavior: PermissionBehavior,
        by: ResolvedBy,
        message: Option<String>,
    ) -> EventBody {
        EventBody::PermissionResolved {
            request_id: self.id.clone(),
            behavior,
            by,
            message,
        }
    }
}

/// A deny answer for the CLI; Claude sees `message` as the tool's error.
pub(super) fn deny(message: String) -> Value {
    json!({"behavior": "deny", "message": message})
}

/// What a tool call would do, for a person deciding: the whole command
/// for Bash, the path and a line count for edits, else the usual summary.
pub fn summary(tool_name: &str, input: &Value) -> String {
    let s = |k: &str| input.get(k).and_then(Value::as_str);
    let lines = |k: &str| s(k).map_or(0, |t| t.lines().count());
    let text = match (tool_name, s("file_path")) {
        ("Bash", _) => s("command").map(str::to_string),
        ("Edit", Some(path)) => Some(format!(
            "{path}: replace {} line(s) with {} line(s)",
            lines("old_string"),
            lines("new_string")
        )),
        ("MultiEdit", Some(path)) => Some(format!(
            "{path}: {} edit(s)",
            input["edits"].as_array().map_or(0, Vec::len)
        )),
        ("Write", Some(path)) => Some(format!("{path}: write {} line(s)", lines("content"))),
        (ASK_USER_QUESTION, _) => input["questions"].as_array().map(|q| {
            q.iter()
                .filter_map(|q| q["question"].as_str())
                .collect::<Vec<_>>()
                .join(" / ")
        }),
        _ => None,
    };
    let text = text.unwrap_or_else(|| summarize_tool_input(input));
    crate::claude::stream::truncate_chars(&text, SUMMARY_MAX_CHARS)
}

/// The questions of an `AskUserQuestion` call.
pub fn questions(tool_name: &str, input: &Value) -> Option<Vec<PromptQuestion>> {
    if tool_name != ASK_USER_QUESTION {
        return None;
    }
    let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    let list = input["questions"].as_array()?;
    Some(
        list.iter()
            .take(8)
            .filter_map(|q| {
                Some(PromptQuestion {
                    question: text(q, "question")?,
                    header: text(q, "header"),
                    options: q["options"]
                        .as_array()
                        .map(|o| {
                            o.iter()
                                .take(16)
                                .filter_map(|o| {
                                    Some(PromptOption {
                                        label: text(o, "label")?,
                                        description: text(o, "description"),
                                    })
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                    multi_select: q["multiSelect"].as_bool().unwrap_or(false),
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(tool: &str, input: Value, suggestions: Vec<Value>) -> PendingPrompt {
        PendingPrompt::new(
            ToolPermissionRequest {
                request_id: "cli-1".into(),
                tool_name: tool.into(),
                input,
                suggestions,
                reason: None,
            },
            Instant::now(),
        )
    }

    fn response(behavior: PermissionBehavior) -> PermissionResponseV1 {
        PermissionResponseV1 {
            job_id: "j".into(),
            request_id: "r".into(),
            behavior,
            message: None,
            updated_input: None,
            allow_for_session: false,
            answers: None,
        }
    }

    #[test]
    fn summaries_show_what_a_person_needs() {
        let cmd = "x".repeat(1000);
        assert_eq!(summary("Bash", &json!({"command": cmd})), cmd);
        assert_eq!(
            summary(
                "Edit",
                &json!({"file_path": "/w/a.rs", "old_string": "a\nb", "new_string": "c"})
            ),
            "/w/a.rs: replace 2 line(s) with 1 line(s)"
        );
        assert_eq!(
            summary(
                "Write",
                &json!({"file_path": "/w/n.txt", "content": "1\n2\n3\n"})
            ),
            "/w/n.txt: write 3 line(s)"
        );
        let long = summary("Bash", &json!({"command": "y".repeat(9000)}));
        assert_eq!(long.chars().count(), SUMMARY_MAX_CHARS + 1);
    }

    #[test]
    fn answers_become_the_clis_shapes() {
        let p = request("Write", json!({"file_path": "/a"}), vec![]);
        let deny = p.cli_answer(&response(PermissionBehavior::Deny));
        assert_eq!(
            deny,
            json!({"behavior": "deny", "message": "denied by a person"})
        );
        let mut allow = response(PermissionBehavior::Allow);
        assert_eq!(
            p.cli_answer(&allow),
            json!({"behavior": "allow", "updatedInput": {"file_path": "/a"}})
        );
        allow.allow_for_session = true;
        assert_eq!(
            p.cli_answer(&allow)["updatedPermissions"],
            json!([{"type": "addRules", "behavior": "allow", "destination": "session",
                "rules": [{"toolName": "Write"}]}])
        );
        let suggested = json!({"type": "addRules", "behavior": "allow",
            "destination": "localSettings", "rules": [{"toolName": "Bash", "ruleContent": "ls:*"}]});
        let p = request("Bash", json!({"command": "ls"}), vec![suggested]);
        assert_eq!(
            p.cli_answer(&allow)["updatedPermissions"][0]["destination"],
            "session"
        );
    }

    #[test]
    fn a_question_is_answered_in_the_input() {
        let input = json!({"questions": [{"question": "Which?", "header": "H", "multiSelect": false,
            "options": [{"label": "A", "description": "a"}, {"label": "B"}]}]});
        let p = request(ASK_USER_QUESTION, input.clone(), vec![]);
        let qs = questions(ASK_USER_QUESTION, &input).unwrap();
        assert_eq!(qs[0].options.len(), 2);
        assert_eq!(qs[0].options[1].description, None);
        let mut a = response(PermissionBehavior::Allow);
        a.answers = Some([("Which?".to_string(), "B".to_string())].into());
        let out = p.cli_answer(&a);
        assert_eq!(out["updatedInput"]["answers"], json!({"Which?": "B"}));
        assert_eq!(out["updatedInput"]["questions"], input["questions"]);
    }
}
