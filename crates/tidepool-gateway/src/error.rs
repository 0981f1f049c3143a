//! The one HTTP error type, [`ApiError`], and the one place errors become answers: status, stable
//! code, parameter, `Retry-After`, `x-should-retry` and whether a 5xx message may be shown are
//! decided together, per variant, in one exhaustive match (`ApiError::answer`, with the nested
//! engine, ledger and core errors matched variant by variant and no `_` arm). The only wildcard
//! is in `kind`, which classes a `StatusCode` (not our enum). Every code is listed in
//! `docs/errors.md`; a test keeps the two in step.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tidepool_core::{CoreError, KeyId, ModelId, ModelKind, RequestId};
use tidepool_engine::EngineError;
use tidepool_ledger::LedgerError;
use utoipa::ToSchema;

tokio::task_local! {
    /// The id of the request being handled, set by the request-id middleware so that an error
    /// rendered anywhere inside the handler can quote it in a 5xx body.
    pub(crate) static CURRENT_REQUEST_ID: RequestId;
}

/// Every `code` an error body can carry, in the order of `docs/errors.md`.
pub const ERROR_CODES: &[&str] = &[
    "invalid_request_error",
    "invalid_api_key",
    "model_not_found",
    "model_endpoint_mismatch",
    "context_length_exceeded",
    "request_too_large",
    "not_found",
    "method_not_allowed",
    "overloaded",
    "rate_limit_exceeded",
    "insufficient_quota",
    "key_suspended",
    "idempotency_key_reused",
    "duplicate_request_id",
    "invalid_admin_token",
    "console_signed_out",
    "console_role_required",
    "csrf_rejected",
    "model_exceeds_memory_budget",
    "model_busy",
    "resource_not_found",
    "file_too_large",
    "file_not_found",
    "batch_not_found",
    "invalid_batch_file",
    "file_in_use",
    "batch_not_cancellable",
    "request_timeout",
    "stream_stalled",
    "internal_error",
    "unavailable",
    "no_backend_in_region",
    "backend_failed",
    "engine_restarted",
];

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not the JSON we expect (syntax, types, missing fields).
    #[error("invalid JSON body: {detail}")]
    InvalidJson { detail: String },
    /// A parameter is out of range or unsupported.
    #[error("invalid `{param}`: {reason}")]
    InvalidParam { param: &'static str, reason: String },
    #[error("missing, malformed or revoked API key")]
    InvalidApiKey,
    /// The key is suspended (by the leaked-key detector): refused on every replica until an
    /// operator reinstates it.
    #[error(
        "API key `{key_id}` is suspended: {reason}. If this traffic is yours, ask an operator to \
         reinstate the key (POST /admin/keys/{key_id}/reinstate); if not, the key may have \
         leaked: revoke it and create a new one"
    )]
    KeySuspended { key_id: KeyId, reason: String },
    #[error("the model `{model}` does not exist")]
    ModelNotFound { model: String },
    #[error("the model `{model}` is a {kind} model and is not served on {endpoint}")]
    ModelEndpointMismatch {
        model: ModelId,
        kind: &'static str,
        endpoint: &'static str,
    },
    #[error("the request body is larger than {bytes_max} bytes")]
    RequestTooLarge { bytes_max: u64 },
    #[error("no route for this path")]
    RouteNotFound,
    #[error("method not allowed on this path")]
    MethodNotAllowed,
    #[error("the request took longer than {timeout_ms} ms")]
    Timeout { timeout_ms: u64 },
    #[error("the engine produced nothing for {stall_ms} ms")]
    Stalled { stall_ms: u64 },
    /// `/admin/*` without the configured admin token (or with none configured).
    #[error("missing or wrong admin token")]
    AdminUnauthorized,
    /// A console API call without a valid session cookie (absent, expired, or its key revoked).
    #[error("not signed in to the console, or the session expired: sign in again")]
    ConsoleSignedOut,
    /// Console sign-in with a key that has the `inference` role.
    #[error(
        "this API key has the `inference` role; the console needs a key with the `tenant-admin` \
         role, or the admin token"
    )]
    ConsoleRoleRequired,
    /// A mutation authenticated by the console's cookie without the console's header, or from
    /// another origin.
    #[error(
        "cross-site request refused: a cookie-authenticated change needs the \
         `X-Tidepool-Console: 1` header and a same-origin `Origin`"
    )]
    CsrfRejected,
    /// An admin or usage query names something that does not exist.
    #[error("{what} `{id}` does not exist")]
    ResourceNotFound { what: &'static str, id: String },
    /// An operator's pool request that cannot happen now (`POST /admin/models/{id}/unload`).
    #[error("model `{model}` cannot be unloaded now: {reason}")]
    ModelBusy { model: String, reason: &'static str },
    /// Start-up recovery has not run yet: the server started with its database schema behind
    /// (`[server] migrate_on_start = false`) and waits for it to be current.
    #[error("the server is starting: its database is not ready yet")]
    Starting,
    /// A `/v1/files` upload past `[batch] file_bytes_max`.
    #[error("the file is larger than {bytes_max} bytes")]
    FileTooLarge { bytes_max: u64 },
    /// No such file for this tenant (another tenant's files are not found either).
    #[error("no file with id `{id}`")]
    FileNotFound { id: String },
    /// No such batch for this tenant (another tenant's batches are not found either).
    #[error("no batch with id `{id}`")]
    BatchNotFound { id: String },
    /// A file that cannot be a batch's input: wrong purpose, or not a well-formed upload.
    #[error("invalid batch file: {reason}")]
    InvalidBatchFile { reason: String },
    /// `DELETE /v1/files/{id}` of the input file of a batch that has not finished.
    #[error(
        "file `{id}` is the input of batch `{batch_id}`, which has not finished; cancel it or wait for it to end"
    )]
    FileInUse { id: String, batch_id: String },
    /// `POST /v1/batches/{id}/cancel` of a batch that has ended or is ending.
    #[error("batch `{id}` is {status} and cannot be cancelled")]
    BatchNotCancellable { id: String, status: &'static str },
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// The `Retry-After` of a 503 `unavailable` (the ledger's database is down, the server is
/// starting or stopping): the condition is usually brief, and each retry costs the server one
/// authentication query at most.
pub const UNAVAILABLE_RETRY_AFTER_MS: u64 = 1_000;

/// The OpenAI error body: `{"error": {...}}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong, OpenAI-shaped.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: &'static str,
}

