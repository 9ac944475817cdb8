//! A fraud proof file, as `proofmesh-gateway check-proof` and a gateway receiving one read it:
//! decoded, then re-checked with the audit rule. Anyone can hand one over.

#![no_main]

use libfuzzer_sys::fuzz_target;
use proofmesh_shared::verify::FraudProof;

fuzz_target!(|data: &[u8]| {
    if let Ok(proof) = ciborium::from_reader::<FraudProof, _>(data) {
        let _ = proof.check();
    }
});
