//! `switchyard validate`: everything `load` checks, plus what needs more than the rule files: routes
//! that can never fire in the given config, a dry run of every predicate on the `*.test.yaml` fixture
//! events, header fields, and (with `--avro DIR`) event field names against the channel's Avro schema.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use super::avro::{self, AvroFields};
use super::testing::{LoadedTests, find_test_files};
use crate::config::Mode;
use crate::diag::{Problem, Severity};
use crate::event::HeaderMember;
use crate::router;
use crate::rules::check;
use crate::rules::load::{self, RuleEnv};
use crate::rules::template::Root;
use crate::rules::{ActionTemplate, Predicate, RuleSet, suggest};

/// Helpers whose first argument is a field name.
const FIELD_HELPERS: &[&str] = &["changed", "became", "nulled"];
/// Helpers whose argument is a list of field names.
const FIELD_LIST_HELPERS: &[&str] = &["changed_any", "changed_only"];

/// What validation found: the RuleSet when there was no error, and every problem.
pub struct Validation {
    pub ruleset: Option<RuleSet>,
    pub problems: Vec<Problem>,
}

/// Validates rule files and folders. `avro` is a folder of `.avsc` schemas named after the channels'
/// objects (`OrderChangeEvent.avsc` for `/data/OrderChangeEvent`).
pub fn validate(paths: &[PathBuf], env: &RuleEnv, avro: Option<&Path>) -> Validation {
    validate_with(paths, env, avro, &|_| None)
}

/// [`validate`] as the running service does it (start-up and every reload): a rule test file that cannot be read
/// here (its `events_file` is not deployed beside the rules, say) is a warning, and its dry run is skipped. The
/// rules are what runs; `switchyard validate` and `switchyard test` (CI) still refuse such a test.
pub fn validate_deployed(paths: &[PathBuf], env: &RuleEnv) -> Validation {
    validate_inner(paths, env, None, &|_| None, Fixtures::Lenient)
}

/// [`validate`], with the texts `overlay` has instead of the rule files' own (an editor's unsaved buffers).
pub fn validate_with(paths: &[PathBuf], env: &RuleEnv, avro: Option<&Path>, overlay: load::Overlay<'_>) -> Validation {
    validate_inner(paths, env, avro, overlay, Fixtures::Strict)
}

/// What a rule test file that does not load means.
#[derive(Clone, Copy, PartialEq)]
enum Fixtures {
    /// An error (`validate`, the editor).
    Strict,
    /// A warning, its dry run skipped (the running service).
    Lenient,
}

fn validate_inner(
    paths: &[PathBuf],
    env: &RuleEnv,
    avro: Option<&Path>,
    overlay: load::Overlay<'_>,
    fixtures: Fixtures,
) -> Validation {
    let avro = avro.or(env.avro_schemas.as_deref());
    let loaded = load::load_paths_with(paths, env, overlay);
    let mut problems = loaded.problems;
    let Some(ruleset) = loaded.ruleset else {
        // A set that loads but for the static checks of its predicates: its other problems (header fields, Avro
        // fields) show at once too.
        let unchecked = RuleEnv {
            static_checks: false,
            ..env.clone()
        };
        if let Some(lenient) = load::load_paths_with(paths, &unchecked, overlay).ruleset {
            header_fields(&lenient, &mut problems);
            record_fields(&lenient, &mut problems);
            if let Some(Ok(schemas)) = avro.map(AvroFields::load) {
                avro_fields(&lenient, &schemas, &mut problems);
            }
            problems.sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
        }
        return Validation {
            ruleset: None,
            problems,
        };
    };

    if let Some(mode) = env.mode {
        never_fire(&ruleset, env, mode, &mut problems);
    }
    header_fields(&ruleset, &mut problems);
    record_fields(&ruleset, &mut problems);
    unreachable(&ruleset, &mut problems);

    // The dry run covers every route, live in this mode or not: a mode switch must not reveal errors.
    let all_modes = RuleEnv {
        mode: None,
        ..env.clone()
    };
    if let Some(every_route) = load::load_paths_with(paths, &all_modes, overlay).ruleset {
        dry_run(&every_route, paths, fixtures, &mut problems);
    }

    if let Some(dir) = avro {
        match AvroFields::load(dir) {
            Ok(schemas) => avro_fields(&ruleset, &schemas, &mut problems),
            Err(errors) => problems.extend(errors),
        }
    }

    problems.sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
    problems.dedup();
    let ruleset = (!problems.iter().any(|p| p.severity == Severity::Error)).then_some(ruleset);
    Validation { ruleset, problems }
}

