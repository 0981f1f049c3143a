//! Admission, group-committed: reserve the most a request can cost against the tenant's
//! balance, the key's and the project's monthly budgets and the RPM/TPM windows, all or nothing.
//!
//! `reserve` queues its request on a bounded channel and awaits its own outcome. One reserve
//! writer task per `Ledger` handle drains up to [`RESERVE_BATCH_LEN_MAX`] requests and applies
//! them in **one transaction**: it reads everything the batch needs (keys, earlier reservations
//! and usage entries of its request ids and idempotency keys, prices, limits), locks the
//! accounts, budget rows and rate windows it touches (SQLite: `BEGIN IMMEDIATE`, the one writer;
//! PostgreSQL: row locks in one global order — accounts by tenant, then budget rows by `(scope,
//! scope_id, month)`, then rate windows, then the new reservation rows — which the settle writer
//! follows too, so the two never deadlock), and then decides the requests **one by one, in queue
//! order**, against an in-memory image of those locked rows that each granted request updates
//! before the next is decided. So a batch grants and refuses exactly what applying its requests
//! one at a time in the same order would, with the same errors, and a refused request takes
//! nothing. The writes that follow are one statement per table (PostgreSQL: whole columns bound
//! as arrays) with the database's conditions as a backstop, then one commit: replies go out
//! after it, so a granted reservation is committed (on PostgreSQL, flushed) before admission
//! returns. A batch that fails as a whole is retried, then applied request by request.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use tidepool_core::{Currency, KeyId, ModelId, Nanos, RequestId, TenantId, TokenCount};
use tokio::sync::{mpsc, oneshot};

use crate::accounts::ProjectId;
use crate::batch_sql::{
    BatchInputs, BatchSql, CounterAdd, InputRow, LockRows, NewReservation, RESERVATION_BINDS,
    ReservationWrites, SQLITE_BINDS_MAX,
};
use crate::kinds::{QuotaScope, RateKind, RateScopeKind, ReservationState};
use crate::month::Month;
use crate::price::{PriceVersion, hold_for};
use crate::store::{Store, WriteGate, apply_batch_else_one_by_one, on_store, retry_transient};
use crate::write_tx::{TxControl as _, WriteTx};
use crate::{Clock, Ledger, LedgerError};

/// Longest `Idempotency-Key` accepted, in bytes.
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 255;
/// Length of one RPM/TPM window.
pub const RATE_WINDOW_MS: i64 = 60_000;
/// Largest hold one request may place, in nano-units (10^15 = one million currency units).
pub const HOLD_NANOS_MAX: i64 = 1_000_000_000_000_000;
/// Reservations waiting for the reserve writer; a full queue makes `reserve` wait
/// (backpressure), never drops one.
pub const RESERVE_QUEUE_LEN_MAX: usize = 4096;
/// Reservations decided and committed in one transaction.
pub const RESERVE_BATCH_LEN_MAX: usize = 512;
const _: () = assert!(
    RESERVE_BATCH_LEN_MAX <= RESERVE_QUEUE_LEN_MAX,
    "a full batch fits the queue"
);
const _: () = assert!(
    RESERVE_BATCH_LEN_MAX * RESERVATION_BINDS < SQLITE_BINDS_MAX,
    "a batch's reservation insert fits SQLite's bind limit"
);
const _: () = assert!(
    RESERVE_BATCH_LEN_MAX * 3 < SQLITE_BINDS_MAX,
    "a batch's reads (request ids, idempotency pairs) fit SQLite's bind limit"
);

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
    /// Online (the default) or a batch line.
    pub class: ReserveClass,
}

/// How a request is admitted and priced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReserveClass {
    /// At the online price, counted against every RPM/TPM window.
    #[default]
    Online,
    /// A batch line: priced at `discount_ppm` parts per million of the online price
    /// ([`PriceVersion::discounted`]) and not counted against the RPM/TPM windows (those meter
    /// online traffic); balance and budgets hold it like any request.
    Batch { discount_ppm: u32 },
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

/// A request on its way to the reserve writer, with where its outcome goes.
#[derive(Debug)]
pub(crate) struct ReserveCommand {
    request: ReserveRequest,
    reply: oneshot::Sender<Result<Reservation, LedgerError>>,
}

