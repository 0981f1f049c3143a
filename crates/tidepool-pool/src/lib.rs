//! `tidepool-pool` owns the sans-IO scheduler of the model pool: which models are resident and
//! which sequences step next. It is a pure state machine fed with events and a clock value and
//! returns actions; the server and the simulator drive the same code.
//!
//! It never depends on tokio, the engine, the gateway or the ledger, and never reads a clock.
//! Read [`Pool`] first (and `docs/pool.md`), then [`Event`] and [`Action`], then [`PoolConfig`].
#![forbid(unsafe_code)]

pub mod config;
pub mod error;
pub mod event;
mod pool;
mod sched;
pub mod status;

pub use config::{CostEstimate, ModelSpec, PoolConfig};
pub use error::PoolError;
pub use event::{Action, ActionId, Event, SeqFinished, SeqId};
pub use pool::Pool;
pub use status::{
    ActionNs, DECODE_BATCH_BUCKETS, DecodeByBatch, ModelStatus, PoolCounters, PoolStatus, Residency,
};
pub use tidepool_core::PoolPolicy;
