//! The ledger: what each answer earns its provider, when it is paid, and what a proven fraud
//! costs. Local accounting in the peer book's database (redb), with no chain behind it: the
//! figures are this gateway's own, in micro-credits (µcr).
//!
//! - An answer's price is its tokens (prompt and completion) times its model's price per
//!   million tokens, in credits ([`Pricing`]): `tokens × price` µcr, charged to the caller.
//! - Answers checked before release (`none`, `merkle`) are paid when they are released.
//!   A `fraud` answer's payment is **held** while it is unaudited: paid when its audit passes
//!   ([`Ledger::release`]), or when its window closes with no fraud proven (not drawn, or an
//!   audit nobody could finish). A proven fraud by its provider ([`Ledger::forfeit_all`])
//!   forfeits every payment it still has held (refunded to their callers) and slashes its
//!   stake: a cheat is paid only for answers an audit showed honest. An answer whose leaves
//!   the provider never opened forfeits its own payment ([`Ledger::forfeit`]).
//! - A provider's stake is a claim: a figure it signs ([`proofmesh_shared::protocol::SignedStake`]),
//!   which this gateway cannot collect without a payment rail. It is recorded as declared, and
//!   what was slashed is kept apart and never restored by a new declaration, so a slashed
//!   provider's stake here is what it declared less what it lost.
//!
//! Every change is one committed write transaction, so a `kill -9` at any point loses no
//! committed change, and a payment is keyed by its id: a held one is paid or forfeited once
//! (the hold goes in the same transaction), a settled one never again.

use std::collections::HashMap;
use std::sync::Arc;

use libp2p::PeerId;
use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
    WriteTransaction,
};
use serde::{Deserialize, Serialize};

use proofmesh_shared::protocol::SignedStake;

use crate::auditor::BookError;

/// Peer id bytes → CBOR of [`Account`].
const ACCOUNTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("ledger_accounts");
/// Payment id → CBOR of [`Hold`]: payments not settled yet.
const HOLDS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("ledger_holds");
/// Payment id → CBOR of [`Settlement`]: payments made or forfeited (the newest
/// [`MAX_SETTLED`]).
const SETTLED: TableDefinition<&[u8], &[u8]> = TableDefinition::new("ledger_settled");
/// Caller id (UTF-8) → CBOR of [`CallerAccount`].
const CALLERS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("ledger_callers");

/// Accounts a stake declaration alone may open, at most (payments open them regardless: they
/// take real work).
pub const MAX_ACCOUNTS: u64 = 100_000;
/// Settlements kept at most; the oldest go first (ids begin with their time).
pub const MAX_SETTLED: u64 = 100_000;
/// Held payments paid in one transaction at most.
pub const PAYOUT_BATCH: usize = 10_000;
/// Payments of released answers waiting to be written, at most.
pub const PAY_QUEUE: usize = 4_096;
/// Payments written in one transaction, at most.
pub const PAY_BATCH: usize = 512;
/// How often held payments whose window closed are paid.
pub const PAYOUT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);
/// The caller account of requests made without an API key.
pub const ANONYMOUS: &str = "anonymous";

/// A payment's id: 8 bytes of its creation time (unix milliseconds, big-endian) and 8 random
/// bytes. A `fraud` answer's payment has its audit's id.
pub type PaymentId = [u8; 16];

/// Payments held, and settlements kept, each with its id.
pub type Entries = (Vec<(PaymentId, Hold)>, Vec<(PaymentId, Settlement)>);

/// An answer's payment, made at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payment {
    /// Its id.
    pub id: PaymentId,
    /// Who earned it.
    pub provider: PeerId,
    /// Who pays.
    pub caller: String,
    /// µcr.
    pub amount: u64,
}

/// Hands payments to the ledger's writer ([`Ledger::spawn_payer`]). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Payer {
    tx: tokio::sync::mpsc::Sender<Payment>,
}

impl Payer {
    /// Pays `provider` `amount` for an answer released after its checks, charged to `caller`
    /// (an API key's id; `None`: [`ANONYMOUS`]). Waits while the writer's queue is full.
    pub async fn pay(&self, provider: PeerId, caller: Option<String>, amount: u64) {
        let payment = Payment {
            id: new_id(),
            provider,
            caller: payer_of(caller),
            amount,
        };
        if self.tx.send(payment).await.is_err() {
            tracing::error!(%provider, "the ledger's writer is gone; payment not recorded");
        }
    }
}

/// Who pays for a request asked with `caller` (an API key's id): it, or [`ANONYMOUS`].
pub fn payer_of(caller: Option<String>) -> String {
    caller.unwrap_or_else(|| ANONYMOUS.into())
}

/// A new payment id, created now.
fn new_id() -> PaymentId {
    crate::auditor::AuditId::new(crate::auditor::book::now_ms()).0
}

/// What a provider has at this gateway (µcr).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// The stake it last declared (signed), µcr.
    pub stake_declared: u64,
    /// When it declared it (unix milliseconds, from the signed declaration).
    pub stake_declared_ms: u64,
    /// Stake slashed for proven fraud, in all.
    pub slashed: u64,
    /// The most its stake may stand at after its last slash, whatever it declares next.
    #[serde(default)]
    pub stake_cap: Option<u64>,
    /// Paid to it, in all: its balance.
    pub paid: u64,
    /// Held for answers still in their audit window.
    pub held: u64,
    /// Payments it forfeited.
    pub forfeited: u64,
    /// Answers paid.
    pub answers_paid: u64,
    /// Answers whose payment it forfeited.
    pub answers_forfeited: u64,
    /// When its last fraud was proven (unix milliseconds): an answer asked for before then and
    /// held after it (it was in flight) is forfeited as those held then were.
    #[serde(default)]
    pub convicted_ms: Option<u64>,
}

