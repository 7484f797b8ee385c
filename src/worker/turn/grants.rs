//! "Allow for this session" across processes. The CLI keeps a session
//! rule only in the memory of the process it was given to, so a warm
//! process remembers it but a cold resume of the session (after the warm
//! process was closed, or on another worker) would ask again. The worker
//! records each such rule with the Claude session and passes the
//! session's rules as allowed tools to a CLI that resumes it cold (see
//! `prepare` and `TurnRequest::session_grants`).

use serde_json::Value;
use tracing::warn;

use super::events::JobEvents;

/// Records the `addRules` entries of an "allow for this session" answer
/// for the Claude session. A failure is only logged: the warm process has
/// the rules anyway; a cold resume would ask again.
pub(super) async fn record(events: &JobEvents<'_>, claude_session: Option<&str>, rules: &[Value]) {
    let Some(session) = claude_session else {
        return;
    };
    let rules = rule_strings(rules);
    if rules.is_empty() {
        return;
    }
    if let Err(e) = events.ctx.store.add_session_grants(session, &rules).await {
        warn!(error = %e, "recording an allow-for-this-session rule failed");
    }
}

/// `addRules` entries as CLI rule strings: `Tool` or `Tool(content)`.
fn rule_strings(updates: &[Value]) -> Vec<String> {
    updates
        .iter()
        .filter(|u| u["type"] == "addRules" && u["behavior"] == "allow")
        .filter_map(|u| u["rules"].as_array())
        .flatten()
        .filter_map(|r| {
            let tool = r["toolName"].as_str()?;
            Some(match r["ruleContent"].as_str() {
                Some(content) => format!("{tool}({content})"),
                None => tool.to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn rules_become_the_clis_strings() {
        let updates = [
            json!({"type": "addRules", "behavior": "allow", "destination": "session",
                "rules": [{"toolName": "Bash", "ruleContent": "touch /w/a"}, {"toolName": "Write"}]}),
            json!({"type": "addRules", "behavior": "deny", "rules": [{"toolName": "Read"}]}),
            json!({"type": "addDirectories", "directories": ["/w"]}),
        ];
        assert_eq!(super::rule_strings(&updates), ["Bash(touch /w/a)", "Write"]);
    }
}
