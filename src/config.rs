//! Layered configuration: `config/default.toml` (compiled in) → an optional
//! file → `CLAUDE_WORKER__SECTION__KEY` environment variables, into typed
//! settings that are validated at start-up with messages a user can act on.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::protocol::{JobOptions, PermissionMode};

/// The defaults shipped in the repository, compiled in so the binary runs
/// from any directory.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Env var naming an extra config file (an alternative to `--config`).
pub const CONFIG_FILE_ENV: &str = "CLAUDE_WORKER_CONFIG";

/// A value that must never reach logs, events or errors.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

/// Serialising writes the value: only for writing a configuration file
/// (the tests write worker configs from typed `Settings`). `Debug` never
/// shows it.
impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The raw value, for the one place that needs it (a connect call).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// A URL that may carry a password: shown with the password masked.
/// [`redact_url`] without the query string either (a Postgres URL may
/// carry `?password=…`): for messages naming a database.
pub fn redact_db_url(url: &str) -> String {
    match url.split_once('?') {
        Some((base, _)) => format!("{}?…", redact_url(base)),
        None => redact_url(url),
    }
}

pub fn redact_url(url: &str) -> String {
    // scheme://user:pass@host -> scheme://user:***@host
    if let Some((scheme, rest)) = url.split_once("://") {
        if let Some((userinfo, host)) = rest.rsplit_once('@') {
            let user = userinfo.split(':').next().unwrap_or("");
            return format!("{scheme}://{user}:***@{host}");
        }
    }
    url.to_string()
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub amqp: AmqpSettings,
    pub database: DatabaseSettings,
    pub worker: WorkerSettings,
    pub claude: ClaudeSettings,
    pub retry: RetrySettings,
    pub log: LogSettings,
    pub ops: OpsSettings,
    pub profiles: BTreeMap<String, Profile>,
    /// The Discord relay (`claude-worker discord`); the worker ignores it.
    pub discord: DiscordSettings,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSettings {
    pub url: Secret,
    pub prefix: String,
    pub jobs_routing_key: String,
    pub prefetch: u16,
    pub publish_timeout_ms: u64,
    pub recovery_limit_secs: u64,
    /// Confirm channels the jobs' event lanes are spread over.
    pub publish_channels: usize,
    /// Events a job may have unconfirmed before it waits for confirms.
    pub max_unconfirmed_events: usize,
    /// Text deltas arriving within this long of the last published text
    /// event are joined into one event (0: every delta is an event).
    pub text_coalesce_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    pub url: Secret,
    pub max_connections: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    pub id: String,
    pub max_concurrent_turns: usize,
    pub lease_ttl_secs: u64,
    pub sweep_interval_secs: u64,
    pub shutdown_grace_secs: u64,
    /// After a turn, a worker holding the session's CLI warm keeps the
    /// session's lease this long, so a follow-up job runs here warm rather
    /// than cold elsewhere. 0: release at once.
    pub warm_affinity_ms: u64,
    /// How often the fleet runs the retention prune (one worker at a time,
    /// under a database lease; see the README's "Operating").
    #[serde(default = "default_prune_interval_secs")]
    pub prune_interval_secs: u64,
    /// Rows of each kind one prune step deletes at most.
    #[serde(default = "default_prune_batch")]
    pub prune_batch: i64,
}

fn default_prune_interval_secs() -> u64 {
    3_600
}

fn default_prune_batch() -> i64 {
    500
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClaudeSettings {
    pub path: PathBuf,
    pub turn_timeout_secs: u64,
    pub env_passthrough: Vec<String>,
    /// CLI processes kept alive between a session's turns on this worker
    /// (see `warm`); 0 disables warm reuse.
    pub warm_max_processes: usize,
    /// A warm process idle this long is closed.
    pub warm_idle_ttl_secs: u64,
    /// Largest session transcript (uncompressed JSONL) stored in the
    /// database after a turn; a larger one is not stored (the previous copy
    /// stays) and a warning is logged.
    pub transcript_max_bytes: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySettings {
    pub max_attempts: u32,
    pub min_delay_ms: u64,
    pub max_delay_ms: u64,
    pub max_total_secs: u64,
    pub jitter: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
}

/// The admin HTTP port (`src/ops`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OpsSettings {
    /// `host:port` for `/metrics`, `/healthz` and `/readyz`; empty: off.
    pub listen: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Which conversations share a Claude session in the Discord relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DiscordScope {
    /// One session per user in each channel (`discord:<channel>:<user>`).
    ChannelUser,
    /// One session per channel, shared by everyone in it.
    Channel,
    /// One session per thread (a channel outside a thread counts as one).
    Thread,
}

/// `[discord]`: the relay's settings (see config/default.toml).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DiscordSettings {
    /// Environment variable holding the bot token.
    pub token_env: String,
    /// A file holding the bot token (wins over `token_env`).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Name of the relay's durable reply queue (`<prefix>.replies.<name>`)
    /// and the routing key its jobs reply with (`discord.<name>`).
    pub queue_name: String,
    pub profile: String,
    /// Empty lists allow all.
    pub allowed_guilds: Vec<u64>,
    pub allowed_channels: Vec<u64>,
    pub allowed_users: Vec<u64>,
    pub allowed_roles: Vec<u64>,
    /// Members with one of these roles may answer anyone's permission
    /// prompts (the conversation's user always may).
    #[serde(default)]
    pub prompt_roles: Vec<u64>,
    /// Answer direct messages (the user allow-list still applies).
    pub dms: bool,
    pub scope: DiscordScope,
    /// Open a thread per conversation started by a mention in a channel.
    pub threads: bool,
    /// Least time between two edits of one message.
    pub edit_interval_ms: u64,
    /// Typing indicator re-sent this often while waiting (it lasts 10 s).
    pub typing_interval_ms: u64,
    /// Footer under a completed answer: turns, cost.
    pub footer: bool,
    /// Answers longer than this many characters are attached as a file
    /// (`answer.md`) under a preview, instead of split; 0: always split.
    pub answer_file_above: usize,
    /// Register the slash commands at start-up.
    pub register_commands: bool,
    /// Register them in this guild only (instant; for development).
    #[serde(default)]
    pub commands_guild: Option<u64>,
    /// Bound of one Discord REST request, retries included.
    pub request_timeout_ms: u64,
    /// Gateway and REST elsewhere than Discord (a gateway proxy; tests).
    #[serde(default)]
    pub gateway_url: Option<String>,
    /// `host:port` of a plain-HTTP REST proxy (e.g. twilight-http-proxy).
    #[serde(default)]
    pub http_proxy: Option<String>,
}

impl DiscordSettings {
    /// The routing key the relay's jobs reply with.
    pub fn reply_key(&self) -> String {
        format!("discord.{}", self.queue_name)
    }

    fn validate(&self) -> Result<(), String> {
        let ok_name = !self.queue_name.is_empty()
            && self.queue_name.len() <= 100
            && self
                .queue_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !ok_name {
            return Err("discord.queue_name must be 1-100 of A-Z a-z 0-9 - _".into());
        }
        if self.edit_interval_ms < 200 || self.typing_interval_ms < 1000 {
            return Err(
                "discord.edit_interval_ms must be at least 200 and typing_interval_ms at least 1000"
                    .into(),
            );
        }
        if self.request_timeout_ms == 0 {
            return Err("discord.request_timeout_ms must be at least 1".into());
        }
        if self.prompt_roles.len() > 100 || self.prompt_roles.contains(&0) {
            return Err(
                "discord.prompt_roles must be at most 100 role ids (Discord ids, not 0)".into(),
            );
        }
        Ok(())
    }
}

/// What a job may do, chosen by name. Jobs may only narrow these.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Root directory; each session works in its own directory below it.
    pub workdir: PathBuf,
    /// Mode used when the job does not ask for one.
    pub permission_mode: PermissionMode,
    /// The most permissive mode a job may ask for.
    pub max_permission_mode: PermissionMode,
    pub max_turns: u32,
    pub max_turns_cap: u32,
    #[serde(default)]
    pub allowed_tools: Vec<String>,
    #[serde(default)]
    pub disallowed_tools: Vec<String>,
    /// Default model; `None` leaves it to the CLI.
    #[serde(default)]
    pub model: Option<String>,
    /// Models a job may pick; empty allows any.
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub extra_args: Vec<String>,
    /// Double-texting policy for jobs that do not set `options.on_busy`.
    #[serde(default)]
    pub on_busy: crate::protocol::OnBusy,
    /// Extra environment for the CLI. Values are secrets (API keys live here).
    #[serde(default)]
    pub env: BTreeMap<String, Secret>,
    /// Whether a job may `resume` or `fork` a Claude session id that
    /// belongs to another session key. Off by default: whoever learned an
    /// id could otherwise read that conversation by resuming it.
    #[serde(default)]
    pub resume_other_sessions: bool,
    /// AMQP users allowed to use this profile (the `user_id` property,
    /// which RabbitMQ checks against the publishing connection's user);
    /// empty: anyone who may publish.
    #[serde(default)]
    pub allowed_user_ids: Vec<String>,
    /// The model the CLI falls back to when the main one is overloaded
    /// (`--fallback-model`); not passed when a turn's model is this one.
    #[serde(default)]
    pub fallback_model: Option<String>,
    /// Budgets (see the README): per-turn cost cap, per-session lifetime
    /// budget, per-identity budget over a window.
    #[serde(default)]
    pub budget: BudgetSettings,
    /// Compact a session before its next job once its context use (of the
    /// model's window) reaches this percentage (1-99); unset: only the
    /// CLI's own autocompact and jobs that ask (`options.compact`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compact_at_percent: Option<u8>,
    /// After a failed compaction, threshold compaction of that session
    /// waits this long (or until its context grew by a tenth of the
    /// window): each try is a summary request of the whole context.
    #[serde(default = "default_compact_retry_secs")]
    pub compact_retry_secs: u64,
    /// A session with no activity this long is marked idle
    /// (`session.idle`, its warm CLI process closed); it stays resumable.
    #[serde(default = "default_idle_ttl_secs")]
    pub idle_ttl_secs: u64,
    /// How long finished jobs, stored transcripts and the CLI's transcript
    /// files are kept after their last activity; a session quiet this long
    /// is forgotten (`session.ended`, reason `expired`).
    #[serde(default = "default_retention_secs")]
    pub retention_secs: u64,
    /// Whether a tool call that needs approval goes to a person
    /// (`ask`: a `permission_request` event, answered by a
    /// `permission_response` control message) or is denied at once
    /// (`deny`, the CLI's own behaviour without a prompt tool).
    #[serde(default)]
    pub permission_prompts: PermissionPrompts,
    /// How long a person has to answer a prompt; then it is denied.
    #[serde(default = "default_permission_timeout_secs")]
    pub permission_timeout_secs: u64,
}

fn default_compact_retry_secs() -> u64 {
    900
}

fn default_idle_ttl_secs() -> u64 {
    1_800
}

fn default_retention_secs() -> u64 {
    30 * 86_400
}

/// Who answers a tool call that needs approval.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PermissionPrompts {
    /// Denied without asking anyone.
    #[default]
    Deny,
    /// Asked through the queue.
    Ask,
}

