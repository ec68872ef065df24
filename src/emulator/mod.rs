//! An in-process Salesforce Pub/Sub API server for tests and demos.
//!
//! It speaks the real proto over real gRPC: events given as JSONL (DESIGN.md §2) are Avro-encoded with real
//! bitmaps under the schemas in `schemas/avro/`, served with Salesforce's flow control (at most 100 outstanding),
//! keepalives, idle close, LATEST/EARLIEST/CUSTOM replay, auth metadata checks and Salesforce's error trailers.
//! Faults (a dropped stream, a corrupted replay id, a failed auth, a silent stream, a schema change) are injected
//! through the [`EmulatorHandle`].
//!
//! Replay ids are 8-byte big-endian counters over all topics. The `replay_id` of a published event is ignored:
//! the emulator assigns the next one, as the bus would.

pub mod encode;
mod managed;
mod rest;
mod service;
mod state;
mod subscribe;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use crate::event::{Event, EventError};
use crate::sources::pubsub::MAX_MESSAGE_BYTES;
use crate::sources::pubsub::avro::{CompiledSchema, DecodeError};
use crate::sources::pubsub::proto::pub_sub_server::PubSubServer;
use encode::EncodeError;
pub use managed::ManagedSubscription;

use service::Service;
pub use state::Update;
use state::{Settings, Shared, State, Topic};

/// The CDC channel the built-in OrderChangeEvent schema serves.
pub const ORDER_CHANNEL: &str = "/data/OrderChangeEvent";
/// The CDC channel the built-in OrderItemChangeEvent schema serves.
pub const ORDER_ITEM_CHANNEL: &str = "/data/OrderItemChangeEvent";
/// The platform-event channel the built-in Order_Fulfilment_Requested__e schema serves.
pub const FULFILMENT_CHANNEL: &str = "/event/Order_Fulfilment_Requested__e";
/// The standard multi-entity CDC channel: every entity's changes (here Order and OrderItem), each with its schema.
pub const CHANGE_EVENTS_CHANNEL: &str = "/data/ChangeEvents";
/// A custom channel with the Order and OrderItem members, enriched: every Order change carries `AccountId` and
/// every OrderItem change `OrderId`, changed or not.
pub const ORDERS_CUSTOM_CHANNEL: &str = "/data/Orders__chn";

const ORDER_SCHEMA: &str = include_str!("../../schemas/avro/OrderChangeEvent.avsc");
/// The same object with its fields in another order (and one field more), for the schema-change fault.
const ORDER_SCHEMA_V2: &str = include_str!("OrderChangeEvent.v2.avsc");
const FULFILMENT_SCHEMA: &str = include_str!("../../schemas/avro/Order_Fulfilment_Requested__e.avsc");
const ORDER_ITEM_SCHEMA: &str = include_str!("../../schemas/avro/OrderItemChangeEvent.avsc");

