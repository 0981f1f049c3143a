//! Usage entries: one row per request id, success or failure. `record_usage` is the money-free
//! path of the walking skeleton; billed requests write the same table through settlement. Both
//! add each entry to the daily rollup (`rollup`) in the entry's own transaction.

use tidepool_core::{KeyId, ModelId, RequestId, TenantId};

use crate::batch_sql::FreeUsageRow;
use crate::store::{on_store, to_tokens, to_u64};
use crate::{Ledger, LedgerError, ModelTotals, NO_MODEL, UsageEntry, UsageStatus};

/// Longest endpoint name or error code stored, in bytes.
pub const USAGE_LABEL_BYTES_MAX: usize = 64;

/// The columns every usage row has, from an entry: `model` as the row records it (the
/// reservation's, or the entry's own) and `latency_ms` checked by the caller.
pub(crate) fn entry_columns<'a>(
    entry: &'a UsageEntry,
    model: Option<&'a str>,
    latency_ms: i64,
) -> FreeUsageRow<'a> {
    let (status, error_code) = status_parts(&entry.status);
    FreeUsageRow {
        request_id: entry.request_id.to_string(),
        tenant: entry.tenant.as_str(),
        key_id: &entry.key_id.0,
        model,
        endpoint: &entry.endpoint,
        prompt_tokens: i64::from(entry.prompt_tokens),
        completion_tokens: i64::from(entry.completion_tokens),
        cached_prompt_tokens: i64::from(entry.cached_prompt_tokens),
        cached_prompt_tokens_unknown: i64::from(entry.cached_prompt_tokens_unknown),
        status,
        error_code,
        latency_ms,
        created_at_ms: entry.created_at_ms,
    }
}

pub(crate) fn status_parts(status: &UsageStatus) -> (&'static str, Option<&str>) {
    match status {
        UsageStatus::Ok => ("ok", None),
        UsageStatus::ClientDisconnected => ("client_disconnected", None),
        UsageStatus::Error { code } => ("error", Some(code.as_str())),
    }
}

fn status_from_parts(status: &str, code: Option<String>) -> Result<UsageStatus, LedgerError> {
    match (status, code) {
        ("ok", None) => Ok(UsageStatus::Ok),
        ("client_disconnected", None) => Ok(UsageStatus::ClientDisconnected),
        ("error", Some(code)) => Ok(UsageStatus::Error { code }),
        _ => Err(LedgerError::Corrupt {
            what: "usage status",
        }),
    }
}

/// Checks the free-text parts of an entry against their limits.
pub(crate) fn validate_entry(entry: &UsageEntry) -> Result<(), LedgerError> {
    if entry.endpoint.is_empty() || entry.endpoint.len() > USAGE_LABEL_BYTES_MAX {
        return Err(LedgerError::OutOfRange {
            field: "usage endpoint",
        });
    }
    if let UsageStatus::Error { code } = &entry.status
        && (code.is_empty() || code.len() > USAGE_LABEL_BYTES_MAX)
    {
        return Err(LedgerError::OutOfRange {
            field: "usage error code",
        });
    }
    Ok(())
}

type UsageRow = (
    String,
    String,
    String,
    Option<String>,
    String,
    i64,
    i64,
    i64,
    String,
    Option<String>,
    i64,
    i64,
    i64,
);

fn entry_from_row(row: UsageRow) -> Result<UsageEntry, LedgerError> {
    let (
        request_id,
        tenant,
        key_id,
        model,
        endpoint,
        prompt,
        completion,
        cached,
        status,
        code,
        latency,
        created,
        cached_unknown,
    ) = row;
    Ok(UsageEntry {
        request_id: RequestId::parse(&request_id)
            .map_err(|_| LedgerError::Corrupt { what: "request id" })?,
        tenant: TenantId::new(tenant).map_err(|_| LedgerError::Corrupt { what: "tenant id" })?,
        key_id: KeyId(key_id),
        model: model
            .map(ModelId::new)
            .transpose()
            .map_err(|_| LedgerError::Corrupt { what: "model id" })?,
        endpoint,
        prompt_tokens: to_tokens(prompt, "prompt tokens")?,
        completion_tokens: to_tokens(completion, "completion tokens")?,
        cached_prompt_tokens: to_tokens(cached, "cached prompt tokens")?,
        cached_prompt_tokens_unknown: cached_unknown != 0,
        status: status_from_parts(&status, code)?,
        latency_ms: to_u64(latency, "latency")?,
        created_at_ms: created,
    })
}

