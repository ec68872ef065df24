//! The router: pure, deterministic, no I/O, no clock. Two phases (DESIGN.md §5):
//! `needs` evaluates every candidate route's `when` and says which records must be read;
//! `plan` evaluates `guard` with those records and renders the actions.

mod clauses;
mod dry_run;
mod render;
mod scope;

use std::collections::HashMap;

use rhai::Dynamic;
use serde_json::{Map, Value};

pub use clauses::{ClauseValue, evaluate_clauses, split_clauses};
pub use dry_run::{DryRunError, dry_run};
use render::render;
use scope::{Script, dyn_opt, eval_combined, header_json};

use crate::event::{Event, OVERFLOW_PLACEHOLDER_ID, RecordFields};
use crate::plan::{Action, Decision, Op, Outcome, Plan};
use crate::rules::helpers;
use crate::rules::native;
use crate::rules::template::RenderCtx;
use crate::rules::{Predicate, Route, RuleSet};

/// The record as a route sees it: exactly the fields its `enrich` asked for, null when absent.
pub fn requested_record(enrich: &crate::rules::EnrichSpec, fields: &Map<String, Value>) -> Map<String, Value> {
    enrich
        .fields
        .iter()
        .map(|f| (f.clone(), fields.get(f).cloned().unwrap_or(Value::Null)))
        .collect()
}

/// A record to read before `guard` runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrichRequest {
    pub object: String,
    pub record_id: String,
    pub fields: Vec<String>,
}

/// Records as the enricher returned them, by record id; `Err` is an enrichment failure.
pub type Records = HashMap<String, Result<RecordFields, String>>;

/// Why a route failed for one record: its event is dead-lettered for that route, with this as the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// `when` or `guard` could not be evaluated (a run-time error in the script, a non-boolean result).
    #[error("`{clause}` failed: {message}")]
    Predicate { clause: &'static str, message: String },
    #[error("the route reads a record but has no record id (set `record_id`)")]
    NoRecordId,
    /// The enricher returned nothing for a record the route needs (a recording without it).
    #[error("no enrichment was read for record `{0}`")]
    NotEnriched(String),
    /// Reading the record failed after its retries.
    #[error("enrichment failed: {0}")]
    Enrichment(String),
    /// An action could not be rendered (an idempotency key with a part missing, ...).
    #[error("sink `{sink}` ({at}): {problem}")]
    Render { sink: String, at: String, problem: String },
}

/// A route whose `when` was evaluated for one unit (a CDC record id, or the platform event).
#[derive(Debug, Clone)]
struct WhenResult {
    route: usize,
    record_id: Option<String>,
    result: Result<(), RouteError>,
}

/// Phase-one result: for every unit, the routes whose `when` held or failed.
pub struct Needs {
    pub rules_version: String,
    units: Vec<Vec<WhenResult>>,
    /// The script context, when some predicate needed Rhai; phase two reuses it.
    script: Option<Script>,
    header: Value,
}

impl Needs {
    /// The records to read: one request per record id, fields merged across routes.
    pub fn requests(&self, rules: &RuleSet) -> Vec<EnrichRequest> {
        let mut requests: Vec<EnrichRequest> = Vec::new();
        for w in self.units.iter().flatten().filter(|w| w.result.is_ok()) {
            let (Some(enrich), Some(id)) = (&rules.routes[w.route].enrich, &w.record_id) else {
                continue;
            };
            if id == OVERFLOW_PLACEHOLDER_ID {
                continue;
            }
            match requests.iter_mut().find(|r| &r.record_id == id) {
                Some(r) => {
                    for f in &enrich.fields {
                        if !r.fields.contains(f) {
                            r.fields.push(f.clone());
                        }
                    }
                }
                None => requests.push(EnrichRequest {
                    object: enrich.object.clone(),
                    record_id: id.clone(),
                    fields: enrich.fields.clone(),
                }),
            }
        }
        requests
    }

    /// Whether any route's `when` held (or failed).
    pub fn matched(&self) -> bool {
        self.units.iter().any(|u| !u.is_empty())
    }

