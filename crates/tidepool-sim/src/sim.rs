//! One simulated configuration: place the market's models on accelerators, run each accelerator
//! through the real pool, and fold the outcomes into a [`Report`].

use serde::Serialize;
use tidepool_core::{ModelId, PoolPolicy};
use tidepool_pool::{PoolConfig, PoolKnobs};

use crate::SimError;
use crate::profile::{Costs, Profile, as_f64, model_spec};
use crate::run::{AccOutcome, AccRun, SeqSim, Slo};
use crate::workload::{Request, Workload};

/// Accelerators in one simulation.
pub const ACCELERATORS_MAX: u32 = 4096;
/// Default bound on the placement search's moves (`SimSpec::placement_moves_max`), a bound on
/// planning time: each move tries every model of one accelerator on two others, re-simulating
/// both (on the 40- and 80-model conversation markets the search stopped by itself after at
/// most 14 moves, `PlanPoint::placement_moves`).
pub const PLACEMENT_MOVES_MAX: u32 = 32;

/// The knobs the H100 figures of docs/bench/sim.md were measured with — not a default (the
/// simulator runs [`PoolKnobs::default`], the server's, unless told otherwise): the SLOs of the
/// Aegaeon comparison (TTFT 10 s, TBT 100 ms), `decode_steps_min` 64 and `turn_quota_ms_max`
/// 1 s (the best of a small sweep over the four Azure conversation markets on the `h100` profile
/// with paged KV, tuned on the workloads they are reported on), and an admission queue of 4096
/// per accelerator. `tidepool bench sim` and the `aegaeon` example use them so their figures
/// stay comparable; `tidepool sim`/`plan` reach them with `--ttft-slo-ms 10000 --tbt-slo-ms 100
/// --decode-steps-min 64 --turn-quota-ms-max 1000 --admission-queue-len-max 4096`.
pub fn h100_sweep_knobs() -> PoolKnobs {
    PoolKnobs {
        ttft_slo_ms: 10_000,
        tbt_slo_ms: 100,
        admission_queue_len_max: 4096,
        decode_steps_min: 64,
        turn_quota_ms_max: 1000,
        ..PoolKnobs::default()
    }
}

/// Everything one simulation needs besides the workload.
#[derive(Debug, Clone, PartialEq)]
pub struct SimSpec {
    pub profile: Profile,
    pub policy: PoolPolicy,
    pub accelerators: u32,
    /// The scheduler's knobs, SLOs included: the server's defaults ([`PoolKnobs::default`]),
    /// a `tidepool.toml`'s `[pool]`, or flags on top of either.
    pub knobs: PoolKnobs,
    /// `[pool] memory_models_max`: each accelerator's budget fits this many of its largest
    /// models plus the saved-state pool, as on a server ([`tidepool_pool::memory_budget`]);
    /// `None`: the profile's `memory_bytes`.
    pub memory_models_max: Option<u32>,
    /// Moves of the placement search after the initial placement (0: keep it as placed).
    pub placement_moves_max: u32,
    /// The initial placement (accelerator of each market model, in market order) instead of
    /// [`place`]'s, e.g. an earlier report's to check it on other traffic.
    pub placement: Option<Vec<u32>>,
}

/// Progress of a long run, for a progress bar the caller draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub requests_done: u64,
    pub requests_total: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelReport {
    pub model: String,
    pub family: String,
    pub accelerator: u32,
    pub requests: u64,
    pub tokens_owed: u64,
    pub tokens_on_time: u64,
    pub attainment: f64,
    /// Modelled decode steps and their time by batch size, this model's only.
    pub decode_by_batch: tidepool_pool::DecodeByBatch,
}

