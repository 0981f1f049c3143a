//! Workloads: the Azure LLM traces (timestamps and lengths), a generic per-model CSV trace, and
//! the market generator that spreads requests over M models by a skewed popularity.

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Exp, Gamma};
use serde::{Deserialize, Serialize};

use crate::SimError;
use crate::profile::f64_ns;
use crate::profile::{Profile, as_f64};

/// Rows read from one trace file, at most this many (the Azure files hold 19,366 and 8,819).
pub const TRACE_ROWS_MAX: usize = 10_000_000;
/// Models in one market.
pub const MARKET_MODELS_MAX: u32 = 4096;

/// One request of the workload; `model` indexes [`Workload::models`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub at_ns: u64,
    pub model: u32,
    pub prompt_tokens: u32,
    pub output_tokens: u32,
    /// `Batch`: runs on capacity online requests leave idle and is reported apart
    /// ([`crate::sim::BatchReport`]); never counted in the attainment.
    #[serde(default)]
    pub class: tidepool_pool::RequestClass,
}

/// One model of the market: its id and its profile family.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MarketModel {
    pub id: String,
    pub family: usize,
    /// What the scheduler believes the model costs when the run starts; `None`: derived from
    /// the profile. A replay of a real server passes the server's own beliefs, so both pools
    /// plan their turns from the same numbers.
    pub estimate: Option<tidepool_pool::CostEstimate>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub models: Vec<MarketModel>,
    /// Sorted by `(at_ns, index)`.
    pub requests: Vec<Request>,
    /// Requests whose prompt was cut so prompt + output fits `seq_tokens_max`.
    pub prompts_capped: u64,
    /// Models (indices into `models`) resident before the first request, loaded in this order
    /// at no cost: a replay of a server that was already running. Empty: everything starts cold.
    pub warm: Vec<u32>,
}

