//! The daily usage rollup: table `usage_daily`, one row per `(tenant, project, key, model, UTC
//! day)` with the sums of that day's usage entries (requests, prompt, cached prompt and
//! completion tokens, cost). It is written in the same transaction as the usage entries it sums
//! — by the settle writer (settle, void, recovery, the stale sweep all go through it) and by
//! `record_usage` — one upsert per distinct key and batch, so it never drifts from the raw rows;
//! the migration that created it backfilled it from the entries already there. Readers (the
//! console's usage chart, the operator's spend per tenant) read it instead of the raw rows.
//! docs/ledger.md, "Usage rollups", states the guarantees.

use std::collections::BTreeMap;

use tidepool_core::{Currency, KeyId, ModelId, Nanos, TenantId};

use crate::batch_sql::{DailyRow, FreeUsageRow, UsageRow};
use crate::month::{Day, Month};
use crate::store::{on_store, to_u64};
use crate::{Ledger, LedgerError, ProjectId};

/// Most days one [`Ledger::usage_daily`] call may span (both ends included).
pub const USAGE_DAILY_DAYS_MAX: u32 = 366;
/// Most rows one [`Ledger::usage_daily`] call returns; a range with more is refused (ask for
/// fewer days) rather than cut short, so what the caller sums is never silently partial.
pub const USAGE_DAILY_ROWS_MAX: u32 = 20_000;
/// Most tenants [`Ledger::tenant_spend`] reports; more is refused, never cut short.
pub const TENANT_SPEND_TENANTS_MAX: u32 = 10_000;
/// How the rollup stores a missing project (money-free entries) or model (requests that failed
/// before a model was resolved): the empty string, which no project or model id can be.
pub(crate) const ROLLUP_NONE: &str = "";

/// One row of the daily rollup: a tenant's usage on one UTC day by one key of one project on
/// one model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DailyUsage {
    pub day: Day,
    /// `None` for requests that never reserved (money-free usage entries carry no project).
    pub project: Option<ProjectId>,
    pub key_id: KeyId,
    /// `None` for requests that failed before a model was resolved.
    pub model: Option<ModelId>,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub cached_prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Sum of the billed costs, in the tenant's currency.
    pub cost: Nanos,
}

/// One tenant's spend in a month, from the rollup, with its account as it is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantSpend {
    pub tenant: TenantId,
    pub currency: Currency,
    /// Credits minus settled costs, now.
    pub balance: Nanos,
    /// Holds of open reservations, now.
    pub reserved: Nanos,
    /// Cost of the usage entries created on the month's UTC days.
    pub month_cost: Nanos,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub cached_prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// The key of one rollup row: tenant, project, key, model, day.
type DailyKey<'a> = (&'a str, &'a str, &'a str, &'a str, i64);

/// Sums of `(requests, prompt, cached prompt, cached unknown, completion, cost)`.
type DailySums = [i64; 6];

fn add_sums(slot: &mut DailySums, add: DailySums) -> Result<(), LedgerError> {
    for (total, value) in slot.iter_mut().zip(add) {
        *total = total
            .checked_add(value)
            .ok_or(LedgerError::OutOfRange { field: "usage sum" })?;
    }
    Ok(())
}

/// What a batch of usage rows adds to the rollup: one row per distinct key, sorted by key (the
/// order the upsert locks them in).
pub(crate) fn daily_rows<'a>(rows: &[UsageRow<'a>]) -> Result<Vec<DailyRow<'a>>, LedgerError> {
    sum_daily(
        rows.iter()
            .map(|row| daily_item(&row.entry, row.project, row.cost_nanos)),
    )
}

/// What a batch of money-free usage rows adds to the rollup (no project, no cost), as
/// [`daily_rows`].
pub(crate) fn free_daily_rows<'a>(
    rows: &[&FreeUsageRow<'a>],
) -> Result<Vec<DailyRow<'a>>, LedgerError> {
    sum_daily(rows.iter().map(|row| daily_item(row, ROLLUP_NONE, 0)))
}

/// One usage row's rollup key and what it adds; no model counts as [`ROLLUP_NONE`].
fn daily_item<'a>(
    entry: &FreeUsageRow<'a>,
    project: &'a str,
    cost_nanos: i64,
) -> (DailyKey<'a>, DailySums) {
    let day = Day::of_ms(entry.created_at_ms).days_since_epoch();
    (
        (
            entry.tenant,
            project,
            entry.key_id,
            entry.model.unwrap_or(ROLLUP_NONE),
            day,
        ),
        [
            1,
            entry.prompt_tokens,
            entry.cached_prompt_tokens,
            entry.cached_prompt_tokens_unknown,
            entry.completion_tokens,
            cost_nanos,
        ],
    )
}

