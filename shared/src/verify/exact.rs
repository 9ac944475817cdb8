//! The exact layer of the audit rule: checks no honest provider can fail.

use libp2p::PeerId;

use super::{AuditFailure, Challenge, SignedEvidence};
use crate::commit::{LeafTree, SignedCommitment, StepLeaf, output_hash, verify_openings};
use crate::protocol::{FinishReason, GenerateRequest, OpenLeavesResponse, SignedOpening};
use crate::sampling::{self, CANDIDATES};

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
    if c.version != crate::commit::Commitment::VERSION
        || c.request_id != request.request_id
        || c.request_hash != request.hash()
    {
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

/// Whether `opening` is `provider`'s own signed answer to `challenge` of this request. An
/// opening that is not cannot be held against the provider by anyone else.
pub fn opening_is_signed(
    opening: &SignedOpening,
    provider: &PeerId,
    request: &GenerateRequest,
    challenge: &Challenge,
) -> bool {
    opening.verify().is_ok_and(|signer| &signer == provider)
        && opening.opening.request_id == request.request_id
        && opening.opening.indices == challenge.indices
}

/// Checks the provider's opening of `challenge`: Merkle inclusion, that each leaf is the step and
/// token streamed, that its draw is the PRF's, and that the sampler replayed on its committed
/// candidates picks its token. Returns the opened leaves, in challenge order. (Whose signature
/// the opening carries is [`opening_is_signed`]'s question.)
pub fn check_openings<'a>(
    signed: &SignedCommitment,
    request: &GenerateRequest,
    tokens: &[u32],
    challenge: &Challenge,
    response: &'a OpenLeavesResponse,
) -> Result<&'a [StepLeaf], AuditFailure> {
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
    Ok(leaves)
}

