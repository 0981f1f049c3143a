//! The batch runner: claims an unfinished batch under a lease (`Ledger::claim_batch`), streams
//! its input file line by line and sends each line not yet answered through the gateway's own
//! router, as the batch's key, inside [`BATCH_LINE`] — so a line gets exactly the validation,
//! engines, reservation and settlement of an online request, at the batch price, outside the
//! RPM/TPM windows, scheduled as `RequestClass::Batch`. At most `[batch] lines_in_flight_max`
//! lines run at once. A succeeded line's result is written in its settlement's transaction; a
//! line that failed moved no money and its result is recorded afterwards. A restarted runner
//! skips every line with a result, so no line is answered or billed twice.
//!
//! When every line has a result the batch is `finalizing`: the output and error files are
//! written from the stored results in line order, then it is `completed`. A cancelled batch
//! (`cancelling`) or one past its window stops dispatching, lets the lines in flight finish,
//! gives every other unfinished line a `batch_cancelled` / `batch_expired` error, writes its
//! files and ends `cancelled` / `expired`.

use std::collections::BTreeSet;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, header};
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use tidepool_core::KeyId;
use tidepool_ledger::{BatchFile, BatchLineRecord, BatchRecord, BatchStatus, NewBatchLine};
use tokio::io::AsyncWriteExt as _;
use tower::ServiceExt as _;

use super::files::PURPOSE_BATCH_OUTPUT;
use super::input::{LineReader, Request as LineRequest, parse_line};
use super::{BATCH_LINE, BatchLineContext, content_path, new_id};
use crate::error::ApiError;
use crate::extract::REQUEST_ID_HEADER;
use crate::state::AppState;

/// The codes a line gets in the error file when it never ran.
pub const BATCH_LINE_ERROR_CODES: &[&str] = &["batch_cancelled", "batch_expired"];
/// Largest response body kept for one line, in bytes (a larger one is an error line).
const LINE_RESPONSE_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Lines dispatched between two checks of the batch's status (cancel, expiry) and lease.
const STATUS_CHECK_LINES: u32 = 16;
/// Line results read per page while writing the output files.
const FINALIZE_PAGE_LEN: u32 = 1_000;
/// Batches one call of [`run_pending`] works on at most.
const RUN_PENDING_BATCHES_MAX: u32 = 64;

/// Why dispatching stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// Every line has a result.
    Done,
    Cancelled,
    Expired,
    /// Another runner holds the batch now.
    LeaseLost,
}

/// Starts the runner task on the state's task tracker: every `[batch] poll_interval_ms` it runs
/// what [`run_pending`] finds. Abort the handle to stop it (lines in flight are then settled by
/// their guards like any request whose client went away, and run again after a restart).
pub fn spawn_runner(state: &AppState) -> tokio::task::JoinHandle<()> {
    let state = state.clone();
    let poll = Duration::from_millis(state.batch_config().poll_interval_ms);
    state.clone().tasks().spawn(async move {
        let mut interval = tokio::time::interval(poll);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            if !state.is_started() {
                continue;
            }
            if let Err(error) = run_pending(&state).await {
                tracing::error!(%error, "batch runner failed; trying again");
            }
        }
    })
}

/// Claims and runs unfinished batches until none is left; returns how many it worked on. Tests
/// call it directly instead of running [`spawn_runner`].
pub async fn run_pending(state: &AppState) -> Result<u32, ApiError> {
    let owner = state.ledger().replica_id().to_owned();
    let lease_ms = lease_ms(state);
    let mut worked: u32 = 0;
    while worked < RUN_PENDING_BATCHES_MAX {
        let Some(batch) = state.ledger().claim_batch(&owner, lease_ms).await? else {
            break;
        };
        worked = worked.saturating_add(1);
        run_batch(state, &batch).await?;
    }
    Ok(worked)
}

fn lease_ms(state: &AppState) -> i64 {
    i64::try_from(state.batch_config().lease_ms).unwrap_or(i64::MAX)
}

