//! The task that owns the `Swarm`.
//!
//! Inputs: [`Command`]s from [`Client`]s, swarm events, and a maintenance tick. Outputs: replies
//! on each command's `oneshot`, and [`Event`]s for the application. Capability queries are
//! answered here from the node's [`Role`]; gateways query every peer they identify and report the
//! providers they find. Nothing here blocks: every reply is a channel send.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use libp2p::core::Transport;
use libp2p::core::transport::ListenerId;
use libp2p::identity::Keypair;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::request_response::{self, OutboundRequestId};
use libp2p::swarm::SwarmEvent;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::{
    Multiaddr, PeerId, Swarm, autonat, dcutr, identify, kad, mdns, noise, ping, relay, tcp, yamux,
};
use tokio::sync::{mpsc, oneshot};

use super::behaviour::{Behaviour, BehaviourEvent, Parts};
use super::client::{Client, Command};
use super::conduct::{Conduct, Offence};
use super::guard::{Guarded, ip_of};
use super::reach::{Reach, Traversal, is_circuit, relay_of, with_listen_port};
use super::{Event, NetConfig, NetError, Role, peer_of};
use crate::protocol::{
    CAPS_PROTOCOL, Capabilities, CapsRequest, GenerateRequest, LeaveAck, Leaving, ModelDigest,
    SignedOpening,
};

/// How often the loop re-dials bootstrap peers (when alone), refreshes Kademlia and, on
/// gateways, looks up provider records.
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(10);
/// A connection nobody has used for this long closes, so that peers cannot park in the inbound
/// connection slots. Gateways ask their providers for capabilities every [`CAPS_REFRESH`], so
/// the connections they route over never go idle (and a quiet provider never vanishes from
/// `/v1/models`).
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(300);
/// How often a gateway asks each connected provider for its capabilities again: keeps the
/// connection in use and picks up what changed.
const CAPS_REFRESH: Duration = Duration::from_secs(60);
/// How often a provider re-publishes its provider records. Kademlia's own republication runs
/// every 12 hours; records published before a node had any peer reached nobody.
const REANNOUNCE_INTERVAL: Duration = Duration::from_secs(300);
/// How long a TCP connection may take from the first SYN to the end of its handshakes (Noise,
/// Yamux, and the pre-shared key in a private mesh). Without it a dial to an address behind a
/// NAT that drops SYNs silently waits for the kernel's ~2 minutes; AutoNAT v2 servers give a
/// dial-back 10 s in all, so a dial-back that waits longer never tells the client "unreachable".
/// QUIC's own handshake timeout is 5 s.
const TCP_DIAL_TIMEOUT: Duration = Duration::from_secs(8);
/// Most external addresses AutoNAT confirmations may add (announced ones come on top).
const MAX_CONFIRMED: usize = 8;
/// Room for commands waiting for the loop.
const COMMAND_QUEUE: usize = 256;
/// Room for events waiting for the application; beyond it events are dropped with a warning
/// rather than stalling the swarm.
const EVENT_QUEUE: usize = 1024;

/// The Kademlia key under which every provider publishes a record.
pub(crate) fn all_providers_key() -> kad::RecordKey {
    kad::RecordKey::new(&crate::sha256(&[b"proofmesh/providers/v1"]))
}

/// The Kademlia key under which providers of one model publish a record.
pub(crate) fn model_key(digest: &ModelDigest) -> kad::RecordKey {
    kad::RecordKey::new(&crate::sha256(&[b"proofmesh/model/v1", &digest.0]))
}

/// Owns the swarm; spawn [`EventLoop::run`].
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    role: Role,
    bootstrap: Vec<Multiaddr>,
    /// When a provider last published its records while connected to someone.
    announced: Option<std::time::Instant>,
    pending_open:
        HashMap<OutboundRequestId, (PeerId, oneshot::Sender<Result<SignedOpening, NetError>>)>,
    /// A running leave announcement: peers not yet answered, acknowledgements, the reply.
    leaving: Option<Leave>,
    /// Strikes and bans.
    conduct: Conduct,
    /// On gateways: the providers found, and when each was last asked for its capabilities.
    providers: HashMap<PeerId, std::time::Instant>,
    /// Peers that announced they are leaving: capabilities they sent before are stale.
    departed: HashSet<PeerId>,
    /// Relays to hold a reservation at, and the circuit listener at each while it lives.
    relays: Vec<(Multiaddr, Option<ListenerId>)>,
    /// What this node knows of its own reachability.
    reach: Reach,
    /// On gateways: capabilities of providers reached only through a relay so far. They are
    /// routed to once hole punching gives a direct connection: a relay cuts circuits at 128 KiB.
    awaiting_direct: HashMap<PeerId, Capabilities>,
    /// Addresses AutoNAT servers dialled back, announced as this node's (at most
    /// [`MAX_CONFIRMED`]).
    autonat_confirmed: HashSet<Multiaddr>,
}

