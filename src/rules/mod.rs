//! Rules: the model as written, the compiled RuleSet, templates, helpers.

pub mod check;
pub mod helpers;
pub mod load;
pub mod model;
pub mod native;
pub mod reads;
pub mod template;

use std::collections::HashMap;
use std::path::PathBuf;

use rhai::{AST, Engine, Scope};
use serde_json::{Map, Value};

use crate::config::{Mode, SinkKind};
use crate::plan::{JobOptions, LogLevel};

pub use model::EnrichSpec;
use template::{Template, ValueTemplate};

/// The variables every predicate sees (besides the rules' `vars`).
pub const CONTEXT_VARIABLES: &[&str] = &["event", "header", "record_id", "record", "event_id", "replay_id"];

/// A compiled predicate and its source, for messages and `explain`.
#[derive(Debug, Clone)]
pub struct Predicate {
    pub source: String,
    pub ast: AST,
    /// Its native form, when it has one (see [`native`]): the router evaluates that first.
    pub native: Option<native::Native>,
    /// Where the predicate's text starts in its file (1-based).
    pub line: u64,
    pub column: u64,
    pub placer: Placer,
}

impl Predicate {
    /// The file position of a (1-based) line and column inside the predicate text.
    pub fn place(&self, line: usize, column: usize) -> (u64, u64) {
        self.placer.place(line, column)
    }
}

/// Maps a position inside a YAML scalar's value to its position in the file.
///
/// Exact for plain values, `|`/`|-` blocks, single-quoted strings and double-quoted strings without
/// escapes, and for `>` folded blocks whose lines are joined by single spaces (no blank or more-indented
/// lines); otherwise the best estimate (escapes shift columns).
#[derive(Debug, Clone)]
pub struct Placer {
    line: u64,
    column: u64,
    quoted: bool,
    /// Folded blocks: the source line, column and length of each piece of the joined value.
    folded: Option<Vec<(u64, u64, usize)>>,
}

impl Placer {
    pub fn new(line: u64, column: u64, quoted: bool, folded: Option<Vec<(u64, u64, usize)>>) -> Self {
        Placer {
            line,
            column,
            quoted,
            folded,
        }
    }

    pub fn place(&self, line: usize, column: usize) -> (u64, u64) {
        if let (Some(pieces), 1) = (&self.folded, line) {
            let mut rest = column;
            for &(l, c, len) in pieces {
                if rest <= len + 1 {
                    return (l, c + rest as u64 - 1);
                }
                rest -= len + 1;
            }
        }
        let quote = u64::from(self.quoted && line == 1);
        (self.line + line as u64 - 1, self.column + column as u64 - 1 + quote)
    }
}

/// A compiled action: which sink, and that sink kind's templates.
#[derive(Debug, Clone)]
pub struct ActionTemplate {
    pub sink: String,
    pub kind: SinkKind,
    /// `file:line:col` of the action, for messages.
    pub at: String,
    pub params: ActionParams,
}

#[derive(Debug, Clone)]
pub enum ActionParams {
    Queue {
        job: ValueTemplate,
        idempotency_key: Template,
        job_options: JobOptions,
    },
    CacheInvalidate {
        keys: Vec<Template>,
        patterns: Vec<Template>,
        publish: Option<(Template, Template)>,
    },
    Log {
        message: Template,
        level: LogLevel,
        fields: Vec<(String, ValueTemplate)>,
    },
    Webhook {
        body: ValueTemplate,
        headers: Vec<(String, Template)>,
        idempotency_key: Option<Template>,
    },
    DeadLetter {
        reason: Template,
    },
    SalesforceUpdate {
        object: String,
        id: Template,
        fields: Vec<(String, ValueTemplate)>,
        idempotency_key: Option<Template>,
    },
}

