//! What the pool benchmark asks of a server: the market of models (`tidepool_sim`'s generator
//! with the `cpu-devvm` profile, each family served by a local GGUF), per swept rate the
//! schedule of requests with the trace's lengths scaled to small CPU models, the token SLOs and
//! pool knobs every server runs with, and that server's configuration file. Also the requests
//! as the simulator replays them: as planned, or as a real run served them.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tidepool_core::PoolPolicy;
use tidepool_sim::workload::{Arrivals, MarketSpec, Popularity, Request, TraceRow, market};
use tidepool_sim::{Profile, read_azure_trace};

use crate::client::{End, RequestOutcome};
use crate::common::{GEMMA_FILE, SMOLLM2_FILE};

/// Models in the market.
pub(crate) const MARKET_MODELS: u32 = 8;
/// Zipf exponent of the models' popularity.
pub(crate) const ZIPF_S: f64 = 1.0;
/// The pool's budget fits this many of the largest models (plus the saved-KV pool).
pub(crate) const MEMORY_MODELS_MAX: u32 = 3;
/// The cost-model profile whose families name the market's models.
const PROFILE: &str = "cpu-devvm";
/// Trace prompt lengths are divided by this.
pub(crate) const PROMPT_TOKENS_DIVISOR: u32 = 8;
/// Shortest scaled prompt, in tokens.
pub(crate) const PROMPT_TOKENS_MIN: u32 = 8;
/// Longest scaled prompt, in tokens.
pub(crate) const PROMPT_TOKENS_MAX: u32 = 192;
/// Trace output lengths are divided by this.
pub(crate) const OUTPUT_TOKENS_DIVISOR: u32 = 4;
/// Fewest completion tokens asked, in tokens.
pub(crate) const OUTPUT_TOKENS_MIN: u32 = 4;
/// Most completion tokens asked, in tokens (the short market).
pub(crate) const OUTPUT_TOKENS_MAX: u32 = 64;
/// Most completion tokens asked in the real-length market, whose outputs are the trace's own
/// (mean 211, median 129, p90 424 tokens over the conversation trace), capped here.
pub(crate) const LONG_OUTPUT_TOKENS_MAX: u32 = 256;
/// Context of every model, in tokens: the longest prompt + output (256) with room for the prompt
/// text tokenizing longer than planned.
pub(crate) const CONTEXT_TOKENS: u32 = 512;
const _: () = assert!(
    PROMPT_TOKENS_MAX + OUTPUT_TOKENS_MAX <= CONTEXT_TOKENS
        && PROMPT_TOKENS_MAX + LONG_OUTPUT_TOKENS_MAX <= CONTEXT_TOKENS,
    "the longest request must fit the context"
);

/// How the trace's lengths are fitted to the small CPU models. Prompts are the same in both
/// markets; outputs differ.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Market {
    /// Outputs divided by 4 and capped at 64 tokens (mean 38): short streams, little
    /// head-of-line blocking for request-level swapping.
    #[default]
    Short,
    /// The trace's own output lengths, capped at 256 tokens: a stream holds its model for tens
    /// of seconds, the head-of-line blocking token-level switching removes.
    Long,
}

impl Market {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Short => "short",
            Self::Long => "long",
        }
    }

    /// `(output divisor, output cap)` in tokens.
    pub(crate) fn output_scaling(self) -> (u32, u32) {
        match self {
            Self::Short => (OUTPUT_TOKENS_DIVISOR, OUTPUT_TOKENS_MAX),
            Self::Long => (1, LONG_OUTPUT_TOKENS_MAX),
        }
    }

    /// The trace's lengths scaled to the small models: `(prompt, output)` tokens.
    pub(crate) fn scale_lengths(self, prompt_tokens: u32, output_tokens: u32) -> (u32, u32) {
        let (divisor, cap) = self.output_scaling();
        (
            (prompt_tokens / PROMPT_TOKENS_DIVISOR).clamp(PROMPT_TOKENS_MIN, PROMPT_TOKENS_MAX),
            (output_tokens / divisor).clamp(OUTPUT_TOKENS_MIN, cap),
        )
    }
}
/// Continuous-batching slots of every model.
pub(crate) const SEQS_MAX: u32 = 4;

/// One model of the market as served.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct BenchModel {
    pub(crate) id: String,
    pub(crate) family: String,
    pub(crate) file: String,
}