/// Checks what can be checked without the database.
fn validate(request: &ReserveRequest) -> Result<(), LedgerError> {
    if let Some(key) = &request.idempotency_key
        && (key.is_empty() || key.len() > IDEMPOTENCY_KEY_BYTES_MAX)
    {
        return Err(LedgerError::OutOfRange {
            field: "idempotency key",
        });
    }
    Ok(())
}

impl Ledger {
    /// Reserves the most `request` can cost. Fails with [`LedgerError::InsufficientQuota`]
    /// (gateway: 429 `insufficient_quota`, do not retry) or [`LedgerError::RateLimited`] (429
    /// `rate_limit_exceeded` with `Retry-After`) before any compute, and takes nothing then.
    /// Group-committed with the reservations of concurrent callers; returns once committed.
    pub async fn reserve(&self, request: &ReserveRequest) -> Result<Reservation, LedgerError> {
        validate(request)?;
        let (reply, answer) = oneshot::channel();
        self.reserver
            .send(ReserveCommand {
                request: request.clone(),
                reply,
            })
            .await
            .map_err(|_| LedgerError::WriterFailed)?;
        answer.await.map_err(|_| LedgerError::WriterFailed)?
    }

    /// Applies `requests` as one batch, in this order, exactly as the reserve writer applies
    /// what it drains from its queue (one transaction, retried after transient conflicts), but
    /// without the writer's request-by-request fallback: a batch that fails as a whole is an
    /// `Err` here. For tests that compare a batch with one-by-one reservations. At most
    /// [`RESERVE_BATCH_LEN_MAX`] requests, each valid (an `Idempotency-Key` of 1 to
    /// [`IDEMPOTENCY_KEY_BYTES_MAX`] bytes).
    #[cfg(feature = "test-util")]
    pub async fn reserve_in_one_batch(
        &self,
        requests: &[ReserveRequest],
    ) -> Result<Vec<Result<Reservation, LedgerError>>, LedgerError> {
        assert!(
            requests.len() <= RESERVE_BATCH_LEN_MAX,
            "a batch respects its limit"
        );
        for request in requests {
            validate(request)?;
        }
        self.reserver_context().batch_retrying(requests).await
    }

    #[cfg(feature = "test-util")]
    fn reserver_context(&self) -> Reserver {
        Reserver {
            store: self.store.clone(),
            gate: self.gate.clone(),
            clock: self.clock.clone(),
            replica_id: self.replica_id.clone(),
        }
    }
}

/// What the reserve writer needs to apply a batch.
#[derive(Clone)]
pub(crate) struct Reserver {
    pub(crate) store: Store,
    pub(crate) gate: WriteGate,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) replica_id: Arc<str>,
}

/// The reserve writer task: one per `Ledger` handle.
pub(crate) struct ReserveWriter {
    pub(crate) reserver: Reserver,
    pub(crate) rx: mpsc::Receiver<ReserveCommand>,
}

impl ReserveWriter {
    /// Runs until every sender is gone, then returns after the last batch.
    pub(crate) async fn run(mut self) {
        let mut batch: Vec<ReserveCommand> = Vec::with_capacity(RESERVE_BATCH_LEN_MAX);
        while self.rx.recv_many(&mut batch, RESERVE_BATCH_LEN_MAX).await > 0 {
            assert!(
                batch.len() <= RESERVE_BATCH_LEN_MAX,
                "recv_many respects its limit"
            );
            let (requests, replies): (Vec<ReserveRequest>, Vec<_>) =
                batch.drain(..).map(|c| (c.request, c.reply)).unzip();
            let results = self.reserver.reserve_all(&requests).await;
            assert!(results.len() == replies.len(), "one result per request");
            for (reply, result) in replies.into_iter().zip(results) {
                // The caller may have given up waiting; a granted reservation stays open and
                // is resolved like any other (settled, voided, or by recovery).
                drop(reply.send(result));
            }
        }
        tracing::debug!("ledger reserve writer stopped: all handles dropped");
    }
}

/// The batch's clock: every reservation of a batch takes effect at the transaction's time.
struct BatchTime {
    now_ms: i64,
    month: Month,
    month_text: String,
    window_start_ms: i64,
    /// Until the current rate window resets.
    reset_ms: u64,
}

impl BatchTime {
    fn at(now_ms: i64) -> Self {
        let month = Month::of_ms(now_ms);
        let window_start_ms = now_ms.saturating_sub(now_ms.rem_euclid(RATE_WINDOW_MS));
        let reset_ms = u64::try_from(
            window_start_ms
                .saturating_add(RATE_WINDOW_MS)
                .saturating_sub(now_ms),
        )
        .unwrap_or(0);
        Self {
            now_ms,
            month_text: month.to_string(),
            month,
            window_start_ms,
            reset_ms,
        }
    }
}

