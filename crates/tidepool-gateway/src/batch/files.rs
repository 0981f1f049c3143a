//! `/v1/files`: uploads streamed to disk chunk by chunk (never whole in memory) and bounded by
//! `[batch] file_bytes_max`, retrieval, streamed download, deletion and listing.

use axum::Json;
use axum::body::Body;
use axum::extract::multipart::MultipartRejection;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tidepool_ledger::{BatchFile, FileDeletion};
use tokio::io::AsyncWriteExt as _;
use utoipa::ToSchema;

use super::{caller, content_path, is_file_id, new_id, seconds};
use crate::error::{ApiError, ErrorBody};
use crate::state::AppState;

/// The only purpose clients may upload; outputs carry `batch_output`.
pub(crate) const PURPOSE_BATCH: &str = "batch";
/// The purpose of the output and error files the runner writes.
pub(crate) const PURPOSE_BATCH_OUTPUT: &str = "batch_output";
/// Longest `purpose` or other text form field read, in bytes.
const FORM_TEXT_BYTES_MAX: usize = 256;
/// Longest file name kept, in bytes (longer ones are cut at a character boundary).
const FILENAME_BYTES_MAX: usize = 255;
/// Most files one list page returns (OpenAI's default is 10,000).
const FILES_PAGE_LEN_MAX: u32 = 10_000;

/// OpenAI's file object.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct FileObject {
    pub(crate) id: String,
    pub(crate) object: &'static str,
    pub(crate) bytes: u64,
    pub(crate) created_at: i64,
    pub(crate) filename: String,
    pub(crate) purpose: String,
    pub(crate) status: String,
    pub(crate) expires_at: Option<i64>,
    pub(crate) status_details: Option<String>,
}

impl From<BatchFile> for FileObject {
    fn from(file: BatchFile) -> Self {
        Self {
            id: file.file_id,
            object: "file",
            bytes: file.bytes,
            created_at: seconds(file.created_at_ms),
            filename: file.filename,
            purpose: file.purpose,
            status: file.status,
            expires_at: None,
            status_details: None,
        }
    }
}

/// OpenAI's list envelope.
#[derive(Debug, Serialize)]
pub(crate) struct ListOf<T> {
    pub(crate) object: &'static str,
    pub(crate) data: Vec<T>,
    pub(crate) first_id: Option<String>,
    pub(crate) last_id: Option<String>,
    pub(crate) has_more: bool,
}

impl<T> ListOf<T> {
    /// The envelope of one page, its first and last ids taken with `id`.
    pub(crate) fn new(data: Vec<T>, has_more: bool, id: impl Fn(&T) -> &str) -> Self {
        Self {
            object: "list",
            first_id: data.first().map(|item| id(item).to_owned()),
            last_id: data.last().map(|item| id(item).to_owned()),
            has_more,
            data,
        }
    }
}

/// Cuts rows read `limit + 1` long to one page; the extra row only tells whether more follow.
pub(crate) fn cut_page<T>(mut rows: Vec<T>, limit: u32) -> (Vec<T>, bool) {
    let page = usize::try_from(limit).unwrap_or(usize::MAX);
    let has_more = rows.len() > page;
    rows.truncate(page);
    (rows, has_more)
}

/// `?purpose=&after=&limit=` of the list endpoints.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// `batch` or `batch_output` (files only).
    pub(crate) purpose: Option<String>,
    /// An id: list the older ones.
    pub(crate) after: Option<String>,
    /// Page length (files: 1 to 10,000, the default; batches: 1 to 100, default 20).
    pub(crate) limit: Option<u32>,
}

/// Reads a small text field, refusing one longer than [`FORM_TEXT_BYTES_MAX`].
async fn small_text(mut field: axum::extract::multipart::Field<'_>) -> Result<String, ApiError> {
    let mut bytes = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
        bytes.extend_from_slice(&chunk);
        if bytes.len() > FORM_TEXT_BYTES_MAX {
            return Err(ApiError::InvalidBatchFile {
                reason: format!("a form field is longer than {FORM_TEXT_BYTES_MAX} bytes"),
            });
        }
    }
    String::from_utf8(bytes).map_err(|_| ApiError::InvalidBatchFile {
        reason: "a form field is not UTF-8".to_owned(),
    })
}

#[expect(
    clippy::needless_pass_by_value,
    reason = "used as `map_err(multipart_error)`"
)]
fn multipart_error(error: axum::extract::multipart::MultipartError) -> ApiError {
    ApiError::InvalidBatchFile {
        reason: format!("malformed multipart body: {error}"),
    }
}

fn io_error(error: &std::io::Error) -> ApiError {
    tracing::error!(%error, "batch file storage failed");
    ApiError::Ledger(tidepool_ledger::LedgerError::Invariant {
        what: "batch file storage failed",
    })
}

