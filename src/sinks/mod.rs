//! Built-in sinks: a closed set, built by one `match` from the config (STYLE.md).

mod cache;
mod log;
mod queue;
mod salesforce;
mod webhook;

pub use salesforce::CALL_OPTIONS_HEADER;

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::auth::Auth;
use crate::config::{
    Config, LoadedConfig, QueueFormat, RedisEndpoint, SALESFORCE_UPDATE_SINK, SalesforceConfig, SinkConfig,
};
use crate::event::Event;
use crate::failure::Failure;
use crate::plan::{Action, Op};
use crate::state::{self, Conn, ConnectError, MainRedis, MemoryBackend, RedisCheck, Stores};

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
    SalesforceUpdate(salesforce::SalesforceUpdateSink),
}

impl Sink {
    pub async fn run(&self, action: &Action, cx: &ActionCx<'_>) -> Result<SinkOutcome, Failure> {
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
            (Sink::SalesforceUpdate(s), Op::SalesforceUpdate { object, id, fields, .. }) => {
                s.update(object, id, fields).await
            }
            _ => Err(Failure::Permanent(format!(
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
        Op::SalesforceUpdate { .. } => "salesforce-update",
    }
}

/// Every sink of the config by name: the sink registry. The stores (dead letters, idempotency, positions) are
/// `state::Stores`; sinks only borrow its main Redis connection and memory backend.
pub struct Sinks {
    /// The sinks by name; swapped as a whole when a config reload changes sink settings.
    by_name: ArcSwap<HashMap<String, Arc<Sink>>>,
    /// The main Redis, shared by sinks without their own.
    main: Option<MainRedis>,
    /// The in-memory backend when the config has no `redis`.
    memory: Option<Arc<MemoryBackend>>,
    /// The Redis servers of sinks with their own `redis`, for `/readyz`; a reload that moves a sink to another
    /// Redis updates it.
    pub redis_checks: Arc<ArcSwap<Vec<RedisCheck>>>,
}

/// Why sinks could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("webhook sink `{sink}`: {message}")]
    Webhook { sink: String, message: String },
    #[error("the `salesforce-update` sink: {0}")]
    SalesforceUpdate(String),
    #[error("cannot open BullMQ queue `{queue}` for sink `{sink}`: {message}")]
    Queue {
        sink: String,
        queue: String,
        message: String,
    },
}

impl Sinks {
    /// Builds every sink of the config on the stores' main Redis (or memory), connecting each sink's own Redis,
    /// and the built-in `salesforce-update` on the org of `salesforce` (without one, it dead-letters every write).
    pub async fn build(
        loaded: &LoadedConfig,
        stores: &Stores,
        salesforce: Option<(Arc<Auth>, &SalesforceConfig)>,
    ) -> Result<Sinks, BuildError> {
        let sinks = Sinks {
            by_name: ArcSwap::from_pointee(HashMap::new()),
            main: stores.main.clone(),
            memory: stores.memory.clone(),
            redis_checks: Arc::new(ArcSwap::from_pointee(Vec::new())),
        };
        let (mut by_name, checks) = sinks.build_all(loaded, loaded.config.sinks.iter()).await?;
        let write_back = match salesforce {
            Some((auth, config)) => {
                salesforce::SalesforceUpdateSink::new(auth, config).map_err(BuildError::SalesforceUpdate)?
            }
            None => salesforce::SalesforceUpdateSink::unconfigured(),
        };
        by_name.insert(
            SALESFORCE_UPDATE_SINK.to_string(),
            Arc::new(Sink::SalesforceUpdate(write_back)),
        );
        sinks.by_name.store(Arc::new(by_name));
        sinks.redis_checks.store(Arc::new(checks));
        Ok(sinks)
    }

    /// The sink named `name`, as configured now.
    pub fn get(&self, name: &str) -> Option<Arc<Sink>> {
        self.by_name.load().get(name).cloned()
    }

    /// Builds `sinks` with connections shared by URL (the main one included); returns them and the readiness
    /// checks of the sinks' own Redis servers.
    async fn build_all<'s>(
        &self,
        loaded: &LoadedConfig,
        sinks: impl Iterator<Item = (&'s String, &'s SinkConfig)>,
    ) -> Result<(HashMap<String, Arc<Sink>>, Vec<RedisCheck>), BuildError> {
        let mut connections: HashMap<String, Conn> = HashMap::new();
        if let Some(main) = &self.main {
            connections.insert(main.endpoint.identity(), main.conn.clone());
        }
        let mut checks = Vec::new();
        let mut built = Built {
            loaded,
            main: &self.main,
            memory: &self.memory,
            connections: &mut connections,
            redis_checks: &mut checks,
        };
        let mut by_name = HashMap::new();
        for (name, sink) in sinks {
            by_name.insert(name.clone(), Arc::new(built.sink(name, sink).await?));
        }
        Ok((by_name, checks))
    }

    /// Applies a reloaded config's sink settings: builds the sinks that are new or whose settings changed (with
    /// their own connections), keeps the others as they are, and swaps the whole set at once. Sinks no longer
    /// configured stay reachable for events still in flight under the old rules. Returns the names rebuilt. On an
    /// error (a Redis that cannot be reached) nothing changes.
    pub async fn rebuild(&self, old: &Config, new: &LoadedConfig) -> Result<Vec<String>, BuildError> {
        let changed = new
            .config
            .sinks
            .iter()
            .filter(|(name, sink)| old.sinks.get(*name) != Some(*sink));
        let (rebuilt, checks) = self.build_all(new, changed).await?;
        if rebuilt.is_empty() {
            return Ok(Vec::new());
        }
        let names: Vec<String> = new
            .config
            .sinks
            .keys()
            .filter(|n| rebuilt.contains_key(*n))
            .cloned()
            .collect();
        let mut map: HashMap<String, Arc<Sink>> = (**self.by_name.load()).clone();
        map.extend(rebuilt);
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
    main: &'a Option<MainRedis>,
    memory: &'a Option<Arc<MemoryBackend>>,
    connections: &'a mut HashMap<String, Conn>,
    redis_checks: &'a mut Vec<RedisCheck>,
}

impl Built<'_> {
    async fn sink(&mut self, name: &str, sink: &SinkConfig) -> Result<Sink, BuildError> {
        let (loaded, memory) = (self.loaded, self.memory);
        let config = &loaded.config;
        // The sink's Redis: its own, else the main one (validated: own implies main).
        let endpoint: Option<RedisEndpoint> = match (sink.redis(), self.main) {
            (Some(own), _) => Some(own.clone()),
            (None, Some(main)) if sink.uses_redis() => Some(main.endpoint.clone()),
            _ => None,
        };
        let conn = match &endpoint {
            Some(e) => Some(match self.connections.get(&e.identity()) {
                Some(conn) => conn.clone(),
                None => {
                    let conn = state::connect(loaded, e).await?;
                    self.redis_checks
                        .push(RedisCheck::new(RedisCheck::sink_name(name), e, conn.clone()));
                    self.connections.insert(e.identity(), conn.clone());
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
