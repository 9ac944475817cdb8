//! A fraud proof, as `proofmesh-gateway check-proof` reads a file and a gateway reads one
//! gossiped by a peer: read as canonical CBOR, then re-checked with the audit rule, trusting
//! no referee and trusting one. Anyone can hand one over.

#![no_main]

use libfuzzer_sys::fuzz_target;
use proofmesh_shared::verify::FraudProof;

fuzz_target!(|data: &[u8]| {
    if let Ok(proof) = FraudProof::from_cbor(data) {
        let _ = proof.holds(&[]);
        let trusted = libp2p::PeerId::random();
        let _ = proof.holds(&[trusted]);
    }
});