/// One request of the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BenchRequest {
    /// Arrival, from the start of the rate.
    pub(crate) at: Duration,
    /// Index into the models.
    pub(crate) model: usize,
    pub(crate) prompt_tokens: u32,
    pub(crate) output_tokens: u32,
}

/// The token SLOs, in ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Slo {
    pub(crate) ttft_ms: u64,
    pub(crate) tbt_ms: u64,
}

impl Slo {
    /// Token `k`'s (0-based) deadline, from the send.
    pub(crate) fn deadline(self, k: u64) -> Duration {
        Duration::from_millis(self.ttft_ms.saturating_add(self.tbt_ms.saturating_mul(k)))
    }
}

/// The swept rates and what each rate's schedule is drawn from.
#[derive(Debug, Clone)]
pub(crate) struct Sweep {
    /// Azure-format trace whose lengths are sampled.
    pub(crate) trace: PathBuf,
    /// Total arrival rates, requests per second over all models.
    pub(crate) rates: Vec<f64>,
    /// Seconds of Poisson arrivals per rate.
    pub(crate) duration_s: u32,
    /// Seed of the market generator.
    pub(crate) seed: u64,
    /// How lengths are scaled.
    pub(crate) market: Market,
}

/// The `[pool]` settings every server of the sweep runs with; the simulator's replay runs with
/// the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ServerKnobs {
    pub(crate) slo: Slo,
    /// Cap on saved sequence states, in bytes (inside the budget).
    pub(crate) kv_saved_bytes_max: u64,
    pub(crate) decode_steps_min: u32,
    pub(crate) turn_quota_ms_max: u64,
    pub(crate) prefill_cold_lazy: bool,
    pub(crate) round_resident_first: bool,
    pub(crate) prefill_riders: bool,
}

impl ServerKnobs {
    /// The pool's knobs these servers run: the flags' values on the server's defaults.
    pub(crate) fn pool_knobs(&self) -> tidepool_pool::PoolKnobs {
        tidepool_pool::PoolKnobs {
            ttft_slo_ms: self.slo.ttft_ms,
            tbt_slo_ms: self.slo.tbt_ms,
            decode_steps_min: self.decode_steps_min,
            turn_quota_ms_max: self.turn_quota_ms_max,
            prefill_cold_lazy: self.prefill_cold_lazy,
            round_resident_first: self.round_resident_first,
            prefill_riders: self.prefill_riders,
            ..tidepool_pool::PoolKnobs::default()
        }
    }
}

/// The GGUF of a profile family: by name, else index 0 → SmolLM2 and the others → Gemma.
fn gguf_for_family(name: &str, index: usize) -> &'static str {
    let name = name.to_ascii_lowercase();
    if name.contains("smollm") {
        SMOLLM2_FILE
    } else if name.contains("gemma") || index > 0 {
        GEMMA_FILE
    } else {
        SMOLLM2_FILE
    }
}

/// A TOML basic string (JSON string escapes are valid TOML).
fn toml_string(text: &str) -> anyhow::Result<String> {
    Ok(serde_json::to_string(text)?)
}

/// The server configuration of one policy.
pub(crate) fn server_config(
    policy: &str,
    port: u16,
    database_url: &str,
    models_dir: &Path,
    models: &[BenchModel],
    knobs: &ServerKnobs,
) -> anyhow::Result<String> {
    let mut text = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\ndatabase_url = {}\nmodels_dir = {}\n\n\
         [engine]\nthreads = 0\n\n[billing]\nenforce = false\n\n\
         [pool]\npolicy = \"{policy}\"\nmemory_models_max = {MEMORY_MODELS_MAX}\n\
         kv_saved_bytes_max = {}\nttft_slo_ms = {}\ntbt_slo_ms = {}\ndecode_steps_min = {}\n\
         turn_quota_ms_max = {}\nprefill_cold_lazy = {}\nround_resident_first = {}\n\
         prefill_riders = {}\n",
        toml_string(database_url)?,
        toml_string(&models_dir.to_string_lossy())?,
        knobs.kv_saved_bytes_max,
        knobs.slo.ttft_ms,
        knobs.slo.tbt_ms,
        knobs.decode_steps_min,
        knobs.turn_quota_ms_max,
        knobs.prefill_cold_lazy,
        knobs.round_resident_first,
        knobs.prefill_riders,
    );
    for model in models {
        write!(
            text,
            "\n[[models]]\nid = \"{}\"\nkind = \"completion\"\nfile = \"{}\"\n\
             context_tokens = {CONTEXT_TOKENS}\nseqs_max = {SEQS_MAX}\n",
            model.id, model.file
        )?;
    }
    Ok(text)
}

