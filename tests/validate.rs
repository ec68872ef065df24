//! `switchyard validate` beyond syntax, and `switchyard test`: every class of bad edit an admin can make,
//! reported at its exact file, line and column.

use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("RUST_LOG")
        .env_remove("SWITCHYARD_MODE")
        .args(args)
        .output()
        .expect("the switchyard binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn assert_reports(args: &[&str], code: i32, expected: &[&str]) -> String {
    let out = run(args);
    let text = stdout(&out);
    assert_eq!(
        out.status.code(),
        Some(code),
        "{args:?}:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in expected {
        assert!(
            text.lines().any(|l| l.starts_with(line)),
            "{args:?}: expected a line starting with\n  {line}\ngot\n{text}"
        );
    }
    text
}

#[test]
fn predicate_errors_point_into_block_folded_quoted_and_plain_scalars() {
    for (file, at) in [
        ("block.yaml", "7:12"),
        ("block-strip.yaml", "7:37"),
        ("single-line.yaml", "5:32"),
        ("quoted.yaml", "5:33"),
        ("folded.yaml", "7:7"),
    ] {
        let path = format!("tests/fixtures/positions/{file}");
        assert_reports(&["validate", &path], 1, &[&format!("{path}:{at}: error: route `")]);
    }
}

#[test]
fn unknown_functions_and_non_boolean_predicates_are_found_without_running_them() {
    assert_reports(
        &["validate", "tests/fixtures/dry-run"],
        1,
        &[
            "tests/fixtures/dry-run/rules.yaml:5:32: error: route `unknown-function`: `when`: unknown function `is_blankk`; did you mean `is_blank`?",
            "tests/fixtures/dry-run/rules.yaml:13:12: error: route `not-boolean`: `guard`: the predicate is a field's value; compare it",
            "tests/fixtures/dry-run/rules.yaml:19:18: error: route `header-typo`: `when` reads unknown header field `chnage_type` (did you mean `change_type`?)",
        ],
    );
}

#[test]
fn duplicates_across_files_and_unknown_channels_are_errors() {
    assert_reports(
        &["validate", "tests/fixtures/broken-dup"],
        1,
        &[
            "tests/fixtures/broken-dup/b.yaml:3:13: error: var `statuses` is already defined at tests/fixtures/broken-dup/a.yaml:3:13",
            "tests/fixtures/broken-dup/b.yaml:5:11: error: route `provision` is already defined at tests/fixtures/broken-dup/a.yaml:5:11",
            "tests/fixtures/broken-dup/b.yaml:6:14: error: route `provision`: unknown channel `ordres` (did you mean `orders`?)",
        ],
    );
}

fn config(dir: &std::path::Path, extra: &str) -> String {
    let path = dir.join("config.yaml");
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    std::fs::write(
        &path,
        format!(
            "source: {{ kind: stdin }}\nrules: [{}]\nsinks:\n  enqueue-provisioning: {{ kind: queue, queue: provisioning, job_name: provision-order }}\n  invalidate-cache: {{ kind: cache-invalidate }}\n  log: {{ kind: log }}\n{extra}",
            rules.display()
        ),
    )
    .unwrap();
    path.display().to_string()
}

#[test]
fn routes_that_can_never_fire_in_the_config_are_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), "mode: platform-event\n");
    let text = assert_reports(&["validate", "--config", &config], 0, &[]);
    assert!(text.contains("warning: route `provision-on-activating` is a cdc route, but the config's mode is platform-event: it never fires until the mode is switched"), "{text}");
    assert!(!text.contains("route `provision-on-fulfilment-request` is a"), "{text}");
}

#[test]
fn enrich_under_the_none_enricher_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), "enricher: none\n");
    let text = assert_reports(&["validate", "--config", &config], 1, &[]);
    assert!(
        text.contains("error: route `provision-on-activating` declares `enrich`, but the config's enricher is `none`"),
        "{text}"
    );
}

#[test]
fn field_name_typos_are_caught_against_the_avro_schema_with_a_suggestion() {
    assert_reports(
        &["validate", "--avro", "schemas/avro", "tests/fixtures/avro-typo"],
        1,
        &[
            "tests/fixtures/avro-typo/orders.yaml:5:18: error: route `provision`: `when`: `Activaton_Status__c` is not a field of the channel's Avro schema (did you mean `Activation_Status__c`?)",
            "tests/fixtures/avro-typo/orders.yaml:5:64: error: route `provision`: `when`: `BillingAddress.Citty` is not a field of the channel's Avro schema (did you mean `BillingAddress.City`?)",
            "tests/fixtures/avro-typo/orders.yaml:7:9: error: route `provision`: template: `WHMCS_Order_Id__c` is not a field of the channel's Avro schema (did you mean `WHMCS_Order_ID__c`?)",
        ],
    );
}

