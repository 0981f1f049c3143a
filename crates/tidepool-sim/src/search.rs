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
//! of cores and equal to re-simulating every accelerator for every trial. A trial's target
//! accelerator is simulated only until it misses too many tokens for the move to help
//! ([`Missed`]), which leaves the choice unchanged. For the planner's bisection the search may
//! also give up a placement that cannot reach its target at the pace of its last move
//! ([`improve`]'s `give_up`).

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
    /// The search gave up on reaching `SimSpec::search_until_attainment` ([`improve`]'s
    /// `give_up`): a full search might have gone further.
    pub(crate) gave_up: bool,
}

/// One trial: model `model`'s instance moves from `from` to `to`; `changed` are the
/// accelerators whose holding changes (the two, and the model's other accelerators if the
/// instances' order changes) with their new keys.
struct Trial {
    model: usize,
    to: usize,
    accs: Vec<u32>,
    changed: Vec<(usize, AccKey)>,
}

/// What the search knows of a holding's missed tokens. A trial only matters if it lowers the
/// missed tokens, so the accelerator a trial moves an instance onto is simulated with a limit
/// (what it may miss for the trial to gain) and stopped once it reaches it: then only a lower
/// bound is known, enough to discard the trial, and the holding is simulated again if a later
/// trial allows more.
#[derive(Debug, Clone, Copy)]
enum Missed {
    Exact(u64),
    AtLeast(u64),
}

impl Missed {
    /// Known to be below `limit` (`None`: known exactly).
    fn known_for(self, limit: Option<u64>) -> bool {
        match (self, limit) {
            (Self::Exact(_), _) => true,
            (Self::AtLeast(at_least), Some(limit)) => at_least >= limit,
            (Self::AtLeast(_), None) => false,
        }
    }
}

type Cache = BTreeMap<AccKey, Missed>;

/// Searches from `start` on `workload` (instance counts `instances`, fixed). With `give_up`
/// and a target (`SimSpec::search_until_attainment`), the search stops once the moves it has
/// left, each gaining what its last move gained, could not bring the missed tokens down to the
/// target's: the planner's bisection only needs a verdict, and a placement that far from the
/// target is not worth the rest of the search (its answer is confirmed by full searches).
pub(crate) fn improve(
    spec: &SimSpec,
    workload: &Workload,
    instances: &[u32],
    start: &[Vec<u32>],
    give_up: bool,
) -> Result<Found, SimError> {
    let n = usize::try_from(spec.accelerators).unwrap_or(1);
    let routed = Routed::new(spec, workload, instances);
    let mut cache = Cache::new();
    let mut placement = start.to_vec();
    let mut current = keys(&placement, n);
    fill(&routed, &mut cache, current.iter().map(|k| (k, None)))?;
    let mut moves = 0;
    let owed: u64 = workload
        .requests
        .iter()
        .map(|r| u64::from(r.output_tokens))
        .sum();
    let enough_missed = spec.search_until_attainment.map(|target| {
        crate::profile::f64_ns((1.0 - target.clamp(0.0, 1.0)) * crate::profile::as_f64(owed))
    });
    let mut last_gain = u64::MAX;
    let mut gave_up = false;
    while moves < spec.placement_moves_max {
        let miss: Vec<u64> = current.iter().map(|k| exact(&cache, k)).collect();
        let missed_now: u64 = miss.iter().sum();
        if enough_missed.is_some_and(|enough| missed_now <= enough) {
            break;
        }
        let moves_left = u64::from(spec.placement_moves_max - moves);
        if give_up
            && enough_missed
                .is_some_and(|enough| last_gain.saturating_mul(moves_left) < missed_now - enough)
        {
            gave_up = true;
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
        let Some((gain, t)) = best_trial(&routed, &mut cache, &miss, &trials)? else {
            break;
        };
        last_gain = gain;
        placement[t.model].clone_from(&t.accs);
        for (a, key) in &t.changed {
            current[*a].clone_from(key);
        }
        moves += 1;
    }
    Ok(Found {
        placement,
        moves,
        gave_up,
    })
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
        to,
        accs,
        changed,
    })
}