/// `(effective_from_ms, currency, input, output, cached input)` of the price in force.
type PriceRow = (i64, String, i64, i64, i64);
/// `(scope, scope_id)`.
type ScopeKey = (String, String);

/// The rows a batch read, and the locked counters as its granted reservations have left them
/// so far: the in-memory image on which each request is decided in turn.
#[derive(Default)]
struct Book {
    /// key id → (tenant, project, revoked)
    keys: BTreeMap<String, (String, String, bool)>,
    /// request id → its reservation's state (earlier, or granted earlier in this batch)
    reservations: BTreeMap<String, String>,
    /// (tenant, idempotency key) → (request id, state)
    idempotency: BTreeMap<(String, String), (String, String)>,
    /// request ids that have a usage entry
    used: BTreeSet<String>,
    /// model → the price in force
    prices: BTreeMap<String, PriceRow>,
    budget_limits: BTreeMap<ScopeKey, i64>,
    /// `(scope, scope_id)` → (requests per minute, tokens per minute)
    rate_limits: BTreeMap<ScopeKey, (Option<i64>, Option<i64>)>,
    /// tenant → (currency, balance, reserved)
    accounts: BTreeMap<String, (String, i64, i64)>,
    /// `(scope, scope_id)` of this month → (reserved, spent)
    budgets: BTreeMap<ScopeKey, (i64, i64)>,
    /// `(scope, scope_id)` of this window → (requests, tokens)
    windows: BTreeMap<ScopeKey, (i64, i64)>,
    /// The budget rows and windows that existed before the batch (the others are inserted).
    budgets_existing: BTreeSet<ScopeKey>,
    windows_existing: BTreeSet<ScopeKey>,
    /// What the granted reservations add, per row, and the reservations themselves.
    account_holds: BTreeMap<String, i64>,
    budget_holds: BTreeMap<ScopeKey, i64>,
    window_counts: BTreeMap<ScopeKey, (i64, i64)>,
    granted: Vec<Granted>,
}

/// A reservation granted in this batch, with what its row stores besides.
struct Granted {
    reservation: Reservation,
    prompt_tokens_max: TokenCount,
    completion_tokens_max: TokenCount,
    idempotency_key: Option<String>,
}

fn corrupt(what: &'static str) -> LedgerError {
    LedgerError::Corrupt { what }
}

fn overflow() -> LedgerError {
    LedgerError::Core(tidepool_core::CoreError::MoneyOverflow { what: "batch sum" })
}

fn add_to(slot: &mut i64, amount: i64) -> Result<(), LedgerError> {
    *slot = slot.checked_add(amount).ok_or_else(overflow)?;
    Ok(())
}

impl Book {
    /// Takes one row of the batch's combined read (`BatchSql::read_inputs`).
    fn read(&mut self, row: InputRow) -> Result<(), LedgerError> {
        let (kind, a, b, c, d, n1, n2, n3, n4) = row;
        let text = |value: Option<String>| value.ok_or(corrupt("batch read"));
        let number = |value: Option<i64>| value.ok_or(corrupt("batch read"));
        match kind.as_str() {
            "key" => {
                self.keys
                    .insert(text(a)?, (text(b)?, text(c)?, n1.is_some()));
            }
            "reservation" => {
                let (request_id, tenant, state) = (text(a)?, text(b)?, text(d)?);
                if let Some(key) = c {
                    self.idempotency
                        .insert((tenant, key), (request_id.clone(), state.clone()));
                }
                self.reservations.insert(request_id, state);
            }
            "usage" => {
                self.used.insert(text(a)?);
            }
            "price" => {
                let price = (number(n1)?, text(b)?, number(n2)?, number(n3)?, number(n4)?);
                self.prices.insert(text(a)?, price);
            }
            "budget" => {
                self.budget_limits.insert((text(a)?, text(b)?), number(n1)?);
            }
            "rate" => {
                self.rate_limits.insert((text(a)?, text(b)?), (n1, n2));
            }
            "account" => {
                self.accounts
                    .insert(text(a)?, (text(b)?, number(n1)?, number(n2)?));
            }
            "spend" => {
                self.budgets
                    .insert((text(a)?, text(b)?), (number(n1)?, number(n2)?));
            }
            "window" => {
                self.windows
                    .insert((text(a)?, text(b)?), (number(n1)?, number(n2)?));
            }
            _ => return Err(corrupt("batch read kind")),
        }
        Ok(())
    }

