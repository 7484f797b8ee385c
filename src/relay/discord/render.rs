//! What the relay shows, as pure functions: splitting an answer into
//! Discord messages (2,000 characters, code fences kept whole, words not
//! cut), the streaming view, the footer and the short lines for tool calls,
//! failures and the rest. No I/O here; `reply.rs` does the editing.

use std::time::{Duration, Instant};

use crate::protocol::ErrorKind;

/// Discord's limit on a message's content, in characters.
pub const MESSAGE_LIMIT: usize = 2000;

/// Discord's limit on a thread's name, in characters.
pub const THREAD_NAME_LIMIT: usize = 100;

/// What a reply shows before the first words arrive.
pub const PLACEHOLDER: &str = "…";

/// Room kept in a chunk to close a fence left open: `"\n```"`.
const FENCE_CLOSE_RESERVE: usize = 4;

/// A reopened fence names at most this much of its language, so a silly
/// info string cannot eat the chunk.
const MAX_LANG_CHARS: usize = 20;

fn chars(s: &str) -> usize {
    s.chars().count()
}

/// The language of a fence line (` ```rust ` → `Some("rust")`), `None` if
/// the line is not a fence.
fn fence_lang(line: &str) -> Option<String> {
    let rest = line.trim_start().strip_prefix("```")?;
    let lang: String = rest
        .trim()
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '`')
        .take(MAX_LANG_CHARS)
        .collect();
    Some(lang)
}

/// Splits `s` so the head has at most `room` characters: after the last
/// whitespace that fits, else (one long word) at `room`. `room` ≥ 1.
fn split_words(s: &str, room: usize) -> (&str, &str) {
    let cut = s.char_indices().nth(room).map_or(s.len(), |(i, _)| i);
    if cut == s.len() {
        return (s, "");
    }
    let head = &s[..cut];
    let at = head
        .char_indices()
        .filter(|(_, c)| c.is_whitespace())
        .map(|(i, c)| i + c.len_utf8())
        .next_back()
        .filter(|&i| i > 0)
        .unwrap_or(cut);
    s.split_at(at)
}

/// Builds the chunks of [`split`].
struct Chunker {
    limit: usize,
    out: Vec<String>,
    cur: String,
    /// Length of what `cur` started with (a reopened fence).
    prefix: usize,
    /// The open fence's language, if inside a code block.
    fence: Option<String>,
}

impl Chunker {
    fn len(&self) -> usize {
        chars(&self.cur)
    }

    /// Ends the current chunk (closing an open fence) and starts the next
    /// (reopening it with its language).
    fn flush(&mut self) {
        if self.len() > self.prefix {
            let mut chunk = std::mem::take(&mut self.cur);
            if self.fence.is_some() {
                if !chunk.ends_with('\n') {
                    chunk.push('\n');
                }
                chunk.push_str("```");
            }
            self.out.push(chunk);
        }
        self.cur.clear();
        if let Some(lang) = &self.fence {
            self.cur = format!("```{lang}\n");
        }
        self.prefix = self.len();
    }

    fn reserve(fence: &Option<String>) -> usize {
        if fence.is_some() {
            FENCE_CLOSE_RESERVE
        } else {
            0
        }
    }

    fn push_line(&mut self, line: &str) {
        // The fence state after this line, which decides what must be reserved.
        let after = match fence_lang(line) {
            Some(lang) if self.fence.is_none() => Some(lang),
            Some(_) => None,
            None => self.fence.clone(),
        };
        if self.len() + chars(line) + Self::reserve(&after) <= self.limit {
            self.cur.push_str(line);
            self.fence = after;
            return;
        }
        if self.len() > self.prefix {
            self.flush();
            return self.push_line(line);
        }
        // A fresh chunk and the line still does not fit: cut it at words.
        let mut rest = line;
        let mut first = true;
        while !rest.is_empty() {
            let fence = if first { &after } else { &self.fence };
            let room = self
                .limit
                .saturating_sub(self.len() + Self::reserve(fence))
                .max(1);
            let (head, tail) = split_words(rest, room);
            self.cur.push_str(head);
            if first {
                self.fence = after.clone();
                first = false;
            }
            rest = tail;
            if !rest.is_empty() {
                self.flush();
            }
        }
    }
}

/// Splits an answer into messages of at most `limit` characters. Breaks go
/// between lines where possible, else after a word; a code block cut in
/// two is closed at the end of one message and reopened, with its
/// language, at the start of the next.
pub fn split(text: &str, limit: usize) -> Vec<String> {
    let limit = limit.max(MAX_LANG_CHARS + 8 + FENCE_CLOSE_RESERVE);
    let mut c = Chunker {
        limit,
        out: Vec::new(),
        cur: String::new(),
        prefix: 0,
        fence: None,
    };
    for line in text.split_inclusive('\n') {
        c.push_line(line);
    }
    c.flush();
    c.out
}

