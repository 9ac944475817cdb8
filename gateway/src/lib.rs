//! The proofmesh gateway: an OpenAI-compatible HTTP API in front of a libp2p mesh of llama.cpp
//! providers, checking that each answer came from the model it claims.
//!
//! A reader's path: `main.rs` (command line) → [`run`] → [`app`] (the routes) →
//! [`routes::chat`] for one request → [`inference`] (talking to a provider) and [`audit`]
//! (checking its commitment).
//!
//! # Layout
//!
//! - [`routes`]: `POST /v1/chat/completions`, `GET /v1/models`, `GET /healthz`.
//! - [`openai`]: OpenAI's wire types and the JSON extractor.
//! - [`error`]: [`error::ApiError`], rendered as OpenAI's error object.
//! - [`registry`]: providers known from the mesh, their models and load.
//! - [`inference`]: one generation over a `/proofmesh/generate/1` stream, with failover.
//! - [`audit`]: signature, commitment binding and Merkle challenges.
//! - [`state`]: [`state::AppState`], shared by handlers.

pub mod audit;
pub mod error;
pub mod inference;
pub mod openai;
pub mod registry;
pub mod routes;
pub mod state;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use proofmesh_shared::net::{self, Event, NetConfig, Role};
use tokio::sync::{mpsc, oneshot};
use tower_http::trace::TraceLayer;

use crate::error::ApiError;
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
}

/// The HTTP application.
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(routes::chat::completions))
        .route("/v1/models", get(routes::models::list))
        .route("/healthz", get(routes::health::healthz))
        .fallback(|uri: axum::http::Uri| async move { ApiError::route_not_found(uri.path()) })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
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
    let state = AppState {
        registry,
        net: client.clone(),
        audit_secret: Arc::new(rand::random()),
        challenge_count: config.challenge_count.max(1),
        default_mode: config.default_mode,
        failed_audit_cooldown: config.failed_audit_cooldown,
    };
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
    let served = axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown)
        .await;
    registry_task.abort();
    net_task.abort();
    tracing::info!("gateway stopped");
    Ok(served?)
}

/// Keeps the registry in step with the mesh.
async fn track_providers(registry: Registry, mut events: mpsc::Receiver<Event>) {
    while let Some(event) = events.recv().await {
        match event {
            Event::ProviderUp { peer, capabilities } => registry.upsert(peer, capabilities.models),
            Event::PeerGone { peer } => registry.remove(&peer),
            // Gateways keep no leaves; dropping the channel tells the asker so.
            Event::OpenLeaves { .. } => {}
        }
    }
}
