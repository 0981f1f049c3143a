//! The statements of the two group-commit writers (reservations in `billing`, settlements in
//! `writer`) whose text differs between the stores, behind one trait implemented for each
//! store's connection. A batch touches up to a few hundred rows per statement:
//!
//! - PostgreSQL binds whole columns as arrays (`= ANY($1)`, `INSERT … SELECT … FROM
//!   UNNEST($1, $2, …)`, `UPDATE … FROM UNNEST(…)`), so each statement has one text whatever the
//!   batch's size, is prepared once per connection and planned from a cached plan;
//! - SQLite has no arrays: it gets `IN (…)` lists and multi-row `VALUES`, built with
//!   `QueryBuilder` (SQLite prepares in-process, so a new text per batch size costs little).
//!
//! Row locks (PostgreSQL) are taken in the ledger's global order — accounts by tenant, then
//! budget rows by `(scope, scope_id, month)`, then rate windows by `(scope, scope_id)`, then
//! reservations — and every method that locks sorts its rows first. On SQLite the write
//! transaction (`BEGIN IMMEDIATE`) already holds the database's one write lock.
//!
//! A batch begins its transaction in its first statement and commits it in its last
//! (`begin_and_*`, `*_and_commit`): on SQLite the `BEGIN` goes in the same query as the batch's
//! read and the `COMMIT` in the same query as its writes, with a write guard after each write
//! (`write_tx`), so a batch is two trips to the connection's thread.

use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::query_builder::Separated;
use sqlx::{PgConnection, Postgres, QueryBuilder, Row as _, Sqlite, SqliteConnection};

use crate::LedgerError;
use crate::write_tx::{Guard, SQLITE_BEGIN_WRITE, TxControl, guard_sql, guarded};

/// One row of [`BatchSql::begin_and_read_inputs`]: `(kind, a, b, c, d, n1, n2, n3, n4)`.
pub(crate) type InputRow = (
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
);
/// What a reservation batch reads before it locks anything.
#[derive(Debug)]
pub(crate) struct BatchInputs<'a> {
    pub(crate) request_ids: &'a [String],
    pub(crate) key_ids: &'a [&'a str],
    /// `(key id, idempotency key)` of the requests that carry one.
    pub(crate) idempotency: &'a [(&'a str, &'a str)],
    pub(crate) models: &'a [&'a str],
    /// Prices in force at this instant.
    pub(crate) now_ms: i64,
    /// The budget month and the rate window the batch counts in.
    pub(crate) month: &'a str,
    pub(crate) window_start_ms: i64,
}
/// The rows a reservation batch may change (see [`BatchSql::lock_rows`]).
#[derive(Debug)]
pub(crate) struct LockRows<'a> {
    pub(crate) tenants: &'a [&'a str],
    /// `(scope, scope_id)` of this month's budget rows, sorted.
    pub(crate) budget_rows: &'a [(&'a str, &'a str)],
    pub(crate) month: &'a str,
    /// `(scope, scope_id)` of the current rate windows, sorted.
    pub(crate) window_rows: &'a [(&'a str, &'a str)],
    pub(crate) window_start_ms: i64,
}
/// What a reservation batch writes (see [`BatchSql::write_reservations_and_commit`]).
#[derive(Debug)]
pub(crate) struct ReservationWrites<'a> {
    /// `(tenant, hold)`.
    pub(crate) accounts: Vec<(&'a str, i64)>,
    pub(crate) budgets: Vec<CounterAdd<'a>>,
    pub(crate) month: &'a str,
    pub(crate) windows: Vec<CounterAdd<'a>>,
    pub(crate) window_start_ms: i64,
    pub(crate) reservations: Vec<NewReservation<'a>>,
}
/// `(tenant_id, currency, balance_nanos, reserved_nanos)`.
pub(crate) type AccountRow = (String, String, i64, i64);
/// `(scope, scope_id, first, second)`: a budget row's `(reserved_nanos, spent_nanos)` or a rate
/// window's `(requests, tokens)`.
pub(crate) type CounterRow = (String, String, i64, i64);
/// A reservation the settle writer resolved: request id, tenant, project, key, model, month,
/// currency, price (effective from, input, output, cached input), prompt and completion maxima,
/// hold.
pub(crate) type ReservationRow = (
    String,
    String,
    String,
    String,
    String,
    String,
    String,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
);
/// `(request_id, state, currency, cost of its usage entry)` of a reservation.
pub(crate) type StateRow = (String, String, String, Option<i64>);

/// A `(scope, scope_id)` pair, and what to add to its row with the bound the sum must respect.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CounterAdd<'a> {
    pub(crate) scope: &'a str,
    pub(crate) scope_id: &'a str,
    /// Whether the row existed when the batch read it (otherwise it is inserted).
    pub(crate) exists: bool,
    pub(crate) first: i64,
    pub(crate) second: i64,
    /// Budgets: the limit `reserved + spent + first` must stay within. Windows: the RPM bound
    /// for `requests + first`; [`Self::second_bound`] is the TPM bound.
    pub(crate) first_bound: i64,
    pub(crate) second_bound: i64,
}

/// One new reservation row (state `open`).
#[derive(Debug)]
pub(crate) struct NewReservation<'a> {
    pub(crate) request_id: String,
    pub(crate) tenant: &'a str,
    pub(crate) project: &'a str,
    pub(crate) key_id: &'a str,
    pub(crate) model: &'a str,
    pub(crate) replica_id: &'a str,
    pub(crate) idempotency_key: Option<&'a str>,
    pub(crate) month: &'a str,
    pub(crate) currency: &'a str,
    pub(crate) price_effective_from_ms: i64,
    pub(crate) input_per_mtok_nanos: i64,
    pub(crate) output_per_mtok_nanos: i64,
    pub(crate) cached_input_per_mtok_nanos: i64,
    pub(crate) prompt_tokens_max: i64,
    pub(crate) completion_tokens_max: i64,
    pub(crate) hold_nanos: i64,
    pub(crate) created_at_ms: i64,
}

/// One usage row with its money and price snapshot.
#[derive(Debug)]
pub(crate) struct UsageRow<'a> {
    /// The columns every usage row has.
    pub(crate) entry: FreeUsageRow<'a>,
    pub(crate) project: &'a str,
    pub(crate) month: &'a str,
    pub(crate) currency: &'a str,
    pub(crate) cost_nanos: i64,
    pub(crate) price_effective_from_ms: i64,
    pub(crate) input_per_mtok_nanos: i64,
    pub(crate) output_per_mtok_nanos: i64,
    pub(crate) cached_input_per_mtok_nanos: i64,
}

/// One money-free usage row (a request that reserved nothing: no project, price or cost), and
/// the columns every usage row has.
#[derive(Debug)]
pub(crate) struct FreeUsageRow<'a> {
    pub(crate) request_id: String,
    pub(crate) tenant: &'a str,
    pub(crate) key_id: &'a str,
    pub(crate) model: Option<&'a str>,
    pub(crate) endpoint: &'a str,
    pub(crate) prompt_tokens: i64,
    pub(crate) completion_tokens: i64,
    pub(crate) cached_prompt_tokens: i64,
    /// 1: the cached count is unknown (see `UsageEntry::cached_prompt_tokens_unknown`).
    pub(crate) cached_prompt_tokens_unknown: i64,
    pub(crate) status: &'static str,
    pub(crate) error_code: Option<&'a str>,
    pub(crate) latency_ms: i64,
    pub(crate) created_at_ms: i64,
}

/// Bind parameters of one [`FreeUsageRow`] in SQLite's insert.
pub(crate) const FREE_USAGE_BINDS: usize = 13;

/// What one batch adds to one row of the daily usage rollup: the sums of its usage rows with
/// that `(tenant, project, key, model, day)` (see `rollup`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DailyRow<'a> {
    pub(crate) tenant: &'a str,
    /// `""` for usage entries without a project (money-free entries).
    pub(crate) project: &'a str,
    pub(crate) key_id: &'a str,
    /// `""` for usage entries without a model.
    pub(crate) model: &'a str,
    /// Days since 1970-01-01 (UTC) of the entries' `created_at_ms`.
    pub(crate) day: i64,
    pub(crate) requests: i64,
    pub(crate) prompt_tokens: i64,
    pub(crate) cached_prompt_tokens: i64,
    /// Requests whose cached prompt tokens are unknown.
    pub(crate) cached_unknown_requests: i64,
    pub(crate) completion_tokens: i64,
    pub(crate) cost_nanos: i64,
}

/// The columns of `usage_entries` a [`FreeUsageRow`] fills, in the order it binds them
/// (`push_entry_binds`, `bind_entry_columns`, then `cached_prompt_tokens_unknown`; a macro,
/// for `concat!`).
macro_rules! free_usage_columns {
    () => {
        "request_id, tenant_id, key_id, model, endpoint, prompt_tokens, completion_tokens, \
         cached_prompt_tokens, status, error_code, latency_ms, created_at_ms, \
         cached_prompt_tokens_unknown"
    };
}

