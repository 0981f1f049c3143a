//! Handlers. Each one extracts, authenticates (opening the request's usage entry), validates,
//! calls one domain function and maps the result; errors become responses only through
//! `ApiError`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use base64::Engine as _;
use tidepool_core::{ModelId, ModelKind, RequestId};
use tidepool_engine::{EmbeddingEngine, EngineError, TextEngine};

use crate::error::{ApiError, ErrorBody};
use crate::extract::{ApiJson, authenticate};
use crate::generate::{Flavor, TextJob};
use crate::openai::{
    ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Completion, CompletionRequest,
    EmbeddingData, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage, EmbeddingVector, Health,
    Model, ModelList, Readiness, ReadinessChecks,
};
use crate::state::{AppState, ModelEngine};
use crate::usage::UsageGuard;
use crate::{generate, validate};

/// Which endpoint a model lookup is for.
#[derive(Debug, Clone, Copy)]
enum Endpoint {
    Chat,
    Completions,
}

fn text_engine(
    state: &AppState,
    guard: &mut UsageGuard,
    model: &str,
    endpoint: Endpoint,
) -> Result<(ModelId, Arc<dyn TextEngine>), ApiError> {
    let served = state.model(model).ok_or_else(|| ApiError::ModelNotFound {
        model: model.chars().take(128).collect(),
    })?;
    guard.set_model(served);
    let (allowed, name) = match endpoint {
        Endpoint::Chat => (served.kind == ModelKind::Chat, "/v1/chat/completions"),
        Endpoint::Completions => (
            matches!(served.kind, ModelKind::Chat | ModelKind::Completion),
            "/v1/completions",
        ),
    };
    match (&served.engine, allowed) {
        (ModelEngine::Text(engine), true) => Ok((served.id.clone(), Arc::clone(engine))),
        (ModelEngine::Text(_) | ModelEngine::Embedding(_), _) => Err(
            ApiError::model_endpoint_mismatch(served.id.clone(), served.kind, name),
        ),
    }
}

macro_rules! authenticated {
    ($state:expr, $headers:expr, $request_id:expr, $endpoint:expr) => {
        match authenticate(&$state, &$headers, $request_id, $endpoint).await {
            Ok(guard) => guard,
            Err(error) => return error.into_response(),
        }
    };
}

/// The `Idempotency-Key` header: 1 to 255 visible ASCII bytes, or absent.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY_HEADER) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| ApiError::invalid_param("Idempotency-Key", "must be visible ASCII"))?;
    if text.is_empty() || text.len() > tidepool_ledger::IDEMPOTENCY_KEY_BYTES_MAX {
        return Err(ApiError::invalid_param(
            "Idempotency-Key",
            format!(
                "must be 1 to {} bytes",
                tidepool_ledger::IDEMPOTENCY_KEY_BYTES_MAX
            ),
        ));
    }
    Ok(Some(text.to_owned()))
}

/// The header a client sets so a retried request is never billed twice.
pub(crate) const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

/// Records a failure before any response byte and renders it.
fn failed(mut guard: UsageGuard, error: ApiError) -> Response {
    guard.fail(&error);
    error.into_response()
}

#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    tag = "openai",
    request_body = ChatCompletionRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A chat completion, or with `stream: true` an SSE stream of chunks ending in `data: [DONE]`",
            content((ChatCompletion = "application/json"), (ChatCompletionChunk = "text/event-stream"))),
        (status = 400, description = "`invalid_request_error`, `context_length_exceeded`, `model_endpoint_mismatch`", body = ErrorBody),
        (status = 401, description = "`invalid_api_key`", body = ErrorBody),
        (status = 404, description = "`model_not_found`", body = ErrorBody),
        (status = 413, description = "`request_too_large`", body = ErrorBody),
        (status = 429, description = "`overloaded`, with `Retry-After`", body = ErrorBody),
        (status = 500, description = "`internal_error`", body = ErrorBody),
        (status = 503, description = "`unavailable`, with `Retry-After`: the billing database is unreachable (nothing was generated or billed) or the server is starting", body = ErrorBody),
        (status = 504, description = "`request_timeout`, `stream_stalled`", body = ErrorBody),
    )
)]
pub(crate) async fn chat_completions(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    headers: HeaderMap,
    body: Result<ApiJson<ChatCompletionRequest>, ApiError>,
) -> Response {
    let mut guard = authenticated!(state, headers, request_id, "chat.completions");
    let job = (|| {
        let ApiJson(request) = body?;
        let (model, engine) = text_engine(&state, &mut guard, &request.model, Endpoint::Chat)?;
        let limits = state.limits();
        let params = validate::sampling(&request.sampling, limits)?;
        let max_tokens = match request.max_completion_tokens {
            Some(_) => validate::max_tokens(
                "max_completion_tokens",
                request.max_completion_tokens,
                limits,
            )?,
            None => validate::max_tokens("max_tokens", request.sampling.max_tokens, limits)?,
        };
        let messages = validate::messages(&request.messages, limits)?;
        // A template that rejects the conversation is the caller's 400 (`ApiError`'s mapping).
        let prompt_text = engine.apply_chat_template(&messages)?;
        Ok::<_, ApiError>(TextJob {
            flavor: Flavor::Chat,
            messages: engine.is_remote().then_some(messages),
            engine,
            model,
            prompt_text,
            params,
            max_tokens,
            stream: request.sampling.stream,
            include_usage: request
                .sampling
                .stream_options
                .is_some_and(|o| o.include_usage),
            idempotency_key: idempotency_key(&headers)?,
        })
    })();
    match job {
        Ok(job) => generate::respond(state, guard, job).await,
        Err(error) => failed(guard, error),
    }
}

