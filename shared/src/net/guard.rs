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

/// Most candidates a guarded behaviour ever hears of from each source: peers this node chose,
/// and the rest (so that lies that got past the witness rule cannot use up the chosen peers'
/// share).
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
    /// How many approvals came from chosen peers, and from the rest.
    approved_from: [usize; 2],
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
            approved_from: [0; 2],
            remotes: HashMap::new(),
            dial_backs: HashMap::new(),
        }
    }
}

impl<B: NetworkBehaviour> Guard<B> {
    /// Lets the inner behaviour hear of `addr` as an external address candidate, vouched for
    /// by a peer this node `chose` or by witnesses; returns whether it did (not already, and
    /// under [`MAX_CANDIDATES`] from that source).
    pub(crate) fn approve(&mut self, addr: &Multiaddr, chose: bool) -> bool {
        let count = &mut self.approved_from[usize::from(chose)];
        if *count >= MAX_CANDIDATES || self.approved.contains(addr) {
            return false;
        }
        *count += 1;
        self.approved.insert(addr.clone());
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
                // Dial requests come in on connections the client opened, directly: a relayed
                // one's remote address is the relay's.
                if endpoint.is_listener()
                    && !endpoint.is_relayed()
                    && let Some(ip) = ip_of(endpoint.get_remote_address())
                {
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

    use std::collections::VecDeque;
    use std::convert::Infallible;

    use libp2p::core::ConnectedPoint;
    use libp2p::swarm::dial_opts::DialOpts;
    use libp2p::swarm::dummy;

    use super::*;

    /// An inner behaviour that records the candidates it hears of and says what it is told to.
    #[derive(Default)]
    struct Recorder {
        heard: Vec<Multiaddr>,
        say: VecDeque<ToSwarm<(), Infallible>>,
    }

    impl NetworkBehaviour for Recorder {
        type ConnectionHandler = dummy::ConnectionHandler;
        type ToSwarm = ();

        fn handle_established_inbound_connection(
            &mut self,
            _: ConnectionId,
            _: PeerId,
            _: &Multiaddr,
            _: &Multiaddr,
        ) -> Result<THandler<Self>, ConnectionDenied> {
            Ok(dummy::ConnectionHandler)
        }

        fn handle_established_outbound_connection(
            &mut self,
            _: ConnectionId,
            _: PeerId,
            _: &Multiaddr,
            _: Endpoint,
            _: PortUse,
        ) -> Result<THandler<Self>, ConnectionDenied> {
            Ok(dummy::ConnectionHandler)
        }

        fn on_swarm_event(&mut self, event: FromSwarm) {
            if let FromSwarm::NewExternalAddrCandidate(candidate) = event {
                self.heard.push(candidate.addr.clone());
            }
        }

        fn on_connection_handler_event(
            &mut self,
            _: PeerId,
            _: ConnectionId,
            event: THandlerOutEvent<Self>,
        ) {
            libp2p::core::util::unreachable(event)
        }

        fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<(), Infallible>> {
            self.say.pop_front().map_or(Poll::Pending, Poll::Ready)
        }
    }

    fn addr(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    fn poll(guard: &mut Guard<Recorder>) -> ToSwarm<Guarded<()>, Infallible> {
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        match guard.poll(&mut cx) {
            Poll::Ready(event) => event,
            Poll::Pending => panic!("the inner behaviour had something to say"),
        }
    }

    #[test]
    fn candidates_reach_the_inner_behaviour_only_when_approved() {
        let mut guard = Guard::new(Recorder::default(), Policy::Candidates);
        let claimed = addr("/ip4/198.51.100.7/tcp/4001");
        guard.on_swarm_event(FromSwarm::NewExternalAddrCandidate(
            NewExternalAddrCandidate { addr: &claimed },
        ));
        assert!(guard.inner.heard.is_empty(), "a bare claim goes nowhere");
        assert!(guard.approve(&claimed, false));
        assert!(!guard.approve(&claimed, true), "once");
        assert_eq!(guard.inner.heard, vec![claimed]);
        for port in 0..100u16 {
            guard.approve(&addr(&format!("/ip4/198.51.100.8/tcp/{port}")), false);
        }
        assert_eq!(guard.inner.heard.len(), MAX_CANDIDATES);
        assert!(
            guard.approve(&addr("/ip4/192.0.2.1/tcp/4001"), true),
            "lies that got through do not use up the chosen peers' share"
        );
    }

    #[test]
    fn confirmations_go_to_the_event_loop_not_the_swarm() {
        let mut guard = Guard::new(Recorder::default(), Policy::Candidates);
        let confirmed = addr("/ip4/198.51.100.7/tcp/4001");
        guard
            .inner
            .say
            .push_back(ToSwarm::ExternalAddrConfirmed(confirmed.clone()));
        assert!(matches!(
            poll(&mut guard),
            ToSwarm::GenerateEvent(Guarded::Confirmed(a)) if a == confirmed
        ));
    }

    #[test]
    fn a_dial_back_goes_only_to_the_ip_the_client_connects_from() {
        let mut guard = Guard::new(Recorder::default(), Policy::DialBacks);
        let client = PeerId::random();
        let inbound = ConnectedPoint::Listener {
            local_addr: addr("/ip4/203.0.113.1/tcp/4001"),
            send_back_addr: addr("/ip4/198.51.100.7/tcp/50000"),
        };
        guard.on_swarm_event(FromSwarm::ConnectionEstablished(ConnectionEstablished {
            peer_id: client,
            connection_id: ConnectionId::new_unchecked(1),
            endpoint: &inbound,
            failed_addresses: &[],
            other_established: 0,
        }));
        let mut dial_back = |to: &str| {
            let to = addr(to);
            let opts = DialOpts::peer_id(client)
                .addresses(vec![to.clone()])
                .build();
            let id = opts.connection_id();
            guard.inner.say.push_back(ToSwarm::Dial { opts });
            assert!(matches!(poll(&mut guard), ToSwarm::Dial { .. }));
            guard.handle_pending_outbound_connection(id, Some(client), &[to], Endpoint::Dialer)
        };
        assert!(dial_back("/ip4/198.51.100.7/tcp/4001").is_ok());
        assert!(
            dial_back("/ip4/10.0.0.1/tcp/22").is_err(),
            "no scanning for a client"
        );
        assert!(dial_back("/dns4/internal.example/tcp/80").is_err());
    }
}
