//! `verification_mode: "consensus"` through the real path: a real gateway refereeing with its
//! own copy of the default model, real providers on loopback libp2p, plain HTTP.
//!
//! Two honest providers give the same answer to the same request and seed, so they agree
//! without a referee; an honest provider and one that emits an off-policy token differ, the
//! step where they first differ is challenged in the audit of each, and the cheat fails its
//! audit in every request while the honest answer is the one returned; two cheats that agree
//! on the same forgery are caught by the audit of a drawn share of agreements.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use proofmesh_gateway::auditor::policy::FraudPolicy;
use proofmesh_provider::Tamper;
use serde_json::{Value, json};
use support::{GatewayOptions, HONEST, Mesh, ProviderSpec, chat_body, header};

/// A prompt whose answer runs to `max_tokens`.
const STORY: &str = "Write a long story about a lighthouse keeper who finds a map. \
                     Describe every place and every person in detail.";

fn consensus(extra: Value) -> Value {
    let mut body = json!({"verification_mode": "consensus"});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    body
}

/// The gateway's `consensus` counter for `verdict` (`agreed`, `agreed_audited`, `differed`).
async fn counted(mesh: &Mesh, verdict: &str) -> f64 {
    mesh.metric("proofmesh_gateway_consensus_total", &[("verdict", verdict)])
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_honest_providers_agree() {
    let second = ProviderSpec {
        name: "second",
        ..HONEST
    };
    // No agreement drawn for an audit: this test is about agreement itself.
    let options = GatewayOptions {
        fraud: Some(FraudPolicy {
            rate: 0.0,
            probation_rate: 0.0,
            ..FraudPolicy::default()
        }),
        ..GatewayOptions::default()
    };
    let mesh = Mesh::start_with(&[HONEST, second], options).await;
    let ids: Vec<String> = mesh
        .providers
        .iter()
        .map(|p| p.peer_id.to_string())
        .collect();
    // Greedy, and sampled with the gateway's seed: the same tokens from both, by construction.
    let sampled = json!({"max_tokens": 16, "temperature": 0.9, "seed": 7});
    for extra in [json!({"max_tokens": 16}), sampled] {
        let (status, headers, body) = mesh
            .chat(chat_body("Name three colours.", consensus(extra)))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(header(&headers, "x-proofmesh-mode"), "consensus");
        assert_eq!(header(&headers, "x-proofmesh-verdict"), "agreed");
        let info = &body["proofmesh"];
        assert_eq!(info["consensus"]["agreed"], true, "{info}");
        assert!(info["consensus"].get("divergence").is_none(), "{info}");
        let members = info["consensus"]["providers"].as_array().unwrap();
        let mut asked: Vec<&str> = members
            .iter()
            .map(|m| m["provider"].as_str().unwrap())
            .collect();
        asked.sort_unstable();
        let mut expected: Vec<&str> = ids.iter().map(String::as_str).collect();
        expected.sort_unstable();
        assert_eq!(asked, expected, "both providers answered: {info}");
        assert_eq!(
            members[0]["merkle_root"], members[1]["merkle_root"],
            "the same answer, the same commitment root: {info}"
        );
        assert!(members.iter().all(|m| m["verdict"] == "agreed"), "{info}");
        assert!(info.get("referee").is_none(), "no referee needed: {info}");
    }

    // Streamed: one burst once the answers are compared, finish chunk carrying `proofmesh`.
    let (status, headers, events) = mesh
        .chat_stream(chat_body(
            "Name three colours.",
            consensus(json!({"stream": true, "max_tokens": 16})),
        ))
        .await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-proofmesh-verdict"), "agreed");
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(!text.is_empty());
    let last = chunks.last().unwrap();
    assert_eq!(last["proofmesh"]["consensus"]["agreed"], true, "{last}");

    assert_eq!(counted(&mesh, "agreed").await, 3.0);
    assert_eq!(counted(&mesh, "differed").await, 0.0);
    // Both providers were paid for each answer (each did the work), neither penalised.
    let providers = mesh.providers_by_id().await;
    for id in &ids {
        let report = &providers[id.as_str()];
        assert_eq!(report["ledger"]["answers_paid"], 3, "{report}");
        assert_eq!(report["reputation"]["audits_failed"], 0, "{report}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cheat_that_differs_fails_its_audit_every_time() {
    let cheat = ProviderSpec {
        // A cheat must not referee the honest provider.
        referee_slots: 0,
        ..ProviderSpec::tampering("off-policy", Tamper::OffPolicyToken)
    };
    // No bench, so that the cheat is in every consensus below.
    let mesh = Mesh::start_with(&[HONEST, cheat], GatewayOptions::default()).await;
    let (honest, cheat) = (
        mesh.providers[0].peer_id.to_string(),
        mesh.providers[1].peer_id.to_string(),
    );
    const REQUESTS: usize = 5;
    for n in 0..REQUESTS {
        // Long answers, of which an audit draws 16 steps: the cheat's one off-policy token
        // (step 1) is found because the answers first differ there, not by luck.
        let (status, headers, body) = mesh
            .chat(chat_body(
                &format!("{STORY} ({n})"),
                consensus(json!({"max_tokens": 128})),
            ))
            .await;
        assert_eq!(status, 200, "{body}");
        let info = &body["proofmesh"];
        assert_eq!(header(&headers, "x-proofmesh-provider"), honest, "{info}");
        assert_eq!(header(&headers, "x-proofmesh-verdict"), "passed", "{info}");
        assert_eq!(info["consensus"]["agreed"], false, "{info}");
        assert_eq!(info["consensus"]["divergence"], 1, "{info}");
        assert!(
            info["challenged"].as_array().unwrap().contains(&json!(1)),
            "{info}"
        );
        let members = info["consensus"]["providers"].as_array().unwrap();
        let verdict_of = |id: &str| {
            members
                .iter()
                .find(|m| m["provider"] == id)
                .map(|m| m["verdict"].as_str().unwrap().to_string())
                .unwrap()
        };
        assert_eq!(verdict_of(&honest), "passed", "{info}");
        assert_eq!(
            verdict_of(&cheat),
            "failed:sampler_mismatch",
            "request {n}: {info}"
        );
        assert!(
            info["referee"].as_str().is_some_and(|r| r != cheat),
            "{info}"
        );
    }
    assert_eq!(counted(&mesh, "differed").await, REQUESTS as f64);
    let providers = mesh.providers_by_id().await;
    let cheat_report = &providers[cheat.as_str()];
    assert_eq!(
        cheat_report["reputation"]["audits_failed"], REQUESTS,
        "{cheat_report}"
    );
    assert_eq!(cheat_report["ledger"]["answers_paid"], 0, "{cheat_report}");
    let honest_report = &providers[honest.as_str()];
    assert_eq!(
        honest_report["reputation"]["audits_failed"], 0,
        "{honest_report}"
    );
    assert_eq!(
        honest_report["ledger"]["answers_paid"], REQUESTS,
        "{honest_report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consensus_needs_as_many_providers_as_it_asks_for() {
    let options = GatewayOptions {
        failed_audit_cooldown: Duration::from_secs(600),
        ..GatewayOptions::default()
    };
    let mesh = Mesh::start_with(&[HONEST], options).await;
    let (status, _, body) = mesh
        .chat(chat_body("Hi", consensus(json!({"max_tokens": 4}))))
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "no_provider_available", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("needs 2 providers"), "{message}");
    // Several providers chosen by the gateway cannot be pinned to one.
    let peer = mesh.providers[0].peer_id;
    let (status, _, body) = mesh
        .chat_with(
            chat_body("Hi", consensus(json!({"max_tokens": 4}))),
            Some(peer),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "x-proofmesh-provider", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_cheats_that_agree_on_a_forgery_are_caught_when_drawn() {
    // Identities are free: two of one operator's, forging the same way, agree with each other.
    let cheats = [
        ProviderSpec {
            referee_slots: 0,
            ..ProviderSpec::tampering("one", Tamper::OffPolicyToken)
        },
        ProviderSpec {
            referee_slots: 0,
            ..ProviderSpec::tampering("two", Tamper::OffPolicyToken)
        },
    ];
    // Every agreement drawn, so that one request shows it.
    let options = GatewayOptions {
        fraud: Some(FraudPolicy {
            rate: 1.0,
            probation_rate: 1.0,
            ..FraudPolicy::default()
        }),
        ..GatewayOptions::default()
    };
    let mesh = Mesh::start_with(&cheats, options).await;
    let (status, _, body) = mesh
        .chat(chat_body(
            "Name a colour.",
            consensus(json!({"max_tokens": 8})),
        ))
        .await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "verification_failed", "{body}");
    assert_eq!(counted(&mesh, "agreed_audited").await, 1.0);
    let providers = mesh.providers_by_id().await;
    for cheat in &mesh.providers {
        let report = &providers[cheat.peer_id.to_string().as_str()];
        assert_eq!(report["reputation"]["audits_failed"], 1, "{report}");
        assert_eq!(report["ledger"]["answers_paid"], 0, "{report}");
    }
}
