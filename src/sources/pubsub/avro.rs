//! Avro payloads to [`Event`]s and back, against writer schemas kept by schema id.
//!
//! Salesforce sends each event as a bare Avro datum plus the id of the schema it was written with. Schemas are cached
//! by that id, never by topic: a backlog, a custom channel or a schema change mid-stream mixes schema ids on one
//! topic, and decoding with the wrong schema fails with "trailing data" at best (reference §4.1). The bitmap header
//! fields are decoded against the same writer schema.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use apache_avro::Schema;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::schema::{Name, RecordSchema, ResolvedSchema};
use apache_avro::writer::datum::GenericDatumWriter;
use md5::{Digest, Md5};
use serde::de::{Deserialize, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor};
use serde_json::{Map, Value as Json};

use super::bitmap::{self, BitmapError, FieldLayout, FieldSlot};
use crate::event::{ChangeHeader, ChangeType, Event, EventError, EventKind};

/// Name of the header field every CDC schema starts with; platform-event schemas have none.
pub const HEADER_FIELD: &str = "ChangeEventHeader";

/// Why an event could not be decoded. Each variant names the event and says whose fault it is.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("event `{event_id}` uses schema id `{schema_id}`, which is not in the registry (fetch it with GetSchema)")]
    UnknownSchema { event_id: String, schema_id: String },
    #[error("schema `{schema_id}` is not a usable Avro schema: {source}")]
    Schema {
        schema_id: String,
        #[source]
        source: apache_avro::Error,
    },
    #[error("schema `{schema_id}` is not a record schema, so it cannot describe an event")]
    SchemaNotRecord { schema_id: String },
    #[error("event `{event_id}` has a corrupt payload for schema `{schema_id}`: {source}")]
    CorruptPayload {
        event_id: String,
        schema_id: String,
        #[source]
        source: apache_avro::Error,
    },
    #[error("event `{event_id}` has a truncated payload: {length} bytes are too few for schema `{schema_id}`")]
    TruncatedPayload {
        event_id: String,
        schema_id: String,
        length: usize,
    },
    #[error(
        "event `{event_id}` has {trailing} bytes left after its record: it was not written with schema `{schema_id}`"
    )]
    TrailingBytes {
        event_id: String,
        schema_id: String,
        trailing: usize,
    },
    #[error("event `{event_id}`: its ChangeEventHeader {message}")]
    Header { event_id: String, message: String },
    #[error("event `{event_id}`: bad `{field}` bitmap: {source}")]
    Bitmap {
        event_id: String,
        field: &'static str,
        #[source]
        source: BitmapError,
    },
    #[error("a ConsumerEvent without its `event` was delivered")]
    MissingEvent,
    #[error(transparent)]
    Invalid(#[from] EventError),
}

/// One event as it arrives in a `ConsumerEvent`, borrowed so decoding copies only what ends up in the Event.
#[derive(Debug, Clone, Copy)]
pub struct RawEvent<'a> {
    /// `ProducerEvent.id`: the EventUuid of a platform event.
    pub event_id: &'a str,
    pub schema_id: &'a str,
    pub payload: &'a [u8],
    pub replay_id: &'a [u8],
}

impl<'a> RawEvent<'a> {
    pub fn from_consumer(consumer: &'a super::proto::ConsumerEvent) -> Result<Self, DecodeError> {
        let event = consumer.event.as_ref().ok_or(DecodeError::MissingEvent)?;
        Ok(Self {
            event_id: &event.id,
            schema_id: &event.schema_id,
            payload: &event.payload,
            replay_id: &consumer.replay_id,
        })
    }
}

/// A payload reader that remembers running out of bytes. apache-avro 0.22 turns an end of input inside a union,
/// string or boolean into a null instead of an error, so a truncated payload would otherwise decode "successfully"
/// with its last fields missing. A well-formed datum never reads past its own end.
struct EofGuard<'a> {
    rest: &'a [u8],
    hit_eof: bool,
}

impl std::io::Read for EofGuard<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.len() > self.rest.len() {
            self.hit_eof = true;
        }
        self.rest.read(buf)
    }
}

/// A writer schema parsed once, with its reader, writer and bitmap layout built once.
pub struct CompiledSchema {
    fingerprint: String,
    json: String,
    pub(crate) name: String,
    pub(crate) record: &'static RecordSchema,
    names: ResolvedSchema<'static>,
    reader: GenericDatumReader<'static>,
    /// For the emulator's encoder (`emulator::encode`).
    pub(crate) writer: GenericDatumWriter<'static>,
    pub(crate) layout: FieldLayout,
    pub(crate) is_change: bool,
}

