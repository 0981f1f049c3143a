// Behaviour of the key and usage API on both stores: keys are stored only as
// SHA-256, authenticate in constant time, fail at once after a revoke (also through a second
// handle, i.e. another replica); usage rows are written exactly once per request id.

use std::sync::Arc;

use crate::both_stores;
use crate::common::{self, T0_MS, TestDb};
use sqlx::Connection;
use tidepool_core::{KeyId, ModelId, RequestId, TenantId};
use tidepool_ledger::{AuditContext, LedgerError, NO_MODEL, UsageEntry, UsageStatus};

fn tenant(s: &str) -> TenantId {
    TenantId::new(s).unwrap()
}

fn entry(
    tenant_id: &str,
    key: &str,
    model: Option<&str>,
    prompt: u32,
    completion: u32,
) -> UsageEntry {
    UsageEntry {
        request_id: RequestId::new(),
        tenant: tenant(tenant_id),
        key_id: KeyId(key.to_owned()),
        model: model.map(|m| ModelId::new(m).unwrap()),
        endpoint: "chat.completions".to_owned(),
        prompt_tokens: prompt,
        completion_tokens: completion,
        cached_prompt_tokens: 0,
        cached_prompt_tokens_unknown: false,
        status: UsageStatus::Ok,
        latency_ms: 12,
        created_at_ms: T0_MS,
    }
}

async fn stored_hashes(db: &TestDb) -> Vec<String> {
    match db.kind {
        common::Kind::Sqlite => {
            let mut c = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
            sqlx::query_scalar("SELECT secret_sha256 FROM api_keys")
                .fetch_all(&mut c)
                .await
                .unwrap()
        }
        common::Kind::Postgres => {
            let mut c = sqlx::PgConnection::connect(&db.url).await.unwrap();
            sqlx::query_scalar("SELECT secret_sha256 FROM api_keys")
                .fetch_all(&mut c)
                .await
                .unwrap()
        }
    }
}

async fn keys_roundtrip(db: Arc<TestDb>) {
    let ledger = db.ledger().await;
    let acme = tenant("acme");
    let created = ledger
        .create_key(&acme, "laptop", &AuditContext::ADMIN)
        .await
        .unwrap();
    let secret = &created.secret;
    assert!(secret.starts_with("tp-"));
    assert_eq!(secret.len(), 3 + 12 + 1 + 43);
    assert_eq!(created.record.tenant, acme);
    assert_eq!(created.record.created_at_ms, T0_MS);

    let auth = ledger.authenticate(secret).await.unwrap().unwrap();
    assert_eq!(auth, created.record);

    // Only the hash is stored, never the secret.
    let hashes = stored_hashes(&db).await;
    assert_eq!(hashes.len(), 1);
    assert_eq!(hashes[0].len(), 64);
    assert!(!hashes[0].contains(secret.as_str()));

    // A wrong secret with the right key id, and malformed keys, fail.
    let mut wrong = secret.clone();
    let last = wrong.pop().unwrap();
    wrong.push(if last == 'a' { 'b' } else { 'a' });
    assert_eq!(ledger.authenticate(&wrong).await.unwrap(), None);
    assert_eq!(ledger.authenticate("").await.unwrap(), None);
    assert_eq!(ledger.authenticate("tp-nope").await.unwrap(), None);
    assert_eq!(
        ledger.authenticate(&format!("{secret}x")).await.unwrap(),
        None
    );

    let other = ledger
        .create_key(&tenant("globex"), "ci", &AuditContext::ADMIN)
        .await
        .unwrap();
    let all = ledger.list_keys(None).await.unwrap();
    assert_eq!(all.len(), 2);
    let only_acme = ledger.list_keys(Some(&acme)).await.unwrap();
    assert_eq!(only_acme, vec![created.record.clone()]);
    assert_ne!(other.record.key_id, created.record.key_id);
}
both_stores!(keys_roundtrip_on, keys_roundtrip);

