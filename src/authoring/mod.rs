//! What an admin runs on rule files before they reach production: `validate`, `test`, `explain`, `replay` and the
//! JSON Schemas. Built on the rule language and the pure router; no sink, source, state or delivery.

pub mod avro;
pub mod explain;
pub mod replay;
pub mod schema;
pub mod testing;
pub mod validate;
