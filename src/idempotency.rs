//! Idempotency per action key, in two states (DESIGN.md §5): a short in-progress lease taken before the
//! sink call and renewed while it runs, and a long done marker written only after the side effect
//! succeeded. A crash leaves only the lease, which expires, so a redelivered event runs the action then:
//! never skipped for good, never run twice at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;

use crate::sinks::SinkError;

/// The value a done marker holds.
const DONE: &str = "done";

/// Deletes the key only while it still holds our lease token (a lease that expired and was taken by
/// another holder must not be released by us).
const RELEASE: &str =
    r#"if redis.call("GET", KEYS[1]) == ARGV[1] then return redis.call("DEL", KEYS[1]) else return 0 end"#;
/// Extends the lease only while it is still ours.
const RENEW: &str =
    r#"if redis.call("GET", KEYS[1]) == ARGV[1] then return redis.call("PEXPIRE", KEYS[1], ARGV[2]) else return 0 end"#;

/// How long leases and done markers live.
#[derive(Debug, Clone, Copy)]
pub struct Ttls {
    pub lease: Duration,
    pub done: Duration,
}

/// What a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The lease is ours (its token); run the action.
    Acquired(String),
    /// The action succeeded before: skip it.
    Done,
    /// Someone else holds the lease (a call in progress, or a crashed holder whose lease has not expired).
    Busy,
}

#[derive(Clone)]
pub enum Idempotency {
    Redis {
        conn: ConnectionManager,
        prefix: String,
        ttls: Ttls,
    },
    Memory {
        entries: Arc<Mutex<HashMap<String, (String, Instant)>>>,
        ttls: Ttls,
    },
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A lease token unique to this process and call. A caller makes one per action and passes it to every
/// claim, so a retry after a lost reply recognises its own lease instead of waiting for it to expire.
pub fn new_token() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "lease:{}:{nanos:x}:{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn redis_err(e: redis::RedisError) -> SinkError {
    SinkError::from_redis(&e)
}

impl Idempotency {
    pub fn redis(conn: ConnectionManager, key_prefix: &str, ttls: Ttls) -> Self {
        Idempotency::Redis {
            conn,
            prefix: format!("{key_prefix}idem:"),
            ttls,
        }
    }

    pub fn memory(ttls: Ttls) -> Self {
        Idempotency::Memory {
            entries: Arc::default(),
            ttls,
        }
    }

    pub fn ttls(&self) -> Ttls {
        match self {
            Idempotency::Redis { ttls, .. } | Idempotency::Memory { ttls, .. } => *ttls,
        }
    }

    fn key(prefix: &str, sink: &str, key: &str) -> String {
        format!("{prefix}{sink}:{key}")
    }

