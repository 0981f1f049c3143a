//! The Batch API at rest: file metadata (`batch_files`; the contents live on the gateway's
//! disk), batches and their state machine (`batches`), and one result row per batch line
//! (`batch_lines`, unique per `(batch_id, custom_id)`). A succeeded line's row is written by the
//! settle writer in the same transaction as its settlement ([`Ledger::settle_batch_line`]), so a
//! line is billed exactly once and has exactly one result, whatever crashes in between. Runners
//! claim a batch under a lease ([`Ledger::claim_batch`]; PostgreSQL: `FOR UPDATE SKIP LOCKED`),
//! so two replicas never run the same batch at once.

use std::collections::BTreeSet;

use tidepool_core::TenantId;

use crate::store::{on_store, to_i64, to_u64};
use crate::{Ledger, LedgerError};

/// Most rows one page of [`Ledger::list_batch_files`], [`Ledger::list_batches`] or
/// [`Ledger::batch_lines_page`] returns: OpenAI's largest list page, 10,000, plus the one row
/// that tells whether more follow.
pub const BATCH_PAGE_LEN_MAX: u32 = 10_001;
/// Longest file name, purpose, custom id or metadata text stored, in bytes.
pub const BATCH_TEXT_BYTES_MAX: usize = 65_536;

/// What [`Ledger::delete_batch_file`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileDeletion {
    Deleted,
    /// No such file of this tenant, or it was deleted already.
    NotFound,
    /// An unfinished batch reads it as its input; nothing changed.
    InUse {
        batch_id: String,
    },
}

/// Where a batch is in its life (OpenAI's statuses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchStatus {
    Validating,
    Failed,
    InProgress,
    Finalizing,
    Completed,
    Expired,
    Cancelling,
    Cancelled,
}

impl BatchStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Validating => "validating",
            Self::Failed => "failed",
            Self::InProgress => "in_progress",
            Self::Finalizing => "finalizing",
            Self::Completed => "completed",
            Self::Expired => "expired",
            Self::Cancelling => "cancelling",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// No transition leaves this status.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Failed | Self::Completed | Self::Expired | Self::Cancelled
        )
    }

    /// Every status, in life order.
    const ALL: [Self; 8] = [
        Self::Validating,
        Self::Failed,
        Self::InProgress,
        Self::Finalizing,
        Self::Completed,
        Self::Expired,
        Self::Cancelling,
        Self::Cancelled,
    ];

    /// The statuses a transition can still leave, as an SQL list: `('validating', …)`.
    fn unfinished_sql() -> String {
        let quoted: Vec<String> = Self::ALL
            .into_iter()
            .filter(|s| !s.is_terminal())
            .map(|s| format!("'{}'", s.as_str()))
            .collect();
        format!("({})", quoted.join(", "))
    }

    /// The column that stamps when a batch entered this status.
    fn at_column(self) -> &'static str {
        match self {
            Self::Validating => "created_at_ms",
            Self::Failed => "failed_at_ms",
            Self::InProgress => "in_progress_at_ms",
            Self::Finalizing => "finalizing_at_ms",
            Self::Completed => "completed_at_ms",
            Self::Expired => "expired_at_ms",
            Self::Cancelling => "cancelling_at_ms",
            Self::Cancelled => "cancelled_at_ms",
        }
    }
}

/// One uploaded (or produced) file's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchFile {
    /// `file-…`
    pub file_id: String,
    pub tenant: TenantId,
    pub key_id: String,
    /// `batch` (uploads), `batch_output` (outputs and error files).
    pub purpose: String,
    pub filename: String,
    pub bytes: u64,
    /// `processed` once the content is complete on disk.
    pub status: String,
    pub created_at_ms: i64,
}

/// One batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRecord {
    /// `batch_…`
    pub batch_id: String,
    pub tenant: TenantId,
    pub key_id: String,
    /// `/v1/chat/completions`, `/v1/completions` or `/v1/embeddings`.
    pub endpoint: String,
    /// The one model every line names (validation refuses mixed models).
    pub model: Option<String>,
    pub input_file_id: String,
    pub completion_window: String,
    /// The client's metadata object, as JSON text.
    pub metadata: Option<String>,
    pub status: BatchStatus,
    /// Validation errors, as the JSON text of OpenAI's `errors` object.
    pub errors: Option<String>,
    /// Lines in the input file (valid ones; 0 for a batch that failed validation).
    pub total: u64,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    pub in_progress_at_ms: Option<i64>,
    pub finalizing_at_ms: Option<i64>,
    pub completed_at_ms: Option<i64>,
    pub failed_at_ms: Option<i64>,
    pub expired_at_ms: Option<i64>,
    pub cancelling_at_ms: Option<i64>,
    pub cancelled_at_ms: Option<i64>,
}

