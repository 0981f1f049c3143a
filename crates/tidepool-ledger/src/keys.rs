//! API keys: `tp-<key_id>-<secret>`. Only the SHA-256 of the whole key is stored; the key id is
//! the public lookup handle, and the hash comparison is constant-time. There is no cache, so a
//! revoke takes effect on the next request. Creating, revoking, suspending and reinstating a key
//! are audited in their own transaction.

use rand::Rng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tidepool_core::{KeyId, TenantId};

use crate::accounts::ProjectId;
use crate::audit::{AuditContext, AuditSql as _, Change};
use crate::store::on_store;
use crate::{ApiKeyRecord, CreatedKey, KeyRole, Ledger, LedgerError};

/// Every key starts with this.
pub const KEY_PREFIX: &str = "tp-";
/// Characters in a key id (lowercase ASCII letters and digits).
pub const KEY_ID_LEN: usize = 12;
/// Characters in a key secret (base62): 43 × log2(62) ≈ 256 bits.
pub const KEY_SECRET_LEN: usize = 43;
/// Longest key name accepted, in bytes.
pub const KEY_NAME_BYTES_MAX: usize = 128;

const KEY_ID_ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";
const BASE62_ALPHABET: &[u8; 62] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

const _: () = assert!(KEY_SECRET_LEN >= 32, "secrets carry at least 190 bits");

/// Draws `len` characters of `alphabet`; callers pass `rand::rng()`, a CSPRNG reseeded from the
/// operating system.
fn random_string(rng: &mut impl Rng, alphabet: &[u8], len: usize) -> String {
    (0..len)
        .map(|_| {
            let index = rng.random_range(0..alphabet.len());
            char::from(alphabet.get(index).copied().unwrap_or(b'a'))
        })
        .collect()
}

