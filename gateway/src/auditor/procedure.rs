//! The audit procedure: what the gateway does with one answer's commitment, step by step.
//!
//! 1. Exact checks on the commitment ([`check_commitment`]), and that it declares the numerics
//!    class the provider advertised and was routed on.
//! 2. `none` stops here (`unaudited`). Otherwise the challenge is drawn from the gateway's
//!    secret and the signed root (more steps for a provider on probation).
//! 3. The provider opens the challenged leaves; an opening lost to the network is asked again
//!    before anything is concluded, and one never received makes the audit `inconclusive`,
//!    not a fraud. The opening must carry the provider's signature; its leaves are checked
//!    exactly ([`check_openings`]). A failure here is proven by the provider's own signatures.
//! 4. A referee the gateway chose reports on the same steps. A referee that fails, lies about
//!    its class or sends unusable evidence is replaced; one that is busy is asked again for a
//!    while. No trusted referee: `unrefereed`.
//! 5. Its evidence is judged (exact facts, then the statistical rule in the tier the gateway's
//!    own choice of referee gives); a borderline result opens more steps first. An answer
//!    judged in a tier the policy does not accept is not `passed`.
//! 6. An accusation by a peer referee is never acted on alone: a second referee with another
//!    key (the gateway's own engine first) judges the same steps. If it agrees the failure is
//!    confirmed. If the gateway's engine finds the answer sound, the accuser is struck and the
//!    engine's verdict stands; if another peer does, one peer's word stands against another's
//!    and the audit is `inconclusive` (nobody struck or penalised), as it is with no second
//!    referee. The gateway's own engine needs no second opinion: the gateway trusts what it
//!    checked itself.
//!
//! The procedure talks to the world through two seams, [`LeafOpener`] (the provider) and
//! [`Referees`] / [`Witness`] (referees), so it runs in unit tests without a model or a mesh.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use libp2p::PeerId;
use proofmesh_shared::commit::{SignedCommitment, StepLeaf};
use proofmesh_shared::protocol::{GenerateRequest, OpenLeavesRequest, SignedOpening};
use proofmesh_shared::verify::{
    AuditFailure, AuditRound, AuditVerdict, Challenge, DEFAULT_CHALLENGE_COUNT, EvidenceError,
    FraudProof, Judgement, RefereeStep, SignedEvidence, Statistics, Tier, check_commitment,
    check_evidence, check_openings, check_streamed_leaves, judge, opening_is_signed,
};

use super::VerificationMode;
use super::policy::AuditPolicy;
use super::pool::Choice;
use super::session::{RefereeSession, SessionError};
use crate::registry::Candidate;

/// Referees tried after the first one failed, before the verdict becomes `unrefereed`.
const REFEREE_FALLBACKS: usize = 2;
/// How long an audit keeps asking referees that are busy (every re-execution context taken)
/// before it counts them as failed.
const REFEREE_BUSY_WAIT: Duration = Duration::from_secs(30);
/// The longest pause between two asks of a busy referee.
const REFEREE_BUSY_BACKOFF: Duration = Duration::from_millis(200);
/// Times a leaf opening is asked for before the audit gives up on the network: a lost request
/// or reply is retried, and only a provider that stays silent this often is not heard.
const OPEN_ATTEMPTS: u32 = 4;
/// Pause before the first repeat of a leaf opening; doubled each time.
const OPEN_BACKOFF: Duration = Duration::from_millis(200);
/// The longest pause between two asks for a leaf opening.
const OPEN_BACKOFF_MAX: Duration = Duration::from_secs(10);

/// One finished answer to audit.
#[derive(Debug, Clone, Copy)]
pub struct Answer<'a> {
    /// Who served it, as the gateway routed it (with the class it advertised).
    pub provider: &'a Candidate,
    /// The request sent.
    pub request: &'a GenerateRequest,
    /// The tokens streamed.
    pub tokens: &'a [u32],
    /// The provider's signed commitment.
    pub commitment: &'a SignedCommitment,
    /// Whether every piece of text the provider streamed was the detokenization of its
    /// tokens, as the gateway computed it with a vocabulary it trusts.
    pub text_matches: bool,
    /// Whether every token was one the request's constraint allowed at its step, as the
    /// gateway walked it over its own vocabulary (always, for an unconstrained request).
    pub constraint_holds: bool,
    /// The step leaves the provider streamed with its tokens, when the request asked for them
    /// (their log-probabilities go to the client, so they must be the committed ones).
    pub leaves: Option<&'a [StepLeaf]>,
}

/// Asks a provider to open committed leaves.
#[async_trait]
pub trait LeafOpener: Send + Sync {
    /// The provider's signed answer; `Err` when nothing came back (network, timeout).
    async fn open(
        &self,
        provider: PeerId,
        request: OpenLeavesRequest,
    ) -> Result<SignedOpening, String>;
}

/// A referee following one answer.
#[async_trait]
pub trait Witness: Send + Sync {
    /// Who it is, and the class the gateway chose it for.
    fn choice(&self) -> &Choice;
    /// Evidence on `indices`, once the whole answer was pushed.
    async fn finish(&self, indices: &[u32]) -> Result<SignedEvidence, SessionError>;
    /// Evidence on further steps.
    async fn open(&self, indices: &[u32]) -> Result<SignedEvidence, SessionError>;
}

#[async_trait]
impl Witness for RefereeSession {
    fn choice(&self) -> &Choice {
        RefereeSession::choice(self)
    }

    async fn finish(&self, indices: &[u32]) -> Result<SignedEvidence, SessionError> {
        RefereeSession::finish(self, indices).await
    }

    async fn open(&self, indices: &[u32]) -> Result<SignedEvidence, SessionError> {
        RefereeSession::open(self, indices).await
    }
}

