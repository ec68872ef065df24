//! The JSON Schemas: checked in equal to the generated ones (tests/cli.rs), documented everywhere, and
//! accepted by an independent validator (the `jsonschema` crate) together with every shipped file.

use std::path::Path;

use serde_json::Value;

fn schema(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas").join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn yaml(path: &str) -> Value {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap();
    serde_saphyr::from_str(&text).unwrap()
}

fn check(schema_name: &str, files: &[&str]) {
    let schema = schema(schema_name);
    assert!(
        jsonschema::meta::is_valid(&schema),
        "{schema_name} is not a valid JSON Schema"
    );
    let validator = jsonschema::draft202012::new(&schema).unwrap();
    for file in files {
        let instance = yaml(file);
        let errors: Vec<String> = validator
            .iter_errors(&instance)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(errors.is_empty(), "{file} does not match {schema_name}: {errors:#?}");
    }
}

#[test]
fn shipped_rules_match_the_rules_schema() {
    check("rules.schema.json", &["rules/orders.yaml"]);
}

#[test]
fn shipped_configs_match_the_config_schema() {
    check(
        "config.schema.json",
        &["examples/demo.yaml", "examples/deploy/config.yaml"],
    );
}

#[test]
fn shipped_rule_tests_match_the_tests_schema() {
    check("rules-test.schema.json", &["rules/orders.test.yaml"]);
}

#[test]
fn the_independent_validator_rejects_what_switchyard_rejects() {
    let validator = jsonschema::draft202012::new(&schema("rules.schema.json")).unwrap();
    let bad: Value = serde_saphyr::from_str(
        "version: 1\nroutes:\n  - name: x\n    channel: orders\n    when: 'true'\n    priority: 3\n",
    )
    .unwrap();
    assert!(!validator.is_valid(&bad), "an unknown route key must be rejected");
    let validator = jsonschema::draft202012::new(&schema("config.schema.json")).unwrap();
    let bad: Value =
        serde_saphyr::from_str("source: { kind: jsonl }\nrules: [r]\nsinks: { q: { kind: kafka } }\n").unwrap();
    assert!(!validator.is_valid(&bad), "an unknown sink kind must be rejected");
}

/// Every property has a description and an example; every enum value has a description.
fn walk(path: &str, node: &Value, missing: &mut Vec<String>) {
    let Some(obj) = node.as_object() else { return };
    if obj.contains_key("enum") {
        missing.push(format!(
            "{path}: enum values without descriptions (document each variant)"
        ));
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        for (name, prop) in props {
            let here = format!("{path}.{name}");
            if prop.get("const").is_some() {
                // A tagged enum's discriminator (`kind: queue`): the variant itself carries the docs.
                continue;
            }
            if prop.get("description").is_none() {
                missing.push(format!("{here}: description"));
            }
            if prop.get("examples").is_none() {
                missing.push(format!("{here}: examples"));
            }
            walk(&here, prop, missing);
        }
    }
    for key in ["oneOf", "anyOf"] {
        for (i, variant) in obj.get(key).and_then(Value::as_array).into_iter().flatten().enumerate() {
            if variant.get("const").is_some() && variant.get("description").is_none() {
                missing.push(format!("{path}.{key}[{i}] ({}): description", variant["const"]));
            }
            walk(&format!("{path}.{key}[{i}]"), variant, missing);
        }
    }
    if let Some(defs) = obj.get("$defs").and_then(Value::as_object) {
        for (name, def) in defs {
            walk(&format!("$defs.{name}"), def, missing);
        }
    }
    for key in ["items", "additionalProperties"] {
        if let Some(inner) = obj.get(key) {
            walk(&format!("{path}[{key}]"), inner, missing);
        }
    }
}

#[test]
fn every_field_and_enum_value_is_documented_with_an_example() {
    let mut missing = Vec::new();
    for name in ["rules.schema.json", "config.schema.json", "rules-test.schema.json"] {
        walk(name, &schema(name), &mut missing);
    }
    assert!(missing.is_empty(), "missing:\n{}", missing.join("\n"));
}
