//! The proofmesh gateway: an OpenAI-compatible HTTP API in front of a libp2p mesh of llama.cpp
//! providers, checking that each answer came from the model it claims.
//!
//! A reader's path: `main.rs` (command line) → [`run`] → [`app`] (the routes) →
//! [`routes::chat`] for one request → [`inference`] (talking to a provider) and [`auditor`]
//! (everything verification: admission, referees, judging, the peer book).
//!
//! # Layout
//!
//! - [`routes`]: `POST /v1/chat/completions`, `GET /v1/models`, `GET /v1/audits/{id}`,
//!   `/healthz`, `/readyz`, `/metrics`.
//! - [`openapi`]: the OpenAPI document generated from those routes, and `/docs`.
//! - [`openai`]: OpenAI's wire types and the JSON extractor.
//! - [`error`]: [`error::ApiError`], rendered as OpenAI's error object.
//! - [`access`]: optional API keys (hashed in a 0600 file) and their rate limits.
//! - [`registry`]: providers known from the mesh, what they advertise and their load.
//! - [`catalog`]: model names the operator pinned to digests.
//! - [`inference`]: one generation over a `/proofmesh/generate/1` stream, bounded by what the
//!   request allows.
//! - [`failover`]: the one retry policy: which provider next, how many tries, the deadline,
//!   and the error when every try failed.
//! - [`ledger`]: what answers earn their providers, held while their audit window is open,
//!   forfeited and slashed on a proven fraud; providers' declared stakes.
//! - [`auditor`]: the one owner of verification. Built with the `local-referee` feature, the
//!   gateway can also re-execute answers with its own engine (and then links llama.cpp);
//!   without it, it links none.
//! - [`state`]: [`state::AppState`], shared by handlers.
//! - [`metrics`]: the Prometheus metrics; [`lifecycle`]: draining on shutdown;
//!   [`log_budget`]: a flood of failures logged as a few lines with counts.
//! - [`http`]: the HTTP server, with header and body deadlines and a connection cap.
//! - [`settings`]: the layered configuration behind the command line.

pub mod access;
pub mod auditor;
pub mod catalog;
pub mod error;
pub mod failover;
pub mod http;
pub mod inference;
pub mod ledger;
pub mod lifecycle;
pub mod log_budget;
pub mod metrics;
pub mod openai;
pub mod openapi;
pub mod registry;
pub mod routes;
pub mod settings;
pub mod state;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use proofmesh_shared::net::{self, Event, NetConfig, Role};
use proofmesh_shared::protocol::SignedStake;
use tokio::sync::{mpsc, oneshot};
use tower_http::trace::{DefaultOnFailure, TraceLayer};

use crate::auditor::{
    AuditPolicy, Auditor, AuditorConfig, Dialer, LocalReferee, VerificationMode, Vocabulary,
};
use crate::catalog::Catalog;
use crate::error::ApiError;
use crate::ledger::LedgerConfig;
use crate::lifecycle::Lifecycle;
use crate::metrics::{GatewayMetrics, RequestLabels};
use crate::openai::extract::MAX_BODY_BYTES;
use crate::registry::Registry;
use crate::state::AppState;

