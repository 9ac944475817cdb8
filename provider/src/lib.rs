//! A proofmesh provider: runs a GGUF model with llama.cpp and serves signed, Merkle-committed
//! completions to gateways over libp2p.
//!
//! A reader's path: `main.rs` (command line) → [`run`] → [`service`](crate) for what happens to
//! one request → [`engine`] for the llama.cpp side.
//!
//! # Layout
//!
//! - [`engine`]: the engine thread that owns the llama.cpp context and batches sequences.
//! - `service`: generate streams (request → tokens → signed commitment) and leaf openings.
//! - [`leaf_store`]: leaves kept, within a memory bound, for challenges.
//! - `stop`: UTF-8 assembly and stop sequences.
//! - [`model_file`]: digest, name and quantization of a GGUF file.
//! - [`fetch`]: `fetch-model`, the default model from its PyPI wheel.
//! - [`tamper`]: test-only misbehaviour for the gateway's audit tests.

pub mod engine;
pub mod fetch;
pub mod leaf_store;
pub mod model_file;
mod service;
mod stop;
pub mod tamper;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use libp2p::Multiaddr;
use libp2p::identity::Keypair;
use proofmesh_shared::net::{self, NetConfig, Role};
use proofmesh_shared::protocol::{Capabilities, GenerateRequest, ModelCard, ModelDigest};
use tokio::sync::oneshot;

use crate::engine::{Engine, EngineConfig};
use crate::leaf_store::LeafStore;
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
    /// Bound on leaves kept for challenges, in bytes.
    pub leaf_store_bytes: usize,
    #[doc(hidden)]
    pub tamper: Tamper,
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
    let engine = tokio::task::spawn_blocking(move || Engine::start(&engine_config))
        .await
        .map_err(|_| engine::EngineError::Stopped)??;
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
        }),
    })?;
    let net_task = tokio::spawn(event_loop.run());
    let service = Arc::new(Service {
        engine,
        keypair: config.keypair.clone(),
        digest,
        leaves: LeafStore::new(config.leaf_store_bytes),
        tamper: config.tamper,
    });
    let accept_task = tokio::spawn(Arc::clone(&service).accept_streams(client.clone()));
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
        });
    }
    shutdown.await;
    tracing::info!("provider shutting down");
    accept_task.abort();
    events_task.abort();
    drop(client);
    drop(service);
    net_task.abort();
    Ok(())
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
    }
}
