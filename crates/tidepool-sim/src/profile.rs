//! Cost-model profiles (TOML): one accelerator kind plus model families with their measured
//! cost curves. Two ship built in (`h100`, `cpu-devvm`); `tidepool bench calibrate` writes files
//! of the same format.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tidepool_core::ModelId;
use tidepool_pool::{CostEstimate, ModelSpec};

use crate::SimError;

/// Longest per-batch decode table a family may hold ([`Family::decode_batch_ms`]).
pub const DECODE_TABLE_BATCH_MAX: usize = 32;

/// The GPU family built from the H100 measurements (sources inside the file).
pub const H100_TOML: &str = include_str!("../profiles/h100.toml");
/// The hand-written CPU profile of the dev VM (design note §6.2).
pub const CPU_DEVVM_TOML: &str = include_str!("../profiles/cpu-devvm.toml");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub name: String,
    pub description: String,
    pub accelerator: Accelerator,
    pub families: Vec<Family>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Accelerator {
    pub memory_bytes: u64,
    pub kv_saved_bytes_max: u64,
    pub saved_kv_in_memory_budget: bool,
    pub overlap_transfers: bool,
    pub h2d_bytes_per_s: f64,
    pub d2h_bytes_per_s: f64,
    pub kv_fixed_s: f64,
    /// Multiplier on prefill and decode times (serving engine over raw forward pass).
    pub engine_overhead: f64,
    /// KV paged from one pool shared by the resident models (vLLM, Aegaeon): a resident model
    /// costs its weights and fixed buffers, and each sequence in a context its own KV
    /// (`PoolConfig::kv_paged`). Off: each model's full KV capacity is allocated with it
    /// (llama.cpp, every CPU profile).
    #[serde(default)]
    pub kv_paged: bool,
}

/// One model shape and its costs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Family {
    pub name: String,
    /// Relative weight in the market's model mix.
    pub share: u32,
    pub weights_bytes: u64,
    pub kv_bytes_per_token: u64,
    pub seqs_max: u32,
    pub seq_tokens_max: u32,
    pub ctx_fixed_bytes: u64,
    pub prefill_fixed_ms: f64,
    pub prefill_per_token_ms: f64,
    pub prefill_per_token_sq_ms: f64,
    pub decode_fixed_ms: f64,
    pub decode_per_seq_ms: f64,
    pub decode_per_1k_ctx_ms: f64,
    /// Measured decode step at batch 1, 2, … (index 0 is batch 1) with no context, in ms. Where
    /// set it replaces `decode_fixed_ms + decode_per_seq_ms · B` up to its length (the context
    /// term still adds); past its end the step grows by `decode_per_seq_ms` per sequence. CPU
    /// kernels are not linear in the batch (on the dev VM Gemma-3 steps slower at batch 3 than
    /// at 4, and a batch of 1 costs less than the line through batches 1–4 says), so `tidepool
    /// bench calibrate` writes one value per measured batch size. At most
    /// [`DECODE_TABLE_BATCH_MAX`] entries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub decode_batch_ms: Vec<f64>,
    /// Measured cost of one rider — a decoding sequence's token in a prefill's batch
    /// (docs/pool.md §3.1) — besides its context term, in ms. Unset: `decode_per_seq_ms`, the
    /// line's marginal cost of one more sequence in a decode step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill_rider_ms: Option<f64>,
    pub load_s: f64,
    pub ctx_create_s: f64,
    pub unload_s: f64,
    /// The phases of one switch as `tidepool bench calibrate` measured them (a record: the
    /// simulator charges `load_s + ctx_create_s` and `unload_s`). Absent in older profiles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch: Option<SwitchPhases>,
}

