//! The gateway's Prometheus metrics, served at `GET /metrics`.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of a finished chat completion request.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `none`, `merkle`, or `invalid` when the request did not parse.
    pub mode: &'static str,
    /// HTTP status of the response (200 for streams that started).
    pub status: u16,
}

/// Labels of an audit verdict.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabels {
    /// `passed`, `unaudited` or `failed`.
    pub verdict: &'static str,
    /// The failure (e.g. `merkle_path_invalid`), empty unless failed.
    pub reason: String,
}

/// Every metric the gateway exports.
#[derive(Debug)]
pub struct GatewayMetrics {
    registry: Registry,
    /// Chat completion requests by mode and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Chat completion requests being answered right now.
    pub requests_in_flight: Gauge,
    /// Completion tokens delivered to clients.
    pub tokens_generated: Counter,
    /// Prompt tokens the providers processed.
    pub prompt_tokens: Counter,
    /// Seconds from request arrival to the first token from a provider.
    pub time_to_first_token: Histogram,
    /// Audits by verdict.
    pub audits: Family<VerdictLabels, Counter>,
    /// Seconds spent auditing a completion (opening leaves and checking them).
    pub audit_seconds: Histogram,
    /// Referees that failed to deliver usable evidence (unreachable, refused, invalid).
    pub referee_failures: Counter,
    /// Referee accusations another referee refuted, and canary audits a referee failed.
    pub referee_strikes: Counter,
    /// Canary audits of peer referees, by outcome (in `verdict`).
    pub canaries: Family<VerdictLabels, Counter>,
    /// `fraud` answers released, by how their audit ended (in `verdict`: `not_sampled`,
    /// `skipped`, `passed`, `failed`, `expired`, …).
    pub deferred_audits: Family<VerdictLabels, Counter>,
    /// Fraud proofs heard from other gateways, by what they came to (in `verdict`: `holds`,
    /// `forged`, `unchecked`).
    pub proofs_heard: Family<VerdictLabels, Counter>,
    /// `consensus` requests, by how their answers compared (in `verdict`: `agreed`,
    /// `differed`).
    pub consensus: Family<VerdictLabels, Counter>,
    /// Peers with an open connection (set at scrape time).
    pub peers_connected: Gauge,
    /// Providers in the routing table (set at scrape time).
    pub providers: Gauge,
    /// Seconds since the gateway started (set at scrape time).
    pub uptime_seconds: Gauge<f64, AtomicU64>,
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("proofmesh_gateway");
        let requests = Family::<RequestLabels, Counter>::default();
        let requests_in_flight = Gauge::default();
        let tokens_generated = Counter::default();
        let prompt_tokens = Counter::default();
        let time_to_first_token = Histogram::new(proofmesh_shared::metrics::latency_buckets());
        let audits = Family::<VerdictLabels, Counter>::default();
        let audit_seconds = Histogram::new(proofmesh_shared::metrics::latency_buckets());
        let referee_failures = Counter::default();
        let peers_connected = Gauge::default();
        let providers = Gauge::default();
        let uptime_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "requests",
            "Chat completion requests by verification mode and HTTP status",
            requests.clone(),
        );
        registry.register(
            "requests_in_flight",
            "Chat completion requests being answered",
            requests_in_flight.clone(),
        );
        registry.register(
            "tokens_generated",
            "Completion tokens delivered",
            tokens_generated.clone(),
        );
        registry.register(
            "prompt_tokens",
            "Prompt tokens processed by providers",
            prompt_tokens.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "Seconds from request arrival to the first generated token",
            time_to_first_token.clone(),
        );
        registry.register("audits", "Audits by verdict", audits.clone());
        registry.register(
            "audit_seconds",
            "Seconds spent auditing one completion",
            audit_seconds.clone(),
        );
        registry.register(
            "referee_failures",
            "Referees that delivered no usable evidence",
            referee_failures.clone(),
        );
        let canaries = Family::<VerdictLabels, Counter>::default();
        registry.register(
            "canaries",
            "Canary audits of peer referees by outcome (agreed, differed, unjudged)",
            canaries.clone(),
        );
        let deferred_audits = Family::<VerdictLabels, Counter>::default();
        registry.register(
            "deferred_audits",
            "Answers released before their audit (fraud mode), by how the audit ended",
            deferred_audits.clone(),
        );
        let proofs_heard = Family::<VerdictLabels, Counter>::default();
        registry.register(
            "proofs_heard",
            "Fraud proofs heard from other gateways, by what they came to (holds, forged, unchecked)",
            proofs_heard.clone(),
        );
        let consensus = Family::<VerdictLabels, Counter>::default();
        registry.register(
            "consensus",
            "Consensus requests by how their answers compared (agreed, differed)",
            consensus.clone(),
        );
        let referee_strikes = Counter::default();
        registry.register(
            "referee_strikes",
            "Referee accusations another referee refuted (the accuser is dropped)",
            referee_strikes.clone(),
        );
        registry.register(
            "peers_connected",
            "Peers with an open connection",
            peers_connected.clone(),
        );
        registry.register(
            "providers",
            "Providers in the routing table",
            providers.clone(),
        );
        registry.register(
            "uptime_seconds",
            "Seconds since the gateway started",
            uptime_seconds.clone(),
        );
        Self {
            registry,
            requests,
            requests_in_flight,
            tokens_generated,
            prompt_tokens,
            time_to_first_token,
            audits,
            audit_seconds,
            referee_failures,
            referee_strikes,
            canaries,
            deferred_audits,
            proofs_heard,
            consensus,
            peers_connected,
            providers,
            uptime_seconds,
        }
    }
}

impl GatewayMetrics {
    /// The registry, for encoding.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}
