//! The audit log: append-only and tamper-evident. Each entry carries `hash` = SHA-256 of the
//! previous entry's hash and the entry's own canonical content ([`canonical_content`]), the first
//! entry chaining from [`AUDIT_GENESIS_HASH`]; a one-row `audit_head` holds the last sequence
//! number and hash. Editing a row changes its content (its hash no longer matches), deleting one
//! leaves a gap and a `prev_hash` that names nothing, deleting the last ones leaves the head
//! ahead of the log: [`Ledger::verify_audit_chain`] reports the first entry where any of that
//! happens.
//!
//! Appends are serialised across every replica: PostgreSQL locks the head row (`SELECT … FOR
//! UPDATE`) for the transaction, SQLite takes the database's write lock up front (`BEGIN
//! IMMEDIATE`). So each entry links to the one committed before it, whichever replica wrote it.

use sha2::{Digest, Sha256};
use tidepool_core::KeyId;

use crate::store::{RETRY_ATTEMPTS_MAX, on_store};
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
/// Most entries one [`Ledger::list_audit`] page returns.
pub const AUDIT_PAGE_LEN_MAX: u32 = 1000;
/// Entries read per query while verifying the chain (bounds memory, not the chain's length).
const VERIFY_PAGE_LEN: i64 = 1000;

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
    /// A JSON object, as stored (and hashed).
    pub details: String,
    pub prev_hash: String,
    pub hash: String,
}

/// Where the chain first breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditBreak {
    /// The first entry that does not verify (for a truncated log: the head's sequence number).
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
}

impl AuditVerdict {
    pub fn is_ok(&self) -> bool {
        self.first_broken.is_none()
    }
}

/// The bytes an entry's hash covers besides the previous hash: every field, each prefixed with
/// its length, so no two different entries share a content.
pub fn canonical_content(
    seq: i64,
    at_ms: i64,
    actor: &str,
    action: &str,
    target: &str,
    details: &str,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        64_usize
            .saturating_add(actor.len())
            .saturating_add(action.len())
            .saturating_add(target.len())
            .saturating_add(details.len()),
    );
    out.extend_from_slice(b"tidepool-audit-v1\n");
    out.extend_from_slice(format!("{seq}\n{at_ms}\n").as_bytes());
    for field in [actor, action, target, details] {
        out.extend_from_slice(format!("{}:", field.len()).as_bytes());
        out.extend_from_slice(field.as_bytes());
        out.push(b'\n');
    }
    out
}

/// SHA-256 (hex) of `prev_hash` followed by the entry's canonical content.
pub fn chain_hash(prev_hash: &str, content: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(prev_hash.as_bytes());
    hasher.update(content);
    hex::encode(hasher.finalize())
}

type AuditRow = (i64, i64, String, String, String, String, String, String);

/// The reason of a sequence gap.
const MISSING: &str = "an entry is missing";

/// Why `entry` does not follow the entry `prev_seq` with hash `prev_hash`, if it does not.
fn link_break(prev_seq: i64, prev_hash: &str, entry: &AuditEntry) -> Option<&'static str> {
    if Some(entry.seq) != prev_seq.checked_add(1) {
        return Some(MISSING);
    }
    if entry.prev_hash != prev_hash {
        return Some("prev_hash is not the previous entry's hash");
    }
    let content = canonical_content(
        entry.seq,
        entry.at_ms,
        entry.actor.as_str(),
        &entry.action,
        &entry.target,
        &entry.details,
    );
    if chain_hash(prev_hash, &content) != entry.hash {
        return Some("the entry's content does not match its hash");
    }
    None
}

fn entry_from_row(row: AuditRow) -> AuditEntry {
    let (seq, at_ms, actor, action, target, details, prev_hash, hash) = row;
    AuditEntry {
        seq,
        at_ms,
        actor: AuditActor::parse(&actor),
        action,
        target,
        details,
        prev_hash,
        hash,
    }
}

impl Ledger {
    /// Appends one entry to the audit chain and returns it. `details` is stored as its JSON
    /// text. Serialised with every other append on this database (module docs).
    pub async fn append_audit(
        &self,
        actor: &AuditActor,
        action: &str,
        target: &str,
        details: &serde_json::Value,
    ) -> Result<AuditEntry, LedgerError> {
        let details = serde_json::to_string(details).map_err(|_| LedgerError::OutOfRange {
            field: "audit details",
        })?;
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
        let mut attempt = 1;
        loop {
            match self
                .append_audit_once(actor, action, target, &details)
                .await
            {
                Err(error) if error.is_transient() && attempt < RETRY_ATTEMPTS_MAX => {
                    attempt = attempt.saturating_add(1);
                }
                outcome => return outcome,
            }
        }
    }

