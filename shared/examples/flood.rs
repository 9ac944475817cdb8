//! A hostile mesh peer for the soak (`bench/soak.py`): floods one node with generate streams
//! that never send a request, as fast as it can, from identity after identity (a sybil: each
//! new key is free). Every stream past the node's quota is refused; an identity that keeps
//! going is banned, and the flooder makes a new one. Bounded by `--seconds`; prints what it
//! achieved. Talks only to the address it is given.
//!
//!     cargo run --release -p proofmesh-shared --example flood -- ADDR/p2p/PEER [--seconds 600]

use std::time::{Duration, Instant};

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use proofmesh_shared::net::{self, NetConfig, Role};
use proofmesh_shared::protocol::GENERATE_PROTOCOL;

/// Streams one identity holds open at most (the rest are opened and dropped).
const HELD_PER_IDENTITY: usize = 64;
/// How long one stream open may take before the identity is given up.
const OPEN_TIMEOUT: Duration = Duration::from_secs(3);

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let target: Multiaddr = args
        .next()
        .ok_or("usage: flood ADDR/p2p/PEER [--seconds N]")?
        .parse()?;
    let seconds: u64 = match (args.next().as_deref(), args.next()) {
        (Some("--seconds"), Some(n)) => n.parse()?,
        _ => 600,
    };
    let Some(Protocol::P2p(peer)) = target.iter().last() else {
        return Err("the address must end in /p2p/<peer id>".into());
    };
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let (mut identities, mut opened, mut refused_or_failed) = (0u64, 0u64, 0u64);
    while Instant::now() < deadline {
        identities += 1;
        let (o, f) = one_identity(&target, peer, deadline).await?;
        opened += o;
        refused_or_failed += f;
    }
    println!(
        "flood: {identities} identities, {opened} streams opened, {refused_or_failed} opens failed \
         (banned or refused) in {seconds} s"
    );
    Ok(())
}

/// Floods from one fresh identity until it can open nothing more (banned) or time is up.
async fn one_identity(
    target: &Multiaddr,
    peer: PeerId,
    deadline: Instant,
) -> Result<(u64, u64), Box<dyn std::error::Error>> {
    let (client, _events, event_loop) = net::new(NetConfig {
        keypair: libp2p::identity::Keypair::generate_secp256k1(),
        listen: vec![],
        bootstrap: vec![target.clone()],
        mdns: false,
        role: Role::Gateway,
        psk: None,
        traversal: Default::default(),
    })?;
    let task = tokio::spawn(event_loop.run());
    let (mut opened, mut failed) = (0u64, 0u64);
    let mut held = Vec::new();
    let mut failures_in_row = 0;
    let mut control = client.stream_control();
    while Instant::now() < deadline && failures_in_row < 3 {
        let open = control.open_stream(peer, GENERATE_PROTOCOL);
        match tokio::time::timeout(OPEN_TIMEOUT, open).await {
            Ok(Ok(stream)) => {
                opened += 1;
                failures_in_row = 0;
                if held.len() < HELD_PER_IDENTITY {
                    held.push(stream);
                }
            }
            _ => {
                failed += 1;
                failures_in_row += 1;
            }
        }
    }
    drop(held);
    drop(client);
    task.abort();
    Ok((opened, failed))
}
