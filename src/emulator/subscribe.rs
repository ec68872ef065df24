//! One Subscribe stream: pull-based delivery with Salesforce's flow control, keepalives and idle close.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until, timeout};
use tokio_stream::{Stream, StreamExt};
use tonic::{Code, Status, Streaming};

use crate::sources::pubsub::proto::{ConsumerEvent, FetchRequest, FetchResponse, ProducerEvent, ReplayPreset};
use crate::sources::pubsub::{MAX_OUTSTANDING, error_codes};

use super::service::{failure, topic_not_found};
use super::state::Shared;

const RPC: &str = "Subscribe";

pub(crate) type Outbound = mpsc::Sender<Result<FetchResponse, Status>>;

/// Reads and checks the first FetchRequest, then spawns the stream's task. Errors in the first request are
/// returned as the RPC's status, the way a client sees them from Salesforce.
pub(crate) async fn start(
    shared: Arc<Shared>,
    mut inbound: Streaming<FetchRequest>,
    rpc_id: String,
    tx: Outbound,
) -> Result<(), Status> {
    let fail = |code, error_code, message: &str| failure(code, error_code, message, &rpc_id, RPC);
    let first = first_request(&shared, &mut inbound, "FetchRequest", &rpc_id, RPC).await?;
    check_demand(first.num_requested, &rpc_id, RPC)?;
    let position = {
        let mut state = shared.state();
        if !state.topics.contains_key(&first.topic_name) {
            return Err(topic_not_found(&first.topic_name, &rpc_id, RPC));
        }
        match ReplayPreset::try_from(first.replay_preset) {
            Ok(ReplayPreset::Latest) => state.last_replay,
            Ok(ReplayPreset::Earliest) => 0,
            Ok(ReplayPreset::Custom) if first.replay_id.is_empty() => {
                return Err(fail(
                    Code::InvalidArgument,
                    error_codes::REPLAY_ID_VALIDATION_FAILED,
                    "The Replay ID validation failed. A CUSTOM replay preset needs a replay_id.",
                ));
            }
            Ok(ReplayPreset::Custom) => {
                let injected = std::mem::take(&mut state.faults.corrupt_next_replay_id);
                // Replay ids are 8-byte big-endian counters here; anything else, or an id the bus never issued,
                // is what Salesforce calls corrupted.
                let parsed = <[u8; 8]>::try_from(first.replay_id.as_slice())
                    .map(u64::from_be_bytes)
                    .ok()
                    .filter(|id| *id <= state.last_replay && !injected);
                match parsed {
                    Some(id) => id,
                    None => {
                        return Err(fail(
                            Code::InvalidArgument,
                            error_codes::REPLAY_ID_CORRUPTED,
                            "The Replay ID validation failed. Ensure that the replay_id field value in FetchRequest \
                             is valid and refers to an event that is within the retention window.",
                        ));
                    }
                }
            }
            Err(_) => {
                return Err(fail(
                    Code::InvalidArgument,
                    error_codes::REPLAY_ID_VALIDATION_FAILED,
                    "The replay preset is not one of LATEST, EARLIEST or CUSTOM.",
                ));
            }
        }
    };
    spawn_session(
        shared,
        first.topic_name,
        position,
        first.num_requested,
        inbound,
        (rpc_id, RPC),
        tx,
    );
    Ok(())
}

/// The first request of a stream; a stream opened without one (within the idle timeout) is refused.
pub(crate) async fn first_request<T>(
    shared: &Shared,
    inbound: &mut Streaming<T>,
    what: &str,
    rpc_id: &str,
    rpc: &str,
) -> Result<T, Status> {
    match timeout(shared.settings.idle_timeout, inbound.message()).await {
        Ok(Ok(Some(first))) => Ok(first),
        Ok(Ok(None)) | Err(_) => Err(failure(
            Code::InvalidArgument,
            error_codes::REQUESTED_EVENTS_INVALID,
            &format!("The stream was opened without a {what}."),
            rpc_id,
            rpc,
        )),
        Ok(Err(status)) => Err(status),
    }
}

/// A first request must ask for at least one event.
pub(crate) fn check_demand(num_requested: i32, rpc_id: &str, rpc: &str) -> Result<(), Status> {
    if num_requested > 0 {
        return Ok(());
    }
    Err(failure(
        Code::InvalidArgument,
        error_codes::REQUESTED_EVENTS_INVALID,
        "The requested number of events in a fetch request must be greater than zero.",
        rpc_id,
        rpc,
    ))
}