async fn revoke_is_immediate_across_replicas(db: Arc<TestDb>) {
    let replica_a = db.ledger().await;
    let replica_b = db.ledger().await;
    let created = replica_a
        .create_key(&tenant("acme"), "laptop", &AuditContext::ADMIN)
        .await
        .unwrap();
    assert!(
        replica_b
            .authenticate(&created.secret)
            .await
            .unwrap()
            .is_some()
    );
    db.clock.advance(5);
    replica_a
        .revoke_key(&created.record.key_id, &AuditContext::ADMIN)
        .await
        .unwrap();
    assert_eq!(replica_b.authenticate(&created.secret).await.unwrap(), None);
    assert_eq!(replica_a.authenticate(&created.secret).await.unwrap(), None);
    let listed = replica_b.list_keys(None).await.unwrap();
    assert_eq!(listed[0].revoked_at_ms, Some(T0_MS + 5));
    // Revoking again keeps the first revocation time.
    db.clock.advance(5);
    replica_b
        .revoke_key(&created.record.key_id, &AuditContext::ADMIN)
        .await
        .unwrap();
    assert_eq!(
        replica_b.list_keys(None).await.unwrap()[0].revoked_at_ms,
        Some(T0_MS + 5)
    );
    let missing = replica_a
        .revoke_key(&KeyId("nosuchkey000".to_owned()), &AuditContext::ADMIN)
        .await;
    assert!(matches!(missing, Err(LedgerError::KeyNotFound { .. })));
}
both_stores!(
    revoke_is_immediate_across_replicas_on,
    revoke_is_immediate_across_replicas
);

async fn usage_is_idempotent(db: Arc<TestDb>) {
    let ledger = db.ledger().await;
    let first = entry("acme", "k1", Some("smollm2-135m-instruct"), 10, 5);
    assert!(ledger.record_usage(&first).await.unwrap());
    let mut again = first.clone();
    again.completion_tokens = 999;
    assert!(!ledger.record_usage(&again).await.unwrap());
    assert_eq!(
        ledger.usage_entry(first.request_id).await.unwrap(),
        Some(first.clone())
    );
    assert_eq!(ledger.usage_entry(RequestId::new()).await.unwrap(), None);

    let mut disconnected = entry("acme", "k1", Some("smollm2-135m-instruct"), 7, 3);
    disconnected.status = UsageStatus::ClientDisconnected;
    let mut failed = entry("acme", "k1", None, 0, 0);
    failed.status = UsageStatus::Error {
        code: "model_not_found".to_owned(),
    };
    failed.latency_ms = u64::try_from(i64::MAX).unwrap();
    let other_tenant = entry("globex", "k2", Some("gemma-3-270m"), 100, 100);
    for e in [&disconnected, &failed, &other_tenant] {
        assert!(ledger.record_usage(e).await.unwrap());
        assert_eq!(
            ledger.usage_entry(e.request_id).await.unwrap().as_ref(),
            Some(e)
        );
    }
    let mut too_slow = entry("acme", "k1", None, 0, 0);
    too_slow.latency_ms = u64::MAX;
    assert!(matches!(
        ledger.record_usage(&too_slow).await,
        Err(LedgerError::OutOfRange { .. })
    ));

    let totals = ledger.usage_totals(&tenant("acme")).await.unwrap();
    assert_eq!(totals.len(), 2);
    assert_eq!(totals[0].model, NO_MODEL);
    assert_eq!((totals[0].requests, totals[0].prompt_tokens), (1, 0));
    assert_eq!(totals[1].model, "smollm2-135m-instruct");
    assert_eq!(
        (
            totals[1].requests,
            totals[1].prompt_tokens,
            totals[1].completion_tokens
        ),
        (2, 17, 8)
    );
    assert!(
        ledger
            .usage_totals(&tenant("nobody"))
            .await
            .unwrap()
            .is_empty()
    );
}
both_stores!(usage_is_idempotent_on, usage_is_idempotent);

async fn concurrent_duplicate_usage_writes_once(db: Arc<TestDb>) {
    let ledger = db.ledger().await;
    let e = entry("acme", "k1", Some("smollm2-135m-instruct"), 1, 1);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let (l, e) = (ledger.clone(), e.clone());
        tasks.spawn(async move { l.record_usage(&e).await.unwrap() });
    }
    let wins = tasks.join_all().await.into_iter().filter(|w| *w).count();
    assert_eq!(wins, 1);
}
both_stores!(
    concurrent_duplicate_usage_writes_once_on,
    concurrent_duplicate_usage_writes_once
);

#[tokio::test]
async fn rejects_unknown_urls() {
    let err = tidepool_ledger::Ledger::connect("mysql://x")
        .await
        .unwrap_err();
    assert!(matches!(err, LedgerError::UnsupportedUrl));
}
