//! The audit surface of the admin API: `GET /admin/audit` (the hash-chained log, paginated, with
//! the chain's verdict) and `POST /admin/keys/{key_id}/reinstate` (lifts a leaked-key
//! suspension). Every admin handler audits its change with `AppState::audit_admin` once it
//! committed.
#![expect(
    unused_qualifications,
    reason = "utoipa's `params(..)` expansion qualifies the query types it is given"
)]

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tidepool_core::KeyId;
use tidepool_ledger::{AUDIT_PAGE_LEN_MAX, AuditEntry};
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ErrorBody};
use crate::state::AppState;

/// Entries of a `GET /admin/audit` page when `limit` is absent.
pub const AUDIT_PAGE_LEN_DEFAULT: u32 = 100;

/// Query of `GET /admin/audit`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Entries after this sequence number (0, the default: from the first).
    pub after: Option<i64>,
    /// Entries per page: 1 to 1000, default 100.
    pub limit: Option<u32>,
}

/// One audit entry.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditEntryOut {
    pub seq: i64,
    pub at_ms: i64,
    /// `admin`, `system`, or a key id.
    pub actor: String,
    pub action: String,
    pub target: String,
    /// The action's details (a JSON object).
    #[schema(value_type = Object)]
    pub details: serde_json::Value,
    pub prev_hash: String,
    pub hash: String,
}

fn entry_out(entry: AuditEntry) -> AuditEntryOut {
    AuditEntryOut {
        seq: entry.seq,
        at_ms: entry.at_ms,
        actor: entry.actor.as_str().to_owned(),
        action: entry.action,
        target: entry.target,
        // The stored text is what the hash covers; shown parsed (it was JSON when written).
        details: serde_json::from_str(&entry.details)
            .unwrap_or(serde_json::Value::String(entry.details)),
        prev_hash: entry.prev_hash,
        hash: entry.hash,
    }
}

/// A page of the audit log and the whole chain's verdict.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditPage {
    pub object: &'static str,
    pub data: Vec<AuditEntryOut>,
    /// Pass as `after` for the next page; `null` when this page is the last.
    pub next_after: Option<i64>,
    /// Whether the whole chain verifies (every entry's hash, every link, the head).
    pub chain_ok: bool,
    /// The first entry that does not verify, when `chain_ok` is false.
    pub first_broken_seq: Option<i64>,
    /// Why it does not.
    pub first_broken_reason: Option<String>,
    /// Entries the verification read.
    pub chain_entries: u64,
}

#[utoipa::path(get, path = "/admin/audit", tag = "admin", params(AuditQuery),
    security(("admin" = [])),
    responses(
        (status = 200, description = "A page of the audit log, oldest first, with the whole chain's verdict", body = AuditPage),
        (status = 400, description = "`invalid_request_error` (`limit` out of 1..=1000)", body = ErrorBody),
        (status = 401, description = "`invalid_admin_token`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    ))]
pub(crate) async fn list_audit(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let result: Result<Response, ApiError> = async {
        crate::principal::operator(&state, &headers).await?;
        let Query(query) = query.map_err(|e| ApiError::InvalidParam {
            param: "query",
            reason: e.body_text(),
        })?;
        let limit = query.limit.unwrap_or(AUDIT_PAGE_LEN_DEFAULT);
        if limit == 0 || limit > AUDIT_PAGE_LEN_MAX {
            return Err(ApiError::invalid_param(
                "limit",
                format!("must be 1 to {AUDIT_PAGE_LEN_MAX}"),
            ));
        }
        let after = query.after.unwrap_or(0);
        let entries = state.ledger().list_audit(after, limit).await?;
        let verdict = state.ledger().verify_audit_chain().await?;
        let full = entries.len() == usize::try_from(limit).unwrap_or(usize::MAX);
        let next_after = if full {
            entries.last().map(|e| e.seq)
        } else {
            None
        };
        Ok(Json(AuditPage {
            object: "list",
            data: entries.into_iter().map(entry_out).collect(),
            next_after,
            chain_ok: verdict.is_ok(),
            first_broken_seq: verdict.first_broken.as_ref().map(|b| b.seq),
            first_broken_reason: verdict.first_broken.map(|b| b.reason.to_owned()),
            chain_entries: verdict.entries,
        })
        .into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// The answer of `POST /admin/keys/{key_id}/reinstate`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReinstatedOut {
    pub object: &'static str,
    pub key_id: String,
    /// `false`: the key was not suspended (nothing changed, nothing audited).
    pub reinstated: bool,
}

#[utoipa::path(post, path = "/admin/keys/{key_id}/reinstate", tag = "admin",
    params(("key_id" = String, Path)), security(("admin" = [])),
    responses(
        (status = 200, description = "The key is no longer suspended (audited as `key.reinstate`)", body = ReinstatedOut),
        (status = 401, description = "`invalid_admin_token`", body = ErrorBody),
        (status = 404, description = "`resource_not_found`", body = ErrorBody),
    ))]
pub(crate) async fn reinstate_key(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(key_id): Path<String>,
) -> Response {
    let result: Result<Response, ApiError> = async {
        crate::principal::operator(&state, &headers).await?;
        let key_id = KeyId(key_id);
        let reinstated = state.ledger().reinstate_key(&key_id).await?;
        if reinstated {
            state
                .audit_admin(
                    "key.reinstate",
                    &format!("key:{key_id}"),
                    serde_json::json!({}),
                )
                .await?;
        }
        Ok((
            StatusCode::OK,
            Json(ReinstatedOut {
                object: "api_key.reinstate",
                key_id: key_id.0,
                reinstated,
            }),
        )
            .into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}