fn never_fire(rules: &RuleSet, env: &RuleEnv, mode: Mode, problems: &mut Vec<Problem>) {
    let configured: HashSet<&str> = env.channels.values().map(String::as_str).collect();
    for route in &rules.routes {
        if route.mode != mode {
            problems.push(Problem::warning(
                &route.file,
                route.line,
                route.column,
                format!(
                    "route `{}` is a {} route, but the config's mode is {}: it never fires until the mode is switched",
                    route.name,
                    route.mode.as_str(),
                    mode.as_str()
                ),
            ));
        } else if !configured.contains(route.channel.as_str()) {
            problems.push(Problem::warning(
                &route.file,
                route.line,
                route.column,
                format!(
                    "route `{}` listens on `{}`, which is not one of the config's channels: it never fires",
                    route.name, route.channel
                ),
            ));
        }
    }
}

/// Test files next to the rules: in each folder named, or beside each file named.
fn fixture_files(paths: &[PathBuf]) -> Vec<PathBuf> {
    find_test_files(&load::folders_of(paths))
}

fn dry_run(rules: &RuleSet, paths: &[PathBuf], fixtures: Fixtures, problems: &mut Vec<Problem>) {
    let mut seen = HashSet::new();
    for file in fixture_files(paths) {
        let tests = match LoadedTests::load(&file) {
            Ok(tests) => tests,
            Err(errors) if fixtures == Fixtures::Lenient => {
                problems.extend(errors.into_iter().map(|e| Problem {
                    severity: Severity::Warning,
                    message: format!(
                        "{} (the rules load; this test file's dry run is skipped here, `switchyard validate` refuses \
                         it)",
                        e.message
                    ),
                    ..e
                }));
                continue;
            }
            Err(errors) => {
                problems.extend(errors);
                continue;
            }
        };
        for (event, from) in tests.events.iter().flatten() {
            for e in router::dry_run(rules, event) {
                let route = &rules.routes[e.route];
                if !seen.insert((e.route, e.clause, e.message.clone())) {
                    continue;
                }
                problems.push(Problem::error(
                    &route.file,
                    e.line,
                    e.column,
                    format!(
                        "route `{}`: `{}` fails on the fixture event `{}` ({from}): {}",
                        route.name, e.clause, event.id, e.message
                    ),
                ));
            }
        }
    }
}

/// A token of a predicate, with its 1-based line and column inside the predicate text.
#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Str(String),
    Punct(&'static str),
}

