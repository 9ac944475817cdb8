//! Serving generate streams and leaf openings.
//!
//! For each inbound `/proofmesh/generate/1` stream: read one request frame (size-limited, with a
//! timeout), validate it, apply the chat template, queue a job on the engine, forward each step
//! as a `Token` frame while keeping its leaf, then build the Merkle tree, sign the commitment,
//! store the leaves for challenges and send `Done`. Leaf openings arrive as mesh events and are
//! answered from the [`LeafStore`].

use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use libp2p::PeerId;
use libp2p::identity::Keypair;
use proofmesh_shared::commit::{Commitment, LeafTree, StepLeaf, output_hash, prompt_hash};
use proofmesh_shared::net::{Client, Event};
use proofmesh_shared::protocol::{
    FinishReason, FrameError, GENERATE_PROTOCOL, GenerateFrame, GenerateRequest, MAX_MESSAGES,
    MAX_REQUEST_FRAME, MAX_STOP_LEN, MAX_STOP_SEQUENCES, ModelDigest, REQUEST_READ_TIMEOUT,
    RemoteErrorKind, read_frame, write_frame,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::engine::{Engine, EngineError, Job, StepEvent};
use crate::leaf_store::LeafStore;
use crate::metrics::ProviderMetrics;
use crate::stop::{Pushed, TextStream};
use crate::tamper::{Cheat, Tamper};

/// How long writing one frame may take before the gateway is considered gone.
const FRAME_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// What every stream handler shares.
#[derive(Debug)]
pub(crate) struct Service {
    pub(crate) engine: Engine,
    pub(crate) keypair: Keypair,
    pub(crate) digest: ModelDigest,
    pub(crate) leaves: LeafStore,
    pub(crate) cheat: Cheat,
    pub(crate) metrics: Arc<ProviderMetrics>,
    /// Cancelled on shutdown: new requests are refused, running ones finish.
    pub(crate) draining: CancellationToken,
}

/// A refusal sent as an `Error` frame.
pub(crate) struct Refusal {
    pub(crate) kind: RemoteErrorKind,
    pub(crate) message: String,
}

impl Refusal {
    fn new(kind: RemoteErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

impl Service {
    /// Accepts generate streams until the mesh stops.
    pub(crate) async fn accept_streams(self: Arc<Self>, client: Client) {
        let mut incoming = match client.stream_control().accept(GENERATE_PROTOCOL) {
            Ok(incoming) => incoming,
            Err(e) => {
                tracing::error!(error = %e, "cannot accept generate streams");
                return;
            }
        };
        while let Some((peer, stream)) = incoming.next().await {
            let service = Arc::clone(&self);
            tokio::spawn(async move { service.serve(peer, stream).await });
        }
    }

    /// Answers challenges until the mesh stops.
    pub(crate) async fn answer_events(
        self: Arc<Self>,
        client: Client,
        mut events: mpsc::Receiver<Event>,
    ) {
        while let Some(event) = events.recv().await {
            if let Event::OpenLeaves {
                peer,
                request,
                channel,
            } = event
            {
                let mut response = self.leaves.open(&peer, &request);
                self.cheat.opening(&mut response);
                tracing::debug!(%peer, request = %request.request_id, n = request.indices.len(), "opening leaves");
                if client.respond_open_leaves(channel, response).await.is_err() {
                    return;
                }
            }
        }
    }

    async fn serve(&self, peer: PeerId, mut stream: libp2p::Stream) {
        let request: GenerateRequest = match tokio::time::timeout(
            REQUEST_READ_TIMEOUT,
            read_frame(&mut stream, MAX_REQUEST_FRAME),
        )
        .await
        {
            Ok(Ok(request)) => request,
            Ok(Err(FrameError::TooLarge { len, max })) => {
                let refusal = Refusal::new(
                    RemoteErrorKind::InvalidRequest,
                    format!("request of {len} bytes exceeds {max}"),
                );
                let _ = send_refusal(&mut stream, refusal).await;
                return;
            }
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "unreadable generate request");
                let _ = send_refusal(
                    &mut stream,
                    Refusal::new(RemoteErrorKind::InvalidRequest, e.to_string()),
                )
                .await;
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "no request frame in time");
                return;
            }
        };
        let read_at = Instant::now();
        let request_id = request.request_id;
        let span = tracing::info_span!(
            "provider.generate",
            request_id = %request_id,
            gateway = %peer,
            prompt_tokens = tracing::field::Empty,
            completion_tokens = tracing::field::Empty,
        );
        if let Some(trace) = request.trace.as_ref().filter(|t| t.is_valid()) {
            proofmesh_shared::telemetry::set_parent(&span, trace);
        }
        let result = if self.draining.is_cancelled() {
            Err(Some(Refusal::new(
                RemoteErrorKind::ShuttingDown,
                "provider is shutting down",
            )))
        } else {
            self.metrics.requests_processing.inc();
            let result = self
                .generate(peer, &request, &mut stream, read_at)
                .instrument(span.clone())
                .await;
            self.metrics.requests_processing.dec();
            result
        };
        let _entered = span.enter();
        let outcome = match result {
            Ok(()) => "completed",
            Err(Some(refusal)) => {
                tracing::info!(%peer, request = %request_id, kind = ?refusal.kind, message = %refusal.message, "request refused");
                let _ = send_refusal(&mut stream, refusal).await;
                "refused"
            }
            Err(None) => {
                tracing::debug!(%peer, request = %request_id, "gateway left mid-stream");
                "abandoned"
            }
        };
        self.metrics.request_ended(outcome);
        let _ = futures::AsyncWriteExt::close(&mut stream).await;
    }

    /// Runs one request. `Err(Some)` is a refusal to send; `Err(None)` means the stream is gone.
    async fn generate(
        &self,
        peer: PeerId,
        request: &GenerateRequest,
        stream: &mut libp2p::Stream,
        read_at: Instant,
    ) -> Result<(), Option<Refusal>> {
        validate(request, &self.digest)?;
        let prompt = self
            .engine
            .tokenize_chat(&request.messages)
            .map_err(|e| Refusal::new(RemoteErrorKind::InvalidRequest, e.to_string()))?;
        let window = self.engine.info().context_size as usize;
        if prompt.len() + request.max_tokens as usize > window {
            return Err(Some(Refusal::new(
                RemoteErrorKind::ContextLength,
                format!(
                    "this model's context window is {window} tokens; the prompt is {} tokens and max_tokens is {}",
                    prompt.len(),
                    request.max_tokens
                ),
            )));
        }
        let prompt_tokens = prompt.len() as u32;
        let prompt_digest = prompt_hash(&prompt);
        let (events, mut steps) = mpsc::unbounded_channel();
        if let Some(replayed) = self.cheat.replayed(request) {
            let reason = if replayed.len() == request.max_tokens as usize {
                FinishReason::Length
            } else {
                FinishReason::Stop
            };
            for (leaf, piece) in replayed {
                let _ = events.send(StepEvent::Step { leaf, piece });
            }
            let _ = events.send(StepEvent::Finished { reason });
        } else {
            self.engine
                .submit(Job {
                    request_id: request.request_id,
                    prompt,
                    sampler: request.sampler,
                    max_tokens: request.max_tokens,
                    events,
                })
                .map_err(|e| match e {
                    EngineError::Overloaded => {
                        Refusal::new(RemoteErrorKind::Overloaded, "provider queue is full")
                    }
                    other => Refusal::new(RemoteErrorKind::Internal, other.to_string()),
                })?;
        }
        send(stream, &GenerateFrame::Accepted { prompt_tokens }).await?;
        self.metrics.prompt_tokens.inc_by(u64::from(prompt_tokens));
        tracing::Span::current().record("prompt_tokens", prompt_tokens);

        let mut text = TextStream::new(&request.stop);
        let mut leaves: Vec<StepLeaf> = Vec::new();
        let mut pieces: Vec<Vec<u8>> = Vec::new();
        let finish_reason = loop {
            let Some(event) = steps.recv().await else {
                return Err(Some(Refusal::new(
                    RemoteErrorKind::Internal,
                    "engine stopped",
                )));
            };
            match event {
                StepEvent::Step { mut leaf, piece } => {
                    if leaf.step == 0 {
                        self.metrics
                            .time_to_first_token
                            .observe(read_at.elapsed().as_secs_f64());
                    }
                    self.metrics.tokens_predicted.inc();
                    let (streamed, changed) = self.cheat.step(&mut leaf, &self.engine, request);
                    let piece = changed.unwrap_or(piece);
                    let (visible, stopped) = match text.push(&piece) {
                        Pushed::Text(t) => (t, false),
                        Pushed::Stopped(t) => (t, true),
                    };
                    let frame = GenerateFrame::Token {
                        step: leaf.step,
                        token: streamed,
                        text: visible,
                    };
                    let step = leaf.step;
                    leaves.push(leaf);
                    pieces.push(piece);
                    send(stream, &frame).await?;
                    if self.cheat.tamper == Tamper::HangUp && step >= 2 {
                        return Err(None);
                    }
                    if stopped || self.cheat.stops_early(step, request.max_tokens) {
                        break FinishReason::Stop;
                    }
                }
                StepEvent::Finished { reason } => break reason,
                StepEvent::Failed { message } => {
                    tracing::error!(%message, "engine failed");
                    return Err(Some(Refusal::new(
                        RemoteErrorKind::Internal,
                        "the engine failed",
                    )));
                }
            }
        };
        // Dropping the receiver tells the engine to free the slot (after a stop sequence).
        drop(steps);
        tracing::Span::current().record("completion_tokens", leaves.len());
        if self.cheat.tamper == Tamper::Replay {
            let steps: Vec<(StepLeaf, Vec<u8>)> = leaves.iter().cloned().zip(pieces).collect();
            self.cheat.remember(&steps);
        }
        self.cheat
            .copy_logits(&mut leaves, request)
            .await
            .map_err(|e| Refusal::new(RemoteErrorKind::Internal, e))?;

        let generated = read_at.elapsed();
        let committing = Instant::now();
        let tree = LeafTree::build(&leaves);
        let tokens: Vec<u32> = leaves.iter().map(|l| l.token).collect();
        let commitment = Commitment {
            version: Commitment::VERSION,
            request_id: request.request_id,
            request_hash: request.hash(),
            model_digest: self.digest,
            prompt_tokens,
            prompt_hash: prompt_digest,
            steps: leaves.len() as u32,
            merkle_root: tree.root(),
            output_hash: output_hash(&tokens),
            finish_reason,
            numerics: self.engine.info().numerics.clone(),
        };
        let mut commitment = commitment
            .sign(&self.cheat.signer(&self.keypair))
            .map_err(|e| Refusal::new(RemoteErrorKind::Internal, e.to_string()))?;
        self.cheat.signed(&mut commitment);
        let commit_time = committing.elapsed();
        self.metrics
            .generation_seconds
            .observe(generated.as_secs_f64());
        self.metrics
            .commitment_seconds
            .observe(commit_time.as_secs_f64());
        tracing::debug!(
            steps = leaves.len(),
            generation_ms = generated.as_millis() as u64,
            commitment_us = commit_time.as_micros() as u64,
            "committed"
        );
        self.leaves.insert(request.request_id, peer, leaves, tree);
        send(
            stream,
            &GenerateFrame::Done {
                finish_reason,
                text: text.finish(),
                commitment: Box::new(commitment),
            },
        )
        .await?;
        Ok(())
    }
}

