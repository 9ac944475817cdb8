//! What every handler shares.

use std::sync::Arc;

use proofmesh_provider::referee::Referee;
use proofmesh_shared::net::Client;

use crate::lifecycle::Lifecycle;
use crate::metrics::GatewayMetrics;
use crate::openai::request::VerificationMode;
use crate::registry::Registry;

/// Shared handler state: the provider registry, the mesh client and the audit settings.
#[derive(Debug, Clone)]
pub struct AppState {
    /// Providers and their load.
    pub registry: Registry,
    /// The mesh.
    pub net: Client,
    /// Secret mixed into challenge derivation, so providers cannot predict challenged steps.
    pub audit_secret: Arc<[u8; 32]>,
    /// Steps challenged per merkle audit.
    pub challenge_count: usize,
    /// Audits a provider must pass before it is challenged at the normal rate.
    pub probation_audits: u32,
    /// Which audit tiers merkle answers may be judged in.
    pub audit_tiers: crate::referee::AuditTiers,
    /// The gateway's own referee, when it was started with the model file.
    pub local_referee: Option<Referee>,
    /// Where fraud proofs of failed audits are written, if anywhere.
    pub evidence_dir: Option<std::path::PathBuf>,
    /// Mode for requests that name none.
    pub default_mode: VerificationMode,
    /// How long a provider whose answer failed an audit is kept out of routing.
    pub failed_audit_cooldown: std::time::Duration,
    /// Prometheus metrics.
    pub metrics: Arc<GatewayMetrics>,
    /// Draining state, for readiness and graceful shutdown.
    pub lifecycle: Lifecycle,
    /// When the gateway started.
    pub started: std::time::Instant,
}
