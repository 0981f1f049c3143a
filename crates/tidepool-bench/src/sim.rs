//! `tidepool sim`, `tidepool plan` and `tidepool bench sim`: their flags, and what they do with
//! them over `tidepool-sim`: build the workload, call the library, write its JSON report and SVG
//! plot and print a summary; every number comes from the library.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context as _;
use tidepool_core::PoolPolicy;
use tidepool_sim::{
    Arrivals, MarketSpec, PoolKnobs, Popularity, Profile, Progress, SimSpec, Workload, market,
    plan, plan_svg, read_azure_trace, read_model_trace, sim_svg, simulate,
};

use crate::common::parse_policy;

/// The workload and cost model shared by `sim` and `plan`.
#[derive(Debug, clap::Args)]
pub(crate) struct WorkloadArgs {
    /// Cost-model profile: `h100`, `cpu-devvm`, or a TOML file (see crates/tidepool-sim/profiles).
    #[arg(long, env = "TIDEPOOL_SIM_PROFILE", default_value = "h100")]
    profile: String,
    /// Azure-format trace (`TIMESTAMP,ContextTokens,GeneratedTokens`): timestamps and lengths.
    #[arg(
        long,
        env = "TIDEPOOL_SIM_TRACE",
        default_value = "data/traces/azure-llm-2023-conv.csv"
    )]
    trace: PathBuf,
    /// A trace with its own model column (`timestamp,model,prompt_tokens,output_tokens`,
    /// timestamp in seconds); replaces the market generator.
    #[arg(long, env = "TIDEPOOL_SIM_MODEL_TRACE")]
    model_trace: Option<PathBuf>,
    /// Models in the generated market.
    #[arg(long, env = "TIDEPOOL_SIM_MODELS", default_value_t = 40)]
    models: u32,
    /// Popularity: `zipf` (weight 1/(k+1)^s) or `hot-few`.
    #[arg(long, env = "TIDEPOOL_SIM_POPULARITY", default_value = "zipf")]
    popularity: String,
    #[arg(long, env = "TIDEPOOL_SIM_ZIPF_S", default_value_t = 1.0)]
    zipf_s: f64,
    /// `hot-few`: this many models share `--hot-share` of the requests.
    #[arg(long, env = "TIDEPOOL_SIM_HOT_MODELS", default_value_t = 4)]
    hot_models: u32,
    #[arg(long, env = "TIDEPOOL_SIM_HOT_SHARE", default_value_t = 0.9)]
    hot_share: f64,
    /// Arrivals: `trace` (replay the trace's timestamps) or `poisson`.
    #[arg(long, env = "TIDEPOOL_SIM_ARRIVALS", default_value = "trace")]
    arrivals: String,
    /// `poisson`: total requests per second over all models.
    #[arg(long, env = "TIDEPOOL_SIM_RATE_PER_S", default_value_t = 4.0)]
    rate_per_s: f64,
    /// `poisson`: simulated seconds of arrivals.
    #[arg(long, env = "TIDEPOOL_SIM_DURATION_S", default_value_t = 3600.0)]
    duration_s: f64,
    #[arg(long, env = "TIDEPOOL_SIM_TTFT_SLO_MS", default_value_t = 10_000)]
    ttft_slo_ms: u64,
    #[arg(long, env = "TIDEPOOL_SIM_TBT_SLO_MS", default_value_t = 100)]
    tbt_slo_ms: u64,
    /// Seed of the market generator (model assignment, Poisson gaps, sampled lengths).
    #[arg(long, env = "TIDEPOOL_SIM_SEED", default_value_t = 1)]
    seed: u64,
    /// `token`: the longest turn the quota formula hands out.
    #[arg(
        long,
        env = "TIDEPOOL_SIM_TURN_QUOTA_MS_MAX",
        default_value_t = PoolKnobs::default().turn_quota_ms_max
    )]
    turn_quota_ms_max: u64,
    /// Decode steps per turn when switching is free (and the floor otherwise).
    #[arg(
        long,
        env = "TIDEPOOL_SIM_DECODE_STEPS_MIN",
        default_value_t = PoolKnobs::default().decode_steps_min
    )]
    decode_steps_min: u32,
    /// `token` admission: hold requests while predicted α (×1000) exceeds this (default: off).
    #[arg(
        long,
        env = "TIDEPOOL_SIM_ALPHA_ADMIT_PERMILLE_MAX",
        default_value_t = u32::MAX
    )]
    alpha_admit_permille_max: u32,
    /// `token`: a request of a cold model waits until its TTFT is at risk or nothing decodes.
    #[arg(long, env = "TIDEPOOL_SIM_PREFILL_COLD_LAZY")]
    prefill_cold_lazy: bool,
    /// `token`: within a round, turns of resident models run before turns that need a load.
    #[arg(long, env = "TIDEPOOL_SIM_ROUND_RESIDENT_FIRST")]
    round_resident_first: bool,
    /// A prefill carries its model's decoding sequences, one token each, at the profile's
    /// rider cost (`[pool] prefill_riders`).
    #[arg(long, env = "TIDEPOOL_SIM_PREFILL_RIDERS")]
    prefill_riders: bool,
    /// Moves of the placement search: after the initial placement (busiest models first, each
    /// to the least loaded accelerator), models move one at a time off the accelerator missing
    /// the most tokens while that helps (0: keep the initial placement).
    #[arg(
        long,
        env = "TIDEPOOL_SIM_PLACEMENT_MOVES_MAX",
        default_value_t = tidepool_sim::PLACEMENT_MOVES_MAX
    )]
    placement_moves_max: u32,
}

