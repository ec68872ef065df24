//! The `queue` sink: a BullMQ job (same Lua scripts as the Node library), or the in-memory queue.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::memory::MemoryJob;
use super::{BuildError, MemoryBackend, SinkError, SinkOutcome};
use crate::config::{BackoffKind, JobOptions, QueueSinkConfig};

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
    Bullmq(Box<bullmq::Queue>),
    Memory(Arc<MemoryBackend>),
}

impl QueueSink {
    pub async fn bullmq(sink: &str, config: &QueueSinkConfig, url: &str) -> Result<QueueSink, BuildError> {
        let options = bullmq::QueueOptions::new()
            .connection(bullmq::options::RedisConnectionOptions::new().url(url))
            .prefix(config.prefix.clone());
        let queue = bullmq::Queue::with_options(&config.queue, options)
            .await
            .map_err(|e| BuildError::Queue {
                sink: sink.to_string(),
                queue: config.queue.clone(),
                message: super::redact_url(&e.to_string()),
            })?;
        Ok(QueueSink {
            queue_name: config.queue.clone(),
            job_name: config.job_name.clone(),
            defaults: config.job_options.clone(),
            backend: Backend::Bullmq(Box::new(queue)),
        })
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
    pub async fn enqueue(&self, job_id: &str, data: &Value, options: &JobOptions) -> Result<SinkOutcome, SinkError> {
        let options = self.defaults.merged(options);
        match &self.backend {
            Backend::Bullmq(queue) => {
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
                if let Some(n) = options.remove_on_complete {
                    add = add.remove_on_complete(bullmq::types::RemoveOnFinish::Count(n));
                }
                if let Some(n) = options.remove_on_fail {
                    add = add.remove_on_fail(bullmq::types::RemoveOnFinish::Count(n));
                }
                add.await.map_err(|e| classify(&e))?;
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