/// Where fresh referees come from.
pub trait Referees: Send + Sync {
    /// A referee for `answer` (fed all of it) that is none of `exclude` and not the provider,
    /// the gateway's own engine first; `None` when no trusted referee is left.
    fn fresh(&self, answer: &Answer<'_>, exclude: &[PeerId]) -> Option<Box<dyn Witness>>;
}

/// What the audit found, and what follows from it.
#[derive(Debug, Default)]
pub struct Report {
    /// The verdict.
    pub verdict: Option<AuditVerdict>,
    /// The steps challenged (empty in `none` mode).
    pub challenged: Vec<u32>,
    /// The referee whose evidence decided.
    pub referee: Option<Choice>,
    /// The tier of that referee's judgement.
    pub tier: Option<Tier>,
    /// The statistical layer's measurements, when it ran.
    pub statistics: Option<Statistics>,
    /// Bytes of evidence the audit moved, as CBOR on the wire.
    pub evidence_bytes: usize,
    /// Whether the provider is to be penalised: its failure is proven by its own signatures,
    /// seen by the gateway itself, or confirmed by two referees.
    pub penalise: bool,
    /// The written-down failure, when there is one to write down.
    pub proof: Option<FraudProof>,
    /// Referees whose accusation another referee confirmed.
    pub confirmed: Vec<PeerId>,
    /// Referees whose accusation another referee refuted.
    pub struck: Vec<PeerId>,
    /// Referees replaced because they delivered no usable evidence.
    pub referee_failures: usize,
    /// Whether the audit was left inconclusive because the provider never opened its leaves.
    pub unopened: bool,
}

impl Report {
    /// The verdict (`unaudited` until one is reached).
    pub fn verdict(&self) -> AuditVerdict {
        self.verdict.clone().unwrap_or(AuditVerdict::Unaudited)
    }
}

/// One audit's fixed inputs.
pub struct Procedure<'a> {
    /// The gateway's challenge secret.
    pub secret: &'a [u8; 32],
    /// What the gateway requires.
    pub policy: &'a AuditPolicy,
    /// Whether the provider is on probation (more steps challenged).
    pub on_probation: bool,
    /// The provider side.
    pub opener: &'a dyn LeafOpener,
    /// The referee side.
    pub referees: &'a dyn Referees,
    /// How long a leaf opening is asked for before the audit gives up on it (besides the
    /// attempts every audit makes): longer for an answer already released, whose provider
    /// must not get away with silence.
    pub open_patience: Duration,
    /// A step challenged besides those drawn (where the answers of a consensus first differ).
    pub also_open: Option<u32>,
}

impl std::fmt::Debug for Procedure<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Procedure")
            .field("on_probation", &self.on_probation)
            .finish_non_exhaustive()
    }
}

/// A referee's judgement of the answer.
#[derive(Debug)]
enum Opinion {
    Pass(Statistics),
    /// Within the limits, but close enough to open more steps before deciding.
    Borderline(Statistics),
    Fail(AuditFailure, Option<Statistics>),
}

/// How a borderline first judgement's second round went.
enum SecondRound {
    /// No further steps, or the referee or the network could not take part: the first
    /// round's judgement stands.
    Skipped,
    /// A round was added; this many bytes of evidence moved.
    Added(usize),
    /// The provider's opening of the new steps never came: a borderline answer it would not
    /// open further is not passed (nor, the network being possibly to blame, penalised).
    Unopened,
    /// The provider's opening of the new steps failed an exact check (the bool: whether it
    /// was signed, so that it can go into a proof).
    ProviderFailed(AuditFailure, bool),
}

/// A referee heard on every round: its evidence, one per round.
struct Heard {
    witness: Box<dyn Witness>,
    evidence: Vec<SignedEvidence>,
}