/// One switch of a model on the real engine, phase by phase, in seconds and bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchPhases {
    /// `llama_model_load_from_file`: map and read the GGUF, repack weights.
    pub weights_s: f64,
    /// Of `weights_s`: the repack into the CPU's preferred layout.
    pub repack_s: f64,
    /// `llama_init_from_model`: KV allocation and clearing, compute-buffer reservation.
    pub context_s: f64,
    /// The first step on a fresh context beyond the same step warm.
    pub first_step_s: f64,
    /// Freeing context and weights.
    pub evict_s: f64,
    /// Saving, then restoring, one sequence state of `kv_state_bytes`.
    pub kv_save_s: f64,
    pub kv_restore_s: f64,
    pub kv_state_bytes: u64,
    /// Resident memory a loaded model adds beyond weights and KV cells (compute buffers, file
    /// pages of repacked weights).
    pub ctx_extra_bytes: u64,
}

impl Profile {
    /// `h100`, `cpu-devvm`, or a path to a TOML file.
    pub fn load(name_or_path: &str) -> Result<Self, SimError> {
        let (text, path) = match name_or_path {
            "h100" => (H100_TOML.to_owned(), Path::new("h100.toml").to_path_buf()),
            "cpu-devvm" => (
                CPU_DEVVM_TOML.to_owned(),
                Path::new("cpu-devvm.toml").to_path_buf(),
            ),
            other => {
                let path = Path::new(other).to_path_buf();
                let text = std::fs::read_to_string(&path).map_err(|source| SimError::Read {
                    path: path.clone(),
                    source,
                })?;
                (text, path)
            }
        };
        let profile: Self = toml::from_str(&text).map_err(|source| SimError::ProfileParse {
            path,
            source: Box::new(source),
        })?;
        profile.validate()?;
        Ok(profile)
    }

    /// The profile as TOML, in the format [`Profile::load`] reads.
    pub fn to_toml(&self) -> Result<String, SimError> {
        toml::to_string_pretty(self).map_err(|e| SimError::ProfileWrite {
            reason: e.to_string(),
        })
    }

    fn validate(&self) -> Result<(), SimError> {
        let invalid = |field: &str, reason| {
            Err(SimError::ProfileInvalid {
                field: field.into(),
                reason,
            })
        };
        if self.families.is_empty() || self.families.iter().all(|f| f.share == 0) {
            return invalid("families", "need at least one family with a share");
        }
        let a = &self.accelerator;
        if !(a.h2d_bytes_per_s > 0.0 && a.d2h_bytes_per_s > 0.0 && a.engine_overhead > 0.0) {
            return invalid(
                "accelerator",
                "bandwidths and engine_overhead must be positive",
            );
        }
        for f in &self.families {
            if f.seqs_max == 0
                || f.seq_tokens_max < 2
                || ModelId::new(format!("m-{}", f.name)).is_err()
            {
                return invalid(
                    &f.name,
                    "seqs_max ≥ 1, seq_tokens_max ≥ 2, name a lowercase slug",
                );
            }
            let times = [
                f.decode_fixed_ms,
                f.decode_per_seq_ms,
                f.prefill_per_token_ms,
                f.load_s,
            ];
            if times.iter().any(|t| !(t.is_finite() && *t >= 0.0))
                || f.decode_fixed_ms + f.decode_per_seq_ms <= 0.0
            {
                return invalid(&f.name, "costs must be finite, non-negative, decode > 0");
            }
            if f.prefill_rider_ms
                .is_some_and(|t| !(t.is_finite() && t >= 0.0))
            {
                return invalid(&f.name, "prefill_rider_ms must be finite and non-negative");
            }
            if f.decode_batch_ms.len() > DECODE_TABLE_BATCH_MAX
                || f.decode_batch_ms
                    .iter()
                    .any(|t| !(t.is_finite() && *t > 0.0))
            {
                return invalid(
                    &f.name,
                    "decode_batch_ms: at most DECODE_TABLE_BATCH_MAX (32) positive, finite steps",
                );
            }
        }
        Ok(())
    }
}

impl Family {
    /// Bytes while resident: weights, fixed buffers and the full KV capacity.
    pub fn resident_bytes(&self) -> u64 {
        let kv =
            u64::from(self.seqs_max) * u64::from(self.seq_tokens_max) * self.kv_bytes_per_token;
        self.weights_bytes + self.ctx_fixed_bytes + kv
    }
}

