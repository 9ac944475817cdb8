//! Micro-benchmarks of what verification costs per request: hashing leaves, building the Merkle
//! tree, signing and checking commitments, multi-proofs, and the per-step candidate extraction
//! over a full vocabulary. `cargo bench -p proofmesh-shared --bench commitment`.
//!
//! Leaves are built the way a provider builds them (32 candidates from a 49,152-entry logit
//! vector, SmolLM2's vocabulary size), so sizes and costs match the real path.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use proofmesh_shared::commit::{Commitment, LeafTree, StepLeaf, output_hash, verify_openings};
use proofmesh_shared::protocol::{
    ChatMessage, FinishReason, GenerateRequest, ModelDigest, OpenLeavesResponse, RequestId,
};
use proofmesh_shared::sampling::{self, SamplerParams};
use proofmesh_shared::verify::{Challenge, check_commitment, check_openings};

const VOCAB: usize = 49_152;

/// Deterministic pseudo-logits for one step.
fn logits(step: u32) -> Vec<f32> {
    let mut x = u64::from(step).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..VOCAB)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 20_000) as f32 / 1000.0 - 10.0
        })
        .collect()
}

struct Run {
    request: GenerateRequest,
    leaves: Vec<StepLeaf>,
    tokens: Vec<u32>,
    key: libp2p::identity::Keypair,
}

fn run(steps: u32) -> Run {
    let request = GenerateRequest {
        version: GenerateRequest::VERSION,
        request_id: RequestId::from_bytes([7; 16]),
        model_digest: ModelDigest([3; 32]),
        messages: vec![ChatMessage {
            role: "user".into(),
            content: "Write a story.".into(),
        }],
        sampler: SamplerParams {
            temperature: 0.8,
            top_p: 0.95,
            seed: 42,
            ..Default::default()
        },
        max_tokens: steps,
        stop: vec![],
        trace: None,
        stream_leaves: false,
        tools: None,
        constraint: None,
        prompt: None,
    };
    let leaves: Vec<StepLeaf> = (0..steps)
        .map(|step| {
            let logits = logits(step % 8);
            let top = sampling::top_candidates(&logits);
            let draw = sampling::draw(42, step);
            let token = sampling::sample(&top, &request.sampler, draw).unwrap();
            StepLeaf {
                step,
                token,
                draw,
                logsumexp: sampling::logsumexp(&logits),
                top,
            }
        })
        .collect();
    let tokens = leaves.iter().map(|l| l.token).collect();
    Run {
        request,
        leaves,
        tokens,
        key: libp2p::identity::Keypair::generate_secp256k1(),
    }
}

/// What a provider does after the last token: tree, output hash, signature.
fn commit(run: &Run) -> (LeafTree, proofmesh_shared::commit::SignedCommitment) {
    let tree = LeafTree::build(&run.leaves);
    let commitment = Commitment {
        version: Commitment::VERSION,
        request_id: run.request.request_id,
        request_hash: run.request.hash(),
        model_digest: run.request.model_digest,
        prompt_tokens: 12,
        prompt_hash: proofmesh_shared::commit::prompt_hash(&[1; 12]),
        steps: run.leaves.len() as u32,
        merkle_root: tree.root(),
        output_hash: output_hash(&run.tokens),
        finish_reason: FinishReason::Length,
        numerics: "det/bench".into(),
    };
    let signed = commitment.sign(&run.key).unwrap();
    (tree, signed)
}

fn per_step(c: &mut Criterion) {
    let logits = logits(1);
    let mut group = c.benchmark_group("per_step");
    group.bench_function("top_candidates_49152", |b| {
        b.iter(|| sampling::top_candidates(black_box(&logits)));
    });
    group.bench_function("logsumexp_49152", |b| {
        b.iter(|| sampling::logsumexp(black_box(&logits)));
    });
    let run = run(1);
    group.bench_function("leaf_hash", |b| b.iter(|| black_box(&run.leaves[0]).hash()));
    group.finish();
}

fn per_request(c: &mut Criterion) {
    let mut group = c.benchmark_group("per_request");
    for steps in [128u32, 512] {
        let run = run(steps);
        group.bench_with_input(BenchmarkId::new("tree_build", steps), &run, |b, run| {
            b.iter(|| LeafTree::build(black_box(&run.leaves)));
        });
        group.bench_with_input(
            BenchmarkId::new("commit_tree_hash_sign", steps),
            &run,
            |b, run| b.iter(|| commit(black_box(run))),
        );
        let (tree, signed) = commit(&run);
        group.bench_with_input(
            BenchmarkId::new("verify_signature", steps),
            &signed,
            |b, s| {
                b.iter(|| black_box(s).verify().unwrap());
            },
        );
        let challenge = Challenge::derive(&[1; 32], &signed, 16);
        let indices: Vec<usize> = challenge.indices.iter().map(|&i| i as usize).collect();
        group.bench_with_input(BenchmarkId::new("prove_16", steps), &tree, |b, tree| {
            b.iter(|| tree.prove(black_box(&indices)));
        });
        let opened: Vec<StepLeaf> = indices.iter().map(|&i| run.leaves[i].clone()).collect();
        let proof = tree.prove(&indices);
        group.bench_with_input(
            BenchmarkId::new("verify_proof_16", steps),
            &proof,
            |b, proof| {
                b.iter(|| {
                    assert!(verify_openings(
                        &signed.commitment.merkle_root,
                        &indices,
                        &opened,
                        black_box(proof),
                        steps as usize,
                    ));
                });
            },
        );
        let response = OpenLeavesResponse::Opened {
            leaves: opened.clone(),
            proof: proof.clone(),
        };
        let peer = run.key.public().to_peer_id();
        group.bench_with_input(
            BenchmarkId::new("full_audit_16", steps),
            &response,
            |b, response| {
                b.iter(|| {
                    check_commitment(&signed, &run.request, &peer, &run.tokens).unwrap();
                    check_openings(&signed, &run.request, &run.tokens, &challenge, response)
                        .unwrap();
                });
            },
        );
    }
    group.finish();
}

criterion_group!(benches, per_step, per_request);
criterion_main!(benches);
