//! `tidepool-ledger` owns everything that is money or identity at rest: API keys (only their
//! SHA-256 is stored), usage entries (exactly one per request id) and their daily rollups
//! (`rollup`), tenants → projects → keys, prepaid balances, monthly budgets, the versioned price
//! book, RPM/TPM windows, durable reservations (reserve → settle | void), monthly statements, the
//! hash-chained audit log, the durable outbox of webhook alerts and key suspensions. One
//! behavioural suite runs on both stores: SQLite (default, embedded, WAL) and PostgreSQL, each
//! with its own `sqlx` migration set. docs/ledger.md states the guarantees and how each is tested.
//!
//! It never depends on the gateway, the engine or the pool. Read [`Ledger`] first, then
//! [`Ledger::reserve`], [`Ledger::settle`] and the rounding rule in [`price`].
#![forbid(unsafe_code)]
#![deny(clippy::arithmetic_side_effects, clippy::float_arithmetic)]

mod accounts;
mod audit;
mod batch_sql;
mod batches;
mod bench;
mod billing;
mod budgets;
mod checkpoint;
mod clock;
mod error;
mod keys;
mod kinds;
mod month;
mod outbox;
pub mod price;
mod recovery;
mod rollup;
mod schema;
mod statement;
mod store;
#[cfg(feature = "test-util")]
pub mod testing;
mod usage;
mod write_tx;
mod writer;

use std::sync::Arc;

pub use accounts::{
    Account, BALANCE_NANOS_MAX, BUDGET_NANOS_MAX, BudgetScope, BudgetStatus, CREDIT_NANOS_MAX,
    CREDIT_NOTE_BYTES_MAX, DEFAULT_PROJECT, ProjectId, RateLimits, RateLimitsChange, RateScope,
};
pub use audit::{
    AUDIT_ACTION_BYTES_MAX, AUDIT_ACTOR_BYTES_MAX, AUDIT_CHECKPOINT_KEY_BYTES_MIN,
    AUDIT_DETAILS_BYTES_MAX, AUDIT_GENESIS_HASH, AUDIT_PAGE_LEN_MAX, AUDIT_REQUEST_ID_BYTES_MAX,
    AUDIT_TARGET_BYTES_MAX, AuditActor, AuditAnchor, AuditBreak, AuditCheckpoint,
    AuditCheckpointing, AuditContext, AuditEntry, AuditKey, AuditVerdict, chain_hash,
};
pub use batches::{
    BATCH_PAGE_LEN_MAX, BATCH_TEXT_BYTES_MAX, BatchFile, BatchLineRecord, BatchRecord, BatchStatus,
    BatchTotals, FileDeletion, NewBatchLine,
};
pub use bench::{
    BENCH_CONCURRENCY_MAX, BENCH_SEED_DIMENSION_MAX, BENCH_SETTLES_MAX, BENCH_USAGE_ROWS_MAX,
    BenchDatabase, SeededUsage, SettleBench, UsageSeed, bench_entry, bench_price, bench_seed_usage,
    bench_settles,
};
pub use billing::{
    HOLD_NANOS_MAX, IDEMPOTENCY_KEY_BYTES_MAX, RATE_WINDOW_MS, RESERVE_BATCH_LEN_MAX,
    RESERVE_QUEUE_LEN_MAX, RateLimitStatus, Reservation, ReserveClass, ReserveRequest,
    WindowStatus,
};
pub use budgets::TENANT_BUDGETS_LEN_MAX;
pub use checkpoint::{WAL_CHECKPOINT_INTERVAL, WAL_SYNC_INTERVAL};
pub use clock::{Clock, SystemClock};
pub use error::LedgerError;
pub use keys::{
    KEY_ID_LEN, KEY_NAME_BYTES_MAX, KEY_PREFIX, KEY_SECRET_LEN, SUSPENDED_REASON_BYTES_MAX,
};
pub use kinds::{QuotaScope, RateKind, RateScopeKind, ReservationState};
pub use month::{Day, Month};
pub use outbox::{
    ALERT_CLAIM_LEN_MAX, ALERT_ERROR_BYTES_MAX, ALERT_PAYLOAD_BYTES_MAX, ClaimedAlert, NewAlert,
    OutboxCounts,
};
pub use price::{BilledTokens, DISCOUNT_PPM_FULL, PriceVersion};
pub use recovery::{INTERRUPTED_CODE, RECOVERED_ENDPOINT, RECOVERY_PAGE_LEN_MAX, RecoveryReport};
pub use rollup::{
    DailyUsage, TENANT_SPEND_TENANTS_MAX, TenantSpend, USAGE_DAILY_DAYS_MAX, USAGE_DAILY_ROWS_MAX,
};
pub use schema::{
    Check, MigrateReport, MigrationId, Readiness, SchemaStatus, migrate, schema_status,
};
pub use statement::{STATEMENT_CREDIT_LINES_MAX, Statement, StatementLine};
pub use store::POSTGRES_ACQUIRE_TIMEOUT;
use tidepool_core::{KeyId, ModelId, RequestId, TenantId, TokenCount};
pub use usage::{BilledUsage, ModelUsage, USAGE_LABEL_BYTES_MAX, UsageScope};
pub use writer::{Finish, SETTLE_BATCH_LEN_MAX, SETTLE_QUEUE_LEN_MAX, Settlement};

