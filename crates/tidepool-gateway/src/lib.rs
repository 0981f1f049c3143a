//! `tidepool-gateway` owns the HTTP surface: the OpenAI-compatible API (`/v1/chat/completions`,
//! `/v1/completions`, `/v1/embeddings`, `/v1/models`), SSE streaming, API-key auth, metering (one
//! usage entry per request), `/healthz`, `/readyz`, `/metrics` and `/openapi.json`, webhook
//! alerts ([`alerts`]), the admin API's audit surface ([`audit`]) and the leaked-key detector
//! ([`leak`]). It is the only crate that knows HTTP, and it maps every error to a status and a
//! stable `code` in exactly one place ([`ApiError`]).
//!
//! It wires engine and ledger together; nothing below it depends on it. Read [`AppState`],
//! [`router`] and [`ApiError`] first, then `generate` (text generation and SSE) and `usage` (the
//! guard that settles every request exactly once).
#![forbid(unsafe_code)]

pub mod accounts;
pub mod alerts;
pub mod audit;
pub mod backends;
pub mod batch;
mod batch_line;
pub mod console;
mod error;
mod extract;
mod generate;
pub mod leak;
mod load;
mod metrics;
pub mod openai;
mod openapi;
pub mod pool;
mod principal;
mod ratelimit;
mod restarts;
mod routes;
mod state;
mod suspend;
pub mod tenant_admin;
mod trace;
mod usage;
mod validate;

use std::future::Future;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
pub use error::{ApiError, ERROR_CODES, ErrorBody, ErrorDetail, UNAVAILABLE_RETRY_AFTER_MS};
pub use extract::{ApiJson, REQUEST_ID_HEADER};
pub use load::{LoadedModels, ServeError, load_models, sync_prices, watchdog_config};
pub use openapi::{ApiDoc, document as openapi_document};
pub use restarts::spawn_restart_watch;
pub use state::{AppState, ModelEngine, ServedModel, StateOptions};
use tidepool_core::Config;
pub use tidepool_engine::watchdog::install_panic_policy;
use tidepool_ledger::Ledger;

/// How long shutdown waits for in-flight settlement writes once the listener has stopped.
pub const SHUTDOWN_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The whole application, ready to serve or to drive in-process with `tower::ServiceExt`: every
/// route under `[server] base_path` when one is set.
pub fn router(state: AppState) -> Router {
    let base_path = state.base_path().to_owned();
    let routes = routes(state.clone());
    let app = if base_path.is_empty() {
        routes
    } else {
        Router::new()
            .nest(&base_path, routes)
            .fallback(routes::not_found)
    };
    app.layer(axum::middleware::from_fn_with_state(
        state.clone(),
        console::csrf_guard,
    ))
    .layer(axum::middleware::from_fn_with_state(
        state,
        extract::request_context,
    ))
}

/// `GET /metrics` alone, unauthenticated: the router of `[server] metrics_listen`.
pub fn metrics_router() -> Router {
    Router::new()
        .route("/metrics", get(routes::metrics))
        .fallback(routes::not_found)
}

