//! `{{path}}` templates: parsed once per load, rendered from the event, record and vars.
//!
//! A template that is one whole `{{...}}` keeps the JSON type of its value; anything else renders to a
//! string. `{{a ?? b}}` falls back to `b` when `a` is missing or null; a quoted literal may end a chain
//! (`{{event.Reason__c ?? "unknown"}}`).

use std::fmt;

use serde_json::{Map, Value};

use crate::event::{Event, lookup_path};

/// The first segment of a template path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Root {
    Event,
    Header,
    RecordId,
    Record,
    EventId,
    ReplayId,
    IdempotencyKey,
    Route,
    /// What failed, in `on_failure` actions only: `reason`, `sink`, `action`, `letter`.
    Failure,
    Var(String),
}

/// The roots every template may use, besides the rules' `vars`.
pub const ROOTS: &[&str] = &[
    "event",
    "header",
    "record_id",
    "record",
    "event_id",
    "replay_id",
    "idempotency_key",
    "route",
    "failure",
];

impl Root {
    fn parse(name: &str, vars: &dyn Fn(&str) -> bool) -> Option<Root> {
        Some(match name {
            "event" => Root::Event,
            "header" => Root::Header,
            "record_id" => Root::RecordId,
            "record" => Root::Record,
            "event_id" => Root::EventId,
            "replay_id" => Root::ReplayId,
            "idempotency_key" => Root::IdempotencyKey,
            "route" => Root::Route,
            "failure" => Root::Failure,
            other if vars(other) => Root::Var(other.to_string()),
            _ => return None,
        })
    }

    pub fn name(&self) -> &str {
        match self {
            Root::Event => "event",
            Root::Header => "header",
            Root::RecordId => "record_id",
            Root::Record => "record",
            Root::EventId => "event_id",
            Root::ReplayId => "replay_id",
            Root::IdempotencyKey => "idempotency_key",
            Root::Route => "route",
            Root::Failure => "failure",
            Root::Var(name) => name,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Path {
    pub root: Root,
    pub segments: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
enum Alternative {
    Path(Path),
    Literal(String),
}

#[derive(Debug, Clone, PartialEq)]
struct Expr {
    source: String,
    alternatives: Vec<Alternative>,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Expr(Expr),
}

/// A parsed template string.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

/// Why a template does not parse; `offset` is the byte offset in the template string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError {
    pub offset: usize,
    pub message: String,
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Everything a template may read while rendering.
pub struct RenderCtx<'a> {
    pub event: &'a Event,
    /// The CDC header as JSON (built once per event).
    pub header: &'a Value,
    pub record_id: Option<&'a str>,
    pub record: &'a Map<String, Value>,
    pub vars: &'a Map<String, Value>,
    pub idempotency_key: Option<&'a str>,
    pub route: &'a str,
    /// What failed, for an `on_failure` action (`None` elsewhere: `failure` renders as missing).
    pub failure: Option<&'a Value>,
}

impl RenderCtx<'_> {
    fn lookup(&self, path: &Path) -> Option<Value> {
        let segments = path.segments.iter().map(String::as_str);
        let found = match &path.root {
            Root::Event => {
                if path.segments.is_empty() {
                    return Some(Value::Object(self.event.fields.clone()));
                }
                lookup_path(&self.event.fields, segments)
            }
            Root::Header => walk(self.header, segments),
            Root::Record => {
                if path.segments.is_empty() {
                    return Some(Value::Object(self.record.clone()));
                }
                lookup_path(self.record, segments)
            }
            Root::RecordId => return scalar(self.record_id, &path.segments),
            Root::EventId => return scalar(Some(&self.event.id), &path.segments),
            Root::ReplayId => return scalar(self.event.replay_id.as_deref(), &path.segments),
            Root::IdempotencyKey => return scalar(self.idempotency_key, &path.segments),
            Root::Route => return scalar(Some(self.route), &path.segments),
            Root::Failure => walk(self.failure?, segments),
            Root::Var(name) => walk(self.vars.get(name)?, segments),
        };
        found.filter(|v| !v.is_null()).cloned()
    }
}

fn scalar(value: Option<&str>, segments: &[String]) -> Option<Value> {
    if segments.is_empty() {
        value.map(Value::from)
    } else {
        None
    }
}

fn walk<'a, 'b>(mut value: &'a Value, segments: impl Iterator<Item = &'b str>) -> Option<&'a Value> {
    for segment in segments {
        value = match value {
            Value::Object(map) => map.get(segment)?,
            Value::Array(items) => items.get(segment.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(value)
}

impl Template {
    /// Parses `source`; `is_var` says which names are rule `vars`.
    pub fn parse(source: &str, is_var: &dyn Fn(&str) -> bool) -> Result<Template, TemplateError> {
        let mut parts = Vec::new();
        let mut rest = source;
        let mut offset = 0;
        while let Some(start) = rest.find("{{") {
            if start > 0 {
                parts.push(Part::Text(rest[..start].to_string()));
            }
            let body_start = start + 2;
            let Some(len) = rest[body_start..].find("}}") else {
                return Err(TemplateError {
                    offset: offset + start,
                    message: "`{{` without a closing `}}`".into(),
                });
            };
            let body = &rest[body_start..body_start + len];
            parts.push(Part::Expr(parse_expr(body, offset + body_start, is_var)?));
            let consumed = body_start + len + 2;
            rest = &rest[consumed..];
            offset += consumed;
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Template {
            source: source.to_string(),
            parts,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Every path the template reads.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.parts.iter().flat_map(|part| match part {
            Part::Expr(expr) => expr
                .alternatives
                .iter()
                .filter_map(|a| match a {
                    Alternative::Path(p) => Some(p),
                    Alternative::Literal(_) => None,
                })
                .collect::<Vec<_>>(),
            Part::Text(_) => Vec::new(),
        })
    }

    pub fn is_constant(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Text(_)))
    }

    /// Renders to a string; `Err` names the first `{{...}}` that had no value.
    pub fn render_string(&self, ctx: &RenderCtx<'_>) -> Result<String, String> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Expr(expr) => match eval_expr(expr, ctx) {
                    Some(Value::String(s)) => out.push_str(&s),
                    Some(value) => out.push_str(&value.to_string()),
                    None => return Err(format!("{{{{{}}}}}", expr.source.trim())),
                },
            }
        }
        Ok(out)
    }

    /// Renders to a string with missing values left empty (log messages).
    pub fn render_lossy(&self, ctx: &RenderCtx<'_>) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Expr(expr) => match eval_expr(expr, ctx) {
                    Some(Value::String(s)) => out.push_str(&s),
                    Some(value) => out.push_str(&value.to_string()),
                    None => {}
                },
            }
        }
        out
    }

    /// Renders to a JSON value: a whole-value template keeps its type; a missing value is `null`.
    pub fn render_value(&self, ctx: &RenderCtx<'_>) -> Value {
        if let [Part::Expr(expr)] = self.parts.as_slice() {
            return eval_expr(expr, ctx).unwrap_or(Value::Null);
        }
        self.render_string(ctx).map(Value::String).unwrap_or(Value::Null)
    }
}