    /// Decides one request against the book and, if granted, takes its hold and quota in the
    /// book. The checks and their order are those of one reservation on its own: key, request
    /// id, idempotency key, usage entry, price, hold, balance, key budget, project budget, then
    /// the rate windows of key, model and project.
    #[expect(clippy::too_many_lines, reason = "one admission, read top to bottom")]
    fn decide(
        &mut self,
        request: &ReserveRequest,
        at: &BatchTime,
    ) -> Result<Reservation, LedgerError> {
        let request_id = request.request_id.to_string();
        let tokens = u64::from(request.prompt_tokens)
            .saturating_add(u64::from(request.completion_tokens_max));
        let tokens =
            i64::try_from(tokens).map_err(|_| LedgerError::OutOfRange { field: "tokens" })?;

        // The key, as the transaction read it: a key revoked a moment ago cannot reserve.
        let Some((tenant_text, project_text, revoked)) = self.keys.get(&request.key_id.0).cloned()
        else {
            return Err(LedgerError::KeyNotFound {
                key_id: request.key_id.0.clone(),
            });
        };
        if revoked {
            return Err(LedgerError::KeyRevoked {
                key_id: request.key_id.clone(),
            });
        }
        let tenant = TenantId::new(tenant_text.clone()).map_err(|_| corrupt("tenant id"))?;
        let project = ProjectId::new(project_text).map_err(|_| corrupt("project id"))?;

        // Every request id at most once; every idempotency key at most once per tenant.
        if self.reservations.contains_key(&request_id) {
            return Err(LedgerError::DuplicateRequest {
                request_id: request.request_id,
            });
        }
        if let Some(key) = &request.idempotency_key
            && let Some((original, state)) =
                self.idempotency.get(&(tenant_text.clone(), key.clone()))
        {
            return Err(LedgerError::IdempotencyKeyReused {
                original_request_id: RequestId::parse(original)
                    .map_err(|_| corrupt("request id"))?,
                state: ReservationState::parse(state).ok_or(corrupt("reservation state"))?,
            });
        }
        if self.used.contains(&request_id) {
            return Err(LedgerError::DuplicateRequest {
                request_id: request.request_id,
            });
        }

        // The price in force at the batch's time, and the hold.
        let Some((effective_from_ms, currency_text, input, output, cached)) =
            self.prices.get(request.model.as_str()).cloned()
        else {
            return Err(LedgerError::PriceNotFound {
                model: request.model.clone(),
            });
        };
        let currency = Currency::parse(&currency_text).map_err(|_| corrupt("currency"))?;
        let price = PriceVersion {
            model: request.model.clone(),
            effective_from_ms,
            currency,
            input_per_mtok: Nanos(input),
            output_per_mtok: Nanos(output),
            cached_input_per_mtok: Nanos(cached),
        };
        let price = match request.class {
            ReserveClass::Online => price,
            ReserveClass::Batch { discount_ppm } => price.discounted(discount_ppm)?,
        };
        let hold = hold_for(request.prompt_tokens, request.completion_tokens_max, &price)?;
        if hold.0 > HOLD_NANOS_MAX {
            return Err(LedgerError::OutOfRange {
                field: "reservation hold",
            });
        }

        // 1. The tenant's balance.
        let Some((account_currency, balance, reserved)) = self.accounts.get(&tenant_text).cloned()
        else {
            return Err(LedgerError::TenantNotFound { tenant });
        };
        if account_currency != currency.as_str() {
            return Err(LedgerError::CurrencyMismatch {
                expected: Currency::parse(&account_currency).map_err(|_| corrupt("currency"))?,
                found: currency,
            });
        }
        let available = balance.saturating_sub(reserved);
        if available < hold.0 {
            return Err(LedgerError::InsufficientQuota {
                scope: QuotaScope::Balance,
                needed: hold,
                available: Nanos(available),
            });
        }

        // 2. Monthly budgets: the key's, then the project's.
        let project_scope = format!("{tenant}/{project}");
        let budget_rows = [
            (
                ("key".to_owned(), request.key_id.0.clone()),
                QuotaScope::KeyBudget,
            ),
            (
                ("project".to_owned(), project_scope.clone()),
                QuotaScope::ProjectBudget,
            ),
        ];
        for (row, quota_scope) in &budget_rows {
            let bound = self.budget_limits.get(row).copied().unwrap_or(i64::MAX);
            // A row the month has not used yet counts from zero.
            let (reserved, spent) = self.budgets.get(row).copied().unwrap_or((0, 0));
            let total = reserved
                .checked_add(spent)
                .and_then(|used| used.checked_add(hold.0));
            if total.is_none_or(|total| total > bound) {
                return Err(LedgerError::InsufficientQuota {
                    scope: *quota_scope,
                    needed: hold,
                    available: Nanos(bound.saturating_sub(reserved.saturating_add(spent)).max(0)),
                });
            }
        }

        // 3. RPM/TPM windows of key, model and project (the stores' sort order of the scopes).
        let mut rate_limits = RateLimitStatus::default();
        let mut windows: Vec<(ScopeKey, i64, i64)> = Vec::with_capacity(3);
        let rate_rows = match request.class {
            ReserveClass::Online => vec![
                ("key".to_owned(), request.key_id.0.clone()),
                ("model".to_owned(), request.model.as_str().to_owned()),
                ("project".to_owned(), project_scope),
            ],
            ReserveClass::Batch { .. } => Vec::new(),
        };
        for row in rate_rows {
            let Some((rpm, tpm)) = self.rate_limits.get(&row).copied() else {
                continue;
            };
            let rpm_bound = rpm.unwrap_or(i64::MAX);
            let tpm_bound = tpm.unwrap_or(i64::MAX);
            // A window no request has used yet counts from zero.
            let (requests_used, tokens_used) = self.windows.get(&row).copied().unwrap_or((0, 0));
            let requests_after = requests_used.checked_add(1).filter(|r| *r <= rpm_bound);
            let tokens_after = tokens_used.checked_add(tokens).filter(|t| *t <= tpm_bound);
            let (Some(requests_after), Some(tokens_after)) = (requests_after, tokens_after) else {
                let (kind, limit) = if requests_used.saturating_add(1) > rpm_bound {
                    (RateKind::Requests, rpm_bound)
                } else {
                    (RateKind::Tokens, tpm_bound)
                };
                return Err(LedgerError::RateLimited {
                    scope: RateScopeKind::parse(&row.0).ok_or(corrupt("rate limit scope"))?,
                    kind,
                    limit: to_u32_saturating(limit),
                    retry_after_ms: at.reset_ms,
                });
            };
            if let Some(rpm) = rpm {
                let status = WindowStatus {
                    limit: to_u32_saturating(rpm),
                    remaining: to_u32_saturating(rpm.saturating_sub(requests_after)),
                    reset_ms: at.reset_ms,
                };
                rate_limits.requests = Some(tighter(rate_limits.requests, status));
            }
            if let Some(tpm) = tpm {
                let status = WindowStatus {
                    limit: to_u32_saturating(tpm),
                    remaining: to_u32_saturating(tpm.saturating_sub(tokens_after)),
                    reset_ms: at.reset_ms,
                };
                rate_limits.tokens = Some(tighter(rate_limits.tokens, status));
            }
            windows.push((row, requests_after, tokens_after));
        }

        // Everything fits: take it, in the book and in the deltas the batch will write.
        if let Some(account) = self.accounts.get_mut(&tenant_text) {
            add_to(&mut account.2, hold.0)?;
        }
        add_to(
            self.account_holds.entry(tenant_text.clone()).or_default(),
            hold.0,
        )?;
        for (row, _) in budget_rows {
            add_to(&mut self.budgets.entry(row.clone()).or_default().0, hold.0)?;
            add_to(self.budget_holds.entry(row).or_default(), hold.0)?;
        }
        for (row, requests_after, tokens_after) in windows {
            self.windows
                .insert(row.clone(), (requests_after, tokens_after));
            let counts = self.window_counts.entry(row).or_default();
            add_to(&mut counts.0, 1)?;
            add_to(&mut counts.1, tokens)?;
        }
        self.reservations.insert(
            request_id.clone(),
            ReservationState::Open.as_str().to_owned(),
        );
        if let Some(key) = &request.idempotency_key {
            self.idempotency.insert(
                (tenant_text, key.clone()),
                (request_id, ReservationState::Open.as_str().to_owned()),
            );
        }
        let reservation = Reservation {
            request_id: request.request_id,
            tenant,
            project,
            key_id: request.key_id.clone(),
            currency,
            price,
            hold,
            month: at.month,
            created_at_ms: at.now_ms,
            rate_limits,
        };
        self.granted.push(Granted {
            reservation: reservation.clone(),
            prompt_tokens_max: request.prompt_tokens,
            completion_tokens_max: request.completion_tokens_max,
            idempotency_key: request.idempotency_key.clone(),
        });
        Ok(reservation)
    }
}

