//! `tidepool bench calibrate`: measures the local models on this machine through the pool's own
//! engine path (`tidepool_engine::multi::Accelerator`: the same prefill, decode-with-sampling,
//! load, evict, KV save and restore calls the server's accelerator thread makes) and writes a
//! simulator profile (`tidepool_sim::Profile` TOML) fitted from the samples by
//! `tidepool_sim::calibrate`.
//!
//! **What is measured, per model family** (SmolLM2 → `smollm2-135m`, Gemma-3 → `gemma-3-270m`,
//! the family names of the built-in `cpu-devvm` profile so markets assign the same families):
//! sizes (weights, KV bytes per token, context) from `Accelerator::calibrate`; `--repeats` loads
//! and evictions; prefills of one prompt of 16…256 tokens and of groups of `seqs_max` prompts;
//! 16-step decode turns at every batch size 1…`seqs_max` and two context lengths (greedy
//! sampling included, as served); a 128-token prefill alone and then with 1, `seqs_max / 2` and
//! `seqs_max − 1` decoding sequences riding in its batch (docs/pool.md §3.1); saves and
//! restores of 32…256-token sequences. Prompts are
//! [`crate::bench::prompt_for`] text, cut to the exact token count.
//! `--quick` takes a small subset (a smoke run for tests; the fit is coarser).
//!
//! **The fit**: prefill `fixed + a·Σt + b·Σt²`, decode step one value per batch size plus
//! `d·Σctx` (`decode_batch_ms`; the line `fixed + c·B` is kept for batches past the table), load
//! and unload medians, a rider's cost (`prefill_rider_ms`: the extra prefill time per rider
//! less its context term), transfers `fixed + bytes / bandwidth`. The TOML's header records the
//! relative RMS error of each fit; the raw samples go to a JSON file next to it, and
//! `--from-samples` refits them without measuring again. Machine facts: the CPU model from
//! `/proc/cpuinfo` and the thread count.
//!
//! **The accelerator section** mirrors the server's CPU pool: saved KV inside the budget, no
//! overlap of transfers and compute, `engine_overhead = 1` (measured through the engine).
//! `memory_bytes` defaults to what `tidepool bench pool` gives `swap-lru` and `token`
//! (`--memory-models-max` of the largest family plus `--kv-saved-bytes-max`).

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use tidepool_core::{ModelId, RequestId};
use tidepool_engine::multi::{Accelerator, Calibration, ModelFrontEnd, MultiModelConfig};
use tidepool_engine::{GenerateRequest, Generation, SamplingParams};
use tidepool_sim::calibrate::{
    DecodeSample, FamilyFit, FamilyMeasurements, PrefillSample, RiderSample, TransferFit,
    TransferSample, fit_family, fit_transfer,
};
use tidepool_sim::profile::{Accelerator as AcceleratorProfile, Costs, Profile};

use crate::bench::prompt_for;
use crate::bench_pool::{GEMMA_FILE, SMOLLM2_FILE};

/// Single-prompt prefill lengths, in tokens.
const PREFILL_LENGTHS: [u32; 6] = [16, 32, 64, 128, 192, 256];
/// Per-prompt lengths of the grouped prefills (`seqs_max` prompts at once).
const GROUP_PREFILL_LENGTHS: [u32; 2] = [32, 128];
/// Prompt lengths of the decode measurements (the context each sequence starts from).
const DECODE_CONTEXTS: [u32; 2] = [32, 256];
/// Decode steps timed per sample (one pool turn's worth at the server's `decode_steps_min`).
const DECODE_STEPS: u32 = 16;
/// Lengths of the sequences saved and restored.
const TRANSFER_LENGTHS: [u32; 3] = [32, 128, 256];
/// `--quick`: fewer and shorter samples (a smoke run for tests; the fit is coarser).
const QUICK_PREFILL_LENGTHS: [u32; 3] = [16, 64, 128];
const QUICK_GROUP_PREFILL_LENGTHS: [u32; 1] = [32];
const QUICK_DECODE_CONTEXTS: [u32; 2] = [32, 96];
const QUICK_DECODE_BATCHES: [u32; 2] = [1, 4];
/// Attempts at one decode sample when a sequence ends early (EOS) and spoils it.
const DECODE_ATTEMPTS_MAX: u32 = 3;
/// The resident check's turns: batch (at most `seqs_max`), prompt tokens, consecutive turns
/// (`decoding` asks `DECODE_STEPS × 4` tokens, so at most 3 turns after the prefill's token).
const RESIDENT_BATCH: u32 = 4;
const RESIDENT_CTX: u32 = 128;
const RESIDENT_TURNS: u32 = 3;

