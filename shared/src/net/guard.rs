//! Guards around libp2p's NAT traversal behaviours, for peers that lie.
//!
//! Identify turns whatever address a peer claims to see this node at into an "external address
//! candidate" for every behaviour. Unguarded, AutoNAT v2's client keeps each one for good and
//! tests them all (uploading up to 100 KB a test), DCUtR offers the latest 20 for hole
//! punching, and AutoNAT confirms whatever a server says it dialled back, straight into the
//! swarm's external addresses (which identify and the relay hand out). [`Guarded`] with
//! [`Policy::Candidates`] sits in front of the AutoNAT client and DCUtR: they hear only the
//! candidates the event loop [`approve`](Guarded::approve)s, at most [`MAX_CANDIDATES`], and
//! AutoNAT's confirmations come to the event loop as [`Guarded::Confirmed`] events rather than
//! going to the swarm. With [`Policy::DialBacks`] it guards the AutoNAT server: dial-backs go
//! only to the IP address the client's own connection comes from, so a client cannot make
//! this node dial (or scan) anything else.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::task::{Context, Poll};

use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::behaviour::{ConnectionClosed, ConnectionEstablished, NewExternalAddrCandidate};
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};

/// Most candidates a guarded behaviour ever hears of.
pub(crate) const MAX_CANDIDATES: usize = 16;

/// What a guard holds back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Policy {
    /// Candidates only when approved; confirmations to the event loop.
    Candidates,
    /// Dial-backs only to the requesting connection's IP address.
    DialBacks,
}

/// What a guarded behaviour reports.
#[derive(Debug)]
pub(crate) enum Guarded<E> {
    /// The inner behaviour's own event.
    Inner(E),
    /// An AutoNAT server dialled this address back: the event loop decides what to make of it.
    Confirmed(Multiaddr),
}

/// A behaviour behind a [`Policy`].
pub(crate) struct Guard<B> {
    inner: B,
    policy: Policy,
    approved: HashSet<Multiaddr>,
    /// Open connections' remote IP addresses (dial-back policy).
    remotes: HashMap<ConnectionId, (PeerId, IpAddr)>,
    /// Dials the inner behaviour asked for, by the peer they are for (dial-back policy).
    dial_backs: HashMap<ConnectionId, PeerId>,
}

impl<B> Guard<B> {
    pub(crate) fn new(inner: B, policy: Policy) -> Self {
        Self {
            inner,
            policy,
            approved: HashSet::new(),
            remotes: HashMap::new(),
            dial_backs: HashMap::new(),
        }
    }
}

impl<B: NetworkBehaviour> Guard<B> {
    /// Lets the inner behaviour hear of `addr` as an external address candidate; returns
    /// whether it did (not already, and under [`MAX_CANDIDATES`]).
    pub(crate) fn approve(&mut self, addr: &Multiaddr) -> bool {
        if self.approved.len() >= MAX_CANDIDATES || !self.approved.insert(addr.clone()) {
            return false;
        }
        self.inner
            .on_swarm_event(FromSwarm::NewExternalAddrCandidate(
                NewExternalAddrCandidate { addr },
            ));
        true
    }

    /// Whether every address of a dial-back is at an IP address `peer` is connected from.
    fn dial_back_allowed(&self, peer: PeerId, addresses: &[Multiaddr]) -> bool {
        !addresses.is_empty()
            && addresses.iter().all(|addr| {
                ip_of(addr).is_some_and(|ip| {
                    self.remotes
                        .values()
                        .any(|(p, remote)| *p == peer && *remote == ip)
                })
            })
    }
}

/// The IP address an address starts with.
pub(crate) fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => Some(IpAddr::V4(ip)),
        Some(Protocol::Ip6(ip)) => Some(IpAddr::V6(ip)),
        _ => None,
    }
}

