//! A hostile mesh peer for the soak (`bench/soak.py`): floods one node with generate streams
//! that never send a request, as fast as it can, from identity after identity (a sybil: each
//! new key is free). Every stream past the node's quota is refused; an identity that keeps
//! going is banned, and the flooder makes a new one. Bounded by `--seconds`; prints what it
//! achieved. Talks only to the address it is given.
//!
//!     cargo run --release -p proofmesh-shared --example flood -- ADDR/p2p/PEER [--seconds 600]
//!         [--identities N] [--held N]
//!
//! `--held 1000` lets each identity hold up to 1,000 of the streams it opens (a provider admits
//! 32 and refuses the rest); `--identities N` stops after N identities. By default a new identity
//! follows each banned one until time is up, each holding at most 64.

use std::time::{Duration, Instant};

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use proofmesh_shared::net::{self, NetConfig, Role};
use proofmesh_shared::protocol::GENERATE_PROTOCOL;

/// Streams one identity holds open at most by default (the rest are opened and dropped).
const HELD_PER_IDENTITY: usize = 64;
/// The most streams `--held` may ask one identity to hold.
const MAX_HELD: usize = 100_000;
/// How long one stream open may take before the identity is given up.
const OPEN_TIMEOUT: Duration = Duration::from_secs(3);

const USAGE: &str = "usage: flood ADDR/p2p/PEER [--seconds N] [--identities N] [--held N]";

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let target: Multiaddr = args.next().ok_or(USAGE)?.parse()?;
    let (mut seconds, mut identities_max, mut held_max) = (600u64, u64::MAX, HELD_PER_IDENTITY);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(USAGE)?;
        match flag.as_str() {
            "--seconds" => seconds = value.parse()?,
            "--identities" => identities_max = value.parse()?,
            "--held" => held_max = value.parse::<usize>()?.min(MAX_HELD),
            _ => return Err(USAGE.into()),
        }
    }
    let Some(Protocol::P2p(peer)) = target.iter().last() else {
        return Err("the address must end in /p2p/<peer id>".into());
    };
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let (mut identities, mut opened, mut refused_or_failed) = (0u64, 0u64, 0u64);
    while Instant::now() < deadline && identities < identities_max {
        identities += 1;
        let (o, f) = one_identity(&target, peer, deadline, held_max).await?;
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
    held_max: usize,
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
                if held.len() < held_max {
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
