//! `tidepool bench …`: benchmarks, always reported as ratios against a baseline measured in the
//! same run on the same machine (machines here are noisy; absolute numbers travel badly).
//!
//! `bench engine` measures, on the same GGUF, prompt and output lengths, at each concurrency:
//! (a) the raw llama-cpp-2 batched loop with no server (the engine's limit on this machine),
//! (b) Tidepool over HTTP, (c) llama.cpp's own `llama-server` with continuous batching. (b) and
//! (c) are driven by the same load generator: one async task per stream in this process, which
//! costs a few percent of one core, so the servers keep the machine. Both servers stay up and
//! `--repeats` passes run every level on every system in a rotating order, each system's
//! figures summing its passes, so the machine's drift falls on all three alike; every prompt is
//! unique (no prompt cache can answer it) and each server gets one untimed warm-up request.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use serde::Serialize;
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// Arguments of `tidepool bench`.
#[derive(Debug, clap::Args)]
pub(crate) struct BenchArgs {
    #[command(subcommand)]
    pub(crate) command: BenchCommand,
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum BenchCommand {
    /// Raw llama.cpp loop vs Tidepool over HTTP vs llama-server, at several concurrencies.
    Engine(EngineBenchArgs),
    /// Greedy generation with the raw llama.cpp loop (no server), printed as JSON: the reference
    /// output that black-box tests compare the server's temperature-0 output with.
    RawGenerate(RawGenerateArgs),
    /// Simulator speed: simulated requests per second of one core (`tidepool-sim`).
    Sim(crate::sim_cmd::BenchSimArgs),
    /// Ledger: settles per second on SQLite and PostgreSQL, and the request latency metering +
    /// quotas add (with vs without, same run).
    Ledger(crate::bench_ledger::LedgerBenchArgs),
    /// Model pool on the real engine: 8 models in a budget that fits 3, Zipf(1) popularity,
    /// Azure conversation lengths scaled down, Poisson rates swept; token-SLO attainment,
    /// goodput, p99 TTFT, switches/s and the sustainable rate of `dedicated`, `swap-lru`, `token`.
    Pool(crate::bench_pool::PoolBenchArgs),
    /// Measure the local models through the pool's engine path and write a simulator profile
    /// (TOML) fitted from the samples.
    Calibrate(crate::bench_calibrate::CalibrateArgs),
    /// Remote backends: time from a worker's death to the first successful retried request and
    /// requests lost over N trials; the latency the gateway adds over a direct call (same run).
    Failover(crate::bench_failover::FailoverBenchArgs),
}

#[derive(Debug, clap::Args)]
pub(crate) struct EngineBenchArgs {
    /// The GGUF to serve (default: `SmolLM2-135M-Instruct.Q4_1.gguf` in the models dir).
    #[arg(long, env = "TIDEPOOL_BENCH_MODEL_PATH")]
    model_path: Option<PathBuf>,
    /// Concurrent streams, comma-separated.
    #[arg(
        long,
        env = "TIDEPOOL_BENCH_CONCURRENCY",
        value_delimiter = ',',
        default_value = "1,4,16"
    )]
    concurrency: Vec<u32>,
    /// Approximate prompt length of every request, in tokens.
    #[arg(long, env = "TIDEPOOL_BENCH_PROMPT_TOKENS", default_value_t = 128)]
    prompt_tokens: u32,
    /// Completion tokens asked of every request.
    #[arg(long, env = "TIDEPOOL_BENCH_OUTPUT_TOKENS", default_value_t = 128)]
    output_tokens: u32,
    /// Sequential requests each stream sends per concurrency level (at most 99).
    #[arg(long, env = "TIDEPOOL_BENCH_ROUNDS", default_value_t = 2)]
    rounds: u32,
    /// Fewest requests per level and pass: a level of few streams runs more rounds (at 1 stream
    /// and the defaults, 8 rounds instead of 2, so a TTFT p50 is not the middle of 6 samples).
    #[arg(long, env = "TIDEPOOL_BENCH_REQUESTS_MIN", default_value_t = 8)]
    requests_min: u32,
    /// llama.cpp's `llama-server` binary for baseline (c); skipped when absent.
    #[arg(long, env = "TIDEPOOL_BENCH_LLAMA_SERVER")]
    llama_server: Option<PathBuf>,
    /// Where the JSON report goes.
    #[arg(
        long,
        env = "TIDEPOOL_BENCH_OUT",
        default_value = "bench/out/engine.json"
    )]
    out: PathBuf,
    /// Seconds to wait for a server to become healthy.
    #[arg(long, default_value_t = 300)]
    startup_timeout_s: u64,
    /// Measurement passes. Each pass runs every level on every system, the systems in a
    /// rotating order, and a system's figures sum its passes: slow drift of a noisy machine
    /// falls on all three alike instead of on whichever ran last.
    #[arg(long, env = "TIDEPOOL_BENCH_REPEATS", default_value_t = 3)]
    repeats: u32,
    /// Tidepool with `[pool] prefill_riders = true` (decoding streams ride in prefills).
    #[arg(long, env = "TIDEPOOL_BENCH_PREFILL_RIDERS")]
    prefill_riders: bool,
}

