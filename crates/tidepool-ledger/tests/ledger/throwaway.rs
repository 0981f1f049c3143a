// The throwaway PostgreSQL of `tidepool_ledger::testing`, which a fresh machine's test run uses
// when no PostgreSQL answers: a private cluster (whatever runs on 5432) carries a real
// reserve → settle workflow; stopped, the ledger's calls fail (within the acquire timeout, not
// sqlx's 30 s) and readiness says the database is unavailable; started again on the same data,
// the same handle works and nothing was lost. The admin-URL resolution takes the variable as
// is, and falls back to the shared cluster when nothing answers at the default address.

use std::time::Duration;

use sqlx::Connection as _;
use tidepool_core::Nanos;
use tidepool_ledger::testing::{ThrowawayPostgres, resolve_postgres_admin_url};
use tidepool_ledger::{Check, Ledger, LedgerError, LedgerOptions};

use crate::billing::fixture;
use crate::common::TestDb;

const CREDIT: Nanos = Nanos(1_000_000_000);
/// Short, so a call on the stopped cluster gives up quickly (not what is tested).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(1);
/// Generous: readiness is not what these tests time.
const READINESS_TIMEOUT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_cluster_runs_a_billing_workflow() {
    let cluster = ThrowawayPostgres::spawn().await;
    assert!(cluster.is_running());
    assert!(cluster.url().starts_with("postgres://postgres@127.0.0.1:"));
    let db = TestDb::postgres_on(cluster.url()).await;
    let f = fixture(db.ledger().await, CREDIT).await;
    assert_eq!(f.ledger.store_kind(), "postgres");
    let reservation = f.ledger.reserve(&f.request(1000, 500)).await.unwrap();
    let settlement = f
        .ledger
        .settle(&f.entry(reservation.request_id, 1000, 100))
        .await
        .unwrap();
    assert!(settlement.cost > Nanos::ZERO);
    let account = f.ledger.account(&f.tenant).await.unwrap();
    assert_eq!(account.balance, Nanos(CREDIT.0 - settlement.cost.0));
    assert_eq!(account.reserved, Nanos::ZERO);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_cluster_fails_calls_and_comes_back_with_its_data() {
    let cluster = ThrowawayPostgres::spawn().await;
    let port = cluster.port();
    let options = LedgerOptions {
        acquire_timeout: Some(ACQUIRE_TIMEOUT),
        ..LedgerOptions::default()
    };
    let ledger = Ledger::connect_with(&cluster.url(), options).await.unwrap();
    let f = fixture(ledger, CREDIT).await;
    let first = f.ledger.reserve(&f.request(10, 10)).await.unwrap();
    let billed = f
        .ledger
        .settle(&f.entry(first.request_id, 10, 10))
        .await
        .unwrap()
        .cost;
    assert!(f.ledger.readiness(READINESS_TIMEOUT).await.is_ready());

    let cluster = cluster.set_running(false).await;
    assert!(!cluster.is_running());
    assert!(sqlx::PgConnection::connect(&cluster.url()).await.is_err());
    let refused = f.ledger.reserve(&f.request(10, 10)).await;
    assert!(
        matches!(refused, Err(LedgerError::Database(_))),
        "{refused:?}"
    );
    let readiness = f.ledger.readiness(READINESS_TIMEOUT).await;
    assert!(!readiness.is_ready());
    assert!(
        matches!(&readiness.database, Check::Failed(reason) if !reason.contains("postgres://")),
        "{readiness:?}"
    );
    assert!(!readiness.schema.is_ok());

    let cluster = cluster.set_running(true).await;
    assert_eq!(cluster.port(), port, "the same address as before");
    assert!(f.ledger.readiness(READINESS_TIMEOUT).await.is_ready());
    let account = f.ledger.account(&f.tenant).await.unwrap();
    assert_eq!(account.balance, Nanos(CREDIT.0 - billed.0), "nothing lost");
    assert_eq!(
        account.reserved,
        Nanos::ZERO,
        "the refused request took nothing"
    );
    let second = f.ledger.reserve(&f.request(10, 10)).await.unwrap();
    f.ledger
        .settle(&f.entry(second.request_id, 10, 10))
        .await
        .unwrap();
    let account = f.ledger.account(&f.tenant).await.unwrap();
    assert_eq!(account.balance, Nanos(CREDIT.0 - 2 * billed.0));
}

/// Calls in flight at once against the stopped cluster, per writer.
const CALLS_IN_FLIGHT: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_cluster_fails_each_batch_of_calls_at_once() {
    let cluster = ThrowawayPostgres::spawn().await;
    let options = LedgerOptions {
        acquire_timeout: Some(ACQUIRE_TIMEOUT),
        ..LedgerOptions::default()
    };
    let ledger = Ledger::connect_with(&cluster.url(), options).await.unwrap();
    let f = fixture(ledger, CREDIT).await;
    let mut open = Vec::new();
    for _ in 0..CALLS_IN_FLIGHT {
        open.push(f.ledger.reserve(&f.request(10, 10)).await.unwrap());
    }
    let held = f.ledger.account(&f.tenant).await.unwrap().reserved;
    assert!(held > Nanos::ZERO);

    let mut cluster = cluster.set_running(false).await;
    // Sent together, so while the writers wait out the first call's acquire timeout the others
    // queue and are drained as one batch per writer.
    let mut tasks = tokio::task::JoinSet::new();
    for reservation in &open {
        let (ledger, request) = (f.ledger.clone(), f.request(10, 10));
        tasks.spawn(async move { ("reserve", ledger.reserve(&request).await.err()) });
        let (ledger, entry) = (f.ledger.clone(), f.entry(reservation.request_id, 10, 10));
        tasks.spawn(async move { ("settle", ledger.settle(&entry).await.err()) });
    }
    let outcomes = tasks.join_all().await;
    for call in ["reserve", "settle"] {
        let errors: Vec<&LedgerError> = outcomes
            .iter()
            .filter(|(which, _)| *which == call)
            .filter_map(|(_, error)| error.as_ref())
            .collect();
        assert_eq!(errors.len(), CALLS_IN_FLIGHT, "every {call} failed");
        assert!(
            errors.iter().all(|e| e.is_unavailable()),
            "{call}: {errors:?}"
        );
        // A batch of several that found the database out of reach failed at once: its callers
        // get `WriterFailed`. Tried one by one instead, each would get its own connection error
        // after its own acquire timeout.
        let failed_at_once = errors
            .iter()
            .filter(|e| matches!(e, LedgerError::WriterFailed))
            .count();
        assert!(failed_at_once >= 2, "{call}: {errors:?}");
    }

    cluster = cluster.set_running(true).await;
    assert!(cluster.is_running());
    assert!(f.ledger.readiness(READINESS_TIMEOUT).await.is_ready());
    let account = f.ledger.account(&f.tenant).await.unwrap();
    assert_eq!(account.balance, CREDIT, "nothing was billed");
    assert_eq!(
        account.reserved, held,
        "the open holds are intact, none added"
    );
    for reservation in &open {
        f.ledger
            .settle(&f.entry(reservation.request_id, 10, 10))
            .await
            .unwrap();
    }
    assert_eq!(
        f.ledger.account(&f.tenant).await.unwrap().reserved,
        Nanos::ZERO
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_url_falls_back_to_the_shared_cluster() {
    let unreachable = "postgres://postgres@127.0.0.1:1/test";
    let configured = "postgres://someone@db.example:5432/tests";
    assert_eq!(
        resolve_postgres_admin_url(Some(configured.to_owned()), unreachable)
            .await
            .unwrap(),
        configured,
        "the variable is taken as is, never probed"
    );
    let url = resolve_postgres_admin_url(None, unreachable).await.unwrap();
    assert_ne!(url, unreachable);
    assert!(url.starts_with("postgres://postgres@127.0.0.1:"), "{url}");
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(one, 1);
    // A second resolution (another test process) reuses the running cluster.
    assert_eq!(
        resolve_postgres_admin_url(None, unreachable).await.unwrap(),
        url
    );
    let db = TestDb::postgres_on(url).await;
    let ledger = db.ledger().await;
    assert!(ledger.readiness(READINESS_TIMEOUT).await.is_ready());
}
