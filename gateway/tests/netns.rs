//! Real network topologies, each host a Linux network namespace this test creates, joined by
//! veth links; nothing leaves the namespaces. Needs root (`ip netns`, and `iptables` for the
//! NAT routers); without them each test says so and passes vacuously.
//!
//! - A cut link: the gateway and two providers on their own hosts (the test reaches the
//!   gateway's HTTP port over a third link). While both providers generate, one provider's link
//!   is cut: its requests fail over to the other provider (nothing had reached the clients),
//!   and every request succeeds. The cut then heals: the provider dials the gateway again and
//!   serves.
//! - NAT traversal: a gateway and a provider each behind its own masquerading NAT router, a
//!   relay (a second gateway) on the "internet" between them. The provider reserves a slot at
//!   the relay, the gateway finds it in the relay's DHT and reaches it through a circuit,
//!   hole punching (DCUtR) upgrades that to a direct connection through both NATs, and a
//!   completion is served over it. A second provider behind a symmetric NAT, reached through
//!   the relay at the circuit address the gateway was given, cannot be punched through and is
//!   never routed to. `proofmesh-provider
//!   doctor` says "relayed" behind the NAT, "behind NAT" there without a relay, and "direct"
//!   on a public host.

// Test code: a failure is a failed test and should say so loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../shared/tests/support/netns.rs"]
mod netns;
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use netns::{Hosts, can_make_namespaces, ip};
use serde_json::{Value, json};

const HTTP_PORT: u16 = 18080;

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

/// Makes `ns` a router: it forwards, and `via` (if any) is its default route.
fn router(ns: &str, via: Option<&str>) {
    let status = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_forward=1",
        ])
        .status()
        .unwrap();
    assert!(status.success(), "cannot enable forwarding in {ns}");
    if let Some(via) = via {
        default_route(ns, via);
    }
}

fn default_route(ns: &str, via: &str) {
    ip(&["-n", ns, "route", "add", "default", "via", via]);
}

/// A masquerading NAT on router `ns` for the hosts of `lan`, as on a home router: mappings
/// keep the source port where they can, and a connection from outside gets in only as the
/// reply to one from inside (Linux conntrack); anything else is dropped without an answer.
/// `symmetric`: each connection gets a random port, so no port a peer saw can be reused (hole
/// punching cannot work).
fn masquerade(ns: &str, lan: &str, symmetric: bool) -> bool {
    let iptables = |args: &[&str]| {
        Command::new("ip")
            .args(["netns", "exec", ns, "iptables"])
            .args(args)
            .status()
            .is_ok_and(|s| s.success())
    };
    let mut nat = vec![
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "-s",
        lan,
        "-j",
        "MASQUERADE",
    ];
    if symmetric {
        nat.push("--random");
    }
    iptables(&nat) && iptables(&["-A", "INPUT", "-p", "tcp", "--syn", "-j", "DROP"])
}

