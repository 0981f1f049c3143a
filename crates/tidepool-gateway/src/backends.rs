//! Remote backends: `tidepool worker`s and external OpenAI-compatible servers behind the
//! `backend = "remote"` models (docs/regions.md).
//!
//! A remote model is a [`RoutedEngine`], an ordinary [`TextEngine`]: the gateway's generation,
//! SSE and metering code does not know where the tokens come from, so billing is the same code
//! path as for local models. Each request runs on a task that picks a backend (residency filter
//! first, then breaker, home region, load), streams from it (`stream: true` with
//! `stream_options.include_usage`, always) and turns its SSE into `GenerationEvent`s. A failure
//! before anything reached the client is retried on the next eligible backend, up to
//! `routing.retry_attempts_max` attempts; after the first delivered token the request ends with
//! `EngineError::Backend` and the gateway bills the delivered tokens only.
//!
//! Token counts come from the backend's `usage` (a remote model has no local tokenizer): the
//! reservation uses an upper bound ([`prompt_tokens_bound`]), the settlement the backend's count.
//! While streaming, every content chunk counts as one delivered token (OpenAI-compatible servers
//! send one chunk per token); the final `Done` carries the backend's exact completion count.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt as _;
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::{Value, json};
use tidepool_core::{BackendConfig, BackendKind, ModelId, RoutingConfig, TokenCount};
use tidepool_engine::{
    ChatMessage, EngineError, EngineStats, FinishReason, GenerateRequest, Generation,
    GenerationEvent, RemoteInput, RemotePrompt, TextEngine, TokenId,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use utoipa::ToSchema;

/// Outcomes remembered per backend for the error-rate rule of the breaker.
pub(crate) const OUTCOMES_WINDOW_LEN: usize = 20;
/// Outcomes needed in the window before the error rate can open the breaker.
const OUTCOMES_RATE_MIN: usize = 10;
/// Bytes of one SSE line from a backend; a longer line fails the attempt.
const SSE_LINE_BYTES_MAX: usize = 1 << 20;
/// Health probes that must time out in a row (backend idle) before one counts as a failure.
const PROBE_TIMEOUTS_IN_A_ROW_MAX: u32 = 2;
/// Longest non-stream answer body read from a backend, in bytes.
const RESPONSE_BYTES_MAX: usize = 16 << 20;
/// Tokens added to a remote prompt's byte count for the reservation's upper bound (special
/// tokens of a chat template the backend applies).
const PROMPT_TEMPLATE_TOKENS_MAX: u32 = 64;
/// Per chat message, the same.
const MESSAGE_TEMPLATE_TOKENS_MAX: u32 = 8;
/// Limit of the start-up probe of each backend (a cold worker may be slow to answer once).
pub(crate) const STARTUP_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// A bearer token for a backend; never printed.
#[derive(Clone)]
pub(crate) struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Breaker state, as shown on `/v1/backends`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Requests flow.
    Closed,
    /// Requests skip this backend until the open period ends or a health probe succeeds.
    Open,
    /// One trial request decides.
    HalfOpen,
}

/// A circuit breaker: opens on `failures_max` consecutive failures, on an error rate of half or
/// more over the last [`OUTCOMES_WINDOW_LEN`] outcomes, or on a failed health probe; after
/// `open_for` lets one trial through (half-open); a success or a good probe closes it. Sans-IO:
/// the caller passes the time.
#[derive(Debug)]
pub(crate) struct Breaker {
    state: BreakerState,
    open_until: Option<Instant>,
    trial_in_flight: bool,
    consecutive_failures: u32,
    outcomes: std::collections::VecDeque<bool>,
    failures_max: u32,
    open_for: Duration,
}

impl Breaker {
    pub(crate) fn new(failures_max: u32, open_for: Duration) -> Self {
        assert!(failures_max > 0, "validated by the config");
        Self {
            state: BreakerState::Closed,
            open_until: None,
            trial_in_flight: false,
            consecutive_failures: 0,
            outcomes: std::collections::VecDeque::with_capacity(OUTCOMES_WINDOW_LEN),
            failures_max,
            open_for,
        }
    }

    pub(crate) fn state(&self) -> BreakerState {
        self.state
    }

    /// Whether a request may go to this backend now (a half-open breaker admits one trial).
    pub(crate) fn allow(&mut self, now: Instant) -> bool {
        match self.state {
            BreakerState::Closed => true,
            BreakerState::Open => {
                if self.open_until.is_some_and(|until| now >= until) {
                    self.state = BreakerState::HalfOpen;
                    self.trial_in_flight = true;
                    true
                } else {
                    false
                }
            }
            BreakerState::HalfOpen => {
                if self.trial_in_flight {
                    false
                } else {
                    self.trial_in_flight = true;
                    true
                }
            }
        }
    }

