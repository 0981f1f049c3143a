//! What happens when the leaked-key detector (`crate::leak`) flags a key: the suspension is
//! stored in the ledger (every replica refuses the key from its next request), audited (actor
//! `system`, action `key.suspend`) and alerted (`key_suspended`).

use tidepool_ledger::{ApiKeyRecord, AuditActor};

use crate::alerts::AlertEvent;
use crate::state::AppState;

/// Suspends a key the leaked-key detector flagged: stored in the ledger (so every replica
/// refuses it), audited (actor `system`) and alerted (`key_suspended`). Only the first
/// suspension writes the audit entry and the alert; a failure is logged, and the request that
/// tripped the detector is refused either way.
pub(crate) async fn suspend_key(state: &AppState, record: &ApiKeyRecord, reason: &str) {
    if let Some(leak) = state.leak() {
        leak.lock().reset_interval(&record.key_id);
    }
    match state.ledger().suspend_key(&record.key_id, reason).await {
        Ok(true) => {
            tracing::warn!(api_key_id = %record.key_id, %reason, "key suspended by the leaked-key detector");
            let details = serde_json::json!({
                "reason": reason,
                "tenant": record.tenant.as_str(),
                "project": record.project.as_str(),
            });
            if let Err(error) = state
                .ledger()
                .append_audit(
                    &AuditActor::System,
                    "key.suspend",
                    &format!("key:{}", record.key_id),
                    &details,
                )
                .await
            {
                tracing::error!(%error, api_key_id = %record.key_id, "cannot audit a key suspension");
            }
            state.alerts().emit(AlertEvent::KeySuspended {
                key_id: record.key_id.clone(),
                tenant: record.tenant.clone(),
                project: record.project.to_string(),
                reason: reason.to_owned(),
            });
        }
        Ok(false) => {}
        Err(error) => {
            tracing::error!(%error, api_key_id = %record.key_id, "cannot store a key suspension");
        }
    }
}
