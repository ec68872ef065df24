//! Built-in sinks: a closed set, built by one `match` from the config (STYLE.md).

pub mod cache;
pub mod connection;
pub mod dead_letter;
pub mod log;
pub mod memory;
pub mod queue;
pub mod webhook;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use redis::aio::ConnectionManager;

use crate::checkpoint::CheckpointStore;
use crate::config::{CheckpointStoreKind, Config, LoadedConfig, QueueFormat, RedisConfig, RedisEndpoint, SinkConfig};
use crate::event::Event;
use crate::idempotency::{Idempotency, Ttls};
use crate::plan::{Action, Op};
pub use connection::RedisCheck;
pub use dead_letter::{DeadLetter, DeadLetters};
pub use memory::MemoryBackend;

/// Why a sink call failed, and whether trying again can help.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SinkError {
    /// The sink or its connection failed for now (connection refused, timeout, Redis LOADING): retry.
    #[error("transient: {0}")]
    Transient(String),
    /// An established connection died mid-call (broken pipe, reset): transient, and retried at once, since the
    /// connection is being replaced already; waiting would only let the next drop catch the retry too.
    #[error("transient: {0}")]
    Dropped(String),
    /// The action cannot succeed as it is (a wrong type, a refused id): dead-letter it.
    #[error("permanent: {0}")]
    Permanent(String),
    /// This replica lost the channel lease the event came under: the action is abandoned, neither retried nor
    /// dead-lettered; the replica that holds the lease now redelivers the event.
    #[error("fenced: {0}")]
    Fenced(String),
}

impl SinkError {
    pub fn is_transient(&self) -> bool {
        matches!(self, SinkError::Transient(_) | SinkError::Dropped(_))
    }

    /// The same error, its message prefixed with the step that failed (e.g. `idempotency claim`).
    pub fn context(self, step: &str) -> SinkError {
        match self {
            SinkError::Transient(m) => SinkError::Transient(format!("{step}: {m}")),
            SinkError::Dropped(m) => SinkError::Dropped(format!("{step}: {m}")),
            SinkError::Permanent(m) => SinkError::Permanent(format!("{step}: {m}")),
            SinkError::Fenced(m) => SinkError::Fenced(format!("{step}: {m}")),
        }
    }

    /// Redis errors: connection-level problems and a server that is loading or busy are transient.
    pub fn from_redis(err: &redis::RedisError) -> SinkError {
        let established_dropped = err.is_connection_dropped() && !err.is_connection_refusal();
        if established_dropped {
            return SinkError::Dropped(err.to_string());
        }
        let transient = err.is_io_error()
            || err.is_connection_refusal()
            || err.is_connection_dropped()
            || err.is_timeout()
            || matches!(
                err.code(),
                Some("LOADING" | "BUSY" | "TRYAGAIN" | "MASTERDOWN" | "CLUSTERDOWN")
            )
            || err.is_unrecoverable_error();
        if transient {
            SinkError::Transient(err.to_string())
        } else {
            SinkError::Permanent(err.to_string())
        }
    }
}

/// What the call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkOutcome {
    Done,
}

/// Who an action is run for: stamped on logs and dead letters.
pub struct ActionCx<'a> {
    pub event: &'a Event,
    pub rules_version: &'a str,
}

/// One built sink.
pub enum Sink {
    Queue(queue::QueueSink),
    CacheInvalidate(cache::CacheSink),
    Log(log::LogSink),
    Webhook(webhook::WebhookSink),
}

impl Sink {
    pub async fn run(&self, action: &Action, cx: &ActionCx<'_>) -> Result<SinkOutcome, SinkError> {
        match (self, &action.op) {
            (
                Sink::Queue(s),
                Op::Enqueue {
                    job_id,
                    data,
                    options,
                    idempotency_key,
                },
            ) => {
                let meta = queue::EntryMeta {
                    idempotency_key,
                    event_id: &cx.event.id,
                    route: &action.route,
                    record_id: action.record_id.as_deref(),
                    rules_version: cx.rules_version,
                    correlation_id: action.correlation_id(),
                };
                s.enqueue(job_id, data, options, &meta).await
            }
            (
                Sink::Webhook(s),
                Op::Webhook {
                    idempotency_key,
                    body,
                    headers,
                },
            ) => s.post(idempotency_key.as_deref(), body, headers).await,
            (
                Sink::CacheInvalidate(s),
                Op::Invalidate {
                    keys,
                    patterns,
                    publish,
                },
            ) => s.invalidate(keys, patterns, publish.as_ref()).await,
            (Sink::Log(s), Op::Log { level, message, fields }) => s.write(action, *level, message, fields, cx),
            _ => Err(SinkError::Permanent(format!(
                "sink `{}` cannot run a `{}` action",
                action.sink,
                op_name(&action.op)
            ))),
        }
    }
}

fn op_name(op: &Op) -> &'static str {
    match op {
        Op::Enqueue { .. } => "enqueue",
        Op::Invalidate { .. } => "invalidate",
        Op::Log { .. } => "log",
        Op::Webhook { .. } => "webhook",
        Op::DeadLetter { .. } => "dead-letter",
    }
}

