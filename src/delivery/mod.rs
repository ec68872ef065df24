//! The delivery core: the pipeline (ordering, settlement, positions) and the dispatcher (retries, the idempotency
//! guard, dead letters). What makes "exactly one provisioning job" true, on top of `state` and `sinks`.

mod counters;
mod dispatch;
pub mod journal;
mod pipeline;

pub use counters::{RouteCounters, register as register_series};
pub use dispatch::{ActionResult, Dispatcher, Paused};
pub use pipeline::{Pipeline, Stats};
