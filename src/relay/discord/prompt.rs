//! Permission prompts in Discord (issue 12): a job's `permission_request`
//! becomes a message in its conversation with buttons (Allow / Allow for
//! this session / Deny, or one per option of Claude's question); a click
//! by the conversation's user (or a member with one of
//! `discord.prompt_roles`) becomes a `permission_response`; the job's
//! `permission_resolved` edits the message (buttons disabled, who or what
//! settled it).
//!
//! Stateless across restarts: a button's `custom_id` carries who may
//! answer, the prompt and the job, so any relay process can answer a
//! click. The prompt message is found again among the messages after the
//! job's reply (by its buttons' ids, kept disabled once settled): a
//! restarted relay is sent the job's events again and neither posts a
//! prompt twice nor loses its update. What lives only in memory is a hint:
//! who clicked (after a restart the message says "Allowed" without a
//! name) and a question's text (its events come again before its options
//! can be answered).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use twilight_model::application::interaction::{Interaction, InteractionData, InteractionType};
use twilight_model::channel::message::{AllowedMentions, Component, MessageFlags};
use twilight_model::http::interaction::{InteractionResponseData, InteractionResponseType};
use twilight_model::id::Id;

use super::gateway::Me;
use super::rest::{ChannelId, MessageId};
use super::route::ReplyMeta;
use super::{lock, render, Shared};
use crate::client::{amqp_user, Client, ClientError};
use crate::protocol::{
    ControlBody, ControlOutcome, ControlResultV1, EventBody, PermissionBehavior,
    PermissionResponseV1, PromptQuestion, ResolvedBy,
};

/// How long a click waits for the worker's answer.
const ANSWER_WAIT: Duration = Duration::from_secs(5);
/// Discord's limit on a component's `custom_id`.
pub const CUSTOM_ID_MAX: usize = 100;
const ID_PREFIX: &str = "cwp";
/// Longest summary of a tool call shown (the message has 2,000 characters).
const SUMMARY_SHOWN: usize = 1000;
/// Option buttons of one question (four rows of five; the fifth row is Deny).
const OPTION_BUTTONS: usize = 20;
/// Prompts remembered (who clicked, questions) before the oldest go.
const BOOK_MEMORY: usize = 1024;

/// What a button (or menu) answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    Allow,
    AllowSession,
    Deny,
    /// Option `option` of question `question` (a button).
    Option {
        question: u8,
        option: u8,
    },
    /// The options picked in question `question`'s menu (multi-select).
    Menu {
        question: u8,
    },
    /// A pick in question `question`'s menu of a prompt of several
    /// questions: kept in the message until Submit.
    Pick {
        question: u8,
    },
    /// Sends the picks of a prompt of several questions.
    Submit,
}

impl Choice {
    fn code(self) -> String {
        match self {
            Choice::Allow => "a".into(),
            Choice::AllowSession => "s".into(),
            Choice::Deny => "d".into(),
            Choice::Option { question, option } => format!("o{question}.{option}"),
            Choice::Menu { question } => format!("m{question}"),
            Choice::Pick { question } => format!("p{question}"),
            Choice::Submit => "t".into(),
        }
    }

    fn parse(code: &str) -> Option<Choice> {
        Some(match code {
            "a" => Choice::Allow,
            "s" => Choice::AllowSession,
            "d" => Choice::Deny,
            "t" => Choice::Submit,
            _ => {
                if let Some(q) = code.strip_prefix('m') {
                    Choice::Menu {
                        question: q.parse().ok()?,
                    }
                } else if let Some(q) = code.strip_prefix('p') {
                    Choice::Pick {
                        question: q.parse().ok()?,
                    }
                } else {
                    let (q, o) = code.strip_prefix('o')?.split_once('.')?;
                    Choice::Option {
                        question: q.parse().ok()?,
                        option: o.parse().ok()?,
                    }
                }
            }
        })
    }
}

/// Everything a click needs, carried in the component's `custom_id`:
/// `cwp:<choice>:<user>:<request>:<job id>` (a UUID request id without
/// its hyphens, any other prefixed with `=`; the job id last, as it may
/// hold `:`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Click {
    pub choice: Choice,
    /// The conversation's user (who may answer).
    pub user: u64,
    pub request_id: String,
    pub job_id: String,
}

impl Click {
    /// The `custom_id`; `None` if it would not fit Discord's 100 characters.
    pub fn custom_id(&self) -> Option<String> {
        let req = match uuid::Uuid::parse_str(&self.request_id) {
            Ok(u) if u.hyphenated().to_string() == self.request_id => u.simple().to_string(),
            _ if !self.request_id.is_empty() && !self.request_id.contains(':') => {
                format!("={}", self.request_id)
            }
            _ => return None,
        };
        let id = format!(
            "{ID_PREFIX}:{}:{}:{req}:{}",
            self.choice.code(),
            self.user,
            self.job_id
        );
        (id.len() <= CUSTOM_ID_MAX).then_some(id)
    }

