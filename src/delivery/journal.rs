//! The journal entry of one settled event: every live route of its channel in rule order, with what it did.
//! Built after dispatch from the plan and the results (the router's pure path never sees the journal).
//! Read back here too: the clause of a route's `when` (or `guard`) that was false is worked out at read time, from
//! the event the entry keeps, so that the service's path pays nothing for it.

use crate::delivery::{ActionResult, Paused};
use crate::event::Event;
use crate::plan::{Outcome, Plan};
use serde_json::{Value, json};

use crate::router::evaluate_clauses;
use crate::rules::{Predicate, RuleSet};
use crate::state::{ActionEntry, Entry, RouteEntry, RouteOutcome};

/// What an action's result reads as in `why` and `tap`.
pub fn result_text(result: &ActionResult) -> String {
    match result {
        ActionResult::Done { attempts: 0 | 1 } => "done".into(),
        ActionResult::Done { attempts } => format!("done after {attempts} attempts"),
        ActionResult::Skipped => "duplicate: already done by an earlier delivery".into(),
        ActionResult::Shadow => "shadow: not sent".into(),
        ActionResult::DeadLettered {
            reason,
            letter: Some(id),
        } => format!("dead-lettered as {id}: {reason}"),
        ActionResult::DeadLettered { reason, letter: None } => format!("dead-lettered: {reason}"),
        ActionResult::Abandoned => "abandoned: the channel lease moved; the replica holding it redelivers".into(),
        ActionResult::Interrupted => "interrupted by a stop; redelivered after the restart".into(),
    }
}

fn action_entry(a: &crate::plan::Action, r: &ActionResult) -> ActionEntry {
    ActionEntry {
        sink: a.sink.clone(),
        summary: match a.on_failure {
            true => format!("on_failure: {}", a.what()),
            false => a.what(),
        },
        idempotency_key: a.idempotency_key().map(str::to_string),
        result: result_text(r),
    }
}

/// The entry of `event`, decided by `plan` under `rules`, whose actions ended as `results`. The entry keeps the
/// event (masked) with only the payload fields the rules read (predicates and templates), all a reader needs to
/// say which clause was false or to explain it again; what no rule looks at would only cost the write.
pub fn entry(
    rules: &RuleSet,
    mut event: Event,
    position: &str,
    plan: Option<(&Plan, &[ActionResult], &[Paused])>,
    mask: &[String],
) -> Entry {
    let mut routes = Vec::new();
    // The stop route (and the record it stopped for) that ended evaluation, per record.
    let mut stopped: Vec<(Option<&str>, &str)> = Vec::new();
    for &i in rules.routes_for(&event) {
        let route = &rules.routes[i];
        let decisions: Vec<_> = plan
            .map(|(p, _, _)| p.decisions.iter().filter(|d| d.route == route.name).collect())
            .unwrap_or_default();
        if decisions.is_empty() {
            let outcome = match stopped.first() {
                Some((_, by)) => RouteOutcome::Skipped { by: by.to_string() },
                None => RouteOutcome::NotMatched,
            };
            routes.push(RouteEntry {
                route: route.name.clone(),
                record_id: None,
                outcome,
                actions: Vec::new(),
            });
            continue;
        }
        let (plan, results, paused) = plan.expect("decisions come from a plan");
        for d in decisions {
            let pause = paused.iter().find(|p| p.route == d.route && p.record_id == d.record_id);
            let outcome = match (&d.outcome, pause) {
                (Outcome::Then, Some(p)) if !d.shadow => RouteOutcome::Paused {
                    reason: p.reason.clone(),
                },
                (Outcome::Then, _) => RouteOutcome::Fired,
                (Outcome::Else, _) => RouteOutcome::GuardFailed,
                (Outcome::Failed(reason), _) => RouteOutcome::Failed { reason: reason.clone() },
            };
            if route.stop && d.outcome == Outcome::Then {
                stopped.push((d.record_id.as_deref(), &route.name));
            }
            let actions = plan
                .actions
                .iter()
                .zip(results)
                .filter(|(a, _)| a.route == d.route && a.record_id == d.record_id)
                .map(|(a, r)| action_entry(a, r))
                .collect();
            routes.push(RouteEntry {
                route: route.name.clone(),
                record_id: d.record_id.clone(),
                outcome,
                actions,
            });
        }
    }
    rules.keep_read_fields(&mut event);
    event.redact(mask);
    let header = event.header.as_ref();
    Entry {
        id: None,
        at_ms: crate::clock::now_ms(),
        event_id: event.id.clone(),
        channel: event.channel.clone(),
        change_type: event.change_type().map(|c| c.as_str().to_string()),
        commit_user: header.and_then(|h| h.commit_user.clone()),
        record_ids: event.record_ids().to_vec(),
        position: position.to_string(),
        rules_version: rules.version.clone(),
        routes,
        rejected: None,
        event,
    }
}

