//! The composed libp2p behaviour and its protocol settings.

use std::time::Duration;

use libp2p::allow_block_list::{self, BlockedPeers};
use libp2p::connection_limits::{self, ConnectionLimits};
use libp2p::memory_connection_limits;
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    StreamProtocol, autonat, dcutr, gossipsub, identify, identity::Keypair, kad, mdns, ping, relay,
    request_response,
};

use super::guard::{Guard, Policy};
use crate::protocol::{
    CAPS_PROTOCOL, CONTROL_TIMEOUT, Capabilities, CapsRequest, LEAVE_PROTOCOL, LeaveAck, Leaving,
    MAX_CAPS_MESSAGE, MAX_OPEN_REQUEST, MAX_OPEN_RESPONSE, OPEN_PROTOCOL, OpenLeavesRequest,
    SignedOpening,
};

/// Kademlia protocol name, so proofmesh's DHT never mixes with the public IPFS one.
pub(crate) const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/proofmesh/kad/1.0.0");
/// Identify protocol version string.
pub(crate) const IDENTIFY_PROTOCOL: &str = "/proofmesh/1";
/// Concurrent control streams per connection: a busy gateway opens leaves for many requests at
/// once, each one short.
const MAX_CONTROL_STREAMS: usize = 256;
/// Connections to one peer: a dialled and an accepted one can cross, and hole punching holds
/// a relayed and a direct one at once; a peer that wants more wants to exhaust us.
pub(crate) const MAX_CONNECTIONS_PER_PEER: u32 = 4;
/// Inbound connections still in their handshake: the rest are refused until these finish.
pub(crate) const MAX_PENDING_INCOMING: u32 = 128;
/// Inbound connections established at once: a mesh node serves gateways and peers, not
/// crowds; past this, new ones are refused and the established keep being served.
pub(crate) const MAX_ESTABLISHED_INCOMING: u32 = 1024;
/// Share of the machine's memory past which the node takes no new connection (those it has
/// keep being served): a flood of connections cannot push it into the OOM killer. The
/// measure is the process's resident memory, mapped model pages included, so it is set high.
pub(crate) const MAX_MEMORY_SHARE: f64 = 0.9;
/// How long a leaving provider waits for each peer to acknowledge.
pub(crate) const LEAVE_TIMEOUT: Duration = Duration::from_secs(3);

/// Every protocol a proofmesh node speaks.
#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    pub(crate) blocked: allow_block_list::Behaviour<BlockedPeers>,
    pub(crate) limits: connection_limits::Behaviour,
    pub(crate) memory: memory_connection_limits::Behaviour,
    pub(crate) identify: identify::Behaviour,
    pub(crate) ping: ping::Behaviour,
    pub(crate) mdns: Toggle<mdns::tokio::Behaviour>,
    pub(crate) kad: kad::Behaviour<kad::store::MemoryStore>,
    pub(crate) open: request_response::cbor::Behaviour<OpenLeavesRequest, SignedOpening>,
    pub(crate) caps: request_response::cbor::Behaviour<CapsRequest, Capabilities>,
    pub(crate) leave: request_response::cbor::Behaviour<Leaving, LeaveAck>,
    pub(crate) inbound: super::inbound::Behaviour,
    pub(crate) stream: libp2p_stream::Behaviour,
    /// Reaches peers through relays and holds reservations at the configured ones.
    pub(crate) relay_client: relay::client::Behaviour,
    /// Upgrades relayed connections to direct ones by hole punching, from approved candidates.
    pub(crate) dcutr: Guard<dcutr::Behaviour>,
    /// Asks AutoNAT servers to dial this node's approved candidate addresses back.
    pub(crate) autonat: Guard<autonat::v2::client::Behaviour>,
    /// Nodes that serve others: relay v2 circuits and AutoNAT v2 dial-backs.
    pub(crate) relay: Toggle<relay::Behaviour>,
    pub(crate) autonat_server: Toggle<Guard<autonat::v2::server::Behaviour>>,
    /// Gateways: fraud proofs gossiped between them.
    pub(crate) gossip: Toggle<gossipsub::Behaviour>,
}

/// Which optional parts a node runs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Parts {
    /// mDNS discovery on the LAN.
    pub(crate) mdns: bool,
    /// The relay and AutoNAT services for others.
    pub(crate) serve: bool,
    /// Gossip of fraud proofs (gateways).
    pub(crate) gossip: bool,
}

