//! Versioned wire messages between gateways and providers, their limits, and the framing.
//!
//! Three protocols run between peers:
//!
//! - [`GENERATE_PROTOCOL`], a raw `libp2p-stream`: the gateway writes one [`GenerateRequest`]
//!   frame; the provider answers with [`GenerateFrame`]s: `Accepted`, one `Token` per generated
//!   step, and `Done` carrying the signed commitment last (or `Error`).
//! - [`OPEN_PROTOCOL`], request-response: the gateway sends an [`OpenLeavesRequest`] for the
//!   steps it challenges and gets the leaves and a Merkle multi-proof back.
//! - [`CAPS_PROTOCOL`], request-response: a gateway asks a newly identified provider what it
//!   serves and gets [`Capabilities`].
//! - [`LEAVE_PROTOCOL`], request-response: a provider that is shutting down tells its peers with
//!   [`Leaving`], so gateways stop routing to it at once while its running streams finish.
//! - [`REFEREE_PROTOCOL`], a raw `libp2p-stream`: a gateway asks a provider of the same model to
//!   re-execute another provider's answer teacher-forced. It writes [`RefereeFrame`]s: `Begin`
//!   (the request) as soon as the answer starts, `Tokens` while it streams (the referee
//!   re-executes them as they come), `Finish` with the signed commitment and the challenged
//!   steps, and optionally `Open` for more steps. The referee answers `Accepted`, then one
//!   `Evidence` per `Finish`/`Open` ([`RefereeReply`]).
//!
//! Every frame is a big-endian `u32` length followed by that many bytes of CBOR. Readers check the
//! length against a per-direction maximum before they allocate or parse anything.

use std::fmt;
use std::time::Duration;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::Digest32;
use crate::commit::{SignedCommitment, StepLeaf};
use crate::constraint::Constraint;
use crate::sampling::SamplerParams;
use crate::verify::SignedEvidence;

/// The token stream protocol.
pub const GENERATE_PROTOCOL: StreamProtocol = StreamProtocol::new("/proofmesh/generate/1");
/// The referee re-execution stream protocol.
pub const REFEREE_PROTOCOL: StreamProtocol = StreamProtocol::new("/proofmesh/referee/2");
/// Generate streams a provider lets one gateway hold at once (waiting or generating): half its
/// engine queue, so that one gateway can never take all of it from the others.
pub const GENERATE_STREAMS_PER_GATEWAY: usize = 32;
/// Generate streams a provider holds from all gateways together. With each read up to
/// [`MAX_REQUEST_FRAME`], this bounds what a crowd of identities can make it buffer.
pub const GENERATE_STREAMS_TOTAL: usize = 128;
/// Generate streams a gateway opens to one provider at once. Below the provider's quota, so a
/// stream the gateway is done with and the provider has not yet let go of never gets the next
/// one refused (and the gateway struck for it).
pub const GENERATE_STREAMS_PER_PROVIDER: usize = 24;
/// Referee streams a referee lets one gateway hold at once (its own admission answers jobs
/// past its slots with a polite `Overloaded`; this bounds what a flood can make it read).
pub const REFEREE_STREAMS_PER_GATEWAY: usize = 64;
/// Referee streams a gateway opens to one referee at once: below the referee's quota, for the
/// same reason as [`GENERATE_STREAMS_PER_PROVIDER`].
pub const REFEREE_STREAMS_PER_REFEREE: usize = 48;
/// Referee streams a referee holds from all gateways together.
pub const REFEREE_STREAMS_TOTAL: usize = 256;
/// The leaf-opening request-response protocol.
pub const OPEN_PROTOCOL: StreamProtocol = StreamProtocol::new("/proofmesh/open/2");
/// The capability query protocol.
pub const CAPS_PROTOCOL: StreamProtocol = StreamProtocol::new("/proofmesh/caps/1");
/// The shutdown announcement protocol.
pub const LEAVE_PROTOCOL: StreamProtocol = StreamProtocol::new("/proofmesh/leave/1");

