//! Rule tests (`switchyard test`): `*.test.yaml` files beside the rules give events and the exact actions
//! the rules must decide for them. Sinks are recorded, never called: no Redis, no network.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use serde_saphyr::Spanned;

use crate::config::{LoadedConfig, Mode};
use crate::diag::{Problem, Severity};
use crate::event::Event;
use crate::plan::{Action, Op, Outcome, Plan};
use crate::router;
use crate::rules::RuleSet;
use crate::rules::load::{self, RuleEnv};

/// A rule test file: cases of events and the actions the rules must decide for them.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "switchyard rule tests")]
pub struct TestFile {
    /// Rule files or folders under test, relative to this file. Default: the rules in this file's folder.
    #[serde(default)]
    #[schemars(example = vec!["orders.yaml".to_string()])]
    pub rules: Vec<PathBuf>,
    /// A service config (relative to this file) for channel aliases, sinks and mode. Default: the
    /// built-in aliases and sinks (`enqueue-provisioning`, `invalidate-cache`, `log`, `dead-letter`,
    /// `salesforce-update`).
    #[serde(default)]
    #[schemars(example = &"../examples/demo.yaml")]
    pub config: Option<PathBuf>,
    /// The mode every case runs in unless it says otherwise: `cdc` (default) or `platform-event`.
    #[serde(default)]
    #[schemars(example = &"cdc")]
    pub mode: Option<Mode>,
    /// The cases, run in order; each starts from nothing (no state carries over).
    #[schemars(example = example_cases())]
    pub cases: Vec<TestCase>,
}

/// One case: events in, expected decisions out.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TestCase {
    /// What the case shows, in a sentence.
    #[schemars(with = "String", example = &"normal approval enqueues one provisioning job")]
    pub name: Spanned<String>,
    /// This case's mode, over the file's.
    #[serde(default)]
    #[schemars(example = &"platform-event")]
    pub mode: Option<Mode>,
    /// Events in the JSONL shape (with their recorded `record` enrichment), inline.
    #[serde(default)]
    #[schemars(with = "Vec<Value>", example = example_events())]
    pub events: Vec<Spanned<Value>>,
    /// A JSONL file of events (relative to this file), run after the inline ones.
    #[serde(default)]
    #[schemars(example = &"../examples/events/order-lifecycle.jsonl")]
    pub events_file: Option<PathBuf>,
    /// What the rules must decide over all the case's events.
    #[schemars(example = serde_json::json!({"routes": {"provision-on-activating": 1}}))]
    pub expect: Expect,
}

/// Expectations; every one given must hold.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// The exact actions, in order: each names its `sink` and the rendered parameters to check
    /// (queue: `job`, `idempotency_key`, `job_id`; cache-invalidate: `keys`, `patterns`, `publish`; log:
    /// `message`, `level`, `fields`; dead-letter: `reason`; salesforce-update: `object`, `id`, `fields`,
    /// `idempotency_key`; any: `route`, `record_id`, `shadow`).
    /// Parameters left out are not checked; the number and order of actions always are.
    #[serde(default)]
    #[schemars(example = example_actions())]
    pub actions: Option<Vec<Map<String, Value>>>,
    /// `true`: no action at all.
    #[serde(default)]
    #[schemars(example = true)]
    pub no_actions: bool,
    /// How many times each route's `then` ran (0: never).
    #[serde(default)]
    #[schemars(example = example_routes())]
    pub routes: Option<IndexMap<String, u64>>,
    /// The messages of the `log` sink's actions, in order.
    #[serde(default)]
    #[schemars(example = vec!["Order activation moved to Activating via CDC, enqueuing fulfillment".to_string()])]
    pub logs: Option<Vec<String>>,
}

fn example_events() -> Value {
    json!([{"id": "5b1f3c2e-8d7a-4f0e-9c11-2a3b4c5d6e7f", "channel": "/event/Order_Fulfilment_Requested__e",
            "fields": {"Order_Id__c": "801xx0000000020AAA"},
            "record": {"801xx0000000020AAA": {"WHMCS_Order_ID__c": null, "AccountId": "001xx0000000020AAA"}}}])
}

