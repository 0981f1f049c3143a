//! One simulated configuration: size each model's instances, place them on accelerators, fix
//! each request's instance ([`crate::dispatch`]), run each accelerator through the real pool
//! (on every core: they are independent once dispatch is fixed), search the placement
//! ([`crate::search`]) and fold the outcomes into a [`Report`].

use serde::Serialize;
use tidepool_core::PoolPolicy;
use tidepool_pool::PoolKnobs;

use crate::SimError;
use crate::accel::{AccKey, Outcome, Routed, acc_u32, keys, missed, search_sample};
use crate::demand::{size, size_under};
use crate::profile::{Costs, as_f64};
use crate::run::SeqSim;
pub use crate::spec::{
    ACCELERATORS_MAX, Demand, Instances, PLACEMENT_MOVES_MAX, SEARCH_SAMPLE_REQUESTS, SimSpec,
};
use crate::workload::Workload;

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
    /// The accelerator of its first instance.
    pub accelerator: u32,
    /// The accelerators of all its instances, in index order (dispatch ties go to the first).
    pub instances: Vec<u32>,
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
    /// Instances the placement search moved (`per_model[].instances` is the final placement).
    #[serde(default)]
    pub placement_moves: u32,
    /// Requests the placement search ran on (the whole workload, or its first
    /// `search_sample_requests`); 0 without a search.
    #[serde(default)]
    pub search_requests: u64,
    /// Model instances over all accelerators.
    #[serde(default)]
    pub instances: u32,
    pub per_model: Vec<ModelReport>,
    pub per_accelerator: Vec<AcceleratorReport>,
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

/// One accelerator: the models it holds an instance of and how its requests fared.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AcceleratorReport {
    pub accelerator: u32,
    pub models: Vec<String>,
    pub requests: u64,
    pub tokens_owed: u64,
    pub tokens_on_time: u64,
    pub attainment: f64,
    /// Compute-busy time over the run's makespan.
    pub utilization: f64,
}

/// Instances → accelerators (each model's accelerators, ascending). Longest-processing-time
/// first over instances: each model's predicted load (`load_ns`: busy time on its own sized
/// instances, or the batch-1 estimate [`batch1_load_ns`]) is split evenly over its
/// `instances`, and instances in decreasing order of their share (ties by model, then
/// instance) go to the accelerator with the least predicted work that does not hold the model
/// yet. `dedicated` additionally requires every model of an accelerator to fit its memory at
/// once (with as many accelerators as instances, this is one instance per accelerator).
pub fn place(
    spec: &SimSpec,
    workload: &Workload,
    instances: &[u32],
    load_ns: &[f64],
) -> Result<Vec<Vec<u32>>, SimError> {
    let n = accelerators(spec)?;
    let models = workload.models.len();
    if instances.len() != models || load_ns.len() != models {
        return Err(SimError::WorkloadInvalid {
            reason: "one instance count and load per market model",
        });
    }
    let fams = &spec.profile.families;
    let mut items: Vec<(usize, u32, f64)> = Vec::new();
    for (m, (&k, &load)) in instances.iter().zip(load_ns).enumerate() {
        let k = k.clamp(1, acc_u32(n));
        for slot in 0..k {
            items.push((m, slot, load / f64::from(k)));
        }
    }
    items.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.0.cmp(&b.0)).then(a.1.cmp(&b.1)));
    let mut load = vec![0.0_f64; n];
    let mut bytes = vec![0_u64; n];
    let mut count = vec![0_u32; n];
    let mut placement = vec![Vec::new(); models];
    let memory = spec.profile.accelerator.memory_bytes;
    for (model, _, share) in items {
        let need = fams[workload.models[model].family].resident_bytes();
        let held: &Vec<u32> = &placement[model];
        let fits = |a: usize| {
            !held.contains(&acc_u32(a))
                && (spec.policy != PoolPolicy::Dedicated || bytes[a] + need <= memory)
        };
        let best = (0..n)
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
        load[best] += share;
        bytes[best] += need;
        count[best] += 1;
        placement[model].push(acc_u32(best));
    }
    for accs in &mut placement {
        accs.sort_unstable();
    }
    Ok(placement)
}