fn eval_expr(expr: &Expr, ctx: &RenderCtx<'_>) -> Option<Value> {
    expr.alternatives.iter().find_map(|alt| match alt {
        Alternative::Path(path) => ctx.lookup(path),
        Alternative::Literal(text) => Some(Value::String(text.clone())),
    })
}

fn parse_expr(body: &str, body_offset: usize, is_var: &dyn Fn(&str) -> bool) -> Result<Expr, TemplateError> {
    let mut alternatives = Vec::new();
    let mut local = 0;
    for raw in body.split("??") {
        let lead = raw.len() - raw.trim_start().len();
        let text = raw.trim();
        let at = body_offset + local + lead;
        local += raw.len() + 2;
        if text.is_empty() {
            return Err(TemplateError {
                offset: at,
                message: "empty expression in `{{ }}`".into(),
            });
        }
        if let Some(literal) = quoted(text) {
            alternatives.push(Alternative::Literal(literal.to_string()));
            continue;
        }
        if matches!(alternatives.last(), Some(Alternative::Literal(_))) {
            return Err(TemplateError {
                offset: at,
                message: "a quoted literal can only end a `??` chain".into(),
            });
        }
        let mut segments = text.split('.').map(|s| s.strip_suffix('?').unwrap_or(s));
        let root_name = segments.next().unwrap_or_default();
        let Some(root) = Root::parse(root_name, is_var) else {
            let mut message = format!(
                "unknown template root `{root_name}`; use one of {}, or a name from `vars`",
                ROOTS.join(", ")
            );
            if let Some(best) = crate::rules::suggest(root_name, ROOTS.iter().copied()) {
                message = format!(
                    "unknown template root `{root_name}` (did you mean `{best}`?); use one of {}, or a name from `vars`",
                    ROOTS.join(", ")
                );
            }
            return Err(TemplateError { offset: at, message });
        };
        let segments: Vec<String> = segments.map(str::to_string).collect();
        if let Some(bad) = segments
            .iter()
            .find(|s| s.is_empty() || !s.chars().all(|c| c.is_alphanumeric() || c == '_'))
        {
            return Err(TemplateError {
                offset: at,
                message: format!("`{text}` is not a path (bad segment `{bad}`)"),
            });
        }
        alternatives.push(Alternative::Path(Path { root, segments }));
    }
    Ok(Expr {
        source: body.to_string(),
        alternatives,
    })
}

fn quoted(text: &str) -> Option<&str> {
    let inner = text.strip_prefix('"').and_then(|t| t.strip_suffix('"'));
    inner
        .or_else(|| text.strip_prefix('\'').and_then(|t| t.strip_suffix('\'')))
        .filter(|_| text.len() >= 2)
}

/// A JSON value whose strings are templates (job data, log fields).
#[derive(Debug, Clone, PartialEq)]
pub enum ValueTemplate {
    Template(Template),
    Literal(Value),
    Array(Vec<ValueTemplate>),
    Object(Vec<(String, ValueTemplate)>),
}

