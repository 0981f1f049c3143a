// The Batch API at rest, on both stores: file and batch rows (tenant-scoped, newest first),
// claims under a lease, the status machine, and exactly-once line settlement — a line's result
// is written with its settlement, a second run of the same line is voided, batch lines are
// billed at the discount and never counted against the RPM/TPM windows.

#![expect(
    clippy::too_many_lines,
    reason = "behavioural scenarios read top to bottom"
)]

use std::sync::Arc;

use tidepool_core::{KeyId, Nanos, RequestId, TenantId};
use tidepool_ledger::{
    AuditContext, BatchFile, BatchRecord, BatchStatus, FileDeletion, Finish, Ledger, NewBatchLine,
    RateLimits, RateScope, ReserveClass, ReserveRequest, UsageEntry, UsageStatus,
};

use crate::billing::{INPUT, OUTPUT, fixture};
use crate::both_stores;
use crate::common::{T0_MS, TestDb};

fn file(tenant: &TenantId, id: &str, purpose: &str) -> BatchFile {
    BatchFile {
        file_id: id.to_owned(),
        tenant: tenant.clone(),
        key_id: "k".to_owned(),
        purpose: purpose.to_owned(),
        filename: format!("{id}.jsonl"),
        bytes: 42,
        status: "processed".to_owned(),
        created_at_ms: T0_MS,
    }
}

