//! The `queue` sink: a BullMQ job (same Lua scripts as the Node library), a Redis Stream entry, or the
//! in-memory queue.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use serde_json::Value;

use super::memory::MemoryJob;
use super::{BuildError, MemoryBackend, SinkError, SinkOutcome};
use crate::config::{BackoffKind, JobOptions, KeepJobs, LoadedConfig, QueueSinkConfig, RedisEndpoint};

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
fn classify(err: &bullmq::Error) -> SinkError {
    match err {
        bullmq::Error::Redis(r) => SinkError::from_redis(r),
        bullmq::Error::ConnectionClosed | bullmq::Error::RateLimited { .. } => SinkError::Transient(err.to_string()),
        other => SinkError::Permanent(other.to_string()),
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
        queue: Box<bullmq::Queue>,
        /// BullMQ's own response timeout is fixed (10 s); ours is the endpoint's command timeout.
        timeout: Duration,
    },
    Stream {
        conn: ConnectionManager,
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
        let options = bullmq::QueueOptions::new()
            .connection(super::connection::bullmq_options(loaded, endpoint)?)
            .prefix(config.prefix.clone());
        let failed = |message: String| BuildError::Queue {
            sink: sink.to_string(),
            queue: config.queue.clone(),
            message,
        };
        let open = bullmq::Queue::with_options(&config.queue, options);
        let queue = match tokio::time::timeout(Duration::from_millis(endpoint.connect_timeout_ms), open).await {
            Ok(Ok(queue)) => queue,
            Ok(Err(e)) => return Err(failed(super::redact_url(&e.to_string()))),
            Err(_) => {
                return Err(failed(format!(
                    "no connection to {} within {} ms",
                    super::redact_url(endpoint.url.expose()),
                    endpoint.connect_timeout_ms
                )));
            }
        };
        Ok(QueueSink {
            queue_name: config.queue.clone(),
            job_name: config.job_name.clone(),
            defaults: config.job_options.clone(),
            backend: Backend::Bullmq {
                queue: Box::new(queue),
                timeout: Duration::from_millis(endpoint.command_timeout_ms),
            },
        })
    }

    /// A `format: stream` queue: XADD to the stream `config.queue` on `conn`.
    pub fn stream(config: &QueueSinkConfig, conn: ConnectionManager) -> QueueSink {
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
    ) -> Result<SinkOutcome, SinkError> {
        let options = self.defaults.merged(options);
        match &self.backend {
            Backend::Stream { conn, max_len } => {
                let mut conn = conn.clone();
                redis::cmd("XADD")
                    .arg(&self.queue_name)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(*max_len)
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
                    .arg(crate::dispatch::now_ms())
                    .query_async::<String>(&mut conn)
                    .await
                    .map_err(|e| SinkError::from_redis(&e))?;
                Ok(SinkOutcome::Done)
            }
            Backend::Bullmq { queue, timeout } => {
                let mut add = queue.add(&self.job_name, data).job_id(job_id);
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
                // A timed-out add may still have happened: the retry re-adds the same job id, a no-op.
                match tokio::time::timeout(*timeout, add).await {
                    Ok(result) => result.map_err(|e| classify(&e))?,
                    Err(_) => {
                        return Err(SinkError::Transient(format!(
                            "no reply from Redis within {} ms",
                            timeout.as_millis()
                        )));
                    }
                };
                Ok(SinkOutcome::Done)
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
}