impl Ledger {
    /// The usage entry of one request, if any.
    pub async fn usage_entry(
        &self,
        request_id: RequestId,
    ) -> Result<Option<UsageEntry>, LedgerError> {
        let row: Option<UsageRow> = on_store!(&self.store, pool => {
            sqlx::query_as(
                "SELECT request_id, tenant_id, key_id, model, endpoint, prompt_tokens, \
                 completion_tokens, cached_prompt_tokens, status, error_code, latency_ms, \
                 created_at_ms, cached_prompt_tokens_unknown FROM usage_entries \
                 WHERE request_id = $1",
            )
            .bind(request_id.to_string())
            .fetch_optional(pool)
            .await?
        });
        row.map(entry_from_row).transpose()
    }

    /// Per-model totals for a tenant, ordered by model.
    pub async fn usage_totals(&self, tenant: &TenantId) -> Result<Vec<ModelTotals>, LedgerError> {
        // CAST keeps PostgreSQL's SUM(BIGINT) (which is NUMERIC) an integer on both stores.
        let rows: Vec<(String, i64, i64, i64)> = on_store!(&self.store, pool => {
            sqlx::query_as(
                "SELECT COALESCE(model, $2) AS m, COUNT(*), \
                 CAST(COALESCE(SUM(prompt_tokens), 0) AS BIGINT), \
                 CAST(COALESCE(SUM(completion_tokens), 0) AS BIGINT) \
                 FROM usage_entries WHERE tenant_id = $1 GROUP BY m ORDER BY m",
            )
            .bind(tenant.as_str())
            .bind(NO_MODEL)
            .fetch_all(pool)
            .await?
        });
        rows.into_iter()
            .map(|(model, requests, prompt, completion)| {
                Ok(ModelTotals {
                    model,
                    requests: to_u64(requests, "request count")?,
                    prompt_tokens: to_u64(prompt, "prompt token sum")?,
                    completion_tokens: to_u64(completion, "completion token sum")?,
                })
            })
            .collect()
    }
}

/// A usage entry with the money the ledger attached to it at settlement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BilledUsage {
    pub entry: UsageEntry,
    /// `None` for money-free entries written by `record_usage`.
    pub project: Option<crate::ProjectId>,
    pub month: Option<crate::Month>,
    pub cost: tidepool_core::Nanos,
    /// The price snapshot it was billed at (`None` for money-free entries).
    pub price: Option<crate::PriceVersion>,
}

type PriceSnapshotRow = (
    Option<String>,
    Option<String>,
    i64,
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
);

impl Ledger {
    /// A usage entry with its cost and price snapshot.
    pub async fn billed_usage(
        &self,
        request_id: RequestId,
    ) -> Result<Option<BilledUsage>, LedgerError> {
        let Some(entry) = self.usage_entry(request_id).await? else {
            return Ok(None);
        };
        let row: PriceSnapshotRow = on_store!(&self.store, pool => {
            sqlx::query_as(
                "SELECT project_id, month, cost_nanos, currency, price_effective_from_ms, \
                 input_per_mtok_nanos, output_per_mtok_nanos, cached_input_per_mtok_nanos \
                 FROM usage_entries WHERE request_id = $1",
            )
            .bind(request_id.to_string())
            .fetch_one(pool)
            .await?
        });
        let (project, month, cost, currency, effective_from_ms, input, output, cached) = row;
        let price = match (
            &entry.model,
            currency,
            effective_from_ms,
            input,
            output,
            cached,
        ) {
            (Some(model), Some(currency), Some(effective_from_ms), Some(i), Some(o), Some(c)) => {
                Some(crate::PriceVersion {
                    model: model.clone(),
                    effective_from_ms,
                    currency: tidepool_core::Currency::parse(&currency)
                        .map_err(|_| LedgerError::Corrupt { what: "currency" })?,
                    input_per_mtok: tidepool_core::Nanos(i),
                    output_per_mtok: tidepool_core::Nanos(o),
                    cached_input_per_mtok: tidepool_core::Nanos(c),
                })
            }
            _ => None,
        };
        Ok(Some(BilledUsage {
            entry,
            project: project.map(crate::ProjectId::new).transpose()?,
            month: month.as_deref().map(crate::Month::parse).transpose()?,
            cost: tidepool_core::Nanos(cost),
            price,
        }))
    }
}

/// Whose usage a summary covers: the gateway passes the caller's own scope, so a key never
/// sees another tenant's data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsageScope {
    Tenant(TenantId),
    /// Billed entries of one project (money-free entries carry no project).
    Project {
        tenant: TenantId,
        project: crate::ProjectId,
    },
    Key {
        tenant: TenantId,
        key_id: KeyId,
    },
}

