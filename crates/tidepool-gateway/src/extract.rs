//! What runs before a handler's own logic: the request-context middleware (request id, root
//! span, per-route counter), our JSON extractor (so a malformed or oversized body gets an
//! OpenAI-shaped error, not axum's plain text) and bearer-key authentication.

use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;
use futures::StreamExt as _;
use serde::de::DeserializeOwned;
use tidepool_core::RequestId;
use tidepool_ledger::ApiKeyRecord;
use tracing::Instrument as _;
use tracing::field::Empty;

use crate::error::{ApiError, CURRENT_REQUEST_ID};
use crate::leak::Verdict;
use crate::metrics;
use crate::state::AppState;
use crate::usage::UsageGuard;

/// The header that carries the request id, inbound and outbound.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Every route template; anything else is counted as `unmatched` (labels stay a closed set).
const ROUTES: &[&str] = &[
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/models",
    "/v1/usage",
    "/v1/files",
    "/v1/batches",
    "/v1/backends",
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.json",
];

fn route_label(base_path: &str, path: &str) -> &'static str {
    let Some(path) = path.strip_prefix(base_path) else {
        return "unmatched";
    };
    if path.starts_with("/admin/") || path == "/admin" {
        return "/admin";
    }
    if path.starts_with("/console") {
        return "/console";
    }
    // One label per API family: ids in the path would make the label set unbounded.
    for family in ["/v1/files", "/v1/batches"] {
        if path
            .strip_prefix(family)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        {
            return family;
        }
    }
    ROUTES
        .iter()
        .copied()
        .find(|route| *route == path)
        .unwrap_or("unmatched")
}

/// Assigns the request id (a well-formed inbound `x-request-id`, else a new `UUIDv7`), opens the
/// request's root span (the HTTP server span, a child of the caller's `traceparent` when one
/// came), and echoes the id on the response.
pub(crate) async fn request_context(
    axum::extract::State(state): axum::extract::State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let request_id = request
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| RequestId::parse(value).ok())
        .unwrap_or_default();
    let route = route_label(state.base_path(), request.uri().path());
    request.extensions_mut().insert(request_id);
    let span = tracing::info_span!(
        "request",
        otel.name = %format_args!("{} {route}", request.method()),
        otel.kind = "server",
        otel.status_code = Empty,
        http.request.method = %request.method(),
        http.route = route,
        http.response.status_code = Empty,
        request_id = %request_id,
        trace_id = Empty,
        method = %request.method(),
        route,
        tenant = Empty,
        project = Empty,
        model = Empty,
        api_key_id = Empty,
        stream = Empty,
        prompt_tokens = Empty,
        completion_tokens = Empty,
        ttft_ms = Empty,
        total_ms = Empty,
    );
    let trace_id = tidepool_telemetry::continue_trace(&span, request.headers());
    span.record("trace_id", trace_id.as_str());
    let mut response = crate::trace::CURRENT_TRACE_ID
        .scope(
            trace_id,
            CURRENT_REQUEST_ID.scope(request_id, next.run(request).instrument(span.clone())),
        )
        .await;
    let status = response.status();
    // As i64: the exporter keeps only i64 (and bool, f64) numbers as numbers.
    span.record("http.response.status_code", i64::from(status.as_u16()));
    if status.is_server_error() {
        span.record("otel.status_code", "error");
    }
    metrics::request(route, status.as_u16());
    if let Ok(value) = HeaderValue::from_str(&request_id.to_string()) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}

/// How much of an oversized body is still read (and discarded) before answering 413, as a
/// multiple of `request_body_bytes_max`. Answering while the client is still sending makes the
/// kernel reset the connection, and the client may then never see the 413 (nginx's
/// `lingering_close` solves the same problem).
const OVERSIZED_DRAIN_FACTOR: u64 = 4;

/// `axum::Json`, but every rejection is an [`ApiError`]: an oversized body is 413
/// `request_too_large`, anything unparsable is 400 `invalid_request_error`. The content type is
/// not checked: a body that parses as the expected JSON is accepted.
#[derive(Debug, Clone)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let bytes = read_body(request, state.limits().request_body_bytes_max).await?;
        serde_json::from_slice(&bytes)
            .map(ApiJson)
            .map_err(|error| ApiError::InvalidJson {
                detail: error.to_string(),
            })
    }
}

/// Reads a body of at most `bytes_max` bytes; a larger one is drained (up to a bound) and
/// refused.
async fn read_body(request: Request, bytes_max: u64) -> Result<Vec<u8>, ApiError> {
    let too_large = ApiError::RequestTooLarge { bytes_max };
    let drain_max = bytes_max.saturating_mul(OVERSIZED_DRAIN_FACTOR);
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > drain_max) {
        return Err(too_large);
    }
    let mut frames = request.into_body().into_data_stream();
    let mut body = Vec::new();
    let mut seen: u64 = 0;
    while let Some(frame) = frames.next().await {
        let frame = frame.map_err(|error| ApiError::InvalidJson {
            detail: error.to_string(),
        })?;
        seen = seen.saturating_add(u64::try_from(frame.len()).unwrap_or(u64::MAX));
        if seen > drain_max {
            return Err(too_large);
        }
        if seen <= bytes_max {
            body.extend_from_slice(&frame);
        }
    }
    if seen > bytes_max {
        Err(too_large)
    } else {
        Ok(body)
    }
}

/// The token of `Authorization: Bearer <token>`, if the header has that shape.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim)
}

/// A key that authenticated, unless it is suspended (refused with its reason on every replica).
pub(crate) fn unsuspended(record: ApiKeyRecord) -> Result<ApiKeyRecord, ApiError> {
    if record.suspended_at_ms.is_some() {
        return Err(ApiError::KeySuspended {
            key_id: record.key_id,
            reason: record.suspended_reason.unwrap_or_default(),
        });
    }
    Ok(record)
}

/// Checks `Authorization: Bearer <key>` and opens the request's usage entry.
pub(crate) async fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
    request_id: RequestId,
    endpoint: &'static str,
) -> Result<UsageGuard, ApiError> {
    let started = tokio::time::Instant::now();
    // Before start-up recovery has run, no request may reserve (recovery would resolve it).
    if !state.is_started() {
        return Err(ApiError::Starting);
    }
    // A batch line runs as the key that created its batch (never a header a client could
    // forge: the runner sets a task-local around the request), re-read so that a key revoked
    // since is refused.
    let record =
        if let Ok(key_id) = crate::batch_line::BATCH_LINE.try_with(|line| line.key_id.clone()) {
            let record = state.ledger().key(&key_id).await?;
            if record.revoked_at_ms.is_some() {
                return Err(ApiError::InvalidApiKey);
            }
            record
        } else {
            let secret = bearer(headers).ok_or(ApiError::InvalidApiKey)?;
            state
                .ledger()
                .authenticate(secret)
                .await?
                .ok_or(ApiError::InvalidApiKey)?
        };
    let record = unsuspended(record)?;
    if let Some(leak) = state.leak() {
        let verdict = leak.lock().on_request(&record.key_id, state.now_ms());
        if let Verdict::Suspend { reason } = verdict {
            crate::suspend::suspend_key(state, &record, &reason, request_id).await;
            return Err(ApiError::KeySuspended {
                key_id: record.key_id,
                reason,
            });
        }
    }
    Ok(UsageGuard::new(
        state.clone(),
        request_id,
        record,
        endpoint,
        started,
    ))
}
