//! The engine thread's loop: continuous batching over sequence slots, with re-execution chunks
//! interleaved between decode steps.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use proofmesh_shared::commit::StepLeaf;
use proofmesh_shared::protocol::FinishReason;
use proofmesh_shared::sampling;

use super::prefix::FreeSeqs;
use super::reexecute::{self, Referees};
use super::{EngineLoad, Job, Message, StepEvent};

/// What the thread needs to build its context.
#[derive(Debug, Clone, Copy)]
pub(super) struct Settings {
    pub(super) threads: i32,
    pub(super) context_size: u32,
    pub(super) parallel: u32,
    pub(super) batch_size: u32,
    pub(super) kv_cache: llama_cpp_2::context::params::KvCacheType,
    pub(super) referee_slots: u32,
    pub(super) referee_micro_batch: u32,
}

impl Settings {
    /// Context parameters shared by generation and referee contexts: the KV type and flash
    /// attention decide which kernels run (see the engine's module docs).
    fn context_params(&self) -> LlamaContextParams {
        LlamaContextParams::default()
            .with_n_threads(self.threads)
            .with_n_threads_batch(self.threads)
            .with_type_k(self.kv_cache)
            .with_type_v(self.kv_cache)
            .with_flash_attention_policy(llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_ENABLED)
    }
}

/// A running sequence.
#[derive(Debug)]
struct Slot {
    seq: i32,
    job: Job,
    /// The token to feed next, once the prompt is in.
    next: Option<u32>,
    steps: u32,
    /// Tokens whose KV is in the cache, at positions `0..len`: the prompt as far as it is
    /// prefilled, then every token fed back. Kept for the next prompt when the sequence ends.
    cached: Vec<u32>,
}

impl Slot {
    fn prefilling(&self) -> bool {
        self.cached.len() < self.job.prompt.len()
    }

    /// Position of the next token fed into the sequence.
    fn pos(&self) -> i32 {
        self.cached.len() as i32
    }
}