/// The columns of `usage_entries` a [`UsageRow`] fills, in the order it binds them (its
/// entry's first twelve, its money, then `cached_prompt_tokens_unknown`).
macro_rules! usage_columns {
    () => {
        "request_id, tenant_id, key_id, model, endpoint, prompt_tokens, completion_tokens, \
         cached_prompt_tokens, status, error_code, latency_ms, created_at_ms, project_id, month, \
         currency, cost_nanos, price_effective_from_ms, input_per_mtok_nanos, \
         output_per_mtok_nanos, cached_input_per_mtok_nanos, cached_prompt_tokens_unknown"
    };
}

/// The columns of a [`ReservationRow`], for `RETURNING` (a macro, so that `concat!` can build
/// static SQL with it).
macro_rules! resolved_columns {
    () => {
        "request_id, tenant_id, project_id, key_id, model, month, currency, \
         price_effective_from_ms, input_per_mtok_nanos, output_per_mtok_nanos, \
         cached_input_per_mtok_nanos, prompt_tokens_max, completion_tokens_max, hold_nanos"
    };
}

/// The columns of `usage_daily` in [`DailyRow`]'s order (a macro, for `concat!`).
macro_rules! daily_columns {
    () => {
        "tenant_id, project_id, key_id, model, day, requests, prompt_tokens, \
         cached_prompt_tokens, cached_unknown_requests, completion_tokens, cost_nanos"
    };
}

/// The end of both stores' rollup upserts: an existing row gets the sums added (a macro, for
/// `concat!`).
macro_rules! daily_upsert {
    () => {
        " ON CONFLICT (tenant_id, project_id, key_id, model, day) DO UPDATE SET \
         requests = usage_daily.requests + excluded.requests, \
         prompt_tokens = usage_daily.prompt_tokens + excluded.prompt_tokens, \
         cached_prompt_tokens = usage_daily.cached_prompt_tokens + excluded.cached_prompt_tokens, \
         cached_unknown_requests = usage_daily.cached_unknown_requests + excluded.cached_unknown_requests, \
         completion_tokens = usage_daily.completion_tokens + excluded.completion_tokens, \
         cost_nanos = usage_daily.cost_nanos + excluded.cost_nanos"
    };
}

/// SQLite: the reservations holding one of the batch's `(key's tenant, idempotency key)` pairs,
/// as one more `UNION ALL` branch of `begin_and_read_inputs` (none without pairs).
fn push_idempotency_reads<'a>(query: &mut QueryBuilder<'a, Sqlite>, inputs: &BatchInputs<'a>) {
    if inputs.idempotency.is_empty() {
        return;
    }
    query.push(
        " UNION ALL SELECT 'reservation', r.request_id, r.tenant_id, r.idempotency_key, r.state, \
         NULL, NULL, NULL, NULL FROM reservations r JOIN api_keys k ON k.tenant_id = r.tenant_id \
         WHERE ",
    );
    let mut pairs = query.separated(" OR ");
    for (key_id, key) in inputs.idempotency {
        pairs.push("(k.key_id = ");
        pairs.push_bind_unseparated(*key_id);
        pairs.push_unseparated(" AND r.idempotency_key = ");
        pairs.push_bind_unseparated(*key);
        pairs.push_unseparated(")");
    }
}

/// SQLite: the rows `lock_rows` returns on PostgreSQL (accounts, this month's budget rows, the
/// current rate windows), as more `UNION ALL` branches of `begin_and_read_inputs`.
fn push_locked_rows<'a>(query: &mut QueryBuilder<'a, Sqlite>, inputs: &BatchInputs<'a>) {
    let keys = || inputs.key_ids.iter().copied();
    let projects = " FROM api_keys WHERE key_id IN (";
    query.push(
        " UNION ALL SELECT 'account', tenant_id, currency, NULL, NULL, balance_nanos, \
         reserved_nanos, NULL, NULL FROM accounts WHERE tenant_id IN (SELECT tenant_id",
    );
    query.push(projects);
    push_list(query, keys());
    query.push(
        ")) UNION ALL SELECT 'spend', scope, scope_id, NULL, NULL, reserved_nanos, spent_nanos, \
         NULL, NULL FROM budget_spend WHERE month = ",
    );
    query.push_bind(inputs.month);
    query.push(" AND ((scope = 'key' AND scope_id IN (");
    push_list(query, keys());
    query.push(")) OR (scope = 'project' AND scope_id IN (SELECT tenant_id || '/' || project_id");
    query.push(projects);
    push_list(query, keys());
    query.push(
        ")))) UNION ALL SELECT 'window', scope, scope_id, NULL, NULL, requests, tokens, NULL, \
         NULL FROM rate_windows WHERE window_start_ms = ",
    );
    query.push_bind(inputs.window_start_ms);
    query.push(" AND ((scope = 'key' AND scope_id IN (");
    push_list(query, keys());
    query.push(")) OR (scope = 'project' AND scope_id IN (SELECT tenant_id || '/' || project_id");
    query.push(projects);
    push_list(query, keys());
    query.push("))) OR (scope = 'model' AND scope_id IN (");
    push_list(query, inputs.models.iter().copied());
    query.push(")))");
}

/// Bind parameters of one [`NewReservation`] in SQLite's multi-row insert.
pub(crate) const RESERVATION_BINDS: usize = 17;
/// Bind parameters of one [`UsageRow`] in SQLite's multi-row insert.
pub(crate) const USAGE_BINDS: usize = 20;
/// Bind parameters of one [`DailyRow`] in SQLite's multi-row upsert.
pub(crate) const DAILY_BINDS: usize = 10;
/// SQLite's limit on bind parameters in one statement (`SQLITE_MAX_VARIABLE_NUMBER`).
pub(crate) const SQLITE_BINDS_MAX: usize = 32_766;

