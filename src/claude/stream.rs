//! The CLI's stream-json output, reduced to what the worker uses: one
//! stdout line → one [`CliMessage`].

use serde_json::Value;

/// A stdout line of the CLI, reduced to what the worker uses.
#[derive(Debug, Clone, PartialEq)]
pub enum CliMessage {
    /// `system/init`: the session is known.
    Init {
        session_id: String,
        model: Option<String>,
        permission_mode: Option<String>,
    },
    /// A streamed text delta of the top-level assistant.
    TextDelta {
        message_id: Option<String>,
        /// The content block the delta belongs to.
        index: u64,
        text: String,
    },
    /// The API stream of `message_id` was cut: its content blocks from
    /// `from_block_index` on are abandoned (the CLI retries the request),
    /// so the deltas already printed for them are void.
    Abandoned {
        message_id: String,
        from_block_index: u64,
    },
    /// A complete top-level assistant message: its text (already streamed
    /// as deltas, unless the CLI fell back to a non-streaming request) and
    /// its tool calls.
    Assistant {
        message_id: Option<String>,
        text: String,
        tool_uses: Vec<(String, Value)>,
    },
    /// The CLI is retrying an API call itself.
    ApiRetry {
        attempt: u64,
        error_status: Option<u64>,
        error: String,
    },
    /// `system/compact_boundary`: the CLI compacted the session's context
    /// (`trigger` `manual` for a `/compact` user message, `auto` for its
    /// own autocompact near the window).
    CompactBoundary {
        trigger: String,
        pre_tokens: u64,
        post_tokens: u64,
    },
    /// `system/status` with `compact_result: "failed"`: the CLI could not
    /// compact (its summary request failed); the session is unchanged and
    /// the `result` that follows is a `success` whose text is `error`.
    CompactFailed { error: String },
    /// The turn's result.
    Result(TurnResult),
    /// The answer to a control request: `error` is `None` on success.
    ControlResponse {
        request_id: String,
        error: Option<String>,
    },
    /// The CLI asks whether a tool call may run (`can_use_tool`, with
    /// `--permission-prompt-tool stdio`); answered with a control response.
    CanUseTool(ToolPermissionRequest),
    /// The CLI withdrew a request it sent (e.g. after an interrupt).
    ControlCancel { request_id: String },
    /// Anything else (valid JSON the worker does not use).
    Other,
}

/// A `can_use_tool` control request of the CLI.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolPermissionRequest {
    /// The CLI's id for the request (the answer carries it).
    pub request_id: String,
    pub tool_name: String,
    pub input: Value,
    /// Rules the CLI suggests for "always allow".
    pub suggestions: Vec<Value>,
    /// Why the CLI asks (`decision_reason`, else `title`).
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TurnResult {
    pub subtype: String,
    pub is_error: bool,
    pub result: Option<String>,
    pub session_id: Option<String>,
    pub api_error_status: Option<u64>,
    pub errors: Vec<String>,
    /// Token usage of this turn (the CLI's figures are per turn).
    pub usage: Value,
    /// The CLI's running total for the Claude session (see `claude::cost`):
    /// not what the turn cost.
    pub total_cost_usd: f64,
    /// The CLI's own per-turn figure, when it states one
    /// (`model_usage_since_last_result`).
    pub per_turn_cost_usd: Option<f64>,
    /// The context the turn's last top-level API call used (input plus
    /// cache tokens) and its model's window: set by the process from the
    /// turn's assistant messages and the result's `modelUsage`.
    pub context: Option<ContextUse>,
    /// What this turn cost: set by the process's `CostMeter` (from
    /// `per_turn_cost_usd`, else from the running totals).
    pub turn_cost_usd: f64,
    pub duration_ms: u64,
    pub num_turns: u32,
}

/// A session's context use after a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextUse {
    pub tokens: u64,
    /// The model's context window, when the CLI states it.
    pub window: Option<u64>,
}

