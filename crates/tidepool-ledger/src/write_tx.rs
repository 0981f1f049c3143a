//! The group-commit writers' transactions: [`WriteTx`], a write transaction on a pooled
//! connection that begins and commits inside the batch's own statements, and the write guards
//! ([`Guard`]) that check each write's count of changed rows before the commit.
//!
//! On SQLite every query is a trip to the connection's own thread and back (sqlx runs each
//! SQLite connection on a thread of its own), and each trip costs thread wake-ups, on a loaded
//! machine far more than the SQL itself (docs/bench/ledger.md). So a SQLite batch runs in two
//! trips: `BEGIN IMMEDIATE` with the batch's read, then its writes with `COMMIT`. The checks
//! that used to compare the write counts in Rust between the writes and the commit run inside
//! that second query instead:
//! after each write, `INSERT INTO write_guard VALUES (tag, changes(), expected)` goes to a
//! temporary view whose `INSTEAD OF` trigger raises `write guard: <tag>` when the count is not
//! the expected one. SQLite stops a multi-statement query at its first error, so `COMMIT` never
//! runs after a failed guard and the caller rolls the transaction back; the tag names the
//! invariant ([`Guard::what`]). The view and the trigger are `TEMP` objects each connection
//! creates when it opens ([`install_write_guard`]): nothing in the schema changes.
//!
//! PostgreSQL runs the same steps as separate statements (its extended protocol takes one
//! statement per query) and compares the counts in Rust with the same [`Guard`]s.

use std::fmt::Write as _;

use sqlx::pool::PoolConnection;
use sqlx::{Database, Executor as _, PgConnection, SqliteConnection};

use crate::LedgerError;

/// SQLite's write transaction: takes the database's write lock up front, so a transaction never
/// fails half-way upgrading a read lock.
pub(crate) const SQLITE_BEGIN_WRITE: &str = "BEGIN IMMEDIATE";

/// The statements that begin, commit and roll back a write transaction on either store's
/// connection.
pub(crate) trait TxControl {
    /// Begins a write transaction (SQLite: `BEGIN IMMEDIATE`, which takes the write lock up
    /// front; PostgreSQL: `BEGIN`).
    async fn begin(&mut self) -> Result<(), sqlx::Error>;
    /// Commits the open transaction.
    async fn commit(&mut self) -> Result<(), sqlx::Error>;
    /// Rolls the open transaction back.
    async fn rollback(&mut self) -> Result<(), sqlx::Error>;
}

impl TxControl for SqliteConnection {
    async fn begin(&mut self) -> Result<(), sqlx::Error> {
        sqlx::query(SQLITE_BEGIN_WRITE)
            .execute(&mut *self)
            .await
            .map(drop)
    }

    async fn commit(&mut self) -> Result<(), sqlx::Error> {
        sqlx::query("COMMIT").execute(&mut *self).await.map(drop)
    }

    async fn rollback(&mut self) -> Result<(), sqlx::Error> {
        sqlx::query("ROLLBACK").execute(&mut *self).await.map(drop)
    }
}

impl TxControl for PgConnection {
    async fn begin(&mut self) -> Result<(), sqlx::Error> {
        sqlx::query("BEGIN").execute(&mut *self).await.map(drop)
    }

    async fn commit(&mut self) -> Result<(), sqlx::Error> {
        sqlx::query("COMMIT").execute(&mut *self).await.map(drop)
    }

    async fn rollback(&mut self) -> Result<(), sqlx::Error> {
        sqlx::query("ROLLBACK").execute(&mut *self).await.map(drop)
    }
}

/// A count a group-commit write must come to, named by the invariant it guards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Guard {
    /// Every account's hold fitted its balance.
    AccountHolds,
    /// Every budget row's hold fitted its limit (existing rows and new ones).
    BudgetHolds,
    /// Every rate window took its requests and tokens within its limits.
    WindowAdds,
    /// Every granted reservation was inserted.
    Reservations,
    /// Every settled request got its usage row.
    Usage,
    /// Every account a settle batch releases exists.
    AccountSettles,
    /// Every budget row a settle batch releases exists.
    BudgetSettles,
}

impl Guard {
    pub(crate) const ALL: [Self; 7] = [
        Self::AccountHolds,
        Self::BudgetHolds,
        Self::WindowAdds,
        Self::Reservations,
        Self::Usage,
        Self::AccountSettles,
        Self::BudgetSettles,
    ];