/// How long a stopping gateway waits for queued payments to be written.
const PAYMENTS_FLUSH: std::time::Duration = std::time::Duration::from_secs(10);

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
    /// A private mesh's pre-shared key: only nodes with the same key can connect.
    pub mesh_key: Option<proofmesh_shared::net::mesh_key::PreSharedKey>,
    /// NAT traversal: the relay service for NATed peers, announced addresses.
    pub traversal: proofmesh_shared::net::Traversal,
    /// The node key.
    pub keypair: Keypair,
    /// Mode for requests that name none.
    pub default_mode: VerificationMode,
    /// How long running requests may take to finish after SIGTERM.
    pub drain_timeout: std::time::Duration,
    /// How hard one request is tried: failovers and its deadline.
    pub retry: failover::RetryPolicy,
    /// Chat completions served at once.
    pub max_concurrent_requests: usize,
    /// Limits on the HTTP server's connections.
    pub http_limits: http::HttpLimits,
    /// API keys and which routes need one.
    pub access: access::Access,
    /// What answers must pass.
    pub policy: AuditPolicy,
    /// The gateway's own referee (built with the `local-referee` feature).
    #[cfg(feature = "local-referee")]
    pub referee: Option<auditor::local::EngineReferee>,
    /// Peers trusted as referees besides the gateway's own engine.
    pub trusted_referees: Vec<PeerId>,
    /// Model names pinned to digests.
    pub pins: Vec<(String, proofmesh_shared::protocol::ModelDigest)>,
    /// The peer book's file; `None` keeps it in memory (tests).
    pub book: Option<std::path::PathBuf>,
    /// Where fraud proofs of failed audits are written, if anywhere.
    pub evidence_dir: Option<std::path::PathBuf>,
    /// GGUF files whose vocabularies check answers' text (the referee model's is added).
    pub vocabularies: Vec<std::path::PathBuf>,
    /// Prices, and what a proven fraud costs.
    pub ledger: LedgerConfig,
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
    /// The peer book could not be opened.
    #[error(transparent)]
    Book(#[from] auditor::BookError),
    /// The gateway's own referee could not start.
    #[error("referee: {0}")]
    Referee(String),
    /// A vocabulary file could not be read.
    #[error("vocabulary: {0}")]
    Vocabulary(String),
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
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            access::authorize,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(http_span)
                // `error::ApiError` logs each 5xx it answers, within a budget; tower-http's
                // own ERROR line per failure would double them, without the budget.
                .on_failure(DefaultOnFailure::new().level(tracing::Level::DEBUG)),
        )
        .with_state(state)
}

/// The span of one HTTP request, continuing the client's W3C trace when it sent one.
fn http_span(request: &axum::http::Request<axum::body::Body>) -> tracing::Span {
    let span = tracing::info_span!(
        "http.request",
        method = %request.method(),
        path = %request.uri().path(),
        api_key = tracing::field::Empty,
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
        psk: config.mesh_key,
        traversal: config.traversal.clone(),
    })?;
    let net_task = tokio::spawn(event_loop.run());
    let registry = Registry::default();
    let hearing = Arc::new(std::sync::OnceLock::new());
    let registry_task = tokio::spawn(track_mesh(
        registry.clone(),
        Arc::clone(&hearing),
        client.clone(),
        events,
    ));
    let local = start_referee(&config).await?;
    let mut catalog = Catalog::new(config.pins.iter().cloned());
    catalog.pin_if_absent(
        catalog::DEFAULT_MODEL_NAME.to_string(),
        proofmesh_shared::protocol::ModelDigest::parse(catalog::DEFAULT_MODEL_DIGEST)
            .unwrap_or(proofmesh_shared::protocol::ModelDigest([0; 32])),
    );
    if let Some((name, local)) = &local {
        catalog.pin_if_absent(name.clone(), local.digest());
    }
    for (name, digest) in catalog.pins() {
        tracing::info!(%name, %digest, "model name pinned");
    }
    // The referee's model file was hashed when its engine started: not again here.
    let referee_file = referee_model(&config).zip(local.as_ref().map(|(_, l)| l.digest()));
    let files = config
        .vocabularies
        .iter()
        .map(|path| (path.clone(), None))
        .chain(referee_file.map(|(path, digest)| (path, Some(digest))))
        .collect();
    let vocabularies = load_vocabularies(files).await?;
    let metrics = Arc::new(GatewayMetrics::default());
    let auditor = Auditor::new(
        AuditorConfig {
            policy: config.policy.clone(),
            local: local.map(|(_, l)| l),
            trusted_referees: config.trusted_referees.clone(),
            book: config.book.clone(),
            evidence_dir: config.evidence_dir.clone(),
            vocabularies,
            ledger: config.ledger.clone(),
        },
        Dialer {
            net: client.clone(),
            keypair: config.keypair.clone(),
            streams: Default::default(),
        },
        registry.clone(),
        Arc::clone(&metrics),
    )?;
    tracing::info!(peers = auditor.book().len(), "peer book open");
    let (stop_payouts, payouts_stop) = oneshot::channel();
    let payouts = tokio::spawn(auditor.ledger().clone().pay_when_due(payouts_stop));
    let (payer, payments) = auditor.ledger().spawn_payer();
    let _ = hearing.set(auditor.clone());
    let state = AppState {
        registry,
        net: client.clone(),
        catalog: Arc::new(catalog),
        auditor,
        payer,
        default_mode: config.default_mode,
        metrics,
        lifecycle: Lifecycle::default(),
        started: std::time::Instant::now(),
        retry: config.retry,
        admission: Arc::new(tokio::sync::Semaphore::new(config.max_concurrent_requests)),
        access: config.access.clone(),
    };
    let lifecycle = state.lifecycle.clone();
    let listener = http::listen(config.http_listen)?;
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
    let serve = http::serve(listener, app(state), config.http_limits, async move {
        shutdown.await;
        draining.begin_drain(drain_timeout);
    });
    // Streams end themselves at the drain deadline; this bounds the rest (a client that never
    // reads its last bytes).
    let hard_stop = async {
        lifecycle.deadline().await;
        tokio::time::sleep(lifecycle::CLOSE_GRACE).await;
    };
    tokio::select! {
        () = serve => {}
        () = hard_stop => {
            tracing::warn!("connections still open after the drain deadline; closing them");
        }
    }
    registry_task.abort();
    net_task.abort();
    // The server and its state are gone: the payer's queue closes, and what it holds is
    // written before the gateway stops; the payouts stop, and the database is let go.
    let _ = stop_payouts.send(());
    let flushed = async {
        let _ = payouts.await;
        let _ = payments.await;
    };
    if tokio::time::timeout(PAYMENTS_FLUSH, flushed).await.is_err() {
        tracing::warn!("payments still queued at shutdown were not all written");
    }
    tracing::info!("gateway stopped");
    Ok(())
}

