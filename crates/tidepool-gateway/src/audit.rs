//! The audit surface of the admin API: `GET /admin/audit` (the hash-chained log, paginated, with
//! the chain's verdict, or as JSON lines) and `POST /admin/keys/{key_id}/reinstate` (lifts a
//! leaked-key suspension). Every admin handler passes `state::admin_audit()` to its ledger call,
//! which appends the audit entry in the change's own transaction; events that change nothing in
//! the ledger (a model loaded or unloaded, a request refused by residency) go through
//! `AppState::audit_event`. [`audit_checkpointing`] reads `[audit]` for the server and the CLI.
#![expect(
    unused_qualifications,
    reason = "utoipa's `params(..)` expansion qualifies the query types it is given"
)]

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tidepool_core::KeyId;
use tidepool_core::config::AuditConfig;
use tidepool_ledger::{
    AUDIT_PAGE_LEN_MAX, AuditCheckpoint, AuditCheckpointing, AuditEntry, AuditKey, LedgerError,
};
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ErrorBody};
use crate::load::ServeError;
use crate::state::{AppState, admin_audit};

/// The ledger's checkpointing from `[audit]`: `None` when the key's variable is unset or empty.
pub fn audit_checkpointing(config: &AuditConfig) -> Result<Option<AuditCheckpointing>, ServeError> {
    let Some(key) = config.checkpoint_key() else {
        return Ok(None);
    };
    let key = AuditKey::new(key).map_err(|_| ServeError::AuditKey {
        var: config.checkpoint_key_env.clone(),
    })?;
    Ok(Some(AuditCheckpointing {
        key,
        every_entries: config.checkpoint_every_entries,
        interval_ms: config.checkpoint_interval_ms,
    }))
}

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
    /// `json` (default): a page with the chain's verdict; `jsonl`: the page's entries only, one
    /// JSON object per line (`application/x-ndjson`), for export (the next page starts after the
    /// last line's `seq`).
    pub format: Option<String>,
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
    /// The request that made the change (`x-request-id`), if any.
    pub request_id: Option<String>,
    pub prev_hash: String,
    pub hash: String,
}

/// The JSON form of an entry, also each line of an export.
pub fn entry_out(entry: AuditEntry) -> AuditEntryOut {
    AuditEntryOut {
        seq: entry.seq,
        at_ms: entry.at_ms,
        actor: entry.actor.as_str().to_owned(),
        action: entry.action,
        target: entry.target,
        // The stored text is what the hash covers; shown parsed (it was JSON when written).
        details: serde_json::from_str(&entry.details)
            .unwrap_or(serde_json::Value::String(entry.details)),
        request_id: entry.request_id,
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
    /// Signed checkpoints the verification checked against their entries.
    pub chain_checkpoints: u64,
    /// Whether the checkpoints' signatures were checked (a checkpoint key is configured).
    pub checkpoint_signatures_checked: bool,
    /// The newest checkpoint that verified: keep a copy outside the database.
    pub latest_checkpoint: Option<AuditCheckpointOut>,
}

/// A signed checkpoint of the audit chain: entry `seq` had hash `hash`.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditCheckpointOut {
    pub seq: i64,
    pub hash: String,
    pub created_at_ms: i64,
    /// HMAC-SHA256 (hex) of the other fields under the checkpoint key.
    pub hmac: String,
}

fn checkpoint_out(checkpoint: AuditCheckpoint) -> AuditCheckpointOut {
    AuditCheckpointOut {
        seq: checkpoint.seq,
        hash: checkpoint.hash,
        created_at_ms: checkpoint.created_at_ms,
        hmac: checkpoint.hmac,
    }
}

/// Entries as JSON lines, each ending with a newline.
pub fn jsonl(entries: Vec<AuditEntry>) -> Result<String, serde_json::Error> {
    let mut out = String::new();
    for entry in entries {
        out.push_str(&serde_json::to_string(&entry_out(entry))?);
        out.push('\n');
    }
    Ok(out)
}

#[utoipa::path(get, path = "/admin/audit", tag = "admin", params(AuditQuery),
    security(("admin" = [])),
    responses(
        (status = 200, description = "A page of the audit log, oldest first, with the whole chain's verdict; with `format=jsonl`, the page's entries as JSON lines", body = AuditPage),
        (status = 400, description = "`invalid_request_error` (`limit` out of 1..=1000, `format` not `json` or `jsonl`)", body = ErrorBody),
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
        let as_lines = match query.format.as_deref() {
            None | Some("json") => false,
            Some("jsonl") => true,
            Some(_) => {
                return Err(ApiError::invalid_param(
                    "format",
                    "must be `json` or `jsonl`",
                ));
            }
        };
        let after = query.after.unwrap_or(0);
        let entries = state.ledger().list_audit(after, limit).await?;
        if as_lines {
            let body = jsonl(entries).map_err(|_| {
                ApiError::Ledger(LedgerError::Corrupt {
                    what: "audit entry",
                })
            })?;
            let content_type = HeaderValue::from_static("application/x-ndjson");
            return Ok(([(header::CONTENT_TYPE, content_type)], body).into_response());
        }
        let verdict = state.ledger().verify_audit_chain(None).await?;
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
            chain_checkpoints: verdict.checkpoints,
            checkpoint_signatures_checked: verdict.signatures_checked,
            latest_checkpoint: verdict.latest_checkpoint.map(checkpoint_out),
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
        let reinstated = state
            .ledger()
            .reinstate_key(&key_id, &admin_audit())
            .await?;
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
