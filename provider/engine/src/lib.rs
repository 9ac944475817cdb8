//! The llama.cpp side of proofmesh, in its own crate so that only what runs a model links
//! llama.cpp: the provider, and the gateway when it is built with its own referee
//! (`local-referee` feature).
//!
//! # Layout
//!
//! - this file: [`Engine`], the engine thread's handle: batched generation and teacher-forced
//!   re-execution; `thread` (the thread itself), `prefix` (prompt cache), `reexecute`
//!   (re-execution contexts).
//! - [`referee`]: [`referee::Referee`], re-executing another provider's answer and signing
//!   evidence about it (served over the mesh by the provider, run in-process by a gateway).
//! - [`model_file`]: digest, name and quantization of a GGUF file (from the shared crate).
//! - [`variants`]: cheaper or altered copies of a model, for audit tests and calibration.
//!
//! # The engine
//!
//! One OS thread owns the context; async code talks to it over channels.
//!
//! `LlamaModel` is `Send + Sync` and shared in an `Arc` (tokenizing and the chat template run on
//! the caller's side); `LlamaContext` borrows the model and is neither, so the engine thread
//! creates it and never lets it go. [`Engine::submit`] queues a [`Job`]; the thread admits jobs
//! into free sequence slots between decode steps and decodes all running sequences together in
//! each `llama_decode` call (prompt prefill in chunks of the batch size, so a long prompt does not
//! stall running streams). Per step it reads the logits, samples with
//! [`proofmesh_shared::sampling`] and sends a [`StepEvent`] on the job's own channel. A closed
//! channel means the caller left: the slot is freed at once. A freed sequence keeps its KV cache,
//! and the next prompt that begins the same way prefills only the rest (prompt caching, `prefix`).
//!
//! The same thread re-executes other providers' answers for audits ([`Engine::reexecute`]):
//! each such job gets a context of its own (one sequence per referee context), is fed the
//! claimed tokens as they arrive, and is interleaved with generation one chunk at a time.
//!
//! Numerics: the KV cache is q8_0 by default. With a quantized KV cache llama.cpp's CPU flash
//! attention takes its per-row path for every batch shape, so a sequence's logits do not depend
//! on what else shares its batch, on the micro-batch size or on the thread count: a batched
//! generation and a teacher-forced re-execution agree bit for bit (measured for 1-16 sequences,
//! micro-batches 32-2048, 1 and 2 threads). That is what lets two such engines audit each other
//! in the exact tier ([`proofmesh_shared::verify::Tier`]). An f16 cache switches to tiled kernels
//! at 64 rows and loses this.

mod prefix;
mod reexecute;
pub mod referee;
mod template;
mod thread;
pub mod variants;

pub use proofmesh_shared::model_file;

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaModel};
use proofmesh_shared::commit::StepLeaf;
pub use proofmesh_shared::constraint::Guide;
use proofmesh_shared::constraint::{Constraint, ConstraintError, TokenSpace};
use proofmesh_shared::protocol::{ChatMessage, FinishReason, Prompt, RequestId};
use proofmesh_shared::sampling::SamplerParams;
use proofmesh_shared::verify::RefereeStep;
use tokio::sync::{mpsc, oneshot};

/// Jobs waiting for a slot beyond which the provider answers "overloaded".
pub const MAX_QUEUED_JOBS: usize = 64;

/// How the engine runs a model.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The GGUF file.
    pub model_path: PathBuf,
    /// CPU threads for decode and prefill.
    pub threads: u32,
    /// Context window per sequence, in tokens.
    pub context_size: u32,
    /// Sequences decoded concurrently.
    pub parallel: u32,
    /// Tokens per `llama_decode` call (also the prefill chunk).
    pub batch_size: u32,
    /// Layers to offload to a GPU (0 = CPU only).
    pub gpu_layers: u32,
    /// KV cache element type; q8_0 makes logits independent of batching (see the module docs).
    pub kv_cache: KvCache,
    /// Contexts kept for re-executing other providers' answers (0 = not a referee).
    pub referee_slots: u32,
    /// Tokens per micro-batch when re-executing.
    pub referee_micro_batch: u32,
}

