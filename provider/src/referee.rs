//! Serving referee jobs to gateways over `/proofmesh/referee/1`.
//!
//! A gateway opens one stream per answer it wants re-executed: `Begin` (the request and a
//! ticket the gateway signed for this referee and this request), then `Tokens` as the answer
//! streams, `Finish` and perhaps `Open`. Work is taken only on a valid ticket from a gateway
//! this provider accepts ([`Admission`]), and each such gateway holds at most a bounded number
//! of jobs at once, so peers nobody accepted cannot occupy the re-execution contexts. The job
//! itself (re-execution and signed evidence) is [`Referee`]'s, in the engine crate; this module
//! is the stream around it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use futures::AsyncWriteExt;
use libp2p::PeerId;
use proofmesh_shared::net::{Client, Inbound, Quota};
use proofmesh_shared::protocol::{
    FrameError, GenerateRequest, MAX_REFEREE_FRAME, REFEREE_IDLE_TIMEOUT, REFEREE_PROTOCOL,
    REFEREE_STREAMS_PER_GATEWAY, REFEREE_STREAMS_TOTAL, REQUEST_READ_TIMEOUT, RefereeFrame,
    RefereeReply, RemoteErrorKind, SignedTicket, encode_frame, read_frame, write_frame,
};
use tracing::Instrument;

pub use proofmesh_engine::referee::{Referee, RefereeError, RefereeJob};

use crate::metrics::{OutcomeLabels, ProviderMetrics};

/// Evidence replies per job: the first round and a borderline second one, with room to spare;
/// more is a gateway looping, not auditing.
const MAX_EVIDENCE_REPLIES: usize = 4;

/// Which gateways may start referee jobs here, and how many each may hold at once.
#[derive(Debug, Clone)]
pub struct Admission {
    accepted: Arc<HashSet<PeerId>>,
    per_gateway: usize,
    running: Arc<Mutex<HashMap<PeerId, usize>>>,
}

/// One gateway's hold on a job; released when dropped.
#[derive(Debug)]
struct Held {
    running: Arc<Mutex<HashMap<PeerId, usize>>>,
    gateway: PeerId,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut running = self
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = running.get_mut(&self.gateway) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                running.remove(&self.gateway);
            }
        }
    }
}

impl Admission {
    /// Jobs from gateways in `accepted` only, at most `per_gateway` at once from each.
    pub fn new(accepted: impl IntoIterator<Item = PeerId>, per_gateway: usize) -> Self {
        Self {
            accepted: Arc::new(accepted.into_iter().collect()),
            per_gateway: per_gateway.max(1),
            running: Arc::default(),
        }
    }

    /// Checks `ticket` for a job on `request` at `referee`, and holds one of its gateway's
    /// places until the returned guard drops.
    fn admit(
        &self,
        ticket: &SignedTicket,
        referee: PeerId,
        request: &GenerateRequest,
    ) -> Result<Held, RefereeError> {
        let invalid = |m: &str| Err(RefereeError::Invalid(m.into()));
        let Ok(gateway) = ticket.verify() else {
            return invalid("the ticket's signature does not verify");
        };
        if !self.accepted.contains(&gateway) {
            return invalid("no ticket from a gateway this referee works for");
        }
        let t = &ticket.ticket;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if t.referee != referee.to_bytes() || t.request_hash != request.hash() {
            return invalid("the ticket is for another referee or request");
        }
        if t.expires_unix < now {
            return invalid("the ticket has expired");
        }
        let mut running = self
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let held = running.entry(gateway).or_default();
        if *held >= self.per_gateway {
            return Err(RefereeError::Busy(format!(
                "this gateway already holds {} referee jobs here",
                self.per_gateway
            )));
        }
        *held += 1;
        Ok(Held {
            running: Arc::clone(&self.running),
            gateway,
        })
    }
}

/// Everything a served referee stream needs.
#[derive(Debug, Clone)]
pub struct Desk {
    /// The job side.
    pub referee: Referee,
    /// Who may start jobs, and how many each.
    pub admission: Admission,
    /// Where jobs are counted.
    pub metrics: Option<Arc<ProviderMetrics>>,
    /// Test-only: a referee that signs false evidence (how, and with its node key).
    #[doc(hidden)]
    pub lies: Option<(crate::Tamper, libp2p::identity::Keypair)>,
}

