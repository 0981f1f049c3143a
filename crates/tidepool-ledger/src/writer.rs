//! Settlement: the group-committed writer. `settle`, `void`, `checkpoint` and `record_usage`
//! (money-free usage entries, written in a transaction of their own per drained run) queue a
//! command on a bounded channel and await its own outcome; one writer task per `Ledger` drains
//! up to [`SETTLE_BATCH_LEN_MAX`] commands and applies them in one transaction with a handful of
//! statements — one update that resolves the open reservations and reads them back, one read of
//! the others, one usage insert, one upsert of the daily usage rollup (`rollup`; on PostgreSQL
//! each one prepared statement with whole columns bound as arrays, see `batch_sql`), one balance
//! update per tenant and one per budget row — so the cost of a commit is shared by the whole
//! batch. Replies go out only after the commit: an `Ok` is durable (docs/ledger.md,
//! "Durability"). If a batch fails as a whole, each command is retried alone so one bad command
//! cannot fail its neighbours. Reservations have their own group-committed writer (`billing`).

use std::collections::{BTreeMap, BTreeSet};

use tidepool_core::{Currency, ModelId, Nanos, RequestId};
use tokio::sync::{mpsc, oneshot};

use crate::batch_sql::{
    AccountDelta, BUDGET_DELTA_BINDS, BatchSql as _, BudgetDelta, DAILY_BINDS, FREE_USAGE_BINDS,
    FreeUsageRow, ReservationRow, SQLITE_BINDS_MAX, USAGE_BINDS, UsageRow,
};
use crate::batches::{NewBatchLine, insert_line, validate_line};
use crate::kinds::ReservationState;
use crate::price::{BilledTokens, PriceVersion, cost_of};
use crate::rollup::{daily_rows, free_daily_rows};
use crate::store::{Store, apply_batch_else_one_by_one, on_store, retry_transient, to_i64};
use crate::usage::{entry_columns, validate_entry};
use crate::write_tx::{Guard, TxControl as _, WriteTx};
use crate::{Clock, LedgerError, UsageEntry};

/// Commands waiting for the writer; a full queue makes `settle` wait (backpressure), never drop.
pub const SETTLE_QUEUE_LEN_MAX: usize = 8192;
/// Commands applied in one transaction. On SQLite, 512 usage rows × 20 columns = 10,240 bind
/// parameters, below its limit of 32,766; PostgreSQL binds each column as one array.
pub const SETTLE_BATCH_LEN_MAX: usize = 512;
const _: () = assert!(
    SETTLE_BATCH_LEN_MAX <= SETTLE_QUEUE_LEN_MAX,
    "a full batch fits the queue"
);
const _: () = assert!(
    SETTLE_BATCH_LEN_MAX * USAGE_BINDS < SQLITE_BINDS_MAX,
    "a batch fits SQLite's bind limit"
);
const _: () = assert!(
    SETTLE_BATCH_LEN_MAX * FREE_USAGE_BINDS < SQLITE_BINDS_MAX,
    "a batch of money-free usage rows fits SQLite's bind limit"
);
const _: () = assert!(
    SETTLE_BATCH_LEN_MAX * DAILY_BINDS < SQLITE_BINDS_MAX,
    "a batch's rollup rows fit SQLite's bind limit"
);
const _: () = assert!(
    SETTLE_BATCH_LEN_MAX * 2 * BUDGET_DELTA_BINDS < SQLITE_BINDS_MAX,
    "a batch's budget rows (a key's and a project's per request) fit SQLite's bind limit"
);
/// Rate windows older than this are deleted by the writer.
const RATE_WINDOW_RETENTION_MS: i64 = 180_000;

/// How a request's reservation is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// Bill the exact cost of the tokens in the usage entry (capped at the hold).
    Settle,
    /// Bill nothing: the request failed before any token was produced.
    Void,
}

/// The outcome of `settle`/`void`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    pub request_id: RequestId,
    /// `Settled` or `Voided`: the state the reservation is in now.
    pub state: ReservationState,
    pub cost: Nanos,
    pub currency: Currency,
    /// `false` when the reservation had already been resolved (by an earlier call, another
    /// replica or recovery): nothing moved, `cost` is what was billed then.
    pub first: bool,
    /// The usage exceeded what was reserved; the cost was capped at the hold.
    pub capped: bool,
}

