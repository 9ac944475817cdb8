//! The audit rule's calibration harness.
//!
//! Generates many honest answers with real providers' engines (55 prompts from
//! `bench/calibration_prompts.json`: chat, code, lists, long stories, other languages; greedy and
//! three sampling settings; 8 to 512 tokens; 1, 4 and 16 parallel sequences; 1 and 2 threads;
//! q8_0 and f16 KV caches), re-executes each with referees (q8_0 and f16 KV, micro-batches of 32
//! and 512 tokens, on both sides of llama.cpp's 64-row kernel switch), and measures the audit
//! rule of `proofmesh_shared::verify` on them: the honest distribution of every statistic, the
//! false-positive rate per request and per step, and then the detection rate of each cheat
//! (cheaper quantizations, one requantized tensor, perturbed weights, made-up tokens, copied
//! logits, replays, and the exact-layer forgeries) per request, against the number of
//! challenged steps and the answer length. It prints Markdown tables (and writes them to
//! `--out`, by default `bench/calibration.md`).
//!
//! Audits are simulated exactly as the gateway runs them (16 challenged steps with the last
//! always among them, a second round of 16 when borderline) through the same
//! `proofmesh_shared::verify::rule` code, several random challenges per answer.
//!
//! ```sh
//! cargo run --release -p proofmesh-provider --example calibrate            # full, ~1.5 h on 2 cores
//! cargo run --release -p proofmesh-provider --example calibrate -- --quick # smoke run, minutes
//! ```

#![allow(
    clippy::print_stdout,
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    missing_docs
)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use proofmesh_provider::engine::{Engine, EngineConfig, Job, KvCache, Reexecuted, StepEvent};
use proofmesh_provider::variants::Variant;
use proofmesh_shared::commit::StepLeaf;
use proofmesh_shared::protocol::{ChatMessage, FinishReason, RequestId};
use proofmesh_shared::sampling::{self, SamplerParams};
use proofmesh_shared::verify::rule::{self, Tier};
use proofmesh_shared::verify::{Judgement, judge_distances};

/// Challenge counts on the detection curve.
const KS: [usize; 6] = [1, 2, 4, 8, 16, 32];
/// Answer lengths (max_tokens buckets).
const LENGTHS: [u32; 4] = [8, 32, 128, 512];
/// Random challenges simulated per answer.
const DRAWS: usize = 8;

#[derive(Clone)]
struct Request {
    prompt: String,
    category: String,
    sampler: SamplerParams,
    max_tokens: u32,
}

/// One generated answer.
struct Answer {
    request: Request,
    prompt: Vec<u32>,
    leaves: Vec<StepLeaf>,
    finish: FinishReason,
}

/// An answer scored against one referee: what the audit rule needs, kept raw so the report can be
/// recomputed from a dump (`--from`) when the rule changes.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct Scored {
    max_tokens: u32,
    distances: Vec<f32>,
    margins: Vec<f32>,
}

/// One scored answer with what it belongs to.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct Record {
    /// `honest`, or the cheat's name.
    group: String,
    provider: String,
    referee: String,
    tier: Tier,
    scored: Scored,
}

/// Everything the measurement phase produced.
#[derive(Default, serde::Serialize, serde::Deserialize)]
struct Dump {
    quick: bool,
    minutes: f64,
    prompts: usize,
    samplers: usize,
    generated: usize,
    exact_failures: usize,
    lengths: BTreeMap<u32, (usize, usize)>,
    categories: BTreeMap<String, usize>,
    records: Vec<Record>,
    exact: BTreeMap<String, (usize, usize, String)>,
}

/// Aggregates for one honest (provider, referee) pair or one cheat.
#[derive(Default)]
struct Tally {
    requests: usize,
    steps: usize,
    step_distances: Vec<f32>,
    request_medians: Vec<f32>,
    request_max_distance: Vec<f32>,
    excess_margins: Vec<f32>,
    max_margins: Vec<f32>,
    audits: usize,
    failed_audits: usize,
    steps_over_limit: usize,
    /// (k, length) -> (audits, caught)
    detection: BTreeMap<(usize, u32), (usize, usize)>,
}

