//! Wire protocol v1: the JSON messages producers publish and the events
//! workers publish. These are the only types that cross the broker; the
//! database has its own rows (`store`) and the driver its own messages
//! (`claude`). docs/protocol.md and docs/schema/ describe the same shapes.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The only protocol version this worker speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest prompt accepted, in bytes. Larger bodies are invalid input, not
/// something to hand to the CLI.
pub const MAX_PROMPT_BYTES: usize = 1_000_000;

/// Largest `metadata`, in bytes of its JSON: it is copied onto every event
/// of the job, so 2 MB of metadata on a 200-event answer would be 400 MB of
/// reply traffic.
pub const MAX_METADATA_BYTES: usize = 16 * 1024;

/// Deepest nesting of objects and arrays in a job or control body (the
/// body itself is level 1). Only `metadata` can nest freely.
pub const MAX_JSON_DEPTH: usize = 32;

/// A prompt job, version 1, as published by a producer.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JobV1 {
    pub v: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    pub session_key: String,
    pub prompt: String,
    #[serde(default)]
    pub session: SessionSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    #[serde(default)]
    pub options: JobOptions,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// Images sent with the prompt (at most [`MAX_ATTACHMENTS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attachments: Option<Vec<AttachmentV1>>,
    /// Whose budget the job spends (e.g. `discord:user:1234`), for the
    /// profile's per-identity budget. Set by the producer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// AMQP users (the broker-verified `user_id` property of a
    /// `permission_response`) who may answer the job's permission prompts.
    /// Unset: the user the job was published as, if it carried one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_answerers: Option<Vec<String>>,
}

/// At most this many attachments per job.
pub const MAX_ATTACHMENTS: usize = 4;

/// At most this many characters of base64 per attachment (1.5 MB of
/// image): a job stays well under a broker's message size limit.
pub const MAX_ATTACHMENT_BASE64: usize = 2_000_000;

/// A file sent with the prompt; v1 knows images, which reach Claude as
/// image content blocks.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AttachmentV1 {
    #[serde(rename = "type")]
    pub kind: AttachmentKind,
    pub media_type: ImageMediaType,
    /// The file, standard base64 with padding.
    pub data: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachmentKind {
    Image,
}

/// The image types the Messages API takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum ImageMediaType {
    #[serde(rename = "image/png")]
    Png,
    #[serde(rename = "image/jpeg")]
    Jpeg,
    #[serde(rename = "image/gif")]
    Gif,
    #[serde(rename = "image/webp")]
    Webp,
}

impl ImageMediaType {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageMediaType::Png => "image/png",
            ImageMediaType::Jpeg => "image/jpeg",
            ImageMediaType::Gif => "image/gif",
            ImageMediaType::Webp => "image/webp",
        }
    }

    /// The type of a MIME string (`image/png; charset=…` included).
    pub fn parse(mime: &str) -> Option<ImageMediaType> {
        let base = mime
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match base.as_str() {
            "image/png" => Some(ImageMediaType::Png),
            "image/jpeg" | "image/jpg" => Some(ImageMediaType::Jpeg),
            "image/gif" => Some(ImageMediaType::Gif),
            "image/webp" => Some(ImageMediaType::Webp),
            _ => None,
        }
    }
}

/// Whether `s` is standard base64 with padding (what the Messages API
/// takes): the alphabet, a length that is a multiple of 4, `=` only at the
/// end. The same rule as the schema's pattern.
pub fn is_padded_base64(s: &str) -> bool {
    let b = s.as_bytes();
    if !b.len().is_multiple_of(4) {
        return false;
    }
    let pad = b.iter().rev().take_while(|&&c| c == b'=').count();
    pad <= 2
        && b[..b.len() - pad]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
}

