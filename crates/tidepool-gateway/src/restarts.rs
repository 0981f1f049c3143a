//! What the gateway does with an engine restart (the watchdog's notice, see
//! `tidepool_engine::watchdog`): an audit entry by `system` (`engine.restart`, target
//! `engine:<accelerator|model>`, with the reason, the restart count, the backoff, how long the
//! engine was out and what happened to its requests) and an `engine_restarted` alert. Neither
//! ever delays the restart: notices arrive on a bounded broadcast channel, and a watcher that
//! lags loses the oldest ones (logged).

use tidepool_engine::watchdog::EngineRestart;
use tidepool_ledger::AuditContext;
use tokio::sync::broadcast::{Receiver, error::RecvError};
use tokio::task::JoinHandle;

use crate::state::{AppState, ModelEngine};

/// Starts one watcher per engine thread that can restart (the pool's accelerator thread, each
/// unpooled engine); the handles stop them at shutdown.
pub fn spawn_restart_watch(state: &AppState) -> Vec<JoinHandle<()>> {
    let mut receivers: Vec<Receiver<EngineRestart>> = Vec::new();
    if let Some(pool) = state.pool() {
        receivers.push(pool.subscribe_restarts());
    }
    for model in state.models() {
        if let ModelEngine::Text(engine) = &model.engine
            && let Some(receiver) = engine.restarts()
        {
            receivers.push(receiver);
        }
    }
    receivers
        .into_iter()
        .map(|receiver| state.tasks().spawn(watch(state.clone(), receiver)))
        .collect()
}

async fn watch(state: AppState, mut notices: Receiver<EngineRestart>) {
    loop {
        match notices.recv().await {
            Ok(notice) => record(&state, &notice).await,
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(
                    missed,
                    "engine restart notices were dropped before auditing"
                );
            }
            Err(RecvError::Closed) => return,
        }
    }
}

async fn record(state: &AppState, notice: &EngineRestart) {
    state
        .alerts()
        .engine_restarted(&notice.engine, &notice.reason);
    let details = serde_json::json!({
        "reason": notice.reason,
        "restarts": notice.restarts,
        "backoff_ms": u64::try_from(notice.backoff.as_millis()).unwrap_or(u64::MAX),
        "down_ms": u64::try_from(notice.down.as_millis()).unwrap_or(u64::MAX),
        "failed_requests": notice.failed_requests,
        "readmitted_requests": notice.readmitted_requests,
    });
    let target = format!("engine:{}", notice.engine);
    if let Err(error) = state
        .ledger()
        .append_audit(&AuditContext::SYSTEM, "engine.restart", &target, &details)
        .await
    {
        tracing::error!(%error, engine = %notice.engine, "cannot audit an engine restart");
    }
}
