//! The one error type handlers return, rendered as OpenAI's error object.
//!
//! `{"error":{"message","type","param","code"}}` with the status and the stable `type`/`code`
//! strings the official SDKs understand. A 5xx never carries internals in `message`: the detail
//! goes into the log (with the request's span), the client gets a plain sentence.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::log_budget::LogBudget;

/// An error as the client sees it.
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    param: Option<String>,
    message: String,
    should_retry: Option<bool>,
    /// Seconds in `Retry-After` (a 429 says when to come back).
    retry_after: Option<u64>,
}

/// OpenAI's error body.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error object.
    pub error: ErrorObject,
}

/// OpenAI's error object.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorObject {
    /// A sentence for humans.
    pub message: String,
    /// `invalid_request_error`, `not_found_error`, `server_error`, …
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The request field at fault, if any.
    pub param: Option<String>,
    /// A stable machine-readable code, if any.
    pub code: Option<&'static str>,
}

/// Why `zk` is refused: what a zero-knowledge proof of one answer would cost today.
pub const ZK_UNAVAILABLE: &str = "verification_mode 'zk' is not available: no zero-knowledge \
prover of LLM inference is fast enough to serve. The fastest published ones take under 25 s to \
prove one inference pass of GPT-2 (124M parameters, the size of the default model; zkGPT, USENIX \
Security 2025) and under 15 minutes for a 13B model (zkLLM, CCS 2024), so a 64-token answer of \
the default model would take in the order of half an hour of proving, against well under a second \
to generate it. Use 'merkle' (audited before release) or 'fraud' (audited after release)";

