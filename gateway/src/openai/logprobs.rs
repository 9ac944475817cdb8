//! OpenAI's `logprobs` object, read off the step leaves a provider committed.
//!
//! Every value comes from a leaf the audit checks: the leaves streamed with the tokens must
//! hash to the commitment's Merkle root ([`proofmesh_shared::verify::check_streamed_leaves`]),
//! and the referee compares committed logits with its own. A log-probability is
//! `logit - logsumexp` of the model's full distribution: before temperature, `top_p`, `top_k`
//! and `min_p`, as OpenAI reports them (its log-probabilities do not change with
//! `temperature`). The alternatives are the committed candidates in their order, at most
//! [`MAX_TOP_LOGPROBS`]; the token texts are the gateway's own, from the model's vocabulary.

use proofmesh_shared::commit::StepLeaf;
use serde::Serialize;
use utoipa::ToSchema;

use crate::auditor::Vocabulary;

/// Most alternatives a client may ask for per token (`top_logprobs`), as OpenAI allows.
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// `choices[].logprobs`.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct ChoiceLogprobs {
    /// One entry per generated token that shows as text.
    pub content: Vec<TokenLogprob>,
}

/// One token's log-probability, with the most likely alternatives at its step.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TokenLogprob {
    /// The token's text (UTF-8, lossy for a token that ends inside a character).
    pub token: String,
    /// Its log-probability under the model's full distribution.
    pub logprob: f64,
    /// The token's bytes.
    pub bytes: Vec<u8>,
    /// The most likely tokens at this step, most likely first (`top_logprobs` of them).
    pub top_logprobs: Vec<TopLogprob>,
}

/// One alternative token at a step.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TopLogprob {
    /// The token's text.
    pub token: String,
    /// Its log-probability.
    pub logprob: f64,
    /// The token's bytes.
    pub bytes: Vec<u8>,
}

/// What a request asked for: `logprobs: true` with this many `top_logprobs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogprobsWanted {
    /// Alternatives per token, 0 to [`MAX_TOP_LOGPROBS`].
    pub top: u32,
}

impl LogprobsWanted {
    /// The entry for the token committed in `leaf`; `None` for a token that shows no text
    /// (an end-of-generation or other control token), which OpenAI never lists.
    pub fn entry(self, leaf: &StepLeaf, vocabulary: &Vocabulary) -> Option<TokenLogprob> {
        let bytes = vocabulary.piece(leaf.token).filter(|b| !b.is_empty())?;
        let logprob = leaf.logprob(leaf.token)?;
        let top_logprobs = leaf
            .top
            .iter()
            .take(self.top as usize)
            .filter_map(|c| {
                let bytes = vocabulary.piece(c.id)?;
                Some(TopLogprob {
                    token: String::from_utf8_lossy(bytes).into_owned(),
                    logprob: f64::from(c.logit - leaf.logsumexp),
                    bytes: bytes.to_vec(),
                })
            })
            .collect();
        Some(TokenLogprob {
            token: String::from_utf8_lossy(bytes).into_owned(),
            logprob: f64::from(logprob),
            bytes: bytes.to_vec(),
            top_logprobs,
        })
    }

    /// The object for a whole answer's leaves.
    pub fn of(self, leaves: &[StepLeaf], vocabulary: &Vocabulary) -> ChoiceLogprobs {
        ChoiceLogprobs {
            content: leaves
                .iter()
                .filter_map(|leaf| self.entry(leaf, vocabulary))
                .collect(),
        }
    }
}
