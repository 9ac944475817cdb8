//! Re-execution on the engine thread: teacher-forced runs of other providers' answers.
//!
//! Each job owns one referee context (one sequence per context, so nothing else shares its
//! batches). It is fed the prompt, then each claimed token as soon as the token after it is
//! known (the logits at a position score the next claimed token), in chunks of at most
//! [`CHUNK`] tokens (or one micro-batch, when that is larger), one chunk per turn of the engine
//! loop so generation keeps running. Per
//! claimed step it keeps the referee's candidates, logsumexp, logit of the claimed token and the
//! token's DiFR margin; `Finish` replies with all of them once the last token is in.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;
use proofmesh_shared::constraint::Guide;
use proofmesh_shared::sampling::{self, SamplerParams};
use proofmesh_shared::verify::RefereeStep;
use tokio::sync::oneshot;

use super::{EngineLoad, Reexecuted};

/// Most tokens fed to a referee context per turn of the engine loop: long enough to amortise
/// a `llama_decode` call, short enough (~0.2 s on 2 CPU cores) not to stall running streams.
pub(super) const CHUNK: usize = 64;

/// The chunk for a micro-batch size: at least one whole micro-batch.
pub(super) fn chunk(micro_batch: u32) -> usize {
    CHUNK.max(micro_batch as usize)
}

/// Re-execution traffic from [`super::Reexecution`] handles.
#[derive(Debug)]
pub(crate) enum Command {
    Begin {
        id: u64,
        prompt: Vec<u32>,
        sampler: SamplerParams,
        max_tokens: u32,
        guide: Option<Box<Guide>>,
    },
    Tokens {
        id: u64,
        tokens: Vec<u32>,
    },
    Finish {
        id: u64,
        reply: oneshot::Sender<Result<Reexecuted, String>>,
    },
    Cancel {
        id: u64,
    },
}

#[derive(Debug)]
struct Job {
    id: u64,
    context: usize,
    prompt: Vec<u32>,
    sampler: SamplerParams,
    max_tokens: u32,
    /// The request's constraint, walked along the claimed tokens.
    guide: Option<Box<Guide>>,
    claimed: Vec<u32>,
    /// Positions already decoded (prompt first, then claimed tokens).
    fed: usize,
    result: Reexecuted,
    finish: Option<oneshot::Sender<Result<Reexecuted, String>>>,
    failed: Option<String>,
}

impl Job {
    /// Positions that can be decoded now: everything but the last prompt token until the first
    /// claimed token is known, then one more per claimed token (the last claimed token itself is
    /// never fed: nothing follows it).
    fn target(&self) -> usize {
        self.prompt.len() - 1 + self.claimed.len()
    }

    fn pending(&self) -> bool {
        self.failed.is_none() && self.fed < self.target()
    }
}

/// The referee contexts and the jobs running on them.
pub(super) struct Referees<'m> {
    contexts: Vec<LlamaContext<'m>>,
    free: Vec<usize>,
    jobs: Vec<Job>,
    turn: usize,
    batch: LlamaBatch<'static>,
    n_vocab: u32,
    context_size: usize,
    chunk: usize,
    load: Arc<EngineLoad>,
}

impl std::fmt::Debug for Referees<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Referees")
            .field("contexts", &self.contexts.len())
            .field("jobs", &self.jobs.len())
            .finish()
    }
}

impl<'m> Referees<'m> {
    pub(super) fn new(
        contexts: Vec<LlamaContext<'m>>,
        n_vocab: u32,
        context_size: usize,
        chunk: usize,
        load: Arc<EngineLoad>,
    ) -> Self {
        load.free_referee_contexts
            .store(contexts.len(), Ordering::Release);
        Self {
            free: (0..contexts.len()).rev().collect(),
            contexts,
            jobs: Vec::new(),
            turn: 0,
            batch: LlamaBatch::new(chunk, 1),
            n_vocab,
            context_size,
            chunk,
            load,
        }
    }

    /// Gives a job's context back, and only then lets a handle reserve it again.
    fn release(&mut self, context: usize) {
        self.free.push(context);
        self.load
            .free_referee_contexts
            .fetch_add(1, Ordering::AcqRel);
    }

    /// Whether a turn would do anything.
    pub(super) fn has_work(&self) -> bool {
        self.jobs.iter().any(Job::pending)
    }

    pub(super) fn on_command(&mut self, command: Command) {
        match command {
            Command::Begin {
                id,
                prompt,
                sampler,
                max_tokens,
                guide,
            } => self.begin(id, prompt, sampler, max_tokens, guide),
            Command::Tokens { id, tokens } => {
                if let Some(job) = self.jobs.iter_mut().find(|j| j.id == id) {
                    if job.claimed.len() + tokens.len() > job.max_tokens as usize {
                        job.failed = Some("more claimed tokens than max_tokens".into());
                    } else {
                        job.claimed.extend(tokens);
                    }
                }
            }
            Command::Finish { id, reply } => {
                if let Some(job) = self.jobs.iter_mut().find(|j| j.id == id) {
                    job.finish = Some(reply);
                } else {
                    let _ = reply.send(Err("unknown re-execution".into()));
                }
                self.settle();
            }
            Command::Cancel { id } => {
                if let Some(at) = self.jobs.iter().position(|j| j.id == id) {
                    let job = self.jobs.swap_remove(at);
                    self.release(job.context);
                }
            }
        }
    }

