//! The channels' Avro schemas as `validate --avro DIR` and the language server read them: each object's fields,
//! their types, and the members of compound fields. A field's type says which literals it can be compared with.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use apache_avro::Schema;

use crate::diag::Problem;
use crate::rules::check::Literal;
use crate::rules::suggest;

/// What kind of value a field holds once decoded (see `sources::pubsub::avro`): what it compares with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    Number,
    Boolean,
    Compound,
    /// A list, a map or bytes: not compared with a literal here.
    Other,
}

/// One field of a schema.
#[derive(Debug, Clone)]
pub struct Field {
    /// The Avro type as the schema writes it, without the `null` of a union (`double`, `enum ChangeType`).
    pub type_name: String,
    pub kind: Kind,
    /// The members of a compound field.
    pub members: BTreeMap<String, Field>,
}

/// Each object's fields, from every `*.avsc` of a folder.
#[derive(Debug, Default)]
pub struct AvroFields {
    /// Record name (`OrderChangeEvent`) -> top-level field (without `ChangeEventHeader`).
    pub objects: HashMap<String, BTreeMap<String, Field>>,
}

impl AvroFields {
    /// Parses every `*.avsc` in `dir` with apache-avro.
    pub fn load(dir: &Path) -> Result<AvroFields, Vec<Problem>> {
        let entries = std::fs::read_dir(dir)
            .map_err(|e| vec![Problem::error(dir, 0, 0, format!("cannot read the Avro folder: {e}"))])?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "avsc"))
            .collect();
        files.sort();
        let mut fields = AvroFields::default();
        let mut problems = Vec::new();
        for file in files {
            let parsed = std::fs::read_to_string(&file)
                .map_err(|e| e.to_string())
                .and_then(|text| Schema::parse_str(&text).map_err(|e| e.to_string()));
            match parsed {
                Ok(schema @ Schema::Record(_)) => {
                    let mut named = HashMap::new();
                    collect_named(&schema, &mut named);
                    let Schema::Record(record) = &schema else {
                        unreachable!()
                    };
                    let top = record
                        .fields
                        .iter()
                        .filter(|f| f.name != "ChangeEventHeader")
                        .map(|f| (f.name.clone(), field(&f.schema, &named, 0)))
                        .collect();
                    fields.objects.insert(record.name.name().to_string(), top);
                }
                Ok(_) => problems.push(Problem::error(&file, 0, 0, "the schema is not a record")),
                Err(e) => problems.push(Problem::error(&file, 0, 0, format!("not a valid Avro schema: {e}"))),
            }
        }
        if problems.is_empty() { Ok(fields) } else { Err(problems) }
    }

    /// The fields for a channel: `/data/OrderChangeEvent` -> `OrderChangeEvent`.
    pub fn for_channel(&self, channel: &str) -> Option<&BTreeMap<String, Field>> {
        self.objects.get(channel.rsplit('/').next().unwrap_or(channel))
    }

    /// The fields of an object's records as enrichment reads them, when its Change Data Capture schema is in the
    /// folder (`Order` -> `OrderChangeEvent`).
    pub fn for_object(&self, object: &str) -> Option<&BTreeMap<String, Field>> {
        self.objects.get(&format!("{object}ChangeEvent"))
    }
}

fn collect_named(schema: &Schema, named: &mut HashMap<String, Schema>) {
    match schema {
        Schema::Record(r) => {
            named.entry(r.name.name().to_string()).or_insert_with(|| schema.clone());
            for f in &r.fields {
                collect_named(&f.schema, named);
            }
        }
        Schema::Union(u) => u.variants().iter().for_each(|v| collect_named(v, named)),
        _ => {}
    }
}

