//! `tidepool-sim` owns the discrete-event simulator and capacity planner: it drives the same
//! `tidepool-pool` scheduler as the server, with a cost model in place of the engine and virtual
//! time in place of the clock.
//!
//! It never depends on tokio, the engine or the gateway. Read [`simulate`] first, then
//! [`profile::Profile`] (cost model), [`workload`] (traces and the market generator) and
//! [`plan()`] (fewest accelerators per policy).
#![forbid(unsafe_code)]

mod accel;
pub mod calibrate;
pub mod demand;
pub mod dispatch;
pub mod error;
mod par;
pub mod placement;
pub mod plan;
pub mod profile;
mod run;
mod search;
pub mod sim;
pub mod spec;
pub mod svg;
pub mod workload;

pub use demand::{size, size_under};
pub use dispatch::Dispatcher;
pub use error::SimError;
pub use placement::{PLACEMENT_VERSION, PlacementFile, placement_file, plan_placement_file};
pub use plan::{PlanAnswer, PlanModel, PlanPoint, PlanReport, plan, plan_svg, sim_svg};
pub use profile::Profile;
pub use sim::{
    AcceleratorReport, BatchReport, Demand, Instances, ModelReport, PLACEMENT_MOVES_MAX, Progress,
    Report, SEARCH_SAMPLE_REQUESTS, SimSpec, batch1_load_ns, h100_sweep_knobs, place, simulate,
};
/// The scheduler's knobs: the pool's own struct, with the server's defaults.
pub use tidepool_pool::PoolKnobs;
pub use workload::{
    Arrivals, MarketSpec, Popularity, Request, TraceRow, Workload, market, read_azure_trace,
    read_model_trace,
};

/// The workload of `tidepool bench sim`: `requests` Poisson arrivals over 80 Zipf(1) models at
/// 20 req/s in total, lengths sampled from `rows`. Time it around [`simulate`] with the `token`
/// policy on [`BENCH_ACCELERATORS`] accelerators of the `h100` profile (a healthy load: about
/// 95 % attainment, so the run measures the scheduler, not an ever-growing backlog).
pub const BENCH_ACCELERATORS: u32 = 64;

pub fn bench_workload(
    requests: u64,
    rows: &[TraceRow],
    profile: &Profile,
    seed: u64,
) -> Result<Workload, SimError> {
    let rate_per_s = 20.0;
    let spec = MarketSpec {
        models: 80,
        popularity: Popularity::Zipf { s: 1.0 },
        arrivals: Arrivals::Poisson {
            rate_per_s,
            duration_s: profile::as_f64(requests) / rate_per_s,
        },
        seed,
    };
    market(&spec, rows, profile)
}
