//! A tenant's administration over HTTP, for `tenant-admin` keys, the console and the operator:
//! `GET /admin/tenants/{tenant}/keys`, `GET /admin/tenants/{tenant}/usage/daily` (the usage
//! chart, read from the ledger's daily rollups), `GET /admin/budgets?tenant=`, and the
//! operator's `GET /admin/tenants` (every tenant's spend in a month).
//!
//! Each handler is one guard ([`principal`]) and one ledger read; money is integer nano-units.
#![expect(
    unused_qualifications,
    reason = "utoipa's `params(..)` expansion qualifies the query types it is given"
)]

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tidepool_ledger::{ApiKeyRecord, BudgetScope};
use utoipa::{IntoParams, ToSchema};

use crate::accounts::{check_tenant, query_params, tenant_id};
use crate::error::{ApiError, ErrorBody};
use crate::principal;
use crate::state::AppState;

/// One API key, without its secret (which is never stored).
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyOut {
    /// Always `api_key`.
    pub object: &'static str,
    pub key_id: String,
    pub tenant: String,
    pub project: String,
    pub name: String,
    /// `inference` or `tenant-admin`.
    pub role: &'static str,
    pub created_at_ms: i64,
    pub revoked_at_ms: Option<i64>,
    pub suspended_at_ms: Option<i64>,
    pub suspended_reason: Option<String>,
}

impl From<ApiKeyRecord> for KeyOut {
    fn from(record: ApiKeyRecord) -> Self {
        Self {
            object: "api_key",
            key_id: record.key_id.0,
            tenant: record.tenant.to_string(),
            project: record.project.to_string(),
            name: record.name,
            role: record.role.as_str(),
            created_at_ms: record.created_at_ms,
            revoked_at_ms: record.revoked_at_ms,
            suspended_at_ms: record.suspended_at_ms,
            suspended_reason: record.suspended_reason,
        }
    }
}

/// A list of keys.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyList {
    /// Always `list`.
    pub object: &'static str,
    pub data: Vec<KeyOut>,
}

#[utoipa::path(get, path = "/admin/tenants/{tenant}/keys", tag = "admin",
    params(("tenant" = String, Path)), security(("admin" = []), ("bearer" = [])),
    responses((status = 200, body = KeyList), (status = 401, body = ErrorBody),
        (status = 404, description = "`not_found`: not this tenant's `tenant-admin` key nor the operator", body = ErrorBody)))]
pub(crate) async fn list_keys(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(tenant): Path<String>,
) -> Response {
    let result = async {
        let tenant = tenant_id(&tenant)?;
        principal::tenant_admin(&state, &headers, &tenant).await?;
        let keys = state.ledger().list_keys(Some(&tenant)).await?;
        Ok::<_, ApiError>(Json(KeyList {
            object: "list",
            data: keys.into_iter().map(KeyOut::from).collect(),
        }))
    }
    .await;
    result.map_or_else(IntoResponse::into_response, IntoResponse::into_response)
}

/// Query of `GET /admin/budgets`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct BudgetsQuery {
    pub tenant: String,
}

/// One budget and this month's use of it.
#[derive(Debug, Serialize, ToSchema)]
pub struct BudgetItemOut {
    /// Always `budget`.
    pub object: &'static str,
    /// `project` or `key`.
    pub scope: &'static str,
    pub project: Option<String>,
    pub key_id: Option<String>,
    pub month: String,
    pub limit_nanos: Option<i64>,
    pub reserved_nanos: i64,
    pub spent_nanos: i64,
}

/// A tenant's budgets.
#[derive(Debug, Serialize, ToSchema)]
pub struct BudgetList {
    /// Always `list`.
    pub object: &'static str,
    pub data: Vec<BudgetItemOut>,
}

#[utoipa::path(get, path = "/admin/budgets", tag = "admin", params(BudgetsQuery),
    security(("admin" = []), ("bearer" = [])),
    responses((status = 200, body = BudgetList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, description = "`not_found`: not this tenant's `tenant-admin` key nor the operator", body = ErrorBody)))]
pub(crate) async fn list_budgets(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<BudgetsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let result = async {
        let query = query_params(query, "tenant")?;
        let tenant = tenant_id(&query.tenant)?;
        let caller = principal::any_admin(&state, &headers).await?;
        check_tenant(&caller, &tenant)?;
        let budgets = state.ledger().tenant_budgets(&tenant).await?;
        let data = budgets
            .into_iter()
            .map(|(scope, status)| {
                let (scope, project, key_id) = match scope {
                    BudgetScope::Project { project, .. } => {
                        ("project", Some(project.to_string()), None)
                    }
                    BudgetScope::Key { key_id } => ("key", None, Some(key_id.0)),
                };
                BudgetItemOut {
                    object: "budget",
                    scope,
                    project,
                    key_id,
                    month: status.month.to_string(),
                    limit_nanos: status.limit.map(|limit| limit.0),
                    reserved_nanos: status.reserved.0,
                    spent_nanos: status.spent.0,
                }
            })
            .collect();
        Ok::<_, ApiError>(Json(BudgetList {
            object: "list",
            data,
        }))
    }
    .await;
    result.map_or_else(IntoResponse::into_response, IntoResponse::into_response)
}