/// The simulation report (serialised to JSON; identical inputs give identical bytes).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub profile: String,
    pub policy: PoolPolicy,
    pub accelerators: u32,
    pub models: u32,
    pub ttft_slo_ms: u64,
    pub tbt_slo_ms: u64,
    /// The scheduler knobs every accelerator's pool ran with (SLOs above included).
    pub knobs: PoolKnobs,
    pub requests: u64,
    pub requests_rejected: u64,
    pub prompts_capped: u64,
    pub tokens_owed: u64,
    pub tokens_on_time: u64,
    /// Share of owed tokens emitted by `arrival + TTFT + k·TBT` (design §2).
    pub attainment: f64,
    /// Aegaeon's time-weighted per-request score, averaged over requests.
    pub attainment_lenient: f64,
    /// Share of requests whose every token was on time.
    pub requests_all_on_time: f64,
    pub goodput_tokens_per_s: f64,
    pub ttft_ms_p50: f64,
    pub ttft_ms_p99: f64,
    pub makespan_s: f64,
    /// Compute-busy time over makespan × accelerators.
    pub utilization: f64,
    pub loads: u64,
    pub evictions: u64,
    pub kv_saves: u64,
    pub kv_restores: u64,
    pub prefills: u64,
    pub decode_steps: u64,
    /// Modelled time per action kind (the pool's own accounting, as on a real server).
    pub in_flight_ns: tidepool_pool::ActionNs,
    /// Modelled decode steps and their time by batch size (the pool's accounting).
    #[serde(default)]
    pub decode_by_batch: tidepool_pool::DecodeByBatch,
    pub switches_per_s: f64,
    /// Models the placement search moved (`per_model[].accelerator` is the final placement).
    #[serde(default)]
    pub placement_moves: u32,
    pub per_model: Vec<ModelReport>,
    /// Batch-class requests, apart from every online figure above (absent without any).
    #[serde(default, skip_serializing_if = "BatchReport::is_empty")]
    pub batch: BatchReport,
}

/// Batch-class requests of a run (docs/pool.md §3.7): they run on capacity the online requests
/// leave idle, so they have no deadline here; what counts is that they finish, and when.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct BatchReport {
    pub requests: u64,
    /// Requests that emitted every token.
    pub finished: u64,
    pub rejected: u64,
    pub tokens: u64,
    /// From the first batch arrival to the last batch token, in seconds.
    pub makespan_s: f64,
    /// Batch sequences preempted for online work (and recomputed on resume).
    pub preemptions: u64,
}

impl BatchReport {
    fn is_empty(&self) -> bool {
        self.requests == 0
    }
}

/// Model → accelerator. Longest-processing-time first: models in decreasing order of their
/// estimated busy time (prefill + decode at batch 1 of all their requests; ties by index) go
/// to the accelerator with the least estimated work. `dedicated` additionally requires every
/// model of an accelerator to fit its memory at once (with as many accelerators as models,
/// this is one model per accelerator).
pub fn place(spec: &SimSpec, workload: &Workload) -> Result<Vec<u32>, SimError> {
    let n = spec.accelerators;
    if n == 0 || n > ACCELERATORS_MAX {
        return Err(SimError::WorkloadInvalid {
            reason: "accelerators must be in 1..=4096",
        });
    }
    let fams = &spec.profile.families;
    let mut work = vec![0.0_f64; workload.models.len()];
    for r in &workload.requests {
        let model = &workload.models[usize::try_from(r.model).unwrap_or(0)];
        let costs = Costs::new(&spec.profile.accelerator, &fams[model.family]);
        let p = f64::from(r.prompt_tokens);
        let ctx = p + f64::from(r.output_tokens) / 2.0;
        work[usize::try_from(r.model).unwrap_or(0)] += as_f64(costs.prefill_ns(p, p * p))
            + f64::from(r.output_tokens) * as_f64(costs.decode_ns(1.0, ctx));
    }
    let mut order: Vec<usize> = (0..workload.models.len()).collect();
    order.sort_by(|&a, &b| work[b].total_cmp(&work[a]).then(a.cmp(&b)));
    let n_usize = usize::try_from(n).unwrap_or(1);
    let mut load = vec![0.0_f64; n_usize];
    let mut bytes = vec![0_u64; n_usize];
    let mut count = vec![0_u32; n_usize];
    let mut placement = vec![0_u32; workload.models.len()];
    let memory = spec.profile.accelerator.memory_bytes;
    for model in order {
        let need = fams[workload.models[model].family].resident_bytes();
        let fits = |a: usize| spec.policy != PoolPolicy::Dedicated || bytes[a] + need <= memory;
        let best = (0..n_usize)
            .filter(|&a| fits(a))
            .min_by(|&a, &b| {
                load[a]
                    .total_cmp(&load[b])
                    .then(count[a].cmp(&count[b]))
                    .then(a.cmp(&b))
            })
            .ok_or(SimError::WorkloadInvalid {
                reason: "dedicated: the models do not fit these accelerators",
            })?;
        load[best] += work[model];
        bytes[best] += need;
        count[best] += 1;
        placement[model] = u32::try_from(best).unwrap_or(0);
    }
    Ok(placement)
}