/// Every sink of the config by name, plus the stores the dispatcher and pipeline need: dead letters,
/// idempotency markers and source positions (all in the same Redis, or all in memory).
pub struct Sinks {
    /// The sinks by name; swapped as a whole when a config reload changes sink settings.
    by_name: ArcSwap<HashMap<String, Arc<Sink>>>,
    /// The main Redis (its config, endpoint and connection), shared by sinks without their own.
    main: Option<(RedisConfig, RedisEndpoint, ConnectionManager)>,
    pub dead_letters: DeadLetters,
    pub idempotency: Idempotency,
    pub checkpoints: CheckpointStore,
    /// The in-memory backend when the config has no `redis`.
    pub memory: Option<Arc<MemoryBackend>>,
    /// Every Redis server in use, for `/readyz`; a reload that moves a sink to another Redis updates it.
    pub redis_checks: Arc<ArcSwap<Vec<RedisCheck>>>,
}

/// Why sinks could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot connect to Redis at {url}: {}", redact_url(&source.to_string()))]
    Redis { url: String, source: redis::RedisError },
    #[error("cannot connect to Redis at {url}: no connection within {ms} ms (connect_timeout_ms)")]
    RedisTimeout { url: String, ms: u64 },
    #[error("cannot read the Redis CA file {}: {source}", path.display())]
    CaFile { path: PathBuf, source: std::io::Error },
    #[error("webhook sink `{sink}`: {message}")]
    Webhook { sink: String, message: String },
    #[error("cannot open BullMQ queue `{queue}` for sink `{sink}`: {message}")]
    Queue {
        sink: String,
        queue: String,
        message: String,
    },
}

impl Sinks {
    /// Connects what the config names: Redis when `redis` is set (and each sink's own Redis), memory
    /// otherwise.
    pub async fn build(loaded: &LoadedConfig) -> Result<Sinks, BuildError> {
        let config = &loaded.config;
        let mut redis_checks = Vec::new();
        // One connection per distinct server (by URL), shared by the sinks that use it.
        let mut connections: HashMap<String, ConnectionManager> = HashMap::new();
        let redis = match &config.redis {
            Some(r) => {
                let endpoint = r.endpoint();
                let manager = connection::connect(loaded, &endpoint).await?;
                redis_checks.push(RedisCheck::new("redis", &endpoint, manager.clone()));
                connections.insert(endpoint.url.expose().to_string(), manager.clone());
                Some((r.clone(), endpoint, manager))
            }
            None => None,
        };
        let memory = redis.is_none().then(|| Arc::new(MemoryBackend::default()));
        let mut by_name = HashMap::new();
        let mut built = Built {
            loaded,
            main: &redis,
            memory: &memory,
            connections: &mut connections,
            redis_checks: &mut redis_checks,
        };
        for (name, sink) in &config.sinks {
            by_name.insert(name.clone(), Arc::new(built.sink(name, sink).await?));
        }
        let dead_letters = match (&redis, &memory) {
            (Some((r, _, conn)), _) => DeadLetters::redis(conn.clone(), &r.key_prefix, config.dead_letters.max_len),
            (None, Some(m)) => DeadLetters::memory(m.clone()),
            (None, None) => unreachable!("memory is set whenever redis is not"),
        };
        let ttls = Ttls {
            lease: std::time::Duration::from_millis(config.delivery.lease_ms),
            done: std::time::Duration::from_secs(config.delivery.done_ttl_hours * 3600),
        };
        let idempotency = match &redis {
            Some((r, _, conn)) => Idempotency::redis(conn.clone(), &r.key_prefix, ttls),
            None => Idempotency::memory(ttls),
        };
        let store = config.checkpoint.as_ref().map(|c| c.store);
        let checkpoints = match (store, &redis) {
            (Some(CheckpointStoreKind::File), _) => {
                let path = config
                    .checkpoint
                    .as_ref()
                    .and_then(|c| c.path.as_ref())
                    .expect("validated: a file store has a path");
                CheckpointStore::file(&loaded.resolve(path))
            }
            (Some(CheckpointStoreKind::Memory), _) | (None, None) => CheckpointStore::memory(),
            (Some(CheckpointStoreKind::Redis) | None, Some((r, _, conn))) => {
                CheckpointStore::redis(conn.clone(), &r.key_prefix)
            }
            (Some(CheckpointStoreKind::Redis), None) => unreachable!("validated: a redis store needs redis"),
        };
        Ok(Sinks {
            by_name: ArcSwap::from_pointee(by_name),
            main: redis,
            dead_letters,
            idempotency,
            checkpoints,
            memory,
            redis_checks: Arc::new(ArcSwap::from_pointee(redis_checks)),
        })
    }
}

impl Sinks {
    /// The sink named `name`, as configured now.
    pub fn get(&self, name: &str) -> Option<Arc<Sink>> {
        self.by_name.load().get(name).cloned()
    }