#[derive(Debug)]
pub(crate) enum Command {
    Finish {
        entry: UsageEntry,
        finish: Finish,
        /// A batch line's result, written in the settlement's transaction.
        line: Option<Box<NewBatchLine>>,
        reply: Reply<Settlement>,
    },
    Checkpoint {
        request_id: RequestId,
        completion_tokens: u32,
        reply: CheckpointReply,
    },
    /// A money-free usage entry (`record_usage`); the reply says whether it was written.
    Record {
        entry: UsageEntry,
        reply: Reply<bool>,
    },
}

/// One command of a settle batch: the entry, how it resolves, and a batch line's result.
type Item<'a> = (&'a UsageEntry, Finish, Option<&'a NewBatchLine>);

/// Where a command's outcome goes.
type Reply<T> = oneshot::Sender<Result<T, LedgerError>>;

/// Where a checkpoint's outcome goes.
type CheckpointReply = Reply<()>;

/// A `settle`/`void` command as the writer drains it: the entry, how it resolves, and a batch
/// line's result.
type Finishing = (UsageEntry, Finish, Option<Box<NewBatchLine>>);

/// A kind of command the settle writer applies in batches: what one batch of them returns,
/// one result per command.
trait RunKind {
    type Command;
    type Output;
    /// Names the batch in the logs.
    const KIND: &'static str;
    async fn batch(
        writer: &Writer,
        commands: &[&Self::Command],
    ) -> Result<Vec<Result<Self::Output, LedgerError>>, LedgerError>;
}

/// `settle`/`void` commands.
struct Finishes;

impl RunKind for Finishes {
    type Command = Finishing;
    type Output = Settlement;
    const KIND: &'static str = "settle batch";

    async fn batch(
        writer: &Writer,
        commands: &[&Finishing],
    ) -> Result<Vec<Result<Settlement, LedgerError>>, LedgerError> {
        let items: Vec<Item<'_>> = commands
            .iter()
            .map(|(entry, finish, line)| (entry, *finish, line.as_deref()))
            .collect();
        writer.finish_batch_retrying(&items).await
    }
}

/// Money-free usage entries (`record_usage`).
struct Records;

impl RunKind for Records {
    type Command = UsageEntry;
    type Output = bool;
    const KIND: &'static str = "usage batch";

    async fn batch(
        writer: &Writer,
        entries: &[&UsageEntry],
    ) -> Result<Vec<Result<bool, LedgerError>>, LedgerError> {
        let written = writer.record_batch_retrying(entries).await?;
        Ok(written.into_iter().map(Ok).collect())
    }
}

#[derive(Debug)]
struct Held {
    tenant: String,
    project: String,
    key_id: String,
    model: String,
    month: String,
    currency: Currency,
    price: PriceVersion,
    prompt_tokens_max: i64,
    completion_tokens_max: i64,
    hold: Nanos,
}

fn corrupt(what: &'static str) -> LedgerError {
    LedgerError::Corrupt { what }
}

fn held_from_row(row: ReservationRow) -> Result<(String, Held), LedgerError> {
    let (
        request_id,
        tenant,
        project,
        key_id,
        model,
        month,
        currency,
        effective_from_ms,
        input,
        output,
        cached,
        prompt_max,
        completion_max,
        hold,
    ) = row;
    let currency = Currency::parse(&currency).map_err(|_| corrupt("currency"))?;
    let price = PriceVersion {
        model: ModelId::new(model.clone()).map_err(|_| corrupt("model id"))?,
        effective_from_ms,
        currency,
        input_per_mtok: Nanos(input),
        output_per_mtok: Nanos(output),
        cached_input_per_mtok: Nanos(cached),
    };
    let held = Held {
        tenant,
        project,
        key_id,
        model,
        month,
        currency,
        price,
        prompt_tokens_max: prompt_max,
        completion_tokens_max: completion_max,
        hold: Nanos(hold),
    };
    Ok((request_id, held))
}

/// One usage row to insert, with its money.
#[derive(Debug)]
struct BilledRow<'a> {
    entry: &'a UsageEntry,
    held: &'a Held,
    cost: Nanos,
    latency_ms: i64,
}