impl ActionParams {
    /// Every template the action renders.
    pub fn templates(&self) -> Vec<&Template> {
        match self {
            ActionParams::Queue {
                job, idempotency_key, ..
            } => {
                let mut all = job.templates();
                all.push(idempotency_key);
                all
            }
            ActionParams::CacheInvalidate {
                keys,
                patterns,
                publish,
            } => {
                let mut all: Vec<&Template> = keys.iter().chain(patterns).collect();
                if let Some((c, m)) = publish {
                    all.extend([c, m]);
                }
                all
            }
            ActionParams::Log { message, fields, .. } => {
                let mut all = vec![message];
                all.extend(fields.iter().flat_map(|(_, v)| v.templates()));
                all
            }
            ActionParams::Webhook {
                body,
                headers,
                idempotency_key,
            } => {
                let mut all = body.templates();
                all.extend(headers.iter().map(|(_, t)| t));
                all.extend(idempotency_key);
                all
            }
            ActionParams::DeadLetter { reason } => vec![reason],
            ActionParams::SalesforceUpdate {
                id,
                fields,
                idempotency_key,
                ..
            } => {
                let mut all = vec![id];
                all.extend(fields.iter().flat_map(|(_, v)| v.templates()));
                all.extend(idempotency_key);
                all
            }
        }
    }
}

/// A compiled route.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub file: PathBuf,
    /// Where the route's `name` is.
    pub line: u64,
    pub column: u64,
    /// The channel name (aliases resolved).
    pub channel: String,
    /// The entity this route takes on a channel that carries several (`None`: every event of the channel).
    pub entity: Option<String>,
    pub mode: Mode,
    pub when: Predicate,
    pub guard: Option<Predicate>,
    pub enrich: Option<EnrichSpec>,
    pub record_id: Option<Template>,
    pub then: Vec<ActionTemplate>,
    pub otherwise: Vec<ActionTemplate>,
    /// Run once when one of the route's actions was dead-lettered by its sink (see `RouteSpec::on_failure`).
    pub on_failure: Vec<ActionTemplate>,
    pub stop: bool,
    pub shadow: bool,
    /// The route's own runaway guard (the config's `route_limit` applies when it has none).
    pub limit: Option<crate::plan::Limit>,
}

/// Every route of every rules file, compiled once per load; evaluated by the router.
pub struct RuleSet {
    /// Content hash of the rule files (12 hex digits): stamped on logs, metrics and dead letters.
    pub version: String,
    pub routes: Vec<Route>,
    pub vars: Map<String, Value>,
    /// The mode whose routes are live; `None` (validation without a config) makes every route live.
    pub mode: Option<Mode>,
    pub files: Vec<PathBuf>,
    pub(crate) engine: std::sync::Arc<Engine>,
    live: HashMap<String, Vec<usize>>,
    /// What the predicates read from events: the router converts only that.
    pub(crate) reads: reads::Reads,
    /// The members of `header` that action templates read: the router renders only those to JSON.
    pub(crate) template_header: reads::Fields,
    /// The payload fields predicates or templates read (see [`RuleSet::keep_read_fields`]).
    read_fields: reads::Fields,
    /// The context variables (unset) and the `vars` (converted once), cloned for every event.
    pub(crate) base_scope: Scope<'static>,
    /// The route lists events are evaluated against (see [`RuleSet::lane`]).
    lanes: Vec<Lane>,
    /// Per channel: the lane of events whose entity no route names, and the lane of each entity routes name.
    lane_index: HashMap<String, LaneIndex>,
}

/// A channel's lanes: the one for events whose entity no route names, and one per entity named.
type LaneIndex = (usize, HashMap<String, usize>);

/// The routes one event is evaluated against: the live routes of its channel that take its entity (every route
/// without `entity:`, and those naming the event's), in file order.
#[derive(Debug, Default)]
pub(crate) struct Lane {
    pub routes: Vec<usize>,
    /// The `when` of every route of the lane without a native form in one array expression, and their count (see
    /// [`RuleSet::combined`]).
    pub combined: Option<(AST, usize)>,
}

/// The lanes of the live routes: one per channel, and on a channel where routes name entities, one per entity.
fn lanes(live: &HashMap<String, Vec<usize>>, routes: &[Route]) -> (Vec<Lane>, HashMap<String, LaneIndex>) {
    let mut lanes = Vec::new();
    let mut index = HashMap::new();
    for (channel, indexes) in live {
        let lane = |entity: Option<&str>| Lane {
            routes: indexes
                .iter()
                .copied()
                .filter(|&i| routes[i].entity.as_deref().is_none_or(|e| Some(e) == entity))
                .collect(),
            combined: None,
        };
        lanes.push(lane(None));
        let default = lanes.len() - 1;
        let mut by_entity = HashMap::new();
        for entity in indexes.iter().filter_map(|&i| routes[i].entity.as_deref()) {
            if !by_entity.contains_key(entity) {
                lanes.push(lane(Some(entity)));
                by_entity.insert(entity.to_string(), lanes.len() - 1);
            }
        }
        index.insert(channel.clone(), (default, by_entity));
    }
    (lanes, index)
}

