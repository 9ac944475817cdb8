//! In-process engine speed, no mesh and no HTTP: the floor under `bench/single_stream.py`.
//!
//! `cargo run --release -p proofmesh-provider --example engine_decode -- [MODEL] [THREADS] [TOKENS] [RUNS]`

#![allow(
    clippy::print_stdout,
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic
)]

use std::time::Instant;

use proofmesh_provider::engine::{Engine, EngineConfig, Job, StepEvent};
use proofmesh_shared::protocol::{ChatMessage, RequestId};
use proofmesh_shared::sampling::SamplerParams;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let model = args
        .next()
        .map_or_else(proofmesh_provider::fetch::default_model_path, Into::into);
    let threads: u32 = args.next().map_or(2, |t| t.parse().expect("threads"));
    let tokens: u32 = args.next().map_or(128, |t| t.parse().expect("tokens"));
    let runs: usize = args.next().map_or(5, |t| t.parse().expect("runs"));
    let config = EngineConfig {
        model_path: model,
        threads,
        context_size: 2048,
        parallel: 1,
        batch_size: 512,
        gpu_layers: 0,
        kv_cache: Default::default(),
        referee_slots: 0,
        referee_micro_batch: proofmesh_provider::engine::DEFAULT_REFEREE_MICRO_BATCH,
    };
    let engine = tokio::task::spawn_blocking(move || Engine::start(&config))
        .await
        .unwrap()
        .expect("engine");
    let prompt = engine
        .tokenize_chat(&[ChatMessage {
            role: "user".into(),
            content: "Write a long story about a dragon who learns to fly. Describe every step in detail.".into(),
        }])
        .expect("prompt");
    for run in 0..=runs {
        let (events, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let sampler = SamplerParams {
            temperature: 0.0,
            ..Default::default()
        };
        let started = Instant::now();
        engine
            .submit(Job {
                request_id: RequestId::random(),
                prompt: prompt.clone(),
                sampler,
                max_tokens: tokens,
                events,
                guide: None,
            })
            .expect("submit");
        let (mut first, mut n) = (None, 0u32);
        while let Some(event) = rx.recv().await {
            match event {
                StepEvent::Step { .. } => {
                    n += 1;
                    first.get_or_insert_with(Instant::now);
                }
                StepEvent::Finished { .. } => break,
                StepEvent::Failed { message } => panic!("{message}"),
            }
        }
        let first = first.expect("at least one step");
        let decode = f64::from(n - 1) / first.elapsed().as_secs_f64();
        if run > 0 {
            println!(
                "run {run}: prompt {} tokens, ttft {:.0} ms, {n} tokens, decode {decode:.1} tok/s",
                prompt.len(),
                (first - started).as_secs_f64() * 1000.0
            );
        }
    }
}