fn validate_attachments(list: &[AttachmentV1]) -> Result<(), DecodeError> {
    if list.len() > MAX_ATTACHMENTS {
        return Err(DecodeError(format!(
            "`attachments` has {} items; the limit is {MAX_ATTACHMENTS}",
            list.len()
        )));
    }
    for (i, a) in list.iter().enumerate() {
        if a.data.is_empty() || a.data.len() > MAX_ATTACHMENT_BASE64 {
            return Err(DecodeError(format!(
                "`attachments[{i}].data` is {} characters; it must be 1-{MAX_ATTACHMENT_BASE64} (base64)",
                a.data.len()
            )));
        }
        if !is_padded_base64(&a.data) {
            return Err(DecodeError(format!(
                "`attachments[{i}].data` is not standard base64 with padding"
            )));
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SessionSpec {
    #[serde(default)]
    pub mode: SessionMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claude_session_id: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionMode {
    /// Resume the key's session if there is one, else start one.
    #[default]
    Continue,
    /// Start fresh for this key (a chat "reset").
    New,
    /// Resume an explicit Claude session id.
    Resume,
    /// Resume with `--fork-session`; the key then points at the fork.
    Fork,
}

impl SessionMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionMode::Continue => "continue",
            SessionMode::New => "new",
            SessionMode::Resume => "resume",
            SessionMode::Fork => "fork",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JobOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_turns: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permission_mode: Option<PermissionMode>,
    /// What to do if the session already has a running turn when this job
    /// arrives; default: the profile's `on_busy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_busy: Option<OnBusy>,
    /// Per-turn cost cap in USD (the CLI's `--max-budget-usd`); at most
    /// the profile's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_budget_usd: Option<f64>,
    /// Compact the session's context before this turn (a `compacted`
    /// event, trigger `requested`), whatever its context use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compact: Option<bool>,
}

/// Double-texting policy: a job that arrives while its session is busy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnBusy {
    /// Run after the running turn, in order.
    #[default]
    Enqueue,
    /// Interrupt the running turn (it ends `cancelled`), then run this job.
    Interrupt,
    /// Fail this job at once with error `busy`.
    Reject,
}

/// Claude Code permission modes, ordered from least to most permissive so a
/// profile's ceiling is a simple comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
pub enum PermissionMode {
    #[serde(rename = "plan")]
    Plan,
    #[serde(rename = "dontAsk")]
    DontAsk,
    #[serde(rename = "default")]
    Default,
    #[serde(rename = "acceptEdits")]
    AcceptEdits,
    #[serde(rename = "auto")]
    Auto,
    #[serde(rename = "bypassPermissions")]
    BypassPermissions,
}

impl PermissionMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PermissionMode::Plan => "plan",
            PermissionMode::DontAsk => "dontAsk",
            PermissionMode::Default => "default",
            PermissionMode::AcceptEdits => "acceptEdits",
            PermissionMode::Auto => "auto",
            PermissionMode::BypassPermissions => "bypassPermissions",
        }
    }
}

impl std::fmt::Display for PermissionMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a job body could not be decoded. The message is shown to the
/// producer (dead-letter header and `failed` event), so it says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