impl std::fmt::Debug for CompiledSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledSchema")
            .field("name", &self.name)
            .field("fingerprint", &self.fingerprint)
            .field("fields", &self.layout.fields.len())
            .finish_non_exhaustive()
    }
}

/// The apache-avro reader and writer borrow their schema, and a struct cannot borrow from itself without unsafe code
/// (forbidden here). So each distinct schema is leaked once per process and shared: the number of distinct schemas
/// a process sees is small and bounded (one per object version), which keeps the leak bounded too.
fn intern(schema: Schema) -> &'static Schema {
    static INTERNED: OnceLock<Mutex<HashMap<String, &'static Schema>>> = OnceLock::new();
    let key = schema.canonical_form();
    let mut interned = INTERNED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    interned.entry(key).or_insert_with(|| Box::leak(Box::new(schema)))
}

/// Salesforce's schema id: the MD5 of the schema's Parsing Canonical Form, base64url without padding (22 chars).
pub fn fingerprint(schema: &Schema) -> String {
    base64url(&Md5::digest(schema.canonical_form().as_bytes()))
}

fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
        }
    }
    out
}

impl CompiledSchema {
    /// Parses a schema (the JSON of `SchemaInfo.schema_json` or an .avsc file) and builds everything decoding needs.
    pub fn parse(schema_json: &str) -> Result<Arc<Self>, DecodeError> {
        // A corrupt length prefix makes apache-avro allocate up to this many bytes before it notices the payload is
        // shorter (its default is 512 MiB). No value can be longer than the gRPC message that carried it. The
        // setting is process-wide and only the first call counts, which is fine: nothing else here reads Avro.
        apache_avro::util::max_allocation_bytes(super::MAX_MESSAGE_BYTES);
        let schema_error = |source| DecodeError::Schema {
            schema_id: "(unparsed)".into(),
            source,
        };
        let parsed = Schema::parse_str(schema_json).map_err(schema_error)?;
        let fingerprint = fingerprint(&parsed);
        let schema = intern(parsed);
        let with_id = |source| DecodeError::Schema {
            schema_id: fingerprint.clone(),
            source,
        };
        let Schema::Record(record) = schema else {
            return Err(DecodeError::SchemaNotRecord { schema_id: fingerprint });
        };
        let names = ResolvedSchema::try_from(schema).map_err(with_id)?;
        let reader = GenericDatumReader::builder(schema).build().map_err(with_id)?;
        let writer = GenericDatumWriter::builder(schema).build().map_err(with_id)?;
        let layout = field_layout(record, &names);
        let is_change = record.fields.first().is_some_and(|f| f.name == HEADER_FIELD);
        Ok(Arc::new(Self {
            json: schema_json.to_owned(),
            name: record.name.name().to_owned(),
            fingerprint,
            record,
            names,
            reader,
            writer,
            layout,
            is_change,
        }))
    }

    /// The Salesforce-style schema id of this schema (see [`fingerprint`]).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The schema JSON as it was given.
    pub fn json(&self) -> &str {
        &self.json
    }

    /// The record name, e.g. `OrderChangeEvent`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `true` for a CDC schema (it starts with `ChangeEventHeader`).
    pub fn is_change(&self) -> bool {
        self.is_change
    }

    /// The top-level fields as the bitmaps see them.
    pub fn layout(&self) -> &FieldLayout {
        &self.layout
    }

