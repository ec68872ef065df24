//! The `queue` sink: a BullMQ job (same Lua scripts as the Node library), a Redis Stream entry, or the
//! in-memory queue.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde_json::Value;

use super::{BuildError, SinkOutcome};
use crate::config::{LoadedConfig, QueueSinkConfig, RedisEndpoint, Topology};
use crate::failure::Failure;
use crate::plan::{BackoffKind, JobOptions, KeepJobs};
use crate::state::{Conn, ConnectError, MemoryBackend, MemoryJob, redact_url};

/// Who a job is for: written into stream entries (BullMQ jobs carry what the rule put in `job`).
pub struct EntryMeta<'a> {
    pub idempotency_key: &'a str,
    pub event_id: &'a str,
    pub route: &'a str,
    pub record_id: Option<&'a str>,
    pub rules_version: &'a str,
    pub correlation_id: Option<&'a str>,
}

fn keep_jobs(keep: &KeepJobs) -> bullmq::types::RemoveOnFinish {
    match keep {
        KeepJobs::Remove(remove) => bullmq::types::RemoveOnFinish::Bool(*remove),
        KeepJobs::Count(n) => bullmq::types::RemoveOnFinish::Count(*n),
        // BullMQ's scripts read `age` in seconds (they multiply it by 1000), like the Node library.
        KeepJobs::Limits(l) => bullmq::types::RemoveOnFinish::Options(bullmq::types::KeepJobs {
            age: l.age,
            count: l.count,
            limit: None,
        }),
    }
}

/// BullMQ's errors: its connection closing (a dropped or killed connection) and rate limiting pass; a
/// script or serialization error does not.
fn classify(err: &bullmq::Error) -> Failure {
    match err {
        bullmq::Error::Redis(r) => Failure::from_redis(r),
        bullmq::Error::ConnectionClosed => Failure::Dropped(err.to_string()),
        bullmq::Error::RateLimited { .. } => Failure::Transient(err.to_string()),
        other => Failure::Permanent(other.to_string()),
    }
}

/// Whether BullMQ's connection itself failed (as opposed to a reply the server sent).
fn connection_broken(err: &bullmq::Error) -> bool {
    match err {
        bullmq::Error::Redis(r) => crate::state::lost_primary(r),
        bullmq::Error::ConnectionClosed => true,
        _ => false,
    }
}

/// Consecutive connection failures after which the BullMQ queue is opened again on a new connection.
const REOPEN_AFTER: u32 = 3;

/// Reopens a BullMQ queue whose connection keeps failing. The connection reconnects on its own after a drop, but a
/// connection can also get stuck answering every command with "broken pipe" (redis-rs issues #984, #1415): seen
/// in the soak test, where every client connection is killed every 100-300 ms. A fresh queue gets a fresh one.
struct Reopen {
    name: String,
    prefix: String,
    /// Where the queue's Redis is: a Sentinel-managed primary is asked for again at each open.
    endpoint: RedisEndpoint,
    /// The PEM of `tls.ca_file`, read once when the sink is built.
    root_cert: Option<Vec<u8>>,
    /// For messages, password masked.
    url: String,
    connect_timeout: Duration,
    failures: AtomicU32,
    /// One reopen at a time.
    lock: tokio::sync::Mutex<()>,
}

impl Reopen {
    async fn open(&self) -> Result<bullmq::Queue, String> {
        let connection = bullmq_options(&self.endpoint, self.root_cert.clone())
            .await
            .map_err(|e| e.to_string())?;
        let options = bullmq::QueueOptions::new()
            .connection(connection)
            .prefix(self.prefix.clone());
        let open = bullmq::Queue::with_options(&self.name, options);
        match tokio::time::timeout(self.connect_timeout, open).await {
            Ok(Ok(queue)) => Ok(queue),
            Ok(Err(e)) => Err(redact_url(&e.to_string())),
            Err(_) => Err(format!(
                "no connection to {} within {} ms",
                self.url,
                self.connect_timeout.as_millis()
            )),
        }
    }

