//! Loading rule files: read, parse, check, compile. Every problem is reported at once, each with its
//! `file:line:col`; a load with any error yields no RuleSet.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use rhai::{Dynamic, Engine, Scope};
use serde_json::{Map, Value};
use serde_saphyr::Spanned;
use sha2::{Digest, Sha256};

use super::model::{ActionSpec, RouteSpec, RulesFile};
use super::template::{Root, Template, ValueTemplate};
use super::{ActionParams, ActionTemplate, CONTEXT_VARIABLES, Placer, Predicate, Route, RuleSet, helpers, suggest};
use crate::config::{
    BUILT_IN_SINKS, DEAD_LETTER_SINK, EnricherKind, LoadedConfig, Mode, SALESFORCE_UPDATE_SINK, SinkKind,
    default_channels, default_sinks,
};
use crate::diag::{Problem, Severity};

/// One rules file's path and text.
#[derive(Debug, Clone)]
pub struct RuleSource {
    pub path: PathBuf,
    pub text: String,
}

/// What rules are checked against: channel aliases, sink names and kinds, mode, enricher.
#[derive(Debug, Clone)]
pub struct RuleEnv {
    pub channels: IndexMap<String, String>,
    pub sinks: IndexMap<String, SinkKind>,
    /// `None`: every route is live (checking rules without a config).
    pub mode: Option<Mode>,
    pub enricher: EnricherKind,
    /// Whether predicates get the static checks (`rules::check`); off only for `validate`'s second look at a set
    /// those checks refused, so that its other problems show at once.
    pub static_checks: bool,
    /// The config's `avro_schemas` folder: `validate` (and so start-up and every reload) checks the routes' field
    /// names and literal types against it.
    pub avro_schemas: Option<PathBuf>,
}

impl RuleEnv {
    /// The defaults used when no config is given: the three default channel aliases and sink names.
    pub fn defaults() -> Self {
        RuleEnv {
            channels: default_channels(),
            sinks: default_sinks().iter().map(|(k, v)| (k.clone(), v.kind())).collect(),
            mode: None,
            enricher: EnricherKind::Recorded,
            static_checks: true,
            avro_schemas: None,
        }
    }

    pub fn from_config(loaded: &LoadedConfig) -> Self {
        let c = &loaded.config;
        RuleEnv {
            channels: c.channels.clone(),
            sinks: c.sinks.iter().map(|(k, v)| (k.clone(), v.kind())).collect(),
            mode: Some(c.mode),
            enricher: c.enricher(),
            static_checks: true,
            avro_schemas: c.avro_schemas.as_ref().map(|p| loaded.resolve(p)),
        }
    }

    fn sink_kind(&self, name: &str) -> Option<SinkKind> {
        if name == DEAD_LETTER_SINK {
            Some(SinkKind::DeadLetter)
        } else if name == SALESFORCE_UPDATE_SINK {
            Some(SinkKind::SalesforceUpdate)
        } else {
            self.sinks.get(name).copied()
        }
    }
}

/// The result of a load: the RuleSet when there was no error, and every problem (warnings too).
pub struct Loaded {
    pub ruleset: Option<RuleSet>,
    pub problems: Vec<Problem>,
}

/// Texts that replace files on disk: the unsaved buffers of an editor (`switchyard lsp`); none elsewhere.
pub type Overlay<'a> = &'a dyn Fn(&Path) -> Option<String>;

/// Reads rule files and folders. A folder contributes its `*.yaml`/`*.yml` files, sorted, except
/// `*.test.yaml` (rule tests).
pub fn read_sources(paths: &[PathBuf]) -> Result<Vec<RuleSource>, Vec<Problem>> {
    read_sources_with(paths, &|_| None)
}