#[derive(Debug, clap::Args)]
pub(crate) struct RawGenerateArgs {
    #[arg(long)]
    model_path: PathBuf,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 32)]
    max_tokens: u32,
}

pub(crate) async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.command {
        BenchCommand::Engine(args) => engine(args).await,
        BenchCommand::RawGenerate(args) => raw_generate(&args),
        BenchCommand::Sim(args) => crate::sim_cmd::run_bench_sim(&args),
        BenchCommand::Ledger(args) => crate::bench_ledger::run(args).await,
        BenchCommand::Pool(args) => crate::bench_pool::run(args).await,
        BenchCommand::Calibrate(args) => crate::bench_calibrate::run(&args),
        BenchCommand::Failover(args) => crate::bench_failover::run(args).await,
    }
}

/// Latency and throughput of one system at one concurrency.
#[derive(Debug, Clone, Serialize)]
struct LevelReport {
    concurrency: u32,
    requests: u32,
    /// Sends retried after a connection closed before any answer (see `one_stream`).
    retries: u32,
    tokens: u64,
    wall_s: f64,
    tokens_per_s: f64,
    ttft_ms_p50: f64,
    ttft_ms_p99: f64,
    itl_ms_p50: f64,
    itl_ms_p99: f64,
}

#[derive(Debug, Default, Serialize)]
struct EngineReport {
    model: String,
    prompt_tokens: u32,
    output_tokens: u32,
    repeats: u32,
    raw: Vec<LevelReport>,
    tidepool: Vec<LevelReport>,
    llama_server: Vec<LevelReport>,
}

/// Sends of one request retried after the server closed the connection before answering.
const SEND_RETRIES_MAX: u32 = 2;
const SEND_RETRY_DELAY_MS: u64 = 50;

/// Raw samples of one level, whatever produced them, and the generation time they span.
#[derive(Debug, Default, Clone)]
struct Samples {
    retries: u32,
    ttft_ms: Vec<f64>,
    itl_ms: Vec<f64>,
    tokens: u64,
    requests: u32,
    /// Time spent generating them; merged samples were measured one after the other, so their
    /// times add (concurrent streams are merged with none and timed as a whole).
    wall: Duration,
}

impl Samples {
    fn merge(&mut self, other: Self) {
        self.retries += other.retries;
        self.requests += other.requests;
        self.tokens += other.tokens;
        self.ttft_ms.extend(other.ttft_ms);
        self.itl_ms.extend(other.itl_ms);
        self.wall += other.wall;
    }

    fn tokens_per_s(&self) -> f64 {
        let wall_s = self.wall.as_secs_f64();
        if wall_s > 0.0 {
            f64::from(u32::try_from(self.tokens).unwrap_or(u32::MAX)) / wall_s
        } else {
            0.0
        }
    }