    /// A `custom_id` of ours, read back; `None` for anything else.
    pub fn parse(custom_id: &str) -> Option<Click> {
        let mut p = custom_id.splitn(5, ':');
        if p.next()? != ID_PREFIX {
            return None;
        }
        let choice = Choice::parse(p.next()?)?;
        let user = p.next()?.parse().ok()?;
        let req = p.next()?;
        let request_id = match req.strip_prefix('=') {
            Some(raw) => raw.to_string(),
            None => uuid::Uuid::try_parse(req).ok()?.hyphenated().to_string(),
        };
        let job_id = p.next()?.to_string();
        (!job_id.is_empty() && !request_id.is_empty()).then_some(Click {
            choice,
            user,
            request_id,
            job_id,
        })
    }
}

/// A `permission_request` as the relay shows it.
pub struct Asked<'a> {
    pub job_id: &'a str,
    pub user: u64,
    pub request_id: &'a str,
    pub tool_name: &'a str,
    pub summary: &'a str,
    pub reason: Option<&'a str>,
    /// The CLI suggested rules: "Allow for this session" is offered.
    pub suggestions: bool,
    pub questions: Option<&'a [PromptQuestion]>,
    pub expires_at_ms: i64,
}

/// A prompt message: its text, and its components as Discord's JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub content: String,
    /// The text without the expiry line (what a settled prompt keeps).
    pub head: String,
    pub rows: Vec<Value>,
}

/// Text shown in Discord markdown as written: markdown characters and
/// mention openers escaped, control characters and newlines as spaces.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.push(' ');
            continue;
        }
        if "\\*_~`|>#-[]()<@:".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Keeps at most `max` characters, marking a cut with `…`.
fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
    t.push('…');
    t
}

/// A code block holding `s` as written (a fence inside cannot close it).
fn code_block(s: &str) -> String {
    let body = cut(s, SUMMARY_SHOWN).replace("```", "`\u{200b}`\u{200b}`");
    format!("```\n{body}\n```")
}

fn button(style: u8, label: &str, click: &Click) -> Option<Value> {
    let id = click.custom_id()?;
    Some(json!({"type": 2, "style": style, "label": cut(label, 80), "custom_id": id}))
}

fn rows_of(buttons: Vec<Value>) -> Vec<Value> {
    buttons
        .chunks(5)
        .map(|c| json!({"type": 1, "components": c}))
        .collect()
}

/// The prompt message of a `permission_request`.
pub fn render(a: &Asked<'_>) -> Rendered {
    let click = |choice| Click {
        choice,
        user: a.user,
        request_id: a.request_id.to_string(),
        job_id: a.job_id.to_string(),
    };
    let mut head;
    let mut rows = Vec::new();
    match a.questions {
        Some(qs) => {
            head = "❓ **Claude asks you**".to_string();
            for q in qs.iter().take(4) {
                let header = q
                    .header
                    .as_deref()
                    .map(|h| format!("**{}** ", escape(&cut(h, 40))));
                head += &format!(
                    "\n{}{}",
                    header.unwrap_or_default(),
                    escape(&cut(&q.question, 300))
                );
                for (i, o) in q.options.iter().enumerate().take(OPTION_BUTTONS) {
                    let d = o
                        .description
                        .as_deref()
                        .map(|d| format!(" — {}", escape(&cut(d, 100))));
                    head += &format!(
                        "\n{}. {}{}",
                        i + 1,
                        escape(&cut(&o.label, 80)),
                        d.unwrap_or_default()
                    );
                }
            }
            let deny = button(4, "Don't answer", &click(Choice::Deny));
            match qs.len() {
                1 => {
                    rows = question_rows(&qs[0], &click);
                    rows.extend(rows_of(deny.into_iter().collect()));
                }
                2..=4 => {
                    rows = pick_rows(qs, &click);
                    let submit = button(3, "Submit", &click(Choice::Submit));
                    rows.extend(rows_of(submit.into_iter().chain(deny).collect()));
                }
                _ => {
                    head += "\n-# More than four questions: answer them from another client; here you can only decline.";
                    rows.extend(rows_of(deny.into_iter().collect()));
                }
            }
        }
        None => {
            let tool = escape(&cut(a.tool_name, 60));
            head = format!(
                "🔐 **Claude asks to use {tool}**\n{}",
                code_block(a.summary)
            );
            if let Some(r) = a.reason.filter(|r| !r.trim().is_empty()) {
                head += &format!("\nReason: {}", escape(&cut(r, 300)));
            }
            let mut b = vec![button(3, "Allow", &click(Choice::Allow))];
            if a.suggestions {
                b.push(button(
                    1,
                    "Allow for this session",
                    &click(Choice::AllowSession),
                ));
            }
            b.push(button(4, "Deny", &click(Choice::Deny)));
            rows = rows_of(b.into_iter().flatten().collect());
        }
    }
    let secs = a.expires_at_ms.div_euclid(1000);
    let who = if rows.is_empty() {
        "answer it from another client".to_string()
    } else {
        format!("<@{}> can answer", a.user)
    };
    let content = cut(
        &format!("{head}\n-# Expires <t:{secs}:R> · {who}"),
        render::MESSAGE_LIMIT,
    );
    Rendered {
        content,
        head,
        rows,
    }
}