/// Costs of one model instance in nanoseconds, precomputed for the hot loop.
#[derive(Debug, Clone, Copy)]
pub struct Costs {
    prefill_fixed_ns: f64,
    prefill_per_token_ns: f64,
    prefill_per_token_sq_ns: f64,
    decode_fixed_ns: f64,
    decode_per_seq_ns: f64,
    decode_per_ctx_token_ns: f64,
    /// One rider's cost in a prefill besides its context (`prefill_rider_ms`, else the
    /// decode line's per-sequence slope).
    rider_ns: f64,
    /// `decode_batch_ms` in ns; only the first `decode_batch_len` entries are set.
    decode_batch_ns: [f64; DECODE_TABLE_BATCH_MAX],
    decode_batch_len: usize,
    pub load_ns: u64,
    pub unload_ns: u64,
    kv_fixed_ns: f64,
    d2h_ns_per_byte: f64,
    h2d_ns_per_byte: f64,
    pub kv_bytes_per_token: u64,
}

impl Costs {
    pub fn new(accelerator: &Accelerator, family: &Family) -> Self {
        let k = accelerator.engine_overhead * 1e6;
        let mut decode_batch_ns = [0.0; DECODE_TABLE_BATCH_MAX];
        for (slot, ms) in decode_batch_ns.iter_mut().zip(&family.decode_batch_ms) {
            *slot = ms * k;
        }
        Self {
            prefill_fixed_ns: family.prefill_fixed_ms * k,
            prefill_per_token_ns: family.prefill_per_token_ms * k,
            prefill_per_token_sq_ns: family.prefill_per_token_sq_ms * k,
            decode_fixed_ns: family.decode_fixed_ms * k,
            decode_per_seq_ns: family.decode_per_seq_ms * k,
            decode_per_ctx_token_ns: family.decode_per_1k_ctx_ms * k / 1000.0,
            rider_ns: family.prefill_rider_ms.unwrap_or(family.decode_per_seq_ms) * k,
            decode_batch_ns,
            decode_batch_len: family.decode_batch_ms.len().min(DECODE_TABLE_BATCH_MAX),
            load_ns: secs_to_ns(family.load_s + family.ctx_create_s),
            unload_ns: secs_to_ns(family.unload_s),
            kv_fixed_ns: accelerator.kv_fixed_s * 1e9,
            d2h_ns_per_byte: 1e9 / accelerator.d2h_bytes_per_s,
            h2d_ns_per_byte: 1e9 / accelerator.h2d_bytes_per_s,
            kv_bytes_per_token: family.kv_bytes_per_token,
        }
    }

    /// One prefill of prompts with `tokens` in total and `tokens_sq` = Σ length².
    pub fn prefill_ns(&self, tokens: f64, tokens_sq: f64) -> u64 {
        f64_ns(
            self.prefill_fixed_ns
                + self.prefill_per_token_ns * tokens
                + self.prefill_per_token_sq_ns * tokens_sq,
        )
    }

    /// One decode step of `batch` sequences holding `ctx_tokens` tokens in total.
    /// A fractional batch (a mean over steps) interpolates between the table's neighbours.
    pub fn decode_ns(&self, batch: f64, ctx_tokens: f64) -> u64 {
        f64_ns(self.decode_batch_step_ns(batch) + self.decode_per_ctx_token_ns * ctx_tokens)
    }

    /// The batch-dependent part of a decode step (no context).
    fn decode_batch_step_ns(&self, batch: f64) -> f64 {
        let table = self
            .decode_batch_ns
            .get(..self.decode_batch_len)
            .unwrap_or(&[]);
        let Some(&last) = table.last() else {
            return self.decode_fixed_ns + self.decode_per_seq_ns * batch;
        };
        let batch = batch.max(1.0);
        let len = as_f64(u64::try_from(table.len()).unwrap_or(u64::MAX));
        if batch >= len {
            return last + self.decode_per_seq_ns * (batch - len);
        }
        let below = batch.floor();
        let fraction = batch - below;
        // `below` is in 1..len here, so both neighbours exist.
        let index = table_index(below);
        let lo = table.get(index.saturating_sub(1)).copied().unwrap_or(last);
        let hi = table.get(index).copied().unwrap_or(last);
        lo + (hi - lo) * fraction
    }

