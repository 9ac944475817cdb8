//! The gateway's verification, owned in one place.
//!
//! An [`Auditor`] is built once at start with everything verification needs: the challenge
//! secret, the [`AuditPolicy`] (what an answer must pass), the [`RefereePool`] (which referees
//! the gateway trusts), the durable per-peer [`Book`] (reputation, failures, benching,
//! probation) and the proof sink (where fraud proofs go). The request path calls it three
//! times: [`Auditor::admit`] filters and orders the providers a request may go to,
//! [`Auditor::follow`] starts a referee on an answer as it begins streaming, and
//! [`Auditor::judge`] audits the finished answer and records what follows.
//!
//! Nothing a peer declares is taken as a fact here: the tier comes from the class a provider
//! advertised and was routed on, checked against the class it signed; referees come only from
//! the trusted pool and are never told whose answer they check; a peer referee's accusation
//! needs a second referee; records are keyed to peer ids in the durable book.
//!
//! # Layout
//!
//! - [`mode`]: the requested [`VerificationMode`].
//! - [`policy`]: the [`AuditPolicy`] and [`AuditTiers`].
//! - [`book`]: the durable per-peer [`Book`].
//! - [`pool`]: the trusted [`RefereePool`] and the referee [`pool::Choice`].
//! - [`session`]: one referee following one answer; the [`session::LocalReferee`] seam.
//! - [`canary`]: canary audits of peer referees against the gateway's own engine.
//! - [`consensus`]: `consensus` mode's comparison of several providers' answers.
//! - [`deferred`]: the durable [`AuditLog`] of `fraud` answers, audited after release.
//! - [`hearsay`]: fraud proofs other gateways gossip, checked before they are acted on.
//! - [`procedure`]: the audit procedure itself, behind the [`procedure::LeafOpener`] and
//!   [`procedure::Referees`] seams.
//! - [`vocab`]: model vocabularies read from GGUF files, and the [`vocab::Transcript`] that
//!   turns an answer's tokens into the text the client reads.
//! - `local` (feature `local-referee`): the gateway's own engine as referee.

pub mod book;
pub mod canary;
pub mod consensus;
pub mod deferred;
pub mod hearsay;
#[cfg(feature = "local-referee")]
pub mod local;
pub mod mode;
pub mod policy;
pub mod pool;
pub mod procedure;
pub mod session;
pub mod vocab;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use libp2p::PeerId;
use proofmesh_shared::commit::SignedCommitment;
use proofmesh_shared::constraint::{Constraint, ConstraintError, Guide};
use proofmesh_shared::net::Client;
use proofmesh_shared::protocol::{GenerateRequest, ModelDigest, OpenLeavesRequest, SignedOpening};
use proofmesh_shared::verify::{AuditFailure, AuditVerdict, FraudProof, Statistics, Tier};
use tokio::sync::Semaphore;

pub use book::{Book, BookError, PeerRecord};
pub use deferred::{AuditId, AuditLog, AuditRecord, AuditStatus};
pub use mode::{ModeError, VerificationMode};
pub use policy::{AuditPolicy, AuditTiers};
pub use pool::RefereePool;
pub use procedure::Answer;
pub use session::{Dialer, LocalReferee, RefereeSession};
pub use vocab::{Transcript, Vocabulary};

use crate::ledger::{self, Hold, Ledger, LedgerConfig};
use crate::metrics::{GatewayMetrics, VerdictLabels};
use crate::registry::{Candidate, Registry};
use pool::Prospect;
use procedure::{LeafOpener, Procedure, Referees, Report, Witness};

/// How the auditor is set up.
#[derive(Debug, Clone, Default)]
pub struct AuditorConfig {
    /// What answers must pass.
    pub policy: AuditPolicy,
    /// The gateway's own engine, as referee.
    pub local: Option<Arc<dyn LocalReferee>>,
    /// Peers the operator trusts as referees.
    pub trusted_referees: Vec<PeerId>,
    /// The peer book's file; `None` keeps the book in memory only.
    pub book: Option<PathBuf>,
    /// Where fraud proofs of failed audits are written, if anywhere.
    pub evidence_dir: Option<PathBuf>,
    /// Vocabularies the gateway trusts (read from model files it was given), by digest: the
    /// text of answers of these models is the gateway's own detokenization.
    pub vocabularies: Vec<(ModelDigest, Arc<Vocabulary>)>,
    /// Prices, and what a proven fraud costs.
    pub ledger: LedgerConfig,
}

