//! The script context of one event: the `event`, `header`, `record_id` and `record` values Rhai evaluates
//! predicates against, built once per event from only the members the rules read (STYLE.md rule 4), and the
//! evaluation of one predicate against it.

use std::sync::Arc;

use rhai::{Dynamic, Scope};
use serde_json::{Map, Value};

use crate::event::{ChangeHeader, Event, HeaderMember, HeaderValue};
use crate::rules::helpers::{self, HelperCtx};
use crate::rules::reads::Fields;
use crate::rules::{Predicate, RuleSet};

/// What Rhai evaluates an event's predicates with, built on the first predicate that needs the engine
/// (one without a native form, or whose native evaluation fell back): events whose routes all evaluate
/// natively never convert anything into script values.
pub(super) struct Script {
    pub(super) ctx: Arc<HelperCtx>,
    pub(super) scope: Scope<'static>,
}

impl Script {
    fn new(rules: &RuleSet, event: &Event, record_id: Option<&str>) -> Script {
        let mut scope = event_scope(rules, event);
        scope.set_value("record", Dynamic::from_map(rhai::Map::new()));
        scope.set_value("record_id", dyn_opt(record_id));
        Script {
            ctx: HelperCtx::reading(event, &rules.reads.became),
            scope,
        }
    }

    /// The script state, built with `record_id` when this is the first use.
    pub(super) fn get<'s>(
        slot: &'s mut Option<Script>,
        rules: &RuleSet,
        event: &Event,
        record_id: Option<&str>,
    ) -> &'s mut Script {
        slot.get_or_insert_with(|| Script::new(rules, event, record_id))
    }

    pub(super) fn eval(&mut self, rules: &RuleSet, predicate: &Predicate) -> Result<bool, String> {
        helpers::with_ctx(&self.ctx, || eval(rules, &mut self.scope, predicate))
    }
}

/// Builds the script context of an event once; every route is evaluated against it. Only the members
/// of `event` and `header` that some predicate reads are converted (see [`crate::rules::reads`]).
pub(super) fn event_scope(rules: &RuleSet, event: &Event) -> Scope<'static> {
    let mut scope = rules.base_scope.clone();
    scope.set_value("event", event_map(&rules.reads.event, &event.fields));
    scope.set_value("header", header_map(&rules.reads.header, event.header.as_ref()));
    scope.set_value("event_id", Dynamic::from(event.id.clone()));
    scope.set_value(
        "replay_id",
        event.replay_id.clone().map(Dynamic::from).unwrap_or(Dynamic::UNIT),
    );
    scope
}

/// The payload as a script map: the fields predicates read (absent ones read as `()` either way).
fn event_map(reads: &Fields, fields: &Map<String, Value>) -> Dynamic {
    match reads {
        Fields::All => Dynamic::from_map(helpers::map_to_dynamic(fields)),
        Fields::Only(names) => {
            let mut map = rhai::Map::new();
            for name in names {
                if let Some(value) = fields.get(name) {
                    map.insert(name.as_str().into(), helpers::to_dynamic(value));
                }
            }
            Dynamic::from_map(map)
        }
    }
}

/// The named header members the event carries, with their values.
fn header_members<'a>(
    names: &'a std::collections::BTreeSet<String>,
    h: &'a ChangeHeader,
) -> impl Iterator<Item = (&'a String, HeaderValue<'a>)> {
    names
        .iter()
        .filter_map(|name| Some((name, h.member(HeaderMember::of(name)?)?)))
}

/// The CDC header as a script map, with the members predicates read; the same values (and absent
/// optional members) as its serde form.
fn header_map(reads: &Fields, header: Option<&ChangeHeader>) -> Dynamic {
    let Some(h) = header else { return Dynamic::UNIT };
    let Fields::Only(names) = reads else {
        return rhai::serde::to_dynamic(h).unwrap_or(Dynamic::UNIT);
    };
    let mut map = rhai::Map::new();
    for (name, value) in header_members(names, h) {
        let value = match value {
            HeaderValue::Str(s) => Dynamic::from(s.to_string()),
            HeaderValue::Names(l) => Dynamic::from_array(l.iter().map(|s| Dynamic::from(s.clone())).collect()),
            HeaderValue::Int(i) => Dynamic::from_int(i),
        };
        map.insert(name.as_str().into(), value);
    }
    Dynamic::from_map(map)
}

