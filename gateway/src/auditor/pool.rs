//! Which referees the gateway trusts, and choosing one for an answer.
//!
//! A referee is never the provider's choice, nor self-declared: it is the gateway's own engine
//! (when it has the model file), a peer on the operator's allow-list, or a peer that earned it
//! in the [`Book`] (enough clean audits as a provider, no strike as a referee). A peer that
//! merely advertises refereeing, or a numerics class, is none of these. Among the trusted ones
//! the gateway's own engine goes first, then one of the provider's advertised class (so the
//! audit can be exact), chosen at random.

use std::collections::HashSet;
use std::sync::Arc;

use libp2p::PeerId;
use proofmesh_shared::protocol::ModelDigest;
use proofmesh_shared::verify::Tier;

use super::book::Book;
use super::policy::{AuditPolicy, AuditTiers};
use super::session::LocalReferee;
use crate::registry::{Candidate, Registry};

/// Who re-executes an answer.
#[derive(Debug, Clone)]
pub enum Choice {
    /// The gateway's own engine.
    Local(Arc<dyn LocalReferee>),
    /// A trusted peer serving the same model.
    Remote {
        /// The referee.
        peer: PeerId,
        /// The numerics class it advertised (its evidence must declare the same).
        numerics: String,
    },
}

impl Choice {
    /// The peer whose key signs the evidence.
    pub fn peer(&self) -> PeerId {
        match self {
            Self::Local(referee) => referee.peer_id(),
            Self::Remote { peer, .. } => *peer,
        }
    }

    /// The numerics class the gateway chose it for.
    pub fn numerics(&self) -> &str {
        match self {
            Self::Local(referee) => referee.numerics(),
            Self::Remote { numerics, .. } => numerics,
        }
    }

    /// Whether it is the gateway's own engine.
    pub fn is_local(&self) -> bool {
        matches!(self, Self::Local(_))
    }

    /// How logs and responses name it: the peer id, or `local`.
    pub fn label(&self) -> String {
        match self {
            Self::Local(_) => "local".into(),
            Self::Remote { peer, .. } => peer.to_string(),
        }
    }
}

/// How an answer of a candidate would be audited with the referees trusted now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Prospect {
    /// A trusted referee of the provider's own deterministic class is available.
    Exact,
    /// Only trusted referees of other numerics classes.
    Tolerant,
    /// No trusted referee at all.
    Unrefereed,
}

/// The referees a gateway trusts.
#[derive(Debug, Clone, Default)]
pub struct RefereePool {
    local: Option<Arc<dyn LocalReferee>>,
    allow: HashSet<PeerId>,
}

impl RefereePool {
    /// A pool of the gateway's own engine (if any) and the operator's allow-list.
    pub fn new(
        local: Option<Arc<dyn LocalReferee>>,
        allow: impl IntoIterator<Item = PeerId>,
    ) -> Self {
        Self {
            local,
            allow: allow.into_iter().collect(),
        }
    }

    /// The operator's allow-listed referees, less those the book caught (as a provider or as a
    /// referee).
    pub fn allowed(&self, book: &Book) -> Vec<PeerId> {
        self.allow
            .iter()
            .filter(|peer| {
                let record = book.get(peer);
                record.failed == 0 && record.referee_strikes == 0
            })
            .copied()
            .collect()
    }

    /// The gateway's own engine, if it has one.
    pub fn local(&self) -> Option<&Arc<dyn LocalReferee>> {
        self.local.as_ref()
    }

    /// Whether the gateway trusts `peer` as a referee of `digest` in the numerics class
    /// `numerics`. A peer caught cheating, or caught accusing falsely as a referee, is dropped,
    /// allow-listed or not. Trust is earned only where the gateway's own engine can put the
    /// peer to canary audits (the same model, the same class): elsewhere a peer that earned
    /// trust could rubber-stamp unchecked.
    pub fn trusts(
        &self,
        peer: &PeerId,
        referee_of: (&ModelDigest, &str),
        book: &Book,
        policy: &AuditPolicy,
    ) -> bool {
        let record = book.get(peer);
        if record.failed > 0 || record.benched() || record.referee_strikes > 0 {
            return false;
        }
        let (digest, numerics) = referee_of;
        let canaried = self
            .local
            .as_ref()
            .is_some_and(|l| &l.digest() == digest && l.numerics() == numerics);
        self.allow.contains(peer) || (canaried && record.earned_referee(policy.referee_earn_audits))
    }

    /// Trusted peers that referee `provider`'s model, other than it and `exclude`, with the
    /// classes they advertise.
    fn remote(
        &self,
        registry: &Registry,
        book: &Book,
        policy: &AuditPolicy,
        provider: &Candidate,
        exclude: &[PeerId],
    ) -> Vec<(PeerId, String)> {
        registry
            .referees(&provider.card.digest, &provider.peer)
            .into_iter()
            .filter(|(peer, numerics)| {
                !exclude.contains(peer)
                    && self.trusts(peer, (&provider.card.digest, numerics), book, policy)
            })
            .collect()
    }

