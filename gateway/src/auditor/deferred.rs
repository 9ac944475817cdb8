//! Audits after release (`verification_mode: "fraud"`): the durable log of their records.
//!
//! A `fraud` answer is released at once, after the exact checks of its commitment, and given
//! an [`AuditId`]. Whether it is audited is drawn after its signed commitment arrived (the
//! provider cannot tell a `fraud` request from a `merkle` one, nor know which answers are
//! drawn), at the rate [`super::policy::FraudPolicy`] gives for the provider's record. The
//! record of each released answer lives in the same embedded database as the peer book, in
//! one committed write transaction per change, so an id handed to a client stays valid across
//! restarts, even `kill -9`. An audit that a restart interrupted is recorded so
//! (`interrupted`), never left `pending` for ever.
//!
//! The log is bounded: past [`MAX_RECORDS`] the oldest records go (ids begin with their time,
//! so the oldest come first).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use super::BookError;
use crate::ledger::{Hold, Ledger};

/// Audit id bytes → CBOR of [`AuditRecord`].
const AUDITS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("audits");
/// Ids of the audits still running.
const PENDING: TableDefinition<&[u8], ()> = TableDefinition::new("audits_pending");

/// Records kept at most; the oldest go first.
pub const MAX_RECORDS: u64 = 100_000;

/// An audit's id: 8 bytes of its creation time (unix milliseconds, big-endian, so ids sort by
/// age) and 8 random bytes. Written `aud_<32 hex digits>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AuditId(pub [u8; 16]);

impl AuditId {
    /// A new id created at `now_ms`.
    pub fn new(now_ms: u64) -> Self {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&now_ms.to_be_bytes());
        id[8..].copy_from_slice(&rand::random::<[u8; 8]>());
        Self(id)
    }
}

impl fmt::Display for AuditId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "aud_{}", hex::encode(self.0))
    }
}

/// Text that is not an audit id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an audit id is aud_ and 32 hex digits")]
pub struct BadAuditId;

impl FromStr for AuditId {
    type Err = BadAuditId;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let hex_part = text.strip_prefix("aud_").ok_or(BadAuditId)?;
        let mut id = [0u8; 16];
        hex::decode_to_slice(hex_part, &mut id).map_err(|_| BadAuditId)?;
        Ok(Self(id))
    }
}

/// Where an answer's audit stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditStatus {
    /// Drawn for an audit that has not ended yet.
    Pending,
    /// Not drawn for an audit: the answer stands on the provider's signed commitment.
    NotSampled,
    /// Audited, and the provider never opened its leaves, however long it was asked: held
    /// against it like a failure (benched), though nothing signed proves it.
    Withheld,
    /// Audited and passed.
    Passed,
    /// Audited and failed (see `reason`, and the proof).
    Failed,
    /// Audited, but the audit could not be completed (leaves never opened, referees that
    /// disagree); nobody was penalised.
    Inconclusive,
    /// No trusted referee could re-execute the answer in time.
    Unrefereed,
    /// The audit window closed before the audit ended; nobody was penalised.
    Expired,
    /// The gateway restarted while the audit ran; nobody was penalised.
    Interrupted,
}

impl AuditStatus {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::NotSampled => "not_sampled",
            Self::Withheld => "withheld",
            Self::Passed => "passed",
            Self::Failed => "failed",
            Self::Inconclusive => "inconclusive",
            Self::Unrefereed => "unrefereed",
            Self::Expired => "expired",
            Self::Interrupted => "interrupted",
        }
    }
}

/// What the gateway keeps about one released answer and its audit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Its id.
    pub id: AuditId,
    /// When the answer was released (unix milliseconds).
    pub created_ms: u64,
    /// When the audit window closes (unix milliseconds).
    pub window_closes_ms: u64,
    /// When the audit ended (unix milliseconds), if it has.
    pub decided_ms: Option<u64>,
    /// The provider's peer id.
    pub provider: String,
    /// `sha256:<hex>` of the model the answer was committed for.
    pub model_digest: String,
    /// The gateway's request id.
    pub request_id: String,
    /// Hex Merkle root of the committed step leaves.
    pub merkle_root: String,
    /// Steps committed.
    pub steps: u32,
    /// The id of the API key the request came with (derived from the key's hash, not its
    /// name), when keys are on: only that key may read the record.
    pub caller: Option<String>,
    /// Where the audit stands.
    pub status: AuditStatus,
    /// Why it failed, or expired.
    pub reason: Option<String>,
    /// Steps challenged.
    pub challenged: Vec<u32>,
    /// The referee whose evidence decided: a peer id, or `local`.
    pub referee: Option<String>,
    /// `exact` or `tolerant`.
    pub tier: Option<String>,
    /// The fraud proof of a failed audit, CBOR (`proofmesh-gateway check-proof` reads it).
    pub proof: Option<Vec<u8>>,
    /// The work the audit took, once it ran: milliseconds from its start to its verdict.
    #[serde(default)]
    pub audit_ms: Option<u64>,
    /// The work the audit took: bytes of openings and evidence it moved.
    #[serde(default)]
    pub evidence_bytes: Option<u64>,
}

