//! The durable per-peer book: every audit record the gateway keeps about a peer, keyed to its
//! peer id in an embedded database (redb), so that reconnecting, announcing a departure or
//! restarting the gateway (even with `kill -9`) changes none of it.
//!
//! Records change only on verdicts: a provider's passed and failed audits (and, after a
//! failure, how long it is benched), a referee's confirmed and struck accusations. Each change
//! is one committed write transaction. The book is read far more often than written, so the
//! records are also kept in memory, filled from the database when it opens.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use libp2p::PeerId;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

/// Peer id bytes → CBOR of [`PeerRecord`].
const PEERS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("peers");

/// What the gateway knows about one peer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecord {
    /// When the gateway first recorded anything about it (unix seconds).
    pub first_seen: u64,
    /// Its answers that passed an audit.
    pub passed: u32,
    /// Its answers that failed one (proven, or confirmed by a second referee).
    pub failed: u32,
    /// Not routed to before this time (unix milliseconds; 0: never benched).
    pub benched_until_ms: u64,
    /// As a referee: accusations of its that another referee confirmed, and checks it passed.
    pub referee_confirmed: u32,
    /// As a referee: accusations of its that another referee refuted, or checks it failed.
    pub referee_strikes: u32,
    /// Audits in a row whose leaves it never opened (reset by a passed audit and by benching).
    #[serde(default)]
    pub unopened: u32,
    /// Audits of answers already released (`fraud`) whose leaves it never opened, however
    /// long it was asked: never reset, since a provider that knows which answers it faked
    /// could otherwise stay silent on just those.
    #[serde(default)]
    pub withheld: u32,
}

impl PeerRecord {
    /// Whether it is still on probation: fewer than `audits` passed, or any failed or withheld.
    pub fn on_probation(&self, audits: u32) -> bool {
        self.passed < audits || self.failed > 0 || self.withheld > 0
    }

    /// Benches it for `bench` from now (never shortening a bench it is already serving).
    fn bench_for(&mut self, bench: Duration) {
        let until = now_ms().saturating_add(bench.as_millis() as u64);
        self.benched_until_ms = self.benched_until_ms.max(until);
    }

    /// Whether it is benched right now.
    pub fn benched(&self) -> bool {
        self.benched_until_ms > now_ms()
    }

    /// Whether it earned the gateway's trust as a referee: `audits` answers passed, none
    /// failed, no strike as a referee.
    pub fn earned_referee(&self, audits: u32) -> bool {
        audits > 0
            && self.passed >= audits
            && self.failed == 0
            && self.withheld == 0
            && self.referee_strikes == 0
    }
}

/// Failures opening or writing the book.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BookError {
    /// The database could not be opened, read or written.
    #[error("peer book: {0}")]
    Database(#[from] redb::Error),
    /// A stored record does not decode.
    #[error("peer book: a record does not decode: {0}")]
    Decode(String),
    /// The directory for the database could not be made.
    #[error("peer book: {0}")]
    Io(#[from] std::io::Error),
}

/// The durable per-peer book. Cheap to clone.
#[derive(Clone)]
pub struct Book {
    db: Arc<Database>,
    records: Arc<Mutex<HashMap<PeerId, PeerRecord>>>,
}

impl std::fmt::Debug for Book {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Book")
            .field("peers", &self.lock().len())
            .finish_non_exhaustive()
    }
}

