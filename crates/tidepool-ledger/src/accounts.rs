//! Tenants → projects → keys, prepaid balances, credits, monthly budgets, the price book and
//! RPM/TPM limits: the administrative side of the ledger. Every write here is a short
//! transaction; the hot path (reserve/settle) lives in `billing` and `writer`.

use std::fmt;

use tidepool_core::{Currency, KeyId, ModelId, Nanos, TenantId};

use crate::month::Month;
use crate::price::PriceVersion;
use crate::store::on_store;
use crate::{Ledger, LedgerError};

/// Largest single credit, in nano-units (10^15 = one million currency units). With
/// [`BALANCE_NANOS_MAX`] it keeps every sum the database computes far from `i64` overflow
/// (SQLite would silently turn an overflowing INTEGER sum into a REAL).
pub const CREDIT_NANOS_MAX: i64 = 1_000_000_000_000_000;
/// Largest balance a tenant may hold, in nano-units (10^18 ≈ 11 % of `i64::MAX`).
pub const BALANCE_NANOS_MAX: i64 = 1_000_000_000_000_000_000;
/// Largest monthly budget, in nano-units.
pub const BUDGET_NANOS_MAX: i64 = BALANCE_NANOS_MAX;
/// Longest credit note, in bytes.
pub const CREDIT_NOTE_BYTES_MAX: usize = 256;
/// The project every tenant has and keys land in unless told otherwise.
pub const DEFAULT_PROJECT: &str = "default";

const _: () = assert!(
    CREDIT_NANOS_MAX <= BALANCE_NANOS_MAX,
    "one credit fits a balance"
);
const _: () = assert!(
    BALANCE_NANOS_MAX <= i64::MAX / 8,
    "sums of balances stay exact"
);

/// A project of a tenant: a validated slug, unique within its tenant.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProjectId(String);

impl ProjectId {
    pub fn new(value: impl Into<String>) -> Result<Self, LedgerError> {
        let value = value.into();
        tidepool_core::ids::validate_slug(&value)?;
        Ok(Self(value))
    }

    pub fn default_project() -> Self {
        Self(DEFAULT_PROJECT.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ProjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A tenant's prepaid account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub tenant: TenantId,
    pub currency: Currency,
    /// Credits minus settled costs.
    pub balance: Nanos,
    /// Sum of the holds of open reservations.
    pub reserved: Nanos,
}

impl Account {
    /// What a new reservation may still take: `balance - reserved`.
    pub fn available(&self) -> Nanos {
        self.balance
            .checked_sub(self.reserved)
            .unwrap_or(Nanos::ZERO)
    }
}

/// What a monthly budget applies to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BudgetScope {
    Project {
        tenant: TenantId,
        project: ProjectId,
    },
    Key {
        key_id: KeyId,
    },
}

impl BudgetScope {
    pub(crate) fn parts(&self) -> (&'static str, String) {
        match self {
            Self::Project { tenant, project } => ("project", format!("{tenant}/{project}")),
            Self::Key { key_id } => ("key", key_id.0.clone()),
        }
    }
}

/// A budget and what the month has used of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetStatus {
    pub limit: Option<Nanos>,
    pub month: Month,
    pub reserved: Nanos,
    pub spent: Nanos,
}

/// What an RPM/TPM limit applies to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RateScope {
    Key {
        key_id: KeyId,
    },
    Project {
        tenant: TenantId,
        project: ProjectId,
    },
    Model {
        model: ModelId,
    },
}

impl RateScope {
    pub(crate) fn parts(&self) -> (&'static str, String) {
        match self {
            Self::Key { key_id } => ("key", key_id.0.clone()),
            Self::Project { tenant, project } => ("project", format!("{tenant}/{project}")),
            Self::Model { model } => ("model", model.as_str().to_owned()),
        }
    }
}

/// Requests and tokens per minute; `None` is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateLimits {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
}

/// A change to the limits of one scope: `None` leaves a limit as it is, `Some(None)` removes it
/// (unlimited), `Some(Some(n))` sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateLimitsChange {
    pub requests_per_minute: Option<Option<u32>>,
    pub tokens_per_minute: Option<Option<u32>>,
}

fn money_overflow(what: &'static str) -> LedgerError {
    LedgerError::Core(tidepool_core::CoreError::MoneyOverflow { what })
}

