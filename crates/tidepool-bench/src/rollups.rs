//! `tidepool bench rollups`: what the console's usage chart costs to read. Per store (a SQLite
//! temp file; a PostgreSQL database, by default a throwaway one), `--rows` billed usage entries
//! are seeded in bulk over `--days` UTC days ending today, a few tenants, projects, keys and
//! models (`tidepool_ledger::bench_seed_usage`: transactions of a thousand entries, each writing
//! its entries and their daily rollup with the settle writer's two statements). Then one
//! tenant's last `--query-days` days are read two ways: from the daily rollup
//! (`Ledger::usage_daily`, what the console reads) and from the raw entries
//! (`Ledger::usage_daily_from_entries`, a `GROUP BY` over every entry of the range, the
//! baseline). Both must return the same rows — every tenant is checked, the run fails
//! otherwise. Timed passes alternate between the two methods, `--queries-per-pass` queries
//! each, the order flipping every round, so drift of a noisy machine hits both alike. Reported:
//! p50/p95/p99 of each and the baseline's p95 over the rollup's.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use serde::Serialize;
use tidepool_core::TenantId;
use tidepool_ledger::{
    BenchDatabase, Clock as _, DailyUsage, Day, Ledger, SystemClock, UsageSeed, bench_seed_usage,
};
use tokio::time::Instant;

use crate::common::{ms, percentile};

/// What the console's usage chart must stay under at p95 on PostgreSQL with a million entries.
const TARGET_P95_MS: f64 = 300.0;
/// Untimed queries of each method before the timed passes.
const WARMUP_QUERIES: u32 = 3;

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct RollupsBenchArgs {
    /// Usage entries seeded per store.
    #[arg(long, env = "TIDEPOOL_BENCH_ROWS", default_value_t = 1_000_000)]
    rows: u64,
    /// Tenants the entries are spread over.
    #[arg(long, env = "TIDEPOOL_BENCH_TENANTS", default_value_t = 4)]
    tenants: u32,
    /// Projects per tenant.
    #[arg(long, env = "TIDEPOOL_BENCH_PROJECTS", default_value_t = 3)]
    projects: u32,
    /// Keys per project.
    #[arg(long, env = "TIDEPOOL_BENCH_KEYS_PER_PROJECT", default_value_t = 2)]
    keys_per_project: u32,
    /// Models the entries are spread over.
    #[arg(long, env = "TIDEPOOL_BENCH_MODELS", default_value_t = 3)]
    models: u32,
    /// UTC days the entries are spread over, ending today.
    #[arg(long, env = "TIDEPOOL_BENCH_DAYS", default_value_t = 35)]
    days: u32,
    /// Days one query reads, ending today (the console's chart: 30).
    #[arg(long, env = "TIDEPOOL_BENCH_QUERY_DAYS", default_value_t = 30)]
    query_days: u32,
    /// Timed passes per method.
    #[arg(long, env = "TIDEPOOL_BENCH_PASSES", default_value_t = 10)]
    passes: u32,
    /// Queries of one pass.
    #[arg(long, env = "TIDEPOOL_BENCH_QUERIES_PER_PASS", default_value_t = 10)]
    queries_per_pass: u32,
    /// `sqlite`, `postgres` or both, comma-separated.
    #[arg(
        long,
        env = "TIDEPOOL_BENCH_STORES",
        default_value = "sqlite,postgres",
        value_delimiter = ','
    )]
    stores: Vec<String>,
    /// PostgreSQL database to seed and query, kept afterwards (its tenants are named
    /// `bench-…`). Unset: a throwaway database made on `--postgres-admin-url` and dropped.
    #[arg(long, env = "TIDEPOOL_BENCH_DATABASE_URL")]
    database_url: Option<String>,
    /// Where the throwaway PostgreSQL database is made (a role allowed to create databases).
    #[arg(
        long,
        env = "TIDEPOOL_BENCH_POSTGRES_ADMIN_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    postgres_admin_url: String,
    /// Where the JSON report goes.
    #[arg(
        long,
        env = "TIDEPOOL_BENCH_OUT",
        default_value = "bench/out/rollups.json"
    )]
    out: PathBuf,
}