/// Default expected `accesstoken`; tests and the demo use it unless they set their own.
pub const DEFAULT_ACCESS_TOKEN: &str = "emulator-access-token";
/// Salesforce sends a keepalive "within 270 seconds" and in practice about every 60 s.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
/// Salesforce closes a stream when no FetchRequest arrives within 60 s while nothing is requested.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Why the emulator could not start, load events or publish.
#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the emulator's gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error(
        "the emulator has no topic `{0}` (it serves {ORDER_CHANNEL}, {ORDER_ITEM_CHANNEL}, {CHANGE_EVENTS_CHANNEL}, {ORDERS_CUSTOM_CHANNEL} and {FULFILMENT_CHANNEL})"
    )]
    UnknownChannel(String),
    #[error("the channel `{channel}` carries changes of {members}, not of `{entity}`")]
    NotAMember {
        channel: String,
        entity: String,
        members: String,
    },
    #[error("cannot write the event as Avro: {0}")]
    Encode(#[from] EncodeError),
    #[error("a built-in schema does not parse: {0}")]
    Schema(#[from] DecodeError),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {source}")]
    BadEvent {
        path: PathBuf,
        line: usize,
        #[source]
        source: EventError,
    },
    #[error("the emulator's server task ended abnormally: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// How to run the emulator. `Default` listens on a random loopback port with Salesforce's timings.
#[derive(Debug, Clone)]
pub struct EmulatorOptions {
    /// Where to listen; port 0 picks a free port (read it from [`EmulatorHandle::addr`]).
    pub addr: SocketAddr,
    /// Where the HTTP side (OAuth token endpoint, userinfo, sobject reads) listens; port 0 picks a free port.
    pub http_addr: SocketAddr,
    /// Events on the bus from the start, in order.
    pub events: Vec<Event>,
    /// The `accesstoken` every RPC must carry.
    pub access_token: String,
    /// Silence after which a stream with outstanding demand gets an empty keepalive batch.
    pub keepalive_interval: Duration,
    /// Time with no demand after the last response before a stream is closed.
    pub idle_timeout: Duration,
    /// The connected app and org behind the OAuth token endpoint.
    pub oauth: OAuthSettings,
    /// The org's managed subscriptions (ManagedSubscribe resolves them by developer name or id).
    pub managed: Vec<ManagedSubscription>,
}

/// What the emulator's OAuth token endpoint accepts, and the org it reports.
#[derive(Debug, Clone)]
pub struct OAuthSettings {
    pub client_id: String,
    pub client_secret: String,
    /// The user JWT bearer assertions must name (`sub`).
    pub username: String,
    /// The RSA public key (PEM) that verifies JWT bearer assertions; `None` refuses that flow.
    pub jwt_public_key_pem: Option<String>,
    /// The org id (`tenantid`), reported in the identity URL and by userinfo.
    pub org_id: String,
    pub user_id: String,
}

/// Defaults of the emulator's connected app; `switchyard emulator` prints them.
pub const DEFAULT_CLIENT_ID: &str = "emulator-client-id";
pub const DEFAULT_CLIENT_SECRET: &str = "emulator-client-secret";
pub const DEFAULT_USERNAME: &str = "integration@switchyard.invalid";
pub const DEFAULT_ORG_ID: &str = "00Dxx0000000001AAA";

impl Default for OAuthSettings {
    fn default() -> Self {
        Self {
            client_id: DEFAULT_CLIENT_ID.into(),
            client_secret: DEFAULT_CLIENT_SECRET.into(),
            username: DEFAULT_USERNAME.into(),
            jwt_public_key_pem: None,
            org_id: DEFAULT_ORG_ID.into(),
            user_id: "005xx0000000001AAA".into(),
        }
    }
}

impl Default for EmulatorOptions {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            events: Vec::new(),
            access_token: DEFAULT_ACCESS_TOKEN.to_owned(),
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            oauth: OAuthSettings::default(),
            managed: Vec::new(),
        }
    }
}

/// A fault to inject, see [`EmulatorHandle::inject`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// After `n` more events (over all streams) the stream delivering them fails with INTERNAL and
    /// `service.unavailable`, as Salesforce streams do during incidents. One-shot.
    DropStreamAfter(usize),
    /// The next Subscribe with a CUSTOM replay id fails with `replayid.corrupted`. One-shot.
    CorruptNextReplayId,
    /// The next RPC fails with UNAUTHENTICATED and `service.auth.error`. One-shot.
    FailAuthOnce,
    /// Every stream stops sending (no events, no keepalives, no idle close) until [`Fault::Resume`]: the
    /// half-open stream a client watchdog must detect.
    GoSilent,
    /// Ends [`Fault::GoSilent`].
    Resume,
    /// From now on OrderChangeEvent events are written with the v2 schema (other field order, one field more),
    /// and GetTopic reports its id. Events already on the bus keep their schema, as on the real bus.
    SwitchOrderSchemaToV2,
    /// Every access token issued so far (and the static one) stops working: gRPC answers UNAUTHENTICATED with
    /// `service.auth.error`, REST answers 401 `INVALID_SESSION_ID`, until a client gets a new token.
    ExpireTokens,
    /// The next `times` REST reads answer `status` (e.g. 503).
    FailRestReads { status: u16, times: usize },
    /// The next `times` REST reads wait `delay` before answering (a client timeout shorter than that fails them).
    SlowRestReads { delay: Duration, times: usize },
    /// The next `times` REST updates (PATCH) answer `status` (503: retried; 400: `FIELD_CUSTOM_VALIDATION_EXCEPTION`,
    /// as an org's validation rule refuses a write) and change nothing.
    FailRestUpdates { status: u16, times: usize },
}

