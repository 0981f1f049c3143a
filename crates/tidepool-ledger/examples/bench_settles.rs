//! Measures settles per second on SQLite (a temp file) and on PostgreSQL (a fresh database
//! `tp_bench_<uuid>` created on the server in `TIDEPOOL_BENCH_POSTGRES_URL`, default the local
//! test server, and dropped afterwards), the way `tidepool bench ledger` does:
//! `cargo run --release -p tidepool-ledger --example bench_settles [settles] [concurrency]
//! [sqlite|postgres]`.

use std::io::Write;

use sqlx::{Connection, PgConnection, QueryBuilder};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let settles: u32 = args.next().map_or(Ok(20_000), |a| a.parse())?;
    let concurrency: u32 = args.next().map_or(Ok(512), |a| a.parse())?;
    let dir = tempfile::tempdir()?;
    let sqlite_url = format!("sqlite://{}", dir.path().join("bench.db").display());
    let admin_url = std::env::var("TIDEPOOL_BENCH_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let name = format!("tp_bench_{}", uuid::Uuid::now_v7().simple());
    let mut admin = PgConnection::connect(&admin_url).await?;
    // Identifiers cannot be bound; `name` is generated above from hex digits.
    QueryBuilder::<sqlx::Postgres>::new("CREATE DATABASE ")
        .push(&name)
        .build()
        .execute(&mut admin)
        .await?;
    let base = admin_url
        .rsplit_once('/')
        .map_or(admin_url.as_str(), |(base, _)| base);
    let postgres_url = format!("{base}/{name}");

    let only = args.next();
    for url in [sqlite_url.as_str(), postgres_url.as_str()] {
        if only.as_deref().is_some_and(|store| !url.starts_with(store)) {
            continue;
        }
        let result = tidepool_ledger::bench_settles(url, settles, concurrency).await?;
        writeln!(
            std::io::stdout().lock(),
            "{:<8} settles={} concurrency={} elapsed_ms={} settles_per_second={} \
             reserves_per_second={}",
            result.store,
            result.settles,
            result.concurrency,
            result.elapsed.as_millis(),
            result.settles_per_second,
            result.reserves_per_second
        )?;
    }
    QueryBuilder::<sqlx::Postgres>::new("DROP DATABASE IF EXISTS ")
        .push(&name)
        .push(" WITH (FORCE)")
        .build()
        .execute(&mut admin)
        .await?;
    Ok(())
}
