//! Pool configuration: the budget, the SLOs the `token` policy plans for, every queue bound, and
//! one [`ModelSpec`] per served model (sizes plus cost estimates that seed the scheduler's
//! predictions; measured durations refine them at run time).

use serde::{Deserialize, Serialize};
use tidepool_core::{ModelId, PoolPolicy};

use crate::PoolError;

/// Upper bound on models in one pool (indexing uses `u32`-sized counts).
pub const MODELS_MAX: usize = 4096;
/// Upper bound on sequences per model context (one decode batch).
pub const SEQS_PER_MODEL_MAX: u32 = 1024;
/// Bytes a saved sequence state carries besides its KV cells (llama.cpp header, rounded up).
pub const SEQ_STATE_HEADER_BYTES: u64 = 4096;

/// One served model as the pool sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub id: ModelId,
    /// Bytes of weights once loaded.
    pub weights_bytes: u64,
    /// Bytes of the model's context: KV capacity (`seqs_max × seq_tokens_max × kv_bytes_per_token`
    /// on llama.cpp, which allocates up front) plus compute buffers. Charged while resident.
    /// With [`PoolConfig::kv_paged`] the compute buffers only: KV is charged per sequence.
    pub ctx_bytes: u64,
    /// KV bytes one token of one sequence occupies (size of a saved state per token).
    pub kv_bytes_per_token: u64,
    /// Sequences the context holds at once (the decode batch limit).
    pub seqs_max: u32,
    /// Prompt plus output tokens one sequence may reach.
    pub seq_tokens_max: u32,
    /// Never evicted once loaded.
    #[serde(default)]
    pub pin: bool,
    /// Evict after this long with no work (scale to zero); `None` = keep until memory is needed.
    #[serde(default)]
    pub keep_alive_ms: Option<u64>,
    /// Cost estimates that seed the scheduler's predictions.
    pub estimate: CostEstimate,
}

impl ModelSpec {
    /// Bytes the model holds while loading, resident or evicting.
    pub fn resident_bytes(&self) -> u64 {
        self.weights_bytes.saturating_add(self.ctx_bytes)
    }

    /// Bytes the model needs with every slot full of the longest sequences: what `dedicated`
    /// reserves, and what must fit the budget for the model to be loadable at all. Equal to
    /// [`Self::resident_bytes`] unless KV is paged.
    pub fn full_bytes(&self, kv_paged: bool) -> u64 {
        if !kv_paged {
            return self.resident_bytes();
        }
        let kv = u64::from(self.seqs_max)
            .saturating_mul(self.saved_bytes(u64::from(self.seq_tokens_max)));
        self.resident_bytes().saturating_add(kv)
    }

    /// Upper bound on the bytes of one saved sequence holding `tokens` tokens.
    pub fn saved_bytes(&self, tokens: u64) -> u64 {
        tokens
            .saturating_mul(self.kv_bytes_per_token)
            .saturating_add(SEQ_STATE_HEADER_BYTES)
    }
}

/// Predicted durations, in nanoseconds. The pool refines `decode_step_ns` and `load_ns` from the
/// timings carried by completion events (exponential average, weight 1/8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CostEstimate {
    /// Weights in plus context creation.
    pub load_ns: u64,
    /// One decode step of a typical batch.
    pub decode_step_ns: u64,
    /// Prefill cost per prompt token.
    pub prefill_ns_per_token: u64,
    /// Saving or restoring one KV byte, in picoseconds (1 ps/byte = 1 TB/s).
    pub kv_transfer_ps_per_byte: u64,
}

