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

use std::path::{Path, PathBuf};

use axum::http::HeaderMap;
use tidepool_core::{BatchConfig, KeyId};
use tidepool_ledger::ApiKeyRecord;

pub(crate) use api::{cancel_batch, create_batch, list_batches, retrieve_batch};
pub(crate) use files::{delete_file, file_content, list_files, retrieve_file, upload_file};
pub use runner::{BATCH_LINE_ERROR_CODES, run_pending, spawn_runner};

use crate::error::ApiError;
use crate::extract::{bearer, unsuspended};
use crate::state::AppState;

/// `files_dir` when none is configured and the database is not a SQLite file.
pub const FILES_DIR_DEFAULT: &str = "batch-files";

/// The batch line a request runs, set by the runner around the request it sends through the
/// router: the request authenticates as the batch's key and is metered as a batch line.
#[derive(Debug, Clone)]
pub(crate) struct BatchLineContext {
    pub(crate) key_id: KeyId,
    pub(crate) batch_id: String,
    pub(crate) custom_id: String,
    /// 1-based line number in the input file.
    pub(crate) line: u64,
}

tokio::task_local! {
    /// The batch line the current request runs (unset for every client request).
    pub(crate) static BATCH_LINE: BatchLineContext;
}

/// Where file contents live: `[batch] files_dir` if set, else `batch-files` next to a SQLite
/// database file, else `batch-files` in the working directory (with PostgreSQL, set it to a
/// volume every replica shares).
pub fn files_dir_for(config: &BatchConfig, database_url: &str) -> PathBuf {
    if let Some(dir) = &config.files_dir {
        return dir.clone();
    }
    let sqlite_path = database_url
        .strip_prefix("sqlite://")
        .or_else(|| database_url.strip_prefix("sqlite:"))
        .map(|rest| rest.split('?').next().unwrap_or(rest));
    match sqlite_path.map(Path::new).and_then(Path::parent) {
        Some(parent) if !parent.as_os_str().is_empty() => parent.join(FILES_DIR_DEFAULT),
        Some(_) | None => PathBuf::from(FILES_DIR_DEFAULT),
    }
}

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
