//! Real swarms on loopback: QUIC transport, capability discovery, and Kademlia provider records
//! leading a gateway to a provider it was never told about.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use futures::AsyncReadExt;
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use proofmesh_shared::net::mesh_key::PreSharedKey;
use proofmesh_shared::net::{
    self, Client, Event, Inbound, NetConfig, NetError, Offence, Quota, Role,
};
use proofmesh_shared::protocol::Capabilities;
use support::caps;
use tokio::sync::mpsc;

async fn node(
    role: Role,
    listen: &str,
    bootstrap: Vec<Multiaddr>,
) -> (Client, mpsc::Receiver<Event>, Vec<Multiaddr>) {
    private_node(role, listen, bootstrap, None).await
}

async fn private_node(
    role: Role,
    listen: &str,
    bootstrap: Vec<Multiaddr>,
    psk: Option<PreSharedKey>,
) -> (Client, mpsc::Receiver<Event>, Vec<Multiaddr>) {
    let (client, events, event_loop) = net::new(NetConfig {
        keypair: libp2p::identity::Keypair::generate_secp256k1(),
        listen: vec![listen.parse().unwrap()],
        bootstrap,
        mdns: false,
        role,
        psk,
        traversal: Default::default(),
    })
    .unwrap();
    tokio::spawn(event_loop.run());
    let addrs = client.wait_listen_addrs().await.unwrap();
    assert!(!addrs.is_empty());
    (client, events, addrs)
}

/// Waits for `ProviderUp` from `peer`, at most `secs` seconds.
async fn provider_up(events: &mut mpsc::Receiver<Event>, peer: PeerId, secs: u64) -> Capabilities {
    tokio::time::timeout(Duration::from_secs(secs), async {
        loop {
            match events.recv().await {
                Some(Event::ProviderUp {
                    peer: p,
                    capabilities,
                }) if p == peer => return capabilities,
                Some(_) => {}
                None => panic!("event loop stopped"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no ProviderUp from {peer} within {secs} s"))
}

#[tokio::test]
async fn gateway_finds_provider_over_quic() {
    let (provider, _pe, provider_addrs) = node(
        Role::Provider(caps()),
        "/ip4/127.0.0.1/udp/0/quic-v1",
        vec![],
    )
    .await;
    assert!(provider_addrs[0].to_string().contains("quic-v1"));
    let (_gateway, mut events, _) = node(
        Role::Gateway,
        "/ip4/127.0.0.1/udp/0/quic-v1",
        provider_addrs,
    )
    .await;
    let found = provider_up(&mut events, provider.local_peer_id(), 20).await;
    assert_eq!(found, caps());
}

#[tokio::test]
async fn gateway_discovers_a_provider_through_kademlia_records() {
    let (gateway, mut events, gateway_addrs) =
        node(Role::Gateway, "/ip4/127.0.0.1/tcp/0", vec![]).await;
    let (first, _e1, first_addrs) = node(
        Role::Provider(caps()),
        "/ip4/127.0.0.1/tcp/0",
        gateway_addrs,
    )
    .await;
    provider_up(&mut events, first.local_peer_id(), 20).await;
    // The second provider only knows the first one; the gateway learns of it from the DHT.
    let (second, _e2, _) = node(Role::Provider(caps()), "/ip4/127.0.0.1/tcp/0", first_addrs).await;
    provider_up(&mut events, second.local_peer_id(), 40).await;
    assert!(
        gateway
            .connected_peers()
            .await
            .unwrap()
            .contains(&second.local_peer_id())
    );
}

/// A private mesh: a gateway with the provider's pre-shared key finds it; one with another key,
/// and one with none, never get a connection; a QUIC address is refused with the reason.
#[tokio::test]
async fn a_private_mesh_admits_only_nodes_with_its_key() {
    const TCP: &str = "/ip4/127.0.0.1/tcp/0";
    let key = PreSharedKey::new(rand::random());
    let (provider, _pe, provider_addrs) =
        private_node(Role::Provider(caps()), TCP, vec![], Some(key)).await;
    let (member, mut events, _) =
        private_node(Role::Gateway, TCP, provider_addrs.clone(), Some(key)).await;
    provider_up(&mut events, provider.local_peer_id(), 20).await;
    assert!(
        member
            .connected_peers()
            .await
            .unwrap()
            .contains(&provider.local_peer_id())
    );

    let other_key = PreSharedKey::new(rand::random());
    let (stranger, mut stranger_events, _) =
        private_node(Role::Gateway, TCP, provider_addrs.clone(), Some(other_key)).await;
    let (public, mut public_events, _) = node(Role::Gateway, TCP, provider_addrs.clone()).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (who, client, events) in [
        ("another key", &stranger, &mut stranger_events),
        ("no key", &public, &mut public_events),
    ] {
        assert!(
            client.connected_peers().await.unwrap().is_empty(),
            "a node with {who} got a connection"
        );
        while let Ok(event) = events.try_recv() {
            assert!(
                !matches!(event, Event::ProviderUp { .. }),
                "a node with {who} found the provider"
            );
        }
    }

    let quic = net::new(NetConfig {
        keypair: libp2p::identity::Keypair::generate_secp256k1(),
        listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()],
        bootstrap: vec![],
        mdns: false,
        role: Role::Gateway,
        psk: Some(key),
        traversal: Default::default(),
    });
    match quic {
        Err(NetError::Listen { message, .. }) => {
            assert!(message.contains("TCP only"), "{message}");
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a private mesh node listened on QUIC"),
    }
}

/// A node that bans a peer calls off the work on that peer's streams at once. A stream on a
/// connection this node closed itself is not woken by the close: a task reading it would sit
/// there until its own timeout (the provider's is 10 s), so a crowd of banned identities could
/// keep hundreds of tasks alive past the places they were given back.
#[tokio::test]
async fn banning_a_peer_calls_off_the_work_on_its_streams() {
    const PROTOCOL: StreamProtocol = StreamProtocol::new("/proofmesh/test-door/1");
    let (server, _events, addrs) =
        node(Role::Provider(caps()), "/ip4/127.0.0.1/tcp/0", vec![]).await;
    let quota = Quota {
        per_peer: 4,
        total: 4,
    };
    let mut incoming = server.accept(PROTOCOL, quota, vec![]).unwrap();
    let (opener, _oe, _) = node(Role::Gateway, "/ip4/127.0.0.1/tcp/0", addrs).await;
    let server_id = server.local_peer_id();

    // The opener's stream says nothing; the server's task waits on it.
    let silent = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match opener
                .stream_control()
                .open_stream(server_id, PROTOCOL)
                .await
            {
                Ok(stream) => return stream,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await
    .expect("no stream to the server within 20 s");
    let Inbound {
        peer,
        mut stream,
        slot,
    } = incoming.next().await.unwrap();
    assert_eq!(peer, opener.local_peer_id());
    let reading = tokio::spawn(async move {
        let mut byte = [0u8; 1];
        slot.serve(stream.read(&mut byte))
            .await
            .map(|read| read.ok())
    });

    // Enough violations and the server bans the opener, closing its connection.
    let mut reports = 0;
    while server.connected_peers().await.unwrap().contains(&peer) {
        assert!(reports < 64, "still connected after {reports} violations");
        server.report(peer, Offence::Violation).await.unwrap();
        reports += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ended = tokio::time::timeout(Duration::from_secs(5), reading).await;
    // Woken by the cancel, the read may also find its stream dead by now: either way, it ended.
    assert!(
        matches!(ended, Ok(Ok(None | Some(None)))),
        "the banned peer's stream still held its task 5 s after the ban: {ended:?}"
    );
    drop(silent);
}