pub(crate) fn sha256_hex(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Splits a presented key into its key id; `None` if it is not shaped like one of ours.
pub(crate) fn parse_key(secret: &str) -> Option<&str> {
    let rest = secret.strip_prefix(KEY_PREFIX)?;
    let (key_id, body) = rest.split_once('-')?;
    let key_id_ok = key_id.len() == KEY_ID_LEN
        && key_id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let body_ok = body.len() == KEY_SECRET_LEN && body.bytes().all(|b| b.is_ascii_alphanumeric());
    (key_id_ok && body_ok).then_some(key_id)
}

type KeyRow = (
    String,
    String,
    String,
    String,
    i64,
    Option<i64>,
    Option<i64>,
    Option<String>,
    String,
);
/// A key row plus its stored hash.
type KeyAuthRow = (
    String,
    String,
    String,
    String,
    i64,
    Option<i64>,
    Option<i64>,
    Option<String>,
    String,
    String,
);

/// The columns of a [`KeyRow`], in order (a macro so queries are `concat!`ed literals).
macro_rules! key_columns {
    () => {
        "key_id, tenant_id, project_id, name, created_at_ms, revoked_at_ms, suspended_at_ms, \
         suspended_reason, role"
    };
}

/// Longest suspension reason stored, in bytes.
pub const SUSPENDED_REASON_BYTES_MAX: usize = 512;

/// A change of a key's state ([`Ledger::revoke_key`], [`Ledger::suspend_key`],
/// [`Ledger::reinstate_key`]).
#[derive(Debug, Clone, Copy)]
enum KeyChange<'a> {
    Revoke,
    Suspend { reason: &'a str },
    Reinstate,
}

impl ApiKeyRecord {
    /// A key as created: active, at time 0.
    fn new(key_id: KeyId, tenant: TenantId, project: ProjectId, name: &str) -> Self {
        Self {
            key_id,
            tenant,
            project,
            name: name.to_owned(),
            created_at_ms: 0,
            revoked_at_ms: None,
            suspended_at_ms: None,
            suspended_reason: None,
            role: KeyRole::Inference,
        }
    }
}

/// A new key id and its secret `tp-<key_id>-<secret>`.
fn new_key() -> (String, String) {
    let mut rng = rand::rng();
    let key_id = random_string(&mut rng, KEY_ID_ALPHABET, KEY_ID_LEN);
    let body = random_string(&mut rng, BASE62_ALPHABET, KEY_SECRET_LEN);
    let secret = format!("{KEY_PREFIX}{key_id}-{body}");
    assert!(
        parse_key(&secret) == Some(key_id.as_str()),
        "generated keys parse back"
    );
    (key_id, secret)
}

fn key_from_row(row: KeyRow) -> Result<ApiKeyRecord, LedgerError> {
    let (
        key_id,
        tenant,
        project,
        name,
        created_at_ms,
        revoked_at_ms,
        suspended_at_ms,
        suspended_reason,
        role,
    ) = row;
    Ok(ApiKeyRecord {
        key_id: KeyId(key_id),
        tenant: TenantId::new(tenant).map_err(|_| LedgerError::Corrupt { what: "tenant id" })?,
        project: ProjectId::new(project)
            .map_err(|_| LedgerError::Corrupt { what: "project id" })?,
        name,
        created_at_ms,
        revoked_at_ms,
        suspended_at_ms,
        suspended_reason,
        role: KeyRole::parse(&role).ok_or(LedgerError::Corrupt { what: "key role" })?,
    })
}

impl Ledger {
    /// Creates a key for `tenant` (creating the tenant if needed, with a USD account) in the
    /// tenant's default project; audited as `key.create`.
    pub async fn create_key(
        &self,
        tenant: &TenantId,
        name: &str,
        audit: &AuditContext,
    ) -> Result<CreatedKey, LedgerError> {
        self.create_key_in_project(tenant, &ProjectId::default_project(), name, audit)
            .await
    }

    /// Creates a key in `project` of `tenant` (creating both if needed; a new tenant gets a USD
    /// account — use [`Ledger::create_tenant`] first for another currency); audited as
    /// `key.create`, whose details say whether the tenant or the project was created with it.
    pub async fn create_key_in_project(
        &self,
        tenant: &TenantId,
        project: &ProjectId,
        name: &str,
        audit: &AuditContext,
    ) -> Result<CreatedKey, LedgerError> {
        self.create_key_with_role(tenant, project, name, KeyRole::Inference, audit)
            .await
    }

    /// Creates a key with `role` in `project` of `tenant` (creating both if needed, as
    /// [`Ledger::create_key_in_project`]), audited in the same transaction.
    pub async fn create_key_with_role(
        &self,
        tenant: &TenantId,
        project: &ProjectId,
        name: &str,
        role: KeyRole,
        audit: &AuditContext,
    ) -> Result<CreatedKey, LedgerError> {
        if name.is_empty() || name.len() > KEY_NAME_BYTES_MAX {
            return Err(LedgerError::OutOfRange { field: "key name" });
        }
        let (key_id, secret) = new_key();
        let hash = sha256_hex(&secret);
        let _gate = self.gate.enter().await;
        let now_ms = on_store!(&self.store, pool => {
            let mut tx = pool.begin_with(self.store.begin_write_sql()).await?;
            let head = tx.lock_audit_head().await?;
            let now_ms = self.now_ms();
            let tenant_created = sqlx::query(
                "INSERT INTO tenants (tenant_id, created_at_ms) VALUES ($1, $2) \
                 ON CONFLICT (tenant_id) DO NOTHING",
            )
            .bind(tenant.as_str())
            .bind(now_ms)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            sqlx::query(
                "INSERT INTO accounts (tenant_id, currency, balance_nanos, reserved_nanos) \
                 VALUES ($1, 'USD', 0, 0) ON CONFLICT (tenant_id) DO NOTHING",
            )
            .bind(tenant.as_str())
            .execute(&mut *tx)
            .await?;
            let project_created = sqlx::query(
                "INSERT INTO projects (tenant_id, project_id, created_at_ms) VALUES ($1, $2, $3) \
                 ON CONFLICT (tenant_id, project_id) DO NOTHING",
            )
            .bind(tenant.as_str())
            .bind(project.as_str())
            .bind(now_ms)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            sqlx::query(
                "INSERT INTO api_keys (key_id, tenant_id, project_id, name, secret_sha256, \
                 created_at_ms, role) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(&key_id)
            .bind(tenant.as_str())
            .bind(project.as_str())
            .bind(name)
            .bind(&hash)
            .bind(now_ms)
            .bind(role.as_str())
            .execute(&mut *tx)
            .await?;
            let details = serde_json::json!({
                "tenant": tenant.as_str(), "project": project.as_str(), "name": name,
                "role": role.as_str(),
                "tenant_created": tenant_created, "project_created": project_created,
            });
            let target = format!("key:{key_id}");
            let change = Change { action: "key.create", target, details };
            self.append_in(&mut *tx, head, audit, now_ms, change).await?;
            tx.commit().await?;
            now_ms
        });
        let record = ApiKeyRecord {
            created_at_ms: now_ms,
            role,
            ..ApiKeyRecord::new(KeyId(key_id), tenant.clone(), project.clone(), name)
        };
        Ok(CreatedKey { record, secret })
    }

    pub async fn list_keys(
        &self,
        tenant: Option<&TenantId>,
    ) -> Result<Vec<ApiKeyRecord>, LedgerError> {
        let tenant = tenant.map(TenantId::as_str);
        let rows: Vec<KeyRow> = on_store!(&self.store, pool => {
            sqlx::query_as(concat!(
                "SELECT ",
                key_columns!(),
                " FROM api_keys WHERE ($1 IS NULL OR tenant_id = $1) \
                 ORDER BY tenant_id, created_at_ms, key_id"
            ))
            .bind(tenant)
            .fetch_all(pool)
            .await?
        });
        rows.into_iter().map(key_from_row).collect()
    }

    /// Revokes a key; it fails authentication at once. Audited as `key.revoke`; revoking twice
    /// keeps the first time (and audits nothing).
    pub async fn revoke_key(
        &self,
        key_id: &KeyId,
        audit: &AuditContext,
    ) -> Result<(), LedgerError> {
        self.change_key(key_id, audit, KeyChange::Revoke)
            .await
            .map(drop)
    }

    /// The key record for a presented secret, if it exists and is not revoked. Constant-time in
    /// the secret. A suspended key is returned with its `suspended_at_ms`: the caller refuses it
    /// (the gateway's 429 `key_suspended`), so the client learns why instead of a 401.
    pub async fn authenticate(&self, secret: &str) -> Result<Option<ApiKeyRecord>, LedgerError> {
        let Some(key_id) = parse_key(secret) else {
            return Ok(None);
        };
        let sql = concat!(
            "SELECT ",
            key_columns!(),
            ", secret_sha256 FROM api_keys WHERE key_id = $1"
        );
        let row: Option<KeyAuthRow> = on_store!(&self.store, pool => {
            sqlx::query_as(sql).bind(key_id).fetch_optional(pool).await?
        });
        let Some((
            key_id,
            tenant,
            project,
            name,
            created_at_ms,
            revoked_at_ms,
            suspended_at_ms,
            suspended_reason,
            role,
            stored_hash,
        )) = row
        else {
            return Ok(None);
        };
        let row: KeyRow = (
            key_id,
            tenant,
            project,
            name,
            created_at_ms,
            revoked_at_ms,
            suspended_at_ms,
            suspended_reason,
            role,
        );
        let presented_hash = sha256_hex(secret);
        let matches: bool = presented_hash
            .as_bytes()
            .ct_eq(stored_hash.as_bytes())
            .into();
        if !matches || revoked_at_ms.is_some() {
            return Ok(None);
        }
        key_from_row(row).map(Some)
    }

    /// One key's record (revoked or not), by id.
    pub async fn key(&self, key_id: &KeyId) -> Result<ApiKeyRecord, LedgerError> {
        let sql = concat!(
            "SELECT ",
            key_columns!(),
            " FROM api_keys WHERE key_id = $1"
        );
        let row: Option<KeyRow> = on_store!(&self.store, pool => {
            sqlx::query_as(sql).bind(&key_id.0).fetch_optional(pool).await?
        });
        match row {
            Some(row) => key_from_row(row),
            None => Err(LedgerError::KeyNotFound {
                key_id: key_id.0.clone(),
            }),
        }
    }

    /// Suspends a key: every replica refuses it from its next request until
    /// [`Ledger::reinstate_key`]. Audited as `key.suspend`. Returns `false` when it was already
    /// suspended (the first suspension's time and reason are kept, nothing is audited).
    pub async fn suspend_key(
        &self,
        key_id: &KeyId,
        reason: &str,
        audit: &AuditContext,
    ) -> Result<bool, LedgerError> {
        if reason.is_empty() || reason.len() > SUSPENDED_REASON_BYTES_MAX {
            return Err(LedgerError::OutOfRange {
                field: "suspension reason",
            });
        }
        self.change_key(key_id, audit, KeyChange::Suspend { reason })
            .await
    }

    /// Lifts a key's suspension, audited as `key.reinstate`; returns `false` when it was not
    /// suspended (nothing audited).
    pub async fn reinstate_key(
        &self,
        key_id: &KeyId,
        audit: &AuditContext,
    ) -> Result<bool, LedgerError> {
        self.change_key(key_id, audit, KeyChange::Reinstate).await
    }

    /// One transaction for the three changes of a key's state: reads the state under the audit
    /// head's lock, changes it if the change applies, audits it with the state before and after.
    /// `false`: the change did not apply (nothing written).
    async fn change_key(
        &self,
        key_id: &KeyId,
        audit: &AuditContext,
        key_change: KeyChange<'_>,
    ) -> Result<bool, LedgerError> {
        let sql = concat!(
            "SELECT ",
            key_columns!(),
            " FROM api_keys WHERE key_id = $1"
        );
        let _gate = self.gate.enter().await;
        on_store!(&self.store, pool => {
            let mut tx = pool.begin_with(self.store.begin_write_sql()).await?;
            let head = tx.lock_audit_head().await?;
            let now_ms = self.now_ms();
            let row: Option<KeyRow> = sqlx::query_as(sql).bind(&key_id.0).fetch_optional(&mut *tx).await?;
            let Some(row) = row else {
                return Err(LedgerError::KeyNotFound { key_id: key_id.0.clone() });
            };
            let before = key_from_row(row)?;
            let mut after = before.clone();
            let (action, applies) = match key_change {
                KeyChange::Revoke => {
                    after.revoked_at_ms = Some(now_ms);
                    ("key.revoke", before.revoked_at_ms.is_none())
                }
                KeyChange::Suspend { reason } => {
                    after.suspended_at_ms = Some(now_ms);
                    after.suspended_reason = Some(reason.to_owned());
                    ("key.suspend", before.suspended_at_ms.is_none())
                }
                KeyChange::Reinstate => {
                    after.suspended_at_ms = None;
                    after.suspended_reason = None;
                    ("key.reinstate", before.suspended_at_ms.is_some())
                }
            };
            if !applies {
                return Ok(false);
            }
            sqlx::query(
                "UPDATE api_keys SET revoked_at_ms = $2, suspended_at_ms = $3, \
                 suspended_reason = $4 WHERE key_id = $1",
            )
            .bind(&key_id.0)
            .bind(after.revoked_at_ms)
            .bind(after.suspended_at_ms)
            .bind(after.suspended_reason.as_deref())
            .execute(&mut *tx)
            .await?;
            let state = |key: &ApiKeyRecord| serde_json::json!({
                "revoked_at_ms": key.revoked_at_ms,
                "suspended_at_ms": key.suspended_at_ms,
                "suspended_reason": key.suspended_reason,
            });
            let change = Change {
                action,
                target: format!("key:{key_id}"),
                details: serde_json::json!({
                    "tenant": before.tenant.as_str(),
                    "project": before.project.as_str(),
                    "before": state(&before),
                    "after": state(&after),
                }),
            };
            self.append_in(&mut *tx, head, audit, now_ms, change).await?;
            tx.commit().await?;
            Ok(true)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_shape() {
        let mut rng = rand::rng();
        let key_id = random_string(&mut rng, KEY_ID_ALPHABET, KEY_ID_LEN);
        let body = random_string(&mut rng, BASE62_ALPHABET, KEY_SECRET_LEN);
        let key = format!("tp-{key_id}-{body}");
        assert_eq!(parse_key(&key), Some(key_id.as_str()));
        assert_eq!(parse_key("tp-short-x"), None);
        assert_eq!(parse_key(&format!("tp-{key_id}-{body}x")), None);
        assert_eq!(
            parse_key(&format!("tp-{}-{body}", key_id.to_uppercase())),
            None
        );
        assert_eq!(parse_key(&format!("xx-{key_id}-{body}")), None);
        assert_eq!(sha256_hex("abc").len(), 64);
    }
}
