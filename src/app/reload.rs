//! Hot reload of the rules: the start-up path (read, parse, check, compile, dry-run on the fixtures), then one
//! atomic swap of the whole RuleSet. A bad edit keeps the last good set and says why (file:line:col). Every
//! event loads the RuleSet once, so it is evaluated under exactly one version.
//!
//! Triggers: file changes in the rules' folders and the config file's folder (watched as folders, so editors'
//! save-by-rename and Kubernetes ConfigMap `..data` symlink swaps are seen), SIGHUP, and `POST /reload`.
//!
//! With a config file, a reload re-reads it too. What can change live is applied in this order, each step only once
//! the previous ones succeeded: sinks whose settings changed are rebuilt (the others are kept), the new RuleSet
//! (compiled against the new channels, sinks and mode) is swapped in, then the Pub/Sub subscriptions are stopped and
//! started to match the new mode and channels, each mode resuming from its own stored position. Settings that need
//! a restart (the HTTP listener, Redis, credentials, ...) are reported in the outcome, never silently ignored.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::authoring::validate::validate_deployed;
use crate::clock::now_ms;
use crate::config::{Config, LoadedConfig};
use crate::delivery::RouteCounters;
use crate::diag::{Problem, Severity};
use crate::obs::metrics as m;
use crate::rules::RuleSet;
use crate::rules::load::RuleEnv;
use crate::sinks::Sinks;
use crate::sources::pubsub::subscriber::Subscriptions;
use crate::state::Stores;

/// What a reload did.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReloadOutcome {
    /// False when the new files have errors (the old rules keep running).
    pub ok: bool,
    /// True when a new RuleSet was swapped in.
    pub swapped: bool,
    pub old_version: String,
    pub new_version: Option<String>,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    /// Every problem, as `file:line:col: error|warning: message`.
    pub problems: Vec<String>,
    /// Config changes applied live (mode, channels, sinks rebuilt, subscriptions started and stopped).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub applied: Vec<String>,
    /// Config changes that take effect only after a restart (the running process keeps the old values).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub restart_required: Vec<String>,
}

impl ReloadOutcome {
    /// A reload from `old_version` that has changed nothing yet.
    fn from_version(old_version: &str) -> Self {
        ReloadOutcome {
            ok: true,
            swapped: false,
            old_version: old_version.to_string(),
            new_version: None,
            added: Vec::new(),
            removed: Vec::new(),
            changed: Vec::new(),
            problems: Vec::new(),
            applied: Vec::new(),
            restart_required: Vec::new(),
        }
    }

    /// The reload refused for `problems`: the old rules and config keep running.
    fn failed(self, problems: Vec<String>) -> Self {
        metrics::counter!(m::RULES_RELOADS, "result" => "error").increment(1);
        ReloadOutcome {
            ok: false,
            problems,
            ..self
        }
    }
}

/// Whether a config change is applied by a reload (rather than waiting for a restart).
fn live_changes(c: &Config, n: &Config) -> bool {
    c.mode != n.mode
        || c.channels != n.channels
        || c.sinks != n.sinks
        || c.rules != n.rules
        || c.pubsub().enabled != n.pubsub().enabled
}

/// Rebuilds the sinks whose settings changed; returns what was applied, or the problem that keeps the reload out.
async fn apply_sinks(live: &LiveConfig, cur: &LoadedConfig, next: &LoadedConfig) -> Result<Vec<String>, String> {
    let mut applied = Vec::new();
    match live.sinks.rebuild(&cur.config, next).await {
        Ok(names) if names.is_empty() => {}
        Ok(names) => applied.push(format!("sinks rebuilt: {}", names.join(", "))),
        Err(e) => return Err(format!("{}: error: {e}", cur.path.display())),
    }
    if cur.config.mode != next.config.mode {
        applied.push(format!(
            "mode: {} -> {}",
            cur.config.mode.as_str(),
            next.config.mode.as_str()
        ));
    }
    if cur.config.channels != next.config.channels {
        applied.push("channel aliases changed".to_string());
    }
    Ok(applied)
}

