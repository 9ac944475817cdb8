//! How a request asks to be verified, in the gateway's own terms (the OpenAI module maps the
//! `verification_mode` string onto it).

use serde::{Deserialize, Serialize};

/// How a request is verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum VerificationMode {
    /// Signed and bound to the request, not audited.
    None,
    /// Audited before the answer is released: random steps opened, re-executed by a referee
    /// the gateway chose, judged by the audit rule.
    Merkle,
    /// Optimistic: the answer is released at once (after the exact checks of its commitment)
    /// and a sampled share is audited afterwards, within the audit window; the verdict is kept
    /// under an audit id.
    Fraud,
    /// The same request (same seed, same request id) goes to several providers; identical
    /// answers agree by construction, and any difference has each audited by a referee at the
    /// step where they first differ.
    Consensus,
}

/// A mode name the gateway does not serve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ModeError {
    /// A mode of the design that does not exist yet.
    #[error("verification_mode '{0}' is not available yet")]
    NotYet(String),
    /// Not a mode at all.
    #[error("unknown verification_mode '{0}'")]
    Unknown(String),
}

impl VerificationMode {
    /// The name used on the wire and in headers.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Merkle => "merkle",
            Self::Fraud => "fraud",
            Self::Consensus => "consensus",
        }
    }

    /// Whether answers in this mode are re-executed by a referee before they are released
    /// (one follows the answer as it streams).
    pub fn refereed(self) -> bool {
        self == Self::Merkle
    }

    /// Whether answers in this mode may be audited at all, now or later: such a request goes
    /// only to providers a trusted referee can audit.
    pub fn audited(self) -> bool {
        matches!(self, Self::Merkle | Self::Fraud | Self::Consensus)
    }

    /// Whether answers in this mode are released first and audited afterwards.
    pub fn deferred(self) -> bool {
        self == Self::Fraud
    }
}

impl std::str::FromStr for VerificationMode {
    type Err = ModeError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name {
            "none" => Ok(Self::None),
            "merkle" => Ok(Self::Merkle),
            "fraud" => Ok(Self::Fraud),
            "consensus" => Ok(Self::Consensus),
            "zk" => Err(ModeError::NotYet(name.into())),
            other => Err(ModeError::Unknown(other.into())),
        }
    }
}