    /// The gateway's engine, when it can referee `provider`'s model and is not excluded.
    fn local_for(
        &self,
        provider: &Candidate,
        exclude: &[PeerId],
    ) -> Option<&Arc<dyn LocalReferee>> {
        self.local
            .as_ref()
            .filter(|l| l.digest() == provider.card.digest && !exclude.contains(&l.peer_id()))
    }

    /// How `provider`'s answers would be audited now.
    pub fn prospect(
        &self,
        registry: &Registry,
        book: &Book,
        policy: &AuditPolicy,
        provider: &Candidate,
    ) -> Prospect {
        let exact =
            |numerics: &str| Tier::between(&provider.card.numerics, numerics) == Tier::Exact;
        let local = self.local_for(provider, &[]);
        let remote = self.remote(registry, book, policy, provider, &[]);
        if local.is_some_and(|l| exact(l.numerics())) || remote.iter().any(|(_, n)| exact(n)) {
            Prospect::Exact
        } else if local.is_none() && remote.is_empty() {
            Prospect::Unrefereed
        } else {
            Prospect::Tolerant
        }
    }

    /// Picks a referee for `provider`'s answer, never `provider` itself and none of `exclude`,
    /// only one whose tier the policy accepts. The gateway's own engine goes first while it has
    /// a free context; when it is busy a trusted peer is preferred, and only when there is none
    /// is the busy engine chosen (its session then ends busy, and the audit asks again).
    pub fn choose(
        &self,
        registry: &Registry,
        book: &Book,
        policy: &AuditPolicy,
        provider: &Candidate,
        exclude: &[PeerId],
    ) -> Option<Choice> {
        let exclude: Vec<PeerId> = exclude.iter().copied().chain([provider.peer]).collect();
        let acceptable = |numerics: &str| {
            policy
                .tiers
                .accepts(Tier::between(&provider.card.numerics, numerics))
        };
        let local = self
            .local_for(provider, &exclude)
            .filter(|l| acceptable(l.numerics()));
        if let Some(local) = local
            && local.has_capacity()
        {
            return Some(Choice::Local(Arc::clone(local)));
        }
        let peers = self.remote(registry, book, policy, provider, &exclude);
        // A referee of the provider's own class makes the audit exact; under `Any`, one of the
        // same non-deterministic class is still the closest match.
        let same: Vec<&(PeerId, String)> = peers
            .iter()
            .filter(|(_, n)| *n == provider.card.numerics && acceptable(n))
            .collect();
        let pool: Vec<&(PeerId, String)> = if same.is_empty() && policy.tiers == AuditTiers::Any {
            peers.iter().collect()
        } else {
            same
        };
        if pool.is_empty() {
            return local.map(|l| Choice::Local(Arc::clone(l)));
        }
        let (peer, numerics) = pool[rand::random::<u32>() as usize % pool.len()];
        Some(Choice::Remote {
            peer: *peer,
            numerics: numerics.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use libp2p::identity::Keypair;

    use super::*;
    use crate::auditor::session::{LocalJob, SessionError};

    #[derive(Debug)]
    struct Engine;

    impl LocalReferee for Engine {
        fn peer_id(&self) -> PeerId {
            PeerId::random()
        }
        fn digest(&self) -> ModelDigest {
            ModelDigest([1; 32])
        }
        fn numerics(&self) -> &str {
            "det/test"
        }
        fn has_capacity(&self) -> bool {
            true
        }
        fn begin(
            &self,
            _request: proofmesh_shared::protocol::GenerateRequest,
        ) -> Result<Box<dyn LocalJob>, SessionError> {
            Err(SessionError::Refused("a fake".into()))
        }
    }

    #[test]
    fn referee_trust_is_earned_only_where_canaries_can_check_it() {
        let book = Book::in_memory().unwrap();
        let policy = AuditPolicy {
            referee_earn_audits: 3,
            ..AuditPolicy::default()
        };
        let earner = Keypair::generate_secp256k1().public().to_peer_id();
        let listed = Keypair::generate_secp256k1().public().to_peer_id();
        for _ in 0..3 {
            book.passed(&earner);
        }
        let canaried = (&ModelDigest([1; 32]), "det/test");
        let without_engine = RefereePool::new(None, [listed]);
        assert!(!without_engine.trusts(&earner, canaried, &book, &policy));
        assert!(without_engine.trusts(&listed, canaried, &book, &policy));
        let with_engine = RefereePool::new(Some(Arc::new(Engine)), [listed]);
        assert!(with_engine.trusts(&earner, canaried, &book, &policy));
        // Another model or class than the engine's: no canary could check it.
        let other_model = (&ModelDigest([2; 32]), "det/test");
        let other_class = (&ModelDigest([1; 32]), "gpu/cuda");
        assert!(!with_engine.trusts(&earner, other_model, &book, &policy));
        assert!(!with_engine.trusts(&earner, other_class, &book, &policy));
        assert!(with_engine.trusts(&listed, other_class, &book, &policy));
        book.referee_struck(&earner);
        assert!(!with_engine.trusts(&earner, canaried, &book, &policy));
    }
}
