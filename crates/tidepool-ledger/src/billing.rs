//! Admission: reserve the most a request can cost, atomically against the tenant's balance,
//! the key's and the project's monthly budgets and the RPM/TPM windows, in one transaction
//! (SQLite: `BEGIN IMMEDIATE`, one writer at a time; PostgreSQL: row locks, taken in one global
//! order — account, then budget rows sorted by `(scope, scope_id)`, then rate windows, then the
//! new reservation row — which the settle writer follows too, so the two never deadlock).
//! Either everything is taken or nothing is.

use tidepool_core::{Currency, KeyId, ModelId, Nanos, RequestId, TenantId, TokenCount};

use crate::accounts::ProjectId;
use crate::kinds::{QuotaScope, RateKind, RateScopeKind, ReservationState};
use crate::month::Month;
use crate::price::{PriceVersion, hold_for};
use crate::store::on_store;
use crate::{Ledger, LedgerError};

/// Longest `Idempotency-Key` accepted, in bytes.
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 255;
/// Length of one RPM/TPM window.
pub const RATE_WINDOW_MS: i64 = 60_000;
/// Largest hold one request may place, in nano-units (10^15 = one million currency units).
pub const HOLD_NANOS_MAX: i64 = 1_000_000_000_000_000;

/// What admission asks the ledger for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReserveRequest {
    pub request_id: RequestId,
    /// The authenticated key; its tenant and project are read inside the transaction, so a key
    /// revoked a moment ago cannot reserve.
    pub key_id: KeyId,
    pub model: ModelId,
    /// Prompt tokens as counted by the model's tokenizer.
    pub prompt_tokens: TokenCount,
    /// `max_tokens`, or the model's context limit minus the prompt when unset.
    pub completion_tokens_max: TokenCount,
    /// The client's `Idempotency-Key`, if any (unique per tenant, forever).
    pub idempotency_key: Option<String>,
}

/// One window of one limit, for `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowStatus {
    pub limit: u32,
    pub remaining: u32,
    /// Until the window resets.
    pub reset_ms: u64,
}

/// The tightest RPM and TPM windows that applied to a reservation (`None`: unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateLimitStatus {
    pub requests: Option<WindowStatus>,
    pub tokens: Option<WindowStatus>,
}

/// A granted reservation: the hold is durable and counts against balance and budgets until the
/// request is settled or voided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub request_id: RequestId,
    pub tenant: TenantId,
    pub project: ProjectId,
    pub key_id: KeyId,
    pub currency: Currency,
    /// The price snapshot the request will be billed at.
    pub price: PriceVersion,
    pub hold: Nanos,
    /// The budget month the request counts in.
    pub month: Month,
    pub created_at_ms: i64,
    pub rate_limits: RateLimitStatus,
}

fn tighter(current: Option<WindowStatus>, new: WindowStatus) -> WindowStatus {
    match current {
        Some(c) if c.remaining <= new.remaining => c,
        _ => new,
    }
}

/// A count as `u32` for headers, saturating (limits are `u32`, so only corrupt rows saturate).
fn to_u32_saturating(value: i64) -> u32 {
    u32::try_from(value.max(0)).unwrap_or(u32::MAX)
}

type KeyRow = (String, String, Option<i64>);
type PriceRow = (i64, String, i64, i64, i64);
type RateRow = (String, String, Option<i64>, Option<i64>);

impl Ledger {
    /// Reserves the most `request` can cost. Fails with [`LedgerError::InsufficientQuota`]
    /// (gateway: 429 `insufficient_quota`, do not retry) or [`LedgerError::RateLimited`] (429
    /// `rate_limit_exceeded` with `Retry-After`) before any compute, and takes nothing then.
    pub async fn reserve(&self, request: &ReserveRequest) -> Result<Reservation, LedgerError> {
        if let Some(key) = &request.idempotency_key
            && (key.is_empty() || key.len() > IDEMPOTENCY_KEY_BYTES_MAX)
        {
            return Err(LedgerError::OutOfRange {
                field: "idempotency key",
            });
        }
        let mut attempt: u32 = 0;
        loop {
            match self.reserve_once(request).await {
                Err(err) if err.is_transient() && attempt < crate::store::RETRY_ATTEMPTS_MAX => {
                    attempt = attempt.saturating_add(1);
                    tracing::debug!(attempt, "reserve retried after a transient conflict");
                }
                result => return result,
            }
        }
    }