impl Procedure<'_> {
    /// Audits `answer`; `session` is the referee that followed it as it streamed, if any.
    pub async fn run(
        &self,
        answer: &Answer<'_>,
        mode: VerificationMode,
        session: Option<Box<dyn Witness>>,
    ) -> Report {
        let mut report = Report::default();
        let provider = answer.provider.peer;
        if let Err(failure) =
            check_commitment(answer.commitment, answer.request, &provider, answer.tokens)
        {
            // Received over the provider's own connection, so it is the provider's doing; but
            // only what it signed for this request and these tokens goes into a proof.
            let proof = failure.is_signed_by_provider().then(Vec::new);
            return fail(report, failure, None, answer, proof);
        }
        // Seen by the gateway itself, but not provable to anyone else: penalised, no proof.
        if answer.commitment.commitment.numerics != answer.provider.card.numerics {
            return fail(report, AuditFailure::NumericsMismatch, None, answer, None);
        }
        if !answer.text_matches {
            return fail(report, AuditFailure::TextMismatch, None, answer, None);
        }
        if !answer.constraint_holds {
            return fail(report, AuditFailure::ConstraintViolated, None, answer, None);
        }
        if let Some(leaves) = answer.leaves
            && let Err(failure) =
                check_streamed_leaves(answer.commitment, answer.request, answer.tokens, leaves)
        {
            return fail(report, failure, None, answer, None);
        }
        if !mode.refereed() {
            report.verdict = Some(AuditVerdict::Unaudited);
            return report;
        }
        let count = self.policy.challenges(self.on_probation);
        let mut challenge = Challenge::derive(self.secret, answer.commitment, count);
        if let Some(step) = self
            .also_open
            .filter(|s| *s < answer.commitment.commitment.steps)
            && let Err(at) = challenge.indices.binary_search(&step)
        {
            challenge.indices.insert(at, step);
        }
        report.challenged.clone_from(&challenge.indices);
        let session = session.or_else(|| self.referees.fresh(answer, &[]));
        let (opening, first) = tokio::join!(self.open(answer, &challenge), async {
            match &session {
                Some(s) => Some(s.finish(&challenge.indices).await),
                None => None,
            }
        });
        let Some(opening) = opening else {
            report.verdict = Some(AuditVerdict::Inconclusive);
            report.unopened = true;
            return report;
        };
        report.evidence_bytes += cbor_len(&opening);
        let mut rounds = vec![AuditRound {
            challenge,
            opening,
            evidence: Vec::new(),
        }];
        let mut leaves = match self.leaves_of(answer, &rounds[0]) {
            Ok(leaves) => leaves,
            Err((failure, signed)) => {
                return fail(report, failure, None, answer, signed.then_some(rounds));
            }
        };
        let heard = self
            .first_referee(
                answer,
                session,
                first,
                &rounds[0],
                &mut report.referee_failures,
            )
            .await;
        let Some(mut heard) = heard else {
            report.verdict = Some(AuditVerdict::Unrefereed);
            return report;
        };
        report.evidence_bytes += heard.evidence.iter().map(cbor_len).sum::<usize>();
        let mut opinion = opinion_of(answer, &rounds, &heard, &leaves);
        if matches!(opinion, Opinion::Borderline(_)) {
            match self
                .second_round(answer, &mut heard, &mut rounds, &mut leaves)
                .await
            {
                SecondRound::Skipped => {}
                SecondRound::Unopened => {
                    report.verdict = Some(AuditVerdict::Inconclusive);
                    report.unopened = true;
                    return report;
                }
                SecondRound::ProviderFailed(failure, signed) => {
                    return fail(report, failure, None, answer, signed.then_some(rounds));
                }
                SecondRound::Added(bytes) => {
                    report.challenged = rounds
                        .iter()
                        .flat_map(|r| r.challenge.indices.iter().copied())
                        .collect();
                    report.evidence_bytes += bytes;
                    opinion = opinion_of(answer, &rounds, &heard, &leaves);
                }
            }
        }
        match opinion {
            Opinion::Pass(stats) | Opinion::Borderline(stats) => {
                pass(
                    &mut report,
                    self.policy,
                    answer,
                    heard.witness.choice(),
                    stats,
                );
                report
            }
            Opinion::Fail(failure, stats) => {
                self.accusation(report, answer, rounds, leaves, heard, failure, stats)
                    .await
            }
        }
    }

    /// Asks the provider to open `challenge`, again while nothing comes back: at least
    /// [`OPEN_ATTEMPTS`] times, and for at least `open_patience`.
    async fn open(&self, answer: &Answer<'_>, challenge: &Challenge) -> Option<SignedOpening> {
        let provider = answer.provider.peer;
        let started = Instant::now();
        let mut pause = OPEN_BACKOFF;
        for attempt in 1.. {
            let request = OpenLeavesRequest {
                request_id: answer.request.request_id,
                indices: challenge.indices.clone(),
            };
            match self.opener.open(provider, request).await {
                Ok(opening) => return Some(opening),
                Err(e) => {
                    tracing::warn!(%provider, attempt, error = %e, "leaf opening not received");
                }
            }
            if attempt >= OPEN_ATTEMPTS && started.elapsed() >= self.open_patience {
                break;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(OPEN_BACKOFF_MAX);
        }
        None
    }

    /// The round's leaves after the exact checks; on failure, whether the opening was signed
    /// (so that it can go into a proof).
    fn leaves_of(
        &self,
        answer: &Answer<'_>,
        round: &AuditRound,
    ) -> Result<Vec<StepLeaf>, (AuditFailure, bool)> {
        if !opening_is_signed(
            &round.opening,
            &answer.provider.peer,
            answer.request,
            &round.challenge,
        ) {
            return Err((AuditFailure::OpeningUnsigned, false));
        }
        check_openings(
            answer.commitment,
            answer.request,
            answer.tokens,
            &round.challenge,
            &round.opening.opening.response,
        )
        .map(<[StepLeaf]>::to_vec)
        .map_err(|f| (f, true))
    }

    /// The first referee's usable evidence on the first round, replacing referees that fail
    /// (their fault, never the provider's).
    async fn first_referee(
        &self,
        answer: &Answer<'_>,
        mut session: Option<Box<dyn Witness>>,
        mut evidence: Option<Result<SignedEvidence, SessionError>>,
        round: &AuditRound,
        failures: &mut usize,
    ) -> Option<Heard> {
        let mut tried: Vec<PeerId> = Vec::new();
        let busy_until = Instant::now() + REFEREE_BUSY_WAIT;
        let mut backoff = Duration::from_millis(10);
        loop {
            let current = session.take()?;
            let problem = match evidence.take() {
                Some(Ok(e)) => match usable(answer, current.choice(), &e, &round.challenge) {
                    Ok(()) => {
                        return Some(Heard {
                            witness: current,
                            evidence: vec![e],
                        });
                    }
                    Err(problem) => problem.to_string(),
                },
                // Busy is no failure: ask again (maybe another referee) once a context may be free.
                Some(Err(SessionError::Busy(_))) if Instant::now() < busy_until => {
                    tracing::debug!(referee = %current.choice().label(), "referee busy; asking again");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(REFEREE_BUSY_BACKOFF);
                    drop(current);
                    session = self.referees.fresh(answer, &tried);
                    evidence = self.ask(&session, &round.challenge).await;
                    continue;
                }
                Some(Err(problem)) => problem.to_string(),
                None => "no evidence".into(),
            };
            tracing::warn!(referee = %current.choice().label(), %problem, request = %answer.request.request_id, "referee failed; trying another");
            *failures += 1;
            tried.push(current.choice().peer());
            if tried.len() > REFEREE_FALLBACKS {
                return None;
            }
            session = self.referees.fresh(answer, &tried);
            evidence = self.ask(&session, &round.challenge).await;
        }
    }

    async fn ask(
        &self,
        session: &Option<Box<dyn Witness>>,
        challenge: &Challenge,
    ) -> Option<Result<SignedEvidence, SessionError>> {
        match session {
            Some(s) => Some(s.finish(&challenge.indices).await),
            None => None,
        }
    }

    /// Opens as many steps again on both sides, checking the provider's new opening exactly.
    async fn second_round(
        &self,
        answer: &Answer<'_>,
        heard: &mut Heard,
        rounds: &mut Vec<AuditRound>,
        leaves: &mut Vec<StepLeaf>,
    ) -> SecondRound {
        let first = &rounds[0].challenge;
        let wider = Challenge::extend(
            self.secret,
            answer.commitment,
            first,
            DEFAULT_CHALLENGE_COUNT,
        );
        let extra = Challenge {
            indices: wider
                .indices
                .iter()
                .copied()
                .filter(|i| !first.indices.contains(i))
                .collect(),
        };
        if extra.indices.is_empty() {
            return SecondRound::Skipped;
        }
        let (opening, evidence) = tokio::join!(
            self.open(answer, &extra),
            heard.witness.open(&extra.indices)
        );
        let Some(opening) = opening else {
            return SecondRound::Unopened;
        };
        let Ok(evidence) = evidence else {
            return SecondRound::Skipped;
        };
        if usable(answer, heard.witness.choice(), &evidence, &extra).is_err() {
            return SecondRound::Skipped;
        }
        let bytes = cbor_len(&opening) + cbor_len(&evidence);
        let round = AuditRound {
            challenge: extra,
            opening,
            evidence: Vec::new(),
        };
        let checked = self.leaves_of(answer, &round);
        rounds.push(round);
        match checked {
            Ok(more) => {
                leaves.extend(more);
                heard.evidence.push(evidence);
                SecondRound::Added(bytes)
            }
            Err((failure, signed)) => SecondRound::ProviderFailed(failure, signed),
        }
    }

    /// An accusation: the gateway's own engine is believed; a peer's is put to a second
    /// referee.
    #[allow(clippy::too_many_arguments)]
    async fn accusation(
        &self,
        mut report: Report,
        answer: &Answer<'_>,
        mut rounds: Vec<AuditRound>,
        leaves: Vec<StepLeaf>,
        accuser: Heard,
        failure: AuditFailure,
        stats: Option<Statistics>,
    ) -> Report {
        report.statistics = stats;
        report.referee = Some(accuser.witness.choice().clone());
        report.tier = Some(tier_of(answer, accuser.witness.choice()));
        if accuser.witness.choice().is_local() {
            attach(&mut rounds, &accuser);
            let stats = report.statistics.clone();
            return fail(report, failure, stats, answer, Some(rounds));
        }
        let accuser_peer = accuser.witness.choice().peer();
        let Some(second) = self.confirm(answer, &rounds, accuser_peer).await else {
            tracing::warn!(referee = %accuser_peer, %failure, "an accusation no second referee could check; not acted on");
            report.verdict = Some(AuditVerdict::Inconclusive);
            return report;
        };
        report.evidence_bytes += second.evidence.iter().map(cbor_len).sum::<usize>();
        match opinion_of(answer, &rounds, &second, &leaves) {
            Opinion::Fail(confirmed, stats) => {
                report.confirmed.push(accuser_peer);
                attach(&mut rounds, &accuser);
                attach(&mut rounds, &second);
                report.referee = Some(second.witness.choice().clone());
                report.tier = Some(tier_of(answer, second.witness.choice()));
                let stats = stats.or_else(|| report.statistics.clone());
                fail(report, confirmed, stats, answer, Some(rounds))
            }
            Opinion::Pass(_) | Opinion::Borderline(_) if !second.witness.choice().is_local() => {
                // One peer's word against another's: neither is believed over the other, so
                // nobody is penalised and the answer is not passed (a colluder could otherwise
                // pass a caught cheat and get an honest referee struck in one move).
                tracing::warn!(referee = %accuser_peer, second = %second.witness.choice().label(), %failure, "two peer referees disagree; not acted on");
                report.verdict = Some(AuditVerdict::Inconclusive);
                report
            }
            Opinion::Pass(stats) | Opinion::Borderline(stats) => {
                tracing::warn!(referee = %accuser_peer, %failure, "the gateway's engine found sound an answer a referee accused; referee struck");
                report.struck.push(accuser_peer);
                pass(
                    &mut report,
                    self.policy,
                    answer,
                    second.witness.choice(),
                    stats,
                );
                report
            }
        }
    }

    /// A second referee's evidence on every round, from a referee other than `accuser`.
    async fn confirm(
        &self,
        answer: &Answer<'_>,
        rounds: &[AuditRound],
        accuser: PeerId,
    ) -> Option<Heard> {
        let mut tried = vec![accuser];
        for _ in 0..=REFEREE_FALLBACKS {
            let witness = self.referees.fresh(answer, &tried)?;
            tried.push(witness.choice().peer());
            let mut evidence = Vec::new();
            for (i, round) in rounds.iter().enumerate() {
                let got = if i == 0 {
                    witness.finish(&round.challenge.indices).await
                } else {
                    witness.open(&round.challenge.indices).await
                };
                match got {
                    Ok(e) if usable(answer, witness.choice(), &e, &round.challenge).is_ok() => {
                        evidence.push(e);
                    }
                    _ => break,
                }
            }
            if evidence.len() == rounds.len() {
                return Some(Heard { witness, evidence });
            }
        }
        None
    }
}