/// The durable log of audits after release. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    db: Arc<Database>,
    limit: u64,
}

impl fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditLog").finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Opens the log in `db` (the peer book's database). Audits left pending by a previous
    /// run are marked `interrupted`; returns the log and how many were.
    pub fn open(db: Arc<Database>, now_ms: u64) -> Result<(Self, usize), BookError> {
        let write = db.begin_write().map_err(redb::Error::from)?;
        let interrupted = {
            let mut audits = write.open_table(AUDITS).map_err(redb::Error::from)?;
            let mut pending = write.open_table(PENDING).map_err(redb::Error::from)?;
            let mut ids = Vec::new();
            while let Some((id, ())) = pending
                .pop_first()
                .map_err(redb::Error::from)?
                .map(|(k, v)| (k.value().to_vec(), v.value()))
            {
                ids.push(id);
            }
            for id in &ids {
                let record = audits
                    .get(id.as_slice())
                    .map_err(redb::Error::from)?
                    .map(|v| decode(v.value()))
                    .transpose()?;
                if let Some(mut record) = record {
                    record.status = AuditStatus::Interrupted;
                    record.decided_ms = Some(now_ms);
                    audits
                        .insert(id.as_slice(), encode(&record)?.as_slice())
                        .map_err(redb::Error::from)?;
                }
            }
            ids.len()
        };
        write.commit().map_err(redb::Error::from)?;
        Ok((
            Self {
                db,
                limit: MAX_RECORDS,
            },
            interrupted,
        ))
    }

    /// Adds a record (pending or not), dropping the oldest past [`MAX_RECORDS`] (an oldest one
    /// still pending goes too: its audit then ends unrecorded), and holds the answer's payment
    /// in the same transaction: the two stand or fall together.
    pub fn insert(&self, record: &AuditRecord, hold: Option<&Hold>) -> Result<(), BookError> {
        let bytes = encode(record)?;
        let write = self.db.begin_write().map_err(redb::Error::from)?;
        if let Some(hold) = hold {
            Ledger::hold_in(&write, &record.id.0, hold)?;
        }
        {
            let mut audits = write.open_table(AUDITS).map_err(redb::Error::from)?;
            let mut pending = write.open_table(PENDING).map_err(redb::Error::from)?;
            audits
                .insert(record.id.0.as_slice(), bytes.as_slice())
                .map_err(redb::Error::from)?;
            if record.status == AuditStatus::Pending {
                pending
                    .insert(record.id.0.as_slice(), ())
                    .map_err(redb::Error::from)?;
            }
            while audits.len().map_err(redb::Error::from)? > self.limit {
                let oldest = audits
                    .pop_first()
                    .map_err(redb::Error::from)?
                    .map(|(k, _)| k.value().to_vec());
                let Some(oldest) = oldest else { break };
                pending
                    .remove(oldest.as_slice())
                    .map_err(redb::Error::from)?;
            }
        }
        write.commit().map_err(redb::Error::from)?;
        Ok(())
    }

    /// Ends a pending audit: applies `settle` to its record, in one transaction. Returns the
    /// record as written; `None` if it is gone (pruned) or no longer pending.
    pub fn settle(
        &self,
        id: AuditId,
        settle: impl FnOnce(&mut AuditRecord),
    ) -> Result<Option<AuditRecord>, BookError> {
        let write = self.db.begin_write().map_err(redb::Error::from)?;
        let settled = {
            let mut audits = write.open_table(AUDITS).map_err(redb::Error::from)?;
            let mut pending = write.open_table(PENDING).map_err(redb::Error::from)?;
            let was_pending = pending
                .remove(id.0.as_slice())
                .map_err(redb::Error::from)?
                .is_some();
            let record = audits
                .get(id.0.as_slice())
                .map_err(redb::Error::from)?
                .map(|v| decode(v.value()))
                .transpose()?;
            match record.filter(|_| was_pending) {
                Some(mut record) => {
                    settle(&mut record);
                    audits
                        .insert(id.0.as_slice(), encode(&record)?.as_slice())
                        .map_err(redb::Error::from)?;
                    Some(record)
                }
                None => None,
            }
        };
        write.commit().map_err(redb::Error::from)?;
        Ok(settled)
    }

    /// The record of `id`, if kept.
    pub fn get(&self, id: AuditId) -> Result<Option<AuditRecord>, BookError> {
        let read = self.db.begin_read().map_err(redb::Error::from)?;
        let audits = read.open_table(AUDITS).map_err(redb::Error::from)?;
        let value = audits.get(id.0.as_slice()).map_err(redb::Error::from)?;
        value.map(|v| decode(v.value())).transpose()
    }
}

