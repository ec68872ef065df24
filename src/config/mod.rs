//! The service config (DESIGN.md §4): pure data, `${VAR}` substitution, validation without I/O.

use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::diag::{Problem, Problems};
use crate::plan::JobOptions;

mod env;
mod redis;
mod salesforce;
mod sinks;
mod spans;
pub use env::{Secret, substitute_env};
pub use redis::{RedisConfig, RedisEndpoint, RedisTls, Topology, has_hash_tag, redact_url};
pub use salesforce::{
    AuthFlow, DEFAULT_API_VERSION, DEFAULT_PUBSUB_ENDPOINT, MAX_BATCH_SIZE, PubsubConfig, ReplayConfig, ReplayPreset,
    ReplayStart, RestConfig, SalesforceConfig,
};
pub use sinks::{
    BUILT_IN_SINKS, CacheSinkConfig, DEAD_LETTER_SINK, LogSinkConfig, QueueFormat, QueueSinkConfig,
    SALESFORCE_UPDATE_SINK, SinkConfig, SinkKind, WebhookSignature, WebhookSinkConfig, default_sinks,
};
pub use spans::Spans;

/// The config of the embedded demo (`switchyard run` with no `--config`).
pub const DEMO_CONFIG: &str = include_str!("../../examples/demo.yaml");
/// Where the embedded demo config pretends to live, so its relative paths resolve.
pub const DEMO_CONFIG_PATH: &str = "examples/demo.yaml";

/// Which routes and channels are live.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Change Data Capture: channels under `/data/`.
    #[default]
    Cdc,
    /// Platform events: channels under `/event/`.
    PlatformEvent,
}

impl Mode {
    /// The mode a channel belongs to, from its name (`/data/...` or `/event/...`).
    pub fn of_channel(channel: &str) -> Option<Mode> {
        if channel.starts_with("/data/") {
            Some(Mode::Cdc)
        } else if channel.starts_with("/event/") {
            Some(Mode::PlatformEvent)
        } else {
            None
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Cdc => "cdc",
            Mode::PlatformEvent => "platform-event",
        }
    }
}

/// The switchyard service config.
///
/// Relative paths (rules, JSONL files) resolve against the directory of the config file.
/// `${VAR}` and `${VAR:-default}` are substituted from the environment before parsing.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "switchyard config")]
pub struct Config {
    /// Which routes and channels are live: `cdc` or `platform-event`. `SWITCHYARD_MODE` overrides it.
    #[serde(default)]
    #[schemars(example = &"cdc")]
    pub mode: Mode,
    /// Where events come from.
    #[schemars(example = serde_json::json!({"kind": "jsonl", "jsonl": {"path": "events/order-lifecycle.jsonl"}}))]
    pub source: SourceConfig,
    /// Channel aliases used by routes, mapped to channel names (`/data/...` = CDC, `/event/...` = platform events).
    #[serde(default = "default_channels")]
    #[schemars(example = default_channels())]
    pub channels: IndexMap<String, String>,
    /// Rule files or folders (every `*.yaml`/`*.yml` in them except `*.test.yaml`).
    #[schemars(example = vec!["../rules/".to_string()])]
    pub rules: Vec<PathBuf>,
    /// Redis for idempotency markers, dead letters, positions, and the queue and cache sinks that have no
    /// `redis` of their own. Absent: all of them in memory (demo only).
    #[serde(default)]
    #[schemars(example = serde_json::json!({"url": "${REDIS_URL}", "key_prefix": "switchyard:"}))]
    pub redis: Option<RedisConfig>,
    /// Named sinks the routes' actions call. `dead-letter` is built in and always available.
    #[serde(default)]
    #[schemars(example = serde_json::json!({"enqueue-provisioning": {"kind": "queue", "queue": "provisioning", "job_name": "provision-order"}, "invalidate-cache": {"kind": "cache-invalidate"}, "log": {"kind": "log"}}))]
    pub sinks: IndexMap<String, SinkConfig>,
    /// Where `enrich` reads records: `salesforce` (REST reads; the default with a `pubsub` source), `recorded`
    /// (the events' own `record` map; the default otherwise) or `none`.
    #[serde(default)]
    #[schemars(example = &"salesforce")]
    pub enricher: Option<EnricherKind>,
    /// The Salesforce connection: auth (shared by Pub/Sub and REST), API version, REST limits. Needed by the
    /// `pubsub` source and the `salesforce` enricher.
    #[serde(default)]
    #[schemars(example = serde_json::json!({"login_url": "${SF_LOGIN_URL}", "client_id": "${SF_CLIENT_ID}", "client_secret": "${SF_CLIENT_SECRET}"}))]
    pub salesforce: Option<SalesforceConfig>,
    /// What happens to an event no route matched: `ignore`, `log` or `dead-letter`.
    #[serde(default)]
    #[schemars(example = &"log")]
    pub on_unmatched: OnUnmatched,
    /// The HTTP listener for `/healthz`, `/readyz`, `/metrics`, `/rules` and `POST /reload`. Absent: no listener.
    #[serde(default)]
    #[schemars(example = serde_json::json!({"listen": "127.0.0.1:9464"}))]
    pub http: Option<HttpConfig>,
    /// Print every decision (event, record, route, actions) to standard output, and a summary when the
    /// source ends. Meant for demos and local runs.
    #[serde(default)]
    #[schemars(example = false)]
    pub print_decisions: bool,
    /// A folder of Avro schemas (`*.avsc`, named after the channels' objects: `OrderChangeEvent.avsc`): start-up,
    /// every reload and `validate --config` then refuse rules that name a field the channel's schema does not
    /// have or compare one with a literal of another type, as `validate --avro` does.
    #[serde(default)]
    #[schemars(example = &"../schemas/avro")]
    pub avro_schemas: Option<PathBuf>,
    /// Concurrency, retries, idempotency and shutdown.
    #[serde(default)]
    #[schemars(example = serde_json::json!({"concurrency": 64, "retry": {"budget_ms": 300000}}))]
    pub delivery: DeliveryConfig,
    /// Where source positions are stored. Default: `redis` when `redis` is set, else `memory`.
    #[serde(default)]
    #[schemars(example = serde_json::json!({"store": "file", "path": "/var/lib/switchyard/positions.json"}))]
    pub checkpoint: Option<CheckpointConfig>,
    /// Dead-letter retention.
    #[serde(default)]
    #[schemars(example = serde_json::json!({"max_len": 100000}))]
    pub dead_letters: DeadLetterConfig,
    /// Hot reload of the rules when their files change.
    #[serde(default)]
    #[schemars(example = serde_json::json!({"watch": true, "debounce_ms": 300}))]
    pub reload: ReloadConfig,
    /// Replicas: which instance subscribes to each channel. With a Pub/Sub source and positions in Redis, every
    /// instance takes a lease per channel before subscribing; the others stand by and take over when it lapses.
    #[serde(default)]
    #[schemars(example = serde_json::json!({"ttl_ms": 15000, "instance": "${HOSTNAME}"}))]
    pub lease: LeaseConfig,
    /// The decision journal: one entry per decided event, for `switchyard why` and `switchyard tap`.
    #[serde(default)]
    #[schemars(example = serde_json::json!({"enabled": true, "max_len": 100000, "retention": "7d", "mask": ["Description"]}))]
    pub journal: JournalConfig,
    /// The runaway guard of every route without its own `limit`: a route that fires more often than this is
    /// paused on every replica, and the events it would act on are dead-lettered until it is resumed. Absent:
    /// only routes with a `limit` are guarded.
    #[serde(default)]
    #[schemars(example = serde_json::json!({"fires": 600, "per": "1m"}))]
    pub route_limit: Option<crate::plan::Limit>,
    /// Payload and record fields (personal data) replaced by `***` in dead letters and `log` sink fields.
    #[serde(default)]
    #[schemars(example = vec!["BillingAddress".to_string(), "Description".to_string()])]
    pub redact: Vec<String>,
}

