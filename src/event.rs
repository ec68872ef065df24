//! The Event: one shape for every source (DESIGN.md §2), and its JSONL form.

use std::collections::BTreeSet;

use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

/// Salesforce's "empty record id" carried by `GAP_OVERFLOW` events: never enriched or enqueued.
pub const OVERFLOW_PLACEHOLDER_ID: &str = "000000000000000AAA";

/// What delivered the event: a Change Data Capture change or a platform event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// A CDC change event (`/data/...` channels); carries a `header`.
    Change,
    /// A platform event (`/event/...` channels); has no `header`.
    Platform,
}

/// The `changeType` of a CDC header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ChangeType {
    Create,
    Update,
    Delete,
    Undelete,
    GapCreate,
    GapUpdate,
    GapDelete,
    GapUndelete,
    GapOverflow,
    Snapshot,
}

impl ChangeType {
    pub fn is_gap(self) -> bool {
        matches!(
            self,
            Self::GapCreate | Self::GapUpdate | Self::GapDelete | Self::GapUndelete | Self::GapOverflow
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Create => "CREATE",
            Self::Update => "UPDATE",
            Self::Delete => "DELETE",
            Self::Undelete => "UNDELETE",
            Self::GapCreate => "GAP_CREATE",
            Self::GapUpdate => "GAP_UPDATE",
            Self::GapDelete => "GAP_DELETE",
            Self::GapUndelete => "GAP_UNDELETE",
            Self::GapOverflow => "GAP_OVERFLOW",
            Self::Snapshot => "SNAPSHOT",
        }
    }
}

/// The CDC `ChangeEventHeader`, with the bitmaps already decoded to field names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangeHeader {
    pub entity: String,
    pub change_type: ChangeType,
    #[serde(default, deserialize_with = "null_as_default")]
    pub record_ids: Vec<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub changed_fields: Vec<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub nulled_fields: Vec<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub diff_fields: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_origin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transaction_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence_number: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_timestamp: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_number: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_user: Option<String>,
}

/// A member of the CDC header, as predicates and templates name it: the one table of member names (validation, native
/// predicates, the script map and the template JSON all read through it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderMember {
    Entity,
    ChangeType,
    RecordIds,
    ChangedFields,
    NulledFields,
    DiffFields,
    ChangeOrigin,
    TransactionKey,
    SequenceNumber,
    CommitTimestamp,
    CommitNumber,
    CommitUser,
}

/// A header member's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderValue<'a> {
    Str(&'a str),
    Names(&'a [String]),
    Int(i64),
}

impl HeaderMember {
    /// Every member with its name, in the serde form's order.
    pub const ALL: [(&'static str, HeaderMember); 12] = [
        ("entity", HeaderMember::Entity),
        ("change_type", HeaderMember::ChangeType),
        ("record_ids", HeaderMember::RecordIds),
        ("changed_fields", HeaderMember::ChangedFields),
        ("nulled_fields", HeaderMember::NulledFields),
        ("diff_fields", HeaderMember::DiffFields),
        ("change_origin", HeaderMember::ChangeOrigin),
        ("transaction_key", HeaderMember::TransactionKey),
        ("sequence_number", HeaderMember::SequenceNumber),
        ("commit_timestamp", HeaderMember::CommitTimestamp),
        ("commit_number", HeaderMember::CommitNumber),
        ("commit_user", HeaderMember::CommitUser),
    ];

    /// The member of that name, if there is one.
    pub fn of(name: &str) -> Option<HeaderMember> {
        Self::ALL.iter().find(|(n, _)| *n == name).map(|(_, m)| *m)
    }

    pub fn names() -> impl Iterator<Item = &'static str> {
        Self::ALL.iter().map(|(n, _)| *n)
    }
}

impl ChangeHeader {
    /// A member's value; `None` for an optional member the event does not carry (the serde form leaves it out).
    pub fn member(&self, member: HeaderMember) -> Option<HeaderValue<'_>> {
        Some(match member {
            HeaderMember::Entity => HeaderValue::Str(&self.entity),
            HeaderMember::ChangeType => HeaderValue::Str(self.change_type.as_str()),
            HeaderMember::RecordIds => HeaderValue::Names(&self.record_ids),
            HeaderMember::ChangedFields => HeaderValue::Names(&self.changed_fields),
            HeaderMember::NulledFields => HeaderValue::Names(&self.nulled_fields),
            HeaderMember::DiffFields => HeaderValue::Names(&self.diff_fields),
            HeaderMember::ChangeOrigin => HeaderValue::Str(self.change_origin.as_deref()?),
            HeaderMember::TransactionKey => HeaderValue::Str(self.transaction_key.as_deref()?),
            HeaderMember::SequenceNumber => HeaderValue::Int(self.sequence_number?),
            HeaderMember::CommitTimestamp => HeaderValue::Int(self.commit_timestamp?),
            HeaderMember::CommitNumber => HeaderValue::Int(self.commit_number?),
            HeaderMember::CommitUser => HeaderValue::Str(self.commit_user.as_deref()?),
        })
    }
}

