//! The placement a simulation ended with, as the file the server follows
//! ([`tidepool_core::placement`]): each accelerator's models, instances included.

pub use tidepool_core::placement::{AcceleratorPlacement, PLACEMENT_VERSION, PlacementFile};

use crate::sim::Report;

/// The placement of `report` (its `per_accelerator[].models`), with `source` saying where it
/// came from.
pub fn placement_file(report: &Report, source: String) -> PlacementFile {
    PlacementFile {
        version: PLACEMENT_VERSION,
        source,
        accelerator: report
            .per_accelerator
            .iter()
            .map(|a| AcceleratorPlacement {
                index: a.accelerator,
                models: a.models.clone(),
            })
            .collect(),
    }
}

/// The placement of a plan's answer: `token`'s if it has one, else `swap-lru`'s, else
/// `dedicated`'s (`None`: no policy reached the target).
pub fn plan_placement_file(report: &crate::PlanReport) -> Option<PlacementFile> {
    use tidepool_core::PoolPolicy;
    let chosen = [
        PoolPolicy::Token,
        PoolPolicy::SwapLru,
        PoolPolicy::Dedicated,
    ]
    .iter()
    .find_map(|&p| {
        report
            .answers
            .iter()
            .find(|a| a.policy == p && a.accelerators.is_some())
    })?;
    let name = serde_json::to_value(chosen.policy)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    Some(PlacementFile {
        version: PLACEMENT_VERSION,
        source: format!(
            "tidepool plan: {name} on {} accelerators of the {} profile, {:.1} % token-deadline attainment at TTFT {} ms / TBT {} ms",
            chosen.per_accelerator.len(),
            report.profile,
            chosen.attainment * 100.0,
            report.ttft_slo_ms,
            report.tbt_slo_ms
        ),
        accelerator: chosen
            .per_accelerator
            .iter()
            .zip(0_u32..)
            .map(|(models, index)| AcceleratorPlacement {
                index,
                models: models.clone(),
            })
            .collect(),
    })
}