/// The market's models and, per rate, its schedule.
pub(crate) fn build_workloads(
    sweep: &Sweep,
) -> anyhow::Result<(Vec<BenchModel>, Vec<Vec<BenchRequest>>)> {
    let Sweep {
        trace,
        rates,
        duration_s,
        seed,
        market: lengths,
    } = sweep;
    let profile = Profile::load(PROFILE).with_context(|| format!("profile `{PROFILE}`"))?;
    let rows: Vec<TraceRow> =
        read_azure_trace(trace).with_context(|| format!("trace {}", trace.display()))?;
    let mut models = Vec::new();
    let mut schedules = Vec::new();
    for &rate_per_s in rates {
        let spec = MarketSpec {
            models: MARKET_MODELS,
            popularity: Popularity::Zipf { s: ZIPF_S },
            arrivals: Arrivals::Poisson {
                rate_per_s,
                duration_s: f64::from(*duration_s),
            },
            seed: *seed,
        };
        let workload = market(&spec, &rows, &profile)?;
        models = (0..)
            .zip(&workload.models)
            .map(|(index, m): (u32, _)| {
                let family = profile
                    .families
                    .get(m.family)
                    .map_or_else(String::new, |f| f.name.clone());
                let file = gguf_for_family(&family, m.family).to_owned();
                BenchModel {
                    id: format!("m{index}"),
                    family,
                    file,
                }
            })
            .collect();
        let schedule = workload
            .requests
            .iter()
            .map(|r| {
                let (prompt_tokens, output_tokens) =
                    lengths.scale_lengths(r.prompt_tokens, r.output_tokens);
                BenchRequest {
                    at: Duration::from_nanos(r.at_ns),
                    model: usize::try_from(r.model).unwrap_or(0),
                    prompt_tokens,
                    output_tokens,
                }
            })
            .collect();
        schedules.push(schedule);
    }
    Ok((models, schedules))
}

/// The schedule as simulator requests, every one asking for its full length.
pub(crate) fn planned_requests(schedule: &[BenchRequest]) -> Vec<Request> {
    schedule
        .iter()
        .map(|r| Request {
            at_ns: u64::try_from(r.at.as_nanos()).unwrap_or(u64::MAX),
            model: u32::try_from(r.model).unwrap_or(u32::MAX),
            prompt_tokens: r.prompt_tokens,
            output_tokens: r.output_tokens,
            class: tidepool_core::RequestClass::Online,
        })
        .collect()
}

/// What the server was asked for and delivered, as simulator requests: the prompt as the server
/// counted it, and the delivered length of a stream that ended normally (EOS may end it before
/// `max_tokens`); a failed or cut request keeps the length it asked for.
pub(crate) fn replay_requests(
    schedule: &[BenchRequest],
    outcomes: &[RequestOutcome],
) -> Vec<Request> {
    schedule
        .iter()
        .zip(outcomes)
        .filter_map(|(request, outcome)| {
            let delivered = u32::try_from(outcome.tokens.len()).unwrap_or(u32::MAX);
            let output_tokens = match outcome.end {
                End::Completed => delivered,
                End::Failed | End::TimedOut => delivered.max(request.output_tokens),
            };
            (output_tokens > 0).then(|| Request {
                at_ns: u64::try_from(request.at.as_nanos()).unwrap_or(u64::MAX),
                model: u32::try_from(request.model).unwrap_or(u32::MAX),
                prompt_tokens: outcome
                    .prompt_tokens
                    .unwrap_or(request.prompt_tokens)
                    .max(1),
                output_tokens,
                class: tidepool_core::RequestClass::Online,
            })
        })
        .collect()
}