fn tokenize(src: &str) -> Vec<(Token, usize, usize)> {
    struct Cursor {
        chars: Vec<char>,
        i: usize,
        line: usize,
        col: usize,
    }
    impl Cursor {
        fn peek(&self, ahead: usize) -> Option<char> {
            self.chars.get(self.i + ahead).copied()
        }
        fn bump(&mut self) -> Option<char> {
            let c = self.peek(0)?;
            self.i += 1;
            if c == '\n' {
                self.line += 1;
                self.col = 1;
            } else {
                self.col += 1;
            }
            Some(c)
        }
    }
    let mut cur = Cursor {
        chars: src.chars().collect(),
        i: 0,
        line: 1,
        col: 1,
    };
    let mut out = Vec::new();
    while let Some(c) = cur.peek(0) {
        let (l, cl) = (cur.line, cur.col);
        if c.is_alphabetic() || c == '_' {
            let mut s = String::new();
            while let Some(c) = cur.peek(0).filter(|c| c.is_alphanumeric() || *c == '_') {
                s.push(c);
                cur.bump();
            }
            out.push((Token::Ident(s), l, cl));
        } else if c == '"' || c == '`' {
            cur.bump();
            let mut s = String::new();
            while let Some(ch) = cur.peek(0).filter(|ch| *ch != c) {
                if ch == '\\' {
                    cur.bump();
                }
                if let Some(ch) = cur.bump() {
                    s.push(ch);
                }
            }
            cur.bump();
            out.push((Token::Str(s), l, cl));
        } else if c == '/' && cur.peek(1) == Some('/') {
            while cur.peek(0).is_some_and(|c| c != '\n') {
                cur.bump();
            }
        } else if c == '?' && cur.peek(1) == Some('.') {
            cur.bump();
            cur.bump();
            out.push((Token::Punct("."), l, cl));
        } else {
            let p = match c {
                '.' => Some("."),
                '(' => Some("("),
                ')' => Some(")"),
                '[' => Some("["),
                ']' => Some("]"),
                ',' => Some(","),
                _ => None,
            };
            if let Some(p) = p {
                out.push((Token::Punct(p), l, cl));
            }
            cur.bump();
        }
    }
    out
}

/// A field name a predicate reads, where, and through which variable (`vars` lists are expanded).
#[derive(Debug, Clone, PartialEq)]
struct FieldRef {
    root: &'static str,
    name: String,
    /// The `vars` list the name came from, if any.
    via: Option<String>,
    line: usize,
    column: usize,
}

/// Field names read as `event.X` / `event?.X.Y` / `event["X"]`, `header.X`, or passed to the helpers.
fn field_refs(src: &str, vars: &serde_json::Map<String, serde_json::Value>) -> Vec<FieldRef> {
    let tokens = tokenize(src);
    let mut refs = Vec::new();
    let at = |i: usize| tokens.get(i).map(|t| &t.0);
    for (i, (token, _, _)) in tokens.iter().enumerate() {
        let Token::Ident(ident) = token else { continue };
        if matches!(ident.as_str(), "event" | "header" | "record") && at(i.wrapping_sub(1)) != Some(&Token::Punct("."))
        {
            let root = match ident.as_str() {
                "event" => "event",
                "header" => "header",
                _ => "record",
            };
            match (at(i + 1), at(i + 2)) {
                (Some(Token::Punct(".")), Some(Token::Ident(name))) => {
                    let mut name = name.clone();
                    if let (Some(Token::Punct(".")), Some(Token::Ident(child))) = (at(i + 3), at(i + 4))
                        && root == "event"
                    {
                        name = format!("{name}.{child}");
                    }
                    let (l, c) = (tokens[i + 2].1, tokens[i + 2].2);
                    refs.push(FieldRef {
                        root,
                        name,
                        via: None,
                        line: l,
                        column: c,
                    });
                }
                (Some(Token::Punct("[")), Some(Token::Str(name))) => {
                    refs.push(FieldRef {
                        root,
                        name: name.clone(),
                        via: None,
                        line: tokens[i + 2].1,
                        column: tokens[i + 2].2,
                    });
                }
                _ => {}
            }
        } else if FIELD_HELPERS.contains(&ident.as_str()) {
            if let (Some(Token::Punct("(")), Some(Token::Str(name))) = (at(i + 1), at(i + 2)) {
                refs.push(FieldRef {
                    root: "event",
                    name: name.clone(),
                    via: None,
                    line: tokens[i + 2].1,
                    column: tokens[i + 2].2,
                });
            }
        } else if FIELD_LIST_HELPERS.contains(&ident.as_str()) && at(i + 1) == Some(&Token::Punct("(")) {
            match at(i + 2) {
                Some(Token::Punct("[")) => {
                    let mut j = i + 3;
                    while let Some((t, l, c)) = tokens.get(j) {
                        match t {
                            Token::Str(name) => refs.push(FieldRef {
                                root: "event",
                                name: name.clone(),
                                via: None,
                                line: *l,
                                column: *c,
                            }),
                            Token::Punct("]") => break,
                            _ => {}
                        }
                        j += 1;
                    }
                }
                Some(Token::Ident(var)) => {
                    let (l, c) = (tokens[i + 2].1, tokens[i + 2].2);
                    for name in vars.get(var).and_then(|v| v.as_array()).into_iter().flatten() {
                        if let Some(name) = name.as_str() {
                            refs.push(FieldRef {
                                root: "event",
                                name: name.to_string(),
                                via: Some(var.clone()),
                                line: l,
                                column: c,
                            });
                        }
                    }
                }
                _ => {}
            }
        }
    }
    refs
}

