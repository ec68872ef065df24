//! The HTTP listener: `/healthz` (liveness), `/readyz` (readiness), `/metrics`, `/rules`, `POST /reload`, the JSON
//! API under `/api/` ([`api`]) and the operator console under `/ui` ([`ui`]). Who may call what is [`access`]'s to
//! say.

pub mod access;
pub mod api;
pub mod ui;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::app::admin::Ops;
use crate::app::http::access::Access;
use crate::app::reload::Reloader;
use crate::app::why::TapFilter;
use crate::config::HttpConfig;
use crate::obs::metrics as m;
use crate::sources::pubsub::subscriber::{ChannelState, ChannelStatus};
use crate::state::RedisCheck;

/// What the listener serves from.
#[derive(Clone)]
pub struct AppState {
    pub reloader: Arc<Reloader>,
    pub metrics: PrometheusHandle,
    /// The main Redis `/readyz` PINGs (none without Redis).
    pub main_redis: Option<RedisCheck>,
    /// The sinks' own Redis servers `/readyz` PINGs too, as the last config reload left them.
    pub sink_redis: Arc<ArcSwap<Vec<RedisCheck>>>,
    /// The Pub/Sub channels and their states (none with a JSONL source).
    pub channels: Arc<std::sync::Mutex<Vec<Arc<ChannelStatus>>>>,
    /// The stores, rules and pipeline the operator's changes act on (the CLI's code, [`crate::app::admin`]).
    pub ops: Ops,
    /// This instance's name, as its leases and the console show it.
    pub instance: String,
    pub started: std::time::Instant,
    /// The routes' fire counts over the last minutes, for the console's rates.
    pub sparks: Arc<api::Sparks>,
}

/// The routes, every one behind [`access::guard`].
pub fn router(state: AppState, access: Arc<Access>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .route("/rules", get(rules))
        .route("/reload", post(reload))
        .merge(api::routes())
        .merge(ui::routes())
        .with_state(state)
        .layer(axum::extract::Extension(access.clone()))
        .layer(axum::middleware::from_fn_with_state(access, access::guard))
}

/// Ready when the config and rules are loaded (they are, or the process would not serve) and every
/// configured Redis answers PING within its command timeout; 503 with the reasons otherwise.
async fn readyz(State(state): State<AppState>) -> (axum::http::StatusCode, Json<Value>) {
    let sinks = state.sink_redis.load_full();
    let checks: Vec<&RedisCheck> = state.main_redis.iter().chain(sinks.iter()).collect();
    let pings = futures_util::future::join_all(checks.iter().map(|&check| async move {
        let result = check.ping().await;
        metrics::gauge!(m::REDIS_UP, "redis" => check.name.clone()).set(if result.is_ok() { 1.0 } else { 0.0 });
        (check, result)
    }))
    .await;
    let mut redis = serde_json::Map::new();
    let mut reasons = Vec::new();
    for (check, result) in pings {
        match result {
            Ok(()) => {
                redis.insert(check.name.clone(), json!({"url": check.url, "ok": true}));
            }
            Err(e) => {
                reasons.push(format!("Redis `{}` at {} is not reachable: {e}", check.name, check.url));
                redis.insert(check.name.clone(), json!({"url": check.url, "ok": false, "error": e}));
            }
        }
    }
    let rules = state.reloader.rules.load();
    let ready = reasons.is_empty();
    metrics::gauge!(m::READY).set(if ready { 1.0 } else { 0.0 });
    let body = json!({
        "status": if ready { "ready" } else { "not-ready" },
        "role": m::role(),
        "rules_version": rules.version,
        "redis": redis,
        "reason": if ready { Value::Null } else { Value::from(reasons.join("; ")) },
    });
    let code = if ready {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body))
}

/// The loaded rules: version, load time, files, routes with their counters, the last reload's outcome.
async fn rules(State(state): State<AppState>) -> Json<Value> {
    Json(state.reloader.describe())
}

#[derive(serde::Deserialize)]
struct JournalQuery {
    id: String,
    /// The entries as stored (with the masked event they were decided on), for `switchyard why` to word them.
    #[serde(default)]
    full: bool,
}

/// The history of a record id, event id or idempotency key, newest first, as `why --format json` prints it
/// (`&full=true`: as stored).
async fn journal(
    State(state): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<JournalQuery>,
) -> (axum::http::StatusCode, Json<Value>) {
    let Some(journal) = &state.ops.stores.journal else {
        return api::no_journal();
    };
    match journal.store.history(&q.id).await {
        Ok((entries, _)) if q.full => (
            axum::http::StatusCode::OK,
            Json(serde_json::to_value(&entries).unwrap_or_default()),
        ),
        Ok((entries, _)) => {
            let rules = state.ops.rules.load_full();
            let list: Vec<Value> = entries
                .iter()
                .map(|e| crate::delivery::journal::to_json(&rules, e))
                .collect();
            (axum::http::StatusCode::OK, Json(Value::Array(list)))
        }
        Err(e) => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": e.to_string()})),
        ),
    }
}

