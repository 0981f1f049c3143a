//! The durable outbox of webhook alerts: one row per event and receiver. The gateway writes rows
//! off the request path ([`Ledger::enqueue_alerts`]) and a delivery task on every replica claims
//! due rows ([`Ledger::claim_alerts`]), sends them, and marks each delivered, rescheduled or
//! failed. A claim is a lease (`claimed_by`, `claimed_until_ms`): PostgreSQL claims with `FOR
//! UPDATE SKIP LOCKED`, SQLite under its write lock, so two replicas never hold the same row at
//! once and a row is sent again only if its lease ran out (the replica died or hung mid-send):
//! at-least-once, and exactly once while replicas stay alive within their lease.

use crate::store::{on_store, retry_transient, to_i64, to_u64};
use crate::{Ledger, LedgerError};

/// Most rows one claim returns.
pub const ALERT_CLAIM_LEN_MAX: u32 = 64;
/// Longest payload, in bytes.
pub const ALERT_PAYLOAD_BYTES_MAX: usize = 16 * 1024;
/// Longest stored delivery error, in bytes (longer ones are cut at a character boundary).
pub const ALERT_ERROR_BYTES_MAX: usize = 256;

/// One alert to store: for receiver `sink_id`, the exact `payload` to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAlert {
    pub sink_id: String,
    pub event: String,
    pub payload: String,
    /// Alerts with the same `(sink_id, dedup_key)` are stored once, ever (`None`: never
    /// deduplicated).
    pub dedup_key: Option<String>,
}

/// A claimed row, to deliver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedAlert {
    pub id: i64,
    pub sink_id: String,
    pub event: String,
    pub payload: String,
    /// Attempts before this one.
    pub attempts: u32,
}

/// Counts of the outbox's rows, by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxCounts {
    pub pending: u64,
    pub delivered: u64,
    pub failed: u64,
}

type ClaimRow = (i64, String, String, String, i64);

impl Ledger {
    /// Stores alerts (all or none); a deduplicated alert already stored is skipped. Returns how
    /// many rows were written.
    pub async fn enqueue_alerts(&self, alerts: &[NewAlert]) -> Result<u64, LedgerError> {
        if alerts
            .iter()
            .any(|a| a.payload.len() > ALERT_PAYLOAD_BYTES_MAX)
        {
            return Err(LedgerError::OutOfRange {
                field: "alert payload",
            });
        }
        let now_ms = self.now_ms();
        retry_transient("alert enqueue", || async move {
            on_store!(&self.store, pool => {
                let mut tx = pool.begin().await?;
                let mut written: u64 = 0;
                for alert in alerts {
                    let done = sqlx::query(
                        "INSERT INTO alert_outbox (sink_id, event, payload, dedup_key, \
                         created_at_ms, next_attempt_at_ms) VALUES ($1, $2, $3, $4, $5, $5) \
                         ON CONFLICT (sink_id, dedup_key) DO NOTHING",
                    )
                    .bind(&alert.sink_id)
                    .bind(&alert.event)
                    .bind(&alert.payload)
                    .bind(alert.dedup_key.as_deref())
                    .bind(now_ms)
                    .execute(&mut *tx)
                    .await?;
                    written = written.saturating_add(done.rows_affected());
                }
                tx.commit().await?;
                Ok::<u64, LedgerError>(written)
            })
        })
        .await
    }

