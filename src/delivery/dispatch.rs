//! The dispatcher runs a Plan: a record's actions in order; transient errors retried with exponential
//! backoff and jitter within a time budget; actions with an idempotency key run under a lease and are
//! marked done after success; permanent errors and exhausted budgets are dead-lettered. Nothing is dropped.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tracing::Instrument;

use crate::config::RetryConfig;
use crate::event::Event;
use crate::failure::Failure;
use crate::obs::metrics as m;
use crate::plan::{Action, Op, Plan};
use crate::sinks::{ActionCx, Sink, Sinks};
use crate::state::idempotency::Claim;
use crate::state::lease::Fence;
use crate::state::{DeadLetter, Stores};

/// A dead letter that cannot be written (its store is down) is retried at this pace, forever: the
/// event stays unsettled meanwhile, so its position is not committed and the source stops being read
/// once `delivery.concurrency` events wait: backpressure instead of loss.
const DEAD_LETTER_RETRY: Duration = Duration::from_secs(1);

/// How one action ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActionResult {
    Done {
        attempts: u32,
    },
    /// Its idempotency key was marked done by an earlier delivery: not run again.
    Skipped,
    /// A shadow route's action: not sent.
    Shadow,
    /// Parked in the dead letters (a `dead-letter` action, a failed route, or a failed sink call).
    DeadLettered {
        reason: String,
    },
    /// Not run, or not marked done: this replica lost the channel lease the event came under. The event is not
    /// settled here; the replica holding the lease now redelivers it.
    Abandoned,
    /// Not finished: the service is stopping, and the action was waiting to retry (a sink or Redis failing, or an
    /// idempotency key leased by a crashed holder). The event is not settled; its position is not stored, so it is
    /// redelivered after the restart (or by the replica that takes the channel over).
    Interrupted,
}

/// Retries in a row after a dropped connection before the normal backoff applies, and their pause.
const QUICK_RETRIES: u32 = 3;
const QUICK_RETRY: Duration = Duration::from_millis(10);

pub struct Dispatcher {
    stores: Arc<Stores>,
    sinks: Arc<Sinks>,
    retry: RetryConfig,
    redact: Vec<String>,
    /// True once the service stops: actions waiting to retry give up (`Interrupted`) instead of holding the stop.
    stopping: tokio::sync::watch::Sender<bool>,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Replaces the named payload and record fields (and log-sink fields) by `***`.
pub fn redact_event(event: &mut Event, fields: &[String]) {
    for f in fields {
        if let Some(v) = event.fields.get_mut(f) {
            *v = Value::from("***");
        }
        for record in event.record.values_mut().flatten() {
            if let Some(v) = record.get_mut(f) {
                *v = Value::from("***");
            }
        }
    }
}

fn redact_action(action: &mut Action, fields: &[String]) {
    match &mut action.op {
        Op::Log { fields: log_fields, .. } => {
            for f in fields {
                if let Some(v) = log_fields.get_mut(f) {
                    *v = Value::from("***");
                }
            }
        }
        Op::Enqueue {
            data: Value::Object(data),
            ..
        }
        | Op::Webhook {
            body: Value::Object(data),
            ..
        } => {
            for f in fields {
                if let Some(v) = data.get_mut(f) {
                    *v = Value::from("***");
                }
            }
        }
        _ => {}
    }
}

impl Dispatcher {
    pub fn new(stores: Arc<Stores>, sinks: Arc<Sinks>, retry: RetryConfig, redact: Vec<String>) -> Self {
        Dispatcher {
            stores,
            sinks,
            retry,
            redact,
            stopping: tokio::sync::watch::Sender::new(false),
        }
    }

    /// The service is stopping: retries waiting from now on give up, and the events they belong to stay unsettled.
    pub fn stop(&self) {
        self.stopping.send_replace(true);
    }

    /// Waits `d` before a retry; false when the service began stopping meanwhile (or had already).
    async fn pause(&self, d: Duration) -> bool {
        let mut stopping = self.stopping.subscribe();
        if *stopping.borrow() {
            return false;
        }
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = stopping.wait_for(|s| *s) => false,
        }
    }

    /// Runs every action of the plan in order; returns how each ended.
    /// `fence`: the channel lease the event came under; once it is lost, the remaining actions are abandoned.
    pub async fn run(&self, plan: &Plan, event: &Event, fence: Option<&Fence>) -> Vec<ActionResult> {
        let mut results = Vec::with_capacity(plan.actions.len());
        for action in &plan.actions {
            let result = if fence.is_some_and(Fence::is_lost) {
                ActionResult::Abandoned
            } else if results.contains(&ActionResult::Interrupted) {
                // A record's actions run in order: none after one that did not finish.
                ActionResult::Interrupted
            } else {
                self.run_action(&plan.rules_version, event, action, fence).await
            };
            results.push(result);
        }
        results
    }

