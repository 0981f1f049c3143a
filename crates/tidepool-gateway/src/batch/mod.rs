//! The Batch API, OpenAI's shape (docs/batch.md): `/v1/files` (uploads streamed to disk under
//! `[batch] files_dir`, metadata in the ledger), `/v1/batches` (create validates the input file
//! line by line, retrieve, cancel, list), and the runner that claims unfinished batches and runs
//! each line through the same handlers as an online request ([`BATCH_LINE`]), at the batch price,
//! outside the RPM/TPM windows, as `RequestClass::Batch`.
//!
//! Isolation: files and batches belong to a tenant; any key of that tenant (inference or
//! tenant-admin) sees and manages them, another tenant's key gets 404.

pub(crate) mod api;
pub(crate) mod files;
mod input;
mod runner;

use std::path::PathBuf;

use axum::http::HeaderMap;
use tidepool_ledger::ApiKeyRecord;

pub(crate) use api::{cancel_batch, create_batch, list_batches, retrieve_batch};
pub(crate) use files::{delete_file, file_content, list_files, retrieve_file, upload_file};
pub use runner::{BATCH_LINE_ERROR_CODES, run_pending, spawn_runner};

pub(crate) use crate::batch_line::{BATCH_LINE, BatchLineContext};
pub use crate::batch_line::{FILES_DIR_DEFAULT, files_dir_for};
use crate::error::ApiError;
use crate::extract::{bearer, unsuspended};
use crate::state::AppState;

/// The key calling a files or batches endpoint (no usage entry: these calls cost nothing).
async fn caller(state: &AppState, headers: &HeaderMap) -> Result<ApiKeyRecord, ApiError> {
    if !state.is_started() {
        return Err(ApiError::Starting);
    }
    let secret = bearer(headers).ok_or(ApiError::InvalidApiKey)?;
    let record = state
        .ledger()
        .authenticate(secret)
        .await?
        .ok_or(ApiError::InvalidApiKey)?;
    unsuspended(record)
}

/// A new time-ordered id: `prefix` then 32 hex digits (`UUIDv7`), so newest-first listing is
/// ordering by id.
fn new_id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::now_v7().simple())
}

/// Whether `id` can name a file on disk: our own ids only (`file-` and hex).
fn is_file_id(id: &str) -> bool {
    id.strip_prefix("file-").is_some_and(|hex| {
        !hex.is_empty() && hex.len() <= 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())
    })
}

/// The content path of file `file_id` (an id [`is_file_id`] accepts).
fn content_path(state: &AppState, file_id: &str) -> PathBuf {
    state.files_dir().join(format!("{file_id}.jsonl"))
}

/// Unix seconds of a millisecond timestamp, for OpenAI's `*_at` fields.
fn seconds(ms: i64) -> i64 {
    ms.div_euclid(1000)
}