/// The verification owner. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Auditor {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    secret: [u8; 32],
    policy: AuditPolicy,
    pool: RefereePool,
    book: Book,
    evidence_dir: Option<PathBuf>,
    dialer: Dialer,
    registry: Registry,
    metrics: Arc<GatewayMetrics>,
    vocabularies: HashMap<ModelDigest, Arc<Vocabulary>>,
    audits: AuditLog,
    ledger: Ledger,
    /// `fraud` answers waiting for (or in) their audit; one more drawn is audited before
    /// release.
    deferred_backlog: Arc<Semaphore>,
    /// Of those, per provider.
    deferred_waiting: Arc<std::sync::Mutex<HashMap<PeerId, usize>>>,
    /// `fraud` audits running at once.
    deferred_running: Arc<Semaphore>,
    /// Answers penalised on proofs heard from other gateways.
    heard: std::sync::Mutex<hearsay::Heard>,
}

/// `fraud` answers that may wait for their audit at once (each holds its request and tokens).
pub const DEFERRED_BACKLOG: usize = 128;
/// `fraud` answers of one provider that may wait for their audit at once.
pub const DEFERRED_PER_PROVIDER: usize = 16;
/// An audit after release must end this long (at most a tenth of the window) before its
/// window closes and its payment comes due.
const DEFERRED_MARGIN: Duration = Duration::from_secs(30);
/// `fraud` audits run at once.
const DEFERRED_RUNNING: usize = 4;

/// An answer released before its audit (`fraud` mode), with what its audit needs.
#[derive(Debug, Clone)]
pub struct Released {
    /// The id its audit is kept under (chosen when the response began: a stream's headers
    /// carry it).
    pub id: AuditId,
    /// Who served it, as routed.
    pub provider: Candidate,
    /// The request sent.
    pub request: GenerateRequest,
    /// The tokens streamed.
    pub tokens: Vec<u32>,
    /// The provider's signed commitment.
    pub commitment: SignedCommitment,
    /// The id of the API key it was asked with ([`crate::access::Caller::owner_id`]), when
    /// keys are on.
    pub caller: Option<String>,
    /// What it earns its provider (µcr), held until its audit window closes.
    pub price: u64,
    /// When it was asked for (unix milliseconds).
    pub asked_ms: u64,
}

/// What the client of a released answer is told about its audit.
#[derive(Debug, Clone)]
pub struct Deferral {
    /// Where to ask for the verdict: `GET /v1/audits/{id}`.
    pub id: AuditId,
    /// When the audit window closes (unix milliseconds).
    pub window_closes_ms: u64,
    /// The audit's outcome, when it ran before release (the provider's queue of audits was
    /// full): the answer is then released only if it may be, as in `merkle`.
    pub audited_now: Option<AuditOutcome>,
}

/// Why no provider may take a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exclusion {
    /// Every provider of the model is benched after a failed audit.
    AllBenched,
    /// None can be audited the way the policy requires.
    Unauditable,
}

/// What an audit found, as the request path reports it.
#[derive(Debug, Clone, Default)]
pub struct AuditOutcome {
    /// The verdict.
    pub verdict: Option<AuditVerdict>,
    /// The steps challenged (empty in `none` mode).
    pub challenged: Vec<u32>,
    /// Time the audit took.
    pub elapsed: Duration,
    /// The referee whose evidence decided: a peer id, or `local`.
    pub referee: Option<String>,
    /// The tier it judged in.
    pub tier: Option<Tier>,
    /// The statistical layer's measurements, when it ran.
    pub statistics: Option<Statistics>,
    /// Bytes of evidence the audit moved.
    pub evidence_bytes: usize,
    /// Whether the provider never opened the leaves of an answer it had already released.
    pub withheld: bool,
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

impl Auditor {
    /// Builds the auditor: opens the book, draws the challenge secret.
    pub fn new(
        config: AuditorConfig,
        dialer: Dialer,
        registry: Registry,
        metrics: Arc<GatewayMetrics>,
    ) -> Result<Self, BookError> {
        let book = match &config.book {
            Some(path) => Book::open(path)?,
            None => Book::in_memory()?,
        };
        let (audits, interrupted) = AuditLog::open(book.database(), book::now_ms())?;
        let ledger = Ledger::open(book.database(), config.ledger)?;
        if interrupted > 0 {
            tracing::warn!(
                interrupted,
                "audits of released answers were running when the gateway stopped; recorded as interrupted"
            );
        }
        Ok(Self {
            inner: Arc::new(Inner {
                secret: rand::random(),
                policy: config.policy,
                pool: RefereePool::new(config.local, config.trusted_referees),
                book,
                evidence_dir: config.evidence_dir,
                dialer,
                registry,
                metrics,
                vocabularies: config.vocabularies.into_iter().collect(),
                audits,
                ledger,
                deferred_backlog: Arc::new(Semaphore::new(DEFERRED_BACKLOG)),
                deferred_waiting: Arc::default(),
                deferred_running: Arc::new(Semaphore::new(DEFERRED_RUNNING)),
                heard: Default::default(),
            }),
        })
    }