/// The context an assistant message's API call used (input + cache
/// tokens) and its model, for a top-level `assistant` line.
pub fn call_context(v: &Value) -> Option<(u64, Option<String>)> {
    if v.get("type").and_then(Value::as_str) != Some("assistant")
        || !v.get("parent_tool_use_id").is_none_or(Value::is_null)
    {
        return None;
    }
    let usage = v["message"].get("usage")?;
    let n = |k: &str| usage.get(k).and_then(Value::as_u64).unwrap_or(0);
    let tokens =
        n("input_tokens") + n("cache_creation_input_tokens") + n("cache_read_input_tokens");
    Some((tokens, str_of(&v["message"], "model")))
}

/// The context window the result's `modelUsage` states for `model`.
pub fn context_window(result: &Value, model: Option<&str>) -> Option<u64> {
    let models = result.get("modelUsage")?.as_object()?;
    let of = |m: &Value| m.get("contextWindow").and_then(Value::as_u64);
    match model.and_then(|m| models.get(m)) {
        Some(m) => of(m),
        None => models.values().filter_map(of).max(),
    }
}

/// Parses one stdout line. `Err` means the line is not JSON.
#[cfg(test)]
pub fn parse_line(line: &str) -> Result<CliMessage, serde_json::Error> {
    let v: Value = serde_json::from_str(line)?;
    Ok(parse_value(&v))
}

/// [`parse_line`] for a line already parsed as JSON.
pub fn parse_value(v: &Value) -> CliMessage {
    let top_level = || v.get("parent_tool_use_id").is_none_or(Value::is_null);
    match v.get("type").and_then(Value::as_str) {
        Some("system") => system(v),
        // Sub-agents' output (a `parent_tool_use_id`) is not the answer.
        Some("stream_event") if top_level() => stream_event(v),
        Some("assistant") if top_level() => assistant(v),
        Some("control_response") => control_response(v),
        Some("control_request") => control_request(v),
        Some("control_cancel_request") => match str_of(v, "request_id") {
            Some(request_id) => CliMessage::ControlCancel { request_id },
            None => CliMessage::Other,
        },
        Some("result") => CliMessage::Result(result(v)),
        _ => CliMessage::Other,
    }
}

fn str_of(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_string)
}

fn system(v: &Value) -> CliMessage {
    match v.get("subtype").and_then(Value::as_str) {
        Some("init") => match str_of(v, "session_id") {
            Some(session_id) => CliMessage::Init {
                session_id,
                model: str_of(v, "model"),
                permission_mode: str_of(v, "permissionMode"),
            },
            None => CliMessage::Other,
        },
        Some("compact_boundary") => {
            let meta = &v["compact_metadata"];
            let n = |k: &str| meta.get(k).and_then(Value::as_u64).unwrap_or(0);
            CliMessage::CompactBoundary {
                trigger: str_of(meta, "trigger").unwrap_or_default(),
                pre_tokens: n("pre_tokens"),
                post_tokens: n("post_tokens"),
            }
        }
        Some("status") if v["compact_result"] == "failed" => CliMessage::CompactFailed {
            error: str_of(v, "compact_error").unwrap_or_default(),
        },
        Some("api_retry") => CliMessage::ApiRetry {
            attempt: v.get("attempt").and_then(Value::as_u64).unwrap_or(0),
            error_status: v.get("error_status").and_then(Value::as_u64),
            error: str_of(v, "error").unwrap_or_default(),
        },
        _ => CliMessage::Other,
    }
}

fn stream_event(v: &Value) -> CliMessage {
    let ev = &v["event"];
    if let Some(a) = v.get("abandoned_blocks").filter(|a| a.is_object()) {
        return match (
            str_of(a, "api_message_id"),
            a.get("from_block_index").and_then(Value::as_u64),
        ) {
            (Some(message_id), Some(from_block_index)) => CliMessage::Abandoned {
                message_id,
                from_block_index,
            },
            _ => CliMessage::Other,
        };
    }
    if ev["type"] != "content_block_delta" || ev["delta"]["type"] != "text_delta" {
        return CliMessage::Other;
    }
    match ev["delta"]["text"].as_str() {
        Some(t) => CliMessage::TextDelta {
            message_id: str_of(v, "api_message_id"),
            index: ev["index"].as_u64().unwrap_or(0),
            text: t.to_string(),
        },
        None => CliMessage::Other,
    }
}

