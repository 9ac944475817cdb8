//! The signed commitment a provider sends after the last token.

use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use crate::Digest32;
use crate::protocol::{FinishReason, ModelDigest, RequestId};
pub use crate::signing::SignatureError as CommitmentError;

/// Everything one generation is bound to: the request (id and hash of prompt, model and sampler
/// settings), the prompt as the provider tokenized it, the model by digest, the Merkle root over
/// the step leaves, and the output tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commitment {
    /// Format version, [`Commitment::VERSION`].
    pub version: u16,
    /// The gateway's request id.
    pub request_id: RequestId,
    /// [`crate::protocol::GenerateRequest::hash`] of the request served.
    pub request_hash: Digest32,
    /// The model that generated the output.
    pub model_digest: ModelDigest,
    /// Prompt length after the chat template, in tokens.
    pub prompt_tokens: u32,
    /// [`prompt_hash`] of the prompt tokens the model was run on, so a referee that tokenizes
    /// the same chat can tell whether the provider changed the prompt.
    pub prompt_hash: Digest32,
    /// Number of generated steps (= leaves).
    pub steps: u32,
    /// Root of the leaf tree.
    pub merkle_root: Digest32,
    /// [`output_hash`] of the generated tokens.
    pub output_hash: Digest32,
    /// Why generation stopped.
    pub finish_reason: FinishReason,
    /// The provider's numerics class (backend and kernels) that computed the committed logits;
    /// signed, so the audit tier it implies can be checked by anyone.
    pub numerics: String,
}

/// Domain tag of the commitment signature.
const DOMAIN: &[u8] = b"proofmesh/commitment/v2";

impl Commitment {
    /// The current format version.
    pub const VERSION: u16 = 2;

    /// Signs with the provider's secp256k1 node key.
    pub fn sign(
        self,
        key: &libp2p::identity::Keypair,
    ) -> Result<SignedCommitment, CommitmentError> {
        let parts = crate::signing::sign(key, DOMAIN, &self)?;
        Ok(SignedCommitment {
            commitment: self,
            public_key: parts.public_key,
            signature: parts.signature,
        })
    }
}

/// A [`Commitment`] with the signer's compressed SEC1 public key and a 64-byte ECDSA signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedCommitment {
    /// What was signed.
    pub commitment: Commitment,
    /// The signer's secp256k1 public key, compressed SEC1 (33 bytes).
    pub public_key: Vec<u8>,
    /// ECDSA signature `r ‖ s` (64 bytes, low-s).
    pub signature: Vec<u8>,
}

impl SignedCommitment {
    /// Checks the signature and returns the signer's peer id. Callers compare it with the peer
    /// that served the request: the node key is both the libp2p identity and the signer.
    pub fn verify(&self) -> Result<PeerId, CommitmentError> {
        crate::signing::verify(&self.public_key, &self.signature, DOMAIN, &self.commitment)
    }
}

/// `SHA-256("proofmesh/output/v1" ‖ tokens as u32 little-endian)`.
pub fn output_hash(tokens: &[u32]) -> Digest32 {
    let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
    crate::sha256(&[b"proofmesh/output/v1", &bytes])
}

/// `SHA-256("proofmesh/prompt/v1" ‖ tokens as u32 little-endian)`.
pub fn prompt_hash(tokens: &[u32]) -> Digest32 {
    let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
    crate::sha256(&[b"proofmesh/prompt/v1", &bytes])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commitment() -> Commitment {
        Commitment {
            version: Commitment::VERSION,
            request_id: RequestId::from_bytes([1; 16]),
            request_hash: [2; 32],
            model_digest: ModelDigest([3; 32]),
            prompt_tokens: 10,
            prompt_hash: prompt_hash(&[7; 10]),
            steps: 5,
            merkle_root: [4; 32],
            output_hash: output_hash(&[1, 2, 3, 4, 5]),
            finish_reason: FinishReason::Length,
            numerics: "det/test".into(),
        }
    }

    #[test]
    fn signature_binds_peer_id_and_content() {
        let key = libp2p::identity::Keypair::generate_secp256k1();
        let signed = commitment().sign(&key).unwrap();
        assert_eq!(signed.verify().unwrap(), key.public().to_peer_id());

        let mut changed = signed.clone();
        changed.commitment.steps = 6;
        assert_eq!(changed.verify(), Err(CommitmentError::BadSignature));

        let mut flipped = signed.clone();
        flipped.signature[10] ^= 1;
        assert_eq!(flipped.verify(), Err(CommitmentError::BadSignature));

        let other = libp2p::identity::Keypair::generate_secp256k1();
        let mut swapped = signed.clone();
        swapped.public_key = commitment().sign(&other).unwrap().public_key;
        assert_eq!(swapped.verify(), Err(CommitmentError::BadSignature));

        let mut garbage = signed;
        garbage.public_key = vec![1, 2, 3];
        assert_eq!(garbage.verify(), Err(CommitmentError::BadKey));
    }

    #[test]
    fn ed25519_keys_cannot_sign() {
        let key = libp2p::identity::Keypair::generate_ed25519();
        assert_eq!(commitment().sign(&key), Err(CommitmentError::NotSecp256k1));
    }
}