    fn report(mut self, concurrency: u32) -> LevelReport {
        let wall_s = self.wall.as_secs_f64();
        LevelReport {
            concurrency,
            requests: self.requests,
            retries: self.retries,
            tokens: self.tokens,
            wall_s,
            tokens_per_s: self.tokens_per_s(),
            ttft_ms_p50: percentile(&mut self.ttft_ms, 50),
            ttft_ms_p99: percentile(&mut self.ttft_ms, 99),
            itl_ms_p50: percentile(&mut self.itl_ms, 50),
            itl_ms_p99: percentile(&mut self.itl_ms, 99),
        }
    }
}

/// Nearest-rank percentile; 0 for no samples.
pub(crate) fn percentile(values: &mut [f64], pct: usize) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let rank = (pct * values.len()).div_ceil(100).clamp(1, values.len());
    values.get(rank - 1).copied().unwrap_or(0.0)
}

fn default_model_path() -> PathBuf {
    tidepool_core::config::default_models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The prompt number of one request: unique per (pass, concurrency level, round, stream), so no
/// request repeats an earlier level's prompt and no server can answer it from a prompt cache
/// (llama-server reuses a slot whose cached prompt matches; Tidepool does not).
fn request_number(numbers: RequestNumbers, round: u32, stream: u32) -> u32 {
    numbers
        .pass
        .saturating_mul(10_000_000)
        .saturating_add(numbers.concurrency.saturating_mul(100_000))
        .saturating_add(round.saturating_mul(1000))
        .saturating_add(stream)
}

/// Rounds of a level: `--rounds`, or more when that sends fewer than `--requests-min` requests.
fn rounds_for(args: &EngineBenchArgs, concurrency: u32) -> u32 {
    args.rounds
        .max(args.requests_min.div_ceil(concurrency.max(1)))
        .min(ROUNDS_MAX)
}

/// Rounds a level may run: a request's number keeps its round in three decimal digits.
const ROUNDS_MAX: u32 = 99;

/// Which level of which pass a request belongs to (its prompt number's prefix).
#[derive(Debug, Clone, Copy)]
struct RequestNumbers {
    concurrency: u32,
    pass: u32,
}

/// Prompt number of the untimed warm-up request each server gets before its first level.
const WARM_UP_REQUEST: u32 = u32::MAX;

/// A deterministic prose prompt of roughly `tokens` tokens (about 1.3 tokens per word here),
/// made unique per request so neither server can serve it from a prompt cache.
pub(crate) fn prompt_for(request: u32, tokens: u32) -> String {
    const WORDS: [&str; 16] = [
        "river", "lantern", "harbour", "quiet", "morning", "stone", "bridge", "garden", "winter",
        "letter", "window", "market", "thunder", "orchard", "voyage", "compass",
    ];
    let mut text = format!("Story {request}. Continue this text:");
    let words = tokens * 10 / 13;
    for i in 0..words {
        let index = usize::try_from((i * 7 + request * 3) % 16).unwrap_or(0);
        text.push(' ');
        text.push_str(WORDS.get(index).copied().unwrap_or("sea"));
    }
    text
}

#[expect(
    clippy::too_many_lines,
    reason = "the three measured systems read best as one sequence, top to bottom"
)]
async fn engine(args: EngineBenchArgs) -> anyhow::Result<()> {
    let model_path = args.model_path.clone().unwrap_or_else(default_model_path);
    if !model_path.exists() {
        bail!(
            "model file {} not found: run `make models`",
            model_path.display()
        );
    }
    let seqs_max = args.concurrency.iter().copied().max().unwrap_or(1);
    let mut report = EngineReport {
        model: model_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        prompt_tokens: args.prompt_tokens,
        output_tokens: args.output_tokens,
        ..EngineReport::default()
    };
    let mut out = std::io::stdout().lock();
    let work = tempfile_dir()?;
    let tidepool = TidepoolServer::start(
        &model_path,
        seqs_max,
        args.prefill_riders,
        &work,
        args.startup_timeout_s,
    )
    .await?;
    warm_up(&tidepool.base, Some(&tidepool.key), "smollm2", &args).await?;
    let peer = if let Some(binary) = &args.llama_server {
        let server =
            LlamaServer::start(binary, &model_path, seqs_max, args.startup_timeout_s).await?;
        warm_up(&server.base, None, "model", &args).await?;
        Some(server)
    } else {
        writeln!(out, "llama-server: skipped (no --llama-server)")?;
        None
    };
    // Both servers stay up (an idle one takes no CPU); every pass measures (a) the raw loop,
    // (b) Tidepool over HTTP and (c) llama-server at each level, rotating which goes first.
    let levels = args.concurrency.len();
    let mut sums: Vec<[Samples; 3]> = vec![Default::default(); levels];
    for pass in 0..args.repeats.max(1) {
        for (level, &concurrency) in args.concurrency.iter().enumerate() {
            let numbers = RequestNumbers { concurrency, pass };
            for turn in 0..3_u32 {
                let system = usize::try_from((turn + pass) % 3).unwrap_or(0);
                let measured = match system {
                    0 => Some(raw_level(&model_path, numbers, &args)?),
                    1 => Some(
                        http_level(
                            &tidepool.base,
                            Some(&tidepool.key),
                            "smollm2",
                            numbers,
                            &args,
                        )
                        .await?,
                    ),
                    _ => match &peer {
                        Some(server) => {
                            Some(http_level(&server.base, None, "model", numbers, &args).await?)
                        }
                        None => None,
                    },
                };
                if let Some(samples) = measured {
                    let tokens_per_s = samples.tokens_per_s();
                    let name = ["raw", "tidepool", "llama-server"][system];
                    writeln!(
                        out,
                        "pass {pass} {name:<12} c={concurrency:<3} {tokens_per_s:>8.1} tok/s"
                    )?;
                    sums[level][system].merge(samples);
                }
            }
        }
    }
    tidepool.stop().await;
    if let Some(server) = peer {
        server.stop().await;
    }
    report.repeats = args.repeats.max(1);
    for (&concurrency, [raw, tp, peer]) in args.concurrency.iter().zip(sums) {
        report.raw.push(raw.report(concurrency));
        report.tidepool.push(tp.report(concurrency));
        if args.llama_server.is_some() {
            report.llama_server.push(peer.report(concurrency));
        }
    }

    write_table(&mut out, &report)?;
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.out, serde_json::to_vec_pretty(&report)?)?;
    writeln!(out, "report written to {}", args.out.display())?;
    Ok(())
}

