//! The sandboxed Rhai engine and the CDC helpers predicates call (`changed`, `became`, ...).
//!
//! Helpers such as `changed(f)` take no event argument, yet must see the event being evaluated. A native
//! function cannot see the Scope, and a `sync` Engine is shared by every thread, so the router sets a
//! thread-local to the current event around each (synchronous) evaluation and the helpers read it.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rhai::{Array, Dynamic, Engine, ImmutableString};
use serde_json::{Map, Value};

use crate::event::{ChangeType, Event};
use crate::rules::reads::Fields;

/// Upper bound of operations for one predicate: far above any real rule, low enough that a runaway
/// expression (`(0..1_000_000_000).len()`) fails in milliseconds instead of stalling the stream.
const MAX_OPERATIONS: u64 = 100_000;
/// Nesting limits for expressions (global, inside functions) and calls.
const MAX_EXPR_DEPTH: usize = 64;
const MAX_FN_EXPR_DEPTH: usize = 32;
const MAX_CALL_LEVELS: usize = 16;
/// Sizes a predicate may build: enough for any field value, small enough to bound memory.
const MAX_STRING_SIZE: usize = 64 * 1024;
const MAX_ARRAY_SIZE: usize = 10_000;
const MAX_MAP_SIZE: usize = 10_000;

/// What the helpers know about the event (and record) being evaluated.
pub struct HelperCtx {
    change_type: Option<ChangeType>,
    // Lists, not sets: `in_set` scans for nested names (`f.*`) anyway, and an event changes a handful of
    // fields, so hashing them only cost time.
    changed: Vec<String>,
    nulled: Vec<String>,
    fields: Map<String, Value>,
    has_record: AtomicBool,
}

impl HelperCtx {
    pub fn new(event: &Event) -> Arc<HelperCtx> {
        Self::reading(event, &Fields::All)
    }

    /// The context with only the payload fields `became` can look up (see [`crate::rules::reads`]).
    pub fn reading(event: &Event, became: &Fields) -> Arc<HelperCtx> {
        let header = event.header.as_ref();
        let fields = match became {
            Fields::All => event.fields.clone(),
            Fields::Only(names) => names
                .iter()
                .filter_map(|n| event.fields.get(n).map(|v| (n.clone(), v.clone())))
                .collect(),
        };
        Arc::new(HelperCtx {
            change_type: header.map(|h| h.change_type),
            changed: header.map(|h| h.changed_fields.clone()).unwrap_or_default(),
            nulled: header.map(|h| h.nulled_fields.clone()).unwrap_or_default(),
            fields,
            has_record: AtomicBool::new(false),
        })
    }

    pub fn set_has_record(&self, found: bool) {
        self.has_record.store(found, Ordering::Relaxed);
    }

    fn field(&self, path: &str) -> Option<&Value> {
        crate::event::lookup_path(&self.fields, path.split('.'))
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Arc<HelperCtx>>> = const { RefCell::new(None) };
}

/// Runs `f` with `ctx` visible to the helpers on this thread, restoring what was there before.
pub fn with_ctx<R>(ctx: &Arc<HelperCtx>, f: impl FnOnce() -> R) -> R {
    let previous = CURRENT.with(|c| c.replace(Some(ctx.clone())));
    let result = f();
    CURRENT.with(|c| *c.borrow_mut() = previous);
    result
}

fn current<R>(default: R, f: impl FnOnce(&HelperCtx) -> R) -> R {
    CURRENT.with(|c| c.borrow().as_deref().map(f).unwrap_or(default))
}

/// Whether `field`, or a field nested in it (`field.*`), is in `set`.
pub(crate) fn in_set(set: &[String], field: &str) -> bool {
    set.iter().any(|c| covers(field, c))
}

/// Whether `field` is `name` or a field nested in it (`name.*`).
pub(crate) fn covers(name: &str, field: &str) -> bool {
    field.starts_with(name) && (field.len() == name.len() || field.as_bytes()[name.len()] == b'.')
}

/// The string items of a list, shared, not copied (predicates call this for every event).
fn names(list: &Array) -> impl Iterator<Item = ImmutableString> + '_ {
    list.iter()
        .filter_map(|v| v.read_lock::<ImmutableString>().map(|s| s.clone()))
}