impl Account {
    /// The stake that stands: what it declared, but never more than what stood after its
    /// last slash (a larger declaration does not undo one).
    pub fn stake(&self) -> u64 {
        self.stake_cap
            .map_or(self.stake_declared, |cap| self.stake_declared.min(cap))
    }
}

/// What a caller (an API key's id, or [`ANONYMOUS`]) was charged (µcr).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallerAccount {
    /// Charged for answers, held ones included.
    pub charged: u64,
    /// Refunded: payments its providers forfeited.
    pub refunded: u64,
}

/// A payment held until its audit window closes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    /// The provider's peer id bytes.
    pub provider: Vec<u8>,
    /// Who pays.
    pub caller: String,
    /// µcr.
    pub amount: u64,
    /// When the window closes and it is paid (unix milliseconds).
    pub closes_ms: u64,
    /// When the answer was asked for (unix milliseconds).
    #[serde(default)]
    pub asked_ms: u64,
}

/// How a payment ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Paid to the provider.
    Paid,
    /// Forfeited by the provider, refunded to the caller.
    Forfeited,
    /// Never owed: the answer was withheld from the client after all (its audit, run before
    /// release, did not allow it); refunded to the caller, held against nobody.
    Voided,
}

/// A settled payment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settlement {
    /// The provider's peer id bytes.
    pub provider: Vec<u8>,
    /// Who paid (or was refunded).
    pub caller: String,
    /// µcr.
    pub amount: u64,
    /// Paid or forfeited.
    pub outcome: Outcome,
    /// When (unix milliseconds).
    pub settled_ms: u64,
}

/// Prices per model, in credits per million tokens (so µcr per token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pricing {
    /// For models without their own price.
    pub default: u64,
    /// By model name.
    pub models: HashMap<String, u64>,
}

impl Default for Pricing {
    fn default() -> Self {
        Self {
            default: 1,
            models: HashMap::new(),
        }
    }
}

impl Pricing {
    /// What `tokens` tokens of `model` cost, µcr.
    pub fn price(&self, model: &str, tokens: u64) -> u64 {
        let per_token = self.models.get(model).copied().unwrap_or(self.default);
        tokens.saturating_mul(per_token)
    }
}

/// How the ledger is set up.
#[derive(Debug, Clone, PartialEq)]
pub struct LedgerConfig {
    /// Prices.
    pub pricing: Pricing,
    /// Share of its stake a provider loses to a proven fraud (0 to 1).
    pub slash_share: f64,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        Self {
            pricing: Pricing::default(),
            slash_share: 0.5,
        }
    }
}

/// What one proven fraud cost a provider.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Forfeiture {
    /// Held payments it forfeited.
    pub answers: u64,
    /// Their sum, µcr.
    pub amount: u64,
    /// Stake slashed, µcr.
    pub slashed: u64,
}

/// The ledger. Cheap to clone.
#[derive(Clone)]
pub struct Ledger {
    db: Arc<Database>,
    config: Arc<LedgerConfig>,
    settled_limit: u64,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger").finish_non_exhaustive()
    }
}

type Result<T> = std::result::Result<T, BookError>;

fn db_err(e: impl Into<redb::Error>) -> BookError {
    BookError::Database(e.into())
}

impl Ledger {
    /// Opens the ledger's tables in `db` (the peer book's database).
    pub fn open(db: Arc<Database>, config: LedgerConfig) -> Result<Self> {
        let write = db.begin_write().map_err(db_err)?;
        write.open_table(ACCOUNTS).map_err(db_err)?;
        write.open_table(HOLDS).map_err(db_err)?;
        write.open_table(SETTLED).map_err(db_err)?;
        write.open_table(CALLERS).map_err(db_err)?;
        write.commit().map_err(db_err)?;
        Ok(Self {
            db,
            config: Arc::new(config),
            settled_limit: MAX_SETTLED,
        })
    }

    /// Prices.
    pub fn pricing(&self) -> &Pricing {
        &self.config.pricing
    }

    /// Pays `amount` to `provider` now, charged to `caller` (an answer checked before release).
    /// Paying an id twice pays once.
    pub fn pay(&self, id: PaymentId, provider: &PeerId, caller: &str, amount: u64) -> Result<()> {
        self.pay_all(&[Payment {
            id,
            provider: *provider,
            caller: caller.to_string(),
            amount,
        }])
    }

    /// Pays each of `payments` now (answers checked before release), in one transaction.
    /// An id paid before is not paid again.
    pub fn pay_all(&self, payments: &[Payment]) -> Result<()> {
        self.transaction(|write| {
            let now = crate::auditor::book::now_ms();
            for payment in payments {
                if settled(write, &payment.id)? || held(write, &payment.id)? {
                    continue;
                }
                charge(write, &payment.caller, payment.amount)?;
                let provider = payment.provider.to_bytes();
                let settlement = Settlement {
                    provider: provider.clone(),
                    caller: payment.caller.clone(),
                    amount: payment.amount,
                    outcome: Outcome::Paid,
                    settled_ms: now,
                };
                settle(write, &payment.id, &settlement, self.settled_limit)?;
                account(write, &provider, |a| {
                    a.paid = a.paid.saturating_add(payment.amount);
                    a.answers_paid += 1;
                })?;
            }
            Ok(())
        })
    }

