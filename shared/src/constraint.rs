//! Constrained decoding that anyone can check: a request's [`Constraint`] (any JSON object, or
//! JSON valid against a schema) turned into a mask of allowed tokens at every step.
//!
//! The provider's engine masks its logits with it before the sampler takes its candidates, a
//! referee masks its own the same way before it scores the claimed tokens, and the gateway
//! replays the answer's tokens through it ([`Guide::advance`]): every token must be allowed at
//! its step, and an end-of-generation token only where the constraint is complete. All three
//! run this module over the same vocabulary bytes, so they agree on every mask; the
//! constraint is part of the request hash, so the provider cannot apply another one.
//!
//! The grammar engine is llguidance (the one llama.cpp offers too): a JSON schema becomes a
//! grammar, and a token trie over the model's vocabulary gives each step's mask in tens of
//! microseconds.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, SimpleVob, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde::{Deserialize, Serialize};

use crate::sampling::{self, TopLogit};

/// Longest JSON schema accepted, in bytes of its compact JSON text.
pub const MAX_SCHEMA_BYTES: usize = 64 * 1024;

/// What a request constrains its answer to; part of the request hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Constraint {
    /// Any JSON object (OpenAI's `response_format: {"type": "json_object"}`).
    JsonObject,
    /// A JSON value valid against this schema, as compact JSON text (`json_schema`).
    JsonSchema(String),
}

impl Constraint {
    /// The grammar: JSON written compactly (no whitespace between tokens of JSON, as OpenAI
    /// writes it), so a small model cannot spend its tokens on blank space.
    fn grammar(&self) -> Result<TopLevelGrammar, ConstraintError> {
        let mut schema = match self {
            Self::JsonObject => serde_json::json!({"type": "object"}),
            Self::JsonSchema(text) => {
                if text.len() > MAX_SCHEMA_BYTES {
                    return Err(ConstraintError::Invalid(format!(
                        "the schema is {} bytes; at most {MAX_SCHEMA_BYTES} are accepted",
                        text.len()
                    )));
                }
                serde_json::from_str(text)
                    .map_err(|e| ConstraintError::Invalid(format!("not JSON: {e}")))?
            }
        };
        let serde_json::Value::Object(fields) = &mut schema else {
            return Err(ConstraintError::Invalid(
                "the schema must be a JSON object".into(),
            ));
        };
        fields.insert(
            "x-guidance".into(),
            serde_json::json!({"whitespace_flexible": false}),
        );
        Ok(TopLevelGrammar::from_json_schema(schema))
    }
}

/// Why a constraint cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConstraintError {
    /// The schema is malformed, or uses features the grammar engine does not support (the
    /// message names them).
    #[error("{0}")]
    Invalid(String),
    /// The vocabulary cannot be turned into a token trie.
    #[error("the model's vocabulary cannot be used for constraints: {0}")]
    Vocabulary(String),
}

/// A model's vocabulary as the grammar engine sees it: built once per model (it walks every
/// token), then shared by every request's [`Guide`].
pub struct TokenSpace {
    factory: Arc<ParserFactory>,
    vocab_size: usize,
    /// Tokens that show no text (control and end-of-generation tokens).
    silent: Arc<[bool]>,
}

impl std::fmt::Debug for TokenSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSpace")
            .field("vocab_size", &self.vocab_size)
            .finish_non_exhaustive()
    }
}

impl TokenSpace {
    /// The space of a vocabulary given as each token's bytes (empty for control tokens, which
    /// a constraint never allows) and its end-of-generation tokens (allowed exactly where the
    /// constraint is complete).
    pub fn new(mut pieces: Vec<Vec<u8>>, eog: &[u32]) -> Result<Self, ConstraintError> {
        let vocab_size = pieces.len();
        let silent: Arc<[bool]> = pieces.iter().map(Vec::is_empty).collect();
        let eog: Vec<u32> = eog
            .iter()
            .copied()
            .filter(|&t| (t as usize) < vocab_size)
            .collect();
        let first_eog = *eog
            .first()
            .ok_or_else(|| ConstraintError::Vocabulary("no end-of-generation token".into()))?;
        for &t in &eog {
            if let Some(piece) = pieces.get_mut(t as usize) {
                // The trie knows special tokens by this first byte; the name is only for logs.
                *piece = [
                    &[TokTrie::SPECIAL_TOKEN_MARKER][..],
                    format!("<eog{t}>").as_bytes(),
                ]
                .concat();
            }
        }
        let size = u32::try_from(vocab_size)
            .map_err(|_| ConstraintError::Vocabulary("too many tokens".into()))?;
        let trie = TokTrie::from(&TokRxInfo::new(size, first_eog), &pieces).with_eos_tokens(&eog);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| ConstraintError::Vocabulary(e.to_string()))?;
        factory.quiet();
        factory.limits_mut().verbose_errors = false;
        Ok(Self {
            factory: Arc::new(factory),
            vocab_size,
            silent,
        })
    }

    /// A fresh guide through `constraint`, or why it cannot be used.
    pub fn guide(&self, constraint: &Constraint) -> Result<Guide, ConstraintError> {
        let grammar = constraint.grammar()?;
        let matcher = Matcher::new(self.factory.create_parser(grammar));
        if let Some(error) = matcher.get_error() {
            return Err(ConstraintError::Invalid(error));
        }
        Ok(Guide {
            matcher,
            vocab_size: self.vocab_size,
            silent: Arc::clone(&self.silent),
            walk: Walk::Open,
            masked: Vec::new(),
        })
    }
}

