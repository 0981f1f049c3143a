//! Metering: [`UsageGuard`] writes exactly one usage entry per authenticated request, whatever
//! happens to it. The guard is created right after authentication and is dropped exactly once:
//! at the end of a non-streamed handler, or with the SSE stream when the stream ends or axum
//! drops it because the client went away. `Drop` settles: an outcome that was never set means the
//! client disconnected, and the entry counts only the completion tokens handed to the client.
//!
//! Billing (`[billing] enforce`, the default): before any compute the request reserves its most
//! possible cost ([`UsageGuard::reserve`]); a stream checkpoints its delivered completion tokens
//! durably on the first token and every `checkpoint_tokens` after (so a crash bills them); `Drop`
//! then **settles** the reservation at the exact cost of the entry, or **voids** it when the
//! request failed (or the client left) before a single completion token was delivered — except
//! for successful requests that produce no completion tokens by nature (embeddings), which
//! settle. A request that never reserved (refused before admission) only records its entry.
//!
//! The ledger write is spawned on the state's `TaskTracker` (so shutdown drains it) before the
//! guard releases the engine's `Generation`; a failed write is logged and counted, never lost
//! silently: the reservation stays open in the database and the recovery sweep resolves it. A
//! successful non-streamed answer (and an embedding) is sent only once its settlement is durable
//! ([`UsageGuard::settle_before_reply`]): a crash in between would otherwise leave a whole answer
//! delivered and, having no checkpoint, voided by recovery.

use tidepool_core::{KeyId, ModelId, RequestId, TenantId};
use tidepool_engine::{Generation, GenerationEvent};
use tidepool_ledger::{
    ApiKeyRecord, AuditActor, AuditContext, Finish, NewBatchLine, ProjectId, RateLimitStatus,
    Reservation, ReserveClass, ReserveRequest, UsageEntry, UsageScope, UsageStatus,
};

/// How wide a caller's `/v1/usage` query is; always within the caller's own tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UsageBreadth {
    Key,
    Project,
    Tenant,
}
use std::time::Duration;

use tokio::time::Instant;
use tracing::Instrument as _;

use crate::alerts::AlertEvent;
use crate::batch_line::{BATCH_LINE, BatchLineContext};
use crate::error::ApiError;
use crate::leak::Verdict;
use crate::metrics;
use crate::state::{AppState, ModelEngine, ServedModel};
use crate::trace::{self, Phases};

/// The usage entry under construction for one request; settles on drop.
#[derive(Debug)]
pub(crate) struct UsageGuard {
    state: AppState,
    request_id: RequestId,
    tenant: TenantId,
    project: ProjectId,
    key_id: KeyId,
    endpoint: &'static str,
    started: Instant,
    span: tracing::Span,
    /// The model request's span (`trace::model_span`), once the model is known.
    model_span: tracing::Span,
    /// When the local generation passed its phases, for the trace.
    phases: Phases,
    /// The engine's finish reason, once it said `Done`.
    finish_reason: Option<&'static str>,
    model: Option<ModelId>,
    prompt_tokens: u32,
    /// `None`: the backend did not report it (stored as unknown, billed as uncached input).
    cached_prompt_tokens: Option<u32>,
    /// Completion tokens handed to the client so far (final count once `outcome` is `Ok`).
    completion_tokens: u32,
    outcome: Option<UsageStatus>,
    /// The request's reservation, once admission granted it.
    reservation: Option<Reservation>,
    /// When the first generated chunk arrived, from `started`.
    first_token: Option<Duration>,
    /// Completion tokens covered by the last durable checkpoint sent.
    checkpointed: u32,
    /// Held so that cancelling the generation happens after the settlement is spawned.
    generation: Option<Generation>,
    /// The entry was written by [`UsageGuard::settle_before_reply`]; `Drop` has nothing to do.
    written: bool,
    /// The batch line this request runs, when the batch runner sent it (`batch::BATCH_LINE`).
    batch_line: Option<BatchLineContext>,
    /// A batch line's response body (JSON text), recorded with its settlement.
    batch_body: Option<String>,
}