/// Decodes a job body: UTF-8, strict JSON (no duplicate keys, bounded
/// depth), an object with a supported `v`, then the v1 shape and limits.
pub fn decode_job(body: &[u8]) -> Result<JobV1, DecodeError> {
    let text = std::str::from_utf8(body)
        .map_err(|e| DecodeError(format!("body is not valid UTF-8: {e}")))?;
    let mut value =
        parse_strict(text).map_err(|e| DecodeError(format!("body is not valid JSON: {e}")))?;
    let Value::Object(obj) = &mut value else {
        return Err(DecodeError("body must be a JSON object".into()));
    };
    check_version(obj)?;
    check_shapes(obj)?;
    let job: JobV1 =
        serde_json::from_value(value).map_err(|e| DecodeError(format!("invalid job: {e}")))?;
    if job.session_key.trim().is_empty() {
        return Err(DecodeError("`session_key` must not be empty".into()));
    }
    if job.session_key.len() > 255 {
        return Err(DecodeError("`session_key` is longer than 255 bytes".into()));
    }
    if job.prompt.trim().is_empty() {
        return Err(DecodeError("`prompt` must not be empty".into()));
    }
    if job.prompt.len() > MAX_PROMPT_BYTES {
        return Err(DecodeError(format!(
            "`prompt` is {} bytes; the limit is {MAX_PROMPT_BYTES}",
            job.prompt.len()
        )));
    }
    if let Some(id) = &job.job_id {
        validate_job_id(id)?;
    }
    // The profile-independent option rules, here so the decoder and the
    // JSON Schema refuse the same bodies (the profile narrows further).
    if job.options.max_turns == Some(0) {
        return Err(DecodeError("`options.max_turns` must be at least 1".into()));
    }
    if let Some(m) = &job.options.model {
        if m.is_empty() || m.len() > 200 || m.starts_with('-') {
            return Err(DecodeError(format!(
                "`options.model` {m:?} is not a model name (1-200 bytes, not starting with `-`)"
            )));
        }
    }
    if let Some(r) = &job.reply_to {
        validate_reply_to(r)?;
    }
    if let Some(b) = job.options.max_budget_usd {
        if b <= 0.0 || !b.is_finite() {
            return Err(DecodeError(format!(
                "`options.max_budget_usd` must be a number above 0 (got {b})"
            )));
        }
    }
    if let Some(id) = &job.identity {
        if id.trim().is_empty() || id.len() > 255 {
            return Err(DecodeError(
                "`identity` must be 1-255 bytes and not blank".into(),
            ));
        }
    }
    if let Some(list) = &job.prompt_answerers {
        if list.len() > 32 || list.iter().any(|u| u.trim().is_empty() || u.len() > 255) {
            return Err(DecodeError(
                "`prompt_answerers` holds at most 32 AMQP user ids of 1-255 bytes, not blank"
                    .into(),
            ));
        }
    }
    if let Some(m) = &job.metadata {
        if !m.is_object() {
            return Err(DecodeError("`metadata` must be a JSON object".into()));
        }
        let size = serde_json::to_vec(m).map(|v| v.len()).unwrap_or(usize::MAX);
        if size > MAX_METADATA_BYTES {
            return Err(DecodeError(format!(
                "`metadata` is {size} bytes of JSON; the limit is {MAX_METADATA_BYTES} (it is copied onto every event)"
            )));
        }
    }
    if let Some(list) = &job.attachments {
        validate_attachments(list)?;
    }
    match (job.session.mode, &job.session.claude_session_id) {
        (SessionMode::Resume, None) => {
            return Err(DecodeError(
                "session mode `resume` needs `session.claude_session_id`".into(),
            ))
        }
        (SessionMode::New, Some(_)) => {
            return Err(DecodeError(
                "session mode `new` does not take `session.claude_session_id`".into(),
            ))
        }
        (_, Some(id)) => validate_claude_session_id(id)?,
        _ => {}
    }
    Ok(job)
}

/// What serde alone would let through: a struct read from an array
/// (`"options": ["sonnet"]` as the model), so only objects are objects
/// here; and `3.0` as an integer, which JSON Schema counts as one too.
fn check_shapes(obj: &mut serde_json::Map<String, Value>) -> Result<(), DecodeError> {
    for key in ["session", "options"] {
        if obj.get(key).is_some_and(|v| !v.is_object()) {
            return Err(DecodeError(format!("`{key}` must be a JSON object")));
        }
    }
    if let Some(Value::Array(items)) = obj.get("attachments") {
        if items.iter().any(|v| !v.is_object()) {
            return Err(DecodeError("`attachments` must hold JSON objects".into()));
        }
    }
    if let Some(Value::Object(options)) = obj.get_mut("options") {
        integral_to_int(options, "max_turns");
    }
    Ok(())
}

/// `v` must be the number 1 (`1.0` too: JSON Schema cannot tell them
/// apart, so neither does the decoder). Normalised to the integer.
fn check_version(obj: &mut serde_json::Map<String, Value>) -> Result<(), DecodeError> {
    match obj.get("v") {
        None => Err(DecodeError(
            "missing field `v` (protocol version; use 1)".into(),
        )),
        Some(Value::Number(n)) if n.as_f64() == Some(PROTOCOL_VERSION as f64) => {
            obj.insert("v".into(), Value::from(PROTOCOL_VERSION));
            Ok(())
        }
        Some(other) => Err(DecodeError(format!(
            "unsupported protocol version v={other}; this worker speaks v={PROTOCOL_VERSION}"
        ))),
    }
}

