//! Where the engine's time went: the pool's counters of engine actions (prefills, decode steps
//! by batch size and family, loads, KV saves and restores) as a server reports them on
//! `GET /v1/pool`, and the same counters fed by the simulator's cost model.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tidepool_pool::{ActionNs, CostEstimate, DecodeByBatch};

use crate::common::as_f64;
use crate::workload::BenchModel;

/// Adds one model's decode counters to its family's sum.
pub(crate) fn add_to_family(
    by_family: &mut BTreeMap<String, DecodeByBatch>,
    family: &str,
    by: &DecodeByBatch,
) {
    let sum = by_family.entry(family.to_owned()).or_default();
    *sum = sum.saturating_add(by);
}

/// Engine actions by kind: how many, and their summed time in flight in ms. Real (the pool's
/// counters on the server) and simulated (the same counters fed by the cost model) side by side
/// say which cost the simulator gets wrong.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct ActionTimes {
    pub(crate) prefills: u64,
    pub(crate) prefill_ms: f64,
    pub(crate) decode_steps: u64,
    pub(crate) decode_ms: f64,
    pub(crate) loads: u64,
    pub(crate) load_ms: f64,
    pub(crate) evict_ms: f64,
    pub(crate) kv_saves: u64,
    pub(crate) kv_save_ms: f64,
    pub(crate) kv_restores: u64,
    pub(crate) kv_restore_ms: f64,
    /// Decode steps and their time by batch size (absent in older reports).
    #[serde(default)]
    pub(crate) decode_by_batch: DecodeByBatch,
    /// The same per model family (absent in older reports): one batch size costs the families
    /// differently, and the two pools need not mix them alike.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) decode_by_family: BTreeMap<String, DecodeByBatch>,
}

impl ActionTimes {
    pub(crate) fn new(counts: [u64; 5], ns: &ActionNs, decode_by_batch: DecodeByBatch) -> Self {
        let [prefills, decode_steps, loads, kv_saves, kv_restores] = counts;
        let ms = |ns: u64| as_f64(ns) / 1e6;
        Self {
            prefills,
            prefill_ms: ms(ns.prefill),
            decode_steps,
            decode_ms: ms(ns.decode),
            loads,
            load_ms: ms(ns.load),
            evict_ms: ms(ns.evict),
            kv_saves,
            kv_save_ms: ms(ns.kv_save),
            kv_restores,
            kv_restore_ms: ms(ns.kv_restore),
            decode_by_batch,
            decode_by_family: BTreeMap::new(),
        }
    }

    /// The difference of two cumulative readings of the server's counters.
    pub(crate) fn between(before: &CountersView, after: &CountersView) -> Self {
        let d = |a: u64, b: u64| b.saturating_sub(a);
        let ns = after.in_flight_ns.saturating_sub(&before.in_flight_ns);
        let counts = [
            d(before.prefills, after.prefills),
            d(before.decode_steps, after.decode_steps),
            d(before.loads, after.loads),
            d(before.kv_saves, after.kv_saves),
            d(before.kv_restores, after.kv_restores),
        ];
        let by_batch = after
            .decode_by_batch
            .saturating_sub(&before.decode_by_batch);
        Self::new(counts, &ns, by_batch)
    }

    pub(crate) fn busy_s(&self) -> f64 {
        (self.prefill_ms
            + self.decode_ms
            + self.load_ms
            + self.evict_ms
            + self.kv_save_ms
            + self.kv_restore_ms)
            / 1e3
    }
}

/// Mean of `total_ms` over `count` operations, or `–`.
pub(crate) fn per_op(total_ms: f64, count: u64) -> String {
    if count == 0 {
        "–".to_owned()
    } else {
        format!("{:.1}", total_ms / as_f64(count))
    }
}

/// The part of `GET /v1/pool` the bench reads.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct PoolView {
    pub(crate) memory_bytes_max: u64,
    pub(crate) queued: u32,
    pub(crate) models: Vec<PoolModelView>,
    pub(crate) counters: CountersView,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct PoolModelView {
    pub(crate) id: String,
    pub(crate) state: String,
    pub(crate) in_flight: u32,
    pub(crate) last_used_ms_ago: u64,
    pub(crate) estimate: CostEstimate,
    /// Absent from servers older than the field.
    #[serde(default)]
    pub(crate) decode_by_batch: DecodeByBatch,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub(crate) struct CountersView {
    pub(crate) loads: u64,
    pub(crate) evictions: u64,
    pub(crate) kv_saves: u64,
    pub(crate) kv_restores: u64,
    pub(crate) prefills: u64,
    pub(crate) decode_steps: u64,
    pub(crate) in_flight_ns: ActionNs,
    /// Absent from servers older than the field.
    #[serde(default)]
    pub(crate) decode_by_batch: DecodeByBatch,
}

impl PoolView {
    /// The resident models (indices into `models`), least recently used first.
    pub(crate) fn residents(&self, models: &[BenchModel]) -> Vec<u32> {
        let mut resident: Vec<(u64, u32)> = self
            .models
            .iter()
            .filter(|m| m.state == "resident")
            .filter_map(|m| {
                let index = models.iter().position(|b| b.id == m.id)?;
                Some((m.last_used_ms_ago, u32::try_from(index).ok()?))
            })
            .collect();
        resident.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        resident.into_iter().map(|(_, index)| index).collect()
    }

    /// Decode steps by batch size summed per model family.
    pub(crate) fn decode_by_family(
        &self,
        models: &[BenchModel],
    ) -> BTreeMap<String, DecodeByBatch> {
        let mut by_family = BTreeMap::new();
        for view in &self.models {
            if let Some(model) = models.iter().find(|b| b.id == view.id) {
                add_to_family(&mut by_family, &model.family, &view.decode_by_batch);
            }
        }
        by_family
    }

    /// Each model's cost estimate, in `models` order.
    pub(crate) fn estimates(&self, models: &[BenchModel]) -> Vec<Option<CostEstimate>> {
        models
            .iter()
            .map(|b| {
                self.models
                    .iter()
                    .find(|m| m.id == b.id)
                    .map(|m| m.estimate)
            })
            .collect()
    }
}
