//! What operators rely on, through a real gateway: the committed OpenAPI document matches the
//! code, `/openapi.json` and the offline API reference are served, readiness follows the
//! providers, `/metrics` parses and moves, and a stream still running at the drain deadline ends
//! with a clear error event.

// Test code: a failure is a failed test and should say so loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{
    HONEST, Mesh, chat_body, metric_sum, parse_metrics, read_stream_signalling, start_gateway,
};

const COMMITTED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../openapi/openapi.json");

/// CI's freshness check: the committed document is exactly what the code generates.
#[test]
fn committed_openapi_document_is_fresh() {
    let committed = std::fs::read_to_string(COMMITTED).expect("openapi/openapi.json exists");
    let generated = proofmesh_gateway::openapi::document_json();
    assert!(
        committed == generated,
        "openapi/openapi.json is stale; regenerate it with\n  \
         cargo run -p proofmesh-gateway -- openapi > openapi/openapi.json"
    );
    let doc: Value = serde_json::from_str(&generated).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let schemas = &doc["components"]["schemas"];
    assert!(schemas["ChatCompletionRequest"]["properties"]["verification_mode"].is_object());
    assert!(schemas["ErrorObject"]["properties"]["code"].is_object());
    let ok = &doc["paths"]["/v1/chat/completions"]["post"]["responses"]["200"];
    for header in [
        "x-proofmesh-verdict",
        "x-proofmesh-merkle-root",
        "x-proofmesh-provider",
    ] {
        assert!(ok["headers"][header].is_object(), "{header} undocumented");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docs_are_served_offline_and_readiness_follows_providers() {
    let (mut mesh, _) = start_gateway().await;
    let http = reqwest::Client::new();

    let served: Value = http
        .get(mesh.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let generated: Value =
        serde_json::from_str(&proofmesh_gateway::openapi::document_json()).unwrap();
    assert_eq!(served, generated);

    // The reference page and every asset it loads come from the gateway itself.
    let page = http.get(mesh.url("/docs/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("swagger"), "{html}");
    for src in html
        .split("src=\"")
        .skip(1)
        .filter_map(|s| s.split('"').next())
    {
        assert!(!src.starts_with("http"), "page loads {src} from elsewhere");
        let asset = http
            .get(mesh.url(&format!("/docs/{}", src.trim_start_matches("./"))))
            .send()
            .await
            .unwrap();
        assert_eq!(asset.status(), 200, "{src}");
    }
    let init = http
        .get(mesh.url("/docs/swagger-initializer.js"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(init.contains("/openapi.json"), "{init}");

    // Not ready without providers; ready with one.
    let not_ready = http.get(mesh.url("/readyz")).send().await.unwrap();
    assert_eq!(not_ready.status(), 503);
    assert_eq!(
        not_ready.json::<Value>().await.unwrap()["status"],
        "no_providers"
    );
    mesh.add_provider(HONEST).await;
    mesh.wait_for_providers(1).await;
    let ready = http.get(mesh.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_count_requests_by_mode_and_status() {
    let mesh = Mesh::start(&[HONEST]).await;
    let (status, _, _) = mesh
        .chat(chat_body("Say hi.", json!({"max_tokens": 8})))
        .await;
    assert_eq!(status, 200);
    let (status, _, _) = mesh
        .chat(chat_body(
            "Say hi.",
            json!({"max_tokens": 8, "verification_mode": "none"}),
        ))
        .await;
    assert_eq!(status, 200);
    let (status, _, _) = mesh
        .chat(chat_body("Say hi.", json!({"temperature": 7})))
        .await;
    assert_eq!(status, 400);

    let response = reqwest::get(mesh.url("/metrics")).await.unwrap();
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(content_type.starts_with("application/openmetrics-text"));
    let scrape = parse_metrics(&response.text().await.unwrap());
    let value = |name: &str, labels: &[(&str, &str)]| metric_sum(&scrape, name, labels);
    let requests = "proofmesh_gateway_requests_total";
    assert_eq!(
        value(requests, &[("mode", "merkle"), ("status", "200")]),
        1.0
    );
    assert_eq!(value(requests, &[("mode", "none"), ("status", "200")]), 1.0);
    assert_eq!(
        value(requests, &[("mode", "invalid"), ("status", "400")]),
        1.0
    );
    let audits = "proofmesh_gateway_audits_total";
    assert_eq!(value(audits, &[("verdict", "passed")]), 1.0);
    assert_eq!(value(audits, &[("verdict", "unaudited")]), 1.0);
    assert!(value("proofmesh_gateway_tokens_generated_total", &[]) >= 2.0);
    assert_eq!(value("proofmesh_gateway_providers", &[]), 1.0);
    assert_eq!(value("proofmesh_gateway_peers_connected", &[]), 1.0);
    assert_eq!(value("proofmesh_gateway_requests_in_flight", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_running_at_the_drain_deadline_ends_with_an_error_event() {
    let mut mesh = Mesh::start(&[HONEST]).await;
    let body = chat_body(
        "Write a long story about a lighthouse keeper.",
        json!({"stream": true, "max_tokens": 900, "temperature": 0.8, "seed": 7}),
    );
    let response = reqwest::Client::new()
        .post(mesh.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let (received, stopped_at) =
        read_stream_signalling(response, Duration::from_secs(60), || mesh.stop_gateway()).await;
    let stopped_at = stopped_at.expect("the stream never started");
    // The gateway's drain deadline is 1 s in the test fixtures.
    let ended_after = stopped_at.elapsed();
    assert!(
        ended_after < Duration::from_secs(5),
        "ended {ended_after:?} after the signal"
    );
    assert!(!received.contains("[DONE]"), "{received}");
    let last = received
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("data: "))
        .unwrap();
    let error: Value = serde_json::from_str(last).unwrap();
    assert_eq!(error["error"]["code"], "shutting_down", "{last}");
}
