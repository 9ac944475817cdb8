//! `GET /healthz` (liveness) and `GET /readyz` (readiness).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;
use utoipa::ToSchema;

use crate::state::AppState;

/// What the health endpoints report.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok` (liveness), `ready`, `no_providers` or `draining`.
    pub status: &'static str,
    /// This gateway's libp2p peer id.
    pub peer_id: String,
    /// Providers in the routing table.
    pub providers: usize,
}

fn health(state: &AppState, status: &'static str) -> Json<Health> {
    Json(Health {
        status,
        peer_id: state.net.local_peer_id().to_string(),
        providers: state.registry.len(),
    })
}

/// Liveness: the process serves HTTP.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "The gateway is alive", body = Health)))]
pub async fn healthz(State(state): State<AppState>) -> Json<Health> {
    health(&state, "ok")
}

/// Readiness: at least one provider serves a model and the gateway is not draining.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready to serve completions", body = Health),
        (status = 503, description = "No provider yet, or shutting down", body = Health),
    ))]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Health>) {
    if state.lifecycle.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, health(&state, "draining"))
    } else if state.registry.is_empty() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            health(&state, "no_providers"),
        )
    } else {
        (StatusCode::OK, health(&state, "ready"))
    }
}
