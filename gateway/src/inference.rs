//! Running one generation on a provider over a `/proofmesh/generate/1` stream.
//!
//! [`start`] opens a generation on the next provider the request's [`Attempts`] offer, until
//! one accepts; for a refereed (merkle) request the auditor starts a [`RefereeSession`] as soon
//! as a provider accepts, and every token read from the provider is forwarded to it. Which
//! provider comes next, and when to give up, is the retry policy's ([`crate::failover`]).
//!
//! What a provider sends is bounded: no more tokens than `max_tokens` (more is a lie the book
//! records), no more text than [`MAX_TEXT_PER_TOKEN`] bytes a token on average, no gap between
//! frames over [`FRAME_GAP_TIMEOUT`] while the request waits and prefills and over
//! [`TOKEN_GAP_TIMEOUT`] once tokens flow, and nothing after the request's deadline.

use std::time::{Duration, Instant};

use proofmesh_shared::commit::{SignedCommitment, StepLeaf};
use proofmesh_shared::constraint::Guide;
use proofmesh_shared::net::Offence;
use proofmesh_shared::protocol::{
    FRAME_GAP_TIMEOUT, FinishReason, GENERATE_PROTOCOL, GenerateFrame, GenerateRequest,
    MAX_STREAM_FRAME, RemoteErrorKind, TOKEN_GAP_TIMEOUT, read_frame, write_frame,
};
use proofmesh_shared::sampling::CANDIDATES;
use proofmesh_shared::verify::AuditFailure;

use crate::access::Caller;
use crate::auditor::vocab::Expected;
use crate::auditor::{Auditor, RefereeSession, Transcript, VerificationMode};
use crate::error::ApiError;
use crate::failover::{Attempts, Deadline, Failure};
use crate::registry::{Candidate, LoadGuard};
use crate::state::AppState;

/// Opening a stream and sending the request: a healthy provider on a live connection answers
/// in milliseconds.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of text a provider may send per token, on average over its answer: far above any
/// vocabulary's longest token, far below what would let a provider fill the gateway's memory.
pub const MAX_TEXT_PER_TOKEN: usize = 256;

/// A generation in progress on one provider.
#[derive(Debug)]
pub struct Generation {
    /// The provider and its model card.
    pub candidate: Candidate,
    /// Prompt length the provider reported.
    pub prompt_tokens: u32,
    /// When the gateway began opening it on this provider.
    pub started_at: Instant,
    /// When the first token frame arrived (for time-to-first-token).
    pub first_token_at: Option<Instant>,
    /// The referee following this answer, when it is audited.
    pub referee: Option<RefereeSession>,
    /// The gateway's own assembly of the text, when it has the model's vocabulary.
    transcript: Option<Transcript>,
    /// The leaves the provider streamed, when the request asked for them.
    leaves: Option<Vec<StepLeaf>>,
    /// The request's constraint, walked along the tokens as they arrive (the gateway's own,
    /// over its vocabulary).
    guide: Option<Guide>,
    /// Tokens the request allows.
    max_tokens: u32,
    /// Tokens and text bytes received so far.
    tokens_seen: u32,
    text_bytes: usize,
    /// When the request must be over.
    deadline: Deadline,
    /// Whose API key pays for the tokens, once the generation is over however it ended.
    payer: Option<Caller>,
    auditor: Auditor,
    stream: libp2p::Stream,
    _load: LoadGuard,
}

impl Drop for Generation {
    fn drop(&mut self) {
        if let Some(payer) = &self.payer {
            payer.charge_tokens(u64::from(self.tokens_seen) + u64::from(self.prompt_tokens));
        }
    }
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
    /// The step leaves streamed with the tokens, when the request asked for them (not checked
    /// yet: the audit checks them against the commitment).
    pub leaves: Option<Vec<StepLeaf>>,
    /// Whether every token was one the request's constraint allowed at its step.
    pub constraint_holds: bool,
}

/// The provider's text was not its tokens' text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextMismatch;

