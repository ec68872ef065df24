//! The JSON Schemas of rule files and of the config, generated from the types that parse them.

use serde_json::Value;

use crate::config::Config;
use crate::rules::model::RulesFile;

pub fn rules_schema() -> Value {
    serde_json::to_value(schemars::schema_for!(RulesFile)).expect("a schema is always JSON")
}

pub fn config_schema() -> Value {
    serde_json::to_value(schemars::schema_for!(Config)).expect("a schema is always JSON")
}

pub fn tests_schema() -> Value {
    serde_json::to_value(schemars::schema_for!(crate::authoring::testing::TestFile)).expect("a schema is always JSON")
}

/// The schema as checked in under `schemas/` (pretty, with a final newline).
pub fn pretty(schema: &Value) -> String {
    let mut text = serde_json::to_string_pretty(schema).expect("a schema is always JSON");
    text.push('\n');
    text
}
