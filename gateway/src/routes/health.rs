//! `GET /healthz`.

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use crate::state::AppState;

/// Liveness: the process serves HTTP. Also says how many providers are connected.
pub async fn healthz(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "peer_id": state.net.local_peer_id().to_string(),
        "providers": state.registry.len(),
    }))
}
