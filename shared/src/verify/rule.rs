//! The statistical layer of the audit rule: the provider's committed logits against a referee's
//! re-execution, and the referee's score of every claimed token.
//!
//! Per challenged step the distance `D_t` is the centred RMS of the logit differences over the
//! union of both parties' candidates ([`step_distance`]); a request fails when the median of
//! `D_t` over the challenged steps, or any single `D_t`, exceeds the tier's limits. Over every
//! position the referee reports the DiFR margin of the claimed token ([`crate::sampling::margin`]);
//! a request fails when any single margin exceeds a limit, or when their *excess* does: the sum
//! over positions of what each margin has above a dead zone. Kernel noise flips the choice only
//! between near-tied tokens, so honest margins stay inside the dead zone almost everywhere and
//! the honest excess grows slowly with length (its limit grows with the answer beyond the
//! calibrated lengths); every token a cheaper decoder chose against the claimed model's clear
//! preference adds to it, so the evidence grows with length instead of being averaged away. A
//! median between half its limit and the limit is borderline: the gateway opens more steps
//! before it decides.
//!
//! The limits depend on how closely an honest provider and its referee can agree ([`Tier`]),
//! and come from the calibration harness (`provider/examples/calibrate.rs`, results in
//! `bench/calibration.md`): each limit is at least 1.5 times the largest honest value seen.

use serde::{Deserialize, Serialize};

use super::{AuditFailure, RefereeStep};
use crate::commit::StepLeaf;

/// How closely an honest provider and the referee are expected to agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Tier {
    /// Provider and referee declare the same deterministic numerics class (same llama.cpp
    /// kernels, row-independent batching): honest logits agree bit for bit, so any distance is
    /// a deviation from the claimed model.
    Exact,
    /// Different numerics (another backend, GPU against CPU, other micro-batch paths): honest
    /// logits differ by kernel noise, and the limits sit above the noisiest honest pair
    /// measured.
    Tolerant,
}

impl Tier {
    /// The tier for a provider and a referee with these numerics classes: exact only when both
    /// declare the same deterministic class.
    pub fn between(provider: &str, referee: &str) -> Self {
        if provider == referee && is_deterministic(provider) {
            Self::Exact
        } else {
            Self::Tolerant
        }
    }

    /// The limits of this tier.
    pub fn thresholds(self) -> &'static Thresholds {
        match self {
            Self::Exact => &EXACT,
            Self::Tolerant => &TOLERANT,
        }
    }

    /// Stable label: `exact` or `tolerant`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exact => "exact",
            Self::Tolerant => "tolerant",
        }
    }
}

/// Numerics classes whose engines are configured so that batching, threads and micro-batch
/// size cannot change a sequence's logits (see the provider's engine settings).
pub const DETERMINISTIC_PREFIX: &str = "det/";

/// Whether a numerics class promises bit-reproducible logits.
pub fn is_deterministic(numerics: &str) -> bool {
    numerics.starts_with(DETERMINISTIC_PREFIX)
}

/// The limits of one tier. Distances and margins are in logits (nats of log-probability).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    /// Fail when the median `D_t` over the challenged steps exceeds this.
    pub median_distance: f32,
    /// Fail when any single challenged `D_t` exceeds this.
    pub step_distance: f32,
    /// Fail when the excess margin, `sum over positions of max(0, min(margin, clip) - dead
    /// zone)`, exceeds this (for answers of up to [`Thresholds::excess_margin_span`] tokens).
    pub excess_margin: f32,
    /// Answer length the excess limit was calibrated up to. Honest excess grows with length
    /// (sub-linearly: its largest value went 1.7, 2.8, 3.7, 5.8 at 8, 32, 128, 512 tokens), so
    /// beyond this length the limit grows in proportion to the length, which is conservative.
    pub excess_margin_span: u32,
    /// Margins up to this count as kernel noise in the excess.
    pub margin_dead_zone: f32,
    /// Fail when any single margin exceeds this.
    pub max_margin: f32,
    /// Margins are clipped here before summing, so that one outlier cannot dominate the excess
    /// (it is [`Thresholds::max_margin`]'s job).
    pub margin_clip: f32,
}

