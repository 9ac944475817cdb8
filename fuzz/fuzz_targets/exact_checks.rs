//! The audit's exact checks on what a lying provider or referee can send about a genuine,
//! signed answer: leaf openings with Merkle multi-proofs (genuine ones with bytes flipped, and
//! made-up ones), the token list a commitment is checked against, and referee evidence. Each
//! must be judged without a panic, and a flipped opening must never pass as the genuine one
//! unless it decodes to the same leaves.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use libp2p::PeerId;
use libp2p::identity::Keypair;
use proofmesh_shared::commit::{
    Commitment, LeafTree, SignedCommitment, StepLeaf, output_hash, prompt_hash,
};
use proofmesh_shared::protocol::{
    ChatMessage, FinishReason, GenerateRequest, ModelDigest, OpenLeavesResponse, RequestId,
};
use proofmesh_shared::sampling::{SamplerParams, TopLogit, draw};
use proofmesh_shared::verify::{
    Challenge, SignedEvidence, check_commitment, check_evidence, check_openings,
};

const STEPS: u32 = 16;

struct Answer {
    provider: PeerId,
    request: GenerateRequest,
    tokens: Vec<u32>,
    leaves: Vec<StepLeaf>,
    tree: LeafTree,
    signed: SignedCommitment,
    challenge: Challenge,
    opening: Vec<u8>,
}

fn answer() -> &'static Answer {
    static ANSWER: OnceLock<Answer> = OnceLock::new();
    ANSWER.get_or_init(|| {
        // Fixed key and request id, so that a crash reproduces from its input alone.
        let secret = libp2p::identity::secp256k1::SecretKey::try_from_bytes([1u8; 32])
            .expect("a valid secret key");
        let key = Keypair::from(libp2p::identity::secp256k1::Keypair::from(secret));
        let mut id = Vec::new();
        ciborium::into_writer(&[9u8; 16], &mut id).expect("encodes");
        let request_id: RequestId = ciborium::from_reader(id.as_slice()).unwrap_or_else(|_| RequestId::random());
        let sampler = SamplerParams {
            temperature: 0.0,
            ..SamplerParams::default()
        };
        let request = GenerateRequest {
            version: GenerateRequest::VERSION,
            request_id,
            model_digest: ModelDigest([7; 32]),
            messages: vec![ChatMessage {
                role: "user".into(),
                content: "Say hi.".into(),
            }],
            sampler,
            max_tokens: STEPS,
            stop: vec![],
            trace: None,
            stream_leaves: false,
            tools: None,
            constraint: None,
            prompt: None,
        };
        let leaves: Vec<StepLeaf> = (0..STEPS)
            .map(|step| StepLeaf {
                step,
                token: 100 + step,
                draw: draw(request.sampler.seed, step),
                logsumexp: 9.5,
                top: vec![
                    TopLogit {
                        id: 100 + step,
                        logit: 9.0,
                    },
                    TopLogit { id: 5, logit: 1.0 },
                ],
            })
            .collect();
        let tokens: Vec<u32> = leaves.iter().map(|l| l.token).collect();
        let tree = LeafTree::build(&leaves);
        let signed = Commitment {
            version: Commitment::VERSION,
            request_id: request.request_id,
            request_hash: request.hash(),
            model_digest: request.model_digest,
            prompt_tokens: 5,
            prompt_hash: prompt_hash(&[1, 2, 3, 4, 5]),
            steps: STEPS,
            merkle_root: tree.root(),
            output_hash: output_hash(&tokens),
            finish_reason: FinishReason::Length,
            numerics: "det/fuzz".into(),
        }
        .sign(&key)
        .expect("a secp256k1 key signs");
        let challenge = Challenge::derive(&[3; 32], &signed, 4);
        let indices: Vec<usize> = challenge.indices.iter().map(|&i| i as usize).collect();
        let genuine = OpenLeavesResponse::Opened {
            leaves: indices.iter().map(|&i| leaves[i].clone()).collect(),
            proof: tree.prove(&indices),
        };
        // The fixture itself must pass, or only failure paths would be fuzzed.
        check_openings(&signed, &request, &tokens, &challenge, &genuine)
            .expect("the genuine opening passes the exact checks");
        check_commitment(&signed, &request, &key.public().to_peer_id(), &tokens)
            .expect("the genuine commitment passes");
        let mut opening = Vec::new();
        ciborium::into_writer(&genuine, &mut opening).expect("encodes");
        Answer {
            provider: key.public().to_peer_id(),
            request,
            tokens,
            leaves,
            tree,
            signed,
            challenge,
            opening,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let a = answer();
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    match selector % 4 {
        // The genuine opening with the input XORed over it.
        0 => {
            let mut flipped = a.opening.clone();
            for (i, b) in bytes.iter().enumerate() {
                let at = i % flipped.len();
                flipped[at] ^= b;
            }
            if let Ok(response) = ciborium::from_reader::<OpenLeavesResponse, _>(flipped.as_slice())
                && let Ok(opened) =
                    check_openings(&a.signed, &a.request, &a.tokens, &a.challenge, &response)
            {
                for (leaf, &i) in opened.iter().zip(&a.challenge.indices) {
                    assert_eq!(leaf, &a.leaves[i as usize], "a changed leaf passed the checks");
                }
            }
        }
        // A made-up opening.
        1 => {
            if let Ok(response) = ciborium::from_reader::<OpenLeavesResponse, _>(bytes) {
                let _ = check_openings(&a.signed, &a.request, &a.tokens, &a.challenge, &response);
            }
        }
        // The tokens the commitment is checked against.
        2 => {
            let tokens: Vec<u32> = bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let passed = check_commitment(&a.signed, &a.request, &a.provider, &tokens).is_ok();
            assert!(!passed || tokens == a.tokens, "other tokens passed the commitment check");
        }
        // Referee evidence about the answer.
        _ => {
            if let Ok(evidence) = ciborium::from_reader::<SignedEvidence, _>(bytes) {
                let referee = evidence.verify().unwrap_or(a.provider);
                let _ = check_evidence(
                    &evidence,
                    &referee,
                    &a.signed,
                    &a.request,
                    &a.tokens,
                    &a.challenge,
                );
            }
        }
    }
    let _ = &a.tree;
});