/// Checks a generate request against what this node serves and the protocol's limits.
pub(crate) fn validate(request: &GenerateRequest, digest: &ModelDigest) -> Result<(), Refusal> {
    let invalid = |m: &str| Err(Refusal::new(RemoteErrorKind::InvalidRequest, m));
    if request.version != GenerateRequest::VERSION {
        return invalid("unsupported protocol version");
    }
    if &request.model_digest != digest {
        return Err(Refusal::new(
            RemoteErrorKind::UnknownModel,
            format!("this provider serves {digest}"),
        ));
    }
    if request.messages.is_empty() || request.messages.len() > MAX_MESSAGES {
        return invalid("between 1 and 256 messages are required");
    }
    if request.max_tokens == 0 {
        return invalid("max_tokens must be at least 1");
    }
    if request.stop.len() > MAX_STOP_SEQUENCES
        || request.stop.iter().any(|s| s.len() > MAX_STOP_LEN)
    {
        return invalid("at most 4 stop sequences of at most 256 bytes");
    }
    let s = &request.sampler;
    let sane = s.temperature.is_finite()
        && (0.0..=2.0).contains(&s.temperature)
        && s.top_p.is_finite()
        && s.top_p > 0.0
        && s.top_p <= 1.0
        && s.min_p.is_finite()
        && (0.0..=1.0).contains(&s.min_p);
    if !sane {
        return invalid("sampler settings out of range");
    }
    Ok(())
}

async fn send(stream: &mut libp2p::Stream, frame: &GenerateFrame) -> Result<(), Option<Refusal>> {
    match tokio::time::timeout(FRAME_WRITE_TIMEOUT, write_frame(stream, frame)).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(None),
    }
}

async fn send_refusal(
    stream: &mut libp2p::Stream,
    refusal: Refusal,
) -> Result<(), Option<Refusal>> {
    send(
        stream,
        &GenerateFrame::Error {
            kind: refusal.kind,
            message: refusal.message,
        },
    )
    .await
}
