//! Verification orchestration: what the gateway does with a commitment.
//!
//! `none`: the signature and the commitment's binding to this request and these tokens are still
//! checked. `merkle`: additionally draw the challenge from the gateway's secret and the signed
//! root (more steps for a provider on probation), have the provider open those leaves and the
//! referee that followed the answer report on the same steps, then run both layers of the audit
//! rule ([`proofmesh_shared::verify`]). A borderline statistical result opens more steps before
//! deciding. A referee that fails is replaced (it is never the provider's fault), one that is
//! busy is asked again for a while; with no referee at all the verdict says so (`unrefereed`).
//!
//! A verdict about the provider changes its reputation; a failure benches it, is logged with its
//! evidence and, when an evidence directory is set, written down as a fraud proof.

use std::time::{Duration, Instant};

use libp2p::PeerId;
use proofmesh_shared::commit::{SignedCommitment, StepLeaf};
use proofmesh_shared::protocol::{GenerateRequest, OpenLeavesRequest, OpenLeavesResponse};
use proofmesh_shared::verify::{
    AuditFailure, AuditRound, AuditVerdict, Challenge, DEFAULT_CHALLENGE_COUNT, FraudProof,
    Judgement, PROBATION_CHALLENGE_COUNT, RefereeStep, SignedEvidence, Statistics, Tier,
    check_commitment, check_evidence, check_openings, judge,
};

use crate::metrics::VerdictLabels;
use crate::openai::request::VerificationMode;
use crate::referee::{self, RefereeSession};
use crate::registry::Candidate;
use crate::state::AppState;

/// Default for how long a provider whose answer failed verification is kept out of routing.
pub const FAILED_AUDIT_COOLDOWN: Duration = Duration::from_secs(300);
/// Default for how many audits a provider must pass before it is challenged at the normal rate.
pub const PROBATION_AUDITS: u32 = 10;
/// Referees tried after the first one failed, before the verdict becomes `unrefereed`.
const REFEREE_FALLBACKS: usize = 2;
/// How long an audit keeps asking referees that are busy (every re-execution context taken)
/// before it counts them as failed.
const REFEREE_BUSY_WAIT: Duration = Duration::from_secs(30);
/// The longest pause between two asks of a busy referee.
const REFEREE_BUSY_BACKOFF: Duration = Duration::from_millis(200);

/// What the audit found.
#[derive(Debug, Clone, Default)]
pub struct AuditOutcome {
    /// The verdict.
    pub verdict: Option<AuditVerdict>,
    /// The steps challenged (empty in `none` mode).
    pub challenged: Vec<u32>,
    /// Time the audit took.
    pub elapsed: Duration,
    /// The referee whose evidence was used: a peer id, or `local`.
    pub referee: Option<String>,
    /// The statistical layer's measurements, when it ran.
    pub statistics: Option<Statistics>,
    /// Bytes of evidence the audit moved: the provider's openings and the referee's evidence,
    /// as CBOR on the wire.
    pub evidence_bytes: usize,
}

impl AuditOutcome {
    /// The verdict (`unaudited` until one is reached).
    pub fn verdict(&self) -> AuditVerdict {
        self.verdict.clone().unwrap_or(AuditVerdict::Unaudited)
    }

    /// Whether the answer failed.
    pub fn failed(&self) -> bool {
        matches!(self.verdict, Some(AuditVerdict::Failed(_)))
    }
}

/// One finished answer to audit.
#[derive(Debug)]
pub struct Answer<'a> {
    /// Who served it.
    pub provider: &'a Candidate,
    /// The request sent.
    pub request: &'a GenerateRequest,
    /// The tokens streamed.
    pub tokens: &'a [u32],
    /// The provider's signed commitment.
    pub commitment: &'a SignedCommitment,
}

