//! The router: pure, deterministic, no I/O, no clock. Two phases (DESIGN.md §5):
//! `needs` evaluates every candidate route's `when` and says which records must be read;
//! `plan` evaluates `guard` with those records and renders the actions.

use std::collections::HashMap;
use std::sync::Arc;

use rhai::{Dynamic, Scope};
use serde_json::{Map, Value};

use crate::event::{ChangeHeader, Event, HeaderMember, HeaderValue, OVERFLOW_PLACEHOLDER_ID, RecordFields};
use crate::plan::{Action, Decision, Op, Outcome, Plan, job_id_for};
use crate::rules::helpers::{self, HelperCtx};
use crate::rules::native;
use crate::rules::reads::Fields;
use crate::rules::template::RenderCtx;
use crate::rules::{ActionParams, ActionTemplate, Predicate, Route, RuleSet};

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

/// A route whose `when` was evaluated for one unit (a CDC record id, or the platform event).
#[derive(Debug, Clone)]
struct WhenResult {
    route: usize,
    record_id: Option<String>,
    result: Result<(), String>,
}

/// Phase-one result: for every unit, the routes whose `when` held or failed.
pub struct Needs {
    pub rules_version: String,
    units: Vec<Vec<WhenResult>>,
    /// The script context, when some predicate needed Rhai; phase two reuses it.
    script: Option<Script>,
    header: Value,
}

/// What Rhai evaluates an event's predicates with, built on the first predicate that needs the engine
/// (one without a native form, or whose native evaluation fell back): events whose routes all evaluate
/// natively never convert anything into script values.
struct Script {
    ctx: Arc<HelperCtx>,
    scope: Scope<'static>,
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
    fn get<'s>(
        slot: &'s mut Option<Script>,
        rules: &RuleSet,
        event: &Event,
        record_id: Option<&str>,
    ) -> &'s mut Script {
        slot.get_or_insert_with(|| Script::new(rules, event, record_id))
    }

    fn eval(&mut self, rules: &RuleSet, predicate: &Predicate) -> Result<bool, String> {
        helpers::with_ctx(&self.ctx, || eval(rules, &mut self.scope, predicate))
    }
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