/// A referee's evidence is its own fault when it is not about this answer, not in the class
/// the gateway chose it for, or malformed.
fn usable(
    answer: &Answer<'_>,
    choice: &Choice,
    evidence: &SignedEvidence,
    challenge: &Challenge,
) -> Result<(), EvidenceError> {
    // What the evidence establishes about the provider is judged later; here only whether it
    // is usable at all.
    let _facts = check_evidence(
        evidence,
        &choice.peer(),
        answer.commitment,
        answer.request,
        answer.tokens,
        challenge,
    )?;
    if evidence.evidence.numerics != choice.numerics() {
        return Err(EvidenceError::Binding("numerics"));
    }
    Ok(())
}

/// The tier the gateway's own choice of referee gives: between the class the provider was
/// routed on and the one the referee was chosen for.
fn tier_of(answer: &Answer<'_>, choice: &Choice) -> Tier {
    Tier::between(&answer.provider.card.numerics, choice.numerics())
}

/// A referee's judgement over the rounds it reported on.
fn opinion_of(
    answer: &Answer<'_>,
    rounds: &[AuditRound],
    heard: &Heard,
    leaves: &[StepLeaf],
) -> Opinion {
    let mut opened: Vec<RefereeStep> = Vec::new();
    for (round, evidence) in rounds.iter().zip(&heard.evidence) {
        match check_evidence(
            evidence,
            &heard.witness.choice().peer(),
            answer.commitment,
            answer.request,
            answer.tokens,
            &round.challenge,
        ) {
            Ok(Ok(())) => opened.extend_from_slice(&evidence.evidence.opened),
            Ok(Err(failure)) => return Opinion::Fail(failure, None),
            Err(_) => return Opinion::Fail(AuditFailure::LogitsDiverge, None),
        }
    }
    let Some(last) = heard.evidence.last() else {
        return Opinion::Fail(AuditFailure::LogitsDiverge, None);
    };
    let judged = &leaves[..opened.len().min(leaves.len())];
    match judge(
        judged,
        &opened,
        &last.evidence.margins,
        tier_of(answer, heard.witness.choice()),
    ) {
        Judgement::Fail(failure, stats) => Opinion::Fail(failure, Some(stats)),
        Judgement::Pass(stats) => Opinion::Pass(stats),
        Judgement::Borderline(stats) => Opinion::Borderline(stats),
    }
}

