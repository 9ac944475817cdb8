//! `POST /v1/chat/completions`: validate, route, generate, audit, answer; and the legacy
//! `POST /v1/completions`, whose text prompt runs through the same pipeline and whose answer
//! is only shaped differently ([`crate::openai::legacy`]).
//!
//! One provider answers, audited as its mode says; `consensus` requests, answered by several,
//! are in [`consensus`].

mod consensus;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::Extension;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use proofmesh_shared::commit::{Commitment, SignedCommitment, StepLeaf};
use proofmesh_shared::constraint::{Constraint, ConstraintError, Guide};
use proofmesh_shared::protocol::{GenerateFrame, GenerateRequest, RequestId};
use proofmesh_shared::verify::AuditFailure;
use tokio::sync::OwnedSemaphorePermit;

use crate::access::Caller;
use crate::auditor::{Answer, AuditId, AuditOutcome, Exclusion, Released, VerificationMode};
use crate::catalog::Resolved;
use crate::error::ApiError;
use crate::error::ErrorBody;
use crate::failover::{self, Attempts, Deadline, Failure};
use crate::inference::{self, Completed, Generation};
use crate::lifecycle::Lifecycle;
use crate::openai::extract::OpenAiJson;
use crate::openai::legacy::{CompletionRequest, Surface, TextCompletion};
use crate::openai::logprobs::{ChoiceLogprobs, TokenLogprob};
use crate::openai::request::{ChatCompletionRequest, ValidatedChat};
use crate::openai::response::{
    AssistantMessage, AuditStatistics, ChatCompletion, ChatCompletionChunk, Choice, ChunkChoice,
    Delta, ProofmeshInfo, Usage, unix_now,
};
use crate::openai::tools::{self, Answered, DeltaToolCall};
use crate::registry::{Candidate, Lookup};
use crate::state::AppState;