/// One line's result, as the runner hands it to the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewBatchLine {
    pub batch_id: String,
    pub custom_id: String,
    /// 1-based line number in the input file.
    pub line: u64,
    /// `true`: the request answered 2xx and `body` is its response.
    pub succeeded: bool,
    /// The HTTP status the request answered with; `None` when it never ran
    /// (`batch_cancelled`, `batch_expired`).
    pub status_code: Option<u16>,
    /// The response body (success) or error body, as JSON text.
    pub body: Option<String>,
    /// The line-level error (`batch_cancelled`, `batch_expired`), when it never ran.
    pub error_code: Option<String>,
    pub error_message: Option<String>,
}

/// A stored line result, with what it was billed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchLineRecord {
    pub line: NewBatchLine,
    /// The request that ran it (`None`: never ran).
    pub request_id: Option<String>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_nanos: i64,
}

/// A batch's result counts and money so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BatchTotals {
    pub completed: u64,
    pub failed: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_nanos: i64,
}

type FileRow = (String, String, String, String, String, i64, String, i64);
const FILE_COLUMNS: &str =
    "file_id, tenant_id, key_id, purpose, filename, bytes, status, created_at_ms";

fn file_from_row(row: FileRow) -> Result<BatchFile, LedgerError> {
    let (file_id, tenant, key_id, purpose, filename, bytes, status, created_at_ms) = row;
    Ok(BatchFile {
        file_id,
        tenant: TenantId::new(tenant).map_err(|_| LedgerError::Corrupt { what: "tenant id" })?,
        key_id,
        purpose,
        filename,
        bytes: to_u64(bytes, "file bytes")?,
        status,
        created_at_ms,
    })
}

const BATCH_COLUMNS: &str = "batch_id, tenant_id, key_id, endpoint, model, input_file_id, \
     completion_window, metadata, status, errors, total, output_file_id, error_file_id, \
     created_at_ms, expires_at_ms, in_progress_at_ms, finalizing_at_ms, completed_at_ms, \
     failed_at_ms, expired_at_ms, cancelling_at_ms, cancelled_at_ms";

#[derive(sqlx::FromRow)]
struct BatchRow {
    batch_id: String,
    tenant_id: String,
    key_id: String,
    endpoint: String,
    model: Option<String>,
    input_file_id: String,
    completion_window: String,
    metadata: Option<String>,
    status: String,
    errors: Option<String>,
    total: i64,
    output_file_id: Option<String>,
    error_file_id: Option<String>,
    created_at_ms: i64,
    expires_at_ms: i64,
    in_progress_at_ms: Option<i64>,
    finalizing_at_ms: Option<i64>,
    completed_at_ms: Option<i64>,
    failed_at_ms: Option<i64>,
    expired_at_ms: Option<i64>,
    cancelling_at_ms: Option<i64>,
    cancelled_at_ms: Option<i64>,
}

impl TryFrom<BatchRow> for BatchRecord {
    type Error = LedgerError;

    fn try_from(row: BatchRow) -> Result<Self, LedgerError> {
        Ok(Self {
            batch_id: row.batch_id,
            tenant: TenantId::new(row.tenant_id)
                .map_err(|_| LedgerError::Corrupt { what: "tenant id" })?,
            key_id: row.key_id,
            endpoint: row.endpoint,
            model: row.model,
            input_file_id: row.input_file_id,
            completion_window: row.completion_window,
            metadata: row.metadata,
            status: BatchStatus::parse(&row.status).ok_or(LedgerError::Corrupt {
                what: "batch status",
            })?,
            errors: row.errors,
            total: to_u64(row.total, "batch total")?,
            output_file_id: row.output_file_id,
            error_file_id: row.error_file_id,
            created_at_ms: row.created_at_ms,
            expires_at_ms: row.expires_at_ms,
            in_progress_at_ms: row.in_progress_at_ms,
            finalizing_at_ms: row.finalizing_at_ms,
            completed_at_ms: row.completed_at_ms,
            failed_at_ms: row.failed_at_ms,
            expired_at_ms: row.expired_at_ms,
            cancelling_at_ms: row.cancelling_at_ms,
            cancelled_at_ms: row.cancelled_at_ms,
        })
    }
}

