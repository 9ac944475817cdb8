//! The gateway's one retry policy: which provider a request tries next, how many tries it gets,
//! when it must be over, and which error the client sees when every try failed.
//!
//! A request tries each provider at most once, at most [`RetryPolicy::max_attempts`] of them,
//! and only while its end-to-end deadline has not passed. Whatever went wrong on one provider
//! (it broke, hung, refused, was busy, or its answer was withheld by the audit) is recorded as
//! a [`Failure`]. A provider that broke, refused or was busy opens its circuit in the registry,
//! so that it is tried after the others for a while (a peer that refuses everything must not
//! stay first in line because it holds no load); running out of the request's own time does
//! not count against the provider. When nothing is left to try, [`Attempts::error`] picks the
//! one error that tells the client the most.

use std::time::{Duration, Instant};

use crate::error::ApiError;
use crate::registry::{Candidate, Registry};

/// How hard the gateway tries for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Providers tried for one request, at most (each once): the first plus failovers.
    pub max_attempts: usize,
    /// From the request's arrival to its last token (the audit after it has its own limits).
    pub deadline: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            // One first attempt plus at most two failovers (../STACK.md: what OpenAI SDK users
            // expect; the SDKs retry twice more themselves).
            max_attempts: 3,
            deadline: Duration::from_secs(300),
        }
    }
}

impl RetryPolicy {
    /// The policy for a request that `answers` providers answer at once (`consensus`): one
    /// first attempt each, and the failovers one request would have.
    pub fn for_answers(self, answers: usize) -> Self {
        Self {
            max_attempts: self.max_attempts.saturating_add(answers.saturating_sub(1)),
            ..self
        }
    }
}

/// When a request must be over.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    at: Instant,
    budget: Duration,
}

impl Deadline {
    /// `budget` from `start`.
    pub fn new(start: Instant, budget: Duration) -> Self {
        Self {
            at: start + budget,
            budget,
        }
    }

    /// Time left (zero once passed).
    pub fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    /// Whether it has passed.
    pub fn passed(&self) -> bool {
        Instant::now() >= self.at
    }

    /// The client's error once it has passed.
    pub fn error(&self) -> ApiError {
        ApiError::deadline_exceeded(self.budget)
    }
}

/// Why one try on one provider failed.
#[derive(Debug)]
pub enum Failure {
    /// It said it is at capacity.
    Busy,
    /// This gateway already holds as many streams to it as it opens to one provider: nobody's
    /// fault, and another provider may have room.
    Full,
    /// It refused the request itself (context too small, invalid): another provider may
    /// accept it, and a provider may lie about it.
    Refused(ApiError),
    /// It broke, hung, hung up or broke the protocol.
    Broke(ApiError),
    /// Its answer failed verification (the verdict).
    Failed(String),
    /// Its answer could not be verified as asked (the verdict).
    Unverified(String),
    /// The request's deadline passed while it was at work: not the provider's fault.
    Deadline,
}

impl Failure {
    /// A failure from the error a generation ended with: the deadline, or the provider's.
    pub fn from_error(error: ApiError) -> Self {
        if error.code() == Some(REQUEST_TIMEOUT) {
            Self::Deadline
        } else {
            Self::Broke(error)
        }
    }
}

/// The error code of a request past its deadline.
pub const REQUEST_TIMEOUT: &str = "request_timeout";

/// Logs a provider's failure and opens its circuit when it broke, refused or was busy (not for
/// a withheld answer, which the auditor's book deals with, nor for the request's own deadline).
/// For failures after a stream started too, where no [`Attempts`] is left to record them.
pub fn record(registry: &Registry, candidate: &Candidate, failure: &Failure) {
    match failure {
        Failure::Broke(e) => {
            tracing::warn!(provider = %candidate.peer, code = ?e.code(), "provider failed");
            registry.failed(&candidate.peer);
        }
        Failure::Busy => {
            tracing::info!(provider = %candidate.peer, "provider at capacity");
            registry.failed(&candidate.peer);
        }
        Failure::Refused(e) => {
            tracing::info!(provider = %candidate.peer, code = ?e.code(), "provider refused the request");
            registry.failed(&candidate.peer);
        }
        Failure::Failed(verdict) | Failure::Unverified(verdict) => {
            tracing::warn!(provider = %candidate.peer, %verdict, "answer withheld");
        }
        Failure::Deadline => {
            tracing::warn!(provider = %candidate.peer, "request deadline passed");
        }
        Failure::Full => {
            tracing::debug!(provider = %candidate.peer, "this gateway's streams to the provider are all in use");
        }
    }
}