/// Replaces a float with no fractional part (`3.0`) by the integer.
fn integral_to_int(obj: &mut serde_json::Map<String, Value>, key: &str) {
    if let Some(Value::Number(n)) = obj.get(key) {
        if let Some(f) = n
            .as_f64()
            .filter(|f| n.is_f64() && f.fract() == 0.0 && *f >= 0.0 && *f <= u32::MAX as f64)
        {
            obj.insert(key.into(), Value::from(f as u64));
        }
    }
}

/// Parses JSON strictly: a key repeated in one object is an error (a
/// typo'd duplicate would otherwise silently win), and so is nesting deeper
/// than [`MAX_JSON_DEPTH`]. Lone UTF-16 surrogates (`"\ud800"`) are
/// rejected by the parser: strings must be valid Unicode.
pub fn parse_strict(text: &str) -> Result<Value, serde_json::Error> {
    use serde::de::DeserializeSeed;
    let mut de = serde_json::Deserializer::from_str(text);
    let value = Strict { depth: 0 }.deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

struct Strict {
    depth: usize,
}

impl Strict {
    fn enter<E: serde::de::Error>(&self) -> Result<Strict, E> {
        if self.depth >= MAX_JSON_DEPTH {
            return Err(E::custom(format_args!(
                "nested deeper than {MAX_JSON_DEPTH} levels"
            )));
        }
        Ok(Strict {
            depth: self.depth + 1,
        })
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Strict {
    type Value = Value;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Strict {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("a number out of range"))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let inner = self.enter()?;
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(Strict { depth: inner.depth })? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let inner = self.enter()?;
        let mut out = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(serde::de::Error::custom(format_args!(
                    "duplicate key `{key}`"
                )));
            }
            let v = map.next_value_seed(Strict { depth: inner.depth })?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

/// Job ids become database keys and AMQP correlation ids: keep them short
/// and printable. A UUID is recommended.
pub fn validate_job_id(id: &str) -> Result<(), DecodeError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(DecodeError(format!(
            "`job_id` {id:?} must be 1-128 characters of [A-Za-z0-9-_.:] (a UUID is recommended)"
        )))
    }
}

/// `reply_to` becomes an AMQP routing key (a short string).
pub fn validate_reply_to(r: &str) -> Result<(), DecodeError> {
    if r.is_empty() || r.len() > 255 {
        return Err(DecodeError("`reply_to` must be 1-255 bytes".into()));
    }
    Ok(())
}

/// Claude session ids are UUIDs; anything else would only fail later in the
/// CLI (or worse, be read as a flag).
pub fn validate_claude_session_id(id: &str) -> Result<(), DecodeError> {
    uuid::Uuid::parse_str(id)
        .map(|_| ())
        .map_err(|_| DecodeError(format!("`session.claude_session_id` {id:?} is not a UUID")))
}

/// A control message, version 1, published to the control exchange (every
/// worker receives it).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ControlV1 {
    pub v: u32,
    #[serde(flatten)]
    pub body: ControlBody,
    /// Where to send the answer (a `control_result` event); optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ControlBody {
    /// Cancel one job, or every running and queued job of a session.
    Cancel {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        job_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session_key: Option<String>,
        /// Shown in the `cancelled` event; default "cancelled by request".
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// Change the permission mode of a session's running turn and later turns.
    SetPermissionMode {
        session_key: String,
        mode: PermissionMode,
    },
    /// Report a session's stored state (answered with `status` set).
    SessionStatus { session_key: String },
    /// The session's next job (accepted after this) starts a new Claude
    /// session, even with `session.mode` `continue`.
    ResetSession { session_key: String },
    /// A person's answer to a `permission_request` event.
    PermissionResponse(PermissionResponseV1),
}

/// A person's answer to a `permission_request` (allow or deny one tool
/// call, or answer Claude's question).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct PermissionResponseV1 {
    pub job_id: String,
    /// The `request_id` of the `permission_request` event.
    pub request_id: String,
    pub behavior: PermissionBehavior,
    /// Shown to Claude with a deny (default: "denied by a person").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// An edited tool input to run instead (allow only); default: the
    /// input as asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_input: Option<Value>,
    /// Allow this and like calls for the rest of the Claude session (a
    /// session-scoped rule, from the CLI's suggestions).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_for_session: bool,
    /// For `AskUserQuestion`: question text → the chosen option's label
    /// (several labels comma-separated, or free text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answers: Option<std::collections::BTreeMap<String, String>>,
}

