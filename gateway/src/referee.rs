//! Choosing a referee for an answer and following the answer with it.
//!
//! A [`RefereeSession`] starts as soon as a provider accepts a merkle request: the gateway picks
//! a referee ([`choose`]: its own engine when started with the model file, else a random other
//! provider of the same digest, preferring one whose numerics class matches the provider's so
//! the audit can be exact), forwards every claimed token as it arrives ([`RefereeSession::push`])
//! and, once the signed commitment is in, asks for evidence on the challenged steps
//! ([`RefereeSession::finish`]). The session's task owns the referee stream; the generation loop
//! only drops tokens into a channel, so a slow referee never slows the answer down.

use std::time::Duration;

use libp2p::PeerId;
use proofmesh_provider::referee::{Referee, RefereeJob};
use proofmesh_shared::commit::SignedCommitment;
use proofmesh_shared::protocol::{
    FrameError, GenerateRequest, MAX_EVIDENCE_FRAME, MAX_TOKENS_PER_FRAME, REFEREE_PROTOCOL,
    RefereeFrame, RefereeReply, RemoteErrorKind, read_frame, write_frame,
};
use proofmesh_shared::verify::{SignedEvidence, Tier};
use tokio::sync::{mpsc, oneshot};

use crate::registry::Candidate;
use crate::state::AppState;

/// Opening a referee stream and getting `Accepted`: a live peer answers in milliseconds.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Tries at opening a referee stream the acceptor dropped (see `inference::try_start`).
const OPEN_ATTEMPTS: u32 = 4;
/// How long the gateway waits for evidence after `Finish`: the referee still has to re-execute
/// what it had not caught up with, which on a busy CPU referee may be a whole answer (2,000
/// tokens at a slow 50 tokens/s is 40 s). Past this the gateway tries another referee.
const EVIDENCE_TIMEOUT: Duration = Duration::from_secs(60);

/// Who re-executes an answer.
#[derive(Debug, Clone)]
pub enum Choice {
    /// The gateway's own engine.
    Local(Box<Referee>),
    /// Another provider of the same model.
    Remote {
        /// The referee.
        peer: PeerId,
    },
}

impl Choice {
    /// The peer whose key signs the evidence.
    pub fn peer(&self) -> PeerId {
        match self {
            Self::Local(referee) => referee.peer_id(),
            Self::Remote { peer } => *peer,
        }
    }

    /// How logs and responses name it: the peer id, or `local`.
    pub fn label(&self) -> String {
        match self {
            Self::Local(_) => "local".into(),
            Self::Remote { peer } => peer.to_string(),
        }
    }
}

/// Which audit tiers the gateway accepts for merkle answers.
///
/// In the exact tier (provider and referee of one deterministic numerics class) honest logits
/// agree bit for bit and every cheat in the attack suite is caught in every request. In the
/// tolerant tier (other numerics: f16 KV cache, GPU against CPU) the limits must sit above
/// kernel noise, and a cheat whose cheaper decoder departs from the claimed model only at
/// near-ties passes some requests (`bench/calibration.md`). Since a provider declares its own
/// numerics, a cheat could pick the tolerant tier; so by default no merkle answer is audited
/// in it.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum AuditTiers {
    /// Merkle requests go only to providers a referee of their own deterministic numerics class
    /// can re-execute (or, when the model has no referee at all, to any provider, and the
    /// verdict says `unrefereed`).
    #[default]
    Exact,
    /// Also audit across numerics classes, in the tolerant tier (e.g. GPU providers refereed
    /// on CPU), accepting its weaker detection of near-tie cheats.
    Any,
}

/// How an answer of a candidate would be audited with the referees available now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Prospect {
    /// A referee of the provider's own deterministic class is available.
    Exact,
    /// No referee at all: exact checks only, verdict `unrefereed`.
    Unrefereed,
    /// Only referees of other numerics classes.
    Tolerant,
}

/// Whether a referee with `numerics` audits `provider` in the exact tier.
fn exact_with(provider: &Candidate, numerics: &str) -> bool {
    Tier::between(&provider.card.numerics, numerics) == Tier::Exact
}

fn prospect(state: &AppState, provider: &Candidate) -> Prospect {
    let exact = |numerics: &str| exact_with(provider, numerics);
    let local = state
        .local_referee
        .as_ref()
        .filter(|local| local.digest() == provider.card.digest);
    let remote = state
        .registry
        .referees(&provider.card.digest, &provider.peer);
    if local.is_some_and(|l| exact(l.numerics())) || remote.iter().any(|(_, n)| exact(n)) {
        Prospect::Exact
    } else if local.is_none() && remote.is_empty() {
        Prospect::Unrefereed
    } else {
        Prospect::Tolerant
    }
}