/// Starts the gateway's own referee, when configured: its model's name and the referee.
#[cfg(feature = "local-referee")]
async fn start_referee(
    config: &GatewayConfig,
) -> Result<Option<(String, Arc<dyn LocalReferee>)>, GatewayError> {
    let Some(local) = &config.referee else {
        return Ok(None);
    };
    let referee = local
        .start(&config.keypair)
        .await
        .map_err(GatewayError::Referee)?;
    Ok(Some((
        proofmesh_engine::model_file::model_name(&local.model),
        referee,
    )))
}

/// Without the `local-referee` feature the gateway has no engine of its own.
#[cfg(not(feature = "local-referee"))]
#[allow(clippy::unused_async)]
async fn start_referee(
    _config: &GatewayConfig,
) -> Result<Option<(String, Arc<dyn LocalReferee>)>, GatewayError> {
    Ok(None)
}

/// The model file of the gateway's own referee, if it has one.
#[cfg(feature = "local-referee")]
fn referee_model(config: &GatewayConfig) -> Option<std::path::PathBuf> {
    config.referee.as_ref().map(|r| r.model.clone())
}

/// Without the `local-referee` feature the gateway has no referee model.
#[cfg(not(feature = "local-referee"))]
fn referee_model(_config: &GatewayConfig) -> Option<std::path::PathBuf> {
    None
}