/// The state of a leave announcement.
struct Leave {
    pending: HashSet<OutboundRequestId>,
    acked: usize,
    reply: oneshot::Sender<usize>,
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop")
            .field("peer", self.swarm.local_peer_id())
            .finish()
    }
}

pub(super) fn build(
    config: NetConfig,
) -> Result<(Client, mpsc::Receiver<Event>, EventLoop), NetError> {
    let mut listen = config.listen.clone();
    let mut bootstrap = config.bootstrap.clone();
    config
        .traversal
        .validate()
        .map_err(|message| NetError::Setup { message })?;
    let parts = Parts {
        mdns: config.mdns,
        serve: config.traversal.serve,
        gossip: matches!(config.role, Role::Gateway),
    };
    let mut swarm = match config.psk {
        None => public_swarm(config.keypair.clone(), parts)?,
        Some(psk) => {
            // QUIC has its own encryption, which the key cannot wrap: a private mesh is TCP only.
            for (what, addrs) in [("listen", &mut listen), ("bootstrap", &mut bootstrap)] {
                for addr in addrs.iter().filter(|a| is_quic(a)) {
                    tracing::warn!(%addr, "private mesh: QUIC {what} address skipped (TCP only)");
                }
                addrs.retain(|a| !is_quic(a));
            }
            if listen.is_empty() && !config.listen.is_empty() {
                return Err(NetError::Listen {
                    addr: config.listen[0].clone(),
                    message: "a private mesh (pre-shared key) runs over TCP only; give a TCP \
                              address in --p2p-listen"
                        .into(),
                });
            }
            if config.mdns {
                tracing::warn!(
                    "private mesh with mDNS on: mDNS announces this node's peer id and addresses on the LAN in the clear"
                );
            }
            tracing::info!(fingerprint = %psk.fingerprint(), "private mesh: connections need the pre-shared key");
            private_swarm(config.keypair.clone(), parts, psk)?
        }
    };
    let Traversal {
        relays, external, ..
    } = config.traversal;
    let mut reach = Reach::default();
    for addr in external {
        reach.confirmed(addr.clone());
        swarm.add_external_address(addr);
    }
    for addr in &listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| NetError::Listen {
                addr: addr.clone(),
                message: e.to_string(),
            })?;
    }
    let (command_tx, commands) = mpsc::channel(COMMAND_QUEUE);
    let (events, event_rx) = mpsc::channel(EVENT_QUEUE);
    let client = Client {
        sender: command_tx,
        control: swarm.behaviour().stream.new_control(),
        doors: swarm.behaviour().inbound.doors(),
        local_peer_id: *swarm.local_peer_id(),
    };
    let event_loop = EventLoop {
        swarm,
        commands,
        events,
        role: config.role,
        bootstrap,
        announced: None,
        pending_open: HashMap::new(),
        leaving: None,
        conduct: Conduct::default(),
        providers: HashMap::new(),
        departed: std::collections::HashSet::new(),
        relays: relays.into_iter().map(|relay| (relay, None)).collect(),
        reach,
        awaiting_direct: HashMap::new(),
        autonat_confirmed: std::collections::HashSet::new(),
    };
    Ok((client, event_rx, event_loop))
}

fn setup(e: &dyn std::fmt::Display) -> NetError {
    NetError::Setup {
        message: e.to_string(),
    }
}

/// Whether an address is on the loopback interface.
fn is_loopback(addr: &Multiaddr) -> bool {
    ip_of(addr).is_some_and(|ip| ip.is_loopback())
}

fn is_quic(addr: &Multiaddr) -> bool {
    addr.iter()
        .any(|p| matches!(p, libp2p::multiaddr::Protocol::QuicV1))
}