impl Config {
    /// The enricher in effect: the configured one, else `salesforce` for Pub/Sub sources and `recorded` otherwise.
    pub fn enricher(&self) -> EnricherKind {
        self.enricher.unwrap_or(match self.source.kind {
            SourceKind::Pubsub | SourceKind::Emulator => EnricherKind::Salesforce,
            SourceKind::Jsonl | SourceKind::Stdin => EnricherKind::Recorded,
        })
    }

    /// The Pub/Sub settings in effect (defaults when the section is absent).
    pub fn pubsub(&self) -> PubsubConfig {
        let mut pubsub = self.source.pubsub.clone().unwrap_or_default();
        // Managed subscriptions by channel name: aliases resolved.
        pubsub.subscriptions = pubsub
            .subscriptions
            .into_iter()
            .map(|(channel, name)| (self.channels.get(&channel).cloned().unwrap_or(channel), name))
            .collect();
        pubsub
    }
}

/// The per-channel subscriber lease (README "Running two or more replicas").
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaseConfig {
    /// Take a lease per channel before subscribing. Default: on with a `pubsub` source whose positions are in
    /// Redis; off otherwise (a single instance, the demo, files).
    #[serde(default)]
    #[schemars(example = true)]
    pub enabled: Option<bool>,
    /// How long a lease outlives its last renewal (renewed every third of it). A standby takes over at most this
    /// long after the holder died; a graceful stop (SIGTERM) hands over at once.
    #[serde(default = "default_lease_ttl_ms")]
    #[schemars(example = 15000)]
    pub ttl_ms: u64,
    /// This instance's name in the lease (unique per replica). Default: `<hostname>:<pid>`. A restarted instance
    /// with the same name takes its own lease back at once, with a new fencing token.
    #[serde(default)]
    #[schemars(example = &"switchyard-0")]
    pub instance: Option<String>,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            enabled: None,
            ttl_ms: default_lease_ttl_ms(),
            instance: None,
        }
    }
}

fn default_lease_ttl_ms() -> u64 {
    15_000
}

impl Config {
    /// Whether channel leases are in effect (see [`LeaseConfig::enabled`]).
    pub fn leases_enabled(&self) -> bool {
        self.lease
            .enabled
            .unwrap_or(self.source.kind == SourceKind::Pubsub && self.redis_positions())
    }

    /// Whether source positions are stored in Redis.
    fn redis_positions(&self) -> bool {
        self.redis.is_some()
            && !matches!(
                self.checkpoint,
                Some(CheckpointConfig {
                    store: CheckpointStoreKind::File | CheckpointStoreKind::Memory,
                    ..
                })
            )
    }

    /// This instance's name in leases.
    pub fn instance_name(&self) -> String {
        match self.lease.instance.as_deref().filter(|s| !s.trim().is_empty()) {
            Some(name) => name.trim().to_string(),
            None => {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|h| h.trim().to_string())
                    .filter(|h| !h.is_empty())
                    .or_else(|| std::env::var("HOSTNAME").ok())
                    .unwrap_or_else(|| "switchyard".into());
                format!("{host}:{}", std::process::id())
            }
        }
    }
}

/// Hot reload of the rules.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReloadConfig {
    /// Watch the rules' folders and reload on change (`run --no-watch` turns it off). SIGHUP and
    /// `POST /reload` reload either way.
    #[serde(default = "default_true")]
    #[schemars(example = true)]
    pub watch: bool,
    /// Quiet time after the last file change before reloading (editors write files in several steps).
    #[serde(default = "default_debounce_ms")]
    #[schemars(example = 300)]
    pub debounce_ms: u64,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        ReloadConfig {
            watch: true,
            debounce_ms: default_debounce_ms(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_debounce_ms() -> u64 {
    300
}

/// How actions are delivered.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Events in flight at once. Events touching the same record id always run in delivery order; when
    /// this many are in flight (e.g. while Redis is down), the source is not read: backpressure.
    #[serde(default = "default_concurrency")]
    #[schemars(example = 64)]
    pub concurrency: usize,
    /// Retries of transient sink errors (connection refused, timeouts, Redis LOADING/BUSY).
    #[serde(default)]
    #[schemars(example = serde_json::json!({"initial_backoff_ms": 100, "max_backoff_ms": 5000, "budget_ms": 300000}))]
    pub retry: RetryConfig,
    /// How long an idempotency lease lives without renewal (a crashed holder's lease expires after it).
    #[serde(default = "default_lease_ms")]
    #[schemars(example = 30000)]
    pub lease_ms: u64,
    /// How long a done marker keeps a redelivered action from running again. The default, 96 hours, outlives
    /// Salesforce's 72-hour event retention.
    #[serde(default = "default_done_ttl_hours")]
    #[schemars(example = 96)]
    pub done_ttl_hours: u64,
    /// On SIGTERM/SIGINT: how long in-flight events may take to settle before the process exits anyway
    /// (their positions are then not committed, so they are redelivered).
    #[serde(default = "default_shutdown_ms")]
    #[schemars(example = 30000)]
    pub shutdown_timeout_ms: u64,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            concurrency: default_concurrency(),
            retry: RetryConfig::default(),
            lease_ms: default_lease_ms(),
            done_ttl_hours: default_done_ttl_hours(),
            shutdown_timeout_ms: default_shutdown_ms(),
        }
    }
}