/// Reads each model file's vocabulary, hashing the file unless its digest is known already.
async fn load_vocabularies(
    files: Vec<(
        std::path::PathBuf,
        Option<proofmesh_shared::protocol::ModelDigest>,
    )>,
) -> Result<Vec<(proofmesh_shared::protocol::ModelDigest, Arc<Vocabulary>)>, GatewayError> {
    let mut loaded = Vec::new();
    for (path, known) in files {
        let shown = path.display().to_string();
        let read = tokio::task::spawn_blocking(move || {
            let digest = match known {
                Some(digest) => digest,
                None => {
                    proofmesh_shared::model_file::file_digest(&path).map_err(|e| e.to_string())?
                }
            };
            let vocabulary = Vocabulary::from_gguf(&path).map_err(|e| e.to_string())?;
            Ok::<_, String>((digest, vocabulary))
        })
        .await
        .map_err(|e| GatewayError::Vocabulary(e.to_string()))?
        .map_err(|e| GatewayError::Vocabulary(format!("{shown}: {e}")))?;
        tracing::info!(file = %shown, digest = %read.0, tokens = read.1.len(), "answers' text checked with this vocabulary");
        loaded.push((read.0, Arc::new(read.1)));
    }
    Ok(loaded)
}

/// Has the ledger check and record `peer`'s stake declaration, off the async workers.
fn take_declaration(auditor: &Auditor, peer: PeerId, stake: SignedStake) {
    let ledger = auditor.ledger().clone();
    tokio::task::spawn_blocking(move || {
        if let Err(e) = ledger.take_declaration(&peer, &stake) {
            tracing::error!(%peer, error = %e, "cannot write the ledger");
        }
    });
}

/// Fraud proofs checked at once; more heard meanwhile are dropped unchecked (nobody blamed).
const PROOF_CHECKS: usize = 2;

/// Keeps the registry in step with the mesh, and has the auditor (once it exists) check the
/// fraud proofs other gateways publish.
async fn track_mesh(
    registry: Registry,
    auditor: Arc<std::sync::OnceLock<Auditor>>,
    client: net::Client,
    mut events: mpsc::Receiver<Event>,
) {
    let checks = Arc::new(tokio::sync::Semaphore::new(PROOF_CHECKS));
    // The last stake declaration seen of each connected provider: an unchanged one (each
    // capabilities refresh repeats it) is not checked again.
    let mut declared: std::collections::HashMap<PeerId, u64> = Default::default();
    // Declarations of providers met while the gateway still starts (its bootstrap peers dialled
    // before the auditor exists), taken once it does.
    let mut early: std::collections::HashMap<PeerId, SignedStake> = Default::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let event = tokio::select! {
            event = events.recv() => match event {
                Some(event) => event,
                None => return,
            },
            _ = tick.tick(), if !early.is_empty() => {
                if let Some(auditor) = auditor.get() {
                    for (peer, stake) in early.drain() {
                        declared.insert(peer, stake.declaration.declared_ms);
                        take_declaration(auditor, peer, stake);
                    }
                }
                continue;
            }
        };
        match event {
            Event::ProviderUp { peer, capabilities } => {
                match (capabilities.stake, auditor.get()) {
                    (Some(stake), None) => {
                        early.insert(peer, stake);
                    }
                    (Some(stake), Some(auditor)) => {
                        let at = stake.declaration.declared_ms;
                        if declared.insert(peer, at) != Some(at) {
                            take_declaration(auditor, peer, stake);
                        }
                    }
                    (None, _) => {}
                }
                registry.upsert(peer, capabilities.models);
            }
            Event::ProviderLeaving { peer } | Event::PeerGone { peer } => {
                declared.remove(&peer);
                early.remove(&peer);
                registry.remove(&peer);
            }
            // Gateways keep no leaves; dropping the channel tells the asker so.
            Event::OpenLeaves { .. } => {}
            Event::FraudProof { source, id, proof } => {
                let (Some(auditor), Ok(permit)) = (
                    auditor.get().cloned(),
                    Arc::clone(&checks).try_acquire_owned(),
                ) else {
                    let _ = client
                        .judge_proof(id, source, net::gossip::ProofVerdict::Unchecked)
                        .await;
                    continue;
                };
                let client = client.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    let verdict = auditor.hear_proof(source, &proof).await;
                    let _ = client.judge_proof(id, source, verdict).await;
                });
            }
        }
    }
}
