//! [`AppState`]: everything a handler needs, built once at start-up and shared by reference —
//! the engines by model id, the ledger, the limits, the task tracker that owns every spawned
//! task (so shutdown can drain settlement writes) and the metrics handle.

use std::collections::BTreeMap;
use std::sync::Arc;

use tidepool_core::{Limits, ModelId, ModelKind};
use tidepool_engine::{EmbeddingEngine, TextEngine};
use tidepool_ledger::{Clock, Ledger, SystemClock};
use tokio_util::task::TaskTracker;

/// The engine behind one served model.
#[derive(Debug, Clone)]
pub enum ModelEngine {
    /// `chat` or `completion` models.
    Text(Arc<dyn TextEngine>),
    /// `embedding` models.
    Embedding(Arc<dyn EmbeddingEngine>),
}

/// One model the gateway serves.
#[derive(Debug, Clone)]
pub struct ServedModel {
    pub id: ModelId,
    pub kind: ModelKind,
    /// Longest prompt + completion (text) or input (embedding), in tokens.
    pub context_tokens: u32,
    pub engine: ModelEngine,
}

impl ServedModel {
    /// A text model; `kind` must be `Chat` or `Completion`.
    pub fn text(kind: ModelKind, engine: Arc<dyn TextEngine>) -> Self {
        assert!(
            kind != ModelKind::Embedding,
            "text engines serve chat or completion models"
        );
        Self {
            id: engine.model_id().clone(),
            kind,
            context_tokens: engine.context_tokens(),
            engine: ModelEngine::Text(engine),
        }
    }

    pub fn embedding(engine: Arc<dyn EmbeddingEngine>) -> Self {
        Self {
            id: engine.model_id().clone(),
            kind: ModelKind::Embedding,
            context_tokens: engine.input_tokens_max(),
            engine: ModelEngine::Embedding(engine),
        }
    }
}

/// Shared, cheap-to-clone application state.
#[derive(Debug, Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    models: BTreeMap<ModelId, ServedModel>,
    ledger: Ledger,
    limits: Limits,
    tasks: TaskTracker,
    clock: Arc<dyn Clock>,
}

impl AppState {
    /// Builds the state. Model ids are unique (the config validated it; a duplicate here is a
    /// programming error).
    pub fn new(models: Vec<ServedModel>, ledger: Ledger, limits: Limits) -> Self {
        Self::with_clock(models, ledger, limits, Arc::new(SystemClock))
    }

    /// [`AppState::new`] with an injected wall clock (usage timestamps, `created` fields).
    pub fn with_clock(
        models: Vec<ServedModel>,
        ledger: Ledger,
        limits: Limits,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let count = models.len();
        let models: BTreeMap<ModelId, ServedModel> =
            models.into_iter().map(|m| (m.id.clone(), m)).collect();
        assert!(models.len() == count, "served model ids are unique");
        crate::metrics::install();
        Self {
            inner: Arc::new(Inner {
                models,
                ledger,
                limits,
                tasks: TaskTracker::new(),
                clock,
            }),
        }
    }

    pub fn model(&self, id: &str) -> Option<&ServedModel> {
        // ModelId orders by its string; a borrowed lookup avoids validating the input as a slug.
        self.inner.models.values().find(|m| m.id.as_str() == id)
    }

    pub fn models(&self) -> impl Iterator<Item = &ServedModel> {
        self.inner.models.values()
    }

    pub fn ledger(&self) -> &Ledger {
        &self.inner.ledger
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// Every task the gateway spawns goes through this tracker; shutdown closes and waits on it.
    pub fn tasks(&self) -> &TaskTracker {
        &self.inner.tasks
    }

    pub(crate) fn now_ms(&self) -> i64 {
        self.inner.clock.now_ms()
    }

    /// Unix seconds, for OpenAI `created` fields.
    pub(crate) fn now_s(&self) -> i64 {
        self.now_ms().div_euclid(1000)
    }
}
