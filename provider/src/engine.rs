//! The llama.cpp engine: one OS thread owns the context; async code talks to it over channels.
//!
//! `LlamaModel` is `Send + Sync` and shared in an `Arc` (tokenizing and the chat template run on
//! the caller's side); `LlamaContext` borrows the model and is neither, so the engine thread
//! creates it and never lets it go. [`Engine::submit`] queues a [`Job`]; the thread admits jobs
//! into free sequence slots between decode steps and decodes all running sequences together in
//! each `llama_decode` call (prompt prefill in chunks of the batch size, so a long prompt does not
//! stall running streams). Per step it reads the logits, samples with
//! [`proofmesh_shared::sampling`] and sends a [`StepEvent`] on the job's own channel. A closed
//! channel means the caller left: the slot is freed at once.

mod thread;

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaModel};
use proofmesh_shared::commit::StepLeaf;
use proofmesh_shared::protocol::{ChatMessage, FinishReason, RequestId};
use proofmesh_shared::sampling::SamplerParams;
use tokio::sync::mpsc;

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
}

/// Live counts the engine thread keeps, for metrics.
#[derive(Debug, Default)]
pub struct EngineLoad {
    /// Jobs queued and not yet in a sequence slot.
    pub waiting: AtomicUsize,
    /// Sequence slots in use.
    pub busy_slots: AtomicUsize,
}

/// Handle to the engine thread. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    jobs: std::sync::mpsc::SyncSender<Job>,
    model: Arc<LlamaModel>,
    info: ModelInfo,
    load: Arc<EngineLoad>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("info", &self.info).finish()
    }
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
        };
        let (jobs, queue) = std::sync::mpsc::sync_channel(MAX_QUEUED_JOBS);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread_model = Arc::clone(&model);
        let load = Arc::new(EngineLoad::default());
        let thread_load = Arc::clone(&load);
        let settings = thread::Settings {
            threads: i32::try_from(config.threads.max(1)).unwrap_or(1),
            context_size: config.context_size,
            parallel: config.parallel.max(1),
            batch_size: config.batch_size.max(config.parallel.max(1)),
        };
        std::thread::Builder::new()
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
                jobs,
                model,
                info,
                load,
            }),
            Ok(Err(message)) => Err(EngineError::Context { message }),
            Err(_) => Err(EngineError::Stopped),
        }
    }

    /// Facts about the loaded model.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Applies the model's own chat template and tokenizes the result.
    pub fn tokenize_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, EngineError> {
        let prompt_err = |e: &dyn std::fmt::Display| EngineError::Prompt {
            message: e.to_string(),
        };
        let template = self.model.chat_template(None).map_err(|e| prompt_err(&e))?;
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

    /// Queue depth and busy slots right now.
    pub fn load(&self) -> &EngineLoad {
        &self.load
    }

    /// Queues a job; fails at once when the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), EngineError> {
        // Counted before sending so the engine thread's decrement can never run first.
        self.load.waiting.fetch_add(1, Ordering::Relaxed);
        self.jobs.try_send(job).map_err(|e| {
            self.load.waiting.fetch_sub(1, Ordering::Relaxed);
            match e {
                std::sync::mpsc::TrySendError::Full(_) => EngineError::Overloaded,
                std::sync::mpsc::TrySendError::Disconnected(_) => EngineError::Stopped,
            }
        })
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
