//! Leaves kept after a generation so the provider can open them when challenged.
//!
//! Bounded in bytes and in age. Runs are keyed by the requester and the request id together:
//! only the peer that made a request may open its leaves (they reveal the model's logits over
//! that request's output), and a peer that reuses another's request id stores its own run beside
//! that one instead of replacing it. When the store is full, the oldest run of the requester
//! holding the most bytes goes first, so a peer flooding the provider with requests evicts its
//! own runs, not those another gateway is about to audit (an honest provider that could not
//! open them would answer a signed refusal, which an audit holds against it).

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
    /// Bytes held per requester.
    held: HashMap<PeerId, usize>,
}

impl Inner {
    fn remove(&mut self, key: &RunKey) {
        if let Some(run) = self.runs.remove(key) {
            self.bytes -= run.bytes;
            if let Some(held) = self.held.get_mut(&key.0) {
                *held -= run.bytes;
                if *held == 0 {
                    self.held.remove(&key.0);
                }
            }
        }
    }

    /// Drops expired runs from the front, then, while over `max_bytes`, the oldest run of the
    /// requester holding the most.
    fn evict(&mut self, max_bytes: usize, now: Instant) {
        while let Some(&oldest) = self.order.front() {
            let expired = self
                .runs
                .get(&oldest)
                .is_none_or(|r| now.duration_since(r.stored) > LEAF_TTL);
            if !expired {
                break;
            }
            self.order.pop_front();
            self.remove(&oldest);
        }
        while self.bytes > max_bytes {
            let Some(heaviest) = self.held.iter().max_by_key(|(_, b)| **b).map(|(p, _)| *p) else {
                break;
            };
            let Some(at) = self.order.iter().position(|k| k.0 == heaviest) else {
                break;
            };
            if let Some(key) = self.order.remove(at) {
                self.remove(&key);
            }
        }
    }
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
        if inner.runs.contains_key(&key) {
            inner.remove(&key);
            inner.order.retain(|k| k != &key);
        }
        inner.bytes += bytes;
        *inner.held.entry(requester).or_default() += bytes;
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
        inner.evict(self.max_bytes, Instant::now());
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

    #[test]
    fn a_flood_from_one_peer_evicts_its_own_runs() {
        let store = LeafStore::new(4_000);
        let gateway = PeerId::random();
        let flooder = PeerId::random();
        let audited = RequestId::from_bytes([1; 16]);
        let l = leaves(10);
        store.insert(audited, gateway, l.clone(), LeafTree::build(&l));
        for i in 2..200u8 {
            let l = leaves(10);
            store.insert(
                RequestId::from_bytes([i; 16]),
                flooder,
                l.clone(),
                LeafTree::build(&l),
            );
        }
        assert!(store.bytes() <= 4_000);
        let ask = OpenLeavesRequest {
            request_id: audited,
            indices: vec![0, 9],
        };
        assert!(
            matches!(
                store.open(&gateway, &ask),
                OpenLeavesResponse::Opened { .. }
            ),
            "the flood evicted another requester's run"
        );
        // The flooder's newest run is kept, its oldest are gone.
        let newest = OpenLeavesRequest {
            request_id: RequestId::from_bytes([199; 16]),
            indices: vec![0],
        };
        assert!(matches!(
            store.open(&flooder, &newest),
            OpenLeavesResponse::Opened { .. }
        ));
        let oldest = OpenLeavesRequest {
            request_id: RequestId::from_bytes([2; 16]),
            indices: vec![0],
        };
        assert!(matches!(
            store.open(&flooder, &oldest),
            OpenLeavesResponse::Refused { .. }
        ));
    }
}