    /// What `riders` decoding sequences holding `ctx_tokens` in total add to a prefill they
    /// ride in: a rider's own cost each (measured, or the decode line's per-sequence slope) plus
    /// the context term — not a step's fixed part, which the prefill's pass over the weights pays.
    pub fn rider_ns(&self, riders: usize, ctx_tokens: u64) -> u64 {
        if riders == 0 {
            return 0;
        }
        let riders = as_f64(u64::try_from(riders).unwrap_or(u64::MAX));
        f64_ns(self.rider_ns * riders + self.decode_per_ctx_token_ns * as_f64(ctx_tokens))
    }

    pub fn save_ns(&self, tokens: u64) -> u64 {
        f64_ns(self.kv_fixed_ns + self.d2h_ns_per_byte * as_f64(tokens * self.kv_bytes_per_token))
    }

    pub fn restore_ns(&self, tokens: u64) -> u64 {
        f64_ns(self.kv_fixed_ns + self.h2d_ns_per_byte * as_f64(tokens * self.kv_bytes_per_token))
    }

    /// The pool's seed estimates for this model.
    pub fn estimate(&self) -> CostEstimate {
        CostEstimate {
            load_ns: self.load_ns,
            decode_step_ns: self.decode_ns(4.0, 4.0 * 1200.0).max(1),
            prefill_ns_per_token: f64_ns(
                self.prefill_per_token_ns + self.prefill_fixed_ns / 1024.0,
            ),
            kv_transfer_ps_per_byte: f64_ns(self.h2d_ns_per_byte * 1000.0),
        }
    }
}

/// A pool model spec for model `id` of `family`; with `kv_paged` its context holds only the
/// fixed buffers (the pool charges KV per sequence).
pub fn model_spec(id: ModelId, family: &Family, costs: &Costs, kv_paged: bool) -> ModelSpec {
    ModelSpec {
        id,
        weights_bytes: family.weights_bytes,
        ctx_bytes: if kv_paged {
            family.ctx_fixed_bytes
        } else {
            family.resident_bytes() - family.weights_bytes
        },
        kv_bytes_per_token: family.kv_bytes_per_token,
        seqs_max: family.seqs_max,
        seq_tokens_max: family.seq_tokens_max,
        pin: false,
        keep_alive_ms: None,
        estimate: costs.estimate(),
    }
}

fn secs_to_ns(s: f64) -> u64 {
    f64_ns(s * 1e9)
}

#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "saturating conversion of a finite, non-negative duration"
)]
pub(crate) fn f64_ns(ns: f64) -> u64 {
    if ns.is_nan() || ns <= 0.0 {
        0
    } else {
        ns.round().min(1e18) as u64
    }
}

/// A whole, positive batch size (a floored `f64` in `1..DECODE_TABLE_BATCH_MAX`) as an index.
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "the caller floors a value it bounded to 1..=DECODE_TABLE_BATCH_MAX"
)]
fn table_index(batch: f64) -> usize {
    batch.clamp(0.0, 1e6) as usize
}

