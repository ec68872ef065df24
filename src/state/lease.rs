//! One active subscriber per channel across replicas: a lease in Redis per checkpoint key (a channel in one mode),
//! and a fencing token that every position write and every idempotency marker of that channel carries.
//!
//! - `<prefix>lease:<key>` holds `"<instance> <token>"` with a TTL (`SET PX`); the holder renews it at a third of
//!   its lifetime. Whoever finds it absent (or finds its own instance name there, after a restart) takes it.
//! - `<prefix>fence:<key>` is a counter, incremented on every take: the holder's token. A write fenced with an
//!   older token is refused by Redis itself (a Lua script compares the counter), so a replica that was paused past
//!   its lease, or cut off from Redis, can never move a position or mark an action done once another replica took
//!   over. Its in-flight events are abandoned, not settled; the new holder redelivers them from the stored position.
//!
//! Redis is the coordinator: a Redis failover that loses the last writes can, in principle, hand the lease out twice;
//! the fencing counter then still orders the two holders, and BullMQ's job ids absorb a repeated enqueue.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::Conn;
use crate::failure::Failure;

/// Takes the lease when it is free or held under our own instance name (our previous life), with a new token.
const ACQUIRE: &str = r#"
local cur = redis.call("GET", KEYS[1])
if cur and string.sub(cur, 1, string.len(ARGV[1]) + 1) ~= ARGV[1] .. " " then return 0 end
local token = redis.call("INCR", KEYS[2])
redis.call("SET", KEYS[1], ARGV[1] .. " " .. token, "PX", ARGV[2])
return token
"#;
/// Extends the lease only while it still holds our value.
const RENEW: &str =
    r#"if redis.call("GET", KEYS[1]) == ARGV[1] then return redis.call("PEXPIRE", KEYS[1], ARGV[2]) else return 0 end"#;
/// Gives the lease up only while it still holds our value.
const RELEASE: &str =
    r#"if redis.call("GET", KEYS[1]) == ARGV[1] then return redis.call("DEL", KEYS[1]) else return 0 end"#;

/// The Redis key of a checkpoint key's fencing counter, under the config's key prefix.
pub fn fence_key(key_prefix: &str, key: &str) -> String {
    format!("{key_prefix}fence:{key}")
}

