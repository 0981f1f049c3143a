//! One configured backend and its live state: the HTTP client and API key, the concurrency
//! permits, the breaker, health, latency and attempt counters, and its row on `/v1/backends`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;
use tidepool_core::{BackendConfig, BackendKind, ModelId, RoutingConfig};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use utoipa::ToSchema;

use super::breaker::{Breaker, BreakerState};

/// A bearer token for a backend; never printed.
#[derive(Clone)]
pub(super) struct Secret(pub(super) String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Exponentially weighted latency of successful attempts, in microseconds (0: none yet).
#[derive(Debug, Default)]
struct Latency {
    ewma_us: AtomicU64,
}

impl Latency {
    fn record(&self, elapsed: Duration) {
        let sample = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let old = self.ewma_us.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            // 1/8 weight for the new sample, integer arithmetic.
            old.saturating_mul(7).saturating_add(sample) / 8
        };
        self.ewma_us.store(new, Ordering::Relaxed);
    }
}

/// One configured backend with its live state.
#[derive(Debug)]
pub(crate) struct Backend {
    pub(crate) id: String,
    pub(crate) kind: BackendKind,
    pub(crate) url: String,
    pub(crate) region: String,
    pub(crate) zone: String,
    pub(crate) models: Vec<ModelId>,
    pub(super) aliases: BTreeMap<String, String>,
    pub(super) api_key: Option<Secret>,
    pub(super) timeout: Duration,
    pub(super) concurrency_max: u32,
    pub(super) permits: Arc<Semaphore>,
    pub(super) client: reqwest::Client,
    pub(super) breaker: Mutex<Breaker>,
    pub(super) healthy: AtomicBool,
    /// Health probes in a row that timed out (a refused connection fails at once).
    pub(super) probe_timeouts: AtomicU32,
    latency: Latency,
    attempts_ok: AtomicU64,
    attempts_failed: AtomicU64,
    /// Whether `breaker_opened` was the last breaker alert sent (half-open counts as open).
    breaker_reported_open: AtomicBool,
    /// Where breaker alerts go; set once the gateway's state exists.
    pub(super) alerts: Arc<std::sync::OnceLock<crate::alerts::Alerts>>,
}

/// Why a backend could not be set up at start-up.
#[derive(Debug, thiserror::Error)]
pub enum BackendSetupError {
    #[error("backend `{backend}`: cannot read its API key: {reason}")]
    ApiKey { backend: String, reason: String },
    #[error("backend `{backend}`: cannot build an HTTP client: {source}")]
    Client {
        backend: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("backend `{backend}` at {url} did not answer its health probe at start-up")]
    Unreachable { backend: String, url: String },
}

fn read_api_key(config: &BackendConfig) -> Result<Option<Secret>, BackendSetupError> {
    let error = |reason: String| BackendSetupError::ApiKey {
        backend: config.id.clone(),
        reason,
    };
    if let Some(var) = &config.api_key_env {
        let value = std::env::var(var).map_err(|_| error(format!("${var} is not set")))?;
        return Ok(Some(Secret(value.trim().to_owned())));
    }
    if let Some(path) = &config.api_key_file {
        let value =
            std::fs::read_to_string(path).map_err(|e| error(format!("{}: {e}", path.display())))?;
        return Ok(Some(Secret(value.trim().to_owned())));
    }
    Ok(None)
}

