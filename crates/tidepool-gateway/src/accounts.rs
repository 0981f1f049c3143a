//! The billing surface over HTTP: `GET /v1/usage` (a key's own usage and cost, scoped to its key,
//! project or tenant — never another tenant's) and the admin API under `/admin` (tenants,
//! projects, keys, prepaid credit, monthly budgets, RPM/TPM limits, usage and statements),
//! authenticated with the admin token (`--admin-token` / `TIDEPOOL_ADMIN_TOKEN`; without one the
//! admin API does not exist: 404).
//!
//! Money on the wire is exact: amounts are integers of nano-units (`*_nanos`) beside their
//! `currency`; amounts sent in are decimal strings of whole units (`"12.50"`), parsed without
//! floats. Every handler is one ledger call; errors go through `ApiError`. [`usage_report`] and
//! [`statement_out`] are public so the CLI prints the same JSON.
#![expect(
    unused_qualifications,
    reason = "utoipa's `params(..)` expansion qualifies the query types it is given"
)]

use axum::Json;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tidepool_core::{Currency, KeyId, ModelId, Nanos, RequestId, TenantId};
use tidepool_ledger::{
    Account, BudgetScope, BudgetStatus, KeyRole, LedgerError, ModelUsage, Month, ProjectId,
    RateLimits, RateScope, Statement, StatementLine, UsageScope,
};
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ErrorBody};
use crate::extract::{ApiJson, authenticate};
use crate::principal::{self, Caller};
use crate::state::{AppState, admin_audit, audit_context};
use crate::usage::UsageBreadth;

/// Query of `GET /v1/usage`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// `key` (default: the calling key), `project` (the key's project) or `tenant`.
    pub scope: Option<String>,
    /// A calendar month (UTC) as `YYYY-MM`; all time when absent.
    pub month: Option<String>,
}

/// Usage and cost of one model.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelUsageOut {
    pub model: String,
    pub requests: u64,
    /// Every prompt token, cached ones included.
    pub prompt_tokens: u64,
    /// Part of `prompt_tokens` served from a cached prefix, where known.
    pub cached_prompt_tokens: u64,
    /// Requests whose remote backend did not report cached tokens (billed as uncached input).
    pub cached_unknown_requests: u64,
    pub completion_tokens: u64,
    pub cost_nanos: i64,
    /// The cached prompt tokens' share of `cost_nanos` (at each price's cached-input rate,
    /// rounded up).
    pub cached_input_cost_nanos: i64,
}

/// `GET /v1/usage` and `GET /admin/tenants/{tenant}/usage`.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageReport {
    pub object: &'static str,
    pub tenant: String,
    /// `key`, `project` or `tenant`.
    pub scope: &'static str,
    pub project: Option<String>,
    pub key_id: Option<String>,
    pub month: Option<String>,
    pub currency: String,
    pub data: Vec<ModelUsageOut>,
    pub total_cost_nanos: i64,
    /// The part of `data` and `total_cost_nanos` that batch lines made (docs/batch.md).
    pub batch: BatchUsageOut,
}

/// Requests and cost of batch lines, at the batch price.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct BatchUsageOut {
    pub requests: u64,
    pub cost_nanos: i64,
}

/// A parsed query string, or a 400 naming `param`.
pub(crate) fn query_params<T>(
    query: Result<Query<T>, axum::extract::rejection::QueryRejection>,
    param: &'static str,
) -> Result<T, ApiError> {
    query
        .map(|Query(inner)| inner)
        .map_err(|e| ApiError::InvalidParam {
            param,
            reason: e.body_text(),
        })
}

pub(crate) fn parse_month(text: Option<&str>) -> Result<Option<Month>, ApiError> {
    text.map(|m| Month::parse(m).map_err(|_| ApiError::invalid_param("month", "must be YYYY-MM")))
        .transpose()
}

