//! Static checks of a compiled predicate, from its AST rather than by running it: every function it calls exists
//! with that many arguments (a helper, or a Rhai built-in of our sandbox), and its result can be a boolean.
//! Loading runs them, so `validate`, `test`, start-up and every hot reload refuse the same files.

use std::collections::{BTreeSet, HashMap};
use std::sync::LazyLock;

use rhai::{AST, ASTNode, Dynamic, Expr, FnCallExpr, Scope, Stmt};

use super::helpers::{self, HELPERS};
use super::suggest;

/// A problem inside a predicate: its line and column there (1-based), and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Functions the parser turns into calls that are not in any package (keywords), callable with any arguments.
const KEYWORD_FUNCTIONS: &[&str] = &["type_of", "is_def_var", "is_def_fn", "is_shared", "Fn", "call", "curry"];

/// Every function a predicate can call, by name, with the numbers of arguments it takes.
static KNOWN: LazyLock<HashMap<String, BTreeSet<usize>>> = LazyLock::new(|| {
    let engine = helpers::shared_engine();
    let mut known: HashMap<String, BTreeSet<usize>> = HashMap::new();
    let all = engine.collect_fn_metadata(
        None,
        |f| Some((f.metadata.name.to_string(), f.metadata.num_params)),
        true,
    );
    for (name, arity) in all {
        known.entry(name).or_default().insert(arity);
    }
    known
});

/// Checks one predicate (`when` or `guard`) compiled with `scope` (the context variables and `vars`).
pub fn predicate(ast: &AST, scope: &Scope<'_>) -> Vec<Finding> {
    let mut findings = Vec::new();
    ast.walk(&mut |path: &[ASTNode]| {
        let found = match path.last() {
            Some(ASTNode::Expr(Expr::FnCall(f, pos))) => call(f, *pos, f.args.len()),
            // `x.f(a)` calls `f(x, a)`.
            Some(ASTNode::Expr(Expr::MethodCall(f, pos))) => call(f, *pos, f.args.len() + 1),
            // A call at the top of a predicate is a statement.
            Some(ASTNode::Stmt(Stmt::FnCall(f, pos))) => call(f, *pos, f.args.len()),
            _ => None,
        };
        findings.extend(found);
        true
    });
    match ast.statements() {
        [Stmt::Expr(expr)] => findings.extend(boolean(expr, scope)),
        [Stmt::FnCall(f, pos)] => findings.extend(arithmetic(f, *pos)),
        _ => {}
    }
    findings
}

/// A literal a field is compared with, as the predicate writes it.
#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

/// `event.X <op> literal` (either side), or `became("X", literal)`: what the Avro types can check.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// `event` or `record`.
    pub root: &'static str,
    /// The field and, for a compound field, its member (`["BillingAddress", "City"]`).
    pub path: Vec<String>,
    /// The operator (`==`, `>`, ...) or the helper (`became`).
    pub op: String,
    pub literal: Literal,
    /// Where the field is written (1-based, inside the predicate).
    pub line: usize,
    pub column: usize,
}

/// Every comparison of a field with a literal in a predicate.
pub fn comparisons(ast: &AST) -> Vec<Comparison> {
    let mut found = Vec::new();
    ast.walk(&mut |path: &[ASTNode]| {
        let call = match path.last() {
            Some(ASTNode::Expr(Expr::FnCall(f, _))) => Some(&**f),
            Some(ASTNode::Stmt(Stmt::FnCall(f, _))) => Some(&**f),
            _ => None,
        };
        found.extend(call.and_then(comparison));
        true
    });
    found
}

const COMPARISONS: &[&str] = &["==", "!=", "<", ">", "<=", ">="];

