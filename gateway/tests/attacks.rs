//! Cheating providers against the real audit path: a real gateway (refereeing with its own copy
//! of the default model unless a test says otherwise), real providers that claim the default
//! model's digest while serving something else or forging their answers, libp2p on loopback,
//! plain HTTP requests with `verification_mode: merkle`.
//!
//! Exact tier: cheat and referee both run q8_0 KV caches (deterministic numerics), so honest
//! agreement is bit for bit and any other weights show. Tolerant tier: the cheat runs an f16 KV
//! cache, so the audit allows for kernel noise, and must still catch every cheaper quantization
//! of the 128-token answers here. Tampered leaves, foreign keys and corrupt signatures are in
//! `mesh.rs`.

mod support;

use std::time::Duration;

use proofmesh_gateway::auditor::AuditTiers;
use proofmesh_provider::Tamper;
use proofmesh_provider::engine::KvCache;
use proofmesh_provider::variants::Variant;
use proofmesh_shared::verify::{FraudProof, ProofError};
use serde_json::{Value, json};
use support::{GatewayOptions, HONEST, MODEL, Mesh, ProviderSpec, chat_body, header};

/// A prompt whose answer runs to `max_tokens`.
const STORY: &str = "Write a long story about a lighthouse keeper who finds a map. \
                     Describe every place and every person in detail.";

/// Sends a greedy merkle request for `model` and returns status, headers and body.
async fn ask(
    mesh: &Mesh,
    model: &str,
    prompt: &str,
    max_tokens: u32,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut body = chat_body(
        prompt,
        json!({"verification_mode": "merkle", "max_tokens": max_tokens}),
    );
    body["model"] = json!(model);
    mesh.chat(body).await
}

/// Asserts that `model`'s answer was refused as a failed audit, and returns the verdict.
async fn assert_caught(mesh: &Mesh, model: &str, max_tokens: u32) -> String {
    let (status, headers, answer) = ask(mesh, model, STORY, max_tokens).await;
    assert_eq!(status, 502, "{model} was not caught: {answer}");
    assert_eq!(answer["error"]["code"], "verification_failed", "{model}");
    assert_eq!(header(&headers, "x-should-retry"), "false", "{model}");
    let message = answer["error"]["message"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let verdict = message
        .split(['(', ')'])
        .find(|w| w.starts_with("failed:"))
        .unwrap_or("")
        .to_string();
    assert!(verdict.starts_with("failed:"), "{model}: {message}");
    verdict
}

/// Every cheaper or altered model, audited in the exact tier: cheats and the referee run the
/// same deterministic kernels, so any deviation from the claimed weights shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_weights_are_caught_in_the_exact_tier() {
    let mut specs = vec![HONEST];
    for variant in Variant::ALL {
        specs.push(ProviderSpec::serving(
            variant.name(),
            support::attack_model(variant),
        ));
    }
    specs.push(ProviderSpec::serving("gemma", support::other_model()));
    let mesh = Mesh::start(&specs).await;
    for variant in Variant::ALL {
        let verdict = assert_caught(&mesh, variant.name(), 128).await;
        assert_eq!(verdict, "failed:logits_diverge", "{}", variant.name());
    }
    // Another model has another vocabulary: its tokens' text is not what it streams under the
    // claimed model's vocabulary, which the gateway sees itself before any referee is asked
    // (and a referee would find the prompt it ran is not the one it was sent).
    assert_eq!(
        assert_caught(&mesh, "gemma", 64).await,
        "failed:text_mismatch"
    );
    // The honest provider beside them passes, in the exact tier, refereed by the gateway. (The
    // cheats claim the same digest, so a request for the model may reach any of them: pinned.)
    let honest = mesh.providers[0].peer_id;
    let pinned = |max_tokens: u32| {
        let body = chat_body(
            STORY,
            json!({"verification_mode": "merkle", "max_tokens": max_tokens}),
        );
        mesh.chat_with(body, Some(honest))
    };
    let (status, headers, answer) = pinned(128).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(header(&headers, "x-proofmesh-verdict"), "passed");
    assert_eq!(header(&headers, "x-proofmesh-referee"), "local");
    assert_eq!(header(&headers, "x-proofmesh-audit-tier"), "exact");
    assert_eq!(answer["proofmesh"]["audit"]["max_distance"], 0.0);
    assert_eq!(answer["proofmesh"]["audit"]["max_margin"], 0.0);
    // A long answer's audit moves well under 64 KiB of evidence.
    let (status, _, answer) = pinned(512).await;
    assert_eq!(status, 200, "{answer}");
    let steps = answer["usage"]["completion_tokens"].as_u64().unwrap();
    let bytes = answer["proofmesh"]["audit"]["evidence_bytes"]
        .as_u64()
        .unwrap();
    assert!(
        steps >= 256,
        "a long answer was expected, got {steps} tokens"
    );
    assert!(
        bytes > 0 && bytes < 64 * 1024,
        "{bytes} bytes of evidence for {steps} steps"
    );
}