/// The batched writers' statements that differ between the stores. Every method runs inside the
/// caller's write transaction.
pub(crate) trait BatchSql: TxControl {
    /// Begins a write transaction (as [`TxControl::begin`]) and reads everything a reservation
    /// batch needs before it takes a lock, in one statement (SQLite: in the same query as the
    /// `BEGIN`): rows `(kind, a, b, c, d, n1, n2, n3, n4)` where `kind` names what the other
    /// fields hold — `key`: key id, tenant, project, -, revoked at; `reservation` (with one of
    /// the request ids, or one of the `(key's tenant, idempotency key)` pairs): request id,
    /// tenant, idempotency key, state; `usage` (a usage entry with one of the request ids):
    /// request id; `price` (in force at `now_ms`): model, currency, -, -, effective from,
    /// input, output, cached input; `budget` (of a key or a key's project): scope, scope id, -,
    /// -, limit; `rate` (of a key, a key's project or a model): scope, scope id, -, -, requests
    /// and tokens per minute. On SQLite also the rows `lock_rows` returns on PostgreSQL:
    /// `account` (of a key's tenant): tenant, currency, -, -, balance, reserved; `spend` (this
    /// month's budget row of a key or a key's project): scope, scope id, -, -, reserved, spent;
    /// `window` (the current window of a key, a key's project or a model): scope, scope id, -,
    /// -, requests, tokens.
    async fn begin_and_read_inputs(
        &mut self,
        inputs: &BatchInputs<'_>,
    ) -> Result<Vec<InputRow>, sqlx::Error>;
    /// Locks the rows a reservation batch may change and reads them, as `account`, `spend` and
    /// `window` rows of [`BatchSql::begin_and_read_inputs`]. PostgreSQL: in the global order —
    /// accounts by tenant (`FOR UPDATE`), then each budget row and each rate window in the
    /// caller's (sorted) order, created at zero where missing (one upsert per table, whose
    /// no-op update is what locks and returns an existing row), so two replicas never hold two
    /// rows in opposite orders. SQLite: nothing — the read took these rows already, and the
    /// transaction's `BEGIN IMMEDIATE` holds the database's one write lock.
    async fn lock_rows(&mut self, rows: &LockRows<'_>) -> Result<Vec<InputRow>, sqlx::Error>;
    /// Writes what a reservation batch took and commits, each change conditional on its row
    /// still allowing it: holds added to accounts (where the balance covers them), holds added
    /// to budget rows (within their limit), requests and tokens added to rate windows (within
    /// their limits), and the new reservations. A write that changed fewer rows than it was
    /// given fails its [`Guard`] before the commit (the caller rolls back).
    async fn write_reservations_and_commit(
        &mut self,
        writes: &ReservationWrites<'_>,
    ) -> Result<(), LedgerError>;
    /// Begins a write transaction (as [`TxControl::begin`]), moves the open ones of these
    /// reservations to `settled` (those in `settling`) or `voided` (the rest), at
    /// `resolved_at_ms`, and returns them (SQLite: in the same query as the `BEGIN`;
    /// PostgreSQL: the update takes their row locks, by request id).
    async fn begin_and_resolve_open(
        &mut self,
        request_ids: &[String],
        settling: &[String],
        resolved_at_ms: i64,
    ) -> Result<Vec<ReservationRow>, sqlx::Error>;
    /// The state, currency and usage cost of these reservations (no lock: a resolved
    /// reservation never changes).
    async fn read_states(&mut self, request_ids: &[String]) -> Result<Vec<StateRow>, sqlx::Error>;
    /// Inserts usage rows, skipping request ids that already have one; rows inserted.
    async fn insert_usage(&mut self, rows: &[UsageRow<'_>]) -> Result<u64, sqlx::Error>;
    /// Inserts money-free usage rows in the caller's order, skipping request ids that have a
    /// usage row or a reservation already (a reserved request's row is written when it is
    /// settled or voided) and all but the first row of an id given twice; returns the request
    /// ids inserted.
    async fn insert_free_usage(
        &mut self,
        rows: &[FreeUsageRow<'_>],
    ) -> Result<Vec<String>, sqlx::Error>;
    /// Adds each row's sums to its row of the daily rollup (created at zero where missing), in
    /// the caller's order — sorted by key, so two writers never lock two rollup rows in
    /// opposite orders. The keys must be distinct (one row per key and batch).
    async fn add_usage_daily(&mut self, rows: &[DailyRow<'_>]) -> Result<(), sqlx::Error>;
    /// A settle batch's writes, then the commit: its usage rows when `usage` is given (each
    /// must be new: [`Guard::Usage`]; `None` when the caller inserted them already), the daily
    /// rollup (as [`BatchSql::add_usage_daily`]), then each account (hold released, cost taken)
    /// and each budget row (hold released, cost spent), in the caller's order — the global lock
    /// order. The accounts (by tenant) and the budget rows (by scope, scope id and month) must
    /// be distinct, and each must exist ([`Guard::AccountSettles`], [`Guard::BudgetSettles`]).
    async fn settle_and_commit(
        &mut self,
        usage: Option<&[UsageRow<'_>]>,
        daily: &[DailyRow<'_>],
        accounts: &[AccountDelta<'_>],
        budgets: &[BudgetDelta<'_>],
    ) -> Result<(), LedgerError>;
}

/// Bind parameters of one [`BudgetDelta`] in SQLite's settle statement.
pub(crate) const BUDGET_DELTA_BINDS: usize = 5;

/// One account's change in a settle batch: `(tenant, hold released, cost billed)`.
pub(crate) type AccountDelta<'a> = (&'a str, i64, i64);
/// One budget row's change in a settle batch: `(scope, scope_id, month, hold released, cost
/// billed)`.
pub(crate) type BudgetDelta<'a> = (&'a str, &'a str, &'a str, i64, i64);

/// PostgreSQL: one account's release of a settle batch (see [`BatchSql::settle_and_commit`]).
const SETTLE_ACCOUNT_SQL: &str = "UPDATE accounts SET reserved_nanos = reserved_nanos - $2, \
     balance_nanos = balance_nanos - $3 WHERE tenant_id = $1";
/// PostgreSQL: one budget row's release of a settle batch.
const SETTLE_BUDGET_SQL: &str = "UPDATE budget_spend SET reserved_nanos = reserved_nanos - $4, \
     spent_nanos = spent_nanos + $5 WHERE scope = $1 AND scope_id = $2 AND month = $3";

fn push_list<'a>(query: &mut QueryBuilder<'a, Sqlite>, values: impl IntoIterator<Item = &'a str>) {
    let mut list = query.separated(", ");
    for value in values {
        list.push_bind(value);
    }
}

/// A column of `rows` as a vector, for one PostgreSQL array parameter.
fn column<'a, T, U>(rows: &'a [T], f: impl Fn(&'a T) -> U) -> Vec<U> {
    rows.iter().map(f).collect()
}

impl BatchSql for SqliteConnection {
    async fn begin_and_read_inputs(
        &mut self,
        inputs: &BatchInputs<'_>,
    ) -> Result<Vec<InputRow>, sqlx::Error> {
        let keys = || inputs.key_ids.iter().copied();
        let requests = || inputs.request_ids.iter().map(String::as_str);
        let mut query = QueryBuilder::<Sqlite>::new(SQLITE_BEGIN_WRITE);
        query.push(
            "; SELECT 'key', key_id, tenant_id, project_id, NULL, revoked_at_ms, NULL, NULL, \
             NULL FROM api_keys WHERE key_id IN (",
        );
        push_list(&mut query, keys());
        query.push(
            ") UNION ALL SELECT 'reservation', request_id, tenant_id, idempotency_key, state, \
             NULL, NULL, NULL, NULL FROM reservations WHERE request_id IN (",
        );
        push_list(&mut query, requests());
        query.push(")");
        push_idempotency_reads(&mut query, inputs);
        query.push(
            " UNION ALL SELECT 'usage', request_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL \
             FROM usage_entries WHERE request_id IN (",
        );
        push_list(&mut query, requests());
        query.push(
            ") UNION ALL SELECT 'price', p.model, p.currency, NULL, NULL, p.effective_from_ms, \
             p.input_per_mtok_nanos, p.output_per_mtok_nanos, p.cached_input_per_mtok_nanos \
             FROM prices p WHERE p.model IN (",
        );
        push_list(&mut query, inputs.models.iter().copied());
        query.push(
            ") AND p.effective_from_ms = (SELECT MAX(q.effective_from_ms) FROM prices q \
             WHERE q.model = p.model AND q.effective_from_ms <= ",
        );
        query.push_bind(inputs.now_ms);
        query.push(
            ") UNION ALL SELECT 'budget', scope, scope_id, NULL, NULL, limit_nanos, NULL, NULL, \
             NULL FROM budgets WHERE (scope = 'key' AND scope_id IN (",
        );
        push_list(&mut query, keys());
        query.push(
            ")) OR (scope = 'project' AND scope_id IN (SELECT tenant_id || '/' || project_id \
             FROM api_keys WHERE key_id IN (",
        );
        push_list(&mut query, keys());
        query.push(
            "))) UNION ALL SELECT 'rate', scope, scope_id, NULL, NULL, requests_per_minute, \
             tokens_per_minute, NULL, NULL FROM rate_limits WHERE (scope = 'key' AND scope_id IN (",
        );
        push_list(&mut query, keys());
        query.push(
            ")) OR (scope = 'project' AND scope_id IN (SELECT tenant_id || '/' || project_id \
             FROM api_keys WHERE key_id IN (",
        );
        push_list(&mut query, keys());
        query.push("))) OR (scope = 'model' AND scope_id IN (");
        push_list(&mut query, inputs.models.iter().copied());
        query.push("))");
        push_locked_rows(&mut query, inputs);
        query.build_query_as().fetch_all(&mut *self).await
    }

    async fn lock_rows(&mut self, _rows: &LockRows<'_>) -> Result<Vec<InputRow>, sqlx::Error> {
        Ok(Vec::new())
    }

    async fn write_reservations_and_commit(
        &mut self,
        writes: &ReservationWrites<'_>,
    ) -> Result<(), LedgerError> {
        // Every write of the batch and the commit in one query, so one trip to the
        // connection's thread: SQLite runs the statements in order and stops at the first
        // error, and a write guard after each write fails the query when the write changed
        // other than every row it was given (`write_tx`). The caller then rolls back.
        let mut query = QueryBuilder::<Sqlite>::new("");
        if !writes.accounts.is_empty() {
            push_account_holds(&mut query, &writes.accounts);
            query.push(guard_sql(Guard::AccountHolds, writes.accounts.len()));
        }
        push_guarded_counters(
            &mut query,
            Counters::Budgets {
                month: writes.month,
            },
            &writes.budgets,
            Guard::BudgetHolds,
        );
        push_guarded_counters(
            &mut query,
            Counters::Windows {
                window_start_ms: writes.window_start_ms,
            },
            &writes.windows,
            Guard::WindowAdds,
        );
        if !writes.reservations.is_empty() {
            push_insert_reservations(&mut query, &writes.reservations);
            query.push(guard_sql(Guard::Reservations, writes.reservations.len()));
        }
        query.push("COMMIT");
        query.build().execute(&mut *self).await.map_err(guarded)?;
        Ok(())
    }

    async fn begin_and_resolve_open(
        &mut self,
        request_ids: &[String],
        settling: &[String],
        resolved_at_ms: i64,
    ) -> Result<Vec<ReservationRow>, sqlx::Error> {
        let mut query = QueryBuilder::<Sqlite>::new(SQLITE_BEGIN_WRITE);
        query.push("; UPDATE reservations SET state = CASE WHEN request_id IN (");
        push_list(&mut query, settling.iter().map(String::as_str));
        query.push(") THEN 'settled' ELSE 'voided' END, resolved_at_ms = ");
        query.push_bind(resolved_at_ms);
        query.push(" WHERE state = 'open' AND request_id IN (");
        push_list(&mut query, request_ids.iter().map(String::as_str));
        query.push(concat!(") RETURNING ", resolved_columns!()));
        query.build_query_as().fetch_all(&mut *self).await
    }

    async fn read_states(&mut self, request_ids: &[String]) -> Result<Vec<StateRow>, sqlx::Error> {
        let mut query = QueryBuilder::<Sqlite>::new(
            "SELECT r.request_id, r.state, r.currency, u.cost_nanos FROM reservations r \
             LEFT JOIN usage_entries u ON u.request_id = r.request_id WHERE r.request_id IN (",
        );
        push_list(&mut query, request_ids.iter().map(String::as_str));
        query.push(")");
        query.build_query_as().fetch_all(&mut *self).await
    }

    async fn insert_usage(&mut self, rows: &[UsageRow<'_>]) -> Result<u64, sqlx::Error> {
        let mut query = QueryBuilder::<Sqlite>::new("");
        push_insert_usage(&mut query, rows);
        Ok(query.build().execute(&mut *self).await?.rows_affected())
    }

    async fn insert_free_usage(
        &mut self,
        rows: &[FreeUsageRow<'_>],
    ) -> Result<Vec<String>, sqlx::Error> {
        // `WHERE` before `ON CONFLICT`: SQLite needs one to tell the upsert from a join.
        let mut query = QueryBuilder::<Sqlite>::new(concat!(
            "INSERT INTO usage_entries (",
            free_usage_columns!(),
            ") SELECT column1, column2, column3, column4, column5, column6, column7, column8, \
             column9, column10, column11, column12, column13 FROM ("
        ));
        query.push_values(rows, |mut b, r| {
            push_entry_binds(&mut b, r);
            b.push_bind(r.cached_prompt_tokens_unknown);
        });
        query.push(
            ") WHERE NOT EXISTS (SELECT 1 FROM reservations r WHERE r.request_id = column1) \
             ON CONFLICT (request_id) DO NOTHING RETURNING request_id",
        );
        let ids: Vec<(String,)> = query.build_query_as().fetch_all(&mut *self).await?;
        Ok(ids.into_iter().map(|(id,)| id).collect())
    }

    async fn add_usage_daily(&mut self, rows: &[DailyRow<'_>]) -> Result<(), sqlx::Error> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut query = QueryBuilder::<Sqlite>::new("");
        push_usage_daily(&mut query, rows);
        query.build().execute(&mut *self).await?;
        Ok(())
    }

    async fn settle_and_commit(
        &mut self,
        usage: Option<&[UsageRow<'_>]>,
        daily: &[DailyRow<'_>],
        accounts: &[AccountDelta<'_>],
        budgets: &[BudgetDelta<'_>],
    ) -> Result<(), LedgerError> {
        // One query, one trip to the connection's thread, one statement per table, each write
        // followed by its guard (see `write_reservations_and_commit`).
        let mut query = QueryBuilder::<Sqlite>::new("");
        if let Some(rows) = usage.filter(|rows| !rows.is_empty()) {
            push_insert_usage(&mut query, rows);
            query.push(guard_sql(Guard::Usage, rows.len()));
        }
        if !daily.is_empty() {
            push_usage_daily(&mut query, daily);
            query.push("; ");
        }
        if !accounts.is_empty() {
            query.push(
                "UPDATE accounts SET reserved_nanos = reserved_nanos - v.column2, \
                 balance_nanos = balance_nanos - v.column3 FROM (",
            );
            query.push_values(accounts, |mut row, (tenant, hold, cost)| {
                row.push_bind(*tenant).push_bind(*hold).push_bind(*cost);
            });
            query.push(") AS v WHERE accounts.tenant_id = v.column1");
            query.push(guard_sql(Guard::AccountSettles, accounts.len()));
        }
        if !budgets.is_empty() {
            query.push(
                "UPDATE budget_spend SET reserved_nanos = reserved_nanos - v.column4, \
                 spent_nanos = spent_nanos + v.column5 FROM (",
            );
            query.push_values(budgets, |mut row, (scope, scope_id, month, hold, cost)| {
                row.push_bind(*scope)
                    .push_bind(*scope_id)
                    .push_bind(*month)
                    .push_bind(*hold)
                    .push_bind(*cost);
            });
            query.push(
                ") AS v WHERE budget_spend.scope = v.column1 \
                 AND budget_spend.scope_id = v.column2 AND budget_spend.month = v.column3",
            );
            query.push(guard_sql(Guard::BudgetSettles, budgets.len()));
        }
        query.push("COMMIT");
        query.build().execute(&mut *self).await.map_err(guarded)?;
        Ok(())
    }
}

/// The usage rows' insert (at least one), skipping request ids that already have one.
fn push_insert_usage<'a>(query: &mut QueryBuilder<'a, Sqlite>, rows: &'a [UsageRow<'a>]) {
    query.push(concat!(
        "INSERT INTO usage_entries (",
        usage_columns!(),
        ") "
    ));
    query.push_values(rows, |mut b, r| {
        push_entry_binds(&mut b, &r.entry);
        b.push_bind(r.project)
            .push_bind(r.month)
            .push_bind(r.currency)
            .push_bind(r.cost_nanos)
            .push_bind(r.price_effective_from_ms)
            .push_bind(r.input_per_mtok_nanos)
            .push_bind(r.output_per_mtok_nanos)
            .push_bind(r.cached_input_per_mtok_nanos)
            .push_bind(r.entry.cached_prompt_tokens_unknown);
    });
    query.push(" ON CONFLICT (request_id) DO NOTHING");
}

/// PostgreSQL: the first twelve columns of both usage inserts, `request_id` to `created_at_ms`,
/// each bound as one array.
fn bind_entry_columns<'q>(
    query: Query<'q, Postgres, PgArguments>,
    entries: &[&'q FreeUsageRow<'q>],
) -> Query<'q, Postgres, PgArguments> {
    query
        .bind(column(entries, |e| e.request_id.as_str()))
        .bind(column(entries, |e| e.tenant))
        .bind(column(entries, |e| e.key_id))
        .bind(column(entries, |e| e.model))
        .bind(column(entries, |e| e.endpoint))
        .bind(column(entries, |e| e.prompt_tokens))
        .bind(column(entries, |e| e.completion_tokens))
        .bind(column(entries, |e| e.cached_prompt_tokens))
        .bind(column(entries, |e| e.status))
        .bind(column(entries, |e| e.error_code))
        .bind(column(entries, |e| e.latency_ms))
        .bind(column(entries, |e| e.created_at_ms))
}

/// The first twelve columns of both usage inserts, `request_id` to `created_at_ms`.
fn push_entry_binds<'args>(
    b: &mut Separated<'_, 'args, Sqlite, &'static str>,
    e: &'args FreeUsageRow<'args>,
) {
    b.push_bind(e.request_id.as_str())
        .push_bind(e.tenant)
        .push_bind(e.key_id)
        .push_bind(e.model)
        .push_bind(e.endpoint)
        .push_bind(e.prompt_tokens)
        .push_bind(e.completion_tokens)
        .push_bind(e.cached_prompt_tokens)
        .push_bind(e.status)
        .push_bind(e.error_code)
        .push_bind(e.latency_ms)
        .push_bind(e.created_at_ms);
}

/// PostgreSQL: a reservation batch's four writes in one statement (see
/// [`BatchSql::write_reservations_and_commit`]); every row it changes is locked already, so the
/// order in which the four run does not matter.
const PG_WRITE_RESERVATIONS: &str = "WITH a AS (UPDATE accounts x SET reserved_nanos = x.reserved_nanos + d.hold \
     FROM UNNEST($1::text[], $2::bigint[]) AS d(tenant_id, hold) \
     WHERE x.tenant_id = d.tenant_id AND x.balance_nanos - x.reserved_nanos >= d.hold \
     RETURNING 1), \
     b AS (UPDATE budget_spend x SET reserved_nanos = x.reserved_nanos + d.hold \
     FROM UNNEST($3::text[], $4::text[], $5::bigint[], $6::bigint[]) \
     AS d(scope, scope_id, hold, bound) \
     WHERE x.scope = d.scope AND x.scope_id = d.scope_id AND x.month = $7 \
     AND x.reserved_nanos + x.spent_nanos + d.hold <= d.bound RETURNING 1), \
     w AS (UPDATE rate_windows x SET requests = x.requests + d.requests, \
     tokens = x.tokens + d.tokens \
     FROM UNNEST($8::text[], $9::text[], $10::bigint[], $11::bigint[], $12::bigint[], \
     $13::bigint[]) AS d(scope, scope_id, requests, tokens, rpm, tpm) \
     WHERE x.scope = d.scope AND x.scope_id = d.scope_id AND x.window_start_ms = $14 \
     AND x.requests + d.requests <= d.rpm AND x.tokens + d.tokens <= d.tpm RETURNING 1), \
     r AS (INSERT INTO reservations (request_id, tenant_id, project_id, key_id, model, \
     replica_id, idempotency_key, month, currency, price_effective_from_ms, \
     input_per_mtok_nanos, output_per_mtok_nanos, cached_input_per_mtok_nanos, \
     prompt_tokens_max, completion_tokens_max, hold_nanos, state, created_at_ms) \
     SELECT n.request_id, n.tenant_id, n.project_id, n.key_id, n.model, n.replica_id, \
     n.idempotency_key, n.month, n.currency, n.price_effective_from_ms, n.input, \
     n.output, n.cached_input, n.prompt_max, n.completion_max, n.hold, 'open', \
     n.created_at_ms FROM UNNEST($15::text[], $16::text[], $17::text[], $18::text[], \
     $19::text[], $20::text[], $21::text[], $22::text[], $23::text[], $24::bigint[], \
     $25::bigint[], $26::bigint[], $27::bigint[], $28::bigint[], $29::bigint[], \
     $30::bigint[], $31::bigint[]) AS n(request_id, tenant_id, project_id, key_id, \
     model, replica_id, idempotency_key, month, currency, price_effective_from_ms, \
     input, output, cached_input, prompt_max, completion_max, hold, created_at_ms) \
     RETURNING 1) \
     SELECT (SELECT count(*) FROM a), (SELECT count(*) FROM b), \
     (SELECT count(*) FROM w), (SELECT count(*) FROM r)";

impl BatchSql for PgConnection {
    async fn lock_rows(&mut self, rows: &LockRows<'_>) -> Result<Vec<InputRow>, sqlx::Error> {
        let row = |kind: &str, a: String, b: String, n1: i64, n2: i64| -> InputRow {
            (
                kind.to_owned(),
                Some(a),
                Some(b),
                None,
                None,
                Some(n1),
                Some(n2),
                None,
                None,
            )
        };
        let mut locked = Vec::new();
        for (tenant, currency, balance, reserved) in pg_lock_accounts(self, rows.tenants).await? {
            locked.push(row("account", tenant, currency, balance, reserved));
        }
        if !rows.budget_rows.is_empty() {
            for (scope, scope_id, reserved, spent) in
                pg_lock_budget_rows(self, rows.budget_rows, rows.month).await?
            {
                locked.push(row("spend", scope, scope_id, reserved, spent));
            }
        }
        if !rows.window_rows.is_empty() {
            for (scope, scope_id, requests, tokens) in
                pg_lock_windows(self, rows.window_rows, rows.window_start_ms).await?
            {
                locked.push(row("window", scope, scope_id, requests, tokens));
            }
        }
        Ok(locked)
    }

    async fn begin_and_read_inputs(
        &mut self,
        inputs: &BatchInputs<'_>,
    ) -> Result<Vec<InputRow>, sqlx::Error> {
        self.begin().await?;
        sqlx::query_as(
            "SELECT 'key', key_id, tenant_id, project_id, NULL::text, revoked_at_ms, \
             NULL::bigint, NULL::bigint, NULL::bigint FROM api_keys WHERE key_id = ANY($2) \
             UNION ALL SELECT 'reservation', request_id, tenant_id, idempotency_key, state, NULL, \
             NULL, NULL, NULL FROM reservations WHERE request_id = ANY($1) \
             UNION ALL SELECT 'reservation', r.request_id, r.tenant_id, r.idempotency_key, \
             r.state, NULL, NULL, NULL, NULL FROM reservations r \
             JOIN api_keys k ON k.tenant_id = r.tenant_id \
             JOIN UNNEST($4::text[], $5::text[]) AS i(key_id, key) \
             ON i.key_id = k.key_id AND r.idempotency_key = i.key \
             UNION ALL SELECT 'usage', request_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL \
             FROM usage_entries WHERE request_id = ANY($1) \
             UNION ALL SELECT 'price', p.model, p.currency, NULL, NULL, p.effective_from_ms, \
             p.input_per_mtok_nanos, p.output_per_mtok_nanos, p.cached_input_per_mtok_nanos \
             FROM prices p WHERE p.model = ANY($3) AND p.effective_from_ms = \
             (SELECT MAX(q.effective_from_ms) FROM prices q \
             WHERE q.model = p.model AND q.effective_from_ms <= $6) \
             UNION ALL SELECT 'budget', scope, scope_id, NULL, NULL, limit_nanos, NULL, NULL, \
             NULL FROM budgets WHERE (scope = 'key' AND scope_id = ANY($2)) \
             OR (scope = 'project' AND scope_id = ANY(ARRAY(SELECT tenant_id || '/' || project_id \
             FROM api_keys WHERE key_id = ANY($2)))) \
             UNION ALL SELECT 'rate', scope, scope_id, NULL, NULL, requests_per_minute, \
             tokens_per_minute, NULL, NULL FROM rate_limits \
             WHERE (scope = 'key' AND scope_id = ANY($2)) \
             OR (scope = 'project' AND scope_id = ANY(ARRAY(SELECT tenant_id || '/' || project_id \
             FROM api_keys WHERE key_id = ANY($2)))) \
             OR (scope = 'model' AND scope_id = ANY($3))",
        )
        .bind(inputs.request_ids)
        .bind(inputs.key_ids)
        .bind(inputs.models)
        .bind(column(inputs.idempotency, |(k, _)| *k))
        .bind(column(inputs.idempotency, |(_, i)| *i))
        .bind(inputs.now_ms)
        .fetch_all(&mut *self)
        .await
    }

    async fn write_reservations_and_commit(
        &mut self,
        writes: &ReservationWrites<'_>,
    ) -> Result<(), LedgerError> {
        let rows = &writes.reservations;
        let (accounts, budgets, windows, reservations): (i64, i64, i64, i64) =
            sqlx::query_as(PG_WRITE_RESERVATIONS)
                .bind(column(&writes.accounts, |(t, _)| *t))
                .bind(column(&writes.accounts, |(_, h)| *h))
                .bind(column(&writes.budgets, |r| r.scope))
                .bind(column(&writes.budgets, |r| r.scope_id))
                .bind(column(&writes.budgets, |r| r.first))
                .bind(column(&writes.budgets, |r| r.first_bound))
                .bind(writes.month)
                .bind(column(&writes.windows, |r| r.scope))
                .bind(column(&writes.windows, |r| r.scope_id))
                .bind(column(&writes.windows, |r| r.first))
                .bind(column(&writes.windows, |r| r.second))
                .bind(column(&writes.windows, |r| r.first_bound))
                .bind(column(&writes.windows, |r| r.second_bound))
                .bind(writes.window_start_ms)
                .bind(column(rows, |r| r.request_id.as_str()))
                .bind(column(rows, |r| r.tenant))
                .bind(column(rows, |r| r.project))
                .bind(column(rows, |r| r.key_id))
                .bind(column(rows, |r| r.model))
                .bind(column(rows, |r| r.replica_id))
                .bind(column(rows, |r| r.idempotency_key))
                .bind(column(rows, |r| r.month))
                .bind(column(rows, |r| r.currency))
                .bind(column(rows, |r| r.price_effective_from_ms))
                .bind(column(rows, |r| r.input_per_mtok_nanos))
                .bind(column(rows, |r| r.output_per_mtok_nanos))
                .bind(column(rows, |r| r.cached_input_per_mtok_nanos))
                .bind(column(rows, |r| r.prompt_tokens_max))
                .bind(column(rows, |r| r.completion_tokens_max))
                .bind(column(rows, |r| r.hold_nanos))
                .bind(column(rows, |r| r.created_at_ms))
                .fetch_one(&mut *self)
                .await?;
        let count = |n: i64| u64::try_from(n).unwrap_or(0);
        Guard::AccountHolds.check(count(accounts), writes.accounts.len())?;
        Guard::BudgetHolds.check(count(budgets), writes.budgets.len())?;
        Guard::WindowAdds.check(count(windows), writes.windows.len())?;
        Guard::Reservations.check(count(reservations), rows.len())?;
        self.commit().await?;
        Ok(())
    }

    async fn begin_and_resolve_open(
        &mut self,
        request_ids: &[String],
        settling: &[String],
        resolved_at_ms: i64,
    ) -> Result<Vec<ReservationRow>, sqlx::Error> {
        self.begin().await?;
        sqlx::query_as(concat!(
            "UPDATE reservations SET \
             state = CASE WHEN request_id = ANY($2) THEN 'settled' ELSE 'voided' END, \
             resolved_at_ms = $3 WHERE state = 'open' AND request_id = ANY($1) RETURNING ",
            resolved_columns!()
        ))
        .bind(request_ids)
        .bind(settling)
        .bind(resolved_at_ms)
        .fetch_all(&mut *self)
        .await
    }

    async fn read_states(&mut self, request_ids: &[String]) -> Result<Vec<StateRow>, sqlx::Error> {
        sqlx::query_as(
            "SELECT r.request_id, r.state, r.currency, u.cost_nanos FROM reservations r \
             LEFT JOIN usage_entries u ON u.request_id = r.request_id \
             WHERE r.request_id = ANY($1)",
        )
        .bind(request_ids)
        .fetch_all(&mut *self)
        .await
    }

    async fn insert_usage(&mut self, rows: &[UsageRow<'_>]) -> Result<u64, sqlx::Error> {
        let query = sqlx::query(concat!(
            "INSERT INTO usage_entries (",
            usage_columns!(),
            ") SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
             $6::bigint[], $7::bigint[], $8::bigint[], $9::text[], $10::text[], $11::bigint[], \
             $12::bigint[], $13::text[], $14::text[], $15::text[], $16::bigint[], \
             $17::bigint[], $18::bigint[], $19::bigint[], $20::bigint[], $21::bigint[]) \
             ON CONFLICT (request_id) DO NOTHING"
        ));
        let entries: Vec<&FreeUsageRow<'_>> = rows.iter().map(|r| &r.entry).collect();
        let done = bind_entry_columns(query, &entries)
            .bind(column(rows, |r| r.project))
            .bind(column(rows, |r| r.month))
            .bind(column(rows, |r| r.currency))
            .bind(column(rows, |r| r.cost_nanos))
            .bind(column(rows, |r| r.price_effective_from_ms))
            .bind(column(rows, |r| r.input_per_mtok_nanos))
            .bind(column(rows, |r| r.output_per_mtok_nanos))
            .bind(column(rows, |r| r.cached_input_per_mtok_nanos))
            .bind(column(rows, |r| r.entry.cached_prompt_tokens_unknown))
            .execute(&mut *self)
            .await?;
        Ok(done.rows_affected())
    }

    async fn insert_free_usage(
        &mut self,
        rows: &[FreeUsageRow<'_>],
    ) -> Result<Vec<String>, sqlx::Error> {
        let query = sqlx::query(concat!(
            "INSERT INTO usage_entries (",
            free_usage_columns!(),
            ") SELECT n.request_id, n.tenant_id, n.key_id, n.model, n.endpoint, n.prompt_tokens, \
             n.completion_tokens, n.cached_prompt_tokens, n.status, n.error_code, n.latency_ms, \
             n.created_at_ms, n.cached_unknown \
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
             $6::bigint[], $7::bigint[], $8::bigint[], $9::text[], $10::text[], $11::bigint[], \
             $12::bigint[], $13::bigint[]) WITH ORDINALITY AS n(request_id, tenant_id, key_id, \
             model, endpoint, prompt_tokens, completion_tokens, cached_prompt_tokens, status, \
             error_code, latency_ms, created_at_ms, cached_unknown, i) \
             WHERE NOT EXISTS (SELECT 1 FROM reservations r WHERE r.request_id = n.request_id) \
             ORDER BY n.i ON CONFLICT (request_id) DO NOTHING RETURNING request_id"
        ));
        let entries: Vec<&FreeUsageRow<'_>> = rows.iter().collect();
        let inserted = bind_entry_columns(query, &entries)
            .bind(column(rows, |r| r.cached_prompt_tokens_unknown))
            .fetch_all(&mut *self)
            .await?;
        let ids: Vec<String> = inserted
            .iter()
            .map(|row| row.try_get::<String, _>(0))
            .collect::<Result<_, _>>()?;
        Ok(ids)
    }

    async fn add_usage_daily(&mut self, rows: &[DailyRow<'_>]) -> Result<(), sqlx::Error> {
        if rows.is_empty() {
            return Ok(());
        }
        sqlx::query(concat!(
            "INSERT INTO usage_daily (",
            daily_columns!(),
            ") SELECT d.tenant_id, d.project_id, d.key_id, d.model, d.day, d.requests, \
             d.prompt_tokens, d.cached_prompt_tokens, d.cached_unknown_requests, \
             d.completion_tokens, d.cost_nanos \
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], \
             $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[], \
             $11::bigint[]) \
             WITH ORDINALITY AS d(tenant_id, project_id, key_id, model, day, requests, \
             prompt_tokens, cached_prompt_tokens, cached_unknown_requests, completion_tokens, \
             cost_nanos, n) \
             ORDER BY d.n",
            daily_upsert!()
        ))
        .bind(column(rows, |r| r.tenant))
        .bind(column(rows, |r| r.project))
        .bind(column(rows, |r| r.key_id))
        .bind(column(rows, |r| r.model))
        .bind(column(rows, |r| r.day))
        .bind(column(rows, |r| r.requests))
        .bind(column(rows, |r| r.prompt_tokens))
        .bind(column(rows, |r| r.cached_prompt_tokens))
        .bind(column(rows, |r| r.cached_unknown_requests))
        .bind(column(rows, |r| r.completion_tokens))
        .bind(column(rows, |r| r.cost_nanos))
        .execute(&mut *self)
        .await?;
        Ok(())
    }

    async fn settle_and_commit(
        &mut self,
        usage: Option<&[UsageRow<'_>]>,
        daily: &[DailyRow<'_>],
        accounts: &[AccountDelta<'_>],
        budgets: &[BudgetDelta<'_>],
    ) -> Result<(), LedgerError> {
        if let Some(rows) = usage.filter(|rows| !rows.is_empty()) {
            Guard::Usage.check(self.insert_usage(rows).await?, rows.len())?;
        }
        // The rollup before the account rows are locked; then the rows one by one, in the given
        // order (an `UPDATE … FROM UNNEST` would lock them in an order of its own).
        self.add_usage_daily(daily).await?;
        let mut changed = (0_u64, 0_u64);
        for (tenant, hold, cost) in accounts {
            let done = sqlx::query(SETTLE_ACCOUNT_SQL)
                .bind(*tenant)
                .bind(*hold)
                .bind(*cost)
                .execute(&mut *self)
                .await?;
            changed.0 = changed.0.saturating_add(done.rows_affected());
        }
        for (scope, scope_id, month, hold, cost) in budgets {
            let done = sqlx::query(SETTLE_BUDGET_SQL)
                .bind(*scope)
                .bind(*scope_id)
                .bind(*month)
                .bind(*hold)
                .bind(*cost)
                .execute(&mut *self)
                .await?;
            changed.1 = changed.1.saturating_add(done.rows_affected());
        }
        Guard::AccountSettles.check(changed.0, accounts.len())?;
        Guard::BudgetSettles.check(changed.1, budgets.len())?;
        self.commit().await?;
        Ok(())
    }
}

/// The daily rollup's upsert of `rows` (at least one).
fn push_usage_daily<'a>(query: &mut QueryBuilder<'a, Sqlite>, rows: &'a [DailyRow<'a>]) {
    query.push(concat!("INSERT INTO usage_daily (", daily_columns!(), ") "));
    query.push_values(rows, |mut b, r| {
        b.push_bind(r.tenant)
            .push_bind(r.project)
            .push_bind(r.key_id)
            .push_bind(r.model)
            .push_bind(r.day)
            .push_bind(r.requests)
            .push_bind(r.prompt_tokens)
            .push_bind(r.cached_prompt_tokens)
            .push_bind(r.cached_unknown_requests)
            .push_bind(r.completion_tokens)
            .push_bind(r.cost_nanos);
    });
    query.push(daily_upsert!());
}

/// Adds each tenant's hold to its account, where the balance covers it.
fn push_account_holds<'a>(query: &mut QueryBuilder<'a, Sqlite>, rows: &'a [(&'a str, i64)]) {
    query.push("UPDATE accounts SET reserved_nanos = reserved_nanos + v.column2 FROM (");
    query.push_values(rows, |mut row, (tenant, hold)| {
        row.push_bind(*tenant).push_bind(*hold);
    });
    query.push(
        ") AS v WHERE accounts.tenant_id = v.column1 \
         AND accounts.balance_nanos - accounts.reserved_nanos >= v.column2",
    );
}

/// Adds `(first, second)` to the existing rows of a counter table (budget rows: reserved, —;
/// rate windows: requests, tokens) within their bounds, and inserts the new ones (within them
/// too), each statement followed by `guard` for its own rows: none, one or two statements.
fn push_guarded_counters<'a>(
    query: &mut QueryBuilder<'a, Sqlite>,
    table: Counters<'a>,
    rows: &'a [CounterAdd<'a>],
    guard: Guard,
) {
    let (existing, new): (Vec<&CounterAdd<'a>>, Vec<&CounterAdd<'a>>) =
        rows.iter().partition(|r| r.exists);
    if !existing.is_empty() {
        push_update_counters(query, table, &existing);
        query.push(guard_sql(guard, existing.len()));
    }
    if !new.is_empty() {
        push_insert_counters(query, table, &new);
        query.push(guard_sql(guard, new.len()));
    }
}

/// `(scope, scope_id, first, second, first_bound, second_bound)` as `VALUES` rows, so that the
/// statement reads them as `column1` … `column6`.
fn push_counter_values<'a>(query: &mut QueryBuilder<'a, Sqlite>, rows: &[&CounterAdd<'a>]) {
    query.push_values(rows, |mut row, r| {
        row.push_bind(r.scope)
            .push_bind(r.scope_id)
            .push_bind(r.first)
            .push_bind(r.second)
            .push_bind(r.first_bound)
            .push_bind(r.second_bound);
    });
}

fn push_update_counters<'a>(
    query: &mut QueryBuilder<'a, Sqlite>,
    table: Counters<'a>,
    rows: &[&CounterAdd<'a>],
) {
    query.push(match table {
        Counters::Budgets { .. } => {
            "UPDATE budget_spend SET reserved_nanos = reserved_nanos + v.column3 FROM ("
        }
        Counters::Windows { .. } => {
            "UPDATE rate_windows SET requests = requests + v.column3, \
             tokens = tokens + v.column4 FROM ("
        }
    });
    push_counter_values(query, rows);
    match table {
        Counters::Budgets { month } => {
            query.push(
                ") AS v WHERE budget_spend.scope = v.column1 \
                 AND budget_spend.scope_id = v.column2 AND budget_spend.month = ",
            );
            query.push_bind(month);
            query.push(
                " AND budget_spend.reserved_nanos + budget_spend.spent_nanos + v.column3 \
                 <= v.column5",
            );
        }
        Counters::Windows { window_start_ms } => {
            query.push(
                ") AS v WHERE rate_windows.scope = v.column1 \
                 AND rate_windows.scope_id = v.column2 AND rate_windows.window_start_ms = ",
            );
            query.push_bind(window_start_ms);
            query.push(
                " AND rate_windows.requests + v.column3 <= v.column5 \
                 AND rate_windows.tokens + v.column4 <= v.column6",
            );
        }
    }
}

fn push_insert_counters<'a>(
    query: &mut QueryBuilder<'a, Sqlite>,
    table: Counters<'a>,
    rows: &[&CounterAdd<'a>],
) {
    query.push(match table {
        Counters::Budgets { .. } => {
            "INSERT INTO budget_spend (scope, scope_id, month, reserved_nanos, spent_nanos) \
             SELECT column1, column2, "
        }
        Counters::Windows { .. } => {
            "INSERT INTO rate_windows (scope, scope_id, window_start_ms, requests, tokens) \
             SELECT column1, column2, "
        }
    });
    match table {
        Counters::Budgets { month } => query.push_bind(month),
        Counters::Windows { window_start_ms } => query.push_bind(window_start_ms),
    };
    query.push(match table {
        Counters::Budgets { .. } => ", column3, 0 FROM (",
        Counters::Windows { .. } => ", column3, column4 FROM (",
    });
    push_counter_values(query, rows);
    query.push(") WHERE column3 <= column5 AND column4 <= column6");
}

/// A counter table and the period its rows belong to.
#[derive(Debug, Clone, Copy)]
enum Counters<'a> {
    /// `budget_spend` of this month.
    Budgets { month: &'a str },
    /// `rate_windows` starting at this instant.
    Windows { window_start_ms: i64 },
}

fn push_insert_reservations<'a>(
    query: &mut QueryBuilder<'a, Sqlite>,
    rows: &'a [NewReservation<'a>],
) {
    query.push(
        "INSERT INTO reservations (request_id, tenant_id, project_id, key_id, model, \
         replica_id, idempotency_key, month, currency, price_effective_from_ms, \
         input_per_mtok_nanos, output_per_mtok_nanos, cached_input_per_mtok_nanos, \
         prompt_tokens_max, completion_tokens_max, hold_nanos, state, created_at_ms) ",
    );
    query.push_values(rows, |mut b, r| {
        b.push_bind(r.request_id.as_str())
            .push_bind(r.tenant)
            .push_bind(r.project)
            .push_bind(r.key_id)
            .push_bind(r.model)
            .push_bind(r.replica_id)
            .push_bind(r.idempotency_key)
            .push_bind(r.month)
            .push_bind(r.currency)
            .push_bind(r.price_effective_from_ms)
            .push_bind(r.input_per_mtok_nanos)
            .push_bind(r.output_per_mtok_nanos)
            .push_bind(r.cached_input_per_mtok_nanos)
            .push_bind(r.prompt_tokens_max)
            .push_bind(r.completion_tokens_max)
            .push_bind(r.hold_nanos)
            .push("'open'")
            .push_bind(r.created_at_ms);
    });
}

async fn pg_lock_accounts(
    conn: &mut PgConnection,
    tenants: &[&str],
) -> Result<Vec<AccountRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT tenant_id, currency, balance_nanos, reserved_nanos FROM accounts \
         WHERE tenant_id = ANY($1) ORDER BY tenant_id FOR UPDATE",
    )
    .bind(tenants)
    .fetch_all(&mut *conn)
    .await
}

async fn pg_lock_budget_rows(
    conn: &mut PgConnection,
    rows: &[(&str, &str)],
    month: &str,
) -> Result<Vec<CounterRow>, sqlx::Error> {
    // One upsert, rows in the caller's (sorted) order: each row is created or locked in
    // turn, so two replicas never hold two budget rows in opposite orders. The no-op update
    // is what locks an existing row and returns it.
    sqlx::query_as(
        "INSERT INTO budget_spend (scope, scope_id, month, reserved_nanos, spent_nanos) \
         SELECT k.scope, k.scope_id, $3, 0, 0 \
         FROM UNNEST($1::text[], $2::text[]) WITH ORDINALITY AS k(scope, scope_id, n) \
         ORDER BY k.n \
         ON CONFLICT (scope, scope_id, month) DO UPDATE \
         SET reserved_nanos = budget_spend.reserved_nanos \
         RETURNING scope, scope_id, reserved_nanos, spent_nanos",
    )
    .bind(column(rows, |(s, _)| *s))
    .bind(column(rows, |(_, i)| *i))
    .bind(month)
    .fetch_all(&mut *conn)
    .await
}

async fn pg_lock_windows(
    conn: &mut PgConnection,
    rows: &[(&str, &str)],
    window_start_ms: i64,
) -> Result<Vec<CounterRow>, sqlx::Error> {
    sqlx::query_as(
        "INSERT INTO rate_windows (scope, scope_id, window_start_ms, requests, tokens) \
         SELECT k.scope, k.scope_id, $3, 0, 0 \
         FROM UNNEST($1::text[], $2::text[]) WITH ORDINALITY AS k(scope, scope_id, n) \
         ORDER BY k.n \
         ON CONFLICT (scope, scope_id, window_start_ms) DO UPDATE \
         SET requests = rate_windows.requests \
         RETURNING scope, scope_id, requests, tokens",
    )
    .bind(column(rows, |(s, _)| *s))
    .bind(column(rows, |(_, i)| *i))
    .bind(window_start_ms)
    .fetch_all(&mut *conn)
    .await
}

#[cfg(test)]
mod tests {
    use sqlx::Connection as _;
    use tidepool_core::{Currency, Nanos, TenantId};

    use super::*;
    use crate::{AuditContext, Ledger};

    fn counter(scope_id: &str, exists: bool, first: i64, bound: i64) -> CounterAdd<'_> {
        CounterAdd {
            scope: "key",
            scope_id,
            exists,
            first,
            second: 0,
            first_bound: bound,
            second_bound: 0,
        }
    }

    fn reservation<'a>(request_id: &str, tenant: &'a str) -> NewReservation<'a> {
        NewReservation {
            request_id: request_id.to_owned(),
            tenant,
            project: "default",
            key_id: "k",
            model: "m",
            replica_id: "r",
            idempotency_key: None,
            month: "2026-12",
            currency: "USD",
            price_effective_from_ms: 0,
            input_per_mtok_nanos: 1,
            output_per_mtok_nanos: 1,
            cached_input_per_mtok_nanos: 1,
            prompt_tokens_max: 1,
            completion_tokens_max: 1,
            hold_nanos: 1,
            created_at_ms: 0,
        }
    }