impl EngineConfig {
    /// An engine for `model_path` with the defaults the command line uses.
    pub fn new(model_path: PathBuf) -> Self {
        Self {
            model_path,
            threads: 2,
            context_size: 2048,
            parallel: 4,
            batch_size: 512,
            gpu_layers: 0,
            kv_cache: KvCache::Q8_0,
            referee_slots: 2,
            referee_micro_batch: DEFAULT_REFEREE_MICRO_BATCH,
        }
    }
}

/// Micro-batch of a re-execution. Below llama.cpp's 64-row switch to tiled attention kernels,
/// so even an f16 cache stays close to single-token decoding; with q8_0 it does not matter.
pub const DEFAULT_REFEREE_MICRO_BATCH: u32 = 32;

/// The KV cache element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvCache {
    /// 8-bit blocks: deterministic across batch shapes (the default).
    #[default]
    Q8_0,
    /// Half precision, as llama.cpp's server defaults to: faster prefill of long prompts, but
    /// logits depend on batch shape, so audits of this engine use the tolerant tier.
    F16,
}

impl KvCache {
    fn llama(self) -> llama_cpp_2::context::params::KvCacheType {
        match self {
            Self::Q8_0 => llama_cpp_2::context::params::KvCacheType::Q8_0,
            Self::F16 => llama_cpp_2::context::params::KvCacheType::F16,
        }
    }

    /// `q8_0` or `f16`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Q8_0 => "q8_0",
            Self::F16 => "f16",
        }
    }
}

impl std::str::FromStr for KvCache {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "q8_0" | "q8" => Ok(Self::Q8_0),
            "f16" => Ok(Self::F16),
            _ => Err(format!("'{s}' is not a KV cache type (q8_0 or f16)")),
        }
    }
}

/// The llama.cpp build whose kernels this binary runs (the `llama-cpp-sys-2` crate version,
/// checked against Cargo.lock by a test): part of the numerics class, because two builds may
/// compute different bits.
pub const LLAMA_CPP_BUILD: &str = "llama-cpp-sys-2@0.1.161";

/// The numerics class of an engine: nodes with the same deterministic (`det/`) class compute
/// bit-identical logits for the same tokens, whatever their batching and threads.
pub fn numerics_class(gpu_layers: u32, kv_cache: KvCache) -> String {
    let device = if gpu_layers > 0 { "gpu" } else { "cpu" };
    let mut features = std::env::consts::ARCH.to_string();
    for (on, name) in [
        (cfg!(target_feature = "avx"), "avx"),
        (cfg!(target_feature = "avx2"), "avx2"),
        (cfg!(target_feature = "fma"), "fma"),
        (cfg!(target_feature = "f16c"), "f16c"),
        (cfg!(target_feature = "avx512f"), "avx512f"),
        (cfg!(target_feature = "avx512vnni"), "avx512vnni"),
        (cfg!(target_feature = "neon"), "neon"),
    ] {
        if on {
            features.push('+');
            features.push_str(name);
        }
    }
    let class = format!(
        "{device}/{features}/{LLAMA_CPP_BUILD}/kv-{}",
        kv_cache.as_str()
    );
    // A dynamic-backends build picks its CPU kernels at run time, so its class cannot promise
    // which ones; GPU kernels depend on the card.
    let deterministic =
        gpu_layers == 0 && kv_cache == KvCache::Q8_0 && !cfg!(feature = "dynamic-backends");
    if deterministic {
        format!(
            "{}{class}",
            proofmesh_shared::verify::rule::DETERMINISTIC_PREFIX
        )
    } else {
        class
    }
}

/// Failures starting the engine or preparing a prompt.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// llama.cpp's backend could not start.
    #[error("llama.cpp backend failed to start: {message}")]
    Backend {
        /// What went wrong.
        message: String,
    },
    /// The model file could not be loaded.
    #[error("cannot load model {path}: {message}")]
    Load {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The context could not be created.
    #[error("cannot create a llama.cpp context: {message}")]
    Context {
        /// What went wrong.
        message: String,
    },
    /// The chat could not be turned into a prompt.
    #[error("cannot build the prompt: {message}")]
    Prompt {
        /// What went wrong.
        message: String,
    },
    /// The job queue is full.
    #[error("engine queue is full")]
    Overloaded,
    /// The engine thread has stopped.
    #[error("engine stopped")]
    Stopped,
    /// Every re-execution context is busy (or this engine keeps none).
    #[error("no re-execution context is free")]
    RefereeBusy,
    /// A re-execution failed.
    #[error("re-execution failed: {message}")]
    Reexecution {
        /// What went wrong.
        message: String,
    },
}

