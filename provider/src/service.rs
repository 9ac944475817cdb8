//! Serving generate streams and leaf openings.
//!
//! For each inbound `/proofmesh/generate/1` stream: read one request frame (size-limited, with a
//! timeout), validate it, apply the chat template, queue a job on the engine, forward each step
//! as a `Token` frame while keeping its leaf, then build the Merkle tree, sign the commitment,
//! store the leaves for challenges and send `Done`. Leaf openings arrive as mesh events and are
//! answered from the [`LeafStore`].

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use libp2p::PeerId;
use libp2p::identity::Keypair;
use proofmesh_shared::commit::{Commitment, LeafTree, StepLeaf, output_hash, prompt_hash};
use proofmesh_shared::net::{Client, Event, Inbound, Offence, Quota};
use proofmesh_shared::protocol::{
    FinishReason, GENERATE_PROTOCOL, GENERATE_STREAMS_PER_GATEWAY, GENERATE_STREAMS_TOTAL,
    GenerateFrame, GenerateRequest, MAX_REQUEST_FRAME, ModelDigest, Opening, REQUEST_READ_TIMEOUT,
    Refusal, RemoteErrorKind, encode_frame, read_frame, write_frame,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::engine::{Engine, EngineError, Guide, Job, StepEvent};
use crate::leaf_store::LeafStore;
use crate::metrics::ProviderMetrics;
use crate::tamper::Cheat;
use proofmesh_shared::text::{Pushed, TextStream};

/// How long writing one frame may take before the gateway is considered gone.
const FRAME_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Resolves once the gateway has hung up: after its request a gateway only reads, so anything
/// a read returns (the end of the stream, a reset, or bytes no honest gateway sends) means it
/// is gone.
async fn hung_up(stream: &mut libp2p::Stream) {
    let mut byte = [0u8; 1];
    let _ = futures::AsyncReadExt::read(stream, &mut byte).await;
}

/// Whether a gateway kept to the protocol on a stream; one that did not is reported to the
/// mesh, which bans peers that keep doing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kept {
    Yes,
    Not,
}

/// What every stream handler shares.
#[derive(Debug)]
pub(crate) struct Service {
    pub(crate) engine: Engine,
    pub(crate) keypair: Keypair,
    pub(crate) digest: ModelDigest,
    /// The numerics class advertised and signed (the engine's own, except in audit tests).
    pub(crate) numerics: String,
    pub(crate) leaves: LeafStore,
    /// Test-only misbehaviour; `None` on every real provider.
    pub(crate) cheat: Option<Cheat>,
    pub(crate) metrics: Arc<ProviderMetrics>,
    /// Cancelled on shutdown: new requests are refused, running ones finish.
    pub(crate) draining: CancellationToken,
    /// The gateways served; empty: every gateway.
    pub(crate) serve_gateways: HashSet<PeerId>,
}

