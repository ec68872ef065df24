//! The in-memory queue, cache and dead letters used when the config has no `redis` (the demo).

use std::sync::Mutex;

use indexmap::IndexMap;
use serde_json::Value;

/// A job as the in-memory queue holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryJob {
    pub queue: String,
    pub name: String,
    pub id: String,
    pub data: Value,
}

#[derive(Debug, Default)]
pub struct MemoryBackend {
    /// Jobs by (queue, job id): re-adding an existing id keeps the first job, as BullMQ does.
    pub jobs: Mutex<IndexMap<(String, String), MemoryJob>>,
    pub invalidated_keys: Mutex<Vec<String>>,
    pub invalidated_patterns: Mutex<Vec<String>>,
    pub published: Mutex<Vec<(String, String)>>,
    pub dead_letters: Mutex<Vec<Value>>,
}

impl MemoryBackend {
    pub fn jobs(&self) -> Vec<MemoryJob> {
        self.jobs
            .lock()
            .expect("memory backend lock is never poisoned")
            .values()
            .cloned()
            .collect()
    }

    pub fn dead_letters(&self) -> Vec<Value> {
        self.dead_letters
            .lock()
            .expect("memory backend lock is never poisoned")
            .clone()
    }

    pub fn invalidated_keys(&self) -> Vec<String> {
        self.invalidated_keys
            .lock()
            .expect("memory backend lock is never poisoned")
            .clone()
    }
}