/// Every decision of this process from now on that the filter keeps (`?route=&channel=&outcome=&record=`, as
/// `switchyard tap` takes them), one server-sent event each (`data:` the entry as JSON, without the event and with
/// only the kept routes). A reader that falls behind loses the oldest and gets a `lagged` event saying how many.
async fn tap(
    State(state): State<AppState>,
    axum::extract::Query(filter): axum::extract::Query<TapFilter>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
    use tokio::sync::broadcast::error::RecvError;
    let Some(journal) = &state.ops.stores.journal else {
        return (
            axum::http::StatusCode::NOT_FOUND,
            "this config has `journal: { enabled: false }`\n",
        )
            .into_response();
    };
    let live = journal.live.subscribe();
    let stream = futures_util::stream::unfold((live, filter), |(mut live, filter)| async move {
        let event = loop {
            match live.recv().await {
                Ok(entry) => {
                    let Some(routes) = filter.keep(&entry) else {
                        continue;
                    };
                    let mut v = serde_json::to_value(&*entry).unwrap_or_default();
                    if let Some(obj) = v.as_object_mut() {
                        obj.remove("event");
                        obj.insert("routes".into(), serde_json::to_value(&routes).unwrap_or_default());
                    }
                    break SseEvent::default().data(v.to_string());
                }
                Err(RecvError::Lagged(n)) => break SseEvent::default().event("lagged").data(n.to_string()),
                Err(RecvError::Closed) => return None,
            }
        };
        Some((Ok::<_, std::convert::Infallible>(event), (live, filter)))
    });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

/// Reloads now and answers with the outcome (422 when the files have errors; the old rules keep running).
async fn reload(State(state): State<AppState>) -> (axum::http::StatusCode, Json<Value>) {
    let reloader = state.reloader.clone();
    let outcome = tokio::spawn(async move { reloader.reload().await }).await;
    match outcome {
        Ok(outcome) => {
            let code = if outcome.ok {
                axum::http::StatusCode::OK
            } else {
                axum::http::StatusCode::UNPROCESSABLE_ENTITY
            };
            (code, Json(serde_json::to_value(outcome).unwrap_or(Value::Null)))
        }
        Err(e) => (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"ok": false, "error": e.to_string()})),
        ),
    }
}

async fn healthz(State(state): State<AppState>) -> Json<Value> {
    let rules = state.reloader.rules.load();
    let channels: serde_json::Map<String, Value> = state
        .channels
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|c| {
            let state = match c.state() {
                ChannelState::Standby => json!("standby"),
                ChannelState::Connecting => json!("connecting"),
                ChannelState::Streaming => json!("streaming"),
                ChannelState::Backoff => json!("backoff"),
                ChannelState::Stopped(why) => json!({"stopped": why}),
            };
            (c.channel.clone(), state)
        })
        .collect();
    Json(json!({
        "status": "ok",
        "role": m::role(),
        "channels": channels,
        "rules_version": rules.version,
        "routes": rules.routes.len(),
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

async fn render_metrics(State(state): State<AppState>) -> String {
    state.metrics.render()
}

/// How long a client may take to send a request's headers, and how long a kept-alive connection may sit idle
/// between requests: a slow or silent client is closed instead of holding a socket and a task forever.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The most a request's head may take (request line and headers); hyper answers 431 past it.
const MAX_HEADERS: usize = 64 * 1024;

/// How long a stop waits for responses in flight (a `/api/tap` stream never finishes on its own).
const DRAIN: Duration = Duration::from_secs(2);

/// Binds `http.listen` and serves until `shutdown` turns true. Returns the bound address (port 0 picks one).
/// Refuses a bind that other machines reach when the config has no `http.token` (see [`Access::new`]).
pub async fn serve(
    http: &HttpConfig,
    state: AppState,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(&http.listen).await?;
    let addr = listener.local_addr()?;
    let access = Access::new(http, addr).map_err(|e| std::io::Error::new(std::io::ErrorKind::PermissionDenied, e))?;
    // The console's rates: a sample of in-memory counters every 10 s (no Redis), for as long as the listener runs.
    let sampler = {
        let (state, mut shutdown) = (state.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(api::SPARK_EVERY);
            loop {
                tokio::select! {
                    _ = every.tick() => state.sparks.sample(&state),
                    _ = stopped(&mut shutdown) => break,
                }
            }
        })
    };
    let app = router(state, Arc::new(access));
    // Its own accept loop rather than `axum::serve`, which sets no timer: without one hyper enforces no header
    // timeout, and a client that sends half a request holds its connection for good.
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEADERS);
    // Ends when the shutdown watch flips (or its sender is dropped); then gives open connections DRAIN to finish.
    let task = tokio::spawn(async move {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = stopped(&mut shutdown) => break,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, mostly: wait for connections to close rather than spin.
                    tracing::warn!(error = %e, "HTTP listener cannot accept a connection; retrying in 100 ms.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let app = app.clone();
            let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let mut req = req.map(axum::body::Body::new);
                req.extensions_mut().insert(axum::extract::ConnectInfo(peer));
                let mut app = app.clone();
                async move { tower_service::Service::call(&mut app, req).await }
            });
            let connection = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let connection = graceful.watch(connection);
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(%peer, error = %e, "HTTP connection ended with an error.");
                }
            });
        }
        drop(listener);
        sampler.abort();
        if tokio::time::timeout(DRAIN, graceful.shutdown()).await.is_err() {
            tracing::debug!("HTTP connections still open after the drain; closing them.");
        }
    });
    Ok((addr, task))
}

/// Resolves once the shutdown watch is true or its sender is gone.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    while !*shutdown.borrow() {
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}
