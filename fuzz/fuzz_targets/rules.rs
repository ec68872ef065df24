//! A rules file (YAML with Rhai predicates and templates) through the whole loader, static checks included: any
//! text gives rules or `file:line:col` problems, never a panic.
#![no_main]
use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;
use switchyard::rules::load::{RuleEnv, RuleSource, compile};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let source = RuleSource {
        path: PathBuf::from("fuzz.yaml"),
        text: text.to_string(),
    };
    let _ = compile(&[source], &RuleEnv::defaults());
});
