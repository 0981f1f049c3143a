//! The capacity planner: per policy, the fewest accelerators whose simulated attainment reaches
//! the target. First every model is sized alone ([`crate::demand::size`], on the whole
//! workload): `dedicated` gives each model the fewest whole accelerators of its own that reach
//! the target on its traffic (not one per model), and its answer is their sum. The pooled
//! policies start from those instance counts (a model that needs three accelerators alone gets
//! three instances) and are searched by bisection over 1..=the dedicated answer, first split at
//! the compute estimate (attainment is treated as monotone in the accelerator count; every
//! probe is kept and plotted, so a non-monotone curve is visible). On a workload longer than the
//! search sample (`SimSpec::search_sample_requests`) the bisection runs on the sample, its probes
//! may give up a hopeless placement search, and its answer is confirmed on the whole workload
//! with full searches: there the answer meets the target and one fewer misses. Each count is
//! probed once per workload and searched once per policy (`Probes`).

use std::collections::BTreeMap;

use serde::Serialize;
use tidepool_core::PoolPolicy;

use crate::SimError;
use crate::accel::search_sample;
use crate::demand::{size, size_under};
use crate::sim::{Demand, Instances, Progress, Report, Searched, SimSpec, simulate, simulate_with};
use crate::svg::{Series, line_chart};
use crate::workload::Workload;

/// One simulated point of the search.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanPoint {
    pub policy: PoolPolicy,
    pub accelerators: u32,
    pub attainment: f64,
    pub attainment_lenient: f64,
    pub goodput_tokens_per_s: f64,
    pub ttft_ms_p99: f64,
    pub switches_per_s: f64,
    /// Moves the placement search made at this size (`Report::placement_moves`).
    pub placement_moves: u32,
    /// Requests simulated: the whole workload, or the bisection's sample.
    pub requests: u64,
}

/// The answer for one policy: `None` when even one accelerator per model misses the target.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanAnswer {
    pub policy: PoolPolicy,
    pub accelerators: Option<u32>,
    pub attainment: f64,
    /// Instances of each market model at the answer (empty without one).
    pub instances_per_model: Vec<u32>,
    /// The models of each accelerator at the answer: the placement file's content.
    pub per_accelerator: Vec<Vec<String>>,
}

/// One model of the market as the sizing saw it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanModel {
    pub model: String,
    /// Its `dedicated` accelerators: the fewest of its own that reach the target.
    pub dedicated_accelerators: u32,
    pub dedicated_attainment: f64,
    /// Compute-busy seconds on its `dedicated_accelerators` alone, summed (its predicted load).
    pub busy_s: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanReport {
    pub profile: String,
    pub models: u32,
    pub requests: u64,
    pub target_attainment: f64,
    pub ttft_slo_ms: u64,
    pub tbt_slo_ms: u64,
    /// The scheduler knobs every probe ran with (SLOs above included).
    pub knobs: tidepool_pool::PoolKnobs,
    pub answers: Vec<PlanAnswer>,
    pub points: Vec<PlanPoint>,
    pub per_model: Vec<PlanModel>,
    /// e.g. "token: 9 accelerators, dedicated: 40, saving 77.5 %".
    pub summary: Vec<String>,
}

fn point(report: &Report) -> PlanPoint {
    PlanPoint {
        policy: report.policy,
        accelerators: report.accelerators,
        attainment: report.attainment,
        attainment_lenient: report.attainment_lenient,
        goodput_tokens_per_s: report.goodput_tokens_per_s,
        ttft_ms_p99: report.ttft_ms_p99,
        switches_per_s: report.switches_per_s,
        placement_moves: report.placement_moves,
        requests: report.requests,
    }
}

/// What the answer's probe placed.
fn answer(policy: PoolPolicy, report: Option<&Report>, attainment: f64) -> PlanAnswer {
    PlanAnswer {
        policy,
        accelerators: report.map(|r| r.accelerators),
        attainment,
        instances_per_model: report.map_or_else(Vec::new, |r| {
            r.per_model
                .iter()
                .map(|m| u32::try_from(m.instances.len()).unwrap_or(u32::MAX))
                .collect()
        }),
        per_accelerator: report.map_or_else(Vec::new, |r| {
            r.per_accelerator.iter().map(|a| a.models.clone()).collect()
        }),
    }
}