/// The options of a question as a menu's options (value: the index).
fn menu_options(q: &PromptQuestion) -> Vec<Value> {
    q.options
        .iter()
        .take(25)
        .enumerate()
        .map(|(i, o)| {
            let mut v = json!({"label": cut(&o.label, 100), "value": i.to_string()});
            if let Some(d) = &o.description {
                v["description"] = json!(cut(d, 100));
            }
            v
        })
        .collect()
}

/// A prompt of several questions: a menu per question, whose picks the
/// message itself keeps (each pick updates it) until Submit.
fn pick_rows(qs: &[PromptQuestion], click: &impl Fn(Choice) -> Click) -> Vec<Value> {
    qs.iter()
        .enumerate()
        .filter_map(|(i, q)| {
            let id = click(Choice::Pick { question: i as u8 }).custom_id()?;
            let options = menu_options(q);
            let max = if q.multi_select {
                options.len().max(1)
            } else {
                1
            };
            let name = q.header.as_deref().unwrap_or(&q.question);
            let menu = json!({"type": 3, "custom_id": id, "options": options, "min_values": 1,
                "max_values": max, "placeholder": cut(name, 150)});
            Some(json!({"type": 1, "components": [menu]}))
        })
        .collect()
}

/// One question's components: a button per option, or a menu when
/// several may be picked.
fn question_rows(q: &PromptQuestion, click: &impl Fn(Choice) -> Click) -> Vec<Value> {
    if q.multi_select {
        let Some(id) = click(Choice::Menu { question: 0 }).custom_id() else {
            return Vec::new();
        };
        let options = menu_options(q);
        let n = options.len().max(1);
        let menu = json!({"type": 3, "custom_id": id, "options": options, "min_values": 1,
            "max_values": n, "placeholder": "Choose one or more…"});
        return vec![json!({"type": 1, "components": [menu]})];
    }
    let buttons = q
        .options
        .iter()
        .enumerate()
        .take(OPTION_BUTTONS)
        .filter_map(|(i, o)| {
            let choice = Choice::Option {
                question: 0,
                option: i as u8,
            };
            button(1, &o.label, &click(choice))
        })
        .collect();
    rows_of(buttons)
}

/// `rows` with every component disabled (a settled prompt keeps its
/// buttons, greyed, so a restarted relay still finds it by their ids).
pub fn disabled(rows: &[Value]) -> Vec<Value> {
    let mut rows = rows.to_vec();
    for row in &mut rows {
        if let Some(items) = row["components"].as_array_mut() {
            for c in items {
                c["disabled"] = json!(true);
            }
        }
    }
    rows
}

/// Discord's JSON as twilight's components.
pub fn components(rows: &[Value]) -> Vec<Component> {
    serde_json::from_value(Value::Array(rows.to_vec())).unwrap_or_else(|e| {
        tracing::debug!(error = %e, "prompt components did not build");
        Vec::new()
    })
}

/// Who answered a prompt from Discord, and what they chose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answerer {
    pub user: u64,
    pub behavior: PermissionBehavior,
    /// "Allowed for this session", "answered: Blue"…
    pub said: String,
}

/// The line a settled prompt shows.
pub fn settled_line(
    behavior: PermissionBehavior,
    by: ResolvedBy,
    who: Option<&Answerer>,
) -> String {
    match (by, behavior, who) {
        (ResolvedBy::Timeout, ..) => "⌛ Expired — denied".into(),
        (ResolvedBy::Cancel, ..) => "🚫 Cancelled".into(),
        (ResolvedBy::Superseded, ..) => "⌛ No longer pending".into(),
        (ResolvedBy::Person, _, Some(w)) if w.behavior == behavior => {
            let icon = match behavior {
                PermissionBehavior::Allow => "✅",
                PermissionBehavior::Deny => "❌",
            };
            format!("{icon} {} by <@{}>", w.said, w.user)
        }
        (ResolvedBy::Person, PermissionBehavior::Allow, _) => "✅ Allowed".into(),
        (ResolvedBy::Person, PermissionBehavior::Deny, _) => "❌ Denied".into(),
    }
}

/// What the relay remembers of prompts: who clicked (for the settled
/// line) and the questions (to turn an option's index into its label).
/// Hints only, bounded; a restart forgets them.
#[derive(Default)]
pub struct Book {
    inner: Mutex<BookInner>,
}

#[derive(Default)]
struct BookInner {
    questions: HashMap<String, Vec<PromptQuestion>>,
    answered: HashMap<String, Vec<Answerer>>,
    order: VecDeque<String>,
}

