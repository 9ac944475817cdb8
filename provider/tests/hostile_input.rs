//! A real provider (real model, real swarm on loopback) fed malformed and hostile requests over
//! its generate stream: each gets a clear error frame, and the provider keeps serving.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use futures::AsyncWriteExt;
use libp2p::PeerId;
use proofmesh_shared::net::Client;
use proofmesh_shared::protocol::{
    GENERATE_PROTOCOL, GenerateFrame, GenerateRequest, MAX_STREAM_FRAME, ModelDigest,
    RemoteErrorKind, read_frame, write_frame,
};
use tokio::sync::oneshot;

async fn provider() -> (proofmesh_provider::Started, oneshot::Sender<()>) {
    let mut engine = support::small_engine().await;
    engine.referee_slots = 0;
    support::provider(engine, 60).await
}

async fn open(client: &Client, peer: PeerId) -> libp2p::Stream {
    support::open(client, peer, GENERATE_PROTOCOL).await
}

async fn answer(stream: &mut libp2p::Stream) -> GenerateFrame {
    support::next_frame(stream, MAX_STREAM_FRAME, 30).await
}

fn request(digest: ModelDigest, max_tokens: u32) -> GenerateRequest {
    support::greedy_request(digest, max_tokens)
}

fn refused(frame: &GenerateFrame) -> RemoteErrorKind {
    match frame {
        GenerateFrame::Error { kind, .. } => *kind,
        other => panic!("expected an error frame, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_error_frames_and_the_provider_keeps_serving() {
    let (started, _stop) = provider().await;
    let peer = started.peer_id;
    let digest = started.model.digest;
    let client = support::client(started.listen_addrs.clone());

    // Garbage after a valid length prefix.
    let mut s = open(&client, peer).await;
    s.write_all(&5u32.to_be_bytes()).await.unwrap();
    s.write_all(&[0xff, 0x13, 0x37, 0x00, 0x01]).await.unwrap();
    s.flush().await.unwrap();
    assert_eq!(
        refused(&answer(&mut s).await),
        RemoteErrorKind::InvalidRequest
    );

    // A length prefix far over the limit: refused before anything is allocated.
    let mut s = open(&client, peer).await;
    s.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    s.flush().await.unwrap();
    assert_eq!(
        refused(&answer(&mut s).await),
        RemoteErrorKind::InvalidRequest
    );

    // Another model's digest.
    let mut s = open(&client, peer).await;
    write_frame(&mut s, &request(ModelDigest([9; 32]), 8))
        .await
        .unwrap();
    assert_eq!(
        refused(&answer(&mut s).await),
        RemoteErrorKind::UnknownModel
    );

    // More tokens than the context window holds.
    let mut s = open(&client, peer).await;
    write_frame(&mut s, &request(digest, 10_000)).await.unwrap();
    assert_eq!(
        refused(&answer(&mut s).await),
        RemoteErrorKind::ContextLength
    );

    // A prompt of most of a megabyte is refused by its size alone, before any tokenizing: the
    // refusal gives the fewest tokens it can be.
    let mut huge = request(digest, 8);
    huge.messages[0].content = "lorem ipsum dolor sit amet ".repeat(36_000);
    let mut s = open(&client, peer).await;
    write_frame(&mut s, &huge).await.unwrap();
    match answer(&mut s).await {
        GenerateFrame::Error { kind, message } => {
            assert_eq!(kind, RemoteErrorKind::ContextLength);
            assert!(message.contains("at least"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    // Out-of-range sampler settings and an empty conversation.
    let mut bad = request(digest, 8);
    bad.sampler.temperature = f32::NAN;
    let mut s = open(&client, peer).await;
    write_frame(&mut s, &bad).await.unwrap();
    assert_eq!(
        refused(&answer(&mut s).await),
        RemoteErrorKind::InvalidRequest
    );
    let mut empty = request(digest, 8);
    empty.messages.clear();
    let mut s = open(&client, peer).await;
    write_frame(&mut s, &empty).await.unwrap();
    assert_eq!(
        refused(&answer(&mut s).await),
        RemoteErrorKind::InvalidRequest
    );

    // A peer that opens a stream and says nothing is cut off after the read timeout.
    let mut silent = open(&client, peer).await;
    let closed = tokio::time::timeout(
        Duration::from_secs(15),
        read_frame::<_, GenerateFrame>(&mut silent, MAX_STREAM_FRAME),
    )
    .await
    .expect("the provider closes a silent stream within its 10 s read timeout");
    assert!(closed.is_err());

    // A peer that hangs up mid-generation frees its slot; the next request is served in full.
    let mut s = open(&client, peer).await;
    write_frame(&mut s, &request(digest, 64)).await.unwrap();
    assert!(matches!(
        answer(&mut s).await,
        GenerateFrame::Accepted { .. }
    ));
    assert!(matches!(answer(&mut s).await, GenerateFrame::Token { .. }));
    drop(s);

    let mut s = open(&client, peer).await;
    write_frame(&mut s, &request(digest, 8)).await.unwrap();
    assert!(matches!(
        answer(&mut s).await,
        GenerateFrame::Accepted { .. }
    ));
    let mut steps = 0;
    loop {
        match answer(&mut s).await {
            GenerateFrame::Token { .. } => steps += 1,
            GenerateFrame::Done { commitment, .. } => {
                assert_eq!(commitment.commitment.steps, steps);
                assert_eq!(commitment.verify().unwrap(), peer);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(steps > 0);
}

/// Runs `request` to its end as `client`: the tokens and the signed commitment.
async fn generate(
    client: &Client,
    peer: PeerId,
    request: &GenerateRequest,
) -> (Vec<u32>, proofmesh_shared::commit::SignedCommitment) {
    let mut s = open(client, peer).await;
    write_frame(&mut s, request).await.unwrap();
    let mut tokens = Vec::new();
    loop {
        match answer(&mut s).await {
            GenerateFrame::Accepted { .. } => {}
            GenerateFrame::Token { token, .. } => tokens.push(token),
            GenerateFrame::Done { commitment, .. } => return (tokens, *commitment),
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// A peer that reuses another requester's request id (a referee sees every id it checks)
/// stores its own run beside the first one: the first requester still opens exactly the leaves
/// it was committed to, signed by the provider, and a stranger opens nothing of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_request_id_cannot_overwrite_anothers_leaves() {
    use proofmesh_shared::protocol::{OpenLeavesRequest, OpenLeavesResponse};
    use proofmesh_shared::verify::{Challenge, check_commitment, check_openings};
    let (started, _stop) = provider().await;
    let peer = started.peer_id;
    let digest = started.model.digest;
    let first = support::client(started.listen_addrs.clone());
    let second = support::client(started.listen_addrs.clone());
    let mine = request(digest, 8);
    let (tokens, commitment) = generate(&first, peer, &mine).await;
    // The same id, another prompt, from another peer.
    let mut theirs = mine.clone();
    theirs.messages[0].content = "Name a colour.".into();
    let _ = generate(&second, peer, &theirs).await;
    let challenge = Challenge {
        indices: (0..tokens.len() as u32).collect(),
    };
    let ask = OpenLeavesRequest {
        request_id: mine.request_id,
        indices: challenge.indices.clone(),
    };
    let opening = first.open_leaves(peer, ask.clone()).await.unwrap();
    assert_eq!(opening.verify().unwrap(), peer, "openings are signed");
    assert!(check_commitment(&commitment, &mine, &peer, &tokens).is_ok());
    assert!(
        check_openings(
            &commitment,
            &mine,
            &tokens,
            &challenge,
            &opening.opening.response
        )
        .is_ok(),
        "the first requester's leaves were replaced"
    );
    // A third peer knowing the id opens nothing.
    let stranger = support::client(started.listen_addrs.clone());
    drop(open(&stranger, peer).await);
    let refused = stranger.open_leaves(peer, ask).await.unwrap();
    assert!(matches!(
        refused.opening.response,
        OpenLeavesResponse::Refused { .. }
    ));
}
