//! Verification orchestration: what the gateway does with a commitment.
//!
//! `none`: the signature and the commitment's binding to this request and these tokens are still
//! checked. `merkle`: additionally draw the challenge from the gateway's secret and the signed
//! root, have the provider open those leaves, and run the exact audit rule on them
//! ([`proofmesh_shared::verify`]). Failures are logged with their evidence.

use std::time::{Duration, Instant};

use libp2p::PeerId;
use proofmesh_shared::commit::SignedCommitment;
use proofmesh_shared::protocol::{GenerateRequest, OpenLeavesRequest};
use proofmesh_shared::verify::{
    AuditFailure, AuditVerdict, Challenge, check_commitment, check_openings,
};

use crate::metrics::VerdictLabels;
use crate::openai::request::VerificationMode;
use crate::state::AppState;

/// Default for how long a provider whose answer failed verification is kept out of routing.
/// Reputation proper comes with the referee; until then a failed audit benches the provider.
pub const FAILED_AUDIT_COOLDOWN: Duration = Duration::from_secs(300);

/// What the audit found.
#[derive(Debug, Clone)]
pub struct AuditOutcome {
    /// The verdict.
    pub verdict: AuditVerdict,
    /// The steps challenged (empty in `none` mode).
    pub challenged: Vec<u32>,
    /// Time the audit took.
    pub elapsed: Duration,
}

/// Audits one finished generation.
pub async fn audit(
    state: &AppState,
    provider: PeerId,
    request: &GenerateRequest,
    tokens: &[u32],
    signed: &SignedCommitment,
    mode: VerificationMode,
) -> AuditOutcome {
    let started = Instant::now();
    let mut challenged = Vec::new();
    let result = match check_commitment(signed, request, &provider, tokens) {
        Err(failure) => Err(failure),
        Ok(()) if mode == VerificationMode::None => Ok(AuditVerdict::Unaudited),
        Ok(()) => {
            let challenge = Challenge::derive(&state.audit_secret, signed, state.challenge_count);
            challenged = challenge.indices.clone();
            let opening = OpenLeavesRequest {
                request_id: request.request_id,
                indices: challenge.indices.clone(),
            };
            match state.net.open_leaves(provider, opening).await {
                Ok(response) => check_openings(signed, request, tokens, &challenge, &response)
                    .map(|()| AuditVerdict::Passed),
                Err(e) => {
                    tracing::warn!(%provider, error = %e, "leaf opening failed");
                    Err(AuditFailure::OpeningRefused)
                }
            }
        }
    };
    let verdict = result.unwrap_or_else(AuditVerdict::Failed);
    let elapsed = started.elapsed();
    let labels = match &verdict {
        AuditVerdict::Unaudited => VerdictLabels {
            verdict: "unaudited",
            reason: String::new(),
        },
        AuditVerdict::Passed => VerdictLabels {
            verdict: "passed",
            reason: String::new(),
        },
        AuditVerdict::Failed(failure) => VerdictLabels {
            verdict: "failed",
            reason: failure.to_string(),
        },
    };
    state.metrics.audits.get_or_create(&labels).inc();
    if mode == VerificationMode::Merkle {
        state.metrics.audit_seconds.observe(elapsed.as_secs_f64());
    }
    if let AuditVerdict::Failed(failure) = &verdict {
        tracing::warn!(
            %provider,
            request = %request.request_id,
            %failure,
            merkle_root = %hex::encode(signed.commitment.merkle_root),
            steps = signed.commitment.steps,
            challenged = ?challenged,
            "audit failed"
        );
        state
            .registry
            .cool_down(&provider, state.failed_audit_cooldown);
    }
    AuditOutcome {
        verdict,
        challenged,
        elapsed,
    }
}
