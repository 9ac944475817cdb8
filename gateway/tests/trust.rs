//! Peers that lie about what they declare, against the real path: a real gateway, real
//! providers running the real model (some of them lying), libp2p on loopback, real HTTP. One
//! test per deception; in each, the client never receives the forged content and the honest
//! provider is never penalised.

// Test code: a failure is a failed test and should say so loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::{Duration, Instant};

use libp2p::PeerId;
use proofmesh_provider::Tamper;
use proofmesh_provider::tamper::{FALSE_USAGE_EXTRA, FORGED_TEXT};
use proofmesh_provider::variants::Variant;
use proofmesh_shared::protocol::{
    MAX_EVIDENCE_FRAME, REFEREE_PROTOCOL, RefereeFrame, RefereeReply, RefereeTicket,
    RemoteErrorKind, read_frame, write_frame,
};
use serde_json::{Value, json};
use support::{GatewayOptions, HONEST, MODEL, Mesh, ProviderSpec, chat_body, header};

const PROMPT: &str = "Write a short story about a lighthouse keeper who finds a map.";

fn merkle(max_tokens: u32) -> Value {
    chat_body(
        PROMPT,
        json!({"verification_mode": "merkle", "max_tokens": max_tokens}),
    )
}

fn message(answer: &Value) -> String {
    answer["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// A gateway that benches caught providers for ten minutes.
fn benching() -> GatewayOptions {
    GatewayOptions {
        failed_audit_cooldown: Duration::from_secs(600),
        ..Default::default()
    }
}

/// A provider running the real model that streams text of its own beside the real tokens: the
/// gateway detokenizes the tokens itself, so the forged text never goes out, plain or streamed,
/// and the provider is benched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_text_never_reaches_the_client() {
    let mesh = Mesh::start_with(
        &[
            HONEST,
            ProviderSpec::tampering("forged-text", Tamper::ForgedText),
        ],
        GatewayOptions {
            failed_audit_cooldown: Duration::ZERO,
            ..Default::default()
        },
    )
    .await;
    let forger = mesh.providers[1].peer_id;
    for mode in ["merkle", "none"] {
        let body = chat_body(PROMPT, json!({"verification_mode": mode, "max_tokens": 24}));
        let (status, _, answer) = mesh.chat_with(body.clone(), Some(forger)).await;
        assert_eq!(status, 502, "{mode}: {answer}");
        assert!(message(&answer).contains("text_mismatch"), "{answer}");
        assert!(!answer.to_string().contains(FORGED_TEXT), "{answer}");

        let mut streamed = body;
        streamed["stream"] = json!(true);
        streamed["model"] = json!("forged-text");
        let (status, _, events) = mesh.chat_stream(streamed).await;
        assert_eq!(status, 200);
        assert!(
            !events.iter().any(|e| e.contains(FORGED_TEXT)),
            "{mode}: forged text streamed: {events:?}"
        );
        let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
        assert_eq!(last["error"]["code"], "verification_failed", "{last}");
        assert!(!events.iter().any(|e| e == "[DONE]"));
    }
    // The honest provider beside it streams the same way and passes.
    let (status, headers, answer) = mesh.chat(merkle(24)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(header(&headers, "x-proofmesh-verdict"), "passed");
}

/// Without a vocabulary for the model the gateway cannot check text, and a referee passes
/// tokens, not text: no audited mode is offered, even to an operator who allows unrefereed
/// answers, so a text forger's words are never labelled `passed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_vocabulary_no_answer_is_passed() {
    let mesh = Mesh::start_with(
        &[
            HONEST,
            ProviderSpec::tampering("forged-text", Tamper::ForgedText),
        ],
        GatewayOptions {
            no_local_referee: true,
            no_vocabulary: true,
            trust_providers: true,
            allow_unrefereed: true,
            ..Default::default()
        },
    )
    .await;
    let forger = mesh.providers[1].peer_id;
    let (status, _, answer) = mesh.chat_with(merkle(16), Some(forger)).await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["error"]["code"], "no_provider_available", "{answer}");
    assert!(!answer.to_string().contains(FORGED_TEXT), "{answer}");
    // `none` still serves, labelled unaudited.
    let body = chat_body(
        PROMPT,
        json!({"verification_mode": "none", "max_tokens": 8}),
    );
    let (status, headers, _) = mesh.chat_with(body, Some(mesh.providers[0].peer_id)).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-proofmesh-verdict"), "unaudited");
}