    /// Decodes one event written with this schema.
    pub fn decode(&self, channel: &str, raw: &RawEvent<'_>) -> Result<Event, DecodeError> {
        let mut cursor = EofGuard {
            rest: raw.payload,
            hit_eof: false,
        };
        // Read straight into JSON by apache-avro's schema-aware serde reader: no intermediate `Value` with a name
        // and a boxed union per field (most of the ~140 fields of a change event are null).
        let Fields(values) =
            self.reader
                .read_deser::<Fields>(&mut cursor)
                .map_err(|source| DecodeError::CorruptPayload {
                    event_id: raw.event_id.to_owned(),
                    schema_id: raw.schema_id.to_owned(),
                    source,
                })?;
        if cursor.hit_eof {
            return Err(DecodeError::TruncatedPayload {
                event_id: raw.event_id.to_owned(),
                schema_id: raw.schema_id.to_owned(),
                length: raw.payload.len(),
            });
        }
        if !cursor.rest.is_empty() {
            return Err(DecodeError::TrailingBytes {
                event_id: raw.event_id.to_owned(),
                schema_id: raw.schema_id.to_owned(),
                trailing: cursor.rest.len(),
            });
        }
        let names = self.record.fields.iter().map(|f| f.name.as_str());
        let mut event = if self.is_change {
            self.change_event(channel, raw, names.zip(values))?
        } else {
            let fields = names
                .zip(values)
                .map(|(name, value)| (name.to_owned(), value))
                .collect();
            Event {
                id: raw.event_id.to_owned(),
                channel: channel.to_owned(),
                kind: Some(EventKind::Platform),
                replay_id: None,
                schema_id: None,
                header: None,
                fields,
                record: Default::default(),
            }
        };
        event.replay_id = Some(crate::hex::encode(raw.replay_id));
        event.schema_id = Some(raw.schema_id.to_owned());
        event.normalize()?;
        Ok(event)
    }

    fn change_event<'n>(
        &self,
        channel: &str,
        raw: &RawEvent<'_>,
        record: impl Iterator<Item = (&'n str, Json)>,
    ) -> Result<Event, DecodeError> {
        let mut header = None;
        let mut fields = Map::new();
        let mut payload = Vec::new();
        for (name, value) in record {
            if name == HEADER_FIELD {
                header = Some(value);
            } else if !value.is_null() {
                payload.push((name, value));
            }
        }
        let header_error = |message: String| DecodeError::Header {
            event_id: raw.event_id.to_owned(),
            message,
        };
        let header = self.header(raw.event_id, header.ok_or_else(|| header_error("is missing".into()))?)?;

        // Salesforce sends every field of the object and leaves unchanged ones null, so a null means something only
        // when nulledFields lists it (those are put back below).
        let nulled: BTreeSet<&str> = header.nulled_fields.iter().map(String::as_str).collect();
        for (name, value) in payload {
            if let Some(kept) = prune_nulls(value, name, &nulled) {
                fields.insert(name.to_owned(), kept);
            }
        }
        for path in &header.nulled_fields {
            insert_null(&mut fields, path);
        }

        let id = match (&header.transaction_key, header.sequence_number) {
            (Some(key), Some(sequence)) => format!("{key}:{sequence}"),
            _ => raw.event_id.to_owned(),
        };
        Ok(Event {
            id,
            channel: channel.to_owned(),
            kind: Some(EventKind::Change),
            replay_id: None,
            schema_id: None,
            header: Some(header),
            fields,
            record: Default::default(),
        })
    }

    fn header(&self, event_id: &str, value: Json) -> Result<ChangeHeader, DecodeError> {
        let error = |message: String| DecodeError::Header {
            event_id: event_id.to_owned(),
            message,
        };
        let Json::Object(items) = value else {
            return Err(error("is not a record".into()));
        };
        let mut entity = None;
        let mut change_type = None;
        let mut header = ChangeHeader {
            entity: String::new(),
            change_type: ChangeType::Update,
            record_ids: Vec::new(),
            changed_fields: Vec::new(),
            nulled_fields: Vec::new(),
            diff_fields: Vec::new(),
            change_origin: None,
            transaction_key: None,
            sequence_number: None,
            commit_timestamp: None,
            commit_number: None,
            commit_user: None,
        };
        let bitmap = |field: &'static str, value: Json| -> Result<Vec<String>, DecodeError> {
            let entries = strings(value).ok_or_else(|| error(format!("has a `{field}` that is not a string array")))?;
            bitmap::decode(&entries, &self.layout).map_err(|source| DecodeError::Bitmap {
                event_id: event_id.to_owned(),
                field,
                source,
            })
        };
        for (name, value) in items {
            match name.as_str() {
                "entityName" => entity = text(value),
                "recordIds" => {
                    header.record_ids =
                        strings(value).ok_or_else(|| error("has `recordIds` that are not strings".into()))?
                }
                "changeType" => change_type = text(value),
                "changeOrigin" => header.change_origin = text(value).filter(|s| !s.is_empty()),
                "transactionKey" => header.transaction_key = text(value).filter(|s| !s.is_empty()),
                "sequenceNumber" => header.sequence_number = value.as_i64(),
                "commitTimestamp" => header.commit_timestamp = value.as_i64(),
                "commitNumber" => header.commit_number = value.as_i64(),
                "commitUser" => header.commit_user = text(value).filter(|s| !s.is_empty()),
                "changedFields" => header.changed_fields = bitmap("changedFields", value)?,
                "nulledFields" => header.nulled_fields = bitmap("nulledFields", value)?,
                "diffFields" => header.diff_fields = bitmap("diffFields", value)?,
                // Fields Salesforce may add later do not change what we route on.
                _ => {}
            }
        }
        header.entity = entity.ok_or_else(|| error("has no `entityName`".into()))?;
        let change_type = change_type.ok_or_else(|| error("has no `changeType`".into()))?;
        header.change_type = serde_json::from_value(Json::String(change_type.clone()))
            .map_err(|_| error(format!("has an unknown `changeType` `{change_type}`")))?;
        Ok(header)
    }

    pub(crate) fn resolve<'s>(&'s self, schema: &'s Schema) -> &'s Schema {
        match schema {
            Schema::Ref { name } => self.names.get_names().get(name).copied().unwrap_or(schema),
            other => other,
        }
    }
}

