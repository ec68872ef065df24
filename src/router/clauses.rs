//! The value of each top-level clause of a predicate, for `explain`: which part of a `when` was false.

use rhai::Dynamic;
use serde_json::{Map, Value};

use super::scope::{dyn_opt, eval, event_scope};
use crate::event::Event;
use crate::rules::helpers::{self, HelperCtx};
use crate::rules::{Predicate, RuleSet};

/// The value of one top-level clause of a predicate, for `explain`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClauseValue {
    pub clause: String,
    /// The clause's value (JSON), or why it could not be evaluated.
    pub value: Result<serde_json::Value, String>,
}

/// Evaluates a predicate and each of its top-level clauses (split on `&&` / `||` outside brackets and
/// strings) for one record, with the record when given. Pure, like the rest of the router.
pub fn evaluate_clauses(
    rules: &RuleSet,
    event: &Event,
    predicate: &Predicate,
    record_id: Option<&str>,
    record: Option<&Map<String, Value>>,
) -> (Result<bool, String>, Vec<ClauseValue>) {
    let ctx = HelperCtx::new(event);
    let mut scope = event_scope(rules, event);
    scope.set_value("record_id", dyn_opt(record_id));
    ctx.set_has_record(record.is_some());
    let empty = Map::new();
    scope.set_value(
        "record",
        rhai::serde::to_dynamic(record.unwrap_or(&empty)).unwrap_or(Dynamic::UNIT),
    );
    helpers::with_ctx(&ctx, || {
        let whole = eval(rules, &mut scope, predicate);
        let clauses = split_clauses(&predicate.source);
        let values = if clauses.len() < 2 {
            Vec::new()
        } else {
            clauses
                .into_iter()
                .map(|clause| {
                    let value = rules
                        .engine
                        .compile_expression_with_scope(&scope, &clause)
                        .map_err(|e| e.to_string())
                        .and_then(|ast| {
                            rules
                                .engine
                                .eval_ast_with_scope::<Dynamic>(&mut scope, &ast)
                                .map_err(|e| e.to_string())
                        })
                        .map(|d| rhai::serde::from_dynamic::<Value>(&d).unwrap_or(Value::Null));
                    ClauseValue { clause, value }
                })
                .collect()
        };
        (whole, values)
    })
}

/// Splits a predicate on `&&` and `||` at the top level (outside parentheses, brackets and strings).
pub fn split_clauses(source: &str) -> Vec<String> {
    let mut clauses = Vec::new();
    let (mut depth, mut quote) = (0i32, None::<char>);
    let bytes: Vec<char> = source.chars().collect();
    let mut i = 0;
    let mut current = String::new();
    while i < bytes.len() {
        let c = bytes[i];
        match (quote, c) {
            (Some(q), _) if c == q => quote = None,
            (Some(_), '\\') => {
                current.push(c);
                i += 1;
                if let Some(n) = bytes.get(i) {
                    current.push(*n);
                }
                i += 1;
                continue;
            }
            (Some(_), _) => {}
            (None, '"' | '`' | '\'') => quote = Some(c),
            (None, '(' | '[' | '{') => depth += 1,
            (None, ')' | ']' | '}') => depth -= 1,
            (None, '&' | '|') if depth == 0 && bytes.get(i + 1) == Some(&c) => {
                clauses.push(current.trim().to_string());
                current.clear();
                i += 2;
                continue;
            }
            _ => {}
        }
        current.push(c);
        i += 1;
    }
    clauses.push(current.trim().to_string());
    clauses.into_iter().filter(|c| !c.is_empty()).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn clauses_split_at_the_top_level_only() {
        assert_eq!(
            super::split_clauses("became(\"A\", \"x && y\")\n  && (event.S == () || event.S in v) || is_gap()"),
            vec![
                "became(\"A\", \"x && y\")",
                "(event.S == () || event.S in v)",
                "is_gap()"
            ]
        );
        assert_eq!(super::split_clauses("changed(\"A\")"), vec!["changed(\"A\")"]);
    }
}