    #[expect(clippy::too_many_lines, reason = "one transaction, read top to bottom")]
    async fn reserve_once(&self, request: &ReserveRequest) -> Result<Reservation, LedgerError> {
        let now_ms = self.now_ms();
        let month = Month::of_ms(now_ms);
        let month_text = month.to_string();
        let request_id = request.request_id.to_string();
        let window_start_ms = now_ms.saturating_sub(now_ms.rem_euclid(RATE_WINDOW_MS));
        let reset_ms = u64::try_from(
            window_start_ms
                .saturating_add(RATE_WINDOW_MS)
                .saturating_sub(now_ms),
        )
        .unwrap_or(0);
        let tokens = u64::from(request.prompt_tokens)
            .saturating_add(u64::from(request.completion_tokens_max));
        let tokens =
            i64::try_from(tokens).map_err(|_| LedgerError::OutOfRange { field: "tokens" })?;
        let replica_id: &str = &self.replica_id;

        let _gate = self.gate.enter().await;
        on_store!(&self.store, pool => {
            let mut tx = pool.begin_with(self.store.begin_write_sql()).await?;

            // The key, re-read inside the transaction.
            let key: Option<KeyRow> = sqlx::query_as(
                "SELECT tenant_id, project_id, revoked_at_ms FROM api_keys WHERE key_id = $1",
            )
            .bind(&request.key_id.0)
            .fetch_optional(&mut *tx)
            .await?;
            let Some((tenant_text, project_text, revoked_at_ms)) = key else {
                return Err(LedgerError::KeyNotFound { key_id: request.key_id.0.clone() });
            };
            if revoked_at_ms.is_some() {
                return Err(LedgerError::KeyRevoked { key_id: request.key_id.clone() });
            }
            let tenant = TenantId::new(tenant_text).map_err(|_| LedgerError::Corrupt { what: "tenant id" })?;
            let project = ProjectId::new(project_text).map_err(|_| LedgerError::Corrupt { what: "project id" })?;

            // Every request id at most once; every idempotency key at most once per tenant.
            let previous: Option<(String, String)> = sqlx::query_as(
                "SELECT request_id, state FROM reservations WHERE request_id = $1 \
                 OR (tenant_id = $2 AND idempotency_key = $3) ORDER BY request_id = $1 DESC LIMIT 1",
            )
            .bind(&request_id)
            .bind(tenant.as_str())
            .bind(request.idempotency_key.as_deref())
            .fetch_optional(&mut *tx)
            .await?;
            if let Some((previous_id, state)) = previous {
                if previous_id == request_id {
                    return Err(LedgerError::DuplicateRequest { request_id: request.request_id });
                }
                return Err(LedgerError::IdempotencyKeyReused {
                    original_request_id: RequestId::parse(&previous_id)
                        .map_err(|_| LedgerError::Corrupt { what: "request id" })?,
                    state: ReservationState::parse(&state).ok_or(LedgerError::Corrupt {
                        what: "reservation state",
                    })?,
                });
            }
            let used: Option<i64> = sqlx::query_scalar("SELECT 1 FROM usage_entries WHERE request_id = $1")
                .bind(&request_id)
                .fetch_optional(&mut *tx)
                .await?;
            if used.is_some() {
                return Err(LedgerError::DuplicateRequest { request_id: request.request_id });
            }

            // The price in force now.
            let price: Option<PriceRow> = sqlx::query_as(
                "SELECT effective_from_ms, currency, input_per_mtok_nanos, output_per_mtok_nanos, \
                 cached_input_per_mtok_nanos FROM prices WHERE model = $1 AND effective_from_ms <= $2 \
                 ORDER BY effective_from_ms DESC LIMIT 1",
            )
            .bind(request.model.as_str())
            .bind(now_ms)
            .fetch_optional(&mut *tx)
            .await?;
            let Some((effective_from_ms, currency_text, input, output, cached)) = price else {
                return Err(LedgerError::PriceNotFound { model: request.model.clone() });
            };
            let currency = Currency::parse(&currency_text).map_err(|_| LedgerError::Corrupt { what: "currency" })?;
            let price = PriceVersion {
                model: request.model.clone(),
                effective_from_ms,
                currency,
                input_per_mtok: Nanos(input),
                output_per_mtok: Nanos(output),
                cached_input_per_mtok: Nanos(cached),
            };
            let hold = hold_for(request.prompt_tokens, request.completion_tokens_max, &price)?;
            if hold.0 > HOLD_NANOS_MAX {
                return Err(LedgerError::OutOfRange { field: "reservation hold" });
            }

            // Limits are read before any row lock is taken, to keep locks short; a limit
            // changed meanwhile applies from the next reservation.
            let project_scope = format!("{tenant}/{project}");
            let budget_limits: Vec<(String, i64)> = sqlx::query_as(
                "SELECT scope, limit_nanos FROM budgets WHERE (scope = 'key' AND scope_id = $1) \
                 OR (scope = 'project' AND scope_id = $2)",
            )
            .bind(&request.key_id.0)
            .bind(&project_scope)
            .fetch_all(&mut *tx)
            .await?;
            let limits: Vec<RateRow> = sqlx::query_as(
                "SELECT scope, scope_id, requests_per_minute, tokens_per_minute FROM rate_limits \
                 WHERE (scope = 'key' AND scope_id = $1) OR (scope = 'project' AND scope_id = $2) \
                 OR (scope = 'model' AND scope_id = $3) ORDER BY scope, scope_id",
            )
            .bind(&request.key_id.0)
            .bind(&project_scope)
            .bind(request.model.as_str())
            .fetch_all(&mut *tx)
            .await?;

            // 1. The tenant's balance.
            let taken: Option<i64> = sqlx::query_scalar(
                "UPDATE accounts SET reserved_nanos = reserved_nanos + $2 \
                 WHERE tenant_id = $1 AND currency = $3 AND balance_nanos - reserved_nanos >= $2 \
                 RETURNING reserved_nanos",
            )
            .bind(tenant.as_str())
            .bind(hold.0)
            .bind(currency.as_str())
            .fetch_optional(&mut *tx)
            .await?;
            if taken.is_none() {
                let account: Option<(String, i64, i64)> = sqlx::query_as(
                    "SELECT currency, balance_nanos, reserved_nanos FROM accounts WHERE tenant_id = $1",
                )
                .bind(tenant.as_str())
                .fetch_optional(&mut *tx)
                .await?;
                let Some((account_currency, balance, reserved)) = account else {
                    return Err(LedgerError::TenantNotFound { tenant });
                };
                if account_currency != currency.as_str() {
                    return Err(LedgerError::CurrencyMismatch {
                        expected: Currency::parse(&account_currency)
                            .map_err(|_| LedgerError::Corrupt { what: "currency" })?,
                        found: currency,
                    });
                }
                return Err(LedgerError::InsufficientQuota {
                    scope: QuotaScope::Balance,
                    needed: hold,
                    available: Nanos(balance.saturating_sub(reserved)),
                });
            }

            // 2. Monthly budgets, in the global lock order ('key' < 'project'): one upsert each
            // that takes the hold only if it fits.
            for (scope, scope_id, quota_scope) in [
                ("key", request.key_id.0.as_str(), QuotaScope::KeyBudget),
                ("project", project_scope.as_str(), QuotaScope::ProjectBudget),
            ] {
                let limit = budget_limits.iter().find(|(s, _)| s == scope).map(|(_, l)| *l);
                let bound = limit.unwrap_or(i64::MAX);
                let taken: Option<i64> = if hold.0 <= bound {
                    sqlx::query_scalar(
                        "INSERT INTO budget_spend (scope, scope_id, month, reserved_nanos, spent_nanos) \
                         VALUES ($1, $2, $3, $4, 0) ON CONFLICT (scope, scope_id, month) DO UPDATE \
                         SET reserved_nanos = budget_spend.reserved_nanos + excluded.reserved_nanos \
                         WHERE budget_spend.reserved_nanos + budget_spend.spent_nanos \
                         + excluded.reserved_nanos <= $5 RETURNING reserved_nanos",
                    )
                    .bind(scope)
                    .bind(scope_id)
                    .bind(&month_text)
                    .bind(hold.0)
                    .bind(bound)
                    .fetch_optional(&mut *tx)
                    .await?
                } else {
                    None
                };
                if taken.is_none() {
                    let used: Option<(i64, i64)> = sqlx::query_as(
                        "SELECT reserved_nanos, spent_nanos FROM budget_spend \
                         WHERE scope = $1 AND scope_id = $2 AND month = $3",
                    )
                    .bind(scope)
                    .bind(scope_id)
                    .bind(&month_text)
                    .fetch_optional(&mut *tx)
                    .await?;
                    let (reserved, spent) = used.unwrap_or((0, 0));
                    return Err(LedgerError::InsufficientQuota {
                        scope: quota_scope,
                        needed: hold,
                        available: Nanos(bound.saturating_sub(reserved.saturating_add(spent)).max(0)),
                    });
                }
            }

            // 3. RPM/TPM windows of key, project and model ('key' < 'model' < 'project').
            let mut rate_limits = RateLimitStatus::default();
            for (scope, scope_id, rpm, tpm) in limits {
                let rpm_bound = rpm.unwrap_or(i64::MAX);
                let tpm_bound = tpm.unwrap_or(i64::MAX);
                let counted: Option<(i64, i64)> = if rpm_bound >= 1 && tpm_bound >= tokens {
                    sqlx::query_as(
                        "INSERT INTO rate_windows (scope, scope_id, window_start_ms, requests, tokens) \
                         VALUES ($1, $2, $3, 1, $4) \
                         ON CONFLICT (scope, scope_id, window_start_ms) DO UPDATE SET \
                         requests = rate_windows.requests + 1, tokens = rate_windows.tokens + $4 \
                         WHERE rate_windows.requests + 1 <= $5 AND rate_windows.tokens + $4 <= $6 \
                         RETURNING requests, tokens",
                    )
                    .bind(&scope)
                    .bind(&scope_id)
                    .bind(window_start_ms)
                    .bind(tokens)
                    .bind(rpm_bound)
                    .bind(tpm_bound)
                    .fetch_optional(&mut *tx)
                    .await?
                } else {
                    None
                };
                let Some((requests_used, tokens_used)) = counted else {
                    let used: Option<(i64, i64)> = sqlx::query_as(
                        "SELECT requests, tokens FROM rate_windows \
                         WHERE scope = $1 AND scope_id = $2 AND window_start_ms = $3",
                    )
                    .bind(&scope)
                    .bind(&scope_id)
                    .bind(window_start_ms)
                    .fetch_optional(&mut *tx)
                    .await?;
                    let (requests_used, _) = used.unwrap_or((0, 0));
                    let (kind, limit) = if requests_used.saturating_add(1) > rpm_bound {
                        (RateKind::Requests, rpm_bound)
                    } else {
                        (RateKind::Tokens, tpm_bound)
                    };
                    return Err(LedgerError::RateLimited {
                        scope: RateScopeKind::parse(&scope).ok_or(LedgerError::Corrupt {
                            what: "rate limit scope",
                        })?,
                        kind,
                        limit: to_u32_saturating(limit),
                        retry_after_ms: reset_ms,
                    });
                };
                if let Some(rpm) = rpm {
                    let status = WindowStatus {
                        limit: to_u32_saturating(rpm),
                        remaining: to_u32_saturating(rpm.saturating_sub(requests_used)),
                        reset_ms,
                    };
                    rate_limits.requests = Some(tighter(rate_limits.requests, status));
                }
                if let Some(tpm) = tpm {
                    let status = WindowStatus {
                        limit: to_u32_saturating(tpm),
                        remaining: to_u32_saturating(tpm.saturating_sub(tokens_used)),
                        reset_ms,
                    };
                    rate_limits.tokens = Some(tighter(rate_limits.tokens, status));
                }
            }

            // 4. The durable reservation.
            sqlx::query(
                "INSERT INTO reservations (request_id, tenant_id, project_id, key_id, model, \
                 replica_id, idempotency_key, month, currency, price_effective_from_ms, \
                 input_per_mtok_nanos, output_per_mtok_nanos, cached_input_per_mtok_nanos, \
                 prompt_tokens_max, completion_tokens_max, hold_nanos, state, created_at_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, 'open', $17)",
            )
            .bind(&request_id)
            .bind(tenant.as_str())
            .bind(project.as_str())
            .bind(&request.key_id.0)
            .bind(request.model.as_str())
            .bind(replica_id)
            .bind(request.idempotency_key.as_deref())
            .bind(&month_text)
            .bind(currency.as_str())
            .bind(price.effective_from_ms)
            .bind(price.input_per_mtok.0)
            .bind(price.output_per_mtok.0)
            .bind(price.cached_input_per_mtok.0)
            .bind(i64::from(request.prompt_tokens))
            .bind(i64::from(request.completion_tokens_max))
            .bind(hold.0)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;

            Ok(Reservation {
                request_id: request.request_id,
                tenant,
                project,
                key_id: request.key_id.clone(),
                currency,
                price,
                hold,
                month,
                created_at_ms: now_ms,
                rate_limits,
            })
        })
    }
}
