//! `proofmesh-gateway`: the OpenAI-compatible front door to a verified inference mesh.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use libp2p::Multiaddr;
use proofmesh_gateway::GatewayConfig;
use proofmesh_gateway::openai::request::VerificationMode;

/// Serve OpenAI's chat completions API from a peer-to-peer mesh of llama.cpp providers, and check
/// that every answer came from the model it claims (signed Merkle commitments, random challenges,
/// sampler replay).
#[derive(Debug, Parser)]
#[command(name = "proofmesh-gateway", version)]
struct Cli {
    /// HTTP listen address for the OpenAI API.
    #[arg(long, env = "PROOFMESH_HTTP_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Mesh listen addresses (TCP and QUIC) that providers dial.
    #[arg(long, env = "PROOFMESH_P2P_LISTEN", value_delimiter = ',',
          default_values = ["/ip4/0.0.0.0/tcp/4001", "/ip4/0.0.0.0/udp/4001/quic-v1"])]
    p2p_listen: Vec<Multiaddr>,
    /// Peers to dial at start (providers or other gateways).
    #[arg(long, env = "PROOFMESH_BOOTSTRAP", value_delimiter = ',')]
    bootstrap: Vec<Multiaddr>,
    /// Discover providers on the local network with mDNS (multicast on every interface).
    #[arg(long, env = "PROOFMESH_MDNS")]
    mdns: bool,
    /// Node key file, created with mode 0600 on first start.
    #[arg(long, env = "PROOFMESH_KEY")]
    key: Option<PathBuf>,
    /// Use a throw-away key instead of a key file.
    #[arg(long, conflicts_with = "key")]
    ephemeral_key: bool,
    /// Steps challenged per merkle audit (all of them when the answer is shorter).
    #[arg(long, env = "PROOFMESH_CHALLENGES", default_value_t = proofmesh_shared::verify::DEFAULT_CHALLENGE_COUNT as u16, value_parser = clap::value_parser!(u16).range(1..=256))]
    challenges: u16,
    /// Verification for requests that do not set `verification_mode`.
    #[arg(long, env = "PROOFMESH_DEFAULT_VERIFICATION", value_enum, default_value_t = Mode::Merkle)]
    default_verification_mode: Mode,
    /// Seconds a provider whose answer failed an audit is kept out of routing.
    #[arg(long, env = "PROOFMESH_FAILED_AUDIT_COOLDOWN", default_value_t = 300)]
    failed_audit_cooldown_secs: u64,
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, env = "PROOFMESH_LOG_JSON")]
    log_json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Mode {
    None,
    Merkle,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    proofmesh_shared::process::init_tracing(cli.log_json, "info,libp2p=warn");
    let keypair = if cli.ephemeral_key {
        libp2p::identity::Keypair::generate_secp256k1()
    } else {
        let path = cli.key.unwrap_or_else(|| {
            directories::BaseDirs::new()
                .map(|d| d.data_local_dir().join("proofmesh").join("gateway.key"))
                .unwrap_or_else(|| PathBuf::from("gateway.key"))
        });
        proofmesh_shared::identity::load_or_create(&path).context("loading the node key")?
    };
    let config = GatewayConfig {
        http_listen: cli.listen,
        p2p_listen: cli.p2p_listen,
        bootstrap: cli.bootstrap,
        mdns: cli.mdns,
        keypair,
        challenge_count: usize::from(cli.challenges),
        default_mode: match cli.default_verification_mode {
            Mode::None => VerificationMode::None,
            Mode::Merkle => VerificationMode::Merkle,
        },
        failed_audit_cooldown: std::time::Duration::from_secs(cli.failed_audit_cooldown_secs),
    };
    proofmesh_gateway::run(config, proofmesh_shared::process::shutdown_signal(), None).await?;
    Ok(())
}