/// Largest `updated_input` of a `permission_response`, in bytes of JSON.
pub const MAX_UPDATED_INPUT_BYTES: usize = 256 * 1024;

impl PermissionResponseV1 {
    fn validate(&self) -> Result<(), DecodeError> {
        validate_job_id(&self.job_id)?;
        if self.request_id.is_empty() || self.request_id.len() > 128 {
            return Err(DecodeError("`request_id` must be 1-128 bytes".into()));
        }
        if self.message.as_ref().is_some_and(|m| m.len() > 4000) {
            return Err(DecodeError("`message` is longer than 4000 bytes".into()));
        }
        if let Some(input) = &self.updated_input {
            if !input.is_object() {
                return Err(DecodeError("`updated_input` must be a JSON object".into()));
            }
            let size = serde_json::to_vec(input).map_or(usize::MAX, |v| v.len());
            if size > MAX_UPDATED_INPUT_BYTES {
                return Err(DecodeError(format!(
                    "`updated_input` is {size} bytes of JSON; the limit is {MAX_UPDATED_INPUT_BYTES}"
                )));
            }
        }
        if let Some(a) = &self.answers {
            if a.len() > 16 || a.iter().any(|(q, v)| q.len() > 4000 || v.len() > 4000) {
                return Err(DecodeError(
                    "`answers` holds at most 16 entries of at most 4000 bytes each".into(),
                ));
            }
        }
        Ok(())
    }
}

/// Allow or deny a tool call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PermissionBehavior {
    Allow,
    Deny,
}

impl PermissionBehavior {
    pub fn as_str(self) -> &'static str {
        match self {
            PermissionBehavior::Allow => "allow",
            PermissionBehavior::Deny => "deny",
        }
    }
}

/// Who or what settled a permission prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ResolvedBy {
    /// A `permission_response` control message.
    Person,
    /// Nobody answered within the profile's `permission_timeout_secs`.
    Timeout,
    /// The turn was cancelled (or the CLI withdrew the request).
    Cancel,
    /// The attempt that asked ended without settling it (its worker died
    /// or stopped, or its CLI exited): resolved by the job's next attempt,
    /// which asks again under a new request id, or by the job's ending.
    Superseded,
}

impl ResolvedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            ResolvedBy::Person => "person",
            ResolvedBy::Timeout => "timeout",
            ResolvedBy::Cancel => "cancel",
            ResolvedBy::Superseded => "superseded",
        }
    }
}

