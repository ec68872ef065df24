//! The dispatcher runs a Plan: a record's actions in order; transient errors retried with exponential
//! backoff and jitter within a time budget; actions with an idempotency key run under a lease and are
//! marked done after success; permanent errors and exhausted budgets are dead-lettered. Nothing is dropped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::Instrument;

use crate::clock::jitter;
use crate::config::RetryConfig;
use crate::event::Event;
use crate::failure::Failure;
use crate::obs::metrics as m;
use crate::plan::{Action, Op, Plan};
use crate::sinks::{ActionCx, Sink, Sinks};
use crate::state::Fence;
use crate::state::{Claim, DeadLetter, Idempotency, Stores};

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
        /// The dead letter's id (`dead-letter show ID`), when it could be stored.
        letter: Option<String>,
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
        self.run_guarded(plan, event, fence, &[]).await
    }

    /// [`run`](Self::run), with the actions of paused routes dead-lettered with the pause's reason instead (each
    /// letter keeps its action, so `dead-letter retry` runs exactly it once the route is resumed).
    pub async fn run_guarded(
        &self,
        plan: &Plan,
        event: &Event,
        fence: Option<&Fence>,
        paused: &[Paused],
    ) -> Vec<ActionResult> {
        let mut results = Vec::with_capacity(plan.actions.len());
        for action in &plan.actions {
            let pause = paused
                .iter()
                .find(|p| p.route == action.route && p.record_id == action.record_id);
            let result = if fence.is_some_and(Fence::is_lost) {
                ActionResult::Abandoned
            } else if let Some(p) = pause.filter(|_| !action.shadow) {
                let reason = p.reason.clone();
                let letter = self
                    .park(self.letter(&plan.rules_version, event, action, reason.clone(), 0))
                    .await;
                ActionResult::DeadLettered { reason, letter }
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
            let letter = self
                .park(self.letter(rules_version, event, action, reason.clone(), 0))
                .await;
            return ActionResult::DeadLettered {
                reason: reason.clone(),
                letter,
            };
        }
        let Some(sink) = self.sinks.get(&action.sink) else {
            let reason = format!("sink `{}` is not configured", action.sink);
            let letter = self
                .park(self.letter(rules_version, event, action, reason.clone(), 0))
                .await;
            return ActionResult::DeadLettered { reason, letter };
        };
        let cx = ActionCx { event, rules_version };
        match self.attempt(&sink, action, &cx, fence).await {
            Ok(result) => result,
            Err((Failure::Fenced(e), _)) => {
                tracing::warn!(sink = %action.sink, route = %action.route, event_id = %event.id, error = %e, "Action abandoned: the channel lease moved to another replica, which redelivers the event.");
                ActionResult::Abandoned
            }
            Err((err, attempts)) => {
                let reason = format!("sink `{}` failed after {attempts} attempt(s): {err}", action.sink);
                tracing::error!(sink = %action.sink, route = %action.route, event_id = %event.id, rules_version, error = %err, "Action dead-lettered.");
                let letter = self
                    .park(self.letter(rules_version, event, action, reason.clone(), attempts))
                    .await;
                ActionResult::DeadLettered { reason, letter }
            }
        }
    }

    /// Runs the action under its idempotency guard, retrying transient failures of any step (claim, call, done
    /// marker) with backoff within the budget. Ends `Done`, `Skipped` (done before) or `Interrupted` (the service
    /// stopped while a retry waited); otherwise the failure that ends it and the attempts made.
    async fn attempt(
        &self,
        sink: &Sink,
        action: &Action,
        cx: &ActionCx<'_>,
        fence: Option<&Fence>,
    ) -> Result<ActionResult, (Failure, u32)> {
        let mut guard = Guard::new(&self.stores.idempotency, action, fence);
        let mut retry = Retry::new(&self.retry);
        loop {
            let err = match self.try_once(sink, action, cx, &mut guard).await {
                Ok(Ran::Called) => {
                    metrics::counter!(m::SINK_CALLS, "sink" => action.sink.clone(), "result" => "ok").increment(1);
                    return Ok(ActionResult::Done {
                        attempts: retry.attempts,
                    });
                }
                Ok(Ran::AlreadyDone) => {
                    metrics::counter!(m::IDEMPOTENT_SKIPS, "sink" => action.sink.clone()).increment(1);
                    tracing::debug!(sink = %action.sink, event_id = %cx.event.id, "Action already done for its idempotency key; skipped.");
                    return Ok(ActionResult::Skipped);
                }
                Err(err) => err,
            };
            metrics::counter!(m::SINK_CALLS, "sink" => action.sink.clone(), "result" => "error").increment(1);
            let kind = if err.is_transient() { "transient" } else { "permanent" };
            metrics::counter!(m::SINK_ERRORS, "sink" => action.sink.clone(), "kind" => kind).increment(1);
            let pause = retry.pause_after(&err);
            if let Some(pause) = pause {
                metrics::counter!(m::SINK_RETRIES, "sink" => action.sink.clone()).increment(1);
                tracing::warn!(sink = %action.sink, route = %action.route, event_id = %cx.event.id, attempt = retry.attempts, error = %err, "Sink call failed; retrying.");
                if self.pause(pause).await {
                    retry.attempts += 1;
                    continue;
                }
                tracing::warn!(sink = %action.sink, route = %action.route, event_id = %cx.event.id, attempt = retry.attempts, error = %err, "Stopping: the action is not retried here; the event stays unsettled and is redelivered.");
            }
            guard.release().await;
            // A retry that did not happen: the service is stopping.
            return match pause {
                Some(_) => Ok(ActionResult::Interrupted),
                None => Err((err, retry.attempts)),
            };
        }
    }

    /// One attempt: claim (when keyed), call the sink while the claim is renewed, mark done.
    async fn try_once(
        &self,
        sink: &Sink,
        action: &Action,
        cx: &ActionCx<'_>,
        guard: &mut Guard<'_>,
    ) -> Result<Ran, Failure> {
        if guard.claim().await? == Claimed::AlreadyDone {
            return Ok(Ran::AlreadyDone);
        }
        let call = async {
            let started = Instant::now();
            let result = sink.run(action, cx).await;
            metrics::histogram!(m::SINK_DURATION, "sink" => action.sink.clone())
                .record(started.elapsed().as_secs_f64());
            result
        };
        guard.renewing(call).await?;
        guard.complete().await?;
        Ok(Ran::Called)
    }

    fn letter(&self, rules_version: &str, event: &Event, action: &Action, reason: String, attempts: u32) -> DeadLetter {
        let mut event = event.clone();
        let mut action = action.clone();
        event.redact(&self.redact);
        action.redact(&self.redact);
        DeadLetter::of_action(rules_version, event, action, reason, attempts)
    }

    /// Writes a dead letter, retrying while the store is unreachable; returns its id.
    pub async fn park(&self, letter: DeadLetter) -> Option<String> {
        metrics::counter!(m::DEAD_LETTERS, "route" => letter.route.clone().unwrap_or_default()).increment(1);
        loop {
            match self.stores.dead_letters.write(&letter).await {
                Ok(id) => return Some(id),
                Err(Failure::Permanent(e) | Failure::Fenced(e)) => {
                    // Cannot happen for well-formed letters; the log line then carries the whole letter.
                    tracing::error!(error = %e, letter = %serde_json::to_string(&letter).unwrap_or_default(), "Dead letter could not be stored.");
                    return None;
                }
                Err(Failure::Transient(e) | Failure::Dropped(e)) => {
                    tracing::warn!(error = %e, event_id = ?letter.event_id, "Dead-letter store unavailable; holding the event and retrying.");
                    tokio::time::sleep(DEAD_LETTER_RETRY).await;
                }
            }
        }
    }
}

