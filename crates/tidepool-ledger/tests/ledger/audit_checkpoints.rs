// The audit log written in the same transaction as each change, and its signed checkpoints, on
// both stores: every audited change appends one entry (who, what, before/after, request id) and a
// failed change appends none, while a failed append undoes the change; each kind of tampering —
// an edited, deleted, inserted or moved entry, a truncated tail, a forged checkpoint, a chain
// rewritten from some entry on with recomputed hashes — is reported at the first entry it
// affects; a truncated tail whose checkpoints were deleted too is caught only against a copy kept
// elsewhere; 100 changes from two replicas at once leave one gapless, verifying chain; entries
// written before request ids were recorded still verify.
#![expect(clippy::too_many_lines, reason = "each scenario reads top to bottom")]

use std::sync::Arc;

use crate::both_stores;
use crate::common::{self, TestDb};
use serde_json::{Value, json};
use sqlx::Connection;
use tidepool_core::{Currency, KeyId, ModelId, Nanos, TenantId};
use tidepool_ledger::{
    AUDIT_GENESIS_HASH, AuditActor, AuditAnchor, AuditCheckpointing, AuditContext, AuditEntry,
    AuditKey, AuditVerdict, BudgetScope, Clock as _, Ledger, LedgerError, LedgerOptions,
    PriceVersion, ProjectId, RateLimits, RateScope, chain_hash,
};

/// Entries between two checkpoints in these tests.
const EVERY: u32 = 5;

fn key(byte: u8) -> AuditKey {
    AuditKey::new(vec![byte; 32]).unwrap()
}

/// A handle that signs checkpoints with `key(1)` every [`EVERY`] entries (its background task
/// never fires within a test).
async fn signed(db: &TestDb, replica_id: &str) -> Ledger {
    with_key(db, replica_id, Some(key(1))).await
}

async fn with_key(db: &TestDb, replica_id: &str, key: Option<AuditKey>) -> Ledger {
    Ledger::connect_with(
        &db.url,
        LedgerOptions {
            replica_id: replica_id.to_owned(),
            clock: db.clock.clone(),
            audit_checkpoints: key.map(|key| AuditCheckpointing {
                key,
                every_entries: EVERY,
                interval_ms: 3_600_000,
            }),
            ..LedgerOptions::default()
        },
    )
    .await
    .unwrap()
}

async fn execute(db: &TestDb, sql: &str) {
    match db.kind {
        common::Kind::Sqlite => {
            let mut c = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
            sqlx::query(sql).execute(&mut c).await.unwrap();
        }
        common::Kind::Postgres => {
            let mut c = sqlx::PgConnection::connect(&db.url).await.unwrap();
            sqlx::query(sql).execute(&mut c).await.unwrap();
        }
    }
}

fn request(n: u32) -> AuditContext {
    AuditContext::ADMIN.with_request_id(format!("0190a000-0000-7000-8000-{n:012}"))
}

fn acme() -> TenantId {
    TenantId::new("acme").unwrap()
}

async fn all_entries(ledger: &Ledger) -> Vec<AuditEntry> {
    ledger.list_audit(0, 1000).await.unwrap()
}

async fn verify(ledger: &Ledger) -> AuditVerdict {
    ledger.verify_audit_chain(None).await.unwrap()
}

fn broken_at(verdict: &AuditVerdict) -> i64 {
    verdict
        .first_broken
        .as_ref()
        .unwrap_or_else(|| panic!("tampering is detected: {verdict:?}"))
        .seq
}

fn details(entry: &AuditEntry) -> Value {
    serde_json::from_str(&entry.details).unwrap()
}

