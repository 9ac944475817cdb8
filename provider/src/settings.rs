//! The provider's settings: built-in defaults, then the TOML file (`--config` or
//! `PROOFMESH_CONFIG`), then `PROOFMESH_*` environment variables, then flags. Keys are the flag
//! names with underscores; `proofmesh-provider --print-config` shows the effective result.

use std::net::SocketAddr;
use std::path::PathBuf;

use libp2p::Multiaddr;
use proofmesh_shared::config::{ConfigError, check_range, mask_header};
use proofmesh_shared::telemetry::LogFormat;
use serde::{Deserialize, Serialize};

use crate::engine::{GpuLayers, KvCache};

/// Every provider setting, as written in the TOML file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProviderSettings {
    /// GGUF model to serve; default: the cached default model (see `fetch-model`).
    pub model: Option<PathBuf>,
    /// Model id clients ask for; default: the file name without `.gguf`.
    pub model_name: Option<String>,
    /// CPU threads for llama.cpp; default: all available cores.
    pub threads: Option<u32>,
    /// Context window per sequence, in tokens.
    pub ctx_size: u32,
    /// Sequences decoded together (continuous batching slots).
    pub parallel: u32,
    /// Tokens per `llama_decode` call; also the prompt prefill chunk.
    pub batch_size: u32,
    /// Model layers offloaded to the GPU: a count, or `auto` (all of them on a GPU build).
    pub n_gpu_layers: GpuLayers,
    /// KV cache type: `q8_0` (deterministic: audits of this provider can use the exact tier) or
    /// `f16`.
    pub kv_cache: KvCache,
    /// Contexts kept for re-executing other providers' answers as a referee (0 = never referee).
    pub referee_slots: u32,
    /// Re-executions one gateway may start here per minute.
    pub referee_rate_per_minute: u32,
    /// Peer ids of the gateways this provider referees for, besides the ones in `bootstrap`
    /// (a referee job needs a ticket signed by one of them).
    pub referee_for: Vec<String>,
    /// Re-execution jobs one gateway may hold here at once; 0: all the referee's contexts.
    pub referee_slots_per_gateway: u32,
    /// Peer ids of the only gateways whose requests this provider serves; empty: every gateway.
    pub serve_gateways: Vec<String>,
    /// Credits this provider declares at stake (signed with its key; gateways slash it in their
    /// ledgers on a proven fraud); 0 declares none.
    pub stake: u64,
    /// A private mesh's pre-shared key file (`proofmesh-gateway mesh-key FILE` writes one):
    /// set, only nodes with the same key can connect, over TCP only.
    pub mesh_key_file: Option<PathBuf>,
    /// Relays (`…/p2p/<relay peer id>`, e.g. a gateway's) to hold a reservation at, so that
    /// peers reach this provider from behind NAT; hole punching then makes it direct.
    pub relays: Vec<Multiaddr>,
    /// Addresses this node is reachable at from outside, announced without a test.
    pub external_addresses: Vec<Multiaddr>,
    /// Where a `dynamic-backends` build loads llama.cpp's backends (e.g. `libggml-cuda.so`) from.
    pub backends_dir: Option<PathBuf>,
    /// Mesh listen addresses (TCP and QUIC).
    pub p2p_listen: Vec<Multiaddr>,
    /// Peers to dial at start.
    pub bootstrap: Vec<Multiaddr>,
    /// mDNS discovery on the local network.
    pub mdns: bool,
    /// Node key file (created 0600 on first start); default in the user's data directory.
    pub key: Option<PathBuf>,
    /// Memory for leaves kept for challenges, in MiB.
    pub leaf_store_mb: u64,
    /// HTTP address for `/metrics`, `/healthz` and `/readyz`; unset serves none.
    pub http_listen: Option<SocketAddr>,
    /// Seconds running generations get to finish after SIGTERM.
    pub drain_timeout_secs: u64,
    /// Log line format.
    pub log_format: LogFormat,
    /// OTLP/HTTP endpoint for traces; unset exports nothing.
    pub otlp_endpoint: Option<String>,
    /// Extra OTLP headers, `name=value` (secret: masked by `--print-config`).
    pub otlp_headers: Vec<String>,
}

