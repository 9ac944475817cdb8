//! `proofmesh-gateway`: the OpenAI-compatible front door to a verified inference mesh.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use libp2p::Multiaddr;
use proofmesh_gateway::GatewayConfig;
use proofmesh_gateway::access::{Access, KeyFile};
use proofmesh_gateway::auditor::policy::FraudPolicy;
use proofmesh_gateway::auditor::{AuditPolicy, AuditTiers, VerificationMode};
use proofmesh_gateway::failover::RetryPolicy;
use proofmesh_gateway::http::HttpLimits;
use proofmesh_gateway::settings::GatewaySettings;
use proofmesh_shared::config::{self, CONFIG_ENV};
use proofmesh_shared::net::Traversal;
use proofmesh_shared::telemetry::{self, LogFormat, TelemetryConfig};
use serde::Serialize;

/// Serve OpenAI's chat completions API from a peer-to-peer mesh of llama.cpp providers, and check
/// that every answer came from the model it claims (signed Merkle commitments, random challenges,
/// sampler replay).
///
/// Settings come from built-in defaults, then the TOML file (--config / PROOFMESH_CONFIG), then
/// PROOFMESH_* environment variables, then flags; each layer overrides the one before. File keys
/// are the flag names with underscores (see deploy/gateway.toml). --print-config shows the
/// result.
#[derive(Debug, Parser)]
#[command(
    name = "proofmesh-gateway",
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
    /// Print the OpenAPI 3.1 document of the HTTP API (the committed openapi/openapi.json).
    Openapi,
    /// Re-check a fraud proof written to the evidence directory: re-runs the audit rule on the
    /// provider's signed commitment, its signed leaf openings and the referees' signed evidence,
    /// and prints the failure they show (exit 0), or why they show none (exit 1). A failure of
    /// what the provider signed holds for anyone; one only the model can show (logits, tokens,
    /// prompt, vocabulary, finish) holds only when a referee you name with --trust shows it
    /// (keys cost nothing, so no count of referees in a file proves anything by itself).
    CheckProof {
        /// The proof (CBOR).
        file: PathBuf,
        /// Peer ids of referees whose evidence alone is enough (e.g. your own gateway's, whose
        /// engine referees), comma-separated.
        #[arg(long, value_delimiter = ',')]
        trust: Vec<libp2p::PeerId>,
    },
    /// Write a new pre-shared key for a private mesh to FILE (mode 0600; never over an existing
    /// file) and print its fingerprint. Give the same file to every gateway and provider of the
    /// mesh with --mesh-key-file: nodes without it cannot connect to them.
    MeshKey {
        /// Where to write it.
        file: PathBuf,
    },
    /// Manage API keys. The file keeps only each key's SHA-256 (mode 0600); a new key is
    /// printed once. Point the gateway at the file with --api-keys-file and restart it.
    Keys {
        /// The key file [default: <data dir>/proofmesh/gateway-keys.toml].
        #[arg(long, env = "PROOFMESH_API_KEYS_FILE", global = true)]
        file: Option<PathBuf>,
        #[command(subcommand)]
        action: KeysAction,
    },
}

#[derive(Debug, Subcommand)]
enum KeysAction {
    /// Create a key and print it (once: it is not stored).
    Create {
        /// Who the key is for: letters, digits, - _ . @ (up to 64).
        name: String,
        /// Requests a minute this key may make [default: unlimited].
        #[arg(long)]
        requests_per_minute: Option<u32>,
        /// Prompt plus completion tokens a minute this key may use [default: unlimited].
        #[arg(long)]
        tokens_per_minute: Option<u32>,
    },
    /// List the keys' names, creation times and limits.
    List,
    /// Delete a key; requests with it get 401 once the gateway restarts.
    Revoke {
        /// The key's name.
        name: String,
    },
}

