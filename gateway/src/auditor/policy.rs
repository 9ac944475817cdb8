//! What the gateway requires of an answer before it calls it verified. The gateway decides
//! this itself: nothing a provider or referee declares changes it.

use std::time::Duration;

use proofmesh_shared::verify::{DEFAULT_CHALLENGE_COUNT, PROBATION_CHALLENGE_COUNT, Tier};

/// Default for how long a provider whose answer failed an audit is kept out of routing.
pub const FAILED_AUDIT_COOLDOWN: Duration = Duration::from_secs(300);
/// Default for how many audits a provider must pass before it is challenged at the normal rate
/// and routed to without limit.
pub const PROBATION_AUDITS: u32 = 10;
/// Default share of requests a provider on probation may be tried first for, when established
/// providers of the model are available: enough to earn a record, too little for a new identity
/// (free to make) to take the traffic over.
pub const PROBATION_SHARE: f64 = 0.25;
/// Default audits in a row a provider may leave unopened before it is benched.
pub const UNOPENED_LIMIT: u32 = 3;

/// Default share of passed audits after which a trusted peer referee is put to a canary audit
/// (when the gateway has its own engine): often enough that a lying referee is found within
/// about a hundred audits, rarely enough to cost the engine little.
pub const CANARY_RATE: f64 = 0.02;
/// Default for how many audits a provider must pass, with no failure and no strike as a referee,
/// before the gateway trusts it as a referee too.
pub const REFEREE_EARN_AUDITS: u32 = 50;

/// Default share of `fraud` answers of an established provider audited after release.
pub const FRAUD_AUDIT_RATE: f64 = 0.1;
/// Default share of `fraud` answers of a provider on probation (a new identity, a thin or a
/// stained record) audited after release: a new identity is free, so it earns its place under
/// closer watch.
pub const FRAUD_PROBATION_AUDIT_RATE: f64 = 0.5;
/// Default time after release within which a `fraud` answer's audit must be done. Providers
/// keep leaves openable for 30 minutes ([`MAX_FRAUD_AUDIT_WINDOW`]).
pub const FRAUD_AUDIT_WINDOW: Duration = Duration::from_secs(600);
/// Default for how long a released answer's leaves are asked for before the provider is held
/// to have withheld them.
pub const FRAUD_OPEN_PATIENCE: Duration = Duration::from_secs(120);
/// The longest audit window a gateway may set: how long providers keep their leaves.
pub const MAX_FRAUD_AUDIT_WINDOW: Duration = Duration::from_secs(30 * 60);

/// Default number of providers a `consensus` request goes to.
pub const CONSENSUS_PROVIDERS: usize = 2;
/// The most providers a `consensus` request may go to (each generates the whole answer).
pub const MAX_CONSENSUS_PROVIDERS: usize = 5;

/// How `fraud` (optimistic) answers are sampled for audits after release.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FraudPolicy {
    /// Share of an established provider's answers audited.
    pub rate: f64,
    /// Share of the answers audited of a provider on probation.
    pub probation_rate: f64,
    /// Time after release within which the audit must be done; after it, a sampled answer not
    /// audited yet is `expired` (nobody penalised) and an unsampled one is settled.
    pub window: Duration,
    /// How long a released answer's leaves are asked for before its provider is held to have
    /// withheld them (long enough that the network is not to blame).
    pub open_patience: Duration,
}

impl Default for FraudPolicy {
    fn default() -> Self {
        Self {
            rate: FRAUD_AUDIT_RATE,
            probation_rate: FRAUD_PROBATION_AUDIT_RATE,
            window: FRAUD_AUDIT_WINDOW,
            open_patience: FRAUD_OPEN_PATIENCE,
        }
    }
}

impl FraudPolicy {
    /// The share of a provider's answers to audit: never less on probation than off it.
    pub fn rate_for(&self, on_probation: bool) -> f64 {
        let rate = if on_probation {
            self.probation_rate.max(self.rate)
        } else {
            self.rate
        };
        rate.clamp(0.0, 1.0)
    }
}

/// Which audit tiers the gateway accepts for merkle answers.
///
/// In the exact tier (provider and referee of one deterministic numerics class) honest logits
/// agree bit for bit and every cheat in the attack suite is caught in every request. In the
/// tolerant tier (other numerics: f16 KV cache, GPU against CPU) the limits must sit above
/// kernel noise, and a cheat whose cheaper decoder departs from the claimed model only at
/// near-ties passes some requests (`bench/calibration.md`). Since a provider declares its own
/// numerics, a cheat could pick the tolerant tier; so by default no merkle answer is audited
/// in it.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum AuditTiers {
    /// An answer passes only when a referee the gateway chose, of the class the provider
    /// advertised, judged it in the exact tier.
    #[default]
    Exact,
    /// Also audit across numerics classes, in the tolerant tier (e.g. GPU providers refereed
    /// on CPU), accepting its weaker detection of near-tie cheats.
    Any,
}

impl AuditTiers {
    /// Whether an answer judged in `tier` may pass.
    pub fn accepts(self, tier: Tier) -> bool {
        tier == Tier::Exact || self == Self::Any
    }
}

/// The gateway's audit settings, fixed at start.
#[derive(Debug, Clone)]
pub struct AuditPolicy {
    /// Steps challenged per merkle audit of an established provider.
    pub challenge_count: usize,
    /// Audits a provider must pass before it leaves probation.
    pub probation_audits: u32,
    /// Share of requests a provider on probation is tried first for.
    pub probation_share: f64,
    /// Which tiers merkle answers may pass in.
    pub tiers: AuditTiers,
    /// How long a provider whose answer failed is kept out of routing.
    pub bench: Duration,
    /// Deliver merkle answers no referee could re-execute (labelled `unrefereed`) instead of
    /// refusing them.
    pub allow_unrefereed: bool,
    /// Audits a provider must pass (cleanly) before it is trusted as a referee; 0: only the
    /// operator's allow-list and the gateway's own engine referee.
    pub referee_earn_audits: u32,
    /// Share of passed audits followed by a canary audit of a trusted peer referee.
    pub canary_rate: f64,
    /// Audits in a row whose leaves a provider never opened before it is benched (for
    /// `bench`, without a failure: one silence may be the network's, a run of them is not).
    pub unopened_limit: u32,
    /// How `fraud` answers are sampled and how long their audits may take.
    pub fraud: FraudPolicy,
    /// Providers (distinct peers) a `consensus` request goes to.
    pub consensus_providers: usize,
}

impl Default for AuditPolicy {
    fn default() -> Self {
        Self {
            challenge_count: DEFAULT_CHALLENGE_COUNT,
            probation_audits: PROBATION_AUDITS,
            probation_share: PROBATION_SHARE,
            tiers: AuditTiers::Exact,
            bench: FAILED_AUDIT_COOLDOWN,
            allow_unrefereed: false,
            referee_earn_audits: REFEREE_EARN_AUDITS,
            canary_rate: CANARY_RATE,
            unopened_limit: UNOPENED_LIMIT,
            fraud: FraudPolicy::default(),
            consensus_providers: CONSENSUS_PROVIDERS,
        }
    }
}

impl AuditPolicy {
    /// Steps to challenge for a provider, more while it is on probation.
    pub fn challenges(&self, on_probation: bool) -> usize {
        let count = self.challenge_count.max(1);
        if on_probation {
            count.max(PROBATION_CHALLENGE_COUNT)
        } else {
            count
        }
    }
}
