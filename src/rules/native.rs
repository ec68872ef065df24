//! Native evaluation of the common predicate shapes (issue 11).
//!
//! At load, a predicate whose compiled Rhai AST uses only reads of the context (`event.F`, `header.m`,
//! `record.F`, `?.`, `record_id`, ...), constants and `vars`, `==`, `!=`, `in`, `!`, `&&`, `||`, `??` and
//! the CDC helpers is translated into a [`Native`] tree, evaluated straight over the [`Event`] and its
//! JSON, without building the script scope or calling into the engine. Everything else stays with Rhai.
//!
//! Rhai stays the reference: whenever a value is not one whose result this module knows to be Rhai's
//! (a type mismatch that Rhai reports as an error, a comparison of two arrays, a property of a string),
//! evaluation answers [`Fallback`] and the router evaluates that predicate with Rhai for that event, so
//! results and error messages are the engine's. `tests/native.rs` checks the two agree on generated
//! predicates and events.

use rhai::{AST, Dynamic, Expr, FnCallExpr, ImmutableString, Scope, Stmt};
use serde_json::{Map, Value};

use crate::event::{ChangeType, Event, HeaderMember, HeaderValue};
use crate::rules::helpers;

/// A predicate in its native form.
#[derive(Debug, Clone)]
pub struct Native(Node);

/// The predicate needs Rhai for this event: its result (or error) is the engine's to give.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fallback;

