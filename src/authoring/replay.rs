//! `switchyard replay`: a recorded stream through the rules with no side effects: totals per route and sink,
//! and with `--against` the decision diff between two rule sets. Streams the input (constant memory).

use std::collections::BTreeMap;
use std::io::{BufRead, Write};

use serde_json::{Map, Value};

use crate::authoring::testing::{action_json, plan_recorded};
use crate::event::Event;
use crate::plan::{Outcome, Plan};
use crate::rules::RuleSet;

/// Totals of a replay.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReplayReport {
    pub events: u64,
    pub malformed: u64,
    /// Times each route's `then` ran (new rules).
    pub fired: BTreeMap<String, u64>,
    /// Actions per sink (new rules).
    pub actions: BTreeMap<String, u64>,
    /// Events whose decisions differ between the two rule sets.
    pub differing: u64,
}

fn outcomes(plan: &Plan) -> BTreeMap<String, String> {
    plan.decisions
        .iter()
        .map(|d| {
            let key = match &d.record_id {
                Some(id) => format!("{} [{id}]", d.route),
                None => d.route.clone(),
            };
            let outcome = match &d.outcome {
                Outcome::Then => "then".to_string(),
                Outcome::Else => "else".to_string(),
                Outcome::Failed(e) => format!("failed ({e})"),
            };
            (key, outcome)
        })
        .collect()
}

/// Adds one to `name`'s total, allocating its key only the first time.
fn count(totals: &mut BTreeMap<String, u64>, name: &str) {
    match totals.get_mut(name) {
        Some(n) => *n += 1,
        None => {
            totals.insert(name.to_string(), 1);
        }
    }
}

/// Replays JSONL from `input`; writes the diff (when `old` is given) to `out`. `progress` is called every
/// 10,000 events with the count so far.
pub fn replay(
    input: impl BufRead,
    name: &str,
    new: &RuleSet,
    old: Option<&RuleSet>,
    out: &mut impl Write,
    progress: &mut dyn FnMut(u64),
) -> std::io::Result<ReplayReport> {
    let mut report = ReplayReport::default();
    let mut input = input;
    let mut line = String::new();
    for n in 0u64.. {
        // One buffer for every line: a replay of months of events allocates per event, not per line too.
        line.clear();
        if input.read_line(&mut line)? == 0 {
            break;
        }
        if line.trim().is_empty() {
            continue;
        }
        let event = match Event::from_json(&line) {
            Ok(event) => event,
            Err(_) => {
                report.malformed += 1;
                continue;
            }
        };
        report.events += 1;
        if report.events % 10_000 == 0 {
            progress(report.events);
        }
        let plan = plan_recorded(new, &event);
        for d in plan.decisions.iter().filter(|d| d.outcome == Outcome::Then) {
            count(&mut report.fired, &d.route);
        }
        for a in &plan.actions {
            count(&mut report.actions, &a.sink);
        }
        let Some(old) = old else { continue };
        let before = plan_recorded(old, &event);
        let new_actions: Vec<Map<String, Value>> = plan.actions.iter().map(action_json).collect();
        let old_actions: Vec<Map<String, Value>> = before.actions.iter().map(action_json).collect();
        if new_actions == old_actions {
            continue;
        }
        report.differing += 1;
        writeln!(out, "~ {} ({name}:{})", event.id, n + 1)?;
        for a in old_actions.iter().filter(|a| !new_actions.contains(a)) {
            writeln!(out, "  - {}", Value::Object(a.clone()))?;
        }
        for a in new_actions.iter().filter(|a| !old_actions.contains(a)) {
            writeln!(out, "  + {}", Value::Object(a.clone()))?;
        }
        let (was, now) = (outcomes(&before), outcomes(&plan));
        let mut keys: Vec<&String> = was.keys().chain(now.keys()).collect();
        keys.sort();
        keys.dedup();
        for k in keys {
            let (a, b) = (
                was.get(k).map_or("when false", String::as_str),
                now.get(k).map_or("when false", String::as_str),
            );
            if a != b {
                writeln!(out, "  route {k}: {a} -> {b}")?;
                let name = k.split(" [").next().unwrap_or(k);
                let (was_route, now_route) = (
                    old.routes.iter().find(|r| r.name == name),
                    new.routes.iter().find(|r| r.name == name),
                );
                if let (Some(w), Some(n)) = (was_route, now_route) {
                    let src = |p: Option<&crate::rules::Predicate>| {
                        p.map(|p| p.source.split_whitespace().collect::<Vec<_>>().join(" "))
                    };
                    for (clause, before, after) in [
                        ("when", src(Some(&w.when)), src(Some(&n.when))),
                        ("guard", src(w.guard.as_ref()), src(n.guard.as_ref())),
                    ] {
                        if before != after {
                            let show = |s: Option<String>| s.unwrap_or_else(|| "(none)".into());
                            writeln!(out, "    {clause} changed: {} -> {}", show(before), show(after))?;
                        }
                    }
                }
            }
        }
    }
    Ok(report)
}
