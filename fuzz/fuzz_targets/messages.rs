//! Every signed or request-response message a peer can send, decoded (CBOR) and, when it
//! decodes, its signature checked: nothing may panic, however the bytes are made.

#![no_main]

use libfuzzer_sys::fuzz_target;
use proofmesh_shared::commit::SignedCommitment;
use proofmesh_shared::protocol::{Capabilities, OpenLeavesRequest, SignedOpening, SignedTicket};
use proofmesh_shared::verify::SignedEvidence;

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    ciborium::from_reader(bytes).ok()
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    match selector % 6 {
        0 => {
            let _ = decode::<Capabilities>(bytes);
        }
        1 => {
            let _ = decode::<OpenLeavesRequest>(bytes);
        }
        2 => {
            if let Some(opening) = decode::<SignedOpening>(bytes) {
                let _ = opening.verify();
            }
        }
        3 => {
            if let Some(commitment) = decode::<SignedCommitment>(bytes) {
                let _ = commitment.verify();
            }
        }
        4 => {
            if let Some(evidence) = decode::<SignedEvidence>(bytes) {
                let _ = evidence.verify();
            }
        }
        _ => {
            if let Some(ticket) = decode::<SignedTicket>(bytes) {
                let _ = ticket.verify();
            }
        }
    }
});
