//! The provider's Prometheus metrics, served on `http_listen` at `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// How a generate request ended, as a label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `completed`, `refused` or `abandoned` (the gateway left).
    pub outcome: &'static str,
}

/// Every metric the provider exports.
#[derive(Debug)]
pub struct ProviderMetrics {
    registry: Registry,
    /// Generate requests by outcome.
    pub requests: Family<OutcomeLabels, Counter>,
    /// Prompt tokens processed.
    pub prompt_tokens: Counter,
    /// Tokens generated.
    pub tokens_predicted: Counter,
    /// Requests being generated or queued right now.
    pub requests_processing: Gauge,
    /// Requests queued for a sequence slot (set at scrape time).
    pub requests_deferred: Gauge,
    /// Sequence slots in use (set at scrape time).
    pub busy_slots: Gauge,
    /// Prompt tokens served from the prompt cache since start (set at scrape time).
    pub prompt_tokens_cached: Gauge,
    /// Seconds from reading a request to sending its first token.
    pub time_to_first_token: Histogram,
    /// Seconds from request to last token, per completed request.
    pub generation_seconds: Histogram,
    /// Seconds spent building the Merkle tree and signing the commitment, per request.
    pub commitment_seconds: Histogram,
    /// Seconds the model took to load.
    pub model_load_seconds: Gauge<f64, AtomicU64>,
    /// Peers with an open connection (set at scrape time).
    pub peers_connected: Gauge,
    /// Re-executions done for gateways as a referee, by outcome.
    pub referee_jobs: Family<OutcomeLabels, Counter>,
    /// Claimed tokens re-executed as a referee.
    pub reexecuted_tokens: Counter,
}

impl Default for ProviderMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("proofmesh");
        let requests = Family::<OutcomeLabels, Counter>::default();
        let prompt_tokens = Counter::default();
        let tokens_predicted = Counter::default();
        let requests_processing = Gauge::default();
        let requests_deferred = Gauge::default();
        let busy_slots = Gauge::default();
        let prompt_tokens_cached = Gauge::default();
        let time_to_first_token = Histogram::new(proofmesh_shared::metrics::latency_buckets());
        let generation_seconds = Histogram::new(proofmesh_shared::metrics::latency_buckets());
        // From 10 µs: a 128-step commitment takes well under a millisecond.
        let commitment_seconds = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(1e-5, 2.0, 16),
        );
        let model_load_seconds = Gauge::<f64, AtomicU64>::default();
        let peers_connected = Gauge::default();
        let referee_jobs = Family::<OutcomeLabels, Counter>::default();
        let reexecuted_tokens = Counter::default();
        registry.register(
            "referee_jobs",
            "Re-executions refereed for gateways, by outcome",
            referee_jobs.clone(),
        );
        registry.register(
            "reexecuted_tokens",
            "Claimed tokens re-executed as a referee",
            reexecuted_tokens.clone(),
        );
        registry.register("requests", "Generate requests by outcome", requests.clone());
        registry.register(
            "prompt_tokens",
            "Prompt tokens processed",
            prompt_tokens.clone(),
        );
        registry.register(
            "tokens_predicted",
            "Tokens generated",
            tokens_predicted.clone(),
        );
        registry.register(
            "requests_processing",
            "Requests generating or queued",
            requests_processing.clone(),
        );
        registry.register(
            "requests_deferred",
            "Requests waiting for a sequence slot",
            requests_deferred.clone(),
        );
        registry.register("busy_slots", "Sequence slots in use", busy_slots.clone());
        registry.register(
            "prompt_tokens_cached",
            "Prompt tokens whose KV came from the prompt cache, since start",
            prompt_tokens_cached.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "Seconds from request to first token",
            time_to_first_token.clone(),
        );
        registry.register(
            "generation_seconds",
            "Seconds from request to last token",
            generation_seconds.clone(),
        );
        registry.register(
            "commitment_seconds",
            "Seconds building the Merkle tree and signing the commitment",
            commitment_seconds.clone(),
        );
        registry.register(
            "model_load_seconds",
            "Seconds the model took to load",
            model_load_seconds.clone(),
        );
        registry.register(
            "peers_connected",
            "Peers with an open connection",
            peers_connected.clone(),
        );
        Self {
            registry,
            requests,
            prompt_tokens,
            tokens_predicted,
            requests_processing,
            requests_deferred,
            busy_slots,
            prompt_tokens_cached,
            time_to_first_token,
            generation_seconds,
            commitment_seconds,
            model_load_seconds,
            peers_connected,
            referee_jobs,
            reexecuted_tokens,
        }
    }
}

/// One request in `requests_processing` for as long as this lives, however it ends: a
/// generation called off mid-way (its gateway's connection closed) is counted `abandoned`.
#[derive(Debug)]
pub(crate) struct Processing<'a> {
    metrics: &'a ProviderMetrics,
    finished: bool,
}

impl Processing<'_> {
    /// The generation returned; its outcome is counted by the caller.
    pub(crate) fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for Processing<'_> {
    fn drop(&mut self) {
        self.metrics.requests_processing.dec();
        if !self.finished {
            self.metrics.request_ended("abandoned");
        }
    }
}

impl ProviderMetrics {
    /// Counts one request as processing until the guard is dropped.
    pub(crate) fn processing(&self) -> Processing<'_> {
        self.requests_processing.inc();
        Processing {
            metrics: self,
            finished: false,
        }
    }

    /// Counts one finished request.
    pub fn request_ended(&self, outcome: &'static str) {
        self.requests
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// The registry, for encoding.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn abandoned(metrics: &ProviderMetrics) -> u64 {
        metrics
            .requests
            .get_or_create(&OutcomeLabels {
                outcome: "abandoned",
            })
            .get()
    }

    #[test]
    fn a_generation_called_off_midway_is_counted_and_leaves_the_gauge() {
        let metrics = ProviderMetrics::default();
        let finished = metrics.processing();
        assert_eq!(metrics.requests_processing.get(), 1);
        finished.finish();
        assert_eq!(metrics.requests_processing.get(), 0);
        assert_eq!(abandoned(&metrics), 0, "its caller counts a returned one");
        // Dropped mid-way, as when the stream's connection closes.
        drop(metrics.processing());
        assert_eq!(
            metrics.requests_processing.get(),
            0,
            "drain would wait for it"
        );
        assert_eq!(abandoned(&metrics), 1);
    }
}