/// The routes added, removed and changed (by name, then by everything that decides what they do).
fn route_changes(old: &RuleSet, new: &RuleSet) -> (Vec<String>, Vec<String>, Vec<String>) {
    let before: BTreeMap<&str, String> = old.routes.iter().map(|r| (r.name.as_str(), fingerprint(r))).collect();
    let after: BTreeMap<&str, String> = new.routes.iter().map(|r| (r.name.as_str(), fingerprint(r))).collect();
    let added = after
        .keys()
        .filter(|k| !before.contains_key(*k))
        .map(|k| k.to_string())
        .collect();
    let removed = before
        .keys()
        .filter(|k| !after.contains_key(*k))
        .map(|k| k.to_string())
        .collect();
    let changed = after
        .iter()
        .filter(|(k, v)| before.get(*k).is_some_and(|b| b != *v))
        .map(|(k, _)| k.to_string())
        .collect();
    (added, removed, changed)
}

impl LiveConfig {
    /// Starts and stops Pub/Sub channels for the new config and rules; the line for `applied`, when any changed.
    fn reconcile(&self, next: &LoadedConfig, rules: &RuleSet) -> Option<String> {
        let subscriptions = self.subscriptions.lock().unwrap_or_else(|e| e.into_inner()).clone()?;
        let channels = super::subscribed_channels(&next.config, rules);
        let (started, stopped) = subscriptions.reconcile(next.config.mode, &channels);
        if started.is_empty() && stopped.is_empty() {
            return None;
        }
        tracing::info!(?started, ?stopped, "Subscriptions changed with the config.");
        Some(format!(
            "subscriptions started: [{}], stopped: [{}]",
            started.join(", "),
            stopped.join(", ")
        ))
    }
}

pub struct Reloader {
    pub rules: Arc<ArcSwap<RuleSet>>,
    pub counters: Arc<RouteCounters>,
    paths: Mutex<Vec<PathBuf>>,
    env: Mutex<RuleEnv>,
    state: Mutex<State>,
    /// The config file and what its live settings drive; `None`: rules only (the demo, a config given as text).
    live: Option<LiveConfig>,
    /// One reload at a time.
    serial: tokio::sync::Mutex<()>,
    /// The runaway guard's pauses: a reload that changes a paused route's `when` resumes it.
    pauses: Option<Arc<Stores>>,
    /// The file watch, while [`Reloader::watch`]'s guard lives: the folders follow the config's `rules` on reload.
    watching: Mutex<Option<Watching>>,
}

struct Watching {
    watcher: notify::RecommendedWatcher,
    dirs: Vec<PathBuf>,
}

/// Keeps the watch of [`Reloader::watch`] running; dropping it stops the watcher and its reload task.
pub struct WatchGuard(Arc<Reloader>);

