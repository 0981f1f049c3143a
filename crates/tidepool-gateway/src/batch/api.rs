//! `/v1/batches`: create (validates the input file, streaming it), retrieve, cancel, list, and
//! the batch object with its request counts and its own cost so far (`usage.cost_nanos`).

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tidepool_ledger::{BatchRecord, BatchStatus};
use utoipa::ToSchema;

use super::files::{ListOf, ListQuery, PURPOSE_BATCH, cut_page};
use super::input::{LineError, validate};
use super::{caller, content_path, is_file_id, new_id, seconds};
use crate::error::{ApiError, ErrorBody};
use crate::extract::ApiJson;
use crate::state::AppState;

/// The endpoints a batch may target.
pub(crate) const BATCH_ENDPOINTS: &[&str] =
    &["/v1/chat/completions", "/v1/completions", "/v1/embeddings"];
/// The only completion window (OpenAI's).
pub(crate) const COMPLETION_WINDOW: &str = "24h";
/// `24h` in milliseconds.
pub(crate) const COMPLETION_WINDOW_MS: i64 = 86_400_000;
/// Most metadata pairs, longest key and value (OpenAI's limits), in bytes.
pub(crate) const METADATA_PAIRS_MAX: usize = 16;
pub(crate) const METADATA_KEY_BYTES_MAX: usize = 64;
pub(crate) const METADATA_VALUE_BYTES_MAX: usize = 512;
/// Default and largest page of `GET /v1/batches`.
const BATCHES_PAGE_LEN_DEFAULT: u32 = 20;
const BATCHES_PAGE_LEN_MAX: u32 = 100;

/// `POST /v1/batches` body.
#[derive(Debug, Deserialize, ToSchema)]
pub(crate) struct CreateBatchRequest {
    input_file_id: String,
    endpoint: String,
    completion_window: String,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
}

/// `errors` of a batch that failed validation.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct BatchErrors {
    object: String,
    data: Vec<LineError>,
}

/// `request_counts`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct RequestCounts {
    total: u64,
    completed: u64,
    failed: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct InputTokensDetails {
    cached_tokens: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct OutputTokensDetails {
    reasoning_tokens: u64,
}

/// `usage`: the tokens of the lines answered so far and (an extension) what they cost, in
/// nano-units of the tenant's currency, at the batch price.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct BatchUsage {
    input_tokens: u64,
    input_tokens_details: InputTokensDetails,
    output_tokens: u64,
    output_tokens_details: OutputTokensDetails,
    total_tokens: u64,
    cost_nanos: i64,
}

/// OpenAI's batch object.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct BatchObject {
    id: String,
    object: &'static str,
    endpoint: String,
    model: Option<String>,
    errors: Option<BatchErrors>,
    input_file_id: String,
    completion_window: String,
    status: &'static str,
    output_file_id: Option<String>,
    error_file_id: Option<String>,
    created_at: i64,
    in_progress_at: Option<i64>,
    expires_at: Option<i64>,
    finalizing_at: Option<i64>,
    completed_at: Option<i64>,
    failed_at: Option<i64>,
    expired_at: Option<i64>,
    cancelling_at: Option<i64>,
    cancelled_at: Option<i64>,
    request_counts: RequestCounts,
    metadata: Option<BTreeMap<String, String>>,
    usage: BatchUsage,
}

/// The batch as the API shows it, with its counts and cost read from its line results.
async fn render(state: &AppState, batch: BatchRecord) -> Result<BatchObject, ApiError> {
    let totals = state.ledger().batch_totals(&batch.batch_id).await?;
    let errors = batch
        .errors
        .as_deref()
        .and_then(|text| serde_json::from_str::<BatchErrors>(text).ok());
    let metadata = batch
        .metadata
        .as_deref()
        .and_then(|text| serde_json::from_str::<BTreeMap<String, String>>(text).ok());
    let at = |ms: Option<i64>| ms.map(seconds);
    Ok(BatchObject {
        id: batch.batch_id,
        object: "batch",
        endpoint: batch.endpoint,
        model: batch.model,
        errors,
        input_file_id: batch.input_file_id,
        completion_window: batch.completion_window,
        status: batch.status.as_str(),
        output_file_id: batch.output_file_id,
        error_file_id: batch.error_file_id,
        created_at: seconds(batch.created_at_ms),
        in_progress_at: at(batch.in_progress_at_ms),
        expires_at: Some(seconds(batch.expires_at_ms)),
        finalizing_at: at(batch.finalizing_at_ms),
        completed_at: at(batch.completed_at_ms),
        failed_at: at(batch.failed_at_ms),
        expired_at: at(batch.expired_at_ms),
        cancelling_at: at(batch.cancelling_at_ms),
        cancelled_at: at(batch.cancelled_at_ms),
        request_counts: RequestCounts {
            total: batch.total,
            completed: totals.completed,
            failed: totals.failed,
        },
        metadata,
        usage: BatchUsage {
            input_tokens: totals.prompt_tokens,
            input_tokens_details: InputTokensDetails { cached_tokens: 0 },
            output_tokens: totals.completion_tokens,
            output_tokens_details: OutputTokensDetails {
                reasoning_tokens: 0,
            },
            total_tokens: totals
                .prompt_tokens
                .saturating_add(totals.completion_tokens),
            cost_nanos: totals.cost_nanos,
        },
    })
}