/// The candidates a merkle request may go to under the gateway's [`AuditTiers`], in routing
/// order: with [`AuditTiers::Exact`], providers a same-class referee can audit first (load
/// order kept among them), then those of a model nobody referees; providers that could only
/// be audited in the tolerant tier are left out. With [`AuditTiers::Any`], all of them as given.
pub fn auditable(state: &AppState, candidates: Vec<Candidate>) -> Vec<Candidate> {
    if state.audit_tiers == AuditTiers::Any {
        return candidates;
    }
    let mut keyed: Vec<(Prospect, Candidate)> = candidates
        .into_iter()
        .map(|c| (prospect(state, &c), c))
        .filter(|(p, _)| *p != Prospect::Tolerant)
        .collect();
    keyed.sort_by_key(|(p, _)| *p);
    keyed.into_iter().map(|(_, c)| c).collect()
}

/// Picks a referee for `provider`'s answer, never `provider` itself and none of `exclude`.
/// Under [`AuditTiers::Exact`] only a referee of the provider's own deterministic class will
/// do; otherwise one of the same class is preferred, then any.
///
/// The gateway's own referee goes first while it has a free context; when it is busy a peer is
/// preferred, and only when there is none is the busy local referee chosen (its session then
/// ends [`SessionError::Busy`], and the audit asks again once a context frees).
pub fn choose(state: &AppState, provider: &Candidate, exclude: &[PeerId]) -> Option<Choice> {
    let exact = |numerics: &str| exact_with(provider, numerics);
    let exact_only = state.audit_tiers == AuditTiers::Exact;
    let local = state.local_referee.as_ref().filter(|local| {
        local.digest() == provider.card.digest
            && !exclude.contains(&local.peer_id())
            && (!exact_only || exact(local.numerics()))
    });
    if let Some(local) = local
        && local.has_capacity()
    {
        return Some(Choice::Local(Box::new(local.clone())));
    }
    let mut peers = state
        .registry
        .referees(&provider.card.digest, &provider.peer);
    peers.retain(|(peer, _)| !exclude.contains(peer));
    // A referee with the provider's own deterministic numerics makes the audit exact; under
    // `Any`, one of the same non-deterministic class is still the closest match.
    let same: Vec<PeerId> = peers
        .iter()
        .filter(|(_, numerics)| {
            *numerics == provider.card.numerics && (!exact_only || exact(numerics))
        })
        .map(|(peer, _)| *peer)
        .collect();
    let pool: Vec<PeerId> = if same.is_empty() && !exact_only {
        peers.into_iter().map(|(peer, _)| peer).collect()
    } else {
        same
    };
    if pool.is_empty() {
        return local.map(|local| Choice::Local(Box::new(local.clone())));
    }
    let peer = pool[rand::random::<u32>() as usize % pool.len()];
    Some(Choice::Remote { peer })
}

/// Why a session produced no evidence: always the referee's problem, never the provider's.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The referee could not be reached or its stream broke.
    #[error("referee unreachable: {0}")]
    Unreachable(String),
    /// The referee refused or failed the job.
    #[error("referee refused: {0}")]
    Refused(String),
    /// Every re-execution context of the referee is taken; asking again a little later works.
    #[error("referee busy: {0}")]
    Busy(String),
    /// The referee took too long.
    #[error("referee timed out")]
    Timeout,
    /// The session's task is gone.
    #[error("referee session ended")]
    Ended,
}

enum Command {
    Tokens(Vec<u32>),
    Finish {
        commitment: Box<SignedCommitment>,
        indices: Vec<u32>,
        reply: oneshot::Sender<Result<SignedEvidence, SessionError>>,
    },
    Open {
        indices: Vec<u32>,
        reply: oneshot::Sender<Result<SignedEvidence, SessionError>>,
    },
}

/// One answer followed by one referee.
#[derive(Debug)]
pub struct RefereeSession {
    choice: Choice,
    commands: mpsc::UnboundedSender<Command>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tokens(t) => write!(f, "Tokens({})", t.len()),
            Self::Finish { indices, .. } => write!(f, "Finish({indices:?})"),
            Self::Open { indices, .. } => write!(f, "Open({indices:?})"),
        }
    }
}