/// The same cheaper quantizations from providers that declare non-deterministic numerics (an
/// f16 KV cache), on a gateway that accepts the tolerant tier (`--audit-tiers any`), so the
/// audit can only use that tier's limits: still caught on every 128-token answer. An honest
/// f16 provider passes under the same limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cheaper_quantizations_are_caught_in_the_tolerant_tier() {
    let f16 = |spec: ProviderSpec| ProviderSpec {
        kv_cache: KvCache::F16,
        ..spec
    };
    let cheats = [
        Variant::Q4_0,
        Variant::Q2K,
        Variant::FfnDownQ4_0,
        Variant::PerturbedBlock,
    ];
    let mut specs = vec![f16(ProviderSpec::tampering("honest-f16", Tamper::None))];
    for variant in cheats {
        specs.push(f16(ProviderSpec::serving(
            variant.name(),
            support::attack_model(variant),
        )));
    }
    let options = GatewayOptions {
        audit_tiers: AuditTiers::Any,
        ..GatewayOptions::default()
    };
    let mesh = Mesh::start_with(&specs, options).await;
    let prompts = [
        STORY,
        "Explain how a bicycle works, part by part, for a curious child.",
        "List twenty animals and one fact about each.",
    ];
    for variant in cheats {
        for prompt in prompts {
            let (status, _, answer) = ask(&mesh, variant.name(), prompt, 128).await;
            assert_eq!(
                status,
                502,
                "{} not caught on {prompt:?}: {answer}",
                variant.name()
            );
        }
    }
    for prompt in prompts {
        let (status, headers, answer) = ask(&mesh, "honest-f16", prompt, 128).await;
        assert_eq!(status, 200, "honest f16 provider accused: {answer}");
        assert_eq!(header(&headers, "x-proofmesh-audit-tier"), "tolerant");
    }
}

/// By default a gateway judges merkle answers only in the exact tier: a provider declaring
/// other numerics than every referee (as a cheat may, to face the tolerant tier's looser
/// limits) gets no merkle request at all, only a clear 503, while `none` still reaches it. An
/// honest deterministic provider of the same model keeps serving merkle, audited exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tolerant_tier_is_refused_by_default() {
    let copied_f16 = ProviderSpec {
        tamper: Tamper::CopiedLogits,
        kv_cache: KvCache::F16,
        ..ProviderSpec::serving("copied-logits-f16", support::attack_model(Variant::Q2K))
    };
    let honest_f16 = ProviderSpec {
        kv_cache: KvCache::F16,
        ..ProviderSpec::tampering("honest-f16", Tamper::None)
    };
    let mesh = Mesh::start(&[HONEST, honest_f16, copied_f16]).await;
    for name in ["copied-logits-f16", "honest-f16"] {
        let (status, headers, answer) = ask(&mesh, name, STORY, 32).await;
        assert_eq!(status, 503, "{name} got a merkle request: {answer}");
        assert_eq!(answer["error"]["code"], "no_provider_available", "{answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("--audit-tiers any"), "{message}");
        assert!(header(&headers, "x-proofmesh-provider").is_empty());
    }
    let mut body = chat_body(STORY, json!({"verification_mode": "none", "max_tokens": 8}));
    body["model"] = json!("honest-f16");
    let (status, _, answer) = mesh.chat(body).await;
    assert_eq!(status, 200, "{answer}");
    let (status, headers, answer) = ask(&mesh, MODEL, STORY, 32).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(header(&headers, "x-proofmesh-audit-tier"), "exact");
}