#[test]
fn literals_of_another_type_than_the_avro_field_are_caught_with_the_literal_meant() {
    assert_reports(
        &["validate", "--avro", "schemas/avro", "tests/fixtures/avro-types"],
        1,
        &[
            "tests/fixtures/avro-types/orders.yaml:5:11: error: route `big-orders`: `when`: `event.TotalAmount` is a `double` in the channel's Avro schema, but is compared with the string \"100\": values of different types never compare as meant; write 100",
            "tests/fixtures/avro-types/orders.yaml:5:40: error: route `big-orders`: `when`: `event.Status` is a `string` in the channel's Avro schema, but is compared with the number 3: values of different types never compare as meant; write \"3\"",
            "tests/fixtures/avro-types/orders.yaml:11:18: error: route `flags`: `when`: `became`: `event.Auto_Renew__c` is a `boolean` in the channel's Avro schema, but is compared with the string \"true\": values of different types never compare as meant; write true",
            "tests/fixtures/avro-types/orders.yaml:11:46: error: route `flags`: `when`: `event.BillingAddress` is a `record Address` in the channel's Avro schema, but is compared with the string \"Main St\": values of different types never compare as meant; compare one of its members (`event.Field.Member`)",
            "tests/fixtures/avro-types/orders.yaml:15:12: error: route `flags`: `guard`: `record.Tax_Exempt__c` is a `boolean` in the `OrderChangeEvent` schema, but is compared with the number 1: values of different types never compare as meant",
        ],
    );
    // The record's date is a string over REST (a number in the event): not compared; the matching types pass.
    let text = assert_reports(
        &["validate", "--avro", "schemas/avro", "tests/fixtures/avro-types"],
        1,
        &[],
    );
    assert!(!text.contains("EffectiveDate") && !text.contains("City"), "{text}");
    assert_eq!(text.matches(": error: ").count(), 5, "{text}");
}

#[test]
fn the_shipped_rules_pass_the_avro_field_check() {
    let text = assert_reports(&["validate", "--avro", "schemas/avro", "rules/"], 0, &[]);
    assert!(!text.contains("error"), "{text}");
}