/// [`read_sources`], with the texts `overlay` has instead of the files' own.
pub fn read_sources_with(paths: &[PathBuf], overlay: Overlay<'_>) -> Result<Vec<RuleSource>, Vec<Problem>> {
    let mut sources = Vec::new();
    let mut problems = Vec::new();
    for path in paths {
        let files = if path.is_dir() {
            match std::fs::read_dir(path) {
                Ok(entries) => {
                    let mut files: Vec<PathBuf> = entries
                        .filter_map(|e| e.ok().map(|e| e.path()))
                        .filter(|p| p.is_file() && is_rules_file(p))
                        .collect();
                    files.sort();
                    files
                }
                Err(e) => {
                    problems.push(Problem::error(path, 0, 0, format!("cannot read the rules folder: {e}")));
                    continue;
                }
            }
        } else {
            vec![path.clone()]
        };
        for file in files {
            match overlay(&file).map_or_else(|| std::fs::read_to_string(&file), Ok) {
                Ok(text) => sources.push(RuleSource { path: file, text }),
                Err(e) => problems.push(Problem::error(&file, 0, 0, format!("cannot read the rules file: {e}"))),
            }
        }
    }
    if problems.is_empty() {
        Ok(sources)
    } else {
        Err(problems)
    }
}

/// The folders rule paths live in: each folder named, and the folder of each file named; sorted, no duplicates.
pub fn folders_of(paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = paths
        .iter()
        .map(|p| {
            if p.is_dir() {
                p.clone()
            } else {
                p.parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| ".".into())
            }
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    dirs
}

/// `*.yaml` / `*.yml`, not `*.test.yaml` / `*.test.yml`.
pub fn is_rules_file(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    (name.ends_with(".yaml") || name.ends_with(".yml")) && !name.ends_with(".test.yaml") && !name.ends_with(".test.yml")
}

/// Reads and compiles rules from paths.
pub fn load_paths(paths: &[PathBuf], env: &RuleEnv) -> Loaded {
    load_paths_with(paths, env, &|_| None)
}

/// [`load_paths`], with the texts `overlay` has instead of the files' own.
pub fn load_paths_with(paths: &[PathBuf], env: &RuleEnv, overlay: Overlay<'_>) -> Loaded {
    match read_sources_with(paths, overlay) {
        Ok(sources) => compile(&sources, env),
        Err(problems) => Loaded {
            ruleset: None,
            problems,
        },
    }
}

/// The content hash of a set of rule files.
pub fn version_of(sources: &[RuleSource]) -> String {
    let mut hasher = Sha256::new();
    for s in sources {
        // The file name, not the path as spelled: `rules/` and `examples/../rules/` are the same rules.
        hasher.update(
            s.path
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
                .as_bytes(),
        );
        hasher.update([0]);
        hasher.update(s.text.as_bytes());
        hasher.update([0]);
    }
    hasher.finalize().iter().take(6).map(|b| format!("{b:02x}")).collect()
}

struct FileCx<'a> {
    path: &'a Path,
    text: &'a str,
}

impl FileCx<'_> {
    fn at<T>(&self, s: &Spanned<T>) -> (u64, u64) {
        (s.referenced.line(), s.referenced.column())
    }

    fn err<T>(&self, s: &Spanned<T>, message: impl Into<String>) -> Problem {
        let (line, column) = self.at(s);
        Problem::error(self.path, line, column, message)
    }

    /// Whether the scalar at `s` is quoted in the source (its content then starts one column later).
    fn quoted<T>(&self, s: &Spanned<T>) -> bool {
        let offset = s.referenced.span().offset();
        matches!(
            self.text.get(offset as usize..offset as usize + 1),
            Some("\"") | Some("'")
        )
    }

    /// The file position of (1-based) `line`/`column` inside a multi-line scalar value.
    ///
    /// Exact for plain single-line values, `|` and `|-` blocks and simple quoted strings; for folded (`>`)
    /// blocks and strings with escapes it is the best estimate (lines may be joined or shifted).
    fn inner(&self, s: &Spanned<String>, line: usize, column: usize) -> (u64, u64) {
        self.placer(s).place(line, column)
    }

    fn placer(&self, s: &Spanned<String>) -> Placer {
        let (l, c) = self.at(s);
        Placer::new(l, c, self.quoted(s), self.folded_pieces(l, c))
    }

    /// For a `>` folded block starting at line `l`, column `c`: each source line of its content.
    fn folded_pieces(&self, l: u64, c: u64) -> Option<Vec<(u64, u64, usize)>> {
        let lines: Vec<&str> = self.text.lines().collect();
        let header = lines.get((l as usize).checked_sub(2)?)?.trim_end();
        let indicator = header.rsplit(':').next()?.trim();
        if !(indicator.starts_with('>') && indicator.len() <= 3) {
            return None;
        }
        let mut pieces = Vec::new();
        for (n, text) in lines.iter().enumerate().skip(l as usize - 1) {
            let indent = text.chars().take_while(|ch| *ch == ' ').count();
            if text.trim().is_empty() || (indent as u64) < c - 1 {
                break;
            }
            pieces.push((n as u64 + 1, indent as u64 + 1, text.trim().chars().count()));
        }
        Some(pieces)
    }

    /// The file position of a byte offset inside a single-line template string.
    fn template_at(&self, s: &Spanned<String>, offset: usize) -> (u64, u64) {
        let before = &s.value[..offset.min(s.value.len())];
        let line = before.matches('\n').count();
        let column = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0);
        self.inner(s, line + 1, column + 1)
    }
}

