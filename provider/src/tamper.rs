//! Deliberate misbehaviour, for tests of the gateway's audit and for the calibration harness
//! only. Never on by default, and not reachable from the command line: a test builds a
//! [`crate::ProviderConfig`] with one of these set.
//!
//! One seam: an honest provider's service has no cheat at all; a cheating one hands the honest
//! engine's finished output to [`Cheat::serve`], which rewrites it and speaks the protocol
//! itself, and signs its leaf openings through [`Cheat::opening`]. Nothing here runs on the
//! honest path.
//!
//! The cheats that serve other weights (another model, a cheaper quantization, perturbed
//! weights) need no code here: such a provider loads that file and claims the default model's
//! digest (`ProviderConfig::claim_digest`). The ones here change what an honest engine produces.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use libp2p::PeerId;
use libp2p::identity::Keypair;
use proofmesh_shared::commit::StepLeaf;
use proofmesh_shared::constraint::Constraint;
use proofmesh_shared::protocol::{
    FinishReason, GenerateFrame, GenerateRequest, OpenLeavesResponse, Opening, Refusal,
    RemoteErrorKind, SignedOpening,
};
use proofmesh_shared::sampling::{self, SamplerParams, TopLogit};
use proofmesh_shared::verify::SignedEvidence;
use tokio::sync::mpsc;

use crate::engine::{Engine, StepEvent};
use crate::service::{Service, Step, send};
use proofmesh_shared::text::{Pushed, TextStream};

/// How a provider in a test lies.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Tamper {
    /// Honest.
    #[default]
    None,
    /// Opens a leaf whose logits differ from the committed one.
    TamperLeaf,
    /// Opens the right leaves with a corrupted Merkle path.
    WrongPath,
    /// Emits and commits, at step 1, a token the sampler would not have picked.
    OffPolicyToken,
    /// [`Tamper::OffPolicyToken`] on one request in ten (chosen by its request id), honest on
    /// the rest: a cheat that hopes the audits of `fraud` answers miss it.
    OffPolicySometimes,
    /// Signs the commitment with a key that is not its node key.
    ForeignKey,
    /// Sends a commitment whose signature bytes are corrupted.
    CorruptSignature,
    /// Hangs up after the third token, without a commitment.
    HangUp,
    /// Emits random tokens it never computed, with fabricated leaves that replay consistently.
    MadeUpTokens,
    /// Serves its first answer again, for every later prompt, re-signed for the new request.
    Replay,
    /// Stops after four tokens and claims the model ended there.
    Truncate,
    /// Streams another token at step 2 than the one it committed.
    ChangedTokens,
    /// Decodes with its (cheaper) model, then commits the logits of the claimed model run over
    /// those tokens, patched so that replaying the sampler picks the emitted tokens. Needs
    /// `ProviderConfig::tamper_model`, the claimed model's file.
    CopiedLogits,
    /// Commits and streams the real tokens, but streams text of its own making beside them.
    ForgedText,
    /// Advertises its engine's numerics class but signs its commitments with a
    /// non-deterministic one, hoping to be judged in the tolerant tier.
    OtherNumerics,
    /// Withholds its first leaf opening, as if the network had lost it; answers later ones.
    DropFirstOpening,
    /// Generates honestly, but never opens its leaves when challenged.
    NeverOpens,
    /// Generates honestly, but as a referee signs evidence whose logits are not the model's,
    /// accusing every answer it checks.
    FalseAccuser,
    /// Generates honestly, but as a referee reports every token as the model's own choice
    /// (all margins zero), passing any answer.
    RubberStamp,
    /// Generates and commits honestly, but claims [`FALSE_USAGE_EXTRA`] more prompt tokens in
    /// `Accepted` and the other finish reason in `Done` than it signed.
    FalseUsage,
    /// Refuses every request, claiming its context is too small for it.
    FalseRefusal,
    /// Refuses every request, claiming it is at capacity.
    Busy,
    /// Accepts, then never sends a token (a provider that hangs).
    Stall,
    /// Generates and commits honestly, but streams leaves (asked for by `logprobs`) whose
    /// logsumexp is [`FAKE_LOGPROB_SHIFT`] lower than committed: every log-probability it
    /// reports looks that much more confident, while its tokens and sampler replay still hold.
    FakeLogprobs,
    /// Generates honestly, but commits (and streams) every leaf with its logsumexp
    /// [`FAKE_LOGPROB_SHIFT`] lower, though never below its best logit: log-probabilities
    /// surer than the model's (a likely token shown as certain), signed.
    SurerLogprobs,
    /// Decodes a constrained request as if it had no constraint (the engine's plain choice at
    /// every step), and commits that honestly: a provider that ignores `response_format`.
    IgnoresConstraint,
    /// Decodes a constrained request under [`OTHER_SCHEMA`] instead of the request's own
    /// constraint, and commits that honestly: a provider that applies another schema.
    OtherSchema,
    /// Streams its honest tokens, then keeps streaming more, never a `Done`, ignoring
    /// `max_tokens` (up to [`ENDLESS_LIMIT`] frames, or until the gateway hangs up).
    Endless,
}