/// Starts delivering `topic` after replay id `position` with `demand` requested; later requests come from
/// `inbound`. The managed side runs the same session behind an adapter. Returns the session's task.
pub(crate) fn spawn_session(
    shared: Arc<Shared>,
    topic: String,
    position: u64,
    demand: i32,
    inbound: impl Stream<Item = Result<FetchRequest, Status>> + Send + Unpin + 'static,
    (rpc_id, rpc): (String, &'static str),
    tx: Outbound,
) -> tokio::task::JoinHandle<()> {
    shared.stats.subscriptions.fetch_add(1, Ordering::Relaxed);
    let mut session = Session {
        shutdown: shared.shutdown.subscribe(),
        appended: shared.appended.subscribe(),
        faults: shared.faults_changed.subscribe(),
        shared,
        topic,
        position,
        pending: 0,
        rpc_id,
        rpc,
        tx,
        last_sent: Instant::now(),
    };
    session.add_demand(demand);
    tracing::debug!(
        topic = %session.topic,
        rpc_id = %session.rpc_id,
        position,
        "The emulator opened a subscription."
    );
    // The task ends when the client goes away (a send fails or its request stream errors), when demand stays at 0
    // for the idle timeout (Salesforce closes such streams), on an injected drop, or on emulator shutdown.
    tokio::spawn(session.run(inbound))
}

struct Session {
    shared: Arc<Shared>,
    topic: String,
    /// Replay id of the last event delivered (or the start position): the stream continues after it.
    position: u64,
    /// Events requested and not yet delivered.
    pending: i32,
    rpc_id: String,
    /// The RPC the session serves, for error messages (`Subscribe`, `ManagedSubscribe`).
    rpc: &'static str,
    tx: Outbound,
    last_sent: Instant,
    shutdown: watch::Receiver<bool>,
    appended: watch::Receiver<u64>,
    faults: watch::Receiver<u64>,
}

/// Why the loop woke up.
enum Wake {
    Shutdown,
    Request(Result<Option<FetchRequest>, Status>),
    /// New events or changed faults: look again.
    Changed,
    Timer,
}

/// What the loop does next.
enum Step {
    Continue,
    Stop,
}

impl Session {
    fn add_demand(&mut self, num_requested: i32) {
        let requested = i64::from(self.pending) + i64::from(num_requested);
        // Salesforce caps what it owes one stream at 100, whatever the client asks for.
        self.pending = i32::try_from(requested.min(i64::from(MAX_OUTSTANDING))).unwrap_or(MAX_OUTSTANDING);
        self.shared.record_outstanding(requested, self.pending);
    }

    async fn run(mut self, mut inbound: impl Stream<Item = Result<FetchRequest, Status>> + Unpin) {
        let mut inbound_open = true;
        loop {
            let silent = self.shared.state().faults.silent;
            if !silent && self.pending > 0 {
                match self.deliver().await {
                    Step::Continue => {}
                    Step::Stop => break,
                }
            }
            let deadline = if self.pending > 0 {
                self.last_sent + self.shared.settings.keepalive_interval
            } else {
                self.last_sent + self.shared.settings.idle_timeout
            };
            let woke = tokio::select! {
                _ = self.shutdown.wait_for(|stop| *stop) => Wake::Shutdown,
                request = inbound.next(), if inbound_open => Wake::Request(request.transpose()),
                _ = self.appended.changed() => Wake::Changed,
                _ = self.faults.changed() => Wake::Changed,
                _ = sleep_until(deadline), if !silent => Wake::Timer,
            };
            let step = match woke {
                Wake::Shutdown => Step::Stop,
                Wake::Changed => Step::Continue,
                Wake::Request(Ok(Some(request))) => self.on_request(request).await,
                // The client closed its side; it may still read what it asked for.
                Wake::Request(Ok(None)) => {
                    inbound_open = false;
                    Step::Continue
                }
                Wake::Request(Err(_)) => Step::Stop,
                Wake::Timer if self.pending > 0 => self.keepalive().await,
                Wake::Timer => {
                    tracing::debug!(
                        topic = %self.topic,
                        rpc_id = %self.rpc_id,
                        "The emulator closed a subscription that requested nothing for the idle timeout."
                    );
                    Step::Stop
                }
            };
            if let Step::Stop = step {
                break;
            }
        }
    }

    async fn on_request(&mut self, request: FetchRequest) -> Step {
        if !request.topic_name.is_empty() && request.topic_name != self.topic {
            let status = failure(
                Code::InvalidArgument,
                error_codes::TOPIC_MISMATCH,
                "The topic of a later FetchRequest must match the first one.",
                &self.rpc_id,
                self.rpc,
            );
            let _ = self.send(Err(status)).await;
            return Step::Stop;
        }
        if request.num_requested <= 0 {
            let status = failure(
                Code::InvalidArgument,
                error_codes::REQUESTED_EVENTS_INVALID,
                "The requested number of events in a fetch request must be greater than zero.",
                &self.rpc_id,
                self.rpc,
            );
            let _ = self.send(Err(status)).await;
            return Step::Stop;
        }
        self.add_demand(request.num_requested);
        Step::Continue
    }

    /// Sends what is available, up to the demand. With nothing to send it returns and the loop waits.
    async fn deliver(&mut self) -> Step {
        let (events, drop_now) = {
            let mut state = self.shared.state();
            let mut budget = usize::try_from(self.pending).unwrap_or(0);
            let mut drop_now = false;
            if let Some(left) = state.faults.drop_after {
                budget = budget.min(left);
                drop_now = left == 0;
            }
            let events: Vec<ConsumerEvent> = match state.topics.get(&self.topic) {
                Some(topic) => {
                    let start = topic.log.partition_point(|e| e.replay <= self.position);
                    topic.log[start..]
                        .iter()
                        .take(budget)
                        .map(|stored| ConsumerEvent {
                            event: Some(ProducerEvent {
                                id: stored.event_id.clone(),
                                schema_id: stored.schema_id.clone(),
                                payload: stored.payload.clone(),
                                headers: Vec::new(),
                            }),
                            replay_id: stored.replay.to_be_bytes().to_vec(),
                        })
                        .collect()
                }
                None => Vec::new(),
            };
            if let Some(left) = state.faults.drop_after.as_mut() {
                *left -= events.len();
                drop_now = drop_now || *left == 0;
                if drop_now {
                    state.faults.drop_after = None;
                }
            }
            (events, drop_now)
        };
        if !events.is_empty() {
            let delivered = events.len();
            let last = events.last().map(|e| e.replay_id.clone()).unwrap_or_default();
            self.position = u64::from_be_bytes(<[u8; 8]>::try_from(last.as_slice()).unwrap_or_default());
            self.pending -= i32::try_from(delivered).unwrap_or(self.pending);
            let response = FetchResponse {
                events,
                latest_replay_id: last,
                rpc_id: self.rpc_id.clone(),
                pending_num_requested: self.pending,
            };
            if let Step::Stop = self.send(Ok(response)).await {
                return Step::Stop;
            }
            self.shared
                .stats
                .delivered
                .fetch_add(delivered as u64, Ordering::Relaxed);
        }
        if drop_now {
            tracing::debug!(topic = %self.topic, rpc_id = %self.rpc_id, "The emulator dropped a stream on request.");
            let status = failure(
                Code::Internal,
                error_codes::SERVICE_UNAVAILABLE,
                "The service is unavailable. Try again later.",
                &self.rpc_id,
                self.rpc,
            );
            let _ = self.send(Err(status)).await;
            return Step::Stop;
        }
        Step::Continue
    }

    /// An empty batch with the latest replay id: tells the client the stream is alive and where it could resume.
    async fn keepalive(&mut self) -> Step {
        let latest = {
            let state = self.shared.state();
            let undelivered = state
                .topics
                .get(&self.topic)
                .is_some_and(|t| t.log.last().is_some_and(|e| e.replay > self.position));
            // With events of this topic still undelivered the position must not jump past them; otherwise the
            // bus-wide tip is a safe place to resume from (Salesforce's "replay tightening").
            if undelivered { self.position } else { state.last_replay }
        };
        let response = FetchResponse {
            events: Vec::new(),
            latest_replay_id: latest.to_be_bytes().to_vec(),
            rpc_id: self.rpc_id.clone(),
            pending_num_requested: self.pending,
        };
        self.shared.stats.keepalives.fetch_add(1, Ordering::Relaxed);
        self.send(Ok(response)).await
    }

    async fn send(&mut self, item: Result<FetchResponse, Status>) -> Step {
        // A client that stops reading must not keep shutdown waiting.
        let sent = tokio::select! {
            _ = self.shutdown.wait_for(|stop| *stop) => false,
            result = self.tx.send(item) => result.is_ok(),
        };
        self.last_sent = Instant::now();
        if sent { Step::Continue } else { Step::Stop }
    }
}