fn default_concurrency() -> usize {
    64
}
fn default_lease_ms() -> u64 {
    30_000
}
fn default_done_ttl_hours() -> u64 {
    96
}
fn default_shutdown_ms() -> u64 {
    30_000
}

/// Exponential backoff with jitter, within a time budget; past it the action is dead-lettered.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// The first delay.
    #[serde(default = "default_initial_backoff")]
    #[schemars(example = 100)]
    pub initial_backoff_ms: u64,
    /// The longest delay between two attempts.
    #[serde(default = "default_max_backoff")]
    #[schemars(example = 5000)]
    pub max_backoff_ms: u64,
    /// How long one action may keep failing transiently before it is dead-lettered.
    #[serde(default = "default_budget")]
    #[schemars(example = 300000)]
    pub budget_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            initial_backoff_ms: default_initial_backoff(),
            max_backoff_ms: default_max_backoff(),
            budget_ms: default_budget(),
        }
    }
}

fn default_initial_backoff() -> u64 {
    100
}
fn default_max_backoff() -> u64 {
    5_000
}
fn default_budget() -> u64 {
    300_000
}

/// Where source positions are stored.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// `redis`, `file` (with `path`) or `memory`.
    #[schemars(example = &"redis")]
    pub store: CheckpointStoreKind,
    /// The file for `store: file` (relative to the config file).
    #[serde(default)]
    #[schemars(example = &"positions.json")]
    pub path: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum CheckpointStoreKind {
    /// `<key_prefix>checkpoint:<source>` keys in the configured Redis.
    Redis,
    /// A JSON file, replaced atomically on every commit.
    File,
    /// Process memory: every start begins at the beginning (demos).
    Memory,
}

/// The decision journal (README "Operating").
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JournalConfig {
    /// Keep a journal. In the main Redis when the config has one (shared by every replica), else in memory.
    #[serde(default = "default_true")]
    #[schemars(example = true)]
    pub enabled: bool,
    /// Entries kept: in Redis this many plus at most one written batch (the stream keeps one item per batch of up
    /// to 128 entries, and trims whole items); in memory, exactly.
    #[serde(default = "default_journal_max_len")]
    #[schemars(example = 100000)]
    pub max_len: usize,
    /// How long an entry stays findable by record id, event id or idempotency key: a number with `s`, `m`,
    /// `h` or `d` (`7d`, `12h`). Older entries are trimmed from the stream and its index.
    #[serde(default = "default_journal_retention", with = "retention")]
    #[schemars(with = "String", regex(pattern = r"^[1-9][0-9]*(s|m|h|d)$"), example = &"7d")]
    pub retention: std::time::Duration,
    /// Payload and record fields replaced by `***` in the journal, on top of `redact`.
    #[serde(default)]
    #[schemars(example = vec!["Description".to_string()])]
    pub mask: Vec<String>,
}

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig {
            enabled: true,
            max_len: default_journal_max_len(),
            retention: default_journal_retention(),
            mask: Vec::new(),
        }
    }
}

fn default_journal_max_len() -> usize {
    100_000
}

fn default_journal_retention() -> std::time::Duration {
    std::time::Duration::from_secs(7 * 86_400)
}

mod retention {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        let secs = d.as_secs();
        s.serialize_str(&match secs {
            s if s % 86_400 == 0 => format!("{}d", s / 86_400),
            s if s % 3600 == 0 => format!("{}h", s / 3600),
            s if s % 60 == 0 => format!("{}m", s / 60),
            s => format!("{s}s"),
        })
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        let t = text.trim();
        let parsed = t.len().checked_sub(1).and_then(|at| {
            let (n, unit) = t.split_at(at);
            let n: u64 = n.parse().ok().filter(|n| *n > 0)?;
            let scale = match unit {
                "s" => 1,
                "m" => 60,
                "h" => 3600,
                "d" => 86_400,
                _ => return None,
            };
            Some(Duration::from_secs(n * scale))
        });
        parsed.ok_or_else(|| {
            serde::de::Error::custom(format!("`{text}` is not a retention: write e.g. `7d`, `12h`, `30m`"))
        })
    }
}

/// Dead-letter retention.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterConfig {
    /// Dead letters kept in the Redis stream; older ones are trimmed (approximately, `MAXLEN ~`).
    #[serde(default = "default_dead_letter_max_len")]
    #[schemars(example = 100000)]
    pub max_len: usize,
}

impl Default for DeadLetterConfig {
    fn default() -> Self {
        DeadLetterConfig {
            max_len: default_dead_letter_max_len(),
        }
    }
}

fn default_dead_letter_max_len() -> usize {
    100_000
}

/// Where events come from.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// `pubsub` (Salesforce Pub/Sub API), `jsonl` (a file of events, DESIGN.md §2), `stdin` (the same format on
    /// standard input) or `emulator` (an in-process Pub/Sub emulator serving a JSONL file, for demos).
    #[schemars(example = &"pubsub")]
    pub kind: SourceKind,
    /// Settings of the `pubsub` source (also used by `emulator`).
    #[serde(default)]
    #[schemars(example = serde_json::json!({"endpoint": "${SF_PUBSUB_ENDPOINT:-https://api.pubsub.salesforce.com:7443}", "replay": {"start": "stored", "fallback": "latest", "on_invalid": "earliest"}}))]
    pub pubsub: Option<PubsubConfig>,
    /// Settings of the `emulator` source.
    #[serde(default)]
    #[schemars(example = serde_json::json!({"events": "events/order-lifecycle.jsonl"}))]
    pub emulator: Option<EmulatorSourceConfig>,
    /// Settings of the `jsonl` source.
    #[serde(default)]
    #[schemars(example = serde_json::json!({"path": "events/order-lifecycle.jsonl", "follow": false}))]
    pub jsonl: Option<JsonlConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKind {
    /// The Salesforce Pub/Sub API (gRPC).
    Pubsub,
    /// An in-process Pub/Sub emulator on loopback, subscribed to like a real org (demo, no org needed).
    Emulator,
    /// Events from a JSONL file.
    Jsonl,
    /// Events as JSONL on standard input.
    Stdin,
}