/// Whether a [`Tamper::OffPolicySometimes`] provider cheats on the request with this id: one
/// request in ten, by its (random) id.
pub fn cheated_on(request_id: &[u8; 16]) -> bool {
    u64::from_le_bytes(request_id[..8].try_into().unwrap_or([0; 8])) % 10 == 0
}

/// Frames a [`Tamper::Endless`] provider sends at most (a test's bound, not the gateway's).
pub const ENDLESS_LIMIT: u32 = 1_000_000;

/// How long a [`Tamper::Stall`] provider stays silent.
pub const STALL: std::time::Duration = std::time::Duration::from_secs(600);

/// The prompt tokens a [`Tamper::FalseUsage`] provider adds to its claim.
pub const FALSE_USAGE_EXTRA: u32 = 1000;

/// How much a [`Tamper::FakeLogprobs`] provider lowers the logsumexp of the leaves it streams.
pub const FAKE_LOGPROB_SHIFT: f32 = 1.0;

/// The schema a [`Tamper::OtherSchema`] provider decodes constrained requests under.
pub const OTHER_SCHEMA: &str = r#"{"type":"object","properties":{"other":{"type":"integer"}},"required":["other"],"additionalProperties":false}"#;

/// The text a [`Tamper::ForgedText`] provider streams in place of its first token's.
pub const FORGED_TEXT: &str = "FORGED BY THE PROVIDER";

/// The class a [`Tamper::OtherNumerics`] provider signs.
pub const OTHER_NUMERICS: &str = "cpu/f16-kv/claimed";

/// One generated step as a cheat keeps it: the leaf and the token's text.
type KeptStep = (StepLeaf, Vec<u8>);

/// A cheating provider's state: its first answer (for [`Tamper::Replay`]), the claimed
/// model's engine (for [`Tamper::CopiedLogits`]) and the openings it answered.
#[derive(Debug, Default)]
pub(crate) struct Cheat {
    pub(crate) tamper: Tamper,
    pub(crate) claimed_engine: Option<Engine>,
    replay: Mutex<Option<Vec<KeptStep>>>,
    openings: AtomicU32,
}

impl Cheat {
    /// A cheat, or `None` for an honest provider.
    pub(crate) fn new(tamper: Tamper, claimed_engine: Option<Engine>) -> Option<Self> {
        // A false accuser generates honestly; it lies only as a referee (`false_evidence`).
        let generates_dishonestly = !matches!(
            tamper,
            Tamper::None | Tamper::FalseAccuser | Tamper::RubberStamp
        );
        (generates_dishonestly || claimed_engine.is_some()).then(|| Self {
            tamper,
            claimed_engine,
            replay: Mutex::default(),
            openings: AtomicU32::new(0),
        })
    }

