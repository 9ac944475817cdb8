//! Fraud proofs heard from other gateways, over gossip.
//!
//! A proof is a claim like any other: the gateway acts on it only when it holds by the checks
//! this gateway makes itself. A failure the provider's own signatures prove (a bad Merkle path,
//! a wrong draw, a signed refusal, …) holds for anyone. A failure that needs the model (logits,
//! margins, prompt, vocabulary, end) holds when a referee this gateway trusts shows it: its own
//! engine, which re-executes the proof's challenged steps itself, or a peer on its allow-list.
//! Then the provider takes the same penalty as for a failure found here (the book, the bench,
//! the proof written down) and the proof is passed on. A proof whose signatures or bytes do not
//! hold is dropped and its sender struck (no honest gateway passes such a thing on); one this
//! gateway cannot check or does not agree with (not its engine's model or class, no referee it
//! trusts, a refusal to open, a provider it never dealt with, an engine that finds the answer
//! sound) is dropped without blame.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use libp2p::PeerId;
use proofmesh_shared::net::gossip::ProofVerdict;
use proofmesh_shared::protocol::RequestId;
use proofmesh_shared::verify::{AuditFailure, EvidenceError, FraudProof, ProofError, Tier};

use super::pool::Choice;
use super::{Auditor, LocalReferee, RefereeSession};
use crate::metrics::VerdictLabels;

/// Answers whose proof was acted on, remembered so that one heard again costs nothing twice.
pub(super) const REMEMBERED: usize = 4096;
/// Times (a second apart) the gateway's engine is asked for a free context before a proof is
/// left unchecked: the check must end while gossip still holds the message to pass on.
const ENGINE_TRIES: u32 = 10;

/// Whether a proof's failure to hold is one no honest gateway could have passed on: its
/// signatures or its bytes, which every gateway checks before it acts on a proof. (Disagreeing
/// referees, another version, a label no referee shows: nobody is blamed.)
fn blames_publisher(error: &ProofError) -> bool {
    matches!(
        error,
        ProofError::BadPeer
            | ProofError::UnsignedOpening
            | ProofError::Unbound(_)
            | ProofError::Malformed(_)
            | ProofError::Evidence(EvidenceError::BadSignature)
    )
}

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
    /// Whether the answer was penalised already.
    fn contains(&self, key: &(Vec<u8>, RequestId)) -> bool {
        self.set.contains(key)
    }

    /// Remembers an answer penalised here; whether it is new.
    pub(super) fn first(&mut self, key: (Vec<u8>, RequestId)) -> bool {
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
        let inner = &self.inner;
        let proof = match FraudProof::from_cbor(bytes) {
            Ok(proof) => proof,
            Err(e) => return Weighed::Forged(e.to_string()),
        };
        let Ok(provider) = PeerId::from_bytes(&proof.provider) else {
            return Weighed::Forged("malformed peer id".into());
        };
        // Keys are free: a proof against an identity made for the purpose costs its maker
        // nothing and would cost every gateway a record and a file.
        if !inner.registry.contains(&provider) && inner.book.get(&provider).first_seen == 0 {
            return Weighed::Unchecked("a provider this gateway never dealt with".into());
        }
        if super::lock(&inner.heard).contains(&(proof.provider.clone(), proof.request.request_id)) {
            return Weighed::Unchecked("acted on already".into());
        }
        // What the provider's own signatures prove, or what a referee the operator
        // allow-listed shows.
        let allowed = inner.pool.allowed(&inner.book);
        match proof.holds(&allowed) {
            // A signed "I cannot open that" is a failure for the gateway that drew the
            // challenge, not for a third party: the provider may have lost the leaves honestly
            // (a restart, a full store), or been asked for steps no gateway drew.
            Ok(AuditFailure::OpeningRefused) => {
                return Weighed::Unchecked("a signed refusal to open proves nothing here".into());
            }
            Ok(failure) => return Weighed::Holds(Box::new(proof), failure),
            Err(ProofError::NoTrustedReferee(_)) => {}
            Err(e) if blames_publisher(&e) => return Weighed::Forged(e.to_string()),
            Err(e) => return Weighed::Unchecked(e.to_string()),
        }
        let Some(local) = inner
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
        // The publisher chose the challenged steps. In the exact tier no choice of steps makes
        // an honest provider diverge from the engine; in the tolerant tier a chosen handful of
        // noisy steps might.
        if Tier::between(&proof.commitment.commitment.numerics, local.numerics()) != Tier::Exact {
            return Weighed::Unchecked(
                "this gateway's engine is not of the provider's numerics class: only an exact \
                 re-execution is trusted for a proof heard"
                    .into(),
            );
        }
        let ours = match self.reexecute(&proof, Arc::clone(&local)).await {
            Ok(ours) => ours,
            Err(why) => return Weighed::Unchecked(why),
        };
        match ours.holds(&[local.peer_id()]) {
            Ok(failure) => Weighed::Holds(Box::new(ours), failure),
            // The engine disagrees: the publisher may run another build; nobody is blamed.
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
        self.convicted(&provider);
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