fn batch(tenant: &TenantId, key_id: &KeyId, id: &str) -> BatchRecord {
    BatchRecord {
        batch_id: id.to_owned(),
        tenant: tenant.clone(),
        key_id: key_id.0.clone(),
        endpoint: "/v1/chat/completions".to_owned(),
        model: Some("smollm2-135m-instruct".to_owned()),
        input_file_id: "file-01".to_owned(),
        completion_window: "24h".to_owned(),
        metadata: Some(r#"{"job":"nightly"}"#.to_owned()),
        status: BatchStatus::InProgress,
        errors: None,
        total: 3,
        output_file_id: None,
        error_file_id: None,
        created_at_ms: T0_MS,
        expires_at_ms: T0_MS + 86_400_000,
        in_progress_at_ms: Some(T0_MS),
        finalizing_at_ms: None,
        completed_at_ms: None,
        failed_at_ms: None,
        expired_at_ms: None,
        cancelling_at_ms: None,
        cancelled_at_ms: None,
    }
}

fn line(batch_id: &str, custom_id: &str, number: u64) -> NewBatchLine {
    NewBatchLine {
        batch_id: batch_id.to_owned(),
        custom_id: custom_id.to_owned(),
        line: number,
        succeeded: true,
        status_code: Some(200),
        body: Some(format!(r#"{{"answer":"{custom_id}"}}"#)),
        error_code: None,
        error_message: None,
    }
}

async fn files_and_batches_are_rows_of_their_tenant(db: Arc<TestDb>) {
    let ledger = db.ledger().await;
    let acme = TenantId::new("acme").unwrap();
    let globex = TenantId::new("globex").unwrap();
    for id in ["file-01", "file-02", "file-03"] {
        ledger
            .create_batch_file(&file(&acme, id, "batch"))
            .await
            .unwrap();
    }
    ledger
        .create_batch_file(&file(&acme, "file-04", "batch_output"))
        .await
        .unwrap();
    ledger
        .create_batch_file(&file(&globex, "file-05", "batch"))
        .await
        .unwrap();
    assert!(ledger.batch_file(&acme, "file-01").await.unwrap().is_some());
    assert!(
        ledger
            .batch_file(&globex, "file-01")
            .await
            .unwrap()
            .is_none()
    );
    let ids = |files: Vec<BatchFile>| files.into_iter().map(|f| f.file_id).collect::<Vec<_>>();
    assert_eq!(
        ids(ledger
            .list_batch_files(&acme, Some("batch"), None, 10)
            .await
            .unwrap()),
        ["file-03", "file-02", "file-01"]
    );
    assert_eq!(
        ids(ledger
            .list_batch_files(&acme, None, Some("file-03"), 2)
            .await
            .unwrap()),
        ["file-02", "file-01"]
    );
    let delete = |tenant: &TenantId, id: &str| {
        let (ledger, tenant, id) = (&ledger, tenant.clone(), id.to_owned());
        async move { ledger.delete_batch_file(&tenant, &id).await.unwrap() }
    };
    assert_eq!(delete(&globex, "file-02").await, FileDeletion::NotFound);
    assert_eq!(delete(&acme, "file-02").await, FileDeletion::Deleted);
    assert_eq!(delete(&acme, "file-02").await, FileDeletion::NotFound);
    assert!(ledger.batch_file(&acme, "file-02").await.unwrap().is_none());

    let key = KeyId("k".to_owned());
    let stored = batch(&acme, &key, "batch_01");
    ledger.create_batch(&stored).await.unwrap();
    ledger
        .create_batch(&batch(&acme, &key, "batch_02"))
        .await
        .unwrap();
    assert_eq!(ledger.batch(&acme, "batch_01").await.unwrap(), Some(stored));
    assert_eq!(ledger.batch(&globex, "batch_01").await.unwrap(), None);
    let listed = ledger.list_batches(&acme, None, 10).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].batch_id, "batch_02");
    assert!(
        ledger
            .list_batches(&globex, None, 10)
            .await
            .unwrap()
            .is_empty()
    );

    // An unfinished batch's input stays until the batch ends (its runner reads it); another
    // tenant still sees no such file.
    let in_use = FileDeletion::InUse {
        batch_id: "batch_01".to_owned(),
    };
    assert_eq!(delete(&acme, "file-01").await, in_use);
    assert_eq!(delete(&globex, "file-01").await, FileDeletion::NotFound);
    assert!(ledger.batch_file(&acme, "file-01").await.unwrap().is_some());
    for (batch_id, to) in [
        ("batch_01", BatchStatus::Cancelling),
        ("batch_02", BatchStatus::Finalizing),
    ] {
        assert!(
            ledger
                .set_batch_status(batch_id, &[BatchStatus::InProgress], to)
                .await
                .unwrap()
        );
    }
    assert_eq!(delete(&acme, "file-01").await, in_use);
    assert!(
        ledger
            .end_batch("batch_01", BatchStatus::Cancelled, None, None)
            .await
            .unwrap()
    );
    assert_eq!(
        delete(&acme, "file-01").await,
        FileDeletion::InUse {
            batch_id: "batch_02".to_owned()
        }
    );
    assert!(
        ledger
            .end_batch("batch_02", BatchStatus::Completed, None, None)
            .await
            .unwrap()
    );
    assert_eq!(delete(&acme, "file-01").await, FileDeletion::Deleted);
}
both_stores!(
    files_and_batches_are_rows_of_their_tenant_,
    files_and_batches_are_rows_of_their_tenant
);

async fn a_claim_holds_a_batch_until_its_lease_lapses(db: Arc<TestDb>) {
    let ledger = db.ledger().await;
    let acme = TenantId::new("acme").unwrap();
    let key = KeyId("k".to_owned());
    ledger
        .create_batch(&batch(&acme, &key, "batch_01"))
        .await
        .unwrap();
    let claimed = ledger.claim_batch("replica-a", 60_000).await.unwrap();
    assert_eq!(claimed.map(|b| b.batch_id).as_deref(), Some("batch_01"));
    assert!(
        ledger
            .claim_batch("replica-b", 60_000)
            .await
            .unwrap()
            .is_none()
    );
    // Its holder may claim it again (a restart of the same replica).
    assert!(
        ledger
            .claim_batch("replica-a", 60_000)
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        !ledger
            .renew_batch_lease("batch_01", "replica-b", 60_000)
            .await
            .unwrap()
    );
    db.clock.advance(60_001);
    let taken = ledger.claim_batch("replica-b", 60_000).await.unwrap();
    assert_eq!(taken.map(|b| b.batch_id).as_deref(), Some("batch_01"));
    assert!(
        !ledger
            .renew_batch_lease("batch_01", "replica-a", 60_000)
            .await
            .unwrap()
    );

    // Status moves only from the statuses named, stamping the new one's time.
    assert!(
        ledger
            .set_batch_status(
                "batch_01",
                &[BatchStatus::InProgress],
                BatchStatus::Cancelling
            )
            .await
            .unwrap()
    );
    assert!(
        !ledger
            .set_batch_status(
                "batch_01",
                &[BatchStatus::InProgress],
                BatchStatus::Finalizing
            )
            .await
            .unwrap()
    );
    let now = ledger.batch_by_id("batch_01").await.unwrap().unwrap();
    assert_eq!(now.status, BatchStatus::Cancelling);
    assert_eq!(now.cancelling_at_ms, Some(T0_MS + 60_001));

    // Ending records the files with the status, once.
    let output = file(&acme, "file-10", "batch_output");
    assert!(
        ledger
            .end_batch("batch_01", BatchStatus::Cancelled, Some(&output), None)
            .await
            .unwrap()
    );
    assert!(
        !ledger
            .end_batch("batch_01", BatchStatus::Completed, None, None)
            .await
            .unwrap()
    );
    let ended = ledger.batch_by_id("batch_01").await.unwrap().unwrap();
    assert_eq!(ended.status, BatchStatus::Cancelled);
    assert_eq!(ended.output_file_id.as_deref(), Some("file-10"));
    assert!(ledger.batch_file(&acme, "file-10").await.unwrap().is_some());
    // Ended batches are never claimed.
    db.clock.advance(120_000);
    assert!(
        ledger
            .claim_batch("replica-a", 60_000)
            .await
            .unwrap()
            .is_none()
    );
}
both_stores!(
    a_claim_holds_a_batch_until_its_lease_lapses_,
    a_claim_holds_a_batch_until_its_lease_lapses
);

fn entry(
    f_tenant: &TenantId,
    key_id: &KeyId,
    request: &ReserveRequest,
    completion: u32,
) -> UsageEntry {
    UsageEntry {
        request_id: request.request_id,
        tenant: f_tenant.clone(),
        key_id: key_id.clone(),
        model: Some(request.model.clone()),
        endpoint: "chat.completions".to_owned(),
        prompt_tokens: request.prompt_tokens,
        completion_tokens: completion,
        cached_prompt_tokens: 0,
        cached_prompt_tokens_unknown: false,
        status: UsageStatus::Ok,
        latency_ms: 5,
        created_at_ms: T0_MS,
    }
}

async fn balance(ledger: &Ledger, tenant: &TenantId) -> (i64, i64) {
    let account = ledger.account(tenant).await.unwrap();
    (account.balance.0, account.reserved.0)
}

async fn a_batch_line_is_settled_and_answered_exactly_once(db: Arc<TestDb>) {
    let f = fixture(db.ledger().await, Nanos(1_000_000_000)).await;
    let ledger = &f.ledger;
    ledger
        .create_batch(&batch(&f.tenant, &f.key_id, "batch_01"))
        .await
        .unwrap();
    // One request a minute: a batch line is not counted against it.
    ledger
        .set_rate_limits(
            &RateScope::Key {
                key_id: f.key_id.clone(),
            },
            RateLimits {
                requests_per_minute: Some(1),
                tokens_per_minute: Some(10),
            },
            &AuditContext::ADMIN,
        )
        .await
        .unwrap();
    let batch_request = |prompt: u32| ReserveRequest {
        class: ReserveClass::Batch {
            discount_ppm: 500_000,
        },
        ..f.request(prompt, 100)
    };
    let (before, _) = balance(ledger, &f.tenant).await;
    let first = batch_request(1000);
    let reservation = ledger.reserve(&first).await.unwrap();
    assert_eq!(reservation.price.input_per_mtok, Nanos(INPUT / 2));
    assert_eq!(reservation.price.output_per_mtok, Nanos(OUTPUT / 2));
    assert_eq!(
        reservation.rate_limits,
        tidepool_ledger::RateLimitStatus::default()
    );
    let settled = ledger
        .settle_batch_line(
            &entry(&f.tenant, &f.key_id, &first, 50),
            Finish::Settle,
            &line("batch_01", "a", 1),
        )
        .await
        .unwrap();
    // 1000 × 25 + 50 × 100 nano-units: exactly half the online 1000 × 50 + 50 × 200.
    assert_eq!(settled.cost, Nanos(25_000 + 5_000));
    // Settling the same request again changes nothing.
    let again = ledger
        .settle_batch_line(
            &entry(&f.tenant, &f.key_id, &first, 50),
            Finish::Settle,
            &line("batch_01", "a", 1),
        )
        .await
        .unwrap();
    assert!(!again.first);
    // A second run of the same line (another request id): voided, its result dropped.
    let second = batch_request(1000);
    ledger.reserve(&second).await.unwrap();
    let mut rerun = line("batch_01", "a", 1);
    rerun.body = Some(r#"{"answer":"second"}"#.to_owned());
    let voided = ledger
        .settle_batch_line(
            &entry(&f.tenant, &f.key_id, &second, 50),
            Finish::Settle,
            &rerun,
        )
        .await
        .unwrap();
    assert_eq!(voided.cost, Nanos::ZERO);
    let (after, reserved) = balance(ledger, &f.tenant).await;
    assert_eq!((before - after, reserved), (30_000, 0), "billed once");

    // A line refused before admission moves no money; its result is recorded once.
    let mut refused = line("batch_01", "b", 2);
    refused.succeeded = false;
    refused.status_code = Some(400);
    assert!(ledger.record_batch_line(&refused, None).await.unwrap());
    assert!(!ledger.record_batch_line(&refused, None).await.unwrap());

    let done = ledger.batch_done_custom_ids("batch_01").await.unwrap();
    assert_eq!(done.into_iter().collect::<Vec<_>>(), ["a", "b"]);
    let page = ledger.batch_lines_page("batch_01", 0, 10).await.unwrap();
    assert_eq!(page.len(), 2);
    assert_eq!(page[0].line.body.as_deref(), Some(r#"{"answer":"a"}"#));
    assert_eq!(page[0].request_id, Some(first.request_id.to_string()));
    assert_eq!(
        (page[0].prompt_tokens, page[0].completion_tokens),
        (1000, 50)
    );
    assert_eq!(page[0].cost_nanos, 30_000);
    assert_eq!(
        ledger
            .batch_lines_page("batch_01", 1, 10)
            .await
            .unwrap()
            .len(),
        1
    );
    let totals = ledger.batch_totals("batch_01").await.unwrap();
    assert_eq!(
        (totals.completed, totals.failed, totals.cost_nanos),
        (1, 1, 30_000)
    );
    // The usage entry of the billed run is marked as a batch line.
    assert_eq!(
        ledger
            .batch_usage(&tidepool_ledger::UsageScope::Tenant(f.tenant.clone()), None)
            .await
            .unwrap(),
        (1, 30_000)
    );

    // Online requests still meet the RPM limit the batch lines did not touch.
    let online = f.request(1, 1);
    ledger.reserve(&online).await.unwrap();
    let over = f.request(1, 1);
    assert!(matches!(
        ledger.reserve(&over).await,
        Err(tidepool_ledger::LedgerError::RateLimited { .. })
    ));
    let _ = RequestId::new();
}
both_stores!(
    a_batch_line_is_settled_and_answered_exactly_once_,
    a_batch_line_is_settled_and_answered_exactly_once
);
