//! The runaway guard's state: how often each guarded route fired within its window, and which routes are paused.
//! In the main Redis (shared by every replica: a pause one replica decides holds on all of them) or in memory.
//!
//! Keys: `{prefix}routes:paused` (a hash: route -> the pause as JSON) and `{prefix}routes:fires:{route}` (a sorted
//! set of the fires within the window, scored by time, one member per event and record, so a redelivered event
//! is not counted twice).

use std::collections::{BTreeMap, HashMap};
use std::sync::{LazyLock, Mutex};

use serde::{Deserialize, Serialize};

use super::Conn;
use crate::failure::Failure;
use crate::plan::Limit;

/// A paused route: why, since when, and who paused it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pause {
    pub reason: String,
    pub at_ms: u64,
    /// The replica whose guard paused it, or `operator` for `switchyard route pause`.
    pub by: String,
}

/// What the guard says about one fire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admit {
    /// Within the limit: run the actions.
    Run,
    /// The route is paused (this fire just paused it when `newly`): dead-letter the actions with `reason`.
    Paused { reason: String, newly: bool },
}

/// Checks the pause, drops fires older than the window, and counts this one unless the limit is reached, in which
/// case the route is paused. One round trip per fire of a guarded route.
static ADMIT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local paused = redis.call('HGET', KEYS[1], ARGV[1])
if paused then return {1, paused} end
local now, per, fires = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - per)
if redis.call('ZSCORE', KEYS[2], ARGV[5]) then return {0, ''} end
if redis.call('ZCARD', KEYS[2]) >= fires then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[6])
  return {2, ARGV[6]}
end
redis.call('ZADD', KEYS[2], now, ARGV[5])
redis.call('PEXPIRE', KEYS[2], per)
return {0, ''}
"#,
    )
});

pub enum Pauses {
    Redis {
        conn: Conn,
        prefix: String,
        instance: String,
    },
    Memory(Mutex<MemoryPauses>),
}

#[derive(Default)]
pub struct MemoryPauses {
    paused: BTreeMap<String, Pause>,
    fires: HashMap<String, BTreeMap<String, u64>>,
}

impl Pauses {
    pub fn redis(conn: Conn, key_prefix: &str, instance: String) -> Self {
        Pauses::Redis {
            conn,
            prefix: key_prefix.to_string(),
            instance,
        }
    }

    pub fn memory() -> Self {
        Pauses::Memory(Mutex::default())
    }