/// Latency of one method over every timed query.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct MethodLatency {
    pub(crate) queries: usize,
    pub(crate) p50_ms: f64,
    pub(crate) p95_ms: f64,
    pub(crate) p99_ms: f64,
    /// p95 of each pass, in the order they ran.
    pub(crate) pass_p95_ms: Vec<f64>,
}

/// One store's result.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct StoreReport {
    pub(crate) store: &'static str,
    /// Seeding: wall time and entries per second.
    pub(crate) seed_seconds: f64,
    pub(crate) seed_rows_per_second: f64,
    /// Rows of the daily rollup table after seeding (every tenant).
    pub(crate) rollup_table_rows: u64,
    /// Rows one query returns (one per day, project, key and model), and the entries they sum.
    pub(crate) query_rows: usize,
    pub(crate) query_entries: u64,
    /// Both methods returned the same rows for every tenant.
    pub(crate) identical: bool,
    pub(crate) rollup: MethodLatency,
    pub(crate) raw: MethodLatency,
    /// Raw p95 / rollup p95.
    pub(crate) p95_speedup: f64,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct RollupsReport {
    pub(crate) rows: u64,
    pub(crate) tenants: u32,
    pub(crate) projects: u32,
    pub(crate) keys_per_project: u32,
    pub(crate) models: u32,
    pub(crate) days: u32,
    pub(crate) query_days: u32,
    pub(crate) passes: u32,
    pub(crate) queries_per_pass: u32,
    pub(crate) target_p95_ms: f64,
    pub(crate) stores: Vec<StoreReport>,
}

pub(crate) async fn run(args: RollupsBenchArgs) -> anyhow::Result<()> {
    let report = measure(&args).await?;
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)?;
    print_report(&report)?;
    writeln!(std::io::stdout().lock(), "\nJSON: {}", args.out.display())?;
    Ok(())
}

/// Every store's measurement; fails if the two methods ever disagree.
pub(crate) async fn measure(args: &RollupsBenchArgs) -> anyhow::Result<RollupsReport> {
    anyhow::ensure!(
        args.query_days >= 1 && args.query_days <= args.days,
        "--query-days must be between 1 and --days"
    );
    anyhow::ensure!(
        args.passes >= 1 && args.queries_per_pass >= 1,
        "--passes and --queries-per-pass must be positive"
    );
    // One day for every store, so both are seeded with the same figures.
    let today = Day::of_ms(SystemClock.now_ms());
    let mut stores = Vec::new();
    for store in &args.stores {
        match store.as_str() {
            "sqlite" => {
                let dir = std::env::temp_dir().join(format!(
                    "tidepool-bench-rollups-{}",
                    tidepool_core::RequestId::new()
                ));
                std::fs::create_dir_all(&dir)?;
                let url = format!("sqlite://{}", dir.join("rollups.db").display());
                let result = measure_store(args, &url, today).await;
                if let Err(error) = std::fs::remove_dir_all(&dir) {
                    tracing::warn!(%error, "could not remove the bench's temp dir");
                }
                stores.push(result?);
            }
            "postgres" => stores.push(measure_postgres(args, today).await?),
            other => anyhow::bail!("unknown store `{other}` (sqlite, postgres)"),
        }
    }
    Ok(RollupsReport {
        rows: args.rows,
        tenants: args.tenants,
        projects: args.projects,
        keys_per_project: args.keys_per_project,
        models: args.models,
        days: args.days,
        query_days: args.query_days,
        passes: args.passes,
        queries_per_pass: args.queries_per_pass,
        target_p95_ms: TARGET_P95_MS,
        stores,
    })
}

async fn measure_postgres(args: &RollupsBenchArgs, today: Day) -> anyhow::Result<StoreReport> {
    if let Some(url) = &args.database_url {
        return measure_store(args, url, today).await;
    }
    let database = BenchDatabase::create(&args.postgres_admin_url)
        .await
        .with_context(|| format!("creating a database on {}", args.postgres_admin_url))?;
    let result = measure_store(args, &database.url, today).await;
    database.drop_database().await?;
    result
}

