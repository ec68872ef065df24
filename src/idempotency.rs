//! Idempotency per action key, in two states (DESIGN.md §5): a short in-progress lease taken before the
//! sink call and renewed while it runs, and a long done marker written only after the side effect
//! succeeded. A crash leaves only the lease, which expires, so a redelivered event runs the action then:
//! never skipped for good, never run twice at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;

use crate::lease::Fence;
use crate::sinks::SinkError;

/// The value a done marker holds.
const DONE: &str = "done";

/// Deletes the key only while it still holds our lease token (a lease that expired and was taken by
/// another holder must not be released by us).
const RELEASE: &str =
    r#"if redis.call("GET", KEYS[1]) == ARGV[1] then return redis.call("DEL", KEYS[1]) else return 0 end"#;
/// Takes the lease (`KEYS[1]`) unless the action is done or leased by someone else, in one round trip; fenced by
/// the channel lease's token when there is one (`KEYS[2]`, `ARGV[3]`). 1: ours, 2: done, 0: busy, -1: fenced out.
static CLAIM: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(&format!(
        r#"{guard}if redis.call("SET", KEYS[1], ARGV[1], "NX", "PX", ARGV[2]) then return 1 end
local cur = redis.call("GET", KEYS[1])
if cur and string.sub(cur, 1, 4) == "done" then return 2 end
if cur == ARGV[1] then return 1 end
return 0"#,
        guard = crate::lease::fence_guard(3)
    ))
});
/// Writes the done marker (`ARGV[1]`, carrying the fencing token when there is one), fenced like [`CLAIM`].
static COMPLETE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(&format!(
        r#"{guard}redis.call("SET", KEYS[1], ARGV[1], "PX", ARGV[2]) return 1"#,
        guard = crate::lease::fence_guard(3)
    ))
});
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
        /// The config's key prefix, under which the channel leases' fencing counters live.
        key_prefix: String,
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

fn fenced(fence: Option<&Fence>) -> SinkError {
    if let Some(f) = fence {
        f.mark_lost();
    }
    SinkError::Fenced(format!(
        "another replica holds the lease of `{}` (our token {} is stale)",
        fence.map_or("?", |f| &f.key),
        fence.map_or(0, |f| f.token)
    ))
}

impl Idempotency {
    pub fn redis(conn: ConnectionManager, key_prefix: &str, ttls: Ttls) -> Self {
        Idempotency::Redis {
            conn,
            prefix: format!("{key_prefix}idem:"),
            key_prefix: key_prefix.to_string(),
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

    /// Takes the lease for (sink, key), or says why not. `held` is a token this caller already holds; `fence` the
    /// channel lease the event came under (a claim from a replica that lost it is refused: [`SinkError::Fenced`]).
    pub async fn claim(
        &self,
        sink: &str,
        key: &str,
        held: Option<&str>,
        fence: Option<&Fence>,
    ) -> Result<Claim, SinkError> {
        match self {
            Idempotency::Redis {
                conn,
                prefix,
                key_prefix,
                ttls,
            } => {
                let mut conn = conn.clone();
                let k = Self::key(prefix, sink, key);
                let token = held.map(str::to_string).unwrap_or_else(new_token);
                let fence_key = fence.map_or_else(|| k.clone(), |f| crate::lease::fence_key(key_prefix, &f.key));
                let claimed: i64 = CLAIM
                    .key(&k)
                    .key(fence_key)
                    .arg(&token)
                    .arg(ttls.lease.as_millis() as u64)
                    .arg(Fence::arg(fence))
                    .invoke_async(&mut conn)
                    .await
                    .map_err(redis_err)?;
                match claimed {
                    1 => Ok(Claim::Acquired(token)),
                    2 => Ok(Claim::Done),
                    -1 => Err(fenced(fence)),
                    _ => Ok(Claim::Busy),
                }
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
            Idempotency::Redis { conn, prefix, ttls, .. } => {
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

    /// Marks the action done: later deliveries of the same key skip it for the done TTL. Under a channel lease the
    /// marker carries its fencing token, and a replica that lost the lease cannot write it.
    pub async fn complete(&self, sink: &str, key: &str, fence: Option<&Fence>) -> Result<(), SinkError> {
        match self {
            Idempotency::Redis {
                conn,
                prefix,
                key_prefix,
                ttls,
            } => {
                let mut conn = conn.clone();
                let k = Self::key(prefix, sink, key);
                let (value, fence_key) = match fence {
                    Some(f) => (
                        format!("{DONE} {}", f.token),
                        crate::lease::fence_key(key_prefix, &f.key),
                    ),
                    None => (DONE.to_string(), k.clone()),
                };
                let done: i64 = COMPLETE
                    .key(&k)
                    .key(fence_key)
                    .arg(value)
                    .arg(ttls.done.as_millis() as u64)
                    .arg(Fence::arg(fence))
                    .invoke_async(&mut conn)
                    .await
                    .map_err(redis_err)?;
                if done == -1 { Err(fenced(fence)) } else { Ok(()) }
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
        let Claim::Acquired(token) = idem.claim("q", "k", None, None).await.unwrap() else {
            panic!("first claim")
        };
        assert_eq!(idem.claim("q", "k", None, None).await.unwrap(), Claim::Busy);
        assert_eq!(
            idem.claim("q", "k", Some(&token), None).await.unwrap(),
            Claim::Acquired(token.clone())
        );
        assert!(matches!(
            idem.claim("other-sink", "k", None, None).await.unwrap(),
            Claim::Acquired(_)
        ));
        // A crashed holder's lease expires: the action can run again.
        tokio::time::sleep(Duration::from_millis(80)).await;
        let Claim::Acquired(second) = idem.claim("q", "k", None, None).await.unwrap() else {
            panic!("after expiry")
        };
        idem.release("q", "k", &token).await.unwrap();
        assert_eq!(
            idem.claim("q", "k", None, None).await.unwrap(),
            Claim::Busy,
            "a stale token cannot release"
        );
        idem.complete("q", "k", None).await.unwrap();
        assert_eq!(idem.claim("q", "k", Some(&second), None).await.unwrap(), Claim::Done);
    }
}
