//! Shared bench data: the shipped order rules plus 100 generated routes, a deterministic event mix built
//! from the shapes of `examples/events/order-lifecycle.jsonl`, its Avro encoding, and the hand-written
//! native baseline of the shipped rules (the same decisions as Rust `if`s over the same `Event` type).
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use serde_json::{Map, Value, json};
use switchyard::event::{ChangeType, Event, EventKind, OVERFLOW_PLACEHOLDER_ID};
use switchyard::plan::JobOptions;
use switchyard::plan::LogLevel;
use switchyard::plan::{Action, Op, job_id_for};
use switchyard::router::Records;
use switchyard::rules::RuleSet;
use switchyard::rules::load::{self, RuleEnv, RuleSource};
use switchyard::sources::pubsub::avro::{CompiledSchema, RawEvent, SchemaRegistry};

pub const ORDER_CHANNEL: &str = "/data/OrderChangeEvent";
pub const FULFILMENT_CHANNEL: &str = "/event/Order_Fulfilment_Requested__e";

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where the 100 extra routes listen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extra {
    None,
    /// On 100 other CDC channels (`/data/Bench{i}ChangeEvent`): never candidates for the mix.
    OtherChannels,
    /// On the order channel: every one is a candidate for every order event (none fires).
    SameChannel,
}

/// 100 routes of the two shipped CDC shapes (an activation with enrich, guard and a queue action; a
/// cache invalidation on a field list), with their own field names and values so that none fires.
pub fn extra_routes(extra: Extra) -> String {
    let mut text = String::from("version: 1\nvars:\n  bench_statuses: [Approved, Reactivate]\nroutes:\n");
    for i in 0..100 {
        let channel = match extra {
            Extra::SameChannel => "orders".to_string(),
            _ => format!("/data/Bench{i}ChangeEvent"),
        };
        if i % 2 == 0 {
            text.push_str(&format!(
                r#"  - name: bench-provision-{i}
    channel: "{channel}"
    when: |
      became("Activation_Status__c", "Stage{i}")
        && (event.Status == () || event.Status in bench_statuses)
    enrich: {{ object: Order, fields: [WHMCS_Order_ID__c, AccountId] }}
    guard: has_record() && is_blank(record.WHMCS_Order_ID__c)
    then:
      - sink: enqueue-provisioning
        job: {{ sfOrderId: "{{{{record_id}}}}", accountId: "{{{{record.AccountId}}}}", stage: "{i}" }}
        idempotency_key: "bench-{i}-{{{{record_id}}}}-{{{{header.commit_timestamp}}}}"
"#
            ));
        } else {
            text.push_str(&format!(
                r#"  - name: bench-invalidate-{i}
    channel: "{channel}"
    when: |
      changed_any(["Bench_{i}_A__c", "Bench_{i}_B__c", "Bench_{i}_C__c", "Bench_{i}_D__c"])
        || header.change_type == "GAP_DELETE" && event.Status == "Bench{i}"
    enrich: {{ object: Order, fields: [AccountId] }}
    then:
      - sink: invalidate-cache
        keys: ["bench:{i}:{{{{record_id}}}}", "bench:{i}:account:{{{{record.AccountId}}}}"]
"#
            ));
        }
    }
    text
}

/// The shipped `rules/orders.yaml`, plus 100 generated routes. Every route is live (no mode), so the
/// platform-event routes see the platform events of the mix.
pub fn rules(extra: Extra) -> RuleSet {
    let path = repo().join("rules/orders.yaml");
    let mut sources = vec![RuleSource {
        text: std::fs::read_to_string(&path).expect("rules/orders.yaml is readable"),
        path,
    }];
    if extra != Extra::None {
        sources.push(RuleSource {
            path: repo().join("rules/bench-extra.yaml"),
            text: extra_routes(extra),
        });
    }
    let loaded = load::compile(&sources, &RuleEnv::defaults());
    match loaded.ruleset {
        Some(rules) => rules,
        None => panic!("bench rules do not load: {:?}", loaded.problems),
    }
}