fn example_cases() -> Value {
    json!([{
        "name": "an internal-only change does nothing",
        "events": [{"id": "tx-9:1", "channel": "/data/OrderChangeEvent",
                    "header": {"entity": "Order", "change_type": "UPDATE", "record_ids": ["801xx0000000005AAA"],
                               "changed_fields": ["Activation_Status__c"]},
                    "fields": {"Activation_Status__c": "Activated"}}],
        "expect": {"no_actions": true}
    }])
}

fn example_actions() -> Value {
    json!([{"sink": "enqueue-provisioning", "job": {"sfOrderId": "801xx0000000001AAA"}},
           {"sink": "log", "message": "Order activation moved to Activating via CDC, enqueuing fulfillment"}])
}

fn example_routes() -> Value {
    json!({"provision-on-activating": 1, "invalidate-order-cache": 0})
}

/// A loaded test file: its cases with their events parsed.
pub struct LoadedTests {
    pub path: PathBuf,
    pub file: TestFile,
    /// Per case: (event, where it came from).
    pub events: Vec<Vec<(Event, String)>>,
}

/// Every `*.test.yaml` / `*.test.yml` in the given files and folders, sorted.
pub fn find_test_files(paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for path in paths {
        if path.is_dir() {
            if let Ok(entries) = std::fs::read_dir(path) {
                let mut files: Vec<PathBuf> = entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| is_test_file(p))
                    .collect();
                files.sort();
                found.extend(files);
            }
        } else if is_test_file(path) {
            found.push(path.clone());
        }
    }
    found
}

pub fn is_test_file(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    name.ends_with(".test.yaml") || name.ends_with(".test.yml")
}

fn dir_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

impl LoadedTests {
    /// Reads a test file and every event it names. Problems point at the file, line and column.
    pub fn load(path: &Path) -> Result<LoadedTests, Vec<Problem>> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| vec![Problem::error(path, 0, 0, format!("cannot read the test file: {e}"))])?;
        let file: TestFile = serde_saphyr::from_str(&text).map_err(|e| vec![Problem::from_yaml(path, &e)])?;
        let mut problems = Vec::new();
        let mut events = Vec::new();
        for case in &file.cases {
            let mut case_events = Vec::new();
            for raw in &case.events {
                let (line, column) = (raw.referenced.line(), raw.referenced.column());
                let parsed = serde_json::from_value::<Event>(raw.value.clone())
                    .map_err(|e| e.to_string())
                    .and_then(|mut e| e.normalize().map(|()| e).map_err(|e| e.to_string()));
                match parsed {
                    Ok(event) => case_events.push((event, format!("{}:{line}", path.display()))),
                    Err(e) => problems.push(Problem::error(path, line, column, format!("not an event: {e}"))),
                }
            }
            if let Some(file_path) = &case.events_file {
                let full = dir_of(path).join(file_path);
                match std::fs::read_to_string(&full) {
                    Ok(text) => {
                        for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                            match Event::from_json(line) {
                                Ok(event) => case_events.push((event, format!("{}:{}", full.display(), n + 1))),
                                // A malformed line in a fixture is a test of the source, not of the rules.
                                Err(_) => continue,
                            }
                        }
                    }
                    Err(e) => problems.push(Problem::error(
                        path,
                        case.name.referenced.line(),
                        case.name.referenced.column(),
                        format!("cannot read events_file {}: {e}", full.display()),
                    )),
                }
            }
            events.push(case_events);
        }
        if problems.is_empty() {
            Ok(LoadedTests {
                path: path.to_path_buf(),
                file,
                events,
            })
        } else {
            Err(problems)
        }
    }

    /// The rule files this test file is about.
    pub fn rule_paths(&self) -> Vec<PathBuf> {
        let dir = dir_of(&self.path);
        if self.file.rules.is_empty() {
            vec![dir]
        } else {
            self.file.rules.iter().map(|r| dir.join(r)).collect()
        }
    }

    /// The environment the rules are checked in (config or defaults), with `mode` applied.
    pub fn env(&self, mode: Option<Mode>) -> Result<RuleEnv, Vec<Problem>> {
        let mut env = match &self.file.config {
            Some(config) => {
                RuleEnv::from_config(&LoadedConfig::load(&dir_of(&self.path).join(config)).map_err(|p| p.0)?)
            }
            None => RuleEnv::defaults(),
        };
        env.mode = Some(mode.or(self.file.mode).unwrap_or_default());
        Ok(env)
    }
}