#[expect(clippy::too_many_lines, reason = "the route table, one route per line")]
fn routes(state: AppState) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(routes::chat_completions))
        .route("/v1/completions", post(routes::completions))
        .route("/v1/embeddings", post(routes::embeddings))
        .route("/v1/models", get(routes::models))
        .route("/v1/usage", get(accounts::usage))
        .route("/v1/files", post(batch::upload_file).get(batch::list_files))
        .route(
            "/v1/files/{id}",
            get(batch::retrieve_file).delete(batch::delete_file),
        )
        .route("/v1/files/{id}/content", get(batch::file_content))
        .route(
            "/v1/batches",
            post(batch::create_batch).get(batch::list_batches),
        )
        .route("/v1/batches/{id}", get(batch::retrieve_batch))
        .route("/v1/batches/{id}/cancel", post(batch::cancel_batch))
        .route("/v1/pool", get(pool::pool_status))
        .route("/v1/backends", get(pool::backends_status))
        .route("/admin/models/{id}/load", post(pool::load_model))
        .route("/admin/models/{id}/unload", post(pool::unload_model))
        .route(
            "/admin/tenants",
            post(accounts::create_tenant).get(tenant_admin::list_tenants),
        )
        .route("/admin/tenants/{tenant}", get(accounts::get_tenant))
        .route(
            "/admin/tenants/{tenant}/projects",
            post(accounts::create_project),
        )
        .route("/admin/tenants/{tenant}/credits", post(accounts::credit))
        .route("/admin/tenants/{tenant}/usage", get(accounts::tenant_usage))
        .route("/admin/tenants/{tenant}/keys", get(tenant_admin::list_keys))
        .route(
            "/admin/tenants/{tenant}/usage/daily",
            get(tenant_admin::daily_usage),
        )
        .route(
            "/admin/tenants/{tenant}/statement",
            get(accounts::statement),
        )
        .route("/admin/keys", post(accounts::create_key))
        .route(
            "/admin/keys/{key_id}",
            axum::routing::delete(accounts::revoke_key),
        )
        .route("/admin/keys/{key_id}/reinstate", post(audit::reinstate_key))
        .route("/admin/audit", get(audit::list_audit))
        .route(
            "/admin/budgets",
            axum::routing::put(accounts::set_budget).get(tenant_admin::list_budgets),
        )
        .route(
            "/admin/rate-limits",
            axum::routing::put(accounts::set_rate_limits),
        )
        .route("/healthz", get(routes::healthz))
        .route("/readyz", get(routes::readyz))
        .route("/metrics", get(routes::operator_metrics))
        .route("/openapi.json", get(openapi::openapi))
        .route("/console", get(console::redirect_to_index))
        .route("/console/", get(console::index))
        .route("/console/app.js", get(console::app_js))
        .route("/console/app.css", get(console::app_css))
        .route(
            "/console/api/session",
            get(console::session)
                .post(console::sign_in)
                .delete(console::sign_out),
        )
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        // Bodies are read and bounded by `ApiJson` itself (see `extract::read_body`).
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// Where `serve` listens and which ledger it uses (flags override the config file).
#[derive(Clone)]
pub struct ServeOptions {
    pub listen: String,
    pub database_url: String,
    /// Bearer token of the admin API; `None` disables it.
    pub admin_token: Option<String>,
}

/// Secrets never reach a log: the database password and the admin token are redacted.
impl std::fmt::Debug for ServeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeOptions")
            .field("listen", &self.listen)
            .field(
                "database_url",
                &tidepool_core::config::redact_url(&self.database_url),
            )
            .field("admin_token", &self.admin_token.as_ref().map(|_| "***"))
            .finish()
    }
}

/// How often a replica sweeps for reservations that dead replicas left open.
pub const STALE_SWEEP_INTERVAL: Duration = Duration::from_mins(1);

/// How often a server that started with its database schema behind checks it again, and then
/// runs its start-up recovery ([`start_up_when_current`]).
pub const STARTUP_RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// How long `GET /readyz` waits for the database (a trivial query, then the schema version) in
/// all; beyond it the check fails. Well under the usual probe timeouts (Kubernetes: 1 s by
/// default, commonly raised to a few seconds).
pub const READYZ_TIMEOUT: Duration = Duration::from_secs(2);

/// Connects the ledger, loads every configured model, and serves until `shutdown` resolves; then
/// stops accepting, finishes in-flight requests and drains the task tracker (settlement writes).
#[expect(
    clippy::too_many_lines,
    reason = "start-up, serving and shutdown, in order"
)]
pub async fn serve(
    config: &Config,
    options: &ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let ledger = open_ledger(config, options).await?;
    // Without migrations at start-up the schema may be behind: then serve anyway (readiness
    // red, model requests 503) and run the start-up work once it is current.
    let schema_current = config.server.migrate_on_start || schema_is_current(&ledger).await;
    if schema_current {
        start_up(config, &ledger).await?;
    }
    let alert_sinks = config
        .alerts
        .iter()
        .map(alerts::AlertSink::new)
        .collect::<Result<Vec<_>, _>>()?;
    let LoadedModels {
        models,
        pool,
        backends,
    } = load_models(config).await?;
    let state = AppState::with_options(
        models,
        ledger,
        StateOptions {
            limits: config.limits.clone(),
            billing: config.billing.clone(),
            admin_token: options.admin_token.clone(),
            clock: std::sync::Arc::new(tidepool_ledger::SystemClock),
            pool,
            backends: backends.clone(),
            region: config.server.region.clone(),
            residency: config.residency.clone(),
            alert_sinks,
            leak_detection: config.leak_detection.clone(),
            telemetry: config.telemetry.clone(),
            base_path: config.server.base_path.clone(),
            batch: tidepool_core::BatchConfig {
                files_dir: Some(batch::files_dir_for(&config.batch, &options.database_url)),
                ..config.batch.clone()
            },
        },
    );
    let metrics_server =
        spawn_metrics_listener(&state, config.server.metrics_listen.as_deref()).await?;
    let database_watch = spawn_database_watch(&state);
    let restart_watch = spawn_restart_watch(&state);
    let starting = (!schema_current).then(|| start_up_when_current(&state, config.clone()));
    let prober = backends.map(|backends| state.tasks().spawn(backends.probe_forever()));
    let sweeper = spawn_sweeper(&state, config);
    let batch_runner = config
        .batch
        .runner_enabled
        .then(|| batch::spawn_runner(&state));
    let listener = bind_public(&options.listen).await?;
    let tasks = state.tasks().clone();
    let alerts = state.alerts().clone();
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(ServeError::Serve)?;
    alerts.stop();
    let background = [
        Some(sweeper),
        batch_runner,
        database_watch,
        prober,
        starting,
        metrics_server,
    ];
    shut_down(
        &tasks,
        background.into_iter().flatten().chain(restart_watch),
    )
    .await;
    Ok(())
}

