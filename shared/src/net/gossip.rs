//! Gossip between gateways: fraud proofs on one gossipsub topic.
//!
//! Only gateways take part (providers have no use for proofs against their peers). A message is
//! a [`FraudProof`](crate::verify::FraudProof) in canonical CBOR, signed by the gateway that
//! published it (gossipsub's strict validation). Nothing is forwarded before the application
//! checked it ([`ProofVerdict`]): a proof that holds is passed on, a forged one is dropped and
//! its sender struck, one the gateway could not check is dropped without blame. A message id is
//! the hash of the proof, so the same proof republished by others is one message. While the
//! application is behind on mesh events, proofs are dropped unchecked at once: a flood of them
//! must not crowd out what the registry needs.

use std::time::Duration;

use libp2p::gossipsub::{
    self, ConfigBuilder, IdentTopic, MessageAuthenticity, MessageId, ValidationMode,
};
use libp2p::identity::Keypair;
use sha2::{Digest, Sha256};

/// The topic fraud proofs are published on.
pub const PROOF_TOPIC: &str = "/proofmesh/fraud-proofs/1";
/// Largest proof message: a proof carries its request (≤ 1 MiB of prompt) and openings.
pub const MAX_PROOF_MESSAGE: usize = 2 * 1024 * 1024;
/// Heartbeats (a second each) a message stays in gossip's cache: its check (a re-execution on
/// the gateway's engine) must end before then for the proof to be passed on.
const HISTORY: usize = 60;
/// How long a message id is remembered, so that a proof heard again is not checked again.
const SEEN_FOR: Duration = Duration::from_secs(600);

/// What a gateway found of a proof it heard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProofVerdict {
    /// It holds: acted on, and passed on.
    Holds,
    /// It does not hold: dropped, and its sender struck.
    Forged,
    /// It could not be checked here: dropped, nobody blamed.
    Unchecked,
}

/// The topic.
pub(crate) fn topic() -> IdentTopic {
    IdentTopic::new(PROOF_TOPIC)
}

/// Gossipsub as gateways run it: signed messages, checked before forwarding, content-addressed.
pub(crate) fn behaviour(key: &Keypair) -> Result<gossipsub::Behaviour, String> {
    let config = ConfigBuilder::default()
        .validation_mode(ValidationMode::Strict)
        .validate_messages()
        .max_transmit_size(MAX_PROOF_MESSAGE)
        .history_length(HISTORY)
        .duplicate_cache_time(SEEN_FOR)
        .message_id_fn(|message| MessageId::from(Sha256::digest(&message.data).to_vec()))
        .build()
        .map_err(|e| e.to_string())?;
    let mut gossip = gossipsub::Behaviour::new(MessageAuthenticity::Signed(key.clone()), config)?;
    gossip.subscribe(&topic()).map_err(|e| e.to_string())?;
    Ok(gossip)
}
