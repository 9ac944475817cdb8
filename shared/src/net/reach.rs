//! NAT traversal: how a node behind NAT is reached, and what it knows of its own reachability.
//!
//! A node learns the addresses peers see it at from identify ("observed" candidates), and
//! AutoNAT v2 servers try to dial each candidate back: one that answers is confirmed
//! reachable, one that does not means a NAT or a firewall. A node behind NAT holds a
//! reservation at a relay (relay v2) so that peers can reach it through a circuit; DCUtR then
//! punches a hole and the relayed connection gives way to a direct one. [`Reachability`] is the
//! event loop's record of all this, which `proofmesh-provider doctor` prints.

use std::collections::{BTreeSet, HashMap};

use libp2p::core::ConnectedPoint;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId};

/// How a node gets reached from behind NAT, and how it helps others.
#[derive(Debug, Clone, Default)]
pub struct Traversal {
    /// Relays to hold a reservation at, each `…/p2p/<relay peer id>`: peers then reach this
    /// node through them, and hole punching upgrades the connection to a direct one.
    pub relays: Vec<Multiaddr>,
    /// Addresses this node is reachable at without a test (a public IP, a forwarded port).
    pub external: Vec<Multiaddr>,
    /// Serve other nodes: relay v2 circuits (libp2p's limits: 2 minutes and 128 KiB each,
    /// enough for hole punching) and AutoNAT v2 dial-backs. A relay needs a confirmed
    /// external address (`external`, or AutoNAT) before it accepts reservations.
    pub serve: bool,
}

impl Traversal {
    /// Checks that each relay address names its relay (`/p2p/<peer id>` at the end).
    pub fn validate(&self) -> Result<(), String> {
        for relay in &self.relays {
            if super::peer_of(relay).is_none() {
                return Err(format!(
                    "relay address {relay} must end with /p2p/<the relay's peer id>"
                ));
            }
            if relay.iter().any(|p| p == Protocol::P2pCircuit) {
                return Err(format!(
                    "relay address {relay} is already a circuit: give the relay's own address"
                ));
            }
        }
        Ok(())
    }
}

/// Whether an address is one a peer could dial directly: an IP (or DNS) transport, no relay.
/// Identify also reports what a peer saw over a relayed connection, which is neither.
fn is_direct(addr: &Multiaddr) -> bool {
    matches!(
        addr.iter().next(),
        Some(
            Protocol::Ip4(_)
                | Protocol::Ip6(_)
                | Protocol::Dns(_)
                | Protocol::Dns4(_)
                | Protocol::Dns6(_)
        )
    ) && !is_circuit(addr)
}

/// What a peer saw, with this node's listening port: a connection this node dialled from a
/// fresh port shows that port, which nobody can dial (as identify does it).
pub(crate) fn with_listen_port(observed: &Multiaddr, listen: &[Multiaddr]) -> Multiaddr {
    let shape = |addr: &Multiaddr| {
        let mut parts = addr.iter().skip(1);
        match (parts.next(), parts.next()) {
            (Some(Protocol::Tcp(port)), _) => Some((false, port)),
            (Some(Protocol::Udp(port)), Some(Protocol::QuicV1)) => Some((true, port)),
            _ => None,
        }
    };
    let Some((quic, port)) = shape(observed) else {
        return observed.clone();
    };
    let ports: Vec<u16> = listen
        .iter()
        .filter(|a| !is_circuit(a))
        .filter_map(shape)
        .filter(|(q, _)| *q == quic)
        .map(|(_, p)| p)
        .collect();
    match ports.first() {
        Some(first) if !ports.contains(&port) => observed
            .iter()
            .map(|p| match p {
                Protocol::Tcp(_) => Protocol::Tcp(*first),
                Protocol::Udp(_) => Protocol::Udp(*first),
                other => other,
            })
            .collect(),
        _ => observed.clone(),
    }
}

/// Whether an address goes through a relay.
pub(crate) fn is_circuit(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| p == Protocol::P2pCircuit)
}

