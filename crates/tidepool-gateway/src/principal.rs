//! Who calls the operator and tenant-admin endpoints, and what each caller may see.
//!
//! A caller is the **operator** (the admin token, as a bearer or through an operator console
//! session) or an **API key** (as a bearer or through a tenant console session). Two guards
//! decide every non-model endpoint:
//! - [`operator`]: `/v1/pool`, `/v1/backends`, `/metrics` on the public listener and the
//!   operator's `/admin/*` calls. An API key of any role gets 404 `not_found`, exactly as for a
//!   path that does not exist, so a tenant cannot even learn which operator endpoints exist.
//! - [`tenant_admin`]: a tenant's keys, budgets, usage and statement. The operator may act on
//!   any tenant; a `tenant-admin` key only on its own. Another tenant's key, or an `inference`
//!   key, gets 404 `not_found`: never 403, never a hint that the tenant exists.

use axum::http::{HeaderMap, header};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac as _};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tidepool_core::{KeyId, TenantId};
use tidepool_ledger::{ApiKeyRecord, AuditActor, KeyRole};

use crate::error::ApiError;
use crate::extract::{bearer, unsuspended};
use crate::state::AppState;

/// An authenticated caller of an admin endpoint.
#[derive(Debug, Clone)]
pub(crate) enum Caller {
    Operator,
    /// A live (not revoked, not suspended) API key.
    Key(ApiKeyRecord),
}

impl Caller {
    /// Who the audit log names.
    pub(crate) fn audit_actor(&self) -> AuditActor {
        match self {
            Self::Operator => AuditActor::Admin,
            Self::Key(record) => AuditActor::Key(record.key_id.clone()),
        }
    }

    /// May this caller act on `tenant`'s keys, budgets, usage and statement?
    pub(crate) fn may_administer(&self, tenant: &TenantId) -> bool {
        match self {
            Self::Operator => true,
            Self::Key(record) => record.role == KeyRole::TenantAdmin && record.tenant == *tenant,
        }
    }
}

/// The caller behind a request's bearer token or console cookie; `None` when neither names
/// one (no credentials, a wrong token, a revoked key). A bearer, when present, wins over the
/// cookie. A suspended key is refused with its own error.
pub(crate) async fn caller(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<Option<Caller>, ApiError> {
    if let Some(token) = bearer(headers) {
        if state.is_admin_token(token) {
            return Ok(Some(Caller::Operator));
        }
        let Some(record) = state.ledger().authenticate(token).await? else {
            return Ok(None);
        };
        return live_key(record).map(Some);
    }
    session_caller(state, headers).await
}

/// A key that authenticated, unless it is suspended.
pub(crate) fn live_key(record: ApiKeyRecord) -> Result<Caller, ApiError> {
    unsuspended(record).map(Caller::Key)
}

/// Only the operator passes. Without a configured admin token the operator endpoints do not
/// exist (404); an API key gets 404 as well; missing or wrong credentials get 401.
pub(crate) async fn operator(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    if !state.admin_enabled() {
        return Err(ApiError::RouteNotFound);
    }
    match caller(state, headers).await? {
        Some(Caller::Operator) => Ok(()),
        Some(Caller::Key(_)) => Err(ApiError::RouteNotFound),
        None => Err(ApiError::AdminUnauthorized),
    }
}

/// The operator, or a `tenant-admin` key of `tenant`; any other key gets 404.
pub(crate) async fn tenant_admin(
    state: &AppState,
    headers: &HeaderMap,
    tenant: &TenantId,
) -> Result<Caller, ApiError> {
    let caller = any_admin(state, headers).await?;
    if caller.may_administer(tenant) {
        Ok(caller)
    } else {
        Err(ApiError::RouteNotFound)
    }
}

/// The operator or a `tenant-admin` key of any tenant (the handler then checks the tenant of
/// what the request names, with [`Caller::may_administer`]); an `inference` key gets 404.
pub(crate) async fn any_admin(state: &AppState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    match caller(state, headers).await? {
        Some(Caller::Operator) => Ok(Caller::Operator),
        Some(Caller::Key(record)) if record.role == KeyRole::TenantAdmin => Ok(Caller::Key(record)),
        Some(Caller::Key(_)) => Err(ApiError::RouteNotFound),
        // Without an admin token the admin API exists only for `tenant-admin` keys.
        None => Err(if state.admin_enabled() {
            ApiError::AdminUnauthorized
        } else {
            ApiError::RouteNotFound
        }),
    }
}

/// The tenant a key belongs to, if the caller may see it; 404 `not_found` otherwise (another
/// tenant's key looks exactly like a key that does not exist).
pub(crate) async fn key_tenant(
    state: &AppState,
    caller: &Caller,
    key_id: &KeyId,
) -> Result<TenantId, ApiError> {
    let record = match state.ledger().key(key_id).await {
        Ok(record) => record,
        Err(tidepool_ledger::LedgerError::KeyNotFound { .. })
            if !matches!(caller, Caller::Operator) =>
        {
            return Err(ApiError::RouteNotFound);
        }
        Err(error) => return Err(error.into()),
    };
    if caller.may_administer(&record.tenant) {
        Ok(record.tenant)
    } else {
        Err(ApiError::RouteNotFound)
    }
}

// ---------------------------------------------------------------------------------------------
// Console sessions: the signed cookie (its endpoints are in `console.rs`).

/// The session cookie's name.
pub(crate) const SESSION_COOKIE: &str = "tidepool_console";
/// Longest cookie value read, in bytes (anything longer is not ours).
const SESSION_COOKIE_BYTES_MAX: usize = 1024;

/// What a session cookie says, before it is checked against the ledger.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Claims {
    /// `operator` or `tenant-admin`.
    pub(crate) r: String,
    /// The key id of a tenant session.
    pub(crate) k: Option<String>,
    /// Expiry, Unix seconds.
    pub(crate) e: i64,
}

