//! A Plan: the actions the router decided for one event, rendered and ready for the dispatcher. Also what a
//! rendered action carries (log levels, BullMQ job options), so that rules, sinks and config all read them
//! from here without importing one another.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// One rendered action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Action {
    pub route: String,
    pub sink: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub record_id: Option<String>,
    /// A shadow route's action: recorded, never sent to its sink.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shadow: bool,
    /// One of the route's `on_failure` actions, run because another of its actions was dead-lettered.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub on_failure: bool,
    #[serde(flatten)]
    pub op: Op,
}

/// What an action does, per sink kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Op {
    Enqueue {
        idempotency_key: String,
        job_id: String,
        data: Value,
        options: JobOptions,
    },
    Invalidate {
        keys: Vec<String>,
        patterns: Vec<String>,
        publish: Option<(String, String)>,
    },
    Log {
        level: LogLevel,
        message: String,
        fields: Map<String, Value>,
    },
    Webhook {
        /// Sent as `Idempotency-Key`; also the dispatcher's idempotency key.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        idempotency_key: Option<String>,
        body: Value,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        headers: Vec<(String, String)>,
    },
    DeadLetter {
        reason: String,
    },
    /// PATCH `/sobjects/{object}/{id}` with `fields` (the built-in `salesforce-update` sink).
    SalesforceUpdate {
        object: String,
        id: String,
        fields: Map<String, Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        idempotency_key: Option<String>,
    },
}

impl Action {
    /// The key the dispatcher guards this action with (queue and webhook actions that have one).
    pub fn idempotency_key(&self) -> Option<&str> {
        match &self.op {
            Op::Enqueue { idempotency_key, .. } => Some(idempotency_key),
            Op::Webhook { idempotency_key, .. } | Op::SalesforceUpdate { idempotency_key, .. } => {
                idempotency_key.as_deref()
            }
            _ => None,
        }
    }

    /// Replaces the named job data, webhook body and log fields by `***` (the config's `redact`).
    pub fn redact(&mut self, names: &[String]) {
        let map = match &mut self.op {
            Op::Log { fields, .. } | Op::SalesforceUpdate { fields, .. } => fields,
            Op::Enqueue {
                data: Value::Object(data),
                ..
            }
            | Op::Webhook {
                body: Value::Object(data),
                ..
            } => data,
            _ => return,
        };
        for f in names {
            if let Some(v) = map.get_mut(f) {
                *v = Value::from("***");
            }
        }
    }
    /// The correlation id the rule put into the job data, webhook body or log fields (`correlationId` or
    /// `correlation_id`), for log lines and stream entries.
    pub fn correlation_id(&self) -> Option<&str> {
        let map = match &self.op {
            Op::Enqueue {
                data: Value::Object(m), ..
            }
            | Op::Webhook {
                body: Value::Object(m), ..
            } => m,
            Op::Log { fields, .. } => fields,
            _ => return None,
        };
        ["correlationId", "correlation_id"]
            .iter()
            .find_map(|k| map.get(*k).and_then(Value::as_str))
            .filter(|s| !s.is_empty())
    }

    /// A one-line human summary (`enqueue-provisioning: job activation-801...`).
    pub fn summary(&self) -> String {
        format!(
            "{}{}: {}",
            if self.shadow { "(shadow) " } else { "" },
            self.sink,
            self.what()
        )
    }

