//! The legacy text completion API, `POST /v1/completions`: its request, its response shape, and
//! the conversion of a chat-shaped answer into it.
//!
//! A text completion runs through the same pipeline as a chat completion (routing, commitment,
//! audit, payment): the request becomes a [`ValidatedChat`] whose prompt is the text itself
//! ([`ValidatedChat::prompt`], run without a chat template), and only the response is shaped
//! differently ([`Surface::Text`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::logprobs::{ChoiceLogprobs, LogprobsWanted};
use super::request::{
    ChatCompletionRequest, Content, RequestMessage, Stop, StreamOptions, ValidatedChat,
};
use super::response::{ChatCompletion, ChatCompletionChunk, ProofmeshInfo, Usage};
use crate::auditor::VerificationMode;
use crate::error::ApiError;

/// Completion length when the client names none: OpenAI's default for this API.
pub const DEFAULT_MAX_TOKENS: u32 = 16;
/// Most alternatives per token the legacy `logprobs` may ask for, as OpenAI allows.
pub const MAX_LEGACY_LOGPROBS: u32 = 5;

/// Which API an answer goes back through.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Surface {
    /// `/v1/chat/completions`.
    #[default]
    Chat,
    /// `/v1/completions`; with `echo`, the prompt is put before the answer's text.
    Text {
        /// The prompt to echo, when asked for.
        echo: Option<String>,
    },
}

/// `POST /v1/completions`. Unknown fields are ignored.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct CompletionRequest {
    /// Model id from `/v1/models`, or a GGUF digest `sha256:<hex>`.
    #[schema(min_length = 1, example = "SmolLM2-135M-Instruct.Q4_1")]
    pub model: String,
    /// The text to continue: a string, or a list holding one string.
    #[schema(value_type = Object)]
    pub prompt: PromptInput,
    /// Most tokens to generate (default 16).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 32768)]
    pub max_tokens: Option<u32>,
    /// Sampling temperature in `[0, 2]`; 0 is greedy.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus mass in `(0, 1]`.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Keep at most this many candidates (llama.cpp extension).
    #[serde(default)]
    pub top_k: Option<u32>,
    /// Minimum probability relative to the best token (llama.cpp extension).
    #[serde(default)]
    pub min_p: Option<f32>,
    /// Seed for reproducible sampling.
    #[serde(default)]
    pub seed: Option<i64>,
    /// Stop sequences.
    #[serde(default)]
    pub stop: Option<Stop>,
    /// Stream the answer as server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Return each token's log-probability and this many alternatives (0 to 5), read off the
    /// committed step leaves like chat's `logprobs`.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 5)]
    pub logprobs: Option<u32>,
    /// Put the prompt before the answer's text (not with `logprobs`: the prompt's tokens are
    /// not committed, so their log-probabilities could not be proven).
    #[serde(default)]
    pub echo: Option<bool>,
    /// Number of choices; only 1 is supported.
    #[serde(default)]
    pub n: Option<u32>,
    /// How the gateway checks the answer, as for chat (proofmesh extension).
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "merkle")]
    pub verification_mode: Option<String>,
}

/// `prompt`: a string or a list of strings.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum PromptInput {
    /// One prompt.
    One(String),
    /// Prompts, one completion each (only one is supported).
    Many(Vec<String>),
}

impl CompletionRequest {
    /// Checks every field and converts into the chat pipeline's terms; errors name `param`.
    pub fn validate(self, default_mode: VerificationMode) -> Result<ValidatedChat, ApiError> {
        let prompt = match self.prompt {
            PromptInput::One(text) => text,
            PromptInput::Many(mut texts) if texts.len() == 1 => texts.remove(0),
            PromptInput::Many(_) => {
                return Err(ApiError::invalid(
                    "prompt",
                    "Exactly one prompt per request is supported; send the others separately",
                ));
            }
        };
        if prompt.is_empty() {
            return Err(ApiError::invalid("prompt", "'prompt' must not be empty"));
        }
        if self.logprobs.is_some_and(|n| n > MAX_LEGACY_LOGPROBS) {
            return Err(ApiError::invalid(
                "logprobs",
                format!("'logprobs' must be between 0 and {MAX_LEGACY_LOGPROBS}"),
            ));
        }
        let echo = self.echo.unwrap_or(false);
        if echo && self.logprobs.is_some() {
            return Err(ApiError::invalid(
                "echo",
                "'echo' with 'logprobs' is not supported: the prompt's tokens are not \
                 committed, so their log-probabilities could not be proven",
            ));
        }
        // The sampler, length, stop and mode rules are chat's: one place checks them.
        let chat = ChatCompletionRequest {
            model: self.model,
            messages: vec![RequestMessage {
                role: "user".into(),
                content: Some(Content::Text(prompt.clone())),
                ..RequestMessage::default()
            }],
            stream: self.stream,
            stream_options: self.stream_options,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            seed: self.seed,
            max_tokens: Some(self.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS)),
            max_completion_tokens: None,
            stop: self.stop,
            logprobs: None,
            top_logprobs: None,
            response_format: None,
            tools: None,
            tool_choice: None,
            parallel_tool_calls: None,
            n: self.n,
            verification_mode: self.verification_mode,
        };
        let mut validated = chat.validate(default_mode)?;
        validated.messages.clear();
        validated.logprobs = self.logprobs.map(|top| LogprobsWanted { top });
        validated.surface = Surface::Text {
            echo: echo.then(|| prompt.clone()),
        };
        validated.prompt = Some(prompt);
        Ok(validated)
    }
}