/// One rollup row per distinct key, sorted by key, with the sums of its rows.
fn sum_daily<'a>(
    rows: impl IntoIterator<Item = (DailyKey<'a>, DailySums)>,
) -> Result<Vec<DailyRow<'a>>, LedgerError> {
    let mut sums: BTreeMap<DailyKey<'a>, DailySums> = BTreeMap::new();
    for (key, add) in rows {
        add_sums(sums.entry(key).or_default(), add)?;
    }
    Ok(sums
        .into_iter()
        .map(|((tenant, project, key_id, model, day), sums)| {
            let [requests, prompt, cached, cached_unknown, completion, cost] = sums;
            DailyRow {
                tenant,
                project,
                key_id,
                model,
                day,
                requests,
                prompt_tokens: prompt,
                cached_prompt_tokens: cached,
                cached_unknown_requests: cached_unknown,
                completion_tokens: completion,
                cost_nanos: cost,
            }
        })
        .collect())
}

/// `(day, project, key, model, requests, prompt, cached, completion, cost)`.
type DailyUsageRow = (i64, String, String, String, i64, i64, i64, i64, i64);

fn daily_from_row(row: DailyUsageRow) -> Result<DailyUsage, LedgerError> {
    let (day, project, key_id, model, requests, prompt, cached, completion, cost) = row;
    let project = if project == ROLLUP_NONE {
        None
    } else {
        Some(ProjectId::new(project).map_err(|_| LedgerError::Corrupt { what: "project id" })?)
    };
    let model = if model == ROLLUP_NONE {
        None
    } else {
        Some(ModelId::new(model).map_err(|_| LedgerError::Corrupt { what: "model id" })?)
    };
    Ok(DailyUsage {
        day: Day::from_days_since_epoch(day),
        project,
        key_id: KeyId(key_id),
        model,
        requests: to_u64(requests, "request count")?,
        prompt_tokens: to_u64(prompt, "prompt token sum")?,
        cached_prompt_tokens: to_u64(cached, "cached token sum")?,
        completion_tokens: to_u64(completion, "completion token sum")?,
        cost: Nanos(cost),
    })
}

/// Checks a `from..=to` day range against [`USAGE_DAILY_DAYS_MAX`].
fn check_days(from: Day, to: Day) -> Result<(), LedgerError> {
    let span = to
        .days_since_epoch()
        .checked_sub(from.days_since_epoch())
        .ok_or(LedgerError::OutOfRange { field: "days" })?;
    if span < 0 || span >= i64::from(USAGE_DAILY_DAYS_MAX) {
        return Err(LedgerError::OutOfRange { field: "days" });
    }
    Ok(())
}

/// The rows read with `LIMIT rows_max + 1`, refused when there are more than `rows_max`.
fn within_rows(rows: Vec<DailyUsageRow>) -> Result<Vec<DailyUsage>, LedgerError> {
    if rows.len() > usize::try_from(USAGE_DAILY_ROWS_MAX).unwrap_or(usize::MAX) {
        return Err(LedgerError::OutOfRange {
            field: "usage rows",
        });
    }
    rows.into_iter().map(daily_from_row).collect()
}

/// `(tenant, currency, balance, reserved, cost, requests, prompt, cached, completion)`.
type SpendRow = (String, String, i64, i64, i64, i64, i64, i64, i64);

impl Ledger {
    /// The daily rollup rows of `tenant` from day `from` through day `to` (both included, UTC),
    /// one per day, project, key and model that had usage, ordered by day, project, key, model.
    /// At most [`USAGE_DAILY_DAYS_MAX`] days and [`USAGE_DAILY_ROWS_MAX`] rows, else
    /// [`LedgerError::OutOfRange`] (`days` when `from` is after `to` or the range is too long,
    /// `usage rows` when it holds too many rows). An unknown tenant has no rows.
    pub async fn usage_daily(
        &self,
        tenant: &TenantId,
        from: Day,
        to: Day,
    ) -> Result<Vec<DailyUsage>, LedgerError> {
        check_days(from, to)?;
        let rows: Vec<DailyUsageRow> = on_store!(&self.store, pool => {
            sqlx::query_as(
                "SELECT day, project_id, key_id, model, requests, prompt_tokens, \
                 cached_prompt_tokens, completion_tokens, cost_nanos FROM usage_daily \
                 WHERE tenant_id = $1 AND day >= $2 AND day <= $3 \
                 ORDER BY day, project_id, key_id, model LIMIT $4",
            )
            .bind(tenant.as_str())
            .bind(from.days_since_epoch())
            .bind(to.days_since_epoch())
            .bind(i64::from(USAGE_DAILY_ROWS_MAX).saturating_add(1))
            .fetch_all(pool)
            .await?
        });
        within_rows(rows)
    }