#[derive(Debug, clap::Args)]
pub(crate) struct CalibrateArgs {
    /// Directory holding the GGUFs (default: `~/.cache/tidepool/models`).
    #[arg(long, env = "TIDEPOOL_MODELS_DIR")]
    models_dir: Option<PathBuf>,
    /// Context of one sequence, in tokens (as `tidepool bench pool` serves them).
    #[arg(long, env = "TIDEPOOL_CALIBRATE_CONTEXT_TOKENS", default_value_t = 512)]
    context_tokens: u32,
    /// Sequences per model context (the decode batch limit).
    #[arg(long, env = "TIDEPOOL_CALIBRATE_SEQS_MAX", default_value_t = 4)]
    seqs_max: u32,
    /// Engine threads; 0 = every core (the server's `[engine] threads = 0`).
    #[arg(long, env = "TIDEPOOL_CALIBRATE_THREADS", default_value_t = 0)]
    threads: u32,
    /// Repeats of each measurement (loads, prefills, decode samples).
    #[arg(long, env = "TIDEPOOL_CALIBRATE_REPEATS", default_value_t = 3)]
    repeats: u32,
    /// The profile's memory budget in bytes (default: `--memory-models-max` × the largest family
    /// + `--kv-saved-bytes-max`).
    #[arg(long, env = "TIDEPOOL_CALIBRATE_MEMORY_BYTES")]
    memory_bytes: Option<u64>,
    #[arg(
        long,
        env = "TIDEPOOL_CALIBRATE_MEMORY_MODELS_MAX",
        default_value_t = 3
    )]
    memory_models_max: u32,
    /// Cap on saved sequence states, in bytes (inside the budget, as on the server's CPU pool).
    #[arg(
        long,
        env = "TIDEPOOL_CALIBRATE_KV_SAVED_BYTES_MAX",
        default_value_t = 128 * 1024 * 1024
    )]
    kv_saved_bytes_max: u64,
    /// Fewer, shorter samples (3 prefill lengths, one group, batch 1 and 4 at two short
    /// contexts): a smoke run in seconds, with a coarser fit.
    #[arg(long, env = "TIDEPOOL_CALIBRATE_QUICK")]
    quick: bool,
    /// Where the profile goes; the raw samples go next to it (same name, `.json`).
    #[arg(
        long,
        env = "TIDEPOOL_CALIBRATE_OUT",
        default_value = "bench/out/calibrated.toml"
    )]
    out: PathBuf,
    /// Models loaded together for the resident check (the two families alternating, like
    /// `tidepool bench pool`'s `dedicated` run): a family's decode step alone, beside the others
    /// idle, and in rotation with them. 0 skips it; `--quick` takes at most 2.
    #[arg(long, env = "TIDEPOOL_CALIBRATE_RESIDENT_MODELS", default_value_t = 8)]
    resident_models: u32,
    /// Fit a profile from the raw samples an earlier run wrote (its `.json`) instead of measuring:
    /// to refit old measurements after the fit changes. The sizes, CPU and thread count come from
    /// the file; the memory flags apply as usual.
    #[arg(long, env = "TIDEPOOL_CALIBRATE_FROM_SAMPLES")]
    from_samples: Option<PathBuf>,
}

/// The raw samples, written beside the profile (and read back by `--from-samples`).
#[derive(Debug, Serialize, Deserialize)]
struct Samples {
    cpu: String,
    threads: u32,
    families: Vec<FamilyMeasurements>,
    transfers: Vec<TransferSample>,
    /// The resident check (not fitted: it tells whether the one-model samples above hold with
    /// many models loaded). Older sample files have none.
    #[serde(default)]
    resident: Vec<ResidentSample>,
}

/// One family's decode turns with `models` models loaded (the resident check): 16-step turns
/// of `batch` sequences from `ctx` prompt tokens, `RESIDENT_TURNS` per repeat, with only this
/// model loaded (`alone`), with all loaded but the others idle (`beside`), and with every model
/// decoding in round-robin turns (`rotating`: each turn follows another model's).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ResidentSample {
    family: String,
    models: u32,
    batch: u32,
    ctx: u32,
    alone: TurnTimes,
    beside: TurnTimes,
    rotating: TurnTimes,
}