impl UsageGuard {
    pub(crate) fn new(
        state: AppState,
        request_id: RequestId,
        key: ApiKeyRecord,
        endpoint: &'static str,
        started: Instant,
    ) -> Self {
        let span = tracing::Span::current();
        span.record("api_key_id", tracing::field::display(&key.key_id));
        span.record("tenant", key.tenant.as_str());
        span.record("project", key.project.as_str());
        Self {
            state,
            request_id,
            tenant: key.tenant,
            project: key.project,
            key_id: key.key_id,
            endpoint,
            started,
            span,
            model_span: tracing::Span::none(),
            phases: Phases::default(),
            finish_reason: None,
            model: None,
            prompt_tokens: 0,
            cached_prompt_tokens: Some(0),
            completion_tokens: 0,
            outcome: None,
            reservation: None,
            first_token: None,
            checkpointed: 0,
            generation: None,
            written: false,
            batch_line: BATCH_LINE.try_with(Clone::clone).ok(),
            batch_body: None,
        }
    }

    /// The engine's scheduling class: batch lines run on idle capacity.
    pub(crate) fn request_class(&self) -> tidepool_engine::RequestClass {
        if self.batch_line.is_some() {
            tidepool_engine::RequestClass::Batch
        } else {
            tidepool_engine::RequestClass::Online
        }
    }

    /// A batch line's successful response body, written with its settlement (so the line is
    /// answered exactly when it is billed). A no-op for online requests.
    pub(crate) fn set_batch_body(&mut self, body: &impl serde::Serialize) {
        if self.batch_line.is_some() {
            match serde_json::to_string(body) {
                Ok(text) => self.batch_body = Some(text),
                Err(error) => tracing::error!(%error, "cannot serialize a batch line's response"),
            }
        }
    }

    /// The line result to record with the settlement: only for a batch line that succeeded.
    fn batch_result(&self, entry: &UsageEntry) -> Option<NewBatchLine> {
        let line = self.batch_line.as_ref()?;
        let body = self.batch_body.clone()?;
        (entry.status == UsageStatus::Ok).then(|| NewBatchLine {
            batch_id: line.batch_id.clone(),
            custom_id: line.custom_id.clone(),
            line: line.line,
            succeeded: true,
            status_code: Some(200),
            body: Some(body),
            error_code: None,
            error_message: None,
        })
    }

    /// Admission: reserves the most this request can cost against the tenant's balance, the
    /// key's and project's monthly budgets and every RPM/TPM window, before any compute. Fails
    /// with 429 `insufficient_quota` / `rate_limit_exceeded` (and takes nothing). A no-op when
    /// billing is not enforced. The model must be set first.
    pub(crate) async fn reserve(
        &mut self,
        prompt_tokens: u32,
        completion_tokens_max: u32,
        idempotency_key: Option<String>,
    ) -> Result<(), ApiError> {
        if !self.state.billing().enforce {
            return Ok(());
        }
        let Some(model) = self.model.clone() else {
            return Err(ApiError::Ledger(tidepool_ledger::LedgerError::Invariant {
                what: "a reservation names its model",
            }));
        };
        let class = if self.batch_line.is_some() {
            ReserveClass::Batch {
                discount_ppm: self.state.billing().batch_discount_ppm_of(model.as_str()),
            }
        } else {
            ReserveClass::Online
        };
        let request = ReserveRequest {
            request_id: self.request_id,
            key_id: self.key_id.clone(),
            model,
            prompt_tokens,
            completion_tokens_max,
            idempotency_key,
            class,
        };
        let span = tracing::info_span!(parent: &self.model_span, "reserve",
            otel.status_code = tracing::field::Empty, error.type = tracing::field::Empty);
        let reserved = self
            .state
            .ledger()
            .reserve(&request)
            .instrument(span.clone())
            .await;
        let reservation = match reserved {
            Ok(reservation) => reservation,
            Err(error) => {
                if let tidepool_ledger::LedgerError::InsufficientQuota { scope, .. } = &error {
                    self.state.alerts().emit(AlertEvent::BudgetReached {
                        tenant: self.tenant.clone(),
                        project: self.project.to_string(),
                        key_id: self.key_id.clone(),
                        scope: *scope,
                        at_ms: self.state.now_ms(),
                    });
                }
                let error = ApiError::from(error);
                trace::record_error(&span, error.code());
                return Err(error);
            }
        };
        self.reservation = Some(reservation);
        Ok(())
    }