/// The public listener, with `TCP_NODELAY` on every connection: SSE writes one small frame per
/// token, and with Nagle on a frame can wait for the peer's delayed ACK (40 ms on Linux).
/// Measured by `tidepool bench failover` (p99 of a streamed hop).
async fn bind_public(
    listen: &str,
) -> Result<impl axum::serve::Listener<Addr = std::net::SocketAddr>, ServeError> {
    let bind_error = |source| ServeError::Bind {
        listen: listen.to_owned(),
        source,
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(bind_error)?;
    let local = listener.local_addr().map_err(bind_error)?;
    tracing::info!(listen = %local, "tidepool is serving");
    Ok(axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY on a connection");
        }
    }))
}

/// Serves `GET /metrics` on `[server] metrics_listen`, for Prometheus, until shutdown.
async fn spawn_metrics_listener(
    state: &AppState,
    address: Option<&str>,
) -> Result<Option<tokio::task::JoinHandle<()>>, ServeError> {
    let Some(address) = address else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|source| ServeError::Bind {
            listen: address.to_owned(),
            source,
        })?;
    tracing::info!(listen = address, "metrics are served on their own listener");
    Ok(Some(state.tasks().spawn(async move {
        if let Err(error) = axum::serve(listener, metrics_router()).await {
            tracing::error!(%error, "the metrics listener stopped");
        }
    })))
}

/// After the listener stopped: aborts the background loops, then drains the task tracker
/// (settlement writes) for at most [`SHUTDOWN_DRAIN_TIMEOUT`].
async fn shut_down(
    tasks: &tokio_util::task::TaskTracker,
    background: impl Iterator<Item = tokio::task::JoinHandle<()>>,
) {
    for handle in background {
        handle.abort();
    }
    tasks.close();
    if tokio::time::timeout(SHUTDOWN_DRAIN_TIMEOUT, tasks.wait())
        .await
        .is_err()
    {
        tracing::error!(
            pending = tasks.len(),
            "shutdown: settlement writes did not drain in time"
        );
    }
    tracing::info!("tidepool stopped");
}

/// Watches the ledger's database for `database_lost` / `database_recovered` alerts, when alerts
/// are on.
fn spawn_database_watch(state: &AppState) -> Option<tokio::task::JoinHandle<()>> {
    state.alerts().is_enabled().then(|| {
        state.tasks().spawn(alerts::watch_database(
            state.ledger().clone(),
            state.alerts().clone(),
            std::sync::Arc::new(tidepool_ledger::SystemClock),
            READYZ_TIMEOUT,
        ))
    })
}

/// The periodic sweep for reservations that dead replicas left open (once start-up is done).
fn spawn_sweeper(state: &AppState, config: &Config) -> tokio::task::JoinHandle<()> {
    let stale_after = Duration::from_millis(config.billing.stale_reservation_ms);
    let state = state.clone();
    state.clone().tasks().spawn(async move {
        let mut interval = tokio::time::interval(STALE_SWEEP_INTERVAL);
        loop {
            interval.tick().await;
            if !state.is_started() {
                continue;
            }
            match state.ledger().recover_stale(stale_after).await {
                Ok(report) if report.settled + report.voided > 0 => tracing::warn!(
                    settled = report.settled,
                    voided = report.voided,
                    "resolved stale reservations of a replica that did not come back"
                ),
                Ok(_) => {}
                Err(error) => tracing::error!(%error, "stale reservation sweep failed"),
            }
        }
    })
}

