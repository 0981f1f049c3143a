//! The placement search: after the first placement, move one model instance at a time off the
//! accelerator (holding two or more instances) that misses the most tokens onto one of the two
//! that miss the fewest, keeping the move that lowers the missed tokens of the accelerators it
//! changes the most, until no move helps or the bound is reached.
//!
//! With each model's instance count fixed, an accelerator's simulation depends only on which
//! instances it holds ([`AccKey`]): a trial re-simulates only the accelerators whose holding
//! changes, and every result is cached by that key, so a holding met again (the source
//! accelerator without the moved instance is the same for both targets; a move's winner was
//! already simulated as a trial) costs nothing. The trials one move needs run on every core,
//! and the move is chosen afterwards in trial order, so the result is the same on any number
//! of cores and equal to re-simulating every accelerator for every trial.

use std::collections::{BTreeMap, BTreeSet};

use crate::SimError;
use crate::accel::{AccKey, Routed, acc_u32, keys, missed};
use crate::spec::SimSpec;
use crate::workload::Workload;

/// The placement the search ended with and the moves it made.
#[derive(Debug, Clone)]
pub(crate) struct Found {
    pub(crate) placement: Vec<Vec<u32>>,
    pub(crate) moves: u32,
}

/// One trial: model `model`'s instance moves from `from` to `to`; `changed` are the
/// accelerators whose holding changes (the two, and the model's other accelerators if the
/// instances' order changes) with their new keys.
struct Trial {
    model: usize,
    accs: Vec<u32>,
    changed: Vec<(usize, AccKey)>,
}

/// Searches from `start` on `workload` (instance counts `instances`, fixed).
pub(crate) fn improve(
    spec: &SimSpec,
    workload: &Workload,
    instances: &[u32],
    start: &[Vec<u32>],
) -> Result<Found, SimError> {
    let n = usize::try_from(spec.accelerators).unwrap_or(1);
    let routed = Routed::new(spec, workload, instances);
    let mut cache: BTreeMap<AccKey, u64> = BTreeMap::new();
    let mut placement = start.to_vec();
    let mut current = keys(&placement, n);
    fill(&routed, &mut cache, current.iter())?;
    let mut moves = 0;
    let owed: u64 = workload
        .requests
        .iter()
        .map(|r| u64::from(r.output_tokens))
        .sum();
    let enough_missed = spec.search_until_attainment.map(|target| {
        crate::profile::f64_ns((1.0 - target.clamp(0.0, 1.0)) * crate::profile::as_f64(owed))
    });
    while moves < spec.placement_moves_max {
        let miss: Vec<u64> = current.iter().map(|k| cached(&cache, k)).collect();
        if enough_missed.is_some_and(|enough| miss.iter().sum::<u64>() <= enough) {
            break;
        }
        let Some(from) = (0..n)
            .filter(|&a| miss[a] > 0 && current[a].len() >= 2)
            .max_by_key(|&a| (miss[a], std::cmp::Reverse(a)))
        else {
            break;
        };
        let mut targets: Vec<usize> = (0..n).filter(|&a| a != from).collect();
        targets.sort_by_key(|&a| (miss[a], a));
        targets.truncate(2);
        let trials: Vec<Trial> = current[from]
            .iter()
            .flat_map(|&(m, _)| targets.iter().map(move |&to| (m, to)))
            .filter_map(|(m, to)| trial(&placement, &current, m, from, to))
            .collect();
        fill(
            &routed,
            &mut cache,
            trials.iter().flat_map(|t| t.changed.iter().map(|(_, k)| k)),
        )?;
        let mut best: Option<(u64, &Trial)> = None;
        for t in &trials {
            let before: u64 = t.changed.iter().map(|(a, _)| miss[*a]).sum();
            let after: u64 = t.changed.iter().map(|(_, k)| cached(&cache, k)).sum();
            let gain = before.saturating_sub(after);
            if gain > 0 && best.is_none_or(|(g, _)| gain > g) {
                best = Some((gain, t));
            }
        }
        let Some((_, t)) = best else {
            break;
        };
        placement[t.model].clone_from(&t.accs);
        for (a, key) in &t.changed {
            current[*a].clone_from(key);
        }
        moves += 1;
    }
    Ok(Found { placement, moves })
}

/// The trial moving `model`'s instance on `from` to `to`, unless `to` holds one already.
fn trial(
    placement: &[Vec<u32>],
    current: &[AccKey],
    model: u32,
    from: usize,
    to: usize,
) -> Option<Trial> {
    let m = usize::try_from(model).ok()?;
    let old = placement.get(m)?;
    if old.contains(&acc_u32(to)) {
        return None;
    }
    let mut accs: Vec<u32> = old
        .iter()
        .map(|&a| if a == acc_u32(from) { acc_u32(to) } else { a })
        .collect();
    accs.sort_unstable();
    let touched: BTreeSet<u32> = old.iter().chain(&accs).copied().collect();
    let changed = touched
        .into_iter()
        .filter_map(|a| {
            let a = usize::try_from(a).ok()?;
            let mut key: AccKey = current
                .get(a)?
                .iter()
                .copied()
                .filter(|&(other, _)| other != model)
                .collect();
            if let Some(slot) = accs.iter().position(|&x| x == acc_u32(a)) {
                key.push((model, acc_u32(slot)));
                key.sort_unstable();
            }
            (key != current[a]).then_some((a, key))
        })
        .collect();
    Some(Trial {
        model: m,
        accs,
        changed,
    })
}

/// Missed tokens of a holding (nothing held: none).
fn cached(cache: &BTreeMap<AccKey, u64>, key: &AccKey) -> u64 {
    if key.is_empty() {
        return 0;
    }
    cache.get(key).copied().unwrap_or(u64::MAX / 4096)
}

/// Simulates (on every core) the holdings in `keys` not cached yet, and caches their missed
/// tokens.
fn fill<'k>(
    routed: &Routed<'_>,
    cache: &mut BTreeMap<AccKey, u64>,
    keys: impl Iterator<Item = &'k AccKey>,
) -> Result<(), SimError> {
    let needed: Vec<&AccKey> = keys
        .filter(|k| !k.is_empty() && !cache.contains_key(*k))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    // The accelerator index does not change a simulation; 0 stands for any.
    let results = crate::par::map(&needed, |key| routed.run(0, key));
    for (key, result) in needed.into_iter().zip(results) {
        cache.insert(key.clone(), missed(result?.as_ref()));
    }
    Ok(())
}