fn predicates(route: &crate::rules::Route) -> impl Iterator<Item = (&'static str, &Predicate)> {
    std::iter::once(("when", &route.when)).chain(route.guard.iter().map(|g| ("guard", g)))
}

/// `record.X` (in `guard` or a template) for a field the route's `enrich` does not read is always `()`: the record
/// holds exactly the fields asked for.
fn record_fields(rules: &RuleSet, problems: &mut Vec<Problem>) {
    for route in &rules.routes {
        let Some(enrich) = &route.enrich else { continue };
        let fetched = || enrich.fields.iter().map(String::as_str);
        let missing = |name: &str| !enrich.fields.iter().any(|f| f == name);
        let message = |name: &str, clause: &str| {
            let hint = suggest(name, fetched())
                .map(|s| format!(" (did you mean `{s}`?)"))
                .unwrap_or_default();
            format!(
                "route `{}`: `{clause}` reads `record.{name}`, which its `enrich` does not fetch{hint}; add it to `enrich.fields` ({})",
                route.name,
                enrich.fields.join(", ")
            )
        };
        if let Some(guard) = &route.guard {
            for r in field_refs(&guard.source, &rules.vars)
                .into_iter()
                .filter(|r| r.root == "record")
            {
                let name = r.name.split('.').next().unwrap_or_default();
                if missing(name) {
                    let (line, column) = guard.place(r.line, r.column);
                    problems.push(Problem::error(&route.file, line, column, message(name, "guard")));
                }
            }
        }
        for (action, path) in template_paths(route) {
            if path.root == Root::Record
                && let Some(name) = path.segments.first().filter(|n| missing(n))
            {
                problems.push(action_problem(action, message(name, "template")));
            }
        }
    }
}

/// A route after one on the same channel that always fires and stops (`stop: true`, a `when` of `true`, no
/// `guard`) never runs.
fn unreachable(rules: &RuleSet, problems: &mut Vec<Problem>) {
    let mut stopper: HashMap<(&str, crate::config::Mode), &crate::rules::Route> = HashMap::new();
    for route in &rules.routes {
        let key = (route.channel.as_str(), route.mode);
        if let Some(first) = stopper.get(&key) {
            problems.push(Problem::warning(
                &route.file,
                route.line,
                route.column,
                format!(
                    "route `{}` never runs: route `{}` ({}:{}) before it on `{}` always fires and has `stop: true`",
                    route.name,
                    first.name,
                    first.file.display(),
                    first.line,
                    route.channel
                ),
            ));
        } else if route.stop && route.guard.is_none() && crate::rules::check::always_true(&route.when.ast) {
            stopper.insert(key, route);
        }
    }
}

fn header_fields(rules: &RuleSet, problems: &mut Vec<Problem>) {
    for route in &rules.routes {
        for (clause, p) in predicates(route) {
            for r in field_refs(&p.source, &rules.vars)
                .into_iter()
                .filter(|r| r.root == "header")
            {
                if HeaderMember::of(&r.name).is_none() {
                    let (line, column) = p.place(r.line, r.column);
                    problems.push(Problem::error(
                        &route.file,
                        line,
                        column,
                        unknown("header field", &r.name, route, clause, HeaderMember::names()),
                    ));
                }
            }
        }
        for (action, path) in template_paths(route) {
            if path.root == Root::Header
                && let Some(name) = path.segments.first().filter(|n| HeaderMember::of(n).is_none())
            {
                problems.push(action_problem(
                    action,
                    unknown("header field", name, route, "template", HeaderMember::names()),
                ));
            }
        }
    }
}

