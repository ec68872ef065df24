//! Observability: metric names and the exporter (`metrics`), log output (`logging`). Imports no other part, so
//! every part can report through it.

pub mod logging;
pub mod metrics;
pub mod stdout;
