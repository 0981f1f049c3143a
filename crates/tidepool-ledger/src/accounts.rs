//! Tenants → projects → keys, prepaid balances, credits, monthly budgets, the price book and
//! RPM/TPM limits: the administrative side of the ledger. Every write here is a short
//! transaction that locks the audit head first and appends its audit entry before it commits
//! (`audit`); the hot path (reserve/settle) lives in `billing` and `writer`.

use std::fmt;

use tidepool_core::{Currency, KeyId, ModelId, Nanos, TenantId};

use crate::audit::{AuditContext, AuditSql as _, Change};
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

/// The audit target of a tenant: `tenant:<id>`.
fn tenant_target(tenant: &TenantId) -> String {
    format!("tenant:{tenant}")
}

/// The audit target of a project: `project:<tenant>/<project>`.
fn project_target(tenant: &TenantId, project: &ProjectId) -> String {
    format!("project:{tenant}/{project}")
}

impl BudgetScope {
    /// The audit target: `project:<tenant>/<project>` or `key:<key id>`.
    pub(crate) fn audit_target(&self) -> String {
        match self {
            Self::Project { tenant, project } => project_target(tenant, project),
            Self::Key { key_id } => format!("key:{key_id}"),
        }
    }
}

impl RateScope {
    /// The audit target: `key:<key id>`, `project:<tenant>/<project>` or `model:<id>`.
    pub(crate) fn audit_target(&self) -> String {
        match self {
            Self::Key { key_id } => format!("key:{key_id}"),
            Self::Project { tenant, project } => project_target(tenant, project),
            Self::Model { model } => format!("model:{model}"),
        }
    }
}

/// Which of the two writes of the price book.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PriceWrite {
    /// A given version ([`Ledger::set_price`]).
    Set,
    /// The configured prices, from now on if they changed ([`Ledger::sync_price`]).
    Sync,
}

/// `(effective_from_ms, currency, input, output, cached input)` of a price version.
type PriceRow = (i64, String, i64, i64, i64);

/// The version of model `$1` in force at `$2`, as a [`PriceRow`].
const PRICE_AT_SQL: &str = "SELECT effective_from_ms, currency, input_per_mtok_nanos, \
     output_per_mtok_nanos, cached_input_per_mtok_nanos FROM prices WHERE model = $1 \
     AND effective_from_ms <= $2 ORDER BY effective_from_ms DESC LIMIT 1";

fn price_from_row(model: &ModelId, row: PriceRow) -> Result<PriceVersion, LedgerError> {
    let (effective_from_ms, currency, input, output, cached) = row;
    Ok(PriceVersion {
        model: model.clone(),
        effective_from_ms,
        currency: Currency::parse(&currency)
            .map_err(|_| LedgerError::Corrupt { what: "currency" })?,
        input_per_mtok: Nanos(input),
        output_per_mtok: Nanos(output),
        cached_input_per_mtok: Nanos(cached),
    })
}

/// A price version in an audit entry's details.
fn price_details(price: &PriceVersion) -> serde_json::Value {
    serde_json::json!({
        "effective_from_ms": price.effective_from_ms,
        "currency": price.currency.as_str(),
        "input_per_mtok_nanos": price.input_per_mtok.0,
        "output_per_mtok_nanos": price.output_per_mtok.0,
        "cached_input_per_mtok_nanos": price.cached_input_per_mtok.0,
    })
}

