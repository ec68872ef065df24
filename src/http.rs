//! The HTTP listener: `/healthz` and `/metrics` (later issues add `/readyz`, `/rules`, `POST /reload`).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::reload::Reloader;

#[derive(Clone)]
struct AppState {
    reloader: Arc<Reloader>,
    metrics: PrometheusHandle,
}

pub fn router(reloader: Arc<Reloader>, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(render_metrics))
        .route("/rules", get(rules))
        .route("/reload", post(reload))
        .with_state(AppState { reloader, metrics })
}

/// The loaded rules: version, load time, files, routes with their counters, the last reload's outcome.
async fn rules(State(state): State<AppState>) -> Json<Value> {
    Json(state.reloader.describe())
}

/// Reloads now and answers with the outcome (422 when the files have errors; the old rules keep running).
async fn reload(State(state): State<AppState>) -> (axum::http::StatusCode, Json<Value>) {
    let reloader = state.reloader.clone();
    let outcome = tokio::task::spawn_blocking(move || reloader.reload()).await;
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
    Json(json!({
        "status": "ok",
        "role": "active",
        "rules_version": rules.version,
        "routes": rules.routes.len(),
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

async fn render_metrics(State(state): State<AppState>) -> String {
    state.metrics.render()
}

/// Binds `listen` and serves until `shutdown` turns true. Returns the bound address (port 0 picks one).
pub async fn serve(
    listen: &str,
    reloader: Arc<Reloader>,
    metrics: PrometheusHandle,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let app = router(reloader, metrics);
    // Shuts down when the shutdown watch flips (or its sender is dropped).
    let task = tokio::spawn(async move {
        let stop = async move {
            while !*shutdown.borrow() {
                if shutdown.changed().await.is_err() {
                    break;
                }
            }
        };
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop).await {
            tracing::error!(error = %e, "HTTP listener failed.");
        }
    });
    Ok((addr, task))
}