    /// Takes the lease for (sink, key), or says why not. `held` is a token this caller already holds.
    pub async fn claim(&self, sink: &str, key: &str, held: Option<&str>) -> Result<Claim, SinkError> {
        match self {
            Idempotency::Redis { conn, prefix, ttls } => {
                let mut conn = conn.clone();
                let k = Self::key(prefix, sink, key);
                let token = held.map(str::to_string).unwrap_or_else(new_token);
                let set: Option<String> = redis::cmd("SET")
                    .arg(&k)
                    .arg(&token)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttls.lease.as_millis() as u64)
                    .query_async(&mut conn)
                    .await
                    .map_err(redis_err)?;
                if set.is_some() {
                    return Ok(Claim::Acquired(token));
                }
                let current: Option<String> = redis::cmd("GET")
                    .arg(&k)
                    .query_async(&mut conn)
                    .await
                    .map_err(redis_err)?;
                Ok(match current.as_deref() {
                    Some(DONE) => Claim::Done,
                    Some(t) if Some(t) == held => Claim::Acquired(token),
                    _ => Claim::Busy,
                })
            }
            Idempotency::Memory { entries, ttls } => {
                let mut map = entries.lock().expect("idempotency lock is never poisoned");
                let k = Self::key("", sink, key);
                let now = Instant::now();
                match map.get(&k) {
                    Some((v, exp)) if *exp > now && v == DONE => Ok(Claim::Done),
                    Some((v, exp)) if *exp > now && Some(v.as_str()) != held => Ok(Claim::Busy),
                    _ => {
                        let token = held.map(str::to_string).unwrap_or_else(new_token);
                        map.insert(k, (token.clone(), now + ttls.lease));
                        Ok(Claim::Acquired(token))
                    }
                }
            }
        }
    }

    /// Extends our lease while a call runs.
    pub async fn renew(&self, sink: &str, key: &str, token: &str) -> Result<(), SinkError> {
        match self {
            Idempotency::Redis { conn, prefix, ttls } => {
                let mut conn = conn.clone();
                redis::Script::new(RENEW)
                    .key(Self::key(prefix, sink, key))
                    .arg(token)
                    .arg(ttls.lease.as_millis() as u64)
                    .invoke_async::<i64>(&mut conn)
                    .await
                    .map_err(redis_err)?;
                Ok(())
            }
            Idempotency::Memory { entries, ttls } => {
                let mut map = entries.lock().expect("idempotency lock is never poisoned");
                if let Some((v, exp)) = map.get_mut(&Self::key("", sink, key))
                    && v == token
                {
                    *exp = Instant::now() + ttls.lease;
                }
                Ok(())
            }
        }
    }

    /// Marks the action done: later deliveries of the same key skip it for the done TTL.
    pub async fn complete(&self, sink: &str, key: &str) -> Result<(), SinkError> {
        match self {
            Idempotency::Redis { conn, prefix, ttls } => {
                let mut conn = conn.clone();
                redis::cmd("SET")
                    .arg(Self::key(prefix, sink, key))
                    .arg(DONE)
                    .arg("PX")
                    .arg(ttls.done.as_millis() as u64)
                    .query_async::<()>(&mut conn)
                    .await
                    .map_err(redis_err)
            }
            Idempotency::Memory { entries, ttls } => {
                let mut map = entries.lock().expect("idempotency lock is never poisoned");
                map.insert(Self::key("", sink, key), (DONE.to_string(), Instant::now() + ttls.done));
                Ok(())
            }
        }
    }

    /// Gives the lease up after a failure, so the next delivery (or a dead-letter retry) can run it.
    pub async fn release(&self, sink: &str, key: &str, token: &str) -> Result<(), SinkError> {
        match self {
            Idempotency::Redis { conn, prefix, .. } => {
                let mut conn = conn.clone();
                redis::Script::new(RELEASE)
                    .key(Self::key(prefix, sink, key))
                    .arg(token)
                    .invoke_async::<i64>(&mut conn)
                    .await
                    .map_err(redis_err)?;
                Ok(())
            }
            Idempotency::Memory { entries, .. } => {
                let mut map = entries.lock().expect("idempotency lock is never poisoned");
                let k = Self::key("", sink, key);
                if map.get(&k).is_some_and(|(v, _)| v == token) {
                    map.remove(&k);
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lease_then_done_in_memory() {
        let ttls = Ttls {
            lease: Duration::from_millis(50),
            done: Duration::from_secs(60),
        };
        let idem = Idempotency::memory(ttls);
        let Claim::Acquired(token) = idem.claim("q", "k", None).await.unwrap() else {
            panic!("first claim")
        };
        assert_eq!(idem.claim("q", "k", None).await.unwrap(), Claim::Busy);
        assert_eq!(
            idem.claim("q", "k", Some(&token)).await.unwrap(),
            Claim::Acquired(token.clone())
        );
        assert!(matches!(
            idem.claim("other-sink", "k", None).await.unwrap(),
            Claim::Acquired(_)
        ));
        // A crashed holder's lease expires: the action can run again.
        tokio::time::sleep(Duration::from_millis(80)).await;
        let Claim::Acquired(second) = idem.claim("q", "k", None).await.unwrap() else {
            panic!("after expiry")
        };
        idem.release("q", "k", &token).await.unwrap();
        assert_eq!(
            idem.claim("q", "k", None).await.unwrap(),
            Claim::Busy,
            "a stale token cannot release"
        );
        idem.complete("q", "k").await.unwrap();
        assert_eq!(idem.claim("q", "k", Some(&second)).await.unwrap(), Claim::Done);
    }
}