fn comparison(f: &FnCallExpr) -> Option<Comparison> {
    let [a, b] = f.args.as_slice() else { return None };
    let op = match &f.op_token {
        Some(token) if COMPARISONS.contains(&token.literal_syntax()) => token.literal_syntax().to_string(),
        None if f.name == "became" && !f.is_qualified() => {
            let Expr::StringConstant(field, pos) = a else {
                return None;
            };
            let (line, column) = at(*pos);
            return Some(Comparison {
                root: "event",
                path: vec![field.to_string()],
                op: "became".into(),
                literal: literal(b)?,
                line,
                column,
            });
        }
        _ => return None,
    };
    let ((root, path, pos), literal) = match (field_path(a), field_path(b)) {
        (Some(field), None) => (field, literal(b)?),
        (None, Some(field)) => (field, literal(a)?),
        _ => return None,
    };
    let (line, column) = at(pos);
    Some(Comparison {
        root,
        path,
        op,
        literal,
        line,
        column,
    })
}

/// `event.X`, `event.X.Y`, `event?.X`, `event["X"]`, `record.X`: the root, the path and where it starts.
fn field_path(expr: &Expr) -> Option<(&'static str, Vec<String>, rhai::Position)> {
    let (Expr::Dot(x, _, _) | Expr::Index(x, _, _)) = expr else {
        return None;
    };
    let Expr::Variable(v, _, _) = &x.lhs else { return None };
    let root = match v.1.as_str() {
        "event" => "event",
        "record" => "record",
        _ => return None,
    };
    let mut path = Vec::new();
    let mut rest = &x.rhs;
    loop {
        match (expr, rest) {
            (Expr::Index(..), Expr::StringConstant(name, _)) if path.is_empty() => {
                path.push(name.to_string());
                break;
            }
            (Expr::Dot(..), Expr::Property(p, _)) => {
                path.push(p.2.to_string());
                break;
            }
            (Expr::Dot(..), Expr::Dot(inner, _, _)) => {
                let Expr::Property(p, _) = &inner.lhs else { return None };
                path.push(p.2.to_string());
                rest = &inner.rhs;
            }
            _ => return None,
        }
    }
    Some((root, path, x.lhs.start_position()))
}

fn literal(expr: &Expr) -> Option<Literal> {
    Some(match expr {
        Expr::StringConstant(s, _) => Literal::Str(s.to_string()),
        Expr::IntegerConstant(i, _) => Literal::Int(*i),
        Expr::FloatConstant(f, _) => Literal::Float(**f),
        Expr::BoolConstant(b, _) => Literal::Bool(*b),
        _ => return None,
    })
}

/// Whether the predicate is the constant `true` (after Rhai's constant folding).
pub fn always_true(ast: &AST) -> bool {
    matches!(ast.statements(), [Stmt::Expr(e)] if matches!(**e, Expr::BoolConstant(true, _)))
}

fn at(pos: rhai::Position) -> (usize, usize) {
    (pos.line().unwrap_or(1), pos.position().unwrap_or(1))
}

