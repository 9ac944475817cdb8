//! The audit rule (exact layer).
//!
//! Given what the gateway saw (its own request, the tokens streamed to it, the peer that served)
//! and what the provider signed and opened, decide whether the answer stands. Every check here is
//! exact: no honest provider can fail one, so any failure is fraud or a broken provider by
//! construction. Statistical comparison against a referee's re-execution builds on top of this.
//!
//! Order of use: [`check_commitment`] as soon as the `Done` frame arrives; then
//! [`Challenge::derive`] (only now, so the provider could not know the challenged steps while
//! committing); then [`check_openings`] on the provider's answer.

use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use crate::commit::{SignedCommitment, StepLeaf, output_hash, verify_openings};
use crate::protocol::{FinishReason, GenerateRequest, OpenLeavesResponse};
use crate::sampling::{self, CANDIDATES};

/// Steps challenged per request by default; every step is opened when there are this few or
/// fewer. ../VERIFICATION.md §6: k = 16 catches a per-step cheat rate of 0.5 with ≥ 96 %.
pub const DEFAULT_CHALLENGE_COUNT: usize = 16;

/// The steps a gateway asks a provider to open, drawn after the signed commitment arrived.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    /// Sorted, distinct step indices.
    pub indices: Vec<u32>,
}

impl Challenge {
    /// Draws `min(count, steps)` distinct indices from
    /// `SHA-256("proofmesh/challenge/v1" ‖ secret ‖ root ‖ request id ‖ counter)`: unpredictable
    /// to the provider (it lacks the gateway's secret) and fixed once the root is.
    pub fn derive(secret: &[u8; 32], signed: &SignedCommitment, count: usize) -> Self {
        let commitment = &signed.commitment;
        let steps = commitment.steps;
        if (steps as usize) <= count {
            return Self {
                indices: (0..steps).collect(),
            };
        }
        let mut chosen = std::collections::BTreeSet::new();
        let mut counter: u64 = 0;
        while chosen.len() < count {
            let digest = crate::sha256(&[
                b"proofmesh/challenge/v1",
                secret,
                &commitment.merkle_root,
                commitment.request_id.as_bytes(),
                &counter.to_le_bytes(),
            ]);
            let mut head = [0u8; 8];
            head.copy_from_slice(&digest[..8]);
            chosen.insert((u64::from_le_bytes(head) % u64::from(steps)) as u32);
            counter += 1;
        }
        Self {
            indices: chosen.into_iter().collect(),
        }
    }
}

/// Why an audit failed. Each variant is an exact check; the string forms are stable and appear in
/// the `x-proofmesh-verdict` header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum AuditFailure {
    /// The signature or key does not verify.
    #[error("bad_signature")]
    BadSignature,
    /// Signed by a key other than the serving peer's.
    #[error("wrong_signer")]
    WrongSigner,
    /// The commitment names another request, prompt or sampler setting.
    #[error("request_mismatch")]
    RequestMismatch,
    /// The commitment names another model.
    #[error("model_mismatch")]
    ModelMismatch,
    /// The step count or output hash disagrees with the streamed tokens.
    #[error("output_mismatch")]
    OutputMismatch,
    /// More steps than `max_tokens`, or a length finish before `max_tokens`.
    #[error("length_mismatch")]
    LengthMismatch,
    /// The provider refused or failed to open the challenged leaves.
    #[error("opening_refused")]
    OpeningRefused,
    /// The opened leaves are not in the committed tree.
    #[error("merkle_path_invalid")]
    MerklePathInvalid,
    /// An opened leaf is for another step or token than the one streamed.
    #[error("leaf_mismatch")]
    LeafMismatch,
    /// A leaf's draw is not the PRF's value.
    #[error("draw_mismatch")]
    DrawMismatch,
    /// A leaf's candidate list is malformed (unsorted, duplicated, non-finite, too long).
    #[error("malformed_leaf")]
    MalformedLeaf,
    /// Replaying the sampler on the committed logits picks another token.
    #[error("sampler_mismatch")]
    SamplerMismatch,
}

