//! `tidepool-core` owns the vocabulary every other crate speaks: ids ([`RequestId`],
//! [`ModelId`], [`TenantId`], [`KeyId`]), token counts ([`TokenCount`]), money ([`Nanos`],
//! integer nano-units of a currency), the validated configuration ([`Config`], [`Limits`]) and
//! [`CoreError`].
//!
//! [`ModelId`] and [`PoolPolicy`] are re-exported from `tidepool-pool`, the one crate below core:
//! the pool owns its scheduler knobs ([`PoolKnobs`]), and core's `[pool]` section
//! ([`PoolSection`]) embeds them, so the server and the planner read the same struct.
//!
//! It must never depend on tokio, sqlx, axum or any engine: the simulator builds on it without
//! an async runtime. Read [`config`] first, then [`money`].
#![forbid(unsafe_code)]

pub mod config;
pub mod error;
pub mod ids;
pub mod money;
pub mod placement;

pub use config::{
    ALERT_EVENTS, AlertConfig, Backend, BackendConfig, BackendKind, BatchConfig, BillingConfig,
    Config, LeakDetectionConfig, Limits, LogFormat, ModelConfig, ModelKind, PoolKnobs, PoolPolicy,
    PoolSection, REGION_DEFAULT, ResidencyConfig, RoutingConfig, TelemetryConfig,
};
pub use error::{CoreError, FieldError};
pub use ids::{KeyId, ModelId, RequestClass, RequestId, TenantId};
pub use money::{Currency, Nanos};
pub use placement::{PLACEMENT_VERSION, PlacementFile};

/// A count of tokens. `u32` is explicit: no single request comes near 4 billion tokens, and every
/// place that adds counts up uses `u64`.
pub type TokenCount = u32;
