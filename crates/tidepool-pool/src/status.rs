//! The read-only view behind `GET /v1/pool`, plus cumulative counters for metrics.

use crate::{ModelId, PoolPolicy};
use serde::{Deserialize, Serialize};

use crate::config::CostEstimate;

/// A model's residency. Transitions: `Cold → Loading → Resident → Evicting → Cold`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Residency {
    Cold,
    Loading,
    Resident,
    Evicting,
}

/// One model in [`PoolStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelStatus {
    pub model: ModelId,
    pub state: Residency,
    pub pinned: bool,
    /// Requests waiting for their prefill (including those held by admission).
    pub queued: u32,
    /// Requests past prefill and not finished (in the context or saved).
    pub in_flight: u32,
    /// Weights + context while not cold, plus this model's saved sequence states.
    pub memory_bytes: u64,
    pub saved_kv_bytes: u64,
    /// When the model last started loading, on the driver's clock.
    pub last_switch_ns: Option<u64>,
    /// When an action on the model last finished (or it was last loaded), on the driver's
    /// clock: the order `swap-lru` evicts in.
    pub last_used_ns: u64,
    /// What the scheduler believes the model costs now: the spec's estimate with
    /// `decode_step_ns` and `load_ns` refined by the timings of finished actions.
    pub estimate: CostEstimate,
    /// This model's decode steps and their time by batch size (its share of
    /// [`PoolCounters::decode_by_batch`]): per model, because one batch size costs different
    /// models differently.
    #[serde(default)]
    pub decode_by_batch: DecodeByBatch,
}

/// Time engine actions were in flight, by kind, in nanoseconds: from the pool handing the
/// action out to its completion event. With `overlap_transfers = false` one action runs at a
/// time, so this is the engine's time per kind; the simulator charges its cost model here, so
/// the two can be compared kind by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionNs {
    pub load: u64,
    pub evict: u64,
    pub kv_save: u64,
    pub kv_restore: u64,
    pub prefill: u64,
    pub decode: u64,
}

impl ActionNs {
    /// Kind by kind sum (e.g. over the accelerators of a simulation).
    #[must_use]
    pub fn saturating_add(&self, other: &Self) -> Self {
        Self {
            load: self.load.saturating_add(other.load),
            evict: self.evict.saturating_add(other.evict),
            kv_save: self.kv_save.saturating_add(other.kv_save),
            kv_restore: self.kv_restore.saturating_add(other.kv_restore),
            prefill: self.prefill.saturating_add(other.prefill),
            decode: self.decode.saturating_add(other.decode),
        }
    }

    /// Kind by kind difference of two cumulative readings (`self` the later one).
    #[must_use]
    pub fn saturating_sub(&self, earlier: &Self) -> Self {
        Self {
            load: self.load.saturating_sub(earlier.load),
            evict: self.evict.saturating_sub(earlier.evict),
            kv_save: self.kv_save.saturating_sub(earlier.kv_save),
            kv_restore: self.kv_restore.saturating_sub(earlier.kv_restore),
            prefill: self.prefill.saturating_sub(earlier.prefill),
            decode: self.decode.saturating_sub(earlier.decode),
        }
    }
}

/// Buckets of [`DecodeByBatch`]: batches of this many sequences and more share the last.
pub const DECODE_BATCH_BUCKETS: usize = 16;

/// Decode steps and the time they took, by batch size (the turn's sequences when it was handed
/// out; a sequence that ends mid-turn leaves its turn in its starting bucket). On the server the
/// time is the engine's, in the simulator the cost model's: the same accounting on both sides,
/// so a step cost the simulator gets wrong shows at the batch size it is wrong for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecodeByBatch {
    /// `steps[b - 1]`: steps of turns that started with `b` sequences.
    pub steps: [u64; DECODE_BATCH_BUCKETS],
    /// `ns[b - 1]`: their summed duration.
    pub ns: [u64; DECODE_BATCH_BUCKETS],
}

impl DecodeByBatch {
    /// Counts a turn of `steps` steps that started with `batch` sequences and took `ns`.
    pub fn record(&mut self, batch: usize, steps: u32, ns: u64) {
        let bucket = batch.clamp(1, DECODE_BATCH_BUCKETS) - 1;
        if let (Some(s), Some(t)) = (self.steps.get_mut(bucket), self.ns.get_mut(bucket)) {
            *s = s.saturating_add(u64::from(steps));
            *t = t.saturating_add(ns);
        }
    }

    /// Bucket by bucket sum.
    #[must_use]
    pub fn saturating_add(&self, other: &Self) -> Self {
        self.zip_with(other, u64::saturating_add)
    }

    /// Bucket by bucket difference of two cumulative readings (`self` the later one).
    #[must_use]
    pub fn saturating_sub(&self, earlier: &Self) -> Self {
        self.zip_with(earlier, u64::saturating_sub)
    }

    fn zip_with(&self, other: &Self, f: fn(u64, u64) -> u64) -> Self {
        let mut out = *self;
        for (a, b) in out.steps.iter_mut().zip(other.steps) {
            *a = f(*a, b);
        }
        for (a, b) in out.ns.iter_mut().zip(other.ns) {
            *a = f(*a, b);
        }
        out
    }
}

