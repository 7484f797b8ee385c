//! Integration tests, one binary (`cargo test --test it`). Fixtures:
//! `mock_api` (the Anthropic Messages API), `support` (running the real
//! CLI), `harness` (an isolated world per test: AMQP prefix, database,
//! temp dirs, a worker).

mod bad_input;
mod control;
mod fleet;
mod harness;
mod logging;
mod mock_api;
mod mock_selftest;
mod pipeline;
mod producers;
mod schema;
mod secrets;
mod store;
mod submit;
mod supervise;
mod support;
mod tidy;
mod turn_bounds;
mod warm;
