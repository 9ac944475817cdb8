//! mDNS discovery between two hosts: two network namespaces joined by a veth pair, created and
//! deleted by this test (so no multicast leaves the machine). A provider node runs in one, a
//! gateway node in the other, neither told about the other; the gateway must find the provider.
//!
//! The test re-executes its own binary inside each namespace (`ip netns exec`); the child knows
//! its part from `PROOFMESH_MDNS_ROLE`. Needs root and iproute2, as CI has.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/netns.rs"]
mod netns;
mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use netns::{Hosts, ip};
use proofmesh_shared::net::{self, Event, NetConfig, Role};
use support::caps;

const TEST_NAME: &str = "mdns_discovery_between_network_namespaces";

/// The child's part: run a node with mDNS on; the gateway exits once it found a provider.
async fn child(role: &str) {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    let role = if role == "provider" {
        Role::Provider(caps())
    } else {
        Role::Gateway
    };
    let is_gateway = matches!(role, Role::Gateway);
    let (_client, mut events, event_loop) = net::new(NetConfig {
        keypair: libp2p::identity::Keypair::generate_secp256k1(),
        listen: vec!["/ip4/0.0.0.0/tcp/0".parse().unwrap()],
        bootstrap: vec![],
        mdns: true,
        role,
        psk: None,
        traversal: Default::default(),
    })
    .unwrap();
    tokio::spawn(event_loop.run());
    let deadline = tokio::time::sleep(Duration::from_secs(40));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            event = events.recv() => {
                if let Some(Event::ProviderUp { peer, capabilities }) = event {
                    assert_eq!(capabilities, caps());
                    println!("FOUND {peer}");
                    if is_gateway {
                        return;
                    }
                }
            }
            () = &mut deadline => {
                assert!(!is_gateway, "gateway found no provider over mDNS in 40 s");
                return;
            }
        }
    }
}

#[tokio::test]
async fn mdns_discovery_between_network_namespaces() {
    if let Ok(role) = std::env::var("PROOFMESH_MDNS_ROLE") {
        child(&role).await;
        return;
    }
    let tag = std::process::id() % 100_000;
    let (ns_a, ns_b) = (format!("pm-mdns-a-{tag}"), format!("pm-mdns-b-{tag}"));
    let (veth_a, veth_b) = (format!("pmva{tag}"), format!("pmvb{tag}"));
    let mut hosts = Hosts::default();
    for ns in [&ns_a, &ns_b] {
        ip(&["netns", "add", ns]);
        hosts.namespaces.push(ns.clone());
    }
    ip(&[
        "link", "add", &veth_a, "type", "veth", "peer", "name", &veth_b,
    ]);
    for (ns, veth, addr) in [
        (&ns_a, &veth_a, "10.231.77.1/24"),
        (&ns_b, &veth_b, "10.231.77.2/24"),
    ] {
        ip(&["link", "set", veth, "netns", ns]);
        ip(&["-n", ns, "addr", "add", addr, "dev", veth]);
        ip(&["-n", ns, "link", "set", veth, "up", "multicast", "on"]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
        ip(&["-n", ns, "route", "add", "224.0.0.0/4", "dev", veth]);
    }
    let exe = std::env::current_exe().unwrap();
    let spawn = |ns: &str, role: &str| {
        Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(&exe)
            .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
            .env("PROOFMESH_MDNS_ROLE", role)
            .stdout(Stdio::piped())
            .stderr(match std::env::var_os("PROOFMESH_MDNS_DEBUG") {
                Some(dir) => Stdio::from(
                    std::fs::File::create(std::path::Path::new(&dir).join(role)).unwrap(),
                ),
                None => Stdio::null(),
            })
            .spawn()
            .unwrap()
    };
    hosts.children.push(spawn(&ns_a, "provider"));
    let gateway = spawn(&ns_b, "gateway");
    let started = Instant::now();
    let output = gateway.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "gateway child failed:\n{stdout}");
    assert!(stdout.contains("FOUND "), "{stdout}");
    eprintln!(
        "gateway found the provider over mDNS in {:?}",
        started.elapsed()
    );
}