/// The CDC header as templates see it: its serde form, with only the members some template reads.
pub(super) fn header_json(reads: &Fields, header: Option<&ChangeHeader>) -> Value {
    let Some(h) = header else { return Value::Null };
    let Fields::Only(names) = reads else {
        return serde_json::to_value(h).unwrap_or(Value::Null);
    };
    let mut map = Map::new();
    for (name, value) in header_members(names, h) {
        let value = match value {
            HeaderValue::Str(s) => Value::from(s),
            HeaderValue::Names(l) => Value::from(l.to_vec()),
            HeaderValue::Int(i) => Value::from(i),
        };
        map.insert(name.clone(), value);
    }
    Value::Object(map)
}

/// Evaluates the combined `when` of a channel; `None` when any predicate failed: the caller then evaluates
/// route by route, which gives each route its own result and error. The failed attempt changed nothing:
/// rule sets whose predicates call methods (the only way an expression can modify a value) have no
/// combined form.
pub(super) fn eval_combined(
    rules: &RuleSet,
    scope: &mut Scope<'static>,
    all: &rhai::AST,
    routes: usize,
) -> Option<rhai::Array> {
    let values = rules.engine.eval_ast_with_scope::<rhai::Array>(scope, all).ok()?;
    (values.len() == routes).then_some(values)
}

pub(super) fn eval(rules: &RuleSet, scope: &mut Scope<'static>, predicate: &Predicate) -> Result<bool, String> {
    eval_at(rules, scope, predicate).map_err(|(message, _)| message)
}

/// Evaluates a predicate; an error carries the position inside the predicate when Rhai knows it.
pub(super) fn eval_at(
    rules: &RuleSet,
    scope: &mut Scope<'static>,
    predicate: &Predicate,
) -> Result<bool, (String, Option<(usize, usize)>)> {
    let value = rules
        .engine
        .eval_ast_with_scope::<Dynamic>(scope, &predicate.ast)
        .map_err(|e| {
            let position = e.position();
            (
                e.to_string(),
                position.line().map(|l| (l, position.position().unwrap_or(1))),
            )
        })?;
    value
        .as_bool()
        .map_err(|t| (format!("the predicate returned a {t}, not true or false"), None))
}

pub(super) fn dyn_opt(value: Option<&str>) -> Dynamic {
    value.map(|v| Dynamic::from(v.to_string())).unwrap_or(Dynamic::UNIT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::reads::Fields;

    const EVENTS: &str = include_str!("../../examples/events/order-lifecycle.jsonl");

    fn json(d: &Dynamic) -> Value {
        rhai::serde::from_dynamic(d).expect("context values convert back to JSON")
    }

    #[test]
    fn the_partial_header_has_the_values_of_the_whole_one() {
        let every = crate::event::HeaderMember::names().collect::<Vec<_>>();
        let only = Fields::Only(every.iter().map(|s| s.to_string()).collect());
        for line in EVENTS.lines() {
            let Ok(event) = Event::from_json(line) else { continue };
            let whole = header_map(&Fields::All, event.header.as_ref());
            let partial = header_map(&only, event.header.as_ref());
            assert_eq!(json(&partial), json(&whole), "{}", event.id);
        }
    }

    #[test]
    fn the_partial_header_json_has_the_values_of_the_serde_form() {
        let every = Fields::Only(HeaderMember::names().map(str::to_string).collect());
        for line in EVENTS.lines() {
            let Ok(event) = Event::from_json(line) else { continue };
            let whole = serde_json::to_value(event.header.as_ref()).unwrap();
            assert_eq!(header_json(&every, event.header.as_ref()), whole, "{}", event.id);
            assert_eq!(header_json(&Fields::All, event.header.as_ref()), whole, "{}", event.id);
        }
    }

    #[test]
    fn templates_read_only_the_header_members_they_name() {
        let path = std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/rules/orders.yaml"));
        let env = crate::rules::load::RuleEnv::defaults();
        let rules = crate::rules::load::load_paths(&[path], &env)
            .ruleset
            .expect("the shipped rules load");
        let expected = ["change_type", "commit_timestamp", "entity"];
        assert_eq!(
            rules.template_header,
            Fields::Only(expected.iter().map(|s| s.to_string()).collect())
        );
    }

    #[test]
    fn the_partial_payload_has_the_values_it_reads() {
        for line in EVENTS.lines() {
            let Ok(event) = Event::from_json(line) else { continue };
            let names: Vec<String> = event.fields.keys().cloned().chain(["Absent__c".to_string()]).collect();
            let only = Fields::Only(names.into_iter().collect());
            let whole = event_map(&Fields::All, &event.fields);
            let partial = event_map(&only, &event.fields);
            assert_eq!(json(&partial), json(&whole), "{}", event.id);
        }
    }
}
