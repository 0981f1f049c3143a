//! [`PoolKnobs`]: every scheduler knob of the pool — the SLOs the `token` policy plans for, the
//! queue and prefill bounds, the decode-turn bounds and the optional orderings — with **one**
//! default. The server reads it from the `[pool]` section of `tidepool.toml` (core embeds it),
//! the simulator and the planner take it from the same section or from these defaults, and the
//! benchmarks build it from their flags; so a plan is made for the knobs the server runs.
//!
//! What the engine or accelerator is (transfers beside compute, paged KV, saved states in the
//! same memory) is not a knob: it lives on [`PoolConfig`](crate::PoolConfig), set from the
//! engine's capabilities on a server and from the profile's `[accelerator]` in the simulator.

use serde::{Deserialize, Serialize};

/// The scheduler's knobs. Deserialised from `[pool]` (`deny_unknown_fields`; every key
/// optional, defaulting to [`PoolKnobs::default`]); each limit is named with its unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent on/off knobs of the scheduler, each documented; no state machine"
)]
pub struct PoolKnobs {
    /// Time-to-first-token SLO the `token` policy plans for, in ms.
    pub ttft_slo_ms: u64,
    /// Time-between-tokens SLO, in ms.
    pub tbt_slo_ms: u64,
    /// Requests waiting for their prefill, all models of the pool together; past it a request
    /// is refused (`QueueFull`, 429 with `Retry-After`).
    pub admission_queue_len_max: u32,
    /// Requests of one model prefilled together (Aegaeon's `max_group_size`).
    pub prefill_group_len_max: u32,
    /// Prompt tokens in one prefill action (at least one request always goes).
    pub prefill_tokens_max: u32,
    /// Decode steps of one turn when switching is free, and the floor otherwise.
    pub decode_steps_min: u32,
    /// Ceiling on decode steps of one turn.
    pub decode_steps_max: u32,
    /// `token`: the longest decode turn the quota formula hands out, in ms (Aegaeon's
    /// `max_batch_quota`); where a load stalls compute (no `overlap_transfers`), also the least
    /// time between two loads while resident models have work (docs/pool.md §3.4).
    pub turn_quota_ms_max: u64,
    /// `token`, where a load stalls compute (no `overlap_transfers`): how long a queued request
    /// waits for a model to go idle before its model's load may preempt one with work, in ms.
    /// Below the gateway's `stream_stall_ms_max` (30 s), so a waiting stream gets its model
    /// before the gateway gives up on it (docs/pool.md §3.4).
    pub switch_wait_ms_max: u64,
    /// `token` admission: hold new requests while the predicted round factor α (mean gap /
    /// TBT SLO), in thousandths, would exceed this. `u32::MAX` (the default) disables the
    /// check: in the simulator, holding lowered attainment in every market measured
    /// (docs/bench/sim.md).
    pub alpha_admit_permille_max: u32,
    /// `swap-lru`: Ollama-faithful head-of-line blocking (the oldest request blocks the rest).
    pub hol_blocking: bool,
    /// `token`: a queued request whose model is not resident is prefilled (so its model loaded)
    /// only when its TTFT is at risk or nothing is decoding; until then decode turns and
    /// requests of resident models go first. Where a load stalls compute (CPU), this stops one
    /// new request from evicting models that are mid-generation.
    pub prefill_cold_lazy: bool,
    /// `token`: within a round, turns of resident models run before turns that need a load.
    pub round_resident_first: bool,
    /// A prefill carries its model's decoding sequences as riders: one token each in the
    /// prefill's batch, so they do not stall while a new request's prompt runs. Off by default:
    /// on llama.cpp with a KV stream per sequence a mixed batch is split into equal-length
    /// micro-batches, so a rider costs about a decode step of its own (docs/pool.md §3.1).
    pub prefill_riders: bool,
    /// Batch-class sequences the pool holds at once (queued, running and preempted, all
    /// models); past it a batch request is refused (`BatchQueueFull`). Online requests have
    /// their own bound (`admission_queue_len_max`) and never count here.
    pub batch_queue_max: u32,
}

/// The server's defaults, used by the simulator and the benchmarks too unless overridden.
impl Default for PoolKnobs {
    fn default() -> Self {
        Self {
            ttft_slo_ms: 5_000,
            tbt_slo_ms: 250,
            admission_queue_len_max: 256,
            prefill_group_len_max: 8,
            prefill_tokens_max: 8192,
            decode_steps_min: 16,
            decode_steps_max: 512,
            turn_quota_ms_max: 4_000,
            switch_wait_ms_max: 20_000,
            alpha_admit_permille_max: u32::MAX,
            hol_blocking: false,
            prefill_cold_lazy: false,
            round_resident_first: false,
            prefill_riders: false,
            batch_queue_max: 4096,
        }
    }
}

/// One knob out of range: its key (as in `[pool]`) and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnobProblem {
    pub field: &'static str,
    pub reason: &'static str,
}

impl PoolKnobs {
    /// Every knob out of range, in field order (empty: valid). The configuration reports them
    /// all as `pool.<field>`; [`PoolConfig::validate`](crate::PoolConfig::validate) the first.
    pub fn problems(&self) -> Vec<KnobProblem> {
        let at_least_one = [
            ("ttft_slo_ms", self.ttft_slo_ms),
            ("tbt_slo_ms", self.tbt_slo_ms),
            (
                "admission_queue_len_max",
                self.admission_queue_len_max.into(),
            ),
            ("prefill_group_len_max", self.prefill_group_len_max.into()),
            ("prefill_tokens_max", self.prefill_tokens_max.into()),
            ("decode_steps_min", self.decode_steps_min.into()),
            ("decode_steps_max", self.decode_steps_max.into()),
            ("turn_quota_ms_max", self.turn_quota_ms_max),
            ("switch_wait_ms_max", self.switch_wait_ms_max),
            ("batch_queue_max", self.batch_queue_max.into()),
        ];
        let mut problems: Vec<KnobProblem> = at_least_one
            .into_iter()
            .filter(|(_, value)| *value == 0)
            .map(|(field, _)| KnobProblem {
                field,
                reason: "must be at least 1",
            })
            .collect();
        if self.decode_steps_min > self.decode_steps_max && self.decode_steps_max > 0 {
            problems.push(KnobProblem {
                field: "decode_steps_min",
                reason: "must be at most decode_steps_max",
            });
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_every_problem_is_named() {
        assert!(PoolKnobs::default().problems().is_empty());
        let bad = PoolKnobs {
            ttft_slo_ms: 0,
            prefill_tokens_max: 0,
            decode_steps_min: 600,
            ..PoolKnobs::default()
        };
        let fields: Vec<&str> = bad.problems().iter().map(|p| p.field).collect();
        assert_eq!(
            fields,
            ["ttft_slo_ms", "prefill_tokens_max", "decode_steps_min"]
        );
    }
}