/// A text completion, or one chunk of a streamed one (`object` says which).
#[derive(Debug, Serialize, ToSchema)]
pub struct TextCompletion {
    /// `cmpl-<request id>`.
    pub id: String,
    /// `text_completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The model id.
    pub model: String,
    /// One choice (none on a streamed usage chunk).
    pub choices: Vec<TextChoice>,
    /// Token counts (on a stream: only on the usage chunk).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Verification details (on a stream: the last events).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proofmesh: Option<ProofmeshInfo>,
}

/// One choice of a text completion.
#[derive(Debug, Serialize, ToSchema)]
pub struct TextChoice {
    /// The generated text (after the prompt, with `echo`).
    pub text: String,
    /// Always 0.
    pub index: u32,
    /// With `logprobs`: the tokens and their log-probabilities, in the legacy shape.
    pub logprobs: Option<TextLogprobs>,
    /// `stop` or `length` (null until the last chunk of a stream).
    pub finish_reason: Option<&'static str>,
}

/// The legacy `logprobs` object.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct TextLogprobs {
    /// Each token's text.
    pub tokens: Vec<String>,
    /// Each token's log-probability.
    pub token_logprobs: Vec<f64>,
    /// Each token's most likely alternatives, text to log-probability.
    pub top_logprobs: Vec<BTreeMap<String, f64>>,
    /// Where each token starts in `text`, in characters.
    pub text_offset: Vec<usize>,
}

impl TextLogprobs {
    /// The legacy shape of `logprobs`, tokens starting at character `offset` of the text.
    fn from_chat(logprobs: ChoiceLogprobs, mut offset: usize) -> Self {
        let mut out = Self::default();
        for entry in logprobs.content {
            out.text_offset.push(offset);
            offset += entry.token.chars().count();
            out.top_logprobs.push(
                entry
                    .top_logprobs
                    .into_iter()
                    .map(|t| (t.token, t.logprob))
                    .collect(),
            );
            out.tokens.push(entry.token);
            out.token_logprobs.push(entry.logprob);
        }
        out
    }
}

impl TextCompletion {
    /// A finished chat-shaped answer as a text completion.
    pub fn from_chat(answer: ChatCompletion, echo: Option<&str>) -> Self {
        let choices = answer
            .choices
            .into_iter()
            .map(|c| {
                let prefix = echo.unwrap_or("");
                TextChoice {
                    logprobs: c
                        .logprobs
                        .map(|l| TextLogprobs::from_chat(l, prefix.chars().count())),
                    text: format!("{prefix}{}", c.message.content.unwrap_or_default()),
                    index: c.index,
                    finish_reason: Some(c.finish_reason),
                }
            })
            .collect();
        Self {
            id: answer.id.replacen("chatcmpl-", "cmpl-", 1),
            object: "text_completion",
            created: answer.created,
            model: answer.model,
            choices,
            usage: Some(answer.usage),
            proofmesh: Some(answer.proofmesh),
        }
    }

    /// One streamed chat chunk as a text completion chunk (`offset`: characters of text sent
    /// before it, for `text_offset`).
    pub fn from_chunk(chunk: ChatCompletionChunk, offset: usize) -> Self {
        let choices = chunk
            .choices
            .into_iter()
            .map(|c| TextChoice {
                text: c.delta.content.unwrap_or_default(),
                index: c.index,
                logprobs: c.logprobs.map(|l| TextLogprobs::from_chat(l, offset)),
                finish_reason: c.finish_reason,
            })
            .collect();
        Self {
            id: chunk.id.replacen("chatcmpl-", "cmpl-", 1),
            object: "text_completion",
            created: chunk.created,
            model: chunk.model,
            choices,
            usage: chunk.usage,
            proofmesh: chunk.proofmesh,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: serde_json::Value) -> Result<ValidatedChat, ApiError> {
        let request: CompletionRequest = serde_json::from_value(json).unwrap();
        request.validate(VerificationMode::Merkle)
    }

    #[test]
    fn a_text_prompt_runs_without_messages() {
        let v = parse(serde_json::json!({"model": "m", "prompt": ["Once upon"], "echo": true}))
            .unwrap();
        assert!(v.messages.is_empty());
        assert_eq!(v.prompt.as_deref(), Some("Once upon"));
        assert_eq!(v.max_tokens, DEFAULT_MAX_TOKENS);
        assert_eq!(
            v.surface,
            Surface::Text {
                echo: Some("Once upon".into())
            }
        );
    }

    #[test]
    fn bad_fields_name_their_param() {
        for (json, param) in [
            (
                serde_json::json!({"model": "m", "prompt": ["a", "b"]}),
                "prompt",
            ),
            (serde_json::json!({"model": "m", "prompt": ""}), "prompt"),
            (
                serde_json::json!({"model": "m", "prompt": "a", "logprobs": 6}),
                "logprobs",
            ),
            (
                serde_json::json!({"model": "m", "prompt": "a", "logprobs": 1, "echo": true}),
                "echo",
            ),
            (
                serde_json::json!({"model": "m", "prompt": "a", "temperature": 3}),
                "temperature",
            ),
            (
                serde_json::json!({"model": "m", "prompt": "a", "n": 2}),
                "n",
            ),
        ] {
            let err = parse(json).unwrap_err();
            assert_eq!(err.status(), 400);
            assert_eq!(err.body().error.param.as_deref(), Some(param));
        }
    }
}
