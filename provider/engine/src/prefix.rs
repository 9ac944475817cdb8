//! Prompt caching: a finished sequence leaves its KV cache in place, and the next prompt that
//! starts the same way (a shared system prompt, the earlier turns of a chat, a retried request)
//! reuses it and prefills only the rest, as llama.cpp's server does.
//!
//! Reuse does not change a single logit where the audit is exact: with the provider's
//! deterministic numerics every KV row is computed the same way whatever batch it was decoded
//! in (the engine's module docs), so cached rows equal freshly computed ones bit for bit;
//! `provider/tests/prompt_cache.rs` checks that.

use llama_cpp_2::context::LlamaContext;

/// Prefill tokens a cached prefix must save to be worth splitting the running sequence ids into
/// one more range. A range costs a graph computation (1-2 ms here) in every step while it lasts,
/// which in a busy server is until the next arrival fills the gap; 8 prompt tokens cost about
/// as much to prefill. At 128, a wave of repeated short prompts found its caches only for the
/// first admitted: 0.92 of llama-server's tokens/s at concurrency 16 against 0.95 at 8 (one
/// paired 4-round run of both).
const WORTH_A_GAP: usize = 8;

/// The sequence ids not running, least recently freed first, each with the tokens its KV cache
/// still holds at positions `0..len`.
#[derive(Debug)]
pub(super) struct FreeSeqs {
    parallel: i32,
    free: Vec<(i32, Vec<u32>)>,
}

impl FreeSeqs {
    /// `parallel` empty sequences.
    pub(super) fn new(parallel: u32) -> Self {
        let parallel = i32::try_from(parallel).unwrap_or(i32::MAX);
        Self {
            parallel,
            free: (0..parallel).map(|seq| (seq, Vec::new())).collect(),
        }
    }

    /// Whether every sequence is running.
    pub(super) fn is_empty(&self) -> bool {
        self.free.is_empty()
    }

    /// How many ranges of consecutive ids the running sequences would form with `seq` added.
    fn ranges_with(&self, seq: i32) -> usize {
        let running =
            |id: i32| id == seq || ((0..self.parallel).contains(&id) && !self.is_free(id));
        (0..self.parallel)
            .filter(|&id| running(id) && (id == 0 || !running(id - 1)))
            .count()
    }

    fn is_free(&self, seq: i32) -> bool {
        self.free.iter().any(|(id, _)| *id == seq)
    }

    /// Takes the free sequence whose cache shares the longest prefix with `prompt`, drops the
    /// rest of its cache, and returns it with the number of prompt tokens already in place.
    /// That number is always below the prompt's length, so the last prompt token is decoded
    /// again and yields the first step's logits.
    ///
    /// llama.cpp decodes a multi-stream batch in one pass only over consecutive sequence ids
    /// (see `generate_step`), so the choice is among the free ids that keep the running ones in
    /// the fewest ranges (with nothing running, any id), the least recently freed on a tie (so a
    /// prompt that finds nothing overwrites the oldest cache, as llama-server's LRU does); an id
    /// that adds a range must save [`WORTH_A_GAP`] more tokens of prefill.
    pub(super) fn take(
        &mut self,
        ctx: &mut LlamaContext<'_>,
        prompt: &[u32],
    ) -> Option<(i32, usize)> {
        let index = self.pick(prompt)?;
        let shared = common_prefix(&self.free[index].1, prompt);
        let (seq, _) = self.free.remove(index);
        let keep = shared.min(prompt.len().saturating_sub(1));
        let removed = u32::try_from(keep)
            .ok()
            .map(|p0| ctx.clear_kv_cache_seq(u32::try_from(seq).ok(), Some(p0), None));
        if matches!(removed, Some(Ok(true))) {
            return Some((seq, keep));
        }
        // A cache that cannot drop a tail (never for this engine's models) starts over.
        clear(ctx, seq);
        Some((seq, 0))
    }

