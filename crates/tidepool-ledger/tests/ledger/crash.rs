// Crash test: a child process (this test binary, re-executed to run `crash::child`) reserves
// 200 requests concurrently, checkpoints some, settles some, and is killed with SIGKILL while
// that is in flight. A new process with the same replica id then runs `recover()`. Whatever the
// kill interrupted, the ledger must come back consistent: no open reservation, every reservation
// with exactly one usage entry, `balance = credits − Σ billed costs`, statement reconciled, the
// daily rollup equal to the entries.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;

use sqlx::Connection;
use tidepool_core::{KeyId, ModelId, Nanos, RequestId};
use tidepool_ledger::{
    Clock, Ledger, LedgerOptions, Month, ReserveRequest, SystemClock, UsageEntry, UsageStatus,
};

use crate::billing::{MODEL, fixture};
use crate::both_stores;
use crate::common::{Kind, T0_MS, TestDb};

const CHILD_URL: &str = "TIDEPOOL_CRASH_CHILD_URL";
const CHILD_KEY: &str = "TIDEPOOL_CRASH_CHILD_KEY";
const READY: &str = "CRASH-CHILD-READY";
const REQUESTS: usize = 200;

/// The child's body; a no-op unless run by `kill_9_mid_flight`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child() {
    let (Ok(url), Ok(key)) = (std::env::var(CHILD_URL), std::env::var(CHILD_KEY)) else {
        return;
    };
    let options = LedgerOptions {
        replica_id: "crashy".to_owned(),
        ..LedgerOptions::default()
    };
    let ledger = Ledger::connect_with(&url, options).await.unwrap();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(REQUESTS);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..REQUESTS {
        let (ledger, key, ready_tx) = (ledger.clone(), key.clone(), ready_tx.clone());
        tasks.spawn(async move {
            let request = ReserveRequest {
                request_id: RequestId::new(),
                key_id: KeyId(key.clone()),
                model: ModelId::new(MODEL).unwrap(),
                prompt_tokens: 100,
                completion_tokens_max: 100,
                idempotency_key: None,
                class: tidepool_ledger::ReserveClass::Online,
            };
            let reservation = ledger.reserve(&request).await.unwrap();
            ready_tx.send(()).await.unwrap();
            match i % 3 {
                0 => {
                    let entry = UsageEntry {
                        request_id: request.request_id,
                        tenant: reservation.tenant,
                        key_id: KeyId(key),
                        model: Some(request.model),
                        endpoint: "chat.completions".to_owned(),
                        prompt_tokens: 100,
                        completion_tokens: 60,
                        cached_prompt_tokens: 0,
                        cached_prompt_tokens_unknown: false,
                        status: UsageStatus::Ok,
                        latency_ms: 1,
                        created_at_ms: 0,
                    };
                    ledger.settle(&entry).await.unwrap();
                }
                1 => ledger.checkpoint(request.request_id, 20).await.unwrap(),
                _ => {}
            }
        });
    }
    for _ in 0..REQUESTS / 2 {
        ready_rx.recv().await.unwrap();
    }
    println!("{READY}");
    tasks.join_all().await;
    // Stay alive until killed, holding everything that is still open.
    std::future::pending::<()>().await;
}

async fn count(db: &TestDb, sql: &'static str) -> i64 {
    match db.kind {
        Kind::Sqlite => {
            let mut c = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
            sqlx::query_scalar(sql).fetch_one(&mut c).await.unwrap()
        }
        Kind::Postgres => {
            let mut c = sqlx::PgConnection::connect(&db.url).await.unwrap();
            sqlx::query_scalar(sql).fetch_one(&mut c).await.unwrap()
        }
    }
}

async fn kill_9_mid_flight(db: Arc<TestDb>) {
    let credit = Nanos(1_000_000_000);
    let f = fixture(db.ledger().await, credit).await;
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["crash::child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_URL, &db.url)
        .env(CHILD_KEY, &f.key_id.0)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let ready = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|line| line.contains(READY))
    })
    .await
    .unwrap();
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(ready, "the child reached the point of the crash");

    // The child ran on the system clock; so does its restarted self.
    let options = LedgerOptions {
        replica_id: "crashy".to_owned(),
        ..LedgerOptions::default()
    };
    let restarted = Ledger::connect_with(&db.url, options).await.unwrap();
    let report = restarted.recover().await.unwrap();
    println!("{:?}: recovered {report:?}", db.kind);

    let reservations = count(&db, "SELECT COUNT(*) FROM reservations").await;
    assert!(reservations >= i64::try_from(REQUESTS / 2).unwrap());
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM reservations WHERE state = 'open'"
        )
        .await,
        0
    );
    let joined = count(
        &db,
        "SELECT COUNT(*) FROM reservations r JOIN usage_entries u ON u.request_id = r.request_id",
    )
    .await;
    assert_eq!(
        joined, reservations,
        "every reservation has exactly one usage entry"
    );
    let billed = count(
        &db,
        "SELECT CAST(COALESCE(SUM(cost_nanos), 0) AS BIGINT) FROM usage_entries",
    )
    .await;
    let account = restarted.account(&f.tenant).await.unwrap();
    assert_eq!(account.reserved, Nanos::ZERO);
    assert_eq!(account.balance.0, credit.0 - billed);
    // The fixture's credit is dated T0 by the test clock, the child's usage by the system clock:
    // the later of the two months closes at the balance.
    let month = Month::of_ms(T0_MS.max(SystemClock.now_ms()));
    let statement = restarted.statement(&f.tenant, month).await.unwrap();
    assert_eq!(statement.closing_balance, account.balance);
    // A second recovery finds nothing left.
    assert_eq!(
        restarted.recover().await.unwrap(),
        tidepool_ledger::RecoveryReport::default()
    );
    // Whatever the kill cut short, the daily rollup holds exactly the entries that committed.
    crate::rollups::assert_rollup_exact(&db).await;
}
both_stores!(kill_9_mid_flight_on, kill_9_mid_flight);