/// Audits one finished answer; `session` is the referee that followed it, if any.
pub async fn audit(
    state: &AppState,
    answer: &Answer<'_>,
    mode: VerificationMode,
    session: Option<RefereeSession>,
) -> AuditOutcome {
    let started = Instant::now();
    let mut outcome = AuditOutcome::default();
    let mut proof = FraudProof {
        version: FraudProof::VERSION,
        provider: answer.provider.peer.to_bytes(),
        referee: None,
        request: answer.request.clone(),
        tokens: answer.tokens.to_vec(),
        commitment: answer.commitment.clone(),
        rounds: Vec::new(),
        failure: AuditFailure::BadSignature,
    };
    let verdict = match check_commitment(
        answer.commitment,
        answer.request,
        &answer.provider.peer,
        answer.tokens,
    ) {
        Err(failure) => AuditVerdict::Failed(failure),
        Ok(()) if mode == VerificationMode::None => AuditVerdict::Unaudited,
        Ok(()) => merkle(state, answer, session, &mut outcome, &mut proof).await,
    };
    outcome.elapsed = started.elapsed();
    record(state, answer, mode, &verdict, &outcome, proof);
    outcome.verdict = Some(verdict);
    outcome
}

/// The merkle audit proper, after the commitment's exact checks passed.
async fn merkle(
    state: &AppState,
    answer: &Answer<'_>,
    session: Option<RefereeSession>,
    outcome: &mut AuditOutcome,
    proof: &mut FraudProof,
) -> AuditVerdict {
    let provider = answer.provider.peer;
    let reputation = state.registry.reputation(&provider);
    let count = if reputation.on_probation(state.probation_audits) {
        state.challenge_count.max(PROBATION_CHALLENGE_COUNT)
    } else {
        state.challenge_count
    };
    let challenge = Challenge::derive(&state.audit_secret, answer.commitment, count);
    outcome.challenged.clone_from(&challenge.indices);
    let mut session = session.or_else(|| fresh_session(state, answer, &[]));
    let (opening, evidence) = tokio::join!(open(state, &provider, answer, &challenge), async {
        match &session {
            Some(s) => Some(s.finish(answer.commitment, &challenge.indices).await),
            None => None,
        }
    });
    outcome.evidence_bytes += cbor_len(&opening);
    let leaves = match check_openings(
        answer.commitment,
        answer.request,
        answer.tokens,
        &challenge,
        &opening,
    ) {
        Ok(leaves) => leaves.to_vec(),
        Err(failure) => {
            proof.rounds.push(AuditRound {
                challenge,
                opening,
                evidence: None,
            });
            return AuditVerdict::Failed(failure);
        }
    };
    // The referee's evidence, replacing referees that fail (their fault, not the provider's).
    let mut evidence = evidence;
    let mut tried: Vec<PeerId> = Vec::new();
    let busy_until = Instant::now() + REFEREE_BUSY_WAIT;
    let mut backoff = Duration::from_millis(10);
    let usable = loop {
        let Some(current) = &session else {
            break None;
        };
        let problem = match evidence {
            Some(Ok(e)) => match check_evidence(
                &e,
                &current.choice().peer(),
                &provider,
                answer.commitment,
                answer.request,
                answer.tokens,
                &challenge,
            ) {
                Ok(Ok(())) => break Some(e),
                Ok(Err(failure)) => {
                    outcome.referee = Some(current.choice().label());
                    proof.referee = Some(current.choice().peer().to_bytes());
                    proof.rounds.push(AuditRound {
                        challenge,
                        opening,
                        evidence: Some(e),
                    });
                    return AuditVerdict::Failed(failure);
                }
                Err(problem) => problem.to_string(),
            },
            // Busy is no failure: ask again (maybe another referee) once a context may be free.
            Some(Err(referee::SessionError::Busy(_))) if Instant::now() < busy_until => {
                tracing::debug!(referee = %current.choice().label(), request = %answer.request.request_id, "referee busy; asking again");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(REFEREE_BUSY_BACKOFF);
                (session, evidence) = ask_fresh(state, answer, &tried, &challenge).await;
                continue;
            }
            Some(Err(problem)) => problem.to_string(),
            None => "no evidence".into(),
        };
        tracing::warn!(referee = %current.choice().label(), %problem, request = %answer.request.request_id, "referee failed; trying another");
        state.metrics.referee_failures.inc();
        tried.push(current.choice().peer());
        if tried.len() > REFEREE_FALLBACKS {
            break None;
        }
        (session, evidence) = ask_fresh(state, answer, &tried, &challenge).await;
    };
    let (Some(evidence), Some(session)) = (usable, session) else {
        return AuditVerdict::Unrefereed;
    };
    outcome.referee = Some(session.choice().label());
    outcome.evidence_bytes += cbor_len(&evidence);
    proof.referee = Some(session.choice().peer().to_bytes());
    let tier = Tier::between(
        &answer.commitment.commitment.numerics,
        &evidence.evidence.numerics,
    );
    let mut opened: Vec<RefereeStep> = evidence.evidence.opened.clone();
    let margins = evidence.evidence.margins.clone();
    proof.rounds.push(AuditRound {
        challenge: challenge.clone(),
        opening,
        evidence: Some(evidence),
    });
    let mut all_leaves: Vec<StepLeaf> = leaves;
    let mut judgement = judge(&all_leaves, &opened, &margins, tier);
    if let Judgement::Borderline(_) = judgement {
        // Open as many steps again before deciding.
        let wider = Challenge::extend(
            &state.audit_secret,
            answer.commitment,
            &challenge,
            DEFAULT_CHALLENGE_COUNT,
        );
        let extra = Challenge {
            indices: wider
                .indices
                .iter()
                .copied()
                .filter(|i| !challenge.indices.contains(i))
                .collect(),
        };
        if !extra.indices.is_empty() {
            outcome.challenged.clone_from(&wider.indices);
            let before = proof.rounds.len();
            let second = second_round(state, answer, &session, &extra, proof).await;
            if let Some(round) = proof.rounds.get(before) {
                outcome.evidence_bytes += cbor_len(&round.opening) + cbor_len(&round.evidence);
            }
            match second {
                Ok((more_leaves, more_opened)) => {
                    all_leaves.extend(more_leaves);
                    opened.extend(more_opened);
                    judgement = judge(&all_leaves, &opened, &margins, tier);
                }
                Err(Some(failure)) => return AuditVerdict::Failed(failure),
                // The referee failed on the second round: decide on the first.
                Err(None) => {}
            }
        }
    }
    outcome.statistics = Some(judgement.statistics().clone());
    match judgement {
        Judgement::Fail(failure, _) => AuditVerdict::Failed(failure),
        Judgement::Pass(_) | Judgement::Borderline(_) => AuditVerdict::Passed,
    }
}