/// One failed case.
#[derive(Debug)]
pub struct Failure {
    pub at: String,
    pub case: String,
    pub message: String,
}

/// The outcome of running test files.
#[derive(Debug, Default)]
pub struct Report {
    pub passed: usize,
    pub failures: Vec<Failure>,
    /// Problems that kept a file from running (bad YAML, rules that do not load).
    pub problems: Vec<Problem>,
}

/// Plans one event with the recorded enrichment (the event's `record` map): the same router the service runs.
pub fn plan_recorded(rules: &RuleSet, event: &Event) -> Plan {
    let needs = router::needs(rules, event);
    let records = needs
        .requests(rules)
        .into_iter()
        .map(|r| {
            let found = event.record.get(&r.record_id).cloned().ok_or_else(|| {
                format!(
                    "the event has no recorded `record` entry for {} `{}`",
                    r.object, r.record_id
                )
            });
            (r.record_id, found)
        })
        .collect();
    router::plan(rules, event, needs, &records)
}

/// An action as rule tests see it: sink, route and rendered parameters.
pub fn action_json(action: &Action) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("sink".into(), json!(action.sink));
    m.insert("route".into(), json!(action.route));
    if let Some(id) = &action.record_id {
        m.insert("record_id".into(), json!(id));
    }
    if action.shadow {
        m.insert("shadow".into(), json!(true));
    }
    match &action.op {
        Op::Enqueue {
            idempotency_key,
            job_id,
            data,
            ..
        } => {
            m.insert("job".into(), data.clone());
            m.insert("idempotency_key".into(), json!(idempotency_key));
            m.insert("job_id".into(), json!(job_id));
        }
        Op::Invalidate {
            keys,
            patterns,
            publish,
        } => {
            m.insert("keys".into(), json!(keys));
            m.insert("patterns".into(), json!(patterns));
            if let Some((channel, message)) = publish {
                m.insert("publish".into(), json!({"channel": channel, "message": message}));
            }
        }
        Op::Log { level, message, fields } => {
            m.insert("message".into(), json!(message));
            m.insert("level".into(), serde_json::to_value(level).unwrap_or(Value::Null));
            m.insert("fields".into(), Value::Object(fields.clone()));
        }
        Op::Webhook {
            idempotency_key,
            body,
            headers,
        } => {
            m.insert("body".into(), body.clone());
            if let Some(key) = idempotency_key {
                m.insert("idempotency_key".into(), json!(key));
            }
            if !headers.is_empty() {
                m.insert(
                    "headers".into(),
                    headers.iter().map(|(k, v)| (k.clone(), json!(v))).collect(),
                );
            }
        }
        Op::DeadLetter { reason } => {
            m.insert("reason".into(), json!(reason));
        }
        Op::SalesforceUpdate {
            object,
            id,
            fields,
            idempotency_key,
        } => {
            m.insert("object".into(), json!(object));
            m.insert("id".into(), json!(id));
            m.insert("fields".into(), Value::Object(fields.clone()));
            if let Some(key) = idempotency_key {
                m.insert("idempotency_key".into(), json!(key));
            }
        }
    }
    m
}

/// Runs every case of every test file.
pub fn run(files: &[PathBuf]) -> Report {
    let mut report = Report::default();
    for path in files {
        let tests = match LoadedTests::load(path) {
            Ok(t) => t,
            Err(problems) => {
                report.problems.extend(problems);
                continue;
            }
        };
        let mut rulesets: BTreeMap<Mode, RuleSet> = BTreeMap::new();
        for (case, events) in tests.file.cases.iter().zip(&tests.events) {
            let mode = case.mode.or(tests.file.mode).unwrap_or_default();
            let rules = match rulesets.entry(mode) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(slot) => {
                    let loaded = tests
                        .env(Some(mode))
                        .map(|env| load::load_paths(&tests.rule_paths(), &env));
                    match loaded {
                        Ok(load::Loaded {
                            ruleset: Some(rules), ..
                        }) => slot.insert(rules),
                        Ok(load::Loaded { problems, .. }) | Err(problems) => {
                            report
                                .problems
                                .extend(problems.into_iter().filter(|p| p.severity == Severity::Error));
                            break;
                        }
                    }
                }
            };
            let at = format!(
                "{}:{}:{}",
                path.display(),
                case.name.referenced.line(),
                case.name.referenced.column()
            );
            match check_case(rules, case, events) {
                Ok(()) => report.passed += 1,
                Err(message) => report.failures.push(Failure {
                    at,
                    case: case.name.value.clone(),
                    message,
                }),
            }
        }
    }
    report
}