    /// Starts the task that writes payments of answers released after their checks, in
    /// batches: one transaction per batch, not per answer. Its queue is bounded
    /// ([`PAY_QUEUE`]): when the disk falls behind, [`Payer::pay`] waits.
    pub fn spawn_payer(&self) -> (Payer, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Payment>(PAY_QUEUE);
        let ledger = self.clone();
        let writer = tokio::spawn(async move {
            let mut batch = Vec::with_capacity(PAY_BATCH);
            while rx.recv_many(&mut batch, PAY_BATCH).await > 0 {
                let (writer, payments) = (ledger.clone(), std::mem::take(&mut batch));
                match tokio::task::spawn_blocking(move || writer.pay_all(&payments)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::error!(error = %e, "cannot write the ledger"),
                    Err(e) => tracing::error!(error = %e, "the ledger's writer failed"),
                }
            }
        });
        (Payer { tx }, writer)
    }

    /// Holds a payment within `write` (the transaction that records the answer's audit, so
    /// that the two stand or fall together). Holding an id twice holds it once.
    ///
    /// An answer asked for before its provider's last proven fraud was in flight when the
    /// fraud's forfeiture took what was held: it is forfeited at once, as those were.
    pub fn hold_in(write: &WriteTransaction, id: &PaymentId, hold: &Hold) -> Result<()> {
        if settled(write, id)? || held(write, id)? {
            return Ok(());
        }
        charge(write, &hold.caller, hold.amount)?;
        let mut holds = write.open_table(HOLDS).map_err(db_err)?;
        holds
            .insert(id.as_slice(), encode(hold)?.as_slice())
            .map_err(db_err)?;
        drop(holds);
        let mut convicted = None;
        account(write, &hold.provider, |a| {
            a.held = a.held.saturating_add(hold.amount);
            convicted = a.convicted_ms;
        })?;
        if convicted.is_some_and(|at| hold.asked_ms <= at) {
            let now = crate::auditor::book::now_ms();
            end_hold(write, id, hold, Outcome::Forfeited, now, MAX_SETTLED)?;
        }
        Ok(())
    }

    /// Holds a payment, in a transaction of its own.
    pub fn hold(&self, id: PaymentId, hold: &Hold) -> Result<()> {
        self.transaction(|write| Self::hold_in(write, &id, hold))
    }

    /// Pays every held payment whose window closed by `now_ms` (at most [`PAYOUT_BATCH`] at a
    /// time); returns how many it paid.
    ///
    /// Payment ids begin with their creation time and windows are of one length, so the due
    /// ones come first: the scan stops at the first that is not due (after a restart with a
    /// longer window, a shorter one's payments wait for the longer ones before them: late,
    /// never early).
    pub fn release_due(&self, now_ms: u64) -> Result<usize> {
        let due: Vec<PaymentId> = {
            let read = self.db.begin_read().map_err(db_err)?;
            let holds = read.open_table(HOLDS).map_err(db_err)?;
            let mut due = Vec::new();
            for entry in holds.iter().map_err(db_err)? {
                let (key, value) = entry.map_err(db_err)?;
                let hold: Hold = decode(value.value())?;
                if hold.closes_ms > now_ms || due.len() >= PAYOUT_BATCH {
                    break;
                }
                if let Ok(id) = PaymentId::try_from(key.value()) {
                    due.push(id);
                }
            }
            due
        };
        if due.is_empty() {
            return Ok(0);
        }
        self.transaction(|write| {
            let mut paid = 0;
            for id in &due {
                // Ended meanwhile (a pass, a forfeiture) is ended.
                let hold = {
                    let holds = write.open_table(HOLDS).map_err(db_err)?;
                    let value = holds.get(id.as_slice()).map_err(db_err)?;
                    value.map(|v| decode::<Hold>(v.value())).transpose()?
                };
                if let Some(hold) = hold {
                    end_hold(write, id, &hold, Outcome::Paid, now_ms, self.settled_limit)?;
                    paid += 1;
                }
            }
            Ok(paid)
        })
    }

