//! The audit log: append-only and tamper-evident. Each entry carries `hash` = SHA-256 of the
//! previous entry's hash and the entry's own canonical content ([`AuditEntry::canonical_content`]),
//! the first entry chaining from [`AUDIT_GENESIS_HASH`]; a one-row `audit_head` holds the last
//! sequence number and hash. Editing a row changes its content (its hash no longer matches),
//! deleting one leaves a gap, inserting or reordering rows breaks the links, deleting the last
//! ones leaves the head ahead of the log: [`Ledger::verify_audit_chain`] reports the first entry
//! where any of that happens.
//!
//! Every audited change of the ledger (tenants, projects, keys, credit, budgets, rate limits,
//! prices) appends its entry in the change's own transaction, through `AuditSql`: the
//! transaction locks the head first, makes the change, appends, and commits both or neither.
//! [`Ledger::append_audit`] appends an entry on its own, for events that are not a database
//! change (a model loaded, a request refused by residency, an engine restart).
//!
//! Appends are serialised across every replica: PostgreSQL locks the head row (`SELECT … FOR
//! UPDATE`) for the transaction, SQLite takes the database's write lock up front (`BEGIN
//! IMMEDIATE`). So each entry links to the one committed before it, whichever replica wrote it.
//!
//! Checkpoints: with a key ([`AuditCheckpointing`]), the entry whose sequence number is a
//! multiple of `every_entries` gets a checkpoint in its own transaction, and a background task
//! checkpoints the head every `interval_ms` while entries exist past the last checkpoint. A
//! checkpoint (`audit_checkpoints`) is the entry's sequence number and hash, when it was signed,
//! and HMAC-SHA256 of those under the key, which never enters the database. Someone who can write
//! to the database but has no key can recompute a rewritten chain's hashes, but not the
//! signatures of the checkpoints after the first rewritten entry; nor can they delete entries
//! that a checkpoint names without that checkpoint pointing past the end of the log.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac as _};
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, SqliteConnection};
use tidepool_core::KeyId;

use crate::clock::Clock;
use crate::store::{Store, WriteGate, on_store, retry_transient};
use crate::{Ledger, LedgerError};

/// The `prev_hash` of the first entry.
pub const AUDIT_GENESIS_HASH: &str =
    "0000000000000000000000000000000000000000000000000000000000000000";
/// Longest `action`, in bytes.
pub const AUDIT_ACTION_BYTES_MAX: usize = 64;
/// Longest `target`, in bytes.
pub const AUDIT_TARGET_BYTES_MAX: usize = 256;
/// Longest `details` (its JSON text), in bytes.
pub const AUDIT_DETAILS_BYTES_MAX: usize = 4096;
/// Longest actor (a key id), in bytes.
pub const AUDIT_ACTOR_BYTES_MAX: usize = 64;
/// Longest request id, in bytes.
pub const AUDIT_REQUEST_ID_BYTES_MAX: usize = 128;
/// Most entries one [`Ledger::list_audit`] page returns.
pub const AUDIT_PAGE_LEN_MAX: u32 = 1000;
/// Shortest checkpoint key, in bytes: HMAC-SHA256 keys shorter than the hash's 32 bytes weaken it.
pub const AUDIT_CHECKPOINT_KEY_BYTES_MIN: usize = 32;
/// Entries read per query while verifying the chain (bounds memory, not the chain's length).
const VERIFY_PAGE_LEN: i64 = 1000;
/// The canonical form of entries written before request ids were recorded.
const FORMAT_V1: i16 = 1;
/// The canonical form of new entries: [`FORMAT_V1`] plus the request id.
const FORMAT_V2: i16 = 2;

type HmacSha256 = Hmac<Sha256>;

/// Who did it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditActor {
    /// The operator, through the admin API or the CLI.
    Admin,
    /// Tidepool itself (e.g. the leaked-key detector).
    System,
    /// An API key (by id, never the secret).
    Key(KeyId),
}

impl AuditActor {
    /// The stored spelling: `admin`, `system`, or the key id (key ids are 12 characters, so
    /// they never collide with the two words).
    pub fn as_str(&self) -> &str {
        match self {
            Self::Admin => "admin",
            Self::System => "system",
            Self::Key(key_id) => &key_id.0,
        }
    }

    fn parse(text: &str) -> Self {
        match text {
            "admin" => Self::Admin,
            "system" => Self::System,
            key_id => Self::Key(KeyId(key_id.to_owned())),
        }
    }
}

/// Who makes a change and on behalf of which request: every audited ledger method takes one and
/// records it in the change's entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditContext {
    pub actor: AuditActor,
    /// The request that made the change (`x-request-id`), if it came through the API.
    pub request_id: Option<String>,
}

