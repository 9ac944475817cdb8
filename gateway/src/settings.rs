//! The gateway's settings: built-in defaults, then the TOML file (`--config` or
//! `PROOFMESH_CONFIG`), then `PROOFMESH_*` environment variables, then flags. Keys are the flag
//! names with underscores; `proofmesh-gateway --print-config` shows the effective result.

use std::net::SocketAddr;
use std::path::PathBuf;

use libp2p::Multiaddr;
use proofmesh_shared::config::{ConfigError, check_range, mask_header};
use proofmesh_shared::telemetry::LogFormat;
use serde::{Deserialize, Serialize};

use crate::auditor::{AuditTiers, VerificationMode};

/// Every gateway setting, as written in the TOML file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySettings {
    /// HTTP address for the OpenAI API, `/metrics`, `/healthz`, `/readyz` and `/docs`.
    pub http_listen: SocketAddr,
    /// Mesh listen addresses (TCP and QUIC) that providers dial.
    pub p2p_listen: Vec<Multiaddr>,
    /// Peers to dial at start.
    pub bootstrap: Vec<Multiaddr>,
    /// mDNS discovery on the local network.
    pub mdns: bool,
    /// A private mesh's pre-shared key file (`proofmesh-gateway mesh-key FILE` writes one):
    /// set, only nodes with the same key can connect, over TCP only.
    pub mesh_key_file: Option<PathBuf>,
    /// Serve peers behind NAT: relay v2 circuits (for hole punching: 2 minutes and 128 KiB
    /// each) and AutoNAT v2 dial-backs. The relay takes reservations once this node has a
    /// confirmed external address (`external_addresses`, or AutoNAT).
    pub relay_service: bool,
    /// Addresses this node is reachable at from outside, announced without a test.
    pub external_addresses: Vec<Multiaddr>,
    /// Node key file (created 0600 on first start); default in the user's data directory.
    pub key: Option<PathBuf>,
    /// Steps challenged per merkle audit.
    pub challenges: u16,
    /// Mode for requests that name none.
    pub default_verification_mode: VerificationMode,
    /// Seconds a provider whose answer failed an audit is kept out of routing.
    pub failed_audit_cooldown_secs: u64,
    /// Seconds running requests get to finish after SIGTERM.
    pub drain_timeout_secs: u64,
    /// Seconds one chat completion may take from arrival to its last token, failovers included
    /// (the audit after it runs under its own limits); a stream still running then ends with
    /// an error event.
    pub request_timeout_secs: u64,
    /// Providers one request tries at most (each once): the first plus failovers.
    pub max_attempts: u32,
    /// Chat completions served at once; one more gets 429 with `Retry-After`.
    pub max_concurrent_requests: u32,
    /// Seconds a client gets to send a request's headers (and a kept-alive connection may sit
    /// idle).
    pub header_read_timeout_secs: u64,
    /// Seconds a client gets to send a request's body.
    pub body_read_timeout_secs: u64,
    /// HTTP connections open at once; more are closed on accept.
    pub max_connections: u32,
    /// HTTP connections one client address (IPv6: its /64) may hold open at once; more are
    /// closed on accept. 0: no cap (set it behind a reverse proxy or a carrier NAT, where
    /// every client arrives from the same address).
    pub max_connections_per_address: u32,
    /// API key file (`proofmesh-gateway keys create` writes it); set, every API route needs a
    /// key from it. Unset, the API is open.
    pub api_keys_file: Option<PathBuf>,
    /// With API keys on: `GET /v1/models` without a key.
    pub public_models: bool,
    /// With API keys on: `/healthz`, `/readyz` and `/metrics` without a key.
    pub public_operations: bool,
    /// A GGUF file the gateway re-executes answers with, as its own referee; unset leaves
    /// refereeing to other providers of the same model.
    pub referee_model: Option<PathBuf>,
    /// CPU threads of the gateway's own referee; default: all available cores.
    pub referee_threads: Option<u32>,
    /// Answers the gateway's own referee re-executes at once.
    pub referee_slots: u32,
    /// Context of the gateway's own referee per answer (prompt + completion), in tokens.
    pub referee_ctx_size: u32,
    /// Audits a provider must pass before it is challenged at the normal rate.
    pub probation_audits: u32,
    /// `exact`: merkle answers are only judged by a referee of the provider's own deterministic
    /// numerics class; `any`: also across classes, in the tolerant tier.
    pub audit_tiers: AuditTiers,
    /// Directory for fraud proofs of failed audits (CBOR, checked with `check-proof`); unset
    /// keeps none.
    pub evidence_dir: Option<PathBuf>,
    /// Model names pinned to digests, `NAME=sha256:<hex>`. A name is never resolved by what
    /// peers advertise; the default model's name is always pinned to its digest.
    pub pins: Vec<String>,
    /// Peer ids trusted as referees besides the gateway's own engine.
    pub trusted_referees: Vec<String>,
    /// Audits a provider must pass cleanly before the gateway trusts it as a referee too; 0:
    /// only the gateway's own engine and `trusted_referees`.
    pub referee_earn_audits: u32,
    /// Deliver merkle answers no trusted referee re-executed (labelled `unrefereed`) instead of
    /// answering 503.
    pub allow_unrefereed: bool,
    /// Share (0 to 1) of an established provider's `fraud` answers audited after release.
    pub fraud_audit_rate: f64,
    /// Share (0 to 1) of the `fraud` answers audited of a provider on probation (never less
    /// than `fraud_audit_rate`).
    pub fraud_probation_audit_rate: f64,
    /// Seconds after release within which a `fraud` answer's audit must be done (providers keep
    /// leaves openable for 1800).
    pub fraud_audit_window_secs: u64,
    /// Providers (distinct peers, 2 to 5) a `consensus` request goes to.
    pub consensus_providers: usize,
    /// GGUF files whose vocabularies the gateway trusts for checking answers' text (the
    /// referee model's is added by itself).
    pub vocabularies: Vec<PathBuf>,
    /// Credits a provider earns per million tokens (prompt and completion) of a model without
    /// its own price; µcr per token.
    pub price_per_million_tokens: u64,
    /// Prices of named models, `NAME=CREDITS` per million tokens.
    pub model_prices: Vec<String>,
    /// Share (0 to 1) of its stake a provider loses to a proven fraud.
    pub slash_share: f64,
    /// Directory of the durable peer book (reputation, failures, probation); default in the
    /// user's data directory.
    pub state_dir: Option<PathBuf>,
    /// Log line format.
    pub log_format: LogFormat,
    /// OTLP/HTTP endpoint for traces, e.g. `http://otel-collector:4318`; unset exports nothing.
    pub otlp_endpoint: Option<String>,
    /// Extra OTLP headers, `name=value` (secret: masked by `--print-config`).
    pub otlp_headers: Vec<String>,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        Self {
            http_listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            p2p_listen: ["/ip4/0.0.0.0/tcp/4001", "/ip4/0.0.0.0/udp/4001/quic-v1"]
                .iter()
                .filter_map(|a| a.parse().ok())
                .collect(),
            bootstrap: Vec::new(),
            mdns: false,
            mesh_key_file: None,
            relay_service: true,
            external_addresses: Vec::new(),
            key: None,
            challenges: proofmesh_shared::verify::DEFAULT_CHALLENGE_COUNT as u16,
            default_verification_mode: VerificationMode::Merkle,
            failed_audit_cooldown_secs: 300,
            drain_timeout_secs: 30,
            request_timeout_secs: 300,
            max_attempts: 3,
            max_concurrent_requests: 256,
            header_read_timeout_secs: 10,
            body_read_timeout_secs: 30,
            max_connections: 4096,
            max_connections_per_address: 256,
            api_keys_file: None,
            public_models: true,
            public_operations: true,
            referee_model: None,
            referee_threads: None,
            referee_slots: 2,
            referee_ctx_size: 4096,
            probation_audits: crate::auditor::policy::PROBATION_AUDITS,
            audit_tiers: AuditTiers::Exact,
            evidence_dir: None,
            pins: Vec::new(),
            trusted_referees: Vec::new(),
            referee_earn_audits: crate::auditor::policy::REFEREE_EARN_AUDITS,
            allow_unrefereed: false,
            fraud_audit_rate: crate::auditor::policy::FRAUD_AUDIT_RATE,
            fraud_probation_audit_rate: crate::auditor::policy::FRAUD_PROBATION_AUDIT_RATE,
            fraud_audit_window_secs: crate::auditor::policy::FRAUD_AUDIT_WINDOW.as_secs(),
            consensus_providers: crate::auditor::policy::CONSENSUS_PROVIDERS,
            vocabularies: Vec::new(),
            price_per_million_tokens: 1,
            model_prices: Vec::new(),
            slash_share: 0.5,
            state_dir: None,
            log_format: LogFormat::Text,
            otlp_endpoint: None,
            otlp_headers: Vec::new(),
        }
    }
}