    /// The tag the SQLite trigger names in its error.
    pub(crate) fn tag(self) -> &'static str {
        match self {
            Self::AccountHolds => "account_holds",
            Self::BudgetHolds => "budget_holds",
            Self::WindowAdds => "window_adds",
            Self::Reservations => "reservations",
            Self::Usage => "usage",
            Self::AccountSettles => "account_settles",
            Self::BudgetSettles => "budget_settles",
        }
    }

    /// The invariant, as [`LedgerError::Invariant`] reports it.
    pub(crate) fn what(self) -> &'static str {
        match self {
            Self::AccountHolds => "a batch's holds exceed an account's balance",
            Self::BudgetHolds => "a batch's holds exceed a budget",
            Self::WindowAdds => "a batch's requests exceed a rate window",
            Self::Reservations => "a granted reservation was not inserted",
            // A money-free usage row already holds one of the ids (record_usage on a reserved
            // request): the batch is refused and the one-by-one retry isolates it.
            Self::Usage => "usage row already exists for a reserved request",
            Self::AccountSettles => "account of a reservation is missing",
            Self::BudgetSettles => "budget row of a reservation is missing",
        }
    }

    /// `Ok` when `changed` rows is what this write had to change.
    pub(crate) fn check(self, changed: u64, expected: usize) -> Result<(), LedgerError> {
        if u64::try_from(expected).is_ok_and(|expected| expected == changed) {
            Ok(())
        } else {
            Err(LedgerError::Invariant { what: self.what() })
        }
    }

    /// The guard a SQLite error names, if it is a failed guard's.
    fn of_error(error: &sqlx::Error) -> Option<Self> {
        let sqlx::Error::Database(db) = error else {
            return None;
        };
        let tag = db.message().strip_prefix(GUARD_MESSAGE_PREFIX)?;
        Self::ALL.into_iter().find(|guard| guard.tag() == tag)
    }
}

/// What the trigger's error message starts with; the guard's tag follows.
const GUARD_MESSAGE_PREFIX: &str = "write guard: ";

/// SQLite: the statement that follows a write and fails the query unless the write changed
/// `expected` rows (`changes()` is the count of the statement that completed last).
pub(crate) fn guard_sql(guard: Guard, expected: usize) -> String {
    format!(
        "; INSERT INTO write_guard VALUES ('{}', changes(), {expected}); ",
        guard.tag()
    )
}

/// SQLite: the temporary view and trigger the write guards insert into. `RAISE` takes a string
/// literal only, so the trigger has one branch per guard.
fn write_guard_ddl() -> String {
    let mut branches = String::new();
    for guard in Guard::ALL {
        let tag = guard.tag();
        // Writing to a String cannot fail.
        let _: std::fmt::Result = write!(
            branches,
            " WHEN '{tag}' THEN RAISE(ABORT, '{GUARD_MESSAGE_PREFIX}{tag}')"
        );
    }
    format!(
        "CREATE TEMP VIEW IF NOT EXISTS write_guard (what, changed, expected) AS \
         SELECT NULL, NULL, NULL WHERE 0; \
         CREATE TEMP TRIGGER IF NOT EXISTS write_guard_check INSTEAD OF INSERT ON write_guard \
         WHEN NEW.changed IS NOT NEW.expected BEGIN \
         SELECT CASE NEW.what{branches} ELSE RAISE(ABORT, '{GUARD_MESSAGE_PREFIX}unknown') END; \
         END"
    )
}

/// Creates the write guard's temporary view and trigger on a new SQLite connection (the
/// pool's `after_connect`).
pub(crate) async fn install_write_guard(conn: &mut SqliteConnection) -> Result<(), sqlx::Error> {
    conn.execute(write_guard_ddl().as_str()).await.map(drop)
}

/// A SQLite error from a query with write guards, as the ledger reports it: a failed guard is
/// its invariant, anything else a database error.
pub(crate) fn guarded(error: sqlx::Error) -> LedgerError {
    match Guard::of_error(&error) {
        Some(guard) => LedgerError::Invariant { what: guard.what() },
        None => error.into(),
    }
}

/// A group-commit writer's transaction on one pooled connection. The batch's first statement
/// begins it and its last commits it (the `begin_*` and `*_and_commit` methods of
/// `batch_sql`), so no trip to the connection is spent on `BEGIN` or `COMMIT` alone;
/// [`WriteTx::end`] rolls back when the batch failed. A transaction dropped before it ended (its future cancelled, or a
/// rollback that failed) closes its connection instead of returning it to the pool: closing
/// rolls back, and the pool never hands out a connection inside a transaction.
pub(crate) struct WriteTx<DB: Database> {
    conn: PoolConnection<DB>,
    /// Set once the transaction is over: committed or rolled back.
    ended: bool,
}

impl<DB: Database> WriteTx<DB>
where
    DB::Connection: TxControl,
{
    pub(crate) async fn acquire(pool: &sqlx::Pool<DB>) -> Result<Self, LedgerError> {
        Ok(Self {
            conn: pool.acquire().await?,
            ended: false,
        })
    }

    /// The connection, for the statements between the first and the last.
    pub(crate) fn conn(&mut self) -> &mut DB::Connection {
        &mut self.conn
    }

    /// Records that the batch's last statement ended the transaction: call right after a
    /// `*_and_commit` method, `commit` or `rollback` returned `Ok`.
    pub(crate) fn ended(&mut self) {
        self.ended = true;
    }

    /// Ends the transaction with the batch's outcome: an `Ok` batch ended it already (it
    /// committed, or rolled back what it decided not to apply); an `Err` one is rolled back
    /// here.
    pub(crate) async fn end<T>(
        mut self,
        outcome: Result<T, LedgerError>,
    ) -> Result<T, LedgerError> {
        match outcome {
            Ok(value) => {
                assert!(
                    self.ended,
                    "a write transaction's batch ends it before it succeeds"
                );
                Ok(value)
            }
            Err(error) => {
                match self.conn.rollback().await {
                    Ok(()) => self.ended = true,
                    // No transaction left to roll back (the error came from its `BEGIN`), or the
                    // connection is broken: it is closed on drop either way.
                    Err(rollback) => tracing::debug!(error = %rollback,
                        "rollback after a failed batch failed; closing the connection"),
                }
                Err(error)
            }
        }
    }
}

