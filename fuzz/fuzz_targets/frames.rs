//! Every length-prefixed frame a peer can send on a raw stream, decoded as the receiver does
//! (with its size limit), and a decoded generate request validated as a provider does.

#![no_main]

use futures::executor::block_on;
use libfuzzer_sys::fuzz_target;
use proofmesh_shared::protocol::{
    GenerateFrame, GenerateRequest, MAX_EVIDENCE_FRAME, MAX_REFEREE_FRAME, MAX_REQUEST_FRAME,
    MAX_STREAM_FRAME, ModelDigest, RefereeFrame, RefereeReply, read_frame,
};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    let mut input = bytes;
    match selector % 4 {
        0 => {
            if let Ok(request) = block_on(read_frame::<_, GenerateRequest>(&mut input, MAX_REQUEST_FRAME)) {
                let _ = request.validate(&ModelDigest([7; 32]));
                let _ = request.hash();
            }
        }
        1 => {
            let _ = block_on(read_frame::<_, GenerateFrame>(&mut input, MAX_STREAM_FRAME));
        }
        2 => {
            let _ = block_on(read_frame::<_, RefereeFrame>(&mut input, MAX_REFEREE_FRAME));
        }
        _ => {
            let _ = block_on(read_frame::<_, RefereeReply>(&mut input, MAX_EVIDENCE_FRAME));
        }
    }
});
