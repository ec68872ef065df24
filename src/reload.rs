//! Hot reload of the rules: the start-up path (read, parse, check, compile, dry-run on the fixtures), then one
//! atomic swap of the whole RuleSet. A bad edit keeps the last good set and says why (file:line:col). Every
//! event loads the RuleSet once, so it is evaluated under exactly one version.
//!
//! Triggers: file changes in the rules' folders (watched as folders, so editors' save-by-rename and
//! Kubernetes ConfigMap `..data` symlink swaps are seen), SIGHUP, and `POST /reload`.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::diag::{Problem, Severity};
use crate::dispatch::now_ms;
use crate::metrics as m;
use crate::rules::RuleSet;
use crate::rules::load::RuleEnv;
use crate::rules::validate::validate;

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
}

/// Per-route counters shown at `/rules`.
#[derive(Debug, Default)]
pub struct RouteCounters {
    inner: Mutex<HashMap<String, (u64, u64)>>,
}

impl RouteCounters {
    /// A route's `when` held (and, with `fired`, its `then` ran).
    pub fn record(&self, route: &str, fired: bool) {
        let mut map = self.inner.lock().expect("counter lock is never poisoned");
        let entry = map.entry(route.to_string()).or_default();
        entry.0 += 1;
        entry.1 += u64::from(fired);
    }

    pub fn get(&self, route: &str) -> (u64, u64) {
        self.inner
            .lock()
            .expect("counter lock is never poisoned")
            .get(route)
            .copied()
            .unwrap_or_default()
    }
}

pub struct Reloader {
    pub rules: Arc<ArcSwap<RuleSet>>,
    pub counters: Arc<RouteCounters>,
    paths: Vec<PathBuf>,
    env: RuleEnv,
    state: Mutex<State>,
}

struct State {
    loaded_at_ms: u64,
    last: Option<ReloadOutcome>,
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
        "{}|{}|{:?}|{:?}|{:?}|{}|{}|{}|{}",
        route.channel,
        route.when.source,
        route.guard.as_ref().map(|g| &g.source),
        route.enrich.as_ref().map(|e| (&e.object, &e.fields)),
        route.record_id.as_ref().map(|t| t.source()),
        route.stop,
        route.shadow,
        actions(&route.then),
        actions(&route.otherwise)
    )
}

impl Reloader {
    pub fn new(rules: Arc<ArcSwap<RuleSet>>, counters: Arc<RouteCounters>, paths: Vec<PathBuf>, env: RuleEnv) -> Self {
        Reloader {
            rules,
            counters,
            paths,
            env,
            state: Mutex::new(State {
                loaded_at_ms: now_ms(),
                last: None,
            }),
        }
    }

    /// The folders to watch: each rules folder, and the folder of each rules file.
    pub fn watched_dirs(&self) -> Vec<PathBuf> {
        crate::rules::load::folders_of(&self.paths)
    }

    /// Runs the start-up path on the files as they are now; swaps only a complete, error-free RuleSet.
    pub fn reload(&self) -> ReloadOutcome {
        let old = self.rules.load_full();
        let checked = validate(&self.paths, &self.env, None);
        let problems: Vec<String> = checked.problems.iter().map(Problem::to_string).collect();
        let outcome = match checked.ruleset {
            None => {
                metrics::counter!(m::RULES_RELOADS, "result" => "error").increment(1);
                for p in checked.problems.iter().filter(|p| p.severity == Severity::Error) {
                    tracing::error!(rules_version = %old.version, "Rules not reloaded: {p}");
                }
                ReloadOutcome {
                    ok: false,
                    swapped: false,
                    old_version: old.version.clone(),
                    new_version: None,
                    added: Vec::new(),
                    removed: Vec::new(),
                    changed: Vec::new(),
                    problems,
                }
            }
            Some(new) if new.version == old.version => {
                metrics::counter!(m::RULES_RELOADS, "result" => "unchanged").increment(1);
                tracing::debug!(rules_version = %old.version, "Rules files touched but unchanged.");
                ReloadOutcome {
                    ok: true,
                    swapped: false,
                    old_version: old.version.clone(),
                    new_version: Some(new.version),
                    added: Vec::new(),
                    removed: Vec::new(),
                    changed: Vec::new(),
                    problems,
                }
            }
            Some(new) => {
                let before: BTreeMap<&str, String> =
                    old.routes.iter().map(|r| (r.name.as_str(), fingerprint(r))).collect();
                let after: BTreeMap<&str, String> =
                    new.routes.iter().map(|r| (r.name.as_str(), fingerprint(r))).collect();
                let added: Vec<String> = after
                    .keys()
                    .filter(|k| !before.contains_key(*k))
                    .map(|k| k.to_string())
                    .collect();
                let removed: Vec<String> = before
                    .keys()
                    .filter(|k| !after.contains_key(*k))
                    .map(|k| k.to_string())
                    .collect();
                let changed: Vec<String> = after
                    .iter()
                    .filter(|(k, v)| before.get(*k).is_some_and(|b| b != *v))
                    .map(|(k, _)| k.to_string())
                    .collect();
                let new_version = new.version.clone();
                self.rules.store(Arc::new(new));
                metrics::counter!(m::RULES_RELOADS, "result" => "ok").increment(1);
                metrics::gauge!(m::RULES_VERSION, "version" => old.version.clone()).set(0.0);
                metrics::gauge!(m::RULES_VERSION, "version" => new_version.clone()).set(1.0);
                tracing::info!(old = %old.version, new = %new_version, ?added, ?removed, ?changed, "Rules reloaded.");
                self.state
                    .lock()
                    .expect("reload state lock is never poisoned")
                    .loaded_at_ms = now_ms();
                ReloadOutcome {
                    ok: true,
                    swapped: true,
                    old_version: old.version.clone(),
                    new_version: Some(new_version),
                    added,
                    removed,
                    changed,
                    problems,
                }
            }
        };
        self.state.lock().expect("reload state lock is never poisoned").last = Some(outcome.clone());
        outcome
    }

    /// The state shown at `GET /rules`.
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
                })
            })
            .collect();
        serde_json::json!({
            "version": rules.version,
            "loaded_at_ms": state.loaded_at_ms,
            "files": rules.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
            "routes": routes,
            "last_reload": state.last,
        })
    }

    /// Watches the rules' folders and reloads after `debounce` of quiet. The returned watcher must be kept
    /// alive: dropping it stops the watching thread and ends the task below (its channel closes).
    pub fn watch(self: &Arc<Self>, debounce: Duration) -> Result<impl Drop + use<>, String> {
        use notify_debouncer_mini::notify::RecursiveMode;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let mut debouncer = notify_debouncer_mini::new_debouncer(
            debounce,
            move |events: notify_debouncer_mini::DebounceEventResult| {
                if events.is_ok_and(|e| !e.is_empty()) {
                    let _ = tx.send(());
                }
            },
        )
        .map_err(|e| e.to_string())?;
        for dir in self.watched_dirs() {
            debouncer
                .watcher()
                .watch(&dir, RecursiveMode::NonRecursive)
                .map_err(|e| format!("{}: {e}", dir.display()))?;
            tracing::info!(dir = %dir.display(), "Watching rules for changes.");
        }
        let this = self.clone();
        // Ends when the debouncer is dropped (its sender goes with it).
        tokio::spawn(async move {
            while rx.recv().await.is_some() {
                while rx.try_recv().is_ok() {}
                this.reload();
            }
        });
        Ok(debouncer)
    }
}