    /// A fresh walk through `constraint` over the vocabulary of the model `digest`, the
    /// gateway's own: what it checks a constrained answer's tokens with.
    pub fn guide(
        &self,
        digest: &ModelDigest,
        constraint: &Constraint,
    ) -> Result<Guide, ConstraintError> {
        let vocabulary = self.inner.vocabularies.get(digest).ok_or_else(|| {
            ConstraintError::Vocabulary("this gateway has no vocabulary for the model".into())
        })?;
        vocabulary.token_space()?.guide(constraint)
    }

    /// The model's vocabulary, when the gateway has it.
    pub fn vocabulary(&self, digest: &ModelDigest) -> Option<Arc<Vocabulary>> {
        self.inner.vocabularies.get(digest).cloned()
    }

    /// The gateway's own assembly of an answer's text, when it has the model's vocabulary.
    pub fn transcript(&self, digest: &ModelDigest, stops: &[String]) -> Option<Transcript> {
        self.inner
            .vocabularies
            .get(digest)
            .map(|v| Transcript::new(Arc::clone(v), stops))
    }

    /// Records a failure the gateway saw itself while an answer streamed (text that is not the
    /// tokens'), before any commitment: the provider is penalised; there is nothing signed to
    /// write a proof from.
    pub fn observed(&self, provider: &PeerId, failure: AuditFailure) {
        let inner = &self.inner;
        inner
            .metrics
            .audits
            .get_or_create(&VerdictLabels {
                verdict: "failed",
                reason: failure.to_string(),
            })
            .inc();
        self.convicted(provider);
        tracing::warn!(%provider, %failure, "provider caught while streaming; benched");
    }

    /// What answers must pass.
    pub fn policy(&self) -> &AuditPolicy {
        &self.inner.policy
    }

    /// The per-peer book.
    pub fn book(&self) -> &Book {
        &self.inner.book
    }

    /// The ledger of payments and stakes.
    pub fn ledger(&self) -> &Ledger {
        &self.inner.ledger
    }

    /// A fraud by `provider` was shown to this gateway (its own audit, its own eyes, or a proof
    /// it checked): the provider is benched, forfeits every payment it has held, and its stake
    /// is slashed.
    ///
    /// The ledger goes first: a `kill -9` between the two writes leaves a provider that
    /// forfeited and is not benched yet, never one benched and still to be paid.
    fn convicted(&self, provider: &PeerId) {
        let inner = &self.inner;
        self.forfeit_all(provider);
        inner.book.failed(provider, inner.policy.bench);
    }

    /// Forfeits everything `provider` has held and slashes its stake.
    fn forfeit_all(&self, provider: &PeerId) {
        match self.inner.ledger.forfeit_all(provider) {
            Ok(f) => {
                tracing::warn!(%provider, answers = f.answers, forfeited = f.amount, slashed = f.slashed, "held payments forfeited, stake slashed")
            }
            Err(e) => tracing::error!(%provider, error = %e, "cannot write the ledger"),
        }
    }

    /// The gateway's own engine referee, if any.
    pub fn local(&self) -> Option<&Arc<dyn LocalReferee>> {
        self.inner.pool.local()
    }

