//! Fraud proofs: a failed audit written down so that anyone can re-check it offline.
//!
//! A [`FraudProof`] holds everything the audit looked at: the request, the streamed tokens, the
//! provider's signed commitment, and per round the challenged steps, the provider's signed
//! opening of them (leaves and Merkle proof) and every referee's signed evidence on the same
//! steps. [`FraudProof::check`] re-runs the same rule ([`super::exact`], [`super::rule`]) and
//! says which failure it shows.
//!
//! What a proof can rest on:
//!
//! - **The provider's own signatures.** A failure of the commitment or of an opening (a model
//!   or a length the provider signed for this very request, a bad Merkle path, a leaf that is
//!   not the streamed token, a wrong draw, an off-policy token, a signed refusal) is proven by
//!   material only the provider could have signed. The proof must first be bound to the
//!   provider: its commitment signed by the provider's key for the proof's request and tokens.
//!   A bad signature, another signer, another request or other tokens say only that the proof
//!   is not the provider's (whoever wrote it can make those up), so such a proof is invalid,
//!   as is one with an opening the provider did not sign.
//! - **Referees' signed evidence**, for everything the model has to say (another prompt,
//!   tokens outside the vocabulary, a false end, logits or tokens that are not the model's).
//!   Keys cost nothing, so no number of referees proves anything by itself: such a failure
//!   holds only for a checker that trusts one of the referees whose evidence shows it (a
//!   gateway's own engine, named with `--trust`), and when no referee in the proof shows the
//!   answer passing.
//!
//! The tier comes from the numerics classes the provider and each referee signed; the choice of
//! challenged steps used the gateway's secret, which can only have helped the provider.

use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use super::exact::{EvidenceError, opening_is_signed};
use super::{
    AuditFailure, Challenge, Judgement, SignedEvidence, Tier, check_commitment, check_evidence,
    check_openings, judge,
};
use crate::commit::{SignedCommitment, StepLeaf};
use crate::protocol::{GenerateRequest, SignedOpening};
use crate::verify::RefereeStep;

/// One round of an audit: the steps challenged, the provider's signed opening of them and the
/// evidence of every referee asked about the same steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRound {
    /// The challenged steps.
    pub challenge: Challenge,
    /// The provider's signed answer.
    pub opening: SignedOpening,
    /// The referees' signed evidence on these steps, one per referee.
    pub evidence: Vec<SignedEvidence>,
}

/// A failed audit, self-contained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FraudProof {
    /// Format version, [`FraudProof::VERSION`].
    pub version: u16,
    /// The provider (peer id bytes).
    pub provider: Vec<u8>,
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
    /// The format version is not this build's.
    #[error("unknown proof version {0}")]
    Version(u16),
    /// A peer id does not parse.
    #[error("malformed peer id")]
    BadPeer,
    /// An opening is not signed by the provider, or not for this request and challenge.
    #[error("an opening is not the provider's signed answer to its challenge")]
    UnsignedOpening,
    /// A referee's evidence is unusable.
    #[error(transparent)]
    Evidence(#[from] EvidenceError),
    /// The commitment is not the provider's for this request and these tokens.
    #[error("the commitment is not the provider's signed answer to this request ({0})")]
    Unbound(AuditFailure),
    /// The accusation needs the model, and no referee showing it is one the checker trusts.
    #[error(
        "the accusation rests on {0} referee(s), none of them trusted by this checker (keys \
         cost nothing: name a referee you trust)"
    )]
    NoTrustedReferee(usize),
    /// A referee's evidence shows the answer passing.
    #[error("referee {0} found no failure")]
    Disputed(String),
    /// Every check holds: the proof shows no fraud.
    #[error("every check holds")]
    NoFailure,
    /// The bytes are not a proof, or not one as a gateway writes it (canonical CBOR: a file
    /// that decodes to a proof but is not its encoding was altered).
    #[error("not a proofmesh fraud proof in canonical CBOR: {0}")]
    Malformed(String),
    /// The proof shows a failure, but not the one it records.
    #[error("the proof shows failed:{shown}, not the recorded failed:{recorded}")]
    Mislabeled {
        /// What the checks show.
        shown: AuditFailure,
        /// What the proof says.
        recorded: AuditFailure,
    },
}

impl FraudProof {
    /// The current format version.
    pub const VERSION: u16 = 2;

    /// Re-runs the audit rule on the proof, trusting no referee: only a failure proven by the
    /// provider's own signatures holds.
    pub fn check(&self) -> Result<AuditFailure, ProofError> {
        self.check_trusting(&[])
    }

    /// The proof as the file `check-proof` reads: canonical CBOR.
    pub fn to_cbor(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        // Writing into a Vec fails only on a serializer error, which these types never raise.
        if let Err(e) = ciborium::into_writer(self, &mut bytes) {
            tracing::error!(error = %e, "cannot encode a fraud proof");
        }
        bytes
    }