/// How loudly an error is logged at the HTTP boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    Debug,
    Warn,
    Error,
}

impl ApiError {
    pub fn invalid_param(param: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidParam {
            param,
            reason: reason.into(),
        }
    }

    pub fn model_endpoint_mismatch(
        model: ModelId,
        kind: ModelKind,
        endpoint: &'static str,
    ) -> Self {
        let kind = match kind {
            ModelKind::Chat => "chat",
            ModelKind::Completion => "completion",
            ModelKind::Embedding => "embedding",
        };
        Self::ModelEndpointMismatch {
            model,
            kind,
            endpoint,
        }
    }

    /// How this error is answered, decided in one exhaustive match (nested crate errors
    /// included): a new variant anywhere does not compile until someone decides its answer.
    fn answer(&self) -> Answer {
        match self {
            Self::InvalidJson { .. } => {
                Answer::new(StatusCode::BAD_REQUEST, "invalid_request_error")
            }
            Self::InvalidParam { param, .. } => {
                Answer::new(StatusCode::BAD_REQUEST, "invalid_request_error").param(param)
            }
            Self::InvalidApiKey => Answer::new(StatusCode::UNAUTHORIZED, "invalid_api_key"),
            // Retrying cannot succeed until an operator acts.
            Self::KeySuspended { .. } => {
                Answer::new(StatusCode::TOO_MANY_REQUESTS, "key_suspended").no_retry()
            }
            Self::AdminUnauthorized => Answer::new(StatusCode::UNAUTHORIZED, "invalid_admin_token"),
            Self::ConsoleSignedOut => Answer::new(StatusCode::UNAUTHORIZED, "console_signed_out"),
            Self::ConsoleRoleRequired => {
                Answer::new(StatusCode::FORBIDDEN, "console_role_required").no_retry()
            }
            Self::CsrfRejected => Answer::new(StatusCode::FORBIDDEN, "csrf_rejected").no_retry(),
            Self::ModelNotFound { .. } => {
                Answer::new(StatusCode::NOT_FOUND, "model_not_found").param("model")
            }
            Self::ModelEndpointMismatch { .. } => {
                Answer::new(StatusCode::BAD_REQUEST, "model_endpoint_mismatch").param("model")
            }
            Self::RequestTooLarge { .. } => {
                Answer::new(StatusCode::PAYLOAD_TOO_LARGE, "request_too_large")
            }
            Self::RouteNotFound => Answer::new(StatusCode::NOT_FOUND, "not_found"),
            Self::MethodNotAllowed => {
                Answer::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
            }
            Self::Timeout { .. } => {
                Answer::new(StatusCode::GATEWAY_TIMEOUT, "request_timeout").public()
            }
            Self::Stalled { .. } => {
                Answer::new(StatusCode::GATEWAY_TIMEOUT, "stream_stalled").public()
            }
            Self::ResourceNotFound { .. } => {
                Answer::new(StatusCode::NOT_FOUND, "resource_not_found")
            }
            Self::ModelBusy { .. } => Answer::new(StatusCode::CONFLICT, "model_busy"),
            Self::FileTooLarge { .. } => {
                Answer::new(StatusCode::PAYLOAD_TOO_LARGE, "file_too_large").param("file")
            }
            Self::FileNotFound { .. } => Answer::new(StatusCode::NOT_FOUND, "file_not_found"),
            Self::BatchNotFound { .. } => Answer::new(StatusCode::NOT_FOUND, "batch_not_found"),
            Self::InvalidBatchFile { .. } => {
                Answer::new(StatusCode::BAD_REQUEST, "invalid_batch_file")
            }
            // Not retried: the batch may run for hours.
            Self::FileInUse { .. } => Answer::new(StatusCode::CONFLICT, "file_in_use")
                .param("file_id")
                .no_retry(),
            // The SDK retries 409 by default; the batch will not become cancellable.
            Self::BatchNotCancellable { .. } => {
                Answer::new(StatusCode::CONFLICT, "batch_not_cancellable").no_retry()
            }
            Self::Starting => Answer::unavailable().public(),
            Self::Engine(error) => engine_answer(error),
            Self::Ledger(error) => ledger_answer(error),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.answer().status
    }

    /// The OpenAI error `type`, by status class. The one wildcard of this file: `StatusCode` is
    /// not our enum, and every status this type produces falls in one of these classes.
    pub fn kind(&self) -> &'static str {
        match self.status() {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            status if status.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The stable, `snake_case` `code`; every value is in [`ERROR_CODES`] and `docs/errors.md`.
    pub fn code(&self) -> &'static str {
        self.answer().code
    }

    /// The parameter at fault, if one is.
    pub fn param(&self) -> Option<&'static str> {
        self.answer().param
    }

