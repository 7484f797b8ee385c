//! The test world shared by the integration tests (`tests/it`) and the
//! benches (`benches/*.rs` include it with `#[path]`): the mock Messages
//! API, running the real CLI, and the pieces of a world (`world`).
// Each includer uses a different part of it.
#![allow(dead_code)]

pub mod broker_node;
pub mod fake_discord;
pub mod mock_api;
pub mod pg_node;
pub mod storm;
pub mod support;
pub mod tap;
pub mod world;