/// The kinds of event in the mix, one per 20 events.
const MIX: [Kind; 20] = [
    Kind::Approval,
    Kind::CacheEdit,
    Kind::InternalEdit,
    Kind::Approval,
    Kind::CacheEdit,
    Kind::InternalEdit,
    Kind::Platform,
    Kind::AlreadyProvisioned,
    Kind::InternalEdit,
    Kind::CacheEdit,
    Kind::Approval,
    Kind::InternalEdit,
    Kind::Gap,
    Kind::NotFound,
    Kind::CacheEdit,
    Kind::InternalEdit,
    Kind::BulkApproval,
    Kind::CacheEdit,
    Kind::Platform,
    Kind::InternalEdit,
];

#[derive(Debug, Clone, Copy)]
enum Kind {
    /// Approval Flow: Status Approved, Activation_Status__c Activating, no WHMCS id: enqueue + log.
    Approval,
    /// One transaction approving three orders at once: three jobs.
    BulkApproval,
    /// Re-approval of an order that has a WHMCS id: the `else` log.
    AlreadyProvisioned,
    /// Approval of an order Salesforce no longer has: a warning, `stop`.
    NotFound,
    /// A customer-facing edit (address, status, description): cache invalidation.
    CacheEdit,
    /// Worker write-backs and system fields only: nothing to do.
    InternalEdit,
    /// Order_Fulfilment_Requested__e: enqueue + log.
    Platform,
    /// A gap event: ids but no values. The cache is invalidated and the order re-read: every other one is
    /// waiting for activation (enqueue + log), the rest were provisioned already (nothing more).
    Gap,
}

/// What the mix holds, for BENCHMARKS.md.
pub const MIX_DESCRIPTION: &str = "per 20 events: 3 approvals, 1 bulk approval (3 records), 1 re-approval of a provisioned \
order, 1 approval of a missing order, 5 cache-relevant edits, 6 internal-only edits, 2 platform events, 1 gap event \
(every other one re-checks an order waiting for activation)";

/// `n` deterministic events; `run` makes every id, record id and commit timestamp unique to it, so that
/// repeated end-to-end runs enqueue new jobs instead of hitting idempotency markers.
pub fn event_mix(n: usize, run: u64) -> Vec<Event> {
    (0..n).map(|i| event(MIX[i % MIX.len()], i as u64, run)).collect()
}

fn order_id(run: u64, i: u64, k: u64) -> String {
    // 18 characters, like a Salesforce Order id, unique per (run, event, record).
    format!("801{:07}{:05}{k}AA", run % 10_000_000, i % 100_000)
}

