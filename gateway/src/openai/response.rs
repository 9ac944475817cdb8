//! Responses: the chat completion, its streaming chunks, and the model list.

use serde::Serialize;
use utoipa::ToSchema;

use super::logprobs::ChoiceLogprobs;
use super::tools::{DeltaToolCall, MessageToolCall};

/// What proofmesh adds to every answer: who served it, what it was bound to, how it was checked.
/// Sent as `x-proofmesh-*` headers, as `proofmesh` in the JSON body, and in the last SSE event.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProofmeshInfo {
    /// `none`, `merkle`, `fraud` or `consensus`.
    pub verification_mode: &'static str,
    /// The provider's peer id (also its commitment signing key).
    pub provider: String,
    /// `sha256:<hex>` of the GGUF that served the request.
    pub model_digest: String,
    /// Hex Merkle root over the step leaves.
    pub merkle_root: String,
    /// Number of committed steps.
    pub steps: u32,
    /// The step indices that were challenged and checked.
    pub challenged: Vec<u32>,
    /// `unaudited`, `passed`, `unrefereed` (exact checks only: no trusted referee could
    /// re-execute the answer; delivered only when the operator allows it), `inconclusive`,
    /// `failed:<reason>` (in error events of streams that were withheld), or `deferred`
    /// (`fraud` mode: released after the exact checks of its commitment, not audited yet; the
    /// verdict comes later at `GET /v1/audits/{audit_id}`), or `agreed` (`consensus` mode:
    /// every provider gave the same answer, so none was audited further).
    pub verdict: String,
    /// `fraud` mode: the id under which this answer's audit is kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit_id: Option<String>,
    /// `fraud` mode: when the audit window closes (unix seconds); an answer drawn for audit is
    /// judged before then.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit_window_closes_at: Option<u64>,
    /// Who re-executed the answer for the audit: a provider's peer id, or `local` for the
    /// gateway's own engine; absent when no referee took part.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub referee: Option<String>,
    /// What the statistical layer measured, when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit: Option<AuditStatistics>,
    /// The sampler seed used (random when the client gave none).
    pub seed: u64,
    /// Time spent on the audit after the last token, in milliseconds.
    pub audit_ms: u64,
    /// `consensus` mode: who else answered, and how the answers compared.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consensus: Option<ConsensusInfo>,
}

/// How the answers of a `consensus` request compared.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ConsensusInfo {
    /// Each provider asked, the one whose answer was returned first among them.
    pub providers: Vec<ConsensusMember>,
    /// Whether every answer was the same (then none was audited further).
    pub agreed: bool,
    /// The first step where the answers differed (challenged in every audit that followed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub divergence: Option<u32>,
}

/// One provider of a `consensus` request.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ConsensusMember {
    /// Its peer id.
    pub provider: String,
    /// Its answer's verdict: `agreed`, `passed`, `failed:<reason>`, `inconclusive`, ….
    pub verdict: String,
    /// Hex Merkle root of its answer.
    pub merkle_root: String,
}

/// The statistical audit of one answer: provider logits against the referee's.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AuditStatistics {
    /// `exact` (provider and referee share deterministic numerics: agreement must be bit for
    /// bit) or `tolerant` (limits above honest kernel noise).
    pub tier: &'static str,
    /// Challenged steps compared.
    pub compared: usize,
    /// Median per-step logit distance over the challenged steps.
    pub median_distance: f32,
    /// Largest per-step logit distance.
    pub max_distance: f32,
    /// Sum over the claimed tokens of their DiFR margin (under the referee's logits) beyond
    /// the tier's dead zone for kernel noise.
    pub excess_margin: f32,
    /// Largest margin.
    pub max_margin: f32,
    /// Bytes of evidence the audit moved between peers (openings and referee evidence, CBOR).
    pub evidence_bytes: usize,
}

impl AuditStatistics {
    /// The statistics of one audit and the evidence it moved.
    pub fn new(s: &proofmesh_shared::verify::Statistics, evidence_bytes: usize) -> Self {
        Self {
            tier: s.tier.as_str(),
            compared: s.compared,
            median_distance: s.median_distance,
            max_distance: s.max_distance,
            excess_margin: s.excess_margin,
            max_margin: s.max_margin,
            evidence_bytes,
        }
    }
}

/// Token counts.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct Usage {
    /// Prompt tokens after the chat template.
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
    /// Their sum.
    pub total_tokens: u32,
}

impl Usage {
    /// Usage from the two counts.
    pub fn new(prompt_tokens: u32, completion_tokens: u32) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
        }
    }
}

/// A non-streaming chat completion.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChatCompletion {
    /// `chatcmpl-<request id>`.
    pub id: String,
    /// `chat.completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The model id.
    pub model: String,
    /// Always one choice.
    pub choices: Vec<Choice>,
    /// Token counts.
    pub usage: Usage,
    /// Always null.
    pub system_fingerprint: Option<String>,
    /// Verification details.
    pub proofmesh: ProofmeshInfo,
}

/// One choice of a completion.
#[derive(Debug, Serialize, ToSchema)]
pub struct Choice {
    /// Always 0.
    pub index: u32,
    /// The assistant's message.
    pub message: AssistantMessage,
    /// `stop`, `length` or `tool_calls`.
    pub finish_reason: &'static str,
    /// With `logprobs: true`: each token's log-probability, read off the committed leaves.
    pub logprobs: Option<ChoiceLogprobs>,
}

/// The assistant's message.
#[derive(Debug, Serialize, ToSchema)]
pub struct AssistantMessage {
    /// `assistant`.
    pub role: &'static str,
    /// The generated text; null when the model called tools instead.
    #[schema(required = true)]
    pub content: Option<String>,
    /// The calls the model made (with `tools`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<MessageToolCall>>,
}

/// One SSE chunk.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChatCompletionChunk {
    /// Same id on every chunk of a stream.
    pub id: String,
    /// `chat.completion.chunk`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The model id.
    pub model: String,
    /// One choice, or none on the usage chunk.
    pub choices: Vec<ChunkChoice>,
    /// Only on the usage chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Only on the last event(s): verification details.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proofmesh: Option<ProofmeshInfo>,
}

/// A streamed choice.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChunkChoice {
    /// Always 0.
    pub index: u32,
    /// What is new.
    pub delta: Delta,
    /// Set on the last content chunk.
    pub finish_reason: Option<&'static str>,
    /// With `logprobs: true`: the log-probabilities of this chunk's tokens.
    pub logprobs: Option<ChoiceLogprobs>,
}

/// A streamed message delta.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct Delta {
    /// `assistant` on the first chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// New text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// The calls the model made (with `tools`), each whole in one delta.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<DeltaToolCall>>,
}

/// `GET /v1/models`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelList {
    /// `list`.
    pub object: &'static str,
    /// The models the mesh serves right now.
    pub data: Vec<ModelObject>,
}

/// One model.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelObject {
    /// The id to put in `model`.
    pub id: String,
    /// `model`.
    pub object: &'static str,
    /// Unix seconds (when the gateway first saw it).
    pub created: u64,
    /// `proofmesh`.
    pub owned_by: &'static str,
    /// Mesh details.
    pub proofmesh: ModelMeshInfo,
}

/// What the mesh knows about a model.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelMeshInfo {
    /// `sha256:<hex>` of the GGUF file.
    pub digest: String,
    /// Quantization, e.g. `Q4_1`.
    pub quantization: String,
    /// Providers serving it now.
    pub providers: usize,
    /// Smallest context window among them.
    pub context_size: u32,
    /// Devices they run on (`cpu`, `gpu`).
    pub devices: Vec<String>,
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