/// Streams the `file` part to `path`, at most `bytes_max` bytes; returns the byte count.
async fn store_part(
    field: &mut axum::extract::multipart::Field<'_>,
    path: &std::path::Path,
    bytes_max: u64,
) -> Result<u64, ApiError> {
    let mut out = tokio::fs::File::create(path)
        .await
        .map_err(|e| io_error(&e))?;
    let mut written: u64 = 0;
    while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
        written = written.saturating_add(u64::try_from(chunk.len()).unwrap_or(u64::MAX));
        if written > bytes_max {
            return Err(ApiError::FileTooLarge { bytes_max });
        }
        out.write_all(&chunk).await.map_err(|e| io_error(&e))?;
    }
    out.flush().await.map_err(|e| io_error(&e))?;
    out.sync_all().await.map_err(|e| io_error(&e))?;
    Ok(written)
}

/// `POST /v1/files` (multipart: `purpose=batch`, `file`).
#[utoipa::path(post, path = "/v1/files", tag = "batch", security(("bearer" = [])),
    request_body(content_type = "multipart/form-data", description = "`purpose=batch` and `file`: JSON lines, one request each"),
    responses(
        (status = 200, description = "The stored file", body = FileObject),
        (status = 400, description = "`invalid_batch_file`", body = ErrorBody),
        (status = 401, description = "`invalid_api_key`", body = ErrorBody),
        (status = 413, description = "`file_too_large`", body = ErrorBody),
    ))]
pub(crate) async fn upload_file(
    State(state): State<AppState>,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> Response {
    match upload(&state, &headers, multipart).await {
        Ok(file) => Json(FileObject::from(file)).into_response(),
        Err(error) => error.into_response(),
    }
}

#[expect(clippy::too_many_lines, reason = "one upload, read top to bottom")]
async fn upload(
    state: &AppState,
    headers: &HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<BatchFile, ApiError> {
    let key = caller(state, headers).await?;
    let mut multipart = multipart.map_err(|rejection| ApiError::InvalidBatchFile {
        reason: rejection.body_text(),
    })?;
    tokio::fs::create_dir_all(state.files_dir())
        .await
        .map_err(|e| io_error(&e))?;
    let file_id = new_id("file-");
    let path = content_path(state, &file_id);
    let partial = path.with_extension("part");
    let bytes_max = state.batch_config().file_bytes_max;
    let mut purpose = None;
    let mut stored: Option<(String, u64)> = None;
    let outcome: Result<(), ApiError> = async {
        while let Some(mut field) = multipart.next_field().await.map_err(multipart_error)? {
            let name = field.name().map(str::to_owned);
            match name.as_deref() {
                Some("purpose") => purpose = Some(small_text(field).await?),
                Some("file") if stored.is_none() => {
                    let name: String = field
                        .file_name()
                        .unwrap_or("upload.jsonl")
                        .chars()
                        .scan(0_usize, |len, c| {
                            *len = len.saturating_add(c.len_utf8());
                            (*len <= FILENAME_BYTES_MAX).then_some(c)
                        })
                        .collect();
                    let bytes = store_part(&mut field, &partial, bytes_max).await?;
                    stored = Some((name, bytes));
                }
                // Other fields are read and dropped, within the same bound.
                _ => {
                    let mut seen: u64 = 0;
                    while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
                        seen = seen.saturating_add(u64::try_from(chunk.len()).unwrap_or(u64::MAX));
                        if seen > bytes_max {
                            return Err(ApiError::FileTooLarge { bytes_max });
                        }
                    }
                }
            }
        }
        Ok(())
    }
    .await;
    let result = match (outcome, purpose.as_deref(), stored) {
        (Err(error), _, _) => Err(error),
        (Ok(()), Some(PURPOSE_BATCH), Some((filename, bytes))) => {
            tokio::fs::rename(&partial, &path)
                .await
                .map_err(|e| io_error(&e))?;
            let file = BatchFile {
                file_id: file_id.clone(),
                tenant: key.tenant.clone(),
                key_id: key.key_id.0.clone(),
                purpose: PURPOSE_BATCH.to_owned(),
                filename,
                bytes,
                status: "processed".to_owned(),
                created_at_ms: state.now_ms(),
            };
            match state.ledger().create_batch_file(&file).await {
                Ok(()) => return Ok(file),
                Err(error) => {
                    drop(tokio::fs::remove_file(&path).await);
                    Err(error.into())
                }
            }
        }
        (Ok(()), Some(other), Some(_)) => Err(ApiError::InvalidBatchFile {
            reason: format!("purpose must be `batch`, not `{}`", other.escape_debug()),
        }),
        (Ok(()), None, _) => Err(ApiError::InvalidBatchFile {
            reason: "the `purpose` field is missing".to_owned(),
        }),
        (Ok(()), Some(_), None) => Err(ApiError::InvalidBatchFile {
            reason: "the `file` field is missing".to_owned(),
        }),
    };
    // Whatever failed, nothing is kept.
    drop(tokio::fs::remove_file(&partial).await);
    result
}

/// `tenant`'s file, or 404 (another tenant's file is not found either).
async fn owned_file(
    state: &AppState,
    headers: &HeaderMap,
    file_id: &str,
) -> Result<BatchFile, ApiError> {
    let key = caller(state, headers).await?;
    let not_found = || ApiError::FileNotFound {
        id: file_id.chars().take(128).collect(),
    };
    if !is_file_id(file_id) {
        return Err(not_found());
    }
    state
        .ledger()
        .batch_file(&key.tenant, file_id)
        .await?
        .ok_or_else(not_found)
}

/// `GET /v1/files/{id}`.
#[utoipa::path(get, path = "/v1/files/{id}", tag = "batch", security(("bearer" = [])),
    params(("id" = String, Path, description = "`file-…`")),
    responses((status = 200, body = FileObject), (status = 404, description = "`file_not_found`", body = ErrorBody)))]