/// One generation request for the engine thread.
#[derive(Debug)]
pub struct Job {
    /// The gateway's request id, for logs.
    pub request_id: RequestId,
    /// Prompt tokens (chat template applied).
    pub prompt: Vec<u32>,
    /// Sampler settings.
    pub sampler: SamplerParams,
    /// Most steps.
    pub max_tokens: u32,
    /// Where steps go; dropping the receiver cancels the job.
    pub events: mpsc::UnboundedSender<StepEvent>,
    /// The request's constraint, when it has one: each step's candidates are taken among the
    /// tokens it allows ([`Engine::guide`]).
    pub guide: Option<Guide>,
}

/// What the engine reports for a job.
#[derive(Debug)]
pub enum StepEvent {
    /// One generated step.
    Step {
        /// The committed leaf (token, draw, candidates, logsumexp).
        leaf: StepLeaf,
        /// The token's text bytes (empty for end-of-generation and control tokens).
        piece: Vec<u8>,
    },
    /// The job ended after the last `Step`.
    Finished {
        /// End-of-generation token or `max_tokens`.
        reason: FinishReason,
    },
    /// llama.cpp failed; the job is over.
    Failed {
        /// What went wrong.
        message: String,
    },
}

/// What the engine thread receives: generation jobs and re-execution traffic, in one queue so
/// that either wakes it.
#[derive(Debug)]
pub(crate) enum Message {
    Generate(Box<Job>),
    Reexecute(reexecute::Command),
    /// The last [`Engine`] handle is gone: end every job and return.
    Stop,
}

/// Stops and joins the engine thread when the last [`Engine`] handle drops.
///
/// A detached engine thread could still be inside `llama_decode` when the process exits and
/// C++ static destructors tear down ggml under it (a SIGSEGV after the last test passed). So the
/// last handle sends [`Message::Stop`] and waits for the thread, which returns after at most the
/// one decode step it is in; jobs still running end (their event streams close).
#[derive(Debug)]
struct EngineThread {
    messages: std::sync::mpsc::Sender<Message>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Drop for EngineThread {
    fn drop(&mut self) {
        let _ = self.messages.send(Message::Stop);
        if let Some(handle) = self.handle.take()
            && handle.thread().id() != std::thread::current().id()
            && handle.join().is_err()
        {
            tracing::error!("the engine thread panicked");
        }
    }
}

/// A re-execution's result: the referee's view of every claimed step.
#[derive(Debug, Clone, PartialEq)]
pub struct Reexecuted {
    /// One entry per claimed token, by step: the referee's candidates, logsumexp and its logit
    /// for the claimed token.
    pub steps: Vec<RefereeStep>,
    /// [`proofmesh_shared::sampling::margin`] of each claimed token under the referee's logits.
    pub margins: Vec<f32>,
    /// Claimed tokens outside the vocabulary (fed as token 0, scored infinitely implausible).
    pub invalid_tokens: u32,
}

/// A teacher-forced re-execution in progress on one of the engine's referee contexts. Feed it the
/// claimed tokens as they arrive with [`Reexecution::push`]; [`Reexecution::finish`] waits for
/// the last ones. Dropping it frees the context.
#[derive(Debug)]
pub struct Reexecution {
    id: u64,
    messages: std::sync::mpsc::Sender<Message>,
    finished: bool,
}

impl Reexecution {
    /// Appends claimed tokens (in step order).
    pub fn push(&self, tokens: Vec<u32>) -> Result<(), EngineError> {
        self.messages
            .send(Message::Reexecute(reexecute::Command::Tokens {
                id: self.id,
                tokens,
            }))
            .map_err(|_| EngineError::Stopped)
    }

