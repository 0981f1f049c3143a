//! The two stores behind one enum. Every query is written once with `$n` placeholders (SQLite
//! accepts them too) and run on either pool through [`on_store!`]; where the dialects differ the
//! code says so next to the SQL.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::LedgerError;

/// How long a SQLite writer waits for the write lock before failing with `SQLITE_BUSY`.
pub(crate) const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections per SQLite pool: readers run in parallel under WAL, writers queue on the lock.
pub(crate) const SQLITE_CONNECTIONS_MAX: u32 = 8;
/// Connections per PostgreSQL pool (per `Ledger` handle, i.e. per replica).
pub(crate) const POSTGRES_CONNECTIONS_MAX: u32 = 10;
/// Opens of a new SQLite file tried while another process turns it into WAL (`SQLITE_BUSY`).
const SQLITE_OPEN_ATTEMPTS_MAX: u32 = 10;
/// The pause between two of those opens.
const SQLITE_OPEN_RETRY_DELAY: Duration = Duration::from_millis(20);
/// SQLite's result code for a lock held by another connection.
const SQLITE_BUSY: &str = "5";
/// Times a transaction is retried after a transient conflict (deadlock, serialization failure,
/// SQLite busy) before the error is returned: the group-commit writers' batches, the audit append
/// and the alert enqueue alike.
const RETRY_ATTEMPTS_MAX: u32 = 3;
/// Runs `attempt`, and runs it again after each transient conflict (deadlock, serialization
/// failure, SQLite busy), at most [`RETRY_ATTEMPTS_MAX`] times more; returns the first outcome
/// that is not such a conflict, or the last one. `what` names the work in the debug log.
pub(crate) async fn retry_transient<T, F, Fut>(
    what: &'static str,
    mut attempt: F,
) -> Result<T, LedgerError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, LedgerError>>,
{
    let mut retries: u32 = 0;
    loop {
        match attempt().await {
            Err(err) if err.is_transient() && retries < RETRY_ATTEMPTS_MAX => {
                retries = retries.saturating_add(1);
                tracing::debug!(retries, what, "retried after a transient conflict");
            }
            outcome => return outcome,
        }
    }
}

/// Applies `len` commands as one batch, `apply(0..len)`, and returns one result per command,
/// in order. A batch that fails as a whole is applied one command at a time (`apply(i..i + 1)`),
/// so one bad command cannot fail its neighbours — unless the database is out of reach: one by
/// one would then wait out the connection timeout once per command, so every command fails at
/// once with [`LedgerError::WriterFailed`] and its caller may retry. The reservation writer and
/// the settle writer both answer their runs this way; `what` names the batch in the logs.
pub(crate) async fn apply_batch_else_one_by_one<T, F, Fut>(
    what: &'static str,
    len: usize,
    mut apply: F,
) -> Vec<Result<T, LedgerError>>
where
    F: FnMut(std::ops::Range<usize>) -> Fut,
    Fut: Future<Output = Result<Vec<Result<T, LedgerError>>, LedgerError>>,
{
    match apply(0..len).await {
        Ok(results) => {
            assert!(results.len() == len, "one result per command");
            results
        }
        Err(err) if len == 1 => vec![Err(err)],
        Err(err) if err.is_unavailable() => {
            tracing::warn!(error = %err, len, "{what} failed: the database is unreachable");
            (0..len).map(|_| Err(LedgerError::WriterFailed)).collect()
        }
        Err(err) => {
            tracing::warn!(error = %err, len, "{what} failed; applying one by one");
            let mut results = Vec::with_capacity(len);
            for index in 0..len {
                results.push(match apply(index..index.saturating_add(1)).await {
                    Ok(mut one) => one.pop().unwrap_or(Err(LedgerError::WriterFailed)),
                    Err(err) => Err(err),
                });
            }
            results
        }
    }
}