pub(crate) async fn retrieve_file(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(file_id): Path<String>,
) -> Response {
    match owned_file(&state, &headers, &file_id).await {
        Ok(file) => Json(FileObject::from(file)).into_response(),
        Err(error) => error.into_response(),
    }
}

/// `GET /v1/files/{id}/content`: the bytes as stored, streamed.
#[utoipa::path(get, path = "/v1/files/{id}/content", tag = "batch", security(("bearer" = [])),
    params(("id" = String, Path, description = "`file-…`")),
    responses((status = 200, description = "The file's bytes (JSON lines)", content_type = "application/octet-stream"),
        (status = 404, description = "`file_not_found`", body = ErrorBody)))]
pub(crate) async fn file_content(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(file_id): Path<String>,
) -> Response {
    let file = match owned_file(&state, &headers, &file_id).await {
        Ok(file) => file,
        Err(error) => return error.into_response(),
    };
    match tokio::fs::File::open(content_path(&state, &file.file_id)).await {
        Ok(content) => {
            let body = Body::from_stream(tokio_util::io::ReaderStream::new(content));
            (
                [
                    (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
                    (header::CONTENT_LENGTH, file.bytes.to_string()),
                ],
                body,
            )
                .into_response()
        }
        Err(error) => io_error(&error).into_response(),
    }
}

/// OpenAI's deletion answer.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct FileDeleted {
    id: String,
    object: &'static str,
    deleted: bool,
}

/// `DELETE /v1/files/{id}`: the metadata is marked deleted, then the content removed; 409
/// `file_in_use` while an unfinished batch reads the file as its input.
#[utoipa::path(delete, path = "/v1/files/{id}", tag = "batch", security(("bearer" = [])),
    params(("id" = String, Path, description = "`file-…`")),
    responses((status = 200, body = FileDeleted), (status = 404, description = "`file_not_found`", body = ErrorBody),
        (status = 409, description = "`file_in_use`: an unfinished batch reads it", body = ErrorBody)))]
pub(crate) async fn delete_file(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(file_id): Path<String>,
) -> Response {
    let outcome = async {
        let file = owned_file(&state, &headers, &file_id).await?;
        match state
            .ledger()
            .delete_batch_file(&file.tenant, &file.file_id)
            .await?
        {
            FileDeletion::Deleted => {}
            FileDeletion::NotFound => return Err(ApiError::FileNotFound { id: file.file_id }),
            FileDeletion::InUse { batch_id } => {
                return Err(ApiError::FileInUse {
                    id: file.file_id,
                    batch_id,
                });
            }
        }
        if let Err(error) = tokio::fs::remove_file(content_path(&state, &file.file_id)).await {
            tracing::warn!(%error, file_id = %file.file_id, "cannot remove a deleted file's content");
        }
        Ok(file.file_id)
    }
    .await;
    match outcome {
        Ok(id) => Json(FileDeleted {
            id,
            object: "file",
            deleted: true,
        })
        .into_response(),
        Err(error) => error.into_response(),
    }
}

/// `GET /v1/files`: newest first, `purpose` filter, `after`/`limit` paging.
#[utoipa::path(get, path = "/v1/files", tag = "batch", security(("bearer" = [])),
    params(ListQuery),
    responses((status = 200, description = "`{object: list, data: [file], first_id, last_id, has_more}`", body = serde_json::Value)))]
pub(crate) async fn list_files(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<ListQuery>,
) -> Response {
    let outcome = async {
        let key = caller(&state, &headers).await?;
        let limit = query
            .limit
            .unwrap_or(FILES_PAGE_LEN_MAX)
            .clamp(1, FILES_PAGE_LEN_MAX);
        let files = state
            .ledger()
            .list_batch_files(
                &key.tenant,
                query.purpose.as_deref(),
                query.after.as_deref(),
                limit.saturating_add(1),
            )
            .await?;
        let (files, has_more) = cut_page(files, limit);
        let data: Vec<FileObject> = files.into_iter().map(FileObject::from).collect();
        Ok::<_, ApiError>(ListOf::new(data, has_more, |f| &f.id))
    }
    .await;
    match outcome {
        Ok(list) => Json(list).into_response(),
        Err(error) => error.into_response(),
    }
}
