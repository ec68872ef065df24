//! The JSON API under `/api/` that the console and scripts use: what runs (overview, routes, reloads), what was
//! decided (journal search, recent entries, the live tap), what waits (dead letters), and the operator's changes
//! (reload, retry, purge, pause, resume), which run the same code as the CLI ([`crate::app::admin`]). What each
//! caller may do is [`super::access`]'s to say.
//!
//! Nothing here polls: every Redis read happens because a request asked for it, so a console nobody looks at
//! costs nothing but the [`Sparks`] sample of in-memory counters every [`SPARK_EVERY`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::AppState;
use crate::app::admin::{self, AdminError};
use crate::app::cli::{DeadLetterOp, RouteOp};
use crate::event::Event;
use crate::obs::metrics as m;
use crate::sources::pubsub::subscriber::ChannelState;
use crate::state::{Pause, describe_position};

/// The API's routes (merged into the listener's router, behind its guard).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/overview", get(overview_json))
        .route("/api/routes", get(routes_json))
        .route("/api/reloads", get(reloads_json))
        .route("/api/reload", post(super::reload))
        .route("/api/journal", get(super::journal))
        .route("/api/journal/recent", get(recent_json))
        .route("/api/tap", get(super::tap))
        .route("/api/dead-letters", get(dead_letters_json))
        .route("/api/dead-letters/{id}", get(dead_letter_json))
        .route("/api/dead-letters/retry", post(retry))
        .route("/api/dead-letters/purge", post(purge))
        .route("/api/routes/{name}/pause", post(pause))
        .route("/api/routes/{name}/resume", post(resume))
        .route("/api/explain", post(explain_json))
}

/// How often [`Sparks`] samples the routes' fire counters (memory only, no Redis).
pub const SPARK_EVERY: Duration = Duration::from_secs(10);

/// Samples kept: ten minutes.
const SPARK_SAMPLES: usize = 61;

/// The fire counts of every route, sampled every [`SPARK_EVERY`], for the overview's rates and sparklines.
#[derive(Default)]
pub struct Sparks {
    samples: Mutex<VecDeque<HashMap<String, u64>>>,
}

impl Sparks {
    /// Takes one sample of the counters (called by the listener's sampler task).
    pub fn sample(&self, state: &AppState) {
        let rules = state.reloader.rules.load();
        let sample: HashMap<String, u64> = rules
            .routes
            .iter()
            .map(|r| (r.name.clone(), state.reloader.counters.get(&r.name).1))
            .collect();
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if samples.len() == SPARK_SAMPLES {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    /// A route's fires per sample interval, oldest first (empty until two samples exist).
    fn fires(&self, route: &str) -> Vec<u64> {
        let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let counts: Vec<u64> = samples.iter().map(|s| s.get(route).copied().unwrap_or(0)).collect();
        counts.windows(2).map(|w| w[1].saturating_sub(w[0])).collect()
    }
}

/// The per-route counters as `/metrics` shows them (its own render, parsed, so that the two never disagree).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RouteCounts {
    pub evaluated: u64,
    pub matched: u64,
    pub fired: u64,
    pub failed: u64,
    pub dead_lettered: u64,
}

impl RouteCounts {
    pub fn not_matched(&self) -> u64 {
        self.evaluated.saturating_sub(self.matched)
    }
}

/// Reads `switchyard_route_*_total{route="…"}` and `switchyard_dead_letters_total{route="…"}` out of a Prometheus
/// text render.
pub fn route_counts(render: &str) -> BTreeMap<String, RouteCounts> {
    let mut out: BTreeMap<String, RouteCounts> = BTreeMap::new();
    for line in render.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Some((name, labels)) = series.split_once('{') else {
            continue;
        };
        let Some(route) = label(labels, "route") else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let counts = out.entry(route).or_default();
        let slot = match name {
            m::ROUTE_EVALUATED => &mut counts.evaluated,
            m::ROUTE_MATCHED => &mut counts.matched,
            m::ROUTE_FIRED => &mut counts.fired,
            m::ROUTE_FAILED => &mut counts.failed,
            m::DEAD_LETTERS => &mut counts.dead_lettered,
            _ => continue,
        };
        *slot += value as u64;
    }
    out
}

/// The value of `key="…"` in a Prometheus label set (`a="x",b="y"}`), unescaped.
fn label(labels: &str, key: &str) -> Option<String> {
    let start = labels.find(&format!("{key}=\""))? + key.len() + 2;
    let mut value = String::new();
    let mut chars = labels[start..].chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next()? {
                'n' => value.push('\n'),
                other => value.push(other),
            },
            '"' => return Some(value),
            c => value.push(c),
        }
    }
    None
}