/// The bitmap layout: each top-level field, and for compound fields the record branch of their union (a named
/// record such as `Address` may be referenced by name, e.g. by `ShippingAddress`).
fn field_layout(record: &RecordSchema, names: &ResolvedSchema<'_>) -> FieldLayout {
    let lookup = |name: &Name| names.get_names().get(name).copied();
    let record_fields = |schema: &Schema| -> Option<Vec<String>> {
        let branch = match schema {
            Schema::Union(union) => union.variants().iter().find_map(|v| match v {
                Schema::Record(_) => Some(v),
                Schema::Ref { name } => lookup(name).filter(|s| matches!(s, Schema::Record(_))),
                _ => None,
            }),
            Schema::Ref { name } => lookup(name),
            other => Some(other),
        };
        match branch {
            Some(Schema::Record(r)) => Some(r.fields.iter().map(|f| f.name.clone()).collect()),
            _ => None,
        }
    };
    FieldLayout {
        fields: record
            .fields
            .iter()
            .map(|f| FieldSlot {
                name: f.name.clone(),
                children: record_fields(&f.schema),
            })
            .collect(),
    }
}

fn text(value: Json) -> Option<String> {
    match value {
        Json::String(s) => Some(s),
        _ => None,
    }
}

fn strings(value: Json) -> Option<Vec<String>> {
    match value {
        Json::Array(items) => items.into_iter().map(text).collect(),
        Json::Null => Some(Vec::new()),
        _ => None,
    }
}

/// The values of a top-level record in schema order (the names are the schema's: none is allocated per event).
struct Fields(Vec<Json>);

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Record;
        impl<'de> Visitor<'de> for Record {
            type Value = Fields;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an Avro record")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
                let mut values = Vec::with_capacity(map.size_hint().unwrap_or(0).min(1024));
                while map.next_key::<FieldName>()?.is_some() {
                    values.push(map.next_value::<AvroJson>()?.0);
                }
                Ok(Fields(values))
            }
        }
        deserializer.deserialize_any(Record)
    }
}

/// A record field's name, read and dropped: the schema has it.
struct FieldName;

impl<'de> Deserialize<'de> for FieldName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Name;
        impl Visitor<'_> for Name {
            type Value = FieldName;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E>(self, _: &str) -> Result<FieldName, E> {
                Ok(FieldName)
            }
        }
        deserializer.deserialize_identifier(Name)
    }
}

/// A record field's name, a map key or an enum symbol (apache-avro hands them out as identifiers).
struct Key(String);

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Name;
        impl Visitor<'_> for Name {
            type Value = Key;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a field name or map key")
            }
            fn visit_str<E>(self, v: &str) -> Result<Key, E> {
                Ok(Key(v.to_owned()))
            }
            fn visit_string<E>(self, v: String) -> Result<Key, E> {
                Ok(Key(v))
            }
        }
        deserializer.deserialize_identifier(Name)
    }
}

/// One Avro value as JSON: unions flattened, records as objects (fields in schema order), maps as objects (entries
/// in wire order), longs as i64, enums as their symbol, bytes and fixed as hex.
struct AvroJson(Json);

impl<'de> Deserialize<'de> for AvroJson {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ToJson).map(AvroJson)
    }
}

