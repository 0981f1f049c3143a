//! `tidepool bench ledger`: (1) settled usages per second through the ledger's group-commit writer
//! on SQLite (a temp file) and PostgreSQL (`--postgres-url`; a fresh `bench-…` tenant each run);
//! (2) the request latency added by metering + quotas: two gateways in this process on loopback
//! HTTP, the same fake engine (a decode step of `--decode-step-us` per token), the same SQLite
//! ledger, one with `billing.enforce = true` (reserve before compute, settle after, RPM/TPM
//! windows) and one with `enforce = false` (usage entries only, written after the response, no
//! reservation, no quota). Requests alternate between the two in rounds, so drift of a noisy
//! machine hits both sides alike. Reported as p50/p99 with, without, and their ratio.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;
use tidepool_core::{BillingConfig, Currency, Limits, ModelId, ModelKind, Nanos, TenantId};
use tidepool_engine::fake::{FakeEngine, FakeEngineConfig};
use tidepool_gateway::{AppState, ServedModel, StateOptions, router};
use tidepool_ledger::{Ledger, RateLimits, RateScope};
use tokio::time::Instant;

use crate::common::percentile;

#[derive(Debug, clap::Args)]
pub(crate) struct LedgerBenchArgs {
    /// Settles per store.
    #[arg(long, default_value_t = 50_000)]
    settles: u32,
    /// Settles in flight at once (a busy gateway's concurrent request ends).
    #[arg(long, default_value_t = 512)]
    concurrency: u32,
    /// PostgreSQL database for the settle bench (`none` skips it).
    #[arg(
        long,
        env = "TIDEPOOL_BENCH_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    postgres_url: String,
    /// Requests per side in the metering-overhead run.
    #[arg(long, default_value_t = 600)]
    requests: u32,
    /// Requests in flight per side.
    #[arg(long, default_value_t = 16)]
    request_concurrency: u32,
    /// Completion tokens per request.
    #[arg(long, default_value_t = 16)]
    output_tokens: u32,
    /// Simulated decode step of the fake engine, in microseconds.
    #[arg(long, default_value_t = 5_000)]
    decode_step_us: u64,
    /// Where the JSON report goes.
    #[arg(long, default_value = "bench/out/ledger.json")]
    out: PathBuf,
}

#[derive(Debug, Serialize)]
struct SettleRow {
    store: &'static str,
    settles: u32,
    concurrency: u32,
    settles_per_second: u64,
    reserves_per_second: u64,
}

#[derive(Debug, Serialize)]
struct LatencySide {
    requests: usize,
    p50_ms: f64,
    p99_ms: f64,
    mean_ms: f64,
}

#[derive(Debug, Serialize)]
struct LedgerReport {
    settle: Vec<SettleRow>,
    output_tokens: u32,
    decode_step_us: u64,
    request_concurrency: u32,
    with_metering: LatencySide,
    without_metering: LatencySide,
    /// `with / without`, at p50 and p99.
    p50_ratio: f64,
    p99_ratio: f64,
}

pub(crate) async fn run(args: LedgerBenchArgs) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("tidepool-bench-ledger-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut settle = Vec::new();
    let sqlite_url = format!("sqlite://{}", dir.join("settle.db").display());
    let mut urls = vec![sqlite_url];
    if args.postgres_url != "none" {
        urls.push(args.postgres_url.clone());
    }
    for url in &urls {
        let result = tidepool_ledger::bench_settles(url, args.settles, args.concurrency)
            .await
            .with_context(|| format!("settle bench on {url}"))?;
        settle.push(SettleRow {
            store: result.store,
            settles: result.settles,
            concurrency: result.concurrency,
            settles_per_second: result.settles_per_second,
            reserves_per_second: result.reserves_per_second,
        });
    }

    let (with, without) = overhead(&args, &dir).await?;
    let report = LedgerReport {
        settle,
        output_tokens: args.output_tokens,
        decode_step_us: args.decode_step_us,
        request_concurrency: args.request_concurrency,
        p50_ratio: with.p50_ms / without.p50_ms.max(f64::MIN_POSITIVE),
        p99_ratio: with.p99_ms / without.p99_ms.max(f64::MIN_POSITIVE),
        with_metering: with,
        without_metering: without,
    };
    if let Err(error) = std::fs::remove_dir_all(&dir) {
        tracing::warn!(%error, "could not remove the bench's temp dir");
    }
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)?;
    print_report(&report)?;
    writeln!(std::io::stdout().lock(), "\nJSON: {}", args.out.display())?;
    Ok(())
}

fn print_report(report: &LedgerReport) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "| store | settles/s | reserves/s | settles | in flight |\n|---|---|---|---|---|"
    )?;
    for row in &report.settle {
        writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            row.store,
            row.settles_per_second,
            row.reserves_per_second,
            row.settles,
            row.concurrency
        )?;
    }
    writeln!(
        out,
        "\nrequest latency, fake engine {} tokens × {} µs, {} in flight, {} requests per side:",
        report.output_tokens,
        report.decode_step_us,
        report.request_concurrency,
        report.with_metering.requests
    )?;
    writeln!(
        out,
        "| | p50 ms | p99 ms | mean ms |\n|---|---|---|---|\n| metering + quotas | {:.2} | {:.2} | {:.2} |\n| without | {:.2} | {:.2} | {:.2} |\n| ratio | {:.3}× | {:.3}× | |",
        report.with_metering.p50_ms,
        report.with_metering.p99_ms,
        report.with_metering.mean_ms,
        report.without_metering.p50_ms,
        report.without_metering.p99_ms,
        report.without_metering.mean_ms,
        report.p50_ratio,
        report.p99_ratio
    )?;
    Ok(())
}