    /// The record ids the event's actions can touch (for per-record ordering), without duplicates.
    pub fn record_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = Vec::new();
        for id in self.units.iter().flatten().filter_map(|w| w.record_id.as_ref()) {
            if !ids.contains(id) {
                ids.push(id.clone());
            }
        }
        ids
    }
}

/// Phase one: evaluates `when` of every live route on the event's channel, per record id.
pub fn needs(rules: &RuleSet, event: &Event) -> Needs {
    let unit_ids: Vec<Option<&str>> = if event.header.is_some() {
        event.record_ids().iter().map(|id| Some(id.as_str())).collect()
    } else {
        vec![None]
    };
    let mut when = When {
        rules,
        event,
        script: None,
        empty: Map::new(),
    };
    let units: Vec<Vec<WhenResult>> = unit_ids.into_iter().map(|id| when.unit(id)).collect();
    // Templates that read `header` render from its JSON form; only a route that passed needs it.
    let header = match units.iter().any(|u| !u.is_empty()) {
        true => header_json(&rules.template_header, event.header.as_ref()),
        false => Value::Null,
    };
    Needs {
        rules_version: rules.version.clone(),
        units,
        script: when.script,
        header,
    }
}

/// Phase one's evaluation of `when` over one event: natively where a predicate has a native form, else by Rhai
/// (the routes without one in one combined call where the rule set has it).
struct When<'a> {
    rules: &'a RuleSet,
    event: &'a Event,
    script: Option<Script>,
    empty: Map<String, Value>,
}

impl When<'_> {
    /// The routes whose `when` held or failed for one unit (a CDC record id, or the platform event).
    fn unit(&mut self, unit_id: Option<&str>) -> Vec<WhenResult> {
        let (rules, event) = (self.rules, self.event);
        // A CDC unit's record id is the same for every route: set once, not per route.
        if let Some(s) = &mut self.script {
            s.scope.set_value("record_id", dyn_opt(unit_id));
        }
        // The routes without a native `when`, evaluated by Rhai in one go (see `RuleSet::combined`).
        let mut combined = match (unit_id, rules.combined(event)) {
            (Some(_), Some((all, count))) => {
                let s = Script::get(&mut self.script, rules, event, unit_id);
                helpers::with_ctx(&s.ctx, || eval_combined(rules, &mut s.scope, all, count)).map(Vec::into_iter)
            }
            _ => None,
        };
        let mut results = Vec::new();
        for &i in rules.routes_for(event) {
            let route = &rules.routes[i];
            let rendered = self.record_id_of(route, unit_id);
            let record_id = rendered.as_ref().map_or(unit_id, Option::as_deref);
            let result = match self.when(route, unit_id, record_id, &mut combined) {
                Ok(false) => continue,
                Ok(true) => Ok(()),
                Err(message) => Err(RouteError::Predicate {
                    clause: "when",
                    message,
                }),
            };
            results.push(WhenResult {
                route: i,
                record_id: record_id.map(str::to_string),
                result,
            });
        }
        results
    }

    /// A platform event's record id from the route's `record_id` template (`None`: the unit's own id).
    fn record_id_of(&self, route: &Route, unit_id: Option<&str>) -> Option<Option<String>> {
        let (None, Some(template)) = (unit_id, &route.record_id) else {
            return None;
        };
        let rctx = RenderCtx {
            event: self.event,
            header: &Value::Null,
            record_id: None,
            record: &self.empty,
            vars: &self.rules.vars,
            idempotency_key: None,
            route: &route.name,
            failure: None,
        };
        Some(template.render_string(&rctx).ok().filter(|s| !s.is_empty()))
    }

    fn when(
        &mut self,
        route: &Route,
        unit_id: Option<&str>,
        record_id: Option<&str>,
        combined: &mut Option<std::vec::IntoIter<Dynamic>>,
    ) -> Result<bool, String> {
        let native = route.when.native.as_ref().map(|n| {
            n.eval(&native::Ctx {
                event: self.event,
                record_id,
                record: &self.empty,
                has_record: false,
            })
        });
        match (native, combined) {
            (Some(Ok(value)), _) => Ok(value),
            (None, Some(values)) => match values.next().map(|v| v.as_bool()) {
                Some(Ok(value)) => Ok(value),
                Some(Err(t)) => Err(format!("the predicate returned a {t}, not true or false")),
                None => Err("the combined evaluation returned too few values".to_string()),
            },
            // No native form, or its evaluation fell back: the engine's result and error.
            _ => {
                let s = Script::get(&mut self.script, self.rules, self.event, record_id);
                if unit_id.is_none() {
                    s.scope.set_value("record_id", dyn_opt(record_id));
                }
                s.eval(self.rules, &route.when)
            }
        }
    }
}