    /// The RPM/TPM windows that applied to this request's reservation, for response headers.
    pub(crate) fn rate_limits(&self) -> RateLimitStatus {
        self.reservation
            .as_ref()
            .map(|r| r.rate_limits)
            .unwrap_or_default()
    }

    pub(crate) fn request_id(&self) -> RequestId {
        self.request_id
    }

    /// The caller's own usage scope of the given breadth: a key only ever sees its own tenant.
    pub(crate) fn usage_scope(&self, breadth: UsageBreadth) -> UsageScope {
        match breadth {
            UsageBreadth::Key => UsageScope::Key {
                tenant: self.tenant.clone(),
                key_id: self.key_id.clone(),
            },
            UsageBreadth::Project => UsageScope::Project {
                tenant: self.tenant.clone(),
                project: self.project.clone(),
            },
            UsageBreadth::Tenant => UsageScope::Tenant(self.tenant.clone()),
        }
    }

    pub(crate) fn project(&self) -> &ProjectId {
        &self.project
    }

    pub(crate) fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    pub(crate) fn started(&self) -> Instant {
        self.started
    }

    /// The request's model is known: names it on the request's span and opens the model
    /// request's span.
    pub(crate) fn set_model(&mut self, served: &ServedModel) {
        let model = served.id.clone();
        self.span.record("model", model.as_str());
        let provider = match &served.engine {
            ModelEngine::Text(engine) if engine.is_remote() => None,
            ModelEngine::Text(_) | ModelEngine::Embedding(_) => Some(trace::LOCAL_PROVIDER),
        };
        self.model_span = trace::model_span(
            self.endpoint,
            &model,
            provider,
            self.tenant.as_str(),
            self.project.as_str(),
        );
        self.model = Some(model);
    }

    /// The model request's span (none before the model is known).
    pub(crate) fn model_span(&self) -> &tracing::Span {
        &self.model_span
    }

    /// Whether this request's project may have its text exported on its span.
    pub(crate) fn exports_content(&self) -> bool {
        self.state
            .telemetry()
            .exports_content_of(self.tenant.as_str(), self.project.as_str())
    }

    /// The engine said `Done` for this reason.
    pub(crate) fn set_finish_reason(&mut self, reason: &'static str) {
        self.finish_reason = Some(reason);
    }

    pub(crate) fn set_prompt_tokens(&mut self, prompt_tokens: u32) {
        self.prompt_tokens = prompt_tokens;
    }

    /// Hands the running generation to the guard; dropping the guard cancels it.
    pub(crate) fn attach(&mut self, generation: Generation) {
        self.phases.submitted(generation.prefill_started.clone());
        self.generation = Some(generation);
    }

    /// The next engine event, or `None` if the engine hung up (or nothing is attached).
    pub(crate) async fn next_event(&mut self) -> Option<GenerationEvent> {
        match self.generation.as_mut() {
            Some(generation) => generation.events.recv().await,
            None => None,
        }
    }

    /// A generated chunk arrived from the engine (the first one is the time to first token).
    pub(crate) fn chunk_arrived(&mut self) {
        if self.first_token.is_none() {
            self.first_token = Some(self.started.elapsed());
            self.phases.first_token();
        }
    }