/// A turn's first step apart from the rest: a cost of taking over from another model shows in
/// the first, the steady state in the rest. One value per turn.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct TurnTimes {
    first_step_ns: Vec<u64>,
    /// Mean of the turn's other steps.
    later_step_ns: Vec<u64>,
}

impl TurnTimes {
    fn push(&mut self, (first, later): (u64, u64)) {
        self.first_step_ns.push(first);
        self.later_step_ns.push(later);
    }

    fn extend(&mut self, turns: Vec<(u64, u64)>) {
        for turn in turns {
            self.push(turn);
        }
    }
}

pub(crate) fn run(args: &CalibrateArgs) -> anyhow::Result<()> {
    if args.repeats == 0 || args.seqs_max == 0 || args.memory_models_max == 0 {
        bail!("--repeats, --seqs-max and --memory-models-max must be at least 1");
    }
    let longest = PREFILL_LENGTHS.iter().chain(&DECODE_CONTEXTS).max();
    if longest.is_some_and(|&l| l + DECODE_STEPS + 1 >= args.context_tokens) {
        bail!("--context-tokens must exceed 256 + {DECODE_STEPS} (the longest measured sequence)");
    }
    if let Some(path) = &args.from_samples {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        let samples: Samples = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a calibration samples file", path.display()))?;
        return fit_and_write(args, &samples);
    }
    let models_dir = args
        .models_dir
        .clone()
        .unwrap_or_else(tidepool_core::config::default_models_dir);
    let families = [("smollm2-135m", SMOLLM2_FILE), ("gemma-3-270m", GEMMA_FILE)];
    let mut configs = Vec::new();
    for (name, file) in families {
        let path = models_dir.join(file);
        if !path.exists() {
            bail!("model file {} not found: run `make models`", path.display());
        }
        let mut config = MultiModelConfig::new(ModelId::new(format!("cal-{name}"))?, path);
        config.context_tokens = args.context_tokens;
        config.seqs_max = args.seqs_max;
        config.threads = args.threads;
        configs.push(config);
    }
    let fronts = front_ends(&configs)?;
    let mut accelerator = Accelerator::new(configs.clone())?;
    let mut measured = Vec::new();
    let mut transfers = Vec::new();
    let mut next_seq = 0_u64;
    for (index, (name, _)) in families.iter().enumerate() {
        tracing::info!(family = name, "measuring");
        let mut run = Measure::new(&mut accelerator, &fronts, index, &mut next_seq, args)?;
        let (m, t) = run.family(name, args)?;
        measured.push(m);
        transfers.extend(t);
    }
    drop(accelerator);
    let named: Vec<(&str, &MultiModelConfig)> = families
        .iter()
        .map(|(name, _)| *name)
        .zip(&configs)
        .collect();
    let resident = resident_check(args, &named, &mut next_seq)?;
    fit_and_write(
        args,
        &Samples {
            cpu: cpu_model(),
            threads: args.threads,
            families: measured,
            transfers,
            resident,
        },
    )
}

fn fit_and_write(args: &CalibrateArgs, samples: &Samples) -> anyhow::Result<()> {
    let fits: Vec<FamilyFit> = samples
        .families
        .iter()
        .map(fit_family)
        .collect::<Result<_, _>>()?;
    let transfer = fit_transfer(&samples.transfers)?;
    let profile = build_profile(args, &fits, transfer, samples);
    write(args, &profile, &fits, transfer, samples)
}

fn build_profile(
    args: &CalibrateArgs,
    fits: &[FamilyFit],
    transfer: TransferFit,
    samples: &Samples,
) -> Profile {
    let largest = fits
        .iter()
        .map(|f| f.family.resident_bytes())
        .max()
        .unwrap_or(0);
    let memory_bytes = args.memory_bytes.unwrap_or_else(|| {
        largest
            .saturating_mul(u64::from(args.memory_models_max))
            .saturating_add(args.kv_saved_bytes_max)
    });
    let (context_tokens, seqs_max) = samples
        .families
        .first()
        .map_or((args.context_tokens, args.seqs_max), |f| {
            (f.seq_tokens_max, f.seqs_max)
        });
    Profile {
        name: "calibrated".to_owned(),
        description: format!(
            "measured by `tidepool bench calibrate` {} on {}, threads = {} (0 = all cores), \
             {context_tokens}-token contexts × {seqs_max} sequences{}",
            env!("CARGO_PKG_VERSION"),
            samples.cpu,
            samples.threads,
            if args.from_samples.is_some() {
                " (refitted from its samples)"
            } else {
                ""
            }
        ),
        accelerator: AcceleratorProfile {
            memory_bytes,
            kv_saved_bytes_max: args.kv_saved_bytes_max,
            saved_kv_in_memory_budget: true,
            overlap_transfers: false,
            h2d_bytes_per_s: transfer.h2d_bytes_per_s,
            d2h_bytes_per_s: transfer.d2h_bytes_per_s,
            kv_fixed_s: transfer.kv_fixed_s,
            engine_overhead: 1.0,
            kv_paged: false,
        },
        families: fits.iter().map(|f| f.family.clone()).collect(),
    }
}

