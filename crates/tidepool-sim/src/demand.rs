//! Per-model sizing: how many whole accelerators each model needs on its own traffic. It is
//! the `dedicated` baseline of the planner (each model on the fewest accelerators of its own
//! that reach the target, not one per model) and the instance count the pooled policies start
//! from (the head of the popularity curve gets several instances, the tail one to share).

use tidepool_core::PoolPolicy;

use crate::SimError;
use crate::accel::run_acc;
use crate::dispatch::split;
use crate::spec::{Demand, SimSpec};
use crate::workload::Workload;

/// Sizes every model (on every core): for k = 1, 2, … up to `instances_max`, the model's own
/// requests split over k accelerators of its own under `dedicated` (the spec's profile, knobs
/// and budget), until its attainment reaches `target_attainment`. One fewer misses the target
/// (each k below the answer was simulated), assuming attainment grows with instances.
pub fn size(
    spec: &SimSpec,
    workload: &Workload,
    target_attainment: f64,
    instances_max: u32,
) -> Result<Demand, SimError> {
    size_under(
        spec,
        workload,
        target_attainment,
        instances_max,
        PoolPolicy::Dedicated,
    )
}

/// [`size`] with each model's instances run under `policy` instead of `dedicated`: how many
/// accelerators of its own a model needs when the pool that serves it runs that policy. A
/// pooled policy serves a model alone differently (`token` preempts a decoding sequence to
/// start a new one; `dedicated` queues it), so near saturation the counts can differ.
pub fn size_under(
    spec: &SimSpec,
    workload: &Workload,
    target_attainment: f64,
    instances_max: u32,
    policy: PoolPolicy,
) -> Result<Demand, SimError> {
    if !(0.0..=1.0).contains(&target_attainment) {
        return Err(SimError::WorkloadInvalid {
            reason: "target attainment must be in 0..=1",
        });
    }
    let alone = SimSpec {
        policy,
        placement_moves_max: 0,
        placement: None,
        ..spec.clone()
    };
    let mut by_model: Vec<Vec<u32>> = vec![Vec::new(); workload.models.len()];
    for (i, r) in workload.requests.iter().enumerate() {
        if let Some(list) = by_model.get_mut(usize::try_from(r.model).unwrap_or(usize::MAX)) {
            list.push(u32::try_from(i).unwrap_or(u32::MAX));
        }
    }
    let models: Vec<usize> = (0..workload.models.len()).collect();
    let sized = crate::par::map(&models, |&m| {
        size_one(
            &alone,
            workload,
            m,
            &by_model[m],
            target_attainment,
            instances_max,
        )
    });
    let mut demand = Demand {
        target_attainment,
        instances: Vec::with_capacity(models.len()),
        attainment: Vec::with_capacity(models.len()),
        busy_ns: Vec::with_capacity(models.len()),
    };
    for result in sized {
        let (k, attainment, busy_ns) = result?;
        demand.instances.push(k);
        demand.attainment.push(attainment);
        demand.busy_ns.push(busy_ns);
    }
    Ok(demand)
}

/// One model: (instances, attainment there, compute-busy time summed over those instances).
fn size_one(
    alone: &SimSpec,
    workload: &Workload,
    model: usize,
    requests: &[u32],
    target_attainment: f64,
    instances_max: u32,
) -> Result<(u32, f64, u64), SimError> {
    let mut busy = 0;
    let mut last = (1, 1.0);
    for k in 1..=instances_max.max(1) {
        let parts = split(
            &workload.requests,
            requests,
            usize::try_from(k).unwrap_or(1),
            alone.knobs.ttft_slo_ms,
            alone.knobs.tbt_slo_ms,
        );
        let (mut owed, mut on_time) = (0_u64, 0_u64);
        busy = 0;
        for (slot, part) in parts.iter().enumerate() {
            let acc = u32::try_from(slot).unwrap_or(u32::MAX);
            let Some(outcome) = run_acc(alone, workload, acc, &[(model, part.as_slice())], None)?
            else {
                continue;
            };
            for s in outcome.result.seqs.iter().filter(|s| !s.batch) {
                owed += u64::from(s.output_tokens);
                on_time += u64::from(s.on_time);
            }
            busy += outcome.result.compute_busy_ns;
        }
        let attainment = if owed == 0 {
            1.0
        } else {
            crate::profile::as_f64(on_time) / crate::profile::as_f64(owed)
        };
        last = (k, attainment);
        if attainment >= target_attainment {
            break;
        }
    }
    Ok((last.0, last.1, busy))
}