/// Builds the script context of an event once; every route is evaluated against it. Only the members
/// of `event` and `header` that some predicate reads are converted (see [`crate::rules::reads`]).
fn event_scope(rules: &RuleSet, event: &Event) -> Scope<'static> {
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
fn header_json(reads: &Fields, header: Option<&ChangeHeader>) -> Value {
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
fn eval_combined(rules: &RuleSet, scope: &mut Scope<'static>, all: &rhai::AST, routes: usize) -> Option<rhai::Array> {
    let values = rules.engine.eval_ast_with_scope::<rhai::Array>(scope, all).ok()?;
    (values.len() == routes).then_some(values)
}

fn eval(rules: &RuleSet, scope: &mut Scope<'static>, predicate: &Predicate) -> Result<bool, String> {
    eval_at(rules, scope, predicate).map_err(|(message, _)| message)
}

/// Evaluates a predicate; an error carries the position inside the predicate when Rhai knows it.
fn eval_at(
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
            for &i in rules.candidates(&event.channel) {
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

fn dyn_opt(value: Option<&str>) -> Dynamic {
    value.map(|v| Dynamic::from(v.to_string())).unwrap_or(Dynamic::UNIT)
}

/// Phase one: evaluates `when` of every live route on the event's channel, per record id.
pub fn needs(rules: &RuleSet, event: &Event) -> Needs {
    let mut script: Option<Script> = None;
    let candidates = rules.candidates(&event.channel);
    // Templates that read `header` render from its JSON form; only a route that passed needs it.
    let mut header = Value::Null;
    let empty = Map::new();
    let unit_ids: Vec<Option<&str>> = if event.header.is_some() {
        event.record_ids().iter().map(|id| Some(id.as_str())).collect()
    } else {
        vec![None]
    };
    let mut units = Vec::with_capacity(unit_ids.len());
    for unit_id in unit_ids {
        let mut results = Vec::new();
        // A CDC unit's record id is the same for every route: set once, not per route.
        if let Some(s) = &mut script {
            s.scope.set_value("record_id", dyn_opt(unit_id));
        }
        // The routes without a native `when`, evaluated by Rhai in one go (see `RuleSet::combined`).
        let mut combined = match (unit_id, rules.combined(&event.channel)) {
            (Some(_), Some((all, count))) => {
                let s = Script::get(&mut script, rules, event, unit_id);
                helpers::with_ctx(&s.ctx, || eval_combined(rules, &mut s.scope, all, count)).map(Vec::into_iter)
            }
            _ => None,
        };
        for &i in candidates {
            let route = &rules.routes[i];
            let rendered = match (unit_id, &route.record_id) {
                (None, Some(template)) => {
                    let rctx = RenderCtx {
                        event,
                        header: &header,
                        record_id: None,
                        record: &empty,
                        vars: &rules.vars,
                        idempotency_key: None,
                        route: &route.name,
                    };
                    Some(template.render_string(&rctx).ok().filter(|s| !s.is_empty()))
                }
                _ => None,
            };
            let record_id = rendered.as_ref().map_or(unit_id, Option::as_deref);
            let native = route.when.native.as_ref().map(|n| {
                n.eval(&native::Ctx {
                    event,
                    record_id,
                    record: &empty,
                    has_record: false,
                })
            });
            let value = match (native, &mut combined) {
                (Some(Ok(value)), _) => Ok(value),
                (None, Some(values)) => match values.next().map(|v| v.as_bool()) {
                    Some(Ok(value)) => Ok(value),
                    Some(Err(t)) => Err(format!("the predicate returned a {t}, not true or false")),
                    None => Err("the combined evaluation returned too few values".to_string()),
                },
                // No native form, or its evaluation fell back: the engine's result and error.
                _ => {
                    let s = Script::get(&mut script, rules, event, record_id);
                    if unit_id.is_none() {
                        s.scope.set_value("record_id", dyn_opt(record_id));
                    }
                    s.eval(rules, &route.when)
                }
            };
            let result = match value {
                Ok(false) => continue,
                Ok(true) => Ok(()),
                Err(e) => Err(format!("`when` failed: {e}")),
            };
            results.push(WhenResult {
                route: i,
                record_id: record_id.map(str::to_string),
                result,
            });
        }
        units.push(results);
    }
    if units.iter().any(|u| !u.is_empty()) {
        header = header_json(&rules.template_header, event.header.as_ref());
    }
    Needs {
        rules_version: rules.version.clone(),
        units,
        script,
        header,
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
            let decided = decide(rules, route, event, &mut script, &header, record_id, records, w.result);
            let (outcome, rendered) = match decided {
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
                        op: Op::DeadLetter { reason },
                    };
                    (Outcome::Failed(error), vec![dead])
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

fn describe(event: &Event, record_id: Option<&str>) -> String {
    match record_id {
        Some(id) => format!("event `{}` record `{id}`", event.id),
        None => format!("event `{}`", event.id),
    }
}

#[allow(clippy::too_many_arguments)]
fn decide(
    rules: &RuleSet,
    route: &Route,
    event: &Event,
    script: &mut Option<Script>,
    header: &Value,
    record_id: Option<&str>,
    records: &Records,
    when: Result<(), String>,
) -> Result<(Outcome, Vec<Action>), String> {
    when?;
    let (found, record) = match (&route.enrich, record_id) {
        (None, _) => (false, Map::new()),
        (Some(_), None) => return Err("the route reads a record but has no record id (set `record_id`)".into()),
        (Some(_), Some(OVERFLOW_PLACEHOLDER_ID)) => (false, Map::new()),
        (Some(enrich), Some(id)) => match records.get(id) {
            None => return Err(format!("no enrichment was read for record `{id}`")),
            Some(Err(e)) => return Err(format!("enrichment failed: {e}")),
            Some(Ok(None)) => (false, Map::new()),
            Some(Ok(Some(fields))) => {
                let record = requested_record(enrich, fields);
                (true, record)
            }
        },
    };
    let passed = match &route.guard {
        Some(guard) => {
            let native = guard.native.as_ref().map(|n| {
                n.eval(&native::Ctx {
                    event,
                    record_id,
                    record: &record,
                    has_record: found,
                })
            });
            match native {
                Some(Ok(passed)) => passed,
                // Only a guard reads the script context here; templates render from the record itself.
                _ => {
                    let s = Script::get(script, rules, event, record_id);
                    s.ctx.set_has_record(found);
                    s.scope.set_value("record_id", dyn_opt(record_id));
                    s.scope
                        .set_value("record", Dynamic::from_map(helpers::map_to_dynamic(&record)));
                    s.eval(rules, guard).map_err(|e| format!("`guard` failed: {e}"))?
                }
            }
        }
        None => true,
    };
    let (outcome, templates) = if passed {
        (Outcome::Then, &route.then)
    } else {
        (Outcome::Else, &route.otherwise)
    };
    let mut rctx = RenderCtx {
        event,
        header,
        record_id,
        record: &record,
        vars: &rules.vars,
        idempotency_key: None,
        route: &route.name,
    };
    let rendered = templates
        .iter()
        .map(|t| render(route, t, &mut rctx))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((outcome, rendered))
}

fn render(route: &Route, t: &ActionTemplate, ctx: &mut RenderCtx<'_>) -> Result<Action, String> {
    let op = match &t.params {
        ActionParams::Queue {
            job,
            idempotency_key,
            job_options,
        } => {
            if ctx.record_id == Some(OVERFLOW_PLACEHOLDER_ID) {
                return Err(format!(
                    "sink `{}` ({}): the GAP_OVERFLOW placeholder record id is never enqueued",
                    t.sink, t.at
                ));
            }
            let key = idempotency_key.render_string(ctx).map_err(|missing| {
                format!(
                    "sink `{}` ({}): the idempotency key `{}` has no value for {missing}",
                    t.sink,
                    t.at,
                    idempotency_key.source()
                )
            })?;
            if key.trim().is_empty() {
                return Err(format!(
                    "sink `{}` ({}): the idempotency key rendered empty",
                    t.sink, t.at
                ));
            }
            let data = {
                let scoped = RenderCtx {
                    idempotency_key: Some(&key),
                    ..*ctx
                };
                job.render(&scoped)
            };
            Op::Enqueue {
                job_id: job_id_for(&key),
                idempotency_key: key,
                data,
                options: job_options.clone(),
            }
        }
        ActionParams::CacheInvalidate {
            keys,
            patterns,
            publish,
        } => {
            let render_all = |list: &[crate::rules::template::Template]| -> Vec<String> {
                list.iter()
                    .filter_map(|k| match k.render_string(ctx) {
                        Ok(s) if !s.is_empty() => Some(s),
                        Ok(_) | Err(_) => {
                            tracing::debug!(route = %route.name, key = k.source(), "Cache key skipped: a part has no value.");
                            None
                        }
                    })
                    .collect()
            };
            let publish = match publish {
                Some((channel, message)) => match (channel.render_string(ctx), message.render_string(ctx)) {
                    (Ok(c), Ok(m)) => Some((c, m)),
                    (Err(missing), _) | (_, Err(missing)) => {
                        return Err(format!(
                            "sink `{}` ({}): `publish` has no value for {missing}",
                            t.sink, t.at
                        ));
                    }
                },
                None => None,
            };
            Op::Invalidate {
                keys: render_all(keys),
                patterns: render_all(patterns),
                publish,
            }
        }
        ActionParams::Log { message, level, fields } => {
            let message = message.render_lossy(ctx);
            let fields = fields.iter().map(|(k, v)| (k.clone(), v.render(ctx))).collect();
            Op::Log {
                level: *level,
                message,
                fields,
            }
        }
        ActionParams::Webhook {
            body,
            headers,
            idempotency_key,
        } => {
            let key = match idempotency_key {
                Some(template) => {
                    let key = template.render_string(ctx).map_err(|missing| {
                        format!(
                            "sink `{}` ({}): the idempotency key `{}` has no value for {missing}",
                            t.sink,
                            t.at,
                            template.source()
                        )
                    })?;
                    if key.trim().is_empty() {
                        return Err(format!(
                            "sink `{}` ({}): the idempotency key rendered empty",
                            t.sink, t.at
                        ));
                    }
                    Some(key)
                }
                None => None,
            };
            let scoped = RenderCtx {
                idempotency_key: key.as_deref(),
                ..*ctx
            };
            Op::Webhook {
                body: body.render(&scoped),
                headers: headers
                    .iter()
                    .map(|(k, v)| (k.clone(), v.render_lossy(&scoped)))
                    .collect(),
                idempotency_key: key,
            }
        }
        ActionParams::DeadLetter { reason } => {
            let reason = reason.render_lossy(ctx);
            Op::DeadLetter { reason }
        }
    };
    Ok(Action {
        route: route.name.clone(),
        sink: t.sink.clone(),
        record_id: ctx.record_id.map(str::to_string),
        shadow: route.shadow,
        op,
    })
}

/// The value of one top-level clause of a predicate, for `explain`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClauseValue {
    pub clause: String,
    /// The clause's value (JSON), or why it could not be evaluated.
    pub value: Result<serde_json::Value, String>,
}

/// Evaluates a predicate and each of its top-level clauses (split on `&&` / `||` outside brackets and
/// strings) for one record, with the record when given. Pure, like the rest of the router.
pub fn evaluate_clauses(
    rules: &RuleSet,
    event: &Event,
    predicate: &Predicate,
    record_id: Option<&str>,
    record: Option<&Map<String, Value>>,
) -> (Result<bool, String>, Vec<ClauseValue>) {
    let ctx = HelperCtx::new(event);
    let mut scope = event_scope(rules, event);
    scope.set_value("record_id", dyn_opt(record_id));
    ctx.set_has_record(record.is_some());
    let empty = Map::new();
    scope.set_value(
        "record",
        rhai::serde::to_dynamic(record.unwrap_or(&empty)).unwrap_or(Dynamic::UNIT),
    );
    helpers::with_ctx(&ctx, || {
        let whole = eval(rules, &mut scope, predicate);
        let clauses = split_clauses(&predicate.source);
        let values = if clauses.len() < 2 {
            Vec::new()
        } else {
            clauses
                .into_iter()
                .map(|clause| {
                    let value = rules
                        .engine
                        .compile_expression_with_scope(&scope, &clause)
                        .map_err(|e| e.to_string())
                        .and_then(|ast| {
                            rules
                                .engine
                                .eval_ast_with_scope::<Dynamic>(&mut scope, &ast)
                                .map_err(|e| e.to_string())
                        })
                        .map(|d| rhai::serde::from_dynamic::<Value>(&d).unwrap_or(Value::Null));
                    ClauseValue { clause, value }
                })
                .collect()
        };
        (whole, values)
    })
}

/// Splits a predicate on `&&` and `||` at the top level (outside parentheses, brackets and strings).
pub fn split_clauses(source: &str) -> Vec<String> {
    let mut clauses = Vec::new();
    let (mut depth, mut quote) = (0i32, None::<char>);
    let bytes: Vec<char> = source.chars().collect();
    let mut i = 0;
    let mut current = String::new();
    while i < bytes.len() {
        let c = bytes[i];
        match (quote, c) {
            (Some(q), _) if c == q => quote = None,
            (Some(_), '\\') => {
                current.push(c);
                i += 1;
                if let Some(n) = bytes.get(i) {
                    current.push(*n);
                }
                i += 1;
                continue;
            }
            (Some(_), _) => {}
            (None, '"' | '`' | '\'') => quote = Some(c),
            (None, '(' | '[' | '{') => depth += 1,
            (None, ')' | ']' | '}') => depth -= 1,
            (None, '&' | '|') if depth == 0 && bytes.get(i + 1) == Some(&c) => {
                clauses.push(current.trim().to_string());
                current.clear();
                i += 2;
                continue;
            }
            _ => {}
        }
        current.push(c);
        i += 1;
    }
    clauses.push(current.trim().to_string());
    clauses.into_iter().filter(|c| !c.is_empty()).collect()
}

#[cfg(test)]
mod clause_tests {
    #[test]
    fn clauses_split_at_the_top_level_only() {
        assert_eq!(
            super::split_clauses("became(\"A\", \"x && y\")\n  && (event.S == () || event.S in v) || is_gap()"),
            vec![
                "became(\"A\", \"x && y\")",
                "(event.S == () || event.S in v)",
                "is_gap()"
            ]
        );
        assert_eq!(super::split_clauses("changed(\"A\")"), vec!["changed(\"A\")"]);
    }
}

#[cfg(test)]
mod context_tests {
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
