//! Pool configuration: the policy, the budget, what the engine can do, the scheduler's knobs
//! ([`PoolKnobs`]), and one [`ModelSpec`] per served model (sizes plus cost estimates that seed the scheduler's
//! predictions; measured durations refine them at run time).

use serde::{Deserialize, Serialize};

use crate::{ModelId, PoolError, PoolKnobs, PoolPolicy};

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

/// The pool's configuration; validated by [`PoolConfig::validate`] when the pool is built: the
/// policy, the budget, what the engine can do, the scheduler's [`PoolKnobs`] and the models.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub policy: PoolPolicy,
    /// Cap on weights + contexts (+ saved KV when `saved_kv_in_memory_budget`) + reservations.
    /// `dedicated` raises it to the sum of all models at construction.
    pub memory_bytes_max: u64,
    /// Cap on saved sequence states (host memory on a GPU box).
    pub kv_saved_bytes_max: u64,
    /// Engine: saved states count against `memory_bytes_max` too (CPU box: host RAM is the only
    /// pool).
    pub saved_kv_in_memory_budget: bool,
    /// Engine: transfers (load, evict, KV save/restore) run beside compute (a GPU copy engine);
    /// when false at most one engine action is in flight.
    pub overlap_transfers: bool,
    /// Engine: KV is paged from one memory pool shared by the resident models (vLLM's blocks,
    /// Aegaeon's unified KV cache): [`ModelSpec::ctx_bytes`] holds only the compute buffers,
    /// and each sequence holding a context slot is charged its worst-case KV
    /// (`saved_bytes(prompt + max_tokens)`) until it leaves the context (finished or saved).
    /// Off: the context's whole KV capacity is allocated with the model, as llama.cpp does.
    #[serde(default)]
    pub kv_paged: bool,
    /// The scheduler's knobs (SLOs, bounds, orderings).
    #[serde(default)]
    pub knobs: PoolKnobs,
    pub models: Vec<ModelSpec>,
}

impl PoolConfig {
    /// [`PoolKnobs::default`], a quarter of the budget for saved states inside the budget, no
    /// overlap of transfers and compute, KV allocated with the model (a CPU llama.cpp engine).
    pub fn new(policy: PoolPolicy, memory_bytes_max: u64, models: Vec<ModelSpec>) -> Self {
        Self {
            policy,
            memory_bytes_max,
            kv_saved_bytes_max: memory_bytes_max / 4,
            saved_kv_in_memory_budget: true,
            overlap_transfers: false,
            kv_paged: false,
            knobs: PoolKnobs::default(),
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
        if let Some(problem) = self.knobs.problems().first() {
            return invalid(problem.field, problem.reason);
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

/// The memory budget as `[pool]` sets it: `memory_bytes_max` if given; else, with
/// `memory_models_max = N`, the N largest models' resident bytes plus the saved-state pool;
/// else every model plus the saved-state pool (everything fits). The server applies it to the
/// sizes it measures at start-up, the simulator to its profile's.
pub fn memory_budget(
    memory_bytes_max: Option<u64>,
    memory_models_max: Option<u32>,
    kv_saved_bytes_max: u64,
    models: &[ModelSpec],
) -> u64 {
    if let Some(bytes) = memory_bytes_max {
        return bytes;
    }
    let mut sizes: Vec<u64> = models.iter().map(ModelSpec::resident_bytes).collect();
    sizes.sort_unstable_by(|a, b| b.cmp(a));
    let fitting =
        memory_models_max.map_or(sizes.len(), |n| usize::try_from(n).unwrap_or(usize::MAX));
    sizes
        .iter()
        .take(fitting)
        .sum::<u64>()
        .saturating_add(kv_saved_bytes_max)
}
