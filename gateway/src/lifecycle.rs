//! Graceful shutdown: on SIGTERM the gateway stops being ready, refuses new completions, lets
//! running streams finish, and ends those still running at the drain deadline with an error
//! event, so the process can exit 0 within a bound.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Extra time after the drain deadline for streams to write their error event and close.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Where the gateway is in its life. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Lifecycle {
    draining: CancellationToken,
    deadline: CancellationToken,
}

impl Lifecycle {
    /// Starts draining: readiness fails and, after `timeout`, the deadline fires.
    pub fn begin_drain(&self, timeout: Duration) {
        if self.draining.is_cancelled() {
            return;
        }
        tracing::info!(
            timeout_secs = timeout.as_secs(),
            "draining: finishing running requests"
        );
        self.draining.cancel();
        let deadline = self.deadline.clone();
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            deadline.cancel();
        });
    }

    /// Whether a drain has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// Resolves when the drain deadline passes; running streams end then.
    pub async fn deadline(&self) {
        self.deadline.cancelled().await;
    }
}
