//! Rule files as written (DESIGN.md §3): plain structs so every value keeps its line and column.

use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_saphyr::Spanned;

use crate::plan::{JobOptions, LogLevel};

/// A switchyard rules file: routes that map change events to actions.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "switchyard rules")]
pub struct RulesFile {
    /// The rules format version; `1` is the only one.
    #[schemars(with = "u32", example = 1)]
    pub version: Spanned<u32>,
    /// Constants every predicate and template can read by name; merged across files, no duplicates.
    #[serde(default)]
    #[schemars(with = "IndexMap<String, Value>", example = example_vars())]
    pub vars: IndexMap<String, Spanned<Value>>,
    /// The routes, evaluated in file order; every route whose `when` (and `guard`) hold fires.
    #[serde(default)]
    #[schemars(example = example_routes())]
    pub routes: Vec<RouteSpec>,
}

fn example_routes() -> Value {
    serde_json::json!([{
        "name": "invalidate-order-cache",
        "channel": "orders",
        "when": "changed_any([\"Status\", \"BillingAddress\"])",
        "then": [{"sink": "invalidate-cache", "keys": ["orders:detail:{{record_id}}"]}]
    }])
}

fn example_actions() -> Value {
    serde_json::json!([{"sink": "log", "message": "Order already has WHMCS Order ID, skipping provisioning"}])
}

fn example_on_failure() -> Value {
    serde_json::json!([{
        "sink": "salesforce-update",
        "object": "Order",
        "fields": {
            "Activation_Status__c": "Failed",
            "Activation_Error_Code__c": "SWITCHYARD_ENQUEUE_FAILED",
            "Activation_Error_Message__c": "{{failure.reason}}"
        },
        "idempotency_key": "activation-failed-{{record_id}}-{{header.commit_timestamp}}"
    }])
}

fn example_vars() -> Value {
    serde_json::json!({"trigger_statuses": ["Approved", "Reactivate"]})
}

/// One route: which events it takes (`channel`, `when`), what it reads (`enrich`), and what it does.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// A unique name, shown in logs, metrics and dead letters.
    #[schemars(with = "String", example = &"provision-on-activating")]
    pub name: Spanned<String>,
    /// A channel alias from the config (`orders`) or a literal channel (`/data/OrderChangeEvent`).
    /// The route's mode follows: `/data/...` is CDC, `/event/...` is platform-event.
    #[schemars(with = "String", example = &"orders")]
    pub channel: Spanned<String>,
    /// CDC only: the entity whose changes this route takes (`Order`), for channels that carry several
    /// (`/data/ChangeEvents`, a custom channel `/data/Orders__chn`). Events of other entities never reach the route:
    /// it is not a candidate for them (nor shown as not matched). Field names are checked against that entity's
    /// schema.
    #[serde(default)]
    #[schemars(with = "Option<String>", example = &"Order")]
    pub entity: Option<Spanned<String>>,
    /// Optional free text for people reading the rules.
    #[serde(default)]
    #[schemars(example = &"Start provisioning when an approved order becomes Activating")]
    pub description: Option<String>,
    /// A Rhai predicate over the event only (no `record`): cheap, evaluated for every event of the channel.
    #[schemars(with = "String", example = &"became(\"Activation_Status__c\", \"Activating\")")]
    pub when: Spanned<String>,
    /// The record to read once `when` passed; its fields become `record` in `guard` and templates.
    #[serde(default)]
    #[schemars(example = serde_json::json!({"object": "Order", "fields": ["WHMCS_Order_ID__c", "AccountId"]}))]
    pub enrich: Option<EnrichSpec>,
    /// A Rhai predicate that may also use `record`; when it fails, the `else` actions run.
    #[serde(default)]
    #[schemars(with = "Option<String>", example = &"has_record() && is_blank(record.WHMCS_Order_ID__c)")]
    pub guard: Option<Spanned<String>>,
    /// Platform events only: the record id this route works on (`"{{event.Order_Id__c}}"`).
    #[serde(default)]
    #[schemars(with = "Option<String>", example = &"{{event.Order_Id__c}}")]
    pub record_id: Option<Spanned<String>>,
    /// Actions run, in order, when `when` and `guard` hold.
    #[serde(default)]
    #[schemars(with = "Vec<ActionSpec>", example = example_actions())]
    pub then: Vec<Spanned<ActionSpec>>,
    /// Actions run, in order, when `when` held but `guard` did not.
    #[serde(default, rename = "else")]
    #[schemars(with = "Vec<ActionSpec>", example = example_actions())]
    pub otherwise: Vec<Spanned<ActionSpec>>,
    /// Actions run once, in order, when one of this route's actions could not be done: its sink failed for good
    /// (a permanent error, or retries exhausted) and it was dead-lettered. Their templates may read `failure`
    /// (`failure.reason`, `failure.sink`, `failure.action`, `failure.letter`). They do not run for a route that
    /// failed before acting (a predicate or enrichment error), a paused route, a `dead-letter` action, or a
    /// retried dead letter that fails again; an `on_failure` action that fails is dead-lettered like any other.
    #[serde(default)]
    #[schemars(with = "Vec<ActionSpec>", example = example_on_failure())]
    pub on_failure: Vec<Spanned<ActionSpec>>,
    /// When `when` held, evaluate no later route for this record.
    #[serde(default)]
    #[schemars(example = false)]
    pub stop: bool,
    /// Record what the route would do without calling any sink.
    #[serde(default)]
    #[schemars(example = false)]
    pub shadow: bool,
    /// The runaway guard: fired more often than this, the route is paused on every replica (its actions are
    /// dead-lettered with the reason until `switchyard route resume`). Default: the config's `route_limit`.
    #[serde(default)]
    #[schemars(example = serde_json::json!({"fires": 100, "per": "1m"}))]
    pub limit: Option<crate::plan::Limit>,
}