fn unknown<'a>(
    what: &str,
    name: &str,
    route: &crate::rules::Route,
    clause: &str,
    known: impl IntoIterator<Item = &'a str>,
) -> String {
    let hint = suggest(name, known)
        .map(|s| format!(" (did you mean `{s}`?)"))
        .unwrap_or_default();
    format!("route `{}`: `{clause}` reads unknown {what} `{name}`{hint}", route.name)
}

fn template_paths(route: &crate::rules::Route) -> Vec<(&ActionTemplate, &crate::rules::template::Path)> {
    let mut out = Vec::new();
    for action in route.then.iter().chain(&route.otherwise).chain(&route.on_failure) {
        let templates = action.params.templates();
        for t in templates {
            out.extend(t.paths().map(|p| (action, p)));
        }
    }
    if let Some(record_id) = &route.record_id {
        // `record_id` belongs to no action; it is checked with the route's first action's place.
        if let Some(first) = route.then.first().or(route.otherwise.first()) {
            out.extend(record_id.paths().map(|p| (first, p)));
        }
    }
    out
}

fn action_problem(action: &ActionTemplate, message: String) -> Problem {
    let mut parts = action.at.rsplitn(3, ':');
    let column = parts.next().and_then(|c| c.parse().ok()).unwrap_or(0);
    let line = parts.next().and_then(|l| l.parse().ok()).unwrap_or(0);
    let file = parts.next().unwrap_or_default();
    Problem::error(Path::new(file), line, column, message)
}

fn enrich_object(route: &crate::rules::Route) -> String {
    route
        .enrich
        .as_ref()
        .map(|e| format!("{}ChangeEvent", e.object))
        .unwrap_or_default()
}

