//! claude-worker: prompt jobs from RabbitMQ → durable sessions → the Claude
//! Code CLI → streamed reply events. See ARCHITECTURE.md for the map.
//!
//! The data path reads as the folders: `broker` (connection, topology,
//! publishing) → `worker` (accept, schedule, turn, control) → `claude` (the
//! only spawner) → `broker`. `protocol` and `client` are the API boundary
//! front-ends build on; `store` owns jobs and sessions; `config` is read
//! once at start-up.

pub mod broker;
pub(crate) mod claude;
pub mod client;
pub mod config;
pub mod logging;
pub mod ops;
pub mod protocol;
pub mod relay;
pub mod store;
pub mod worker;

pub use claude::{session_dir, WarmStats, STREAM_JSON_ARGS};