fn event(kind: Kind, i: u64, run: u64) -> Event {
    let ts = 1_764_230_400_000 + (run * 1_000_000 + i) as i64;
    let tx = format!("tx-{run}-{i}");
    let id = order_id(run, i, 0);
    let account = format!("001{:07}{:05}0AA", run % 10_000_000, i % 100_000);
    let record = |whmcs: Value| json!({ id.clone(): {"WHMCS_Order_ID__c": whmcs, "AccountId": account} });
    let (change_type, ids, changed, nulled, fields, records): (&str, Vec<String>, Vec<&str>, Vec<&str>, Value, Value) =
        match kind {
            Kind::Approval | Kind::AlreadyProvisioned | Kind::NotFound => (
                "UPDATE",
                vec![id.clone()],
                vec![
                    "Status",
                    "Activation_Status__c",
                    "Activation_Error_Code__c",
                    "Activation_Error_Message__c",
                    "LastModifiedDate",
                ],
                vec!["Activation_Error_Code__c", "Activation_Error_Message__c"],
                json!({"Status": if i % 7 == 3 { "Reactivate" } else { "Approved" }, "Activation_Status__c": "Activating",
                       "Activation_Error_Code__c": null, "Activation_Error_Message__c": null, "LastModifiedDate": ts}),
                match kind {
                    Kind::Approval => record(Value::Null),
                    Kind::AlreadyProvisioned => record(json!(format!("WH-{i}"))),
                    _ => json!({ id.clone(): null }),
                },
            ),
            Kind::BulkApproval => {
                let ids: Vec<String> = (0..3).map(|k| order_id(run, i, k)).collect();
                let records: Map<String, Value> = ids
                    .iter()
                    .map(|id| (id.clone(), json!({"WHMCS_Order_ID__c": null, "AccountId": account})))
                    .collect();
                (
                    "UPDATE",
                    ids,
                    vec!["Activation_Status__c", "LastModifiedDate"],
                    vec![],
                    json!({"Activation_Status__c": "Activating", "LastModifiedDate": ts}),
                    Value::Object(records),
                )
            }
            Kind::CacheEdit => {
                let (changed, fields): (Vec<&str>, Value) = match i % 3 {
                    0 => (
                        vec!["BillingAddress.City", "BillingAddress.PostalCode", "LastModifiedDate"],
                        json!({"BillingAddress": {"City": "Osaka", "PostalCode": "530-0001"}, "LastModifiedDate": ts}),
                    ),
                    1 => (
                        vec!["Status", "LastModifiedDate"],
                        json!({"Status": "Cancelled", "LastModifiedDate": ts}),
                    ),
                    _ => (
                        vec!["Description", "LastModifiedDate"],
                        json!({"Description": format!("Gift wrap, please ({i})"), "LastModifiedDate": ts}),
                    ),
                };
                (
                    "UPDATE",
                    vec![id.clone()],
                    changed,
                    vec![],
                    fields,
                    json!({ id.clone(): {"AccountId": account} }),
                )
            }
            Kind::InternalEdit => {
                let (changed, fields): (Vec<&str>, Value) = if i.is_multiple_of(2) {
                    (
                        vec!["Activation_Status__c", "WHMCS_Order_ID__c", "LastModifiedDate"],
                        json!({"Activation_Status__c": "Activated", "WHMCS_Order_ID__c": format!("WH-{i}"), "LastModifiedDate": ts}),
                    )
                } else {
                    (
                        vec!["Activation_Status__c", "Activation_Error_Code__c", "LastModifiedDate"],
                        json!({"Activation_Status__c": "Failed", "Activation_Error_Code__c": "E42", "LastModifiedDate": ts}),
                    )
                };
                ("UPDATE", vec![id.clone()], changed, vec![], fields, json!({}))
            }
            Kind::Gap => {
                let waiting = (i / MIX.len() as u64).is_multiple_of(2);
                let fields = if waiting {
                    json!({"Activation_Status__c": "Activating", "Status": "Approved", "WHMCS_Order_ID__c": null,
                           "AccountId": account})
                } else {
                    json!({"Activation_Status__c": "Activated", "Status": "Activated",
                           "WHMCS_Order_ID__c": format!("WH-{i}"), "AccountId": account})
                };
                let records = json!({ id.clone(): fields });
                ("GAP_UPDATE", vec![id.clone()], vec![], vec![], json!({}), records)
            }
            Kind::Platform => {
                let uuid = format!("5b1f3c2e-8d7a-4f0e-{:04x}-{:012x}", run % 0xffff, i);
                let fields = json!({"CreatedDate": ts, "CreatedById": "005xx0000000001AAA", "Order_Id__c": id,
                    "Idempotency_Key__c": format!("ofr-{id}-{run}"), "Correlation_Id__c": format!("corr-{uuid}")});
                let line = json!({"id": uuid, "channel": FULFILMENT_CHANNEL, "kind": "platform",
                    "replay_id": format!("{:016x}", i + 1), "fields": fields, "record": record(Value::Null)});
                return Event::from_json(&line.to_string()).expect("platform event of the mix is valid");
            }
        };
    let line = json!({
        "id": format!("{tx}:1"), "channel": ORDER_CHANNEL, "kind": "change", "replay_id": format!("{:016x}", i + 1),
        "header": {"entity": "Order", "change_type": change_type, "record_ids": ids, "changed_fields": changed,
                   "nulled_fields": nulled, "diff_fields": [], "change_origin": "com/salesforce/api/rest/62.0",
                   "transaction_key": tx, "sequence_number": 1, "commit_timestamp": ts, "commit_number": i,
                   "commit_user": "005xx0000000001AAA"},
        "fields": fields, "record": records,
    });
    Event::from_json(&line.to_string()).expect("change event of the mix is valid")
}