    async fn append_audit_once(
        &self,
        actor: &AuditActor,
        action: &str,
        target: &str,
        details: &str,
    ) -> Result<AuditEntry, LedgerError> {
        let _gate = self.gate.enter().await;
        let lock_head = match self.store {
            crate::store::Store::Sqlite(_) => "SELECT seq, hash FROM audit_head WHERE id = 1",
            crate::store::Store::Postgres(_) => {
                "SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE"
            }
        };
        on_store!(&self.store, pool => {
            let mut tx = pool.begin_with(self.store.begin_write_sql()).await?;
            let (head_seq, head_hash): (i64, String) =
                sqlx::query_as(lock_head).fetch_one(&mut *tx).await?;
            // Read under the lock: the clock never makes the chain go back in time.
            let at_ms = self.now_ms();
            let seq = head_seq.checked_add(1).ok_or(LedgerError::Invariant {
                what: "audit sequence overflow",
            })?;
            let content = canonical_content(seq, at_ms, actor.as_str(), action, target, details);
            let hash = chain_hash(&head_hash, &content);
            sqlx::query(
                "INSERT INTO audit_log (seq, at_ms, actor, action, target, details, prev_hash, hash) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(seq)
            .bind(at_ms)
            .bind(actor.as_str())
            .bind(action)
            .bind(target)
            .bind(details)
            .bind(&head_hash)
            .bind(&hash)
            .execute(&mut *tx)
            .await?;
            sqlx::query("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1")
                .bind(seq)
                .bind(&hash)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(AuditEntry {
                seq,
                at_ms,
                actor: actor.clone(),
                action: action.to_owned(),
                target: target.to_owned(),
                details: details.to_owned(),
                prev_hash: head_hash,
                hash,
            })
        })
    }

    /// Up to `limit` entries (at most [`AUDIT_PAGE_LEN_MAX`]) with `seq > after`, oldest first.
    pub async fn list_audit(&self, after: i64, limit: u32) -> Result<Vec<AuditEntry>, LedgerError> {
        if limit == 0 || limit > AUDIT_PAGE_LEN_MAX {
            return Err(LedgerError::OutOfRange { field: "limit" });
        }
        let rows: Vec<AuditRow> = on_store!(&self.store, pool => {
            sqlx::query_as(
                "SELECT seq, at_ms, actor, action, target, details, prev_hash, hash \
                 FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2",
            )
            .bind(after)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?
        });
        Ok(rows.into_iter().map(entry_from_row).collect())
    }

    /// Walks the whole chain, oldest first, recomputing every hash, and reports the first entry
    /// that does not verify: a sequence gap, a `prev_hash` that is not the previous entry's
    /// hash, a hash that does not match the content, or a head that does not name the last
    /// entry. Reads in pages of a thousand entries (one snapshot per page).
    pub async fn verify_audit_chain(&self) -> Result<AuditVerdict, LedgerError> {
        let (head_seq, head_hash): (i64, String) = on_store!(&self.store, pool => {
            sqlx::query_as("SELECT seq, hash FROM audit_head WHERE id = 1")
                .fetch_one(pool)
                .await?
        });
        let mut prev_seq: i64 = 0;
        let mut prev_hash = AUDIT_GENESIS_HASH.to_owned();
        let mut entries: u64 = 0;
        let broken = |seq: i64, reason: &'static str, entries: u64| AuditVerdict {
            entries,
            first_broken: Some(AuditBreak { seq, reason }),
        };
        loop {
            let rows: Vec<AuditRow> = on_store!(&self.store, pool => {
                sqlx::query_as(
                    "SELECT seq, at_ms, actor, action, target, details, prev_hash, hash \
                     FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2",
                )
                .bind(prev_seq)
                .bind(VERIFY_PAGE_LEN)
                .fetch_all(pool)
                .await?
            });
            if rows.is_empty() {
                break;
            }
            for row in rows {
                let entry = entry_from_row(row);
                entries = entries.saturating_add(1);
                if let Some(reason) = link_break(prev_seq, &prev_hash, &entry) {
                    let seq = if reason == MISSING {
                        prev_seq.saturating_add(1)
                    } else {
                        entry.seq
                    };
                    return Ok(broken(seq, reason, entries));
                }
                prev_seq = entry.seq;
                prev_hash = entry.hash;
            }
        }
        // Entries appended after the head was read are beyond it: only a head ahead of the log
        // (its last entries deleted) or a head hash that differs is a break.
        if head_seq > prev_seq {
            return Ok(broken(
                prev_seq.saturating_add(1),
                "the log ends before its head: entries were deleted",
                entries,
            ));
        }
        if head_seq > 0 && head_seq == prev_seq && head_hash != prev_hash {
            return Ok(broken(
                head_seq,
                "the head's hash is not the last entry's",
                entries,
            ));
        }
        Ok(AuditVerdict {
            entries,
            first_broken: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_is_unambiguous_and_hash_chains() {
        let a = canonical_content(1, 2, "admin", "a", "bc", "{}");
        let b = canonical_content(1, 2, "admin", "ab", "c", "{}");
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
}