/// Answers forged by a provider running the right model: made-up tokens, a replayed answer,
/// a truncated one, tokens changed after committing, and logits copied from the claimed model
/// over tokens decoded by a cheaper one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_answers_are_caught() {
    let copied = ProviderSpec {
        tamper: Tamper::CopiedLogits,
        ..ProviderSpec::serving("copied-logits", support::attack_model(Variant::Q2K))
    };
    let mesh = Mesh::start(&[
        HONEST,
        ProviderSpec::tampering("made-up", Tamper::MadeUpTokens),
        ProviderSpec::tampering("replay", Tamper::Replay),
        ProviderSpec::tampering("truncate", Tamper::Truncate),
        ProviderSpec::tampering("changed-tokens", Tamper::ChangedTokens),
        copied,
    ])
    .await;
    assert_eq!(
        assert_caught(&mesh, "made-up", 64).await,
        "failed:logits_diverge"
    );
    assert_eq!(
        assert_caught(&mesh, "truncate", 64).await,
        "failed:finish_mismatch"
    );
    assert_eq!(
        assert_caught(&mesh, "changed-tokens", 64).await,
        "failed:output_mismatch"
    );
    // The replaying provider answers its first request honestly...
    let (status, _, first) =
        ask(&mesh, "replay", "Name the planets of the solar system.", 64).await;
    assert_eq!(status, 200, "{first}");
    // ...and then serves that answer again, re-signed for the new request.
    let verdict = assert_caught(&mesh, "replay", 64).await;
    assert!(
        verdict == "failed:logits_diverge" || verdict == "failed:tokens_implausible",
        "{verdict}"
    );
    // Copied logits replay consistently, but the tokens are not the claimed model's.
    for prompt in [STORY, "List twenty animals and one fact about each."] {
        let (status, _, answer) = ask(&mesh, "copied-logits", prompt, 128).await;
        assert_eq!(status, 502, "copied logits not caught: {answer}");
    }
}