/// Instances of a model the sizing tries at most.
pub const INSTANCES_PER_MODEL_MAX: u32 = 64;

/// The `dedicated` baseline's placement: each model's accelerators in a row, in market order.
fn dedicated_placement(demand: &Demand) -> Vec<Vec<u32>> {
    let mut next = 0_u32;
    demand
        .instances
        .iter()
        .map(|&k| {
            let accs = (next..next + k).collect();
            next += k;
            accs
        })
        .collect()
}

/// The `dedicated` baseline: each model on its sized accelerators of its own.
fn dedicated_spec(spec: &SimSpec, demand: &Demand) -> SimSpec {
    SimSpec {
        policy: PoolPolicy::Dedicated,
        accelerators: demand.accelerators(),
        placement: Some(dedicated_placement(demand)),
        instances: Instances::Given(demand.clone()),
        ..spec.clone()
    }
}

/// Searches every policy in `policies` (`spec.policy` and `spec.accelerators` are ignored).
pub fn plan(
    spec: &SimSpec,
    workload: &Workload,
    target_attainment: f64,
    policies: &[PoolPolicy],
    progress: &mut dyn FnMut(Progress),
) -> Result<PlanReport, SimError> {
    if !(0.0..=1.0).contains(&target_attainment) {
        return Err(SimError::WorkloadInvalid {
            reason: "target attainment must be in 0..=1",
        });
    }
    let models = u32::try_from(workload.models.len()).unwrap_or(u32::MAX);
    let demand = size(spec, workload, target_attainment, INSTANCES_PER_MODEL_MAX)?;
    let sample = search_sample(workload, spec.search_sample_requests);
    let mut points = Vec::new();
    let mut answers = Vec::new();
    for &policy in policies {
        if policy == PoolPolicy::Dedicated {
            let report = simulate(&dedicated_spec(spec, &demand), workload, progress)?;
            points.push(point(&report));
            let met = demand.met().then_some(&report);
            answers.push(answer(policy, met, report.attainment));
            continue;
        }
        let own = own_demand(spec, workload, target_attainment, policy, &demand)?;
        let mut probes = Probes {
            spec: SimSpec {
                policy,
                placement: None,
                instances: Instances::Given(own.clone()),
                search_until_attainment: Some(target_attainment),
                ..spec.clone()
            },
            workload,
            sample: sample.as_ref(),
            target_attainment,
            searched: Searched::default(),
            reports: BTreeMap::new(),
            points: &mut points,
            progress: &mut *progress,
        };
        let top = own.accelerators().max(demand.accelerators());
        answers.push(probes.answer(compute_estimate(workload, &demand), top)?);
    }
    points.sort_by(|a, b| {
        format!("{:?}", a.policy)
            .cmp(&format!("{:?}", b.policy))
            .then(a.accelerators.cmp(&b.accelerators))
    });
    let summary = summarise(&answers, models, demand.accelerators());
    let per_model = workload
        .models
        .iter()
        .enumerate()
        .map(|(m, model)| PlanModel {
            model: model.id.clone(),
            dedicated_accelerators: demand.instances[m],
            dedicated_attainment: demand.attainment[m],
            busy_s: crate::profile::as_f64(demand.busy_ns[m]) / 1e9,
        })
        .collect();
    Ok(PlanReport {
        profile: spec.profile.name.clone(),
        models,
        requests: u64::try_from(workload.requests.len()).unwrap_or(u64::MAX),
        target_attainment,
        ttft_slo_ms: spec.knobs.ttft_slo_ms,
        tbt_slo_ms: spec.knobs.tbt_slo_ms,
        knobs: spec.knobs,
        answers,
        points,
        per_model,
        summary,
    })
}

/// The instances each model needs alone under a pooled `policy` (near saturation a pool
/// serves one model differently from `dedicated`: `token` preempts a decoding sequence for a
/// new one), with `dedicated`'s busy times as the predicted loads.
fn own_demand(
    spec: &SimSpec,
    workload: &Workload,
    target_attainment: f64,
    policy: PoolPolicy,
    dedicated: &Demand,
) -> Result<Demand, SimError> {
    let own = size_under(
        spec,
        workload,
        target_attainment,
        INSTANCES_PER_MODEL_MAX,
        policy,
    )?;
    Ok(Demand {
        busy_ns: dedicated.busy_ns.clone(),
        ..own
    })
}

