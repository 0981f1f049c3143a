//! Monthly statements: opening balance, line items, closing balance, reconciled to the nano-unit.
//!
//! Line items are the month's credits (one line each) and its billed usage grouped by model and
//! price version. Each usage line's amount is the sum of the exact costs stored on its entries,
//! the same numbers that moved the balance, so `opening + Σ lines = closing` holds exactly; the
//! closing balance is also computed independently from the raw tables and the two must agree.

use tidepool_core::{Currency, ModelId, Nanos, TenantId};

use crate::month::Month;
use crate::price::PriceVersion;
use crate::store::{on_store, to_u64};
use crate::{Ledger, LedgerError};

/// Credits listed one line each per statement, at most.
pub const STATEMENT_CREDIT_LINES_MAX: i64 = 10_000;

/// One line of a statement. `amount` is signed: credits are positive, usage negative.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatementLine {
    Credit {
        at_ms: i64,
        note: String,
        amount: Nanos,
    },
    Usage {
        price: PriceVersion,
        requests: u64,
        prompt_tokens: u64,
        /// Part of `prompt_tokens` served from a cached prefix, where known.
        cached_prompt_tokens: u64,
        /// Requests whose backend did not report cached tokens (billed as uncached input).
        cached_unknown_requests: u64,
        completion_tokens: u64,
        /// The cached tokens' share of the line at its cached-input price (rounded up; not
        /// signed).
        cached_input_cost: Nanos,
        amount: Nanos,
    },
}

impl StatementLine {
    pub fn amount(&self) -> Nanos {
        match self {
            Self::Credit { amount, .. } | Self::Usage { amount, .. } => *amount,
        }
    }
}

/// A tenant's statement for one calendar month (UTC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    pub tenant: TenantId,
    pub currency: Currency,
    pub month: Month,
    pub opening_balance: Nanos,
    pub lines: Vec<StatementLine>,
    pub closing_balance: Nanos,
}

type UsageLineRow = (
    String,
    i64,
    String,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
);

fn overflow() -> LedgerError {
    LedgerError::Core(tidepool_core::CoreError::MoneyOverflow { what: "statement" })
}

/// What one snapshot read of the tables returns for a statement.
#[derive(Debug)]
struct StatementRows {
    credits_before: i64,
    usage_before: i64,
    credits_through: i64,
    usage_through: i64,
    credits: Vec<(i64, String, i64)>,
    usage: Vec<UsageLineRow>,
}

