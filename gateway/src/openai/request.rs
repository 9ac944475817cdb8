//! The chat completion request as OpenAI's SDKs send it, plus `verification_mode`.

use proofmesh_shared::constraint::{Constraint, MAX_SCHEMA_BYTES};
use proofmesh_shared::protocol::{ChatMessage, MAX_MESSAGES, MAX_STOP_LEN, MAX_STOP_SEQUENCES};
use proofmesh_shared::sampling::SamplerParams;
use proofmesh_shared::tools::{Join, add_to_system};
use serde::Deserialize;
use utoipa::ToSchema;

use crate::auditor::{ModeError, VerificationMode};
use crate::error::ApiError;
use crate::openai::legacy::Surface;
use crate::openai::logprobs::{LogprobsWanted, MAX_TOP_LOGPROBS};
use crate::openai::tools::{
    self, CallBook, MessageToolCall, RequestTool, ToolChoiceParam, ToolUse,
};

/// Completion length when the client names none. Small models ramble; clients that want more say
/// so with `max_tokens`.
pub const DEFAULT_MAX_TOKENS: u32 = 512;
/// Upper bound on `max_tokens` before the provider's context window is even consulted.
pub const MAX_MAX_TOKENS: u32 = 32_768;

/// `POST /v1/chat/completions`. Unknown fields are ignored, as OpenAI's SDKs send many.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ChatCompletionRequest {
    /// Model id from `/v1/models`, or a GGUF digest `sha256:<hex>`.
    #[schema(min_length = 1, example = "SmolLM2-135M-Instruct.Q4_1")]
    pub model: String,
    /// The conversation.
    #[schema(min_items = 1, max_items = 256)]
    pub messages: Vec<RequestMessage>,
    /// Stream the answer as server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Sampling temperature in `[0, 2]`; 0 is greedy.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 2)]
    pub temperature: Option<f32>,
    /// Nucleus mass in `(0, 1]`.
    #[serde(default)]
    #[schema(exclusive_minimum = 0, maximum = 1)]
    pub top_p: Option<f32>,
    /// Keep at most this many candidates (llama.cpp extension; 0 = no limit, values above 32
    /// keep the 32 committed candidates).
    #[serde(default)]
    #[schema(minimum = 0)]
    pub top_k: Option<u32>,
    /// Minimum probability relative to the best token (llama.cpp extension).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 1)]
    pub min_p: Option<f32>,
    /// Seed for reproducible sampling.
    #[serde(default)]
    pub seed: Option<i64>,
    /// Most tokens to generate (default 512).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 32768)]
    pub max_tokens: Option<u32>,
    /// Newer name for `max_tokens`; wins when both are given.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 32768)]
    pub max_completion_tokens: Option<u32>,
    /// Stop sequences.
    #[serde(default)]
    pub stop: Option<Stop>,
    /// Return the log-probability of each generated token (`choices[].logprobs`), read off the
    /// step leaves the provider committed and checked against its Merkle root: the model's
    /// full distribution, before temperature and truncation, as OpenAI reports it.
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// With `logprobs`: this many most likely alternatives per token (0 to 20).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 20)]
    pub top_logprobs: Option<u32>,
    /// Constrain the answer: `{"type": "json_object"}` (any JSON object) or `{"type":
    /// "json_schema", "json_schema": {"name", "schema", "strict"}}` (JSON valid against the
    /// schema; always enforced, `strict` or not). Decoding is constrained token by token, and
    /// the gateway checks every token of the answer against the same constraint itself.
    #[serde(default)]
    pub response_format: Option<ResponseFormat>,
    /// Functions the model may call. Calls come back in `message.tool_calls` with
    /// `finish_reason: "tool_calls"`; decoding is constrained so that each call names a
    /// declared function with arguments valid against its `parameters`, and the gateway checks
    /// every token of the answer against that constraint itself.
    #[serde(default)]
    #[schema(max_items = 64)]
    pub tools: Option<Vec<RequestTool>>,
    /// `auto` (the default with tools: a call or a reply), `required` (a call), `none` (no
    /// call; the tools are left out), or `{"type": "function", "function": {"name": …}}`.
    #[serde(default)]
    pub tool_choice: Option<ToolChoiceParam>,
    /// Allow several calls in one answer (default false, as llama.cpp's server).
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    /// Number of choices; only 1 is supported.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1)]
    pub n: Option<u32>,
    /// How the gateway checks the answer (proofmesh extension). `merkle` (the default): the
    /// provider's signed Merkle commitment is audited by challenging random steps and replaying
    /// the sampler, before the answer is released; `fraud`: the answer is released at once
    /// (after the exact checks of its commitment) and a sampled share is audited afterwards,
    /// the verdict at `GET /v1/audits/{id}`; `none`: only the signature and its binding to the
    /// request are checked; `consensus`: the same request goes to several providers (2 by
    /// default) and any difference between their answers has each audited, the answer that
    /// passes is the one returned. `zk` is reserved and answered with 400
    /// `unsupported_verification_mode`.
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "merkle")]
    pub verification_mode: Option<String>,
}

