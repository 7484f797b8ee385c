//! `submit`'s answers to permission prompts: on a terminal the person
//! types y / n / a (always: allow for the session), or picks an option of
//! Claude's question; otherwise the `--allow-tools` list decides (allowed
//! tools are approved, the rest denied), so a script never hangs on a
//! prompt.

use std::collections::BTreeMap;
use std::io::{BufRead, IsTerminal, Write};

use claude_worker::protocol::{PermissionBehavior, PermissionResponseV1, PromptQuestion};

/// How `submit` answers prompts.
pub struct Asker {
    /// Ask on the terminal (stdin and stderr are terminals).
    interactive: bool,
    /// Tool names approved without asking (`*`: every tool).
    allow_tools: Vec<String>,
}

/// A `permission_request`, as `submit` needs it.
pub struct PromptView<'a> {
    pub job_id: &'a str,
    pub request_id: &'a str,
    pub tool_name: &'a str,
    pub summary: &'a str,
    pub questions: Option<&'a [PromptQuestion]>,
}

impl Asker {
    pub fn new(allow_tools: &[String]) -> Asker {
        Asker {
            interactive: std::io::stdin().is_terminal() && std::io::stderr().is_terminal(),
            allow_tools: allow_tools
                .iter()
                .flat_map(|s| s.split(','))
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
        }
    }

    fn pre_approved(&self, tool: &str) -> bool {
        self.allow_tools.iter().any(|t| t == "*" || t == tool)
    }

    /// The answer to a prompt; may block on the terminal (run it off the
    /// async threads).
    pub fn answer(&self, p: &PromptView<'_>) -> PermissionResponseV1 {
        let mut r = PermissionResponseV1 {
            job_id: p.job_id.to_string(),
            request_id: p.request_id.to_string(),
            behavior: PermissionBehavior::Deny,
            message: None,
            updated_input: None,
            allow_for_session: false,
            answers: None,
        };
        if self.pre_approved(p.tool_name) {
            eprintln!("[allowed {} (--allow-tools): {}]", p.tool_name, p.summary);
            r.behavior = PermissionBehavior::Allow;
            return r;
        }
        if !self.interactive {
            eprintln!(
                "[denied {}: not a terminal and not in --allow-tools: {}]",
                p.tool_name, p.summary
            );
            r.message = Some("denied: nobody at the terminal to ask (see --allow-tools)".into());
            return r;
        }
        match p.questions.filter(|q| !q.is_empty()) {
            Some(questions) => {
                r.behavior = PermissionBehavior::Allow;
                r.answers = Some(ask_questions(questions));
            }
            None => match ask_tool(p.tool_name, p.summary) {
                Choice::Yes => r.behavior = PermissionBehavior::Allow,
                Choice::Always => {
                    r.behavior = PermissionBehavior::Allow;
                    r.allow_for_session = true;
                }
                Choice::No => r.message = Some("denied at the terminal".into()),
            },
        }
        r
    }
}

enum Choice {
    Yes,
    No,
    Always,
}

fn read_line(question: &str) -> Option<String> {
    eprint!("{question}");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    match std::io::stdin().lock().read_line(&mut line) {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(line.trim().to_string()),
    }
}

fn ask_tool(tool: &str, summary: &str) -> Choice {
    eprintln!("\n? Claude wants to use {tool}:\n    {summary}");
    loop {
        let Some(line) = read_line("  allow? [y]es / [n]o / [a]lways this session: ") else {
            return Choice::No;
        };
        match line.to_ascii_lowercase().as_str() {
            "y" | "yes" => return Choice::Yes,
            "n" | "no" | "" => return Choice::No,
            "a" | "always" => return Choice::Always,
            _ => eprintln!("  please answer y, n or a"),
        }
    }
}

fn ask_questions(questions: &[PromptQuestion]) -> BTreeMap<String, String> {
    let mut answers = BTreeMap::new();
    for q in questions {
        eprintln!("\n? {}", q.question);
        for (i, o) in q.options.iter().enumerate() {
            match &o.description {
                Some(d) => eprintln!("  {}. {} — {d}", i + 1, o.label),
                None => eprintln!("  {}. {}", i + 1, o.label),
            }
        }
        let hint = if q.multi_select {
            "  numbers (comma-separated) or your own answer: "
        } else {
            "  a number or your own answer: "
        };
        let line = read_line(hint).unwrap_or_default();
        answers.insert(q.question.clone(), pick(q, &line));
    }
    answers
}

/// Option numbers become their labels; anything else is a free answer.
fn pick(q: &PromptQuestion, line: &str) -> String {
    let labels: Option<Vec<&str>> = line
        .split(',')
        .map(|n| {
            let i: usize = n.trim().parse().ok()?;
            q.options.get(i.checked_sub(1)?).map(|o| o.label.as_str())
        })
        .collect();
    match labels {
        Some(l) if !l.is_empty() => l.join(", "),
        _ => line.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use claude_worker::protocol::PromptOption;

    #[test]
    fn numbers_pick_labels_and_text_stays_text() {
        let q = PromptQuestion {
            question: "Which?".into(),
            header: None,
            options: ["Red", "Blue"]
                .map(|l| PromptOption {
                    label: l.into(),
                    description: None,
                })
                .to_vec(),
            multi_select: true,
        };
        assert_eq!(pick(&q, "2"), "Blue");
        assert_eq!(pick(&q, "1, 2"), "Red, Blue");
        assert_eq!(pick(&q, "3"), "3");
        assert_eq!(pick(&q, "green"), "green");
    }
}
