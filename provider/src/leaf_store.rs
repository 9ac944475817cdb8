//! Leaves kept after a generation so the provider can open them when challenged.
//!
//! Bounded in bytes and in age: the oldest runs go first. Runs are keyed by the requester and the
//! request id together: only the peer that made a request may open its leaves (they reveal the
//! model's logits over that request's output), and a peer that reuses another's request id
//! stores its own run beside that one instead of replacing it.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use proofmesh_shared::commit::{LeafTree, StepLeaf};
use proofmesh_shared::protocol::{
    MAX_OPEN_INDICES, OpenLeavesRequest, OpenLeavesResponse, RequestId,
};

/// How long leaves stay openable. A gateway challenges right after the commitment arrives;
/// later audits (fraud mode) happen within minutes.
pub const LEAF_TTL: Duration = Duration::from_secs(30 * 60);

/// A run's key: who asked, and the id it gave the request.
type RunKey = (PeerId, RequestId);

#[derive(Debug)]
struct Run {
    leaves: Vec<StepLeaf>,
    tree: LeafTree,
    bytes: usize,
    stored: Instant,
}

#[derive(Debug, Default)]
struct Inner {
    runs: HashMap<RunKey, Run>,
    order: VecDeque<RunKey>,
    bytes: usize,
}

/// The bounded store of past runs' leaves.
#[derive(Debug)]
pub struct LeafStore {
    inner: Mutex<Inner>,
    max_bytes: usize,
}

impl LeafStore {
    /// A store holding at most `max_bytes` of leaves.
    pub fn new(max_bytes: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            max_bytes,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A poisoned lock only means another thread panicked mid-update; the maps stay usable.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps a finished run's leaves and tree.
    pub fn insert(&self, id: RequestId, requester: PeerId, leaves: Vec<StepLeaf>, tree: LeafTree) {
        let bytes = leaves.iter().map(StepLeaf::size_bytes).sum::<usize>() + leaves.len() * 64;
        let mut inner = self.lock();
        let key = (requester, id);
        if let Some(old) = inner.runs.remove(&key) {
            inner.bytes -= old.bytes;
        }
        inner.bytes += bytes;
        inner.runs.insert(
            key,
            Run {
                leaves,
                tree,
                bytes,
                stored: Instant::now(),
            },
        );
        inner.order.push_back(key);
        let now = Instant::now();
        while let Some(&oldest) = inner.order.front() {
            let expired = inner
                .runs
                .get(&oldest)
                .is_none_or(|r| now.duration_since(r.stored) > LEAF_TTL);
            if inner.bytes <= self.max_bytes && !expired {
                break;
            }
            inner.order.pop_front();
            if let Some(run) = inner.runs.remove(&oldest) {
                inner.bytes -= run.bytes;
            }
        }
    }

    /// Bytes held right now.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Answers a challenge from `peer`.
    pub fn open(&self, peer: &PeerId, request: &OpenLeavesRequest) -> OpenLeavesResponse {
        let refuse = |reason: &str| OpenLeavesResponse::Refused {
            reason: reason.into(),
        };
        let inner = self.lock();
        let Some(run) = inner.runs.get(&(*peer, request.request_id)) else {
            return refuse("unknown or expired request");
        };
        let n = run.leaves.len();
        let indices: Vec<usize> = request.indices.iter().map(|&i| i as usize).collect();
        if indices.is_empty()
            || indices.len() > MAX_OPEN_INDICES
            || indices.windows(2).any(|w| w[0] >= w[1])
            || indices.iter().any(|&i| i >= n)
        {
            return refuse("indices must be sorted, distinct, in range and at most 256");
        }
        OpenLeavesResponse::Opened {
            leaves: indices.iter().map(|&i| run.leaves[i].clone()).collect(),
            proof: run.tree.prove(&indices),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proofmesh_shared::sampling::TopLogit;

    fn leaves(n: u32) -> Vec<StepLeaf> {
        (0..n)
            .map(|step| StepLeaf {
                step,
                token: step,
                draw: 0,
                logsumexp: 1.0,
                top: vec![TopLogit {
                    id: step,
                    logit: 0.5,
                }],
            })
            .collect()
    }

    #[test]
    fn opens_for_the_requester_only_and_evicts_oldest() {
        let store = LeafStore::new(4_000);
        let me = PeerId::random();
        let first = RequestId::from_bytes([1; 16]);
        let l = leaves(10);
        store.insert(first, me, l.clone(), LeafTree::build(&l));
        let ask = OpenLeavesRequest {
            request_id: first,
            indices: vec![1, 3],
        };
        assert!(matches!(
            store.open(&me, &ask),
            OpenLeavesResponse::Opened { .. }
        ));
        assert!(matches!(
            store.open(&PeerId::random(), &ask),
            OpenLeavesResponse::Refused { .. }
        ));
        let bad = OpenLeavesRequest {
            request_id: first,
            indices: vec![3, 1],
        };
        assert!(matches!(
            store.open(&me, &bad),
            OpenLeavesResponse::Refused { .. }
        ));
        let out = OpenLeavesRequest {
            request_id: first,
            indices: vec![10],
        };
        assert!(matches!(
            store.open(&me, &out),
            OpenLeavesResponse::Refused { .. }
        ));

        // Another peer reusing the id stores its own run; the first requester's stays.
        let other = PeerId::random();
        let forged = leaves(3);
        store.insert(first, other, forged.clone(), LeafTree::build(&forged));
        let OpenLeavesResponse::Opened { leaves: mine, .. } = store.open(&me, &ask) else {
            panic!("the requester's run was replaced")
        };
        assert_eq!(mine, vec![l[1].clone(), l[3].clone()]);

        for i in 2..20u8 {
            let l = leaves(10);
            store.insert(
                RequestId::from_bytes([i; 16]),
                me,
                l.clone(),
                LeafTree::build(&l),
            );
        }
        assert!(store.bytes() <= 4_000);
        assert!(matches!(
            store.open(&me, &ask),
            OpenLeavesResponse::Refused { .. }
        ));
    }
}
