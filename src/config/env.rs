//! `${VAR}` and `${VAR:-default}` in config files, and `Secret`, the string that holds what such a variable
//! usually brings (a password, a token) and never prints it.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::diag::{Problem, Problems};

/// A string that holds a secret (a URL with a password): Debug and Display print a placeholder, so it
/// cannot reach a log line, an error or a dead letter by accident. `expose()` is the one way to read it.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// Replaces `${VAR}` and `${VAR:-default}`; `$$` is a literal `$`. Full-line comments are left alone.
/// An unset variable without a default is an error: a production config never falls back silently.
pub fn substitute_env(path: &Path, text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, Problems> {
    let mut out = String::with_capacity(text.len());
    let mut problems = Vec::new();
    for (n, line) in text.split_inclusive('\n').enumerate() {
        if line.trim_start().starts_with('#') {
            out.push_str(line);
            continue;
        }
        let mut rest = line;
        while let Some(i) = rest.find('$') {
            out.push_str(&rest[..i]);
            let after = &rest[i + 1..];
            if let Some(tail) = after.strip_prefix('$') {
                out.push('$');
                rest = tail;
            } else if let Some(body) = after.strip_prefix('{') {
                let Some(end) = body.find('}') else {
                    problems.push(Problem::error(
                        path,
                        n as u64 + 1,
                        (line.len() - rest.len() + i) as u64 + 1,
                        "`${` without a closing `}`",
                    ));
                    out.push_str(&rest[i..]);
                    rest = "";
                    break;
                };
                let expr = &body[..end];
                let (name, default) = match expr.split_once(":-") {
                    Some((name, default)) => (name, Some(default)),
                    None => (expr, None),
                };
                let column = (line.len() - rest.len() + i) as u64 + 1;
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    problems.push(Problem::error(
                        path,
                        n as u64 + 1,
                        column,
                        format!("`${{{expr}}}` is not a variable reference"),
                    ));
                } else {
                    match (env(name), default) {
                        (Some(value), _) if !(value.is_empty() && default.is_some()) => out.push_str(&value),
                        (_, Some(default)) => out.push_str(default),
                        (_, None) => problems.push(Problem::error(
                            path,
                            n as u64 + 1,
                            column,
                            format!("environment variable `{name}` is not set and has no default (write `${{{name}:-default}}` for one)"),
                        )),
                    }
                }
                rest = &body[end + 1..];
            } else {
                out.push('$');
                rest = after;
            }
        }
        out.push_str(rest);
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(Problems(problems))
    }
}