/// Opens `extra` steps on both sides. `Err(Some)` is the provider's failure, `Err(None)` the
/// referee's.
async fn second_round(
    state: &AppState,
    answer: &Answer<'_>,
    session: &RefereeSession,
    extra: &Challenge,
    proof: &mut FraudProof,
) -> Result<(Vec<StepLeaf>, Vec<RefereeStep>), Option<AuditFailure>> {
    let provider = answer.provider.peer;
    let (opening, evidence) = tokio::join!(
        open(state, &provider, answer, extra),
        session.open(&extra.indices)
    );
    let leaves = match check_openings(
        answer.commitment,
        answer.request,
        answer.tokens,
        extra,
        &opening,
    ) {
        Ok(leaves) => leaves.to_vec(),
        Err(failure) => {
            proof.rounds.push(AuditRound {
                challenge: extra.clone(),
                opening,
                evidence: None,
            });
            return Err(Some(failure));
        }
    };
    let evidence: SignedEvidence = evidence.map_err(|_| None)?;
    match check_evidence(
        &evidence,
        &session.choice().peer(),
        &provider,
        answer.commitment,
        answer.request,
        answer.tokens,
        extra,
    ) {
        Ok(Ok(())) => {}
        Ok(Err(failure)) => return Err(Some(failure)),
        Err(_) => return Err(None),
    }
    let opened = evidence.evidence.opened.clone();
    proof.rounds.push(AuditRound {
        challenge: extra.clone(),
        opening,
        evidence: Some(evidence),
    });
    Ok((leaves, opened))
}

/// Asks the provider to open `challenge`; a failure to answer counts as a refusal.
async fn open(
    state: &AppState,
    provider: &PeerId,
    answer: &Answer<'_>,
    challenge: &Challenge,
) -> OpenLeavesResponse {
    let request = OpenLeavesRequest {
        request_id: answer.request.request_id,
        indices: challenge.indices.clone(),
    };
    match state.net.open_leaves(*provider, request).await {
        Ok(response) => response,
        Err(e) => {
            tracing::warn!(%provider, error = %e, "leaf opening failed");
            OpenLeavesResponse::Refused {
                reason: e.to_string(),
            }
        }
    }
}