/// Events as the Pub/Sub API delivers them: Avro payload, schema id, replay id.
pub struct Wire {
    pub event_id: String,
    pub schema_id: String,
    pub channel: String,
    pub payload: Vec<u8>,
    pub replay_id: Vec<u8>,
    /// What the enricher returns for the event (taken from the recorded `record`).
    pub records: Records,
}

impl Wire {
    pub fn raw(&self) -> RawEvent<'_> {
        RawEvent {
            event_id: &self.event_id,
            schema_id: &self.schema_id,
            payload: &self.payload,
            replay_id: &self.replay_id,
        }
    }
}

/// The registry with the two shipped Avro schemas.
pub fn registry() -> SchemaRegistry {
    let mut registry = SchemaRegistry::new();
    for file in ["OrderChangeEvent.avsc", "Order_Fulfilment_Requested__e.avsc"] {
        let json = std::fs::read_to_string(repo().join("schemas/avro").join(file)).expect("schema is readable");
        registry.insert_compiled(CompiledSchema::parse(&json).expect("shipped schema parses"));
    }
    registry
}

/// Encodes the events with the real writer (bitmaps included).
pub fn encode(registry: &SchemaRegistry, events: &[Event]) -> Vec<Wire> {
    let order = schema_of(registry, "OrderChangeEvent");
    let fulfilment = schema_of(registry, "Order_Fulfilment_Requested__e");
    events
        .iter()
        .map(|e| {
            let schema = if e.kind() == EventKind::Change {
                &order
            } else {
                &fulfilment
            };
            let payload = schema.encode(e).unwrap_or_else(|err| panic!("{}: {err}", e.id));
            let replay = e.replay_id.as_deref().unwrap_or("00");
            Wire {
                event_id: e.id.clone(),
                schema_id: schema.fingerprint().to_string(),
                channel: e.channel.clone(),
                payload,
                replay_id: (0..replay.len() / 2)
                    .map(|i| u8::from_str_radix(&replay[2 * i..2 * i + 2], 16).expect("hex replay id"))
                    .collect(),
                records: e.record.iter().map(|(k, v)| (k.clone(), Ok(v.clone()))).collect(),
            }
        })
        .collect()
}

fn schema_of(registry: &SchemaRegistry, name: &str) -> std::sync::Arc<CompiledSchema> {
    for file in ["OrderChangeEvent.avsc", "Order_Fulfilment_Requested__e.avsc"] {
        let json = std::fs::read_to_string(repo().join("schemas/avro").join(file)).expect("schema is readable");
        let parsed = CompiledSchema::parse(&json).expect("shipped schema parses");
        if parsed.name() == name {
            return registry.get(parsed.fingerprint()).expect("registered").clone();
        }
    }
    panic!("no schema {name}")
}

// ---------------------------------------------------------------------------------------------------
// Native baseline: `rules/orders.yaml` written by hand, producing the very same actions.
// ---------------------------------------------------------------------------------------------------

const CUSTOMER_FACING: [&str; 10] = [
    "Status",
    "BillingAddress",
    "ShippingAddress",
    "EffectiveDate",
    "EndDate",
    "TotalAmount",
    "Description",
    "Name",
    "PoNumber",
    "Type",
];

fn changed(changed: &[String], field: &str) -> bool {
    changed
        .iter()
        .any(|c| c == field || (c.len() > field.len() && c.starts_with(field) && c.as_bytes()[field.len()] == b'.'))
}

fn is_blank(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s.trim().is_empty(),
        Some(Value::Array(a)) => a.is_empty(),
        Some(Value::Object(m)) => m.is_empty(),
        Some(_) => false,
    }
}

