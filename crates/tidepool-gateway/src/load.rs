//! Start-up: builds the served models from `Config` (the model pool over llama.cpp for
//! `chat`/`completion`, or one continuous-batching engine each with `[pool] enabled = false`;
//! candle for `embedding`) and the error type of `serve`. Start-up failures never reach an HTTP client,
//! so they are not `ApiError` variants (which each need a status): they are [`ServeError`].

use std::sync::Arc;

use tidepool_core::{Backend, Config, ModelConfig, ModelKind};
use tidepool_engine::EngineError;
use tidepool_engine::embed::{CandleEmbeddingConfig, CandleEmbeddingEngine};
use tidepool_engine::llama::{LlamaEngine, LlamaEngineConfig};
use tidepool_engine::multi::MultiModelConfig;
use tidepool_engine::watchdog::WatchdogConfig;
use tidepool_ledger::{Ledger, LedgerError, PriceVersion};
use tidepool_runtime::{PoolRuntime, PooledModelConfig, RuntimeConfig};
use tokio_util::task::TaskTracker;

use crate::backends::{BackendSetupError, Backends};
use crate::state::ServedModel;

/// Why `serve` could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot open the ledger: {0}")]
    Ledger(#[from] LedgerError),
    #[error("cannot load model `{model}`: {source}")]
    Engine {
        model: String,
        #[source]
        source: EngineError,
    },
    #[error("model loading was interrupted")]
    LoadInterrupted(#[source] tokio::task::JoinError),
    #[error("cannot listen on {listen}: {source}")]
    Bind {
        listen: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the server failed: {0}")]
    Serve(#[source] std::io::Error),
    #[error(transparent)]
    Backend(#[from] BackendSetupError),
    #[error(transparent)]
    Alert(#[from] crate::alerts::AlertSetupError),
    /// `[audit] checkpoint_key_env` names a variable whose key is too short.
    #[error(
        "the audit checkpoint key in `{var}` is shorter than {} bytes",
        tidepool_ledger::AUDIT_CHECKPOINT_KEY_BYTES_MIN
    )]
    AuditKey { var: String },
    /// `backend = "fake"` in a binary built without the cargo feature `fake`.
    #[error(
        "model `{model}` has backend = \"fake\": the fake engine is for tests and load benchmarks \
         and is not built into this binary (build with `--features fake`)"
    )]
    FakeEngineNotBuilt { model: String },
}

/// The served models, and the pool that runs the llama.cpp ones when `[pool] enabled`.
#[derive(Debug)]
pub struct LoadedModels {
    pub models: Vec<ServedModel>,
    pub pool: Option<Arc<PoolRuntime>>,
    /// The remote backends, when `[[backends]]` are configured.
    pub backends: Option<Arc<Backends>>,
}

/// Whether a model runs in the pool: a llama.cpp text model while `[pool] enabled`.
fn pooled(config: &Config, model: &ModelConfig) -> bool {
    config.pool.enabled
        && model.backend == Backend::Auto
        && matches!(model.kind, ModelKind::Chat | ModelKind::Completion)
}

/// Loads every configured model on the blocking pool (loading reads whole files and builds
/// contexts: seconds of blocking work). Pooled models only open their vocabulary here; the
/// pool loads their weights when it schedules them (after measuring each once).
pub async fn load_models(config: &Config) -> Result<LoadedModels, ServeError> {
    // Refused before anything loads: a default build never serves made-up tokens.
    if !cfg!(feature = "fake")
        && let Some(model) = config.models.iter().find(|m| m.backend == Backend::Fake)
    {
        return Err(ServeError::FakeEngineNotBuilt {
            model: model.id.to_string(),
        });
    }
    let backends = start_backends(config).await?;
    let pool = start_pool(config).await?;
    let mut pooled_engines = pool
        .as_ref()
        .map(PoolRuntime::engines)
        .unwrap_or_default()
        .into_iter();
    let mut served = Vec::with_capacity(config.models.len());
    for model in &config.models {
        if pooled(config, model) {
            // `engines()` is in configuration order, the order of this loop.
            if let Some(engine) = pooled_engines.next() {
                served.push(ServedModel::text(model.kind, engine));
            }
            continue;
        }
        if let (Backend::Remote, Some(backends)) = (model.backend, &backends) {
            let engine = backends.engine(
                model.id.clone(),
                model.context_tokens,
                config.limits.stream_chunks_buffered_max,
                TaskTracker::new(),
            );
            served.push(ServedModel::text(model.kind, Arc::new(engine)));
            continue;
        }
        served.push(load_one(config, model).await?);
    }
    Ok(LoadedModels {
        models: served,
        pool,
        backends,
    })
}

/// Builds the remote backends (reading their API keys) and, with `routing.probe_at_start`,
/// probes each once: a backend that does not answer stops the start-up.
async fn start_backends(config: &Config) -> Result<Option<Arc<Backends>>, ServeError> {
    let backends = Backends::new(&config.backends, &config.routing, &config.server.region)?;
    if backends.is_empty() {
        return Ok(None);
    }
    if config.routing.probe_at_start {
        backends.probe_all_at_start().await?;
    }
    tracing::info!(
        backends = backends.len(),
        region = %config.server.region,
        "remote backends ready"
    );
    Ok(Some(Arc::new(backends)))
}

/// Starts the pool's accelerator thread with every pooled model (none: no pool).
async fn start_pool(config: &Config) -> Result<Option<Arc<PoolRuntime>>, ServeError> {
    let models: Vec<PooledModelConfig> = config
        .models
        .iter()
        .filter(|m| pooled(config, m))
        .map(|m| {
            let mut engine = MultiModelConfig::new(m.id.clone(), config.model_path(m));
            engine.context_tokens = m.context_tokens;
            engine.seqs_max = m.seqs_max;
            engine.threads = config.engine.threads;
            engine.batch_tokens_max = config.engine.batch_tokens_max.max(m.seqs_max);
            engine.chunks_buffered_max = config.limits.stream_chunks_buffered_max;
            engine.prefix_cache_tokens_max = m.prefix_cache_tokens_max;
            PooledModelConfig {
                engine,
                pin: m.pin,
                keep_alive_ms: m.keep_alive_ms,
            }
        })
        .collect();
    let Some(first) = models.first() else {
        return Ok(None);
    };
    let first = first.engine.model_id.to_string();
    let mut runtime = RuntimeConfig::new(config.pool.policy, models);
    runtime.pool = config.pool.clone();
    runtime.watchdog = watchdog_config(config);
    tracing::info!(policy = ?config.pool.policy, models = runtime.models.len(),
        "starting the model pool (measuring each model once)");
    let started = tokio::task::spawn_blocking(move || PoolRuntime::start(&runtime))
        .await
        .map_err(ServeError::LoadInterrupted)?
        .map_err(|source| ServeError::Engine {
            model: first,
            source,
        })?;
    Ok(Some(started))
}

/// `[engine]`'s restart backoff and heartbeat bound, as the engines take them.
pub fn watchdog_config(config: &Config) -> WatchdogConfig {
    let ms = std::time::Duration::from_millis;
    WatchdogConfig {
        restart_backoff_initial: ms(config.engine.restart_backoff_initial_ms),
        restart_backoff_max: ms(config.engine.restart_backoff_max_ms),
        heartbeat_stale: ms(config.engine.heartbeat_stale_ms),
    }
}

async fn load_one(config: &Config, model: &ModelConfig) -> Result<ServedModel, ServeError> {
    let path = config.model_path(model);
    let limits = &config.limits;
    let id = model.id.clone();
    tracing::info!(model = %id, path = %path.display(), "loading model");
    let kind = model.kind;
    let loaded = match (model.backend, kind) {
        (Backend::Fake, ModelKind::Chat | ModelKind::Completion) => {
            return start_fake(config, model);
        }
        (Backend::Auto, ModelKind::Chat | ModelKind::Completion) => {
            let mut engine_config = LlamaEngineConfig::new(id.clone(), path);
            engine_config.context_tokens = model.context_tokens;
            engine_config.seqs_max = model.seqs_max;
            engine_config.threads = config.engine.threads;
            engine_config.batch_tokens_max = config.engine.batch_tokens_max.max(model.seqs_max);
            engine_config.queue_len_max = limits.admission_queue_len_max;
            engine_config.chunks_buffered_max = limits.stream_chunks_buffered_max;
            engine_config.watchdog = watchdog_config(config);
            tokio::task::spawn_blocking(move || {
                LlamaEngine::load(engine_config).map(|engine| ServedModel::text(kind, engine))
            })
            .await
        }
        (Backend::Remote, _) => {
            return Err(ServeError::Engine {
                model: id.to_string(),
                source: EngineError::Load {
                    path,
                    reason: "a remote model needs [[backends]]".to_owned(),
                },
            });
        }
        (Backend::Auto | Backend::Fake, ModelKind::Embedding) => {
            let mut engine_config = CandleEmbeddingConfig::new(id.clone(), path);
            engine_config.input_tokens_max = model.context_tokens;
            engine_config.queue_len_max = limits.admission_queue_len_max;
            engine_config.inputs_max = limits.embedding_inputs_max;
            tokio::task::spawn_blocking(move || {
                CandleEmbeddingEngine::load(engine_config)
                    .map(|engine| ServedModel::embedding(engine))
            })
            .await
        }
    };
    loaded
        .map_err(ServeError::LoadInterrupted)?
        .map_err(|source| ServeError::Engine {
            model: id.to_string(),
            source,
        })
}

/// The deterministic fake engine of a `backend = "fake"` text model (tests and load benchmarks).
#[cfg(feature = "fake")]
fn start_fake(config: &Config, model: &ModelConfig) -> Result<ServedModel, ServeError> {
    use tidepool_engine::fake::{FakeEngine, FakeEngineConfig};
    let limits = &config.limits;
    let mut engine_config = FakeEngineConfig::new(model.id.clone());
    engine_config.context_tokens = model.context_tokens;
    engine_config.seqs_max = model.seqs_max;
    engine_config.queue_len_max = limits.admission_queue_len_max;
    engine_config.chunks_buffered_max = limits.stream_chunks_buffered_max;
    engine_config.decode_step_cost = std::time::Duration::from_micros(model.fake_decode_step_us);
    engine_config.watchdog = watchdog_config(config);
    let kind = model.kind;
    FakeEngine::start(engine_config)
        .map(|engine| ServedModel::text(kind, engine))
        .map_err(|source| ServeError::Engine {
            model: model.id.to_string(),
            source,
        })
}

/// Without the `fake` feature there is no fake engine (`load_models` refuses such a config first).
#[cfg(not(feature = "fake"))]
fn start_fake(_config: &Config, model: &ModelConfig) -> Result<ServedModel, ServeError> {
    Err(ServeError::FakeEngineNotBuilt {
        model: model.id.to_string(),
    })
}

/// Makes each configured model's price the one in force in the ledger's price book (a new
/// version from now when the config changed; see `Ledger::sync_price`).
pub async fn sync_prices(config: &Config, ledger: &Ledger) -> Result<(), ServeError> {
    for model in &config.models {
        let price = PriceVersion {
            model: model.id.clone(),
            effective_from_ms: 0,
            currency: model.currency,
            input_per_mtok: model.price_input_per_mtok,
            output_per_mtok: model.price_output_per_mtok,
            cached_input_per_mtok: model.cached_input_price(),
        };
        if ledger
            .sync_price(&price, &tidepool_ledger::AuditContext::SYSTEM)
            .await?
        {
            tracing::info!(model = %model.id, "price book updated from the config");
        }
    }
    Ok(())
}