    /// Waits until every pushed token is re-executed and returns the result; the context is
    /// freed at once.
    pub async fn finish(mut self) -> Result<Reexecuted, EngineError> {
        let (reply, answer) = oneshot::channel();
        self.messages
            .send(Message::Reexecute(reexecute::Command::Finish {
                id: self.id,
                reply,
            }))
            .map_err(|_| EngineError::Stopped)?;
        self.finished = true;
        answer
            .await
            .map_err(|_| EngineError::Stopped)?
            .map_err(|message| EngineError::Reexecution { message })
    }
}

impl Drop for Reexecution {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self
                .messages
                .send(Message::Reexecute(reexecute::Command::Cancel {
                    id: self.id,
                }));
        }
    }
}

/// Facts about the loaded model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Vocabulary size.
    pub n_vocab: u32,
    /// Layers in the model.
    pub n_layer: u32,
    /// Layers actually offloaded.
    pub gpu_layers: u32,
    /// Whether llama.cpp has a GPU backend at all.
    pub gpu_offload_supported: bool,
    /// Context per sequence.
    pub context_size: u32,
    /// Sequences decoded concurrently.
    pub parallel: u32,
    /// Seconds the model took to load.
    pub load_seconds: f64,
    /// The numerics class (see [`proofmesh_shared::verify::Tier`]).
    pub numerics: String,
    /// Tokens per micro-batch when re-executing.
    pub referee_micro_batch: u32,
    /// Bytes of the longest token's text (special tokens' included): a prompt of `n` bytes
    /// is at least `n / longest_token_bytes` tokens, known before tokenizing it.
    pub longest_token_bytes: u32,
}

/// Live counts the engine thread keeps, for metrics.
#[derive(Debug, Default)]
pub struct EngineLoad {
    /// Jobs queued and not yet in a sequence slot.
    pub waiting: AtomicUsize,
    /// Sequence slots in use.
    pub busy_slots: AtomicUsize,
    /// Prompt tokens whose KV came from the prompt cache instead of a prefill, since start.
    pub cached_prompt_tokens: AtomicUsize,
    /// Referee contexts neither running a job nor reserved by a handle. A handle takes one
    /// before it asks for a job; only the engine thread gives one back, once the context is
    /// really free, so a job never begins without a context waiting for it.
    pub free_referee_contexts: AtomicUsize,
}

/// Handle to the engine thread. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    messages: std::sync::mpsc::Sender<Message>,
    model: Arc<LlamaModel>,
    info: ModelInfo,
    load: Arc<EngineLoad>,
    next_reexecution: Arc<std::sync::atomic::AtomicU64>,
    /// The grammar engine's view of the vocabulary, built on the first constrained request.
    space: Arc<OnceLock<Result<Arc<TokenSpace>, ConstraintError>>>,
    /// The model's Jinja chat template, compiled on the first request with tools.
    template: Arc<OnceLock<Result<template::ChatTemplate, String>>>,
    _thread: Arc<EngineThread>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("info", &self.info).finish()
    }
}

/// The longest text any token of `model` stands for, rendered either way.
fn longest_token_bytes(model: &LlamaModel) -> u32 {
    let vocab = model.vocab();
    (0..model.n_vocab())
        .map(|t| {
            let token = llama_cpp_2::token::LlamaToken(t);
            vocab
                .token_to_piece(token, false, None)
                .len()
                .max(vocab.token_to_piece(token, true, None).len())
        })
        .max()
        .map_or(1, |n| u32::try_from(n).unwrap_or(u32::MAX).max(1))
}

/// Where a `dynamic-backends` build loads llama.cpp's backend libraries from (set before the
/// first engine starts); unset, it uses the directory compiled into llama-cpp-sys-2.
static BACKENDS_DIR: OnceLock<PathBuf> = OnceLock::new();

/// Makes a `dynamic-backends` build load llama.cpp's backends (e.g. `libggml-cuda.so`) from
/// `dir`. Call before the first engine starts; other builds have their backends linked in and
/// refuse.
pub fn set_backends_dir(dir: PathBuf) -> Result<(), EngineError> {
    if !cfg!(feature = "dynamic-backends") {
        return Err(EngineError::Backend {
            message: "this build links its backends statically; rebuild with `--features \
                      dynamic-backends` to load them from a directory"
                .into(),
        });
    }
    if dir.to_str().is_none() || !dir.is_dir() {
        return Err(EngineError::Backend {
            message: format!("backends directory {} is not a directory", dir.display()),
        });
    }
    let _ = BACKENDS_DIR.set(dir);
    Ok(())
}