    /// How long a client should wait before retrying, for 429s and 503s.
    pub fn retry_after_ms(&self) -> Option<u64> {
        self.answer().retry_after_ms
    }

    /// Whether the SDK should retry on its own (`x-should-retry`); only set where its default
    /// (retry every 429 and 409) would be wrong.
    pub fn should_retry(&self) -> Option<bool> {
        self.answer().should_retry
    }

    fn level(&self) -> Level {
        let status = self.status();
        if status.is_server_error() {
            Level::Error
        } else if status == StatusCode::TOO_MANY_REQUESTS {
            Level::Warn
        } else {
            Level::Debug
        }
    }

    /// The message shown to the client: 5xx bodies never carry internal detail, only the id.
    pub fn public_message(&self, request_id: Option<RequestId>) -> String {
        let answer = self.answer();
        if answer.status.is_server_error() {
            let what = if answer.message_public {
                self.to_string()
            } else {
                answer
                    .fixed_message
                    .unwrap_or("internal server error")
                    .to_owned()
            };
            match request_id {
                Some(id) => format!("{what} (request id {id})"),
                None => what,
            }
        } else {
            self.to_string()
        }
    }

    /// The body, as sent in a response or as the last SSE event of a failed stream.
    pub fn body(&self, request_id: Option<RequestId>) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.public_message(request_id),
                kind: self.kind(),
                param: self.param(),
                code: self.code(),
            },
        }
    }

    /// Logs the error once, at the HTTP boundary, at its variant's level.
    pub(crate) fn log(&self) {
        let code = self.code();
        match self.level() {
            Level::Error => tracing::error!(code, error = %self, "request failed"),
            Level::Warn => tracing::warn!(code, error = %self, "request rejected"),
            Level::Debug => tracing::debug!(code, error = %self, "request rejected"),
        }
    }
}

