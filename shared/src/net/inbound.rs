//! Inbound raw streams, taken concurrently under per-peer quotas.
//!
//! `libp2p-stream` hands inbound streams to its acceptor through a channel with room for one and
//! drops whatever does not fit, so a burst of requests lost streams at random and gateways had
//! to open one stream per provider at a time. Here each protocol the application accepts has a
//! [`Door`] with a [`Quota`]: a cap on the streams one peer holds at once and on those all peers
//! hold together (queued for the application or being served; the [`Slot`] travels with the
//! stream and frees its place when dropped). A stream past either gets the door's refusal frame
//! (the protocol's own "overloaded" answer) and is closed; one past its own peer's quota is also
//! reported as a [`Refused`]
//! event, and the event loop counts it against the peer ([`super::conduct`]). When a peer's last
//! connection closes (it left, or was banned), its places are given back at once; and when any
//! connection closes, the work on its streams is called off ([`Slot::serve`]). A stream whose
//! connection this node closed itself is not woken by the close: until it timed out, a crowd
//! of banned identities would otherwise hold every place, or a task each. Outbound streams
//! still go through `libp2p-stream`'s `Control`.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::future::{Future, Ready, ready};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::AsyncWriteExt;

use libp2p::core::transport::PortUse;
use libp2p::core::upgrade::{DeniedUpgrade, InboundUpgrade, UpgradeInfo};
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::swarm::handler::{ConnectionEvent, FullyNegotiatedInbound};
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm,
    NetworkBehaviour, SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{PeerId, Stream, StreamProtocol};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How many streams of one protocol a node takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Streams one peer may hold at once, waiting or being served.
    pub per_peer: usize,
    /// Streams every peer together may hold at once: what a crowd of identities can take.
    pub total: usize,
}

/// An accepted stream, with its place in its peer's quota.
#[derive(Debug)]
pub struct Inbound {
    /// Who opened it (authenticated by the connection's Noise handshake).
    pub peer: PeerId,
    /// The stream.
    pub stream: Stream,
    /// Keep this while serving the stream: dropping it gives the place back.
    pub slot: Slot,
}

/// A place in one peer's quota for one protocol; given back on drop.
#[derive(Debug)]
pub struct Slot {
    doors: Doors,
    protocol: StreamProtocol,
    /// Which door it came through: a door closed and opened again starts its count afresh.
    door: u64,
    peer: PeerId,
    /// Which of the peer's stays it belongs to: a place already given back when the peer's
    /// connections closed is not given back twice.
    stay: u64,
    /// Cancelled when the stream's connection closes.
    closed: CancellationToken,
}

impl Slot {
    /// Runs `work` (serving this slot's stream) until it ends, or until the stream's
    /// connection has closed, whichever comes first: `None` for the latter, when the stream is
    /// dead.
    pub async fn serve<T>(&self, work: impl Future<Output = T>) -> Option<T> {
        self.closed.run_until_cancelled(work).await
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(door) = self.doors.lock().get_mut(&self.protocol)
            && door.id == self.door
        {
            door.release(&self.peer, self.stay);
        }
    }
}

/// The application's end of one protocol's door.
#[derive(Debug)]
pub struct Incoming {
    receiver: mpsc::Receiver<Inbound>,
}

impl Incoming {
    /// The next accepted stream; `None` once the node has stopped.
    pub async fn next(&mut self) -> Option<Inbound> {
        self.receiver.recv().await
    }
}

/// A stream turned away at the door because its peer already held its quota.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refused {
    /// Who opened it.
    pub peer: PeerId,
    /// For what.
    pub protocol: StreamProtocol,
}

/// Why a stream was reset at the door.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RefusalReason {
    /// The peer already held its quota of streams: counted against it.
    OverQuota,
    /// Every peer together held the total (or the door had closed): nobody's fault alone.
    Full,
}

/// One protocol's queue and the places each peer holds.
#[derive(Debug)]
struct Door {
    id: u64,
    sender: mpsc::Sender<Inbound>,
    quota: Quota,
    held: HashMap<PeerId, Held>,
    total: usize,
    /// Numbers the peers' stays (see [`Held`]).
    stays: u64,
    /// Written to a stream refused at this door, so that the opener can tell "no room" from
    /// a broken peer.
    refusal: Arc<[u8]>,
}

/// The places one peer holds at a door, during one stay: from its first place until it holds
/// none, or until its last connection closes.
#[derive(Debug, Clone, Copy)]
struct Held {
    count: usize,
    stay: u64,
}

impl Held {
    fn new(stay: u64) -> Self {
        Self { count: 1, stay }
    }
}

impl Door {
    /// Gives back one place of `peer`'s stay `stay`; nothing when that stay is over.
    fn release(&mut self, peer: &PeerId, stay: u64) {
        let Some(held) = self.held.get_mut(peer).filter(|held| held.stay == stay) else {
            return;
        };
        held.count = held.count.saturating_sub(1);
        if held.count == 0 {
            self.held.remove(peer);
        }
        self.total = self.total.saturating_sub(1);
    }

