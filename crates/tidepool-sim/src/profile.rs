//! Cost-model profiles (TOML): one accelerator kind plus model families with their measured
//! cost curves. Two ship built in (`h100`, `cpu-devvm`); `tidepool bench calibrate` writes files
//! of the same format.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tidepool_core::ModelId;
use tidepool_pool::{CostEstimate, ModelSpec};

use crate::SimError;

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
    pub load_s: f64,
    pub ctx_create_s: f64,
    pub unload_s: f64,
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
        Self {
            prefill_fixed_ns: family.prefill_fixed_ms * k,
            prefill_per_token_ns: family.prefill_per_token_ms * k,
            prefill_per_token_sq_ns: family.prefill_per_token_sq_ms * k,
            decode_fixed_ns: family.decode_fixed_ms * k,
            decode_per_seq_ns: family.decode_per_seq_ms * k,
            decode_per_ctx_token_ns: family.decode_per_1k_ctx_ms * k / 1000.0,
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
    pub fn decode_ns(&self, batch: f64, ctx_tokens: f64) -> u64 {
        f64_ns(
            self.decode_fixed_ns
                + self.decode_per_seq_ns * batch
                + self.decode_per_ctx_token_ns * ctx_tokens,
        )
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

/// A pool model spec for model `id` of `family`.
pub fn model_spec(id: ModelId, family: &Family, costs: &Costs) -> ModelSpec {
    ModelSpec {
        id,
        weights_bytes: family.weights_bytes,
        ctx_bytes: family.resident_bytes() - family.weights_bytes,
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

#[expect(
    clippy::cast_precision_loss,
    reason = "token and byte counts far below 2^52"
)]
pub(crate) fn as_f64(value: u64) -> f64 {
    value as f64
}