/// Where the bisection first splits: the accelerators the workload's compute keeps busy all the
/// time, from every model's busy time on its own instances (`Demand::busy_ns`) over the span of
/// the arrivals. Not a bound: time-shared models batch more than alone, and on the `h100` Zipf
/// markets it is between the `token` and the `swap-lru` answers or above both. Starting there
/// instead of at half the `dedicated` sum skips the probes of counts far from the answer.
fn compute_estimate(workload: &Workload, demand: &Demand) -> u32 {
    let busy_ns: u128 = demand.busy_ns.iter().map(|&b| u128::from(b)).sum();
    let span_ns = match (workload.requests.first(), workload.requests.last()) {
        (Some(first), Some(last)) => u128::from(last.at_ns.saturating_sub(first.at_ns)),
        _ => 0,
    };
    if busy_ns == 0 || span_ns == 0 {
        return 0;
    }
    u32::try_from(busy_ns.div_ceil(span_ns)).unwrap_or(u32::MAX)
}

/// One pooled policy's probes: each simulated once per workload (`reports`, keyed by whether
/// it ran on the whole workload), each accelerator count's placement search run once
/// (`searched`), every simulation kept as a plan point.
struct Probes<'a, 'p> {
    spec: SimSpec,
    workload: &'a Workload,
    /// The bisection's sample, when the workload is longer.
    sample: Option<&'a Workload>,
    target_attainment: f64,
    searched: Searched,
    reports: BTreeMap<(bool, u32), Report>,
    points: &'a mut Vec<PlanPoint>,
    progress: &'p mut dyn FnMut(Progress),
}

impl Probes<'_, '_> {
    /// Whether `accelerators` meet the target, on the whole workload or the bisection's.
    fn meets(&mut self, accelerators: u32, whole: bool) -> Result<bool, SimError> {
        let key = (whole || self.sample.is_none(), accelerators);
        if let Some(report) = self.reports.get(&key) {
            return Ok(report.attainment >= self.target_attainment);
        }
        let on = if key.0 {
            self.workload
        } else {
            self.sample.unwrap_or(self.workload)
        };
        let s = SimSpec {
            accelerators,
            ..self.spec.clone()
        };
        // The bisection's verdicts only guide it; the confirmation's are the answer.
        self.searched.give_up = !key.0;
        let report = simulate_with(&s, on, &mut *self.progress, Some(&mut self.searched))?;
        self.points.push(point(&report));
        let meets = report.attainment >= self.target_attainment;
        self.reports.insert(key, report);
        Ok(meets)
    }

    fn report(&self, accelerators: u32, whole: bool) -> Option<&Report> {
        self.reports
            .get(&(whole || self.sample.is_none(), accelerators))
    }

    /// Bisects over `1..=top` on the sample (or the whole workload), first probing `estimate`,
    /// then confirms on the whole workload: up while the answer misses, down while one fewer
    /// meets.
    fn answer(&mut self, estimate: u32, top: u32) -> Result<PlanAnswer, SimError> {
        let policy = self.spec.policy;
        let top = top.max(1);
        if !self.meets(top, false)? {
            let attainment = self.report(top, false).map_or(0.0, |r| r.attainment);
            return Ok(answer(policy, None, attainment));
        }
        let (mut lo, mut hi) = (0, top);
        // The estimate only chooses the first split; the bisection's answer does not depend on
        // it (with attainment monotone in accelerators).
        if (1..top).contains(&estimate) {
            if self.meets(estimate, false)? {
                hi = estimate;
            } else {
                lo = estimate;
            }
        }
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if self.meets(mid, false)? {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        let mut n = hi;
        if self.sample.is_some() {
            while !self.meets(n, true)? && n < top {
                n += 1;
            }
            if !self.meets(n, true)? {
                let attainment = self.report(n, true).map_or(0.0, |r| r.attainment);
                return Ok(answer(policy, None, attainment));
            }
            while n > 1 && self.meets(n - 1, true)? {
                n -= 1;
            }
        }
        let report = self.report(n, true);
        Ok(answer(policy, report, report.map_or(0.0, |r| r.attainment)))
    }
}

fn name(policy: PoolPolicy) -> &'static str {
    match policy {
        PoolPolicy::Dedicated => "dedicated",
        PoolPolicy::SwapLru => "swap-lru",
        PoolPolicy::Token => "token",
    }
}