/// Largest generate request frame: 1 MiB of prompt is far beyond any context window we serve, and
/// the gateway's HTTP body limit is below it.
pub const MAX_REQUEST_FRAME: usize = 1024 * 1024 + 64 * 1024;
/// Largest provider-to-gateway frame. A token frame is tens of bytes; the `Done` frame carries a
/// commitment (~300 bytes) and the last held-back text.
pub const MAX_STREAM_FRAME: usize = 64 * 1024;
/// Largest leaf-opening request: [`MAX_OPEN_INDICES`] `u32`s plus overhead.
pub const MAX_OPEN_REQUEST: u64 = 16 * 1024;
/// Largest leaf-opening response: [`MAX_OPEN_INDICES`] leaves of ~300 bytes plus a multi-proof.
pub const MAX_OPEN_RESPONSE: u64 = 512 * 1024;
/// Most leaves one opening request may ask for.
pub const MAX_OPEN_INDICES: usize = 256;
/// Largest capability message (a handful of model cards).
pub const MAX_CAPS_MESSAGE: u64 = 64 * 1024;
/// Largest gateway-to-referee frame: `Begin` carries a whole request.
pub const MAX_REFEREE_FRAME: usize = MAX_REQUEST_FRAME;
/// Largest referee-to-gateway frame. Evidence for [`MAX_OPEN_INDICES`] steps (~300 bytes each)
/// plus one margin per generated token (5 bytes each for the longest context we serve).
pub const MAX_EVIDENCE_FRAME: usize = 512 * 1024;
/// Most tokens one `Tokens` frame may carry (a gateway forwards them as they arrive, a few at a
/// time).
pub const MAX_TOKENS_PER_FRAME: usize = 4096;
/// How long a referee waits for the next frame from the gateway: the answer it follows may sit
/// behind others in a busy provider's queue, exactly like [`FRAME_GAP_TIMEOUT`].
pub const REFEREE_IDLE_TIMEOUT: Duration = FRAME_GAP_TIMEOUT;
/// How long a provider waits for the request frame after a stream opens. A gateway writes it at
/// once, so a peer that stays silent this long is stuck or hostile.
pub const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest gap between two frames a gateway accepts while a generation runs. Generous: a
/// queued request on a busy CPU provider may wait for earlier ones to finish first.
pub const FRAME_GAP_TIMEOUT: Duration = Duration::from_secs(120);
/// The longest gap between two frames once tokens flow. A sequence that produced its first
/// token is in the engine's batch and gets one every decode step (its prefill is done), so a
/// long silence now means a provider that died, hung or lost its link without a reset: the
/// request fails over (or the stream ends with an error event) after this, not after
/// [`FRAME_GAP_TIMEOUT`].
pub const TOKEN_GAP_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout for leaf openings and capability queries: both are answered from memory.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(15);
/// Most messages a request may carry.
pub const MAX_MESSAGES: usize = 256;
/// Most stop sequences a request may carry (OpenAI allows 4).
pub const MAX_STOP_SEQUENCES: usize = 4;
/// Longest stop sequence, in bytes.
pub const MAX_STOP_LEN: usize = 256;

/// A 16-byte random request id chosen by the gateway; it keys the draw PRF and the leaf store.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RequestId([u8; 16]);

impl RequestId {
    /// A fresh random id.
    pub fn random() -> Self {
        Self(rand::random())
    }

    /// An id from raw bytes.
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestId({self})")
    }
}

/// SHA-256 of a GGUF file: the identity of a model, independent of its file name.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ModelDigest(pub Digest32);

impl ModelDigest {
    /// Parses 64 hex digits, with or without a `sha256:` prefix.
    pub fn parse(text: &str) -> Option<Self> {
        let hex_part = text.strip_prefix("sha256:").unwrap_or(text);
        let bytes = hex::decode(hex_part).ok()?;
        Some(Self(bytes.try_into().ok()?))
    }
}

impl fmt::Display for ModelDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for ModelDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ModelDigest({self})")
    }
}

/// One chat message as the provider's chat template receives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// Plain text content.
    pub content: String,
}