/// The outcome of an audit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuditVerdict {
    /// No audit was asked for (`verification_mode: none`); the commitment's signature was still
    /// checked.
    Unaudited,
    /// Every check held.
    Passed,
    /// A check failed.
    Failed(AuditFailure),
}

impl AuditVerdict {
    /// Stable label for headers and logs: `unaudited`, `passed` or `failed:<reason>`.
    pub fn label(&self) -> String {
        match self {
            Self::Unaudited => "unaudited".into(),
            Self::Passed => "passed".into(),
            Self::Failed(reason) => format!("failed:{reason}"),
        }
    }
}

/// Checks a signed commitment against what the gateway itself knows: the request it sent, the
/// peer it sent it to, and the tokens it received.
pub fn check_commitment(
    signed: &SignedCommitment,
    request: &GenerateRequest,
    provider: &PeerId,
    tokens: &[u32],
) -> Result<(), AuditFailure> {
    let signer = signed.verify().map_err(|_| AuditFailure::BadSignature)?;
    if &signer != provider {
        return Err(AuditFailure::WrongSigner);
    }
    let c = &signed.commitment;
    if c.request_id != request.request_id || c.request_hash != request.hash() {
        return Err(AuditFailure::RequestMismatch);
    }
    if c.model_digest != request.model_digest {
        return Err(AuditFailure::ModelMismatch);
    }
    if c.steps as usize != tokens.len() || c.output_hash != output_hash(tokens) {
        return Err(AuditFailure::OutputMismatch);
    }
    if c.steps == 0
        || c.steps > request.max_tokens
        || (c.finish_reason == FinishReason::Length && c.steps != request.max_tokens)
    {
        return Err(AuditFailure::LengthMismatch);
    }
    Ok(())
}

/// Checks the provider's opening of `challenge`: Merkle inclusion, that each leaf is the step and
/// token streamed, that its draw is the PRF's, and that the sampler replayed on its committed
/// candidates picks its token.
pub fn check_openings(
    signed: &SignedCommitment,
    request: &GenerateRequest,
    tokens: &[u32],
    challenge: &Challenge,
    response: &OpenLeavesResponse,
) -> Result<(), AuditFailure> {
    let (leaves, proof) = match response {
        OpenLeavesResponse::Opened { leaves, proof } => (leaves, proof),
        OpenLeavesResponse::Refused { .. } => return Err(AuditFailure::OpeningRefused),
    };
    let indices: Vec<usize> = challenge.indices.iter().map(|&i| i as usize).collect();
    let c = &signed.commitment;
    if !verify_openings(&c.merkle_root, &indices, leaves, proof, c.steps as usize) {
        return Err(AuditFailure::MerklePathInvalid);
    }
    for (leaf, &index) in leaves.iter().zip(&indices) {
        check_leaf(leaf, index, request, tokens)?;
    }
    Ok(())
}

