//! The model request's trace (docs/operations.md, "Traces and logs"): one span per model
//! request, named `{gen_ai.operation.name} {gen_ai.request.model}` with the OpenTelemetry
//! `gen_ai.*` attributes and the tenant and project, under the HTTP request's span; its children are
//! `reserve` and `settle` (live spans around the ledger calls), `queue wait`, `prefill` and
//! `decode` (derived from when the request was submitted, when the engine began its prefill,
//! when its first token arrived and when it ended), and each `backend attempt` of a remote model
//! (`backends::routing`).
//!
//! Attributes are `tracing` fields, so log lines see them too: nothing here is ever prompt or
//! completion text. Text goes only to the exported span, and only for the projects listed in
//! `[telemetry] content_projects` (`tidepool_telemetry::set_text_attribute`).

use std::time::Instant;

use tidepool_core::ModelId;
use tidepool_engine::PrefillStart;
use tracing::field::Empty;

tokio::task_local! {
    /// The W3C trace id of the request being handled, as its log lines carry it
    /// (`tidepool_telemetry::continue_trace`); passed on to remote backends.
    pub(crate) static CURRENT_TRACE_ID: String;
}

/// The current request's trace id for logs, if called within one.
pub(crate) fn current_trace_id() -> Option<String> {
    CURRENT_TRACE_ID.try_with(Clone::clone).ok()
}

/// `gen_ai.provider.name` of models this process runs.
pub(crate) const LOCAL_PROVIDER: &str = "tidepool";

/// The OpenTelemetry `gen_ai.operation.name` of an endpoint (as `UsageGuard` names endpoints).
pub(crate) fn operation(endpoint: &str) -> &'static str {
    match endpoint {
        "chat.completions" => "chat",
        "embeddings" => "embeddings",
        _ => "text_completion",
    }
}

/// The span of one model request; `provider` is `None` for a remote model until an attempt
/// names its backend's kind.
pub(crate) fn model_span(
    endpoint: &str,
    model: &ModelId,
    provider: Option<&'static str>,
    tenant: &str,
    project: &str,
) -> tracing::Span {
    let operation = operation(endpoint);
    let span = tracing::info_span!(
        "model request",
        otel.name = %format_args!("{operation} {model}"),
        otel.kind = "internal",
        otel.status_code = Empty,
        gen_ai.operation.name = operation,
        gen_ai.provider.name = Empty,
        gen_ai.request.model = %model,
        gen_ai.response.model = Empty,
        gen_ai.usage.input_tokens = Empty,
        gen_ai.usage.output_tokens = Empty,
        error.type = Empty,
        tidepool.tenant.id = tenant,
        tidepool.project.id = project,
    );
    if let Some(provider) = provider {
        span.record("gen_ai.provider.name", provider);
    }
    span
}

/// A request's `error.type` and error status on its span.
pub(crate) fn record_error(span: &tracing::Span, code: &str) {
    span.record("error.type", code);
    span.record("otel.status_code", "error");
}

/// When a local generation passed each phase, as the gateway learned it.
#[derive(Debug, Default)]
pub(crate) struct Phases {
    /// The engine accepted the request (it entered the queue).
    submitted: Option<Instant>,
    /// Set by the engine thread when the sequence's prefill began.
    prefill_started: Option<PrefillStart>,
    first_token: Option<Instant>,
}

impl Phases {
    pub(crate) fn submitted(&mut self, prefill_started: PrefillStart) {
        self.submitted = Some(Instant::now());
        self.prefill_started = Some(prefill_started);
    }

    pub(crate) fn first_token(&mut self) {
        if self.first_token.is_none() {
            self.first_token = Some(Instant::now());
        }
    }

    /// Emits `queue wait`, `prefill` and `decode` under `parent`, each where its ends are known.
    pub(crate) fn emit(&self, parent: &tracing::Span) {
        let Some(submitted) = self.submitted else {
            return;
        };
        let now = Instant::now();
        let mut phases = Vec::with_capacity(3);
        if let Some(prefill) = self.prefill_started.as_ref().and_then(PrefillStart::get) {
            phases.push(("queue wait", submitted, prefill));
            phases.push(("prefill", prefill, self.first_token.unwrap_or(now)));
        }
        if let Some(first_token) = self.first_token {
            phases.push(("decode", first_token, now));
        }
        tidepool_telemetry::phase_spans(parent, &phases);
    }
}