/// The JSON report of a usage summary.
pub fn usage_report(
    scope: &UsageScope,
    month: Option<Month>,
    currency: Currency,
    rows: Vec<ModelUsage>,
) -> Result<UsageReport, ApiError> {
    let (tenant, breadth, project, key_id) = match scope {
        UsageScope::Tenant(tenant) => (tenant, "tenant", None, None),
        UsageScope::Project { tenant, project } => {
            (tenant, "project", Some(project.to_string()), None)
        }
        UsageScope::Key { tenant, key_id } => (tenant, "key", None, Some(key_id.0.clone())),
    };
    let mut total = Nanos::ZERO;
    let mut data = Vec::with_capacity(rows.len());
    for row in rows {
        total = total
            .checked_add(row.cost)
            .ok_or(ApiError::Ledger(LedgerError::Core(
                tidepool_core::CoreError::MoneyOverflow {
                    what: "usage total",
                },
            )))?;
        data.push(ModelUsageOut {
            model: row.model,
            requests: row.requests,
            prompt_tokens: row.prompt_tokens,
            cached_prompt_tokens: row.cached_prompt_tokens,
            cached_unknown_requests: row.cached_unknown_requests,
            completion_tokens: row.completion_tokens,
            cost_nanos: row.cost.0,
            cached_input_cost_nanos: row.cached_input_cost.0,
        });
    }
    Ok(UsageReport {
        object: "usage",
        tenant: tenant.to_string(),
        scope: breadth,
        project,
        key_id,
        month: month.map(|m| m.to_string()),
        currency: currency.to_string(),
        data,
        total_cost_nanos: total.0,
        batch: BatchUsageOut::default(),
    })
}