/// A route paused by its runaway guard, for one record of an event: its actions are dead-lettered, not run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paused {
    pub route: String,
    pub record_id: Option<String>,
    pub reason: String,
}

/// What one attempt did.
enum Ran {
    /// The sink was called and succeeded (and the done marker is written, when keyed).
    Called,
    /// The idempotency key was marked done by an earlier delivery: not called.
    AlreadyDone,
}

#[derive(Debug, PartialEq, Eq)]
enum Claimed {
    /// Ours to run (or the action has no key).
    Held,
    AlreadyDone,
}

/// The idempotency guard of one keyed action across its attempts: claim the key before the call, renew the claim
/// while the call runs, mark done after it, release after a failure. An action without a key passes every step.
struct Guard<'a> {
    idem: &'a Idempotency,
    sink: &'a str,
    key: Option<&'a str>,
    fence: Option<&'a Fence>,
    /// One token per keyed action: a claim whose reply was lost is recognised as ours on the next attempt.
    own_token: Option<String>,
    /// The token of the claim we hold now.
    held: Option<String>,
}

impl<'a> Guard<'a> {
    fn new(idem: &'a Idempotency, action: &'a Action, fence: Option<&'a Fence>) -> Self {
        let key = action.idempotency_key();
        Guard {
            idem,
            sink: &action.sink,
            key,
            fence,
            own_token: key.map(|_| crate::state::new_token()),
            held: None,
        }
    }

