//! `consensus` mode's judgement: several providers answered the same request (same request id,
//! same seed), so an honest engine of one numerics class gives every one of them the same
//! tokens. Identical answers agree; the first step where they differ is where at least one of
//! them left the model, and each answer is audited by a referee with that step among those
//! challenged. The providers of the consensus never referee one another.

use libp2p::PeerId;
use proofmesh_shared::protocol::FinishReason;
use proofmesh_shared::verify::AuditVerdict;

use super::procedure::Answer;
use super::{AuditOutcome, Auditor, Scope, VerificationMode};
use crate::metrics::VerdictLabels;

/// How the answers to one `consensus` request were judged.
#[derive(Debug, Clone)]
pub struct Reconciliation {
    /// Every answer passed the exact checks and all are the same: none was audited further.
    pub agreed: bool,
    /// The first step where the answers differ (with `agreed`, `None`).
    pub divergence: Option<u32>,
    /// Each answer's outcome, in the order given.
    pub outcomes: Vec<AuditOutcome>,
}

/// The first step at which `answers` (tokens and how each ended) differ: a token that is not
/// the same in all, or the end of one that others go past, or the same tokens ending for
/// different reasons (the last step, which carries the end). `None` when all are the same.
pub fn divergence(answers: &[(&[u32], FinishReason)]) -> Option<u32> {
    let (first, rest) = answers.split_first()?;
    let longest = answers.iter().map(|(t, _)| t.len()).max().unwrap_or(0);
    for step in 0..longest {
        let token = first.0.get(step);
        if rest.iter().any(|(t, _)| t.get(step) != token) {
            return Some(step as u32);
        }
    }
    let ends_differ = rest.iter().any(|(_, reason)| *reason != first.1);
    ends_differ.then(|| longest.saturating_sub(1) as u32)
}

impl Auditor {
    /// Judges the answers several providers gave to one request. Each first passes the exact
    /// checks of its commitment (as any answer does; a failure is penalised there). When all
    /// pass and are the same, they agree. Otherwise every answer that passed them is audited by
    /// a fresh referee that is none of these providers, with the step where the answers first
    /// differ challenged besides the drawn ones: the one that left the model fails its audit
    /// there, with the same consequences as any failed audit.
    pub async fn reconcile(&self, answers: &[Answer<'_>]) -> Reconciliation {
        let mut outcomes = Vec::with_capacity(answers.len());
        for answer in answers {
            let checked = self
                .audit(answer, VerificationMode::Consensus, None, Scope::default())
                .await;
            outcomes.push(checked.0);
        }
        let sound: Vec<usize> = (0..answers.len())
            .filter(|&i| outcomes[i].verdict() == AuditVerdict::Unaudited)
            .collect();
        let compared: Vec<(&[u32], FinishReason)> = sound
            .iter()
            .map(|&i| {
                let answer = &answers[i];
                (answer.tokens, answer.commitment.commitment.finish_reason)
            })
            .collect();
        let divergence = divergence(&compared);
        let agreed = sound.len() == answers.len() && divergence.is_none();
        self.inner
            .metrics
            .consensus
            .get_or_create(&VerdictLabels {
                verdict: if agreed { "agreed" } else { "differed" },
                reason: String::new(),
            })
            .inc();
        if agreed {
            return Reconciliation {
                agreed: true,
                divergence: None,
                outcomes,
            };
        }
        let peers: Vec<PeerId> = answers.iter().map(|a| a.provider.peer).collect();
        let scope = Scope {
            not_referees: &peers,
            also_open: divergence,
            ..Scope::default()
        };
        let audits = sound.iter().map(|&i| async move {
            let audited = self
                .audit(&answers[i], VerificationMode::Merkle, None, scope)
                .await;
            (i, audited.0)
        });
        for (i, outcome) in futures::future::join_all(audits).await {
            outcomes[i] = outcome;
        }
        Reconciliation {
            agreed: false,
            divergence,
            outcomes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STOP: FinishReason = FinishReason::Stop;
    const LENGTH: FinishReason = FinishReason::Length;

    #[test]
    fn identical_answers_do_not_diverge() {
        let a = [1, 2, 3];
        assert_eq!(divergence(&[(&a, STOP), (&a, STOP), (&a, STOP)]), None);
        assert_eq!(divergence(&[(&a, STOP)]), None);
        assert_eq!(divergence(&[]), None);
    }

    #[test]
    fn answers_diverge_at_their_first_different_step() {
        let (a, b) = ([1, 2, 3, 4], [1, 2, 9, 4]);
        assert_eq!(divergence(&[(&a, STOP), (&b, STOP)]), Some(2));
        // One ends where the other goes on: the step after the shorter one's last.
        let short = [1, 2];
        assert_eq!(divergence(&[(&a, STOP), (&short, STOP)]), Some(2));
        assert_eq!(divergence(&[(&short, STOP), (&a, STOP)]), Some(2));
        // The same tokens, ended for different reasons: the last step.
        assert_eq!(divergence(&[(&a, STOP), (&a, LENGTH)]), Some(3));
        // A third answer differing earlier than the second.
        let c = [7, 2, 3, 4];
        assert_eq!(divergence(&[(&a, STOP), (&b, STOP), (&c, STOP)]), Some(0));
    }
}