/// Sums per account and per budget row, applied in the global lock order.
#[derive(Debug, Default)]
struct Deltas {
    /// tenant → (hold released, cost billed)
    accounts: BTreeMap<String, (Nanos, Nanos)>,
    /// `(scope, scope_id, month)` → (hold released, cost billed)
    budgets: BTreeMap<(&'static str, String, String), (Nanos, Nanos)>,
}

fn add_pair(slot: &mut (Nanos, Nanos), hold: Nanos, cost: Nanos) -> Result<(), LedgerError> {
    let overflow =
        || LedgerError::Core(tidepool_core::CoreError::MoneyOverflow { what: "batch sum" });
    slot.0 = slot.0.checked_add(hold).ok_or_else(overflow)?;
    slot.1 = slot.1.checked_add(cost).ok_or_else(overflow)?;
    Ok(())
}

impl Deltas {
    fn add(&mut self, held: &Held, cost: Nanos) -> Result<(), LedgerError> {
        add_pair(
            self.accounts.entry(held.tenant.clone()).or_default(),
            held.hold,
            cost,
        )?;
        let project_scope = format!("{}/{}", held.tenant, held.project);
        for key in [
            ("key", held.key_id.clone(), held.month.clone()),
            ("project", project_scope, held.month.clone()),
        ] {
            add_pair(self.budgets.entry(key).or_default(), held.hold, cost)?;
        }
        Ok(())
    }
}

/// Decides one command against its open reservation: `(cost, capped, latency_ms)` to apply, or
/// `Err` when the command does not fit the reservation.
fn decide(
    entry: &UsageEntry,
    finish: Finish,
    held: &Held,
) -> Result<(Nanos, bool, i64), LedgerError> {
    validate_entry(entry)?;
    let latency_ms = to_i64(entry.latency_ms, "latency_ms")?;
    let model_matches = entry
        .model
        .as_ref()
        .is_some_and(|m| m.as_str() == held.model);
    if entry.tenant.as_str() != held.tenant || entry.key_id.0 != held.key_id || !model_matches {
        return Err(LedgerError::ReservationMismatch {
            request_id: entry.request_id,
        });
    }
    match finish {
        Finish::Void => Ok((Nanos::ZERO, false, latency_ms)),
        Finish::Settle => {
            let tokens = BilledTokens {
                prompt_tokens: entry.prompt_tokens,
                cached_prompt_tokens: entry.cached_prompt_tokens,
                completion_tokens: entry.completion_tokens,
            };
            let exact = cost_of(tokens, &held.price)?;
            let over_tokens = i64::from(entry.prompt_tokens) > held.prompt_tokens_max
                || i64::from(entry.completion_tokens) > held.completion_tokens_max;
            let capped = exact > held.hold;
            if over_tokens || capped {
                tracing::error!(
                    request_id = %entry.request_id,
                    "usage exceeds its reservation; billing at most the hold"
                );
            }
            Ok((exact.min(held.hold), capped, latency_ms))
        }
    }
}

enum Outcome<'a> {
    Reply(Result<Settlement, LedgerError>),
    Apply {
        row: BilledRow<'a>,
        finish: Finish,
        capped: bool,
        /// A batch line's result to record with the settlement.
        line: Option<&'a NewBatchLine>,
    },
}

impl crate::Ledger {
    /// Writes one money-free usage entry, for requests that never reserved (billing not
    /// enforced, or refused before admission), and adds it to the daily rollup in the same
    /// transaction, group-committed with other entries like settlements. Idempotent on
    /// `request_id`: a second write of the same id is ignored and returns `false`; so is a write
    /// for a request id that has a reservation — its entry is written by `settle`/`void`.
    pub async fn record_usage(&self, entry: &UsageEntry) -> Result<bool, LedgerError> {
        validate_entry(entry)?;
        to_i64(entry.latency_ms, "latency_ms")?;
        let (reply, answer) = oneshot::channel();
        self.writer
            .send(Command::Record {
                entry: entry.clone(),
                reply,
            })
            .await
            .map_err(|_| LedgerError::WriterFailed)?;
        answer.await.map_err(|_| LedgerError::WriterFailed)?
    }

    /// Settles a reserved request at the exact cost of the tokens in `entry` (at the reservation's
    /// price snapshot, capped at its hold) and writes its usage entry. Returns once durable.
    /// Idempotent: a second call returns the first outcome with `first: false`.
    pub async fn settle(&self, entry: &UsageEntry) -> Result<Settlement, LedgerError> {
        self.finish(entry, Finish::Settle).await
    }

    /// Voids a reserved request (failed before any token): releases the hold, bills nothing,
    /// writes its usage entry. Idempotent like [`Self::settle`].
    pub async fn void(&self, entry: &UsageEntry) -> Result<Settlement, LedgerError> {
        self.finish(entry, Finish::Void).await
    }

    /// Settles or voids.
    pub async fn finish(
        &self,
        entry: &UsageEntry,
        finish: Finish,
    ) -> Result<Settlement, LedgerError> {
        self.finish_with_line(entry, finish, None).await
    }