fn write_table(out: &mut impl std::io::Write, report: &EngineReport) -> anyhow::Result<()> {
    writeln!(
        out,
        "\n| streams | raw tok/s | tidepool tok/s | llama-server tok/s | tidepool/raw | tidepool/llama-server | TTFT p50/p99 ms tidepool | TTFT p50/p99 ms llama-server | ITL p50/p99 ms tidepool | ITL p50/p99 ms llama-server |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|---|---|---|---|")?;
    for (index, raw) in report.raw.iter().enumerate() {
        let tp = report.tidepool.get(index);
        let ls = report.llama_server.get(index);
        let tps = |l: Option<&LevelReport>| {
            l.map_or("–".to_owned(), |l| format!("{:.1}", l.tokens_per_s))
        };
        let ratio = |a: Option<&LevelReport>, b: Option<&LevelReport>| match (a, b) {
            (Some(a), Some(b)) if b.tokens_per_s > 0.0 => {
                format!("{:.2}×", a.tokens_per_s / b.tokens_per_s)
            }
            _ => "–".to_owned(),
        };
        let lat = |l: Option<&LevelReport>, ttft: bool| {
            l.map_or("–".to_owned(), |l| {
                if ttft {
                    format!("{:.0} / {:.0}", l.ttft_ms_p50, l.ttft_ms_p99)
                } else {
                    format!("{:.1} / {:.1}", l.itl_ms_p50, l.itl_ms_p99)
                }
            })
        };
        writeln!(
            out,
            "| {} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {} |",
            raw.concurrency,
            raw.tokens_per_s,
            tps(tp),
            tps(ls),
            ratio(tp, Some(raw)),
            ratio(tp, ls),
            lat(tp, true),
            lat(ls, true),
            lat(tp, false),
            lat(ls, false),
        )?;
    }
    let retries = |levels: &[LevelReport]| levels.iter().map(|l| l.retries).sum::<u32>();
    writeln!(
        out,
        "\n{} passes, systems interleaved; sends retried after a closed connection: tidepool {}, llama-server {}",
        report.repeats,
        retries(&report.tidepool),
        retries(&report.llama_server)
    )?;
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("tidepool-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// One level of the raw loop: `rounds` batches of `concurrency` streams decoded together.
fn raw_level(
    model_path: &Path,
    numbers: RequestNumbers,
    args: &EngineBenchArgs,
) -> anyhow::Result<Samples> {
    // Only generation counts: each batch's time starts after model load and context creation,
    // as the servers' clocks start after their start-up; the batches' times add.
    let mut samples = Samples::default();
    for round in 0..rounds_for(args, numbers.concurrency) {
        let prompts: Vec<String> = (0..numbers.concurrency)
            .map(|i| prompt_for(request_number(numbers, round, i), args.prompt_tokens))
            .collect();
        samples.merge(raw_batch(model_path, &prompts, args.output_tokens)?);
    }
    Ok(samples)
}

/// One raw batch: its samples, timed from after load.
fn raw_batch(model_path: &Path, prompts: &[String], output_tokens: u32) -> anyhow::Result<Samples> {
    use tidepool_engine::bench::{RawBatchedConfig, RawPrompt, raw_batched_generate};
    // The raw loop gives every stream the same prompt; use the first (prefix reuse is off there).
    let prompt = prompts.first().cloned().unwrap_or_default();
    let streams = u32::try_from(prompts.len())?;
    let config = RawBatchedConfig::new(model_path, streams, output_tokens);
    let report = raw_batched_generate(&config, &RawPrompt::Text(prompt))?;
    let mut samples = Samples {
        requests: streams,
        tokens: report.generated_tokens(),
        wall: report.total,
        ..Samples::default()
    };
    for stream in &report.streams {
        if let Some(first) = stream.first_token_time() {
            samples.ttft_ms.push(ms(first));
        }
        samples.itl_ms.extend(stream.inter_token_gaps().map(ms));
    }
    Ok(samples)
}

fn raw_generate(args: &RawGenerateArgs) -> anyhow::Result<()> {
    let text =
        tidepool_engine::bench::raw_greedy_text(&args.model_path, &args.prompt, args.max_tokens)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::json!({ "text": text }))?;
    Ok(())
}

/// One level over HTTP: `concurrency` streams, each sending `rounds` requests in a row.
async fn http_level(
    base: &str,
    key: Option<&str>,
    model: &str,
    numbers: RequestNumbers,
    args: &EngineBenchArgs,
) -> anyhow::Result<Samples> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;
    let start = Instant::now();
    let streams = (0..numbers.concurrency).map(|stream| {
        let client = client.clone();
        let url = format!("{base}/v1/completions");
        let key = key.map(str::to_owned);
        let model = model.to_owned();
        let (prompt_tokens, output_tokens, rounds) = (
            args.prompt_tokens,
            args.output_tokens,
            rounds_for(args, numbers.concurrency),
        );
        async move {
            let mut samples = Samples::default();
            for round in 0..rounds {
                let body = serde_json::json!({
                    "model": model,
                    "prompt": prompt_for(request_number(numbers, round, stream), prompt_tokens),
                    "max_tokens": output_tokens,
                    "temperature": 0,
                    "stream": true,
                });
                one_stream(&client, &url, key.as_deref(), &body, &mut samples).await?;
            }
            anyhow::Ok(samples)
        }
    });
    let results = futures::future::join_all(streams).await;
    // The streams ran at once: the level's time is the whole, not their sum.
    let mut total = Samples {
        wall: start.elapsed(),
        ..Samples::default()
    };
    for result in results {
        total.merge(result?);
    }
    Ok(total)
}

