//! Speed fitting for the simulator's replay: the engine's speed in a real run relative to a
//! simulation of the same requests, per kind of action (decode family by family and batch size
//! by batch size, prefill over all prefill time, loads per load), and a profile scaled by it.

use tidepool_pool::DecodeByBatch;
use tidepool_sim::Profile;

use crate::actions::ActionTimes;
use crate::common::as_f64;
use crate::report::RunSpeed;

/// The run's engine speed over the simulation's (see [`RunSpeed`]); `None` when either side
/// decoded nothing.
pub(crate) fn run_speed(real: &ActionTimes, sim: &ActionTimes) -> Option<RunSpeed> {
    let ratio = |a: f64, b: f64| (a > 0.0 && b > 0.0).then(|| a / b);
    let per_op = |ms: f64, ops: u64| (ops > 0).then(|| ms / as_f64(ops));
    Some(RunSpeed {
        decode: decode_speed(real, sim)?,
        prefill: ratio(real.prefill_ms, sim.prefill_ms),
        load: ratio(
            per_op(real.load_ms, real.loads).unwrap_or(0.0),
            per_op(sim.load_ms, sim.loads).unwrap_or(0.0),
        ),
    })
}

/// `profile` with its engine costs scaled by `speed`.
pub(crate) fn apply_speed(speed: RunSpeed, profile: &mut Profile) {
    profile.accelerator.engine_overhead *= speed.decode;
    // `engine_overhead` scales prefill too: prefill's own factor replaces decode's.
    let prefill = speed.prefill.map_or(1.0, |p| p / speed.decode);
    let load = speed.load.unwrap_or(1.0);
    for family in &mut profile.families {
        family.prefill_fixed_ms *= prefill;
        family.prefill_per_token_ms *= prefill;
        family.prefill_per_token_sq_ms *= prefill;
        family.load_s *= load;
        family.ctx_create_s *= load;
    }
}

/// The real decode time over what the simulation charged per step for the same steps, family
/// by family and batch size by batch size (so a different mix of families or batch sizes does
/// not count as speed). Reports without per-family counters compare the pool-wide buckets;
/// reports from before the per-batch counters, the mean steps. `None` when either side
/// decoded nothing.
fn decode_speed(real: &ActionTimes, sim: &ActionTimes) -> Option<f64> {
    let mut sums = (0.0, 0.0);
    for (family, by) in &real.decode_by_family {
        if let Some(sim_by) = sim.decode_by_family.get(family) {
            charge_like_for_like(by, sim_by, &mut sums);
        }
    }
    if sums.1 <= 0.0 {
        sums = (0.0, 0.0);
        charge_like_for_like(&real.decode_by_batch, &sim.decode_by_batch, &mut sums);
    }
    let (real_ns, charged_ns) = sums;
    if charged_ns > 0.0 && real_ns > 0.0 {
        return Some(real_ns / charged_ns);
    }
    let mean = |ms: f64, steps: u64| (steps > 0 && ms > 0.0).then(|| ms / as_f64(steps));
    Some(mean(real.decode_ms, real.decode_steps)? / mean(sim.decode_ms, sim.decode_steps)?)
}