    /// Counts completion tokens handed to the client, and checkpoints them durably on the
    /// first token and every `checkpoint_tokens` after (spawned: never awaited on the token path).
    pub(crate) fn delivered(&mut self, tokens: u32) {
        self.completion_tokens = self.completion_tokens.saturating_add(tokens);
        if self.reservation.is_none() || self.completion_tokens == 0 {
            return;
        }
        let every = self.state.billing().checkpoint_tokens;
        let due = self.checkpointed == 0
            || self.completion_tokens.saturating_sub(self.checkpointed) >= every;
        if !due {
            return;
        }
        self.checkpointed = self.completion_tokens;
        let ledger = self.state.ledger().clone();
        let request_id = self.request_id;
        let completion_tokens = self.completion_tokens;
        let span = self.span.clone();
        let write = async move {
            if let Err(error) = ledger.checkpoint(request_id, completion_tokens).await {
                tracing::warn!(parent: &span, %error, "could not checkpoint stream progress");
            }
        };
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            self.state.tasks().spawn_on(write, &handle);
        }
    }

    /// The request succeeded with these final counts.
    /// `cached`: prompt tokens served from a cached prefix, `None` when the backend did not say.
    pub(crate) fn succeed(
        &mut self,
        prompt_tokens: u32,
        cached: Option<u32>,
        completion_tokens: u32,
    ) {
        self.prompt_tokens = prompt_tokens;
        self.cached_prompt_tokens = cached;
        self.completion_tokens = completion_tokens;
        self.outcome = Some(UsageStatus::Ok);
    }

    /// The request failed; the entry keeps the counts gathered so far. A refusal by residency
    /// is audited (`residency.deny`, actor the key), off the request's path.
    pub(crate) fn fail(&mut self, error: &ApiError) {
        self.outcome = Some(UsageStatus::Error {
            code: error.code().to_owned(),
        });
        if let ApiError::Engine(tidepool_engine::EngineError::NoBackendInRegion { regions }) = error
        {
            self.audit_residency_denial(regions);
        }
    }

    fn audit_residency_denial(&self, regions: &[String]) {
        let audit = AuditContext::new(AuditActor::Key(self.key_id.clone()))
            .with_request_id(self.request_id);
        let target = format!("project:{}/{}", self.tenant, self.project);
        let details = serde_json::json!({
            "model": self.model.as_ref().map(ModelId::as_str),
            "endpoint": self.endpoint,
            "regions": regions,
        });
        let state = self.state.clone();
        let append = async move {
            // A failure is logged by `audit_event`; the refusal stands either way.
            drop(
                state
                    .audit_event(&audit, "residency.deny", &target, &details)
                    .await,
            );
        };
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            self.state.tasks().spawn_on(append, &handle);
        }
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
            // Never more than the prompt: a backend's odd count cannot make settlement fail.
            cached_prompt_tokens: self
                .cached_prompt_tokens
                .unwrap_or(0)
                .min(self.prompt_tokens),
            cached_prompt_tokens_unknown: self.cached_prompt_tokens.is_none(),
            status,
            latency_ms: u64::try_from(latency.as_millis()).unwrap_or(u64::MAX),
            created_at_ms: self.state.now_ms(),
        }
    }
}