/// Twelve audited changes of every kind (checkpoints at 5 and 10), each checked as it lands.
async fn twelve_changes(ledger: &Ledger, db: &TestDb) -> Vec<AuditEntry> {
    let acme = acme();
    ledger
        .create_tenant(&acme, Currency::USD, &request(1))
        .await
        .unwrap();
    let web = ProjectId::new("web").unwrap();
    ledger
        .create_project(&acme, &web, &request(2))
        .await
        .unwrap();
    let created = ledger
        .create_key_in_project(&acme, &web, "laptop", &request(3))
        .await
        .unwrap();
    let key_id = created.record.key_id;
    ledger
        .credit(&acme, Nanos(5_000_000_000), "prepaid", &request(4))
        .await
        .unwrap();
    let scope = BudgetScope::Key {
        key_id: key_id.clone(),
    };
    ledger
        .set_budget(&scope, Some(Nanos(1_000)), &request(5))
        .await
        .unwrap();
    ledger
        .set_budget(&scope, Some(Nanos(2_000)), &request(6))
        .await
        .unwrap();
    let rate_scope = RateScope::Key {
        key_id: key_id.clone(),
    };
    let limits = RateLimits {
        requests_per_minute: Some(60),
        tokens_per_minute: None,
    };
    ledger
        .set_rate_limits(&rate_scope, limits, &request(7))
        .await
        .unwrap();
    let model = ModelId::new("m").unwrap();
    let price = PriceVersion {
        model: model.clone(),
        effective_from_ms: 0,
        currency: Currency::USD,
        input_per_mtok: Nanos(1),
        output_per_mtok: Nanos(2),
        cached_input_per_mtok: Nanos(1),
    };
    ledger.set_price(&price, &request(8)).await.unwrap();
    db.clock.advance(1_000);
    let cheaper = PriceVersion {
        output_per_mtok: Nanos(1),
        ..price
    };
    assert!(ledger.sync_price(&cheaper, &request(9)).await.unwrap());
    assert!(
        ledger
            .suspend_key(&key_id, "spike", &AuditContext::SYSTEM)
            .await
            .unwrap()
    );
    assert!(ledger.reinstate_key(&key_id, &request(11)).await.unwrap());
    ledger.revoke_key(&key_id, &request(12)).await.unwrap();

    let entries = all_entries(ledger).await;
    let actions: Vec<&str> = entries.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "tenant.create",
            "project.create",
            "key.create",
            "tenant.credit",
            "budget.set",
            "budget.set",
            "rate_limits.set",
            "price.set",
            "price.sync",
            "key.suspend",
            "key.reinstate",
            "key.revoke"
        ]
    );
    entries
}

async fn changes_are_audited_in_their_own_transaction(db: Arc<TestDb>) {
    let ledger = signed(&db, "a").await;
    let entries = twelve_changes(&ledger, &db).await;
    for (index, entry) in entries.iter().enumerate() {
        assert_eq!(entry.seq, i64::try_from(index).unwrap() + 1);
        assert_eq!(entry.format, 2, "new entries cover the request id");
    }
    assert_eq!(entries[0].target, "tenant:acme");
    assert_eq!(entries[0].request_id, request(1).request_id);
    assert_eq!(entries[1].target, "project:acme/web");
    let key_id = entries[2].target.strip_prefix("key:").unwrap().to_owned();
    assert_eq!(details(&entries[2])["project"], "web");
    let credit = details(&entries[3]);
    assert_eq!(credit["before"]["balance_nanos"], 0);
    assert_eq!(credit["after"]["balance_nanos"], 5_000_000_000_i64);
    let budget = details(&entries[5]);
    assert_eq!(budget["before"]["limit_nanos"], 1_000);
    assert_eq!(budget["after"]["limit_nanos"], 2_000);
    assert_eq!(entries[5].target, format!("key:{key_id}"));
    let limits = details(&entries[6]);
    assert_eq!(limits["before"]["requests_per_minute"], Value::Null);
    assert_eq!(limits["after"]["requests_per_minute"], 60);
    let sync = details(&entries[8]);
    assert_eq!(sync["before"]["output_per_mtok_nanos"], 2);
    assert_eq!(sync["after"]["output_per_mtok_nanos"], 1);
    assert_eq!(entries[8].target, "model:m");
    assert_eq!(entries[9].actor, AuditActor::System);
    assert_eq!(entries[9].request_id, None);
    assert_eq!(details(&entries[9])["after"]["suspended_reason"], "spike");
    assert_eq!(
        details(&entries[11])["before"]["revoked_at_ms"],
        Value::Null
    );
    assert!(details(&entries[11])["after"]["revoked_at_ms"].is_i64());

    let verdict = verify(&ledger).await;
    assert!(verdict.is_ok(), "{verdict:?}");
    assert_eq!((verdict.entries, verdict.checkpoints), (12, 2));
    assert!(verdict.signatures_checked);
    let latest = verdict.latest_checkpoint.unwrap();
    assert_eq!(
        (latest.seq, latest.hash.as_str()),
        (10, entries[9].hash.as_str())
    );
    assert_eq!(verdict.last.unwrap().hash, entries[11].hash);

    // The interval's checkpoint: the head, once, until a new entry exists.
    let checkpoint = ledger.checkpoint_audit().await.unwrap().unwrap();
    assert_eq!(
        (checkpoint.seq, checkpoint.hash),
        (12, entries[11].hash.clone())
    );
    assert_eq!(ledger.checkpoint_audit().await.unwrap(), None);
    let unsigned = with_key(&db, "b", None).await;
    assert_eq!(unsigned.checkpoint_audit().await.unwrap(), None, "no key");
    let verdict = verify(&unsigned).await;
    assert!(verdict.is_ok(), "{verdict:?}");
    assert_eq!(verdict.checkpoints, 3);
    assert!(!verdict.signatures_checked);
    assert_eq!(ledger.list_audit_checkpoints(0, 10).await.unwrap().len(), 3);
}
both_stores!(
    changes_are_audited_in_their_own_transaction_on,
    changes_are_audited_in_their_own_transaction
);