/// Adds to `(real ns, charged ns)` every bucket both sides stepped in: the real time, and the
/// real steps at the simulated mean step of that bucket.
fn charge_like_for_like(real: &DecodeByBatch, sim: &DecodeByBatch, sums: &mut (f64, f64)) {
    for bucket in 0..tidepool_pool::DECODE_BATCH_BUCKETS {
        let (steps, sim_steps) = (real.steps[bucket], sim.steps[bucket]);
        if steps > 0 && sim_steps > 0 {
            sums.0 += as_f64(real.ns[bucket]);
            sums.1 += as_f64(steps) * as_f64(sim.ns[bucket]) / as_f64(sim_steps);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn run_speed_compares_like_with_like() {
        let mut real = ActionTimes::default();
        let mut sim = ActionTimes::default();
        // Real: 10 steps of batch 1 at 12 ms, 10 of batch 2 at 30 ms; simulated: batch 1 at
        // 10 ms, batch 2 at 20 ms but in another mix (and a batch-3 bucket the run never had).
        real.decode_by_batch.steps[0] = 10;
        real.decode_by_batch.ns[0] = 120_000_000;
        real.decode_by_batch.steps[1] = 10;
        real.decode_by_batch.ns[1] = 300_000_000;
        sim.decode_by_batch.steps[0] = 30;
        sim.decode_by_batch.ns[0] = 300_000_000;
        sim.decode_by_batch.steps[1] = 5;
        sim.decode_by_batch.ns[1] = 100_000_000;
        sim.decode_by_batch.steps[2] = 4;
        sim.decode_by_batch.ns[2] = 400_000_000;
        // 420 ms real against 10 × 10 + 10 × 20 = 300 ms charged for the same steps.
        let speed = decode_speed(&real, &sim).unwrap();
        assert!((speed - 1.4).abs() < 1e-12, "{speed}");
        // Per family when both sides have it: the real run stepped batch 1 only in the cheap
        // family at its simulated cost, the simulation mostly in the dear one. Pool-wide buckets
        // would call that a faster engine (5 ms real vs a 14 ms mean); per family it is ×1.
        let family = |steps: u64, ns: u64| {
            let mut by = DecodeByBatch::default();
            by.steps[0] = steps;
            by.ns[0] = ns;
            by
        };
        let (mut real, mut sim) = (ActionTimes::default(), ActionTimes::default());
        real.decode_by_batch = family(10, 50_000_000);
        real.decode_by_family = BTreeMap::from([("small".to_owned(), family(10, 50_000_000))]);
        sim.decode_by_batch = family(11, 155_000_000);
        sim.decode_by_family = BTreeMap::from([
            ("small".to_owned(), family(1, 5_000_000)),
            ("large".to_owned(), family(10, 150_000_000)),
        ]);
        let speed = decode_speed(&real, &sim).unwrap();
        assert!((speed - 1.0).abs() < 1e-12, "{speed}");
        // Older reports (no per-batch counters): the mean steps' ratio.
        let old = |steps, ms| ActionTimes {
            decode_steps: steps,
            decode_ms: ms,
            ..ActionTimes::default()
        };
        let speed = decode_speed(&old(100, 1500.0), &old(50, 500.0)).unwrap();
        assert!((speed - 1.5).abs() < 1e-12, "{speed}");
        // Nothing decoded on one side: no speed, the profile stays as calibrated.
        assert_eq!(decode_speed(&ActionTimes::default(), &old(50, 500.0)), None);
        assert_eq!(run_speed(&ActionTimes::default(), &old(50, 500.0)), None);
        // Prefill: all of it (same prompts); loads: per load; absent where a side had none.
        let mut real = old(100, 1500.0);
        real.prefills = 4;
        real.prefill_ms = 900.0;
        real.loads = 2;
        real.load_ms = 500.0;
        let mut sim = old(50, 500.0);
        sim.prefills = 6;
        sim.prefill_ms = 1000.0;
        let speed = run_speed(&real, &sim).unwrap();
        assert_eq!(speed.load, None, "{speed:?}");
        assert!(
            speed.prefill.is_some_and(|p| (p - 0.9).abs() < 1e-12),
            "{speed:?}"
        );
        sim.loads = 1;
        sim.load_ms = 200.0;
        let speed = run_speed(&real, &sim).unwrap();
        assert!(
            speed.load.is_some_and(|l| (l - 1.25).abs() < 1e-12),
            "{speed:?}"
        );
        assert_eq!(speed.to_string(), "×1.50 / 0.90 / 1.25");
        // Applied: decode through `engine_overhead`, prefill's own factor, loads.
        let mut profile = Profile::load("cpu-devvm").unwrap();
        let before = profile.clone();
        apply_speed(speed, &mut profile);
        let (a, b) = (&profile.families[0], &before.families[0]);
        let k = profile.accelerator.engine_overhead / before.accelerator.engine_overhead;
        assert!((k - 1.5).abs() < 1e-12, "{k}");
        let prefill = a.prefill_per_token_ms * k / b.prefill_per_token_ms;
        assert!((prefill - 0.9).abs() < 1e-9, "{prefill}");
        assert!((a.load_s / b.load_s - 1.25).abs() < 1e-9, "{a:?}");
    }
}
