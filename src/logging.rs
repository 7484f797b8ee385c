//! Log output (see docs/LOGGING.md for what may be logged, and at which
//! level). The binary and the tests build the subscriber here.
//!
//! In the text format every field value and message is escaped: a control
//! character (a newline, a carriage return, an ANSI escape…) in a value
//! that came from outside — a session key, a job id, a decode error that
//! quotes the input — is written as an escape sequence, so it can neither
//! forge a log line nor colour a terminal. The JSON format escapes by
//! construction. Colours only on a terminal, and never with `NO_COLOR`.

use std::fmt::{self, Write as _};
use std::io::IsTerminal;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FormatFields, MakeWriter};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber: level from `RUST_LOG`, else
/// `default_level`; output on stderr.
pub fn init(format: LogFormat, default_level: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    tracing::subscriber::set_global_default(subscriber(format, filter, std::io::stderr, ansi))
        .expect("the subscriber is installed once, at start-up");
}

/// The subscriber [`init`] installs, writing to `writer`.
pub fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    writer: W,
    ansi: bool,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Json => Box::new(builder.json().finish()),
        LogFormat::Text => Box::new(builder.with_ansi(ansi).fmt_fields(EscapedFields).finish()),
    }
}

/// A short, stable reference to a session key for logs at info and above,
/// where the key itself (an end-user identifier such as a Discord user id)
/// must not appear: the same key always gives the same reference, so log
/// lines of one session can still be followed.
pub fn session_ref(session_key: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in session_key.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{:08x}", h >> 32)
}

/// Formats fields as `name=value`, values escaped (see the module doc).
struct EscapedFields;

impl<'writer> FormatFields<'writer> for EscapedFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut visitor = EscapingVisitor {
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct EscapingVisitor<'w> {
    writer: Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl EscapingVisitor<'_> {
    fn field(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        let sep = if self.first { "" } else { " " };
        self.first = false;
        self.result = if field.name() == "message" {
            write!(self.writer, "{sep}{}", Escaped(value))
        } else {
            write!(self.writer, "{sep}{}={}", field.name(), Escaped(value))
        };
    }
}

impl Visit for EscapingVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.field(field, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // `%value` arrives here too, through a Debug that prints Display.
        self.field(field, &format!("{value:?}"));
    }
}

/// A value with control characters (C0, DEL, C1, and the Unicode line and
/// paragraph separators) written as escapes.
struct Escaped<'a>(&'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            match c {
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                c if c.is_control() || c == '\u{2028}' || c == '\u{2029}' => {
                    write!(f, "\\u{{{:x}}}", c as u32)?
                }
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_control_characters_only() {
        let s = Escaped("a\nb\r\tc\u{1b}[31md\u{85}e\u{2028}é日").to_string();
        assert_eq!(s, "a\\nb\\r\\tc\\u{1b}[31md\\u{85}e\\u{2028}é日");
    }

    #[test]
    fn session_refs_are_stable_and_short() {
        assert_eq!(session_ref("discord:1:2"), session_ref("discord:1:2"));
        assert_ne!(session_ref("discord:1:2"), session_ref("discord:1:3"));
        assert_eq!(session_ref("x").len(), 8);
    }
}