async fn a_failed_change_appends_nothing_and_a_failed_append_undoes_the_change(db: Arc<TestDb>) {
    let ledger = signed(&db, "a").await;
    let acme = acme();
    let audit = &request(1);
    ledger
        .create_tenant(&acme, Currency::USD, audit)
        .await
        .unwrap();
    let created = ledger.create_key(&acme, "k", audit).await.unwrap();
    ledger
        .set_budget(
            &BudgetScope::Key {
                key_id: created.record.key_id.clone(),
            },
            Some(Nanos(7)),
            audit,
        )
        .await
        .unwrap();
    let head = all_entries(&ledger).await.len();
    assert_eq!(head, 3);

    // Failed changes.
    let globex = TenantId::new("globex").unwrap();
    assert!(matches!(
        ledger.credit(&globex, Nanos(1), "x", audit).await,
        Err(LedgerError::TenantNotFound { .. })
    ));
    assert!(matches!(
        ledger
            .create_tenant(&acme, Currency::parse("EUR").unwrap(), audit)
            .await,
        Err(LedgerError::TenantCurrencyConflict { .. })
    ));
    assert!(matches!(
        ledger
            .create_project(&globex, &ProjectId::new("p").unwrap(), audit)
            .await,
        Err(LedgerError::TenantNotFound { .. })
    ));
    assert!(matches!(
        ledger
            .revoke_key(&KeyId("nosuchkey000".into()), audit)
            .await,
        Err(LedgerError::KeyNotFound { .. })
    ));
    let too_long = AuditContext::ADMIN.with_request_id("r".repeat(200));
    assert!(matches!(
        ledger.credit(&acme, Nanos(1), "x", &too_long).await,
        Err(LedgerError::OutOfRange { .. })
    ));
    // Changes that change nothing.
    ledger
        .create_tenant(&acme, Currency::USD, audit)
        .await
        .unwrap();
    ledger
        .set_budget(
            &BudgetScope::Key {
                key_id: created.record.key_id.clone(),
            },
            Some(Nanos(7)),
            audit,
        )
        .await
        .unwrap();
    assert!(
        !ledger
            .reinstate_key(&created.record.key_id, audit)
            .await
            .unwrap()
    );
    assert_eq!(all_entries(&ledger).await.len(), head, "nothing appended");
    assert_eq!(ledger.account(&acme).await.unwrap().balance, Nanos::ZERO);

    // An append that fails (its sequence number taken behind the head's back) undoes the credit
    // and the revocation that came with it.
    execute(
        &db,
        "INSERT INTO audit_log (seq, at_ms, actor, action, target, details, prev_hash, hash) \
         VALUES (4, 0, 'admin', 'x', 'x', '{}', 'x', 'x')",
    )
    .await;
    assert!(matches!(
        ledger.credit(&acme, Nanos(5), "blocked", audit).await,
        Err(LedgerError::Database(_))
    ));
    assert!(matches!(
        ledger.revoke_key(&created.record.key_id, audit).await,
        Err(LedgerError::Database(_))
    ));
    assert_eq!(ledger.account(&acme).await.unwrap().balance, Nanos::ZERO);
    let month = tidepool_ledger::Month::of_ms(db.clock.now_ms());
    let statement = ledger.statement(&acme, month).await.unwrap();
    assert!(statement.lines.is_empty(), "no credit line: {statement:?}");
    let key = ledger.key(&created.record.key_id).await.unwrap();
    assert_eq!(key.revoked_at_ms, None, "the revocation was rolled back");
    execute(&db, "DELETE FROM audit_log WHERE seq = 4").await;
    ledger.credit(&acme, Nanos(5), "ok", audit).await.unwrap();
    assert_eq!(ledger.account(&acme).await.unwrap().balance, Nanos(5));
    assert!(verify(&ledger).await.is_ok());
}
both_stores!(
    a_failed_change_appends_nothing_and_a_failed_append_undoes_the_change_on,
    a_failed_change_appends_nothing_and_a_failed_append_undoes_the_change
);

