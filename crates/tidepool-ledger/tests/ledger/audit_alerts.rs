// The audit chain, the alert outbox and key suspension on both stores: a chain of appends
// verifies; a row edited or deleted by direct SQL is reported at the first broken entry;
// appends from two handles (two replicas) at once keep one valid chain; outbox rows are claimed
// by one replica at a time, retried when marked failed, and never delivered twice; a suspended
// key still authenticates (so the gateway can say why it refuses it) until reinstated.

use std::sync::Arc;

use crate::both_stores;
use crate::common::{self, TestDb};
use serde_json::json;
use sqlx::Connection;
use tidepool_core::{KeyId, TenantId};
use tidepool_ledger::{AuditContext, LedgerError, NewAlert};

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

async fn chain_verifies_and_tampering_is_detected(db: Arc<TestDb>) {
    let ledger = db.ledger().await;
    let verdict = ledger.verify_audit_chain(None).await.unwrap();
    assert!(verdict.is_ok(), "an empty chain verifies");
    for index in 0..5 {
        let entry = ledger
            .append_audit(
                &AuditContext::ADMIN.with_request_id(format!("req-{index}")),
                "tenant.credit",
                "tenant:acme",
                &json!({ "amount_nanos": index }),
            )
            .await
            .unwrap();
        assert_eq!(entry.seq, index + 1);
        assert_eq!(entry.request_id, Some(format!("req-{index}")));
        db.clock.advance(1);
    }
    let verdict = ledger.verify_audit_chain(None).await.unwrap();
    assert_eq!(verdict.entries, 5);
    assert!(verdict.is_ok(), "{verdict:?}");
    let page = ledger.list_audit(2, 2).await.unwrap();
    assert_eq!(page.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 4]);
    assert_eq!(
        page[0].prev_hash,
        ledger.list_audit(1, 1).await.unwrap()[0].hash
    );
    assert!(matches!(
        ledger.list_audit(0, 0).await,
        Err(LedgerError::OutOfRange { .. })
    ));

    // Editing an entry's content is caught at that entry.
    execute(
        &db,
        "UPDATE audit_log SET details = '{\"amount_nanos\":999}' WHERE seq = 3",
    )
    .await;
    let verdict = ledger.verify_audit_chain(None).await.unwrap();
    let broken = verdict.first_broken.expect("tampering is detected");
    assert_eq!(broken.seq, 3, "{broken:?}");
    execute(
        &db,
        "UPDATE audit_log SET details = '{\"amount_nanos\":2}' WHERE seq = 3",
    )
    .await;
    assert!(
        ledger.verify_audit_chain(None).await.unwrap().is_ok(),
        "restored"
    );

    // Deleting one in the middle, or the last one, is caught too.
    execute(&db, "DELETE FROM audit_log WHERE seq = 5").await;
    let broken = ledger.verify_audit_chain(None).await.unwrap().first_broken;
    assert_eq!(broken.map(|b| b.seq), Some(5), "a truncated log");
    execute(&db, "DELETE FROM audit_log WHERE seq = 2").await;
    let broken = ledger.verify_audit_chain(None).await.unwrap().first_broken;
    assert_eq!(broken.map(|b| b.seq), Some(2), "a gap");
}
both_stores!(
    chain_verifies_and_tampering_is_detected_on,
    chain_verifies_and_tampering_is_detected
);

async fn concurrent_appends_from_two_replicas_keep_one_chain(db: Arc<TestDb>) {
    let replica_a = db.ledger().await;
    let replica_b = db.ledger().await;
    let per_replica = 40;
    let mut tasks = tokio::task::JoinSet::new();
    for (name, ledger) in [("a", replica_a.clone()), ("b", replica_b.clone())] {
        for index in 0..per_replica {
            let ledger = ledger.clone();
            tasks.spawn(async move {
                ledger
                    .append_audit(
                        &AuditContext::SYSTEM,
                        "test.append",
                        &format!("replica:{name}"),
                        &json!({ "index": index }),
                    )
                    .await
                    .unwrap()
            });
        }
    }
    let mut seqs = Vec::new();
    while let Some(entry) = tasks.join_next().await {
        seqs.push(entry.unwrap().seq);
    }
    seqs.sort_unstable();
    let expected: Vec<i64> = (1..=2 * per_replica).collect();
    assert_eq!(seqs, expected, "every append got its own sequence number");
    let verdict = replica_b.verify_audit_chain(None).await.unwrap();
    assert!(verdict.is_ok(), "{verdict:?}");
    assert_eq!(verdict.entries, u64::try_from(2 * per_replica).unwrap());
}
both_stores!(
    concurrent_appends_from_two_replicas_keep_one_chain_on,
    concurrent_appends_from_two_replicas_keep_one_chain
);

fn alert(sink: &str, dedup: Option<&str>) -> NewAlert {
    NewAlert {
        sink_id: sink.to_owned(),
        event: "breaker_opened".to_owned(),
        payload: "{\"event\":\"breaker_opened\"}".to_owned(),
        dedup_key: dedup.map(str::to_owned),
    }
}