fn pool_config(
    spec: &SimSpec,
    workload: &Workload,
    models: &[usize],
) -> Result<(PoolConfig, Vec<Costs>, Vec<ModelId>), SimError> {
    let acc = &spec.profile.accelerator;
    let mut specs = Vec::with_capacity(models.len());
    let mut costs = Vec::with_capacity(models.len());
    let mut ids = Vec::with_capacity(models.len());
    for &m in models {
        let model = &workload.models[m];
        let family = &spec.profile.families[model.family];
        let c = Costs::new(acc, family);
        let id = ModelId::new(model.id.clone()).map_err(|_| SimError::WorkloadInvalid {
            reason: "model ids must be slugs",
        })?;
        let mut model_spec = model_spec(id.clone(), family, &c, acc.kv_paged);
        if let Some(estimate) = model.estimate {
            model_spec.estimate = estimate;
        }
        specs.push(model_spec);
        costs.push(c);
        ids.push(id);
    }
    let memory_bytes_max = match spec.memory_models_max {
        None => acc.memory_bytes,
        models_max @ Some(_) => {
            tidepool_pool::memory_budget(None, models_max, acc.kv_saved_bytes_max, &specs)
        }
    };
    let mut cfg = PoolConfig::new(spec.policy, memory_bytes_max, specs);
    // What the accelerator can do comes from the profile, never from the knobs.
    cfg.kv_saved_bytes_max = acc.kv_saved_bytes_max;
    cfg.saved_kv_in_memory_budget = acc.saved_kv_in_memory_budget;
    cfg.overlap_transfers = acc.overlap_transfers;
    cfg.kv_paged = acc.kv_paged;
    cfg.knobs = spec.knobs;
    Ok((cfg, costs, ids))
}

/// Runs one configuration. Accelerators are independent (static placement), so they are
/// simulated one after the other; `progress` is called every 65,536 arrivals and at the end.
pub fn simulate(
    spec: &SimSpec,
    workload: &Workload,
    progress: &mut dyn FnMut(Progress),
) -> Result<Report, SimError> {
    if let Some(problem) = spec.knobs.problems().first() {
        return Err(SimError::KnobInvalid {
            field: problem.field,
            reason: problem.reason,
        });
    }
    let mut placement = match &spec.placement {
        None => place(spec, workload)?,
        Some(given) => {
            let fits = given.len() == workload.models.len()
                && given.iter().all(|&a| a < spec.accelerators);
            if !fits {
                return Err(SimError::WorkloadInvalid {
                    reason: "placement: one accelerator below --accelerators per market model",
                });
            }
            given.clone()
        }
    };
    let total = u64::try_from(workload.requests.len()).unwrap_or(u64::MAX);
    let mut done = 0_u64;
    let mut tick = || {
        done += 1;
        if done.is_multiple_of(65_536) {
            progress(Progress {
                requests_done: done,
                requests_total: total,
            });
        }
    };
    let mut outcomes: Vec<Option<Outcome>> = Vec::new();
    for acc in 0..spec.accelerators {
        outcomes.push(run_acc(spec, workload, &placement, acc, &mut tick)?);
    }
    let moves = if spec.policy == PoolPolicy::Dedicated {
        0
    } else {
        improve_placement(spec, workload, &mut placement, &mut outcomes)?
    };
    progress(Progress {
        requests_done: total,
        requests_total: total,
    });
    let outcomes: Vec<Outcome> = outcomes.into_iter().flatten().collect();
    let mut report = fold(spec, workload, &outcomes);
    report.placement_moves = moves;
    Ok(report)
}

