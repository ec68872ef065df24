//! The crate's layering, as ARCHITECTURE.md draws it, checked from the imports in `src/`: every part (a top-level
//! module) imports only parts of lower layers, so there is no cycle of parts and none of files across parts; the
//! rule language and the router never reach I/O; sinks see only the root of `state`; nothing but `main.rs` imports
//! `app`; and no function on the delivery path is longer than 80 lines.
//!
//! `python3 ../shared/tools/module-graph --parts` is a cross-check; this test is what keeps the layering.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, lowest first. A part imports only parts of lower layers.
const LAYERS: &[&[&str]] = &[
    // Leaves: shared vocabulary, no imports of other parts.
    &["clock", "diag", "event", "failure", "hex", "obs", "plan"],
    &["config"],
    // The rule language (pure) and Salesforce's OAuth.
    &["rules", "auth"],
    // The pure router; the stores and Redis connections.
    &["router", "state"],
    // I/O at the edges: sinks, sources, the REST enricher.
    &["sinks", "sources", "enrich"],
    // The delivery core; the admin's tools; the emulator (an org on loopback).
    &["delivery", "authoring", "emulator"],
    // The running service and the CLI's bodies: imported by `main.rs` only.
    &["app"],
];

/// Lower parts that a part still must not import: what flows through it comes as data (DESIGN.md: a source never
/// knows about rules, a sink never evaluates a rule, stores hold bytes and markers, not decisions).
const FORBIDDEN: &[(&str, &[&str])] = &[
    ("state", &["rules", "router"]),
    ("sinks", &["rules", "router"]),
    ("sources", &["rules", "router"]),
    // The admin's tools run the router offline: no stores, no sinks, no source.
    ("authoring", &["state", "sinks", "sources", "enrich"]),
];

/// Parts that may import `state` only through its root (`crate::state::Stores`), never its store modules.
const STATE_ROOT_ONLY: &[&str] = &["sinks"];

/// Folders whose functions stay short: the delivery and hot paths.
const SHORT_FUNCTIONS: &[&str] = &["delivery", "router", "state", "sinks"];
const MAX_FUNCTION_LINES: usize = 80;

#[test]
fn every_import_goes_down_a_layer() {
    let problems = check(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    assert!(problems.is_empty(), "the layering is broken:\n{}", problems.join("\n"));
}

#[test]
fn a_forbidden_import_or_a_long_function_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    let write = |path: &str, text: &str| {
        let path = src.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    write(
        "lib.rs",
        "pub mod rules;\npub mod router;\npub mod sinks;\npub mod state;\npub mod app;\n",
    );
    write("rules/mod.rs", "");
    write("router/mod.rs", "use crate::sinks::Sinks;\n");
    write(
        "sinks/mod.rs",
        "use crate::{plan::Action, state::checkpoint::CheckpointStore};\n",
    );
    write("state/mod.rs", "pub mod checkpoint;\nuse super::app::Service;\n");
    write("state/checkpoint.rs", "");
    let long = format!("pub fn long() {{\n{}}}\n", "    step();\n".repeat(MAX_FUNCTION_LINES));
    write(
        "app/mod.rs",
        &format!("{long}#[cfg(test)]\nmod tests {{ use crate::app::x; }}\n"),
    );
    write("sinks/queue.rs", &format!("{long}fn f() {{ crate::rules::x(); }}\n"));
    let problems = check(src);
    let expect = [
        "router/mod.rs imports sinks",
        "sinks/mod.rs imports state::checkpoint",
        "state/mod.rs imports app",
        "sinks/queue.rs:1: fn long is 82 lines",
        "sinks/queue.rs imports rules (sinks must never import it)",
    ];
    for e in expect {
        assert!(
            problems.iter().any(|p| p.contains(e)),
            "`{e}` not found in {problems:#?}"
        );
    }
    assert_eq!(problems.len(), expect.len(), "{problems:#?}");
}

/// Every violation of the layering in the crate at `src`.
fn check(src: &Path) -> Vec<String> {
    let layer: BTreeMap<&str, usize> = LAYERS
        .iter()
        .enumerate()
        .flat_map(|(n, parts)| parts.iter().map(move |p| (*p, n)))
        .collect();
    let files = rust_files(src);
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| module_of(src, f)).collect();
    let mut problems = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(src).unwrap().display().to_string();
        let me = module_of(src, file);
        if me.is_empty() || me == ["main"] {
            continue; // lib.rs declares the parts; main.rs is the binary, above everything
        }
        let text = code_of(&std::fs::read_to_string(file).unwrap());
        let part = me[0].as_str();
        let Some(&mine) = layer.get(part) else {
            problems.push(format!("{rel}: part `{part}` is in no layer of tests/architecture.rs"));
            continue;
        };
        for target in imports(&text, &me) {
            let Some(to) = target.first().filter(|t| modules.contains(&vec![t.to_string()])) else {
                continue;
            };
            if to == part {
                continue;
            }
            match layer.get(to.as_str()) {
                Some(&theirs) if theirs < mine => {}
                _ => problems.push(format!(
                    "{rel} imports {to} (layer {part} may import only lower layers)"
                )),
            }
            if FORBIDDEN
                .iter()
                .any(|(p, never)| *p == part && never.contains(&to.as_str()))
            {
                problems.push(format!("{rel} imports {to} ({part} must never import it)"));
            }
            if to == "state" && STATE_ROOT_ONLY.contains(&part) && target.len() > 1 {
                let inner = &target[1];
                if modules.contains(&vec!["state".to_string(), inner.clone()]) {
                    problems.push(format!("{rel} imports state::{inner} (only the root of state)"));
                }
            }
        }
        if SHORT_FUNCTIONS.contains(&part) {
            for (line, name, length) in long_functions(&text) {
                problems.push(format!(
                    "{rel}:{line}: fn {name} is {length} lines (at most {MAX_FUNCTION_LINES} on the delivery path)"
                ));
            }
        }
    }
    problems
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// `src/state/lease.rs` -> [state, lease]; `src/router/mod.rs` -> [router]; `src/lib.rs` -> [].
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel.iter().map(|s| s.to_string_lossy().into_owned()).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts
}

