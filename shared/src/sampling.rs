//! The reproducible sampler.
//!
//! Sampling happens here and not in llama.cpp, so that a verifier holding a provider's committed
//! logits can replay the choice exactly, and so that a referee can score how plausible each
//! claimed token is under its own logits. The steps, in this order:
//!
//! 1. candidates: the [`CANDIDATES`] most likely tokens, sorted by logit (descending, ties by
//!    lower token id); `top_k` can narrow this further. These are exactly the logits a
//!    [`crate::commit::StepLeaf`] commits, which is what makes replay possible.
//! 2. temperature 0 means greedy: the first candidate.
//! 3. otherwise the kept set: softmax weights of `logit / temperature` over the candidates (f64,
//!    `libm::exp` so that every platform computes the same bits), then `min_p` (keep candidates
//!    with probability at least `min_p` times the best one) and `top_p` (keep the shortest prefix
//!    whose mass reaches `top_p`).
//! 4. Gumbel-max over the kept set: the token maximising `logit / temperature + g(token)`, where
//!    `g` is Gumbel noise keyed by the step's draw ([`gumbel`]). This samples exactly from the
//!    softmax of the kept set, and it gives the referee a natural score for a claimed token, the
//!    DiFR margin ([`margin`]): how many logits the claimed token is short of winning.
//! 5. the draw comes from [`draw`], a SHA-256 PRF of (seed, step): the provider does not choose
//!    it (the seed comes from the client, or from the gateway when the client gives none), and
//!    the verifier recomputes it. The request id is deliberately not an input: OpenAI's `seed`
//!    promises that the same request with the same seed samples the same tokens, on any provider
//!    and in any later request; the commitment binds the request id instead.

use serde::{Deserialize, Serialize};

/// How many candidates the sampler considers and a leaf commits per step. 32 keeps a leaf under
/// 300 bytes while covering essentially all probability mass at usual temperatures; a request's
/// `top_k` above this value is treated as this value.
pub const CANDIDATES: usize = 32;

/// The sampler settings of one request; they are part of the request hash.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SamplerParams {
    /// 0 means greedy decoding.
    pub temperature: f32,
    /// Nucleus sampling mass in `(0, 1]`.
    pub top_p: f32,
    /// Keep at most this many candidates; 0 means [`CANDIDATES`].
    pub top_k: u32,
    /// Drop candidates whose probability is below `min_p` times the best one's.
    pub min_p: f32,
    /// Seed of the draw PRF.
    pub seed: u64,
}

impl Default for SamplerParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: 0,
        }
    }
}

/// One candidate token with the raw logit the model gave it. On the wire it is a two-element
/// array `[id, logit]`, which keeps an opened leaf near 300 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(from = "(u32, f32)", into = "(u32, f32)")]
pub struct TopLogit {
    /// Token id in the model's vocabulary.
    pub id: u32,
    /// The model's raw (f32) logit for that token.
    pub logit: f32,
}

impl From<(u32, f32)> for TopLogit {
    fn from((id, logit): (u32, f32)) -> Self {
        Self { id, logit }
    }
}

impl From<TopLogit> for (u32, f32) {
    fn from(c: TopLogit) -> Self {
        (c.id, c.logit)
    }
}

/// The draw for one step: 53 uniform bits from `SHA-256("proofmesh/draw/v1" ‖ seed ‖ step)`.
/// Kept as an integer so it is committed and compared exactly.
pub fn draw(seed: u64, step: u32) -> u64 {
    let digest = crate::sha256(&[
        b"proofmesh/draw/v1",
        &seed.to_le_bytes(),
        &step.to_le_bytes(),
    ]);
    let mut head = [0u8; 8];
    head.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(head) >> 11
}

/// Gumbel noise `-ln(-ln u)` for `token` at the step whose draw is `draw`, with `u` uniform in
/// `(0, 1)` from a splitmix64 mix of the two. The draw already comes from the SHA-256 PRF; this
/// only spreads it over the vocabulary, so a cheap mixer is enough. `libm` keeps it bit-identical
/// on every platform.
pub fn gumbel(draw: u64, token: u32) -> f64 {
    let mut z = draw ^ u64::from(token).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    // 53 bits and a half-step offset: strictly inside (0, 1), so both logarithms are finite.
    let u = ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -libm::log(-libm::log(u))
}