/// What a gateway asks a provider to generate. Its hash binds the commitment to the prompt, the
/// model and the sampler settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    /// Wire version, [`GenerateRequest::VERSION`].
    pub version: u16,
    /// Chosen by the gateway; keys the draw PRF.
    pub request_id: RequestId,
    /// The model the gateway wants, by content.
    pub model_digest: ModelDigest,
    /// The conversation; the provider applies the model's own chat template. Empty for a
    /// text prompt.
    pub messages: Vec<ChatMessage>,
    /// A text prompt (`/v1/completions`), run as it is, without a chat template; `messages`
    /// is then empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Sampler settings.
    pub sampler: SamplerParams,
    /// Most tokens to generate.
    pub max_tokens: u32,
    /// Stop sequences; generation ends when the visible text contains one.
    pub stop: Vec<String>,
    /// What the answer is constrained to (a JSON object, a JSON schema); every token must be
    /// one the constraint allows at its step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraint: Option<Constraint>,
    /// Tools the model may call, as OpenAI's JSON array ([`crate::tools::tools_json`]): the
    /// chat template is rendered with them. Calls are made in the format of
    /// [`crate::tools`], which `constraint` holds the answer to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<String>,
    /// The gateway's trace context, so the provider's spans join the request's trace. Not
    /// covered by [`GenerateRequest::hash`]: it says nothing about what is generated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceContext>,
    /// Send each step's [`StepLeaf`] with its token (`GenerateFrame::Token::leaf`), so the
    /// gateway can report log-probabilities it checked against the commitment's Merkle root.
    /// Not covered by [`GenerateRequest::hash`]: it changes what is sent, not what is generated.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stream_leaves: bool,
}

impl GenerateRequest {
    /// The current wire version.
    pub const VERSION: u16 = 1;

    /// `SHA-256("proofmesh/request/v1" ‖ CBOR(fields))` over every field but `trace`: what a
    /// commitment's `request_hash` must be.
    pub fn hash(&self) -> Digest32 {
        #[derive(Serialize)]
        struct Bound<'a> {
            version: u16,
            request_id: &'a RequestId,
            model_digest: &'a ModelDigest,
            messages: &'a [ChatMessage],
            // Absent when there is none, like `constraint`.
            #[serde(skip_serializing_if = "Option::is_none")]
            prompt: Option<&'a str>,
            sampler: &'a SamplerParams,
            max_tokens: u32,
            stop: &'a [String],
            // Absent from the hashed bytes when there is none, so unconstrained requests
            // hash as they always did.
            #[serde(skip_serializing_if = "Option::is_none")]
            constraint: Option<&'a Constraint>,
            #[serde(skip_serializing_if = "Option::is_none")]
            tools: Option<&'a str>,
        }
        let bound = Bound {
            version: self.version,
            request_id: &self.request_id,
            model_digest: &self.model_digest,
            messages: &self.messages,
            prompt: self.prompt.as_deref(),
            sampler: &self.sampler,
            max_tokens: self.max_tokens,
            stop: &self.stop,
            constraint: self.constraint.as_ref(),
            tools: self.tools.as_deref(),
        };
        let mut bytes = Vec::new();
        // Writing CBOR into a Vec cannot fail for these plain types.
        if ciborium::into_writer(&bound, &mut bytes).is_err() {
            bytes.clear();
        }
        crate::sha256(&[b"proofmesh/request/v1", &bytes])
    }
}

/// What a request's model runs on.
#[derive(Debug, Clone, Copy)]
pub enum Prompt<'a> {
    /// A conversation, through the model's chat template, with the tools it may call (OpenAI's
    /// JSON array) when it has any.
    Chat(&'a [ChatMessage], Option<&'a str>),
    /// A text prompt, as it is.
    Text(&'a str),
}

impl GenerateRequest {
    /// The request's prompt.
    pub fn prompt(&self) -> Prompt<'_> {
        match &self.prompt {
            Some(text) => Prompt::Text(text),
            None => Prompt::Chat(&self.messages, self.tools.as_deref()),
        }
    }
}

/// A W3C trace context (`traceparent`, optional `tracestate`) carried across the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceContext {
    /// `00-<trace id>-<span id>-<flags>`.
    pub traceparent: String,
    /// Vendor state, passed through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// Longest `tracestate` accepted (the W3C limit is 32 members of ~256 bytes; we keep less).
    pub const MAX_STATE_LEN: usize = 512;

    /// Whether it has the W3C shape and bounded size; others are ignored, never an error.
    pub fn is_valid(&self) -> bool {
        let p = self.traceparent.as_bytes();
        p.len() == 55
            && p.iter().enumerate().all(|(i, b)| match i {
                2 | 35 | 52 => *b == b'-',
                _ => b.is_ascii_hexdigit(),
            })
            && self
                .tracestate
                .as_ref()
                .is_none_or(|s| s.len() <= Self::MAX_STATE_LEN && s.is_ascii())
    }
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FinishReason {
    /// End-of-generation token or a stop sequence.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl FinishReason {
    /// OpenAI's spelling.
    pub fn as_openai(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// Classes of provider-side failure, so the gateway can map them to HTTP statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RemoteErrorKind {
    /// The request was malformed or asks for something the provider cannot do.
    InvalidRequest,
    /// The prompt plus `max_tokens` does not fit the context window.
    ContextLength,
    /// The provider does not serve the requested model digest.
    UnknownModel,
    /// The provider is at capacity.
    Overloaded,
    /// The provider is shutting down and takes no new requests.
    ShuttingDown,
    /// The provider serves only gateways its operator named, and not this one.
    NotServed,
    /// Anything else went wrong inside the provider.
    Internal,
}

/// Why a provider or referee refuses a request before doing any work; sent back as an `Error`
/// frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    /// The class of refusal.
    pub kind: RemoteErrorKind,
    /// A human-readable explanation.
    pub message: String,
}