fn percentile(sorted: &[f32], p: f64) -> f32 {
    if sorted.is_empty() {
        return f32::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn sorted(mut v: Vec<f32>) -> Vec<f32> {
    v.sort_by(f32::total_cmp);
    v
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The steps a gateway challenges: all when few, else the last plus random ones.
fn challenge(n: usize, k: usize, rng: &mut Rng, already: &[usize]) -> Vec<usize> {
    let target = (already.len() + k).min(n);
    let mut chosen: Vec<usize> = already.to_vec();
    if target == n {
        return (0..n).collect();
    }
    if !chosen.contains(&(n - 1)) {
        chosen.push(n - 1);
    }
    while chosen.len() < target {
        let i = rng.below(n);
        if !chosen.contains(&i) {
            chosen.push(i);
        }
    }
    chosen
}

/// Simulates one gateway audit with `k` challenged steps (plus a second round when borderline).
fn audit(s: &Scored, tier: Tier, k: usize, rng: &mut Rng) -> Judgement {
    let n = s.distances.len();
    let first = challenge(n, k, rng, &[]);
    let judged = judge_distances(
        first.iter().map(|&i| s.distances[i]).collect(),
        &s.margins,
        tier,
    );
    if let Judgement::Borderline(_) = judged {
        let wider = challenge(n, 16, rng, &first);
        return judge_distances(
            wider.iter().map(|&i| s.distances[i]).collect(),
            &s.margins,
            tier,
        );
    }
    judged
}

fn bucket(max_tokens: u32) -> u32 {
    LENGTHS
        .iter()
        .copied()
        .find(|&l| max_tokens <= l)
        .unwrap_or(512)
}

impl Tally {
    fn add(&mut self, s: &Scored, tier: Tier, rng: &mut Rng, honest: bool) {
        if s.distances.is_empty() {
            return;
        }
        let limits = tier.thresholds();
        self.requests += 1;
        self.steps += s.distances.len();
        self.step_distances.extend_from_slice(&s.distances);
        self.steps_over_limit += s
            .distances
            .iter()
            .filter(|&&d| d > limits.step_distance)
            .count();
        let stats = judge_distances(
            challenge(s.distances.len(), 16, rng, &[])
                .iter()
                .map(|&i| s.distances[i])
                .collect(),
            &s.margins,
            tier,
        )
        .statistics()
        .clone();
        if !honest {
            self.request_medians.push(stats.median_distance);
        }
        self.request_max_distance
            .push(s.distances.iter().copied().fold(0.0, f32::max));
        self.excess_margins.push(stats.excess_margin);
        self.max_margins.push(stats.max_margin);
        if honest {
            for _ in 0..DRAWS {
                self.audits += 1;
                let judged = audit(s, tier, 16, rng);
                // Every simulated audit's median counts: the largest honest value is the
                // largest any audit saw, not one draw's.
                self.request_medians
                    .push(judged.statistics().median_distance);
                if let Judgement::Fail(..) = judged {
                    self.failed_audits += 1;
                }
            }
        } else {
            for k in KS {
                for _ in 0..DRAWS {
                    let caught = matches!(audit(s, tier, k, rng), Judgement::Fail(..));
                    let entry = self.detection.entry((k, bucket(s.max_tokens))).or_default();
                    entry.0 += 1;
                    entry.1 += usize::from(caught);
                }
            }
        }
    }
}

fn load_prompts(quick: bool) -> Vec<(String, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/calibration_prompts.json");
    let text = std::fs::read_to_string(&path).expect("bench/calibration_prompts.json");
    let json: serde_json::Value = serde_json::from_str(&text).expect("prompts json");
    let mut prompts = Vec::new();
    for (category, list) in json.as_object().expect("object") {
        for p in list.as_array().expect("array") {
            prompts.push((category.clone(), p.as_str().expect("string").to_string()));
        }
    }
    if quick {
        prompts = prompts.into_iter().step_by(7).collect();
    }
    prompts
}

fn samplers() -> Vec<SamplerParams> {
    vec![
        SamplerParams {
            temperature: 0.0,
            ..Default::default()
        },
        SamplerParams {
            temperature: 0.7,
            top_p: 0.9,
            ..Default::default()
        },
        SamplerParams {
            temperature: 1.0,
            min_p: 0.05,
            ..Default::default()
        },
        SamplerParams {
            temperature: 1.0,
            top_k: 40,
            ..Default::default()
        },
    ]
}

fn requests(prompts: &[(String, String)], samplers: &[SamplerParams], salt: u64) -> Vec<Request> {
    let mut out = Vec::new();
    for (i, (category, prompt)) in prompts.iter().enumerate() {
        for (j, sampler) in samplers.iter().enumerate() {
            let mut sampler = *sampler;
            sampler.seed = salt * 1_000_003 + (i * 31 + j) as u64;
            out.push(Request {
                prompt: prompt.clone(),
                category: category.clone(),
                sampler,
                max_tokens: LENGTHS[(i + j + salt as usize) % LENGTHS.len()],
            });
        }
    }
    out
}

fn engine(model: &Path, kv: KvCache, parallel: u32, threads: u32, referee: Option<u32>) -> Engine {
    let mut config = EngineConfig::new(model.to_path_buf());
    config.kv_cache = kv;
    config.parallel = parallel;
    config.threads = threads;
    config.context_size = 1024;
    config.batch_size = 256;
    config.referee_slots = u32::from(referee.is_some()) * 2;
    if let Some(micro) = referee {
        config.referee_micro_batch = micro;
    }
    Engine::start(&config).expect("engine")
}

/// Generates `requests` on `engine`, `parallel` at a time (real continuous batching).
async fn generate(engine: &Engine, requests: &[Request], parallel: usize) -> Vec<Answer> {
    let semaphore = Arc::new(tokio::sync::Semaphore::new(parallel));
    let mut tasks = Vec::new();
    for request in requests.iter().cloned() {
        let engine = engine.clone();
        let permit = Arc::clone(&semaphore).acquire_owned().await.unwrap();
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let prompt = engine
                .tokenize_chat(&[ChatMessage {
                    role: "user".into(),
                    content: request.prompt.clone(),
                }])
                .expect("prompt");
            let (events, mut rx) = tokio::sync::mpsc::unbounded_channel();
            engine
                .submit(Job {
                    request_id: RequestId::random(),
                    prompt: prompt.clone(),
                    sampler: request.sampler,
                    max_tokens: request.max_tokens,
                    events,
                    guide: None,
                })
                .expect("submit");
            let mut leaves = Vec::new();
            let finish = loop {
                match rx.recv().await.expect("engine") {
                    StepEvent::Step { leaf, .. } => leaves.push(leaf),
                    StepEvent::Finished { reason } => break reason,
                    StepEvent::Failed { message } => panic!("{message}"),
                }
            };
            Answer {
                request,
                prompt,
                leaves,
                finish,
            }
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// Re-executes `tokens` for `answer`'s request on `referee`.
async fn reexecute(referee: &Engine, answer: &Answer, tokens: &[u32]) -> Reexecuted {
    let prompt = referee
        .tokenize_chat(&[ChatMessage {
            role: "user".into(),
            content: answer.request.prompt.clone(),
        }])
        .expect("prompt");
    loop {
        match referee.reexecute(
            prompt.clone(),
            answer.request.sampler,
            answer.request.max_tokens,
        ) {
            Ok(run) => {
                run.push(tokens.to_vec()).expect("push");
                return run.finish().await.expect("re-execution");
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
        }
    }
}

/// Scores `leaves` (the provider's claim) against `referee`'s re-execution of their tokens.
async fn score(referee: &Engine, answer: &Answer, leaves: &[StepLeaf]) -> Scored {
    let tokens: Vec<u32> = leaves.iter().map(|l| l.token).collect();
    let run = reexecute(referee, answer, &tokens).await;
    let distances = leaves
        .iter()
        .zip(&run.steps)
        .map(|(leaf, step)| rule::step_distance(leaf, step))
        .collect();
    Scored {
        max_tokens: answer.request.max_tokens,
        distances,
        margins: run.margins,
    }
}

/// Each answer's own leaves, indexed for [`score_all`]: the answers scored as they were generated.
fn as_claimed(answers: &[Answer]) -> Vec<(usize, Vec<StepLeaf>)> {
    answers
        .iter()
        .enumerate()
        .map(|(i, a)| (i, a.leaves.clone()))
        .collect()
}

/// Scores many answers, two re-executions at a time.
async fn score_all(
    referee: &Engine,
    answers: &[(usize, Vec<StepLeaf>)],
    base: &[Answer],
) -> Vec<Scored> {
    let mut out = Vec::new();
    for pair in answers.chunks(2) {
        let futures: Vec<_> = pair
            .iter()
            .map(|(i, leaves)| score(referee, &base[*i], leaves))
            .collect();
        out.extend(futures::future::join_all(futures).await);
    }
    out
}

/// Exact-layer checks an honest answer must pass (sampler replay, draws, finish).
fn exact_layer_ok(engine: &Engine, answer: &Answer) -> bool {
    let replay = answer.leaves.iter().all(|leaf| {
        leaf.draw == sampling::draw(answer.request.sampler.seed, leaf.step)
            && sampling::sample(&leaf.top, &answer.request.sampler, leaf.draw) == Some(leaf.token)
    });
    let finish = match answer.finish {
        FinishReason::Length => answer.leaves.len() == answer.request.max_tokens as usize,
        FinishReason::Stop => answer.leaves.last().is_some_and(|l| engine.is_eog(l.token)),
    };
    replay && finish
}

/// Forgeries the exact layer catches, built from honest answers and run through the same checks
/// the gateway runs (the referee's evidence comes from a real referee job): (answers, caught,
/// failure seen).
async fn exact_forgeries(
    base: &[Answer],
    referee_engine: &Engine,
    other_model: &Engine,
    digest: proofmesh_shared::protocol::ModelDigest,
) -> BTreeMap<String, (usize, usize, String)> {
    use proofmesh_shared::commit::{Commitment, LeafTree, output_hash, prompt_hash};
    use proofmesh_shared::protocol::{GenerateRequest, OpenLeavesResponse};
    use proofmesh_shared::verify::{
        AuditFailure, Challenge, check_commitment, check_evidence, check_openings,
    };
    let key = libp2p::identity::Keypair::generate_secp256k1();
    let stranger = libp2p::identity::Keypair::generate_secp256k1();
    let referee_key = libp2p::identity::Keypair::generate_secp256k1();
    let peer = key.public().to_peer_id();
    let referee = proofmesh_provider::referee::Referee::new(
        referee_engine.clone(),
        referee_key.clone(),
        digest,
        u32::MAX,
    );
    let mut out: BTreeMap<String, (usize, usize, String)> = BTreeMap::new();
    let mut count = |name: &'static str, caught: Option<AuditFailure>| {
        let e = out.entry(name.to_string()).or_insert((0, 0, String::new()));
        e.0 += 1;
        if let Some(f) = caught {
            e.1 += 1;
            e.2 = f.to_string();
        }
    };
    for a in base.iter().filter(|a| a.leaves.len() >= 6) {
        let request = |max_tokens: u32| GenerateRequest {
            version: GenerateRequest::VERSION,
            request_id: RequestId::random(),
            model_digest: digest,
            messages: vec![ChatMessage {
                role: "user".into(),
                content: a.request.prompt.clone(),
            }],
            sampler: a.request.sampler,
            max_tokens,
            stop: vec![],
            trace: None,
            stream_leaves: false,
            tools: None,
            constraint: None,
            prompt: None,
        };
        let commit =
            |request: &GenerateRequest, leaves: &[StepLeaf], prompt: &[u32], finish, signer| {
                let tokens: Vec<u32> = leaves.iter().map(|l| l.token).collect();
                let tree = LeafTree::build(leaves);
                let signed = Commitment {
                    version: Commitment::VERSION,
                    request_id: request.request_id,
                    request_hash: request.hash(),
                    model_digest: request.model_digest,
                    prompt_tokens: prompt.len() as u32,
                    prompt_hash: prompt_hash(prompt),
                    steps: leaves.len() as u32,
                    merkle_root: tree.root(),
                    output_hash: output_hash(&tokens),
                    finish_reason: finish,
                    numerics: referee_engine.info().numerics.clone(),
                }
                .sign(signer)
                .unwrap();
                (signed, tree, tokens)
            };
        // Audited by a real referee job: the evidence, then the exact checks on it.
        let refereed = |request: GenerateRequest,
                        signed: proofmesh_shared::commit::SignedCommitment,
                        tokens: Vec<u32>| {
            let referee = referee.clone();
            async move {
                let mut job = referee.begin(request.clone(), peer).expect("referee job");
                job.push(0, &tokens).expect("push");
                let indices: Vec<u32> = (0..tokens.len() as u32).collect();
                let evidence = job.finish(&indices).await.expect("evidence");
                check_evidence(
                    &evidence,
                    &referee.peer_id(),
                    &signed,
                    &request,
                    &tokens,
                    &Challenge { indices },
                )
                .expect("usable evidence")
                .err()
            }
        };
        let full = request(a.request.max_tokens);
        let (honest, tree, tokens) = commit(&full, &a.leaves, &a.prompt, a.finish, &key);
        assert!(check_commitment(&honest, &full, &peer, &tokens).is_ok());
        // Tokens changed after committing.
        let mut changed = tokens.clone();
        changed[2] ^= 1;
        count(
            "tokens changed after committing",
            check_commitment(&honest, &full, &peer, &changed).err(),
        );
        // Signed with another key.
        let (foreign, _, _) = commit(&full, &a.leaves, &a.prompt, a.finish, &stranger);
        count(
            "signed with another key",
            check_commitment(&foreign, &full, &peer, &tokens).err(),
        );
        // An opened leaf that is not the committed one.
        let challenge = Challenge::derive(&[3; 32], &honest, 16);
        let idx: Vec<usize> = challenge.indices.iter().map(|&i| i as usize).collect();
        let mut leaves: Vec<StepLeaf> = idx.iter().map(|&i| a.leaves[i].clone()).collect();
        leaves[0].top[0].logit += 0.25;
        let opening = OpenLeavesResponse::Opened {
            leaves,
            proof: tree.prove(&idx),
        };
        count(
            "opened leaf differs from the committed one",
            check_openings(&honest, &full, &tokens, &challenge, &opening).err(),
        );
        // Truncation: stop after four tokens, claiming the model ended there.
        if !referee_engine.is_eog(tokens[3]) {
            let short = request(a.request.max_tokens);
            let (signed, _, short_tokens) =
                commit(&short, &a.leaves[..4], &a.prompt, FinishReason::Stop, &key);
            count(
                "truncated, claiming a natural end",
                refereed(short, signed, short_tokens).await,
            );
        }
        // Another model (another tokenizer): it commits the prompt it really ran.
        let theirs = other_model
            .tokenize_chat(&full.messages)
            .expect("other model's prompt");
        let eight = request(8);
        let (signed, _, eight_tokens) = commit(
            &eight,
            &a.leaves[..a.leaves.len().min(8)],
            &theirs,
            FinishReason::Length,
            &key,
        );
        if eight_tokens.len() == 8 {
            count(
                "another model (Gemma-3-270M)",
                refereed(eight, signed, eight_tokens).await,
            );
        }
    }
    out
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map(PathBuf::from)
    };
    let quick = args.iter().any(|a| a == "--quick");
    let bench = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench");
    let out = flag("--out").unwrap_or_else(|| bench.join("calibration.md"));
    let dump_path = flag("--dump").unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/calibration-dump.json")
    });
    let dump = match flag("--from") {
        Some(path) => {
            let text = std::fs::read_to_string(&path).expect("reading the dump");
            serde_json::from_str(&text).expect("parsing the dump")
        }
        None => {
            let dump = measure(quick).await;
            if let Some(dir) = dump_path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            std::fs::write(&dump_path, serde_json::to_vec(&dump).expect("json")).expect("dump");
            eprintln!("raw measurements written to {}", dump_path.display());
            dump
        }
    };
    let markdown = report(&dump);
    print!("{markdown}");
    std::fs::write(&out, &markdown).expect("writing the report");
    eprintln!("report written to {}", out.display());
}

/// Runs every engine and referee; returns the raw measurements.
async fn measure(quick: bool) -> Dump {
    let started = Instant::now();
    let model = proofmesh_provider::fetch::default_model_path();
    assert!(
        model.is_file(),
        "run `proofmesh-provider fetch-model` first"
    );
    let attack_dir = proofmesh_provider::fetch::default_model_dir().join("attack");
    let variants = proofmesh_provider::variants::ensure_all(&model, &attack_dir).expect("variants");
    let prompts = load_prompts(quick);
    let samplers = samplers();
    let mut rng = Rng(0x5EED_CAFE_F00D_1234);
    let mut dump = Dump {
        quick,
        prompts: prompts.len(),
        samplers: samplers.len(),
        ..Default::default()
    };
    let elapsed = || started.elapsed().as_secs_f64();

    eprintln!("loading referees ...");
    let det32 = engine(&model, KvCache::Q8_0, 1, 2, Some(32));
    let det512 = engine(&model, KvCache::Q8_0, 1, 2, Some(512));
    let f16_512 = engine(&model, KvCache::F16, 1, 2, Some(512));
    let referees: [(&str, &Engine); 3] = [
        ("q8_0 KV, micro-batch 32", &det32),
        ("q8_0 KV, micro-batch 512", &det512),
        ("f16 KV, micro-batch 512", &f16_512),
    ];
    // Honest providers: (label, kv, parallel, threads, referees used).
    let providers: Vec<(&str, KvCache, u32, u32, Vec<usize>)> = if quick {
        vec![
            ("q8_0 KV, 4 seq, 2 thr", KvCache::Q8_0, 4, 2, vec![0, 1, 2]),
            ("f16 KV, 4 seq, 2 thr", KvCache::F16, 4, 2, vec![0, 2]),
        ]
    } else {
        // Every (provider, referee) pair covers a distinct mix: 1/4/16 sequences, 1/2 threads,
        // q8_0/f16 KV on both sides, referee micro-batches below and above 64 tokens.
        vec![
            ("q8_0 KV, 1 seq, 2 thr", KvCache::Q8_0, 1, 2, vec![0, 2]),
            ("q8_0 KV, 4 seq, 2 thr", KvCache::Q8_0, 4, 2, vec![1, 2]),
            ("q8_0 KV, 16 seq, 1 thr", KvCache::Q8_0, 16, 1, vec![0, 1]),
            ("f16 KV, 4 seq, 1 thr", KvCache::F16, 4, 1, vec![0, 2]),
            ("f16 KV, 16 seq, 2 thr", KvCache::F16, 16, 2, vec![1, 2]),
        ]
    };
    let mut base_answers: Vec<Answer> = Vec::new();
    for (p, (label, kv, parallel, threads, used)) in providers.iter().enumerate() {
        eprintln!("[{:>5.0}s] honest provider {label} ...", elapsed());
        let provider = engine(&model, *kv, *parallel, *threads, None);
        let reqs = requests(&prompts, &samplers, p as u64);
        let answers = generate(&provider, &reqs, *parallel as usize).await;
        dump.generated += answers.len();
        for a in &answers {
            if !exact_layer_ok(&provider, a) {
                dump.exact_failures += 1;
            }
            let e = dump.lengths.entry(a.request.max_tokens).or_default();
            e.0 += 1;
            e.1 += a.leaves.len();
            *dump
                .categories
                .entry(a.request.category.clone())
                .or_default() += 1;
        }
        let provider_numerics = provider.info().numerics.clone();
        drop(provider);
        let indexed = as_claimed(&answers);
        for &r in used {
            let (rlabel, referee) = referees[r];
            let tier = Tier::between(&provider_numerics, &referee.info().numerics);
            eprintln!(
                "[{:>5.0}s]   referee {rlabel} ({})",
                elapsed(),
                tier.as_str()
            );
            for scored in score_all(referee, &indexed, &answers).await {
                dump.records.push(Record {
                    group: "honest".into(),
                    provider: label.to_string(),
                    referee: rlabel.to_string(),
                    tier,
                    scored,
                });
            }
        }
        if base_answers.is_empty() && *kv == KvCache::Q8_0 {
            base_answers = answers;
        }
    }

    // Cheats serving other weights. Each cheat runs with the deterministic q8_0 KV cache, its
    // best case: nothing but the weights differs from an honest provider. Its answers are judged
    // in the exact tier (the cheat claims deterministic numerics) and in the tolerant tier (it
    // claims f16 or GPU numerics, so the referee must allow for noise), against the q8_0 referee
    // and against the f16 one.
    eprintln!("[{:>5.0}s] cheats ...", elapsed());
    let cheat_reqs = requests(&prompts, &samplers[..2], 7);
    for (variant, path) in &variants {
        let cheat = engine(path, KvCache::Q8_0, 4, 2, None);
        let answers = generate(&cheat, &cheat_reqs, 4).await;
        drop(cheat);
        let indexed = as_claimed(&answers);
        let judges = [
            (referees[0].0, &det32, &[Tier::Exact, Tier::Tolerant][..]),
            (referees[2].0, &f16_512, &[Tier::Tolerant][..]),
        ];
        for (rlabel, referee, tiers) in judges {
            eprintln!("[{:>5.0}s]   {} ({rlabel})", elapsed(), variant.name());
            let scored = score_all(referee, &indexed, &answers).await;
            for &tier in tiers {
                for s in &scored {
                    dump.records.push(Record {
                        group: variant.name().into(),
                        provider: "q8_0 KV".into(),
                        referee: rlabel.to_string(),
                        tier,
                        scored: s.clone(),
                    });
                }
            }
        }
    }

    // Forgeries built from honest answers of the first q8_0 provider, judged in both tiers (in
    // the tolerant one the cheat claims f16 numerics but copies exact logits: its best case).
    let base = &base_answers;
    let n_vocab = det32.info().n_vocab;
    let q2k = &variants.iter().find(|(v, _)| *v == Variant::Q2K).unwrap().1;
    let cheap = engine(q2k, KvCache::Q8_0, 4, 2, None);
    let base_reqs: Vec<Request> = base.iter().map(|a| a.request.clone()).collect();
    let cheap_answers = generate(&cheap, &base_reqs, 4).await;
    drop(cheap);
    eprintln!("[{:>5.0}s] forgeries ...", elapsed());
    let made_up: Vec<(usize, Vec<StepLeaf>)> = base
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let leaves = a
                .leaves
                .iter()
                .map(|l| {
                    let token = 256 + (rng.next() % u64::from(n_vocab - 256)) as u32;
                    proofmesh_provider::tamper::fabricated_leaf(l.step, token, l.draw)
                })
                .collect();
            (i, leaves)
        })
        .collect();
    // Replay: the answer to the next prompt (not the same prompt with another sampler).
    let stride = samplers.len();
    let replayed: Vec<(usize, Vec<StepLeaf>)> = (0..base.len())
        .map(|i| {
            let source = &base[(i + stride) % base.len()];
            let target = &base[i];
            let leaves = source
                .leaves
                .iter()
                .take(target.request.max_tokens as usize)
                .map(|l| StepLeaf {
                    draw: sampling::draw(target.request.sampler.seed, l.step),
                    ..l.clone()
                })
                .collect();
            (i, leaves)
        })
        .filter(|(_, leaves): &(usize, Vec<StepLeaf>)| !leaves.is_empty())
        .collect();
    // Copied logits: the claimed model's logits over a cheaper model's tokens, patched so the
    // sampler replays. Only answers where the cheap tokens differ are cheats.
    let mut copied = Vec::new();
    for (i, cheap_answer) in cheap_answers.iter().enumerate() {
        let tokens: Vec<u32> = cheap_answer.leaves.iter().map(|l| l.token).collect();
        let honest_tokens: Vec<u32> = base[i].leaves.iter().map(|l| l.token).collect();
        if tokens == honest_tokens || tokens.is_empty() {
            continue;
        }
        let real = reexecute(&det32, &base[i], &tokens).await;
        let leaves: Vec<StepLeaf> = cheap_answer
            .leaves
            .iter()
            .zip(real.steps)
            .map(|(l, r)| StepLeaf {
                step: l.step,
                token: l.token,
                draw: l.draw,
                logsumexp: r.logsumexp,
                top: proofmesh_provider::tamper::patched(
                    r.top,
                    l.token,
                    r.claimed_logit,
                    &base[i].request.sampler,
                    l.draw,
                ),
            })
            .collect();
        copied.push((i, leaves));
    }
    for (name, forged) in [
        ("made-up tokens", &made_up),
        ("replayed answer", &replayed),
        ("copied logits over Q2_K tokens", &copied),
    ] {
        let scored = score_all(&det32, forged, base).await;
        for tier in [Tier::Exact, Tier::Tolerant] {
            for s in &scored {
                dump.records.push(Record {
                    group: name.into(),
                    provider: "q8_0 KV".into(),
                    referee: referees[0].0.into(),
                    tier,
                    scored: s.clone(),
                });
            }
        }
    }

    // Exact-layer forgeries over the honest base answers, through the shared exact checks.
    eprintln!("[{:>5.0}s] exact-layer forgeries ...", elapsed());
    let gemma = proofmesh_provider::fetch::fetch_model(
        &proofmesh_provider::fetch::GEMMA3_270M,
        &proofmesh_provider::fetch::default_model_dir(),
        None,
    )
    .await
    .expect("Gemma-3-270M");
    let gemma = engine(&gemma, KvCache::Q8_0, 1, 2, None);
    let digest = proofmesh_provider::model_file::file_digest(&model).expect("digest");
    dump.exact = exact_forgeries(base, &det32, &gemma, digest).await;
    dump.minutes = elapsed() / 60.0;
    dump
}