/// `response_format`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    /// Plain text (no constraint).
    Text,
    /// Any JSON object.
    JsonObject,
    /// JSON valid against a schema.
    JsonSchema {
        /// The schema and its name.
        json_schema: JsonSchemaFormat,
    },
}

/// `response_format.json_schema`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct JsonSchemaFormat {
    /// The schema's name (letters, digits, `_` and `-`, at most 64).
    pub name: String,
    /// What the schema is for.
    #[serde(default)]
    pub description: Option<String>,
    /// The JSON schema; JSON Schema features the grammar engine does not support are a 400
    /// naming them.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub schema: Option<serde_json::Value>,
    /// OpenAI's strict mode; the schema is always enforced here.
    #[serde(default)]
    pub strict: Option<bool>,
}

/// `stream_options`.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
pub struct StreamOptions {
    /// Send a final chunk with `usage`.
    #[serde(default)]
    pub include_usage: bool,
}

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Stop {
    /// A single stop sequence.
    One(String),
    /// Several stop sequences (at most 4).
    Many(Vec<String>),
}

/// One message.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct RequestMessage {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    #[schema(pattern = "^(system|developer|user|assistant|tool)$", example = "user")]
    pub role: String,
    /// Text, or a list of parts of which only `text` parts are supported.
    #[serde(default)]
    pub content: Option<Content>,
    /// An assistant message's calls.
    #[serde(default)]
    pub tool_calls: Option<Vec<MessageToolCall>>,
    /// A `tool` message: the call it answers.
    #[serde(default)]
    pub tool_call_id: Option<String>,
}

/// Message content.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Content parts.
    Parts(Vec<ContentPart>),
}

/// One content part.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ContentPart {
    /// Part type; only `text` is supported.
    #[serde(rename = "type")]
    #[schema(pattern = "^text$", example = "text")]
    pub kind: String,
    /// The text of a `text` part.
    #[serde(default)]
    pub text: Option<String>,
}

/// Maps a `verification_mode` name onto the auditor's mode; modes that exist in the design but
/// are not available yet are a clear error, unknown names an invalid parameter.
fn parse_mode(name: &str) -> Result<VerificationMode, ApiError> {
    name.parse().map_err(|e| match e {
        ModeError::NotYet(name) => ApiError::unsupported_mode(&name),
        _ => ApiError::invalid(
            "verification_mode",
            format!(
                "Invalid verification_mode '{name}'; expected one of none, merkle, fraud, consensus, zk"
            ),
        ),
    })
}

