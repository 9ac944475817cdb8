//! The proofmesh gateway: an OpenAI-compatible HTTP API in front of a libp2p mesh of llama.cpp
//! providers, checking that each answer came from the model it claims.
//!
//! A reader's path: `main.rs` (command line) → [`run`] → [`app`] (the routes) →
//! [`routes::chat`] for one request → [`inference`] (talking to a provider) and [`audit`]
//! (checking its commitment).
//!
//! # Layout
//!
//! - [`routes`]: `POST /v1/chat/completions`, `GET /v1/models`, `/healthz`, `/readyz`,
//!   `/metrics`.
//! - [`openapi`]: the OpenAPI document generated from those routes, and `/docs`.
//! - [`openai`]: OpenAI's wire types and the JSON extractor.
//! - [`error`]: [`error::ApiError`], rendered as OpenAI's error object.
//! - [`registry`]: providers known from the mesh, their models and load.
//! - [`inference`]: one generation over a `/proofmesh/generate/1` stream, with failover.
//! - [`referee`]: choosing a referee and following an answer with it as it streams.
//! - [`audit`]: both layers of the audit rule, referee fallbacks, reputation, fraud proofs.
//! - [`state`]: [`state::AppState`], shared by handlers.
//! - [`metrics`]: the Prometheus metrics; [`lifecycle`]: draining on shutdown.
//! - [`settings`]: the layered configuration behind the command line.

pub mod audit;
pub mod error;
pub mod inference;
pub mod lifecycle;
pub mod metrics;
pub mod openai;
pub mod openapi;
pub mod referee;
pub mod registry;
pub mod routes;
pub mod settings;
pub mod state;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use proofmesh_shared::net::{self, Event, NetConfig, Role};
use tokio::sync::{mpsc, oneshot};
use tower_http::trace::TraceLayer;

use crate::error::ApiError;
use crate::lifecycle::Lifecycle;
use crate::metrics::{GatewayMetrics, RequestLabels};
use crate::openai::extract::MAX_BODY_BYTES;
use crate::openai::request::VerificationMode;
use crate::registry::Registry;
use crate::state::AppState;

/// Everything a gateway needs to start.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// HTTP listen address.
    pub http_listen: SocketAddr,
    /// Mesh listen addresses.
    pub p2p_listen: Vec<Multiaddr>,
    /// Peers to dial at start.
    pub bootstrap: Vec<Multiaddr>,
    /// Whether to run mDNS discovery.
    pub mdns: bool,
    /// The node key.
    pub keypair: Keypair,
    /// Steps challenged per merkle audit.
    pub challenge_count: usize,
    /// Mode for requests that name none.
    pub default_mode: VerificationMode,
    /// How long a provider whose answer failed an audit is kept out of routing.
    pub failed_audit_cooldown: std::time::Duration,
    /// How long running requests may take to finish after SIGTERM.
    pub drain_timeout: std::time::Duration,
    /// The gateway's own referee, if it has the model file.
    pub referee: Option<LocalReferee>,
    /// Audits a provider must pass before it is challenged at the normal rate.
    pub probation_audits: u32,
    /// Which audit tiers merkle answers may be judged in.
    pub audit_tiers: referee::AuditTiers,
    /// Where fraud proofs of failed audits are written, if anywhere.
    pub evidence_dir: Option<std::path::PathBuf>,
}

/// How the gateway runs its own referee.
#[derive(Debug, Clone)]
pub struct LocalReferee {
    /// The GGUF file (the same one providers serve).
    pub model: std::path::PathBuf,
    /// CPU threads.
    pub threads: u32,
    /// Answers re-executed at once.
    pub slots: u32,
    /// Context per answer, in tokens.
    pub context_size: u32,
}

/// What a running gateway reports once it is up.
#[derive(Debug, Clone)]
pub struct Started {
    /// The HTTP address actually bound.
    pub http_addr: SocketAddr,
    /// Its peer id.
    pub peer_id: PeerId,
    /// Its mesh addresses (with `/p2p/<peer id>`), for providers' `--bootstrap`.
    pub p2p_addrs: Vec<Multiaddr>,
}