/// The `CANDIDATES` best tokens of a full logit vector, sorted by logit descending and by id
/// ascending on ties. NaN logits are never selected.
///
/// Runs for every generated and every re-executed step, so it avoids touching most logits twice:
/// one vectorised pass takes the largest logit of each block of 64; the `CANDIDATES`-th largest
/// of those maxima is a floor, since that many blocks each hold a logit at least as large, so
/// every candidate is at least the floor and lies in a block whose maximum is too. Only those
/// blocks (about `CANDIDATES` of them) are scanned logit by logit, in id order, so ties keep
/// the lower id.
pub fn top_candidates(logits: &[f32]) -> Vec<TopLogit> {
    const BLOCK: usize = 64;
    let maxima: Vec<f32> = logits
        .chunks(BLOCK)
        .map(|block| largest_up_to(block, f32::INFINITY))
        .collect();
    let floor = if maxima.len() > CANDIDATES {
        // Block maxima are never NaN, so the total order is the numeric one.
        let mut order = maxima.clone();
        *order
            .select_nth_unstable_by(CANDIDATES - 1, |a, b| b.total_cmp(a))
            .1
    } else {
        f32::NEG_INFINITY
    };
    let mut top: Vec<TopLogit> = Vec::with_capacity(CANDIDATES + 1);
    for (b, (block, &block_max)) in logits.chunks(BLOCK).zip(&maxima).enumerate() {
        let full = top.len() == CANDIDATES;
        if block_max < floor || (full && block_max <= top[CANDIDATES - 1].logit) {
            continue;
        }
        for (j, &logit) in block.iter().enumerate() {
            let id = (b * BLOCK + j) as u32;
            if logit.is_nan() {
                continue;
            }
            if top.len() == CANDIDATES && !better(logit, id, top[CANDIDATES - 1]) {
                continue;
            }
            let at = top.partition_point(|c| better(c.logit, c.id, TopLogit { id, logit }));
            top.insert(at, TopLogit { id, logit });
            top.truncate(CANDIDATES);
        }
    }
    top
}

/// The largest value of `values` that is at most `limit` (`-inf` when there is none): plain
/// comparisons over eight lanes, which the compiler vectorises (NaN never wins a comparison).
/// Inlined so that each caller's constant `limit` is folded in: called through, the extra
/// comparison cost `top_candidates` a fifth of its time (16.2 against 12.0 µs in Criterion).
#[inline(always)]
fn largest_up_to(values: &[f32], limit: f32) -> f32 {
    let mut highs = [f32::NEG_INFINITY; 8];
    let mut eights = values.chunks_exact(8);
    for eight in &mut eights {
        for (high, &v) in highs.iter_mut().zip(eight) {
            *high = if v > *high && v <= limit { v } else { *high };
        }
    }
    highs
        .into_iter()
        .chain(eights.remainder().iter().copied())
        .fold(
            f32::NEG_INFINITY,
            |m, v| if v > m && v <= limit { v } else { m },
        )
}

/// Whether `(logit, id)` sorts before `other`.
fn better(logit: f32, id: u32, other: TopLogit) -> bool {
    logit > other.logit || (logit == other.logit && id < other.id)
}

/// `log(sum(exp(logits)))` over the full vocabulary (non-finite logits skipped).
///
/// Runs once per generated step over ~50k logits, so it must cost well under 1 % of a decode
/// step: eight f32 lanes of a polynomial `exp` the compiler vectorises, summed in f64 at the end.
/// Accurate to ~5e-6 relative; it is compared statistically, never bit for bit, so it need not
/// be bit-identical across platforms (the sampler itself uses `libm`, which is).
pub fn logsumexp(logits: &[f32]) -> f32 {
    // +inf is left out: it would make every other term vanish.
    let max = largest_up_to(logits, f32::MAX);
    if !max.is_finite() {
        return max;
    }
    // Two simple passes per block of 256, which the compiler turns into 8-wide vector code:
    // exponentials into a buffer (branch-free: a non-finite logit lands on the clamp, exp(-87) ≈
    // 1e-38, nothing next to the maximum's 1), then eight running sums.
    let mut lanes = [0f32; 8];
    let mut buffer = [0f32; 256];
    for block in logits.chunks(buffer.len()) {
        let exps = &mut buffer[..block.len()];
        for (e, &l) in exps.iter_mut().zip(block) {
            *e = fast_exp(l - max);
        }
        let mut eights = exps.chunks_exact(8);
        for eight in &mut eights {
            for (lane, &e) in lanes.iter_mut().zip(eight) {
                *lane += e;
            }
        }
        for (lane, &e) in lanes.iter_mut().zip(eights.remainder()) {
            *lane += e;
        }
    }
    let sum: f64 = lanes.iter().map(|&l| f64::from(l)).sum();
    (f64::from(max) + sum.ln()) as f32
}