/// A provider that generates and commits honestly but claims more prompt tokens and another
/// finish reason in its unsigned frames: the client reads what the provider signed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_and_finish_reason_are_the_signed_ones() {
    let mesh = Mesh::start(&[ProviderSpec::tampering("false-usage", Tamper::FalseUsage)]).await;
    // Eight tokens of a story: the model is cut off, so the signed finish is `length`.
    let body = merkle(8);
    let (status, headers, answer) = mesh.chat(body.clone()).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(header(&headers, "x-proofmesh-verdict"), "passed");
    assert_eq!(answer["choices"][0]["finish_reason"], "length", "{answer}");
    let prompt_tokens = answer["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        prompt_tokens > 5 && prompt_tokens < u64::from(FALSE_USAGE_EXTRA),
        "{answer}"
    );

    let mut streamed = body;
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let (status, _, events) = mesh.chat_stream(streamed).await;
    assert_eq!(status, 200);
    let chunks: Vec<Value> = events
        .iter()
        .filter_map(|e| serde_json::from_str(e).ok())
        .collect();
    let finish = chunks
        .iter()
        .find_map(|c| c["choices"][0]["finish_reason"].as_str())
        .expect("a finish chunk");
    assert_eq!(finish, "length", "{events:?}");
    let usage = chunks
        .iter()
        .find(|c| c["usage"].is_object())
        .expect("a usage chunk");
    assert_eq!(
        usage["usage"]["prompt_tokens"].as_u64(),
        Some(prompt_tokens)
    );
}

/// A provider serving a cheaper copy of the model (one tensor requantized, which the tolerant
/// tier cannot tell from kernel noise) that advertises the deterministic class, and so is routed
/// and refereed in the exact tier, but signs a non-deterministic class hoping to be judged with
/// the tolerant limits: the commitment's class must be the advertised one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_class_downgrade_in_the_commitment_fails() {
    let downgrade = ProviderSpec {
        tamper: Tamper::OtherNumerics,
        ..ProviderSpec::serving("downgrade", support::attack_model(Variant::OneTensorQ4_0))
    };
    let mesh = Mesh::start(&[HONEST, downgrade]).await;
    let mut body = merkle(64);
    body["model"] = json!("downgrade");
    let (status, headers, answer) = mesh.chat(body).await;
    assert_eq!(status, 502, "{answer}");
    assert!(message(&answer).contains("numerics_mismatch"), "{answer}");
    assert_eq!(header(&headers, "x-should-retry"), "false");
}

/// Two providers of one operator serving a cheaper quantization, declaring a made-up
/// deterministic class and offering to referee each other: no merkle answer of theirs is
/// delivered (the gateway's own engine is the only referee it trusts, and it is not of their
/// class), while the honest provider keeps being audited by the gateway's engine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn colluding_referees_with_a_made_up_class_are_not_used() {
    let colluder = |name| ProviderSpec {
        claim_numerics: Some("det/made-up"),
        referee_slots: 2,
        ..ProviderSpec::serving(name, support::attack_model(Variant::Q2K))
    };
    let mesh = Mesh::start(&[HONEST, colluder("colluder-a"), colluder("colluder-b")]).await;
    for name in ["colluder-a", "colluder-b"] {
        let mut body = merkle(32);
        body["model"] = json!(name);
        let (status, _, answer) = mesh.chat(body).await;
        assert_eq!(status, 503, "{name} was delivered: {answer}");
        assert_eq!(answer["error"]["code"], "no_provider_available", "{answer}");
    }
    let (status, headers, answer) = mesh.chat(merkle(32)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(header(&headers, "x-proofmesh-referee"), "local");
    assert_eq!(header(&headers, "x-proofmesh-audit-tier"), "exact");
}