    fn remember(&mut self, ok: bool) {
        if self.outcomes.len() == OUTCOMES_WINDOW_LEN {
            self.outcomes.pop_front();
        }
        self.outcomes.push_back(ok);
        assert!(
            self.outcomes.len() <= OUTCOMES_WINDOW_LEN,
            "window is bounded"
        );
    }

    pub(crate) fn on_success(&mut self) {
        self.remember(true);
        self.consecutive_failures = 0;
        self.trial_in_flight = false;
        self.state = BreakerState::Closed;
        self.open_until = None;
    }

    /// An attempt that says nothing about the backend's health (it was busy, the request was
    /// refused, the client left): a half-open breaker may try again.
    pub(crate) fn on_neutral(&mut self) {
        self.trial_in_flight = false;
    }

    pub(crate) fn on_failure(&mut self, now: Instant) {
        self.remember(false);
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        self.trial_in_flight = false;
        let failed = self.outcomes.iter().filter(|ok| !**ok).count();
        let rate_open =
            self.outcomes.len() >= OUTCOMES_RATE_MIN && failed * 2 >= self.outcomes.len();
        if self.state == BreakerState::HalfOpen
            || self.consecutive_failures >= self.failures_max
            || rate_open
        {
            self.open(now);
        }
    }

    fn open(&mut self, now: Instant) {
        self.state = BreakerState::Open;
        self.open_until = Some(now + self.open_for);
        self.trial_in_flight = false;
    }

    /// A health probe's result: a failed probe opens the breaker at once; a good one closes an
    /// open breaker (the backend is back) and clears the error window.
    pub(crate) fn on_probe(&mut self, ok: bool, now: Instant) {
        if ok {
            if self.state != BreakerState::Closed {
                self.state = BreakerState::Closed;
                self.open_until = None;
                self.trial_in_flight = false;
                self.consecutive_failures = 0;
                self.outcomes.clear();
            }
        } else if self.state == BreakerState::Closed || self.state == BreakerState::HalfOpen {
            self.open(now);
        }
    }
}

/// Exponentially weighted latency of successful attempts, in microseconds (0: none yet).
#[derive(Debug, Default)]
struct Latency {
    ewma_us: AtomicU64,
}

impl Latency {
    fn record(&self, elapsed: Duration) {
        let sample = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let old = self.ewma_us.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            // 1/8 weight for the new sample, integer arithmetic.
            old.saturating_mul(7).saturating_add(sample) / 8
        };
        self.ewma_us.store(new, Ordering::Relaxed);
    }
}

/// One configured backend with its live state.
#[derive(Debug)]
pub(crate) struct Backend {
    pub(crate) id: String,
    pub(crate) kind: BackendKind,
    pub(crate) url: String,
    pub(crate) region: String,
    pub(crate) zone: String,
    pub(crate) models: Vec<ModelId>,
    aliases: BTreeMap<String, String>,
    api_key: Option<Secret>,
    timeout: Duration,
    concurrency_max: u32,
    permits: Arc<Semaphore>,
    client: reqwest::Client,
    breaker: Mutex<Breaker>,
    healthy: AtomicBool,
    /// Health probes in a row that timed out (a refused connection fails at once).
    probe_timeouts: AtomicU32,
    latency: Latency,
    attempts_ok: AtomicU64,
    attempts_failed: AtomicU64,
}

/// Why a backend could not be set up at start-up.
#[derive(Debug, thiserror::Error)]
pub enum BackendSetupError {
    #[error("backend `{backend}`: cannot read its API key: {reason}")]
    ApiKey { backend: String, reason: String },
    #[error("backend `{backend}`: cannot build an HTTP client: {source}")]
    Client {
        backend: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("backend `{backend}` at {url} did not answer its health probe at start-up")]
    Unreachable { backend: String, url: String },
}

fn read_api_key(config: &BackendConfig) -> Result<Option<Secret>, BackendSetupError> {
    let error = |reason: String| BackendSetupError::ApiKey {
        backend: config.id.clone(),
        reason,
    };
    if let Some(var) = &config.api_key_env {
        let value = std::env::var(var).map_err(|_| error(format!("${var} is not set")))?;
        return Ok(Some(Secret(value.trim().to_owned())));
    }
    if let Some(path) = &config.api_key_file {
        let value =
            std::fs::read_to_string(path).map_err(|e| error(format!("{}: {e}", path.display())))?;
        return Ok(Some(Secret(value.trim().to_owned())));
    }
    Ok(None)
}

