//! What the pipeline counts of the router's decisions: the per-route counts of `/rules`, and the Prometheus series
//! (created at zero at start-up, so alerts on `increase()` see the first event).

use std::collections::HashMap;
use std::sync::Mutex;

use crate::config::Config;
use crate::event::Event;
use crate::obs::metrics as m;
use crate::plan::{Outcome, Plan};
use crate::rules::RuleSet;

/// Per-route counters shown at `/rules`.
#[derive(Debug, Default)]
pub struct RouteCounters {
    inner: Mutex<HashMap<String, (u64, u64)>>,
}

impl RouteCounters {
    /// A route's `when` held (and, with `fired`, its `then` ran).
    pub fn record(&self, route: &str, fired: bool) {
        let mut map = self.inner.lock().expect("counter lock is never poisoned");
        let entry = map.entry(route.to_string()).or_default();
        entry.0 += 1;
        entry.1 += u64::from(fired);
    }

    pub fn get(&self, route: &str) -> (u64, u64) {
        self.inner
            .lock()
            .expect("counter lock is never poisoned")
            .get(route)
            .copied()
            .unwrap_or_default()
    }
}

/// Creates the per-route, per-sink and per-channel series at zero, so a scrape shows every series
/// before the first event (and alerts on `increase()` see the first one).
pub fn register(config: &Config, rules: &RuleSet) {
    m::set_role(if config.leases_enabled() { "standby" } else { "active" });
    for channel in rules.live_channels() {
        let channel = channel.to_string();
        metrics::counter!(m::EVENTS, "channel" => channel.clone()).increment(0);
        metrics::counter!(m::EVENTS_SETTLED, "channel" => channel.clone()).increment(0);
        metrics::counter!(m::EVENTS_UNMATCHED, "channel" => channel).increment(0);
    }
    for route in &rules.routes {
        if rules.candidates(&route.channel).is_empty() {
            continue;
        }
        for name in [
            m::ROUTE_EVALUATED,
            m::ROUTE_MATCHED,
            m::ROUTE_FIRED,
            m::ROUTE_SHADOW,
            m::ROUTE_FAILED,
            m::DEAD_LETTERS,
        ] {
            metrics::counter!(name, "route" => route.name.clone()).increment(0);
        }
    }
    for sink in config.sinks.keys() {
        for result in ["ok", "error"] {
            metrics::counter!(m::SINK_CALLS, "sink" => sink.clone(), "result" => result).increment(0);
        }
        for kind in ["transient", "permanent"] {
            metrics::counter!(m::SINK_ERRORS, "sink" => sink.clone(), "kind" => kind).increment(0);
        }
        metrics::counter!(m::SINK_RETRIES, "sink" => sink.clone()).increment(0);
        metrics::counter!(m::IDEMPOTENT_SKIPS, "sink" => sink.clone()).increment(0);
    }
    for result in ["ok", "unchanged", "error"] {
        metrics::counter!(m::RULES_RELOADS, "result" => result).increment(0);
    }
    metrics::counter!(m::EVENTS_MALFORMED).increment(0);
    metrics::counter!(m::CHECKPOINT_COMMITS).increment(0);
    metrics::counter!(m::CHECKPOINT_ERRORS).increment(0);
    metrics::counter!(m::CHECKPOINT_FENCED).increment(0);
}

/// Counts the `when` evaluations of one event: every live route of its channel, once per record (phase
/// one evaluates them all; `stop` only cuts phase two).
pub fn record_evaluated(rules: &RuleSet, event: &Event) {
    let units = if event.header.is_some() {
        event.record_ids().len() as u64
    } else {
        1
    };
    for &i in rules.routes_for(event) {
        metrics::counter!(m::ROUTE_EVALUATED, "route" => rules.routes[i].name.clone()).increment(units);
    }
}

/// Counts what the router decided: matched, then fired, shadow or failed.
pub fn record_decisions(plan: &Plan) {
    for d in &plan.decisions {
        metrics::counter!(m::ROUTE_MATCHED, "route" => d.route.clone()).increment(1);
        match &d.outcome {
            Outcome::Then if d.shadow => metrics::counter!(m::ROUTE_SHADOW, "route" => d.route.clone()).increment(1),
            Outcome::Then => metrics::counter!(m::ROUTE_FIRED, "route" => d.route.clone()).increment(1),
            Outcome::Else => {}
            Outcome::Failed(_) => metrics::counter!(m::ROUTE_FAILED, "route" => d.route.clone()).increment(1),
        }
    }
}