/// A request that passed validation, in internal terms.
#[derive(Debug, Clone)]
pub struct ValidatedChat {
    /// The model asked for.
    pub model: String,
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// Sampler settings (the seed is filled in when the client gave none).
    pub sampler: SamplerParams,
    /// Most tokens.
    pub max_tokens: u32,
    /// Stop sequences.
    pub stop: Vec<String>,
    /// Stream as SSE.
    pub stream: bool,
    /// Add a usage chunk to the stream.
    pub include_usage: bool,
    /// How to verify.
    pub mode: VerificationMode,
    /// Log-probabilities to report, when asked for.
    pub logprobs: Option<LogprobsWanted>,
    /// What decoding is constrained to, when anything.
    pub constraint: Option<Constraint>,
    /// A text prompt run as it is (`/v1/completions`); `messages` is then empty.
    pub prompt: Option<String>,
    /// Which API the answer goes back through.
    pub surface: Surface,
    /// The tools the model may call; the answer is then read back as calls or a reply.
    pub tools: Option<ToolUse>,
}

impl ChatCompletionRequest {
    /// Checks every field and converts; errors name the offending `param`.
    pub fn validate(self, default_mode: VerificationMode) -> Result<ValidatedChat, ApiError> {
        if self.model.trim().is_empty() {
            return Err(ApiError::invalid(
                "model",
                "'model' must be a non-empty string",
            ));
        }
        if self.messages.is_empty() {
            return Err(ApiError::invalid(
                "messages",
                "'messages' must contain at least one message",
            ));
        }
        if self.messages.len() > MAX_MESSAGES {
            return Err(ApiError::invalid(
                "messages",
                format!("'messages' may contain at most {MAX_MESSAGES} messages"),
            ));
        }
        let mut book = CallBook::default();
        let mut messages = self
            .messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| convert_message(i, m, &mut book))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(n) = self.n
            && n != 1
        {
            return Err(ApiError::invalid("n", "Only n = 1 is supported"));
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !temperature.is_finite() || !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid(
                "temperature",
                "'temperature' must be between 0 and 2",
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !top_p.is_finite() || top_p <= 0.0 || top_p > 1.0 {
            return Err(ApiError::invalid(
                "top_p",
                "'top_p' must be greater than 0 and at most 1",
            ));
        }
        let min_p = self.min_p.unwrap_or(0.0);
        if !min_p.is_finite() || !(0.0..=1.0).contains(&min_p) {
            return Err(ApiError::invalid(
                "min_p",
                "'min_p' must be between 0 and 1",
            ));
        }
        let (max_param, max_tokens) = match (self.max_completion_tokens, self.max_tokens) {
            (Some(m), _) => ("max_completion_tokens", m),
            (None, Some(m)) => ("max_tokens", m),
            (None, None) => ("max_tokens", DEFAULT_MAX_TOKENS),
        };
        if max_tokens == 0 || max_tokens > MAX_MAX_TOKENS {
            return Err(ApiError::invalid(
                max_param,
                format!("'{max_param}' must be between 1 and {MAX_MAX_TOKENS}"),
            ));
        }
        let stop = match self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        };
        if stop.len() > MAX_STOP_SEQUENCES
            || stop.iter().any(|s| s.is_empty() || s.len() > MAX_STOP_LEN)
        {
            return Err(ApiError::invalid(
                "stop",
                format!(
                    "'stop' takes at most {MAX_STOP_SEQUENCES} non-empty sequences of at most {MAX_STOP_LEN} bytes"
                ),
            ));
        }
        let mode = match self.verification_mode.as_deref() {
            None => default_mode,
            Some(name) => parse_mode(name)?,
        };
        let logprobs = logprobs_wanted(self.logprobs, self.top_logprobs)?;
        let mut constraint = self
            .response_format
            .map(constraint_of)
            .transpose()?
            .flatten();
        let plan = tools::plan(
            self.tools,
            self.tool_choice,
            self.parallel_tool_calls,
            constraint.as_ref(),
        )?;
        let tools = plan.map(|plan| {
            add_to_system(&mut messages, &plan.instruction, Join::After);
            constraint = Some(plan.constraint);
            plan.tools
        });
        let seed = self.seed.map_or_else(rand::random::<u64>, |s| s as u64);
        Ok(ValidatedChat {
            model: self.model,
            messages,
            sampler: SamplerParams {
                temperature,
                top_p,
                top_k: self.top_k.unwrap_or(0),
                min_p,
                seed,
            },
            max_tokens,
            stop,
            stream: self.stream.unwrap_or(false),
            include_usage: self.stream_options.is_some_and(|o| o.include_usage),
            mode,
            logprobs,
            constraint,
            prompt: None,
            surface: Surface::Chat,
            tools,
        })
    }
}