/// A trusted peer referee that turns false accuser, on a gateway without an engine of its own:
/// its accusation of an honest answer is put to a second peer, which finds the answer sound. One
/// peer's word against another's settles nothing: the honest provider is never failed or
/// penalised, the answer is withheld (503, not 502), and nobody is struck on a peer's word.
/// (Where the gateway's engine is the second referee it is believed and the accuser struck:
/// `auditor::procedure` tests; canaries catch false accusers too: `canary_audits_drop_lying_referees`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_referee_that_accuses_an_honest_provider_penalises_nobody() {
    let served = ProviderSpec {
        referee_slots: 0,
        ..HONEST
    };
    let liar = ProviderSpec::tampering("liar", Tamper::FalseAccuser);
    let mesh = Mesh::start_with(
        &[served, liar, HONEST],
        GatewayOptions {
            no_local_referee: true,
            trust_providers: true,
            failed_audit_cooldown: Duration::from_secs(600),
            ..Default::default()
        },
    )
    .await;
    let provider = mesh.providers[0].peer_id;
    let (mut passed, mut withheld) = (0, 0);
    for i in 0..12 {
        let (status, headers, answer) = mesh.chat_with(merkle(32), Some(provider)).await;
        match status {
            200 => {
                assert_eq!(header(&headers, "x-proofmesh-verdict"), "passed", "{i}");
                passed += 1;
            }
            503 => {
                assert_eq!(
                    answer["error"]["code"], "verification_unavailable",
                    "request {i}: {answer}"
                );
                assert!(message(&answer).contains("inconclusive"), "{answer}");
                withheld += 1;
            }
            other => panic!("request {i}: {other} {answer}"),
        }
    }
    assert!(withheld > 0, "the liar was never asked in 12 audits");
    assert!(
        passed > 0,
        "the honest referee was never asked in 12 audits"
    );
    assert_eq!(
        strikes(&mesh).await,
        0.0,
        "a referee was struck on a peer's word"
    );
}

/// The gateway's metric `name`, summed over its labels.
async fn metric(mesh: &Mesh, name: &str) -> f64 {
    let text = reqwest::get(mesh.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    support::metric_sum(&support::parse_metrics(&text), name, &[])
}

async fn strikes(mesh: &Mesh) -> f64 {
    metric(mesh, "proofmesh_gateway_referee_strikes_total").await
}

/// Several peers advertise the default model's name under another digest (a cheaper
/// quantization of it, honestly labelled with its own digest): the name means only the digest
/// the gateway pinned, whatever most peers say. Asking by digest still reaches them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_advertised_under_another_digest_is_not_followed() {
    let impostor = ProviderSpec {
        own_digest: true,
        ..ProviderSpec::serving(MODEL, support::attack_model(Variant::Q4_0))
    };
    let mesh = Mesh::start(&[HONEST, impostor.clone(), impostor]).await;
    let honest = mesh.providers[0].peer_id.to_string();
    let pinned = support::default_digest().to_string();
    for mode in ["merkle", "none"] {
        for _ in 0..3 {
            let body = chat_body(PROMPT, json!({"verification_mode": mode, "max_tokens": 8}));
            let (status, headers, answer) = mesh.chat(body).await;
            assert_eq!(status, 200, "{answer}");
            assert_eq!(header(&headers, "x-proofmesh-model-digest"), pinned);
            assert_eq!(header(&headers, "x-proofmesh-provider"), honest);
        }
    }
    // By digest, the other file is reachable on purpose.
    let other = proofmesh_shared::model_file::file_digest(&support::attack_model(Variant::Q4_0))
        .unwrap()
        .to_string();
    let mut body = chat_body(
        PROMPT,
        json!({"verification_mode": "none", "max_tokens": 8}),
    );
    body["model"] = json!(other);
    let (status, headers, answer) = mesh.chat(body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(header(&headers, "x-proofmesh-model-digest"), other);
    // A name nobody pinned is refused, and the error says why and what is advertised.
    let mut body = chat_body(PROMPT, json!({"max_tokens": 8}));
    body["model"] = json!("some-unpinned-model");
    let (status, _, answer) = mesh.chat(body).await;
    assert_eq!(status, 404, "{answer}");
    assert_eq!(answer["error"]["code"], "model_not_found");
    assert!(message(&answer).contains("not pinned"), "{answer}");
}

/// A cheat that is caught, disconnects and comes back with the same key: still benched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caught_provider_stays_benched_when_it_reconnects() {
    let cheat = ProviderSpec::serving("cheat", support::attack_model(Variant::Q4_0));
    let mut mesh = Mesh::start_with(&[HONEST, cheat], benching()).await;
    let (honest, cheat) = (mesh.providers[0].peer_id, mesh.providers[1].peer_id);
    let (status, _, answer) = mesh.chat_with(merkle(32), Some(cheat)).await;
    assert_eq!(status, 502, "{answer}");
    mesh.restart_provider(1).await;
    mesh.wait_for_providers(2).await;
    assert_eq!(mesh.providers[1].peer_id, cheat);
    assert_benched(&mesh, cheat, honest).await;
}