/// A running emulator. Dropping it shuts the server down; [`EmulatorHandle::shutdown`] also waits for that.
#[derive(Debug)]
pub struct EmulatorHandle {
    addr: SocketAddr,
    http_addr: SocketAddr,
    shared: Arc<Shared>,
    server: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
}

/// Starts the emulator and returns once it accepts connections.
pub async fn start(options: EmulatorOptions) -> Result<EmulatorHandle, EmulatorError> {
    let order = CompiledSchema::parse(ORDER_SCHEMA)?;
    let order_v2 = CompiledSchema::parse(ORDER_SCHEMA_V2)?;
    let fulfilment = CompiledSchema::parse(FULFILMENT_SCHEMA)?;
    let order_item = CompiledSchema::parse(ORDER_ITEM_SCHEMA)?;
    let mut state = State::default();
    for schema in [&order, &order_v2, &fulfilment, &order_item] {
        state.schemas.insert(schema.fingerprint().to_owned(), schema.clone());
    }
    let members = HashMap::from([
        ("Order".to_owned(), order.clone()),
        ("OrderItem".to_owned(), order_item.clone()),
    ]);
    state.topics.insert(
        CHANGE_EVENTS_CHANNEL.to_owned(),
        Topic {
            members: members.clone(),
            ..Topic::single(order.clone())
        },
    );
    state.topics.insert(
        ORDERS_CUSTOM_CHANNEL.to_owned(),
        Topic {
            members,
            enriched: HashMap::from([
                ("Order".to_owned(), vec!["AccountId".to_owned()]),
                ("OrderItem".to_owned(), vec!["OrderId".to_owned()]),
            ]),
            ..Topic::single(order.clone())
        },
    );
    for (channel, schema) in [
        (ORDER_CHANNEL, order),
        (ORDER_ITEM_CHANNEL, order_item),
        (FULFILMENT_CHANNEL, fulfilment),
    ] {
        state.topics.insert(channel.to_owned(), Topic::single(schema));
    }
    state.tokens.insert(options.access_token.clone());
    state.managed = options
        .managed
        .into_iter()
        .enumerate()
        .map(|(n, spec)| managed::Managed::new(spec, n + 1))
        .collect();
    let settings = Settings {
        oauth: options.oauth,
        access_token: options.access_token,
        keepalive_interval: options.keepalive_interval,
        idle_timeout: options.idle_timeout,
    };
    let shared = Arc::new(Shared::new(settings, state));
    for event in &options.events {
        shared.publish(event)?;
    }

    let listener = TcpListener::bind(options.addr)
        .await
        .map_err(|source| EmulatorError::Bind {
            addr: options.addr,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| EmulatorError::Bind {
        addr: options.addr,
        source,
    })?;
    let shared_for_http = shared.clone();
    let service = PubSubServer::new(Service { shared: shared.clone() })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let mut stop = shared.shutdown.subscribe();
    // The server task ends when the shutdown flag is set (explicit shutdown or the handle dropped): streams see the
    // same flag and end, and then graceful shutdown completes.
    let server = tokio::spawn(Server::builder().add_service(service).serve_with_incoming_shutdown(
        TcpIncoming::from(listener),
        async move {
            let _ = stop.wait_for(|stop| *stop).await;
        },
    ));
    let http_listener = TcpListener::bind(options.http_addr)
        .await
        .map_err(|source| EmulatorError::Bind {
            addr: options.http_addr,
            source,
        })?;
    let http_addr = http_listener.local_addr().map_err(|source| EmulatorError::Bind {
        addr: options.http_addr,
        source,
    })?;
    let _ = shared.http_base.set(format!("http://{http_addr}"));
    let mut stop = shared.shutdown.subscribe();
    // Ends with the same shutdown flag as the gRPC server.
    tokio::spawn(async move {
        let app = rest::router(shared_for_http);
        let served = axum::serve(http_listener, app).with_graceful_shutdown(async move {
            let _ = stop.wait_for(|stop| *stop).await;
        });
        if let Err(error) = served.await {
            tracing::error!(%error, "The emulator's HTTP side failed.");
        }
    });
    tracing::info!(%addr, %http_addr, "The Pub/Sub emulator is listening.");
    Ok(EmulatorHandle {
        addr,
        http_addr,
        shared,
        server: Some(server),
    })
}

impl EmulatorHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL a tonic client connects to, e.g. `http://127.0.0.1:41234`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The static `accesstoken` the emulator accepts (until [`Fault::ExpireTokens`]).
    pub fn access_token(&self) -> &str {
        &self.shared.settings.access_token
    }

    /// Address of the HTTP side (OAuth token endpoint, userinfo, sobject reads).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The login URL and instance URL, e.g. `http://127.0.0.1:41235`.
    pub fn base_url(&self) -> String {
        self.shared.base_url()
    }

    /// The org id the emulator reports.
    pub fn org_id(&self) -> &str {
        &self.shared.settings.oauth.org_id
    }

    /// Requests to the token endpoint, refused ones included.
    pub fn token_requests(&self) -> u64 {
        self.shared.stats.token_requests.load(Ordering::Relaxed)
    }

    /// REST sobject reads over all records.
    pub fn rest_reads(&self) -> u64 {
        self.shared.stats.rest_reads.load(Ordering::Relaxed)
    }

    /// REST reads of one record id.
    pub fn rest_reads_of(&self, id: &str) -> u64 {
        self.shared.state().reads.get(id).copied().unwrap_or(0)
    }

    /// The REST updates (PATCH) the org accepted, in order.
    pub fn updates(&self) -> Vec<Update> {
        self.shared.state().updates.clone()
    }

    /// The claims of the last JWT bearer assertion the token endpoint received.
    pub fn last_jwt_claims(&self) -> Option<crate::auth::JwtClaims> {
        self.shared.state().last_jwt.clone()
    }

    /// Sets a record as the REST API will read it (`None`: not found).
    pub fn set_record(&self, id: &str, fields: crate::event::RecordFields) {
        self.shared.state().records.insert(id.to_owned(), fields);
    }

    /// Appends an event to its channel's log; returns its replay id (8 bytes, big-endian).
    pub fn publish(&self, event: &Event) -> Result<Vec<u8>, EmulatorError> {
        Ok(self.shared.publish(event)?.to_be_bytes().to_vec())
    }

    /// Appends an event whose payload no schema can decode (random-looking bytes under the topic's schema id):
    /// what a subscriber must dead-letter, not drop.
    pub fn publish_corrupt(&self, channel: &str) -> Result<Vec<u8>, EmulatorError> {
        let schema_id = self
            .schema_id(channel)
            .ok_or_else(|| EmulatorError::UnknownChannel(channel.to_owned()))?;
        let stored = state::Stored {
            replay: 0,
            event_id: format!("corrupt-{}", self.shared.rpc_id()),
            schema_id,
            payload: vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
        };
        Ok(self.shared.publish_raw(channel, stored)?.to_be_bytes().to_vec())
    }

    /// The schema id new events of `channel` are written with.
    pub fn schema_id(&self, channel: &str) -> Option<String> {
        let state = self.shared.state();
        state.topics.get(channel).map(|t| t.schema.fingerprint().to_owned())
    }

    /// Every schema the emulator knows, by id (what GetSchema answers).
    pub fn schemas(&self) -> HashMap<String, Arc<CompiledSchema>> {
        self.shared.state().schemas.clone()
    }

    /// The replay id of the newest event on the bus (8 bytes, big-endian; zero when empty).
    pub fn latest_replay_id(&self) -> Vec<u8> {
        self.shared.state().last_replay.to_be_bytes().to_vec()
    }

    pub fn inject(&self, fault: Fault) {
        tracing::debug!(?fault, "A fault was injected into the emulator.");
        match fault {
            Fault::DropStreamAfter(n) => self.shared.update_faults(|f| f.drop_after = Some(n)),
            Fault::CorruptNextReplayId => self.shared.update_faults(|f| f.corrupt_next_replay_id = true),
            Fault::FailAuthOnce => self.shared.update_faults(|f| f.fail_auth_once = true),
            Fault::GoSilent => self.shared.update_faults(|f| f.silent = true),
            Fault::Resume => self.shared.update_faults(|f| f.silent = false),
            Fault::ExpireTokens => self.shared.state().tokens.clear(),
            Fault::FailRestReads { status, times } => self
                .shared
                .update_faults(|f| f.rest_failures.extend(std::iter::repeat_n(status, times))),
            Fault::FailRestUpdates { status, times } => self
                .shared
                .update_faults(|f| f.update_failures.extend(std::iter::repeat_n(status, times))),
            Fault::SlowRestReads { delay, times } => {
                self.shared.update_faults(|f| f.rest_delays = Some((delay, times)))
            }
            Fault::SwitchOrderSchemaToV2 => {
                let mut state = self.shared.state();
                let v2 = state.schemas.values().find(|s| s.json() == ORDER_SCHEMA_V2).cloned();
                if let (Some(v2), Some(topic)) = (v2, state.topics.get_mut(ORDER_CHANNEL)) {
                    topic.schema = v2;
                }
            }
        }
    }

    /// The most events the emulator ever owed one stream: never above 100, whatever clients ask for.
    pub fn max_outstanding(&self) -> i32 {
        self.shared.stats.max_outstanding.load(Ordering::Relaxed)
    }

    /// The most events a client ever asked to have outstanding on one stream, before the 100 cap: a well-behaved
    /// client keeps this at or below 100.
    pub fn max_requested(&self) -> i64 {
        self.shared.stats.max_requested.load(Ordering::Relaxed)
    }

    /// Events delivered over all streams.
    pub fn delivered(&self) -> u64 {
        self.shared.stats.delivered.load(Ordering::Relaxed)
    }

    /// Empty keepalive batches sent over all streams.
    pub fn keepalives(&self) -> u64 {
        self.shared.stats.keepalives.load(Ordering::Relaxed)
    }

    /// Subscribe calls that got past their first FetchRequest (a client's reconnects show here).
    pub fn subscriptions(&self) -> u64 {
        self.shared.stats.subscriptions.load(Ordering::Relaxed)
    }

    /// The committed replay id of a managed subscription (8 bytes, big-endian), once one was committed.
    pub fn managed_committed(&self, developer_name: &str) -> Option<Vec<u8>> {
        let state = self.shared.state();
        let managed = state.managed.iter().find(|m| m.spec.developer_name == developer_name)?;
        managed.committed.map(|id| id.to_be_bytes().to_vec())
    }

    /// Every successful commit of a managed subscription, in order.
    pub fn managed_commits(&self, developer_name: &str) -> Vec<Vec<u8>> {
        let state = self.shared.state();
        let managed = state.managed.iter().find(|m| m.spec.developer_name == developer_name);
        managed.map_or_else(Vec::new, |m| {
            m.commits.iter().map(|id| id.to_be_bytes().to_vec()).collect()
        })
    }

    /// ManagedSubscribe streams that got past their first request.
    pub fn managed_streams(&self) -> u64 {
        self.shared.stats.managed_streams.load(Ordering::Relaxed)
    }

    /// Stops the server and waits until it has stopped.
    pub async fn shutdown(mut self) -> Result<(), EmulatorError> {
        self.shared.shutdown.send_replace(true);
        if let Some(server) = self.server.take() {
            server.await??;
        }
        Ok(())
    }
}