#[expect(
    clippy::cast_precision_loss,
    reason = "token and byte counts far below 2^52"
)]
pub(crate) fn as_f64(value: u64) -> f64 {
    value as f64
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn family(table: Vec<f64>) -> Family {
        Family {
            name: "toy".into(),
            share: 1,
            weights_bytes: 100,
            kv_bytes_per_token: 10,
            seqs_max: 4,
            seq_tokens_max: 512,
            ctx_fixed_bytes: 0,
            prefill_fixed_ms: 0.0,
            prefill_per_token_ms: 1.0,
            prefill_per_token_sq_ms: 0.0,
            decode_fixed_ms: 4.0,
            decode_per_seq_ms: 10.0,
            decode_per_1k_ctx_ms: 2.0,
            decode_batch_ms: table,
            prefill_rider_ms: None,
            load_s: 0.1,
            ctx_create_s: 0.0,
            unload_s: 0.0,
            switch: None,
        }
    }

    /// A 1 GiB accelerator with 1 GB/s transfers and no engine overhead (also used by the
    /// calibration tests).
    pub(crate) fn accelerator() -> Accelerator {
        Accelerator {
            memory_bytes: 1 << 30,
            kv_saved_bytes_max: 0,
            saved_kv_in_memory_budget: true,
            overlap_transfers: false,
            h2d_bytes_per_s: 1e9,
            d2h_bytes_per_s: 1e9,
            kv_fixed_s: 0.0,
            engine_overhead: 1.0,
            kv_paged: false,
        }
    }

    #[test]
    fn without_a_table_the_step_is_linear_in_the_batch() {
        let costs = Costs::new(&accelerator(), &family(Vec::new()));
        assert_eq!(costs.decode_ns(1.0, 0.0), 14_000_000);
        assert_eq!(costs.decode_ns(3.0, 1000.0), 36_000_000);
    }

    #[test]
    fn a_table_sets_each_measured_batch_and_interpolates_between() {
        // Batch 3 slower than batch 4, as Gemma-3 measures on the dev VM.
        let costs = Costs::new(&accelerator(), &family(vec![8.0, 15.0, 50.0, 40.0]));
        assert_eq!(costs.decode_ns(1.0, 0.0), 8_000_000);
        assert_eq!(costs.decode_ns(3.0, 0.0), 50_000_000);
        assert_eq!(costs.decode_ns(4.0, 500.0), 41_000_000);
        assert_eq!(costs.decode_ns(2.5, 0.0), 32_500_000);
        // Below the table's first entry: batch 1; past its end: + decode_per_seq_ms each.
        assert_eq!(costs.decode_ns(0.0, 0.0), 8_000_000);
        assert_eq!(costs.decode_ns(6.0, 0.0), 60_000_000);
        // The engine overhead scales the table like the linear terms.
        let mut slow = accelerator();
        slow.engine_overhead = 2.0;
        let costs = Costs::new(&slow, &family(vec![8.0, 15.0]));
        assert_eq!(costs.decode_ns(2.0, 0.0), 30_000_000);
    }

    #[test]
    fn a_table_round_trips_and_bad_tables_are_refused() {
        let profile = Profile {
            name: "t".into(),
            description: "t".into(),
            accelerator: accelerator(),
            families: vec![family(vec![8.0, 15.0])],
        };
        let text = profile.to_toml().unwrap();
        let back: Profile = toml::from_str(&text).unwrap();
        assert_eq!(back, profile);
        back.validate().unwrap();
        // Profiles written before the table existed still load (the field is optional).
        let old = text.replace("decode_batch_ms = [\n    8.0,\n    15.0,\n]\n", "");
        assert!(!old.contains("decode_batch_ms"), "{old}");
        let old: Profile = toml::from_str(&old).unwrap();
        assert!(old.families[0].decode_batch_ms.is_empty());
        for bad in [
            vec![8.0, 0.0],
            vec![f64::NAN],
            vec![1.0; DECODE_TABLE_BATCH_MAX + 1],
        ] {
            let mut p = profile.clone();
            p.families[0].decode_batch_ms = bad;
            assert!(p.validate().is_err());
        }
    }

    #[test]
    fn a_rider_costs_its_measured_share_or_the_lines_per_sequence_slope() {
        // Unmeasured: decode_per_seq_ms (10 ms) each plus the context term (2 ms / 1k tokens).
        let costs = Costs::new(&accelerator(), &family(Vec::new()));
        assert_eq!(costs.rider_ns(0, 0), 0);
        assert_eq!(costs.rider_ns(3, 1000), 32_000_000);
        // Measured: 1.5 ms each.
        let mut f = family(Vec::new());
        f.prefill_rider_ms = Some(1.5);
        let costs = Costs::new(&accelerator(), &f);
        assert_eq!(costs.rider_ns(2, 500), 4_000_000);
        let profile = Profile {
            name: "t".into(),
            description: "t".into(),
            accelerator: accelerator(),
            families: vec![f],
        };
        let back: Profile = toml::from_str(&profile.to_toml().unwrap()).unwrap();
        assert_eq!(back, profile);
        let mut bad = profile;
        bad.families[0].prefill_rider_ms = Some(-1.0);
        assert!(bad.validate().is_err());
    }
}
