//! `tidepool bench ledger`, three measurements in one run, each against its baseline:
//!
//! 1. **Settles per second** through the ledger's group-commit writer on SQLite (a temp file)
//!    and PostgreSQL (`--postgres-url`; a fresh `bench-…` tenant each run), after the same
//!    number of group-committed reservations (their rate is reported too).
//! 2. **Metering overhead in process**, per store: gateways in this process on loopback HTTP
//!    over the same fake engine (a decode step of `--decode-step-us` per token), one with
//!    `billing.enforce = true` (reserve before compute, settle after, RPM/TPM windows) and one
//!    with `enforce = false` (usage entries only, written after the response) on each store.
//!    Requests go to the four in rounds, the order rotating, so drift of a noisy machine hits
//!    all alike. Reported as p50/p99 with and without, and their ratio.
//! 3. **Added latency from outside at a fixed rate**: an instant OpenAI-compatible upstream in
//!    this process, and `tidepool serve` child processes routing one remote model to it, with
//!    billing on and off on each store (and, with `--outside-baseline-bin`, another build's
//!    gateways, billing on and off). An open-loop client sends `--outside-rate-per-s` requests per
//!    second to one target per pass, on schedule whatever the answers do: the upstream
//!    directly or one gateway. Passes are interleaved, the order rotating per round. Reported:
//!    p50/p99 of each target and what each gateway adds over the direct call.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;
use serde_json::json;
use tidepool_core::{BillingConfig, Currency, Limits, ModelId, ModelKind, Nanos, TenantId};
use tidepool_engine::fake::{FakeEngine, FakeEngineConfig};
use tidepool_gateway::{AppState, ServedModel, StateOptions, router};
use tidepool_ledger::{AuditContext, CREDIT_NANOS_MAX, Ledger, RateLimits, RateScope};
use tokio::time::Instant;

use crate::common::{ms, percentile};
use crate::open_loop;
use crate::process::ChildServer;

/// The remote model the gateways route to the instant upstream.
const OUTSIDE_MODEL: &str = "instant";

#[derive(Debug, clap::Args)]
pub(crate) struct LedgerBenchArgs {
    /// Settles per store.
    #[arg(long, env = "TIDEPOOL_BENCH_SETTLES", default_value_t = 50_000)]
    settles: u32,
    /// Settles in flight at once (a busy gateway's concurrent request ends).
    #[arg(long, env = "TIDEPOOL_BENCH_CONCURRENCY", default_value_t = 512)]
    concurrency: u32,
    /// PostgreSQL database for every part of the bench (`none`: SQLite only).
    #[arg(
        long,
        env = "TIDEPOOL_BENCH_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    postgres_url: String,
    /// Requests per side (metered, plain; per store) in the in-process overhead run.
    #[arg(long, env = "TIDEPOOL_BENCH_REQUESTS", default_value_t = 600)]
    requests: u32,
    /// Requests in flight per side in the in-process overhead run.
    #[arg(long, env = "TIDEPOOL_BENCH_REQUEST_CONCURRENCY", default_value_t = 16)]
    request_concurrency: u32,
    /// Completion tokens per request in the in-process overhead run.
    #[arg(long, env = "TIDEPOOL_BENCH_OUTPUT_TOKENS", default_value_t = 16)]
    output_tokens: u32,
    /// Simulated decode step of the fake engine, in microseconds.
    #[arg(long, env = "TIDEPOOL_BENCH_DECODE_STEP_US", default_value_t = 5_000)]
    decode_step_us: u64,
    /// Requests per second of the outside measurement (open loop).
    #[arg(long, env = "TIDEPOOL_BENCH_OUTSIDE_RATE_PER_S", default_value_t = 200)]
    outside_rate_per_s: u32,
    /// Requests of one outside pass (one target).
    #[arg(long, env = "TIDEPOOL_BENCH_OUTSIDE_REQUESTS", default_value_t = 1_000)]
    outside_requests: u32,
    /// Passes per target in the outside measurement (0 skips it).
    #[arg(long, env = "TIDEPOOL_BENCH_OUTSIDE_PASSES", default_value_t = 4)]
    outside_passes: u32,
    /// Another build of `tidepool` to compare with: its gateways, billing on and off, join the
    /// outside measurement (target `baseline`, two per store).
    #[arg(long, env = "TIDEPOOL_BENCH_OUTSIDE_BASELINE_BIN")]
    outside_baseline_bin: Option<PathBuf>,
    /// Seconds to wait for a gateway child process to become healthy.
    #[arg(long, env = "TIDEPOOL_BENCH_STARTUP_TIMEOUT_S", default_value_t = 60)]
    startup_timeout_s: u64,
    /// Where the JSON report goes.
    #[arg(
        long,
        env = "TIDEPOOL_BENCH_OUT",
        default_value = "bench/out/ledger.json"
    )]
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