impl Behaviour {
    pub(crate) fn new(
        key: &Keypair,
        relay_client: relay::client::Behaviour,
        parts: Parts,
    ) -> std::io::Result<Self> {
        let Parts {
            mdns,
            serve,
            gossip,
        } = parts;
        let peer_id = key.public().to_peer_id();
        let gossip = if gossip {
            Some(super::gossip::behaviour(key).map_err(std::io::Error::other)?)
        } else {
            None
        };
        let mdns = if mdns {
            Some(mdns::tokio::Behaviour::new(
                mdns::Config::default(),
                peer_id,
            )?)
        } else {
            None
        };
        let mut kad_config = kad::Config::new(KAD_PROTOCOL);
        kad_config.set_query_timeout(Duration::from_secs(30));
        let mut kad =
            kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), kad_config);
        // On loopback and private networks no external address is ever confirmed, and a node in
        // client mode is never added to others' routing tables; every proofmesh node serves the DHT.
        kad.set_mode(Some(kad::Mode::Server));
        let control = request_response::Config::default()
            .with_request_timeout(CONTROL_TIMEOUT)
            .with_max_concurrent_streams(MAX_CONTROL_STREAMS);
        let open_codec = request_response::cbor::codec::Codec::default()
            .set_request_size_maximum(MAX_OPEN_REQUEST)
            .set_response_size_maximum(MAX_OPEN_RESPONSE);
        let caps_codec = request_response::cbor::codec::Codec::default()
            .set_request_size_maximum(MAX_CAPS_MESSAGE)
            .set_response_size_maximum(MAX_CAPS_MESSAGE);
        Ok(Self {
            blocked: allow_block_list::Behaviour::default(),
            limits: connection_limits::Behaviour::new(
                ConnectionLimits::default()
                    .with_max_established_per_peer(Some(MAX_CONNECTIONS_PER_PEER))
                    .with_max_pending_incoming(Some(MAX_PENDING_INCOMING))
                    .with_max_established_incoming(Some(MAX_ESTABLISHED_INCOMING)),
            ),
            memory: memory_connection_limits::Behaviour::with_max_percentage(MAX_MEMORY_SHARE),
            identify: identify::Behaviour::new(
                identify::Config::new(IDENTIFY_PROTOCOL.into(), key.public())
                    .with_agent_version(format!("proofmesh/{}", env!("CARGO_PKG_VERSION")))
                    // Its cache would dial any address a peer lists (a peer's 127.0.0.1 is
                    // ours); Kademlia holds the addresses the event loop vetted.
                    .with_cache_size(0)
                    // A provider's relay circuit is a listen address that comes after its first
                    // identify; without the push, the relay's Kademlia knows only the private
                    // addresses and hands gateways provider records they cannot dial.
                    .with_push_listen_addr_updates(true),
            ),
            ping: ping::Behaviour::default(),
            mdns: mdns.into(),
            kad,
            open: request_response::Behaviour::with_codec(
                open_codec,
                [(OPEN_PROTOCOL, request_response::ProtocolSupport::Full)],
                control.clone(),
            ),
            caps: request_response::Behaviour::with_codec(
                caps_codec.clone(),
                [(CAPS_PROTOCOL, request_response::ProtocolSupport::Full)],
                control.clone(),
            ),
            leave: request_response::Behaviour::with_codec(
                request_response::cbor::codec::Codec::default()
                    .set_request_size_maximum(1024)
                    .set_response_size_maximum(1024),
                [(LEAVE_PROTOCOL, request_response::ProtocolSupport::Full)],
                control.with_request_timeout(LEAVE_TIMEOUT),
            ),
            inbound: super::inbound::Behaviour::default(),
            stream: libp2p_stream::Behaviour::new(),
            relay_client,
            dcutr: Guard::new(dcutr::Behaviour::new(peer_id), Policy::Candidates),
            autonat: Guard::new(
                autonat::v2::client::Behaviour::default(),
                Policy::Candidates,
            ),
            // libp2p's limits: 128 reservations and 16 circuits of 2 minutes and 128 KiB each
            // (enough to punch holes, not to carry tokens), rate-limited per peer and per IP.
            // Identities are free, so per-peer limits mean little; the totals bound the cost.
            relay: serve
                .then(|| relay::Behaviour::new(peer_id, relay::Config::default()))
                .into(),
            autonat_server: serve
                .then(|| Guard::new(autonat::v2::server::Behaviour::default(), Policy::DialBacks))
                .into(),
            gossip: gossip.into(),
        })
    }
}