    /// The same rows as [`Ledger::usage_daily`], computed from the raw usage entries (a `GROUP
    /// BY` over every entry in the range) instead of the rollup: what the rollup must always
    /// equal, for checks and for the benchmark's baseline. Reads every entry of the range:
    /// never on a request path.
    pub async fn usage_daily_from_entries(
        &self,
        tenant: &TenantId,
        from: Day,
        to: Day,
    ) -> Result<Vec<DailyUsage>, LedgerError> {
        check_days(from, to)?;
        let from_ms = from.start_ms();
        let to_ms = to.saturating_add_days(1).start_ms();
        // Entries at or after `from_ms` only, so the truncating division is a floor on both
        // stores. CAST keeps PostgreSQL's SUM(BIGINT) (NUMERIC) an integer.
        let rows: Vec<DailyUsageRow> = on_store!(&self.store, pool => {
            sqlx::query_as(
                "SELECT $4 + (created_at_ms - $2) / 86400000, COALESCE(project_id, ''), key_id, \
                 COALESCE(model, ''), COUNT(*), CAST(SUM(prompt_tokens) AS BIGINT), \
                 CAST(SUM(cached_prompt_tokens) AS BIGINT), \
                 CAST(SUM(completion_tokens) AS BIGINT), CAST(SUM(cost_nanos) AS BIGINT) \
                 FROM usage_entries WHERE tenant_id = $1 AND created_at_ms >= $2 \
                 AND created_at_ms < $3 GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4 LIMIT $5",
            )
            .bind(tenant.as_str())
            .bind(from_ms)
            .bind(to_ms)
            .bind(from.days_since_epoch())
            .bind(i64::from(USAGE_DAILY_ROWS_MAX).saturating_add(1))
            .fetch_all(pool)
            .await?
        });
        within_rows(rows)
    }

    /// Every tenant's spend in `month` (the usage entries created on its UTC days, from the
    /// rollup) with its account's currency, balance and holds as they are now, ordered by
    /// tenant; a tenant without usage that month reports zeros. At most
    /// [`TENANT_SPEND_TENANTS_MAX`] tenants, else [`LedgerError::OutOfRange`] (`tenants`).
    ///
    /// Statements bill a request in the month its reservation was made; this counts it on the
    /// day it finished, so a request admitted just before midnight at a month's end counts in
    /// the statement of the earlier month and here in the later one.
    pub async fn tenant_spend(&self, month: Month) -> Result<Vec<TenantSpend>, LedgerError> {
        let rows: Vec<SpendRow> = on_store!(&self.store, pool => {
            sqlx::query_as(
                "SELECT a.tenant_id, a.currency, a.balance_nanos, a.reserved_nanos, \
                 COALESCE(s.cost, 0), COALESCE(s.requests, 0), COALESCE(s.prompt, 0), \
                 COALESCE(s.cached, 0), COALESCE(s.completion, 0) FROM accounts a \
                 LEFT JOIN (SELECT tenant_id, CAST(SUM(cost_nanos) AS BIGINT) AS cost, \
                 CAST(SUM(requests) AS BIGINT) AS requests, \
                 CAST(SUM(prompt_tokens) AS BIGINT) AS prompt, \
                 CAST(SUM(cached_prompt_tokens) AS BIGINT) AS cached, \
                 CAST(SUM(completion_tokens) AS BIGINT) AS completion \
                 FROM usage_daily WHERE day >= $1 AND day <= $2 GROUP BY tenant_id) s \
                 ON s.tenant_id = a.tenant_id ORDER BY a.tenant_id LIMIT $3",
            )
            .bind(month.first_day().days_since_epoch())
            .bind(month.last_day().days_since_epoch())
            .bind(i64::from(TENANT_SPEND_TENANTS_MAX).saturating_add(1))
            .fetch_all(pool)
            .await?
        });
        if rows.len() > usize::try_from(TENANT_SPEND_TENANTS_MAX).unwrap_or(usize::MAX) {
            return Err(LedgerError::OutOfRange { field: "tenants" });
        }
        rows.into_iter()
            .map(
                |(
                    tenant,
                    currency,
                    balance,
                    reserved,
                    cost,
                    requests,
                    prompt,
                    cached,
                    completion,
                )| {
                    Ok(TenantSpend {
                        tenant: TenantId::new(tenant)
                            .map_err(|_| LedgerError::Corrupt { what: "tenant id" })?,
                        currency: Currency::parse(&currency)
                            .map_err(|_| LedgerError::Corrupt { what: "currency" })?,
                        balance: Nanos(balance),
                        reserved: Nanos(reserved),
                        month_cost: Nanos(cost),
                        requests: to_u64(requests, "request count")?,
                        prompt_tokens: to_u64(prompt, "prompt token sum")?,
                        cached_prompt_tokens: to_u64(cached, "cached token sum")?,
                        completion_tokens: to_u64(completion, "completion token sum")?,
                    })
                },
            )
            .collect()
    }
}
