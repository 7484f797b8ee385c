//! RabbitMQ: the connection and the topology every name derives from
//! (`connection`), and the way events and dead letters leave (`publish`,
//! and `lane` for a job's pipelined events; `announce` for what workers
//! tell one another of accepted jobs).
//! Knows the wire protocol's types but nothing of the worker or the store.

pub mod announce;
pub mod attribution;
pub mod connection;
pub mod lane;
pub mod publish;

pub use connection::*;