impl Book {
    /// What the granted reservations add to each budget row, with its limit as the bound.
    fn budget_adds(&self) -> Vec<CounterAdd<'_>> {
        self.budget_holds
            .iter()
            .map(|(row, hold)| CounterAdd {
                scope: &row.0,
                scope_id: &row.1,
                exists: self.budgets_existing.contains(row),
                first: *hold,
                second: 0,
                first_bound: self.budget_limits.get(row).copied().unwrap_or(i64::MAX),
                second_bound: i64::MAX,
            })
            .collect()
    }

    /// What the granted reservations add to each rate window, with its limits as the bounds.
    fn window_adds(&self) -> Vec<CounterAdd<'_>> {
        self.window_counts
            .iter()
            .map(|(row, (requests_added, tokens_added))| {
                let (rpm, tpm) = self.rate_limits.get(row).copied().unwrap_or((None, None));
                CounterAdd {
                    scope: &row.0,
                    scope_id: &row.1,
                    exists: self.windows_existing.contains(row),
                    first: *requests_added,
                    second: *tokens_added,
                    first_bound: rpm.unwrap_or(i64::MAX),
                    second_bound: tpm.unwrap_or(i64::MAX),
                }
            })
            .collect()
    }

    /// The rows of the reservations this batch granted.
    fn new_rows<'a>(&'a self, at: &'a BatchTime, replica_id: &'a str) -> Vec<NewReservation<'a>> {
        self.granted
            .iter()
            .map(|g| {
                let r = &g.reservation;
                NewReservation {
                    request_id: r.request_id.to_string(),
                    tenant: r.tenant.as_str(),
                    project: r.project.as_str(),
                    key_id: &r.key_id.0,
                    model: r.price.model.as_str(),
                    replica_id,
                    idempotency_key: g.idempotency_key.as_deref(),
                    month: &at.month_text,
                    currency: r.currency.as_str(),
                    price_effective_from_ms: r.price.effective_from_ms,
                    input_per_mtok_nanos: r.price.input_per_mtok.0,
                    output_per_mtok_nanos: r.price.output_per_mtok.0,
                    cached_input_per_mtok_nanos: r.price.cached_input_per_mtok.0,
                    prompt_tokens_max: i64::from(g.prompt_tokens_max),
                    completion_tokens_max: i64::from(g.completion_tokens_max),
                    hold_nanos: r.hold.0,
                    created_at_ms: r.created_at_ms,
                }
            })
            .collect()
    }
}

