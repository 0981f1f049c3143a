//! The schema's version and the database's readiness. The migrations this binary embeds
//! (`migrations/{sqlite,postgres}`) are compared with what sqlx recorded in `_sqlx_migrations`:
//! [`schema_status`] (`tidepool migrate --check`), [`migrate`] (`tidepool migrate`, and
//! [`crate::Ledger::connect`] unless `LedgerOptions::migrate` is off) and
//! [`crate::Ledger::readiness`] (`GET /readyz`).
//!
//! Concurrent migrators are safe. On PostgreSQL sqlx's migrator holds a session advisory lock
//! (`pg_advisory_lock`, keyed by the database's name) from before it creates `_sqlx_migrations`
//! until every migration is applied, so N processes starting at once apply each migration once
//! and the others find it applied; each migration runs in a transaction with its bookkeeping
//! row. SQLite has no such lock (sqlx's is a no-op there): two processes migrating one fresh file
//! can race to the same migration, the loser's transaction rolls back, and it runs again and
//! finds the migration applied.

use std::fmt;
use std::str::FromStr as _;
use std::sync::Arc;
use std::time::Duration;

use sqlx::Connection as _;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::sqlite::SqlitePool;

use crate::store::{POSTGRES_MIGRATOR, SQLITE_MIGRATOR, Store};
use crate::{Ledger, LedgerError};

/// One migration of this binary: its version (the file name's timestamp) and description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationId {
    pub version: i64,
    pub description: String,
}

impl fmt::Display for MigrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.version, self.description)
    }
}

/// Which of this binary's migrations a database has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaStatus {
    /// Every migration this binary embeds, oldest first.
    pub known: Vec<MigrationId>,
    /// Embedded migrations the database does not have.
    pub missing: Vec<MigrationId>,
    /// Applied with another checksum than this binary's: the migration's file was edited after
    /// it ran.
    pub changed: Vec<MigrationId>,
    /// Started but never finished (sqlx records `success = false`); needs an operator.
    pub failed: Vec<i64>,
    /// Applied versions this binary does not know: a newer binary migrated this database.
    pub newer: Vec<i64>,
}

impl SchemaStatus {
    /// Every migration this binary knows is applied, unchanged and finished (newer ones are
    /// fine: a migration only ever adds what older binaries can ignore).
    pub fn is_current(&self) -> bool {
        self.missing.is_empty() && self.changed.is_empty() && self.failed.is_empty()
    }
}

/// `current (2 migrations)`, or what is wrong: `behind: missing 20261123000002 (billing)`.
impl fmt::Display for SchemaStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_current() {
            return write!(f, "current ({} migrations)", self.known.len());
        }
        let list = |items: &[MigrationId]| {
            items
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut problems = Vec::new();
        if !self.missing.is_empty() {
            problems.push(format!("behind: missing {}", list(&self.missing)));
        }
        if !self.changed.is_empty() {
            problems.push(format!(
                "applied with another checksum than this binary's: {}",
                list(&self.changed)
            ));
        }
        if !self.failed.is_empty() {
            let versions: Vec<String> = self.failed.iter().map(ToString::to_string).collect();
            problems.push(format!("failed part-way: {}", versions.join(", ")));
        }
        f.write_str(&problems.join("; "))
    }
}

/// What [`migrate`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateReport {
    /// The migrations that were missing before the run (applied by it, or by a concurrent run).
    pub applied: Vec<MigrationId>,
    /// The schema afterwards.
    pub status: SchemaStatus,
}

/// The database's schema against this binary's migrations, without changing anything.
pub async fn schema_status(database_url: &str) -> Result<SchemaStatus, LedgerError> {
    let store = Store::connect(database_url, None).await?;
    let status = store.schema_status().await;
    store.close().await;
    Ok(status?)
}

/// Applies this binary's missing migrations (safe to run from several processes at once, see
/// the module docs) and reports what was missing.
pub async fn migrate(database_url: &str) -> Result<MigrateReport, LedgerError> {
    let store = Store::connect(database_url, None).await?;
    let report = async {
        let before = store.schema_status().await?;
        store.migrate().await?;
        let status = store.schema_status().await?;
        Ok::<_, LedgerError>(MigrateReport {
            applied: before.missing,
            status,
        })
    }
    .await;
    store.close().await;
    report
}

/// One readiness check: passed, or why not (no secrets, no SQL text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    Ok,
    Failed(String),
}

