//! A real provider (real model, real swarm on loopback) fed malformed and hostile requests over
//! its generate stream: each gets a clear error frame, and the provider keeps serving.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use futures::AsyncWriteExt;
use libp2p::PeerId;
use proofmesh_provider::engine::EngineConfig;
use proofmesh_provider::{ProviderConfig, Tamper};
use proofmesh_shared::net::{self, Client, NetConfig, Role};
use proofmesh_shared::protocol::{
    ChatMessage, GENERATE_PROTOCOL, GenerateFrame, GenerateRequest, MAX_STREAM_FRAME, ModelDigest,
    RemoteErrorKind, RequestId, read_frame, write_frame,
};
use proofmesh_shared::sampling::SamplerParams;
use tokio::sync::oneshot;

async fn provider() -> (proofmesh_provider::Started, oneshot::Sender<()>) {
    let model = proofmesh_provider::fetch::default_model_path();
    if !model.is_file() {
        proofmesh_provider::fetch::fetch_default_model(
            &proofmesh_provider::fetch::default_model_dir(),
            None,
        )
        .await
        .expect("fetching the default model");
    }
    let config = ProviderConfig {
        engine: EngineConfig {
            model_path: model,
            threads: 2,
            context_size: 256,
            parallel: 1,
            batch_size: 128,
            gpu_layers: 0,
            kv_cache: Default::default(),
            referee_slots: 0,
            referee_micro_batch: proofmesh_provider::engine::DEFAULT_REFEREE_MICRO_BATCH,
        },
        model_name: None,
        keypair: libp2p::identity::Keypair::generate_secp256k1(),
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        bootstrap: vec![],
        mdns: false,
        leaf_store_bytes: 1 << 20,
        http_listen: None,
        drain_timeout: std::time::Duration::from_secs(5),
        tamper: Tamper::None,
        tamper_model: None,
        claim_digest: None,
        referee_rate_per_minute: 60,
    };
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

fn client(bootstrap: Vec<libp2p::Multiaddr>) -> Client {
    let (client, _events, event_loop) = net::new(NetConfig {
        keypair: libp2p::identity::Keypair::generate_secp256k1(),
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        bootstrap,
        mdns: false,
        role: Role::Gateway,
    })
    .unwrap();
    tokio::spawn(event_loop.run());
    client
}

async fn open(client: &Client, peer: PeerId) -> libp2p::Stream {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match client
            .stream_control()
            .open_stream(peer, GENERATE_PROTOCOL)
            .await
        {
            Ok(stream) => return stream,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cannot open a stream: {e}"),
        }
    }
}

async fn answer(stream: &mut libp2p::Stream) -> GenerateFrame {
    tokio::time::timeout(
        Duration::from_secs(30),
        read_frame(stream, MAX_STREAM_FRAME),
    )
    .await
    .unwrap()
    .unwrap()
}

fn request(digest: ModelDigest, max_tokens: u32) -> GenerateRequest {
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
    }
}

fn refused(frame: &GenerateFrame) -> RemoteErrorKind {
    match frame {
        GenerateFrame::Error { kind, .. } => *kind,
        other => panic!("expected an error frame, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_error_frames_and_the_provider_keeps_serving() {
    let (started, _stop) = provider().await;
    let peer = started.peer_id;
    let digest = started.model.digest;
    let client = client(started.listen_addrs.clone());

    // Garbage after a valid length prefix.
    let mut s = open(&client, peer).await;
    s.write_all(&5u32.to_be_bytes()).await.unwrap();
    s.write_all(&[0xff, 0x13, 0x37, 0x00, 0x01]).await.unwrap();
    s.flush().await.unwrap();
    assert_eq!(
        refused(&answer(&mut s).await),
        RemoteErrorKind::InvalidRequest
    );

    // A length prefix far over the limit: refused before anything is allocated.
    let mut s = open(&client, peer).await;
    s.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    s.flush().await.unwrap();
    assert_eq!(
        refused(&answer(&mut s).await),
        RemoteErrorKind::InvalidRequest
    );

    // Another model's digest.
    let mut s = open(&client, peer).await;
    write_frame(&mut s, &request(ModelDigest([9; 32]), 8))
        .await
        .unwrap();
    assert_eq!(
        refused(&answer(&mut s).await),
        RemoteErrorKind::UnknownModel
    );

    // More tokens than the context window holds.
    let mut s = open(&client, peer).await;
    write_frame(&mut s, &request(digest, 10_000)).await.unwrap();
    assert_eq!(
        refused(&answer(&mut s).await),
        RemoteErrorKind::ContextLength
    );

    // Out-of-range sampler settings and an empty conversation.
    let mut bad = request(digest, 8);
    bad.sampler.temperature = f32::NAN;
    let mut s = open(&client, peer).await;
    write_frame(&mut s, &bad).await.unwrap();
    assert_eq!(
        refused(&answer(&mut s).await),
        RemoteErrorKind::InvalidRequest
    );
    let mut empty = request(digest, 8);
    empty.messages.clear();
    let mut s = open(&client, peer).await;
    write_frame(&mut s, &empty).await.unwrap();
    assert_eq!(
        refused(&answer(&mut s).await),
        RemoteErrorKind::InvalidRequest
    );

    // A peer that opens a stream and says nothing is cut off after the read timeout.
    let mut silent = open(&client, peer).await;
    let closed = tokio::time::timeout(
        Duration::from_secs(15),
        read_frame::<_, GenerateFrame>(&mut silent, MAX_STREAM_FRAME),
    )
    .await
    .expect("the provider closes a silent stream within its 10 s read timeout");
    assert!(closed.is_err());

    // A peer that hangs up mid-generation frees its slot; the next request is served in full.
    let mut s = open(&client, peer).await;
    write_frame(&mut s, &request(digest, 64)).await.unwrap();
    assert!(matches!(
        answer(&mut s).await,
        GenerateFrame::Accepted { .. }
    ));
    assert!(matches!(answer(&mut s).await, GenerateFrame::Token { .. }));
    drop(s);

    let mut s = open(&client, peer).await;
    write_frame(&mut s, &request(digest, 8)).await.unwrap();
    assert!(matches!(
        answer(&mut s).await,
        GenerateFrame::Accepted { .. }
    ));
    let mut steps = 0;
    loop {
        match answer(&mut s).await {
            GenerateFrame::Token { .. } => steps += 1,
            GenerateFrame::Done { commitment, .. } => {
                assert_eq!(commitment.commitment.steps, steps);
                assert_eq!(commitment.verify().unwrap(), peer);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(steps > 0);
}
