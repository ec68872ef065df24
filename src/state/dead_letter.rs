//! Dead letters: events (or single actions) parked for an operator, with everything needed to retry.

use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;

use super::Conn;
use super::MemoryBackend;
use crate::event::Event;
use crate::failure::Failure;
use crate::plan::Action;

/// One dead letter.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct DeadLetter {
    /// Milliseconds since the epoch when it was written.
    pub at_ms: u64,
    pub reason: String,
    pub rules_version: Option<String>,
    pub event_id: Option<String>,
    pub route: Option<String>,
    pub record_id: Option<String>,
    /// The action that failed, when it was one action (retried by running it again).
    pub action: Option<Action>,
    pub attempts: u32,
    /// The whole event, with its recorded enrichment.
    pub event: Option<Event>,
    /// The raw input, when it could not be decoded into an event.
    pub raw: Option<String>,
}

impl DeadLetter {
    /// One action that failed (or a `dead-letter` action): `dead-letter retry` runs the action again.
    pub fn of_action(rules_version: &str, event: Event, action: Action, reason: String, attempts: u32) -> Self {
        DeadLetter {
            event_id: Some(event.id.clone()),
            route: Some(action.route.clone()),
            record_id: action.record_id.clone(),
            action: Some(action),
            attempts,
            event: Some(event),
            ..Self::new(rules_version, reason)
        }
    }

    /// A whole event (no route matched it under `on_unmatched: dead-letter`, or handling it failed): `dead-letter
    /// retry` delivers it again. `None` when even the event is gone.
    pub fn of_event(rules_version: &str, event: Option<Event>, reason: String) -> Self {
        DeadLetter {
            event_id: event.as_ref().map(|e| e.id.clone()),
            event,
            ..Self::new(rules_version, reason)
        }
    }

    /// Input that is not an event (a malformed line), kept as it was read.
    pub fn of_input(rules_version: &str, raw: String, reason: String) -> Self {
        DeadLetter {
            raw: Some(raw),
            ..Self::new(rules_version, reason)
        }
    }

    fn new(rules_version: &str, reason: String) -> Self {
        DeadLetter {
            at_ms: crate::clock::now_ms(),
            reason,
            rules_version: Some(rules_version.to_string()),
            event_id: None,
            route: None,
            record_id: None,
            action: None,
            attempts: 0,
            event: None,
            raw: None,
        }
    }
}

pub enum DeadLetters {
    Redis { conn: Conn, key: String, max_len: usize },
    Memory(Arc<MemoryBackend>),
}

impl DeadLetters {
    pub fn redis(conn: Conn, key_prefix: &str, max_len: usize) -> Self {
        DeadLetters::Redis {
            conn,
            key: format!("{key_prefix}dead-letters"),
            max_len,
        }
    }

    pub fn memory(memory: Arc<MemoryBackend>) -> Self {
        DeadLetters::Memory(memory)
    }

    /// Stores a dead letter; returns its id (what `dead-letter show` takes).
    pub async fn write(&self, letter: &DeadLetter) -> Result<String, Failure> {
        let entry = serde_json::to_value(letter).map_err(|e| Failure::Permanent(e.to_string()))?;
        match self {
            DeadLetters::Redis { conn, key, max_len } => {
                let mut conn = conn.clone();
                redis::cmd("XADD")
                    .arg(key)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(*max_len)
                    .arg("*")
                    .arg("entry")
                    .arg(entry.to_string())
                    .query_async::<String>(&mut conn)
                    .await
                    .map_err(|e| Failure::from_redis(&e))
            }
            DeadLetters::Memory(memory) => {
                let mut letters = memory
                    .dead_letters
                    .lock()
                    .expect("memory backend lock is never poisoned");
                letters.push(entry);
                Ok(format!("{}-0", letters.len() - 1))
            }
        }
    }

    /// Every stored dead letter with its id, oldest first.
    pub async fn list(&self) -> Result<Vec<(String, Value)>, Failure> {
        match self {
            DeadLetters::Redis { conn, key, .. } => {
                let mut conn = conn.clone();
                let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
                    .arg(key)
                    .arg("-")
                    .arg("+")
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| Failure::from_redis(&e))?;
                Ok(entries
                    .into_iter()
                    .filter_map(|(id, fields)| {
                        let entry = fields.into_iter().find(|(k, _)| k == "entry")?.1;
                        Some((id, serde_json::from_str(&entry).ok()?))
                    })
                    .collect())
            }
            DeadLetters::Memory(memory) => Ok(memory
                .dead_letters()
                .into_iter()
                .enumerate()
                .map(|(i, v)| (format!("{i}-0"), v))
                .collect()),
        }
    }

    /// Removes dead letters by id; returns how many were removed.
    pub async fn delete(&self, ids: &[String]) -> Result<usize, Failure> {
        match self {
            DeadLetters::Redis { conn, key, .. } => {
                if ids.is_empty() {
                    return Ok(0);
                }
                let mut conn = conn.clone();
                let n: usize = redis::cmd("XDEL")
                    .arg(key)
                    .arg(ids)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| Failure::from_redis(&e))?;
                Ok(n)
            }
            DeadLetters::Memory(memory) => {
                let mut letters = memory
                    .dead_letters
                    .lock()
                    .expect("memory backend lock is never poisoned");
                let before = letters.len();
                let keep: Vec<Value> = std::mem::take(&mut *letters)
                    .into_iter()
                    .enumerate()
                    .filter(|(i, _)| !ids.contains(&format!("{i}-0")))
                    .map(|(_, v)| v)
                    .collect();
                *letters = keep;
                Ok(before - letters.len())
            }
        }
    }
}