/// Everything the HTTP boundary needs to answer one error.
#[derive(Debug, Clone, Copy)]
struct Answer {
    status: StatusCode,
    code: &'static str,
    param: Option<&'static str>,
    retry_after_ms: Option<u64>,
    should_retry: Option<bool>,
    /// A 5xx whose own message carries no internal detail and may be shown to the client.
    message_public: bool,
    /// What a 5xx whose own message is not public says instead of "internal server error".
    fixed_message: Option<&'static str>,
}

impl Answer {
    fn new(status: StatusCode, code: &'static str) -> Self {
        Self {
            status,
            code,
            param: None,
            retry_after_ms: None,
            should_retry: None,
            message_public: false,
            fixed_message: None,
        }
    }

    /// 503 `unavailable` with `Retry-After`: retrying soon may succeed.
    fn unavailable() -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable")
            .retry_after_ms(UNAVAILABLE_RETRY_AFTER_MS)
    }

    fn fixed_message(self, message: &'static str) -> Self {
        Self {
            fixed_message: Some(message),
            ..self
        }
    }

    fn param(self, param: &'static str) -> Self {
        Self {
            param: Some(param),
            ..self
        }
    }

    fn retry_after_ms(self, ms: u64) -> Self {
        Self {
            retry_after_ms: Some(ms),
            ..self
        }
    }

    /// Final: retrying the same request never succeeds (`x-should-retry: false`).
    fn no_retry(self) -> Self {
        Self {
            should_retry: Some(false),
            ..self
        }
    }

    fn public(self) -> Self {
        Self {
            message_public: true,
            ..self
        }
    }
}

fn engine_answer(error: &EngineError) -> Answer {
    match error {
        EngineError::Overloaded { retry_after_ms } => {
            Answer::new(StatusCode::TOO_MANY_REQUESTS, "overloaded")
                .retry_after_ms(u64::from(*retry_after_ms))
        }
        EngineError::ContextLengthExceeded { .. } => {
            Answer::new(StatusCode::BAD_REQUEST, "context_length_exceeded")
        }
        EngineError::InvalidRequest { param, .. } => {
            Answer::new(StatusCode::BAD_REQUEST, "invalid_request_error").param(param)
        }
        EngineError::ExceedsMemoryBudget { .. } => {
            Answer::new(StatusCode::BAD_REQUEST, "model_exceeds_memory_budget")
        }
        // The chat template rejected the conversation (or the model has none): the request's
        // `messages` cannot be rendered for this model.
        EngineError::Template { .. } => {
            Answer::new(StatusCode::BAD_REQUEST, "invalid_request_error").param("messages")
        }
        EngineError::Load { .. }
        | EngineError::Scheduler { .. }
        | EngineError::Tokenize { .. }
        | EngineError::Decode { .. }
        | EngineError::Embedding { .. } => {
            Answer::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error")
        }
        EngineError::ShutDown => Answer::unavailable(),
        // The engine's thread died under the request and was restarted: retrying is safe.
        EngineError::Restarted => Answer::new(StatusCode::SERVICE_UNAVAILABLE, "engine_restarted")
            .retry_after_ms(UNAVAILABLE_RETRY_AFTER_MS),
        EngineError::NoBackendInRegion { .. } => {
            Answer::new(StatusCode::SERVICE_UNAVAILABLE, "no_backend_in_region").public()
        }
        EngineError::Backend { .. } => Answer::new(StatusCode::BAD_GATEWAY, "backend_failed"),
    }
}