/// `response_format` as the constraint decoding follows.
fn constraint_of(format: ResponseFormat) -> Result<Option<Constraint>, ApiError> {
    let spec = match format {
        ResponseFormat::Text => return Ok(None),
        ResponseFormat::JsonObject => return Ok(Some(Constraint::JsonObject)),
        ResponseFormat::JsonSchema { json_schema } => json_schema,
    };
    if !tools::good_name(&spec.name) {
        return Err(ApiError::invalid(
            "response_format.json_schema.name",
            "'name' must be 1 to 64 letters, digits, '_' or '-'",
        ));
    }
    let schema = spec.schema.unwrap_or_else(|| serde_json::json!({}));
    if !schema.is_object() {
        return Err(ApiError::invalid(
            "response_format.json_schema.schema",
            "'schema' must be a JSON Schema object",
        ));
    }
    let text = schema.to_string();
    if text.len() > MAX_SCHEMA_BYTES {
        return Err(ApiError::invalid(
            "response_format.json_schema.schema",
            format!("'schema' may be at most {MAX_SCHEMA_BYTES} bytes of JSON"),
        ));
    }
    Ok(Some(Constraint::JsonSchema(text)))
}

/// `logprobs` and `top_logprobs`, checked as OpenAI checks them.
fn logprobs_wanted(
    logprobs: Option<bool>,
    top: Option<u32>,
) -> Result<Option<LogprobsWanted>, ApiError> {
    if top.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
        return Err(ApiError::invalid(
            "top_logprobs",
            format!("'top_logprobs' must be between 0 and {MAX_TOP_LOGPROBS}"),
        ));
    }
    match (logprobs.unwrap_or(false), top) {
        (true, top) => Ok(Some(LogprobsWanted {
            top: top.unwrap_or(0),
        })),
        (false, Some(_)) => Err(ApiError::invalid(
            "top_logprobs",
            "'logprobs' must be true when 'top_logprobs' is given",
        )),
        (false, None) => Ok(None),
    }
}

