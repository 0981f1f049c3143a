//! The read-only view behind `GET /v1/pool`, plus cumulative counters for metrics.

use serde::{Deserialize, Serialize};
use tidepool_core::{ModelId, PoolPolicy};

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
    pub requests_admitted: u64,
    pub requests_finished: u64,
    pub requests_cancelled: u64,
    pub requests_rejected: u64,
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
    pub queued: u32,
    pub models: Vec<ModelStatus>,
    pub counters: PoolCounters,
}
