//! The pool benchmark's report: the JSON written at `--out` (and read back by `--replay`), one
//! row per (policy, rate) with the real run's figures and the simulator's, and the SVG plot of
//! attainment against rate written next to it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tidepool_pool::CostEstimate;
use tidepool_sim::svg::{Series, line_chart};
use tidepool_sim::workload::Request;

use crate::actions::ActionTimes;
use crate::search::{ATTAINMENT_SUSTAINABLE_MIN, SearchResult};
use crate::workload::{
    BenchModel, CONTEXT_TOKENS, MARKET_MODELS, MEMORY_MODELS_MAX, Market, OUTPUT_TOKENS_DIVISOR,
    OUTPUT_TOKENS_MAX, OUTPUT_TOKENS_MIN, PROMPT_TOKENS_DIVISOR, PROMPT_TOKENS_MAX,
    PROMPT_TOKENS_MIN, SEQS_MAX, ServerKnobs, Slo, Sweep, ZIPF_S,
};

/// The run's results.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct PoolBenchReport {
    pub(crate) models: Vec<BenchModel>,
    pub(crate) memory_models_max: u32,
    pub(crate) kv_saved_bytes_max: u64,
    pub(crate) context_tokens: u32,
    pub(crate) seqs_max: u32,
    pub(crate) slo: Slo,
    pub(crate) duration_s: u32,
    pub(crate) seed: u64,
    pub(crate) zipf_s: f64,
    pub(crate) trace: String,
    /// `prompt = clamp(trace / divisor, min, max)`, same for output.
    pub(crate) length_scaling: LengthScaling,
    pub(crate) attainment_sustainable_min: f64,
    pub(crate) decode_steps_min: u32,
    pub(crate) turn_quota_ms_max: u64,
    pub(crate) prefill_cold_lazy: bool,
    pub(crate) round_resident_first: bool,
    /// Decoding sequences rode in prefills; absent (false) in reports written before riders.
    #[serde(default)]
    pub(crate) prefill_riders: bool,
    /// The simulator profile every row was replayed with, if any.
    pub(crate) sim_profile: Option<String>,
    pub(crate) policies: Vec<PolicySummary>,
    /// Per market, each policy's sustainable-rate search (absent in reports written before
    /// markets: those swept one short market).
    #[serde(default)]
    pub(crate) markets: Vec<MarketResult>,
    pub(crate) rows: Vec<RateRow>,
    /// `token` / `swap-lru` sustainable rate of the first market; absent when `swap-lru`
    /// sustained no rate.
    pub(crate) token_vs_swap_lru: Option<f64>,
    /// `token` / `dedicated` sustainable rate; absent when `dedicated` sustained no rate.
    pub(crate) token_vs_dedicated: Option<f64>,
}