    /// The providers a request in `mode` may go to, in routing order: benched ones are left
    /// out; for refereed modes, so are those no trusted referee can audit as the policy
    /// requires. Providers on probation are tried first for a bounded share of requests.
    pub fn admit(
        &self,
        candidates: Vec<Candidate>,
        mode: VerificationMode,
    ) -> Result<Vec<Candidate>, Exclusion> {
        let inner = &self.inner;
        let policy = &inner.policy;
        let live: Vec<Candidate> = candidates
            .into_iter()
            .filter(|c| !inner.book.get(&c.peer).benched())
            .collect();
        if live.is_empty() {
            return Err(Exclusion::AllBenched);
        }
        if mode.audited()
            && live
                .first()
                .is_some_and(|c| !inner.vocabularies.contains_key(&c.card.digest))
        {
            // Without a vocabulary it trusts, the gateway cannot check the text it would send,
            // and a referee passes tokens, not text: no audited mode, opt-ins or not.
            return Err(Exclusion::Unauditable);
        }
        let probation_first = rand::random::<f64>() < policy.probation_share;
        let mut keyed: Vec<((Prospect, bool), Candidate)> = live
            .into_iter()
            .map(|c| {
                let prospect = if mode.audited() {
                    inner
                        .pool
                        .prospect(&inner.registry, &inner.book, policy, &c)
                } else {
                    Prospect::Exact
                };
                let on_probation = inner
                    .book
                    .get(&c.peer)
                    .on_probation(policy.probation_audits);
                ((prospect, on_probation != probation_first), c)
            })
            .filter(|((prospect, _), _)| match prospect {
                Prospect::Exact => true,
                Prospect::Tolerant => policy.tiers == AuditTiers::Any,
                Prospect::Unrefereed => policy.allow_unrefereed,
            })
            .collect();
        if keyed.is_empty() {
            return Err(Exclusion::Unauditable);
        }
        keyed.sort_by_key(|(key, _)| *key);
        Ok(keyed.into_iter().map(|(_, c)| c).collect())
    }

    /// A referee that follows `provider`'s answer to `request` as it streams (refereed modes
    /// only).
    pub fn follow(
        &self,
        provider: &Candidate,
        request: &GenerateRequest,
        mode: VerificationMode,
    ) -> Option<RefereeSession> {
        if !mode.refereed() {
            return None;
        }
        let inner = &self.inner;
        let choice =
            inner
                .pool
                .choose(&inner.registry, &inner.book, &inner.policy, provider, &[])?;
        Some(RefereeSession::start(&inner.dialer, choice, request))
    }

    /// Audits a finished answer (`session` is the referee that followed it) and records what
    /// follows: the book, the metrics, the log and the fraud proof.
    pub async fn judge(
        &self,
        answer: &Answer<'_>,
        mode: VerificationMode,
        session: Option<RefereeSession>,
    ) -> AuditOutcome {
        self.audit(answer, mode, session, Scope::default()).await.0
    }

    /// [`Auditor::judge`], also giving the fraud proof of a penalised failure.
    async fn audit(
        &self,
        answer: &Answer<'_>,
        mode: VerificationMode,
        session: Option<RefereeSession>,
        scope: Scope<'_>,
    ) -> (AuditOutcome, Option<FraudProof>) {
        let released = scope.released;
        let started = Instant::now();
        let inner = &self.inner;
        let on_probation = inner
            .book
            .get(&answer.provider.peer)
            .on_probation(inner.policy.probation_audits);
        let opener = NetOpener(inner.dialer.net.clone());
        let referees = Fresh {
            inner,
            exclude: scope.not_referees,
        };
        let procedure = Procedure {
            secret: &inner.secret,
            policy: &inner.policy,
            on_probation,
            opener: &opener,
            referees: &referees,
            open_patience: if released {
                inner.policy.fraud.open_patience
            } else {
                Duration::ZERO
            },
            also_open: scope.also_open,
        };
        let session = session.map(|s| Box::new(s) as Box<dyn Witness>);
        let report = procedure.run(answer, mode, session).await;
        let elapsed = started.elapsed();
        self.record(answer, mode, &report, elapsed, released);
        if report.verdict == Some(AuditVerdict::Passed)
            && rand::random::<f64>() < inner.policy.canary_rate
        {
            let auditor = self.clone();
            let (request, tokens) = (answer.request.clone(), answer.tokens.to_vec());
            tokio::spawn(async move { auditor.canary(&request, &tokens).await });
        }
        let outcome = AuditOutcome {
            verdict: report.verdict.clone(),
            challenged: report.challenged.clone(),
            elapsed,
            referee: report.referee.as_ref().map(pool::Choice::label),
            tier: report.tier,
            statistics: report.statistics.clone(),
            evidence_bytes: report.evidence_bytes,
            withheld: released && report.unopened,
        };
        (outcome, report.proof.filter(|_| report.penalise))
    }

