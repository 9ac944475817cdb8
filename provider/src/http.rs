//! The provider's small operations server: `/metrics`, `/healthz`, `/readyz` (on `http_listen`,
//! off unless configured). Clients never talk HTTP to a provider; gateways use the mesh.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use proofmesh_shared::net::Client;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::engine::Engine;
use crate::metrics::ProviderMetrics;

/// What the handlers read.
#[derive(Debug, Clone)]
pub(crate) struct OpsState {
    pub(crate) metrics: Arc<ProviderMetrics>,
    pub(crate) engine: Engine,
    pub(crate) net: Client,
    pub(crate) draining: CancellationToken,
}

pub(crate) fn router(state: OpsState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(state): State<OpsState>) -> Response {
    let m = &state.metrics;
    let load = state.engine.load();
    m.requests_deferred
        .set(load.waiting.load(Ordering::Relaxed) as i64);
    m.busy_slots
        .set(load.busy_slots.load(Ordering::Relaxed) as i64);
    m.prompt_tokens_cached
        .set(load.cached_prompt_tokens.load(Ordering::Relaxed) as i64);
    if let Ok(peers) = state.net.connected_peers().await {
        m.peers_connected.set(peers.len() as i64);
    }
    proofmesh_shared::metrics::response(m.registry()).into_response()
}

async fn healthz(State(state): State<OpsState>) -> Response {
    axum::Json(json!({
        "status": "ok",
        "peer_id": state.net.local_peer_id().to_string(),
    }))
    .into_response()
}

/// Ready while the model is loaded (it is, once this server runs) and not draining.
async fn readyz(State(state): State<OpsState>) -> Response {
    let (status, word) = if state.draining.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else {
        (StatusCode::OK, "ready")
    };
    let peers = state.net.connected_peers().await.map_or(0, |p| p.len());
    (
        status,
        axum::Json(json!({
            "status": word,
            "peer_id": state.net.local_peer_id().to_string(),
            "peers": peers,
        })),
    )
        .into_response()
}