#[derive(Debug, Serialize)]
pub struct Overview {
    pub instance: String,
    pub version: &'static str,
    pub role: &'static str,
    pub mode: Option<String>,
    pub rules_version: String,
    pub rules_loaded_at_ms: u64,
    pub uptime_s: u64,
    pub channels: Vec<ChannelView>,
    pub positions: Vec<PositionView>,
    pub redis: Vec<RedisView>,
    pub routes: Vec<RouteView>,
    /// Pauses of routes the current rules no longer have (they hold if the route comes back).
    pub orphan_pauses: BTreeMap<String, Pause>,
    pub dead_letters: Option<usize>,
    pub journal: bool,
    /// What could not be read (a Redis outage): the rest of the overview still shows.
    pub errors: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct ChannelView {
    pub channel: String,
    pub state: String,
    /// Seconds since the position last moved in this process (an event or a keepalive).
    pub last_event_age_s: f64,
}

#[derive(Debug, Serialize)]
pub struct PositionView {
    pub key: String,
    pub position: String,
    pub lease_holder: Option<String>,
    pub lease_left_ms: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct RedisView {
    pub name: String,
    pub url: String,
    pub ok: bool,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct RouteView {
    pub name: String,
    pub channel: String,
    pub live: bool,
    #[serde(flatten)]
    pub counts: RouteCounts,
    pub not_matched: u64,
    /// Fires per [`SPARK_EVERY`], oldest first, over the last ten minutes.
    pub spark: Vec<u64>,
    /// Fires per minute over the last five minutes (or as long as sampled).
    pub fires_per_min: f64,
    pub paused: Option<Pause>,
}

fn channel_state(state: ChannelState) -> String {
    match state {
        ChannelState::Standby => "standby".into(),
        ChannelState::Connecting => "connecting".into(),
        ChannelState::Streaming => "streaming".into(),
        ChannelState::Backoff => "backoff".into(),
        ChannelState::Stopped(why) => format!("stopped: {why}"),
    }
}

/// Everything the overview page shows, read now.
pub async fn overview(state: &AppState) -> Overview {
    let rules = state.reloader.rules.load_full();
    let stores = &state.ops.stores;
    let mut errors = Vec::new();
    let channels = state
        .channels
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|c| ChannelView {
            channel: c.channel.clone(),
            state: channel_state(c.state()),
            last_event_age_s: c.position_age().as_secs_f64(),
        })
        .collect();
    let mut positions = Vec::new();
    match stores.checkpoints.list().await {
        Ok(all) => {
            for (key, bytes) in all {
                let (lease_holder, lease_left_ms) = match &stores.leases {
                    Some(leases) => match leases.holder(&key).await {
                        Ok(Some((who, left))) => (Some(who), Some(left.as_millis() as u64)),
                        Ok(None) => (None, None),
                        Err(e) => {
                            errors.push(format!("lease of `{key}`: {e}"));
                            (None, None)
                        }
                    },
                    None => (None, None),
                };
                positions.push(PositionView {
                    position: describe_position(&key, &bytes),
                    key,
                    lease_holder,
                    lease_left_ms,
                });
            }
        }
        Err(e) => errors.push(format!("positions: {e}")),
    }
    let sinks = state.sink_redis.load_full();
    let checks: Vec<_> = state.main_redis.iter().chain(sinks.iter()).collect();
    let pings = futures_util::future::join_all(checks.iter().map(|check| check.ping())).await;
    let redis = checks
        .iter()
        .zip(pings)
        .map(|(check, result)| RedisView {
            name: check.name.clone(),
            url: check.url.clone(),
            ok: result.is_ok(),
            error: result.err(),
        })
        .collect();
    let mut paused = match stores.pauses.list().await {
        Ok(p) => p,
        Err(e) => {
            errors.push(format!("paused routes: {e}"));
            BTreeMap::new()
        }
    };
    let counts = route_counts(&state.metrics.render());
    let per_min = 60.0 / SPARK_EVERY.as_secs_f64();
    let routes = rules
        .routes
        .iter()
        .map(|r| {
            let spark = state.sparks.fires(&r.name);
            let recent = &spark[spark.len().saturating_sub(30)..];
            let fires_per_min = if recent.is_empty() {
                0.0
            } else {
                recent.iter().sum::<u64>() as f64 * per_min / recent.len() as f64
            };
            let counts = counts.get(&r.name).copied().unwrap_or_default();
            RouteView {
                name: r.name.clone(),
                channel: r.channel.clone(),
                live: rules.is_live(r),
                not_matched: counts.not_matched(),
                counts,
                spark,
                fires_per_min,
                paused: paused.remove(&r.name),
            }
        })
        .collect();
    let dead_letters = match stores.dead_letters.list().await {
        Ok(all) => Some(all.len()),
        Err(e) => {
            errors.push(format!("dead letters: {e}"));
            None
        }
    };
    Overview {
        instance: state.instance.clone(),
        version: env!("CARGO_PKG_VERSION"),
        role: m::role(),
        mode: rules.mode.map(|m| m.as_str().to_string()),
        rules_version: rules.version.clone(),
        rules_loaded_at_ms: state.reloader.loaded_at_ms(),
        uptime_s: state.started.elapsed().as_secs(),
        channels,
        positions,
        redis,
        routes,
        orphan_pauses: paused,
        dead_letters,
        journal: state.ops.stores.journal.is_some(),
        errors,
    }
}

async fn overview_json(State(state): State<AppState>) -> Json<Overview> {
    Json(overview(&state).await)
}

/// One loaded route as the rules page and `/api/routes` show it.
#[derive(Debug, Serialize)]
pub struct RouteSpec {
    pub name: String,
    pub channel: String,
    pub mode: String,
    pub live: bool,
    pub at: String,
    pub when: String,
    pub guard: Option<String>,
    pub then: Vec<String>,
    #[serde(rename = "else")]
    pub otherwise: Vec<String>,
    pub stop: bool,
    pub shadow: bool,
    pub limit: Option<String>,
}

pub fn route_specs(state: &AppState) -> (String, Vec<RouteSpec>) {
    let rules = state.reloader.rules.load_full();
    let action = |a: &crate::rules::ActionTemplate| format!("{} ({})", a.sink, a.at);
    let default_limit = state.ops.pipeline.route_limit;
    let specs = rules
        .routes
        .iter()
        .map(|r| RouteSpec {
            name: r.name.clone(),
            channel: r.channel.clone(),
            mode: r.mode.as_str().to_string(),
            live: rules.is_live(r),
            at: format!("{}:{}:{}", r.file.display(), r.line, r.column),
            when: r.when.source.trim().to_string(),
            guard: r.guard.as_ref().map(|g| g.source.trim().to_string()),
            then: r.then.iter().map(action).collect(),
            otherwise: r.otherwise.iter().map(action).collect(),
            stop: r.stop,
            shadow: r.shadow,
            limit: match (r.limit, default_limit) {
                (Some(l), _) => Some(l.to_string()),
                (None, Some(l)) => Some(format!("{l} (config default)")),
                (None, None) => None,
            },
        })
        .collect();
    (rules.version.clone(), specs)
}

async fn routes_json(State(state): State<AppState>) -> Json<Value> {
    let (version, routes) = route_specs(&state);
    Json(json!({"version": version, "routes": routes}))
}

async fn reloads_json(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "loaded_at_ms": state.reloader.loaded_at_ms(),
        "reloads": state.reloader.history(),
    }))
}