/// Failures starting the gateway.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// The HTTP listener failed.
    #[error("http server: {0}")]
    Http(#[from] std::io::Error),
    /// The mesh failed to start.
    #[error(transparent)]
    Net(#[from] net::NetError),
    /// The gateway's own referee could not start.
    #[error("referee: {0}")]
    Referee(String),
}

/// The HTTP application: the documented API routes, `/openapi.json` and the offline API
/// reference at `/docs`.
pub fn app(state: AppState) -> Router {
    let (api, doc) = openapi::api_router().split_for_parts();
    let api = api.route_layer(axum::middleware::from_fn_with_state(
        state.clone(),
        count_requests,
    ));
    Router::new()
        .merge(api)
        .merge(utoipa_swagger_ui::SwaggerUi::new("/docs").url("/openapi.json", doc))
        .fallback(|uri: axum::http::Uri| async move { ApiError::route_not_found(uri.path()) })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(TraceLayer::new_for_http().make_span_with(http_span))
        .with_state(state)
}

/// The span of one HTTP request, continuing the client's W3C trace when it sent one.
fn http_span(request: &axum::http::Request<axum::body::Body>) -> tracing::Span {
    let span = tracing::info_span!(
        "http.request",
        method = %request.method(),
        path = %request.uri().path(),
    );
    proofmesh_shared::telemetry::set_parent_from_headers(&span, request.headers());
    span
}

/// Counts chat completions by verification mode and status (the handler leaves the mode on the
/// response), and the ones in flight.
async fn count_requests(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if request.uri().path() != "/v1/chat/completions" {
        return next.run(request).await;
    }
    state.metrics.requests_in_flight.inc();
    let response = next.run(request).await;
    state.metrics.requests_in_flight.dec();
    let mode = response
        .extensions()
        .get::<routes::chat::ModeLabel>()
        .map_or("invalid", |m| m.0);
    state
        .metrics
        .requests
        .get_or_create(&RequestLabels {
            mode,
            status: response.status().as_u16(),
        })
        .inc();
    response
}

/// Starts the mesh side and the HTTP server; serves until `shutdown` resolves.
pub async fn run(
    config: GatewayConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    started: Option<oneshot::Sender<Started>>,
) -> Result<(), GatewayError> {
    let (client, events, event_loop) = net::new(NetConfig {
        keypair: config.keypair.clone(),
        listen: config.p2p_listen.clone(),
        bootstrap: config.bootstrap.clone(),
        mdns: config.mdns,
        role: Role::Gateway,
    })?;
    let net_task = tokio::spawn(event_loop.run());
    let registry = Registry::default();
    let registry_task = tokio::spawn(track_providers(registry.clone(), events));
    let local_referee = match &config.referee {
        Some(local) => Some(start_referee(local, &config.keypair).await?),
        None => None,
    };
    let state = AppState {
        registry,
        net: client.clone(),
        audit_secret: Arc::new(rand::random()),
        challenge_count: config.challenge_count.max(1),
        probation_audits: config.probation_audits,
        audit_tiers: config.audit_tiers,
        local_referee,
        evidence_dir: config.evidence_dir.clone(),
        default_mode: config.default_mode,
        failed_audit_cooldown: config.failed_audit_cooldown,
        metrics: Arc::new(GatewayMetrics::default()),
        lifecycle: Lifecycle::default(),
        started: std::time::Instant::now(),
    };
    let lifecycle = state.lifecycle.clone();
    let listener = tokio::net::TcpListener::bind(config.http_listen).await?;
    let http_addr = listener.local_addr()?;
    let p2p_addrs = client.wait_listen_addrs().await?;
    tracing::info!(%http_addr, peer = %client.local_peer_id(), "gateway listening");
    for addr in &p2p_addrs {
        tracing::info!(%addr, "providers can bootstrap from");
    }
    if let Some(started) = started {
        let _ = started.send(Started {
            http_addr,
            peer_id: client.local_peer_id(),
            p2p_addrs,
        });
    }
    drop(client);
    let drain_timeout = config.drain_timeout;
    let draining = lifecycle.clone();
    let serve = axum::serve(listener, app(state)).with_graceful_shutdown(async move {
        shutdown.await;
        draining.begin_drain(drain_timeout);
    });
    // Streams end themselves at the drain deadline; this bounds the rest (a client that never
    // reads its last bytes).
    let hard_stop = async {
        lifecycle.deadline().await;
        tokio::time::sleep(lifecycle::CLOSE_GRACE).await;
    };
    let served = tokio::select! {
        served = serve => served,
        () = hard_stop => {
            tracing::warn!("connections still open after the drain deadline; closing them");
            Ok(())
        }
    };
    registry_task.abort();
    net_task.abort();
    tracing::info!("gateway stopped");
    Ok(served?)
}

/// Loads the model file and starts the engine of the gateway's own referee.
async fn start_referee(
    local: &LocalReferee,
    keypair: &Keypair,
) -> Result<proofmesh_provider::referee::Referee, GatewayError> {
    let path = local.model.clone();
    tracing::info!(model = %path.display(), "hashing the referee's model file");
    let digest =
        tokio::task::spawn_blocking(move || proofmesh_provider::model_file::file_digest(&path))
            .await
            .map_err(|e| GatewayError::Referee(e.to_string()))?
            .map_err(|e| GatewayError::Referee(format!("{}: {e}", local.model.display())))?;
    let mut engine = proofmesh_provider::engine::EngineConfig::new(local.model.clone());
    engine.threads = local.threads;
    engine.context_size = local.context_size;
    engine.parallel = 1;
    engine.batch_size = 64;
    engine.referee_slots = local.slots;
    let engine =
        tokio::task::spawn_blocking(move || proofmesh_provider::engine::Engine::start(&engine))
            .await
            .map_err(|e| GatewayError::Referee(e.to_string()))?
            .map_err(|e| GatewayError::Referee(e.to_string()))?;
    tracing::info!(%digest, numerics = %engine.info().numerics, slots = local.slots, "the gateway referees answers itself");
    Ok(proofmesh_provider::referee::Referee::new(
        engine,
        keypair.clone(),
        digest,
        u32::MAX,
    ))
}

/// Keeps the registry in step with the mesh.
async fn track_providers(registry: Registry, mut events: mpsc::Receiver<Event>) {
    while let Some(event) = events.recv().await {
        match event {
            Event::ProviderUp { peer, capabilities } => registry.upsert(peer, capabilities.models),
            Event::ProviderLeaving { peer } | Event::PeerGone { peer } => registry.remove(&peer),
            // Gateways keep no leaves; dropping the channel tells the asker so.
            Event::OpenLeaves { .. } => {}
        }
    }
}
