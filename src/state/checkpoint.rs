//! Checkpoints: the stored position of each source (and channel), as opaque bytes. The JSONL source
//! stores its byte offset; the Pub/Sub source will store raw replay ids. A position is written only past
//! settled events, in delivery order: a restart resumes at or before the first unsettled event
//! (at-least-once, never at-most-once).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::Conn;
use super::lease::Fence;
use crate::failure::Failure;

/// Stores a position (`KEYS[1]`, `ARGV[1]`) unless the channel lease's fencing counter (`KEYS[2]`) moved past our
/// token (`ARGV[2]`); 1 when stored. Compiled (hashed) once, like the idempotency scripts.
static SET_FENCED: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(&format!(
        r#"{}redis.call("SET", KEYS[1], ARGV[1]) return 1"#,
        super::lease::fence_guard(2)
    ))
});

/// Where positions are kept.
#[derive(Clone)]
pub enum CheckpointStore {
    /// `<key_prefix>checkpoint:<key>` strings in Redis (fenced writes compare `<key_prefix>fence:<key>`).
    Redis {
        conn: Conn,
        prefix: String,
        key_prefix: String,
    },
    /// A JSON file `{key: hex}`, replaced atomically (write, fsync, rename) on every commit.
    File { path: PathBuf, lock: Arc<Mutex<()>> },
    /// Process memory: lost on exit (the demo).
    Memory(Arc<Mutex<BTreeMap<String, Vec<u8>>>>),
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint store: {0}")]
    Store(#[from] Failure),
    #[error("checkpoint file {path}: {message}")]
    File { path: PathBuf, message: String },
}

impl CheckpointStore {
    pub fn memory() -> Self {
        CheckpointStore::Memory(Arc::default())
    }

    pub fn file(path: &Path) -> Self {
        CheckpointStore::File {
            path: path.to_path_buf(),
            lock: Arc::default(),
        }
    }

    pub fn redis(conn: Conn, key_prefix: &str) -> Self {
        CheckpointStore::Redis {
            conn,
            prefix: format!("{key_prefix}checkpoint:"),
            key_prefix: key_prefix.to_string(),
        }
    }

    fn read_file(path: &Path) -> Result<BTreeMap<String, String>, CheckpointError> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| CheckpointError::File {
                path: path.to_path_buf(),
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(CheckpointError::File {
                path: path.to_path_buf(),
                message: e.to_string(),
            }),
        }
    }