impl Ledger {
    /// Reads everything a statement needs from one snapshot.
    async fn statement_rows(
        &self,
        tenant: &TenantId,
        month: Month,
    ) -> Result<StatementRows, LedgerError> {
        let month_text = month.to_string();
        let next = month.next().to_string();
        // SUMs are CAST so PostgreSQL returns BIGINT, not NUMERIC; 'YYYY-MM' sorts as text.
        let sum_credits = "SELECT CAST(COALESCE(SUM(amount_nanos), 0) AS BIGINT) FROM credits \
                           WHERE tenant_id = $1 AND month < $2";
        let sum_usage = "SELECT CAST(COALESCE(SUM(cost_nanos), 0) AS BIGINT) FROM usage_entries \
                         WHERE tenant_id = $1 AND month < $2";
        let rows = on_store!(&self.store, pool => {
            let mut tx = pool.begin_with(self.store.begin_snapshot_sql()).await?;
            let mut sum = async |sql: &'static str, bound: &str| -> Result<i64, LedgerError> {
                Ok(sqlx::query_scalar(sql).bind(tenant.as_str()).bind(bound).fetch_one(&mut *tx).await?)
            };
            let credits_before = sum(sum_credits, &month_text).await?;
            let usage_before = sum(sum_usage, &month_text).await?;
            let credits_through = sum(sum_credits, &next).await?;
            let usage_through = sum(sum_usage, &next).await?;
            let credits: Vec<(i64, String, i64)> = sqlx::query_as(
                "SELECT created_at_ms, note, amount_nanos FROM credits WHERE tenant_id = $1 \
                 AND month = $2 ORDER BY created_at_ms, credit_id LIMIT $3",
            )
            .bind(tenant.as_str())
            .bind(&month_text)
            .bind(STATEMENT_CREDIT_LINES_MAX)
            .fetch_all(&mut *tx)
            .await?;
            let usage: Vec<UsageLineRow> = sqlx::query_as(
                "SELECT model, price_effective_from_ms, currency, input_per_mtok_nanos, \
                 output_per_mtok_nanos, cached_input_per_mtok_nanos, COUNT(*), \
                 CAST(SUM(prompt_tokens) AS BIGINT), CAST(SUM(cached_prompt_tokens) AS BIGINT), \
                 CAST(SUM(completion_tokens) AS BIGINT), CAST(SUM(cost_nanos) AS BIGINT), \
                 CAST(SUM(cached_prompt_tokens_unknown) AS BIGINT) \
                 FROM usage_entries WHERE tenant_id = $1 AND month = $2 \
                 GROUP BY model, price_effective_from_ms, currency, input_per_mtok_nanos, \
                 output_per_mtok_nanos, cached_input_per_mtok_nanos \
                 ORDER BY model, price_effective_from_ms",
            )
            .bind(tenant.as_str())
            .bind(&month_text)
            .fetch_all(&mut *tx)
            .await?;
            tx.commit().await?;
            StatementRows { credits_before, usage_before, credits_through, usage_through, credits, usage }
        });
        if i64::try_from(rows.credits.len()).unwrap_or(i64::MAX) >= STATEMENT_CREDIT_LINES_MAX {
            return Err(LedgerError::OutOfRange {
                field: "credits in one month",
            });
        }
        Ok(rows)
    }

    /// The statement of `tenant` for `month`.
    #[expect(
        clippy::too_many_lines,
        reason = "one query, then its rows folded in order"
    )]
    pub async fn statement(
        &self,
        tenant: &TenantId,
        month: Month,
    ) -> Result<Statement, LedgerError> {
        let account = self.account(tenant).await?;
        let rows = self.statement_rows(tenant, month).await?;
        let mut lines = Vec::with_capacity(rows.credits.len().saturating_add(rows.usage.len()));
        for (at_ms, note, amount) in rows.credits {
            lines.push(StatementLine::Credit {
                at_ms,
                note,
                amount: Nanos(amount),
            });
        }
        for (
            model,
            effective_from_ms,
            currency,
            input,
            output,
            cached,
            requests,
            prompt,
            cached_prompt,
            completion,
            cost,
            cached_unknown,
        ) in rows.usage
        {
            let price = PriceVersion {
                model: ModelId::new(model)
                    .map_err(|_| LedgerError::Corrupt { what: "model id" })?,
                effective_from_ms,
                currency: Currency::parse(&currency)
                    .map_err(|_| LedgerError::Corrupt { what: "currency" })?,
                input_per_mtok: Nanos(input),
                output_per_mtok: Nanos(output),
                cached_input_per_mtok: Nanos(cached),
            };
            let amount = Nanos(0).checked_sub(Nanos(cost)).ok_or_else(overflow)?;
            let cached_prompt_tokens = to_u64(cached_prompt, "cached token sum")?;
            let cached_input_cost =
                crate::price::cached_input_cost(cached_prompt_tokens, price.cached_input_per_mtok)?;
            lines.push(StatementLine::Usage {
                price,
                requests: to_u64(requests, "request count")?,
                prompt_tokens: to_u64(prompt, "prompt token sum")?,
                cached_prompt_tokens,
                cached_unknown_requests: to_u64(cached_unknown, "cached unknown count")?,
                cached_input_cost,
                completion_tokens: to_u64(completion, "completion token sum")?,
                amount,
            });
        }

        let opening_balance = Nanos(rows.credits_before)
            .checked_sub(Nanos(rows.usage_before))
            .ok_or_else(overflow)?;
        let closing_balance = Nanos(rows.credits_through)
            .checked_sub(Nanos(rows.usage_through))
            .ok_or_else(overflow)?;
        let mut running = opening_balance;
        for line in &lines {
            running = running.checked_add(line.amount()).ok_or_else(overflow)?;
        }
        if running != closing_balance {
            return Err(LedgerError::Invariant {
                what: "statement lines do not sum to the balance movement",
            });
        }
        Ok(Statement {
            tenant: tenant.clone(),
            currency: account.currency,
            month,
            opening_balance,
            lines,
            closing_balance,
        })
    }
}