/// JSON equality as predicates expect it: numbers compare by value (`1 == 1.0`).
fn json_eq(field: Option<&Value>, expected: &Dynamic) -> bool {
    let field = field.unwrap_or(&Value::Null);
    // The usual cases (`became("Status", "Approved")`) compare without converting the expected value.
    if let Some(s) = expected.read_lock::<ImmutableString>() {
        return field.as_str() == Some(s.as_str());
    }
    if expected.is_unit() {
        return field.is_null();
    }
    let expected: Value = rhai::serde::from_dynamic(expected).unwrap_or(Value::Null);
    match (field, &expected) {
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (a, b) => a == b,
    }
}

/// `changed(f)`: f, or any `f.*` nested field, is in the changed fields.
fn changed(field: &str) -> bool {
    current(false, |c| in_set(&c.changed, field))
}

/// `became(f, v)`: UPDATE with f changed and now v; CREATE or UNDELETE with f equal to v.
fn became(field: &str, value: Dynamic) -> bool {
    current(false, |c| match c.change_type {
        Some(ChangeType::Update) => in_set(&c.changed, field) && json_eq(c.field(field), &value),
        Some(ChangeType::Create | ChangeType::Undelete) => json_eq(c.field(field), &value),
        _ => false,
    })
}

/// `is_blank(v)`: unit, an empty or whitespace string, an empty array or map.
fn is_blank(value: Dynamic) -> bool {
    if value.is_unit() {
        return true;
    }
    if let Some(s) = value.read_lock::<rhai::ImmutableString>() {
        return s.trim().is_empty();
    }
    if let Some(a) = value.read_lock::<Array>() {
        return a.is_empty();
    }
    if let Some(m) = value.read_lock::<rhai::Map>() {
        return m.is_empty();
    }
    false
}

/// A helper function of the rule language, as `validate`'s messages (and editors) show it.
pub struct Helper {
    pub name: &'static str,
    pub signature: &'static str,
    pub doc: &'static str,
}

/// Every helper [`engine`] registers, in the README's order.
pub const HELPERS: &[Helper] = &[
    Helper {
        name: "changed",
        signature: "changed(field)",
        doc: "the field, or any of its parts (`BillingAddress.City`), is among the changed fields",
    },
    Helper {
        name: "changed_any",
        signature: "changed_any(list)",
        doc: "any field of the list changed",
    },
    Helper {
        name: "changed_only",
        signature: "changed_only(list)",
        doc: "something changed, and every changed field is covered by the list",
    },
    Helper {
        name: "became",
        signature: "became(field, value)",
        doc: "UPDATE: the field changed and now equals the value; CREATE/UNDELETE: it equals the value",
    },
    Helper {
        name: "nulled",
        signature: "nulled(field)",
        doc: "the field was set to null by this change",
    },
    Helper {
        name: "is_blank",
        signature: "is_blank(value)",
        doc: "the value is `()`, an empty or blank string, an empty list or map",
    },
    Helper {
        name: "is_gap",
        signature: "is_gap()",
        doc: "the event is a GAP_* event (ids but no values)",
    },
    Helper {
        name: "contains_any",
        signature: "contains_any(text, list)",
        doc: "the text contains any non-empty string of the list",
    },
    Helper {
        name: "has_record",
        signature: "has_record()",
        doc: "the enrichment found the record (in `guard`)",
    },
];

/// The one [`engine`] of the process, shared by every loaded rule set (building one costs more than a fifth of a
/// rule load; it holds no state between evaluations).
pub fn shared_engine() -> std::sync::Arc<Engine> {
    static ENGINE: std::sync::LazyLock<std::sync::Arc<Engine>> =
        std::sync::LazyLock::new(|| std::sync::Arc::new(engine()));
    ENGINE.clone()
}