    /// Pays what comes due, every [`PAYOUT_INTERVAL`], until `stop` resolves (or its sender
    /// is dropped): then it lets go of the database, which a gateway restarted in the same
    /// process opens again.
    pub async fn pay_when_due(self, mut stop: tokio::sync::oneshot::Receiver<()>) {
        let mut tick = tokio::time::interval(PAYOUT_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = &mut stop => return,
            }
            let ledger = self.clone();
            let now = crate::auditor::book::now_ms();
            match tokio::task::spawn_blocking(move || ledger.release_due(now)).await {
                Ok(Ok(0)) => {}
                Ok(Ok(paid)) => tracing::debug!(paid, "held payments paid"),
                Ok(Err(e)) => tracing::error!(error = %e, "cannot write the ledger"),
                Err(e) => tracing::error!(error = %e, "the ledger's payout failed"),
            }
        }
    }

    /// Pays one held payment now (its answer's audit passed). Whether it was still held.
    pub fn release(&self, id: PaymentId) -> Result<bool> {
        self.end(id, Outcome::Paid)
    }

    /// Forfeits one held payment (an answer whose leaves its provider never opened): refunded
    /// to its caller. Whether it was still held.
    pub fn forfeit(&self, id: PaymentId) -> Result<bool> {
        self.end(id, Outcome::Forfeited)
    }

    /// Voids one held payment: its answer never reached the client. Whether it was still held.
    pub fn void(&self, id: PaymentId) -> Result<bool> {
        self.end(id, Outcome::Voided)
    }

    fn end(&self, id: PaymentId, outcome: Outcome) -> Result<bool> {
        self.transaction(|write| {
            let hold = {
                let holds = write.open_table(HOLDS).map_err(db_err)?;
                let value = holds.get(id.as_slice()).map_err(db_err)?;
                value.map(|v| decode::<Hold>(v.value())).transpose()?
            };
            let Some(hold) = hold else {
                return Ok(false);
            };
            let now = crate::auditor::book::now_ms();
            end_hold(write, &id, &hold, outcome, now, self.settled_limit)?;
            Ok(true)
        })
    }

    /// A fraud by `provider` was proven: every payment it has held is forfeited (refunded to
    /// the callers) and its stake slashed by the configured share, in one transaction.
    pub fn forfeit_all(&self, provider: &PeerId) -> Result<Forfeiture> {
        let key = provider.to_bytes();
        self.transaction(|write| {
            let mine: Vec<(PaymentId, Hold)> = {
                let holds = write.open_table(HOLDS).map_err(db_err)?;
                let mut mine = Vec::new();
                for entry in holds.iter().map_err(db_err)? {
                    let (id, value) = entry.map_err(db_err)?;
                    let hold: Hold = decode(value.value())?;
                    if hold.provider == key
                        && let Ok(id) = PaymentId::try_from(id.value())
                    {
                        mine.push((id, hold));
                    }
                }
                mine
            };
            let now = crate::auditor::book::now_ms();
            let mut forfeiture = Forfeiture::default();
            for (id, hold) in &mine {
                end_hold(write, id, hold, Outcome::Forfeited, now, self.settled_limit)?;
                forfeiture.answers += 1;
                forfeiture.amount = forfeiture.amount.saturating_add(hold.amount);
            }
            let share = self.config.slash_share.clamp(0.0, 1.0);
            account(write, &key, |a| {
                let standing = a.stake();
                let cut = (standing as f64 * share).round() as u64;
                a.slashed = a.slashed.saturating_add(cut);
                a.stake_cap = Some(standing - cut.min(standing));
                a.convicted_ms = Some(now);
                forfeiture.slashed = cut;
            })?;
            Ok(forfeiture)
        })
    }

    /// Takes the stake declaration `sender` (named by the Noise handshake) sent, once its
    /// signature shows it is `sender`'s own and it is newer than the one recorded. Whether it
    /// was recorded; a declaration that does not check out is logged and dropped.
    pub fn take_declaration(&self, sender: &PeerId, signed: &SignedStake) -> Result<bool> {
        if let Err(e) = signed.verify(sender, crate::auditor::book::now_ms()) {
            tracing::warn!(peer = %sender, error = %e, "stake declaration rejected");
            return Ok(false);
        }
        let declaration = &signed.declaration;
        let known = self.account(sender)?;
        if declaration.declared_ms <= known.stake_declared_ms {
            return Ok(false);
        }
        // Identities are free: a declaration alone opens no account past the cap.
        if known == Account::default() && self.account_count()? >= MAX_ACCOUNTS {
            tracing::warn!(peer = %sender, "stake declaration not recorded: the ledger holds as many accounts as it may");
            return Ok(false);
        }
        let recorded = self.declare_stake(sender, declaration.stake, declaration.declared_ms)?;
        if recorded {
            tracing::info!(peer = %sender, stake = declaration.stake, "stake declared");
        }
        Ok(recorded)
    }

    /// Records `provider`'s declared stake (its signature already checked), unless it is
    /// older than the one recorded. Whether it was recorded.
    pub fn declare_stake(&self, provider: &PeerId, stake: u64, declared_ms: u64) -> Result<bool> {
        self.transaction(|write| {
            let mut newer = false;
            account(write, &provider.to_bytes(), |a| {
                if declared_ms > a.stake_declared_ms {
                    a.stake_declared = stake;
                    a.stake_declared_ms = declared_ms;
                    newer = true;
                }
            })?;
            Ok(newer)
        })
    }

    /// `provider`'s account (empty if it has none).
    pub fn account(&self, provider: &PeerId) -> Result<Account> {
        self.read_one(ACCOUNTS, &provider.to_bytes())
    }

    /// Number of provider accounts.
    pub fn account_count(&self) -> Result<u64> {
        let read = self.db.begin_read().map_err(db_err)?;
        let accounts = read.open_table(ACCOUNTS).map_err(db_err)?;
        accounts.len().map_err(db_err)
    }

    /// Every provider account.
    pub fn accounts(&self) -> Result<Vec<(PeerId, Account)>> {
        let read = self.db.begin_read().map_err(db_err)?;
        let accounts = read.open_table(ACCOUNTS).map_err(db_err)?;
        let mut all = Vec::new();
        for entry in accounts.iter().map_err(db_err)? {
            let (key, value) = entry.map_err(db_err)?;
            if let Ok(peer) = PeerId::from_bytes(key.value()) {
                all.push((peer, decode(value.value())?));
            }
        }
        Ok(all)
    }

    /// A caller's account (empty if it has none).
    pub fn caller(&self, caller: &str) -> Result<CallerAccount> {
        self.read_one(CALLERS, caller.as_bytes())
    }

    /// The record under `key` in `table` (a default one if none).
    fn read_one<T: Default + serde::de::DeserializeOwned>(
        &self,
        table: TableDefinition<&[u8], &[u8]>,
        key: &[u8],
    ) -> Result<T> {
        let read = self.db.begin_read().map_err(db_err)?;
        let table = read.open_table(table).map_err(db_err)?;
        let value = table.get(key).map_err(db_err)?;
        Ok(value
            .map(|v| decode(v.value()))
            .transpose()?
            .unwrap_or_default())
    }

    /// Every payment still held, and every settlement kept (for checks and tests).
    pub fn entries(&self) -> Result<Entries> {
        let read = self.db.begin_read().map_err(db_err)?;
        let holds = read.open_table(HOLDS).map_err(db_err)?;
        let settled = read.open_table(SETTLED).map_err(db_err)?;
        let mut held = Vec::new();
        for entry in holds.iter().map_err(db_err)? {
            let (key, value) = entry.map_err(db_err)?;
            if let Ok(id) = PaymentId::try_from(key.value()) {
                held.push((id, decode(value.value())?));
            }
        }
        let mut done = Vec::new();
        for entry in settled.iter().map_err(db_err)? {
            let (key, value) = entry.map_err(db_err)?;
            if let Ok(id) = PaymentId::try_from(key.value()) {
                done.push((id, decode(value.value())?));
            }
        }
        Ok((held, done))
    }

    /// Checks the books balance: no payment both held and settled, every provider's paid,
    /// forfeited and held the sums of its entries, and the callers charged what the entries
    /// hold in all. Returns how many payments are held and settled. Meaningful while every
    /// settlement is still kept (fewer than [`MAX_SETTLED`]): for tests and checks after a
    /// crash, not for a ledger that has dropped its oldest.
    pub fn check_totals(&self) -> std::result::Result<(usize, usize), String> {
        let (held, settled) = self.entries().map_err(|e| e.to_string())?;
        let held_ids: std::collections::HashSet<&PaymentId> = held.iter().map(|(i, _)| i).collect();
        if let Some((id, _)) = settled.iter().find(|(i, _)| held_ids.contains(i)) {
            return Err(format!("payment {} held and settled", hex::encode(id)));
        }
        for (provider, account) in self.accounts().map_err(|e| e.to_string())? {
            let key = provider.to_bytes();
            let sum = |outcome| -> u64 {
                settled
                    .iter()
                    .filter(|(_, s)| s.provider == key && s.outcome == outcome)
                    .map(|(_, s)| s.amount)
                    .sum()
            };
            let holding: u64 = held
                .iter()
                .filter(|(_, h)| h.provider == key)
                .map(|(_, h)| h.amount)
                .sum();
            let entries = (sum(Outcome::Paid), sum(Outcome::Forfeited), holding);
            if (account.paid, account.forfeited, account.held) != entries {
                return Err(format!(
                    "{provider}: paid, forfeited, held {:?}, entries {entries:?}",
                    (account.paid, account.forfeited, account.held)
                ));
            }
        }
        let entries: u64 = held.iter().map(|(_, h)| h.amount).sum::<u64>()
            + settled.iter().map(|(_, s)| s.amount).sum::<u64>();
        let charged = self.charged().map_err(|e| e.to_string())?;
        if charged != entries {
            return Err(format!("callers charged {charged}, entries {entries}"));
        }
        Ok((held.len(), settled.len()))
    }

    /// What every caller was charged, in all.
    fn charged(&self) -> Result<u64> {
        let read = self.db.begin_read().map_err(db_err)?;
        let callers = read.open_table(CALLERS).map_err(db_err)?;
        let mut total = 0u64;
        for entry in callers.iter().map_err(db_err)? {
            let (_, value) = entry.map_err(db_err)?;
            let caller: CallerAccount = decode(value.value())?;
            total = total.saturating_add(caller.charged);
        }
        Ok(total)
    }

    /// Runs `change` in one write transaction and commits it.
    fn transaction<T>(&self, change: impl FnOnce(&WriteTransaction) -> Result<T>) -> Result<T> {
        let write = self.db.begin_write().map_err(db_err)?;
        let value = change(&write)?;
        write.commit().map_err(db_err)?;
        Ok(value)
    }

    #[cfg(test)]
    fn with_settled_limit(mut self, limit: u64) -> Self {
        self.settled_limit = limit;
        self
    }
}