/// Limits when honest agreement is bit for bit. The calibration saw every honest distance and
/// margin at exactly 0; these floors only absorb the rounding of the f32 → CBOR round trip
/// (none) and leave a cheat nowhere to hide.
pub const EXACT: Thresholds = Thresholds {
    median_distance: 1e-3,
    step_distance: 1e-3,
    excess_margin: 1e-3,
    excess_margin_span: 512,
    margin_dead_zone: 0.0,
    max_margin: 1e-3,
    margin_clip: 8.0,
};

/// Limits for the tolerant tier, each at least 1.5× the largest honest value the calibration
/// harness saw (full run of 2026-11-25: 1,100 honest answers of 8 to 512 tokens from providers
/// with q8_0 or f16 KV caches batching 1, 4 and 16 sequences on 1 or 2 threads, 1,320 of them
/// refereed in this tier by q8_0 and f16 referees with micro-batches of 32 and 512 tokens; no GPU
/// provider was available, so GPU noise is not covered yet). See `bench/calibration.md`:
///
/// | statistic | largest honest | limit | limit / largest |
/// |---|---|---|---|
/// | median `D_t` over an audit's challenged steps | 0.208 (0.249 over 32 draws an answer) | 0.375 | 1.80 (1.51) |
/// | largest `D_t` of any step | 0.813 | 1.5 | 1.85 |
/// | excess margin (dead zone 0.5, up to 512 tokens) | 5.84 | 9.0 | 1.54 |
/// | largest margin | 5.01 | 7.6 | 1.52 |
///
/// What these limits cannot separate from honest noise: one tensor requantized to a neighbouring
/// format (its median `D_t`, 0.09-0.14, sits inside the honest range) and a cheaper decoder whose
/// tokens leave the claimed model's only at near-ties (its copied logits are exact, and its few
/// low-margin tokens look like kernel noise). Both are caught in the exact tier.
pub const TOLERANT: Thresholds = Thresholds {
    median_distance: 0.375,
    step_distance: 1.5,
    excess_margin: 9.0,
    excess_margin_span: 512,
    margin_dead_zone: 0.5,
    max_margin: 7.6,
    margin_clip: 8.0,
};

impl Thresholds {
    /// The excess-margin limit for an answer of `positions` tokens: [`Thresholds::excess_margin`]
    /// up to [`Thresholds::excess_margin_span`] tokens, proportionally more beyond.
    pub fn excess_limit(&self, positions: usize) -> f32 {
        let span = self.excess_margin_span.max(1) as f32;
        self.excess_margin * (positions as f32 / span).max(1.0)
    }
}

/// The distance between a provider's committed candidates and the referee's at one step: the
/// centred RMS of `provider logit - referee logit` over the union of both candidate sets and
/// of the two logsumexps. A
/// side that lacks an id contributes its smallest candidate logit (an upper bound on the true
/// value); the referee's exact logit for the claimed token is used when known. Centring removes
/// any constant offset, so only the shape of the distribution counts.
pub fn step_distance(leaf: &StepLeaf, referee: &RefereeStep) -> f32 {
    let (Some(p_floor), Some(r_floor)) = (leaf.top.last(), referee.top.last()) else {
        return f32::INFINITY;
    };
    let referee_logit = |id: u32| {
        referee
            .top
            .iter()
            .find(|c| c.id == id)
            .map(|c| c.logit)
            .or((id == leaf.token && referee.claimed_logit.is_finite())
                .then_some(referee.claimed_logit))
            .unwrap_or(r_floor.logit)
    };
    let provider_logit = |id: u32| {
        leaf.top
            .iter()
            .find(|c| c.id == id)
            .map_or(p_floor.logit, |c| c.logit)
    };
    let mut diffs: Vec<f64> = Vec::with_capacity(leaf.top.len() + referee.top.len());
    for c in &leaf.top {
        diffs.push(f64::from(c.logit) - f64::from(referee_logit(c.id)));
    }
    for c in &referee.top {
        if !leaf.top.iter().any(|p| p.id == c.id) {
            diffs.push(f64::from(provider_logit(c.id)) - f64::from(c.logit));
        }
    }
    // The logsumexp too, as one more value that must move with the logits: a provider's
    // log-probabilities are `logit - logsumexp`, so a logsumexp committed apart from its
    // logits (probabilities that look surer than the model is) shows here.
    diffs.push(f64::from(leaf.logsumexp) - f64::from(referee.logsumexp));
    let n = diffs.len() as f64;
    let mean = diffs.iter().sum::<f64>() / n;
    let variance = diffs.iter().map(|d| (d - mean) * (d - mean)).sum::<f64>() / n;
    variance.sqrt() as f32
}