/// Compiles rule sources into a RuleSet, or reports every problem.
pub fn compile(sources: &[RuleSource], env: &RuleEnv) -> Loaded {
    let mut problems = Vec::new();
    let mut files = Vec::new();
    for source in sources {
        match serde_saphyr::from_str::<RulesFile>(&source.text) {
            Ok(file) => files.push((source, file)),
            Err(e) => problems.push(Problem::from_yaml(&source.path, &e)),
        }
    }

    // vars first: every route of every file may use every var.
    let mut vars = Map::new();
    let mut var_at: HashMap<String, String> = HashMap::new();
    for (source, file) in &files {
        let cx = FileCx {
            path: &source.path,
            text: &source.text,
        };
        if file.version.value != 1 {
            problems.push(cx.err(
                &file.version,
                format!(
                    "rules version {} is not supported; use `version: 1`",
                    file.version.value
                ),
            ));
        }
        for (name, value) in &file.vars {
            let (line, column) = cx.at(value);
            if CONTEXT_VARIABLES.contains(&name.as_str()) || name == "idempotency_key" || name == "route" {
                problems.push(Problem::error(
                    &source.path,
                    line,
                    column,
                    format!("var `{name}` would hide the built-in variable of that name; rename it"),
                ));
            } else if !is_identifier(name) {
                problems.push(Problem::error(
                    &source.path,
                    line,
                    column,
                    format!("var `{name}` is not a valid name (letters, digits and `_`, not starting with a digit)"),
                ));
            } else if let Some(first) = var_at.get(name) {
                problems.push(Problem::error(
                    &source.path,
                    line,
                    column,
                    format!("var `{name}` is already defined at {first}"),
                ));
            } else {
                var_at.insert(name.clone(), format!("{}:{line}:{column}", source.path.display()));
                vars.insert(name.clone(), value.value.clone());
            }
        }
    }

    let engine = helpers::shared_engine();
    let is_var = |name: &str| vars.contains_key(name);
    let when_scope = scope(&vars, false);
    let guard_scope = scope(&vars, true);
    let mut routes = Vec::new();
    let mut route_at: HashMap<String, String> = HashMap::new();
    for (source, file) in &files {
        let cx = FileCx {
            path: &source.path,
            text: &source.text,
        };
        for spec in &file.routes {
            let (line, column) = cx.at(&spec.name);
            let name = spec.name.value.trim().to_string();
            if name.is_empty() {
                problems.push(cx.err(&spec.name, "a route needs a non-empty `name`"));
            } else if let Some(first) = route_at.get(&name) {
                problems.push(cx.err(&spec.name, format!("route `{name}` is already defined at {first}")));
            } else {
                route_at.insert(name.clone(), format!("{}:{line}:{column}", source.path.display()));
            }
            if let Some(route) = compile_route(
                &cx,
                spec,
                &name,
                env,
                &engine,
                &when_scope,
                &guard_scope,
                &is_var,
                &mut problems,
            ) {
                routes.push(route);
            }
        }
    }

    problems.sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
    let ruleset = (!problems.iter().any(|p| p.severity == Severity::Error)).then(|| {
        let paths = sources.iter().map(|s| s.path.clone()).collect();
        RuleSet::new(version_of(sources), routes, vars.clone(), env.mode, paths, engine)
    });
    Loaded { ruleset, problems }
}

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The scope predicates are compiled against; `with_record` adds `record` (for `guard`).
pub(crate) fn scope(vars: &Map<String, Value>, with_record: bool) -> Scope<'static> {
    let mut scope = Scope::new();
    for name in CONTEXT_VARIABLES {
        if *name != "record" || with_record {
            scope.push(*name, Dynamic::UNIT);
        }
    }
    for (name, value) in vars {
        scope.push_constant(name.clone(), helpers::to_dynamic(value));
    }
    scope
}