/// One untimed request before a server's first level: whatever a server does lazily on its
/// first request (Tidepool's pool loads the model then; llama-server allocates up front) is
/// not charged to the first level. Both servers get the same request.
async fn warm_up(
    base: &str,
    key: Option<&str>,
    model: &str,
    args: &EngineBenchArgs,
) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let body = serde_json::json!({
        "model": model,
        "prompt": prompt_for(WARM_UP_REQUEST, args.prompt_tokens),
        "max_tokens": 8,
        "temperature": 0,
        "stream": true,
    });
    let url = format!("{base}/v1/completions");
    one_stream(&client, &url, key, &body, &mut Samples::default()).await
}

/// Sends one streaming completion and records TTFT and inter-token gaps; every SSE event with
/// non-empty text counts as one token (both servers send one event per token).
async fn one_stream(
    client: &reqwest::Client,
    url: &str,
    key: Option<&str>,
    body: &serde_json::Value,
    samples: &mut Samples,
) -> anyhow::Result<()> {
    let build = || {
        let request = client.post(url).json(body);
        match key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    };
    let mut sent = Instant::now();
    let mut response = build().send().await;
    // A connection the server closed before answering (seen from llama-server between levels:
    // "connection closed before message completed", nothing in its log) is retried, as an
    // HTTP client would; TTFT counts from the retry's send and the report counts retries.
    for _ in 0..SEND_RETRIES_MAX {
        match &response {
            Err(error) if error.is_request() || error.is_connect() => {
                samples.retries += 1;
                tokio::time::sleep(Duration::from_millis(SEND_RETRY_DELAY_MS)).await;
                sent = Instant::now();
                response = build().send().await;
            }
            _ => break,
        }
    }
    let response = response?;
    if !response.status().is_success() {
        bail!(
            "{url}: HTTP {}: {}",
            response.status(),
            response.text().await.unwrap_or_default()
        );
    }
    let mut bytes = response.bytes_stream();
    let mut buffer = Vec::new();
    let mut last: Option<Instant> = None;
    while let Some(chunk) = bytes.next().await {
        buffer.extend_from_slice(&chunk?);
        while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buffer.drain(..end + 2).collect();
            let Some(data) = event.strip_prefix(b"data: ") else {
                continue;
            };
            let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
                continue;
            };
            let text = value
                .pointer("/choices/0/text")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("");
            if text.is_empty() {
                continue;
            }
            let now = Instant::now();
            match last {
                None => samples.ttft_ms.push(ms(now - sent)),
                Some(prev) => samples.itl_ms.push(ms(now - prev)),
            }
            last = Some(now);
            samples.tokens += 1;
        }
    }
    samples.requests += 1;
    Ok(())
}