fn check_case(rules: &RuleSet, case: &TestCase, events: &[(Event, String)]) -> Result<(), String> {
    let mut actions = Vec::new();
    let mut fired: BTreeMap<String, u64> = BTreeMap::new();
    for (event, _) in events {
        let plan = plan_recorded(rules, event);
        for d in &plan.decisions {
            if d.outcome == Outcome::Then {
                *fired.entry(d.route.clone()).or_default() += 1;
            }
        }
        actions.extend(plan.actions.iter().map(action_json));
    }
    let mut out = String::new();
    let expect = &case.expect;
    if expect.no_actions && !actions.is_empty() {
        let _ = writeln!(out, "expected no actions, got {}:", actions.len());
        for a in &actions {
            let _ = writeln!(out, "  + {}", Value::Object(a.clone()));
        }
    }
    if let Some(expected) = &expect.actions
        && let Some(diff) = diff_actions(expected, &actions)
    {
        out.push_str(&diff);
    }
    if let Some(routes) = &expect.routes {
        for (route, want) in routes {
            if !rules.routes.iter().any(|r| &r.name == route) {
                let _ = writeln!(out, "route `{route}` does not exist in the rules under test");
                continue;
            }
            let got = fired.get(route).copied().unwrap_or(0);
            if got != *want {
                let _ = writeln!(out, "route `{route}`: expected to fire {want} time(s), fired {got}");
            }
        }
    }
    if let Some(logs) = &expect.logs {
        let got: Vec<String> = actions
            .iter()
            .filter(|a| a.get("message").is_some() && a.get("level").is_some())
            .filter_map(|a| a["message"].as_str().map(str::to_string))
            .collect();
        if &got != logs {
            out.push_str(&text_diff(&logs.join("\n"), &got.join("\n"), "log messages"));
        }
    }
    if expect.actions.is_none() && !expect.no_actions && expect.routes.is_none() && expect.logs.is_none() {
        out.push_str("the case expects nothing; give `actions`, `no_actions`, `routes` or `logs`\n");
    }
    if events.is_empty() {
        out.push_str("the case has no events\n");
    }
    if out.is_empty() { Ok(()) } else { Err(out) }
}

/// The projection of `actual` onto the keys `expected` checks.
fn project(expected: &Map<String, Value>, actual: &Map<String, Value>) -> Map<String, Value> {
    expected
        .keys()
        .map(|k| (k.clone(), actual.get(k).cloned().unwrap_or(Value::Null)))
        .collect()
}

fn diff_actions(expected: &[Map<String, Value>], actual: &[Map<String, Value>]) -> Option<String> {
    let matches = expected.len() == actual.len() && expected.iter().zip(actual).all(|(e, a)| &project(e, a) == e);
    if matches {
        return None;
    }
    let render = |items: Vec<Map<String, Value>>| -> String {
        items
            .into_iter()
            .map(|m| serde_json::to_string_pretty(&Value::Object(m)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let shown_actual: Vec<Map<String, Value>> = actual
        .iter()
        .enumerate()
        .map(|(i, a)| match expected.get(i) {
            Some(e) if e.get("sink") == a.get("sink") => project(e, a),
            _ => a.clone(),
        })
        .collect();
    Some(text_diff(&render(expected.to_vec()), &render(shown_actual), "actions"))
}

fn text_diff(expected: &str, actual: &str, what: &str) -> String {
    let diff = similar::TextDiff::from_lines(expected, actual);
    let mut out = format!("{what} differ (- expected, + actual):\n");
    for change in diff.iter_all_changes() {
        let sign = match change.tag() {
            similar::ChangeTag::Delete => "-",
            similar::ChangeTag::Insert => "+",
            similar::ChangeTag::Equal => " ",
        };
        let line = change.value().trim_end_matches('\n');
        let _ = writeln!(out, "  {sign} {line}");
    }
    out
}