fn check_metadata(metadata: Option<&BTreeMap<String, String>>) -> Result<(), ApiError> {
    let Some(metadata) = metadata else {
        return Ok(());
    };
    if metadata.len() > METADATA_PAIRS_MAX {
        return Err(ApiError::invalid_param(
            "metadata",
            format!("at most {METADATA_PAIRS_MAX} pairs"),
        ));
    }
    if metadata.iter().any(|(key, value)| {
        key.len() > METADATA_KEY_BYTES_MAX || value.len() > METADATA_VALUE_BYTES_MAX
    }) {
        return Err(ApiError::invalid_param(
            "metadata",
            format!(
                "keys of at most {METADATA_KEY_BYTES_MAX} bytes, values of at most \
                 {METADATA_VALUE_BYTES_MAX}"
            ),
        ));
    }
    Ok(())
}

/// `POST /v1/batches`: validates the input file before answering, so the batch comes back
/// `in_progress` (the runner picks it up) or `failed` with one error per bad line.
#[utoipa::path(post, path = "/v1/batches", tag = "batch", security(("bearer" = [])),
    request_body = CreateBatchRequest,
    responses(
        (status = 200, description = "The batch: `in_progress`, or `failed` with `errors.data` (one entry per bad line, with its `line`)", body = BatchObject),
        (status = 400, description = "`invalid_request_error` (endpoint, completion_window, metadata), `invalid_batch_file`", body = ErrorBody),
        (status = 404, description = "`file_not_found`", body = ErrorBody),
    ))]
pub(crate) async fn create_batch(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<ApiJson<CreateBatchRequest>, ApiError>,
) -> Response {
    match create(&state, &headers, body).await {
        Ok(batch) => Json(batch).into_response(),
        Err(error) => error.into_response(),
    }
}

#[expect(clippy::too_many_lines, reason = "one creation, read top to bottom")]
async fn create(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<ApiJson<CreateBatchRequest>, ApiError>,
) -> Result<BatchObject, ApiError> {
    let key = caller(state, headers).await?;
    let ApiJson(request) = body?;
    let Some(endpoint) = BATCH_ENDPOINTS
        .iter()
        .copied()
        .find(|e| *e == request.endpoint)
    else {
        return Err(ApiError::invalid_param(
            "endpoint",
            format!("must be one of {}", BATCH_ENDPOINTS.join(", ")),
        ));
    };
    if request.completion_window != COMPLETION_WINDOW {
        return Err(ApiError::invalid_param(
            "completion_window",
            format!("must be `{COMPLETION_WINDOW}`"),
        ));
    }
    check_metadata(request.metadata.as_ref())?;
    let not_found = || ApiError::FileNotFound {
        id: request.input_file_id.chars().take(128).collect(),
    };
    if !is_file_id(&request.input_file_id) {
        return Err(not_found());
    }
    let file = state
        .ledger()
        .batch_file(&key.tenant, &request.input_file_id)
        .await?
        .ok_or_else(not_found)?;
    if file.purpose != PURPOSE_BATCH {
        return Err(ApiError::InvalidBatchFile {
            reason: format!(
                "file `{}` has purpose `{}`, not `batch`",
                file.file_id, file.purpose
            ),
        });
    }
    let config = state.batch_config();
    let validated = validate(
        &content_path(state, &file.file_id),
        endpoint,
        config.batch_lines_max,
        config.line_bytes_max,
    )
    .await
    .map_err(|error| {
        tracing::error!(%error, file_id = %file.file_id, "cannot read a batch's input file");
        ApiError::Ledger(tidepool_ledger::LedgerError::Invariant {
            what: "a batch's input file cannot be read",
        })
    })?;
    let now_ms = state.now_ms();
    let failed = !validated.errors.is_empty();
    let errors = failed
        .then(|| {
            serde_json::to_string(&BatchErrors {
                object: "list".to_owned(),
                data: validated.errors,
            })
            .ok()
        })
        .flatten();
    let metadata = request
        .metadata
        .as_ref()
        .and_then(|m| serde_json::to_string(m).ok());
    let batch = BatchRecord {
        batch_id: new_id("batch_"),
        tenant: key.tenant.clone(),
        key_id: key.key_id.0.clone(),
        endpoint: endpoint.to_owned(),
        model: validated.model,
        input_file_id: file.file_id,
        completion_window: COMPLETION_WINDOW.to_owned(),
        metadata,
        status: if failed {
            BatchStatus::Failed
        } else {
            BatchStatus::InProgress
        },
        errors,
        total: if failed { 0 } else { validated.total },
        output_file_id: None,
        error_file_id: None,
        created_at_ms: now_ms,
        expires_at_ms: now_ms.saturating_add(COMPLETION_WINDOW_MS),
        in_progress_at_ms: (!failed).then_some(now_ms),
        finalizing_at_ms: None,
        completed_at_ms: None,
        failed_at_ms: failed.then_some(now_ms),
        expired_at_ms: None,
        cancelling_at_ms: None,
        cancelled_at_ms: None,
    };
    state.ledger().create_batch(&batch).await?;
    tracing::info!(batch_id = %batch.batch_id, status = batch.status.as_str(),
        total = batch.total, "batch created");
    render(state, batch).await
}

