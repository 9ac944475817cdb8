//! The docker-compose topology as plain processes: one `proofmesh-gateway` and three
//! `proofmesh-provider` binaries started with the same config files (`deploy/*.toml`) and
//! environment files (`deploy/*.env`) as the compose services. What differs between containers
//! and processes on one host is overridden, and only that: file paths, addresses and ports
//! (every node shares 127.0.0.1 here), mDNS (off: it would multicast on this machine's network,
//! so the providers bootstrap from the gateway as the compose file's fallback does), and one
//! llama.cpp thread per provider (three providers share two cores).
//!
//! Through that topology: a chat completion, all three providers in `/v1/models`, key files
//! created 0600, `/metrics` parsed on every node with counters that moved, one OTLP trace holding
//! spans from the gateway and a provider (caught by an in-test collector), a provider's SIGTERM
//! taking it out of routing at once, and the gateway's SIGTERM during a stream: the stream
//! finishes and the process exits 0.

// Test code: a failure is a failed test and should say so loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::collector::Collector;
use support::{metric_sum, parse_metrics, read_stream_signalling};
use tokio::process::{Child, Command};

const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// `KEY=VALUE` lines of a compose env file (comments and blanks skipped).
fn env_file(name: &str) -> Vec<(String, String)> {
    let path = Path::new(REPO).join("deploy").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// The compose env file with the container's config path mapped to the repo's file.
fn compose_env(role: &str) -> HashMap<String, String> {
    let mut env: HashMap<String, String> = env_file(&format!("{role}.env")).into_iter().collect();
    let config = env
        .get("PROOFMESH_CONFIG")
        .cloned()
        .unwrap_or_else(|| panic!("deploy/{role}.env sets no PROOFMESH_CONFIG"));
    let file = Path::new(&config)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert_eq!(
        config,
        format!("/etc/proofmesh/{file}"),
        "compose mounts deploy/ at /etc/proofmesh"
    );
    env.insert(
        "PROOFMESH_CONFIG".into(),
        Path::new(REPO)
            .join("deploy")
            .join(file)
            .display()
            .to_string(),
    );
    env
}

fn provider_binary() -> PathBuf {
    let path =
        Path::new(env!("CARGO_BIN_EXE_proofmesh-gateway")).with_file_name("proofmesh-provider");
    assert!(
        path.is_file(),
        "{} is missing: build it with `cargo build -p proofmesh-provider` (cargo test --workspace does)",
        path.display()
    );
    path
}

/// A node process whose stderr goes to a log file, killed if the test fails.
struct Node {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Node {
    fn spawn(name: &str, binary: &Path, env: &HashMap<String, String>, dir: &Path) -> Self {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(binary)
            .env_remove("RUST_LOG")
            .envs(env)
            // Export spans every 200 ms instead of every 5 s.
            .env("OTEL_BSP_SCHEDULE_DELAY", "200")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Self {
            name: name.into(),
            child,
            log,
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn terminate(&self) {
        let pid = self.child.id().expect("still running").to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(status.success(), "kill -TERM {pid}");
    }

    async fn exit_code(&mut self, within: Duration) -> i32 {
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => status.unwrap().code().unwrap_or(-1),
            Err(_) => panic!(
                "{} did not exit within {within:?}; log:\n{}",
                self.name,
                self.log_tail()
            ),
        }
    }
}

async fn get_json(http: &reqwest::Client, url: &str) -> Option<(u16, Value)> {
    let response = http.get(url).send().await.ok()?;
    let status = response.status().as_u16();
    Some((status, response.json().await.ok()?))
}

async fn metrics(http: &reqwest::Client, url: &str) -> prometheus_parse::Scrape {
    parse_metrics(&http.get(url).send().await.unwrap().text().await.unwrap())
}

async fn providers_listed(http: &reqwest::Client, base: &str) -> u64 {
    match get_json(http, &format!("{base}/v1/models")).await {
        Some((200, models)) => models["data"][0]["proofmesh"]["providers"]
            .as_u64()
            .unwrap_or(0),
        _ => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_topology_as_processes() {
    let model = support::model_path();
    let dir = std::env::temp_dir().join(format!("proofmesh-topology-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let collector = Collector::start().await;
    let http = reqwest::Client::new();

    // The gateway: compose env + deploy/gateway.toml, with this host's addresses.
    let http_port = support::free_port();
    let p2p_port = support::free_port();
    let mut env = compose_env("gateway");
    env.extend([
        (
            "PROOFMESH_HTTP_LISTEN".into(),
            format!("127.0.0.1:{http_port}"),
        ),
        (
            "PROOFMESH_P2P_LISTEN".into(),
            format!("/ip4/127.0.0.1/tcp/{p2p_port}"),
        ),
        ("PROOFMESH_MDNS".into(), "false".into()),
        (
            "PROOFMESH_KEY".into(),
            dir.join("gateway.key").display().to_string(),
        ),
        ("PROOFMESH_OTLP_ENDPOINT".into(), collector.endpoint()),
        (
            "PROOFMESH_EVIDENCE_DIR".into(),
            dir.join("evidence").display().to_string(),
        ),
        (
            "PROOFMESH_STATE_DIR".into(),
            dir.join("state").display().to_string(),
        ),
        (
            "PROOFMESH_REFEREE_MODEL".into(),
            model.display().to_string(),
        ),
        ("PROOFMESH_REFEREE_THREADS".into(), "1".into()),
    ]);
    let mut gateway = Node::spawn(
        "gateway",
        Path::new(env!("CARGO_BIN_EXE_proofmesh-gateway")),
        &env,
        &dir,
    );
    let base = format!("http://127.0.0.1:{http_port}");

    // Three providers: compose env + deploy/provider.toml, bootstrapping from the gateway.
    let mut providers = Vec::new();
    let mut provider_metrics = Vec::new();
    for i in 1..=3 {
        let ops_port = support::free_port();
        let mut env = compose_env("provider");
        env.extend([
            ("PROOFMESH_MODEL".into(), model.display().to_string()),
            ("PROOFMESH_P2P_LISTEN".into(), "/ip4/127.0.0.1/tcp/0".into()),
            (
                "PROOFMESH_HTTP_LISTEN".into(),
                format!("127.0.0.1:{ops_port}"),
            ),
            (
                "PROOFMESH_BOOTSTRAP".into(),
                format!("/ip4/127.0.0.1/tcp/{p2p_port}"),
            ),
            ("PROOFMESH_MDNS".into(), "false".into()),
            (
                "PROOFMESH_KEY".into(),
                dir.join(format!("provider{i}.key")).display().to_string(),
            ),
            ("PROOFMESH_THREADS".into(), "1".into()),
            ("PROOFMESH_OTLP_ENDPOINT".into(), collector.endpoint()),
        ]);
        providers.push(Node::spawn(
            &format!("provider{i}"),
            &provider_binary(),
            &env,
            &dir,
        ));
        provider_metrics.push(format!("http://127.0.0.1:{ops_port}/metrics"));
    }

    // Ready once all three serve.
    let started = Instant::now();
    while providers_listed(&http, &base).await < 3 {
        if started.elapsed() > Duration::from_secs(120) {
            let logs: Vec<String> = std::iter::once(&gateway)
                .chain(&providers)
                .map(|n| format!("--- {}\n{}", n.name, n.log_tail()))
                .collect();
            panic!("three providers never listed:\n{}", logs.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("3 providers listed after {:?}", started.elapsed());
    let (status, ready) = get_json(&http, &format!("{base}/readyz")).await.unwrap();
    assert_eq!((status, ready["status"].as_str()), (200, Some("ready")));
    for key in [
        "gateway.key",
        "provider1.key",
        "provider2.key",
        "provider3.key",
    ] {
        let mode = std::fs::metadata(dir.join(key))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{key} has mode {mode:o}");
    }

    // A verified chat completion.
    let body = json!({
        "model": support::MODEL,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 24,
        "temperature": 0,
        "verification_mode": "merkle",
    });
    let response = http
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["proofmesh"]["verdict"], "passed", "{answer}");
    let completion_tokens = answer["usage"]["completion_tokens"].as_f64().unwrap();
    assert!(completion_tokens > 0.0);
    // The gateway's own engine refereed the answer, in the exact tier (same build).
    assert_eq!(answer["proofmesh"]["referee"], "local", "{answer}");
    assert_eq!(answer["proofmesh"]["audit"]["tier"], "exact", "{answer}");

    // Metrics on every node parse, and the counters moved.
    let scrape = metrics(&http, &format!("{base}/metrics")).await;
    let served = metric_sum(
        &scrape,
        "proofmesh_gateway_requests_total",
        &[("mode", "merkle"), ("status", "200")],
    );
    assert_eq!(served, 1.0, "requests counter: {:?}", scrape.samples);
    assert_eq!(
        metric_sum(&scrape, "proofmesh_gateway_tokens_generated_total", &[]),
        completion_tokens
    );
    assert_eq!(
        metric_sum(
            &scrape,
            "proofmesh_gateway_audits_total",
            &[("verdict", "passed")]
        ),
        1.0
    );
    assert_eq!(metric_sum(&scrape, "proofmesh_gateway_providers", &[]), 3.0);
    assert_eq!(
        metric_sum(
            &scrape,
            "proofmesh_gateway_time_to_first_token_seconds_count",
            &[]
        ),
        1.0
    );
    let mut predicted = 0.0;
    let mut completed = 0.0;
    for url in &provider_metrics {
        let scrape = metrics(&http, url).await;
        assert!(metric_sum(&scrape, "proofmesh_model_load_seconds", &[]) > 0.0);
        assert!(metric_sum(&scrape, "proofmesh_peers_connected", &[]) >= 1.0);
        predicted += metric_sum(&scrape, "proofmesh_tokens_predicted_total", &[]);
        completed += metric_sum(
            &scrape,
            "proofmesh_requests_total",
            &[("outcome", "completed")],
        );
    }
    assert_eq!((predicted, completed), (completion_tokens, 1.0));
    // The gateway refereed the answer itself (deploy/gateway.toml mounts the model as its
    // referee): no provider's word was needed, and none was asked.
    let scrape = metrics(&http, &format!("{base}/metrics")).await;
    assert_eq!(
        metric_sum(
            &scrape,
            "proofmesh_gateway_audits_total",
            &[("verdict", "passed")]
        ),
        1.0
    );
    for url in &provider_metrics {
        let scrape = metrics(&http, url).await;
        assert_eq!(
            metric_sum(&scrape, "proofmesh_referee_jobs_total", &[]),
            0.0
        );
    }

    // One trace with the gateway's and the provider's spans.
    let started = Instant::now();
    let joint = loop {
        let spans = collector.spans();
        let mut by_trace: HashMap<&str, Vec<&support::collector::SpanRecord>> = HashMap::new();
        for span in &spans {
            by_trace.entry(&span.trace_id).or_default().push(span);
        }
        let joint = by_trace.values().find(|spans| {
            let has = |service: &str, name: Option<&str>| {
                spans
                    .iter()
                    .any(|s| s.service == service && name.is_none_or(|n| s.name == n))
            };
            // (The gateway referees itself here, so no provider.referee span joins it.)
            has("proofmesh-gateway", Some("chat.completions"))
                && has("proofmesh-provider", Some("provider.generate"))
        });
        if let Some(joint) = joint {
            break joint
                .iter()
                .map(|s| format!("{}:{}", s.service, s.name))
                .collect::<Vec<_>>();
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no trace spans both nodes; received: {spans:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("one trace: {joint:?}");

    // A provider's SIGTERM while it serves a merkle request: the answer still arrives and passes
    // its audit, the provider leaves routing at once, and it exits 0.
    let mut leaving = providers.pop().unwrap();
    let ops = provider_metrics.pop().unwrap();
    let ops_base = ops.trim_end_matches("/metrics").to_owned();
    let (_, health) = get_json(&http, &format!("{ops_base}/healthz"))
        .await
        .unwrap();
    let leaving_peer = health["peer_id"].as_str().unwrap().to_owned();
    let mut pinned = body.clone();
    pinned["max_tokens"] = json!(64);
    let pinned_request = {
        let http = http.clone();
        let url = format!("{base}/v1/chat/completions");
        let peer = leaving_peer.clone();
        tokio::spawn(async move {
            let response = http
                .post(url)
                .header("x-proofmesh-provider", peer)
                .json(&pinned)
                .send()
                .await
                .unwrap();
            (
                response.status().as_u16(),
                response.json::<Value>().await.unwrap(),
            )
        })
    };
    let started = Instant::now();
    while metric_sum(
        &metrics(&http, &ops).await,
        "proofmesh_requests_processing",
        &[],
    ) < 1.0
    {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "pinned request never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    leaving.terminate();
    let started = Instant::now();
    while providers_listed(&http, &base).await != 2 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the leaving provider is still listed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("provider unlisted {:?} after SIGTERM", started.elapsed());
    let (status, answer) = pinned_request.await.unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["proofmesh"]["provider"], leaving_peer.as_str());
    assert_eq!(answer["proofmesh"]["verdict"], "passed", "{answer}");
    assert_eq!(leaving.exit_code(Duration::from_secs(30)).await, 0);

    // The gateway's SIGTERM in the middle of a stream: the stream finishes, the process exits 0.
    let mut body = body;
    body["stream"] = json!(true);
    body["max_tokens"] = json!(96);
    body["messages"][0]["content"] = json!("Write a short story about a lighthouse keeper.");
    let response = http
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let (received, terminated) =
        read_stream_signalling(response, Duration::from_secs(120), || gateway.terminate()).await;
    let terminated = terminated.is_some();
    assert!(terminated, "the stream ended before it started: {received}");
    assert!(
        received.trim_end().ends_with("data: [DONE]"),
        "the stream did not finish: {received}"
    );
    assert!(received.contains("\"verdict\":\"passed\""), "{received}");
    assert_eq!(gateway.exit_code(Duration::from_secs(40)).await, 0);

    for provider in &providers {
        provider.terminate();
    }
    for provider in &mut providers {
        assert_eq!(provider.exit_code(Duration::from_secs(30)).await, 0);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
