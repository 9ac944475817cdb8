//! Running one generation on a provider over a `/proofmesh/generate/1` stream.
//!
//! [`start`] tries the candidates in order (at most [`MAX_ATTEMPTS`]) until one accepts the
//! request; failures before the first token cool the provider down and move on. [`complete`]
//! also retries when a provider fails mid-generation, which is safe because nothing has reached
//! the client yet; streaming responses only fail over before their first byte. For a refereed
//! (merkle) request the auditor starts a [`RefereeSession`] as soon as a provider accepts, and
//! every token read from the provider is forwarded to it.

use std::time::Duration;

use proofmesh_shared::commit::SignedCommitment;
use proofmesh_shared::protocol::{
    FRAME_GAP_TIMEOUT, FinishReason, FrameError, GENERATE_PROTOCOL, GenerateFrame, GenerateRequest,
    MAX_STREAM_FRAME, RemoteErrorKind, read_frame, write_frame,
};

use crate::auditor::vocab::Expected;
use crate::auditor::{RefereeSession, Transcript, VerificationMode};
use crate::error::ApiError;
use crate::registry::{Candidate, FAILURE_COOLDOWN, LoadGuard};
use crate::state::AppState;

/// One first attempt plus at most two failovers (../STACK.md: what OpenAI SDK users expect).
pub const MAX_ATTEMPTS: usize = 3;
/// Opening a stream and sending the request: a healthy provider on a live connection answers
/// in milliseconds.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Tries at opening a stream that the provider's stream acceptor dropped (see `try_start`).
const OPEN_ATTEMPTS: u32 = 8;

/// A generation in progress on one provider.
#[derive(Debug)]
pub struct Generation {
    /// The provider and its model card.
    pub candidate: Candidate,
    /// Prompt length the provider reported.
    pub prompt_tokens: u32,
    /// When the first token frame arrived (for time-to-first-token).
    pub first_token_at: Option<std::time::Instant>,
    /// The referee following this answer, when it is audited.
    pub referee: Option<RefereeSession>,
    /// The gateway's own assembly of the text, when it has the model's vocabulary.
    transcript: Option<Transcript>,
    stream: libp2p::Stream,
    _load: LoadGuard,
}

/// The result of a finished generation, before the audit.
#[derive(Debug)]
pub struct Completed {
    /// The tokens streamed, in order.
    pub tokens: Vec<u32>,
    /// The visible text.
    pub text: String,
    /// Why it stopped.
    pub finish_reason: FinishReason,
    /// The provider's signed commitment.
    pub commitment: SignedCommitment,
    /// Whether the provider's text was the detokenization of its tokens throughout.
    pub text_matches: bool,
}

/// The provider's text was not its tokens' text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextMismatch;

/// Why an attempt failed, and whether another provider may do better.
enum Attempt {
    Retry(ApiError),
    Fatal(ApiError),
}

impl Generation {
    /// The next frame; a silent or broken provider becomes a 504 or 502.
    pub async fn next(&mut self) -> Result<GenerateFrame, ApiError> {
        match tokio::time::timeout(
            FRAME_GAP_TIMEOUT,
            read_frame(&mut self.stream, MAX_STREAM_FRAME),
        )
        .await
        {
            Ok(Ok(frame)) => {
                if let GenerateFrame::Token { token, .. } = &frame {
                    if self.first_token_at.is_none() {
                        self.first_token_at = Some(std::time::Instant::now());
                    }
                    if let Some(referee) = &self.referee {
                        referee.push(*token);
                    }
                }
                Ok(frame)
            }
            Ok(Err(e)) => {
                tracing::warn!(provider = %self.candidate.peer, error = %e, "provider stream broke");
                Err(ApiError::provider_failed(
                    "The provider closed the stream before finishing",
                ))
            }
            Err(_) => Err(ApiError::provider_timeout()),
        }
    }

    /// The text the client gets for the step that produced `token`: the gateway's own
    /// detokenization when it has the model's vocabulary (the provider's `claimed` text must
    /// then be exactly that), else the provider's.
    pub fn text_of(&mut self, token: u32, claimed: String) -> Result<String, TextMismatch> {
        let Some(transcript) = &mut self.transcript else {
            return Ok(claimed);
        };
        match transcript.push(token) {
            Expected::Text(text) | Expected::Stopped(text) if text == claimed => Ok(text),
            _ => Err(TextMismatch),
        }
    }