impl BookInner {
    fn touch(&mut self, request_id: &str) {
        if self.order.iter().any(|r| r == request_id) {
            return;
        }
        if self.order.len() >= BOOK_MEMORY {
            if let Some(old) = self.order.pop_front() {
                self.questions.remove(&old);
                self.answered.remove(&old);
            }
        }
        self.order.push_back(request_id.to_string());
    }
}

impl Book {
    fn note_questions(&self, request_id: &str, qs: Vec<PromptQuestion>) {
        let mut b = lock(&self.inner);
        b.touch(request_id);
        b.questions.insert(request_id.to_string(), qs);
    }

    fn questions(&self, request_id: &str) -> Option<Vec<PromptQuestion>> {
        lock(&self.inner).questions.get(request_id).cloned()
    }

    fn note_answer(&self, request_id: &str, a: Answerer) {
        let mut b = lock(&self.inner);
        b.touch(request_id);
        b.answered
            .entry(request_id.to_string())
            .or_default()
            .push(a);
    }

    fn drop_answer(&self, request_id: &str, user: u64) {
        if let Some(list) = lock(&self.inner).answered.get_mut(request_id) {
            list.retain(|a| a.user != user);
        }
    }

    fn answerer(&self, request_id: &str, behavior: PermissionBehavior) -> Option<Answerer> {
        let b = lock(&self.inner);
        let list = b.answered.get(request_id)?;
        list.iter().find(|a| a.behavior == behavior).cloned()
    }

    fn forget(&self, request_id: &str) {
        let mut b = lock(&self.inner);
        b.questions.remove(request_id);
        b.answered.remove(request_id);
        b.order.retain(|r| r != request_id);
    }
}

/// The prompts of one job, kept by its reply task.
pub struct JobPrompts {
    job_id: String,
    channel: ChannelId,
    /// The job's reply: its prompts are posted after it.
    reply: MessageId,
    user: u64,
    open: HashMap<String, Shown>,
}

struct Shown {
    message: MessageId,
    head: String,
    rows: Vec<Value>,
    /// Found already settled (a restarted relay): left as it is.
    settled: bool,
}

impl JobPrompts {
    pub fn new(job_id: &str, channel: ChannelId, meta: &ReplyMeta) -> Option<JobPrompts> {
        Some(JobPrompts {
            job_id: job_id.to_string(),
            channel,
            reply: Id::new_checked(meta.message_id)?,
            user: meta.user_id,
            open: HashMap::new(),
        })
    }

    /// A prompt event of the job: post or update its message.
    pub async fn on_event(&mut self, shared: &Shared, body: &EventBody) {
        match body {
            EventBody::PermissionRequest {
                request_id,
                tool_name,
                summary,
                reason,
                suggestions,
                questions,
                expires_at_ms,
            } => {
                let asked = Asked {
                    job_id: &self.job_id,
                    user: self.user,
                    request_id,
                    tool_name,
                    summary,
                    reason: reason.as_deref(),
                    suggestions: !suggestions.is_empty(),
                    questions: questions.as_deref(),
                    expires_at_ms: *expires_at_ms,
                };
                if let Some(qs) = questions {
                    shared.prompts.note_questions(request_id, qs.clone());
                }
                self.post(shared, request_id, render(&asked)).await;
            }
            EventBody::PermissionResolved {
                request_id,
                behavior,
                by,
                ..
            } => {
                let who = shared.prompts.answerer(request_id, *behavior);
                let line = settled_line(*behavior, *by, who.as_ref());
                self.settle(shared, request_id, &line).await;
                shared.prompts.forget(request_id);
            }
            _ => {}
        }
    }

    /// Posts the prompt, unless a message of it is already there (the
    /// events came again to a restarted relay).
    async fn post(&mut self, shared: &Shared, request_id: &str, r: Rendered) {
        let found = self.find(shared, request_id).await;
        let (message, settled) = match found {
            Some(found) => found,
            None => {
                let comps = components(&r.rows);
                match shared
                    .rest
                    .create_quiet(self.channel, &r.content, &comps)
                    .await
                {
                    Ok(id) => (id, false),
                    Err(e) => {
                        tracing::warn!(job_id = %self.job_id, error = %e, "could not post a permission prompt");
                        return;
                    }
                }
            }
        };
        let shown = Shown {
            message,
            head: r.head,
            rows: r.rows,
            settled,
        };
        self.open.insert(request_id.to_string(), shown);
    }

    /// The message of `request_id` among the first 100 after the reply,
    /// and whether it is settled (its components disabled).
    async fn find(&self, shared: &Shared, request_id: &str) -> Option<(MessageId, bool)> {
        let list = match shared.rest.messages_after(self.channel, self.reply).await {
            Ok(list) => list,
            Err(e) => {
                tracing::debug!(error = %e, "could not look for a prompt message");
                return None;
            }
        };
        list.iter().find_map(|m| {
            let v = serde_json::to_value(&m.components).ok()?;
            let ours = ids_in(&v)
                .iter()
                .filter_map(|id| Click::parse(id))
                .any(|c| c.request_id == request_id && c.job_id == self.job_id);
            let items: Vec<&Value> = v
                .as_array()?
                .iter()
                .flat_map(|row| row["components"].as_array().into_iter().flatten())
                .collect();
            let settled = !items.is_empty() && items.iter().all(|c| c["disabled"] == true);
            ours.then_some((m.id, settled))
        })
    }