async fn run_batch(state: &AppState, batch: &BatchRecord) -> Result<(), ApiError> {
    tracing::info!(batch_id = %batch.batch_id, status = batch.status.as_str(), "running a batch");
    match batch.status {
        BatchStatus::InProgress if state.now_ms() >= batch.expires_at_ms => {
            close(state, batch, BatchStatus::Expired).await
        }
        BatchStatus::InProgress => match run_lines(state, batch).await? {
            Stop::Done => {
                state
                    .ledger()
                    .set_batch_status(
                        &batch.batch_id,
                        &[BatchStatus::InProgress],
                        BatchStatus::Finalizing,
                    )
                    .await?;
                // Cancelled meanwhile: it still ends `cancelled` (nothing is left to cancel).
                let to = match state.ledger().batch_by_id(&batch.batch_id).await? {
                    Some(now) if now.status == BatchStatus::Cancelling => BatchStatus::Cancelled,
                    Some(_) | None => BatchStatus::Completed,
                };
                finalize(state, batch, to).await
            }
            Stop::Cancelled => close(state, batch, BatchStatus::Cancelled).await,
            Stop::Expired => close(state, batch, BatchStatus::Expired).await,
            Stop::LeaseLost => Ok(()),
        },
        BatchStatus::Finalizing => finalize(state, batch, BatchStatus::Completed).await,
        BatchStatus::Cancelling => close(state, batch, BatchStatus::Cancelled).await,
        BatchStatus::Validating
        | BatchStatus::Failed
        | BatchStatus::Completed
        | BatchStatus::Expired
        | BatchStatus::Cancelled => Ok(()),
    }
}

/// Whether the batch should stop (cancelled, expired, lease lost); renews the lease otherwise.
async fn check(state: &AppState, batch: &BatchRecord) -> Result<Option<Stop>, ApiError> {
    let owner = state.ledger().replica_id();
    if !state
        .ledger()
        .renew_batch_lease(&batch.batch_id, owner, lease_ms(state))
        .await?
    {
        return Ok(Some(Stop::LeaseLost));
    }
    let status = state
        .ledger()
        .batch_by_id(&batch.batch_id)
        .await?
        .map(|b| b.status);
    if status == Some(BatchStatus::Cancelling) {
        return Ok(Some(Stop::Cancelled));
    }
    if state.now_ms() >= batch.expires_at_ms {
        return Ok(Some(Stop::Expired));
    }
    Ok(None)
}

/// Runs every line without a result, at most `lines_in_flight_max` at once.
async fn run_lines(state: &AppState, batch: &BatchRecord) -> Result<Stop, ApiError> {
    let done = state
        .ledger()
        .batch_done_custom_ids(&batch.batch_id)
        .await?;
    let mut reader = open_input(state, batch).await?;
    let in_flight_max = usize::try_from(state.batch_config().lines_in_flight_max)
        .unwrap_or(1)
        .max(1);
    let router = crate::router(state.clone());
    let mut in_flight = FuturesUnordered::new();
    let mut first_error: Option<ApiError> = None;
    let mut since_check: u32 = 0;
    let mut stop = Stop::Done;
    while let Some(item) = reader.next().await {
        // Validation accepted every line; a line that does not parse now is skipped.
        let Ok((number, text)) = item else { continue };
        let Ok(request) = parse_line(number, &text, &batch.endpoint) else {
            continue;
        };
        if done.contains(&request.custom_id) {
            continue;
        }
        while in_flight.len() >= in_flight_max {
            if let Some(Err(error)) = in_flight.next().await {
                first_error.get_or_insert(error);
            }
        }
        if first_error.is_some() {
            break;
        }
        if since_check == 0 {
            if let Some(stopped) = check(state, batch).await? {
                stop = stopped;
                break;
            }
            since_check = STATUS_CHECK_LINES;
        }
        since_check = since_check.saturating_sub(1);
        in_flight.push(run_line(state, router.clone(), batch, request));
    }
    // The lines in flight finish, whatever stopped the dispatch.
    while let Some(result) = in_flight.next().await {
        if let Err(error) = result {
            first_error.get_or_insert(error);
        }
    }
    if let Some(error) = first_error {
        return Err(error);
    }
    if stop == Stop::Done
        && let Some(stopped) = check(state, batch).await?
    {
        // Every line has a result: a cancel or the window closing now changes nothing but
        // the final status, which `run_batch` reads again.
        if stopped == Stop::LeaseLost {
            return Ok(Stop::LeaseLost);
        }
    }
    Ok(stop)
}

async fn open_input(state: &AppState, batch: &BatchRecord) -> Result<LineReader, ApiError> {
    LineReader::open(
        &content_path(state, &batch.input_file_id),
        state.batch_config().line_bytes_max,
    )
    .await
    .map_err(|error| storage_error(&error))
}

fn storage_error(error: &std::io::Error) -> ApiError {
    tracing::error!(%error, "batch file storage failed");
    ApiError::Ledger(tidepool_ledger::LedgerError::Invariant {
        what: "batch file storage failed",
    })
}