/// llama.cpp's backend may be initialised once per process; tests run several providers in one.
fn backend() -> Result<&'static LlamaBackend, EngineError> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            #[cfg(feature = "dynamic-backends")]
            match BACKENDS_DIR.get() {
                Some(dir) => llama_cpp_2::llama_backend::load_backends_from_path(dir),
                None => llama_cpp_2::llama_backend::load_backends(),
            }
            let backend = LlamaBackend::init().map_err(|e| e.to_string())?;
            for device in llama_cpp_2::list_llama_ggml_backend_devices() {
                tracing::info!(
                    device = %device.name,
                    backend = %device.backend,
                    description = %device.description,
                    memory_mib = device.memory_total >> 20,
                    "llama.cpp device"
                );
            }
            Ok(backend)
        })
        .as_ref()
        .map_err(|message| EngineError::Backend {
            message: message.clone(),
        })
}

/// Whether this build of llama.cpp can offload layers to a GPU (initialises the backend).
pub fn gpu_offload_supported() -> Result<bool, EngineError> {
    Ok(backend()?.supports_gpu_offload())
}

/// How many model layers go to the GPU: a count, or `auto` (all of them when the build has a GPU
/// backend, none otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GpuLayers {
    /// All layers on a GPU build, none on a CPU build.
    #[default]
    Auto,
    /// This many layers (0 = CPU only; more than the model has = all).
    Count(u32),
}

impl GpuLayers {
    /// The layer count to hand llama.cpp (`u32::MAX` = all).
    pub fn resolve(self) -> Result<u32, EngineError> {
        match self {
            Self::Count(n) => Ok(n),
            Self::Auto => Ok(if gpu_offload_supported()? {
                u32::MAX
            } else {
                0
            }),
        }
    }
}

impl std::str::FromStr for GpuLayers {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("auto") {
            return Ok(Self::Auto);
        }
        s.parse()
            .map(Self::Count)
            .map_err(|_| format!("'{s}' is neither a number of layers nor `auto`"))
    }
}

impl std::fmt::Display for GpuLayers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Count(n) => write!(f, "{n}"),
        }
    }
}

impl serde::Serialize for GpuLayers {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Auto => serializer.serialize_str("auto"),
            Self::Count(n) => serializer.serialize_u32(*n),
        }
    }
}