/// The record to read for a route.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EnrichSpec {
    /// The Salesforce object (`Order`).
    #[schemars(example = &"Order")]
    pub object: String,
    /// The fields to read; each is a key of `record` (null when empty).
    #[schemars(example = vec!["WHMCS_Order_ID__c".to_string(), "AccountId".to_string()])]
    pub fields: Vec<String>,
}

/// One action: the sink to call and that sink kind's keys.
///
/// `queue` sinks take `job`, `idempotency_key`, `job_options`; `cache-invalidate` sinks take `keys`,
/// `patterns`, `publish`; `log` sinks take `message`, `level`, `fields`; `webhook` sinks take `body`,
/// `headers`, `idempotency_key`; the built-in `dead-letter` takes `reason`; the built-in `salesforce-update` takes
/// `object`, `id`, `fields`, `idempotency_key`. Strings are templates (`{{record_id}}`).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ActionSpec {
    /// A sink name from the config, or the built-in `dead-letter`.
    #[schemars(with = "String", example = &"enqueue-provisioning")]
    pub sink: Spanned<String>,
    /// queue: the job data; string values are templates, a whole `{{...}}` keeps its JSON type.
    #[serde(default)]
    #[schemars(with = "Option<IndexMap<String, Value>>", example = example_job())]
    pub job: Option<IndexMap<String, Spanned<Value>>>,
    /// queue: the key that makes the action idempotent; also the BullMQ job id. Must render completely.
    /// webhook: optional; sent as the `Idempotency-Key` header, and a redelivered event does not POST again.
    /// salesforce-update: optional; a redelivered event does not write again.
    #[serde(default)]
    #[schemars(with = "Option<String>", example = &"activation-{{record_id}}-{{header.commit_timestamp}}")]
    pub idempotency_key: Option<Spanned<String>>,
    /// queue: BullMQ job options for this action, over the sink's defaults.
    #[serde(default)]
    #[schemars(example = serde_json::json!({"attempts": 5, "backoff": {"type": "exponential", "delay": 1000}}))]
    pub job_options: Option<JobOptions>,
    /// cache-invalidate: keys to UNLINK; a key with a missing part is skipped.
    #[serde(default)]
    #[schemars(with = "Option<Vec<String>>", example = vec!["orders:detail:{{record_id}}".to_string()])]
    pub keys: Option<Vec<Spanned<String>>>,
    /// cache-invalidate: glob patterns whose keys are found with SCAN (never KEYS) and UNLINKed.
    #[serde(default)]
    #[schemars(with = "Option<Vec<String>>", example = vec!["orders:list:{{record.AccountId}}:*".to_string()])]
    pub patterns: Option<Vec<Spanned<String>>>,
    /// cache-invalidate: a message to PUBLISH after the keys are gone.
    #[serde(default)]
    #[schemars(example = serde_json::json!({"channel": "orders:invalidated", "message": "{{record_id}}"}))]
    pub publish: Option<PublishSpec>,
    /// log: the message.
    #[serde(default)]
    #[schemars(with = "Option<String>", example = &"Order activation moved to Activating via CDC, enqueuing fulfillment")]
    pub message: Option<Spanned<String>>,
    /// log: the level.
    #[serde(default)]
    #[schemars(example = &"warn")]
    pub level: Option<LogLevel>,
    /// log: extra structured fields (templates). salesforce-update: the fields to set (API names; string values
    /// are templates, a whole `{{...}}` keeps its JSON type, `null` clears the field).
    #[serde(default)]
    #[schemars(with = "Option<IndexMap<String, Value>>", example = serde_json::json!({"account": "{{record.AccountId}}"}))]
    pub fields: Option<IndexMap<String, Spanned<Value>>>,
    /// webhook: the JSON body; string values are templates, a whole `{{...}}` keeps its JSON type.
    #[serde(default)]
    #[schemars(with = "Option<IndexMap<String, Value>>", example = serde_json::json!({"orderId": "{{record_id}}", "status": "{{event.Status}}"}))]
    pub body: Option<IndexMap<String, Spanned<Value>>>,
    /// webhook: request headers for this action (templates), added to the sink's configured headers.
    #[serde(default)]
    #[schemars(with = "Option<IndexMap<String, String>>", example = serde_json::json!({"X-Correlation-Id": "cdc-order-{{record_id}}"}))]
    pub headers: Option<IndexMap<String, Spanned<String>>>,
    /// salesforce-update: the sObject type to update (an API name: `Order`).
    #[serde(default)]
    #[schemars(with = "Option<String>", example = &"Order")]
    pub object: Option<Spanned<String>>,
    /// salesforce-update: the id of the record to update (template; default `{{record_id}}`).
    #[serde(default)]
    #[schemars(with = "Option<String>", example = &"{{record_id}}")]
    pub id: Option<Spanned<String>>,
    /// dead-letter: why the event is parked for an operator.
    #[serde(default)]
    #[schemars(with = "Option<String>", example = &"GAP_OVERFLOW for {{header.entity}}: resync needed")]
    pub reason: Option<Spanned<String>>,
}

fn example_job() -> Value {
    serde_json::json!({"sfOrderId": "{{record_id}}", "correlationId": "cdc-order-{{record_id}}"})
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishSpec {
    /// The Redis Pub/Sub channel.
    #[schemars(with = "String", example = &"orders:invalidated")]
    pub channel: Spanned<String>,
    /// The message (template).
    #[schemars(with = "String", example = &"{{record_id}}")]
    pub message: Spanned<String>,
}