    /// Settles or voids a batch line's request and records the line's result in the same
    /// transaction (group-committed with other settlements). If the line already has a result
    /// (it ran before, e.g. on a replica whose lease lapsed), this request is **voided** instead
    /// and its result dropped: a line is billed once and answered once. Idempotent per request
    /// id like [`Self::settle`].
    pub async fn settle_batch_line(
        &self,
        entry: &UsageEntry,
        finish: Finish,
        line: &NewBatchLine,
    ) -> Result<Settlement, LedgerError> {
        validate_line(line)?;
        self.finish_with_line(entry, finish, Some(Box::new(line.clone())))
            .await
    }

    async fn finish_with_line(
        &self,
        entry: &UsageEntry,
        finish: Finish,
        line: Option<Box<NewBatchLine>>,
    ) -> Result<Settlement, LedgerError> {
        let (reply, answer) = oneshot::channel();
        self.writer
            .send(Command::Finish {
                entry: entry.clone(),
                finish,
                line,
                reply,
            })
            .await
            .map_err(|_| LedgerError::WriterFailed)?;
        answer.await.map_err(|_| LedgerError::WriterFailed)?
    }

    /// Applies `items` as one settle batch, in this order, exactly as the settle writer applies
    /// what it drains from its queue (one transaction, retried after transient conflicts), but
    /// without the writer's command-by-command fallback: a batch that fails as a whole is an
    /// `Err` here. For tests of what one batch decides. At most [`SETTLE_BATCH_LEN_MAX`] items.
    #[cfg(feature = "test-util")]
    pub async fn finish_in_one_batch(
        &self,
        items: &[(UsageEntry, Finish)],
    ) -> Result<Vec<Result<Settlement, LedgerError>>, LedgerError> {
        assert!(
            !items.is_empty() && items.len() <= SETTLE_BATCH_LEN_MAX,
            "a batch respects its limits"
        );
        let writer = self.detached_writer();
        let items: Vec<Item<'_>> = items.iter().map(|(e, f)| (e, *f, None)).collect();
        writer.finish_batch_retrying(&items).await
    }

    /// A writer on this handle's store with no queue of its own, for the `*_in_one_batch` tests.
    #[cfg(feature = "test-util")]
    fn detached_writer(&self) -> Writer {
        let (_unused, rx) = mpsc::channel(1);
        Writer {
            store: self.store.clone(),
            gate: self.gate.clone(),
            clock: self.clock.clone(),
            rx,
            last_cleanup_ms: i64::MIN,
        }
    }

    /// Writes `entries` as one batch of money-free usage entries, exactly as the settle writer
    /// writes what it drains from its queue, without its entry-by-entry fallback. For tests of
    /// what one batch decides. At most [`SETTLE_BATCH_LEN_MAX`] entries.
    #[cfg(feature = "test-util")]
    pub async fn record_in_one_batch(
        &self,
        entries: &[UsageEntry],
    ) -> Result<Vec<bool>, LedgerError> {
        let writer = self.detached_writer();
        let entries: Vec<&UsageEntry> = entries.iter().collect();
        writer.record_batch_retrying(&entries).await
    }

    /// Records durable progress of an open reservation (completion tokens delivered so far), so
    /// recovery after a crash can bill them. Call when the first token goes out and then every
    /// so often; it only ever moves forward.
    pub async fn checkpoint(
        &self,
        request_id: RequestId,
        completion_tokens: u32,
    ) -> Result<(), LedgerError> {
        let (reply, answer) = oneshot::channel();
        self.writer
            .send(Command::Checkpoint {
                request_id,
                completion_tokens,
                reply,
            })
            .await
            .map_err(|_| LedgerError::WriterFailed)?;
        answer.await.map_err(|_| LedgerError::WriterFailed)?
    }
}

pub(crate) struct Writer {
    pub(crate) store: Store,
    pub(crate) gate: crate::store::WriteGate,
    pub(crate) clock: std::sync::Arc<dyn Clock>,
    pub(crate) rx: mpsc::Receiver<Command>,
    pub(crate) last_cleanup_ms: i64,
}