/// A forged answer never reaches the client: with an honest provider of the same model the
/// request is retried there; the cheat is benched, and its fraud proof, written to the evidence
/// directory, re-checks offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_answers_are_retried_elsewhere_and_proven() {
    let evidence = std::env::temp_dir().join(format!("proofmesh-evidence-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&evidence);
    let cheat = ProviderSpec::serving(MODEL, support::attack_model(Variant::Q4_0));
    let mesh = Mesh::start_with(
        &[HONEST, cheat],
        GatewayOptions {
            evidence_dir: Some(evidence.clone()),
            failed_audit_cooldown: Duration::from_secs(600),
            ..Default::default()
        },
    )
    .await;
    let honest = mesh.providers[0].peer_id.to_string();
    let cheat = mesh.providers[1].peer_id;
    // Pinned to the cheat, the client gets the verdict and nothing else.
    let mut body = chat_body(
        STORY,
        json!({"verification_mode": "merkle", "max_tokens": 64}),
    );
    let (status, _, answer) = mesh.chat_with(body.clone(), Some(cheat)).await;
    assert_eq!(status, 502, "{answer}");
    // Unpinned, every answer the client gets comes from the honest provider and passed.
    body["messages"][0]["content"] = json!("Describe a forest at night.");
    for _ in 0..3 {
        let (status, headers, answer) = mesh.chat(body.clone()).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(header(&headers, "x-proofmesh-verdict"), "passed");
        assert_eq!(header(&headers, "x-proofmesh-provider"), honest);
    }
    // The fraud proof names the failure, and checking it offline finds the same one.
    let proofs: Vec<_> = std::fs::read_dir(&evidence)
        .expect("evidence directory")
        .filter_map(Result::ok)
        .collect();
    assert_eq!(proofs.len(), 1, "one failed audit, one proof");
    let bytes = std::fs::read(proofs[0].path()).expect("proof");
    let proof: FraudProof = ciborium::from_reader(bytes.as_slice()).expect("cbor");
    assert_eq!(proof.provider, cheat.to_bytes());
    // The gateway's own engine refereed: its word alone is no proof to anyone else...
    assert_eq!(proof.check(), Err(ProofError::NoTrustedReferee(1)));
    // ...but is to a checker that trusts that gateway.
    assert_eq!(
        proof.check_trusting(&[mesh.gateway_peer]),
        Ok(proof.failure)
    );
    // Anyone with the gateway binary can re-check it.
    let checked = std::process::Command::new(env!("CARGO_BIN_EXE_proofmesh-gateway"))
        .arg("check-proof")
        .arg(proofs[0].path())
        .arg("--trust")
        .arg(mesh.gateway_peer.to_string())
        .output()
        .expect("check-proof");
    let printed = String::from_utf8_lossy(&checked.stdout);
    assert!(checked.status.success(), "{printed}");
    assert!(
        printed.contains(&format!("re-checked failed:{}", proof.failure)),
        "{printed}"
    );
    let _ = std::fs::remove_dir_all(&evidence);
}

/// Without a model of its own the gateway asks another provider of the model to referee, one
/// its operator trusts; with no trusted referee, a merkle answer is not delivered unless the
/// operator allowed unrefereed answers, and then it says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn providers_referee_each_other() {
    let options = GatewayOptions {
        no_local_referee: true,
        trust_providers: true,
        ..Default::default()
    };
    let mesh = Mesh::start_with(&[HONEST, HONEST], options.clone()).await;
    let (a, b) = (mesh.providers[0].peer_id, mesh.providers[1].peer_id);
    let body = chat_body(
        STORY,
        json!({"verification_mode": "merkle", "max_tokens": 48}),
    );
    for (served, other) in [(a, b), (b, a)] {
        let (status, headers, answer) = mesh.chat_with(body.clone(), Some(served)).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(header(&headers, "x-proofmesh-verdict"), "passed");
        assert_eq!(header(&headers, "x-proofmesh-referee"), other.to_string());
        assert_eq!(header(&headers, "x-proofmesh-audit-tier"), "exact");
    }
    // A cheat among them is caught by its honest peers (one accuses, the other confirms).
    let mut mesh = mesh;
    mesh.add_provider(ProviderSpec::serving(
        "cheat",
        support::attack_model(Variant::FfnDownQ4_0),
    ))
    .await;
    mesh.wait_for_providers(3).await;
    assert_eq!(
        assert_caught(&mesh, "cheat", 64).await,
        "failed:logits_diverge"
    );

    let alone = Mesh::start_with(&[HONEST], options.clone()).await;
    let (status, _, answer) = alone.chat(body.clone()).await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["error"]["code"], "no_provider_available", "{answer}");
    let opted_in = Mesh::start_with(
        &[HONEST],
        GatewayOptions {
            allow_unrefereed: true,
            ..options
        },
    )
    .await;
    let (status, headers, answer) = opted_in.chat(body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(header(&headers, "x-proofmesh-verdict"), "unrefereed");
    assert_eq!(answer["proofmesh"]["verdict"], "unrefereed");
}