    fn begin(
        &mut self,
        id: u64,
        prompt: Vec<u32>,
        sampler: SamplerParams,
        max_tokens: u32,
        guide: Option<Box<Guide>>,
    ) {
        let Some(context) = self.free.pop() else {
            // The handle reserved a context and only the engine thread gives one back, so this
            // cannot happen; should it, the job is unknown to `Finish` rather than waiting.
            tracing::warn!(id, "no free referee context");
            return;
        };
        let mut failed = None;
        if prompt.is_empty() || prompt.len() + max_tokens as usize > self.context_size {
            failed = Some(format!(
                "prompt of {} tokens plus {max_tokens} claimed tokens exceeds the referee's context of {}",
                prompt.len(),
                self.context_size
            ));
        }
        if prompt.iter().any(|&t| t >= self.n_vocab) {
            failed = Some("prompt token outside the vocabulary".into());
        }
        self.contexts[context].clear_kv_cache();
        self.jobs.push(Job {
            id,
            context,
            prompt,
            sampler,
            max_tokens,
            guide,
            claimed: Vec::new(),
            fed: 0,
            result: Reexecuted {
                steps: Vec::new(),
                margins: Vec::new(),
                invalid_tokens: 0,
            },
            finish: None,
            failed,
        });
    }

    /// Replies to every job that is finished (or failed) and has been asked for its result.
    fn settle(&mut self) {
        let mut i = 0;
        while i < self.jobs.len() {
            let job = &self.jobs[i];
            let done = job.failed.is_some() || job.fed >= job.target();
            if done && job.finish.is_some() {
                let mut job = self.jobs.swap_remove(i);
                self.release(job.context);
                if let Some(reply) = job.finish.take() {
                    let _ = reply.send(match job.failed {
                        Some(message) => Err(message),
                        None => Ok(job.result),
                    });
                }
            } else {
                i += 1;
            }
        }
    }

    /// Decodes one chunk of one job (round-robin), then answers finished jobs.
    pub(super) fn turn(&mut self) {
        let pending: Vec<usize> = (0..self.jobs.len())
            .filter(|&i| self.jobs[i].pending())
            .collect();
        if pending.is_empty() {
            self.settle();
            return;
        }
        self.turn = (self.turn + 1) % pending.len();
        let index = pending[self.turn];
        let n_vocab = self.n_vocab;
        let job = &mut self.jobs[index];
        let ctx = &mut self.contexts[job.context];
        if let Err(message) = feed(ctx, &mut self.batch, job, n_vocab, self.chunk) {
            tracing::warn!(id = job.id, %message, "re-execution failed");
            job.failed = Some(message);
        }
        self.settle();
    }
}

/// Decodes the job's next chunk and records the referee's view of every claimed step in it.
fn feed(
    ctx: &mut LlamaContext<'_>,
    batch: &mut LlamaBatch<'_>,
    job: &mut Job,
    n_vocab: u32,
    chunk: usize,
) -> Result<(), String> {
    let plen = job.prompt.len();
    let end = job.target().min(job.fed + chunk);
    batch.clear();
    let mut scored: Vec<(usize, i32)> = Vec::new();
    for position in job.fed..end {
        let token = if position < plen {
            job.prompt[position]
        } else {
            job.claimed[position - plen]
        };
        // An invalid claimed token cannot be fed; its step is scored as implausible below.
        let token = if token < n_vocab { token } else { 0 };
        let wants_logits = position + 1 >= plen;
        batch
            .add(
                LlamaToken(token as i32),
                position as i32,
                &[0],
                wants_logits,
            )
            .map_err(|e| e.to_string())?;
        if wants_logits {
            scored.push((position + 1 - plen, batch.n_tokens() - 1));
        }
    }
    ctx.decode(batch)
        .map_err(|e| format!("llama_decode failed: {e}"))?;
    for (step, batch_index) in scored {
        let claimed = job.claimed[step];
        let logits = ctx.get_logits_ith(batch_index);
        // Constrained: the candidates among the allowed tokens, as the provider took them; a
        // claimed token the constraint does not allow cannot be the sampler's choice.
        let (top, allowed) = match job.guide.as_deref_mut() {
            None => (sampling::top_candidates(logits), true),
            Some(guide) => {
                let top = guide.candidates(logits);
                let allowed = top.is_some() && guide.advance(claimed);
                (
                    top.unwrap_or_else(|| sampling::top_candidates(logits)),
                    allowed,
                )
            }
        };
        let logsumexp = sampling::logsumexp(logits);
        let (claimed_logit, margin) = match logits.get(claimed as usize) {
            Some(&logit) if claimed < n_vocab && !allowed => (logit, f32::INFINITY),
            Some(&logit) if claimed < n_vocab => {
                let draw = sampling::draw(job.sampler.seed, step as u32);
                (
                    logit,
                    sampling::margin(&top, claimed, logit, &job.sampler, draw),
                )
            }
            _ => {
                job.result.invalid_tokens += 1;
                (f32::NEG_INFINITY, f32::INFINITY)
            }
        };
        job.result.steps.push(RefereeStep {
            step: step as u32,
            logsumexp,
            claimed_logit,
            top,
        });
        job.result.margins.push(margin);
    }
    job.fed = end;
    Ok(())
}
