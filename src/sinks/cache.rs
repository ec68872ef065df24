//! The `cache-invalidate` sink: UNLINK keys, SCAN+UNLINK patterns (never KEYS), optional PUBLISH.

use std::sync::Arc;

use super::SinkOutcome;
use crate::failure::Failure;
use crate::state::{Conn, MemoryBackend};

/// Keys asked of SCAN per round trip: large enough to walk a big keyspace quickly, small enough that
/// one SCAN never blocks Redis noticeably.
const SCAN_COUNT: usize = 500;

pub enum CacheSink {
    Redis(Conn),
    Memory(Arc<MemoryBackend>),
}

impl CacheSink {
    pub fn redis(conn: Conn) -> Self {
        CacheSink::Redis(conn)
    }

    pub fn memory(memory: Arc<MemoryBackend>) -> Self {
        CacheSink::Memory(memory)
    }

    pub async fn invalidate(
        &self,
        keys: &[String],
        patterns: &[String],
        publish: Option<&(String, String)>,
    ) -> Result<SinkOutcome, Failure> {
        match self {
            CacheSink::Redis(conn) => {
                let mut conn = conn.clone();
                let redis_err = |e: redis::RedisError| Failure::from_redis(&e);
                if !keys.is_empty() {
                    redis::cmd("UNLINK")
                        .arg(keys)
                        .query_async::<i64>(&mut conn)
                        .await
                        .map_err(redis_err)?;
                }
                for pattern in patterns {
                    let mut scan = conn.scan(pattern, SCAN_COUNT).await.map_err(redis_err)?;
                    while let Some(found) = scan.next_batch().await.map_err(redis_err)? {
                        redis::cmd("UNLINK")
                            .arg(&found)
                            .query_async::<i64>(&mut conn)
                            .await
                            .map_err(redis_err)?;
                    }
                }
                if let Some((channel, message)) = publish {
                    redis::cmd("PUBLISH")
                        .arg(channel)
                        .arg(message)
                        .query_async::<i64>(&mut conn)
                        .await
                        .map_err(redis_err)?;
                }
                Ok(SinkOutcome::Done)
            }
            CacheSink::Memory(memory) => {
                let lock = "memory backend lock is never poisoned";
                memory.invalidated_keys.lock().expect(lock).extend(keys.iter().cloned());
                memory
                    .invalidated_patterns
                    .lock()
                    .expect(lock)
                    .extend(patterns.iter().cloned());
                if let Some(p) = publish {
                    memory.published.lock().expect(lock).push(p.clone());
                }
                Ok(SinkOutcome::Done)
            }
        }
    }
}
