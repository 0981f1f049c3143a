//! The batch line a request runs and where batch files live: the few names the request path
//! (authentication, metering, state) needs from the Batch API, kept apart from it so that the
//! request path does not depend on the batch handlers that call into it.

use std::path::{Path, PathBuf};

use tidepool_core::{BatchConfig, KeyId};

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
