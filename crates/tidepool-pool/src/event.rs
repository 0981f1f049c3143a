//! The event/action vocabulary between the pool and its driver (the server's engine loop or the
//! simulator). Every event carries the current time; every engine action carries an
//! [`ActionId`] that its completion event echoes.

use std::fmt;

use crate::{ModelId, RequestClass};
use serde::{Deserialize, Serialize};

/// One request's sequence, chosen by the driver (unique for the pool's lifetime).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SeqId(pub u64);

impl fmt::Display for SeqId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seq#{}", self.0)
    }
}

/// One engine action, numbered by the pool from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ActionId(pub u64);

impl fmt::Display for ActionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "action#{}", self.0)
    }
}

/// A sequence that stopped during a step (end of sequence, stop string or `max_tokens`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqFinished {
    pub seq: SeqId,
    /// Output tokens the sequence emitted in total, over its whole life.
    pub tokens_emitted: u32,
}

/// What happened. `now_ns` is the driver's clock (monotonic, nanoseconds); the pool never reads
/// a clock of its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// A new request. Admission errors come back as `Err` and leave the pool unchanged.
    /// `class`: `Batch` requests run only on capacity online requests leave idle
    /// (docs/pool.md §3.7); absent in serialized events it is `Online`.
    RequestArrived {
        now_ns: u64,
        seq: SeqId,
        model: ModelId,
        prompt_tokens: u32,
        max_tokens: u32,
        #[serde(default)]
        class: RequestClass,
        /// Prompt tokens the driver expects the engine to find in its KV already (a prompt
        /// prefix it holds or is computing): a hint, at most `prompt_tokens − 1`. The prefill's
        /// time estimate and `prefill_tokens_max` count only the other tokens; memory is still
        /// charged for the whole prompt. Absent in serialized events it is 0.
        #[serde(default)]
        cached_tokens: u32,
    },
    /// The client went away. Unknown or finished sequences are ignored.
    Cancelled { now_ns: u64, seq: SeqId },
    /// A [`Action::Load`] finished: weights in and context created.
    LoadFinished {
        now_ns: u64,
        action: ActionId,
        duration_ns: u64,
    },
    /// An [`Action::Evict`] finished: context and weights freed.
    UnloadFinished { now_ns: u64, action: ActionId },
    /// An [`Action::SaveKv`] finished; the sequence's cells are cleared from the context.
    KvSaved {
        now_ns: u64,
        action: ActionId,
        bytes: u64,
    },
    /// An [`Action::RestoreKv`] finished; the sequence is back in the context.
    KvRestored { now_ns: u64, action: ActionId },
    /// An [`Action::Prefill`] (`steps` = 1: the first token, and one token per rider) or
    /// [`Action::Decode`] finished. Every listed sequence (riders included) not in `finished`
    /// emitted exactly `steps` tokens.
    StepFinished {
        now_ns: u64,
        action: ActionId,
        steps: u32,
        duration_ns: u64,
        finished: Vec<SeqFinished>,
    },
    /// Time passed (keep-alive expiry); the driver sends one at [`crate::Pool::next_timer_ns`].
    Tick { now_ns: u64 },
    /// An operator asked to load `model` (`POST /admin/models/{id}/load`).
    LoadRequested { now_ns: u64, model: ModelId },
    /// An operator asked to unload `model`; `ModelBusy` unless it is idle.
    UnloadRequested { now_ns: u64, model: ModelId },
}

impl Event {
    pub fn now_ns(&self) -> u64 {
        match self {
            Self::RequestArrived { now_ns, .. }
            | Self::Cancelled { now_ns, .. }
            | Self::LoadFinished { now_ns, .. }
            | Self::UnloadFinished { now_ns, .. }
            | Self::KvSaved { now_ns, .. }
            | Self::KvRestored { now_ns, .. }
            | Self::StepFinished { now_ns, .. }
            | Self::Tick { now_ns }
            | Self::LoadRequested { now_ns, .. }
            | Self::UnloadRequested { now_ns, .. } => *now_ns,
        }
    }
}

/// What the driver must do. Engine actions (all but `Release`) finish with exactly one event.
/// Two lanes exist: compute (`Prefill`, `Decode`) and transfer (the rest); with
/// `overlap_transfers` one action of each lane may be in flight, otherwise one action in total.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Load weights and create the model's context → `LoadFinished`.
    Load { id: ActionId, model: ModelId },
    /// Free the context and weights (no sequence of the model is in the context) → `UnloadFinished`.
    Evict { id: ActionId, model: ModelId },
    /// Copy one sequence's state out of the context and clear its cells → `KvSaved`.
    SaveKv {
        id: ActionId,
        model: ModelId,
        seq: SeqId,
    },
    /// Put a saved state back into the context → `KvRestored`.
    RestoreKv {
        id: ActionId,
        model: ModelId,
        seq: SeqId,
    },
    /// Prefill these prompts together and emit each first token → `StepFinished { steps: 1 }`.
    /// `riders` are sequences of the model already decoding (cells in the context): each rides
    /// in the prefill's batch with its next token, so it emits one token too instead of waiting
    /// out the prefill (mixed batches; empty unless `PoolConfig::prefill_riders`).
    Prefill {
        id: ActionId,
        model: ModelId,
        seqs: Vec<SeqId>,
        riders: Vec<SeqId>,
    },
    /// Run up to `steps` decode steps of this batch → `StepFinished`.
    Decode {
        id: ActionId,
        model: ModelId,
        seqs: Vec<SeqId>,
        steps: u32,
    },
    /// Forget a cancelled sequence (context cells or saved state); no completion event.
    Release { model: ModelId, seq: SeqId },
}

impl Action {
    /// The id of an engine action; `None` for `Release`.
    pub fn id(&self) -> Option<ActionId> {
        match self {
            Self::Load { id, .. }
            | Self::Evict { id, .. }
            | Self::SaveKv { id, .. }
            | Self::RestoreKv { id, .. }
            | Self::Prefill { id, .. }
            | Self::Decode { id, .. } => Some(*id),
            Self::Release { .. } => None,
        }
    }
}