impl ValueTemplate {
    pub fn parse(value: &Value, is_var: &dyn Fn(&str) -> bool) -> Result<ValueTemplate, TemplateError> {
        Ok(match value {
            Value::String(s) => {
                let template = Template::parse(s, is_var)?;
                if template.is_constant() {
                    ValueTemplate::Literal(value.clone())
                } else {
                    ValueTemplate::Template(template)
                }
            }
            Value::Array(items) => ValueTemplate::Array(
                items
                    .iter()
                    .map(|v| ValueTemplate::parse(v, is_var))
                    .collect::<Result<_, _>>()?,
            ),
            Value::Object(map) => ValueTemplate::Object(
                map.iter()
                    .map(|(k, v)| Ok((k.clone(), ValueTemplate::parse(v, is_var)?)))
                    .collect::<Result<_, TemplateError>>()?,
            ),
            other => ValueTemplate::Literal(other.clone()),
        })
    }

    pub fn render(&self, ctx: &RenderCtx<'_>) -> Value {
        match self {
            ValueTemplate::Template(t) => t.render_value(ctx),
            ValueTemplate::Literal(v) => v.clone(),
            ValueTemplate::Array(items) => Value::Array(items.iter().map(|i| i.render(ctx)).collect()),
            ValueTemplate::Object(entries) => Value::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.clone(), v.render(ctx)))
                    .collect::<Map<_, _>>(),
            ),
        }
    }

    /// Every template inside, for checks.
    pub fn templates(&self) -> Vec<&Template> {
        match self {
            ValueTemplate::Template(t) => vec![t],
            ValueTemplate::Literal(_) => Vec::new(),
            ValueTemplate::Array(items) => items.iter().flat_map(|i| i.templates()).collect(),
            ValueTemplate::Object(entries) => entries.iter().flat_map(|(_, v)| v.templates()).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event() -> Event {
        Event::from_json(
            r#"{"id":"ev-1","channel":"/event/Order_Fulfilment_Requested__e","replay_id":"0a",
                "fields":{"Order_Id__c":"801A","Amount__c":12.5,"Addr":{"City":"Osaka"},"Idempotency_Key__c":null}}"#,
        )
        .unwrap()
    }

    fn render(source: &str, f: impl FnOnce(&Template, &RenderCtx<'_>)) {
        let event = event();
        let vars = json!({"queue_tag": "blue"}).as_object().unwrap().clone();
        let record = json!({"AccountId": "001B"}).as_object().unwrap().clone();
        let ctx = RenderCtx {
            event: &event,
            header: &Value::Null,
            record_id: Some("801A"),
            record: &record,
            vars: &vars,
            idempotency_key: Some("k-1"),
            route: "r",
            failure: None,
        };
        let t = Template::parse(source, &|n| n == "queue_tag").unwrap();
        f(&t, &ctx);
    }

    #[test]
    fn whole_value_keeps_its_json_type() {
        render("{{event.Amount__c}}", |t, ctx| {
            assert_eq!(t.render_value(ctx), json!(12.5))
        });
        render("{{ event.Addr }}", |t, ctx| {
            assert_eq!(t.render_value(ctx), json!({"City": "Osaka"}))
        });
    }

    #[test]
    fn mixed_text_renders_a_string() {
        render("orders:account:{{record.AccountId}}:{{queue_tag}}", |t, ctx| {
            assert_eq!(t.render_string(ctx).unwrap(), "orders:account:001B:blue")
        });
        render("cdc-order-{{record_id}} {{event.Addr?.City}}", |t, ctx| {
            assert_eq!(t.render_value(ctx), json!("cdc-order-801A Osaka"))
        });
    }

    #[test]
    fn fallback_chain_skips_missing_and_null() {
        render("{{event.Idempotency_Key__c ?? event_id}}", |t, ctx| {
            assert_eq!(t.render_value(ctx), json!("ev-1"))
        });
        render("{{event.Nope ?? 'none'}}", |t, ctx| {
            assert_eq!(t.render_value(ctx), json!("none"))
        });
    }

    #[test]
    fn missing_value_is_null_or_an_error_naming_it() {
        render("{{event.Nope}}", |t, ctx| assert_eq!(t.render_value(ctx), Value::Null));
        render("k-{{event.Nope}}", |t, ctx| {
            assert_eq!(t.render_value(ctx), Value::Null);
            assert_eq!(t.render_string(ctx).unwrap_err(), "{{event.Nope}}");
        });
    }

    #[test]
    fn unknown_root_is_an_error_with_offset_and_suggestion() {
        let err = Template::parse("x-{{recordid}}", &|_| false).unwrap_err();
        assert_eq!(err.offset, 4);
        assert!(err.message.contains("did you mean `record_id`"), "{}", err.message);
        assert!(Template::parse("{{event.A", &|_| false).is_err());
        assert!(Template::parse("{{ }}", &|_| false).is_err());
    }
}
