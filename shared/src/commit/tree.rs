//! The Merkle tree over step leaves.
//!
//! rs_merkle hashes inner nodes as `H(left ‖ right)` and does not separate them from leaves, which
//! would let a forged "leaf" equal an inner node (a second-preimage attack). Leaves are therefore
//! hashed as `SHA-256(0x00 ‖ leaf)` ([`StepLeaf::hash`]) and inner nodes as
//! `SHA-256(0x01 ‖ left ‖ right)` ([`NodeHasher`]).

use rs_merkle::{Hasher, MerkleProof, MerkleTree};

use super::StepLeaf;
use crate::Digest32;

/// rs_merkle hasher for inner nodes, prefixed with `0x01`.
#[derive(Debug, Clone, Copy)]
pub struct NodeHasher;

impl Hasher for NodeHasher {
    type Hash = Digest32;

    fn hash(data: &[u8]) -> Digest32 {
        crate::sha256(&[&[0x01], data])
    }

    fn concat_and_hash(left: &Digest32, right: Option<&Digest32>) -> Digest32 {
        match right {
            Some(right) => crate::sha256(&[&[0x01], left, right]),
            // rs_merkle promotes a lone node unchanged.
            None => *left,
        }
    }

    fn hash_size() -> usize {
        32
    }
}

/// The root of a tree with no leaves (never produced by a real generation: every request has at
/// least one step).
pub const EMPTY_ROOT: Digest32 = [0; 32];

/// A built tree over the leaf hashes of one request.
pub struct LeafTree {
    tree: MerkleTree<NodeHasher>,
    len: usize,
}

impl std::fmt::Debug for LeafTree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeafTree")
            .field("len", &self.len)
            .field("root", &hex::encode(self.root()))
            .finish()
    }
}

impl LeafTree {
    /// Builds the tree over `leaves` in step order.
    pub fn build(leaves: &[StepLeaf]) -> Self {
        let hashes: Vec<Digest32> = leaves.iter().map(StepLeaf::hash).collect();
        Self {
            tree: MerkleTree::<NodeHasher>::from_leaves(&hashes),
            len: hashes.len(),
        }
    }

    /// The Merkle root.
    pub fn root(&self) -> Digest32 {
        self.tree.root().unwrap_or(EMPTY_ROOT)
    }

    /// Number of leaves.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the tree has no leaves.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A multi-proof for sorted, distinct, in-range `indices`.
    pub fn prove(&self, indices: &[usize]) -> Vec<Digest32> {
        self.tree.proof(indices).proof_hashes().to_vec()
    }
}

/// Checks that `leaves` sit at `indices` (sorted, distinct) of a tree with `total` leaves and
/// root `root`, using the multi-proof `proof`.
pub fn verify_openings(
    root: &Digest32,
    indices: &[usize],
    leaves: &[StepLeaf],
    proof: &[Digest32],
    total: usize,
) -> bool {
    if indices.len() != leaves.len()
        || indices.is_empty()
        || indices.windows(2).any(|w| w[0] >= w[1])
        || indices.iter().any(|&i| i >= total)
    {
        return false;
    }
    let hashes: Vec<Digest32> = leaves.iter().map(StepLeaf::hash).collect();
    MerkleProof::<NodeHasher>::new(proof.to_vec()).verify(*root, indices, &hashes, total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::TopLogit;

    fn leaves(n: u32) -> Vec<StepLeaf> {
        (0..n)
            .map(|step| StepLeaf {
                step,
                token: step * 3,
                draw: u64::from(step),
                logsumexp: 0.5,
                top: vec![TopLogit {
                    id: step * 3,
                    logit: 1.0,
                }],
            })
            .collect()
    }

    #[test]
    fn openings_verify_for_many_sizes() {
        for n in [1u32, 2, 3, 5, 16, 17, 100] {
            let leaves = leaves(n);
            let tree = LeafTree::build(&leaves);
            let indices: Vec<usize> = (0..n as usize).step_by(3).collect();
            let opened: Vec<StepLeaf> = indices.iter().map(|&i| leaves[i].clone()).collect();
            let proof = tree.prove(&indices);
            assert!(
                verify_openings(&tree.root(), &indices, &opened, &proof, n as usize),
                "n={n}"
            );
        }
    }

    #[test]
    fn tampered_leaf_wrong_index_and_wrong_path_fail() {
        let leaves = leaves(20);
        let tree = LeafTree::build(&leaves);
        let indices = vec![2usize, 7, 11];
        let opened: Vec<StepLeaf> = indices.iter().map(|&i| leaves[i].clone()).collect();
        let proof = tree.prove(&indices);
        assert!(verify_openings(&tree.root(), &indices, &opened, &proof, 20));

        let mut tampered = opened.clone();
        tampered[1].top[0].logit += 0.001;
        assert!(!verify_openings(
            &tree.root(),
            &indices,
            &tampered,
            &proof,
            20
        ));

        let shifted = vec![3usize, 7, 11];
        assert!(!verify_openings(
            &tree.root(),
            &shifted,
            &opened,
            &proof,
            20
        ));

        let other_proof = tree.prove(&[1, 7, 11]);
        assert!(!verify_openings(
            &tree.root(),
            &indices,
            &opened,
            &other_proof,
            20
        ));
        assert!(!verify_openings(&tree.root(), &[], &[], &proof, 20));
    }

    #[test]
    fn a_leaf_cannot_pose_as_an_inner_node() {
        let leaves = leaves(2);
        let tree = LeafTree::build(&leaves);
        let inner = NodeHasher::concat_and_hash(&leaves[0].hash(), Some(&leaves[1].hash()));
        assert_eq!(inner, tree.root());
        assert_ne!(
            crate::sha256(&[&[0x00], &[leaves[0].hash(), leaves[1].hash()].concat()]),
            inner
        );
    }
}