    /// The held-back text released at the end, checked like [`Generation::text_of`].
    pub fn tail_of(&mut self, claimed: String) -> Result<String, TextMismatch> {
        let Some(transcript) = &mut self.transcript else {
            return Ok(claimed);
        };
        let text = transcript.finish();
        if text == claimed {
            Ok(text)
        } else {
            Err(TextMismatch)
        }
    }

    /// Reads frames until `Done`, checking that steps arrive in order and that the text is
    /// the tokens' (a mismatch is reported in [`Completed::text_matches`], for the audit).
    pub async fn collect(&mut self) -> Result<Completed, ApiError> {
        let mut tokens = Vec::new();
        let mut text = String::new();
        let mut text_matches = true;
        loop {
            match self.next().await? {
                GenerateFrame::Token {
                    step,
                    token,
                    text: piece,
                } => {
                    if step as usize != tokens.len() {
                        return Err(ApiError::provider_failed(
                            "The provider sent steps out of order",
                        ));
                    }
                    tokens.push(token);
                    match self.text_of(token, piece) {
                        Ok(piece) => text.push_str(&piece),
                        Err(TextMismatch) => text_matches = false,
                    }
                }
                GenerateFrame::Done {
                    finish_reason,
                    text: tail,
                    commitment,
                } => {
                    match self.tail_of(tail) {
                        Ok(tail) => text.push_str(&tail),
                        Err(TextMismatch) => text_matches = false,
                    }
                    return Ok(Completed {
                        tokens,
                        text,
                        finish_reason,
                        commitment: *commitment,
                        text_matches,
                    });
                }
                GenerateFrame::Error { kind, message } => return Err(remote_error(kind, &message)),
                GenerateFrame::Accepted { .. } => {
                    return Err(ApiError::provider_failed(
                        "The provider violated the protocol",
                    ));
                }
            }
        }
    }
}

fn remote_error(kind: RemoteErrorKind, message: &str) -> ApiError {
    match kind {
        RemoteErrorKind::InvalidRequest => ApiError::invalid("messages", message),
        RemoteErrorKind::ContextLength => ApiError::context_length(message),
        RemoteErrorKind::UnknownModel
        | RemoteErrorKind::Overloaded
        | RemoteErrorKind::ShuttingDown => {
            ApiError::no_provider("No provider could take the request right now")
        }
        RemoteErrorKind::Internal => {
            ApiError::provider_failed("The provider failed while generating")
        }
    }
}

fn classify(kind: RemoteErrorKind, message: &str) -> Attempt {
    let error = remote_error(kind, message);
    match kind {
        RemoteErrorKind::InvalidRequest | RemoteErrorKind::ContextLength => Attempt::Fatal(error),
        _ => Attempt::Retry(error),
    }
}

/// Opens a generation on the first candidate that accepts `request`; in a refereed mode, a
/// referee starts following it at once.
pub async fn start(
    state: &AppState,
    candidates: &[Candidate],
    request: &GenerateRequest,
    mode: VerificationMode,
) -> Result<Generation, ApiError> {
    let mut last = ApiError::no_provider("No provider could take the request right now");
    for candidate in candidates.iter().take(MAX_ATTEMPTS) {
        match try_start(state, candidate, request).await {
            Ok(mut generation) => {
                generation.referee = state.auditor.follow(candidate, request, mode);
                return Ok(generation);
            }
            Err(Attempt::Fatal(e)) => return Err(e),
            Err(Attempt::Retry(e)) => {
                tracing::warn!(provider = %candidate.peer, code = ?e.code(), "provider failed before the first token; trying another");
                state.registry.cool_down(&candidate.peer, FAILURE_COOLDOWN);
                last = e;
            }
        }
    }
    Err(last)
}