fn rate_limits_from_row(
    row: Option<(Option<i64>, Option<i64>)>,
) -> Result<RateLimits, LedgerError> {
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

impl Ledger {
    /// Creates a tenant with an empty account in `currency`, and its default project, audited as
    /// `tenant.create`. Creating an existing tenant again is a no-op (nothing audited); asking
    /// for a different currency is an error.
    pub async fn create_tenant(
        &self,
        tenant: &TenantId,
        currency: Currency,
        audit: &AuditContext,
    ) -> Result<(), LedgerError> {
        let _gate = self.gate.enter().await;
        on_store!(&self.store, pool => {
            let mut tx = pool.begin_with(self.store.begin_write_sql()).await?;
            let head = tx.lock_audit_head().await?;
            let now_ms = self.now_ms();
            let created = sqlx::query(
                "INSERT INTO tenants (tenant_id, created_at_ms) VALUES ($1, $2) \
                 ON CONFLICT (tenant_id) DO NOTHING",
            )
            .bind(tenant.as_str())
            .bind(now_ms)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
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
            if stored != currency.as_str() {
                return Err(LedgerError::TenantCurrencyConflict {
                    tenant: tenant.clone(),
                    existing: Currency::parse(&stored)
                        .map_err(|_| LedgerError::Corrupt { what: "currency" })?,
                    requested: currency,
                });
            }
            if created {
                let change = Change {
                    action: "tenant.create",
                    target: tenant_target(tenant),
                    details: serde_json::json!({ "currency": currency.as_str() }),
                };
                self.append_in(&mut *tx, head, audit, now_ms, change).await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// Creates a project under an existing tenant, audited as `project.create` (no-op if it
    /// exists: nothing audited).
    pub async fn create_project(
        &self,
        tenant: &TenantId,
        project: &ProjectId,
        audit: &AuditContext,
    ) -> Result<(), LedgerError> {
        let _gate = self.gate.enter().await;
        on_store!(&self.store, pool => {
            let mut tx = pool.begin_with(self.store.begin_write_sql()).await?;
            let head = tx.lock_audit_head().await?;
            let now_ms = self.now_ms();
            let exists: Option<String> = sqlx::query_scalar("SELECT tenant_id FROM accounts WHERE tenant_id = $1")
                .bind(tenant.as_str())
                .fetch_optional(&mut *tx)
                .await?;
            if exists.is_none() {
                return Err(LedgerError::TenantNotFound { tenant: tenant.clone() });
            }
            let created = sqlx::query(
                "INSERT INTO projects (tenant_id, project_id, created_at_ms) VALUES ($1, $2, $3) \
                 ON CONFLICT (tenant_id, project_id) DO NOTHING",
            )
            .bind(tenant.as_str())
            .bind(project.as_str())
            .bind(now_ms)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            if created {
                let change = Change {
                    action: "project.create",
                    target: project_target(tenant, project),
                    details: serde_json::json!({}),
                };
                self.append_in(&mut *tx, head, audit, now_ms, change).await?;
            }
            tx.commit().await?;
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

    /// Adds prepaid credit to a tenant's balance and records it for the statement, audited as
    /// `tenant.credit` (balance before and after).
    pub async fn credit(
        &self,
        tenant: &TenantId,
        amount: Nanos,
        note: &str,
        audit: &AuditContext,
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
        let credit_id = uuid::Uuid::now_v7().to_string();
        {
            let _gate = self.gate.enter().await;
            on_store!(&self.store, pool => {
                let mut tx = pool.begin_with(self.store.begin_write_sql()).await?;
                let head = tx.lock_audit_head().await?;
                let now_ms = self.now_ms();
                let before: Option<i64> =
                    sqlx::query_scalar("SELECT balance_nanos FROM accounts WHERE tenant_id = $1")
                        .bind(tenant.as_str())
                        .fetch_optional(&mut *tx)
                        .await?;
                let Some(before) = before else {
                    return Err(LedgerError::TenantNotFound { tenant: tenant.clone() });
                };
                let after: Option<i64> = sqlx::query_scalar(
                    "UPDATE accounts SET balance_nanos = balance_nanos + $2 \
                     WHERE tenant_id = $1 AND balance_nanos <= $3 - $2 RETURNING balance_nanos",
                )
                .bind(tenant.as_str())
                .bind(amount.0)
                .bind(BALANCE_NANOS_MAX)
                .fetch_optional(&mut *tx)
                .await?;
                // The balance would pass its maximum.
                let after = after.ok_or_else(|| money_overflow("balance after credit"))?;
                sqlx::query(
                    "INSERT INTO credits (credit_id, tenant_id, amount_nanos, month, created_at_ms, note) \
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(&credit_id)
                .bind(tenant.as_str())
                .bind(amount.0)
                .bind(Month::of_ms(now_ms).to_string())
                .bind(now_ms)
                .bind(note)
                .execute(&mut *tx)
                .await?;
                let change = Change {
                    action: "tenant.credit",
                    target: tenant_target(tenant),
                    details: serde_json::json!({
                        "amount_nanos": amount.0,
                        "note": note,
                        "credit_id": credit_id,
                        "before": { "balance_nanos": before },
                        "after": { "balance_nanos": after },
                    }),
                };
                self.append_in(&mut *tx, head, audit, now_ms, change).await?;
                tx.commit().await?;
            });
        }
        self.account(tenant).await
    }

    /// Sets (or with `None` removes) the monthly budget of a project or key, audited as
    /// `budget.set` (limit before and after; setting the limit it has is a no-op, not audited).
    /// Takes effect for the next reservation; what the month already used still counts.
    pub async fn set_budget(
        &self,
        scope: &BudgetScope,
        limit: Option<Nanos>,
        audit: &AuditContext,
    ) -> Result<(), LedgerError> {
        if let Some(limit) = limit
            && (limit < Nanos::ZERO || limit.0 > BUDGET_NANOS_MAX)
        {
            return Err(LedgerError::OutOfRange { field: "budget" });
        }
        let (kind, id) = scope.parts();
        let after = limit.map(|l| l.0);
        let _gate = self.gate.enter().await;
        on_store!(&self.store, pool => {
            let mut tx = pool.begin_with(self.store.begin_write_sql()).await?;
            let head = tx.lock_audit_head().await?;
            let now_ms = self.now_ms();
            let before: Option<i64> = sqlx::query_scalar(
                "SELECT limit_nanos FROM budgets WHERE scope = $1 AND scope_id = $2",
            )
            .bind(kind)
            .bind(&id)
            .fetch_optional(&mut *tx)
            .await?;
            if before == after {
                return Ok(());
            }
            match after {
                Some(limit) => sqlx::query(
                    "INSERT INTO budgets (scope, scope_id, limit_nanos) VALUES ($1, $2, $3) \
                     ON CONFLICT (scope, scope_id) DO UPDATE SET limit_nanos = excluded.limit_nanos",
                )
                .bind(kind)
                .bind(&id)
                .bind(limit)
                .execute(&mut *tx)
                .await?,
                None => sqlx::query("DELETE FROM budgets WHERE scope = $1 AND scope_id = $2")
                    .bind(kind)
                    .bind(&id)
                    .execute(&mut *tx)
                    .await?,
            };
            let change = Change {
                action: "budget.set",
                target: scope.audit_target(),
                details: serde_json::json!({
                    "before": { "limit_nanos": before },
                    "after": { "limit_nanos": after },
                }),
            };
            self.append_in(&mut *tx, head, audit, now_ms, change).await?;
            tx.commit().await?;
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

    /// Adds a price version, audited as `price.set` (with the version it supersedes as
    /// `before`). Versions are immutable: a different price for an existing
    /// `(model, effective_from_ms)` is an error, the same one is a no-op (not audited).
    pub async fn set_price(
        &self,
        price: &PriceVersion,
        audit: &AuditContext,
    ) -> Result<(), LedgerError> {
        price.validate()?;
        self.add_price_version(price, PriceWrite::Set, audit)
            .await
            .map(drop)
    }

    /// Makes `price` (its `effective_from_ms` ignored) the model's price from now on, unless the
    /// prices in force already equal it; audited as `price.sync`. For syncing the price book
    /// from `tidepool.toml` at start-up: returns whether a new version was added.
    pub async fn sync_price(
        &self,
        price: &PriceVersion,
        audit: &AuditContext,
    ) -> Result<bool, LedgerError> {
        price.validate()?;
        self.add_price_version(price, PriceWrite::Sync, audit).await
    }

    /// One transaction for [`Ledger::set_price`] and [`Ledger::sync_price`]: reads the version
    /// in force, adds the new one unless it changes nothing, audits it.
    async fn add_price_version(
        &self,
        price: &PriceVersion,
        write: PriceWrite,
        audit: &AuditContext,
    ) -> Result<bool, LedgerError> {
        let _gate = self.gate.enter().await;
        on_store!(&self.store, pool => {
            let mut tx = pool.begin_with(self.store.begin_write_sql()).await?;
            let head = tx.lock_audit_head().await?;
            let now_ms = self.now_ms();
            let effective_from_ms = match write {
                PriceWrite::Set => price.effective_from_ms,
                PriceWrite::Sync => now_ms,
            };
            let price = PriceVersion { effective_from_ms, ..price.clone() };
            let row: Option<PriceRow> = sqlx::query_as(PRICE_AT_SQL)
                .bind(price.model.as_str())
                .bind(effective_from_ms)
                .fetch_optional(&mut *tx)
                .await?;
            let before = row.map(|row| price_from_row(&price.model, row)).transpose()?;
            match &before {
                // Syncing: the prices in force are these already.
                Some(current) if write == PriceWrite::Sync && current.same_prices(&price) => {
                    return Ok(false);
                }
                // Setting: this version exists already.
                Some(current) if current.effective_from_ms == effective_from_ms => {
                    return if *current == price {
                        Ok(false)
                    } else {
                        Err(LedgerError::PriceVersionConflict {
                            model: price.model.clone(),
                            effective_from_ms,
                        })
                    };
                }
                _ => {}
            }
            sqlx::query(
                "INSERT INTO prices (model, effective_from_ms, currency, input_per_mtok_nanos, \
                 output_per_mtok_nanos, cached_input_per_mtok_nanos) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(price.model.as_str())
            .bind(price.effective_from_ms)
            .bind(price.currency.as_str())
            .bind(price.input_per_mtok.0)
            .bind(price.output_per_mtok.0)
            .bind(price.cached_input_per_mtok.0)
            .execute(&mut *tx)
            .await?;
            let change = Change {
                action: match write {
                    PriceWrite::Set => "price.set",
                    PriceWrite::Sync => "price.sync",
                },
                target: format!("model:{}", price.model),
                details: serde_json::json!({
                    "before": before.as_ref().map(price_details),
                    "after": price_details(&price),
                }),
            };
            self.append_in(&mut *tx, head, audit, now_ms, change).await?;
            tx.commit().await?;
            Ok(true)
        })
    }

    /// The price version of `model` in force at `at_ms`.
    pub async fn price_at(
        &self,
        model: &ModelId,
        at_ms: i64,
    ) -> Result<Option<PriceVersion>, LedgerError> {
        let row: Option<PriceRow> = on_store!(&self.store, pool => {
            sqlx::query_as(PRICE_AT_SQL)
                .bind(model.as_str())
                .bind(at_ms)
                .fetch_optional(pool)
                .await?
        });
        row.map(|row| price_from_row(model, row)).transpose()
    }
    /// Sets the RPM/TPM limits of a key, project or model (`None` fields are unlimited),
    /// audited as `rate_limits.set` (limits before and after; a no-op is not audited).
    pub async fn set_rate_limits(
        &self,
        scope: &RateScope,
        limits: RateLimits,
        audit: &AuditContext,
    ) -> Result<(), LedgerError> {
        let change = RateLimitsChange {
            requests_per_minute: Some(limits.requests_per_minute),
            tokens_per_minute: Some(limits.tokens_per_minute),
        };
        self.write_rate_limits(scope, change, audit).await.map(drop)
    }

    /// Changes only the limits `change` names, keeping the other as it is, and returns the
    /// limits now set; audited as [`Ledger::set_rate_limits`].
    pub async fn change_rate_limits(
        &self,
        scope: &RateScope,
        change: RateLimitsChange,
        audit: &AuditContext,
    ) -> Result<RateLimits, LedgerError> {
        self.write_rate_limits(scope, change, audit).await
    }

    /// Reads the limits and writes the changed ones in one transaction; the audit head's lock
    /// orders it after every other change of rate limits, so none is lost.
    async fn write_rate_limits(
        &self,
        scope: &RateScope,
        change: RateLimitsChange,
        audit: &AuditContext,
    ) -> Result<RateLimits, LedgerError> {
        let (kind, id) = scope.parts();
        let _gate = self.gate.enter().await;
        on_store!(&self.store, pool => {
            let mut tx = pool.begin_with(self.store.begin_write_sql()).await?;
            let head = tx.lock_audit_head().await?;
            let now_ms = self.now_ms();
            let row: Option<(Option<i64>, Option<i64>)> = sqlx::query_as(
                "SELECT requests_per_minute, tokens_per_minute FROM rate_limits \
                 WHERE scope = $1 AND scope_id = $2",
            )
            .bind(kind)
            .bind(&id)
            .fetch_optional(&mut *tx)
            .await?;
            let before = rate_limits_from_row(row)?;
            let after = RateLimits {
                requests_per_minute: change
                    .requests_per_minute
                    .unwrap_or(before.requests_per_minute),
                tokens_per_minute: change.tokens_per_minute.unwrap_or(before.tokens_per_minute),
            };
            if after == before {
                return Ok(after);
            }
            sqlx::query(
                "INSERT INTO rate_limits (scope, scope_id, requests_per_minute, tokens_per_minute) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (scope, scope_id) DO UPDATE SET \
                 requests_per_minute = excluded.requests_per_minute, \
                 tokens_per_minute = excluded.tokens_per_minute",
            )
            .bind(kind)
            .bind(&id)
            .bind(after.requests_per_minute.map(i64::from))
            .bind(after.tokens_per_minute.map(i64::from))
            .execute(&mut *tx)
            .await?;
            let limits = |l: RateLimits| serde_json::json!({
                "requests_per_minute": l.requests_per_minute,
                "tokens_per_minute": l.tokens_per_minute,
            });
            let change = Change {
                action: "rate_limits.set",
                target: scope.audit_target(),
                details: serde_json::json!({ "before": limits(before), "after": limits(after) }),
            };
            self.append_in(&mut *tx, head, audit, now_ms, change).await?;
            tx.commit().await?;
            Ok(after)
        })
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
        rate_limits_from_row(row)
    }
}