/// How long acquiring a pooled SQLite connection may take before the call fails: the file is
/// local, so a wait only means this process's own connections are all busy.
pub(crate) const SQLITE_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long acquiring a pooled PostgreSQL connection may take before the call fails, opening a
/// new one included (sqlx retries a refused connection with back-off until then). With the
/// database down, this is how long a request waits before its 503 `unavailable`: long enough to
/// ride over a restart or fail-over of a second or two and a burst queueing for the pool, short
/// enough that the client gets its 503 and `Retry-After` well before its own or a load
/// balancer's timeout (often 30–60 s). sqlx's default, 30 s, would hold every request that long.
pub const POSTGRES_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
pub(crate) static POSTGRES_MIGRATOR: sqlx::migrate::Migrator =
    sqlx::migrate!("./migrations/postgres");
/// WAL pages (4 KiB each: 256 MiB) at which a SQLite commit checkpoints by itself (SQLite's
/// automatic checkpoint; its default is 1000). Only a safety net: the ledger's background task
/// syncs and checkpoints the WAL off the request path (`checkpoint.rs`).
pub(crate) const WAL_AUTOCHECKPOINT_PAGES: u32 = 65_536;

#[derive(Debug, Clone)]
pub(crate) enum Store {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Runs `$body` with `$pool` bound to whichever pool `$store` holds. The body is compiled once
/// per store, so `sqlx::query(..)` infers the right database each time.
macro_rules! on_store {
    ($store:expr, $pool:ident => $body:expr) => {
        match $store {
            $crate::store::Store::Sqlite($pool) => $body,
            $crate::store::Store::Postgres($pool) => $body,
        }
    };
}
pub(crate) use on_store;

impl Store {
    /// A pool on `url`; `acquire_timeout` overrides the store's default
    /// ([`SQLITE_ACQUIRE_TIMEOUT`], [`POSTGRES_ACQUIRE_TIMEOUT`]).
    pub(crate) async fn connect(
        url: &str,
        acquire_timeout: Option<Duration>,
    ) -> Result<Self, LedgerError> {
        if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                // NORMAL under WAL: a commit is durable against a process crash (kill -9); an OS
                // crash or power loss can lose the commits of the last `WAL_SYNC_INTERVAL`, until
                // the background task syncs the WAL.
                .synchronous(SqliteSynchronous::Normal)
                // Checkpoints run on a background task (`checkpoint.rs`), not in the commit
                // that crossed SQLite's default 1000 pages; this is only the safety net.
                .pragma("wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES.to_string())
                .busy_timeout(SQLITE_BUSY_TIMEOUT)
                .foreign_keys(true);
            let pool_options = SqlitePoolOptions::new()
                .max_connections(SQLITE_CONNECTIONS_MAX)
                // A file connection cannot be dropped by a peer: no ping before each use (sqlx's
                // default), a hop to the connection's thread and back on every query and
                // transaction.
                .test_before_acquire(false)
                // The write guards of the group-commit writers (`write_tx`): a temporary view
                // and trigger of each connection's own.
                .after_connect(|conn, _| Box::pin(crate::write_tx::install_write_guard(conn)))
                .acquire_timeout(acquire_timeout.unwrap_or(SQLITE_ACQUIRE_TIMEOUT));
            // Turning a new file into WAL takes an exclusive lock that the busy timeout does not
            // wait for: another process opening the same new file at that moment gets
            // SQLITE_BUSY. Open again after a pause; the file is in WAL by then.
            let mut attempts = 1;
            loop {
                match pool_options.clone().connect_with(options.clone()).await {
                    Ok(pool) => return Ok(Self::Sqlite(pool)),
                    Err(sqlx::Error::Database(error))
                        if error.code().as_deref() == Some(SQLITE_BUSY)
                            && attempts < SQLITE_OPEN_ATTEMPTS_MAX =>
                    {
                        attempts = attempts.saturating_add(1);
                        tokio::time::sleep(SQLITE_OPEN_RETRY_DELAY).await;
                    }
                    Err(error) => return Err(error.into()),
                }
            }
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let options = PgConnectOptions::from_str(url)?;
            let pool = PgPoolOptions::new()
                .max_connections(POSTGRES_CONNECTIONS_MAX)
                .acquire_timeout(acquire_timeout.unwrap_or(POSTGRES_ACQUIRE_TIMEOUT))
                .connect_with(options)
                .await?;
            Ok(Self::Postgres(pool))
        } else {
            Err(LedgerError::UnsupportedUrl)
        }
    }