/// One request's tries.
#[derive(Debug)]
pub struct Attempts<'a> {
    policy: RetryPolicy,
    candidates: &'a [Candidate],
    next: usize,
    deadline: Deadline,
    failures: Vec<Failure>,
    registry: Registry,
}

impl<'a> Attempts<'a> {
    /// Tries for a request that arrived at `arrived`, over `candidates` in their order.
    pub fn new(
        policy: RetryPolicy,
        registry: Registry,
        candidates: &'a [Candidate],
        arrived: Instant,
    ) -> Self {
        Self {
            policy,
            candidates,
            next: 0,
            deadline: Deadline::new(arrived, policy.deadline),
            failures: Vec::new(),
            registry,
        }
    }

    /// The next provider to try, or `None` when the budget, the candidates or the time ran out.
    pub fn next_candidate(&mut self) -> Option<&'a Candidate> {
        if self.next >= self.policy.max_attempts || self.deadline.passed() {
            return None;
        }
        let candidate = self.candidates.get(self.next)?;
        self.next += 1;
        Some(candidate)
    }

    /// When the request must be over.
    pub fn deadline(&self) -> Deadline {
        self.deadline
    }

    /// How many providers may still be tried.
    pub fn left(&self) -> usize {
        let budget = self.policy.max_attempts.saturating_sub(self.next);
        budget.min(self.candidates.len().saturating_sub(self.next))
    }

    /// Records that `candidate` failed ([`record`]) and keeps the failure for [`Attempts::error`].
    pub fn failed(&mut self, candidate: &Candidate, failure: Failure) {
        record(&self.registry, candidate, &failure);
        self.failures.push(failure);
    }

    /// Records that `candidate` answered: its circuit closes.
    pub fn succeeded(&self, candidate: &Candidate) {
        self.registry.succeeded(&candidate.peer);
    }

    /// The error for a request whose every try failed, most telling first: a failed audit
    /// (the client is told not to retry only when every try failed one), an answer that could
    /// not be verified, the deadline, a provider that broke, every provider busy (429 with
    /// `Retry-After`), a refusal of the request by every provider that answered, and nobody to
    /// try at all.
    pub fn error(&self) -> ApiError {
        let verdict = |f: &Failure, failed: bool| match (f, failed) {
            (Failure::Failed(v), true) | (Failure::Unverified(v), false) => Some(v.clone()),
            _ => None,
        };
        if let Some(v) = self.failures.iter().find_map(|f| verdict(f, true)) {
            let every_try_failed = self
                .failures
                .iter()
                .all(|f| matches!(f, Failure::Failed(_)));
            let error = ApiError::verification_failed(&v);
            return if every_try_failed {
                error
            } else {
                error.retryable()
            };
        }
        if let Some(v) = self.failures.iter().find_map(|f| verdict(f, false)) {
            return ApiError::unverified(&v);
        }
        if self.deadline.passed() {
            return self.deadline.error();
        }
        let mut broke = None;
        let mut refused = None;
        let mut busy = false;
        for failure in &self.failures {
            match failure {
                Failure::Broke(e) => broke = Some(e.clone()),
                // The first refusal, unless a later one is about the request itself (a 400
                // tells the client more than "this provider does not serve this gateway").
                Failure::Refused(e) => {
                    let better = refused.as_ref().is_none_or(|r: &ApiError| {
                        r.status().is_server_error() && e.status().is_client_error()
                    });
                    if better {
                        refused = Some(e.clone());
                    }
                }
                Failure::Busy | Failure::Full => busy = true,
                Failure::Failed(_) | Failure::Unverified(_) | Failure::Deadline => {}
            }
        }
        if let Some(e) = broke {
            return e;
        }
        if busy {
            let tried = &self.candidates[..self.next.min(self.candidates.len())];
            let peers: Vec<_> = tried.iter().map(|c| c.peer).collect();
            let wait = self.registry.soonest_ready(&peers).as_secs().max(1);
            return ApiError::busy(
                "Every provider of this model is at capacity; retry after the time in Retry-After",
                wait,
            );
        }
        refused.unwrap_or_else(|| {
            ApiError::no_provider("No provider could take the request right now")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::PeerId;

    fn candidates(n: usize, registry: &Registry) -> Vec<Candidate> {
        (0..n)
            .map(|_| {
                let card = crate::registry::test_card("m", 1);
                let peer = PeerId::random();
                registry.upsert(peer, vec![card.clone()]);
                Candidate { peer, card }
            })
            .collect()
    }

    fn policy(max_attempts: usize) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            deadline: Duration::from_secs(60),
        }
    }

    #[test]
    fn each_provider_is_tried_once_within_the_budget() {
        let registry = Registry::default();
        let all = candidates(5, &registry);
        let mut attempts = Attempts::new(policy(3), registry, &all, Instant::now());
        let mut tried = Vec::new();
        while let Some(c) = attempts.next_candidate() {
            tried.push(c.peer);
            attempts.failed(c, Failure::Broke(ApiError::provider_failed("x")));
        }
        assert_eq!(
            tried,
            all.iter().take(3).map(|c| c.peer).collect::<Vec<_>>()
        );
        assert_eq!(attempts.error().status().as_u16(), 502);
    }

    #[test]
    fn no_try_starts_after_the_deadline() {
        let registry = Registry::default();
        let all = candidates(2, &registry);
        let long_ago = Instant::now() - Duration::from_secs(61);
        let mut attempts = Attempts::new(policy(3), registry, &all, long_ago);
        assert!(attempts.next_candidate().is_none());
        assert_eq!(attempts.error().code(), Some("request_timeout"));
    }

    #[test]
    fn the_most_telling_error_wins() {
        let registry = Registry::default();
        let all = candidates(3, &registry);
        let run = |failures: Vec<Failure>| {
            let mut attempts = Attempts::new(policy(3), registry.clone(), &all, Instant::now());
            for failure in failures {
                let c = attempts.next_candidate().expect("a candidate");
                attempts.failed(c, failure);
            }
            attempts.error()
        };
        let context = || Failure::Refused(ApiError::context_length("too long"));
        assert_eq!(
            run(vec![context(), context()]).code(),
            Some("context_length_exceeded")
        );
        // A provider that does not serve this gateway says nothing about the request.
        let not_served = || Failure::Refused(ApiError::no_provider("not served"));
        assert_eq!(
            run(vec![not_served(), context()]).code(),
            Some("context_length_exceeded")
        );
        let busy = run(vec![context(), Failure::Busy]);
        assert_eq!(busy.status().as_u16(), 429);
        let broke = run(vec![
            Failure::Busy,
            Failure::Broke(ApiError::provider_timeout()),
        ]);
        assert_eq!(broke.code(), Some("provider_timeout"));
        let failed = run(vec![
            Failure::Unverified("unrefereed".into()),
            Failure::Failed("failed:logits_diverge".into()),
            Failure::Busy,
        ]);
        assert_eq!(failed.code(), Some("verification_failed"));
        assert!(
            failed.is_retryable(),
            "another try may reach an honest provider"
        );
        let all_failed = run(vec![Failure::Failed("failed:logits_diverge".into())]);
        assert!(!all_failed.is_retryable());
        assert_eq!(
            run(vec![Failure::Busy, Failure::Deadline])
                .status()
                .as_u16(),
            429
        );
        assert_eq!(run(vec![]).status().as_u16(), 503);
    }
}