/// A field's type, resolving named references and the `null` of a nullable union.
fn field(schema: &Schema, named: &HashMap<String, Schema>, depth: usize) -> Field {
    let simple = |type_name: &str, kind: Kind| Field {
        type_name: type_name.to_string(),
        kind,
        members: BTreeMap::new(),
    };
    match schema {
        Schema::String | Schema::Uuid(_) => simple("string", Kind::Text),
        Schema::Enum(e) => simple(&format!("enum {}", e.name.name()), Kind::Text),
        Schema::Boolean => simple("boolean", Kind::Boolean),
        Schema::Int => simple("int", Kind::Number),
        Schema::Long => simple("long", Kind::Number),
        Schema::Float => simple("float", Kind::Number),
        Schema::Double => simple("double", Kind::Number),
        Schema::Date => simple("int (date)", Kind::Number),
        Schema::TimestampMillis | Schema::TimestampMicros => simple("long (timestamp)", Kind::Number),
        Schema::Record(r) => Field {
            type_name: format!("record {}", r.name.name()),
            kind: Kind::Compound,
            members: if depth > 8 {
                BTreeMap::new()
            } else {
                r.fields
                    .iter()
                    .map(|f| (f.name.clone(), field(&f.schema, named, depth + 1)))
                    .collect()
            },
        },
        Schema::Ref { name } => match named.get(name.name()) {
            Some(s) if depth <= 8 => field(s, named, depth + 1),
            _ => simple(&format!("record {}", name.name()), Kind::Compound),
        },
        Schema::Union(u) => {
            let variants: Vec<&Schema> = u.variants().iter().filter(|v| **v != Schema::Null).collect();
            match variants.as_slice() {
                [one] => field(one, named, depth),
                _ => simple("union", Kind::Other),
            }
        }
        Schema::Array(_) => simple("array", Kind::Other),
        Schema::Map(_) => simple("map", Kind::Other),
        _ => simple("bytes", Kind::Other),
    }
}

/// Why a field path is not in the schema (with the name meant, when one is close), or its field.
pub fn lookup<'a>(fields: &'a BTreeMap<String, Field>, path: &[&str]) -> Result<&'a Field, String> {
    let (top, rest) = path.split_first().ok_or_else(String::new)?;
    let Some(found) = fields.get(*top) else {
        let hint = suggest(top, fields.keys().map(String::as_str))
            .map(|s| format!(" (did you mean `{s}`?)"))
            .unwrap_or_default();
        return Err(format!("`{top}` is not a field of the channel's Avro schema{hint}"));
    };
    let Some(member) = rest.first() else { return Ok(found) };
    let name = format!("{top}.{member}");
    if found.kind != Kind::Compound {
        return Err(format!("`{top}` is not a compound field, so `{name}` does not exist"));
    }
    match found.members.get(*member) {
        Some(m) => Ok(m),
        None => {
            let hint = suggest(member, found.members.keys().map(String::as_str))
                .map(|s| format!(" (did you mean `{top}.{s}`?)"))
                .unwrap_or_default();
            Err(format!("`{name}` is not a field of the channel's Avro schema{hint}"))
        }
    }
}

/// Why comparing a field of this type with this literal is a mistake, with the literal meant; `None` when the
/// types agree (or cannot be told apart here).
pub fn mismatch(field: &Field, literal: &Literal, schema: &str) -> Option<String> {
    let (given, kind) = match literal {
        Literal::Str(s) => (format!("the string \"{s}\""), Kind::Text),
        Literal::Int(i) => (format!("the number {i}"), Kind::Number),
        Literal::Float(f) => (format!("the number {f}"), Kind::Number),
        Literal::Bool(b) => (format!("`{b}`"), Kind::Boolean),
    };
    if field.kind == kind || field.kind == Kind::Other {
        return None;
    }
    let meant = match (field.kind, literal) {
        (Kind::Number, Literal::Str(s)) if s.trim().parse::<f64>().is_ok() => format!("; write {}", s.trim()),
        (Kind::Boolean, Literal::Str(s)) if matches!(s.as_str(), "true" | "false") => format!("; write {s}"),
        (Kind::Text, Literal::Int(i)) => format!("; write \"{i}\""),
        (Kind::Text, Literal::Float(f)) => format!("; write \"{f}\""),
        (Kind::Text, Literal::Bool(b)) => format!("; write \"{b}\""),
        (Kind::Compound, _) => "; compare one of its members (`event.Field.Member`)".to_string(),
        _ => String::new(),
    };
    Some(format!(
        "is a `{}` in {schema}, but is compared with {given}: values of different types never compare as meant{meant}",
        field.type_name
    ))
}
