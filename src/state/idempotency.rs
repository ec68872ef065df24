//! Idempotency per action key, in two states (DESIGN.md §5): a short in-progress lease taken before the
//! sink call and renewed while it runs, and a long done marker written only after the side effect
//! succeeded. A crash leaves only the lease, which expires, so a redelivered event runs the action then:
//! never skipped for good, never run twice at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::Conn;
use super::lease::Fence;
use crate::failure::Failure;
use crate::obs::metrics as m;

/// The value a done marker holds.
const DONE: &str = "done";

/// Deletes the key only while it still holds our lease token (a lease that expired and was taken by
/// another holder must not be released by us).
const RELEASE: &str =
    r#"if redis.call("GET", KEYS[1]) == ARGV[1] then return redis.call("DEL", KEYS[1]) else return 0 end"#;
/// Claims and done markers of many actions in one script call. Per write `i`: `KEYS[2i-1]` the marker, `KEYS[2i]` the
/// fencing counter of the channel lease the event came under (the marker itself when unfenced); `ARGV[4i-3..4i]` the
/// kind (`claim` or `done`), the value (our lease token; `done` and the fencing token), the TTL in ms and the fencing
/// token ("" when unfenced). Per write it answers: a claim 1 (ours: taken, or already held by this token), 2 (done
/// before) or 0 (leased by another holder); a done marker 1; either -1 when the fencing counter moved past the token.
static WRITE_MARKS: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        r#"local out = {{}}
for i = 1, #KEYS / 2 do
  local key, counter = KEYS[2 * i - 1], KEYS[2 * i]
  local kind, value, ttl, token = ARGV[4 * i - 3], ARGV[4 * i - 2], ARGV[4 * i - 1], ARGV[4 * i]
  if {refused} then
    out[i] = -1
  elseif kind == "done" then
    redis.call("SET", key, value, "PX", ttl)
    out[i] = 1
  elseif redis.call("SET", key, value, "NX", "PX", ttl) then
    out[i] = 1
  else
    local cur = redis.call("GET", key)
    if cur and string.sub(cur, 1, 4) == "done" then out[i] = 2
    elseif cur == value then out[i] = 1
    else out[i] = 0 end
  end
end
return out"#,
        refused = super::lease::fence_refused("counter", "token")
    ))
});
/// The most marker writes sent in one script call (a few hundred microseconds of Redis time at most).
const MAX_BATCH: usize = 256;
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
        conn: Conn,
        /// Claims and done markers go through the marker writer, which batches concurrent ones.
        marks: MarkWriter,
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

fn redis_err(e: redis::RedisError) -> Failure {
    Failure::from_redis(&e)
}

fn fenced(fence: Option<&Fence>) -> Failure {
    if let Some(f) = fence {
        f.mark_lost();
    }
    Failure::Fenced(format!(
        "another replica holds the lease of `{}` (our token {} is stale)",
        fence.map_or("?", |f| &f.key),
        fence.map_or(0, |f| f.token)
    ))
}

