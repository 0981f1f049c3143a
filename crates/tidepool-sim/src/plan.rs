//! The capacity planner: per policy, the fewest accelerators whose simulated attainment reaches
//! the target. First every model is sized alone ([`crate::demand::size`], on the whole
//! workload): `dedicated` gives each model the fewest whole accelerators of its own that reach
//! the target on its traffic (not one per model), and its answer is their sum. The pooled
//! policies start from those instance counts (a model that needs three accelerators alone gets
//! three instances) and are searched by bisection over 1..=the dedicated answer (attainment is
//! treated as monotone in the accelerator count; every probe is kept and plotted, so a
//! non-monotone curve is visible). On a workload longer than the search sample
//! (`SimSpec::search_sample_requests`) the bisection runs on the sample and its answer is
//! confirmed on the whole workload: there the answer meets the target and one fewer misses.

use serde::Serialize;
use tidepool_core::PoolPolicy;

use crate::SimError;
use crate::accel::search_sample;
use crate::demand::size;
use crate::sim::{Demand, Instances, Progress, Report, SimSpec, simulate};
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
    /// Compute-busy seconds alone on one accelerator (its predicted load).
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

/// Searches every policy in `policies` (`spec.policy` and `spec.accelerators` are ignored).
#[expect(
    clippy::too_many_lines,
    reason = "one linear search per policy; splitting hides the flow"
)]
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
            let s = SimSpec {
                policy,
                accelerators: demand.accelerators(),
                placement: Some(dedicated_placement(&demand)),
                instances: Instances::Given(demand.clone()),
                ..spec.clone()
            };
            let report = simulate(&s, workload, progress)?;
            points.push(point(&report));
            answers.push(answer(
                policy,
                demand.met().then_some(&report),
                report.attainment,
            ));
            continue;
        }
        let mut probe = |accelerators: u32,
                         on: &Workload,
                         points: &mut Vec<PlanPoint>|
         -> Result<Report, SimError> {
            let s = SimSpec {
                policy,
                accelerators,
                placement: None,
                instances: Instances::Given(demand.clone()),
                search_until_attainment: Some(target_attainment),
                ..spec.clone()
            };
            let report = simulate(&s, on, progress)?;
            points.push(point(&report));
            Ok(report)
        };
        let meets = |r: &Report| r.attainment >= target_attainment;
        let top_n = demand.accelerators().max(1);
        let bisect_on = sample.as_ref().unwrap_or(workload);
        let top = probe(top_n, bisect_on, &mut points)?;
        if !meets(&top) {
            answers.push(answer(policy, None, top.attainment));
            continue;
        }
        let (mut lo, mut hi, mut hi_report) = (0_u32, top_n, top);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            let report = probe(mid, bisect_on, &mut points)?;
            if meets(&report) {
                hi = mid;
                hi_report = report;
            } else {
                lo = mid;
            }
        }
        if sample.is_some() {
            // Confirm on the whole workload: up while the answer misses, down while one
            // fewer meets.
            let mut n = hi;
            let mut at_n = probe(n, workload, &mut points)?;
            while !meets(&at_n) && n < top_n {
                n += 1;
                at_n = probe(n, workload, &mut points)?;
            }
            if !meets(&at_n) {
                answers.push(answer(policy, None, at_n.attainment));
                continue;
            }
            while n > 1 {
                let below = probe(n - 1, workload, &mut points)?;
                if !meets(&below) {
                    break;
                }
                n -= 1;
                at_n = below;
            }
            hi_report = at_n;
        }
        answers.push(answer(policy, Some(&hi_report), hi_report.attainment));
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