impl AuditContext {
    /// The operator, outside any request (the CLI).
    pub const ADMIN: Self = Self {
        actor: AuditActor::Admin,
        request_id: None,
    };
    /// Tidepool itself, outside any request.
    pub const SYSTEM: Self = Self {
        actor: AuditActor::System,
        request_id: None,
    };

    pub fn new(actor: AuditActor) -> Self {
        Self {
            actor,
            request_id: None,
        }
    }

    /// The same context, for the request `request_id`.
    #[must_use]
    pub fn with_request_id(mut self, request_id: impl std::fmt::Display) -> Self {
        self.request_id = Some(request_id.to_string());
        self
    }

    fn validate(&self) -> Result<(), LedgerError> {
        let actor = self.actor.as_str();
        if actor.is_empty() || actor.len() > AUDIT_ACTOR_BYTES_MAX {
            return Err(LedgerError::OutOfRange {
                field: "audit actor",
            });
        }
        if let Some(request_id) = &self.request_id
            && (request_id.is_empty() || request_id.len() > AUDIT_REQUEST_ID_BYTES_MAX)
        {
            return Err(LedgerError::OutOfRange {
                field: "audit request id",
            });
        }
        Ok(())
    }
}

/// One stored audit entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    /// 1, 2, 3, … with no gaps.
    pub seq: i64,
    pub at_ms: i64,
    pub actor: AuditActor,
    /// What was done, e.g. `key.create`, `key.suspend`.
    pub action: String,
    /// What it was done to, e.g. `key:abc…`, `tenant:acme`.
    pub target: String,
    /// A JSON object, as stored (and hashed); `before` and `after` where the change replaced a
    /// value.
    pub details: String,
    /// The request that made the change, if any.
    pub request_id: Option<String>,
    /// The canonical form the hash covers: 1 for entries written before request ids were
    /// recorded, 2 since.
    pub format: i16,
    pub prev_hash: String,
    pub hash: String,
}

impl AuditEntry {
    /// The bytes the entry's hash covers besides the previous hash: every field, each prefixed
    /// with its length, so no two different entries share a content. `None` for a format this
    /// version does not know.
    pub fn canonical_content(&self) -> Option<Vec<u8>> {
        let fields = [
            self.actor.as_str(),
            &self.action,
            &self.target,
            &self.details,
        ];
        let mut out = Vec::with_capacity(
            fields
                .iter()
                .fold(96_usize, |sum, field| sum.saturating_add(field.len())),
        );
        let tag: &[u8] = match self.format {
            FORMAT_V1 => b"tidepool-audit-v1\n",
            FORMAT_V2 => b"tidepool-audit-v2\n",
            _ => return None,
        };
        out.extend_from_slice(tag);
        out.extend_from_slice(format!("{}\n{}\n", self.seq, self.at_ms).as_bytes());
        for field in fields {
            push_field(&mut out, field);
        }
        if self.format == FORMAT_V2 {
            match &self.request_id {
                // No colon: never the spelling of a present request id.
                None => out.extend_from_slice(b"none\n"),
                Some(request_id) => push_field(&mut out, request_id),
            }
        }
        Some(out)
    }
}

fn push_field(out: &mut Vec<u8>, field: &str) {
    out.extend_from_slice(format!("{}:", field.len()).as_bytes());
    out.extend_from_slice(field.as_bytes());
    out.push(b'\n');
}

/// SHA-256 (hex) of `prev_hash` followed by the entry's canonical content.
pub fn chain_hash(prev_hash: &str, content: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(prev_hash.as_bytes());
    hasher.update(content);
    hex::encode(hasher.finalize())
}

/// A signed checkpoint: entry `seq` had hash `hash` when it was signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditCheckpoint {
    pub seq: i64,
    pub hash: String,
    pub created_at_ms: i64,
    /// HMAC-SHA256 (hex) of the three fields above ([`AuditKey`]).
    pub hmac: String,
}

/// The key that signs checkpoints. Never stored in the database and never printed.
#[derive(Clone)]
pub struct AuditKey(Arc<[u8]>);

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditKey(***)")
    }
}

impl AuditKey {
    /// A key of at least [`AUDIT_CHECKPOINT_KEY_BYTES_MIN`] bytes.
    pub fn new(key: impl Into<Vec<u8>>) -> Result<Self, LedgerError> {
        let key = key.into();
        if key.len() < AUDIT_CHECKPOINT_KEY_BYTES_MIN {
            return Err(LedgerError::OutOfRange {
                field: "audit checkpoint key length",
            });
        }
        Ok(Self(key.into()))
    }