/// The relay a circuit address goes through: its own address (up to `/p2p-circuit`) and its
/// peer id. `None` for a direct address, or a circuit that does not name its relay.
pub(crate) fn relay_of(addr: &Multiaddr) -> Option<(Multiaddr, PeerId)> {
    let mut relay = Multiaddr::empty();
    for protocol in addr.iter() {
        if protocol == Protocol::P2pCircuit {
            return match relay.iter().last() {
                Some(Protocol::P2p(peer)) => Some((relay, peer)),
                _ => None,
            };
        }
        relay.push(protocol);
    }
    None
}

/// What a node knows of its own reachability (a snapshot; [`Client::reachability`](super::Client::reachability)).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Reachability {
    /// Where this node listens.
    pub listen: Vec<Multiaddr>,
    /// The addresses peers saw this node's connections come from.
    pub observed: Vec<Multiaddr>,
    /// Addresses confirmed reachable: dialled back by an AutoNAT server, or announced.
    pub reachable: Vec<Multiaddr>,
    /// Addresses an AutoNAT server tried and could not dial back.
    pub unreachable: Vec<Multiaddr>,
    /// Circuit addresses at relays that accepted a reservation.
    pub relayed: Vec<Multiaddr>,
    /// Each configured relay that answered: reserved, or why not.
    pub relays: Vec<RelayStatus>,
    /// Peers connected directly.
    pub direct_peers: usize,
    /// Peers connected only through a relay.
    pub relayed_peers: usize,
    /// Relayed connections upgraded to direct ones by hole punching.
    pub hole_punches: u64,
    /// Hole punching attempts that gave up.
    pub hole_punch_failures: u64,
}

/// What one relay answered.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RelayStatus {
    /// The relay's address.
    pub relay: Multiaddr,
    /// Why the last reservation failed or ended; `None` while one holds.
    pub error: Option<String>,
}

/// The short answer: how peers can reach this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Reachable directly at a confirmed address.
    Direct,
    /// Behind NAT, reachable through a relay; peers try to upgrade by hole punching.
    Relayed,
    /// Behind NAT (AutoNAT could not dial back) and no relay holds a reservation: only peers
    /// this node dials itself can use it.
    BehindNat,
    /// Nothing tested yet: no AutoNAT server answered and no relay accepted.
    Unknown,
}

impl Reachability {
    /// The short answer.
    pub fn verdict(&self) -> Verdict {
        if !self.reachable.is_empty() {
            Verdict::Direct
        } else if !self.relayed.is_empty() {
            Verdict::Relayed
        } else if !self.unreachable.is_empty() {
            Verdict::BehindNat
        } else {
            Verdict::Unknown
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Direct => "reachable directly",
            Self::Relayed => {
                "behind NAT, reachable through a relay (peers upgrade to a direct connection by \
                 hole punching)"
            }
            Self::BehindNat => {
                "behind NAT and not reachable: only peers this node dials can use it; add \
                 --relay, or forward a port and set --external-address"
            }
            Self::Unknown => {
                "unknown: no AutoNAT server answered and no relay accepted a reservation yet"
            }
        })
    }
}

/// The event loop's running record behind [`Reachability`].
#[derive(Debug, Default)]
pub(crate) struct Reach {
    observed: BTreeSet<Multiaddr>,
    reachable: BTreeSet<Multiaddr>,
    unreachable: BTreeSet<Multiaddr>,
    relayed: BTreeSet<Multiaddr>,
    /// Each relay's last answer: `None` reserved, or why not.
    relay_status: HashMap<Multiaddr, Option<String>>,
    /// Open connections.
    connections: HashMap<ConnectionId, Link>,
    /// The latest address peers of each network claimed to see this node at, with when (a
    /// sequence number): at most [`MAX_CLAIMS`] networks, the stalest forgotten first.
    claims: HashMap<Vec<u8>, (Multiaddr, u64)>,
    claim_seq: u64,
    hole_punches: u64,
    hole_punch_failures: u64,
}

