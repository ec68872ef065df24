//! The delivery core: the pipeline (ordering, settlement, positions) and the dispatcher (retries, the idempotency
//! guard, dead letters). What makes "exactly one provisioning job" true, on top of `state` and `sinks`.

pub mod counters;
pub mod dispatch;
pub mod pipeline;
