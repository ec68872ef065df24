//! A Pub/Sub payload decoded with the real OrderChangeEvent schema (Avro, then the changedFields/nulledFields/
//! diffFields bitmaps): any bytes give an event or a decode error, never a panic or a hang.
#![no_main]
use std::sync::{Arc, LazyLock};

use libfuzzer_sys::fuzz_target;
use switchyard::sources::pubsub::avro::{CompiledSchema, RawEvent};

static SCHEMA: LazyLock<Arc<CompiledSchema>> = LazyLock::new(|| {
    CompiledSchema::parse(include_str!("../../schemas/avro/OrderChangeEvent.avsc")).expect("the shipped schema parses")
});

fuzz_target!(|data: &[u8]| {
    let raw = RawEvent {
        event_id: "fuzz",
        schema_id: SCHEMA.fingerprint(),
        payload: data,
        replay_id: &[0, 0, 0, 1],
    };
    let _ = SCHEMA.decode("/data/OrderChangeEvent", &raw);
});