impl Drop for EmulatorHandle {
    fn drop(&mut self) {
        // The spawned server and stream tasks watch this flag and end by themselves.
        self.shared.shutdown.send_replace(true);
    }
}

/// One line of an events file, as the emulator serves it.
#[derive(Debug)]
pub enum Line {
    Event(Box<Event>),
    /// A line that is not an event: skipped with a warning, or served as a payload no schema decodes.
    Malformed {
        line: usize,
        error: EventError,
    },
}

/// Reads a JSONL file of events (blank lines and `#` comments skipped), each line checked as [`Event::from_json`]
/// does; a line that is not an event is kept as [`Line::Malformed`] with its number.
pub fn read_lines(path: &Path) -> Result<Vec<Line>, EmulatorError> {
    let text = std::fs::read_to_string(path).map_err(|source| EmulatorError::Read {
        path: path.to_owned(),
        source,
    })?;
    Ok(text
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty() && !line.trim_start().starts_with('#'))
        .map(|(index, line)| match Event::from_json(line) {
            Ok(event) => Line::Event(Box::new(event)),
            Err(error) => Line::Malformed { line: index + 1, error },
        })
        .collect())
}

/// Reads a JSONL file of events, refusing the first line that is not one (with its `path:line`).
pub fn load_events(path: &Path) -> Result<Vec<Event>, EmulatorError> {
    read_lines(path)?
        .into_iter()
        .map(|line| match line {
            Line::Event(event) => Ok(*event),
            Line::Malformed { line, error } => Err(EmulatorError::BadEvent {
                path: path.to_owned(),
                line,
                source: error,
            }),
        })
        .collect()
}

