//! What both binaries' `/metrics` endpoints share: the text encoding and histogram buckets.
//! Metric names follow llama.cpp's server (`prompt_tokens_total`, `tokens_predicted_total`,
//! `requests_processing`, `requests_deferred`, …) under a `proofmesh_` prefix.

use prometheus_client::registry::Registry;

/// Content type of [`encode`]'s output (OpenMetrics text, which Prometheus scrapes natively).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The registry in OpenMetrics text format.
pub fn encode(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut body = String::new();
    prometheus_client::encoding::text::encode(&mut body, registry)?;
    Ok(body)
}

/// The `/metrics` HTTP response for `registry` (500 if it cannot be encoded), for both binaries'
/// handlers.
pub fn response(registry: &Registry) -> http::Response<String> {
    match encode(registry) {
        Ok(body) => {
            let mut response = http::Response::new(body);
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(CONTENT_TYPE),
            );
            response
        }
        Err(_) => {
            let mut response = http::Response::new(String::new());
            *response.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
            response
        }
    }
}

/// Buckets for latencies from 5 ms to ~80 s (time to first token, request duration).
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.005, 2.0, 15)
}
