//! Refereeing: re-executing another provider's answer teacher-forced and signing evidence about
//! it.
//!
//! [`Referee`] is the node's refereeing side: it holds the engine, the node key that signs
//! evidence, and the limits on the work it accepts (length, concurrent jobs, starts per minute
//! per asking gateway). A [`RefereeJob`] follows one answer: the claimed tokens are pushed as they
//! stream and re-executed at once, so that when the commitment arrives only the last chunk
//! remains. Providers serve jobs to gateways over `/proofmesh/referee/1` ([`serve_stream`]); a
//! gateway holding the model file runs the same jobs in-process as its own referee.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::{AsyncWriteExt, StreamExt};
use libp2p::PeerId;
use libp2p::identity::Keypair;
use proofmesh_shared::commit::{SignedCommitment, output_hash, prompt_hash};
use proofmesh_shared::net::Client;
use proofmesh_shared::protocol::{
    FrameError, GenerateRequest, MAX_OPEN_INDICES, MAX_REFEREE_FRAME, MAX_TOKENS_PER_FRAME,
    ModelDigest, REFEREE_IDLE_TIMEOUT, REFEREE_PROTOCOL, REQUEST_READ_TIMEOUT, RefereeFrame,
    RefereeReply, RemoteErrorKind, read_frame, write_frame,
};
use proofmesh_shared::verify::{RefereeEvidence, SignedEvidence};

use tracing::Instrument;

use crate::engine::{Engine, EngineError, Reexecuted, Reexecution};
use crate::metrics::{OutcomeLabels, ProviderMetrics};

/// Most gateways whose start rate is tracked at once; the oldest entry goes beyond this.
const MAX_TRACKED_ASKERS: usize = 4096;
/// Evidence replies per job: the first round and a borderline second one, with room to spare;
/// more is a gateway looping, not auditing.
const MAX_EVIDENCE_REPLIES: usize = 4;

/// Why a referee job was refused or failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum RefereeError {
    /// The job is malformed or outside this referee's limits.
    #[error("{0}")]
    Invalid(String),
    /// No re-execution context is free, or the asker exceeded its rate.
    #[error("{0}")]
    Busy(String),
    /// The engine failed.
    #[error("{0}")]
    Internal(String),
}

impl RefereeError {
    /// The wire class of this error.
    pub fn kind(&self) -> RemoteErrorKind {
        match self {
            Self::Invalid(_) => RemoteErrorKind::InvalidRequest,
            Self::Busy(_) => RemoteErrorKind::Overloaded,
            Self::Internal(_) => RemoteErrorKind::Internal,
        }
    }
}

impl From<EngineError> for RefereeError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::RefereeBusy | EngineError::Overloaded => Self::Busy(e.to_string()),
            EngineError::Prompt { .. } => Self::Invalid(e.to_string()),
            other => Self::Internal(other.to_string()),
        }
    }
}

/// A node's refereeing side. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Referee {
    engine: Engine,
    keypair: Keypair,
    digest: ModelDigest,
    rate_per_minute: u32,
    starts: Arc<Mutex<HashMap<PeerId, (f64, Instant)>>>,
    metrics: Option<Arc<ProviderMetrics>>,
}

impl Referee {
    /// A referee for the model `digest` loaded in `engine`, signing with `keypair` and letting
    /// each asking gateway start at most `rate_per_minute` jobs per minute.
    pub fn new(
        engine: Engine,
        keypair: Keypair,
        digest: ModelDigest,
        rate_per_minute: u32,
    ) -> Self {
        Self {
            engine,
            keypair,
            digest,
            rate_per_minute: rate_per_minute.max(1),
            starts: Arc::default(),
            metrics: None,
        }
    }

    /// Counts this referee's jobs and tokens in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<ProviderMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// This referee's numerics class.
    pub fn numerics(&self) -> &str {
        &self.engine.info().numerics
    }

    /// The model it re-executes.
    pub fn digest(&self) -> ModelDigest {
        self.digest
    }

    /// Its peer id (the signer of its evidence).
    pub fn peer_id(&self) -> PeerId {
        self.keypair.public().to_peer_id()
    }

    /// Whether a job could start now (a context is free).
    pub fn has_capacity(&self) -> bool {
        self.engine.free_referee_slots() > 0
    }

