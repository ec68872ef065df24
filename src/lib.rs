#![recursion_limit = "256"]
//! switchyard: routes Salesforce change events to side effects by rules that operators edit as files.
//!
//! Data flows one way: Source -> Router (`when`) -> Enricher -> Router (`guard`) -> Plan -> Dispatcher ->
//! Sinks. ARCHITECTURE.md maps the folders onto that picture and says what each may import; DESIGN.md has the
//! contracts and README.md the rule language.
#![forbid(unsafe_code)]

// Leaves: imported by many, importing none of the parts below.
pub mod clock;
pub mod diag;
pub mod event;
pub mod failure;
pub mod hex;
pub mod plan;

// Configuration and observability.
pub mod config;
pub mod obs;

// The rule language and the pure router.
pub mod router;
pub mod rules;

// Stores, sinks, sources and Salesforce I/O.
pub mod auth;
pub mod enrich;
pub mod sinks;
pub mod sources;
pub mod state;

// The delivery core, authoring tools, the service and the emulator.
pub mod app;
pub mod authoring;
pub mod delivery;
pub mod emulator;
