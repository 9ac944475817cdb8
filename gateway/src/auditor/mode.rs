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
        }
    }

    /// Whether answers in this mode are re-executed by a referee.
    pub fn refereed(self) -> bool {
        self == Self::Merkle
    }
}

impl std::str::FromStr for VerificationMode {
    type Err = ModeError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name {
            "none" => Ok(Self::None),
            "merkle" => Ok(Self::Merkle),
            "fraud" | "consensus" | "zk" => Err(ModeError::NotYet(name.into())),
            other => Err(ModeError::Unknown(other.into())),
        }
    }
}
