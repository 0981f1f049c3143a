//! Test harness shared by the ledger suites: the store fixtures live in
//! `tidepool_ledger::testing` (feature `test-util`, shared with the gateway's tests); this module
//! adds the `both_stores!` macro that declares each behaviour once for both stores.

pub(crate) use tidepool_ledger::testing::{Kind, T0_MS, TestDb, run};

/// Declares `$name::sqlite` and `$name::postgres`, each running `$body(db)` on a fresh store.
#[macro_export]
macro_rules! both_stores {
    ($name:ident, $body:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                $crate::common::run($crate::common::Kind::Sqlite, super::$body).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                $crate::common::run($crate::common::Kind::Postgres, super::$body).await;
            }
        }
    };
}