impl Backend {
    pub(crate) fn new(
        config: &BackendConfig,
        routing: &RoutingConfig,
    ) -> Result<Self, BackendSetupError> {
        let api_key = read_api_key(config)?;
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(routing.connect_timeout_ms))
            // Small requests on keep-alive connections: never wait for Nagle.
            .tcp_nodelay(true)
            .pool_max_idle_per_host(usize::try_from(config.concurrency_max).unwrap_or(usize::MAX))
            .build()
            .map_err(|source| BackendSetupError::Client {
                backend: config.id.clone(),
                source,
            })?;
        Ok(Self {
            id: config.id.clone(),
            kind: config.kind,
            url: config.url.trim_end_matches('/').to_owned(),
            region: config.region.clone(),
            zone: config.zone.clone(),
            models: config.models.clone(),
            aliases: config.aliases.clone(),
            api_key,
            timeout: Duration::from_millis(config.timeout_ms),
            concurrency_max: config.concurrency_max,
            permits: Arc::new(Semaphore::new(
                usize::try_from(config.concurrency_max).unwrap_or(usize::MAX),
            )),
            client,
            breaker: Mutex::new(Breaker::new(
                routing.breaker_failures_max,
                Duration::from_millis(routing.breaker_open_ms),
            )),
            healthy: AtomicBool::new(true),
            probe_timeouts: AtomicU32::new(0),
            latency: Latency::default(),
            attempts_ok: AtomicU64::new(0),
            attempts_failed: AtomicU64::new(0),
        })
    }

    fn upstream_model<'a>(&'a self, model: &'a ModelId) -> &'a str {
        self.aliases
            .get(model.as_str())
            .map_or(model.as_str(), String::as_str)
    }

    pub(crate) fn status_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    fn in_flight(&self) -> u32 {
        let free = u32::try_from(self.permits.available_permits()).unwrap_or(u32::MAX);
        self.concurrency_max.saturating_sub(free)
    }

    /// One health probe: `/healthz` on a worker, `/v1/models` (authenticated) on an upstream.
    pub(crate) async fn probe(&self, timeout: Duration) -> bool {
        let path = match self.kind {
            BackendKind::Worker => "/healthz",
            BackendKind::Upstream => "/v1/models",
        };
        let mut request = self
            .client
            .get(format!("{}{path}", self.url))
            .timeout(timeout);
        if let Some(Secret(key)) = &self.api_key {
            request = request.bearer_auth(key);
        }
        let outcome = request.send().await;
        // A probe that only timed out is no verdict while this backend serves our requests, and
        // counts only from the second in a row otherwise: some servers (llama-cpp-python) answer
        // `/v1/models` only between generations. A refused connection or an error status counts
        // at once, so a dead process is still caught within one probe.
        if matches!(&outcome, Err(error) if error.is_timeout()) {
            let busy = self.in_flight() > 0;
            let in_a_row = if busy {
                0
            } else {
                self.probe_timeouts.fetch_add(1, Ordering::Relaxed) + 1
            };
            if busy || in_a_row < PROBE_TIMEOUTS_IN_A_ROW_MAX {
                tracing::debug!(backend = %self.id, busy, "health probe timed out; no verdict yet");
                return self.healthy.load(Ordering::Relaxed);
            }
        } else {
            self.probe_timeouts.store(0, Ordering::Relaxed);
        }
        let ok = matches!(outcome, Ok(response) if response.status().is_success());
        self.healthy.store(ok, Ordering::Relaxed);
        let state = {
            let mut breaker = self.breaker.lock();
            breaker.on_probe(ok, Instant::now());
            breaker.state()
        };
        crate::metrics::backend_state(self, state);
        ok
    }

    /// Records one attempt: `Some(duration)` succeeded, `None` failed.
    fn record(&self, succeeded: Option<Duration>) {
        let now = Instant::now();
        let state = {
            let mut breaker = self.breaker.lock();
            match succeeded {
                Some(_) => breaker.on_success(),
                None => breaker.on_failure(now),
            }
            breaker.state()
        };
        if let Some(elapsed) = succeeded {
            self.attempts_ok.fetch_add(1, Ordering::Relaxed);
            self.latency.record(elapsed);
            crate::metrics::backend_attempt(&self.id, "ok", Some(elapsed));
        } else {
            self.attempts_failed.fetch_add(1, Ordering::Relaxed);
            crate::metrics::backend_attempt(&self.id, "failed", None);
        }
        crate::metrics::backend_state(self, state);
    }

    pub(crate) fn status(&self) -> BackendStatus {
        BackendStatus {
            id: self.id.clone(),
            kind: match self.kind {
                BackendKind::Worker => "worker",
                BackendKind::Upstream => "upstream",
            },
            url: self.url.clone(),
            region: self.region.clone(),
            zone: self.zone.clone(),
            models: self.models.iter().map(ToString::to_string).collect(),
            healthy: self.healthy.load(Ordering::Relaxed),
            breaker: self.breaker.lock().state(),
            latency_ms_ewma: self.latency.ewma_us.load(Ordering::Relaxed) / 1000,
            in_flight: self.in_flight(),
            concurrency_max: self.concurrency_max,
            attempts_ok: self.attempts_ok.load(Ordering::Relaxed),
            attempts_failed: self.attempts_failed.load(Ordering::Relaxed),
        }
    }
}