/// One answer's walk through its constraint: the mask at the current step, and the step taken.
pub struct Guide {
    matcher: Matcher,
    vocab_size: usize,
    silent: Arc<[bool]>,
    walk: Walk,
    /// The masked logits of [`Guide::candidates`], reused from step to step.
    masked: Vec<f32>,
}

impl Clone for Guide {
    /// The walk as it stands, continued independently (a fresh guide's copy is a fresh walk,
    /// without compiling the constraint again).
    fn clone(&self) -> Self {
        Self {
            matcher: self.matcher.deep_clone(),
            vocab_size: self.vocab_size,
            silent: Arc::clone(&self.silent),
            walk: self.walk,
            masked: Vec::new(),
        }
    }
}

/// Where a walk stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Walk {
    /// Tokens may follow.
    Open,
    /// The constraint was complete and a silent token ended the answer: nothing may follow.
    Ended,
    /// A token the constraint does not allow was taken.
    Broken,
}

impl std::fmt::Debug for Guide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guide")
            .field("walk", &self.walk)
            .finish_non_exhaustive()
    }
}

impl Guide {
    /// The tokens allowed now: those that continue the constraint, and the end-of-generation
    /// tokens when it is complete (only those once nothing can follow). `None` once the walk
    /// ended or broke.
    pub fn allowed(&mut self) -> Option<SimpleVob> {
        if self.walk != Walk::Open {
            return None;
        }
        self.matcher.compute_mask_or_eos().ok()
    }

    /// Takes `token`; whether it was allowed. A token that shows text must continue the
    /// constraint; one that shows none (end of generation, control) may only end a complete
    /// answer, and nothing may follow it. A disallowed token breaks the walk for good.
    ///
    /// The engine only ever samples from [`Guide::allowed`], whose silent tokens are the
    /// model's end-of-generation ones; accepting any silent token as the end here keeps the
    /// gateway's check independent of which control tokens a llama.cpp version counts as
    /// end-of-generation (the client sees the same text either way).
    pub fn advance(&mut self, token: u32) -> bool {
        let allowed = self.walk == Walk::Open && self.takes(token);
        if !allowed {
            self.walk = Walk::Broken;
        }
        allowed
    }

    fn takes(&mut self, token: u32) -> bool {
        let Some(&silent) = self.silent.get(token as usize) else {
            return false;
        };
        if silent {
            let complete = self.can_end();
            if complete {
                self.walk = Walk::Ended;
            }
            return complete;
        }
        !self.matcher.is_stopped() && matches!(self.matcher.try_consume_tokens(&[token]), Ok(1))
    }

    /// Whether the answer so far is complete: a silent token ended it, or the constraint
    /// could end here.
    pub fn complete(&mut self) -> bool {
        match self.walk {
            Walk::Ended => true,
            Walk::Broken => false,
            Walk::Open => self.can_end(),
        }
    }

    /// Whether the constraint is complete at this point (nothing more can follow, or it could
    /// end here).
    fn can_end(&mut self) -> bool {
        !self.matcher.is_error()
            && (self.matcher.is_stopped() || self.matcher.is_accepting().unwrap_or(false))
    }

