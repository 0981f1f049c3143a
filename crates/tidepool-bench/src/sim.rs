//! `tidepool sim`, `tidepool plan` and `tidepool bench sim`: their flags, and what they do with
//! them over `tidepool-sim`: build the workload, call the library, write its JSON report and SVG
//! plot and print a summary; every number comes from the library.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context as _;
use tidepool_core::config::{Resolved, Source};
use tidepool_core::{PoolPolicy, PoolSection};
use tidepool_sim::{
    Arrivals, Instances, MarketSpec, PlacementFile, PoolKnobs, Popularity, Profile, Progress,
    Report, SimSpec, Workload, market, placement_file, plan, plan_placement_file, plan_svg,
    read_azure_trace, read_model_trace, sim_svg, simulate,
};

use crate::common::parse_policy;
use crate::knobs::KnobArgs;

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
    /// Arrivals: `trace` (replay the trace's timestamps), `poisson`, or `gamma` (bursty: gaps
    /// with coefficient of variation `--arrival-cv`).
    #[arg(long, env = "TIDEPOOL_SIM_ARRIVALS", default_value = "trace")]
    arrivals: String,
    /// `poisson`, `gamma`: total requests per second over all models.
    #[arg(long, env = "TIDEPOOL_SIM_RATE_PER_S", default_value_t = 4.0)]
    rate_per_s: f64,
    /// `poisson`, `gamma`: simulated seconds of arrivals.
    #[arg(long, env = "TIDEPOOL_SIM_DURATION_S", default_value_t = 3600.0)]
    duration_s: f64,
    /// `gamma`: coefficient of variation of the gaps between arrivals (1 is Poisson; above 1,
    /// bursts of the whole market separated by lulls), 0.01 to 100.
    #[arg(long, env = "TIDEPOOL_SIM_ARRIVAL_CV", default_value_t = 4.0)]
    arrival_cv: f64,
    /// Seed of the market generator (model assignment, Poisson gaps, sampled lengths).
    #[arg(long, env = "TIDEPOOL_SIM_SEED", default_value_t = 1)]
    seed: u64,
    /// A `tidepool.toml`: plan for its `[pool]` — policy, budget and knobs — resolved as
    /// `tidepool serve` resolves it (the file, then `TIDEPOOL_POOL__…` overrides, validated).
    /// Without it: the server's default knobs and the profile's budget.
    #[arg(long, env = "TIDEPOOL_CONFIG")]
    config: Option<PathBuf>,
    /// Scheduler knobs; each overrides the value from `--config` (or the server's default).
    #[command(flatten)]
    knobs: KnobArgs,
    /// Moves of the placement search: after the initial placement (busiest models first, each
    /// to the least loaded accelerator), models move one at a time off the accelerator missing
    /// the most tokens while that helps (0: keep the initial placement).
    #[arg(
        long,
        env = "TIDEPOOL_SIM_PLACEMENT_MOVES_MAX",
        default_value_t = tidepool_sim::PLACEMENT_MOVES_MAX
    )]
    placement_moves_max: u32,
    /// The placement search (and `sim`'s instance sizing) runs on the workload's first this
    /// many requests when it is longer; the placement found is kept only if it beats the first
    /// one on the whole workload (0: always the whole workload).
    #[arg(
        long,
        env = "TIDEPOOL_SIM_SEARCH_SAMPLE_REQUESTS",
        default_value_t = tidepool_sim::SEARCH_SAMPLE_REQUESTS
    )]
    search_sample_requests: u64,
}

