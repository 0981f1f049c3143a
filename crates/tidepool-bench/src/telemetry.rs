//! `tidepool bench telemetry`: what tracing costs a request. Three `tidepool serve` child
//! processes on the fake engine (decoding is not under test), alike but for `[telemetry]`:
//! tracing off; exporting every span (`sample_ratio = 1.0`) to an OTLP/HTTP collector in this
//! process that accepts everything; and exporting to a closed port (the collector down, every
//! batch failing and counted as dropped). An open-loop client sends `--rate-per-s` non-stream
//! chat requests per second to one target per pass; passes are interleaved, the order rotating
//! per round, so drift of a noisy machine hits all three alike. Reported: p50/p99 of each
//! target, what tracing adds over the same run's tracing-off gateway, the spans the collector
//! received and the spans the down gateway counted as dropped.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;
use serde_json::json;
use tidepool_core::{Currency, Nanos, TenantId};
use tidepool_ledger::{AuditContext, CREDIT_NANOS_MAX, Ledger};

use crate::common::percentile;
use crate::open_loop;
use crate::process::ChildServer;

/// The fake model every gateway serves.
const MODEL: &str = "fake-chat";

#[derive(Debug, clap::Args)]
pub(crate) struct TelemetryBenchArgs {
    /// Requests per second (open loop).
    #[arg(long, env = "TIDEPOOL_BENCH_RATE_PER_S", default_value_t = 100)]
    rate_per_s: u32,
    /// Requests of one pass (one target).
    #[arg(long, env = "TIDEPOOL_BENCH_REQUESTS", default_value_t = 500)]
    requests: u32,
    /// Passes per target.
    #[arg(long, env = "TIDEPOOL_BENCH_PASSES", default_value_t = 4)]
    passes: u32,
    /// Completion tokens per request.
    #[arg(long, env = "TIDEPOOL_BENCH_OUTPUT_TOKENS", default_value_t = 16)]
    output_tokens: u32,
    /// Seconds to wait for a gateway child process to become healthy.
    #[arg(long, env = "TIDEPOOL_BENCH_STARTUP_TIMEOUT_S", default_value_t = 60)]
    startup_timeout_s: u64,
    /// Where the JSON report goes.
    #[arg(
        long,
        env = "TIDEPOOL_BENCH_OUT",
        default_value = "bench/out/telemetry.json"
    )]
    out: PathBuf,
}

#[derive(Debug, Serialize)]
struct Row {
    /// `off`, `collector-up` or `collector-down`.
    target: &'static str,
    requests: usize,
    p50_ms: f64,
    p99_ms: f64,
    /// Over the tracing-off gateway of the same run.
    added_p50_ms: f64,
    added_p99_ms: f64,
    /// Each pass's p99, in pass order.
    pass_p99_ms: Vec<f64>,
    /// `tidepool_telemetry_spans_dropped_total` of the gateway at the end.
    spans_dropped: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    rate_per_s: u32,
    requests_per_pass: u32,
    passes: u32,
    output_tokens: u32,
    /// OTLP export requests and spans' bytes the collector received from `collector-up`.
    collector_requests: u64,
    collector_bytes: u64,
    targets: Vec<Row>,
}

struct Target {
    name: &'static str,
    url: String,
    key: String,
    child: ChildServer,
}

pub(crate) async fn run(args: TelemetryBenchArgs) -> anyhow::Result<()> {
    for variable in [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_TRACES_SAMPLER",
    ] {
        anyhow::ensure!(
            std::env::var_os(variable).is_none(),
            "unset {variable}: the gateways' tracing is set by the bench"
        );
    }
    anyhow::ensure!(args.rate_per_s > 0, "--rate-per-s must be positive");
    let dir = std::env::temp_dir().join(format!("tidepool-bench-telemetry-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run_in(&args, &dir).await;
    if let Err(error) = std::fs::remove_dir_all(&dir) {
        tracing::warn!(%error, "could not remove the bench's temp dir");
    }
    let report = result?;
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)?;
    print_report(&report)?;
    writeln!(std::io::stdout().lock(), "\nJSON: {}", args.out.display())?;
    Ok(())
}

/// An OTLP/HTTP collector that accepts every export; counts requests and bytes.
async fn collector() -> anyhow::Result<(String, Arc<[AtomicU64; 2]>, tokio::task::JoinHandle<()>)> {
    let counts: Arc<[AtomicU64; 2]> = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let seen = Arc::clone(&counts);
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let seen = Arc::clone(&seen);
            async move {
                seen[0].fetch_add(1, Ordering::Relaxed);
                seen[1].fetch_add(
                    u64::try_from(body.len()).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "bench collector stopped");
        }
    });
    Ok((base, counts, server))
}

/// A loopback address nothing listens on.
fn closed_endpoint() -> anyhow::Result<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(format!("http://{}", listener.local_addr()?))
}