    /// Shows how a prompt was settled: buttons disabled, the line below.
    async fn settle(&mut self, shared: &Shared, request_id: &str, line: &str) {
        let Some(s) = self.open.remove(request_id) else {
            return;
        };
        if s.settled {
            return;
        }
        let content = cut(&format!("{}\n{line}", s.head), render::MESSAGE_LIMIT);
        let comps = components(&disabled(&s.rows));
        if let Err(e) = shared
            .rest
            .edit_quiet(self.channel, s.message, &content, &comps)
            .await
        {
            tracing::warn!(job_id = %self.job_id, error = %e, "could not update a permission prompt");
        }
    }

    /// Prompts still shown as open are closed, saying `line`: the job
    /// ended, or its attempt was retried (which asks again, anew).
    pub async fn close(&mut self, shared: &Shared, line: &str) {
        let ids: Vec<String> = self.open.keys().cloned().collect();
        for id in ids {
            self.settle(shared, &id, line).await;
            shared.prompts.forget(&id);
        }
    }
}

/// What a prompt left open says when its job ends.
pub const ENDED: &str = "-# No longer open: the answer ended.";
/// What a prompt left open says when its attempt is retried.
pub const RETRIED: &str = "-# No longer open: the answer was retried.";

/// Every `custom_id` in Discord component JSON.
fn ids_in(v: &Value) -> Vec<String> {
    let mut out = Vec::new();
    match v {
        Value::Array(a) => a.iter().for_each(|x| out.extend(ids_in(x))),
        Value::Object(o) => {
            if let Some(id) = o.get("custom_id").and_then(Value::as_str) {
                out.push(id.to_string());
            }
            if let Some(c) = o.get("components") {
                out.extend(ids_in(c));
            }
        }
        _ => {}
    }
    out
}

/// May this member answer a prompt of `click.user`'s conversation?
pub fn may_answer(prompt_roles: &[u64], click: &Click, clicker: u64, roles: &[u64]) -> bool {
    clicker == click.user || roles.iter().any(|r| prompt_roles.contains(r))
}

/// Why a click was not taken: what the clicker alone is shown.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("Only <@{0}> (or a member with a prompt role) can answer this prompt.")]
    NotYours(u64),
    #[error("This question is not loaded yet (the relay restarted?); try again in a moment.")]
    NotLoaded,
    #[error("That option is not in the question.")]
    NoSuchOption,
    #[error("Answer every question first.")]
    Unanswered,
}

/// The answer a click gives, and the words for who gave it.
fn answer_of(
    shared: &Shared,
    click: &Click,
    values: &[String],
    message: &Value,
) -> Result<(PermissionResponseV1, String), Refusal> {
    let mut r = PermissionResponseV1 {
        job_id: click.job_id.clone(),
        request_id: click.request_id.clone(),
        behavior: PermissionBehavior::Allow,
        message: None,
        updated_input: None,
        allow_for_session: false,
        answers: None,
    };
    let said = match click.choice {
        Choice::Allow => "Allowed".to_string(),
        Choice::AllowSession => {
            r.allow_for_session = true;
            "Allowed for this session".to_string()
        }
        Choice::Deny => {
            r.behavior = PermissionBehavior::Deny;
            r.message = Some("denied by the user in Discord".into());
            "Denied".to_string()
        }
        Choice::Option { question, option } => {
            let qs = shared
                .prompts
                .questions(&click.request_id)
                .ok_or(Refusal::NotLoaded)?;
            let q = qs.get(question as usize).ok_or(Refusal::NoSuchOption)?;
            let o = q
                .options
                .get(option as usize)
                .ok_or(Refusal::NoSuchOption)?;
            r.answers = Some(BTreeMap::from([(q.question.clone(), o.label.clone())]));
            format!("Answered “{}”", escape(&cut(&o.label, 80)))
        }
        Choice::Menu { question } => {
            let qs = shared
                .prompts
                .questions(&click.request_id)
                .ok_or(Refusal::NotLoaded)?;
            let q = qs.get(question as usize).ok_or(Refusal::NoSuchOption)?;
            let labels: Vec<&str> = values
                .iter()
                .map(|v| {
                    let i: usize = v.parse().map_err(|_| Refusal::NoSuchOption)?;
                    q.options
                        .get(i)
                        .map(|o| o.label.as_str())
                        .ok_or(Refusal::NoSuchOption)
                })
                .collect::<Result<_, _>>()?;
            if labels.is_empty() {
                return Err(Refusal::NoSuchOption);
            }
            let joined = labels.join(", ");
            r.answers = Some(BTreeMap::from([(q.question.clone(), joined.clone())]));
            format!("Answered “{}”", escape(&cut(&joined, 200)))
        }
        Choice::Submit => {
            let qs = shared
                .prompts
                .questions(&click.request_id)
                .ok_or(Refusal::NotLoaded)?;
            let picks = picks_in(message);
            let mut answers = BTreeMap::new();
            for (i, q) in qs.iter().enumerate() {
                let chosen = picks.get(&i).filter(|p| !p.is_empty());
                let labels: Vec<&str> = chosen
                    .ok_or(Refusal::Unanswered)?
                    .iter()
                    .map(|&o| q.options.get(o).map(|o| o.label.as_str()))
                    .collect::<Option<_>>()
                    .ok_or(Refusal::NoSuchOption)?;
                answers.insert(q.question.clone(), labels.join(", "));
            }
            let said = answers.values().cloned().collect::<Vec<_>>().join("; ");
            r.answers = Some(answers);
            format!("Answered “{}”", escape(&cut(&said, 200)))
        }
        // A pick is kept in the message (`keep_pick`), not sent.
        Choice::Pick { .. } => return Err(Refusal::NoSuchOption),
    };
    Ok((r, said))
}

