//! OpenAI's wire types for chat completions and models, kept apart from internal types.
//!
//! # Layout
//! - [`request`]: `POST /v1/chat/completions` body, its validation and conversion into a
//!   [`proofmesh_shared::protocol::GenerateRequest`].
//! - [`response`]: the non-streaming response, the SSE chunks and `/v1/models`.
//! - [`legacy`]: `POST /v1/completions` (text completion): its request, which runs through the
//!   chat pipeline with a text prompt, and its response shape.
//! - [`tools`]: `tools`, `tool_choice` and the calls in the history and the answer.
//! - [`logprobs`]: OpenAI's `logprobs` object, read off the committed step leaves.
//! - [`extract`]: the JSON extractor whose rejections are [`crate::error::ApiError`]s.

pub mod extract;
pub mod legacy;
pub mod logprobs;
pub mod request;
pub mod response;
pub mod tools;