impl PoolBenchReport {
    /// The pool knobs and SLOs the run's servers had.
    pub(crate) fn knobs(&self) -> ServerKnobs {
        ServerKnobs {
            slo: self.slo,
            kv_saved_bytes_max: self.kv_saved_bytes_max,
            decode_steps_min: self.decode_steps_min,
            turn_quota_ms_max: self.turn_quota_ms_max,
            prefill_cold_lazy: self.prefill_cold_lazy,
            round_resident_first: self.round_resident_first,
            prefill_riders: self.prefill_riders,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct LengthScaling {
    pub(crate) prompt_divisor: u32,
    pub(crate) prompt_tokens_min: u32,
    pub(crate) prompt_tokens_max: u32,
    pub(crate) output_divisor: u32,
    pub(crate) output_tokens_min: u32,
    pub(crate) output_tokens_max: u32,
}

/// One market's searches.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct MarketResult {
    pub(crate) market: Market,
    /// Seconds of arrivals per probe.
    pub(crate) duration_s: u32,
    /// `output = clamp(trace / divisor, min, max)`; prompts as in `length_scaling`.
    pub(crate) output_divisor: u32,
    pub(crate) output_tokens_max: u32,
    pub(crate) searches: Vec<PolicySearch>,
}

impl MarketResult {
    /// A policy's sustainable rate over `swap-lru`'s (`None` if either is missing or zero).
    pub(crate) fn ratio(&self, policy: &str, base: &str) -> Option<f64> {
        let rate = |name: &str| {
            self.searches
                .iter()
                .find(|s| s.policy == name)
                .map(|s| s.result.sustainable_rate_per_s)
        };
        match (rate(policy), rate(base)) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        }
    }
}

/// What one policy's search found in one market.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PolicySearch {
    pub(crate) policy: String,
    pub(crate) result: SearchResult,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct PolicySummary {
    pub(crate) policy: String,
    /// The budget the server reported (`GET /v1/pool`).
    pub(crate) memory_bytes_max: u64,
    /// In the first market.
    pub(crate) sustainable_rate_per_s: f64,
}

/// One policy at one rate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RateRow {
    pub(crate) policy: String,
    /// The market (absent in older reports: short).
    #[serde(default)]
    pub(crate) market: Market,
    /// The interleaved pass the probe ran in (0-based).
    #[serde(default)]
    pub(crate) pass: u32,
    pub(crate) rate_per_s: f64,
    pub(crate) requests: u32,
    pub(crate) requests_failed: u32,
    pub(crate) requests_timed_out: u32,
    /// Non-2xx responses by status.
    pub(crate) statuses: BTreeMap<u16, u32>,
    /// Streams that answered 200 and then ended with an error event, by the event's `code`
    /// (`stream_stalled`: no token within the gateway's `stream_stall_ms_max`).
    #[serde(default)]
    pub(crate) stream_errors: BTreeMap<String, u32>,
    pub(crate) tokens_expected: u64,
    pub(crate) tokens_on_time: u64,
    pub(crate) attainment: f64,
    pub(crate) goodput_tokens_per_s: f64,
    pub(crate) ttft_ms_p50: f64,
    pub(crate) ttft_ms_p99: f64,
    pub(crate) wall_s: f64,
    pub(crate) switches_per_s: f64,
    pub(crate) loads: u64,
    pub(crate) evictions: u64,
    pub(crate) kv_saves: u64,
    /// Latest send against the schedule (load-generator health), in ms.
    pub(crate) send_lag_ms_max: f64,
    /// Where the engine's time went during the rate (the server's pool counters).
    #[serde(default)]
    pub(crate) actions: ActionTimes,
    /// The same requests replayed in the simulator (`--sim-profile`).
    pub(crate) sim: Option<SimRow>,
    /// What the server held when the rate started (model indices, least recently used first):
    /// the replay starts from the same residents.
    #[serde(default)]
    pub(crate) resident_at_start: Vec<u32>,
    /// What was actually served, for the replay (and `--replay` later).
    #[serde(default)]
    pub(crate) replay: Vec<Request>,
    /// The scheduler's cost beliefs per model when the rate started, for the replay.
    #[serde(default)]
    pub(crate) estimates: Vec<Option<CostEstimate>>,
}

/// The simulator's answer for one (policy, rate) of the real run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SimRow {
    pub(crate) attainment: f64,
    pub(crate) ttft_ms_p99: f64,
    pub(crate) loads: u64,
    pub(crate) kv_saves: u64,
    pub(crate) requests_rejected: u64,
    pub(crate) actions: ActionTimes,
    /// `--at-run-speed`: the factor the profile's engine costs were scaled by (absent: the
    /// profile as calibrated).
    #[serde(default)]
    pub(crate) speed: Option<RunSpeed>,
}

/// The engine's speed in a real run relative to a simulation of the same requests, per kind of
/// action: what the run's engine took over what the profile charged. `--at-run-speed` scales
/// the profile by it, so the comparison is left with the scheduling model alone.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub(crate) struct RunSpeed {
    /// Decode steps, family by family and batch size by batch size.
    pub(crate) decode: f64,
    /// All prefill time (the same prompts on both sides); `None` if a side prefilled nothing.
    pub(crate) prefill: Option<f64>,
    /// Mean model load; `None` if a side loaded nothing.
    pub(crate) load: Option<f64>,
}

impl std::fmt::Display for RunSpeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let factor = |v: Option<f64>| v.map_or_else(|| "–".to_owned(), |v| format!("{v:.2}"));
        write!(
            f,
            "×{:.2} / {} / {}",
            self.decode,
            factor(self.prefill),
            factor(self.load)
        )
    }
}