/// Tokens an accelerator's requests owed but did not get on time.
fn missed(outcome: Option<&Outcome>) -> u64 {
    outcome.map_or(0, |o| {
        o.result
            .seqs
            .iter()
            .filter(|s| !s.batch)
            .map(|s| u64::from(s.output_tokens.saturating_sub(s.on_time)))
            .sum()
    })
}

/// Local search over the placement (`SimSpec::placement_moves_max`): each move takes one model
/// off the accelerator (holding two or more models) that misses the most tokens and puts it on
/// one of the two that miss the fewest, choosing the move that lowers the pair's missed tokens
/// the most. Accelerators are independent, so a trial re-simulates only the two it changes.
/// Stops when no move helps. Returns the moves made.
fn improve_placement(
    spec: &SimSpec,
    workload: &Workload,
    placement: &mut [u32],
    outcomes: &mut [Option<Outcome>],
) -> Result<u32, SimError> {
    let n = outcomes.len();
    let mut moves = 0;
    while moves < spec.placement_moves_max {
        let miss: Vec<u64> = outcomes.iter().map(|o| missed(o.as_ref())).collect();
        let models_on = |a: usize| placement.iter().filter(|&&p| p == acc_u32(a)).count();
        let Some(from) = (0..n)
            .filter(|&a| miss[a] > 0 && models_on(a) >= 2)
            .max_by_key(|&a| (miss[a], std::cmp::Reverse(a)))
        else {
            break;
        };
        let mut targets: Vec<usize> = (0..n).filter(|&a| a != from).collect();
        targets.sort_by_key(|&a| (miss[a], a));
        targets.truncate(2);
        let Some(best) = best_move(spec, workload, placement, &miss, from, &targets)? else {
            break;
        };
        placement[best.model] = acc_u32(best.to);
        outcomes[from] = best.from_outcome;
        outcomes[best.to] = best.to_outcome;
        moves += 1;
    }
    Ok(moves)
}

/// One trial move of the placement search and what the two accelerators it changes gave.
struct Move {
    gain: u64,
    model: usize,
    to: usize,
    from_outcome: Option<Outcome>,
    to_outcome: Option<Outcome>,
}