/// The code without comments and without the test module at its end (tests may import anything).
fn code_of(text: &str) -> String {
    let code: String = text
        .lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let test_module = code.match_indices("#[cfg(test)]").map(|(i, _)| i).find(|&i| {
        let after = code[i + "#[cfg(test)]".len()..].trim_start();
        after.starts_with("mod ") || after.starts_with("pub mod ") || after.starts_with("pub(crate) mod ")
    });
    match test_module {
        Some(i) => code[..i].to_string(),
        None => code,
    }
}

/// Every crate path the code names (`use crate::a::{b, c}`, `crate::a::b` inline, `use super::x`), as segments
/// from the crate root.
fn imports(code: &str, me: &[String]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    for (start, root) in [("crate::", 0usize), ("super::", 1)] {
        let mut from = 0;
        while let Some(i) = code[from..].find(start).map(|i| i + from) {
            from = i + start.len();
            if i > 0 && (bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_' || bytes[i - 1] == b':') {
                continue;
            }
            let mut base: Vec<String> = if root == 0 {
                Vec::new()
            } else {
                // `super::` from a/b/c.rs (module a::b::c) is a::b; chains of `super::super::` go further up.
                let mut up = 1;
                while code[from..].starts_with("super::") {
                    up += 1;
                    from += "super::".len();
                }
                me[..me.len().saturating_sub(up)].to_vec()
            };
            let tree: String = take_path(&code[from..]);
            for path in expand(&tree) {
                let mut full = base.clone();
                full.extend(path.into_iter().filter(|s| s != "self"));
                out.push(full);
            }
            base.clear();
        }
    }
    out
}

/// The path text after `crate::`: segments and, for a `use`, its `{...}` group.
fn take_path(rest: &str) -> String {
    let mut depth = 0;
    let mut end = 0;
    for (i, c) in rest.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth > 0 => depth -= 1,
            c if depth == 0 && !(c.is_alphanumeric() || c == '_' || c == ':') => break,
            _ => {}
        }
        end = i + c.len_utf8();
    }
    rest[..end].to_string()
}

/// `a::{b, c::{d, e}}` -> [a, b], [a, c, d], [a, c, e]; `a::B` -> [a, B].
fn expand(tree: &str) -> Vec<Vec<String>> {
    let tree: String = tree.chars().filter(|c| !c.is_whitespace()).collect();
    let Some(open) = tree.find('{') else {
        return vec![tree.split("::").filter(|s| !s.is_empty()).map(str::to_string).collect()];
    };
    let prefix: Vec<String> = tree[..open]
        .split("::")
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    let body = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
    let (mut depth, mut start, mut out) = (0, 0, Vec::new());
    let mut items = Vec::new();
    for (i, c) in body.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&body[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&body[start..]);
    for item in items.into_iter().filter(|i| !i.is_empty()) {
        for tail in expand(item) {
            out.push(prefix.iter().cloned().chain(tail).collect());
        }
    }
    out
}

/// Functions longer than the limit: (line, name, lines from `fn` to its closing brace).
fn long_functions(code: &str) -> Vec<(usize, String, usize)> {
    let lines: Vec<&str> = code.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(name) = fn_name(line) else { continue };
        let (mut depth, mut opened) = (0i64, false);
        for (j, l) in lines.iter().enumerate().skip(i) {
            let l = strip_literals(l);
            if !opened && l.trim_end().ends_with(';') && !l.contains('{') {
                break; // a declaration without a body
            }
            depth += l.matches('{').count() as i64 - l.matches('}').count() as i64;
            opened |= l.contains('{');
            if opened && depth <= 0 {
                let length = j - i + 1;
                if length > MAX_FUNCTION_LINES {
                    out.push((i + 1, name.to_string(), length));
                }
                break;
            }
        }
    }
    out
}

fn fn_name(line: &str) -> Option<&str> {
    let rest = line.trim_start();
    let rest = rest
        .strip_prefix("pub(crate) ")
        .or_else(|| rest.strip_prefix("pub(super) "))
        .unwrap_or(rest);
    let rest = rest.strip_prefix("pub ").unwrap_or(rest);
    let rest = rest.strip_prefix("async ").unwrap_or(rest);
    let rest = rest.strip_prefix("const ").unwrap_or(rest);
    let rest = rest.strip_prefix("fn ")?;
    let end = rest.find(|c: char| !(c.is_alphanumeric() || c == '_'))?;
    Some(&rest[..end])
}

/// A line with its string and char literals emptied, so braces inside them do not count.
fn strip_literals(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                while let Some(d) = chars.next() {
                    match d {
                        '\\' => {
                            chars.next();
                        }
                        '"' => break,
                        _ => {}
                    }
                }
                out.push_str("\"\"");
            }
            '\'' if chars.clone().nth(1) == Some('\'') => {
                chars.next();
                chars.next();
            }
            '\'' if chars.peek() == Some(&'\\') => {
                for d in chars.by_ref() {
                    if d == '\'' {
                        break;
                    }
                }
            }
            _ => out.push(c),
        }
    }
    out
}