impl Backend {
    pub(crate) fn new(
        config: &BackendConfig,
        routing: &RoutingConfig,
        alerts: Arc<std::sync::OnceLock<crate::alerts::Alerts>>,
    ) -> Result<Self, BackendSetupError> {
        let api_key = read_api_key(config)?;
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(routing.connect_timeout_ms))
            // Small requests on keep-alive connections: never wait for Nagle.
            .tcp_nodelay(true)
            .pool_max_idle_per_host(usize::try_from(config.concurrency_max).unwrap_or(usize::MAX))
            .build()
            .map_err(|source| BackendSetupError::Client {
                backend: config.id.clone(),
                source,
            })?;
        Ok(Self {
            id: config.id.clone(),
            kind: config.kind,
            url: config.url.trim_end_matches('/').to_owned(),
            region: config.region.clone(),
            zone: config.zone.clone(),
            models: config.models.clone(),
            aliases: config.aliases.clone(),
            api_key,
            timeout: Duration::from_millis(config.timeout_ms),
            concurrency_max: config.concurrency_max,
            permits: Arc::new(Semaphore::new(
                usize::try_from(config.concurrency_max).unwrap_or(usize::MAX),
            )),
            client,
            breaker: Mutex::new(Breaker::new(
                routing.breaker_failures_max,
                Duration::from_millis(routing.breaker_open_ms),
            )),
            healthy: AtomicBool::new(true),
            probe_timeouts: AtomicU32::new(0),
            latency: Latency::default(),
            attempts_ok: AtomicU64::new(0),
            attempts_failed: AtomicU64::new(0),
            breaker_reported_open: AtomicBool::new(false),
            alerts,
        })
    }

    pub(super) fn upstream_model<'a>(&'a self, model: &'a ModelId) -> &'a str {
        self.aliases
            .get(model.as_str())
            .map_or(model.as_str(), String::as_str)
    }

    pub(crate) fn status_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub(super) fn in_flight(&self) -> u32 {
        let free = u32::try_from(self.permits.available_permits()).unwrap_or(u32::MAX);
        self.concurrency_max.saturating_sub(free)
    }

    /// Publishes the health and breaker gauges of this backend, and a `breaker_opened` /
    /// `breaker_closed` alert when the breaker changed sides since the last one.
    pub(super) fn publish_state(&self, breaker: BreakerState) {
        let open = match breaker {
            BreakerState::Open => Some(true),
            BreakerState::Closed => Some(false),
            // A trial in progress: still open as far as alerts go.
            BreakerState::HalfOpen => None,
        };
        if let Some(open) = open
            && self.breaker_reported_open.swap(open, Ordering::Relaxed) != open
            && let Some(alerts) = self.alerts.get()
        {
            let (backend, region) = (self.id.clone(), self.region.clone());
            alerts.emit(if open {
                crate::alerts::AlertEvent::BreakerOpened { backend, region }
            } else {
                crate::alerts::AlertEvent::BreakerClosed { backend, region }
            });
        }
        crate::metrics::backend_state(
            &self.id,
            &self.region,
            &self.zone,
            self.status_healthy(),
            breaker != BreakerState::Closed,
        );
    }

    /// Records one attempt: `Some(duration)` succeeded, `None` failed.
    pub(super) fn record(&self, succeeded: Option<Duration>) {
        let now = Instant::now();
        let state = {
            let mut breaker = self.breaker.lock();
            match succeeded {
                Some(_) => breaker.on_success(),
                None => breaker.on_failure(now),
            }
            breaker.state()
        };
        if let Some(elapsed) = succeeded {
            self.attempts_ok.fetch_add(1, Ordering::Relaxed);
            self.latency.record(elapsed);
            crate::metrics::backend_attempt(&self.id, "ok", Some(elapsed));
        } else {
            self.attempts_failed.fetch_add(1, Ordering::Relaxed);
            crate::metrics::backend_attempt(&self.id, "failed", None);
        }
        self.publish_state(state);
    }

    /// `worker` or `upstream`: the backend's kind as `/v1/backends` and the traces name it.
    pub(crate) fn kind_name(&self) -> &'static str {
        match self.kind {
            BackendKind::Worker => "worker",
            BackendKind::Upstream => "upstream",
        }
    }

    pub(crate) fn status(&self) -> BackendStatus {
        BackendStatus {
            id: self.id.clone(),
            kind: self.kind_name(),
            url: self.url.clone(),
            region: self.region.clone(),
            zone: self.zone.clone(),
            models: self.models.iter().map(ToString::to_string).collect(),
            healthy: self.healthy.load(Ordering::Relaxed),
            breaker: self.breaker.lock().state(),
            latency_ms_ewma: self.latency.ewma_us.load(Ordering::Relaxed) / 1000,
            in_flight: self.in_flight(),
            concurrency_max: self.concurrency_max,
            attempts_ok: self.attempts_ok.load(Ordering::Relaxed),
            attempts_failed: self.attempts_failed.load(Ordering::Relaxed),
        }
    }
}

/// One backend on `GET /v1/backends` (never its API key).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct BackendStatus {
    pub id: String,
    /// `worker` or `upstream`.
    pub kind: &'static str,
    pub url: String,
    pub region: String,
    pub zone: String,
    pub models: Vec<String>,
    /// The last health probe succeeded.
    pub healthy: bool,
    pub breaker: BreakerState,
    /// Moving average of successful attempts' duration, in ms.
    pub latency_ms_ewma: u64,
    pub in_flight: u32,
    pub concurrency_max: u32,
    pub attempts_ok: u64,
    pub attempts_failed: u64,
}