    /// Claims up to `len_max` (at most [`ALERT_CLAIM_LEN_MAX`]) due rows for `lease_ms`: rows
    /// neither delivered nor failed, whose next attempt is due and that no live lease holds.
    /// Oldest first.
    pub async fn claim_alerts(
        &self,
        len_max: u32,
        lease_ms: u64,
    ) -> Result<Vec<ClaimedAlert>, LedgerError> {
        if len_max == 0 || len_max > ALERT_CLAIM_LEN_MAX {
            return Err(LedgerError::OutOfRange {
                field: "alert claim length",
            });
        }
        let now_ms = self.now_ms();
        let until_ms = now_ms.saturating_add(to_i64(lease_ms, "alert lease")?);
        // The subquery picks the rows; on PostgreSQL `SKIP LOCKED` passes over rows another
        // replica is claiming right now, on SQLite the write lock makes the claim atomic.
        let sql = match self.store {
            crate::store::Store::Sqlite(_) => {
                "UPDATE alert_outbox SET claimed_by = $1, claimed_until_ms = $2 \
                 WHERE id IN (SELECT id FROM alert_outbox \
                   WHERE delivered_at_ms IS NULL AND failed_at_ms IS NULL \
                   AND next_attempt_at_ms <= $3 \
                   AND (claimed_until_ms IS NULL OR claimed_until_ms < $3) \
                   ORDER BY id LIMIT $4) \
                 RETURNING id, sink_id, event, payload, attempts"
            }
            crate::store::Store::Postgres(_) => {
                "UPDATE alert_outbox SET claimed_by = $1, claimed_until_ms = $2 \
                 WHERE id IN (SELECT id FROM alert_outbox \
                   WHERE delivered_at_ms IS NULL AND failed_at_ms IS NULL \
                   AND next_attempt_at_ms <= $3 \
                   AND (claimed_until_ms IS NULL OR claimed_until_ms < $3) \
                   ORDER BY id LIMIT $4 FOR UPDATE SKIP LOCKED) \
                 RETURNING id, sink_id, event, payload, attempts"
            }
        };
        let _gate = self.gate.enter().await;
        let mut rows: Vec<ClaimRow> = on_store!(&self.store, pool => {
            let mut tx = pool.begin_with(self.store.begin_write_sql()).await?;
            let rows: Vec<ClaimRow> = sqlx::query_as(sql)
                .bind(&*self.replica_id)
                .bind(until_ms)
                .bind(now_ms)
                .bind(i64::from(len_max))
                .fetch_all(&mut *tx)
                .await?;
            tx.commit().await?;
            rows
        });
        rows.sort_by_key(|row| row.0);
        rows.into_iter()
            .map(|(id, sink_id, event, payload, attempts)| {
                Ok(ClaimedAlert {
                    id,
                    sink_id,
                    event,
                    payload,
                    attempts: u32::try_from(to_u64(attempts, "alert attempts")?)
                        .unwrap_or(u32::MAX),
                })
            })
            .collect()
    }

    /// Marks a row this replica claimed as delivered; `false` if the claim was lost (its lease
    /// ran out and another replica took the row).
    pub async fn mark_alert_delivered(&self, id: i64) -> Result<bool, LedgerError> {
        let now_ms = self.now_ms();
        let done = on_store!(&self.store, pool => {
            sqlx::query(
                "UPDATE alert_outbox SET delivered_at_ms = $3, attempts = attempts + 1, \
                 claimed_by = NULL, claimed_until_ms = NULL, last_error = NULL \
                 WHERE id = $1 AND claimed_by = $2 AND delivered_at_ms IS NULL",
            )
            .bind(id)
            .bind(&*self.replica_id)
            .bind(now_ms)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(done == 1)
    }

    /// Records a failed attempt of a row this replica claimed: retried after `retry_in_ms`, or,
    /// with `None`, given up (failed for good).
    pub async fn mark_alert_failed(
        &self,
        id: i64,
        error: &str,
        retry_in_ms: Option<u64>,
    ) -> Result<bool, LedgerError> {
        let now_ms = self.now_ms();
        let mut cut = error.len().min(ALERT_ERROR_BYTES_MAX);
        while !error.is_char_boundary(cut) {
            cut = cut.saturating_sub(1);
        }
        let error = error.get(..cut).unwrap_or_default();
        let (next_ms, failed_ms) = match retry_in_ms {
            Some(delay) => (
                now_ms.saturating_add(to_i64(delay, "alert retry delay")?),
                None,
            ),
            None => (now_ms, Some(now_ms)),
        };
        let done = on_store!(&self.store, pool => {
            sqlx::query(
                "UPDATE alert_outbox SET attempts = attempts + 1, next_attempt_at_ms = $3, \
                 failed_at_ms = $4, last_error = $5, claimed_by = NULL, claimed_until_ms = NULL \
                 WHERE id = $1 AND claimed_by = $2 AND delivered_at_ms IS NULL",
            )
            .bind(id)
            .bind(&*self.replica_id)
            .bind(next_ms)
            .bind(failed_ms)
            .bind(error)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(done == 1)
    }

    /// How many rows are pending, delivered and failed.
    pub async fn outbox_counts(&self) -> Result<OutboxCounts, LedgerError> {
        let (pending, delivered, failed): (i64, i64, i64) = on_store!(&self.store, pool => {
            sqlx::query_as(
                "SELECT \
                   COALESCE(SUM(CASE WHEN delivered_at_ms IS NULL AND failed_at_ms IS NULL THEN 1 ELSE 0 END), 0), \
                   COALESCE(SUM(CASE WHEN delivered_at_ms IS NOT NULL THEN 1 ELSE 0 END), 0), \
                   COALESCE(SUM(CASE WHEN failed_at_ms IS NOT NULL THEN 1 ELSE 0 END), 0) \
                 FROM alert_outbox",
            )
            .fetch_one(pool)
            .await?
        });
        Ok(OutboxCounts {
            pending: to_u64(pending, "outbox count")?,
            delivered: to_u64(delivered, "outbox count")?,
            failed: to_u64(failed, "outbox count")?,
        })
    }
}
