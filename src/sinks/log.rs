//! The `log` sink: one structured tracing event per action.

use serde_json::{Map, Value};

use super::{ActionCx, SinkOutcome};
use crate::failure::Failure;
use crate::plan::Action;
use crate::plan::LogLevel;

/// Writes one tracing event per action; `redact` names fields shown as `***`.
pub struct LogSink {
    pub redact: Vec<String>,
}

impl LogSink {
    pub fn write(
        &self,
        action: &Action,
        level: LogLevel,
        message: &str,
        fields: &Map<String, Value>,
        cx: &ActionCx<'_>,
    ) -> Result<SinkOutcome, Failure> {
        let record_id = action.record_id.as_deref().unwrap_or("");
        let mut fields = fields.clone();
        for f in &self.redact {
            if let Some(v) = fields.get_mut(f) {
                *v = Value::from("***");
            }
        }
        let fields = if fields.is_empty() {
            String::new()
        } else {
            Value::Object(fields).to_string()
        };
        macro_rules! emit {
            ($level:ident) => {
                tracing::$level!(
                    target: "switchyard::rules",
                    route = %action.route,
                    event_id = %cx.event.id,
                    record_id,
                    rules_version = cx.rules_version,
                    fields = %fields,
                    "{message}"
                )
            };
        }
        match level {
            LogLevel::Error => emit!(error),
            LogLevel::Warn => emit!(warn),
            LogLevel::Info => emit!(info),
            LogLevel::Debug => emit!(debug),
        }
        Ok(SinkOutcome::Done)
    }
}