/// Accepts `/proofmesh/referee/2` streams until the mesh stops.
pub(crate) async fn accept_streams(desk: Arc<Desk>, client: Client) {
    let quota = Quota {
        per_peer: REFEREE_STREAMS_PER_GATEWAY,
        total: REFEREE_STREAMS_TOTAL,
    };
    let refusal = encode_frame(&RefereeReply::Error {
        kind: RemoteErrorKind::Overloaded,
        message: "no room for another referee stream from this gateway right now".into(),
    })
    .unwrap_or_default();
    let mut incoming = match client.accept(REFEREE_PROTOCOL, quota, refusal) {
        Ok(incoming) => incoming,
        Err(e) => {
            tracing::error!(error = %e, "cannot accept referee streams");
            return;
        }
    };
    while let Some(Inbound { peer, stream, slot }) = incoming.next().await {
        let desk = Arc::clone(&desk);
        tokio::spawn(async move {
            // Called off when the stream's connection closes: it is dead.
            if slot
                .serve(serve_stream(&desk, peer, stream))
                .await
                .is_none()
            {
                count_job(&desk, "failed");
            }
            drop(slot);
        });
    }
}

/// Serves one gateway's referee stream: `Begin`, then `Tokens` as they come, `Finish`, `Open`.
pub async fn serve_stream(desk: &Desk, asker: PeerId, mut stream: libp2p::Stream) {
    let outcome = serve(desk, asker, &mut stream).await;
    count_job(
        desk,
        match &outcome {
            Ok(()) => "completed",
            Err(StreamEnd::Job(RefereeError::Busy(_) | RefereeError::Invalid(_))) => "refused",
            Err(_) => "failed",
        },
    );
    if let Err(e) = outcome {
        tracing::debug!(gateway = %asker, error = %e, "referee job ended");
        if let Some(kind) = e.kind() {
            let reply = RefereeReply::Error {
                kind,
                message: e.to_string(),
            };
            let _ = write_frame(&mut stream, &reply).await;
        }
    }
    let _ = stream.close().await;
}

/// Counts one referee job by how it ended.
fn count_job(desk: &Desk, outcome: &'static str) {
    if let Some(metrics) = &desk.metrics {
        metrics
            .referee_jobs
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }
}