/// The same ledger error gets the same answer on every endpoint: what names a thing that does
/// not exist is a 404, what rejects the caller's value a 400, wherever the call came from.
fn ledger_answer(error: &LedgerError) -> Answer {
    match error {
        // Fail closed: without the ledger nothing is reserved, so nothing is served.
        LedgerError::Database(_) | LedgerError::WriterFailed => {
            Answer::unavailable().fixed_message("the billing database is unavailable, retry later")
        }
        LedgerError::KeyRevoked { .. } => Answer::new(StatusCode::UNAUTHORIZED, "invalid_api_key"),
        LedgerError::InsufficientQuota { .. } => {
            Answer::new(StatusCode::TOO_MANY_REQUESTS, "insufficient_quota").no_retry()
        }
        LedgerError::RateLimited { retry_after_ms, .. } => {
            Answer::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded")
                .retry_after_ms(*retry_after_ms)
        }
        LedgerError::DuplicateRequest { .. } => {
            Answer::new(StatusCode::CONFLICT, "duplicate_request_id").no_retry()
        }
        LedgerError::IdempotencyKeyReused { .. } => {
            Answer::new(StatusCode::CONFLICT, "idempotency_key_reused").no_retry()
        }
        LedgerError::TenantNotFound { .. } | LedgerError::KeyNotFound { .. } => {
            Answer::new(StatusCode::NOT_FOUND, "resource_not_found")
        }
        LedgerError::TenantCurrencyConflict { .. } => {
            Answer::new(StatusCode::BAD_REQUEST, "invalid_request_error").param("currency")
        }
        LedgerError::OutOfRange { field } => {
            Answer::new(StatusCode::BAD_REQUEST, "invalid_request_error").param(field)
        }
        LedgerError::Core(error) => core_answer(error),
        // A price in another currency than the account: the operator's configuration.
        LedgerError::CurrencyMismatch { .. }
        | LedgerError::Migrate(_)
        | LedgerError::UnsupportedUrl
        | LedgerError::Corrupt { .. }
        | LedgerError::Invariant { .. }
        | LedgerError::PriceNotFound { .. }
        | LedgerError::PriceVersionConflict { .. }
        | LedgerError::ReservationNotFound { .. }
        | LedgerError::ReservationMismatch { .. } => {
            Answer::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error")
        }
    }
}

/// A core error that reached the ledger: a value the caller gave (an id, an amount, a currency)
/// is a 400; configuration errors and money overflow (amounts are bounded before any
/// arithmetic, so an overflow is a broken invariant) are a 500.
fn core_answer(error: &CoreError) -> Answer {
    match error {
        CoreError::InvalidId { .. }
        | CoreError::InvalidAmount { .. }
        | CoreError::UnknownCurrency { .. } => {
            Answer::new(StatusCode::BAD_REQUEST, "invalid_request_error")
        }
        CoreError::ConfigRead { .. }
        | CoreError::ConfigParse { .. }
        | CoreError::ConfigInvalid { .. }
        | CoreError::PlacementInvalid { .. }
        | CoreError::MoneyOverflow { .. } => {
            Answer::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error")
        }
    }
}