/// The pool's configuration; validated by [`PoolConfig::validate`] when the pool is built.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent on/off knobs of the scheduler, each documented; no state machine"
)]
pub struct PoolConfig {
    pub policy: PoolPolicy,
    /// Cap on weights + contexts (+ saved KV when `saved_kv_in_memory_budget`) + reservations.
    /// `dedicated` raises it to the sum of all models at construction.
    pub memory_bytes_max: u64,
    /// Cap on saved sequence states (host memory on a GPU box).
    pub kv_saved_bytes_max: u64,
    /// Saved states count against `memory_bytes_max` too (CPU box: host RAM is the only pool).
    pub saved_kv_in_memory_budget: bool,
    /// Transfers (load, evict, KV save/restore) run beside compute (a GPU copy engine); when
    /// false at most one engine action is in flight.
    pub overlap_transfers: bool,
    pub ttft_slo_ms: u64,
    pub tbt_slo_ms: u64,
    /// Requests waiting for their prefill, all models together; past it: `QueueFull`.
    pub admission_queue_len_max: u32,
    /// Requests of one model prefilled together (Aegaeon's `max_group_size`).
    pub prefill_group_len_max: u32,
    /// Prompt tokens in one prefill action (at least one request always goes).
    pub prefill_tokens_max: u32,
    /// Decode steps of one turn when switching is free, and the floor otherwise.
    pub decode_steps_min: u32,
    /// Ceiling on decode steps of one turn.
    pub decode_steps_max: u32,
    /// Aegaeon's `max_batch_quota`: the longest turn the quota formula hands out.
    pub turn_quota_ms_max: u64,
    /// `token` admission: hold new requests while the predicted round factor α (mean gap /
    /// TBT SLO), in thousandths, would exceed this. `u32::MAX` (the default) disables the
    /// check: in the simulator, holding lowered attainment in every market measured (docs/sim.md).
    pub alpha_admit_permille_max: u32,
    /// `swap-lru`: Ollama-faithful head-of-line blocking (the oldest request blocks the rest).
    pub hol_blocking: bool,
    /// `token`: a queued request whose model is not resident is prefilled (so its model loaded)
    /// only when its TTFT is at risk or nothing is decoding; until then decode turns and
    /// requests of resident models go first. Where a load stalls compute (CPU), this stops one
    /// new request from evicting models that are mid-generation.
    #[serde(default)]
    pub prefill_cold_lazy: bool,
    /// `token`: within a round, turns of resident models run before turns that need a load.
    #[serde(default)]
    pub round_resident_first: bool,
    /// A prefill carries its model's decoding sequences as riders: one token each in the
    /// prefill's batch, so they do not stall while a new request's prompt runs. Off by default:
    /// on llama.cpp with a KV stream per sequence a mixed batch is split into equal-length
    /// micro-batches, so a rider costs about a decode step of its own (docs/pool.md §3.1).
    #[serde(default)]
    pub prefill_riders: bool,
    /// KV is paged from one memory pool shared by the resident models (vLLM's blocks, Aegaeon's
    /// unified KV cache): [`ModelSpec::ctx_bytes`] holds only the compute buffers, and each
    /// sequence holding a context slot is charged its worst-case KV
    /// (`saved_bytes(prompt + max_tokens)`) until it leaves the context (finished or saved).
    /// Off (the default): the context's whole KV capacity is allocated with the model, as
    /// llama.cpp does; the server's llama.cpp backend always runs with it off.
    #[serde(default)]
    pub kv_paged: bool,
    pub models: Vec<ModelSpec>,
}

impl PoolConfig {
    /// Defaults for every knob except the budget and the models.
    pub fn new(policy: PoolPolicy, memory_bytes_max: u64, models: Vec<ModelSpec>) -> Self {
        Self {
            policy,
            memory_bytes_max,
            kv_saved_bytes_max: memory_bytes_max / 4,
            saved_kv_in_memory_budget: true,
            overlap_transfers: false,
            ttft_slo_ms: 10_000,
            tbt_slo_ms: 100,
            admission_queue_len_max: 1024,
            prefill_group_len_max: 8,
            prefill_tokens_max: 8192,
            decode_steps_min: 16,
            decode_steps_max: 512,
            turn_quota_ms_max: 4000,
            alpha_admit_permille_max: u32::MAX,
            hol_blocking: false,
            prefill_cold_lazy: false,
            round_resident_first: false,
            prefill_riders: false,
            kv_paged: false,
            models,
        }
    }

    pub fn validate(&self) -> Result<(), PoolError> {
        let invalid = |field: &str, reason| {
            Err(PoolError::InvalidConfig {
                field: field.into(),
                reason,
            })
        };
        if self.models.is_empty() || self.models.len() > MODELS_MAX {
            return invalid("models", "must hold 1..=4096 models");
        }
        if self.admission_queue_len_max == 0 {
            return invalid("admission_queue_len_max", "must be at least 1");
        }
        if self.prefill_group_len_max == 0 || self.prefill_tokens_max == 0 {
            return invalid("prefill_group_len_max", "prefill limits must be at least 1");
        }
        if self.decode_steps_min == 0 || self.decode_steps_min > self.decode_steps_max {
            return invalid("decode_steps_min", "must be in 1..=decode_steps_max");
        }
        if self.tbt_slo_ms == 0 || self.turn_quota_ms_max == 0 {
            return invalid("tbt_slo_ms", "SLOs and quotas must be positive");
        }
        let mut ids: Vec<&ModelId> = self.models.iter().map(|m| &m.id).collect();
        ids.sort();
        if ids.windows(2).any(|w| w.first() == w.get(1)) {
            return invalid("models", "duplicate model id");
        }
        for model in &self.models {
            if model.seqs_max == 0 || model.seqs_max > SEQS_PER_MODEL_MAX {
                return invalid(
                    &format!("models.{}.seqs_max", model.id),
                    "must be in 1..=1024",
                );
            }
            if model.seq_tokens_max < 2 {
                return invalid(
                    &format!("models.{}.seq_tokens_max", model.id),
                    "must be at least 2",
                );
            }
            if model.estimate.decode_step_ns == 0 {
                return invalid(
                    &format!("models.{}.estimate", model.id),
                    "decode_step_ns must be > 0",
                );
            }
        }
        let pinned: u64 = self
            .models
            .iter()
            .filter(|m| m.pin)
            .map(|m| m.full_bytes(self.kv_paged))
            .sum();
        if self.policy != PoolPolicy::Dedicated && pinned > self.memory_bytes_max {
            return invalid(
                "models.pin",
                "pinned models do not fit memory_bytes_max together",
            );
        }
        Ok(())
    }
}