    fn mac(&self, seq: i64, hash: &str, created_at_ms: i64) -> HmacSha256 {
        // `new_from_slice` accepts keys of any length for HMAC.
        let mut mac = <HmacSha256 as hmac::Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable_hmac());
        mac.update(
            format!("tidepool-audit-checkpoint-v1\n{seq}\n{hash}\n{created_at_ms}\n").as_bytes(),
        );
        mac
    }

    /// HMAC-SHA256 (hex) of a checkpoint's fields.
    pub fn sign(&self, seq: i64, hash: &str, created_at_ms: i64) -> String {
        hex::encode(self.mac(seq, hash, created_at_ms).finalize().into_bytes())
    }

    /// Whether the checkpoint's signature is this key's (constant-time).
    pub fn verifies(&self, checkpoint: &AuditCheckpoint) -> bool {
        let Ok(signature) = hex::decode(&checkpoint.hmac) else {
            return false;
        };
        self.mac(checkpoint.seq, &checkpoint.hash, checkpoint.created_at_ms)
            .verify_slice(&signature)
            .is_ok()
    }
}

#[expect(
    clippy::panic,
    reason = "HMAC takes keys of every length: this cannot happen"
)]
fn unreachable_hmac() -> HmacSha256 {
    panic!("HMAC-SHA256 refused a key")
}

/// How checkpoints are written ([`crate::LedgerOptions::audit_checkpoints`]).
#[derive(Debug, Clone)]
pub struct AuditCheckpointing {
    pub key: AuditKey,
    /// The entry whose sequence number is a multiple of this is checkpointed in its own
    /// transaction.
    pub every_entries: u32,
    /// How often this handle's background task checkpoints the head while entries exist past
    /// the last checkpoint.
    pub interval_ms: u64,
}

/// A sequence number and hash kept outside the database (`SEQ:HASH`): verification fails unless
/// entry `seq` exists with that hash. The defence against a truncated tail whose checkpoints
/// were deleted too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditAnchor {
    pub seq: i64,
    pub hash: String,
}

impl FromStr for AuditAnchor {
    type Err = LedgerError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || LedgerError::OutOfRange {
            field: "audit anchor (SEQ:HASH)",
        };
        let (seq, hash) = text.split_once(':').ok_or_else(bad)?;
        let seq: i64 = seq.parse().map_err(|_| bad())?;
        let hash_ok = hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit());
        if seq < 1 || !hash_ok {
            return Err(bad());
        }
        Ok(Self {
            seq,
            hash: hash.to_ascii_lowercase(),
        })
    }
}

impl std::fmt::Display for AuditAnchor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.seq, self.hash)
    }
}

/// Where the chain first breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditBreak {
    /// The first entry that does not verify (for a truncated log: the first missing one).
    pub seq: i64,
    pub reason: &'static str,
}

/// The verdict of [`Ledger::verify_audit_chain`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditVerdict {
    /// Entries read.
    pub entries: u64,
    /// `None`: the whole chain verifies.
    pub first_broken: Option<AuditBreak>,
    /// Checkpoints read and checked against their entries.
    pub checkpoints: u64,
    /// Whether this handle has the checkpoint key, so the checkpoints' signatures were checked
    /// too. Without it, a forged checkpoint is not detected.
    pub signatures_checked: bool,
    /// The newest checkpoint that verified: keep a copy elsewhere and pass it as the anchor of a
    /// later verification.
    pub latest_checkpoint: Option<AuditCheckpoint>,
    /// The last entry read (sequence number and hash), if any.
    pub last: Option<AuditAnchor>,
}

impl AuditVerdict {
    pub fn is_ok(&self) -> bool {
        self.first_broken.is_none()
    }
}

type AuditRow = (
    i64,
    i64,
    String,
    String,
    String,
    String,
    Option<String>,
    i16,
    String,
    String,
);

/// The columns of an [`AuditRow`], in order.
macro_rules! audit_columns {
    () => {
        "seq, at_ms, actor, action, target, details, request_id, format, prev_hash, hash"
    };
}

/// The reason of a sequence gap.
const MISSING: &str = "an entry is missing";

/// Why `entry` does not follow the entry `prev_seq` with hash `prev_hash`, if it does not.
fn link_break(prev_seq: i64, prev_hash: &str, entry: &AuditEntry) -> Option<&'static str> {
    if Some(entry.seq) != prev_seq.checked_add(1) {
        return Some(MISSING);
    }
    if entry.prev_hash != prev_hash {
        return Some(
            "prev_hash is not the previous entry's hash: an entry was inserted, removed or moved",
        );
    }
    let Some(content) = entry.canonical_content() else {
        return Some("the entry's format is unknown");
    };
    if chain_hash(prev_hash, &content) != entry.hash {
        return Some("the entry's content does not match its hash: it was edited or moved");
    }
    None
}

fn entry_from_row(row: AuditRow) -> AuditEntry {
    let (seq, at_ms, actor, action, target, details, request_id, format, prev_hash, hash) = row;
    AuditEntry {
        seq,
        at_ms,
        actor: AuditActor::parse(&actor),
        action,
        target,
        details,
        request_id,
        format,
        prev_hash,
        hash,
    }
}

/// The head as a transaction locked it.
#[derive(Debug)]
pub(crate) struct LockedHead {
    seq: i64,
    hash: String,
}