impl Reserver {
    /// Applies `requests` as one batch (retried after transient conflicts), else request by
    /// request, else all failed at once when the database is out of reach
    /// ([`apply_batch_else_one_by_one`], as the settle writer does): one result per request, in
    /// order.
    pub(crate) async fn reserve_all(
        &self,
        requests: &[ReserveRequest],
    ) -> Vec<Result<Reservation, LedgerError>> {
        apply_batch_else_one_by_one("reservation batch", requests.len(), |range| {
            self.batch_retrying(requests.get(range).unwrap_or_default())
        })
        .await
    }

    async fn batch_retrying(
        &self,
        requests: &[ReserveRequest],
    ) -> Result<Vec<Result<Reservation, LedgerError>>, LedgerError> {
        let result = retry_transient("reservation batch", || self.batch(requests)).await;
        if let Ok(results) = &result {
            assert!(results.len() == requests.len(), "one result per request");
        }
        result
    }

    #[expect(clippy::too_many_lines, reason = "one transaction, read top to bottom")]
    async fn batch(
        &self,
        requests: &[ReserveRequest],
    ) -> Result<Vec<Result<Reservation, LedgerError>>, LedgerError> {
        assert!(!requests.is_empty(), "batches are never empty");
        assert!(
            requests.len() <= RESERVE_BATCH_LEN_MAX,
            "batches respect their limit"
        );
        let at = BatchTime::at(self.clock.now_ms());
        let request_ids: Vec<String> = requests.iter().map(|r| r.request_id.to_string()).collect();
        let key_ids: Vec<&str> = requests
            .iter()
            .map(|r| r.key_id.0.as_str())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let models: Vec<&str> = requests
            .iter()
            .map(|r| r.model.as_str())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let idempotency: Vec<(&str, &str)> = requests
            .iter()
            .filter_map(|r| Some((r.key_id.0.as_str(), r.idempotency_key.as_deref()?)))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let replica_id: &str = &self.replica_id;

        let _gate = self.gate.enter().await;
        on_store!(&self.store, pool => {
            // Two trips on SQLite: `BEGIN` with the read, the writes with `COMMIT` (`write_tx`).
            let mut tx = WriteTx::acquire(pool).await?;
            let outcome = async {
                let mut book = Book::default();

                // Reads, in one statement: keys, earlier uses of the request ids and idempotency
                // keys, prices, limits (and on SQLite the accounts, budget rows and rate windows).
                // Limits are read before any row lock is taken, to keep locks short; a limit
                // changed meanwhile applies from the next batch.
                let inputs = BatchInputs {
                    request_ids: &request_ids,
                    key_ids: &key_ids,
                    idempotency: &idempotency,
                    models: &models,
                    now_ms: at.now_ms,
                    month: &at.month_text,
                    window_start_ms: at.window_start_ms,
                };
                for row in tx.conn().begin_and_read_inputs(&inputs).await? {
                    book.read(row)?;
                }
                let tenants: Vec<String> = book
                    .keys
                    .values()
                    .map(|(tenant, _, _)| tenant.clone())
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                let projects: Vec<String> = book
                    .keys
                    .values()
                    .map(|(tenant, project, _)| format!("{tenant}/{project}"))
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                let project_refs: Vec<&str> = projects.iter().map(String::as_str).collect();

                // Locks (PostgreSQL), in the global order: accounts, budget rows (created at zero
                // where missing), rate windows (the same). SQLite read these rows above already,
                // under the one write lock its `BEGIN IMMEDIATE` holds.
                let tenant_refs: Vec<&str> = tenants.iter().map(String::as_str).collect();
                let budget_rows: Vec<(&str, &str)> = book
                    .keys
                    .keys()
                    .map(|key_id| ("key", key_id.as_str()))
                    .chain(project_refs.iter().map(|p| ("project", *p)))
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                let window_rows: Vec<(&str, &str)> = book
                    .rate_limits
                    .keys()
                    .map(|(scope, scope_id)| (scope.as_str(), scope_id.as_str()))
                    .collect();
                let locks = LockRows {
                    tenants: &tenant_refs,
                    budget_rows: &budget_rows,
                    month: &at.month_text,
                    window_rows: &window_rows,
                    window_start_ms: at.window_start_ms,
                };
                for row in tx.conn().lock_rows(&locks).await? {
                    book.read(row)?;
                }
                book.budgets_existing = book.budgets.keys().cloned().collect();
                book.windows_existing = book.windows.keys().cloned().collect();

                // Decide each request in queue order, then write what the granted ones took.
                let results: Vec<Result<Reservation, LedgerError>> =
                    requests.iter().map(|r| book.decide(r, &at)).collect();
                if book.granted.is_empty() {
                    tx.conn().commit().await?;
                } else {
                    write_batch(tx.conn(), &book, &at, replica_id).await?;
                }
                tx.ended();
                Ok(results)
            }
            .await;
            tx.end(outcome).await
        })
    }
}

/// Writes what a batch's granted reservations took and commits, each change with the database's
/// own condition as a backstop: a row that would not fit is an invariant failure (its write
/// guard fails before the commit), and the whole batch rolls back.
async fn write_batch<C: BatchSql>(
    conn: &mut C,
    book: &Book,
    at: &BatchTime,
    replica_id: &str,
) -> Result<(), LedgerError> {
    let writes = ReservationWrites {
        accounts: book
            .account_holds
            .iter()
            .map(|(tenant, hold)| (tenant.as_str(), *hold))
            .collect(),
        budgets: book.budget_adds(),
        month: &at.month_text,
        windows: book.window_adds(),
        window_start_ms: at.window_start_ms,
        reservations: book.new_rows(at, replica_id),
    };
    conn.write_reservations_and_commit(&writes).await
}