/// A question of Claude's `AskUserQuestion` tool, as a front-end shows it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct PromptQuestion {
    pub question: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    pub options: Vec<PromptOption>,
    #[serde(default)]
    pub multi_select: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct PromptOption {
    pub label: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Decodes a control body (strict JSON, as for jobs).
pub fn decode_control(body: &[u8]) -> Result<ControlV1, DecodeError> {
    let text = std::str::from_utf8(body)
        .map_err(|e| DecodeError(format!("control message is not valid UTF-8: {e}")))?;
    let mut value = parse_strict(text)
        .map_err(|e| DecodeError(format!("control message is not valid JSON: {e}")))?;
    let Value::Object(obj) = &mut value else {
        return Err(DecodeError("control message must be a JSON object".into()));
    };
    check_version(obj)?;
    let msg: ControlV1 = serde_json::from_value(value)
        .map_err(|e| DecodeError(format!("invalid control message: {e}")))?;
    if let ControlBody::Cancel {
        job_id: None,
        session_key: None,
        ..
    } = msg.body
    {
        return Err(DecodeError("cancel needs `job_id` or `session_key`".into()));
    }
    if let ControlBody::PermissionResponse(r) = &msg.body {
        r.validate()?;
    }
    Ok(msg)
}

/// One reply event. `seq` strictly increases per job, from 0, contiguous
/// within one run of the job (a later run starts above the earlier run's
/// reserved block: a gap); exactly one terminal event (`completed`,
/// `failed`, `cancelled`) ends a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventV1 {
    pub v: u32,
    pub job_id: String,
    pub session_key: String,
    pub seq: u64,
    pub attempt: u32,
    #[serde(flatten)]
    pub body: EventBody,
    #[serde(default)]
    pub metadata: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventBody {
    Started {
        claude_session_id: Option<String>,
        resumed: bool,
        /// Set when the job asked to resume a session the CLI could not find
        /// and a new session was started instead.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume_failed: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        model: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        permission_mode: Option<String>,
    },
    Text {
        text: String,
    },
    /// The attempt's text so far is void (the CLI restarted a cut API
    /// stream); the `text` events that follow restate it from the start.
    TextReset {
        reason: String,
    },
    ToolUse {
        name: String,
        input_summary: String,
    },
    Retrying {
        /// The attempt that comes next.
        next_attempt: u32,
        delay_ms: u64,
        reason: String,
    },
    /// The session's context was compacted (summarised by the CLI): by
    /// the worker before this job's turn (`threshold`, `requested`) or by
    /// the CLI itself during it (`auto`; a prompt `/compact` is
    /// `requested`).
    Compacted {
        trigger: CompactTrigger,
        /// Context before, as the CLI counts it.
        pre_tokens: u64,
        /// Context after (the summary), as the CLI estimates it.
        post_tokens: u64,
    },
    Completed {
        result: String,
        claude_session_id: Option<String>,
        /// This turn's tokens, as the CLI reports them.
        usage: Value,
        /// What this turn cost (not the CLI's running total).
        total_cost_usd: f64,
        /// What the session key's turns have cost so far, this one included.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session_cost_usd: Option<f64>,
        duration_ms: u64,
        num_turns: u32,
        /// The session's context after this turn (input and cache tokens
        /// of its last API call), when the CLI reported it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        context_tokens: Option<u64>,
        /// The model's context window, when the CLI stated it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        context_window_tokens: Option<u64>,
    },
    Failed {
        error: ErrorKind,
        message: String,
        retryable: bool,
    },
    Cancelled {
        reason: String,
    },
    /// A tool call waits for a person's approval (or Claude asks a
    /// question): answer with a `permission_response` control message.
    PermissionRequest {
        /// Names this prompt in the answer; new for every prompt.
        request_id: String,
        tool_name: String,
        /// What the call would do, bounded: the full command for Bash,
        /// the path and a line count for edits.
        summary: String,
        /// The CLI's reason for asking, when it gives one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        /// The CLI's suggested rules ("allow for this session" uses them).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        suggestions: Vec<Value>,
        /// For `AskUserQuestion`: the questions and their options.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        questions: Option<Vec<PromptQuestion>>,
        /// When the prompt is denied if nobody answers (Unix ms).
        expires_at_ms: i64,
    },
    /// A prompt is settled: front-ends showing it can update it.
    PermissionResolved {
        request_id: String,
        behavior: PermissionBehavior,
        by: ResolvedBy,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
}

impl EventBody {
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            EventBody::Completed { .. } | EventBody::Failed { .. } | EventBody::Cancelled { .. }
        )
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            EventBody::Started { .. } => "started",
            EventBody::Text { .. } => "text",
            EventBody::TextReset { .. } => "text_reset",
            EventBody::ToolUse { .. } => "tool_use",
            EventBody::Retrying { .. } => "retrying",
            EventBody::Compacted { .. } => "compacted",
            EventBody::Completed { .. } => "completed",
            EventBody::Failed { .. } => "failed",
            EventBody::Cancelled { .. } => "cancelled",
            EventBody::PermissionRequest { .. } => "permission_request",
            EventBody::PermissionResolved { .. } => "permission_resolved",
        }
    }
}

/// Why a session's context was compacted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompactTrigger {
    /// Its context use reached the profile's `compact_at_percent`.
    Threshold,
    /// The job asked for it (`options.compact`, or the prompt `/compact`).
    Requested,
    /// The CLI's own autocompact, near the model's window.
    Auto,
}

