//! Writing events as Avro datums with real bitmaps: what the emulator publishes, so that the subscriber's decoder
//! ([`CompiledSchema::decode`]) gives the same event back. Only the emulator (and tests and benches standing in for
//! an org) write Avro; switchyard itself only reads it.

use apache_avro::Schema;
use apache_avro::types::Value as Avro;
use serde_json::{Map, Value as Json};

use crate::event::{ChangeHeader, Event};
use crate::sources::pubsub::avro::{CompiledSchema, HEADER_FIELD};
use crate::sources::pubsub::bitmap::{self, BitmapError};

/// Why an event could not be written under a schema.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("event `{event_id}` has no header, but schema `{schema}` is a change-event schema")]
    MissingHeader { event_id: String, schema: String },
    #[error("event `{event_id}` has a header, but schema `{schema}` is a platform-event schema")]
    UnexpectedHeader { event_id: String, schema: String },
    #[error("event `{event_id}`: field `{path}` is not in schema `{schema}`")]
    UnknownField {
        event_id: String,
        path: String,
        schema: String,
    },
    #[error("event `{event_id}`: field `{path}` does not fit Avro type {expected}: got {got}")]
    Type {
        event_id: String,
        path: String,
        expected: String,
        got: String,
    },
    #[error("event `{event_id}`: `{field}` cannot be written as a bitmap: {source}")]
    Bitmap {
        event_id: String,
        field: &'static str,
        #[source]
        source: BitmapError,
    },
    #[error("event `{event_id}`: the Avro writer refused the record: {source}")]
    Avro {
        event_id: String,
        #[source]
        source: apache_avro::Error,
    },
}

/// JSON to Avro under one schema, with the event id for error messages.
struct Encoder<'a> {
    schema: &'a CompiledSchema,
    event_id: &'a str,
}

impl Encoder<'_> {
    fn unknown(&self, path: &str) -> EncodeError {
        EncodeError::UnknownField {
            event_id: self.event_id.to_owned(),
            path: path.to_owned(),
            schema: self.schema.name.clone(),
        }
    }

    fn mismatch(&self, path: &str, expected: &Schema, got: &Json) -> EncodeError {
        let mut got = got.to_string();
        if got.len() > 60 {
            got = format!("{}...", got.chars().take(60).collect::<String>());
        }
        EncodeError::Type {
            event_id: self.event_id.to_owned(),
            path: path.to_owned(),
            expected: format!("{:?}", apache_avro::schema::SchemaKind::from(expected)),
            got,
        }
    }

    fn value(&self, json: &Json, schema: &Schema, path: &str) -> Result<Avro, EncodeError> {
        let schema = self.schema.resolve(schema);
        let mismatch = || self.mismatch(path, schema, json);
        let long = || json.as_i64().ok_or_else(mismatch);
        let int = || long().and_then(|l| i32::try_from(l).map_err(|_| mismatch()));
        Ok(match schema {
            Schema::Null if json.is_null() => Avro::Null,
            Schema::Boolean => Avro::Boolean(json.as_bool().ok_or_else(mismatch)?),
            Schema::Int => Avro::Int(int()?),
            Schema::Date => Avro::Date(int()?),
            Schema::TimeMillis => Avro::TimeMillis(int()?),
            Schema::Long => Avro::Long(long()?),
            Schema::TimeMicros => Avro::TimeMicros(long()?),
            Schema::TimestampMillis => Avro::TimestampMillis(long()?),
            Schema::TimestampMicros => Avro::TimestampMicros(long()?),
            Schema::LocalTimestampMillis => Avro::LocalTimestampMillis(long()?),
            Schema::LocalTimestampMicros => Avro::LocalTimestampMicros(long()?),
            // Narrowing to f32 is what a float field means.
            Schema::Float => Avro::Float(json.as_f64().ok_or_else(mismatch)? as f32),
            Schema::Double => Avro::Double(json.as_f64().ok_or_else(mismatch)?),
            Schema::String => Avro::String(json.as_str().ok_or_else(mismatch)?.to_owned()),
            Schema::Enum(e) => {
                let symbol = json.as_str().ok_or_else(mismatch)?;
                let index = e.symbols.iter().position(|s| s == symbol).ok_or_else(mismatch)?;
                Avro::Enum(u32::try_from(index).map_err(|_| mismatch())?, symbol.to_owned())
            }
            Schema::Array(array) => {
                let items = json.as_array().ok_or_else(mismatch)?;
                let items = items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| self.value(item, &array.items, &format!("{path}[{i}]")))
                    .collect::<Result<_, _>>()?;
                Avro::Array(items)
            }
            Schema::Map(map) => {
                let entries = json.as_object().ok_or_else(mismatch)?;
                let entries = entries
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), self.value(v, &map.types, &format!("{path}.{k}"))?)))
                    .collect::<Result<_, EncodeError>>()?;
                Avro::Map(entries)
            }
            Schema::Record(record) => {
                let object = json.as_object().ok_or_else(mismatch)?;
                if let Some(unknown) = object.keys().find(|k| !record.lookup.contains_key(*k)) {
                    return Err(self.unknown(&format!("{path}.{unknown}")));
                }
                let items = record
                    .fields
                    .iter()
                    .map(|f| {
                        let child = object.get(&f.name).unwrap_or(&Json::Null);
                        Ok((
                            f.name.clone(),
                            self.value(child, &f.schema, &format!("{path}.{}", f.name))?,
                        ))
                    })
                    .collect::<Result<_, EncodeError>>()?;
                Avro::Record(items)
            }
            Schema::Union(union) => {
                let variants = union.variants();
                let null_branch = variants.iter().position(|v| matches!(v, Schema::Null));
                let (index, value) = match (json, null_branch) {
                    (Json::Null, Some(index)) => (index, Avro::Null),
                    _ => variants
                        .iter()
                        .enumerate()
                        .filter(|(_, v)| !matches!(v, Schema::Null))
                        .find_map(|(i, v)| self.value(json, v, path).ok().map(|value| (i, value)))
                        .ok_or_else(mismatch)?,
                };
                Avro::Union(u32::try_from(index).map_err(|_| mismatch())?, Box::new(value))
            }
            _ => return Err(mismatch()),
        })
    }
}