type LineRow = (
    String,
    String,
    i64,
    Option<String>,
    i64,
    Option<i64>,
    Option<String>,
    Option<String>,
    Option<String>,
    i64,
    i64,
    i64,
);

fn line_from_row(row: LineRow) -> Result<BatchLineRecord, LedgerError> {
    let (
        batch_id,
        custom_id,
        line,
        request_id,
        succeeded,
        status_code,
        body,
        error_code,
        error_message,
        prompt_tokens,
        completion_tokens,
        cost_nanos,
    ) = row;
    Ok(BatchLineRecord {
        line: NewBatchLine {
            batch_id,
            custom_id,
            line: to_u64(line, "batch line")?,
            succeeded: succeeded != 0,
            status_code: status_code
                .map(|code| {
                    u16::try_from(code).map_err(|_| LedgerError::Corrupt {
                        what: "status code",
                    })
                })
                .transpose()?,
            body,
            error_code,
            error_message,
        },
        request_id,
        prompt_tokens: to_u64(prompt_tokens, "batch line tokens")?,
        completion_tokens: to_u64(completion_tokens, "batch line tokens")?,
        cost_nanos,
    })
}

fn check_text(text: &str, field: &'static str) -> Result<(), LedgerError> {
    if text.len() > BATCH_TEXT_BYTES_MAX {
        return Err(LedgerError::OutOfRange { field });
    }
    Ok(())
}

pub(crate) fn validate_line(line: &NewBatchLine) -> Result<(), LedgerError> {
    check_text(&line.custom_id, "custom id")?;
    if line.line == 0 {
        return Err(LedgerError::OutOfRange {
            field: "batch line number",
        });
    }
    Ok(())
}

