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
use tidepool_ledger::{ApiKeyRecord, Day, Month, USAGE_DAILY_DAYS_MAX};
use utoipa::{IntoParams, ToSchema};

use crate::accounts::{
    BudgetItemOut, budget_item, check_tenant, parse_month, query_params, tenant_id,
};
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
        let data = budgets.into_iter().map(budget_item).collect();
        Ok::<_, ApiError>(Json(BudgetList {
            object: "list",
            data,
        }))
    }
    .await;
    result.map_or_else(IntoResponse::into_response, IntoResponse::into_response)
}

/// Query of `GET /admin/tenants/{tenant}/usage/daily`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DailyUsageQuery {
    /// Days up to and including today (UTC), 1 to 366; default 30.
    pub days: Option<u32>,
}

/// Days of usage a chart shows unless asked otherwise.
pub const DAILY_USAGE_DAYS_DEFAULT: u32 = 30;

/// One day's usage by one key of one project on one model.
#[derive(Debug, Serialize, ToSchema)]
pub struct DailyUsageOut {
    /// `YYYY-MM-DD`, UTC.
    pub day: String,
    /// `null` for requests refused before they reserved.
    pub project: Option<String>,
    pub key_id: String,
    /// `null` for requests that failed before a model was resolved.
    pub model: Option<String>,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub cached_prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_nanos: i64,
}

/// A tenant's daily usage, read from the ledger's pre-aggregated rollup.
#[derive(Debug, Serialize, ToSchema)]
pub struct DailyUsageList {
    /// Always `list`.
    pub object: &'static str,
    pub tenant: String,
    pub currency: String,
    /// First and last day, `YYYY-MM-DD` (UTC), both included.
    pub from: String,
    pub to: String,
    pub data: Vec<DailyUsageOut>,
}

#[utoipa::path(get, path = "/admin/tenants/{tenant}/usage/daily", tag = "admin",
    params(("tenant" = String, Path), DailyUsageQuery), security(("admin" = []), ("bearer" = [])),
    responses((status = 200, body = DailyUsageList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, description = "`not_found`: not this tenant's `tenant-admin` key nor the operator", body = ErrorBody)))]
pub(crate) async fn daily_usage(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(tenant): Path<String>,
    query: Result<Query<DailyUsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let result = async {
        let query = query_params(query, "days")?;
        let tenant = tenant_id(&tenant)?;
        principal::tenant_admin(&state, &headers, &tenant).await?;
        let days = query.days.unwrap_or(DAILY_USAGE_DAYS_DEFAULT);
        if !(1..=USAGE_DAILY_DAYS_MAX).contains(&days) {
            return Err(ApiError::invalid_param(
                "days",
                format!("must be 1 to {USAGE_DAILY_DAYS_MAX}"),
            ));
        }
        let to = Day::of_ms(state.now_ms());
        let from = Day::from_days_since_epoch(to.days_since_epoch() - i64::from(days - 1));
        let account = state.ledger().account(&tenant).await?;
        let rows = state.ledger().usage_daily(&tenant, from, to).await?;
        Ok::<_, ApiError>(Json(DailyUsageList {
            object: "list",
            tenant: tenant.to_string(),
            currency: account.currency.to_string(),
            from: from.to_string(),
            to: to.to_string(),
            data: rows
                .into_iter()
                .map(|row| DailyUsageOut {
                    day: row.day.to_string(),
                    project: row.project.map(|p| p.to_string()),
                    key_id: row.key_id.0,
                    model: row.model.map(|m| m.to_string()),
                    requests: row.requests,
                    prompt_tokens: row.prompt_tokens,
                    cached_prompt_tokens: row.cached_prompt_tokens,
                    completion_tokens: row.completion_tokens,
                    cost_nanos: row.cost.0,
                })
                .collect(),
        }))
    }
    .await;
    result.map_or_else(IntoResponse::into_response, IntoResponse::into_response)
}

/// Query of `GET /admin/tenants`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TenantsQuery {
    /// `YYYY-MM` (UTC); default: this month.
    pub month: Option<String>,
}

/// One tenant's account and its spend in the month.
#[derive(Debug, Serialize, ToSchema)]
pub struct TenantSpendOut {
    pub tenant: String,
    pub currency: String,
    pub balance_nanos: i64,
    pub reserved_nanos: i64,
    pub month_cost_nanos: i64,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub cached_prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// Every tenant's spend in a month (the operator's).
#[derive(Debug, Serialize, ToSchema)]
pub struct TenantSpendList {
    /// Always `list`.
    pub object: &'static str,
    pub month: String,
    pub data: Vec<TenantSpendOut>,
}

#[utoipa::path(get, path = "/admin/tenants", tag = "admin", params(TenantsQuery),
    security(("admin" = [])),
    responses((status = 200, body = TenantSpendList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, description = "`not_found`: not the operator", body = ErrorBody)))]
pub(crate) async fn list_tenants(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<TenantsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let result = async {
        principal::operator(&state, &headers).await?;
        let query = query_params(query, "month")?;
        let month = match parse_month(query.month.as_deref())? {
            Some(month) => month,
            None => Month::of_ms(state.now_ms()),
        };
        let spend = state.ledger().tenant_spend(month).await?;
        Ok::<_, ApiError>(Json(TenantSpendList {
            object: "list",
            month: month.to_string(),
            data: spend
                .into_iter()
                .map(|row| TenantSpendOut {
                    tenant: row.tenant.to_string(),
                    currency: row.currency.to_string(),
                    balance_nanos: row.balance.0,
                    reserved_nanos: row.reserved.0,
                    month_cost_nanos: row.month_cost.0,
                    requests: row.requests,
                    prompt_tokens: row.prompt_tokens,
                    cached_prompt_tokens: row.cached_prompt_tokens,
                    completion_tokens: row.completion_tokens,
                })
                .collect(),
        }))
    }
    .await;
    result.map_or_else(IntoResponse::into_response, IntoResponse::into_response)
}
