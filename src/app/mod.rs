//! The running service and the CLI's bodies: start-up (`service`), HTTP, reloads, admin commands, `record`.
//! The top of the crate: it imports every part, and nothing but `main.rs` imports it.

pub mod admin;
pub mod cli;
pub mod http;
pub mod record;
pub mod reload;
pub mod service;
