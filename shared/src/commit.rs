//! What a provider commits to, and how anyone checks it.
//!
//! Per generated step the provider builds a [`StepLeaf`]; the leaves form a Merkle tree with
//! domain-separated hashing ([`tree`]); the root, the step count and the hashes binding request,
//! model and output form a [`Commitment`], signed with the provider's secp256k1 node key into a
//! [`SignedCommitment`].

mod commitment;
mod leaf;
pub mod tree;

pub use commitment::{Commitment, CommitmentError, SignedCommitment, output_hash, prompt_hash};
pub use leaf::StepLeaf;
pub use tree::{LeafTree, verify_openings};