/// `exp(x)` for `x <= 0` (larger `x` is treated as 0): `2^(x·log2 e)` split into a rounded exponent and a degree-6 Taylor
/// polynomial for the fraction in `[-0.5, 0.5]` (relative error below 5e-6, dominated by the f32
/// argument reduction; ample for a statistic). Inputs below -87 are
/// clamped (their exp is ~1e-38).
#[inline]
fn fast_exp(x: f32) -> f32 {
    // `max`/`min` also map NaN to the clamp (`clamp` would pass NaN through).
    #[allow(clippy::manual_clamp)]
    let t = x.max(-87.0).min(0.0) * std::f32::consts::LOG2_E;
    // Adding 1.5·2^23 rounds `t` to an integer held in the low mantissa bits: the exponent comes
    // out with integer operations only (a float-to-int cast would not vectorise as well).
    const ROUNDER: f32 = 12_582_912.0;
    let shifted = t + ROUNDER;
    let whole = shifted - ROUNDER;
    let exponent = (shifted.to_bits() as i32).wrapping_sub(ROUNDER.to_bits() as i32);
    let f = (t - whole) * std::f32::consts::LN_2;
    let poly = 1.0
        + f * (1.0
            + f * (0.5
                + f * (1.0 / 6.0 + f * (1.0 / 24.0 + f * (1.0 / 120.0 + f * (1.0 / 720.0))))));
    f32::from_bits(((exponent + 127).max(0) as u32) << 23) * poly
}

/// How many of the sorted `candidates` survive `top_k`, `min_p` and `top_p` (at least one when
/// there are any). Greedy requests keep only the first.
pub fn kept(candidates: &[TopLogit], params: &SamplerParams) -> usize {
    let Some(first) = candidates.first() else {
        return 0;
    };
    if params.temperature <= 0.0 {
        return 1;
    }
    let k = match params.top_k {
        0 => CANDIDATES,
        k => (k as usize).min(CANDIDATES),
    }
    .min(candidates.len());
    let candidates = &candidates[..k];
    let temperature = f64::from(params.temperature);
    let max = f64::from(first.logit);
    let weights: Vec<f64> = candidates
        .iter()
        .map(|c| libm::exp((f64::from(c.logit) - max) / temperature))
        .collect();
    let total: f64 = weights.iter().sum();
    // min_p: weights are sorted, the best one has weight 1.
    let min_weight = f64::from(params.min_p.max(0.0));
    let mut keep = weights
        .iter()
        .take_while(|&&w| w >= min_weight)
        .count()
        .max(1);
    // top_p: the shortest prefix whose probability mass reaches top_p.
    if params.top_p < 1.0 {
        let target = f64::from(params.top_p.max(0.0)) * total;
        let mut mass = 0.0;
        let mut prefix = 0;
        for w in &weights {
            mass += w;
            prefix += 1;
            if mass >= target {
                break;
            }
        }
        keep = keep.min(prefix.max(1));
    }
    keep
}

/// Picks the token from sorted `candidates` (as produced by [`top_candidates`]) with the draw
/// `draw`: greedy at temperature 0, else Gumbel-max over the kept set (ties go to the earlier
/// candidate). Returns `None` only when there are no candidates.
pub fn sample(candidates: &[TopLogit], params: &SamplerParams, draw: u64) -> Option<u32> {
    let first = candidates.first()?;
    if params.temperature <= 0.0 {
        return Some(first.id);
    }
    let temperature = f64::from(params.temperature);
    let mut best = (f64::NEG_INFINITY, first.id);
    for c in &candidates[..kept(candidates, params)] {
        let score = f64::from(c.logit) / temperature + gumbel(draw, c.id);
        if score > best.0 {
            best = (score, c.id);
        }
    }
    Some(best.1)
}