/// The Markdown report of a dump, under the rule as it is in the code now.
fn report(dump: &Dump) -> String {
    let mut rng = Rng(0x5EED_CAFE_F00D_1234);
    let mut honest: BTreeMap<(String, String, Tier), Tally> = BTreeMap::new();
    let mut cheats: BTreeMap<(String, String, Tier), Tally> = BTreeMap::new();
    for r in &dump.records {
        if r.group == "honest" {
            honest
                .entry((r.provider.clone(), r.referee.clone(), r.tier))
                .or_default()
                .add(&r.scored, r.tier, &mut rng, true);
        } else {
            let who = if r.referee.starts_with("f16") {
                format!("{} (f16 referee)", r.group)
            } else {
                r.group.clone()
            };
            cheats
                .entry((who, r.provider.clone(), r.tier))
                .or_default()
                .add(&r.scored, r.tier, &mut rng, false);
        }
    }
    let mut md = String::new();
    let mut line = |s: &str| {
        md.push_str(s);
        md.push('\n');
    };
    let honest_answers: usize = honest.values().map(|t| t.requests).sum();
    let honest_audits: usize = honest.values().map(|t| t.audits).sum();
    let honest_failed: usize = honest.values().map(|t| t.failed_audits).sum();
    line("# Audit rule calibration");
    line("");
    line(&format!(
        "Measured by `cargo run --release -p proofmesh-provider --example calibrate{}` ({:.0} min on this machine: 2 CPU cores of {}, no GPU lent, so **the GPU-provider × CPU-referee pair is missing** from the honest set). Model: SmolLM2-135M-Instruct Q4_1; engine build `{}`. The report is recomputed from the raw measurements with `-- --from target/calibration-dump.json` whenever the rule changes.",
        if dump.quick { " -- --quick" } else { "" },
        dump.minutes,
        cpu_model(),
        proofmesh_provider::engine::LLAMA_CPP_BUILD,
    ));
    line("");
    line(&format!(
        "**Honest set**: {} generated answers ({} prompts × {} sampling settings — greedy; T 0.7 top-p 0.9; T 1 min-p 0.05; T 1 top-k 40 — per provider configuration; by category {:?}), each re-executed by one to three referees: **{honest_answers} refereed answers, {honest_audits} simulated audits** ({DRAWS} random challenges each), **{honest_failed} failed**. Exact-layer failures among the honest answers (sampler replay, draws, finish): **{}**.",
        dump.generated, dump.prompts, dump.samplers, dump.categories, dump.exact_failures,
    ));
    line("");
    let mut s = String::from("Answer lengths (max_tokens: answers, mean tokens generated): ");
    for (max, (n, tokens)) in &dump.lengths {
        let _ = write!(
            s,
            "{max}: {n}, {:.0}; ",
            *tokens as f64 / (*n).max(1) as f64
        );
    }
    line(&s);
    line("");
    line("## Honest distribution per (provider, referee) pair");
    line("");
    line(
        "D: per-step logit distance (centred RMS over both parties' top-32). Audit median D: the median over the challenged steps of each simulated audit (16, or 32 after a borderline first round), over all of them. Excess margin: sum over an answer's tokens of the referee's DiFR margin beyond the dead zone. Failed audits and steps over the per-step limit are counted under the limits now in the code.",
    );
    line("");
    line(
        "| provider | referee | tier | answers | steps | step D p50 / p99 / max | audit median D p99 / max | answer max D | excess margin p99 / max | max margin p99 / max | failed audits | steps over limit |",
    );
    line("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut worst: BTreeMap<Tier, [f32; 4]> = BTreeMap::new();
    let mut tier_steps: BTreeMap<Tier, (usize, usize)> = BTreeMap::new();
    for ((p, r, tier), t) in &honest {
        let sd = sorted(t.step_distances.clone());
        let med = sorted(t.request_medians.clone());
        let maxd = sorted(t.request_max_distance.clone());
        let em = sorted(t.excess_margins.clone());
        let xm = sorted(t.max_margins.clone());
        let w = worst.entry(*tier).or_insert([0.0; 4]);
        w[0] = w[0].max(percentile(&med, 1.0));
        w[1] = w[1].max(percentile(&maxd, 1.0));
        w[2] = w[2].max(percentile(&em, 1.0));
        w[3] = w[3].max(percentile(&xm, 1.0));
        let ts = tier_steps.entry(*tier).or_default();
        ts.0 += t.steps;
        ts.1 += t.steps_over_limit;
        line(&format!(
            "| {p} | {r} | {} | {} | {} | {:.4} / {:.4} / {:.4} | {:.4} / {:.4} | {:.4} | {:.3} / {:.3} | {:.3} / {:.3} | {} / {} | {} / {} |",
            tier.as_str(),
            t.requests,
            t.steps,
            percentile(&sd, 0.5),
            percentile(&sd, 0.99),
            percentile(&sd, 1.0),
            percentile(&med, 0.99),
            percentile(&med, 1.0),
            percentile(&maxd, 1.0),
            percentile(&em, 0.99),
            percentile(&em, 1.0),
            percentile(&xm, 0.99),
            percentile(&xm, 1.0),
            t.failed_audits,
            t.audits,
            t.steps_over_limit,
            t.steps,
        ));
    }
    line("");
    line(
        "## Thresholds: the limits in `shared/src/verify/rule.rs` against the largest honest values",
    );
    line("");
    line("| tier | statistic | largest honest | limit in code | limit / largest honest |");
    line("|---|---|---|---|---|");
    for (tier, w) in &worst {
        let l = tier.thresholds();
        for (name, honest_max, limit) in [
            (
                "median D over the challenged steps",
                w[0],
                l.median_distance,
            ),
            ("largest D of any step", w[1], l.step_distance),
            ("excess margin", w[2], l.excess_margin),
            ("largest margin", w[3], l.max_margin),
        ] {
            let ratio = if honest_max > 0.0 {
                format!("{:.2}", limit / honest_max)
            } else {
                "∞ (honest maximum is 0)".into()
            };
            line(&format!(
                "| {} | {name} | {honest_max:.4} | {limit} | {ratio} |",
                tier.as_str()
            ));
        }
    }
    line("");
    for (tier, (steps, over)) in &tier_steps {
        let audits: usize = honest
            .iter()
            .filter(|((_, _, t), _)| t == tier)
            .map(|(_, t)| t.audits)
            .sum();
        let failed: usize = honest
            .iter()
            .filter(|((_, _, t), _)| t == tier)
            .map(|(_, t)| t.failed_audits)
            .sum();
        line(&format!(
            "{} tier: false positives {failed} of {audits} audits (per request: 0 observed bounds the rate below {:.2} % at 95 %, rule of three), {over} of {steps} steps over the per-step limit.",
            tier.as_str(),
            300.0 / audits.max(1) as f64,
        ));
        line("");
    }
    line("## Detection per cheat (16 challenged steps, per request)");
    line("");
    line(
        "A cheat faces the tolerant tier only by declaring other numerics than its referee, and \
         gateways refuse that tier unless started with `--audit-tiers any` (default `exact`: such \
         a provider gets no merkle request). The tolerant rows are what an operator accepts by \
         allowing it.",
    );
    line("");
    line(
        "| cheat | cheat's KV | tier | answers | caught at 8 / 32 / 128 / 512 tokens | answer median D p1 / p50 | excess margin p1 / p50 |",
    );
    line("|---|---|---|---|---|---|---|");
    for ((name, kv, tier), t) in &cheats {
        let cells: Vec<String> = LENGTHS
            .iter()
            .map(|&len| match t.detection.get(&(16, len)) {
                Some((n, c)) if *n > 0 => format!("{:.1} %", 100.0 * *c as f64 / *n as f64),
                _ => "–".into(),
            })
            .collect();
        let med = sorted(t.request_medians.clone());
        let em = sorted(t.excess_margins.clone());
        line(&format!(
            "| {name} | {kv} | {} | {} | {} | {:.3} / {:.3} | {:.2} / {:.2} |",
            tier.as_str(),
            t.requests,
            cells.join(" / "),
            percentile(&med, 0.01),
            percentile(&med, 0.5),
            percentile(&em, 0.01),
            percentile(&em, 0.5),
        ));
    }
    line("");
    line("## Detection against the number of challenged steps (answers of up to 128 tokens)");
    line("");
    line(&format!(
        "| cheat | cheat's KV | tier | {} |",
        KS.map(|k| format!("k = {k}")).join(" | ")
    ));
    line(&format!("|---|---|---|{}", "---|".repeat(KS.len())));
    for ((name, kv, tier), t) in &cheats {
        let cells: Vec<String> = KS
            .iter()
            .map(|&k| match t.detection.get(&(k, 128)) {
                Some((n, c)) if *n > 0 => format!("{:.1} %", 100.0 * *c as f64 / *n as f64),
                _ => "–".into(),
            })
            .collect();
        line(&format!(
            "| {name} | {kv} | {} | {} |",
            tier.as_str(),
            cells.join(" | ")
        ));
    }
    line("");
    line(&format!(
        "Each cell is the share of {DRAWS} simulated challenges per answer that failed the audit (with the gateway's borderline second round), over every answer of that length bucket."
    ));
    line("");
    line("## Exact-layer forgeries (no threshold: caught by construction)");
    line("");
    line("| forgery | answers | caught | by |");
    line("|---|---|---|---|");
    for (name, (n, caught, by)) in &dump.exact {
        line(&format!(
            "| {name} | {n} | {caught} ({:.1} %) | `{by}` |",
            100.0 * *caught as f64 / (*n).max(1) as f64
        ));
    }
    md
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "an unknown CPU".into())
}
