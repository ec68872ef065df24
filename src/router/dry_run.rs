//! Dry runs of predicates on fixture events (for `validate` and rule tests): the errors only run time shows,
//! such as an unknown function or a non-boolean result, on the paths the fixtures exercise.

use rhai::Dynamic;
use serde_json::{Map, Value};

use super::requested_record;
use super::scope::{dyn_opt, eval_at, event_scope};
use crate::event::Event;
use crate::rules::helpers::{self, HelperCtx};
use crate::rules::native;
use crate::rules::{Predicate, RuleSet};

/// A predicate that failed on a fixture event during a dry run.
#[derive(Debug, Clone)]
pub struct DryRunError {
    pub route: usize,
    /// `when` or `guard`.
    pub clause: &'static str,
    pub message: String,
    /// The file position of the failing spot (or of the predicate's start).
    pub line: u64,
    pub column: u64,
}

/// Evaluates every candidate route's `when` on the event, and `guard` (with the recorded record, or as
/// "not found") wherever `when` held: finds the errors only run time shows (an unknown function, a
/// non-boolean result) on the paths the fixtures exercise. `stop` is ignored so every route is tried.
pub fn dry_run(rules: &RuleSet, event: &Event) -> Vec<DryRunError> {
    let ctx = HelperCtx::new(event);
    let mut scope = event_scope(rules, event);
    let mut errors = Vec::new();
    let unit_ids: Vec<Option<String>> = if event.header.is_some() {
        event.record_ids().iter().cloned().map(Some).collect()
    } else {
        vec![None]
    };
    let fail = |route: usize, clause: &'static str, p: &Predicate, (message, at): (String, Option<(usize, usize)>)| {
        let (line, column) = at.map(|(l, c)| p.place(l, c)).unwrap_or((p.line, p.column));
        // The file position replaces Rhai's own "(line 1, position 22)" inside the predicate.
        let message = match message.rfind(" (line ") {
            Some(i) if message.ends_with(')') => message[..i].to_string(),
            _ => message,
        };
        DryRunError {
            route,
            clause,
            message,
            line,
            column,
        }
    };
    let empty = Map::new();
    helpers::with_ctx(&ctx, || {
        for unit_id in unit_ids {
            for &i in rules.routes_for(event) {
                let route = &rules.routes[i];
                scope.set_value("record_id", dyn_opt(unit_id.as_deref()));
                scope.set_value("record", Dynamic::from_map(rhai::Map::new()));
                ctx.set_has_record(false);
                let when = eval_at(rules, &mut scope, &route.when);
                let seen = native::Ctx {
                    event,
                    record_id: unit_id.as_deref(),
                    record: &empty,
                    has_record: false,
                };
                errors.extend(disagreement(i, "when", &route.when, &when, &seen));
                match when {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(e) => {
                        errors.push(fail(i, "when", &route.when, e));
                        continue;
                    }
                }
                let Some(guard) = &route.guard else { continue };
                let recorded = unit_id.as_ref().and_then(|id| event.record.get(id)).cloned().flatten();
                let record: Map<String, Value> = match (&route.enrich, &recorded) {
                    (Some(enrich), Some(fields)) => requested_record(enrich, fields),
                    _ => Map::new(),
                };
                ctx.set_has_record(recorded.is_some());
                scope.set_value("record", rhai::serde::to_dynamic(&record).unwrap_or(Dynamic::UNIT));
                let passed = eval_at(rules, &mut scope, guard);
                let seen = native::Ctx {
                    event,
                    record_id: unit_id.as_deref(),
                    record: &record,
                    has_record: recorded.is_some(),
                };
                errors.extend(disagreement(i, "guard", guard, &passed, &seen));
                if let Err(e) = passed {
                    errors.push(fail(i, "guard", guard, e));
                }
            }
        }
    });
    errors
}

/// A native evaluation that does not give what Rhai gives: a switchyard bug, reported like a predicate
/// error so that `switchyard validate` and rule tests show it on the fixture events.
fn disagreement<E>(
    route: usize,
    clause: &'static str,
    p: &Predicate,
    rhai: &Result<bool, E>,
    seen: &native::Ctx<'_>,
) -> Option<DryRunError> {
    let native = p.native.as_ref()?.eval(seen).ok()?;
    let reference = match rhai {
        Ok(value) if *value == native => return None,
        Ok(value) => value.to_string(),
        Err(_) => "an error".to_string(),
    };
    Some(DryRunError {
        route,
        clause,
        message: format!(
            "switchyard's native evaluation of this predicate gives {native} where Rhai gives {reference} \
             (a switchyard bug: please report it with this event)"
        ),
        line: p.line,
        column: p.column,
    })
}
