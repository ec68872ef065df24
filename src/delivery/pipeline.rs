//! The pipeline wires the boxes: source -> router (`when`) -> enricher -> router (`guard`) -> dispatcher,
//! and owns ordering and settlement (DESIGN.md §5).
//!
//! - Up to `delivery.concurrency` events are in flight; events that touch the same record id run one after
//!   the other in delivery order, others concurrently.
//! - An event is settled when every action succeeded, was skipped as done, or was dead-lettered. The
//!   source position is committed in delivery order, only past settled events: a crash redelivers
//!   whatever was in flight (at-least-once), and idempotency keys keep that from doing anything twice.
//! - When `concurrency` events wait (Redis down), the source is not read: backpressure, not buffering.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::FutureExt;
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use super::counters::{self, RouteCounters};
use crate::config::{Config, OnUnmatched, SALESFORCE_UPDATE_SINK};
use crate::delivery::{ActionResult, Dispatcher, Paused};
use crate::enrich::Enricher;
use crate::event::Event;
use crate::obs::metrics as m;
use crate::plan::{Action, Op, Outcome, Plan};
use crate::router::{self, Needs};
use crate::rules::RuleSet;
use crate::sinks::Sinks;
use crate::sources::Delivery;
use crate::sources::{Source, Sourced};
use crate::state::Fence;
use crate::state::{Admit, CheckpointStore, DeadLetter, MemoryBackend, Stores};

/// How often a moved position is written to the checkpoint store (and at the end of every run).
const COMMIT_EVERY: Duration = Duration::from_millis(200);

/// Counts for the summary printed when a finite source ends.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    pub events: u64,
    pub malformed: u64,
    pub unmatched: u64,
    pub actions_done: BTreeMap<String, u64>,
    pub skipped: u64,
    pub shadow: u64,
    pub dead_letters: u64,
    pub routes_fired: BTreeMap<String, u64>,
    /// Events settled (their positions may be committed).
    pub settled: u64,
    /// Deliveries given up because this replica lost the channel lease they came under (another one redelivers).
    pub abandoned: u64,
    /// Deliveries left unsettled because the service stopped while one of their actions waited to retry (counted when
    /// they end; they and the deliveries after them are not settled in this run).
    pub interrupted: u64,
}

impl Stats {
    /// Counts how the actions of `plan` ended; an abandoned or interrupted one leaves the event unsettled.
    fn count(&mut self, plan: &Plan, results: &[ActionResult]) {
        for (action, result) in plan.actions.iter().zip(results) {
            match result {
                ActionResult::Done { .. } => *self.actions_done.entry(action.sink.clone()).or_default() += 1,
                ActionResult::Skipped => self.skipped += 1,
                ActionResult::Shadow => self.shadow += 1,
                ActionResult::DeadLettered { .. } => self.dead_letters += 1,
                ActionResult::Abandoned => self.abandoned = 1,
                ActionResult::Interrupted => self.interrupted = 1,
            }
        }
        if self.abandoned > 0 || self.interrupted > 0 {
            self.settled = 0;
        }
        for d in plan.decisions.iter().filter(|d| d.outcome == Outcome::Then) {
            *self.routes_fired.entry(d.route.clone()).or_default() += 1;
        }
    }

    fn merge(&mut self, other: Stats) {
        self.events += other.events;
        self.malformed += other.malformed;
        self.unmatched += other.unmatched;
        self.skipped += other.skipped;
        self.shadow += other.shadow;
        self.dead_letters += other.dead_letters;
        self.settled += other.settled;
        self.abandoned += other.abandoned;
        for (k, v) in other.actions_done {
            *self.actions_done.entry(k).or_default() += v;
        }
        for (k, v) in other.routes_fired {
            *self.routes_fired.entry(k).or_default() += v;
        }
    }
}