impl Generation {
    /// The next frame; a silent or broken provider becomes a 504 or 502, the request's
    /// deadline a 504, and a frame beyond what the request allows a 502.
    pub async fn next(&mut self) -> Result<GenerateFrame, ApiError> {
        let gap = match self.first_token_at {
            None => FRAME_GAP_TIMEOUT,
            Some(_) => TOKEN_GAP_TIMEOUT,
        };
        let wait = gap.min(self.deadline.remaining());
        let mut frame = match tokio::time::timeout(
            wait,
            read_frame(&mut self.stream, MAX_STREAM_FRAME),
        )
        .await
        {
            Ok(Ok(frame)) => frame,
            Ok(Err(e)) => {
                tracing::warn!(provider = %self.candidate.peer, error = %e, "provider stream broke");
                return Err(ApiError::provider_failed(
                    "The provider closed the stream before finishing",
                ));
            }
            Err(_) if self.deadline.passed() => return Err(self.deadline.error()),
            Err(_) => return Err(ApiError::provider_timeout()),
        };
        self.bound(&frame)?;
        self.keep_leaf(&mut frame)?;
        if let GenerateFrame::Token { token, .. } = &frame {
            if self.first_token_at.is_none() {
                self.first_token_at = Some(Instant::now());
            }
            if let Some(referee) = &self.referee {
                referee.push(*token);
            }
        }
        Ok(frame)
    }

    /// When the request must be over.
    pub fn deadline(&self) -> Deadline {
        self.deadline
    }

    /// Charges this generation's tokens (prompt and those received) to `caller`'s key when it
    /// ends, however it ends: delivered, withheld, failed over or abandoned by the client.
    pub fn bill_to(&mut self, caller: Option<Caller>) {
        self.payer = caller;
    }

    /// Holds the provider to the request: at most `max_tokens` tokens (one more is a lie the
    /// peer book records, as no honest engine sends it) and at most [`MAX_TEXT_PER_TOKEN`]
    /// bytes of text a token.
    fn bound(&mut self, frame: &GenerateFrame) -> Result<(), ApiError> {
        let text = match frame {
            GenerateFrame::Token { text, .. } => {
                self.tokens_seen += 1;
                if self.tokens_seen > self.max_tokens {
                    self.auditor
                        .observed(&self.candidate.peer, AuditFailure::LengthMismatch);
                    return Err(ApiError::provider_failed(
                        "The provider sent more tokens than max_tokens allows",
                    ));
                }
                text
            }
            GenerateFrame::Done { text, .. } => text,
            GenerateFrame::Error { .. } | GenerateFrame::Accepted { .. } => return Ok(()),
        };
        self.text_bytes += text.len();
        let allowed = (self.tokens_seen.max(1) as usize).saturating_mul(MAX_TEXT_PER_TOKEN);
        if self.text_bytes > allowed {
            tracing::warn!(provider = %self.candidate.peer, bytes = self.text_bytes, tokens = self.tokens_seen, "provider sent more text than its tokens can hold");
            return Err(ApiError::provider_failed(
                "The provider sent more text than its tokens can hold",
            ));
        }
        Ok(())
    }

    /// Takes a token frame's leaf into [`Generation::leaves`] when the request asked for leaves
    /// (a token without one is a provider failing the request); drops it otherwise.
    fn keep_leaf(&mut self, frame: &mut GenerateFrame) -> Result<(), ApiError> {
        let GenerateFrame::Token {
            leaf, step, token, ..
        } = frame
        else {
            return Ok(());
        };
        let leaf = leaf.take();
        match (&mut self.leaves, leaf) {
            // Before any value of it reaches a client: the leaf is this step's and token's,
            // its candidates are within bounds and hold the token (the rest of the per-leaf
            // checks, and the Merkle root, come at the end).
            (Some(leaves), Some(leaf)) => {
                let fits = leaf.step == *step
                    && leaf.token == *token
                    && leaf.top.len() <= CANDIDATES
                    && leaf.logprob(leaf.token).is_some();
                if !fits {
                    self.auditor
                        .observed(&self.candidate.peer, AuditFailure::LeavesMismatch);
                    return Err(ApiError::verification_failed("failed:leaves_mismatch"));
                }
                leaves.push(*leaf);
            }
            (Some(_), None) => {
                return Err(ApiError::provider_failed(
                    "The provider did not send the step leaves the request asked for",
                ));
            }
            (None, _) => {}
        }
        Ok(())
    }