/// One open connection, as this node saw it open.
#[derive(Debug)]
struct Link {
    peer: PeerId,
    /// Through a relay.
    relayed: bool,
    /// This node dialled it.
    dialed: bool,
    /// The remote end's address (for a relayed connection, the circuit).
    remote: Multiaddr,
}

/// Peers from this many different networks must currently claim an address before it is
/// believed, unless one of them is a peer this node chose.
pub(crate) const SIGHTINGS_TO_BELIEVE: usize = 2;
/// Networks whose latest claim is remembered.
const MAX_CLAIMS: usize = 256;

/// The network an IP address belongs to, for counting independent witnesses: its family, then
/// its /24 (IPv4) or /48 (IPv6). Identities are free; addresses in many networks are not.
fn network_of(addr: &Multiaddr) -> Option<Vec<u8>> {
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => Some([&[4], &ip.octets()[..3]].concat()),
        Some(Protocol::Ip6(ip)) => Some([&[6], &ip.octets()[..6]].concat()),
        _ => None,
    }
}

/// Bound on each address set: peers choose what they report as observed.
const MAX_ADDRESSES: usize = 64;

fn insert_bounded(set: &mut BTreeSet<Multiaddr>, addr: Multiaddr) -> bool {
    if set.len() >= MAX_ADDRESSES && !set.contains(&addr) {
        return false;
    }
    set.insert(addr)
}

impl Reach {
    pub(crate) fn observed(&mut self, addr: Multiaddr) {
        if is_direct(&addr) {
            insert_bounded(&mut self.observed, addr);
        }
    }

    /// An address confirmed external (AutoNAT, an announcement, or a relay reservation);
    /// returns whether it is new.
    pub(crate) fn confirmed(&mut self, addr: Multiaddr) -> bool {
        if is_circuit(&addr) {
            insert_bounded(&mut self.relayed, addr)
        } else {
            self.unreachable.remove(&addr);
            insert_bounded(&mut self.reachable, addr)
        }
    }

    pub(crate) fn expired(&mut self, addr: &Multiaddr) {
        self.relayed.remove(addr);
        self.reachable.remove(addr);
    }

    /// An AutoNAT server could not dial this address back; returns whether that is news.
    pub(crate) fn unreachable(&mut self, addr: Multiaddr) -> bool {
        is_direct(&addr)
            && !self.reachable.contains(&addr)
            && insert_bounded(&mut self.unreachable, addr)
    }

    /// Only configured relays are recorded, so the map is as small as the configuration.
    pub(crate) fn relay_failed(&mut self, relay: Multiaddr, why: String) {
        self.relay_status.insert(relay, Some(why));
    }

    pub(crate) fn relay_accepted(&mut self, relay: Multiaddr) {
        self.relay_status.insert(relay, None);
    }

    pub(crate) fn connected(&mut self, id: ConnectionId, peer: PeerId, endpoint: &ConnectedPoint) {
        self.connections.insert(
            id,
            Link {
                peer,
                relayed: endpoint.is_relayed(),
                dialed: endpoint.is_dialer(),
                remote: endpoint.get_remote_address().clone(),
            },
        );
    }

    /// The remote address of a connection, as this node saw it.
    pub(crate) fn remote(&self, id: ConnectionId) -> Option<&Multiaddr> {
        self.connections.get(&id).map(|link| &link.remote)
    }

    /// Whether every open connection to `peer` goes through a relay.
    pub(crate) fn only_relayed(&self, peer: PeerId) -> bool {
        let mut links = self.connections.values().filter(|l| l.peer == peer);
        links.clone().next().is_some() && links.all(|l| l.relayed)
    }

    /// Whether this node dialled connection `id`.
    pub(crate) fn dialed(&self, id: ConnectionId) -> bool {
        self.connections.get(&id).is_some_and(|link| link.dialed)
    }