/// Arguments of `tidepool sim`.
#[derive(Debug, clap::Args)]
pub struct SimArgs {
    #[command(flatten)]
    workload: WorkloadArgs,
    /// `token`, `swap-lru` or `dedicated`.
    #[arg(long, env = "TIDEPOOL_SIM_POLICY", default_value = "token")]
    policy: String,
    #[arg(long, env = "TIDEPOOL_SIM_ACCELERATORS", default_value_t = 10)]
    accelerators: u32,
    /// Start from the placement of an earlier `tidepool sim` report (its `per_model[]` model ids
    /// must be this market's) instead of placing afresh; with `--placement-moves-max 0` that
    /// placement is simulated as it is (e.g. one searched on another seed's traffic).
    #[arg(long, env = "TIDEPOOL_SIM_PLACEMENT")]
    placement: Option<PathBuf>,
    /// JSON report; the SVG plot goes next to it (same name, `.svg`).
    #[arg(long, env = "TIDEPOOL_SIM_OUT", default_value = "sim-out/sim.json")]
    out: PathBuf,
}

/// Arguments of `tidepool plan`.
#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    #[command(flatten)]
    workload: WorkloadArgs,
    /// Token-deadline attainment to reach, in 0..=1.
    #[arg(long, env = "TIDEPOOL_PLAN_TARGET_ATTAINMENT", default_value_t = 0.99)]
    target_attainment: f64,
    /// Policies to plan, comma-separated.
    #[arg(
        long,
        env = "TIDEPOOL_PLAN_POLICIES",
        value_delimiter = ',',
        default_value = "dedicated,swap-lru,token"
    )]
    policies: Vec<String>,
    /// JSON report; the SVG plot goes next to it (same name, `.svg`).
    #[arg(long, env = "TIDEPOOL_PLAN_OUT", default_value = "sim-out/plan.json")]
    out: PathBuf,
}

/// Arguments of `tidepool bench sim`.
#[derive(Debug, clap::Args)]
pub(crate) struct BenchSimArgs {
    /// Simulated requests.
    #[arg(long, env = "TIDEPOOL_BENCH_SIM_REQUESTS", default_value_t = 1_000_000)]
    requests: u64,
    #[arg(
        long,
        env = "TIDEPOOL_SIM_TRACE",
        default_value = "data/traces/azure-llm-2023-conv.csv"
    )]
    trace: PathBuf,
}

impl WorkloadArgs {
    fn build(&self) -> anyhow::Result<(Profile, Workload)> {
        let profile =
            Profile::load(&self.profile).with_context(|| format!("profile `{}`", self.profile))?;
        if let Some(path) = &self.model_trace {
            return Ok((profile.clone(), read_model_trace(path, &profile)?));
        }
        let rows = read_azure_trace(&self.trace)?;
        let popularity = match self.popularity.as_str() {
            "zipf" => Popularity::Zipf { s: self.zipf_s },
            "hot-few" => Popularity::HotFew {
                hot_models: self.hot_models,
                hot_share: self.hot_share,
            },
            other => anyhow::bail!("unknown popularity `{other}` (zipf, hot-few)"),
        };
        let arrivals = match self.arrivals.as_str() {
            "trace" => Arrivals::Trace,
            "poisson" => Arrivals::Poisson {
                rate_per_s: self.rate_per_s,
                duration_s: self.duration_s,
            },
            other => anyhow::bail!("unknown arrivals `{other}` (trace, poisson)"),
        };
        let spec = MarketSpec {
            models: self.models,
            popularity,
            arrivals,
            seed: self.seed,
        };
        let workload = market(&spec, &rows, &profile)?;
        Ok((profile, workload))
    }

    fn spec(&self, profile: Profile, policy: PoolPolicy, accelerators: u32) -> SimSpec {
        SimSpec {
            profile,
            policy,
            accelerators,
            ttft_slo_ms: self.ttft_slo_ms,
            tbt_slo_ms: self.tbt_slo_ms,
            knobs: PoolKnobs {
                turn_quota_ms_max: self.turn_quota_ms_max,
                decode_steps_min: self.decode_steps_min,
                alpha_admit_permille_max: self.alpha_admit_permille_max,
                prefill_cold_lazy: self.prefill_cold_lazy,
                round_resident_first: self.round_resident_first,
                prefill_riders: self.prefill_riders,
                ..PoolKnobs::default()
            },
            placement_moves_max: self.placement_moves_max,
            placement: None,
        }
    }
}

