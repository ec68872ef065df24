//! `switchyard explain`: why each route did or did not fire for an event, clause by clause, with the
//! enrichment it read and the actions it would run. The same router as the service (recorded enrichment).

use std::fmt::Write as _;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::authoring::testing::{action_json, plan_recorded};
use crate::event::Event;
use crate::plan::Outcome;
use crate::router::{self, ClauseValue};
use crate::rules::{Predicate, Route, RuleSet};

/// A predicate's value and its top-level clauses.
#[derive(Debug, Serialize)]
pub struct PredicateExplanation {
    pub source: String,
    pub value: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub clauses: Vec<ClauseValue>,
}

#[derive(Debug, Serialize)]
pub struct RouteExplanation {
    pub route: String,
    pub channel: String,
    pub channel_matches: bool,
    pub live: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub record_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub when: Option<PredicateExplanation>,
    /// The record read for `enrich` (`null`: not found), when `when` held.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enrichment: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guard: Option<PredicateExplanation>,
    /// `then`, `else`, `failed: ...`, `when is false`, `not on this channel`, `not live in this mode`.
    pub result: String,
    pub actions: Vec<Map<String, Value>>,
}

#[derive(Debug, Serialize)]
pub struct Explanation {
    pub event_id: String,
    pub channel: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub change_type: Option<String>,
    pub rules_version: String,
    pub routes: Vec<RouteExplanation>,
}

fn explain_predicate(
    rules: &RuleSet,
    event: &Event,
    p: &Predicate,
    record_id: Option<&str>,
    record: Option<&Map<String, Value>>,
) -> PredicateExplanation {
    let (whole, clauses) = router::evaluate_clauses(rules, event, p, record_id, record);
    let (value, error) = match whole {
        Ok(v) => (Some(v), None),
        Err(e) => (None, Some(e)),
    };
    PredicateExplanation {
        source: p.source.trim().to_string(),
        value,
        error,
        clauses,
    }
}

fn record_for(route: &Route, event: &Event, record_id: Option<&str>) -> Option<Option<Map<String, Value>>> {
    let enrich = route.enrich.as_ref()?;
    let found = event.record.get(record_id?)?.as_ref();
    Some(found.map(|fields| router::requested_record(enrich, fields)))
}

/// Explains one event under `rules` (whose mode decides which routes are live).
pub fn explain(rules: &RuleSet, event: &Event) -> Explanation {
    let plan = plan_recorded(rules, event);
    let mut routes = Vec::new();
    for (i, route) in rules.routes.iter().enumerate() {
        let channel_matches = route.channel == event.channel;
        let live = rules.candidates(&route.channel).contains(&i);
        let entity = event.header.as_ref().map(|h| h.entity.as_str());
        let other_entity = channel_matches && live && !rules.routes_for(event).contains(&i);
        let units: Vec<Option<String>> = if !channel_matches || !live || other_entity {
            vec![None]
        } else if event.header.is_some() {
            event.record_ids().iter().cloned().map(Some).collect()
        } else {
            vec![
                plan.decisions
                    .iter()
                    .find(|d| d.route == route.name)
                    .and_then(|d| d.record_id.clone()),
            ]
        };
        for record_id in units {
            let mut x = RouteExplanation {
                route: route.name.clone(),
                channel: route.channel.clone(),
                channel_matches,
                live,
                record_id: record_id.clone(),
                when: None,
                enrichment: None,
                guard: None,
                result: String::new(),
                actions: Vec::new(),
            };
            if !channel_matches {
                x.result = format!("not on this channel (the route listens on {})", route.channel);
                routes.push(x);
                continue;
            }
            if other_entity {
                x.result = format!(
                    "not for this entity (the route takes {} changes; this is {})",
                    route.entity.as_deref().unwrap_or_default(),
                    entity.unwrap_or("a platform event")
                );
                routes.push(x);
                continue;
            }
            if !live {
                x.result = format!(
                    "not live: a {} route, and the mode is not {}",
                    route.mode.as_str(),
                    route.mode.as_str()
                );
                routes.push(x);
                continue;
            }
            let when = explain_predicate(rules, event, &route.when, record_id.as_deref(), None);
            let decision = plan
                .decisions
                .iter()
                .find(|d| d.route == route.name && d.record_id == record_id);
            x.result = match decision.map(|d| &d.outcome) {
                Some(Outcome::Then) => "then".into(),
                Some(Outcome::Else) => "else (guard false)".into(),
                Some(Outcome::Failed(e)) => format!("failed: {e}"),
                None if when.value == Some(true) => "skipped: an earlier route with `stop: true` fired".into(),
                None => "when is false".into(),
            };
            let passed = decision.is_some();
            x.when = Some(when);
            if passed {
                let record = record_for(route, event, record_id.as_deref());
                if route.enrich.is_some() {
                    x.enrichment = Some(match &record {
                        Some(Some(fields)) => Value::Object(fields.clone()),
                        Some(None) => Value::Null,
                        None => Value::String("no recorded record for this id".into()),
                    });
                }
                if let Some(guard) = &route.guard {
                    let r = record.flatten();
                    x.guard = Some(explain_predicate(rules, event, guard, record_id.as_deref(), r.as_ref()));
                }
                x.actions = plan
                    .actions
                    .iter()
                    .filter(|a| a.route == route.name && a.record_id == record_id)
                    .map(action_json)
                    .collect();
            }
            routes.push(x);
        }
    }
    Explanation {
        event_id: event.id.clone(),
        channel: event.channel.clone(),
        change_type: event.change_type().map(|c| c.as_str().to_string()),
        rules_version: rules.version.clone(),
        routes,
    }
}

fn value_text(v: &Result<Value, String>) -> String {
    match v {
        Ok(v) => v.to_string(),
        Err(e) => format!("error: {e}"),
    }
}

fn predicate_text(out: &mut String, name: &str, p: &PredicateExplanation) {
    let value = match (&p.value, &p.error) {
        (Some(v), _) => v.to_string(),
        (None, Some(e)) => format!("error: {e}"),
        (None, None) => "?".into(),
    };
    let _ = writeln!(out, "    {name} = {value}");
    for c in &p.clauses {
        let _ = writeln!(
            out,
            "      {} = {}",
            c.clause.split_whitespace().collect::<Vec<_>>().join(" "),
            value_text(&c.value)
        );
    }
}

/// The human-readable form.
pub fn to_text(x: &Explanation) -> String {
    let mut out = String::new();
    let change = x.change_type.as_deref().map(|c| format!(" {c}")).unwrap_or_default();
    let _ = writeln!(
        out,
        "event {} on {}{change} (rules {})",
        x.event_id, x.channel, x.rules_version
    );
    for r in &x.routes {
        let record = r.record_id.as_deref().map(|id| format!(" [{id}]")).unwrap_or_default();
        let _ = writeln!(out, "  route {}{record}: {}", r.route, r.result);
        if let Some(w) = &r.when {
            predicate_text(&mut out, "when", w);
        }
        if let Some(e) = &r.enrichment {
            let _ = writeln!(out, "    enrich -> {e}");
        }
        if let Some(g) = &r.guard {
            predicate_text(&mut out, "guard", g);
        }
        for a in &r.actions {
            let _ = writeln!(out, "    -> {}", Value::Object(a.clone()));
        }
    }
    out
}
