//! What every handler shares.

use std::sync::Arc;

use proofmesh_shared::net::Client;

use crate::access::Access;
use crate::auditor::{Auditor, VerificationMode};
use crate::catalog::Catalog;
use crate::failover::RetryPolicy;
use crate::ledger::Payer;
use crate::lifecycle::Lifecycle;
use crate::metrics::GatewayMetrics;
use crate::registry::Registry;

/// Shared handler state: the provider registry, the mesh client, the model pins and the
/// auditor.
#[derive(Debug, Clone)]
pub struct AppState {
    /// Providers and their load.
    pub registry: Registry,
    /// The mesh.
    pub net: Client,
    /// Model names pinned to digests.
    pub catalog: Arc<Catalog>,
    /// Verification: admission, referees, judging, the peer book.
    pub auditor: Auditor,
    /// Pays providers for answers released after their checks.
    pub payer: Payer,
    /// Mode for requests that name none.
    pub default_mode: VerificationMode,
    /// Prometheus metrics.
    pub metrics: Arc<GatewayMetrics>,
    /// Draining state, for readiness and graceful shutdown.
    pub lifecycle: Lifecycle,
    /// When the gateway started.
    pub started: std::time::Instant,
    /// How hard one request is tried: failovers and its deadline.
    pub retry: RetryPolicy,
    /// Chat completions running at once, at most (a request past it gets 429).
    pub admission: Arc<tokio::sync::Semaphore>,
    /// API keys and which routes need one.
    pub access: Access,
}
