//! `tidepool-bench` owns Tidepool's benchmarks (`tidepool bench …`) and the simulator's commands
//! (`tidepool sim`, `tidepool plan`): their flags, workloads, load client, scoring, simulator
//! replay and reports. Benchmarks are product code that needs every crate (engine, pool, ledger,
//! gateway, simulator); keeping them here keeps the `tidepool` binary a thin CLI and the
//! dependency direction clear: only the binary depends on this crate.
//!
//! Benchmarks report ratios against a baseline measured in the same run on the same machine
//! (machines here are noisy; absolute numbers travel badly). Read [`BenchArgs`] and [`run`]
//! first, then one module per command (`engine`, `pool`, `calibrate`, `failover`, `ledger`,
//! `rollups`, `telemetry`, `sim`, `batch`); the pool benchmark's parts are `workload`, `client`, `score`, `replay`, `report`,
//! `table`, `speed` and `process`, and `common` holds what they all share.
#![forbid(unsafe_code)]

mod actions;
mod batch;
mod calibrate;
mod client;
mod common;
mod engine;
mod failover;
mod knobs;
mod ledger;
mod measure;
mod open_loop;
mod pool;
mod process;
mod replay;
mod report;
mod resident;
mod rollups;
mod score;
mod search;
mod sim;
mod speed;
mod table;
mod telemetry;
mod workload;

pub use sim::{PlanArgs, SimArgs, run_plan, run_sim};

/// Arguments of `tidepool bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Debug, clap::Subcommand)]
enum BenchCommand {
    /// Raw llama.cpp loop vs Tidepool over HTTP vs llama-server, at several concurrencies.
    Engine(engine::EngineBenchArgs),
    /// Greedy generation with the raw llama.cpp loop (no server), printed as JSON: the reference
    /// output that black-box tests compare the server's temperature-0 output with.
    RawGenerate(engine::RawGenerateArgs),
    /// Simulator speed: simulated requests per second of one core (`tidepool-sim`).
    Sim(sim::BenchSimArgs),
    /// Ledger: settles per second on SQLite and PostgreSQL, and the request latency metering +
    /// quotas add (with vs without, same run).
    Ledger(ledger::LedgerBenchArgs),
    /// Model pool on the real engine: 8 models in a budget that fits 3, Zipf(1) popularity,
    /// Azure conversation lengths scaled down, Poisson rates swept; token-SLO attainment,
    /// goodput, p99 TTFT, switches/s and the sustainable rate of `dedicated`, `swap-lru`, `token`.
    Pool(pool::PoolBenchArgs),
    /// Measure the local models through the pool's engine path and write a simulator profile
    /// (TOML) fitted from the samples.
    Calibrate(calibrate::CalibrateArgs),
    /// Batch-class requests on the real pooled runtime: online p99 TTFT and token-deadline
    /// attainment with and without 1,000 batch requests (passes interleaved), and the batch's
    /// completion time and throughput on the idle pool.
    Batch(batch::BatchBenchArgs),
    /// Remote backends: time from a worker's death to the first successful retried request and
    /// requests lost over N trials; the latency the gateway adds over a direct call (same run).
    Failover(failover::FailoverBenchArgs),
    /// Usage rollups: one tenant's 30-day usage read from the daily rollup vs summed from the
    /// raw usage entries, p50/p95/p99 over a million seeded entries (SQLite and PostgreSQL).
    Rollups(rollups::RollupsBenchArgs),
    /// Traces: request latency p50/p99 with tracing off, exporting to a collector, and
    /// exporting to a collector that is down (fake engine; passes interleaved, same run).
    Telemetry(telemetry::TelemetryBenchArgs),
}

/// Runs one `tidepool bench` command.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.command {
        BenchCommand::Engine(args) => engine::run(args).await,
        BenchCommand::RawGenerate(args) => engine::run_raw_generate(&args),
        BenchCommand::Sim(args) => sim::run_bench_sim(&args),
        BenchCommand::Ledger(args) => ledger::run(args).await,
        BenchCommand::Pool(args) => pool::run(args).await,
        BenchCommand::Calibrate(args) => calibrate::run(&args),
        BenchCommand::Failover(args) => failover::run(args).await,
        BenchCommand::Batch(args) => batch::run(args).await,
        BenchCommand::Telemetry(args) => telemetry::run(args).await,
        BenchCommand::Rollups(args) => rollups::run(args).await,
    }
}
