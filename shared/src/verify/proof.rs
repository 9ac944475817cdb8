//! Fraud proofs: a failed audit written down so that anyone can re-check it offline.
//!
//! A [`FraudProof`] holds everything the audit looked at: the request, the streamed tokens, the
//! provider's signed commitment, the challenged steps with the provider's opening (leaves and
//! Merkle proof), and the referee's signed evidence. [`FraudProof::check`] re-runs the same
//! rule ([`super::exact`], [`super::rule`]) and says which failure it shows. The tier comes from
//! the numerics classes both parties signed, so nothing in the proof rests on the gateway's
//! word; only the choice of challenged steps does (it used the gateway's secret), which can
//! only have helped the provider.

use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use super::exact::EvidenceError;
use super::{
    AuditFailure, Challenge, Judgement, SignedEvidence, Tier, check_commitment, check_evidence,
    check_openings, judge,
};
use crate::commit::{SignedCommitment, StepLeaf};
use crate::protocol::{GenerateRequest, OpenLeavesResponse};
use crate::verify::RefereeStep;

/// One round of an audit: the steps challenged, the provider's opening of them and, when a
/// referee took part, its evidence on the same steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRound {
    /// The challenged steps.
    pub challenge: Challenge,
    /// The provider's answer.
    pub opening: OpenLeavesResponse,
    /// The referee's signed evidence.
    pub evidence: Option<SignedEvidence>,
}

/// A failed audit, self-contained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FraudProof {
    /// Format version, [`FraudProof::VERSION`].
    pub version: u16,
    /// The provider (peer id bytes).
    pub provider: Vec<u8>,
    /// The referee (peer id bytes), when one took part.
    pub referee: Option<Vec<u8>>,
    /// The request as sent.
    pub request: GenerateRequest,
    /// The tokens streamed.
    pub tokens: Vec<u32>,
    /// The provider's signed commitment.
    pub commitment: SignedCommitment,
    /// The rounds, in order.
    pub rounds: Vec<AuditRound>,
    /// The failure the gateway found.
    pub failure: AuditFailure,
}

/// Why a fraud proof does not prove anything.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProofError {
    /// A peer id does not parse.
    #[error("malformed peer id")]
    BadPeer,
    /// The referee's evidence is unusable.
    #[error(transparent)]
    Evidence(#[from] EvidenceError),
    /// Every check holds: the proof shows no fraud.
    #[error("every check holds")]
    NoFailure,
}

impl FraudProof {
    /// The current format version.
    pub const VERSION: u16 = 1;

    /// Re-runs the audit rule on the proof; returns the failure it shows.
    pub fn check(&self) -> Result<AuditFailure, ProofError> {
        let provider = PeerId::from_bytes(&self.provider).map_err(|_| ProofError::BadPeer)?;
        if let Err(failure) =
            check_commitment(&self.commitment, &self.request, &provider, &self.tokens)
        {
            return Ok(failure);
        }
        let referee = match &self.referee {
            Some(bytes) => Some(PeerId::from_bytes(bytes).map_err(|_| ProofError::BadPeer)?),
            None => None,
        };
        let mut leaves: Vec<StepLeaf> = Vec::new();
        let mut opened: Vec<RefereeStep> = Vec::new();
        let mut margins: Vec<f32> = Vec::new();
        let mut tier = None;
        for round in &self.rounds {
            let round_leaves = match check_openings(
                &self.commitment,
                &self.request,
                &self.tokens,
                &round.challenge,
                &round.opening,
            ) {
                Ok(l) => l,
                Err(failure) => return Ok(failure),
            };
            leaves.extend_from_slice(round_leaves);
            if let (Some(evidence), Some(referee)) = (&round.evidence, referee) {
                match check_evidence(
                    evidence,
                    &referee,
                    &provider,
                    &self.commitment,
                    &self.request,
                    &self.tokens,
                    &round.challenge,
                )? {
                    Err(failure) => return Ok(failure),
                    Ok(()) => {
                        opened.extend_from_slice(&evidence.evidence.opened);
                        margins.clone_from(&evidence.evidence.margins);
                        tier = Some(Tier::between(
                            &self.commitment.commitment.numerics,
                            &evidence.evidence.numerics,
                        ));
                    }
                }
            }
        }
        match tier.map(|tier| judge(&leaves, &opened, &margins, tier)) {
            Some(Judgement::Fail(failure, _)) => Ok(failure),
            _ => Err(ProofError::NoFailure),
        }
    }
}