/// A duration in milliseconds.
pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A loopback port free right now (a race with other processes is possible but harmless here).
pub(crate) fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Polls `base` + `path` until it answers 2xx, the child exits, or `timeout_s` seconds pass.
pub(crate) async fn wait_healthy(
    base: &str,
    path: &str,
    child: &mut Child,
    timeout_s: u64,
) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(timeout_s);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            bail!("server exited during start-up: {status}");
        }
        if let Ok(response) = client.get(format!("{base}{path}")).send().await
            && response.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("{base} did not become healthy within {timeout_s} s")
}

/// `tidepool serve` as a child process, with a one-model config and a fresh SQLite ledger.
struct TidepoolServer {
    child: Child,
    base: String,
    key: String,
}

impl TidepoolServer {
    async fn start(
        model: &Path,
        seqs_max: u32,
        prefill_riders: bool,
        work: &Path,
        timeout_s: u64,
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let port = free_port()?;
        let db = work.join("bench.db");
        let database_url = format!("sqlite://{}", db.display());
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\ndatabase_url = \"{database_url}\"\n\n\
             [pool]\nprefill_riders = {prefill_riders}\n\n\
             [[models]]\nid = \"smollm2\"\nkind = \"chat\"\nfile = \"{}\"\ncontext_tokens = 2048\nseqs_max = {seqs_max}\n",
            model.display()
        );
        let config_path = work.join("bench.toml");
        std::fs::write(&config_path, config)?;
        let created = Command::new(&exe)
            .args([
                "keys",
                "create",
                "--database-url",
                &database_url,
                "--tenant",
                "bench",
                "--name",
                "bench",
            ])
            .output()
            .await?;
        let stdout = String::from_utf8_lossy(&created.stdout);
        let key = stdout
            .split_whitespace()
            .find(|w| w.starts_with("tp-"))
            .context("`tidepool keys create` printed no key")?
            .to_owned();
        let mut child = Command::new(&exe)
            .args(["serve", "--config"])
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let base = format!("http://127.0.0.1:{port}");
        wait_healthy(&base, "/healthz", &mut child, timeout_s).await?;
        Ok(Self { child, base, key })
    }

    async fn stop(mut self) {
        if let Err(error) = self.child.kill().await {
            tracing::warn!(%error, "could not stop the benchmarked tidepool server");
        }
    }
}