/// `event.Status == () || event.Status in trigger_statuses`.
fn trigger_status(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s == "Approved" || s == "Reactivate",
        Some(_) => false,
    }
}

fn non_null(v: Option<&Value>) -> Option<&Value> {
    v.filter(|v| !v.is_null())
}

fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn action(route: &str, sink: &str, record_id: Option<&str>, op: Op) -> Action {
    Action {
        route: route.to_string(),
        sink: sink.to_string(),
        record_id: record_id.map(str::to_string),
        shadow: false,
        on_failure: false,
        op,
    }
}

fn log(level: LogLevel, message: String, fields: Map<String, Value>) -> Op {
    Op::Log { level, message, fields }
}

/// The record the enricher read: `Some(fields)` when found.
fn record_of<'a>(records: &'a Records, id: &str) -> Option<&'a Map<String, Value>> {
    match records.get(id) {
        Some(Ok(Some(fields))) => Some(fields),
        _ => None,
    }
}

fn enqueue(route: &str, id: &str, key: String, account: Option<&Value>, correlation: String) -> Action {
    let data = json!({
        "sfOrderId": id,
        "accountId": account.cloned().unwrap_or(Value::Null),
        "idempotencyKey": key,
        "correlationId": correlation,
    });
    action(
        route,
        "enqueue-provisioning",
        Some(id),
        Op::Enqueue {
            job_id: job_id_for(&key),
            idempotency_key: key,
            data,
            options: JobOptions::default(),
        },
    )
}

fn provision(
    route: &str,
    id: &str,
    record: Option<&Map<String, Value>>,
    key: String,
    correlation: String,
    how: &str,
) -> [Action; 2] {
    let account = record.and_then(|r| non_null(r.get("AccountId")));
    let whmcs = record.and_then(|r| r.get("WHMCS_Order_ID__c"));
    if record.is_some() && is_blank(whmcs) {
        let mut fields = Map::new();
        fields.insert("sfOrderId".into(), Value::from(id));
        fields.insert("correlationId".into(), Value::from(correlation.clone()));
        let message = format!("Order {how}, enqueuing fulfillment");
        let job = enqueue(route, id, key, account, correlation);
        [
            job,
            action(route, "log", Some(id), log(LogLevel::Info, message, fields)),
        ]
    } else {
        let mut fields = Map::new();
        fields.insert("sfOrderId".into(), Value::from(id));
        fields.insert("whmcsOrderId".into(), non_null(whmcs).cloned().unwrap_or(Value::Null));
        let message = "Order already has WHMCS Order ID, skipping provisioning".to_string();
        let skip = action(route, "log", Some(id), log(LogLevel::Info, message, fields));
        // The array keeps one shape; the caller takes only the first action of an `else`.
        [skip.clone(), skip]
    }
}

/// `ignored_change_origins` of the shipped rules: the provisioning worker's own writes.
const IGNORED_CHANGE_ORIGIN: &str = "client=switchyard-provisioning";