/// The message a reply shows while streaming: the text so far (or
/// [`PLACEHOLDER`]), and the last tool call under it. An answer already
/// past one message shows its last part, after an ellipsis line; the
/// whole answer is posted, split, when it completes.
pub fn streaming_view(text: &str, tool: Option<&str>) -> String {
    let tool_line = tool.map(|t| format!("\n{t}")).unwrap_or_default();
    let room = MESSAGE_LIMIT - chars(&tool_line) - 2;
    let body = if text.trim().is_empty() {
        PLACEHOLDER.to_string()
    } else {
        let parts = split(text, room);
        match parts.as_slice() {
            [only] => only.clone(),
            [.., last] => format!("…\n{last}"),
            [] => PLACEHOLDER.to_string(),
        }
    };
    format!("{body}{tool_line}")
}

/// The compact line for a tool call: `-# 🔧 Read · src/main.rs`.
pub fn tool_line(name: &str, input_summary: &str) -> String {
    let summary: String = input_summary
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(80)
        .collect();
    let name: String = name.chars().take(40).collect();
    if summary.trim().is_empty() {
        format!("-# 🔧 {name}")
    } else {
        format!("-# 🔧 {name} · {}", summary.trim())
    }
}

/// The footer under a completed answer.
pub fn footer(num_turns: u32, total_cost_usd: f64) -> String {
    let turns = if num_turns == 1 { "turn" } else { "turns" };
    format!("-# {num_turns} {turns} · ${total_cost_usd:.4}")
}

/// The footer's context part, ` · ctx 42%` (of the model's window), when
/// the `completed` event carries both figures.
pub fn context_part(context_tokens: Option<u64>, window_tokens: Option<u64>) -> String {
    match (context_tokens, window_tokens) {
        (Some(used), Some(window)) if window > 0 => {
            let pct = (used.saturating_mul(100) / window).min(100);
            format!(" · ctx {pct}%")
        }
        _ => String::new(),
    }
}

/// The messages of a completed answer: `result` split, with the footer
/// (if any) on its own line at the end. An empty result says so.
pub fn final_messages(result: &str, footer: Option<&str>) -> Vec<String> {
    let mut text = if result.trim().is_empty() {
        "(no answer)".to_string()
    } else {
        result.to_string()
    };
    if let Some(f) = footer {
        text.push_str("\n\n");
        text.push_str(f);
    }
    split(&text, MESSAGE_LIMIT)
}

/// The final form of a completed answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Final {
    /// The answer in messages (split), the reply first.
    Messages(Vec<String>),
    /// A preview in the reply, and the whole answer as a file.
    File { preview: String, file: String },
}

/// The file a long answer is attached as.
pub const ANSWER_FILE: &str = "answer.md";

/// How a completed answer is shown: split into messages, or, when it is
/// longer than `file_above` characters (and that is not 0), its first part
/// with the whole attached as [`ANSWER_FILE`].
pub fn final_reply(result: &str, footer: Option<&str>, file_above: usize) -> Final {
    if file_above == 0 || chars(result) <= file_above {
        return Final::Messages(final_messages(result, footer));
    }
    let note = format!("-# The whole answer is attached ({ANSWER_FILE}).");
    let tail = match footer {
        Some(f) => format!("\n{note}\n{f}"),
        None => format!("\n{note}"),
    };
    let room = MESSAGE_LIMIT - chars(&tail) - 2;
    let first = split(result, room).into_iter().next().unwrap_or_default();
    Final::File {
        preview: format!("{first}\n…{tail}"),
        file: result.to_string(),
    }
}

/// A failure in a few words a Discord user can act on.
pub fn failure(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::Busy => {
            "⚠️ Still answering your previous message; send this again when it is done."
        }
        ErrorKind::InvalidInput => "⚠️ That request could not be run (invalid input).",
        ErrorKind::Auth => "⚠️ The Claude API refused the worker's credentials. Tell the operator.",
        ErrorKind::Api => "⚠️ The Claude API failed; try again in a moment.",
        ErrorKind::MaxTurns => "⚠️ Stopped: the turn used up its tool-call budget.",
        ErrorKind::Timeout => "⚠️ Stopped: the answer took too long.",
        ErrorKind::CliCrashed | ErrorKind::Spawn | ErrorKind::Internal => {
            "⚠️ Something went wrong on the worker; try again."
        }
        ErrorKind::WorkerLost => "⚠️ The worker running this was lost; try again.",
        ErrorKind::MaxBudget => "⚠️ Stopped: this answer reached its cost limit.",
        ErrorKind::BudgetExceeded => "⚠️ The budget for this conversation is used up.",
    }
}