impl std::fmt::Debug for RuleSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuleSet")
            .field("version", &self.version)
            .field("routes", &self.routes.len())
            .finish()
    }
}

impl RuleSet {
    pub(crate) fn new(
        version: String,
        routes: Vec<Route>,
        vars: Map<String, Value>,
        mode: Option<Mode>,
        files: Vec<PathBuf>,
        engine: std::sync::Arc<Engine>,
    ) -> Self {
        let mut live: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, route) in routes.iter().enumerate() {
            if mode.is_none_or(|m| m == route.mode) {
                live.entry(route.channel.clone()).or_default().push(i);
            }
        }
        let mut reads = reads::Reads::default();
        for route in &routes {
            reads.scan(&route.when.source);
            if let Some(guard) = &route.guard {
                reads.scan(&guard.source);
            }
        }
        let mut template_header = reads::Fields::default();
        let templates = routes.iter().flat_map(|r| {
            let actions = r
                .then
                .iter()
                .chain(&r.otherwise)
                .chain(&r.on_failure)
                .flat_map(|a| a.params.templates());
            actions.chain(r.record_id.as_ref())
        });
        let mut read_fields = reads.event.clone();
        read_fields.extend(&reads.became);
        for path in templates.flat_map(Template::paths) {
            match (&path.root, path.segments.first()) {
                (template::Root::Header, Some(member)) => template_header.add(member),
                (template::Root::Header, None) => template_header = reads::Fields::All,
                (template::Root::Event, Some(member)) => read_fields.add(member),
                (template::Root::Event, None) => read_fields = reads::Fields::All,
                _ => {}
            }
        }
        let base_scope = load::scope(&vars, true);
        let (mut lanes, lane_index) = lanes(&live, &routes);
        combine(&engine, &base_scope, &mut lanes, &routes, &reads);
        RuleSet {
            version,
            routes,
            vars,
            mode,
            files,
            engine,
            live,
            reads,
            template_header,
            read_fields,
            base_scope,
            lanes,
            lane_index,
        }
    }

    /// Indexes of the live routes on `channel`, in file order.
    pub fn candidates(&self, channel: &str) -> &[usize] {
        self.live.get(channel).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The routes `event` is evaluated against: the live routes of its channel, less those that name another
    /// entity (`entity:`) than the event's.
    pub(crate) fn lane(&self, event: &crate::event::Event) -> Option<&Lane> {
        let (default, by_entity) = self.lane_index.get(&event.channel)?;
        let entity = event.header.as_ref().map(|h| h.entity.as_str());
        let i = entity.and_then(|e| by_entity.get(e)).unwrap_or(default);
        self.lanes.get(*i)
    }

    /// Drops the payload fields no predicate or template reads (the decision journal keeps the rest): the
    /// rules decide and render the same from what is left.
    pub fn keep_read_fields(&self, event: &mut crate::event::Event) {
        if let reads::Fields::Only(names) = &self.read_fields {
            event.fields.retain(|name, _| names.contains(name));
        }
    }

    /// Indexes of the routes `event` is evaluated against, in file order (see [`RuleSet::lane`]).
    pub fn routes_for(&self, event: &crate::event::Event) -> &[usize] {
        self.lane(event).map_or(&[], |l| l.routes.as_slice())
    }

    /// The `when` predicates of the routes `event` is evaluated against that have no native form, in file order,
    /// as one expression whose value is the array of their values (and how many there are): one evaluation per
    /// record instead of one per route, which saves the engine's per-evaluation set-up and function
    /// lookups. The router falls back to evaluating route by route when it fails, so errors stay per
    /// route, with their positions.
    pub(crate) fn combined(&self, event: &crate::event::Event) -> Option<(&AST, usize)> {
        self.lane(event)?.combined.as_ref().map(|(ast, count)| (ast, *count))
    }

    /// Drops the native form of every predicate, so that Rhai evaluates them all: the reference the native
    /// evaluation is checked against (`tests/native.rs`), and a way to rule it out when investigating.
    pub fn without_native(mut self) -> RuleSet {
        for route in &mut self.routes {
            route.when.native = None;
            if let Some(guard) = &mut route.guard {
                guard.native = None;
            }
        }
        combine(
            &self.engine,
            &self.base_scope,
            &mut self.lanes,
            &self.routes,
            &self.reads,
        );
        self
    }

    /// How many of the predicates (`when` and `guard`) have a native form, of how many.
    pub fn native_count(&self) -> (usize, usize) {
        let predicates = self
            .routes
            .iter()
            .flat_map(|r| std::iter::once(&r.when).chain(&r.guard));
        predicates.fold((0, 0), |(native, all), p| {
            (native + usize::from(p.native.is_some()), all + 1)
        })
    }

    /// Whether the route belongs to the config's mode (CDC or Platform Event); every route is live without one.
    pub fn is_live(&self, route: &Route) -> bool {
        self.mode.is_none_or(|m| m == route.mode)
    }

    /// The channels that have live routes.
    pub fn live_channels(&self) -> impl Iterator<Item = &str> {
        self.live.keys().map(String::as_str)
    }
}