impl Refusal {
    /// A refusal of `kind`, explained by `message`.
    pub fn new(kind: RemoteErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

impl GenerateRequest {
    /// The checks every node makes before working on a request for the model `serves`: the
    /// version, the model, and the bounds on messages, `max_tokens`, stop sequences and sampler
    /// settings.
    pub fn validate(&self, serves: &ModelDigest) -> Result<(), Refusal> {
        let invalid = |m: &str| Err(Refusal::new(RemoteErrorKind::InvalidRequest, m));
        if self.version != Self::VERSION {
            return invalid("unsupported protocol version");
        }
        if &self.model_digest != serves {
            return Err(Refusal::new(
                RemoteErrorKind::UnknownModel,
                format!("this node serves {serves}"),
            ));
        }
        match &self.prompt {
            None if self.messages.is_empty() || self.messages.len() > MAX_MESSAGES => {
                return invalid("between 1 and 256 messages are required");
            }
            Some(text) if !self.messages.is_empty() || text.is_empty() => {
                return invalid("a text prompt is non-empty and comes without messages");
            }
            _ => {}
        }
        if self.max_tokens == 0 {
            return invalid("max_tokens must be at least 1");
        }
        match &self.tools {
            Some(_) if self.prompt.is_some() => {
                return invalid("tools come with messages, not a text prompt");
            }
            Some(tools) if tools.len() > crate::tools::MAX_TOOLS_BYTES => {
                return invalid("the tools may be at most 64 KiB of JSON");
            }
            _ => {}
        }
        if self.stop.len() > MAX_STOP_SEQUENCES || self.stop.iter().any(|s| s.len() > MAX_STOP_LEN)
        {
            return invalid("at most 4 stop sequences of at most 256 bytes");
        }
        let s = &self.sampler;
        let sane = s.temperature.is_finite()
            && (0.0..=2.0).contains(&s.temperature)
            && s.top_p.is_finite()
            && s.top_p > 0.0
            && s.top_p <= 1.0
            && s.min_p.is_finite()
            && (0.0..=1.0).contains(&s.min_p);
        if !sane {
            return invalid("sampler settings out of range");
        }
        Ok(())
    }
}

/// One frame from provider to gateway on a generate stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum GenerateFrame {
    /// The request was admitted; the prompt is this many tokens long.
    Accepted {
        /// Prompt length after the chat template.
        prompt_tokens: u32,
        /// Jobs waiting in the provider's queue (for every gateway) when it took this one: a
        /// claim, which gateways use only to route less to a provider that says it is busy.
        #[serde(default)]
        queue_depth: u32,
    },
    /// One generated step.
    Token {
        /// Step index, starting at 0.
        step: u32,
        /// The token id committed at this step.
        token: u32,
        /// Visible text released at this step (may be empty while a possible stop sequence is
        /// held back, or for control tokens).
        text: String,
        /// The step's committed leaf, when the request asked for them
        /// ([`GenerateRequest::stream_leaves`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        leaf: Option<Box<StepLeaf>>,
    },
    /// Generation finished; the signed commitment covers every step sent.
    Done {
        /// Why it stopped.
        finish_reason: FinishReason,
        /// Held-back text released at the end.
        text: String,
        /// The signed commitment.
        commitment: Box<SignedCommitment>,
    },
    /// The provider gave up.
    Error {
        /// What kind of failure.
        kind: RemoteErrorKind,
        /// A human-readable explanation.
        message: String,
    },
}

/// The gateway's challenge: open these steps of that request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenLeavesRequest {
    /// The request whose leaves are wanted.
    pub request_id: RequestId,
    /// Step indices, sorted and distinct, at most [`MAX_OPEN_INDICES`].
    pub indices: Vec<u32>,
}