impl UsageGuard {
    /// Writes the entry (settles the reservation) and waits until it is durable: a non-streamed
    /// answer is released only once it is billed, so a crash between the two can never leave a
    /// delivered answer unbilled (streams are covered by their checkpoints instead). The write
    /// runs on the task tracker, so it completes even if the client goes away meanwhile. An
    /// error means nothing was billed: the caller answers with it instead of the content.
    pub(crate) async fn settle_before_reply(mut self) -> Result<(), ApiError> {
        self.written = true;
        let (entry, finish) = self.prepare();
        let result = match self.spawn_write(entry.clone(), finish, false) {
            Some(handle) => match handle.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(error)) => Err(error),
                Err(_join) => Err(tidepool_ledger::LedgerError::WriterFailed),
            },
            None => Err(tidepool_ledger::LedgerError::WriterFailed),
        };
        match result {
            Ok(()) => Ok(()),
            Err(error) => {
                // The client gets this error instead of the answer: nothing was delivered, so
                // the reservation is voided (retried until the store is back) rather than left
                // open until a sweep, holding the tenant's money.
                let retry_void = error.is_unavailable() && finish.is_some();
                let error = ApiError::from(error);
                if retry_void {
                    let mut voided = entry;
                    voided.completion_tokens = 0;
                    voided.status = UsageStatus::Error {
                        code: error.code().to_owned(),
                    };
                    drop(self.spawn_write(voided, Some(Finish::Void), true));
                }
                Err(error)
            }
        }
    }

    /// Records the request's metrics and spawns its ledger write (settle, void, or only record),
    /// retrying while the database is unreachable; `None` when no runtime is left to run it.
    fn write(
        &mut self,
    ) -> Option<tokio::task::JoinHandle<Result<(), tidepool_ledger::LedgerError>>> {
        let (entry, finish) = self.prepare();
        self.spawn_write(entry, finish, true)
    }

    /// The final usage entry and what to do with the reservation (settle, void, or — never
    /// reserved — only record), with the request's metrics and span fields recorded.
    fn prepare(&mut self) -> (UsageEntry, Option<Finish>) {
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
        if entry.status == UsageStatus::Ok {
            metrics::cached_prompt_tokens(
                model_label,
                (!entry.cached_prompt_tokens_unknown).then_some(entry.cached_prompt_tokens),
            );
        }
        let duration = self.started.elapsed();
        metrics::request_duration(model_label, duration);
        if let Some(operation) = metrics::gen_ai_operation(self.endpoint) {
            let error_code = match &entry.status {
                UsageStatus::Ok => None,
                UsageStatus::Error { code } => Some(code.as_str()),
                UsageStatus::ClientDisconnected => Some("client_disconnected"),
            };
            metrics::gen_ai_request(&metrics::GenAiRequest {
                operation,
                model: model_label,
                error_code,
                duration,
                input_tokens: entry.prompt_tokens,
                output_tokens: entry.completion_tokens,
                first_token: self.first_token,
            });
        }
        self.span.record("prompt_tokens", entry.prompt_tokens);
        self.span
            .record("completion_tokens", entry.completion_tokens);
        self.span.record("total_ms", entry.latency_ms);
        self.record_trace(&entry);

        let finish = self.reservation.take().map(|_| {
            let nothing_delivered = entry.completion_tokens == 0;
            match &entry.status {
                UsageStatus::ClientDisconnected | UsageStatus::Error { .. }
                    if nothing_delivered =>
                {
                    Finish::Void
                }
                UsageStatus::Ok | UsageStatus::ClientDisconnected | UsageStatus::Error { .. } => {
                    Finish::Settle
                }
            }
        });
        (entry, finish)
    }

    /// Spawns the ledger write on the task tracker. With `retry`, a write that fails because
    /// the database is unreachable is kept in memory and tried again with backoff for up to
    /// `billing.settle_retry_ms_max` (settling is idempotent per request id: a retry of a write
    /// that did commit changes nothing).
    fn spawn_write(
        &self,
        entry: UsageEntry,
        finish: Option<Finish>,
        retry: bool,
    ) -> Option<tokio::task::JoinHandle<Result<(), tidepool_ledger::LedgerError>>> {
        let ledger = self.state.ledger().clone();
        let span = self.span.clone();
        let state = self.state.clone();
        let line = self.batch_result(&entry);
        let retry_for = if retry {
            Duration::from_millis(self.state.billing().settle_retry_ms_max)
        } else {
            Duration::ZERO
        };
        let settle_span = tracing::info_span!(parent: &self.model_span, "settle",
            otel.status_code = tracing::field::Empty);
        let write = async move {
            let deadline = Instant::now() + retry_for;
            let mut backoff = SETTLE_RETRY_BACKOFF_INITIAL;
            let mut pending = false;
            let written = loop {
                let written =
                    write_once(&state, &ledger, &entry, finish, line.as_ref(), &span).await;
                match &written {
                    Err(error) if error.is_unavailable() && Instant::now() + backoff < deadline => {
                        if !pending {
                            pending = true;
                            metrics::settlements_pending(1.0);
                            tracing::warn!(parent: &span, %error, request_id = %entry.request_id,
                                completion_tokens = entry.completion_tokens,
                                "the ledger is unreachable; the usage entry is kept in memory and retried");
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(SETTLE_RETRY_BACKOFF_MAX);
                    }
                    Ok(()) | Err(_) => break written,
                }
            };
            if pending {
                metrics::settlements_pending(-1.0);
                if written.is_ok() {
                    tracing::info!(parent: &span, request_id = %entry.request_id,
                        "usage entry written after the ledger came back");
                }
            }
            if let Err(error) = &written {
                metrics::usage_write_failure();
                tracing::error!(parent: &span, %error, request_id = %entry.request_id,
                    "could not write the usage entry");
                tracing::Span::current().record("otel.status_code", "error");
            }
            written
        }
        .instrument(settle_span);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            Some(self.state.tasks().spawn_on(write, &handle))
        } else {
            metrics::usage_write_failure();
            tracing::error!(parent: &self.span, request_id = %self.request_id,
                "no runtime left to write the usage entry");
            None
        }
    }
}