/// Ends a hold: the provider is paid, or forfeits it to the caller (settlements past `limit`
/// drop the oldest).
fn end_hold(
    write: &WriteTransaction,
    id: &PaymentId,
    hold: &Hold,
    outcome: Outcome,
    now_ms: u64,
    limit: u64,
) -> Result<()> {
    write
        .open_table(HOLDS)
        .map_err(db_err)?
        .remove(id.as_slice())
        .map_err(db_err)?;
    let settlement = Settlement {
        provider: hold.provider.clone(),
        caller: hold.caller.clone(),
        amount: hold.amount,
        outcome,
        settled_ms: now_ms,
    };
    settle(write, id, &settlement, limit)?;
    if outcome != Outcome::Paid {
        caller_account(write, &hold.caller, |c| {
            c.refunded = c.refunded.saturating_add(hold.amount);
        })?;
    }
    account(write, &hold.provider, |a| {
        a.held = a.held.saturating_sub(hold.amount);
        match outcome {
            Outcome::Paid => {
                a.paid = a.paid.saturating_add(hold.amount);
                a.answers_paid += 1;
            }
            Outcome::Forfeited => {
                a.forfeited = a.forfeited.saturating_add(hold.amount);
                a.answers_forfeited += 1;
            }
            Outcome::Voided => {}
        }
    })
}