/// The move of one of `from`'s models to one of `targets` that lowers the pair's missed
/// tokens the most (ties: the first tried, models and targets in order), if any does. The
/// trials are independent simulations, so they run on every core (`std::thread::scope`); the
/// choice is made afterwards in trial order, so the result does not depend on the core count.
fn best_move(
    spec: &SimSpec,
    workload: &Workload,
    placement: &[u32],
    miss: &[u64],
    from: usize,
    targets: &[usize],
) -> Result<Option<Move>, SimError> {
    let trials: Vec<(usize, usize)> = (0..placement.len())
        .filter(|&m| placement[m] == acc_u32(from))
        .flat_map(|m| targets.iter().map(move |&to| (m, to)))
        .collect();
    let workers = std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .clamp(1, trials.len().max(1));
    let chunk = trials.len().div_ceil(workers).max(1);
    let run = |&(model, to): &(usize, usize)| -> Result<Move, SimError> {
        let mut trial = placement.to_vec();
        trial[model] = acc_u32(to);
        let mut noop = || {};
        let from_outcome = run_acc(spec, workload, &trial, acc_u32(from), &mut noop)?;
        let to_outcome = run_acc(spec, workload, &trial, acc_u32(to), &mut noop)?;
        let before = miss[from] + miss[to];
        let after = missed(from_outcome.as_ref()) + missed(to_outcome.as_ref());
        Ok(Move {
            gain: before.saturating_sub(after),
            model,
            to,
            from_outcome,
            to_outcome,
        })
    };
    let results: Vec<Result<Move, SimError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = trials
            .chunks(chunk)
            .map(|part| scope.spawn(move || part.iter().map(run).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|handle| {
                handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    });
    let mut best: Option<Move> = None;
    for result in results {
        let trial = result?;
        if trial.gain > 0 && best.as_ref().is_none_or(|b| trial.gain > b.gain) {
            best = Some(trial);
        }
    }
    Ok(best)
}

/// An accelerator index (below `ACCELERATORS_MAX`) as the placement stores it.
fn acc_u32(acc: usize) -> u32 {
    u32::try_from(acc).unwrap_or(u32::MAX)
}

/// Simulates accelerator `acc` under `placement` (`None` if no model is placed on it).
fn run_acc(
    spec: &SimSpec,
    workload: &Workload,
    placement: &[u32],
    acc: u32,
    tick: &mut dyn FnMut(),
) -> Result<Option<Outcome>, SimError> {
    let slo = Slo {
        ttft_ns: spec.knobs.ttft_slo_ms * 1_000_000,
        tbt_ns: spec.knobs.tbt_slo_ms * 1_000_000,
    };
    let models: Vec<usize> = (0..workload.models.len())
        .filter(|&m| placement[m] == acc)
        .collect();
    if models.is_empty() {
        return Ok(None);
    }
    let local: std::collections::BTreeMap<usize, usize> =
        models.iter().enumerate().map(|(i, &m)| (m, i)).collect();
    let requests: Vec<(usize, Request)> = workload
        .requests
        .iter()
        .filter_map(|r| {
            local
                .get(&usize::try_from(r.model).unwrap_or(0))
                .map(|&l| (l, *r))
        })
        .collect();
    let (cfg, costs, ids) = pool_config(spec, workload, &models)?;
    let warm: Vec<usize> = workload
        .warm
        .iter()
        .filter_map(|m| {
            local
                .get(&usize::try_from(*m).unwrap_or(usize::MAX))
                .copied()
        })
        .collect();
    let result = AccRun::new(cfg, costs, ids, &requests, slo, warm)?.run(tick)?;
    Ok(Some(Outcome {
        acc,
        models,
        requests,
        result,
    }))
}

/// One accelerator's models (market indices), requests (local model index) and outcome.
struct Outcome {
    acc: u32,
    models: Vec<usize>,
    requests: Vec<(usize, Request)>,
    result: AccOutcome,
}

/// Sums over accelerators, in accelerator order.
#[derive(Default)]
struct Totals {
    ttft_ns: Vec<u64>,
    lenient_sum: f64,
    all_on_time: u64,
    rejected: u64,
    busy_ns: u64,
    end_ns: u64,
    counters: tidepool_pool::PoolCounters,
    batch: BatchReport,
    batch_first_ns: Option<u64>,
    batch_last_ns: u64,
}

fn fold(spec: &SimSpec, workload: &Workload, outcomes: &[Outcome]) -> Report {
    let mut per_model: Vec<ModelReport> = workload
        .models
        .iter()
        .map(|m| ModelReport {
            model: m.id.clone(),
            family: spec.profile.families[m.family].name.clone(),
            accelerator: 0,
            requests: 0,
            tokens_owed: 0,
            tokens_on_time: 0,
            attainment: 1.0,
            decode_by_batch: tidepool_pool::DecodeByBatch::default(),
        })
        .collect();
    let mut t = Totals::default();
    for o in outcomes {
        accumulate(&mut per_model, o, &mut t);
    }
    for m in &mut per_model {
        m.attainment = ratio(m.tokens_on_time, m.tokens_owed);
    }
    let owed: u64 = per_model.iter().map(|m| m.tokens_owed).sum();
    let on_time: u64 = per_model.iter().map(|m| m.tokens_on_time).sum();
    let requests = online_requests(workload);
    let start_ns = workload.requests.first().map_or(0, |r| r.at_ns);
    let makespan_s = as_f64(t.end_ns.saturating_sub(start_ns)) / 1e9;
    t.ttft_ns.sort_unstable();
    let (ttft_ns, busy_ns, counters) = (&t.ttft_ns, t.busy_ns, t.counters);
    Report {
        profile: spec.profile.name.clone(),
        policy: spec.policy,
        accelerators: spec.accelerators,
        models: u32::try_from(workload.models.len()).unwrap_or(u32::MAX),
        ttft_slo_ms: spec.knobs.ttft_slo_ms,
        tbt_slo_ms: spec.knobs.tbt_slo_ms,
        knobs: spec.knobs,
        requests,
        requests_rejected: t.rejected,
        prompts_capped: workload.prompts_capped,
        tokens_owed: owed,
        tokens_on_time: on_time,
        attainment: ratio(on_time, owed),
        attainment_lenient: if requests == 0 {
            1.0
        } else {
            t.lenient_sum / as_f64(requests)
        },
        requests_all_on_time: ratio(t.all_on_time, requests),
        goodput_tokens_per_s: per_s(as_f64(on_time), makespan_s),
        ttft_ms_p50: percentile_ms(ttft_ns, 50),
        ttft_ms_p99: percentile_ms(ttft_ns, 99),
        makespan_s,
        utilization: if makespan_s > 0.0 {
            as_f64(busy_ns) / 1e9 / (makespan_s * f64::from(spec.accelerators))
        } else {
            0.0
        },
        loads: counters.loads,
        evictions: counters.evictions,
        kv_saves: counters.kv_saves,
        kv_restores: counters.kv_restores,
        prefills: counters.prefills,
        decode_steps: counters.decode_steps,
        in_flight_ns: counters.in_flight_ns,
        decode_by_batch: counters.decode_by_batch,
        switches_per_s: per_s(as_f64(counters.loads), makespan_s),
        placement_moves: 0,
        per_model,
        batch: batch_report(&t),
    }
}

/// Online requests of the workload (batch ones are reported apart).
fn online_requests(workload: &Workload) -> u64 {
    let online = workload
        .requests
        .iter()
        .filter(|r| r.class == tidepool_pool::RequestClass::Online)
        .count();
    u64::try_from(online).unwrap_or(u64::MAX)
}

fn batch_report(t: &Totals) -> BatchReport {
    BatchReport {
        preemptions: t.counters.batch_preemptions,
        makespan_s: t.batch_first_ns.map_or(0.0, |first| {
            as_f64(t.batch_last_ns.saturating_sub(first)) / 1e9
        }),
        ..t.batch
    }
}

fn accumulate(per_model: &mut [ModelReport], o: &Outcome, t: &mut Totals) {
    for &m in &o.models {
        per_model[m].accelerator = o.acc;
        if let Some((_, by)) = o
            .result
            .decode_by_model
            .iter()
            .find(|(id, _)| *id == per_model[m].model)
        {
            per_model[m].decode_by_batch = *by;
        }
    }
    for ((local, _), s) in o.requests.iter().zip(&o.result.seqs) {
        if s.batch {
            t.batch.requests += 1;
            t.batch.rejected += u64::from(s.rejected);
            t.batch.finished += u64::from(!s.rejected && s.emitted == s.output_tokens);
            t.batch.tokens += u64::from(s.emitted);
            t.batch_first_ns = Some(
                t.batch_first_ns
                    .map_or(s.arrival_ns, |f| f.min(s.arrival_ns)),
            );
            t.batch_last_ns = t.batch_last_ns.max(s.last_token_ns);
            continue;
        }
        book(&mut per_model[o.models[*local]], s);
        t.lenient_sum += s.lenient_score();
        t.all_on_time += u64::from(!s.rejected && s.on_time == s.output_tokens);
        t.rejected += u64::from(s.rejected);
        if let Some(first) = s.first_token_ns {
            t.ttft_ns.push(first - s.arrival_ns);
        }
    }
    t.busy_ns += o.result.compute_busy_ns;
    t.end_ns = t.end_ns.max(o.result.end_ns);
    t.counters = t.counters.saturating_add(&o.result.counters);
}

fn book(report: &mut ModelReport, s: &SeqSim) {
    report.requests += 1;
    report.tokens_owed += u64::from(s.output_tokens);
    report.tokens_on_time += u64::from(s.on_time);
}

/// `amount` per second of `seconds` (0 over no time).
fn per_s(amount: f64, seconds: f64) -> f64 {
    if seconds > 0.0 { amount / seconds } else { 0.0 }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 1.0 } else { as_f64(a) / as_f64(b) }
}

/// Nearest-rank percentile of sorted nanoseconds, in milliseconds.
fn percentile_ms(sorted_ns: &[u64], pct: usize) -> f64 {
    if sorted_ns.is_empty() {
        return 0.0;
    }
    let rank = (pct * sorted_ns.len())
        .div_ceil(100)
        .clamp(1, sorted_ns.len());
    as_f64(sorted_ns[rank - 1]) / 1e6
}