/// Flags and their environment variables; unset ones leave the file and defaults alone.
#[derive(Debug, clap::Args, Serialize)]
struct Flags {
    /// HTTP listen address for the OpenAI API, /metrics, /healthz, /readyz and /docs
    /// [default: 127.0.0.1:8080].
    #[arg(long, env = "PROOFMESH_HTTP_LISTEN", alias = "listen")]
    #[serde(skip_serializing_if = "Option::is_none")]
    http_listen: Option<SocketAddr>,
    /// Mesh listen addresses, comma-separated
    /// [default: /ip4/0.0.0.0/tcp/4001,/ip4/0.0.0.0/udp/4001/quic-v1].
    #[arg(long, env = "PROOFMESH_P2P_LISTEN", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    p2p_listen: Option<Vec<Multiaddr>>,
    /// Peers to dial at start (providers or other gateways), comma-separated.
    #[arg(long, env = "PROOFMESH_BOOTSTRAP", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    bootstrap: Option<Vec<Multiaddr>>,
    /// Discover providers on the local network with mDNS (multicast on every interface)
    /// [default: false].
    #[arg(long, env = "PROOFMESH_MDNS", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    mdns: Option<bool>,
    /// Node key file, created with mode 0600 on first start
    /// [default: <data dir>/proofmesh/gateway.key].
    #[arg(long, env = "PROOFMESH_KEY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<PathBuf>,
    /// Steps challenged per merkle audit, 1-256; all of them when the answer is shorter
    /// [default: 16].
    #[arg(long, env = "PROOFMESH_CHALLENGES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    challenges: Option<u16>,
    /// Verification for requests that do not set `verification_mode` [default: merkle].
    #[arg(long, env = "PROOFMESH_DEFAULT_VERIFICATION_MODE", value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    default_verification_mode: Option<VerificationMode>,
    /// Seconds a provider whose answer failed an audit is kept out of routing [default: 300].
    #[arg(long, env = "PROOFMESH_FAILED_AUDIT_COOLDOWN_SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    failed_audit_cooldown_secs: Option<u64>,
    /// Seconds running requests get to finish after SIGTERM; streams still running then end
    /// with an error event [default: 30].
    #[arg(long, env = "PROOFMESH_DRAIN_TIMEOUT_SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    drain_timeout_secs: Option<u64>,
    /// Seconds one chat completion may take from arrival to its last token, failovers included
    /// (the audit after it runs under its own limits); past it the client gets 504
    /// `request_timeout`, or a stream an error event, 1-86400 [default: 300].
    #[arg(long, env = "PROOFMESH_REQUEST_TIMEOUT_SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    request_timeout_secs: Option<u64>,
    /// Providers one request tries at most, each once: the first plus failovers when one
    /// breaks, hangs, is busy, refuses, or its answer fails the audit, 1-16 [default: 3].
    #[arg(long, env = "PROOFMESH_MAX_ATTEMPTS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_attempts: Option<u32>,
    /// Chat completions served at once; one more is answered 429 with Retry-After
    /// [default: 256].
    #[arg(long, env = "PROOFMESH_MAX_CONCURRENT_REQUESTS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_concurrent_requests: Option<u32>,
    /// Seconds a client gets to send a request's headers; also how long a kept-alive
    /// connection may sit idle (slow or silent clients are cut off) [default: 10].
    #[arg(long, env = "PROOFMESH_HEADER_READ_TIMEOUT_SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    header_read_timeout_secs: Option<u64>,
    /// Seconds a client gets to send a request's body [default: 30].
    #[arg(long, env = "PROOFMESH_BODY_READ_TIMEOUT_SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    body_read_timeout_secs: Option<u64>,
    /// HTTP connections open at once; more are closed as soon as accepted [default: 4096].
    #[arg(long, env = "PROOFMESH_MAX_CONNECTIONS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_connections: Option<u32>,
    /// HTTP connections one client address (IPv6: its /64) may hold at once; more are closed
    /// as soon as accepted; 0: no cap, for a gateway behind a reverse proxy [default: 256].
    #[arg(long, env = "PROOFMESH_MAX_CONNECTIONS_PER_ADDRESS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_connections_per_address: Option<u32>,
    /// API key file, written by `proofmesh-gateway keys create`; set, every API route needs
    /// `Authorization: Bearer <key>` from it (401 otherwise) and each key's rates apply (429)
    /// [default: none, the API is open].
    #[arg(long, env = "PROOFMESH_API_KEYS_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    api_keys_file: Option<PathBuf>,
    /// A private mesh's pre-shared key file (`proofmesh-gateway mesh-key FILE` writes one):
    /// only nodes with the same key can connect, over TCP only (drop QUIC from --p2p-listen)
    /// [default: none, an open mesh].
    #[arg(long, env = "PROOFMESH_MESH_KEY_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    mesh_key_file: Option<PathBuf>,
    /// Serve peers behind NAT: relay v2 circuits for hole punching (2 minutes, 128 KiB each)
    /// and AutoNAT v2 dial-backs; the relay takes reservations once this gateway has a
    /// confirmed external address (--external-addresses, or AutoNAT) [default: true].
    #[arg(long, env = "PROOFMESH_RELAY_SERVICE", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    relay_service: Option<bool>,
    /// Addresses this node is reachable at from outside (a public IP, a forwarded port),
    /// comma-separated, e.g. /ip4/203.0.113.7/tcp/4001: announced without an AutoNAT test
    /// [default: none, AutoNAT finds out].
    #[arg(long, env = "PROOFMESH_EXTERNAL_ADDRESSES", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    external_addresses: Option<Vec<Multiaddr>>,
    /// With API keys on, serve GET /v1/models without a key [default: true].
    #[arg(long, env = "PROOFMESH_PUBLIC_MODELS", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    public_models: Option<bool>,
    /// With API keys on, serve /healthz, /readyz and /metrics without a key [default: true].
    #[arg(long, env = "PROOFMESH_PUBLIC_OPERATIONS", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    public_operations: Option<bool>,
    /// GGUF model file the gateway re-executes answers with as its own referee (the same file
    /// providers serve, e.g. from `proofmesh-provider fetch-model`); needs a build with the
    /// `local-referee` feature. Its name is pinned to its digest, and its vocabulary checks the
    /// text of answers [default: none; only trusted peers referee].
    #[arg(long, env = "PROOFMESH_REFEREE_MODEL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    referee_model: Option<PathBuf>,
    /// CPU threads of the gateway's own referee, 1-1024 [default: all available cores].
    #[arg(long, env = "PROOFMESH_REFEREE_THREADS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    referee_threads: Option<u32>,
    /// Answers the gateway's own referee re-executes at once, 1-64 [default: 2].
    #[arg(long, env = "PROOFMESH_REFEREE_SLOTS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    referee_slots: Option<u32>,
    /// Tokens of context (prompt + completion) of the gateway's own referee [default: 4096].
    #[arg(long, env = "PROOFMESH_REFEREE_CTX_SIZE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    referee_ctx_size: Option<u32>,
    /// Audits a provider must pass before it is challenged at the normal rate; until then every
    /// audit challenges 32 steps [default: 10].
    #[arg(long, env = "PROOFMESH_PROBATION_AUDITS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    probation_audits: Option<u32>,
    /// Audit tiers merkle answers may be judged in. `exact`: a provider is only refereed by an
    /// engine of its own deterministic numerics class (bit-for-bit agreement; providers that
    /// only a referee of another class could check get no merkle requests). `any`: also across
    /// classes (f16 KV cache, GPU providers refereed on CPU) in the tolerant tier, whose limits
    /// sit above kernel noise and miss some near-tie cheats [default: exact].
    #[arg(long, env = "PROOFMESH_AUDIT_TIERS", value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    audit_tiers: Option<AuditTiers>,
    /// Directory where a failed audit's fraud proof is written (CBOR; `proofmesh-gateway
    /// check-proof FILE` re-checks one) [default: none].
    #[arg(long, env = "PROOFMESH_EVIDENCE_DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    evidence_dir: Option<PathBuf>,
    /// Pin a model name to a digest, NAME=sha256:<hex>, comma-separated; names are never
    /// resolved by what peers advertise [default: the default model's name only].
    #[arg(long = "pin", env = "PROOFMESH_PINS", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pins: Option<Vec<String>>,
    /// Peer ids trusted as referees, comma-separated (besides the gateway's own engine)
    /// [default: none].
    #[arg(long, env = "PROOFMESH_TRUSTED_REFEREES", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    trusted_referees: Option<Vec<String>>,
    /// Audits a provider must pass, with no failure and no strike as a referee, before it is
    /// trusted as a referee too (only for the model and numerics class of the gateway's own
    /// engine, which puts such referees to canary audits); 0 trusts only the gateway's own
    /// engine and --trusted-referees [default: 50].
    #[arg(long, env = "PROOFMESH_REFEREE_EARN_AUDITS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    referee_earn_audits: Option<u32>,
    /// Deliver merkle answers that no trusted referee re-executed (verdict `unrefereed`,
    /// reported in x-proofmesh-verdict) instead of answering 503 [default: false].
    #[arg(
        long,
        env = "PROOFMESH_ALLOW_UNREFEREED",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    allow_unrefereed: Option<bool>,
    /// Share (0 to 1) of an established provider's `fraud` answers that are audited after
    /// release [default: 0.1].
    #[arg(long, env = "PROOFMESH_FRAUD_AUDIT_RATE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    fraud_audit_rate: Option<f64>,
    /// Share (0 to 1) of the `fraud` answers audited of a provider on probation (new, thin or
    /// stained record); never less than --fraud-audit-rate [default: 0.5].
    #[arg(long, env = "PROOFMESH_FRAUD_PROBATION_AUDIT_RATE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    fraud_probation_audit_rate: Option<f64>,
    /// Seconds after release within which a `fraud` answer's audit must be done; a sampled
    /// answer not audited by then is `expired` (180 to 1800) [default: 600].
    #[arg(long, env = "PROOFMESH_FRAUD_AUDIT_WINDOW_SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    fraud_audit_window_secs: Option<u64>,
    /// Providers (distinct peers) a `consensus` request goes to, each generating the whole
    /// answer (2 to 5) [default: 2].
    #[arg(long, env = "PROOFMESH_CONSENSUS_PROVIDERS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    consensus_providers: Option<usize>,
    /// Credits a provider earns per million tokens, prompt and completion (so micro-credits
    /// per token), for models without their own --model-prices [default: 1].
    #[arg(long, env = "PROOFMESH_PRICE_PER_MILLION_TOKENS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    price_per_million_tokens: Option<u64>,
    /// Prices of named models, NAME=CREDITS per million tokens, comma-separated
    /// [default: none].
    #[arg(long, env = "PROOFMESH_MODEL_PRICES", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    model_prices: Option<Vec<String>>,
    /// Share (0 to 1) of its declared stake a provider loses to a proven fraud, besides every
    /// payment it has held [default: 0.5].
    #[arg(long, env = "PROOFMESH_SLASH_SHARE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    slash_share: Option<f64>,
    /// GGUF files whose vocabularies check the text of answers, comma-separated (the referee
    /// model's is used by itself) [default: none].
    #[arg(long, env = "PROOFMESH_VOCABULARIES", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    vocabularies: Option<Vec<PathBuf>>,
    /// Directory of the durable peer book (reputation, failures, probation) [default: the
    /// user's data directory].
    #[arg(long, env = "PROOFMESH_STATE_DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    state_dir: Option<PathBuf>,
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

/// `check-proof`: loads a fraud proof and re-runs the audit rule on it.
fn check_proof(file: &std::path::Path, trust: &[libp2p::PeerId]) -> anyhow::Result<()> {
    use proofmesh_shared::verify::FraudProof;
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let proof = FraudProof::from_cbor(&bytes).with_context(|| format!("{}", file.display()))?;
    let provider = libp2p::PeerId::from_bytes(&proof.provider)
        .map(|p| p.to_string())
        .unwrap_or_else(|_| "(malformed peer id)".into());
    println!("provider   {provider}");
    println!("request    {}", proof.request.request_id);
    println!("model      {}", proof.request.model_digest);
    println!(
        "answer     {} steps, numerics {}",
        proof.commitment.commitment.steps, proof.commitment.commitment.numerics
    );
    println!("recorded   failed:{}", proof.failure);
    let referees: std::collections::BTreeSet<String> = proof
        .rounds
        .iter()
        .flat_map(|r| r.evidence.iter())
        .filter_map(|e| e.verify().ok())
        .map(|p| p.to_string())
        .collect();
    for referee in &referees {
        println!("referee    {referee}");
    }
    match proof.holds(trust) {
        Ok(failure) => {
            println!("re-checked failed:{failure}");
            Ok(())
        }
        Err(e) => anyhow::bail!("the proof does not hold: {e}"),
    }
}

fn default_keys_path() -> PathBuf {
    directories::BaseDirs::new()
        .map(|d| {
            d.data_local_dir()
                .join("proofmesh")
                .join("gateway-keys.toml")
        })
        .unwrap_or_else(|| PathBuf::from("gateway-keys.toml"))
}

/// `proofmesh-gateway keys …`.
fn manage_keys(path: &std::path::Path, action: &KeysAction) -> anyhow::Result<()> {
    let mut keys = KeyFile::load(path)?;
    match action {
        KeysAction::Create {
            name,
            requests_per_minute,
            tokens_per_minute,
        } => {
            let secret = keys.create(name, *requests_per_minute, *tokens_per_minute)?;
            keys.save(path)?;
            eprintln!(
                "created key '{name}' in {}; it is shown once, here, and stored only as a hash:",
                path.display()
            );
            println!("{secret}");
            eprintln!(
                "(the gateway reads the file at start: --api-keys-file {})",
                path.display()
            );
        }
        KeysAction::List => {
            if keys.keys.is_empty() {
                eprintln!("no keys in {}", path.display());
            }
            let limit = |l: Option<u32>| l.map_or("unlimited".to_string(), |n| n.to_string());
            for key in &keys.keys {
                println!(
                    "{}\tcreated {}\trequests/min {}\ttokens/min {}",
                    key.name,
                    key.created,
                    limit(key.requests_per_minute),
                    limit(key.tokens_per_minute)
                );
            }
        }
        KeysAction::Revoke { name } => {
            anyhow::ensure!(
                keys.revoke(name),
                "no key named '{name}' in {}",
                path.display()
            );
            keys.save(path)?;
            eprintln!("revoked '{name}'; restart the gateway for it to take effect");
        }
    }
    Ok(())
}

fn default_state_dir() -> PathBuf {
    directories::BaseDirs::new()
        .map(|d| d.data_local_dir().join("proofmesh").join("gateway"))
        .unwrap_or_else(|| PathBuf::from("proofmesh-gateway-state"))
}

fn default_key_path() -> PathBuf {
    directories::BaseDirs::new()
        .map(|d| d.data_local_dir().join("proofmesh").join("gateway.key"))
        .unwrap_or_else(|| PathBuf::from("gateway.key"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match &cli.command {
        Some(Command::Openapi) => {
            print!("{}", proofmesh_gateway::openapi::document_json());
            return Ok(());
        }
        Some(Command::CheckProof { file, trust }) => return check_proof(file, trust),
        Some(Command::MeshKey { file }) => {
            let key = proofmesh_shared::net::mesh_key::create(file)?;
            println!(
                "wrote {} (fingerprint {})",
                file.display(),
                key.fingerprint()
            );
            return Ok(());
        }
        Some(Command::Keys { file, action }) => {
            let file = file.clone().unwrap_or_else(default_keys_path);
            return manage_keys(&file, action);
        }
        None => {}
    }
    let settings: GatewaySettings = config::layered(cli.config.as_deref(), &cli.flags)?;
    settings.validate()?;
    if cli.print_config {
        print!("{}", config::to_toml(&settings.masked())?);
        return Ok(());
    }
    let telemetry = telemetry::init(&TelemetryConfig {
        service_name: "proofmesh-gateway",
        default_filter: "info,libp2p=warn,libp2p_autonat=error",
        log_format: settings.log_format,
        otlp_endpoint: settings.otlp_endpoint.clone(),
        otlp_headers: settings.otlp_headers.clone(),
    })?;
    if let Some(path) = &cli.config {
        tracing::info!(config = %path.display(), "configuration file loaded");
    }
    let keypair = if cli.ephemeral_key {
        libp2p::identity::Keypair::generate_secp256k1()
    } else {
        let path = settings.key.clone().unwrap_or_else(default_key_path);
        proofmesh_shared::identity::load_or_create(&path).context("loading the node key")?
    };
    let state_dir = settings.state_dir.clone().unwrap_or_else(default_state_dir);
    let ledger = settings.ledger();
    let config = GatewayConfig {
        http_listen: settings.http_listen,
        p2p_listen: settings.p2p_listen,
        bootstrap: settings.bootstrap,
        mdns: settings.mdns,
        mesh_key: settings
            .mesh_key_file
            .as_deref()
            .map(proofmesh_shared::net::mesh_key::load)
            .transpose()?,
        traversal: Traversal {
            relays: Vec::new(),
            external: settings.external_addresses,
            serve: settings.relay_service,
        },
        keypair,
        default_mode: settings.default_verification_mode,
        drain_timeout: Duration::from_secs(settings.drain_timeout_secs),
        retry: RetryPolicy {
            max_attempts: settings.max_attempts as usize,
            deadline: Duration::from_secs(settings.request_timeout_secs),
        },
        max_concurrent_requests: settings.max_concurrent_requests as usize,
        access: match &settings.api_keys_file {
            Some(path) => {
                let keys = KeyFile::load(path)?;
                if keys.keys.is_empty() {
                    tracing::warn!(file = %path.display(), "the API key file holds no key: every API request will get 401");
                } else {
                    tracing::info!(file = %path.display(), keys = keys.keys.len(), "API keys required");
                }
                Access::with_keys(&keys, settings.public_models, settings.public_operations)
            }
            None => Access::open(),
        },
        http_limits: HttpLimits {
            header_read_timeout: Duration::from_secs(settings.header_read_timeout_secs),
            body_read_timeout: Duration::from_secs(settings.body_read_timeout_secs),
            max_connections: settings.max_connections as usize,
            max_connections_per_address: settings.max_connections_per_address as usize,
        },
        policy: AuditPolicy {
            challenge_count: usize::from(settings.challenges),
            probation_audits: settings.probation_audits,
            tiers: settings.audit_tiers,
            bench: Duration::from_secs(settings.failed_audit_cooldown_secs),
            allow_unrefereed: settings.allow_unrefereed,
            referee_earn_audits: settings.referee_earn_audits,
            fraud: FraudPolicy {
                rate: settings.fraud_audit_rate,
                probation_rate: settings.fraud_probation_audit_rate,
                window: Duration::from_secs(settings.fraud_audit_window_secs),
                ..FraudPolicy::default()
            },
            consensus_providers: settings.consensus_providers,
            ..AuditPolicy::default()
        },
        #[cfg(feature = "local-referee")]
        referee: settings.referee_model.clone().map(|model| {
            proofmesh_gateway::auditor::local::EngineReferee {
                model,
                threads: settings.referee_threads.unwrap_or_else(|| {
                    std::thread::available_parallelism().map_or(2, |n| n.get() as u32)
                }),
                slots: settings.referee_slots,
                context_size: settings.referee_ctx_size,
            }
        }),
        trusted_referees: settings
            .trusted_referees
            .iter()
            .filter_map(|p| p.parse().ok())
            .collect(),
        pins: settings
            .pins
            .iter()
            .filter_map(|p| proofmesh_gateway::catalog::parse_pin(p).ok())
            .collect(),
        book: Some(state_dir.join("peers.redb")),
        ledger,
        evidence_dir: settings.evidence_dir,
        vocabularies: settings.vocabularies,
    };
    #[cfg(not(feature = "local-referee"))]
    if settings.referee_model.is_some() {
        anyhow::bail!(
            "--referee-model needs a gateway built with its own referee: \
             cargo build --release -p proofmesh-gateway --features local-referee"
        );
    }
    let result =
        proofmesh_gateway::run(config, proofmesh_shared::process::shutdown_signal(), None).await;
    telemetry.shutdown();
    Ok(result?)
}
