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
//! `prompt_for` text, cut to the exact token count.
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

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use tidepool_core::ModelId;
use tidepool_engine::multi::{Accelerator, MultiModelConfig};
use tidepool_sim::calibrate::{
    FamilyFit, FamilyMeasurements, TransferFit, TransferSample, fit_family, fit_transfer,
};
use tidepool_sim::profile::{Accelerator as AcceleratorProfile, Costs, Profile};

use crate::common::{GEMMA_FILE, SMOLLM2_FILE, as_f64, percentile};
use crate::measure::{
    DECODE_CONTEXTS, DECODE_STEPS, Measure, PREFILL_LENGTHS, Settings, front_ends,
};
use crate::resident::{ResidentSample, resident_check};

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

impl CalibrateArgs {
    /// What the measurements read of the flags.
    fn settings(&self) -> Settings {
        Settings {
            context_tokens: self.context_tokens,
            seqs_max: self.seqs_max,
            repeats: self.repeats,
            quick: self.quick,
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
    let settings = args.settings();
    let fronts = front_ends(&configs)?;
    let mut accelerator = Accelerator::new(configs.clone())?;
    let mut measured = Vec::new();
    let mut transfers = Vec::new();
    let mut next_seq = 0_u64;
    for (index, (name, _)) in families.iter().enumerate() {
        tracing::info!(family = name, "measuring");
        let mut run = Measure::new(&mut accelerator, &fronts, index, &mut next_seq, &settings)?;
        let (m, t) = run.family(name, &settings)?;
        measured.push(m);
        transfers.extend(t);
    }
    drop(accelerator);
    let named: Vec<(&str, &MultiModelConfig)> = families
        .iter()
        .map(|(name, _)| *name)
        .zip(&configs)
        .collect();
    let resident = resident_check(&settings, args.resident_models, &named, &mut next_seq)?;
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
        "# Written by `tidepool bench calibrate` (crates/tidepool-bench/src/calibrate.rs): every\n\
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
        let mut v: Vec<f64> = v.iter().map(|&ns| as_f64(ns) / 1e6).collect();
        percentile(&mut v, 50)
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
            as_f64(costs.decode_ns(batch, batch * 128.0)) / 1e6
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
    writeln!(out)?;
    writeln!(
        out,
        "| family | weights ms (repack) | context ms | first step ms | evict ms | KV save / restore ms (state KB) | extra resident MiB |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|---|")?;
    for fit in fits {
        let f = &fit.family;
        let Some(p) = f.switch else {
            continue;
        };
        writeln!(
            out,
            "| {} | {:.1} ({:.1}) | {:.1} | {:.1} | {:.1} | {:.2} / {:.2} ({}) | {:.1} |",
            f.name,
            p.weights_s * 1e3,
            p.repack_s * 1e3,
            p.context_s * 1e3,
            p.first_step_s * 1e3,
            p.evict_s * 1e3,
            p.kv_save_s * 1e3,
            p.kv_restore_s * 1e3,
            p.kv_state_bytes / 1024,
            as_f64(p.ctx_extra_bytes) / 1_048_576.0,
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