/// The per-leaf exact checks.
fn check_leaf(
    leaf: &StepLeaf,
    index: usize,
    request: &GenerateRequest,
    tokens: &[u32],
) -> Result<(), AuditFailure> {
    if leaf.step as usize != index || tokens.get(index) != Some(&leaf.token) {
        return Err(AuditFailure::LeafMismatch);
    }
    let seed = request.sampler.seed;
    if leaf.draw != sampling::draw(seed, leaf.step) {
        return Err(AuditFailure::DrawMismatch);
    }
    let top = &leaf.top;
    let sorted = top
        .windows(2)
        .all(|w| w[0].logit > w[1].logit || (w[0].logit == w[1].logit && w[0].id < w[1].id));
    let mut ids: Vec<u32> = top.iter().map(|c| c.id).collect();
    ids.sort_unstable();
    ids.dedup();
    let well_formed = !top.is_empty()
        && top.len() <= CANDIDATES
        && sorted
        && ids.len() == top.len()
        && top.iter().all(|c| c.logit.is_finite())
        && leaf.logsumexp.is_finite()
        && leaf.logsumexp >= top[0].logit;
    if !well_formed {
        return Err(AuditFailure::MalformedLeaf);
    }
    match sampling::sample(top, &request.sampler, leaf.draw) {
        Some(token) if token == leaf.token => Ok(()),
        _ => Err(AuditFailure::SamplerMismatch),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commit::{Commitment, LeafTree};
    use crate::protocol::{ChatMessage, ModelDigest, RequestId};
    use crate::sampling::{SamplerParams, TopLogit, top_candidates};

    struct Run {
        key: libp2p::identity::Keypair,
        request: GenerateRequest,
        leaves: Vec<StepLeaf>,
        tokens: Vec<u32>,
        signed: SignedCommitment,
        tree: LeafTree,
    }

    /// An honest run over fake logits, built exactly as a provider builds one.
    fn honest(temperature: f32, steps: u32) -> Run {
        let key = libp2p::identity::Keypair::generate_secp256k1();
        let request = GenerateRequest {
            version: GenerateRequest::VERSION,
            request_id: RequestId::from_bytes([9; 16]),
            model_digest: ModelDigest([5; 32]),
            messages: vec![ChatMessage {
                role: "user".into(),
                content: "x".into(),
            }],
            sampler: SamplerParams {
                temperature,
                seed: 42,
                ..Default::default()
            },
            max_tokens: steps,
            stop: vec![],
            trace: None,
        };
        let mut leaves = Vec::new();
        for step in 0..steps {
            let logits: Vec<f32> = (0..100u32)
                .map(|i| ((i * 7919 + step * 104_729) % 1000) as f32 / 100.0)
                .collect();
            let top = top_candidates(&logits);
            let draw = sampling::draw(42, step);
            let token = sampling::sample(&top, &request.sampler, draw).unwrap();
            leaves.push(StepLeaf {
                step,
                token,
                draw,
                logsumexp: sampling::logsumexp(&logits),
                top,
            });
        }
        let tokens: Vec<u32> = leaves.iter().map(|l| l.token).collect();
        let tree = LeafTree::build(&leaves);
        let signed = Commitment {
            version: Commitment::VERSION,
            request_id: request.request_id,
            request_hash: request.hash(),
            model_digest: request.model_digest,
            prompt_tokens: 3,
            steps,
            merkle_root: tree.root(),
            output_hash: output_hash(&tokens),
            finish_reason: FinishReason::Length,
        }
        .sign(&key)
        .unwrap();
        Run {
            key,
            request,
            leaves,
            tokens,
            signed,
            tree,
        }
    }

    fn open(run: &Run, challenge: &Challenge) -> OpenLeavesResponse {
        let idx: Vec<usize> = challenge.indices.iter().map(|&i| i as usize).collect();
        OpenLeavesResponse::Opened {
            leaves: idx.iter().map(|&i| run.leaves[i].clone()).collect(),
            proof: run.tree.prove(&idx),
        }
    }

    fn audit(
        run: &Run,
        response: &OpenLeavesResponse,
        challenge: &Challenge,
    ) -> Result<(), AuditFailure> {
        let peer = run.key.public().to_peer_id();
        check_commitment(&run.signed, &run.request, &peer, &run.tokens)?;
        check_openings(&run.signed, &run.request, &run.tokens, challenge, response)
    }

    #[test]
    fn honest_runs_pass_greedy_and_sampled() {
        for temperature in [0.0, 0.7, 1.3] {
            for steps in [1, 5, 16, 40] {
                let run = honest(temperature, steps);
                let challenge = Challenge::derive(&[1; 32], &run.signed, DEFAULT_CHALLENGE_COUNT);
                assert_eq!(
                    challenge.indices.len(),
                    (steps as usize).min(DEFAULT_CHALLENGE_COUNT)
                );
                assert_eq!(audit(&run, &open(&run, &challenge), &challenge), Ok(()));
            }
        }
    }

    #[test]
    fn challenges_depend_on_the_secret_and_the_root() {
        let run = honest(0.7, 200);
        let a = Challenge::derive(&[1; 32], &run.signed, 16);
        let b = Challenge::derive(&[2; 32], &run.signed, 16);
        assert_ne!(a, b);
        assert!(a.indices.windows(2).all(|w| w[0] < w[1]));
        assert!(a.indices.iter().all(|&i| i < 200));
    }

    #[test]
    fn forgeries_are_caught() {
        let run = honest(0.7, 20);
        let challenge = Challenge::derive(&[1; 32], &run.signed, DEFAULT_CHALLENGE_COUNT);
        let peer = run.key.public().to_peer_id();

        // Wrong signer: a valid signature by someone else.
        let other = libp2p::identity::Keypair::generate_secp256k1();
        let resigned = run.signed.commitment.clone().sign(&other).unwrap();
        assert_eq!(
            check_commitment(&resigned, &run.request, &peer, &run.tokens),
            Err(AuditFailure::WrongSigner)
        );
        // Tokens changed after committing.
        let mut changed = run.tokens.clone();
        changed[3] ^= 1;
        assert_eq!(
            check_commitment(&run.signed, &run.request, &peer, &changed),
            Err(AuditFailure::OutputMismatch)
        );
        // Replay for another prompt.
        let mut other_request = run.request.clone();
        other_request.messages[0].content = "y".into();
        assert_eq!(
            check_commitment(&run.signed, &other_request, &peer, &run.tokens),
            Err(AuditFailure::RequestMismatch)
        );
        // Truncation claimed as length.
        let mut longer = run.request.clone();
        longer.max_tokens = 30;
        let mut c = run.signed.commitment.clone();
        c.request_hash = longer.hash();
        let signed = c.sign(&run.key).unwrap();
        assert_eq!(
            check_commitment(&signed, &longer, &peer, &run.tokens),
            Err(AuditFailure::LengthMismatch)
        );

        // Tampered leaf.
        let mut response = open(&run, &challenge);
        if let OpenLeavesResponse::Opened { leaves, .. } = &mut response {
            leaves[0].top[0].logit += 0.5;
        }
        assert_eq!(
            audit(&run, &response, &challenge),
            Err(AuditFailure::MerklePathInvalid)
        );
        // Wrong path.
        let mut response = open(&run, &challenge);
        if let OpenLeavesResponse::Opened { proof, .. } = &mut response {
            proof[0][0] ^= 1;
        }
        assert_eq!(
            audit(&run, &response, &challenge),
            Err(AuditFailure::MerklePathInvalid)
        );
        // Refused.
        let refused = OpenLeavesResponse::Refused {
            reason: "gone".into(),
        };
        assert_eq!(
            audit(&run, &refused, &challenge),
            Err(AuditFailure::OpeningRefused)
        );
    }

    #[test]
    fn an_off_policy_token_fails_sampler_replay() {
        // A provider that commits honest logits but emits a token the sampler would not pick.
        let mut run = honest(0.0, 8);
        let leaf = &mut run.leaves[4];
        leaf.token = leaf.top[1].id;
        run.tokens[4] = leaf.token;
        run.tree = LeafTree::build(&run.leaves);
        let mut c = run.signed.commitment.clone();
        c.merkle_root = run.tree.root();
        c.output_hash = output_hash(&run.tokens);
        run.signed = c.sign(&run.key).unwrap();
        let challenge = Challenge::derive(&[1; 32], &run.signed, DEFAULT_CHALLENGE_COUNT);
        assert_eq!(
            audit(&run, &open(&run, &challenge), &challenge),
            Err(AuditFailure::SamplerMismatch)
        );
    }

    #[test]
    fn malformed_candidates_and_draws_are_caught() {
        let mut run = honest(0.7, 4);
        run.leaves[1].top.swap(0, 1);
        run.leaves[2].draw += 1;
        run.tree = LeafTree::build(&run.leaves);
        let mut c = run.signed.commitment.clone();
        c.merkle_root = run.tree.root();
        run.signed = c.sign(&run.key).unwrap();
        let one = Challenge { indices: vec![1] };
        assert_eq!(
            audit(&run, &open(&run, &one), &one),
            Err(AuditFailure::MalformedLeaf)
        );
        let two = Challenge { indices: vec![2] };
        assert_eq!(
            audit(&run, &open(&run, &two), &two),
            Err(AuditFailure::DrawMismatch)
        );
        let _ = TopLogit { id: 0, logit: 0.0 };
    }
}
