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

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use super::avro::{RawEvent, SchemaRegistry};
use super::proto::{FetchRequest, FetchResponse, ReplayPreset as WirePreset, SchemaRequest};
use super::{error_codes, headers, replay_id_to_hex};
use crate::auth::{Auth, AuthError, Credentials};
use crate::checkpoint::CheckpointStore;
use crate::config::{Mode, PubsubConfig, ReplayPreset, ReplayStart};
use crate::dispatch::jitter;
use crate::metrics as m;
use crate::sources::{Delivery, Sourced};

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
    /// Keeps `rx` open while every channel is stopped (the service stays up); dropped by [`PubsubSource::finish`].
    keep: Option<mpsc::Sender<Sourced>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
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
}

impl PubsubSource {
    /// Starts one task per channel; `buffer` bounds the deliveries waiting for the pipeline.
    pub fn start(sub: Subscription, channels: &[String], buffer: usize) -> PubsubSource {
        let (tx, rx) = mpsc::channel(buffer.max(1));
        let stop = Arc::new(watch::Sender::new(false));
        let registry = Arc::new(Mutex::new(SchemaRegistry::new()));
        let mut tasks = Vec::new();
        let mut statuses = Vec::new();
        for channel in channels {
            let status = Arc::new(ChannelStatus {
                channel: channel.clone(),
                state: Mutex::new(ChannelState::Connecting),
                last_advance: Mutex::new(Instant::now()),
            });
            statuses.push(status.clone());
            let task = ChannelTask {
                sub: sub.clone(),
                channel: channel.clone(),
                key: Arc::from(checkpoint_key(sub.mode, channel)),
                registry: registry.clone(),
                out: tx.clone(),
                status,
                stop: stop.subscribe(),
            };
            // Ends when `stop` flips or the pipeline drops the receiver.
            tasks.push(tokio::spawn(task.run()));
        }
        if channels.is_empty() {
            tracing::info!("No Pub/Sub subscription (events disabled, or no live route); the service stays up.");
        }
        PubsubSource {
            rx,
            keep: Some(tx),
            tasks,
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
        for task in &self.tasks {
            task.abort();
        }
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

struct ChannelTask {
    sub: Subscription,
    channel: String,
    key: Arc<str>,
    registry: Arc<Mutex<SchemaRegistry>>,
    out: mpsc::Sender<Sourced>,
    status: Arc<ChannelStatus>,
    stop: watch::Receiver<bool>,
}

impl ChannelTask {
    async fn run(mut self) {
        let channel = self.channel.clone();
        let mut resume = match self.initial().await {
            Some(resume) => resume,
            None => return,
        };
        let initial_backoff = Duration::from_millis(self.sub.config.initial_backoff_ms.max(1));
        let max_backoff = Duration::from_millis(self.sub.config.max_backoff_ms.max(1));
        let mut backoff = initial_backoff;
        let age = self.age_reporter();
        let mut warned_codes: HashSet<String> = HashSet::new();
        loop {
            if *self.stop.borrow() {
                break;
            }
            // Every subscribe requests events: only subscribe once the pipeline can take some.
            if self.out.reserve().await.is_err() {
                break;
            }
            self.status.set(ChannelState::Connecting);
            let mut got_response = false;
            let outcome = self.stream(&mut resume, &mut got_response).await;
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
                                break;
                            }
                        }
                    } else if let Failure::Auth(e) = &failure
                        && !e.is_transient()
                    {
                        self.stop_channel(&format!("authentication failed: {e}"));
                        break;
                    } else if FATAL_CODES.contains(&code.as_str())
                        || matches!(&failure, Failure::Status(s) if code.is_empty() && matches!(s.code(), Code::NotFound | Code::PermissionDenied))
                    {
                        self.stop_channel(&format!("{code}: {message}"));
                        break;
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
        age.abort();
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
        let replay = &self.sub.config.replay;
        Some(match replay.start {
            ReplayStart::Latest => Resume::Preset(ReplayPreset::Latest),
            ReplayStart::Earliest => Resume::Preset(ReplayPreset::Earliest),
            ReplayStart::Stored => {
                let mut pause = Duration::from_millis(200);
                let stored = loop {
                    match self.sub.checkpoints.get(&self.key).await {
                        Ok(stored) => break stored,
                        Err(e) => {
                            // Never guess a start position: a wrong guess loses or repeats up to 72 hours.
                            tracing::warn!(channel = %self.channel, error = %e, "Cannot read the stored position; retrying.");
                            tokio::select! {
                                _ = tokio::time::sleep(pause) => {}
                                _ = self.stop.wait_for(|s| *s) => return None,
                            }
                            pause = (pause * 2).min(Duration::from_secs(10));
                        }
                    }
                };
                match stored {
                    Some(bytes) if !bytes.is_empty() => {
                        tracing::info!(channel = %self.channel, replay_id = %replay_id_to_hex(&bytes), "Resuming after the stored position.");
                        Resume::After(bytes)
                    }
                    _ => {
                        tracing::info!(channel = %self.channel, fallback = ?replay.fallback, "No stored position; starting from the fallback preset.");
                        Resume::Preset(replay.fallback)
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

    /// One Subscribe stream, until it ends or fails.
    async fn stream(&mut self, resume: &mut Resume, got_response: &mut bool) -> Result<End, Failure> {
        let creds = self.sub.auth.credentials().await.map_err(Failure::Auth)?;
        let channel = super::connect(&self.sub.endpoint)
            .await
            .map_err(|e| Failure::Connect(e.to_string()))?;
        let mut client = super::client(channel);
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
        let unauthenticated = |status: tonic::Status| {
            if status.code() == Code::Unauthenticated || error_code(&status) == error_codes::AUTH {
                Failure::Unauthenticated(creds.clone(), status)
            } else {
                Failure::Status(status)
            }
        };
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

    /// Hands a delivery to the pipeline, waiting while it is full (backpressure); false when stopping.
    async fn send(&mut self, delivery: Delivery) -> bool {
        let sourced = Sourced {
            key: Some(self.key.clone()),
            delivery,
        };
        tokio::select! {
            sent = self.out.send(sourced) => sent.is_ok(),
            _ = self.stop.wait_for(|s| *s) => false,
        }
    }

    /// Decodes one event against its writer schema (fetched once per schema id). Input that cannot be decoded
    /// becomes a malformed delivery (dead-lettered with its replay id), never a silent drop.
    async fn decode(
        &self,
        client: &mut super::proto::pub_sub_client::PubSubClient<tonic::transport::Channel>,
        creds: &Arc<Credentials>,
        consumer: &super::proto::ConsumerEvent,
    ) -> Result<Delivery, Failure> {
        let position = format!("{}@{}", self.channel, replay_id_to_hex(&consumer.replay_id));
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