/// Adds a referee's evidence to the rounds it reported on.
fn attach(rounds: &mut [AuditRound], heard: &Heard) {
    for (round, evidence) in rounds.iter_mut().zip(&heard.evidence) {
        round.evidence.push(evidence.clone());
    }
}

/// A passing judgement: `passed` when its tier is one the policy accepts.
fn pass(
    report: &mut Report,
    policy: &AuditPolicy,
    answer: &Answer<'_>,
    choice: &Choice,
    stats: Statistics,
) {
    let tier = tier_of(answer, choice);
    report.referee = Some(choice.clone());
    report.tier = Some(tier);
    report.statistics = Some(stats);
    report.verdict = Some(if policy.tiers.accepts(tier) {
        AuditVerdict::Passed
    } else {
        tracing::warn!(request = %answer.request.request_id, tier = tier.as_str(), "an answer judged in a tier this gateway does not accept");
        AuditVerdict::Inconclusive
    });
}

/// A failure the provider is penalised for, written down with the rounds that show it (`None`:
/// the gateway saw it itself, but has nothing signed to show anyone else).
fn fail(
    mut report: Report,
    failure: AuditFailure,
    stats: Option<Statistics>,
    answer: &Answer<'_>,
    rounds: Option<Vec<AuditRound>>,
) -> Report {
    report.verdict = Some(AuditVerdict::Failed(failure));
    report.statistics = stats.or(report.statistics);
    report.penalise = true;
    let Some(rounds) = rounds else {
        return report;
    };
    report.proof = Some(FraudProof {
        version: FraudProof::VERSION,
        provider: answer.provider.peer.to_bytes(),
        request: answer.request.clone(),
        tokens: answer.tokens.to_vec(),
        commitment: answer.commitment.clone(),
        rounds,
        failure,
    });
    report
}