/// An unknown function, or a known one with another number of arguments.
fn call(f: &FnCallExpr, pos: rhai::Position, arity: usize) -> Option<Finding> {
    let name = f.name.as_str();
    if f.op_token.is_some()
        || KEYWORD_FUNCTIONS.contains(&name)
        || !name.starts_with(|c: char| c.is_alphabetic() || c == '_')
    {
        return None;
    }
    let (line, column) = at(pos);
    let message = match KNOWN.get(name) {
        Some(arities) if arities.contains(&arity) => return None,
        Some(arities) => {
            let helper = HELPERS.iter().find(|h| h.name == name);
            let takes = arities.iter().map(usize::to_string).collect::<Vec<_>>().join(" or ");
            let plural = if arities.len() == 1 && arities.contains(&1) {
                ""
            } else {
                "s"
            };
            match helper {
                Some(h) => format!(
                    "`{name}` takes {takes} argument{plural} (`{}`: {}), not {arity}",
                    h.signature, h.doc
                ),
                None => format!("`{name}` takes {takes} argument{plural}, not {arity}"),
            }
        }
        None => {
            let candidates = HELPERS.iter().map(|h| h.name).chain(KNOWN.keys().map(String::as_str));
            match suggest(name, candidates) {
                Some(close) => format!("unknown function `{name}`; did you mean `{close}`?"),
                None => format!(
                    "unknown function `{name}`; the helpers are {} (and Rhai's built-ins such as `contains`, `len`, `starts_with`)",
                    HELPERS
                        .iter()
                        .map(|h| format!("`{}`", h.signature))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        }
    };
    Some(Finding { line, column, message })
}

/// The result of a predicate must be able to be `true` or `false`: a literal, a bare field or an arithmetic result
/// never is (a checkbox field is compared: `event.Is_Priority__c == true`).
fn boolean(expr: &Expr, scope: &Scope<'_>) -> Option<Finding> {
    let what = match expr {
        Expr::And(parts, _) | Expr::Or(parts, _) | Expr::Coalesce(parts, _) => {
            return parts.iter().find_map(|p| boolean(p, scope));
        }
        Expr::StringConstant(..) | Expr::InterpolatedString(..) | Expr::CharConstant(..) => "a string".to_string(),
        Expr::IntegerConstant(..) | Expr::FloatConstant(..) => "a number".to_string(),
        Expr::Array(..) => "a list".to_string(),
        Expr::Map(..) => "a map".to_string(),
        Expr::Unit(..) => "`()` (nothing)".to_string(),
        Expr::DynamicConstant(value, _) if !value.is_bool() => format!("a constant {}", value.type_name()),
        Expr::Variable(v, _, _) => {
            let name = v.1.as_str();
            match scope.get(name) {
                // `vars` hold their values: a boolean var is a fine predicate.
                Some(value) if value.is_bool() || value.is_unit() => return None,
                Some(value) if name_is_context(name) => format!("`{name}` ({})", kind(value)),
                Some(value) => format!("the var `{name}` ({})", kind(value)),
                None => return None,
            }
        }
        // `event.Name.contains("x")` is a method's result, whatever it is.
        Expr::Dot(x, _, _) if ends_in_call(&x.rhs) => return None,
        Expr::Dot(..) | Expr::Index(..) => {
            "a field's value; compare it (`event.Status == \"Approved\"`, or `== true` for a checkbox)".to_string()
        }
        Expr::FnCall(f, pos) => return arithmetic(f, *pos),
        _ => return None,
    };
    let (line, column) = at(expr.start_position());
    Some(Finding {
        line,
        column,
        message: format!("the predicate is {what}, never true or false"),
    })
}

fn ends_in_call(expr: &Expr) -> bool {
    match expr {
        Expr::MethodCall(..) | Expr::FnCall(..) => true,
        Expr::Dot(x, _, _) => ends_in_call(&x.rhs),
        _ => false,
    }
}

/// A call of an arithmetic operator gives a number (or a string), never a boolean.
fn arithmetic(f: &FnCallExpr, pos: rhai::Position) -> Option<Finding> {
    let op = f.op_token.as_ref()?.literal_syntax();
    if !ARITHMETIC.contains(&op) {
        return None;
    }
    let start = f.args.first().map_or(pos, Expr::start_position);
    let (line, column) = at(start);
    Some(Finding {
        line,
        column,
        message: format!("the predicate is the result of `{op}`, not a comparison, never true or false"),
    })
}

const ARITHMETIC: &[&str] = &["+", "-", "*", "/", "%", "**", "<<", ">>", "&", "|", "^"];

fn name_is_context(name: &str) -> bool {
    super::CONTEXT_VARIABLES.contains(&name)
}

fn kind(value: &Dynamic) -> &'static str {
    if value.is_map() {
        "a map"
    } else if value.is_array() {
        "a list"
    } else if value.is_string() {
        "a string"
    } else if value.is_int() || value.is_float() {
        "a number"
    } else {
        value.type_name()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn findings(source: &str) -> Vec<String> {
        let (ast, scope) = compile(source);
        predicate(&ast, &scope)
            .into_iter()
            .map(|f| format!("{}:{}: {}", f.line, f.column, f.message))
            .collect()
    }

    fn compile(source: &str) -> (AST, Scope<'static>) {
        let engine = helpers::engine();
        let mut scope = Scope::new();
        for v in super::super::CONTEXT_VARIABLES {
            scope.push_dynamic(*v, Dynamic::from_map(rhai::Map::new()));
        }
        scope.set_value("record_id", Dynamic::from("x".to_string()));
        scope.push_dynamic("enabled", Dynamic::TRUE);
        scope.push_dynamic("statuses", Dynamic::from_array(vec!["A".into()]));
        let ast = engine.compile_expression_with_scope(&scope, source).expect("compiles");
        (ast, scope)
    }

    #[test]
    fn unknown_functions_are_named_with_the_helper_meant() {
        assert_eq!(
            findings("becomes(\"Activation_Status__c\", \"Activating\")"),
            ["1:1: unknown function `becomes`; did you mean `became`?"]
        );
        let far = findings("true && frobnicate_everything(1)");
        assert!(
            far[0].starts_with("1:9: unknown function `frobnicate_everything`; the helpers are `changed(field)`"),
            "{far:?}"
        );
    }

    #[test]
    fn arity_must_match() {
        let one = findings("became(\"X\")");
        assert!(
            one[0].starts_with("1:1: `became` takes 2 arguments (`became(field, value)`"),
            "{one:?}"
        );
        assert!(one[0].ends_with("not 1"), "{one:?}");
        assert!(findings("is_gap(1)")[0].starts_with("1:1: `is_gap` takes 0 arguments"));
        assert_eq!(findings("event.Status.contains(\"x\", 2)").len(), 1);
    }

    #[test]
    fn non_boolean_results_are_refused_and_boolean_ones_pass() {
        assert_eq!(
            findings("event.Status"),
            [
                "1:1: the predicate is a field's value; compare it (`event.Status == \"Approved\"`, or `== true` for a checkbox), never true or false"
            ]
        );
        assert!(findings("\"Approved\"")[0].contains("is a string"));
        assert!(findings("3")[0].contains("is a number"));
        assert!(findings("changed(\"A\") && event.Total")[0].starts_with("1:17: the predicate is a field's value"));
        assert!(findings("record_id")[0].contains("`record_id` (a string)"));
        assert!(findings("statuses")[0].contains("the var `statuses` (a list)"));
        assert!(findings("event.TotalAmount + 1")[0].contains("the result of `+`"));
        for fine in [
            "true",
            "enabled",
            "became(\"A\", \"B\") && (event.Status == () || event.Status in statuses)",
            "!is_gap() || changed_only([\"LastModifiedDate\"])",
            "event.Name.contains(\"x\") && type_of(event.Name) == \"string\"",
            "is_blank(record_id) ?? false",
        ] {
            assert_eq!(findings(fine), Vec::<String>::new(), "{fine}");
        }
    }

    #[test]
    fn comparisons_of_fields_with_literals_are_found() {
        let (ast, _) = compile(
            "event.TotalAmount > \"100\" && 3 == event[\"Status\"] && became(\"Flag__c\", true)\n && event.BillingAddress?.City != 1.5 && record.Name == event.Name && event.Name.len() > 2",
        );
        let found: Vec<String> = comparisons(&ast)
            .iter()
            .map(|c| {
                format!(
                    "{}:{} {}.{} {} {:?}",
                    c.line,
                    c.column,
                    c.root,
                    c.path.join("."),
                    c.op,
                    c.literal
                )
            })
            .collect();
        assert_eq!(
            found,
            [
                "1:1 event.TotalAmount > Str(\"100\")",
                "1:35 event.Status == Int(3)",
                "1:61 event.Flag__c became Bool(true)",
                "2:5 event.BillingAddress.City != Float(1.5)",
            ]
        );
    }
}