    /// Serves one request dishonestly: runs the honest engine to the end, rewrites its output,
    /// and speaks the generate protocol from `Accepted` on.
    pub(crate) async fn serve(
        &self,
        service: &Service,
        peer: PeerId,
        request: &GenerateRequest,
        prompt: &[u32],
        mut steps: mpsc::UnboundedReceiver<StepEvent>,
        stream: &mut libp2p::Stream,
    ) -> Result<(), Option<Refusal>> {
        let started = Instant::now();
        match self.tamper {
            Tamper::FalseRefusal => {
                return Err(Some(Refusal::new(
                    RemoteErrorKind::ContextLength,
                    "the prompt does not fit this provider's context (a lie)",
                )));
            }
            Tamper::Busy => {
                return Err(Some(Refusal::new(
                    RemoteErrorKind::Overloaded,
                    "at capacity (a lie)",
                )));
            }
            _ => {}
        }
        if let Some(constraint) = self.decoded_under(request) {
            // Decode again, under the constraint this cheat prefers.
            drop(steps);
            let guide = constraint
                .map(|c| service.engine.guide(&c))
                .transpose()
                .map_err(|e| Refusal::new(RemoteErrorKind::Internal, e.to_string()))?;
            steps = service.submit(request, prompt.to_vec(), guide)?;
        }
        let mut prompt_tokens = prompt.len() as u32;
        if self.tamper == Tamper::FalseUsage {
            prompt_tokens += FALSE_USAGE_EXTRA;
        }
        let accepted = GenerateFrame::Accepted {
            prompt_tokens,
            queue_depth: service.queue_depth(),
        };
        send(stream, &accepted).await?;
        if self.tamper == Tamper::Stall {
            tokio::time::sleep(STALL).await;
            return Err(None);
        }
        let mut kept: Vec<KeptStep> = Vec::new();
        let mut honest_text = TextStream::new(&request.stop);
        let mut finish = loop {
            match service.next_step(&mut steps, started).await? {
                Step::Token(leaf, piece) => {
                    let stopped = matches!(honest_text.push(&piece), Pushed::Stopped(_));
                    kept.push((leaf, piece));
                    if stopped {
                        break FinishReason::Stop;
                    }
                }
                Step::Finished(reason) => break reason,
            }
        };
        drop(steps);
        if let Some(replayed) = self.replayed(request) {
            finish = if replayed.len() == request.max_tokens as usize {
                FinishReason::Length
            } else {
                FinishReason::Stop
            };
            kept = replayed;
        } else {
            self.remember(&kept);
        }
        if self.tamper == Tamper::Truncate && kept.len() > 4 && request.max_tokens > 4 {
            kept.truncate(4);
            finish = FinishReason::Stop;
        }
        let streamed = self.rewrite(&mut kept, &service.engine, request);
        let (mut leaves, pieces): (Vec<StepLeaf>, Vec<Vec<u8>>) = kept.into_iter().unzip();
        if self.tamper == Tamper::SurerLogprobs {
            // Surer, but never more than certain: the exact checks refuse a logsumexp below
            // the best logit, so a careful cheat stays at or above it.
            for leaf in &mut leaves {
                let best = leaf.top.first().map_or(leaf.logsumexp, |c| c.logit);
                leaf.logsumexp = (leaf.logsumexp - FAKE_LOGPROB_SHIFT).max(best);
            }
        }
        self.copy_logits(&mut leaves, request)
            .await
            .map_err(|e| Refusal::new(RemoteErrorKind::Internal, e))?;
        let mut text = TextStream::new(&request.stop);
        for (step, (token, piece)) in streamed.iter().zip(&pieces).enumerate() {
            let mut visible = match text.push(piece) {
                Pushed::Text(t) | Pushed::Stopped(t) => t,
            };
            if self.tamper == Tamper::ForgedText && step == 0 {
                visible = FORGED_TEXT.into();
            }
            let frame = GenerateFrame::Token {
                step: step as u32,
                token: *token,
                text: visible,
                leaf: self.streamed_leaf(request, leaves.get(step)),
            };
            send(stream, &frame).await?;
            if self.tamper == Tamper::HangUp && step >= 2 {
                return Err(None);
            }
        }
        if self.tamper == Tamper::Endless {
            return endless(stream, streamed.len() as u32, streamed.last().copied()).await;
        }
        let mut commitment =
            service.commit(peer, request, prompt, leaves, finish, started.elapsed())?;
        if self.tamper == Tamper::OtherNumerics {
            commitment.numerics = OTHER_NUMERICS.into();
        }
        let signer = if self.tamper == Tamper::ForeignKey {
            Keypair::generate_secp256k1()
        } else {
            service.keypair.clone()
        };
        let mut commitment = commitment
            .sign(&signer)
            .map_err(|e| Refusal::new(RemoteErrorKind::Internal, e.to_string()))?;
        if self.tamper == Tamper::CorruptSignature
            && let Some(byte) = commitment.signature.get_mut(7)
        {
            *byte ^= 0x40;
        }
        let claimed_finish = match (self.tamper, finish) {
            (Tamper::FalseUsage, FinishReason::Length) => FinishReason::Stop,
            (Tamper::FalseUsage, _) => FinishReason::Length,
            _ => finish,
        };
        send(
            stream,
            &GenerateFrame::Done {
                finish_reason: claimed_finish,
                text: text.finish(),
                commitment: Box::new(commitment),
            },
        )
        .await
    }

    /// For [`Tamper::Replay`] after the first answer: the stored steps, with this request's
    /// draws.
    fn replayed(&self, request: &GenerateRequest) -> Option<Vec<KeptStep>> {
        if self.tamper != Tamper::Replay {
            return None;
        }
        let stored = self
            .replay
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()?;
        Some(
            stored
                .into_iter()
                .take(request.max_tokens as usize)
                .map(|(mut leaf, piece)| {
                    leaf.draw = sampling::draw(request.sampler.seed, leaf.step);
                    (leaf, piece)
                })
                .collect(),
        )
    }

