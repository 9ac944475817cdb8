//! The cloneable handle everyone but the event loop uses.

use libp2p::request_response::ResponseChannel;
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use tokio::sync::{mpsc, oneshot};

use super::NetError;
use super::conduct::Offence;
use super::inbound::{Doors, Incoming, Quota};
use crate::protocol::{OpenLeavesRequest, SignedOpening};

/// A request to the event loop; each carries its own reply channel.
#[derive(Debug)]
pub(crate) enum Command {
    ListenAddrs {
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    Dial {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    OpenLeaves {
        peer: PeerId,
        request: OpenLeavesRequest,
        reply: oneshot::Sender<Result<SignedOpening, NetError>>,
    },
    RespondOpenLeaves {
        channel: ResponseChannel<SignedOpening>,
        response: SignedOpening,
    },
    ConnectedPeers {
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    Reachability {
        reply: oneshot::Sender<super::Reachability>,
    },
    Leave {
        reply: oneshot::Sender<usize>,
    },
    Report {
        peer: PeerId,
        offence: Offence,
    },
    PublishProof {
        proof: Vec<u8>,
    },
    JudgeProof {
        id: libp2p::gossipsub::MessageId,
        source: PeerId,
        verdict: super::gossip::ProofVerdict,
    },
}

/// Talks to the event loop. Cheap to clone; the loop stops when every clone is dropped.
#[derive(Clone)]
pub struct Client {
    pub(crate) sender: mpsc::Sender<Command>,
    pub(crate) control: libp2p_stream::Control,
    pub(crate) doors: Doors,
    pub(crate) local_peer_id: PeerId,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("local_peer_id", &self.local_peer_id)
            .finish()
    }
}

impl Client {
    /// Publishes a fraud proof (canonical CBOR) to the other gateways. Nothing happens on a
    /// node that is not a gateway, or with no other gateway connected.
    pub async fn publish_proof(&self, proof: Vec<u8>) -> Result<(), NetError> {
        self.sender
            .send(Command::PublishProof { proof })
            .await
            .map_err(|_| NetError::Stopped)
    }

    /// Says what became of a proof heard as [`Event::FraudProof`](super::Event::FraudProof):
    /// passed on, dropped, or dropped with its sender struck.
    pub async fn judge_proof(
        &self,
        id: libp2p::gossipsub::MessageId,
        source: PeerId,
        verdict: super::gossip::ProofVerdict,
    ) -> Result<(), NetError> {
        self.sender
            .send(Command::JudgeProof {
                id,
                source,
                verdict,
            })
            .await
            .map_err(|_| NetError::Stopped)
    }

    /// This node's peer id.
    pub fn local_peer_id(&self) -> PeerId {
        self.local_peer_id
    }

    /// The `libp2p-stream` control for opening raw streams to peers.
    pub fn stream_control(&self) -> libp2p_stream::Control {
        self.control.clone()
    }

    /// Starts taking inbound `protocol` streams, concurrently, under `quota`: streams past it
    /// get `refusal` (an encoded frame of the protocol's own "overloaded" answer) and are
    /// closed, and those past their own peer's quota count against that peer. Fails when this
    /// protocol is taken already (its [`Incoming`] still alive).
    pub fn accept(
        &self,
        protocol: StreamProtocol,
        quota: Quota,
        refusal: Vec<u8>,
    ) -> Result<Incoming, NetError> {
        self.doors
            .open(protocol.clone(), quota, refusal)
            .ok_or_else(|| NetError::Setup {
                message: format!("{protocol} streams are accepted already"),
            })
    }

    /// Counts what `peer` did wrong against it; enough in a short time and it is
    /// disconnected and refused for a while.
    pub async fn report(&self, peer: PeerId, offence: Offence) -> Result<(), NetError> {
        self.sender
            .send(Command::Report { peer, offence })
            .await
            .map_err(|_| NetError::Stopped)
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, NetError> {
        let (reply, answer) = oneshot::channel();
        self.sender
            .send(make(reply))
            .await
            .map_err(|_| NetError::Stopped)?;
        answer.await.map_err(|_| NetError::Stopped)
    }

    /// The addresses the node listens on right now (empty until the transports report them).
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, NetError> {
        self.ask(|reply| Command::ListenAddrs { reply }).await
    }

    /// Waits (at most 10 s) until the transports report listen addresses and returns them with
    /// `/p2p/<peer id>` appended, ready to hand to other nodes as bootstrap addresses.
    pub async fn wait_listen_addrs(&self) -> Result<Vec<Multiaddr>, NetError> {
        for _ in 0..200 {
            let addrs = self.listen_addrs().await?;
            if !addrs.is_empty() {
                let p2p = libp2p::multiaddr::Protocol::P2p(self.local_peer_id);
                return Ok(addrs.into_iter().map(|a| a.with(p2p.clone())).collect());
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        Ok(Vec::new())
    }

    /// Dials an address (with or without a `/p2p/` suffix); returns once the dial has started.
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), NetError> {
        self.ask(|reply| Command::Dial { addr, reply }).await?
    }

    /// Asks `peer` to open the leaves of a past request.
    pub async fn open_leaves(
        &self,
        peer: PeerId,
        request: OpenLeavesRequest,
    ) -> Result<SignedOpening, NetError> {
        self.ask(|reply| Command::OpenLeaves {
            peer,
            request,
            reply,
        })
        .await?
    }

    /// Answers a challenge received as [`super::Event::OpenLeaves`].
    pub async fn respond_open_leaves(
        &self,
        channel: ResponseChannel<SignedOpening>,
        response: SignedOpening,
    ) -> Result<(), NetError> {
        self.sender
            .send(Command::RespondOpenLeaves { channel, response })
            .await
            .map_err(|_| NetError::Stopped)
    }

    /// Announces to every connected peer that this provider is leaving, and from now on answers
    /// capability queries with no models. Returns once every peer acknowledged or timed out
    /// (3 s), with the number of peers that acknowledged.
    pub async fn announce_leaving(&self) -> Result<usize, NetError> {
        self.ask(|reply| Command::Leave { reply }).await
    }

    /// Peers with at least one open connection.
    pub async fn connected_peers(&self) -> Result<Vec<PeerId>, NetError> {
        self.ask(|reply| Command::ConnectedPeers { reply }).await
    }

    /// What this node knows of its own reachability: observed and confirmed addresses, relay
    /// reservations, direct and relayed peers, hole punches.
    pub async fn reachability(&self) -> Result<super::Reachability, NetError> {
        self.ask(|reply| Command::Reachability { reply }).await
    }
}
