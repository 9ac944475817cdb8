//! The signed commitment a provider sends after the last token.

use k256::ecdsa::signature::{Signer, Verifier};
use k256::ecdsa::{Signature, SigningKey, VerifyingKey};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use crate::Digest32;
use crate::protocol::{FinishReason, ModelDigest, RequestId};

/// Everything one generation is bound to: the request (id and hash of prompt, model and sampler
/// settings), the model by digest, the Merkle root over the step leaves, and the output tokens.
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
    /// Number of generated steps (= leaves).
    pub steps: u32,
    /// Root of the leaf tree.
    pub merkle_root: Digest32,
    /// [`output_hash`] of the generated tokens.
    pub output_hash: Digest32,
    /// Why generation stopped.
    pub finish_reason: FinishReason,
}

impl Commitment {
    /// The current format version.
    pub const VERSION: u16 = 1;

    /// The signed message: `"proofmesh/commitment/v1" ‖ CBOR(self)`.
    fn signing_bytes(&self) -> Vec<u8> {
        let mut bytes = b"proofmesh/commitment/v1".to_vec();
        // Writing CBOR into a Vec cannot fail for these plain types; an empty body would only
        // make the signature fail to verify.
        let _ = ciborium::into_writer(self, &mut bytes);
        bytes
    }

    /// Signs with the provider's secp256k1 node key.
    pub fn sign(
        self,
        key: &libp2p::identity::Keypair,
    ) -> Result<SignedCommitment, CommitmentError> {
        let secret = key
            .clone()
            .try_into_secp256k1()
            .map_err(|_| CommitmentError::NotSecp256k1)?
            .secret()
            .to_bytes();
        let signing = SigningKey::from_slice(&secret).map_err(|_| CommitmentError::NotSecp256k1)?;
        let signature: Signature = signing.sign(&self.signing_bytes());
        let public_key = signing.verifying_key().to_sec1_bytes().to_vec();
        Ok(SignedCommitment {
            commitment: self,
            public_key,
            signature: signature.to_bytes().to_vec(),
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
        let verifying =
            VerifyingKey::from_sec1_bytes(&self.public_key).map_err(|_| CommitmentError::BadKey)?;
        let signature =
            Signature::from_slice(&self.signature).map_err(|_| CommitmentError::BadSignature)?;
        verifying
            .verify(&self.commitment.signing_bytes(), &signature)
            .map_err(|_| CommitmentError::BadSignature)?;
        let libp2p_key = libp2p::identity::secp256k1::PublicKey::try_from_bytes(&self.public_key)
            .map_err(|_| CommitmentError::BadKey)?;
        Ok(libp2p::identity::PublicKey::from(libp2p_key).to_peer_id())
    }
}

/// Why a commitment could not be signed or verified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CommitmentError {
    /// The node key is not a secp256k1 key.
    #[error("node key is not secp256k1")]
    NotSecp256k1,
    /// The public key does not parse.
    #[error("malformed public key")]
    BadKey,
    /// The signature does not parse or does not verify.
    #[error("signature does not verify")]
    BadSignature,
}

/// `SHA-256("proofmesh/output/v1" ‖ tokens as u32 little-endian)`.
pub fn output_hash(tokens: &[u32]) -> Digest32 {
    let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
    crate::sha256(&[b"proofmesh/output/v1", &bytes])
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
            steps: 5,
            merkle_root: [4; 32],
            output_hash: output_hash(&[1, 2, 3, 4, 5]),
            finish_reason: FinishReason::Length,
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