use crate::store::Store;

/// A stored API key (never the secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyRecord {
    pub key_id: KeyId,
    pub tenant: TenantId,
    pub project: ProjectId,
    pub name: String,
    pub created_at_ms: i64,
    pub revoked_at_ms: Option<i64>,
    /// Suspended keys authenticate but are refused (`Ledger::suspend_key`).
    pub suspended_at_ms: Option<i64>,
    pub suspended_reason: Option<String>,
    pub role: KeyRole,
}

/// What an API key may do beyond calling models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyRole {
    /// The model endpoints and the key's own usage (`GET /v1/usage`).
    #[default]
    Inference,
    /// Also its tenant's keys, budgets, usage and statement, through the admin API and the
    /// console; never another tenant's, never the operator's endpoints.
    TenantAdmin,
}

impl KeyRole {
    /// The stored and wire spelling: `inference` or `tenant-admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inference => "inference",
            Self::TenantAdmin => "tenant-admin",
        }
    }

    /// The role a spelling names, if any.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "inference" => Some(Self::Inference),
            "tenant-admin" => Some(Self::TenantAdmin),
            _ => None,
        }
    }
}

/// A freshly created key: the only time the secret exists outside the client.
#[derive(Debug, Clone)]
pub struct CreatedKey {
    pub record: ApiKeyRecord,
    /// `tp-<key_id>-<secret>`; shown once, never stored.
    pub secret: String,
}

/// How a request ended, as stored in its usage entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsageStatus {
    Ok,
    /// The client went away; the entry counts the tokens actually delivered.
    ClientDisconnected,
    /// Failed with this stable error code (e.g. `context_length_exceeded`).
    Error {
        code: String,
    },
}

/// One request's usage, written exactly once per request id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageEntry {
    pub request_id: RequestId,
    pub tenant: TenantId,
    pub key_id: KeyId,
    /// `None` when the request failed before a model was resolved.
    pub model: Option<ModelId>,
    /// e.g. `chat.completions`, `completions`, `embeddings`.
    pub endpoint: String,
    pub prompt_tokens: TokenCount,
    pub completion_tokens: TokenCount,
    /// Part of `prompt_tokens` served from a cached prefix (0 when unknown).
    pub cached_prompt_tokens: TokenCount,
    /// The backend did not report its cached prompt tokens: `cached_prompt_tokens` is 0 and
    /// every prompt token is billed as uncached input, but the entry says "unknown", not 0.
    pub cached_prompt_tokens_unknown: bool,
    pub status: UsageStatus,
    pub latency_ms: u64,
    pub created_at_ms: i64,
}

/// Sums for one model over a query's range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelTotals {
    /// The model id, or [`NO_MODEL`] for requests that failed before a model was resolved.
    pub model: String,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// The `model` of [`ModelTotals`] for requests that never resolved a model.
pub const NO_MODEL: &str = "(none)";

/// Longest replica id, in bytes.
pub const REPLICA_ID_BYTES_MAX: usize = 64;

/// How a [`Ledger`] handle is set up.
#[derive(Debug, Clone)]
pub struct LedgerOptions {
    /// Names this process among the gateway replicas sharing one database. Must be stable across
    /// restarts and unique among live replicas: [`Ledger::recover`] resolves the open
    /// reservations made under this id.
    pub replica_id: String,
    pub clock: Arc<dyn Clock>,
    /// Apply the missing migrations on connect (the default). Off, the handle connects to the
    /// schema as it is (`[server] migrate_on_start = false`: `tidepool migrate` does it), and
    /// [`Ledger::readiness`] says when it is current.
    pub migrate: bool,
    /// How long taking a pooled connection may wait; `None`: the store's default
    /// ([`POSTGRES_ACQUIRE_TIMEOUT`], 30 s for SQLite).
    pub acquire_timeout: Option<std::time::Duration>,
    /// Signed checkpoints of the audit log; `None`: none are written, and verification cannot
    /// check the signatures of those that exist.
    pub audit_checkpoints: Option<AuditCheckpointing>,
}