/// The audit statements, run inside the caller's write transaction. The same SQL on both
/// stores but for the head's row lock.
pub(crate) trait AuditSql {
    /// Locks the head (PostgreSQL: `FOR UPDATE`; SQLite: the transaction's `BEGIN IMMEDIATE`
    /// holds the write lock already) and reads it. Every audited transaction takes it first,
    /// so they are serialised and read the rows they change without a race.
    async fn lock_audit_head(&mut self) -> Result<LockedHead, sqlx::Error>;
    /// Inserts the entry and moves the head to it.
    async fn insert_audit_entry(&mut self, entry: &AuditEntry) -> Result<(), sqlx::Error>;
    /// Inserts a checkpoint (no-op if that entry has one).
    async fn insert_audit_checkpoint(
        &mut self,
        checkpoint: &AuditCheckpoint,
    ) -> Result<(), sqlx::Error>;
    /// The newest checkpoint's sequence number (0: none).
    async fn last_audit_checkpoint_seq(&mut self) -> Result<i64, sqlx::Error>;
}

macro_rules! impl_audit_sql {
    ($conn:ty, $lock_head:literal) => {
        impl AuditSql for $conn {
            async fn lock_audit_head(&mut self) -> Result<LockedHead, sqlx::Error> {
                let (seq, hash): (i64, String) =
                    sqlx::query_as($lock_head).fetch_one(&mut *self).await?;
                Ok(LockedHead { seq, hash })
            }

            async fn insert_audit_entry(&mut self, entry: &AuditEntry) -> Result<(), sqlx::Error> {
                sqlx::query(concat!(
                    "INSERT INTO audit_log (",
                    audit_columns!(),
                    ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
                ))
                .bind(entry.seq)
                .bind(entry.at_ms)
                .bind(entry.actor.as_str())
                .bind(&entry.action)
                .bind(&entry.target)
                .bind(&entry.details)
                .bind(entry.request_id.as_deref())
                .bind(entry.format)
                .bind(&entry.prev_hash)
                .bind(&entry.hash)
                .execute(&mut *self)
                .await?;
                sqlx::query("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1")
                    .bind(entry.seq)
                    .bind(&entry.hash)
                    .execute(&mut *self)
                    .await?;
                Ok(())
            }

            async fn insert_audit_checkpoint(
                &mut self,
                checkpoint: &AuditCheckpoint,
            ) -> Result<(), sqlx::Error> {
                sqlx::query(
                    "INSERT INTO audit_checkpoints (seq, hash, created_at_ms, hmac) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (seq) DO NOTHING",
                )
                .bind(checkpoint.seq)
                .bind(&checkpoint.hash)
                .bind(checkpoint.created_at_ms)
                .bind(&checkpoint.hmac)
                .execute(&mut *self)
                .await?;
                Ok(())
            }

            async fn last_audit_checkpoint_seq(&mut self) -> Result<i64, sqlx::Error> {
                let seq: Option<i64> = sqlx::query_scalar("SELECT MAX(seq) FROM audit_checkpoints")
                    .fetch_one(&mut *self)
                    .await?;
                Ok(seq.unwrap_or(0))
            }
        }
    };
}

impl_audit_sql!(
    SqliteConnection,
    "SELECT seq, hash FROM audit_head WHERE id = 1"
);
impl_audit_sql!(
    PgConnection,
    "SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE"
);

/// Fails unless `action`, `target` and the JSON text of the details are within their limits.
fn check_entry(action: &str, target: &str, details: &str) -> Result<(), LedgerError> {
    if action.is_empty() || action.len() > AUDIT_ACTION_BYTES_MAX {
        return Err(LedgerError::OutOfRange {
            field: "audit action",
        });
    }
    if target.len() > AUDIT_TARGET_BYTES_MAX {
        return Err(LedgerError::OutOfRange {
            field: "audit target",
        });
    }
    if details.len() > AUDIT_DETAILS_BYTES_MAX {
        return Err(LedgerError::OutOfRange {
            field: "audit details",
        });
    }
    Ok(())
}

/// What an audited change appends: the action, its target and details.
#[derive(Debug)]
pub(crate) struct Change<'a> {
    pub(crate) action: &'a str,
    pub(crate) target: String,
    pub(crate) details: serde_json::Value,
}