/// The models a real server holds after its warm-up, in load order: the warm-up loads every
/// model once, least popular first, so `dedicated` holds all of them and the other policies the
/// most popular that fit.
pub(crate) fn warm_models(policy: PoolPolicy, models: usize) -> Vec<u32> {
    let warm_up: Vec<u32> = (0..u32::try_from(models).unwrap_or(0)).rev().collect();
    let fitting = if policy == PoolPolicy::Dedicated {
        warm_up.len()
    } else {
        usize::try_from(MEMORY_MODELS_MAX).unwrap_or(0)
    };
    warm_up[warm_up.len().saturating_sub(fitting)..].to_vec()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::client::tests::outcome;

    /// `duration_s` seconds of each rate of the repository's conversation trace.
    pub(crate) fn sweep(rates: &[f64], duration_s: u32) -> Sweep {
        Sweep {
            trace: PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../data/traces/azure-llm-2023-conv.csv"
            )),
            rates: rates.to_vec(),
            duration_s,
            seed: 7,
            market: Market::Short,
        }
    }

    #[test]
    fn lengths_are_scaled_and_capped() {
        let short = Market::Short;
        assert_eq!(short.scale_lengths(1000, 200), (125, 50));
        assert_eq!(
            short.scale_lengths(10, 2),
            (PROMPT_TOKENS_MIN, OUTPUT_TOKENS_MIN)
        );
        assert_eq!(short.scale_lengths(100_000, 4000), (192, 64));
        // The real-length market keeps the trace's outputs up to its cap; prompts as short.
        let long = Market::Long;
        assert_eq!(long.scale_lengths(1000, 200), (125, 200));
        assert_eq!(
            long.scale_lengths(10, 2),
            (PROMPT_TOKENS_MIN, OUTPUT_TOKENS_MIN)
        );
        assert_eq!(
            long.scale_lengths(100_000, 4000),
            (192, LONG_OUTPUT_TOKENS_MAX)
        );
    }

    #[test]
    fn families_map_to_the_local_ggufs() {
        assert_eq!(gguf_for_family("smollm2-135m", 0), SMOLLM2_FILE);
        assert_eq!(gguf_for_family("gemma-3-270m", 1), GEMMA_FILE);
        assert_eq!(gguf_for_family("other", 0), SMOLLM2_FILE);
        assert_eq!(gguf_for_family("other", 2), GEMMA_FILE);
    }

    #[test]
    fn replay_keeps_what_was_served() {
        let schedule = [
            BenchRequest {
                at: Duration::from_millis(10),
                model: 1,
                prompt_tokens: 40,
                output_tokens: 16,
            },
            BenchRequest {
                at: Duration::from_millis(20),
                model: 0,
                prompt_tokens: 50,
                output_tokens: 12,
            },
            BenchRequest {
                at: Duration::from_millis(30),
                model: 2,
                prompt_tokens: 60,
                output_tokens: 9,
            },
        ];
        // Stopped at EOS after 5 tokens; rejected with 429; finished with no token at all.
        let mut eos = outcome(End::Completed, 16, &[1, 2, 3, 4, 5]);
        eos.prompt_tokens = Some(43);
        let rejected = outcome(End::Failed, 12, &[]);
        let empty = outcome(End::Completed, 9, &[]);
        let replay = replay_requests(&schedule, &[eos, rejected, empty]);
        assert_eq!(
            replay,
            [
                Request {
                    at_ns: 10_000_000,
                    model: 1,
                    prompt_tokens: 43,
                    output_tokens: 5,
                    class: tidepool_core::RequestClass::Online,
                },
                Request {
                    at_ns: 20_000_000,
                    model: 0,
                    prompt_tokens: 50,
                    output_tokens: 12,
                    class: tidepool_core::RequestClass::Online,
                },
            ]
        );
    }

    #[test]
    fn workloads_are_the_same_for_every_policy_and_scaled() {
        let (models, schedules) = build_workloads(&sweep(&[1.0, 2.0], 20)).unwrap();
        assert_eq!(models.len(), 8);
        assert!(models.iter().any(|m| m.file == SMOLLM2_FILE));
        assert!(models.iter().any(|m| m.file == GEMMA_FILE));
        assert_eq!(schedules.len(), 2);
        // About rate × duration requests, every length within the caps.
        assert!(schedules[1].len() > schedules[0].len());
        for request in schedules.iter().flatten() {
            assert!((PROMPT_TOKENS_MIN..=PROMPT_TOKENS_MAX).contains(&request.prompt_tokens));
            assert!((OUTPUT_TOKENS_MIN..=OUTPUT_TOKENS_MAX).contains(&request.output_tokens));
            assert!(request.model < models.len());
        }
        let (_, again) = build_workloads(&sweep(&[1.0, 2.0], 20)).unwrap();
        assert_eq!(again, schedules);
    }
}