fn write(
    args: &CalibrateArgs,
    profile: &Profile,
    fits: &[FamilyFit],
    transfer: TransferFit,
    samples: &Samples,
) -> anyhow::Result<()> {
    let mut text = String::from(
        "# Written by `tidepool bench calibrate` (crates/tidepool/src/bench_calibrate.rs): every\n\
         # number below was measured on this machine through the pool's engine path and fitted by\n\
         # tidepool_sim::calibrate. Fit quality (relative RMS error of the fitted curve):\n",
    );
    for fit in fits {
        writeln!(
            text,
            "#  - {}: prefill {:.1} %, decode {:.1} %",
            fit.family.name,
            fit.prefill_error_rms * 100.0,
            fit.decode_error_rms * 100.0
        )?;
    }
    write!(
        text,
        "# KV transfer: {:.2} ms fixed, save {:.2} GB/s, restore {:.2} GB/s.\n\
         # memory_bytes: {} (see --memory-bytes).\n\n",
        transfer.kv_fixed_s * 1e3,
        transfer.d2h_bytes_per_s / 1e9,
        transfer.h2d_bytes_per_s / 1e9,
        if args.memory_bytes.is_some() {
            "given"
        } else {
            "memory_models_max × the largest family + kv_saved_bytes_max"
        }
    )?;
    text.push_str(&profile.to_toml()?);
    if let Some(parent) = args.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    }
    std::fs::write(&args.out, &text).with_context(|| format!("write {}", args.out.display()))?;
    // The written file must load as a profile (validation included).
    Profile::load(&args.out.to_string_lossy()).context("re-reading the written profile")?;
    let samples_path = args.out.with_extension("json");
    std::fs::write(&samples_path, serde_json::to_vec_pretty(samples)?)
        .with_context(|| format!("write {}", samples_path.display()))?;
    print_summary(args, profile, fits, &samples_path)?;
    print_resident(&samples.resident)
}

/// The resident check as a Markdown table on stdout (median per-step times).
fn print_resident(samples: &[ResidentSample]) -> anyhow::Result<()> {
    if samples.is_empty() {
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "\n| family | models loaded | batch × ctx | first step ms: alone / beside idle / in rotation | later steps ms: alone / beside / rotation | rotation first − beside first ms |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|")?;
    let median_ms = |v: &[u64]| {
        let mut v: Vec<f64> = v
            .iter()
            .map(|&ns| crate::bench_pool::as_f64(ns) / 1e6)
            .collect();
        crate::bench::percentile(&mut v, 50)
    };
    for sample in samples {
        let first =
            [&sample.alone, &sample.beside, &sample.rotating].map(|t| median_ms(&t.first_step_ns));
        let later =
            [&sample.alone, &sample.beside, &sample.rotating].map(|t| median_ms(&t.later_step_ns));
        writeln!(
            out,
            "| {} | {} | {} × {} | {:.2} / {:.2} / {:.2} | {:.2} / {:.2} / {:.2} | {:+.2} |",
            sample.family,
            sample.models,
            sample.batch,
            sample.ctx,
            first[0],
            first[1],
            first[2],
            later[0],
            later[1],
            later[2],
            first[2] - first[1]
        )?;
    }
    Ok(())
}