    /// Counts a connection failure of `failed` (the queue the call used); after a few in a row, replaces it.
    async fn after_failure(&self, queue: &ArcSwap<bullmq::Queue>, failed: &Arc<bullmq::Queue>) {
        // Behind Sentinel, a lost primary means a failover: open on the primary the sentinels name now, at once.
        let after = if self.endpoint.sentinels.is_empty() {
            REOPEN_AFTER
        } else {
            1
        };
        if self.failures.fetch_add(1, Ordering::Relaxed) + 1 < after {
            return;
        }
        let _one = self.lock.lock().await;
        // Someone else replaced it meanwhile.
        if !Arc::ptr_eq(&queue.load_full(), failed) {
            return;
        }
        match self.open().await {
            Ok(fresh) => {
                tracing::warn!(queue = %self.name, url = %self.url, failures = self.failures.load(Ordering::Relaxed),
                    "The BullMQ connection kept failing; opened the queue again on a new connection.");
                queue.store(Arc::new(fresh));
                self.failures.store(0, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!(queue = %self.name, error = %e, "Cannot open the BullMQ queue again yet; retrying with the next call.")
            }
        }
    }
}

pub struct QueueSink {
    queue_name: String,
    job_name: String,
    defaults: JobOptions,
    backend: Backend,
}

enum Backend {
    Bullmq {
        queue: ArcSwap<bullmq::Queue>,
        /// BullMQ's own response timeout is fixed (10 s); ours is the endpoint's command timeout.
        timeout: Duration,
        /// How to open the queue again when its connection stays broken.
        reopen: Box<Reopen>,
    },
    Stream {
        conn: Conn,
        max_len: usize,
    },
    Memory(Arc<MemoryBackend>),
}

impl QueueSink {
    pub async fn bullmq(
        sink: &str,
        config: &QueueSinkConfig,
        loaded: &LoadedConfig,
        endpoint: &RedisEndpoint,
    ) -> Result<QueueSink, BuildError> {
        let reopen = Box::new(Reopen {
            name: config.queue.clone(),
            prefix: config.prefix.clone(),
            endpoint: endpoint.clone(),
            root_cert: crate::state::root_cert(loaded, endpoint)?,
            url: endpoint.describe(),
            connect_timeout: Duration::from_millis(endpoint.connect_timeout_ms),
            failures: AtomicU32::new(0),
            lock: tokio::sync::Mutex::new(()),
        });
        let queue = reopen.open().await.map_err(|message| BuildError::Queue {
            sink: sink.to_string(),
            queue: config.queue.clone(),
            message,
        })?;
        Ok(QueueSink {
            queue_name: config.queue.clone(),
            job_name: config.job_name.clone(),
            defaults: config.job_options.clone(),
            backend: Backend::Bullmq {
                queue: ArcSwap::from_pointee(queue),
                timeout: Duration::from_millis(endpoint.command_timeout_ms),
                reopen,
            },
        })
    }

    /// A `format: stream` queue: XADD to the stream `config.queue` on `conn`.
    pub fn stream(config: &QueueSinkConfig, conn: Conn) -> QueueSink {
        QueueSink {
            queue_name: config.queue.clone(),
            job_name: config.job_name.clone(),
            defaults: JobOptions::default(),
            backend: Backend::Stream {
                conn,
                max_len: config.max_len,
            },
        }
    }

    pub fn memory(config: &QueueSinkConfig, memory: Arc<MemoryBackend>) -> QueueSink {
        QueueSink {
            queue_name: config.queue.clone(),
            job_name: config.job_name.clone(),
            defaults: config.job_options.clone(),
            backend: Backend::Memory(memory),
        }
    }

    /// Adds the job under `job_id`; a job id that already exists keeps the first job (BullMQ's dedupe).
    /// A stream entry is appended (streams do not dedupe: the dispatcher's idempotency key does).
    pub async fn enqueue(
        &self,
        job_id: &str,
        data: &Value,
        options: &JobOptions,
        meta: &EntryMeta<'_>,
    ) -> Result<SinkOutcome, Failure> {
        match &self.backend {
            Backend::Stream { conn, max_len } => self.append(conn, *max_len, job_id, data, meta).await,
            Backend::Bullmq { queue, timeout, reopen } => {
                let options = self.defaults.merged(options);
                let current = queue.load_full();
                let add = with_options(current.add(&self.job_name, data).job_id(job_id), &options);
                // A timed-out add may still have happened: the retry re-adds the same job id, a no-op.
                match tokio::time::timeout(*timeout, add).await {
                    Ok(Ok(_)) => {
                        reopen.failures.store(0, Ordering::Relaxed);
                        Ok(SinkOutcome::Done)
                    }
                    Ok(Err(e)) => {
                        if connection_broken(&e) {
                            reopen.after_failure(queue, &current).await;
                        }
                        Err(classify(&e))
                    }
                    Err(_) => Err(Failure::Transient(format!(
                        "no reply from Redis within {} ms",
                        timeout.as_millis()
                    ))),
                }
            }
            Backend::Memory(memory) => {
                let mut jobs = memory.jobs.lock().expect("memory backend lock is never poisoned");
                jobs.entry((self.queue_name.clone(), job_id.to_string()))
                    .or_insert_with(|| MemoryJob {
                        queue: self.queue_name.clone(),
                        name: self.job_name.clone(),
                        id: job_id.to_string(),
                        data: data.clone(),
                    });
                Ok(SinkOutcome::Done)
            }
        }
    }

