//! Salesforce Pub/Sub API, part 3: the subscriber. One task per live channel keeps a Subscribe stream going for
//! months: demand topped up before it runs out (never more than 100 outstanding), keepalive positions passed on,
//! a watchdog for silent streams, reconnects with backoff and jitter, and recovery decided by the `error-code`
//! trailer (reference/salesforce-pubsub.md §3).
//!
//! Positions: each channel resumes, within the process, after the last event it handed to the pipeline (those
//! are in flight and will settle); after a restart, from the checkpoint store, which the pipeline writes only past
//! settled events. Backpressure is the bounded channel to the pipeline: while it is full the task waits, requests
//! nothing more, and Salesforce may close the idle stream after 60 s, which is a normal resubscribe once the
//! pipeline takes events again.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use super::avro::{RawEvent, SchemaRegistry};
use super::proto::pub_sub_client::PubSubClient;
use super::proto::{
    CommitReplayRequest, FetchRequest, FetchResponse, ManagedFetchRequest, ReplayPreset as WirePreset, SchemaRequest,
};
use super::{error_codes, headers};
use crate::auth::{Auth, AuthError, Credentials};
use crate::clock::jitter;
use crate::config::{Mode, PubsubConfig, ReplayPreset, ReplayStart};
use crate::obs::metrics as m;
use crate::sources::{Delivery, Sourced};
use crate::state::CheckpointStore;
use crate::state::{Fence, Leases};

/// How often a managed channel looks for a newly settled position to commit.
const COMMIT_POLL: Duration = Duration::from_millis(200);
/// How long a commit may wait for its response before it is sent again.
const COMMIT_RESEND: Duration = Duration::from_secs(10);
/// How long a stopping managed channel waits for its last settled position, to commit it.
const FINAL_COMMIT_LIMIT: Duration = Duration::from_secs(5);
/// The most handed-on positions a managed channel remembers while their commit is not acknowledged.
const UNCOMMITTED_LIMIT: usize = 10_000;

/// How long a channel stopped by a reload waits for its events in flight to settle before it releases its lease.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// Error codes after which retrying cannot help: the channel stops, loudly; the rest of the service stays up.
const FATAL_CODES: &[&str] = &[
    "sfdc.platform.eventbus.grpc.topic.not.found",
    "sfdc.platform.eventbus.grpc.topic.meta.permission",
    "sfdc.platform.eventbus.grpc.topic.validation.empty",
    "sfdc.platform.eventbus.grpc.service.tenant.license",
    "sfdc.platform.eventbus.grpc.service.auth.headers.invalid",
    "sfdc.platform.eventbus.grpc.subscription.topic.cannot.subscribe",
    "sfdc.platform.eventbus.grpc.schema.meta.permission",
    "sfdc.platform.eventbus.grpc.concurrent.client.limit.exceeded",
    "sfdc.platform.eventbus.grpc.subscription.fetch.topic.mismatch",
    "sfdc.platform.eventbus.grpc.subscription.fetch.requested.events.invalid",
    error_codes::MANAGED_NAME_NOT_FOUND,
    error_codes::MANAGED_ID_NOT_FOUND,
    error_codes::MANAGED_STOPPED,
];

/// The checkpoint key of a channel in a mode: each mode keeps its own positions.
pub fn checkpoint_key(mode: Mode, channel: &str) -> String {
    format!("pubsub:{}:{channel}", mode.as_str())
}

/// Where a (re)subscription starts.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Resume {
    Preset(ReplayPreset),
    After(Vec<u8>),
}

/// What a channel is doing, for `/healthz` and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelState {
    /// Another replica holds this channel's lease; this one takes over when it lapses.
    Standby,
    Connecting,
    Streaming,
    /// Waiting before the next resubscribe, after an error.
    Backoff,
    /// Stopped for good: a fatal error code, or a static token that was refused.
    Stopped(String),
}

/// One channel's live status.
#[derive(Debug)]
pub struct ChannelStatus {
    pub channel: String,
    pub state: Mutex<ChannelState>,
    /// When the position last moved (an event or a keepalive arrived).
    last_advance: Mutex<Instant>,
}

impl ChannelStatus {
    pub fn state(&self) -> ChannelState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, state: ChannelState) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = state;
    }

    fn advanced(&self) {
        *self.last_advance.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    /// Seconds since the position last moved in this process.
    pub fn position_age(&self) -> Duration {
        self.last_advance.lock().unwrap_or_else(|e| e.into_inner()).elapsed()
    }
}

/// The Pub/Sub source: deliveries of every live channel, in order per channel.
pub struct PubsubSource {
    rx: mpsc::Receiver<Sourced>,
    /// Keeps `rx` open while every channel is stopped (the service stays up); dropped once stopping.
    keep: Option<mpsc::Sender<Sourced>>,
    /// The channel tasks, started and stopped to match the config (see [`Subscriptions::reconcile`]).
    pub subscriptions: Arc<Subscriptions>,
    /// The channels subscribed at start.
    pub channels: Vec<Arc<ChannelStatus>>,
    stop: Arc<watch::Sender<bool>>,
}

impl std::fmt::Debug for PubsubSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PubsubSource")
            .field("channels", &self.channels)
            .finish()
    }
}

/// Everything a channel task needs.
#[derive(Clone)]
pub struct Subscription {
    pub endpoint: String,
    pub mode: Mode,
    pub config: PubsubConfig,
    pub auth: Arc<Auth>,
    pub checkpoints: CheckpointStore,
    /// The channel leases, when replicas coordinate (see [`crate::state::lease`]).
    pub leases: Option<Arc<Leases>>,
}

