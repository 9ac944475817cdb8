//! The gateway's OpenAPI 3.1 document, generated from the handlers and types with utoipa.
//!
//! Served at `/openapi.json` with an offline API reference at `/docs` (Swagger UI, vendored into
//! the binary), printed by `proofmesh-gateway openapi`, and committed as `openapi/openapi.json`;
//! a test fails when the committed file differs from what this code generates.

use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::routes::{audits, chat, health, metrics, models, providers};
use crate::state::AppState;

/// Document metadata; paths and schemas are collected from the routes in [`api_router`].
#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "proofmesh gateway",
        description = "OpenAI-compatible chat completions served by a peer-to-peer mesh of \
llama.cpp providers, with each answer verified against the model it claims.\n\n\
Point an OpenAI SDK's `base_url` at `http://<gateway>/v1`. proofmesh adds the optional \
`verification_mode` request field, the `proofmesh` object in responses and the \
`x-proofmesh-*` response headers. Errors use OpenAI's error object.",
        license(name = "MIT OR Apache-2.0"),
    ),
    tags(
        (name = "chat", description = "OpenAI chat completions, and legacy text completions"),
        (name = "models", description = "Models the mesh serves"),
        (name = "audits", description = "Verdicts on answers released before their audit (`verification_mode: fraud`)"),
        (name = "providers", description = "The providers this gateway knows: models, stake, payments, reputation, latency and load"),
        (name = "operations", description = "Health, readiness and metrics"),
    ),
    components(schemas(
        crate::openai::response::ChatCompletionChunk,
        crate::openai::legacy::TextCompletion
    ))
)]
pub struct ApiDoc;

/// The documented routes, ready to be split into an axum router and the document.
pub fn api_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(chat::completions))
        .routes(routes!(chat::text_completions))
        .routes(routes!(models::list))
        .routes(routes!(audits::get))
        .routes(routes!(providers::list))
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(metrics::metrics))
}

/// The OpenAPI document as pretty JSON with a trailing newline (the committed file's form).
pub fn document_json() -> String {
    let (_, doc) = api_router().split_for_parts();
    let mut json = doc
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    json.push('\n');
    json
}