    /// Releases a `fraud` answer (its commitment already passed the exact checks): records it
    /// under its audit id, and draws whether it is audited, at the provider's rate. A drawn
    /// answer is audited in the background like a merkle one (a fresh referee fed the whole
    /// answer, the gateway's own engine first), with the same consequences, before its window
    /// closes; the provider's silence counts against it like a failure. When the provider's
    /// share of the audits waiting (or the gateway's) is full, the drawn answer is audited at
    /// once instead, before it is released: a provider cannot flood its way out of audits.
    pub async fn defer(&self, released: Released) -> Deferral {
        let inner = &self.inner;
        let policy = &inner.policy;
        let provider = released.provider.peer;
        let on_probation = inner
            .book
            .get(&provider)
            .on_probation(policy.probation_audits);
        let drawn = rand::random::<f64>() < policy.fraud.rate_for(on_probation);
        let now = book::now_ms();
        let window_closes_ms = now.saturating_add(policy.fraud.window.as_millis() as u64);
        let signed = &released.commitment.commitment;
        let record = AuditRecord {
            id: released.id,
            created_ms: now,
            window_closes_ms,
            decided_ms: (!drawn).then_some(now),
            provider: provider.to_string(),
            model_digest: released.request.model_digest.to_string(),
            request_id: released.request.request_id.to_string(),
            merkle_root: hex::encode(signed.merkle_root),
            steps: signed.steps,
            caller: released.caller.clone(),
            status: if drawn {
                AuditStatus::Pending
            } else {
                AuditStatus::NotSampled
            },
            reason: None,
            challenged: Vec::new(),
            referee: None,
            tier: None,
            proof: None,
            audit_ms: None,
            evidence_bytes: None,
        };
        let mut deferral = Deferral {
            id: record.id,
            window_closes_ms,
            audited_now: None,
        };
        let hold = Hold {
            provider: provider.to_bytes(),
            caller: ledger::payer_of(released.caller.clone()),
            amount: released.price,
            closes_ms: window_closes_ms,
            asked_ms: released.asked_ms,
        };
        self.log_write(move |log| log.insert(&record, Some(&hold)))
            .await;
        if !drawn {
            self.count_deferred(AuditStatus::NotSampled, String::new());
            return deferral;
        }
        // The audit must end before the window closes and the payment comes due: a verdict
        // after that would come too late to forfeit it.
        let margin = (policy.fraud.window / 10).min(DEFERRED_MARGIN);
        let deadline = tokio::time::Instant::now() + policy.fraud.window.saturating_sub(margin);
        match self.reserve(provider) {
            Some(reservation) => {
                let auditor = self.clone();
                tokio::spawn(async move {
                    let _reservation = reservation;
                    auditor.audit_released(released, deadline).await;
                });
            }
            None => {
                tracing::info!(%provider, "audits after release of this provider are backed up; auditing its answer before release");
                let id = released.id;
                let outcome = self.audit_released(released, deadline).await;
                // Withheld from the client: nobody pays for it.
                if outcome
                    .as_ref()
                    .is_some_and(|o| !self.deliverable(&o.verdict()))
                {
                    self.ledger_write(move |ledger| ledger.void(id.0)).await;
                }
                deferral.audited_now = outcome;
            }
        }
        deferral
    }

    /// A place in the queue of audits after release: one of the gateway's
    /// [`DEFERRED_BACKLOG`] and one of the provider's [`DEFERRED_PER_PROVIDER`].
    fn reserve(&self, provider: PeerId) -> Option<Reservation> {
        let inner = &self.inner;
        let permit = Arc::clone(&inner.deferred_backlog)
            .try_acquire_owned()
            .ok()?;
        let mut waiting = lock(&inner.deferred_waiting);
        let count = waiting.entry(provider).or_default();
        if *count >= DEFERRED_PER_PROVIDER {
            return None;
        }
        *count += 1;
        Some(Reservation {
            _permit: permit,
            provider,
            waiting: Arc::clone(&inner.deferred_waiting),
        })
    }

