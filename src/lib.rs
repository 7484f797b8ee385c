//! claude-worker: prompt jobs from RabbitMQ → durable sessions → the Claude
//! Code CLI → streamed reply events. See ARCHITECTURE.md for the map.

pub mod config;
pub mod protocol;
pub mod store;
pub mod amqp;
pub mod publish;
pub mod drive;
pub mod retry;
pub mod context;
pub mod turn;
pub mod schedule;
pub mod accept;
pub mod consume;
pub mod worker;