fn encode(record: &AuditRecord) -> Result<Vec<u8>, BookError> {
    let mut bytes = Vec::new();
    ciborium::into_writer(record, &mut bytes).map_err(|e| BookError::Decode(e.to_string()))?;
    Ok(bytes)
}

fn decode(bytes: &[u8]) -> Result<AuditRecord, BookError> {
    ciborium::from_reader(bytes).map_err(|e| BookError::Decode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auditor::Book;

    fn record(now_ms: u64, status: AuditStatus) -> AuditRecord {
        AuditRecord {
            id: AuditId::new(now_ms),
            created_ms: now_ms,
            window_closes_ms: now_ms + 600_000,
            decided_ms: None,
            provider: "12D3KooW".into(),
            model_digest: "sha256:00".into(),
            request_id: "r".into(),
            merkle_root: "00".into(),
            steps: 3,
            caller: None,
            status,
            reason: None,
            challenged: Vec::new(),
            referee: None,
            tier: None,
            proof: None,
            audit_ms: None,
            evidence_bytes: None,
        }
    }

    #[test]
    fn ids_print_and_parse_and_sort_by_age() {
        let early = AuditId::new(1_000);
        let late = AuditId::new(2_000);
        assert_eq!(early.to_string().parse::<AuditId>(), Ok(early));
        assert!(early.0 < late.0);
        for bad in ["", "aud_", "aud_zz", "xyz_00112233445566778899aabbccddeeff"] {
            assert_eq!(bad.parse::<AuditId>(), Err(BadAuditId), "{bad}");
        }
        assert!(format!("{early}x").parse::<AuditId>().is_err());
    }

    #[test]
    fn a_pending_audit_settles_once() {
        let book = Book::in_memory().unwrap();
        let (log, _) = AuditLog::open(book.database(), 0).unwrap();
        let pending = record(1, AuditStatus::Pending);
        log.insert(&pending, None).unwrap();
        assert_eq!(log.get(pending.id).unwrap(), Some(pending.clone()));
        let settled = log
            .settle(pending.id, |r| r.status = AuditStatus::Passed)
            .unwrap()
            .unwrap();
        assert_eq!(settled.status, AuditStatus::Passed);
        assert_eq!(
            log.get(pending.id).unwrap().unwrap().status,
            AuditStatus::Passed
        );
        // Settled already: a second verdict changes nothing.
        assert!(
            log.settle(pending.id, |r| r.status = AuditStatus::Failed)
                .unwrap()
                .is_none()
        );
        assert_eq!(
            log.get(pending.id).unwrap().unwrap().status,
            AuditStatus::Passed
        );
        // An unsampled record is never pending.
        let unsampled = record(2, AuditStatus::NotSampled);
        log.insert(&unsampled, None).unwrap();
        assert!(log.settle(unsampled.id, |_| {}).unwrap().is_none());
        assert!(log.get(AuditId::new(3)).unwrap().is_none());
    }

    #[test]
    fn the_oldest_records_go_first_past_the_limit() {
        let book = Book::in_memory().unwrap();
        let (mut log, _) = AuditLog::open(book.database(), 0).unwrap();
        log.limit = 3;
        let records: Vec<AuditRecord> = (1..=5).map(|t| record(t, AuditStatus::Pending)).collect();
        for r in &records {
            log.insert(r, None).unwrap();
        }
        let kept: Vec<bool> = records
            .iter()
            .map(|r| log.get(r.id).unwrap().is_some())
            .collect();
        assert_eq!(kept, [false, false, true, true, true]);
        // A pruned pending audit is no longer pending.
        assert!(log.settle(records[0].id, |_| {}).unwrap().is_none());
    }

    #[test]
    fn a_restart_marks_running_audits_interrupted() {
        let dir = std::env::temp_dir().join(format!("proofmesh-audits-{}", rand::random::<u64>()));
        let path = dir.join("book.redb");
        let (running, done) = (
            record(1, AuditStatus::Pending),
            record(2, AuditStatus::Pending),
        );
        {
            let book = Book::open(&path).unwrap();
            let (log, _) = AuditLog::open(book.database(), 0).unwrap();
            log.insert(&running, None).unwrap();
            log.insert(&done, None).unwrap();
            log.settle(done.id, |r| r.status = AuditStatus::Passed)
                .unwrap();
        }
        let book = Book::open(&path).unwrap();
        let (log, interrupted) = AuditLog::open(book.database(), 5).unwrap();
        assert_eq!(interrupted, 1);
        let after = log.get(running.id).unwrap().unwrap();
        assert_eq!(
            (after.status, after.decided_ms),
            (AuditStatus::Interrupted, Some(5))
        );
        assert_eq!(
            log.get(done.id).unwrap().unwrap().status,
            AuditStatus::Passed
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
