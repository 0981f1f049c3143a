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
//! `--shared-prefix-tokens N` opens every prompt with one shared system prompt of about N tokens
//! instead: the prefix-cache workload, where both servers reuse the prefix's KV (llama-server's
//! `cache_prompt` is on by default).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::bail;
use serde::Serialize;
use tokio::time::Instant;

use crate::client::{data_events, event_text};
use crate::common::{SMOLLM2_FILE, ms, percentile, prompt_for, shared_prefix};
use crate::process::{LlamaServer, TidepoolServer};

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
    /// A shared system prompt of about this many tokens opens every request (the unique part
    /// follows): the prefix-cache workload. 0: every prompt differs from its first words.
    #[arg(long, env = "TIDEPOOL_BENCH_SHARED_PREFIX_TOKENS", default_value_t = 0)]
    shared_prefix_tokens: u32,
}

impl EngineBenchArgs {
    /// The prompt of request `number`: the shared prefix (if any), then its unique text.
    fn prompt(&self, number: u32) -> String {
        let unique = prompt_for(number, self.prompt_tokens);
        if self.shared_prefix_tokens == 0 {
            return unique;
        }
        format!("{}\n{unique}", shared_prefix(self.shared_prefix_tokens))
    }
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
    /// Tokens of the system prompt every request shares (about), 0 for none.
    shared_prefix_tokens: u32,
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

fn default_model_path() -> PathBuf {
    tidepool_core::config::default_models_dir().join(SMOLLM2_FILE)
}

/// The prompt number of one request: unique per (pass, concurrency level, round, stream), so no
/// request repeats an earlier level's prompt and no server can answer it from a prompt cache
/// (llama-server and Tidepool reuse a slot whose cached prompt matches) beyond the shared
/// prefix of `--shared-prefix-tokens`.
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

#[expect(
    clippy::too_many_lines,
    reason = "the three measured systems read best as one sequence, top to bottom"
)]
pub(crate) async fn run(args: EngineBenchArgs) -> anyhow::Result<()> {
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
        shared_prefix_tokens: args.shared_prefix_tokens,
        output_tokens: args.output_tokens,
        ..EngineReport::default()
    };
    let mut out = std::io::stdout().lock();
    let work = work_dir()?;
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

fn work_dir() -> anyhow::Result<PathBuf> {
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
            .map(|i| args.prompt(request_number(numbers, round, i)))
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

pub(crate) fn run_raw_generate(args: &RawGenerateArgs) -> anyhow::Result<()> {
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
        let (output_tokens, rounds) = (args.output_tokens, rounds_for(args, numbers.concurrency));
        let prompts: Vec<String> = (0..rounds)
            .map(|round| args.prompt(request_number(numbers, round, stream)))
            .collect();
        async move {
            let mut samples = Samples::default();
            for prompt in prompts {
                let body = serde_json::json!({
                    "model": model,
                    "prompt": prompt,
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
        "prompt": args.prompt(WARM_UP_REQUEST),
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
    let mut last: Option<Instant> = None;
    data_events(response, |event| {
        if event_text(event).is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        match last {
            None => samples.ttft_ms.push(ms(now - sent)),
            Some(prev) => samples.itl_ms.push(ms(now - prev)),
        }
        last = Some(now);
        samples.tokens += 1;
        Ok(())
    })
    .await?;
    samples.requests += 1;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_level_repeats_another_levels_prompts() {
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
    }
}