    /// Applies a reloaded config's sink settings: builds the sinks that are new or whose settings changed (with
    /// their own connections), keeps the others as they are, and swaps the whole set at once. Sinks no longer
    /// configured stay reachable for events still in flight under the old rules. Returns the names rebuilt. On an
    /// error (a Redis that cannot be reached) nothing changes.
    pub async fn rebuild(&self, old: &Config, new: &LoadedConfig) -> Result<Vec<String>, BuildError> {
        let changed: Vec<(&String, &SinkConfig)> = new
            .config
            .sinks
            .iter()
            .filter(|(name, sink)| old.sinks.get(*name) != Some(*sink))
            .collect();
        if changed.is_empty() {
            return Ok(Vec::new());
        }
        let memory = self.memory.clone();
        let mut connections: HashMap<String, ConnectionManager> = HashMap::new();
        if let Some((_, endpoint, conn)) = &self.main {
            connections.insert(endpoint.url.expose().to_string(), conn.clone());
        }
        let mut checks = Vec::new();
        let mut built = Built {
            loaded: new,
            main: &self.main,
            memory: &memory,
            connections: &mut connections,
            redis_checks: &mut checks,
        };
        let mut map: HashMap<String, Arc<Sink>> = (**self.by_name.load()).clone();
        let mut names = Vec::new();
        for (name, sink) in changed {
            map.insert(name.clone(), Arc::new(built.sink(name, sink).await?));
            names.push(name.clone());
        }
        self.by_name.store(Arc::new(map));
        // The rebuilt sinks' own Redis servers replace their old ones in `/readyz`.
        let mut all: Vec<RedisCheck> = self
            .redis_checks
            .load()
            .iter()
            .filter(|c| !names.iter().any(|n| c.name == RedisCheck::sink_name(n)))
            .cloned()
            .collect();
        all.extend(checks);
        self.redis_checks.store(Arc::new(all));
        Ok(names)
    }
}

/// What building one sink needs: the config, the main Redis, the memory backend, connections shared by URL.
struct Built<'a> {
    loaded: &'a LoadedConfig,
    main: &'a Option<(RedisConfig, RedisEndpoint, ConnectionManager)>,
    memory: &'a Option<Arc<MemoryBackend>>,
    connections: &'a mut HashMap<String, ConnectionManager>,
    redis_checks: &'a mut Vec<RedisCheck>,
}

impl Built<'_> {
    async fn sink(&mut self, name: &str, sink: &SinkConfig) -> Result<Sink, BuildError> {
        let (loaded, memory) = (self.loaded, self.memory);
        let config = &loaded.config;
        // The sink's Redis: its own, else the main one (validated: own implies main).
        let endpoint: Option<RedisEndpoint> = match (sink.redis(), self.main) {
            (Some(own), _) => Some(own.clone()),
            (None, Some((_, main, _))) if sink.uses_redis() => Some(main.clone()),
            _ => None,
        };
        let conn = match &endpoint {
            Some(e) => Some(match self.connections.get(e.url.expose()) {
                Some(conn) => conn.clone(),
                None => {
                    let conn = connection::connect(loaded, e).await?;
                    self.redis_checks
                        .push(RedisCheck::new(RedisCheck::sink_name(name), e, conn.clone()));
                    self.connections.insert(e.url.expose().to_string(), conn.clone());
                    conn
                }
            }),
            None => None,
        };
        Ok(match sink {
            SinkConfig::Queue(q) => Sink::Queue(match (&endpoint, conn, memory) {
                (Some(e), Some(_), _) if q.format == QueueFormat::Bullmq => {
                    queue::QueueSink::bullmq(name, q, loaded, e).await?
                }
                (Some(_), Some(conn), _) => queue::QueueSink::stream(q, conn),
                (_, _, Some(m)) => queue::QueueSink::memory(q, m.clone()),
                _ => unreachable!("memory is set whenever redis is not"),
            }),
            SinkConfig::CacheInvalidate(_) => Sink::CacheInvalidate(match (conn, memory) {
                (Some(conn), _) => cache::CacheSink::redis(conn),
                (None, Some(m)) => cache::CacheSink::memory(m.clone()),
                (None, None) => unreachable!("memory is set whenever redis is not"),
            }),
            SinkConfig::Log(_) => Sink::Log(log::LogSink {
                redact: config.redact.clone(),
            }),
            SinkConfig::Webhook(w) => Sink::Webhook(webhook::WebhookSink::new(name, w)?),
        })
    }
}

/// A Redis URL with its password replaced, for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!(
                "{}://{}{}{}",
                &url[..scheme],
                user,
                if userinfo.contains(':') { ":***" } else { "" },
                &url[at..]
            )
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redis_passwords_never_reach_messages() {
        assert_eq!(
            super::redact_url("redis://user:s3cret@host:6379/0"),
            "redis://user:***@host:6379/0"
        );
        assert_eq!(super::redact_url("redis://:s3cret@host"), "redis://:***@host");
        assert_eq!(super::redact_url("redis://host:6379"), "redis://host:6379");
    }
}