/// One enriched record as read (`None`: the record was not found).
pub type RecordFields = Option<Map<String, Value>>;

/// A change event or platform event, as every source delivers it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// Stable identity: the event uuid for platform events, `transaction_key:sequence_number` for CDC.
    pub id: String,
    /// The channel the event arrived on (`/data/OrderChangeEvent`, `/event/Order_Fulfilment_Requested__e`).
    pub channel: String,
    /// `change` or `platform`; inferred from the channel (`/data/` or `/event/`) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<EventKind>,
    /// The replay id bytes as lowercase hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<ChangeHeader>,
    /// The payload fields (CDC: the changed fields; compound fields nested).
    #[serde(default, deserialize_with = "null_as_default")]
    pub fields: Map<String, Value>,
    /// Enrichment results as they were read, per record id (`null`: not found).
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "IndexMap::is_empty"
    )]
    #[schemars(with = "Map<String, Value>")]
    pub record: IndexMap<String, RecordFields>,
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Why a JSONL line is not an event.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("not a JSON event: {0}")]
    Json(#[from] serde_json::Error),
    #[error("event has an empty `{0}`")]
    Empty(&'static str),
    #[error("event `{id}`: {message}")]
    Invalid { id: String, message: String },
}

impl Event {
    /// Replaces the named payload and record fields by `***` (the config's `redact`): what dead letters, `record`
    /// and logs keep of an event.
    pub fn redact(&mut self, fields: &[String]) {
        for f in fields {
            if let Some(v) = self.fields.get_mut(f) {
                *v = Value::from("***");
            }
            for record in self.record.values_mut().flatten() {
                if let Some(v) = record.get_mut(f) {
                    *v = Value::from("***");
                }
            }
        }
    }

    /// Parses and checks one JSONL line.
    pub fn from_json(line: &str) -> Result<Self, EventError> {
        let mut event: Event = serde_json::from_str(line)?;
        event.normalize()?;
        Ok(event)
    }

    /// Fills the inferred `kind` and checks the invariants every consumer relies on.
    pub fn normalize(&mut self) -> Result<(), EventError> {
        if self.id.trim().is_empty() {
            return Err(EventError::Empty("id"));
        }
        if self.channel.trim().is_empty() {
            return Err(EventError::Empty("channel"));
        }
        let invalid = |message: String| EventError::Invalid {
            id: self.id.clone(),
            message,
        };
        let kind = match (self.kind, self.header.is_some()) {
            (Some(kind), _) => kind,
            (None, true) => EventKind::Change,
            (None, false) if self.channel.starts_with("/data/") => {
                return Err(invalid("a change event (channel /data/...) needs a `header`".into()));
            }
            (None, false) => EventKind::Platform,
        };
        match (kind, &self.header) {
            (EventKind::Change, None) => return Err(invalid("kind `change` needs a `header`".into())),
            (EventKind::Platform, Some(_)) => {
                return Err(invalid("kind `platform` has no `header`".into()));
            }
            (EventKind::Change, Some(h)) if h.record_ids.is_empty() => {
                return Err(invalid("the header has no `record_ids`".into()));
            }
            _ => {}
        }
        self.kind = Some(kind);
        Ok(())
    }

    pub fn kind(&self) -> EventKind {
        self.kind.unwrap_or(if self.header.is_some() {
            EventKind::Change
        } else {
            EventKind::Platform
        })
    }

    /// The record ids routes are evaluated for: CDC header ids; none for platform events.
    pub fn record_ids(&self) -> &[String] {
        self.header.as_ref().map(|h| h.record_ids.as_slice()).unwrap_or(&[])
    }

    pub fn change_type(&self) -> Option<ChangeType> {
        self.header.as_ref().map(|h| h.change_type)
    }

    /// The set of changed field names (CDC only).
    pub fn changed_set(&self) -> BTreeSet<&str> {
        self.header
            .as_ref()
            .map(|h| h.changed_fields.iter().map(String::as_str).collect())
            .unwrap_or_default()
    }

    /// A payload value by dotted path (`BillingAddress.City`); `None` when any part is missing.
    pub fn field(&self, path: &str) -> Option<&Value> {
        lookup_path(&self.fields, path.split('.'))
    }
}

/// Walks `segments` through nested JSON objects.
pub fn lookup_path<'a, 'b>(
    root: &'a Map<String, Value>,
    mut segments: impl Iterator<Item = &'b str>,
) -> Option<&'a Value> {
    let first = segments.next()?;
    let mut current = root.get(first)?;
    for segment in segments {
        current = current.as_object()?.get(segment)?;
    }
    Some(current)
}