/// Runs one line through the router and makes sure its result is recorded.
async fn run_line(
    state: &AppState,
    router: Router,
    batch: &BatchRecord,
    request: LineRequest,
) -> Result<(), ApiError> {
    let LineRequest {
        number,
        custom_id,
        mut body,
    } = request;
    // A batch line is answered whole: streaming options do not apply.
    body.insert("stream".to_owned(), serde_json::Value::Bool(false));
    body.remove("stream_options");
    let bytes = serde_json::to_vec(&body).map_err(|_| ApiError::InvalidJson {
        detail: "a batch line's body cannot be serialized".to_owned(),
    })?;
    let uri = format!("{}{}", state.base_path(), batch.endpoint);
    let http = Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(bytes))
        .map_err(|_| ApiError::InvalidJson {
            detail: "a batch line's request cannot be built".to_owned(),
        })?;
    let context = BatchLineContext {
        key_id: KeyId(batch.key_id.clone()),
        batch_id: batch.batch_id.clone(),
        custom_id: custom_id.clone(),
        line: number,
    };
    let response = match BATCH_LINE.scope(context, router.oneshot(http)).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    let status = response.status();
    let request_id = response
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let bytes = axum::body::to_bytes(response.into_body(), LINE_RESPONSE_BYTES_MAX).await;
    let (succeeded, status_code, body) = if let Ok(bytes) = bytes {
        (
            status.is_success(),
            status.as_u16(),
            String::from_utf8_lossy(&bytes).into_owned(),
        )
    } else {
        let error = ApiError::InvalidParam {
            param: "body",
            reason: format!("the response is larger than {LINE_RESPONSE_BYTES_MAX} bytes"),
        };
        let text = serde_json::to_string(&error.body(None)).unwrap_or_default();
        (false, error.status().as_u16(), text)
    };
    let line = NewBatchLine {
        batch_id: batch.batch_id.clone(),
        custom_id,
        line: number,
        succeeded,
        status_code: Some(status_code),
        body: Some(body),
        error_code: None,
        error_message: None,
    };
    // A succeeded, billed line was recorded with its settlement and this changes nothing; a
    // failed one moved no money and is recorded here.
    state
        .ledger()
        .record_batch_line(&line, request_id.as_deref())
        .await?;
    Ok(())
}

/// Gives every line without a result the error of `to` (`batch_cancelled`, `batch_expired`),
/// then writes the files and ends the batch.
async fn close(state: &AppState, batch: &BatchRecord, to: BatchStatus) -> Result<(), ApiError> {
    let (code, message) = match to {
        BatchStatus::Expired => (
            "batch_expired",
            "the batch did not finish within its completion window",
        ),
        _ => ("batch_cancelled", "the batch was cancelled"),
    };
    let done = state
        .ledger()
        .batch_done_custom_ids(&batch.batch_id)
        .await?;
    let mut reader = open_input(state, batch).await?;
    while let Some(item) = reader.next().await {
        let Ok((number, text)) = item else { continue };
        let Ok(request) = parse_line(number, &text, &batch.endpoint) else {
            continue;
        };
        if done.contains(&request.custom_id) {
            continue;
        }
        let line = NewBatchLine {
            batch_id: batch.batch_id.clone(),
            custom_id: request.custom_id,
            line: number,
            succeeded: false,
            status_code: None,
            body: None,
            error_code: Some(code.to_owned()),
            error_message: Some(message.to_owned()),
        };
        state.ledger().record_batch_line(&line, None).await?;
    }
    finalize(state, batch, to).await
}

/// One output or error file being written.
struct OutFile {
    file_id: String,
    path: std::path::PathBuf,
    out: tokio::io::BufWriter<tokio::fs::File>,
    bytes: u64,
    lines: u64,
}

impl OutFile {
    async fn create(state: &AppState) -> Result<Self, ApiError> {
        tokio::fs::create_dir_all(state.files_dir())
            .await
            .map_err(|e| storage_error(&e))?;
        let file_id = new_id("file-");
        let path = content_path(state, &file_id);
        let file = tokio::fs::File::create(&path)
            .await
            .map_err(|e| storage_error(&e))?;
        Ok(Self {
            file_id,
            path,
            out: tokio::io::BufWriter::new(file),
            bytes: 0,
            lines: 0,
        })
    }