    /// Ends `peer`'s stay: every place it holds is free again.
    fn forget(&mut self, peer: &PeerId) {
        if let Some(held) = self.held.remove(peer) {
            self.total = self.total.saturating_sub(held.count);
        }
    }
}

/// Refusals being written at once, by all doors together; past it a refused stream is only
/// reset.
const MAX_REFUSAL_WRITERS: usize = 256;
/// How long writing a refusal may take.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Every open door, shared by the behaviour, its handlers and the slots.
#[derive(Debug, Clone, Default)]
pub(crate) struct Doors {
    doors: Arc<Mutex<HashMap<StreamProtocol, Door>>>,
    writers: Arc<AtomicUsize>,
    opened: Arc<AtomicU64>,
}

impl Doors {
    fn lock(&self) -> MutexGuard<'_, HashMap<StreamProtocol, Door>> {
        // A panic elsewhere while holding the lock leaves counters that are still consistent.
        self.doors.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens a door for `protocol`, which writes `refusal` to the streams it turns away; fails
    /// when one is open already.
    pub(crate) fn open(
        &self,
        protocol: StreamProtocol,
        quota: Quota,
        refusal: Vec<u8>,
    ) -> Option<Incoming> {
        let mut doors = self.lock();
        // Dropped after the lock: a closed door's queued streams give their slots back, which
        // takes the lock.
        let closed: Vec<Door> = doors
            .extract_if(|_, door| door.sender.is_closed())
            .map(|(_, door)| door)
            .collect();
        let incoming = (!doors.contains_key(&protocol)).then(|| {
            let (sender, receiver) = mpsc::channel(quota.total.max(1));
            let door = Door {
                id: self.opened.fetch_add(1, Ordering::Relaxed),
                sender,
                quota,
                held: HashMap::new(),
                total: 0,
                stays: 0,
                refusal: refusal.into(),
            };
            doors.insert(protocol, door);
            Incoming { receiver }
        });
        drop(doors);
        drop(closed);
        incoming
    }

    /// Gives back every place `peer` holds, at every door: it has no connection left.
    fn forget(&self, peer: &PeerId) {
        for door in self.lock().values_mut() {
            door.forget(peer);
        }
    }

    /// The protocols whose door is open.
    fn protocols(&self) -> Vec<StreamProtocol> {
        self.lock()
            .iter()
            .filter(|(_, door)| !door.sender.is_closed())
            .map(|(protocol, _)| protocol.clone())
            .collect()
    }

    /// Lets the stream in (its work called off by `closed`, its connection's), or turns it
    /// away and says why.
    fn admit(
        &self,
        peer: PeerId,
        protocol: StreamProtocol,
        stream: Stream,
        closed: &CancellationToken,
    ) -> Result<(), RefusalReason> {
        let mut doors = self.lock();
        let Some(door) = doors.get_mut(&protocol) else {
            return Err(RefusalReason::Full);
        };
        let held = door.held.get(&peer).map_or(0, |held| held.count);
        let reason = if held >= door.quota.per_peer {
            RefusalReason::OverQuota
        } else if door.total >= door.quota.total {
            RefusalReason::Full
        } else if let Ok(permit) = door.sender.try_reserve() {
            let stays = &mut door.stays;
            let held = door
                .held
                .entry(peer)
                .and_modify(|held| held.count += 1)
                .or_insert_with(|| {
                    *stays += 1;
                    Held::new(*stays - 1)
                });
            let stay = held.stay;
            door.total += 1;
            permit.send(Inbound {
                peer,
                stream,
                slot: Slot {
                    doors: self.clone(),
                    protocol,
                    door: door.id,
                    peer,
                    stay,
                    closed: closed.clone(),
                },
            });
            return Ok(());
        } else {
            RefusalReason::Full
        };
        let refusal = Arc::clone(&door.refusal);
        drop(doors);
        self.turn_away(stream, refusal);
        Err(reason)
    }

