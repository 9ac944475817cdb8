//! Do a batched provider and a teacher-forced referee compute the same logits, bit for bit?
//!
//! Runs `SEQS` greedy sequences with staggered starts through one llama.cpp context (so prompt
//! chunks share batches with running decodes, as in the provider's continuous batching), then
//! re-executes each sequence teacher-forced in a fresh single-sequence context, and compares the
//! full logit vectors at every step. This is the measurement behind the engine's q8_0 KV default
//! and the audit's exact tier (see `provider/src/engine.rs`).
//!
//! `cargo run --release -p proofmesh-provider --example numerics_probe -- \
//!    KV(q8|f16) UNIFIED(0|1) PROVIDER_UBATCH REFEREE_UBATCH SEQS STEPS THREADS [REFEREE_KV] [REFEREE_THREADS]`

#![allow(
    clippy::print_stdout,
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    missing_docs
)]

use std::num::NonZeroU32;

use llama_cpp_2::context::params::{KvCacheType, LlamaContextParams};
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaModel};
use llama_cpp_2::token::LlamaToken;

const PROMPTS: &[&str] = &[
    "What is the capital of France?",
    "Write a long story about a dragon who learns to fly. Describe every step in detail, with many characters and places, and end with a moral.",
    "List ten fruits.",
    "Explain recursion to a child.",
    "Write a Python function that reverses a list.",
    "Translate 'good morning' into German and Spanish.",
    "Why is the sky blue? Answer in three sentences.",
    "Give me a recipe for pancakes.",
    "What is 17 times 23?",
    "Describe the water cycle.",
    "Write a haiku about autumn.",
    "Name three planets and one fact about each.",
    "What does a CPU do?",
    "Summarise the plot of Romeo and Juliet.",
    "How do I make a cup of tea?",
    "Tell me a joke about computers.",
];

fn kv(name: &str) -> KvCacheType {
    match name {
        "f16" => KvCacheType::F16,
        "q8" => KvCacheType::Q8_0,
        "f32" => KvCacheType::F32,
        _ => panic!("kv"),
    }
}

