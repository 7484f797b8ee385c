//! Integration tests, one binary (`cargo test --test it`). Fixtures come
//! from `tests/common` (shared with the benches): `mock_api` (the Anthropic
//! Messages API), `support` (running the real CLI), `world` (broker,
//! database, typed worker settings, worker processes); `harness` builds an
//! isolated world per test from them.

#[path = "../common/mod.rs"]
mod common;
pub(crate) use common::{mock_api, support};

mod accept_feed;
mod bad_input;
mod broker_recovery;
mod broker_restart;
mod budget;
mod context;
mod control;
mod fleet;
mod harness;
mod lifecycle;
mod logging;
mod mock_selftest;
mod ops;
mod pg_restart;
mod pipeline;
mod producers;
mod profile_limits;
mod prompts;
mod relay;
mod relay_prompts;
mod schema;
mod secrets;
mod store;
mod storm;
mod submit;
mod supervise;
mod tidy;
mod transcript;
mod turn_bounds;
mod warm;