/// A referee that did not follow the answer, fed all of it at once.
fn fresh_session(
    state: &AppState,
    answer: &Answer<'_>,
    exclude: &[PeerId],
) -> Option<RefereeSession> {
    let choice = referee::choose(state, answer.provider, exclude)?;
    let session = RefereeSession::start(state, choice, answer.request, answer.provider.peer);
    session.push_all(answer.tokens);
    Some(session)
}

/// A fresh referee's evidence on `challenge`, with the session for later openings.
async fn ask_fresh(
    state: &AppState,
    answer: &Answer<'_>,
    exclude: &[PeerId],
    challenge: &Challenge,
) -> (
    Option<RefereeSession>,
    Option<Result<SignedEvidence, referee::SessionError>>,
) {
    let session = fresh_session(state, answer, exclude);
    let evidence = match &session {
        Some(s) => Some(s.finish(answer.commitment, &challenge.indices).await),
        None => None,
    };
    (session, evidence)
}

/// Size of a value as CBOR, as it travels between peers.
fn cbor_len<T: serde::Serialize>(value: &T) -> usize {
    let mut bytes = Vec::new();
    match ciborium::into_writer(value, &mut bytes) {
        Ok(()) => bytes.len(),
        Err(_) => 0,
    }
}

/// Metrics, reputation, logs and the fraud proof.
fn record(
    state: &AppState,
    answer: &Answer<'_>,
    mode: VerificationMode,
    verdict: &AuditVerdict,
    outcome: &AuditOutcome,
    mut proof: FraudProof,
) {
    let provider = answer.provider.peer;
    let labels = match verdict {
        AuditVerdict::Unaudited => VerdictLabels {
            verdict: "unaudited",
            reason: String::new(),
        },
        AuditVerdict::Unrefereed => VerdictLabels {
            verdict: "unrefereed",
            reason: String::new(),
        },
        AuditVerdict::Passed => VerdictLabels {
            verdict: "passed",
            reason: String::new(),
        },
        AuditVerdict::Failed(failure) => VerdictLabels {
            verdict: "failed",
            reason: failure.to_string(),
        },
    };
    state.metrics.audits.get_or_create(&labels).inc();
    if mode == VerificationMode::Merkle {
        state
            .metrics
            .audit_seconds
            .observe(outcome.elapsed.as_secs_f64());
    }
    match verdict {
        AuditVerdict::Passed => state.registry.record_audit(&provider, true),
        AuditVerdict::Failed(failure) => {
            state.registry.record_audit(&provider, false);
            state.registry.bench(&provider, state.failed_audit_cooldown);
            proof.failure = *failure;
            let saved = save_proof(state, &proof);
            let stats = outcome.statistics.as_ref();
            tracing::warn!(
                %provider,
                request = %answer.request.request_id,
                %failure,
                model = %answer.request.model_digest,
                merkle_root = %hex::encode(answer.commitment.commitment.merkle_root),
                steps = answer.commitment.commitment.steps,
                numerics = %answer.commitment.commitment.numerics,
                challenged = ?outcome.challenged,
                referee = ?outcome.referee,
                tier = ?stats.map(|s| s.tier),
                median_distance = ?stats.map(|s| s.median_distance),
                max_distance = ?stats.map(|s| s.max_distance),
                excess_margin = ?stats.map(|s| s.excess_margin),
                max_margin = ?stats.map(|s| s.max_margin),
                proof = ?saved,
                "audit failed; provider benched"
            );
        }
        AuditVerdict::Unaudited | AuditVerdict::Unrefereed => {}
    }
}

/// Writes the proof as CBOR into the evidence directory; returns its path.
fn save_proof(state: &AppState, proof: &FraudProof) -> Option<std::path::PathBuf> {
    let dir = state.evidence_dir.as_ref()?;
    let path = dir.join(format!(
        "{}-{}.cbor",
        crate::openai::response::unix_now(),
        proof.request.request_id
    ));
    let mut bytes = Vec::new();
    let written = ciborium::into_writer(proof, &mut bytes)
        .map_err(|e| e.to_string())
        .and_then(|()| std::fs::create_dir_all(dir).map_err(|e| e.to_string()))
        .and_then(|()| std::fs::write(&path, &bytes).map_err(|e| e.to_string()));
    match written {
        Ok(()) => Some(path),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot write the fraud proof");
            None
        }
    }
}
