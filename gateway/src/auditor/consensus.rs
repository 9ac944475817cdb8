//! `consensus` mode's judgement: several providers answered the same request (same request id,
//! same seed), so an honest engine of one numerics class gives every one of them the same
//! tokens. Identical answers agree; the first step where they differ is where at least one of
//! them left the model, and each answer is audited by a referee with that step among those
//! challenged. Identities are free, so agreement may be collusion: a drawn share of agreed
//! answers (at the `fraud` mode's rates) is audited too. The providers of the consensus never
//! referee one another.

use libp2p::PeerId;
use proofmesh_shared::protocol::FinishReason;
use proofmesh_shared::verify::AuditVerdict;

use super::procedure::Answer;
use super::{AuditOutcome, Auditor, Scope, VerificationMode};
use crate::metrics::VerdictLabels;

/// How the answers to one `consensus` request were judged.
#[derive(Debug, Clone)]
pub struct Reconciliation {
    /// Every answer passed the exact checks and all are the same.
    pub agreed: bool,
    /// Whether the answers were audited by a referee: after any difference, and for a drawn
    /// share of agreements.
    pub audited: bool,
    /// The first step where the answers differ (with `agreed`, `None`).
    pub divergence: Option<u32>,
    /// Each answer's outcome, in the order given.
    pub outcomes: Vec<AuditOutcome>,
}

impl Reconciliation {
    /// Whether answer `i` may be released: one whose audit passed; one of an agreement that was
    /// not drawn for audit; or, where the operator allows unrefereed answers
    /// (`allow_unrefereed`), one of an agreement that no referee could audit. After a
    /// difference nothing less than a pass will do: one of the answers left the model.
    pub fn releasable(&self, i: usize, allow_unrefereed: bool) -> bool {
        let Some(outcome) = self.outcomes.get(i) else {
            return false;
        };
        match outcome.verdict() {
            AuditVerdict::Passed => true,
            AuditVerdict::Unaudited => self.agreed && !self.audited,
            AuditVerdict::Unrefereed => self.agreed && allow_unrefereed,
            AuditVerdict::Inconclusive | AuditVerdict::Failed(_) => false,
        }
    }
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
    /// pass and are the same, they agree, and are audited only when drawn, at the highest
    /// `fraud` rate among their providers (colluding identities agree on a forgery). Otherwise
    /// every answer that passed them is audited by a fresh referee that is none of these
    /// providers, with the step where the answers first differ challenged besides the drawn
    /// ones: the one that left the model fails its audit there, with the same consequences as
    /// any failed audit.
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
        let audited = !agreed || rand::random::<f64>() < self.agreement_audit_rate(answers);
        let verdict = match (agreed, audited) {
            (true, false) => "agreed",
            (true, true) => "agreed_audited",
            (false, _) => "differed",
        };
        self.inner
            .metrics
            .consensus
            .get_or_create(&VerdictLabels {
                verdict,
                reason: String::new(),
            })
            .inc();
        if !audited {
            return Reconciliation {
                agreed,
                audited,
                divergence,
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
            agreed,
            audited,
            divergence,
            outcomes,
        }
    }

    /// The share of agreements of these providers audited: the highest `fraud` rate among
    /// them (a provider on probation is watched more closely).
    fn agreement_audit_rate(&self, answers: &[Answer<'_>]) -> f64 {
        let policy = &self.inner.policy;
        answers
            .iter()
            .map(|a| {
                let record = self.inner.book.get(&a.provider.peer);
                policy
                    .fraud
                    .rate_for(record.on_probation(policy.probation_audits))
            })
            .fold(0.0, f64::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STOP: FinishReason = FinishReason::Stop;
    const LENGTH: FinishReason = FinishReason::Length;

    fn judged(agreed: bool, audited: bool, verdict: AuditVerdict) -> Reconciliation {
        Reconciliation {
            agreed,
            audited,
            divergence: (!agreed).then_some(1),
            outcomes: vec![AuditOutcome {
                verdict: Some(verdict),
                ..AuditOutcome::default()
            }],
        }
    }

    #[test]
    fn after_a_difference_only_a_pass_is_released() {
        use AuditVerdict::{Inconclusive, Passed, Unaudited, Unrefereed};
        let failed = AuditVerdict::Failed(proofmesh_shared::verify::AuditFailure::SamplerMismatch);
        for allow in [false, true] {
            // Differed: a pass, nothing else, even where unrefereed answers are allowed.
            assert!(judged(false, true, Passed).releasable(0, allow));
            for verdict in [Unaudited, Unrefereed, Inconclusive, failed.clone()] {
                assert!(!judged(false, true, verdict).releasable(0, allow));
            }
            // Agreed and not drawn: released on the exact checks.
            assert!(judged(true, false, Unaudited).releasable(0, allow));
            // Agreed and drawn: the audit decides.
            assert!(judged(true, true, Passed).releasable(0, allow));
            assert!(!judged(true, true, failed.clone()).releasable(0, allow));
            assert!(!judged(true, true, Inconclusive).releasable(0, allow));
        }
        // Agreed, drawn, and no referee: only where the operator allows unrefereed answers.
        assert!(!judged(true, true, Unrefereed).releasable(0, false));
        assert!(judged(true, true, Unrefereed).releasable(0, true));
        assert!(
            !judged(true, true, Passed).releasable(1, true),
            "no such answer"
        );
    }

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