    /// Runs a released answer's audit within `window` and settles its record; the outcome,
    /// unless the window closed first.
    async fn audit_released(
        &self,
        released: Released,
        deadline: tokio::time::Instant,
    ) -> Option<AuditOutcome> {
        let inner = &self.inner;
        let run = async {
            let _running = Arc::clone(&inner.deferred_running).acquire_owned().await;
            let answer = Answer {
                provider: &released.provider,
                request: &released.request,
                tokens: &released.tokens,
                commitment: &released.commitment,
                // The gateway checked the text against the tokens as it released them, and any
                // streamed leaves against the commitment before it released the answer.
                text_matches: true,
                constraint_holds: true,
                leaves: None,
            };
            let scope = Scope {
                released: true,
                ..Scope::default()
            };
            self.audit(&answer, VerificationMode::Merkle, None, scope)
                .await
        };
        let (outcome, proof) = match tokio::time::timeout_at(deadline, run).await {
            Ok((outcome, proof)) => (Some(outcome), proof),
            Err(_) => (None, None),
        };
        let status = outcome.as_ref().map_or(AuditStatus::Expired, status_of);
        let failure = match outcome.as_ref().map(AuditOutcome::verdict) {
            Some(AuditVerdict::Failed(failure)) => Some(failure.to_string()),
            _ => None,
        };
        let id = released.id;
        // A pass pays the answer now (a proven fraud, or silence, already forfeited
        // everything its provider had held); anything else waits for the window to close.
        if status == AuditStatus::Passed {
            self.ledger_write(move |ledger| ledger.release(id.0)).await;
        }
        let (written, reason) = (outcome.clone(), failure.clone());
        self.log_write(move |log| {
            log.settle(id, |record| settle(record, status, reason, written, proof))
        })
        .await;
        self.count_deferred(status, failure.unwrap_or_default());
        tracing::debug!(audit = %id, status = status.as_str(), "released answer audited");
        outcome
    }

    /// Runs a write of the ledger off the async workers (it waits for the disk).
    async fn ledger_write<T: Send + 'static>(
        &self,
        write: impl FnOnce(&Ledger) -> Result<T, BookError> + Send + 'static,
    ) {
        write_off_workers("ledger", self.inner.ledger.clone(), write).await;
    }