fn spawn(hosts: &mut Hosts, ns: &str, binary: &Path, args: &[String], log: PathBuf) {
    let child = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(binary)
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("PROOFMESH_NETNS_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(log).unwrap()))
        .spawn()
        .unwrap();
    hosts.children.push(child);
}

/// A small provider of the default model on port 4001 of its host, dialling `bootstrap`.
fn provider_args(bootstrap: &str, extra: &[&str]) -> Vec<String> {
    let model = support::model_path().display().to_string();
    let common = [
        "--model",
        &model,
        "--ephemeral-key",
        "--threads",
        "1",
        "--ctx-size",
        "512",
        "--referee-slots",
        "0",
        "--p2p-listen",
        "/ip4/0.0.0.0/tcp/4001",
        "--bootstrap",
        bootstrap,
    ];
    common
        .iter()
        .chain(extra)
        .map(ToString::to_string)
        .collect()
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
            &provider_args(
                &format!("/ip4/10.78.{net}.1/tcp/4001"),
                &["--parallel", "2"],
            ),
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
    // Requests it failed across the cut put it last in line for up to the registry's longest
    // cooldown (5 s doubling per failure in a row, at most MAX_COOLDOWN); so ask until it has
    // served one, for as long as that cooldown and a margin (a dozen quick requests could all
    // fall inside it, which made this test flaky).
    let mut seen = std::collections::HashSet::new();
    let patience = proofmesh_gateway::registry::MAX_COOLDOWN + Duration::from_secs(20);
    while seen.len() < 2 && healed_at.elapsed() < rejoined + patience {
        let (status, provider, body) = complete(http.clone(), url.clone(), 16).await;
        assert_eq!(status, 200, "{body}");
        seen.insert(provider);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(seen.len(), 2, "the healed provider is routed to again");
    println!(
        "netns: 4 requests across the cut all succeeded (answered by {answered_by:?}), the last \
         {failover_took:?} after the cut; the provider rejoined {rejoined:?} after the link \
         came back"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The peer id a node logs with its first listen address.
async fn logged_peer_id(log: &Path) -> String {
    // A provider loads and hashes its model first.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(at) = text.find(" peer=") {
            let rest = &text[at + " peer=".len()..];
            let id: String = rest
                .chars()
                .take_while(char::is_ascii_alphanumeric)
                .collect();
            if !id.is_empty() {
                return id;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no peer id in {}:\n{text}",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until `log` holds `needle`.
async fn wait_for_log(log: &Path, needle: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} has no {needle:?} after {within:?}:\n{text}",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Runs `proofmesh-provider doctor --json` on host `ns`: its exit code and its findings.
fn doctor(ns: &str, provider_bin: &Path, args: &[String]) -> (i32, Value) {
    let started = Instant::now();
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(provider_bin)
        .args(["doctor", "--json", "--wait-secs", "40"])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "doctor on {ns}, {:?}:\n{}",
        started.elapsed(),
        String::from_utf8_lossy(&out.stderr)
    );
    let findings = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "doctor on {ns} printed no JSON ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), findings)
}

#[tokio::test]
async fn a_provider_behind_nat_is_reached_through_a_relay_then_directly() {
    if !can_make_namespaces() {
        eprintln!("SKIPPED: cannot create network namespaces here (needs root and iproute2)");
        return;
    }
    let tag = std::process::id() % 10_000 + 1;
    let dir = std::env::temp_dir().join(format!("proofmesh-nat-{tag}"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut hosts = Hosts::default();
    let [inet, nat_a, nat_b, nat_c, gw, prov, prov_c, public] =
        ["in", "na", "nb", "nc", "gw", "pv", "pc", "pu"].map(|name| format!("pm-{name}-{tag}"));
    for ns in [&inet, &nat_a, &nat_b, &nat_c, &gw, &prov, &prov_c, &public] {
        ip(&["netns", "add", ns]);
        hosts.namespaces.push(ns.clone());
        ip(&["-n", ns, "link", "set", "lo", "up"]);
    }
    // The "internet": the relay's host, joined to each NAT router's WAN side and to a public
    // host. Behind NAT A the gateway, behind NAT B the provider, behind the symmetric NAT C a
    // second provider; the test reaches the gateway's HTTP port over its own link.
    link(Some(&inet), &nat_a, 21, tag);
    link(Some(&inet), &nat_b, 22, tag);
    link(Some(&inet), &public, 23, tag);
    link(Some(&nat_a), &gw, 24, tag);
    link(Some(&nat_b), &prov, 25, tag);
    link(None, &gw, 26, tag);
    link(Some(&inet), &nat_c, 27, tag);
    link(Some(&nat_c), &prov_c, 28, tag);
    router(&inet, None);
    router(&nat_a, Some("10.78.21.1"));
    router(&nat_b, Some("10.78.22.1"));
    router(&nat_c, Some("10.78.27.1"));
    default_route(&gw, "10.78.24.1");
    default_route(&prov, "10.78.25.1");
    default_route(&prov_c, "10.78.28.1");
    default_route(&public, "10.78.23.1");
    if !masquerade(&nat_a, "10.78.24.0/24", false)
        || !masquerade(&nat_b, "10.78.25.0/24", false)
        || !masquerade(&nat_c, "10.78.28.0/24", true)
    {
        eprintln!("SKIPPED: iptables cannot masquerade here (install iptables; needs nf_nat)");
        return;
    }

    let gateway_bin = PathBuf::from(env!("CARGO_BIN_EXE_proofmesh-gateway"));
    let provider_bin = gateway_bin.with_file_name("proofmesh-provider");
    assert!(provider_bin.is_file(), "build proofmesh-provider first");
    let relay_addr = "/ip4/10.78.21.1/tcp/4001";
    let relay_log = dir.join("relay.log");
    spawn(
        &mut hosts,
        &inet,
        &gateway_bin,
        &[
            "--http-listen".into(),
            "127.0.0.1:18080".into(),
            "--p2p-listen".into(),
            "/ip4/0.0.0.0/tcp/4001".into(),
            "--external-addresses".into(),
            relay_addr.into(),
            "--ephemeral-key".into(),
            "--allow-unrefereed".into(),
            "--state-dir".into(),
            dir.join("relay-state").display().to_string(),
        ],
        relay_log.clone(),
    );
    let relay = format!("{relay_addr}/p2p/{}", logged_peer_id(&relay_log).await);
    // Two providers holding reservations at the relay: behind NAT B, and behind the
    // symmetric NAT C.
    let (provider_log, symmetric_log) =
        (dir.join("provider.log"), dir.join("provider-symmetric.log"));
    for (host, log) in [(&prov, &provider_log), (&prov_c, &symmetric_log)] {
        let args = provider_args(relay_addr, &["--relays", &relay]);
        spawn(&mut hosts, host, &provider_bin, &args, log.clone());
    }
    let provider_id = logged_peer_id(&provider_log).await;
    let symmetric_id = logged_peer_id(&symmetric_log).await;
    let gateway_log = dir.join("gateway.log");
    spawn(
        &mut hosts,
        &gw,
        &gateway_bin,
        &[
            "--http-listen".into(),
            format!("10.78.26.2:{HTTP_PORT}"),
            "--p2p-listen".into(),
            "/ip4/0.0.0.0/tcp/4001".into(),
            // The relay, where the DHT holds the provider behind NAT B with its circuit
            // address; and the symmetric provider's circuit, as an operator who knows it would
            // give it.
            "--bootstrap".into(),
            format!("{relay_addr},{relay}/p2p-circuit/p2p/{symmetric_id}"),
            "--relay-service".into(),
            "false".into(),
            "--ephemeral-key".into(),
            "--allow-unrefereed".into(),
            "--state-dir".into(),
            dir.join("gateway-state").display().to_string(),
        ],
        gateway_log.clone(),
    );

    // The provider's only way in is the relay: the gateway finds it in the DHT and reaches it
    // through a circuit...
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let base = format!("http://10.78.26.2:{HTTP_PORT}");
    let started = Instant::now();
    wait_for_providers(&http, &base, 1, Duration::from_secs(240)).await;
    let found = started.elapsed();
    // ...and hole punching through both NATs makes it direct.
    wait_for_log(
        &gateway_log,
        "direct connection by hole punching",
        Duration::from_secs(60),
    )
    .await;
    let punched = started.elapsed();
    let (status, answered_by, body) =
        complete(http.clone(), format!("{base}/v1/chat/completions"), 64).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(answered_by, provider_id);
    assert!(
        std::fs::read_to_string(&provider_log)
            .unwrap()
            .contains("relay reservation accepted"),
        "the provider held a reservation at the relay"
    );

    // Behind the symmetric NAT, hole punching fails: reached only through the relay, which
    // cuts circuits at 128 KiB, that provider is never routed to.
    let gateway_id = logged_peer_id(&gateway_log).await;
    // The gateway did reach it, through the relay...
    wait_for_log(
        &gateway_log,
        &format!("provider reachable only through a relay; not routed to until direct peer={symmetric_id}"),
        Duration::from_secs(240),
    )
    .await;
    // ...and the punch between the two failed.
    wait_for_log(
        &symmetric_log,
        &format!("hole punching failed; staying relayed peer={gateway_id}"),
        Duration::from_secs(120),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        providers_up(&http, &base).await,
        1,
        "a provider reached only through a relay is not routed to"
    );

    // The doctor, behind NAT B with the relay: relayed; behind it without: behind NAT.
    let probe = |port: u16| {
        vec![
            "--p2p-listen".to_string(),
            format!("/ip4/0.0.0.0/tcp/{port}"),
            "--bootstrap".into(),
            relay_addr.into(),
        ]
    };
    let mut with_relay = probe(4002);
    with_relay.extend(["--relays".to_string(), relay.clone()]);
    let doctor_started = Instant::now();
    let (code, findings) = doctor(&prov, &provider_bin, &with_relay);
    assert_eq!(findings["verdict"], "relayed", "{findings:#}");
    assert_eq!(code, 0);
    assert!(
        findings["reachability"]["unreachable"]
            .as_array()
            .is_some_and(|a| !a.is_empty()),
        "AutoNAT tried the NAT's address and failed: {findings:#}"
    );
    let (code, findings) = doctor(&prov, &provider_bin, &probe(4003));
    assert_eq!(findings["verdict"], "behind_nat", "{findings:#}");
    assert_eq!(code, 3);
    // On a public host: direct.
    let (code, findings) = doctor(&public, &provider_bin, &probe(4001));
    assert_eq!(findings["verdict"], "direct", "{findings:#}");
    assert_eq!(code, 0);
    println!(
        "nat: the gateway found the provider behind NAT through the relay {found:?} after start, \
         hole punching made it direct at {punched:?}; doctor: relayed, behind NAT, direct \
         (three runs, {:?})",
        doctor_started.elapsed()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