#[utoipa::path(
    post,
    path = "/v1/completions",
    tag = "openai",
    request_body = CompletionRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A completion, or with `stream: true` an SSE stream of completion chunks ending in `data: [DONE]`",
            content((Completion = "application/json"), (Completion = "text/event-stream"))),
        (status = 400, description = "`invalid_request_error`, `context_length_exceeded`, `model_endpoint_mismatch`", body = ErrorBody),
        (status = 401, description = "`invalid_api_key`", body = ErrorBody),
        (status = 404, description = "`model_not_found`", body = ErrorBody),
        (status = 413, description = "`request_too_large`", body = ErrorBody),
        (status = 429, description = "`overloaded`, with `Retry-After`", body = ErrorBody),
        (status = 500, description = "`internal_error`", body = ErrorBody),
        (status = 503, description = "`unavailable`, with `Retry-After`: the billing database is unreachable (nothing was generated or billed) or the server is starting", body = ErrorBody),
        (status = 504, description = "`request_timeout`, `stream_stalled`", body = ErrorBody),
    )
)]
pub(crate) async fn completions(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    headers: HeaderMap,
    body: Result<ApiJson<CompletionRequest>, ApiError>,
) -> Response {
    let mut guard = authenticated!(state, headers, request_id, "completions");
    let job = (|| {
        let ApiJson(request) = body?;
        let (model, engine) =
            text_engine(&state, &mut guard, &request.model, Endpoint::Completions)?;
        let limits = state.limits();
        let params = validate::sampling(&request.sampling, limits)?;
        let max_tokens = validate::max_tokens("max_tokens", request.sampling.max_tokens, limits)?;
        let prompt_text = validate::prompt(&request.prompt)?;
        Ok::<_, ApiError>(TextJob {
            flavor: Flavor::Completion,
            messages: None,
            engine,
            model,
            prompt_text,
            params,
            max_tokens,
            stream: request.sampling.stream,
            include_usage: request
                .sampling
                .stream_options
                .is_some_and(|o| o.include_usage),
            idempotency_key: idempotency_key(&headers)?,
        })
    })();
    match job {
        Ok(job) => generate::respond(state, guard, job).await,
        Err(error) => failed(guard, error),
    }
}

#[utoipa::path(
    post,
    path = "/v1/embeddings",
    tag = "openai",
    request_body = EmbeddingRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "One embedding per input, in input order", body = EmbeddingResponse),
        (status = 400, description = "`invalid_request_error`, `context_length_exceeded`, `model_endpoint_mismatch`", body = ErrorBody),
        (status = 401, description = "`invalid_api_key`", body = ErrorBody),
        (status = 404, description = "`model_not_found`", body = ErrorBody),
        (status = 413, description = "`request_too_large`", body = ErrorBody),
        (status = 429, description = "`overloaded`, with `Retry-After`", body = ErrorBody),
        (status = 500, description = "`internal_error`", body = ErrorBody),
        (status = 503, description = "`unavailable`, with `Retry-After`: the billing database is unreachable (nothing was generated or billed) or the server is starting", body = ErrorBody),
        (status = 504, description = "`request_timeout`", body = ErrorBody),
    )
)]
pub(crate) async fn embeddings(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    headers: HeaderMap,
    body: Result<ApiJson<EmbeddingRequest>, ApiError>,
) -> Response {
    let mut guard = authenticated!(state, headers, request_id, "embeddings");
    match embed(&state, &mut guard, &headers, body).await {
        Ok(response) => {
            guard.succeed(response.usage.prompt_tokens, Some(0), 0);
            guard.set_batch_body(&response);
            let rate_limits = guard.rate_limits();
            // Billed before it is sent (`UsageGuard::settle_before_reply`).
            if let Err(error) = guard.settle_before_reply().await {
                return error.into_response();
            }
            let mut response = Json(response).into_response();
            crate::ratelimit::insert_headers(response.headers_mut(), &rate_limits);
            response
        }
        Err(error) => failed(guard, error),
    }
}