/// The Lua condition under which a fenced write is refused: `token` (a Lua expression: our token, "" when
/// unfenced) is not the fencing counter stored at `counter` (a Lua expression naming its key).
pub fn fence_refused(counter: &str, token: &str) -> String {
    format!(r#"{token} ~= "" and tonumber(redis.call("GET", {counter}) or "0") ~= tonumber({token})"#)
}

/// The Lua guard fenced writes start with: `KEYS[2]` is the fencing counter, `ARGV[fence_arg]` our token ("" when
/// unfenced). Refused writes return -1.
pub fn fence_guard(fence_arg: usize) -> String {
    format!(
        "if {} then return -1 end\n",
        fence_refused("KEYS[2]", &format!("ARGV[{fence_arg}]"))
    )
}

/// A holder's right to write one channel's position and markers: the checkpoint key, the lease's token, and
/// whether the lease was lost since (then nothing more is written under it).
#[derive(Debug)]
pub struct Fence {
    pub key: Arc<str>,
    pub token: u64,
    lost: AtomicBool,
    lost_tx: watch::Sender<bool>,
}

impl Fence {
    pub fn new(key: Arc<str>, token: u64) -> Fence {
        Fence {
            key,
            token,
            lost: AtomicBool::new(false),
            lost_tx: watch::Sender::new(false),
        }
    }

    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    /// Marks the lease lost (a renewal or a fenced write was refused); the channel stops and stands by.
    pub fn mark_lost(&self) {
        if !self.lost.swap(true, Ordering::AcqRel) {
            tracing::warn!(key = %self.key, token = self.token, "Lease lost: this replica stops writing this channel's position and stands by.");
            self.lost_tx.send_replace(true);
        }
    }

    /// Resolves once the lease is lost.
    pub async fn lost(&self) {
        let mut rx = self.lost_tx.subscribe();
        let _ = rx.wait_for(|lost| *lost).await;
    }

    /// The token as a script argument.
    pub fn arg(fence: Option<&Fence>) -> String {
        fence.map(|f| f.token.to_string()).unwrap_or_default()
    }
}

/// Checkpoint key -> (the lease value we wrote, its fence).
type Held = HashMap<Arc<str>, (String, Arc<Fence>)>;

/// This replica's leases.
pub struct Leases {
    conn: Conn,
    key_prefix: String,
    pub instance: String,
    pub ttl: Duration,
    held: Mutex<Held>,
    /// How many leases this replica holds (role `active` when > 0).
    holding: watch::Sender<usize>,
}

impl Leases {
    pub fn new(conn: Conn, key_prefix: &str, instance: String, ttl: Duration) -> Leases {
        Leases {
            conn,
            key_prefix: key_prefix.to_string(),
            instance,
            ttl,
            held: Mutex::default(),
            holding: watch::Sender::new(0),
        }
    }

    fn lease_key(&self, key: &str) -> String {
        format!("{}lease:{key}", self.key_prefix)
    }

    /// How often the holder renews, and a standby retries.
    pub fn renew_every(&self) -> Duration {
        self.ttl / 3
    }

    /// The number of leases held, watched (for the role in `/healthz` and metrics).
    pub fn holding(&self) -> watch::Receiver<usize> {
        self.holding.subscribe()
    }

    fn update_holding(&self, held: &Held) {
        let n = held.len();
        self.holding.send_if_modified(|h| std::mem::replace(h, n) != n);
        let role = if n > 0 { "active" } else { "standby" };
        crate::obs::metrics::set_role(role);
    }

    /// Who holds the lease of `key` now (its instance name), and for how much longer unless renewed; `None` when
    /// nobody does.
    pub async fn holder(&self, key: &str) -> Result<Option<(String, Duration)>, Failure> {
        let mut conn = self.conn.clone();
        let lease = self.lease_key(key);
        let (value, ttl_ms): (Option<String>, i64) = redis::pipe()
            .cmd("GET")
            .arg(&lease)
            .cmd("PTTL")
            .arg(&lease)
            .query_async(&mut conn)
            .await
            .map_err(|e| Failure::from_redis(&e))?;
        Ok(value.map(|v| {
            let instance = v.rsplit_once(' ').map_or(v.as_str(), |(name, _)| name).to_string();
            (instance, Duration::from_millis(ttl_ms.max(0) as u64))
        }))
    }

    /// Takes the lease of `key` if nobody else holds it.
    pub async fn try_acquire(&self, key: &Arc<str>) -> Result<Option<Arc<Fence>>, Failure> {
        let mut conn = self.conn.clone();
        let token: i64 = redis::Script::new(ACQUIRE)
            .key(self.lease_key(key))
            .key(fence_key(&self.key_prefix, key))
            .arg(&self.instance)
            .arg(self.ttl.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| Failure::from_redis(&e))?;
        if token <= 0 {
            return Ok(None);
        }
        let fence = Arc::new(Fence::new(key.clone(), token as u64));
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.insert(key.clone(), (format!("{} {token}", self.instance), fence.clone()));
        self.update_holding(&held);
        Ok(Some(fence))
    }

    /// Extends the lease; `Ok(false)` when it is no longer ours.
    pub async fn renew(&self, fence: &Fence) -> Result<bool, Failure> {
        let Some(value) = self.value_of(fence) else {
            return Ok(false);
        };
        let mut conn = self.conn.clone();
        let renewed: i64 = redis::Script::new(RENEW)
            .key(self.lease_key(&fence.key))
            .arg(value)
            .arg(self.ttl.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| Failure::from_redis(&e))?;
        Ok(renewed == 1)
    }

    fn value_of(&self, fence: &Fence) -> Option<String> {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.get(&fence.key)
            .filter(|(_, f)| f.token == fence.token)
            .map(|(v, _)| v.clone())
    }

    /// Forgets a lease this replica lost (it stands by).
    pub fn forget(&self, fence: &Fence) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if held.get(&fence.key).is_some_and(|(_, f)| f.token == fence.token) {
            held.remove(&fence.key);
        }
        self.update_holding(&held);
    }

    /// Gives every lease up (graceful shutdown, after the last positions were stored): a standby takes over at once.
    pub async fn release_all(&self) {
        let all: Vec<Arc<Fence>> = {
            let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            held.values().map(|(_, f)| f.clone()).collect()
        };
        for fence in all {
            self.release(&fence).await;
        }
    }

    /// Gives one lease up; nothing more is written under it.
    pub async fn release(&self, fence: &Fence) {
        let Some(value) = self.value_of(fence) else {
            return;
        };
        // Nothing more is written under it; whoever waits on `lost()` (the renewer) stops now.
        fence.lost.store(true, Ordering::Release);
        fence.lost_tx.send_replace(true);
        self.forget(fence);
        let key = &fence.key;
        {
            let mut conn = self.conn.clone();
            let released = redis::Script::new(RELEASE)
                .key(self.lease_key(key))
                .arg(&value)
                .invoke_async::<i64>(&mut conn)
                .await;
            match released {
                Ok(_) => {
                    metrics::counter!(crate::obs::metrics::LEASE_CHANGES, "channel" => key.to_string(), "event" => "released")
                        .increment(1);
                    tracing::info!(%key, "Lease released; a standby replica takes over.");
                }
                Err(e) => {
                    tracing::warn!(%key, error = %e, "Cannot release the lease; a standby takes over once it expires.")
                }
            }
        }
    }

    /// Keeps `fence`'s lease alive until it is lost or the returned task is aborted. A refused renewal marks it lost
    /// at once; when Redis cannot be reached, it is given up before it could have expired (two thirds of the TTL
    /// after the last renewal), so a standby never takes over while we still write.
    pub fn keep_alive(self: &Arc<Self>, fence: Arc<Fence>) -> tokio::task::JoinHandle<()> {
        let leases = self.clone();
        tokio::spawn(async move {
            let mut last_ok = tokio::time::Instant::now();
            let give_up = leases.ttl * 2 / 3;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(leases.renew_every()) => {}
                    () = fence.lost() => break,
                }
                // A renewal that runs past the give-up time counts as failed.
                let left = give_up.saturating_sub(last_ok.elapsed());
                match tokio::time::timeout(left, leases.renew(&fence)).await {
                    Ok(Ok(true)) => last_ok = tokio::time::Instant::now(),
                    Ok(Ok(false)) => {
                        fence.mark_lost();
                        break;
                    }
                    Ok(Err(e)) => tracing::warn!(key = %fence.key, error = %e, "Cannot renew the lease; retrying."),
                    Err(_) => {}
                }
                if last_ok.elapsed() >= give_up {
                    tracing::error!(key = %fence.key, "The lease could not be renewed in time; giving it up before it expires.");
                    fence.mark_lost();
                    break;
                }
            }
            leases.forget(&fence);
        })
    }
}