/// Each model's estimated busy time at batch 1 (prefill + decode of all its requests), the
/// load [`place`] balances when nothing better is known.
pub fn batch1_load_ns(spec: &SimSpec, workload: &Workload) -> Vec<f64> {
    let fams = &spec.profile.families;
    let mut work = vec![0.0_f64; workload.models.len()];
    for r in &workload.requests {
        let m = usize::try_from(r.model).unwrap_or(0);
        let Some(model) = workload.models.get(m) else {
            continue;
        };
        let costs = Costs::new(&spec.profile.accelerator, &fams[model.family]);
        let p = f64::from(r.prompt_tokens);
        let ctx = p + f64::from(r.output_tokens) / 2.0;
        work[m] += as_f64(costs.prefill_ns(p, p * p))
            + f64::from(r.output_tokens) * as_f64(costs.decode_ns(1.0, ctx));
    }
    work
}

/// `spec.accelerators` checked, as a count.
fn accelerators(spec: &SimSpec) -> Result<usize, SimError> {
    let n = spec.accelerators;
    if n == 0 || n > ACCELERATORS_MAX {
        return Err(SimError::WorkloadInvalid {
            reason: "accelerators must be in 1..=4096",
        });
    }
    Ok(usize::try_from(n).unwrap_or(1))
}

/// The instance counts and predicted loads `spec` asks for, counts within `1..=accelerators`.
fn instance_plan(
    spec: &SimSpec,
    workload: &Workload,
    accelerators: usize,
) -> Result<(Vec<u32>, Vec<f64>), SimError> {
    let models = workload.models.len();
    let cap = acc_u32(accelerators);
    match &spec.instances {
        Instances::One => Ok((vec![1; models], batch1_load_ns(spec, workload))),
        Instances::Sized { target_attainment } => {
            let sample = search_sample(workload, spec.search_sample_requests);
            let on = sample.as_ref().unwrap_or(workload);
            let demand = size(spec, on, *target_attainment, cap)?;
            // A pooled policy's instances are what each model needs alone under that policy;
            // the predicted loads stay `dedicated`'s busy times, as in the planner.
            let instances = if spec.policy == PoolPolicy::Dedicated {
                demand.instances
            } else {
                size_under(spec, on, *target_attainment, cap, spec.policy)?.instances
            };
            Ok((
                instances,
                demand.busy_ns.iter().map(|&b| as_f64(b)).collect(),
            ))
        }
        Instances::Given(demand) => {
            if demand.instances.len() != models || demand.busy_ns.len() != models {
                return Err(SimError::WorkloadInvalid {
                    reason: "instances: one count per market model",
                });
            }
            Ok((
                demand.instances.iter().map(|&k| k.clamp(1, cap)).collect(),
                demand.busy_ns.iter().map(|&b| as_f64(b)).collect(),
            ))
        }
    }
}

/// A given placement checked: one non-empty list of distinct accelerators below
/// `accelerators` per market model; returned with each list ascending.
fn checked_placement(
    given: &[Vec<u32>],
    models: usize,
    accelerators: usize,
) -> Result<Vec<Vec<u32>>, SimError> {
    let mut placement = given.to_vec();
    let fits = placement.len() == models
        && placement.iter_mut().all(|accs| {
            accs.sort_unstable();
            let len = accs.len();
            accs.dedup();
            !accs.is_empty()
                && accs.len() == len
                && accs
                    .iter()
                    .all(|&a| usize::try_from(a).is_ok_and(|a| a < accelerators))
        });
    if !fits {
        return Err(SimError::WorkloadInvalid {
            reason: "placement: per market model, distinct accelerators below --accelerators",
        });
    }
    Ok(placement)
}

/// Runs one configuration. Accelerators are independent once each request's instance is
/// fixed, so they run on every core; `progress` is called when the first pass and when the
/// whole run is done.
pub fn simulate(
    spec: &SimSpec,
    workload: &Workload,
    progress: &mut dyn FnMut(Progress),
) -> Result<Report, SimError> {
    simulate_with(spec, workload, progress, None)
}

