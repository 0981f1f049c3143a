//! Routing: a remote model is a [`RoutedEngine`], and each request runs on a task (`Job`) that
//! keeps the backends the tenant's regions allow (residency), orders them home region first, then
//! fewest requests in flight, and tries them in turn, skipping a full one (its concurrency
//! permits) or one whose breaker is open. A failure before anything reached the client is retried
//! on the next backend, up to `routing.retry_attempts_max` attempts; after the first delivered
//! token the request ends with `EngineError::Backend`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use tidepool_core::{ModelId, TokenCount};
use tidepool_engine::{
    ChatMessage, EngineError, EngineStats, GenerateRequest, Generation, GenerationEvent,
    RemoteInput, TextEngine, TokenId,
};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use super::backend::Backend;
use super::upstream::{AttemptError, Call};

/// A remote model: routes each request to one of its backends.
#[derive(Debug)]
pub(crate) struct RoutedEngine {
    pub(super) model: ModelId,
    pub(super) context_tokens: TokenCount,
    /// This model's backends, in configuration order.
    pub(super) backends: Vec<Arc<Backend>>,
    /// The region this gateway runs in: its backends are tried first.
    pub(super) home_region: String,
    /// `routing.retry_attempts_max`.
    pub(super) attempts_max: u32,
    pub(super) chunks_buffered_max: usize,
    pub(super) tasks: TaskTracker,
    pub(super) active: Arc<AtomicU32>,
}

impl TextEngine for RoutedEngine {
    fn model_id(&self) -> &ModelId {
        &self.model
    }

    fn context_tokens(&self) -> TokenCount {
        self.context_tokens
    }

    /// Only for the gateway's logs and estimates: the backend applies the real template.
    fn apply_chat_template(&self, messages: &[ChatMessage]) -> Result<String, EngineError> {
        let mut text = String::new();
        for m in messages {
            text.push_str(&m.role);
            text.push_str(": ");
            text.push_str(&m.content);
            text.push('\n');
        }
        Ok(text)
    }

    fn tokenize(&self, _text: &str) -> Result<Vec<TokenId>, EngineError> {
        Err(EngineError::Tokenize {
            reason: "a remote model is tokenized by its backend".to_owned(),
        })
    }

    fn submit(&self, request: GenerateRequest) -> Result<Generation, EngineError> {
        let Some(input) = request.remote.clone() else {
            return Err(EngineError::InvalidRequest {
                param: "prompt",
                reason: "a remote model needs the prompt text".to_owned(),
            });
        };
        let eligible: Vec<Arc<Backend>> = self
            .backends
            .iter()
            .filter(|b| {
                input
                    .regions
                    .as_ref()
                    .is_none_or(|allowed| allowed.contains(&b.region))
            })
            .cloned()
            .collect();
        if eligible.is_empty() {
            return Err(no_backend_in_region(&self.model, &input));
        }
        let (tx, rx) = mpsc::channel(self.chunks_buffered_max);
        let job = Job {
            candidates: order(eligible, &self.home_region),
            attempts_max: self.attempts_max,
            call: Call {
                model: self.model.clone(),
                request,
                input,
                tx,
            },
            // Submitted within the model request's span: each attempt is its child.
            span: tracing::Span::current(),
            trace_id: crate::trace::current_trace_id(),
        };
        let active = Arc::clone(&self.active);
        active.fetch_add(1, Ordering::Relaxed);
        self.tasks.spawn(async move {
            job.run().await;
            active.fetch_sub(1, Ordering::Relaxed);
        });
        Ok(Generation {
            events: rx,
            prefill_started: tidepool_engine::PrefillStart::default(),
        })
    }

    fn stats(&self) -> EngineStats {
        EngineStats {
            queued: 0,
            active: self.active.load(Ordering::Relaxed),
        }
    }

    fn is_remote(&self) -> bool {
        true
    }
}

/// An attempt's outcome on its span.
fn record_attempt(span: &tracing::Span, result: &Result<(), AttemptError>) {
    let (status, error) = match result {
        Ok(()) => return,
        Err(AttemptError::Failed { status }) => (*status, "backend_failed"),
        Err(AttemptError::Rejected { status }) => (Some(*status), "backend_rejected"),
        Err(AttemptError::Busy) => (Some(429), "backend_busy"),
        Err(AttemptError::ClientGone) => (None, "client_disconnected"),
    };
    if let Some(status) = status {
        span.record("http.response.status_code", i64::from(status));
    }
    span.record("error.type", error);
    span.record("otel.status_code", "error");
}

