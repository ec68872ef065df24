//! The HTTP listener: `/healthz` and `/metrics` (later issues add `/readyz`, `/rules`, `POST /reload`).

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::rules::RuleSet;

#[derive(Clone)]
struct AppState {
    rules: Arc<ArcSwap<RuleSet>>,
    metrics: PrometheusHandle,
}

pub fn router(rules: Arc<ArcSwap<RuleSet>>, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(render_metrics))
        .with_state(AppState { rules, metrics })
}

async fn healthz(State(state): State<AppState>) -> Json<Value> {
    let rules = state.rules.load();
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
    rules: Arc<ArcSwap<RuleSet>>,
    metrics: PrometheusHandle,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let app = router(rules, metrics);
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