/// The provider's answer to an [`OpenLeavesRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OpenLeavesResponse {
    /// The leaves, in the order of the requested indices, and a Merkle multi-proof for them.
    Opened {
        /// One leaf per requested index.
        leaves: Vec<StepLeaf>,
        /// rs_merkle multi-proof hashes.
        proof: Vec<Digest32>,
    },
    /// The provider cannot open them (unknown or expired request, bad indices).
    Refused {
        /// Why.
        reason: String,
    },
}

/// An [`OpenLeavesResponse`] signed by the provider with its node key, bound to the request and
/// the steps asked for: a fraud proof built on an opening holds only what the provider itself
/// said, and nobody can make one up in its name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignedOpening {
    /// What was signed.
    pub opening: Opening,
    /// The provider's secp256k1 public key, compressed SEC1.
    pub public_key: Vec<u8>,
    /// ECDSA signature `r ‖ s`.
    pub signature: Vec<u8>,
}

/// The signed part of a [`SignedOpening`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Opening {
    /// The request whose leaves were asked for.
    pub request_id: RequestId,
    /// The steps asked for.
    pub indices: Vec<u32>,
    /// The provider's answer.
    pub response: OpenLeavesResponse,
}

/// Domain tag of opening signatures.
const OPENING_DOMAIN: &[u8] = b"proofmesh/opening/v1";

impl Opening {
    /// Signs with the provider's node key.
    pub fn sign(
        self,
        key: &libp2p::identity::Keypair,
    ) -> Result<SignedOpening, crate::signing::SignatureError> {
        let parts = crate::signing::sign(key, OPENING_DOMAIN, &self)?;
        Ok(SignedOpening {
            opening: self,
            public_key: parts.public_key,
            signature: parts.signature,
        })
    }
}

impl SignedOpening {
    /// Checks the signature and returns the signer's peer id.
    pub fn verify(&self) -> Result<libp2p::PeerId, crate::signing::SignatureError> {
        crate::signing::verify(
            &self.public_key,
            &self.signature,
            OPENING_DOMAIN,
            &self.opening,
        )
    }
}

/// How long a referee ticket stays valid: the answer it covers starts streaming at once, and a
/// long answer on a busy CPU provider takes minutes.
pub const TICKET_LIFETIME: Duration = Duration::from_secs(15 * 60);

/// A gateway's permission for one referee job: which referee may do it, for which request, until
/// when. Referees take work only with a ticket signed by a gateway they accept, and bound the
/// work per signing gateway, so that peers nobody accepts cannot hold their contexts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefereeTicket {
    /// The referee the job is for (peer id bytes).
    pub referee: Vec<u8>,
    /// [`GenerateRequest::hash`] of the request to re-execute.
    pub request_hash: Digest32,
    /// Unix seconds after which the ticket is void.
    pub expires_unix: u64,
}

/// A [`RefereeTicket`] signed by the gateway's node key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedTicket {
    /// What was signed.
    pub ticket: RefereeTicket,
    /// The gateway's secp256k1 public key, compressed SEC1.
    pub public_key: Vec<u8>,
    /// ECDSA signature `r ‖ s`.
    pub signature: Vec<u8>,
}

/// Domain tag of ticket signatures.
const TICKET_DOMAIN: &[u8] = b"proofmesh/referee-ticket/v1";

impl RefereeTicket {
    /// Signs with the gateway's node key.
    pub fn sign(
        self,
        key: &libp2p::identity::Keypair,
    ) -> Result<SignedTicket, crate::signing::SignatureError> {
        let parts = crate::signing::sign(key, TICKET_DOMAIN, &self)?;
        Ok(SignedTicket {
            ticket: self,
            public_key: parts.public_key,
            signature: parts.signature,
        })
    }
}

impl SignedTicket {
    /// Checks the signature and returns the signing gateway's peer id.
    pub fn verify(&self) -> Result<libp2p::PeerId, crate::signing::SignatureError> {
        crate::signing::verify(
            &self.public_key,
            &self.signature,
            TICKET_DOMAIN,
            &self.ticket,
        )
    }
}

/// A provider's announcement that it is shutting down and takes no new requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leaving;

/// The acknowledgement of [`Leaving`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaveAck;

