//! The audit rule: does what a provider committed, opened and streamed stand up, and does a
//! referee's re-execution of the same tokens support it?
//!
//! Two layers, never mixed (../VERIFICATION.md):
//!
//! - **Exact checks** ([`exact`]): signature and signer, the commitment's binding to this
//!   request, prompt, model, sampler settings and output, step count against `max_tokens` and
//!   end-of-sequence, Merkle inclusion of the opened leaves, and sampler replay on the committed
//!   logits with a draw the verifier recomputes. Against a referee's evidence: the prompt the
//!   provider ran equals the one the referee tokenized, every token is in the model's
//!   vocabulary, and a `stop` finish really ended on end-of-generation or a stop sequence. No
//!   honest provider can fail one, so any failure is fraud (or a broken provider) by
//!   construction.
//! - **Statistical checks** ([`rule`]): the provider's committed logits against the referee's at
//!   the challenged steps, and the referee's DiFR margin of every claimed token. Only these have
//!   thresholds, measured by the calibration harness and written down next to them, per
//!   [`rule::Tier`].
//!
//! Order of use: [`exact::check_commitment`] as soon as the `Done` frame arrives; then
//! [`Challenge::derive`] (only now, so the provider could not know the challenged steps while
//! committing); then [`exact::check_openings`] on the provider's answer,
//! [`exact::check_evidence`] on the referee's, and [`rule::judge`] on both. A failure is written
//! down as a [`proof::FraudProof`] that anyone can re-check offline.

pub mod challenge;
pub mod evidence;
pub mod exact;
pub mod proof;
pub mod rule;

use serde::{Deserialize, Serialize};

pub use challenge::{Challenge, DEFAULT_CHALLENGE_COUNT, PROBATION_CHALLENGE_COUNT};
pub use evidence::{RefereeEvidence, RefereeStep, SignedEvidence};
pub use exact::{
    EvidenceError, check_commitment, check_evidence, check_openings, check_streamed_leaves,
    opening_is_signed,
};
pub use proof::{AuditRound, FraudProof, ProofError};
pub use rule::{Judgement, Statistics, Tier, judge, judge_distances};

/// Why an audit failed. The string forms are stable and appear in the `x-proofmesh-verdict`
/// header; every variant but the last two is an exact check.
///
/// Some are proven by the provider's own signatures (the commitment, its openings); the ones
/// that need the model (prompt, vocabulary, finish, logits, tokens) rest on referees' evidence
/// ([`AuditFailure::needs_referee`]), so the gateway confirms them with a second referee before
/// it penalises anyone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, thiserror::Error)]
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
    /// The commitment declares another numerics class than the one the provider advertised
    /// and was routed (and refereed) on.
    #[error("numerics_mismatch")]
    NumericsMismatch,
    /// The text the provider streamed is not the detokenization of the tokens it committed.
    #[error("text_mismatch")]
    TextMismatch,
    /// The provider refused or failed to open the challenged leaves.
    #[error("opening_refused")]
    OpeningRefused,
    /// The provider's opening is not signed with its key, or not for the challenge asked.
    #[error("opening_unsigned")]
    OpeningUnsigned,
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
    /// The provider ran another prompt than the chat it was sent (the referee's tokenization of
    /// the same chat differs from the committed prompt hash).
    #[error("prompt_mismatch")]
    PromptMismatch,
    /// A streamed token is not in the claimed model's vocabulary.
    #[error("token_out_of_vocabulary")]
    TokenOutOfVocabulary,
    /// A `stop` finish without an end-of-generation token or stop sequence (truncation).
    #[error("finish_mismatch")]
    FinishMismatch,
    /// Statistical: the committed logits are not the claimed model's (per-step distance to the
    /// referee's logits above the tier's limits).
    #[error("logits_diverge")]
    LogitsDiverge,
    /// Statistical: the claimed tokens are not what the claimed model samples (the referee's
    /// DiFR margins above the tier's limits).
    #[error("tokens_implausible")]
    TokensImplausible,
    /// The step leaves the provider streamed alongside its tokens (for logprobs) are not the
    /// leaves its commitment's Merkle root covers, or one of them fails the per-leaf checks
    /// (step, token, draw, sampler replay).
    #[error("leaves_mismatch")]
    LeavesMismatch,
    /// A token the request's constraint (`response_format`) does not allow at its step, or
    /// an end of generation where the constraint is not complete: the provider ignored the
    /// constraint or applied another.
    #[error("constraint_violated")]
    ConstraintViolated,
}

impl AuditFailure {
    /// Whether this failure rests on a referee's re-execution rather than on what the provider
    /// signed or the gateway saw itself.
    pub fn needs_referee(self) -> bool {
        matches!(
            self,
            Self::PromptMismatch
                | Self::TokenOutOfVocabulary
                | Self::FinishMismatch
                | Self::LogitsDiverge
                | Self::TokensImplausible
        )
    }

    /// Whether this failure came from a threshold rather than an exact check.
    pub fn is_statistical(self) -> bool {
        matches!(self, Self::LogitsDiverge | Self::TokensImplausible)
    }

    /// Whether this failure of [`check_commitment`] shows in what the provider signed for the
    /// request and tokens its commitment binds (a model digest or a length), and so can be
    /// proven to anyone. The others (a bad signature, another signer, another request, other
    /// tokens) say only that what the checker holds is not what the provider signed: the
    /// gateway that received it over the provider's own connection may act on that, but
    /// anyone can make such material up, so it proves nothing.
    pub fn is_signed_by_provider(self) -> bool {
        matches!(self, Self::ModelMismatch | Self::LengthMismatch)
    }
}

/// The outcome of an audit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuditVerdict {
    /// No audit was asked for (`verification_mode: none`); the commitment's signature was still
    /// checked.
    Unaudited,
    /// Every exact check held, but no referee could re-execute the answer (no other provider of
    /// this model and no local model): the tokens were not checked against the model.
    Unrefereed,
    /// Every exact check held, but the audit could not be completed for reasons that are not
    /// the provider's proven fault: its leaves could not be fetched over the network, or one
    /// referee's accusation found no second referee to confirm or refute it.
    Inconclusive,
    /// Every check held, both layers.
    Passed,
    /// A check failed.
    Failed(AuditFailure),
}

impl AuditVerdict {
    /// Stable label for headers and logs: `unaudited`, `unrefereed`, `passed` or
    /// `failed:<reason>`.
    pub fn label(&self) -> String {
        match self {
            Self::Unaudited => "unaudited".into(),
            Self::Unrefereed => "unrefereed".into(),
            Self::Inconclusive => "inconclusive".into(),
            Self::Passed => "passed".into(),
            Self::Failed(reason) => format!("failed:{reason}"),
        }
    }
}
