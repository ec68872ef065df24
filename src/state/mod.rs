//! What delivery remembers: idempotency markers, source positions, channel leases and dead letters, in the main
//! Redis (or in memory for the demo), plus the connections to Redis themselves. Built once at start-up as one
//! [`Stores`] and passed to what needs it; nothing reaches through a sink to find a connection.

mod checkpoint;
mod dead_letter;
mod idempotency;
mod journal;
mod lease;
mod memory;
mod pauses;
mod redis;

use std::sync::Arc;
use std::time::Duration;

use crate::config::{CheckpointStoreKind, LoadedConfig, RedisConfig, RedisEndpoint};
pub use checkpoint::{CheckpointError, CheckpointStore, describe as describe_position, offset_bytes, offset_of};
pub use dead_letter::{DeadLetter, DeadLetters};
pub use idempotency::{Claim, Idempotency, Ttls, new_token};
pub use journal::{ActionEntry, Entry, Journal, RouteEntry, RouteOutcome, Store as JournalStore};
pub use lease::{Fence, Leases};
pub use memory::{MemoryBackend, MemoryJob};
pub use pauses::{Admit, Pause, Pauses};
pub use redis::{
    Conn, ConnectError, RedisCheck, connect, has_hash_tag, lost_primary, redact_url, root_cert, sentinel_primary,
};

/// The most entries an in-memory journal keeps, whatever `journal.max_len` says.
const MEMORY_JOURNAL_MAX: usize = 10_000;

/// The main Redis: its settings, its endpoint and one shared, self-reconnecting connection.
#[derive(Clone)]
pub struct MainRedis {
    pub config: RedisConfig,
    pub endpoint: RedisEndpoint,
    pub conn: Conn,
}

/// Every store of one running service, all in the main Redis or all in memory.
pub struct Stores {
    /// The main Redis, shared by the stores and by sinks without a Redis of their own; `None` runs in memory.
    pub main: Option<MainRedis>,
    /// The in-memory queue, cache and dead letters when the config has no `redis`.
    pub memory: Option<Arc<MemoryBackend>>,
    pub dead_letters: DeadLetters,
    pub idempotency: Idempotency,
    pub checkpoints: CheckpointStore,
    /// The channel leases, when replicas coordinate through Redis (`lease`, with positions in Redis).
    pub leases: Option<Arc<Leases>>,
    /// The runaway guard's fire counts and paused routes.
    pub pauses: Pauses,
    /// The decision journal (`journal.enabled`).
    pub journal: Option<Arc<Journal>>,
}

impl Stores {
    /// Connects the main Redis when the config has one, and opens every store on it (or in memory).
    pub async fn build(loaded: &LoadedConfig) -> Result<Stores, ConnectError> {
        let config = &loaded.config;
        let main = match &config.redis {
            Some(r) => {
                let endpoint = r.endpoint();
                let conn = redis::connect(loaded, &endpoint).await?;
                Some(MainRedis {
                    config: r.clone(),
                    endpoint,
                    conn,
                })
            }
            None => None,
        };
        let memory = main.is_none().then(|| Arc::new(MemoryBackend::default()));
        let dead_letters = match (&main, &memory) {
            (Some(r), _) => DeadLetters::redis(r.conn.clone(), &r.config.key_prefix, config.dead_letters.max_len),
            (None, Some(m)) => DeadLetters::memory(m.clone()),
            (None, None) => unreachable!("memory is set whenever redis is not"),
        };
        let ttls = Ttls {
            lease: Duration::from_millis(config.delivery.lease_ms),
            done: Duration::from_secs(config.delivery.done_ttl_hours * 3600),
        };
        let idempotency = match &main {
            Some(r) => Idempotency::redis(r.conn.clone(), &r.config.key_prefix, ttls),
            None => Idempotency::memory(ttls),
        };
        let checkpoints = Self::checkpoints(loaded, main.as_ref());
        let leases = match &main {
            Some(r) if config.leases_enabled() && matches!(checkpoints, CheckpointStore::Redis { .. }) => {
                let instance = config.instance_name();
                tracing::info!(%instance, ttl_ms = config.lease.ttl_ms, "Channel leases on: one replica subscribes to each channel.");
                Some(Arc::new(Leases::new(
                    r.conn.clone(),
                    &r.config.key_prefix,
                    instance,
                    Duration::from_millis(config.lease.ttl_ms),
                )))
            }
            _ => None,
        };
        let pauses = match &main {
            Some(r) => Pauses::redis(r.conn.clone(), &r.config.key_prefix, config.instance_name()),
            None => Pauses::memory(),
        };
        let journal = match config.journal.enabled {
            false => None,
            true => Some(Self::journal(loaded, main.as_ref()).await?),
        };
        Ok(Stores {
            pauses,
            journal,
            main,
            memory,
            dead_letters,
            idempotency,
            checkpoints,
            leases,
        })
    }

    /// The decision journal: in the main Redis, over a connection of its own (its batch writes, tens of KB each,
    /// never sit in the socket ahead of the pipeline's small commands), else in memory.
    async fn journal(loaded: &LoadedConfig, main: Option<&MainRedis>) -> Result<Arc<Journal>, ConnectError> {
        let config = &loaded.config;
        let store = match main {
            Some(r) => JournalStore::Redis {
                conn: redis::connect(loaded, &r.endpoint).await?,
                prefix: r.config.key_prefix.clone(),
                max_len: config.journal.max_len,
                retention: config.journal.retention,
            },
            None => JournalStore::Memory {
                ring: std::sync::Mutex::default(),
                max_len: config.journal.max_len.min(MEMORY_JOURNAL_MAX),
            },
        };
        let mask = config.redact.iter().chain(&config.journal.mask).cloned().collect();
        Ok(Arc::new(Journal::start(store, mask)))
    }

    /// Where source positions are kept: the configured store, else the main Redis, else memory.
    fn checkpoints(loaded: &LoadedConfig, main: Option<&MainRedis>) -> CheckpointStore {
        let checkpoint = loaded.config.checkpoint.as_ref();
        match (checkpoint.map(|c| c.store), main) {
            (Some(CheckpointStoreKind::File), _) => {
                let path = checkpoint
                    .and_then(|c| c.path.as_ref())
                    .expect("validated: a file store has a path");
                CheckpointStore::file(&loaded.resolve(path))
            }
            (Some(CheckpointStoreKind::Memory), _) | (None, None) => CheckpointStore::memory(),
            (Some(CheckpointStoreKind::Redis) | None, Some(r)) => {
                CheckpointStore::redis(r.conn.clone(), &r.config.key_prefix)
            }
            (Some(CheckpointStoreKind::Redis), None) => unreachable!("validated: a redis store needs redis"),
        }
    }

    /// The readiness check of the main Redis, when there is one.
    pub fn redis_check(&self) -> Option<RedisCheck> {
        self.main
            .as_ref()
            .map(|r| RedisCheck::new("redis", &r.endpoint, r.conn.clone()))
    }
}