#[allow(clippy::too_many_arguments)]
fn compile_route(
    cx: &FileCx<'_>,
    spec: &RouteSpec,
    name: &str,
    env: &RuleEnv,
    engine: &Engine,
    when_scope: &Scope<'static>,
    guard_scope: &Scope<'static>,
    is_var: &dyn Fn(&str) -> bool,
    problems: &mut Vec<Problem>,
) -> Option<Route> {
    let before = problems.len();
    let route_label = format!("route `{name}`");

    let alias = spec.channel.value.trim();
    let channel = match env.channels.get(alias) {
        Some(channel) => Some(channel.clone()),
        None if Mode::of_channel(alias).is_some() => Some(alias.to_string()),
        None => {
            let mut message = format!(
                "{route_label}: unknown channel `{alias}`; use an alias from the config ({}) or a /data/... or /event/... channel",
                env.channels.keys().cloned().collect::<Vec<_>>().join(", ")
            );
            if let Some(best) = suggest(alias, env.channels.keys().map(String::as_str)) {
                message = format!("{route_label}: unknown channel `{alias}` (did you mean `{best}`?)");
            }
            problems.push(cx.err(&spec.channel, message));
            None
        }
    };
    let mode = channel.as_deref().and_then(Mode::of_channel);

    let when = compile_predicate(
        cx,
        &spec.when,
        engine,
        when_scope,
        (&route_label, "when", env.static_checks),
        problems,
    );
    let guard = spec.guard.as_ref().and_then(|g| {
        compile_predicate(
            cx,
            g,
            engine,
            guard_scope,
            (&route_label, "guard", env.static_checks),
            problems,
        )
    });

    if let Some(enrich) = &spec.enrich {
        if env.enricher == EnricherKind::None {
            problems.push(cx.err(
                &spec.name,
                format!("{route_label} declares `enrich`, but the config's enricher is `none`"),
            ));
        }
        if enrich.object.trim().is_empty() || enrich.fields.is_empty() {
            problems.push(cx.err(
                &spec.name,
                format!("{route_label}: `enrich` needs an `object` and at least one field"),
            ));
        }
    }

    let record_id = spec.record_id.as_ref().and_then(|r| {
        if mode == Some(Mode::Cdc) {
            problems.push(cx.err(r, format!("{route_label}: `record_id` is for platform-event routes; CDC routes take the record ids from the change event header")));
            return None;
        }
        let t = parse_template(cx, r, is_var, &route_label, problems)?;
        if let Some(p) = t.paths().find(|p| matches!(p.root, Root::Record | Root::RecordId | Root::IdempotencyKey)) {
            problems.push(cx.err(r, format!("{route_label}: `record_id` cannot use `{}`; it is rendered from the event before `when`", p.root.name())));
        }
        Some(t)
    });

    let entity = spec.entity.as_ref().and_then(|e| {
        let value = e.value.trim();
        let valid = value.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && value.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            problems.push(cx.err(e, format!("{route_label}: `entity` must be an object's API name (`Order`, `Invoice__c`), not `{value}`")));
            return None;
        }
        match (mode, channel.as_deref().and_then(single_entity)) {
            (Some(Mode::PlatformEvent), _) => {
                problems.push(cx.err(e, format!("{route_label}: `entity` is for change events; a platform-event channel carries one event type")));
                None
            }
            (_, Some(only)) if only != value => {
                problems.push(cx.err(e, format!(
                    "{route_label}: the channel `{}` carries only `{only}` changes, so `entity: {value}` never matches; use `/data/ChangeEvents` or a custom channel for several entities",
                    channel.as_deref().unwrap_or_default()
                )));
                None
            }
            _ => Some(value.to_string()),
        }
    });

    let has_enrich = spec.enrich.is_some();
    let then: Vec<_> = spec
        .then
        .iter()
        .filter_map(|a| compile_action(cx, a, env, is_var, &route_label, (has_enrich, false), problems))
        .collect();
    let otherwise: Vec<_> = spec
        .otherwise
        .iter()
        .filter_map(|a| compile_action(cx, a, env, is_var, &route_label, (has_enrich, false), problems))
        .collect();
    let on_failure: Vec<_> = spec
        .on_failure
        .iter()
        .filter_map(|a| compile_action(cx, a, env, is_var, &route_label, (has_enrich, true), problems))
        .collect();
    if spec.then.is_empty() && spec.otherwise.is_empty() {
        let (line, column) = cx.at(&spec.name);
        let on_failure = match spec.on_failure.is_empty() {
            true => "",
            false => " (its `on_failure` actions never run either)",
        };
        problems.push(Problem::warning(
            cx.path,
            line,
            column,
            format!("{route_label} has no `then` or `else` actions; it never does anything{on_failure}"),
        ));
    }
    if !spec.otherwise.is_empty() && spec.guard.is_none() {
        let (line, column) = cx.at(&spec.name);
        problems.push(Problem::warning(
            cx.path,
            line,
            column,
            format!("{route_label} has `else` actions but no `guard`; they never run"),
        ));
    }

    if problems[before..].iter().any(|p| p.severity == Severity::Error) {
        return None;
    }
    Some(Route {
        name: name.to_string(),
        file: cx.path.to_path_buf(),
        line: spec.name.referenced.line(),
        column: spec.name.referenced.column(),
        channel: channel?,
        entity,
        mode: mode?,
        when: when?,
        guard,
        enrich: spec.enrich.clone(),
        record_id,
        then,
        otherwise,
        on_failure,
        stop: spec.stop,
        shadow: spec.shadow,
        limit: spec.limit,
    })
}