/// The sandboxed engine every predicate is compiled and evaluated with.
pub fn engine() -> Engine {
    let mut engine = Engine::new();
    engine.set_strict_variables(true);
    engine.set_max_operations(MAX_OPERATIONS);
    engine.set_max_expr_depths(MAX_EXPR_DEPTH, MAX_FN_EXPR_DEPTH);
    engine.set_max_call_levels(MAX_CALL_LEVELS);
    engine.set_max_string_size(MAX_STRING_SIZE);
    engine.set_max_array_size(MAX_ARRAY_SIZE);
    engine.set_max_map_size(MAX_MAP_SIZE);
    engine.set_module_resolver(rhai::module_resolvers::DummyModuleResolver::new());
    engine.disable_symbol("eval");
    engine.on_print(|_| {});
    engine.on_debug(|_, _, _| {});

    engine.register_fn("changed", changed);
    engine.register_fn("changed_any", |list: Array| {
        current(false, |c| names(&list).any(|f| in_set(&c.changed, &f)))
    });
    engine.register_fn("changed_only", |list: Array| {
        let allowed: Vec<ImmutableString> = names(&list).collect();
        current(false, |c| {
            !c.changed.is_empty() && c.changed.iter().all(|f| allowed.iter().any(|a| covers(a, f)))
        })
    });
    engine.register_fn("became", became);
    engine.register_fn("nulled", |field: &str| current(false, |c| in_set(&c.nulled, field)));
    engine.register_fn("is_blank", is_blank);
    engine.register_fn("is_gap", || {
        current(false, |c| c.change_type.is_some_and(ChangeType::is_gap))
    });
    // `contains_any(header.change_origin, ignored_change_origins)`: a loop guard for changes an integration made.
    engine.register_fn("contains_any", |text: Dynamic, list: Array| {
        text.into_immutable_string()
            .is_ok_and(|t| names(&list).any(|n| !n.is_empty() && t.contains(n.as_str())))
    });
    engine.register_fn("has_record", || {
        current(false, |c| c.has_record.load(Ordering::Relaxed))
    });
    engine
}

/// Converts JSON to a script value (`null` becomes `()`): the values `rhai::serde::to_dynamic` gives,
/// built directly (the serde round trip was a visible share of routing time).
pub fn to_dynamic(value: &Value) -> Dynamic {
    match value {
        Value::Null => Dynamic::UNIT,
        Value::Bool(b) => Dynamic::from_bool(*b),
        Value::Number(n) => match (n.as_i64(), n.is_f64()) {
            (Some(i), _) => Dynamic::from_int(i),
            (None, true) => Dynamic::from_float(n.as_f64().expect("a float number has an f64 value")),
            // A u64 above i64::MAX: whatever serde makes of it.
            (None, false) => rhai::serde::to_dynamic(n).unwrap_or(Dynamic::UNIT),
        },
        Value::String(s) => Dynamic::from(ImmutableString::from(s.as_str())),
        Value::Array(items) => Dynamic::from_array(items.iter().map(to_dynamic).collect()),
        Value::Object(map) => Dynamic::from_map(map_to_dynamic(map)),
    }
}

