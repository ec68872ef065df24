//! The `sinks` section: one closed enum of the built-in sink kinds (STYLE.md), with the settings of each.

use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{RedisEndpoint, Secret};
use crate::plan::JobOptions;

/// A named sink. The kinds are closed: `queue`, `cache-invalidate`, `log`, `webhook`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum SinkConfig {
    /// Enqueue a job: a BullMQ job a stock BullMQ/NestJS worker consumes, or a Redis Stream entry.
    Queue(QueueSinkConfig),
    /// UNLINK cache keys, and keys matching patterns (via SCAN), optionally PUBLISH a message.
    CacheInvalidate(CacheSinkConfig),
    /// Write one structured log line per action.
    Log(LogSinkConfig),
    /// POST the action's JSON body to a URL.
    Webhook(WebhookSinkConfig),
}

impl SinkConfig {
    pub fn kind(&self) -> SinkKind {
        match self {
            SinkConfig::Queue(_) => SinkKind::Queue,
            SinkConfig::CacheInvalidate(_) => SinkKind::CacheInvalidate,
            SinkConfig::Log(_) => SinkKind::Log,
            SinkConfig::Webhook(_) => SinkKind::Webhook,
        }
    }

    /// The sink's own Redis, when it has one.
    pub fn redis(&self) -> Option<&RedisEndpoint> {
        match self {
            SinkConfig::Queue(q) => q.redis.as_ref(),
            SinkConfig::CacheInvalidate(c) => c.redis.as_ref(),
            SinkConfig::Log(_) | SinkConfig::Webhook(_) => None,
        }
    }

    /// Whether the sink writes to Redis (its own, or the main one).
    pub fn uses_redis(&self) -> bool {
        matches!(self, SinkConfig::Queue(_) | SinkConfig::CacheInvalidate(_))
    }
}

/// The kind of a sink, which decides the keys its actions take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SinkKind {
    Queue,
    CacheInvalidate,
    Log,
    Webhook,
    DeadLetter,
    SalesforceUpdate,
}

impl SinkKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SinkKind::Queue => "queue",
            SinkKind::CacheInvalidate => "cache-invalidate",
            SinkKind::Log => "log",
            SinkKind::Webhook => "webhook",
            SinkKind::DeadLetter => "dead-letter",
            SinkKind::SalesforceUpdate => "salesforce-update",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QueueSinkConfig {
    /// `bullmq` (a BullMQ job) or `stream` (an XADD to the Redis Stream named by `queue`, for consumers
    /// that are not BullMQ).
    #[serde(default)]
    #[schemars(example = &"bullmq")]
    pub format: QueueFormat,
    /// The BullMQ queue name; with `format: stream`, the stream's key as is.
    #[schemars(example = &"provisioning")]
    pub queue: String,
    /// The BullMQ job name (with `format: stream`, the entry's `name` field).
    #[schemars(example = &"provision-order")]
    pub job_name: String,
    /// The BullMQ key prefix (BullMQ's default is `bull`). Not used by `format: stream`.
    #[serde(default = "default_bull_prefix")]
    #[schemars(example = &"bull")]
    pub prefix: String,
    /// Default BullMQ job options; an action's `job_options` override them key by key. Not used by
    /// `format: stream`.
    #[serde(default)]
    #[schemars(example = serde_json::json!({"attempts": 5, "backoff": {"type": "exponential", "delay": 1000}, "remove_on_complete": {"age": 86400, "count": 1000}, "remove_on_fail": {"age": 604800}}))]
    pub job_options: JobOptions,
    /// `format: stream` only: entries kept in the stream; older ones are trimmed (`MAXLEN ~`, approximately,
    /// which keeps trimming cheap).
    #[serde(default = "default_stream_max_len")]
    #[schemars(example = 100000)]
    pub max_len: usize,
    /// This sink's own Redis (default: the main `redis`). A BullMQ Redis needs `maxmemory-policy
    /// noeviction`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(example = serde_json::json!({"url": "${QUEUE_REDIS_URL}"}))]
    pub redis: Option<RedisEndpoint>,
}

