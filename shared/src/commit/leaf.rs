//! The per-step leaf.

use serde::{Deserialize, Serialize};

use crate::Digest32;
use crate::sampling::TopLogit;

/// What a provider commits for one generated step: enough for the audit to replay the sampler
/// (the candidates and the draw) and to compare log-probabilities with a referee (the
/// full-vocabulary logsumexp).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepLeaf {
    /// Step index, starting at 0.
    pub step: u32,
    /// The token emitted at this step.
    pub token: u32,
    /// The PRF draw used at this step ([`crate::sampling::draw`]).
    pub draw: u64,
    /// log-sum-exp of the full logit vector, so `logit - logsumexp` is a log-probability.
    pub logsumexp: f32,
    /// The sampler's candidates: the best logits, sorted descending.
    pub top: Vec<TopLogit>,
}

impl StepLeaf {
    /// Canonical bytes: a fixed little-endian layout, so the hash never depends on a serializer.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + 4 + 4 + 8 + 4 + 4 + self.top.len() * 8);
        out.extend_from_slice(b"PMLEAF01");
        out.extend_from_slice(&self.step.to_le_bytes());
        out.extend_from_slice(&self.token.to_le_bytes());
        out.extend_from_slice(&self.draw.to_le_bytes());
        out.extend_from_slice(&self.logsumexp.to_bits().to_le_bytes());
        out.extend_from_slice(&(self.top.len() as u32).to_le_bytes());
        for candidate in &self.top {
            out.extend_from_slice(&candidate.id.to_le_bytes());
            out.extend_from_slice(&candidate.logit.to_bits().to_le_bytes());
        }
        out
    }

    /// The Merkle leaf hash: `SHA-256(0x00 ‖ canonical bytes)`; inner nodes use `0x01`.
    pub fn hash(&self) -> Digest32 {
        crate::sha256(&[&[0x00], &self.canonical_bytes()])
    }

    /// The log-probability the committed logits give `token` under the model's full
    /// distribution (temperature 1, no truncation): its logit minus [`StepLeaf::logsumexp`].
    /// `None` for a token outside the committed candidates.
    pub fn logprob(&self, token: u32) -> Option<f32> {
        self.top
            .iter()
            .find(|c| c.id == token)
            .map(|c| c.logit - self.logsumexp)
    }

    /// Bytes this leaf occupies in memory, for the leaf store's bound.
    pub fn size_bytes(&self) -> usize {
        std::mem::size_of::<Self>() + self.top.len() * std::mem::size_of::<TopLogit>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_changes_the_hash() {
        let leaf = StepLeaf {
            step: 3,
            token: 42,
            draw: 99,
            logsumexp: 1.5,
            top: vec![
                TopLogit { id: 42, logit: 2.0 },
                TopLogit { id: 7, logit: 1.0 },
            ],
        };
        let base = leaf.hash();
        let variants = [
            StepLeaf {
                step: 4,
                ..leaf.clone()
            },
            StepLeaf {
                token: 43,
                ..leaf.clone()
            },
            StepLeaf {
                draw: 98,
                ..leaf.clone()
            },
            StepLeaf {
                logsumexp: 1.25,
                ..leaf.clone()
            },
            StepLeaf {
                top: vec![TopLogit { id: 42, logit: 2.5 }],
                ..leaf.clone()
            },
        ];
        for v in variants {
            assert_ne!(v.hash(), base);
        }
        assert_eq!(leaf.clone().hash(), base);
    }
}
