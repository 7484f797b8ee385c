//! Front-ends that relay chats to the workers through the queue. Each uses
//! only `client`, `protocol` and `config` (tests/it/tidy.rs checks).

pub mod discord;