/// The one entity a standard per-object CDC channel carries (`/data/OrderChangeEvent` -> `Order`,
/// `/data/Invoice__ChangeEvent` -> `Invoice__c`); `None` for `/data/ChangeEvents`, custom `__chn` channels and
/// platform events.
pub fn single_entity(channel: &str) -> Option<String> {
    let name = channel.strip_prefix("/data/")?;
    if name == "ChangeEvents" || name.ends_with("__chn") {
        return None;
    }
    let object = name.strip_suffix("ChangeEvent")?;
    Some(match object.strip_suffix("__") {
        Some(custom) => format!("{custom}__c"),
        None => object.to_string(),
    })
}

fn compile_predicate(
    cx: &FileCx<'_>,
    source: &Spanned<String>,
    engine: &Engine,
    scope: &Scope<'static>,
    (route_label, clause, static_checks): (&str, &str, bool),
    problems: &mut Vec<Problem>,
) -> Option<Predicate> {
    if source.value.trim().is_empty() {
        problems.push(cx.err(
            source,
            format!("{route_label}: `{clause}` is empty; write a predicate such as `true`"),
        ));
        return None;
    }
    match engine.compile_expression_with_scope(scope, &source.value) {
        Ok(ast)
            if static_checks
                && let findings = super::check::predicate(&ast, scope)
                && !findings.is_empty() =>
        {
            // Refused at load like a compile error: a run would fail on every matching event.
            for f in findings {
                let (line, column) = cx.inner(source, f.line, f.column);
                problems.push(Problem::error(
                    cx.path,
                    line,
                    column,
                    format!("{route_label}: `{clause}`: {}", f.message),
                ));
            }
            None
        }
        Ok(ast) => Some(Predicate {
            source: source.value.clone(),
            native: super::native::Native::compile(&ast, scope),
            ast,
            line: source.referenced.line(),
            column: source.referenced.column(),
            placer: cx.placer(source),
        }),
        Err(err) => {
            // An error at the end of input (an unclosed parenthesis) points just past the last character.
            let lines: Vec<&str> = source.value.trim_end().lines().collect();
            let (line, column) = match (err.1.line(), err.1.position()) {
                (Some(l), _) if l > lines.len() => {
                    cx.inner(source, lines.len(), lines.last().map_or(0, |s| s.chars().count()) + 1)
                }
                (Some(l), Some(c)) => cx.inner(source, l, c),
                (Some(l), None) => cx.inner(source, l, 1),
                _ => cx.at(source),
            };
            let message = match &*err.0 {
                rhai::ParseErrorType::VariableUndefined(var) if var == "record" && clause == "when" => format!(
                    "{route_label}: `record` is not available in `when` (it is read only after `when` passed); test it in `guard`"
                ),
                rhai::ParseErrorType::VariableUndefined(var) => {
                    let known = CONTEXT_VARIABLES
                        .iter()
                        .copied()
                        .chain(scope.iter_raw().map(|(n, _, _)| n));
                    let hint = suggest(var, known.collect::<Vec<_>>())
                        .map(|s| format!(" (did you mean `{s}`?)"))
                        .unwrap_or_default();
                    format!(
                        "{route_label}: `{clause}`: undefined variable `{var}`{hint}; predicates see {} and the names in `vars`",
                        CONTEXT_VARIABLES.join(", ")
                    )
                }
                other if other.to_string() == "Unexpected '='" => format!(
                    "{route_label}: `{clause}` does not compile: `=` assigns; compare with `==` (e.g. `event.Status == \"Approved\"`)"
                ),
                other => format!("{route_label}: `{clause}` does not compile: {other}"),
            };
            problems.push(Problem::error(cx.path, line, column, message));
            None
        }
    }
}