/// One running channel task.
struct Running {
    key: Arc<str>,
    /// A managed subscription: on stop it commits the last settled position to Salesforce before it ends.
    managed: bool,
    status: Arc<ChannelStatus>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// The live channel tasks of a source. A config reload calls [`Subscriptions::reconcile`]: tasks of channels no
/// longer live stop (their in-flight events settle and their positions are stored as usual), new ones start from
/// their stored position; each mode keeps its own positions, so switching modes and back resumes where each left.
pub struct Subscriptions {
    sub: Subscription,
    registry: Arc<Mutex<SchemaRegistry>>,
    out: mpsc::Sender<Sourced>,
    global: watch::Receiver<bool>,
    running: Mutex<Vec<Running>>,
    /// Every live channel's status, for `/healthz` (shared with the service).
    pub statuses: Arc<Mutex<Vec<Arc<ChannelStatus>>>>,
}

impl Subscriptions {
    /// Starts the tasks of `channels` in `mode` that are not running, stops those not listed. Returns the checkpoint
    /// keys started and stopped.
    pub fn reconcile(&self, mode: Mode, channels: &[String]) -> (Vec<String>, Vec<String>) {
        let wanted: Vec<Arc<str>> = channels.iter().map(|c| Arc::from(checkpoint_key(mode, c))).collect();
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let mut stopped = Vec::new();
        running.retain(|r| {
            let keep = wanted.contains(&r.key) && !r.task.is_finished();
            if !keep {
                r.stop.send_replace(true);
                if !r.task.is_finished() {
                    stopped.push(r.key.to_string());
                }
            }
            keep
        });
        let mut started = Vec::new();
        for (channel, key) in channels.iter().zip(wanted) {
            if running.iter().any(|r| r.key == key) {
                continue;
            }
            let status = Arc::new(ChannelStatus {
                channel: channel.clone(),
                state: Mutex::new(if self.sub.leases.is_some() {
                    ChannelState::Standby
                } else {
                    ChannelState::Connecting
                }),
                last_advance: Mutex::new(Instant::now()),
            });
            let (stop_tx, own) = watch::channel(false);
            let task = ChannelTask {
                sub: Subscription {
                    mode,
                    ..self.sub.clone()
                },
                channel: channel.clone(),
                key: key.clone(),
                registry: self.registry.clone(),
                out: self.out.clone(),
                status: status.clone(),
                stop: either(own, self.global.clone()),
                global: self.global.clone(),
                fence: None,
                handed: None,
                uncommitted: VecDeque::new(),
            };
            started.push(key.to_string());
            running.push(Running {
                managed: self.sub.config.subscriptions.contains_key(channel),
                key,
                status,
                stop: stop_tx,
                // Ends when its stop flips or the pipeline drops the receiver.
                task: tokio::spawn(task.run()),
            });
        }
        *self.statuses.lock().unwrap_or_else(|e| e.into_inner()) = running.iter().map(|r| r.status.clone()).collect();
        (started, stopped)
    }

    /// Aborts every channel task but the managed ones, which end by themselves once they committed the last
    /// settled position (see [`Subscriptions::finish`]).
    fn abort_all(&self) {
        for r in self.running.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            if !r.managed {
                r.task.abort();
            }
        }
    }

    /// Once the service stopped and stored its last positions: waits up to `limit` for the managed channels to
    /// commit them to Salesforce, then aborts what is left.
    pub async fn finish(&self, limit: Duration) {
        let tasks: Vec<_> = std::mem::take(&mut *self.running.lock().unwrap_or_else(|e| e.into_inner()));
        let give_up = tokio::time::Instant::now() + limit;
        for r in tasks {
            r.stop.send_replace(true);
            let abort = r.task.abort_handle();
            if tokio::time::timeout_at(give_up, r.task).await.is_err() {
                tracing::warn!(channel = %r.status.channel, "The last settled position was not committed to the managed subscription in time; Salesforce redelivers from its committed position (idempotency keys prevent duplicate jobs).");
                abort.abort();
            }
        }
    }
}

/// A receiver that turns true once either `a` or `b` does (its forwarding task ends then, or with both senders).
fn either(mut a: watch::Receiver<bool>, mut b: watch::Receiver<bool>) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(*a.borrow() || *b.borrow());
    tokio::spawn(async move {
        // A sender gone without flipping (e.g. a dropped reconcile handle) leaves the other to decide.
        let (a_gone, b_gone) = tokio::select! {
            r = a.wait_for(|s| *s) => (r.is_err(), false),
            r = b.wait_for(|s| *s) => (false, r.is_err()),
            () = tx.closed() => return,
        };
        if a_gone && b.wait_for(|s| *s).await.is_err() || b_gone && a.wait_for(|s| *s).await.is_err() {
            return;
        }
        tx.send_replace(true);
    });
    rx
}

