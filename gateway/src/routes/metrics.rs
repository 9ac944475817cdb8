//! `GET /metrics`: Prometheus metrics in OpenMetrics text format.

use axum::extract::State;
use axum::response::{IntoResponse, Response};

use crate::state::AppState;

/// The gateway's metrics; gauges that mirror the mesh are refreshed on each scrape.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus metrics (OpenMetrics text)",
        content_type = "application/openmetrics-text", body = String)))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    let m = &state.metrics;
    if let Ok(peers) = state.net.connected_peers().await {
        m.peers_connected.set(peers.len() as i64);
    }
    m.providers.set(state.registry.len() as i64);
    m.uptime_seconds.set(state.started.elapsed().as_secs_f64());
    proofmesh_shared::metrics::response(m.registry()).into_response()
}
