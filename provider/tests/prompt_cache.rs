//! Prompt caching must not change a single committed number: a prompt served from a finished
//! sequence's KV cache yields the same leaves, bit for bit, as the same prompt prefilled from
//! nothing, both for the same prompt again and for one that shares only a beginning. Otherwise an
//! honest provider's exact-tier audit would fail against a referee that prefills everything.
//! Real engine, real default model, the provider's default (q8_0) KV cache.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::Ordering;

use proofmesh_provider::engine::{Engine, EngineConfig, Job, StepEvent};
use proofmesh_shared::commit::StepLeaf;
use proofmesh_shared::protocol::{ChatMessage, RequestId};
use proofmesh_shared::sampling::SamplerParams;
use tokio::sync::mpsc;

async fn engine() -> Engine {
    let path = proofmesh_provider::fetch::default_model_path();
    assert!(
        path.is_file(),
        "run `cargo run -p proofmesh-provider -- fetch-model` first (scripts/test.sh does)"
    );
    let config = EngineConfig {
        threads: 2,
        context_size: 512,
        parallel: 2,
        batch_size: 64,
        referee_slots: 0,
        ..EngineConfig::new(path)
    };
    tokio::task::spawn_blocking(move || Engine::start(&config))
        .await
        .unwrap()
        .expect("engine")
}

fn prompt(engine: &Engine, content: &str) -> Vec<u32> {
    engine
        .tokenize_chat(&[ChatMessage {
            role: "user".into(),
            content: content.into(),
        }])
        .unwrap()
}

/// Runs `prompt` to 24 tokens, sampled at temperature 0.8 with a fixed seed.
async fn leaves(engine: &Engine, prompt: Vec<u32>) -> Vec<StepLeaf> {
    let (events, mut rx) = mpsc::unbounded_channel();
    engine
        .submit(Job {
            request_id: RequestId::random(),
            prompt,
            sampler: SamplerParams {
                temperature: 0.8,
                seed: 7,
                ..Default::default()
            },
            max_tokens: 24,
            events,
            guide: None,
        })
        .unwrap();
    let mut leaves = Vec::new();
    loop {
        match rx.recv().await {
            Some(StepEvent::Step { leaf, .. }) => leaves.push(leaf),
            Some(StepEvent::Finished { .. }) => return leaves,
            other => panic!("unexpected event {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_prompts_give_the_same_leaves_as_cold_ones() {
    let warm = engine().await;
    let first = prompt(
        &warm,
        "Write a short story about a dragon who learns to fly.",
    );
    let second = prompt(
        &warm,
        "Write a short story about a dragon who learns to swim.",
    );
    let shared = first
        .iter()
        .zip(&second)
        .take_while(|(a, b)| a == b)
        .count();
    assert!(
        shared > 10 && shared < second.len(),
        "prompts share {shared} tokens"
    );

    let cold_first = leaves(&warm, first.clone()).await;
    let cached = |e: &Engine| e.load().cached_prompt_tokens.load(Ordering::Relaxed);
    let before = cached(&warm);
    let again = leaves(&warm, first.clone()).await;
    assert_eq!(
        cached(&warm) - before,
        first.len() - 1,
        "the repeated prompt was not served from the cache"
    );
    assert_eq!(again, cold_first, "a cached prompt changed the leaves");

    let before = cached(&warm);
    let warm_second = leaves(&warm, second.clone()).await;
    assert_eq!(
        cached(&warm) - before,
        shared,
        "the shared beginning was not served from the cache"
    );
    let cold = engine().await;
    let cold_second = leaves(&cold, second).await;
    assert_eq!(cached(&cold), 0);
    assert_eq!(
        warm_second, cold_second,
        "a partly cached prompt changed the leaves"
    );
}