async fn an_edited_entry_is_detected(db: Arc<TestDb>) {
    let ledger = signed(&db, "a").await;
    let entries = twelve_changes(&ledger, &db).await;
    execute(
        &db,
        "UPDATE audit_log SET details = '{\"amount_nanos\":1}' WHERE seq = 7",
    )
    .await;
    assert_eq!(broken_at(&verify(&ledger).await), 7);
    let restore = format!(
        "UPDATE audit_log SET details = '{}' WHERE seq = 7",
        entries[6].details
    );
    execute(&db, &restore).await;
    assert!(verify(&ledger).await.is_ok(), "restored");
    // The request id, the actor and the time are covered too.
    execute(
        &db,
        "UPDATE audit_log SET request_id = 'other' WHERE seq = 3",
    )
    .await;
    assert_eq!(broken_at(&verify(&ledger).await), 3);
    execute(&db, "UPDATE audit_log SET actor = 'admin' WHERE seq = 10").await;
    execute(&db, "UPDATE audit_log SET request_id = NULL WHERE seq = 3").await;
    assert_eq!(
        broken_at(&verify(&ledger).await),
        3,
        "NULL is not the old id either"
    );
    let restore = format!(
        "UPDATE audit_log SET request_id = '{}' WHERE seq = 3",
        entries[2].request_id.as_deref().unwrap()
    );
    execute(&db, &restore).await;
    assert_eq!(broken_at(&verify(&ledger).await), 10, "the actor");
}
both_stores!(an_edited_entry_is_detected_on, an_edited_entry_is_detected);

async fn a_deleted_entry_is_detected(db: Arc<TestDb>) {
    let ledger = signed(&db, "a").await;
    twelve_changes(&ledger, &db).await;
    execute(&db, "DELETE FROM audit_log WHERE seq = 7").await;
    let verdict = verify(&ledger).await;
    assert_eq!(broken_at(&verdict), 7);
    assert_eq!(verdict.first_broken.unwrap().reason, "an entry is missing");
}
both_stores!(a_deleted_entry_is_detected_on, a_deleted_entry_is_detected);

