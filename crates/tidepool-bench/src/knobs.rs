//! The pool's scheduler knobs on the command line: one flag per [`PoolKnobs`] field, each
//! optional, applied on top of the knobs the command starts from (the server's defaults, or a
//! `tidepool.toml`'s `[pool]` as `tidepool serve` resolves it). Flattened into `tidepool sim`
//! and `tidepool plan`.

use tidepool_pool::PoolKnobs;

/// Flags that override single [`PoolKnobs`]; unset flags keep the starting value. A boolean
/// flag alone means `true`; `--hol-blocking false` turns one off that a file turned on.
#[derive(Debug, Default, clap::Args)]
pub(crate) struct KnobArgs {
    /// Time-to-first-token SLO, in ms (default: the server's, `[pool] ttft_slo_ms`).
    #[arg(long, env = "TIDEPOOL_SIM_TTFT_SLO_MS")]
    pub(crate) ttft_slo_ms: Option<u64>,
    /// Time-between-tokens SLO, in ms.
    #[arg(long, env = "TIDEPOOL_SIM_TBT_SLO_MS")]
    pub(crate) tbt_slo_ms: Option<u64>,
    /// Requests waiting for their prefill per accelerator; past it a request is refused.
    #[arg(long, env = "TIDEPOOL_SIM_ADMISSION_QUEUE_LEN_MAX")]
    pub(crate) admission_queue_len_max: Option<u32>,
    /// Requests of one model prefilled together.
    #[arg(long, env = "TIDEPOOL_SIM_PREFILL_GROUP_LEN_MAX")]
    pub(crate) prefill_group_len_max: Option<u32>,
    /// Prompt tokens in one prefill action.
    #[arg(long, env = "TIDEPOOL_SIM_PREFILL_TOKENS_MAX")]
    pub(crate) prefill_tokens_max: Option<u32>,
    /// Decode steps per turn when switching is free (and the floor otherwise).
    #[arg(long, env = "TIDEPOOL_SIM_DECODE_STEPS_MIN")]
    pub(crate) decode_steps_min: Option<u32>,
    /// Ceiling on decode steps per turn.
    #[arg(long, env = "TIDEPOOL_SIM_DECODE_STEPS_MAX")]
    pub(crate) decode_steps_max: Option<u32>,
    /// `token`: the longest turn the quota formula hands out, in ms.
    #[arg(long, env = "TIDEPOOL_SIM_TURN_QUOTA_MS_MAX")]
    pub(crate) turn_quota_ms_max: Option<u64>,
    /// `token` on a CPU profile: how long a request waits for a model to go idle before its
    /// load may preempt one with work, in ms.
    #[arg(long, env = "TIDEPOOL_SIM_SWITCH_WAIT_MS_MAX")]
    pub(crate) switch_wait_ms_max: Option<u64>,
    /// `token` admission: hold requests while predicted α (×1000) exceeds this
    /// (4294967295 = off, the default).
    #[arg(long, env = "TIDEPOOL_SIM_ALPHA_ADMIT_PERMILLE_MAX")]
    pub(crate) alpha_admit_permille_max: Option<u32>,
    /// `swap-lru`: the oldest waiting request blocks the rest (Ollama).
    #[arg(long, env = "TIDEPOOL_SIM_HOL_BLOCKING", num_args = 0..=1, default_missing_value = "true")]
    pub(crate) hol_blocking: Option<bool>,
    /// `token`: a request of a cold model waits until its TTFT is at risk or nothing decodes.
    #[arg(long, env = "TIDEPOOL_SIM_PREFILL_COLD_LAZY", num_args = 0..=1, default_missing_value = "true")]
    pub(crate) prefill_cold_lazy: Option<bool>,
    /// `token`: within a round, turns of resident models run before turns that need a load.
    #[arg(long, env = "TIDEPOOL_SIM_ROUND_RESIDENT_FIRST", num_args = 0..=1, default_missing_value = "true")]
    pub(crate) round_resident_first: Option<bool>,
    /// A prefill carries its model's decoding sequences, one token each, at the profile's
    /// rider cost.
    #[arg(long, env = "TIDEPOOL_SIM_PREFILL_RIDERS", num_args = 0..=1, default_missing_value = "true")]
    pub(crate) prefill_riders: Option<bool>,
}

impl KnobArgs {
    /// `knobs` with every given flag applied.
    pub(crate) fn apply(&self, knobs: PoolKnobs) -> PoolKnobs {
        PoolKnobs {
            ttft_slo_ms: self.ttft_slo_ms.unwrap_or(knobs.ttft_slo_ms),
            tbt_slo_ms: self.tbt_slo_ms.unwrap_or(knobs.tbt_slo_ms),
            admission_queue_len_max: self
                .admission_queue_len_max
                .unwrap_or(knobs.admission_queue_len_max),
            prefill_group_len_max: self
                .prefill_group_len_max
                .unwrap_or(knobs.prefill_group_len_max),
            prefill_tokens_max: self.prefill_tokens_max.unwrap_or(knobs.prefill_tokens_max),
            decode_steps_min: self.decode_steps_min.unwrap_or(knobs.decode_steps_min),
            decode_steps_max: self.decode_steps_max.unwrap_or(knobs.decode_steps_max),
            turn_quota_ms_max: self.turn_quota_ms_max.unwrap_or(knobs.turn_quota_ms_max),
            switch_wait_ms_max: self.switch_wait_ms_max.unwrap_or(knobs.switch_wait_ms_max),
            alpha_admit_permille_max: self
                .alpha_admit_permille_max
                .unwrap_or(knobs.alpha_admit_permille_max),
            hol_blocking: self.hol_blocking.unwrap_or(knobs.hol_blocking),
            prefill_cold_lazy: self.prefill_cold_lazy.unwrap_or(knobs.prefill_cold_lazy),
            round_resident_first: self
                .round_resident_first
                .unwrap_or(knobs.round_resident_first),
            prefill_riders: self.prefill_riders.unwrap_or(knobs.prefill_riders),
            batch_queue_max: knobs.batch_queue_max,
        }
    }
}
