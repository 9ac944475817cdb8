//! A real provider (real model, real swarm on loopback) spoken to as a referee over raw
//! `/proofmesh/referee/2` streams: an honest job with a ticket from a gateway the provider
//! referees for returns signed evidence bound to the request and the tokens; jobs without a
//! valid ticket, and malformed or hostile ones, get clear error frames within the referee's
//! limits.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use futures::AsyncWriteExt;
use libp2p::PeerId;
use libp2p::identity::Keypair;
use proofmesh_shared::commit::output_hash;
use proofmesh_shared::net::Client;
use proofmesh_shared::protocol::{
    GenerateRequest, MAX_EVIDENCE_FRAME, ModelDigest, REFEREE_PROTOCOL, RefereeFrame, RefereeReply,
    RefereeTicket, RemoteErrorKind, read_frame, write_frame,
};
use proofmesh_shared::sampling::SamplerParams;
use tokio::sync::oneshot;

/// Jobs one gateway may start per minute on the provider under test.
const RATE: u32 = 4;

async fn provider(gateway: PeerId) -> (proofmesh_provider::Started, oneshot::Sender<()>) {
    let mut engine = support::small_engine().await;
    engine.referee_slots = 1;
    support::provider_for(engine, RATE, vec![gateway]).await
}

async fn open(client: &Client, peer: PeerId) -> libp2p::Stream {
    support::open(client, peer, REFEREE_PROTOCOL).await
}

async fn reply(stream: &mut libp2p::Stream) -> RefereeReply {
    support::next_frame(stream, MAX_EVIDENCE_FRAME, 60).await
}

/// Opens a job with `frame`, asking again while the referee's one context is still being freed
/// from the previous job (it answers `Overloaded` until its engine thread has let go).
async fn begun(
    client: &Client,
    peer: PeerId,
    frame: &RefereeFrame,
) -> (libp2p::Stream, RefereeReply) {
    for _ in 0..200 {
        let mut s = open(client, peer).await;
        write_frame(&mut s, frame).await.unwrap();
        match reply(&mut s).await {
            RefereeReply::Error {
                kind: RemoteErrorKind::Overloaded,
                message,
            } if !message.contains("a minute") => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return (s, other),
        }
    }
    panic!("the referee stayed busy")
}

fn refused(reply: &RefereeReply) -> RemoteErrorKind {
    match reply {
        RefereeReply::Error { kind, .. } => *kind,
        other => panic!("expected an error frame, got {other:?}"),
    }
}

fn request(digest: ModelDigest, max_tokens: u32) -> GenerateRequest {
    let mut request = support::greedy_request(digest, max_tokens);
    request.messages[0].content = "Name a fruit.".into();
    request
}

