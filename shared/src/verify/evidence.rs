//! What a referee reports after re-executing a sequence teacher-forced, signed with its key.

use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use crate::Digest32;
use crate::protocol::{ModelDigest, RequestId};
use crate::sampling::TopLogit;
use crate::signing::SignatureError;

/// The referee's view of one challenged step: its own candidates there, its full-vocabulary
/// logsumexp, and its logit for the token the provider claimed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefereeStep {
    /// Step index.
    pub step: u32,
    /// log-sum-exp of the referee's full logit vector at this step.
    pub logsumexp: f32,
    /// The referee's logit for the claimed token (exact, even when outside its candidates).
    pub claimed_logit: f32,
    /// The referee's best candidates, sorted descending (ties by lower id).
    pub top: Vec<TopLogit>,
}

/// A referee's account of one re-execution: what it examined (the request and the claimed
/// tokens, which the provider's commitment covers too), the facts the exact layer needs, its
/// logits at the challenged steps, and the DiFR margin of every claimed token. The referee is
/// never told whose answer it re-executed, so nothing here names the provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefereeEvidence {
    /// Format version, [`RefereeEvidence::VERSION`].
    pub version: u16,
    /// The request, as in the commitment.
    pub request_id: RequestId,
    /// The request hash, as in the commitment.
    pub request_hash: Digest32,
    /// The model the referee ran (its own file's digest).
    pub model_digest: ModelDigest,
    /// [`crate::commit::output_hash`] of the tokens the referee was sent.
    pub output_hash: Digest32,
    /// Tokens re-executed (the answer's length).
    pub steps: u32,
    /// Prompt length after the referee's own chat template and tokenizer.
    pub prompt_tokens: u32,
    /// [`crate::commit::prompt_hash`] of the referee's own tokenization.
    pub prompt_hash: Digest32,
    /// The referee's numerics class (backend and kernels); equal classes agree bit for bit.
    pub numerics: String,
    /// Tokens per micro-batch in the re-execution.
    pub micro_batch: u32,
    /// Claimed tokens outside the model's vocabulary.
    pub invalid_tokens: u32,
    /// Whether the last claimed token is an end-of-generation token.
    pub ends_with_eog: bool,
    /// Whether one of the request's stop sequences occurs in the claimed output's text.
    pub stop_sequence_found: bool,
    /// The referee's logits at the challenged steps, in the order asked.
    pub opened: Vec<RefereeStep>,
    /// [`crate::sampling::margin`] of every claimed token under the referee's logits, by step.
    pub margins: Vec<f32>,
}

impl RefereeEvidence {
    /// The current format version.
    pub const VERSION: u16 = 2;

    /// Signs with the referee's node key.
    pub fn sign(self, key: &libp2p::identity::Keypair) -> Result<SignedEvidence, SignatureError> {
        let parts = crate::signing::sign(key, DOMAIN, &self)?;
        Ok(SignedEvidence {
            evidence: self,
            public_key: parts.public_key,
            signature: parts.signature,
        })
    }
}

/// Domain tag of the evidence signature.
const DOMAIN: &[u8] = b"proofmesh/referee-evidence/v2";

/// [`RefereeEvidence`] with the referee's public key and signature, so that a fraud proof can be
/// checked offline and attributed to the referee that made it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignedEvidence {
    /// What was signed.
    pub evidence: RefereeEvidence,
    /// The referee's secp256k1 public key, compressed SEC1.
    pub public_key: Vec<u8>,
    /// ECDSA signature `r ‖ s`.
    pub signature: Vec<u8>,
}

impl SignedEvidence {
    /// Checks the signature and returns the referee's peer id.
    pub fn verify(&self) -> Result<PeerId, SignatureError> {
        crate::signing::verify(&self.public_key, &self.signature, DOMAIN, &self.evidence)
    }
}
