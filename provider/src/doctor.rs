//! `proofmesh-provider doctor`: can peers reach this machine, and how?
//!
//! Starts a short-lived mesh node with the provider's network settings (listen addresses,
//! bootstrap peers, relays, mesh key; a throw-away key, no model), lets the bootstrap peers
//! see it, and waits for the answers: the addresses peers saw, which of them AutoNAT servers
//! could dial back, and whether the relays accepted a reservation. The verdict is one of
//! reachable directly, relayed (behind NAT, peers upgrade by hole punching), behind NAT and
//! unreachable, or unknown.

use std::time::{Duration, Instant};

use proofmesh_shared::net::{self, NetConfig, NetError, Reachability, Role, Verdict};

/// How often the probe looks at what it learned.
const POLL: Duration = Duration::from_millis(500);

/// Runs the probe for at most `wait` (less once every question has its answer) and returns
/// what it learned. `progress` hears each new finding as one line.
pub async fn examine(
    config: NetConfig,
    wait: Duration,
    mut progress: impl FnMut(&str),
) -> Result<Reachability, NetError> {
    let relays = config.traversal.relays.len();
    let nobody = config.bootstrap.is_empty() && relays == 0 && !config.mdns;
    let (client, _events, event_loop) = net::new(NetConfig {
        role: Role::Probe,
        ..config
    })?;
    let task = tokio::spawn(event_loop.run());
    let started = Instant::now();
    let mut seen = Reachability::default();
    let result = loop {
        let now = match client.reachability().await {
            Ok(now) => now,
            Err(e) => break Err(e),
        };
        for line in news(&seen, &now) {
            progress(&line);
        }
        seen = now;
        if settled(&seen, relays) || started.elapsed() >= wait {
            break Ok(seen);
        }
        if nobody {
            progress(
                "no --bootstrap peer, --relays or --mdns given: nobody can tell how this node is seen",
            );
            break Ok(seen);
        }
        tokio::time::sleep(POLL).await;
    };
    task.abort();
    result
}

/// Every question has its answer: a confirmed address, or each relay answered and each
/// address peers saw was tested.
fn settled(reach: &Reachability, relays: usize) -> bool {
    if reach.verdict() == Verdict::Direct {
        return true;
    }
    let relays_answered = reach.relays.len() >= relays;
    let tested = !reach.observed.is_empty()
        && reach
            .observed
            .iter()
            .all(|a| reach.unreachable.contains(a) || reach.reachable.contains(a));
    relays_answered && tested
}

/// Lines for what `now` knows that `before` did not.
fn news(before: &Reachability, now: &Reachability) -> Vec<String> {
    let mut lines = Vec::new();
    if (now.direct_peers, now.relayed_peers) != (before.direct_peers, before.relayed_peers) {
        lines.push(format!(
            "connected to {} peer(s) directly, {} through a relay",
            now.direct_peers, now.relayed_peers
        ));
    }
    let fresh = |list: &[libp2p::Multiaddr], old: &[libp2p::Multiaddr], what: &str| {
        list.iter()
            .filter(|a| !old.contains(a))
            .map(|a| format!("{what} {a}"))
            .collect::<Vec<_>>()
    };
    lines.extend(fresh(
        &now.observed,
        &before.observed,
        "peers see this node as",
    ));
    lines.extend(fresh(&now.reachable, &before.reachable, "reachable at"));
    lines.extend(fresh(
        &now.unreachable,
        &before.unreachable,
        "AutoNAT could not dial back",
    ));
    lines.extend(fresh(&now.relayed, &before.relayed, "relay reservation:"));
    lines.extend(
        now.relays
            .iter()
            .filter(|r| !before.relays.contains(r))
            .filter_map(|r| r.error.as_ref().map(|e| (&r.relay, e)))
            .map(|(relay, e)| format!("relay {relay} refused or unreachable: {e}")),
    );
    lines
}

/// The report, for people.
pub fn report(reach: &Reachability) -> String {
    let list = |addrs: &[libp2p::Multiaddr]| {
        if addrs.is_empty() {
            "none".to_string()
        } else {
            addrs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let mut out = format!("verdict: {}\n", reach.verdict());
    for (label, value) in [
        ("listening on", list(&reach.listen)),
        ("peers see it as", list(&reach.observed)),
        ("reachable at", list(&reach.reachable)),
        ("not reachable at", list(&reach.unreachable)),
        ("relayed at", list(&reach.relayed)),
    ] {
        out.push_str(&format!("  {label:<17} {value}\n"));
    }
    for status in &reach.relays {
        if let Some(error) = &status.error {
            out.push_str(&format!("  relay error       {}: {error}\n", status.relay));
        }
    }
    out.push_str(&format!(
        "  peers             {} direct, {} relayed\n",
        reach.direct_peers, reach.relayed_peers
    ));
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_probe_waits_until_each_relay_and_each_address_has_an_answer() {
        let seen: libp2p::Multiaddr = "/ip4/198.51.100.7/tcp/4001".parse().unwrap();
        let mut reach = Reachability {
            observed: vec![seen.clone()],
            ..Reachability::default()
        };
        assert!(!settled(&reach, 0), "the address is not tested yet");
        reach.unreachable.push(seen);
        assert!(settled(&reach, 0));
        assert!(!settled(&reach, 1), "the relay has not answered");
        reach.relays.push(proofmesh_shared::net::RelayStatus {
            relay: "/ip4/203.0.113.1/tcp/4001".parse().unwrap(),
            error: Some("refused".into()),
        });
        assert!(settled(&reach, 1));
        assert!(report(&reach).contains("behind NAT"));
    }
}
