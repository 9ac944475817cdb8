//! The contract between proofmesh gateways and providers.
//!
//! Everything that both sides of a request must agree on lives here, so that a gateway and a
//! provider built from the same version cannot disagree about bytes on the wire, about what a
//! commitment covers, about which token the sampler picks, or about what an audit accepts.
//! There is no HTTP and no llama.cpp in this crate.
//!
//! # Layout
//!
//! - [`protocol`]: versioned wire messages (generate request, stream frames, leaf openings,
//!   capabilities), their size limits and the length-prefixed CBOR framing.
//! - [`commit`]: per-step [`commit::StepLeaf`]s, the domain-separated Merkle tree over them and the
//!   signed [`commit::Commitment`].
//! - [`sampling`]: the reproducible sampler (Gumbel-max with a keyed PRF of (seed, step)), so
//!   anyone holding the committed logits can replay a provider's choice, and the DiFR margin a
//!   referee scores claimed tokens with.
//! - [`verify`]: the audit rule: [`verify::Challenge`] derivation, the exact checks on a
//!   commitment, its opened leaves and a referee's [`verify::SignedEvidence`], and the calibrated
//!   statistical checks of committed logits against the referee's, which together turn into an
//!   [`verify::AuditVerdict`].
//! - [`constraint`]: constrained decoding (JSON object, JSON schema) as a mask per step that
//!   provider, referee and gateway compute alike, and the gateway's replay of an answer
//!   through it.
//! - [`tools`]: tool calling in llama.cpp's generic JSON format: the schema a call is
//!   constrained to, the system note and history text, and reading calls back.
//! - [`signing`]: signatures by node keys (commitments, openings, tickets, referee evidence).
//! - [`text`]: turning token bytes into the visible text, with stop sequences: the provider
//!   streams by it and the gateway checks the stream by it, so both cut text the same way.
//! - [`identity`]: the node key (secp256k1), stored with 0600 permissions, shared by libp2p and
//!   the commitment signer so a signature is bound to a peer id.
//! - [`process`]: the shutdown signal both binaries use.
//! - [`config`]: layered configuration (defaults, TOML file, environment, flags).
//! - [`telemetry`]: logs and OTLP traces, and the trace context carried across the mesh.
//! - [`metrics`]: the Prometheus text encoding both `/metrics` endpoints use.
//! - [`model_file`]: digest, name and quantization of a GGUF file.
//! - [`net`]: the libp2p behaviour and the one task that owns the `Swarm`, with a cloneable
//!   [`net::Client`] for everyone else; inbound streams taken under per-peer quotas, the strikes
//!   and bans of peers that flood or break the protocol, and a private mesh's pre-shared key.

pub mod commit;
pub mod config;
pub mod constraint;
pub mod identity;
pub mod metrics;
pub mod model_file;
pub mod net;
pub mod process;
pub mod protocol;
pub mod sampling;
pub mod signing;
pub mod telemetry;
pub mod text;
pub mod tools;
pub mod verify;

/// A 32-byte SHA-256 digest, used for model digests, request and output hashes and Merkle nodes.
pub type Digest32 = [u8; 32];

/// SHA-256 of `parts`, each preceded by nothing: callers put a domain tag first.
pub fn sha256(parts: &[&[u8]]) -> Digest32 {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    for part in parts {
        hasher.update(part);
    }
    hasher.finalize().into()
}
