//! The phases of a model switch as the accelerator thread measured them: for each model, the
//! last load's `weights` (`llama_model_load_from_file`) and `context` (`llama_init_from_model`)
//! times, the extra time of the first step on the fresh context, and the last eviction, KV save
//! and KV restore. `GET /v1/pool` shows them next to the start-up calibration's figures, and
//! each one is also recorded in the `tidepool_pool_switch_seconds{phase}` histogram.

use tidepool_engine::multi::{Calibration, FirstStep};

/// One model's last switch, phase by phase, in nanoseconds (0: not measured yet).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SwitchPhases {
    /// Weights mapped, read and repacked.
    pub weights_ns: u64,
    /// KV allocated and cleared, compute buffers reserved.
    pub context_ns: u64,
    /// The first `llama_decode` after the load, beyond what the calibration says a warm step of
    /// as many tokens costs (an estimate: the warm cost of that exact batch is not measured).
    pub first_step_ns: u64,
    /// That first `llama_decode` as measured, and its tokens.
    pub first_step_raw_ns: u64,
    pub first_step_tokens: u32,
    /// Context and weights freed.
    pub evict_ns: u64,
    /// One sequence's state out of its slot, and its bytes.
    pub kv_save_ns: u64,
    pub kv_save_bytes: u64,
    /// One sequence's state back into a slot (or recomputed).
    pub kv_restore_ns: u64,
}

/// A phase of a switch: the `phase` label of `tidepool_pool_switch_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Weights,
    Context,
    FirstStep,
    Evict,
    KvSave,
    KvRestore,
}

impl Phase {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Weights => "weights",
            Self::Context => "context",
            Self::FirstStep => "first_step",
            Self::Evict => "evict",
            Self::KvSave => "kv_save",
            Self::KvRestore => "kv_restore",
        }
    }
}

/// What a warm step of `first.tokens` tokens costs by the calibration: a decode step of its
/// batch for a few tokens, the per-token prefill cost for a prompt, whichever is more.
pub(crate) fn first_step_extra_ns(first: FirstStep, calibration: &Calibration) -> u64 {
    let warm = calibration
        .decode_step_ns
        .max(u64::from(first.tokens).saturating_mul(calibration.prefill_ns_per_token));
    first.ns.saturating_sub(warm)
}