/// One backend on `GET /v1/backends` (never its API key).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct BackendStatus {
    pub id: String,
    /// `worker` or `upstream`.
    pub kind: &'static str,
    pub url: String,
    pub region: String,
    pub zone: String,
    pub models: Vec<String>,
    /// The last health probe succeeded.
    pub healthy: bool,
    pub breaker: BreakerState,
    /// Moving average of successful attempts' duration, in ms.
    pub latency_ms_ewma: u64,
    pub in_flight: u32,
    pub concurrency_max: u32,
    pub attempts_ok: u64,
    pub attempts_failed: u64,
}

/// Every backend, the region this gateway runs in and the routing limits.
#[derive(Debug)]
pub struct Backends {
    pub(crate) list: Vec<Arc<Backend>>,
    pub(crate) home_region: String,
    routing: RoutingConfig,
}

impl Backends {
    pub(crate) fn new(
        configs: &[BackendConfig],
        routing: &RoutingConfig,
        home_region: &str,
    ) -> Result<Self, BackendSetupError> {
        let list = configs
            .iter()
            .map(|c| Backend::new(c, routing).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            list,
            home_region: home_region.to_owned(),
            routing: routing.clone(),
        })
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Probes every backend once; the first that does not answer is the error.
    pub(crate) async fn probe_all_at_start(&self) -> Result<(), BackendSetupError> {
        for backend in &self.list {
            if !backend.probe(STARTUP_PROBE_TIMEOUT).await {
                return Err(BackendSetupError::Unreachable {
                    backend: backend.id.clone(),
                    url: backend.url.clone(),
                });
            }
        }
        Ok(())
    }

    /// Probes every backend every `health_interval_ms`, forever (the caller aborts it).
    pub(crate) async fn probe_forever(self: Arc<Self>) {
        let mut interval =
            tokio::time::interval(Duration::from_millis(self.routing.health_interval_ms));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let timeout = Duration::from_millis(self.routing.health_timeout_ms);
        loop {
            interval.tick().await;
            futures::future::join_all(self.list.iter().map(|b| b.probe(timeout))).await;
        }
    }

    pub(crate) fn status(&self) -> Vec<BackendStatus> {
        self.list.iter().map(|b| b.status()).collect()
    }

    /// The engine of one remote model: its backends, in configuration order.
    pub(crate) fn engine(
        self: &Arc<Self>,
        model: ModelId,
        context_tokens: TokenCount,
        chunks_buffered_max: u32,
        tasks: TaskTracker,
    ) -> RoutedEngine {
        let backends = self
            .list
            .iter()
            .filter(|b| b.models.contains(&model))
            .cloned()
            .collect();
        RoutedEngine {
            model,
            context_tokens,
            backends,
            set: Arc::clone(self),
            chunks_buffered_max: usize::try_from(chunks_buffered_max.max(1)).unwrap_or(1),
            tasks,
            active: Arc::new(AtomicU32::new(0)),
        }
    }
}

/// Upper bound of a remote prompt's tokens, for the reservation: one token per byte (byte-level
/// BPE never does worse) plus room for the backend's chat template.
pub(crate) fn prompt_tokens_bound(prompt: &RemotePrompt) -> TokenCount {
    let (bytes, messages) = match prompt {
        RemotePrompt::Text(text) => (text.len(), 0),
        RemotePrompt::Chat(messages) => (
            messages
                .iter()
                .map(|m| m.role.len().saturating_add(m.content.len()))
                .sum(),
            messages.len(),
        ),
    };
    let bytes = TokenCount::try_from(bytes).unwrap_or(TokenCount::MAX);
    let messages = TokenCount::try_from(messages).unwrap_or(TokenCount::MAX);
    bytes
        .saturating_add(messages.saturating_mul(MESSAGE_TEMPLATE_TOKENS_MAX))
        .saturating_add(PROMPT_TEMPLATE_TOKENS_MAX)
}