impl Default for ProviderSettings {
    fn default() -> Self {
        Self {
            model: None,
            model_name: None,
            threads: None,
            ctx_size: 2048,
            parallel: 4,
            batch_size: 512,
            n_gpu_layers: GpuLayers::Auto,
            kv_cache: KvCache::Q8_0,
            referee_slots: 2,
            referee_rate_per_minute: 600,
            referee_for: Vec::new(),
            referee_slots_per_gateway: 0,
            serve_gateways: Vec::new(),
            stake: 0,
            mesh_key_file: None,
            relays: Vec::new(),
            external_addresses: Vec::new(),
            backends_dir: None,
            p2p_listen: ["/ip4/0.0.0.0/tcp/0", "/ip4/0.0.0.0/udp/0/quic-v1"]
                .iter()
                .filter_map(|a| a.parse().ok())
                .collect(),
            bootstrap: Vec::new(),
            mdns: false,
            key: None,
            leaf_store_mb: 256,
            http_listen: None,
            drain_timeout_secs: 30,
            log_format: LogFormat::Text,
            otlp_endpoint: None,
            otlp_headers: Vec::new(),
        }
    }
}

impl ProviderSettings {
    /// The private mesh's key, read from `mesh_key_file` when one is set.
    pub fn mesh_key(
        &self,
    ) -> Result<
        Option<proofmesh_shared::net::mesh_key::PreSharedKey>,
        proofmesh_shared::net::mesh_key::MeshKeyError,
    > {
        self.mesh_key_file
            .as_deref()
            .map(proofmesh_shared::net::mesh_key::load)
            .transpose()
    }

    /// How this provider is reached from behind NAT (a provider relays for nobody).
    pub fn traversal(&self) -> proofmesh_shared::net::Traversal {
        proofmesh_shared::net::Traversal {
            relays: self.relays.clone(),
            external: self.external_addresses.clone(),
            serve: false,
        }
    }

    /// Checks ranges that the types alone do not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(threads) = self.threads {
            check_range("threads", threads, 1..=1024, "1 to 1024")?;
        }
        check_range("ctx_size", self.ctx_size, 64..=1_048_576, "64 to 1048576")?;
        check_range("parallel", self.parallel, 1..=256, "1 to 256")?;
        check_range("batch_size", self.batch_size, 1..=65_536, "1 to 65536")?;
        check_range("referee_slots", self.referee_slots, 0..=64, "0 to 64")?;
        check_range(
            "referee_slots_per_gateway",
            self.referee_slots_per_gateway,
            0..=64,
            "0 to 64",
        )?;
        for (key, peers) in [
            ("referee_for", &self.referee_for),
            ("serve_gateways", &self.serve_gateways),
        ] {
            for peer in peers {
                if peer.parse::<libp2p::PeerId>().is_err() {
                    return Err(ConfigError::OutOfRange {
                        key,
                        value: peer.clone(),
                        why: "a libp2p peer id (12D3Koo… or 16Uiu2…)",
                    });
                }
            }
        }
        check_range(
            "referee_rate_per_minute",
            self.referee_rate_per_minute,
            1..=1_000_000,
            "1 to 1000000",
        )?;
        check_range(
            "leaf_store_mb",
            self.leaf_store_mb,
            1..=1_048_576,
            "1 to 1048576",
        )?;
        check_range(
            "drain_timeout_secs",
            self.drain_timeout_secs,
            0..=3600,
            "0 to 3600",
        )?;
        Ok(())
    }

    /// A copy safe to print: secrets masked.
    pub fn masked(&self) -> Self {
        Self {
            otlp_headers: self.otlp_headers.iter().map(|h| mask_header(h)).collect(),
            ..self.clone()
        }
    }
}