impl Writer {
    /// Runs until every sender is gone, then returns after the last batch.
    pub(crate) async fn run(mut self) {
        let mut batch: Vec<Command> = Vec::with_capacity(SETTLE_BATCH_LEN_MAX);
        while self.rx.recv_many(&mut batch, SETTLE_BATCH_LEN_MAX).await > 0 {
            assert!(
                batch.len() <= SETTLE_BATCH_LEN_MAX,
                "recv_many respects its limit"
            );
            let commands = std::mem::take(&mut batch);
            self.apply(commands).await;
            self.cleanup().await;
        }
        tracing::debug!("ledger writer stopped: all handles dropped");
    }

    async fn cleanup(&mut self) {
        let now_ms = self.clock.now_ms();
        if now_ms.saturating_sub(self.last_cleanup_ms) < RATE_WINDOW_RETENTION_MS {
            return;
        }
        self.last_cleanup_ms = now_ms;
        let cutoff = now_ms.saturating_sub(RATE_WINDOW_RETENTION_MS);
        let result = on_store!(&self.store, pool => {
            sqlx::query("DELETE FROM rate_windows WHERE window_start_ms < $1")
                .bind(cutoff)
                .execute(pool)
                .await
                .map(drop)
        });
        if let Err(err) = result {
            tracing::warn!(error = %err, "deleting old rate windows failed; will retry");
        }
    }

    async fn apply(&self, commands: Vec<Command>) {
        let mut finishes = Vec::new();
        let mut checkpoints = Vec::new();
        let mut records = Vec::new();
        for command in commands {
            match command {
                Command::Record { entry, reply } => records.push((entry, reply)),
                Command::Finish {
                    entry,
                    finish,
                    line,
                    reply,
                } => finishes.push(((entry, finish, line), reply)),
                Command::Checkpoint {
                    request_id,
                    completion_tokens,
                    reply,
                } => {
                    checkpoints.push((request_id, completion_tokens, reply));
                }
            }
        }
        self.apply_checkpoints(checkpoints).await;
        self.answer_run::<Records>(records).await;
        self.answer_run::<Finishes>(finishes).await;
    }

    /// Applies a drained run of commands of one kind as one batch and answers each caller:
    /// command by command if the batch fails as a whole, every caller at once if the database is
    /// out of reach ([`apply_batch_else_one_by_one`]).
    async fn answer_run<K: RunKind>(&self, run: Vec<(K::Command, Reply<K::Output>)>) {
        if run.is_empty() {
            return;
        }
        let (commands, replies): (Vec<K::Command>, Vec<_>) = run.into_iter().unzip();
        let all: Vec<&K::Command> = commands.iter().collect();
        let results = apply_batch_else_one_by_one(K::KIND, all.len(), |range| {
            K::batch(self, all.get(range).unwrap_or_default())
        })
        .await;
        for (reply, result) in replies.into_iter().zip(results) {
            drop(reply.send(result));
        }
    }

    /// Applies a drained run of checkpoints as one batch and answers each caller.
    async fn apply_checkpoints(&self, checkpoints: Vec<(RequestId, u32, CheckpointReply)>) {
        if checkpoints.is_empty() {
            return;
        }
        // By request id, the order every writer locks reservations in; one update per
        // request, at the most progress any of its checkpoints reported.
        let mut progress: BTreeMap<RequestId, u32> = BTreeMap::new();
        for (request_id, completion_tokens, _) in &checkpoints {
            let slot = progress.entry(*request_id).or_default();
            *slot = (*slot).max(*completion_tokens);
        }
        let items: Vec<(RequestId, u32)> = progress.into_iter().collect();
        let result = self.checkpoint_batch(&items).await;
        let failed = result.is_err();
        if let Err(err) = result {
            tracing::warn!(error = %err, "checkpoint batch failed");
        }
        for (_, _, reply) in checkpoints {
            let answer = if failed {
                Err(LedgerError::WriterFailed)
            } else {
                Ok(())
            };
            // The caller may have given up waiting; the checkpoint is applied regardless.
            drop(reply.send(answer));
        }
    }

    async fn record_batch_retrying(
        &self,
        entries: &[&UsageEntry],
    ) -> Result<Vec<bool>, LedgerError> {
        retry_transient("usage batch", || self.record_batch(entries)).await
    }