/// Unix seconds now.
fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// `Begin` for `request` with a ticket `gateway` signed for `referee`, valid until `expires`.
fn begin_by(
    gateway: &Keypair,
    referee: PeerId,
    request: &GenerateRequest,
    expires: u64,
) -> RefereeFrame {
    let ticket = RefereeTicket {
        referee: referee.to_bytes(),
        request_hash: request.hash(),
        expires_unix: expires,
    }
    .sign(gateway)
    .unwrap();
    RefereeFrame::Begin {
        request: Box::new(request.clone()),
        ticket: Box::new(ticket),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_referee_job_returns_evidence_and_hostile_jobs_are_refused() {
    let gateway = Keypair::generate_secp256k1();
    let (started, _stop) = provider(gateway.public().to_peer_id()).await;
    let referee = started.peer_id;
    let digest = started.model.digest;
    let begin = |request: &GenerateRequest| begin_by(&gateway, referee, request, now() + 600);
    assert!(started.model.referee);
    assert!(
        started.model.numerics.starts_with("det/"),
        "{}",
        started.model.numerics
    );
    let client = support::client_with(gateway.clone(), started.listen_addrs.clone());

    // An honest job: tokens in two frames, then Finish; evidence on two steps, then on one more.
    let req = request(digest, 8);
    let tokens = [504u32, 28, 3874, 30, 2, 2, 2, 2];
    let (mut s, accepted) = begun(&client, referee, &begin(&req)).await;
    let RefereeReply::Accepted {
        prompt_tokens,
        numerics,
    } = accepted
    else {
        panic!("expected Accepted")
    };
    assert!(prompt_tokens > 5);
    assert_eq!(numerics, started.model.numerics);
    for (first, chunk) in [(0u32, &tokens[..3]), (3, &tokens[3..])] {
        let frame = RefereeFrame::Tokens {
            first_step: first,
            tokens: chunk.to_vec(),
        };
        write_frame(&mut s, &frame).await.unwrap();
    }
    write_frame(
        &mut s,
        &RefereeFrame::Finish {
            indices: vec![0, 7],
        },
    )
    .await
    .unwrap();
    let RefereeReply::Evidence(evidence) = reply(&mut s).await else {
        panic!("expected evidence")
    };
    assert_eq!(evidence.verify().unwrap(), referee);
    let e = &evidence.evidence;
    assert_eq!((e.request_id, e.request_hash), (req.request_id, req.hash()));
    assert_eq!(e.output_hash, output_hash(&tokens));
    assert_eq!((e.steps, e.prompt_tokens), (8, prompt_tokens));
    assert_eq!(e.opened.iter().map(|s| s.step).collect::<Vec<_>>(), [0, 7]);
    assert_eq!(e.margins.len(), 8);
    assert_eq!(e.opened[0].top.len(), 32);
    assert_eq!(e.invalid_tokens, 0);
    write_frame(&mut s, &RefereeFrame::Open { indices: vec![3] })
        .await
        .unwrap();
    let RefereeReply::Evidence(more) = reply(&mut s).await else {
        panic!("expected evidence")
    };
    assert_eq!(more.evidence.opened[0].step, 3);
    assert_eq!(more.evidence.margins, e.margins);
    drop(s);

    // A first frame that is not Begin.
    let mut s = open(&client, referee).await;
    let tokens_first = RefereeFrame::Tokens {
        first_step: 0,
        tokens: vec![1],
    };
    write_frame(&mut s, &tokens_first).await.unwrap();
    assert_eq!(
        refused(&reply(&mut s).await),
        RemoteErrorKind::InvalidRequest
    );

    // Another model; no ticket from a gateway it referees for; a ticket for another referee,
    // for another request, or expired: each is refused before any work.
    let stranger = Keypair::generate_secp256k1();
    let other_req = request(digest, 8);
    let refusals = [
        begin(&request(ModelDigest([9; 32]), 8)),
        begin_by(&stranger, referee, &request(digest, 8), now() + 600),
        begin_by(&gateway, PeerId::random(), &request(digest, 8), now() + 600),
        {
            let mut frame = begin(&other_req);
            if let RefereeFrame::Begin { request, .. } = &mut frame {
                request.max_tokens = 7;
            }
            frame
        },
        begin_by(&gateway, referee, &request(digest, 8), now() - 1),
    ];
    for frame in refusals {
        let mut s = open(&client, referee).await;
        write_frame(&mut s, &frame).await.unwrap();
        assert_eq!(
            refused(&reply(&mut s).await),
            RemoteErrorKind::InvalidRequest
        );
    }

    // Tokens out of order, more tokens than max_tokens, Open before Finish: each ends the job
    // with an error frame.
    type Frames = Box<dyn Fn(&GenerateRequest) -> Vec<RefereeFrame>>;
    let bad_frames: [Frames; 3] = [
        Box::new(|_| {
            vec![RefereeFrame::Tokens {
                first_step: 5,
                tokens: vec![1],
            }]
        }),
        Box::new(|_| {
            vec![RefereeFrame::Tokens {
                first_step: 0,
                tokens: vec![1; 9],
            }]
        }),
        Box::new(|_| {
            vec![
                RefereeFrame::Tokens {
                    first_step: 0,
                    tokens: vec![1, 2],
                },
                RefereeFrame::Open { indices: vec![0] },
            ]
        }),
    ];
    for frames in &bad_frames {
        let req = request(digest, 8);
        let (mut s, accepted) = begun(&client, referee, &begin(&req)).await;
        assert!(matches!(accepted, RefereeReply::Accepted { .. }));
        for frame in frames(&req) {
            write_frame(&mut s, &frame).await.unwrap();
        }
        assert_eq!(
            refused(&reply(&mut s).await),
            RemoteErrorKind::InvalidRequest
        );
    }

    // A length prefix far over the limit: the stream is closed without an allocation.
    let mut s = open(&client, referee).await;
    s.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    s.flush().await.unwrap();
    let closed = tokio::time::timeout(
        Duration::from_secs(15),
        read_frame::<_, RefereeReply>(&mut s, MAX_EVIDENCE_FRAME),
    )
    .await
    .expect("closed promptly");
    assert!(closed.is_err());

    // The per-gateway rate: this test has started RATE jobs so far (the ones refused before
    // they took a context did not count), and the bucket refills at RATE a minute, so of four
    // more at most two can start.
    // (A job refused only because the previous one's context was still being freed is asked
    // again: it took no start from the rate.)
    let mut rate_limited = 0;
    for _ in 0..4 {
        let (_s, answer) = begun(&client, referee, &begin(&request(digest, 8))).await;
        if let RefereeReply::Error { kind, message } = answer {
            assert_eq!(kind, RemoteErrorKind::Overloaded);
            rate_limited += usize::from(message.contains("a minute"));
        }
    }
    assert!(rate_limited >= 2, "{rate_limited} of 4 rate-limited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_context_is_free_again_only_once_its_job_is_done() {
    // One referee context. Finishing a job does not free it at once: the engine thread still
    // has to feed the job its last tokens. A job begun in that gap must be refused as busy, not
    // accepted and then lost (`Finish` answering "unknown re-execution").
    use proofmesh_provider::engine::{Engine, EngineError};
    let mut config = support::small_engine().await;
    config.referee_slots = 1;
    let engine = tokio::task::spawn_blocking(move || Engine::start(&config))
        .await
        .unwrap()
        .unwrap();
    let prompt: Vec<u32> = (1..=40).collect();
    let claimed: Vec<u32> = (100..164).collect();
    for round in 0..3 {
        let first = engine
            .reexecute(prompt.clone(), SamplerParams::default(), 64)
            .unwrap();
        first.push(claimed.clone()).unwrap();
        let finishing = tokio::spawn(first.finish());
        // Begin the next job as soon as the engine will take one.
        let second = loop {
            match engine.reexecute(prompt.clone(), SamplerParams::default(), 64) {
                Ok(job) => break job,
                Err(EngineError::RefereeBusy) => tokio::time::sleep(Duration::from_millis(1)).await,
                Err(e) => panic!("round {round}: {e}"),
            }
        };
        finishing.await.unwrap().expect("the first job's evidence");
        second.push(claimed.clone()).unwrap();
        let evidence = second.finish().await.expect("the second job's evidence");
        assert_eq!(evidence.steps.len(), claimed.len(), "round {round}");
    }
}
