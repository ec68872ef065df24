//! Native predicate evaluation (src/rules/native.rs) against Rhai, the reference: for generated predicates
//! and events, the router decides exactly what it decides with every predicate evaluated by Rhai: the
//! same decisions, actions and error messages. Type mismatches, absent values, `?.`, numbers of both
//! types and platform events (no header) are all in the mix, so both the native results and the
//! fallbacks to Rhai are exercised.

use proptest::prelude::*;
use serde_json::{Value, json};
use switchyard::authoring::testing::plan_recorded;
use switchyard::event::Event;
use switchyard::router;
use switchyard::rules::RuleSet;
use switchyard::rules::load::{RuleEnv, RuleSource, compile};

const VARS: &str = r#"
vars:
  statuses: [Approved, Reactivate]
  watched: [Status, BillingAddress, Description, Amount]
  origins: ["client=switchyard-provisioning", ""]
  limit: 3
"#;

fn load(text: &str) -> RuleSet {
    let loaded = try_load(text);
    match loaded {
        Ok(rules) => rules,
        Err(problems) => panic!("{text}\n{problems}"),
    }
}

/// The rules, or the loader's problems (Rhai rejects some generated predicates when it compiles them,
/// such as `"x" && y`: constant operands of `&&` must be booleans).
fn try_load(text: &str) -> Result<RuleSet, String> {
    let loaded = compile(
        &[RuleSource {
            path: "n.yaml".into(),
            text: text.to_string(),
        }],
        &RuleEnv::defaults(),
    );
    loaded.ruleset.ok_or_else(|| format!("{:#?}", loaded.problems))
}

/// Values of every type, from the event, the header, the record and constants.
fn value(guard: bool) -> BoxedStrategy<String> {
    let mut items = vec![
        "event.Status",
        "event.Activation_Status__c",
        "event.Amount",
        "event.Flag",
        "event.Tags",
        "event.Description",
        "event.BillingAddress",
        "event.BillingAddress?.City",
        "event.BillingAddress.City",
        "event.Missing?.Deeper",
        "event.Status?.Deeper",
        "header.change_type",
        "header.change_origin",
        "header.changed_fields",
        "header.commit_timestamp",
        "header?.entity",
        "record_id",
        "event_id",
        "replay_id",
        "statuses",
        "watched",
        "limit",
        "\"Approved\"",
        "\"Activating\"",
        "\"\"",
        "()",
        "3",
        "3.0",
        "true",
        "[\"Approved\", 3, ()]",
        "event.Status ?? \"none\"",
    ];
    if guard {
        items.extend(["record.WHMCS_Order_ID__c", "record.Status", "record.AccountId"]);
    }
    proptest::sample::select(items).prop_map(str::to_string).boxed()
}

/// Helper calls, comparisons and membership: mostly booleans, sometimes not (`is_blank(x) == 3`).
fn atom(guard: bool) -> BoxedStrategy<String> {
    let helpers = proptest::sample::select(vec![
        "changed(\"Status\")",
        "changed(\"BillingAddress\")",
        "changed_any(watched)",
        "changed_any([\"Amount\", 3])",
        "changed_only(watched)",
        "became(\"Activation_Status__c\", \"Activating\")",
        "became(\"Amount\", 3)",
        "became(\"Flag\", true)",
        "became(\"BillingAddress.City\", \"Osaka\")",
        "became(\"Status\", ())",
        "nulled(\"Description\")",
        "is_gap()",
        "contains_any(header.change_origin, origins)",
        "has_record()",
        "changed(event.Status)",
    ])
    .prop_map(str::to_string);
    prop_oneof![
        3 => helpers,
        2 => (value(guard), value(guard)).prop_map(|(a, b)| format!("{a} == {b}")),
        1 => (value(guard), value(guard)).prop_map(|(a, b)| format!("{a} != {b}")),
        2 => (value(guard), value(guard)).prop_map(|(a, b)| format!("{a} in {b}")),
        1 => value(guard).prop_map(|v| format!("is_blank({v})")),
        1 => value(guard),
    ]
    .boxed()
}

fn predicate(guard: bool) -> BoxedStrategy<String> {
    atom(guard)
        .prop_recursive(3, 12, 3, |inner| {
            prop_oneof![
                (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a}) && ({b})")),
                (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a}) || ({b})")),
                inner.prop_map(|a| format!("!({a})")),
            ]
        })
        .boxed()
}