    /// Runs one action to its end (also used by `dead-letter retry`), in a span that puts the route,
    /// record id, sink and correlation id on every line logged meanwhile.
    pub async fn run_action(
        &self,
        rules_version: &str,
        event: &Event,
        action: &Action,
        fence: Option<&Fence>,
    ) -> ActionResult {
        // ERROR level, so that a `RUST_LOG=warn` filter keeps the span's fields on the warnings inside it.
        let span = tracing::error_span!(
            "action",
            route = %action.route,
            record_id = action.record_id.as_deref(),
            sink = %action.sink,
            correlation_id = action.correlation_id(),
        );
        self.run_action_inner(rules_version, event, action, fence)
            .instrument(span)
            .await
    }

    async fn run_action_inner(
        &self,
        rules_version: &str,
        event: &Event,
        action: &Action,
        fence: Option<&Fence>,
    ) -> ActionResult {
        if action.shadow {
            metrics::counter!(m::SHADOW_ACTIONS, "route" => action.route.clone(), "sink" => action.sink.clone())
                .increment(1);
            tracing::debug!(route = %action.route, event_id = %event.id, action = %action.summary(), "Shadow route action recorded, no sink called.");
            return ActionResult::Shadow;
        }
        if let Op::DeadLetter { reason } = &action.op {
            self.park(self.letter(rules_version, event, action, reason.clone(), 0))
                .await;
            return ActionResult::DeadLettered { reason: reason.clone() };
        }
        let Some(sink) = self.sinks.get(&action.sink) else {
            let reason = format!("sink `{}` is not configured", action.sink);
            self.park(self.letter(rules_version, event, action, reason.clone(), 0))
                .await;
            return ActionResult::DeadLettered { reason };
        };
        match self.attempt(&sink, rules_version, event, action, fence).await {
            Ok(result) => result,
            Err((Failure::Fenced(e), _)) => {
                tracing::warn!(sink = %action.sink, route = %action.route, event_id = %event.id, error = %e, "Action abandoned: the channel lease moved to another replica, which redelivers the event.");
                ActionResult::Abandoned
            }
            Err((err, attempts)) => {
                let reason = format!("sink `{}` failed after {attempts} attempt(s): {err}", action.sink);
                tracing::error!(sink = %action.sink, route = %action.route, event_id = %event.id, rules_version, error = %err, "Action dead-lettered.");
                self.park(self.letter(rules_version, event, action, reason.clone(), attempts))
                    .await;
                ActionResult::DeadLettered { reason }
            }
        }
    }