/// The DiFR margin of a claimed token under someone else's logits, in logits: how far
/// `claimed` is from being what [`sample`] picks with the same draw, where `candidates` are that
/// party's sorted candidates and `claimed_logit` its logit for the claimed token.
///
/// `max_j(l_j + T g_j) - (l_c + T g_c)` over the kept set (`max_j l_j - l_c` when greedy),
/// never negative. Zero when the claimed token is exactly the sampler's choice; an honest
/// provider audited by a referee with slightly different numerics scores near zero, a token
/// from another model often scores several logits.
pub fn margin(
    candidates: &[TopLogit],
    claimed: u32,
    claimed_logit: f32,
    params: &SamplerParams,
    draw: u64,
) -> f32 {
    let Some(first) = candidates.first() else {
        return f32::INFINITY;
    };
    if !claimed_logit.is_finite() {
        return f32::INFINITY;
    }
    if params.temperature <= 0.0 {
        return (first.logit - claimed_logit).max(0.0);
    }
    let temperature = f64::from(params.temperature);
    let best = candidates[..kept(candidates, params)]
        .iter()
        .map(|c| f64::from(c.logit) + temperature * gumbel(draw, c.id))
        .fold(f64::NEG_INFINITY, f64::max);
    let mine = f64::from(claimed_logit) + temperature * gumbel(draw, claimed);
    ((best - mine).max(0.0)) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_candidates_sorted_and_tie_broken_by_id() {
        let mut logits = vec![0.0f32; 100];
        logits[5] = 3.0;
        logits[9] = 3.0;
        logits[50] = 4.0;
        logits[70] = f32::NAN;
        let top = top_candidates(&logits);
        assert_eq!(top.len(), CANDIDATES);
        assert_eq!(top[0].id, 50);
        assert_eq!(top[1].id, 5);
        assert_eq!(top[2].id, 9);
        assert!(top.iter().all(|c| c.id != 70));
        assert!(top.windows(2).all(|w| !better(w[1].logit, w[1].id, w[0])));
    }

    /// The block-skipping scan picks exactly what a full sort picks, ties and NaNs included.
    #[test]
    fn top_candidates_match_a_full_sort() {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        for round in 0..50 {
            // Up to 20,000 logits: more than CANDIDATES blocks, so the floor is used.
            let len = 1 + (round * 3989) % 20_000;
            let logits: Vec<f32> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    match x % 50 {
                        0 => f32::NAN,
                        1 => f32::NEG_INFINITY,
                        2 => f32::INFINITY,
                        // Few distinct values (many ties), or nearly all distinct.
                        _ if round % 2 == 0 => (x % 64) as f32 / 4.0,
                        _ => (x >> 40) as f32 / 1e5,
                    }
                })
                .collect();
            let mut sorted: Vec<TopLogit> = logits
                .iter()
                .enumerate()
                .filter(|(_, l)| !l.is_nan())
                .map(|(id, &logit)| TopLogit {
                    id: id as u32,
                    logit,
                })
                .collect();
            sorted.sort_by(|a, b| b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id)));
            sorted.truncate(CANDIDATES);
            assert_eq!(top_candidates(&logits), sorted, "round {round}");
        }
    }

    #[test]
    fn greedy_is_argmax() {
        let logits: Vec<f32> = (0..64).map(|i| ((i * 37) % 64) as f32).collect();
        let top = top_candidates(&logits);
        let params = SamplerParams {
            temperature: 0.0,
            ..Default::default()
        };
        assert_eq!(sample(&top, &params, 12345), Some(top[0].id));
        assert_eq!(logits[top[0].id as usize], 63.0);
    }

    #[test]
    fn draw_depends_on_every_input() {
        let a = draw(1, 0);
        assert_ne!(a, draw(2, 0));
        assert_ne!(a, draw(1, 1));
        assert_eq!(a, draw(1, 0));
        assert!(a < 1 << 53);
        assert_ne!(gumbel(a, 1), gumbel(a, 2));
        assert!(gumbel(0, 0).is_finite() && gumbel(u64::MAX, u32::MAX).is_finite());
    }

    #[test]
    fn filters_narrow_the_kept_set() {
        let top = vec![
            TopLogit { id: 1, logit: 2.0 },
            TopLogit { id: 2, logit: 1.0 },
            TopLogit { id: 3, logit: -5.0 },
        ];
        let params = SamplerParams {
            temperature: 1.0,
            ..Default::default()
        };
        assert_eq!(kept(&top, &params), 3);
        assert_eq!(kept(&top, &SamplerParams { top_k: 2, ..params }), 2);
        // p(1) = 0.73: top_p 0.5 keeps only the first.
        assert_eq!(
            kept(
                &top,
                &SamplerParams {
                    top_p: 0.5,
                    ..params
                }
            ),
            1
        );
        assert_eq!(
            kept(
                &top,
                &SamplerParams {
                    top_p: 0.9,
                    ..params
                }
            ),
            2
        );
        // min_p 0.1: exp(-7) of the best is dropped, exp(-1) kept.
        assert_eq!(
            kept(
                &top,
                &SamplerParams {
                    min_p: 0.1,
                    ..params
                }
            ),
            2
        );
        assert_eq!(kept(&[], &params), 0);
    }

    /// Gumbel-max samples the softmax: frequencies over many draws follow the probabilities.
    #[test]
    fn sampling_follows_the_softmax() {
        let top = vec![
            TopLogit { id: 7, logit: 1.0 },
            TopLogit { id: 3, logit: 0.0 },
        ];
        let params = SamplerParams {
            temperature: 1.0,
            ..Default::default()
        };
        let n = 20_000;
        let first = (0..n)
            .filter(|&s| sample(&top, &params, draw(s, 0)) == Some(7))
            .count();
        let expected = 1.0 / (1.0 + (-1.0f64).exp());
        let seen = first as f64 / n as f64;
        assert!((seen - expected).abs() < 0.015, "{seen} vs {expected}");
        // Greedy ignores the draw; top_k 1 leaves nothing to draw from.
        let greedy = SamplerParams {
            temperature: 0.0,
            ..params
        };
        assert!((0..50).all(|s| sample(&top, &greedy, draw(s, 0)) == Some(7)));
        let top_k = SamplerParams { top_k: 1, ..params };
        assert!((0..50).all(|s| sample(&top, &top_k, draw(s, 0)) == Some(7)));
    }

    #[test]
    fn margin_is_zero_for_the_sampled_token_and_grows_with_the_gap() {
        let top: Vec<TopLogit> = (0..10)
            .map(|i| TopLogit {
                id: i,
                logit: 5.0 - i as f32 * 0.5,
            })
            .collect();
        for temperature in [0.0, 0.7, 1.0] {
            let params = SamplerParams {
                temperature,
                ..Default::default()
            };
            for seed in 0..20 {
                let d = draw(seed, 3);
                let chosen = sample(&top, &params, d).unwrap();
                let logit = top.iter().find(|c| c.id == chosen).unwrap().logit;
                assert_eq!(margin(&top, chosen, logit, &params, d), 0.0);
                // A token the model finds far less likely scores a large margin.
                assert!(margin(&top, 999, -20.0, &params, d) > 10.0);
            }
        }
        let greedy = SamplerParams {
            temperature: 0.0,
            ..Default::default()
        };
        assert_eq!(margin(&top, 2, 4.0, &greedy, 0), 1.0);
        assert_eq!(margin(&[], 2, 4.0, &greedy, 0), f32::INFINITY);
        assert_eq!(margin(&top, 2, f32::NAN, &greedy, 0), f32::INFINITY);
    }

    #[test]
    fn logsumexp_matches_direct_sum() {
        let logits = [1.0f32, 2.0, 3.0];
        let direct = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln() as f32;
        assert!((logsumexp(&logits) - direct).abs() < 1e-5);
        let many: Vec<f32> = (0..49_157)
            .map(|i| ((i * 7919) % 4001) as f32 / 200.0 - 10.0)
            .collect();
        let exact = many.iter().map(|&l| f64::from(l).exp()).sum::<f64>().ln();
        assert!(
            (f64::from(logsumexp(&many)) - exact).abs() < 1e-4,
            "{} vs {exact}",
            logsumexp(&many)
        );
        let mut odd = many.clone();
        odd[3] = f32::NEG_INFINITY;
        odd[4] = f32::NAN;
        assert!(logsumexp(&odd).is_finite());
    }

    #[test]
    fn fast_exp_is_accurate() {
        for i in 0..2000 {
            let x = -(i as f32) * 0.04;
            let rel = (f64::from(fast_exp(x)) - f64::from(x).exp()).abs() / f64::from(x).exp();
            assert!(rel < 5e-6, "exp({x}): {rel}");
        }
        assert!(fast_exp(-200.0) < 1e-37);
    }
}