    /// One transaction: the entries' usage rows (each only if its request id has neither a
    /// usage row nor a reservation, and only the first of an id given twice), then the daily
    /// rollup of those written. Returns, per entry, whether it was written.
    async fn record_batch(&self, entries: &[&UsageEntry]) -> Result<Vec<bool>, LedgerError> {
        assert!(
            !entries.is_empty() && entries.len() <= SETTLE_BATCH_LEN_MAX,
            "batches respect their limits"
        );
        let mut rows = Vec::with_capacity(entries.len());
        for entry in entries {
            rows.push(entry_columns(
                entry,
                entry.model.as_ref().map(ModelId::as_str),
                to_i64(entry.latency_ms, "latency_ms")?,
            ));
        }
        let _gate = self.gate.enter().await;
        on_store!(&self.store, pool => {
            let mut tx = WriteTx::acquire(pool).await?;
            let outcome = async {
                tx.conn().begin().await?;
                let inserted: BTreeSet<String> =
                    tx.conn().insert_free_usage(&rows).await?.into_iter().collect();
                // The first row of each inserted id is the one written.
                let mut seen: BTreeSet<&str> = BTreeSet::new();
                let written: Vec<bool> = rows
                    .iter()
                    .map(|row| {
                        inserted.contains(&row.request_id) && seen.insert(row.request_id.as_str())
                    })
                    .collect();
                assert!(seen.len() == inserted.len(), "every inserted id is one of the batch's");
                let daily_of: Vec<&FreeUsageRow<'_>> = rows
                    .iter()
                    .zip(&written)
                    .filter_map(|(row, first)| first.then_some(row))
                    .collect();
                let daily = free_daily_rows(&daily_of)?;
                tx.conn().add_usage_daily(&daily).await?;
                tx.conn().commit().await?;
                tx.ended();
                Ok(written)
            }
            .await;
            tx.end(outcome).await
        })
    }