impl Ledger {
    /// Appends `change` after `head` inside the caller's transaction, which locked `head` with
    /// [`AuditSql::lock_audit_head`], at `at_ms` (read after the lock, so the chain never goes
    /// back in time on one clock); checkpoints the entry when its sequence number is due. Any
    /// error leaves the transaction to be rolled back, change included.
    pub(crate) async fn append_in<C: AuditSql>(
        &self,
        conn: &mut C,
        head: LockedHead,
        audit: &AuditContext,
        at_ms: i64,
        change: Change<'_>,
    ) -> Result<AuditEntry, LedgerError> {
        audit.validate()?;
        let details =
            serde_json::to_string(&change.details).map_err(|_| LedgerError::OutOfRange {
                field: "audit details",
            })?;
        check_entry(change.action, &change.target, &details)?;
        let seq = head.seq.checked_add(1).ok_or(LedgerError::Invariant {
            what: "audit sequence overflow",
        })?;
        let mut entry = AuditEntry {
            seq,
            at_ms,
            actor: audit.actor.clone(),
            action: change.action.to_owned(),
            target: change.target,
            details,
            request_id: audit.request_id.clone(),
            format: FORMAT_V2,
            prev_hash: head.hash,
            hash: String::new(),
        };
        let content = entry.canonical_content().ok_or(LedgerError::Invariant {
            what: "the current audit format has a canonical form",
        })?;
        entry.hash = chain_hash(&entry.prev_hash, &content);
        conn.insert_audit_entry(&entry).await?;
        if let Some(checkpointing) = &self.audit
            && u64::try_from(seq)
                .is_ok_and(|seq| seq.is_multiple_of(u64::from(checkpointing.every_entries)))
        {
            conn.insert_audit_checkpoint(&AuditCheckpoint {
                seq,
                hash: entry.hash.clone(),
                created_at_ms: at_ms,
                hmac: checkpointing.key.sign(seq, &entry.hash, at_ms),
            })
            .await?;
        }
        Ok(entry)
    }

    /// Appends one entry on its own transaction and returns it: for events that are not a
    /// ledger change (a model loaded or unloaded, a request refused by residency, an engine
    /// restart). `details` is stored as its JSON text. Serialised with every other append on
    /// this database (module docs).
    pub async fn append_audit(
        &self,
        audit: &AuditContext,
        action: &str,
        target: &str,
        details: &serde_json::Value,
    ) -> Result<AuditEntry, LedgerError> {
        retry_transient("audit append", || {
            self.append_audit_once(audit, action, target, details)
        })
        .await
    }

    async fn append_audit_once(
        &self,
        audit: &AuditContext,
        action: &str,
        target: &str,
        details: &serde_json::Value,
    ) -> Result<AuditEntry, LedgerError> {
        let _gate = self.gate.enter().await;
        on_store!(&self.store, pool => {
            let mut tx = pool.begin_with(self.store.begin_write_sql()).await?;
            let head = tx.lock_audit_head().await?;
            let at_ms = self.now_ms();
            let change = Change { action, target: target.to_owned(), details: details.clone() };
            let entry = self.append_in(&mut *tx, head, audit, at_ms, change).await?;
            tx.commit().await?;
            Ok(entry)
        })
    }

    /// Checkpoints the head now if entries exist past the last checkpoint, and returns the new
    /// checkpoint. `None`: nothing to checkpoint, or no checkpoint key on this handle. The
    /// background task of [`AuditCheckpointing::interval_ms`] calls this.
    pub async fn checkpoint_audit(&self) -> Result<Option<AuditCheckpoint>, LedgerError> {
        let Some(checkpointing) = &self.audit else {
            return Ok(None);
        };
        checkpoint_head(
            &self.store,
            &self.gate,
            self.clock.as_ref(),
            &checkpointing.key,
        )
        .await
    }

    /// Up to `limit` entries (at most [`AUDIT_PAGE_LEN_MAX`]) with `seq > after`, oldest first.
    pub async fn list_audit(&self, after: i64, limit: u32) -> Result<Vec<AuditEntry>, LedgerError> {
        if limit == 0 || limit > AUDIT_PAGE_LEN_MAX {
            return Err(LedgerError::OutOfRange { field: "limit" });
        }
        let rows: Vec<AuditRow> = on_store!(&self.store, pool => {
            sqlx::query_as(concat!(
                "SELECT ",
                audit_columns!(),
                " FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2"
            ))
            .bind(after)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?
        });
        Ok(rows.into_iter().map(entry_from_row).collect())
    }

    /// Up to `limit` checkpoints (at most [`AUDIT_PAGE_LEN_MAX`]) with `seq > after`, oldest
    /// first.
    pub async fn list_audit_checkpoints(
        &self,
        after: i64,
        limit: u32,
    ) -> Result<Vec<AuditCheckpoint>, LedgerError> {
        if limit == 0 || limit > AUDIT_PAGE_LEN_MAX {
            return Err(LedgerError::OutOfRange { field: "limit" });
        }
        let rows: Vec<(i64, String, i64, String)> = on_store!(&self.store, pool => {
            sqlx::query_as(
                "SELECT seq, hash, created_at_ms, hmac FROM audit_checkpoints \
                 WHERE seq > $1 ORDER BY seq LIMIT $2",
            )
            .bind(after)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?
        });
        Ok(rows.into_iter().map(checkpoint_from_row).collect())
    }