/// The entry of input dead-lettered before routing (`letter`: the dead letter's id, when it was stored).
pub fn rejected(
    rules: &RuleSet,
    position: &str,
    event_id: Option<&str>,
    channel: Option<&str>,
    error: &str,
    letter: Option<&str>,
) -> Entry {
    let rejected = match letter {
        Some(id) => format!("dead-lettered as {id} before routing: {error}"),
        None => format!("dead-lettered before routing: {error}"),
    };
    Entry {
        id: None,
        at_ms: crate::clock::now_ms(),
        event_id: event_id.unwrap_or(position).to_string(),
        channel: channel.unwrap_or_default().to_string(),
        change_type: None,
        commit_user: None,
        record_ids: Vec::new(),
        position: position.to_string(),
        rules_version: rules.version.clone(),
        routes: Vec::new(),
        rejected: Some(rejected),
        event: Event::default(),
    }
}

/// Why a route did not fire for one record: the first clause of its `when` (or `guard`) that was false, with the
/// value of the field it tests when the event carries one. None when the rules no longer have the route.
pub fn false_clause(rules: &RuleSet, entry: &Entry, route: &RouteEntry) -> Option<String> {
    let r = rules.routes.iter().find(|r| r.name == route.route)?;
    let predicate: &Predicate = match route.outcome {
        RouteOutcome::NotMatched => &r.when,
        RouteOutcome::GuardFailed => r.guard.as_ref()?,
        _ => return None,
    };
    let record_id = route
        .record_id
        .as_deref()
        .or(entry.record_ids.first().map(String::as_str));
    let record = record_id
        .and_then(|id| entry.event.record.get(id))
        .and_then(Option::as_ref);
    let (_, clauses) = evaluate_clauses(rules, &entry.event, predicate, record_id, record);
    let clause = clauses
        .iter()
        .find(|c| c.value.as_ref().is_ok_and(|v| v == &Value::Bool(false)))
        .map_or_else(|| predicate.source.trim().to_string(), |c| c.clause.trim().to_string());
    let clause = clause.split_whitespace().collect::<Vec<_>>().join(" ");
    let detail = field_detail(&entry.event, &clause);
    Some(format!("`{clause}` was false{detail}"))
}

/// ` (it changed to `Activated`)` for a clause on a field the event changed, ` (it did not change)` for one it
/// did not; empty when the clause names no field.
fn field_detail(event: &Event, clause: &str) -> String {
    let field = ["became(\"", "changed(\"", "event."].iter().find_map(|start| {
        let rest = &clause[clause.find(start)? + start.len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        (!name.is_empty()).then_some(name)
    });
    match field {
        Some(name) => match event.fields.get(&name) {
            Some(v) => format!(
                " (it changed to `{}`)",
                v.as_str().map_or_else(|| v.to_string(), str::to_string)
            ),
            None => format!(" ({name} did not change)"),
        },
        None => String::new(),
    }
}

/// The entry as JSON for scripts, each route with its `false_clause` when it did not fire.
pub fn to_json(rules: &RuleSet, entry: &Entry) -> Value {
    let mut value = serde_json::to_value(entry).unwrap_or_default();
    if let Some(obj) = value.as_object_mut() {
        obj.remove("event");
        let routes: Vec<Value> = entry
            .routes
            .iter()
            .map(|r| {
                let mut v = serde_json::to_value(r).unwrap_or_default();
                if let Some(clause) = false_clause(rules, entry, r) {
                    v["false_clause"] = json!(clause);
                }
                v
            })
            .collect();
        obj.insert("routes".into(), Value::Array(routes));
    }
    value
}