impl<'de> serde::Deserialize<'de> for GpuLayers {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Count(u32),
            Word(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Count(n) => Ok(Self::Count(n)),
            Raw::Word(w) => w.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl Engine {
    /// Loads the model (logging progress) and starts the engine thread. Blocking: call it from
    /// `spawn_blocking`.
    pub fn start(config: &EngineConfig) -> Result<Self, EngineError> {
        let backend = backend()?;
        let load_started = std::time::Instant::now();
        let model = load_model(backend, &config.model_path, config.gpu_layers)?;
        let load_seconds = load_started.elapsed().as_secs_f64();
        let model = Arc::new(model);
        let n_layer = model.n_layer();
        let info = ModelInfo {
            n_vocab: u32::try_from(model.n_vocab()).unwrap_or(0),
            n_layer,
            gpu_layers: if backend.supports_gpu_offload() {
                config.gpu_layers.min(n_layer + 1)
            } else {
                0
            },
            gpu_offload_supported: backend.supports_gpu_offload(),
            context_size: config.context_size,
            parallel: config.parallel.max(1),
            load_seconds,
            numerics: numerics_class(
                if backend.supports_gpu_offload() {
                    config.gpu_layers.min(n_layer + 1)
                } else {
                    0
                },
                config.kv_cache,
            ),
            referee_micro_batch: config.referee_micro_batch.clamp(1, 4096),
            longest_token_bytes: longest_token_bytes(&model),
        };
        let (messages, queue) = std::sync::mpsc::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread_model = Arc::clone(&model);
        let load = Arc::new(EngineLoad::default());
        let thread_load = Arc::clone(&load);
        let settings = thread::Settings {
            threads: i32::try_from(config.threads.max(1)).unwrap_or(1),
            context_size: config.context_size,
            parallel: config.parallel.max(1),
            batch_size: config.batch_size.max(config.parallel.max(1)),
            kv_cache: config.kv_cache.llama(),
            referee_slots: config.referee_slots,
            referee_micro_batch: config.referee_micro_batch.clamp(1, 4096),
        };
        let handle = std::thread::Builder::new()
            .name("llama-engine".into())
            .spawn(move || {
                thread::run(
                    backend,
                    thread_model,
                    settings,
                    thread_load,
                    queue,
                    ready_tx,
                )
            })
            .map_err(|e| EngineError::Context {
                message: e.to_string(),
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                _thread: Arc::new(EngineThread {
                    messages: messages.clone(),
                    handle: Some(handle),
                }),
                messages,
                model,
                info,
                load,
                next_reexecution: Arc::default(),
                space: Arc::default(),
                template: Arc::default(),
            }),
            Ok(Err(message)) => Err(EngineError::Context { message }),
            Err(_) => Err(EngineError::Stopped),
        }
    }

    /// Facts about the loaded model.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The fewest tokens a prompt can take (its text, a chat's tools included, over the
    /// longest token's, halved for any normalisation the tokenizer does): a bound known
    /// without tokenizing, so that an oversized prompt is refused before any work is spent on
    /// it.
    pub fn fewest_tokens_of(&self, prompt: Prompt<'_>) -> usize {
        let bytes = match prompt {
            Prompt::Chat(messages, tools) => {
                let text: usize = messages
                    .iter()
                    .map(|m| m.content.len() + m.role.len())
                    .sum();
                text + tools.map_or(0, str::len)
            }
            Prompt::Text(text) => text.len(),
        };
        bytes / (2 * self.info.longest_token_bytes.max(1) as usize)
    }

    /// The tokens a request's prompt runs as: a chat through the model's template
    /// ([`Engine::tokenize_chat`]), a text prompt as it is (special tokens in it are parsed,
    /// and the model's start token added if it wants one, as llama.cpp's server does).
    pub fn tokenize(&self, prompt: Prompt<'_>) -> Result<Vec<u32>, EngineError> {
        match prompt {
            Prompt::Chat(messages, None) => self.tokenize_chat(messages),
            Prompt::Chat(messages, Some(tools)) => self.tokenize_with_tools(messages, tools),
            Prompt::Text(text) => {
                let tokens = self.model.vocab().tokenize(text.as_bytes(), true, true);
                if tokens.is_empty() {
                    return Err(EngineError::Prompt {
                        message: "the prompt is empty".into(),
                    });
                }
                Ok(tokens.into_iter().map(|t| t.0 as u32).collect())
            }
        }
    }

    /// Applies the model's own chat template (ChatML when it has none) and tokenizes the result.
    pub fn tokenize_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, EngineError> {
        let prompt_err = |e: &dyn std::fmt::Display| EngineError::Prompt {
            message: e.to_string(),
        };
        // A model without a template in its metadata gets ChatML, as llama.cpp's server does.
        let template = match self.model.chat_template(None) {
            Ok(template) => template,
            Err(_) => {
                llama_cpp_2::model::LlamaChatTemplate::new("chatml").map_err(|e| prompt_err(&e))?
            }
        };
        let chat = messages
            .iter()
            .map(|m| LlamaChatMessage::new(m.role.clone(), m.content.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| prompt_err(&e))?;
        let prompt = self
            .model
            .apply_chat_template(&template, &chat, true)
            .map_err(|e| prompt_err(&e))?;
        let tokens = self.model.vocab().tokenize(prompt.as_bytes(), true, true);
        Ok(tokens.into_iter().map(|t| t.0 as u32).collect())
    }

    /// Renders the model's own Jinja chat template with `tools` (minijinja, as llama.cpp's
    /// server does with `--jinja`) and tokenizes the result as [`Engine::tokenize_chat`] does.
    pub fn tokenize_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: &str,
    ) -> Result<Vec<u32>, EngineError> {
        let template = self
            .template
            .get_or_init(|| self.chat_template())
            .as_ref()
            .map_err(|message| EngineError::Prompt {
                message: message.clone(),
            })?;
        let prompt = template
            .render(messages, tools)
            .map_err(|message| EngineError::Prompt { message })?;
        // The tokenizer adds the start token itself where the model wants one: a template that
        // writes it too would double it (llama.cpp's server strips it the same way).
        let prompt = match self.model.vocab().should_add_bos() {
            true => prompt.strip_prefix(template.bos()).unwrap_or(&prompt),
            false => &prompt,
        };
        let tokens = self.model.vocab().tokenize(prompt.as_bytes(), true, true);
        Ok(tokens.into_iter().map(|t| t.0 as u32).collect())
    }

    /// The model's chat template, compiled (ChatML when it has none).
    fn chat_template(&self) -> Result<template::ChatTemplate, String> {
        const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        let source = match self.model.chat_template(None) {
            Ok(template) => template.to_string().map_err(|e| e.to_string())?,
            Err(_) => CHATML.to_owned(),
        };
        let vocab = self.model.vocab();
        let text = |token| {
            vocab
                .text(token)
                .map(|t| t.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        template::ChatTemplate::new(&source, text(vocab.bos()), text(vocab.eos()))
    }

    /// Queue depth and busy slots right now.
    pub fn load(&self) -> &EngineLoad {
        &self.load
    }

    /// Whether [`MAX_QUEUED_JOBS`] are waiting already (a new job would be refused).
    pub fn queue_full(&self) -> bool {
        self.load.waiting.load(Ordering::Relaxed) >= MAX_QUEUED_JOBS
    }

    /// Queues a job; fails at once when [`MAX_QUEUED_JOBS`] are already waiting.
    pub fn submit(&self, job: Job) -> Result<(), EngineError> {
        // Counted before sending so the engine thread's decrement can never run first.
        if self.load.waiting.fetch_add(1, Ordering::Relaxed) >= MAX_QUEUED_JOBS {
            self.load.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(EngineError::Overloaded);
        }
        self.messages
            .send(Message::Generate(Box::new(job)))
            .map_err(|_| {
                self.load.waiting.fetch_sub(1, Ordering::Relaxed);
                EngineError::Stopped
            })
    }

    /// A fresh walk through `constraint` over this model's vocabulary, or why it cannot be
    /// used (the message names unsupported schema features). The vocabulary's token trie is
    /// built on the first call.
    pub fn guide(&self, constraint: &Constraint) -> Result<Guide, ConstraintError> {
        let space = self.space.get_or_init(|| {
            let pieces = (0..self.info.n_vocab).map(|t| self.piece(t)).collect();
            let eog: Vec<u32> = (0..self.info.n_vocab).filter(|&t| self.is_eog(t)).collect();
            TokenSpace::new(pieces, &eog).map(Arc::new)
        });
        space.as_ref().map_err(Clone::clone)?.guide(constraint)
    }

    /// Starts re-executing an answer to `prompt` teacher-forced on a referee context of its
    /// own; fails at once when none is free. `max_tokens` bounds the claimed tokens it accepts.
    pub fn reexecute(
        &self,
        prompt: Vec<u32>,
        sampler: SamplerParams,
        max_tokens: u32,
    ) -> Result<Reexecution, EngineError> {
        self.reexecute_guided(prompt, sampler, max_tokens, None)
    }

    /// [`Engine::reexecute`] of an answer to a constrained request: at each claimed step the
    /// referee's candidates and margin are taken among the tokens `guide` allows, as the
    /// provider's were.
    pub fn reexecute_guided(
        &self,
        prompt: Vec<u32>,
        sampler: SamplerParams,
        max_tokens: u32,
        guide: Option<Guide>,
    ) -> Result<Reexecution, EngineError> {
        if prompt.is_empty() {
            return Err(EngineError::Prompt {
                message: "empty prompt".into(),
            });
        }
        let reserved = self.load.free_referee_contexts.fetch_update(
            Ordering::AcqRel,
            Ordering::Acquire,
            |n| n.checked_sub(1),
        );
        if reserved.is_err() {
            return Err(EngineError::RefereeBusy);
        }
        let id = self
            .next_reexecution
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let reexecution = Reexecution {
            id,
            messages: self.messages.clone(),
            finished: false,
        };
        self.messages
            .send(Message::Reexecute(reexecute::Command::Begin {
                id,
                prompt,
                sampler,
                max_tokens,
                guide: guide.map(Box::new),
            }))
            .map_err(|_| EngineError::Stopped)?;
        Ok(reexecution)
    }

    /// Re-execution contexts free right now.
    pub fn free_referee_slots(&self) -> usize {
        self.load.free_referee_contexts.load(Ordering::Acquire)
    }

    /// The text of `tokens` (invalid ids are skipped), for stop-sequence checks.
    pub fn detokenize(&self, tokens: &[u32]) -> String {
        let n_vocab = self.info.n_vocab;
        let mut bytes = Vec::new();
        for &t in tokens.iter().filter(|&&t| t < n_vocab) {
            let token = llama_cpp_2::token::LlamaToken(t as i32);
            if !self.model.vocab().is_eog(token) {
                bytes.extend(self.model.vocab().token_to_piece(token, false, None));
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The bytes the engine streams for `token`: its piece without special tokens, empty for an
    /// end-of-generation token or one outside the vocabulary.
    pub fn piece(&self, token: u32) -> Vec<u8> {
        if token >= self.info.n_vocab || self.is_eog(token) {
            return Vec::new();
        }
        self.model
            .vocab()
            .token_to_piece(llama_cpp_2::token::LlamaToken(token as i32), false, None)
    }

    /// Whether `token` ends generation (end-of-sequence, end-of-turn).
    pub fn is_eog(&self, token: u32) -> bool {
        token < self.info.n_vocab
            && self
                .model
                .vocab()
                .is_eog(llama_cpp_2::token::LlamaToken(token as i32))
    }
}

fn load_model(
    backend: &LlamaBackend,
    path: &Path,
    gpu_layers: u32,
) -> Result<LlamaModel, EngineError> {
    if !path.is_file() {
        return Err(EngineError::Load {
            path: path.to_path_buf(),
            message: "no such file".into(),
        });
    }
    let started = std::time::Instant::now();
    let mut last_reported = -1i32;
    let shown = path.display().to_string();
    let params = LlamaModelParams::default()
        .with_n_gpu_layers(gpu_layers)
        .with_progress_callback(move |progress| {
            let percent = (progress * 100.0) as i32;
            if percent / 25 > last_reported / 25 || (percent == 100 && last_reported != 100) {
                last_reported = percent;
                tracing::info!(model = %shown, percent, "loading model");
            }
            true
        });
    let model =
        LlamaModel::load_from_file(backend, path, &params).map_err(|e| EngineError::Load {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    tracing::info!(
        model = %path.display(),
        layers = model.n_layer(),
        gpu_layers = if backend.supports_gpu_offload() {
            gpu_layers.min(model.n_layer() + 1)
        } else {
            0
        },
        gpu_offload = backend.supports_gpu_offload(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "model loaded"
    );
    Ok(model)
}

/// Context size as llama.cpp wants it: all sequences' windows together.
pub(crate) fn total_context(context_size: u32, parallel: u32) -> Option<NonZeroU32> {
    NonZeroU32::new(context_size.saturating_mul(parallel.max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The numerics class names the llama.cpp build; a dependency bump that forgets to update it
    /// would let two builds with different kernels claim to agree bit for bit.
    #[test]
    fn llama_cpp_build_matches_the_lock_file() {
        let lock =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../Cargo.lock"))
                .expect("Cargo.lock");
        let version = lock
            .split("[[package]]")
            .find(|p| p.contains("name = \"llama-cpp-sys-2\""))
            .and_then(|p| p.lines().find_map(|l| l.strip_prefix("version = \"")))
            .and_then(|v| v.strip_suffix('"'))
            .expect("llama-cpp-sys-2 in Cargo.lock");
        assert_eq!(LLAMA_CPP_BUILD, format!("llama-cpp-sys-2@{version}"));
    }

    #[test]
    fn only_cpu_q8_0_engines_are_deterministic() {
        let det = numerics_class(0, KvCache::Q8_0);
        assert_eq!(
            det.starts_with("det/cpu/"),
            !cfg!(feature = "dynamic-backends")
        );
        assert!(!numerics_class(0, KvCache::F16).starts_with("det/"));
        assert!(!numerics_class(30, KvCache::Q8_0).starts_with("det/"));
        assert!(det.contains(LLAMA_CPP_BUILD));
    }
}