    /// Walks the whole chain, oldest first, in one snapshot, and reports the first entry that
    /// does not verify: a sequence gap; a `prev_hash` that is not the previous entry's hash
    /// (inserted, removed or moved entries); a hash that does not match the content (edited or
    /// moved entries); a checkpoint whose hash is not its entry's (the chain was rewritten at or
    /// before that entry) or, with the key, whose signature does not verify (forged); a
    /// checkpoint, or `anchor`, past the end of the log, or a head ahead of it (entries deleted);
    /// entries past the head; `anchor`'s entry with another hash. Reads in pages of a thousand
    /// entries.
    pub async fn verify_audit_chain(
        &self,
        anchor: Option<&AuditAnchor>,
    ) -> Result<AuditVerdict, LedgerError> {
        let key = self.audit.as_ref().map(|c| &c.key);
        let mut walk = Walk::new(key, anchor);
        on_store!(&self.store, pool => {
            let mut tx = pool.begin_with(self.store.begin_snapshot_sql()).await?;
            let (head_seq, head_hash): (i64, String) =
                sqlx::query_as("SELECT seq, hash FROM audit_head WHERE id = 1")
                    .fetch_one(&mut *tx)
                    .await?;
            loop {
                let rows: Vec<AuditRow> = sqlx::query_as(concat!(
                    "SELECT ",
                    audit_columns!(),
                    " FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2"
                ))
                .bind(walk.prev_seq)
                .bind(VERIFY_PAGE_LEN)
                .fetch_all(&mut *tx)
                .await?;
                let Some(page_last) = rows.last().map(|row| row.0) else {
                    break;
                };
                let checkpoints: Vec<(i64, String, i64, String)> = sqlx::query_as(
                    "SELECT seq, hash, created_at_ms, hmac FROM audit_checkpoints \
                     WHERE seq > $1 AND seq <= $2 ORDER BY seq",
                )
                .bind(walk.prev_seq)
                .bind(page_last)
                .fetch_all(&mut *tx)
                .await?;
                let checkpoints = checkpoints.into_iter().map(checkpoint_from_row);
                if let Some(verdict) = walk.page(rows.into_iter().map(entry_from_row), checkpoints) {
                    return Ok(verdict);
                }
            }
            let beyond: Option<(i64, String, i64, String)> = sqlx::query_as(
                "SELECT seq, hash, created_at_ms, hmac FROM audit_checkpoints \
                 WHERE seq > $1 ORDER BY seq LIMIT 1",
            )
            .bind(walk.prev_seq)
            .fetch_optional(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(walk.end(beyond.map(checkpoint_from_row), head_seq, &head_hash))
        })
    }
}

fn checkpoint_from_row(row: (i64, String, i64, String)) -> AuditCheckpoint {
    let (seq, hash, created_at_ms, hmac) = row;
    AuditCheckpoint {
        seq,
        hash,
        created_at_ms,
        hmac,
    }
}

/// The state of one verification walk.
struct Walk<'a> {
    key: Option<&'a AuditKey>,
    anchor: Option<&'a AuditAnchor>,
    prev_seq: i64,
    prev_hash: String,
    entries: u64,
    checkpoints: u64,
    latest_checkpoint: Option<AuditCheckpoint>,
}

impl<'a> Walk<'a> {
    fn new(key: Option<&'a AuditKey>, anchor: Option<&'a AuditAnchor>) -> Self {
        Self {
            key,
            anchor,
            prev_seq: 0,
            prev_hash: AUDIT_GENESIS_HASH.to_owned(),
            entries: 0,
            checkpoints: 0,
            latest_checkpoint: None,
        }
    }

    fn verdict(&mut self, first_broken: Option<AuditBreak>) -> AuditVerdict {
        AuditVerdict {
            entries: self.entries,
            first_broken,
            checkpoints: self.checkpoints,
            signatures_checked: self.key.is_some(),
            latest_checkpoint: self.latest_checkpoint.take(),
            last: (self.prev_seq > 0).then(|| AuditAnchor {
                seq: self.prev_seq,
                hash: self.prev_hash.clone(),
            }),
        }
    }

    fn broken(&mut self, seq: i64, reason: &'static str) -> AuditVerdict {
        self.verdict(Some(AuditBreak { seq, reason }))
    }