/// Connects the ledger as this replica, migrating it unless `[server] migrate_on_start` is off.
async fn open_ledger(config: &Config, options: &ServeOptions) -> Result<Ledger, ServeError> {
    let ledger = Ledger::connect_with(
        &options.database_url,
        tidepool_ledger::LedgerOptions {
            replica_id: config.billing.replica_id.clone(),
            migrate: config.server.migrate_on_start,
            audit_checkpoints: audit::audit_checkpointing(&config.audit)?,
            ..tidepool_ledger::LedgerOptions::default()
        },
    )
    .await?;
    tracing::info!(
        store = ledger.store_kind(),
        replica = ledger.replica_id(),
        migrated = config.server.migrate_on_start,
        "ledger connected"
    );
    Ok(ledger)
}

/// Whether the schema is current now; what is not is logged.
async fn schema_is_current(ledger: &Ledger) -> bool {
    match ledger.schema_status().await {
        Ok(status) if status.is_current() => true,
        Ok(status) => {
            tracing::warn!(%status, "the ledger's schema is not current: model requests get 503 \
                until it is (`tidepool migrate` applies it)");
            false
        }
        Err(error) => {
            tracing::warn!(%error, "cannot read the ledger's schema version: model requests get \
                503 until it is current");
            false
        }
    }
}

/// The ledger's start-up work, which needs the current schema: resolve what this replica's
/// previous life left open (before serving model requests: docs/ledger.md, crash rule), then
/// sync the configured prices.
async fn start_up(config: &Config, ledger: &Ledger) -> Result<(), ServeError> {
    let recovered = ledger.recover().await?;
    tracing::info!(
        settled = recovered.settled,
        voided = recovered.voided,
        already_resolved = recovered.already_resolved,
        "start-up recovery of open reservations done"
    );
    sync_prices(config, ledger).await
}

/// For a server that starts with its database schema behind: model requests answer 503
/// `unavailable` (and `GET /readyz` 503) while a task checks the schema every
/// [`STARTUP_RETRY_INTERVAL`]; once it is current, the task runs the start-up work (recovery,
/// price sync), retrying it while it fails, and then lets requests in. The task ends then;
/// abort it to stop waiting.
pub fn start_up_when_current(state: &AppState, config: Config) -> tokio::task::JoinHandle<()> {
    state.set_started(false);
    let state = state.clone();
    state.clone().tasks().spawn(async move {
        let ledger = state.ledger().clone();
        let mut interval = tokio::time::interval(STARTUP_RETRY_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_reason = String::new();
        loop {
            interval.tick().await;
            let outcome = match ledger.schema_status().await {
                Ok(status) if status.is_current() => start_up(&config, &ledger)
                    .await
                    .map_err(|error| error.to_string()),
                Ok(status) => Err(format!("schema {status}")),
                Err(error) => Err(error.to_string()),
            };
            match outcome {
                Ok(()) => {
                    state.set_started(true);
                    tracing::info!("the ledger's schema is current: serving model requests");
                    return;
                }
                // Said once per distinct reason, not every interval.
                Err(reason) if reason != last_reason => {
                    tracing::warn!(%reason, "waiting for the ledger before serving model requests");
                    last_reason = reason;
                }
                Err(_) => {}
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serve_and_state_options_never_print_secrets() {
        let options = ServeOptions {
            listen: "127.0.0.1:8080".to_owned(),
            database_url: "postgres://tidepool:hunter2@db/tidepool".to_owned(),
            admin_token: Some("admin-secret-token".to_owned()),
        };
        let printed = format!("{options:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(!printed.contains("admin-secret-token"), "{printed}");
        assert!(printed.contains("127.0.0.1:8080"), "{printed}");

        let mut state = StateOptions::new(tidepool_core::Limits::default());
        state.admin_token = Some("admin-secret-token".to_owned());
        let printed = format!("{state:?}");
        assert!(!printed.contains("admin-secret-token"), "{printed}");
    }
}
