//! Which steps a gateway asks a provider to open, and how many.

use serde::{Deserialize, Serialize};

use crate::commit::SignedCommitment;

/// Steps challenged per request by default; every step is opened when there are this few or
/// fewer. ../VERIFICATION.md §6: k = 16 catches a per-step cheat rate of 0.5 with ≥ 96 %, and
/// the calibration harness measured every cheaper quantization caught at k = 16 (see
/// [`super::rule`]).
pub const DEFAULT_CHALLENGE_COUNT: usize = 16;
/// Steps challenged for a provider still on probation (too few passed audits to trust yet), and
/// added once more when the first ones come out borderline: k = 32 reaches 99.99 % at a per-step
/// cheat rate of 0.5.
pub const PROBATION_CHALLENGE_COUNT: usize = 32;

/// The steps a gateway asks a provider to open, drawn after the signed commitment arrived.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    /// Sorted, distinct step indices.
    pub indices: Vec<u32>,
}

impl Challenge {
    /// Draws `min(count, steps)` distinct indices from
    /// `SHA-256("proofmesh/challenge/v1" ‖ secret ‖ root ‖ request id ‖ counter)`: unpredictable
    /// to the provider (it lacks the gateway's secret) and fixed once the root is. The last step
    /// is always among them: it carries the end-of-generation claim.
    pub fn derive(secret: &[u8; 32], signed: &SignedCommitment, count: usize) -> Self {
        Self::extend(secret, signed, &Self { indices: vec![] }, count)
    }

    /// `self` plus up to `more` further indices drawn the same way (for a second round when the
    /// first one was borderline). Indices already challenged are not drawn again.
    pub fn extend(
        secret: &[u8; 32],
        signed: &SignedCommitment,
        already: &Challenge,
        more: usize,
    ) -> Self {
        let commitment = &signed.commitment;
        let steps = commitment.steps;
        let mut chosen: std::collections::BTreeSet<u32> = already.indices.iter().copied().collect();
        let target = (chosen.len() + more).min(steps as usize);
        if steps > 0 && chosen.len() < target {
            chosen.insert(steps - 1);
        }
        if target == steps as usize {
            return Self {
                indices: (0..steps).collect(),
            };
        }
        let mut counter: u64 = already.indices.len() as u64 * 1_000_003;
        while chosen.len() < target {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commit::{Commitment, output_hash, prompt_hash};
    use crate::protocol::{FinishReason, ModelDigest, RequestId};

    fn signed(steps: u32) -> SignedCommitment {
        Commitment {
            version: Commitment::VERSION,
            request_id: RequestId::from_bytes([3; 16]),
            request_hash: [1; 32],
            model_digest: ModelDigest([2; 32]),
            prompt_tokens: 4,
            prompt_hash: prompt_hash(&[1, 2, 3, 4]),
            steps,
            merkle_root: [9; 32],
            output_hash: output_hash(&[]),
            finish_reason: FinishReason::Length,
            numerics: "det/test".into(),
        }
        .sign(&libp2p::identity::Keypair::generate_secp256k1())
        .unwrap()
    }

    #[test]
    fn short_answers_are_opened_whole_and_the_last_step_always() {
        let short = signed(10);
        assert_eq!(
            Challenge::derive(&[1; 32], &short, 16).indices,
            (0..10).collect::<Vec<_>>()
        );
        for seed in 0..20u8 {
            let c = Challenge::derive(&[seed; 32], &signed(200), 16);
            assert_eq!(c.indices.len(), 16);
            assert_eq!(c.indices.last(), Some(&199));
            assert!(c.indices.windows(2).all(|w| w[0] < w[1]));
        }
    }

    #[test]
    fn challenges_depend_on_the_secret_and_grow_without_repeats() {
        let s = signed(500);
        let a = Challenge::derive(&[1; 32], &s, 16);
        assert_ne!(a, Challenge::derive(&[2; 32], &s, 16));
        let more = Challenge::extend(&[1; 32], &s, &a, 16);
        assert_eq!(more.indices.len(), 32);
        assert!(a.indices.iter().all(|i| more.indices.contains(i)));
        let all = Challenge::extend(&[1; 32], &signed(20), &a, 16);
        assert_eq!(all.indices.len(), 20);
    }
}
