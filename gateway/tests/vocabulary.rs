//! The gateway's own detokenization (its GGUF vocabulary reader, no llama.cpp) against
//! llama.cpp's, token by token, for every token of the default model and of the second test
//! model: the text a client reads is computed by the gateway from the audited tokens, so it must
//! be byte for byte what an honest provider's engine streams.

// Test code: a failure is a failed test and should say so loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use proofmesh_gateway::auditor::Vocabulary;
use proofmesh_provider::engine::{Engine, EngineConfig};

fn compare(model: &std::path::Path) {
    let vocabulary = Vocabulary::from_gguf(model).expect("vocabulary");
    let mut config = EngineConfig::new(model.to_path_buf());
    config.context_size = 64;
    config.parallel = 1;
    config.batch_size = 64;
    config.referee_slots = 0;
    config.threads = 1;
    let engine = Engine::start(&config).expect("engine");
    let n = engine.info().n_vocab;
    assert_eq!(vocabulary.len(), n as usize, "{}", model.display());
    let differing: Vec<(u32, Vec<u8>, Vec<u8>)> = (0..n)
        .filter_map(|t| {
            let ours = vocabulary.piece(t).unwrap_or_default().to_vec();
            let theirs = engine.piece(t);
            (ours != theirs).then_some((t, ours, theirs))
        })
        .collect();
    assert!(
        differing.is_empty(),
        "{} of {n} tokens of {} differ, e.g. {:?}",
        differing.len(),
        model.display(),
        &differing[..differing.len().min(5)]
    );
    assert!(vocabulary.piece(n).is_none());
    // The same end-of-generation tokens: constraints allow them exactly where complete, so
    // the gateway's check of a constrained answer's last token needs the engine's set.
    let eog: Vec<u32> = (0..n).filter(|&t| engine.is_eog(t)).collect();
    assert_eq!(vocabulary.eog(), eog.as_slice(), "{}", model.display());
}

#[test]
fn the_default_models_vocabulary_matches_llama_cpp() {
    compare(&support::model_path());
}

#[test]
fn a_sentencepiece_vocabulary_matches_llama_cpp() {
    compare(&support::other_model());
}