fn assistant(v: &Value) -> CliMessage {
    let blocks = v["message"]["content"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let text: String = blocks
        .iter()
        .filter(|b| b["type"] == "text")
        .filter_map(|b| b["text"].as_str())
        .collect();
    let tool_uses = blocks
        .iter()
        .filter(|b| b["type"] == "tool_use")
        .map(|b| {
            (
                b["name"].as_str().unwrap_or("?").to_string(),
                b["input"].clone(),
            )
        })
        .collect();
    CliMessage::Assistant {
        message_id: v["message"]["id"].as_str().map(str::to_string),
        text,
        tool_uses,
    }
}

fn control_response(v: &Value) -> CliMessage {
    let r = &v["response"];
    match r["request_id"].as_str() {
        Some(id) => CliMessage::ControlResponse {
            request_id: id.to_string(),
            error: if r["subtype"] == "success" {
                None
            } else {
                Some(r["error"].as_str().unwrap_or("unknown error").to_string())
            },
        },
        None => CliMessage::Other,
    }
}

fn control_request(v: &Value) -> CliMessage {
    let r = &v["request"];
    let (Some(request_id), Some("can_use_tool"), Some(tool_name)) = (
        str_of(v, "request_id"),
        r["subtype"].as_str(),
        str_of(r, "tool_name"),
    ) else {
        return CliMessage::Other;
    };
    let reason = ["decision_reason", "title"]
        .iter()
        .find_map(|k| r.get(*k).and_then(Value::as_str))
        .map(|s| truncate_chars(s, 500));
    CliMessage::CanUseTool(ToolPermissionRequest {
        request_id,
        tool_name,
        input: r.get("input").cloned().unwrap_or(Value::Null),
        suggestions: r["permission_suggestions"]
            .as_array()
            .cloned()
            .unwrap_or_default(),
        reason,
    })
}

fn result(v: &Value) -> TurnResult {
    TurnResult {
        subtype: str_of(v, "subtype").unwrap_or_default(),
        is_error: v.get("is_error").and_then(Value::as_bool).unwrap_or(false),
        result: str_of(v, "result"),
        session_id: str_of(v, "session_id"),
        api_error_status: v.get("api_error_status").and_then(Value::as_u64),
        errors: v
            .get("errors")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|e| e.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
        usage: v.get("usage").cloned().unwrap_or(Value::Null),
        total_cost_usd: v
            .get("total_cost_usd")
            .and_then(Value::as_f64)
            .unwrap_or(0.0),
        per_turn_cost_usd: super::cost::per_turn_cost(v),
        context: None,
        turn_cost_usd: 0.0,
        duration_ms: v.get("duration_ms").and_then(Value::as_u64).unwrap_or(0),
        num_turns: v.get("num_turns").and_then(Value::as_u64).unwrap_or(0) as u32,
    }
}

/// A short, human-readable summary of a tool call's input.
pub fn summarize_tool_input(input: &Value) -> String {
    let pick = [
        "command",
        "file_path",
        "path",
        "pattern",
        "url",
        "query",
        "description",
    ]
    .iter()
    .find_map(|k| input.get(*k).and_then(Value::as_str));
    let text = match pick {
        Some(s) => s.to_string(),
        None => input.to_string(),
    };
    truncate_chars(&text, 200)
}

pub(crate) fn truncate_chars(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(max).collect();
        out.push('…');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_messages_the_worker_uses() {
        let init = r#"{"type":"system","subtype":"init","session_id":"s1","model":"m","permissionMode":"plan"}"#;
        assert_eq!(
            parse_line(init).unwrap(),
            CliMessage::Init {
                session_id: "s1".into(),
                model: Some("m".into()),
                permission_mode: Some("plan".into())
            }
        );
        let delta = r#"{"type":"stream_event","event":{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hel"}},"parent_tool_use_id":null,"api_message_id":"m1"}"#;
        assert_eq!(
            parse_line(delta).unwrap(),
            CliMessage::TextDelta {
                message_id: Some("m1".into()),
                index: 0,
                text: "Hel".into()
            }
        );
        // As 2.1.330 prints it when an API stream is cut mid-answer.
        let cut = r#"{"abandoned_blocks":{"api_message_id":"msg_1","from_block_index":1},"api_message_id":"msg_1","event":{"type":"message_stop"},"parent_tool_use_id":null,"session_id":"s","type":"stream_event"}"#;
        assert_eq!(
            parse_line(cut).unwrap(),
            CliMessage::Abandoned {
                message_id: "msg_1".into(),
                from_block_index: 1
            }
        );
        let sub = r#"{"type":"stream_event","event":{"type":"content_block_delta","delta":{"type":"text_delta","text":"x"}},"parent_tool_use_id":"t1"}"#;
        assert_eq!(parse_line(sub).unwrap(), CliMessage::Other);
        assert_eq!(
            parse_line(r#"{"type":"brand_new_kind"}"#).unwrap(),
            CliMessage::Other
        );
        assert!(parse_line("[claude-code:warning] not json").is_err());
        let ok = r#"{"type":"control_response","response":{"subtype":"success","request_id":"r1","response":{"mode":"plan"}}}"#;
        assert_eq!(
            parse_line(ok).unwrap(),
            CliMessage::ControlResponse {
                request_id: "r1".into(),
                error: None
            }
        );
        let err = r#"{"type":"control_response","response":{"subtype":"error","request_id":"r3","error":"Unsupported control request subtype: set_max_turns"}}"#;
        assert!(matches!(
            parse_line(err).unwrap(),
            CliMessage::ControlResponse { error: Some(e), .. } if e.contains("set_max_turns")
        ));
        let call: Value = serde_json::from_str(r#"{"type":"assistant","parent_tool_use_id":null,"message":{"model":"m1","usage":{"input_tokens":10,"cache_creation_input_tokens":20,"cache_read_input_tokens":30,"output_tokens":5}}}"#).unwrap();
        assert_eq!(call_context(&call), Some((60, Some("m1".into()))));
        let mut sub = call.clone();
        sub["parent_tool_use_id"] = "t1".into();
        assert_eq!(
            call_context(&sub),
            None,
            "a sub-agent's call is not the session's context"
        );
        let result: Value = serde_json::from_str(
            r#"{"modelUsage":{"m1":{"contextWindow":200000},"m2":{"contextWindow":1000000}}}"#,
        )
        .unwrap();
        assert_eq!(context_window(&result, Some("m1")), Some(200_000));
        assert_eq!(context_window(&result, None), Some(1_000_000));
        // As 2.1.330 prints it after a `/compact` user message.
        let boundary = r#"{"type":"system","subtype":"compact_boundary","session_id":"s","compact_metadata":{"trigger":"manual","pre_tokens":150005,"post_tokens":2539,"cumulative_dropped_tokens":147466,"duration_ms":20}}"#;
        assert_eq!(
            parse_line(boundary).unwrap(),
            CliMessage::CompactBoundary {
                trigger: "manual".into(),
                pre_tokens: 150_005,
                post_tokens: 2_539
            }
        );
        // As 2.1.330 prints it when the summary request of a `/compact`
        // fails (then a `success` result carrying the same text).
        let failed = r#"{"type":"system","subtype":"status","status":null,"compact_result":"failed","compact_error":"Error during compaction: API Error: 500 boom.","session_id":"s"}"#;
        assert_eq!(
            parse_line(failed).unwrap(),
            CliMessage::CompactFailed {
                error: "Error during compaction: API Error: 500 boom.".into()
            }
        );
        let compacting =
            r#"{"type":"system","subtype":"status","status":"compacting","session_id":"s"}"#;
        assert_eq!(parse_line(compacting).unwrap(), CliMessage::Other);
        let res = r#"{"type":"result","subtype":"success","is_error":true,"api_error_status":529,"result":"API Error: 529","num_turns":1}"#;
        match parse_line(res).unwrap() {
            CliMessage::Result(r) => {
                assert!(r.is_error);
                assert_eq!(r.api_error_status, Some(529));
            }
            other => panic!("{other:?}"),
        }
    }
}
