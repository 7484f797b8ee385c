//! Integration tests, one binary (`cargo test --test it`).

mod store;