fn field_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        Just(json!("Approved")),
        Just(json!("Activating")),
        Just(json!("")),
        Just(json!("  ")),
        Just(json!(3)),
        Just(json!(3.0)),
        Just(json!(2.5)),
        Just(json!(true)),
        Just(json!({"City": "Osaka"})),
        Just(json!({})),
        Just(json!(["Approved"])),
        Just(json!([])),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    let names = [
        "Status",
        "Activation_Status__c",
        "Amount",
        "Flag",
        "Tags",
        "Description",
        "BillingAddress",
    ];
    // `None`: the field is absent (a null is a field sent as null).
    let fields = proptest::collection::vec(proptest::option::of(field_value()), names.len()).prop_map(move |values| {
        names
            .iter()
            .zip(values)
            .filter_map(|(n, v)| Some((n.to_string(), v?)))
            .collect::<serde_json::Map<String, Value>>()
    });
    let changed = proptest::sample::subsequence(
        vec![
            "Status",
            "Activation_Status__c",
            "Amount",
            "Flag",
            "BillingAddress.City",
            "LastModifiedDate",
        ],
        0..4,
    );
    let change_type = proptest::sample::select(vec![
        "CREATE",
        "UPDATE",
        "DELETE",
        "UNDELETE",
        "GAP_UPDATE",
        "GAP_OVERFLOW",
    ]);
    let origin = proptest::option::of(proptest::sample::select(vec![
        "com/salesforce/api/rest/64.0;client=switchyard-provisioning",
        "com/salesforce/api/soap/64.0;client=Workbench",
    ]));
    let record = prop_oneof![
        Just(Value::Null),
        Just(json!({"WHMCS_Order_ID__c": null, "Status": "Approved", "AccountId": "001A"})),
        Just(json!({"WHMCS_Order_ID__c": "W-1", "Status": 3})),
        Just(json!({})),
    ];
    (
        any::<bool>(),
        fields,
        changed,
        change_type,
        origin,
        record,
        any::<bool>(),
    )
        .prop_map(|(platform, fields, changed, change_type, origin, record, replay)| {
            let mut e = if platform {
                json!({"id": "p-1", "channel": "/event/Order_Fulfilment_Requested__e", "fields": fields})
            } else {
                json!({
                    "id": "t:1",
                    "channel": "/data/OrderChangeEvent",
                    "header": {
                        "entity": "Order",
                        "change_type": change_type,
                        "record_ids": ["801A", "801B"],
                        "changed_fields": changed,
                        "nulled_fields": ["Description"],
                        "change_origin": origin,
                        "commit_timestamp": 1700000000000_i64,
                    },
                    "fields": fields,
                    "record": {"801A": record, "801B": null},
                })
            };
            if replay {
                e["replay_id"] = json!("00ff");
            }
            Event::from_json(&e.to_string()).expect("a valid event")
        })
}

fn rules_text(whens: &[String], guard: &str) -> String {
    let mut text = format!("version: 1\n{VARS}\nroutes:\n");
    // CDC routes take their record ids from the header; the platform event route names its record.
    for (channel, prefix, record_id) in [
        ("orders", "o", ""),
        ("fulfilment-requests", "p", "    record_id: \"801A\"\n"),
    ] {
        for (i, when) in whens.iter().enumerate() {
            text.push_str(&format!(
                "  - name: {prefix}{i}\n    channel: {channel}\n    when: {}\n    then:\n      - sink: log\n        message: \"{prefix}{i} {{{{record_id}}}}\"\n",
                serde_json::to_string(when).unwrap()
            ));
        }
        text.push_str(&format!(
            "  - name: {prefix}g\n    channel: {channel}\n    when: \"true\"\n{record_id}    enrich: {{ object: Order, fields: [WHMCS_Order_ID__c, Status, AccountId] }}\n    guard: {}\n    then:\n      - sink: log\n        message: \"then\"\n    else:\n      - sink: log\n        message: \"else\"\n",
            serde_json::to_string(guard).unwrap()
        ));
    }
    text
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn native_evaluation_decides_what_rhai_decides(
        whens in proptest::collection::vec(predicate(false), 1..4),
        guard in predicate(true),
        events in proptest::collection::vec(event(), 1..12),
    ) {
        let text = rules_text(&whens, &guard);
        let loaded = try_load(&text);
        prop_assume!(loaded.is_ok());
        let native = loaded.unwrap();
        let rhai = load(&text).without_native();
        prop_assert_eq!(rhai.native_count().0, 0);
        for e in &events {
            let (n, r) = (plan_recorded(&native, e), plan_recorded(&rhai, e));
            prop_assert_eq!(&n, &r, "rules:\n{}\nevent: {}", text, serde_json::to_string(e).unwrap());
            // The dry run (`switchyard validate`, rule tests) cross-checks the two and finds no disagreement.
            let disagreements: Vec<String> = router::dry_run(&native, e)
                .into_iter()
                .map(|d| d.message)
                .filter(|m| m.contains("native evaluation"))
                .collect();
            prop_assert!(disagreements.is_empty(), "{:?}", disagreements);
        }
    }
}

/// The generators above are not vacuous: most generated predicates have a native form, and on the
/// events, native evaluation decides most of them (the rest are Rhai's: type errors and the like).
#[test]
fn most_generated_predicates_are_native() {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let (mut native, mut all) = (0, 0);
    for _ in 0..200 {
        let when = predicate(false).new_tree(&mut runner).unwrap().current();
        let Ok(rules) = try_load(&rules_text(&[when], "true")) else {
            continue;
        };
        let (n, a) = rules.native_count();
        native += n;
        all += a;
    }
    assert!(native * 10 >= all * 9, "{native} of {all} predicates native");
}

#[test]
fn every_shipped_predicate_is_native() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/rules/orders.yaml")).unwrap();
    let rules = load(&text);
    let (native, all) = rules.native_count();
    assert_eq!(
        native, all,
        "every `when` and `guard` of rules/orders.yaml evaluates natively"
    );
}

#[test]
fn shapes_outside_the_subset_stay_with_rhai() {
    for when in [
        "event.Status.len() > 2",
        "event.Amount > 2",
        "`x${event.Status}` == \"xA\"",
        "event[\"Status\"] == \"A\"",
        "if event.Flag { true } else { false }",
        "event.Status + \"x\" == \"Ax\"",
    ] {
        let rules = load(&rules_text(&[when.to_string()], "true"));
        // Six predicates: the `when` on each channel, and the `true` when and guard of each guarded route.
        assert_eq!(rules.native_count(), (4, 6), "{when}");
    }
}
