//! Listing a tenant's budgets: every project and key budget of one tenant with this month's use,
//! in one query (the console's billing page).

use tidepool_core::{KeyId, Nanos, TenantId};

use crate::accounts::ProjectId;
use crate::store::on_store;
use crate::{BudgetScope, BudgetStatus, Ledger, LedgerError, Month};

/// A budget row: scope, scope id, limit, this month's reserved and spent (when any).
type BudgetRow = (String, String, i64, Option<i64>, Option<i64>);

/// Most budgets [`Ledger::tenant_budgets`] returns.
pub const TENANT_BUDGETS_LEN_MAX: i64 = 10_000;

impl Ledger {
    /// Every budget set on `tenant`'s projects and keys, with this month's reserved and spent
    /// amounts (month by the ledger's clock), projects first, then keys, each by id.
    pub async fn tenant_budgets(
        &self,
        tenant: &TenantId,
    ) -> Result<Vec<(BudgetScope, BudgetStatus)>, LedgerError> {
        let month = Month::of_ms(self.now_ms());
        let rows: Vec<BudgetRow> = on_store!(&self.store, pool => {
            sqlx::query_as(
                "SELECT b.scope, b.scope_id, b.limit_nanos, s.reserved_nanos, s.spent_nanos \
                 FROM budgets b LEFT JOIN budget_spend s \
                   ON s.scope = b.scope AND s.scope_id = b.scope_id AND s.month = $2 \
                 WHERE (b.scope = 'project' AND substr(b.scope_id, 1, length($1) + 1) = $1 || '/') \
                    OR (b.scope = 'key' AND b.scope_id IN \
                        (SELECT key_id FROM api_keys WHERE tenant_id = $1)) \
                 ORDER BY b.scope DESC, b.scope_id LIMIT $3",
            )
            .bind(tenant.as_str())
            .bind(month.to_string())
            .bind(TENANT_BUDGETS_LEN_MAX)
            .fetch_all(pool)
            .await?
        });
        rows.into_iter()
            .map(|(kind, id, limit, reserved, spent)| {
                let scope = match kind.as_str() {
                    "project" => {
                        let project = id.split_once('/').map(|(_, project)| project).ok_or(
                            LedgerError::Corrupt {
                                what: "budget scope",
                            },
                        )?;
                        BudgetScope::Project {
                            tenant: tenant.clone(),
                            project: ProjectId::new(project)
                                .map_err(|_| LedgerError::Corrupt { what: "project id" })?,
                        }
                    }
                    _ => BudgetScope::Key { key_id: KeyId(id) },
                };
                let status = BudgetStatus {
                    limit: Some(Nanos(limit)),
                    month,
                    reserved: Nanos(reserved.unwrap_or(0)),
                    spent: Nanos(spent.unwrap_or(0)),
                };
                Ok((scope, status))
            })
            .collect()
    }
}
