//! Fraud proofs gossiped between gateways, through the real path: two real gateways (each
//! refereeing with its own copy of the default model), an honest provider and one that runs a
//! cheaper quantization while claiming the default model, libp2p gossipsub on loopback.
//!
//! The first gateway catches the cheat and publishes the proof. The second never served the
//! cheat a refereed request: it learns of it from the proof alone, re-executes the proof's
//! challenged steps with its own engine, and stops routing to it. A peer that publishes
//! forged proofs is struck until it is banned.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::{Duration, Instant};

use libp2p::PeerId;
use proofmesh_provider::variants::Variant;
use proofmesh_shared::net::{self, NetConfig, Role, Traversal};
use proofmesh_shared::verify::FraudProof;
use serde_json::json;
use support::{GatewayOptions, HONEST, Mesh, ProviderSpec, chat_body};

/// A prompt whose answer runs to `max_tokens`.
const STORY: &str = "Write a long story about a lighthouse keeper who finds a map. \
                     Describe every place and every person in detail.";

/// An unaudited request pinned to `provider`: who may still be routed to.
async fn status_pinned(mesh: &Mesh, provider: PeerId) -> u16 {
    let body = chat_body(
        "Say hello.",
        json!({"verification_mode": "none", "max_tokens": 4}),
    );
    mesh.chat_with(body, Some(provider)).await.0
}

async fn proofs_heard(mesh: &Mesh, verdict: &str) -> f64 {
    mesh.metric(
        "proofmesh_gateway_proofs_heard_total",
        &[("verdict", verdict)],
    )
    .await
}

/// The one proof written into `dir`.
fn only_proof(dir: &std::path::Path) -> FraudProof {
    let file = std::fs::read_dir(dir)
        .expect("evidence dir")
        .filter_map(Result::ok)
        .find(|e| e.path().extension().is_some_and(|x| x == "cbor"))
        .expect("a proof")
        .path();
    FraudProof::from_cbor(&std::fs::read(file).unwrap()).expect("a proof")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_gateway_excludes_a_cheat_on_a_gossiped_proof_and_strikes_a_forger() {
    let evidence = std::env::temp_dir().join(format!("pm-gossip-{}", rand::random::<u64>()));
    let bench = Duration::from_secs(600);
    let honest = ProviderSpec {
        name: "honest",
        ..HONEST
    };
    let cheat = ProviderSpec::serving("q4_0", support::attack_model(Variant::Q4_0));
    let first = Mesh::start_with(
        &[honest, cheat],
        GatewayOptions {
            evidence_dir: Some(evidence.clone()),
            failed_audit_cooldown: bench,
            ..GatewayOptions::default()
        },
    )
    .await;
    let (honest, cheat) = (first.providers[0].peer_id, first.providers[1].peer_id);
    let mut bootstrap = first.p2p_addrs.clone();
    for provider in &first.providers {
        bootstrap.extend(provider.addrs.iter().cloned());
    }
    let heard = evidence.join("second");
    let (second, _) = support::start_gateway_with(GatewayOptions {
        bootstrap,
        failed_audit_cooldown: bench,
        evidence_dir: Some(heard.clone()),
        ..GatewayOptions::default()
    })
    .await;
    second.wait_for_providers(2).await;
    // The second gateway routes to the cheat until it learns otherwise.
    assert_eq!(status_pinned(&second, cheat).await, 200);

    // The first gateway catches it.
    let body = chat_body(
        STORY,
        json!({"verification_mode": "merkle", "max_tokens": 48}),
    );
    let (status, _, answer) = first.chat_with(body, Some(cheat)).await;
    assert_eq!(status, 502, "{answer}");

    // The second hears the proof, checks it with its own engine, and excludes the cheat.
    let deadline = Instant::now() + Duration::from_secs(120);
    while status_pinned(&second, cheat).await != 503 {
        assert!(
            Instant::now() < deadline,
            "the second gateway still routes to the cheat"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(proofs_heard(&second, "holds").await, 1.0);
    // It believed the accusation on its own engine's word (the first gateway's engine is no
    // referee it trusts): the proof it wrote down carries its own evidence.
    let ours = only_proof(&heard);
    let signers: Vec<PeerId> = ours
        .rounds
        .iter()
        .flat_map(|r| r.evidence.iter())
        .filter_map(|e| e.verify().ok())
        .collect();
    assert!(signers.contains(&second.gateway_peer), "{signers:?}");
    assert!(signers.contains(&first.gateway_peer), "{signers:?}");
    assert_eq!(status_pinned(&second, honest).await, 200);

    // A peer (gateway role, no HTTP) publishes forgeries: the proof turned against the honest
    // provider, then the proof with bytes appended. Each is dropped and its sender struck; the
    // fourth strike bans it.
    let proof = only_proof(&evidence);
    let mut framed = proof.clone();
    framed.provider = honest.to_bytes();
    let mut forgeries = vec![framed.to_cbor()];
    for extra in 0..8u8 {
        let mut bytes = proof.to_cbor();
        bytes.push(extra);
        forgeries.push(bytes);
    }
    let (forger, _events, event_loop) = net::new(NetConfig {
        keypair: libp2p::identity::Keypair::generate_secp256k1(),
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        bootstrap: second.p2p_addrs.clone(),
        mdns: false,
        role: Role::Gateway,
        psk: None,
        traversal: Traversal::default(),
    })
    .expect("forger");
    let forger_task = tokio::spawn(event_loop.run());
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut connected_once = false;
    let mut forgeries = forgeries.into_iter();
    loop {
        let connected = forger
            .connected_peers()
            .await
            .unwrap()
            .contains(&second.gateway_peer);
        connected_once |= connected;
        if connected_once && !connected {
            break;
        }
        assert!(Instant::now() < deadline, "the forger was never banned");
        if connected {
            // Gossip needs the subscriptions exchanged first; the first publish may find none.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let Some(bytes) = forgeries.next() else {
                panic!("every forgery sent and the forger is still connected");
            };
            forger.publish_proof(bytes).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(proofs_heard(&second, "forged").await >= 4.0);
    // Nothing forged reached the book: the honest provider still serves at both gateways.
    assert_eq!(status_pinned(&second, honest).await, 200);
    assert_eq!(status_pinned(&first, honest).await, 200);
    forger_task.abort();
    let _ = std::fs::remove_dir_all(evidence);
}
