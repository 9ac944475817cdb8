//! Prompt caching: a finished sequence leaves its KV cache in place, and the next prompt that
//! starts the same way (a shared system prompt, the earlier turns of a chat, a retried request)
//! reuses it and prefills only the rest, as llama.cpp's server does.
//!
//! Reuse does not change a single logit where the audit is exact: with the provider's
//! deterministic numerics every KV row is computed the same way whatever batch it was decoded
//! in (the engine's module docs), so cached rows equal freshly computed ones bit for bit;
//! `provider/tests/prompt_cache.rs` checks that.

use llama_cpp_2::context::LlamaContext;

/// Prefill tokens a cached prefix must save to be worth a sequence id off the packed range (a
/// gap costs an extra graph computation in every step while it lasts).
const WORTH_A_GAP: usize = 128;

/// The sequence ids not running, each with the tokens its KV cache still holds at positions
/// `0..len`.
#[derive(Debug)]
pub(super) struct FreeSeqs(Vec<(i32, Vec<u32>)>);

impl FreeSeqs {
    /// `parallel` empty sequences.
    pub(super) fn new(parallel: u32) -> Self {
        Self(
            (0..parallel as i32)
                .rev()
                .map(|seq| (seq, Vec::new()))
                .collect(),
        )
    }

    /// Whether every sequence is running.
    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Takes the free sequence whose cache shares the longest prefix with `prompt`, drops the
    /// rest of its cache, and returns it with the number of prompt tokens already in place.
    /// That number is always below the prompt's length, so the last prompt token is decoded
    /// again and yields the first step's logits. The lowest free sequence id is taken unless
    /// another saves [`WORTH_A_GAP`] more tokens of prefill: llama.cpp decodes a multi-stream
    /// batch in one pass only over consecutive sequence ids (see `generate_step`), so running
    /// ids are best kept packed at the bottom.
    pub(super) fn take(
        &mut self,
        ctx: &mut LlamaContext<'_>,
        prompt: &[u32],
    ) -> Option<(i32, usize)> {
        let shared_with = |i: usize| common_prefix(&self.0[i].1, prompt);
        let lowest = (0..self.0.len()).min_by_key(|&i| self.0[i].0)?;
        let best = (0..self.0.len())
            .max_by_key(|&i| (shared_with(i), std::cmp::Reverse(self.0[i].0)))
            .unwrap_or(lowest);
        let index = if shared_with(best) >= shared_with(lowest) + WORTH_A_GAP {
            best
        } else {
            lowest
        };
        let shared = shared_with(index);
        let (seq, _) = self.0.remove(index);
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

    /// Returns `seq`, whose cache holds `tokens` at positions `0..len`.
    pub(super) fn put(&mut self, seq: i32, tokens: Vec<u32>) {
        self.0.push((seq, tokens));
    }

    /// Returns `seq` with an empty cache (after a failed decode, whose cache is not trusted).
    pub(super) fn put_cleared(&mut self, ctx: &mut LlamaContext<'_>, seq: i32) {
        clear(ctx, seq);
        self.0.push((seq, Vec::new()));
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
    use super::common_prefix;

    #[test]
    fn common_prefix_counts_equal_leading_tokens() {
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4, 5]), 2);
        assert_eq!(common_prefix(&[], &[1]), 0);
        assert_eq!(common_prefix(&[1, 2], &[1, 2]), 2);
        assert_eq!(common_prefix(&[9], &[1, 2]), 0);
    }
}
