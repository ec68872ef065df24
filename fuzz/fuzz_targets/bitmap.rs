//! The changedFields bitmap decoder on the OrderChangeEvent layout: entries (`0x…` and `N-0x…` for compound
//! fields) from the input's lines; a field list or an error, never a panic.
#![no_main]
use std::sync::{Arc, LazyLock};

use libfuzzer_sys::fuzz_target;
use switchyard::sources::pubsub::avro::CompiledSchema;
use switchyard::sources::pubsub::bitmap;

static SCHEMA: LazyLock<Arc<CompiledSchema>> = LazyLock::new(|| {
    CompiledSchema::parse(include_str!("../../schemas/avro/OrderChangeEvent.avsc")).expect("the shipped schema parses")
});

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let entries: Vec<String> = text.lines().map(str::to_string).collect();
    let _ = bitmap::decode(&entries, SCHEMA.layout());
});