/// Phase two: with the records read, evaluates `guard` and renders the actions.
pub fn plan(rules: &RuleSet, event: &Event, needs: Needs, records: &Records) -> Plan {
    let Needs {
        units,
        mut script,
        header,
        ..
    } = needs;
    let mut decisions = Vec::new();
    let mut actions = Vec::new();
    for unit in units {
        for w in unit {
            let route = &rules.routes[w.route];
            let record_id = w.record_id.as_deref();
            let unit = Unit {
                rules,
                event,
                header: &header,
                record_id,
                records,
            };
            let (outcome, rendered) = match w.result.and_then(|()| unit.decide_route(route, &mut script)) {
                Ok(decided) => decided,
                Err(error) => {
                    let reason = format!(
                        "route `{}` failed for {}: {error}",
                        route.name,
                        describe(event, record_id)
                    );
                    let dead = Action {
                        route: route.name.clone(),
                        sink: crate::config::DEAD_LETTER_SINK.into(),
                        record_id: w.record_id.clone(),
                        shadow: route.shadow,
                        on_failure: false,
                        op: Op::DeadLetter { reason },
                    };
                    (Outcome::Failed(error.to_string()), vec![dead])
                }
            };
            // `stop: true` ends this record's evaluation once the route's `then` ran.
            let stop = route.stop && outcome == Outcome::Then;
            decisions.push(Decision {
                route: route.name.clone(),
                record_id: w.record_id,
                outcome,
                shadow: route.shadow,
            });
            actions.extend(rendered);
            if stop {
                break;
            }
        }
    }
    Plan {
        event_id: event.id.clone(),
        rules_version: rules.version.clone(),
        decisions,
        actions,
    }
}

/// What an `on_failure` action is told about the action that failed (its template root `failure`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureInfo {
    /// Why it failed (the dead letter's reason), cut to [`FAILURE_REASON_CHARS`] characters.
    pub reason: String,
    /// The sink that failed.
    pub sink: String,
    /// What the failed action did (`job activation-801...`).
    pub action: String,
    /// The dead letter's id (`dead-letter show ID`), when it was stored.
    pub letter: Option<String>,
}

/// `failure.reason` is cut to this many characters: what a Salesforce Text field holds. The whole reason stays in
/// the dead letter.
pub const FAILURE_REASON_CHARS: usize = 255;

impl FailureInfo {
    fn to_json(&self) -> Value {
        let reason: String = self.reason.chars().take(FAILURE_REASON_CHARS).collect();
        serde_json::json!({
            "reason": reason,
            "sink": self.sink,
            "action": self.action,
            "letter": self.letter,
        })
    }
}

