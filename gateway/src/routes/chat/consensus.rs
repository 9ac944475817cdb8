//! `verification_mode: "consensus"`: the same request (same request id, same seed) goes to
//! several providers at once; the auditor compares their answers and has each audited where
//! they differ ([`crate::auditor::consensus`]). Nothing reaches the client before that, so a
//! streamed request gets the chosen answer as one burst of events once it is decided.

use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use proofmesh_shared::constraint::Guide;
use proofmesh_shared::protocol::GenerateRequest;

use super::{
    Arrival, Chunks, answer_of, body, caller_id, completion, price, proofmesh_info, record_usage,
    set_headers, withheld,
};
use crate::auditor::consensus::Reconciliation;
use crate::auditor::{Answer, VerificationMode};
use crate::error::ApiError;
use crate::failover::{Attempts, Failure};
use crate::inference::{self, Completed, Generation};
use crate::openai::request::ValidatedChat;
use crate::openai::response::{ConsensusInfo, ConsensusMember, ProofmeshInfo};
use crate::state::AppState;

/// Answers a `consensus` request: gathers the answers, has them judged, pays each provider whose
/// answer may be released, and returns the first such answer, as JSON or as a stream.
pub(super) async fn respond(
    state: &AppState,
    chat: &ValidatedChat,
    request: &GenerateRequest,
    guide: Option<&Guide>,
    attempts: &mut Attempts<'_>,
    arrival: &Arrival,
) -> Result<Response, ApiError> {
    let wanted = state.auditor.policy().consensus_providers;
    if attempts.left() < wanted {
        return Err(too_few(wanted, attempts.left(), "can take it"));
    }
    let finished = gather(state, request, guide, attempts, arrival, wanted).await?;
    let answers: Vec<Answer<'_>> = finished
        .iter()
        .map(|(generation, done)| answer_of(generation, request, done))
        .collect();
    let judged = state.auditor.reconcile(&answers).await;
    let consensus = summary(&finished, &judged);
    let allow_unrefereed = state.auditor.policy().allow_unrefereed;
    let mut chosen = None;
    let mut payments = Vec::new();
    for (i, ((generation, done), outcome)) in finished.iter().zip(&judged.outcomes).enumerate() {
        let verdict = consensus.providers[i].verdict.clone();
        // Benched meanwhile (a fraud of its proven elsewhere while it generated): its answer
        // is not taken on its word.
        let benched = state
            .auditor
            .book()
            .get(&generation.candidate.peer)
            .benched();
        if benched || !judged.releasable(i, allow_unrefereed) {
            attempts.failed(&generation.candidate, withheld(outcome, verdict));
            continue;
        }
        // Each provider whose answer may be released did the work the client asked for.
        let price = price(state, chat, &done.commitment, done.tokens.len());
        payments.push((generation.candidate.peer, price));
        attempts.succeeded(&generation.candidate);
        chosen.get_or_insert(i);
    }
    // In a task of its own: a client that hangs up now does not leave the payments half made.
    let (payer, caller) = (state.payer.clone(), caller_id(arrival));
    tokio::spawn(async move {
        for (provider, price) in payments {
            payer.pay(provider, caller.clone(), price).await;
        }
    });
    let Some(chosen) = chosen else {
        return Err(attempts.error());
    };
    let (generation, done) = &finished[chosen];
    let outcome = &judged.outcomes[chosen];
    let mut info = proofmesh_info(chat, generation, &done.commitment, outcome);
    info.verdict
        .clone_from(&consensus.providers[chosen].verdict);
    info.consensus = Some(consensus);
    let mut response = if chat.stream {
        stream(chat, request, done, &info)
    } else {
        body(chat, completion(chat, request, done, &info, None))
    };
    set_headers(response.headers_mut(), &info, true);
    Ok(response)
}

/// Runs the request on `wanted` distinct providers (the retry policy's order, each at most
/// once) until that many finished; a provider that breaks is replaced while the policy offers
/// another. Fewer than `wanted` answers is no consensus: 503.
async fn gather(
    state: &AppState,
    request: &GenerateRequest,
    guide: Option<&Guide>,
    attempts: &mut Attempts<'_>,
    arrival: &Arrival,
    wanted: usize,
) -> Result<Vec<(Generation, Completed)>, ApiError> {
    let mut finished = Vec::with_capacity(wanted);
    while finished.len() < wanted {
        let mut running = Vec::new();
        for _ in finished.len()..wanted {
            let started =
                inference::start(state, attempts, request, guide, VerificationMode::Consensus);
            match started.await {
                Ok(mut generation) => {
                    generation.bill_to(arrival.caller.clone());
                    running.push(generation);
                }
                // The request itself was refused (too long a context, …): that says more.
                Err(e)
                    if running.is_empty()
                        && (finished.is_empty() || e.status().is_client_error()) =>
                {
                    return Err(e);
                }
                Err(_) if running.is_empty() => {
                    return Err(too_few(wanted, finished.len(), "answered"));
                }
                Err(_) => break,
            }
        }
        let results = futures::future::join_all(running.iter_mut().map(Generation::collect)).await;
        for (generation, result) in running.into_iter().zip(results) {
            match result {
                Ok(done) => {
                    record_usage(state, &generation, done.tokens.len(), arrival);
                    finished.push((generation, done));
                }
                Err(e) => attempts.failed(&generation.candidate, Failure::from_error(e)),
            }
        }
    }
    Ok(finished)
}

/// No consensus: fewer than `wanted` providers `did` what it takes.
fn too_few(wanted: usize, found: usize, did: &str) -> ApiError {
    ApiError::no_provider(format!(
        "verification_mode \"consensus\" needs {wanted} providers of this model, and only \
         {found} {did} (benched and unauditable providers are left out); retry later, or ask \
         for another verification_mode"
    ))
}

/// Who answered, and each answer's verdict.
fn summary(finished: &[(Generation, Completed)], judged: &Reconciliation) -> ConsensusInfo {
    let providers = finished
        .iter()
        .zip(&judged.outcomes)
        .map(|((generation, done), outcome)| ConsensusMember {
            provider: generation.candidate.peer.to_string(),
            verdict: if judged.agreed && !judged.audited {
                "agreed".into()
            } else {
                outcome.verdict().label()
            },
            merkle_root: hex::encode(done.commitment.commitment.merkle_root),
        })
        .collect();
    ConsensusInfo {
        providers,
        agreed: judged.agreed,
        divergence: judged.divergence,
    }
}

/// The chosen answer as server-sent events: the role, the text, the finish chunk carrying
/// `proofmesh`, the usage chunk when asked for, and `[DONE]`.
fn stream(
    chat: &ValidatedChat,
    request: &GenerateRequest,
    done: &Completed,
    info: &ProofmeshInfo,
) -> Response {
    let mut chunks = Chunks::new(chat, request);
    let mut events: Vec<Event> = chunks.opening().into_iter().collect();
    events.extend(chunks.content(done.text.clone(), None));
    events.extend(chunks.closing(
        &done.commitment.commitment,
        done.tokens.len(),
        info,
        chat.include_usage,
    ));
    let events = events
        .into_iter()
        .map(Ok::<Event, std::convert::Infallible>);
    Sse::new(futures::stream::iter(events)).into_response()
}
