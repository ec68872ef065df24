//! The pipeline wires the boxes: source -> router (`when`) -> enricher -> router (`guard`) -> dispatcher.
//! Events are handled one at a time in delivery order, which keeps every record's order.

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::config::{Config, OnUnmatched};
use crate::dispatch::{ActionResult, Dispatcher, now_ms};
use crate::enrich::Enricher;
use crate::event::Event;
use crate::metrics as m;
use crate::plan::{Op, Outcome, Plan};
use crate::router;
use crate::rules::RuleSet;
use crate::sinks::{DeadLetter, Sinks};
use crate::sources::Delivery;
use crate::sources::jsonl::JsonlSource;

/// Counts for the summary printed when a finite source ends.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    pub events: u64,
    pub malformed: u64,
    pub unmatched: u64,
    pub actions_done: BTreeMap<String, u64>,
    pub shadow: u64,
    pub dead_letters: u64,
    pub routes_fired: BTreeMap<String, u64>,
}

pub struct Pipeline {
    pub rules: Arc<ArcSwap<RuleSet>>,
    pub enricher: Enricher,
    pub dispatcher: Dispatcher,
    pub sinks: Arc<Sinks>,
    pub on_unmatched: OnUnmatched,
    pub print_decisions: bool,
}

impl Pipeline {
    pub fn new(config: &Config, rules: Arc<ArcSwap<RuleSet>>, sinks: Arc<Sinks>) -> Self {
        Pipeline {
            rules,
            enricher: Enricher::from_kind(config.enricher),
            dispatcher: Dispatcher::new(sinks.clone()),
            sinks,
            on_unmatched: config.on_unmatched,
            print_decisions: config.print_decisions,
        }
    }

    /// Runs until the source ends or `shutdown` turns true (the event in hand is finished first).
    pub async fn run(&self, source: &mut JsonlSource, mut shutdown: watch::Receiver<bool>) -> Stats {
        let mut stats = Stats::default();
        loop {
            if *shutdown.borrow() {
                break;
            }
            let delivery = tokio::select! {
                d = source.next() => d,
                _ = shutdown.changed() => continue,
            };
            let Some(delivery) = delivery else { break };
            self.handle(delivery, &mut stats).await;
        }
        stats
    }

    /// Handles one delivery to the end: every action done, shadowed or dead-lettered.
    pub async fn handle(&self, delivery: Delivery, stats: &mut Stats) {
        match delivery {
            Delivery::Malformed { position, raw, error } => {
                stats.malformed += 1;
                metrics::counter!(m::EVENTS_MALFORMED).increment(1);
                tracing::error!(position = %position, error = %error, "Malformed input line dead-lettered.");
                if self.print_decisions {
                    println!("{position}: malformed event: {error} (dead-lettered)");
                }
                let letter = DeadLetter {
                    at_ms: now_ms(),
                    reason: format!("{position}: {error}"),
                    rules_version: Some(self.rules.load().version.clone()),
                    event_id: None,
                    route: None,
                    record_id: None,
                    action: None,
                    attempts: 0,
                    event: None,
                    raw: Some(raw),
                };
                self.dispatcher.park(letter).await;
                stats.dead_letters += 1;
            }
            Delivery::Event { mut event, position } => {
                stats.events += 1;
                metrics::counter!(m::EVENTS, "channel" => event.channel.clone()).increment(1);
                // One rules version from the first route to the last.
                let rules = self.rules.load_full();
                let plan = self.decide(&rules, &mut event).await;
                if !plan.matched() {
                    self.unmatched(&rules, &event, &position, stats).await;
                    return;
                }
                for d in &plan.decisions {
                    metrics::counter!(m::ROUTE_MATCHED, "route" => d.route.clone()).increment(1);
                    if matches!(d.outcome, Outcome::Failed(_)) {
                        metrics::counter!(m::ROUTE_FAILED, "route" => d.route.clone()).increment(1);
                        tracing::warn!(route = %d.route, event_id = %event.id, record_id = ?d.record_id, rules_version = %rules.version, outcome = ?d.outcome, "Route failed; the event is dead-lettered for it.");
                    }
                }
                let results = self.dispatcher.run(&plan, &event).await;
                for (action, result) in plan.actions.iter().zip(&results) {
                    match result {
                        ActionResult::Done { .. } => *stats.actions_done.entry(action.sink.clone()).or_default() += 1,
                        ActionResult::Shadow => stats.shadow += 1,
                        ActionResult::DeadLettered { .. } => stats.dead_letters += 1,
                    }
                }
                for d in plan.decisions.iter().filter(|d| d.outcome == Outcome::Then) {
                    *stats.routes_fired.entry(d.route.clone()).or_default() += 1;
                }
                if self.print_decisions {
                    print_plan(&event, &position, &plan, &results);
                }
            }
        }
    }

