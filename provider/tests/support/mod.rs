//! What the raw-protocol tests share: a real provider on loopback (real model, real swarm) and a
//! bare gateway-role client that opens streams to it.

#![allow(dead_code, unreachable_pub)]

use std::time::{Duration, Instant};

use libp2p::identity::Keypair;
use libp2p::{PeerId, StreamProtocol};
use proofmesh_provider::engine::EngineConfig;
use proofmesh_provider::{ProviderConfig, Tamper};
use proofmesh_shared::net::{self, Client, NetConfig, Role};
use proofmesh_shared::protocol::{
    ChatMessage, GenerateRequest, ModelDigest, RequestId, read_frame,
};
use proofmesh_shared::sampling::SamplerParams;
use tokio::sync::oneshot;

/// A small engine on the default model (fetched when missing): 256-token context, one sequence.
pub async fn small_engine() -> EngineConfig {
    let model = proofmesh_provider::fetch::default_model_path();
    if !model.is_file() {
        proofmesh_provider::fetch::fetch_default_model(
            &proofmesh_provider::fetch::default_model_dir(),
            None,
        )
        .await
        .expect("fetching the default model");
    }
    let mut engine = EngineConfig::new(model);
    engine.context_size = 256;
    engine.parallel = 1;
    engine.batch_size = 128;
    engine
}

/// Starts a provider with `engine` that referees at most `referee_rate_per_minute` jobs per
/// asker; dropping the returned sender stops it.
pub async fn provider(
    engine: EngineConfig,
    referee_rate_per_minute: u32,
) -> (proofmesh_provider::Started, oneshot::Sender<()>) {
    provider_for(engine, referee_rate_per_minute, Vec::new()).await
}

/// Like [`provider`], refereeing for the gateways `referee_for`.
pub async fn provider_for(
    engine: EngineConfig,
    referee_rate_per_minute: u32,
    referee_for: Vec<PeerId>,
) -> (proofmesh_provider::Started, oneshot::Sender<()>) {
    start(config(engine, referee_rate_per_minute, referee_for)).await
}

/// The configuration [`provider_for`] starts, to change before [`start`].
pub fn config(
    engine: EngineConfig,
    referee_rate_per_minute: u32,
    referee_for: Vec<PeerId>,
) -> ProviderConfig {
    ProviderConfig {
        engine,
        model_name: None,
        keypair: Keypair::generate_secp256k1(),
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        bootstrap: vec![],
        mdns: false,
        mesh_key: None,
        traversal: Default::default(),
        serve_gateways: Vec::new(),
        leaf_store_bytes: 1 << 20,
        http_listen: None,
        drain_timeout: Duration::from_secs(5),
        referee_rate_per_minute,
        referee_for,
        referee_slots_per_gateway: 0,
        tamper: Tamper::None,
        tamper_model: None,
        claim_digest: None,
        claim_numerics: None,
        stake: 0,
    }
}

/// Starts a provider with `config`; dropping the returned sender stops it.
pub async fn start(config: ProviderConfig) -> (proofmesh_provider::Started, oneshot::Sender<()>) {
    let (tx, rx) = oneshot::channel();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        proofmesh_provider::run(
            config,
            async move {
                let _ = stopped.await;
            },
            Some(tx),
        )
        .await
        .unwrap();
    });
    (rx.await.unwrap(), stop)
}

/// A gateway-role swarm on loopback that dials `bootstrap`.
pub fn client(bootstrap: Vec<libp2p::Multiaddr>) -> Client {
    client_with(Keypair::generate_secp256k1(), bootstrap)
}

/// A gateway-role swarm with the node key `keypair`.
pub fn client_with(keypair: Keypair, bootstrap: Vec<libp2p::Multiaddr>) -> Client {
    let (client, _events, event_loop) = net::new(NetConfig {
        keypair,
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        bootstrap,
        mdns: false,
        role: Role::Gateway,
        psk: None,
        traversal: Default::default(),
    })
    .unwrap();
    tokio::spawn(event_loop.run());
    client
}

/// Opens a `protocol` stream to `peer`, retrying for up to 20 s while the connection comes up.
pub async fn open(client: &Client, peer: PeerId, protocol: StreamProtocol) -> libp2p::Stream {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // libp2p-stream waits forever when asked while the first connection is being set up
        // (it records the connection after handing out its channel), so each try is bounded.
        let opened = tokio::time::timeout(
            Duration::from_secs(2),
            client.stream_control().open_stream(peer, protocol.clone()),
        )
        .await;
        match opened {
            Ok(Ok(stream)) => return stream,
            _ if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(Err(e)) => panic!("cannot open a stream: {e}"),
            Err(_) => panic!("cannot open a stream: timed out"),
        }
    }
}

/// A greedy "Say hi." request for `digest`.
pub fn greedy_request(digest: ModelDigest, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        version: GenerateRequest::VERSION,
        request_id: RequestId::random(),
        model_digest: digest,
        messages: vec![ChatMessage {
            role: "user".into(),
            content: "Say hi.".into(),
        }],
        sampler: SamplerParams {
            temperature: 0.0,
            ..Default::default()
        },
        max_tokens,
        stop: vec![],
        trace: None,
        stream_leaves: false,
        tools: None,
        constraint: None,
        prompt: None,
    }
}

/// The next frame on `stream` (at most `max` bytes), within `secs` seconds; panics otherwise.
pub async fn next_frame<T: serde::de::DeserializeOwned>(
    stream: &mut libp2p::Stream,
    max: usize,
    secs: u64,
) -> T {
    tokio::time::timeout(Duration::from_secs(secs), read_frame(stream, max))
        .await
        .unwrap_or_else(|_| panic!("no frame within {secs} s"))
        .expect("a readable frame")
}