fn ephemeral(content: &str) -> InteractionResponseData {
    InteractionResponseData {
        content: Some(content.to_string()),
        flags: Some(MessageFlags::EPHEMERAL),
        allowed_mentions: Some(AllowedMentions::default()),
        ..Default::default()
    }
}

/// The picks a message's menus keep (the options marked `default`), by
/// question.
fn picks_in(rows: &Value) -> BTreeMap<usize, Vec<usize>> {
    let mut out = BTreeMap::new();
    for row in rows.as_array().into_iter().flatten() {
        for c in row["components"].as_array().into_iter().flatten() {
            let id = c["custom_id"].as_str().and_then(Click::parse);
            let Some(Choice::Pick { question }) = id.map(|c| c.choice) else {
                continue;
            };
            let chosen = c["options"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|o| o["default"] == true)
                .filter_map(|o| o["value"].as_str()?.parse().ok())
                .collect();
            out.insert(question as usize, chosen);
        }
    }
    out
}

/// `rows` with question `question`'s menu showing `values` as picked.
pub fn with_pick(rows: &Value, question: u8, values: &[String]) -> Value {
    let mut rows = rows.clone();
    for row in rows.as_array_mut().into_iter().flatten() {
        for c in row["components"].as_array_mut().into_iter().flatten() {
            let id = c["custom_id"].as_str().and_then(Click::parse);
            if id.map(|c| c.choice) != Some(Choice::Pick { question }) {
                continue;
            }
            for o in c["options"].as_array_mut().into_iter().flatten() {
                let picked = o["value"]
                    .as_str()
                    .is_some_and(|v| values.iter().any(|x| x == v));
                o["default"] = json!(picked);
            }
        }
    }
    rows
}

/// A pick in a menu of a prompt of several questions: the message keeps
/// it (an UPDATE_MESSAGE with the option marked), nothing is sent yet.
async fn keep_pick(
    shared: &Shared,
    me: Me,
    i: &Interaction,
    rows: &Value,
    question: u8,
    values: &[String],
) {
    let rows = with_pick(rows, question, values);
    let data = InteractionResponseData {
        components: Some(components(rows.as_array().map_or(&[][..], Vec::as_slice))),
        ..Default::default()
    };
    let kind = InteractionResponseType::UpdateMessage;
    if let Err(e) = shared
        .rest
        .respond(me.app, i.id, &i.token, kind, Some(data))
        .await
    {
        tracing::warn!(error = %e, "could not keep a pick in a prompt");
    }
}

/// A click on a prompt's button or menu (`MESSAGE_COMPONENT`).
pub async fn on_component(shared: &Arc<Shared>, me: Me, i: Interaction) {
    if i.kind != InteractionType::MessageComponent {
        return;
    }
    let Some(InteractionData::MessageComponent(data)) = &i.data else {
        return;
    };
    let Some(click) = Click::parse(&data.custom_id) else {
        return;
    };
    let clicker = i.author_id().map(Id::get).unwrap_or(0);
    let roles: Vec<u64> = i
        .member
        .as_ref()
        .map(|m| m.roles.iter().map(|r| r.get()).collect())
        .unwrap_or_default();
    let rows = i
        .message
        .as_ref()
        .and_then(|m| serde_json::to_value(&m.components).ok())
        .unwrap_or(Value::Null);
    let allowed = may_answer(&shared.settings.prompt_roles, &click, clicker, &roles);
    if let (true, Choice::Pick { question }) = (allowed, click.choice) {
        return keep_pick(shared, me, &i, &rows, question, &data.values).await;
    }
    let answer = if allowed {
        answer_of(shared, &click, &data.values, &rows)
    } else {
        Err(Refusal::NotYours(click.user))
    };
    let (response, said) = match answer {
        Ok(a) => a,
        Err(refusal) => {
            let kind = InteractionResponseType::ChannelMessageWithSource;
            let data = Some(ephemeral(&refusal.to_string()));
            if let Err(e) = shared
                .rest
                .respond(me.app, i.id, &i.token, kind, data)
                .await
            {
                tracing::warn!(error = %e, "could not refuse a click");
            }
            return;
        }
    };
    // Acknowledged at once (Discord wants it within 3 s); the message is
    // updated by the job's `permission_resolved`.
    let kind = InteractionResponseType::DeferredUpdateMessage;
    if let Err(e) = shared
        .rest
        .respond(me.app, i.id, &i.token, kind, None)
        .await
    {
        tracing::warn!(error = %e, "could not acknowledge a click; not answering the prompt");
        return;
    }
    let who = Answerer {
        user: clicker,
        behavior: response.behavior,
        said,
    };
    shared.prompts.note_answer(&click.request_id, who);
    let outcome = publish(shared, response).await;
    let Some(words) = refused_in_words(outcome) else {
        return;
    };
    shared.prompts.drop_answer(&click.request_id, clicker);
    if let Err(e) = shared
        .rest
        .followup_ephemeral(me.app, &i.token, &words)
        .await
    {
        tracing::warn!(error = %e, "could not tell a user their click was refused");
    }
}