impl Check {
    pub fn is_ok(&self) -> bool {
        matches!(self, Self::Ok)
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ok => f.write_str("ok"),
            Self::Failed(reason) => f.write_str(reason),
        }
    }
}

/// Whether this handle's database can serve requests now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    /// The database answered a trivial query in time.
    pub database: Check,
    /// Every migration this binary embeds is applied ([`SchemaStatus::is_current`]).
    pub schema: Check,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.database.is_ok() && self.schema.is_ok()
    }
}

impl Ledger {
    /// This handle's schema against this binary's migrations.
    pub async fn schema_status(&self) -> Result<SchemaStatus, LedgerError> {
        Ok(self.store.schema_status().await?)
    }

    /// Checks, within `timeout` in all, that the database answers `SELECT 1` and that its
    /// schema is current. PostgreSQL is asked on a connection of its own, kept between checks
    /// and opened again (one attempt) after a failure: a pool busy with requests does not make
    /// a healthy database look down, and a refused connection is reported as such at once
    /// instead of being retried until the pool's acquire timeout.
    pub async fn readiness(&self, timeout: Duration) -> Readiness {
        match tokio::time::timeout(timeout, self.probe.check()).await {
            Ok(readiness) => readiness,
            Err(_elapsed) => {
                self.probe.forget_connection();
                Readiness {
                    database: Check::Failed(format!("no answer within {} ms", timeout.as_millis())),
                    schema: Check::Failed(NOT_CHECKED.to_owned()),
                }
            }
        }
    }
}

/// The schema check's reason when the database check failed.
const NOT_CHECKED: &str = "not checked: the database is unavailable";

/// What readiness checks ask (see [`Ledger::readiness`]).
#[derive(Debug, Clone)]
pub(crate) enum Probe {
    /// The store's own pool: the file is local.
    Sqlite(SqlitePool),
    Postgres {
        options: Arc<PgConnectOptions>,
        /// The probe's connection, `None` until opened and after a failure.
        conn: Arc<tokio::sync::Mutex<Option<PgConnection>>>,
    },
}

impl Probe {
    pub(crate) fn for_store(store: &Store, url: &str) -> Result<Self, LedgerError> {
        match store {
            Store::Sqlite(pool) => Ok(Self::Sqlite(pool.clone())),
            Store::Postgres(_) => Ok(Self::Postgres {
                options: Arc::new(PgConnectOptions::from_str(url)?),
                conn: Arc::new(tokio::sync::Mutex::new(None)),
            }),
        }
    }

    /// After a timed-out check: its connection may have been left mid-query, so the next check
    /// opens a new one. (A concurrent check holding the lock decides for itself.)
    fn forget_connection(&self) {
        if let Self::Postgres { conn, .. } = self
            && let Ok(mut slot) = conn.try_lock()
        {
            *slot = None;
        }
    }

    async fn check(&self) -> Readiness {
        let checked = match self {
            Self::Sqlite(pool) => Self::check_sqlite(pool).await,
            Self::Postgres { options, conn } => {
                let mut slot = conn.lock().await;
                let checked = Self::check_postgres(options, &mut slot).await;
                if checked.is_err() {
                    // Whatever failed, the next check starts from a new connection.
                    *slot = None;
                }
                checked
            }
        };
        match checked {
            Ok(status) if status.is_current() => Readiness {
                database: Check::Ok,
                schema: Check::Ok,
            },
            Ok(status) => Readiness {
                database: Check::Ok,
                schema: Check::Failed(status.to_string()),
            },
            Err(Failure::Database(error)) => Readiness {
                database: Check::Failed(reason(&error)),
                schema: Check::Failed(NOT_CHECKED.to_owned()),
            },
            Err(Failure::Schema(error)) => Readiness {
                database: Check::Ok,
                schema: Check::Failed(reason(&error)),
            },
        }
    }

    async fn check_sqlite(pool: &SqlitePool) -> Result<SchemaStatus, Failure> {
        sqlx::query("SELECT 1")
            .execute(pool)
            .await
            .map_err(Failure::Database)?;
        let applied = sqlite_applied(pool).await.map_err(Failure::Schema)?;
        Ok(status_of(&SQLITE_MIGRATOR, &applied))
    }