/// The in-process emulator source: the events it publishes, one after another as the previous one settles.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EmulatorSourceConfig {
    /// A JSONL file of events (DESIGN.md §2); their `record` maps are the org's records the REST reads see.
    #[schemars(example = &"events/order-lifecycle.jsonl")]
    pub events: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JsonlConfig {
    /// The JSONL file, one event per line.
    #[schemars(example = &"events/order-lifecycle.jsonl")]
    pub path: PathBuf,
    /// Keep reading as the file grows (like `tail -f`) instead of stopping at its end.
    #[serde(default)]
    #[schemars(example = true)]
    pub follow: bool,
}

/// Where `enrich` reads the current record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum EnricherKind {
    /// Salesforce REST reads of the current record, with the `salesforce` section's token.
    Salesforce,
    /// The `record` map recorded with each event (JSONL): deterministic, no network.
    #[default]
    Recorded,
    /// No enrichment: a route that declares `enrich` is a config error.
    None,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum OnUnmatched {
    /// Nothing happens (counted in metrics).
    #[default]
    Ignore,
    /// A log line per unmatched event.
    Log,
    /// The event is parked in the dead letters for an operator.
    DeadLetter,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of the HTTP listener (`/healthz`, `/readyz`, `/metrics`, `/rules`, `/api/...`, `POST /reload`).
    ///
    /// Keep it on loopback (`127.0.0.1:9464`) unless other machines must reach it: an address they can reach
    /// needs `token` (or `allow_unauthenticated: true`), and then reads need the token too.
    #[schemars(example = &"127.0.0.1:9464")]
    pub listen: String,
    /// The bearer token every change over HTTP needs (`POST /reload`), sent as `Authorization: Bearer TOKEN`.
    ///
    /// Take it from the environment (`${SWITCHYARD_HTTP_TOKEN}`), at least 16 characters (`openssl rand -hex
    /// 32`). When `listen` is not loopback, the reads (`/rules`, `/api/...`) need it too; `/healthz`, `/readyz` and
    /// `/metrics` never do. Without a token no change is accepted over HTTP. Never logged.
    #[serde(default, deserialize_with = "salesforce::non_empty_secret")]
    #[schemars(with = "Option<String>", example = &"${SWITCHYARD_HTTP_TOKEN}")]
    pub token: Option<Secret>,
    /// Serve the reads to anyone who reaches a `listen` that is not loopback, and start there without a `token`.
    ///
    /// The explicit opt-out, for a listener behind a proxy that authenticates. Changes still need `token`.
    #[serde(default)]
    #[schemars(example = &false)]
    pub allow_unauthenticated: bool,
}

/// The least length of `http.token`: shorter ones are guessable by a client that tries for long enough.
pub const MIN_TOKEN_LEN: usize = 16;

impl HttpConfig {
    /// Whether `listen` is a loopback address (`127.0.0.0/8`, `[::1]`, `localhost`), found without a lookup:
    /// another host name counts as reachable from elsewhere.
    pub fn loopback(&self) -> bool {
        if let Ok(addr) = self.listen.parse::<std::net::SocketAddr>() {
            return addr.ip().is_loopback();
        }
        self.listen
            .rsplit_once(':')
            .is_some_and(|(host, _)| host.eq_ignore_ascii_case("localhost"))
    }
}

/// The channel aliases used when no config says otherwise.
pub fn default_channels() -> IndexMap<String, String> {
    IndexMap::from([
        ("orders".to_string(), "/data/OrderChangeEvent".to_string()),
        ("order-items".to_string(), "/data/OrderItemChangeEvent".to_string()),
        (
            "fulfilment-requests".to_string(),
            "/event/Order_Fulfilment_Requested__e".to_string(),
        ),
    ])
}

/// A config file as loaded, with where it came from.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub path: PathBuf,
    pub config: Config,
    /// Where each key is in the file, for the problems found after parsing.
    pub spans: Spans,
}

