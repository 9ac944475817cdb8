//! Refereeing: re-executing another provider's answer teacher-forced and signing evidence about
//! it.
//!
//! [`Referee`] is the node's refereeing side: it holds the engine, the node key that signs
//! evidence, and the limits on the work it accepts (length, concurrent jobs, starts per minute
//! per asking gateway). A [`RefereeJob`] follows one answer: the claimed tokens are pushed as they
//! stream and re-executed at once, so that when the commitment arrives only the last chunk
//! remains. Providers serve jobs to gateways over `/proofmesh/referee/1` (the provider crate's
//! `referee` module); a gateway holding the model file runs the same jobs in-process as its own
//! referee.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use libp2p::PeerId;
use libp2p::identity::Keypair;
use prometheus_client::metrics::counter::Counter;
use proofmesh_shared::commit::{output_hash, prompt_hash};
use proofmesh_shared::protocol::{
    GenerateRequest, MAX_OPEN_INDICES, MAX_TOKENS_PER_FRAME, ModelDigest, RemoteErrorKind,
};
use proofmesh_shared::verify::{RefereeEvidence, SignedEvidence};

use crate::{Engine, EngineError, Reexecuted, Reexecution};

/// Most gateways whose start rate is tracked at once; the oldest entry goes beyond this.
const MAX_TRACKED_ASKERS: usize = 4096;

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
    reexecuted_tokens: Option<Counter>,
    numerics: String,
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
        let numerics = engine.info().numerics.clone();
        Self {
            engine,
            keypair,
            digest,
            rate_per_minute: rate_per_minute.max(1),
            starts: Arc::default(),
            reexecuted_tokens: None,
            numerics,
        }
    }

    /// Counts the tokens this referee re-executes in `counter`.
    pub fn with_token_counter(mut self, counter: Counter) -> Self {
        self.reexecuted_tokens = Some(counter);
        self
    }

    /// Test-only: sign evidence under another numerics class than the engine's (a referee
    /// that lies about its numerics).
    #[doc(hidden)]
    pub fn claiming_numerics(mut self, numerics: String) -> Self {
        self.numerics = numerics;
        self
    }

    /// This referee's numerics class.
    pub fn numerics(&self) -> &str {
        &self.numerics
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

    /// Starts re-executing an answer to `request`, on behalf of `asker`. The referee is not told
    /// who gives the answer.
    pub fn begin(
        &self,
        request: GenerateRequest,
        asker: PeerId,
    ) -> Result<RefereeJob, RefereeError> {
        request
            .validate(&self.digest)
            .map_err(|refusal| RefereeError::Invalid(refusal.message))?;
        let window = self.engine.info().context_size as usize;
        let fewest = self.engine.fewest_tokens_of(request.prompt());
        if fewest + request.max_tokens as usize > window {
            return Err(RefereeError::Invalid(format!(
                "prompt of at least {fewest} tokens plus max_tokens {} exceeds this referee's context of {window}",
                request.max_tokens
            )));
        }
        let prompt = self
            .engine
            .tokenize(request.prompt())
            .map_err(|e| RefereeError::Invalid(e.to_string()))?;
        if prompt.len() + request.max_tokens as usize > window {
            return Err(RefereeError::Invalid(format!(
                "prompt of {} tokens plus max_tokens {} exceeds this referee's context of {window}",
                prompt.len(),
                request.max_tokens
            )));
        }
        let guide = request
            .constraint
            .as_ref()
            .map(|c| self.engine.guide(c))
            .transpose()
            .map_err(|e| RefereeError::Invalid(format!("constraint: {e}")))?;
        self.admit(asker)?;
        let reexecution = self
            .engine
            .reexecute_guided(prompt.clone(), request.sampler, request.max_tokens, guide)
            .inspect_err(|_| self.refund(asker))?;
        Ok(RefereeJob {
            referee: self.clone(),
            request,
            prompt,
            reexecution: Some(reexecution),
            claimed: Vec::new(),
            result: None,
        })
    }

    /// Gives back the start [`Referee::admit`] took for a job that did not start (no context
    /// free): only jobs that ran count against the rate.
    fn refund(&self, asker: PeerId) {
        let mut starts = self
            .starts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((tokens, _)) = starts.get_mut(&asker) {
            *tokens = (*tokens + 1.0).min(f64::from(self.rate_per_minute));
        }
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
        if let Some(counter) = &self.referee.reexecuted_tokens {
            counter.inc_by(tokens.len() as u64);
        }
        Ok(())
    }

    /// Waits for the re-execution of every claimed token and returns signed evidence for the
    /// steps `indices`.
    pub async fn finish(&mut self, indices: &[u32]) -> Result<SignedEvidence, RefereeError> {
        let Some(reexecution) = self.reexecution.take() else {
            return Err(RefereeError::Invalid("finished twice".into()));
        };
        self.result = Some(reexecution.finish().await?);
        self.open(indices)
    }

    /// Signed evidence for further steps, after [`RefereeJob::finish`].
    pub fn open(&self, indices: &[u32]) -> Result<SignedEvidence, RefereeError> {
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
            request_id: self.request.request_id,
            request_hash: self.request.hash(),
            model_digest: self.referee.digest,
            output_hash: output_hash(&self.claimed),
            steps: self.claimed.len() as u32,
            prompt_tokens: self.prompt.len() as u32,
            prompt_hash: prompt_hash(&self.prompt),
            numerics: self.referee.numerics.clone(),
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