/// The handler: validate, pick providers, then answer plainly or as a stream.
#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    tag = "chat",
    request_body(content = ChatCompletionRequest, content_type = "application/json"),
    params(
        ("x-proofmesh-provider" = Option<String>, Header,
            description = "Pin the request to one provider, by libp2p peer id (debugging, comparisons)"),
    ),
    responses(
        (status = 200,
            description = "The completion. With `stream: true`, server-sent events instead: one \
`ChatCompletionChunk` per `data:` line, the finish chunk carrying `proofmesh`, then `data: [DONE]`. \
A failure after the stream started arrives as a `data:` line holding an `ErrorBody`.",
            content(
                (ChatCompletion = "application/json"),
                (String = "text/event-stream"),
            ),
            headers(
                ("x-proofmesh-mode" = String, description = "`none`, `merkle`, `fraud` or `consensus`"),
                ("x-proofmesh-provider" = String, description = "Peer id of the provider that answered"),
                ("x-proofmesh-model-digest" = String, description = "`sha256:<hex>` of the GGUF that served"),
                ("x-proofmesh-seed" = String, description = "Sampler seed (the client's, or a random one)"),
                ("x-proofmesh-merkle-root" = String, description = "Hex Merkle root of the step leaves (non-streaming only)"),
                ("x-proofmesh-challenged" = String, description = "Comma-separated challenged steps (non-streaming only)"),
                ("x-proofmesh-verdict" = String, description = "`unaudited`, `passed`, `unrefereed` when the operator allows unrefereed answers, `deferred` (`fraud`: not audited yet) or `agreed` (`consensus`: every provider gave the same answer) (non-streaming only, and `consensus` streams)"),
                ("x-proofmesh-audit-id" = String, description = "`fraud` mode: the id whose verdict `GET /v1/audits/{id}` gives (streams too)"),
                ("x-proofmesh-referee" = String, description = "Who re-executed the answer: a peer id, or `local` (non-streaming only; absent without a referee)"),
                ("x-proofmesh-audit-tier" = String, description = "`exact` or `tolerant` (non-streaming only; absent without a referee)"),
                ("x-proofmesh-audit-ms" = String, description = "Audit time in milliseconds (non-streaming only)"),
            )),
        (status = 400, description = "Invalid request (`param` names the field), `context_length_exceeded` (from every provider tried) or `unsupported_verification_mode`", body = ErrorBody),
        (status = 401, description = "`invalid_api_key`: the gateway requires API keys and the request had none, or not one it issued", body = ErrorBody),
        (status = 404, description = "`model_not_found`: no provider serves it, or a name the operator did not pin to a digest (names are never resolved by what peers advertise; ask by `sha256:<hex>` instead)", body = ErrorBody),
        (status = 408, description = "`request_body_timeout`: the body did not arrive within `body_read_timeout_secs`", body = ErrorBody),
        (status = 413, description = "Body over 1 MiB", body = ErrorBody),
        (status = 502, description = "The provider failed, or `verification_failed`: every provider tried failed its audit (then `x-should-retry: false`)", body = ErrorBody,
            headers(("x-should-retry" = String, description = "`false` when retrying cannot help"))),
        (status = 503, description = "`no_provider_available` (none reachable, all benched, or for `merkle`: none that a trusted referee of its own numerics class can audit), `verification_unavailable` (answers were produced but none could be verified: no trusted referee, or an audit that could not be completed; they were withheld) or `shutting_down`", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`: every provider tried is at capacity, the gateway is at `max_concurrent_requests`, or the API key is over its rate", body = ErrorBody,
            headers(("retry-after" = String, description = "Seconds to wait before retrying"))),
        (status = 504, description = "`provider_timeout`: the provider went silent; `request_timeout`: the request ran past the gateway's `request_timeout_secs`", body = ErrorBody),
    )
)]
#[tracing::instrument(
    name = "chat.completions",
    skip_all,
    fields(request_id = tracing::field::Empty, model = tracing::field::Empty, verification_mode = tracing::field::Empty)
)]
pub async fn completions(
    State(state): State<AppState>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    OpenAiJson(body): OpenAiJson<ChatCompletionRequest>,
) -> Response {
    respond(state, caller, &headers, Asked::Chat(body)).await
}

/// `POST /v1/completions`: a text prompt, continued without a chat template, committed and
/// audited exactly like a chat completion.
#[utoipa::path(
    post,
    path = "/v1/completions",
    tag = "chat",
    request_body(content = CompletionRequest, content_type = "application/json"),
    params(
        ("x-proofmesh-provider" = Option<String>, Header,
            description = "Pin the request to one provider, by libp2p peer id"),
    ),
    responses(
        (status = 200,
            description = "The completion (`text_completion`), with the same `proofmesh` object \
and `x-proofmesh-*` headers as a chat completion. With `stream: true`, server-sent events of \
`text_completion` chunks, then `data: [DONE]`.",
            content(
                (TextCompletion = "application/json"),
                (String = "text/event-stream"),
            )),
        (status = 400, description = "Invalid request (`param` names the field)", body = ErrorBody),
        (status = 401, description = "`invalid_api_key`", body = ErrorBody),
        (status = 404, description = "`model_not_found`", body = ErrorBody),
        (status = 413, description = "Body over 1 MiB", body = ErrorBody),
        (status = 429, description = "`rate_limit_exceeded`", body = ErrorBody,
            headers(("retry-after" = String, description = "Seconds to wait before retrying"))),
        (status = 502, description = "The provider failed, or `verification_failed`", body = ErrorBody),
        (status = 503, description = "`no_provider_available`, `verification_unavailable` or `shutting_down`", body = ErrorBody),
        (status = 504, description = "`provider_timeout` or `request_timeout`", body = ErrorBody),
    )
)]
#[tracing::instrument(
    name = "completions",
    skip_all,
    fields(request_id = tracing::field::Empty, model = tracing::field::Empty, verification_mode = tracing::field::Empty)
)]
pub async fn text_completions(
    State(state): State<AppState>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    OpenAiJson(body): OpenAiJson<CompletionRequest>,
) -> Response {
    respond(state, caller, &headers, Asked::Text(body)).await
}

/// A request as it came, through either API.
#[derive(Debug)]
enum Asked {
    Chat(ChatCompletionRequest),
    Text(CompletionRequest),
}

impl Asked {
    fn validate(self, default_mode: VerificationMode) -> Result<ValidatedChat, ApiError> {
        match self {
            Self::Chat(body) => body.validate(default_mode),
            Self::Text(body) => body.validate(default_mode),
        }
    }
}

/// Answers either API's request, and leaves its mode on the response.
async fn respond(
    state: AppState,
    caller: Option<Extension<Caller>>,
    headers: &HeaderMap,
    asked: Asked,
) -> Response {
    let arrival = Arrival {
        at: Instant::now(),
        caller: caller.map(|Extension(caller)| caller),
    };
    let mut mode = None;
    let mut response = answer(state, headers, asked, arrival, &mut mode)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    if let Some(mode) = mode {
        response.extensions_mut().insert(ModeLabel(mode.as_str()));
    }
    response
}

/// The verification mode of a request, left on its response for the request counter.
#[derive(Debug, Clone, Copy)]
pub struct ModeLabel(pub &'static str);

async fn answer(
    state: AppState,
    headers: &HeaderMap,
    asked: Asked,
    arrival: Arrival,
    mode: &mut Option<VerificationMode>,
) -> Result<Response, ApiError> {
    if state.lifecycle.is_draining() {
        return Err(ApiError::shutting_down());
    }
    let Ok(admitted) = Arc::clone(&state.admission).try_acquire_owned() else {
        return Err(ApiError::busy(
            "This gateway is serving as many requests as it is configured to; retry after the \
             time in Retry-After",
            // 1 to 3 s, so that clients turned away together do not all come back together.
            1 + rand::random::<u64>() % 3,
        ));
    };
    let chat = asked.validate(state.default_mode)?;
    *mode = Some(chat.mode);
    let mut candidates = resolve(&state, &chat.model)?;
    if let Some(pinned) = headers.get(PIN_HEADER) {
        if chat.mode == VerificationMode::Consensus {
            return Err(ApiError::invalid(
                PIN_HEADER,
                "verification_mode \"consensus\" asks several providers chosen by the gateway; \
                 it cannot be pinned to one",
            ));
        }
        pin(&mut candidates, pinned, &chat.model)?;
    }
    let candidates = state
        .auditor
        .admit(candidates, chat.mode)
        .map_err(|e| excluded(e, &chat.model))?;
    if chat.logprobs.is_some() {
        check_logprobs(&state, &chat, &candidates[0])?;
    }
    let guide = match &chat.constraint {
        Some(constraint) => {
            Some(check_constraint(&state, &chat, &candidates[0], constraint).await?)
        }
        None => None,
    };
    let guide = guide.as_ref();
    let request = GenerateRequest {
        version: GenerateRequest::VERSION,
        request_id: RequestId::random(),
        model_digest: candidates[0].card.digest,
        messages: chat.messages.clone(),
        sampler: chat.sampler,
        max_tokens: chat.max_tokens,
        stop: chat.stop.clone(),
        constraint: chat.constraint.clone(),
        prompt: chat.prompt.clone(),
        tools: chat.tools.as_ref().map(|t| t.json.clone()),
        trace: proofmesh_shared::telemetry::current_context(),
        stream_leaves: chat.logprobs.is_some(),
    };
    tracing::Span::current()
        .record("request_id", tracing::field::display(&request.request_id))
        .record("model", chat.model.as_str())
        .record("verification_mode", chat.mode.as_str());
    let retry = match chat.mode {
        VerificationMode::Consensus => state
            .retry
            .for_answers(state.auditor.policy().consensus_providers),
        _ => state.retry,
    };
    let mut attempts = Attempts::new(retry, state.registry.clone(), &candidates, arrival.at);
    if chat.mode == VerificationMode::Consensus {
        consensus::respond(&state, &chat, &request, guide, &mut attempts, &arrival).await
    } else if chat.stream {
        // Failover happens only before the first byte: once a provider accepted, the stream is
        // its, and a failure ends it with an error event.
        let mut generation =
            inference::start(&state, &mut attempts, &request, guide, chat.mode).await?;
        generation.bill_to(arrival.caller.clone());
        Ok(stream_response(
            state, chat, request, generation, arrival, admitted,
        ))
    } else {
        plain_response(&state, &chat, &request, guide, &mut attempts, &arrival).await
    }
}

/// Whether this gateway can report log-probabilities for the request: it names tokens with the
/// model's vocabulary, its own (a provider's token texts are claims), and `consensus` compares
/// answers without their leaves.
fn check_logprobs(
    state: &AppState,
    chat: &ValidatedChat,
    candidate: &Candidate,
) -> Result<(), ApiError> {
    if chat.mode == VerificationMode::Consensus {
        return Err(ApiError::invalid(
            "logprobs",
            "'logprobs' is not available with verification_mode \"consensus\" yet; use \
             merkle, fraud or none",
        ));
    }
    if state.auditor.vocabulary(&candidate.card.digest).is_none() {
        return Err(ApiError::invalid(
            "logprobs",
            format!(
                "This gateway has no vocabulary for '{}', so it cannot name the tokens of \
                 log-probabilities itself (its operator adds the model file with --vocabularies)",
                chat.model
            ),
        ));
    }
    Ok(())
}

/// The request's constraint compiled over the model's vocabulary, the gateway's own, as it
/// will walk every answer's tokens through it; or why this gateway cannot check it.
async fn check_constraint(
    state: &AppState,
    chat: &ValidatedChat,
    candidate: &Candidate,
    constraint: &Constraint,
) -> Result<Guide, ApiError> {
    // With tools, the constraint is made of their schemas.
    let param = if chat.tools.is_some() {
        "tools"
    } else {
        "response_format"
    };
    // Compiling a schema takes milliseconds, and the first one builds the token trie.
    let auditor = state.auditor.clone();
    let digest = candidate.card.digest;
    let constraint = constraint.clone();
    let compiled = tokio::task::spawn_blocking(move || auditor.guide(&digest, &constraint))
        .await
        .map_err(|_| ApiError::invalid(param, format!("The {param} could not be compiled")))?;
    match compiled {
        Ok(guide) => Ok(guide),
        Err(ConstraintError::Invalid(message)) => Err(ApiError::invalid(
            param,
            format!("This {param} cannot be used: {message}"),
        )),
        Err(other) => Err(ApiError::invalid(
            param,
            format!(
                "{param} is not available for '{}' on this gateway: {other} (its operator adds \
                 the model file with --vocabularies)",
                chat.model,
            ),
        )),
    }
}

/// The `logprobs` object of a whole answer, read off its streamed (and audited) leaves.
fn logprobs_of(
    state: &AppState,
    chat: &ValidatedChat,
    request: &GenerateRequest,
    leaves: Option<&[StepLeaf]>,
) -> Option<ChoiceLogprobs> {
    let vocabulary = state.auditor.vocabulary(&request.model_digest)?;
    Some(chat.logprobs?.of(leaves?, &vocabulary))
}

/// Keeps only the provider named in the pin header.
fn pin(candidates: &mut Vec<Candidate>, pinned: &HeaderValue, model: &str) -> Result<(), ApiError> {
    let peer = pinned
        .to_str()
        .ok()
        .and_then(|p| p.parse::<libp2p::PeerId>().ok())
        .ok_or_else(|| ApiError::invalid(PIN_HEADER, "x-proofmesh-provider must be a peer id"))?;
    candidates.retain(|c| c.peer == peer);
    if candidates.is_empty() {
        return Err(ApiError::no_provider(format!(
            "Provider {peer} is not available for '{model}'"
        )));
    }
    Ok(())
}

/// Why no provider was admitted, as the client's error.
fn excluded(exclusion: Exclusion, model: &str) -> ApiError {
    match exclusion {
        Exclusion::AllBenched => ApiError::no_provider(format!(
            "Every provider of '{model}' recently failed verification (or left its audits \
             unanswered) and is benched"
        )),
        Exclusion::Unauditable => ApiError::no_provider(format!(
            "No provider of '{model}' can be audited right now: each would need a referee this \
             gateway trusts (its own engine, an allow-listed peer, or one with a clean record) of \
             the provider's own numerics class (an operator can allow cross-class audits with \
             --audit-tiers any, or unrefereed answers with --allow-unrefereed). Retry later, or \
             ask for verification_mode \"none\""
        )),
    }
}

/// Generates to the end, audits, then answers in one body. A provider that breaks, or whose
/// answer fails its audit or could not be verified as asked, is replaced by the next one the
/// retry policy offers: nothing has reached the client yet. Such an answer never reaches the
/// client; when every try failed, the client gets the policy's most telling error
/// (`verification_failed`, `verification_unavailable`, …).
async fn plain_response(
    state: &AppState,
    chat: &ValidatedChat,
    request: &GenerateRequest,
    guide: Option<&Guide>,
    attempts: &mut Attempts<'_>,
    arrival: &Arrival,
) -> Result<Response, ApiError> {
    loop {
        let mut generation = inference::start(state, attempts, request, guide, chat.mode).await?;
        generation.bill_to(arrival.caller.clone());
        let done = match generation.collect().await {
            Ok(done) => done,
            Err(e) => {
                attempts.failed(&generation.candidate, Failure::from_error(e));
                continue;
            }
        };
        record_usage(state, &generation, done.tokens.len(), arrival);
        let referee = generation.referee.take();
        let answer = answer_of(&generation, request, &done);
        let outcome = state.auditor.judge(&answer, chat.mode, referee).await;
        let mut info = proofmesh_info(chat, &generation, &done.commitment, &outcome);
        if !state.auditor.deliverable(&outcome.verdict()) {
            attempts.failed(&generation.candidate, withheld(&outcome, info.verdict));
            continue;
        }
        let price = price(state, chat, &done.commitment, done.tokens.len());
        if chat.mode.deferred() {
            let id = AuditId::new(crate::auditor::book::now_ms());
            let audited = release(state, &answer, id, arrival, &mut info, price).await;
            if let Some(outcome) = audited.filter(|o| !state.auditor.deliverable(&o.verdict())) {
                attempts.failed(&generation.candidate, withheld(&outcome, info.verdict));
                continue;
            }
        } else {
            state
                .payer
                .pay(generation.candidate.peer, caller_id(arrival), price)
                .await;
        }
        attempts.succeeded(&generation.candidate);
        let logprobs = logprobs_of(state, chat, request, done.leaves.as_deref());
        let mut response = body(chat, completion(chat, request, &done, &info, logprobs));
        set_headers(response.headers_mut(), &info, true);
        return Ok(response);
    }
}

/// A finished answer as one chat completion, with what it is bound to and how it was checked.
/// (What the provider signed, and the audit checked, not its unsigned claims.)
fn completion(
    chat: &ValidatedChat,
    request: &GenerateRequest,
    done: &Completed,
    info: &ProofmeshInfo,
    logprobs: Option<ChoiceLogprobs>,
) -> ChatCompletion {
    let signed = &done.commitment.commitment;
    // With tools, the answer is read as calls or a reply; else it is the text.
    let answered = match &chat.tools {
        Some(_) => tools::read_answer(&done.text, signed.finish_reason.as_openai()),
        None => Answered {
            content: Some(done.text.clone()),
            calls: None,
            finish_reason: signed.finish_reason.as_openai(),
        },
    };
    ChatCompletion {
        id: completion_id(&request.request_id),
        object: "chat.completion",
        created: unix_now(),
        model: chat.model.clone(),
        choices: vec![Choice {
            index: 0,
            message: AssistantMessage {
                role: "assistant",
                content: answered.content,
                tool_calls: answered.calls,
            },
            finish_reason: answered.finish_reason,
            logprobs,
        }],
        usage: Usage::new(signed.prompt_tokens, done.tokens.len() as u32),
        system_fingerprint: None,
        proofmesh: info.clone(),
    }
}

/// A finished generation as the auditor judges it.
fn answer_of<'a>(
    generation: &'a Generation,
    request: &'a GenerateRequest,
    done: &'a Completed,
) -> Answer<'a> {
    Answer {
        provider: &generation.candidate,
        request,
        tokens: &done.tokens,
        commitment: &done.commitment,
        text_matches: done.text_matches,
        constraint_holds: done.constraint_holds,
        leaves: done.leaves.as_deref(),
    }
}

/// Hands a `fraud` answer that passed the exact checks to the auditor, which draws whether to
/// audit it later, and tells the client where its verdict will be. When the provider's audits
/// are backed up, the auditor audits it at once instead: then its outcome is returned, and the
/// answer may be released only if that outcome allows.
async fn release(
    state: &AppState,
    answer: &Answer<'_>,
    id: AuditId,
    arrival: &Arrival,
    info: &mut ProofmeshInfo,
    price: u64,
) -> Option<AuditOutcome> {
    let deferral = state
        .auditor
        .defer(Released {
            id,
            provider: answer.provider.clone(),
            request: answer.request.clone(),
            tokens: answer.tokens.to_vec(),
            commitment: answer.commitment.clone(),
            caller: caller_id(arrival),
            price,
            asked_ms: arrival.unix_ms(),
        })
        .await;
    info.verdict = "deferred".into();
    info.audit_id = Some(deferral.id.to_string());
    info.audit_window_closes_at = Some(deferral.window_closes_ms / 1000);
    let outcome = deferral.audited_now?;
    info.verdict = outcome.verdict().label();
    info.challenged.clone_from(&outcome.challenged);
    info.referee.clone_from(&outcome.referee);
    info.audit = outcome
        .statistics
        .as_ref()
        .map(|s| AuditStatistics::new(s, outcome.evidence_bytes));
    info.audit_ms = outcome.elapsed.as_millis() as u64;
    Some(outcome)
}

/// What an answer earns its provider (µcr): its tokens, prompt and completion, at the
/// price of the model the client asked for. The prompt's length is the provider's word (only an
/// audit checks it), so it is billed at most at a bound the gateway computes itself.
fn price(state: &AppState, chat: &ValidatedChat, signed: &SignedCommitment, tokens: usize) -> u64 {
    let prompt = u64::from(signed.commitment.prompt_tokens).min(prompt_token_bound(chat));
    let tokens = prompt.saturating_add(tokens as u64);
    state.auditor.ledger().pricing().price(&chat.model, tokens)
}

/// The most tokens a chat template can make of these messages: one per byte of their text
/// (no tokenizer makes more of UTF-8 text, byte fallback included), plus room for each
/// message's role and markers and the template's own text.
fn prompt_token_bound(chat: &ValidatedChat) -> u64 {
    const PER_MESSAGE: u64 = 16;
    const TEMPLATE: u64 = 256;
    let text = chat.prompt.as_ref().map_or(0, |p| p.len() as u64);
    // Tools are listed in a system note, or rendered by the template (indented, escaped, with
    // its own text around them): bounded by six bytes for each of theirs (a `\u00XX` escape)
    // and a fixed allowance for the template's tool text.
    const TOOL_TEXT: u64 = 4096;
    let tools = chat.tools.as_ref().map_or(0, |t| {
        (t.json.len() as u64)
            .saturating_mul(6)
            .saturating_add(TOOL_TEXT)
    });
    let text = text.saturating_add(tools);
    chat.messages
        .iter()
        .fold(TEMPLATE.saturating_add(text), |bound, m| {
            bound
                .saturating_add(m.content.len() as u64)
                .saturating_add(m.role.len() as u64)
                .saturating_add(PER_MESSAGE)
        })
}

/// Who pays for a request: its API key's id, when keys are on.
fn caller_id(arrival: &Arrival) -> Option<String> {
    arrival.caller.as_ref().map(Caller::owner_id)
}

/// Request header that pins a request to one provider (by peer id), for debugging a provider or
/// comparing two.
pub const PIN_HEADER: &str = "x-proofmesh-provider";

/// Providers for the requested model, or the right error. A name means only the digest the
/// operator pinned it to.
fn resolve(state: &AppState, model: &str) -> Result<Vec<Candidate>, ApiError> {
    let Resolved::Digest(digest) = state.catalog.resolve(model) else {
        let advertised = state.registry.advertised_as(model);
        return Err(ApiError::model_not_pinned(model, &advertised));
    };
    match state.registry.lookup(&digest) {
        Lookup::Found(candidates) => Ok(candidates),
        Lookup::UnknownModel => Err(ApiError::model_not_found(model)),
        Lookup::NoProviders => Err(ApiError::no_provider(
            "No provider is reachable on the mesh right now",
        )),
    }
}

/// When a request arrived, and who sent it (with API keys on).
#[derive(Debug, Clone)]
struct Arrival {
    at: Instant,
    caller: Option<Caller>,
}

impl Arrival {
    /// When the request arrived, in unix milliseconds.
    fn unix_ms(&self) -> u64 {
        let elapsed = u64::try_from(self.at.elapsed().as_millis()).unwrap_or(u64::MAX);
        crate::auditor::book::now_ms().saturating_sub(elapsed)
    }
}

/// Counts a finished generation's tokens (and its time to first token, when not yet counted).
/// (The caller's key pays for them through [`Generation::bill_to`].)
fn record_usage(state: &AppState, generation: &Generation, tokens: usize, arrival: &Arrival) {
    let metrics = &state.metrics;
    metrics.tokens_generated.inc_by(tokens as u64);
    metrics
        .prompt_tokens
        .inc_by(u64::from(generation.prompt_tokens));
    if let Some(first) = generation.first_token_at {
        // The client's wait, failovers included; the provider's own, from when it was asked.
        let latency = first.saturating_duration_since(arrival.at);
        metrics.time_to_first_token.observe(latency.as_secs_f64());
        state.registry.observed_latency(
            &generation.candidate.peer,
            first.saturating_duration_since(generation.started_at),
        );
    }
}

fn completion_id(id: &RequestId) -> String {
    format!("chatcmpl-{id}")
}

fn proofmesh_info(
    chat: &ValidatedChat,
    generation: &Generation,
    signed: &SignedCommitment,
    outcome: &AuditOutcome,
) -> ProofmeshInfo {
    ProofmeshInfo {
        verification_mode: chat.mode.as_str(),
        provider: generation.candidate.peer.to_string(),
        model_digest: generation.candidate.card.digest.to_string(),
        merkle_root: hex::encode(signed.commitment.merkle_root),
        steps: signed.commitment.steps,
        challenged: outcome.challenged.clone(),
        verdict: outcome.verdict().label(),
        audit_id: None,
        audit_window_closes_at: None,
        referee: outcome.referee.clone(),
        audit: outcome
            .statistics
            .as_ref()
            .map(|s| AuditStatistics::new(s, outcome.evidence_bytes)),
        seed: chat.sampler.seed,
        audit_ms: outcome.elapsed.as_millis() as u64,
        consensus: None,
    }
}

fn header(headers: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(HeaderName::from_static(name), value);
    }
}

/// The `x-proofmesh-*` headers; streaming responses only know the first three when headers go out.
fn set_headers(headers: &mut HeaderMap, info: &ProofmeshInfo, complete: bool) {
    header(headers, "x-proofmesh-mode", info.verification_mode);
    header(headers, "x-proofmesh-provider", &info.provider);
    header(headers, "x-proofmesh-model-digest", &info.model_digest);
    header(headers, "x-proofmesh-seed", &info.seed.to_string());
    if let Some(id) = &info.audit_id {
        header(headers, "x-proofmesh-audit-id", id);
    }
    if complete {
        header(headers, "x-proofmesh-merkle-root", &info.merkle_root);
        let challenged: Vec<String> = info.challenged.iter().map(u32::to_string).collect();
        header(headers, "x-proofmesh-challenged", &challenged.join(","));
        header(headers, "x-proofmesh-verdict", &info.verdict);
        header(headers, "x-proofmesh-audit-ms", &info.audit_ms.to_string());
        if let Some(referee) = &info.referee {
            header(headers, "x-proofmesh-referee", referee);
        }
        if let Some(audit) = &info.audit {
            header(headers, "x-proofmesh-audit-tier", audit.tier);
        }
    }
}

fn json_event<T: serde::Serialize>(value: &T) -> Event {
    Event::default().data(serde_json::to_string(value).unwrap_or_else(|_| "{}".into()))
}

fn stream_response(
    state: AppState,
    chat: ValidatedChat,
    request: GenerateRequest,
    generation: Generation,
    arrival: Arrival,
    admitted: OwnedSemaphorePermit,
) -> Response {
    let mut headers = HeaderMap::new();
    // A released stream's audit id goes out with the headers, before any token.
    let audit_id = chat
        .mode
        .deferred()
        .then(|| AuditId::new(crate::auditor::book::now_ms()));
    let early = ProofmeshInfo {
        verification_mode: chat.mode.as_str(),
        provider: generation.candidate.peer.to_string(),
        model_digest: generation.candidate.card.digest.to_string(),
        merkle_root: String::new(),
        steps: 0,
        challenged: Vec::new(),
        verdict: String::new(),
        audit_id: audit_id.map(|id| id.to_string()),
        audit_window_closes_at: None,
        referee: None,
        audit: None,
        seed: chat.sampler.seed,
        audit_ms: 0,
        consensus: None,
    };
    set_headers(&mut headers, &early, false);
    let lifecycle = state.lifecycle.clone();
    let deadline = generation.deadline();
    let events = detached(
        until_drained(
            events(
                state, chat, request, generation, arrival, admitted, audit_id,
            ),
            lifecycle,
        ),
        deadline,
    );
    let sse = Sse::new(events).keep_alive(KeepAlive::default());
    (headers, sse).into_response()
}

/// The SSE body: a role chunk, content chunks, then (after the audit) the finish chunk carrying
/// `proofmesh`, an optional usage chunk, and `[DONE]`. Failures become an error event.
fn events(
    state: AppState,
    chat: ValidatedChat,
    request: GenerateRequest,
    mut generation: Generation,
    arrival: Arrival,
    admitted: OwnedSemaphorePermit,
    audit_id: Option<AuditId>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let mut chunks = Chunks::new(&chat, &request);
    let vocabulary = state.auditor.vocabulary(&request.model_digest);
    let wanted = chat.logprobs.zip(vocabulary);
    async_stream::stream! {
        // The request counts against the gateway's limit until its stream ends.
        let _admitted = admitted;
        if let Some(opening) = chunks.opening() {
            yield Ok(opening);
        }
        let mut tokens: Vec<u32> = Vec::new();
        loop {
            let frame = match generation.next().await {
                Ok(frame) => frame,
                Err(e) => {
                    let event = json_event(&e.body());
                    failover::record(&state.registry, &generation.candidate, &Failure::from_error(e));
                    yield Ok(event);
                    return;
                }
            };
            match frame {
                GenerateFrame::Token { step, token, text, .. } => {
                    if step as usize != tokens.len() {
                        yield Ok(json_event(&ApiError::provider_failed("The provider sent steps out of order").body()));
                        return;
                    }
                    tokens.push(token);
                    // Only tokens the request's constraint allows go out.
                    if !generation.allows(token) {
                        yield Ok(caught(&state, &generation, AuditFailure::ConstraintViolated));
                        return;
                    }
                    // Only text the gateway checked against the tokens goes out; the moment it
                    // differs, the stream ends with an error.
                    let Ok(text) = generation.text_of(token, text) else {
                        yield Ok(caught(&state, &generation, AuditFailure::TextMismatch));
                        return;
                    };
                    let logprobs = wanted.as_ref().map(|(wanted, vocabulary)| ChoiceLogprobs {
                        content: generation.last_leaf().and_then(|leaf| wanted.entry(leaf, vocabulary)).into_iter().collect(),
                    });
                    let news = !text.is_empty() || logprobs.as_ref().is_some_and(|l| !l.content.is_empty());
                    if news && let Some(event) = chunks.content(text, logprobs) {
                        yield Ok(event);
                    }
                }
                GenerateFrame::Done { text, commitment, finish_reason } => {
                    record_usage(&state, &generation, tokens.len(), &arrival);
                    if !generation.ends_well(finish_reason) {
                        yield Ok(caught(&state, &generation, AuditFailure::ConstraintViolated));
                        return;
                    }
                    let Ok(text) = generation.tail_of(text) else {
                        yield Ok(caught(&state, &generation, AuditFailure::TextMismatch));
                        return;
                    };
                    if !text.is_empty()
                        && let Some(event) = chunks.content(text, None)
                    {
                        yield Ok(event);
                    }
                    let referee = generation.referee.take();
                    let answer = Answer { provider: &generation.candidate, request: &request, tokens: &tokens, commitment: &commitment, text_matches: true, constraint_holds: true, leaves: generation.leaves() };
                    let outcome = state.auditor.judge(&answer, chat.mode, referee).await;
                    let mut info = proofmesh_info(&chat, &generation, &commitment, &outcome);
                    if !state.auditor.deliverable(&outcome.verdict()) {
                        yield Ok(withheld_event(&outcome, &info));
                        return;
                    }
                    let price = price(&state, &chat, &commitment, tokens.len());
                    if let Some(id) = audit_id {
                        let audited = release(&state, &answer, id, &arrival, &mut info, price).await;
                        if let Some(outcome) = audited.filter(|o| !state.auditor.deliverable(&o.verdict())) {
                            yield Ok(withheld_event(&outcome, &info));
                            return;
                        }
                    } else {
                        state.payer.pay(generation.candidate.peer, caller_id(&arrival), price).await;
                    }
                    state.registry.succeeded(&generation.candidate.peer);
                    // What the provider signed (and the audit checked), not its unsigned claims.
                    let closing = chunks.closing(&commitment.commitment, tokens.len(), &info, chat.include_usage);
                    for event in closing {
                        yield Ok(event);
                    }
                    return;
                }
                GenerateFrame::Error { message, .. } => {
                    tracing::warn!(provider = %generation.candidate.peer, %message, "provider failed mid-stream");
                    let error = ApiError::provider_failed("The provider failed while generating");
                    let event = json_event(&error.body());
                    failover::record(&state.registry, &generation.candidate, &Failure::Broke(error));
                    yield Ok(event);
                    return;
                }
                GenerateFrame::Accepted { .. } => {
                    yield Ok(json_event(&ApiError::provider_failed("The provider violated the protocol").body()));
                    return;
                }
            }
        }
    }
}

/// The provider was seen failing `failure` while its answer streamed: it is penalised, and the
/// stream ends with this error event.
fn caught(state: &AppState, generation: &Generation, failure: AuditFailure) -> Event {
    state.auditor.observed(&generation.candidate.peer, failure);
    json_event(&ApiError::verification_failed(&format!("failed:{failure}")).body())
}

/// The chunks of one streamed answer, in the shape of the API it was asked through.
#[derive(Debug, Clone)]
struct Chunks {
    id: String,
    created: u64,
    model: String,
    surface: Surface,
    /// Characters of text sent so far (a text completion's `text_offset`).
    sent: usize,
    /// With tools: the answer so far, held back until it can be read as calls or a reply.
    held: Option<Held>,
}

/// What a streamed answer to a request with tools holds back until its end.
#[derive(Debug, Clone, Default)]
struct Held {
    text: String,
    logprobs: Vec<TokenLogprob>,
}

impl Chunks {
    fn new(chat: &ValidatedChat, request: &GenerateRequest) -> Self {
        Self {
            id: completion_id(&request.request_id),
            created: unix_now(),
            model: chat.model.clone(),
            surface: chat.surface.clone(),
            sent: 0,
            held: chat.tools.is_some().then(Held::default),
        }
    }

    /// One chunk carrying `delta`.
    fn chunk(&self, delta: Delta, finish_reason: Option<&'static str>) -> ChatCompletionChunk {
        ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices: vec![ChunkChoice {
                index: 0,
                delta,
                finish_reason,
                logprobs: None,
            }],
            usage: None,
            proofmesh: None,
        }
    }

    /// `chunk` as an event of this stream's API.
    fn event(&mut self, chunk: ChatCompletionChunk) -> Event {
        match &self.surface {
            Surface::Chat => json_event(&chunk),
            Surface::Text { .. } => {
                let chars = chunk
                    .choices
                    .first()
                    .and_then(|c| c.delta.content.as_deref())
                    .map_or(0, |t| t.chars().count());
                let event = json_event(&TextCompletion::from_chunk(chunk, self.sent));
                self.sent += chars;
                event
            }
        }
    }

    /// The event carrying new `text`, and its tokens' log-probabilities when asked for; none
    /// while an answer with tools is held back.
    fn content(&mut self, text: String, logprobs: Option<ChoiceLogprobs>) -> Option<Event> {
        if let Some(held) = &mut self.held {
            held.text.push_str(&text);
            held.logprobs
                .extend(logprobs.into_iter().flat_map(|l| l.content));
            return None;
        }
        Some(self.content_event(text, logprobs))
    }

    fn content_event(&mut self, text: String, logprobs: Option<ChoiceLogprobs>) -> Event {
        let mut chunk = self.chunk(
            Delta {
                content: Some(text),
                ..Delta::default()
            },
            None,
        );
        chunk.choices[0].logprobs = logprobs;
        self.event(chunk)
    }

    /// The first event: the role (chat), or the echoed prompt (text, with `echo`).
    fn opening(&mut self) -> Option<Event> {
        match &self.surface {
            // An answer that may be calls opens with no content, as OpenAI's do.
            Surface::Chat => Some(json_event(&self.chunk(
                Delta {
                    role: Some("assistant"),
                    content: self.held.is_none().then(String::new),
                    tool_calls: None,
                },
                None,
            ))),
            Surface::Text { echo: None } => None,
            Surface::Text { echo: Some(prompt) } => {
                let prompt = prompt.clone();
                Some(self.content_event(prompt, None))
            }
        }
    }

    /// The last events: the finish chunk carrying `proofmesh` (what the provider signed, and
    /// the audit checked, not its unsigned claims), the usage chunk when asked for, `[DONE]`.
    fn closing(
        &mut self,
        signed: &Commitment,
        completion_tokens: usize,
        info: &ProofmeshInfo,
        include_usage: bool,
    ) -> Vec<Event> {
        let mut finish_reason = signed.finish_reason.as_openai();
        let mut events = Vec::new();
        if let Some(held) = self.held.take() {
            let answered = tools::read_answer(&held.text, finish_reason);
            finish_reason = answered.finish_reason;
            let logprobs = (!held.logprobs.is_empty()).then_some(ChoiceLogprobs {
                content: held.logprobs,
            });
            let calls = answered.calls.map(|calls| {
                calls
                    .into_iter()
                    .zip(0..)
                    .map(|(call, index)| DeltaToolCall {
                        index,
                        id: call.id,
                        kind: "function",
                        function: call.function,
                    })
                    .collect()
            });
            let mut chunk = self.chunk(
                Delta {
                    content: answered.content,
                    tool_calls: calls,
                    ..Delta::default()
                },
                None,
            );
            chunk.choices[0].logprobs = logprobs;
            events.push(self.event(chunk));
        }
        let mut last = self.chunk(Delta::default(), Some(finish_reason));
        last.proofmesh = Some(info.clone());
        events.push(self.event(last));
        if include_usage {
            let mut usage = self.chunk(Delta::default(), None);
            usage.choices.clear();
            usage.usage = Some(Usage::new(signed.prompt_tokens, completion_tokens as u32));
            usage.proofmesh = Some(info.clone());
            events.push(self.event(usage));
        }
        events.push(Event::default().data("[DONE]"));
        events
    }
}

/// A finished answer's JSON body, in the shape of the API it was asked through.
fn body(chat: &ValidatedChat, completion: ChatCompletion) -> Response {
    match &chat.surface {
        Surface::Chat => axum::Json(completion).into_response(),
        Surface::Text { echo } => {
            axum::Json(TextCompletion::from_chat(completion, echo.as_deref())).into_response()
        }
    }
}

/// What the retry policy hears of an answer that may not be released.
fn withheld(outcome: &AuditOutcome, verdict: String) -> Failure {
    if outcome.failed() {
        Failure::Failed(verdict)
    } else {
        Failure::Unverified(verdict)
    }
}

/// The error event that ends a stream whose answer may not be released, with the audit's
/// `proofmesh` object.
fn withheld_event(outcome: &AuditOutcome, info: &ProofmeshInfo) -> Event {
    let error = if outcome.failed() {
        ApiError::verification_failed(&info.verdict)
    } else {
        ApiError::unverified(&info.verdict)
    };
    let mut body = serde_json::to_value(error.body()).unwrap_or_default();
    body["proofmesh"] = serde_json::to_value(info).unwrap_or_default();
    json_event(&body)
}

/// Events a stream may run ahead of a client that reads slowly.
const STREAM_BUFFER: usize = 64;

/// Runs `events` in a task of its own, `STREAM_BUFFER` events ahead of the client. A client
/// that stops reading cannot hold the provider, the referee and the gateway's place past the
/// request's deadline: then the task ends and drops them all (the client, when it reads again,
/// finds the stream cut short, without `[DONE]`).
fn detached(
    events: impl Stream<Item = Result<Event, Infallible>> + Send + 'static,
    deadline: Deadline,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(STREAM_BUFFER);
    tokio::spawn(async move {
        futures::pin_mut!(events);
        loop {
            // A client that hung up ends the stream at once, not at its next event.
            let event = tokio::select! {
                event = events.next() => event,
                () = tx.closed() => return,
            };
            let Some(event) = event else { return };
            match tokio::time::timeout(deadline.remaining(), tx.send(event)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return,
                Err(_) => {
                    tracing::warn!(
                        "a client stopped reading its stream; ending it at the deadline"
                    );
                    return;
                }
            }
        }
    });
    async_stream::stream! {
        while let Some(event) = rx.recv().await {
            yield event;
        }
    }
}

/// Passes `events` through until the drain deadline; a stream still running then ends with a
/// `shutting_down` error event (and no `[DONE]`), which SDKs raise as an error.
fn until_drained(
    events: impl Stream<Item = Result<Event, Infallible>>,
    lifecycle: Lifecycle,
) -> impl Stream<Item = Result<Event, Infallible>> {
    async_stream::stream! {
        futures::pin_mut!(events);
        loop {
            tokio::select! {
                item = events.next() => match item {
                    Some(item) => yield item,
                    None => return,
                },
                () = lifecycle.deadline() => {
                    tracing::warn!("drain deadline passed; ending a running stream");
                    yield Ok(json_event(&ApiError::shutting_down().body()));
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    /// Sets its flag when dropped: stands for the provider stream and the gateway's place.
    struct Held(Arc<AtomicBool>);

    impl Drop for Held {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    /// A [`Held`] and the flag it sets.
    fn held() -> (Held, Arc<AtomicBool>) {
        let released = Arc::new(AtomicBool::new(false));
        (Held(Arc::clone(&released)), released)
    }

    #[tokio::test]
    async fn a_client_that_hangs_up_releases_everything_at_once() {
        let (held, released) = held();
        let silent = async_stream::stream! {
            let _held = held;
            yield Ok(Event::default().data("first"));
            futures::future::pending::<()>().await;
        };
        let deadline = Deadline::new(Instant::now(), Duration::from_secs(300));
        let mut stream = Box::pin(detached(silent, deadline));
        assert!(stream.next().await.is_some());
        drop(stream);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            released.load(Ordering::SeqCst),
            "the generation outlived its client"
        );
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_releases_everything_at_the_deadline() {
        let (held, released) = held();
        let endless = async_stream::stream! {
            let _held = held;
            loop {
                yield Ok(Event::default().data("token"));
                tokio::task::yield_now().await;
            }
        };
        let deadline = Deadline::new(Instant::now(), Duration::from_millis(300));
        let stream = detached(endless, deadline);
        futures::pin_mut!(stream);
        // The client reads one event, then nothing more, and keeps the connection.
        assert!(stream.next().await.is_some());
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(
            released.load(Ordering::SeqCst),
            "the generation outlived its deadline"
        );
    }
}