/// The open mesh: TCP and QUIC, Noise, Yamux, and circuits through relays.
fn public_swarm(keypair: Keypair, parts: Parts) -> Result<Swarm<Behaviour>, NetError> {
    Ok(libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_quic()
        .with_other_transport(|key| -> Result<_, BoxError> {
            Ok(
                tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                    .upgrade(libp2p::core::upgrade::Version::V1Lazy)
                    .authenticate(noise::Config::new(key)?)
                    .multiplex(yamux::Config::default())
                    .timeout(TCP_DIAL_TIMEOUT),
            )
        })
        .map_err(|e| setup(&e))?
        .with_dns()
        .map_err(|e| setup(&e))?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| setup(&e))?
        .with_behaviour(|key, relay| -> Result<Behaviour, BoxError> {
            Ok(Behaviour::new(key, relay, parts)?)
        })
        .map_err(|e| setup(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT))
        .build())
}

/// A private mesh: TCP wrapped in the pre-shared key (libp2p `pnet`), then Noise and Yamux;
/// circuits run inside a relay connection, itself wrapped in the key.
fn private_swarm(
    keypair: Keypair,
    parts: Parts,
    psk: PreSharedKey,
) -> Result<Swarm<Behaviour>, NetError> {
    Ok(libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_other_transport(|key| -> Result<_, BoxError> {
            Ok(
                tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                    .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
                    .upgrade(libp2p::core::upgrade::Version::V1Lazy)
                    .authenticate(noise::Config::new(key)?)
                    .multiplex(yamux::Config::default())
                    .timeout(TCP_DIAL_TIMEOUT),
            )
        })
        .map_err(|e| setup(&e))?
        .with_dns()
        .map_err(|e| setup(&e))?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| setup(&e))?
        .with_behaviour(|key, relay| -> Result<Behaviour, BoxError> {
            Ok(Behaviour::new(key, relay, parts)?)
        })
        .map_err(|e| setup(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT))
        .build())
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl EventLoop {
    /// Runs until every [`Client`] is dropped.
    pub async fn run(mut self) {
        self.dial_bootstrap();
        self.reserve_at_relays();
        // The first maintenance comes one interval after the bootstrap dials, not on top of them.
        let start = tokio::time::Instant::now() + MAINTENANCE_INTERVAL;
        let mut tick = tokio::time::interval_at(start, MAINTENANCE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.recv() => match command {
                    Some(command) => self.on_command(command),
                    None => return,
                },
                _ = tick.tick() => self.on_tick(),
            }
        }
    }

    /// Dials the bootstrap addresses: direct ones at once, circuits through their relays.
    fn dial_bootstrap(&mut self) {
        for addr in self.bootstrap.clone() {
            if is_circuit(&addr) {
                continue;
            }
            if let Err(e) = self.swarm.dial(addr.clone()) {
                tracing::warn!(%addr, error = %e, "bootstrap dial failed");
            }
        }
        self.dial_bootstrap_circuits(None);
    }

    /// Dials each bootstrap circuit (`<relay>/p2p-circuit/p2p/<peer>`) whose peer is not
    /// connected, through `via` only when given (a relay just connected), else through any.
    ///
    /// A circuit goes out only over a live connection to its relay; without one this dials the
    /// relay, once per relay, and the circuit follows when it connects. (libp2p's relay client
    /// dials a missing relay per circuit, and refuses all but the first of several such dials
    /// to one relay at once, so circuits dialled together before it connects fail.) Unlike
    /// other re-dials these go out even while a dial to the peer is under way: Kademlia keeps
    /// dialling the private addresses of a provider it found, which never answer, and the
    /// circuit is the only way in.
    fn dial_bootstrap_circuits(&mut self, via: Option<PeerId>) {
        let mut relays_dialled = HashSet::new();
        for addr in self.bootstrap.clone() {
            let (Some((relay_addr, relay)), Some(peer)) = (relay_of(&addr), peer_of(&addr)) else {
                continue;
            };
            if via.is_some_and(|via| via != relay) || self.swarm.is_connected(&peer) {
                continue;
            }
            let dial = if self.swarm.is_connected(&relay) {
                DialOpts::peer_id(peer)
                    .addresses(vec![addr.clone()])
                    .condition(PeerCondition::Disconnected)
                    .build()
            } else if relays_dialled.insert(relay) {
                DialOpts::peer_id(relay)
                    .addresses(vec![relay_addr])
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build()
            } else {
                continue;
            };
            if let Err(e) = self.swarm.dial(dial) {
                tracing::debug!(%addr, error = %e, "bootstrap circuit dial failed");
            }
        }
    }

    /// Dials again each bootstrap peer this node lost (a gateway that restarted, a provider
    /// that came back), even while it is connected to others; an address without a peer id
    /// only when it is connected to nobody.
    fn redial_bootstrap(&mut self) {
        self.dial_bootstrap_circuits(None);
        let alone = self.swarm.connected_peers().next().is_none();
        for addr in self.bootstrap.clone() {
            if is_circuit(&addr) {
                continue;
            }
            let dial = match peer_of(&addr) {
                // Not again while a dial to it is still under way.
                Some(peer) if !self.swarm.is_connected(&peer) => DialOpts::peer_id(peer)
                    .addresses(vec![addr.clone()])
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build(),
                None if alone => DialOpts::unknown_peer_id().address(addr.clone()).build(),
                _ => continue,
            };
            if let Err(e) = self.swarm.dial(dial) {
                tracing::debug!(%addr, error = %e, "bootstrap re-dial failed");
            }
        }
    }

    fn on_tick(&mut self) {
        for peer in self.conduct.lift_expired(std::time::Instant::now()) {
            tracing::info!(%peer, "ban over");
            self.swarm.behaviour_mut().blocked.unblock_peer(peer);
        }
        self.redial_bootstrap();
        self.reserve_at_relays();
        self.refresh_capabilities();
        if self.swarm.connected_peers().next().is_none() {
            return;
        }
        // Fails only with an empty routing table; the next tick tries again.
        let _ = self.swarm.behaviour_mut().kad.bootstrap();
        self.discover();
    }

    /// On gateways: asks every provider not asked for [`CAPS_REFRESH`] for its capabilities.
    fn refresh_capabilities(&mut self) {
        let now = std::time::Instant::now();
        let due: Vec<PeerId> = self
            .providers
            .iter_mut()
            .filter(|(_, asked)| now.duration_since(**asked) >= CAPS_REFRESH)
            .map(|(peer, asked)| {
                *asked = now;
                *peer
            })
            .collect();
        for peer in due {
            self.swarm
                .behaviour_mut()
                .caps
                .send_request(&peer, CapsRequest);
        }
    }

    /// Providers publish their records (first connection, then every [`REANNOUNCE_INTERVAL`]);
    /// gateways look providers up.
    fn discover(&mut self) {
        match &self.role {
            Role::Provider(caps) => {
                if self
                    .announced
                    .is_some_and(|t| t.elapsed() < REANNOUNCE_INTERVAL)
                {
                    return;
                }
                let mut keys = vec![all_providers_key()];
                keys.extend(caps.models.iter().map(|m| model_key(&m.digest)));
                let kad = &mut self.swarm.behaviour_mut().kad;
                for key in keys {
                    if let Err(e) = kad.start_providing(key) {
                        tracing::warn!(error = %e, "cannot store provider record");
                    }
                }
                self.announced = Some(std::time::Instant::now());
            }
            Role::Gateway => {
                self.swarm
                    .behaviour_mut()
                    .kad
                    .get_providers(all_providers_key());
            }
            Role::Probe => {}
        }
    }

    fn emit(&self, event: Event) {
        if let Err(e) = self.events.try_send(event) {
            tracing::warn!(error = %e, "application is not keeping up with mesh events; dropped one");
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::ListenAddrs { reply } => {
                let _ = reply.send(self.swarm.listeners().cloned().collect());
            }
            Command::Dial { addr, reply } => {
                let result = self.swarm.dial(addr).map_err(|e| NetError::Dial {
                    message: e.to_string(),
                });
                let _ = reply.send(result);
            }
            Command::OpenLeaves {
                peer,
                request,
                reply,
            } => {
                let id = self.swarm.behaviour_mut().open.send_request(&peer, request);
                self.pending_open.insert(id, (peer, reply));
            }
            Command::RespondOpenLeaves { channel, response } => {
                if self
                    .swarm
                    .behaviour_mut()
                    .open
                    .send_response(channel, response)
                    .is_err()
                {
                    tracing::debug!("challenger left before the opening was sent");
                }
            }
            Command::ConnectedPeers { reply } => {
                let _ = reply.send(self.swarm.connected_peers().copied().collect());
            }
            Command::Reachability { reply } => {
                let listen = self.swarm.listeners().cloned().collect();
                let _ = reply.send(self.reach.snapshot(listen));
            }
            Command::Leave { reply } => self.start_leaving(reply),
            Command::Report { peer, offence } => self.strike(peer, offence),
            Command::PublishProof { proof } => self.publish_proof(proof),
            Command::JudgeProof {
                id,
                source,
                verdict,
            } => self.judge_proof(&id, source, verdict),
        }
    }

    /// Publishes a fraud proof to the other gateways (gateways only).
    fn publish_proof(&mut self, proof: Vec<u8>) {
        let Some(gossip) = self.swarm.behaviour_mut().gossip.as_mut() else {
            return;
        };
        match gossip.publish(super::gossip::topic(), proof) {
            Ok(id) => tracing::info!(message = %id, "fraud proof published to the other gateways"),
            // No other gateway connected: nobody to tell.
            Err(libp2p::gossipsub::PublishError::NoPeersSubscribedToTopic) => {
                tracing::debug!("fraud proof not published: no other gateway connected");
            }
            Err(e) => tracing::warn!(error = %e, "cannot publish a fraud proof"),
        }
    }

    /// Passes a heard proof on, or drops it (striking its sender when it was forged).
    fn judge_proof(
        &mut self,
        id: &libp2p::gossipsub::MessageId,
        source: PeerId,
        verdict: super::gossip::ProofVerdict,
    ) {
        use super::gossip::ProofVerdict;
        use libp2p::gossipsub::MessageAcceptance;
        let acceptance = match verdict {
            ProofVerdict::Holds => MessageAcceptance::Accept,
            ProofVerdict::Forged => MessageAcceptance::Reject,
            ProofVerdict::Unchecked => MessageAcceptance::Ignore,
        };
        if let Some(gossip) = self.swarm.behaviour_mut().gossip.as_mut() {
            gossip.report_message_validation_result(id, &source, acceptance);
        }
        if verdict == ProofVerdict::Forged {
            self.strike(source, Offence::Violation);
        }
    }

    /// Counts an offence; a peer with enough is disconnected and refused for a while.
    fn strike(&mut self, peer: PeerId, offence: Offence) {
        if peer == *self.swarm.local_peer_id() {
            return;
        }
        if self
            .conduct
            .strike(peer, offence, std::time::Instant::now())
        {
            tracing::warn!(%peer, ?offence, "peer banned for flooding or breaking the protocol");
            self.swarm.behaviour_mut().blocked.block_peer(peer);
            if let Some(lifted) = self.conduct.lift_excess() {
                self.swarm.behaviour_mut().blocked.unblock_peer(lifted);
            }
        }
    }

    /// Stops advertising models and tells every connected peer; replies when all have answered.
    fn start_leaving(&mut self, reply: oneshot::Sender<usize>) {
        if let Role::Provider(caps) = &mut self.role {
            caps.models.clear();
        }
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        let pending = peers
            .iter()
            .map(|peer| self.swarm.behaviour_mut().leave.send_request(peer, Leaving))
            .collect::<HashSet<_>>();
        tracing::info!(peers = peers.len(), "announcing shutdown to peers");
        let leave = Leave {
            pending,
            acked: 0,
            reply,
        };
        if leave.pending.is_empty() {
            let _ = leave.reply.send(0);
        } else {
            self.leaving = Some(leave);
        }
    }

    /// Records one peer's answer (or failure) to the leave announcement.
    fn leave_answered(&mut self, id: OutboundRequestId, acked: bool) {
        let Some(leave) = self.leaving.as_mut() else {
            return;
        };
        if leave.pending.remove(&id) && acked {
            leave.acked += 1;
        }
        if leave.pending.is_empty()
            && let Some(leave) = self.leaving.take()
        {
            let _ = leave.reply.send(leave.acked);
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event),
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, peer = %self.swarm.local_peer_id(), "listening");
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                connection_id,
                num_established,
                ..
            } => {
                tracing::debug!(peer = %peer_id, addr = %endpoint.get_remote_address(), "connected");
                if num_established.get() == 1 && !endpoint.is_relayed() {
                    self.dial_bootstrap_circuits(Some(peer_id));
                }
                self.reach.connected(connection_id, peer_id, &endpoint);
                // With a direct connection, relayed ones only risk streams the relay cuts at
                // 128 KiB (libp2p-stream picks a connection at random).
                if !self.reach.only_relayed(peer_id) {
                    self.close_relayed(peer_id);
                }
                if !endpoint.is_relayed() {
                    self.release_awaiting(peer_id);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                cause,
                connection_id,
                ..
            } => {
                tracing::debug!(peer = %peer_id, ?cause, "connection closed");
                self.reach.disconnected(connection_id);
                if num_established > 0 && self.reach.only_relayed(peer_id) {
                    self.withdraw_to_relay(peer_id);
                }
                if num_established == 0 {
                    self.providers.remove(&peer_id);
                    self.awaiting_direct.remove(&peer_id);
                    self.departed.remove(&peer_id);
                    self.emit(Event::PeerGone { peer: peer_id });
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(peer = ?peer_id, error = %error, "dial failed");
            }
            SwarmEvent::ExternalAddrConfirmed { address } => self.address_confirmed(address),
            SwarmEvent::ExternalAddrExpired { address } => self.reach.expired(&address),
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => self.relay_listener_closed(listener_id, reason.err()),
            _ => {}
        }
    }

    /// An address peers can reach: dialled back by AutoNAT, announced, or a relay circuit.
    fn address_confirmed(&mut self, address: Multiaddr) {
        if self.reach.confirmed(address.clone()) {
            tracing::info!(%address, "reachable at");
        }
    }

    /// Listens through each configured relay that has no live reservation (at start, and on
    /// each tick after a relay went away or refused).
    fn reserve_at_relays(&mut self) {
        for (relay, listener) in &mut self.relays {
            if listener.is_some() {
                continue;
            }
            let Some(peer) = peer_of(relay) else {
                continue;
            };
            if self
                .swarm
                .behaviour()
                .blocked
                .blocked_peers()
                .contains(&peer)
            {
                continue;
            }
            let circuit = relay.clone().with(libp2p::multiaddr::Protocol::P2pCircuit);
            match self.swarm.listen_on(circuit) {
                Ok(id) => *listener = Some(id),
                Err(e) => self.reach.relay_failed(relay.clone(), e.to_string()),
            }
        }
    }

    /// A circuit listener ended: the relay went away or refused the reservation. The next
    /// tick asks again.
    fn relay_listener_closed(&mut self, id: ListenerId, error: Option<std::io::Error>) {
        let Some((relay, listener)) = self.relays.iter_mut().find(|(_, l)| *l == Some(id)) else {
            return;
        };
        *listener = None;
        let why = error.map_or_else(|| "closed".to_string(), |e| e.to_string());
        tracing::warn!(%relay, %why, "relay reservation lost; retrying");
        self.reach.relay_failed(relay.clone(), why);
    }

    /// Logs and records what the relay, hole punching and AutoNAT behaviours report.
    fn on_traversal_event(&mut self, event: Traversed) {
        match event {
            Traversed::Relay(relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                renewal,
                ..
            }) => {
                if let Some((relay, _)) = self
                    .relays
                    .iter()
                    .find(|(addr, _)| peer_of(addr) == Some(relay_peer_id))
                {
                    self.reach.relay_accepted(relay.clone());
                }
                if !renewal {
                    tracing::info!(relay = %relay_peer_id, "relay reservation accepted");
                }
            }
            Traversed::Relay(event) => tracing::debug!(?event, "relay client"),
            Traversed::HolePunch(Guarded::Inner(dcutr::Event {
                remote_peer_id,
                result,
            })) => self.hole_punched(remote_peer_id, result),
            Traversed::HolePunch(Guarded::Confirmed(_)) => {}
            Traversed::AutoNat(Guarded::Confirmed(address)) => self.autonat_confirmed(address),
            Traversed::AutoNat(Guarded::Inner(autonat::v2::client::Event {
                tested_addr,
                server,
                result: Err(error),
                ..
            })) => {
                if self.reach.unreachable(tested_addr.clone()) {
                    tracing::info!(address = %tested_addr, %server, %error, "not reachable at (AutoNAT)");
                }
            }
            Traversed::AutoNat(event) => tracing::debug!(?event, "AutoNAT"),
        }
    }

    /// An AutoNAT server dialled `address` back. Only approved candidates are tested, and at
    /// most [`MAX_CONFIRMED`] are ever announced: a lying server can add little.
    fn autonat_confirmed(&mut self, address: Multiaddr) {
        if self.autonat_confirmed.len() >= MAX_CONFIRMED {
            tracing::debug!(%address, "AutoNAT confirmation ignored: enough external addresses");
            return;
        }
        if self.autonat_confirmed.insert(address.clone()) {
            self.swarm.add_external_address(address.clone());
            self.address_confirmed(address);
        }
    }

    /// A peer this node chose: a bootstrap peer or a relay named by its peer id (Noise proved
    /// it, whichever side dialled), or one at a bootstrap address this node `dialed` itself.
    fn is_chosen(&self, peer: PeerId, remote: &Multiaddr, dialed: bool) -> bool {
        let bare = |a: &Multiaddr| {
            a.iter()
                .filter(|p| !matches!(p, libp2p::multiaddr::Protocol::P2p(_)))
                .collect::<Multiaddr>()
        };
        let remote = bare(remote);
        self.bootstrap
            .iter()
            .chain(self.relays.iter().map(|(relay, _)| relay))
            .any(|chosen| peer_of(chosen) == Some(peer) || (dialed && bare(chosen) == remote))
    }

    /// Routes to a provider that was reached only through a relay, now that a direct
    /// connection exists; its relayed connections close, so that no stream takes them.
    fn release_awaiting(&mut self, peer: PeerId) {
        if let Some(capabilities) = self.awaiting_direct.remove(&peer)
            && !self.departed.contains(&peer)
        {
            self.close_relayed(peer);
            tracing::info!(%peer, "provider reachable directly now");
            self.emit(Event::ProviderUp { peer, capabilities });
        }
    }

    /// A routed provider's direct connection closed and only relayed ones are left: it is not
    /// routed to until a direct one is back (its next capabilities wait in `awaiting_direct`).
    /// Its relayed connections close too: the next tick dials it again through the relay, and
    /// hole punching gets another try.
    fn withdraw_to_relay(&mut self, peer: PeerId) {
        if self.providers.contains_key(&peer) && !self.awaiting_direct.contains_key(&peer) {
            tracing::info!(%peer, "provider reachable only through a relay now; not routed to");
            self.emit(Event::PeerGone { peer });
            self.close_relayed(peer);
        }
    }

    /// Closes every relayed connection to `peer`.
    fn close_relayed(&mut self, peer: PeerId) {
        for id in self.reach.relayed_connections(peer) {
            self.swarm.close_connection(id);
        }
    }

    /// A hole punch succeeded or gave up. A direct connection makes the relayed ones useless,
    /// and worse: streams would keep going through a relay that cuts circuits at 128 KiB.
    fn hole_punched(
        &mut self,
        peer: PeerId,
        result: Result<libp2p::swarm::ConnectionId, dcutr::Error>,
    ) {
        self.reach.hole_punched(result.is_ok());
        match result {
            Ok(_) => {
                tracing::info!(%peer, "direct connection by hole punching");
                self.close_relayed(peer);
                self.release_awaiting(peer);
            }
            Err(error) => tracing::info!(%peer, %error, "hole punching failed; staying relayed"),
        }
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Inbound(refused) => self.strike(refused.peer, Offence::Refused),
            BehaviourEvent::RelayClient(event) => self.on_traversal_event(Traversed::Relay(event)),
            BehaviourEvent::Dcutr(event) => self.on_traversal_event(Traversed::HolePunch(event)),
            BehaviourEvent::Autonat(event) => self.on_traversal_event(Traversed::AutoNat(event)),
            BehaviourEvent::Relay(event) => tracing::debug!(?event, "relay service"),
            BehaviourEvent::Gossip(libp2p::gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => {
                // Proofs take at most half the event queue; past that they are dropped
                // unchecked, so that provider events still get through.
                if self.events.capacity() < EVENT_QUEUE / 2 {
                    self.judge_proof(
                        &message_id,
                        propagation_source,
                        super::gossip::ProofVerdict::Unchecked,
                    );
                    return;
                }
                self.emit(Event::FraudProof {
                    source: propagation_source,
                    id: message_id,
                    proof: message.data,
                });
            }
            BehaviourEvent::Gossip(event) => tracing::debug!(?event, "gossip"),
            BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                connection_id,
            }) => {
                // What the peer says it sees this node at is a claim: believed from a peer this
                // node chose to dial, or from peers in two networks.
                let remote = self.reach.remote(connection_id).cloned();
                let chosen = remote.as_ref().is_some_and(|remote| {
                    self.is_chosen(peer_id, remote, self.reach.dialed(connection_id))
                });
                let listen: Vec<Multiaddr> = self.swarm.listeners().cloned().collect();
                let seen = with_listen_port(&info.observed_addr, &listen);
                if self.reach.sighted(connection_id, &seen, chosen) {
                    self.reach.observed(seen.clone());
                    let behaviour = self.swarm.behaviour_mut();
                    behaviour.autonat.approve(&seen, chosen);
                    behaviour.dcutr.approve(&seen, chosen);
                }
                // A peer's loopback addresses lead back to this host, unless this host is the
                // peer's (this connection runs over loopback).
                let same_host = remote.as_ref().is_some_and(is_loopback);
                for addr in info
                    .listen_addrs
                    .iter()
                    .filter(|a| same_host || !is_loopback(a))
                {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer_id, addr.clone());
                }
                if matches!(self.role, Role::Gateway) && info.protocols.contains(&CAPS_PROTOCOL) {
                    self.swarm
                        .behaviour_mut()
                        .caps
                        .send_request(&peer_id, CapsRequest);
                }
            }
            BehaviourEvent::Caps(request_response::Event::Message { peer, message, .. }) => {
                match message {
                    request_response::Message::Request { channel, .. } => {
                        let caps = match &self.role {
                            Role::Provider(caps) => caps.clone(),
                            Role::Gateway | Role::Probe => Capabilities {
                                version: GenerateRequest::VERSION,
                                models: vec![],
                                stake: None,
                            },
                        };
                        let _ = self.swarm.behaviour_mut().caps.send_response(channel, caps);
                    }
                    request_response::Message::Response { response, .. } => {
                        if !response.models.is_empty()
                            && self.swarm.is_connected(&peer)
                            && !self.departed.contains(&peer)
                        {
                            self.providers
                                .entry(peer)
                                .or_insert_with(std::time::Instant::now);
                            if self.reach.only_relayed(peer) {
                                if self.awaiting_direct.insert(peer, response).is_none() {
                                    tracing::info!(%peer, "provider reachable only through a relay; not routed to until direct");
                                }
                            } else {
                                self.emit(Event::ProviderUp {
                                    peer,
                                    capabilities: response,
                                });
                            }
                        }
                    }
                }
            }
            BehaviourEvent::Leave(request_response::Event::Message { peer, message, .. }) => {
                match message {
                    request_response::Message::Request { channel, .. } => {
                        tracing::info!(%peer, "peer announced it is leaving");
                        self.providers.remove(&peer);
                        self.awaiting_direct.remove(&peer);
                        self.departed.insert(peer);
                        self.emit(Event::ProviderLeaving { peer });
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .leave
                            .send_response(channel, LeaveAck);
                    }
                    request_response::Message::Response { request_id, .. } => {
                        self.leave_answered(request_id, true);
                    }
                }
            }
            BehaviourEvent::Leave(request_response::Event::OutboundFailure {
                request_id, ..
            }) => self.leave_answered(request_id, false),
            BehaviourEvent::Caps(request_response::Event::OutboundFailure {
                peer, error, ..
            }) => {
                tracing::debug!(%peer, %error, "capability query failed");
            }
            BehaviourEvent::Open(request_response::Event::Message { peer, message, .. }) => {
                match message {
                    request_response::Message::Request {
                        request, channel, ..
                    } => {
                        self.emit(Event::OpenLeaves {
                            peer,
                            request,
                            channel,
                        });
                    }
                    request_response::Message::Response {
                        request_id,
                        response,
                    } => {
                        if let Some((_, reply)) = self.pending_open.remove(&request_id) {
                            let _ = reply.send(Ok(response));
                        }
                    }
                }
            }
            BehaviourEvent::Open(request_response::Event::OutboundFailure {
                request_id,
                error,
                ..
            }) => {
                if let Some((peer, reply)) = self.pending_open.remove(&request_id) {
                    let _ = reply.send(Err(NetError::Request {
                        peer,
                        message: error.to_string(),
                    }));
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                for (peer, addr) in found {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer, addr.clone());
                    if !self.swarm.is_connected(&peer) {
                        // Both sides hear each other's announcement at the same moment and dial
                        // at once; dialling from the listen port (libp2p's default port reuse)
                        // then makes a TCP simultaneous open that fails the Noise handshake on
                        // both sides. A fresh source port keeps the two dials apart.
                        let opts = DialOpts::peer_id(peer)
                            .addresses(vec![addr])
                            .allocate_new_port()
                            .build();
                        let _ = self.swarm.dial(opts);
                    }
                }
            }
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                result:
                    kad::QueryResult::GetProviders(Ok(kad::GetProvidersOk::FoundProviders {
                        providers,
                        ..
                    })),
                ..
            }) => {
                let me = *self.swarm.local_peer_id();
                for peer in providers {
                    if peer != me && !self.swarm.is_connected(&peer) {
                        let _ = self.swarm.dial(peer);
                    }
                }
            }
            BehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result: Err(error),
            }) => {
                tracing::debug!(%peer, %error, "ping failed; closing the connection");
                self.swarm.close_connection(connection);
            }
            _ => {}
        }
    }
}

/// What the NAT traversal behaviours report.
enum Traversed {
    Relay(relay::client::Event),
    HolePunch(Guarded<dcutr::Event>),
    AutoNat(Guarded<autonat::v2::client::Event>),
}
