//! Remote backends: `tidepool worker`s and external OpenAI-compatible servers behind the
//! `backend = "remote"` models (docs/regions.md).
//!
//! A remote model is a [`RoutedEngine`](routing::RoutedEngine), an ordinary `TextEngine`: the
//! gateway's generation, SSE and metering code does not know where the tokens come from, so
//! billing is the same code path as for local models. A failure before anything reached the
//! client is retried on the next eligible backend; after the first delivered token the request
//! ends with `EngineError::Backend` and the gateway bills the delivered tokens only.
//!
//! - `backend`: one configured backend and its live state, its row on `/v1/backends`;
//! - `breaker`: its circuit breaker (sans-IO);
//! - `health`: the start-up and periodic health probes;
//! - `routing`: backend choice (residency, home region, load), retries and failover;
//! - `upstream`: the HTTP call to a backend and the parsing of its SSE or JSON answer.

mod backend;
mod breaker;
mod health;
mod routing;
mod upstream;

use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use tidepool_core::{BackendConfig, ModelId, RoutingConfig, TokenCount};
use tokio_util::task::TaskTracker;

pub use backend::{BackendSetupError, BackendStatus};
pub use breaker::BreakerState;
pub(crate) use upstream::prompt_tokens_bound;

use self::backend::Backend;
use self::routing::RoutedEngine;

/// Every backend, the region this gateway runs in and the routing limits.
#[derive(Debug)]
pub struct Backends {
    list: Vec<Arc<Backend>>,
    home_region: String,
    routing: RoutingConfig,
    /// Where breaker alerts go (shared with every backend; set once).
    alerts: Arc<std::sync::OnceLock<crate::alerts::Alerts>>,
}

impl Backends {
    pub(crate) fn new(
        configs: &[BackendConfig],
        routing: &RoutingConfig,
        home_region: &str,
    ) -> Result<Self, BackendSetupError> {
        let alerts = Arc::new(std::sync::OnceLock::new());
        let list = configs
            .iter()
            .map(|c| Backend::new(c, routing, alerts.clone()).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            list,
            home_region: home_region.to_owned(),
            routing: routing.clone(),
            alerts,
        })
    }

    /// Sends breaker alerts to `alerts` from now on (the first call wins).
    pub(crate) fn set_alerts(&self, alerts: crate::alerts::Alerts) {
        if self.alerts.set(alerts).is_err() {
            tracing::debug!("breaker alerts were already wired");
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        self.list.len()
    }

    /// Probes every backend once; the first that does not answer is the error.
    pub(crate) async fn probe_all_at_start(&self) -> Result<(), BackendSetupError> {
        health::probe_all_at_start(&self.list).await
    }

    /// Probes every backend every `health_interval_ms`, forever (the caller aborts it).
    pub(crate) async fn probe_forever(self: Arc<Self>) {
        health::probe_forever(
            &self.list,
            Duration::from_millis(self.routing.health_interval_ms),
            Duration::from_millis(self.routing.health_timeout_ms),
        )
        .await;
    }

    pub(crate) fn status(&self) -> Vec<BackendStatus> {
        self.list.iter().map(|b| b.status()).collect()
    }

    /// The engine of one remote model: its backends, in configuration order.
    pub(crate) fn engine(
        &self,
        model: ModelId,
        context_tokens: TokenCount,
        chunks_buffered_max: u32,
        tasks: TaskTracker,
    ) -> RoutedEngine {
        let backends = self
            .list
            .iter()
            .filter(|b| b.models.contains(&model))
            .cloned()
            .collect();
        RoutedEngine {
            model,
            context_tokens,
            backends,
            home_region: self.home_region.clone(),
            attempts_max: self.routing.retry_attempts_max,
            chunks_buffered_max: usize::try_from(chunks_buffered_max.max(1)).unwrap_or(1),
            tasks,
            active: Arc::new(AtomicU32::new(0)),
        }
    }
}
