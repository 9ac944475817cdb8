//! `GET /v1/providers`: what this gateway knows of each provider: what it serves, its stake and
//! payments in the ledger, its record in the peer book, and its latency and load now.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use libp2p::PeerId;
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::ApiError;
use crate::ledger::Account;
use crate::registry::ProviderView;
use crate::state::AppState;

/// Providers listed at most (connected ones first, then those with an account).
pub const MAX_LISTED: usize = 1_000;

/// The providers this gateway knows.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProviderList {
    /// Always `list`.
    pub object: &'static str,
    /// Connected providers first, then others the ledger holds an account of.
    pub data: Vec<ProviderReport>,
}

/// One provider, as this gateway knows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProviderReport {
    /// Its peer id.
    pub id: String,
    /// Always `provider`.
    pub object: &'static str,
    /// Whether the gateway can route to it now (connected directly).
    pub connected: bool,
    /// What it advertises (a claim; each answer is checked against the digest it commits to).
    pub models: Vec<ProviderModel>,
    /// Its stake and payments in this gateway's ledger (micro-credits).
    pub ledger: LedgerReport,
    /// Its record in this gateway's peer book.
    pub reputation: Reputation,
    /// Its time to first token, moving average in ms, as this gateway measured it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    /// Requests it is serving for this gateway now.
    pub load: usize,
    /// The queue depth it reported when it last accepted a request (its claim; used only to
    /// route less to it).
    pub queue_reported: u32,
}

/// A model a provider advertises.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProviderModel {
    /// Its name as the provider gives it.
    pub name: String,
    /// `sha256:<hex>` of the GGUF file.
    pub digest: String,
    /// `cpu`, `cuda`, …
    pub device: String,
    /// Its numerics class.
    pub numerics: String,
}

/// A provider's money at this gateway, in micro-credits (µcr).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct LedgerReport {
    /// The stake it declared (signed by its key; a claim nothing backs without a payment rail).
    pub stake_declared: u64,
    /// Stake slashed for proven fraud.
    pub stake_slashed: u64,
    /// Declared less slashed.
    pub stake: u64,
    /// Paid to it: its balance.
    pub balance: u64,
    /// Held for `fraud` answers whose audit window is still open.
    pub held: u64,
    /// Forfeited (proven fraud, or leaves never opened).
    pub forfeited: u64,
    /// Answers paid.
    pub answers_paid: u64,
    /// Answers whose payment it forfeited.
    pub answers_forfeited: u64,
}

/// A provider's record in the peer book.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Reputation {
    /// Audits it passed.
    pub audits_passed: u32,
    /// Audits it failed.
    pub audits_failed: u32,
    /// Audits of released answers whose leaves it never opened.
    pub audits_withheld: u32,
    /// Whether it is on probation (audited more often).
    pub on_probation: bool,
    /// Benched (not routed to) until then (unix seconds), after a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub benched_until: Option<u64>,
    /// Whether it failed recently and is tried after the others.
    pub cooling_down: bool,
}

/// Every provider this gateway knows: connected ones, and those it holds an account of.
#[utoipa::path(get, path = "/v1/providers", tag = "providers",
    responses(
        (status = 200, description = "The providers, connected first", body = ProviderList),
        (status = 401, description = "`invalid_api_key`: the gateway requires API keys", body = crate::error::ErrorBody),
        (status = 500, description = "`state_unreadable`: the ledger could not be read", body = crate::error::ErrorBody),
    ))]
pub async fn list(State(state): State<AppState>) -> Result<Json<ProviderList>, ApiError> {
    let ledger = state.auditor.ledger().clone();
    let accounts = tokio::task::spawn_blocking(move || ledger.accounts())
        .await
        .map_err(|_| ApiError::state_unreadable())?
        .map_err(|e| {
            tracing::error!(error = %e, "cannot read the ledger");
            ApiError::state_unreadable()
        })?;
    let mut accounts: BTreeMap<PeerId, Account> = accounts.into_iter().collect();
    let mut connected = state.registry.providers();
    connected.sort_by_key(|p| p.peer);
    connected.truncate(MAX_LISTED);
    let mut data = Vec::new();
    for view in connected {
        let account = accounts.remove(&view.peer).unwrap_or_default();
        data.push(report(&state, view.peer, Some(&view), &account));
    }
    let room = MAX_LISTED.saturating_sub(data.len());
    for (peer, account) in accounts.into_iter().take(room) {
        data.push(report(&state, peer, None, &account));
    }
    Ok(Json(ProviderList {
        object: "list",
        data,
    }))
}

fn report(
    state: &AppState,
    peer: PeerId,
    view: Option<&ProviderView>,
    account: &Account,
) -> ProviderReport {
    let record = state.auditor.book().get(&peer);
    let probation = state.auditor.policy().probation_audits;
    ProviderReport {
        id: peer.to_string(),
        object: "provider",
        connected: view.is_some(),
        models: view
            .map(|v| {
                v.models
                    .iter()
                    .map(|m| ProviderModel {
                        name: m.name.clone(),
                        digest: m.digest.to_string(),
                        device: m.device.clone(),
                        numerics: m.numerics.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        ledger: LedgerReport {
            stake_declared: account.stake_declared,
            stake_slashed: account.slashed,
            stake: account.stake(),
            balance: account.paid,
            held: account.held,
            forfeited: account.forfeited,
            answers_paid: account.answers_paid,
            answers_forfeited: account.answers_forfeited,
        },
        reputation: Reputation {
            audits_passed: record.passed,
            audits_failed: record.failed,
            audits_withheld: record.withheld,
            on_probation: record.on_probation(probation),
            benched_until: record.benched().then_some(record.benched_until_ms / 1000),
            cooling_down: view.is_some_and(|v| v.cooling_down),
        },
        latency_ms: view.and_then(|v| v.latency_ms),
        load: view.map_or(0, |v| v.in_flight),
        queue_reported: view.map_or(0, |v| v.reported_queue),
    }
}
