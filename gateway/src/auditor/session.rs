//! One referee following one answer.
//!
//! A [`RefereeSession`] starts as soon as a provider accepts a merkle request: the gateway
//! forwards every claimed token as it arrives ([`RefereeSession::push`]) and, once the signed
//! commitment is in and the challenge drawn, asks for evidence on the challenged steps
//! ([`RefereeSession::finish`]). The referee is told the request and the tokens, never who
//! answered. The session's task owns the referee stream (or the local engine's job); the
//! generation loop only drops tokens into a channel, so a slow referee never slows the answer
//! down.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use libp2p::PeerId;
use libp2p::identity::Keypair;
use proofmesh_shared::net::Client;
use proofmesh_shared::protocol::{
    GenerateRequest, MAX_EVIDENCE_FRAME, MAX_TOKENS_PER_FRAME, ModelDigest, REFEREE_PROTOCOL,
    REFEREE_STREAMS_PER_REFEREE, RefereeFrame, RefereeReply, RefereeTicket, RemoteErrorKind,
    TICKET_LIFETIME, read_frame, write_frame,
};
use proofmesh_shared::verify::SignedEvidence;
use tokio::sync::{mpsc, oneshot};

use super::pool::Choice;

/// Opening a referee stream and getting `Accepted`: a live peer answers in milliseconds.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the gateway waits for evidence after `Finish`: the referee still has to re-execute
/// what it had not caught up with, which on a busy CPU referee may be a whole answer (2,000
/// tokens at a slow 50 tokens/s is 40 s). Past this the gateway tries another referee.
const EVIDENCE_TIMEOUT: Duration = Duration::from_secs(60);
/// Token commands a session buffers for a referee that is slower than the provider: a whole
/// answer at the longest context we serve, one token a command.
const MAX_QUEUED_COMMANDS: usize = 65_536;

/// The gateway's own engine, as a referee. Implemented by the engine crate's referee when the
/// gateway is built with the `local-referee` feature (`super::local`); tests of the audit
/// procedure use fakes.
pub trait LocalReferee: Send + Sync + std::fmt::Debug {
    /// The key that signs its evidence.
    fn peer_id(&self) -> PeerId;
    /// The model it re-executes.
    fn digest(&self) -> ModelDigest;
    /// Its numerics class.
    fn numerics(&self) -> &str;
    /// Whether a job could start now (a context is free).
    fn has_capacity(&self) -> bool;
    /// Starts re-executing an answer to `request`.
    fn begin(&self, request: GenerateRequest) -> Result<Box<dyn LocalJob>, SessionError>;
}

/// One answer being re-executed by the gateway's own engine.
#[async_trait]
pub trait LocalJob: Send + Sync {
    /// Feeds claimed tokens starting at `first_step`.
    fn push(&mut self, first_step: u32, tokens: &[u32]) -> Result<(), String>;
    /// Waits for the re-execution and returns evidence on `indices`.
    async fn finish(&mut self, indices: &[u32]) -> Result<SignedEvidence, String>;
    /// Evidence on further steps, after `finish`.
    fn open(&self, indices: &[u32]) -> Result<SignedEvidence, String>;
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
        indices: Vec<u32>,
        reply: oneshot::Sender<Result<SignedEvidence, SessionError>>,
    },
    Open {
        indices: Vec<u32>,
        reply: oneshot::Sender<Result<SignedEvidence, SessionError>>,
    },
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

/// What a session needs from the gateway: the mesh, the key that signs referee tickets, and
/// the count of streams open to each referee.
#[derive(Debug, Clone)]
pub struct Dialer {
    /// The mesh.
    pub net: Client,
    /// The gateway's node key.
    pub keypair: Keypair,
    /// Streams open to each referee.
    pub streams: RefereeStreams,
}

/// The referee streams this gateway holds to each referee, kept at most
/// [`REFEREE_STREAMS_PER_REFEREE`]: below the referee's quota for one gateway, so that an honest
/// gateway is never turned away at its door (and struck for it).
#[derive(Debug, Clone, Default)]
pub struct RefereeStreams(Arc<std::sync::Mutex<HashMap<PeerId, usize>>>);

impl RefereeStreams {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, usize>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place for one more stream to `peer`, or `None` when all are in use.
    fn take(&self, peer: PeerId) -> Option<RefereeStream> {
        let mut open = self.lock();
        let n = open.entry(peer).or_default();
        if *n >= REFEREE_STREAMS_PER_REFEREE {
            return None;
        }
        *n += 1;
        Some(RefereeStream {
            streams: self.clone(),
            peer,
        })
    }
}

/// One stream's place in [`RefereeStreams`], given back on drop.
#[derive(Debug)]
struct RefereeStream {
    streams: RefereeStreams,
    peer: PeerId,
}

impl Drop for RefereeStream {
    fn drop(&mut self) {
        let mut open = self.streams.lock();
        if let Some(n) = open.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.peer);
            }
        }
    }
}

/// One answer followed by one referee.
#[derive(Debug)]
pub struct RefereeSession {
    choice: Choice,
    commands: mpsc::Sender<Command>,
}