/// The decisions of `rules/orders.yaml` for one event, hand-written: the same actions, in the same order.
pub fn native_decide(event: &Event, records: &Records) -> Vec<Action> {
    let mut out = Vec::new();
    match &event.header {
        Some(header) => {
            let ct = header.change_type;
            let commit = header.commit_timestamp.map(|t| t.to_string()).unwrap_or_default();
            for id in &header.record_ids {
                let record = if id == OVERFLOW_PLACEHOLDER_ID {
                    None
                } else {
                    record_of(records, id)
                };
                if ct == ChangeType::GapOverflow {
                    let message =
                        format!("Order change overflow at commit {commit}: resync the orders changed since then");
                    let reason = format!(
                        "GAP_OVERFLOW on {} at commit {commit}: resync the orders changed since then",
                        header.entity
                    );
                    out.push(action(
                        "overflow-needs-resync",
                        "log",
                        Some(id),
                        log(LogLevel::Error, message, Map::new()),
                    ));
                    out.push(action(
                        "overflow-needs-resync",
                        "dead-letter",
                        Some(id),
                        Op::DeadLetter { reason },
                    ));
                    continue; // stop: true
                }
                if CUSTOMER_FACING.iter().any(|f| changed(&header.changed_fields, f))
                    || ct.is_gap()
                    || matches!(ct, ChangeType::Delete | ChangeType::Undelete)
                {
                    let mut keys = vec![format!("orders:detail:{id}")];
                    if let Some(account) = record.and_then(|r| non_null(r.get("AccountId"))) {
                        keys.push(format!("orders:account:{}", text_of(account)));
                    }
                    out.push(action(
                        "invalidate-order-cache",
                        "invalidate-cache",
                        Some(id),
                        Op::Invalidate {
                            keys,
                            patterns: Vec::new(),
                            publish: None,
                        },
                    ));
                }
                let activating = event.fields.get("Activation_Status__c").and_then(Value::as_str) == Some("Activating");
                let became = match ct {
                    ChangeType::Update => changed(&header.changed_fields, "Activation_Status__c") && activating,
                    ChangeType::Create | ChangeType::Undelete => activating,
                    _ => false,
                };
                let status_ok = trigger_status(event.fields.get("Status"));
                let loop_guard = header
                    .change_origin
                    .as_deref()
                    .is_some_and(|o| o.contains(IGNORED_CHANGE_ORIGIN));
                if ct.is_gap() && ct != ChangeType::GapDelete {
                    let waiting = record.is_some_and(|r| {
                        r.get("Activation_Status__c").and_then(Value::as_str) == Some("Activating")
                            && is_blank(r.get("WHMCS_Order_ID__c"))
                            && trigger_status(r.get("Status"))
                    });
                    if waiting {
                        let key = format!("activation-{id}-{commit}");
                        let account = record.and_then(|r| non_null(r.get("AccountId")));
                        out.push(enqueue(
                            "gap-recheck-activation",
                            id,
                            key,
                            account,
                            format!("cdc-gap-order-{id}"),
                        ));
                        let mut fields = Map::new();
                        fields.insert("sfOrderId".into(), Value::from(id.as_str()));
                        fields.insert("changeType".into(), Value::from(ct.as_str()));
                        let message =
                            "Gap event for an order waiting for activation, enqueuing fulfillment".to_string();
                        out.push(action(
                            "gap-recheck-activation",
                            "log",
                            Some(id),
                            log(LogLevel::Info, message, fields),
                        ));
                    }
                }
                if !(became && status_ok && !loop_guard) {
                    continue;
                }
                if record.is_none() {
                    let message = format!("Order {id} not found in Salesforce, skipping provisioning");
                    out.push(action(
                        "activation-order-not-found",
                        "log",
                        Some(id),
                        log(LogLevel::Warn, message, Map::new()),
                    ));
                    continue; // stop: true
                }
                let key = format!("activation-{id}-{commit}");
                let correlation = format!("cdc-order-{id}");
                let [a, b] = provision(
                    "provision-on-activating",
                    id,
                    record,
                    key,
                    correlation,
                    "activation moved to Activating via CDC",
                );
                let then = matches!(a.op, Op::Enqueue { .. });
                out.push(a);
                if then {
                    out.push(b);
                }
            }
        }
        None if event.channel == FULFILMENT_CHANNEL => {
            let order = event.fields.get("Order_Id__c");
            if is_blank(order) {
                let reason = format!("Order_Fulfilment_Requested__e {} carries no Order_Id__c", event.id);
                out.push(action(
                    "fulfilment-request-without-order",
                    "dead-letter",
                    None,
                    Op::DeadLetter { reason },
                ));
                return out;
            }
            let id = text_of(order.expect("not blank"));
            let record = record_of(records, &id);
            let or_event_id = |field: &str| {
                non_null(event.fields.get(field))
                    .map(text_of)
                    .unwrap_or_else(|| event.id.clone())
            };
            let key = or_event_id("Idempotency_Key__c");
            let correlation = or_event_id("Correlation_Id__c");
            let [a, b] = provision(
                "provision-on-fulfilment-request",
                &id,
                record,
                key,
                correlation,
                "fulfilment requested via Platform Event",
            );
            let then = matches!(a.op, Op::Enqueue { .. });
            out.push(a);
            if then {
                out.push(b);
            }
        }
        None => {}
    }
    out
}