/// Entry point for `switchyard emulator`: serves `options` until Ctrl-C, then shuts down. Prints the environment
/// that points `switchyard run --config examples/salesforce.yaml` at it.
/// `lines` go on the bus in file order before anyone subscribes: the events, and each malformed line either skipped
/// with a warning naming `path:line` or, with `serve_malformed`, as an undecodable payload on the Order channel.
pub async fn run_cli(
    options: EmulatorOptions,
    path: Option<&Path>,
    lines: Vec<Line>,
    serve_malformed: bool,
) -> Result<(), EmulatorError> {
    let oauth = options.oauth.clone();
    let handle = start(options).await?;
    let mut events = 0;
    for line in lines {
        match line {
            Line::Event(event) => {
                handle.publish(&event)?;
                events += 1;
            }
            Line::Malformed { line, error } if serve_malformed => {
                tracing::warn!(line, %error, "Not an event: served as an undecodable payload on {ORDER_CHANNEL}.");
                handle.publish_corrupt(ORDER_CHANNEL)?;
                events += 1;
            }
            Line::Malformed { line, error } => {
                let at = path
                    .map(|p| format!("{}:{line}", p.display()))
                    .unwrap_or_else(|| line.to_string());
                tracing::warn!(
                    "{at}: not an event ({error}); skipped (`--serve-malformed` serves it as an undecodable payload)."
                );
            }
        }
    }
    tracing::info!(
        endpoint = %handle.endpoint(),
        login_url = %handle.base_url(),
        events,
        order_schema_id = handle.schema_id(ORDER_CHANNEL).unwrap_or_default(),
        fulfilment_schema_id = handle.schema_id(FULFILMENT_CHANNEL).unwrap_or_default(),
        "The Pub/Sub emulator is serving; press Ctrl-C to stop it."
    );
    crate::outln!("# The emulator's connection settings, for `switchyard run --config examples/salesforce.yaml`:");
    crate::outln!("export SF_PUBSUB_ENDPOINT={}", handle.endpoint());
    crate::outln!("export SF_LOGIN_URL={}", handle.base_url());
    crate::outln!("export SF_CLIENT_ID={}", oauth.client_id);
    crate::outln!("export SF_CLIENT_SECRET={}", oauth.client_secret);
    crate::outln!(
        "# or a static token: SF_ACCESS_TOKEN={} SF_INSTANCE_URL={}",
        handle.access_token(),
        handle.base_url()
    );
    if let Err(error) = tokio::signal::ctrl_c().await {
        tracing::warn!(%error, "Cannot wait for Ctrl-C; stopping the emulator now.");
    }
    handle.shutdown().await
}
