//! A long prompt arriving while another stream generates must not stall it: the engine prefills
//! in chunks of `batch_size` tokens and puts every running sequence's next token into each of
//! those `llama_decode` calls. Real engine, real default model.
//!
//! The assertion counts tokens, not milliseconds: while a 2,000-token prompt is prefilled in
//! chunks of 256, the running stream must receive a token with (almost) every chunk. An engine
//! that prefilled the whole prompt in one call, or that paused running sequences during prefill,
//! would deliver at most one or two.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use proofmesh_provider::engine::{Engine, EngineConfig, Job, StepEvent};
use proofmesh_shared::protocol::{ChatMessage, RequestId};
use proofmesh_shared::sampling::SamplerParams;
use tokio::sync::mpsc;

const CHUNK: u32 = 256;
const LONG_PROMPT: usize = 2000;

fn model() -> std::path::PathBuf {
    let path = proofmesh_provider::fetch::default_model_path();
    assert!(
        path.is_file(),
        "run `cargo run -p proofmesh-provider -- fetch-model` first (scripts/test.sh does)"
    );
    path
}

fn job(prompt: Vec<u32>, max_tokens: u32) -> (Job, mpsc::UnboundedReceiver<StepEvent>) {
    let (events, rx) = mpsc::unbounded_channel();
    let job = Job {
        request_id: RequestId::random(),
        prompt,
        sampler: SamplerParams {
            temperature: 0.0,
            ..Default::default()
        },
        max_tokens,
        events,
        guide: None,
    };
    (job, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_prompt_does_not_stall_running_streams() {
    let config = EngineConfig {
        model_path: model(),
        threads: 2,
        context_size: 2304,
        parallel: 2,
        batch_size: CHUNK,
        gpu_layers: 0,
        kv_cache: Default::default(),
        referee_slots: 0,
        referee_micro_batch: proofmesh_provider::engine::DEFAULT_REFEREE_MICRO_BATCH,
    };
    let engine = tokio::task::spawn_blocking(move || Engine::start(&config))
        .await
        .unwrap()
        .expect("engine");
    let chat = |content: &str| {
        engine
            .tokenize_chat(&[ChatMessage {
                role: "user".into(),
                content: content.into(),
            }])
            .unwrap()
    };

    // Stream A: a long answer, running before and after the long prompt arrives.
    let (running, mut a) = job(
        chat("Write a long story about a dragon who learns to fly."),
        400,
    );
    engine.submit(running).unwrap();
    for _ in 0..8 {
        assert!(matches!(a.recv().await, Some(StepEvent::Step { .. })));
    }

    // Request B: a 2,000-token prompt (a repeated sentence), one token of answer.
    let sentence = chat("The quick brown fox jumps over the lazy dog near the river bank.");
    let long: Vec<u32> = sentence.iter().copied().cycle().take(LONG_PROMPT).collect();
    let (arriving, mut b) = job(long, 1);
    let submitted = Instant::now();
    engine.submit(arriving).unwrap();

    // Count A's tokens until B's first (which comes right after its last prefill chunk).
    let mut during_prefill = 0usize;
    let mut longest_gap = Duration::ZERO;
    let mut last = Instant::now();
    let b_first = loop {
        tokio::select! {
            event = b.recv() => match event {
                Some(StepEvent::Step { .. }) => break submitted.elapsed(),
                other => panic!("request B: {other:?}"),
            },
            event = a.recv() => match event {
                Some(StepEvent::Step { .. }) => {
                    during_prefill += 1;
                    longest_gap = longest_gap.max(last.elapsed());
                    last = Instant::now();
                }
                other => panic!("stream A ended during B's prefill: {other:?}"),
            },
        }
    };
    let chunks = LONG_PROMPT.div_ceil(CHUNK as usize);
    eprintln!(
        "prefill of {LONG_PROMPT} tokens in {chunks} chunks took {b_first:?}; stream A got \
         {during_prefill} tokens meanwhile, longest gap {longest_gap:?} (prefill time per chunk \
         {:?})",
        b_first / chunks as u32
    );
    assert!(
        during_prefill + 1 >= chunks,
        "stream A got {during_prefill} tokens during {chunks} prefill chunks: it was stalled"
    );

    // Dropping the last handle stops the engine thread and waits for it (a thread left running
    // into process exit crashed in ggml's teardown): stream A, 400 tokens long, ends unfinished.
    drop(engine);
    let mut after_stop = 0usize;
    while let Some(event) = a.recv().await {
        assert!(
            !matches!(event, StepEvent::Finished { .. }),
            "stream A ran to its end after the engine was dropped ({after_stop} more tokens)"
        );
        after_stop += 1;
    }
    assert!(
        after_stop < 50,
        "{after_stop} tokens arrived after the engine was dropped"
    );
}