/// Inserts one line row with `$executor` (a pool or the settle writer's transaction) and
/// evaluates to `Ok(true)`, or `Ok(false)` when the line already has a row. A macro, so each
/// store's arm of `on_store!` compiles it with its own database types.
macro_rules! insert_line {
    ($executor:expr, $line:expr, $request_id:expr, $prompt:expr, $completion:expr, $cost:expr, $now_ms:expr) => {{
        let line: &$crate::batches::NewBatchLine = $line;
        match $crate::store::to_i64(line.line, "batch line") {
            Err(error) => Err(error),
            Ok(number) => sqlx::query(
                "INSERT INTO batch_lines (batch_id, custom_id, line, request_id, succeeded, \
                 status_code, body, error_code, error_message, prompt_tokens, completion_tokens, \
                 cost_nanos, created_at_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(line.batch_id.as_str())
            .bind(line.custom_id.as_str())
            .bind(number)
            .bind($request_id)
            .bind(i64::from(line.succeeded))
            .bind(line.status_code.map(i64::from))
            .bind(line.body.as_deref())
            .bind(line.error_code.as_deref())
            .bind(line.error_message.as_deref())
            .bind($prompt)
            .bind($completion)
            .bind($cost)
            .bind($now_ms)
            .execute($executor)
            .await
            .map(|done| done.rows_affected() == 1)
            .map_err($crate::LedgerError::from),
        }
    }};
}
pub(crate) use insert_line;

impl Ledger {
    /// Records an uploaded (or produced) file's metadata.
    pub async fn create_batch_file(&self, file: &BatchFile) -> Result<(), LedgerError> {
        check_text(&file.filename, "file name")?;
        check_text(&file.purpose, "file purpose")?;
        let bytes = to_i64(file.bytes, "file bytes")?;
        on_store!(&self.store, pool => {
            sqlx::query(
                "INSERT INTO batch_files (file_id, tenant_id, key_id, purpose, filename, bytes, \
                 status, created_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(&file.file_id)
            .bind(file.tenant.as_str())
            .bind(&file.key_id)
            .bind(&file.purpose)
            .bind(&file.filename)
            .bind(bytes)
            .bind(&file.status)
            .bind(file.created_at_ms)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// `tenant`'s file `file_id`, unless deleted; another tenant's is `None`.
    pub async fn batch_file(
        &self,
        tenant: &TenantId,
        file_id: &str,
    ) -> Result<Option<BatchFile>, LedgerError> {
        let sql = format!(
            "SELECT {FILE_COLUMNS} FROM batch_files WHERE tenant_id = $1 AND file_id = $2 \
             AND deleted_at_ms IS NULL"
        );
        let row: Option<FileRow> = on_store!(&self.store, pool => {
            sqlx::query_as(&sql).bind(tenant.as_str()).bind(file_id).fetch_optional(pool).await?
        });
        row.map(file_from_row).transpose()
    }

    /// `tenant`'s files, newest first (ids are time-ordered), of `purpose` if given, older than
    /// the file `after` if given; at most `limit` (≤ [`BATCH_PAGE_LEN_MAX`]).
    pub async fn list_batch_files(
        &self,
        tenant: &TenantId,
        purpose: Option<&str>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<BatchFile>, LedgerError> {
        let limit = i64::from(limit.min(BATCH_PAGE_LEN_MAX));
        let sql = format!(
            "SELECT {FILE_COLUMNS} FROM batch_files WHERE tenant_id = $1 AND deleted_at_ms IS NULL \
             AND ($2 IS NULL OR purpose = $2) AND ($3 IS NULL OR file_id < $3) \
             ORDER BY file_id DESC LIMIT $4"
        );
        let rows: Vec<FileRow> = on_store!(&self.store, pool => {
            sqlx::query_as(&sql)
                .bind(tenant.as_str())
                .bind(purpose)
                .bind(after)
                .bind(limit)
                .fetch_all(pool)
                .await?
        });
        rows.into_iter().map(file_from_row).collect()
    }

    /// Marks `tenant`'s file deleted, unless an unfinished batch (`validating`, `in_progress`,
    /// `finalizing` or `cancelling`) reads it as its input: its runner reads the content line by
    /// line until it finishes. The check and the update are one statement, so a batch that
    /// finishes meanwhile is seen either way.
    pub async fn delete_batch_file(
        &self,
        tenant: &TenantId,
        file_id: &str,
    ) -> Result<FileDeletion, LedgerError> {
        let now_ms = self.now_ms();
        let unfinished = BatchStatus::unfinished_sql();
        let delete = format!(
            "UPDATE batch_files SET deleted_at_ms = $3 WHERE tenant_id = $1 AND file_id = $2 \
             AND deleted_at_ms IS NULL AND NOT EXISTS (SELECT 1 FROM batches \
             WHERE batches.input_file_id = $2 AND batches.tenant_id = $1 \
             AND batches.status IN {unfinished})"
        );
        let changed = on_store!(&self.store, pool => {
            sqlx::query(&delete)
            .bind(tenant.as_str())
            .bind(file_id)
            .bind(now_ms)
            .execute(pool)
            .await?
            .rows_affected()
        });
        if changed == 1 {
            return Ok(FileDeletion::Deleted);
        }
        let reader = format!(
            "SELECT batches.batch_id FROM batches JOIN batch_files \
             ON batch_files.file_id = batches.input_file_id \
             AND batch_files.tenant_id = batches.tenant_id \
             WHERE batches.input_file_id = $2 AND batches.tenant_id = $1 \
             AND batch_files.deleted_at_ms IS NULL AND batches.status IN {unfinished} \
             ORDER BY batches.created_at_ms, batches.batch_id LIMIT 1"
        );
        let reader: Option<(String,)> = on_store!(&self.store, pool => {
            sqlx::query_as(&reader)
            .bind(tenant.as_str())
            .bind(file_id)
            .fetch_optional(pool)
            .await?
        });
        Ok(match reader {
            Some((batch_id,)) => FileDeletion::InUse { batch_id },
            None => FileDeletion::NotFound,
        })
    }

    /// Records a new batch (validated, so `in_progress`, or `failed` with its errors).
    pub async fn create_batch(&self, batch: &BatchRecord) -> Result<(), LedgerError> {
        if let Some(metadata) = &batch.metadata {
            check_text(metadata, "batch metadata")?;
        }
        let total = to_i64(batch.total, "batch total")?;
        on_store!(&self.store, pool => {
            sqlx::query(
                "INSERT INTO batches (batch_id, tenant_id, key_id, endpoint, model, input_file_id, \
                 completion_window, metadata, status, errors, total, created_at_ms, \
                 expires_at_ms, in_progress_at_ms, failed_at_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
            )
            .bind(&batch.batch_id)
            .bind(batch.tenant.as_str())
            .bind(&batch.key_id)
            .bind(&batch.endpoint)
            .bind(batch.model.as_deref())
            .bind(&batch.input_file_id)
            .bind(&batch.completion_window)
            .bind(batch.metadata.as_deref())
            .bind(batch.status.as_str())
            .bind(batch.errors.as_deref())
            .bind(total)
            .bind(batch.created_at_ms)
            .bind(batch.expires_at_ms)
            .bind(batch.in_progress_at_ms)
            .bind(batch.failed_at_ms)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// `tenant`'s batch `batch_id`; another tenant's is `None`.
    pub async fn batch(
        &self,
        tenant: &TenantId,
        batch_id: &str,
    ) -> Result<Option<BatchRecord>, LedgerError> {
        let sql =
            format!("SELECT {BATCH_COLUMNS} FROM batches WHERE tenant_id = $1 AND batch_id = $2");
        let row: Option<BatchRow> = on_store!(&self.store, pool => {
            sqlx::query_as(&sql).bind(tenant.as_str()).bind(batch_id).fetch_optional(pool).await?
        });
        row.map(BatchRecord::try_from).transpose()
    }

    /// Batch `batch_id`, whoever owns it (the runner).
    pub async fn batch_by_id(&self, batch_id: &str) -> Result<Option<BatchRecord>, LedgerError> {
        let sql = format!("SELECT {BATCH_COLUMNS} FROM batches WHERE batch_id = $1");
        let row: Option<BatchRow> = on_store!(&self.store, pool => {
            sqlx::query_as(&sql).bind(batch_id).fetch_optional(pool).await?
        });
        row.map(BatchRecord::try_from).transpose()
    }

    /// `tenant`'s batches, newest first, older than `after` if given; at most `limit`.
    pub async fn list_batches(
        &self,
        tenant: &TenantId,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<BatchRecord>, LedgerError> {
        let limit = i64::from(limit.min(BATCH_PAGE_LEN_MAX));
        let sql = format!(
            "SELECT {BATCH_COLUMNS} FROM batches WHERE tenant_id = $1 \
             AND ($2 IS NULL OR batch_id < $2) ORDER BY batch_id DESC LIMIT $3"
        );
        let rows: Vec<BatchRow> = on_store!(&self.store, pool => {
            sqlx::query_as(&sql).bind(tenant.as_str()).bind(after).bind(limit).fetch_all(pool).await?
        });
        rows.into_iter().map(BatchRecord::try_from).collect()
    }

    /// Claims one unfinished batch (`in_progress`, `finalizing` or `cancelling`) for `owner`
    /// until `lease_ms` from now: one whose lease expired or that `owner` holds already, oldest
    /// first. On PostgreSQL the candidate row is locked `FOR UPDATE SKIP LOCKED`, so concurrent
    /// replicas claim different batches; on SQLite the write lock serialises claims.
    pub async fn claim_batch(
        &self,
        owner: &str,
        lease_ms: i64,
    ) -> Result<Option<BatchRecord>, LedgerError> {
        let now_ms = self.now_ms();
        let until_ms = now_ms.saturating_add(lease_ms);
        let pick = "SELECT batch_id FROM batches \
             WHERE status IN ('in_progress', 'finalizing', 'cancelling') \
             AND (lease_until_ms IS NULL OR lease_until_ms < $2 OR lease_owner = $1) \
             ORDER BY created_at_ms, batch_id LIMIT 1";
        let lock = match &self.store {
            crate::store::Store::Sqlite(_) => "",
            crate::store::Store::Postgres(_) => " FOR UPDATE SKIP LOCKED",
        };
        let sql = format!(
            "UPDATE batches SET lease_owner = $1, lease_until_ms = $3 \
             WHERE batch_id = ({pick}{lock}) RETURNING batch_id"
        );
        let claimed: Option<(String,)> = on_store!(&self.store, pool => {
            sqlx::query_as(&sql).bind(owner).bind(now_ms).bind(until_ms).fetch_optional(pool).await?
        });
        match claimed {
            Some((batch_id,)) => self.batch_by_id(&batch_id).await,
            None => Ok(None),
        }
    }

    /// Extends `owner`'s lease on a batch; `false` when `owner` no longer holds it.
    pub async fn renew_batch_lease(
        &self,
        batch_id: &str,
        owner: &str,
        lease_ms: i64,
    ) -> Result<bool, LedgerError> {
        let until_ms = self.now_ms().saturating_add(lease_ms);
        let changed = on_store!(&self.store, pool => {
            sqlx::query(
                "UPDATE batches SET lease_until_ms = $3 WHERE batch_id = $1 AND lease_owner = $2",
            )
            .bind(batch_id)
            .bind(owner)
            .bind(until_ms)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(changed == 1)
    }

    /// Moves a batch from one of `from` to `to`, stamping `to`'s `*_at`; `false` when it was in
    /// none of `from`.
    pub async fn set_batch_status(
        &self,
        batch_id: &str,
        from: &[BatchStatus],
        to: BatchStatus,
    ) -> Result<bool, LedgerError> {
        let now_ms = self.now_ms();
        let from: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
        // At most eight statuses: placeholders $4.. for each.
        let placeholders: Vec<String> = (0..from.len())
            .map(|i| format!("${}", i.saturating_add(4)))
            .collect();
        let sql = format!(
            "UPDATE batches SET status = $2, {} = $3 WHERE batch_id = $1 AND status IN ({})",
            to.at_column(),
            placeholders.join(", ")
        );
        if from.is_empty() {
            return Ok(false);
        }
        let changed = on_store!(&self.store, pool => {
            let mut query = sqlx::query(&sql).bind(batch_id).bind(to.as_str()).bind(now_ms);
            for status in &from {
                query = query.bind(*status);
            }
            query.execute(pool).await?.rows_affected()
        });
        Ok(changed == 1)
    }

    /// Ends a batch: records its output and error files and moves it to `to` (`completed`,
    /// `cancelled` or `expired`) in one transaction, unless it is terminal already (`false`,
    /// nothing recorded).
    pub async fn end_batch(
        &self,
        batch_id: &str,
        to: BatchStatus,
        output: Option<&BatchFile>,
        errors: Option<&BatchFile>,
    ) -> Result<bool, LedgerError> {
        if !to.is_terminal() {
            return Err(LedgerError::Invariant {
                what: "a batch ends in a terminal status",
            });
        }
        let now_ms = self.now_ms();
        let _gate = self.gate.enter().await;
        on_store!(&self.store, pool => {
            let mut tx = pool.begin_with(self.store.begin_write_sql()).await?;
            let sql = format!(
                "UPDATE batches SET status = $2, {} = $3, output_file_id = $4, error_file_id = $5, \
                 lease_owner = NULL, lease_until_ms = NULL \
                 WHERE batch_id = $1 AND status IN ('in_progress', 'finalizing', 'cancelling')",
                to.at_column()
            );
            let changed = sqlx::query(&sql)
                .bind(batch_id)
                .bind(to.as_str())
                .bind(now_ms)
                .bind(output.map(|f| f.file_id.as_str()))
                .bind(errors.map(|f| f.file_id.as_str()))
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if changed != 1 {
                tx.rollback().await?;
                return Ok(false);
            }
            for file in [output, errors].into_iter().flatten() {
                sqlx::query(
                    "INSERT INTO batch_files (file_id, tenant_id, key_id, purpose, filename, \
                     bytes, status, created_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(&file.file_id)
                .bind(file.tenant.as_str())
                .bind(&file.key_id)
                .bind(&file.purpose)
                .bind(&file.filename)
                .bind(to_i64(file.bytes, "file bytes")?)
                .bind(&file.status)
                .bind(file.created_at_ms)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
        });
        Ok(true)
    }

    /// Records the result of a line that moved no money (refused before admission, voided,
    /// never ran, or billing is off), run as `request_id` if it ran; `false` when the line
    /// already has one (its first result stands).
    pub async fn record_batch_line(
        &self,
        line: &NewBatchLine,
        request_id: Option<&str>,
    ) -> Result<bool, LedgerError> {
        validate_line(line)?;
        let now_ms = self.now_ms();
        let inserted = on_store!(&self.store, pool => {
            insert_line!(pool, line, request_id, 0_i64, 0_i64, 0_i64, now_ms)?
        });
        Ok(inserted)
    }

    /// The custom ids of the lines of `batch_id` that have a result.
    pub async fn batch_done_custom_ids(
        &self,
        batch_id: &str,
    ) -> Result<BTreeSet<String>, LedgerError> {
        let rows: Vec<(String,)> = on_store!(&self.store, pool => {
            sqlx::query_as("SELECT custom_id FROM batch_lines WHERE batch_id = $1")
                .bind(batch_id)
                .fetch_all(pool)
                .await?
        });
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }

    /// Line results of `batch_id` after line number `after_line`, in line order; at most
    /// `limit` (≤ [`BATCH_PAGE_LEN_MAX`]).
    pub async fn batch_lines_page(
        &self,
        batch_id: &str,
        after_line: u64,
        limit: u32,
    ) -> Result<Vec<BatchLineRecord>, LedgerError> {
        let limit = i64::from(limit.min(BATCH_PAGE_LEN_MAX));
        let after = to_i64(after_line, "batch line")?;
        let rows: Vec<LineRow> = on_store!(&self.store, pool => {
            sqlx::query_as(
                "SELECT batch_id, custom_id, line, request_id, succeeded, status_code, body, \
                 error_code, error_message, prompt_tokens, completion_tokens, cost_nanos \
                 FROM batch_lines WHERE batch_id = $1 AND line > $2 ORDER BY line LIMIT $3",
            )
            .bind(batch_id)
            .bind(after)
            .bind(limit)
            .fetch_all(pool)
            .await?
        });
        rows.into_iter().map(line_from_row).collect()
    }

    /// Counts and money of `batch_id`'s line results so far.
    pub async fn batch_totals(&self, batch_id: &str) -> Result<BatchTotals, LedgerError> {
        let row: (i64, i64, i64, i64, i64) = on_store!(&self.store, pool => {
            sqlx::query_as(
                "SELECT CAST(COALESCE(SUM(succeeded), 0) AS BIGINT), \
                 CAST(COALESCE(SUM(1 - succeeded), 0) AS BIGINT), \
                 CAST(COALESCE(SUM(prompt_tokens), 0) AS BIGINT), \
                 CAST(COALESCE(SUM(completion_tokens), 0) AS BIGINT), \
                 CAST(COALESCE(SUM(cost_nanos), 0) AS BIGINT) \
                 FROM batch_lines WHERE batch_id = $1",
            )
            .bind(batch_id)
            .fetch_one(pool)
            .await?
        });
        Ok(BatchTotals {
            completed: to_u64(row.0, "batch count")?,
            failed: to_u64(row.1, "batch count")?,
            prompt_tokens: to_u64(row.2, "batch tokens")?,
            completion_tokens: to_u64(row.3, "batch tokens")?,
            cost_nanos: row.4,
        })
    }

    /// What the batch lines within `scope` (of `month`, if given) cost:
    /// `(requests, cost_nanos)` of the usage entries marked with a batch id — the batch part of
    /// [`Ledger::usage_summary`]'s totals.
    pub async fn batch_usage(
        &self,
        scope: &crate::UsageScope,
        month: Option<crate::Month>,
    ) -> Result<(u64, i64), LedgerError> {
        let row: (i64, i64) = on_store!(&self.store, pool => {
            let mut query = sqlx::QueryBuilder::new(
                "SELECT CAST(COUNT(*) AS BIGINT), CAST(COALESCE(SUM(cost_nanos), 0) AS BIGINT) \
                 FROM usage_entries WHERE batch_id IS NOT NULL AND tenant_id = ",
            );
            match scope {
                crate::UsageScope::Tenant(tenant) => {
                    query.push_bind(tenant.as_str().to_owned());
                }
                crate::UsageScope::Project { tenant, project } => {
                    query.push_bind(tenant.as_str().to_owned());
                    query.push(" AND project_id = ");
                    query.push_bind(project.as_str().to_owned());
                }
                crate::UsageScope::Key { tenant, key_id } => {
                    query.push_bind(tenant.as_str().to_owned());
                    query.push(" AND key_id = ");
                    query.push_bind(key_id.0.clone());
                }
            }
            if let Some(month) = month {
                query.push(" AND created_at_ms >= ");
                query.push_bind(month.start_ms());
                query.push(" AND created_at_ms < ");
                query.push_bind(month.end_ms());
            }
            query.build_query_as().fetch_one(pool).await?
        });
        Ok((to_u64(row.0, "batch count")?, row.1))
    }
}