async fn measure_store(
    args: &RollupsBenchArgs,
    url: &str,
    today: Day,
) -> anyhow::Result<StoreReport> {
    let ledger = Ledger::connect(url).await?;
    let store = ledger.store_kind();
    let seed = UsageSeed {
        rows: args.rows,
        tenants: args.tenants,
        projects: args.projects,
        keys_per_project: args.keys_per_project,
        models: args.models,
        days: args.days,
        last_day: today,
    };
    tracing::info!(store, rows = args.rows, "seeding usage entries");
    let started = Instant::now();
    let seeded = bench_seed_usage(&ledger, &seed).await?;
    let seed_seconds = started.elapsed().as_secs_f64();
    let from = today.saturating_add_days(1 - i64::from(args.query_days));
    let first_day = today.saturating_add_days(1 - i64::from(args.days));
    let rollup_table_rows = check_agree(&ledger, &seeded.tenants, [first_day, from], today).await?;
    let tenant = seeded
        .tenants
        .first()
        .context("the seed made no tenant")?
        .clone();
    let answer = ledger.usage_daily(&tenant, from, today).await?;
    let query_entries = answer.iter().map(|r| r.requests).sum();

    for _ in 0..WARMUP_QUERIES {
        query(&ledger, Method::Rollup, &tenant, from, today).await?;
        query(&ledger, Method::Raw, &tenant, from, today).await?;
    }
    let mut samples = [Vec::new(), Vec::new()];
    let mut pass_p95 = [Vec::new(), Vec::new()];
    for pass in 0..args.passes {
        let order = if pass % 2 == 0 {
            [Method::Rollup, Method::Raw]
        } else {
            [Method::Raw, Method::Rollup]
        };
        for method in order {
            let mut taken = Vec::new();
            for _ in 0..args.queries_per_pass {
                let started = Instant::now();
                let rows = query(&ledger, method, &tenant, from, today).await?;
                taken.push(ms(started.elapsed()));
                anyhow::ensure!(rows == answer, "{store}: {method:?} returned other rows");
            }
            let index = method as usize;
            pass_p95[index].push(percentile(&mut taken.clone(), 95));
            samples[index].extend(taken);
        }
    }
    let [rollup_samples, raw_samples] = samples;
    let [rollup_passes, raw_passes] = pass_p95;
    let rollup = latency(rollup_samples, rollup_passes);
    let raw = latency(raw_samples, raw_passes);
    Ok(StoreReport {
        store,
        seed_seconds,
        seed_rows_per_second: crate::common::as_f64(args.rows) / seed_seconds.max(f64::EPSILON),
        rollup_table_rows,
        query_rows: answer.len(),
        query_entries,
        identical: true,
        p95_speedup: raw.p95_ms / rollup.p95_ms.max(f64::MIN_POSITIVE),
        rollup,
        raw,
    })
}

/// Checks that both methods return the same rows for every tenant from each of `starts` through
/// `to`; the rollup rows from the first start, summed over the tenants.
async fn check_agree(
    ledger: &Ledger,
    tenants: &[TenantId],
    starts: [Day; 2],
    to: Day,
) -> anyhow::Result<u64> {
    let mut rollup_rows: u64 = 0;
    for tenant in tenants {
        for (index, start) in starts.into_iter().enumerate() {
            let rolled = ledger.usage_daily(tenant, start, to).await?;
            let raw = ledger.usage_daily_from_entries(tenant, start, to).await?;
            anyhow::ensure!(
                rolled == raw,
                "{}: the rollup and the raw entries differ for {tenant} from {start}",
                ledger.store_kind()
            );
            if index == 0 {
                rollup_rows = rollup_rows.saturating_add(u64::try_from(rolled.len())?);
            }
        }
    }
    Ok(rollup_rows)
}

/// How one query reads a tenant's days.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    /// `Ledger::usage_daily`: the daily rollup.
    Rollup = 0,
    /// `Ledger::usage_daily_from_entries`: `GROUP BY` over the raw entries.
    Raw = 1,
}

async fn query(
    ledger: &Ledger,
    method: Method,
    tenant: &TenantId,
    from: Day,
    to: Day,
) -> anyhow::Result<Vec<DailyUsage>> {
    Ok(match method {
        Method::Rollup => ledger.usage_daily(tenant, from, to).await?,
        Method::Raw => ledger.usage_daily_from_entries(tenant, from, to).await?,
    })
}

fn latency(mut samples: Vec<f64>, pass_p95_ms: Vec<f64>) -> MethodLatency {
    MethodLatency {
        queries: samples.len(),
        p50_ms: percentile(&mut samples, 50),
        p95_ms: percentile(&mut samples, 95),
        p99_ms: percentile(&mut samples, 99),
        pass_p95_ms,
    }
}