/// The fitted costs as the simulator will use them, as a Markdown table on stdout.
fn print_summary(
    args: &CalibrateArgs,
    profile: &Profile,
    fits: &[FamilyFit],
    samples_path: &std::path::Path,
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let seqs_max = fits.first().map_or(args.seqs_max, |f| f.family.seqs_max);
    writeln!(
        out,
        "| family | load s | prefill ms/token | decode ms (B=1) | decode ms (B={seqs_max}) | rider ms | fit error prefill / decode |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|---|")?;
    for fit in fits {
        let f = &fit.family;
        // The simulator's own cost of a step (table or line) at 128 context tokens a sequence.
        let costs = Costs::new(&profile.accelerator, f);
        let step = |b: u32| {
            let batch = f64::from(b);
            crate::bench_pool::as_f64(costs.decode_ns(batch, batch * 128.0)) / 1e6
        };
        writeln!(
            out,
            "| {} | {:.3} | {:.3} | {:.1} | {:.1} | {} | {:.1} % / {:.1} % |",
            f.name,
            f.load_s,
            f.prefill_per_token_ms,
            step(1),
            step(seqs_max),
            f.prefill_rider_ms
                .map_or_else(|| "—".to_owned(), |ms| format!("{ms:.2}")),
            fit.prefill_error_rms * 100.0,
            fit.decode_error_rms * 100.0
        )?;
    }
    writeln!(
        out,
        "profile: {}  samples: {}",
        args.out.display(),
        samples_path.display()
    )?;
    Ok(())
}

/// The CPU model name, for the profile's description.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "an unknown CPU".to_owned())
}

/// The resident check (see [`ResidentSample`]): does a family's decode step, measured above
/// with one model loaded, hold with `--resident-models` loaded and taking turns? The first
/// `families.len()` models are each family's sample; the rest are more instances of the
/// families, loaded (and decoding, in rotation) beside them.
fn resident_check(
    args: &CalibrateArgs,
    families: &[(&str, &MultiModelConfig)],
    next_seq: &mut u64,
) -> anyhow::Result<Vec<ResidentSample>> {
    let count = if args.quick {
        args.resident_models.min(2)
    } else {
        args.resident_models
    };
    let count = usize::try_from(count).unwrap_or(0);
    if count < 2 || families.is_empty() {
        return Ok(Vec::new());
    }
    let mut configs = Vec::with_capacity(count);
    for i in 0..count {
        let Some(&(name, base)) = families.get(i % families.len()) else {
            bail!("no family for resident model {i}");
        };
        let mut config = base.clone();
        config.model_id = ModelId::new(format!("res-{i}-{name}"))?;
        configs.push(config);
    }
    let fronts = front_ends(&configs)?;
    let mut accelerator = Accelerator::new(configs)?;
    let batch = RESIDENT_BATCH.min(args.seqs_max);
    let mut samples: Vec<ResidentSample> = families
        .iter()
        .take(count)
        .map(|&(name, _)| ResidentSample {
            family: name.to_owned(),
            models: u32::try_from(count).unwrap_or(u32::MAX),
            batch,
            ctx: RESIDENT_CTX,
            alone: TurnTimes::default(),
            beside: TurnTimes::default(),
            rotating: TurnTimes::default(),
        })
        .collect();
    tracing::info!(models = count, "resident check");
    for _ in 0..args.repeats {
        for (model, sample) in samples.iter_mut().enumerate() {
            for other in 0..count {
                accelerator.evict(other);
            }
            accelerator.load(model)?;
            let steps = Measure::new(&mut accelerator, &fronts, model, next_seq, args)?
                .consecutive_turns(batch)?;
            sample.alone.extend(steps);
        }
        for model in 0..count {
            accelerator.load(model)?;
        }
        for (model, sample) in samples.iter_mut().enumerate() {
            let steps = Measure::new(&mut accelerator, &fronts, model, next_seq, args)?
                .consecutive_turns(batch)?;
            sample.beside.extend(steps);
        }
        rotation(
            &mut accelerator,
            &fronts,
            batch,
            next_seq,
            args,
            &mut samples,
        )?;
    }
    Ok(samples)
}

/// Every model of `accelerator` (one front each) decoding `batch` sequences, in round-robin
/// turns (`RESIDENT_TURNS` rounds); the turns of the first `samples.len()` models are recorded.
fn rotation(
    accelerator: &mut Accelerator,
    fronts: &[ModelFrontEnd],
    batch: u32,
    next_seq: &mut u64,
    args: &CalibrateArgs,
    samples: &mut [ResidentSample],
) -> anyhow::Result<()> {
    let count = fronts.len();
    let mut lives = Vec::with_capacity(count);
    for model in 0..count {
        let mut measure = Measure::new(accelerator, fronts, model, next_seq, args)?;
        lives.push(measure.decoding(batch, RESIDENT_CTX)?);
    }
    for _ in 0..RESIDENT_TURNS {
        for (model, slot) in lives.iter_mut().enumerate() {
            let Some(live) = slot.as_mut() else {
                continue;
            };
            let mut measure = Measure::new(accelerator, fronts, model, next_seq, args)?;
            match measure.timed_turn(live) {
                Some(ns) => {
                    if let Some(sample) = samples.get_mut(model) {
                        sample.rotating.push(ns);
                    }
                }
                None => {
                    if let Some(live) = slot.take() {
                        measure.finish(live);
                    }
                }
            }
        }
    }
    for (model, slot) in lives.iter_mut().enumerate() {
        if let Some(live) = slot.take() {
            Measure::new(accelerator, fronts, model, next_seq, args)?.finish(live);
        }
    }
    Ok(())
}