    /// Starts re-executing the answer `provider` gives to `request`, on behalf of `asker`.
    pub fn begin(
        &self,
        request: GenerateRequest,
        provider: PeerId,
        asker: PeerId,
    ) -> Result<RefereeJob, RefereeError> {
        if provider == self.peer_id() {
            return Err(RefereeError::Invalid(
                "a referee does not audit its own answers".into(),
            ));
        }
        crate::service::validate(&request, &self.digest)
            .map_err(|refusal| RefereeError::Invalid(refusal.message))?;
        let prompt = self
            .engine
            .tokenize_chat(&request.messages)
            .map_err(|e| RefereeError::Invalid(e.to_string()))?;
        let window = self.engine.info().context_size as usize;
        if prompt.len() + request.max_tokens as usize > window {
            return Err(RefereeError::Invalid(format!(
                "prompt of {} tokens plus max_tokens {} exceeds this referee's context of {window}",
                prompt.len(),
                request.max_tokens
            )));
        }
        self.admit(asker)?;
        let reexecution =
            self.engine
                .reexecute(prompt.clone(), request.sampler, request.max_tokens)?;
        Ok(RefereeJob {
            referee: self.clone(),
            request,
            provider,
            prompt,
            reexecution: Some(reexecution),
            claimed: Vec::new(),
            result: None,
        })
    }

    /// Token bucket per asker: `rate_per_minute` starts a minute, in bursts of at most that many.
    fn admit(&self, asker: PeerId) -> Result<(), RefereeError> {
        let mut starts = self
            .starts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let capacity = f64::from(self.rate_per_minute);
        let now = Instant::now();
        if starts.len() >= MAX_TRACKED_ASKERS && !starts.contains_key(&asker) {
            let oldest = starts.iter().min_by_key(|(_, (_, t))| *t).map(|(p, _)| *p);
            if let Some(oldest) = oldest {
                starts.remove(&oldest);
            }
        }
        let (tokens, last) = starts.entry(asker).or_insert((capacity, now));
        *tokens =
            (*tokens + now.duration_since(*last).as_secs_f64() * capacity / 60.0).min(capacity);
        *last = now;
        if *tokens < 1.0 {
            return Err(RefereeError::Busy(format!(
                "more than {} re-executions a minute",
                self.rate_per_minute
            )));
        }
        *tokens -= 1.0;
        Ok(())
    }
}

/// One answer being re-executed.
#[derive(Debug)]
pub struct RefereeJob {
    referee: Referee,
    request: GenerateRequest,
    provider: PeerId,
    prompt: Vec<u32>,
    reexecution: Option<Reexecution>,
    claimed: Vec<u32>,
    result: Option<Reexecuted>,
}

impl RefereeJob {
    /// The prompt length after the referee's own chat template.
    pub fn prompt_tokens(&self) -> u32 {
        self.prompt.len() as u32
    }

    /// Feeds the next claimed tokens, which must start at step `first_step`.
    pub fn push(&mut self, first_step: u32, tokens: &[u32]) -> Result<(), RefereeError> {
        let Some(reexecution) = &self.reexecution else {
            return Err(RefereeError::Invalid("tokens after the finish".into()));
        };
        if first_step as usize != self.claimed.len() {
            return Err(RefereeError::Invalid(format!(
                "tokens for step {first_step}, expected step {}",
                self.claimed.len()
            )));
        }
        if tokens.len() > MAX_TOKENS_PER_FRAME
            || self.claimed.len() + tokens.len() > self.request.max_tokens as usize
        {
            return Err(RefereeError::Invalid("more tokens than max_tokens".into()));
        }
        self.claimed.extend_from_slice(tokens);
        reexecution.push(tokens.to_vec())?;
        if let Some(metrics) = &self.referee.metrics {
            metrics.reexecuted_tokens.inc_by(tokens.len() as u64);
        }
        Ok(())
    }