/// llama.cpp's `llama-server` with continuous batching over `seqs_max` slots.
struct LlamaServer {
    child: Child,
    base: String,
}

impl LlamaServer {
    async fn start(
        binary: &Path,
        model: &Path,
        seqs_max: u32,
        timeout_s: u64,
    ) -> anyhow::Result<Self> {
        let port = free_port()?;
        let ctx = (2048 * seqs_max).to_string();
        let lib_dir = binary.parent().map(Path::to_path_buf).unwrap_or_default();
        let log_path = std::env::temp_dir().join("tidepool-bench-llama-server.log");
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        let mut child = Command::new(binary)
            .arg("-m")
            .arg(model)
            .args([
                "-np",
                &seqs_max.to_string(),
                "-c",
                &ctx,
                "--port",
                &port.to_string(),
            ])
            .args(["--host", "127.0.0.1", "-a", "model"])
            .env("LD_LIBRARY_PATH", lib_dir)
            // Its log goes to a file: with both streams on /dev/null the peer died mid-run
            // twice on this machine kind (connection closed), and a log says why.
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let base = format!("http://127.0.0.1:{port}");
        wait_healthy(&base, "/health", &mut child, timeout_s).await?;
        Ok(Self { child, base })
    }

    async fn stop(mut self) {
        if let Err(error) = self.child.kill().await {
            tracing::warn!(%error, "could not stop llama-server");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert!((percentile(&mut v, 50) - 50.0).abs() < f64::EPSILON);
        assert!((percentile(&mut v, 99) - 99.0).abs() < f64::EPSILON);
        assert!(percentile(&mut [], 50).abs() < f64::EPSILON);
        let mut one = [7.0];
        assert!((percentile(&mut one, 99) - 7.0).abs() < f64::EPSILON);
    }

    #[test]
    fn prompts_differ_per_request_and_scale_with_length() {
        assert_ne!(prompt_for(1, 128), prompt_for(2, 128));
        // No level repeats another level's prompts.
        let mut numbers = std::collections::BTreeSet::new();
        for pass in 0..3 {
            for concurrency in [1, 4, 16] {
                let level = RequestNumbers { concurrency, pass };
                for round in 0..2 {
                    numbers.extend((0..concurrency).map(|s| request_number(level, round, s)));
                }
            }
        }
        assert_eq!(numbers.len(), 3 * 2 * (1 + 4 + 16));
        assert!(!numbers.contains(&WARM_UP_REQUEST));
        assert!(prompt_for(1, 256).len() > prompt_for(1, 128).len());
    }
}