/// What went wrong, as a producer needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The job itself was wrong; fix it before sending again.
    InvalidInput,
    /// The API rejected the credentials (401/403).
    Auth,
    /// The API returned an error (after the CLI's and our retries).
    Api,
    /// The turn hit its `max_turns`.
    MaxTurns,
    /// The turn ran past the worker's time limit.
    Timeout,
    /// The CLI crashed or ended without a result.
    CliCrashed,
    /// The CLI could not be started.
    Spawn,
    /// The worker lost the job (e.g. it died) too many times.
    WorkerLost,
    /// Something inside the worker failed.
    Internal,
    /// The session was busy and the job's `on_busy` policy is `reject`.
    Busy,
    /// The turn reached its per-turn cost cap (`max_budget_usd`).
    MaxBudget,
    /// A session or identity budget was used up before the job started.
    BudgetExceeded,
}

/// The answer to a control message, published to the replies exchange with
/// the control message's `reply_to` as routing key and its `message_id` as
/// correlation id. Exactly one per control message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlResultV1 {
    pub v: u32,
    /// Always "control_result".
    #[serde(rename = "type")]
    pub kind: String,
    /// The control message's `message_id` (or a generated id).
    pub request_id: String,
    pub ok: bool,
    pub outcome: ControlOutcome,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_key: Option<String>,
    /// The answer to `session_status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<SessionStatusV1>,
}

/// A session's stored state, as `session_status` reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionStatusV1 {
    /// The Claude session the next `continue` job resumes (none yet, or
    /// after a reset that has not run a turn).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claude_session_id: Option<String>,
    pub profile: String,
    /// Completed turns (jobs) of the session key, and what all its jobs cost.
    pub turns: i64,
    pub cost_usd: f64,
    /// Jobs accepted and not yet started, and those running.
    pub queued_jobs: i64,
    pub running_jobs: i64,
    /// A `reset_session` is pending: the next job starts a new session.
    pub reset_pending: bool,
    /// The permission mode set at runtime, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permission_mode: Option<PermissionMode>,
    /// Context the last turn used, and the model's window, if stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_tokens: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_window: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlOutcome {
    /// Queued job(s) cancelled and/or running turn(s) being interrupted;
    /// each affected job ends with a `cancelled` event.
    Cancelled,
    /// Nothing to do: the job had already finished.
    AlreadyFinished,
    /// No such job or session.
    Unknown,
    /// Permission mode changed (for the running turn, if any, and later turns).
    Applied,
    /// Refused (e.g. a mode above the profile's ceiling); `message` says why.
    Refused,
    /// The control message was not valid.
    Invalid,
    /// `session_status` answered: see `status`.
    Reported,
    /// A `permission_response` reached its prompt.
    Answered,
}

/// A session lifecycle event (`session.started`, `session.idle`,
/// `session.ended`), published on the reply exchange with its `type` as the
/// routing key, so observers bind `session.#` without knowing job reply
/// keys. Not a job event: no `job_id`/`seq` envelope. Delivered at least
/// once; `event_id` identifies it (dedup) and grows with every event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionEventV1 {
    pub v: u32,
    #[serde(rename = "type")]
    pub kind: SessionEventKind,
    pub event_id: i64,
    pub session_key: String,
    pub profile: String,
    /// When it happened (Unix ms, the recording worker's clock).
    pub at_ms: i64,
    /// `session.started`: the job that began the conversation;
    /// `session.ended` with reason `reset`: the job that reset it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// `session.started`: the job's session mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<SessionMode>,
    /// `session.idle`: the session's last activity (Unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_activity_ms: Option<i64>,
    /// `session.idle`: the profile's idle TTL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_ttl_secs: Option<u64>,
    /// `session.ended`: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<SessionEndReason>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SessionEventKind {
    #[serde(rename = "session.started")]
    Started,
    #[serde(rename = "session.idle")]
    Idle,
    #[serde(rename = "session.ended")]
    Ended,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionEndReason {
    Reset,
    Expired,
    Deleted,
    Budget,
}