/// A remote model: routes each request to one of its backends.
#[derive(Debug)]
pub(crate) struct RoutedEngine {
    model: ModelId,
    context_tokens: TokenCount,
    backends: Vec<Arc<Backend>>,
    set: Arc<Backends>,
    chunks_buffered_max: usize,
    tasks: TaskTracker,
    active: Arc<AtomicU32>,
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
            model: self.model.clone(),
            request,
            input,
            candidates: order(eligible, &self.set.home_region),
            attempts_max: self.set.routing.retry_attempts_max,
            tx,
        };
        let active = Arc::clone(&self.active);
        active.fetch_add(1, Ordering::Relaxed);
        self.tasks.spawn(async move {
            job.run().await;
            active.fetch_sub(1, Ordering::Relaxed);
        });
        Ok(Generation { events: rx })
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

/// Why one attempt ended without an answer.
#[derive(Debug)]
enum AttemptError {
    /// Connection, timeout, 5xx, a cut stream: counts against the breaker; retryable if nothing
    /// reached the client.
    Failed { status: Option<u16> },
    /// The backend refused this request (4xx): not the backend's fault, not retryable.
    Rejected { status: u16 },
    /// The backend is full (429): try another, without blaming it.
    Busy,
    /// The client went away.
    ClientGone,
}

/// One request's routing task.
#[derive(Debug)]
struct Job {
    model: ModelId,
    request: GenerateRequest,
    input: RemoteInput,
    candidates: Vec<Arc<Backend>>,
    attempts_max: u32,
    tx: mpsc::Sender<GenerationEvent>,
}