    /// The in-memory state (a poisoned lock still holds consistent maps: every change is one insert or remove).
    fn locked(m: &Mutex<MemoryPauses>) -> std::sync::MutexGuard<'_, MemoryPauses> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn paused_key(prefix: &str) -> String {
        format!("{prefix}routes:paused")
    }

    fn fires_key(prefix: &str, route: &str) -> String {
        format!("{prefix}routes:fires:{route}")
    }

    /// Counts one fire of `route` (`member` identifies the event and record) against `limit`.
    pub async fn admit(&self, route: &str, member: &str, limit: &Limit, now_ms: u64) -> Result<Admit, Failure> {
        let per_ms = limit.per.as_millis() as u64;
        match self {
            Pauses::Redis { conn, prefix, instance } => {
                let pause = Pause {
                    reason: limit.reason(),
                    at_ms: now_ms,
                    by: instance.clone(),
                };
                let mut conn = conn.clone();
                let (code, json): (i64, String) = ADMIT
                    .key(Self::paused_key(prefix))
                    .key(Self::fires_key(prefix, route))
                    .arg(route)
                    .arg(now_ms)
                    .arg(per_ms)
                    .arg(limit.fires)
                    .arg(member)
                    .arg(serde_json::to_string(&pause).unwrap_or_default())
                    .invoke_async(&mut conn)
                    .await
                    .map_err(|e| Failure::from_redis(&e))?;
                Ok(match code {
                    0 => Admit::Run,
                    _ => Admit::Paused {
                        reason: serde_json::from_str::<Pause>(&json).map_or_else(|_| limit.reason(), |p| p.reason),
                        newly: code == 2,
                    },
                })
            }
            Pauses::Memory(m) => {
                let mut m = Self::locked(m);
                if let Some(p) = m.paused.get(route) {
                    return Ok(Admit::Paused {
                        reason: p.reason.clone(),
                        newly: false,
                    });
                }
                let fires = m.fires.entry(route.to_string()).or_default();
                fires.retain(|_, at| *at + per_ms > now_ms);
                if fires.contains_key(member) {
                    return Ok(Admit::Run);
                }
                if fires.len() >= limit.fires as usize {
                    let pause = Pause {
                        reason: limit.reason(),
                        at_ms: now_ms,
                        by: "this process".into(),
                    };
                    m.paused.insert(route.to_string(), pause);
                    return Ok(Admit::Paused {
                        reason: limit.reason(),
                        newly: true,
                    });
                }
                fires.insert(member.to_string(), now_ms);
                Ok(Admit::Run)
            }
        }
    }

    /// Every paused route.
    pub async fn list(&self) -> Result<BTreeMap<String, Pause>, Failure> {
        match self {
            Pauses::Redis { conn, prefix, .. } => {
                let mut conn = conn.clone();
                let all: HashMap<String, String> = redis::cmd("HGETALL")
                    .arg(Self::paused_key(prefix))
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| Failure::from_redis(&e))?;
                Ok(all
                    .into_iter()
                    .map(|(route, json)| {
                        let pause = serde_json::from_str(&json).unwrap_or(Pause {
                            reason: json,
                            at_ms: 0,
                            by: "?".into(),
                        });
                        (route, pause)
                    })
                    .collect())
            }
            Pauses::Memory(m) => Ok(Self::locked(m).paused.clone()),
        }
    }

    /// Pauses a route by hand; false when it was paused already.
    pub async fn pause(&self, route: &str, pause: &Pause) -> Result<bool, Failure> {
        match self {
            Pauses::Redis { conn, prefix, .. } => {
                let mut conn = conn.clone();
                let set: i64 = redis::cmd("HSETNX")
                    .arg(Self::paused_key(prefix))
                    .arg(route)
                    .arg(serde_json::to_string(pause).unwrap_or_default())
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| Failure::from_redis(&e))?;
                Ok(set == 1)
            }
            Pauses::Memory(m) => Ok(Self::locked(m)
                .paused
                .insert(route.to_string(), pause.clone())
                .is_none()),
        }
    }

    /// Resumes a route and forgets its fires (the window starts afresh); false when it was not paused.
    pub async fn resume(&self, route: &str) -> Result<bool, Failure> {
        match self {
            Pauses::Redis { conn, prefix, .. } => {
                let mut conn = conn.clone();
                let (removed, _): (i64, i64) = redis::pipe()
                    .atomic()
                    .cmd("HDEL")
                    .arg(Self::paused_key(prefix))
                    .arg(route)
                    .cmd("DEL")
                    .arg(Self::fires_key(prefix, route))
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| Failure::from_redis(&e))?;
                Ok(removed == 1)
            }
            Pauses::Memory(m) => {
                let mut m = Self::locked(m);
                m.fires.remove(route);
                Ok(m.paused.remove(route).is_some())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Admit, Pauses};
    use crate::plan::Limit;

    #[tokio::test]
    async fn the_fire_after_the_limit_pauses_until_resumed_and_old_fires_leave_the_window() {
        let pauses = Pauses::memory();
        let limit = Limit {
            fires: 2,
            per: Duration::from_secs(60),
        };
        assert_eq!(pauses.admit("r", "e1", &limit, 1_000).await.unwrap(), Admit::Run);
        // A redelivery of a counted fire is not a new fire.
        assert_eq!(pauses.admit("r", "e1", &limit, 1_001).await.unwrap(), Admit::Run);
        assert_eq!(pauses.admit("r", "e2", &limit, 2_000).await.unwrap(), Admit::Run);
        // Past the window, the first fire no longer counts.
        assert_eq!(pauses.admit("r", "e3", &limit, 61_500).await.unwrap(), Admit::Run);
        let paused = pauses.admit("r", "e4", &limit, 61_600).await.unwrap();
        assert_eq!(
            paused,
            Admit::Paused {
                reason: "route paused: fired 2 times in 1m".into(),
                newly: true
            }
        );
        assert!(matches!(
            pauses.admit("r", "e5", &limit, 999_999).await.unwrap(),
            Admit::Paused { newly: false, .. }
        ));
        assert!(pauses.admit("other", "e5", &limit, 61_600).await.unwrap() == Admit::Run);
        assert!(pauses.resume("r").await.unwrap());
        assert!(!pauses.resume("r").await.unwrap());
        assert_eq!(pauses.admit("r", "e6", &limit, 1_000_000).await.unwrap(), Admit::Run);
    }
}