    /// Runs a write of the audit log off the async workers (it waits for the disk).
    async fn log_write<T: Send + 'static>(
        &self,
        write: impl FnOnce(&AuditLog) -> Result<T, BookError> + Send + 'static,
    ) {
        write_off_workers("audit log", self.inner.audits.clone(), write).await;
    }

    /// The record of a released answer's audit, if kept.
    pub fn audit_record(&self, id: AuditId) -> Result<Option<AuditRecord>, BookError> {
        self.inner.audits.get(id)
    }

    fn count_deferred(&self, status: AuditStatus, reason: String) {
        self.inner
            .metrics
            .deferred_audits
            .get_or_create(&VerdictLabels {
                verdict: status.as_str(),
                reason,
            })
            .inc();
    }

    /// Puts a trusted peer referee of the gateway's own engine's class to a canary audit built
    /// from a passed answer (see [`canary`]); one that differs is struck and dropped.
    pub async fn canary(&self, request: &GenerateRequest, tokens: &[u32]) {
        let inner = &self.inner;
        let Some(local) = inner
            .pool
            .local()
            .filter(|l| l.digest() == request.model_digest)
            .cloned()
        else {
            return;
        };
        let Some(vocabulary) = inner.vocabularies.get(&request.model_digest) else {
            return;
        };
        let peers: Vec<(PeerId, String)> = inner
            .registry
            .referees(&request.model_digest, &local.peer_id())
            .into_iter()
            .filter(|(peer, numerics)| {
                numerics == local.numerics()
                    && inner.pool.trusts(
                        peer,
                        (&request.model_digest, numerics),
                        &inner.book,
                        &inner.policy,
                    )
            })
            .collect();
        if peers.is_empty() {
            return;
        }
        let referee = peers[rand::random::<u32>() as usize % peers.len()].clone();
        let peer = referee.0;
        let outcome = canary::check(
            &inner.dialer,
            local,
            referee,
            request,
            tokens,
            vocabulary.len(),
        )
        .await;
        let label = match outcome {
            canary::CanaryOutcome::Agreed => "agreed",
            canary::CanaryOutcome::Differed => "differed",
            canary::CanaryOutcome::Unjudged => "unjudged",
        };
        inner
            .metrics
            .canaries
            .get_or_create(&VerdictLabels {
                verdict: label,
                reason: String::new(),
            })
            .inc();
        match outcome {
            canary::CanaryOutcome::Agreed => {
                inner.book.referee_confirmed(&peer);
                tracing::debug!(referee = %peer, "canary audit: the referee agreed with the gateway's engine");
            }
            canary::CanaryOutcome::Differed => {
                inner.metrics.referee_strikes.inc();
                inner.book.referee_struck(&peer);
                tracing::warn!(referee = %peer, "canary audit: the referee's evidence is not the model's; referee dropped");
            }
            canary::CanaryOutcome::Unjudged => {}
        }
    }

    /// Whether an answer with this verdict may reach the client.
    pub fn deliverable(&self, verdict: &AuditVerdict) -> bool {
        match verdict {
            AuditVerdict::Passed | AuditVerdict::Unaudited => true,
            AuditVerdict::Unrefereed => self.inner.policy.allow_unrefereed,
            AuditVerdict::Inconclusive | AuditVerdict::Failed(_) => false,
        }
    }

    /// The book, the metrics, the log and the proof.
    fn record(
        &self,
        answer: &Answer<'_>,
        mode: VerificationMode,
        report: &Report,
        elapsed: Duration,
        released: bool,
    ) {
        let inner = &self.inner;
        let provider = answer.provider.peer;
        let verdict = report.verdict();
        let (label, reason) = match &verdict {
            AuditVerdict::Unaudited => ("unaudited", String::new()),
            AuditVerdict::Unrefereed => ("unrefereed", String::new()),
            AuditVerdict::Inconclusive => ("inconclusive", String::new()),
            AuditVerdict::Passed => ("passed", String::new()),
            AuditVerdict::Failed(failure) => ("failed", failure.to_string()),
        };
        // A fraud answer's release check is not its audit: that one is counted when it ends;
        // nor is a consensus answer's (its comparison is counted by itself).
        let release_check = matches!(mode, VerificationMode::Fraud | VerificationMode::Consensus);
        if !(release_check && verdict == AuditVerdict::Unaudited) {
            inner
                .metrics
                .audits
                .get_or_create(&VerdictLabels {
                    verdict: label,
                    reason,
                })
                .inc();
        }
        if mode.refereed() {
            inner.metrics.audit_seconds.observe(elapsed.as_secs_f64());
        }
        inner
            .metrics
            .referee_failures
            .inc_by(report.referee_failures as u64);
        for referee in &report.confirmed {
            inner.book.referee_confirmed(referee);
        }
        for referee in &report.struck {
            inner.metrics.referee_strikes.inc();
            inner.book.referee_struck(referee);
        }
        match verdict {
            AuditVerdict::Passed => {
                inner.book.passed(&provider);
            }
            AuditVerdict::Inconclusive if report.unopened && released => {
                // Silence must cost what being caught costs, or a cheat would never open the
                // answers it faked: everything held is forfeited and the stake slashed.
                self.forfeit_all(&provider);
                inner.book.withheld(&provider, inner.policy.bench);
                tracing::warn!(%provider, request = %answer.request.request_id, "a provider never opened the leaves of an answer already released; benched");
            }
            AuditVerdict::Inconclusive if report.unopened => {
                let policy = &inner.policy;
                let record = inner
                    .book
                    .unopened(&provider, policy.unopened_limit, policy.bench);
                if record.benched() {
                    tracing::warn!(%provider, limit = policy.unopened_limit, "a provider left its leaves unopened audit after audit; benched");
                }
            }
            AuditVerdict::Failed(failure) if report.penalise => {
                self.convicted(&provider);
                let saved = report.proof.as_ref().and_then(|p| self.save_proof(p));
                // An echo of this proof from another gateway costs the provider nothing more.
                lock(&inner.heard).first((provider.to_bytes(), answer.request.request_id));
                if let Some(proof) = &report.proof {
                    // Other gateways check it and exclude the provider too.
                    let (net, bytes) = (inner.dialer.net.clone(), proof.to_cbor());
                    tokio::spawn(async move { net.publish_proof(bytes).await });
                }
                let stats = report.statistics.as_ref();
                tracing::warn!(
                    %provider,
                    request = %answer.request.request_id,
                    %failure,
                    model = %answer.request.model_digest,
                    merkle_root = %hex::encode(answer.commitment.commitment.merkle_root),
                    steps = answer.commitment.commitment.steps,
                    numerics = %answer.commitment.commitment.numerics,
                    challenged = ?report.challenged,
                    referee = ?report.referee.as_ref().map(pool::Choice::label),
                    tier = ?report.tier,
                    median_distance = ?stats.map(|s| s.median_distance),
                    max_distance = ?stats.map(|s| s.max_distance),
                    excess_margin = ?stats.map(|s| s.excess_margin),
                    max_margin = ?stats.map(|s| s.max_margin),
                    proof = ?saved,
                    "audit failed; provider benched"
                );
            }
            _ => {}
        }
    }

    /// Writes the proof as CBOR into the evidence directory; returns its path.
    fn save_proof(&self, proof: &FraudProof) -> Option<PathBuf> {
        let dir = self.inner.evidence_dir.as_ref()?;
        // The provider too: the answers of a consensus share their request id.
        let provider = libp2p::PeerId::from_bytes(&proof.provider)
            .map_or_else(|_| "unknown".to_string(), |p| p.to_string());
        let path = dir.join(format!(
            "{}-{}-{provider}.cbor",
            crate::openai::response::unix_now(),
            proof.request.request_id
        ));
        let written = std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::write(&path, proof.to_cbor()))
            .map_err(|e| e.to_string());
        match written {
            Ok(()) => Some(path),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot write the fraud proof");
                None
            }
        }
    }
}