impl LoadedConfig {
    /// Reads, substitutes, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, Problems> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Problems(vec![Problem::error(
                path,
                0,
                0,
                format!("cannot read the config file: {e}"),
            )])
        })?;
        Self::parse(path, &text, &|name| std::env::var(name).ok())
    }

    /// The embedded demo config.
    pub fn demo() -> Result<Self, Problems> {
        Self::parse(Path::new(DEMO_CONFIG_PATH), DEMO_CONFIG, &|name| {
            std::env::var(name).ok()
        })
    }

    /// Parses config text; `env` looks variables up (the real environment outside tests).
    pub fn parse(path: &Path, text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, Problems> {
        // Places come from the file as written (a substituted value can shift the columns after it), or from the
        // substituted text where only that is YAML.
        let spans = match Spans::of(text) {
            spans if spans == Spans::default() => None,
            spans => Some(spans),
        };
        let text = substitute_env(path, text, env)?;
        let spans = spans.unwrap_or_else(|| Spans::of(&text));
        let mut config: Config =
            serde_saphyr::from_str(&text).map_err(|e| Problems(vec![Problem::from_yaml(path, &e)]))?;
        if let Some(mode) = env("SWITCHYARD_MODE") {
            config.mode = match mode.as_str() {
                "cdc" => Mode::Cdc,
                "platform-event" => Mode::PlatformEvent,
                other => {
                    let (line, column) = spans.at(&["mode"]);
                    return Err(Problems(vec![Problem::error(
                        path,
                        line,
                        column,
                        format!("SWITCHYARD_MODE is `{other}`; expected `cdc` or `platform-event`"),
                    )]));
                }
            };
        }
        let loaded = LoadedConfig {
            path: path.to_path_buf(),
            config,
            spans,
        };
        let problems = loaded.validate();
        if problems.is_empty() {
            Ok(loaded)
        } else {
            Err(Problems(problems))
        }
    }

    /// Checks that need no I/O: channel names, sink names, source settings.
    pub fn validate(&self) -> Vec<Problem> {
        let c = &self.config;
        let mut problems = Vec::new();
        // A problem at the key it is about (or the nearest key above it that the file has).
        let err = |at: &[&str], m: String| {
            let (line, column) = self.spans.at(at);
            Problem::error(&self.path, line, column, m)
        };
        if let Some(http) = &c.http {
            if http
                .token
                .as_ref()
                .is_some_and(|t| t.expose().chars().count() < MIN_TOKEN_LEN)
            {
                problems.push(err(
                    &["http", "token"],
                    format!("`http.token` is shorter than {MIN_TOKEN_LEN} characters; use a longer one (`openssl rand -hex 32`)"),
                ));
            }
            if http.token.is_none() && !http.allow_unauthenticated && !http.loopback() {
                problems.push(err(
                    &["http", "listen"],
                    format!(
                        "the HTTP listener `{}` is reachable from other machines and the config has no `http.token`: \
                         add `token: ${{SWITCHYARD_HTTP_TOKEN}}` (or `allow_unauthenticated: true` to serve reads to \
                         anyone who reaches it; changes stay refused without a token), or listen on 127.0.0.1",
                        http.listen
                    ),
                ));
            }
        }
        for (alias, channel) in &c.channels {
            if Mode::of_channel(channel).is_none() {
                problems.push(err(&["channels", alias], format!(
                    "channel `{alias}` is `{channel}`; a channel starts with /data/ (CDC) or /event/ (platform event)"
                )));
            }
        }
        for name in BUILT_IN_SINKS.iter().filter(|n| c.sinks.contains_key(**n)) {
            problems.push(err(
                &["sinks", name],
                format!("the sink name `{name}` is built in; choose another name"),
            ));
        }
        if c.source.kind == SourceKind::Jsonl && c.source.jsonl.is_none() {
            problems.push(err(
                &["source", "kind"],
                "source `jsonl` needs `source.jsonl.path`".into(),
            ));
        }
        if c.source.kind == SourceKind::Emulator && c.source.emulator.is_none() {
            problems.push(err(
                &["source", "kind"],
                "source `emulator` needs `source.emulator.events`".into(),
            ));
        }
        // The in-process emulator brings its own credentials; everything else that talks to Salesforce needs them.
        let needs_salesforce = c.source.kind == SourceKind::Pubsub
            || (c.enricher() == EnricherKind::Salesforce && c.source.kind != SourceKind::Emulator);
        match (&c.salesforce, needs_salesforce) {
            (Some(sf), true) => {
                if let Err(e) = sf.flow() {
                    problems.push(err(&["salesforce"], e));
                }
                if sf.rest.concurrency == 0 || sf.rest.attempts == 0 {
                    let at = if sf.rest.concurrency == 0 {
                        "concurrency"
                    } else {
                        "attempts"
                    };
                    problems.push(err(
                        &["salesforce", "rest", at],
                        "`salesforce.rest.concurrency` and `attempts` must be at least 1".into(),
                    ));
                }
            }
            (None, true) if c.source.kind == SourceKind::Pubsub => problems.push(err(
                &["source", "kind"],
                "source `pubsub` needs the `salesforce` section (credentials)".into(),
            )),
            (None, true) => problems.push(err(
                &["enricher"],
                "`enricher: salesforce` needs the `salesforce` section (credentials)".into(),
            )),
            _ => {}
        }
        let pubsub = c.pubsub();
        if !(1..=MAX_BATCH_SIZE).contains(&pubsub.batch_size) {
            problems.push(err(
                &["source", "pubsub", "batch_size"],
                format!(
                    "`source.pubsub.batch_size` is {}; Salesforce allows 1 to {MAX_BATCH_SIZE} outstanding events",
                    pubsub.batch_size
                ),
            ));
        }
        if let Some(section) = &c.source.pubsub {
            for (channel, name) in &section.subscriptions {
                let at = ["source", "pubsub", "subscriptions", channel.as_str()];
                if !c.channels.contains_key(channel) && Mode::of_channel(channel).is_none() {
                    problems.push(err(&at, format!(
                        "`source.pubsub.subscriptions` names `{channel}`, which is neither a channel alias ({}) nor a /data/... or /event/... channel",
                        c.channels.keys().cloned().collect::<Vec<_>>().join(", ")
                    )));
                }
                let valid = name.chars().next().is_some_and(|ch| ch.is_ascii_alphabetic())
                    && name.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_');
                if !valid {
                    problems.push(err(&at, format!(
                        "the managed subscription for `{channel}` is `{name}`; give the ManagedEventSubscription's DeveloperName (letters, digits and _)"
                    )));
                }
            }
        }
        if !(pubsub.endpoint.starts_with("https://") || pubsub.endpoint.starts_with("http://")) {
            problems.push(err(
                &["source", "pubsub", "endpoint"],
                format!(
                    "`source.pubsub.endpoint` is `{}`; write it as https://host:port (or http:// for loopback tests)",
                    pubsub.endpoint
                ),
            ));
        }
        if c.rules.is_empty() {
            problems.push(err(&["rules"], "`rules` names no file or folder".into()));
        }
        for (name, sink) in &c.sinks {
            if sink.redis().is_some() && c.redis.is_none() {
                problems.push(err(&["sinks", name, "redis"], format!(
                    "sink `{name}` has its own `redis`, but the main `redis` section is missing (idempotency markers, dead letters and positions live there)"
                )));
            }
            match sink {
                SinkConfig::Queue(q) if q.format == QueueFormat::Stream => {
                    if q.job_options != JobOptions::default() {
                        problems.push(err(&["sinks", name, "job_options"], format!(
                            "sink `{name}`: `job_options` are BullMQ options; a `format: stream` queue does not take them"
                        )));
                    }
                    if q.max_len == 0 {
                        problems.push(err(
                            &["sinks", name, "max_len"],
                            format!("sink `{name}`: `max_len` must be at least 1"),
                        ));
                    }
                }
                SinkConfig::Webhook(w) => {
                    let url = w.url.expose();
                    if !(url.starts_with("http://") || url.starts_with("https://")) {
                        problems.push(err(
                            &["sinks", name, "url"],
                            format!("sink `{name}`: the webhook `url` must start with http:// or https://"),
                        ));
                    }
                    if w.timeout_ms == 0 {
                        problems.push(err(
                            &["sinks", name, "timeout_ms"],
                            format!("sink `{name}`: `timeout_ms` must be at least 1"),
                        ));
                    }
                }
                _ => {}
            }
        }
        let endpoints = c
            .redis
            .iter()
            .map(|r| ("redis".to_string(), vec!["redis"], r.endpoint()))
            .chain(c.sinks.iter().filter_map(|(n, s)| {
                s.redis().map(|r| {
                    (
                        format!("sink `{n}`: redis"),
                        vec!["sinks", n.as_str(), "redis"],
                        r.clone(),
                    )
                })
            }));
        for (what, at, e) in endpoints {
            let key = |k: &'static str| [at.as_slice(), &[k]].concat();
            match e.topology() {
                Err(message) => problems.push(err(&at, format!("{what}: {message}"))),
                Ok(Topology::Server(url)) => {
                    let url = url.expose();
                    if !["redis://", "rediss://", "redis+unix://", "unix://"]
                        .iter()
                        .any(|scheme| url.starts_with(scheme))
                    {
                        problems.push(err(
                            &key("url"),
                            format!("{what}: the URL must start with redis://, rediss:// (TLS) or redis+unix://"),
                        ));
                    }
                    if e.username.is_some() || e.password.is_some() || e.db != 0 {
                        problems.push(err(&at, format!(
                            "{what}: `username`, `password` and `db` go with `sentinels` or `cluster`; with a `url`, write them in it (redis://user:password@host:port/db)"
                        )));
                    }
                }
                Ok(Topology::Sentinel { sentinels, .. }) | Ok(Topology::Cluster(sentinels)) => {
                    let field = if e.cluster.is_empty() { "sentinels" } else { "cluster" };
                    for node in sentinels {
                        let port = node
                            .rsplit_once(':')
                            .and_then(|(host, port)| (!host.is_empty()).then(|| port.parse::<u16>().ok()).flatten());
                        if port.is_none() {
                            problems.push(err(
                                &key(field),
                                format!("{what}: `{node}` in `{field}` is not host:port"),
                            ));
                        }
                    }
                    if !e.cluster.is_empty() && e.db != 0 {
                        problems.push(err(&key("db"), format!("{what}: a Redis Cluster has only database 0")));
                    }
                }
            }
            if e.sentinels.is_empty() && (e.sentinel_username.is_some() || e.sentinel_password.is_some()) {
                problems.push(err(
                    &at,
                    format!("{what}: `sentinel_username` and `sentinel_password` go with `sentinels`"),
                ));
            }
            if e.connect_timeout_ms == 0 || e.command_timeout_ms == 0 {
                let zero = if e.connect_timeout_ms == 0 {
                    "connect_timeout_ms"
                } else {
                    "command_timeout_ms"
                };
                problems.push(err(
                    &key(zero),
                    format!("{what}: `connect_timeout_ms` and `command_timeout_ms` must be at least 1"),
                ));
            }
        }
        // On a Redis Cluster, what one script touches must live in one slot: a hash tag in every prefix.
        let is_cluster = |e: &RedisEndpoint| matches!(e.topology(), Ok(Topology::Cluster(_)));
        let main_cluster = c.redis.as_ref().is_some_and(|r| is_cluster(&r.endpoint()));
        if let Some(r) = c.redis.as_ref().filter(|_| main_cluster)
            && !redis::has_hash_tag(&r.key_prefix)
        {
            problems.push(err(&["redis", "key_prefix"], format!(
                "redis: on a Redis Cluster `key_prefix` needs a hash tag so that each script's keys share a slot, e.g. `{{switchyard}}:` (it is `{}`)",
                r.key_prefix
            )));
        }
        for (name, sink) in &c.sinks {
            let on_cluster = sink.redis().map_or(main_cluster, is_cluster);
            if let SinkConfig::Queue(q) = sink
                && on_cluster
                && q.format == QueueFormat::Bullmq
                && !redis::has_hash_tag(&q.prefix)
            {
                problems.push(err(&["sinks", name, "prefix"], format!(
                    "sink `{name}`: on a Redis Cluster the BullMQ `prefix` needs a hash tag, as BullMQ requires, e.g. `{{bull}}` (it is `{}`); the Node worker uses the same prefix",
                    q.prefix
                )));
            }
        }
        if c.lease.enabled == Some(true) {
            if c.redis.is_none() {
                problems.push(err(
                    &["lease", "enabled"],
                    "`lease.enabled` needs the `redis` section (the leases live there)".into(),
                ));
            } else if !c.redis_positions() {
                problems.push(err(
                    &["lease", "enabled"],
                    "`lease.enabled` needs positions in Redis (`checkpoint.store: redis`): fenced writes go there"
                        .into(),
                ));
            }
        }
        if c.lease.ttl_ms < 300 {
            problems.push(err(
                &["lease", "ttl_ms"],
                format!(
                    "`lease.ttl_ms` is {}; at least 300 ms (it is renewed every third of it)",
                    c.lease.ttl_ms
                ),
            ));
        }
        if c.delivery.concurrency == 0 {
            problems.push(err(
                &["delivery", "concurrency"],
                "`delivery.concurrency` must be at least 1".into(),
            ));
        }
        match &c.checkpoint {
            Some(CheckpointConfig {
                store: CheckpointStoreKind::File,
                path: None,
            }) => problems.push(err(
                &["checkpoint", "store"],
                "`checkpoint.store: file` needs `checkpoint.path`".into(),
            )),
            Some(CheckpointConfig {
                store: CheckpointStoreKind::Redis,
                ..
            }) if c.redis.is_none() => problems.push(err(
                &["checkpoint", "store"],
                "`checkpoint.store: redis` needs the `redis` section".into(),
            )),
            _ => {}
        }
        problems
    }

    /// A path from the config, resolved against the config file's directory.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        resolve_against(&self.path, path)
    }

    pub fn rule_paths(&self) -> Vec<PathBuf> {
        self.config.rules.iter().map(|p| self.resolve(p)).collect()
    }

    /// The `rules` a config file names, read leniently from a file that does not load (for `validate`, which then
    /// still checks those rules against the built-in names); empty when even that cannot be read.
    pub fn rule_paths_of_unloadable(path: &Path) -> Vec<PathBuf> {
        #[derive(Deserialize)]
        struct RulesOnly {
            #[serde(default)]
            rules: Vec<PathBuf>,
        }
        let Ok(text) = std::fs::read_to_string(path) else {
            return Vec::new();
        };
        let text = substitute_env(path, &text, &|name| std::env::var(name).ok()).unwrap_or(text);
        let rules = serde_saphyr::from_str::<RulesOnly>(&text)
            .map(|r| r.rules)
            .unwrap_or_default();
        rules.iter().map(|p| resolve_against(path, p)).collect()
    }
}

