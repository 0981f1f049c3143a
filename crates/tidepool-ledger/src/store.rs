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
/// Times a transaction is retried after a transient conflict (deadlock, serialization failure,
/// SQLite busy) before the error is returned.
pub(crate) const RETRY_ATTEMPTS_MAX: u32 = 3;
/// WAL pages (4 KiB each: 256 MiB) at which a SQLite commit checkpoints by itself (SQLite's
/// automatic checkpoint; its default is 1000). Only a safety net: the ledger's background task
/// syncs and checkpoints the WAL off the request path (`checkpoint.rs`).
pub(crate) const WAL_AUTOCHECKPOINT_PAGES: u32 = 65_536;
/// How long acquiring a pooled connection may take before the call fails.
pub(crate) const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);

static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

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
    pub(crate) async fn connect(url: &str) -> Result<Self, LedgerError> {
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
            let pool = SqlitePoolOptions::new()
                .max_connections(SQLITE_CONNECTIONS_MAX)
                .acquire_timeout(ACQUIRE_TIMEOUT)
                .connect_with(options)
                .await?;
            Ok(Self::Sqlite(pool))
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let options = PgConnectOptions::from_str(url)?;
            let pool = PgPoolOptions::new()
                .max_connections(POSTGRES_CONNECTIONS_MAX)
                .acquire_timeout(ACQUIRE_TIMEOUT)
                .connect_with(options)
                .await?;
            Ok(Self::Postgres(pool))
        } else {
            Err(LedgerError::UnsupportedUrl)
        }
    }

    pub(crate) async fn migrate(&self) -> Result<(), LedgerError> {
        match self {
            Self::Sqlite(pool) => SQLITE_MIGRATOR.run(pool).await?,
            Self::Postgres(pool) => POSTGRES_MIGRATOR.run(pool).await?,
        }
        Ok(())
    }

    /// Opens a write transaction. SQLite: `BEGIN IMMEDIATE` takes the write lock up front, so a
    /// transaction never fails half-way upgrading a read lock; PostgreSQL: row locks as it goes.
    pub(crate) fn begin_write_sql(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "BEGIN IMMEDIATE",
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