    /// Waits for the re-execution of every claimed token, checks that `commitment` is the
    /// provider's signed commitment over exactly those tokens, and returns signed evidence for
    /// the steps `indices`.
    pub async fn finish(
        &mut self,
        commitment: &SignedCommitment,
        indices: &[u32],
    ) -> Result<SignedEvidence, RefereeError> {
        let c = &commitment.commitment;
        let signer = commitment.verify().map_err(|_| {
            RefereeError::Invalid("the commitment's signature does not verify".into())
        })?;
        if signer != self.provider
            || c.request_id != self.request.request_id
            || c.request_hash != self.request.hash()
            || c.steps as usize != self.claimed.len()
            || c.output_hash != output_hash(&self.claimed)
        {
            return Err(RefereeError::Invalid(
                "the commitment is not the provider's over the tokens sent".into(),
            ));
        }
        let Some(reexecution) = self.reexecution.take() else {
            return Err(RefereeError::Invalid("finished twice".into()));
        };
        self.result = Some(reexecution.finish().await?);
        self.open_with(commitment, indices)
    }

    /// Signed evidence for further steps, after [`RefereeJob::finish`].
    pub fn open(
        &self,
        commitment: &SignedCommitment,
        indices: &[u32],
    ) -> Result<SignedEvidence, RefereeError> {
        self.open_with(commitment, indices)
    }

    fn open_with(
        &self,
        commitment: &SignedCommitment,
        indices: &[u32],
    ) -> Result<SignedEvidence, RefereeError> {
        let Some(result) = &self.result else {
            return Err(RefereeError::Invalid("open before finish".into()));
        };
        let sorted = indices.windows(2).all(|w| w[0] < w[1]);
        if indices.is_empty()
            || indices.len() > MAX_OPEN_INDICES
            || !sorted
            || indices.iter().any(|&i| i as usize >= result.steps.len())
        {
            return Err(RefereeError::Invalid(
                "indices must be sorted, distinct and within the answer".into(),
            ));
        }
        let engine = &self.referee.engine;
        let text = engine.detokenize(&self.claimed);
        let evidence = RefereeEvidence {
            version: RefereeEvidence::VERSION,
            provider: self.provider.to_bytes(),
            request_id: self.request.request_id,
            request_hash: self.request.hash(),
            model_digest: self.referee.digest,
            merkle_root: commitment.commitment.merkle_root,
            output_hash: output_hash(&self.claimed),
            steps: self.claimed.len() as u32,
            prompt_tokens: self.prompt.len() as u32,
            prompt_hash: prompt_hash(&self.prompt),
            numerics: engine.info().numerics.clone(),
            micro_batch: engine.info().referee_micro_batch,
            invalid_tokens: result.invalid_tokens,
            ends_with_eog: self.claimed.last().is_some_and(|&t| engine.is_eog(t)),
            stop_sequence_found: self
                .request
                .stop
                .iter()
                .any(|s| !s.is_empty() && text.contains(s.as_str())),
            opened: indices
                .iter()
                .map(|&i| result.steps[i as usize].clone())
                .collect(),
            margins: result.margins.clone(),
        };
        evidence
            .sign(&self.referee.keypair)
            .map_err(|e| RefereeError::Internal(e.to_string()))
    }
}

/// Accepts `/proofmesh/referee/1` streams until the mesh stops.
pub(crate) async fn accept_streams(referee: Referee, client: Client) {
    let mut incoming = match client.stream_control().accept(REFEREE_PROTOCOL) {
        Ok(incoming) => incoming,
        Err(e) => {
            tracing::error!(error = %e, "cannot accept referee streams");
            return;
        }
    };
    while let Some((peer, stream)) = incoming.next().await {
        let referee = referee.clone();
        tokio::spawn(async move { serve_stream(&referee, peer, stream).await });
    }
}

/// Serves one gateway's referee stream: `Begin`, then `Tokens` as they come, `Finish`, `Open`.
pub async fn serve_stream(referee: &Referee, asker: PeerId, mut stream: libp2p::Stream) {
    let outcome = serve(referee, asker, &mut stream).await;
    if let Some(metrics) = &referee.metrics {
        let outcome = match &outcome {
            Ok(()) => "completed",
            Err(StreamEnd::Job(RefereeError::Busy(_) | RefereeError::Invalid(_))) => "refused",
            Err(_) => "failed",
        };
        metrics
            .referee_jobs
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }
    if let Err(e) = outcome {
        tracing::debug!(gateway = %asker, error = %e, "referee job ended");
        if let Some(kind) = e.kind() {
            let reply = RefereeReply::Error {
                kind,
                message: e.to_string(),
            };
            let _ = write_frame(&mut stream, &reply).await;
        }
    }
    let _ = stream.close().await;
}