/// One row of an Azure trace: arrival offset and lengths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceRow {
    pub at_ns: u64,
    pub prompt_tokens: u32,
    pub output_tokens: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Popularity {
    /// Model k (0-based) gets weight 1/(k+1)^s.
    Zipf { s: f64 },
    /// `hot_models` models share `hot_share` of the requests equally; the rest share the remainder.
    HotFew { hot_models: u32, hot_share: f64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Arrivals {
    /// Replay the trace's own timestamps (its total rate).
    Trace,
    /// Poisson arrivals at `rate_per_s` in total for `duration_s`; lengths sampled from the trace.
    Poisson { rate_per_s: f64, duration_s: f64 },
    /// Bursty arrivals: gaps drawn from a Gamma distribution of mean `1 / rate_per_s` and
    /// coefficient of variation `cv` (shape `1 / cv²`) for `duration_s`, lengths sampled from
    /// the trace. `cv` 1 is Poisson; above 1 requests come in bursts separated by long lulls
    /// (the whole market at once: every model's traffic bursts together).
    Gamma {
        rate_per_s: f64,
        duration_s: f64,
        cv: f64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MarketSpec {
    pub models: u32,
    pub popularity: Popularity,
    pub arrivals: Arrivals,
    pub seed: u64,
}

fn read(path: &Path) -> Result<String, SimError> {
    std::fs::read_to_string(path).map_err(|source| SimError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads an Azure LLM inference trace: `TIMESTAMP,ContextTokens,GeneratedTokens`.
pub fn read_azure_trace(path: &Path) -> Result<Vec<TraceRow>, SimError> {
    let text = read(path)?;
    let mut rows = Vec::new();
    for (line_index, line) in text.lines().enumerate().skip(1) {
        let line_no = u64::try_from(line_index).unwrap_or(u64::MAX) + 1;
        let bad = |reason| SimError::TraceParse {
            line: line_no,
            reason,
        };
        if line.trim().is_empty() {
            continue;
        }
        if rows.len() >= TRACE_ROWS_MAX {
            return Err(bad("more rows than TRACE_ROWS_MAX"));
        }
        let mut fields = line.split(',');
        let (Some(ts), Some(prompt), Some(output)) = (fields.next(), fields.next(), fields.next())
        else {
            return Err(bad("expected TIMESTAMP,ContextTokens,GeneratedTokens"));
        };
        let at_ns = parse_datetime_ns(ts.trim()).ok_or_else(|| bad("bad TIMESTAMP"))?;
        let prompt_tokens = prompt
            .trim()
            .parse()
            .map_err(|_| bad("bad ContextTokens"))?;
        let output_tokens = output
            .trim()
            .parse()
            .map_err(|_| bad("bad GeneratedTokens"))?;
        rows.push(TraceRow {
            at_ns,
            prompt_tokens,
            output_tokens,
        });
    }
    let start = rows.iter().map(|r| r.at_ns).min().unwrap_or(0);
    for row in &mut rows {
        row.at_ns -= start;
    }
    rows.sort_by_key(|r| r.at_ns);
    if rows.is_empty() {
        return Err(SimError::WorkloadInvalid {
            reason: "the trace has no rows",
        });
    }
    Ok(rows)
}

/// `YYYY-MM-DD HH:MM:SS.fffffff` → nanoseconds since 1970 (proleptic Gregorian, UTC).
fn parse_datetime_ns(text: &str) -> Option<u64> {
    let (date, time) = text.split_once(' ')?;
    let mut date_parts = date.split('-').map(str::parse::<i64>);
    let year = date_parts.next()?.ok()?;
    let month = date_parts.next()?.ok()?;
    let day = date_parts.next()?.ok()?;
    let mut time_parts = time.split(':');
    let hours = time_parts.next()?.parse::<u64>().ok()?;
    let minutes = time_parts.next()?.parse::<u64>().ok()?;
    let seconds = time_parts.next()?;
    let (whole, frac) = seconds.split_once('.').unwrap_or((seconds, "0"));
    let frac_digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
    let nanos: u64 = frac_digits.parse().ok()?;
    let secs_of_day = hours * 3600 + minutes * 60 + whole.parse::<u64>().ok()?;
    // Howard Hinnant's days_from_civil.
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = u64::try_from(era * 146_097 + day_of_era - 719_468).ok()?;
    Some((days * 86_400 + secs_of_day) * 1_000_000_000 + nanos)
}

/// Reads the generic trace `timestamp,model,prompt_tokens,output_tokens` (timestamp in seconds,
/// decimal). Models are numbered in name order and get families by the profile's shares.
pub fn read_model_trace(path: &Path, profile: &Profile) -> Result<Workload, SimError> {
    let text = read(path)?;
    let mut names = std::collections::BTreeMap::<String, u32>::new();
    let mut raw = Vec::new();
    for (line_index, line) in text.lines().enumerate().skip(1) {
        let line_no = u64::try_from(line_index).unwrap_or(u64::MAX) + 1;
        let bad = |reason| SimError::TraceParse {
            line: line_no,
            reason,
        };
        if line.trim().is_empty() {
            continue;
        }
        if raw.len() >= TRACE_ROWS_MAX {
            return Err(bad("more rows than TRACE_ROWS_MAX"));
        }
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        let [ts, model, prompt, output] = f.as_slice() else {
            return Err(bad("expected timestamp,model,prompt_tokens,output_tokens"));
        };
        let seconds: f64 = ts.parse().map_err(|_| bad("bad timestamp"))?;
        if !(seconds.is_finite() && seconds >= 0.0) {
            return Err(bad("timestamp must be non-negative seconds"));
        }
        tidepool_core::ModelId::new(*model).map_err(|_| bad("model must be a lowercase slug"))?;
        let next = u32::try_from(names.len()).unwrap_or(u32::MAX);
        names.entry((*model).to_owned()).or_insert(next);
        let prompt: u32 = prompt.parse().map_err(|_| bad("bad prompt_tokens"))?;
        let output: u32 = output.parse().map_err(|_| bad("bad output_tokens"))?;
        raw.push((f64_ns(seconds * 1e9), (*model).to_owned(), prompt, output));
    }
    // Renumber in name order so the result does not depend on first appearance.
    let order: std::collections::BTreeMap<String, u32> = names
        .keys()
        .enumerate()
        .map(|(i, n)| (n.clone(), u32::try_from(i).unwrap_or(u32::MAX)))
        .collect();
    let families = family_pattern(profile, order.len());
    let models = order
        .keys()
        .zip(&families)
        .map(|(id, &family)| MarketModel {
            id: id.clone(),
            family,
            estimate: None,
        })
        .collect();
    let mut workload = Workload {
        models,
        requests: Vec::with_capacity(raw.len()),
        prompts_capped: 0,
        warm: Vec::new(),
    };
    for (at_ns, model, prompt, output) in raw {
        let index = order.get(&model).copied().unwrap_or(0);
        workload.push(profile, at_ns, index, prompt, output);
    }
    workload.finish();
    Ok(workload)
}

/// Deterministic interleaving of families by share (largest deficit first), so popular models
/// are not all of one family.
fn family_pattern(profile: &Profile, models: usize) -> Vec<usize> {
    let total: f64 = profile.families.iter().map(|f| f64::from(f.share)).sum();
    let mut assigned = vec![0.0_f64; profile.families.len()];
    (0..models)
        .map(|slot| {
            let want = as_f64(u64::try_from(slot).unwrap_or(0) + 1);
            let mut best = 0;
            let mut best_deficit = f64::NEG_INFINITY;
            for (i, f) in profile.families.iter().enumerate() {
                let deficit = want * f64::from(f.share) / total - assigned[i];
                if deficit > best_deficit + 1e-12 {
                    best = i;
                    best_deficit = deficit;
                }
            }
            assigned[best] += 1.0;
            best
        })
        .collect()
}

impl Workload {
    /// A workload replayed exactly (e.g. what `tidepool bench pool` sent): requests sorted by
    /// arrival; every request must name one of `models` and fit its family's `seq_tokens_max`.
    pub fn replay(
        profile: &Profile,
        models: Vec<MarketModel>,
        mut requests: Vec<Request>,
    ) -> Result<Self, SimError> {
        if models.is_empty() || models.len() > usize::try_from(MARKET_MODELS_MAX).unwrap_or(0) {
            return Err(SimError::WorkloadInvalid {
                reason: "a replay needs 1..=MARKET_MODELS_MAX models",
            });
        }
        if requests.len() > TRACE_ROWS_MAX {
            return Err(SimError::WorkloadInvalid {
                reason: "more requests than TRACE_ROWS_MAX",
            });
        }
        for request in &requests {
            let family = models
                .get(usize::try_from(request.model).unwrap_or(usize::MAX))
                .and_then(|m| profile.families.get(m.family))
                .ok_or(SimError::WorkloadInvalid {
                    reason: "a request names a model or family the replay does not have",
                })?;
            let tokens = u64::from(request.prompt_tokens) + u64::from(request.output_tokens);
            if request.output_tokens == 0 || tokens > u64::from(family.seq_tokens_max) {
                return Err(SimError::WorkloadInvalid {
                    reason: "a request must ask for ≥ 1 token and fit seq_tokens_max",
                });
            }
        }
        requests.sort_by_key(|r| r.at_ns);
        Ok(Self {
            models,
            requests,
            prompts_capped: 0,
            warm: Vec::new(),
        })
    }

    fn push(&mut self, profile: &Profile, at_ns: u64, model: u32, prompt: u32, output: u32) {
        let family = &profile.families[self.models[usize::try_from(model).unwrap_or(0)].family];
        let output_tokens = output.clamp(1, family.seq_tokens_max / 2);
        let prompt_cap = family.seq_tokens_max - output_tokens;
        let prompt_tokens = prompt.clamp(1, prompt_cap);
        if prompt > prompt_cap || output != output_tokens {
            self.prompts_capped += 1;
        }
        self.requests.push(Request {
            at_ns,
            model,
            prompt_tokens,
            output_tokens,
            class: tidepool_pool::RequestClass::Online,
        });
    }

    fn finish(&mut self) {
        self.requests.sort_by_key(|r| r.at_ns);
    }
}

/// The market generator: `spec.models` models with families by share, requests from `rows`
/// (timestamps replayed, Poisson or Gamma), each assigned a model by popularity.
#[expect(
    clippy::too_many_lines,
    reason = "one branch per arrival kind, read top to bottom"
)]
pub fn market(
    spec: &MarketSpec,
    rows: &[TraceRow],
    profile: &Profile,
) -> Result<Workload, SimError> {
    if spec.models == 0 || spec.models > MARKET_MODELS_MAX || rows.is_empty() {
        return Err(SimError::WorkloadInvalid {
            reason: "need 1..=4096 models and a non-empty trace",
        });
    }
    let models_len = usize::try_from(spec.models).unwrap_or(1);
    let families = family_pattern(profile, models_len);
    let models = families
        .iter()
        .enumerate()
        .map(|(k, &family)| MarketModel {
            id: format!("m{k:03}-{}", profile.families[family].name),
            family,
            estimate: None,
        })
        .collect();
    let cumulative = popularity_cdf(spec)?;
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let mut workload = Workload {
        models,
        requests: Vec::new(),
        prompts_capped: 0,
        warm: Vec::new(),
    };
    let pick = |rng: &mut ChaCha8Rng| {
        let u: f64 = rng.random();
        let index = cumulative.partition_point(|&c| c < u).min(models_len - 1);
        u32::try_from(index).unwrap_or(0)
    };
    match spec.arrivals {
        Arrivals::Trace => {
            for row in rows {
                let model = pick(&mut rng);
                workload.push(
                    profile,
                    row.at_ns,
                    model,
                    row.prompt_tokens,
                    row.output_tokens,
                );
            }
        }
        Arrivals::Poisson {
            rate_per_s,
            duration_s,
        } => {
            if !(rate_per_s > 0.0 && duration_s > 0.0 && rate_per_s * duration_s < 1e8) {
                return Err(SimError::WorkloadInvalid {
                    reason: "Poisson needs rate > 0, duration > 0, < 1e8 requests",
                });
            }
            let gap = Exp::new(rate_per_s)
                .map_err(|_| SimError::WorkloadInvalid { reason: "bad rate" })?;
            sampled(
                &mut workload,
                profile,
                rows,
                duration_s,
                &mut rng,
                |rng| gap.sample(rng),
                pick,
            );
        }
        Arrivals::Gamma {
            rate_per_s,
            duration_s,
            cv,
        } => {
            if !(rate_per_s > 0.0
                && duration_s > 0.0
                && rate_per_s * duration_s < 1e8
                && cv.is_finite()
                && (0.01..=100.0).contains(&cv))
            {
                return Err(SimError::WorkloadInvalid {
                    reason: "Gamma needs rate > 0, duration > 0, < 1e8 requests, cv in 0.01..=100",
                });
            }
            let shape = 1.0 / (cv * cv);
            let gap = Gamma::new(shape, 1.0 / (rate_per_s * shape))
                .map_err(|_| SimError::WorkloadInvalid { reason: "bad rate" })?;
            sampled(
                &mut workload,
                profile,
                rows,
                duration_s,
                &mut rng,
                |rng| gap.sample(rng),
                pick,
            );
        }
    }
    workload.finish();
    Ok(workload)
}

/// Arrivals at gaps drawn by `gap` until `duration_s`, each with a trace row's lengths and a
/// model by `pick` (drawn in that order: gap, row, model).
fn sampled(
    workload: &mut Workload,
    profile: &Profile,
    rows: &[TraceRow],
    duration_s: f64,
    rng: &mut ChaCha8Rng,
    gap: impl Fn(&mut ChaCha8Rng) -> f64,
    pick: impl Fn(&mut ChaCha8Rng) -> u32,
) {
    let mut t = 0.0_f64;
    loop {
        t += gap(rng);
        if t >= duration_s {
            break;
        }
        let row = rows[rng.random_range(0..rows.len())];
        let model = pick(rng);
        workload.push(
            profile,
            f64_ns(t * 1e9),
            model,
            row.prompt_tokens,
            row.output_tokens,
        );
    }
}

fn popularity_cdf(spec: &MarketSpec) -> Result<Vec<f64>, SimError> {
    let n = usize::try_from(spec.models).unwrap_or(1);
    let weights: Vec<f64> = match spec.popularity {
        Popularity::Zipf { s } => {
            if !(s.is_finite() && s >= 0.0) {
                return Err(SimError::WorkloadInvalid {
                    reason: "Zipf s must be ≥ 0",
                });
            }
            (1..=n)
                .map(|k| 1.0 / as_f64(u64::try_from(k).unwrap_or(1)).powf(s))
                .collect()
        }
        Popularity::HotFew {
            hot_models,
            hot_share,
        } => {
            let hot = usize::try_from(hot_models).unwrap_or(0).min(n);
            if hot == 0 || !(0.0..=1.0).contains(&hot_share) {
                return Err(SimError::WorkloadInvalid {
                    reason: "hot-few needs hot_models ≥ 1 and share in 0..=1",
                });
            }
            let cold = n - hot;
            let hot_w = hot_share / as_f64(u64::try_from(hot).unwrap_or(1));
            let cold_w = if cold == 0 {
                0.0
            } else {
                (1.0 - hot_share) / as_f64(u64::try_from(cold).unwrap_or(1))
            };
            (0..n)
                .map(|k| if k < hot { hot_w } else { cold_w })
                .collect()
        }
    };
    let total: f64 = weights.iter().sum();
    let mut acc = 0.0;
    Ok(weights
        .iter()
        .map(|w| {
            acc += w / total;
            acc
        })
        .collect())
}