/// Whether to send floats or base64 of little-endian f32 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Float,
    Base64,
}

/// The most tokens an embedding input can count: every token of the `WordPiece` tokenizers we
/// serve covers at least one character, plus the two special tokens; never more than the model
/// accepts. The reservation holds this; the settlement bills the exact count.
fn embedding_tokens_bound(inputs: &[String], input_tokens_max: u32) -> u32 {
    inputs
        .iter()
        .map(|input| {
            u32::try_from(input.chars().count())
                .unwrap_or(u32::MAX)
                .saturating_add(2)
                .min(input_tokens_max)
        })
        .fold(0_u32, u32::saturating_add)
}

async fn embed(
    state: &AppState,
    guard: &mut UsageGuard,
    headers: &HeaderMap,
    body: Result<ApiJson<EmbeddingRequest>, ApiError>,
) -> Result<EmbeddingResponse, ApiError> {
    let ApiJson(request) = body?;
    let served = state
        .model(&request.model)
        .ok_or_else(|| ApiError::ModelNotFound {
            model: request.model.chars().take(128).collect(),
        })?;
    guard.set_model(served);
    let engine: Arc<dyn EmbeddingEngine> = match &served.engine {
        ModelEngine::Embedding(engine) => Arc::clone(engine),
        ModelEngine::Text(_) => {
            return Err(ApiError::model_endpoint_mismatch(
                served.id.clone(),
                served.kind,
                "/v1/embeddings",
            ));
        }
    };
    let encoding = match request.encoding_format.as_deref() {
        None | Some("float") => Encoding::Float,
        Some("base64") => Encoding::Base64,
        Some(_) => {
            return Err(ApiError::invalid_param(
                "encoding_format",
                "must be `float` or `base64`",
            ));
        }
    };
    if let Some(dimensions) = request.dimensions
        && usize::try_from(dimensions).ok() != Some(engine.dimensions())
    {
        return Err(ApiError::invalid_param(
            "dimensions",
            format!(
                "this model only produces {} dimensions",
                engine.dimensions()
            ),
        ));
    }
    let inputs = validate::embedding_input(&request.input, state.limits())?;
    let bound = embedding_tokens_bound(&inputs, engine.input_tokens_max());
    guard.reserve(bound, 0, idempotency_key(headers)?).await?;
    let receiver = engine.embed(inputs)?;
    let timeout_ms = state.limits().request_timeout_ms;
    let deadline = guard.started() + std::time::Duration::from_millis(timeout_ms);
    let embeddings = match tokio::time::timeout_at(deadline, receiver).await {
        Ok(Ok(result)) => result?,
        Ok(Err(_closed)) => return Err(EngineError::ShutDown.into()),
        Err(_elapsed) => return Err(ApiError::Timeout { timeout_ms }),
    };
    let prompt_tokens = embeddings.prompt_tokens;
    let data = encode(embeddings.vectors, encoding);
    Ok(EmbeddingResponse {
        object: "list",
        data,
        model: served.id.to_string(),
        usage: EmbeddingUsage {
            prompt_tokens,
            total_tokens: prompt_tokens,
        },
    })
}

fn encode(vectors: Vec<Vec<f32>>, encoding: Encoding) -> Vec<EmbeddingData> {
    vectors
        .into_iter()
        .enumerate()
        .map(|(index, vector)| EmbeddingData {
            object: "embedding",
            index: u32::try_from(index).unwrap_or(u32::MAX),
            embedding: match encoding {
                Encoding::Float => EmbeddingVector::Float(vector),
                Encoding::Base64 => {
                    // Little-endian f32 bytes, as OpenAI's SDKs decode them.
                    let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                    EmbeddingVector::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
                }
            },
        })
        .collect()
}