/// Checks the leaves a provider streamed with its tokens (for a request that asked for them,
/// [`GenerateRequest::stream_leaves`]): one per token, each passing the per-leaf checks of an
/// opened leaf, and together hashing to the commitment's Merkle root. Then every value read off
/// them (a log-probability, a candidate) is the provider's commitment, as an audit checks it.
/// Any failure is [`AuditFailure::LeavesMismatch`]; leaves are not signed one by one, so only
/// the gateway that received them over the provider's connection may act on it.
pub fn check_streamed_leaves(
    signed: &SignedCommitment,
    request: &GenerateRequest,
    tokens: &[u32],
    leaves: &[StepLeaf],
) -> Result<(), AuditFailure> {
    if leaves.len() != tokens.len()
        || leaves
            .iter()
            .enumerate()
            .any(|(i, leaf)| check_leaf(leaf, i, request, tokens).is_err())
        || LeafTree::build(leaves).root() != signed.commitment.merkle_root
    {
        return Err(AuditFailure::LeavesMismatch);
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

/// Why a referee's evidence cannot be used. These are the referee's faults, never the
/// provider's: the gateway discards the evidence and finds another referee.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EvidenceError {
    /// The signature does not verify.
    #[error("evidence signature does not verify")]
    BadSignature,
    /// Signed by someone other than the referee asked.
    #[error("evidence signed by another peer")]
    WrongSigner,
    /// The evidence is about another request, commitment, provider or model.
    #[error("evidence is about something else: {0}")]
    Binding(&'static str),
    /// The evidence is incomplete or malformed.
    #[error("malformed evidence: {0}")]
    Malformed(&'static str),
}

/// Checks a referee's signed evidence, first for the referee's own faults (outer `Err`), then
/// for the exact facts it establishes about the provider (inner `Err`): the prompt the
/// provider ran, the vocabulary, and the finish.
pub fn check_evidence(
    signed: &SignedEvidence,
    referee: &PeerId,
    commitment: &SignedCommitment,
    request: &GenerateRequest,
    tokens: &[u32],
    challenge: &Challenge,
) -> Result<Result<(), AuditFailure>, EvidenceError> {
    let signer = signed.verify().map_err(|_| EvidenceError::BadSignature)?;
    if &signer != referee {
        return Err(EvidenceError::WrongSigner);
    }
    let e = &signed.evidence;
    let c = &commitment.commitment;
    if e.version != super::RefereeEvidence::VERSION {
        return Err(EvidenceError::Malformed("unknown version"));
    }
    if e.request_id != request.request_id || e.request_hash != request.hash() {
        return Err(EvidenceError::Binding("request"));
    }
    if e.model_digest != request.model_digest {
        return Err(EvidenceError::Binding("model"));
    }
    if e.output_hash != output_hash(tokens) || e.steps as usize != tokens.len() {
        return Err(EvidenceError::Binding("tokens"));
    }
    if e.margins.len() != tokens.len() || e.margins.iter().any(|m| m.is_nan() || *m < 0.0) {
        return Err(EvidenceError::Malformed("margins"));
    }
    let asked = e.opened.len() == challenge.indices.len()
        && e.opened
            .iter()
            .zip(&challenge.indices)
            .all(|(s, &i)| s.step == i);
    let well_formed = e.opened.iter().all(|s| {
        !s.top.is_empty()
            && s.top.len() <= CANDIDATES
            && s.top.iter().all(|t| t.logit.is_finite())
            && s.top.windows(2).all(|w| w[0].logit >= w[1].logit)
            && s.logsumexp.is_finite()
            && !s.claimed_logit.is_nan()
    });
    if !asked || !well_formed {
        return Err(EvidenceError::Malformed("opened steps"));
    }
    if e.prompt_hash != c.prompt_hash || e.prompt_tokens != c.prompt_tokens {
        return Ok(Err(AuditFailure::PromptMismatch));
    }
    if e.invalid_tokens > 0 {
        return Ok(Err(AuditFailure::TokenOutOfVocabulary));
    }
    if c.finish_reason == FinishReason::Stop && !e.ends_with_eog && !e.stop_sequence_found {
        return Ok(Err(AuditFailure::FinishMismatch));
    }
    Ok(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commit::{Commitment, prompt_hash};
    use crate::protocol::{ChatMessage, ModelDigest, RequestId};
    use crate::sampling::{SamplerParams, TopLogit, top_candidates};
    use crate::verify::{Challenge, DEFAULT_CHALLENGE_COUNT};

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
            stream_leaves: false,
            tools: None,
            constraint: None,
            prompt: None,
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
            prompt_hash: prompt_hash(&[1, 2, 3]),
            steps,
            merkle_root: tree.root(),
            output_hash: output_hash(&tokens),
            finish_reason: FinishReason::Length,
            numerics: "det/test".into(),
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
        check_openings(&run.signed, &run.request, &run.tokens, challenge, response).map(|_| ())
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
    fn streamed_leaves_must_be_the_committed_ones() {
        for temperature in [0.0, 0.8] {
            let run = honest(temperature, 12);
            let check = |leaves: &[StepLeaf]| {
                check_streamed_leaves(&run.signed, &run.request, &run.tokens, leaves)
            };
            assert_eq!(check(&run.leaves), Ok(()));
            // A log-probability reported other than committed: a logit or the logsumexp moved.
            let mut lied = run.leaves.clone();
            lied[5].logsumexp += 0.25;
            assert_eq!(check(&lied), Err(AuditFailure::LeavesMismatch));
            let mut lied = run.leaves.clone();
            lied[7].top[3].logit -= 0.001;
            assert_eq!(check(&lied), Err(AuditFailure::LeavesMismatch));
            // One missing, or one for another step.
            assert_eq!(check(&run.leaves[1..]), Err(AuditFailure::LeavesMismatch));
            let mut swapped = run.leaves.clone();
            swapped.swap(2, 3);
            assert_eq!(check(&swapped), Err(AuditFailure::LeavesMismatch));
        }
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
