//! What one simulation is asked to do ([`SimSpec`]): the profile, policy, accelerators and
//! knobs, how many instances each model gets ([`Instances`], [`Demand`]) and the placement
//! search's bounds.

use serde::{Deserialize, Serialize};
use tidepool_core::PoolPolicy;
use tidepool_pool::PoolKnobs;

use crate::profile::Profile;

/// Accelerators in one simulation.
pub const ACCELERATORS_MAX: u32 = 4096;
/// Default bound on the placement search's moves (`SimSpec::placement_moves_max`), a bound on
/// planning time: each move tries every model of one accelerator on two others, re-simulating
/// both (on the 40- and 80-model conversation markets the search stopped by itself after at
/// most 14 moves, `PlanPoint::placement_moves`).
pub const PLACEMENT_MOVES_MAX: u32 = 32;
/// Default size of the placement search's sample (`SimSpec::search_sample_requests`): a longer
/// workload is searched on its first this many requests, and the placement found is kept only
/// if it beats the first one on the whole workload.
pub const SEARCH_SAMPLE_REQUESTS: u64 = 50_000;

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
    /// The placement search runs on the workload's first this many requests when it is longer
    /// (0: always on the whole workload); see [`SEARCH_SAMPLE_REQUESTS`].
    pub search_sample_requests: u64,
    /// Stop the placement search once the placement reaches this attainment (`None`: search
    /// until no move helps). The planner sets its target: a probe only has to tell whether its
    /// size can meet it.
    pub search_until_attainment: Option<f64>,
    /// How many instances each model gets.
    pub instances: Instances,
    /// The initial placement (the accelerators of each market model's instances, in market
    /// order) instead of [`place`]'s, e.g. an earlier report's to check it on other traffic.
    /// It sets the instance counts too.
    pub placement: Option<Vec<Vec<u32>>>,
}

/// How many instances (accelerators holding it) each model gets; never more than the
/// accelerators.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Instances {
    /// One each: a model lives on one accelerator.
    One,
    /// Each model as many as it needs alone ([`crate::demand::size`], on the search sample):
    /// the fewest whole accelerators on which its own traffic reaches `target_attainment`.
    Sized { target_attainment: f64 },
    /// Counts (and predicted loads) sized beforehand, e.g. by the planner on the whole trace.
    Given(Demand),
}

/// Per market model: its instances and what they reached alone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Demand {
    /// The attainment each model had to reach on its own traffic.
    pub target_attainment: f64,
    /// The fewest instances, each a whole `dedicated` accelerator, on which the model's
    /// requests (split by [`crate::dispatch::Dispatcher`]) reach the target; at most the bound
    /// the sizing was given (then `attainment` is below the target).
    pub instances: Vec<u32>,
    /// The model's attainment on that many accelerators.
    pub attainment: Vec<f64>,
    /// Compute-busy time of the model on its `instances` accelerators of its own, summed (not
    /// on one accelerator: a model hotter than one would saturate it and hide its load): its
    /// predicted load, which the first placement balances.
    pub busy_ns: Vec<u64>,
}

impl Demand {
    /// Every model reached the target within the bound.
    pub fn met(&self) -> bool {
        self.attainment.iter().all(|&a| a >= self.target_attainment)
    }

    /// Accelerators of the `dedicated` baseline: the sum of the instances.
    pub fn accelerators(&self) -> u32 {
        self.instances
            .iter()
            .fold(0_u32, |sum, &k| sum.saturating_add(k))
    }
}