/// An operator's load or unload refused by the pool (`POST /admin/models/{id}/load|unload`).
/// A model request's pool errors reach the gateway as [`EngineError`]s: the runtime translates
/// them where it knows the request (its prompt, its retry hint).
impl From<tidepool_pool::PoolError> for ApiError {
    fn from(error: tidepool_pool::PoolError) -> Self {
        use tidepool_pool::PoolError;
        match error {
            PoolError::ModelNotFound { model } => Self::ResourceNotFound {
                what: "pooled model",
                id: model.to_string(),
            },
            PoolError::ModelBusy { model, reason } => Self::ModelBusy {
                model: model.to_string(),
                reason,
            },
            PoolError::ModelTooLarge {
                bytes_needed,
                memory_bytes_max,
                ..
            } => EngineError::ExceedsMemoryBudget {
                bytes_needed,
                memory_bytes_max,
            }
            .into(),
            // An operator's load or unload queues no request: these are scheduler faults (500).
            error @ (PoolError::QueueFull { .. }
            | PoolError::BatchQueueFull { .. }
            | PoolError::RequestTooLong { .. }
            | PoolError::DuplicateSeq { .. }
            | PoolError::UnknownAction { .. }
            | PoolError::EventMismatch { .. }
            | PoolError::TimeWentBackwards { .. }
            | PoolError::InvalidConfig { .. }) => EngineError::Scheduler {
                reason: error.to_string(),
            }
            .into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.log();
        let request_id = CURRENT_REQUEST_ID.try_with(|id| *id).ok();
        let status = self.status();
        let retry_after_ms = self.retry_after_ms();
        let should_retry = self.should_retry();
        let mut response = (status, axum::Json(self.body(request_id))).into_response();
        if let Some(ms) = retry_after_ms {
            let headers = response.headers_mut();
            // Whole seconds, rounded up so a client never retries early.
            let seconds = ms.div_ceil(1000).max(1);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
            headers.insert("retry-after-ms", HeaderValue::from(ms));
        }
        if let Self::Ledger(LedgerError::RateLimited {
            kind,
            limit,
            retry_after_ms,
            ..
        }) = &self
        {
            let status = tidepool_ledger::WindowStatus {
                limit: *limit,
                remaining: 0,
                reset_ms: *retry_after_ms,
            };
            let (requests, tokens) = match kind {
                tidepool_ledger::RateKind::Requests => (Some(status), None),
                tidepool_ledger::RateKind::Tokens => (None, Some(status)),
            };
            crate::ratelimit::insert_headers(
                response.headers_mut(),
                &tidepool_ledger::RateLimitStatus { requests, tokens },
            );
        }
        if let Some(retry) = should_retry {
            response.headers_mut().insert(
                "x-should-retry",
                HeaderValue::from_static(if retry { "true" } else { "false" }),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[expect(clippy::too_many_lines, reason = "one sample per error variant")]
    fn samples() -> Vec<ApiError> {
        let model = ModelId::new("m").unwrap();
        vec![
            ApiError::InvalidJson { detail: "x".into() },
            ApiError::invalid_param("top_p", "bad"),
            ApiError::InvalidApiKey,
            ApiError::KeySuspended {
                key_id: KeyId("k".into()),
                reason: "burst".into(),
            },
            ApiError::ModelNotFound { model: "m".into() },
            ApiError::model_endpoint_mismatch(model, ModelKind::Embedding, "/v1/chat/completions"),
            ApiError::RequestTooLarge { bytes_max: 1 },
            ApiError::RouteNotFound,
            ApiError::ConsoleSignedOut,
            ApiError::ConsoleRoleRequired,
            ApiError::CsrfRejected,
            ApiError::MethodNotAllowed,
            ApiError::Timeout { timeout_ms: 1 },
            ApiError::Stalled { stall_ms: 1 },
            EngineError::Overloaded { retry_after_ms: 1 }.into(),
            EngineError::ContextLengthExceeded {
                prompt_tokens: 1,
                max_tokens: 1,
                context_tokens: 1,
            }
            .into(),
            EngineError::InvalidRequest {
                param: "prompt",
                reason: "x".into(),
            }
            .into(),
            EngineError::Load {
                path: "p".into(),
                reason: "x".into(),
            }
            .into(),
            EngineError::Tokenize { reason: "x".into() }.into(),
            EngineError::Template { reason: "x".into() }.into(),
            EngineError::Decode { code: 1 }.into(),
            EngineError::Embedding { reason: "x".into() }.into(),
            EngineError::ShutDown.into(),
            LedgerError::UnsupportedUrl.into(),
            LedgerError::KeyNotFound { key_id: "k".into() }.into(),
            LedgerError::TenantNotFound {
                tenant: tidepool_core::TenantId::new("t").unwrap(),
            }
            .into(),
            LedgerError::CurrencyMismatch {
                expected: tidepool_core::Currency::parse("USD").unwrap(),
                found: tidepool_core::Currency::parse("EUR").unwrap(),
            }
            .into(),
            LedgerError::TenantCurrencyConflict {
                tenant: tidepool_core::TenantId::new("t").unwrap(),
                existing: tidepool_core::Currency::parse("USD").unwrap(),
                requested: tidepool_core::Currency::parse("EUR").unwrap(),
            }
            .into(),
            LedgerError::Core(CoreError::InvalidAmount { value: "x".into() }).into(),
            LedgerError::Core(CoreError::MoneyOverflow { what: "x" }).into(),
            LedgerError::Invariant { what: "x" }.into(),
            LedgerError::OutOfRange { field: "f" }.into(),
            LedgerError::Corrupt { what: "w" }.into(),
            LedgerError::WriterFailed.into(),
            LedgerError::InsufficientQuota {
                scope: tidepool_ledger::QuotaScope::Balance,
                needed: tidepool_core::Nanos(2),
                available: tidepool_core::Nanos(1),
            }
            .into(),
            LedgerError::RateLimited {
                scope: tidepool_ledger::RateScopeKind::Key,
                kind: tidepool_ledger::RateKind::Requests,
                limit: 1,
                retry_after_ms: 1,
            }
            .into(),
            LedgerError::IdempotencyKeyReused {
                original_request_id: RequestId::new(),
                state: tidepool_ledger::ReservationState::Settled,
            }
            .into(),
            LedgerError::DuplicateRequest {
                request_id: RequestId::new(),
            }
            .into(),
            ApiError::AdminUnauthorized,
            ApiError::ResourceNotFound {
                what: "tenant",
                id: "t".into(),
            },
            ApiError::ModelBusy {
                model: "m".into(),
                reason: "busy",
            },
            ApiError::Starting,
            ApiError::FileTooLarge { bytes_max: 1 },
            ApiError::FileNotFound { id: "f".into() },
            ApiError::BatchNotFound { id: "b".into() },
            ApiError::InvalidBatchFile { reason: "x".into() },
            ApiError::FileInUse {
                id: "f".into(),
                batch_id: "b".into(),
            },
            ApiError::BatchNotCancellable {
                id: "b".into(),
                status: "completed",
            },
            EngineError::ExceedsMemoryBudget {
                bytes_needed: 2,
                memory_bytes_max: 1,
            }
            .into(),
            EngineError::Scheduler { reason: "x".into() }.into(),
            EngineError::NoBackendInRegion {
                regions: vec!["eu".into()],
            }
            .into(),
            EngineError::Backend {
                backend: "w1".into(),
                status: Some(500),
            }
            .into(),
            EngineError::Restarted.into(),
        ]
    }

    #[test]
    fn every_code_is_listed_and_every_listed_code_is_used() {
        let used: std::collections::BTreeSet<_> = samples().iter().map(ApiError::code).collect();
        for code in &used {
            assert!(
                ERROR_CODES.contains(code),
                "{code} missing from ERROR_CODES"
            );
        }
        for code in ERROR_CODES {
            assert!(
                used.contains(code),
                "{code} is listed but no sample produces it"
            );
        }
    }

    #[test]
    fn server_errors_hide_detail_and_quote_the_request_id() {
        let id = RequestId::new();
        for error in samples() {
            let body = error.body(Some(id));
            assert!(error.status().is_client_error() || error.status().is_server_error());
            if error.status().is_server_error() {
                assert!(body.error.message.contains(&id.to_string()));
                assert!(!body.error.message.contains('x'), "{}", body.error.message);
                assert_eq!(body.error.kind, "server_error");
            }
        }
        assert_eq!(
            ApiError::from(EngineError::Overloaded {
                retry_after_ms: 1500
            })
            .retry_after_ms(),
            Some(1500)
        );
    }

    #[test]
    fn every_unavailable_answer_says_when_to_retry() {
        // Fail closed on a lost database: 503 with Retry-After, never a hang or a 500.
        let unavailable = [
            ApiError::Starting,
            LedgerError::WriterFailed.into(),
            EngineError::ShutDown.into(),
        ];
        for error in unavailable {
            assert_eq!(error.status(), StatusCode::SERVICE_UNAVAILABLE, "{error}");
            assert_eq!(error.code(), "unavailable", "{error}");
            assert_eq!(
                error.retry_after_ms(),
                Some(UNAVAILABLE_RETRY_AFTER_MS),
                "{error}"
            );
            let response = error.into_response();
            assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        }
        let message = ApiError::from(LedgerError::WriterFailed).public_message(None);
        assert_eq!(message, "the billing database is unavailable, retry later");
    }

    #[test]
    fn a_ledger_error_has_one_answer_on_every_endpoint() {
        // What names something that does not exist is a 404, what rejects a value the caller
        // gave a 400, on the admin API and on the OpenAI endpoints alike (there is no second
        // mapping for admin handlers).
        let tenant = tidepool_core::TenantId::new("nobody").unwrap();
        let missing = [
            ApiError::from(LedgerError::TenantNotFound { tenant }),
            ApiError::from(LedgerError::KeyNotFound { key_id: "k".into() }),
        ];
        for error in &missing {
            assert_eq!(error.status(), StatusCode::NOT_FOUND, "{error}");
            assert_eq!(error.code(), "resource_not_found", "{error}");
            assert_eq!(error.kind(), "invalid_request_error", "{error}");
        }
        let out_of_range = ApiError::from(LedgerError::OutOfRange { field: "budget" });
        assert_eq!(out_of_range.status(), StatusCode::BAD_REQUEST);
        assert_eq!(out_of_range.param(), Some("budget"));
        let currency = ApiError::from(LedgerError::TenantCurrencyConflict {
            tenant: tidepool_core::TenantId::new("t").unwrap(),
            existing: tidepool_core::Currency::parse("USD").unwrap(),
            requested: tidepool_core::Currency::parse("EUR").unwrap(),
        });
        assert_eq!(
            (currency.status(), currency.param()),
            (StatusCode::BAD_REQUEST, Some("currency"))
        );
        // A price in another currency than the account is the operator's configuration.
        let price = ApiError::from(LedgerError::CurrencyMismatch {
            expected: tidepool_core::Currency::parse("USD").unwrap(),
            found: tidepool_core::Currency::parse("EUR").unwrap(),
        });
        assert_eq!(price.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let overflow = ApiError::from(LedgerError::Core(CoreError::MoneyOverflow { what: "x" }));
        assert_eq!(overflow.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn an_operators_pool_refusal_has_its_own_status() {
        use tidepool_pool::PoolError;
        let model = ModelId::new("m").unwrap();
        let status = |error: PoolError| ApiError::from(error).status();
        assert_eq!(
            status(PoolError::ModelNotFound {
                model: model.clone()
            }),
            StatusCode::NOT_FOUND
        );
        let busy = ApiError::from(PoolError::ModelBusy {
            model: model.clone(),
            reason: "pinned",
        });
        assert_eq!(busy.code(), "model_busy", "{busy}");
        let too_large = ApiError::from(PoolError::ModelTooLarge {
            model,
            bytes_needed: 2,
            memory_bytes_max: 1,
        });
        assert_eq!(
            too_large.code(),
            "model_exceeds_memory_budget",
            "{too_large}"
        );
        assert_eq!(
            status(PoolError::InvalidConfig {
                field: "x".into(),
                reason: "y"
            }),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
}