    /// A peer claims, over direct connection `id`, to see this node at `addr`. Returns whether
    /// that is now believable: at once when `trusted` (the peer is one this node chose), else
    /// when peers of [`SIGHTINGS_TO_BELIEVE`] networks of the address's own family claim it as
    /// their latest. Each network's latest claim replaces its earlier ones, so a peer that keeps
    /// changing its story holds one place, and the stalest networks are forgotten first.
    pub(crate) fn sighted(&mut self, id: ConnectionId, addr: &Multiaddr, trusted: bool) -> bool {
        if !is_direct(addr) {
            return false;
        }
        let Some(link) = self.connections.get(&id).filter(|l| !l.relayed) else {
            return false;
        };
        if trusted {
            return true;
        }
        let (Some(network), Some(family)) = (network_of(&link.remote), network_of(addr)) else {
            return false;
        };
        if network[0] != family[0] {
            return false;
        }
        self.claim_seq += 1;
        self.claims.insert(network, (addr.clone(), self.claim_seq));
        if self.claims.len() > MAX_CLAIMS
            && let Some(stalest) = self
                .claims
                .iter()
                .min_by_key(|(_, (_, seq))| *seq)
                .map(|(network, _)| network.clone())
        {
            self.claims.remove(&stalest);
        }
        self.claims.values().filter(|(a, _)| a == addr).count() >= SIGHTINGS_TO_BELIEVE
    }

    pub(crate) fn disconnected(&mut self, id: ConnectionId) {
        self.connections.remove(&id);
    }

    /// The relayed connections to `peer`: once a direct one exists, they only cost the relay.
    pub(crate) fn relayed_connections(&self, peer: PeerId) -> Vec<ConnectionId> {
        self.connections
            .iter()
            .filter(|(_, link)| link.peer == peer && link.relayed)
            .map(|(id, _)| *id)
            .collect()
    }

    pub(crate) fn hole_punched(&mut self, ok: bool) {
        if ok {
            self.hole_punches += 1;
        } else {
            self.hole_punch_failures += 1;
        }
    }