pub struct Pipeline {
    pub rules: Arc<ArcSwap<RuleSet>>,
    pub enricher: Enricher,
    pub dispatcher: Dispatcher,
    pub stores: Arc<Stores>,
    pub on_unmatched: OnUnmatched,
    pub print_decisions: bool,
    pub concurrency: usize,
    pub shutdown_timeout: Duration,
    pub redact: Vec<String>,
    /// The runaway guard of routes without their own `limit`.
    pub route_limit: Option<crate::plan::Limit>,
    /// Per-route counters for `/rules`.
    pub counters: Arc<RouteCounters>,
    /// Whether the config has a Salesforce org to write back to. Without one (a JSONL replay, a test), the
    /// `salesforce-update` actions of `on_failure` are not sent: each is logged instead (the failed action itself
    /// is dead-lettered as always).
    pub write_back: bool,
    /// Events and malformed inputs settled so far, for whoever waits on progress.
    pub settled: watch::Sender<u64>,
}

/// Per checkpoint key: the position past the last settled delivery, and the lease it was settled under.
type Positions = HashMap<Arc<str>, (Vec<u8>, Option<Arc<Fence>>)>;

/// Finished deliveries, settled in delivery order, and where each checkpoint key stands.
struct Ledger {
    /// Finished deliveries waiting for the ones before them.
    waiting: BTreeMap<u64, Settled>,
    /// The sequence number of the next delivery to settle.
    next: u64,
    stats: Stats,
    /// Per checkpoint key (a JSONL file, a Pub/Sub channel in one mode): the last settled and the last stored.
    last_end: Positions,
    committed: HashMap<Arc<str>, Vec<u8>>,
}

impl Default for Ledger {
    fn default() -> Self {
        Ledger {
            waiting: BTreeMap::new(),
            next: 1,
            stats: Stats::default(),
            last_end: HashMap::new(),
            committed: HashMap::new(),
        }
    }
}

impl Ledger {
    /// Takes one finished delivery and settles, in delivery order, every delivery now next in line: prints its
    /// output, counts it, and moves its position past it. Returns the events settled. An interrupted delivery
    /// (the service is stopping) never settles: the position stays before it, and nothing after it settles in this
    /// run.
    fn finished(&mut self, done: Settled) -> u64 {
        // Counted now: an interrupted delivery never leaves `waiting`.
        self.stats.interrupted += done.stats.interrupted;
        self.waiting.insert(done.seq, done);
        let mut delivered = 0;
        while self.waiting.get(&self.next).is_some_and(|d| d.stats.interrupted == 0)
            && let Some(done) = self.waiting.remove(&self.next)
        {
            if !done.output.is_empty() {
                crate::out!("{}", done.output);
            }
            // Events and malformed input count; position marks do not.
            delivered += done.stats.settled;
            let abandoned = done.stats.abandoned > 0;
            self.stats.merge(done.stats);
            if let Some(key) = done.key {
                match done.fence {
                    // Under a lease we lost, nothing moves the position any more: the new holder redelivers from
                    // the stored one.
                    Some(f) if abandoned || f.is_lost() => {
                        f.mark_lost();
                        self.last_end.remove(&key);
                    }
                    fence => {
                        self.last_end.insert(key, (done.end, fence));
                    }
                }
            }
            self.next += 1;
        }
        delivered
    }
}

/// One settled delivery, reported by its task.
struct Settled {
    seq: u64,
    key: Option<Arc<str>>,
    fence: Option<Arc<Fence>>,
    end: Vec<u8>,
    output: String,
    stats: Stats,
}

impl Pipeline {
    pub fn new(
        config: &Config,
        rules: Arc<ArcSwap<RuleSet>>,
        stores: Arc<Stores>,
        sinks: Arc<Sinks>,
        enricher: Enricher,
    ) -> Self {
        Pipeline {
            rules,
            enricher,
            dispatcher: Dispatcher::new(
                stores.clone(),
                sinks,
                config.delivery.retry.clone(),
                config.redact.clone(),
            ),
            stores,
            on_unmatched: config.on_unmatched,
            print_decisions: config.print_decisions,
            concurrency: config.delivery.concurrency.max(1),
            shutdown_timeout: Duration::from_millis(config.delivery.shutdown_timeout_ms),
            redact: config.redact.clone(),
            route_limit: config.route_limit,
            counters: Arc::default(),
            write_back: false,
            settled: watch::Sender::new(0),
        }
    }

