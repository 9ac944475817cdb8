//! The libp2p mesh shared by gateways and providers.
//!
//! One task owns the `Swarm` ([`EventLoop::run`]); everything else talks to it through a
//! cloneable [`Client`] that sends [`Command`](client)s over a channel, each with its own reply
//! `oneshot`. The loop reports what the application must act on as [`Event`]s on a second channel.
//! Token streams bypass the loop entirely: they run on raw substreams, opened through
//! `libp2p-stream`'s `Control` and taken concurrently under per-peer quotas by [`inbound`]'s
//! doors ([`Client::accept`]), so generation never queues behind swarm work. [`conduct`] keeps
//! the strikes of peers that flood the doors or break the protocol, and bans them for a while.
//!
//! Transports: TCP and QUIC, Noise, Yamux, and circuits through relays ([`reach`]: relay v2,
//! hole punching by DCUtR, AutoNAT v2). Discovery: explicit bootstrap addresses (re-dialled on
//! a timer while no peer is connected), mDNS on the LAN when enabled, Kademlia provider records
//! under a key derived from each model digest and under one well-known key for "all providers".
//! Gateways gossip fraud proofs to each other ([`gossip`]).

mod behaviour;
mod client;
mod conduct;
mod event_loop;
pub mod gossip;
mod guard;
mod inbound;
pub mod mesh_key;
mod reach;

use libp2p::identity::Keypair;
use libp2p::request_response::ResponseChannel;
use libp2p::{Multiaddr, PeerId};

pub use client::Client;
pub use conduct::{BAN, Offence, STRIKES_TO_BAN, WINDOW};
pub use event_loop::EventLoop;
pub use inbound::{Inbound, Incoming, Quota, Slot};
pub use reach::{Reachability, RelayStatus, Traversal, Verdict};

use crate::protocol::{Capabilities, OpenLeavesRequest, SignedOpening};

/// What a node is on the mesh.
#[derive(Debug, Clone)]
pub enum Role {
    /// Serves models; answers capability queries with these and publishes provider records.
    Provider(Capabilities),
    /// Looks for providers: queries the capabilities of every peer it identifies.
    Gateway,
    /// A short-lived node that only looks at the network (`proofmesh-provider doctor`):
    /// serves nothing, looks for nobody.
    Probe,
}

/// How to start a node's mesh side.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// The node key (secp256k1): peer id and commitment signer.
    pub keypair: Keypair,
    /// Addresses to listen on, e.g. `/ip4/127.0.0.1/tcp/0` and `/ip4/127.0.0.1/udp/0/quic-v1`.
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start and whenever no peer is connected.
    pub bootstrap: Vec<Multiaddr>,
    /// Whether to run mDNS. It multicasts on every non-loopback interface, so tests and the
    /// loopback demo keep it off.
    pub mdns: bool,
    /// Provider or gateway.
    pub role: Role,
    /// A private mesh's pre-shared key ([`mesh_key`]): set, only nodes with the same key can
    /// connect, and only over TCP.
    pub psk: Option<mesh_key::PreSharedKey>,
    /// NAT traversal: relays to reserve at, announced addresses, serving others.
    pub traversal: Traversal,
}

/// What the event loop tells the application.
#[derive(Debug)]
pub enum Event {
    /// A peer answered a capability query with at least one model.
    ProviderUp {
        /// The provider.
        peer: PeerId,
        /// What it serves.
        capabilities: Capabilities,
    },
    /// A provider announced that it is shutting down: route nothing new to it.
    ProviderLeaving {
        /// The provider.
        peer: PeerId,
    },
    /// The last connection to a peer closed, or the only ones left go through a relay: route
    /// nothing to it.
    PeerGone {
        /// The peer.
        peer: PeerId,
    },
    /// Another gateway published a fraud proof (gateways only); say what it is worth with
    /// [`Client::judge_proof`], which alone decides whether it is passed on.
    FraudProof {
        /// The peer it came from (not necessarily its author).
        source: PeerId,
        /// Its gossip id.
        id: libp2p::gossipsub::MessageId,
        /// The proof's bytes, as published: not checked yet.
        proof: Vec<u8>,
    },
    /// A gateway challenges this provider to open leaves; answer with
    /// [`Client::respond_open_leaves`].
    OpenLeaves {
        /// Who asks.
        peer: PeerId,
        /// What it asks for.
        request: OpenLeavesRequest,
        /// Where the answer goes.
        channel: ResponseChannel<SignedOpening>,
    },
}

/// Failures of mesh operations.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// The swarm could not be built.
    #[error("mesh setup failed: {message}")]
    Setup {
        /// What went wrong.
        message: String,
    },
    /// A listen address was refused.
    #[error("cannot listen on {addr}: {message}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// What went wrong.
        message: String,
    },
    /// A dial failed at once.
    #[error("dial failed: {message}")]
    Dial {
        /// What went wrong.
        message: String,
    },
    /// A request to a peer failed or timed out.
    #[error("request to {peer} failed: {message}")]
    Request {
        /// The peer.
        peer: PeerId,
        /// What went wrong.
        message: String,
    },
    /// The event loop has stopped.
    #[error("mesh event loop stopped")]
    Stopped,
}

/// The peer id an address ends with (`…/p2p/<id>`): for a circuit address, the peer behind
/// the relay.
pub fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    match addr.iter().last() {
        Some(libp2p::multiaddr::Protocol::P2p(peer)) => Some(peer),
        _ => None,
    }
}

/// Builds the swarm and returns the client, the application's event stream and the loop to spawn.
pub fn new(
    config: NetConfig,
) -> Result<(Client, tokio::sync::mpsc::Receiver<Event>, EventLoop), NetError> {
    event_loop::build(config)
}