/// How a served referee stream ended badly.
#[derive(Debug, thiserror::Error)]
enum StreamEnd {
    #[error(transparent)]
    Job(#[from] RefereeError),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("gateway went quiet")]
    Idle,
    #[error("stream broke: {0}")]
    Broken(#[from] FrameError),
}

impl StreamEnd {
    /// The error frame to send, if the gateway can still hear one.
    fn kind(&self) -> Option<RemoteErrorKind> {
        match self {
            Self::Job(e) => Some(e.kind()),
            Self::Protocol(_) => Some(RemoteErrorKind::InvalidRequest),
            Self::Idle | Self::Broken(_) => None,
        }
    }
}

async fn next_frame(stream: &mut libp2p::Stream) -> Result<Option<RefereeFrame>, StreamEnd> {
    match tokio::time::timeout(
        REFEREE_IDLE_TIMEOUT,
        read_frame::<_, RefereeFrame>(stream, MAX_REFEREE_FRAME),
    )
    .await
    {
        Ok(Ok(frame)) => Ok(Some(frame)),
        Ok(Err(FrameError::Closed)) => Ok(None),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(StreamEnd::Idle),
    }
}

async fn serve(desk: &Desk, asker: PeerId, stream: &mut libp2p::Stream) -> Result<(), StreamEnd> {
    let begin = tokio::time::timeout(
        REQUEST_READ_TIMEOUT,
        read_frame::<_, RefereeFrame>(stream, MAX_REFEREE_FRAME),
    )
    .await
    .map_err(|_| StreamEnd::Idle)??;
    let RefereeFrame::Begin { request, ticket } = begin else {
        return Err(StreamEnd::Protocol("the first frame must be Begin".into()));
    };
    // An invalid request takes no place of its gateway's (checked again by the job itself).
    request
        .validate(&desk.referee.digest())
        .map_err(|refusal| RefereeError::Invalid(refusal.message))?;
    let _held = desk
        .admission
        .admit(&ticket, desk.referee.peer_id(), &request)?;
    let span = tracing::info_span!(
        "provider.referee",
        request_id = %request.request_id,
        gateway = %asker,
    );
    if let Some(trace) = request.trace.as_ref().filter(|t| t.is_valid()) {
        proofmesh_shared::telemetry::set_parent(&span, trace);
    }
    follow(desk, asker, *request, stream).instrument(span).await
}

/// After `Begin`: takes the job, then answers the gateway's frames until it closes the stream.
async fn follow(
    desk: &Desk,
    asker: PeerId,
    request: GenerateRequest,
    stream: &mut libp2p::Stream,
) -> Result<(), StreamEnd> {
    let referee = &desk.referee;
    let mut job = referee.begin(request, asker)?;
    tracing::debug!("refereeing");
    write_frame(
        stream,
        &RefereeReply::Accepted {
            prompt_tokens: job.prompt_tokens(),
            numerics: referee.numerics().to_string(),
        },
    )
    .await?;
    let mut finished = false;
    let mut replies = 0;
    while let Some(frame) = next_frame(stream).await? {
        if replies >= MAX_EVIDENCE_REPLIES && !matches!(frame, RefereeFrame::Tokens { .. }) {
            return Err(StreamEnd::Protocol("too many evidence requests".into()));
        }
        let evidence = match frame {
            RefereeFrame::Tokens { first_step, tokens } => {
                job.push(first_step, &tokens)?;
                continue;
            }
            RefereeFrame::Finish { indices } => {
                let evidence = job.finish(&indices).await?;
                finished = true;
                evidence
            }
            RefereeFrame::Open { indices } => {
                if !finished {
                    return Err(StreamEnd::Protocol("Open before Finish".into()));
                }
                job.open(&indices)?
            }
            RefereeFrame::Begin { .. } => {
                return Err(StreamEnd::Protocol("one Begin per stream".into()));
            }
        };
        let evidence = match &desk.lies {
            Some((tamper, key)) => crate::tamper::false_evidence(*tamper, evidence, key),
            None => evidence,
        };
        write_frame(stream, &RefereeReply::Evidence(Box::new(evidence))).await?;
        replies += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use libp2p::identity::Keypair;
    use proofmesh_shared::protocol::{
        ChatMessage, GenerateRequest, ModelDigest, RefereeTicket, RequestId,
    };

    use super::*;

    fn request() -> GenerateRequest {
        GenerateRequest {
            version: GenerateRequest::VERSION,
            request_id: RequestId::random(),
            model_digest: ModelDigest([1; 32]),
            messages: vec![ChatMessage {
                role: "user".into(),
                content: "x".into(),
            }],
            sampler: Default::default(),
            max_tokens: 8,
            stop: vec![],
            trace: None,
            stream_leaves: false,
            tools: None,
            constraint: None,
            prompt: None,
        }
    }

    fn ticket(by: &Keypair, referee: PeerId, request: &GenerateRequest) -> SignedTicket {
        RefereeTicket {
            referee: referee.to_bytes(),
            request_hash: request.hash(),
            expires_unix: u64::MAX,
        }
        .sign(by)
        .unwrap()
    }

    #[test]
    fn each_accepted_gateway_holds_a_bounded_number_of_jobs() {
        let (gateway, other) = (Keypair::generate_secp256k1(), Keypair::generate_secp256k1());
        let referee = PeerId::random();
        let admission = Admission::new(
            [gateway.public().to_peer_id(), other.public().to_peer_id()],
            2,
        );
        let r = request();
        let first = admission
            .admit(&ticket(&gateway, referee, &r), referee, &r)
            .unwrap();
        let second = admission
            .admit(&ticket(&gateway, referee, &r), referee, &r)
            .unwrap();
        assert!(matches!(
            admission.admit(&ticket(&gateway, referee, &r), referee, &r),
            Err(RefereeError::Busy(_))
        ));
        // Another gateway's places are its own.
        let theirs = admission.admit(&ticket(&other, referee, &r), referee, &r);
        assert!(theirs.is_ok());
        drop(first);
        assert!(
            admission
                .admit(&ticket(&gateway, referee, &r), referee, &r)
                .is_ok()
        );
        drop(second);
        // A stranger's ticket takes nothing.
        let stranger = Keypair::generate_secp256k1();
        assert!(matches!(
            admission.admit(&ticket(&stranger, referee, &r), referee, &r),
            Err(RefereeError::Invalid(_))
        ));
    }
}