impl Service {
    /// Accepts generate streams until the mesh stops.
    pub(crate) async fn accept_streams(self: Arc<Self>, client: Client) {
        let quota = Quota {
            per_peer: GENERATE_STREAMS_PER_GATEWAY,
            total: GENERATE_STREAMS_TOTAL,
        };
        let refusal = encode_frame(&GenerateFrame::Error {
            kind: RemoteErrorKind::Overloaded,
            message: "no room for another stream from this gateway right now".into(),
        })
        .unwrap_or_default();
        let mut incoming = match client.accept(GENERATE_PROTOCOL, quota, refusal) {
            Ok(incoming) => incoming,
            Err(e) => {
                tracing::error!(error = %e, "cannot accept generate streams");
                return;
            }
        };
        while let Some(Inbound { peer, stream, slot }) = incoming.next().await {
            let service = Arc::clone(&self);
            let client = client.clone();
            tokio::spawn(async move {
                // Called off when the stream's connection closes: it is dead.
                if slot.serve(service.serve(peer, stream)).await == Some(Kept::Not) {
                    let _ = client.report(peer, Offence::Violation).await;
                }
                drop(slot);
            });
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
                tracing::debug!(%peer, request = %request.request_id, n = request.indices.len(), "opening leaves");
                let response = self.leaves.open(&peer, &request);
                let opening = Opening {
                    request_id: request.request_id,
                    indices: request.indices,
                    response,
                };
                let opening = match &self.cheat {
                    Some(cheat) => cheat.opening(opening, &self.keypair),
                    None => opening.sign(&self.keypair).ok(),
                };
                // Unsigned (a key that cannot sign) or withheld: the asker's request fails.
                let Some(opening) = opening else { continue };
                if client.respond_open_leaves(channel, opening).await.is_err() {
                    return;
                }
            }
        }
    }

    /// Serves one stream; says whether the gateway kept to the protocol.
    async fn serve(&self, peer: PeerId, mut stream: libp2p::Stream) -> Kept {
        if !self.serve_gateways.is_empty() && !self.serve_gateways.contains(&peer) {
            tracing::debug!(%peer, "request from a gateway this provider does not serve");
            let refusal = Refusal::new(
                RemoteErrorKind::NotServed,
                "this provider serves only the gateways its operator named",
            );
            let _ = send_refusal(&mut stream, refusal).await;
            let _ = futures::AsyncWriteExt::close(&mut stream).await;
            return Kept::Yes;
        }
        let request: GenerateRequest = match tokio::time::timeout(
            REQUEST_READ_TIMEOUT,
            read_frame(&mut stream, MAX_REQUEST_FRAME),
        )
        .await
        {
            Ok(Ok(request)) => request,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "unreadable generate request");
                // A stream that ends or resets before its request is not struck: an honest
                // gateway's own client can cause that (it hangs up while the request is being
                // written), and a hostile client must not get its gateway banned that way. The
                // door's quota bounds what opening and dropping streams can take.
                let kept = if e.is_violation() {
                    Kept::Not
                } else {
                    Kept::Yes
                };
                let refusal = Refusal::new(RemoteErrorKind::InvalidRequest, e.to_string());
                let _ = send_refusal(&mut stream, refusal).await;
                return kept;
            }
            Err(_) => {
                // A gateway writes its request as soon as the stream opens: a silent stream only
                // holds a place at the door.
                tracing::debug!(%peer, "no request frame in time");
                return Kept::Not;
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
            let processing = self.metrics.processing();
            let result = self
                .generate(peer, &request, &mut stream, read_at)
                .instrument(span.clone())
                .await;
            processing.finish();
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
        Kept::Yes
    }

    /// Jobs waiting in the engine's queue now.
    pub(crate) fn queue_depth(&self) -> u32 {
        let waiting = self
            .engine
            .load()
            .waiting
            .load(std::sync::atomic::Ordering::Relaxed);
        u32::try_from(waiting).unwrap_or(u32::MAX)
    }

    /// Runs one request. `Err(Some)` is a refusal to send; `Err(None)` means the stream is gone.
    async fn generate(
        &self,
        peer: PeerId,
        request: &GenerateRequest,
        stream: &mut libp2p::Stream,
        read_at: Instant,
    ) -> Result<(), Option<Refusal>> {
        request.validate(&self.digest)?;
        let prompt = self.prompt(request).await?;
        let guide = self.guide(request).await?;
        let prompt_tokens = prompt.len() as u32;
        let steps = self.submit(request, prompt.clone(), guide)?;
        self.metrics.prompt_tokens.inc_by(u64::from(prompt_tokens));
        tracing::Span::current().record("prompt_tokens", prompt_tokens);
        // The one seam for test-only misbehaviour: a cheating provider takes the honest
        // engine's output from here on (`tamper`).
        if let Some(cheat) = &self.cheat {
            return cheat
                .serve(self, peer, request, &prompt, steps, stream)
                .await;
        }
        let queue_depth = self.queue_depth();
        send(
            stream,
            &GenerateFrame::Accepted {
                prompt_tokens,
                queue_depth,
            },
        )
        .await?;
        let mut text = TextStream::new(&request.stop);
        let mut leaves: Vec<StepLeaf> = Vec::new();
        let mut steps = steps;
        let finish_reason = loop {
            // A gateway that hung up while its request waits in the queue gives its place (and
            // its slot at the door) back now, not when the engine reaches the request.
            let step = tokio::select! {
                step = self.next_step(&mut steps, read_at) => step?,
                () = hung_up(stream) => return Err(None),
            };
            match step {
                Step::Token(leaf, piece) => {
                    let (visible, stopped) = match text.push(&piece) {
                        Pushed::Text(t) => (t, false),
                        Pushed::Stopped(t) => (t, true),
                    };
                    let frame = GenerateFrame::Token {
                        step: leaf.step,
                        token: leaf.token,
                        text: visible,
                        leaf: request.stream_leaves.then(|| Box::new(leaf.clone())),
                    };
                    leaves.push(leaf);
                    send(stream, &frame).await?;
                    if stopped {
                        break FinishReason::Stop;
                    }
                }
                Step::Finished(reason) => break reason,
            }
        };
        // Dropping the receiver tells the engine to free the slot (after a stop sequence).
        drop(steps);
        let generated = read_at.elapsed();
        let commitment = self.commit(peer, request, &prompt, leaves, finish_reason, generated)?;
        let commitment = commitment
            .sign(&self.keypair)
            .map_err(|e| Refusal::new(RemoteErrorKind::Internal, e.to_string()))?;
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

    /// The prompt after the model's chat template, checked against the context window.
    async fn prompt(&self, request: &GenerateRequest) -> Result<Vec<u32>, Refusal> {
        let window = self.engine.info().context_size as usize;
        let too_long = |tokens: String| {
            Refusal::new(
                RemoteErrorKind::ContextLength,
                format!(
                    "this model's context window is {window} tokens; the prompt is {tokens} tokens and max_tokens is {}",
                    request.max_tokens
                ),
            )
        };
        // Refused before tokenizing when even its fewest possible tokens cannot fit.
        let fewest = self.engine.fewest_tokens_of(request.prompt());
        if fewest + request.max_tokens as usize > window {
            return Err(too_long(format!("at least {fewest}")));
        }
        // No tokenizing for a job the queue would refuse anyway.
        if self.engine.queue_full() {
            return Err(Refusal::new(
                RemoteErrorKind::Overloaded,
                "provider queue is full",
            ));
        }
        // Tokenizing is CPU work: off the async runtime's workers.
        let engine = self.engine.clone();
        let asked = request.clone();
        let prompt = tokio::task::spawn_blocking(move || engine.tokenize(asked.prompt()))
            .await
            .map_err(|e| Refusal::new(RemoteErrorKind::Internal, e.to_string()))?
            .map_err(|e| Refusal::new(RemoteErrorKind::InvalidRequest, e.to_string()))?;
        if prompt.len() + request.max_tokens as usize > window {
            return Err(too_long(prompt.len().to_string()));
        }
        Ok(prompt)
    }

    /// The request's constraint compiled over this model's vocabulary (off the async workers:
    /// a large schema takes milliseconds, the first one builds the token trie).
    async fn guide(&self, request: &GenerateRequest) -> Result<Option<Guide>, Refusal> {
        let Some(constraint) = request.constraint.clone() else {
            return Ok(None);
        };
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || engine.guide(&constraint))
            .await
            .map_err(|_| {
                Refusal::new(RemoteErrorKind::Internal, "compiling the constraint failed")
            })?
            .map(Some)
            .map_err(|e| Refusal::new(RemoteErrorKind::InvalidRequest, format!("constraint: {e}")))
    }

    /// Queues the generation on the engine, decoding under `guide` when the request is
    /// constrained; its steps arrive on the returned channel.
    pub(crate) fn submit(
        &self,
        request: &GenerateRequest,
        prompt: Vec<u32>,
        guide: Option<Guide>,
    ) -> Result<mpsc::UnboundedReceiver<StepEvent>, Refusal> {
        let (events, steps) = mpsc::unbounded_channel();
        self.engine
            .submit(Job {
                request_id: request.request_id,
                prompt,
                sampler: request.sampler,
                max_tokens: request.max_tokens,
                events,
                guide,
            })
            .map_err(|e| match e {
                EngineError::Overloaded => {
                    Refusal::new(RemoteErrorKind::Overloaded, "provider queue is full")
                }
                other => Refusal::new(RemoteErrorKind::Internal, other.to_string()),
            })?;
        Ok(steps)
    }

    /// The engine's next step, counted in the metrics.
    pub(crate) async fn next_step(
        &self,
        steps: &mut mpsc::UnboundedReceiver<StepEvent>,
        read_at: Instant,
    ) -> Result<Step, Refusal> {
        let Some(event) = steps.recv().await else {
            return Err(Refusal::new(RemoteErrorKind::Internal, "engine stopped"));
        };
        match event {
            StepEvent::Step { leaf, piece } => {
                if leaf.step == 0 {
                    self.metrics
                        .time_to_first_token
                        .observe(read_at.elapsed().as_secs_f64());
                }
                self.metrics.tokens_predicted.inc();
                Ok(Step::Token(leaf, piece))
            }
            StepEvent::Finished { reason } => Ok(Step::Finished(reason)),
            StepEvent::Failed { message } => {
                tracing::error!(%message, "engine failed");
                Err(Refusal::new(RemoteErrorKind::Internal, "the engine failed"))
            }
        }
    }

    /// Builds the Merkle tree over `leaves`, keeps them for `peer`'s challenges, and returns the
    /// commitment to sign.
    pub(crate) fn commit(
        &self,
        peer: PeerId,
        request: &GenerateRequest,
        prompt: &[u32],
        leaves: Vec<StepLeaf>,
        finish_reason: FinishReason,
        generated: std::time::Duration,
    ) -> Result<Commitment, Refusal> {
        tracing::Span::current().record("completion_tokens", leaves.len());
        let committing = Instant::now();
        let tree = LeafTree::build(&leaves);
        let tokens: Vec<u32> = leaves.iter().map(|l| l.token).collect();
        let commitment = Commitment {
            version: Commitment::VERSION,
            request_id: request.request_id,
            request_hash: request.hash(),
            model_digest: self.digest,
            prompt_tokens: prompt.len() as u32,
            prompt_hash: prompt_hash(prompt),
            steps: leaves.len() as u32,
            merkle_root: tree.root(),
            output_hash: output_hash(&tokens),
            finish_reason,
            numerics: self.numerics.clone(),
        };
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
        Ok(commitment)
    }
}

/// One step of a generation, as the service sees it.
#[derive(Debug)]
pub(crate) enum Step {
    /// A generated token: its leaf and its bytes.
    Token(StepLeaf, Vec<u8>),
    /// The engine finished.
    Finished(FinishReason),
}

pub(crate) async fn send(
    stream: &mut libp2p::Stream,
    frame: &GenerateFrame,
) -> Result<(), Option<Refusal>> {
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