    fn write_file(path: &Path, map: &BTreeMap<String, String>) -> Result<(), CheckpointError> {
        let err = |e: std::io::Error| CheckpointError::File {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let tmp = path.with_extension("tmp");
        let text = serde_json::to_string_pretty(map).expect("a map of strings is always JSON");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(err)?;
            f.write_all(text.as_bytes()).map_err(err)?;
            // The rename below must never expose a half-written file after a crash.
            f.sync_all().map_err(err)?;
        }
        std::fs::rename(&tmp, path).map_err(err)
    }

    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CheckpointError> {
        match self {
            CheckpointStore::Redis { conn, prefix, .. } => {
                let mut conn = conn.clone();
                let value: Option<Vec<u8>> = redis::cmd("GET")
                    .arg(format!("{prefix}{key}"))
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| Failure::from_redis(&e))?;
                Ok(value)
            }
            CheckpointStore::File { path, lock } => {
                let _guard = lock.lock().expect("checkpoint file lock is never poisoned");
                Ok(Self::read_file(path)?
                    .get(key)
                    .and_then(|h| crate::hex::decode(h.trim())))
            }
            CheckpointStore::Memory(map) => Ok(map.lock().expect("lock is never poisoned").get(key).cloned()),
        }
    }

    /// The stored position, read patiently: a failed read is retried after a pause (jittered, from 100 ms doubling up
    /// to `max_pause`) for as long as `keep_trying` says so of its error, which it may log; the error it refuses is
    /// returned. Never a guess: a start position read wrongly loses or repeats events.
    pub async fn get_retrying(
        &self,
        key: &str,
        max_pause: Duration,
        mut keep_trying: impl FnMut(&CheckpointError) -> bool,
    ) -> Result<Option<Vec<u8>>, CheckpointError> {
        let mut pause = Duration::from_millis(100);
        loop {
            match self.get(key).await {
                Err(e) if keep_trying(&e) => {
                    tokio::time::sleep(crate::clock::jitter(pause)).await;
                    pause = (pause * 2).min(max_pause);
                }
                read => return read,
            }
        }
    }

    pub async fn set(&self, key: &str, position: &[u8]) -> Result<(), CheckpointError> {
        match self {
            CheckpointStore::Redis { conn, prefix, .. } => {
                let mut conn = conn.clone();
                redis::cmd("SET")
                    .arg(format!("{prefix}{key}"))
                    .arg(position)
                    .query_async::<()>(&mut conn)
                    .await
                    .map_err(|e| Failure::from_redis(&e))?;
                Ok(())
            }
            CheckpointStore::File { path, lock } => {
                let _guard = lock.lock().expect("checkpoint file lock is never poisoned");
                let mut map = Self::read_file(path)?;
                map.insert(key.to_string(), crate::hex::encode(position));
                Self::write_file(path, &map)
            }
            CheckpointStore::Memory(map) => {
                map.lock()
                    .expect("lock is never poisoned")
                    .insert(key.to_string(), position.to_vec());
                Ok(())
            }
        }
    }

    /// Stores a position under a channel lease: refused (`Ok(false)`) when another replica took the lease since
    /// `fence` was issued. Without a fence (no leases, or a file or memory store) it is [`CheckpointStore::set`].
    pub async fn set_fenced(&self, key: &str, position: &[u8], fence: Option<&Fence>) -> Result<bool, CheckpointError> {
        match (self, fence) {
            (
                CheckpointStore::Redis {
                    conn,
                    prefix,
                    key_prefix,
                },
                Some(fence),
            ) => {
                let mut conn = conn.clone();
                let stored: i64 = SET_FENCED
                    .key(format!("{prefix}{key}"))
                    .key(super::lease::fence_key(key_prefix, key))
                    .arg(position)
                    .arg(fence.token)
                    .invoke_async(&mut conn)
                    .await
                    .map_err(|e| Failure::from_redis(&e))?;
                if stored != 1 {
                    fence.mark_lost();
                }
                Ok(stored == 1)
            }
            _ => self.set(key, position).await.map(|()| true),
        }
    }

    pub async fn reset(&self, key: &str) -> Result<(), CheckpointError> {
        match self {
            CheckpointStore::Redis { conn, prefix, .. } => {
                let mut conn = conn.clone();
                redis::cmd("DEL")
                    .arg(format!("{prefix}{key}"))
                    .query_async::<()>(&mut conn)
                    .await
                    .map_err(|e| Failure::from_redis(&e))?;
                Ok(())
            }
            CheckpointStore::File { path, lock } => {
                let _guard = lock.lock().expect("checkpoint file lock is never poisoned");
                let mut map = Self::read_file(path)?;
                map.remove(key);
                Self::write_file(path, &map)
            }
            CheckpointStore::Memory(map) => {
                map.lock().expect("lock is never poisoned").remove(key);
                Ok(())
            }
        }
    }

    /// Every stored key and position.
    pub async fn list(&self) -> Result<Vec<(String, Vec<u8>)>, CheckpointError> {
        match self {
            CheckpointStore::Redis { conn, prefix, .. } => {
                let redis_err = |e: redis::RedisError| Failure::from_redis(&e);
                let mut keys: Vec<String> = Vec::new();
                let mut scan = conn.scan(&format!("{prefix}*"), 500).await.map_err(redis_err)?;
                while let Some(found) = scan.next_batch().await.map_err(redis_err)? {
                    keys.extend(found);
                }
                keys.sort();
                let mut out = Vec::new();
                for key in keys {
                    let short = key.trim_start_matches(prefix.as_str()).to_string();
                    if let Some(v) = self.get(&short).await? {
                        out.push((short, v));
                    }
                }
                Ok(out)
            }
            CheckpointStore::File { path, lock } => {
                let _guard = lock.lock().expect("checkpoint file lock is never poisoned");
                Ok(Self::read_file(path)?
                    .into_iter()
                    .filter_map(|(k, h)| Some((k, crate::hex::decode(h.trim())?)))
                    .collect())
            }
            CheckpointStore::Memory(map) => Ok(map
                .lock()
                .expect("lock is never poisoned")
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()),
        }
    }
}

/// A JSONL position: the byte offset after the last settled line, as 8 big-endian bytes.
pub fn offset_bytes(offset: u64) -> Vec<u8> {
    offset.to_be_bytes().to_vec()
}

pub fn offset_of(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// Renders a position for people: JSONL offsets as numbers, anything else as hex.
pub fn describe(key: &str, bytes: &[u8]) -> String {
    match (key.starts_with("jsonl:"), offset_of(bytes)) {
        (true, Some(offset)) => format!("byte offset {offset} (hex {})", crate::hex::encode(bytes)),
        _ => crate::hex::encode(bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn file_store_round_trips_and_resets() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::file(&dir.path().join("positions.json"));
        assert_eq!(store.get("jsonl:a").await.unwrap(), None);
        store.set("jsonl:a", &offset_bytes(42)).await.unwrap();
        store
            .set("pubsub:cdc:/data/OrderChangeEvent", &[0, 0, 0, 0, 0, 0, 3, 0xe8])
            .await
            .unwrap();
        assert_eq!(offset_of(&store.get("jsonl:a").await.unwrap().unwrap()), Some(42));
        assert_eq!(store.list().await.unwrap().len(), 2);
        store.reset("jsonl:a").await.unwrap();
        assert_eq!(store.get("jsonl:a").await.unwrap(), None);
    }
}