/// Each model's front end (tokenizer, request preparation), in the accelerator's model order.
fn front_ends(configs: &[MultiModelConfig]) -> anyhow::Result<Vec<ModelFrontEnd>> {
    Ok(configs
        .iter()
        .map(|c| ModelFrontEnd::open(c.clone()))
        .collect::<Result<_, _>>()?)
}

/// Which samples to take.
struct Plan {
    prefill: Vec<u32>,
    group_prefill: Vec<u32>,
    decode_contexts: Vec<u32>,
    decode_batches: Vec<u32>,
    /// Decoding sequences riding in a prefill (`RiderSample`), at most `seqs_max − 1`.
    riders: Vec<u32>,
    transfers: Vec<u32>,
}

impl Plan {
    fn new(quick: bool, seqs_max: u32) -> Self {
        let most_riders = seqs_max.saturating_sub(1);
        let mut riders = if quick {
            vec![most_riders]
        } else {
            vec![1, seqs_max / 2, most_riders]
        };
        riders.retain(|&r| r > 0);
        riders.dedup();
        if quick {
            Self {
                prefill: QUICK_PREFILL_LENGTHS.to_vec(),
                group_prefill: QUICK_GROUP_PREFILL_LENGTHS.to_vec(),
                decode_contexts: QUICK_DECODE_CONTEXTS.to_vec(),
                decode_batches: QUICK_DECODE_BATCHES
                    .iter()
                    .map(|&b| b.min(seqs_max))
                    .collect(),
                riders,
                transfers: TRANSFER_LENGTHS[..2].to_vec(),
            }
        } else {
            Self {
                prefill: PREFILL_LENGTHS.to_vec(),
                group_prefill: GROUP_PREFILL_LENGTHS.to_vec(),
                decode_contexts: DECODE_CONTEXTS.to_vec(),
                decode_batches: (1..=seqs_max).collect(),
                riders,
                transfers: TRANSFER_LENGTHS.to_vec(),
            }
        }
    }
}

/// One family's measurements on a shared accelerator.
struct Measure<'a> {
    accelerator: &'a mut Accelerator,
    front: &'a ModelFrontEnd,
    model: usize,
    next_seq: &'a mut u64,
    repeats: u32,
    seqs_max: u32,
    plan: Plan,
}

/// Live sequences of one sample: ids and their event receivers (kept open, drained).
struct Live {
    ids: Vec<u64>,
    generations: Vec<Generation>,
}

impl Live {
    fn drain(&mut self) {
        for generation in &mut self.generations {
            while generation.events.try_recv().is_ok() {}
        }
    }
}