    /// Claims the idempotency lease (when the action has a key), calls the sink, marks it done. Retries
    /// transient errors of any of these steps within the budget.
    async fn attempt(
        &self,
        sink: &Sink,
        rules_version: &str,
        event: &Event,
        action: &Action,
        fence: Option<&Fence>,
    ) -> Result<ActionResult, (Failure, u32)> {
        let key = match &action.op {
            Op::Enqueue { idempotency_key, .. } => Some(idempotency_key.as_str()),
            Op::Webhook { idempotency_key, .. } => idempotency_key.as_deref(),
            _ => None,
        };
        let idem = &self.stores.idempotency;
        let cx = ActionCx { event, rules_version };
        let started = Instant::now();
        let budget = Duration::from_millis(self.retry.budget_ms);
        let mut backoff = Duration::from_millis(self.retry.initial_backoff_ms.max(1));
        let max_backoff = Duration::from_millis(self.retry.max_backoff_ms.max(1));
        // One token per keyed action: a claim whose reply was lost is recognised as ours on the next attempt.
        let own_token = key.map(|_| crate::state::idempotency::new_token());
        let mut token: Option<String> = None;
        let mut attempts = 0;
        let mut quick_retries = 0;
        loop {
            attempts += 1;
            let step: Result<Option<ActionResult>, Failure> = async {
                if let Some(key) = key {
                    match idem
                        .claim(&action.sink, key, own_token.as_deref(), fence)
                        .await
                        .map_err(|e| e.context("idempotency claim"))?
                    {
                        Claim::Done => return Ok(Some(ActionResult::Skipped)),
                        // Another holder (a crashed process whose lease has not expired, or a concurrent
                        // delivery of the same key): wait for it like for a transient error.
                        Claim::Busy => return Err(Failure::Transient(format!("idempotency key `{key}` is leased by another holder"))),
                        Claim::Acquired(t) => token = Some(t),
                    }
                }
                let call = async {
                    let started = Instant::now();
                    let result = sink.run(action, &cx).await;
                    metrics::histogram!(m::SINK_DURATION, "sink" => action.sink.clone())
                        .record(started.elapsed().as_secs_f64());
                    result
                };
                let outcome = match (key, &token) {
                    // Renew the lease while the call runs, at a third of its lifetime.
                    (Some(key), Some(t)) => {
                        let renew_every = idem.ttls().lease / 3;
                        tokio::pin!(call);
                        loop {
                            tokio::select! {
                                r = &mut call => break r,
                                _ = tokio::time::sleep(renew_every) => { let _ = idem.renew(&action.sink, key, t).await; }
                            }
                        }
                    }
                    _ => call.await,
                };
                outcome?;
                if let Some(key) = key {
                    idem.complete(&action.sink, key, fence)
                        .await
                        .map_err(|e| e.context("done marker"))?;
                }
                Ok(None)
            }
            .await;
            match step {
                Ok(Some(result)) => {
                    metrics::counter!(m::IDEMPOTENT_SKIPS, "sink" => action.sink.clone()).increment(1);
                    tracing::debug!(sink = %action.sink, event_id = %event.id, "Action already done for its idempotency key; skipped.");
                    return Ok(result);
                }
                Ok(None) => {
                    metrics::counter!(m::SINK_CALLS, "sink" => action.sink.clone(), "result" => "ok").increment(1);
                    return Ok(ActionResult::Done { attempts });
                }
                Err(err) => {
                    metrics::counter!(m::SINK_CALLS, "sink" => action.sink.clone(), "result" => "error").increment(1);
                    let kind = if err.is_transient() { "transient" } else { "permanent" };
                    metrics::counter!(m::SINK_ERRORS, "sink" => action.sink.clone(), "kind" => kind).increment(1);
                    let retry = err.is_transient() && started.elapsed() + backoff < budget;
                    if retry {
                        metrics::counter!(m::SINK_RETRIES, "sink" => action.sink.clone()).increment(1);
                        tracing::warn!(sink = %action.sink, route = %action.route, event_id = %event.id, attempt = attempts, error = %err, "Sink call failed; retrying.");
                        // A dropped connection is being replaced as we speak: retry on the new one at once (a few
                        // times in a row at most), rather than after a pause in which it may drop again.
                        let pause = if matches!(err, Failure::Dropped(_)) && quick_retries < QUICK_RETRIES {
                            quick_retries += 1;
                            QUICK_RETRY
                        } else {
                            quick_retries = 0;
                            let pause = backoff;
                            backoff = (backoff * 2).min(max_backoff);
                            pause
                        };
                        if self.pause(jitter(pause)).await {
                            continue;
                        }
                        tracing::warn!(sink = %action.sink, route = %action.route, event_id = %event.id, attempt = attempts, error = %err, "Stopping: the action is not retried here; the event stays unsettled and is redelivered.");
                    }
                    if let (Some(key), Some(t)) = (key, &token) {
                        // Best effort: if Redis is down the lease simply expires.
                        let _ = idem.release(&action.sink, key, t).await;
                    }
                    // A retry that did not happen: the service is stopping.
                    if retry {
                        return Ok(ActionResult::Interrupted);
                    }
                    return Err((err, attempts));
                }
            }
        }
    }

    fn letter(&self, rules_version: &str, event: &Event, action: &Action, reason: String, attempts: u32) -> DeadLetter {
        let mut event = event.clone();
        let mut action = action.clone();
        redact_event(&mut event, &self.redact);
        redact_action(&mut action, &self.redact);
        DeadLetter {
            at_ms: now_ms(),
            reason,
            rules_version: Some(rules_version.to_string()),
            event_id: Some(event.id.clone()),
            route: Some(action.route.clone()),
            record_id: action.record_id.clone(),
            action: Some(action),
            attempts,
            event: Some(event),
            raw: None,
        }
    }

    /// Writes a dead letter, retrying while the store is unreachable.
    pub async fn park(&self, letter: DeadLetter) {
        metrics::counter!(m::DEAD_LETTERS, "route" => letter.route.clone().unwrap_or_default()).increment(1);
        loop {
            match self.stores.dead_letters.write(&letter).await {
                Ok(()) => return,
                Err(Failure::Permanent(e) | Failure::Fenced(e)) => {
                    // Cannot happen for well-formed letters; the log line then carries the whole letter.
                    tracing::error!(error = %e, letter = %serde_json::to_string(&letter).unwrap_or_default(), "Dead letter could not be stored.");
                    return;
                }
                Err(Failure::Transient(e) | Failure::Dropped(e)) => {
                    tracing::warn!(error = %e, event_id = ?letter.event_id, "Dead-letter store unavailable; holding the event and retrying.");
                    tokio::time::sleep(DEAD_LETTER_RETRY).await;
                }
            }
        }
    }
}

/// Up to +25% of `d`, so that many retrying callers do not hit a recovering Redis in lockstep.
pub(crate) fn jitter(d: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0) as u64;
    d + Duration::from_millis(nanos % (d.as_millis() as u64 / 4 + 1))
}
