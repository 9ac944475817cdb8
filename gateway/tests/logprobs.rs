//! `logprobs` through the real path: a real gateway and providers on loopback, the real engine.
//!
//! The log-probabilities a client gets are read off the step leaves the provider streamed, and
//! those must hash to its signed Merkle root: so they are the committed values, which the audit
//! compares with a referee's. In the exact tier a referee's re-execution computes the same bits,
//! which the first test checks against an engine of its own; the second shows that a provider
//! streaming other values than it committed fails every request, in every mode.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use proofmesh_provider::Tamper;
use proofmesh_provider::engine::{Engine, EngineConfig, Job, StepEvent};
use proofmesh_shared::protocol::{ChatMessage, RequestId};
use proofmesh_shared::sampling::SamplerParams;
use serde_json::{Value, json};
use support::{HONEST, Mesh, ProviderSpec, chat_body, header};

const PROMPT: &str = "Name three colours of the rainbow.";
const MAX_TOKENS: u32 = 24;

/// The `(bytes, logprob bits, [(bytes, logprob bits)])` of each entry of a `logprobs.content`.
type Entries = Vec<(Vec<u8>, u32, Vec<(Vec<u8>, u32)>)>;

fn bytes_of(v: &Value) -> Vec<u8> {
    v.as_array()
        .expect("bytes")
        .iter()
        .map(|b| b.as_u64().expect("a byte") as u8)
        .collect()
}

/// The f32 a JSON number holds: the gateway writes each f32 exactly as an f64.
fn bits_of(v: &Value) -> u32 {
    let wide = v.as_f64().expect("a logprob");
    let narrow = wide as f32;
    assert_eq!(f64::from(narrow), wide, "{wide} is not an f32");
    narrow.to_bits()
}

fn entries(content: &[Value]) -> Entries {
    content
        .iter()
        .map(|e| {
            let top = e["top_logprobs"]
                .as_array()
                .expect("top_logprobs")
                .iter()
                .map(|t| (bytes_of(&t["bytes"]), bits_of(&t["logprob"])))
                .collect();
            (bytes_of(&e["bytes"]), bits_of(&e["logprob"]), top)
        })
        .collect()
}

