//! Which Discord messages the relay answers, and as which session: pure
//! decisions over the facts of a message and the `[discord]` settings.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{DiscordScope, DiscordSettings};

/// What the relay needs to know of an incoming message.
#[derive(Debug, Clone, Default)]
pub struct Facts<'a> {
    pub author_id: u64,
    pub author_is_bot: bool,
    pub guild_id: Option<u64>,
    pub channel_id: u64,
    /// The channel a thread the relay opened belongs to (for the channel
    /// allow-list); `None` outside such a thread.
    pub own_thread_parent: Option<u64>,
    pub role_ids: &'a [u64],
    pub mentions_bot: bool,
    pub content: &'a str,
    /// The message carries files (a prompt may then be only them).
    pub has_attachments: bool,
}

/// The prompt of a message that is only attachments.
pub const ATTACHMENTS_ONLY_PROMPT: &str = "Please look at the attached file(s).";

/// A command typed as text (`@bot /reset`), for where slash commands are
/// not registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextCommand {
    Reset,
    Stop,
    Status,
    Mode(String),
    /// Compact the conversation; `user` (the author) is the job's identity,
    /// so a compaction counts against their budget like their prompts.
    Compact {
        user: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Not for the relay: no reply, nothing published.
    Ignore,
    Prompt(String),
    Command(TextCommand),
}

/// Whether the settings' allow-lists let this author act here. Empty
/// lists allow all; roles are only asked of guild members.
pub fn allowed(s: &DiscordSettings, f: &Facts<'_>) -> bool {
    let listed = |list: &[u64], id: u64| list.is_empty() || list.contains(&id);
    let Some(guild) = f.guild_id else {
        return s.dms && listed(&s.allowed_users, f.author_id);
    };
    let channel = f.own_thread_parent.unwrap_or(f.channel_id);
    listed(&s.allowed_guilds, guild)
        && (listed(&s.allowed_channels, channel) || s.allowed_channels.contains(&f.channel_id))
        && listed(&s.allowed_users, f.author_id)
        && (s.allowed_roles.is_empty() || f.role_ids.iter().any(|r| s.allowed_roles.contains(r)))
}

/// Decides what to do with a message: bots (the relay included) are
/// ignored; in a guild the bot must be mentioned, unless the message is in
/// a thread the relay opened; DMs only when enabled.
pub fn judge(s: &DiscordSettings, bot_id: u64, f: &Facts<'_>) -> Verdict {
    if f.author_is_bot || f.author_id == bot_id || !allowed(s, f) {
        return Verdict::Ignore;
    }
    let addressed = f.guild_id.is_none() || f.mentions_bot || f.own_thread_parent.is_some();
    if !addressed {
        return Verdict::Ignore;
    }
    let text = strip_mention(f.content, bot_id);
    if text.is_empty() {
        return if f.has_attachments {
            Verdict::Prompt(ATTACHMENTS_ONLY_PROMPT.into())
        } else {
            Verdict::Ignore
        };
    }
    match text_command(&text, f.author_id) {
        Some(cmd) => Verdict::Command(cmd),
        None => Verdict::Prompt(text),
    }
}

/// The message without mentions of the bot (`<@id>`, `<@!id>`), trimmed.
pub fn strip_mention(content: &str, bot_id: u64) -> String {
    content
        .replace(&format!("<@{bot_id}>"), "")
        .replace(&format!("<@!{bot_id}>"), "")
        .trim()
        .to_string()
}

fn text_command(text: &str, author: u64) -> Option<TextCommand> {
    let mut words = text.split_whitespace();
    let cmd = match words.next()? {
        "/reset" => TextCommand::Reset,
        "/compact" => TextCommand::Compact { user: author },
        "/stop" => TextCommand::Stop,
        "/status" => TextCommand::Status,
        "/mode" => TextCommand::Mode(words.next().unwrap_or("").to_string()),
        _ => return None,
    };
    Some(cmd)
}

/// The job identity of a Discord user (per-user budgets key on it).
pub fn identity(user: u64) -> String {
    format!("discord:user:{user}")
}

/// The session key of a conversation, by the configured scope.
pub fn session_key(scope: DiscordScope, guild: Option<u64>, channel: u64, user: u64) -> String {
    let guild = guild.map_or_else(|| "dm".to_string(), |g| g.to_string());
    match scope {
        DiscordScope::ChannelUser => format!("discord:{guild}:{channel}:{user}"),
        DiscordScope::Channel => format!("discord:{guild}:{channel}"),
        DiscordScope::Thread => format!("discord:{guild}:thread:{channel}"),
    }
}

/// What the relay keeps in a job's `metadata` (echoed by every event), so
/// any relay process can finish the reply: where it is and who asked.
/// Ids are strings, as Discord writes them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyMeta {
    #[serde(with = "id")]
    pub channel_id: u64,
    /// The placeholder reply the relay edits.
    #[serde(with = "id")]
    pub message_id: u64,
    #[serde(with = "id")]
    pub user_id: u64,
}

impl ReplyMeta {
    /// The metadata object: `{"discord": {...}}`.
    pub fn to_metadata(&self) -> Value {
        serde_json::json!({ "discord": self })
    }

