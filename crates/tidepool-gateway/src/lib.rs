//! `tidepool-gateway` owns the HTTP surface: the OpenAI-compatible API (`/v1/chat/completions`,
//! `/v1/completions`, `/v1/embeddings`, `/v1/models`), SSE streaming, API-key auth, metering (one
//! usage entry per request), `/healthz`, `/metrics` and `/openapi.json`. It is the only crate that
//! knows HTTP, and it maps every error to a status and a stable `code` in exactly one place
//! ([`ApiError`]).
//!
//! It wires engine and ledger together; nothing below it depends on it. Read [`AppState`],
//! [`router`] and [`ApiError`] first, then `generate` (text generation and SSE) and `usage` (the
//! guard that settles every request exactly once).
#![forbid(unsafe_code)]

mod error;
mod extract;
mod generate;
mod load;
mod metrics;
pub mod openai;
mod openapi;
mod routes;
mod state;
mod usage;
mod validate;

use std::future::Future;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
pub use error::{ApiError, ERROR_CODES, ErrorBody, ErrorDetail};
pub use extract::{ApiJson, REQUEST_ID_HEADER};
pub use load::{ServeError, load_models};
pub use openapi::{ApiDoc, document as openapi_document};
pub use state::{AppState, ModelEngine, ServedModel};
use tidepool_core::Config;
use tidepool_ledger::Ledger;

/// How long shutdown waits for in-flight settlement writes once the listener has stopped.
pub const SHUTDOWN_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The whole application, ready to serve or to drive in-process with `tower::ServiceExt`.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(routes::chat_completions))
        .route("/v1/completions", post(routes::completions))
        .route("/v1/embeddings", post(routes::embeddings))
        .route("/v1/models", get(routes::models))
        .route("/healthz", get(routes::healthz))
        .route("/metrics", get(routes::metrics))
        .route("/openapi.json", get(routes::openapi))
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        // Bodies are read and bounded by `ApiJson` itself (see `extract::read_body`).
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn(extract::request_context))
        .with_state(state)
}

/// Where `serve` listens and which ledger it uses (flags override the config file).
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub listen: String,
    pub database_url: String,
}

/// Connects the ledger, loads every configured model, and serves until `shutdown` resolves; then
/// stops accepting, finishes in-flight requests and drains the task tracker (settlement writes).
pub async fn serve(
    config: &Config,
    options: &ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let ledger = Ledger::connect(&options.database_url).await?;
    tracing::info!(store = ledger.store_kind(), "ledger connected");
    let models = load_models(config).await?;
    let state = AppState::new(models, ledger, config.limits.clone());
    let listener = tokio::net::TcpListener::bind(&options.listen)
        .await
        .map_err(|source| ServeError::Bind {
            listen: options.listen.clone(),
            source,
        })?;
    let local = listener.local_addr().map_err(|source| ServeError::Bind {
        listen: options.listen.clone(),
        source,
    })?;
    tracing::info!(listen = %local, "tidepool is serving");
    let tasks = state.tasks().clone();
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(ServeError::Serve)?;
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
    Ok(())
}