impl Ledger {
    /// Creates a tenant with an empty account in `currency`, and its default project. Creating
    /// an existing tenant again is a no-op; asking for a different currency is an error.
    pub async fn create_tenant(
        &self,
        tenant: &TenantId,
        currency: Currency,
    ) -> Result<(), LedgerError> {
        let now_ms = self.now_ms();
        let stored: String = on_store!(&self.store, pool => {
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
                 VALUES ($1, $2, 0, 0) ON CONFLICT (tenant_id) DO NOTHING",
            )
            .bind(tenant.as_str())
            .bind(currency.as_str())
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO projects (tenant_id, project_id, created_at_ms) VALUES ($1, $2, $3) \
                 ON CONFLICT (tenant_id, project_id) DO NOTHING",
            )
            .bind(tenant.as_str())
            .bind(DEFAULT_PROJECT)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
            let stored: String = sqlx::query_scalar("SELECT currency FROM accounts WHERE tenant_id = $1")
                .bind(tenant.as_str())
                .fetch_one(&mut *tx)
                .await?;
            tx.commit().await?;
            stored
        });
        if stored == currency.as_str() {
            Ok(())
        } else {
            Err(LedgerError::TenantCurrencyConflict {
                tenant: tenant.clone(),
                existing: Currency::parse(&stored)
                    .map_err(|_| LedgerError::Corrupt { what: "currency" })?,
                requested: currency,
            })
        }
    }

    /// Creates a project under an existing tenant (no-op if it exists).
    pub async fn create_project(
        &self,
        tenant: &TenantId,
        project: &ProjectId,
    ) -> Result<(), LedgerError> {
        let now_ms = self.now_ms();
        self.account(tenant).await?;
        on_store!(&self.store, pool => {
            sqlx::query(
                "INSERT INTO projects (tenant_id, project_id, created_at_ms) VALUES ($1, $2, $3) \
                 ON CONFLICT (tenant_id, project_id) DO NOTHING",
            )
            .bind(tenant.as_str())
            .bind(project.as_str())
            .bind(now_ms)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// The projects of a tenant, ordered by id.
    pub async fn list_projects(&self, tenant: &TenantId) -> Result<Vec<ProjectId>, LedgerError> {
        let rows: Vec<String> = on_store!(&self.store, pool => {
            sqlx::query_scalar("SELECT project_id FROM projects WHERE tenant_id = $1 ORDER BY project_id")
                .bind(tenant.as_str())
                .fetch_all(pool)
                .await?
        });
        rows.into_iter()
            .map(|p| ProjectId::new(p).map_err(|_| LedgerError::Corrupt { what: "project id" }))
            .collect()
    }

    /// A tenant's account.
    pub async fn account(&self, tenant: &TenantId) -> Result<Account, LedgerError> {
        let row: Option<(String, i64, i64)> = on_store!(&self.store, pool => {
            sqlx::query_as(
                "SELECT currency, balance_nanos, reserved_nanos FROM accounts WHERE tenant_id = $1",
            )
            .bind(tenant.as_str())
            .fetch_optional(pool)
            .await?
        });
        let (currency, balance, reserved) = row.ok_or_else(|| LedgerError::TenantNotFound {
            tenant: tenant.clone(),
        })?;
        let account = Account {
            tenant: tenant.clone(),
            currency: Currency::parse(&currency)
                .map_err(|_| LedgerError::Corrupt { what: "currency" })?,
            balance: Nanos(balance),
            reserved: Nanos(reserved),
        };
        assert!(
            account.reserved >= Nanos::ZERO,
            "reserved is never negative"
        );
        assert!(
            account.balance >= account.reserved,
            "holds never exceed the balance"
        );
        Ok(account)
    }

    /// Adds prepaid credit to a tenant's balance and records it for the statement.
    pub async fn credit(
        &self,
        tenant: &TenantId,
        amount: Nanos,
        note: &str,
    ) -> Result<Account, LedgerError> {
        if amount <= Nanos::ZERO || amount.0 > CREDIT_NANOS_MAX {
            return Err(LedgerError::OutOfRange {
                field: "credit amount",
            });
        }
        if note.len() > CREDIT_NOTE_BYTES_MAX {
            return Err(LedgerError::OutOfRange {
                field: "credit note",
            });
        }
        let now_ms = self.now_ms();
        let month = Month::of_ms(now_ms).to_string();
        let credit_id = uuid::Uuid::now_v7().to_string();
        let updated: Option<i64> = on_store!(&self.store, pool => {
            let mut tx = pool.begin_with(self.store.begin_write_sql()).await?;
            let updated: Option<i64> = sqlx::query_scalar(
                "UPDATE accounts SET balance_nanos = balance_nanos + $2 \
                 WHERE tenant_id = $1 AND balance_nanos <= $3 - $2 RETURNING balance_nanos",
            )
            .bind(tenant.as_str())
            .bind(amount.0)
            .bind(BALANCE_NANOS_MAX)
            .fetch_optional(&mut *tx)
            .await?;
            if updated.is_some() {
                sqlx::query(
                    "INSERT INTO credits (credit_id, tenant_id, amount_nanos, month, created_at_ms, note) \
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(&credit_id)
                .bind(tenant.as_str())
                .bind(amount.0)
                .bind(&month)
                .bind(now_ms)
                .bind(note)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
            }
            updated
        });
        if updated.is_none() {
            // Either no such tenant, or the balance would pass its maximum.
            self.account(tenant).await?;
            return Err(money_overflow("balance after credit"));
        }
        self.account(tenant).await
    }

    /// Sets (or with `None` removes) the monthly budget of a project or key. Takes effect for the
    /// next reservation; what the month already used still counts.
    pub async fn set_budget(
        &self,
        scope: &BudgetScope,
        limit: Option<Nanos>,
    ) -> Result<(), LedgerError> {
        if let Some(limit) = limit
            && (limit < Nanos::ZERO || limit.0 > BUDGET_NANOS_MAX)
        {
            return Err(LedgerError::OutOfRange { field: "budget" });
        }
        let (kind, id) = scope.parts();
        on_store!(&self.store, pool => {
            match limit {
                Some(limit) => sqlx::query(
                    "INSERT INTO budgets (scope, scope_id, limit_nanos) VALUES ($1, $2, $3) \
                     ON CONFLICT (scope, scope_id) DO UPDATE SET limit_nanos = excluded.limit_nanos",
                )
                .bind(kind)
                .bind(&id)
                .bind(limit.0)
                .execute(pool)
                .await?,
                None => sqlx::query("DELETE FROM budgets WHERE scope = $1 AND scope_id = $2")
                    .bind(kind)
                    .bind(&id)
                    .execute(pool)
                    .await?,
            };
        });
        Ok(())
    }

    /// A budget's limit and this month's use of it (month by the ledger's clock).
    pub async fn budget(&self, scope: &BudgetScope) -> Result<BudgetStatus, LedgerError> {
        let (kind, id) = scope.parts();
        let month = Month::of_ms(self.now_ms());
        let (limit, spend): (Option<i64>, Option<(i64, i64)>) = on_store!(&self.store, pool => {
            let limit: Option<i64> = sqlx::query_scalar(
                "SELECT limit_nanos FROM budgets WHERE scope = $1 AND scope_id = $2",
            )
            .bind(kind)
            .bind(&id)
            .fetch_optional(pool)
            .await?;
            let spend: Option<(i64, i64)> = sqlx::query_as(
                "SELECT reserved_nanos, spent_nanos FROM budget_spend \
                 WHERE scope = $1 AND scope_id = $2 AND month = $3",
            )
            .bind(kind)
            .bind(&id)
            .bind(month.to_string())
            .fetch_optional(pool)
            .await?;
            (limit, spend)
        });
        let (reserved, spent) = spend.unwrap_or((0, 0));
        Ok(BudgetStatus {
            limit: limit.map(Nanos),
            month,
            reserved: Nanos(reserved),
            spent: Nanos(spent),
        })
    }

    /// Adds a price version. Versions are immutable: a different price for an existing
    /// `(model, effective_from_ms)` is an error, the same one is a no-op.
    pub async fn set_price(&self, price: &PriceVersion) -> Result<(), LedgerError> {
        price.validate()?;
        on_store!(&self.store, pool => {
            sqlx::query(
                "INSERT INTO prices (model, effective_from_ms, currency, input_per_mtok_nanos, \
                 output_per_mtok_nanos, cached_input_per_mtok_nanos) VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (model, effective_from_ms) DO NOTHING",
            )
            .bind(price.model.as_str())
            .bind(price.effective_from_ms)
            .bind(price.currency.as_str())
            .bind(price.input_per_mtok.0)
            .bind(price.output_per_mtok.0)
            .bind(price.cached_input_per_mtok.0)
            .execute(pool)
            .await?;
        });
        match self.price_at(&price.model, price.effective_from_ms).await? {
            Some(stored) if stored == *price => Ok(()),
            _ => Err(LedgerError::PriceVersionConflict {
                model: price.model.clone(),
                effective_from_ms: price.effective_from_ms,
            }),
        }
    }

    /// Makes `price` (its `effective_from_ms` ignored) the model's price from now on, unless the
    /// prices in force already equal it. For syncing the price book from `tidepool.toml` at
    /// start-up: returns whether a new version was added.
    pub async fn sync_price(&self, price: &PriceVersion) -> Result<bool, LedgerError> {
        let now_ms = self.now_ms();
        if let Some(current) = self.price_at(&price.model, now_ms).await?
            && current.same_prices(price)
        {
            return Ok(false);
        }
        self.set_price(&PriceVersion {
            effective_from_ms: now_ms,
            ..price.clone()
        })
        .await?;
        Ok(true)
    }

    /// The price version of `model` in force at `at_ms`.
    pub async fn price_at(
        &self,
        model: &ModelId,
        at_ms: i64,
    ) -> Result<Option<PriceVersion>, LedgerError> {
        let row: Option<(i64, String, i64, i64, i64)> = on_store!(&self.store, pool => {
            sqlx::query_as(
                "SELECT effective_from_ms, currency, input_per_mtok_nanos, output_per_mtok_nanos, \
                 cached_input_per_mtok_nanos FROM prices WHERE model = $1 AND effective_from_ms <= $2 \
                 ORDER BY effective_from_ms DESC LIMIT 1",
            )
            .bind(model.as_str())
            .bind(at_ms)
            .fetch_optional(pool)
            .await?
        });
        row.map(|(effective_from_ms, currency, input, output, cached)| {
            Ok(PriceVersion {
                model: model.clone(),
                effective_from_ms,
                currency: Currency::parse(&currency)
                    .map_err(|_| LedgerError::Corrupt { what: "currency" })?,
                input_per_mtok: Nanos(input),
                output_per_mtok: Nanos(output),
                cached_input_per_mtok: Nanos(cached),
            })
        })
        .transpose()
    }

    /// Sets the RPM/TPM limits of a key, project or model (`None` fields are unlimited).
    pub async fn set_rate_limits(
        &self,
        scope: &RateScope,
        limits: RateLimits,
    ) -> Result<(), LedgerError> {
        let change = RateLimitsChange {
            requests_per_minute: Some(limits.requests_per_minute),
            tokens_per_minute: Some(limits.tokens_per_minute),
        };
        self.write_rate_limits(scope, change).await
    }

    /// Changes only the limits `change` names, keeping the other as it is, and returns the
    /// limits now set.
    pub async fn change_rate_limits(
        &self,
        scope: &RateScope,
        change: RateLimitsChange,
    ) -> Result<RateLimits, LedgerError> {
        self.write_rate_limits(scope, change).await?;
        self.rate_limits(scope).await
    }

    /// One statement, so a concurrent change of the limit `change` leaves alone is not lost.
    async fn write_rate_limits(
        &self,
        scope: &RateScope,
        change: RateLimitsChange,
    ) -> Result<(), LedgerError> {
        let (kind, id) = scope.parts();
        let rpm = change.requests_per_minute.flatten().map(i64::from);
        let tpm = change.tokens_per_minute.flatten().map(i64::from);
        on_store!(&self.store, pool => {
            sqlx::query(
                "INSERT INTO rate_limits (scope, scope_id, requests_per_minute, tokens_per_minute) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (scope, scope_id) DO UPDATE SET \
                 requests_per_minute = CASE WHEN $5 THEN excluded.requests_per_minute \
                 ELSE rate_limits.requests_per_minute END, \
                 tokens_per_minute = CASE WHEN $6 THEN excluded.tokens_per_minute \
                 ELSE rate_limits.tokens_per_minute END",
            )
            .bind(kind)
            .bind(&id)
            .bind(rpm)
            .bind(tpm)
            .bind(change.requests_per_minute.is_some())
            .bind(change.tokens_per_minute.is_some())
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// The RPM/TPM limits set on a key, project or model (both `None` if none are).
    pub async fn rate_limits(&self, scope: &RateScope) -> Result<RateLimits, LedgerError> {
        let (kind, id) = scope.parts();
        let row: Option<(Option<i64>, Option<i64>)> = on_store!(&self.store, pool => {
            sqlx::query_as(
                "SELECT requests_per_minute, tokens_per_minute FROM rate_limits \
                 WHERE scope = $1 AND scope_id = $2",
            )
            .bind(kind)
            .bind(&id)
            .fetch_optional(pool)
            .await?
        });
        let (rpm, tpm) = row.unwrap_or_default();
        let limit = |value: Option<i64>| {
            value
                .map(u32::try_from)
                .transpose()
                .map_err(|_| LedgerError::Corrupt { what: "rate limit" })
        };
        Ok(RateLimits {
            requests_per_minute: limit(rpm)?,
            tokens_per_minute: limit(tpm)?,
        })
    }
}