    /// The index in `free` of the sequence [`FreeSeqs::take`] takes for `prompt`.
    fn pick(&self, prompt: &[u32]) -> Option<usize> {
        let shared_with = |i: usize| common_prefix(&self.free[i].1, prompt);
        let ranges: Vec<usize> = self
            .free
            .iter()
            .map(|(seq, _)| self.ranges_with(*seq))
            .collect();
        let fewest = ranges.iter().copied().min()?;
        let best_among = |allowed: &dyn Fn(usize) -> bool| {
            (0..self.free.len())
                .filter(|&i| allowed(i))
                .max_by_key(|&i| (shared_with(i), std::cmp::Reverse(i)))
        };
        let packed = best_among(&|i| ranges[i] == fewest)?;
        let best = best_among(&|_| true).unwrap_or(packed);
        Some(if shared_with(best) >= shared_with(packed) + WORTH_A_GAP {
            best
        } else {
            packed
        })
    }

    /// Returns `seq`, whose cache holds `tokens` at positions `0..len`.
    pub(super) fn put(&mut self, seq: i32, tokens: Vec<u32>) {
        self.free.push((seq, tokens));
    }

    /// Returns `seq` with an empty cache (after a failed decode, whose cache is not trusted).
    pub(super) fn put_cleared(&mut self, ctx: &mut LlamaContext<'_>, seq: i32) {
        clear(ctx, seq);
        self.free.push((seq, Vec::new()));
    }
}

fn clear(ctx: &mut LlamaContext<'_>, seq: i32) {
    if let Err(e) = ctx.clear_kv_cache_seq(u32::try_from(seq).ok(), None, None) {
        tracing::warn!(seq, error = %e, "cannot clear a sequence's cache");
    }
}

/// Length of the common prefix of `a` and `b`.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::{FreeSeqs, WORTH_A_GAP, common_prefix};

    /// Free sequences `(id, cached tokens)` out of `parallel`; the rest are running.
    fn seqs(parallel: i32, free: &[(i32, Vec<u32>)]) -> FreeSeqs {
        FreeSeqs {
            parallel,
            free: free.to_vec(),
        }
    }

    fn picked(seqs: &FreeSeqs, prompt: &[u32]) -> i32 {
        seqs.free[seqs.pick(prompt).unwrap()].0
    }

    #[test]
    fn nothing_running_takes_the_longest_cached_prefix() {
        let free = seqs(
            4,
            &[(0, vec![9]), (1, vec![]), (2, vec![1, 2, 3]), (3, vec![1])],
        );
        assert_eq!(picked(&free, &[1, 2, 3, 4]), 2);
        // No cache helps: the least recently freed.
        assert_eq!(picked(&free, &[7]), 0);
        let free = seqs(4, &[(3, vec![]), (1, vec![9]), (0, vec![])]);
        assert_eq!(picked(&free, &[7]), 3);
    }

    #[test]
    fn running_ids_stay_in_one_range_unless_the_cache_saves_a_lot() {
        // 0 and 1 run; 2 keeps them in one range, 3 would open a second.
        let short = vec![1, 2, 3];
        let free = seqs(4, &[(2, vec![]), (3, short.clone())]);
        assert_eq!(picked(&free, &[1, 2, 3, 4]), 2);
        let long: Vec<u32> = (0..WORTH_A_GAP as u32 + 10).collect();
        let free = seqs(4, &[(2, vec![]), (3, long.clone())]);
        assert_eq!(picked(&free, &long), 3);
        // 3 runs: 2 joins its range, 0 would open one.
        let free = seqs(4, &[(0, short.clone()), (1, vec![]), (2, vec![])]);
        assert_eq!(picked(&free, &short), 2);
    }

    #[test]
    fn common_prefix_counts_equal_leading_tokens() {
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4, 5]), 2);
        assert_eq!(common_prefix(&[], &[1]), 0);
        assert_eq!(common_prefix(&[1, 2], &[1, 2]), 2);
        assert_eq!(common_prefix(&[9], &[1, 2]), 0);
    }
}