fn ns_since(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

impl<'a> Measure<'a> {
    /// Model `model` of `accelerator`, whose models' front ends are `fronts` (same order).
    fn new(
        accelerator: &'a mut Accelerator,
        fronts: &'a [ModelFrontEnd],
        model: usize,
        next_seq: &'a mut u64,
        args: &CalibrateArgs,
    ) -> anyhow::Result<Self> {
        let Some(front) = fronts.get(model) else {
            bail!("no front end for model {model}");
        };
        Ok(Self {
            accelerator,
            front,
            model,
            next_seq,
            repeats: args.repeats,
            seqs_max: args.seqs_max,
            plan: Plan::new(args.quick, args.seqs_max),
        })
    }

    /// One 16-step turn of `live`: its first step's time and the mean of the others; `None` if
    /// a sequence ended in it, which spoils the sample and the rest of `live`'s turns.
    fn timed_turn(&mut self, live: &mut Live) -> Option<(u64, u64)> {
        let started = Instant::now();
        let first = self.accelerator.decode(self.model, &live.ids, 1);
        let first_ns = ns_since(started);
        let started = Instant::now();
        let rest = self
            .accelerator
            .decode(self.model, &live.ids, DECODE_STEPS - 1);
        let rest_ns = ns_since(started);
        live.drain();
        let whole = first.finished.is_empty()
            && rest.finished.is_empty()
            && first.steps + rest.steps == DECODE_STEPS;
        whole.then(|| (first_ns, rest_ns / u64::from(DECODE_STEPS - 1)))
    }

    /// `RESIDENT_TURNS` consecutive turns of `batch` fresh sequences (fewer if one ends early
    /// in every attempt).
    fn consecutive_turns(&mut self, batch: u32) -> anyhow::Result<Vec<(u64, u64)>> {
        let mut turns = Vec::new();
        for _ in 0..DECODE_ATTEMPTS_MAX {
            let Some(mut live) = self.decoding(batch, RESIDENT_CTX)? else {
                continue;
            };
            for _ in 0..RESIDENT_TURNS {
                match self.timed_turn(&mut live) {
                    Some(turn) => turns.push(turn),
                    None => break,
                }
            }
            self.finish(live);
            if turns.len() == usize::try_from(RESIDENT_TURNS).unwrap_or(0) {
                break;
            }
            turns.clear();
        }
        Ok(turns)
    }

    fn family(
        &mut self,
        name: &str,
        args: &CalibrateArgs,
    ) -> anyhow::Result<(FamilyMeasurements, Vec<TransferSample>)> {
        let sizes: Calibration = self.accelerator.calibrate(self.model)?;
        let mut m = FamilyMeasurements {
            name: name.to_owned(),
            weights_bytes: sizes.weights_bytes,
            kv_bytes_per_token: sizes.kv_bytes_per_token,
            seqs_max: args.seqs_max,
            seq_tokens_max: args.context_tokens,
            ctx_fixed_bytes: sizes.ctx_bytes.saturating_sub(
                u64::from(args.seqs_max)
                    * u64::from(args.context_tokens)
                    * sizes.kv_bytes_per_token,
            ),
            load_ns: Vec::new(),
            unload_ns: Vec::new(),
            prefill: Vec::new(),
            decode: Vec::new(),
            riders: Vec::new(),
        };
        for _ in 0..self.repeats {
            let started = Instant::now();
            self.accelerator.load(self.model)?;
            m.load_ns.push(ns_since(started));
            let started = Instant::now();
            self.accelerator.evict(self.model);
            m.unload_ns.push(ns_since(started));
        }
        self.accelerator.load(self.model)?;
        for _ in 0..self.repeats {
            for len in self.plan.prefill.clone() {
                m.prefill.push(self.prefill_sample(&[len])?);
            }
            for len in self.plan.group_prefill.clone() {
                let lens = vec![len; usize::try_from(self.seqs_max).unwrap_or(1)];
                m.prefill.push(self.prefill_sample(&lens)?);
            }
            for batch in self.plan.decode_batches.clone() {
                for ctx in self.plan.decode_contexts.clone() {
                    if let Some(sample) = self.decode_sample(batch, ctx)? {
                        m.decode.push(sample);
                    }
                }
            }
            for riders in self.plan.riders.clone() {
                if let Some(sample) = self.rider_sample(riders)? {
                    m.riders.push(sample);
                }
            }
        }
        let mut transfers = Vec::new();
        for len in self.plan.transfers.clone() {
            transfers.push(self.transfer_sample(len)?);
        }
        self.accelerator.evict(self.model);
        Ok((m, transfers))
    }

    /// Registers one greedy sequence per prompt length.
    fn start(&mut self, lengths: &[u32], max_tokens: u32) -> anyhow::Result<Live> {
        let mut live = Live {
            ids: Vec::new(),
            generations: Vec::new(),
        };
        for &len in lengths {
            *self.next_seq += 1;
            let id = *self.next_seq;
            let request = u32::try_from(id).unwrap_or(u32::MAX);
            let mut prompt = self.front.tokenize(&prompt_for(request, len + 32))?;
            while prompt.len() < usize::try_from(len).unwrap_or(0) {
                prompt.extend_from_within(..);
            }
            prompt.truncate(usize::try_from(len).unwrap_or(0));
            let (prepared, generation) = self.front.prepare(GenerateRequest {
                request_id: RequestId::new(),
                prompt,
                params: SamplingParams {
                    temperature: 0.0,
                    max_tokens,
                    ..SamplingParams::default()
                },
                remote: None,
            })?;
            self.accelerator.register(id, self.model, prepared, None);
            live.ids.push(id);
            live.generations.push(generation);
        }
        Ok(live)
    }

    fn finish(&mut self, mut live: Live) {
        for &id in &live.ids {
            self.accelerator.release(id);
        }
        live.drain();
        self.accelerator.flush();
    }

    /// Time of one prefill of new prompts of `lengths` tokens, with `riders` (sequences already
    /// decoding) in its batch.
    fn timed_prefill(&mut self, lengths: &[u32], riders: &[u64]) -> anyhow::Result<u64> {
        let mut live = self.start(lengths, 8)?;
        let started = Instant::now();
        self.accelerator.prefill(self.model, &live.ids, riders);
        let ns = ns_since(started);
        live.drain();
        self.finish(live);
        Ok(ns)
    }

    fn prefill_sample(&mut self, lengths: &[u32]) -> anyhow::Result<PrefillSample> {
        Ok(PrefillSample {
            tokens: lengths.iter().map(|&l| u64::from(l)).sum(),
            tokens_sq: lengths.iter().map(|&l| u64::from(l) * u64::from(l)).sum(),
            ns: self.timed_prefill(lengths, &[])?,
        })
    }

    /// `count` sequences of `ctx` prompt tokens, prefilled and decoding; `None` if one ended at
    /// its first token (the caller tries again).
    fn decoding(&mut self, count: u32, ctx: u32) -> anyhow::Result<Option<Live>> {
        let lengths = vec![ctx; usize::try_from(count).unwrap_or(1)];
        let mut live = self.start(&lengths, DECODE_STEPS * 4)?;
        let prefilled = self.accelerator.prefill(self.model, &live.ids, &[]);
        live.drain();
        if prefilled.finished.is_empty() {
            Ok(Some(live))
        } else {
            self.finish(live);
            Ok(None)
        }
    }

    /// A decode turn of `batch` sequences that start at `ctx` tokens; `None` if a sequence
    /// ended early in every attempt (the sample would not be of `batch` sequences).
    fn decode_sample(&mut self, batch: u32, ctx: u32) -> anyhow::Result<Option<DecodeSample>> {
        for _ in 0..DECODE_ATTEMPTS_MAX {
            let Some(mut live) = self.decoding(batch, ctx)? else {
                continue;
            };
            let started = Instant::now();
            let outcome = self.accelerator.decode(self.model, &live.ids, DECODE_STEPS);
            let ns = ns_since(started);
            live.drain();
            self.finish(live);
            if outcome.finished.is_empty() && outcome.steps == DECODE_STEPS {
                // Context grows by one token per step: the turn's mean is ctx + (steps + 1) / 2.
                let mean_ctx = u64::from(ctx) + u64::from(DECODE_STEPS).div_ceil(2);
                return Ok(Some(DecodeSample {
                    batch,
                    ctx_tokens: u64::from(batch) * mean_ctx,
                    ns: ns / u64::from(DECODE_STEPS),
                }));
            }
        }
        tracing::warn!(batch, ctx, "every attempt ended early; sample skipped");
        Ok(None)
    }

    /// A 128-token prompt prefilled alone, then another with `riders` sequences (decoding at
    /// 128 context tokens) in its batch; `None` if a would-be rider ended at its first token in
    /// every attempt. (A rider that ends *in* the timed prefill still had its token computed.)
    fn rider_sample(&mut self, riders: u32) -> anyhow::Result<Option<RiderSample>> {
        const LEN: u32 = 128;
        for _ in 0..DECODE_ATTEMPTS_MAX {
            let Some(mut decoding) = self.decoding(riders, LEN)? else {
                continue;
            };
            let alone_ns = self.timed_prefill(&[LEN], &[])?;
            let with_riders_ns = self.timed_prefill(&[LEN], &decoding.ids)?;
            decoding.drain();
            self.finish(decoding);
            return Ok(Some(RiderSample {
                riders,
                ctx_tokens: u64::from(riders) * u64::from(LEN + 1),
                prompt_tokens: u64::from(LEN),
                alone_ns,
                with_riders_ns,
            }));
        }
        tracing::warn!(riders, "every attempt ended early; rider sample skipped");
        Ok(None)
    }

    fn transfer_sample(&mut self, len: u32) -> anyhow::Result<TransferSample> {
        let mut live = self.start(&[len], 8)?;
        self.accelerator.prefill(self.model, &live.ids, &[]);
        live.drain();
        let id = live.ids.first().copied().unwrap_or(0);
        let started = Instant::now();
        let bytes = self.accelerator.save(id);
        let save_ns = ns_since(started);
        let started = Instant::now();
        self.accelerator.restore(id);
        let restore_ns = ns_since(started);
        self.finish(live);
        Ok(TransferSample {
            bytes,
            save_ns,
            restore_ns,
        })
    }
}
