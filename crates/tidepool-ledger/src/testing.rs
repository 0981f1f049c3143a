//! Test support for crates that test against the ledger (`feature = "test-util"`): every
//! behaviour runs on SQLite (a fresh file in a tempdir) and on PostgreSQL (a fresh `tp_<uuid>`
//! database, dropped afterwards, even when the test fails).
//!
//! Which PostgreSQL ([`postgres_admin_url`]): `TIDEPOOL_TEST_POSTGRES_URL` if set (used as is:
//! an unreachable server fails the test, it is never skipped); else the local trust-auth server
//! of dev and CI machines at [`DEFAULT_POSTGRES_URL`] if it accepts a connection; else a
//! throwaway cluster this machine starts for itself ([`postgres::shared_cluster_url`]), shared by
//! every test process of the run, so a fresh machine with Debian's `postgresql` package
//! installed and no server running passes the PostgreSQL tests too. `scripts/test-postgres.sh
//! stop` (the end of `make rust-test`) stops that cluster. [`ThrowawayPostgres`] gives a test a
//! private cluster it can stop and start.
#![expect(
    clippy::unwrap_used,
    clippy::panic,
    reason = "test support: a failed set-up fails the test loudly"
)]

pub mod postgres;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

pub use postgres::ThrowawayPostgres;
use sqlx::{Connection, PgConnection, QueryBuilder};

use crate::{Clock, Ledger};

/// The local PostgreSQL of dev and CI machines, tried when `TIDEPOOL_TEST_POSTGRES_URL` is unset.
pub const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
/// The variable naming the PostgreSQL the tests use (admin URL; databases are created on it).
pub const POSTGRES_URL_VAR: &str = "TIDEPOOL_TEST_POSTGRES_URL";
/// How long the probe of [`DEFAULT_POSTGRES_URL`] may take before the throwaway cluster is used.
const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// 2026-11-15T00:00:00Z, mid-month so tests can step across month boundaries on purpose.
pub const T0_MS: i64 = 1_794_700_800_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sqlite,
    Postgres,
}

/// A clock tests move by hand.
#[derive(Debug)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn new(now_ms: i64) -> Arc<Self> {
        Arc::new(Self(AtomicI64::new(now_ms)))
    }
    pub fn advance(&self, delta_ms: i64) {
        self.0.fetch_add(delta_ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// One fresh database for one test.
#[derive(Debug)]
pub struct TestDb {
    pub kind: Kind,
    pub url: String,
    pub clock: Arc<ManualClock>,
    admin_url: String,
    pg_name: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

/// Where the PostgreSQL tests of this process run (resolved once per process, see the module
/// docs). Panics with what to install when there is no PostgreSQL at all.
pub async fn postgres_admin_url() -> String {
    static ADMIN_URL: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    ADMIN_URL
        .get_or_init(|| async {
            let configured = std::env::var(POSTGRES_URL_VAR).ok();
            resolve_postgres_admin_url(configured, DEFAULT_POSTGRES_URL)
                .await
                .unwrap_or_else(|error| {
                    panic!(
                        "no PostgreSQL for the tests: {POSTGRES_URL_VAR} is unset, nothing \
                         answers at {DEFAULT_POSTGRES_URL}, and a throwaway cluster could not \
                         start: {error}"
                    )
                })
        })
        .await
        .clone()
}

/// The resolution rule of [`postgres_admin_url`], with the variable's value and the default
/// passed in: `configured` as is; else `default_url` if it accepts a connection within a few
/// seconds; else the shared throwaway cluster's URL (started if needed).
pub async fn resolve_postgres_admin_url(
    configured: Option<String>,
    default_url: &str,
) -> std::io::Result<String> {
    if let Some(url) = configured {
        return Ok(url);
    }
    if let Ok(Ok(conn)) =
        tokio::time::timeout(DEFAULT_PROBE_TIMEOUT, PgConnection::connect(default_url)).await
    {
        drop(conn.close().await);
        return Ok(default_url.to_owned());
    }
    tokio::task::spawn_blocking(postgres::shared_cluster_url)
        .await
        .map_err(std::io::Error::other)?
}

impl TestDb {
    pub async fn new(kind: Kind) -> Self {
        match kind {
            Kind::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
                Self {
                    kind,
                    url,
                    clock: ManualClock::new(T0_MS),
                    admin_url: String::new(),
                    pg_name: None,
                    _dir: Some(dir),
                }
            }
            Kind::Postgres => Self::postgres_on(postgres_admin_url().await).await,
        }
    }

    /// A fresh database on the PostgreSQL server of `admin_url` (a superuser's URL; the
    /// database is created next to the one it names).
    pub async fn postgres_on(admin_url: String) -> Self {
        let name = format!("tp_{}", uuid::Uuid::now_v7().simple());
        assert!(
            name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
            "safe identifier"
        );
        let mut conn = PgConnection::connect(&admin_url)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {admin_url} is required: {e}"));
        // Identifiers cannot be bound; `name` is generated above and checked.
        QueryBuilder::<sqlx::Postgres>::new("CREATE DATABASE ")
            .push(&name)
            .build()
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
        let (base, _) = admin_url.rsplit_once('/').unwrap();
        let url = format!("{base}/{name}");
        Self {
            kind: Kind::Postgres,
            url,
            clock: ManualClock::new(T0_MS),
            admin_url,
            pg_name: Some(name),
            _dir: None,
        }
    }

    /// A new ledger handle on this database: call twice for two replicas.
    pub async fn ledger(&self) -> Ledger {
        Ledger::connect_with_clock(&self.url, self.clock.clone())
            .await
            .unwrap()
    }

    async fn drop_database(&self) {
        if let Some(name) = &self.pg_name {
            let mut conn = PgConnection::connect(&self.admin_url).await.unwrap();
            QueryBuilder::<sqlx::Postgres>::new("DROP DATABASE IF EXISTS ")
                .push(name)
                .push(" WITH (FORCE)")
                .build()
                .execute(&mut conn)
                .await
                .unwrap();
            conn.close().await.unwrap();
        }
    }
}

/// Runs `body` against a fresh database of `kind`, then drops it, then re-raises any failure.
pub async fn run<F, Fut>(kind: Kind, body: F)
where
    F: FnOnce(Arc<TestDb>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let db = Arc::new(TestDb::new(kind).await);
    let outcome = tokio::spawn(body(db.clone())).await;
    db.drop_database().await;
    if let Err(err) = outcome {
        std::panic::resume_unwind(err.into_panic());
    }
}