/// The report of a run: its rows and policies with the sweep, knobs and constants they ran under.
pub(crate) fn finish_report(
    models: Vec<BenchModel>,
    mut policies: Vec<PolicySummary>,
    rows: Vec<RateRow>,
    markets: Vec<MarketResult>,
    sweep: &Sweep,
    knobs: &ServerKnobs,
    sim_profile: Option<&Path>,
) -> PoolBenchReport {
    let first = markets.first();
    for summary in &mut policies {
        summary.sustainable_rate_per_s = first
            .and_then(|m| m.searches.iter().find(|s| s.policy == summary.policy))
            .map_or(0.0, |s| s.result.sustainable_rate_per_s);
    }
    PoolBenchReport {
        token_vs_swap_lru: first.and_then(|m| m.ratio("token", "swap-lru")),
        token_vs_dedicated: first.and_then(|m| m.ratio("token", "dedicated")),
        markets,
        models,
        memory_models_max: MEMORY_MODELS_MAX,
        kv_saved_bytes_max: knobs.kv_saved_bytes_max,
        context_tokens: CONTEXT_TOKENS,
        seqs_max: SEQS_MAX,
        slo: knobs.slo,
        duration_s: sweep.duration_s,
        seed: sweep.seed,
        zipf_s: ZIPF_S,
        trace: sweep.trace.display().to_string(),
        length_scaling: LengthScaling {
            prompt_divisor: PROMPT_TOKENS_DIVISOR,
            prompt_tokens_min: PROMPT_TOKENS_MIN,
            prompt_tokens_max: PROMPT_TOKENS_MAX,
            output_divisor: OUTPUT_TOKENS_DIVISOR,
            output_tokens_min: OUTPUT_TOKENS_MIN,
            output_tokens_max: OUTPUT_TOKENS_MAX,
        },
        attainment_sustainable_min: ATTAINMENT_SUSTAINABLE_MIN,
        decode_steps_min: knobs.decode_steps_min,
        turn_quota_ms_max: knobs.turn_quota_ms_max,
        prefill_cold_lazy: knobs.prefill_cold_lazy,
        round_resident_first: knobs.round_resident_first,
        prefill_riders: knobs.prefill_riders,
        sim_profile: sim_profile.map(|p| p.display().to_string()),
        policies,
        rows,
    }
}

/// The attainment-vs-rate plot (with the simulator's replay, when run, as `… (sim)` series).
fn plot(report: &PoolBenchReport) -> String {
    let mut markets: Vec<Market> = report.rows.iter().map(|r| r.market).collect();
    markets.sort_unstable();
    markets.dedup();
    let mut series: Vec<Series> = Vec::new();
    for &market in &markets {
        for p in &report.policies {
            let rows = || {
                report
                    .rows
                    .iter()
                    .filter(move |r| r.policy == p.policy && r.market == market)
            };
            let sorted = |mut points: Vec<(f64, f64)>| {
                points.sort_by(|a, b| a.0.total_cmp(&b.0));
                points
            };
            let name = format!("{} ({})", p.policy, market.name());
            series.push(Series {
                name: name.clone(),
                points: sorted(
                    rows()
                        .map(|r| (r.rate_per_s, r.attainment * 100.0))
                        .collect(),
                ),
            });
            let sim: Vec<(f64, f64)> = rows()
                .filter_map(|r| {
                    r.sim
                        .as_ref()
                        .map(|sim| (r.rate_per_s, sim.attainment * 100.0))
                })
                .collect();
            if !sim.is_empty() {
                series.push(Series {
                    name: format!("{name} sim"),
                    points: sorted(sim),
                });
            }
        }
    }
    line_chart(
        &format!(
            "Token-SLO attainment, {MARKET_MODELS} models, budget fits {MEMORY_MODELS_MAX} (TTFT {} ms, TBT {} ms)",
            report.slo.ttft_ms, report.slo.tbt_ms
        ),
        "arrival rate (requests/s, all models)",
        "attainment (%)",
        &series,
        (0.0, 100.0),
        Some((ATTAINMENT_SUSTAINABLE_MIN * 100.0, "90 %")),
    )
}

/// Writes the JSON report at `out_path` and the plot next to it (same name, `.svg`); returns the
/// plot's path.
pub(crate) fn write_files(report: &PoolBenchReport, out_path: &Path) -> anyhow::Result<PathBuf> {
    if let Some(parent) = out_path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    }
    std::fs::write(out_path, serde_json::to_vec_pretty(report)?)
        .with_context(|| format!("write {}", out_path.display()))?;
    let svg_path = out_path.with_extension("svg");
    std::fs::write(&svg_path, plot(report))
        .with_context(|| format!("write {}", svg_path.display()))?;
    Ok(svg_path)
}