/// First wait before a settlement is retried while the database is unreachable.
const SETTLE_RETRY_BACKOFF_INITIAL: Duration = Duration::from_millis(100);
/// Longest wait between two retries of one settlement.
const SETTLE_RETRY_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// One attempt at the request's ledger write: settle, void, or (never reserved) only record;
/// the leak detector sees the settled cost.
async fn write_once(
    state: &AppState,
    ledger: &tidepool_ledger::Ledger,
    entry: &UsageEntry,
    finish: Option<Finish>,
    line: Option<&NewBatchLine>,
    span: &tracing::Span,
) -> Result<(), tidepool_ledger::LedgerError> {
    let Some(finish) = finish else {
        ledger.record_usage(entry).await?;
        // Billing off: no money moves, so the line's result is recorded on its own.
        if let Some(line) = line {
            let request_id = entry.request_id.to_string();
            ledger.record_batch_line(line, Some(&request_id)).await?;
        }
        return Ok(());
    };
    let settlement = match line {
        Some(line) => ledger.settle_batch_line(entry, finish, line).await?,
        None => ledger.finish(entry, finish).await?,
    };
    if settlement.capped {
        tracing::error!(parent: span, request_id = %entry.request_id,
            "usage exceeded its reservation; billed at the hold");
    }
    observe_spend(state, entry, settlement.cost.0).await;
    Ok(())
}

impl UsageGuard {
    /// The outcome on the model request's span, and its derived phase spans.
    fn record_trace(&self, entry: &UsageEntry) {
        let span = &self.model_span;
        if span.is_none() {
            return;
        }
        span.record("gen_ai.usage.input_tokens", i64::from(entry.prompt_tokens));
        span.record(
            "gen_ai.usage.output_tokens",
            i64::from(entry.completion_tokens),
        );
        match &entry.status {
            UsageStatus::Ok => {
                if let Some(model) = &entry.model {
                    span.record("gen_ai.response.model", model.as_str());
                }
                if let Some(reason) = self.finish_reason {
                    tidepool_telemetry::set_list_attribute(
                        span,
                        "gen_ai.response.finish_reasons",
                        vec![reason.to_owned()],
                    );
                }
            }
            UsageStatus::Error { code } => trace::record_error(span, code),
            UsageStatus::ClientDisconnected => {
                span.record("error.type", "client_disconnected");
            }
        }
        self.phases.emit(span);
    }
}

impl Drop for UsageGuard {
    fn drop(&mut self) {
        if !self.written {
            // Not awaited: the task tracker drains it at shutdown.
            drop(self.write());
        }
        // The generation (if any) drops after this, with the other fields: the settlement is
        // already tracked by the time the engine sees the cancellation.
    }
}

/// Feeds a settled cost to the leaked-key detector; a jump suspends the key.
async fn observe_spend(state: &AppState, entry: &UsageEntry, cost_nanos: i64) {
    let Some(leak) = state.leak() else {
        return;
    };
    let verdict = leak
        .lock()
        .on_spend(&entry.key_id, state.now_ms(), cost_nanos);
    if let Verdict::Suspend { reason } = verdict {
        // The record as the detector needs it: the key's tenant and project.
        match state.ledger().key(&entry.key_id).await {
            Ok(record) => {
                crate::suspend::suspend_key(state, &record, &reason, entry.request_id).await;
            }
            Err(error) => tracing::error!(%error, "cannot read a key to suspend"),
        }
    }
}