fn default_permission_timeout_secs() -> u64 {
    300
}

/// A profile's budgets, in USD. Unset: no limit.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetSettings {
    /// Cost cap of one turn (the CLI's `--max-budget-usd`); a job may ask
    /// for less (`options.max_budget_usd`). A turn that reaches it fails
    /// with `max_budget`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turn_usd: Option<f64>,
    /// What a session key's turns may cost in all; a job of a session past
    /// it fails at once with `budget_exceeded`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_usd: Option<f64>,
    /// What the jobs of one `identity` may cost per window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_usd: Option<f64>,
    /// The identity budget's window, in seconds; windows are aligned to
    /// the Unix epoch (86400: UTC days).
    #[serde(default = "default_window_secs")]
    pub identity_window_secs: u64,
    /// A turn that crosses the session or identity budget mid-way:
    /// `finish` lets it finish (the next job is refused); `stop` caps the
    /// turn at what is left (it ends `max_budget`).
    #[serde(default)]
    pub overrun: BudgetOverrun,
}

fn default_window_secs() -> u64 {
    86_400
}

impl Default for BudgetSettings {
    fn default() -> Self {
        BudgetSettings {
            turn_usd: None,
            session_usd: None,
            identity_usd: None,
            identity_window_secs: default_window_secs(),
            overrun: BudgetOverrun::Finish,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetOverrun {
    #[default]
    Finish,
    Stop,
}

/// Options of one turn after the job's wishes were checked against its profile.
#[derive(Debug, Clone, PartialEq)]
pub struct EffectiveOptions {
    pub model: Option<String>,
    pub max_turns: u32,
    pub permission_mode: PermissionMode,
    pub on_busy: crate::protocol::OnBusy,
    /// Per-turn cost cap (`--max-budget-usd`).
    pub max_budget_usd: Option<f64>,
}

impl Profile {
    /// Narrows the profile by a job's options; an option beyond the
    /// profile's caps is an error the producer can fix.
    pub fn resolve(&self, name: &str, opts: &JobOptions) -> Result<EffectiveOptions, String> {
        let max_turns = match opts.max_turns {
            None => self.max_turns,
            Some(0) => return Err("`options.max_turns` must be at least 1".into()),
            Some(n) if n > self.max_turns_cap => {
                return Err(format!(
                    "`options.max_turns` {n} exceeds profile `{name}`'s cap of {}",
                    self.max_turns_cap
                ))
            }
            Some(n) => n,
        };
        let permission_mode = match opts.permission_mode {
            None => self.permission_mode,
            Some(m) if m > self.max_permission_mode => {
                return Err(format!(
                    "`options.permission_mode` {m} is above profile `{name}`'s ceiling {}",
                    self.max_permission_mode
                ))
            }
            Some(m) => m,
        };
        let model = match &opts.model {
            None => self.model.clone(),
            Some(m) if m.is_empty() || m.starts_with('-') || m.len() > 200 => {
                return Err(format!("`options.model` {m:?} is not a model name"))
            }
            Some(m) if !self.models.is_empty() && !self.models.contains(m) => {
                return Err(format!(
                    "`options.model` {m:?} is not allowed by profile `{name}` (allowed: {})",
                    self.models.join(", ")
                ))
            }
            Some(m) => Some(m.clone()),
        };
        let cap = self.budget.turn_usd;
        let max_budget_usd = match (opts.max_budget_usd, cap) {
            (Some(b), _) if b <= 0.0 || !b.is_finite() => {
                return Err(format!("`options.max_budget_usd` {b} must be above 0"))
            }
            (Some(b), Some(cap)) if b > cap => {
                return Err(format!(
                    "`options.max_budget_usd` {b} exceeds profile `{name}`'s per-turn cap of {cap}"
                ))
            }
            (Some(b), _) => Some(b),
            (None, cap) => cap,
        };
        Ok(EffectiveOptions {
            model,
            max_turns,
            permission_mode,
            on_busy: opts.on_busy.unwrap_or(self.on_busy),
            max_budget_usd,
        })
    }
}

impl BudgetSettings {
    fn validate(&self, profile: &str) -> Result<(), ConfigError> {
        let amounts = [
            ("turn_usd", self.turn_usd),
            ("session_usd", self.session_usd),
            ("identity_usd", self.identity_usd),
        ];
        for (key, v) in amounts {
            if let Some(v) = v {
                if !(v > 0.0 && v.is_finite()) {
                    return Err(ConfigError::Invalid(format!(
                        "profiles.{profile}.budget.{key} must be a number of USD above 0 \
                         (got {v}); leave it out for no limit"
                    )));
                }
            }
        }
        if self.identity_window_secs < 60 {
            return Err(ConfigError::Invalid(format!(
                "profiles.{profile}.budget.identity_window_secs must be at least 60 (got {}); \
                 86400 is a UTC day",
                self.identity_window_secs
            )));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("could not load configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Settings {
    /// Loads defaults, then `file` (or `$CLAUDE_WORKER_CONFIG`), then the
    /// environment, and validates the result.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        let env_file = std::env::var_os(CONFIG_FILE_ENV).map(PathBuf::from);
        let file = file.map(Path::to_path_buf).or(env_file);
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        if let Some(path) = &file {
            if !path.exists() {
                return Err(ConfigError::Invalid(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            builder = builder.add_source(config::File::from(path.as_path()));
        }
        builder = builder.add_source(
            config::Environment::with_prefix("CLAUDE_WORKER")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("claude.env_passthrough")
                .with_list_parse_key("discord.allowed_guilds")
                .with_list_parse_key("discord.allowed_channels")
                .with_list_parse_key("discord.allowed_users")
                .with_list_parse_key("discord.allowed_roles")
                .with_list_parse_key("discord.prompt_roles"),
        );
        let settings: Settings = builder.build()?.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    /// Parses a complete TOML document on top of the defaults (for tests
    /// and embedding), without reading the environment.
    pub fn from_toml_overrides(toml: &str) -> Result<Settings, ConfigError> {
        let settings: Settings = config::Config::builder()
            .add_source(config::File::from_str(
                DEFAULT_TOML,
                config::FileFormat::Toml,
            ))
            .add_source(config::File::from_str(toml, config::FileFormat::Toml))
            .build()?
            .try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let url = self.database.url.expose();
        if !(url.starts_with("sqlite:")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://"))
        {
            return bad(format!(
                "database.url must start with sqlite: or postgres:// (got {})",
                redact_db_url(url)
            ));
        }
        let amqp = self.amqp.url.expose();
        if !(amqp.starts_with("amqp://") || amqp.starts_with("amqps://")) {
            return bad(format!(
                "amqp.url must start with amqp:// or amqps:// (got {})",
                redact_url(amqp)
            ));
        }
        if self.amqp.prefix.is_empty() || self.amqp.prefix.len() > 200 {
            return bad("amqp.prefix must be 1-200 characters".into());
        }
        if self.worker.id.len() > 200 {
            return bad(format!(
                "worker.id must be at most 200 bytes (got {}): it is part of the worker's AMQP \
                 routing key and consumer tags, which RabbitMQ limits to 255",
                self.worker.id.len()
            ));
        }
        if self.amqp.prefetch == 0 {
            return bad("amqp.prefetch must be at least 1".into());
        }
        if !(1..=64).contains(&self.amqp.publish_channels) {
            return bad(format!(
                "amqp.publish_channels must be 1-64 (got {})",
                self.amqp.publish_channels
            ));
        }
        if !(1..=10_000).contains(&self.amqp.max_unconfirmed_events) {
            return bad(format!(
                "amqp.max_unconfirmed_events must be 1-10000 (got {})",
                self.amqp.max_unconfirmed_events
            ));
        }
        if self.amqp.text_coalesce_ms > 1_000 {
            return bad(format!(
                "amqp.text_coalesce_ms must be at most 1000 (got {}); it delays what the user sees",
                self.amqp.text_coalesce_ms
            ));
        }
        if self.amqp.publish_timeout_ms == 0 || self.amqp.recovery_limit_secs == 0 {
            return bad(
                "amqp.publish_timeout_ms and amqp.recovery_limit_secs must be at least 1".into(),
            );
        }
        if self.worker.max_concurrent_turns == 0 {
            return bad("worker.max_concurrent_turns must be at least 1".into());
        }
        if self.worker.lease_ttl_secs < 2 {
            return bad(
                "worker.lease_ttl_secs must be at least 2 (heartbeats renew it every third)".into(),
            );
        }
        if self.worker.prune_interval_secs == 0 || self.worker.prune_batch < 1 {
            return bad(
                "worker.prune_interval_secs and worker.prune_batch must be at least 1".into(),
            );
        }
        for (name, p) in &self.profiles {
            if p.idle_ttl_secs == 0 || p.retention_secs < p.idle_ttl_secs {
                return bad(format!(
                    "profiles.{name}: idle_ttl_secs must be at least 1 and retention_secs at \
                     least idle_ttl_secs (got {} and {})",
                    p.idle_ttl_secs, p.retention_secs
                ));
            }
        }
        if self.worker.sweep_interval_secs == 0 {
            return bad("worker.sweep_interval_secs must be at least 1".into());
        }
        if self.claude.turn_timeout_secs == 0 {
            return bad("claude.turn_timeout_secs must be at least 1".into());
        }
        if self.claude.warm_max_processes > 0 && self.claude.warm_idle_ttl_secs == 0 {
            return bad(
                "claude.warm_idle_ttl_secs must be at least 1 (set claude.warm_max_processes = 0 \
                 to disable warm processes)"
                    .into(),
            );
        }
        if self.retry.max_attempts == 0 {
            return bad("retry.max_attempts must be at least 1 (the first attempt counts)".into());
        }
        if self.retry.min_delay_ms > self.retry.max_delay_ms {
            return bad("retry.min_delay_ms must not exceed retry.max_delay_ms".into());
        }
        if let Err(m) = self.discord.validate() {
            return bad(m);
        }
        if let Err(e) = self.ops_listen() {
            return bad(e);
        }
        if !self.profiles.contains_key("default") {
            return bad("profiles.default is missing: jobs without a profile use it".into());
        }
        for (name, p) in &self.profiles {
            if p.max_turns == 0 || p.max_turns > p.max_turns_cap {
                return bad(format!(
                    "profiles.{name}: max_turns ({}) must be between 1 and max_turns_cap ({})",
                    p.max_turns, p.max_turns_cap
                ));
            }
            if p.permission_mode > p.max_permission_mode {
                return bad(format!(
                    "profiles.{name}: permission_mode {} is above max_permission_mode {}",
                    p.permission_mode, p.max_permission_mode
                ));
            }
            p.budget.validate(name)?;
            if let Some(pct) = p.compact_at_percent {
                if !(1..=99).contains(&pct) {
                    return bad(format!(
                        "profiles.{name}: compact_at_percent ({pct}) must be between 1 and 99"
                    ));
                }
            }
            if !(5..=86_400).contains(&p.permission_timeout_secs) {
                return Err(ConfigError::Invalid(format!(
                    "profiles.{name}.permission_timeout_secs must be 5-86400 (got {})",
                    p.permission_timeout_secs
                )));
            }
            if let Some(f) = &p.fallback_model {
                if f.is_empty() || f.starts_with('-') || p.model.as_ref() == Some(f) {
                    return bad(format!(
                        "profiles.{name}: fallback_model {f:?} must be a model name other than \
                         the profile's model (the CLI refuses a fallback equal to the main model)"
                    ));
                }
            }
            if let Some(m) = &p.model {
                if !p.models.is_empty() && !p.models.contains(m) {
                    return bad(format!(
                        "profiles.{name}: model {m:?} is not in its `models` list"
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn lease_ttl(&self) -> Duration {
        Duration::from_secs(self.worker.lease_ttl_secs)
    }
    pub fn sweep_interval(&self) -> Duration {
        Duration::from_secs(self.worker.sweep_interval_secs)
    }
    pub fn turn_timeout(&self) -> Duration {
        Duration::from_secs(self.claude.turn_timeout_secs)
    }
    /// The admin port's address; `None` when it is off.
    pub fn ops_listen(&self) -> Result<Option<std::net::SocketAddr>, String> {
        let listen = self.ops.listen.trim();
        if listen.is_empty() {
            return Ok(None);
        }
        listen.parse().map(Some).map_err(|_| {
            format!(
                "ops.listen must be an IP address and port such as 127.0.0.1:9464 \
                 (got {listen:?}), or empty to turn the admin port off"
            )
        })
    }
    pub fn warm_idle_ttl(&self) -> Duration {
        Duration::from_secs(self.claude.warm_idle_ttl_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_round_trip_through_toml() {
        // Tests and benches write worker configs from typed Settings.
        let mut s = Settings::from_toml_overrides("").unwrap();
        s.amqp.prefix = "rt".into();
        s.profiles
            .get_mut("default")
            .unwrap()
            .env
            .insert("K".into(), Secret::new("v"));
        let text = toml::to_string(&s).unwrap();
        let back = Settings::from_toml_overrides(&text).unwrap();
        assert_eq!(toml::to_string(&back).unwrap(), text);
        assert_eq!(back.profiles["default"].env["K"].expose(), "v");
        assert!(
            !format!("{back:?}").contains("\"v\""),
            "Debug shows a secret"
        );
    }

    #[test]
    fn defaults_load_and_ship_three_profiles() {
        let s = Settings::from_toml_overrides("").unwrap();
        assert_eq!(s.profiles["discord"].max_turns, 100);
        assert_eq!(
            s.profiles["discord"].permission_mode,
            PermissionMode::AcceptEdits
        );
        assert_eq!(s.profiles["webapp"].max_turns, 200);
        assert_eq!(s.profiles["webapp"].permission_mode, PermissionMode::Plan);
        assert!(s.profiles.contains_key("default"));
    }

    #[test]
    fn job_options_are_narrowed_not_widened() {
        let s = Settings::from_toml_overrides("").unwrap();
        let p = &s.profiles["webapp"];
        let too_many = JobOptions {
            max_turns: Some(201),
            ..Default::default()
        };
        assert!(p
            .resolve("webapp", &too_many)
            .unwrap_err()
            .contains("cap of 200"));
        let too_free = JobOptions {
            permission_mode: Some(PermissionMode::AcceptEdits),
            ..Default::default()
        };
        assert!(p
            .resolve("webapp", &too_free)
            .unwrap_err()
            .contains("ceiling plan"));
        let ok = JobOptions {
            max_turns: Some(5),
            ..Default::default()
        };
        assert_eq!(p.resolve("webapp", &ok).unwrap().max_turns, 5);
    }

    #[test]
    fn a_job_may_only_narrow_the_turn_cost_cap() {
        let mut s = Settings::from_toml_overrides("").unwrap();
        let p = s.profiles.get_mut("discord").unwrap();
        let ask = |usd| JobOptions {
            max_budget_usd: Some(usd),
            ..Default::default()
        };
        // No profile cap: any positive cap narrows "unlimited".
        assert_eq!(
            p.resolve("discord", &ask(3.0)).unwrap().max_budget_usd,
            Some(3.0)
        );
        assert_eq!(
            p.resolve("discord", &JobOptions::default())
                .unwrap()
                .max_budget_usd,
            None
        );
        p.budget.turn_usd = Some(0.5);
        assert_eq!(
            p.resolve("discord", &JobOptions::default())
                .unwrap()
                .max_budget_usd,
            Some(0.5)
        );
        assert_eq!(
            p.resolve("discord", &ask(0.25)).unwrap().max_budget_usd,
            Some(0.25)
        );
        let err = p.resolve("discord", &ask(0.75)).unwrap_err();
        assert!(err.contains("per-turn cap of 0.5"), "{err}");
    }

    #[test]
    fn budget_settings_are_validated_with_actionable_messages() {
        let err = Settings::from_toml_overrides("[profiles.default.budget]\nsession_usd = 0")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("profiles.default.budget.session_usd must be a number of USD above 0"),
            "{err}"
        );
        let err = Settings::from_toml_overrides(
            "[profiles.default.budget]\nidentity_usd = 1.0\nidentity_window_secs = 5",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("identity_window_secs must be at least 60"),
            "{err}"
        );
        let err = Settings::from_toml_overrides(
            "[profiles.default]\nmodel = \"sonnet\"\nfallback_model = \"sonnet\"",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("fallback_model \"sonnet\" must be a model name other than"),
            "{err}"
        );
        let err = Settings::from_toml_overrides("[profiles.default.budget]\noverrun = \"later\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("later"), "{err}");
        let ok = Settings::from_toml_overrides(
            "[profiles.discord.budget]\nturn_usd = 0.5\nsession_usd = 5.0\nidentity_usd = 2.0\noverrun = \"stop\"",
        )
        .unwrap();
        let b = &ok.profiles["discord"].budget;
        assert_eq!(
            (b.identity_window_secs, b.overrun),
            (86_400, BudgetOverrun::Stop)
        );
    }

    #[test]
    fn a_worker_id_too_long_for_amqp_is_refused() {
        let mut s = Settings::from_toml_overrides("").unwrap();
        s.worker.id = "w".repeat(200);
        assert!(s.validate().is_ok());
        s.worker.id = "w".repeat(201);
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("worker.id must be at most 200 bytes"), "{e}");
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("postgres://u:hunter2@h/db");
        assert!(!format!("{s:?}").contains("hunter2"));
        assert_eq!(
            redact_url("amqp://guest:pw@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(
            redact_db_url("postgres://u@h:5432/db?password=pw&sslmode=require"),
            "postgres://u:***@h:5432/db?…"
        );
        assert_eq!(
            redact_db_url("postgres://u:pw@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(
            redact_db_url("sqlite:/var/lib/w.db"),
            "sqlite:/var/lib/w.db"
        );
    }

    #[test]
    fn discord_prompt_roles_default_empty_and_are_validated() {
        let s = Settings::from_toml_overrides("").unwrap();
        assert!(s.discord.prompt_roles.is_empty());
        let s = Settings::from_toml_overrides("[discord]\nprompt_roles = [5, 6]").unwrap();
        assert_eq!(s.discord.prompt_roles, [5, 6]);
        let err = Settings::from_toml_overrides("[discord]\nprompt_roles = [0]")
            .unwrap_err()
            .to_string();
        assert!(err.contains("discord.prompt_roles"), "{err}");
    }

    #[test]
    fn the_admin_port_is_off_by_default_and_validated() {
        let s = Settings::from_toml_overrides("").unwrap();
        assert_eq!(s.ops_listen(), Ok(None));
        let s = Settings::from_toml_overrides("[ops]\nlisten = \"127.0.0.1:9464\"").unwrap();
        assert_eq!(s.ops_listen(), Ok(Some("127.0.0.1:9464".parse().unwrap())));
        let err = Settings::from_toml_overrides("[ops]\nlisten = \"localhost:9464\"")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ops.listen must be an IP address and port"),
            "{err}"
        );
    }

    #[test]
    fn invalid_settings_say_what_to_fix() {
        let err = Settings::from_toml_overrides("[retry]\nmax_attempts = 0").unwrap_err();
        assert!(err.to_string().contains("retry.max_attempts"), "{err}");
    }

    #[test]
    fn permission_prompts_default_to_deny_and_are_checked() {
        let s = Settings::from_toml_overrides("").unwrap();
        let p = &s.profiles["default"];
        assert_eq!(p.permission_prompts, PermissionPrompts::Deny);
        assert_eq!(p.permission_timeout_secs, 300);
        let s = Settings::from_toml_overrides(
            "[profiles.default]\npermission_prompts = \"ask\"\npermission_timeout_secs = 60",
        )
        .unwrap();
        assert_eq!(
            s.profiles["default"].permission_prompts,
            PermissionPrompts::Ask
        );
        let err = Settings::from_toml_overrides("[profiles.default]\npermission_timeout_secs = 1")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("permission_timeout_secs must be 5-86400"),
            "{err}"
        );
        let err =
            Settings::from_toml_overrides("[profiles.default]\npermission_prompts = \"maybe\"")
                .unwrap_err()
                .to_string();
        assert!(err.contains("maybe"), "{err}");
    }
}