/// The greedy answer's token ids and the referee's view of each step, from an engine of the
/// test's own with the providers' deterministic numerics.
async fn referee_view() -> (Vec<Vec<u8>>, Vec<proofmesh_shared::verify::RefereeStep>) {
    let mut config = EngineConfig::new(support::model_path());
    config.parallel = 1;
    config.referee_slots = 1;
    let engine = tokio::task::spawn_blocking(move || Engine::start(&config))
        .await
        .unwrap()
        .expect("engine");
    let prompt = engine
        .tokenize_chat(&[ChatMessage {
            role: "user".into(),
            content: PROMPT.into(),
        }])
        .unwrap();
    let sampler = SamplerParams {
        temperature: 0.0,
        ..Default::default()
    };
    let (events, mut rx) = tokio::sync::mpsc::unbounded_channel();
    engine
        .submit(Job {
            request_id: RequestId::random(),
            prompt: prompt.clone(),
            sampler,
            max_tokens: MAX_TOKENS,
            events,
            guide: None,
        })
        .unwrap();
    let mut tokens = Vec::new();
    let mut pieces = Vec::new();
    while let Some(event) = rx.recv().await {
        match event {
            StepEvent::Step { leaf, piece } => {
                tokens.push(leaf.token);
                pieces.push(piece);
            }
            StepEvent::Finished { .. } => break,
            StepEvent::Failed { message } => panic!("{message}"),
        }
    }
    let reexecution = engine.reexecute(prompt, sampler, MAX_TOKENS).unwrap();
    reexecution.push(tokens).unwrap();
    let steps = reexecution.finish().await.unwrap().steps;
    (pieces, steps)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_of_a_greedy_answer_are_the_referees_bit_for_bit() {
    let mesh = Mesh::start(&[HONEST]).await;
    let body = chat_body(
        PROMPT,
        json!({"max_tokens": MAX_TOKENS, "logprobs": true, "top_logprobs": 5, "verification_mode": "merkle"}),
    );
    let (status, headers, answer) = mesh.chat(body.clone()).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(header(&headers, "x-proofmesh-verdict"), "passed");
    let content = answer["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("logprobs.content")
        .clone();
    let got = entries(&content);
    // Every entry in OpenAI's shape; greedy, so each token is its step's most likely one.
    for (entry, (bytes, logprob, top)) in content.iter().zip(&got) {
        assert_eq!(entry["token"], String::from_utf8_lossy(bytes).as_ref());
        assert!(f32::from_bits(*logprob) <= 0.0, "{entry}");
        assert_eq!(top.len(), 5, "{entry}");
        assert_eq!(
            top[0].1, *logprob,
            "greedy picks the most likely token: {entry}"
        );
        assert!(
            top.windows(2)
                .all(|w| f32::from_bits(w[0].1) >= f32::from_bits(w[1].1))
        );
    }
    let text: Vec<u8> = got.iter().flat_map(|(b, _, _)| b.clone()).collect();
    assert_eq!(
        String::from_utf8_lossy(&text),
        answer["choices"][0]["message"]["content"].as_str().unwrap()
    );

    // The referee's re-execution of the same tokens gives the same bits.
    let (pieces, steps) = referee_view().await;
    let shown: Vec<(Vec<u8>, &proofmesh_shared::verify::RefereeStep)> = pieces
        .into_iter()
        .zip(&steps)
        .filter(|(piece, _)| !piece.is_empty())
        .collect();
    assert_eq!(shown.len(), got.len(), "the same greedy answer");
    for (i, ((piece, step), (bytes, logprob, top))) in shown.iter().zip(&got).enumerate() {
        assert_eq!(piece, bytes, "token {i}");
        let best = step.top[0].logit - step.logsumexp;
        assert_eq!(
            *logprob,
            best.to_bits(),
            "token {i}: {} against {best}",
            f32::from_bits(*logprob)
        );
        for (j, ((_, alt), referee)) in top.iter().zip(&step.top).enumerate() {
            let expected = referee.logit - step.logsumexp;
            assert_eq!(*alt, expected.to_bits(), "token {i}, alternative {j}");
        }
    }

    // Streamed, the same values arrive chunk by chunk.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (status, _, data) = mesh.chat_stream(streamed).await;
    assert_eq!(status, 200);
    let mut content = Vec::new();
    for event in data.iter().filter(|d| *d != "[DONE]") {
        let chunk: Value = serde_json::from_str(event).unwrap();
        assert!(chunk.get("error").is_none(), "{chunk}");
        if let Some(part) = chunk["choices"][0]["logprobs"]["content"].as_array() {
            content.extend(part.iter().cloned());
        }
    }
    assert_eq!(entries(&content), got, "streamed logprobs");

    // Asked for wrongly, or where they cannot be given.
    for (extra, param) in [
        (
            json!({"logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
        ),
        (json!({"top_logprobs": 3}), "top_logprobs"),
        (
            json!({"logprobs": true, "verification_mode": "consensus"}),
            "logprobs",
        ),
    ] {
        let (status, _, error) = mesh.chat(chat_body(PROMPT, extra)).await;
        assert_eq!(status, 400, "{error}");
        assert_eq!(error["error"]["param"], param, "{error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_reports_other_logprobs_than_it_committed_fails_every_request() {
    let mesh = Mesh::start(&[ProviderSpec::tampering(
        "fake-logprobs",
        Tamper::FakeLogprobs,
    )])
    .await;
    for (mode, temperature) in [
        ("merkle", 0.0),
        ("none", 0.8),
        ("fraud", 0.0),
        ("none", 0.0),
    ] {
        let body = chat_body(
            PROMPT,
            json!({"model": "fake-logprobs", "logprobs": true, "top_logprobs": 2,
                   "verification_mode": mode, "temperature": temperature}),
        );
        let (status, _, answer) = mesh.chat(body.clone()).await;
        assert_eq!(status, 502, "{mode}: {answer}");
        assert_eq!(answer["error"]["code"], "verification_failed", "{mode}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("failed:leaves_mismatch"),
            "{mode}: {message}"
        );

        let mut streamed = body;
        streamed["stream"] = json!(true);
        let (_, _, data) = mesh.chat_stream(streamed).await;
        let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
        assert_eq!(
            last["error"]["code"], "verification_failed",
            "{mode}: {last}"
        );
        assert!(
            !data.iter().any(|d| d == "[DONE]"),
            "{mode}: a stream that failed completed"
        );
    }
    // Without logprobs the same provider is honest, and its answers pass.
    // (Its neighbour below signs the surer values; the referee's logsumexp shows them.)
    let body = chat_body(
        PROMPT,
        json!({"model": "fake-logprobs", "verification_mode": "merkle"}),
    );
    let (status, _, answer) = mesh.chat(body).await;
    assert_eq!(status, 200, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_commits_surer_logprobs_than_the_model_fails_its_audit() {
    let mesh = Mesh::start(&[ProviderSpec::tampering("surer", Tamper::SurerLogprobs)]).await;
    for temperature in [0.0, 0.8] {
        let body = chat_body(
            PROMPT,
            json!({"model": "surer", "logprobs": true, "verification_mode": "merkle",
                   "temperature": temperature}),
        );
        let (status, _, answer) = mesh.chat(body).await;
        assert_eq!(status, 502, "{answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains("failed:logits_diverge"), "{message}");
    }
}