fn default_bull_prefix() -> String {
    "bull".into()
}

fn default_stream_max_len() -> usize {
    100_000
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum QueueFormat {
    /// A BullMQ job (same Lua scripts as the Node library); the job id is the action's idempotency key.
    #[default]
    Bullmq,
    /// A Redis Stream entry (XADD) with the fields `job_id`, `name`, `data` (JSON), `idempotency_key`,
    /// `event_id`, `route`, `record_id`, `rules_version`, `correlation_id`, `at_ms`.
    Stream,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CacheSinkConfig {
    /// This sink's own Redis (default: the main `redis`), e.g. the application's cache server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(example = serde_json::json!({"url": "${CACHE_REDIS_URL}"}))]
    pub redis: Option<RedisEndpoint>,
}

/// POSTs each action's `body` as JSON.
///
/// Headers sent: `Content-Type: application/json`, `Idempotency-Key` (the action's `idempotency_key`, when
/// it has one), the configured `headers`, the action's `headers`, and with `signature`:
/// `X-Switchyard-Timestamp: <unix seconds>` and `X-Switchyard-Signature: sha256=<hex>`, the HMAC-SHA256 of
/// `<timestamp>.<body>` under the secret. 2xx is success; 408, 429, 5xx, timeouts and connection errors are
/// retried; any other status is permanent (dead letter).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookSinkConfig {
    /// The URL to POST to (`http://` or `https://`).
    #[schemars(with = "String", example = &"https://hooks.example.com/switchyard")]
    pub url: Secret,
    /// Headers sent with every request; values usually come from the environment
    /// (`Authorization: "Bearer ${HOOK_TOKEN}"`) and never appear in logs.
    #[serde(default)]
    #[schemars(with = "IndexMap<String, String>", example = serde_json::json!({"Authorization": "Bearer ${HOOK_TOKEN}"}))]
    pub headers: IndexMap<String, Secret>,
    /// How long one request may take (connect, send, response) before it fails as transient.
    #[serde(default = "default_webhook_timeout_ms")]
    #[schemars(example = 10000)]
    pub timeout_ms: u64,
    /// Sign every body with HMAC-SHA256 so the receiver can check it came from switchyard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(example = serde_json::json!({"secret": "${HOOK_SIGNING_SECRET}"}))]
    pub signature: Option<WebhookSignature>,
}

fn default_webhook_timeout_ms() -> u64 {
    10_000
}

/// The HMAC-SHA256 signature of webhook bodies.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookSignature {
    /// The shared secret (from the environment: `${HOOK_SIGNING_SECRET}`).
    #[schemars(with = "String", example = &"${HOOK_SIGNING_SECRET}")]
    pub secret: Secret,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LogSinkConfig {}

/// The sinks a rules file is checked against when no config is given.
pub fn default_sinks() -> IndexMap<String, SinkConfig> {
    IndexMap::from([
        (
            "enqueue-provisioning".to_string(),
            SinkConfig::Queue(QueueSinkConfig {
                format: QueueFormat::Bullmq,
                queue: "provisioning".into(),
                job_name: "provision-order".into(),
                prefix: default_bull_prefix(),
                job_options: JobOptions::default(),
                max_len: default_stream_max_len(),
                redis: None,
            }),
        ),
        (
            "invalidate-cache".to_string(),
            SinkConfig::CacheInvalidate(CacheSinkConfig::default()),
        ),
        ("log".to_string(), SinkConfig::Log(LogSinkConfig {})),
    ])
}

/// The name of the built-in dead-letter sink.
pub const DEAD_LETTER_SINK: &str = "dead-letter";

/// The name of the built-in write-back sink: PATCH a record through the Salesforce REST API with the config's
/// `salesforce` credentials (the source's OAuth).
pub const SALESFORCE_UPDATE_SINK: &str = "salesforce-update";

/// The sink names a config cannot use: the built-in sinks.
pub const BUILT_IN_SINKS: [&str; 2] = [DEAD_LETTER_SINK, SALESFORCE_UPDATE_SINK];