/// A capability query (empty: providers answer with everything they serve).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapsRequest;

/// One model a provider serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelCard {
    /// The model id clients use (`model` in OpenAI requests).
    pub name: String,
    /// SHA-256 of the GGUF file.
    pub digest: ModelDigest,
    /// Quantization, e.g. `Q4_1`.
    pub quantization: String,
    /// Context window per sequence, in tokens.
    pub context_size: u32,
    /// Sequences decoded concurrently.
    pub parallel: u32,
    /// `cpu` or `gpu`.
    pub device: String,
    /// Layers offloaded to a GPU.
    pub gpu_layers: u32,
    /// The engine's numerics class: two nodes with the same deterministic class compute
    /// bit-identical logits for the same tokens ([`crate::verify::Tier`]).
    #[serde(default)]
    pub numerics: String,
    /// Whether the provider re-executes other providers' answers on [`REFEREE_PROTOCOL`].
    #[serde(default)]
    pub referee: bool,
}

/// Everything a provider advertises.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Wire version of the provider's protocols.
    pub version: u16,
    /// Models served.
    pub models: Vec<ModelCard>,
    /// The stake the provider declares, signed; none declared when absent.
    #[serde(default)]
    pub stake: Option<SignedStake>,
}

/// A provider's declared stake: what it says it puts at risk, in micro-credits. A claim a
/// gateway records and slashes in its own ledger; nothing here proves the provider holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StakeDeclaration {
    /// The declaring provider (peer id bytes): a declaration is not transferable.
    pub provider: Vec<u8>,
    /// Micro-credits.
    pub stake: u64,
    /// When it was declared (unix milliseconds); a newer declaration replaces an older one.
    pub declared_ms: u64,
}

/// A [`StakeDeclaration`] signed by the provider's node key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedStake {
    /// What was signed.
    pub declaration: StakeDeclaration,
    /// The provider's secp256k1 public key, compressed SEC1.
    pub public_key: Vec<u8>,
    /// ECDSA signature `r ‖ s`.
    pub signature: Vec<u8>,
}

/// Domain tag of stake signatures.
const STAKE_DOMAIN: &[u8] = b"proofmesh/stake/v1";

/// Why a stake declaration is not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StakeError {
    /// The signature does not verify.
    #[error(transparent)]
    Signature(#[from] crate::signing::SignatureError),
    /// Signed by, or declared for, another peer than the one that sent it.
    #[error("the stake declaration is not this peer's")]
    NotTheSender,
    /// Dated more than [`STAKE_CLOCK_SKEW`] ahead of the receiver's clock.
    #[error("the stake declaration is dated in the future")]
    FromTheFuture,
}

/// How far ahead of a receiver's clock a stake declaration may be dated.
pub const STAKE_CLOCK_SKEW: Duration = Duration::from_secs(300);

impl StakeDeclaration {
    /// Signs with the provider's node key.
    pub fn sign(
        self,
        key: &libp2p::identity::Keypair,
    ) -> Result<SignedStake, crate::signing::SignatureError> {
        let parts = crate::signing::sign(key, STAKE_DOMAIN, &self)?;
        Ok(SignedStake {
            declaration: self,
            public_key: parts.public_key,
            signature: parts.signature,
        })
    }
}

impl SignedStake {
    /// Checks that `sender` (the peer the Noise handshake named) declared and signed it, and
    /// that it is not dated past `now_ms` plus [`STAKE_CLOCK_SKEW`].
    pub fn verify(&self, sender: &libp2p::PeerId, now_ms: u64) -> Result<(), StakeError> {
        let signer = crate::signing::verify(
            &self.public_key,
            &self.signature,
            STAKE_DOMAIN,
            &self.declaration,
        )?;
        if signer != *sender || self.declaration.provider != sender.to_bytes() {
            return Err(StakeError::NotTheSender);
        }
        let latest = now_ms.saturating_add(STAKE_CLOCK_SKEW.as_millis() as u64);
        if self.declaration.declared_ms > latest {
            return Err(StakeError::FromTheFuture);
        }
        Ok(())
    }
}