type HmacSha256 = Hmac<Sha256>;

fn mac(state: &AppState) -> Result<HmacSha256, ApiError> {
    HmacSha256::new_from_slice(state.console_key()).map_err(|_| ApiError::ConsoleSignedOut)
}

pub(crate) fn sign(state: &AppState, claims: &Claims) -> Result<String, ApiError> {
    let payload = serde_json::to_vec(claims).map_err(|_| ApiError::ConsoleSignedOut)?;
    let payload = URL_SAFE_NO_PAD.encode(payload);
    let mut mac = mac(state)?;
    mac.update(b"v1.");
    mac.update(payload.as_bytes());
    let tag = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    Ok(format!("v1.{payload}.{tag}"))
}

/// The claims of a well-signed, unexpired cookie value.
fn verify(state: &AppState, value: &str) -> Option<Claims> {
    if value.len() > SESSION_COOKIE_BYTES_MAX {
        return None;
    }
    let rest = value.strip_prefix("v1.")?;
    let (payload, tag) = rest.split_once('.')?;
    let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
    let mut mac = mac(state).ok()?;
    mac.update(b"v1.");
    mac.update(payload.as_bytes());
    mac.verify_slice(&tag).ok()?;
    let claims: Claims = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
    (claims.e * 1000 > state.now_ms()).then_some(claims)
}

/// The value of our cookie in a request's `Cookie` headers.
pub(crate) fn cookie_value(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value.trim())
}

/// The caller a request's console cookie names, re-checked against the ledger; `None` when
/// there is no valid session.
pub(crate) async fn session_caller(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<Option<Caller>, ApiError> {
    Ok(session(state, headers).await?.map(|(caller, _)| caller))
}

/// The caller a request's console cookie names and the cookie's claims; `None` when there is no
/// valid session.
pub(crate) async fn session(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<Option<(Caller, Claims)>, ApiError> {
    let Some(claims) = cookie_value(headers).and_then(|value| verify(state, value)) else {
        return Ok(None);
    };
    let caller = claims_caller(state, &claims).await?;
    Ok(caller.map(|caller| (caller, claims)))
}

/// What verified claims name, re-checked against the ledger.
async fn claims_caller(state: &AppState, claims: &Claims) -> Result<Option<Caller>, ApiError> {
    match (claims.r.as_str(), &claims.k) {
        ("operator", None) if state.admin_enabled() => Ok(Some(Caller::Operator)),
        ("tenant-admin", Some(key_id)) => {
            let record = match state.ledger().key(&KeyId(key_id.clone())).await {
                Ok(record) => record,
                Err(tidepool_ledger::LedgerError::KeyNotFound { .. }) => return Ok(None),
                Err(error) => return Err(error.into()),
            };
            if record.revoked_at_ms.is_some() || record.role != KeyRole::TenantAdmin {
                return Ok(None);
            }
            live_key(record).map(Some)
        }
        _ => Ok(None),
    }
}
