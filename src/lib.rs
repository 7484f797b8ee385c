//! claude-worker: prompt jobs from RabbitMQ → durable sessions → the Claude
//! Code CLI → streamed reply events. See ARCHITECTURE.md for the map.

pub mod config;
pub mod protocol;
pub mod store;
