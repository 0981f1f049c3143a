//! Start-up: builds the served models from `Config` (llama.cpp for `chat`/`completion`, candle
//! for `embedding`) and the error type of `serve`. Start-up failures never reach an HTTP client,
//! so they are not `ApiError` variants (which each need a status): they are [`ServeError`].

use std::time::Duration;

use tidepool_core::{Backend, Config, ModelKind};
use tidepool_engine::EngineError;
use tidepool_engine::embed::{CandleEmbeddingConfig, CandleEmbeddingEngine};
use tidepool_engine::fake::{FakeEngine, FakeEngineConfig};
use tidepool_engine::llama::{LlamaEngine, LlamaEngineConfig};
use tidepool_ledger::{Ledger, LedgerError, PriceVersion};

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
}

/// Loads every configured model, one at a time, on the blocking pool (loading reads whole files
/// and builds contexts: seconds of blocking work).
pub async fn load_models(config: &Config) -> Result<Vec<ServedModel>, ServeError> {
    let mut served = Vec::with_capacity(config.models.len());
    for model in &config.models {
        let path = config.model_path(model);
        let limits = &config.limits;
        let id = model.id.clone();
        tracing::info!(model = %id, path = %path.display(), "loading model");
        let kind = model.kind;
        let loaded = match (model.backend, kind) {
            (Backend::Fake, ModelKind::Chat | ModelKind::Completion) => {
                let mut engine_config = FakeEngineConfig::new(id.clone());
                engine_config.context_tokens = model.context_tokens;
                engine_config.seqs_max = model.seqs_max;
                engine_config.queue_len_max = limits.admission_queue_len_max;
                engine_config.chunks_buffered_max = limits.stream_chunks_buffered_max;
                engine_config.decode_step_cost = Duration::from_micros(model.fake_decode_step_us);
                Ok(FakeEngine::start(engine_config).map(|engine| ServedModel::text(kind, engine)))
            }
            (Backend::Auto, ModelKind::Chat | ModelKind::Completion) => {
                let mut engine_config = LlamaEngineConfig::new(id.clone(), path);
                engine_config.context_tokens = model.context_tokens;
                engine_config.seqs_max = model.seqs_max;
                engine_config.threads = config.engine.threads;
                engine_config.batch_tokens_max = config.engine.batch_tokens_max.max(model.seqs_max);
                engine_config.queue_len_max = limits.admission_queue_len_max;
                engine_config.chunks_buffered_max = limits.stream_chunks_buffered_max;
                tokio::task::spawn_blocking(move || {
                    LlamaEngine::load(engine_config).map(|engine| ServedModel::text(kind, engine))
                })
                .await
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
        let model = loaded
            .map_err(ServeError::LoadInterrupted)?
            .map_err(|source| ServeError::Engine {
                model: id.to_string(),
                source,
            })?;
        served.push(model);
    }
    Ok(served)
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
            cached_input_per_mtok: model.price_cached_input_per_mtok,
        };
        if ledger.sync_price(&price).await? {
            tracing::info!(model = %model.id, "price book updated from the config");
        }
    }
    Ok(())
}