/// Cumulative counts since the pool was built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolCounters {
    pub loads: u64,
    pub evictions: u64,
    pub kv_saves: u64,
    pub kv_restores: u64,
    pub prefills: u64,
    pub decode_turns: u64,
    pub decode_steps: u64,
    /// Tokens decoding sequences emitted riding in a prefill's batch (`Action::Prefill::riders`).
    #[serde(default)]
    pub rider_tokens: u64,
    /// Decode turns `token` left out of a round because their cold model's sequences could
    /// wait for the next round (cost-aware switching, docs/pool.md §3.4).
    #[serde(default)]
    pub switches_deferred: u64,
    pub requests_admitted: u64,
    pub requests_finished: u64,
    pub requests_cancelled: u64,
    pub requests_rejected: u64,
    pub in_flight_ns: ActionNs,
    /// Decode steps and their time by batch size.
    #[serde(default)]
    pub decode_by_batch: DecodeByBatch,
    /// Batch-class requests admitted (also counted in `requests_admitted`).
    #[serde(default)]
    pub batch_admitted: u64,
    /// Batch-class requests finished (also counted in `requests_finished`).
    #[serde(default)]
    pub batch_finished: u64,
    /// Batch sequences preempted for online work (cells dropped, recomputed on resume). Not
    /// counted in `kv_saves`, which stays the online policy's own.
    #[serde(default)]
    pub batch_preemptions: u64,
    /// Preempted batch sequences brought back into a context (not counted in `kv_restores`).
    #[serde(default)]
    pub batch_resumes: u64,
    /// Tokens batch sequences emitted (prefills and decode turns).
    #[serde(default)]
    pub batch_tokens: u64,
}

impl PoolCounters {
    /// Field by field sum (e.g. over the accelerators of a simulation).
    #[must_use]
    pub fn saturating_add(&self, other: &Self) -> Self {
        Self {
            loads: self.loads.saturating_add(other.loads),
            evictions: self.evictions.saturating_add(other.evictions),
            kv_saves: self.kv_saves.saturating_add(other.kv_saves),
            kv_restores: self.kv_restores.saturating_add(other.kv_restores),
            prefills: self.prefills.saturating_add(other.prefills),
            decode_turns: self.decode_turns.saturating_add(other.decode_turns),
            decode_steps: self.decode_steps.saturating_add(other.decode_steps),
            rider_tokens: self.rider_tokens.saturating_add(other.rider_tokens),
            switches_deferred: self
                .switches_deferred
                .saturating_add(other.switches_deferred),
            requests_admitted: self
                .requests_admitted
                .saturating_add(other.requests_admitted),
            requests_finished: self
                .requests_finished
                .saturating_add(other.requests_finished),
            requests_cancelled: self
                .requests_cancelled
                .saturating_add(other.requests_cancelled),
            requests_rejected: self
                .requests_rejected
                .saturating_add(other.requests_rejected),
            in_flight_ns: self.in_flight_ns.saturating_add(&other.in_flight_ns),
            decode_by_batch: self.decode_by_batch.saturating_add(&other.decode_by_batch),
            batch_admitted: self.batch_admitted.saturating_add(other.batch_admitted),
            batch_finished: self.batch_finished.saturating_add(other.batch_finished),
            batch_preemptions: self
                .batch_preemptions
                .saturating_add(other.batch_preemptions),
            batch_resumes: self.batch_resumes.saturating_add(other.batch_resumes),
            batch_tokens: self.batch_tokens.saturating_add(other.batch_tokens),
        }
    }
}

/// A snapshot of the whole pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStatus {
    pub now_ns: u64,
    pub policy: PoolPolicy,
    pub memory_bytes_max: u64,
    pub memory_bytes_used: u64,
    pub kv_saved_bytes: u64,
    pub kv_saved_bytes_max: u64,
    /// Online requests waiting for their prefill (batch ones are in `batch`).
    pub queued: u32,
    pub models: Vec<ModelStatus>,
    pub counters: PoolCounters,
    /// Batch-class sequences, counted apart from the online ones above.
    #[serde(default)]
    pub batch: BatchStatus,
}

/// Batch-class sequences now (docs/pool.md §3.7). `ModelStatus::queued` and `in_flight` and
/// `PoolStatus::queued` count online requests only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchStatus {
    /// Waiting for a context slot, never started.
    pub queued: u32,
    /// In a context (prefilling, decoding, or idle there while online work runs elsewhere).
    pub in_flight: u32,
    /// Started, then preempted for online work: waiting to be recomputed into a slot.
    pub preempted: u32,
    /// `PoolKnobs::batch_queue_max`: the bound on the three together.
    pub queue_max: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_turns_are_bucketed_by_batch_and_readings_subtract() {
        let mut by = DecodeByBatch::default();
        by.record(1, 16, 160);
        by.record(3, 4, 120);
        by.record(0, 1, 7); // no sequence: counted as batch 1
        by.record(40, 2, 50); // past the buckets: the last one
        assert_eq!((by.steps[0], by.ns[0]), (17, 167));
        assert_eq!((by.steps[2], by.ns[2]), (4, 120));
        assert_eq!(
            (
                by.steps[DECODE_BATCH_BUCKETS - 1],
                by.ns[DECODE_BATCH_BUCKETS - 1]
            ),
            (2, 50)
        );
        let earlier = by;
        by.record(3, 1, 30);
        let delta = by.saturating_sub(&earlier);
        assert_eq!(delta.steps.iter().sum::<u64>(), 1);
        assert_eq!((delta.steps[2], delta.ns[2]), (1, 30));
        assert_eq!(earlier.saturating_add(&delta), by);
    }
}