fn settled(write: &WriteTransaction, id: &PaymentId) -> Result<bool> {
    let table = write.open_table(SETTLED).map_err(db_err)?;
    Ok(table.get(id.as_slice()).map_err(db_err)?.is_some())
}

fn held(write: &WriteTransaction, id: &PaymentId) -> Result<bool> {
    let table = write.open_table(HOLDS).map_err(db_err)?;
    Ok(table.get(id.as_slice()).map_err(db_err)?.is_some())
}

/// Records a settlement, dropping the oldest past `limit`.
fn settle(
    write: &WriteTransaction,
    id: &PaymentId,
    settlement: &Settlement,
    limit: u64,
) -> Result<()> {
    let mut table = write.open_table(SETTLED).map_err(db_err)?;
    table
        .insert(id.as_slice(), encode(settlement)?.as_slice())
        .map_err(db_err)?;
    while table.len().map_err(db_err)? > limit {
        if table.pop_first().map_err(db_err)?.is_none() {
            break;
        }
    }
    Ok(())
}

fn charge(write: &WriteTransaction, caller: &str, amount: u64) -> Result<()> {
    caller_account(write, caller, |c| {
        c.charged = c.charged.saturating_add(amount)
    })
}

fn account(write: &WriteTransaction, key: &[u8], change: impl FnOnce(&mut Account)) -> Result<()> {
    update(write, ACCOUNTS, key, change)
}

fn caller_account(
    write: &WriteTransaction,
    caller: &str,
    change: impl FnOnce(&mut CallerAccount),
) -> Result<()> {
    update(write, CALLERS, caller.as_bytes(), change)
}

/// Applies `change` to the record under `key` in `table` (a default one if none).
fn update<T: Default + Serialize + serde::de::DeserializeOwned>(
    write: &WriteTransaction,
    table: TableDefinition<&[u8], &[u8]>,
    key: &[u8],
    change: impl FnOnce(&mut T),
) -> Result<()> {
    let mut table = write.open_table(table).map_err(db_err)?;
    let mut record: T = table
        .get(key)
        .map_err(db_err)?
        .map(|v| decode(v.value()))
        .transpose()?
        .unwrap_or_default();
    change(&mut record);
    table
        .insert(key, encode(&record)?.as_slice())
        .map_err(db_err)?;
    Ok(())
}