/// Placement searches already run, by accelerator count. The planner keeps one per policy:
/// all its probes start from the same first placement for a given count (same instance counts
/// and loads) and search the same requests (the sample, or the whole workload when it is no
/// longer), so a count searched once — on the sample during the bisection — is not searched
/// again when the whole workload is probed at that count. Only full searches are kept.
#[derive(Debug, Default)]
pub(crate) struct Searched {
    found: std::collections::BTreeMap<u32, crate::search::Found>,
    /// The next searches may give up on a placement far from the target
    /// (`crate::search::improve`'s `give_up`): the bisection's probes, not the confirmation's.
    pub(crate) give_up: bool,
}

/// [`simulate`], reusing and recording the placement search in `searched` (see [`Searched`]).
pub(crate) fn simulate_with(
    spec: &SimSpec,
    workload: &Workload,
    progress: &mut dyn FnMut(Progress),
    searched: Option<&mut Searched>,
) -> Result<Report, SimError> {
    if let Some(problem) = spec.knobs.problems().first() {
        return Err(SimError::KnobInvalid {
            field: problem.field,
            reason: problem.reason,
        });
    }
    let n = accelerators(spec)?;
    let mut placement = match &spec.placement {
        None => {
            let (counts, loads) = instance_plan(spec, workload, n)?;
            place(spec, workload, &counts, &loads)?
        }
        Some(given) => checked_placement(given, workload.models.len(), n)?,
    };
    let counts: Vec<u32> = placement.iter().map(|a| acc_u32(a.len())).collect();
    let total = u64::try_from(workload.requests.len()).unwrap_or(u64::MAX);
    let routed = Routed::new(spec, workload, &counts);
    let mut outcomes = routed.run_all(&keys(&placement, n))?;
    progress(Progress {
        requests_done: total / 2,
        requests_total: total,
    });
    let (moves, search_requests) = search_and_confirm(
        spec,
        &routed,
        &counts,
        (&mut placement, &mut outcomes),
        searched,
    )?;
    let current = keys(&placement, n);
    debug_assert!(
        outcomes
            .iter()
            .zip(&current)
            .all(|(o, key)| o.is_some() != key.is_empty()),
        "outcomes follow the placement"
    );
    progress(Progress {
        requests_done: total,
        requests_total: total,
    });
    let outcomes: Vec<Outcome> = outcomes.into_iter().flatten().collect();
    let mut report = fold(spec, workload, &placement, &outcomes);
    report.placement_moves = moves;
    report.search_requests = search_requests;
    Ok(report)
}

