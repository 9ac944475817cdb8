//! A real provider (real model, real swarm on loopback) under a stream flood from one peer: the
//! peer gets its quota of generate streams and an `Overloaded` refusal past it, another gateway
//! is served all along, and a peer that keeps pushing past its quota is disconnected and
//! refused until its ban is over.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::{Duration, Instant};

use libp2p::PeerId;
use proofmesh_shared::net::{Client, STRIKES_TO_BAN};
use proofmesh_shared::protocol::{
    GENERATE_PROTOCOL, GENERATE_STREAMS_PER_GATEWAY, GENERATE_STREAMS_TOTAL, GenerateFrame,
    GenerateRequest, MAX_STREAM_FRAME, ModelDigest, REQUEST_READ_TIMEOUT, RemoteErrorKind,
    write_frame,
};

fn request(digest: ModelDigest) -> GenerateRequest {
    support::greedy_request(digest, 8)
}

async fn frame(stream: &mut libp2p::Stream) -> GenerateFrame {
    support::next_frame(stream, MAX_STREAM_FRAME, 30).await
}

/// Runs one request to its signed end and returns how long it took.
async fn served(client: &Client, peer: PeerId, digest: ModelDigest) -> Duration {
    let started = Instant::now();
    let mut s = support::open(client, peer, GENERATE_PROTOCOL).await;
    write_frame(&mut s, &request(digest)).await.unwrap();
    loop {
        match frame(&mut s).await {
            GenerateFrame::Accepted { .. } | GenerateFrame::Token { .. } => {}
            GenerateFrame::Done { commitment, .. } => {
                assert_eq!(commitment.verify().unwrap(), peer);
                return started.elapsed();
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_peer_is_refused_then_banned_while_others_are_served() {
    let mut engine = support::small_engine().await;
    engine.referee_slots = 0;
    let (started, _stop) = support::provider(engine, 60).await;
    let (peer, digest) = (started.peer_id, started.model.digest);
    let honest = support::client(started.listen_addrs.clone());
    let flooder = support::client(started.listen_addrs.clone());
    let before = served(&honest, peer, digest).await;

    // The flooder takes its whole quota with streams that say nothing (each holds its place
    // for the provider's 10 s request read timeout)...
    let mut held = Vec::new();
    for _ in 0..GENERATE_STREAMS_PER_GATEWAY {
        held.push(support::open(&flooder, peer, GENERATE_PROTOCOL).await);
    }
    // ...and one more is turned away at once, in the protocol's own words.
    let mut over = support::open(&flooder, peer, GENERATE_PROTOCOL).await;
    match frame(&mut over).await {
        GenerateFrame::Error { kind, .. } => assert_eq!(kind, RemoteErrorKind::Overloaded),
        other => panic!("expected an overloaded refusal, got {other:?}"),
    }
    // Another gateway is served meanwhile.
    let during = served(&honest, peer, digest).await;

    // A peer that keeps pushing past its quota is banned: its connection closes and it cannot
    // open anything more.
    let flood_started = Instant::now();
    let refused = 1 + flood_until_banned(&flooder, peer).await;
    let flood_took = flood_started.elapsed();
    drop(held);
    let refusing_since = Instant::now();
    while refusing_since.elapsed() < Duration::from_secs(3) {
        let again = tokio::time::timeout(
            Duration::from_secs(5),
            flooder
                .stream_control()
                .open_stream(peer, GENERATE_PROTOCOL),
        )
        .await;
        assert!(!matches!(again, Ok(Ok(_))), "a banned peer opened a stream");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = served(&honest, peer, digest).await;
    println!(
        "honest request: {before:?} before the flood, {during:?} during it, {after:?} after the ban; \
         banned after {refused} refused streams in {flood_took:?}"
    );
    // The stream that earns the last strike may die with the connection before it opens.
    let strikes = STRIKES_TO_BAN as usize;
    assert!(
        (strikes - 1..=2 * strikes).contains(&refused),
        "banned after {refused} refusals, expected about {strikes}"
    );
}

/// Pushes streams from `flooder` until the provider bans it; how many it opened before.
async fn flood_until_banned(flooder: &Client, peer: PeerId) -> usize {
    let mut refused = 0;
    loop {
        let opened = tokio::time::timeout(
            Duration::from_secs(5),
            flooder
                .stream_control()
                .open_stream(peer, GENERATE_PROTOCOL),
        )
        .await;
        match opened {
            Ok(Ok(_)) => refused += 1,
            Ok(Err(_)) | Err(_) => return refused,
        }
        assert!(
            refused <= 4 * STRIKES_TO_BAN as usize,
            "still not banned after {refused} refused streams"
        );
    }
}

/// Sybils: identity after identity takes its whole quota with silent streams, then floods
/// until it is banned. Together they held every place the provider has. Their connections are
/// closed by the ban, but the streams on them take a while to notice (up to the request read
/// timeout); the places must come back with the connections, or the banned crowd keeps the
/// door shut on everyone for that long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn banned_identities_give_their_places_back_at_once() {
    let mut engine = support::small_engine().await;
    engine.referee_slots = 0;
    let (started, _stop) = support::provider(engine, 60).await;
    let (peer, digest) = (started.peer_id, started.model.digest);
    let honest = support::client(started.listen_addrs.clone());
    served(&honest, peer, digest).await;

    let sybils: Vec<Client> = (0..GENERATE_STREAMS_TOTAL / GENERATE_STREAMS_PER_GATEWAY)
        .map(|_| support::client(started.listen_addrs.clone()))
        .collect();
    let filling = Instant::now();
    let mut held = Vec::new();
    for sybil in &sybils {
        for _ in 0..GENERATE_STREAMS_PER_GATEWAY {
            held.push(support::open(sybil, peer, GENERATE_PROTOCOL).await);
        }
    }
    // Every place is taken: the honest gateway is turned away, as nobody's fault.
    let mut turned_away = support::open(&honest, peer, GENERATE_PROTOCOL).await;
    match frame(&mut turned_away).await {
        GenerateFrame::Error { kind, .. } => assert_eq!(kind, RemoteErrorKind::Overloaded),
        other => panic!("expected an overloaded refusal, got {other:?}"),
    }
    for sybil in &sybils {
        flood_until_banned(sybil, peer).await;
    }
    let banned_after = filling.elapsed();
    // The sybils still hold their ends of the silent streams; only the provider's bans closed
    // the connections. The honest gateway is served now, not after the read timeout.
    let mut asked = support::open(&honest, peer, GENERATE_PROTOCOL).await;
    write_frame(&mut asked, &request(digest)).await.unwrap();
    let first = frame(&mut asked).await;
    let asked_after = filling.elapsed();
    assert!(
        matches!(first, GenerateFrame::Accepted { .. }),
        "the honest gateway was refused {asked_after:?} after the sybils began \
         (bans done at {banned_after:?}): {first:?}"
    );
    // Only a run that gets here within the read timeout tells anything (later, the silent
    // streams would have timed out anyway): say which this was.
    let telling = if asked_after < REQUEST_READ_TIMEOUT {
        "within"
    } else {
        "NOT within (this run could not tell)"
    };
    println!(
        "sybils banned {banned_after:?} after they filled the door; honest request accepted at \
         {asked_after:?}, {telling} the read timeout of {REQUEST_READ_TIMEOUT:?}"
    );
    drop(held);
}

/// A gateway that hangs up while its requests wait in the engine's queue gets its places at the
/// door back at once, not when the engine reaches them: otherwise an honest gateway whose
/// clients gave up would be refused (and struck) for streams it no longer holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_abandoned_in_the_queue_free_their_places_at_once() {
    let mut engine = support::small_engine().await;
    engine.referee_slots = 0;
    let (started, _stop) = support::provider(engine, 60).await;
    let (peer, digest) = (started.peer_id, started.model.digest);
    let busy = support::client(started.listen_addrs.clone());
    let gateway = support::client(started.listen_addrs.clone());

    // One long answer holds the engine's only sequence...
    let mut long = request(digest);
    long.messages[0].content = "Write a long story about a dragon who learns to fly.".into();
    long.max_tokens = 200;
    let mut running = support::open(&busy, peer, GENERATE_PROTOCOL).await;
    write_frame(&mut running, &long).await.unwrap();
    assert!(matches!(
        frame(&mut running).await,
        GenerateFrame::Accepted { .. }
    ));
    assert!(matches!(
        frame(&mut running).await,
        GenerateFrame::Token { .. }
    ));
    let tokens_at = tokio::spawn(async move {
        let mut at = Vec::new();
        loop {
            match frame(&mut running).await {
                GenerateFrame::Token { .. } => at.push(Instant::now()),
                GenerateFrame::Done { .. } => return at,
                other => panic!("unexpected {other:?}"),
            }
        }
    });
    // ...while the gateway fills its quota with requests that wait behind it, then hangs up.
    let mut queued = Vec::new();
    for _ in 0..GENERATE_STREAMS_PER_GATEWAY {
        let mut s = support::open(&gateway, peer, GENERATE_PROTOCOL).await;
        write_frame(&mut s, &request(digest)).await.unwrap();
        assert!(matches!(
            frame(&mut s).await,
            GenerateFrame::Accepted { .. }
        ));
        queued.push(s);
    }
    drop(queued);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The gateway has its places back while the long answer is still running.
    let mut again = support::open(&gateway, peer, GENERATE_PROTOCOL).await;
    write_frame(&mut again, &request(digest)).await.unwrap();
    let answer = frame(&mut again).await;
    let checked_at = Instant::now();
    let tokens_at = tokens_at.await.unwrap();
    assert!(
        tokens_at.last().is_some_and(|t| *t > checked_at),
        "the long answer ended before the check ({} tokens); the test proves nothing",
        tokens_at.len()
    );
    assert!(
        matches!(answer, GenerateFrame::Accepted { .. }),
        "the abandoned requests still held the gateway's places: {answer:?}"
    );
}

/// A provider that serves only named gateways refuses the others' requests in the protocol's
/// own words and serves the named one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_serves_only_the_gateways_it_names() {
    let mut engine = support::small_engine().await;
    engine.referee_slots = 0;
    let named = libp2p::identity::Keypair::generate_secp256k1();
    let mut config = support::config(engine, 60, vec![]);
    config.serve_gateways = vec![named.public().to_peer_id()];
    let (started, _stop) = support::start(config).await;
    let (peer, digest) = (started.peer_id, started.model.digest);

    let stranger = support::client(started.listen_addrs.clone());
    let mut s = support::open(&stranger, peer, GENERATE_PROTOCOL).await;
    // The refusal comes before the provider reads anything: the write may find the stream shut.
    let _ = write_frame(&mut s, &request(digest)).await;
    match frame(&mut s).await {
        GenerateFrame::Error { kind, .. } => assert_eq!(kind, RemoteErrorKind::NotServed),
        other => panic!("a gateway not named was served: {other:?}"),
    }
    let gateway = support::client_with(named, started.listen_addrs.clone());
    served(&gateway, peer, digest).await;
}
