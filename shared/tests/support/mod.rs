//! Fixtures shared by the mesh tests of this crate.

use proofmesh_shared::protocol::{Capabilities, GenerateRequest, ModelCard, ModelDigest};

/// What the test providers advertise: one small model card.
pub(crate) fn caps() -> Capabilities {
    Capabilities {
        version: GenerateRequest::VERSION,
        models: vec![ModelCard {
            name: "test-model".into(),
            digest: ModelDigest([7; 32]),
            quantization: "Q4_1".into(),
            context_size: 512,
            parallel: 1,
            device: "cpu".into(),
            gpu_layers: 0,
            numerics: "det/test".into(),
            referee: true,
        }],
        stake: None,
    }
}