#[derive(Deserialize)]
struct RecentQuery {
    #[serde(default = "twenty")]
    n: usize,
}

fn twenty() -> usize {
    20
}

/// The newest journal entries with the (masked) events they were decided on: the console's "pick a recent event".
async fn recent_json(State(state): State<AppState>, Query(q): Query<RecentQuery>) -> (StatusCode, Json<Value>) {
    match recent(&state, q.n.min(200)).await {
        Ok(entries) => (StatusCode::OK, Json(serde_json::to_value(entries).unwrap_or_default())),
        Err(e) => e,
    }
}

pub async fn recent(state: &AppState, n: usize) -> Result<Vec<crate::state::Entry>, (StatusCode, Json<Value>)> {
    let Some(journal) = &state.ops.stores.journal else {
        return Err(no_journal());
    };
    journal.store.recent(n).await.map_err(unavailable)
}

pub fn no_journal() -> (StatusCode, Json<Value>) {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": "this config has `journal: { enabled: false }`"})),
    )
}

fn unavailable(e: impl std::fmt::Display) -> (StatusCode, Json<Value>) {
    (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": e.to_string()})))
}

/// One dead letter in a list.
#[derive(Debug, Serialize)]
pub struct LetterSummary {
    pub id: String,
    pub at_ms: u64,
    pub route: Option<String>,
    pub event_id: Option<String>,
    pub record_id: Option<String>,
    pub reason: String,
    pub attempts: u64,
}

pub async fn dead_letters(state: &AppState, route: Option<&str>) -> Result<Vec<LetterSummary>, String> {
    let all = state.ops.stores.dead_letters.list().await.map_err(|e| e.to_string())?;
    let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    Ok(all
        .into_iter()
        .filter(|(_, v)| route.is_none() || s(v, "route").as_deref() == route)
        .map(|(id, v)| LetterSummary {
            at_ms: v.get("at_ms").and_then(Value::as_u64).unwrap_or(0),
            route: s(&v, "route"),
            event_id: s(&v, "event_id"),
            record_id: s(&v, "record_id"),
            reason: s(&v, "reason").unwrap_or_default(),
            attempts: v.get("attempts").and_then(Value::as_u64).unwrap_or(0),
            id,
        })
        .collect())
}

#[derive(Deserialize)]
pub struct RouteFilter {
    pub route: Option<String>,
}

async fn dead_letters_json(State(state): State<AppState>, Query(q): Query<RouteFilter>) -> (StatusCode, Json<Value>) {
    match dead_letters(&state, q.route.as_deref().filter(|r| !r.is_empty())).await {
        Ok(list) => (StatusCode::OK, Json(serde_json::to_value(list).unwrap_or_default())),
        Err(e) => unavailable(e),
    }
}

/// One dead letter, whole (as `switchyard dead-letter show` prints it).
pub async fn dead_letter(state: &AppState, id: &str) -> Result<Option<Value>, String> {
    let all = state.ops.stores.dead_letters.list().await.map_err(|e| e.to_string())?;
    Ok(all.into_iter().find(|(i, _)| i == id).map(|(_, v)| v))
}

async fn dead_letter_json(State(state): State<AppState>, Path(id): Path<String>) -> (StatusCode, Json<Value>) {
    match dead_letter(&state, &id).await {
        Ok(Some(letter)) => (StatusCode::OK, Json(letter)),
        Ok(None) => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": format!("no dead letter `{id}`")})),
        ),
        Err(e) => unavailable(e),
    }
}