/// One frame from a gateway to a referee.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RefereeFrame {
    /// Re-execute the answer to this request. The referee is not told who is answering it.
    Begin {
        /// The request exactly as the provider got it (its hash binds the evidence).
        request: Box<GenerateRequest>,
        /// The gateway's permission for this job, checked before any work.
        ticket: Box<SignedTicket>,
    },
    /// The next claimed tokens, in order, starting at step `first_step`.
    Tokens {
        /// Step of the first token in this frame.
        first_step: u32,
        /// Claimed token ids.
        tokens: Vec<u32>,
    },
    /// Every claimed token was sent: report on these steps.
    Finish {
        /// Challenged steps, sorted and distinct, at most [`MAX_OPEN_INDICES`].
        indices: Vec<u32>,
    },
    /// Report on these further steps too (a borderline first round).
    Open {
        /// Steps, sorted and distinct, at most [`MAX_OPEN_INDICES`].
        indices: Vec<u32>,
    },
}

/// One frame from a referee to a gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RefereeReply {
    /// The job was taken; the referee's own tokenization of the prompt has this length.
    Accepted {
        /// Prompt length after the referee's chat template.
        prompt_tokens: u32,
        /// The referee's numerics class.
        numerics: String,
    },
    /// The signed evidence for the steps of the last `Finish` or `Open`.
    Evidence(Box<SignedEvidence>),
    /// The referee gave up.
    Error {
        /// What kind of failure.
        kind: RemoteErrorKind,
        /// A human-readable explanation.
        message: String,
    },
}

/// Failures reading or writing frames.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The peer announced a frame larger than allowed.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// The stream ended cleanly before a frame started.
    #[error("stream closed")]
    Closed,
    /// I/O failed, or the stream ended inside a frame.
    #[error("stream i/o failed")]
    Io {
        /// The cause.
        #[from]
        source: std::io::Error,
    },
    /// The bytes were not the expected CBOR message.
    #[error("malformed frame: {message}")]
    Malformed {
        /// The decoder's explanation.
        message: String,
    },
}

impl FrameError {
    /// Whether only a peer breaking the protocol causes it (an oversized or undecodable
    /// frame), as opposed to a stream that ended or failed. A newer honest peer never causes
    /// one: unknown fields decode (they are ignored), and a change older nodes cannot decode
    /// takes a new protocol name (`/proofmesh/generate/2`), which they never negotiate.
    pub fn is_violation(&self) -> bool {
        matches!(self, Self::TooLarge { .. } | Self::Malformed { .. })
    }
}

/// One frame as bytes: a big-endian `u32` length, then the CBOR value.
pub fn encode_frame<T: Serialize>(value: &T) -> Result<Vec<u8>, FrameError> {
    let mut bytes = vec![0u8; 4];
    ciborium::into_writer(value, &mut bytes).map_err(|e| FrameError::Malformed {
        message: e.to_string(),
    })?;
    let len = u32::try_from(bytes.len() - 4).map_err(|_| FrameError::TooLarge {
        len: bytes.len() - 4,
        max: u32::MAX as usize,
    })?;
    bytes[..4].copy_from_slice(&len.to_be_bytes());
    Ok(bytes)
}

/// Writes one length-prefixed CBOR frame and flushes.
pub async fn write_frame<W, T>(io: &mut W, value: &T) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    io.write_all(&encode_frame(value)?).await?;
    io.flush().await?;
    Ok(())
}