/// A JSON object as a script map (see [`to_dynamic`]).
pub fn map_to_dynamic(map: &Map<String, Value>) -> rhai::Map {
    map.iter().map(|(k, v)| (k.as_str().into(), to_dynamic(v))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(event: &str, expr: &str) -> bool {
        let event = Event::from_json(event).unwrap();
        let engine = engine();
        let ctx = HelperCtx::new(&event);
        let mut scope = rhai::Scope::new();
        scope.push("event", to_dynamic(&Value::Object(event.fields.clone())));
        let ast = engine.compile_expression_with_scope(&scope, expr).unwrap();
        with_ctx(&ctx, || engine.eval_ast_with_scope::<bool>(&mut scope, &ast)).unwrap()
    }

    const UPDATE: &str = r#"{"id":"t:1","channel":"/data/OrderChangeEvent","header":{"entity":"Order","change_type":"UPDATE",
        "record_ids":["801A"],"changed_fields":["Activation_Status__c","BillingAddress.City","LastModifiedDate"],
        "nulled_fields":["Description"]},
        "fields":{"Activation_Status__c":"Activating","BillingAddress":{"City":"Osaka"},"Count__c":3}}"#;
    const CREATE: &str = r#"{"id":"t:1","channel":"/data/OrderChangeEvent","header":{"entity":"Order","change_type":"CREATE",
        "record_ids":["801A"]},"fields":{"Activation_Status__c":"Activating"}}"#;

    #[test]
    fn changed_sees_fields_and_nested_fields() {
        assert!(eval(UPDATE, r#"changed("Activation_Status__c")"#));
        assert!(eval(UPDATE, r#"changed("BillingAddress")"#));
        assert!(eval(UPDATE, r#"changed("BillingAddress.City")"#));
        assert!(!eval(UPDATE, r#"changed("Billing")"#));
        assert!(!eval(UPDATE, r#"changed("Status")"#));
        assert!(eval(UPDATE, r#"changed_any(["Status", "BillingAddress"])"#));
        assert!(!eval(UPDATE, r#"changed_any(["Status", "Description"])"#));
    }

    #[test]
    fn changed_only_covers_every_changed_field() {
        assert!(eval(
            UPDATE,
            r#"changed_only(["Activation_Status__c", "BillingAddress", "LastModifiedDate"])"#
        ));
        assert!(!eval(
            UPDATE,
            r#"changed_only(["Activation_Status__c", "LastModifiedDate"])"#
        ));
        assert!(!eval(CREATE, r#"changed_only(["Activation_Status__c"])"#));
    }

    #[test]
    fn became_needs_a_change_on_update_and_a_value_on_create() {
        assert!(eval(UPDATE, r#"became("Activation_Status__c", "Activating")"#));
        assert!(!eval(UPDATE, r#"became("Activation_Status__c", "Activated")"#));
        assert!(eval(UPDATE, r#"became("BillingAddress.City", "Osaka")"#));
        assert!(eval(CREATE, r#"became("Activation_Status__c", "Activating")"#));
        assert!(!eval(UPDATE, r#"became("Count__c", 3)"#), "Count__c did not change");
    }

    #[test]
    fn nulled_is_blank_and_gap() {
        assert!(eval(UPDATE, r#"nulled("Description")"#));
        assert!(eval(
            UPDATE,
            r#"is_blank(event.Description) && is_blank("  ") && !is_blank("x") && is_blank([])"#
        ));
        assert!(!eval(UPDATE, "is_gap()"));
        assert!(eval(
            UPDATE,
            "event.BillingAddress?.City == \"Osaka\" && event.ShippingAddress?.City == ()"
        ));
    }

    #[test]
    fn to_dynamic_gives_what_serde_gives() {
        let value: Value = serde_json::from_str(
            r#"{"a": null, "b": true, "c": -3, "d": 18446744073709551615, "e": 1.5, "f": "x",
                "g": [1, "y", null, {"h": [false]}], "i": {}}"#,
        )
        .unwrap();
        let direct = to_dynamic(&value);
        let serde = rhai::serde::to_dynamic(&value).unwrap();
        assert_eq!(format!("{direct:?}"), format!("{serde:?}"));
        for (_, v) in value.as_object().unwrap() {
            assert_eq!(
                format!("{:?}", to_dynamic(v)),
                format!("{:?}", rhai::serde::to_dynamic(v).unwrap())
            );
        }
    }

    #[test]
    fn runaway_predicates_hit_the_operation_limit() {
        let engine = engine();
        // Six nested maps over ten items: a million closure calls, far past the operation limit.
        let digits = "[0,1,2,3,4,5,6,7,8,9]";
        let runaway = format!(
            "{d}.map(|a| {d}.map(|b| {d}.map(|c| {d}.map(|e| {d}.map(|f| {d}.map(|g| g)))))).len() > 0",
            d = digits
        );
        let ast = engine.compile_expression(&runaway).unwrap();
        let err = engine.eval_ast::<bool>(&ast).unwrap_err().to_string();
        assert!(
            err.contains("Too many operations") || err.contains("too large"),
            "{err}"
        );
    }
}