async fn an_inserted_entry_is_detected(db: Arc<TestDb>) {
    let ledger = signed(&db, "a").await;
    let entries = twelve_changes(&ledger, &db).await;
    // Entries 7.. move up by one, and a well-formed entry (its hash computed as Tidepool would)
    // takes seq 7, chained onto entry 6.
    execute(&db, "UPDATE audit_log SET seq = seq + 100 WHERE seq >= 7").await;
    execute(&db, "UPDATE audit_log SET seq = seq - 99 WHERE seq >= 100").await;
    let mut forged = AuditEntry {
        seq: 7,
        at_ms: entries[5].at_ms,
        actor: AuditActor::Admin,
        action: "tenant.credit".to_owned(),
        target: "tenant:acme".to_owned(),
        details: "{\"amount_nanos\":1000000000}".to_owned(),
        request_id: None,
        format: 2,
        prev_hash: entries[5].hash.clone(),
        hash: String::new(),
    };
    forged.hash = chain_hash(&forged.prev_hash, &forged.canonical_content().unwrap());
    execute(
        &db,
        &format!(
            "INSERT INTO audit_log (seq, at_ms, actor, action, target, details, request_id, \
             format, prev_hash, hash) VALUES (7, {}, 'admin', 'tenant.credit', 'tenant:acme', \
             '{}', NULL, 2, '{}', '{}')",
            forged.at_ms, forged.details, forged.prev_hash, forged.hash
        ),
    )
    .await;
    // The forged entry links; the one after it no longer does.
    assert_eq!(broken_at(&verify(&ledger).await), 8);
}
both_stores!(
    an_inserted_entry_is_detected_on,
    an_inserted_entry_is_detected
);

async fn reordered_entries_are_detected(db: Arc<TestDb>) {
    let ledger = signed(&db, "a").await;
    twelve_changes(&ledger, &db).await;
    execute(&db, "UPDATE audit_log SET seq = 100 WHERE seq = 6").await;
    execute(&db, "UPDATE audit_log SET seq = 6 WHERE seq = 7").await;
    execute(&db, "UPDATE audit_log SET seq = 7 WHERE seq = 100").await;
    assert_eq!(broken_at(&verify(&ledger).await), 6);
}
both_stores!(
    reordered_entries_are_detected_on,
    reordered_entries_are_detected
);

async fn a_truncated_tail_is_detected(db: Arc<TestDb>) {
    let ledger = signed(&db, "a").await;
    let entries = twelve_changes(&ledger, &db).await;
    let hash = |seq: usize| entries[seq - 1].hash.clone();
    // Only the tail deleted: the head is ahead of the log.
    execute(&db, "DELETE FROM audit_log WHERE seq > 11").await;
    assert_eq!(broken_at(&verify(&ledger).await), 12);
    // The head rewritten to the new end too: checkpoint 10 is past the end of the log.
    execute(&db, "DELETE FROM audit_log WHERE seq > 8").await;
    execute(
        &db,
        &format!("UPDATE audit_head SET seq = 8, hash = '{}'", hash(8)),
    )
    .await;
    let verdict = verify(&ledger).await;
    assert_eq!(broken_at(&verdict), 9);
    assert_eq!(
        verdict.first_broken.unwrap().reason,
        "a checkpoint signs an entry past the end of the log: entries were deleted"
    );
    // And the checkpoints after it deleted too: only a copy kept elsewhere tells.
    execute(&db, "DELETE FROM audit_checkpoints WHERE seq > 8").await;
    let verdict = verify(&ledger).await;
    assert!(verdict.is_ok(), "undetectable from the database alone");
    let kept: AuditAnchor = format!("10:{}", hash(10)).parse().unwrap();
    let verdict = ledger.verify_audit_chain(Some(&kept)).await.unwrap();
    assert_eq!(broken_at(&verdict), 9);
    let current: AuditAnchor = format!("5:{}", hash(5)).parse().unwrap();
    assert!(
        ledger
            .verify_audit_chain(Some(&current))
            .await
            .unwrap()
            .is_ok()
    );
    let wrong: AuditAnchor = format!("5:{}", hash(6)).parse().unwrap();
    let verdict = ledger.verify_audit_chain(Some(&wrong)).await.unwrap();
    assert_eq!(broken_at(&verdict), 5);
}
both_stores!(
    a_truncated_tail_is_detected_on,
    a_truncated_tail_is_detected
);