fn kind_str(kind: ModelKind) -> &'static str {
    match kind {
        ModelKind::Chat => "chat",
        ModelKind::Completion => "completion",
        ModelKind::Embedding => "embedding",
    }
}

#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "openai",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Every served model", body = ModelList),
        (status = 401, description = "`invalid_api_key`", body = ErrorBody),
        (status = 503, description = "`unavailable`, with `Retry-After`: the billing database is unreachable (nothing was generated or billed) or the server is starting", body = ErrorBody),
    )
)]
pub(crate) async fn models(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    headers: HeaderMap,
) -> Response {
    let mut guard = authenticated!(state, headers, request_id, "models");
    let data = state
        .models()
        .map(|model| Model {
            id: model.id.to_string(),
            object: "model",
            created: 0,
            owned_by: "tidepool",
            kind: kind_str(model.kind),
            context_length: model.context_tokens,
        })
        .collect();
    guard.succeed(0, Some(0), 0);
    Json(ModelList {
        object: "list",
        data,
    })
    .into_response()
}

#[utoipa::path(
    get,
    path = "/healthz",
    tag = "ops",
    responses((status = 200, description = "The server is up and its models are loaded", body = Health))
)]
pub(crate) async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

#[utoipa::path(
    get,
    path = "/readyz",
    tag = "ops",
    responses(
        (status = 200, description = "Ready: the ledger's database answers, its schema is current (every migration this binary embeds is applied), start-up recovery has run, every watched engine thread is alive with a fresh heartbeat and every pinned model can be loaded", body = Readiness),
        (status = 503, description = "Not ready (`status: not_ready`); each failing check says why", body = Readiness),
    )
)]
pub(crate) async fn readyz(State(state): State<AppState>) -> Response {
    let ledger = state.ledger().readiness(crate::READYZ_TIMEOUT).await;
    let started = state.is_started();
    let (engines, pinned_models) = engine_checks(&state);
    let engines_ok = engines
        .values()
        .chain(pinned_models.values())
        .all(|v| v == "ok");
    let ready = ledger.is_ready() && started && engines_ok;
    let startup = if started {
        "ok"
    } else {
        "pending: start-up recovery waits for the current schema"
    };
    let body = Readiness {
        status: if ready { "ready" } else { "not_ready" },
        checks: ReadinessChecks {
            database: ledger.database.to_string(),
            schema: ledger.schema.to_string(),
            startup: startup.to_owned(),
            engines,
            pinned_models,
        },
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// The watched engine threads (the pool's accelerator thread, unpooled engines that report a
/// health) and the pool's pinned models: `ok` or why not.
fn engine_checks(state: &AppState) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let verdict = |check: Result<(), String>| check.err().unwrap_or_else(|| "ok".to_owned());
    let mut engines = BTreeMap::new();
    let mut pinned = BTreeMap::new();
    if let Some(pool) = state.pool() {
        let readiness = pool.readiness();
        engines.insert("accelerator".to_owned(), verdict(readiness.accelerator));
        for (model, check) in readiness.pinned {
            pinned.insert(model.to_string(), verdict(check));
        }
    }
    for served in state.models() {
        if let ModelEngine::Text(engine) = &served.engine
            && let Some(health) = engine.health()
        {
            engines.insert(served.id.to_string(), verdict(health.check()));
        }
    }
    (engines, pinned)
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "ops",
    security(("admin" = [])),
    responses(
        (status = 200, description = "Prometheus text exposition (on `[server] metrics_listen` without authentication)", body = String, content_type = "text/plain"),
        (status = 401, description = "`invalid_admin_token`", body = ErrorBody),
        (status = 404, description = "`not_found`: an API key, or no admin token is configured", body = ErrorBody),
    )
)]
/// `GET /metrics` on the public listener: the operator's (admin token), like `/v1/pool`. An
/// unauthenticated scrape goes to `[server] metrics_listen`.
pub(crate) async fn operator_metrics(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Response {
    match crate::principal::operator(&state, &headers).await {
        Ok(()) => metrics().await,
        Err(error) => error.into_response(),
    }
}

/// The Prometheus exposition of every metric.
pub(crate) async fn metrics() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(),
    )
        .into_response()
}

pub(crate) async fn not_found() -> ApiError {
    ApiError::RouteNotFound
}

pub(crate) async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