/// Publishes the answer as the relay's AMQP user (what the job's
/// `prompt_answerers` names) and waits, bounded, for the worker's word.
async fn publish(
    shared: &Shared,
    response: PermissionResponseV1,
) -> Result<Option<ControlResultV1>, ClientError> {
    let mut client = Client::connect(&shared.amqp, "claude-worker discord prompt").await?;
    client.set_user_id(amqp_user(&shared.amqp));
    let sent = client
        .publish_control(ControlBody::PermissionResponse(response))
        .await;
    let result = match sent {
        Ok(id) => client.wait_control_result(&id, ANSWER_WAIT).await,
        Err(e) => Err(e),
    };
    client.close().await;
    result
}

/// What to tell the clicker when the worker did not take the answer;
/// `None` when it did.
fn refused_in_words(outcome: Result<Option<ControlResultV1>, ClientError>) -> Option<String> {
    match outcome {
        Ok(Some(r)) if r.ok => None,
        Ok(Some(r)) => Some(match r.outcome {
            ControlOutcome::AlreadyFinished => {
                "This prompt was already answered, expired or cancelled.".to_string()
            }
            ControlOutcome::Refused if r.message.contains("already settled") => {
                "This prompt was already answered, expired or cancelled.".to_string()
            }
            ControlOutcome::Unknown => "This prompt is no longer open.".to_string(),
            _ => format!("The worker refused this answer: {}", r.message),
        }),
        Ok(None) => Some("⚠️ No worker answered; try again.".into()),
        Err(e) => {
            tracing::warn!(error = %e, "could not publish a prompt answer");
            Some("⚠️ No worker is reachable right now; try again.".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::PromptOption;

    fn asked<'a>(questions: Option<&'a [PromptQuestion]>) -> Asked<'a> {
        Asked {
            job_id: "discord-1234567890123456789",
            user: 12345678901234567890,
            request_id: "0b8f7c1e-6a43-4a43-9a1e-2f5d0c9b7a11",
            tool_name: "Bash",
            summary: "rm -rf ``` <@1> @everyone",
            reason: Some("needs **approval**"),
            suggestions: true,
            questions,
            expires_at_ms: 1_700_000_000_500,
        }
    }

    #[test]
    fn custom_ids_round_trip_within_discords_limit() {
        for choice in [
            Choice::Allow,
            Choice::AllowSession,
            Choice::Deny,
            Choice::Option {
                question: 3,
                option: 19,
            },
            Choice::Menu { question: 0 },
            Choice::Pick { question: 3 },
            Choice::Submit,
        ] {
            let c = Click {
                choice,
                user: u64::MAX,
                request_id: "0b8f7c1e-6a43-4a43-9a1e-2f5d0c9b7a11".into(),
                job_id: "discord-18446744073709551615".into(),
            };
            let id = c.custom_id().expect("fits");
            assert!(id.len() <= CUSTOM_ID_MAX, "{id}");
            assert_eq!(Click::parse(&id), Some(c));
        }
        let odd = Click {
            choice: Choice::Deny,
            user: 1,
            request_id: "not-a-uuid".into(),
            job_id: "a:b:c".into(),
        };
        assert_eq!(Click::parse(&odd.custom_id().unwrap()), Some(odd.clone()));
        let long = Click {
            job_id: "j".repeat(90),
            ..odd
        };
        assert_eq!(long.custom_id(), None, "too long for Discord: no button");
        for bad in [
            "",
            "cwp",
            "xyz:a:1:=r:j",
            "cwp:z:1:=r:j",
            "cwp:a:x:=r:j",
            "cwp:a:1:nothex:j",
            "cwp:a:1:=r:",
        ] {
            assert_eq!(Click::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_tool_prompt_shows_what_and_offers_three_buttons_that_build() {
        let r = render(&asked(None));
        assert!(
            r.content.starts_with("🔐 **Claude asks to use Bash**"),
            "{}",
            r.content
        );
        assert!(
            r.content
                .contains("```\nrm -rf `\u{200b}`\u{200b}` <@1> @everyone\n```"),
            "{}",
            r.content
        );
        assert!(
            r.content.contains("Reason: needs \\*\\*approval\\*\\*"),
            "{}",
            r.content
        );
        assert!(r.content.contains("<t:1700000000:R>"), "{}", r.content);
        let labels: Vec<&str> = r.rows[0]["components"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["label"].as_str().unwrap())
            .collect();
        assert_eq!(labels, ["Allow", "Allow for this session", "Deny"]);
        assert_eq!(components(&r.rows).len(), 1, "twilight takes them");
        assert_eq!(components(&disabled(&r.rows)).len(), 1);
        let mut none = asked(None);
        none.suggestions = false;
        assert_eq!(
            render(&none).rows[0]["components"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn a_question_gets_a_button_per_option_or_a_menu() {
        let mut q = PromptQuestion {
            question: "Which colour?".into(),
            header: Some("Colour".into()),
            options: vec![
                PromptOption {
                    label: "Red".into(),
                    description: Some("warm".into()),
                },
                PromptOption {
                    label: "Blue".into(),
                    description: None,
                },
            ],
            multi_select: false,
        };
        let qs = [q.clone()];
        let r = render(&asked(Some(&qs)));
        assert!(
            r.content
                .contains("**Colour** Which colour?\n1. Red — warm\n2. Blue"),
            "{}",
            r.content
        );
        let first = &r.rows[0]["components"];
        assert_eq!(first[1]["label"], "Blue");
        let id = Click::parse(first[1]["custom_id"].as_str().unwrap()).unwrap();
        assert_eq!(
            id.choice,
            Choice::Option {
                question: 0,
                option: 1
            }
        );
        assert_eq!(r.rows[1]["components"][0]["label"], "Don't answer");
        assert_eq!(components(&r.rows).len(), 2);
        q.multi_select = true;
        let qs = [q];
        let r = render(&asked(Some(&qs)));
        assert_eq!(r.rows[0]["components"][0]["type"], 3);
        assert_eq!(r.rows[0]["components"][0]["max_values"], 2);
        assert_eq!(components(&r.rows).len(), 2);
    }

    #[test]
    fn several_questions_keep_their_picks_in_the_message() {
        let q = |name: &str| PromptQuestion {
            question: format!("{name}?"),
            header: None,
            options: vec![
                PromptOption {
                    label: "A".into(),
                    description: None,
                },
                PromptOption {
                    label: "B".into(),
                    description: None,
                },
            ],
            multi_select: false,
        };
        let qs = [q("one"), q("two")];
        let r = render(&asked(Some(&qs)));
        assert_eq!(r.rows.len(), 3, "a menu each, then Submit and Don't answer");
        assert_eq!(r.rows[2]["components"][0]["label"], "Submit");
        assert_eq!(components(&r.rows).len(), 3, "twilight takes them");
        let rows = Value::Array(r.rows);
        assert!(picks_in(&rows).values().all(Vec::is_empty));
        let rows = with_pick(&rows, 1, &["1".to_string()]);
        let rows = with_pick(&rows, 0, &["0".to_string()]);
        let rows = with_pick(&rows, 1, &["0".to_string()]);
        assert_eq!(
            picks_in(&rows),
            BTreeMap::from([(0, vec![0]), (1, vec![0])])
        );
        let five: Vec<PromptQuestion> = (0..5).map(|i| q(&i.to_string())).collect();
        let r = render(&asked(Some(&five)));
        assert_eq!(r.rows.len(), 1, "only Don't answer");
        assert!(
            r.content.contains("More than four questions"),
            "{}",
            r.content
        );
    }

    #[test]
    fn settled_lines_say_who_or_what() {
        use PermissionBehavior::*;
        let who = Answerer {
            user: 7,
            behavior: Allow,
            said: "Allowed".into(),
        };
        assert_eq!(
            settled_line(Allow, ResolvedBy::Person, Some(&who)),
            "✅ Allowed by <@7>"
        );
        assert_eq!(
            settled_line(Deny, ResolvedBy::Person, Some(&who)),
            "❌ Denied"
        );
        assert_eq!(
            settled_line(Deny, ResolvedBy::Timeout, None),
            "⌛ Expired — denied"
        );
        assert_eq!(settled_line(Deny, ResolvedBy::Cancel, None), "🚫 Cancelled");
    }

    #[test]
    fn only_the_user_or_a_prompt_role_may_answer() {
        let c = Click {
            choice: Choice::Allow,
            user: 5,
            request_id: "r".into(),
            job_id: "j".into(),
        };
        assert!(may_answer(&[], &c, 5, &[]));
        assert!(!may_answer(&[], &c, 6, &[9]));
        assert!(may_answer(&[9], &c, 6, &[1, 9]));
        assert!(!may_answer(&[9], &c, 6, &[1]));
    }
}