/// Writes `event` under `schema` (see [`CompiledSchema::encode`]).
pub fn encode(event: &Event, schema: &CompiledSchema) -> Result<Vec<u8>, EncodeError> {
    schema.encode(event)
}

impl CompiledSchema {
    /// Writes `event` as an Avro datum under this schema, with real bitmaps computed from the header's field names,
    /// so that [`CompiledSchema::decode`] gives the same event back.
    pub fn encode(&self, event: &Event) -> Result<Vec<u8>, EncodeError> {
        let record = self.record;
        let event_id = event.id.as_str();
        match (&event.header, self.is_change) {
            (None, true) => {
                return Err(EncodeError::MissingHeader {
                    event_id: event_id.to_owned(),
                    schema: self.name.clone(),
                });
            }
            (Some(_), false) => {
                return Err(EncodeError::UnexpectedHeader {
                    event_id: event_id.to_owned(),
                    schema: self.name.clone(),
                });
            }
            _ => {}
        }
        let encoder = Encoder { schema: self, event_id };
        if let Some(unknown) = event
            .fields
            .keys()
            .find(|k| *k == HEADER_FIELD || !record.lookup.contains_key(*k))
        {
            return Err(encoder.unknown(unknown));
        }
        let mut items = Vec::with_capacity(record.fields.len());
        for field in &record.fields {
            let value = match (&event.header, field.name.as_str()) {
                (Some(header), HEADER_FIELD) => {
                    encoder.value(&self.header_json(event_id, header)?, &field.schema, HEADER_FIELD)?
                }
                _ => {
                    let json = event.fields.get(&field.name).unwrap_or(&Json::Null);
                    encoder.value(json, &field.schema, &field.name)?
                }
            };
            items.push((field.name.clone(), value));
        }
        self.writer
            .write_value_to_vec(Avro::Record(items))
            .map_err(|source| EncodeError::Avro {
                event_id: event_id.to_owned(),
                source,
            })
    }

    /// The header as the JSON the Avro record is built from, bitmaps encoded.
    fn header_json(&self, event_id: &str, header: &ChangeHeader) -> Result<Json, EncodeError> {
        let bitmap = |field: &'static str, names: &[String]| {
            bitmap::encode(names, &self.layout)
                .map(Json::from)
                .map_err(|source| EncodeError::Bitmap {
                    event_id: event_id.to_owned(),
                    field,
                    source,
                })
        };
        let text = |s: &Option<String>| Json::from(s.clone().unwrap_or_default());
        let mut map = Map::new();
        map.insert("entityName".into(), Json::from(header.entity.clone()));
        map.insert("recordIds".into(), Json::from(header.record_ids.clone()));
        map.insert("changeType".into(), Json::from(header.change_type.as_str()));
        map.insert("changeOrigin".into(), text(&header.change_origin));
        map.insert("transactionKey".into(), text(&header.transaction_key));
        map.insert(
            "sequenceNumber".into(),
            Json::from(header.sequence_number.unwrap_or_default()),
        );
        map.insert(
            "commitTimestamp".into(),
            Json::from(header.commit_timestamp.unwrap_or_default()),
        );
        map.insert(
            "commitNumber".into(),
            Json::from(header.commit_number.unwrap_or_default()),
        );
        map.insert("commitUser".into(), text(&header.commit_user));
        map.insert("nulledFields".into(), bitmap("nulledFields", &header.nulled_fields)?);
        map.insert("diffFields".into(), bitmap("diffFields", &header.diff_fields)?);
        map.insert("changedFields".into(), bitmap("changedFields", &header.changed_fields)?);
        Ok(Json::Object(map))
    }
}
