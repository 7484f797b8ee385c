//! The Claude Code CLI: the only module that spawns processes.
//!
//! `command` builds argv and environment, `process` runs one CLI (its own
//! process group, stdin/stdout stream-json, killed on drop), `stream`
//! parses its output, `paths` knows where it keeps files, and `warm` keeps
//! processes alive between a session's turns. This module knows nothing of
//! the broker or the database: the worker hands it plain values.

pub(crate) mod command;
pub(crate) mod cost;
pub(crate) mod paths;
pub(crate) mod process;
pub(crate) mod stream;
pub(crate) mod warm;

pub use command::STREAM_JSON_ARGS;
pub(crate) use command::{cli_args, cli_env, version, TurnRequest};
pub use paths::session_dir;
pub(crate) use paths::{config_dir, project_dir_name};
pub(crate) use process::CliProcess;
pub(crate) use stream::{summarize_tool_input, CliMessage, ToolPermissionRequest, TurnResult};
pub use warm::WarmStats;