async fn a_forged_checkpoint_is_detected(db: Arc<TestDb>) {
    let ledger = signed(&db, "a").await;
    let entries = twelve_changes(&ledger, &db).await;
    // The right hash, signed with another key.
    let forged = key(2).sign(7, &entries[6].hash, 0);
    execute(
        &db,
        &format!(
            "INSERT INTO audit_checkpoints (seq, hash, created_at_ms, hmac) \
             VALUES (7, '{}', 0, '{forged}')",
            entries[6].hash
        ),
    )
    .await;
    let verdict = verify(&ledger).await;
    assert_eq!(broken_at(&verdict), 7);
    // Without the key, a forged signature goes unnoticed (and the verdict says so).
    let unsigned = with_key(&db, "b", None).await;
    let verdict = verify(&unsigned).await;
    assert!(
        verdict.is_ok() && !verdict.signatures_checked,
        "{verdict:?}"
    );
    // A forged checkpoint past the end of the log.
    execute(&db, "DELETE FROM audit_checkpoints WHERE seq = 7").await;
    execute(
        &db,
        &format!(
            "INSERT INTO audit_checkpoints (seq, hash, created_at_ms, hmac) \
             VALUES (40, '{AUDIT_GENESIS_HASH}', 0, '{forged}')"
        ),
    )
    .await;
    let verdict = verify(&ledger).await;
    assert_eq!(broken_at(&verdict), 13);
    assert!(
        verdict
            .first_broken
            .unwrap()
            .reason
            .contains("bad signature"),
        "told apart from deleted entries"
    );
}
both_stores!(
    a_forged_checkpoint_is_detected_on,
    a_forged_checkpoint_is_detected
);

async fn a_rewritten_suffix_fails_the_checkpoints_after_it(db: Arc<TestDb>) {
    let ledger = signed(&db, "a").await;
    let mut entries = twelve_changes(&ledger, &db).await;
    // Entry 7 edited, and every hash from there on recomputed: the links and the head all agree.
    entries[6].details = "{\"requests_per_minute\":100000}".to_owned();
    for index in 6..entries.len() {
        let prev_hash = entries[index - 1].hash.clone();
        let entry = &mut entries[index];
        entry.prev_hash = prev_hash;
        entry.hash = chain_hash(&entry.prev_hash, &entry.canonical_content().unwrap());
        execute(
            &db,
            &format!(
                "UPDATE audit_log SET details = '{}', prev_hash = '{}', hash = '{}' WHERE seq = {}",
                entry.details, entry.prev_hash, entry.hash, entry.seq
            ),
        )
        .await;
    }
    let last = entries.last().unwrap();
    execute(
        &db,
        &format!("UPDATE audit_head SET hash = '{}' WHERE id = 1", last.hash),
    )
    .await;
    let verdict = verify(&ledger).await;
    assert_eq!(
        broken_at(&verdict),
        10,
        "the first checkpoint after entry 7"
    );
    assert!(
        verdict.first_broken.unwrap().reason.contains("rewritten"),
        "says why"
    );
    // Checkpoint 10 made to agree: its signature no longer does.
    execute(
        &db,
        &format!(
            "UPDATE audit_checkpoints SET hash = '{}' WHERE seq = 10",
            entries[9].hash
        ),
    )
    .await;
    let verdict = verify(&ledger).await;
    assert_eq!(broken_at(&verdict), 10);
    assert!(
        verdict
            .first_broken
            .unwrap()
            .reason
            .contains("bad signature")
    );
}
both_stores!(
    a_rewritten_suffix_fails_the_checkpoints_after_it_on,
    a_rewritten_suffix_fails_the_checkpoints_after_it
);

