//! A Plan: the actions the router decided for one event, rendered and ready for the dispatcher.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::config::JobOptions;
use crate::rules::LogLevel;

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
}

impl Action {
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
        let body = match &self.op {
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
        };
        format!("{}{}: {body}", if self.shadow { "(shadow) " } else { "" }, self.sink)
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

#[cfg(test)]
mod tests {
    use super::job_id_for;

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