/// Runs `request` to completion, failing over (within [`MAX_ATTEMPTS`] in total) when a
/// provider fails at any point.
pub async fn complete(
    state: &AppState,
    candidates: &[Candidate],
    request: &GenerateRequest,
    mode: VerificationMode,
) -> Result<(Generation, Completed), ApiError> {
    let mut last = ApiError::no_provider("No provider could take the request right now");
    for candidate in candidates.iter().take(MAX_ATTEMPTS) {
        let mut generation =
            match start(state, std::slice::from_ref(candidate), request, mode).await {
                Ok(generation) => generation,
                Err(e) if e.status().is_server_error() => {
                    last = e;
                    continue;
                }
                Err(e) => return Err(e),
            };
        match generation.collect().await {
            Ok(done) => return Ok((generation, done)),
            Err(e) if e.status().is_server_error() => {
                tracing::warn!(provider = %candidate.peer, code = ?e.code(), "provider failed mid-generation; trying another");
                state.registry.cool_down(&candidate.peer, FAILURE_COOLDOWN);
                last = e;
            }
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

async fn try_start(
    state: &AppState,
    candidate: &Candidate,
    request: &GenerateRequest,
) -> Result<Generation, Attempt> {
    let load = state.registry.track(candidate.peer);
    // libp2p-stream hands inbound streams to the provider's acceptor through a channel with room
    // for one: a second stream negotiated before the acceptor took the first is dropped. So this
    // gateway opens one stream per provider at a time (until the provider's first frame), and a
    // stream closed before any frame (another gateway won the race) is retried, not blamed.
    let gate = state.registry.open_gate(&candidate.peer);
    let _opening = gate.lock().await;
    for attempt in 1..=OPEN_ATTEMPTS {
        let mut stream = open(state, candidate).await?;
        let written = tokio::time::timeout(OPEN_TIMEOUT, write_frame(&mut stream, request)).await;
        if !matches!(written, Ok(Ok(()))) {
            if attempt < OPEN_ATTEMPTS {
                tracing::debug!(provider = %candidate.peer, attempt, "stream dropped before the request; reopening");
                tokio::time::sleep(Duration::from_millis(5 * u64::from(attempt)) + jitter()).await;
                continue;
            }
            return Err(Attempt::Retry(ApiError::provider_failed(
                "The provider could not be reached (request not delivered)",
            )));
        }
        match tokio::time::timeout(FRAME_GAP_TIMEOUT, read_frame(&mut stream, MAX_STREAM_FRAME))
            .await
        {
            Ok(Ok(GenerateFrame::Accepted { prompt_tokens })) => {
                return Ok(Generation {
                    candidate: candidate.clone(),
                    prompt_tokens,
                    first_token_at: None,
                    referee: None,
                    transcript: state
                        .auditor
                        .transcript(&candidate.card.digest, &request.stop),
                    stream,
                    _load: load,
                });
            }
            Ok(Ok(GenerateFrame::Error { kind, message })) => return Err(classify(kind, &message)),
            Ok(Ok(_)) => {
                return Err(Attempt::Retry(ApiError::provider_failed(
                    "The provider violated the protocol",
                )));
            }
            Ok(Err(FrameError::Closed)) if attempt < OPEN_ATTEMPTS => {
                tracing::debug!(provider = %candidate.peer, attempt, "stream dropped before the first frame; reopening");
                tokio::time::sleep(Duration::from_millis(5 * u64::from(attempt)) + jitter()).await;
            }
            Ok(Err(e)) => {
                tracing::warn!(provider = %candidate.peer, error = %e, "provider stream broke");
                return Err(Attempt::Retry(ApiError::provider_failed(
                    "The provider closed the stream before answering",
                )));
            }
            Err(_) => return Err(Attempt::Retry(ApiError::provider_timeout())),
        }
    }
    Err(Attempt::Retry(ApiError::provider_failed(
        "The provider kept dropping the stream",
    )))
}

/// Opens a generate stream to the candidate.
async fn open(state: &AppState, candidate: &Candidate) -> Result<libp2p::Stream, Attempt> {
    let unreachable = |what: &str| {
        Attempt::Retry(ApiError::provider_failed(format!(
            "The provider could not be reached ({what})"
        )))
    };
    let mut control = state.net.stream_control();
    match tokio::time::timeout(
        OPEN_TIMEOUT,
        control.open_stream(candidate.peer, GENERATE_PROTOCOL),
    )
    .await
    {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => {
            tracing::debug!(provider = %candidate.peer, error = %e, "cannot open a generate stream");
            Err(unreachable("stream refused"))
        }
        Err(_) => Err(unreachable("timeout")),
    }
}

/// Up to 10 ms of randomness, so racing gateways do not retry in lockstep.
fn jitter() -> Duration {
    Duration::from_micros(rand::random::<u64>() % 10_000)
}