    /// Runs until the source ends or `shutdown` turns true; then lets in-flight events settle (within the
    /// shutdown timeout) and commits the last settled position.
    pub async fn run(self: &Arc<Self>, mut source: Source, mut shutdown: watch::Receiver<bool>) -> Stats {
        let (delivery_tx, mut deliveries) = mpsc::channel::<Sourced>(self.concurrency);
        // Ends when the source ends, or when the pipeline drops `deliveries` (shutdown); aborted at the end.
        let reader = tokio::spawn(async move {
            while let Some(delivery) = source.next().await {
                if delivery_tx.send(delivery).await.is_err() {
                    break;
                }
            }
        });
        let (settled_tx, mut settled_rx) = mpsc::unbounded_channel::<Settled>();
        let mut tails: HashMap<String, watch::Receiver<bool>> = HashMap::new();
        let mut ledger = Ledger::default();
        let (mut seq, mut in_flight) = (0u64, 0usize);
        let (mut source_done, mut stopping, mut shutdown_gone) = (false, *shutdown.borrow(), false);
        let mut deadline = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
        if stopping {
            deadline = self.begin_stop();
        }
        let mut tick = tokio::time::interval(COMMIT_EVERY);
        while !((source_done || stopping) && in_flight == 0) {
            tokio::select! {
                biased;
                Some(done) = settled_rx.recv() => {
                    in_flight -= 1;
                    metrics::gauge!(m::EVENTS_IN_FLIGHT).set(in_flight as f64);
                    let delivered = ledger.finished(done);
                    self.settled.send_modify(|n| *n += delivered);
                    if stopping {
                        crate::obs::stage::set(format!("settling {in_flight} event(s) in flight"));
                    }
                }
                changed = shutdown.changed(), if !stopping && !shutdown_gone => match changed {
                    Ok(()) if *shutdown.borrow() => {
                        stopping = true;
                        deadline = self.begin_stop();
                        crate::obs::stage::set(format!("settling {in_flight} event(s) in flight"));
                        tracing::info!(in_flight, "Stopped reading the source; settling the events in flight.");
                    }
                    Ok(()) => {}
                    Err(_) => shutdown_gone = true,
                },
                _ = tokio::time::sleep_until(deadline), if stopping => {
                    tracing::warn!(in_flight, "Shutdown timeout: exiting with events in flight; they are redelivered on restart.");
                    break;
                }
                delivery = deliveries.recv(), if !stopping && !source_done && in_flight < self.concurrency => {
                    let Some(delivery) = delivery else {
                        source_done = true;
                        continue;
                    };
                    seq += 1;
                    in_flight += 1;
                    metrics::gauge!(m::EVENTS_IN_FLIGHT).set(in_flight as f64);
                    self.spawn(seq, delivery, &mut tails, settled_tx.clone());
                }
                _ = tick.tick() => {
                    self.commit(&mut ledger).await;
                }
            }
        }
        drop(deliveries);
        reader.abort();
        self.commit_last(&mut ledger).await;
        ledger.stats
    }

    /// The service is stopping: retries waiting from now on give up. Returns when the stop must be over.
    fn begin_stop(&self) -> tokio::time::Instant {
        self.dispatcher.stop();
        tokio::time::Instant::now() + self.shutdown_timeout
    }

