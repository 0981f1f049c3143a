//! `tidepool bench batch`: what a batch costs online traffic. The pooled runtime runs in this
//! process on the real llama.cpp engine (SmolLM2 and Gemma, 512 tokens × 4 slots each). An
//! open-loop online workload (Poisson arrivals over both models, Azure conversation lengths
//! scaled as `bench pool`'s short market) runs pass by pass, with and without `--batch-requests`
//! batch-class requests submitted directly to the runtime when the pass starts, interleaved
//! (with, without, without, with, …): every pass replays the same online schedule. Reported
//! per pass: online TTFT p50/p99 and token-deadline attainment, the batch requests that
//! finished meanwhile and the preemptions; the spread of each arm; and, first, the batch alone
//! on the idle pool (completion time and throughput). Batch requests left when a pass ends
//! are cancelled, and the next pass starts once the pool holds none.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;
use tidepool_core::{ModelId, RequestClass, RequestId};
use tidepool_engine::multi::MultiModelConfig;
use tidepool_engine::{GenerateRequest, Generation, GenerationEvent, SamplingParams, TextEngine};
use tidepool_runtime::{PoolRuntime, PooledModelConfig, RuntimeConfig};
use tidepool_sim::workload::{Arrivals, MarketSpec, Popularity, market};
use tidepool_sim::{Profile, read_azure_trace};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::common::{GEMMA_FILE, SMOLLM2_FILE, as_f64, ms, parse_policy, percentile, prompt_for};
use crate::workload::{CONTEXT_TOKENS, Market, SEQS_MAX, Slo};

/// Longest wait for the pool to drop a pass's leftover batch requests.
const DRAIN_TIMEOUT: Duration = Duration::from_mins(2);

#[derive(Debug, clap::Args)]
pub(crate) struct BatchBenchArgs {
    /// Pool policy (`swap-lru`, `token`, `dedicated`).
    #[arg(long, env = "TIDEPOOL_BENCH_POLICY", default_value = "swap-lru")]
    policy: String,
    /// Online arrivals per second, both models together (open loop).
    #[arg(long, env = "TIDEPOOL_BENCH_RATE_PER_S", default_value_t = 1.0)]
    rate_per_s: f64,
    /// Seconds of online arrivals per pass.
    #[arg(long, env = "TIDEPOOL_BENCH_PASS_S", default_value_t = 40)]
    pass_s: u32,
    /// Passes, in the order with, without, without, with, … (a multiple of 4 is balanced).
    #[arg(long, env = "TIDEPOOL_BENCH_PASSES", default_value_t = 4)]
    passes: u32,
    /// Batch-class requests submitted when a "with" pass starts (and in the idle run).
    #[arg(long, env = "TIDEPOOL_BENCH_BATCH_REQUESTS", default_value_t = 1000)]
    batch_requests: u32,
    /// Prompt tokens of each batch request.
    #[arg(long, env = "TIDEPOOL_BENCH_BATCH_PROMPT_TOKENS", default_value_t = 32)]
    batch_prompt_tokens: u32,
    /// Completion tokens of each batch request.
    #[arg(long, env = "TIDEPOOL_BENCH_BATCH_OUTPUT_TOKENS", default_value_t = 16)]
    batch_output_tokens: u32,
    /// Longest wait for the batch on the idle pool, in seconds.
    #[arg(long, env = "TIDEPOOL_BENCH_IDLE_TIMEOUT_S", default_value_t = 300)]
    idle_timeout_s: u64,
    /// Time-to-first-token SLO, in ms.
    #[arg(long, env = "TIDEPOOL_BENCH_TTFT_SLO_MS", default_value_t = 5000)]
    ttft_slo_ms: u64,
    /// Time-between-tokens SLO, in ms.
    #[arg(long, env = "TIDEPOOL_BENCH_TBT_SLO_MS", default_value_t = 250)]
    tbt_slo_ms: u64,
    /// Seed of the online schedule.
    #[arg(long, env = "TIDEPOOL_BENCH_SEED", default_value_t = 7)]
    seed: u64,
    /// Azure-format trace whose lengths the online requests take.
    #[arg(
        long,
        env = "TIDEPOOL_BENCH_TRACE",
        default_value = "data/traces/azure-llm-2023-conv.csv"
    )]
    trace: PathBuf,
    /// Where the GGUF files are.
    #[arg(long, env = "TIDEPOOL_MODELS_DIR")]
    models_dir: Option<PathBuf>,
    /// Where the JSON report goes.
    #[arg(
        long,
        env = "TIDEPOOL_BENCH_OUT",
        default_value = "bench/out/batch.json"
    )]
    out: PathBuf,
}

