//! Rust types, client and server generated from proto/pubsub_api.proto by build.rs (package `eventbus.v1`).
#![allow(clippy::all, clippy::pedantic)] // generated code: its lints are not ours to fix

tonic::include_proto!("eventbus.v1");