impl RefereeSession {
    /// Starts following `request`, answered by `provider`, with `choice`. Returns at once; the
    /// referee is reached in the background and tokens pushed meanwhile wait for it.
    pub fn start(
        state: &AppState,
        choice: Choice,
        request: &GenerateRequest,
        provider: PeerId,
    ) -> Self {
        let (commands, inbox) = mpsc::unbounded_channel();
        let task = Task {
            state: state.clone(),
            request: request.clone(),
            provider,
            inbox,
        };
        match &choice {
            Choice::Local(referee) => {
                tokio::spawn(task.run_local((**referee).clone()));
            }
            Choice::Remote { peer } => {
                tokio::spawn(task.run_remote(*peer));
            }
        }
        Self { choice, commands }
    }

    /// The referee.
    pub fn choice(&self) -> &Choice {
        &self.choice
    }

    /// Forwards one claimed token (in step order).
    pub fn push(&self, token: u32) {
        let _ = self.commands.send(Command::Tokens(vec![token]));
    }

    /// Forwards several claimed tokens (in step order).
    pub fn push_all(&self, tokens: &[u32]) {
        for chunk in tokens.chunks(MAX_TOKENS_PER_FRAME) {
            let _ = self.commands.send(Command::Tokens(chunk.to_vec()));
        }
    }

    /// Hands over the commitment and waits for evidence on `indices`.
    pub async fn finish(
        &self,
        commitment: &SignedCommitment,
        indices: &[u32],
    ) -> Result<SignedEvidence, SessionError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Finish {
                commitment: Box::new(commitment.clone()),
                indices: indices.to_vec(),
                reply,
            })
            .map_err(|_| SessionError::Ended)?;
        answer.await.map_err(|_| SessionError::Ended)?
    }

    /// Evidence on further steps, after [`RefereeSession::finish`].
    pub async fn open(&self, indices: &[u32]) -> Result<SignedEvidence, SessionError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Open {
                indices: indices.to_vec(),
                reply,
            })
            .map_err(|_| SessionError::Ended)?;
        answer.await.map_err(|_| SessionError::Ended)?
    }
}

/// The session's background side.
struct Task {
    state: AppState,
    request: GenerateRequest,
    provider: PeerId,
    inbox: mpsc::UnboundedReceiver<Command>,
}

impl Task {
    /// Runs the job on the gateway's own engine.
    async fn run_local(mut self, referee: Referee) {
        let asker = self.state.net.local_peer_id();
        let mut job: Result<RefereeJob, SessionError> = referee
            .begin(self.request.clone(), self.provider, asker)
            .map_err(|e| match e.kind() {
                RemoteErrorKind::Overloaded => SessionError::Busy(e.to_string()),
                _ => SessionError::Refused(e.to_string()),
            });
        let mut pushed = 0u32;
        while let Some(command) = self.inbox.recv().await {
            match command {
                Command::Tokens(tokens) => {
                    if let Ok(j) = &mut job {
                        if let Err(e) = j.push(pushed, &tokens) {
                            job = Err(SessionError::Refused(e.to_string()));
                        }
                        pushed += tokens.len() as u32;
                    }
                }
                Command::Finish {
                    commitment,
                    indices,
                    reply,
                } => {
                    let result = match &mut job {
                        Ok(j) => j
                            .finish(&commitment, &indices)
                            .await
                            .map_err(|e| SessionError::Refused(e.to_string())),
                        Err(e) => Err(e.clone()),
                    };
                    let _ = reply.send(result);
                    let Ok(j) = &job else { continue };
                    // Later `Open`s need the commitment again.
                    while let Some(Command::Open { indices, reply }) = self.inbox.recv().await {
                        let _ = reply.send(
                            j.open(&commitment, &indices)
                                .map_err(|e| SessionError::Refused(e.to_string())),
                        );
                    }
                    return;
                }
                Command::Open { reply, .. } => {
                    let _ = reply.send(Err(SessionError::Refused("open before finish".into())));
                }
            }
        }
    }