    /// Whether this request is one the provider cheats on.
    fn cheats_on(&self, request: &GenerateRequest) -> bool {
        self.tamper != Tamper::OffPolicySometimes || cheated_on(request.request_id.as_bytes())
    }

    /// Keeps the first answer for [`Tamper::Replay`].
    fn remember(&self, steps: &[KeptStep]) {
        if self.tamper == Tamper::Replay {
            let mut stored = self
                .replay
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if stored.is_none() {
                *stored = Some(steps.to_vec());
            }
        }
    }

    /// Rewrites the committed steps; returns the tokens to stream (which differ from the
    /// committed ones for [`Tamper::ChangedTokens`]).
    fn rewrite(
        &self,
        steps: &mut [KeptStep],
        engine: &Engine,
        request: &GenerateRequest,
    ) -> Vec<u32> {
        let mut streamed = Vec::with_capacity(steps.len());
        for (leaf, piece) in steps.iter_mut() {
            match self.tamper {
                Tamper::OffPolicyToken | Tamper::OffPolicySometimes
                    if leaf.step == 1 && self.cheats_on(request) =>
                {
                    if let Some(runner_up) = leaf.top.iter().find(|c| c.id != leaf.token) {
                        leaf.token = runner_up.id;
                        // Its true text, so that only the sampler replay can tell.
                        *piece = engine.piece(leaf.token);
                    }
                }
                Tamper::MadeUpTokens => {
                    let n_vocab = engine.info().n_vocab.max(257);
                    let seed = u64::from_le_bytes(
                        request.request_id.as_bytes()[..8]
                            .try_into()
                            .unwrap_or([0; 8]),
                    );
                    // Skip the first ids (control tokens in most vocabularies).
                    let token = 256
                        + (splitmix(seed ^ u64::from(leaf.step)) % u64::from(n_vocab - 256)) as u32;
                    *leaf = fabricated_leaf(leaf.step, token, leaf.draw);
                    *piece = engine.piece(token);
                }
                _ => {}
            }
            let token = if self.tamper == Tamper::ChangedTokens && leaf.step == 2 {
                leaf.token ^ 1
            } else {
                leaf.token
            };
            streamed.push(token);
        }
        streamed
    }

    /// For [`Tamper::CopiedLogits`]: replaces the leaves' logits by the claimed model's, run
    /// teacher-forced over the emitted tokens, patched so the sampler still picks those tokens.
    async fn copy_logits(
        &self,
        leaves: &mut [StepLeaf],
        request: &GenerateRequest,
    ) -> Result<(), String> {
        if self.tamper != Tamper::CopiedLogits {
            return Ok(());
        }
        let Some(engine) = &self.claimed_engine else {
            return Err("CopiedLogits needs the claimed model".into());
        };
        let prompt = engine
            .tokenize(request.prompt())
            .map_err(|e| e.to_string())?;
        let run = engine
            .reexecute(prompt, request.sampler, request.max_tokens)
            .map_err(|e| e.to_string())?;
        run.push(leaves.iter().map(|l| l.token).collect())
            .map_err(|e| e.to_string())?;
        let real = run.finish().await.map_err(|e| e.to_string())?;
        for (leaf, real) in leaves.iter_mut().zip(real.steps) {
            leaf.logsumexp = real.logsumexp;
            leaf.top = patched(
                real.top,
                leaf.token,
                real.claimed_logit,
                &request.sampler,
                leaf.draw,
            );
        }
        Ok(())
    }

    /// Signs a leaf opening, tampered as the cheat says; `None` withholds it.
    pub(crate) fn opening(&self, mut opening: Opening, key: &Keypair) -> Option<SignedOpening> {
        let first = self.openings.fetch_add(1, Ordering::Relaxed) == 0;
        if (self.tamper == Tamper::DropFirstOpening && first) || self.tamper == Tamper::NeverOpens {
            tracing::warn!("TEST MODE: withholding a leaf opening");
            return None;
        }
        if let OpenLeavesResponse::Opened { leaves, proof } = &mut opening.response {
            match self.tamper {
                Tamper::TamperLeaf => {
                    if let Some(candidate) = leaves.first_mut().and_then(|l| l.top.first_mut()) {
                        candidate.logit += 1.0;
                    }
                }
                Tamper::WrongPath => {
                    if let Some(hash) = proof.first_mut() {
                        hash[0] ^= 0x01;
                    }
                }
                _ => {}
            }
        }
        opening.sign(key).ok()
    }
}