/// One in-process gateway on a loopback port.
struct Gateway {
    base: String,
    key: String,
    server: tokio::task::JoinHandle<()>,
}

async fn gateway(
    ledger: &Ledger,
    enforce: bool,
    args: &LedgerBenchArgs,
    tenant: &TenantId,
) -> anyhow::Result<Gateway> {
    let model = ModelId::new("bench-fake")?;
    let mut engine = FakeEngineConfig::new(model);
    engine.seqs_max = args.request_concurrency.max(1);
    engine.decode_step_cost = Duration::from_micros(args.decode_step_us);
    let engine = FakeEngine::start(engine)?;
    let billing = BillingConfig {
        enforce,
        ..BillingConfig::default()
    };
    let state = AppState::with_options(
        vec![ServedModel::text(ModelKind::Chat, engine)],
        ledger.clone(),
        StateOptions {
            billing,
            ..StateOptions::new(Limits::default())
        },
    );
    let key = ledger.create_key(tenant, "bench").await?;
    // Quotas on the metered side: generous limits that every request passes, so the windows
    // are updated on every request like in production.
    if enforce {
        ledger
            .set_rate_limits(
                &RateScope::Key {
                    key_id: key.record.key_id.clone(),
                },
                RateLimits {
                    requests_per_minute: Some(1_000_000),
                    tokens_per_minute: Some(1_000_000_000),
                },
            )
            .await?;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let app = router(state);
    let server = tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "bench gateway stopped");
        }
    });
    Ok(Gateway {
        base,
        key: key.secret,
        server,
    })
}

async fn overhead(
    args: &LedgerBenchArgs,
    dir: &std::path::Path,
) -> anyhow::Result<(LatencySide, LatencySide)> {
    let url = format!("sqlite://{}", dir.join("overhead.db").display());
    let ledger = Ledger::connect(&url).await?;
    let tenant = TenantId::new("bench")?;
    ledger.create_tenant(&tenant, Currency::USD).await?;
    ledger
        .credit(&tenant, Nanos(1_000_000_000_000_000), "bench")
        .await?;
    ledger
        .set_price(&tidepool_ledger::bench_price(ModelId::new("bench-fake")?))
        .await?;
    let metered = gateway(&ledger, true, args, &tenant).await?;
    let plain = gateway(&ledger, false, args, &tenant).await?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    let rounds = 10_u32;
    let per_round = args.requests.div_ceil(rounds).max(1);
    let mut with = Vec::new();
    let mut without = Vec::new();
    // Warm both (connections, first-use allocations), untimed.
    batch(&client, &metered, args, args.request_concurrency).await?;
    batch(&client, &plain, args, args.request_concurrency).await?;
    for round in 0..rounds {
        // Alternate which side goes first.
        let order: [(&Gateway, bool); 2] = if round % 2 == 0 {
            [(&metered, true), (&plain, false)]
        } else {
            [(&plain, false), (&metered, true)]
        };
        for (side, is_metered) in order {
            let samples = batch(&client, side, args, per_round).await?;
            if is_metered {
                with.extend(samples);
            } else {
                without.extend(samples);
            }
        }
    }
    metered.server.abort();
    plain.server.abort();
    Ok((side_report(with), side_report(without)))
}

/// `count` non-stream chat requests with `request_concurrency` in flight; latencies in ms.
async fn batch(
    client: &reqwest::Client,
    gateway: &Gateway,
    args: &LedgerBenchArgs,
    count: u32,
) -> anyhow::Result<Vec<f64>> {
    let url = format!("{}/v1/chat/completions", gateway.base);
    let body = Arc::new(serde_json::json!({
        "model": "bench-fake",
        "messages": [{"role": "user", "content": "a short question about billing"}],
        "max_tokens": args.output_tokens,
    }));
    let next = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let workers = (0..args.request_concurrency.max(1)).map(|_| {
        let (client, url, key, body, next) = (
            client.clone(),
            url.clone(),
            gateway.key.clone(),
            Arc::clone(&body),
            Arc::clone(&next),
        );
        async move {
            let mut samples = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < count {
                let sent = Instant::now();
                let response = client
                    .post(&url)
                    .bearer_auth(&key)
                    .json(&*body)
                    .send()
                    .await?;
                let status = response.status();
                let text = response.text().await?;
                anyhow::ensure!(status.is_success(), "HTTP {status}: {text}");
                samples.push(sent.elapsed().as_secs_f64() * 1000.0);
            }
            anyhow::Ok(samples)
        }
    });
    let mut all = Vec::new();
    for result in futures::future::join_all(workers).await {
        all.extend(result?);
    }
    Ok(all)
}

fn side_report(mut samples: Vec<f64>) -> LatencySide {
    let requests = samples.len();
    let sum: f64 = samples.iter().sum();
    let mean_ms = if requests == 0 {
        0.0
    } else {
        sum / f64::from(u32::try_from(requests).unwrap_or(u32::MAX))
    };
    LatencySide {
        requests,
        p50_ms: percentile(&mut samples, 50),
        p99_ms: percentile(&mut samples, 99),
        mean_ms,
    }
}
