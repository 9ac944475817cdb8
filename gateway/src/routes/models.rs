//! `GET /v1/models`.

use axum::Json;
use axum::extract::State;

use crate::openai::response::{ModelList, ModelMeshInfo, ModelObject};
use crate::state::AppState;

/// The models the mesh serves right now, with their digests and provider counts.
#[utoipa::path(get, path = "/v1/models", tag = "models",
    responses(
        (status = 200, description = "Models served by at least one connected provider", body = ModelList),
        (status = 401, description = "`invalid_api_key`: the gateway requires API keys for this route (`public_models = false`)", body = crate::error::ErrorBody),
    ))]
pub async fn list(State(state): State<AppState>) -> Json<ModelList> {
    let mut data = Vec::new();
    for m in state.registry.models() {
        // A model is listed under each name the operator pinned to its digest, and always
        // under the digest itself (which needs no pin).
        let mut ids: Vec<String> = state
            .catalog
            .names_of(&m.card.digest)
            .into_iter()
            .map(String::from)
            .collect();
        ids.push(m.card.digest.to_string());
        for id in ids {
            data.push(ModelObject {
                id,
                object: "model",
                created: m.first_seen,
                owned_by: "proofmesh",
                proofmesh: ModelMeshInfo {
                    digest: m.card.digest.to_string(),
                    quantization: m.card.quantization.clone(),
                    providers: m.providers,
                    context_size: m.context_size,
                    devices: m.devices.clone(),
                },
            });
        }
    }
    Json(ModelList {
        object: "list",
        data,
    })
}