/// A place held in the queue of audits after release; given back when dropped.
struct Reservation {
    _permit: tokio::sync::OwnedSemaphorePermit,
    provider: PeerId,
    waiting: Arc<std::sync::Mutex<HashMap<PeerId, usize>>>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut waiting = lock(&self.waiting);
        if let Some(count) = waiting.get_mut(&self.provider) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                waiting.remove(&self.provider);
            }
        }
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The record's status for an audit's outcome.
fn status_of(outcome: &AuditOutcome) -> AuditStatus {
    if outcome.withheld {
        return AuditStatus::Withheld;
    }
    match outcome.verdict() {
        AuditVerdict::Passed => AuditStatus::Passed,
        AuditVerdict::Failed(_) => AuditStatus::Failed,
        AuditVerdict::Unrefereed => AuditStatus::Unrefereed,
        AuditVerdict::Inconclusive | AuditVerdict::Unaudited => AuditStatus::Inconclusive,
    }
}

/// Writes how an audit after release ended into its record: its `status`, the `failure` it
/// found, and its outcome and proof (`None`: the window closed first).
fn settle(
    record: &mut AuditRecord,
    status: AuditStatus,
    failure: Option<String>,
    outcome: Option<AuditOutcome>,
    proof: Option<FraudProof>,
) {
    record.decided_ms = Some(book::now_ms());
    record.status = status;
    let Some(outcome) = outcome else {
        record.reason = Some("the audit window closed before the audit ended".into());
        return;
    };
    record.reason = failure;
    record.challenged = outcome.challenged;
    record.referee = outcome.referee;
    record.tier = outcome.tier.map(|t| t.as_str().to_string());
    record.proof = proof.as_ref().map(FraudProof::to_cbor);
    record.audit_ms = Some(outcome.elapsed.as_millis() as u64);
    record.evidence_bytes = Some(outcome.evidence_bytes as u64);
}

/// Leaf openings over the mesh's request-response protocol.
struct NetOpener(Client);

#[async_trait]
impl LeafOpener for NetOpener {
    async fn open(
        &self,
        provider: PeerId,
        request: OpenLeavesRequest,
    ) -> Result<SignedOpening, String> {
        self.0
            .open_leaves(provider, request)
            .await
            .map_err(|e| e.to_string())
    }
}

/// What sets one audit apart from a plain one before release.
#[derive(Debug, Default, Clone, Copy)]
struct Scope<'a> {
    /// The answer already reached its client (`fraud`): a provider's silence is held against
    /// it.
    released: bool,
    /// Peers that may not referee it (the other providers of a consensus).
    not_referees: &'a [PeerId],
    /// A step that must be among those challenged (where consensus answers first differ).
    also_open: Option<u32>,
}

/// Fresh referees from the trusted pool, each fed the whole answer at once, none of `exclude`.
struct Fresh<'a> {
    inner: &'a Inner,
    exclude: &'a [PeerId],
}

impl Referees for Fresh<'_> {
    fn fresh(&self, answer: &Answer<'_>, exclude: &[PeerId]) -> Option<Box<dyn Witness>> {
        let inner = self.inner;
        let exclude: Vec<PeerId> = exclude.iter().chain(self.exclude).copied().collect();
        let choice = inner.pool.choose(
            &inner.registry,
            &inner.book,
            &inner.policy,
            answer.provider,
            &exclude,
        )?;
        let session = RefereeSession::start(&inner.dialer, choice, answer.request);
        session.push_all(answer.tokens);
        Some(Box::new(session))
    }
}

/// Runs `write` on `store` on a blocking thread and logs its failure: a write that fails is
/// logged and the gateway goes on serving.
async fn write_off_workers<S: Send + 'static, T: Send + 'static>(
    what: &'static str,
    store: S,
    write: impl FnOnce(&S) -> Result<T, BookError> + Send + 'static,
) {
    match tokio::task::spawn_blocking(move || write(&store)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "cannot write the {what}"),
        Err(e) => tracing::error!(error = %e, "the {what} writer failed"),
    }
}