    /// Checks one page of entries and the checkpoints within its range; `Some` at a break.
    fn page(
        &mut self,
        entries: impl Iterator<Item = AuditEntry>,
        checkpoints: impl Iterator<Item = AuditCheckpoint>,
    ) -> Option<AuditVerdict> {
        let mut checkpoints = checkpoints.peekable();
        for entry in entries {
            self.entries = self.entries.saturating_add(1);
            if let Some(reason) = link_break(self.prev_seq, &self.prev_hash, &entry) {
                let seq = if reason == MISSING {
                    self.prev_seq.saturating_add(1)
                } else {
                    entry.seq
                };
                return Some(self.broken(seq, reason));
            }
            // Every entry up to this one is present (no gap), so a checkpoint at or before it
            // is at it.
            while let Some(checkpoint) = checkpoints.next_if(|c| c.seq <= entry.seq) {
                if checkpoint.hash != entry.hash {
                    return Some(self.broken(
                        entry.seq,
                        "the entry's hash is not the one its checkpoint signed: the log was \
                         rewritten at or before this entry, after the previous checkpoint",
                    ));
                }
                if let Some(key) = self.key
                    && !key.verifies(&checkpoint)
                {
                    return Some(self.broken(
                        entry.seq,
                        "the checkpoint at this entry has a bad signature: forged, or signed \
                         with another key",
                    ));
                }
                self.checkpoints = self.checkpoints.saturating_add(1);
                self.latest_checkpoint = Some(checkpoint);
            }
            if let Some(anchor) = self.anchor
                && anchor.seq == entry.seq
                && anchor.hash != entry.hash
            {
                return Some(self.broken(
                    entry.seq,
                    "the entry's hash is not the expected one (--expect-head): the log was \
                     rewritten at or before this entry",
                ));
            }
            self.prev_seq = entry.seq;
            self.prev_hash = entry.hash;
        }
        None
    }

    /// After the last entry: what points past the end of the log, and the head.
    fn end(
        mut self,
        beyond: Option<AuditCheckpoint>,
        head_seq: i64,
        head_hash: &str,
    ) -> AuditVerdict {
        let first_missing = self.prev_seq.saturating_add(1);
        if let Some(checkpoint) = beyond {
            let reason = match self.key {
                Some(key) if !key.verifies(&checkpoint) => {
                    "a checkpoint past the end of the log has a bad signature: forged, or \
                     signed with another key"
                }
                _ => "a checkpoint signs an entry past the end of the log: entries were deleted",
            };
            return self.broken(first_missing, reason);
        }
        if self.anchor.is_some_and(|anchor| anchor.seq > self.prev_seq) {
            return self.broken(
                first_missing,
                "the log ends before the expected entry (--expect-head): entries were deleted",
            );
        }
        if head_seq > self.prev_seq {
            return self.broken(
                first_missing,
                "the log ends before its head: entries were deleted",
            );
        }
        if head_seq < self.prev_seq {
            return self.broken(
                head_seq.saturating_add(1),
                "the entry is past the head: appended without moving the head",
            );
        }
        if head_seq > 0 && head_hash != self.prev_hash {
            return self.broken(head_seq, "the head's hash is not the last entry's");
        }
        self.verdict(None)
    }
}

/// Checkpoints the head if entries exist past the last checkpoint (the head locked meanwhile).
async fn checkpoint_head(
    store: &Store,
    gate: &WriteGate,
    clock: &dyn Clock,
    key: &AuditKey,
) -> Result<Option<AuditCheckpoint>, LedgerError> {
    let _gate = gate.enter().await;
    on_store!(store, pool => {
        let mut tx = pool.begin_with(store.begin_write_sql()).await?;
        let head = tx.lock_audit_head().await?;
        let last = tx.last_audit_checkpoint_seq().await?;
        if head.seq <= last {
            return Ok(None);
        }
        let created_at_ms = clock.now_ms();
        let checkpoint = AuditCheckpoint {
            seq: head.seq,
            hmac: key.sign(head.seq, &head.hash, created_at_ms),
            hash: head.hash,
            created_at_ms,
        };
        tx.insert_audit_checkpoint(&checkpoint).await?;
        tx.commit().await?;
        Ok(Some(checkpoint))
    })
}