    async fn claim(&mut self) -> Result<Claimed, Failure> {
        let Some(key) = self.key else {
            return Ok(Claimed::Held);
        };
        let claim = self.idem.claim(self.sink, key, self.own_token.as_deref(), self.fence);
        match claim.await.map_err(|e| e.context("idempotency claim"))? {
            Claim::Done => Ok(Claimed::AlreadyDone),
            // Another holder (a crashed process whose lease has not expired, or a concurrent delivery of the same
            // key): wait for it like for a transient error.
            Claim::Busy => Err(Failure::Transient(format!(
                "idempotency key `{key}` is leased by another holder"
            ))),
            Claim::Acquired(token) => {
                self.held = Some(token);
                Ok(Claimed::Held)
            }
        }
    }

    /// Runs `call`, renewing the claim at a third of its lifetime meanwhile.
    async fn renewing<T>(&self, call: impl Future<Output = T>) -> T {
        let (Some(key), Some(token)) = (self.key, &self.held) else {
            return call.await;
        };
        let renew_every = self.idem.ttls().lease / 3;
        tokio::pin!(call);
        loop {
            tokio::select! {
                r = &mut call => return r,
                _ = tokio::time::sleep(renew_every) => { let _ = self.idem.renew(self.sink, key, token).await; }
            }
        }
    }

    async fn complete(&self) -> Result<(), Failure> {
        match self.key {
            Some(key) => self
                .idem
                .complete(self.sink, key, self.fence)
                .await
                .map_err(|e| e.context("done marker")),
            None => Ok(()),
        }
    }

    /// Gives a held claim up after a failure, so the next delivery (or a dead-letter retry) can run the action.
    async fn release(&self) {
        if let (Some(key), Some(token)) = (self.key, &self.held) {
            // Best effort: if Redis is down the lease simply expires.
            let _ = self.idem.release(self.sink, key, token).await;
        }
    }
}

/// The retry schedule of one action: exponential backoff with jitter within the time budget, and a few quick
/// retries in a row after a dropped connection.
struct Retry {
    started: Instant,
    budget: Duration,
    backoff: Duration,
    max_backoff: Duration,
    attempts: u32,
    quick_retries: u32,
}

impl Retry {
    fn new(config: &RetryConfig) -> Self {
        Retry {
            started: Instant::now(),
            budget: Duration::from_millis(config.budget_ms),
            backoff: Duration::from_millis(config.initial_backoff_ms.max(1)),
            max_backoff: Duration::from_millis(config.max_backoff_ms.max(1)),
            attempts: 1,
            quick_retries: 0,
        }
    }

    /// The pause before the next attempt after `err`, or `None` when `err` ends the action (permanent, or the
    /// budget would run out).
    fn pause_after(&mut self, err: &Failure) -> Option<Duration> {
        if !(err.is_transient() && self.started.elapsed() + self.backoff < self.budget) {
            return None;
        }
        // A dropped connection is being replaced as we speak: retry on the new one at once (a few times in a row
        // at most), rather than after a pause in which it may drop again.
        if matches!(err, Failure::Dropped(_)) && self.quick_retries < QUICK_RETRIES {
            self.quick_retries += 1;
            return Some(jitter(QUICK_RETRY));
        }
        self.quick_retries = 0;
        let pause = self.backoff;
        self.backoff = (self.backoff * 2).min(self.max_backoff);
        Some(jitter(pause))
    }
}