fn params(
    kv_type: &str,
    unified: bool,
    ubatch: u32,
    batch: u32,
    seqs: u32,
    threads: i32,
) -> LlamaContextParams {
    LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(2048 * seqs))
        .with_n_batch(batch)
        .with_n_ubatch(ubatch)
        .with_n_seq_max(seqs)
        .with_n_threads(threads)
        .with_n_threads_batch(threads)
        .with_type_k(kv(kv_type))
        .with_type_v(kv(kv_type))
        .with_kv_unified(unified)
        .with_flash_attention_policy(1)
}

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let kv_type = a.first().map_or("q8", String::as_str).to_string();
    let unified: bool = a.get(1).is_some_and(|s| s == "1");
    let p_ubatch: u32 = a.get(2).map_or(32, |s| s.parse().unwrap());
    let r_ubatch: u32 = a.get(3).map_or(32, |s| s.parse().unwrap());
    let seqs: u32 = a.get(4).map_or(4, |s| s.parse().unwrap());
    let steps: usize = a.get(5).map_or(64, |s| s.parse().unwrap());
    let threads: i32 = a.get(6).map_or(2, |s| s.parse().unwrap());
    let r_kv = a.get(7).cloned().unwrap_or_else(|| kv_type.clone());
    let r_threads: i32 = a.get(8).map_or(threads, |s| s.parse().unwrap());
    let backend = LlamaBackend::init().unwrap();
    let model = LlamaModel::load_from_file(
        &backend,
        proofmesh_provider::fetch::default_model_path(),
        &LlamaModelParams::default(),
    )
    .unwrap();
    let template = model.chat_template(None).unwrap();
    let prompts: Vec<Vec<i32>> = (0..seqs as usize)
        .map(|i| {
            let text = PROMPTS[i % PROMPTS.len()];
            let chat = vec![LlamaChatMessage::new("user".into(), text.into()).unwrap()];
            let p = model.apply_chat_template(&template, &chat, true).unwrap();
            model
                .vocab()
                .tokenize(p.as_bytes(), true, true)
                .into_iter()
                .map(|t| t.0)
                .collect()
        })
        .collect();
    let n_vocab = model.n_vocab() as usize;
    // Provider: staggered continuous batching, greedy.
    let batch_cap = 256u32;
    let mut ctx = model
        .new_context(
            &backend,
            params(&kv_type, unified, p_ubatch, batch_cap, seqs, threads),
        )
        .unwrap();
    let mut batch = LlamaBatch::new(batch_cap as usize, 1);
    let mut out: Vec<Vec<i32>> = vec![Vec::new(); seqs as usize];
    let mut logits_p: Vec<Vec<Vec<f32>>> = vec![Vec::new(); seqs as usize];
    let mut prefilled = vec![0usize; seqs as usize];
    let mut next: Vec<Option<i32>> = vec![None; seqs as usize];
    let mut iter = 0usize;
    loop {
        batch.clear();
        let mut wants: Vec<(usize, i32)> = Vec::new();
        for s in 0..seqs as usize {
            if let Some(t) = next[s].take() {
                let pos = (prompts[s].len() + out[s].len() - 1) as i32;
                batch.add(LlamaToken(t), pos, &[s as i32], true).unwrap();
                wants.push((s, batch.n_tokens() - 1));
            }
        }
        for s in 0..seqs as usize {
            // Sequence s joins at iteration 3*s.
            if iter < 3 * s || prefilled[s] == prompts[s].len() {
                continue;
            }
            let room = batch_cap as usize - batch.n_tokens() as usize;
            let take = room.min(prompts[s].len() - prefilled[s]);
            for j in prefilled[s]..prefilled[s] + take {
                let last = j + 1 == prompts[s].len();
                batch
                    .add(LlamaToken(prompts[s][j]), j as i32, &[s as i32], last)
                    .unwrap();
                if last {
                    wants.push((s, batch.n_tokens() - 1));
                }
            }
            prefilled[s] += take;
        }
        if batch.n_tokens() == 0 {
            break;
        }
        ctx.decode(&mut batch).unwrap();
        for (s, i) in wants {
            let l = ctx.get_logits_ith(i)[..n_vocab].to_vec();
            let best = l
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0 as i32;
            out[s].push(best);
            logits_p[s].push(l);
            if out[s].len() < steps {
                next[s] = Some(best);
            }
        }
        iter += 1;
    }
    drop(ctx);
    // Referee: one sequence per context, teacher-forced.
    let mut exact_seqs = 0;
    let mut all_d = Vec::new();
    let mut max_abs_all = 0f32;
    let mut top1_dis = 0usize;
    let mut total = 0usize;
    for s in 0..seqs as usize {
        let mut rctx = model
            .new_context(&backend, params(&r_kv, false, r_ubatch, 4096, 1, r_threads))
            .unwrap();
        let mut toks = prompts[s].clone();
        toks.extend_from_slice(&out[s][..out[s].len() - 1]);
        let mut b = LlamaBatch::new(toks.len(), 1);
        let plen = prompts[s].len();
        for (j, &t) in toks.iter().enumerate() {
            b.add(LlamaToken(t), j as i32, &[0], j + 1 >= plen).unwrap();
        }
        rctx.decode(&mut b).unwrap();
        let mut exact = true;
        let mut max_abs = 0f32;
        for t in 0..out[s].len() {
            let l = &rctx.get_logits_ith((plen - 1 + t) as i32)[..n_vocab];
            let p = &logits_p[s][t];
            let mut d = 0f32;
            let mut diffs = Vec::new();
            for v in 0..n_vocab {
                d = d.max((l[v] - p[v]).abs());
                if l[v].to_bits() != p[v].to_bits() {
                    exact = false;
                }
                diffs.push(f64::from(p[v] - l[v]));
            }
            // centred RMS over top-32 of provider
            let mut idx: Vec<usize> = (0..n_vocab).collect();
            idx.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
            let top: Vec<f64> = idx[..32].iter().map(|&i| diffs[i]).collect();
            let mean = top.iter().sum::<f64>() / 32.0;
            let rms = (top.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 32.0).sqrt();
            all_d.push(rms);
            let rbest = (0..n_vocab).max_by(|&a, &b| l[a].total_cmp(&l[b])).unwrap();
            if rbest as i32 != out[s][t] {
                top1_dis += 1;
            }
            total += 1;
            max_abs = max_abs.max(d);
        }
        max_abs_all = max_abs_all.max(max_abs);
        if exact {
            exact_seqs += 1;
        }
        println!(
            "seq {s}: prompt {plen}, steps {}, exact {exact}, max|dlogit| {max_abs:.4}",
            out[s].len()
        );
    }
    all_d.sort_by(f64::total_cmp);
    println!(
        "kv {kv_type} unified {unified} p_ubatch {p_ubatch} r_ubatch {r_ubatch} r_kv {r_kv} seqs {seqs} threads {threads}/{r_threads}: exact seqs {exact_seqs}/{seqs}, max|d| {max_abs_all:.4}, D p50 {:.4} p99 {:.4} max {:.4}, top1 disagree {top1_dis}/{total}",
        all_d[all_d.len() / 2],
        all_d[all_d.len() * 99 / 100],
        all_d[all_d.len() - 1]
    );
}