    fn usage_row(request_id: &str) -> UsageRow<'_> {
        UsageRow {
            entry: FreeUsageRow {
                request_id: request_id.to_owned(),
                tenant: "rich",
                key_id: "k",
                model: Some("m"),
                endpoint: "chat",
                prompt_tokens: 1,
                completion_tokens: 1,
                cached_prompt_tokens: 0,
                cached_prompt_tokens_unknown: 0,
                status: "ok",
                error_code: None,
                latency_ms: 1,
                created_at_ms: 0,
            },
            project: "default",
            month: "2026-12",
            currency: "USD",
            cost_nanos: 3,
            price_effective_from_ms: 0,
            input_per_mtok_nanos: 1,
            output_per_mtok_nanos: 1,
            cached_input_per_mtok_nanos: 1,
        }
    }

    /// Two funded tenants in a fresh SQLite file, and a connection with the write guard (as
    /// the pool's connections have it) inside a write transaction.
    async fn funded() -> (tempfile::TempDir, String, SqliteConnection) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
        let ledger = Ledger::connect(&url).await.unwrap();
        for (tenant, credit) in [("rich", 1_000), ("poor", 10)] {
            let tenant = TenantId::new(tenant).unwrap();
            ledger
                .create_tenant(&tenant, Currency::USD, &AuditContext::SYSTEM)
                .await
                .unwrap();
            ledger
                .credit(&tenant, Nanos(credit), "test", &AuditContext::SYSTEM)
                .await
                .unwrap();
        }
        let mut conn = SqliteConnection::connect(&url).await.unwrap();
        crate::write_tx::install_write_guard(&mut conn)
            .await
            .unwrap();
        TxControl::begin(&mut conn).await.unwrap();
        (dir, url, conn)
    }

    /// What another connection sees: each account's reserved and balance, the budget rows'
    /// `(scope, scope id, reserved, spent)` and the number of reservations and usage rows.
    async fn committed(
        url: &str,
    ) -> (
        Vec<(String, i64, i64)>,
        Vec<(String, String, i64, i64)>,
        i64,
        i64,
    ) {
        let mut other = SqliteConnection::connect(url).await.unwrap();
        let accounts = sqlx::query_as(
            "SELECT tenant_id, reserved_nanos, balance_nanos FROM accounts ORDER BY tenant_id",
        )
        .fetch_all(&mut other)
        .await
        .unwrap();
        let spend = sqlx::query_as(
            "SELECT scope, scope_id, reserved_nanos, spent_nanos FROM budget_spend \
             ORDER BY scope, scope_id",
        )
        .fetch_all(&mut other)
        .await
        .unwrap();
        let (reservations,): (i64,) = sqlx::query_as("SELECT count(*) FROM reservations")
            .fetch_one(&mut other)
            .await
            .unwrap();
        let (usage,): (i64,) = sqlx::query_as("SELECT count(*) FROM usage_entries")
            .fetch_one(&mut other)
            .await
            .unwrap();
        (accounts, spend, reservations, usage)
    }

    fn writes<'a>(
        accounts: Vec<(&'a str, i64)>,
        budgets: Vec<CounterAdd<'a>>,
        windows: Vec<CounterAdd<'a>>,
        reservations: Vec<NewReservation<'a>>,
    ) -> ReservationWrites<'a> {
        ReservationWrites {
            accounts,
            budgets,
            month: "2026-12",
            windows,
            window_start_ms: 0,
            reservations,
        }
    }

    /// Asserts that `outcome` is `guard`'s invariant failure.
    fn failed_guard(outcome: Result<(), LedgerError>, guard: Guard, case: &str) {
        match outcome {
            Err(LedgerError::Invariant { what }) if what == guard.what() => {}
            other => panic!("{case}: {other:?}"),
        }
    }

    /// A hold of 100 on the rich tenant's account, these budget rows and rate windows, no
    /// reservation.
    fn rich_hold_with(
        budgets: Vec<CounterAdd<'static>>,
        windows: Vec<CounterAdd<'static>>,
    ) -> ReservationWrites<'static> {
        writes(vec![("rich", 100)], budgets, windows, vec![])
    }

    /// Writes whose every row fits commit in the same query: another connection sees them.
    #[tokio::test]
    async fn a_guarded_reservation_write_commits_in_its_own_query() {
        let (_dir, url, mut conn) = funded().await;
        let ids: Vec<String> = (0..2).map(|i| format!("req-{i}")).collect();
        let all = writes(
            vec![("poor", 10), ("rich", 100)],
            vec![counter("a", false, 5, 10), counter("b", false, 10, 10)],
            vec![counter("a", false, 1, 5)],
            ids.iter().map(|id| reservation(id, "rich")).collect(),
        );
        conn.write_reservations_and_commit(&all).await.unwrap();
        let (accounts, spend, reservations, _) = committed(&url).await;
        assert_eq!(
            accounts,
            vec![("poor".to_owned(), 10, 10), ("rich".to_owned(), 100, 1_000)]
        );
        assert_eq!(
            spend,
            vec![
                ("key".to_owned(), "a".to_owned(), 5, 0),
                ("key".to_owned(), "b".to_owned(), 10, 0)
            ]
        );
        assert_eq!(reservations, 2);
        // The transaction is over: a new one begins on the same connection.
        TxControl::begin(&mut conn).await.unwrap();
        conn.commit().await.unwrap();
    }

    /// A write that changes fewer rows than it was given fails its guard before the commit,
    /// naming its invariant, and after the rollback nothing of the batch is left — the writes
    /// before the failed guard included.
    #[tokio::test]
    async fn each_failed_guard_names_its_invariant_and_nothing_is_committed() {
        let cases: Vec<(&str, ReservationWrites<'static>, Guard)> = vec![
            (
                "a hold beyond the poor tenant's balance",
                writes(vec![("poor", 11), ("rich", 100)], vec![], vec![], vec![]),
                Guard::AccountHolds,
            ),
            (
                "a new budget row beyond its limit",
                rich_hold_with(
                    vec![counter("a", false, 5, 10), counter("c", false, 11, 10)],
                    vec![],
                ),
                Guard::BudgetHolds,
            ),
            (
                "an existing budget row that is not there",
                rich_hold_with(vec![counter("d", true, 1, 10)], vec![]),
                Guard::BudgetHolds,
            ),
            (
                "a new rate window beyond its limit",
                rich_hold_with(
                    vec![counter("a", false, 5, 10)],
                    vec![counter("w", false, 6, 5)],
                ),
                Guard::WindowAdds,
            ),
        ];
        for (case, batch, guard) in cases {
            let (_dir, url, mut conn) = funded().await;
            failed_guard(
                conn.write_reservations_and_commit(&batch).await,
                guard,
                case,
            );
            conn.rollback().await.unwrap();
            let (accounts, spend, reservations, _) = committed(&url).await;
            assert_eq!(
                accounts,
                vec![("poor".to_owned(), 0, 10), ("rich".to_owned(), 0, 1_000)],
                "{case}"
            );
            assert!(spend.is_empty(), "{case}: {spend:?}");
            assert_eq!(reservations, 0, "{case}");
        }
    }

    /// A statement that fails stops the query: nothing after it runs, `COMMIT` included, and
    /// the error reaches the caller as the database's.
    #[tokio::test]
    async fn a_failing_statement_ends_the_one_query_write_with_its_error() {
        let (_dir, url, mut conn) = funded().await;
        let twice = vec![reservation("same", "rich"), reservation("same", "rich")];
        let error = conn
            .write_reservations_and_commit(&writes(vec![("rich", 2)], vec![], vec![], twice))
            .await
            .unwrap_err();
        assert!(
            matches!(&error, LedgerError::Database(_)) && error.to_string().contains("UNIQUE"),
            "the duplicate request id's error: {error}"
        );
        conn.rollback().await.unwrap();
        let (accounts, _, reservations, _) = committed(&url).await;
        assert_eq!(accounts[1], ("rich".to_owned(), 0, 1_000));
        assert_eq!(reservations, 0);
    }

    /// Two budget rows with holds of 5 and 7, as a settle batch finds them.
    const SPEND_ROWS: &str = "INSERT INTO budget_spend (scope, scope_id, month, reserved_nanos, \
         spent_nanos) VALUES ('key', 'k', '2026-12', 5, 0), \
         ('project', 'rich/default', '2026-12', 7, 1)";

    /// The releases of [`SPEND_ROWS`]' two holds.
    fn settled_budgets() -> Vec<BudgetDelta<'static>> {
        vec![
            ("key", "k", "2026-12", 5, 4),
            ("project", "rich/default", "2026-12", 6, 2),
        ]
    }

    /// A settle batch's usage rows, account and budget-row releases commit in one query, each
    /// row with its own release.
    #[tokio::test]
    async fn a_guarded_settlement_releases_each_row_in_one_query() {
        let usage = [usage_row("u-1"), usage_row("u-2")];
        let (_dir, url, mut conn) = funded().await;
        sqlx::query(SPEND_ROWS).execute(&mut conn).await.unwrap();
        conn.settle_and_commit(Some(&usage), &[], &[("rich", 0, 3)], &settled_budgets())
            .await
            .unwrap();
        let (accounts, spend, _, usage_rows) = committed(&url).await;
        assert_eq!(accounts[1], ("rich".to_owned(), 0, 997));
        assert_eq!(
            spend,
            vec![
                ("key".to_owned(), "k".to_owned(), 0, 4),
                ("project".to_owned(), "rich/default".to_owned(), 1, 3)
            ]
        );
        assert_eq!(usage_rows, 2);
    }

    /// One case of a settle batch that must fail its guard: what it settles and the guard.
    type SettleCase = (
        &'static str,
        Vec<UsageRow<'static>>,
        Vec<AccountDelta<'static>>,
        Vec<BudgetDelta<'static>>,
        Guard,
    );

    /// A missing account or budget row, or a request id that has a usage row already, fails
    /// its guard and leaves nothing of the batch.
    #[tokio::test]
    async fn a_failed_settlement_guard_leaves_nothing() {
        let cases: Vec<SettleCase> = vec![
            (
                "a missing account",
                vec![usage_row("u-3")],
                vec![("missing", 1, 1), ("rich", 0, 3)],
                settled_budgets(),
                Guard::AccountSettles,
            ),
            (
                "a missing budget row",
                vec![usage_row("u-3")],
                vec![("rich", 0, 3)],
                vec![("key", "k", "2026-11", 1, 1)],
                Guard::BudgetSettles,
            ),
            (
                "a usage row that exists",
                vec![usage_row("u-3"), usage_row("u-1")],
                vec![("rich", 0, 3)],
                settled_budgets(),
                Guard::Usage,
            ),
        ];
        for (case, usage, accounts, budgets, guard) in cases {
            let (_dir, url, mut conn) = funded().await;
            sqlx::query(SPEND_ROWS).execute(&mut conn).await.unwrap();
            conn.insert_usage(&[usage_row("u-1")]).await.unwrap();
            conn.commit().await.unwrap();
            TxControl::begin(&mut conn).await.unwrap();
            let outcome = conn
                .settle_and_commit(Some(&usage), &[], &accounts, &budgets)
                .await;
            failed_guard(outcome, guard, case);
            conn.rollback().await.unwrap();
            let (accounts, spend, _, usage_rows) = committed(&url).await;
            assert_eq!(accounts[1], ("rich".to_owned(), 0, 1_000), "{case}");
            assert_eq!(
                spend,
                vec![
                    ("key".to_owned(), "k".to_owned(), 5, 0),
                    ("project".to_owned(), "rich/default".to_owned(), 7, 1)
                ],
                "{case}"
            );
            assert_eq!(usage_rows, 1, "{case}");
        }
    }
}
