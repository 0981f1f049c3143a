//! What happens when the leaked-key detector (`crate::leak`) flags a key: the suspension is
//! stored in the ledger (every replica refuses the key from its next request), audited in the
//! same transaction (actor `system`, action `key.suspend`, with the request that tripped the
//! detector) and alerted (`key_suspended`).

use tidepool_core::RequestId;
use tidepool_ledger::{ApiKeyRecord, AuditContext};

use crate::alerts::AlertEvent;
use crate::state::AppState;

/// Suspends a key the leaked-key detector flagged while serving `request_id`: stored in the
/// ledger (so every replica refuses it), audited (actor `system`) and alerted (`key_suspended`). Only the first
/// suspension writes the audit entry and the alert; a failure is logged, and the request that
/// tripped the detector is refused either way.
pub(crate) async fn suspend_key(
    state: &AppState,
    record: &ApiKeyRecord,
    reason: &str,
    request_id: RequestId,
) {
    if let Some(leak) = state.leak() {
        leak.lock().reset_interval(&record.key_id);
    }
    let audit = AuditContext::SYSTEM.with_request_id(request_id);
    match state
        .ledger()
        .suspend_key(&record.key_id, reason, &audit)
        .await
    {
        Ok(true) => {
            tracing::warn!(api_key_id = %record.key_id, %reason, "key suspended by the leaked-key detector");
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