impl Idempotency {
    /// Spawns the marker writer on the current tokio runtime; it ends when the last clone is dropped.
    pub fn redis(conn: Conn, key_prefix: &str, ttls: Ttls) -> Self {
        Idempotency::Redis {
            marks: MarkWriter::spawn(conn.clone()),
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

    /// Marker writes so far and the script calls that carried them (their ratio is the batch size); `None` in memory.
    pub fn write_stats(&self) -> Option<(u64, u64)> {
        match self {
            Idempotency::Redis { marks, .. } => Some(marks.stats()),
            Idempotency::Memory { .. } => None,
        }
    }

    /// Takes the lease for (sink, key), or says why not. `held` is a token this caller already holds; `fence` the
    /// channel lease the event came under (a claim from a replica that lost it is refused: [`Failure::Fenced`]).
    pub async fn claim(
        &self,
        sink: &str,
        key: &str,
        held: Option<&str>,
        fence: Option<&Fence>,
    ) -> Result<Claim, Failure> {
        match self {
            Idempotency::Redis {
                marks,
                prefix,
                key_prefix,
                ttls,
                ..
            } => {
                let token = held.map(str::to_string).unwrap_or_else(new_token);
                let marker = Self::key(prefix, sink, key);
                let mark = Mark::new(MarkKind::Claim, marker, token.clone(), ttls.lease, key_prefix, fence);
                match marks.write(mark).await? {
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
    pub async fn renew(&self, sink: &str, key: &str, token: &str) -> Result<(), Failure> {
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
    pub async fn complete(&self, sink: &str, key: &str, fence: Option<&Fence>) -> Result<(), Failure> {
        match self {
            Idempotency::Redis {
                marks,
                prefix,
                key_prefix,
                ttls,
                ..
            } => {
                let value = match fence {
                    Some(f) => format!("{DONE} {}", f.token),
                    None => DONE.to_string(),
                };
                let mark = Mark::new(
                    MarkKind::Done,
                    Self::key(prefix, sink, key),
                    value,
                    ttls.done,
                    key_prefix,
                    fence,
                );
                if marks.write(mark).await? == -1 {
                    Err(fenced(fence))
                } else {
                    Ok(())
                }
            }
            Idempotency::Memory { entries, ttls } => {
                let mut map = entries.lock().expect("idempotency lock is never poisoned");
                map.insert(Self::key("", sink, key), (DONE.to_string(), Instant::now() + ttls.done));
                Ok(())
            }
        }
    }

    /// Gives the lease up after a failure, so the next delivery (or a dead-letter retry) can run it.
    pub async fn release(&self, sink: &str, key: &str, token: &str) -> Result<(), Failure> {
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

/// Which marker a write sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MarkKind {
    /// The in-progress lease (`SET NX PX`, unless done or held by another token).
    Claim,
    /// The done marker (`SET PX`).
    Done,
}

/// One marker write, as [`WRITE_MARKS`] takes it.
struct Mark {
    kind: MarkKind,
    key: String,
    /// The fencing counter compared (the marker itself when unfenced: never read then, but declared).
    counter: String,
    value: String,
    ttl_ms: u64,
    /// The fencing token, "" when unfenced.
    token: String,
}

impl Mark {
    fn new(kind: MarkKind, key: String, value: String, ttl: Duration, key_prefix: &str, fence: Option<&Fence>) -> Mark {
        Mark {
            kind,
            counter: fence.map_or_else(|| key.clone(), |f| super::lease::fence_key(key_prefix, &f.key)),
            key,
            value,
            ttl_ms: ttl.as_millis() as u64,
            token: Fence::arg(fence),
        }
    }
}

type Reply = oneshot::Sender<Result<i64, Failure>>;

/// Writes claims and done markers for every dispatcher task of the process, batching the writes that wait at the
/// same moment into one script call (one round trip, one command for Redis) instead of one call each: the events of a
/// delivered batch reach their claims, and later their done markers, at about the same time. Each caller still gets
/// its own answer, and a failed call fails each of its writes, which each caller then retries as before. A batch is
/// sent as soon as it is taken, while earlier calls are still in flight: batching adds no round trip, and a lone
/// write goes out at once.
#[derive(Clone)]
pub struct MarkWriter {
    tx: mpsc::UnboundedSender<(Mark, Reply)>,
    /// Writes and script calls so far.
    stats: Arc<(AtomicU64, AtomicU64)>,
}

impl MarkWriter {
    fn spawn(conn: Conn) -> MarkWriter {
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
        tokio::spawn(Self::run(conn, rx, stats.clone()));
        MarkWriter { tx, stats }
    }

    async fn write(&self, mark: Mark) -> Result<i64, Failure> {
        let (reply, answer) = oneshot::channel();
        let stopped = || Failure::Transient("the idempotency marker writer has stopped (shutting down)".into());
        self.tx.send((mark, reply)).map_err(|_| stopped())?;
        answer.await.unwrap_or_else(|_| Err(stopped()))
    }

    fn stats(&self) -> (u64, u64) {
        (
            self.stats.0.load(Ordering::Relaxed),
            self.stats.1.load(Ordering::Relaxed),
        )
    }

    /// Until every sender is gone: takes the writes waiting, sends them in one call, and goes on to the next batch
    /// while that call is in flight (the multiplexed connection pipelines the calls: a write never waits for another
    /// batch's round trip).
    async fn run(conn: Conn, mut rx: mpsc::UnboundedReceiver<(Mark, Reply)>, stats: Arc<(AtomicU64, AtomicU64)>) {
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            // The tasks woken together with the first writer's (one delivered batch) add theirs before we send.
            tokio::task::yield_now().await;
            while batch.len() < MAX_BATCH
                && let Ok(write) = rx.try_recv()
            {
                batch.push(write);
            }
            stats.0.fetch_add(batch.len() as u64, Ordering::Relaxed);
            stats.1.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(m::IDEMPOTENCY_WRITES).increment(batch.len() as u64);
            metrics::counter!(m::IDEMPOTENCY_CALLS).increment(1);
            tokio::spawn(Self::send(conn.clone(), batch));
        }
    }

    /// One call with every write of `batch`; answers each.
    async fn send(mut conn: Conn, batch: Vec<(Mark, Reply)>) {
        let mut call = WRITE_MARKS.prepare_invoke();
        for (mark, _) in &batch {
            let kind = match mark.kind {
                MarkKind::Claim => "claim",
                MarkKind::Done => "done",
            };
            call.key(&mark.key)
                .key(&mark.counter)
                .arg(kind)
                .arg(&mark.value)
                .arg(mark.ttl_ms)
                .arg(&mark.token);
        }
        let answer = match call.invoke_async::<Vec<i64>>(&mut conn).await {
            Ok(codes) if codes.len() == batch.len() => Ok(codes),
            Ok(codes) => Err(Failure::Permanent(format!(
                "the marker script answered {} results for {} writes",
                codes.len(),
                batch.len()
            ))),
            Err(e) => Err(Failure::from_redis(&e)),
        };
        match answer {
            Ok(codes) => {
                for ((_, reply), code) in batch.into_iter().zip(codes) {
                    let _ = reply.send(Ok(code));
                }
            }
            Err(err) => {
                for (_, reply) in batch {
                    let _ = reply.send(Err(err.clone()));
                }
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
