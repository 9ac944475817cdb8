//! `POST /v1/completions` through the real path: a text prompt, run without a chat template,
//! committed, audited and paid like a chat completion, answered in the legacy shape.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use proofmesh_provider::Tamper;
use serde_json::{Value, json};
use support::{HONEST, MODEL, Mesh, ProviderSpec, header};

const PROMPT: &str = "The capital of France is";

async fn complete(
    mesh: &Mesh,
    body: Value,
    pin: Option<libp2p::PeerId>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut request = reqwest::Client::new()
        .post(mesh.url("/v1/completions"))
        .json(&body);
    if let Some(peer) = pin {
        request = request.header("x-proofmesh-provider", peer.to_string());
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (
        status,
        headers,
        response.json().await.unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_completion_is_committed_audited_and_shaped_like_openais() {
    let mut specs = vec![HONEST];
    specs.push(ProviderSpec::tampering(
        "fake-logprobs",
        Tamper::FakeLogprobs,
    ));
    let mesh = Mesh::start(&specs).await;
    let honest = Some(mesh.providers[0].peer_id);
    let body = json!({"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 0,
                      "logprobs": 2, "verification_mode": "merkle"});
    let (status, headers, answer) = complete(&mesh, body.clone(), honest).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(header(&headers, "x-proofmesh-verdict"), "passed");
    assert_eq!(answer["object"], "text_completion");
    assert!(
        answer["id"].as_str().unwrap().starts_with("cmpl-"),
        "{answer}"
    );
    assert_eq!(answer["proofmesh"]["verdict"], "passed");
    let choice = &answer["choices"][0];
    let text = choice["text"].as_str().unwrap();
    assert!(!text.is_empty(), "{answer}");
    assert!(["stop", "length"].contains(&choice["finish_reason"].as_str().unwrap()));
    assert!(answer["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    // The legacy logprobs: tokens that make up the text, where each starts, two alternatives.
    let logprobs = &choice["logprobs"];
    let tokens: Vec<&str> = logprobs["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens.concat(), text);
    let offsets: Vec<u64> = logprobs["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap())
        .collect();
    assert_eq!(offsets[0], 0);
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]), "{offsets:?}");
    for (lp, top) in logprobs["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .zip(logprobs["top_logprobs"].as_array().unwrap())
    {
        assert!(lp.as_f64().unwrap() <= 0.0);
        let top = top.as_object().unwrap();
        assert!(!top.is_empty() && top.len() <= 2, "{top:?}");
    }

    // Streamed: the same text, in text_completion chunks.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let response = reqwest::Client::new()
        .post(mesh.url("/v1/completions"))
        .header(
            "x-proofmesh-provider",
            mesh.providers[0].peer_id.to_string(),
        )
        .json(&streamed)
        .send()
        .await
        .unwrap();
    let raw = response.text().await.unwrap();
    let mut text_streamed = String::new();
    let mut finished = false;
    for line in raw.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            continue;
        }
        let chunk: Value = serde_json::from_str(line).unwrap();
        assert_eq!(chunk["object"], "text_completion", "{chunk}");
        if let Some(choice) = chunk["choices"].as_array().and_then(|c| c.first()) {
            text_streamed.push_str(choice["text"].as_str().unwrap_or(""));
            finished |= choice["finish_reason"].is_string();
        }
    }
    assert_eq!(text_streamed, text);
    assert!(finished, "{raw}");

    // echo puts the prompt first.
    let (status, _, echoed) = complete(
        &mesh,
        json!({"model": MODEL, "prompt": [PROMPT], "max_tokens": 12,
        "temperature": 0, "echo": true}),
        honest,
    )
    .await;
    assert_eq!(status, 200, "{echoed}");
    assert_eq!(
        echoed["choices"][0]["text"].as_str().unwrap(),
        format!("{PROMPT}{text}")
    );

    // A provider lying about its logprobs fails here as on chat.
    let cheat = Some(mesh.providers[1].peer_id);
    let (status, _, error) = complete(&mesh, body, cheat).await;
    assert_eq!(status, 502, "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("leaves_mismatch"),
        "{error}"
    );

    for (body, param) in [
        (json!({"model": MODEL, "prompt": ["a", "b"]}), "prompt"),
        (
            json!({"model": MODEL, "prompt": "a", "logprobs": 6}),
            "logprobs",
        ),
    ] {
        let (status, _, error) = complete(&mesh, body, None).await;
        assert_eq!(status, 400, "{error}");
        assert_eq!(error["error"]["param"], param);
    }
}