async fn outbox_rows_are_claimed_once_retried_and_deduplicated(db: Arc<TestDb>) {
    let replica_a = db.ledger().await;
    let replica_b = tidepool_ledger::Ledger::connect_with(
        &db.url,
        tidepool_ledger::LedgerOptions {
            replica_id: "b".to_owned(),
            clock: db.clock.clone(),
            ..tidepool_ledger::LedgerOptions::default()
        },
    )
    .await
    .unwrap();
    let written = replica_a
        .enqueue_alerts(&[alert("ops", None), alert("ops", Some("budget:x:2026-11"))])
        .await
        .unwrap();
    assert_eq!(written, 2);
    let again = replica_b
        .enqueue_alerts(&[alert("ops", Some("budget:x:2026-11"))])
        .await
        .unwrap();
    assert_eq!(again, 0, "a deduplicated alert is stored once");

    let claimed_a = replica_a.claim_alerts(10, 5_000).await.unwrap();
    assert_eq!(claimed_a.len(), 2);
    let claimed_b = replica_b.claim_alerts(10, 5_000).await.unwrap();
    assert!(claimed_b.is_empty(), "a live lease keeps others away");

    // One delivered, one failed and retried later.
    assert!(
        replica_a
            .mark_alert_delivered(claimed_a[0].id)
            .await
            .unwrap()
    );
    assert!(
        replica_a
            .mark_alert_failed(claimed_a[1].id, "HTTP 500", Some(1_000))
            .await
            .unwrap()
    );
    assert!(
        replica_b.claim_alerts(10, 5_000).await.unwrap().is_empty(),
        "not due yet"
    );
    db.clock.advance(1_000);
    let retried = replica_b.claim_alerts(10, 5_000).await.unwrap();
    assert_eq!(retried.len(), 1);
    assert_eq!(retried[0].id, claimed_a[1].id);
    assert_eq!(retried[0].attempts, 1);
    assert!(
        !replica_a.mark_alert_delivered(retried[0].id).await.unwrap(),
        "only the claimant marks a row"
    );
    assert!(replica_b.mark_alert_delivered(retried[0].id).await.unwrap());

    // Past its lease, a claimed row that was never marked is claimed again (a dead replica).
    replica_a
        .enqueue_alerts(&[alert("ops", None)])
        .await
        .unwrap();
    let lost = replica_a.claim_alerts(10, 5_000).await.unwrap();
    assert_eq!(lost.len(), 1);
    db.clock.advance(5_001);
    let taken = replica_b.claim_alerts(10, 5_000).await.unwrap();
    assert_eq!(taken.len(), 1);
    assert!(
        replica_b
            .mark_alert_failed(taken[0].id, "gone", None)
            .await
            .unwrap()
    );
    let counts = replica_a.outbox_counts().await.unwrap();
    assert_eq!((counts.pending, counts.delivered, counts.failed), (0, 2, 1));
}
both_stores!(
    outbox_rows_are_claimed_once_retried_and_deduplicated_on,
    outbox_rows_are_claimed_once_retried_and_deduplicated
);

async fn suspended_keys_authenticate_with_their_reason_until_reinstated(db: Arc<TestDb>) {
    let replica_a = db.ledger().await;
    let replica_b = db.ledger().await;
    let created = replica_a
        .create_key(
            &TenantId::new("acme").unwrap(),
            "laptop",
            &AuditContext::ADMIN,
        )
        .await
        .unwrap();
    let key_id = &created.record.key_id;
    assert!(
        replica_a
            .suspend_key(key_id, "request rate 20x its usual", &AuditContext::ADMIN)
            .await
            .unwrap()
    );
    assert!(
        !replica_a
            .suspend_key(key_id, "again", &AuditContext::ADMIN)
            .await
            .unwrap(),
        "kept the first"
    );
    let seen = replica_b
        .authenticate(&created.secret)
        .await
        .unwrap()
        .unwrap();
    assert!(seen.suspended_at_ms.is_some());
    assert_eq!(
        seen.suspended_reason.as_deref(),
        Some("request rate 20x its usual")
    );
    assert!(
        replica_b
            .reinstate_key(key_id, &AuditContext::ADMIN)
            .await
            .unwrap()
    );
    assert!(
        !replica_b
            .reinstate_key(key_id, &AuditContext::ADMIN)
            .await
            .unwrap()
    );
    let seen = replica_a
        .authenticate(&created.secret)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen.suspended_at_ms, None);
    assert!(matches!(
        replica_a
            .suspend_key(&KeyId("nosuchkey000".into()), "x", &AuditContext::ADMIN)
            .await,
        Err(LedgerError::KeyNotFound { .. })
    ));
}
both_stores!(
    suspended_keys_authenticate_with_their_reason_until_reinstated_on,
    suspended_keys_authenticate_with_their_reason_until_reinstated
);