    async fn check_postgres(
        options: &PgConnectOptions,
        slot: &mut Option<PgConnection>,
    ) -> Result<SchemaStatus, Failure> {
        let conn = match slot {
            Some(conn) => conn,
            None => slot.insert(
                PgConnection::connect_with(options)
                    .await
                    .map_err(Failure::Database)?,
            ),
        };
        sqlx::query("SELECT 1")
            .execute(&mut *conn)
            .await
            .map_err(Failure::Database)?;
        let applied = postgres_applied(conn).await.map_err(Failure::Schema)?;
        Ok(status_of(&POSTGRES_MIGRATOR, &applied))
    }
}

/// Which readiness step failed.
enum Failure {
    Database(sqlx::Error),
    Schema(sqlx::Error),
}

/// Why a check failed, in words safe to show anyone: the error's class, never a host, a user,
/// a password or SQL. (`sqlx::Error` is `non_exhaustive`, hence the last arm.)
fn reason(error: &sqlx::Error) -> String {
    match error {
        sqlx::Error::Io(error) => format!("i/o error: {}", error.kind()),
        sqlx::Error::PoolTimedOut => "no connection within the acquire timeout".to_owned(),
        sqlx::Error::PoolClosed => "the connection pool is closed".to_owned(),
        sqlx::Error::Database(error) => match error.code() {
            Some(code) => format!("database error (SQLSTATE {code})"),
            None => "database error".to_owned(),
        },
        sqlx::Error::Tls(_) => "TLS error".to_owned(),
        sqlx::Error::Protocol(_) => "protocol error".to_owned(),
        sqlx::Error::Configuration(_) => "configuration error".to_owned(),
        _ => "database driver error".to_owned(),
    }
}

/// `(version, success, checksum)` of one row of `_sqlx_migrations`.
type Applied = (i64, bool, Vec<u8>);

/// The rows of `_sqlx_migrations`; none when the table does not exist yet.
async fn sqlite_applied(pool: &SqlitePool) -> Result<Vec<Applied>, sqlx::Error> {
    let exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master \
         WHERE type = 'table' AND name = '_sqlx_migrations')",
    )
    .fetch_one(pool)
    .await?;
    if !exists {
        return Ok(Vec::new());
    }
    sqlx::query_as("SELECT version, success, checksum FROM _sqlx_migrations ORDER BY version")
        .fetch_all(pool)
        .await
}

/// The rows of `_sqlx_migrations` (in the connection's schema); none when it does not exist.
async fn postgres_applied(conn: &mut PgConnection) -> Result<Vec<Applied>, sqlx::Error> {
    let exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM information_schema.tables \
         WHERE table_schema = current_schema() AND table_name = '_sqlx_migrations')",
    )
    .fetch_one(&mut *conn)
    .await?;
    if !exists {
        return Ok(Vec::new());
    }
    sqlx::query_as("SELECT version, success, checksum FROM _sqlx_migrations ORDER BY version")
        .fetch_all(&mut *conn)
        .await
}

/// The applied rows against `migrator`'s (up) migrations.
fn status_of(migrator: &Migrator, applied: &[Applied]) -> SchemaStatus {
    let known: Vec<MigrationId> = migrator
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .map(|m| MigrationId {
            version: m.version,
            description: m.description.to_string(),
        })
        .collect();
    let mut status = SchemaStatus {
        known: known.clone(),
        missing: Vec::new(),
        changed: Vec::new(),
        failed: Vec::new(),
        newer: Vec::new(),
    };
    for migration in migrator
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
    {
        let id = MigrationId {
            version: migration.version,
            description: migration.description.to_string(),
        };
        match applied.iter().find(|row| row.0 == migration.version) {
            None => status.missing.push(id),
            Some((_, true, checksum)) if checksum.as_slice() != &*migration.checksum => {
                status.changed.push(id);
            }
            Some(_) => {}
        }
    }
    status.failed = applied
        .iter()
        .filter(|(_, success, _)| !success)
        .map(|(version, _, _)| *version)
        .collect();
    status.newer = applied
        .iter()
        .map(|(version, _, _)| *version)
        .filter(|version| !known.iter().any(|m| m.version == *version))
        .collect();
    status
}

impl Store {
    pub(crate) async fn schema_status(&self) -> Result<SchemaStatus, sqlx::Error> {
        let applied = match self {
            Self::Sqlite(pool) => sqlite_applied(pool).await?,
            Self::Postgres(pool) => postgres_applied(&mut *pool.acquire().await?).await?,
        };
        Ok(status_of(self.migrator(), &applied))
    }
}