impl ApiError {
    fn new(
        status: StatusCode,
        kind: &'static str,
        code: Option<&'static str>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            kind,
            code,
            param: None,
            message: message.into(),
            should_retry: None,
            retry_after: None,
        }
    }

    /// 400: a field is missing or invalid.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        let mut e = Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            None,
            message,
        );
        e.param = Some(param.into());
        e
    }

    /// 401: no API key, or not one this gateway issued.
    pub fn invalid_api_key(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            Some("invalid_api_key"),
            message,
        )
    }

    /// 400: the body is not JSON at all.
    pub fn malformed_json(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            None,
            message,
        )
    }

    /// 400: the prompt plus `max_tokens` exceeds the model's context window.
    pub fn context_length(message: impl Into<String>) -> Self {
        let mut e = Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some("context_length_exceeded"),
            message,
        );
        e.param = Some("messages".into());
        e
    }

    /// 400: a `verification_mode` that is valid but not available yet (`zk` says what it would
    /// cost).
    pub fn unsupported_mode(mode: &str) -> Self {
        let mut e = Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some("unsupported_verification_mode"),
            match mode {
                "zk" => ZK_UNAVAILABLE.to_string(),
                _ => format!(
                    "verification_mode '{mode}' is not available on this gateway yet; use 'none', 'merkle' or 'fraud'"
                ),
            },
        );
        e.param = Some("verification_mode".into());
        e
    }

    /// 404: no audit record under this id (never issued, pruned, or issued to another API
    /// key).
    pub fn audit_not_found(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("audit_not_found"),
            format!(
                "No audit '{id}': it was never issued to this caller, or it is too old to be kept"
            ),
        )
    }

    /// 500: the gateway's own state could not be read.
    pub fn state_unreadable() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            None,
            "The gateway could not read its state; retry later".to_string(),
        )
    }

    /// 404: no provider on the mesh serves this model.
    pub fn model_not_found(model: &str) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("model_not_found"),
            format!(
                "The model '{model}' does not exist or no provider on the mesh serves it; see GET /v1/models"
            ),
        );
        e.param = Some("model".into());
        e
    }

    /// 404: a model name the operator did not pin to a digest. Names are never resolved by
    /// what peers advertise; the message lists the digests advertised under it (`advertised`,
    /// most providers first) so the client can ask for one by digest, knowingly.
    pub fn model_not_pinned(
        model: &str,
        advertised: &[proofmesh_shared::protocol::ModelDigest],
    ) -> Self {
        let hint = if advertised.is_empty() {
            String::from("no provider advertises it either")
        } else {
            let digests: Vec<String> = advertised.iter().take(4).map(ToString::to_string).collect();
            format!(
                "providers advertise it under {} (unverified claims); ask for a digest as the model to use one",
                digests.join(", ")
            )
        };
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("model_not_found"),
            format!(
                "The model name '{model}' is not pinned to a digest on this gateway, and names are not taken from peers; {hint}. See GET /v1/models"
            ),
        );
        e.param = Some("model".into());
        e
    }

    /// 404: no such route.
    pub fn route_not_found(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("unknown_url"),
            format!("Unknown request URL: {path}"),
        )
    }

    /// 408: the body did not arrive in time.
    pub fn body_timeout(limit: std::time::Duration) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            Some("request_body_timeout"),
            format!(
                "The request body did not arrive within {} s",
                limit.as_secs()
            ),
        )
    }

    /// 413: the body is over the limit.
    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            Some("request_too_large"),
            format!("Request body exceeds the limit of {limit} bytes"),
        )
    }

    /// 503: no provider can take the request.
    pub fn no_provider(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            Some("no_provider_available"),
            message,
        )
    }

    /// 503: the gateway is shutting down; another replica (or a retry later) can serve.
    pub fn shutting_down() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            Some("shutting_down"),
            "The gateway is shutting down",
        )
    }

    /// 502: the provider failed.
    pub fn provider_failed(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "server_error",
            Some("provider_error"),
            message,
        )
    }

    /// 502: the answer failed verification; retrying the same request cannot help the client.
    pub fn verification_failed(verdict: &str) -> Self {
        let mut e = Self::new(
            StatusCode::BAD_GATEWAY,
            "server_error",
            Some("verification_failed"),
            format!("The provider's answer failed verification ({verdict}) and was discarded"),
        );
        e.should_retry = Some(false);
        e
    }

    /// 503: no answer could be verified as the request asked (no trusted referee, or an audit
    /// that could not be completed); the answers were withheld. A later retry may find one.
    pub fn unverified(verdict: &str) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            Some("verification_unavailable"),
            format!(
                "No answer could be verified right now ({verdict}); unverified answers are withheld. \
                 Retry later, or ask for verification_mode \"none\""
            ),
        )
    }

    /// 429: every provider that could serve is at capacity, or this gateway is; `Retry-After`
    /// says when to try again (the SDKs honour it up to 120 s).
    pub fn busy(message: impl Into<String>, retry_after_secs: u64) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "requests",
            Some("rate_limit_exceeded"),
            message,
        );
        e.retry_after = Some(retry_after_secs.clamp(1, 120));
        e
    }

    /// 504: the request ran out of its end-to-end deadline (`request_timeout_secs`).
    pub fn deadline_exceeded(deadline: std::time::Duration) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "server_error",
            Some(crate::failover::REQUEST_TIMEOUT),
            format!(
                "The request did not finish within this gateway's deadline of {} s",
                deadline.as_secs()
            ),
        )
    }

    /// 504: the provider went silent.
    pub fn provider_timeout() -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "server_error",
            Some("provider_timeout"),
            "The provider stopped responding",
        )
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The machine-readable code, if any.
    pub fn code(&self) -> Option<&'static str> {
        self.code
    }

    /// The same error without `x-should-retry: false`: a retry may help after all.
    pub fn retryable(mut self) -> Self {
        self.should_retry = None;
        self
    }

    /// Whether the client may usefully retry (no `x-should-retry: false`).
    pub fn is_retryable(&self) -> bool {
        self.should_retry != Some(false)
    }

    /// OpenAI's error body for this error (also used inside SSE streams).
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorObject {
                message: self.message.clone(),
                kind: self.kind,
                param: self.param.clone(),
                code: self.code,
            },
        }
    }
}

/// Requests answered 502, 503 or 504 (the mesh failed them) are logged at warn, 20 per 10 s at
/// most: a client hammering a model with no provider left must not fill the operator's disk
/// (each is logged at debug).
static MESH_FAILURES: LogBudget = LogBudget::new(Duration::from_secs(10), 20);
/// The other 5xx (the gateway itself failed), with a budget of their own, so that a flood of
/// the former does not hide them.
static GATEWAY_FAILURES: LogBudget = LogBudget::new(Duration::from_secs(10), 20);

fn log_failure(error: &ApiError) {
    let (status, code, message) = (error.status, error.code, &error.message);
    let budget = match status {
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT => {
            &MESH_FAILURES
        }
        _ => &GATEWAY_FAILURES,
    };
    match budget.take() {
        Some(left_out) => {
            tracing::warn!(%status, ?code, %message, left_out, "request failed");
        }
        None => tracing::debug!(%status, ?code, %message, "request failed"),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            log_failure(&self);
        }
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(retry) = self.should_retry {
            response.headers_mut().insert(
                "x-should-retry",
                HeaderValue::from_static(if retry { "true" } else { "false" }),
            );
        }
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}
