//! API keys: `tp-<key_id>-<secret>`. Only the SHA-256 of the whole key is stored; the key id is
//! the public lookup handle, and the hash comparison is constant-time. There is no cache, so a
//! revoke takes effect on the next request.

use rand::Rng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tidepool_core::{KeyId, TenantId};

use crate::accounts::ProjectId;
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

/// A fresh key id and the whole key (`tp-<key_id>-<secret>`).
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
    /// tenant's default project.
    pub async fn create_key(
        &self,
        tenant: &TenantId,
        name: &str,
    ) -> Result<CreatedKey, LedgerError> {
        self.create_key_in_project(tenant, &ProjectId::default_project(), name)
            .await
    }

    /// Creates a key in `project` of `tenant` (creating both if needed; a new tenant gets a USD
    /// account — use [`Ledger::create_tenant`] first for another currency).
    pub async fn create_key_in_project(
        &self,
        tenant: &TenantId,
        project: &ProjectId,
        name: &str,
    ) -> Result<CreatedKey, LedgerError> {
        self.create_key_with_role(tenant, project, name, KeyRole::Inference)
            .await
    }

    /// Creates a key with `role` in `project` of `tenant` (creating both if needed, as
    /// [`Ledger::create_key_in_project`]).
    pub async fn create_key_with_role(
        &self,
        tenant: &TenantId,
        project: &ProjectId,
        name: &str,
        role: KeyRole,
    ) -> Result<CreatedKey, LedgerError> {
        if name.is_empty() || name.len() > KEY_NAME_BYTES_MAX {
            return Err(LedgerError::OutOfRange { field: "key name" });
        }
        let (key_id, secret) = new_key();
        let hash = sha256_hex(&secret);
        let now_ms = self.now_ms();
        on_store!(&self.store, pool => {
            let mut tx = pool.begin().await?;
            sqlx::query(
                "INSERT INTO tenants (tenant_id, created_at_ms) VALUES ($1, $2) \
                 ON CONFLICT (tenant_id) DO NOTHING",
            )
            .bind(tenant.as_str())
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO accounts (tenant_id, currency, balance_nanos, reserved_nanos) \
                 VALUES ($1, 'USD', 0, 0) ON CONFLICT (tenant_id) DO NOTHING",
            )
            .bind(tenant.as_str())
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO projects (tenant_id, project_id, created_at_ms) VALUES ($1, $2, $3) \
                 ON CONFLICT (tenant_id, project_id) DO NOTHING",
            )
            .bind(tenant.as_str())
            .bind(project.as_str())
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
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
            tx.commit().await?;
        });
        let record = ApiKeyRecord {
            key_id: KeyId(key_id),
            tenant: tenant.clone(),
            project: project.clone(),
            name: name.to_owned(),
            created_at_ms: now_ms,
            revoked_at_ms: None,
            suspended_at_ms: None,
            suspended_reason: None,
            role,
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

    /// Revokes a key; it fails authentication at once. Revoking twice keeps the first time.
    pub async fn revoke_key(&self, key_id: &KeyId) -> Result<(), LedgerError> {
        let now_ms = self.now_ms();
        let found: Option<(String,)> = on_store!(&self.store, pool => {
            sqlx::query_as(
                "UPDATE api_keys SET revoked_at_ms = COALESCE(revoked_at_ms, $2) \
                 WHERE key_id = $1 RETURNING key_id",
            )
            .bind(&key_id.0)
            .bind(now_ms)
            .fetch_optional(pool)
            .await?
        });
        match found {
            Some(_) => Ok(()),
            None => Err(LedgerError::KeyNotFound {
                key_id: key_id.0.clone(),
            }),
        }
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
    /// [`Ledger::reinstate_key`]. Returns `false` when it was already suspended (the first
    /// suspension's time and reason are kept).
    pub async fn suspend_key(&self, key_id: &KeyId, reason: &str) -> Result<bool, LedgerError> {
        if reason.is_empty() || reason.len() > SUSPENDED_REASON_BYTES_MAX {
            return Err(LedgerError::OutOfRange {
                field: "suspension reason",
            });
        }
        let now_ms = self.now_ms();
        let changed = on_store!(&self.store, pool => {
            sqlx::query(
                "UPDATE api_keys SET suspended_at_ms = $2, suspended_reason = $3 \
                 WHERE key_id = $1 AND suspended_at_ms IS NULL",
            )
            .bind(&key_id.0)
            .bind(now_ms)
            .bind(reason)
            .execute(pool)
            .await?
            .rows_affected()
        });
        if changed == 0 {
            // Already suspended, or no such key.
            self.key(key_id).await?;
        }
        Ok(changed == 1)
    }

    /// Lifts a key's suspension; returns `false` when it was not suspended.
    pub async fn reinstate_key(&self, key_id: &KeyId) -> Result<bool, LedgerError> {
        let changed = on_store!(&self.store, pool => {
            sqlx::query(
                "UPDATE api_keys SET suspended_at_ms = NULL, suspended_reason = NULL \
                 WHERE key_id = $1 AND suspended_at_ms IS NOT NULL",
            )
            .bind(&key_id.0)
            .execute(pool)
            .await?
            .rows_affected()
        });
        if changed == 0 {
            self.key(key_id).await?;
        }
        Ok(changed == 1)
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
