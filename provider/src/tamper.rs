//! Deliberate misbehaviour, for tests of the gateway's audit only. Never on by default, and not
//! reachable from the command line.

/// How a provider in a test lies.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Tamper {
    /// Honest.
    #[default]
    None,
    /// Opens a leaf whose logits differ from the committed one.
    TamperLeaf,
    /// Opens the right leaves with a corrupted Merkle path.
    WrongPath,
    /// Emits and commits, at step 1, a token the sampler would not have picked.
    OffPolicyToken,
    /// Signs the commitment with a key that is not its node key.
    ForeignKey,
    /// Sends a commitment whose signature bytes are corrupted.
    CorruptSignature,
    /// Hangs up after the third token, without a commitment.
    HangUp,
}
