//! Signatures by node keys: the commitment a provider signs and the evidence a referee signs.
//!
//! A node's secp256k1 key is also its libp2p identity, so a valid signature names a peer id.
//! The signed message is a domain tag followed by the CBOR of the value, so a signature made for
//! one kind of message never verifies as another.

use k256::ecdsa::signature::{Signer, Verifier};
use k256::ecdsa::{Signature, SigningKey, VerifyingKey};
use libp2p::PeerId;
use serde::Serialize;

/// Why a value could not be signed or verified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignatureError {
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

/// A compressed SEC1 public key (33 bytes) and a 64-byte low-s ECDSA signature `r ‖ s`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureParts {
    /// The signer's public key.
    pub public_key: Vec<u8>,
    /// The signature.
    pub signature: Vec<u8>,
}

fn message(domain: &[u8], value: &impl Serialize) -> Vec<u8> {
    let mut bytes = domain.to_vec();
    // Writing CBOR into a Vec cannot fail for plain data; an empty body would only make the
    // signature fail to verify.
    let _ = ciborium::into_writer(value, &mut bytes);
    bytes
}

/// Signs `domain ‖ CBOR(value)` with the node key.
pub fn sign(
    key: &libp2p::identity::Keypair,
    domain: &[u8],
    value: &impl Serialize,
) -> Result<SignatureParts, SignatureError> {
    let secret = key
        .clone()
        .try_into_secp256k1()
        .map_err(|_| SignatureError::NotSecp256k1)?
        .secret()
        .to_bytes();
    let signing = SigningKey::from_slice(&secret).map_err(|_| SignatureError::NotSecp256k1)?;
    let signature: Signature = signing.sign(&message(domain, value));
    Ok(SignatureParts {
        public_key: signing.verifying_key().to_sec1_bytes().to_vec(),
        signature: signature.to_bytes().to_vec(),
    })
}

/// Checks a signature over `domain ‖ CBOR(value)` and returns the signer's peer id.
pub fn verify(
    public_key: &[u8],
    signature: &[u8],
    domain: &[u8],
    value: &impl Serialize,
) -> Result<PeerId, SignatureError> {
    let verifying =
        VerifyingKey::from_sec1_bytes(public_key).map_err(|_| SignatureError::BadKey)?;
    let signature = Signature::from_slice(signature).map_err(|_| SignatureError::BadSignature)?;
    verifying
        .verify(&message(domain, value), &signature)
        .map_err(|_| SignatureError::BadSignature)?;
    let libp2p_key = libp2p::identity::secp256k1::PublicKey::try_from_bytes(public_key)
        .map_err(|_| SignatureError::BadKey)?;
    Ok(libp2p::identity::PublicKey::from(libp2p_key).to_peer_id())
}