#[test]
fn switchyard_test_passes_on_the_shipped_rule_tests() {
    let out = run(&["test", "rules/"]);
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(
        stdout(&out).trim_end().ends_with(" passed, 0 failed"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn switchyard_test_fails_with_a_readable_diff_on_a_wrong_expectation() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::copy(root.join("rules/orders.yaml"), dir.path().join("orders.yaml")).unwrap();
    let shipped = std::fs::read_to_string(root.join("rules/orders.test.yaml")).unwrap();
    let wrong = shipped.replacen(
        "job_id: activation-801xx0000000001AAA-1764230401000",
        "job_id: activation-801xx0000000001AAA-0",
        1,
    );
    assert_ne!(wrong, shipped);
    let wrong = wrong.replace("../examples/", &format!("{}/examples/", root.display()));
    std::fs::write(dir.path().join("orders.test.yaml"), wrong).unwrap();
    let out = run(&["test", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(
        text.contains("case \"normal approval enqueues one provisioning job and logs it\" FAILED"),
        "{text}"
    );
    assert!(text.contains("actions differ (- expected, + actual):"), "{text}");
    assert!(
        text.contains("-   \"job_id\": \"activation-801xx0000000001AAA-0\","),
        "{text}"
    );
    assert!(
        text.contains("+   \"job_id\": \"activation-801xx0000000001AAA-1764230401000\","),
        "{text}"
    );
    assert!(text.trim_end().ends_with("passed, 1 failed"), "{text}");
}

/// A config that does not load reports its own problem at its key's line, and no second, confusing problem about
/// rules the broken config was meant to name; the rules it names are still checked (against the built-in names).
#[test]
fn a_config_that_does_not_load_reports_only_its_own_problems_at_their_keys() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.yaml");
    let rules = format!("{}/rules/", env!("CARGO_MANIFEST_DIR"));
    std::fs::write(
        &cfg,
        format!("source: {{ kind: stdin }}\nchannels:\n  orders: /topic/Orders\nrules: [\"{rules}\"]\n"),
    )
    .unwrap();
    let cfg = cfg.display().to_string();
    let text = assert_reports(
        &["validate", "--config", &cfg],
        1,
        &[&format!("{cfg}:3:3: error: channel `orders` is `/topic/Orders`")],
    );
    assert_eq!(text.lines().count(), 1, "only the config's own problem:\n{text}");
    // Without any rules to read from it, still only the config's problem.
    std::fs::write(dir.path().join("bad.yaml"), "source: { kind: nope }\n").unwrap();
    let out = run(&["validate", "--config", &cfg]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(text.lines().all(|l| l.starts_with(&cfg)), "{text}");
    assert!(!text.contains("rules"), "{text}");
}

/// Each everyday predicate mistake is refused at load (so by `validate`, start-up and every reload), at its place.
#[test]
fn misspelt_functions_wrong_arity_bare_fields_and_assignments_are_refused_at_their_place() {
    let text = assert_reports(
        &["validate", "tests/fixtures/static"],
        1,
        &[
            "tests/fixtures/static/rules.yaml:5:11: error: route `misspelt`: `when`: unknown function `becomes`; did you mean `became`?",
            "tests/fixtures/static/rules.yaml:10:11: error: route `bare-field`: `when`: the predicate is a field's value",
            "tests/fixtures/static/rules.yaml:15:24: error: route `assignment`: `when` does not compile: `=` assigns; compare with `==`",
            "tests/fixtures/static/rules.yaml:20:11: error: route `one-argument`: `when`: `became` takes 2 arguments (`became(field, value)`",
            "tests/fixtures/static/rules.yaml:25:32: error: route `string`: `when` does not compile: Expecting a boolean expression, not a string",
            "tests/fixtures/static/rules.yaml:30:29: error: route `method-arity`: `when`: `contains` takes 2 arguments, not 3",
        ],
    );
    assert_eq!(text.lines().count(), 6, "{text}");
}

/// `record.X` that the route's `enrich` does not fetch is always `()`: an error, in `guard` and in templates, with
/// the fetched field meant; a route after one that always fires and stops never runs: a warning.
#[test]
fn unfetched_record_fields_and_routes_that_never_run_are_reported() {
    let text = assert_reports(
        &["validate", "tests/fixtures/record-fields"],
        1,
        &[
            "tests/fixtures/record-fields/rules.yaml:9:11: warning: route `provision` never runs: route `catch-all` (tests/fixtures/record-fields/rules.yaml:3) before it on `/data/OrderChangeEvent` always fires and has `stop: true`",
            "tests/fixtures/record-fields/rules.yaml:13:44: error: route `provision`: `guard` reads `record.WHMCS_Order_Id__c`, which its `enrich` does not fetch (did you mean `WHMCS_Order_ID__c`?)",
            "tests/fixtures/record-fields/rules.yaml:15:9: error: route `provision`: `template` reads `record.AccountID`, which its `enrich` does not fetch (did you mean `AccountId`?)",
        ],
    );
    assert_eq!(text.lines().count(), 3, "{text}");
}

#[test]
fn entity_is_checked_against_the_channel_and_selects_the_schema_field_names_are_checked_with() {
    assert_reports(
        &["validate", "--avro", "schemas/avro", "tests/fixtures/entity"],
        1,
        &[
            "tests/fixtures/entity/channels.yaml:5:13: error: route `wrong-entity`: the channel `/data/OrderChangeEvent` carries only `Order` changes, so `entity: OrderItem` never matches",
            "tests/fixtures/entity/channels.yaml:10:13: error: route `platform`: `entity` is for change events",
            "tests/fixtures/entity/channels.yaml:15:13: error: route `bad-name`: `entity` must be an object's API name",
        ],
    );
    // On a custom channel, the entity's own schema: `Quantity` is an OrderItem field.
    let text = assert_reports(
        &["validate", "--avro", "schemas/avro", "tests/fixtures/entity-typo"],
        1,
        &["tests/fixtures/entity-typo/channels.yaml:6:19: error: route `item-typo`: `when`: `Quantiy` is not a field"],
    );
    assert!(text.contains("(did you mean `Quantity`?)"), "{text}");
    assert!(!text.contains("order-on-all"), "`Status` is an Order field: {text}");
}

#[test]
fn on_failure_actions_and_write_backs_are_checked_where_they_are_written() {
    let text = assert_reports(
        &["validate", "tests/fixtures/on-failure"],
        1,
        &[
            "tests/fixtures/on-failure/rules.yaml:7:15: error: route `provision`: sink `enqueue-provisioning` (queue): `failure` is only known in `on_failure` actions",
            "tests/fixtures/on-failure/rules.yaml:16:15: error: route `provision`: sink `salesforce-update` (salesforce-update) needs `object` and `fields`",
            "tests/fixtures/on-failure/rules.yaml:19:17: error: route `provision`: sink `salesforce-update` (salesforce-update): `object` must be an object's API name",
            "tests/fixtures/on-failure/rules.yaml:20:31: error: route `provision`: sink `salesforce-update` (salesforce-update): `Bad-Name` is not a field's API name",
        ],
    );
    assert_eq!(text.lines().count(), 4, "{text}");
    // The fields a write-back sets are checked against the object's schema, with a suggestion.
    assert_reports(
        &["validate", "--avro", "schemas/avro", "tests/fixtures/on-failure-typo"],
        1,
        &[
            "tests/fixtures/on-failure-typo/rules.yaml:11:9: error: route `provision`: `salesforce-update` of Order: `Activation_Eror_Message__c` is not a field of the channel's Avro schema (did you mean `Activation_Error_Message__c`?)",
        ],
    );
}