/// A Salesforce API name: a letter, then letters, digits and underscores (`Order`, `Activation_Status__c`).
fn is_api_name(s: &str) -> bool {
    s.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn parse_template(
    cx: &FileCx<'_>,
    source: &Spanned<String>,
    is_var: &dyn Fn(&str) -> bool,
    route_label: &str,
    problems: &mut Vec<Problem>,
) -> Option<Template> {
    match Template::parse(&source.value, is_var) {
        Ok(t) => Some(t),
        Err(e) => {
            let (line, column) = cx.template_at(source, e.offset);
            problems.push(Problem::error(
                cx.path,
                line,
                column,
                format!("{route_label}: {}", e.message),
            ));
            None
        }
    }
}

fn parse_value_template(
    cx: &FileCx<'_>,
    source: &Spanned<Value>,
    is_var: &dyn Fn(&str) -> bool,
    route_label: &str,
    problems: &mut Vec<Problem>,
) -> Option<ValueTemplate> {
    match ValueTemplate::parse(&source.value, is_var) {
        Ok(t) => Some(t),
        Err(e) => {
            let (mut line, mut column) = cx.at(source);
            if let Value::String(s) = &source.value {
                let spanned = Spanned {
                    value: s.clone(),
                    referenced: source.referenced,
                    defined: source.defined,
                };
                (line, column) = cx.template_at(&spanned, e.offset);
            }
            problems.push(Problem::error(
                cx.path,
                line,
                column,
                format!("{route_label}: {}", e.message),
            ));
            None
        }
    }
}

fn compile_action(
    cx: &FileCx<'_>,
    spec: &Spanned<ActionSpec>,
    env: &RuleEnv,
    is_var: &dyn Fn(&str) -> bool,
    route_label: &str,
    (has_enrich, in_on_failure): (bool, bool),
    problems: &mut Vec<Problem>,
) -> Option<ActionTemplate> {
    let a = &spec.value;
    let sink = a.sink.value.trim();
    let Some(kind) = env.sink_kind(sink) else {
        let names: Vec<&str> = env.sinks.keys().map(String::as_str).chain(BUILT_IN_SINKS).collect();
        let hint = suggest(sink, names.iter().copied())
            .map(|s| format!(" (did you mean `{s}`?)"))
            .unwrap_or_default();
        problems.push(cx.err(
            &a.sink,
            format!(
                "{route_label}: unknown sink `{sink}`{hint}; the sinks are {}",
                names.join(", ")
            ),
        ));
        return None;
    };
    let present: Vec<&str> = [
        ("job", a.job.is_some()),
        ("idempotency_key", a.idempotency_key.is_some()),
        ("job_options", a.job_options.is_some()),
        ("keys", a.keys.is_some()),
        ("patterns", a.patterns.is_some()),
        ("publish", a.publish.is_some()),
        ("message", a.message.is_some()),
        ("level", a.level.is_some()),
        ("fields", a.fields.is_some()),
        ("reason", a.reason.is_some()),
        ("body", a.body.is_some()),
        ("headers", a.headers.is_some()),
        ("object", a.object.is_some()),
        ("id", a.id.is_some()),
    ]
    .into_iter()
    .filter_map(|(k, p)| p.then_some(k))
    .collect();
    let allowed: &[&str] = match kind {
        SinkKind::Queue => &["job", "idempotency_key", "job_options"],
        SinkKind::CacheInvalidate => &["keys", "patterns", "publish"],
        SinkKind::Log => &["message", "level", "fields"],
        SinkKind::Webhook => &["body", "headers", "idempotency_key"],
        SinkKind::DeadLetter => &["reason"],
        SinkKind::SalesforceUpdate => &["object", "id", "fields", "idempotency_key"],
    };
    let label = format!("{route_label}: sink `{sink}` ({})", kind.as_str());
    let before = problems.len();
    for key in present.iter().filter(|k| !allowed.contains(k)) {
        problems.push(cx.err(
            &a.sink,
            format!("{label} does not take `{key}`; it takes {}", allowed.join(", ")),
        ));
    }

    let t = |s: &Spanned<String>, problems: &mut Vec<Problem>| parse_template(cx, s, is_var, route_label, problems);
    // An idempotency key: a template that must not name itself.
    let own_key = |key: &Spanned<String>, problems: &mut Vec<Problem>| {
        let template = t(key, problems)?;
        if template.paths().any(|p| p.root == Root::IdempotencyKey) {
            problems.push(cx.err(key, format!("{label}: `idempotency_key` cannot refer to itself")));
        }
        Some(template)
    };
    let params = match kind {
        SinkKind::Queue => {
            let (Some(job), Some(key)) = (&a.job, &a.idempotency_key) else {
                problems.push(cx.err(
                    &a.sink,
                    format!(
                        "{label} needs `job` and `idempotency_key` (the key makes a redelivered event enqueue one job)"
                    ),
                ));
                return None;
            };
            let mut entries = Vec::new();
            for (k, v) in job {
                entries.push((k.clone(), parse_value_template(cx, v, is_var, route_label, problems)?));
            }
            let key_template = own_key(key, problems)?;
            ActionParams::Queue {
                job: ValueTemplate::Object(entries),
                idempotency_key: key_template,
                job_options: a.job_options.clone().unwrap_or_default(),
            }
        }
        SinkKind::CacheInvalidate => {
            if a.keys.is_none() && a.patterns.is_none() {
                problems.push(cx.err(&a.sink, format!("{label} needs `keys` or `patterns`")));
                return None;
            }
            let keys = a
                .keys
                .iter()
                .flatten()
                .map(|k| t(k, problems))
                .collect::<Option<Vec<_>>>()?;
            let patterns = a
                .patterns
                .iter()
                .flatten()
                .map(|k| t(k, problems))
                .collect::<Option<Vec<_>>>()?;
            let publish = match &a.publish {
                Some(p) => Some((t(&p.channel, problems)?, t(&p.message, problems)?)),
                None => None,
            };
            ActionParams::CacheInvalidate {
                keys,
                patterns,
                publish,
            }
        }
        SinkKind::Log => {
            let Some(message) = &a.message else {
                problems.push(cx.err(&a.sink, format!("{label} needs `message`")));
                return None;
            };
            let mut fields = Vec::new();
            for (k, v) in a.fields.iter().flatten() {
                fields.push((k.clone(), parse_value_template(cx, v, is_var, route_label, problems)?));
            }
            ActionParams::Log {
                message: t(message, problems)?,
                level: a.level.unwrap_or_default(),
                fields,
            }
        }
        SinkKind::Webhook => {
            let Some(body) = &a.body else {
                problems.push(cx.err(&a.sink, format!("{label} needs `body`")));
                return None;
            };
            let mut entries = Vec::new();
            for (k, v) in body {
                entries.push((k.clone(), parse_value_template(cx, v, is_var, route_label, problems)?));
            }
            let mut headers = Vec::new();
            for (k, v) in a.headers.iter().flatten() {
                headers.push((k.clone(), t(v, problems)?));
            }
            let idempotency_key = match &a.idempotency_key {
                Some(key) => Some(own_key(key, problems)?),
                None => None,
            };
            ActionParams::Webhook {
                body: ValueTemplate::Object(entries),
                headers,
                idempotency_key,
            }
        }
        SinkKind::SalesforceUpdate => {
            let (Some(object), Some(fields)) = (&a.object, &a.fields) else {
                problems.push(cx.err(&a.sink, format!("{label} needs `object` and `fields`")));
                return None;
            };
            if !is_api_name(object.value.trim()) {
                problems.push(cx.err(
                    object,
                    format!("{label}: `object` must be an object's API name (`Order`, `Invoice__c`)"),
                ));
            }
            if fields.is_empty() {
                problems.push(cx.err(
                    &a.sink,
                    format!("{label}: `fields` is empty; there is nothing to update"),
                ));
            }
            let mut entries = Vec::new();
            for (k, v) in fields {
                if !is_api_name(k) {
                    problems.push(cx.err(v, format!("{label}: `{k}` is not a field's API name")));
                }
                entries.push((k.clone(), parse_value_template(cx, v, is_var, route_label, problems)?));
            }
            let id = match &a.id {
                Some(id) => t(id, problems)?,
                None => Template::parse("{{record_id}}", is_var).expect("a valid template"),
            };
            let idempotency_key = match &a.idempotency_key {
                Some(key) => Some(own_key(key, problems)?),
                None => None,
            };
            ActionParams::SalesforceUpdate {
                object: object.value.trim().to_string(),
                id,
                fields: entries,
                idempotency_key,
            }
        }
        SinkKind::DeadLetter => {
            let Some(reason) = &a.reason else {
                problems.push(cx.err(&a.sink, format!("{label} needs `reason`")));
                return None;
            };
            ActionParams::DeadLetter {
                reason: t(reason, problems)?,
            }
        }
    };
    if !has_enrich
        && params
            .templates()
            .iter()
            .any(|t| t.paths().any(|p| p.root == Root::Record && !p.segments.is_empty()))
    {
        let (line, column) = cx.at(&a.sink);
        problems.push(Problem::warning(
            cx.path,
            line,
            column,
            format!("{label} reads `record`, but the route has no `enrich`: those values are always missing"),
        ));
    }
    if !in_on_failure
        && params
            .templates()
            .iter()
            .any(|t| t.paths().any(|p| p.root == Root::Failure))
    {
        problems.push(cx.err(
            &a.sink,
            format!("{label}: `failure` is only known in `on_failure` actions (what failed, and why)"),
        ));
    }
    if problems[before..].iter().any(|p| p.severity == Severity::Error) {
        return None;
    }
    let (line, column) = cx.at(spec);
    Some(ActionTemplate {
        sink: sink.to_string(),
        kind,
        at: format!("{}:{line}:{column}", cx.path.display()),
        params,
    })
}
