//! The one error type of `tidepool-ledger`.

use tidepool_core::{Currency, KeyId, ModelId, Nanos, RequestId, TenantId};

use crate::kinds::{QuotaScope, RateKind, RateScopeKind, ReservationState};

/// Everything the ledger can fail with. The gateway maps each variant to an HTTP status in one
/// exhaustive `match`; the suggested mapping is in docs/ledger.md.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("unsupported database url (expected sqlite:// or postgres://)")]
    UnsupportedUrl,
    #[error("api key `{key_id}` not found")]
    KeyNotFound { key_id: String },
    #[error(transparent)]
    Core(#[from] tidepool_core::CoreError),
    /// A value does not fit the ledger's column or limit (e.g. a latency above `i64::MAX` ms).
    #[error("{field} is out of range")]
    OutOfRange { field: &'static str },
    /// A stored row could not be decoded back into a domain value.
    #[error("stored {what} is corrupt")]
    Corrupt { what: &'static str },
    /// A ledger invariant failed; the transaction was rolled back and nothing moved.
    #[error("ledger invariant violated: {what}")]
    Invariant { what: &'static str },
    #[error("api key `{key_id}` is revoked")]
    KeyRevoked { key_id: KeyId },
    #[error("tenant `{tenant}` not found")]
    TenantNotFound { tenant: TenantId },
    /// A model's price is in another currency than the tenant's account (a configuration error:
    /// Tidepool never converts).
    #[error("currency mismatch: the account is in {expected}, the price in {found}")]
    CurrencyMismatch { expected: Currency, found: Currency },
    /// `create_tenant` of an existing tenant with another currency than its account's.
    #[error("tenant `{tenant}` already has an account in {existing}, not {requested}")]
    TenantCurrencyConflict {
        tenant: TenantId,
        existing: Currency,
        requested: Currency,
    },
    #[error("model `{model}` has no price in force")]
    PriceNotFound { model: ModelId },
    #[error("model `{model}` already has a different price from {effective_from_ms} ms")]
    PriceVersionConflict {
        model: ModelId,
        effective_from_ms: i64,
    },
    /// The reservation does not fit: the gateway answers 429 `insufficient_quota` (no retry).
    #[error(
        "insufficient quota ({scope:?}): this request may cost up to {needed} but only {available} is available"
    )]
    InsufficientQuota {
        scope: QuotaScope,
        needed: Nanos,
        available: Nanos,
    },
    /// An RPM/TPM window is full: 429 `rate_limit_exceeded` with `Retry-After`.
    #[error(
        "rate limit reached ({scope:?} {kind:?} per minute, limit {limit}); retry in {retry_after_ms} ms"
    )]
    RateLimited {
        scope: RateScopeKind,
        kind: RateKind,
        /// The per-minute limit that was hit.
        limit: u32,
        retry_after_ms: u64,
    },
    #[error("request id {request_id} was already used")]
    DuplicateRequest { request_id: RequestId },
    /// The `Idempotency-Key` was already used by `original_request_id` (now in `state`); nothing
    /// was reserved or billed for this request.
    #[error("idempotency key already used by request {original_request_id} ({state:?})")]
    IdempotencyKeyReused {
        original_request_id: RequestId,
        state: ReservationState,
    },
    #[error("no reservation for request {request_id}")]
    ReservationNotFound { request_id: RequestId },
    /// The usage entry names another tenant, key or model than its reservation.
    #[error("usage of request {request_id} does not match its reservation")]
    ReservationMismatch { request_id: RequestId },
    /// The settle writer stopped or failed a batch; the command may be retried.
    #[error("the ledger writer is unavailable")]
    WriterFailed,
}

impl LedgerError {
    /// The database (or the ledger's writer) cannot be reached right now: the same command can
    /// succeed once the store is back. Connection-level failures only — a constraint, a decode
    /// or a domain error is never "unavailable".
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::WriterFailed => true,
            Self::Database(error) => match error {
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::Protocol(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed => true,
                // PostgreSQL: connection exceptions (class 08), the server shutting down or
                // starting (57P01-57P03). SQLite: the file cannot be opened or read/written
                // (CANTOPEN 14, IOERR 10 and its extended codes, FULL 13).
                sqlx::Error::Database(db) => db.code().is_some_and(|code| {
                    code.starts_with("08")
                        || matches!(code.as_ref(), "57P01" | "57P02" | "57P03" | "14" | "13")
                        || code == "10"
                        || code.parse::<u32>().is_ok_and(|c| c & 0xff == 10)
                }),
                _ => false,
            },
            _ => false,
        }
    }

    /// A conflict that a retry of the same transaction can resolve: PostgreSQL deadlock or
    /// serialization failure, SQLite busy/locked.
    pub fn is_transient(&self) -> bool {
        let Self::Database(sqlx::Error::Database(db)) = self else {
            return false;
        };
        matches!(
            db.code().as_deref(),
            Some("40P01" | "40001" | "5" | "6" | "517" | "261")
        )
    }
}