/// What a cancelled reply shows: the text it had, marked as stopped.
pub fn cancelled(partial: &str) -> String {
    if partial.trim().is_empty() {
        "⏹️ Stopped.".to_string()
    } else {
        streaming_view(partial, Some("-# ⏹️ Stopped."))
    }
}

/// The line shown when an attempt is retried (its text is void).
pub const RETRYING: &str = "-# ↻ Retrying…";

/// The placeholder of a job that waits behind another in its session.
pub const QUEUED: &str = "-# ⏳ Queued behind your previous message…";

/// The note on files a message carried that Claude will not see.
pub fn skipped_files(names: &[String]) -> String {
    let list: String = names.join(", ").chars().take(300).collect();
    format!("-# Left out: {list}")
}

/// A thread's name from the prompt that opened it: its first line, cut at a
/// word to [`THREAD_NAME_LIMIT`] characters (never empty).
pub fn thread_name(prompt: &str) -> String {
    let line = prompt.lines().map(str::trim).find(|l| !l.is_empty());
    let line = line.unwrap_or("Claude");
    if chars(line) <= THREAD_NAME_LIMIT {
        return line.to_string();
    }
    let (head, _) = split_words(line, THREAD_NAME_LIMIT - 1);
    format!("{}…", head.trim_end())
}

/// Bounds the rate of edits of one message: changes are coalesced and
/// shown at most once per `interval`.
#[derive(Debug, Clone)]
pub struct Throttle {
    interval: Duration,
    last: Option<Instant>,
}

impl Throttle {
    pub fn new(interval: Duration) -> Throttle {
        Throttle {
            interval,
            last: None,
        }
    }

    /// When the next edit may go out (`now` if it may at once).
    pub fn next_at(&self, now: Instant) -> Instant {
        match self.last {
            Some(last) if last + self.interval > now => last + self.interval,
            _ => now,
        }
    }