impl GatewaySettings {
    /// Checks ranges that the types alone do not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_range("challenges", self.challenges, 1..=256, "1 to 256")?;
        if let Some(threads) = self.referee_threads {
            check_range("referee_threads", threads, 1..=1024, "1 to 1024")?;
        }
        check_range("referee_slots", self.referee_slots, 1..=64, "1 to 64")?;
        check_range(
            "referee_ctx_size",
            self.referee_ctx_size,
            64..=1_048_576,
            "64 to 1048576",
        )?;
        check_range(
            "probation_audits",
            self.probation_audits,
            0..=1_000_000,
            "0 to 1000000",
        )?;
        check_range(
            "drain_timeout_secs",
            self.drain_timeout_secs,
            0..=3600,
            "0 to 3600",
        )?;
        check_range(
            "request_timeout_secs",
            self.request_timeout_secs,
            1..=86_400,
            "1 to 86400",
        )?;
        check_range("max_attempts", self.max_attempts, 1..=16, "1 to 16")?;
        check_range(
            "max_concurrent_requests",
            self.max_concurrent_requests,
            1..=100_000,
            "1 to 100000",
        )?;
        check_range(
            "header_read_timeout_secs",
            self.header_read_timeout_secs,
            1..=3600,
            "1 to 3600",
        )?;
        check_range(
            "body_read_timeout_secs",
            self.body_read_timeout_secs,
            1..=3600,
            "1 to 3600",
        )?;
        check_range(
            "max_connections",
            self.max_connections,
            1..=1_000_000,
            "1 to 1000000",
        )?;
        check_range(
            "max_connections_per_address",
            self.max_connections_per_address,
            0..=1_000_000,
            "0 (no cap) to 1000000",
        )?;
        for pin in &self.pins {
            if let Err(why) = crate::catalog::parse_pin(pin) {
                return Err(ConfigError::OutOfRange {
                    key: "pins",
                    value: pin.clone(),
                    why: leak_reason(why),
                });
            }
        }
        for peer in &self.trusted_referees {
            if peer.parse::<libp2p::PeerId>().is_err() {
                return Err(ConfigError::OutOfRange {
                    key: "trusted_referees",
                    value: peer.clone(),
                    why: "a libp2p peer id",
                });
            }
        }
        check_range(
            "failed_audit_cooldown_secs",
            self.failed_audit_cooldown_secs,
            0..=86_400,
            "0 to 86400",
        )?;
        for price in &self.model_prices {
            if parse_model_price(price).is_none() {
                return Err(ConfigError::OutOfRange {
                    key: "model_prices",
                    value: price.clone(),
                    why: "NAME=CREDITS, credits per million tokens as a whole number",
                });
            }
        }
        check_range("slash_share", self.slash_share, 0.0..=1.0, "0 to 1")?;
        check_range(
            "fraud_audit_rate",
            self.fraud_audit_rate,
            0.0..=1.0,
            "0 to 1",
        )?;
        check_range(
            "fraud_probation_audit_rate",
            self.fraud_probation_audit_rate,
            0.0..=1.0,
            "0 to 1",
        )?;
        check_range(
            "fraud_audit_window_secs",
            self.fraud_audit_window_secs,
            180..=crate::auditor::policy::MAX_FRAUD_AUDIT_WINDOW.as_secs(),
            "180 to 1800 (a silent provider is asked for its leaves for 120 s; providers keep them for 1800 s)",
        )?;
        check_range(
            "consensus_providers",
            self.consensus_providers,
            2..=crate::auditor::policy::MAX_CONSENSUS_PROVIDERS,
            "2 to 5",
        )?;
        Ok(())
    }

    /// The ledger's prices and penalty.
    pub fn ledger(&self) -> crate::ledger::LedgerConfig {
        crate::ledger::LedgerConfig {
            pricing: crate::ledger::Pricing {
                default: self.price_per_million_tokens,
                models: self
                    .model_prices
                    .iter()
                    .filter_map(|p| parse_model_price(p))
                    .collect(),
            },
            slash_share: self.slash_share,
        }
    }

    /// A copy safe to print: secrets masked.
    pub fn masked(&self) -> Self {
        Self {
            otlp_headers: self.otlp_headers.iter().map(|h| mask_header(h)).collect(),
            ..self.clone()
        }
    }
}

/// `NAME=CREDITS`.
fn parse_model_price(text: &str) -> Option<(String, u64)> {
    let (name, credits) = text.split_once('=')?;
    let name = name.trim();
    (!name.is_empty()).then_some(())?;
    Some((name.to_string(), credits.trim().parse().ok()?))
}

/// The pin error's kind, as a static reason for [`ConfigError::OutOfRange`].
fn leak_reason(why: String) -> &'static str {
    if why.contains("digest") {
        "NAME=sha256:<64 hex digits>: the digest is not 64 hex digits"
    } else {
        "NAME=sha256:<64 hex digits>"
    }
}