/// The trial that lowers the missed tokens of the accelerators it changes the most (the first
/// of equals), if any does, with what it gains. The holdings a trial leaves behind are simulated first; then each
/// trial's target holding is simulated with the limit below which the trial gains, so a target
/// that misses too much is stopped early. The choice is the one exact figures give: a stopped
/// target's trial could not have gained, and every other figure is exact.
fn best_trial<'t>(
    routed: &Routed<'_>,
    cache: &mut Cache,
    miss: &[u64],
    trials: &'t [Trial],
) -> Result<Option<(u64, &'t Trial)>, SimError> {
    let left = |t: &'t Trial| t.changed.iter().filter(move |(a, _)| *a != t.to);
    fill(
        routed,
        cache,
        trials.iter().flat_map(|t| left(t).map(|(_, k)| (k, None))),
    )?;
    // Per trial: its holdings but the target's summed exactly, and the target's limit.
    let mut limits = Vec::with_capacity(trials.len());
    for t in trials {
        let before: u64 = t.changed.iter().map(|(a, _)| miss[*a]).sum();
        let rest: u64 = left(t).map(|(_, k)| exact(cache, k)).sum();
        let target = t.changed.iter().find(|(a, _)| *a == t.to).map(|(_, k)| k);
        limits.push((
            before,
            rest,
            target,
            before.checked_sub(rest).filter(|&l| l > 0),
        ));
    }
    fill(
        routed,
        cache,
        limits
            .iter()
            .filter_map(|&(_, _, target, limit)| Some((target?, Some(limit?)))),
    )?;
    let mut best: Option<(u64, &Trial)> = None;
    for (t, &(before, rest, target, limit)) in trials.iter().zip(&limits) {
        let Some(limit) = limit else {
            continue;
        };
        let after_target = match target.map(|k| lookup(cache, k)) {
            None => 0,
            Some(Missed::Exact(v)) => v,
            Some(Missed::AtLeast(_)) => continue,
        };
        if after_target >= limit {
            continue;
        }
        let gain = before - rest - after_target;
        if gain > 0 && best.is_none_or(|(g, _)| gain > g) {
            best = Some((gain, t));
        }
    }
    Ok(best)
}

/// What the cache knows of a holding (nothing held: none missed).
fn lookup(cache: &Cache, key: &AccKey) -> Missed {
    if key.is_empty() {
        return Missed::Exact(0);
    }
    cache
        .get(key)
        .copied()
        .unwrap_or(Missed::AtLeast(u64::MAX / 4096))
}

/// Missed tokens of a holding simulated to its end (every holding of the placement is).
fn exact(cache: &Cache, key: &AccKey) -> u64 {
    match lookup(cache, key) {
        Missed::Exact(v) => v,
        Missed::AtLeast(at_least) => {
            debug_assert!(false, "a holding needed exactly was stopped at a limit");
            at_least
        }
    }
}

/// Simulates (on every core) the holdings in `needs` the cache does not know well enough — each
/// with its limit (`None`: to its end; a holding asked for several times gets the highest) —
/// and caches what they missed.
fn fill<'k>(
    routed: &Routed<'_>,
    cache: &mut Cache,
    needs: impl Iterator<Item = (&'k AccKey, Option<u64>)>,
) -> Result<(), SimError> {
    let mut wanted: BTreeMap<&AccKey, Option<u64>> = BTreeMap::new();
    for (key, limit) in needs.filter(|(k, _)| !k.is_empty()) {
        let entry = wanted.entry(key).or_insert(limit);
        *entry = match (*entry, limit) {
            (Some(a), Some(b)) => Some(a.max(b)),
            _ => None,
        };
    }
    let needed: Vec<(&AccKey, Option<u64>)> = wanted
        .into_iter()
        .filter(|(key, limit)| !cache.get(*key).is_some_and(|m| m.known_for(*limit)))
        .collect();
    // The accelerator index does not change a simulation; 0 stands for any.
    let results = crate::par::map(&needed, |&(key, limit)| routed.run_limited(0, key, limit));
    for ((key, _), result) in needed.into_iter().zip(results) {
        let known = match result? {
            None => Missed::Exact(0),
            Some(o) if o.result.stopped => Missed::AtLeast(o.result.missed_tokens),
            Some(o) => Missed::Exact(missed(Some(&o))),
        };
        cache.insert(key.clone(), known);
    }
    Ok(())
}