/// Arguments of `tidepool sim`.
#[derive(Debug, clap::Args)]
pub struct SimArgs {
    #[command(flatten)]
    workload: WorkloadArgs,
    /// `token`, `swap-lru` or `dedicated` (default: `--config`'s `[pool] policy`, else `token`).
    #[arg(long, env = "TIDEPOOL_SIM_POLICY")]
    policy: Option<String>,
    #[arg(long, env = "TIDEPOOL_SIM_ACCELERATORS", default_value_t = 10)]
    accelerators: u32,
    /// Instances per model: `auto` (each model as many as it needs alone to reach
    /// `--target-attainment`, sized on the search sample) or `one` (a model on one accelerator).
    #[arg(long, env = "TIDEPOOL_SIM_INSTANCES", default_value = "auto")]
    instances: String,
    /// `--instances auto`: the attainment each model's instances must reach alone, in 0..=1.
    #[arg(long, env = "TIDEPOOL_SIM_TARGET_ATTAINMENT", default_value_t = 0.99)]
    target_attainment: f64,
    /// Start from a placement instead of placing afresh: a placement file (`.toml`, as `tidepool
    /// plan` and `tidepool sim` write) or an earlier `tidepool sim` report (`.json`); its model
    /// ids must be this market's. With `--placement-moves-max 0` it is simulated as it is (e.g.
    /// one searched on another seed's traffic).
    #[arg(long, env = "TIDEPOOL_SIM_PLACEMENT")]
    placement: Option<PathBuf>,
    /// JSON report; the SVG plot and the placement file go next to it (same name, `.svg` and
    /// `.placement.toml`).
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
    /// Policies to plan, comma-separated (default: `dedicated,swap-lru,token`; with `--config`,
    /// `dedicated` as the baseline and the file's `[pool] policy`).
    #[arg(long, env = "TIDEPOOL_PLAN_POLICIES", value_delimiter = ',')]
    policies: Option<Vec<String>>,
    /// JSON report; the SVG plot and the answer's placement file (`token`'s, else `swap-lru`'s,
    /// else `dedicated`'s) go next to it (same name, `.svg` and `.placement.toml`).
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
            "gamma" => Arrivals::Gamma {
                rate_per_s: self.rate_per_s,
                duration_s: self.duration_s,
                cv: self.arrival_cv,
            },
            other => anyhow::bail!("unknown arrivals `{other}` (trace, poisson, gamma)"),
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

    /// `--config`'s `[pool]`, if given.
    fn server_pool(&self) -> anyhow::Result<Option<ServerPool>> {
        let Some(path) = &self.config else {
            return Ok(None);
        };
        let env = std::env::vars_os().filter_map(|(name, value)| {
            Some((name.into_string().ok()?, value.into_string().ok()?))
        });
        let resolved =
            Resolved::load(path, env).with_context(|| format!("loading {}", path.display()))?;
        ServerPool::new(&resolved)
            .map(Some)
            .with_context(|| format!("{}", path.display()))
    }
}

/// The `[pool]` section `tidepool serve` would run: the file with its environment overrides,
/// validated as the server validates it.
#[derive(Debug, Clone)]
struct ServerPool {
    section: PoolSection,
    /// The file or the environment set `kv_saved_bytes_max` (else the profile's stays).
    kv_saved_set: bool,
}

impl ServerPool {
    fn new(resolved: &Resolved) -> anyhow::Result<Self> {
        resolved.config.validate()?;
        Ok(Self {
            section: resolved.config.pool.clone(),
            kv_saved_set: resolved.source("pool.kv_saved_bytes_max") != Source::Default,
        })
    }
}

/// The placement search's bounds: moves at most, and the requests it searches on (0: all).
#[derive(Debug, Clone, Copy)]
struct Search {
    moves_max: u32,
    sample_requests: u64,
}

impl Search {
    /// No search: the first placement stands.
    #[cfg(test)]
    const NONE: Self = Self {
        moves_max: 0,
        sample_requests: 0,
    };

    fn of(workload: &WorkloadArgs) -> Self {
        Self {
            moves_max: workload.placement_moves_max,
            sample_requests: workload.search_sample_requests,
        }
    }
}