impl<DB: Database> Drop for WriteTx<DB> {
    fn drop(&mut self) {
        if !self.ended {
            self.conn.close_on_drop();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr as _;

    use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};

    use super::*;

    /// A pool of one connection on a fresh file with one table.
    async fn one_connection() -> (tempfile::TempDir, sqlx::SqlitePool) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("tx.db").display());
        let options = SqliteConnectOptions::from_str(&url)
            .unwrap()
            .create_if_missing(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .unwrap();
        sqlx::query("CREATE TABLE t (a INTEGER)")
            .execute(&pool)
            .await
            .unwrap();
        (dir, pool)
    }

    /// The pool's connection begins a transaction (it would fail inside one) and counts the
    /// rows of `t`.
    async fn rows_seen_by_a_new_transaction(pool: &sqlx::SqlitePool) -> i64 {
        let mut tx = WriteTx::acquire(pool).await.unwrap();
        tx.conn().begin().await.unwrap();
        let (rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM t")
            .fetch_one(tx.conn())
            .await
            .unwrap();
        tx.conn().commit().await.unwrap();
        tx.ended();
        tx.end(Ok(rows)).await.unwrap()
    }

    /// A transaction on the pool's connection that inserted one row into `t`.
    async fn one_row_inserted(pool: &sqlx::SqlitePool) -> WriteTx<sqlx::Sqlite> {
        let mut tx = WriteTx::acquire(pool).await.unwrap();
        tx.conn().begin().await.unwrap();
        sqlx::query("INSERT INTO t VALUES (1)")
            .execute(tx.conn())
            .await
            .unwrap();
        tx
    }

    #[tokio::test]
    async fn a_failed_batch_is_rolled_back_and_its_connection_reused() {
        let (_dir, pool) = one_connection().await;
        let tx = one_row_inserted(&pool).await;
        let failed: Result<(), LedgerError> = Err(LedgerError::WriterFailed);
        assert!(tx.end(failed).await.is_err());
        assert_eq!(rows_seen_by_a_new_transaction(&pool).await, 0);
    }

    /// A batch future dropped half-way (cancelled) leaves its connection inside a transaction:
    /// the connection is closed, never handed out again, and what the batch wrote is gone.
    #[tokio::test]
    async fn a_transaction_dropped_before_it_ended_never_returns_to_the_pool() {
        let (_dir, pool) = one_connection().await;
        drop(one_row_inserted(&pool).await);
        assert_eq!(rows_seen_by_a_new_transaction(&pool).await, 0);
    }

    /// The trigger raises for a count other than the expected one, naming the guard, and lets
    /// the expected one through.
    #[tokio::test]
    async fn the_write_guard_raises_its_tag_on_a_wrong_count() {
        let (_dir, pool) = one_connection().await;
        let mut conn = pool.acquire().await.unwrap();
        install_write_guard(&mut conn).await.unwrap();
        let two_rows = format!(
            "INSERT INTO t VALUES (1), (2){}",
            guard_sql(Guard::Reservations, 2)
        );
        sqlx::query(&two_rows).execute(&mut *conn).await.unwrap();
        let three_expected = format!(
            "UPDATE t SET a = a + 1{}",
            guard_sql(Guard::BudgetSettles, 3)
        );
        let error = sqlx::query(&three_expected)
            .execute(&mut *conn)
            .await
            .unwrap_err();
        assert_eq!(Guard::of_error(&error), Some(Guard::BudgetSettles));
        assert!(matches!(
            guarded(error),
            LedgerError::Invariant { what } if what == Guard::BudgetSettles.what()
        ));
    }

    #[test]
    fn every_guard_has_its_own_tag_and_invariant() {
        for (index, guard) in Guard::ALL.into_iter().enumerate() {
            for other in Guard::ALL.into_iter().skip(index.saturating_add(1)) {
                assert_ne!(guard.tag(), other.tag());
                assert_ne!(guard.what(), other.what());
            }
            assert!(
                guard
                    .tag()
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_'),
                "a tag is a plain SQL literal"
            );
        }
    }

    #[test]
    fn a_count_other_than_the_expected_one_is_the_guards_invariant() {
        assert!(Guard::Usage.check(3, 3).is_ok());
        assert!(matches!(
            Guard::Usage.check(2, 3),
            Err(LedgerError::Invariant { what }) if what == Guard::Usage.what()
        ));
    }
}