/// The `on_failure` actions of the route named `route` for one record of `event`, rendered with what failed. The
/// records are the ones the event's routes read (kept with the event). A route unknown to `rules` (gone in a
/// reload) has none. An action that cannot be rendered becomes a dead letter saying why, so nothing is dropped.
pub fn on_failure(
    rules: &RuleSet,
    event: &Event,
    route: &str,
    record_id: Option<&str>,
    failure: &FailureInfo,
) -> Vec<Action> {
    let Some(route) = rules.routes.iter().find(|r| r.name == route) else {
        return Vec::new();
    };
    if route.on_failure.is_empty() {
        return Vec::new();
    }
    let header = header_json(&rules.template_header, event.header.as_ref());
    let record = match (&route.enrich, record_id.and_then(|id| event.record.get(id))) {
        (Some(enrich), Some(Some(fields))) => requested_record(enrich, fields),
        _ => Map::new(),
    };
    let failure = failure.to_json();
    let ctx = RenderCtx {
        event,
        header: &header,
        record_id,
        record: &record,
        vars: &rules.vars,
        idempotency_key: None,
        route: &route.name,
        failure: Some(&failure),
    };
    route
        .on_failure
        .iter()
        .map(|t| {
            render(route, t, &ctx).unwrap_or_else(|error| Action {
                route: route.name.clone(),
                sink: crate::config::DEAD_LETTER_SINK.into(),
                record_id: record_id.map(str::to_string),
                shadow: route.shadow,
                on_failure: true,
                op: Op::DeadLetter {
                    reason: format!(
                        "route `{}`: an on_failure action failed for {}: {error}",
                        route.name,
                        describe(event, record_id)
                    ),
                },
            })
        })
        .collect()
}

fn describe(event: &Event, record_id: Option<&str>) -> String {
    match record_id {
        Some(id) => format!("event `{}` record `{id}`", event.id),
        None => format!("event `{}`", event.id),
    }
}

/// What phase two decides one route with: the event, its header JSON, the unit's record id and the records read.
struct Unit<'a> {
    rules: &'a RuleSet,
    event: &'a Event,
    header: &'a Value,
    record_id: Option<&'a str>,
    records: &'a Records,
}

impl Unit<'_> {
    /// One route whose `when` held for this unit: its record, its `guard`, and the `then` or `else` actions.
    fn decide_route(&self, route: &Route, script: &mut Option<Script>) -> Result<(Outcome, Vec<Action>), RouteError> {
        let (found, record) = self.record(route)?;
        let passed = match &route.guard {
            Some(guard) => self.guard(guard, script, found, &record)?,
            None => true,
        };
        let (outcome, templates) = if passed {
            (Outcome::Then, &route.then)
        } else {
            (Outcome::Else, &route.otherwise)
        };
        let rctx = RenderCtx {
            event: self.event,
            header: self.header,
            record_id: self.record_id,
            record: &record,
            vars: &self.rules.vars,
            idempotency_key: None,
            route: &route.name,
            failure: None,
        };
        let rendered = templates
            .iter()
            .map(|t| render(route, t, &rctx))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((outcome, rendered))
    }

    /// Whether the record was found, and the fields the route asked for.
    fn record(&self, route: &Route) -> Result<(bool, Map<String, Value>), RouteError> {
        Ok(match (&route.enrich, self.record_id) {
            (None, _) => (false, Map::new()),
            (Some(_), None) => return Err(RouteError::NoRecordId),
            (Some(_), Some(OVERFLOW_PLACEHOLDER_ID)) => (false, Map::new()),
            (Some(enrich), Some(id)) => match self.records.get(id) {
                None => return Err(RouteError::NotEnriched(id.to_string())),
                Some(Err(e)) => return Err(RouteError::Enrichment(e.clone())),
                Some(Ok(None)) => (false, Map::new()),
                Some(Ok(Some(fields))) => (true, requested_record(enrich, fields)),
            },
        })
    }

    fn guard(
        &self,
        guard: &Predicate,
        script: &mut Option<Script>,
        found: bool,
        record: &Map<String, Value>,
    ) -> Result<bool, RouteError> {
        let native = guard.native.as_ref().map(|n| {
            n.eval(&native::Ctx {
                event: self.event,
                record_id: self.record_id,
                record,
                has_record: found,
            })
        });
        if let Some(Ok(passed)) = native {
            return Ok(passed);
        }
        // Only a guard reads the script context here; templates render from the record itself.
        let s = Script::get(script, self.rules, self.event, self.record_id);
        s.ctx.set_has_record(found);
        s.scope.set_value("record_id", dyn_opt(self.record_id));
        s.scope
            .set_value("record", Dynamic::from_map(helpers::map_to_dynamic(record)));
        s.eval(self.rules, guard).map_err(|message| RouteError::Predicate {
            clause: "guard",
            message,
        })
    }
}