    /// Writes the door's refusal to the stream in the background, within a short time and
    /// with a bounded number at once; past that bound the stream is only reset.
    fn turn_away(&self, mut stream: Stream, refusal: Arc<[u8]>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.writers.fetch_add(1, Ordering::AcqRel) >= MAX_REFUSAL_WRITERS {
            self.writers.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        let writers = Arc::clone(&self.writers);
        runtime.spawn(async move {
            let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, async {
                stream.write_all(&refusal).await?;
                stream.close().await
            })
            .await;
            writers.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

/// The behaviour that opens the doors on every connection.
#[derive(Debug, Default)]
pub(crate) struct Behaviour {
    doors: Doors,
    refused: VecDeque<Refused>,
}

/// Refusals waiting to be reported; beyond this many the oldest are forgotten (they only count
/// strikes, and a peer flooding that fast has earned plenty already).
const MAX_PENDING_REFUSALS: usize = 1024;

impl Behaviour {
    /// The doors, for opening new ones.
    pub(crate) fn doors(&self) -> Doors {
        self.doors.clone()
    }

    fn handler(&self, peer: PeerId) -> Handler {
        Handler {
            remote: peer,
            doors: self.doors.clone(),
            refused: VecDeque::new(),
            closed: CancellationToken::new(),
        }
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = Handler;
    type ToSwarm = Refused;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer))
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer))
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        if let FromSwarm::ConnectionClosed(closed) = event
            && closed.remaining_established == 0
        {
            self.doors.forget(&closed.peer_id);
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        if self.refused.len() >= MAX_PENDING_REFUSALS {
            self.refused.pop_front();
        }
        self.refused.push_back(event);
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        match self.refused.pop_front() {
            Some(refused) => Poll::Ready(ToSwarm::GenerateEvent(refused)),
            None => Poll::Pending,
        }
    }
}

/// One connection's door keeper.
#[derive(Debug)]
pub(crate) struct Handler {
    remote: PeerId,
    doors: Doors,
    refused: VecDeque<Refused>,
    /// Handed to the connection's slots; cancelled when the handler goes with its connection.
    closed: CancellationToken,
}

impl Drop for Handler {
    fn drop(&mut self) {
        self.closed.cancel();
    }
}

impl ConnectionHandler for Handler {
    type FromBehaviour = Infallible;
    type ToBehaviour = Refused;
    type InboundProtocol = Upgrade;
    type OutboundProtocol = DeniedUpgrade;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = ();

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol> {
        SubstreamProtocol::new(
            Upgrade {
                protocols: self.doors.protocols(),
            },
            (),
        )
    }

    fn poll(
        &mut self,
        _: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, (), Self::ToBehaviour>> {
        match self.refused.pop_front() {
            Some(refused) => Poll::Ready(ConnectionHandlerEvent::NotifyBehaviour(refused)),
            None => Poll::Pending,
        }
    }

    fn on_behaviour_event(&mut self, event: Self::FromBehaviour) {
        match event {}
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<Self::InboundProtocol, Self::OutboundProtocol>,
    ) {
        if let ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound {
            protocol: (stream, protocol),
            ..
        }) = event
            && let Err(reason) =
                self.doors
                    .admit(self.remote, protocol.clone(), stream, &self.closed)
        {
            tracing::debug!(peer = %self.remote, %protocol, ?reason, "inbound stream refused");
            if reason == RefusalReason::OverQuota && self.refused.len() < MAX_PENDING_REFUSALS {
                self.refused.push_back(Refused {
                    peer: self.remote,
                    protocol,
                });
            }
        }
    }
}

/// Negotiates any protocol with an open door and hands the stream over as it is.
#[derive(Debug)]
pub(crate) struct Upgrade {
    protocols: Vec<StreamProtocol>,
}

impl UpgradeInfo for Upgrade {
    type Info = StreamProtocol;
    type InfoIter = std::vec::IntoIter<StreamProtocol>;

    fn protocol_info(&self) -> Self::InfoIter {
        self.protocols.clone().into_iter()
    }
}

impl InboundUpgrade<Stream> for Upgrade {
    type Output = (Stream, StreamProtocol);
    type Error = Infallible;
    type Future = Ready<Result<Self::Output, Self::Error>>;

    fn upgrade_inbound(self, stream: Stream, protocol: Self::Info) -> Self::Future {
        ready(Ok((stream, protocol)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROTOCOL: StreamProtocol = StreamProtocol::new("/test/1");

    #[test]
    fn a_peer_that_left_holds_no_places() {
        let quota = Quota {
            per_peer: 2,
            total: 2,
        };
        let mut door = Door {
            id: 0,
            sender: mpsc::channel(1).0,
            quota,
            held: HashMap::new(),
            total: 0,
            refusal: Arc::from(Vec::new()),
            stays: 0,
        };
        let (gone, back) = (PeerId::random(), PeerId::random());
        door.held.insert(gone, Held { count: 2, stay: 0 });
        door.total = 2;
        door.stays = 1;
        door.forget(&gone);
        assert_eq!(door.total, 0, "its places are free at once");
        // Back within the same stay number space: a new stay, and the old slots' late
        // releases do not touch it.
        door.held.insert(gone, Held::new(1));
        door.held.insert(back, Held::new(2));
        door.total = 2;
        door.release(&gone, 0);
        door.release(&gone, 0);
        assert_eq!(door.total, 2);
        assert_eq!(door.held.get(&gone).map(|h| h.count), Some(1));
        door.release(&gone, 1);
        assert_eq!(door.total, 1);
        assert!(!door.held.contains_key(&gone));
    }

    #[test]
    fn a_door_opens_once_per_protocol() {
        let doors = Doors::default();
        let quota = Quota {
            per_peer: 1,
            total: 1,
        };
        let first = doors.open(PROTOCOL, quota, vec![]);
        assert!(first.is_some());
        assert!(doors.open(PROTOCOL, quota, vec![]).is_none());
        assert_eq!(doors.protocols(), vec![PROTOCOL]);
        drop(first);
        assert!(doors.protocols().is_empty(), "a dropped door closes");
        assert!(doors.open(PROTOCOL, quota, vec![]).is_some());
    }
}