fn no_backend_in_region(model: &ModelId, input: &RemoteInput) -> EngineError {
    let regions = input.regions.clone().unwrap_or_default();
    tracing::warn!(target: "audit", model = %model, regions = ?regions,
        "residency: refused a request, no backend available in the tenant's regions");
    EngineError::NoBackendInRegion { regions }
}

/// Home region first, then fewest requests in flight; configuration order breaks ties.
fn order(mut backends: Vec<Arc<Backend>>, home_region: &str) -> Vec<Arc<Backend>> {
    backends.sort_by_key(|b| (b.region != home_region, b.in_flight()));
    backends
}

/// One request's routing task.
#[derive(Debug)]
struct Job {
    /// The eligible backends, best first.
    candidates: Vec<Arc<Backend>>,
    attempts_max: u32,
    /// What each attempt sends, and where the events go.
    call: Call,
    /// The model request's span.
    span: tracing::Span,
    /// The request's trace id as its logs carry it (sent on when spans are not exported).
    trace_id: Option<String>,
}

impl Job {
    async fn run(self) {
        let tx = self.call.tx.clone();
        tokio::select! {
            () = self.route() => {}
            () = tx.closed() => {}
        }
    }

    async fn route(&self) {
        let mut attempts = 0_u32;
        let mut busy = false;
        let mut last_failed: Option<(String, Option<u16>)> = None;
        for backend in &self.candidates {
            if attempts >= self.attempts_max {
                break;
            }
            let Ok(permit) = Arc::clone(&backend.permits).try_acquire_owned() else {
                busy = true;
                continue;
            };
            if !backend.breaker.lock().allow(Instant::now()) {
                continue;
            }
            attempts = attempts.saturating_add(1);
            let mut delivered = false;
            match self.attempt(backend, permit, &mut delivered).await {
                Ok(()) | Err(AttemptError::ClientGone) => return,
                Err(AttemptError::Busy) => busy = true,
                Err(AttemptError::Rejected { status }) => {
                    self.fail(EngineError::Backend {
                        backend: backend.id.clone(),
                        status: Some(status),
                    })
                    .await;
                    return;
                }
                Err(AttemptError::Failed { status }) => {
                    tracing::warn!(backend = %backend.id, model = %self.call.model, status,
                        delivered, "backend attempt failed");
                    if delivered {
                        self.fail(EngineError::Backend {
                            backend: backend.id.clone(),
                            status,
                        })
                        .await;
                        return;
                    }
                    last_failed = Some((backend.id.clone(), status));
                }
            }
        }
        let error = if self.call.input.regions.is_some() {
            no_backend_in_region(&self.call.model, &self.call.input)
        } else if let Some((backend, status)) = last_failed {
            EngineError::Backend { backend, status }
        } else if busy {
            EngineError::Overloaded {
                retry_after_ms: 1000,
            }
        } else {
            EngineError::Backend {
                backend: "none".to_owned(),
                status: None,
            }
        };
        self.fail(error).await;
    }

    async fn fail(&self, error: EngineError) {
        if self
            .call
            .tx
            .send(GenerationEvent::Failed(error))
            .await
            .is_err()
        {
            tracing::debug!("client gone before the routing failure was delivered");
        }
    }

    /// One attempt on one backend, bounded by its `timeout_ms`; records the outcome on the
    /// backend's breaker.
    async fn attempt(
        &self,
        backend: &Backend,
        permit: OwnedSemaphorePermit,
        delivered: &mut bool,
    ) -> Result<(), AttemptError> {
        let started = Instant::now();
        let kind = backend.kind_name();
        let span = tracing::info_span!(parent: &self.span, "backend attempt",
            otel.name = %format_args!("backend attempt {}", backend.id),
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            tidepool.backend.id = %backend.id,
            tidepool.backend.kind = kind,
            tidepool.backend.region = %backend.region,
            server.address = %backend.url,
            http.response.status_code = tracing::field::Empty,
            error.type = tracing::field::Empty,
        );
        let trace = super::upstream::TraceHeaders {
            span: &span,
            trace_id: self.trace_id.as_deref(),
        };
        let result = tokio::time::timeout(
            backend.timeout,
            self.call.stream_from(backend, delivered, trace),
        )
        .instrument(span.clone())
        .await
        .unwrap_or(Err(AttemptError::Failed { status: None }));
        drop(permit);
        record_attempt(&span, &result);
        if result.is_ok() {
            self.span.record("gen_ai.provider.name", kind);
        }
        match &result {
            Ok(()) => backend.record(Some(started.elapsed())),
            Err(AttemptError::Failed { .. }) => backend.record(None),
            Err(AttemptError::Rejected { .. } | AttemptError::Busy | AttemptError::ClientGone) => {
                backend.breaker.lock().on_neutral();
            }
        }
        result
    }
}
