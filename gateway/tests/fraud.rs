//! `verification_mode: "fraud"` through the real path: a real gateway refereeing with its own
//! copy of the default model, an honest provider and one that runs a cheaper quantization
//! while claiming the default model, libp2p on loopback, plain HTTP.
//!
//! Answers are released at once and audited afterwards; the verdict (with the fraud proof of a
//! failure) is read back at `GET /v1/audits/{id}`. The gateway here audits every answer of a
//! provider on probation (one passed audit ends it) and none of an established one, so that
//! both paths show in one run. A third provider never opens its leaves.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::{Duration, Instant};

use proofmesh_gateway::auditor::policy::FraudPolicy;
use proofmesh_provider::Tamper;
use proofmesh_provider::variants::Variant;
use proofmesh_shared::verify::{AuditFailure, FraudProof};
use serde_json::{Value, json};
use support::{GatewayOptions, HONEST, Mesh, ProviderSpec, chat_body, header};

/// A prompt whose answer runs to `max_tokens`.
const STORY: &str = "Write a long story about a lighthouse keeper who finds a map. \
                     Describe every place and every person in detail.";

fn fraud(max_tokens: u32) -> Value {
    json!({"verification_mode": "fraud", "max_tokens": max_tokens})
}

/// `GET /v1/audits/{id}`: status and body.
async fn audit(mesh: &Mesh, id: &str) -> (u16, Value) {
    let response = reqwest::get(mesh.url(&format!("/v1/audits/{id}")))
        .await
        .expect("audit");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Polls the audit until it is no longer pending (at most 120 s).
async fn verdict(mesh: &Mesh, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, report) = audit(mesh, id).await;
        assert_eq!(status, 200, "{report}");
        if report["status"] != "pending" {
            return report;
        }
        assert!(Instant::now() < deadline, "still pending: {report}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Flips each byte of the proof's CBOR in turn, as a forger or a bad disk would: `check-proof`
/// (which reads the file with [`FraudProof::from_cbor`], then asks [`FraudProof::holds`]) must reject every copy, whatever
/// field the byte falls in: the commitment, an opening, the evidence, the request, the tokens,
/// the challenge, the recorded failure.
fn every_flipped_byte_is_rejected(proof: &FraudProof, trusted: &[libp2p::PeerId]) {
    assert_eq!(proof.holds(trusted), Ok(proof.failure), "the proof itself");
    let bytes = proof.to_cbor();
    let started = Instant::now();
    let mut undecodable = 0;
    for at in 0..bytes.len() {
        let mut flipped = bytes.clone();
        flipped[at] ^= 0x01;
        let Ok(forged) = FraudProof::from_cbor(&flipped) else {
            undecodable += 1;
            continue;
        };
        if let Ok(failure) = forged.holds(trusted) {
            panic!(
                "byte {at} of {} flipped ({}), and the proof still holds ({failure})",
                bytes.len(),
                changed(proof, &forged)
            );
        }
    }
    eprintln!(
        "{} bytes flipped one at a time: every copy rejected ({undecodable} not read as a proof) in {:?}",
        bytes.len(),
        started.elapsed()
    );
}

/// What differs between two proofs, field by field.
fn changed(proof: &FraudProof, forged: &FraudProof) -> String {
    let a = format!("{:#?}", proof);
    let b = format!("{:#?}", forged);
    a.lines()
        .zip(b.lines())
        .filter(|(x, y)| x != y)
        .map(|(x, y)| format!("{} -> {}", x.trim(), y.trim()))
        .collect::<Vec<_>>()
        .join("; ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fraud_answers_are_released_first_and_audited_after() {
    let cheat = ProviderSpec::serving("q4_0", support::attack_model(Variant::Q4_0));
    let options = GatewayOptions {
        fraud: Some(FraudPolicy {
            rate: 0.0,
            probation_rate: 1.0,
            // Short, so that payments come due within the test (audits must end 4 s before).
            window: Duration::from_secs(40),
            // Not the product's 120 s: the silent provider below would hold the test up.
            open_patience: Duration::from_secs(2),
        }),
        probation_audits: Some(1),
        failed_audit_cooldown: Duration::from_secs(600),
        ..GatewayOptions::default()
    };
    let honest = ProviderSpec {
        name: "honest",
        ..HONEST
    };
    let silent = ProviderSpec::tampering("silent", Tamper::NeverOpens);
    let mesh = Mesh::start_with(&[honest, cheat, silent], options).await;
    let (honest, cheat, silent) = (
        mesh.providers[0].peer_id,
        mesh.providers[1].peer_id,
        mesh.providers[2].peer_id,
    );

    // The honest provider, on probation: released with an audit id, then audited and passed.
    let (status, headers, answer) = mesh
        .chat_with(chat_body(STORY, fraud(48)), Some(honest))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(header(&headers, "x-proofmesh-mode"), "fraud");
    assert_eq!(header(&headers, "x-proofmesh-verdict"), "deferred");
    let id = header(&headers, "x-proofmesh-audit-id").to_string();
    assert_eq!(answer["proofmesh"]["audit_id"], json!(id));
    assert!(
        answer["proofmesh"]["audit_window_closes_at"]
            .as_u64()
            .is_some()
    );
    let report = verdict(&mesh, &id).await;
    assert_eq!(report["status"], "passed", "{report}");
    assert_eq!(report["provider"], json!(honest.to_string()));
    assert_eq!(report["referee"], "local");
    assert_eq!(report["tier"], "exact");
    assert_eq!(report["merkle_root"], answer["proofmesh"]["merkle_root"]);
    // Challenged like a merkle answer (more steps on probation).
    assert!(
        report["challenged"].as_array().unwrap().len() >= 16,
        "{report}"
    );
    assert!(report.get("proof_cbor_hex").is_none());
    // The work it deferred is reported with the verdict.
    assert!(report["audit_ms"].as_u64().is_some(), "{report}");
    assert!(
        report["evidence_bytes"].as_u64().unwrap_or(0) > 0,
        "{report}"
    );

    // Off probation now, at rate 0: a streamed answer is released and never drawn. Its audit
    // id is in the headers, before any token, and on the finish chunk.
    let mut body = chat_body(STORY, fraud(16));
    body["stream"] = json!(true);
    // (A spec's name pins the request to its provider.)
    body["model"] = json!("honest");
    let (status, headers, events) = mesh.chat_stream(body.clone()).await;
    assert_eq!(status, 200);
    let id = header(&headers, "x-proofmesh-audit-id").to_string();
    assert!(id.starts_with("aud_"), "{id}");
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let finish: Value = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .find(|e| e["proofmesh"].is_object())
        .expect("a finish chunk with proofmesh");
    assert_eq!(finish["proofmesh"]["audit_id"], json!(id));
    assert_eq!(finish["proofmesh"]["verdict"], "deferred");
    let (status, report) = audit(&mesh, &id).await;
    assert_eq!(
        (status, report["status"].as_str()),
        (200, Some("not_sampled"))
    );

    // The cheat, new and so on probation: its answer reaches the client at once (that is the
    // bargain of fraud mode), then its audit fails and proves it.
    let (status, headers, answer) = mesh
        .chat_with(chat_body(STORY, fraud(48)), Some(cheat))
        .await;
    assert_eq!(status, 200, "{answer}");
    assert!(
        !answer["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or("")
            .is_empty()
    );
    let id = header(&headers, "x-proofmesh-audit-id").to_string();
    let report = verdict(&mesh, &id).await;
    assert_eq!(report["status"], "failed", "{report}");
    assert_eq!(report["reason"], "logits_diverge");
    assert_eq!(report["provider"], json!(cheat.to_string()));
    let bytes = hex::decode(report["proof_cbor_hex"].as_str().expect("a proof")).unwrap();
    let proof: FraudProof = ciborium::from_reader(bytes.as_slice()).expect("cbor");
    // It holds for anyone who trusts the gateway's engine, which refereed it.
    assert_eq!(
        proof.check_trusting(&[mesh.gateway_peer]),
        Ok(AuditFailure::LogitsDiverge)
    );
    assert_eq!(
        proof.commitment.commitment.steps,
        report["steps"].as_u64().unwrap() as u32
    );
    every_flipped_byte_is_rejected(&proof, &[mesh.gateway_peer]);

    // The cheat is benched: no provider is left for a request pinned to it.
    let (status, _, answer) = mesh
        .chat_with(chat_body(STORY, fraud(8)), Some(cheat))
        .await;
    assert_eq!(status, 503, "{answer}");
    // The honest provider was never penalised and still serves.
    let (status, _, answer) = mesh
        .chat_with(chat_body("Hi", fraud(4)), Some(honest))
        .await;
    assert_eq!(status, 200, "{answer}");

    // A provider that never opens the leaves of an answer it already released (as a cheat
    // would for just the answers it faked): asked for a while, then held to have withheld
    // them, and benched like a failure. Streamed this time: the id is in the headers.
    let mut body = chat_body(STORY, fraud(16));
    body["stream"] = json!(true);
    body["model"] = json!("silent");
    let (status, headers, events) = mesh.chat_stream(body).await;
    assert_eq!(status, 200);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let id = header(&headers, "x-proofmesh-audit-id").to_string();
    let report = verdict(&mesh, &id).await;
    assert_eq!(report["status"], "withheld", "{report}");
    assert_eq!(report["provider"], json!(silent.to_string()));
    assert!(report.get("proof_cbor_hex").is_none());
    let (status, _, answer) = mesh
        .chat_with(chat_body(STORY, fraud(8)), Some(silent))
        .await;
    assert_eq!(status, 503, "{answer}");

    // The ledger (GET /v1/providers). The honest provider was paid for the answer whose audit
    // passed, holds the two undrawn ones until their window closes, and is paid at once for a
    // merkle answer (checked before release); the cheat and the silent one forfeited theirs.
    let merkle = json!({"verification_mode": "merkle", "max_tokens": 4});
    let (status, _, answer) = mesh.chat_with(chat_body("Hi", merkle), Some(honest)).await;
    assert_eq!(status, 200, "{answer}");
    let merkle_price = answer["usage"]["total_tokens"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let providers = loop {
        let providers = mesh.providers_by_id().await;
        let paid = &providers[&honest.to_string()]["ledger"]["answers_paid"];
        if *paid == 2 || Instant::now() > deadline {
            break providers;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let ledger = &providers[&honest.to_string()]["ledger"];
    assert_eq!(ledger["answers_paid"], 2, "{ledger}");
    assert!(
        ledger["balance"].as_u64().unwrap() > merkle_price,
        "{ledger}"
    );
    assert!(ledger["held"].as_u64().unwrap() > 0, "{ledger}");
    assert_eq!(ledger["forfeited"], 0, "{ledger}");
    for peer in [cheat, silent] {
        let report = &providers[&peer.to_string()];
        let ledger = &report["ledger"];
        assert_eq!(
            (
                &ledger["answers_paid"],
                &ledger["answers_forfeited"],
                &ledger["held"]
            ),
            (&json!(0), &json!(1), &json!(0)),
            "{report}"
        );
    }
    assert_eq!(
        providers[&cheat.to_string()]["reputation"]["audits_failed"],
        1
    );
    assert_eq!(
        providers[&silent.to_string()]["reputation"]["audits_withheld"],
        1
    );
    // Once their window closes with nothing proven, the undrawn answers are paid too.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let now = mesh.providers_by_id().await;
        let ledger = &now[&honest.to_string()]["ledger"];
        if ledger["held"] == 0 {
            assert_eq!(ledger["answers_paid"], 4, "{ledger}");
            break;
        }
        assert!(Instant::now() < deadline, "still held: {ledger}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Ids that were never issued, or are not ids.
    let never = format!("aud_{}", "0".repeat(32));
    for id in [never.as_str(), "aud_zz", "nonsense"] {
        let (status, body) = audit(&mesh, id).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (404, Some("audit_not_found"))
        );
    }
}

/// Requests sent at most before the sometimes-cheat must have been caught: at a 20 % audit rate
/// and one cheat in ten, about one in 50 of its answers is caught; with half the traffic, it
/// goes uncaught through 1,000 requests with a chance of about 4 in 100,000.
const MAX_REQUESTS: u32 = 1000;

/// Stake each provider declares in this test, µcr.
const STAKE: u64 = 10_000_000;

/// #14's first acceptance point: one honest provider and one that cheats on a tenth of its
/// requests, `fraud` mode at a 20 % audit rate. The cheat is caught (an audit fails, with a
/// proof that holds), excluded, forfeits every payment it had held and half its stake, and is
/// paid only for answers an audit showed honest; the honest provider is paid for each passed
/// audit and never penalised.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_cheats_now_and_then_is_caught_by_sampled_audits() {
    let options = GatewayOptions {
        fraud: Some(FraudPolicy {
            rate: 0.2,
            probation_rate: 0.2,
            // Longer than the test: no payment comes due by its window closing.
            window: Duration::from_secs(1800),
            open_patience: Duration::from_secs(2),
        }),
        failed_audit_cooldown: Duration::from_secs(600),
        ..GatewayOptions::default()
    };
    let honest = ProviderSpec {
        name: "honest",
        stake: STAKE,
        ..HONEST
    };
    let cheat = ProviderSpec {
        stake: STAKE,
        ..ProviderSpec::tampering("sometimes", Tamper::OffPolicySometimes)
    };
    let mesh = Mesh::start_with(&[honest, cheat], options).await;
    let (honest, cheat) = (
        mesh.providers[0].peer_id.to_string(),
        mesh.providers[1].peer_id.to_string(),
    );
    // (provider, audit id) of every answer released.
    let mut released: Vec<(String, String)> = Vec::new();
    let mut caught: Option<Value> = None;
    let mut sent = 0;
    while caught.is_none() {
        sent += 1;
        assert!(
            sent <= MAX_REQUESTS,
            "the cheat was not caught in {MAX_REQUESTS} requests"
        );
        let prompt = format!("Tell me one fact about the number {sent}.");
        // Half the requests each, as the gateway's draw gives two equally quick providers:
        // this cheat holds its answer back to rewrite it, so its time to first token is a
        // whole answer's, and the draw would send it few (and the test would run long).
        let pin = mesh.providers[(sent % 2) as usize].peer_id;
        let (status, headers, answer) = mesh
            .chat_with(chat_body(&prompt, fraud(8)), Some(pin))
            .await;
        if status == 503 && pin.to_string() == cheat {
            // Benched since the last look: one of its audits failed.
            for (_, id) in released.iter().filter(|(p, _)| *p == cheat) {
                let report = verdict(&mesh, id).await;
                if report["status"] == "failed" {
                    caught = Some(report);
                    break;
                }
            }
            assert!(caught.is_some(), "benched without a failed audit: {answer}");
            break;
        }
        assert_eq!(status, 200, "{answer}");
        released.push((
            header(&headers, "x-proofmesh-provider").to_string(),
            header(&headers, "x-proofmesh-audit-id").to_string(),
        ));
        if sent % 10 == 0 {
            for (_, id) in released.iter().filter(|(p, _)| *p == cheat) {
                let (_, report) = audit(&mesh, id).await;
                if report["status"] == "failed" {
                    caught = Some(report);
                    break;
                }
            }
        }
    }
    let report = caught.unwrap_or_default();
    let bytes = hex::decode(report["proof_cbor_hex"].as_str().expect("a proof")).unwrap();
    let proof = FraudProof::from_cbor(&bytes).expect("a proof");
    assert!(proof.holds(&[mesh.gateway_peer]).is_ok(), "{report}");
    // It was one of the answers it cheated on.
    let id: [u8; 16] = hex::decode(report["request_id"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    assert!(proofmesh_provider::tamper::cheated_on(&id));
    let served = released.iter().filter(|(p, _)| *p == cheat).count();
    let (mut cheated, mut cheat_passed) = (0, 0);
    for (_, audit_id) in released.iter().filter(|(p, _)| *p == cheat) {
        let r = verdict(&mesh, audit_id).await;
        let id: [u8; 16] = hex::decode(r["request_id"].as_str().unwrap())
            .unwrap()
            .try_into()
            .unwrap();
        cheated += usize::from(proofmesh_provider::tamper::cheated_on(&id));
        cheat_passed += usize::from(r["status"] == "passed");
    }
    eprintln!(
        "caught after {sent} requests: the cheat had served {served} and cheated on {cheated}"
    );
    // Excluded from now on.
    let peer = mesh.providers[1].peer_id;
    let (status, _, _) = mesh.chat_with(chat_body("Hi", fraud(4)), Some(peer)).await;
    assert_eq!(status, 503);
    // The honest provider: every audit of it passed or was not drawn, and it still serves.
    let mut honest_passed = 0;
    for (_, id) in released.iter().filter(|(p, _)| *p == honest) {
        let report = verdict(&mesh, id).await;
        let status = report["status"].as_str().unwrap_or("");
        assert!(matches!(status, "passed" | "not_sampled"), "{report}");
        honest_passed += usize::from(status == "passed");
    }

    // The ledger, as GET /v1/providers shows it. The cheat forfeited every payment it still
    // had held (all but those of answers an audit passed first) and half its stake.
    let providers = mesh.providers_by_id().await;
    let cheat_report = &providers[cheat.as_str()];
    let ledger = &cheat_report["ledger"];
    eprintln!("the cheat: {cheat_report}");
    assert_eq!(ledger["held"], 0, "{cheat_report}");
    assert!(
        ledger["answers_forfeited"].as_u64().unwrap() >= 1,
        "{cheat_report}"
    );
    let paid = ledger["answers_paid"].as_u64().unwrap();
    assert!(
        paid <= cheat_passed as u64,
        "paid for an unaudited answer: {cheat_report}"
    );
    assert_eq!(
        paid + ledger["answers_forfeited"].as_u64().unwrap(),
        served as u64,
        "{cheat_report}"
    );
    assert_eq!(ledger["stake_declared"], STAKE);
    // Each proven fraud slashes half of what stands: once, or more often when audits of other
    // answers it faked were running as the first failed.
    let failed = cheat_report["reputation"]["audits_failed"]
        .as_u64()
        .unwrap();
    assert!(failed >= 1, "{cheat_report}");
    assert_eq!(
        ledger["stake_slashed"].as_u64(),
        Some(STAKE - (STAKE >> failed)),
        "{cheat_report}"
    );
    assert!(cheat_report["reputation"]["benched_until"].is_u64());
    // The honest one was paid for each passed audit, and lost nothing.
    let honest_report = &providers[honest.as_str()];
    eprintln!("the honest provider: {honest_report}");
    let ledger = &honest_report["ledger"];
    assert_eq!(
        ledger["answers_paid"], honest_passed as u64,
        "{honest_report}"
    );
    assert_eq!(ledger["answers_forfeited"], 0);
    assert_eq!(
        (ledger["stake"].as_u64(), ledger["stake_slashed"].as_u64()),
        (Some(STAKE), Some(0))
    );
    assert_eq!(honest_report["reputation"]["audits_failed"], 0);
    assert!(honest_passed == 0 || ledger["balance"].as_u64().unwrap() > 0);

    let (status, _, _) = mesh.chat(chat_body("Hi", fraud(4))).await;
    assert_eq!(status, 200);
}