fn write_outputs(out: &Path, json: &[u8], svg: &str) -> anyhow::Result<PathBuf> {
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    }
    std::fs::write(out, json).with_context(|| format!("write {}", out.display()))?;
    let svg_path = out.with_extension("svg");
    std::fs::write(&svg_path, svg).with_context(|| format!("write {}", svg_path.display()))?;
    Ok(svg_path)
}

/// A progress line on stderr for long runs (the sim crate stays free of indicatif).
fn progress_bar(total_hint: u64) -> impl FnMut(Progress) {
    let bar = indicatif::ProgressBar::new(total_hint);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} requests {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    move |p: Progress| {
        bar.set_length(p.requests_total);
        bar.set_position(p.requests_done);
        if p.requests_done >= p.requests_total {
            bar.finish_and_clear();
        }
    }
}

/// The placement of an earlier `tidepool sim` report, checked against this market's models.
fn read_placement(path: &Path, workload: &Workload) -> anyhow::Result<Vec<u32>> {
    #[derive(serde::Deserialize)]
    struct Placed {
        model: String,
        accelerator: u32,
    }
    #[derive(serde::Deserialize)]
    struct Placement {
        per_model: Vec<Placed>,
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let report: Placement = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a `tidepool sim` report", path.display()))?;
    let same_models = report.per_model.len() == workload.models.len()
        && report
            .per_model
            .iter()
            .zip(&workload.models)
            .all(|(placed, model)| placed.model == model.id);
    anyhow::ensure!(
        same_models,
        "{}: its models are not this market's (same --models and model trace needed)",
        path.display()
    );
    Ok(report.per_model.iter().map(|p| p.accelerator).collect())
}

pub fn run_sim(args: &SimArgs) -> anyhow::Result<()> {
    let policy = parse_policy(&args.policy)?;
    let (profile, workload) = args.workload.build()?;
    let mut spec = args.workload.spec(profile, policy, args.accelerators);
    if let Some(path) = &args.placement {
        spec.placement = Some(read_placement(path, &workload)?);
    }
    let total = u64::try_from(workload.requests.len()).unwrap_or(u64::MAX);
    let report = simulate(&spec, &workload, &mut progress_bar(total))?;
    let svg = write_outputs(
        &args.out,
        &serde_json::to_vec_pretty(&report)?,
        &sim_svg(&report),
    )?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{} on {} accelerators, {} models, {} requests: attainment {:.2} % (lenient {:.2} %), goodput {:.0} tok/s, p99 TTFT {:.0} ms, utilization {:.1} %, {:.2} switches/s, {} placement moves",
        args.policy,
        report.accelerators,
        report.models,
        report.requests,
        report.attainment * 100.0,
        report.attainment_lenient * 100.0,
        report.goodput_tokens_per_s,
        report.ttft_ms_p99,
        report.utilization * 100.0,
        report.switches_per_s,
        report.placement_moves,
    )?;
    writeln!(
        out,
        "report: {}  plot: {}",
        args.out.display(),
        svg.display()
    )?;
    Ok(())
}

pub fn run_plan(args: &PlanArgs) -> anyhow::Result<()> {
    let policies = args
        .policies
        .iter()
        .map(|p| parse_policy(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (profile, workload) = args.workload.build()?;
    let spec = args.workload.spec(profile, PoolPolicy::Token, 1);
    let mut report_progress = |_: Progress| {};
    let report = plan(
        &spec,
        &workload,
        args.target_attainment,
        &policies,
        &mut report_progress,
    )?;
    let svg = write_outputs(
        &args.out,
        &serde_json::to_vec_pretty(&report)?,
        &plan_svg(&report),
    )?;
    let mut out = std::io::stdout().lock();
    for line in &report.summary {
        writeln!(out, "{line}")?;
    }
    writeln!(
        out,
        "report: {}  plot: {}",
        args.out.display(),
        svg.display()
    )?;
    Ok(())
}

/// `tidepool bench sim`: simulated requests per wall-clock second (`token` policy, H100 profile).
pub(crate) fn run_bench_sim(args: &BenchSimArgs) -> anyhow::Result<()> {
    let profile = Profile::load("h100")?;
    let rows = read_azure_trace(&args.trace)?;
    let workload = tidepool_sim::bench_workload(args.requests, &rows, &profile, 7)?;
    let spec = SimSpec {
        profile,
        policy: PoolPolicy::Token,
        accelerators: tidepool_sim::BENCH_ACCELERATORS,
        ttft_slo_ms: 10_000,
        tbt_slo_ms: 100,
        knobs: PoolKnobs::default(),
        // The speed of the simulator itself: one pass, no placement search.
        placement_moves_max: 0,
        placement: None,
    };
    let total = u64::try_from(workload.requests.len()).unwrap_or(u64::MAX);
    let start = Instant::now();
    let report = simulate(&spec, &workload, &mut progress_bar(total))?;
    let wall_s = start.elapsed().as_secs_f64();
    writeln!(
        std::io::stdout().lock(),
        "{} simulated requests in {wall_s:.2} s ({:.0} requests/s); attainment {:.2} %",
        report.requests,
        f64::from(u32::try_from(report.requests).unwrap_or(u32::MAX)) / wall_s.max(1e-9),
        report.attainment * 100.0
    )?;
    Ok(())
}