impl Drop for WatchGuard {
    fn drop(&mut self) {
        // Dropping the watcher closes its channel, which ends the task that holds the other `Arc<Reloader>`.
        self.0.watching.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// What a config reload changes on a running process.
struct LiveConfig {
    /// The config the process started with: what the settings that need a restart are compared against.
    started: Config,
    /// The config last applied.
    config: Mutex<LoadedConfig>,
    sinks: Arc<Sinks>,
    subscriptions: Mutex<Option<Arc<Subscriptions>>>,
}

/// The config keys that only a restart applies, with a note on why.
const RESTART_KEYS: &[(&str, &str)] = &[
    (
        "source",
        "the source kind and its settings (except `source.pubsub.enabled`)",
    ),
    ("redis", "the Redis connection of positions, markers and dead letters"),
    ("salesforce", "the Salesforce credentials and REST settings"),
    ("enricher", "the enricher"),
    ("http", "the HTTP listener"),
    ("delivery", "concurrency, retries and timeouts"),
    ("checkpoint", "the position store"),
    ("dead_letters", "dead-letter retention"),
    ("lease", "the replica lease settings"),
    ("reload", "the reload settings"),
    ("redact", "the redacted fields"),
    ("on_unmatched", "what happens to unmatched events"),
    ("print_decisions", "printing decisions"),
    ("route_limit", "the runaway guard of routes without their own `limit`"),
];

/// The top-level config keys that differ and need a restart, with `source.pubsub.enabled` (which is live) left out.
fn restart_required(old: &Config, new: &Config) -> Vec<String> {
    let as_value = |c: &Config| {
        let mut v = serde_json::to_value(c).unwrap_or_default();
        if let Some(pubsub) = v.pointer_mut("/source/pubsub").and_then(|p| p.as_object_mut()) {
            pubsub.remove("enabled");
        }
        v
    };
    let (old, new) = (as_value(old), as_value(new));
    RESTART_KEYS
        .iter()
        .filter(|(key, _)| old.get(key) != new.get(key))
        .map(|(key, what)| format!("`{key}` changed ({what}): restart switchyard to apply it"))
        .collect()
}

struct State {
    loaded_at_ms: u64,
    /// Reloads attempted since start (file watch, SIGHUP, `POST /reload`), whatever their result.
    reloads: u64,
    last: Option<ReloadOutcome>,
    /// The latest reloads, oldest first, at most [`HISTORY`].
    history: std::collections::VecDeque<Reload>,
}

/// How many reloads [`Reloader::history`] keeps.
pub const HISTORY: usize = 20;

/// One reload of the history: when it ended and what it did.
#[derive(Debug, Clone, Serialize)]
pub struct Reload {
    pub at_ms: u64,
    #[serde(flatten)]
    pub outcome: ReloadOutcome,
}

/// What identifies a route's behaviour, for the added/removed/changed report (not its line numbers).
fn fingerprint(route: &crate::rules::Route) -> String {
    let actions = |list: &[crate::rules::ActionTemplate]| {
        list.iter()
            .map(|a| format!("{}:{:?}", a.sink, a.params))
            .collect::<Vec<_>>()
            .join(";")
    };
    format!(
        "{}|{}|{:?}|{:?}|{:?}|{}|{}|{}|{}|{:?}",
        route.channel,
        route.when.source,
        route.guard.as_ref().map(|g| &g.source),
        route.enrich.as_ref().map(|e| (&e.object, &e.fields)),
        route.record_id.as_ref().map(|t| t.source()),
        route.stop,
        route.shadow,
        actions(&route.then),
        actions(&route.otherwise),
        route.limit
    )
}

impl Reloader {
    pub fn new(rules: Arc<ArcSwap<RuleSet>>, counters: Arc<RouteCounters>, paths: Vec<PathBuf>, env: RuleEnv) -> Self {
        Reloader {
            rules,
            counters,
            paths: Mutex::new(paths),
            env: Mutex::new(env),
            state: Mutex::new(State {
                loaded_at_ms: now_ms(),
                reloads: 0,
                last: None,
                history: Default::default(),
            }),
            live: None,
            serial: tokio::sync::Mutex::new(()),
            watching: Mutex::new(None),
            pauses: None,
        }
    }

    /// Resumes, on a reload, the paused routes whose `when` the new rules change (the fix the pause asked for).
    pub fn with_pauses(mut self, stores: Arc<Stores>) -> Self {
        self.pauses = Some(stores);
        self
    }

    /// The paused routes whose `when` differs between `old` and `new`, resumed; one line each for `applied`.
    async fn resume_fixed(&self, old: &RuleSet, new: &RuleSet) -> Vec<String> {
        let Some(stores) = &self.pauses else {
            return Vec::new();
        };
        let paused = match stores.pauses.list().await {
            Ok(paused) => paused,
            Err(e) => {
                tracing::warn!(error = %e, "Paused routes unreadable; a reload that fixes one does not resume it.");
                return Vec::new();
            }
        };
        let mut lines = Vec::new();
        for name in paused.keys() {
            let when = |rules: &RuleSet| {
                rules
                    .routes
                    .iter()
                    .find(|r| &r.name == name)
                    .map(|r| r.when.source.clone())
            };
            let (Some(before), Some(after)) = (when(old), when(new)) else {
                continue;
            };
            if before == after {
                continue;
            }
            match stores.pauses.resume(name).await {
                Ok(_) => {
                    metrics::gauge!(m::ROUTE_PAUSED, "route" => name.clone()).set(0.0);
                    tracing::warn!(route = %name, rules_version = %new.version, "Route resumed: the reload changed its `when`. Its dead letters stay; `switchyard dead-letter retry --all` runs them.");
                    lines.push(format!("route `{name}` resumed: its `when` changed"));
                }
                Err(e) => {
                    tracing::warn!(route = %name, error = %e, "Route's `when` changed but it could not be resumed.")
                }
            }
        }
        lines
    }

    /// Reloads `config` (its file) with the rules, applying what can change live to `sinks` and the subscriptions.
    pub fn with_config(mut self, config: LoadedConfig, sinks: Arc<Sinks>) -> Self {
        self.live = Some(LiveConfig {
            started: config.config.clone(),
            config: Mutex::new(config),
            sinks,
            subscriptions: Mutex::new(None),
        });
        self
    }

    /// The Pub/Sub channel tasks a config reload starts and stops.
    pub fn set_subscriptions(&self, subscriptions: Arc<Subscriptions>) {
        if let Some(live) = &self.live {
            *live.subscriptions.lock().unwrap_or_else(|e| e.into_inner()) = Some(subscriptions);
        }
    }

    /// The folders to watch: each rules folder, the folder of each rules file, and the config file's folder.
    pub fn watched_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = crate::rules::load::folders_of(&self.paths.lock().unwrap_or_else(|e| e.into_inner()));
        if let Some(live) = &self.live {
            let path = live.config.lock().unwrap_or_else(|e| e.into_inner()).path.clone();
            let folder = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            if !dirs.contains(&folder) {
                dirs.push(folder);
            }
        }
        dirs
    }

    /// Runs the start-up path on the files as they are now (the config file too, when there is one); swaps only a
    /// complete, error-free RuleSet, and applies live config changes with it.
    pub async fn reload(&self) -> ReloadOutcome {
        let _one = self.serial.lock().await;
        let outcome = self.reload_now().await;
        let mut state = self.state.lock().expect("reload state lock is never poisoned");
        state.reloads += 1;
        state.last = Some(outcome.clone());
        if state.history.len() == HISTORY {
            state.history.pop_front();
        }
        state.history.push_back(Reload {
            at_ms: now_ms(),
            outcome: outcome.clone(),
        });
        drop(state);
        outcome
    }

    async fn reload_now(&self) -> ReloadOutcome {
        let old = self.rules.load_full();
        let outcome = ReloadOutcome::from_version(&old.version);
        // The config file first: a broken config keeps everything as it is.
        let (current, next) = match self.read_config(&old.version).await {
            Ok(configs) => configs,
            Err(problems) => return outcome.failed(problems),
        };
        let (paths, env) = match &next {
            Some(next) => (next.rule_paths(), RuleEnv::from_config(next)),
            None => (
                self.paths.lock().unwrap_or_else(|e| e.into_inner()).clone(),
                self.env.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            ),
        };
        let checked = {
            let (paths, env) = (paths.clone(), env.clone());
            match tokio::task::spawn_blocking(move || validate_deployed(&paths, &env)).await {
                Ok(checked) => checked,
                Err(e) => return outcome.failed(vec![format!("internal error while checking the rules: {e}")]),
            }
        };
        let problems: Vec<String> = checked.problems.iter().map(Problem::to_string).collect();
        // What of the config changes live, and what waits for a restart.
        let configs = self.live.as_ref().zip(current.as_ref()).zip(next.as_ref());
        let (live_changed, restart) = match configs {
            Some(((live, cur), next)) => (
                live_changes(&cur.config, &next.config),
                restart_required(&live.started, &next.config),
            ),
            None => (false, Vec::new()),
        };
        for r in &restart {
            tracing::warn!("Config reload: {r}");
        }
        let outcome = ReloadOutcome {
            restart_required: restart,
            ..outcome
        };
        let new = match checked.ruleset {
            None => {
                for p in checked.problems.iter().filter(|p| p.severity == Severity::Error) {
                    tracing::error!(rules_version = %old.version, "Rules not reloaded: {p}");
                }
                return outcome.failed(problems);
            }
            Some(new) if new.version == old.version && !live_changed => {
                metrics::counter!(m::RULES_RELOADS, "result" => "unchanged").increment(1);
                tracing::debug!(rules_version = %old.version, "Rules files touched but unchanged.");
                return ReloadOutcome {
                    ok: true,
                    new_version: Some(new.version),
                    problems,
                    ..outcome
                };
            }
            Some(new) => new,
        };
        // Sinks before rules: the new rules may name a sink that only the new config has.
        let mut applied = Vec::new();
        if let Some(((live, cur), next)) = configs {
            match apply_sinks(live, cur, next).await {
                Ok(lines) => applied = lines,
                Err(problem) => {
                    tracing::error!(rules_version = %old.version, "Config not reloaded: a sink cannot be built: {problem}");
                    return outcome.failed(vec![problem]);
                }
            }
        }
        let (added, removed, changed) = route_changes(&old, &new);
        applied.extend(self.resume_fixed(&old, &new).await);
        let new = self.swap(new, paths, env);
        if let (Some(live), Some(next)) = (&self.live, next) {
            applied.extend(live.reconcile(&next, &new));
            *live.config.lock().unwrap_or_else(|e| e.into_inner()) = next;
        }
        metrics::counter!(m::RULES_RELOADS, "result" => "ok").increment(1);
        metrics::gauge!(m::RULES_VERSION, "version" => old.version.clone()).set(0.0);
        metrics::gauge!(m::RULES_VERSION, "version" => new.version.clone()).set(1.0);
        tracing::info!(old = %old.version, new = %new.version, ?added, ?removed, ?changed, "Rules reloaded.");
        ReloadOutcome {
            ok: true,
            swapped: true,
            new_version: Some(new.version.clone()),
            added,
            removed,
            changed,
            problems,
            applied,
            ..outcome
        }
    }

    /// Swaps the new rules in, with the paths and environment they were loaded from, and watches their folders.
    fn swap(&self, new: RuleSet, paths: Vec<PathBuf>, env: RuleEnv) -> Arc<RuleSet> {
        let new = Arc::new(new);
        self.rules.store(new.clone());
        *self.paths.lock().unwrap_or_else(|e| e.into_inner()) = paths;
        *self.env.lock().unwrap_or_else(|e| e.into_inner()) = env;
        self.rewatch();
        self.state
            .lock()
            .expect("reload state lock is never poisoned")
            .loaded_at_ms = now_ms();
        new
    }

    /// The config as it runs now and as its file says now (both `None` without a config file); the file's problems
    /// when it cannot be read.
    async fn read_config(&self, version: &str) -> Result<(Option<LoadedConfig>, Option<LoadedConfig>), Vec<String>> {
        let Some(live) = &self.live else {
            return Ok((None, None));
        };
        let current = live.config.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let path = current.path.clone();
        match tokio::task::spawn_blocking(move || LoadedConfig::load(&path)).await {
            Ok(Ok(next)) => Ok((Some(current), Some(next))),
            Ok(Err(problems)) => {
                for p in &problems.0 {
                    tracing::error!(rules_version = %version, "Config not reloaded: {p}");
                }
                Err(problems.0.iter().map(Problem::to_string).collect())
            }
            Err(e) => Err(vec![format!("internal error while reading the config: {e}")]),
        }
    }

    /// The state shown at `GET /rules`.
    /// The latest reloads, newest first.
    pub fn history(&self) -> Vec<Reload> {
        let state = self.state.lock().expect("reload state lock is never poisoned");
        state.history.iter().rev().cloned().collect()
    }

    /// When the rules in effect were loaded (ms since the epoch).
    pub fn loaded_at_ms(&self) -> u64 {
        self.state
            .lock()
            .expect("reload state lock is never poisoned")
            .loaded_at_ms
    }

    pub fn describe(&self) -> serde_json::Value {
        let rules = self.rules.load();
        let state = self.state.lock().expect("reload state lock is never poisoned");
        let routes: Vec<serde_json::Value> = rules
            .routes
            .iter()
            .map(|r| {
                let (matched, fired) = self.counters.get(&r.name);
                serde_json::json!({
                    "name": r.name, "channel": r.channel, "mode": r.mode.as_str(),
                    "live": rules.mode.is_none_or(|mode| mode == r.mode),
                    "file": r.file.display().to_string(), "line": r.line, "matched": matched, "fired": fired,
                    // Whether each predicate evaluates natively (else with Rhai; see README "Predicates").
                    "native": {"when": r.when.native.is_some(), "guard": r.guard.as_ref().map(|g| g.native.is_some())},
                })
            })
            .collect();
        serde_json::json!({
            "version": rules.version,
            "loaded_at_ms": state.loaded_at_ms,
            "reloads": state.reloads,
            "files": rules.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
            "routes": routes,
            "last_reload": state.last,
        })
    }

    /// Watches the rules' folders (and the config's) and reloads once `debounce` passed without another change; a
    /// reload that changes the config's `rules` moves the watch to the new folders. Watching lasts as long as the
    /// returned guard.
    pub fn watch(self: &Arc<Self>, debounce: Duration) -> Result<WatchGuard, String> {
        use notify::EventKind;
        use notify::event::{AccessKind, AccessMode};
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else {
                // Lost events (e.g. an overflowing inotify queue): reload to be sure.
                let _ = tx.send(());
                return;
            };
            // Opening or reading a file is not a change (inotify reports opens): without this, the reload's own
            // reads of the files would trigger the next reload, forever.
            if let EventKind::Access(kind) = event.kind
                && kind != AccessKind::Close(AccessMode::Write)
            {
                return;
            }
            // Only YAML files (rules, rule tests, the config) and ConfigMap swaps (`..data`) count: a position
            // file or an editor's backup beside the config must not trigger reloads.
            let relevant = |path: &std::path::Path| {
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                name.starts_with("..") || name.ends_with(".yaml") || name.ends_with(".yml")
            };
            if event.paths.iter().any(|p| relevant(p)) {
                let _ = tx.send(());
            }
        })
        .map_err(|e| e.to_string())?;
        let mut watching = Watching {
            watcher,
            dirs: Vec::new(),
        };
        for dir in self.watched_dirs() {
            watching.add(dir)?;
        }
        *self.watching.lock().unwrap_or_else(|e| e.into_inner()) = Some(watching);
        let this = self.clone();
        // Ends when the watcher is dropped (its sender goes with it).
        tokio::spawn(async move {
            while rx.recv().await.is_some() {
                // An edit is often several events (an editor's rename dance, a ConfigMap swap): wait for quiet.
                loop {
                    match tokio::time::timeout(debounce, rx.recv()).await {
                        Ok(Some(())) => continue,
                        Ok(None) => return,
                        Err(_) => break,
                    }
                }
                this.reload().await;
            }
        });
        Ok(WatchGuard(self.clone()))
    }

    /// Moves the watch to the folders the rules and config are in now (after a reload changed `rules`).
    fn rewatch(&self) {
        let mut watching = self.watching.lock().unwrap_or_else(|e| e.into_inner());
        let Some(watching) = watching.as_mut() else {
            return;
        };
        let wanted = self.watched_dirs();
        let watcher = &mut watching.watcher;
        watching.dirs.retain(|dir| {
            use notify::Watcher;
            let keep = wanted.contains(dir);
            if !keep {
                let _ = watcher.unwatch(dir);
                tracing::info!(dir = %dir.display(), "No longer watching this folder (no rules in it any more).");
            }
            keep
        });
        for dir in wanted {
            if !watching.dirs.contains(&dir)
                && let Err(e) = watching.add(dir)
            {
                tracing::warn!(error = %e, "Cannot watch a new rules folder; reload with SIGHUP or POST /reload.");
            }
        }
    }
}

impl Watching {
    fn add(&mut self, dir: PathBuf) -> Result<(), String> {
        use notify::{RecursiveMode, Watcher};
        self.watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        tracing::info!(dir = %dir.display(), "Watching rules for changes.");
        self.dirs.push(dir);
        Ok(())
    }
}