async fn gateway(
    root: &Path,
    name: &'static str,
    endpoint: Option<&str>,
    timeout_s: u64,
) -> anyhow::Result<Target> {
    let mut child = ChildServer::new(root, name)?;
    let telemetry = endpoint.map_or_else(String::new, |endpoint| {
        format!("\n[telemetry]\notlp_endpoint = \"{endpoint}\"\nsample_ratio = 1.0\n")
    });
    child.write_config(&format!(
        "\n[[models]]\nid = \"{MODEL}\"\nkind = \"chat\"\nbackend = \"fake\"\n\
         price_input_per_mtok = 50_000_000\nprice_output_per_mtok = 200_000_000\n{telemetry}"
    ))?;
    let key = {
        let ledger = Ledger::connect(child.database_url()).await?;
        let tenant = TenantId::new(format!("bench-{name}-{}", std::process::id()))?;
        ledger
            .create_tenant(&tenant, Currency::USD, &AuditContext::ADMIN)
            .await?;
        ledger
            .credit(
                &tenant,
                Nanos(CREDIT_NANOS_MAX),
                "bench",
                &AuditContext::ADMIN,
            )
            .await?;
        ledger
            .create_key(&tenant, "bench", &AuditContext::ADMIN)
            .await?
            .secret
    };
    child
        .start(&["serve"], timeout_s)
        .await
        .with_context(|| format!("gateway {name}"))?;
    Ok(Target {
        name,
        url: format!("{}/v1/chat/completions", child.base()),
        key,
        child,
    })
}

async fn run_in(args: &TelemetryBenchArgs, dir: &Path) -> anyhow::Result<Report> {
    let (collector_url, counts, collector_server) = collector().await?;
    let down = closed_endpoint()?;
    let timeout_s = args.startup_timeout_s;
    let mut targets = [
        gateway(dir, "off", None, timeout_s).await?,
        gateway(dir, "collector-up", Some(&collector_url), timeout_s).await?,
        gateway(dir, "collector-down", Some(&down), timeout_s).await?,
    ];
    let client = open_loop::client()?;
    // Every request of the run, warm-up and timed: one non-stream chat completion.
    let body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "one two three"}],
        "max_tokens": args.output_tokens,
    });
    let named: Vec<open_loop::Target<'_>> = targets
        .iter()
        .map(|target| open_loop::Target {
            name: target.name,
            url: &target.url,
            key: &target.key,
        })
        .collect();
    let (samples, pass_p99) = open_loop::interleaved(
        &client,
        &named,
        &body,
        args.passes,
        args.rate_per_s,
        args.requests,
    )
    .await?;
    // The last batches go out within the export interval.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut rows = Vec::new();
    let mut off = (0.0, 0.0);
    for ((target, mut taken), passes) in targets.iter_mut().zip(samples).zip(pass_p99) {
        let spans_dropped = dropped_spans(&client, &target.child.base()).await?;
        target.child.kill().await?;
        let p50 = percentile(&mut taken, 50);
        let p99 = percentile(&mut taken, 99);
        if target.name == "off" {
            off = (p50, p99);
        }
        rows.push(Row {
            target: target.name,
            requests: taken.len(),
            p50_ms: p50,
            p99_ms: p99,
            added_p50_ms: p50 - off.0,
            added_p99_ms: p99 - off.1,
            pass_p99_ms: passes,
            spans_dropped,
        });
    }
    collector_server.abort();
    Ok(Report {
        rate_per_s: args.rate_per_s,
        requests_per_pass: args.requests,
        passes: args.passes,
        output_tokens: args.output_tokens,
        collector_requests: counts[0].load(Ordering::Relaxed),
        collector_bytes: counts[1].load(Ordering::Relaxed),
        targets: rows,
    })
}

/// `tidepool_telemetry_spans_dropped_total` on a gateway's `/metrics`, summed over reasons.
async fn dropped_spans(client: &reqwest::Client, base: &str) -> anyhow::Result<f64> {
    let text = client
        .get(format!("{base}/metrics"))
        .bearer_auth(crate::process::BENCH_ADMIN_TOKEN)
        .send()
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter(|line| line.starts_with(tidepool_telemetry::SPANS_DROPPED_TOTAL))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |total, value| total + value))
}

fn print_report(report: &Report) -> anyhow::Result<()> {
    let mut text = String::new();
    writeln!(
        text,
        "telemetry: {} req/s open loop, {} requests x {} passes per target, {} output tokens, \
         fake engine",
        report.rate_per_s, report.requests_per_pass, report.passes, report.output_tokens
    )?;
    writeln!(
        text,
        "{:<15} {:>9} {:>9} {:>9} {:>12} {:>12} {:>13}",
        "target", "requests", "p50_ms", "p99_ms", "added_p50", "added_p99", "spans_dropped"
    )?;
    for row in &report.targets {
        writeln!(
            text,
            "{:<15} {:>9} {:>9.2} {:>9.2} {:>12.2} {:>12.2} {:>13}",
            row.target,
            row.requests,
            row.p50_ms,
            row.p99_ms,
            row.added_p50_ms,
            row.added_p99_ms,
            row.spans_dropped
        )?;
    }
    writeln!(
        text,
        "collector received {} export requests, {} bytes",
        report.collector_requests, report.collector_bytes
    )?;
    write!(std::io::stdout().lock(), "{text}")?;
    Ok(())
}