/// The simulation of `policy` on `accelerators` of `profile`: the server's knobs (`server`'s
/// `[pool]`, else [`PoolKnobs::default`]) with the flags on top, and the server's budget where
/// its `[pool]` sets one (`memory_bytes_max` per accelerator, else `memory_models_max`; the
/// saved-state pool), else the profile's. What the accelerator can do (overlap, paged KV) is
/// always the profile's.
fn sim_spec(
    mut profile: Profile,
    policy: PoolPolicy,
    accelerators: u32,
    server: Option<&ServerPool>,
    flags: &KnobArgs,
    search: Search,
    instances: Instances,
) -> SimSpec {
    let mut knobs = PoolKnobs::default();
    let mut memory_models_max = None;
    if let Some(server) = server {
        let section = &server.section;
        knobs = section.knobs;
        if server.kv_saved_set {
            profile.accelerator.kv_saved_bytes_max = section.kv_saved_bytes_max;
        }
        match section.memory_bytes_max {
            Some(bytes) => profile.accelerator.memory_bytes = bytes,
            None => memory_models_max = section.memory_models_max,
        }
    }
    SimSpec {
        profile,
        policy,
        accelerators,
        knobs: flags.apply(knobs),
        memory_models_max,
        placement_moves_max: search.moves_max,
        search_sample_requests: search.sample_requests,
        search_until_attainment: None,
        instances,
        placement: None,
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

/// Writes `file` next to `out` (same name, `.placement.toml`); returns its path.
fn write_placement(out: &Path, file: &PlacementFile) -> anyhow::Result<PathBuf> {
    let path = out.with_extension("placement.toml");
    std::fs::write(&path, file.to_toml()?).with_context(|| format!("write {}", path.display()))?;
    Ok(path)
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

/// A placement to start from: a placement file (`.toml`) or an earlier `tidepool sim` report,
/// checked against this market's models.
fn read_placement(path: &Path, workload: &Workload) -> anyhow::Result<Vec<Vec<u32>>> {
    #[derive(serde::Deserialize)]
    struct Placed {
        model: String,
        accelerator: u32,
        #[serde(default)]
        instances: Vec<u32>,
    }
    #[derive(serde::Deserialize)]
    struct Placement {
        per_model: Vec<Placed>,
    }
    if path.extension().is_some_and(|e| e == "toml") {
        let file = PlacementFile::load(path)?;
        let known: Vec<tidepool_core::ModelId> = workload
            .models
            .iter()
            .map(|m| tidepool_core::ModelId::new(m.id.clone()))
            .collect::<Result<_, _>>()?;
        file.check_models(&known)?;
        let placement: Vec<Vec<u32>> = workload
            .models
            .iter()
            .map(|m| file.instances(&m.id))
            .collect();
        if let Some(missing) = workload
            .models
            .iter()
            .zip(&placement)
            .find(|(_, a)| a.is_empty())
        {
            anyhow::bail!(
                "{}: places no instance of `{}`",
                path.display(),
                missing.0.id
            );
        }
        return Ok(placement);
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
    Ok(report
        .per_model
        .into_iter()
        .map(|p| {
            if p.instances.is_empty() {
                vec![p.accelerator]
            } else {
                p.instances
            }
        })
        .collect())
}

pub fn run_sim(args: &SimArgs) -> anyhow::Result<()> {
    let server = args.workload.server_pool()?;
    let policy = match (&args.policy, &server) {
        (Some(policy), _) => parse_policy(policy)?,
        (None, Some(server)) => server.section.policy,
        (None, None) => PoolPolicy::Token,
    };
    let (profile, workload) = args.workload.build()?;
    let instances = match args.instances.as_str() {
        "auto" => Instances::Sized {
            target_attainment: args.target_attainment,
        },
        "one" => Instances::One,
        other => anyhow::bail!("unknown --instances `{other}` (auto, one)"),
    };
    let mut spec = sim_spec(
        profile,
        policy,
        args.accelerators,
        server.as_ref(),
        &args.workload.knobs,
        Search::of(&args.workload),
        instances,
    );
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
    let policy_name = serde_json::to_value(report.policy)?
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let placement = write_placement(
        &args.out,
        &placement_file(
            &report,
            format!(
                "tidepool sim: {policy_name} on {} accelerators of the {} profile, {:.2} % token-deadline attainment",
                report.accelerators,
                report.profile,
                report.attainment * 100.0
            ),
        ),
    )?;
    print_sim_summary(&report, &args.out, &svg, &placement)
}

/// The sim command's two lines: the report's headline figures, and where its files went.
fn print_sim_summary(
    report: &Report,
    out_path: &Path,
    svg: &Path,
    placement: &Path,
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{} on {} accelerators, {} models ({} instances), {} requests: attainment {:.2} % (lenient {:.2} %), goodput {:.0} tok/s, p99 TTFT {:.0} ms, utilization {:.1} %, {:.2} switches/s, {} placement moves",
        serde_json::to_value(report.policy)?
            .as_str()
            .unwrap_or_default(),
        report.accelerators,
        report.models,
        report.instances,
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
        "report: {}  plot: {}  placement: {}",
        out_path.display(),
        svg.display(),
        placement.display()
    )?;
    Ok(())
}

pub fn run_plan(args: &PlanArgs) -> anyhow::Result<()> {
    let server = args.workload.server_pool()?;
    let policies = match (&args.policies, &server) {
        (Some(policies), _) => policies
            .iter()
            .map(|p| parse_policy(p))
            .collect::<anyhow::Result<Vec<_>>>()?,
        (None, Some(server)) if server.section.policy == PoolPolicy::Dedicated => {
            vec![PoolPolicy::Dedicated]
        }
        (None, Some(server)) => vec![PoolPolicy::Dedicated, server.section.policy],
        (None, None) => vec![
            PoolPolicy::Dedicated,
            PoolPolicy::SwapLru,
            PoolPolicy::Token,
        ],
    };
    let (profile, workload) = args.workload.build()?;
    let spec = sim_spec(
        profile,
        PoolPolicy::Token,
        1,
        server.as_ref(),
        &args.workload.knobs,
        Search::of(&args.workload),
        Instances::One,
    );
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
    let placement = plan_placement_file(&report)
        .map(|file| write_placement(&args.out, &file))
        .transpose()?;
    let mut out = std::io::stdout().lock();
    for line in &report.summary {
        writeln!(out, "{line}")?;
    }
    writeln!(
        out,
        "report: {}  plot: {}  placement: {}",
        args.out.display(),
        svg.display(),
        placement.map_or_else(
            || "none (no answer)".to_owned(),
            |p| p.display().to_string()
        )
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
        // The knobs its history was measured with, so the speed stays comparable.
        knobs: tidepool_sim::h100_sweep_knobs(),
        memory_models_max: None,
        // The speed of the simulator itself: one pass, no placement search.
        placement_moves_max: 0,
        search_sample_requests: tidepool_sim::SEARCH_SAMPLE_REQUESTS,
        search_until_attainment: None,
        instances: Instances::One,
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use tidepool_pool::{CostEstimate, ModelId, ModelSpec};

    use super::*;

    const FILE: &str = r#"
[pool]
policy = "swap-lru"
memory_bytes_max = 3000000000
kv_saved_bytes_max = 200000000
ttft_slo_ms = 2000
decode_steps_min = 8
prefill_cold_lazy = true

[[models]]
id = "smol"
kind = "chat"
file = "smol.gguf"
"#;

    fn server_pool(env: &[(&str, &str)]) -> ServerPool {
        let resolved = Resolved::new(FILE, Path::new("t.toml"), env.iter().copied()).unwrap();
        ServerPool::new(&resolved).unwrap()
    }

    fn model(id: &str, weights_bytes: u64) -> ModelSpec {
        ModelSpec {
            id: ModelId::new(id).unwrap(),
            weights_bytes,
            ctx_bytes: 1 << 20,
            kv_bytes_per_token: 1024,
            seqs_max: 4,
            seq_tokens_max: 2048,
            pin: false,
            keep_alive_ms: None,
            estimate: CostEstimate {
                load_ns: 1,
                decode_step_ns: 1,
                prefill_ns_per_token: 1,
                kv_transfer_ps_per_byte: 1,
            },
        }
    }

    /// `tidepool plan --config F` plans for the pool `tidepool serve` builds from F: the same
    /// policy, knobs (file and environment overrides) and budget; flags change one knob each.
    #[test]
    fn the_planner_runs_the_knobs_the_server_would() {
        let env = [
            ("TIDEPOOL_POOL__TURN_QUOTA_MS_MAX", "1500"),
            ("TIDEPOOL_POOL__HOL_BLOCKING", "true"),
        ];
        let server = server_pool(&env);
        let runtime =
            tidepool_runtime::pool_config(&server.section, vec![model("a", 100), model("b", 7)]);
        let profile = Profile::load("h100").unwrap();
        let planned = sim_spec(
            profile.clone(),
            server.section.policy,
            1,
            Some(&server),
            &KnobArgs::default(),
            Search::NONE,
            Instances::One,
        );
        assert_eq!(planned.knobs, runtime.knobs);
        assert_eq!(planned.policy, runtime.policy);
        assert_eq!(
            planned.profile.accelerator.memory_bytes,
            runtime.memory_bytes_max
        );
        assert_eq!(
            planned.profile.accelerator.kv_saved_bytes_max,
            runtime.kv_saved_bytes_max
        );
        assert_eq!(
            runtime.knobs,
            PoolKnobs {
                ttft_slo_ms: 2000,
                decode_steps_min: 8,
                turn_quota_ms_max: 1500,
                prefill_cold_lazy: true,
                hol_blocking: true,
                ..PoolKnobs::default()
            }
        );
        // The accelerator's own abilities stay the profile's.
        assert_eq!(
            planned.profile.accelerator.kv_paged,
            profile.accelerator.kv_paged
        );
        assert_eq!(
            planned.profile.accelerator.overlap_transfers,
            profile.accelerator.overlap_transfers
        );

        // A flag overrides its knob only.
        let flags = KnobArgs {
            decode_steps_min: Some(32),
            prefill_cold_lazy: Some(false),
            ..KnobArgs::default()
        };
        let flagged = sim_spec(
            profile.clone(),
            PoolPolicy::Token,
            1,
            Some(&server),
            &flags,
            Search::NONE,
            Instances::One,
        );
        assert_eq!(
            flagged.knobs,
            PoolKnobs {
                decode_steps_min: 32,
                prefill_cold_lazy: false,
                ..runtime.knobs
            }
        );
    }

    /// Without a file the server's default knobs and the profile's budget; a budget of the N
    /// largest models is the server's rule (`tidepool_pool::memory_budget`), which the
    /// simulator applies to the profile's model sizes on each accelerator.
    #[test]
    fn a_budget_of_the_largest_models_is_planned_by_the_servers_rule() {
        let profile = Profile::load("h100").unwrap();
        // Without a file: the server's defaults, the profile's budget.
        let plain = sim_spec(
            profile.clone(),
            PoolPolicy::Token,
            1,
            None,
            &KnobArgs::default(),
            Search::NONE,
            Instances::One,
        );
        assert_eq!(plain.knobs, PoolKnobs::default());
        assert_eq!(plain.profile, profile);
        let text = FILE.replace("memory_bytes_max = 3000000000", "memory_models_max = 1");
        let resolved = Resolved::new(&text, Path::new("t.toml"), [("", "")]).unwrap();
        let by_count = ServerPool::new(&resolved).unwrap();
        let runtime =
            tidepool_runtime::pool_config(&by_count.section, vec![model("a", 100), model("b", 7)]);
        assert_eq!(runtime.memory_bytes_max, 100 + (1 << 20) + 200_000_000);
        let planned = sim_spec(
            profile,
            PoolPolicy::Token,
            1,
            Some(&by_count),
            &KnobArgs::default(),
            Search::NONE,
            Instances::One,
        );
        assert_eq!(planned.memory_models_max, Some(1));
    }

    /// A file the server would refuse is refused here too, with the server's field names.
    #[test]
    fn an_invalid_pool_section_is_refused_as_serve_refuses_it() {
        let resolved = Resolved::new(
            FILE,
            Path::new("t.toml"),
            [("TIDEPOOL_POOL__TBT_SLO_MS", "0")],
        )
        .unwrap();
        let error = ServerPool::new(&resolved).unwrap_err();
        assert!(
            format!("{error:#}").contains("pool.tbt_slo_ms"),
            "{error:#}"
        );
    }
}
