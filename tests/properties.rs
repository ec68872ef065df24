//! Property tests: the JSONL decoder and the rules loader never panic, whatever they are given.

use proptest::prelude::*;
use switchyard::event::Event;
use switchyard::rules::load::{RuleEnv, RuleSource, compile};

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        "[a-zA-Z_/.:0-9 ]{0,12}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map(
                prop_oneof![
                    Just("id".to_string()),
                    Just("channel".to_string()),
                    Just("header".to_string()),
                    Just("fields".to_string()),
                    Just("record".to_string()),
                    Just("record_ids".to_string()),
                    Just("change_type".to_string()),
                    Just("kind".to_string()),
                    "[a-z_]{1,8}",
                ],
                inner,
                0..6
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Fragments of rule files, glued together in any order: YAML keys, predicates, templates, garbage.
fn rules_text() -> impl Strategy<Value = String> {
    let pieces = prop_oneof![
        Just("version: 1\n".to_string()),
        Just("routes:\n".to_string()),
        Just("  - name: r\n".to_string()),
        Just("    channel: orders\n".to_string()),
        Just("    when: |\n      became(\"A\", \"B\") && event.X?.Y == ()\n".to_string()),
        Just("    guard: has_record() && is_blank(record.W)\n".to_string()),
        Just("    enrich: { object: Order, fields: [W] }\n".to_string()),
        Just("    then:\n      - sink: log\n        message: \"{{record_id}} {{event.X ?? 'x'}}\"\n".to_string()),
        Just("      - sink: enqueue-provisioning\n        job: { a: \"{{\" }\n        idempotency_key: \"k-{{record_id}}\"\n".to_string()),
        Just("vars:\n  v: [1, 2]\n".to_string()),
        "[ -~\n]{0,40}",
    ];
    prop::collection::vec(pieces, 0..10).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn the_jsonl_decoder_never_panics_on_any_text(line in "[ -~]{0,200}") {
        let _ = Event::from_json(&line);
    }

    #[test]
    fn the_jsonl_decoder_never_panics_on_any_json_shape(value in json_value()) {
        let _ = Event::from_json(&value.to_string());
    }

    #[test]
    fn the_rules_loader_never_panics_and_errors_carry_positions(text in rules_text()) {
        let loaded = compile(&[RuleSource { path: "p.yaml".into(), text }], &RuleEnv::defaults());
        prop_assert!(loaded.ruleset.is_some() || !loaded.problems.is_empty());
    }
}