#[utoipa::path(
    get,
    path = "/v1/usage",
    tag = "billing",
    params(UsageQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Usage and cost per model within the caller's own key, project or tenant", body = UsageReport),
        (status = 400, description = "`invalid_request_error`", body = ErrorBody),
        (status = 401, description = "`invalid_api_key`", body = ErrorBody),
    )
)]
pub(crate) async fn usage(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    headers: HeaderMap,
    query: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let mut guard = match authenticate(&state, &headers, request_id, "usage").await {
        Ok(guard) => guard,
        Err(error) => return error.into_response(),
    };
    let result = async {
        let query = query_params(query, "query")?;
        let breadth = match query.scope.as_deref() {
            None | Some("key") => UsageBreadth::Key,
            Some("project") => UsageBreadth::Project,
            Some("tenant") => UsageBreadth::Tenant,
            Some(_) => {
                return Err(ApiError::invalid_param(
                    "scope",
                    "must be `key`, `project` or `tenant`",
                ));
            }
        };
        let month = parse_month(query.month.as_deref())?;
        let scope = guard.usage_scope(breadth);
        let account = state.ledger().account(guard.tenant()).await?;
        let rows = state.ledger().usage_summary(&scope, month).await?;
        let mut report = usage_report(&scope, month, account.currency, rows)?;
        let (requests, cost_nanos) = state.ledger().batch_usage(&scope, month).await?;
        report.batch = BatchUsageOut {
            requests,
            cost_nanos,
        };
        Ok(report)
    }
    .await;
    match result {
        Ok(report) => {
            guard.succeed(0, Some(0), 0);
            Json(report).into_response()
        }
        Err(error) => {
            guard.fail(&error);
            error.into_response()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Admin API

pub(crate) fn tenant_id(text: &str) -> Result<TenantId, ApiError> {
    TenantId::new(text).map_err(|e| ApiError::invalid_param("tenant", e.to_string()))
}

pub(crate) fn project_id(text: &str) -> Result<ProjectId, ApiError> {
    ProjectId::new(text).map_err(|e| ApiError::invalid_param("project", e.to_string()))
}

fn amount(param: &'static str, text: &str) -> Result<Nanos, ApiError> {
    Nanos::parse_decimal(text).map_err(|e| ApiError::invalid_param(param, e.to_string()))
}

/// A tenant's prepaid account.
#[derive(Debug, Serialize, ToSchema)]
pub struct AccountOut {
    pub object: &'static str,
    pub tenant: String,
    pub currency: String,
    /// Credits minus settled costs.
    pub balance_nanos: i64,
    /// Holds of requests in flight.
    pub reserved_nanos: i64,
    /// What new requests may still reserve: balance − reserved.
    pub available_nanos: i64,
    pub projects: Vec<String>,
    /// The budgets of its projects and keys, with this month's use (as `GET /admin/budgets`).
    pub budgets: Vec<BudgetItemOut>,
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

/// The JSON form of one budget.
pub(crate) fn budget_item((scope, status): (BudgetScope, BudgetStatus)) -> BudgetItemOut {
    let (scope, project, key_id) = match scope {
        BudgetScope::Project { project, .. } => ("project", Some(project.to_string()), None),
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
}

fn account_out(
    account: &Account,
    projects: &[ProjectId],
    budgets: Vec<(BudgetScope, BudgetStatus)>,
) -> AccountOut {
    AccountOut {
        object: "account",
        tenant: account.tenant.to_string(),
        currency: account.currency.to_string(),
        balance_nanos: account.balance.0,
        reserved_nanos: account.reserved.0,
        available_nanos: account.available().0,
        projects: projects.iter().map(ToString::to_string).collect(),
        budgets: budgets.into_iter().map(budget_item).collect(),
    }
}

pub(crate) async fn account_of(
    state: &AppState,
    tenant: &TenantId,
) -> Result<AccountOut, ApiError> {
    let account = state.ledger().account(tenant).await?;
    let projects = state.ledger().list_projects(tenant).await?;
    let budgets = state.ledger().tenant_budgets(tenant).await?;
    Ok(account_out(&account, &projects, budgets))
}

/// `POST /admin/tenants`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTenant {
    pub tenant: String,
    /// ISO 4217 code of the account; `USD` when absent.
    pub currency: Option<String>,
}

/// An operator-only handler: the body runs once [`principal::operator`] passed.
macro_rules! admin_handler {
    ($state:expr, $headers:expr, $body:block) => {{
        let result: Result<Response, ApiError> = async {
            principal::operator(&$state, &$headers).await?;
            $body
        }
        .await;
        result.unwrap_or_else(IntoResponse::into_response)
    }};
}

/// A handler any admin may call; the body gets the [`Caller`] and checks the tenant it acts on.
macro_rules! caller_handler {
    ($state:expr, $headers:expr, |$caller:ident| $body:block) => {{
        let result: Result<Response, ApiError> = async {
            let $caller = principal::any_admin(&$state, &$headers).await?;
            $body
        }
        .await;
        result.unwrap_or_else(IntoResponse::into_response)
    }};
}

/// 404 unless `caller` may act on `tenant` (another tenant looks like nothing at all).
pub(crate) fn check_tenant(caller: &Caller, tenant: &TenantId) -> Result<(), ApiError> {
    if caller.may_administer(tenant) {
        Ok(())
    } else {
        Err(ApiError::RouteNotFound)
    }
}

#[utoipa::path(post, path = "/admin/tenants", tag = "admin", request_body = CreateTenant,
    security(("admin" = [])),
    responses((status = 201, body = AccountOut), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub(crate) async fn create_tenant(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<ApiJson<CreateTenant>, ApiError>,
) -> Response {
    admin_handler!(state, headers, {
        let ApiJson(body) = body?;
        let tenant = tenant_id(&body.tenant)?;
        let currency = match body.currency.as_deref() {
            Some(code) => Currency::parse(code)
                .map_err(|e| ApiError::invalid_param("currency", e.to_string()))?,
            None => Currency::USD,
        };
        state
            .ledger()
            .create_tenant(&tenant, currency, &admin_audit())
            .await?;
        Ok((
            StatusCode::CREATED,
            Json(account_of(&state, &tenant).await?),
        )
            .into_response())
    })
}

#[utoipa::path(get, path = "/admin/tenants/{tenant}", tag = "admin",
    params(("tenant" = String, Path)), security(("admin" = [])),
    responses((status = 200, body = AccountOut), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn get_tenant(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(tenant): Path<String>,
) -> Response {
    caller_handler!(state, headers, |caller| {
        let tenant = tenant_id(&tenant)?;
        check_tenant(&caller, &tenant)?;
        Ok(Json(account_of(&state, &tenant).await?).into_response())
    })
}

/// `POST /admin/tenants/{tenant}/projects`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProject {
    pub project: String,
}

#[utoipa::path(post, path = "/admin/tenants/{tenant}/projects", tag = "admin",
    params(("tenant" = String, Path)), request_body = CreateProject, security(("admin" = [])),
    responses((status = 201, body = AccountOut), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn create_project(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(tenant): Path<String>,
    body: Result<ApiJson<CreateProject>, ApiError>,
) -> Response {
    caller_handler!(state, headers, |caller| {
        let ApiJson(body) = body?;
        let tenant = tenant_id(&tenant)?;
        check_tenant(&caller, &tenant)?;
        let project = project_id(&body.project)?;
        state
            .ledger()
            .create_project(&tenant, &project, &audit_context(caller.audit_actor()))
            .await?;
        Ok((
            StatusCode::CREATED,
            Json(account_of(&state, &tenant).await?),
        )
            .into_response())
    })
}

/// `POST /admin/tenants/{tenant}/credits`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreditRequest {
    /// Whole currency units as a decimal string, e.g. `"25.00"`; positive.
    pub amount: String,
    /// Shown on the statement.
    #[serde(default)]
    pub note: String,
}

#[utoipa::path(post, path = "/admin/tenants/{tenant}/credits", tag = "admin",
    params(("tenant" = String, Path)), request_body = CreditRequest, security(("admin" = [])),
    responses((status = 200, body = AccountOut), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn credit(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(tenant): Path<String>,
    body: Result<ApiJson<CreditRequest>, ApiError>,
) -> Response {
    admin_handler!(state, headers, {
        let ApiJson(body) = body?;
        let tenant = tenant_id(&tenant)?;
        let amount = amount("amount", &body.amount)?;
        if amount <= Nanos::ZERO {
            return Err(ApiError::invalid_param("amount", "must be positive"));
        }
        state
            .ledger()
            .credit(&tenant, amount, &body.note, &admin_audit())
            .await?;
        Ok(Json(account_of(&state, &tenant).await?).into_response())
    })
}

/// `POST /admin/keys`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    pub tenant: String,
    /// `default` when absent.
    pub project: Option<String>,
    pub name: String,
    /// `inference` (default) or `tenant-admin`.
    pub role: Option<String>,
}

/// A new key: the only time its secret is shown.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedKeyOut {
    pub object: &'static str,
    pub key: String,
    pub key_id: String,
    pub tenant: String,
    pub project: String,
    pub name: String,
    /// `inference` or `tenant-admin`.
    pub role: &'static str,
}

#[utoipa::path(post, path = "/admin/keys", tag = "admin", request_body = CreateKey,
    security(("admin" = [])),
    responses((status = 201, body = CreatedKeyOut), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub(crate) async fn create_key(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<ApiJson<CreateKey>, ApiError>,
) -> Response {
    caller_handler!(state, headers, |caller| {
        let ApiJson(body) = body?;
        let tenant = tenant_id(&body.tenant)?;
        check_tenant(&caller, &tenant)?;
        let project = match body.project.as_deref() {
            Some(project) => project_id(project)?,
            None => ProjectId::default_project(),
        };
        let role = match body.role.as_deref() {
            None => KeyRole::Inference,
            Some(text) => KeyRole::parse(text).ok_or_else(|| {
                ApiError::invalid_param("role", "must be `inference` or `tenant-admin`")
            })?,
        };
        let created = state
            .ledger()
            .create_key_with_role(
                &tenant,
                &project,
                &body.name,
                role,
                &audit_context(caller.audit_actor()),
            )
            .await?;
        let out = CreatedKeyOut {
            object: "api_key",
            key: created.secret,
            key_id: created.record.key_id.0,
            tenant: created.record.tenant.to_string(),
            project: created.record.project.to_string(),
            name: created.record.name,
            role: created.record.role.as_str(),
        };
        Ok((StatusCode::CREATED, Json(out)).into_response())
    })
}

#[utoipa::path(delete, path = "/admin/keys/{key_id}", tag = "admin",
    params(("key_id" = String, Path)), security(("admin" = [])),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn revoke_key(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(key_id): Path<String>,
) -> Response {
    caller_handler!(state, headers, |caller| {
        let key_id = KeyId(key_id);
        principal::key_tenant(&state, &caller, &key_id).await?;
        state
            .ledger()
            .revoke_key(&key_id, &audit_context(caller.audit_actor()))
            .await?;
        Ok(StatusCode::NO_CONTENT.into_response())
    })
}

/// `PUT /admin/budgets`: a project's or a key's monthly budget.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BudgetRequest {
    /// `project` (with `tenant` and `project`) or `key` (with `key_id`).
    pub scope: String,
    pub tenant: Option<String>,
    pub project: Option<String>,
    pub key_id: Option<String>,
    /// Whole currency units per calendar month (UTC), e.g. `"5.00"`; `null` removes the budget.
    pub limit: Option<String>,
}

/// A budget and what the current month has used of it.
#[derive(Debug, Serialize, ToSchema)]
pub struct BudgetOut {
    pub object: &'static str,
    pub month: String,
    pub limit_nanos: Option<i64>,
    pub reserved_nanos: i64,
    pub spent_nanos: i64,
}

fn budget_scope(
    scope: &str,
    tenant: Option<&str>,
    project: Option<&str>,
    key_id: Option<&str>,
) -> Result<BudgetScope, ApiError> {
    match (scope, tenant, project, key_id) {
        ("project", Some(tenant), Some(project), None) => Ok(BudgetScope::Project {
            tenant: tenant_id(tenant)?,
            project: project_id(project)?,
        }),
        ("key", None, None, Some(key_id)) => Ok(BudgetScope::Key {
            key_id: KeyId(key_id.to_owned()),
        }),
        _ => Err(ApiError::invalid_param(
            "scope",
            "`project` needs `tenant` and `project`; `key` needs `key_id` alone",
        )),
    }
}

#[utoipa::path(put, path = "/admin/budgets", tag = "admin", request_body = BudgetRequest,
    security(("admin" = [])),
    responses((status = 200, body = BudgetOut), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub(crate) async fn set_budget(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<ApiJson<BudgetRequest>, ApiError>,
) -> Response {
    caller_handler!(state, headers, |caller| {
        let ApiJson(body) = body?;
        let scope = budget_scope(
            &body.scope,
            body.tenant.as_deref(),
            body.project.as_deref(),
            body.key_id.as_deref(),
        )?;
        match &scope {
            BudgetScope::Project { tenant, .. } => check_tenant(&caller, tenant)?,
            BudgetScope::Key { key_id } => {
                principal::key_tenant(&state, &caller, key_id).await?;
            }
        }
        let limit = body
            .limit
            .as_deref()
            .map(|text| amount("limit", text))
            .transpose()?;
        state
            .ledger()
            .set_budget(&scope, limit, &audit_context(caller.audit_actor()))
            .await?;
        let status = state.ledger().budget(&scope).await?;
        Ok(Json(BudgetOut {
            object: "budget",
            month: status.month.to_string(),
            limit_nanos: status.limit.map(|l| l.0),
            reserved_nanos: status.reserved.0,
            spent_nanos: status.spent.0,
        })
        .into_response())
    })
}

/// `PUT /admin/rate-limits`: RPM/TPM of a key, a project or a model.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimitRequest {
    /// `key` (with `key_id`), `project` (with `tenant` and `project`) or `model` (with `model`).
    pub scope: String,
    pub tenant: Option<String>,
    pub project: Option<String>,
    pub key_id: Option<String>,
    pub model: Option<String>,
    /// `null`: unlimited.
    pub requests_per_minute: Option<u32>,
    /// `null`: unlimited.
    pub tokens_per_minute: Option<u32>,
}

#[utoipa::path(put, path = "/admin/rate-limits", tag = "admin", request_body = RateLimitRequest,
    security(("admin" = [])),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub(crate) async fn set_rate_limits(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<ApiJson<RateLimitRequest>, ApiError>,
) -> Response {
    admin_handler!(state, headers, {
        let ApiJson(body) = body?;
        let scope = match (
            body.scope.as_str(),
            body.tenant.as_deref(),
            body.project.as_deref(),
            body.key_id.as_deref(),
            body.model.as_deref(),
        ) {
            ("key", None, None, Some(key_id), None) => RateScope::Key {
                key_id: KeyId(key_id.to_owned()),
            },
            ("project", Some(tenant), Some(project), None, None) => RateScope::Project {
                tenant: tenant_id(tenant)?,
                project: project_id(project)?,
            },
            ("model", None, None, None, Some(model)) => RateScope::Model {
                model: ModelId::new(model)
                    .map_err(|e| ApiError::invalid_param("model", e.to_string()))?,
            },
            _ => {
                return Err(ApiError::invalid_param(
                    "scope",
                    "`key` needs `key_id`; `project` needs `tenant` and `project`; `model` needs `model`",
                ));
            }
        };
        state
            .ledger()
            .set_rate_limits(
                &scope,
                RateLimits {
                    requests_per_minute: body.requests_per_minute,
                    tokens_per_minute: body.tokens_per_minute,
                },
                &admin_audit(),
            )
            .await?;
        Ok(StatusCode::NO_CONTENT.into_response())
    })
}

/// Query of `GET /admin/tenants/{tenant}/usage`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AdminUsageQuery {
    /// Only this project.
    pub project: Option<String>,
    /// Only this key.
    pub key_id: Option<String>,
    /// `YYYY-MM`; all time when absent.
    pub month: Option<String>,
}

#[utoipa::path(get, path = "/admin/tenants/{tenant}/usage", tag = "admin",
    params(("tenant" = String, Path), AdminUsageQuery), security(("admin" = [])),
    responses((status = 200, body = UsageReport), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn tenant_usage(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(tenant): Path<String>,
    query: Result<Query<AdminUsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    caller_handler!(state, headers, |caller| {
        let query = query_params(query, "query")?;
        let tenant = tenant_id(&tenant)?;
        check_tenant(&caller, &tenant)?;
        let scope = match (query.project.as_deref(), query.key_id) {
            (None, None) => UsageScope::Tenant(tenant.clone()),
            (Some(project), None) => UsageScope::Project {
                tenant: tenant.clone(),
                project: project_id(project)?,
            },
            (None, Some(key_id)) => UsageScope::Key {
                tenant: tenant.clone(),
                key_id: KeyId(key_id),
            },
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid_param(
                    "key_id",
                    "give `project` or `key_id`, not both",
                ));
            }
        };
        let month = parse_month(query.month.as_deref())?;
        let account = state.ledger().account(&tenant).await?;
        let rows = state.ledger().usage_summary(&scope, month).await?;
        let mut report = usage_report(&scope, month, account.currency, rows)?;
        let (requests, cost_nanos) = state.ledger().batch_usage(&scope, month).await?;
        report.batch = BatchUsageOut {
            requests,
            cost_nanos,
        };
        Ok(Json(report).into_response())
    })
}

/// One statement line.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatementLineOut {
    /// `credit` or `usage`.
    pub kind: &'static str,
    /// Credits: when; usage: the price version's start.
    pub at_ms: i64,
    pub note: Option<String>,
    pub model: Option<String>,
    pub requests: Option<u64>,
    pub prompt_tokens: Option<u64>,
    /// Part of `prompt_tokens` served from a cached prefix, where known.
    pub cached_prompt_tokens: Option<u64>,
    /// Requests whose remote backend did not report cached tokens (billed as uncached input).
    pub cached_unknown_requests: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub input_per_mtok_nanos: Option<i64>,
    pub output_per_mtok_nanos: Option<i64>,
    pub cached_input_per_mtok_nanos: Option<i64>,
    /// The cached tokens' share of the line (unsigned, rounded up).
    pub cached_input_amount_nanos: Option<i64>,
    /// Signed: credits positive, usage negative.
    pub amount_nanos: i64,
}

/// A tenant's monthly statement: `opening + Σ lines = closing`, to the nano-unit.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatementOut {
    pub object: &'static str,
    pub tenant: String,
    pub month: String,
    pub currency: String,
    pub opening_balance_nanos: i64,
    pub lines: Vec<StatementLineOut>,
    pub closing_balance_nanos: i64,
}