    /// Closes the pool's connections (a short-lived store: `tidepool migrate`).
    pub(crate) async fn close(&self) {
        on_store!(self, pool => pool.close().await);
    }

    /// The migrations this binary embeds for this store.
    pub(crate) fn migrator(&self) -> &'static sqlx::migrate::Migrator {
        match self {
            Self::Sqlite(_) => &SQLITE_MIGRATOR,
            Self::Postgres(_) => &POSTGRES_MIGRATOR,
        }
    }

    /// Applies the missing migrations; safe with concurrent migrators (see `crate::schema`).
    pub(crate) async fn migrate(&self) -> Result<(), LedgerError> {
        match self {
            Self::Sqlite(pool) => {
                // No advisory lock on SQLite: a concurrent migrator may win the race to a
                // migration, and this run's transaction rolls back. Run again: it finds the
                // migration applied. Each lost race means another migrator applied one more
                // migration, so a run loses at most once per migration: one attempt more than
                // there are migrations always finishes.
                let attempts_max = SQLITE_MIGRATOR.iter().count().saturating_add(1);
                let mut outcome = Ok(());
                for _ in 0..attempts_max {
                    outcome = SQLITE_MIGRATOR.run(pool).await;
                    if outcome.is_ok() {
                        break;
                    }
                }
                outcome?;
            }
            Self::Postgres(pool) => {
                // sqlx holds a session advisory lock while it migrates and does not release it
                // when a migration fails; closing the connection does, so a failed run never
                // leaves the lock with a pooled connection that other migrators would wait on.
                let mut conn = pool.acquire().await?;
                if let Err(error) = POSTGRES_MIGRATOR.run_direct(&mut *conn).await {
                    conn.close().await?;
                    return Err(error.into());
                }
            }
        }
        Ok(())
    }

    /// Opens a write transaction. SQLite: `BEGIN IMMEDIATE` takes the write lock up front, so a
    /// transaction never fails half-way upgrading a read lock; PostgreSQL: row locks as it goes.
    pub(crate) fn begin_write_sql(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => crate::write_tx::SQLITE_BEGIN_WRITE,
            Self::Postgres(_) => "BEGIN",
        }
    }

    /// Opens a read transaction that sees one snapshot throughout.
    pub(crate) fn begin_snapshot_sql(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "BEGIN",
            Self::Postgres(_) => "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
        }
    }

    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite",
            Self::Postgres(_) => "postgres",
        }
    }
}

/// Serialises this process's SQLite write transactions on an async mutex, so they queue in
/// order instead of spinning in SQLite's busy handler (which sleeps up to 100 ms per retry).
/// Other processes (or other handles) on the same file still meet the busy timeout. PostgreSQL
/// needs no gate: row locks queue writers on the rows they share, and only there.
#[derive(Debug, Clone, Default)]
pub(crate) struct WriteGate(Option<std::sync::Arc<tokio::sync::Mutex<()>>>);

impl WriteGate {
    pub(crate) fn for_store(store: &Store) -> Self {
        match store {
            Store::Sqlite(_) => Self(Some(std::sync::Arc::new(tokio::sync::Mutex::new(())))),
            Store::Postgres(_) => Self(None),
        }
    }

    /// Holds the gate (if any) until the guard drops; take it before `begin_write_sql`.
    pub(crate) async fn enter(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match &self.0 {
            Some(gate) => Some(gate.lock().await),
            None => None,
        }
    }
}

/// A token count or other non-negative quantity as a BIGINT.
pub(crate) fn to_i64(value: u64, field: &'static str) -> Result<i64, LedgerError> {
    i64::try_from(value).map_err(|_| LedgerError::OutOfRange { field })
}

/// A BIGINT read back as a non-negative quantity.
pub(crate) fn to_u64(value: i64, what: &'static str) -> Result<u64, LedgerError> {
    u64::try_from(value).map_err(|_| LedgerError::Corrupt { what })
}

/// A BIGINT read back as a token count.
pub(crate) fn to_tokens(value: i64, what: &'static str) -> Result<u32, LedgerError> {
    u32::try_from(value).map_err(|_| LedgerError::Corrupt { what })
}