fn print_report(report: &RollupsReport) -> anyhow::Result<()> {
    let mut text = String::new();
    writeln!(
        text,
        "{} usage entries per store over {} days ({} tenants × {} projects × {} keys, {} models); \
         one tenant's last {} days, {} passes × {} queries per method, interleaved:",
        report.rows,
        report.days,
        report.tenants,
        report.projects,
        report.keys_per_project,
        report.models,
        report.query_days,
        report.passes,
        report.queries_per_pass
    )?;
    writeln!(
        text,
        "| store | method | p50 ms | p95 ms | p99 ms | p95 per pass |\n|---|---|---|---|---|---|"
    )?;
    for store in &report.stores {
        for (name, method) in [("rollup", &store.rollup), ("raw", &store.raw)] {
            let passes: Vec<String> = method
                .pass_p95_ms
                .iter()
                .map(|p| format!("{p:.2}"))
                .collect();
            writeln!(
                text,
                "| {} | {name} | {:.2} | {:.2} | {:.2} | {} |",
                store.store,
                method.p50_ms,
                method.p95_ms,
                method.p99_ms,
                passes.join(" ")
            )?;
        }
    }
    for store in &report.stores {
        let verdict = if store.rollup.p95_ms < report.target_p95_ms {
            "met"
        } else {
            "MISSED"
        };
        writeln!(
            text,
            "{}: seeded in {:.1} s ({:.0} entries/s), rollup table {} rows; a query returns {} \
             rows summing {} entries; identical answers; raw p95 / rollup p95 = {:.1}×; \
             rollup p95 < {} ms: {verdict}",
            store.store,
            store.seed_seconds,
            store.seed_rows_per_second,
            store.rollup_table_rows,
            store.query_rows,
            store.query_entries,
            store.p95_speedup,
            report.target_p95_ms
        )?;
    }
    std::io::stdout().lock().write_all(text.as_bytes())?;
    Ok(())
}

/// The arguments `measure` runs with by default, for tests: `rows` entries, PostgreSQL on
/// `postgres_admin_url` (`None`: SQLite only), few passes.
#[cfg(test)]
fn small_args(rows: u64, postgres_admin_url: Option<String>) -> RollupsBenchArgs {
    RollupsBenchArgs {
        rows,
        tenants: 3,
        projects: 2,
        keys_per_project: 2,
        models: 2,
        days: 35,
        query_days: 30,
        passes: 2,
        queries_per_pass: 2,
        stores: if postgres_admin_url.is_some() {
            vec!["sqlite".to_owned(), "postgres".to_owned()]
        } else {
            vec!["sqlite".to_owned()]
        },
        database_url: None,
        postgres_admin_url: postgres_admin_url.unwrap_or_default(),
        out: PathBuf::from("unused.json"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bench's code path on a small seed, on both stores: it runs to the end (so both
    /// methods returned the same rows for every tenant, checked inside), and the queried rows sum
    /// to the entries of that tenant's last 30 days.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn small_seed_both_methods_agree() {
        let admin = tidepool_ledger::testing::postgres_admin_url().await;
        let report = measure(&small_args(2_000, Some(admin))).await.unwrap();
        assert_eq!(report.stores.len(), 2);
        for store in &report.stores {
            assert!(store.identical);
            assert_eq!(store.rollup.queries, 4);
            assert_eq!(store.raw.queries, 4);
            // 2,000 entries over 35 days and 3 tenants: one tenant's 30 days hold about 571.
            assert!(
                (400..800).contains(&store.query_entries),
                "{}: {}",
                store.store,
                store.query_entries
            );
            assert!(store.query_rows > 0 && store.rollup_table_rows > 0);
        }
        // Both stores were seeded alike: the same figures.
        assert_eq!(
            report.stores[0].query_entries,
            report.stores[1].query_entries
        );
        assert_eq!(report.stores[0].query_rows, report.stores[1].query_rows);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_arguments_are_refused() {
        let mut args = small_args(10, None);
        args.query_days = 36;
        assert!(measure(&args).await.is_err());
        let mut args = small_args(10, None);
        args.stores = vec!["mysql".to_owned()];
        assert!(measure(&args).await.is_err());
        let args = small_args(0, None);
        assert!(measure(&args).await.is_err(), "no rows to seed");
    }
}
