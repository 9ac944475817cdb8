//! `OpenAiJson<T>`: JSON bodies whose every failure is an OpenAI error object.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::http::BodyReadTimeout;

/// Extracts a JSON body. Syntax errors are 400s, type errors name the field in `param`, bodies
/// over the limit are 413s.
#[derive(Debug)]
pub struct OpenAiJson<T>(pub T);

/// Bodies larger than this are refused with 413 before parsing.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// How long a body may take to arrive when the server set no limit of its own.
const DEFAULT_BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl<S, T> FromRequest<S> for OpenAiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let limit = req
            .extensions()
            .get::<BodyReadTimeout>()
            .map_or(DEFAULT_BODY_READ_TIMEOUT, |t| t.0);
        let read = tokio::time::timeout(limit, Bytes::from_request(req, state))
            .await
            .map_err(|_| ApiError::body_timeout(limit))?;
        let bytes = read.map_err(|rejection| {
            if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::payload_too_large(MAX_BODY_BYTES)
            } else {
                ApiError::malformed_json(format!("Could not read the request body: {rejection}"))
            }
        })?;
        let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::malformed_json(format!(
                "We could not parse the JSON body of your request ({e}). The body must be a JSON object."
            ))
        })?;
        if !value.is_object() {
            return Err(ApiError::malformed_json(
                "The request body must be a JSON object.",
            ));
        }
        serde_path_to_error::deserialize(value)
            .map(OpenAiJson)
            .map_err(|e| {
                let path = e.path().to_string();
                let param = if path == "." { None } else { Some(path) };
                let message = e.inner().to_string();
                match param {
                    Some(param) => ApiError::invalid(
                        param.clone(),
                        format!("Invalid value for '{param}': {message}"),
                    ),
                    None => ApiError::invalid(missing_field(&message).unwrap_or_default(), message),
                }
            })
    }
}

/// serde says "missing field `model`"; OpenAI puts `model` in `param`.
fn missing_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("missing field `")?;
    Some(rest.split('`').next()?.to_string())
}