    /// The relay's part of an event's metadata; `None` if it has none (the
    /// event is not for a Discord reply).
    pub fn from_metadata(metadata: &Value) -> Option<ReplyMeta> {
        serde_json::from_value(metadata.get("discord")?.clone()).ok()
    }
}

mod id {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(id: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&id.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    fn settings() -> DiscordSettings {
        Settings::from_toml_overrides("").unwrap().discord
    }

    fn facts(content: &str) -> Facts<'_> {
        Facts {
            author_id: 7,
            guild_id: Some(1),
            channel_id: 10,
            mentions_bot: true,
            content,
            ..Default::default()
        }
    }

    #[test]
    fn a_mention_is_a_prompt_without_the_mention() {
        let s = settings();
        let v = judge(&s, 99, &facts("<@99> hello <@!99> there"));
        assert_eq!(v, Verdict::Prompt("hello  there".into()));
    }

    #[test]
    fn bots_unaddressed_and_empty_messages_are_ignored() {
        let s = settings();
        let mut f = facts("<@99> hi");
        f.author_is_bot = true;
        assert_eq!(judge(&s, 99, &f), Verdict::Ignore);
        let mut f = facts("hi");
        f.mentions_bot = false;
        assert_eq!(judge(&s, 99, &f), Verdict::Ignore);
        assert_eq!(judge(&s, 99, &facts("<@99>  ")), Verdict::Ignore);
        let mut files = facts("<@99>");
        files.has_attachments = true;
        assert_eq!(
            judge(&s, 99, &files),
            Verdict::Prompt(ATTACHMENTS_ONLY_PROMPT.into())
        );
        let mut own = facts("<@99> me");
        own.author_id = 99;
        assert_eq!(judge(&s, 99, &own), Verdict::Ignore);
    }

    #[test]
    fn allow_lists_each_apply() {
        let mut s = settings();
        s.allowed_channels = vec![10];
        assert!(matches!(
            judge(&s, 99, &facts("<@99> a")),
            Verdict::Prompt(_)
        ));
        let mut other = facts("<@99> a");
        other.channel_id = 11;
        assert_eq!(judge(&s, 99, &other), Verdict::Ignore);
        // A thread the relay opened counts as its parent channel.
        other.own_thread_parent = Some(10);
        other.mentions_bot = false;
        assert!(matches!(judge(&s, 99, &other), Verdict::Prompt(_)));
        s.allowed_roles = vec![5];
        assert_eq!(judge(&s, 99, &facts("<@99> a")), Verdict::Ignore);
        let roles = [4, 5];
        let mut f = facts("<@99> a");
        f.role_ids = &roles;
        assert!(matches!(judge(&s, 99, &f), Verdict::Prompt(_)));
        s.allowed_users = vec![8];
        assert_eq!(judge(&s, 99, &f), Verdict::Ignore);
        s.allowed_guilds = vec![2];
        s.allowed_users = vec![];
        assert_eq!(judge(&s, 99, &f), Verdict::Ignore);
    }

    #[test]
    fn dms_only_when_enabled() {
        let mut s = settings();
        let mut f = facts("hi");
        f.guild_id = None;
        f.mentions_bot = false;
        assert_eq!(judge(&s, 99, &f), Verdict::Ignore);
        s.dms = true;
        assert_eq!(judge(&s, 99, &f), Verdict::Prompt("hi".into()));
    }

    #[test]
    fn text_commands() {
        let s = settings();
        let v = |t| judge(&s, 99, &facts(t));
        assert_eq!(v("<@99> /reset"), Verdict::Command(TextCommand::Reset));
        assert_eq!(v("<@99> /stop"), Verdict::Command(TextCommand::Stop));
        assert_eq!(v("<@99> /status"), Verdict::Command(TextCommand::Status));
        assert_eq!(
            v("<@99> /mode plan"),
            Verdict::Command(TextCommand::Mode("plan".into()))
        );
        assert_eq!(
            v("<@99> /compact"),
            Verdict::Command(TextCommand::Compact { user: 7 })
        );
        assert_eq!(v("<@99> /resetting"), Verdict::Prompt("/resetting".into()));
        assert_eq!(
            v("<@99> /compacting"),
            Verdict::Prompt("/compacting".into())
        );
    }

    #[test]
    fn session_keys_by_scope() {
        use DiscordScope::*;
        assert_eq!(session_key(ChannelUser, Some(1), 2, 3), "discord:1:2:3");
        assert_eq!(session_key(ChannelUser, None, 2, 3), "discord:dm:2:3");
        assert_eq!(session_key(Channel, Some(1), 2, 3), "discord:1:2");
        assert_eq!(session_key(Thread, Some(1), 2, 3), "discord:1:thread:2");
    }

    #[test]
    fn metadata_round_trips_with_string_ids() {
        let m = ReplyMeta {
            channel_id: 1,
            message_id: u64::MAX,
            user_id: 3,
        };
        let v = m.to_metadata();
        assert_eq!(v["discord"]["message_id"], u64::MAX.to_string());
        assert_eq!(ReplyMeta::from_metadata(&v), Some(m));
        assert_eq!(ReplyMeta::from_metadata(&serde_json::json!({})), None);
        let bad = serde_json::json!({"discord": {"channel_id": "x"}});
        assert_eq!(ReplyMeta::from_metadata(&bad), None);
    }
}