/// What the statistical layer measured on one request, for logs, headers and fraud proofs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Statistics {
    /// The tier judged under.
    pub tier: Tier,
    /// Challenged steps compared.
    pub compared: usize,
    /// Median `D_t` over them.
    pub median_distance: f32,
    /// Largest `D_t`.
    pub max_distance: f32,
    /// Excess margin over every position (see [`Thresholds::excess_margin`]).
    pub excess_margin: f32,
    /// Largest margin.
    pub max_margin: f32,
}

/// The statistical layer's decision.
#[derive(Debug, Clone, PartialEq)]
pub enum Judgement {
    /// Within every limit.
    Pass(Statistics),
    /// Within the limits, but the median distance is above half its limit: open more steps
    /// before deciding.
    Borderline(Statistics),
    /// A limit was exceeded.
    Fail(AuditFailure, Statistics),
}

impl Judgement {
    /// The statistics, whatever the decision.
    pub fn statistics(&self) -> &Statistics {
        match self {
            Self::Pass(s) | Self::Borderline(s) | Self::Fail(_, s) => s,
        }
    }
}

/// Judges the provider's opened `leaves` against the referee's `opened` steps (same order, as
/// [`super::check_evidence`] ensures) and the referee's per-position `margins`.
pub fn judge(
    leaves: &[StepLeaf],
    opened: &[RefereeStep],
    margins: &[f32],
    tier: Tier,
) -> Judgement {
    let distances = leaves
        .iter()
        .zip(opened)
        .map(|(leaf, referee)| step_distance(leaf, referee))
        .collect();
    judge_distances(distances, margins, tier)
}

/// [`judge`] on per-step distances already computed with [`step_distance`] (the calibration
/// harness simulates many challenges over the same steps this way).
pub fn judge_distances(mut distances: Vec<f32>, margins: &[f32], tier: Tier) -> Judgement {
    let limits = tier.thresholds();
    distances.sort_by(f32::total_cmp);
    let median_distance = median(&distances);
    let max_distance = distances.last().copied().unwrap_or(0.0);
    let excess_margin = excess(margins, limits);
    let max_margin = margins.iter().copied().fold(0.0, f32::max);
    let statistics = Statistics {
        tier,
        compared: distances.len(),
        median_distance,
        max_distance,
        excess_margin,
        max_margin,
    };
    if median_distance > limits.median_distance || max_distance > limits.step_distance {
        return Judgement::Fail(AuditFailure::LogitsDiverge, statistics);
    }
    if excess_margin > limits.excess_limit(margins.len()) || max_margin > limits.max_margin {
        return Judgement::Fail(AuditFailure::TokensImplausible, statistics);
    }
    if tier == Tier::Tolerant && median_distance > limits.median_distance / 2.0 {
        return Judgement::Borderline(statistics);
    }
    Judgement::Pass(statistics)
}

/// `sum over positions of max(0, min(margin, clip) - dead zone)`.
pub fn excess(margins: &[f32], limits: &Thresholds) -> f32 {
    margins
        .iter()
        .map(|m| (m.min(limits.margin_clip) - limits.margin_dead_zone).max(0.0))
        .sum()
}