/// The pinned cheat gets no request at all; unpinned requests go to the honest provider.
async fn assert_benched(mesh: &Mesh, cheat: PeerId, honest: PeerId) {
    let (status, _, answer) = mesh.chat_with(merkle(16), Some(cheat)).await;
    assert_eq!(status, 503, "{answer}");
    assert!(
        message(&answer).contains("recently failed verification"),
        "{answer}"
    );
    for _ in 0..3 {
        let (status, headers, answer) = mesh.chat(merkle(16)).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(header(&headers, "x-proofmesh-provider"), honest.to_string());
    }
}

/// A cheat caught by one gateway process is still benched by the next one on the same state
/// directory (the peer book is durable; `kill -9` is covered by the book's own test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caught_provider_stays_benched_across_a_gateway_restart() {
    let state = std::env::temp_dir().join(format!("proofmesh-state-{}", rand::random::<u64>()));
    let options = GatewayOptions {
        state_dir: Some(state.clone()),
        keypair: Some(libp2p::identity::Keypair::generate_secp256k1()),
        ..benching()
    };
    let cheat_spec = ProviderSpec::serving("cheat", support::attack_model(Variant::Q4_0));
    let mut first = Mesh::start_with(&[HONEST, cheat_spec], options.clone()).await;
    let (honest, cheat) = (first.providers[0].peer_id, first.providers[1].peer_id);
    let (status, _, answer) = first.chat_with(merkle(32), Some(cheat)).await;
    assert_eq!(status, 502, "{answer}");
    let keys: Vec<_> = first.providers.iter().map(|p| p.key.clone()).collect();
    let specs: Vec<_> = first.providers.iter().map(|p| p.spec.clone()).collect();
    for p in &mut first.providers {
        p.kill().await;
    }
    first.stop_gateway_and_wait().await;
    drop(first);
    let second = Mesh::start_with_keys(&specs, keys, options).await;
    assert_benched(&second, cheat, honest).await;
    let _ = std::fs::remove_dir_all(state);
}

/// A provider that withholds its first leaf opening, as a lossy network would: the gateway
/// asks again before it concludes anything, and the honest answer passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opening_dropped_by_the_network_is_asked_again() {
    let mesh = Mesh::start(&[ProviderSpec::tampering(
        "drops-first-opening",
        Tamper::DropFirstOpening,
    )])
    .await;
    let mut body = merkle(32);
    body["model"] = json!("drops-first-opening");
    let (status, headers, answer) = mesh.chat(body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(header(&headers, "x-proofmesh-verdict"), "passed");
}

/// A provider that never opens its leaves when challenged: one silence may be the network's
/// and costs nothing but the answer; three audits in a row left unopened bench it, so it cannot
/// dodge every audit of a wrong answer for free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_never_opens_its_leaves_is_benched() {
    let mesh = Mesh::start_with(
        &[
            HONEST,
            ProviderSpec::tampering("silent", Tamper::NeverOpens),
        ],
        benching(),
    )
    .await;
    let (honest, silent) = (mesh.providers[0].peer_id, mesh.providers[1].peer_id);
    for i in 0..3 {
        let (status, _, answer) = mesh.chat_with(merkle(16), Some(silent)).await;
        assert_eq!(status, 503, "request {i}: {answer}");
        assert!(message(&answer).contains("inconclusive"), "{answer}");
    }
    assert_benched(&mesh, silent, honest).await;
}

