//! Metering: [`UsageGuard`] writes exactly one usage entry per authenticated request, whatever
//! happens to it. The guard is created right after authentication and is dropped exactly once:
//! at the end of a non-streamed handler, or with the SSE stream when the stream ends or axum
//! drops it because the client went away. `Drop` settles: an outcome that was never set means the
//! client disconnected, and the entry counts only the completion tokens handed to the client.
//!
//! The ledger write is spawned on the state's `TaskTracker` (so shutdown drains it) before the
//! guard releases the engine's `Generation`; a failed write is logged and counted, never lost
//! silently.

use tidepool_core::{KeyId, ModelId, RequestId, TenantId};
use tidepool_engine::{Generation, GenerationEvent};
use tidepool_ledger::{UsageEntry, UsageStatus};
use tokio::time::Instant;

use crate::error::ApiError;
use crate::metrics;
use crate::state::AppState;

/// The usage entry under construction for one request; settles on drop.
#[derive(Debug)]
pub(crate) struct UsageGuard {
    state: AppState,
    request_id: RequestId,
    tenant: TenantId,
    key_id: KeyId,
    endpoint: &'static str,
    started: Instant,
    span: tracing::Span,
    model: Option<ModelId>,
    prompt_tokens: u32,
    cached_prompt_tokens: u32,
    /// Completion tokens handed to the client so far (final count once `outcome` is `Ok`).
    completion_tokens: u32,
    outcome: Option<UsageStatus>,
    /// Held so that cancelling the generation happens after the settlement is spawned.
    generation: Option<Generation>,
}

impl UsageGuard {
    pub(crate) fn new(
        state: AppState,
        request_id: RequestId,
        tenant: TenantId,
        key_id: KeyId,
        endpoint: &'static str,
        started: Instant,
    ) -> Self {
        let span = tracing::Span::current();
        span.record("api_key_id", tracing::field::display(&key_id));
        Self {
            state,
            request_id,
            tenant,
            key_id,
            endpoint,
            started,
            span,
            model: None,
            prompt_tokens: 0,
            cached_prompt_tokens: 0,
            completion_tokens: 0,
            outcome: None,
            generation: None,
        }
    }

    pub(crate) fn request_id(&self) -> RequestId {
        self.request_id
    }

    pub(crate) fn started(&self) -> Instant {
        self.started
    }

    pub(crate) fn set_model(&mut self, model: ModelId) {
        self.span.record("model", model.as_str());
        self.model = Some(model);
    }

    pub(crate) fn set_prompt_tokens(&mut self, prompt_tokens: u32) {
        self.prompt_tokens = prompt_tokens;
    }

    /// Hands the running generation to the guard; dropping the guard cancels it.
    pub(crate) fn attach(&mut self, generation: Generation) {
        self.generation = Some(generation);
    }

    /// The next engine event, or `None` if the engine hung up (or nothing is attached).
    pub(crate) async fn next_event(&mut self) -> Option<GenerationEvent> {
        match self.generation.as_mut() {
            Some(generation) => generation.events.recv().await,
            None => None,
        }
    }

    /// Counts completion tokens handed to the client.
    pub(crate) fn delivered(&mut self, tokens: u32) {
        self.completion_tokens = self.completion_tokens.saturating_add(tokens);
    }

    /// The request succeeded with these final counts.
    pub(crate) fn succeed(&mut self, prompt_tokens: u32, cached: u32, completion_tokens: u32) {
        self.prompt_tokens = prompt_tokens;
        self.cached_prompt_tokens = cached;
        self.completion_tokens = completion_tokens;
        self.outcome = Some(UsageStatus::Ok);
    }

    /// The request failed; the entry keeps the counts gathered so far.
    pub(crate) fn fail(&mut self, error: &ApiError) {
        self.outcome = Some(UsageStatus::Error {
            code: error.code().to_owned(),
        });
    }

    fn entry(&mut self) -> UsageEntry {
        let status = self
            .outcome
            .take()
            .unwrap_or(UsageStatus::ClientDisconnected);
        let latency = self.started.elapsed();
        UsageEntry {
            request_id: self.request_id,
            tenant: self.tenant.clone(),
            key_id: self.key_id.clone(),
            model: self.model.clone(),
            endpoint: self.endpoint.to_owned(),
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            cached_prompt_tokens: self.cached_prompt_tokens,
            status,
            latency_ms: u64::try_from(latency.as_millis()).unwrap_or(u64::MAX),
            created_at_ms: self.state.now_ms(),
        }
    }
}

impl Drop for UsageGuard {
    fn drop(&mut self) {
        let entry = self.entry();
        let model_label = entry
            .model
            .as_ref()
            .map_or(metrics::NO_MODEL_LABEL, ModelId::as_str);
        if entry.status == UsageStatus::ClientDisconnected {
            metrics::client_disconnect(model_label);
            tracing::info!(parent: &self.span, completion_tokens = entry.completion_tokens, "client disconnected");
        }
        metrics::tokens(model_label, entry.prompt_tokens, entry.completion_tokens);
        metrics::request_duration(model_label, self.started.elapsed());
        self.span.record("prompt_tokens", entry.prompt_tokens);
        self.span
            .record("completion_tokens", entry.completion_tokens);
        self.span.record("total_ms", entry.latency_ms);

        let ledger = self.state.ledger().clone();
        let span = self.span.clone();
        let write = async move {
            match ledger.record_usage(&entry).await {
                Ok(_) => {}
                Err(error) => {
                    metrics::usage_write_failure();
                    tracing::error!(parent: &span, %error, request_id = %entry.request_id,
                        "could not write the usage entry");
                }
            }
        };
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            self.state.tasks().spawn_on(write, &handle);
        } else {
            metrics::usage_write_failure();
            tracing::error!(parent: &self.span, request_id = %self.request_id,
                "no runtime left to write the usage entry");
        }
        // The generation (if any) drops after this, with the other fields: the settlement is
        // already tracked by the time the engine sees the cancellation.
    }
}