/// One online request of the schedule.
#[derive(Debug, Clone, Copy)]
struct Online {
    at: Duration,
    model: usize,
    prompt_tokens: u32,
    output_tokens: u32,
}

/// What one online request got.
#[derive(Debug, Clone, Copy, Default)]
struct Got {
    ttft_ms: Option<f64>,
    tokens: u64,
    on_time: u64,
    failed: bool,
}

#[derive(Debug, Serialize)]
struct Pass {
    index: u32,
    with_batch: bool,
    online_requests: usize,
    online_failed: usize,
    ttft_ms_p50: f64,
    ttft_ms_p99: f64,
    attainment: f64,
    /// Batch requests that finished during the pass.
    batch_finished: u64,
    batch_preemptions: u64,
}

#[derive(Debug, Serialize)]
struct Arm {
    passes: usize,
    ttft_ms_p99: f64,
    attainment: f64,
    /// Lowest and highest pass p99 TTFT.
    ttft_ms_p99_spread: (f64, f64),
    attainment_spread: (f64, f64),
}

#[derive(Debug, Serialize)]
struct Idle {
    requests: u32,
    finished: u64,
    completion_s: f64,
    tokens: u64,
    tokens_per_s: f64,
    requests_per_s: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    policy: String,
    rate_per_s: f64,
    pass_s: u32,
    batch_requests: u32,
    batch_prompt_tokens: u32,
    batch_output_tokens: u32,
    ttft_slo_ms: u64,
    tbt_slo_ms: u64,
    idle: Idle,
    passes: Vec<Pass>,
    with_batch: Arm,
    without_batch: Arm,
}

pub(crate) async fn run(args: BatchBenchArgs) -> anyhow::Result<()> {
    let runtime = start_runtime(&args).await?;
    let engines = runtime.engines();
    let slo = Slo {
        ttft_ms: args.ttft_slo_ms,
        tbt_ms: args.tbt_slo_ms,
    };
    let schedule = schedule(&args)?;
    tracing::info!(
        online_requests = schedule.len(),
        pass_s = args.pass_s,
        batch_requests = args.batch_requests,
        "bench batch: schedule ready"
    );
    // Warm both models (loads, first steps) outside any timing.
    for (model, engine) in engines.iter().enumerate() {
        let generation = submit(engine.as_ref(), 0, 16, 4, RequestClass::Online)?;
        let got = follow(generation, Instant::now(), slo).await;
        anyhow::ensure!(!got.failed, "warm-up request of model {model} failed");
    }
    let idle = idle_run(&args, &runtime, &engines).await?;
    tracing::info!(
        finished = idle.finished,
        completion_s = idle.completion_s,
        tokens_per_s = idle.tokens_per_s,
        "bench batch: the batch on the idle pool"
    );
    let mut passes = Vec::new();
    for index in 0..args.passes {
        let with_batch = matches!(index % 4, 0 | 3);
        let pass = one_pass(&args, &runtime, &engines, &schedule, index, with_batch, slo).await?;
        tracing::info!(
            index,
            with_batch,
            ttft_ms_p99 = pass.ttft_ms_p99,
            attainment = pass.attainment,
            batch_finished = pass.batch_finished,
            batch_preemptions = pass.batch_preemptions,
            "bench batch: pass done"
        );
        passes.push(pass);
    }
    let report = Report {
        policy: args.policy.clone(),
        rate_per_s: args.rate_per_s,
        pass_s: args.pass_s,
        batch_requests: args.batch_requests,
        batch_prompt_tokens: args.batch_prompt_tokens,
        batch_output_tokens: args.batch_output_tokens,
        ttft_slo_ms: args.ttft_slo_ms,
        tbt_slo_ms: args.tbt_slo_ms,
        idle,
        with_batch: arm(&passes, true),
        without_batch: arm(&passes, false),
        passes,
    };
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", args.out.display()))?;
    let mut stdout = std::io::stdout().lock();
    write!(stdout, "{}", table(&report))?;
    writeln!(stdout, "\nJSON: {}", args.out.display())?;
    Ok(())
}