impl<B: NetworkBehaviour> NetworkBehaviour for Guard<B> {
    type ConnectionHandler = B::ConnectionHandler;
    type ToSwarm = Guarded<B::ToSwarm>;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.inner
            .handle_pending_inbound_connection(connection_id, local_addr, remote_addr)
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.inner.handle_established_inbound_connection(
            connection_id,
            peer,
            local_addr,
            remote_addr,
        )
    }

    fn handle_pending_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        maybe_peer: Option<PeerId>,
        addresses: &[Multiaddr],
        effective_role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        if let Some(peer) = self.dial_backs.remove(&connection_id)
            && !self.dial_back_allowed(peer, addresses)
        {
            return Err(ConnectionDenied::new(DialBackRefused));
        }
        self.inner.handle_pending_outbound_connection(
            connection_id,
            maybe_peer,
            addresses,
            effective_role,
        )
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role_override: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.inner.handle_established_outbound_connection(
            connection_id,
            peer,
            addr,
            role_override,
            port_use,
        )
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::NewExternalAddrCandidate(_) if self.policy == Policy::Candidates => return,
            FromSwarm::ConnectionEstablished(ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            }) if self.policy == Policy::DialBacks => {
                if let Some(ip) = ip_of(endpoint.get_remote_address()) {
                    self.remotes.insert(connection_id, (peer_id, ip));
                }
            }
            FromSwarm::ConnectionClosed(ConnectionClosed { connection_id, .. }) => {
                self.remotes.remove(&connection_id);
            }
            FromSwarm::DialFailure(failure) => {
                self.dial_backs.remove(&failure.connection_id);
            }
            _ => {}
        }
        self.inner.on_swarm_event(event);
    }

    fn on_connection_handler_event(
        &mut self,
        peer_id: PeerId,
        connection_id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        self.inner
            .on_connection_handler_event(peer_id, connection_id, event);
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        let event = std::task::ready!(self.inner.poll(cx));
        Poll::Ready(match event {
            ToSwarm::ExternalAddrConfirmed(addr) if self.policy == Policy::Candidates => {
                ToSwarm::GenerateEvent(Guarded::Confirmed(addr))
            }
            ToSwarm::Dial { opts } if self.policy == Policy::DialBacks => {
                if let Some(peer) = opts.get_peer_id() {
                    self.dial_backs.insert(opts.connection_id(), peer);
                }
                ToSwarm::Dial { opts }
            }
            other => other.map_out(Guarded::Inner),
        })
    }
}

/// A dial-back to an address the client is not connected from.
#[derive(Debug, thiserror::Error)]
#[error("AutoNAT dial-back refused: not the IP address the client connects from")]
struct DialBackRefused;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use libp2p::swarm::dummy;

    #[test]
    fn at_most_so_many_candidates_are_approved_and_each_once() {
        let mut guard = Guard::new(dummy::Behaviour, Policy::Candidates);
        let addr: Multiaddr = "/ip4/198.51.100.7/tcp/4001".parse().unwrap();
        assert!(guard.approve(&addr));
        assert!(!guard.approve(&addr), "once");
        for port in 0..100u16 {
            guard.approve(&format!("/ip4/198.51.100.8/tcp/{port}").parse().unwrap());
        }
        assert_eq!(guard.approved.len(), MAX_CANDIDATES);
    }

    #[test]
    fn a_dial_back_goes_only_to_the_clients_own_ip() {
        let mut guard = Guard::new(dummy::Behaviour, Policy::DialBacks);
        let client = PeerId::random();
        guard.remotes.insert(
            ConnectionId::new_unchecked(1),
            (client, "198.51.100.7".parse().unwrap()),
        );
        let own: Multiaddr = "/ip4/198.51.100.7/tcp/4001".parse().unwrap();
        let other: Multiaddr = "/ip4/10.0.0.1/tcp/22".parse().unwrap();
        let name: Multiaddr = "/dns4/internal.example/tcp/80".parse().unwrap();
        assert!(guard.dial_back_allowed(client, std::slice::from_ref(&own)));
        assert!(!guard.dial_back_allowed(client, &[other]));
        assert!(!guard.dial_back_allowed(client, &[name]));
        assert!(!guard.dial_back_allowed(PeerId::random(), &[own]));
        assert!(!guard.dial_back_allowed(client, &[]));
    }
}