/// Evidence a lying referee made up, re-signed with `key`. A [`Tamper::FalseAccuser`] moves
/// each candidate's logit by an amount that depends on its id (so no centring hides it); a
/// [`Tamper::RubberStamp`] reports every claimed token as the model's own choice.
pub(crate) fn false_evidence(
    tamper: Tamper,
    mut evidence: SignedEvidence,
    key: &Keypair,
) -> SignedEvidence {
    match tamper {
        Tamper::FalseAccuser => {
            for step in &mut evidence.evidence.opened {
                for candidate in &mut step.top {
                    candidate.logit += (candidate.id % 7) as f32 * 0.25;
                }
                step.top
                    .sort_by(|a, b| b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id)));
            }
        }
        Tamper::RubberStamp => {
            for margin in &mut evidence.evidence.margins {
                *margin = 0.0;
            }
        }
        _ => return evidence,
    }
    tracing::warn!("TEST MODE: signing false referee evidence");
    match evidence.evidence.clone().sign(key) {
        Ok(signed) => signed,
        Err(_) => evidence,
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A leaf that looks like a confident model chose `token`: it on top, 31 neighbours below.
/// (Public for the calibration harness.)
#[doc(hidden)]
pub fn fabricated_leaf(step: u32, token: u32, draw: u64) -> StepLeaf {
    let mut top = vec![TopLogit {
        id: token,
        logit: 30.0,
    }];
    let mut id = 300u32;
    while top.len() < sampling::CANDIDATES {
        if id != token {
            top.push(TopLogit {
                id,
                logit: 10.0 - top.len() as f32 * 0.1,
            });
        }
        id += 1;
    }
    StepLeaf {
        step,
        token,
        draw,
        logsumexp: 30.5,
        top,
    }
}

/// `top` changed as little as it takes for [`sampling::sample`] to pick `token`: its logit
/// raised just past what it needs to win. (Public for the calibration harness.)
#[doc(hidden)]
pub fn patched(
    mut top: Vec<TopLogit>,
    token: u32,
    token_logit: f32,
    params: &SamplerParams,
    draw: u64,
) -> Vec<TopLogit> {
    if sampling::sample(&top, params, draw) == Some(token) {
        return top;
    }
    top.retain(|c| c.id != token);
    let best = top.first().map_or(0.0, |c| c.logit);
    let mut logit = token_logit.max(best) + 0.01;
    for _ in 0..64 {
        let mut candidate = top.clone();
        candidate.push(TopLogit { id: token, logit });
        candidate.sort_by(|a, b| b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id)));
        candidate.truncate(sampling::CANDIDATES);
        if sampling::sample(&candidate, params, draw) == Some(token) {
            return candidate;
        }
        logit += 0.5;
    }
    top
}

impl Cheat {
    /// The constraint a cheat decodes a constrained request under instead of its own: none at
    /// all, or another schema. `None` when it decodes as asked.
    fn decoded_under(&self, request: &GenerateRequest) -> Option<Option<Constraint>> {
        request.constraint.as_ref()?;
        match self.tamper {
            Tamper::IgnoresConstraint => Some(None),
            Tamper::OtherSchema => Some(Some(Constraint::JsonSchema(OTHER_SCHEMA.into()))),
            _ => None,
        }
    }

    /// The leaf streamed with a token when the request asks for leaves: the committed one, or
    /// for [`Tamper::FakeLogprobs`] one reporting higher log-probabilities.
    fn streamed_leaf(
        &self,
        request: &GenerateRequest,
        leaf: Option<&StepLeaf>,
    ) -> Option<Box<StepLeaf>> {
        let mut leaf = leaf.filter(|_| request.stream_leaves)?.clone();
        if self.tamper == Tamper::FakeLogprobs {
            leaf.logsumexp -= FAKE_LOGPROB_SHIFT;
        }
        Some(Box::new(leaf))
    }
}

/// [`Tamper::Endless`]: more tokens after the last real one, until the gateway hangs up.
async fn endless(
    stream: &mut libp2p::Stream,
    from: u32,
    token: Option<u32>,
) -> Result<(), Option<Refusal>> {
    for step in from..from.saturating_add(ENDLESS_LIMIT) {
        let frame = GenerateFrame::Token {
            step,
            token: token.unwrap_or(0),
            text: " more".into(),
            leaf: None,
        };
        send(stream, &frame).await?;
    }
    Err(None)
}