struct ToJson;

impl<'de> Visitor<'de> for ToJson {
    type Value = Json;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an Avro value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Json, E> {
        Ok(Json::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Json, E> {
        Ok(Json::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Json, E> {
        Ok(Json::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Json, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Json::Null, Json::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Json, E> {
        Ok(Json::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Json, E> {
        Ok(Json::String(v))
    }
    fn visit_bytes<E>(self, v: &[u8]) -> Result<Json, E> {
        Ok(Json::String(crate::hex::encode(v)))
    }
    fn visit_unit<E>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }
    fn visit_none<E>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Json, D::Error> {
        deserializer.deserialize_any(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
        // A corrupt block length must not reserve memory before the items are read.
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(AvroJson(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Json::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
        let mut object = Map::new();
        while let Some((Key(key), AvroJson(value))) = map.next_entry::<Key, AvroJson>()? {
            object.insert(key, value);
        }
        Ok(Json::Object(object))
    }
    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Json, A::Error> {
        let (Key(symbol), variant) = data.variant::<Key>()?;
        variant.unit_variant()?;
        Ok(Json::String(symbol))
    }
}

/// Drops nulls (and objects left empty) unless their dotted path is listed in `keep`.
fn prune_nulls(value: Json, path: &str, keep: &BTreeSet<&str>) -> Option<Json> {
    match value {
        Json::Null => keep.contains(path).then_some(Json::Null),
        Json::Object(map) => {
            let pruned: Map<String, Json> = map
                .into_iter()
                .filter_map(|(k, v)| prune_nulls(v, &format!("{path}.{k}"), keep).map(|v| (k, v)))
                .collect();
            if pruned.is_empty() && !keep.contains(path) {
                None
            } else {
                Some(Json::Object(pruned))
            }
        }
        other => Some(other),
    }
}

/// Makes a nulled field an explicit null even when its parent came as null, so `nulled("BillingAddress.City")`
/// and `event.BillingAddress?.City` agree.
fn insert_null(fields: &mut Map<String, Json>, path: &str) {
    match path.split_once('.') {
        None => {
            fields.entry(path.to_owned()).or_insert(Json::Null);
        }
        Some((parent, rest)) => {
            let slot = fields
                .entry(parent.to_owned())
                .or_insert_with(|| Json::Object(Map::new()));
            if slot.is_null() {
                *slot = Json::Object(Map::new());
            }
            if let Json::Object(child) = slot {
                insert_null(child, rest);
            }
        }
    }
}

/// Writer schemas by schema id. Ids come from the events themselves (`ProducerEvent.schema_id`), never from the
/// topic, so events of several schema versions on one topic each decode with their own writer schema.
#[derive(Debug, Default, Clone)]
pub struct SchemaRegistry {
    by_id: HashMap<String, Arc<CompiledSchema>>,
}

impl SchemaRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the schema for `schema_id`, parsing it unless that id is already known (a schema id names one schema
    /// for good, so it is parsed once).
    pub fn insert(&mut self, schema_id: &str, schema_json: &str) -> Result<Arc<CompiledSchema>, DecodeError> {
        if let Some(known) = self.by_id.get(schema_id) {
            return Ok(known.clone());
        }
        let compiled = CompiledSchema::parse(schema_json).map_err(|e| match e {
            DecodeError::Schema { source, .. } => DecodeError::Schema {
                schema_id: schema_id.to_owned(),
                source,
            },
            other => other,
        })?;
        if compiled.fingerprint() != schema_id {
            tracing::debug!(
                schema_id,
                fingerprint = compiled.fingerprint(),
                "A schema's id differs from its MD5 fingerprint; it is kept under the id it was delivered with."
            );
        }
        self.by_id.insert(schema_id.to_owned(), compiled.clone());
        Ok(compiled)
    }

    /// Adds an already compiled schema under its own fingerprint.
    pub fn insert_compiled(&mut self, schema: Arc<CompiledSchema>) {
        self.by_id.insert(schema.fingerprint().to_owned(), schema);
    }

    pub fn get(&self, schema_id: &str) -> Option<&Arc<CompiledSchema>> {
        self.by_id.get(schema_id)
    }

    pub fn contains(&self, schema_id: &str) -> bool {
        self.by_id.contains_key(schema_id)
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Decodes one event with the writer schema its schema id names.
    pub fn decode(&self, channel: &str, raw: &RawEvent<'_>) -> Result<Event, DecodeError> {
        let schema = self
            .by_id
            .get(raw.schema_id)
            .ok_or_else(|| DecodeError::UnknownSchema {
                event_id: raw.event_id.to_owned(),
                schema_id: raw.schema_id.to_owned(),
            })?;
        schema.decode(channel, raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulator::encode::EncodeError;
    use apache_avro::types::Value as Avro;

    const ORDER: &str = include_str!("../../../schemas/avro/OrderChangeEvent.avsc");
    const ORDER_V2: &str = include_str!("../../emulator/OrderChangeEvent.v2.avsc");
    const FULFILMENT: &str = include_str!("../../../schemas/avro/Order_Fulfilment_Requested__e.avsc");

    fn approval() -> Event {
        Event::from_json(
            r#"{"id": "tx-1:1", "channel": "/data/OrderChangeEvent", "header": {"entity": "Order",
             "change_type": "UPDATE", "record_ids": ["801xx0000000001AAA"],
             "changed_fields": ["Status", "Activation_Status__c", "BillingAddress.City", "LastModifiedDate",
                                "Description", "WHMCS_Order_ID__c"],
             "nulled_fields": ["Description"], "diff_fields": [], "change_origin": "com/salesforce/api/rest/62.0",
             "transaction_key": "tx-1", "sequence_number": 1, "commit_timestamp": 1764230400000,
             "commit_number": 42, "commit_user": "005xx0000000001AAA"},
             "fields": {"Status": "Approved", "Activation_Status__c": "Activating", "Description": null,
                        "BillingAddress": {"City": "Osaka"}, "LastModifiedDate": 1764230400000,
                        "WHMCS_Order_ID__c": "WH-1", "TotalAmount": 1200.5}}"#,
        )
        .expect("valid event")
    }

    fn raw<'a>(schema: &'a CompiledSchema, payload: &'a [u8]) -> RawEvent<'a> {
        RawEvent {
            event_id: "uuid-1",
            schema_id: schema.fingerprint(),
            payload,
            replay_id: &[0, 0, 0, 0, 0, 0, 0x03, 0xe8],
        }
    }

    #[test]
    fn fingerprint_matches_the_uuid_an_independent_implementation_computed() {
        for json in [ORDER, ORDER_V2, FULFILMENT] {
            let compiled = CompiledSchema::parse(json).unwrap();
            let uuid: Json = serde_json::from_str(json).unwrap();
            assert_eq!(
                Some(compiled.fingerprint()),
                uuid["uuid"].as_str(),
                "{}",
                compiled.name()
            );
            assert_eq!(compiled.fingerprint().len(), 22);
        }
    }

    #[test]
    fn the_order_schema_is_wider_than_128_bits() {
        let compiled = CompiledSchema::parse(ORDER).unwrap();
        let position = |name: &str| compiled.layout().fields.iter().position(|f| f.name == name).unwrap();
        assert!(compiled.layout().fields.len() > 128);
        assert!(position("Activation_Status__c") > 128);
        assert!(position("WHMCS_Order_ID__c") > 128);
        let shipping = &compiled.layout().fields[position("ShippingAddress")];
        assert_eq!(
            shipping.children.as_ref().map(Vec::len),
            Some(11),
            "named Address resolved by reference"
        );
    }

    #[test]
    fn change_event_round_trips_under_both_field_orders() {
        for json in [ORDER, ORDER_V2] {
            let schema = CompiledSchema::parse(json).unwrap();
            let event = approval();
            let payload = schema.encode(&event).unwrap();
            let mut decoded = schema
                .decode("/data/OrderChangeEvent", &raw(&schema, &payload))
                .unwrap();
            let mut expected = event.clone();
            expected.replay_id = Some("00000000000003e8".into());
            expected.schema_id = Some(schema.fingerprint().to_owned());
            // Names come back in the writer schema's field order, which differs between the two schemas.
            for e in [&mut decoded, &mut expected] {
                e.header.as_mut().unwrap().changed_fields.sort();
            }
            assert_eq!(decoded, expected, "{}", schema.fingerprint());
        }
    }

    #[test]
    fn platform_event_keeps_every_field_and_uses_the_event_uuid() {
        let schema = CompiledSchema::parse(FULFILMENT).unwrap();
        let event = Event::from_json(
            r#"{"id": "uuid-1", "channel": "/event/Order_Fulfilment_Requested__e",
             "fields": {"CreatedDate": 1764230400000, "CreatedById": "005xx0000000001AAA",
                        "Order_Id__c": "801xx0000000001AAA", "Idempotency_Key__c": null}}"#,
        )
        .unwrap();
        let payload = schema.encode(&event).unwrap();
        let decoded = schema.decode(&event.channel, &raw(&schema, &payload)).unwrap();
        assert_eq!(decoded.id, "uuid-1");
        assert_eq!(decoded.kind, Some(EventKind::Platform));
        assert_eq!(decoded.fields.len(), 5);
        assert_eq!(decoded.fields["Correlation_Id__c"], Json::Null);
        assert_eq!(decoded.fields["CreatedDate"], Json::from(1764230400000i64));
    }

    #[test]
    fn unknown_schema_id_is_a_typed_error() {
        let registry = SchemaRegistry::new();
        let raw = RawEvent {
            event_id: "e1",
            schema_id: "nope",
            payload: &[],
            replay_id: &[],
        };
        assert!(matches!(
            registry.decode("/data/OrderChangeEvent", &raw),
            Err(DecodeError::UnknownSchema { .. })
        ));
    }

    #[test]
    fn corrupt_and_truncated_payloads_are_typed_errors_never_panics() {
        let schema = CompiledSchema::parse(ORDER).unwrap();
        let payload = schema.encode(&approval()).unwrap();
        let decode = |bytes: &[u8]| schema.decode("/data/OrderChangeEvent", &raw(&schema, bytes));
        // apache-avro alone would accept most of these, reading the missing tail as nulls.
        for cut in 1..payload.len() {
            let result = decode(&payload[..cut]);
            assert!(
                matches!(
                    result,
                    Err(DecodeError::TruncatedPayload { .. } | DecodeError::CorruptPayload { .. })
                ),
                "cut at {cut}: {result:?}"
            );
        }
        let mut longer = payload.clone();
        longer.push(0);
        assert!(matches!(
            decode(&longer),
            Err(DecodeError::TrailingBytes { trailing: 1, .. })
        ));
        // xorshift: deterministic garbage, including bytes that claim huge string and array lengths.
        let mut state = 0x1234_5678_9abc_def0u64;
        for round in 0..2000 {
            let len = round % 300;
            let garbage: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            // Random bytes may even form a valid record; what matters is that nothing panics or allocates wildly.
            let _ = decode(&garbage);
        }
    }

    #[test]
    fn a_truncated_bitmap_in_the_header_is_a_typed_error() {
        let schema = CompiledSchema::parse(ORDER).unwrap();
        let payload = schema.encode(&approval()).unwrap();
        let mut value = schema.reader.read_value(&mut &payload[..]).unwrap();
        if let Avro::Record(items) = &mut value
            && let Some((_, Avro::Record(header))) = items.first_mut()
            && let Some((_, changed)) = header.iter_mut().find(|(n, _)| n == "changedFields")
        {
            *changed = Avro::Array(vec![Avro::String("19-".into())]);
        }
        let bytes = schema.writer.write_value_to_vec(value).unwrap();
        let err = schema
            .decode("/data/OrderChangeEvent", &raw(&schema, &bytes))
            .unwrap_err();
        assert!(
            matches!(
                err,
                DecodeError::Bitmap {
                    field: "changedFields",
                    source: BitmapError::Truncated { .. },
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn encoding_rejects_fields_the_schema_does_not_have() {
        let schema = CompiledSchema::parse(ORDER).unwrap();
        let mut event = approval();
        event.fields.insert("Nope__c".into(), Json::from("x"));
        assert!(matches!(schema.encode(&event), Err(EncodeError::UnknownField { .. })));
        let mut event = approval();
        event.fields.insert("Status".into(), Json::from(5));
        assert!(matches!(schema.encode(&event), Err(EncodeError::Type { .. })));
        let mut event = approval();
        event.header.as_mut().unwrap().changed_fields.push("Nope__c".into());
        assert!(matches!(schema.encode(&event), Err(EncodeError::Bitmap { .. })));
    }

    #[test]
    fn base64url_matches_known_vectors() {
        assert_eq!(base64url(b""), "");
        assert_eq!(base64url(b"f"), "Zg");
        assert_eq!(base64url(b"fo"), "Zm8");
        assert_eq!(base64url(b"foo"), "Zm9v");
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
    }
}