/// Which dead letters a retry or purge takes: named ids, every one of a route, or all.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selection {
    #[serde(default)]
    pub ids: Vec<String>,
    #[serde(default)]
    pub route: Option<String>,
    #[serde(default)]
    pub all: bool,
}

/// What a change did, line by line as the CLI prints it; `ok` false when part of it did not go through.
#[derive(Debug, Serialize)]
pub struct Done {
    pub ok: bool,
    pub lines: Vec<String>,
}

fn done(ok: bool, out: Vec<u8>) -> (StatusCode, Json<Value>) {
    let lines = String::from_utf8_lossy(&out).lines().map(str::to_string).collect();
    let code = if ok { StatusCode::OK } else { StatusCode::CONFLICT };
    (code, Json(serde_json::to_value(Done { ok, lines }).unwrap_or_default()))
}

fn admin_error(e: AdminError) -> (StatusCode, Json<Value>) {
    match e {
        AdminError::Usage(why) => (StatusCode::BAD_REQUEST, Json(json!({"error": why}))),
        other => unavailable(other),
    }
}

/// A body as JSON (an empty body is the default), or a 400 saying what is wrong with it.
fn body<T: serde::de::DeserializeOwned + Default>(bytes: &[u8]) -> Result<T, (StatusCode, Json<Value>)> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(bytes).map_err(|e| {
        (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": format!("the body is not the expected JSON: {e}")})),
        )
    })
}

/// The ids a selection names (a route's: those of its dead letters now).
async fn select(state: &AppState, sel: &Selection) -> Result<(Vec<String>, bool), (StatusCode, Json<Value>)> {
    match (&sel.route, sel.all, sel.ids.is_empty()) {
        (Some(route), false, true) => {
            let ids = dead_letters(state, Some(route))
                .await
                .map_err(unavailable)?
                .into_iter()
                .map(|l| l.id)
                .collect();
            Ok((ids, false))
        }
        (None, true, true) => Ok((Vec::new(), true)),
        (None, false, false) => Ok((sel.ids.clone(), false)),
        _ => Err((
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "name one of `ids`, `route` or `all: true`"})),
        )),
    }
}