fn convert_message(
    index: usize,
    message: RequestMessage,
    book: &mut CallBook,
) -> Result<ChatMessage, ApiError> {
    let role = match message.role.as_str() {
        "system" | "developer" => "system",
        "user" => "user",
        "assistant" => "assistant",
        // A tool's result, reported as the user's: every template takes that role.
        "tool" => "user",
        other => {
            return Err(ApiError::invalid(
                format!("messages[{index}].role"),
                format!(
                    "Unsupported role '{other}'; expected system, developer, user, assistant or tool"
                ),
            ));
        }
    };
    let content = match message.content {
        None => String::new(),
        Some(Content::Text(text)) => text,
        Some(Content::Parts(parts)) => {
            let mut text = String::new();
            for (j, part) in parts.into_iter().enumerate() {
                match (part.kind.as_str(), part.text) {
                    ("text", Some(t)) => text.push_str(&t),
                    _ => {
                        return Err(ApiError::invalid(
                            format!("messages[{index}].content[{j}]"),
                            "Only text content parts are supported",
                        ));
                    }
                }
            }
            text
        }
    };
    if content.contains('\0') {
        return Err(ApiError::invalid(
            format!("messages[{index}].content"),
            "Message content must not contain NUL characters",
        ));
    }
    let content = match (message.role.as_str(), &message.tool_calls) {
        ("assistant", Some(calls)) if !calls.is_empty() => book.calls(index, calls, &content)?,
        ("tool", _) => book.result(index, message.tool_call_id.as_deref(), &content)?,
        _ => content,
    };
    Ok(ChatMessage {
        role: role.into(),
        content,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: serde_json::Value) -> Result<ValidatedChat, ApiError> {
        let request: ChatCompletionRequest = serde_json::from_value(json).unwrap();
        request.validate(VerificationMode::Merkle)
    }

    #[test]
    fn defaults_and_conversions() {
        let v = parse(serde_json::json!({
            "model": "m", "messages": [{"role": "developer", "content": [{"type": "text", "text": "hi"}]}],
            "stop": "END", "seed": 7, "verification_mode": "none"
        }))
        .unwrap();
        assert_eq!(v.messages[0].role, "system");
        assert_eq!(v.messages[0].content, "hi");
        assert_eq!(v.stop, vec!["END".to_string()]);
        assert_eq!(v.sampler.seed, 7);
        assert_eq!(v.max_tokens, DEFAULT_MAX_TOKENS);
        assert_eq!(v.mode, VerificationMode::None);
    }

    #[test]
    fn tools_constrain_the_answer_and_instruct_the_model() {
        let v = parse(serde_json::json!({
            "model": "m", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "response_format": {"type": "json_object"}
        }))
        .unwrap();
        assert!(v.tools.unwrap().json.contains("\"name\":\"f\""));
        assert!(
            v.messages[0]
                .content
                .starts_with("Be brief.\n\nRespond in JSON format")
        );
        // The tools' constraint, with response_format shaping a reply in text.
        let Some(Constraint::JsonSchema(schema)) = v.constraint else {
            panic!("a schema")
        };
        assert!(
            schema.contains("\"response\":{\"type\":\"object\"}"),
            "{schema}"
        );
        // `none` leaves them out: no constraint, no instruction.
        let v = parse(serde_json::json!({
            "model": "m", "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none"
        }))
        .unwrap();
        assert!(v.tools.is_none() && v.constraint.is_none() && v.messages.len() == 1);
    }

    #[test]
    fn bad_fields_name_their_param() {
        let cases = [
            (
                serde_json::json!({"model": "m", "messages": []}),
                "messages",
            ),
            (
                serde_json::json!({"model": "m", "messages": [{"role": "function", "content": "x"}]}),
                "messages[0].role",
            ),
            (
                serde_json::json!({"model": "m", "messages": [{"role": "tool", "content": "x"}]}),
                "messages[0].tool_call_id",
            ),
            (
                serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3}),
                "temperature",
            ),
            (
                serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": 0}),
                "top_p",
            ),
            (
                serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}),
                "max_tokens",
            ),
            (
                serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}),
                "n",
            ),
            (
                serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "verification_mode": "bogus"}),
                "verification_mode",
            ),
            (
                serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["a","b","c","d","e"]}),
                "stop",
            ),
            (
                serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 21}),
                "top_logprobs",
            ),
            (
                serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}),
                "top_logprobs",
            ),
            (
                serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}}),
                "response_format.json_schema.name",
            ),
            (
                serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema", "json_schema": {"name": "ab", "schema": [1]}}}),
                "response_format.json_schema.schema",
            ),
        ];
        for (json, param) in cases {
            let err = parse(json).unwrap_err();
            assert_eq!(err.status(), 400);
            assert_eq!(err.body().error.param.as_deref(), Some(param));
        }
    }

    #[test]
    fn a_future_mode_is_a_clear_error() {
        let err = parse(serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "verification_mode": "zk"}))
            .unwrap_err();
        assert_eq!(err.code(), Some("unsupported_verification_mode"));
        // zk says what a proof would cost, with the figures it rests on.
        let message = err.body().error.message;
        assert!(
            message.contains("zkGPT") && message.contains("zkLLM"),
            "{message}"
        );
    }
}
