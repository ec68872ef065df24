//! A service config (YAML, `${VAR}` references, validation): any text gives a config or `file:line:col` problems,
//! never a panic.
#![no_main]
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use switchyard::config::LoadedConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = LoadedConfig::parse(Path::new("fuzz.yaml"), text, &|name| {
        (name == "SET").then(|| "value".to_string())
    });
});