/// The JSON form of a statement.
pub fn statement_out(statement: &Statement) -> StatementOut {
    let lines = statement
        .lines
        .iter()
        .map(|line| match line {
            StatementLine::Credit {
                at_ms,
                note,
                amount,
            } => StatementLineOut {
                kind: "credit",
                at_ms: *at_ms,
                note: Some(note.clone()),
                model: None,
                requests: None,
                prompt_tokens: None,
                cached_prompt_tokens: None,
                cached_unknown_requests: None,
                completion_tokens: None,
                input_per_mtok_nanos: None,
                output_per_mtok_nanos: None,
                cached_input_per_mtok_nanos: None,
                cached_input_amount_nanos: None,
                amount_nanos: amount.0,
            },
            StatementLine::Usage {
                price,
                requests,
                prompt_tokens,
                cached_prompt_tokens,
                cached_unknown_requests,
                completion_tokens,
                cached_input_cost,
                amount,
            } => StatementLineOut {
                kind: "usage",
                at_ms: price.effective_from_ms,
                note: None,
                model: Some(price.model.to_string()),
                requests: Some(*requests),
                prompt_tokens: Some(*prompt_tokens),
                cached_prompt_tokens: Some(*cached_prompt_tokens),
                cached_unknown_requests: Some(*cached_unknown_requests),
                completion_tokens: Some(*completion_tokens),
                input_per_mtok_nanos: Some(price.input_per_mtok.0),
                output_per_mtok_nanos: Some(price.output_per_mtok.0),
                cached_input_per_mtok_nanos: Some(price.cached_input_per_mtok.0),
                cached_input_amount_nanos: Some(cached_input_cost.0),
                amount_nanos: amount.0,
            },
        })
        .collect();
    StatementOut {
        object: "statement",
        tenant: statement.tenant.to_string(),
        month: statement.month.to_string(),
        currency: statement.currency.to_string(),
        opening_balance_nanos: statement.opening_balance.0,
        lines,
        closing_balance_nanos: statement.closing_balance.0,
    }
}

/// Query of `GET /admin/tenants/{tenant}/statement`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StatementQuery {
    /// `YYYY-MM`.
    pub month: String,
}

#[utoipa::path(get, path = "/admin/tenants/{tenant}/statement", tag = "admin",
    params(("tenant" = String, Path), StatementQuery), security(("admin" = [])),
    responses((status = 200, body = StatementOut), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn statement(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(tenant): Path<String>,
    query: Result<Query<StatementQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    caller_handler!(state, headers, |caller| {
        let query = query_params(query, "month")?;
        let tenant = tenant_id(&tenant)?;
        check_tenant(&caller, &tenant)?;
        let month = parse_month(Some(&query.month))?
            .ok_or(ApiError::invalid_param("month", "must be YYYY-MM"))?;
        let statement = state.ledger().statement(&tenant, month).await?;
        Ok(Json(statement_out(&statement)).into_response())
    })
}
