//! In-process engine throughput under concurrent load: no mesh, no HTTP, no gateway. The floor
//! under `bench/serve.py`, which runs it in the same rounds as llama-server and proofmesh so the
//! cost of the gateway and the libp2p hop shows up as a separate row.
//!
//! `cargo run --release -p proofmesh-provider --example engine_load -- MODEL THREADS CONCURRENCY TOKENS REQUESTS [KV]`
//!
//! KV is the KV cache type, `q8_0` (the provider's default) or `f16`.
//!
//! Runs REQUESTS greedy requests (the prompts of bench/serve.py, in turn) with CONCURRENCY in
//! flight on `max(4, CONCURRENCY)` slots of 1024 tokens and prints one JSON line: generated
//! tokens, wall seconds, aggregate tokens/s, and TTFT/latency per request in milliseconds.

#![allow(
    clippy::print_stdout,
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic
)]

use std::sync::Arc;
use std::time::Instant;

use proofmesh_provider::engine::{Engine, EngineConfig, Job, StepEvent};
use proofmesh_shared::protocol::{ChatMessage, RequestId};
use proofmesh_shared::sampling::SamplerParams;

const PROMPTS: [&str; 8] = [
    "Write a long story about a dragon who learns to fly.",
    "Explain how a bicycle works, step by step.",
    "List twenty fruits and say one thing about each.",
    "Write a Python function that sorts a list, and explain it.",
    "Describe a day in the life of a lighthouse keeper.",
    "What are the planets of the solar system? Describe each one.",
    "Write a letter to a friend about your holiday by the sea.",
    "Explain what a computer network is to a child.",
];

#[tokio::main]
async fn main() {
    // RUST_LOG=proofmesh_provider=debug shows where the engine thread's time goes.
    let _telemetry =
        proofmesh_shared::telemetry::init(&proofmesh_shared::telemetry::TelemetryConfig {
            service_name: "engine_load",
            default_filter: "warn",
            log_format: proofmesh_shared::telemetry::LogFormat::Text,
            otlp_endpoint: None,
            otlp_headers: Vec::new(),
        })
        .expect("logging");
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: u32| args.get(i).map_or(default, |a| a.parse().expect("number"));
    let model = args
        .first()
        .map_or_else(proofmesh_provider::fetch::default_model_path, Into::into);
    let (threads, concurrency, tokens, requests) = (arg(1, 2), arg(2, 4), arg(3, 128), arg(4, 8));
    let config = EngineConfig {
        model_path: model,
        threads,
        context_size: 1024,
        parallel: concurrency.max(4),
        batch_size: 512,
        gpu_layers: 0,
        kv_cache: args
            .get(5)
            .map_or_else(Default::default, |kv| kv.parse().expect("q8_0 or f16")),
        referee_slots: 0,
        referee_micro_batch: proofmesh_provider::engine::DEFAULT_REFEREE_MICRO_BATCH,
    };
    let engine = tokio::task::spawn_blocking(move || Engine::start(&config))
        .await
        .unwrap()
        .expect("engine");
    let engine = Arc::new(engine);
    let gate = Arc::new(tokio::sync::Semaphore::new(concurrency as usize));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..requests as usize {
        let engine = Arc::clone(&engine);
        let permit = Arc::clone(&gate).acquire_owned().await.unwrap();
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let prompt = engine
                .tokenize_chat(&[ChatMessage {
                    role: "user".into(),
                    content: PROMPTS[i % PROMPTS.len()].into(),
                }])
                .expect("prompt");
            let (events, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let begun = Instant::now();
            engine
                .submit(Job {
                    request_id: RequestId::random(),
                    prompt,
                    sampler: SamplerParams {
                        temperature: 0.0,
                        ..Default::default()
                    },
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
                        first.get_or_insert_with(|| begun.elapsed());
                    }
                    StepEvent::Finished { .. } => break,
                    StepEvent::Failed { message } => panic!("{message}"),
                }
            }
            let ttft = first.expect("a step").as_secs_f64() * 1000.0;
            (n, ttft, begun.elapsed().as_secs_f64() * 1000.0)
        }));
    }
    let mut generated = 0u32;
    let (mut ttft, mut latency) = (Vec::new(), Vec::new());
    for task in tasks {
        let (n, t, l) = task.await.unwrap();
        generated += n;
        ttft.push(t);
        latency.push(l);
    }
    let wall = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "generated": generated,
            "wall_s": wall,
            "tok_s": f64::from(generated) / wall,
            "ttft_ms": ttft,
            "latency_ms": latency,
        })
    );
}
