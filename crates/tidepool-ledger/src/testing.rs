//! Test support for crates that test against the ledger (`feature = "test-util"`): every
//! behaviour runs on SQLite (a fresh file in a tempdir) and on PostgreSQL (a fresh `tp_<uuid>`
//! database, dropped afterwards, even when the test fails). `TIDEPOOL_TEST_POSTGRES_URL` points
//! at the server (default: the local trust-auth PostgreSQL of dev and CI machines); an
//! unreachable PostgreSQL fails the test, it is never skipped silently.
#![expect(
    clippy::unwrap_used,
    clippy::panic,
    reason = "test support: a failed set-up fails the test loudly"
)]

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use crate::{Clock, Ledger};
use sqlx::{Connection, PgConnection, QueryBuilder};

pub const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

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

fn postgres_admin_url() -> String {
    std::env::var("TIDEPOOL_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_POSTGRES_URL.to_owned())
}

impl TestDb {
    pub async fn new(kind: Kind) -> Self {
        let clock = ManualClock::new(T0_MS);
        match kind {
            Kind::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
                Self {
                    kind,
                    url,
                    clock,
                    admin_url: String::new(),
                    pg_name: None,
                    _dir: Some(dir),
                }
            }
            Kind::Postgres => {
                let admin_url = postgres_admin_url();
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
                    kind,
                    url,
                    clock,
                    admin_url,
                    pg_name: Some(name),
                    _dir: None,
                }
            }
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