    pub(crate) fn snapshot(&self, listen: Vec<Multiaddr>) -> Reachability {
        let mut direct = BTreeSet::new();
        let mut relayed = BTreeSet::new();
        for link in self.connections.values() {
            if link.relayed {
                relayed.insert(link.peer);
            } else {
                direct.insert(link.peer);
            }
        }
        Reachability {
            listen,
            observed: self.observed.iter().cloned().collect(),
            reachable: self.reachable.iter().cloned().collect(),
            unreachable: self.unreachable.iter().cloned().collect(),
            relayed: self.relayed.iter().cloned().collect(),
            relays: self
                .relay_status
                .iter()
                .map(|(relay, error)| RelayStatus {
                    relay: relay.clone(),
                    error: error.clone(),
                })
                .collect(),
            direct_peers: direct.len(),
            relayed_peers: relayed.difference(&direct).count(),
            hole_punches: self.hole_punches,
            hole_punch_failures: self.hole_punch_failures,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn addr(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_circuit_address_names_its_relay() {
        let relay = "16Uiu2HAm3mvXcmp8q2tg32s5PNWjtz2SHZ4qY8zpJ3WmoreyvTKk";
        let target = "16Uiu2HAm7uuwaqYivt4w1ce16CGBsnjcwyBqHzwrmw4UNE83LEuw";
        let circuit = addr(&format!(
            "/ip4/10.0.0.1/tcp/4001/p2p/{relay}/p2p-circuit/p2p/{target}"
        ));
        let (relay_addr, relay_peer) = relay_of(&circuit).unwrap();
        assert_eq!(
            relay_addr,
            addr(&format!("/ip4/10.0.0.1/tcp/4001/p2p/{relay}"))
        );
        assert_eq!(relay_peer.to_string(), relay);
        assert_eq!(
            relay_of(&addr(&format!("/ip4/10.0.0.1/tcp/4001/p2p/{target}"))),
            None
        );
        assert_eq!(
            relay_of(&addr(&format!(
                "/ip4/10.0.0.1/tcp/4001/p2p-circuit/p2p/{target}"
            ))),
            None
        );
    }

    #[test]
    fn the_verdict_prefers_direct_then_relayed_then_behind_nat() {
        let mut reach = Reach::default();
        assert_eq!(reach.snapshot(vec![]).verdict(), Verdict::Unknown);
        assert!(reach.unreachable(addr("/ip4/198.51.100.7/tcp/4001")));
        assert_eq!(reach.snapshot(vec![]).verdict(), Verdict::BehindNat);
        let circuit = addr(
            "/ip4/203.0.113.1/tcp/4001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit",
        );
        assert!(reach.confirmed(circuit.clone()));
        assert_eq!(reach.snapshot(vec![]).verdict(), Verdict::Relayed);
        assert!(reach.confirmed(addr("/ip4/198.51.100.7/tcp/4001")));
        let snapshot = reach.snapshot(vec![]);
        assert_eq!(snapshot.verdict(), Verdict::Direct);
        assert!(
            snapshot.unreachable.is_empty(),
            "a confirmed address is reachable"
        );
        reach.expired(&circuit);
        assert!(reach.snapshot(vec![]).relayed.is_empty());
    }

    #[test]
    fn peers_cannot_grow_the_record_without_bound() {
        let mut reach = Reach::default();
        for port in 0..1000u16 {
            reach.observed(addr(&format!("/ip4/198.51.100.7/tcp/{port}")));
            reach.unreachable(addr(&format!("/ip4/198.51.100.8/tcp/{port}")));
        }
        reach.observed(addr(
            "/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN",
        ));
        let snapshot = reach.snapshot(vec![]);
        assert_eq!(snapshot.observed.len(), MAX_ADDRESSES);
        assert_eq!(snapshot.unreachable.len(), MAX_ADDRESSES);
    }

    #[test]
    fn a_relay_address_must_name_the_relay() {
        let bare = Traversal {
            relays: vec![addr("/ip4/203.0.113.1/tcp/4001")],
            ..Traversal::default()
        };
        assert!(bare.validate().unwrap_err().contains("/p2p/"));
        let named = Traversal {
            relays: vec![addr(
                "/ip4/203.0.113.1/tcp/4001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN",
            )],
            ..Traversal::default()
        };
        assert!(named.validate().is_ok());
    }

    fn point(remote: &str, dialed: bool) -> ConnectedPoint {
        if dialed {
            ConnectedPoint::Dialer {
                address: addr(remote),
                role_override: libp2p::core::Endpoint::Dialer,
                port_use: libp2p::core::transport::PortUse::Reuse,
            }
        } else {
            ConnectedPoint::Listener {
                local_addr: addr("/ip4/0.0.0.0/tcp/4001"),
                send_back_addr: addr(remote),
            }
        }
    }

    const CIRCUIT: &str = "/ip4/203.0.113.1/tcp/4001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit";

    #[test]
    fn relayed_peers_count_only_those_without_a_direct_connection() {
        let mut reach = Reach::default();
        let (a, b) = (PeerId::random(), PeerId::random());
        reach.connected(ConnectionId::new_unchecked(1), a, &point(CIRCUIT, true));
        reach.connected(ConnectionId::new_unchecked(3), b, &point(CIRCUIT, true));
        assert!(reach.only_relayed(a));
        reach.connected(
            ConnectionId::new_unchecked(2),
            a,
            &point("/ip4/198.51.100.7/tcp/4001", true),
        );
        assert!(!reach.only_relayed(a));
        assert!(
            !reach.only_relayed(PeerId::random()),
            "not connected at all"
        );
        let snapshot = reach.snapshot(vec![]);
        assert_eq!((snapshot.direct_peers, snapshot.relayed_peers), (1, 1));
        assert_eq!(
            reach.relayed_connections(a),
            vec![ConnectionId::new_unchecked(1)]
        );
    }

    #[test]
    fn an_observed_fresh_port_becomes_the_listening_port() {
        let listen = [
            addr("/ip4/10.0.0.2/tcp/4001"),
            addr("/ip4/10.0.0.2/udp/4002/quic-v1"),
        ];
        let seen = with_listen_port(&addr("/ip4/192.0.2.9/tcp/50123"), &listen);
        assert_eq!(seen, addr("/ip4/192.0.2.9/tcp/4001"));
        let seen = with_listen_port(&addr("/ip4/192.0.2.9/udp/50123/quic-v1"), &listen);
        assert_eq!(seen, addr("/ip4/192.0.2.9/udp/4002/quic-v1"));
        let kept = addr("/ip4/192.0.2.9/tcp/4001");
        assert_eq!(with_listen_port(&kept, &listen), kept);
    }

    #[test]
    fn a_claimed_address_is_believed_from_a_chosen_peer_or_two_networks() {
        let mut reach = Reach::default();
        let claimed = addr("/ip4/192.0.2.9/tcp/4001");
        let peer = PeerId::random();
        // Many identities from one network: not enough.
        for (i, remote) in ["/ip4/198.51.100.7/tcp/1", "/ip4/198.51.100.8/tcp/2"]
            .iter()
            .enumerate()
        {
            let id = ConnectionId::new_unchecked(i);
            reach.connected(id, PeerId::random(), &point(remote, false));
            assert!(!reach.sighted(id, &claimed, false));
        }
        // A second network: believed.
        let id = ConnectionId::new_unchecked(10);
        reach.connected(id, peer, &point("/ip4/203.0.113.5/tcp/3", false));
        assert!(reach.sighted(id, &claimed, false));
        // A peer this node chose: at once.
        let other = addr("/ip4/192.0.2.10/tcp/4001");
        let dialed = ConnectionId::new_unchecked(20);
        reach.connected(dialed, peer, &point("/ip4/203.0.113.6/tcp/4001", true));
        assert!(reach.dialed(dialed));
        assert!(reach.sighted(dialed, &other, true));
        // Through a relay, or not an address at all: never.
        let relayed = ConnectionId::new_unchecked(30);
        reach.connected(relayed, peer, &point(CIRCUIT, true));
        assert!(!reach.sighted(relayed, &addr("/ip4/192.0.2.11/tcp/1"), true));
        assert!(!reach.sighted(dialed, &addr(CIRCUIT), true));
    }

    #[test]
    fn a_peer_that_changes_its_story_holds_one_place_and_cannot_crowd_out_the_truth() {
        let mut reach = Reach::default();
        let truth = addr("/ip4/192.0.2.9/tcp/4001");
        let liar = ConnectionId::new_unchecked(1);
        reach.connected(
            liar,
            PeerId::random(),
            &point("/ip4/198.51.100.7/tcp/1", false),
        );
        for i in 0..10_000u32 {
            let [_, b, c, d] = i.to_be_bytes();
            let junk = addr(&format!("/ip4/1.{b}.{c}.{d}/tcp/4001"));
            assert!(!reach.sighted(liar, &junk, false));
        }
        assert_eq!(reach.claims.len(), 1, "one network, one claim");
        // Many networks claiming junk are forgotten stalest first; two honest ones still agree.
        for i in 0..1000u16 {
            let id = ConnectionId::new_unchecked(100 + usize::from(i));
            let [b, c] = i.to_be_bytes();
            let remote = format!("/ip4/100.{b}.{c}.1/tcp/1");
            reach.connected(id, PeerId::random(), &point(&remote, false));
            reach.sighted(id, &addr(&format!("/ip4/203.0.{b}.{c}/tcp/1")), false);
        }
        assert!(reach.claims.len() <= MAX_CLAIMS);
        let (a, b) = (
            ConnectionId::new_unchecked(5000),
            ConnectionId::new_unchecked(5001),
        );
        reach.connected(a, PeerId::random(), &point("/ip4/203.0.113.5/tcp/3", false));
        reach.connected(b, PeerId::random(), &point("/ip4/198.18.0.5/tcp/3", false));
        assert!(!reach.sighted(a, &truth, false));
        assert!(reach.sighted(b, &truth, false));
        // An IPv6 witness does not count for an IPv4 address.
        let v6 = ConnectionId::new_unchecked(6000);
        reach.connected(
            v6,
            PeerId::random(),
            &point("/ip6/2001:db8::1/tcp/3", false),
        );
        assert!(!reach.sighted(v6, &addr("/ip4/192.0.2.77/tcp/4001"), false));
    }
}