    async fn finish_batch_retrying(
        &self,
        items: &[Item<'_>],
    ) -> Result<Vec<Result<Settlement, LedgerError>>, LedgerError> {
        retry_transient("settle batch", || self.finish_batch(items)).await
    }

    async fn checkpoint_batch(&self, items: &[(RequestId, u32)]) -> Result<(), LedgerError> {
        let now_ms = self.clock.now_ms();
        let _gate = self.gate.enter().await;
        on_store!(&self.store, pool => {
            let mut tx = pool.begin_with(self.store.begin_write_sql()).await?;
            for (request_id, completion_tokens) in items {
                sqlx::query(
                    "UPDATE reservations SET progress_completion_tokens = $2, progress_at_ms = $3 \
                     WHERE request_id = $1 AND state = 'open' AND progress_completion_tokens <= $2",
                )
                .bind(request_id.to_string())
                .bind(i64::from(*completion_tokens))
                .bind(now_ms)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    #[expect(clippy::too_many_lines, reason = "one transaction, read top to bottom")]
    async fn finish_batch(
        &self,
        items: &[Item<'_>],
    ) -> Result<Vec<Result<Settlement, LedgerError>>, LedgerError> {
        assert!(!items.is_empty(), "batches are never empty");
        assert!(
            items.len() <= SETTLE_BATCH_LEN_MAX,
            "batches respect their limit"
        );
        let now_ms = self.clock.now_ms();
        // The command that resolves each request, if it is open: the first whose entry is valid
        // (`decide` checks the rest against the reservation). Its kind is the state the
        // reservation moves to.
        let mut entry_errors: Vec<Option<LedgerError>> = Vec::with_capacity(items.len());
        let mut first_valid: BTreeMap<String, usize> = BTreeMap::new();
        for (index, (entry, _, _)) in items.iter().enumerate() {
            let checked =
                validate_entry(entry).and_then(|()| to_i64(entry.latency_ms, "latency_ms"));
            match checked {
                Ok(_) => {
                    first_valid
                        .entry(entry.request_id.to_string())
                        .or_insert(index);
                    entry_errors.push(None);
                }
                Err(err) => entry_errors.push(Some(err)),
            }
        }
        let resolving: Vec<String> = first_valid.keys().cloned().collect();
        let settling: Vec<String> = first_valid
            .iter()
            .filter(|(_, index)| {
                items
                    .get(**index)
                    .is_some_and(|(_, f, _)| *f == Finish::Settle)
            })
            .map(|(id, _)| id.clone())
            .collect();

        let _gate = self.gate.enter().await;
        on_store!(&self.store, pool => {
            // Two trips on SQLite: `BEGIN` with step 1, the writes with `COMMIT` (`write_tx`).
            let mut tx = WriteTx::acquire(pool).await?;
            let outcome = async {

                // 1. Move the open reservations to their final state and read them back, in one
                // statement (PostgreSQL: it takes their row locks, in request id order).
                let mut held: BTreeMap<String, Held> = BTreeMap::new();
                if resolving.is_empty() {
                    tx.conn().begin().await?;
                } else {
                    for row in tx.conn().begin_and_resolve_open(&resolving, &settling, now_ms).await? {
                        let (id, h) = held_from_row(row)?;
                        held.insert(id, h);
                    }
                }
                // 2. The others: resolved before this batch, open with only invalid commands, or
                // unknown.
                let others: Vec<String> = items
                    .iter()
                    .map(|(e, _, _)| e.request_id.to_string())
                    .filter(|id| !held.contains_key(id))
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                let mut states: BTreeMap<String, (String, String, Option<i64>)> = BTreeMap::new();
                if !others.is_empty() {
                    for (id, state, currency, cost) in tx.conn().read_states(&others).await? {
                        states.insert(id, (state, currency, cost));
                    }
                }

                // 2b. Batch lines that already have a result: their request is billed nothing (its
                // reservation reads `settled` at zero cost when the command asked to settle).
                let mut answered: BTreeSet<(String, String)> = BTreeSet::new();
                for (_, _, line) in items {
                    if let Some(line) = line {
                        let found: Option<(i64,)> = sqlx::query_as(
                            "SELECT line FROM batch_lines WHERE batch_id = $1 AND custom_id = $2",
                        )
                        .bind(&line.batch_id)
                        .bind(&line.custom_id)
                        .fetch_optional(tx.conn())
                        .await?;
                        if found.is_some() {
                            answered.insert((line.batch_id.clone(), line.custom_id.clone()));
                        }
                    }
                }
                let already_answered = |line: Option<&NewBatchLine>| {
                    line.is_some_and(|l| answered.contains(&(l.batch_id.clone(), l.custom_id.clone())))
                };

                // 3. Decide each command in order; a request finished twice in one batch counts once.
                let mut outcomes: Vec<Outcome<'_>> = Vec::with_capacity(items.len());
                let mut decided: BTreeMap<String, (ReservationState, Nanos)> = BTreeMap::new();
                for (index, (entry, finish, line)) in items.iter().enumerate() {
                    let id = entry.request_id.to_string();
                    let finish = if already_answered(*line) { &Finish::Void } else { finish };
                    let entry_error = entry_errors.get_mut(index).and_then(Option::take);
                    let outcome = if let Some(h) = held.get(&id) {
                        // Open before this batch.
                        if let Some((state, cost)) = decided.get(&id).copied() {
                            Outcome::Reply(Ok(Settlement {
                                request_id: entry.request_id,
                                state,
                                cost,
                                currency: h.currency,
                                first: false,
                                capped: false,
                            }))
                        } else if let Some(err) = entry_error {
                            Outcome::Reply(Err(err))
                        } else {
                            assert!(first_valid.get(&id) == Some(&index), "the first valid command resolves");
                            match decide(entry, *finish, h) {
                                Ok((cost, capped, latency_ms)) => {
                                    let state = match finish {
                                        Finish::Settle => ReservationState::Settled,
                                        Finish::Void => ReservationState::Voided,
                                    };
                                    decided.insert(id, (state, cost));
                                    Outcome::Apply { row: BilledRow { entry, held: h, cost, latency_ms }, finish: *finish, capped, line: *line }
                                }
                                // The reservation moved already: this command may not apply, and a
                                // later one for the same request might. Nothing is committed; alone,
                                // the command gets its error, in a batch each command is retried alone.
                                Err(err) if items.len() == 1 => {
                                    tx.conn().rollback().await?;
                                    tx.ended();
                                    return Ok(vec![Err(err)]);
                                }
                                Err(err) => return Err(err),
                            }
                        }
                    } else {
                        match states.get(&id) {
                            Some((state, _, _)) if state == ReservationState::Open.as_str() => {
                                // Only invalid commands name it (or it appeared after step 1, as if
                                // this batch came first).
                                Outcome::Reply(Err(entry_error.unwrap_or(LedgerError::ReservationNotFound {
                                    request_id: entry.request_id,
                                })))
                            }
                            Some((state, currency, cost)) => Outcome::Reply(Ok(Settlement {
                                request_id: entry.request_id,
                                state: ReservationState::parse(state).ok_or(LedgerError::Corrupt {
                                    what: "reservation state",
                                })?,
                                cost: Nanos(cost.unwrap_or(0)),
                                currency: Currency::parse(currency).map_err(|_| corrupt("currency"))?,
                                first: false,
                                capped: false,
                            })),
                            None => Outcome::Reply(Err(LedgerError::ReservationNotFound {
                                request_id: entry.request_id,
                            })),
                        }
                    };
                    outcomes.push(outcome);
                }
                let applied: Vec<(&BilledRow<'_>, Finish)> = outcomes
                    .iter()
                    .filter_map(|o| match o {
                        Outcome::Apply { row, finish, .. } => Some((row, *finish)),
                        Outcome::Reply(_) => None,
                    })
                    .collect();

                if applied.is_empty() {
                    tx.conn().commit().await?;
                } else {
                    // 4. Usage entries, with their money and price snapshot.
                    let rows: Vec<UsageRow<'_>> = applied
                        .iter()
                        .map(|(row, _)| UsageRow {
                            entry: entry_columns(
                                row.entry,
                                Some(row.held.model.as_str()),
                                row.latency_ms,
                            ),
                            project: &row.held.project,
                            month: &row.held.month,
                            currency: row.held.currency.as_str(),
                            cost_nanos: row.cost.0,
                            price_effective_from_ms: row.held.price.effective_from_ms,
                            input_per_mtok_nanos: row.held.price.input_per_mtok.0,
                            output_per_mtok_nanos: row.held.price.output_per_mtok.0,
                            cached_input_per_mtok_nanos: row.held.price.cached_input_per_mtok.0,
                        })
                        .collect();
                    // With batch lines, the usage rows go first on their own (a line's result
                    // points its usage row at the batch); otherwise with the money, below.
                    let with_lines = outcomes
                        .iter()
                        .any(|o| matches!(o, Outcome::Apply { line: Some(_), .. }));
                    if with_lines {
                        Guard::Usage.check(tx.conn().insert_usage(&rows).await?, rows.len())?;
                    }
                    // Batch lines' results, in the same transaction as their money; a line that got
                    // a result meanwhile fails the batch (each command is then retried alone and
                    // finds it answered, so its request is voided).
                    for outcome in &outcomes {
                        let Outcome::Apply { row, line: Some(line), .. } = outcome else {
                            continue;
                        };
                        if already_answered(Some(*line)) {
                            continue;
                        }
                        let request_id = row.entry.request_id.to_string();
                        let inserted = insert_line!(
                            tx.conn(),
                            line,
                            Some(request_id.as_str()),
                            i64::from(row.entry.prompt_tokens),
                            i64::from(row.entry.completion_tokens),
                            row.cost.0,
                            now_ms
                        )?;
                        if !inserted {
                            return Err(LedgerError::Invariant { what: "a batch line was answered twice" });
                        }
                        sqlx::query("UPDATE usage_entries SET batch_id = $1 WHERE request_id = $2")
                            .bind(&line.batch_id)
                            .bind(&request_id)
                            .execute(tx.conn())
                            .await?;
                    }
                    // Their daily rollup: every row was inserted, so all of them count; one upsert
                    // per (tenant, project, key, model, day), before the account rows are locked.
                    // 5. Then balances and budgets, in the global lock order.
                    let mut deltas = Deltas::default();
                    for (row, _) in &applied {
                        deltas.add(row.held, row.cost)?;
                    }
                    let accounts: Vec<AccountDelta<'_>> = deltas
                        .accounts
                        .iter()
                        .map(|(tenant, (hold, cost))| (tenant.as_str(), hold.0, cost.0))
                        .collect();
                    let budgets: Vec<BudgetDelta<'_>> = deltas
                        .budgets
                        .iter()
                        .map(|((scope, scope_id, month), (hold, cost))| {
                            (*scope, scope_id.as_str(), month.as_str(), hold.0, cost.0)
                        })
                        .collect();
                    // Distinct rows (map keys), each changing at most one: every one exists when
                    // the counts equal the lengths (the guards).
                    let usage = (!with_lines).then_some(rows.as_slice());
                    tx.conn()
                        .settle_and_commit(usage, &daily_rows(&rows)?, &accounts, &budgets)
                        .await?;
                }
                tx.ended();

                Ok(outcomes
                    .into_iter()
                    .map(|outcome| match outcome {
                        Outcome::Reply(result) => result,
                        Outcome::Apply { row, finish, capped, .. } => Ok(Settlement {
                            request_id: row.entry.request_id,
                            state: match finish {
                                Finish::Settle => ReservationState::Settled,
                                Finish::Void => ReservationState::Voided,
                            },
                            cost: row.cost,
                            currency: row.held.currency,
                            first: true,
                            capped,
                        }),
                    })
                    .collect())
            }
            .await;
            tx.end(outcome).await
        })
    }
}