/// The pooled runtime of the run: SmolLM2 and Gemma, 512 tokens × 4 slots, the SLOs of the
/// flags, room for the whole batch.
async fn start_runtime(args: &BatchBenchArgs) -> anyhow::Result<Arc<PoolRuntime>> {
    let policy = parse_policy(&args.policy)?;
    let dir = args
        .models_dir
        .clone()
        .unwrap_or_else(tidepool_core::config::default_models_dir);
    let models = [("smollm2", SMOLLM2_FILE), ("gemma", GEMMA_FILE)]
        .into_iter()
        .map(|(id, file)| {
            let mut engine = MultiModelConfig::new(ModelId::new(id)?, dir.join(file));
            engine.context_tokens = CONTEXT_TOKENS;
            engine.seqs_max = SEQS_MAX;
            Ok(PooledModelConfig {
                engine,
                pin: false,
                keep_alive_ms: None,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut config = RuntimeConfig::new(policy, models);
    config.pool.knobs.ttft_slo_ms = args.ttft_slo_ms;
    config.pool.knobs.tbt_slo_ms = args.tbt_slo_ms;
    config.pool.knobs.batch_queue_max = config.pool.knobs.batch_queue_max.max(args.batch_requests);
    tokio::task::spawn_blocking(move || PoolRuntime::start(&config))
        .await?
        .context("starting the pooled runtime")
}

/// The online schedule every pass replays: Poisson arrivals over the two models (equal
/// popularity), lengths from the trace scaled as `bench pool`'s short market.
fn schedule(args: &BatchBenchArgs) -> anyhow::Result<Vec<Online>> {
    let profile = Profile::load("cpu-devvm")?;
    let rows =
        read_azure_trace(&args.trace).with_context(|| format!("trace {}", args.trace.display()))?;
    let spec = MarketSpec {
        models: 2,
        popularity: Popularity::HotFew {
            hot_models: 2,
            hot_share: 1.0,
        },
        arrivals: Arrivals::Poisson {
            rate_per_s: args.rate_per_s,
            duration_s: f64::from(args.pass_s),
        },
        seed: args.seed,
    };
    let workload = market(&spec, &rows, &profile)?;
    Ok(workload
        .requests
        .iter()
        .map(|r| {
            let (prompt_tokens, output_tokens) =
                Market::Short.scale_lengths(r.prompt_tokens, r.output_tokens);
            Online {
                at: Duration::from_nanos(r.at_ns),
                model: usize::try_from(r.model).unwrap_or(0) % 2,
                prompt_tokens,
                output_tokens,
            }
        })
        .collect())
}

/// A greedy request of `prompt_tokens` (about) and `output_tokens`, unique per `index`.
fn submit(
    engine: &dyn TextEngine,
    index: u32,
    prompt_tokens: u32,
    output_tokens: u32,
    class: RequestClass,
) -> anyhow::Result<Generation> {
    let mut prompt = engine.tokenize(&prompt_for(index, prompt_tokens))?;
    prompt.truncate(usize::try_from(prompt_tokens.max(1)).unwrap_or(1));
    let request = GenerateRequest {
        remote: None,
        request_id: RequestId::new(),
        prompt,
        params: SamplingParams {
            temperature: 0.0,
            max_tokens: output_tokens,
            ..SamplingParams::default()
        },
        class,
    };
    Ok(engine.submit(request)?)
}

/// Reads a generation to its end: its first token's delay from `sent` and each token against
/// its deadline (`sent + TTFT SLO + k · TBT SLO`).
async fn follow(mut generation: Generation, sent: Instant, slo: Slo) -> Got {
    let mut got = Got::default();
    while let Some(event) = generation.events.recv().await {
        match event {
            GenerationEvent::Chunk { tokens, .. } => {
                let elapsed = sent.elapsed();
                if tokens > 0 && got.ttft_ms.is_none() {
                    got.ttft_ms = Some(ms(elapsed));
                }
                for _ in 0..tokens {
                    got.on_time += u64::from(elapsed <= slo.deadline(got.tokens));
                    got.tokens += 1;
                }
            }
            GenerationEvent::Done { .. } => return got,
            GenerationEvent::Failed(_) => break,
        }
    }
    got.failed = true;
    got
}

/// Submits the batch, each request read to its end by a task of `set`.
fn submit_batch(
    args: &BatchBenchArgs,
    engines: &[Arc<dyn TextEngine>],
    set: &mut JoinSet<Got>,
    slo: Slo,
) -> anyhow::Result<()> {
    for i in 0..args.batch_requests {
        let engine = &engines[usize::try_from(i).unwrap_or(0) % engines.len()];
        let generation = submit(
            engine.as_ref(),
            1_000_000 + i,
            args.batch_prompt_tokens,
            args.batch_output_tokens,
            RequestClass::Batch,
        )?;
        set.spawn(follow(generation, Instant::now(), slo));
    }
    Ok(())
}

/// The batch alone on the idle pool: completion time and throughput.
async fn idle_run(
    args: &BatchBenchArgs,
    runtime: &Arc<PoolRuntime>,
    engines: &[Arc<dyn TextEngine>],
) -> anyhow::Result<Idle> {
    let slo = Slo {
        ttft_ms: args.ttft_slo_ms,
        tbt_ms: args.tbt_slo_ms,
    };
    let started = Instant::now();
    let mut set = JoinSet::new();
    submit_batch(args, engines, &mut set, slo)?;
    let (mut finished, mut tokens) = (0_u64, 0_u64);
    let deadline = started + Duration::from_secs(args.idle_timeout_s);
    loop {
        match tokio::time::timeout_at(deadline, set.join_next()).await {
            Ok(Some(done)) => {
                let got = done?;
                finished += u64::from(!got.failed);
                tokens += got.tokens;
            }
            Ok(None) => break,
            Err(_) => {
                tracing::warn!(
                    timeout_s = args.idle_timeout_s,
                    "the idle batch did not finish in time"
                );
                set.abort_all();
                break;
            }
        }
    }
    let completion_s = started.elapsed().as_secs_f64();
    drain(runtime).await?;
    Ok(Idle {
        requests: args.batch_requests,
        finished,
        completion_s,
        tokens,
        tokens_per_s: as_f64(tokens) / completion_s,
        requests_per_s: as_f64(finished) / completion_s,
    })
}

/// One pass: the batch (when `with_batch`) submitted at its start, the online schedule replayed;
/// what is left of the batch is cancelled once every online request is done.
async fn one_pass(
    args: &BatchBenchArgs,
    runtime: &Arc<PoolRuntime>,
    engines: &[Arc<dyn TextEngine>],
    schedule: &[Online],
    index: u32,
    with_batch: bool,
    slo: Slo,
) -> anyhow::Result<Pass> {
    let before = runtime.status().counters;
    let mut batch = JoinSet::new();
    if with_batch {
        submit_batch(args, engines, &mut batch, slo)?;
    }
    let start = Instant::now() + Duration::from_millis(10);
    let mut online = JoinSet::new();
    for (i, request) in (0_u32..).zip(schedule) {
        tokio::time::sleep_until(start + request.at).await;
        let engine = &engines[request.model % engines.len()];
        let sent = Instant::now();
        match submit(
            engine.as_ref(),
            index * 100_000 + i,
            request.prompt_tokens,
            request.output_tokens,
            RequestClass::Online,
        ) {
            Ok(generation) => {
                online.spawn(follow(generation, sent, slo));
            }
            Err(error) => {
                tracing::warn!(%error, "online request refused");
                online.spawn(async {
                    Got {
                        failed: true,
                        ..Got::default()
                    }
                });
            }
        }
    }
    let mut got = Vec::new();
    while let Some(done) = online.join_next().await {
        got.push(done?);
    }
    batch.abort_all();
    while batch.join_next().await.is_some() {}
    drain(runtime).await?;
    let after = runtime.status().counters;
    let mut ttft: Vec<f64> = got.iter().filter_map(|g| g.ttft_ms).collect();
    let tokens: u64 = got.iter().map(|g| g.tokens).sum();
    let on_time: u64 = got.iter().map(|g| g.on_time).sum();
    Ok(Pass {
        index,
        with_batch,
        online_requests: got.len(),
        online_failed: got.iter().filter(|g| g.failed).count(),
        ttft_ms_p50: percentile(&mut ttft, 50),
        ttft_ms_p99: percentile(&mut ttft, 99),
        attainment: if tokens == 0 {
            1.0
        } else {
            as_f64(on_time) / as_f64(tokens)
        },
        batch_finished: after.batch_finished - before.batch_finished,
        batch_preemptions: after.batch_preemptions - before.batch_preemptions,
    })
}

/// Waits until the pool holds no batch request (cancelled ones leave within a sweep).
async fn drain(runtime: &Arc<PoolRuntime>) -> anyhow::Result<()> {
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    loop {
        let b = runtime.status().batch;
        if b.queued + b.in_flight + b.preempted == 0 {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the pool still holds batch requests after {} s: {b:?}",
            DRAIN_TIMEOUT.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One arm's figures over its passes (p99 of the passes' pooled samples is not kept: the
/// arm's p99 is the mean of its passes' p99s, the spread their range).
fn arm(passes: &[Pass], with_batch: bool) -> Arm {
    let mine: Vec<&Pass> = passes
        .iter()
        .filter(|p| p.with_batch == with_batch)
        .collect();
    let n = as_f64(u64::try_from(mine.len()).unwrap_or(0)).max(1.0);
    let range = |f: fn(&Pass) -> f64| {
        mine.iter()
            .map(|p| f(p))
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            })
    };
    Arm {
        passes: mine.len(),
        ttft_ms_p99: mine.iter().map(|p| p.ttft_ms_p99).sum::<f64>() / n,
        attainment: mine.iter().map(|p| p.attainment).sum::<f64>() / n,
        ttft_ms_p99_spread: range(|p| p.ttft_ms_p99),
        attainment_spread: range(|p| p.attainment),
    }
}

/// The report as a markdown table (stdout), pass by pass.
fn table(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| pass | batch | online requests | TTFT p50 ms | TTFT p99 ms | attainment | batch finished | preemptions |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    for p in &report.passes {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.0} | {:.0} | {:.4} | {} | {} |",
            p.index,
            if p.with_batch { "with" } else { "without" },
            p.online_requests,
            p.ttft_ms_p50,
            p.ttft_ms_p99,
            p.attainment,
            p.batch_finished,
            p.batch_preemptions
        );
    }
    for (name, a) in [
        ("with", &report.with_batch),
        ("without", &report.without_batch),
    ] {
        let _ = writeln!(
            out,
            "{name} batch: TTFT p99 {:.0} ms (passes {:.0}–{:.0}), attainment {:.4} ({:.4}–{:.4})",
            a.ttft_ms_p99,
            a.ttft_ms_p99_spread.0,
            a.ttft_ms_p99_spread.1,
            a.attainment,
            a.attainment_spread.0,
            a.attainment_spread.1
        );
    }
    let i = &report.idle;
    let _ = writeln!(
        out,
        "idle pool: {} of {} batch requests in {:.1} s: {:.2} requests/s, {:.1} tokens/s",
        i.finished, i.requests, i.completion_s, i.requests_per_s, i.tokens_per_s
    );
    out
}