    /// A `format: stream` entry, with who it is for (see [`QueueFormat::Stream`](crate::config::QueueFormat)).
    async fn append(
        &self,
        conn: &Conn,
        max_len: usize,
        job_id: &str,
        data: &Value,
        meta: &EntryMeta<'_>,
    ) -> Result<SinkOutcome, Failure> {
        let mut conn = conn.clone();
        redis::cmd("XADD")
            .arg(&self.queue_name)
            .arg("MAXLEN")
            .arg("~")
            .arg(max_len)
            .arg("*")
            .arg("job_id")
            .arg(job_id)
            .arg("name")
            .arg(&self.job_name)
            .arg("data")
            .arg(data.to_string())
            .arg("idempotency_key")
            .arg(meta.idempotency_key)
            .arg("event_id")
            .arg(meta.event_id)
            .arg("route")
            .arg(meta.route)
            .arg("record_id")
            .arg(meta.record_id.unwrap_or(""))
            .arg("rules_version")
            .arg(meta.rules_version)
            .arg("correlation_id")
            .arg(meta.correlation_id.unwrap_or(""))
            .arg("at_ms")
            .arg(crate::clock::now_ms())
            .query_async::<String>(&mut conn)
            .await
            .map_err(|e| Failure::from_redis(&e))?;
        Ok(SinkOutcome::Done)
    }
}

/// A BullMQ add with the job options that are set.
fn with_options<'a>(mut add: bullmq::AddJob<'a>, options: &JobOptions) -> bullmq::AddJob<'a> {
    if let Some(n) = options.attempts {
        add = add.attempts(n);
    }
    if let Some(b) = &options.backoff {
        add = add.backoff(match b.kind {
            BackoffKind::Fixed => bullmq::types::BackoffStrategy::Fixed(b.delay),
            BackoffKind::Exponential => bullmq::types::BackoffStrategy::Exponential(b.delay),
        });
    }
    if let Some(ms) = options.delay {
        add = add.delay(Duration::from_millis(ms));
    }
    if let Some(p) = options.priority {
        add = add.priority(p);
    }
    if let Some(keep) = &options.remove_on_complete {
        add = add.remove_on_complete(keep_jobs(keep));
    }
    if let Some(keep) = &options.remove_on_fail {
        add = add.remove_on_fail(keep_jobs(keep));
    }
    add
}

/// The BullMQ connection options for `endpoint`: its URL with credentials, the primary its sentinels name now, or
/// its cluster's seed nodes; the private CA when there is one.
async fn bullmq_options(
    endpoint: &RedisEndpoint,
    root_cert: Option<Vec<u8>>,
) -> Result<bullmq::options::RedisConnectionOptions, ConnectError> {
    let mut options = bullmq::options::RedisConnectionOptions::new();
    let credentials = |mut options: bullmq::options::RedisConnectionOptions| {
        if let Some(user) = &endpoint.username {
            options = options.username(user);
        }
        if let Some(password) = &endpoint.password {
            options = options.password(password.expose());
        }
        options.tls(endpoint.tls.is_some())
    };
    match endpoint
        .topology()
        .map_err(|_| ConnectError::Config(endpoint.describe()))?
    {
        Topology::Server(url) => options = options.url(url.expose()),
        Topology::Sentinel { .. } => {
            let (host, port) = crate::state::sentinel_primary(endpoint, root_cert.clone()).await?;
            let db = u8::try_from(endpoint.db).map_err(|_| ConnectError::Config(endpoint.describe()))?;
            options = credentials(options.host(host).port(port).db(db));
        }
        Topology::Cluster(nodes) => {
            let scheme = if endpoint.tls.is_some() { "rediss" } else { "redis" };
            options = credentials(options.cluster_nodes(nodes.iter().map(|node| format!("{scheme}://{node}"))));
        }
    }
    if let Some(pem) = root_cert {
        options = options.tls_certs(bullmq::options::TlsCerts {
            root_cert: Some(pem),
            client_cert: None,
            client_key: None,
        });
    }
    Ok(options)
}
