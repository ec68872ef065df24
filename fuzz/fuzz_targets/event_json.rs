//! A line of a JSONL events file (the JSONL source, `explain`, `replay`, the emulator): any bytes give an event
//! or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(mut event) = switchyard::event::Event::from_json(line) {
        let _ = event.normalize();
        let _ = event.changed_set();
        let _ = serde_json::to_string(&event);
    }
});