impl Job {
    async fn run(self) {
        let tx = self.tx.clone();
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
                    tracing::warn!(backend = %backend.id, model = %self.model, status,
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
        let error = if self.input.regions.is_some() {
            no_backend_in_region(&self.model, &self.input)
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
        if self.tx.send(GenerationEvent::Failed(error)).await.is_err() {
            tracing::debug!("client gone before the routing failure was delivered");
        }
    }

    fn body(&self, backend: &Backend) -> (&'static str, Value) {
        let params = &self.request.params;
        let model = backend.upstream_model(&self.model);
        // A client that does not stream gets a non-stream call: every OpenAI-compatible server
        // reports `usage` there (some, like llama-cpp-python, never do in a stream).
        let stream = !self.input.buffered;
        let mut body = json!({
            "model": model,
            "stream": stream,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "presence_penalty": params.presence_penalty,
            "frequency_penalty": params.frequency_penalty,
        });
        if stream {
            body["stream_options"] = json!({"include_usage": true});
        }
        if let Some(seed) = params.seed {
            body["seed"] = json!(seed);
        }
        if !params.stop.is_empty() {
            body["stop"] = json!(params.stop);
        }
        match &self.input.prompt {
            RemotePrompt::Text(text) => {
                body["prompt"] = json!(text);
                ("/v1/completions", body)
            }
            RemotePrompt::Chat(messages) => {
                body["messages"] = messages
                    .iter()
                    .map(|m| json!({"role": m.role, "content": m.content}))
                    .collect();
                ("/v1/chat/completions", body)
            }
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
        let result = tokio::time::timeout(backend.timeout, self.stream_from(backend, delivered))
            .await
            .unwrap_or(Err(AttemptError::Failed { status: None }));
        drop(permit);
        match &result {
            Ok(()) => backend.record(Some(started.elapsed())),
            Err(AttemptError::Failed { .. }) => backend.record(None),
            Err(AttemptError::Rejected { .. } | AttemptError::Busy | AttemptError::ClientGone) => {
                backend.breaker.lock().on_neutral();
            }
        }
        result
    }

    /// Sends the request; a 2xx response, or the attempt's error by status.
    async fn open(&self, backend: &Backend) -> Result<reqwest::Response, AttemptError> {
        let (path, body) = self.body(backend);
        let mut request = backend
            .client
            .post(format!("{}{path}", backend.url))
            .json(&body);
        if let Some(Secret(key)) = &backend.api_key {
            request = request.bearer_auth(key);
        }
        // A pooled keep-alive connection the backend has just closed fails the send before the
        // backend saw anything (uvicorn-based servers do this): one more try, on another
        // connection, before the attempt counts as failed.
        let again = request.try_clone();
        let response = match request.send().await {
            Ok(response) => response,
            Err(error) => {
                tracing::debug!(backend = %backend.id, %error, "backend send failed; trying once more");
                let Some(again) = again else {
                    return Err(AttemptError::Failed { status: None });
                };
                again.send().await.map_err(|error| {
                    tracing::debug!(backend = %backend.id, %error, "backend send failed");
                    AttemptError::Failed { status: None }
                })?
            }
        };
        let status = response.status();
        if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            return Err(AttemptError::Busy);
        }
        if status.is_server_error() || status == reqwest::StatusCode::REQUEST_TIMEOUT {
            return Err(AttemptError::Failed {
                status: Some(status.as_u16()),
            });
        }
        if !status.is_success() {
            return Err(AttemptError::Rejected {
                status: status.as_u16(),
            });
        }
        Ok(response)
    }

    async fn stream_from(
        &self,
        backend: &Backend,
        delivered: &mut bool,
    ) -> Result<(), AttemptError> {
        let response = self.open(backend).await?;
        if self.input.buffered {
            return self.finish(whole_answer(backend, response).await?).await;
        }
        let mut reader = SseReader::default();
        let mut buffered = Buffered::default();
        let mut bytes = response.bytes_stream();
        while let Some(next) = bytes.next().await {
            let chunk = next.map_err(|error| {
                tracing::debug!(backend = %backend.id, %error, "backend stream broke");
                AttemptError::Failed { status: None }
            })?;
            for data in reader
                .push(&chunk)
                .ok_or(AttemptError::Failed { status: None })?
            {
                tracing::trace!(backend = %backend.id, %data, "backend event");
                match parse_data(&data) {
                    Parsed::Text(text, finish) => {
                        if finish.is_some() {
                            buffered.finish = finish;
                        }
                        if self.input.buffered {
                            buffered.text.push_str(&text);
                            buffered.tokens = buffered.tokens.saturating_add(1);
                        } else {
                            *delivered = true;
                            self.send(GenerationEvent::Chunk { text, tokens: 1 })
                                .await?;
                        }
                        buffered.chunks = buffered.chunks.saturating_add(1);
                    }
                    Parsed::Finish(reason) => buffered.finish = Some(reason),
                    Parsed::Usage(usage) => buffered.usage = Some(usage),
                    Parsed::Done => return self.finish(buffered).await,
                    Parsed::Error | Parsed::Malformed => {
                        tracing::debug!(backend = %backend.id, data = %data.chars().take(200).collect::<String>(),
                            "backend sent an error or a malformed event");
                        return Err(AttemptError::Failed { status: None });
                    }
                    Parsed::Nothing => {}
                }
            }
        }
        // The connection closed without `[DONE]`: the backend died mid-answer.
        tracing::debug!(backend = %backend.id, "backend stream ended without [DONE]");
        Err(AttemptError::Failed { status: None })
    }

    async fn finish(&self, buffered: Buffered) -> Result<(), AttemptError> {
        let (prompt_tokens, cached_prompt_tokens, completion_tokens) =
            buffered.usage.unwrap_or_else(|| {
                // No `usage` from the backend: completion = the tokens delivered; the prompt is
                // billed at the upper bound it was reserved at (docs/regions.md).
                tracing::warn!(model = %self.model,
                    "backend reported no usage; prompt billed at its reserved upper bound");
                (prompt_tokens_bound(&self.input.prompt), 0, buffered.chunks)
            });
        // `[DONE]` without a finish reason is a cut answer, not a complete one (llama-cpp-python
        // ends a stream that way when another request wants its lock): a failed attempt.
        let Some(finish_reason) = buffered.finish else {
            tracing::debug!(model = %self.model, "backend answer ended without a finish reason");
            return Err(AttemptError::Failed { status: None });
        };
        if self.input.buffered && !buffered.text.is_empty() {
            self.send(GenerationEvent::Chunk {
                text: buffered.text,
                tokens: buffered.tokens,
            })
            .await?;
        }
        self.send(GenerationEvent::Done {
            finish_reason,
            prompt_tokens,
            cached_prompt_tokens,
            completion_tokens,
        })
        .await
    }

    async fn send(&self, event: GenerationEvent) -> Result<(), AttemptError> {
        self.tx
            .send(event)
            .await
            .map_err(|_| AttemptError::ClientGone)
    }
}

/// What one attempt collected besides streamed text.
#[derive(Debug, Default)]
struct Buffered {
    text: String,
    tokens: TokenCount,
    chunks: TokenCount,
    finish: Option<FinishReason>,
    /// prompt, cached prompt, completion tokens.
    usage: Option<(TokenCount, TokenCount, TokenCount)>,
}

/// A non-stream answer (`chat.completion` or `text_completion` JSON) as one buffered result.
async fn whole_answer(
    backend: &Backend,
    response: reqwest::Response,
) -> Result<Buffered, AttemptError> {
    let failed = |why: &str| {
        tracing::debug!(backend = %backend.id, why, "backend answer unusable");
        AttemptError::Failed { status: None }
    };
    if response
        .content_length()
        .is_some_and(|n| n > u64::try_from(RESPONSE_BYTES_MAX).unwrap_or(u64::MAX))
    {
        return Err(failed("answer larger than RESPONSE_BYTES_MAX"));
    }
    let bytes = response.bytes().await.map_err(|_| failed("body broke"))?;
    if bytes.len() > RESPONSE_BYTES_MAX {
        return Err(failed("answer larger than RESPONSE_BYTES_MAX"));
    }
    let value: Value = serde_json::from_slice(&bytes).map_err(|_| failed("not JSON"))?;
    if value.get("error").is_some_and(|e| !e.is_null()) {
        return Err(failed("error body"));
    }
    let choice = value
        .pointer("/choices/0")
        .ok_or_else(|| failed("no choices"))?;
    let text = choice
        .pointer("/message/content")
        .or_else(|| choice.get("text"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let finish = finish_reason_of(choice);
    let usage = usage_of(&value);
    let completion = usage.map_or(1, |(_, _, completion)| completion);
    Ok(Buffered {
        tokens: completion,
        chunks: completion,
        text,
        finish,
        usage,
    })
}

/// Splits a byte stream into SSE `data:` payloads.
#[derive(Debug, Default)]
pub(crate) struct SseReader {
    line: Vec<u8>,
}

impl SseReader {
    /// Feeds bytes; returns the complete `data:` payloads, or `None` for a line over
    /// [`SSE_LINE_BYTES_MAX`].
    pub(crate) fn push(&mut self, bytes: &[u8]) -> Option<Vec<String>> {
        let mut out = Vec::new();
        for &byte in bytes {
            if byte == b'\n' {
                let line = std::mem::take(&mut self.line);
                let line = String::from_utf8_lossy(&line);
                let line = line.trim_end_matches('\r');
                if let Some(data) = line.strip_prefix("data:") {
                    out.push(data.trim_start().to_owned());
                }
            } else {
                if self.line.len() >= SSE_LINE_BYTES_MAX {
                    return None;
                }
                self.line.push(byte);
            }
        }
        Some(out)
    }
}

/// One SSE payload of an OpenAI-compatible stream.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Parsed {
    /// Text, and the finish reason when the same chunk ends the choice.
    Text(String, Option<FinishReason>),
    Finish(FinishReason),
    Usage((TokenCount, TokenCount, TokenCount)),
    Done,
    Error,
    Malformed,
    Nothing,
}

fn token_field(value: &Value, pointer: &str) -> TokenCount {
    value
        .pointer(pointer)
        .and_then(Value::as_u64)
        .and_then(|n| TokenCount::try_from(n).ok())
        .unwrap_or(0)
}

/// An answer's (or a chunk's) `usage`: prompt, cached prompt and completion tokens.
fn usage_of(value: &Value) -> Option<(TokenCount, TokenCount, TokenCount)> {
    value.get("usage").filter(|u| u.is_object()).map(|usage| {
        (
            token_field(usage, "/prompt_tokens"),
            token_field(usage, "/prompt_tokens_details/cached_tokens"),
            token_field(usage, "/completion_tokens"),
        )
    })
}

/// A choice's `finish_reason`: `length`, any other reason as `stop`, or none yet.
fn finish_reason_of(choice: &Value) -> Option<FinishReason> {
    match choice.get("finish_reason").and_then(Value::as_str) {
        Some("length") => Some(FinishReason::Length),
        Some(_) => Some(FinishReason::Stop),
        None => None,
    }
}

/// Parses one payload of a chat or completion stream.
pub(crate) fn parse_data(data: &str) -> Parsed {
    if data == "[DONE]" {
        return Parsed::Done;
    }
    let Ok(value) = serde_json::from_str::<Value>(data) else {
        return Parsed::Malformed;
    };
    if value.get("error").is_some() {
        return Parsed::Error;
    }
    if let Some(usage) = usage_of(&value) {
        return Parsed::Usage(usage);
    }
    let Some(choice) = value.pointer("/choices/0") else {
        return Parsed::Nothing;
    };
    let text = choice
        .pointer("/delta/content")
        .or_else(|| choice.get("text"))
        .and_then(Value::as_str)
        .unwrap_or("");
    match (text.is_empty(), finish_reason_of(choice)) {
        (false, finish) => Parsed::Text(text.to_owned(), finish),
        (true, Some(finish)) => Parsed::Finish(finish),
        (true, None) => Parsed::Nothing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_opens_on_consecutive_failures_and_closes_on_success() {
        let now = Instant::now();
        let mut breaker = Breaker::new(3, Duration::from_secs(2));
        for _ in 0..2 {
            assert!(breaker.allow(now));
            breaker.on_failure(now);
        }
        assert_eq!(breaker.state(), BreakerState::Closed);
        breaker.on_failure(now);
        assert_eq!(breaker.state(), BreakerState::Open);
        assert!(!breaker.allow(now), "open: no requests");
        let later = now + Duration::from_secs(2);
        assert!(breaker.allow(later), "half-open: one trial");
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        assert!(!breaker.allow(later), "only one trial at a time");
        breaker.on_failure(later);
        assert_eq!(
            breaker.state(),
            BreakerState::Open,
            "a failed trial reopens"
        );
        let much_later = later + Duration::from_secs(2);
        assert!(breaker.allow(much_later));
        breaker.on_success();
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert!(breaker.allow(much_later));
    }

    #[test]
    fn breaker_opens_on_error_rate_and_follows_probes() {
        let now = Instant::now();
        let mut breaker = Breaker::new(100, Duration::from_mins(1));
        for _ in 0..5 {
            breaker.on_success();
            breaker.on_failure(now);
        }
        assert_eq!(breaker.state(), BreakerState::Open, "half of ten failed");
        breaker.on_probe(true, now);
        assert_eq!(breaker.state(), BreakerState::Closed, "a good probe closes");
        breaker.on_probe(false, now);
        assert_eq!(breaker.state(), BreakerState::Open, "a failed probe opens");
        assert!(!breaker.allow(now));
    }

    #[test]
    fn sse_reader_splits_lines_across_chunks() {
        let mut reader = SseReader::default();
        assert_eq!(reader.push(b"data: {\"a\"").unwrap(), Vec::<String>::new());
        assert_eq!(
            reader
                .push(b":1}\r\n\r\n: keep-alive\ndata: [DONE]\n")
                .unwrap(),
            vec!["{\"a\":1}".to_owned(), "[DONE]".to_owned()]
        );
    }

    #[test]
    fn parses_openai_stream_payloads() {
        assert_eq!(
            parse_data(
                r#"{"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}"#
            ),
            Parsed::Text("Hi".to_owned(), None)
        );
        assert_eq!(
            parse_data(r#"{"choices":[{"index":0,"text":" there","finish_reason":"stop"}]}"#),
            Parsed::Text(" there".to_owned(), Some(FinishReason::Stop))
        );
        assert_eq!(
            parse_data(r#"{"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}"#),
            Parsed::Finish(FinishReason::Length)
        );
        assert_eq!(
            parse_data(
                r#"{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":2}}}"#
            ),
            Parsed::Usage((7, 2, 3))
        );
        assert_eq!(
            parse_data(r#"{"choices":[{"delta":{"role":"assistant","content":""}}],"usage":null}"#),
            Parsed::Nothing
        );
        assert_eq!(parse_data(r#"{"error":{"code":"x"}}"#), Parsed::Error);
        assert_eq!(parse_data("not json"), Parsed::Malformed);
        assert_eq!(parse_data("[DONE]"), Parsed::Done);
    }

    #[test]
    fn prompt_bound_covers_bytes_and_template() {
        assert_eq!(
            prompt_tokens_bound(&RemotePrompt::Text("abcd".into())),
            4 + PROMPT_TEMPLATE_TOKENS_MAX
        );
        let chat = RemotePrompt::Chat(vec![ChatMessage {
            role: "user".into(),
            content: "hi".into(),
        }]);
        assert_eq!(
            prompt_tokens_bound(&chat),
            6 + MESSAGE_TEMPLATE_TOKENS_MAX + PROMPT_TEMPLATE_TOKENS_MAX
        );
    }
}