/// Reads one length-prefixed CBOR frame of at most `max` bytes.
pub async fn read_frame<R, T>(io: &mut R, max: usize) -> Result<T, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut len_bytes = [0u8; 4];
    let mut filled = 0;
    while filled < 4 {
        let n = io.read(&mut len_bytes[filled..]).await?;
        if n == 0 {
            return Err(if filled == 0 {
                FrameError::Closed
            } else {
                FrameError::Io {
                    source: std::io::ErrorKind::UnexpectedEof.into(),
                }
            });
        }
        filled += n;
    }
    let len = u32::from_be_bytes(len_bytes) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut bytes = vec![0u8; len];
    io.read_exact(&mut bytes).await?;
    ciborium::from_reader(bytes.as_slice()).map_err(|e| FrameError::Malformed {
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stake_declaration_counts_only_for_its_own_sender() {
        let key = libp2p::identity::Keypair::generate_secp256k1();
        let other = libp2p::identity::Keypair::generate_secp256k1();
        let me = key.public().to_peer_id();
        let declaration = |provider: &libp2p::PeerId, declared_ms| StakeDeclaration {
            provider: provider.to_bytes(),
            stake: 5_000_000,
            declared_ms,
        };
        let now = 1_000_000;
        let signed = declaration(&me, now).sign(&key).unwrap();
        assert_eq!(signed.verify(&me, now), Ok(()));
        // Relayed by another peer, it is not that peer's.
        let them = other.public().to_peer_id();
        assert_eq!(signed.verify(&them, now), Err(StakeError::NotTheSender));
        // Signed by one key for another peer.
        let forged = declaration(&them, now).sign(&key).unwrap();
        assert_eq!(forged.verify(&them, now), Err(StakeError::NotTheSender));
        assert_eq!(forged.verify(&me, now), Err(StakeError::NotTheSender));
        // A changed figure breaks the signature.
        let mut inflated = signed.clone();
        inflated.declaration.stake *= 10;
        assert!(matches!(
            inflated.verify(&me, now),
            Err(StakeError::Signature(_))
        ));
        // Dated too far ahead.
        let ahead = declaration(&me, now + 301_000).sign(&key).unwrap();
        assert_eq!(ahead.verify(&me, now), Err(StakeError::FromTheFuture));
    }

    fn request() -> GenerateRequest {
        GenerateRequest {
            version: GenerateRequest::VERSION,
            request_id: RequestId::from_bytes([1; 16]),
            model_digest: ModelDigest([2; 32]),
            messages: vec![ChatMessage {
                role: "user".into(),
                content: "hi".into(),
            }],
            sampler: SamplerParams::default(),
            max_tokens: 16,
            stop: vec![],
            trace: None,
            stream_leaves: false,
            tools: None,
            constraint: None,
            prompt: None,
        }
    }

    #[tokio::test]
    async fn frames_round_trip() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &request()).await.unwrap();
        let mut cursor = futures::io::Cursor::new(buf);
        let back: GenerateRequest = read_frame(&mut cursor, MAX_REQUEST_FRAME).await.unwrap();
        assert_eq!(back, request());
        let end: Result<GenerateRequest, _> = read_frame(&mut cursor, MAX_REQUEST_FRAME).await;
        assert!(matches!(end, Err(FrameError::Closed)));
    }

    #[tokio::test]
    async fn oversized_and_malformed_frames_are_refused() {
        let mut buf = Vec::new();
        buf.extend_from_slice(&(10_000_000u32).to_be_bytes());
        let mut cursor = futures::io::Cursor::new(buf);
        let r: Result<GenerateRequest, _> = read_frame(&mut cursor, 1024).await;
        assert!(matches!(r, Err(FrameError::TooLarge { .. })));

        let mut buf = Vec::new();
        buf.extend_from_slice(&3u32.to_be_bytes());
        buf.extend_from_slice(&[0xff, 0x00, 0x12]);
        let mut cursor = futures::io::Cursor::new(buf);
        let r: Result<GenerateRequest, _> = read_frame(&mut cursor, 1024).await;
        assert!(matches!(r, Err(FrameError::Malformed { .. })));

        let mut cursor = futures::io::Cursor::new(vec![0u8, 0]);
        let r: Result<GenerateRequest, _> = read_frame(&mut cursor, 1024).await;
        assert!(matches!(r, Err(FrameError::Io { .. })));
    }

    #[test]
    fn request_hash_covers_prompt_and_sampler() {
        let base = request().hash();
        let mut other = request();
        other.messages[0].content = "hello".into();
        assert_ne!(base, other.hash());
        let mut other = request();
        other.sampler.temperature = 0.5;
        assert_ne!(base, other.hash());
        let mut other = request();
        other.max_tokens = 17;
        assert_ne!(base, other.hash());
        let mut other = request();
        other.constraint = Some(Constraint::JsonObject);
        assert_ne!(base, other.hash());
        let mut schema = request();
        schema.constraint = Some(Constraint::JsonSchema(r#"{"type":"object"}"#.into()));
        assert_ne!(other.hash(), schema.hash());
        let mut tools = request();
        tools.tools = Some("[]".into());
        assert_ne!(base, tools.hash());
        assert_eq!(base, request().hash());
    }

    #[test]
    fn digest_parses_with_and_without_prefix() {
        let d = ModelDigest([0xab; 32]);
        assert_eq!(ModelDigest::parse(&d.to_string()), Some(d));
        assert_eq!(ModelDigest::parse(&hex::encode([0xab; 32])), Some(d));
        assert_eq!(ModelDigest::parse("sha256:zz"), None);
    }
}