    async fn write_line(&mut self, value: &serde_json::Value) -> Result<(), ApiError> {
        let mut text = serde_json::to_vec(value).map_err(|_| ApiError::InvalidJson {
            detail: "a batch result cannot be serialized".to_owned(),
        })?;
        text.push(b'\n');
        self.out
            .write_all(&text)
            .await
            .map_err(|e| storage_error(&e))?;
        self.bytes = self
            .bytes
            .saturating_add(u64::try_from(text.len()).unwrap_or(u64::MAX));
        self.lines = self.lines.saturating_add(1);
        Ok(())
    }

    /// Flushes and syncs; the file's record, or `None` (and the file removed) when empty.
    async fn finish(
        mut self,
        batch: &BatchRecord,
        filename: &str,
        created_at_ms: i64,
    ) -> Result<Option<BatchFile>, ApiError> {
        self.out.flush().await.map_err(|e| storage_error(&e))?;
        self.out
            .get_ref()
            .sync_all()
            .await
            .map_err(|e| storage_error(&e))?;
        if self.lines == 0 {
            drop(tokio::fs::remove_file(&self.path).await);
            return Ok(None);
        }
        Ok(Some(BatchFile {
            file_id: self.file_id,
            tenant: batch.tenant.clone(),
            key_id: batch.key_id.clone(),
            purpose: PURPOSE_BATCH_OUTPUT.to_owned(),
            filename: filename.to_owned(),
            bytes: self.bytes,
            status: "processed".to_owned(),
            created_at_ms,
        }))
    }
}

/// OpenAI's output/error line for one stored result.
fn result_line(record: &BatchLineRecord) -> serde_json::Value {
    let line = &record.line;
    let id = match &record.request_id {
        Some(request_id) => format!("batch_req_{}", request_id.replace('-', "")),
        None => format!("batch_req_{}_{}", line.batch_id, line.line),
    };
    let parsed_body = line
        .body
        .as_deref()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(text).ok());
    match line.status_code {
        Some(status_code) => serde_json::json!({
            "id": id,
            "custom_id": line.custom_id,
            "response": {
                "status_code": status_code,
                "request_id": record.request_id,
                "body": parsed_body,
            },
            "error": null,
        }),
        None => serde_json::json!({
            "id": id,
            "custom_id": line.custom_id,
            "response": null,
            "error": {
                "code": line.error_code,
                "message": line.error_message,
            },
        }),
    }
}

/// Writes the output and error files from the stored results, in line order, then ends the
/// batch in `to` (recording the files in the same transaction).
async fn finalize(state: &AppState, batch: &BatchRecord, to: BatchStatus) -> Result<(), ApiError> {
    let mut output = OutFile::create(state).await?;
    let mut errors = OutFile::create(state).await?;
    let mut after: u64 = 0;
    let owner = state.ledger().replica_id();
    loop {
        let page = state
            .ledger()
            .batch_lines_page(&batch.batch_id, after, FINALIZE_PAGE_LEN)
            .await?;
        let Some(last) = page.last() else { break };
        after = last.line.line;
        for record in &page {
            let value = result_line(record);
            if record.line.succeeded {
                output.write_line(&value).await?;
            } else {
                errors.write_line(&value).await?;
            }
        }
        if !state
            .ledger()
            .renew_batch_lease(&batch.batch_id, owner, lease_ms(state))
            .await?
        {
            // Another runner finalizes it; drop this attempt's files.
            drop(tokio::fs::remove_file(&output.path).await);
            drop(tokio::fs::remove_file(&errors.path).await);
            return Ok(());
        }
    }
    let now_ms = state.now_ms();
    let output = output
        .finish(batch, &format!("{}_output.jsonl", batch.batch_id), now_ms)
        .await?;
    let errors = errors
        .finish(batch, &format!("{}_error.jsonl", batch.batch_id), now_ms)
        .await?;
    let ended = state
        .ledger()
        .end_batch(&batch.batch_id, to, output.as_ref(), errors.as_ref())
        .await?;
    if !ended {
        for file in [&output, &errors].into_iter().flatten() {
            drop(tokio::fs::remove_file(content_path(state, &file.file_id)).await);
        }
    }
    let done: BTreeSet<&str> = [output.as_ref(), errors.as_ref()]
        .into_iter()
        .flatten()
        .map(|f| f.file_id.as_str())
        .collect();
    tracing::info!(batch_id = %batch.batch_id, status = to.as_str(), ended, files = ?done,
        "batch finished");
    Ok(())
}
