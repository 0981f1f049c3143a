//! `tidepool-pool` owns the sans-IO scheduler of the model pool: which models are resident and
//! which sequences step next. It is a pure state machine fed with events and a clock value and
//! returns actions; the server and the simulator drive the same code.
//!
//! It is the bottom of the crate graph: it depends on no other Tidepool crate (only serde and
//! thiserror), never on tokio, and never reads a clock. It owns the vocabulary it shares with
//! the rest ([`ModelId`], [`PoolPolicy`], re-exported by `tidepool-core`) and the scheduler's
//! knobs ([`PoolKnobs`], which core embeds as the `[pool]` section of `tidepool.toml`).
//! Read [`Pool`] first (and `docs/pool.md`), then [`Event`] and [`Action`], then [`PoolConfig`]
//! and [`PoolKnobs`].
#![forbid(unsafe_code)]

mod batch;
pub mod config;
mod demand;
pub mod error;
pub mod event;
pub mod ids;
pub mod knobs;
mod pool;
mod sched;
mod seqset;
pub mod status;

pub use config::{CostEstimate, ModelSpec, PoolConfig, memory_budget};
pub use error::PoolError;
pub use event::{Action, ActionId, Event, SeqFinished, SeqId};
pub use ids::{ModelId, PoolPolicy, RequestClass};
pub use knobs::{KnobProblem, PoolKnobs};
pub use pool::Pool;
pub use status::{
    ActionNs, BatchStatus, DECODE_BATCH_BUCKETS, DecodeByBatch, ModelStatus, PoolCounters,
    PoolStatus, Residency,
};