impl Default for LedgerOptions {
    fn default() -> Self {
        Self {
            replica_id: "default".to_owned(),
            clock: Arc::new(SystemClock),
            migrate: true,
            acquire_timeout: None,
            audit_checkpoints: None,
        }
    }
}

/// The ledger handle: cheap to clone, safe to share across tasks. Each handle made by `connect*`
/// owns one reserve writer task and one settle writer task, on SQLite one WAL checkpointer task,
/// and with [`LedgerOptions::audit_checkpoints`] one audit checkpoint task (they stop when the
/// last clone is dropped); two handles on one PostgreSQL behave as two gateway replicas.
#[derive(Debug, Clone)]
pub struct Ledger {
    store: Store,
    clock: Arc<dyn Clock>,
    replica_id: Arc<str>,
    writer: tokio::sync::mpsc::Sender<writer::Command>,
    reserver: tokio::sync::mpsc::Sender<billing::ReserveCommand>,
    /// The writers' gate, also taken by audit appends, alert claims, and `reserve_in_one_batch`
    /// and `finish_in_one_batch` (tests).
    gate: store::WriteGate,
    /// What readiness checks ask ([`Ledger::readiness`]).
    probe: schema::Probe,
    /// The audit log's checkpoint key and cadence, if any.
    audit: Option<Arc<AuditCheckpointing>>,
}

impl Ledger {
    /// Connects to `sqlite://path` (created if missing, WAL) or `postgres://…` and runs the
    /// store's migrations (safe when several processes connect at once: see [`migrate`]).
    pub async fn connect(database_url: &str) -> Result<Self, LedgerError> {
        Self::connect_with_clock(database_url, Arc::new(SystemClock)).await
    }

    /// [`Ledger::connect`] with an injected clock (tests, simulation).
    pub async fn connect_with_clock(
        database_url: &str,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, LedgerError> {
        Self::connect_with(
            database_url,
            LedgerOptions {
                clock,
                ..LedgerOptions::default()
            },
        )
        .await
    }

    /// [`Ledger::connect`] with explicit options. Must run inside a tokio runtime: it starts the
    /// reserve and settle writer tasks (and on SQLite the WAL checkpointer).
    pub async fn connect_with(
        database_url: &str,
        options: LedgerOptions,
    ) -> Result<Self, LedgerError> {
        let replica_id = options.replica_id;
        if replica_id.is_empty() || replica_id.len() > REPLICA_ID_BYTES_MAX {
            return Err(LedgerError::OutOfRange {
                field: "replica id",
            });
        }
        let store = Store::connect(database_url, options.acquire_timeout).await?;
        if options.migrate {
            store.migrate().await?;
        }
        let probe = schema::Probe::for_store(&store, database_url)?;
        let (tx, rx) = tokio::sync::mpsc::channel(SETTLE_QUEUE_LEN_MAX);
        let gate = store::WriteGate::for_store(&store);
        let writer = writer::Writer {
            store: store.clone(),
            gate: gate.clone(),
            clock: options.clock.clone(),
            rx,
            last_cleanup_ms: i64::MIN,
        };
        let replica_id: Arc<str> = replica_id.into();
        let (reserve_tx, reserve_rx) = tokio::sync::mpsc::channel(RESERVE_QUEUE_LEN_MAX);
        let reserve_writer = billing::ReserveWriter {
            reserver: billing::Reserver {
                store: store.clone(),
                gate: gate.clone(),
                clock: options.clock.clone(),
                replica_id: replica_id.clone(),
            },
            rx: reserve_rx,
        };
        // Not tracked by a TaskTracker: the writers end by themselves once every handle is
        // dropped, after replying to everything queued; the checkpointer within one interval
        // after that.
        tokio::spawn(writer.run());
        tokio::spawn(reserve_writer.run());
        if let Store::Sqlite(pool) = &store {
            tokio::spawn(checkpoint::run(
                pool.clone(),
                gate.clone(),
                reserve_tx.downgrade(),
            ));
        }
        let audit = options.audit_checkpoints.map(Arc::new);
        if let Some(checkpointing) = &audit {
            tokio::spawn(audit::run_checkpoints(
                store.clone(),
                gate.clone(),
                options.clock.clone(),
                checkpointing.clone(),
                reserve_tx.downgrade(),
            ));
        }
        Ok(Self {
            store,
            clock: options.clock,
            replica_id,
            writer: tx,
            reserver: reserve_tx,
            gate,
            probe,
            audit,
        })
    }

    /// This handle's replica id.
    pub fn replica_id(&self) -> &str {
        &self.replica_id
    }

    /// Which store this handle talks to: `"sqlite"` or `"postgres"`.
    pub fn store_kind(&self) -> &'static str {
        self.store.kind()
    }

    fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }
}