/// Field names against the channel's schema, and comparisons of a field with a literal of another type (`record`
/// fields too, when the enriched object's Change Data Capture schema is in the folder).
fn avro_fields(rules: &RuleSet, schemas: &AvroFields, problems: &mut Vec<Problem>) {
    let mut missing_schema = HashSet::new();
    for route in &rules.routes {
        // The fields a write-back sets, against its object's schema (when the folder has it).
        for action in route.then.iter().chain(&route.otherwise).chain(&route.on_failure) {
            let crate::rules::ActionParams::SalesforceUpdate { object, fields, .. } = &action.params else {
                continue;
            };
            let Some(schema) = schemas.for_object(object) else {
                continue;
            };
            for (name, _) in fields {
                if let Err(message) = avro::lookup(schema, &[name.as_str()]) {
                    problems.push(action_problem(
                        action,
                        format!("route `{}`: `salesforce-update` of {object}: {message}", route.name),
                    ));
                }
            }
        }
        // A route that names its entity is checked against that entity's schema (a multi-entity or custom
        // channel has none of its own).
        let (fields, what) = match &route.entity {
            Some(entity) => (
                schemas.for_object(entity),
                format!("entity `{entity}` ({entity}ChangeEvent.avsc)"),
            ),
            None => (
                schemas.for_channel(&route.channel),
                format!("channel `{}`", route.channel),
            ),
        };
        let Some(fields) = fields else {
            if missing_schema.insert(what.clone()) {
                problems.push(Problem::warning(
                    &route.file,
                    route.line,
                    route.column,
                    format!("no Avro schema for {what} in the --avro folder: its field names are not checked"),
                ));
            }
            continue;
        };
        let record = route.enrich.as_ref().and_then(|e| schemas.for_object(&e.object));
        for (clause, p) in predicates(route) {
            let mut report = |line: usize, column: usize, message: String| {
                let (line, column) = p.place(line, column);
                problems.push(Problem::error(
                    &route.file,
                    line,
                    column,
                    format!("route `{}`: `{clause}`: {message}", route.name),
                ));
            };
            for r in field_refs(&p.source, &rules.vars)
                .into_iter()
                .filter(|r| r.root == "event")
            {
                let path: Vec<&str> = r.name.splitn(2, '.').collect();
                if let Err(message) = avro::lookup(fields, &path) {
                    let via = r
                        .via
                        .as_ref()
                        .map(|v| format!(" (listed in var `{v}`)"))
                        .unwrap_or_default();
                    report(r.line, r.column, format!("{message}{via}"));
                }
            }
            for c in check::comparisons(&p.ast) {
                let (schema, label, named) = match c.root {
                    "event" => (Some(fields), "event", "the channel's Avro schema".to_string()),
                    _ => (record, "record", format!("the `{}` schema", enrich_object(route))),
                };
                let path: Vec<&str> = c.path.iter().take(2).map(String::as_str).collect();
                // An unknown field is reported above (or, for `record`, by the enrich check).
                let Some(field) = schema.and_then(|s| avro::lookup(s, &path).ok()) else {
                    continue;
                };
                // A date read from a record over REST is a string, an event's a number: on the record only
                // fields with one type on both paths are compared.
                if c.root == "record" && field.kind == avro::Kind::Number && !field.type_name.starts_with("double") {
                    continue;
                }
                if let Some(message) = avro::mismatch(field, &c.literal, &named) {
                    let how = if c.op == "became" { "`became`: " } else { "" };
                    report(c.line, c.column, format!("{how}`{label}.{}` {message}", path.join(".")));
                }
            }
        }
        for (action, path) in template_paths(route) {
            if path.root != Root::Event || path.segments.is_empty() {
                continue;
            }
            let segments: Vec<&str> = path.segments.iter().take(2).map(String::as_str).collect();
            if let Err(message) = avro::lookup(fields, &segments) {
                problems.push(action_problem(
                    action,
                    format!("route `{}`: template: {message}", route.name),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_test_file_whose_events_are_not_deployed_blocks_validate_but_not_the_service() {
        // The rules folder as a container mounts it: the rules and their test, not the repository's examples/.
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            concat!(env!("CARGO_MANIFEST_DIR"), "/rules/orders.yaml"),
            dir.path().join("orders.yaml"),
        )
        .unwrap();
        std::fs::copy(
            concat!(env!("CARGO_MANIFEST_DIR"), "/rules/orders.test.yaml"),
            dir.path().join("orders.test.yaml"),
        )
        .unwrap();
        let paths = [dir.path().to_path_buf()];
        let env = RuleEnv::defaults();

        let strict = validate(&paths, &env, None);
        assert!(strict.ruleset.is_none());
        let error = strict.problems.iter().find(|p| p.severity == Severity::Error).unwrap();
        assert!(error.message.contains("cannot read events_file"), "{error:?}");
        assert!(error.file.ends_with("orders.test.yaml") && error.line > 1, "{error:?}");

        let deployed = validate_deployed(&paths, &env);
        assert!(deployed.ruleset.is_some(), "{:?}", deployed.problems);
        let warning = deployed
            .problems
            .iter()
            .find(|p| p.message.contains("cannot read events_file"))
            .unwrap();
        assert_eq!((warning.severity, warning.line), (Severity::Warning, error.line));
        assert!(warning.message.contains("dry run is skipped"), "{warning:?}");
    }

    #[test]
    fn field_refs_are_found_with_their_positions() {
        let vars = serde_json::json!({"fs": ["Status", "BillingAddress"]})
            .as_object()
            .unwrap()
            .clone();
        let src = "became(\"Activation_Status__c\", \"x\")\n  && event.BillingAddress?.City == \"a\" && changed_any(fs) && header.change_type == \"UPDATE\" && changed_only([\"A\", \"B\"])";
        let refs = field_refs(src, &vars);
        let names: Vec<(&str, &str, usize, usize)> = refs
            .iter()
            .map(|r| (r.root, r.name.as_str(), r.line, r.column))
            .collect();
        assert_eq!(
            names,
            vec![
                ("event", "Activation_Status__c", 1, 8),
                ("event", "BillingAddress.City", 2, 12),
                ("event", "Status", 2, 55),
                ("event", "BillingAddress", 2, 55),
                ("header", "change_type", 2, 69),
                ("event", "A", 2, 110),
                ("event", "B", 2, 115),
            ]
        );
    }
}