/// Size of a value as CBOR, as it travels between peers.
pub(crate) fn cbor_len<T: serde::Serialize>(value: &T) -> usize {
    let mut bytes = Vec::new();
    match ciborium::into_writer(value, &mut bytes) {
        Ok(()) => bytes.len(),
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use libp2p::identity::Keypair;
    use proofmesh_shared::commit::{Commitment, LeafTree, output_hash, prompt_hash};
    use proofmesh_shared::protocol::{
        ChatMessage, FinishReason, ModelCard, ModelDigest, OpenLeavesResponse, Opening, RequestId,
    };
    use proofmesh_shared::sampling::{self, SamplerParams};
    use proofmesh_shared::verify::{ProofError, RefereeEvidence};

    use super::*;
    use crate::auditor::policy::AuditTiers;
    use crate::auditor::session::{LocalJob, LocalReferee};

    const CLASS: &str = "det/test";

    /// A model: logits by step.
    type Model = fn(u32) -> Vec<f32>;
    const VOCAB: u32 = 200;

    /// The model: deterministic fake logits for (step, id).
    fn logits(step: u32) -> Vec<f32> {
        (0..VOCAB)
            .map(|i| ((i * 7919 + step * 104_729) % 1000) as f32 / 100.0)
            .collect()
    }

    /// How a cheat's decoder departs from the model: by id, so the centred distance shows it.
    fn skewed(step: u32) -> Vec<f32> {
        logits(step)
            .into_iter()
            .enumerate()
            .map(|(i, l)| l + (i % 7) as f32 * 0.1)
            .collect()
    }

    struct Run {
        key: Keypair,
        candidate: Candidate,
        request: GenerateRequest,
        leaves: Vec<StepLeaf>,
        tokens: Vec<u32>,
        signed: SignedCommitment,
        tree: LeafTree,
    }

    /// A provider's answer over `model`'s logits, built as a provider builds one.
    fn run(model: Model, steps: u32) -> Arc<Run> {
        run_bent(model, steps, |_| {})
    }

    /// [`run`], each leaf passed through `bend` before it is committed (a cheat's doing).
    fn run_bent(model: Model, steps: u32, bend: impl Fn(&mut StepLeaf)) -> Arc<Run> {
        let key = Keypair::generate_secp256k1();
        let request = GenerateRequest {
            version: GenerateRequest::VERSION,
            request_id: RequestId::from_bytes([4; 16]),
            model_digest: ModelDigest([5; 32]),
            messages: vec![ChatMessage {
                role: "user".into(),
                content: "x".into(),
            }],
            sampler: SamplerParams {
                temperature: 0.0,
                seed: 9,
                ..Default::default()
            },
            max_tokens: steps,
            stop: vec![],
            trace: None,
            stream_leaves: false,
            tools: None,
            constraint: None,
            prompt: None,
        };
        let leaves: Vec<StepLeaf> = (0..steps)
            .map(|step| {
                let l = model(step);
                let top = sampling::top_candidates(&l);
                let draw = sampling::draw(9, step);
                let token = sampling::sample(&top, &request.sampler, draw).unwrap();
                let mut leaf = StepLeaf {
                    step,
                    token,
                    draw,
                    logsumexp: sampling::logsumexp(&l),
                    top,
                };
                bend(&mut leaf);
                leaf
            })
            .collect();
        let tokens: Vec<u32> = leaves.iter().map(|l| l.token).collect();
        let tree = LeafTree::build(&leaves);
        let signed = Commitment {
            version: Commitment::VERSION,
            request_id: request.request_id,
            request_hash: request.hash(),
            model_digest: request.model_digest,
            prompt_tokens: 3,
            prompt_hash: prompt_hash(&[1, 2, 3]),
            steps,
            merkle_root: tree.root(),
            output_hash: output_hash(&tokens),
            finish_reason: FinishReason::Length,
            numerics: CLASS.into(),
        }
        .sign(&key)
        .unwrap();
        let candidate = Candidate {
            peer: key.public().to_peer_id(),
            card: ModelCard {
                name: "m".into(),
                digest: request.model_digest,
                quantization: "Q4_1".into(),
                context_size: 1024,
                parallel: 1,
                device: "cpu".into(),
                gpu_layers: 0,
                numerics: CLASS.into(),
                referee: true,
            },
        };
        Arc::new(Run {
            key,
            candidate,
            request,
            leaves,
            tokens,
            signed,
            tree,
        })
    }

    fn answer(run: &Run) -> Answer<'_> {
        Answer {
            provider: &run.candidate,
            request: &run.request,
            tokens: &run.tokens,
            commitment: &run.signed,
            text_matches: true,
            constraint_holds: true,
            leaves: None,
        }
    }

    /// A provider that opens honestly, after losing the first `lost` requests, and goes silent
    /// after `opens` openings.
    struct Opener {
        run: Arc<Run>,
        lost: AtomicU32,
        opens: AtomicU32,
    }

    #[async_trait]
    impl LeafOpener for Opener {
        async fn open(
            &self,
            _provider: PeerId,
            request: OpenLeavesRequest,
        ) -> Result<SignedOpening, String> {
            if self
                .lost
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err("connection reset".into());
            }
            if self
                .opens
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_err()
            {
                return Err("timed out".into());
            }
            let idx: Vec<usize> = request.indices.iter().map(|&i| i as usize).collect();
            let response = OpenLeavesResponse::Opened {
                leaves: idx.iter().map(|&i| self.run.leaves[i].clone()).collect(),
                proof: self.run.tree.prove(&idx),
            };
            Ok(Opening {
                request_id: request.request_id,
                indices: request.indices,
                response,
            }
            .sign(&self.run.key)
            .unwrap())
        }
    }

    /// A referee re-executing with `model` (the true one, or another when it lies).
    struct Fake {
        choice: Choice,
        class: String,
        key: Keypair,
        run: Arc<Run>,
        model: Model,
    }

    impl Fake {
        fn evidence(&self, indices: &[u32]) -> SignedEvidence {
            let step = |i: u32| {
                let l = (self.model)(i);
                let token = self.run.tokens[i as usize];
                RefereeStep {
                    step: i,
                    logsumexp: sampling::logsumexp(&l),
                    claimed_logit: l[token as usize],
                    top: sampling::top_candidates(&l),
                }
            };
            let margins = (0..self.run.tokens.len() as u32)
                .map(|i| {
                    let s = step(i);
                    sampling::margin(
                        &s.top,
                        self.run.tokens[i as usize],
                        s.claimed_logit,
                        &self.run.request.sampler,
                        sampling::draw(9, i),
                    )
                })
                .collect();
            RefereeEvidence {
                version: RefereeEvidence::VERSION,
                request_id: self.run.request.request_id,
                request_hash: self.run.request.hash(),
                model_digest: self.run.request.model_digest,
                output_hash: output_hash(&self.run.tokens),
                steps: self.run.tokens.len() as u32,
                prompt_tokens: 3,
                prompt_hash: prompt_hash(&[1, 2, 3]),
                numerics: self.class.clone(),
                micro_batch: 32,
                invalid_tokens: 0,
                ends_with_eog: false,
                stop_sequence_found: false,
                opened: indices.iter().map(|&i| step(i)).collect(),
                margins,
            }
            .sign(&self.key)
            .unwrap()
        }
    }

    #[async_trait]
    impl Witness for Fake {
        fn choice(&self) -> &Choice {
            &self.choice
        }

        async fn finish(&self, indices: &[u32]) -> Result<SignedEvidence, SessionError> {
            Ok(self.evidence(indices))
        }

        async fn open(&self, indices: &[u32]) -> Result<SignedEvidence, SessionError> {
            Ok(self.evidence(indices))
        }
    }

    /// Where a fake referee runs.
    #[derive(Clone, Copy)]
    enum Seat {
        /// A trusted peer of this numerics class.
        Peer(&'static str),
        /// The gateway's own engine (class [`CLASS`]).
        Engine,
    }

    /// The gateway's engine, as far as the pool's choice needs it.
    #[derive(Debug)]
    struct Engine(PeerId);

    impl LocalReferee for Engine {
        fn peer_id(&self) -> PeerId {
            self.0
        }
        fn digest(&self) -> ModelDigest {
            ModelDigest([5; 32])
        }
        fn numerics(&self) -> &str {
            CLASS
        }
        fn has_capacity(&self) -> bool {
            true
        }
        fn begin(&self, _request: GenerateRequest) -> Result<Box<dyn LocalJob>, SessionError> {
            Err(SessionError::Refused("a fake".into()))
        }
    }

    /// The trusted referees, each re-executing with its model, handed out in order.
    struct Pool {
        run: Arc<Run>,
        referees: Vec<(Keypair, Model, Seat)>,
    }

    impl Pool {
        /// Trusted peers of the provider's class.
        fn new(run: &Arc<Run>, models: &[Model]) -> Self {
            let seats: Vec<(Model, Seat)> =
                models.iter().map(|m| (*m, Seat::Peer(CLASS))).collect();
            Self::seated(run, &seats)
        }

        fn seated(run: &Arc<Run>, referees: &[(Model, Seat)]) -> Self {
            Self {
                run: Arc::clone(run),
                referees: referees
                    .iter()
                    .map(|(m, seat)| (Keypair::generate_secp256k1(), *m, *seat))
                    .collect(),
            }
        }

        fn witness(&self, i: usize) -> Box<dyn Witness> {
            let (key, model, seat) = &self.referees[i];
            let peer = key.public().to_peer_id();
            let (choice, class) = match seat {
                Seat::Peer(class) => (
                    Choice::Remote {
                        peer,
                        numerics: (*class).into(),
                    },
                    *class,
                ),
                Seat::Engine => (Choice::Local(Arc::new(Engine(peer))), CLASS),
            };
            Box::new(Fake {
                choice,
                class: class.into(),
                key: key.clone(),
                run: Arc::clone(&self.run),
                model: *model,
            })
        }

        fn peer(&self, i: usize) -> PeerId {
            self.referees[i].0.public().to_peer_id()
        }
    }

    impl Referees for Pool {
        fn fresh(&self, _answer: &Answer<'_>, exclude: &[PeerId]) -> Option<Box<dyn Witness>> {
            (0..self.referees.len())
                .find(|&i| !exclude.contains(&self.peer(i)))
                .map(|i| self.witness(i))
        }
    }

    async fn audit(run: &Arc<Run>, pool: &Pool, lost: u32, first: Option<usize>) -> Report {
        audit_with(run, pool, AuditTiers::Exact, lost, u32::MAX, first).await
    }

    /// An audit under `tiers` by a provider that loses its first `lost` opening requests and
    /// answers at most `opens`.
    async fn audit_with(
        run: &Arc<Run>,
        pool: &Pool,
        tiers: AuditTiers,
        lost: u32,
        opens: u32,
        first: Option<usize>,
    ) -> Report {
        let policy = AuditPolicy {
            tiers,
            ..AuditPolicy::default()
        };
        let opener = Opener {
            run: Arc::clone(run),
            lost: AtomicU32::new(lost),
            opens: AtomicU32::new(opens),
        };
        let procedure = Procedure {
            secret: &[3; 32],
            policy: &policy,
            on_probation: false,
            opener: &opener,
            referees: pool,
            open_patience: Duration::ZERO,
            also_open: None,
        };
        let session = first.map(|i| pool.witness(i));
        procedure
            .run(&answer(run), VerificationMode::Merkle, session)
            .await
    }

    /// The runner-up at step `at`, every other step the model's: a cheat that only a
    /// challenge of that very step can catch (the fake model's logits do not depend on the
    /// tokens before them).
    fn off_policy_at(at: u32) -> Arc<Run> {
        run_bent(logits, 200, move |leaf| {
            if leaf.step == at
                && let Some(other) = leaf.top.iter().find(|c| c.id != leaf.token)
            {
                leaf.token = other.id;
            }
        })
    }

    /// An audit of `run` challenging `count` drawn steps, and `also_open` besides.
    async fn audit_also(run: &Arc<Run>, count: usize, also_open: Option<u32>) -> Report {
        let pool = Pool::new(run, &[logits]);
        let policy = AuditPolicy {
            challenge_count: count,
            ..AuditPolicy::default()
        };
        let opener = Opener {
            run: Arc::clone(run),
            lost: AtomicU32::new(0),
            opens: AtomicU32::new(u32::MAX),
        };
        let procedure = Procedure {
            secret: &[3; 32],
            policy: &policy,
            on_probation: false,
            opener: &opener,
            referees: &pool,
            open_patience: Duration::ZERO,
            also_open,
        };
        procedure
            .run(&answer(run), VerificationMode::Merkle, None)
            .await
    }

    #[tokio::test]
    async fn a_step_asked_to_be_opened_is_challenged_besides_the_drawn_ones() {
        // A cheat at a step its own draw of 4 in 200 leaves out (the draw depends on the root,
        // which depends on the step it cheats at).
        let mut found = None;
        for at in 0..200 {
            let cheat = off_policy_at(at);
            let missed = audit_also(&cheat, 4, None).await;
            if !missed.challenged.contains(&at) {
                found = Some((at, cheat, missed));
                break;
            }
        }
        let (at, cheat, missed) = found.expect("a step the draw leaves out");
        // The drawn steps alone miss it: only the peer referee's margins over every step show
        // it, an accusation one referee cannot make alone (nobody penalised, nothing proven)...
        assert_eq!(missed.verdict(), AuditVerdict::Inconclusive);
        assert!(!missed.penalise && missed.proof.is_none());
        // ...but where consensus answers first differ, it is opened and the cheat fails...
        let caught = audit_also(&cheat, 4, Some(at)).await;
        assert!(caught.challenged.contains(&at));
        assert_eq!(caught.challenged.len(), missed.challenged.len() + 1);
        assert_eq!(
            caught.verdict(),
            AuditVerdict::Failed(AuditFailure::SamplerMismatch)
        );
        // ...proven by the provider's own signed opening, which anyone can check.
        assert!(caught.penalise);
        let proof = caught.proof.expect("a proof");
        assert_eq!(proof.holds(&[]), Ok(AuditFailure::SamplerMismatch));
        // A step past the answer's end is ignored.
        let honest = run(logits, 200);
        let drawn = audit_also(&honest, 4, None).await.challenged;
        let past = audit_also(&honest, 4, Some(10_000)).await;
        assert_eq!(past.challenged, drawn);
    }

    #[tokio::test]
    async fn an_honest_answer_passes_in_the_exact_tier() {
        let run = run(logits, 40);
        let pool = Pool::new(&run, &[logits]);
        let report = audit(&run, &pool, 0, Some(0)).await;
        assert_eq!(report.verdict(), AuditVerdict::Passed);
        assert_eq!(report.tier, Some(Tier::Exact));
        assert!(!report.penalise && report.struck.is_empty());
    }

    #[tokio::test]
    async fn a_lying_referee_is_overruled_by_the_gateways_engine_and_struck() {
        let run = run(logits, 40);
        let pool = Pool::seated(&run, &[(skewed, Seat::Peer(CLASS)), (logits, Seat::Engine)]);
        let report = audit(&run, &pool, 0, Some(0)).await;
        assert_eq!(report.verdict(), AuditVerdict::Passed);
        assert!(!report.penalise, "an honest provider was penalised");
        assert_eq!(report.struck, vec![pool.peer(0)]);
        assert_eq!(report.referee.map(|c| c.peer()), Some(pool.peer(1)));
    }

    #[tokio::test]
    async fn one_peer_referees_word_against_anothers_settles_nothing() {
        // An honest answer, a false accuser, and an honest peer: neither referee is believed
        // over the other, so nobody is struck or penalised and nothing is passed.
        let honest = run(logits, 40);
        let pool = Pool::new(&honest, &[skewed, logits]);
        let report = audit(&honest, &pool, 0, Some(0)).await;
        assert_eq!(report.verdict(), AuditVerdict::Inconclusive);
        assert!(!report.penalise && report.struck.is_empty());
        // A cheat caught by an honest peer, "cleared" by a colluding one: not passed, and the
        // honest referee is not struck.
        let cheat = run(skewed, 40);
        let pool = Pool::new(&cheat, &[logits, skewed]);
        let report = audit(&cheat, &pool, 0, Some(0)).await;
        assert_eq!(report.verdict(), AuditVerdict::Inconclusive);
        assert!(report.struck.is_empty());
    }

    #[tokio::test]
    async fn an_accusation_with_no_second_referee_penalises_nobody() {
        let run = run(logits, 40);
        let pool = Pool::new(&run, &[skewed]);
        let report = audit(&run, &pool, 0, Some(0)).await;
        assert_eq!(report.verdict(), AuditVerdict::Inconclusive);
        assert!(!report.penalise && report.proof.is_none());
    }

    #[tokio::test]
    async fn a_confirmed_accusation_is_a_proof_to_whoever_trusts_a_referee_in_it() {
        // The provider decoded with skewed logits; both referees run the true model.
        let run = run(skewed, 40);
        let pool = Pool::new(&run, &[logits, logits]);
        let report = audit(&run, &pool, 0, Some(0)).await;
        let AuditVerdict::Failed(failure) = report.verdict() else {
            panic!("the cheat passed: {:?}", report.verdict())
        };
        assert!(failure.is_statistical(), "{failure}");
        assert!(report.penalise);
        assert_eq!(report.confirmed, vec![pool.peer(0)]);
        let proof = report.proof.expect("a proof");
        // Keys cost nothing: two referees' word proves nothing to a checker that trusts
        // neither...
        assert_eq!(proof.check(), Err(ProofError::NoTrustedReferee(2)));
        // ...and to one that trusts either, one of them suffices.
        assert_eq!(proof.check_trusting(&[pool.peer(1)]), Ok(failure));
        let mut alone = proof.clone();
        for round in &mut alone.rounds {
            round.evidence.truncate(1);
        }
        assert_eq!(alone.check(), Err(ProofError::NoTrustedReferee(1)));
        assert_eq!(alone.check_trusting(&[pool.peer(0)]), Ok(failure));
        // Material that is not the provider's signed answer to the proof's request and tokens
        // is no proof against it, whatever it shows.
        let trusted = [pool.peer(0)];
        let mut other_tokens = proof.clone();
        other_tokens.tokens[0] ^= 1;
        assert_eq!(
            other_tokens.check_trusting(&trusted),
            Err(ProofError::Unbound(AuditFailure::OutputMismatch))
        );
        let mut unsigned = proof.clone();
        unsigned.commitment.signature[10] ^= 1;
        assert_eq!(
            unsigned.check_trusting(&trusted),
            Err(ProofError::Unbound(AuditFailure::BadSignature))
        );
        let mut other_request = proof.clone();
        other_request.request.max_tokens += 1;
        assert_eq!(
            other_request.check_trusting(&trusted),
            Err(ProofError::Unbound(AuditFailure::RequestMismatch))
        );
        // An opening the provider did not sign cannot be put in its name.
        let mut forged = proof;
        forged.rounds[0].opening = Opening {
            request_id: run.request.request_id,
            indices: forged.rounds[0].challenge.indices.clone(),
            response: OpenLeavesResponse::Refused {
                reason: "made up".into(),
            },
        }
        .sign(&Keypair::generate_secp256k1())
        .unwrap();
        assert_eq!(
            forged.check_trusting(&[pool.peer(0)]),
            Err(ProofError::UnsignedOpening)
        );
    }

    #[tokio::test]
    async fn two_lying_referees_cannot_get_an_honest_answer_failed() {
        // The second liar confirms the first; the engine, asked first, refutes them both.
        let run = run(logits, 40);
        let pool = Pool::seated(
            &run,
            &[
                (skewed, Seat::Peer(CLASS)),
                (logits, Seat::Engine),
                (skewed, Seat::Peer(CLASS)),
            ],
        );
        let report = audit(&run, &pool, 0, Some(0)).await;
        assert_eq!(report.verdict(), AuditVerdict::Passed);
        assert!(!report.penalise);
        assert_eq!(report.struck, vec![pool.peer(0)]);
    }

    /// The model as another numerics class computes it: close, not equal.
    fn nudged(step: u32) -> Vec<f32> {
        logits(step)
            .into_iter()
            .enumerate()
            .map(|(i, l)| l + ((i as u32 * 31 + step * 17) % 13) as f32 * 0.07 - 0.42)
            .collect()
    }

    #[tokio::test]
    async fn a_borderline_answer_its_provider_will_not_open_further_is_not_passed() {
        let run = run(logits, 40);
        let pool = Pool::seated(&run, &[(nudged, Seat::Peer("f16/other"))]);
        // Opened twice, the borderline first round is settled by the second.
        let report = audit_with(&run, &pool, AuditTiers::Any, 0, 2, Some(0)).await;
        assert_eq!(
            report.verdict(),
            AuditVerdict::Passed,
            "{:?}",
            report.statistics
        );
        assert_eq!(report.challenged.len(), 32, "a second round was taken");
        // Silent on the second opening, the provider gets no pass (and no penalty).
        let report = audit_with(&run, &pool, AuditTiers::Any, 0, 1, Some(0)).await;
        assert_eq!(report.verdict(), AuditVerdict::Inconclusive);
        assert!(!report.penalise);
    }

    #[tokio::test]
    async fn an_opening_lost_to_the_network_is_asked_again() {
        let run = run(logits, 40);
        let pool = Pool::new(&run, &[logits]);
        let report = audit(&run, &pool, 2, None).await;
        assert_eq!(report.verdict(), AuditVerdict::Passed);
        // One that never arrives is no fraud.
        let report = audit(&run, &pool, 100, None).await;
        assert_eq!(report.verdict(), AuditVerdict::Inconclusive);
        assert!(!report.penalise && report.unopened);
    }

    #[tokio::test]
    async fn a_commitment_in_another_class_than_advertised_fails() {
        let run = run(logits, 12);
        let mut downgraded = (*run).clone_for_test();
        downgraded.candidate.card.numerics = "det/other".into();
        let downgraded = Arc::new(downgraded);
        let pool = Pool::new(&downgraded, &[logits]);
        let report = audit(&downgraded, &pool, 0, Some(0)).await;
        assert_eq!(
            report.verdict(),
            AuditVerdict::Failed(AuditFailure::NumericsMismatch)
        );
        assert!(report.penalise && report.proof.is_none());
    }

    #[tokio::test]
    async fn no_trusted_referee_is_unrefereed() {
        let run = run(logits, 12);
        let pool = Pool::new(&run, &[]);
        let report = audit(&run, &pool, 0, None).await;
        assert_eq!(report.verdict(), AuditVerdict::Unrefereed);
    }

    impl Run {
        fn clone_for_test(&self) -> Self {
            Self {
                key: self.key.clone(),
                candidate: self.candidate.clone(),
                request: self.request.clone(),
                leaves: self.leaves.clone(),
                tokens: self.tokens.clone(),
                signed: self.signed.clone(),
                tree: LeafTree::build(&self.leaves),
            }
        }
    }
}