/// `path` from a config file at `config`, resolved against that file's directory.
fn resolve_against(config: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        return path.to_path_buf();
    }
    match config.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(path),
        _ => path.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{KeepJobs, KeepLimits};

    /// A Redis is one server, a Sentinel-managed primary or a Cluster; mixing them, a sentinel list without its
    /// master, or a Cluster prefix without a hash tag is refused at its key.
    #[test]
    fn redis_topologies_are_checked_where_they_are_written() {
        let problems = |redis: &str, sink_prefix: &str| {
            let text = format!(
                "source: {{ kind: stdin }}\nrules: [rules/]\nredis: {redis}\n\
                 sinks:\n  q: {{ kind: queue, queue: provisioning, job_name: p, prefix: \"{sink_prefix}\" }}\n"
            );
            match LoadedConfig::parse(Path::new("c.yaml"), &text, &|_| None) {
                Ok(_) => Vec::new(),
                Err(e) => {
                    e.0.into_iter()
                        .map(|p| format!("{}:{} {}", p.line, p.column, p.message))
                        .collect()
                }
            }
        };
        let sentinel = "{ sentinels: [\"s1:26379\", \"s2:26379\"], master: mymaster, password: pw }";
        assert_eq!(problems(sentinel, "bull"), Vec::<String>::new());
        let cluster = "{ cluster: [\"n1:6379\", \"n2:6379\"], key_prefix: \"{sy}:\" }";
        assert_eq!(problems(cluster, "{bull}"), Vec::<String>::new());
        let one = |redis: &str, prefix: &str| {
            let found = problems(redis, prefix);
            assert_eq!(found.len(), 1, "{redis}: {found:#?}");
            found[0].clone()
        };
        assert!(one("{ sentinels: [\"s1:26379\"] }", "bull").contains("needs `master`"));
        assert!(one("{ url: \"redis://h\", cluster: [\"n1:1\"] }", "bull").contains("only one of"));
        assert!(one("{ }", "bull").contains("give `url`"));
        assert!(one("{ sentinels: [\"s1\"], master: m }", "bull").contains("`s1` in `sentinels` is not host:port"));
        assert!(one("{ url: \"redis://h\", password: pw }", "bull").contains("write them in it"));
        let tag = one("{ cluster: [\"n1:6379\"] }", "{bull}");
        assert!(
            tag.starts_with("3:") && tag.contains("`key_prefix` needs a hash tag"),
            "{tag}"
        );
        let tag = one(cluster, "bull");
        assert!(
            tag.starts_with("5:") && tag.contains("BullMQ `prefix` needs a hash tag"),
            "{tag}"
        );
    }

    /// Every problem found after parsing names the line and column of the key it is about.
    #[test]
    fn config_problems_point_at_their_keys() {
        let text = "\
source: { kind: jsonl, jsonl: { path: e.jsonl } }
channels:
  orders: /topic/Orders
rules: [rules/]
delivery:
  concurrency: 0
lease:
  ttl_ms: 100
checkpoint: { store: file }
sinks:
  hook:
    kind: webhook
    url: ftp://example.invalid/hook
    timeout_ms: 0
  cache:
    kind: cache-invalidate
    redis: { url: \"redis://127.0.0.1:6379\", connect_timeout_ms: 0 }
";
        let problems = LoadedConfig::parse(Path::new("c.yaml"), text, &|_| None).unwrap_err().0;
        let at = |needle: &str| {
            let p = problems
                .iter()
                .find(|p| p.message.contains(needle))
                .unwrap_or_else(|| panic!("no problem says `{needle}`: {problems:#?}"));
            (p.line, p.column)
        };
        assert_eq!(at("a channel starts with /data/"), (3, 3));
        assert_eq!(at("`delivery.concurrency`"), (6, 3));
        assert_eq!(at("`lease.ttl_ms` is 100"), (8, 3));
        assert_eq!(at("`checkpoint.store: file` needs"), (9, 15));
        assert_eq!(at("the webhook `url` must start"), (13, 5));
        assert_eq!(at("sink `hook`: `timeout_ms`"), (14, 5));
        assert_eq!(at("has its own `redis`, but the main"), (17, 5));
        assert_eq!(at("sink `cache`: redis: `connect_timeout_ms`"), (17, 45));
        assert!(problems.iter().all(|p| p.line > 0), "{problems:#?}");
    }

    fn env(name: &str) -> Option<String> {
        match name {
            "REDIS_URL" => Some("redis://127.0.0.1:7777".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn substitutes_set_variables_and_defaults() {
        let out = substitute_env(
            Path::new("c.yaml"),
            "a: ${REDIS_URL}\nb: ${NOPE:-x}\nc: ${EMPTY:-d}\nd: $$5 $x\n",
            &env,
        )
        .unwrap();
        assert_eq!(out, "a: redis://127.0.0.1:7777\nb: x\nc: d\nd: $5 $x\n");
    }

    #[test]
    fn unset_variable_without_default_is_an_error_with_position() {
        let err = substitute_env(
            Path::new("c.yaml"),
            "mode: cdc\nredis: { url: \"${REDIS_URL_X}\" }\n# ${IGNORED}\n",
            &env,
        )
        .unwrap_err();
        assert_eq!(err.0.len(), 1);
        assert_eq!(
            err.0[0].to_string(),
            "c.yaml:2:16: error: environment variable `REDIS_URL_X` is not set and has no default (write `${REDIS_URL_X:-default}` for one)"
        );
    }

    #[test]
    fn secrets_never_print() {
        let text = "source: { kind: stdin }\nrules: [r.yaml]\nredis: { url: \"redis://u:hunter2@h:6379\" }\n";
        let loaded = LoadedConfig::parse(Path::new("c.yaml"), text, &|_| None).unwrap();
        let shown = format!(
            "{:?} {}",
            loaded.config,
            loaded.config.redis.as_ref().unwrap().url.as_ref().unwrap()
        );
        assert!(!shown.contains("hunter2"), "{shown}");
        assert_eq!(
            loaded.config.redis.unwrap().url.unwrap().expose(),
            "redis://u:hunter2@h:6379"
        );
    }

    #[test]
    fn demo_config_loads() {
        let loaded =
            LoadedConfig::parse(Path::new(DEMO_CONFIG_PATH), DEMO_CONFIG, &|_| None).expect("demo config is valid");
        assert!(loaded.config.redis.is_none());
        assert_eq!(loaded.rule_paths(), vec![PathBuf::from("examples/../rules/")]);
    }

    #[test]
    fn switchyard_mode_overrides_mode() {
        let text = "mode: cdc\nsource: { kind: stdin }\nrules: [r.yaml]\n";
        let loaded = LoadedConfig::parse(Path::new("c.yaml"), text, &|n| {
            (n == "SWITCHYARD_MODE").then(|| "platform-event".into())
        })
        .unwrap();
        assert_eq!(loaded.config.mode, Mode::PlatformEvent);
    }

    #[test]
    fn job_options_take_bullmq_keep_forms_and_merge_key_by_key() {
        let text = "source: { kind: stdin }\nrules: [r.yaml]\nredis: { url: \"redis://h\" }\nsinks:\n  q:\n    kind: queue\n    queue: p\n    job_name: j\n    job_options: { attempts: 3, remove_on_complete: { age: 3600, count: 10 }, remove_on_fail: true }\n";
        let loaded = LoadedConfig::parse(Path::new("c.yaml"), text, &|_| None).unwrap();
        let SinkConfig::Queue(q) = &loaded.config.sinks["q"] else {
            panic!("a queue sink")
        };
        assert_eq!(
            q.job_options.remove_on_complete,
            Some(KeepJobs::Limits(KeepLimits {
                age: Some(3600),
                count: Some(10)
            }))
        );
        assert_eq!(q.job_options.remove_on_fail, Some(KeepJobs::Remove(true)));
        let over: JobOptions =
            serde_json::from_value(serde_json::json!({"attempts": 7, "remove_on_fail": 50})).unwrap();
        let merged = q.job_options.merged(&over);
        assert_eq!(merged.attempts, Some(7));
        assert_eq!(merged.remove_on_fail, Some(KeepJobs::Count(50)));
        assert_eq!(merged.remove_on_complete, q.job_options.remove_on_complete);
    }

    #[test]
    fn sink_settings_are_checked_before_anything_connects() {
        let text = "source: { kind: stdin }\nrules: [r.yaml]\nsinks:\n  \
                    s: { kind: queue, format: stream, queue: s, job_name: j, job_options: { attempts: 2 }, redis: { url: \"redis://h\" } }\n  \
                    w: { kind: webhook, url: \"ftp://x\" }\n  \
                    c: { kind: cache-invalidate, redis: { url: \"http://cache\", command_timeout_ms: 0 } }\n";
        let err = LoadedConfig::parse(Path::new("c.yaml"), text, &|_| None)
            .unwrap_err()
            .to_string();
        for expected in [
            "sink `s` has its own `redis`, but the main `redis` section is missing",
            "sink `s`: `job_options` are BullMQ options",
            "sink `w`: the webhook `url` must start with http:// or https://",
            "sink `c`: redis: the URL must start with redis://",
            "sink `c`: redis: `connect_timeout_ms` and `command_timeout_ms` must be at least 1",
        ] {
            assert!(err.contains(expected), "missing `{expected}` in:\n{err}");
        }
    }

    #[test]
    fn webhook_header_secrets_never_print() {
        let text = "source: { kind: stdin }\nrules: [r.yaml]\nsinks:\n  w: { kind: webhook, url: \"https://h/x?token=${T}\", headers: { Authorization: \"Bearer ${T}\" }, signature: { secret: \"${T}\" } }\n";
        let loaded =
            LoadedConfig::parse(Path::new("c.yaml"), text, &|n| (n == "T").then(|| "s3cr3t-tok".into())).unwrap();
        let shown = format!("{:?}", loaded.config);
        assert!(!shown.contains("s3cr3t-tok"), "{shown}");
    }

    #[test]
    fn unknown_sink_kind_is_rejected_with_position() {
        let text = "source: { kind: stdin }\nrules: [r.yaml]\nsinks:\n  x: { kind: kafka }\n";
        let err = LoadedConfig::parse(Path::new("c.yaml"), text, &|_| None).unwrap_err();
        assert!(err.to_string().starts_with("c.yaml:4:"), "{err}");
    }

    /// One file serves every auth flow: unset `${SF_...:-}` values are absent, and the flow follows from what is set.
    #[test]
    fn salesforce_auth_flow_follows_the_environment() {
        let text = "source: { kind: pubsub, pubsub: { endpoint: \"${SF_PUBSUB_ENDPOINT:-}\", enabled: \"${SF_EVENTS_ENABLED:-true}\" } }\n\
                    rules: [r.yaml]\nsalesforce:\n  login_url: \"${SF_LOGIN_URL:-}\"\n  client_id: \"${SF_CLIENT_ID:-}\"\n  \
                    client_secret: \"${SF_CLIENT_SECRET:-}\"\n  username: \"${SF_USERNAME:-}\"\n  \
                    jwt_key_file: \"${SF_JWT_KEY_FILE:-}\"\n  access_token: \"${SF_ACCESS_TOKEN:-}\"\n  \
                    instance_url: \"${SF_INSTANCE_URL:-}\"\n  api_version: ${SF_API_VERSION:-62.0}\n";
        let parse = |vars: &[(&str, &str)]| {
            let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            LoadedConfig::parse(Path::new("c.yaml"), text, &|name| {
                vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
            })
        };
        let err = parse(&[]).unwrap_err().to_string();
        assert!(err.contains("no credentials") && err.contains("SF_CLIENT_ID"), "{err}");
        let c = parse(&[
            ("SF_ACCESS_TOKEN", "tok"),
            ("SF_INSTANCE_URL", "http://127.0.0.1:1"),
            ("SF_EVENTS_ENABLED", "false"),
        ])
        .unwrap();
        let sf = c.config.salesforce.as_ref().unwrap();
        assert_eq!(sf.flow(), Ok(AuthFlow::AccessToken));
        assert_eq!(sf.api_version, "62.0");
        assert!(!c.config.pubsub().enabled);
        assert_eq!(c.config.pubsub().endpoint, DEFAULT_PUBSUB_ENDPOINT);
        assert_eq!(
            c.config.enricher(),
            EnricherKind::Salesforce,
            "the default with a pubsub source"
        );
        let c = parse(&[
            ("SF_CLIENT_ID", "id"),
            ("SF_USERNAME", "u"),
            ("SF_JWT_KEY_FILE", "k.pem"),
            ("SF_LOGIN_URL", "https://login.salesforce.com"),
            ("SF_API_VERSION", "v61"),
        ])
        .unwrap();
        let sf = c.config.salesforce.as_ref().unwrap();
        assert_eq!(sf.flow(), Ok(AuthFlow::JwtBearer));
        assert_eq!(sf.api_version, "61.0");
        let err = parse(&[("SF_CLIENT_ID", "id"), ("SF_CLIENT_SECRET", "s")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("client-credentials") && err.contains("SF_LOGIN_URL"),
            "{err}"
        );
        assert!(!err.contains(": s"), "no secret in the error: {err}");
    }
}
