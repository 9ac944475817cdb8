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

/// Buckets for latencies from 5 ms to ~80 s (time to first token, request duration).
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.005, 2.0, 15)
}