/// A peer no gateway vouches for opens referee jobs on the only referee and holds them idle:
/// without a ticket from a gateway the referee works for, none takes a context, and the
/// gateway's audit gets its referee at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_referee_jobs_of_strangers_hold_no_context() {
    let served = ProviderSpec {
        referee_slots: 0,
        ..HONEST
    };
    let referee_spec = ProviderSpec {
        referee_slots: 1,
        ..ProviderSpec::tampering("referee", Tamper::None)
    };
    let mesh = Mesh::start_with(
        &[served, referee_spec],
        GatewayOptions {
            no_local_referee: true,
            trust_providers: true,
            ..Default::default()
        },
    )
    .await;
    let (provider, referee) = (mesh.providers[0].peer_id, mesh.providers[1].peer_id);
    let stranger = libp2p::identity::Keypair::generate_secp256k1();
    let (client, _events, event_loop) =
        proofmesh_shared::net::new(proofmesh_shared::net::NetConfig {
            keypair: stranger.clone(),
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
            bootstrap: mesh.providers[1].addrs.clone(),
            mdns: false,
            role: proofmesh_shared::net::Role::Gateway,
            psk: None,
            traversal: Default::default(),
        })
        .unwrap();
    tokio::spawn(event_loop.run());
    let mut held = Vec::new();
    for _ in 0..4 {
        let request = proofmesh_shared::protocol::GenerateRequest {
            version: proofmesh_shared::protocol::GenerateRequest::VERSION,
            request_id: proofmesh_shared::protocol::RequestId::random(),
            model_digest: support::default_digest(),
            messages: vec![proofmesh_shared::protocol::ChatMessage {
                role: "user".into(),
                content: PROMPT.into(),
            }],
            sampler: Default::default(),
            max_tokens: 64,
            stop: vec![],
            trace: None,
            stream_leaves: false,
            tools: None,
            constraint: None,
            prompt: None,
        };
        let ticket = RefereeTicket {
            referee: referee.to_bytes(),
            request_hash: request.hash(),
            expires_unix: u64::MAX,
        }
        .sign(&stranger)
        .unwrap();
        let mut stream = open_stream(&client, referee).await;
        let begin = RefereeFrame::Begin {
            request: Box::new(request),
            ticket: Box::new(ticket),
        };
        write_frame(&mut stream, &begin).await.unwrap();
        let reply: RefereeReply = read_frame(&mut stream, MAX_EVIDENCE_FRAME).await.unwrap();
        assert!(
            matches!(
                reply,
                RefereeReply::Error {
                    kind: RemoteErrorKind::InvalidRequest,
                    ..
                }
            ),
            "{reply:?}"
        );
        held.push(stream);
    }
    let started = Instant::now();
    let (status, headers, answer) = mesh.chat_with(merkle(32), Some(provider)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(header(&headers, "x-proofmesh-verdict"), "passed");
    assert_eq!(header(&headers, "x-proofmesh-referee"), referee.to_string());
    // No wait for a busy referee (that would take up to 30 s before giving up).
    assert!(started.elapsed() < Duration::from_secs(25));
    drop(held);
}

async fn open_stream(client: &proofmesh_shared::net::Client, peer: PeerId) -> libp2p::Stream {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // Each try bounded: libp2p-stream can wait forever when asked while the first
        // connection is being set up.
        let opened = tokio::time::timeout(
            Duration::from_secs(2),
            client.stream_control().open_stream(peer, REFEREE_PROTOCOL),
        )
        .await;
        match opened {
            Ok(Ok(stream)) => return stream,
            _ if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(Err(e)) => panic!("cannot open a referee stream: {e}"),
            Err(_) => panic!("cannot open a referee stream: timed out"),
        }
    }
}

/// Canary audits: after an audit passes, the gateway has a trusted peer referee re-execute that
/// answer, and a copy with one token changed, beside its own engine. A referee that
/// rubber-stamps the changed answer, and one that accuses the sound one, are struck and dropped;
/// the honest referee is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_audits_drop_lying_referees() {
    let served = ProviderSpec {
        referee_slots: 0,
        ..HONEST
    };
    let mesh = Mesh::start_with(
        &[
            served,
            ProviderSpec::tampering("rubber-stamp", Tamper::RubberStamp),
            ProviderSpec::tampering("false-accuser", Tamper::FalseAccuser),
            ProviderSpec::tampering("honest-referee", Tamper::None),
        ],
        GatewayOptions {
            trust_providers: true,
            canary_rate: 1.0,
            ..Default::default()
        },
    )
    .await;
    let provider = mesh.providers[0].peer_id;
    let mut requests = 0;
    while strikes(&mesh).await < 2.0 {
        assert!(
            requests < 20,
            "the liars were not both caught in 20 canaries"
        );
        let (status, headers, answer) = mesh.chat_with(merkle(24), Some(provider)).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(header(&headers, "x-proofmesh-verdict"), "passed");
        requests += 1;
        // The canary runs after the answer; give it time to finish.
        let waited = Instant::now();
        while waited.elapsed() < Duration::from_secs(20) && canaries_done(&mesh).await < requests {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // From now on only the honest referee is canaried, and it agrees.
    for _ in 0..3 {
        let (status, _, answer) = mesh.chat_with(merkle(24), Some(provider)).await;
        assert_eq!(status, 200, "{answer}");
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(strikes(&mesh).await, 2.0, "the honest referee was struck");
}

/// Canary audits finished (agreed, or struck).
async fn canaries_done(mesh: &Mesh) -> u32 {
    metric(mesh, "proofmesh_gateway_canaries_total").await as u32
}
