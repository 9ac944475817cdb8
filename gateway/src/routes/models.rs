//! `GET /v1/models`.

use axum::Json;
use axum::extract::State;

use crate::openai::response::{ModelList, ModelMeshInfo, ModelObject};
use crate::state::AppState;

/// The models the mesh serves right now, with their digests and provider counts.
#[utoipa::path(get, path = "/v1/models", tag = "models",
    responses((status = 200, description = "Models served by at least one connected provider", body = ModelList)))]
pub async fn list(State(state): State<AppState>) -> Json<ModelList> {
    let data = state
        .registry
        .models()
        .into_iter()
        .map(|m| ModelObject {
            id: m.name,
            object: "model",
            created: m.first_seen,
            owned_by: "proofmesh",
            proofmesh: ModelMeshInfo {
                digest: m.card.digest.to_string(),
                quantization: m.card.quantization,
                providers: m.providers,
                context_size: m.context_size,
                devices: m.devices,
            },
        })
        .collect();
    Json(ModelList {
        object: "list",
        data,
    })
}
