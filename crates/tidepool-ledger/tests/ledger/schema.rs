// Schema versions and migrations on both stores: eight `Ledger::connect`s at once on one fresh
// database all succeed and record each migration once (PostgreSQL: sqlx's advisory lock; SQLite:
// a lost race runs again); a handle that does not migrate sees the schema behind and says so in
// its readiness, `migrate` brings it current and a second run applies nothing; an edited or
// half-applied migration is reported, not taken for current.

use std::sync::Arc;
use std::time::Duration;

use sqlx::Connection as _;
use tidepool_core::{Currency, TenantId};
use tidepool_ledger::{AuditContext, Check, Ledger, LedgerError, LedgerOptions};

use crate::both_stores;
use crate::common::{Kind, TestDb};

/// Concurrent connects (each migrating) on one fresh database.
const CONNECTS: usize = 8;
/// Generous: readiness is not what these tests time.
const READINESS_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `sql` on the test database; `{bytes}` stands for a one-byte blob literal.
async fn execute(db: &TestDb, sql: &str) {
    match db.kind {
        Kind::Sqlite => {
            let sql = sql.replace("{bytes}", "X'00'");
            let mut c = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
            sqlx::query(&sql).execute(&mut c).await.unwrap();
        }
        Kind::Postgres => {
            let sql = sql.replace("{bytes}", "'\\x00'::bytea");
            let mut c = sqlx::PgConnection::connect(&db.url).await.unwrap();
            sqlx::query(&sql).execute(&mut c).await.unwrap();
        }
    }
}

async fn migration_rows(db: &TestDb) -> i64 {
    let sql = "SELECT COUNT(*) FROM _sqlx_migrations";
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

fn without_migrations() -> LedgerOptions {
    LedgerOptions {
        migrate: false,
        ..LedgerOptions::default()
    }
}

async fn concurrent_connects_migrate_once(db: Arc<TestDb>) {
    let mut connects = tokio::task::JoinSet::new();
    for _ in 0..CONNECTS {
        let url = db.url.clone();
        connects.spawn(async move { Ledger::connect(&url).await });
    }
    let ledgers: Vec<Ledger> = connects
        .join_all()
        .await
        .into_iter()
        .map(|connected| connected.expect("every concurrent connect succeeds"))
        .collect();
    assert_eq!(ledgers.len(), CONNECTS);
    let status = ledgers[0].schema_status().await.unwrap();
    assert!(status.is_current(), "{status}");
    assert!(status.newer.is_empty(), "{status:?}");
    assert!(!status.known.is_empty(), "the binary embeds migrations");
    assert_eq!(
        migration_rows(&db).await,
        i64::try_from(status.known.len()).unwrap(),
        "each migration recorded exactly once"
    );
    // Every handle works on the schema.
    for (index, ledger) in ledgers.iter().enumerate() {
        let tenant = TenantId::new(format!("t{index}")).unwrap();
        ledger
            .create_tenant(&tenant, Currency::USD, &AuditContext::ADMIN)
            .await
            .unwrap();
    }
}
both_stores!(concurrent_connects, concurrent_connects_migrate_once);

async fn unmigrated_schema_is_behind_until_migrate(db: Arc<TestDb>) {
    let ledger = Ledger::connect_with(&db.url, without_migrations())
        .await
        .unwrap();
    let status = ledger.schema_status().await.unwrap();
    assert!(!status.is_current(), "{status}");
    assert_eq!(status.missing, status.known, "nothing is applied");
    let text = status.to_string();
    assert!(text.starts_with("behind: missing "), "{text}");
    for migration in &status.known {
        assert!(text.contains(&migration.version.to_string()), "{text}");
    }
    assert_eq!(
        tidepool_ledger::schema_status(&db.url).await.unwrap(),
        status
    );

    let readiness = ledger.readiness(READINESS_TIMEOUT).await;
    assert_eq!(readiness.database, Check::Ok);
    assert!(
        matches!(&readiness.schema, Check::Failed(reason) if reason.contains("behind")),
        "{readiness:?}"
    );
    assert!(!readiness.is_ready());
    // What needs the schema fails with a database error; nothing was created.
    let acme = TenantId::new("acme").unwrap();
    assert!(matches!(
        ledger.account(&acme).await,
        Err(LedgerError::Database(_))
    ));

    let report = tidepool_ledger::migrate(&db.url).await.unwrap();
    assert_eq!(report.applied, status.known);
    assert!(report.status.is_current(), "{}", report.status);
    let readiness = ledger.readiness(READINESS_TIMEOUT).await;
    assert!(readiness.is_ready(), "{readiness:?}");
    // The handle made before the migration works now.
    ledger
        .create_tenant(&acme, Currency::USD, &AuditContext::ADMIN)
        .await
        .unwrap();

    let again = tidepool_ledger::migrate(&db.url).await.unwrap();
    assert!(again.applied.is_empty(), "{again:?}");
    assert!(again.status.is_current());
}
both_stores!(unmigrated_schema, unmigrated_schema_is_behind_until_migrate);

async fn edited_or_failed_migrations_are_not_current(db: Arc<TestDb>) {
    let ledger = db.ledger().await;
    let status = ledger.schema_status().await.unwrap();
    assert!(status.is_current(), "{status}");
    let first = status.known[0].version;
    let last = status.known.last().unwrap().version;
    assert!(first < last, "at least two migrations");

    execute(
        &db,
        &format!("UPDATE _sqlx_migrations SET checksum = {{bytes}} WHERE version = {first}"),
    )
    .await;
    let status = ledger.schema_status().await.unwrap();
    assert!(!status.is_current());
    assert_eq!(
        status.changed.iter().map(|m| m.version).collect::<Vec<_>>(),
        [first]
    );
    assert!(status.to_string().contains("another checksum"), "{status}");
    assert!(status.missing.is_empty(), "{status:?}");

    execute(
        &db,
        &format!("UPDATE _sqlx_migrations SET success = FALSE WHERE version = {last}"),
    )
    .await;
    let status = ledger.schema_status().await.unwrap();
    assert_eq!(status.failed, [last]);
    assert!(status.to_string().contains("failed part-way"), "{status}");
    let readiness = ledger.readiness(READINESS_TIMEOUT).await;
    assert!(!readiness.is_ready(), "{readiness:?}");

    // A version this binary does not know (a newer binary migrated) is not a problem.
    execute(
        &db,
        &format!("UPDATE _sqlx_migrations SET success = TRUE WHERE version = {last}"),
    )
    .await;
    execute(
        &db,
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (29991231000000, 'from a newer binary', TRUE, {bytes}, 0)",
    )
    .await;
    let status = ledger.schema_status().await.unwrap();
    assert_eq!(status.newer, [29_991_231_000_000]);
    assert!(status.failed.is_empty(), "{status:?}");
}
both_stores!(
    edited_migrations,
    edited_or_failed_migrations_are_not_current
);