impl RefereeSession {
    /// Starts following `request` with `choice`. Returns at once; the referee is reached in the
    /// background and tokens pushed meanwhile wait for it.
    pub fn start(dialer: &Dialer, choice: Choice, request: &GenerateRequest) -> Self {
        let (commands, inbox) = mpsc::channel(MAX_QUEUED_COMMANDS);
        let task = Task {
            dialer: dialer.clone(),
            request: request.clone(),
            inbox,
        };
        match &choice {
            Choice::Local(referee) => {
                tokio::spawn(task.run_local(Arc::clone(referee)));
            }
            Choice::Remote { peer, .. } => {
                tokio::spawn(task.run_remote(*peer));
            }
        }
        Self { choice, commands }
    }

    /// The referee.
    pub fn choice(&self) -> &Choice {
        &self.choice
    }

    /// Forwards one claimed token (in step order). A referee too far behind loses the job.
    pub fn push(&self, token: u32) {
        let _ = self.commands.try_send(Command::Tokens(vec![token]));
    }

    /// Forwards several claimed tokens (in step order).
    pub fn push_all(&self, tokens: &[u32]) {
        for chunk in tokens.chunks(MAX_TOKENS_PER_FRAME) {
            let _ = self.commands.try_send(Command::Tokens(chunk.to_vec()));
        }
    }

    /// Asks for evidence on `indices` once every token was pushed.
    pub async fn finish(&self, indices: &[u32]) -> Result<SignedEvidence, SessionError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Finish {
                indices: indices.to_vec(),
                reply,
            })
            .await
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
            .await
            .map_err(|_| SessionError::Ended)?;
        answer.await.map_err(|_| SessionError::Ended)?
    }
}

/// The session's background side.
struct Task {
    dialer: Dialer,
    request: GenerateRequest,
    inbox: mpsc::Receiver<Command>,
}

impl Task {
    /// Runs the job on the gateway's own engine.
    async fn run_local(mut self, referee: Arc<dyn LocalReferee>) {
        let mut job: Result<Box<dyn LocalJob>, SessionError> = referee.begin(self.request.clone());
        let mut pushed = 0u32;
        while let Some(command) = self.inbox.recv().await {
            match command {
                Command::Tokens(tokens) => {
                    if let Ok(j) = &mut job {
                        if let Err(e) = j.push(pushed, &tokens) {
                            job = Err(SessionError::Refused(e));
                        }
                        pushed += tokens.len() as u32;
                    }
                }
                Command::Finish { indices, reply } => {
                    let result = match &mut job {
                        Ok(j) => j.finish(&indices).await.map_err(SessionError::Refused),
                        Err(e) => Err(e.clone()),
                    };
                    let _ = reply.send(result);
                    let Ok(j) = &job else { continue };
                    while let Some(Command::Open { indices, reply }) = self.inbox.recv().await {
                        let _ = reply.send(j.open(&indices).map_err(SessionError::Refused));
                    }
                    return;
                }
                Command::Open { reply, .. } => {
                    let _ = reply.send(Err(SessionError::Refused("open before finish".into())));
                }
            }
        }
    }

    /// Runs the job on another provider over `/proofmesh/referee/2`.
    async fn run_remote(mut self, peer: PeerId) {
        let place = self.dialer.streams.take(peer);
        let connected = match &place {
            Some(_) => self.connect(peer).await,
            None => Err(SessionError::Busy(
                "this gateway's streams to the referee are all in use".into(),
            )),
        };
        let mut stream = match connected {
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
                                send_tokens(&mut stream, &mut next_step, tokens).await;
                                tokens = Vec::new();
                                handle_remote(&mut stream, other).await;
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    if !tokens.is_empty() {
                        send_tokens(&mut stream, &mut next_step, tokens).await;
                    }
                }
                other => handle_remote(&mut stream, other).await,
            }
        }
    }

    /// Opens the stream, sends `Begin` with a ticket for this referee, and waits for `Accepted`.
    async fn connect(&self, peer: PeerId) -> Result<libp2p::Stream, SessionError> {
        let expires_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            + TICKET_LIFETIME.as_secs();
        let ticket = RefereeTicket {
            referee: peer.to_bytes(),
            request_hash: self.request.hash(),
            expires_unix,
        }
        .sign(&self.dialer.keypair)
        .map_err(|e| SessionError::Refused(format!("cannot sign a ticket: {e}")))?;
        let begin = RefereeFrame::Begin {
            request: Box::new(self.request.clone()),
            ticket: Box::new(ticket),
        };
        let mut control = self.dialer.net.stream_control();
        let opened =
            tokio::time::timeout(OPEN_TIMEOUT, control.open_stream(peer, REFEREE_PROTOCOL)).await;
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
            Ok(Ok(RefereeReply::Accepted { .. })) => Ok(stream),
            Ok(Ok(RefereeReply::Error {
                kind: RemoteErrorKind::Overloaded,
                message,
            })) => Err(SessionError::Busy(message)),
            Ok(Ok(RefereeReply::Error { message, .. })) => Err(SessionError::Refused(message)),
            Ok(Ok(RefereeReply::Evidence(_))) => {
                Err(SessionError::Refused("protocol violation".into()))
            }
            Ok(Err(e)) => Err(SessionError::Unreachable(e.to_string())),
            Err(_) => Err(SessionError::Timeout),
        }
    }
}

async fn send_tokens(
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

async fn handle_remote(stream: &mut Result<libp2p::Stream, SessionError>, command: Command) {
    let (frame, reply) = match command {
        Command::Finish { indices, reply } => (RefereeFrame::Finish { indices }, reply),
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
