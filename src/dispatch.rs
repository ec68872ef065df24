//! The dispatcher runs a Plan: actions in order, transient errors retried with backoff, everything
//! else (and exhausted retries) dead-lettered. Nothing is dropped.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::event::Event;
use crate::metrics as m;
use crate::plan::{Action, Op, Plan};
use crate::sinks::{ActionCx, DeadLetter, SinkError, Sinks};

/// Attempts per action before a transient failure is dead-lettered.
const MAX_ATTEMPTS: u32 = 6;
/// First retry delay; doubles per attempt up to `MAX_BACKOFF` (total wait before giving up: ~6 s).
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// A dead letter that cannot be written (the store is down) is retried at this pace, forever: the
/// pipeline stops pulling meanwhile, which is the backpressure that keeps the event from being lost.
const DEAD_LETTER_RETRY: Duration = Duration::from_secs(1);

/// How one action ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActionResult {
    Done {
        attempts: u32,
    },
    /// A shadow route's action: not sent.
    Shadow,
    /// Parked in the dead letters (a `dead-letter` action, a failed route, or a failed sink call).
    DeadLettered {
        reason: String,
    },
}

pub struct Dispatcher {
    sinks: Arc<Sinks>,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Dispatcher {
    pub fn new(sinks: Arc<Sinks>) -> Self {
        Dispatcher { sinks }
    }

    /// Runs every action of the plan in order; returns how each ended.
    pub async fn run(&self, plan: &Plan, event: &Event) -> Vec<ActionResult> {
        let mut results = Vec::with_capacity(plan.actions.len());
        for action in &plan.actions {
            results.push(self.run_action(plan, event, action).await);
        }
        results
    }

    async fn run_action(&self, plan: &Plan, event: &Event, action: &Action) -> ActionResult {
        if action.shadow {
            metrics::counter!(m::SHADOW_ACTIONS, "route" => action.route.clone(), "sink" => action.sink.clone())
                .increment(1);
            tracing::debug!(route = %action.route, event_id = %event.id, action = %action.summary(), "Shadow route action recorded, no sink called.");
            return ActionResult::Shadow;
        }
        if let Op::DeadLetter { reason } = &action.op {
            let letter = self.letter(plan, event, action, reason.clone(), 0);
            self.park(letter).await;
            return ActionResult::DeadLettered { reason: reason.clone() };
        }
        let Some(sink) = self.sinks.by_name.get(&action.sink) else {
            let reason = format!("sink `{}` is not configured", action.sink);
            self.park(self.letter(plan, event, action, reason.clone(), 0)).await;
            return ActionResult::DeadLettered { reason };
        };
        let cx = ActionCx {
            event,
            rules_version: &plan.rules_version,
        };
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match sink.run(action, &cx).await {
                Ok(_) => {
                    metrics::counter!(m::SINK_CALLS, "sink" => action.sink.clone(), "result" => "ok").increment(1);
                    return ActionResult::Done { attempts: attempt };
                }
                Err(err) => {
                    metrics::counter!(m::SINK_CALLS, "sink" => action.sink.clone(), "result" => "error").increment(1);
                    if err.is_transient() && attempt < MAX_ATTEMPTS {
                        metrics::counter!(m::SINK_RETRIES, "sink" => action.sink.clone()).increment(1);
                        tracing::warn!(sink = %action.sink, route = %action.route, event_id = %event.id, attempt, error = %err, "Sink call failed; retrying.");
                        tokio::time::sleep(jitter(backoff)).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        continue;
                    }
                    let reason = format!("sink `{}` failed after {attempt} attempt(s): {err}", action.sink);
                    tracing::error!(sink = %action.sink, route = %action.route, event_id = %event.id, rules_version = %plan.rules_version, error = %err, "Action dead-lettered.");
                    self.park(self.letter(plan, event, action, reason.clone(), attempt))
                        .await;
                    return ActionResult::DeadLettered { reason };
                }
            }
        }
    }

    fn letter(&self, plan: &Plan, event: &Event, action: &Action, reason: String, attempts: u32) -> DeadLetter {
        DeadLetter {
            at_ms: now_ms(),
            reason,
            rules_version: Some(plan.rules_version.clone()),
            event_id: Some(event.id.clone()),
            route: Some(action.route.clone()),
            record_id: action.record_id.clone(),
            action: Some(action.clone()),
            attempts,
            event: Some(event.clone()),
            raw: None,
        }
    }

    /// Writes a dead letter, retrying while the store is unreachable.
    pub async fn park(&self, letter: DeadLetter) {
        metrics::counter!(m::DEAD_LETTERS, "route" => letter.route.clone().unwrap_or_default()).increment(1);
        loop {
            match self.sinks.dead_letters.write(&letter).await {
                Ok(()) => return,
                Err(SinkError::Permanent(e)) => {
                    // Cannot happen for well-formed letters; the log line then carries the whole letter.
                    tracing::error!(error = %e, letter = %serde_json::to_string(&letter).unwrap_or_default(), "Dead letter could not be stored.");
                    return;
                }
                Err(SinkError::Transient(e)) => {
                    tracing::warn!(error = %e, event_id = ?letter.event_id, "Dead-letter store unavailable; holding the event and retrying.");
                    tokio::time::sleep(DEAD_LETTER_RETRY).await;
                }
            }
        }
    }
}

/// Up to +25% of `d`, so that many retrying callers do not hit a recovering Redis in lockstep.
fn jitter(d: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0) as u64;
    d + Duration::from_millis(nanos % (d.as_millis() as u64 / 4 + 1))
}
