//! Deliberate misbehaviour, for tests of the gateway's audit and for the calibration harness
//! only. Never on by default, and not reachable from the command line: a test builds a
//! [`crate::ProviderConfig`] with one of these set.
//!
//! The cheats that serve other weights (another model, a cheaper quantization, perturbed
//! weights) need no code here: such a provider loads that file and claims the default model's
//! digest (`ProviderConfig::claim_digest`). The ones here change what an honest engine produces.

use std::sync::Mutex;

use libp2p::identity::Keypair;
use proofmesh_shared::commit::{SignedCommitment, StepLeaf};
use proofmesh_shared::protocol::{GenerateRequest, OpenLeavesResponse};
use proofmesh_shared::sampling::{self, SamplerParams, TopLogit};

use crate::engine::Engine;

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
}

/// One generated step as a replaying cheat keeps it: the leaf and the token's text.
type KeptStep = (StepLeaf, Vec<u8>);

/// A cheating provider's state: its first answer (for [`Tamper::Replay`]) and the claimed
/// model's engine (for [`Tamper::CopiedLogits`]).
#[derive(Debug, Default)]
pub(crate) struct Cheat {
    pub(crate) tamper: Tamper,
    pub(crate) claimed_engine: Option<Engine>,
    replay: Mutex<Option<Vec<KeptStep>>>,
}

impl Cheat {
    pub(crate) fn new(tamper: Tamper, claimed_engine: Option<Engine>) -> Self {
        Self {
            tamper,
            claimed_engine,
            replay: Mutex::default(),
        }
    }

    /// For [`Tamper::Replay`] after the first answer: the stored steps, with this request's
    /// draws.
    pub(crate) fn replayed(&self, request: &GenerateRequest) -> Option<Vec<KeptStep>> {
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

    /// Keeps the first answer for [`Tamper::Replay`].
    pub(crate) fn remember(&self, steps: &[KeptStep]) {
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

    /// Rewrites one step as it comes out of the engine. Returns the token to stream (which
    /// differs from the committed one for [`Tamper::ChangedTokens`]) and the replacement text
    /// when the step changed.
    pub(crate) fn step(
        &self,
        leaf: &mut StepLeaf,
        engine: &Engine,
        request: &GenerateRequest,
    ) -> (u32, Option<Vec<u8>>) {
        match self.tamper {
            Tamper::OffPolicyToken if leaf.step == 1 => {
                if let Some(runner_up) = leaf.top.iter().find(|c| c.id != leaf.token) {
                    leaf.token = runner_up.id;
                    return (leaf.token, Some(Vec::new()));
                }
            }
            Tamper::MadeUpTokens => {
                let n_vocab = engine.info().n_vocab.max(2);
                let seed = u64::from_le_bytes(
                    request.request_id.as_bytes()[..8]
                        .try_into()
                        .unwrap_or([0; 8]),
                );
                // Skip the first ids (control tokens in most vocabularies).
                let token =
                    256 + (splitmix(seed ^ u64::from(leaf.step)) % u64::from(n_vocab - 256)) as u32;
                *leaf = fabricated_leaf(leaf.step, token, leaf.draw);
                let text = engine.detokenize(&[token]).into_bytes();
                return (token, Some(text));
            }
            Tamper::ChangedTokens if leaf.step == 2 => return (leaf.token ^ 1, None),
            _ => {}
        }
        (leaf.token, None)
    }

    /// Whether to stop after this step, claiming a natural end ([`Tamper::Truncate`]).
    pub(crate) fn stops_early(&self, step: u32, max_tokens: u32) -> bool {
        self.tamper == Tamper::Truncate && step >= 3 && max_tokens > 4
    }

    /// For [`Tamper::CopiedLogits`]: replaces the leaves' logits by the claimed model's, run
    /// teacher-forced over the emitted tokens, patched so the sampler still picks those tokens.
    pub(crate) async fn copy_logits(
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
            .tokenize_chat(&request.messages)
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

    /// Opening tampers.
    pub(crate) fn opening(&self, response: &mut OpenLeavesResponse) {
        if let OpenLeavesResponse::Opened { leaves, proof } = response {
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
    }

    /// The key the commitment is signed with.
    pub(crate) fn signer(&self, node_key: &Keypair) -> Keypair {
        if self.tamper == Tamper::ForeignKey {
            Keypair::generate_secp256k1()
        } else {
            node_key.clone()
        }
    }

    /// Signature tampers.
    pub(crate) fn signed(&self, commitment: &mut SignedCommitment) {
        if self.tamper == Tamper::CorruptSignature
            && let Some(byte) = commitment.signature.get_mut(7)
        {
            *byte ^= 0x40;
        }
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
