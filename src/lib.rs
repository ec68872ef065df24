//! switchyard: routes Salesforce change events to side effects by rules that operators edit as files.
//!
//! Data flows one way: Source -> Router (`when`) -> Enricher -> Router (`guard`) -> Plan -> Dispatcher ->
//! Sinks. See DESIGN.md for the architecture and README.md for the rule language.
#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod diag;
pub mod dispatch;
pub mod emulator;
pub mod enrich;
pub mod event;
pub mod explain;
pub mod http;
pub mod idempotency;
pub mod lease;
pub mod logging;
pub mod metrics;
pub mod pipeline;
pub mod plan;
pub mod record;
pub mod reload;
pub mod replay;
pub mod router;
pub mod rules;
pub mod schema;
pub mod service;
pub mod sinks;
pub mod sources;
