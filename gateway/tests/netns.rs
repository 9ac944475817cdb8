//! Real network topology: the gateway and two providers, each on its own host (a Linux network
//! namespace this test creates, joined to the gateway's by a veth link; the test itself reaches
//! the gateway's HTTP port over a third link). While both providers generate, one provider's
//! link is cut: its requests fail over to the other provider (nothing had reached the clients),
//! and every request succeeds. The cut then heals: the provider dials the gateway again and
//! serves. Nothing leaves the namespaces. Needs root (`ip netns`); without it the test says so
//! and passes vacuously.

// Test code: a failure is a failed test and should say so loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const HTTP_PORT: u16 = 18080;

/// Namespaces and processes, removed on drop whatever happens.
#[derive(Default)]
struct Hosts {
    namespaces: Vec<String>,
    children: Vec<Child>,
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
        }
    }
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("iproute2");
    assert!(status.success(), "ip {} failed", args.join(" "));
}

/// Whether this process may create network namespaces.
fn can_make_namespaces() -> bool {
    let probe = format!("pm-probe-{}", std::process::id());
    let made = Command::new("ip")
        .args(["netns", "add", &probe])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if made {
        let _ = Command::new("ip")
            .args(["netns", "delete", &probe])
            .status();
    }
    made
}

/// A veth link between `a` (None: this test's own namespace) and `b`, addresses `.1` and `.2`
/// of `10.78.<net>.0/24`.
fn link(a: Option<&str>, b: &str, net: u8, tag: u32) -> String {
    let (end_a, end_b) = (format!("pm{tag}a{net}"), format!("pm{tag}b{net}"));
    ip(&[
        "link", "add", &end_a, "type", "veth", "peer", "name", &end_b,
    ]);
    for (ns, end, host) in [(a, &end_a, 1), (Some(b), &end_b, 2)] {
        let addr = format!("10.78.{net}.{host}/24");
        match ns {
            Some(ns) => {
                ip(&["link", "set", end, "netns", ns]);
                ip(&["-n", ns, "addr", "add", &addr, "dev", end]);
                ip(&["-n", ns, "link", "set", end, "up"]);
            }
            None => {
                ip(&["addr", "add", &addr, "dev", end]);
                ip(&["link", "set", end, "up"]);
            }
        }
    }
    end_a
}

fn spawn(hosts: &mut Hosts, ns: &str, binary: &Path, args: &[String], log: PathBuf) {
    let child = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(binary)
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(log).unwrap()))
        .spawn()
        .unwrap();
    hosts.children.push(child);
}

async fn providers_up(http: &reqwest::Client, base: &str) -> u64 {
    let Ok(resp) = http.get(format!("{base}/healthz")).send().await else {
        return 0;
    };
    let body: Value = resp.json().await.unwrap_or_default();
    body["providers"].as_u64().unwrap_or(0)
}