impl PubsubSource {
    /// Starts one task per channel; `buffer` bounds the deliveries waiting for the pipeline; `statuses` is kept
    /// up to date with the live channels (for `/healthz`).
    pub fn start(
        sub: Subscription,
        channels: &[String],
        buffer: usize,
        statuses: Arc<Mutex<Vec<Arc<ChannelStatus>>>>,
    ) -> PubsubSource {
        let (tx, rx) = mpsc::channel(buffer.max(1));
        let stop = Arc::new(watch::Sender::new(false));
        let mode = sub.mode;
        let subscriptions = Arc::new(Subscriptions {
            sub,
            registry: Arc::new(Mutex::new(SchemaRegistry::new())),
            out: tx.clone(),
            global: stop.subscribe(),
            running: Mutex::default(),
            statuses,
        });
        subscriptions.reconcile(mode, channels);
        if channels.is_empty() {
            tracing::info!("No Pub/Sub subscription (events disabled, or no live route); the service stays up.");
        }
        let statuses = subscriptions.statuses.lock().unwrap_or_else(|e| e.into_inner()).clone();
        PubsubSource {
            rx,
            keep: Some(tx),
            subscriptions,
            channels: statuses,
            stop,
        }
    }

    /// The next delivery; once stopped, what was already handed over, then `None`.
    pub async fn next(&mut self) -> Option<Sourced> {
        let mut stop = self.stop.subscribe();
        if *stop.borrow() {
            self.keep = None;
            return self.rx.try_recv().ok();
        }
        tokio::select! {
            delivery = self.rx.recv() => delivery,
            _ = stop.wait_for(|s| *s) => {
                self.keep = None;
                self.rx.try_recv().ok()
            }
        }
    }

    /// Flipping it to true stops every channel and ends the source.
    pub fn stopper(&self) -> Arc<watch::Sender<bool>> {
        self.stop.clone()
    }
}

impl Drop for PubsubSource {
    fn drop(&mut self) {
        self.stop.send_replace(true);
        self.subscriptions.abort_all();
    }
}

/// How one stream ended, when it did not fail.
enum End {
    /// The server closed it (e.g. the 60 s idle close): resubscribe.
    Closed,
    /// Nothing arrived within the watchdog time while events were requested.
    Silent,
    /// The service is stopping.
    Stopped,
}

/// Why one stream failed.
enum Failure {
    Status(tonic::Status),
    Connect(String),
    Auth(AuthError),
    /// The token in use was refused.
    Unauthenticated(Arc<Credentials>, tonic::Status),
}

/// A managed stream's commits: the last request id, and the commit waiting for its response (id, position, sent).
#[derive(Default)]
struct Commits {
    next: u64,
    waiting: Option<(String, Vec<u8>, Instant)>,
}

struct ChannelTask {
    sub: Subscription,
    channel: String,
    key: Arc<str>,
    registry: Arc<Mutex<SchemaRegistry>>,
    out: mpsc::Sender<Sourced>,
    status: Arc<ChannelStatus>,
    /// Turns true when the service stops or this channel is no longer live (a config reload).
    stop: watch::Receiver<bool>,
    /// Turns true when the service stops.
    global: watch::Receiver<bool>,
    /// The lease this term runs under (replicas); stamped on every delivery.
    fence: Option<Arc<Fence>>,
    /// The position just past the last delivery handed to the pipeline in this term.
    handed: Option<Vec<u8>>,
    /// Managed subscriptions: the positions handed on in this term that Salesforce has not acknowledged a commit
    /// of, in order. A position is committed only when the pipeline stored it (everything up to it settled) and it
    /// is one of these; an event redelivered after a reconnect whose replay id is here is in flight already and is
    /// not handed on twice.
    uncommitted: VecDeque<Vec<u8>>,
}

/// How a term of serving a channel ended.
#[derive(Debug, PartialEq, Eq)]
enum Served {
    /// The service is stopping, or the channel's lease was lost.
    Stopped,
    /// The channel stopped for good (a fatal error code, a refused static token).
    Failed,
}