#[cfg(test)]
mod tests {
    use super::*;

    const APPROVAL: &str = r#"{"id": "tx-9f2c:1", "channel": "/data/OrderChangeEvent", "kind": "change", "replay_id": "00000000000003e8",
 "schema_id": "optional", "header": {"entity": "Order", "change_type": "UPDATE", "record_ids": ["801xx0000000001AAA"],
 "changed_fields": ["Status", "Activation_Status__c", "BillingAddress.City", "LastModifiedDate"], "nulled_fields": [],
 "diff_fields": [],
 "change_origin": "com/salesforce/api/rest/62.0", "transaction_key": "tx-9f2c", "sequence_number": 1,
 "commit_timestamp": 1764230400000, "commit_number": 42, "commit_user": "005xx0000000001AAA"},
 "fields": {"Status": "Approved", "Activation_Status__c": "Activating", "BillingAddress": {"City": "Osaka"}},
 "record": {"801xx0000000001AAA": {"WHMCS_Order_ID__c": null, "AccountId": "001xx0000000001AAA"}}}"#;

    #[test]
    fn design_example_parses_with_nested_fields_and_record() {
        let event = Event::from_json(APPROVAL).expect("design example is valid");
        assert_eq!(event.kind(), EventKind::Change);
        assert_eq!(event.field("BillingAddress.City"), Some(&Value::from("Osaka")));
        assert_eq!(event.field("BillingAddress.Street"), None);
        assert!(event.record["801xx0000000001AAA"].is_some());
        assert_eq!(event.record_ids(), ["801xx0000000001AAA"]);
    }

    #[test]
    fn absent_and_null_mean_the_same() {
        let a = Event::from_json(r#"{"id":"e1","channel":"/event/X__e","fields":null,"record":null}"#).unwrap();
        let b = Event::from_json(r#"{"id":"e1","channel":"/event/X__e"}"#).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.kind(), EventKind::Platform);
    }

    #[test]
    fn change_event_without_header_is_rejected_with_its_id() {
        let err = Event::from_json(r#"{"id":"e7","channel":"/data/OrderChangeEvent"}"#).unwrap_err();
        assert!(err.to_string().contains("e7"), "{err}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        assert!(Event::from_json(r#"{"id":"e1","channel":"/event/X__e","feilds":{}}"#).is_err());
    }
}