/// The placement search (unless `dedicated`, a single accelerator, no moves allowed, or the
/// first pass already reaches `search_until_attainment`) and its confirmation: the
/// accelerators the found placement changes are simulated on the whole workload, and
/// `placement` and `outcomes` take the found placement if it was searched on the whole
/// workload or misses fewer tokens there. Returns the moves kept and the requests searched on.
fn search_and_confirm(
    spec: &SimSpec,
    routed: &Routed<'_>,
    counts: &[u32],
    (placement, outcomes): (&mut Vec<Vec<u32>>, &mut [Option<Outcome>]),
    searched: Option<&mut Searched>,
) -> Result<(u32, u64), SimError> {
    let workload = routed.workload;
    let n = outcomes.len();
    let owed: u64 = workload
        .requests
        .iter()
        .filter(|r| r.class == tidepool_pool::RequestClass::Online)
        .map(|r| u64::from(r.output_tokens))
        .sum();
    let first_missed: u64 = outcomes.iter().map(|o| missed(o.as_ref())).sum();
    let good_enough = spec
        .search_until_attainment
        .is_some_and(|target| as_f64(owed.saturating_sub(first_missed)) >= target * as_f64(owed));
    if spec.policy == PoolPolicy::Dedicated || spec.placement_moves_max == 0 || n < 2 || good_enough
    {
        return Ok((0, 0));
    }
    let sample = search_sample(workload, spec.search_sample_requests);
    let searched_on = sample.as_ref().unwrap_or(workload);
    let search_requests = u64::try_from(searched_on.requests.len()).unwrap_or(u64::MAX);
    let found = match searched {
        Some(memo) => {
            if let Some(found) = memo.found.get(&spec.accelerators) {
                found.clone()
            } else {
                let found =
                    crate::search::improve(spec, searched_on, counts, placement, memo.give_up)?;
                if !found.gave_up {
                    memo.found.insert(spec.accelerators, found.clone());
                }
                found
            }
        }
        None => crate::search::improve(spec, searched_on, counts, placement, false)?,
    };
    if found.moves == 0 {
        return Ok((0, search_requests));
    }
    let current = keys(placement, n);
    let next = keys(&found.placement, n);
    let changed: Vec<(u32, &AccKey)> = (0..n)
        .filter(|&a| next[a] != current[a])
        .map(|a| (acc_u32(a), &next[a]))
        .collect();
    let rerun: Vec<Option<Outcome>> = crate::par::map(&changed, |&(a, key)| routed.run(a, key))
        .into_iter()
        .collect::<Result<_, _>>()?;
    let before: u64 = changed
        .iter()
        .map(|&(a, _)| missed(outcomes[usize::try_from(a).unwrap_or(0)].as_ref()))
        .sum();
    let after: u64 = rerun.iter().map(|o| missed(o.as_ref())).sum();
    // On the whole workload every kept move lowered the missed tokens; on a sample, the whole
    // workload confirms the placement or the first one stays.
    if sample.is_some() && after >= before {
        return Ok((0, search_requests));
    }
    for ((a, _), outcome) in changed.iter().zip(rerun) {
        outcomes[usize::try_from(*a).unwrap_or(0)] = outcome;
    }
    *placement = found.placement;
    Ok((found.moves, search_requests))
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

/// One empty report per market model, with its instances.
fn model_reports(spec: &SimSpec, workload: &Workload, placement: &[Vec<u32>]) -> Vec<ModelReport> {
    workload
        .models
        .iter()
        .zip(placement)
        .map(|(m, accs)| ModelReport {
            model: m.id.clone(),
            family: spec.profile.families[m.family].name.clone(),
            accelerator: accs.first().copied().unwrap_or(0),
            instances: accs.clone(),
            requests: 0,
            tokens_owed: 0,
            tokens_on_time: 0,
            attainment: 1.0,
            decode_by_batch: tidepool_pool::DecodeByBatch::default(),
        })
        .collect()
}

fn fold(
    spec: &SimSpec,
    workload: &Workload,
    placement: &[Vec<u32>],
    outcomes: &[Outcome],
) -> Report {
    let mut per_model = model_reports(spec, workload, placement);
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
    let per_accelerator = per_accelerator(spec, &per_model, outcomes, makespan_s);
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
        search_requests: 0,
        instances: u32::try_from(placement.iter().map(Vec::len).sum::<usize>()).unwrap_or(u32::MAX),
        per_model,
        per_accelerator,
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

/// Each accelerator's models and how its requests fared, in accelerator order.
fn per_accelerator(
    spec: &SimSpec,
    per_model: &[ModelReport],
    outcomes: &[Outcome],
    makespan_s: f64,
) -> Vec<AcceleratorReport> {
    let mut out: Vec<AcceleratorReport> = (0..spec.accelerators)
        .map(|accelerator| AcceleratorReport {
            accelerator,
            models: Vec::new(),
            requests: 0,
            tokens_owed: 0,
            tokens_on_time: 0,
            attainment: 1.0,
            utilization: 0.0,
        })
        .collect();
    for o in outcomes {
        let Some(acc) = out.get_mut(usize::try_from(o.acc).unwrap_or(usize::MAX)) else {
            continue;
        };
        acc.models = o
            .models
            .iter()
            .map(|&m| per_model[m].model.clone())
            .collect();
        for s in &o.result.seqs {
            acc.requests += 1;
            acc.tokens_owed += u64::from(s.output_tokens);
            acc.tokens_on_time += u64::from(s.on_time);
        }
        acc.attainment = ratio(acc.tokens_on_time, acc.tokens_owed);
        acc.utilization = per_s(as_f64(o.result.compute_busy_ns) / 1e9, makespan_s);
    }
    out
}

fn accumulate(per_model: &mut [ModelReport], o: &Outcome, t: &mut Totals) {
    for &m in &o.models {
        if let Some((_, by)) = o
            .result
            .decode_by_model
            .iter()
            .find(|(id, _)| *id == per_model[m].model)
        {
            per_model[m].decode_by_batch = per_model[m].decode_by_batch.saturating_add(by);
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
