//! Canary audits: referees checked against answers whose truth the gateway knows.
//!
//! Now and then after an audit passes, the gateway takes that answer's request and tokens, gives
//! the request a fresh id (so it cannot be told from any other job), and has a trusted peer
//! referee of its own engine's class re-execute it twice: once as it was, once with one token
//! changed. The gateway's own engine re-executes both as well, and in the exact tier honest
//! evidence agrees bit for bit. A referee whose evidence differs from the engine's on either,
//! whether it rubber-stamps the changed answer or accuses the sound one, is struck in the book
//! and dropped from the pool. A referee that is busy or unreachable for a canary is not judged.

use std::sync::Arc;

use libp2p::PeerId;
use proofmesh_shared::protocol::{GenerateRequest, RequestId};
use proofmesh_shared::verify::{RefereeEvidence, SignedEvidence};

use super::pool::Choice;
use super::session::{Dialer, LocalReferee, RefereeSession};

/// Steps compared per canary (the changed one among them).
const CANARY_STEPS: usize = 8;

/// How a canary went for the referee.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CanaryOutcome {
    /// Its evidence was the engine's on both answers.
    Agreed,
    /// Its evidence differed: it lies (or runs another model).
    Differed,
    /// No verdict: the referee or the engine produced no evidence.
    Unjudged,
}

/// Re-executes `request`/`tokens` (and a copy with one token changed) on `referee` and on the
/// gateway's engine, and compares.
pub async fn check(
    dialer: &Dialer,
    local: Arc<dyn LocalReferee>,
    referee: (PeerId, String),
    request: &GenerateRequest,
    tokens: &[u32],
    vocabulary: usize,
) -> CanaryOutcome {
    if tokens.is_empty() || vocabulary < 2 {
        return CanaryOutcome::Unjudged;
    }
    let changed_at = rand::random::<u32>() as usize % tokens.len();
    let mut changed = tokens.to_vec();
    changed[changed_at] =
        (changed[changed_at] + 1 + rand::random::<u32>() % 1000) % vocabulary as u32;
    let indices = steps(tokens.len(), changed_at);
    for claimed in [tokens.to_vec(), changed] {
        let mut canary = request.clone();
        canary.request_id = RequestId::random();
        let remote = Choice::Remote {
            peer: referee.0,
            numerics: referee.1.clone(),
        };
        let (theirs, ours) = tokio::join!(
            evidence(dialer, remote, &canary, &claimed, &indices),
            evidence(
                dialer,
                Choice::Local(Arc::clone(&local)),
                &canary,
                &claimed,
                &indices
            )
        );
        let (Some(theirs), Some(ours)) = (theirs, ours) else {
            return CanaryOutcome::Unjudged;
        };
        if theirs.verify().ok() != Some(referee.0) || !agree(&theirs.evidence, &ours.evidence) {
            return CanaryOutcome::Differed;
        }
    }
    CanaryOutcome::Agreed
}

/// Up to [`CANARY_STEPS`] sorted steps, `must` among them.
fn steps(len: usize, must: usize) -> Vec<u32> {
    let mut chosen: std::collections::BTreeSet<u32> = [must as u32].into();
    while chosen.len() < CANARY_STEPS.min(len) {
        chosen.insert(rand::random::<u32>() % len as u32);
    }
    chosen.into_iter().collect()
}

async fn evidence(
    dialer: &Dialer,
    choice: Choice,
    request: &GenerateRequest,
    tokens: &[u32],
    indices: &[u32],
) -> Option<SignedEvidence> {
    let session = RefereeSession::start(dialer, choice, request);
    session.push_all(tokens);
    session.finish(indices).await.ok()
}

/// Whether two referees of one deterministic class told the same story: the same facts, the
/// same logits bit for bit, the same margins.
fn agree(theirs: &RefereeEvidence, ours: &RefereeEvidence) -> bool {
    let bits = |x: f32| x.to_bits();
    theirs.prompt_hash == ours.prompt_hash
        && theirs.output_hash == ours.output_hash
        && theirs.invalid_tokens == ours.invalid_tokens
        && theirs.ends_with_eog == ours.ends_with_eog
        && theirs.stop_sequence_found == ours.stop_sequence_found
        && theirs.margins.len() == ours.margins.len()
        && theirs
            .margins
            .iter()
            .zip(&ours.margins)
            .all(|(a, b)| bits(*a) == bits(*b))
        && theirs.opened.len() == ours.opened.len()
        && theirs.opened.iter().zip(&ours.opened).all(|(a, b)| {
            a.step == b.step
                && bits(a.logsumexp) == bits(b.logsumexp)
                && bits(a.claimed_logit) == bits(b.claimed_logit)
                && a.top.len() == b.top.len()
                && a.top
                    .iter()
                    .zip(&b.top)
                    .all(|(x, y)| x.id == y.id && bits(x.logit) == bits(y.logit))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canary_steps_include_the_changed_one() {
        for len in [1, 3, 8, 40] {
            let must = len - 1;
            let s = steps(len, must);
            assert!(s.contains(&(must as u32)));
            assert_eq!(s.len(), CANARY_STEPS.min(len));
            assert!(s.windows(2).all(|w| w[0] < w[1]));
        }
    }
}