impl ChannelTask {
    async fn run(mut self) {
        let age = self.age_reporter();
        match self.sub.leases.clone() {
            None => {
                self.serve(None).await;
            }
            Some(leases) => loop {
                let Some(fence) = self.acquire(&leases).await else {
                    break;
                };
                let keeper = leases.keep_alive(fence.clone());
                // The term ends when the service stops or the lease is lost: `stop` follows both meanwhile.
                let (term_tx, term_rx) = watch::channel(false);
                let forward = {
                    let mut global = self.stop.clone();
                    let fence = fence.clone();
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = global.wait_for(|s| *s) => {}
                            () = fence.lost() => {}
                        }
                        term_tx.send_replace(true);
                    })
                };
                let global = std::mem::replace(&mut self.stop, term_rx);
                let served = self.serve(Some(fence.clone())).await;
                self.stop = global;
                forward.abort();
                if *self.global.borrow() {
                    // Stopping: the lease is released once the last positions are stored (Service::run).
                    keeper.abort();
                    break;
                }
                if *self.stop.borrow() {
                    // No longer live (a reload): the lease is kept (and renewed) until the events handed on have
                    // settled and their position is stored, then released, so that this mode resumes exactly
                    // there when it is switched back to, and another replica may take the channel.
                    self.drain(&fence).await;
                    keeper.abort();
                    // The service began stopping meanwhile: it releases every lease after its last commit.
                    if !*self.global.borrow() {
                        leases.release(&fence).await;
                    }
                    break;
                }
                if served == Served::Failed {
                    keeper.abort();
                    leases.release(&fence).await;
                    break;
                }
                metrics::counter!(m::LEASE_CHANGES, "channel" => self.channel.clone(), "event" => "lost").increment(1);
                tracing::warn!(channel = %self.channel, token = fence.token, "Lost this channel's lease; standing by.");
                self.status.set(ChannelState::Standby);
            },
        }
        age.abort();
    }

    /// Waits until this replica holds the channel's lease; `None` when the service stops first.
    async fn acquire(&mut self, leases: &Arc<Leases>) -> Option<Arc<Fence>> {
        let mut waiting_logged = false;
        loop {
            if *self.stop.borrow() {
                return None;
            }
            match leases.try_acquire(&self.key).await {
                Ok(Some(fence)) => {
                    metrics::counter!(m::LEASE_CHANGES, "channel" => self.channel.clone(), "event" => "acquired")
                        .increment(1);
                    tracing::info!(channel = %self.channel, instance = %leases.instance, token = fence.token, "Took this channel's lease; subscribing.");
                    return Some(fence);
                }
                Ok(None) => {
                    if !waiting_logged {
                        waiting_logged = true;
                        tracing::info!(channel = %self.channel, instance = %leases.instance, "Another replica holds this channel's lease; standing by.");
                    }
                }
                Err(e) => {
                    tracing::warn!(channel = %self.channel, error = %e, "Cannot reach Redis for the channel lease; retrying.")
                }
            }
            self.status.set(ChannelState::Standby);
            tokio::select! {
                _ = tokio::time::sleep(jitter(leases.renew_every())) => {}
                _ = self.stop.wait_for(|s| *s) => return None,
            }
        }
    }

    /// Subscribes and resubscribes until the service stops, the lease is lost, or the channel fails for good.
    async fn serve(&mut self, fence: Option<Arc<Fence>>) -> Served {
        self.fence = fence;
        self.handed = None;
        self.uncommitted.clear();
        let channel = self.channel.clone();
        let mut resume = match self.initial().await {
            Some(resume) => resume,
            None => return Served::Stopped,
        };
        let initial_backoff = Duration::from_millis(self.sub.config.initial_backoff_ms.max(1));
        let max_backoff = Duration::from_millis(self.sub.config.max_backoff_ms.max(1));
        let mut backoff = initial_backoff;
        let mut warned_codes: HashSet<String> = HashSet::new();
        loop {
            if *self.stop.borrow() {
                break;
            }
            // Every subscribe requests events: only subscribe once the pipeline can take some.
            tokio::select! {
                reserved = self.out.reserve() => if reserved.is_err() {
                    break;
                },
                _ = self.stop.wait_for(|s| *s) => break,
            }
            self.status.set(ChannelState::Connecting);
            let mut got_response = false;
            let outcome = match self.sub.config.subscriptions.get(&self.channel).cloned() {
                Some(name) => self.managed_stream(&name, &mut got_response).await,
                None => self.stream(&mut resume, &mut got_response).await,
            };
            if got_response {
                backoff = initial_backoff;
            }
            match outcome {
                Ok(End::Stopped) => break,
                // A stream closed before it delivered anything is treated as a failure: no tight resubscribe loop.
                Ok(End::Closed) if !got_response => {
                    metrics::counter!(m::SOURCE_RECONNECTS, "channel" => channel.clone(), "reason" => "closed-early")
                        .increment(1);
                    tracing::warn!(%channel, "The stream closed before delivering anything; resubscribing with backoff.");
                    if !self.back_off(&mut backoff, max_backoff).await {
                        break;
                    }
                }
                Ok(End::Closed) => {
                    metrics::counter!(m::SOURCE_RECONNECTS, "channel" => channel.clone(), "reason" => "closed")
                        .increment(1);
                    tracing::info!(%channel, "The server closed the stream; resubscribing from the last position.");
                    continue;
                }
                Ok(End::Silent) => {
                    metrics::counter!(m::SOURCE_RECONNECTS, "channel" => channel.clone(), "reason" => "watchdog")
                        .increment(1);
                    tracing::warn!(%channel, watchdog_ms = self.sub.config.watchdog_ms, "Nothing arrived on the stream, not even a keepalive; resubscribing.");
                    continue;
                }
                Err(failure) => {
                    let (code, message) = match &failure {
                        Failure::Status(s) | Failure::Unauthenticated(_, s) => (error_code(s), s.message().to_string()),
                        Failure::Connect(e) => (String::new(), e.clone()),
                        Failure::Auth(e) => (String::new(), e.to_string()),
                    };
                    let label = if code.is_empty() {
                        "none".to_string()
                    } else {
                        code.clone()
                    };
                    metrics::counter!(m::SOURCE_ERRORS, "channel" => channel.clone(), "code" => label).increment(1);
                    if code == error_codes::REPLAY_ID_CORRUPTED || code == error_codes::REPLAY_ID_VALIDATION_FAILED {
                        let preset = self.sub.config.replay.on_invalid;
                        metrics::counter!(m::SOURCE_REPLAY_FALLBACKS, "channel" => channel.clone()).increment(1);
                        tracing::error!(%channel, error_code = %code, stored = ?resume, fallback = ?preset, %message,
                            "Salesforce refused the stored replay position (older than the 72-hour retention, or corrupt). \
                             Resubscribing from the configured `replay.on_invalid` preset; events between may be missed \
                             (latest) or processed again (earliest; idempotency keys prevent duplicate jobs).");
                        resume = Resume::Preset(preset);
                        continue;
                    }
                    if let Failure::Unauthenticated(creds, _) = &failure {
                        match self.sub.auth.renew(creds).await {
                            Ok(_) => continue,
                            Err(e) if e.is_transient() => {
                                tracing::warn!(%channel, error = %e, "Cannot renew the Salesforce token yet; retrying.");
                            }
                            Err(e) => {
                                self.stop_channel(&format!("authentication failed: {e}"));
                                return Served::Failed;
                            }
                        }
                    } else if let Failure::Auth(e) = &failure
                        && !e.is_transient()
                    {
                        self.stop_channel(&format!("authentication failed: {e}"));
                        return Served::Failed;
                    } else if FATAL_CODES.contains(&code.as_str())
                        || matches!(&failure, Failure::Status(s) if code.is_empty() && matches!(s.code(), Code::NotFound | Code::PermissionDenied))
                    {
                        self.stop_channel(&format!("{code}: {message}"));
                        return Served::Failed;
                    } else if warned_codes.insert(code.clone()) {
                        tracing::warn!(%channel, error_code = %code, %message, "The stream failed; resubscribing with backoff.");
                    } else {
                        tracing::debug!(%channel, error_code = %code, %message, "The stream failed again; resubscribing with backoff.");
                    }
                    metrics::counter!(m::SOURCE_RECONNECTS, "channel" => channel.clone(), "reason" => "error")
                        .increment(1);
                    if !self.back_off(&mut backoff, max_backoff).await {
                        break;
                    }
                }
            }
        }
        Served::Stopped
    }

    /// Waits out the current backoff (with jitter) and doubles it; false when the service is stopping.
    async fn back_off(&mut self, backoff: &mut Duration, max: Duration) -> bool {
        self.status.set(ChannelState::Backoff);
        let pause = jitter(*backoff);
        *backoff = (*backoff * 2).min(max);
        tokio::select! {
            _ = tokio::time::sleep(pause) => true,
            _ = self.stop.wait_for(|s| *s) => false,
        }
    }

    fn stop_channel(&self, why: &str) {
        metrics::gauge!(m::SOURCE_STOPPED, "channel" => self.channel.clone()).set(1.0);
        tracing::error!(channel = %self.channel, reason = %why, "The channel stopped and will not resubscribe; fix the cause and restart (or reload) switchyard. Other channels keep running.");
        self.status.set(ChannelState::Stopped(why.to_string()));
    }

    /// The first position: configured start, stored position, fallback.
    async fn initial(&mut self) -> Option<Resume> {
        if let Some(name) = self.sub.config.subscriptions.get(&self.channel) {
            tracing::info!(channel = %self.channel, subscription = %name, "A managed subscription: Salesforce keeps the position, switchyard commits what has settled.");
            return Some(Resume::Preset(ReplayPreset::Latest));
        }
        let replay = &self.sub.config.replay;
        // Under a lease, every term may be a takeover: the stored position comes first, `start` is the fallback.
        let (start, fallback) = match (replay.start, self.fence.is_some()) {
            (ReplayStart::Latest, true) => (ReplayStart::Stored, ReplayPreset::Latest),
            (ReplayStart::Earliest, true) => (ReplayStart::Stored, ReplayPreset::Earliest),
            (start, _) => (start, replay.fallback),
        };
        Some(match start {
            ReplayStart::Latest => Resume::Preset(ReplayPreset::Latest),
            ReplayStart::Earliest => Resume::Preset(ReplayPreset::Earliest),
            ReplayStart::Stored => {
                // Never guess a start position (a wrong guess loses or repeats up to 72 hours): retry until it is read
                // or the channel stops.
                let read = self.sub.checkpoints.get_retrying(&self.key, Duration::from_secs(10), |e| {
                    tracing::warn!(channel = %self.channel, error = %e, "Cannot read the stored position; retrying.");
                    true
                });
                let stored = tokio::select! {
                    read = read => read.expect("every error is retried"),
                    _ = self.stop.wait_for(|s| *s) => return None,
                };
                match stored {
                    Some(bytes) if !bytes.is_empty() => {
                        tracing::info!(channel = %self.channel, replay_id = %crate::hex::encode(&bytes), "Resuming after the stored position.");
                        Resume::After(bytes)
                    }
                    _ => {
                        tracing::info!(channel = %self.channel, ?fallback, "No stored position; starting from the fallback preset.");
                        Resume::Preset(fallback)
                    }
                }
            }
        })
    }

    /// Reports the position's age every few seconds, and warns once as it nears the 72-hour retention.
    fn age_reporter(&self) -> tokio::task::JoinHandle<()> {
        let status = self.status.clone();
        let warn_after = Duration::from_secs(self.sub.config.position_age_warning_hours * 3600);
        // Ends when the channel task aborts it.
        tokio::spawn(async move {
            let mut warned = false;
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                let age = status.position_age();
                metrics::gauge!(m::POSITION_AGE, "channel" => status.channel.clone()).set(age.as_secs_f64());
                if age > warn_after && !warned {
                    warned = true;
                    tracing::warn!(channel = %status.channel, age_hours = age.as_secs() / 3600,
                        "The channel's position has not moved for a long time; Salesforce keeps events for 72 hours, after which this position cannot be resumed.");
                } else if age < warn_after {
                    warned = false;
                }
            }
        })
    }

    /// A token and a client on a fresh connection, for one stream.
    async fn open(&self) -> Result<(Arc<Credentials>, PubSubClient<tonic::transport::Channel>), Failure> {
        let creds = self.sub.auth.credentials().await.map_err(Failure::Auth)?;
        let channel = super::connect(&self.sub.endpoint)
            .await
            .map_err(|e| Failure::Connect(e.to_string()))?;
        Ok((creds, super::client(channel)))
    }

    /// One Subscribe stream, until it ends or fails.
    async fn stream(&mut self, resume: &mut Resume, got_response: &mut bool) -> Result<End, Failure> {
        let (creds, mut client) = self.open().await?;
        let batch = self.sub.config.batch_size.clamp(1, super::MAX_OUTSTANDING as u32) as i32;
        let (requests, rx) = mpsc::channel::<FetchRequest>(4);
        let (preset, replay_id) = match resume {
            Resume::Preset(ReplayPreset::Latest) => (WirePreset::Latest, Vec::new()),
            Resume::Preset(ReplayPreset::Earliest) => (WirePreset::Earliest, Vec::new()),
            Resume::After(bytes) => (WirePreset::Custom, bytes.clone()),
        };
        let _ = requests
            .send(FetchRequest {
                topic_name: self.channel.clone(),
                replay_preset: preset as i32,
                replay_id,
                num_requested: batch,
                auth_refresh: String::new(),
            })
            .await;
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        authorize(request.metadata_mut(), &creds).map_err(Failure::Connect)?;
        let unauthenticated = |status| refused(&creds, status);
        let mut stream = client.subscribe(request).await.map_err(unauthenticated)?.into_inner();
        let mut outstanding = batch;
        metrics::gauge!(m::SOURCE_OUTSTANDING, "channel" => self.channel.clone()).set(f64::from(outstanding));
        let watchdog = Duration::from_millis(self.sub.config.watchdog_ms.max(1));
        loop {
            let message = tokio::select! {
                message = tokio::time::timeout(watchdog, stream.message()) => message,
                _ = self.stop.wait_for(|s| *s) => return Ok(End::Stopped),
            };
            let response: FetchResponse = match message {
                Err(_) => return Ok(End::Silent),
                Ok(Ok(Some(response))) => response,
                Ok(Ok(None)) => return Ok(End::Closed),
                Ok(Err(status)) => {
                    // A clean close of the stream (the idle close) reads as an OK status on some servers.
                    return if status.code() == Code::Ok {
                        Ok(End::Closed)
                    } else {
                        Err(unauthenticated(status))
                    };
                }
            };
            if !*got_response {
                *got_response = true;
                self.status.set(ChannelState::Streaming);
            }
            self.status.advanced();
            outstanding = response.pending_num_requested.max(0);
            // Top up before the batch is handed on, so demand never runs dry while the pipeline works; never more
            // than `batch` outstanding in all.
            if outstanding <= batch / 2 {
                let more = batch - outstanding;
                if requests
                    .send(FetchRequest {
                        num_requested: more,
                        ..FetchRequest::default()
                    })
                    .await
                    .is_err()
                {
                    return Ok(End::Closed);
                }
                outstanding = batch;
            }
            metrics::gauge!(m::SOURCE_OUTSTANDING, "channel" => self.channel.clone()).set(f64::from(outstanding));
            if response.events.is_empty() {
                metrics::counter!(m::SOURCE_KEEPALIVES, "channel" => self.channel.clone()).increment(1);
                if !response.latest_replay_id.is_empty() && Resume::After(response.latest_replay_id.clone()) != *resume
                {
                    *resume = Resume::After(response.latest_replay_id.clone());
                    let mark = Delivery::Mark {
                        end: response.latest_replay_id,
                    };
                    if !self.send(mark).await {
                        return Ok(End::Stopped);
                    }
                }
                continue;
            }
            for consumer in response.events {
                let replay = consumer.replay_id.clone();
                let delivery = self.decode(&mut client, &creds, &consumer).await;
                let delivery = match delivery {
                    Ok(d) => d,
                    Err(failure) => return Err(failure),
                };
                *resume = Resume::After(replay);
                if !self.send(delivery).await {
                    return Ok(End::Stopped);
                }
            }
        }
    }

    /// One ManagedSubscribe stream, until it ends or fails: the same flow control as [`ChannelTask::stream`], the
    /// position kept by Salesforce, and every newly stored (settled) position this term handed on committed.
    async fn managed_stream(&mut self, name: &str, got_response: &mut bool) -> Result<End, Failure> {
        let (creds, mut client) = self.open().await?;
        let batch = self.sub.config.batch_size.clamp(1, super::MAX_OUTSTANDING as u32) as i32;
        let (requests, rx) = mpsc::channel::<ManagedFetchRequest>(8);
        let _ = requests
            .send(ManagedFetchRequest {
                developer_name: name.to_string(),
                num_requested: batch,
                ..ManagedFetchRequest::default()
            })
            .await;
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        authorize(request.metadata_mut(), &creds).map_err(Failure::Connect)?;
        let unauthenticated = |status| refused(&creds, status);
        let mut stream = client
            .managed_subscribe(request)
            .await
            .map_err(unauthenticated)?
            .into_inner();
        let mut commits = Commits::default();
        let mut outstanding = batch;
        metrics::gauge!(m::SOURCE_OUTSTANDING, "channel" => self.channel.clone()).set(f64::from(outstanding));
        let watchdog = Duration::from_millis(self.sub.config.watchdog_ms.max(1));
        let mut silent_at = tokio::time::Instant::now() + watchdog;
        let mut poll = tokio::time::interval(COMMIT_POLL);
        let mut final_by: Option<tokio::time::Instant> = None;
        loop {
            if let Some(by) = final_by
                && (tokio::time::Instant::now() >= by || self.all_committed(&commits))
            {
                return Ok(End::Stopped);
            }
            enum Wake<M> {
                Message(M),
                Poll,
                Stop,
            }
            let woke = tokio::select! {
                message = stream.message() => Wake::Message(message),
                () = tokio::time::sleep_until(silent_at) => return Ok(End::Silent),
                _ = poll.tick() => Wake::Poll,
                _ = self.stop.wait_for(|s| *s), if final_by.is_none() => Wake::Stop,
            };
            let message = match woke {
                Wake::Message(message) => message,
                Wake::Poll => {
                    self.commit_settled(&requests, &mut commits).await;
                    continue;
                }
                Wake::Stop => {
                    // Stopping: the pipeline stores the last settled positions; commit them before the stream ends.
                    final_by = Some(tokio::time::Instant::now() + FINAL_COMMIT_LIMIT);
                    poll = tokio::time::interval(Duration::from_millis(50));
                    continue;
                }
            };
            let response = match message {
                Ok(Some(response)) => response,
                Ok(None) => return Ok(End::Closed),
                Err(status) if status.code() == Code::Ok => return Ok(End::Closed),
                Err(status) => return Err(unauthenticated(status)),
            };
            silent_at = tokio::time::Instant::now() + watchdog;
            if !*got_response {
                *got_response = true;
                self.status.set(ChannelState::Streaming);
            }
            if let Some(commit) = &response.commit_response {
                self.committed(commit, &mut commits);
                if response.events.is_empty() && response.latest_replay_id.is_empty() {
                    continue;
                }
            }
            if final_by.is_some() {
                // Nothing more is handed on while stopping; what arrives now is redelivered after the restart.
                continue;
            }
            self.status.advanced();
            outstanding = response.pending_num_requested.max(0);
            if outstanding <= batch / 2 {
                let more = ManagedFetchRequest {
                    num_requested: batch - outstanding,
                    ..ManagedFetchRequest::default()
                };
                if requests.send(more).await.is_err() {
                    return Ok(End::Closed);
                }
                outstanding = batch;
            }
            metrics::gauge!(m::SOURCE_OUTSTANDING, "channel" => self.channel.clone()).set(f64::from(outstanding));
            if response.events.is_empty() {
                metrics::counter!(m::SOURCE_KEEPALIVES, "channel" => self.channel.clone()).increment(1);
                let latest = response.latest_replay_id;
                if !latest.is_empty()
                    && self.handed.as_ref() != Some(&latest)
                    && !self.uncommitted.contains(&latest)
                    && !self.send(Delivery::Mark { end: latest }).await
                {
                    final_by = Some(tokio::time::Instant::now() + FINAL_COMMIT_LIMIT);
                }
                continue;
            }
            for consumer in response.events {
                // Redelivered after a reconnect but handed on already (in flight, or settled and not committed yet).
                if self.uncommitted.contains(&consumer.replay_id) {
                    continue;
                }
                let delivery = self.decode(&mut client, &creds, &consumer).await?;
                if !self.send(delivery).await {
                    // Stopping while the pipeline was full: commit what settles, then end.
                    final_by = Some(tokio::time::Instant::now() + FINAL_COMMIT_LIMIT);
                    break;
                }
            }
        }
    }

    /// Whether the last position handed on was stored and its commit acknowledged (nothing left to commit).
    fn all_committed(&self, commits: &Commits) -> bool {
        self.handed.is_none() || (self.uncommitted.is_empty() && commits.waiting.is_none())
    }

    /// Commits the stored position when it moved to one this term handed on (so everything up to it settled).
    async fn commit_settled(&mut self, requests: &mpsc::Sender<ManagedFetchRequest>, commits: &mut Commits) {
        if commits
            .waiting
            .as_ref()
            .is_some_and(|(_, _, at)| at.elapsed() < COMMIT_RESEND)
            || self.uncommitted.is_empty()
        {
            return;
        }
        let stored = match self.sub.checkpoints.get(&self.key).await {
            Ok(Some(stored)) => stored,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(channel = %self.channel, error = %e, "Cannot read the stored position to commit; retrying.");
                return;
            }
        };
        if !self.uncommitted.contains(&stored) {
            return;
        }
        commits.next += 1;
        let id = format!("{}-{}", self.key, commits.next);
        let request = ManagedFetchRequest {
            commit_replay_id_request: Some(CommitReplayRequest {
                commit_request_id: id.clone(),
                replay_id: stored.clone(),
            }),
            ..ManagedFetchRequest::default()
        };
        if requests.send(request).await.is_ok() {
            commits.waiting = Some((id, stored, Instant::now()));
        }
    }

    /// A commit's response: acknowledged positions are forgotten; a refused commit is logged and retried.
    fn committed(&mut self, response: &super::proto::CommitReplayResponse, commits: &mut Commits) {
        if commits
            .waiting
            .as_ref()
            .is_some_and(|(id, _, _)| *id == response.commit_request_id)
        {
            commits.waiting = None;
        }
        if let Some(error) = &response.error {
            metrics::counter!(m::SOURCE_MANAGED_COMMITS, "channel" => self.channel.clone(), "result" => "refused")
                .increment(1);
            tracing::warn!(channel = %self.channel, replay_id = %crate::hex::encode(&response.replay_id), error = %error.msg,
                "Salesforce refused a commit of the managed subscription's position; it is sent again with the next settled position.");
            return;
        }
        metrics::counter!(m::SOURCE_MANAGED_COMMITS, "channel" => self.channel.clone(), "result" => "ok").increment(1);
        if let Some(at) = self.uncommitted.iter().position(|p| *p == response.replay_id) {
            self.uncommitted.drain(..=at);
        }
    }

    /// Hands a delivery to the pipeline, waiting while it is full (backpressure); false when stopping.
    async fn send(&mut self, delivery: Delivery) -> bool {
        let end = delivery.end().to_vec();
        let sourced = Sourced {
            key: Some(self.key.clone()),
            fence: self.fence.clone(),
            delivery,
        };
        let sent = tokio::select! {
            sent = self.out.send(sourced) => sent.is_ok(),
            _ = self.stop.wait_for(|s| *s) => false,
        };
        if sent {
            if self.sub.config.subscriptions.contains_key(&self.channel) {
                self.uncommitted.push_back(end.clone());
                // Bounded: a position never acknowledged (commits failing for long) must not grow it forever.
                if self.uncommitted.len() > UNCOMMITTED_LIMIT {
                    self.uncommitted.pop_front();
                }
            }
            self.handed = Some(end);
        }
        sent
    }

    /// Waits until the position past the last delivery this term handed on is stored (the pipeline stores it
    /// once everything before it settled), the lease is lost, the service stops, or [`DRAIN_LIMIT`] passes.
    async fn drain(&mut self, fence: &Fence) {
        let Some(handed) = self.handed.take() else {
            return;
        };
        let give_up = Instant::now() + DRAIN_LIMIT;
        loop {
            if fence.is_lost() || *self.global.borrow() {
                return;
            }
            if let Ok(Some(stored)) = self.sub.checkpoints.get(&self.key).await
                && stored == handed
            {
                tracing::debug!(channel = %self.channel, "Events in flight settled and their position is stored.");
                return;
            }
            if Instant::now() >= give_up {
                tracing::warn!(channel = %self.channel, limit_s = DRAIN_LIMIT.as_secs(), "Events in flight did not settle in time; releasing the lease anyway (they are redelivered from the stored position).");
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Decodes one event against its writer schema (fetched once per schema id). Input that cannot be decoded
    /// becomes a malformed delivery (dead-lettered with its replay id), never a silent drop.
    async fn decode(
        &self,
        client: &mut PubSubClient<tonic::transport::Channel>,
        creds: &Arc<Credentials>,
        consumer: &super::proto::ConsumerEvent,
    ) -> Result<Delivery, Failure> {
        let position = format!("{}@{}", self.channel, crate::hex::encode(&consumer.replay_id));
        let end = consumer.replay_id.clone();
        let malformed = |error: String| {
            let (id, schema, size) = consumer
                .event
                .as_ref()
                .map(|e| (e.id.clone(), e.schema_id.clone(), e.payload.len()))
                .unwrap_or_default();
            Delivery::Malformed {
                position: position.clone(),
                raw: format!("event id {id}, schema id {schema}, {size} payload bytes"),
                error,
                event_id: (!id.is_empty()).then_some(id),
                channel: Some(self.channel.clone()),
                end: end.clone(),
            }
        };
        let raw = match RawEvent::from_consumer(consumer) {
            Ok(raw) => raw,
            Err(e) => return Ok(malformed(e.to_string())),
        };
        let schema_id = raw.schema_id.to_string();
        let known = self
            .registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&schema_id)
            .cloned();
        let schema = match known {
            Some(schema) => schema,
            None => {
                let mut request = tonic::Request::new(SchemaRequest {
                    schema_id: schema_id.clone(),
                });
                authorize(request.metadata_mut(), creds).map_err(Failure::Connect)?;
                let info = match client.get_schema(request).await {
                    Ok(info) => info.into_inner(),
                    // An unknown schema id is this event's problem: dead-letter it, keep the stream.
                    Err(status) if matches!(status.code(), Code::NotFound | Code::InvalidArgument) => {
                        return Ok(malformed(format!(
                            "unknown schema id {schema_id}: {}",
                            status.message()
                        )));
                    }
                    Err(status) => return Err(Failure::Status(status)),
                };
                match self
                    .registry
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(&schema_id, &info.schema_json)
                {
                    Ok(schema) => schema,
                    Err(e) => return Ok(malformed(format!("schema {schema_id} does not parse: {e}"))),
                }
            }
        };
        Ok(match schema.decode(&self.channel, &raw) {
            Ok(event) => Delivery::Event {
                event: Box::new(event),
                position,
                end,
            },
            Err(e) => malformed(e.to_string()),
        })
    }
}

/// How a stream's status counts: a refused token (renewed once, then retried) or another failure.
fn refused(creds: &Arc<Credentials>, status: tonic::Status) -> Failure {
    if status.code() == Code::Unauthenticated || error_code(&status) == error_codes::AUTH {
        Failure::Unauthenticated(creds.clone(), status)
    } else {
        Failure::Status(status)
    }
}

/// The three auth headers Salesforce reads on every RPC.
pub fn authorize(md: &mut tonic::metadata::MetadataMap, creds: &Credentials) -> Result<(), String> {
    let value = |v: &str, what: &str| {
        v.parse::<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>()
            .map_err(|_| format!("the {what} is not valid in a gRPC header"))
    };
    md.insert(
        headers::ACCESS_TOKEN,
        value(creds.access_token.expose(), "access token")?,
    );
    md.insert(headers::INSTANCE_URL, value(&creds.instance_url, "instance URL")?);
    md.insert(headers::TENANT_ID, value(&creds.tenant_id, "tenant id")?);
    Ok(())
}

/// The Salesforce `error-code` trailer ("" when absent).
pub fn error_code(status: &tonic::Status) -> String {
    status
        .metadata()
        .get(headers::ERROR_CODE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}
