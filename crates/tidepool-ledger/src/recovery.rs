//! Start-up recovery of reservations a crash left open.
//!
//! The rule: a reservation that is still open after its process died is resolved from durable
//! progress only. If the gateway checkpointed it (`Ledger::checkpoint`, written when the first
//! token is delivered and then every so often), it is **settled** for its prompt tokens plus the
//! completion tokens of the last checkpoint; otherwise it is **voided**. Either way its usage
//! entry gets status `error` with code `interrupted`. Tokens delivered after the last checkpoint
//! are not billed: recovery may under-bill, never over-bill, and never bills beyond the hold.
//!
//! Which reservations: `recover` (run by a replica at start-up, before it serves) resolves the
//! open reservations its own `replica_id` made before now — they belong to its previous life.
//! `recover_stale` resolves anyone's open reservation older than a bound longer than any request
//! may live, for replicas that never come back. Both go through the settle writer, so a late
//! settle from a live process and recovery cannot both bill: the first to commit wins.

use std::time::Duration;

use tidepool_core::{KeyId, ModelId, RequestId, TenantId};
use tokio::sync::oneshot;

use crate::store::{on_store, to_tokens};
use crate::writer::{Command, Finish};
use crate::{Ledger, LedgerError, UsageEntry, UsageStatus};

/// Reservations read per page during recovery.
pub const RECOVERY_PAGE_LEN_MAX: i64 = 512;
/// The usage status code of a request resolved by recovery.
pub const INTERRUPTED_CODE: &str = "interrupted";
/// The endpoint recorded for recovered requests (the original is not known after a crash).
pub const RECOVERED_ENDPOINT: &str = "recovered";

/// What a recovery pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Settled from a checkpoint.
    pub settled: u64,
    /// Voided: no durable progress.
    pub voided: u64,
    /// Resolved by someone else between the read and the write.
    pub already_resolved: u64,
}

type OpenRow = (String, String, String, String, i64, i64, Option<i64>, i64);

fn corrupt(what: &'static str) -> LedgerError {
    LedgerError::Corrupt { what }
}

impl Ledger {
    /// Resolves the open reservations this replica (`LedgerOptions::replica_id`) left behind.
    /// Call once at start-up, before serving.
    pub async fn recover(&self) -> Result<RecoveryReport, LedgerError> {
        let replica = self.replica_id.to_string();
        self.recover_where(Some(replica), self.now_ms()).await
    }

    /// Resolves every replica's open reservations older than `stale_after` (which must exceed
    /// the longest a request may run).
    pub async fn recover_stale(
        &self,
        stale_after: Duration,
    ) -> Result<RecoveryReport, LedgerError> {
        let stale_ms =
            i64::try_from(stale_after.as_millis()).map_err(|_| LedgerError::OutOfRange {
                field: "stale_after",
            })?;
        self.recover_where(None, self.now_ms().saturating_sub(stale_ms))
            .await
    }

    async fn recover_where(
        &self,
        replica: Option<String>,
        created_before_ms: i64,
    ) -> Result<RecoveryReport, LedgerError> {
        let now_ms = self.now_ms();
        let mut report = RecoveryReport::default();
        let mut cursor = String::new();
        loop {
            let rows: Vec<OpenRow> = on_store!(&self.store, pool => {
                sqlx::query_as(
                    "SELECT request_id, tenant_id, key_id, model, prompt_tokens_max, \
                     progress_completion_tokens, progress_at_ms, created_at_ms FROM reservations \
                     WHERE state = 'open' AND created_at_ms < $1 AND ($2 IS NULL OR replica_id = $2) \
                     AND request_id > $3 ORDER BY request_id LIMIT $4",
                )
                .bind(created_before_ms)
                .bind(replica.as_deref())
                .bind(&cursor)
                .bind(RECOVERY_PAGE_LEN_MAX)
                .fetch_all(pool)
                .await?
            });
            let Some(last) = rows.last() else {
                return Ok(report);
            };
            cursor.clone_from(&last.0);
            let mut pending = Vec::with_capacity(rows.len());
            for row in rows {
                let (entry, finish) = recovery_entry(row, now_ms)?;
                let (reply, answer) = oneshot::channel();
                self.writer
                    .send(Command::Finish {
                        entry,
                        finish,
                        line: None,
                        reply,
                    })
                    .await
                    .map_err(|_| LedgerError::WriterFailed)?;
                pending.push(answer);
            }
            for answer in pending {
                let settlement = answer.await.map_err(|_| LedgerError::WriterFailed)??;
                let counter = match (settlement.first, settlement.state) {
                    (false, _) => &mut report.already_resolved,
                    (true, crate::ReservationState::Voided) => &mut report.voided,
                    (true, _) => &mut report.settled,
                };
                *counter = counter.saturating_add(1);
            }
        }
    }
}

fn recovery_entry(row: OpenRow, now_ms: i64) -> Result<(UsageEntry, Finish), LedgerError> {
    let (request_id, tenant, key_id, model, prompt_max, progress, progress_at_ms, created_at_ms) =
        row;
    let checkpointed = progress_at_ms.is_some();
    let latency_ms = u64::try_from(now_ms.saturating_sub(created_at_ms)).unwrap_or(0);
    let entry = UsageEntry {
        request_id: RequestId::parse(&request_id).map_err(|_| corrupt("request id"))?,
        tenant: TenantId::new(tenant).map_err(|_| corrupt("tenant id"))?,
        key_id: KeyId(key_id),
        model: Some(ModelId::new(model).map_err(|_| corrupt("model id"))?),
        endpoint: RECOVERED_ENDPOINT.to_owned(),
        prompt_tokens: if checkpointed {
            to_tokens(prompt_max, "prompt tokens")?
        } else {
            0
        },
        completion_tokens: if checkpointed {
            to_tokens(progress, "progress tokens")?
        } else {
            0
        },
        cached_prompt_tokens: 0,
        cached_prompt_tokens_unknown: false,
        status: UsageStatus::Error {
            code: INTERRUPTED_CODE.to_owned(),
        },
        latency_ms,
        created_at_ms,
    };
    Ok((
        entry,
        if checkpointed {
            Finish::Settle
        } else {
            Finish::Void
        },
    ))
}