    /// Whether the request's constraint allows `token` next (always, without a constraint).
    /// Call once per token, in order: a token it does not allow ends the walk, and every later
    /// one is refused too.
    pub fn allows(&mut self, token: u32) -> bool {
        self.guide.as_mut().is_none_or(|guide| guide.advance(token))
    }

    /// Whether an answer that ended for `reason` is complete under the request's constraint:
    /// a `stop` must end where the constraint is complete, unless one of the request's stop
    /// sequences ended it, as the gateway's own transcript of the tokens shows (a provider
    /// cannot stop a JSON answer or a tool call halfway and call it done, nor claim a stop
    /// sequence that is not there).
    pub fn ends_well(&mut self, reason: FinishReason) -> bool {
        let cut = reason == FinishReason::Length
            || self.transcript.as_ref().is_some_and(Transcript::stopped);
        cut || self.guide.as_mut().is_none_or(Guide::complete)
    }

    /// The leaf of the last token read, when the request asked for leaves.
    pub fn last_leaf(&self) -> Option<&StepLeaf> {
        self.leaves.as_ref()?.last()
    }

    /// The leaves streamed so far, when the request asked for them.
    pub fn leaves(&self) -> Option<&[StepLeaf]> {
        self.leaves.as_deref()
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
        let mut constraint_holds = true;
        loop {
            match self.next().await? {
                GenerateFrame::Token {
                    step,
                    token,
                    text: piece,
                    ..
                } => {
                    if step as usize != tokens.len() {
                        return Err(ApiError::provider_failed(
                            "The provider sent steps out of order",
                        ));
                    }
                    tokens.push(token);
                    constraint_holds &= self.allows(token);
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
                    constraint_holds &= self.ends_well(finish_reason);
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
                        leaves: self.leaves.take(),
                        constraint_holds,
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
        | RemoteErrorKind::ShuttingDown
        | RemoteErrorKind::NotServed => {
            ApiError::no_provider("No provider could take the request right now")
        }
        RemoteErrorKind::Internal => {
            ApiError::provider_failed("The provider failed while generating")
        }
    }
}

/// What a provider's refusal before the first token means for the retry policy.
fn refusal(kind: RemoteErrorKind, message: &str) -> Failure {
    let error = remote_error(kind, message);
    match kind {
        // Another provider may have a larger context, not lie about the request, or serve
        // this gateway.
        RemoteErrorKind::InvalidRequest
        | RemoteErrorKind::ContextLength
        | RemoteErrorKind::NotServed => Failure::Refused(error),
        RemoteErrorKind::Overloaded => Failure::Busy,
        RemoteErrorKind::UnknownModel
        | RemoteErrorKind::ShuttingDown
        | RemoteErrorKind::Internal => Failure::Broke(error),
    }
}

/// Opens a generation on the next provider `attempts` offers that accepts `request`; in a
/// refereed mode, a referee starts following it at once. `guide` is the request's constraint,
/// compiled once when the request was checked: each generation walks a copy of it. When none
/// does, the retry policy's error for the whole request.
pub async fn start<'a>(
    state: &AppState,
    attempts: &mut Attempts<'a>,
    request: &GenerateRequest,
    guide: Option<&Guide>,
    mode: VerificationMode,
) -> Result<Generation, ApiError> {
    while let Some(candidate) = attempts.next_candidate() {
        match try_start(state, candidate, request, guide, attempts.deadline()).await {
            Ok(mut generation) => {
                generation.referee = state.auditor.follow(candidate, request, mode);
                return Ok(generation);
            }
            Err(failure) => attempts.failed(candidate, failure),
        }
    }
    Err(attempts.error())
}

async fn try_start(
    state: &AppState,
    candidate: &Candidate,
    request: &GenerateRequest,
    guide: Option<&Guide>,
    deadline: Deadline,
) -> Result<Generation, Failure> {
    let started_at = Instant::now();
    let Some(load) = state.registry.try_track(candidate.peer) else {
        return Err(Failure::Full);
    };
    let mut stream = open(state, candidate, deadline).await?;
    let written = tokio::time::timeout(
        OPEN_TIMEOUT.min(deadline.remaining()),
        write_frame(&mut stream, request),
    )
    .await;
    if !matches!(written, Ok(Ok(()))) {
        return Err(if deadline.passed() {
            Failure::Deadline
        } else {
            Failure::Broke(ApiError::provider_failed(
                "The provider could not be reached (request not delivered)",
            ))
        });
    }
    let wait = FRAME_GAP_TIMEOUT.min(deadline.remaining());
    match tokio::time::timeout(wait, read_frame(&mut stream, MAX_STREAM_FRAME)).await {
        Ok(Ok(GenerateFrame::Accepted {
            prompt_tokens,
            queue_depth,
        })) => {
            state.registry.reported_queue(&candidate.peer, queue_depth);
            Ok(Generation {
                candidate: candidate.clone(),
                prompt_tokens,
                started_at,
                first_token_at: None,
                referee: None,
                transcript: state
                    .auditor
                    .transcript(&candidate.card.digest, &request.stop),
                leaves: request.stream_leaves.then(Vec::new),
                guide: guide.cloned(),
                max_tokens: request.max_tokens,
                tokens_seen: 0,
                text_bytes: 0,
                deadline,
                payer: None,
                auditor: state.auditor.clone(),
                stream,
                _load: load,
            })
        }
        Ok(Ok(GenerateFrame::Error { kind, message })) => Err(refusal(kind, &message)),
        Ok(Ok(_)) => {
            report(state, candidate, Offence::Violation).await;
            Err(Failure::Broke(ApiError::provider_failed(
                "The provider violated the protocol",
            )))
        }
        Ok(Err(e)) => {
            tracing::warn!(provider = %candidate.peer, error = %e, "provider stream broke");
            if e.is_violation() {
                report(state, candidate, Offence::Violation).await;
            }
            Err(Failure::Broke(ApiError::provider_failed(
                "The provider closed the stream before answering",
            )))
        }
        Err(_) if deadline.passed() => Err(Failure::Deadline),
        Err(_) => Err(Failure::Broke(ApiError::provider_timeout())),
    }
}

/// Tells the mesh that the provider broke the protocol (enough of it, and it is banned).
async fn report(state: &AppState, candidate: &Candidate, offence: Offence) {
    if state.net.report(candidate.peer, offence).await.is_err() {
        tracing::debug!("mesh stopped; offence not counted");
    }
}

/// Opens a generate stream to the candidate.
async fn open(
    state: &AppState,
    candidate: &Candidate,
    deadline: Deadline,
) -> Result<libp2p::Stream, Failure> {
    let unreachable = |what: &str| {
        Failure::Broke(ApiError::provider_failed(format!(
            "The provider could not be reached ({what})"
        )))
    };
    let mut control = state.net.stream_control();
    match tokio::time::timeout(
        OPEN_TIMEOUT.min(deadline.remaining()),
        control.open_stream(candidate.peer, GENERATE_PROTOCOL),
    )
    .await
    {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => {
            tracing::debug!(provider = %candidate.peer, error = %e, "cannot open a generate stream");
            Err(unreachable("stream refused"))
        }
        Err(_) if deadline.passed() => Err(Failure::Deadline),
        Err(_) => Err(unreachable("timeout")),
    }
}