/// How a served referee stream ended badly.
#[derive(Debug, thiserror::Error)]
enum StreamEnd {
    #[error(transparent)]
    Job(#[from] RefereeError),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("gateway went quiet")]
    Idle,
    #[error("stream broke: {0}")]
    Broken(#[from] FrameError),
}

impl StreamEnd {
    /// The error frame to send, if the gateway can still hear one.
    fn kind(&self) -> Option<RemoteErrorKind> {
        match self {
            Self::Job(e) => Some(e.kind()),
            Self::Protocol(_) => Some(RemoteErrorKind::InvalidRequest),
            Self::Idle | Self::Broken(_) => None,
        }
    }
}

async fn next_frame(stream: &mut libp2p::Stream) -> Result<Option<RefereeFrame>, StreamEnd> {
    match tokio::time::timeout(
        REFEREE_IDLE_TIMEOUT,
        read_frame::<_, RefereeFrame>(stream, MAX_REFEREE_FRAME),
    )
    .await
    {
        Ok(Ok(frame)) => Ok(Some(frame)),
        Ok(Err(FrameError::Closed)) => Ok(None),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(StreamEnd::Idle),
    }
}

async fn serve(
    referee: &Referee,
    asker: PeerId,
    stream: &mut libp2p::Stream,
) -> Result<(), StreamEnd> {
    let begin = tokio::time::timeout(
        REQUEST_READ_TIMEOUT,
        read_frame::<_, RefereeFrame>(stream, MAX_REFEREE_FRAME),
    )
    .await
    .map_err(|_| StreamEnd::Idle)??;
    let RefereeFrame::Begin { request, provider } = begin else {
        return Err(StreamEnd::Protocol("the first frame must be Begin".into()));
    };
    let provider = PeerId::from_bytes(&provider)
        .map_err(|_| StreamEnd::Protocol("malformed provider peer id".into()))?;
    let span = tracing::info_span!(
        "provider.referee",
        request_id = %request.request_id,
        gateway = %asker,
        provider = %provider,
    );
    if let Some(trace) = request.trace.as_ref().filter(|t| t.is_valid()) {
        proofmesh_shared::telemetry::set_parent(&span, trace);
    }
    follow(referee, asker, provider, *request, stream)
        .instrument(span)
        .await
}

/// After `Begin`: takes the job, then answers the gateway's frames until it closes the stream.
async fn follow(
    referee: &Referee,
    asker: PeerId,
    provider: PeerId,
    request: GenerateRequest,
    stream: &mut libp2p::Stream,
) -> Result<(), StreamEnd> {
    let mut job = referee.begin(request, provider, asker)?;
    tracing::debug!("refereeing");
    write_frame(
        stream,
        &RefereeReply::Accepted {
            prompt_tokens: job.prompt_tokens(),
            numerics: referee.numerics().to_string(),
        },
    )
    .await?;
    let mut commitment: Option<SignedCommitment> = None;
    let mut replies = 0;
    while let Some(frame) = next_frame(stream).await? {
        if replies >= MAX_EVIDENCE_REPLIES && !matches!(frame, RefereeFrame::Tokens { .. }) {
            return Err(StreamEnd::Protocol("too many evidence requests".into()));
        }
        let evidence = match frame {
            RefereeFrame::Tokens { first_step, tokens } => {
                job.push(first_step, &tokens)?;
                continue;
            }
            RefereeFrame::Finish {
                commitment: signed,
                indices,
            } => {
                let evidence = job.finish(&signed, &indices).await?;
                commitment = Some(*signed);
                evidence
            }
            RefereeFrame::Open { indices } => {
                let Some(signed) = &commitment else {
                    return Err(StreamEnd::Protocol("Open before Finish".into()));
                };
                job.open(signed, &indices)?
            }
            RefereeFrame::Begin { .. } => {
                return Err(StreamEnd::Protocol("one Begin per stream".into()));
            }
        };
        write_frame(stream, &RefereeReply::Evidence(Box::new(evidence))).await?;
        replies += 1;
    }
    Ok(())
}
