//! Fraud proofs heard from other gateways, over gossip.
//!
//! A proof is a claim like any other: the gateway acts on it only when it holds by the checks
//! this gateway makes itself. A failure the provider's own signatures prove (a bad Merkle path,
//! a wrong draw, a signed refusal, …) holds for anyone. A failure that needs the model (logits,
//! margins, prompt, vocabulary, end) holds when a referee this gateway trusts shows it: its own
//! engine, which re-executes the proof's challenged steps itself, or a peer on its allow-list.
//! Then the provider takes the same penalty as for a failure found here (the book, the bench,
//! the proof written down) and the proof is passed on. A proof that does not hold is dropped and
//! its sender struck; one this gateway cannot check (not its engine's model, no referee it
//! trusts) is dropped without blame.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use libp2p::PeerId;
use proofmesh_shared::net::gossip::ProofVerdict;
use proofmesh_shared::protocol::RequestId;
use proofmesh_shared::verify::{AuditFailure, FraudProof, ProofError};

use super::pool::Choice;
use super::{Auditor, LocalReferee, RefereeSession};
use crate::metrics::VerdictLabels;

/// Answers whose proof was acted on, remembered so that one heard again costs nothing twice.
pub(super) const REMEMBERED: usize = 4096;
/// Times the gateway's engine is asked for a free context before a proof is left unchecked.
const ENGINE_TRIES: u32 = 30;

/// What a heard proof came to.
enum Weighed {
    /// It holds (with this gateway's evidence added when its engine re-executed it).
    Holds(Box<FraudProof>, AuditFailure),
    /// It does not.
    Forged(String),
    /// This gateway cannot tell.
    Unchecked(String),
}

/// Answers already penalised on a heard proof, oldest first.
#[derive(Debug, Default)]
pub(super) struct Heard {
    set: HashSet<(Vec<u8>, RequestId)>,
    order: VecDeque<(Vec<u8>, RequestId)>,
}

impl Heard {
    /// Whether the answer is new (and remembers it).
    fn first(&mut self, key: (Vec<u8>, RequestId)) -> bool {
        if !self.set.insert(key.clone()) {
            return false;
        }
        self.order.push_back(key);
        while self.order.len() > REMEMBERED {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

impl Auditor {
    /// Checks a fraud proof `source` passed on, and acts on it as on its own when it holds.
    pub async fn hear_proof(&self, source: PeerId, bytes: &[u8]) -> ProofVerdict {
        let (verdict, label) = match self.weigh(bytes).await {
            Weighed::Holds(proof, failure) => {
                self.act_on_heard(source, &proof, failure);
                (ProofVerdict::Holds, "holds")
            }
            Weighed::Forged(why) => {
                tracing::warn!(%source, %why, "a peer passed on a fraud proof that does not hold; struck");
                (ProofVerdict::Forged, "forged")
            }
            Weighed::Unchecked(why) => {
                tracing::info!(%source, %why, "a fraud proof heard could not be checked here; dropped");
                (ProofVerdict::Unchecked, "unchecked")
            }
        };
        self.inner
            .metrics
            .proofs_heard
            .get_or_create(&VerdictLabels {
                verdict: label,
                reason: String::new(),
            })
            .inc();
        verdict
    }

    async fn weigh(&self, bytes: &[u8]) -> Weighed {
        let proof = match FraudProof::from_cbor(bytes) {
            Ok(proof) => proof,
            Err(e) => return Weighed::Forged(e.to_string()),
        };
        // What the provider's own signatures prove, or what a referee the operator
        // allow-listed shows.
        let allowed = self.inner.pool.allowed(&self.inner.book);
        match proof.holds(&allowed) {
            Ok(failure) => return Weighed::Holds(Box::new(proof), failure),
            Err(ProofError::NoTrustedReferee(_)) => {}
            Err(e) => return Weighed::Forged(e.to_string()),
        }
        let Some(local) = self
            .inner
            .pool
            .local()
            .filter(|l| l.digest() == proof.request.model_digest)
            .cloned()
        else {
            return Weighed::Unchecked(
                "the accusation needs the model, which this gateway does not run, and no referee \
                 it trusts signed it"
                    .into(),
            );
        };
        let ours = match self.reexecute(&proof, Arc::clone(&local)).await {
            Ok(ours) => ours,
            Err(why) => return Weighed::Unchecked(why),
        };
        match ours.holds(&[local.peer_id()]) {
            Ok(failure) => Weighed::Holds(Box::new(ours), failure),
            Err(ProofError::Disputed(_) | ProofError::NoFailure) => {
                Weighed::Forged("this gateway's own engine finds the answer sound".into())
            }
            Err(e) => Weighed::Unchecked(e.to_string()),
        }
    }

    /// The proof with this gateway's engine's evidence on every round added.
    async fn reexecute(
        &self,
        proof: &FraudProof,
        local: Arc<dyn LocalReferee>,
    ) -> Result<FraudProof, String> {
        for _ in 0..ENGINE_TRIES {
            if local.has_capacity() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let session =
            RefereeSession::start(&self.inner.dialer, Choice::Local(local), &proof.request);
        session.push_all(&proof.tokens);
        let mut ours = proof.clone();
        for (i, round) in ours.rounds.iter_mut().enumerate() {
            let indices = &round.challenge.indices;
            let evidence = if i == 0 {
                session.finish(indices).await
            } else {
                session.open(indices).await
            };
            round
                .evidence
                .push(evidence.map_err(|e| format!("this gateway's engine: {e}"))?);
        }
        Ok(ours)
    }

    /// The penalty of a failure found here, once per answer.
    fn act_on_heard(&self, source: PeerId, proof: &FraudProof, failure: AuditFailure) {
        let inner = &self.inner;
        let Ok(provider) = PeerId::from_bytes(&proof.provider) else {
            return;
        };
        let first =
            super::lock(&inner.heard).first((proof.provider.clone(), proof.request.request_id));
        if !first {
            return;
        }
        inner.book.failed(&provider, inner.policy.bench);
        let saved = self.save_proof(proof);
        tracing::warn!(
            %provider,
            %source,
            %failure,
            request = %proof.request.request_id,
            proof = ?saved,
            "fraud proof heard from another gateway holds; provider benched"
        );
    }
}