impl Book {
    /// Opens (or creates) the book at `path`.
    pub fn open(path: &Path) -> Result<Self, BookError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let db = Database::create(path).map_err(redb::Error::from)?;
        Self::with(db)
    }

    /// A book that lives in memory only (tests, and gateways told to keep no state).
    pub fn in_memory() -> Result<Self, BookError> {
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(redb::Error::from)?;
        Self::with(db)
    }

    fn with(db: Database) -> Result<Self, BookError> {
        let write = db.begin_write().map_err(redb::Error::from)?;
        write.open_table(PEERS).map_err(redb::Error::from)?;
        write.commit().map_err(redb::Error::from)?;
        let mut records = HashMap::new();
        let read = db.begin_read().map_err(redb::Error::from)?;
        let table = read.open_table(PEERS).map_err(redb::Error::from)?;
        for entry in table.iter().map_err(redb::Error::from)? {
            let (key, value) = entry.map_err(redb::Error::from)?;
            let Ok(peer) = PeerId::from_bytes(key.value()) else {
                continue;
            };
            let record: PeerRecord = ciborium::from_reader(value.value())
                .map_err(|e| BookError::Decode(e.to_string()))?;
            records.insert(peer, record);
        }
        Ok(Self {
            db: Arc::new(db),
            records: Arc::new(Mutex::new(records)),
        })
    }

    /// The database the book lives in (the audit log keeps its tables there too).
    pub fn database(&self) -> Arc<Database> {
        Arc::clone(&self.db)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, PeerRecord>> {
        self.records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `peer`'s record (empty for a peer never recorded).
    pub fn get(&self, peer: &PeerId) -> PeerRecord {
        self.lock().get(peer).copied().unwrap_or_default()
    }

    /// Number of peers recorded.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no peer is recorded.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Changes `peer`'s record and commits it before returning. A write that fails is logged
    /// and the change kept in memory: the gateway goes on serving with the record it has.
    fn update(&self, peer: &PeerId, change: impl FnOnce(&mut PeerRecord)) -> PeerRecord {
        let mut records = self.lock();
        let record = records.entry(*peer).or_insert_with(|| PeerRecord {
            first_seen: now_ms() / 1000,
            ..PeerRecord::default()
        });
        change(record);
        let record = *record;
        if let Err(e) = self.write(peer, &record) {
            tracing::error!(%peer, error = %e, "cannot write the peer book");
        }
        record
    }

    fn write(&self, peer: &PeerId, record: &PeerRecord) -> Result<(), BookError> {
        let mut bytes = Vec::new();
        ciborium::into_writer(record, &mut bytes).map_err(|e| BookError::Decode(e.to_string()))?;
        let write = self.db.begin_write().map_err(redb::Error::from)?;
        {
            let mut table = write.open_table(PEERS).map_err(redb::Error::from)?;
            table
                .insert(peer.to_bytes().as_slice(), bytes.as_slice())
                .map_err(redb::Error::from)?;
        }
        write.commit().map_err(redb::Error::from)?;
        Ok(())
    }

    /// Records an answer of `peer` that passed its audit.
    pub fn passed(&self, peer: &PeerId) -> PeerRecord {
        self.update(peer, |r| {
            r.passed = r.passed.saturating_add(1);
            r.unopened = 0;
        })
    }

    /// Records an audit whose leaves `peer` never opened. One such silence may be the
    /// network's doing and costs nothing; `limit` in a row (with no passed audit between) are
    /// the provider's, and bench it for `bench` (not a failure: nothing was proven).
    pub fn unopened(&self, peer: &PeerId, limit: u32, bench: Duration) -> PeerRecord {
        self.update(peer, |r| {
            r.unopened = r.unopened.saturating_add(1);
            if r.unopened >= limit {
                r.unopened = 0;
                r.bench_for(bench);
            }
        })
    }

    /// Records an answer of `peer` that failed its audit, and benches it for `bench`.
    pub fn failed(&self, peer: &PeerId, bench: Duration) -> PeerRecord {
        self.update(peer, |r| {
            r.failed = r.failed.saturating_add(1);
            r.bench_for(bench);
        })
    }

    /// Records a released answer of `peer` whose leaves it never opened, and benches it for
    /// `bench`: after release, silence is the cheat's way out of its audit, so it costs what a
    /// failure costs (without a proof: nothing signed shows it).
    pub fn withheld(&self, peer: &PeerId, bench: Duration) -> PeerRecord {
        self.update(peer, |r| {
            r.withheld = r.withheld.saturating_add(1);
            r.bench_for(bench);
        })
    }

    /// Records a check `referee` passed (an accusation another referee confirmed).
    pub fn referee_confirmed(&self, referee: &PeerId) -> PeerRecord {
        self.update(referee, |r| {
            r.referee_confirmed = r.referee_confirmed.saturating_add(1);
        })
    }

    /// Records a check `referee` failed (an accusation another referee refuted).
    pub fn referee_struck(&self, referee: &PeerId) -> PeerRecord {
        self.update(referee, |r| {
            r.referee_strikes = r.referee_strikes.saturating_add(1);
        })
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopening() {
        let dir = std::env::temp_dir().join(format!("proofmesh-book-{}", rand::random::<u64>()));
        let path = dir.join("book.redb");
        let (honest, cheat, liar) = (PeerId::random(), PeerId::random(), PeerId::random());
        {
            let book = Book::open(&path).unwrap();
            book.passed(&honest);
            book.passed(&honest);
            book.failed(&cheat, Duration::from_secs(600));
            book.referee_struck(&liar);
        }
        let book = Book::open(&path).unwrap();
        assert_eq!(book.len(), 3);
        assert_eq!(book.get(&honest).passed, 2);
        assert!(book.get(&cheat).benched());
        assert!(book.get(&cheat).on_probation(0));
        assert_eq!(book.get(&liar).referee_strikes, 1);
        assert!(!book.get(&PeerId::random()).benched());
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// The child of `records_survive_kill_9`: records a failure, says so, and waits to be
    /// killed.
    #[test]
    #[ignore = "run by records_survive_kill_9 in a child process"]
    fn child_records_then_waits() {
        let Ok(path) = std::env::var("PROOFMESH_BOOK_CHILD") else {
            return;
        };
        let book = Book::open(Path::new(&path)).unwrap();
        let peer: PeerId = std::env::var("PROOFMESH_BOOK_PEER")
            .unwrap()
            .parse()
            .unwrap();
        book.failed(&peer, Duration::from_secs(3600));
        book.passed(&peer);
        println!("RECORDED");
        std::thread::sleep(Duration::from_secs(60));
    }

    #[test]
    fn records_survive_kill_9() {
        use std::io::BufRead;
        let dir = std::env::temp_dir().join(format!("proofmesh-book-{}", rand::random::<u64>()));
        let path = dir.join("book.redb");
        let peer = PeerId::random();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "auditor::book::tests::child_records_then_waits",
                "--ignored",
                "--nocapture",
            ])
            .env("PROOFMESH_BOOK_CHILD", &path)
            .env("PROOFMESH_BOOK_PEER", peer.to_string())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let recorded = std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|line| line.contains("RECORDED"));
        assert!(recorded, "the child did not record");
        // SIGKILL: no destructor, no flush, no clean close.
        child.kill().unwrap();
        child.wait().unwrap();
        let book = Book::open(&path).unwrap();
        let record = book.get(&peer);
        assert_eq!((record.failed, record.passed), (1, 1));
        assert!(record.benched());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_provider_silent_when_challenged_is_benched_after_a_few_in_a_row() {
        let book = Book::in_memory().unwrap();
        let peer = PeerId::random();
        let bench = Duration::from_secs(60);
        assert!(!book.unopened(&peer, 3, bench).benched());
        assert!(!book.unopened(&peer, 3, bench).benched());
        book.passed(&peer);
        assert!(!book.unopened(&peer, 3, bench).benched());
        assert!(!book.unopened(&peer, 3, bench).benched());
        let record = book.unopened(&peer, 3, bench);
        assert!(record.benched());
        assert_eq!((record.failed, record.unopened), (0, 0));
    }

    #[test]
    fn earning_referee_trust_needs_a_clean_record() {
        let mut r = PeerRecord {
            passed: 5,
            ..PeerRecord::default()
        };
        assert!(r.earned_referee(5));
        assert!(!r.earned_referee(0));
        assert!(!r.earned_referee(6));
        r.referee_strikes = 1;
        assert!(!r.earned_referee(5));
    }
}