    /// Reads a proof file: the bytes must decode to a proof whose encoding they are, so that
    /// any byte changed is either a changed proof (which its checks reject) or rejected here.
    pub fn from_cbor(bytes: &[u8]) -> Result<Self, ProofError> {
        let proof: Self =
            ciborium::from_reader(bytes).map_err(|e| ProofError::Malformed(e.to_string()))?;
        if proof.to_cbor() != bytes {
            return Err(ProofError::Malformed(
                "the bytes decode, but are not the proof's encoding".into(),
            ));
        }
        Ok(proof)
    }

    /// What `check-proof` accepts: the checks of [`FraudProof::check_trusting`] show exactly
    /// the failure the proof records.
    pub fn holds(&self, trusted: &[PeerId]) -> Result<AuditFailure, ProofError> {
        let shown = self.check_trusting(trusted)?;
        if shown != self.failure {
            return Err(ProofError::Mislabeled {
                shown,
                recorded: self.failure,
            });
        }
        Ok(shown)
    }

    /// Like [`FraudProof::check`], but a model-based failure holds when a referee in `trusted`
    /// shows it (and no referee in the proof shows the answer passing).
    pub fn check_trusting(&self, trusted: &[PeerId]) -> Result<AuditFailure, ProofError> {
        if self.version != Self::VERSION {
            return Err(ProofError::Version(self.version));
        }
        let provider = PeerId::from_bytes(&self.provider).map_err(|_| ProofError::BadPeer)?;
        match check_commitment(&self.commitment, &self.request, &provider, &self.tokens) {
            Ok(()) => {}
            Err(failure) if failure.is_signed_by_provider() => return Ok(failure),
            Err(failure) => return Err(ProofError::Unbound(failure)),
        }
        let mut leaves: Vec<StepLeaf> = Vec::new();
        for round in &self.rounds {
            if !opening_is_signed(&round.opening, &provider, &self.request, &round.challenge) {
                return Err(ProofError::UnsignedOpening);
            }
            match check_openings(
                &self.commitment,
                &self.request,
                &self.tokens,
                &round.challenge,
                &round.opening.opening.response,
            ) {
                Ok(l) => leaves.extend_from_slice(l),
                Err(failure) => return Ok(failure),
            }
        }
        self.referees_agree(&leaves, trusted)
    }

    /// The model-based part: every referee in the proof judged on its own evidence.
    fn referees_agree(
        &self,
        leaves: &[StepLeaf],
        trusted: &[PeerId],
    ) -> Result<AuditFailure, ProofError> {
        let mut referees: Vec<PeerId> = Vec::new();
        for round in &self.rounds {
            for evidence in &round.evidence {
                let signer = evidence.verify().map_err(|_| EvidenceError::BadSignature)?;
                if !referees.contains(&signer) {
                    referees.push(signer);
                }
            }
        }
        let mut failures: Vec<AuditFailure> = Vec::new();
        let mut trusted_failure = None;
        for referee in &referees {
            match self.judged_by(referee, leaves)? {
                Some(failure) => {
                    if trusted.contains(referee) && trusted_failure.is_none() {
                        trusted_failure = Some(failure);
                    }
                    failures.push(failure);
                }
                None => return Err(ProofError::Disputed(referee.to_string())),
            }
        }
        if failures.is_empty() {
            return Err(ProofError::NoFailure);
        }
        // The failure a trusted referee shows: an untrusted one could not relabel it.
        trusted_failure.ok_or(ProofError::NoTrustedReferee(failures.len()))
    }

    /// The failure `referee`'s evidence shows, if any.
    fn judged_by(
        &self,
        referee: &PeerId,
        leaves: &[StepLeaf],
    ) -> Result<Option<AuditFailure>, ProofError> {
        let mut opened: Vec<RefereeStep> = Vec::new();
        let mut judged: Vec<StepLeaf> = Vec::new();
        let mut margins: Vec<f32> = Vec::new();
        let mut tier = Tier::Exact;
        let mut offset = 0;
        for round in &self.rounds {
            let count = round.challenge.indices.len();
            let round_leaves = leaves.get(offset..offset + count).unwrap_or_default();
            offset += count;
            let mine = round
                .evidence
                .iter()
                .find(|e| e.verify().is_ok_and(|signer| &signer == referee));
            let Some(evidence) = mine else { continue };
            if let Err(failure) = check_evidence(
                evidence,
                referee,
                &self.commitment,
                &self.request,
                &self.tokens,
                &round.challenge,
            )? {
                return Ok(Some(failure));
            }
            opened.extend_from_slice(&evidence.evidence.opened);
            judged.extend_from_slice(round_leaves);
            margins.clone_from(&evidence.evidence.margins);
            tier = tier.max(Tier::between(
                &self.commitment.commitment.numerics,
                &evidence.evidence.numerics,
            ));
        }
        Ok(match judge(&judged, &opened, &margins, tier) {
            Judgement::Fail(failure, _) => Some(failure),
            _ => None,
        })
    }
}