async fn owned_batch(
    state: &AppState,
    headers: &HeaderMap,
    batch_id: &str,
) -> Result<BatchRecord, ApiError> {
    let key = caller(state, headers).await?;
    state
        .ledger()
        .batch(&key.tenant, batch_id)
        .await?
        .ok_or_else(|| ApiError::BatchNotFound {
            id: batch_id.chars().take(128).collect(),
        })
}

/// `GET /v1/batches/{id}`.
#[utoipa::path(get, path = "/v1/batches/{id}", tag = "batch", security(("bearer" = [])),
    params(("id" = String, Path, description = "`batch_…`")),
    responses((status = 200, body = BatchObject), (status = 404, description = "`batch_not_found`", body = ErrorBody)))]
pub(crate) async fn retrieve_batch(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(batch_id): Path<String>,
) -> Response {
    let outcome = async {
        let batch = owned_batch(&state, &headers, &batch_id).await?;
        render(&state, batch).await
    }
    .await;
    match outcome {
        Ok(batch) => Json(batch).into_response(),
        Err(error) => error.into_response(),
    }
}

/// `POST /v1/batches/{id}/cancel`: `cancelling` at once; the runner lets the lines in flight
/// finish, gives every other unfinished line a `batch_cancelled` error, then `cancelled`.
#[utoipa::path(post, path = "/v1/batches/{id}/cancel", tag = "batch", security(("bearer" = [])),
    params(("id" = String, Path, description = "`batch_…`")),
    responses((status = 200, description = "The batch, `cancelling`", body = BatchObject),
        (status = 404, description = "`batch_not_found`", body = ErrorBody),
        (status = 409, description = "`batch_not_cancellable`", body = ErrorBody)))]
pub(crate) async fn cancel_batch(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(batch_id): Path<String>,
) -> Response {
    let outcome = async {
        let batch = owned_batch(&state, &headers, &batch_id).await?;
        if batch.status != BatchStatus::Cancelling {
            let moved = state
                .ledger()
                .set_batch_status(
                    &batch.batch_id,
                    &[BatchStatus::Validating, BatchStatus::InProgress],
                    BatchStatus::Cancelling,
                )
                .await?;
            if !moved {
                let now = state
                    .ledger()
                    .batch(&batch.tenant, &batch.batch_id)
                    .await?
                    .map_or(batch.status, |b| b.status);
                if now != BatchStatus::Cancelling {
                    return Err(ApiError::BatchNotCancellable {
                        id: batch.batch_id,
                        status: now.as_str(),
                    });
                }
            }
        }
        let batch = owned_batch(&state, &headers, &batch_id).await?;
        render(&state, batch).await
    }
    .await;
    match outcome {
        Ok(batch) => Json(batch).into_response(),
        Err(error) => error.into_response(),
    }
}

/// `GET /v1/batches`: the tenant's batches, newest first, `after`/`limit` paging.
#[utoipa::path(get, path = "/v1/batches", tag = "batch", security(("bearer" = [])),
    params(ListQuery),
    responses((status = 200, description = "`{object: list, data: [batch], first_id, last_id, has_more}`", body = serde_json::Value)))]
pub(crate) async fn list_batches(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<ListQuery>,
) -> Response {
    let outcome = async {
        let key = caller(&state, &headers).await?;
        let limit = query
            .limit
            .unwrap_or(BATCHES_PAGE_LEN_DEFAULT)
            .clamp(1, BATCHES_PAGE_LEN_MAX);
        let batches = state
            .ledger()
            .list_batches(&key.tenant, query.after.as_deref(), limit.saturating_add(1))
            .await?;
        let (batches, has_more) = cut_page(batches, limit);
        let mut data = Vec::with_capacity(batches.len());
        for batch in batches {
            data.push(render(&state, batch).await?);
        }
        Ok::<_, ApiError>(ListOf::new(data, has_more, |b| &b.id))
    }
    .await;
    match outcome {
        Ok(list) => Json(list).into_response(),
        Err(error) => error.into_response(),
    }
}