fn encode(value: &impl Serialize) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    ciborium::into_writer(value, &mut bytes).map_err(|e| BookError::Decode(e.to_string()))?;
    Ok(bytes)
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    ciborium::from_reader(bytes).map_err(|e| BookError::Decode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auditor::Book;

    fn ledger() -> Ledger {
        let book = Book::in_memory().unwrap();
        Ledger::open(book.database(), LedgerConfig::default()).unwrap()
    }

    fn id(n: u64) -> PaymentId {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&n.to_be_bytes());
        id
    }

    fn hold(provider: &PeerId, amount: u64, closes_ms: u64) -> Hold {
        Hold {
            provider: provider.to_bytes(),
            caller: ANONYMOUS.into(),
            amount,
            closes_ms,
            asked_ms: crate::auditor::book::now_ms(),
        }
    }

    #[test]
    fn a_price_is_tokens_times_the_models_price() {
        let mut pricing = Pricing::default();
        pricing.models.insert("big".into(), 30);
        assert_eq!(pricing.price("small", 100), 100);
        assert_eq!(pricing.price("big", 100), 3_000);
        assert_eq!(pricing.price("big", u64::MAX), u64::MAX);
    }

    #[test]
    fn a_held_payment_is_paid_once_when_its_window_closes() {
        let ledger = ledger();
        let provider = PeerId::random();
        ledger.hold(id(1), &hold(&provider, 50, 1_000)).unwrap();
        ledger.hold(id(1), &hold(&provider, 50, 1_000)).unwrap();
        assert_eq!(ledger.account(&provider).unwrap().held, 50);
        assert_eq!(ledger.release_due(999).unwrap(), 0);
        assert_eq!(ledger.release_due(1_000).unwrap(), 1);
        assert_eq!(ledger.release_due(5_000).unwrap(), 0);
        // Neither a second hold nor a payment of a settled id pays again.
        ledger.hold(id(1), &hold(&provider, 50, 1_000)).unwrap();
        ledger.pay(id(1), &provider, ANONYMOUS, 50).unwrap();
        assert_eq!(ledger.release_due(5_000).unwrap(), 0);
        let account = ledger.account(&provider).unwrap();
        assert_eq!(
            (account.paid, account.held, account.answers_paid),
            (50, 0, 1)
        );
        assert_eq!(ledger.caller(ANONYMOUS).unwrap().charged, 50);
    }

    #[test]
    fn a_proven_fraud_forfeits_what_is_held_and_slashes_the_stake() {
        let ledger = ledger();
        let (cheat, honest) = (PeerId::random(), PeerId::random());
        assert!(ledger.declare_stake(&cheat, 1_000, 10).unwrap());
        assert!(
            !ledger.declare_stake(&cheat, 9_999, 5).unwrap(),
            "an older declaration"
        );
        ledger.pay(id(1), &cheat, "key", 7).unwrap();
        ledger.hold(id(2), &hold(&cheat, 10, 1_000)).unwrap();
        ledger.hold(id(3), &hold(&cheat, 20, 2_000)).unwrap();
        ledger.hold(id(4), &hold(&honest, 30, 1_000)).unwrap();
        let forfeiture = ledger.forfeit_all(&cheat).unwrap();
        assert_eq!(
            forfeiture,
            Forfeiture {
                answers: 2,
                amount: 30,
                slashed: 500
            }
        );
        assert_eq!(
            ledger.release_due(u64::MAX).unwrap(),
            1,
            "only the honest one"
        );
        let cheat_account = ledger.account(&cheat).unwrap();
        assert_eq!(
            (
                cheat_account.paid,
                cheat_account.held,
                cheat_account.forfeited
            ),
            (7, 0, 30)
        );
        assert_eq!(cheat_account.stake(), 500);
        assert_eq!(ledger.account(&honest).unwrap().paid, 30);
        assert_eq!(ledger.caller(ANONYMOUS).unwrap().refunded, 30);
        // A new, larger declaration does not undo the slash.
        ledger.declare_stake(&cheat, 1_500, 20).unwrap();
        assert_eq!(ledger.account(&cheat).unwrap().stake(), 500);
        assert_eq!(ledger.forfeit_all(&cheat).unwrap().slashed, 250);
        assert_eq!(ledger.account(&cheat).unwrap().stake(), 250);
        // A smaller one lowers it.
        ledger.declare_stake(&cheat, 100, 30).unwrap();
        assert_eq!(ledger.account(&cheat).unwrap().stake(), 100);
    }

    #[test]
    fn a_declaration_dated_before_a_conviction_does_not_raise_the_stake() {
        // A declaration's time is the provider's claim (only one from the future is refused):
        // a convicted cheat may date a larger one between its last declaration and its
        // conviction, as if it had been in flight. It stands capped all the same.
        let ledger = ledger();
        let cheat = PeerId::random();
        let first = crate::auditor::book::now_ms() - 10_000;
        ledger.declare_stake(&cheat, 1_000, first).unwrap();
        assert_eq!(ledger.forfeit_all(&cheat).unwrap().slashed, 500);
        assert!(ledger.declare_stake(&cheat, 1_000_000, first + 1).unwrap());
        let account = ledger.account(&cheat).unwrap();
        assert_eq!((account.stake(), account.slashed), (500, 500));
        // Convicted before any declaration was recorded: nothing was known to slash, and
        // nothing stands, whatever it declares later and whenever it says it signed.
        let other = PeerId::random();
        assert_eq!(ledger.forfeit_all(&other).unwrap().slashed, 0);
        assert!(ledger.declare_stake(&other, 1_000, first).unwrap());
        assert_eq!(ledger.account(&other).unwrap().stake(), 0);
    }

    #[test]
    fn an_answer_in_flight_when_fraud_is_proven_is_forfeited_when_held() {
        let ledger = ledger();
        let cheat = PeerId::random();
        let asked = crate::auditor::book::now_ms() - 1;
        ledger.forfeit_all(&cheat).unwrap();
        let convicted = ledger.account(&cheat).unwrap().convicted_ms.unwrap();
        // Asked for after it (the bench over, say): held as any other.
        let later = Hold {
            asked_ms: convicted + 1,
            ..hold(&cheat, 20, 1_000)
        };
        ledger.hold(id(2), &later).unwrap();
        // Asked for before the conviction, finished after it: the forfeiture takes it too,
        // and what else is held stays held.
        let in_flight = Hold {
            asked_ms: asked,
            ..hold(&cheat, 10, 1_000)
        };
        ledger.hold(id(1), &in_flight).unwrap();
        let account = ledger.account(&cheat).unwrap();
        assert_eq!(
            (account.held, account.forfeited, account.answers_forfeited),
            (20, 10, 1)
        );
        assert_eq!(ledger.caller(ANONYMOUS).unwrap().refunded, 10);
        assert_eq!(ledger.release_due(u64::MAX).unwrap(), 1);
        assert_eq!(ledger.account(&cheat).unwrap().paid, 20);
    }

    #[test]
    fn a_withheld_answer_forfeits_its_own_payment() {
        let ledger = ledger();
        let provider = PeerId::random();
        ledger.hold(id(1), &hold(&provider, 10, 1_000)).unwrap();
        ledger.hold(id(2), &hold(&provider, 20, 1_000)).unwrap();
        ledger.hold(id(3), &hold(&provider, 40, 1_000)).unwrap();
        ledger.hold(id(4), &hold(&provider, 80, 1_000)).unwrap();
        assert!(ledger.forfeit(id(1)).unwrap());
        assert!(!ledger.forfeit(id(1)).unwrap());
        // An answer withheld from the client after all is owed by nobody.
        assert!(ledger.void(id(4)).unwrap());
        assert!(!ledger.release(id(4)).unwrap());
        // A passed audit pays at once, once.
        assert!(ledger.release(id(3)).unwrap());
        assert!(!ledger.release(id(3)).unwrap());
        assert!(!ledger.release(id(1)).unwrap());
        ledger.release_due(1_000).unwrap();
        let account = ledger.account(&provider).unwrap();
        assert_eq!((account.paid, account.forfeited, account.held), (60, 10, 0));
        assert_eq!(account.answers_forfeited, 1);
        assert_eq!(ledger.caller(ANONYMOUS).unwrap().refunded, 90);
    }

    #[test]
    fn the_oldest_settlements_go_past_the_limit() {
        let ledger = ledger().with_settled_limit(3);
        let provider = PeerId::random();
        for n in 0..5 {
            ledger.pay(id(n), &provider, ANONYMOUS, 1).unwrap();
        }
        let (_, settled) = ledger.entries().unwrap();
        let kept: Vec<PaymentId> = settled.iter().map(|(id, _)| *id).collect();
        assert_eq!(kept, vec![id(2), id(3), id(4)]);
        assert_eq!(ledger.account(&provider).unwrap().paid, 5);
    }

    /// The child of `a_kill_9_loses_no_committed_payment_and_pays_none_twice`: holds, pays,
    /// releases and forfeits as fast as it can, printing each committed step, until killed.
    #[test]
    #[ignore = "run by a_kill_9_loses_no_committed_payment_and_pays_none_twice in a child process"]
    fn child_pays_until_killed() {
        let Ok(path) = std::env::var("PROOFMESH_LEDGER_CHILD") else {
            return;
        };
        let book = Book::open(std::path::Path::new(&path)).unwrap();
        let ledger = Ledger::open(book.database(), LedgerConfig::default()).unwrap();
        let providers: Vec<PeerId> = std::env::var("PROOFMESH_LEDGER_PEERS")
            .unwrap()
            .split(',')
            .map(|p| p.parse().unwrap())
            .collect();
        ledger.declare_stake(&providers[1], 1_000_000, 1).unwrap();
        for n in 0..1_000_000u64 {
            let provider = &providers[(n % 2) as usize];
            match n % 10 {
                // Some paid at once, some released at once, most held for later.
                0 => ledger.pay(id(n), provider, "key", n + 1).unwrap(),
                7 => {
                    ledger.release_due(n).unwrap();
                }
                9 => {
                    ledger.forfeit_all(&providers[1]).unwrap();
                }
                _ => ledger.hold(id(n), &hold(provider, n + 1, n / 2)).unwrap(),
            }
            println!("COMMITTED {n}");
        }
    }

    #[test]
    fn a_kill_9_loses_no_committed_payment_and_pays_none_twice() {
        use std::io::BufRead;
        let dir = std::env::temp_dir().join(format!("proofmesh-ledger-{}", rand::random::<u64>()));
        let path = dir.join("book.redb");
        let providers = [PeerId::random(), PeerId::random()];
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "ledger::tests::child_pays_until_killed",
                "--ignored",
                "--nocapture",
            ])
            .env("PROOFMESH_LEDGER_CHILD", &path)
            .env(
                "PROOFMESH_LEDGER_PEERS",
                format!("{},{}", providers[0], providers[1]),
            )
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        // Killed in the middle of the burst: a few hundred steps in, at a random one.
        let stop_at = 200 + rand::random::<u64>() % 300;
        let mut committed = None;
        for line in stdout.lines().map_while(std::result::Result::ok) {
            if let Some(n) = line.strip_prefix("COMMITTED ") {
                let n: u64 = n.trim().parse().unwrap();
                committed = Some(n);
                if n >= stop_at {
                    break;
                }
            }
        }
        // SIGKILL: no destructor, no flush, no clean close; the child may be mid-transaction.
        child.kill().unwrap();
        child.wait().unwrap();
        let committed = committed.expect("the child committed nothing");

        let book = Book::open(&path).unwrap();
        let ledger = Ledger::open(book.database(), LedgerConfig::default()).unwrap();
        let (held, settled) = ledger.entries().unwrap();
        // Every committed hold or payment is there, held or settled, and none is both.
        let held_ids: std::collections::HashSet<PaymentId> = held.iter().map(|(i, _)| *i).collect();
        let settled_ids: std::collections::HashSet<PaymentId> =
            settled.iter().map(|(i, _)| *i).collect();
        assert!(
            held_ids.is_disjoint(&settled_ids),
            "a payment both held and settled"
        );
        for n in (0..=committed).filter(|n| !matches!(n % 10, 7 | 9)) {
            assert!(
                held_ids.contains(&id(n)) || settled_ids.contains(&id(n)),
                "committed payment {n} was lost"
            );
        }
        // Each account is exactly the sum of its entries: nothing paid twice, nothing lost.
        let check = |ledger: &Ledger| ledger.check_totals().unwrap();
        check(&ledger);
        // Releasing after the restart pays each held payment once, however often it runs.
        let before = ledger.account(&providers[0]).unwrap().paid;
        let released = ledger.release_due(u64::MAX).unwrap();
        assert_eq!(ledger.release_due(u64::MAX).unwrap(), 0);
        check(&ledger);
        assert!(ledger.account(&providers[0]).unwrap().paid >= before);
        println!(
            "ledger kill -9: killed after {committed} committed steps; {} held, {} settled; {released} released after the restart",
            held.len(),
            settled.len()
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