    /// Runs the job on another provider over `/proofmesh/referee/1`.
    async fn run_remote(mut self, peer: PeerId) {
        let mut stream = match self.connect(peer).await {
            Ok(stream) => Ok(stream),
            Err(e) => {
                tracing::warn!(referee = %peer, error = %e, "referee not available");
                Err(e)
            }
        };
        let mut next_step = 0u32;
        while let Some(command) = self.inbox.recv().await {
            match command {
                Command::Tokens(mut tokens) => {
                    // Coalesce whatever else is already waiting.
                    while tokens.len() < MAX_TOKENS_PER_FRAME {
                        match self.inbox.try_recv() {
                            Ok(Command::Tokens(more)) => tokens.extend(more),
                            Ok(other) => {
                                self.send_tokens(&mut stream, &mut next_step, tokens).await;
                                tokens = Vec::new();
                                self.handle_remote(&mut stream, other).await;
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    if !tokens.is_empty() {
                        self.send_tokens(&mut stream, &mut next_step, tokens).await;
                    }
                }
                other => self.handle_remote(&mut stream, other).await,
            }
        }
    }

    async fn send_tokens(
        &self,
        stream: &mut Result<libp2p::Stream, SessionError>,
        next_step: &mut u32,
        tokens: Vec<u32>,
    ) {
        let Ok(s) = stream else { return };
        let count = tokens.len() as u32;
        let frame = RefereeFrame::Tokens {
            first_step: *next_step,
            tokens,
        };
        *next_step += count;
        if let Err(e) = write_frame(s, &frame).await {
            *stream = Err(SessionError::Unreachable(e.to_string()));
        }
    }

    async fn handle_remote(
        &self,
        stream: &mut Result<libp2p::Stream, SessionError>,
        command: Command,
    ) {
        let (frame, reply) = match command {
            Command::Finish {
                commitment,
                indices,
                reply,
            } => (
                RefereeFrame::Finish {
                    commitment,
                    indices,
                },
                reply,
            ),
            Command::Open { indices, reply } => (RefereeFrame::Open { indices }, reply),
            Command::Tokens(_) => return,
        };
        let s = match stream {
            Ok(s) => s,
            Err(e) => {
                let _ = reply.send(Err(e.clone()));
                return;
            }
        };
        let result = exchange(s, &frame).await;
        if let Err(e) = &result {
            *stream = Err(e.clone());
        }
        let _ = reply.send(result);
    }

    /// Opens the stream, sends `Begin` and waits for `Accepted`.
    async fn connect(&self, peer: PeerId) -> Result<libp2p::Stream, SessionError> {
        let begin = RefereeFrame::Begin {
            request: Box::new(self.request.clone()),
            provider: self.provider.to_bytes(),
        };
        let mut last = SessionError::Unreachable("no attempt".into());
        for attempt in 1..=OPEN_ATTEMPTS {
            let mut control = self.state.net.stream_control();
            let opened =
                tokio::time::timeout(OPEN_TIMEOUT, control.open_stream(peer, REFEREE_PROTOCOL))
                    .await;
            let mut stream = match opened {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => return Err(SessionError::Unreachable(e.to_string())),
                Err(_) => return Err(SessionError::Timeout),
            };
            let answer = tokio::time::timeout(OPEN_TIMEOUT, async {
                write_frame(&mut stream, &begin).await?;
                read_frame::<_, RefereeReply>(&mut stream, MAX_EVIDENCE_FRAME).await
            })
            .await;
            match answer {
                Ok(Ok(RefereeReply::Accepted { .. })) => return Ok(stream),
                Ok(Ok(RefereeReply::Error {
                    kind: RemoteErrorKind::Overloaded,
                    message,
                })) => return Err(SessionError::Busy(message)),
                Ok(Ok(RefereeReply::Error { message, .. })) => {
                    return Err(SessionError::Refused(message));
                }
                Ok(Ok(RefereeReply::Evidence(_))) => {
                    return Err(SessionError::Refused("protocol violation".into()));
                }
                // Dropped by the referee's acceptor before it took the stream: try again.
                Ok(Err(FrameError::Closed)) => {
                    last = SessionError::Unreachable("stream dropped".into());
                    tokio::time::sleep(Duration::from_millis(10 * u64::from(attempt))).await;
                }
                Ok(Err(e)) => return Err(SessionError::Unreachable(e.to_string())),
                Err(_) => return Err(SessionError::Timeout),
            }
        }
        Err(last)
    }
}

/// Writes `Finish` or `Open` and reads the evidence.
async fn exchange(
    stream: &mut libp2p::Stream,
    frame: &RefereeFrame,
) -> Result<SignedEvidence, SessionError> {
    write_frame(stream, frame)
        .await
        .map_err(|e| SessionError::Unreachable(e.to_string()))?;
    match tokio::time::timeout(EVIDENCE_TIMEOUT, read_frame(stream, MAX_EVIDENCE_FRAME)).await {
        Ok(Ok(RefereeReply::Evidence(evidence))) => Ok(*evidence),
        Ok(Ok(RefereeReply::Error { message, .. })) => Err(SessionError::Refused(message)),
        Ok(Ok(RefereeReply::Accepted { .. })) => {
            Err(SessionError::Refused("protocol violation".into()))
        }
        Ok(Err(e)) => Err(SessionError::Unreachable(e.to_string())),
        Err(_) => Err(SessionError::Timeout),
    }
}
