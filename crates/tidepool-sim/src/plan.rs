//! The capacity planner: per policy, the fewest accelerators whose simulated attainment reaches
//! the target. `dedicated` is one model per accelerator by definition (its answer is the model
//! count, and its attainment is reported); the pooled policies are searched by bisection over
//! 1..=models (attainment is treated as monotone in the accelerator count; every probe is kept
//! and plotted, so a non-monotone curve is visible).

use serde::Serialize;
use tidepool_core::PoolPolicy;

use crate::SimError;
use crate::sim::{Progress, Report, SimSpec, simulate};
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
}

/// The answer for one policy: `None` when even one accelerator per model misses the target.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanAnswer {
    pub policy: PoolPolicy,
    pub accelerators: Option<u32>,
    pub attainment: f64,
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
    }
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
    let mut points = Vec::new();
    let mut answers = Vec::new();
    for &policy in policies {
        let mut probe = |accelerators: u32, points: &mut Vec<PlanPoint>| -> Result<f64, SimError> {
            let s = SimSpec {
                policy,
                accelerators,
                placement: None,
                ..spec.clone()
            };
            let report = simulate(&s, workload, progress)?;
            points.push(point(&report));
            Ok(report.attainment)
        };
        if policy == PoolPolicy::Dedicated {
            let attainment = probe(models, &mut points)?;
            let ok = attainment >= target_attainment;
            answers.push(PlanAnswer {
                policy,
                accelerators: ok.then_some(models),
                attainment,
            });
            continue;
        }
        let top = probe(models, &mut points)?;
        if top < target_attainment {
            answers.push(PlanAnswer {
                policy,
                accelerators: None,
                attainment: top,
            });
            continue;
        }
        let (mut lo, mut hi, mut hi_att) = (0_u32, models, top);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            let att = probe(mid, &mut points)?;
            if att >= target_attainment {
                hi = mid;
                hi_att = att;
            } else {
                lo = mid;
            }
        }
        answers.push(PlanAnswer {
            policy,
            accelerators: Some(hi),
            attainment: hi_att,
        });
    }
    points.sort_by(|a, b| {
        format!("{:?}", a.policy)
            .cmp(&format!("{:?}", b.policy))
            .then(a.accelerators.cmp(&b.accelerators))
    });
    let summary = summarise(&answers, models);
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

fn summarise(answers: &[PlanAnswer], models: u32) -> Vec<String> {
    let dedicated = answers
        .iter()
        .find(|a| a.policy == PoolPolicy::Dedicated)
        .and_then(|a| a.accelerators);
    let baseline = dedicated.unwrap_or(models);
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
                "{}: target not reached even with {models} accelerators (attainment {:.2} %)",
                name(a.policy),
                a.attainment * 100.0
            ),
        })
        .chain(
            answers
                .iter()
                .filter(|a| a.policy == PoolPolicy::Dedicated)
                .map(|a| {
                    format!(
                        "dedicated: {models} accelerators, attainment {:.2} %",
                        a.attainment * 100.0
                    )
                }),
        )
        .collect()
}

/// Attainment against accelerators, one line per policy, with the target as a dashed line.
pub fn plan_svg(report: &PlanReport) -> String {
    let mut series: Vec<Series> = Vec::new();
    for p in &report.points {
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