    /// The last position must be stored before we exit: retries a failing store (a dropped connection) for up to
    /// the shutdown timeout.
    async fn commit_last(&self, ledger: &mut Ledger) {
        crate::obs::stage::set("storing the last settled position");
        let give_up = tokio::time::Instant::now() + self.shutdown_timeout;
        let mut pause = Duration::from_millis(50);
        while !self.commit(ledger).await {
            if tokio::time::Instant::now() + pause > give_up {
                tracing::error!("The last settled position could not be stored; those events will be redelivered.");
                break;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }

    /// Stores every settled position that moved; false when the store failed for one of them. A position whose
    /// channel lease was lost is not stored (and forgotten): fenced writes refuse it anyway.
    async fn commit(&self, ledger: &mut Ledger) -> bool {
        let mut ok = true;
        let mut refused = Vec::new();
        for (key, (end, fence)) in ledger.last_end.iter() {
            if ledger.committed.get(key) == Some(end) {
                continue;
            }
            if fence.as_ref().is_some_and(|f| f.is_lost()) {
                refused.push(key.clone());
                continue;
            }
            match self.checkpoints().set_fenced(key, end, fence.as_deref()).await {
                Ok(true) => {
                    metrics::counter!(m::CHECKPOINT_COMMITS).increment(1);
                    ledger.committed.insert(key.clone(), end.clone());
                }
                Ok(false) => {
                    metrics::counter!(m::CHECKPOINT_FENCED).increment(1);
                    if let Some(f) = fence {
                        f.mark_lost();
                    }
                    tracing::warn!(%key, "Position not stored: another replica holds this channel's lease now.");
                    refused.push(key.clone());
                }
                Err(e) => {
                    // Retried on the next tick; the position only ever lags, never leads.
                    metrics::counter!(m::CHECKPOINT_ERRORS).increment(1);
                    tracing::warn!(%key, error = %e, "Position not committed; retrying.");
                    ok = false;
                }
            }
        }
        for key in refused {
            ledger.last_end.remove(&key);
        }
        ok
    }

    pub fn checkpoints(&self) -> &CheckpointStore {
        &self.stores.checkpoints
    }

    /// Starts one delivery's task after the earlier deliveries touching the same records.
    fn spawn(
        self: &Arc<Self>,
        seq: u64,
        sourced: Sourced,
        tails: &mut HashMap<String, watch::Receiver<bool>>,
        settled: mpsc::UnboundedSender<Settled>,
    ) {
        let Sourced { key, fence, delivery } = sourced;
        let end = delivery.end().to_vec();
        // One rules version from the first route to the last; phase one is pure, so it runs here and
        // tells which records the event touches.
        let rules = self.rules.load_full();
        let needs = match &delivery {
            Delivery::Event { event, .. } => Some(router::needs(&rules, event)),
            Delivery::Malformed { .. } | Delivery::Mark { .. } => None,
        };
        let keys = needs.as_ref().map(Needs::record_ids).unwrap_or_default();
        let (done_tx, deps) = self.after(keys, tails);
        let this = self.clone();
        tokio::spawn(async move {
            for mut dep in deps {
                // An error means the earlier task is gone, which it only is once it has finished.
                let _ = dep.wait_for(|done| *done).await;
            }
            let (output, stats) = this.deliver(seq, delivery, needs, &rules, fence.as_deref()).await;
            let _ = done_tx.send(true);
            let _ = settled.send(Settled {
                seq,
                key,
                fence,
                end,
                output,
                stats,
            });
        });
    }

    /// Orders a delivery touching `keys` after the unfinished deliveries that touch any of them: returns the sender
    /// that marks it finished and what it waits for.
    fn after(
        &self,
        keys: Vec<String>,
        tails: &mut HashMap<String, watch::Receiver<bool>>,
    ) -> (watch::Sender<bool>, Vec<watch::Receiver<bool>>) {
        let deps: Vec<watch::Receiver<bool>> = keys
            .iter()
            .filter_map(|k| tails.get(k))
            .filter(|rx| !*rx.borrow())
            .cloned()
            .collect();
        let (done_tx, done_rx) = watch::channel(false);
        for k in keys {
            tails.insert(k, done_rx.clone());
        }
        if tails.len() > 4 * self.concurrency {
            tails.retain(|_, rx| !*rx.borrow());
        }
        (done_tx, deps)
    }

    /// Handles one delivery in its span; a panic while handling it (a bug, never bad input) dead-letters the event.
    async fn deliver(
        &self,
        seq: u64,
        delivery: Delivery,
        needs: Option<Needs>,
        rules: &RuleSet,
        fence: Option<&Fence>,
    ) -> (String, Stats) {
        // Kept for the dead letter should handling panic.
        let copy = match &delivery {
            Delivery::Event { event, .. } => Some((**event).clone()),
            Delivery::Malformed { .. } | Delivery::Mark { .. } => None,
        };
        // Every line logged while the event is handled carries its id, channel and rules version.
        // ERROR level, so that a `RUST_LOG=warn` filter keeps these fields on the warnings inside.
        let span = tracing::error_span!(
            "event",
            event_id = copy.as_ref().map(|e| e.id.as_str()),
            channel = copy.as_ref().map(|e| e.channel.as_str()),
            rules_version = %rules.version,
        );
        // Events and malformed input settle; position marks are not deliveries of anything.
        let settles = match &delivery {
            Delivery::Event { event, .. } => Some(event.channel.clone()),
            Delivery::Malformed { .. } => Some(String::new()),
            Delivery::Mark { .. } => None,
        };
        let work = AssertUnwindSafe(self.handle(delivery, needs, rules, fence).instrument(span))
            .catch_unwind()
            .await;
        // Abandoned and interrupted deliveries do not settle here.
        let unsettled = matches!(&work, Ok((_, stats)) if stats.settled == 0);
        if let Some(channel) = settles
            && !unsettled
        {
            metrics::counter!(m::EVENTS_SETTLED, "channel" => channel).increment(1);
        }
        match work {
            Ok(done) => done,
            Err(_) => {
                tracing::error!(seq, "Internal error while handling an event; it is dead-lettered.");
                let reason = "internal error while handling the event (a switchyard bug; please report it)";
                let event = copy.map(|mut e| {
                    e.redact(&self.redact);
                    e
                });
                self.dispatcher
                    .park(DeadLetter::of_event(&rules.version, event, reason.into()))
                    .await;
                let stats = Stats {
                    settled: 1,
                    dead_letters: 1,
                    ..Stats::default()
                };
                (String::new(), stats)
            }
        }
    }

    /// Handles one delivery to the end; returns what to print (in order) and its counts.
    async fn handle(
        &self,
        delivery: Delivery,
        needs: Option<Needs>,
        rules: &RuleSet,
        fence: Option<&Fence>,
    ) -> (String, Stats) {
        let mut stats = Stats {
            settled: 1,
            ..Stats::default()
        };
        let mut out = String::new();
        if fence.is_some_and(Fence::is_lost) {
            // Another replica holds the channel now and redelivers this one.
            stats.settled = 0;
            stats.abandoned = 1;
            return (out, stats);
        }
        match (delivery, needs) {
            (Delivery::Mark { .. }, _) => stats.settled = 0,
            (
                Delivery::Malformed {
                    position,
                    raw,
                    error,
                    event_id,
                    channel,
                    ..
                },
                _,
            ) => {
                stats.malformed += 1;
                metrics::counter!(m::EVENTS_MALFORMED).increment(1);
                tracing::error!(position = %position, error = %error, "Malformed input line dead-lettered.");
                if self.print_decisions {
                    let _ = writeln!(out, "{position}: malformed event: {error} (dead-lettered)");
                }
                let letter = DeadLetter::of_input(&rules.version, raw, format!("{position}: {error}"));
                let id = self.dispatcher.park(letter).await;
                stats.dead_letters += 1;
                if let Some(journal) = &self.stores.journal {
                    journal.record(super::journal::rejected(
                        rules,
                        &position,
                        event_id.as_deref(),
                        channel.as_deref(),
                        &error,
                        id.as_deref(),
                    ));
                }
            }
            (Delivery::Event { event, position, .. }, Some(needs)) => {
                self.handle_event(*event, &position, needs, rules, fence, &mut stats, &mut out)
                    .await;
            }
            (Delivery::Event { .. }, None) => unreachable!("phase one runs for every event"),
        }
        (out, stats)
    }

    /// Decides one event (enriching what its routes need) and runs the plan.
    #[allow(clippy::too_many_arguments)]
    async fn handle_event(
        &self,
        mut event: Event,
        position: &str,
        needs: Needs,
        rules: &RuleSet,
        fence: Option<&Fence>,
        stats: &mut Stats,
        out: &mut String,
    ) {
        stats.events += 1;
        metrics::counter!(m::EVENTS, "channel" => event.channel.clone()).increment(1);
        counters::record_evaluated(rules, &event);
        if !needs.matched() {
            self.unmatched(rules, event, position, stats, out).await;
            return;
        }
        let plan = self.finish(rules, &mut event, needs).await;
        counters::record_decisions(&plan);
        for d in &plan.decisions {
            self.counters.record(&d.route, d.outcome == Outcome::Then);
            if matches!(d.outcome, Outcome::Failed(_)) {
                tracing::warn!(route = %d.route, event_id = %event.id, record_id = ?d.record_id, rules_version = %rules.version, outcome = ?d.outcome, "Route failed; the event is dead-lettered for it.");
            }
        }
        let paused = self.runaway_guard(rules, &event, &plan).await;
        let mut plan = plan;
        let mut results = self.dispatcher.run_guarded(&plan, &event, fence, &paused).await;
        self.on_failure(rules, &event, fence, &paused, &mut plan, &mut results)
            .await;
        stats.count(&plan, &results);
        if self.print_decisions {
            out.push_str(&render_plan(&event, position, &plan, &results));
        }
        if let Some(journal) = &self.stores.journal {
            let settled = !results
                .iter()
                .any(|r| matches!(r, ActionResult::Abandoned | ActionResult::Interrupted));
            // An unsettled event is redelivered, and journaled then.
            if settled {
                let plan = Some((&plan, results.as_slice(), paused.as_slice()));
                journal.record(super::journal::entry(rules, event, position, plan, &journal.mask));
            }
        }
    }

    /// Runs the `on_failure` actions of every route (per record) one of whose actions its sink could not do: called
    /// and dead-lettered (a permanent error, retries exhausted) or its sink gone. Once per route and record, after
    /// the plan's own actions; they and their results join the plan, so the journal, counters and printed
    /// decisions show them. Not for `dead-letter` actions, route failures or paused routes: those did not try.
    async fn on_failure(
        &self,
        rules: &RuleSet,
        event: &Event,
        fence: Option<&Fence>,
        paused: &[Paused],
        plan: &mut Plan,
        results: &mut Vec<ActionResult>,
    ) {
        let mut failed: Vec<(&str, Option<&str>, router::FailureInfo)> = Vec::new();
        for (action, result) in plan.actions.iter().zip(results.iter()) {
            let ActionResult::DeadLettered { reason, letter } = result else {
                continue;
            };
            let route_paused = paused
                .iter()
                .any(|p| p.route == action.route && p.record_id == action.record_id);
            let tried = !matches!(action.op, Op::DeadLetter { .. }) && !action.on_failure && !route_paused;
            let (route, record_id) = (action.route.as_str(), action.record_id.as_deref());
            if tried && !failed.iter().any(|(r, id, _)| *r == route && *id == record_id) {
                failed.push((
                    route,
                    record_id,
                    router::FailureInfo {
                        reason: reason.clone(),
                        sink: action.sink.clone(),
                        action: action.what(),
                        letter: letter.clone(),
                    },
                ));
            }
        }
        let mut actions: Vec<Action> = failed
            .iter()
            .flat_map(|(route, record_id, failure)| router::on_failure(rules, event, route, *record_id, failure))
            .collect();
        if !self.write_back {
            actions.retain(|a| {
                let write_back = a.sink == SALESFORCE_UPDATE_SINK;
                if write_back {
                    tracing::warn!(route = %a.route, record_id = a.record_id.as_deref(), event_id = %event.id, action = %a.what(), "Write-back not sent: the config has no `salesforce` section (the failed action is dead-lettered).");
                }
                !write_back
            });
        }
        if actions.is_empty() {
            return;
        }
        for (route, record_id, failure) in &failed {
            tracing::warn!(route, record_id, event_id = %event.id, sink = %failure.sink, "An action of the route was dead-lettered; running its on_failure actions.");
        }
        let extra = Plan {
            event_id: plan.event_id.clone(),
            rules_version: plan.rules_version.clone(),
            decisions: Vec::new(),
            actions,
        };
        let extra_results = self.dispatcher.run(&extra, event, fence).await;
        plan.actions.extend(extra.actions);
        results.extend(extra_results);
    }

    /// Counts the fires of guarded routes (their own `limit`, else the config's `route_limit`) and returns the
    /// paused ones, whose actions are dead-lettered instead of run. Shadow routes call no sink and are not counted.
    /// When the guard's store does not answer, the actions run (the sinks' own failures still retry or
    /// dead-letter); it is logged, never silent.
    async fn runaway_guard(&self, rules: &RuleSet, event: &Event, plan: &Plan) -> Vec<Paused> {
        let mut paused = Vec::new();
        for d in plan
            .decisions
            .iter()
            .filter(|d| d.outcome == Outcome::Then && !d.shadow)
        {
            let Some(limit) = rules
                .routes
                .iter()
                .find(|r| r.name == d.route)
                .and_then(|r| r.limit.or(self.route_limit))
            else {
                continue;
            };
            let member = format!("{}|{}", event.id, d.record_id.as_deref().unwrap_or(""));
            match self
                .stores
                .pauses
                .admit(&d.route, &member, &limit, crate::clock::now_ms())
                .await
            {
                Ok(Admit::Run) => {}
                Ok(Admit::Paused { reason, newly }) => {
                    metrics::gauge!(m::ROUTE_PAUSED, "route" => d.route.clone()).set(1.0);
                    if newly {
                        tracing::error!(route = %d.route, event_id = %event.id, %reason, "Route paused by its runaway guard: its actions are dead-lettered from now on, on every replica, until `switchyard route resume` (or a reload that changes its `when`).");
                    }
                    paused.push(Paused {
                        route: d.route.clone(),
                        record_id: d.record_id.clone(),
                        reason,
                    });
                }
                Err(e) => {
                    tracing::warn!(route = %d.route, event_id = %event.id, error = %e, "Runaway guard unavailable; the route's actions run unguarded.");
                }
            }
        }
        paused
    }

    /// Reads the records routes asked for, keeps them with the event, and runs phase two.
    async fn finish(&self, rules: &RuleSet, event: &mut Event, needs: Needs) -> Plan {
        let requests = needs.requests(rules);
        let records = self.enricher.read(event, &requests).await;
        for (id, result) in &records {
            // Kept with the event, so dead letters, `explain` and `record` show what the routes saw.
            if let Ok(fields) = result {
                event.record.insert(id.clone(), fields.clone());
            }
        }
        router::plan(rules, event, needs, &records)
    }

    /// Both router phases with the enrichment between them (for callers outside the stream).
    pub async fn plan_enriched(&self, rules: &RuleSet, event: &mut Event) -> Plan {
        let needs = router::needs(rules, event);
        self.finish(rules, event, needs).await
    }

    async fn unmatched(&self, rules: &RuleSet, event: Event, position: &str, stats: &mut Stats, out: &mut String) {
        stats.unmatched += 1;
        metrics::counter!(m::EVENTS_UNMATCHED, "channel" => event.channel.clone()).increment(1);
        if self.print_decisions {
            let _ = writeln!(out, "{} ({position}): no route matched", event.id);
        }
        match self.on_unmatched {
            OnUnmatched::Ignore => {}
            OnUnmatched::Log => {
                tracing::info!(event_id = %event.id, channel = %event.channel, rules_version = %rules.version, "No route matched the event.")
            }
            OnUnmatched::DeadLetter => {
                let mut event = event.clone();
                event.redact(&self.redact);
                let reason = "no route matched the event (on_unmatched: dead-letter)";
                let letter = DeadLetter::of_event(&rules.version, Some(event), reason.into());
                self.dispatcher.park(letter).await;
                stats.dead_letters += 1;
            }
        }
        if let Some(journal) = &self.stores.journal {
            journal.record(super::journal::entry(rules, event, position, None, &journal.mask));
        }
    }
}

fn render_plan(event: &Event, position: &str, plan: &Plan, results: &[ActionResult]) -> String {
    let mut out = String::new();
    let change = event
        .change_type()
        .map(|c| format!(" {}", c.as_str()))
        .unwrap_or_default();
    let _ = writeln!(out, "{} ({position}) {}{change}", event.id, event.channel);
    for d in &plan.decisions {
        let outcome = match &d.outcome {
            Outcome::Then => "then".to_string(),
            Outcome::Else => "else (guard failed)".to_string(),
            Outcome::Failed(e) => format!("FAILED: {e}"),
        };
        let record = d.record_id.as_deref().map(|r| format!(" [{r}]")).unwrap_or_default();
        let shadow = if d.shadow { " (shadow)" } else { "" };
        let _ = writeln!(out, "  {}{record}{shadow}: {outcome}", d.route);
        for (action, result) in plan.actions.iter().zip(results) {
            if action.route != d.route || action.record_id != d.record_id {
                continue;
            }
            let status = match result {
                ActionResult::Done { .. } => "ok".to_string(),
                ActionResult::Skipped => "skipped: already done".to_string(),
                ActionResult::Shadow => "not sent".to_string(),
                ActionResult::DeadLettered { .. } if matches!(action.op, Op::DeadLetter { .. }) => {
                    "dead-lettered".to_string()
                }
                ActionResult::DeadLettered { reason, .. } => format!("dead-lettered: {reason}"),
                ActionResult::Abandoned => "abandoned: the channel lease moved to another replica".to_string(),
                ActionResult::Interrupted => "interrupted: stopping; redelivered after the restart".to_string(),
            };
            let _ = writeln!(out, "    -> {}  [{status}]", action.summary());
        }
    }
    out
}

impl Stats {
    /// The summary printed when a finite source ends.
    pub fn print_summary(&self, memory: Option<&MemoryBackend>) {
        crate::outln!();
        crate::outln!(
            "Summary: {} events ({} malformed), {} matched no route, {} dead letters, {} skipped as already done, {} shadow actions",
            self.events + self.malformed,
            self.malformed,
            self.unmatched,
            self.dead_letters,
            self.skipped,
            self.shadow
        );
        for (route, n) in &self.routes_fired {
            crate::outln!("  route {route}: fired {n} time(s)");
        }
        for (sink, n) in &self.actions_done {
            crate::outln!("  sink {sink}: {n} action(s) done");
        }
        if let Some(memory) = memory {
            // Sorted by id: events on different records are enqueued concurrently, in no fixed order.
            let mut jobs = memory.jobs();
            jobs.sort_by(|a, b| (&a.queue, &a.id).cmp(&(&b.queue, &b.id)));
            crate::outln!("In-memory queue: {} job(s)", jobs.len());
            for job in jobs {
                crate::outln!("  {}/{} {} {}", job.queue, job.name, job.id, job.data);
            }
            crate::outln!(
                "In-memory cache: {} key(s) invalidated",
                memory.invalidated_keys().len()
            );
        }
    }
}
