//! Integration tests. Shared fixtures live in `mock_api` and `support`.

mod mock_api;
mod mock_selftest;
mod support;