/// One store's in-process overhead.
#[derive(Debug, Serialize)]
struct OverheadRow {
    store: &'static str,
    with_metering: LatencySide,
    without_metering: LatencySide,
    /// `with / without`, at p50 and p99.
    p50_ratio: f64,
    p99_ratio: f64,
}

/// One target of the outside measurement.
#[derive(Debug, Serialize)]
struct OutsideRow {
    /// `direct`, `gateway`, or `baseline` (the gateway of `--outside-baseline-bin`).
    target: &'static str,
    /// The gateway's ledger (`-` for the direct call).
    store: &'static str,
    billing: bool,
    requests: usize,
    p50_ms: f64,
    p99_ms: f64,
    /// What the target adds over the direct call (0 for the direct call itself).
    added_p50_ms: f64,
    added_p99_ms: f64,
    /// p99 of each pass, in the order they ran.
    pass_p99_ms: Vec<f64>,
}

#[derive(Debug, Serialize)]
struct OutsideReport {
    rate_per_s: u32,
    requests_per_pass: u32,
    passes: u32,
    targets: Vec<OutsideRow>,
}

#[derive(Debug, Serialize)]
struct LedgerReport {
    settle: Vec<SettleRow>,
    output_tokens: u32,
    decode_step_us: u64,
    request_concurrency: u32,
    overhead: Vec<OverheadRow>,
    outside: Option<OutsideReport>,
}

pub(crate) async fn run(args: LedgerBenchArgs) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("tidepool-bench-ledger-{}", std::process::id()));
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