async fn changes_from_two_replicas_at_once_leave_one_gapless_chain(db: Arc<TestDb>) {
    let replica_a = signed(&db, "a").await;
    let replica_b = signed(&db, "b").await;
    let acme = acme();
    replica_a
        .create_tenant(&acme, Currency::USD, &AuditContext::ADMIN)
        .await
        .unwrap();
    let changes: u32 = 100;
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..changes {
        let ledger = if index % 2 == 0 {
            replica_a.clone()
        } else {
            replica_b.clone()
        };
        let acme = acme.clone();
        tasks.spawn(async move {
            let audit = request(index);
            match index % 4 {
                0 | 1 => {
                    ledger
                        .credit(&acme, Nanos(i64::from(index) + 1), "top-up", &audit)
                        .await
                        .unwrap();
                }
                2 => {
                    let project = ProjectId::new(format!("p{index}")).unwrap();
                    ledger
                        .create_project(&acme, &project, &audit)
                        .await
                        .unwrap();
                }
                _ => {
                    let scope = RateScope::Model {
                        model: ModelId::new("m").unwrap(),
                    };
                    let limits = RateLimits {
                        requests_per_minute: Some(index),
                        tokens_per_minute: None,
                    };
                    ledger
                        .set_rate_limits(&scope, limits, &audit)
                        .await
                        .unwrap();
                }
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let entries = all_entries(&replica_b).await;
    let expected: Vec<i64> = (1..=i64::from(changes) + 1).collect();
    assert_eq!(
        entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
        expected,
        "one entry per change, no gaps"
    );
    let mut request_ids: Vec<_> = entries
        .iter()
        .filter_map(|e| e.request_id.clone())
        .collect();
    request_ids.sort_unstable();
    request_ids.dedup();
    assert_eq!(request_ids.len(), 100, "each change once");
    let verdict = verify(&replica_a).await;
    assert!(verdict.is_ok(), "{verdict:?}");
    assert_eq!(verdict.entries, u64::from(changes) + 1);
    assert_eq!(verdict.checkpoints, u64::from((changes + 1) / EVERY));
    // The credits' before/after balances chain too: each starts where another ended.
    let credited: i64 = (0..changes)
        .filter(|i| i % 4 < 2)
        .map(|i| i64::from(i) + 1)
        .sum();
    assert_eq!(
        replica_b.account(&acme).await.unwrap().balance,
        Nanos(credited)
    );
    let mut balances: Vec<(i64, i64)> = entries
        .iter()
        .filter(|e| e.action == "tenant.credit")
        .map(|e| {
            let d = details(e);
            (
                d["before"]["balance_nanos"].as_i64().unwrap(),
                d["after"]["balance_nanos"].as_i64().unwrap(),
            )
        })
        .collect();
    balances.sort_unstable();
    assert_eq!(balances[0].0, 0);
    for pair in balances.windows(2) {
        assert_eq!(pair[0].1, pair[1].0, "no lost update: {pair:?}");
    }
    assert_eq!(balances.last().unwrap().1, credited);
}
both_stores!(
    changes_from_two_replicas_at_once_leave_one_gapless_chain_on,
    changes_from_two_replicas_at_once_leave_one_gapless_chain
);

async fn entries_written_before_request_ids_still_verify(db: Arc<TestDb>) {
    let ledger = signed(&db, "a").await;
    // Two entries as the previous version wrote them: format 1, no request id.
    let mut prev_hash = AUDIT_GENESIS_HASH.to_owned();
    for seq in 1..=2 {
        let mut entry = AuditEntry {
            seq,
            at_ms: 1_000 * seq,
            actor: AuditActor::Admin,
            action: "tenant.create".to_owned(),
            target: format!("tenant:t{seq}"),
            details: json!({ "currency": "USD" }).to_string(),
            request_id: None,
            format: 1,
            prev_hash: prev_hash.clone(),
            hash: String::new(),
        };
        entry.hash = chain_hash(&prev_hash, &entry.canonical_content().unwrap());
        execute(
            &db,
            &format!(
                "INSERT INTO audit_log (seq, at_ms, actor, action, target, details, prev_hash, \
                 hash) VALUES ({seq}, {}, 'admin', 'tenant.create', '{}', '{}', '{}', '{}')",
                entry.at_ms, entry.target, entry.details, entry.prev_hash, entry.hash
            ),
        )
        .await;
        execute(
            &db,
            &format!(
                "UPDATE audit_head SET seq = {seq}, hash = '{}' WHERE id = 1",
                entry.hash
            ),
        )
        .await;
        prev_hash = entry.hash;
    }
    ledger
        .create_tenant(&acme(), Currency::USD, &request(1))
        .await
        .unwrap();
    let entries = all_entries(&ledger).await;
    assert_eq!(
        entries.iter().map(|e| e.format).collect::<Vec<_>>(),
        [1, 1, 2]
    );
    assert!(verify(&ledger).await.is_ok());
    // Changing an old entry's format is no way round its hash.
    execute(&db, "UPDATE audit_log SET format = 2 WHERE seq = 2").await;
    assert_eq!(broken_at(&verify(&ledger).await), 2);
}
both_stores!(
    entries_written_before_request_ids_still_verify_on,
    entries_written_before_request_ids_still_verify
);