/// Per lane, the `when` of its routes without a native form as one array expression, when there are two or more
/// (see [`RuleSet::combined`]). Only when no predicate can change the scope: the fallback then evaluates on what
/// the failed combined attempt saw.
fn combine(engine: &Engine, base_scope: &Scope<'static>, lanes: &mut [Lane], routes: &[Route], reads: &reads::Reads) {
    for lane in lanes.iter_mut() {
        lane.combined = None;
        if reads.methods {
            continue;
        }
        // Each predicate on lines of its own, so that a trailing `// comment` stays inside.
        let items: Vec<String> = lane
            .routes
            .iter()
            .filter(|&&i| routes[i].when.native.is_none())
            .map(|&i| format!("(\n{}\n)", routes[i].when.source))
            .collect();
        if items.len() < 2 {
            continue;
        }
        let source = format!("[\n{}\n]", items.join(",\n"));
        lane.combined = engine
            .compile_expression_with_scope(base_scope, &source)
            .ok()
            .map(|ast| (ast, items.len()));
    }
}

/// The closest of `options` to `word`, when it is close enough to be a likely typo.
pub fn suggest<'a>(word: &str, options: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(1);
    options
        .into_iter()
        .map(|o| (levenshtein(&word.to_lowercase(), &o.to_lowercase()), o))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, o)| o)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    #[test]
    fn suggests_close_names_only() {
        assert_eq!(super::suggest("recordid", ["record_id", "record"]), Some("record_id"));
        assert_eq!(
            super::suggest("Activaton_Status__c", ["Activation_Status__c", "Status"]),
            Some("Activation_Status__c")
        );
        assert_eq!(super::suggest("zzz", ["event"]), None);
    }

    /// The journal keeps the payload fields the shipped rules read (predicates: `became`, `event.X`; templates)
    /// and drops the rest.
    #[test]
    fn keep_read_fields_keeps_what_the_shipped_rules_read() {
        let paths = [std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/rules"))];
        let loaded = super::load::load_paths(&paths, &super::load::RuleEnv::defaults());
        let rules = loaded.ruleset.expect("the shipped rules load");
        let mut event = crate::event::Event::default();
        for (name, value) in [
            ("Activation_Status__c", "Activating"),
            ("Status", "Approved"),
            ("Order_Id__c", "801"),
            ("WHMCS_Order_ID__c", "1"),
        ] {
            event.fields.insert(name.into(), value.into());
        }
        rules.keep_read_fields(&mut event);
        let mut kept: Vec<&str> = event.fields.keys().map(String::as_str).collect();
        kept.sort_unstable();
        // WHMCS_Order_ID__c is read from the enriched record, never from the event.
        assert_eq!(kept, ["Activation_Status__c", "Order_Id__c", "Status"]);
    }
}
