//! Health probing: each backend is probed at start-up (`routing.probe_at_start`) and then every
//! `routing.health_interval_ms`. A probe's verdict sets the backend's `healthy` flag and feeds its
//! breaker; a probe that only timed out while the backend is busy is no verdict.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tidepool_core::BackendKind;
use tokio::time::Instant;

use super::backend::{Backend, BackendSetupError, Secret};

/// Health probes that must time out in a row (backend idle) before one counts as a failure.
const PROBE_TIMEOUTS_IN_A_ROW_MAX: u32 = 2;
/// Limit of the start-up probe of each backend (a cold worker may be slow to answer once).
const STARTUP_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Probes every backend once; the first that does not answer is the error.
pub(super) async fn probe_all_at_start(list: &[Arc<Backend>]) -> Result<(), BackendSetupError> {
    for backend in list {
        if !probe(backend, STARTUP_PROBE_TIMEOUT).await {
            return Err(BackendSetupError::Unreachable {
                backend: backend.id.clone(),
                url: backend.url.clone(),
            });
        }
    }
    Ok(())
}

/// Probes every backend every `every`, each probe bounded by `timeout`, forever (the caller
/// aborts it).
pub(super) async fn probe_forever(list: &[Arc<Backend>], every: Duration, timeout: Duration) {
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        futures::future::join_all(list.iter().map(|b| probe(b, timeout))).await;
    }
}

/// One health probe: `/healthz` on a worker, `/v1/models` (authenticated) on an upstream.
pub(super) async fn probe(backend: &Backend, timeout: Duration) -> bool {
    let path = match backend.kind {
        BackendKind::Worker => "/healthz",
        BackendKind::Upstream => "/v1/models",
    };
    let mut request = backend
        .client
        .get(format!("{}{path}", backend.url))
        .timeout(timeout);
    if let Some(Secret(key)) = &backend.api_key {
        request = request.bearer_auth(key);
    }
    let outcome = request.send().await;
    // A probe that only timed out is no verdict while this backend serves our requests, and
    // counts only from the second in a row otherwise: some servers (llama-cpp-python) answer
    // `/v1/models` only between generations. A refused connection or an error status counts
    // at once, so a dead process is still caught within one probe.
    if matches!(&outcome, Err(error) if error.is_timeout()) {
        let busy = backend.in_flight() > 0;
        let in_a_row = if busy {
            0
        } else {
            backend.probe_timeouts.fetch_add(1, Ordering::Relaxed) + 1
        };
        if busy || in_a_row < PROBE_TIMEOUTS_IN_A_ROW_MAX {
            tracing::debug!(backend = %backend.id, busy, "health probe timed out; no verdict yet");
            return backend.healthy.load(Ordering::Relaxed);
        }
    } else {
        backend.probe_timeouts.store(0, Ordering::Relaxed);
    }
    let ok = matches!(outcome, Ok(response) if response.status().is_success());
    backend.healthy.store(ok, Ordering::Relaxed);
    let state = {
        let mut breaker = backend.breaker.lock();
        breaker.on_probe(ok, Instant::now());
        breaker.state()
    };
    backend.publish_state(state);
    ok
}