async fn run_in(args: &LedgerBenchArgs, dir: &Path) -> anyhow::Result<LedgerReport> {
    let sqlite_url = |name: &str| format!("sqlite://{}", dir.join(name).display());
    let postgres = (args.postgres_url != "none").then_some(args.postgres_url.as_str());
    let mut settle = Vec::new();
    let settle_urls = [Some(sqlite_url("settle.db")), postgres.map(str::to_owned)];
    for url in settle_urls.iter().flatten() {
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
    let overhead_urls = [Some(sqlite_url("overhead.db")), postgres.map(str::to_owned)];
    let overhead = overhead(
        args,
        &overhead_urls.into_iter().flatten().collect::<Vec<_>>(),
    )
    .await?;
    let outside = if args.outside_passes == 0 {
        None
    } else {
        Some(outside(args, dir, postgres).await?)
    };
    Ok(LedgerReport {
        settle,
        output_tokens: args.output_tokens,
        decode_step_us: args.decode_step_us,
        request_concurrency: args.request_concurrency,
        overhead,
        outside,
    })
}

fn print_report(report: &LedgerReport) -> anyhow::Result<()> {
    let mut text = String::new();
    writeln!(
        text,
        "| store | settles/s | reserves/s | settles | in flight |\n|---|---|---|---|---|"
    )?;
    for row in &report.settle {
        writeln!(
            text,
            "| {} | {} | {} | {} | {} |",
            row.store,
            row.settles_per_second,
            row.reserves_per_second,
            row.settles,
            row.concurrency
        )?;
    }
    writeln!(
        text,
        "\nrequest latency in process, fake engine {} tokens × {} µs, {} in flight, {} requests per side:",
        report.output_tokens,
        report.decode_step_us,
        report.request_concurrency,
        report
            .overhead
            .first()
            .map_or(0, |o| o.with_metering.requests)
    )?;
    writeln!(
        text,
        "| store | p50 ms metered / plain | p99 ms metered / plain | p50 ratio | p99 ratio |\n|---|---|---|---|---|"
    )?;
    for row in &report.overhead {
        writeln!(
            text,
            "| {} | {:.2} / {:.2} | {:.2} / {:.2} | {:.3}× | {:.3}× |",
            row.store,
            row.with_metering.p50_ms,
            row.without_metering.p50_ms,
            row.with_metering.p99_ms,
            row.without_metering.p99_ms,
            row.p50_ratio,
            row.p99_ratio
        )?;
    }
    if let Some(outside) = &report.outside {
        write_outside(&mut text, outside)?;
    }
    std::io::stdout().lock().write_all(text.as_bytes())?;
    Ok(())
}

fn write_outside(text: &mut String, outside: &OutsideReport) -> anyhow::Result<()> {
    writeln!(
        text,
        "\nfrom outside, open loop at {} req/s against an instant upstream, {} passes × {} requests per target:",
        outside.rate_per_s, outside.passes, outside.requests_per_pass
    )?;
    writeln!(
        text,
        "| target | store | billing | p50 ms | p99 ms | added p50 ms | added p99 ms | p99 per pass |\n|---|---|---|---|---|---|---|---|"
    )?;
    for row in &outside.targets {
        let passes: Vec<String> = row.pass_p99_ms.iter().map(|p| format!("{p:.2}")).collect();
        writeln!(
            text,
            "| {} | {} | {} | {:.2} | {:.2} | {:+.2} | {:+.2} | {} |",
            row.target,
            row.store,
            if row.billing { "on" } else { "off" },
            row.p50_ms,
            row.p99_ms,
            row.added_p50_ms,
            row.added_p99_ms,
            passes.join(" ")
        )?;
    }
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
    let key = ledger
        .create_key(tenant, "bench", &AuditContext::ADMIN)
        .await?;
    // Quotas on the metered side: generous limits that every request passes, so the windows
    // are updated on every request like in production.
    if enforce {
        generous_rate_limits(ledger, &key.record.key_id).await?;
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

async fn generous_rate_limits(
    ledger: &Ledger,
    key_id: &tidepool_core::KeyId,
) -> anyhow::Result<()> {
    ledger
        .set_rate_limits(
            &RateScope::Key {
                key_id: key_id.clone(),
            },
            RateLimits {
                requests_per_minute: Some(1_000_000),
                tokens_per_minute: Some(1_000_000_000),
            },
            &AuditContext::ADMIN,
        )
        .await?;
    Ok(())
}

/// A fresh tenant with (nearly) unlimited credit, named for this run.
async fn bench_tenant(ledger: &Ledger) -> anyhow::Result<TenantId> {
    let tenant = TenantId::new(format!("bench-{}", std::process::id()))?;
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
    Ok(tenant)
}

/// In-process overhead: a metered and a plain gateway per store, all driven in rounds.
async fn overhead(args: &LedgerBenchArgs, urls: &[String]) -> anyhow::Result<Vec<OverheadRow>> {
    // (store, metered, plain) per store.
    let mut sides = Vec::new();
    for url in urls {
        let ledger = Ledger::connect(url)
            .await
            .with_context(|| format!("overhead ledger on {url}"))?;
        let tenant = bench_tenant(&ledger).await?;
        ledger
            .set_price(
                &tidepool_ledger::bench_price(ModelId::new("bench-fake")?),
                &AuditContext::ADMIN,
            )
            .await?;
        let metered = gateway(&ledger, true, args, &tenant).await?;
        let plain = gateway(&ledger, false, args, &tenant).await?;
        sides.push((ledger.store_kind(), metered, plain));
    }
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    let targets: Vec<&Gateway> = sides.iter().flat_map(|(_, m, p)| [m, p]).collect();
    // Warm every side (connections, first-use allocations), untimed.
    for target in &targets {
        batch(&client, target, args, args.request_concurrency).await?;
    }
    let rounds = 10_u32;
    let per_round = args.requests.div_ceil(rounds).max(1);
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    for round in 0..rounds {
        // Rotate which side goes first.
        let shift = usize::try_from(round).unwrap_or(0) % targets.len();
        for index in (0..targets.len()).map(|i| (i + shift) % targets.len()) {
            let taken = batch(&client, targets[index], args, per_round).await?;
            samples[index].extend(taken);
        }
    }
    let mut rows = Vec::new();
    let mut samples = samples.into_iter();
    for (store, metered, plain) in sides {
        metered.server.abort();
        plain.server.abort();
        let with = side_report(samples.next().unwrap_or_default());
        let without = side_report(samples.next().unwrap_or_default());
        rows.push(OverheadRow {
            store,
            p50_ratio: with.p50_ms / without.p50_ms.max(f64::MIN_POSITIVE),
            p99_ratio: with.p99_ms / without.p99_ms.max(f64::MIN_POSITIVE),
            with_metering: with,
            without_metering: without,
        });
    }
    Ok(rows)
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
                samples.push(ms(sent.elapsed()));
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

/// An OpenAI-compatible upstream that answers every chat completion at once; its base URL.
async fn instant_upstream() -> anyhow::Result<(String, tokio::task::JoinHandle<()>)> {
    let answer = serde_json::to_string(&json!({
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 0,
        "model": OUTSIDE_MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9},
    }))?;
    let models = serde_json::to_string(&json!({
        "object": "list",
        "data": [{"id": OUTSIDE_MODEL, "object": "model", "owned_by": "bench"}],
    }))?;
    let json_body = |body: String| {
        (
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body,
        )
    };
    let app = axum::Router::new()
        .route(
            "/v1/chat/completions",
            // The request body is read, so the connection stays reusable.
            axum::routing::post(move |_body: axum::body::Bytes| {
                let answer = answer.clone();
                async move { json_body(answer) }
            }),
        )
        .route(
            "/v1/models",
            axum::routing::get(move || {
                let models = models.clone();
                async move { json_body(models) }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "bench upstream stopped");
        }
    });
    Ok((base, server))
}

/// One target of the outside measurement.
struct OutsideTarget {
    target: &'static str,
    store: &'static str,
    billing: bool,
    url: String,
    key: String,
    /// The gateway process (none for the direct call).
    child: Option<ChildServer>,
}

impl OutsideTarget {
    /// How the logs name it, e.g. `gateway sqlite billing on`.
    fn label(&self) -> String {
        let billing = if self.billing { "on" } else { "off" };
        format!("{} {} billing {billing}", self.target, self.store)
    }
}

/// A `tidepool serve` routing [`OUTSIDE_MODEL`] to `upstream`, with billing on or off, on the
/// ledger at `database_url` (`None`: a SQLite file in its directory); its key is a fresh
/// tenant's, with credit, and on the billed side generous RPM/TPM limits that every request
/// passes (so the windows are counted as in production).
async fn outside_gateway(
    root: &Path,
    upstream: &str,
    billing: bool,
    database_url: Option<&str>,
    baseline: Option<&Path>,
    timeout_s: u64,
) -> anyhow::Result<OutsideTarget> {
    let store = if database_url.is_some() {
        "postgres"
    } else {
        "sqlite"
    };
    let target = if baseline.is_some() {
        "baseline"
    } else {
        "gateway"
    };
    let name = format!(
        "{target}-{store}-billing-{}",
        if billing { "on" } else { "off" }
    );
    let mut child = match database_url {
        Some(url) => ChildServer::with_database_url(root, &name, url.to_owned())?,
        None => ChildServer::new(root, &name)?,
    };
    if let Some(binary) = baseline {
        child.set_binary(binary.to_owned());
    }
    child.write_config(&format!(
        "\n[billing]\nenforce = {billing}\n\n[[models]]\nid = \"{OUTSIDE_MODEL}\"\nkind = \"chat\"\n\
         backend = \"remote\"\nprice_input_per_mtok = 50_000_000\nprice_output_per_mtok = 200_000_000\n\n\
         [[backends]]\nid = \"instant\"\nkind = \"upstream\"\nurl = \"{upstream}\"\nregion = \"local\"\n\
         models = [\"{OUTSIDE_MODEL}\"]\n"
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
        let key = ledger
            .create_key(&tenant, "bench", &AuditContext::ADMIN)
            .await?;
        if billing {
            generous_rate_limits(&ledger, &key.record.key_id).await?;
        }
        key.secret
    };
    child
        .start(&["serve"], timeout_s)
        .await
        .with_context(|| format!("gateway {name}"))?;
    Ok(OutsideTarget {
        target,
        store,
        billing,
        url: format!("{}/v1/chat/completions", child.base()),
        key,
        child: Some(child),
    })
}

async fn outside(
    args: &LedgerBenchArgs,
    dir: &Path,
    postgres: Option<&str>,
) -> anyhow::Result<OutsideReport> {
    anyhow::ensure!(
        args.outside_rate_per_s > 0,
        "--outside-rate-per-s must be positive"
    );
    let root = dir.join("outside");
    std::fs::create_dir_all(&root)?;
    let (upstream, upstream_server) = instant_upstream().await?;
    let mut targets = vec![OutsideTarget {
        target: "direct",
        store: "-",
        billing: false,
        url: format!("{upstream}/v1/chat/completions"),
        key: "direct".to_owned(),
        child: None,
    }];
    // SQLite (a file per gateway), then PostgreSQL unless it is `none`.
    for database_url in std::iter::once(None).chain(postgres.map(Some)) {
        let mut gateways = vec![(false, None), (true, None)];
        if let Some(baseline) = &args.outside_baseline_bin {
            gateways.push((false, Some(baseline.as_path())));
            gateways.push((true, Some(baseline.as_path())));
        }
        for (billing, baseline) in gateways {
            targets.push(
                outside_gateway(
                    &root,
                    &upstream,
                    billing,
                    database_url,
                    baseline,
                    args.startup_timeout_s,
                )
                .await?,
            );
        }
    }
    let client = open_loop::client()?;
    // Every request of the run, warm-up and timed: one non-stream chat completion.
    let body = json!({
        "model": OUTSIDE_MODEL,
        "messages": [{"role": "user", "content": "one two three"}],
        "max_tokens": 8,
    });
    let target_names: Vec<String> = targets.iter().map(OutsideTarget::label).collect();
    let named: Vec<open_loop::Target<'_>> = targets
        .iter()
        .zip(&target_names)
        .map(|(target, name)| open_loop::Target {
            name,
            url: &target.url,
            key: &target.key,
        })
        .collect();
    let (samples, pass_p99) = open_loop::interleaved(
        &client,
        &named,
        &body,
        args.outside_passes,
        args.outside_rate_per_s,
        args.outside_requests,
    )
    .await?;
    upstream_server.abort();
    let rows = outside_rows(targets, samples, pass_p99).await?;
    Ok(OutsideReport {
        rate_per_s: args.outside_rate_per_s,
        requests_per_pass: args.outside_requests,
        passes: args.outside_passes,
        targets: rows,
    })
}

/// Each target's figures, and what it adds over the direct call (the first target); stops the
/// gateways.
async fn outside_rows(
    mut targets: Vec<OutsideTarget>,
    samples: Vec<Vec<f64>>,
    pass_p99: Vec<Vec<f64>>,
) -> anyhow::Result<Vec<OutsideRow>> {
    let mut rows = Vec::new();
    let mut direct = (0.0, 0.0);
    for ((target, mut taken), passes) in targets.iter_mut().zip(samples).zip(pass_p99) {
        if let Some(mut child) = target.child.take() {
            child.kill().await?;
        }
        let p50 = percentile(&mut taken, 50);
        let p99 = percentile(&mut taken, 99);
        if target.target == "direct" {
            direct = (p50, p99);
        }
        rows.push(OutsideRow {
            target: target.target,
            store: target.store,
            billing: target.billing,
            requests: taken.len(),
            p50_ms: p50,
            p99_ms: p99,
            added_p50_ms: p50 - direct.0,
            added_p99_ms: p99 - direct.1,
            pass_p99_ms: passes,
        });
    }
    Ok(rows)
}