    /// Both router phases with the enrichment between them; the records read are kept with the event.
    pub async fn decide(&self, rules: &RuleSet, event: &mut Event) -> Plan {
        let needs = router::needs(rules, event);
        let requests = needs.requests(rules);
        let records = self.enricher.read(event, &requests).await;
        for (id, result) in &records {
            if let Ok(fields) = result {
                event.record.entry(id.clone()).or_insert_with(|| fields.clone());
            }
        }
        router::plan(rules, event, needs, &records)
    }

    async fn unmatched(&self, rules: &RuleSet, event: &Event, position: &str, stats: &mut Stats) {
        stats.unmatched += 1;
        metrics::counter!(m::EVENTS_UNMATCHED, "channel" => event.channel.clone()).increment(1);
        if self.print_decisions {
            println!("{} ({position}): no route matched", event.id);
        }
        match self.on_unmatched {
            OnUnmatched::Ignore => {}
            OnUnmatched::Log => {
                tracing::info!(event_id = %event.id, channel = %event.channel, rules_version = %rules.version, "No route matched the event.")
            }
            OnUnmatched::DeadLetter => {
                let letter = DeadLetter {
                    at_ms: now_ms(),
                    reason: "no route matched the event (on_unmatched: dead-letter)".into(),
                    rules_version: Some(rules.version.clone()),
                    event_id: Some(event.id.clone()),
                    route: None,
                    record_id: None,
                    action: None,
                    attempts: 0,
                    event: Some(event.clone()),
                    raw: None,
                };
                self.dispatcher.park(letter).await;
                stats.dead_letters += 1;
            }
        }
    }
}

fn print_plan(event: &Event, position: &str, plan: &Plan, results: &[ActionResult]) {
    let change = event
        .change_type()
        .map(|c| format!(" {}", c.as_str()))
        .unwrap_or_default();
    println!("{} ({position}) {}{change}", event.id, event.channel);
    for d in &plan.decisions {
        let outcome = match &d.outcome {
            Outcome::Then => "then".to_string(),
            Outcome::Else => "else (guard failed)".to_string(),
            Outcome::Failed(e) => format!("FAILED: {e}"),
        };
        let record = d.record_id.as_deref().map(|r| format!(" [{r}]")).unwrap_or_default();
        let shadow = if d.shadow { " (shadow)" } else { "" };
        println!("  {}{record}{shadow}: {outcome}", d.route);
        for (action, result) in plan.actions.iter().zip(results) {
            if action.route != d.route || action.record_id != d.record_id {
                continue;
            }
            let status = match result {
                ActionResult::Done { .. } => "ok".to_string(),
                ActionResult::Shadow => "not sent".to_string(),
                ActionResult::DeadLettered { .. } if matches!(action.op, Op::DeadLetter { .. }) => {
                    "dead-lettered".to_string()
                }
                ActionResult::DeadLettered { reason } => format!("dead-lettered: {reason}"),
            };
            println!("    -> {}  [{status}]", action.summary());
        }
    }
}

impl Stats {
    /// The summary printed when a finite source ends.
    pub fn print_summary(&self, sinks: &Sinks) {
        println!();
        println!(
            "Summary: {} events ({} malformed), {} matched no route, {} dead letters, {} shadow actions",
            self.events + self.malformed,
            self.malformed,
            self.unmatched,
            self.dead_letters,
            self.shadow
        );
        for (route, n) in &self.routes_fired {
            println!("  route {route}: fired {n} time(s)");
        }
        for (sink, n) in &self.actions_done {
            println!("  sink {sink}: {n} action(s) done");
        }
        if let Some(memory) = &sinks.memory {
            let jobs = memory.jobs();
            println!("In-memory queue: {} job(s)", jobs.len());
            for job in jobs {
                println!("  {}/{} {} {}", job.queue, job.name, job.id, job.data);
            }
            println!(
                "In-memory cache: {} key(s) invalidated",
                memory.invalidated_keys().len()
            );
        }
    }
}
