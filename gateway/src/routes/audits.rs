//! `GET /v1/audits/{id}`: the later verdict on an answer released before its audit (`fraud`).

use axum::extract::{Path, State};
use axum::{Extension, Json};
use serde::Serialize;
use utoipa::ToSchema;

use crate::access::Caller;
use crate::auditor::{AuditId, AuditRecord};
use crate::error::ApiError;
use crate::state::AppState;

/// Where the audit of one released answer stands.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AuditReport {
    /// The audit id (`aud_…`), as given in `x-proofmesh-audit-id`.
    pub id: String,
    /// Always `audit`.
    pub object: &'static str,
    /// `pending` (drawn, not judged yet), `not_sampled` (not drawn: the answer stands on the
    /// provider's signed commitment), `passed`, `failed`, `withheld` (the provider never
    /// opened its leaves: benched like a failure, without a proof), `inconclusive`,
    /// `unrefereed` (no trusted referee could re-execute it), `expired` (the window closed
    /// first) or `interrupted` (the gateway restarted).
    pub status: &'static str,
    /// Why it failed (e.g. `logits_diverge`), or expired.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the answer was released (unix seconds).
    pub created: u64,
    /// When the audit window closes (unix seconds).
    pub window_closes_at: u64,
    /// When the audit ended (unix seconds), if it has.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<u64>,
    /// The provider's peer id.
    pub provider: String,
    /// `sha256:<hex>` of the model the answer was committed for.
    pub model_digest: String,
    /// The gateway's request id (`chatcmpl-<id>` is the completion's id).
    pub request_id: String,
    /// Hex Merkle root of the committed step leaves (`proofmesh.merkle_root` of the answer).
    pub merkle_root: String,
    /// Steps committed.
    pub steps: u32,
    /// Steps challenged.
    pub challenged: Vec<u32>,
    /// The referee whose evidence decided: a peer id, or `local` for the gateway's engine.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub referee: Option<String>,
    /// `exact` or `tolerant`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// A failed audit's self-contained fraud proof: CBOR, as hex. Saved as bytes to a file, it
    /// is checked offline with `proofmesh-gateway check-proof FILE`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proof_cbor_hex: Option<String>,
    /// The work this answer's audit took, once it ran: milliseconds from its start to its
    /// verdict (re-execution, openings, judging), deferred from the answer's own latency.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit_ms: Option<u64>,
    /// Bytes of leaf openings and referee evidence the audit moved.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evidence_bytes: Option<u64>,
}

impl From<AuditRecord> for AuditReport {
    fn from(record: AuditRecord) -> Self {
        Self {
            id: record.id.to_string(),
            object: "audit",
            status: record.status.as_str(),
            reason: record.reason,
            created: record.created_ms / 1000,
            window_closes_at: record.window_closes_ms / 1000,
            decided_at: record.decided_ms.map(|ms| ms / 1000),
            provider: record.provider,
            model_digest: record.model_digest,
            request_id: record.request_id,
            merkle_root: record.merkle_root,
            steps: record.steps,
            challenged: record.challenged,
            referee: record.referee,
            tier: record.tier,
            proof_cbor_hex: record.proof.map(hex::encode),
            audit_ms: record.audit_ms,
            evidence_bytes: record.evidence_bytes,
        }
    }
}

/// The audit of an answer released in `fraud` mode: pending, then its verdict, with the fraud
/// proof when it failed. With API keys on, only the key that asked for the answer may read it.
#[utoipa::path(get, path = "/v1/audits/{id}", tag = "audits",
    params(("id" = String, Path, description = "The audit id from `x-proofmesh-audit-id` or `proofmesh.audit_id`")),
    responses(
        (status = 200, description = "Where the audit stands", body = AuditReport),
        (status = 401, description = "`invalid_api_key`: the gateway requires API keys", body = crate::error::ErrorBody),
        (status = 404, description = "`audit_not_found`: never issued (to this API key), or too old to be kept", body = crate::error::ErrorBody),
    ))]
pub async fn get(
    State(state): State<AppState>,
    caller: Option<Extension<Caller>>,
    Path(id): Path<String>,
) -> Result<Json<AuditReport>, ApiError> {
    let shown: String = id.chars().take(64).collect();
    let not_found = || ApiError::audit_not_found(&shown);
    let parsed: AuditId = id.parse().map_err(|_| not_found())?;
    let record = state.auditor.audit_record(parsed).map_err(|e| {
        tracing::error!(error = %e, "cannot read the audit log");
        ApiError::state_unreadable()
    })?;
    let record = record.ok_or_else(not_found)?;
    // A record made under an API key is that very key's (not its name's): another key cannot
    // tell it exists. Once keys are on, records made without one are nobody's.
    let asker = caller.as_ref().map(|Extension(c)| c.owner_id());
    if asker.is_some() && record.caller != asker {
        return Err(not_found());
    }
    Ok(Json(AuditReport::from(record)))
}