/// Sums for one model within a [`UsageScope`], money included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelUsage {
    /// The model id, or [`NO_MODEL`].
    pub model: String,
    pub requests: u64,
    pub prompt_tokens: u64,
    /// Part of `prompt_tokens` served from a cached prefix, where known.
    pub cached_prompt_tokens: u64,
    /// Requests whose backend did not report cached tokens (billed as uncached input).
    pub cached_unknown_requests: u64,
    pub completion_tokens: u64,
    /// Sum of the billed costs, in the tenant's currency.
    pub cost: tidepool_core::Nanos,
    /// The cached prompt tokens' share of `cost`: each price version's cached tokens at its
    /// cached-input price, rounded up (per-request rounding can make `cost` a few nano-units
    /// more than the sum of its parts).
    pub cached_input_cost: tidepool_core::Nanos,
}

/// `(model, cached input price, requests, prompt, cached, cached unknown, completion, cost)`.
type ModelUsageRow = (String, i64, i64, i64, i64, i64, i64, i64);

impl Ledger {
    /// Per-model usage and cost within `scope`, for requests created in `month` (UTC) or ever.
    #[expect(
        clippy::too_many_lines,
        reason = "one query, then its rows folded in order"
    )]
    pub async fn usage_summary(
        &self,
        scope: &UsageScope,
        month: Option<crate::Month>,
    ) -> Result<Vec<ModelUsage>, LedgerError> {
        let rows: Vec<ModelUsageRow> = on_store!(&self.store, pool => {
            let mut query = sqlx::QueryBuilder::new("SELECT COALESCE(model, ");
            query.push_bind(NO_MODEL);
            query.push(
                ") AS m, COALESCE(cached_input_per_mtok_nanos, 0) AS cp, COUNT(*), \
                 CAST(COALESCE(SUM(prompt_tokens), 0) AS BIGINT), \
                 CAST(COALESCE(SUM(cached_prompt_tokens), 0) AS BIGINT), \
                 CAST(COALESCE(SUM(cached_prompt_tokens_unknown), 0) AS BIGINT), \
                 CAST(COALESCE(SUM(completion_tokens), 0) AS BIGINT), \
                 CAST(COALESCE(SUM(cost_nanos), 0) AS BIGINT) FROM usage_entries WHERE tenant_id = ",
            );
            match scope {
                UsageScope::Tenant(tenant) => {
                    query.push_bind(tenant.as_str().to_owned());
                }
                UsageScope::Project { tenant, project } => {
                    query.push_bind(tenant.as_str().to_owned());
                    query.push(" AND project_id = ");
                    query.push_bind(project.as_str().to_owned());
                }
                UsageScope::Key { tenant, key_id } => {
                    query.push_bind(tenant.as_str().to_owned());
                    query.push(" AND key_id = ");
                    query.push_bind(key_id.0.clone());
                }
            }
            if let Some(month) = month {
                query.push(" AND created_at_ms >= ");
                query.push_bind(month.start_ms());
                query.push(" AND created_at_ms < ");
                query.push_bind(month.end_ms());
            }
            query.push(" GROUP BY m, cp ORDER BY m, cp");
            query.build_query_as().fetch_all(pool).await?
        });
        let sum = |a: u64, b: u64| {
            a.checked_add(b)
                .ok_or(LedgerError::OutOfRange { field: "usage sum" })
        };
        let mut out: Vec<ModelUsage> = Vec::new();
        for (model, cached_price, requests, prompt, cached, unknown, completion, cost) in rows {
            let cached_tokens = to_u64(cached, "cached token sum")?;
            let cached_input_cost =
                crate::price::cached_input_cost(cached_tokens, tidepool_core::Nanos(cached_price))?;
            let row = ModelUsage {
                model,
                requests: to_u64(requests, "request count")?,
                prompt_tokens: to_u64(prompt, "prompt token sum")?,
                cached_prompt_tokens: cached_tokens,
                cached_unknown_requests: to_u64(unknown, "cached unknown count")?,
                completion_tokens: to_u64(completion, "completion token sum")?,
                cost: tidepool_core::Nanos(cost),
                cached_input_cost,
            };
            match out.last_mut() {
                Some(last) if last.model == row.model => {
                    last.requests = sum(last.requests, row.requests)?;
                    last.prompt_tokens = sum(last.prompt_tokens, row.prompt_tokens)?;
                    last.cached_prompt_tokens =
                        sum(last.cached_prompt_tokens, row.cached_prompt_tokens)?;
                    last.cached_unknown_requests =
                        sum(last.cached_unknown_requests, row.cached_unknown_requests)?;
                    last.completion_tokens = sum(last.completion_tokens, row.completion_tokens)?;
                    last.cost = last
                        .cost
                        .checked_add(row.cost)
                        .ok_or(LedgerError::OutOfRange { field: "usage sum" })?;
                    last.cached_input_cost = last
                        .cached_input_cost
                        .checked_add(row.cached_input_cost)
                        .ok_or(LedgerError::OutOfRange { field: "usage sum" })?;
                }
                _ => out.push(row),
            }
        }
        Ok(out)
    }
}