fn summarise(answers: &[PlanAnswer], models: u32, dedicated: u32) -> Vec<String> {
    let baseline = dedicated;
    answers
        .iter()
        .filter(|a| a.policy != PoolPolicy::Dedicated)
        .map(|a| match a.accelerators {
            Some(n) => {
                let saving = 100.0 * (1.0 - f64::from(n) / f64::from(baseline));
                format!(
                    "{}: {n} accelerators, dedicated: {baseline}, saving {saving:.1} %",
                    name(a.policy)
                )
            }
            None => format!(
                "{}: target not reached even with {baseline} accelerators (attainment {:.2} %)",
                name(a.policy),
                a.attainment * 100.0
            ),
        })
        .chain(
            answers
                .iter()
                .filter(|a| a.policy == PoolPolicy::Dedicated)
                .map(|a| match a.accelerators {
                    Some(n) => format!(
                        "dedicated: {n} accelerators ({models} models, each on the fewest of its own that reach the target), attainment {:.2} %",
                        a.attainment * 100.0
                    ),
                    None => format!(
                        "dedicated: some model misses the target even on {INSTANCES_PER_MODEL_MAX} accelerators of its own; {baseline} accelerators give {:.2} %",
                        a.attainment * 100.0
                    ),
                }),
        )
        .collect()
}

/// Attainment against accelerators, one line per policy, with the target as a dashed line.
pub fn plan_svg(report: &PlanReport) -> String {
    let mut series: Vec<Series> = Vec::new();
    // The whole workload's probes (a sample's are in the report, not the plot).
    for p in report
        .points
        .iter()
        .filter(|p| p.requests == report.requests)
    {
        let label = name(p.policy).to_owned();
        let y = p.attainment * 100.0;
        match series.iter_mut().find(|s| s.name == label) {
            Some(s) => s.points.push((f64::from(p.accelerators), y)),
            None => series.push(Series {
                name: label,
                points: vec![(f64::from(p.accelerators), y)],
            }),
        }
    }
    let y_min = report
        .points
        .iter()
        .map(|p| p.attainment * 100.0)
        .fold(100.0_f64, f64::min)
        .floor()
        .max(0.0);
    let title = format!(
        "{} models, {} profile, SLO TTFT {} ms / TBT {} ms",
        report.models, report.profile, report.ttft_slo_ms, report.tbt_slo_ms
    );
    let target = format!("target {:.1} %", report.target_attainment * 100.0);
    line_chart(
        &title,
        "accelerators",
        "token-deadline attainment (%)",
        &series,
        (y_min.min(report.target_attainment * 100.0 - 1.0), 100.0),
        Some((report.target_attainment * 100.0, &target)),
    )
}

/// Per-model attainment in popularity order (model index) for one simulation.
pub fn sim_svg(report: &Report) -> String {
    let points: Vec<(f64, f64)> = report
        .per_model
        .iter()
        .enumerate()
        .map(|(i, m)| {
            (
                f64::from(u32::try_from(i).unwrap_or(u32::MAX)),
                m.attainment * 100.0,
            )
        })
        .collect();
    let y_min = points
        .iter()
        .map(|p| p.1)
        .fold(100.0_f64, f64::min)
        .floor()
        .max(0.0);
    let series = [Series {
        name: name(report.policy).to_owned(),
        points,
    }];
    let title = format!(
        "{} on {} accelerators: attainment {:.2} %",
        name(report.policy),
        report.accelerators,
        report.attainment * 100.0
    );
    line_chart(
        &title,
        "model (0 = most popular)",
        "token-deadline attainment (%)",
        &series,
        (y_min.min(99.0), 100.0),
        None,
    )
}