    /// What the action does, without its sink (`job activation-801...`).
    pub fn what(&self) -> String {
        match &self.op {
            Op::Enqueue { job_id, .. } => format!("job {job_id}"),
            Op::Invalidate {
                keys,
                patterns,
                publish,
            } => {
                let mut parts: Vec<String> = keys
                    .iter()
                    .cloned()
                    .chain(patterns.iter().map(|p| format!("{p} (pattern)")))
                    .collect();
                if let Some((channel, _)) = publish {
                    parts.push(format!("publish {channel}"));
                }
                if parts.is_empty() {
                    "no keys (every key had a missing part)".into()
                } else {
                    parts.join(", ")
                }
            }
            Op::Log { message, .. } => format!("\"{message}\""),
            Op::Webhook { idempotency_key, .. } => match idempotency_key {
                Some(key) => format!("POST (Idempotency-Key {key})"),
                None => "POST".to_string(),
            },
            Op::DeadLetter { reason } => reason.clone(),
            Op::SalesforceUpdate { object, id, fields, .. } => {
                let names: Vec<&str> = fields.keys().map(String::as_str).collect();
                format!("update {object} {id} ({})", names.join(", "))
            }
        }
    }
}

/// How a route ended for one record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", content = "error", rename_all = "kebab-case")]
pub enum Outcome {
    /// `when` and `guard` held: the `then` actions.
    Then,
    /// `when` held, `guard` did not: the `else` actions.
    Else,
    /// A predicate, the enrichment or a template failed: the event is dead-lettered for this route.
    Failed(String),
}

/// A route whose `when` held (or failed) for one record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub route: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub record_id: Option<String>,
    #[serde(flatten)]
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shadow: bool,
}

/// Everything the router decided for one event, under one rules version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub event_id: String,
    pub rules_version: String,
    pub decisions: Vec<Decision>,
    /// In record order, each record's actions in route and action order.
    pub actions: Vec<Action>,
}

impl Plan {
    /// Whether any route's `when` held (or failed) for any record.
    pub fn matched(&self) -> bool {
        !self.decisions.is_empty()
    }
}

/// The BullMQ job id for an idempotency key: the key itself when BullMQ accepts it as a custom id,
/// otherwise a hash of it (BullMQ refuses integer ids and ids with `:` other than its own three-part form).
pub fn job_id_for(key: &str) -> String {
    let acceptable = !key.is_empty() && !key.contains(':') && key.parse::<i64>().is_err() && key.len() <= 200;
    if acceptable {
        key.to_string()
    } else {
        let digest = Sha256::digest(key.as_bytes());
        let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
        format!("sy-{hex}")
    }
}

/// A route's runaway guard: fired more than `fires` times within `per`, the route is paused on every replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    /// Fires allowed within `per`; the next one pauses the route.
    #[schemars(example = 100)]
    pub fires: u32,
    /// The window: a number with `s`, `m` or `h` (`30s`, `1m`, `1h`).
    #[serde(with = "window")]
    #[schemars(with = "String", regex(pattern = r"^[1-9][0-9]*(s|m|h)$"), example = &"1m")]
    pub per: std::time::Duration,
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} per {}", self.fires, window::text(self.per))
    }
}

impl Limit {
    /// The reason an event's actions are dead-lettered with while its route is paused.
    pub fn reason(&self) -> String {
        format!("route paused: fired {} times in {}", self.fires, window::text(self.per))
    }
}

mod window {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn parse(s: &str) -> Option<Duration> {
        let (n, unit) = s.trim().split_at(s.trim().len().checked_sub(1)?);
        let n: u64 = n.parse().ok().filter(|n| *n > 0)?;
        let secs = match unit {
            "s" => n,
            "m" => n * 60,
            "h" => n * 3600,
            _ => return None,
        };
        Some(Duration::from_secs(secs))
    }

    pub fn text(d: Duration) -> String {
        let s = d.as_secs();
        match s {
            s if s % 3600 == 0 => format!("{}h", s / 3600),
            s if s % 60 == 0 => format!("{}m", s / 60),
            s => format!("{s}s"),
        }
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&text(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).ok_or_else(|| serde::de::Error::custom(format!("`{s}` is not a window: write `30s`, `1m` or `1h`")))
    }
}

/// Log levels for the `log` sink.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Something failed and needs a person.
    Error,
    /// Something unusual an operator should see.
    Warn,
    /// The normal level for decisions worth keeping.
    #[default]
    Info,
    /// Detail for troubleshooting; hidden unless `RUST_LOG` asks for it.
    Debug,
}