/// The background task of one `Ledger` handle: every `interval_ms`, checkpoints the head if
/// entries exist past the last checkpoint; stops once `alive` has no strong sender left (every
/// handle is gone).
pub(crate) async fn run_checkpoints<T>(
    store: Store,
    gate: WriteGate,
    clock: Arc<dyn Clock>,
    checkpointing: Arc<AuditCheckpointing>,
    alive: tokio::sync::mpsc::WeakSender<T>,
) {
    let mut ticker = tokio::time::interval(Duration::from_millis(checkpointing.interval_ms));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate: a process that only starts (the CLI) writes nothing.
    ticker.tick().await;
    loop {
        ticker.tick().await;
        if alive.upgrade().is_none() {
            break;
        }
        match checkpoint_head(&store, &gate, clock.as_ref(), &checkpointing.key).await {
            Ok(Some(checkpoint)) => {
                tracing::debug!(seq = checkpoint.seq, "audit checkpoint written");
            }
            Ok(None) => {}
            Err(error) => tracing::warn!(%error, "audit checkpoint failed; will retry"),
        }
    }
    tracing::debug!("audit checkpoint task stopped: all handles dropped");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(format: i16, action: &str, target: &str, request_id: Option<&str>) -> AuditEntry {
        AuditEntry {
            seq: 1,
            at_ms: 2,
            actor: AuditActor::Admin,
            action: action.to_owned(),
            target: target.to_owned(),
            details: "{}".to_owned(),
            request_id: request_id.map(str::to_owned),
            format,
            prev_hash: AUDIT_GENESIS_HASH.to_owned(),
            hash: String::new(),
        }
    }

    #[test]
    fn content_is_unambiguous_and_hash_chains() {
        let a = entry(FORMAT_V1, "a", "bc", None)
            .canonical_content()
            .unwrap();
        let b = entry(FORMAT_V1, "ab", "c", None)
            .canonical_content()
            .unwrap();
        assert_ne!(a, b, "length prefixes separate fields");
        let h1 = chain_hash(AUDIT_GENESIS_HASH, &a);
        let h2 = chain_hash(&h1, &a);
        assert_eq!(h1.len(), 64);
        assert_ne!(h1, h2, "the previous hash is part of the next");
        assert_eq!(AuditActor::parse("system"), AuditActor::System);
        assert_eq!(
            AuditActor::parse("abc123abc123"),
            AuditActor::Key(KeyId("abc123abc123".into()))
        );
    }

    #[test]
    fn format_2_covers_the_request_id_and_format_1_is_unchanged() {
        // The v1 bytes of an entry written before request ids: a fixed oracle.
        let v1 = entry(FORMAT_V1, "key.create", "key:k", None);
        assert_eq!(
            v1.canonical_content().unwrap(),
            b"tidepool-audit-v1\n1\n2\n5:admin\n10:key.create\n5:key:k\n2:{}\n".to_vec()
        );
        let none = entry(FORMAT_V2, "a", "t", None)
            .canonical_content()
            .unwrap();
        let some = entry(FORMAT_V2, "a", "t", Some("r"))
            .canonical_content()
            .unwrap();
        let other = entry(FORMAT_V2, "a", "t", Some("s"))
            .canonical_content()
            .unwrap();
        assert_ne!(none, some);
        assert_ne!(some, other);
        assert_ne!(
            entry(FORMAT_V1, "a", "t", None).canonical_content(),
            Some(none),
            "the format is part of the content"
        );
        assert_eq!(entry(3, "a", "t", None).canonical_content(), None);
    }

    #[test]
    fn checkpoint_signatures_verify_only_under_their_key_and_fields() {
        let key = AuditKey::new(vec![7_u8; 32]).unwrap();
        let other = AuditKey::new(vec![8_u8; 32]).unwrap();
        assert!(
            AuditKey::new(vec![7_u8; 31]).is_err(),
            "short keys are refused"
        );
        let checkpoint = AuditCheckpoint {
            seq: 10,
            hash: "ab".repeat(32),
            created_at_ms: 5,
            hmac: key.sign(10, &"ab".repeat(32), 5),
        };
        assert!(key.verifies(&checkpoint));
        assert!(!other.verifies(&checkpoint));
        for forged in [
            AuditCheckpoint {
                seq: 11,
                ..checkpoint.clone()
            },
            AuditCheckpoint {
                created_at_ms: 6,
                ..checkpoint.clone()
            },
            AuditCheckpoint {
                hash: "cd".repeat(32),
                ..checkpoint.clone()
            },
            AuditCheckpoint {
                hmac: "zz".to_owned(),
                ..checkpoint.clone()
            },
        ] {
            assert!(!key.verifies(&forged), "{forged:?}");
        }
        assert_eq!(format!("{key:?}"), "AuditKey(***)");
    }

    #[test]
    fn anchors_parse_and_print() {
        let hash = "AB".repeat(32);
        let anchor: AuditAnchor = format!("12:{hash}").parse().unwrap();
        assert_eq!(anchor.seq, 12);
        assert_eq!(
            anchor.to_string(),
            format!("12:{}", hash.to_ascii_lowercase())
        );
        for bad in ["", "12", "x:ab", "0:ab", &format!("12:{}", "a".repeat(63))] {
            assert!(bad.parse::<AuditAnchor>().is_err(), "{bad}");
        }
    }

    #[test]
    fn contexts_are_validated() {
        assert!(AuditContext::ADMIN.validate().is_ok());
        assert!(
            AuditContext::SYSTEM
                .with_request_id("r".repeat(AUDIT_REQUEST_ID_BYTES_MAX))
                .validate()
                .is_ok()
        );
        assert!(
            AuditContext::SYSTEM
                .with_request_id("r".repeat(AUDIT_REQUEST_ID_BYTES_MAX + 1))
                .validate()
                .is_err()
        );
        assert!(AuditContext::ADMIN.with_request_id("").validate().is_err());
        assert!(
            AuditContext::new(AuditActor::Key(KeyId(String::new())))
                .validate()
                .is_err()
        );
    }
}