    /// An edit went out at `at`.
    pub fn sent(&mut self, at: Instant) {
        self.last = Some(at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The text without fence lines and line breaks: what `split` must
    /// keep, in order (it only adds fence lines and a line break before one).
    fn content(s: &str) -> String {
        s.lines().filter(|l| fence_lang(l).is_none()).collect()
    }

    fn unsplit(chunks: &[String]) -> String {
        content(&chunks.concat())
    }

    fn fences_balanced(chunk: &str) -> bool {
        chunk.lines().filter(|l| fence_lang(l).is_some()).count() % 2 == 0
    }

    #[test]
    fn short_text_is_one_message() {
        assert_eq!(split("Hello!", 2000), vec!["Hello!".to_string()]);
        assert!(split("", 2000).is_empty());
    }

    #[test]
    fn prose_breaks_between_words_and_loses_nothing() {
        let text = "lorem ipsum dolor sit amet ".repeat(200);
        let chunks = split(&text, 2000);
        assert_eq!(chunks.len(), 3);
        for c in &chunks {
            assert!(chars(c) <= 2000);
            assert!(
                c.ends_with(' '),
                "cut inside a word: {:?}",
                &c[c.len() - 10..]
            );
        }
        assert_eq!(chunks.concat(), text);
    }

    #[test]
    fn a_word_longer_than_a_message_is_cut_hard() {
        let text = "x".repeat(4500);
        let chunks = split(&text, 2000);
        assert_eq!(
            chunks.iter().map(|c| chars(c)).collect::<Vec<_>>(),
            vec![2000, 2000, 500]
        );
    }

    #[test]
    fn a_code_block_cut_in_two_is_closed_and_reopened_with_its_language() {
        let code: String = (0..300).map(|i| format!("let x{i} = {i};\n")).collect();
        let text = format!("Here:\n```rust\n{code}```\nDone.");
        let chunks = split(&text, 2000);
        assert!(chunks.len() >= 3, "{}", chunks.len());
        for (i, c) in chunks.iter().enumerate() {
            assert!(chars(c) <= 2000, "chunk {i} is {} chars", chars(c));
            assert!(fences_balanced(c), "chunk {i} leaves a fence open:\n{c}");
            if i > 0 && i < chunks.len() - 1 {
                assert!(c.starts_with("```rust\n"), "chunk {i}: {:?}", &c[..12]);
                assert!(c.ends_with("\n```"), "chunk {i}");
            }
        }
        assert!(chunks.last().unwrap().ends_with("```\nDone."));
        assert_eq!(unsplit(&chunks), content(&text));
    }

    #[test]
    fn multibyte_text_counts_characters_not_bytes() {
        let text = "é".repeat(3000);
        let chunks = split(&text, 2000);
        assert_eq!(chunks.len(), 2);
        assert_eq!(chars(&chunks[0]), 2000);
        assert_eq!(chunks.concat(), text);
    }

    #[test]
    fn every_chunk_fits_and_fences_balance_on_mixed_text() {
        let mut text = String::new();
        for i in 0..40 {
            text.push_str(&format!("Paragraph {i} with some words in it.\n"));
            if i % 3 == 0 {
                text.push_str("```py\n");
                text.push_str(&"print('a long line of python') # ".repeat(9));
                text.push_str("\n```\n");
            }
        }
        for limit in [200, 500, 2000] {
            let chunks = split(&text, limit);
            for c in &chunks {
                assert!(chars(c) <= limit, "{} > {limit}", chars(c));
                assert!(fences_balanced(c), "unbalanced at {limit}:\n{c}");
            }
            assert_eq!(unsplit(&chunks), content(&text), "limit {limit}");
        }
    }

    #[test]
    fn streaming_view_shows_the_tail_of_a_long_answer_and_the_tool() {
        assert_eq!(streaming_view("", None), PLACEHOLDER);
        assert_eq!(streaming_view("Hi", Some("-# 🔧 Bash")), "Hi\n-# 🔧 Bash");
        let long = "word ".repeat(1000);
        let v = streaming_view(&long, Some("-# 🔧 Read · a.rs"));
        assert!(chars(&v) <= MESSAGE_LIMIT);
        assert!(v.starts_with("…\n"));
        assert!(v.ends_with("\n-# 🔧 Read · a.rs"));
    }

    #[test]
    fn final_messages_carry_the_footer_last() {
        let f = footer(3, 0.01234);
        assert_eq!(f, "-# 3 turns · $0.0123");
        assert_eq!(footer(1, 0.0), "-# 1 turn · $0.0000");
        assert_eq!(context_part(Some(420_000), Some(1_000_000)), " · ctx 42%");
        assert_eq!(context_part(Some(5), None), "");
        assert_eq!(context_part(Some(5), Some(0)), "");
        assert_eq!(final_messages("Hi", Some(&f)), vec![format!("Hi\n\n{f}")]);
        assert_eq!(final_messages("Hi", None), vec!["Hi".to_string()]);
        assert_eq!(final_messages(" ", None), vec!["(no answer)".to_string()]);
    }

    #[test]
    fn a_very_long_answer_can_come_as_a_file() {
        let long = "word ".repeat(3000);
        assert!(matches!(final_reply(&long, None, 0), Final::Messages(m) if m.len() == 8));
        let Final::File { preview, file } = final_reply(&long, Some("-# f"), 10_000) else {
            panic!("not a file");
        };
        assert_eq!(file, long);
        assert!(chars(&preview) <= MESSAGE_LIMIT);
        assert!(preview.starts_with("word word"));
        assert!(preview.ends_with("…\n-# The whole answer is attached (answer.md).\n-# f"));
        assert!(matches!(final_reply("short", None, 10), Final::Messages(_)));
    }

    #[test]
    fn tool_lines_are_compact_and_one_line() {
        assert_eq!(tool_line("Bash", "ls\n-la"), "-# 🔧 Bash · ls -la");
        assert_eq!(tool_line("Read", ""), "-# 🔧 Read");
        assert!(chars(&tool_line("X", &"y".repeat(500))) < 100);
    }

    #[test]
    fn thread_names_are_short_and_never_empty() {
        assert_eq!(thread_name("  \n Fix the build\nplease"), "Fix the build");
        assert_eq!(thread_name(""), "Claude");
        let long = thread_name(&"word ".repeat(50));
        assert!(chars(&long) <= THREAD_NAME_LIMIT);
        assert!(long.ends_with("word…"), "{long}");
    }

    #[test]
    fn throttle_coalesces_to_one_edit_per_interval() {
        let t0 = Instant::now();
        let mut t = Throttle::new(Duration::from_secs(1));
        assert_eq!(t.next_at(t0), t0);
        t.sent(t0);
        assert_eq!(
            t.next_at(t0 + Duration::from_millis(300)),
            t0 + Duration::from_secs(1)
        );
        let later = t0 + Duration::from_secs(2);
        assert_eq!(t.next_at(later), later);
    }

    #[test]
    fn cancelled_keeps_what_was_said() {
        assert_eq!(cancelled(""), "⏹️ Stopped.");
        assert_eq!(cancelled("Half an"), "Half an\n-# ⏹️ Stopped.");
    }
}