/// `POST /api/dead-letters/retry` `{"ids": [...]}` | `{"route": "..."}` | `{"all": true}`: as `dead-letter retry`.
async fn retry(State(state): State<AppState>, bytes: axum::body::Bytes) -> (StatusCode, Json<Value>) {
    let sel: Selection = match body(&bytes) {
        Ok(sel) => sel,
        Err(e) => return e,
    };
    let (ids, all) = match select(&state, &sel).await {
        Ok(chosen) => chosen,
        Err(e) => return e,
    };
    if ids.is_empty() && !all {
        return done(true, b"no dead letters to retry\n".to_vec());
    }
    // A retry runs sinks: it finishes even when the client goes away, so no action is cut off halfway.
    let ops = state.ops.clone();
    let run = tokio::spawn(async move {
        let mut out = Vec::new();
        let result = admin::dead_letter(&ops, DeadLetterOp::Retry { ids, all }, &mut out).await;
        (result, out)
    });
    match run.await {
        Ok((Ok(ok), out)) => done(ok, out),
        Ok((Err(e), _)) => admin_error(e),
        Err(e) => unavailable(e),
    }
}

/// `POST /api/dead-letters/purge` with the same selection as retry: as `dead-letter purge`.
async fn purge(State(state): State<AppState>, bytes: axum::body::Bytes) -> (StatusCode, Json<Value>) {
    let sel: Selection = match body(&bytes) {
        Ok(sel) => sel,
        Err(e) => return e,
    };
    let (ids, all) = match select(&state, &sel).await {
        Ok(chosen) => chosen,
        Err(e) => return e,
    };
    if ids.is_empty() && !all {
        return done(true, b"purged 0 dead letter(s)\n".to_vec());
    }
    let mut out = Vec::new();
    match admin::dead_letter(&state.ops, DeadLetterOp::Purge { ids, all }, &mut out).await {
        Ok(ok) => done(ok, out),
        Err(e) => admin_error(e),
    }
}

async fn pause(State(state): State<AppState>, Path(name): Path<String>) -> (StatusCode, Json<Value>) {
    let mut out = Vec::new();
    match admin::route(&state.ops, RouteOp::Pause { name }, &mut out).await {
        Ok(()) => done(true, out),
        Err(e) => admin_error(e),
    }
}

async fn resume(State(state): State<AppState>, Path(name): Path<String>) -> (StatusCode, Json<Value>) {
    let mut out = Vec::new();
    match admin::route(&state.ops, RouteOp::Resume { name }, &mut out).await {
        Ok(()) => done(true, out),
        Err(e) => admin_error(e),
    }
}

/// What every route would do with an event under the rules in effect (as `switchyard explain`); nothing runs.
pub fn explain(state: &AppState, event_json: &str) -> Result<crate::authoring::explain::Explanation, String> {
    let mut event = Event::from_json(event_json.trim()).map_err(|e| format!("not an event: {e}"))?;
    event.normalize().map_err(|e| format!("not an event: {e}"))?;
    let rules = state.reloader.rules.load_full();
    Ok(crate::authoring::explain::explain(&rules, &event))
}

/// `POST /api/explain` with an event (one JSON object, as a line of a JSONL file) as the body.
async fn explain_json(State(state): State<AppState>, bytes: axum::body::Bytes) -> (StatusCode, Json<Value>) {
    let text = String::from_utf8_lossy(&bytes);
    match explain(&state, &text) {
        Ok(x) => (StatusCode::OK, Json(serde_json::to_value(x).unwrap_or_default())),
        Err(e) => (StatusCode::BAD_REQUEST, Json(json!({"error": e}))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_counts_read_the_prometheus_render() {
        let render = "# TYPE switchyard_route_fired_total counter\n\
            switchyard_route_fired_total{route=\"provision\"} 3\n\
            switchyard_route_evaluated_total{route=\"provision\"} 10\n\
            switchyard_route_matched_total{route=\"provision\"} 4\n\
            switchyard_route_failed_total{route=\"provision\"} 1\n\
            switchyard_dead_letters_total{route=\"provision\"} 2\n\
            switchyard_dead_letters_total{route=\"\"} 5\n\
            switchyard_route_fired_total{route=\"we\\\"ird\"} 7\n\
            switchyard_events_total{channel=\"/data/OrderChangeEvent\"} 10\n";
        let counts = route_counts(render);
        let p = counts["provision"];
        assert_eq!(
            p,
            RouteCounts {
                evaluated: 10,
                matched: 4,
                fired: 3,
                failed: 1,
                dead_lettered: 2
            }
        );
        assert_eq!(p.not_matched(), 6);
        assert_eq!(counts["we\"ird"].fired, 7);
        assert_eq!(counts[""].dead_lettered, 5);
        assert!(!counts.contains_key("/data/OrderChangeEvent"));
    }
}