/// The median of sorted values (mean of the middle two for an even count; 0 when empty).
fn median(sorted: &[f32]) -> f32 {
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::TopLogit;

    fn leaf(logits: &[(u32, f32)]) -> StepLeaf {
        StepLeaf {
            step: 0,
            token: logits[0].0,
            draw: 0,
            logsumexp: 10.0,
            top: logits
                .iter()
                .map(|&(id, logit)| TopLogit { id, logit })
                .collect(),
        }
    }

    fn referee(logits: &[(u32, f32)]) -> RefereeStep {
        RefereeStep {
            step: 0,
            logsumexp: 10.0,
            claimed_logit: logits[0].1,
            top: logits
                .iter()
                .map(|&(id, logit)| TopLogit { id, logit })
                .collect(),
        }
    }

    #[test]
    fn identical_or_shifted_logits_are_at_distance_zero() {
        let l = [(1, 5.0), (2, 4.0), (3, 2.5)];
        assert_eq!(step_distance(&leaf(&l), &referee(&l)), 0.0);
        // Every logit two higher: the logsumexp is two higher too.
        let shifted = [(1, 7.0), (2, 6.0), (3, 4.5)];
        let moved = RefereeStep {
            logsumexp: 12.0,
            ..referee(&shifted)
        };
        assert!(step_distance(&leaf(&l), &moved) < 1e-6);
    }

    #[test]
    fn a_logsumexp_committed_apart_from_its_logits_is_far() {
        // The same logits, but a logsumexp one lower: every log-probability one higher.
        let l = [(1, 5.0), (2, 4.0), (3, 2.5)];
        let surer = StepLeaf {
            logsumexp: 9.0,
            ..leaf(&l)
        };
        let d = step_distance(&surer, &referee(&l));
        assert!(d > EXACT.step_distance, "{d}");
        assert!(d > 0.4, "{d}");
    }

    #[test]
    fn disjoint_candidates_are_far_apart() {
        let p = [(1, 5.0), (2, 4.9), (3, 4.8)];
        let r = [(7, 9.0), (8, 8.0), (9, 1.0)];
        assert!(step_distance(&leaf(&p), &referee(&r)) > 1.0);
        assert_eq!(
            step_distance(
                &leaf(&p),
                &RefereeStep {
                    top: vec![],
                    ..referee(&r)
                }
            ),
            f32::INFINITY
        );
    }

    #[test]
    fn excess_limit_grows_with_length_beyond_the_calibrated_span() {
        let t = &TOLERANT;
        assert_eq!(t.excess_limit(8), t.excess_margin);
        assert_eq!(t.excess_limit(512), t.excess_margin);
        assert_eq!(t.excess_limit(1024), 2.0 * t.excess_margin);
        // A long honest-looking answer (every margin just inside the dead zone but a few) passes;
        // the same excess packed into a short answer fails.
        let mut margins = vec![0.4; 2048];
        margins[..12].fill(3.0);
        assert!(excess(&margins, t) > t.excess_margin);
        assert!(matches!(
            judge_distances(vec![0.1; 16], &margins, Tier::Tolerant),
            Judgement::Pass(_)
        ));
        assert!(matches!(
            judge_distances(vec![0.1; 16], &margins[..64], Tier::Tolerant),
            Judgement::Fail(AuditFailure::TokensImplausible, _)
        ));
    }

    #[test]
    fn judge_applies_the_tier_limits() {
        let l = [(1, 5.0), (2, 4.0), (3, 2.5)];
        let near = [(1, 5.0), (2, 4.05), (3, 2.45)];
        let leaves = vec![leaf(&l); 5];
        let exact = vec![referee(&l); 5];
        let noisy = vec![referee(&near); 5];
        assert!(matches!(
            judge(&leaves, &exact, &[0.0; 40], Tier::Exact),
            Judgement::Pass(_)
        ));
        // Kernel noise fails the exact tier and passes the tolerant one.
        assert!(matches!(
            judge(&leaves, &noisy, &[0.0; 40], Tier::Exact),
            Judgement::Fail(AuditFailure::LogitsDiverge, _)
        ));
        assert!(matches!(
            judge(&leaves, &noisy, &[0.0; 40], Tier::Tolerant),
            Judgement::Pass(_)
        ));
        // One implausible token among many fails on the largest margin.
        let mut margins = vec![0.0; 40];
        margins[17] = 20.0;
        assert!(matches!(
            judge(&leaves, &exact, &margins, Tier::Tolerant),
            Judgement::Fail(AuditFailure::TokensImplausible, _)
        ));
    }

    #[test]
    fn tiers_follow_the_numerics_classes() {
        assert_eq!(Tier::between("det/cpu/x", "det/cpu/x"), Tier::Exact);
        assert_eq!(Tier::between("det/cpu/x", "det/cpu/y"), Tier::Tolerant);
        assert_eq!(Tier::between("cuda/x", "cuda/x"), Tier::Tolerant);
    }
}