/// Runs until the last [`super::Engine`] handle sends [`Message::Stop`] (or, should the queue
/// close without it, until the running jobs are done).
pub(super) fn run(
    backend: &'static LlamaBackend,
    model: Arc<LlamaModel>,
    settings: Settings,
    load: Arc<EngineLoad>,
    queue: Receiver<Message>,
    ready: Sender<Result<(), String>>,
) {
    let params = settings
        .context_params()
        .with_n_ctx(super::total_context(
            settings.context_size,
            settings.parallel,
        ))
        .with_n_batch(settings.batch_size)
        .with_n_ubatch(settings.batch_size)
        .with_n_seq_max(settings.parallel);
    let mut ctx = match model.new_context(backend, params) {
        Ok(ctx) => ctx,
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return;
        }
    };
    let mut referee_contexts = Vec::new();
    for _ in 0..settings.referee_slots {
        let params = settings
            .context_params()
            .with_n_ctx(super::total_context(settings.context_size, 1))
            .with_n_batch(reexecute::chunk(settings.referee_micro_batch) as u32)
            .with_n_ubatch(settings.referee_micro_batch)
            .with_n_seq_max(1);
        match model.new_context(backend, params) {
            Ok(ctx) => referee_contexts.push(ctx),
            Err(e) => {
                let _ = ready.send(Err(format!("referee context: {e}")));
                return;
            }
        }
    }
    let n_vocab = u32::try_from(model.n_vocab()).unwrap_or(0);
    let mut referees = Referees::new(
        referee_contexts,
        n_vocab,
        settings.context_size as usize,
        reexecute::chunk(settings.referee_micro_batch),
        Arc::clone(&load),
    );
    let _ = ready.send(Ok(()));
    let mut batch = LlamaBatch::new(settings.batch_size as usize, 1);
    let mut free = FreeSeqs::new(settings.parallel);
    let mut slots: Vec<Slot> = Vec::new();
    let mut waiting: VecDeque<Job> = VecDeque::new();
    let mut timing = Timing::default();
    let mut open = true;
    loop {
        // Take every message that is there; block only when there is nothing to do.
        loop {
            let idle = slots.is_empty() && waiting.is_empty() && !referees.has_work();
            let message = if idle && open {
                queue.recv().map_err(|_| TryRecvError::Disconnected)
            } else {
                queue.try_recv()
            };
            match message {
                Ok(Message::Generate(job)) => waiting.push_back(*job),
                Ok(Message::Reexecute(command)) => referees.on_command(command),
                Ok(Message::Stop) => return,
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        if !open && slots.is_empty() && waiting.is_empty() && !referees.has_work() {
            return;
        }
        // Admit waiting jobs into free slots between decode steps.
        while !free.is_empty()
            && let Some(job) = waiting.pop_front()
        {
            load.waiting.fetch_sub(1, Ordering::Relaxed);
            admit(&mut ctx, &mut slots, &mut free, &load, job);
        }
        load.busy_slots.store(slots.len(), Ordering::Relaxed);
        // Callers that left free their slot now.
        for slot in slots.extract_if(.., |slot| slot.job.events.is_closed()) {
            free.put(slot.seq, slot.cached);
        }
        if !slots.is_empty() {
            generate_step(
                &mut ctx,
                &model,
                &mut batch,
                &mut slots,
                &mut free,
                &settings,
                &mut timing,
            );
        }
        // One re-execution chunk per generation step keeps both moving.
        if referees.has_work() {
            referees.turn();
        }
    }
}

/// One `llama_decode` over every running sequence, then one sampled step for each that wanted
/// logits.
fn generate_step(
    ctx: &mut LlamaContext<'_>,
    model: &LlamaModel,
    batch: &mut LlamaBatch<'_>,
    slots: &mut Vec<Slot>,
    free: &mut FreeSeqs,
    settings: &Settings,
    timing: &mut Timing,
) {
    // With one KV stream per sequence llama.cpp splits a batch into micro-batches of
    // *consecutive, increasing* sequence ids (`split_equal(.., sequential = true)`): sequences
    // in admission order, 3, 0, 2, 1, would cost four graph computations per step instead of one.
    slots.sort_unstable_by_key(|slot| slot.seq);
    let wants_logits = fill_batch(batch, slots, settings.batch_size as usize);
    let decoding = std::time::Instant::now();
    let decoded = ctx.decode(batch);
    timing.decode += decoding.elapsed();
    if let Err(e) = decoded {
        let message = format!("llama_decode failed: {e}");
        tracing::error!(%message);
        for slot in slots.drain(..) {
            let _ = slot.job.events.send(StepEvent::Failed {
                message: message.clone(),
            });
            free.put_cleared(ctx, slot.seq);
        }
        return;
    }
    let sampling = std::time::Instant::now();
    let mut finished = Vec::new();
    for (slot_index, batch_index) in wants_logits {
        let slot = &mut slots[slot_index];
        if let Some(reason) = step(ctx, model, slot, batch_index) {
            let _ = slot.job.events.send(StepEvent::Finished { reason });
            finished.push(slot_index);
        }
    }
    for slot in take_indices(slots, finished) {
        free.put(slot.seq, slot.cached);
    }
    timing.sample += sampling.elapsed();
    timing.tick(batch.n_tokens());
}

/// Removes the items at `indices` (in any order, each once) and returns them. Logits are
/// wanted from decoding slots first and from slots ending their prefill after, so the slots
/// that finish in one step do not come in index order: removing them by `swap_remove` from the
/// highest index down keeps every index still to remove valid.
fn take_indices<T>(items: &mut Vec<T>, mut indices: Vec<usize>) -> Vec<T> {
    indices.sort_unstable_by(|a, b| b.cmp(a));
    debug_assert!(indices.windows(2).all(|w| w[0] > w[1]), "an index twice");
    debug_assert!(indices.first().is_none_or(|&i| i < items.len()));
    indices.dedup();
    indices.retain(|&i| i < items.len());
    indices.into_iter().map(|i| items.swap_remove(i)).collect()
}

/// Where the engine thread's time goes, logged at debug level every 256 decodes.
#[derive(Debug, Default)]
struct Timing {
    decodes: u32,
    tokens: u64,
    decode: std::time::Duration,
    sample: std::time::Duration,
    since: Option<std::time::Instant>,
}

impl Timing {
    fn tick(&mut self, batch_tokens: i32) {
        let since = *self.since.get_or_insert_with(std::time::Instant::now);
        self.decodes += 1;
        self.tokens += u64::try_from(batch_tokens).unwrap_or(0);
        if self.decodes == 256 {
            tracing::debug!(
                decodes = self.decodes,
                tokens = self.tokens,
                decode_ms = self.decode.as_millis() as u64,
                sample_ms = self.sample.as_millis() as u64,
                wall_ms = since.elapsed().as_millis() as u64,
                "engine timing"
            );
            *self = Self::default();
        }
    }
}

fn admit(
    ctx: &mut LlamaContext<'_>,
    slots: &mut Vec<Slot>,
    free: &mut FreeSeqs,
    load: &EngineLoad,
    job: Job,
) {
    if job.prompt.is_empty() {
        let _ = job.events.send(StepEvent::Failed {
            message: "empty prompt".into(),
        });
        return;
    }
    let Some((seq, cached)) = free.take(ctx, &job.prompt) else {
        return;
    };
    load.cached_prompt_tokens
        .fetch_add(cached, Ordering::Relaxed);
    tracing::debug!(request = %job.request_id, seq, prompt = job.prompt.len(), cached, "sequence admitted");
    slots.push(Slot {
        seq,
        next: None,
        steps: 0,
        cached: job.prompt[..cached].to_vec(),
        job,
    });
}

/// Puts one token per generating slot and then prompt chunks into the batch. Returns
/// `(slot index, batch index)` for every position whose logits are needed.
fn fill_batch(
    batch: &mut LlamaBatch<'_>,
    slots: &mut [Slot],
    capacity: usize,
) -> Vec<(usize, i32)> {
    batch.clear();
    let mut wants = Vec::new();
    for (i, slot) in slots.iter_mut().enumerate() {
        if let Some(token) = slot.next.take() {
            if batch
                .add(LlamaToken(token as i32), slot.pos(), &[slot.seq], true)
                .is_ok()
            {
                wants.push((i, batch.n_tokens() - 1));
                slot.cached.push(token);
            } else {
                slot.next = Some(token);
            }
        }
    }
    for (i, slot) in slots.iter_mut().enumerate() {
        if !slot.prefilling() {
            continue;
        }
        let room = capacity.saturating_sub(batch.n_tokens() as usize);
        let prefilled = slot.cached.len();
        let take = room.min(slot.job.prompt.len() - prefilled);
        for j in prefilled..prefilled + take {
            let last = j + 1 == slot.job.prompt.len();
            if batch
                .add(
                    LlamaToken(slot.job.prompt[j] as i32),
                    j as i32,
                    &[slot.seq],
                    last,
                )
                .is_err()
            {
                break;
            }
            slot.cached.push(slot.job.prompt[j]);
            if last {
                wants.push((i, batch.n_tokens() - 1));
            }
        }
    }
    wants
}

/// Samples one step from the logits at `batch_index`; returns a finish reason when the job ends.
fn step(
    ctx: &LlamaContext<'_>,
    model: &LlamaModel,
    slot: &mut Slot,
    batch_index: i32,
) -> Option<FinishReason> {
    let logits = ctx.get_logits_ith(batch_index);
    let top = match &mut slot.job.guide {
        None => sampling::top_candidates(logits),
        // The candidates among the tokens the constraint allows (the leaf commits those).
        Some(guide) => guide.candidates(logits).unwrap_or_default(),
    };
    let draw = sampling::draw(slot.job.sampler.seed, slot.steps);
    let Some(token) = sampling::sample(&top, &slot.job.sampler, draw) else {
        let _ = slot.job.events.send(StepEvent::Failed {
            message: "no finite logits".into(),
        });
        return Some(FinishReason::Stop);
    };
    let leaf = StepLeaf {
        step: slot.steps,
        token,
        draw,
        logsumexp: sampling::logsumexp(logits),
        top,
    };
    if let Some(guide) = &mut slot.job.guide {
        guide.advance(token);
    }
    let llama_token = LlamaToken(token as i32);
    let eog = model.vocab().is_eog(llama_token);
    let piece = if eog {
        Vec::new()
    } else {
        model.vocab().token_to_piece(llama_token, false, None)
    };
    slot.steps += 1;
    if slot
        .job
        .events
        .send(StepEvent::Step { leaf, piece })
        .is_err()
    {
        // The caller left; the slot is released by the caller of `step` on the next pass.
        return Some(FinishReason::Stop);
    }
    if eog {
        Some(FinishReason::Stop)
    } else if slot.steps >= slot.job.max_tokens {
        Some(FinishReason::Length)
    } else {
        slot.next = Some(token);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::take_indices;

    #[test]
    fn slots_finishing_together_are_removed_in_any_order() {
        // A decoding slot (1) and one ending its prefill (0) finish in the same step: their
        // indices come as [1, 0]. Removing them in that order reversed panicked the engine
        // thread (`swap_remove index (is 1) should be < len (is 1)`).
        let mut slots = vec!["a", "b"];
        let mut taken = take_indices(&mut slots, vec![1, 0]);
        taken.sort_unstable();
        assert_eq!(taken, vec!["a", "b"]);
        assert!(slots.is_empty());
        let mut slots = vec!["a", "b", "c"];
        let mut taken = take_indices(&mut slots, vec![0, 2]);
        taken.sort_unstable();
        assert_eq!(taken, vec!["a", "c"]);
        assert_eq!(slots, vec!["b"]);
        let mut slots: Vec<u32> = (0..8).collect();
        let mut taken = take_indices(&mut slots, vec![3, 7, 0, 5]);
        taken.sort_unstable();
        assert_eq!(taken, vec![0, 3, 5, 7]);
        slots.sort_unstable();
        assert_eq!(slots, vec![1, 2, 4, 6]);
    }
}