/// What a hand-written integration does with the enrichment: read exactly the records its decisions need.
pub fn records_for(event: &Event) -> Records {
    event.record.iter().map(|(k, v)| (k.clone(), Ok(v.clone()))).collect()
}

/// Checks once, before timing, that the baseline decides exactly what the engine decides.
pub fn assert_same_decisions(rules: &RuleSet, registry: &SchemaRegistry, wire: &[Wire]) {
    let mut fired = HashMap::<String, usize>::new();
    for w in wire {
        let event = registry.decode(&w.channel, &w.raw()).expect("mix decodes");
        let needs = switchyard::router::needs(rules, &event);
        let plan = switchyard::router::plan(rules, &event, needs, &w.records);
        let native = native_decide(&event, &w.records);
        assert_eq!(plan.actions, native, "engine and baseline differ on {}", event.id);
        for a in &plan.actions {
            *fired.entry(a.sink.clone()).or_default() += 1;
        }
    }
    assert!(
        fired.len() >= 3,
        "the mix exercises queue, cache and log actions: {fired:?}"
    );
}

// ---------------------------------------------------------------------------------------------------
// Measurement: CPU time of the benchmarking thread.
// ---------------------------------------------------------------------------------------------------

/// Criterion measurement in CPU time of the bench thread (`CLOCK_THREAD_CPUTIME_ID`): "events per second on
/// one core" even while other processes share the cores (wall time then counts their turns too).
pub struct CpuTime;

impl criterion::measurement::Measurement for CpuTime {
    type Intermediate = cpu_time::ThreadTime;
    type Value = std::time::Duration;

    fn start(&self) -> Self::Intermediate {
        cpu_time::ThreadTime::now()
    }
    fn end(&self, start: Self::Intermediate) -> Self::Value {
        start.elapsed()
    }
    fn add(&self, a: &Self::Value, b: &Self::Value) -> Self::Value {
        *a + *b
    }
    fn zero(&self) -> Self::Value {
        std::time::Duration::ZERO
    }
    fn to_f64(&self, value: &Self::Value) -> f64 {
        value.as_nanos() as f64
    }
    fn formatter(&self) -> &dyn criterion::measurement::ValueFormatter {
        &NanosFormatter
    }
}

/// Formats nanoseconds and elements per second like criterion's own wall-time formatter.
struct NanosFormatter;

impl criterion::measurement::ValueFormatter for NanosFormatter {
    fn scale_values(&self, ns: f64, values: &mut [f64]) -> &'static str {
        let (factor, unit) = match ns {
            ns if ns < 1e3 => (1.0, "ns"),
            ns if ns < 1e6 => (1e-3, "µs"),
            ns if ns < 1e9 => (1e-6, "ms"),
            _ => (1e-9, "s"),
        };
        values.iter_mut().for_each(|v| *v *= factor);
        unit
    }

    fn scale_throughputs(&self, ns: f64, throughput: &criterion::Throughput, values: &mut [f64]) -> &'static str {
        let per_iteration = match *throughput {
            criterion::Throughput::Elements(n) | criterion::Throughput::Bytes(n) | criterion::Throughput::Bits(n) => {
                n as f64
            }
            criterion::Throughput::BytesDecimal(n) => n as f64,
        };
        let per_second = per_iteration * 1e9 / ns;
        let (factor, unit) = match per_second {
            p if p < 1e3 => (1.0, "elem/s"),
            p if p < 1e6 => (1e-3, "Kelem/s"),
            _ => (1e-6, "Melem/s"),
        };
        values.iter_mut().for_each(|v| *v = per_iteration * 1e9 / *v * factor);
        unit
    }

    fn scale_for_machines(&self, _values: &mut [f64]) -> &'static str {
        "ns"
    }
}
