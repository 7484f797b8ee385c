//! claude-worker: prompt jobs from RabbitMQ → durable sessions → the Claude
//! Code CLI → streamed reply events. See ARCHITECTURE.md for the map.

pub mod accept;
pub mod amqp;
pub mod client;
pub mod config;
pub mod consume;
pub mod context;
pub mod control;
pub mod drive;
pub mod protocol;
pub mod publish;
pub mod retry;
pub mod schedule;
pub mod store;
pub mod transcript;
pub mod turn;
pub mod warm;
pub mod worker;