async fn wait_for_providers(http: &reqwest::Client, base: &str, n: u64, within: Duration) {
    let deadline = Instant::now() + within;
    while providers_up(http, base).await != n {
        assert!(
            Instant::now() < deadline,
            "the gateway did not see {n} providers within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One plain completion: the status and the provider that answered.
async fn complete(http: reqwest::Client, url: String, max_tokens: u32) -> (u16, String, String) {
    let resp = http
        .post(url)
        .json(&json!({
            "model": "SmolLM2-135M-Instruct.Q4_1",
            "messages": [{"role": "user", "content": "Count from 1 to 100, one number per line."}],
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "verification_mode": "none",
        }))
        .timeout(Duration::from_secs(280))
        .send()
        .await
        .expect("an answer before the client's timeout");
    let status = resp.status().as_u16();
    let provider = resp
        .headers()
        .get("x-proofmesh-provider")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    (status, provider, resp.text().await.unwrap_or_default())
}

#[tokio::test]
async fn a_cut_link_fails_over_and_the_partition_heals() {
    if !can_make_namespaces() {
        eprintln!("SKIPPED: cannot create network namespaces here (needs root and iproute2)");
        return;
    }
    let tag = std::process::id() % 10_000;
    let dir = std::env::temp_dir().join(format!("proofmesh-netns-{tag}"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut hosts = Hosts::default();
    let (gw, p1, p2) = (
        format!("pm-gw-{tag}"),
        format!("pm-p1-{tag}"),
        format!("pm-p2-{tag}"),
    );
    for ns in [&gw, &p1, &p2] {
        ip(&["netns", "add", ns]);
        hosts.namespaces.push(ns.clone());
        ip(&["-n", ns, "link", "set", "lo", "up"]);
    }
    // The test's own link to the gateway host, then one link per provider host.
    link(None, &gw, 0, tag);
    let cut_end = link(Some(&gw), &p1, 1, tag);
    link(Some(&gw), &p2, 2, tag);

    let gateway_bin = PathBuf::from(env!("CARGO_BIN_EXE_proofmesh-gateway"));
    let provider_bin = gateway_bin.with_file_name("proofmesh-provider");
    assert!(provider_bin.is_file(), "build proofmesh-provider first");
    let model = support::model_path();
    spawn(
        &mut hosts,
        &gw,
        &gateway_bin,
        &[
            "--http-listen".into(),
            format!("10.78.0.2:{HTTP_PORT}"),
            "--p2p-listen".into(),
            "/ip4/0.0.0.0/tcp/4001".into(),
            "--ephemeral-key".into(),
            "--allow-unrefereed".into(),
            "--state-dir".into(),
            dir.join("state").display().to_string(),
        ],
        dir.join("gateway.log"),
    );
    for (ns, net) in [(&p1, 1), (&p2, 2)] {
        spawn(
            &mut hosts,
            ns,
            &provider_bin,
            &[
                "--model".into(),
                model.display().to_string(),
                "--ephemeral-key".into(),
                "--threads".into(),
                "1".into(),
                "--parallel".into(),
                "2".into(),
                "--ctx-size".into(),
                "512".into(),
                "--referee-slots".into(),
                "0".into(),
                "--p2p-listen".into(),
                "/ip4/0.0.0.0/tcp/4001".into(),
                "--bootstrap".into(),
                format!("/ip4/10.78.{net}.1/tcp/4001"),
            ],
            dir.join(format!("{ns}.log")),
        );
    }
    // Straight to the namespace: no proxy from the environment.
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let base = format!("http://10.78.0.2:{HTTP_PORT}");
    wait_for_providers(&http, &base, 2, Duration::from_secs(120)).await;

    // Four long answers at once: both providers' two slots busy.
    let url = format!("{base}/v1/chat/completions");
    let requests: Vec<_> = (0..4)
        .map(|_| tokio::spawn(complete(http.clone(), url.clone(), 160)))
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Provider 1's host loses its link to the gateway, silently (no reset, no FIN).
    ip(&["-n", &gw, "link", "set", &cut_end, "down"]);
    let cut_at = Instant::now();
    let mut answered_by = Vec::new();
    for request in requests {
        let (status, provider, body) = request.await.unwrap();
        assert_eq!(status, 200, "a request failed across the cut: {body}");
        answered_by.push(provider);
    }
    let failover_took = cut_at.elapsed();
    wait_for_providers(&http, &base, 1, Duration::from_secs(60)).await;

    // The partition heals: provider 1 dials the gateway again and is routed to.
    ip(&["-n", &gw, "link", "set", &cut_end, "up"]);
    let healed_at = Instant::now();
    wait_for_providers(&http, &base, 2, Duration::from_secs(90)).await;
    let rejoined = healed_at.elapsed();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..12 {
        let (status, provider, body) = complete(http.clone(), url.clone(), 16).await;
        assert_eq!(status, 200, "{body}");
        seen.insert(provider);
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen.len(), 2, "the healed provider is routed to again");
    println!(
        "netns: 4 requests across the cut all succeeded (answered by {answered_by:?}), the last \
         {failover_took:?} after the cut; the provider rejoined {rejoined:?} after the link \
         came back"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