#[derive(Debug, Clone)]
enum Node {
    Const(Const),
    /// A context variable, then its properties, each with whether it is read with `?.` (a unit value
    /// before it ends the chain as unit).
    Path(Root, Vec<(String, bool)>),
    Not(Box<Node>),
    And(Vec<Node>),
    Or(Vec<Node>),
    Coalesce(Vec<Node>),
    /// `==` (true) or `!=` (false).
    Eq(Box<Node>, Box<Node>, bool),
    /// `contains(container, item)`, which is what `item in container` compiles to.
    Contains(Box<Node>, Box<Node>),
    Helper(Helper, Vec<Node>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Root {
    Event,
    /// `header`, with its member read (resolved at load: no name comparisons per event; `None`: not a member, so
    /// unit).
    Header(Option<HeaderMember>),
    Record,
    RecordId,
    EventId,
    ReplayId,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Helper {
    Changed,
    ChangedAny,
    ChangedOnly,
    Became,
    Nulled,
    IsBlank,
    IsGap,
    ContainsAny,
    HasRecord,
}

impl Helper {
    fn of(name: &str, arity: usize) -> Option<Helper> {
        Some(match (name, arity) {
            ("changed", 1) => Helper::Changed,
            ("changed_any", 1) => Helper::ChangedAny,
            ("changed_only", 1) => Helper::ChangedOnly,
            ("became", 2) => Helper::Became,
            ("nulled", 1) => Helper::Nulled,
            ("is_blank", 1) => Helper::IsBlank,
            ("is_gap", 0) => Helper::IsGap,
            ("contains_any", 2) => Helper::ContainsAny,
            ("has_record", 0) => Helper::HasRecord,
            _ => return None,
        })
    }
}

/// A constant of the predicate (a literal or a `vars` entry).
#[derive(Debug, Clone)]
enum Const {
    Unit,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(ImmutableString),
    List(Vec<Const>),
}

/// What a predicate sees of one evaluation: the event, and the record and record id of the unit.
pub struct Ctx<'a> {
    pub event: &'a Event,
    pub record_id: Option<&'a str>,
    /// The record as the route requested it (empty while `when` is evaluated).
    pub record: &'a Map<String, Value>,
    pub has_record: bool,
}

/// A value during evaluation, borrowed from the event, the record or the predicate.
#[derive(Debug, Clone, Copy)]
enum V<'a> {
    Unit,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(&'a str),
    /// A JSON array or object.
    Json(&'a Value),
    /// A header list (`changed_fields`, ...).
    Names(&'a [String]),
    List(&'a [Const]),
}

impl<'a> V<'a> {
    fn json(value: &'a Value) -> Result<V<'a>, Fallback> {
        Ok(match value {
            Value::Null => V::Unit,
            Value::Bool(b) => V::Bool(*b),
            Value::Number(n) => match (n.as_i64(), n.as_f64()) {
                (Some(i), _) => V::Int(i),
                (None, Some(f)) if n.is_f64() => V::Float(f),
                // A u64 above i64::MAX: whatever Rhai's conversion makes of it.
                _ => return Err(Fallback),
            },
            Value::String(s) => V::Str(s),
            Value::Array(_) | Value::Object(_) => V::Json(value),
        })
    }

    fn of(c: &'a Const) -> V<'a> {
        match c {
            Const::Unit => V::Unit,
            Const::Bool(b) => V::Bool(*b),
            Const::Int(i) => V::Int(*i),
            Const::Float(f) => V::Float(*f),
            Const::Str(s) => V::Str(s),
            Const::List(items) => V::List(items),
        }
    }

    fn header(value: Option<HeaderValue<'a>>) -> V<'a> {
        match value {
            None => V::Unit,
            Some(HeaderValue::Str(s)) => V::Str(s),
            Some(HeaderValue::Names(l)) => V::Names(l),
            Some(HeaderValue::Int(i)) => V::Int(i),
        }
    }

    fn opt_str(s: Option<&'a str>) -> V<'a> {
        s.map_or(V::Unit, V::Str)
    }

    fn is_composite(self) -> bool {
        matches!(self, V::Json(_) | V::Names(_) | V::List(_))
    }

    /// The items of an array value.
    fn items(self) -> Option<Items<'a>> {
        match self {
            V::Json(Value::Array(items)) => Some(Items::Json(items)),
            V::Names(names) => Some(Items::Names(names)),
            V::List(items) => Some(Items::List(items)),
            _ => None,
        }
    }
}

#[derive(Clone, Copy)]
enum Items<'a> {
    Json(&'a [Value]),
    Names(&'a [String]),
    List(&'a [Const]),
}

impl<'a> Items<'a> {
    fn is_empty(self) -> bool {
        match self {
            Items::Json(i) => i.is_empty(),
            Items::Names(i) => i.is_empty(),
            Items::List(i) => i.is_empty(),
        }
    }

    /// Whether `f` holds for some item; stops at the first that does, or at the first [`Fallback`].
    fn any(self, mut f: impl FnMut(V<'a>) -> Result<bool, Fallback>) -> Result<bool, Fallback> {
        match self {
            Items::Json(items) => {
                for item in items {
                    if f(V::json(item)?)? {
                        return Ok(true);
                    }
                }
            }
            Items::Names(items) => {
                for item in items {
                    if f(V::Str(item))? {
                        return Ok(true);
                    }
                }
            }
            Items::List(items) => {
                for item in items {
                    if f(V::of(item))? {
                        return Ok(true);
                    }
                }
            }
        }
        Ok(false)
    }

    /// Whether `f` holds for some string item; the others are skipped, as the helpers' `names` does.
    fn any_string(self, mut f: impl FnMut(&str) -> bool) -> bool {
        match self {
            Items::Json(items) => items.iter().filter_map(Value::as_str).any(f),
            Items::Names(items) => items.iter().any(|s| f(s)),
            Items::List(items) => items.iter().any(|c| matches!(c, Const::Str(s) if f(s))),
        }
    }
}

impl Native {
    /// The native form of a compiled predicate, when every part of it has one.
    /// `scope` is the one the predicate was compiled with: its constants are the `vars`.
    pub fn compile(ast: &AST, scope: &Scope<'_>) -> Option<Native> {
        if ast.has_functions() {
            return None;
        }
        let [statement] = ast.statements() else { return None };
        let node = match statement {
            Stmt::Expr(expr) => node(expr, scope)?,
            Stmt::FnCall(call, _) => call_node(call, scope)?,
            _ => return None,
        };
        Some(Native(node))
    }

    /// Evaluates the predicate: its boolean value, or [`Fallback`] when only Rhai can say.
    pub fn eval(&self, ctx: &Ctx<'_>) -> Result<bool, Fallback> {
        match eval(&self.0, ctx)? {
            V::Bool(b) => Ok(b),
            _ => Err(Fallback),
        }
    }
}

fn node(expr: &Expr, vars: &Scope<'_>) -> Option<Node> {
    Some(match expr {
        Expr::Unit(_) => Node::Const(Const::Unit),
        Expr::BoolConstant(b, _) => Node::Const(Const::Bool(*b)),
        Expr::IntegerConstant(i, _) => Node::Const(Const::Int(*i)),
        Expr::FloatConstant(f, _) => Node::Const(Const::Float(**f)),
        Expr::StringConstant(s, _) => Node::Const(Const::Str(s.clone())),
        Expr::DynamicConstant(d, _) => Node::Const(dynamic_const(d)?),
        Expr::Array(items, _) => {
            let items = items.iter().map(|e| match node(e, vars)? {
                Node::Const(c) => Some(c),
                _ => None,
            });
            Node::Const(Const::List(items.collect::<Option<_>>()?))
        }
        Expr::Variable(v, _, _) => {
            let (_, name, namespace, _) = &**v;
            if !namespace.is_empty() {
                return None;
            }
            match root(name) {
                Some(root) => Node::Path(root, Vec::new()),
                None if vars.is_constant(name) == Some(true) => Node::Const(dynamic_const(vars.get(name)?)?),
                None => return None,
            }
        }
        Expr::Dot(x, flags, _) => {
            let Expr::Variable(v, _, _) = &x.lhs else { return None };
            let (_, name, namespace, _) = &**v;
            if !namespace.is_empty() {
                return None;
            }
            let root = root(name)?;
            let mut segments = Vec::new();
            let mut elvis = flags.contains(rhai::ASTFlags::NEGATED);
            let mut rest = &x.rhs;
            loop {
                match rest {
                    Expr::Property(p, _) => {
                        segments.push((p.2.to_string(), elvis));
                        break;
                    }
                    Expr::Dot(x, flags, _) => {
                        let Expr::Property(p, _) = &x.lhs else { return None };
                        segments.push((p.2.to_string(), elvis));
                        elvis = flags.contains(rhai::ASTFlags::NEGATED);
                        rest = &x.rhs;
                    }
                    _ => return None,
                }
            }
            let root = match (root, segments.first()) {
                (Root::Header(_), Some((name, _))) => Root::Header(HeaderMember::of(name)),
                (root, _) => root,
            };
            Node::Path(root, segments)
        }
        Expr::And(items, _) => Node::And(items.iter().map(|e| node(e, vars)).collect::<Option<_>>()?),
        Expr::Or(items, _) => Node::Or(items.iter().map(|e| node(e, vars)).collect::<Option<_>>()?),
        Expr::Coalesce(items, _) => Node::Coalesce(items.iter().map(|e| node(e, vars)).collect::<Option<_>>()?),
        Expr::FnCall(call, _) => call_node(call, vars)?,
        _ => return None,
    })
}

fn call_node(call: &FnCallExpr, vars: &Scope<'_>) -> Option<Node> {
    if !call.namespace.is_empty() || call.capture_parent_scope {
        return None;
    }
    let mut args = call.args.iter().map(|a| node(a, vars)).collect::<Option<Vec<_>>>()?;
    Some(match (call.name.as_str(), args.len()) {
        ("!", 1) => Node::Not(Box::new(args.remove(0))),
        ("==" | "!=", 2) => {
            let rhs = args.pop()?;
            let lhs = args.pop()?;
            Node::Eq(Box::new(lhs), Box::new(rhs), call.name == "==")
        }
        ("contains", 2) => {
            let item = args.pop()?;
            let container = args.pop()?;
            Node::Contains(Box::new(container), Box::new(item))
        }
        (name, arity) => Node::Helper(Helper::of(name, arity)?, args),
    })
}

fn root(name: &str) -> Option<Root> {
    Some(match name {
        "event" => Root::Event,
        "header" => Root::Header(None),
        "record" => Root::Record,
        "record_id" => Root::RecordId,
        "event_id" => Root::EventId,
        "replay_id" => Root::ReplayId,
        _ => return None,
    })
}

fn dynamic_const(d: &Dynamic) -> Option<Const> {
    if d.is_unit() {
        return Some(Const::Unit);
    }
    if let Ok(b) = d.as_bool() {
        return Some(Const::Bool(b));
    }
    if let Ok(i) = d.as_int() {
        return Some(Const::Int(i));
    }
    if let Ok(f) = d.as_float() {
        return Some(Const::Float(f));
    }
    if let Some(s) = d.read_lock::<ImmutableString>() {
        return Some(Const::Str(s.clone()));
    }
    if let Some(items) = d.read_lock::<rhai::Array>() {
        return Some(Const::List(items.iter().map(dynamic_const).collect::<Option<_>>()?));
    }
    None
}

fn eval<'a>(node: &'a Node, ctx: &Ctx<'a>) -> Result<V<'a>, Fallback> {
    Ok(match node {
        Node::Const(c) => V::of(c),
        Node::Path(root, segments) => path(*root, segments, ctx)?,
        Node::Not(x) => match eval(x, ctx)? {
            V::Bool(b) => V::Bool(!b),
            _ => return Err(Fallback),
        },
        // `&&` ends at the first false, `||` at the first true; an operand that is no boolean is Rhai's error.
        Node::And(items) => V::Bool(short_circuit(items, false, ctx)?),
        Node::Or(items) => V::Bool(short_circuit(items, true, ctx)?),
        Node::Coalesce(items) => {
            let mut value = V::Unit;
            for item in items {
                value = eval(item, ctx)?;
                if !matches!(value, V::Unit) {
                    break;
                }
            }
            value
        }
        Node::Eq(a, b, equal) => V::Bool(eq(eval(a, ctx)?, eval(b, ctx)?)? == *equal),
        Node::Contains(container, item) => V::Bool(contains(eval(container, ctx)?, eval(item, ctx)?)?),
        Node::Helper(helper, args) => {
            let mut values = [V::Unit; 2];
            for (slot, arg) in values.iter_mut().zip(args) {
                *slot = eval(arg, ctx)?;
            }
            V::Bool(call(*helper, values, ctx)?)
        }
    })
}

/// The value of `&&` (`ends_on` false) or `||` (true) over `items`, evaluated left to right.
fn short_circuit<'a>(items: &'a [Node], ends_on: bool, ctx: &Ctx<'a>) -> Result<bool, Fallback> {
    for item in items {
        match eval(item, ctx)? {
            V::Bool(b) if b == ends_on => return Ok(ends_on),
            V::Bool(_) => {}
            _ => return Err(Fallback),
        }
    }
    Ok(!ends_on)
}

/// Reads a context variable and its properties.
fn path<'a>(root: Root, segments: &'a [(String, bool)], ctx: &Ctx<'a>) -> Result<V<'a>, Fallback> {
    let map = match root {
        Root::RecordId => return properties(V::opt_str(ctx.record_id), segments),
        Root::EventId => return properties(V::Str(&ctx.event.id), segments),
        Root::ReplayId => return properties(V::opt_str(ctx.event.replay_id.as_deref()), segments),
        Root::Event => &ctx.event.fields,
        Root::Record => ctx.record,
        Root::Header(member) => {
            let Some((_, rest)) = segments.split_first() else {
                return Err(Fallback);
            };
            return match &ctx.event.header {
                Some(h) => properties(V::header(member.and_then(|m| h.member(m))), rest),
                // Platform events have no header: `header` is unit.
                None => properties(V::Unit, segments),
            };
        }
    };
    // `event` and `record` are maps; passed whole, they are Rhai's to handle.
    let Some((first, rest)) = segments.split_first() else {
        return Err(Fallback);
    };
    properties(member(map, &first.0)?, rest)
}

/// Reads properties of a value: members of JSON objects; `?.` on unit gives unit; anything else (a
/// property of a string, of unit without `?.`) is Rhai's to answer.
fn properties<'a>(mut value: V<'a>, segments: &'a [(String, bool)]) -> Result<V<'a>, Fallback> {
    for (name, elvis) in segments {
        value = match value {
            V::Unit if *elvis => return Ok(V::Unit),
            V::Json(Value::Object(map)) => member(map, name)?,
            _ => return Err(Fallback),
        };
    }
    Ok(value)
}

fn member<'a>(map: &'a Map<String, Value>, name: &str) -> Result<V<'a>, Fallback> {
    map.get(name).map_or(Ok(V::Unit), V::json)
}

/// Rhai's `==` where its result is known without the engine: primitives of one type, numbers of either
/// type, and values of different types (false, unless both are numbers). Two arrays or maps: Rhai's.
fn eq(a: V<'_>, b: V<'_>) -> Result<bool, Fallback> {
    Ok(match (a, b) {
        (V::Unit, V::Unit) => true,
        (V::Bool(x), V::Bool(y)) => x == y,
        (V::Int(x), V::Int(y)) => x == y,
        (V::Float(x), V::Float(y)) => x == y,
        (V::Int(x), V::Float(y)) | (V::Float(y), V::Int(x)) => (x as f64) == y,
        (V::Str(x), V::Str(y)) => x == y,
        (a, b) if a.is_composite() && b.is_composite() => return Err(Fallback),
        _ => false,
    })
}

/// `contains(container, item)`: an array holds an equal item, a string holds a substring.
fn contains(container: V<'_>, item: V<'_>) -> Result<bool, Fallback> {
    if let Some(items) = container.items() {
        return items.any(|candidate| eq(candidate, item));
    }
    match (container, item) {
        (V::Str(text), V::Str(part)) => Ok(text.contains(part)),
        _ => Err(Fallback),
    }
}

fn call<'a>(helper: Helper, [a, b]: [V<'a>; 2], ctx: &Ctx<'_>) -> Result<bool, Fallback> {
    let header = ctx.event.header.as_ref();
    let changed = header.map_or(&[][..], |h| &h.changed_fields[..]);
    let text = |v: V<'a>| match v {
        V::Str(s) => Ok(s),
        _ => Err(Fallback),
    };
    let list = |v: V<'a>| v.items().ok_or(Fallback);
    Ok(match helper {
        Helper::Changed => helpers::in_set(changed, text(a)?),
        Helper::ChangedAny => list(a)?.any_string(|f| helpers::in_set(changed, f)),
        Helper::ChangedOnly => {
            let allowed = list(a)?;
            !changed.is_empty() && changed.iter().all(|f| allowed.any_string(|a| helpers::covers(a, f)))
        }
        Helper::Became => {
            let field = text(a)?;
            let value = crate::event::lookup_path(&ctx.event.fields, field.split('.'));
            let change_type = header.map(|h| h.change_type);
            match change_type {
                Some(ChangeType::Update) => helpers::in_set(changed, field) && json_eq(value, b)?,
                Some(ChangeType::Create | ChangeType::Undelete) => json_eq(value, b)?,
                _ => false,
            }
        }
        Helper::Nulled => helpers::in_set(header.map_or(&[][..], |h| &h.nulled_fields[..]), text(a)?),
        Helper::IsBlank => match a {
            V::Unit => true,
            V::Str(s) => s.trim().is_empty(),
            V::Json(Value::Object(m)) => m.is_empty(),
            v => v.items().is_some_and(Items::is_empty),
        },
        Helper::IsGap => header.is_some_and(|h| h.change_type.is_gap()),
        Helper::ContainsAny => {
            let names = list(b)?;
            match a {
                V::Str(t) => names.any_string(|n| !n.is_empty() && t.contains(n)),
                _ => false,
            }
        }
        Helper::HasRecord => ctx.has_record,
    })
}

/// The `became` helper's comparison (see `helpers::json_eq`): a string or unit directly, numbers by value,
/// other scalars by JSON equality.
fn json_eq(field: Option<&Value>, expected: V<'_>) -> Result<bool, Fallback> {
    let field = field.unwrap_or(&Value::Null);
    Ok(match expected {
        V::Str(s) => field.as_str() == Some(s),
        V::Unit => field.is_null(),
        V::Bool(b) => field.as_bool() == Some(b),
        V::Int(i) => match field {
            Value::Number(n) => n.as_f64() == Some(i as f64),
            _ => false,
        },
        V::Float(f) => match field {
            Value::Number(n) => n.as_f64() == Some(f),
            _ => false,
        },
        _ => return Err(Fallback),
    })
}
