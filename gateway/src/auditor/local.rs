//! The gateway's own engine as its referee (built with the `local-referee` feature): the
//! engine crate's [`Referee`] behind the auditor's [`LocalReferee`] seam.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use libp2p::PeerId;
use libp2p::identity::Keypair;
use proofmesh_engine::referee::{Referee, RefereeJob};
use proofmesh_engine::{Engine, EngineConfig};
use proofmesh_shared::protocol::{GenerateRequest, ModelDigest, RemoteErrorKind};
use proofmesh_shared::verify::SignedEvidence;

use super::session::{LocalJob, LocalReferee, SessionError};

/// How the gateway runs its own referee.
#[derive(Debug, Clone)]
pub struct EngineReferee {
    /// The GGUF file (the same one providers serve).
    pub model: PathBuf,
    /// CPU threads.
    pub threads: u32,
    /// Answers re-executed at once.
    pub slots: u32,
    /// Context per answer, in tokens.
    pub context_size: u32,
}

impl EngineReferee {
    /// Hashes the model file and starts the engine; the referee signs with `keypair`.
    pub async fn start(&self, keypair: &Keypair) -> Result<Arc<dyn LocalReferee>, String> {
        let path = self.model.clone();
        tracing::info!(model = %path.display(), "hashing the referee's model file");
        let digest =
            tokio::task::spawn_blocking(move || proofmesh_engine::model_file::file_digest(&path))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("{}: {e}", self.model.display()))?;
        let mut engine = EngineConfig::new(self.model.clone());
        engine.threads = self.threads;
        engine.context_size = self.context_size;
        engine.parallel = 1;
        engine.batch_size = 64;
        engine.referee_slots = self.slots;
        let engine = tokio::task::spawn_blocking(move || Engine::start(&engine))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        tracing::info!(%digest, numerics = %engine.info().numerics, slots = self.slots, "the gateway referees answers itself");
        Ok(Arc::new(Local {
            referee: Referee::new(engine, keypair.clone(), digest, u32::MAX),
            asker: keypair.public().to_peer_id(),
        }))
    }
}

#[derive(Debug)]
struct Local {
    referee: Referee,
    asker: PeerId,
}

impl LocalReferee for Local {
    fn peer_id(&self) -> PeerId {
        self.referee.peer_id()
    }

    fn digest(&self) -> ModelDigest {
        self.referee.digest()
    }

    fn numerics(&self) -> &str {
        self.referee.numerics()
    }

    fn has_capacity(&self) -> bool {
        self.referee.has_capacity()
    }

    fn begin(&self, request: GenerateRequest) -> Result<Box<dyn LocalJob>, SessionError> {
        self.referee
            .begin(request, self.asker)
            .map(|job| Box::new(Job(job)) as Box<dyn LocalJob>)
            .map_err(|e| match e.kind() {
                RemoteErrorKind::Overloaded => SessionError::Busy(e.to_string()),
                _ => SessionError::Refused(e.to_string()),
            })
    }
}

struct Job(RefereeJob);

#[async_trait]
impl LocalJob for Job {
    fn push(&mut self, first_step: u32, tokens: &[u32]) -> Result<(), String> {
        self.0.push(first_step, tokens).map_err(|e| e.to_string())
    }

    async fn finish(&mut self, indices: &[u32]) -> Result<SignedEvidence, String> {
        self.0.finish(indices).await.map_err(|e| e.to_string())
    }

    fn open(&self, indices: &[u32]) -> Result<SignedEvidence, String> {
        self.0.open(indices).map_err(|e| e.to_string())
    }
}