    /// The sampler's candidates among the tokens allowed now: [`sampling::top_candidates`]
    /// over `logits` with every other token at minus infinity. `None` once the walk broke.
    pub fn candidates(&mut self, logits: &[f32]) -> Option<Vec<TopLogit>> {
        let mask = self.allowed()?;
        let vocab_size = self.vocab_size;
        self.masked.clear();
        self.masked
            .extend(logits.iter().enumerate().map(|(id, &logit)| {
                if id < vocab_size && mask.is_allowed(id as u32) {
                    logit
                } else {
                    f32::NEG_INFINITY
                }
            }));
        let mut top = sampling::top_candidates(&self.masked);
        top.retain(|c| c.logit.is_finite());
        Some(top)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks `tokens` in order, as the gateway does while they stream.
    fn check_tokens(guide: &mut Guide, tokens: &[u32]) -> bool {
        tokens.iter().all(|&t| guide.advance(t))
    }

    /// Bytes 0..=255 as tokens 0..=255, a few multi-byte tokens, and an end token.
    fn space() -> (TokenSpace, u32) {
        let mut pieces: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        for word in ["{\"", "\":", "\"}", "true", "name", "  "] {
            pieces.push(word.as_bytes().to_vec());
        }
        pieces.push(Vec::new()); // a control token
        let end = pieces.len() as u32;
        pieces.push(Vec::new());
        (TokenSpace::new(pieces, &[end]).unwrap(), end)
    }

    fn bytes(text: &str) -> Vec<u32> {
        text.bytes().map(u32::from).collect()
    }

    #[test]
    fn a_schema_allows_its_json_and_nothing_else() {
        let (space, end) = space();
        let schema = Constraint::JsonSchema(
            r#"{"type":"object","properties":{"ok":{"type":"boolean"}},"required":["ok"],"additionalProperties":false}"#.into(),
        );
        let mut good = bytes(r#"{"ok":true}"#);
        good.push(end);
        assert!(check_tokens(&mut space.guide(&schema).unwrap(), &good));
        // Another value, another key, text after the object, an early end.
        for bad in [r#"{"ok":1}"#, r#"{"no":true}"#, r#"{"ok":true}x"#] {
            let tokens = bytes(bad);
            assert!(
                !check_tokens(&mut space.guide(&schema).unwrap(), &tokens),
                "{bad}"
            );
        }
        let mut early = bytes(r#"{"ok":"#);
        early.push(end);
        assert!(!check_tokens(&mut space.guide(&schema).unwrap(), &early));
        // A token id past the vocabulary, at any point, is refused, never a panic.
        let mut far = bytes(r#"{"ok":true}"#);
        far.push(u32::MAX);
        assert!(!check_tokens(&mut space.guide(&schema).unwrap(), &far));
        assert!(!check_tokens(
            &mut space.guide(&schema).unwrap(),
            &[u32::MAX]
        ));
        // A silent (control) token inside the JSON is refused; at its end it ends it.
        let control = end - 1;
        assert!(!check_tokens(
            &mut space.guide(&schema).unwrap(),
            &[u32::from(b'{'), control]
        ));
        let mut ended = bytes(r#"{"ok":true}"#);
        ended.push(control);
        let mut guide = space.guide(&schema).unwrap();
        assert!(check_tokens(&mut guide, &ended) && guide.complete());
        // Nothing after the end.
        let mut after = good.clone();
        after.push(u32::from(b' '));
        assert!(!check_tokens(&mut space.guide(&schema).unwrap(), &after));
        // A truncated answer (a `length` finish) is a prefix, and passes.
        assert!(check_tokens(
            &mut space.guide(&schema).unwrap(),
            &bytes(r#"{"ok":tr"#)
        ));
    }

    #[test]
    fn masks_hold_exactly_the_allowed_candidates() {
        let (space, end) = space();
        let mut guide = space.guide(&Constraint::JsonObject).unwrap();
        let logits: Vec<f32> = (0..=end).map(|t| (t % 17) as f32).collect();
        let top = guide.candidates(&logits).unwrap();
        assert!(!top.is_empty());
        let mask = guide.allowed().unwrap();
        assert!(top.iter().all(|c| mask.is_allowed(c.id)));
        // An object starts with `{` (or whitespace), never a letter, never the end.
        assert!(mask.is_allowed(u32::from(b'{')));
        assert!(!mask.is_allowed(u32::from(b'a')));
        assert!(!mask.is_allowed(end));
    }

    #[test]
    fn unsupported_and_malformed_schemas_are_named() {
        let (space, _) = space();
        let err = space
            .guide(&Constraint::JsonSchema(
                r#"{"type":"object","not":{}}"#.into(),
            ))
            .unwrap_err();
        assert!(err.to_string().contains("not"), "{err}");
        let err = space
            .guide(&Constraint::JsonSchema("{".into()))
            .unwrap_err();
        assert!(err.to_string().contains("not JSON"), "{err}");
    }
}
