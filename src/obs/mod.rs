//! Observability: metric names and the exporter (`metrics`), log output (`logging`), output that a closed pipe
//! cannot crash (`stdout`), what a stop waits for (`stage`). Imports no other part, so every part can report
//! through it.

pub mod logging;
pub mod metrics;
pub mod stage;
pub mod stdout;