/// BullMQ job options.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JobOptions {
    /// Attempts before the worker gives the job up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(example = 5)]
    pub attempts: Option<u32>,
    /// Backoff between the worker's attempts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(example = serde_json::json!({"type": "exponential", "delay": 1000}))]
    pub backoff: Option<Backoff>,
    /// Delay in milliseconds before the job can run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(example = 0)]
    pub delay: Option<u64>,
    /// Priority (1 is the highest; unset: no priority).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(example = 1)]
    pub priority: Option<u32>,
    /// Which completed jobs BullMQ keeps: a count (`1000`), `{age: seconds, count: n}`, or `true` (remove at
    /// once). Unset: keep all. While a job is kept, re-adding its id is a no-op (BullMQ's dedupe).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(example = serde_json::json!({"age": 86400, "count": 1000}))]
    pub remove_on_complete: Option<KeepJobs>,
    /// Which failed jobs BullMQ keeps, in the same forms as `remove_on_complete`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(example = serde_json::json!({"age": 604800}))]
    pub remove_on_fail: Option<KeepJobs>,
}

/// BullMQ's `removeOnComplete` / `removeOnFail`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum KeepJobs {
    /// `true`: remove the job as soon as it finishes; `false`: keep it.
    Remove(bool),
    /// Keep at most this many jobs.
    Count(usize),
    /// Keep jobs younger than `age` seconds and/or at most `count` of them.
    Limits(KeepLimits),
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KeepLimits {
    /// Maximum age in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(example = 86400)]
    pub age: Option<u64>,
    /// Maximum count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(example = 1000)]
    pub count: Option<usize>,
}

impl JobOptions {
    /// `self` with every key `over` sets replaced.
    pub fn merged(&self, over: &JobOptions) -> JobOptions {
        JobOptions {
            attempts: over.attempts.or(self.attempts),
            backoff: over.backoff.clone().or_else(|| self.backoff.clone()),
            delay: over.delay.or(self.delay),
            priority: over.priority.or(self.priority),
            remove_on_complete: over
                .remove_on_complete
                .clone()
                .or_else(|| self.remove_on_complete.clone()),
            remove_on_fail: over.remove_on_fail.clone().or_else(|| self.remove_on_fail.clone()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Backoff {
    /// `fixed` or `exponential`.
    #[serde(rename = "type")]
    #[schemars(example = &"exponential")]
    pub kind: BackoffKind,
    /// Base delay in milliseconds.
    #[schemars(example = 1000)]
    pub delay: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum BackoffKind {
    /// The same delay before every retry.
    Fixed,
    /// The delay doubles on every retry.
    Exponential,
}

#[cfg(test)]
mod tests {
    use super::job_id_for;

    #[test]
    fn limit_windows_read_seconds_minutes_and_hours() {
        let l: super::Limit = serde_json::from_str(r#"{"fires": 100, "per": "1m"}"#).unwrap();
        assert_eq!(l.per, std::time::Duration::from_secs(60));
        assert_eq!(l.reason(), "route paused: fired 100 times in 1m");
        assert!(serde_json::from_str::<super::Limit>(r#"{"fires": 1, "per": "0m"}"#).is_err());
        assert!(serde_json::from_str::<super::Limit>(r#"{"fires": 1, "per": "5d"}"#).is_err());
        assert_eq!(super::window::parse("90s"), Some(std::time::Duration::from_secs(90)));
    }

    #[test]
    fn job_ids_are_the_key_when_bullmq_accepts_it() {
        assert_eq!(
            job_id_for("activation-801A-1764230400000"),
            "activation-801A-1764230400000"
        );
        assert!(job_id_for("a:b").starts_with("sy-"));
        assert!(job_id_for("12345").starts_with("sy-"));
        assert_eq!(job_id_for("a:b"), job_id_for("a:b"));
        assert_ne!(job_id_for("a:b"), job_id_for("a:c"));
    }
}
