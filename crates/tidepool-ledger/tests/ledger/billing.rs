// Billing behaviour on both stores: reserve → settle | void moves money exactly (balance, holds,
// budgets), every request id and idempotency key at most once, budgets per calendar month,
// price versions snapshotted per entry, statements that reconcile to the nano-unit, crash
// recovery by the documented rule, RPM/TPM windows, and 200 concurrent reservations against room
// for 50 — on one handle and on two handles (two replicas) sharing one database.

#![expect(
    clippy::too_many_lines,
    reason = "behavioural scenarios read top to bottom"
)]

use std::sync::Arc;
use std::time::Duration;

use tidepool_core::{Currency, KeyId, ModelId, Nanos, RequestId, TenantId};
use tidepool_ledger::price::cost_of;
use tidepool_ledger::{
    AuditContext, BilledTokens, BudgetScope, Finish, Ledger, LedgerError, Month, PriceVersion,
    ProjectId, QuotaScope, RateKind, RateLimits, RateLimitsChange, RateScope, ReservationState,
    ReserveRequest, StatementLine, UsageEntry, UsageStatus,
};

use crate::both_stores;
use crate::common::{T0_MS, TestDb};

pub(crate) const MODEL: &str = "smollm2-135m-instruct";
/// 0.05 / 0.20 / 0.025 USD per million input / output / cached-input tokens.
pub(crate) const INPUT: i64 = 50_000_000;
pub(crate) const OUTPUT: i64 = 200_000_000;
pub(crate) const CACHED: i64 = 25_000_000;

pub(crate) struct Fixture {
    pub(crate) ledger: Ledger,
    pub(crate) tenant: TenantId,
    pub(crate) key_id: KeyId,
    pub(crate) model: ModelId,
}

pub(crate) fn price_v(effective_from_ms: i64, input: i64, output: i64) -> PriceVersion {
    PriceVersion {
        model: ModelId::new(MODEL).unwrap(),
        effective_from_ms,
        currency: Currency::USD,
        input_per_mtok: Nanos(input),
        output_per_mtok: Nanos(output),
        cached_input_per_mtok: Nanos(CACHED),
    }
}

pub(crate) async fn fixture(ledger: Ledger, credit: Nanos) -> Fixture {
    let tenant = TenantId::new("acme").unwrap();
    ledger
        .create_tenant(&tenant, Currency::USD, &AuditContext::ADMIN)
        .await
        .unwrap();
    if credit > Nanos::ZERO {
        ledger
            .credit(&tenant, credit, "prepaid", &AuditContext::ADMIN)
            .await
            .unwrap();
    }
    ledger
        .set_price(&price_v(0, INPUT, OUTPUT), &AuditContext::ADMIN)
        .await
        .unwrap();
    let key = ledger
        .create_key(&tenant, "laptop", &AuditContext::ADMIN)
        .await
        .unwrap();
    Fixture {
        ledger,
        tenant,
        key_id: key.record.key_id,
        model: ModelId::new(MODEL).unwrap(),
    }
}

impl Fixture {
    pub(crate) fn request(&self, prompt: u32, completion_max: u32) -> ReserveRequest {
        ReserveRequest {
            request_id: RequestId::new(),
            key_id: self.key_id.clone(),
            model: self.model.clone(),
            prompt_tokens: prompt,
            completion_tokens_max: completion_max,
            idempotency_key: None,
            class: tidepool_ledger::ReserveClass::Online,
        }
    }

    pub(crate) fn entry(&self, request_id: RequestId, prompt: u32, completion: u32) -> UsageEntry {
        UsageEntry {
            request_id,
            tenant: self.tenant.clone(),
            key_id: self.key_id.clone(),
            model: Some(self.model.clone()),
            endpoint: "chat.completions".to_owned(),
            prompt_tokens: prompt,
            completion_tokens: completion,
            cached_prompt_tokens: 0,
            cached_prompt_tokens_unknown: false,
            status: UsageStatus::Ok,
            latency_ms: 5,
            created_at_ms: T0_MS,
        }
    }
}

fn cost(prompt: u32, completion: u32, price: &PriceVersion) -> Nanos {
    let tokens = BilledTokens {
        prompt_tokens: prompt,
        cached_prompt_tokens: 0,
        completion_tokens: completion,
    };
    cost_of(tokens, price).unwrap()
}

async fn reserve_settle_void(db: Arc<TestDb>) {
    let f = fixture(db.ledger().await, Nanos(1_000_000_000)).await;
    let price = price_v(0, INPUT, OUTPUT);

    let r = f.ledger.reserve(&f.request(1000, 500)).await.unwrap();
    assert_eq!(r.hold, cost(1000, 500, &price));
    assert_eq!(r.hold, Nanos(150_000));
    assert_eq!(r.price, price);
    assert_eq!(r.month, Month::parse("2026-11").unwrap());
    let account = f.ledger.account(&f.tenant).await.unwrap();
    assert_eq!(
        (account.balance, account.reserved),
        (Nanos(1_000_000_000), r.hold)
    );

    // Settle for fewer tokens than reserved: exact cost, the rest of the hold released.
    let mut entry = f.entry(r.request_id, 1000, 123);
    entry.cached_prompt_tokens = 400;
    let s = f.ledger.settle(&entry).await.unwrap();
    let expected = cost_of(
        BilledTokens {
            prompt_tokens: 1000,
            cached_prompt_tokens: 400,
            completion_tokens: 123,
        },
        &price,
    )
    .unwrap();
    assert_eq!(
        (s.cost, s.state, s.first, s.capped),
        (expected, ReservationState::Settled, true, false)
    );
    let account = f.ledger.account(&f.tenant).await.unwrap();
    assert_eq!(account.balance, Nanos(1_000_000_000 - expected.0));
    assert_eq!(account.reserved, Nanos::ZERO);

    // The entry carries its cost and price snapshot.
    let billed = f.ledger.billed_usage(r.request_id).await.unwrap().unwrap();
    assert_eq!(billed.entry, entry);
    assert_eq!(
        (billed.cost, billed.price.as_ref()),
        (expected, Some(&price))
    );
    assert_eq!(billed.project, Some(ProjectId::default_project()));

    // Settling again changes nothing and reports the first outcome.
    let again = f
        .ledger
        .settle(&f.entry(r.request_id, 1000, 500))
        .await
        .unwrap();
    assert_eq!((again.cost, again.first), (expected, false));
    let again = f.ledger.void(&entry).await.unwrap();
    assert_eq!(
        (again.state, again.first),
        (ReservationState::Settled, false)
    );
    assert_eq!(f.ledger.account(&f.tenant).await.unwrap(), account);

    // Void releases everything and bills nothing, but still writes the usage entry.
    let r2 = f.ledger.reserve(&f.request(10, 10)).await.unwrap();
    let mut failed = f.entry(r2.request_id, 10, 0);
    failed.status = UsageStatus::Error {
        code: "engine_failed".to_owned(),
    };
    let v = f.ledger.void(&failed).await.unwrap();
    assert_eq!(
        (v.cost, v.state, v.first),
        (Nanos::ZERO, ReservationState::Voided, true)
    );
    assert_eq!(f.ledger.account(&f.tenant).await.unwrap(), account);
    assert_eq!(
        f.ledger.usage_entry(r2.request_id).await.unwrap(),
        Some(failed)
    );

    // Usage beyond the reservation is capped at the hold (and logged), never billed beyond it.
    let r3 = f.ledger.reserve(&f.request(10, 10)).await.unwrap();
    let over = f
        .ledger
        .settle(&f.entry(r3.request_id, 10, 10_000))
        .await
        .unwrap();
    assert_eq!((over.cost, over.capped), (r3.hold, true));

    // A money-free record_usage cannot take the id of a reserved request.
    let r5 = f.ledger.reserve(&f.request(10, 10)).await.unwrap();
    assert!(
        !f.ledger
            .record_usage(&f.entry(r5.request_id, 10, 10))
            .await
            .unwrap()
    );
    assert!(
        f.ledger
            .settle(&f.entry(r5.request_id, 10, 10))
            .await
            .unwrap()
            .first
    );

    // Wrong settles are refused without moving money.
    let unknown = f.ledger.settle(&f.entry(RequestId::new(), 1, 1)).await;
    assert!(matches!(
        unknown,
        Err(LedgerError::ReservationNotFound { .. })
    ));
    let r4 = f.ledger.reserve(&f.request(10, 10)).await.unwrap();
    let mut wrong = f.entry(r4.request_id, 1, 1);
    wrong.key_id = KeyId("someoneelse0".to_owned());
    assert!(matches!(
        f.ledger.settle(&wrong).await,
        Err(LedgerError::ReservationMismatch { .. })
    ));
    assert_eq!(f.ledger.account(&f.tenant).await.unwrap().reserved, r4.hold);
}
both_stores!(reserve_settle_void_on, reserve_settle_void);

async fn admission_errors(db: Arc<TestDb>) {
    let f = fixture(db.ledger().await, Nanos(100_000)).await;
    // 1000 + 500 tokens hold 150_000 > 100_000: refused, nothing taken.
    let err = f.ledger.reserve(&f.request(1000, 500)).await.unwrap_err();
    match err {
        LedgerError::InsufficientQuota {
            scope,
            needed,
            available,
        } => {
            assert_eq!(
                (scope, needed, available),
                (QuotaScope::Balance, Nanos(150_000), Nanos(100_000))
            );
        }
        other => panic!("expected InsufficientQuota, got {other:?}"),
    }
    assert_eq!(
        f.ledger.account(&f.tenant).await.unwrap().reserved,
        Nanos::ZERO
    );

    let mut unpriced = f.request(1, 1);
    unpriced.model = ModelId::new("gemma-3-270m").unwrap();
    assert!(matches!(
        f.ledger.reserve(&unpriced).await,
        Err(LedgerError::PriceNotFound { .. })
    ));

    // Request ids and idempotency keys are single-use.
    let mut first = f.request(10, 10);
    first.idempotency_key = Some("order-42".to_owned());
    let r = f.ledger.reserve(&first).await.unwrap();
    assert!(matches!(
        f.ledger.reserve(&first).await,
        Err(LedgerError::DuplicateRequest { .. })
    ));
    let mut retry = f.request(10, 10);
    retry.idempotency_key = Some("order-42".to_owned());
    match f.ledger.reserve(&retry).await.unwrap_err() {
        LedgerError::IdempotencyKeyReused {
            original_request_id,
            state,
        } => {
            assert_eq!(
                (original_request_id, state),
                (r.request_id, ReservationState::Open)
            );
        }
        other => panic!("expected IdempotencyKeyReused, got {other:?}"),
    }
    f.ledger
        .settle(&f.entry(r.request_id, 10, 10))
        .await
        .unwrap();
    match f.ledger.reserve(&retry).await.unwrap_err() {
        LedgerError::IdempotencyKeyReused { state, .. } => {
            assert_eq!(state, ReservationState::Settled);
        }
        other => panic!("expected IdempotencyKeyReused, got {other:?}"),
    }
    // A request id with a (money-free) usage row cannot be reserved either.
    let settled_again = ReserveRequest {
        idempotency_key: None,
        ..first.clone()
    };
    assert!(matches!(
        f.ledger.reserve(&settled_again).await,
        Err(LedgerError::DuplicateRequest { .. })
    ));
    // Another tenant may use the same idempotency key.
    let globex = TenantId::new("globex").unwrap();
    f.ledger
        .create_tenant(&globex, Currency::USD, &AuditContext::ADMIN)
        .await
        .unwrap();
    f.ledger
        .credit(&globex, Nanos(1_000_000), "prepaid", &AuditContext::ADMIN)
        .await
        .unwrap();
    let other_key = f
        .ledger
        .create_key(&globex, "ci", &AuditContext::ADMIN)
        .await
        .unwrap();
    let mut theirs = f.request(10, 10);
    theirs.key_id = other_key.record.key_id.clone();
    theirs.idempotency_key = Some("order-42".to_owned());
    f.ledger.reserve(&theirs).await.unwrap();

    // A revoked key cannot reserve, even with a valid earlier authentication.
    f.ledger
        .revoke_key(&other_key.record.key_id, &AuditContext::ADMIN)
        .await
        .unwrap();
    let mut revoked = f.request(1, 1);
    revoked.key_id = other_key.record.key_id;
    assert!(matches!(
        f.ledger.reserve(&revoked).await,
        Err(LedgerError::KeyRevoked { .. })
    ));

    // A currency mismatch between account and price is refused.
    let euro = TenantId::new("euro").unwrap();
    f.ledger
        .create_tenant(&euro, Currency::parse("EUR").unwrap(), &AuditContext::ADMIN)
        .await
        .unwrap();
    assert!(matches!(
        f.ledger
            .create_tenant(&euro, Currency::USD, &AuditContext::ADMIN)
            .await,
        Err(LedgerError::TenantCurrencyConflict { .. })
    ));
    f.ledger
        .credit(&euro, Nanos(1_000_000), "prepaid", &AuditContext::ADMIN)
        .await
        .unwrap();
    let euro_key = f
        .ledger
        .create_key(&euro, "k", &AuditContext::ADMIN)
        .await
        .unwrap();
    let mut in_euro = f.request(1, 1);
    in_euro.key_id = euro_key.record.key_id;
    assert!(matches!(
        f.ledger.reserve(&in_euro).await,
        Err(LedgerError::CurrencyMismatch { .. })
    ));
}
both_stores!(admission_errors_on, admission_errors);

async fn budgets_per_month(db: Arc<TestDb>) {
    let f = fixture(db.ledger().await, Nanos(1_000_000_000)).await;
    let hold = cost(100, 100, &price_v(0, INPUT, OUTPUT)); // 25_000
    let key_scope = BudgetScope::Key {
        key_id: f.key_id.clone(),
    };
    let project_scope = BudgetScope::Project {
        tenant: f.tenant.clone(),
        project: ProjectId::default_project(),
    };
    f.ledger
        .set_budget(&key_scope, Some(Nanos(hold.0 * 3)), &AuditContext::ADMIN)
        .await
        .unwrap();
    f.ledger
        .set_budget(
            &project_scope,
            Some(Nanos(hold.0 * 4)),
            &AuditContext::ADMIN,
        )
        .await
        .unwrap();

    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(f.ledger.reserve(&f.request(100, 100)).await.unwrap());
    }
    let err = f.ledger.reserve(&f.request(100, 100)).await.unwrap_err();
    assert!(
        matches!(
            err,
            LedgerError::InsufficientQuota {
                scope: QuotaScope::KeyBudget,
                ..
            }
        ),
        "{err:?}"
    );
    // Settling below the hold frees budget: spent + reserved is what counts.
    f.ledger
        .settle(&f.entry(open[0].request_id, 100, 0))
        .await
        .unwrap();
    let status = f.ledger.budget(&key_scope).await.unwrap();
    assert_eq!(status.spent, cost(100, 0, &price_v(0, INPUT, OUTPUT)));
    assert_eq!(status.reserved, Nanos(hold.0 * 2));
    open.push(f.ledger.reserve(&f.request(10, 10)).await.unwrap());

    // The project budget binds across keys.
    f.ledger
        .set_budget(&key_scope, None, &AuditContext::ADMIN)
        .await
        .unwrap();
    let key2 = f
        .ledger
        .create_key(&f.tenant, "second", &AuditContext::ADMIN)
        .await
        .unwrap();
    let mut via_key2 = f.request(100, 100);
    via_key2.key_id = key2.record.key_id.clone();
    f.ledger.reserve(&via_key2).await.unwrap();
    via_key2.request_id = RequestId::new();
    let err = f.ledger.reserve(&via_key2).await.unwrap_err();
    assert!(
        matches!(
            err,
            LedgerError::InsufficientQuota {
                scope: QuotaScope::ProjectBudget,
                ..
            }
        ),
        "{err:?}"
    );

    // A new calendar month starts from zero.
    let december = Month::parse("2026-12").unwrap();
    db.clock.advance(december.start_ms() - T0_MS);
    via_key2.request_id = RequestId::new();
    let r = f.ledger.reserve(&via_key2).await.unwrap();
    assert_eq!(r.month, december);
    let status = f.ledger.budget(&project_scope).await.unwrap();
    assert_eq!(
        (status.month, status.spent, status.reserved),
        (december, Nanos::ZERO, r.hold)
    );
}
both_stores!(budgets_per_month_on, budgets_per_month);

/// 200 concurrent reservations against room for exactly 50 (balance, or a key budget), spread
/// over `replicas` handles: exactly 50 succeed, and the final spend stays within the limit.
async fn fifty_of_two_hundred(db: Arc<TestDb>, replicas: usize, limit_by_budget: bool) {
    let first = db.ledger().await;
    let hold = cost(100, 100, &price_v(0, INPUT, OUTPUT));
    let room = Nanos(hold.0 * 50);
    let f = fixture(
        first.clone(),
        if limit_by_budget {
            Nanos(hold.0 * 1000)
        } else {
            room
        },
    )
    .await;
    if limit_by_budget {
        f.ledger
            .set_budget(
                &BudgetScope::Key {
                    key_id: f.key_id.clone(),
                },
                Some(room),
                &AuditContext::ADMIN,
            )
            .await
            .unwrap();
    }
    let mut handles = vec![first];
    for _ in 1..replicas {
        handles.push(db.ledger().await);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200 {
        let ledger = handles[i % handles.len()].clone();
        let request = f.request(100, 100);
        let entry = f.entry(request.request_id, 100, 100);
        tasks.spawn(async move {
            match ledger.reserve(&request).await {
                Ok(_) => {
                    ledger.settle(&entry).await.unwrap();
                    true
                }
                Err(LedgerError::InsufficientQuota { .. }) => false,
                Err(other) => panic!("unexpected error: {other:?}"),
            }
        });
    }
    let granted = tasks.join_all().await.into_iter().filter(|ok| *ok).count();
    assert_eq!(granted, 50);
    let account = f.ledger.account(&f.tenant).await.unwrap();
    assert_eq!(account.reserved, Nanos::ZERO);
    let spent = if limit_by_budget {
        f.ledger
            .budget(&BudgetScope::Key {
                key_id: f.key_id.clone(),
            })
            .await
            .unwrap()
            .spent
    } else {
        Nanos(room.0 - account.balance.0)
    };
    assert_eq!(spent, room);
    assert!(account.balance >= Nanos::ZERO);
}

async fn concurrent_balance(db: Arc<TestDb>) {
    fifty_of_two_hundred(db, 1, false).await;
}
both_stores!(concurrent_balance_on, concurrent_balance);

async fn concurrent_budget_two_replicas(db: Arc<TestDb>) {
    fifty_of_two_hundred(db, 2, true).await;
}
both_stores!(
    concurrent_budget_two_replicas_on,
    concurrent_budget_two_replicas
);

async fn concurrent_balance_two_replicas(db: Arc<TestDb>) {
    fifty_of_two_hundred(db, 2, false).await;
}
both_stores!(
    concurrent_balance_two_replicas_on,
    concurrent_balance_two_replicas
);

async fn price_change_mid_month(db: Arc<TestDb>) {
    let f = fixture(db.ledger().await, Nanos(1_000_000_000)).await;
    let v1 = price_v(0, INPUT, OUTPUT);
    let before = f.ledger.reserve(&f.request(1000, 1000)).await.unwrap();
    let straddling = f.ledger.reserve(&f.request(1000, 1000)).await.unwrap();
    f.ledger
        .settle(&f.entry(before.request_id, 1000, 1000))
        .await
        .unwrap();

    db.clock.advance(86_400_000);
    let v2 = price_v(T0_MS + 86_400_000, INPUT * 2, OUTPUT * 3);
    assert!(
        f.ledger
            .sync_price(&v2, &AuditContext::ADMIN)
            .await
            .unwrap()
    );
    assert!(
        !f.ledger
            .sync_price(&v2, &AuditContext::ADMIN)
            .await
            .unwrap(),
        "same prices add no version"
    );
    let after = f.ledger.reserve(&f.request(1000, 1000)).await.unwrap();
    assert_eq!(after.price, v2);
    f.ledger
        .settle(&f.entry(after.request_id, 1000, 1000))
        .await
        .unwrap();
    // Reserved under v1, settled under v2: billed at its snapshot, v1.
    f.ledger
        .settle(&f.entry(straddling.request_id, 1000, 1000))
        .await
        .unwrap();

    let billed_before = f
        .ledger
        .billed_usage(before.request_id)
        .await
        .unwrap()
        .unwrap();
    let billed_straddling = f
        .ledger
        .billed_usage(straddling.request_id)
        .await
        .unwrap()
        .unwrap();
    let billed_after = f
        .ledger
        .billed_usage(after.request_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(billed_before.price.as_ref(), Some(&v1));
    assert_eq!(billed_straddling.price.as_ref(), Some(&v1));
    assert_eq!(billed_after.price.as_ref(), Some(&v2));
    assert_eq!(billed_before.cost, cost(1000, 1000, &v1));
    assert_eq!(billed_after.cost, cost(1000, 1000, &v2));
    assert!(matches!(
        f.ledger
            .set_price(&price_v(0, 1, 1), &AuditContext::ADMIN)
            .await,
        Err(LedgerError::PriceVersionConflict { .. })
    ));

    let statement = f
        .ledger
        .statement(&f.tenant, Month::parse("2026-11").unwrap())
        .await
        .unwrap();
    assert_eq!(statement.opening_balance, Nanos::ZERO);
    assert_eq!(statement.lines.len(), 3, "{statement:?}");
    assert!(
        matches!(&statement.lines[0], StatementLine::Credit { amount, .. } if *amount == Nanos(1_000_000_000))
    );
    match (&statement.lines[1], &statement.lines[2]) {
        (
            StatementLine::Usage {
                price: p1,
                requests: n1,
                amount: a1,
                ..
            },
            StatementLine::Usage {
                price: p2,
                requests: n2,
                amount: a2,
                ..
            },
        ) => {
            assert_eq!(
                (p1, *n1, *a1),
                (&v1, 2, Nanos(-2 * cost(1000, 1000, &v1).0))
            );
            assert_eq!((p2, *n2, *a2), (&v2, 1, Nanos(-cost(1000, 1000, &v2).0)));
        }
        other => panic!("expected two usage lines, got {other:?}"),
    }
    let sum: i64 = statement.lines.iter().map(|l| l.amount().0).sum();
    assert_eq!(
        statement.opening_balance.0 + sum,
        statement.closing_balance.0
    );
    assert_eq!(
        statement.closing_balance,
        f.ledger.account(&f.tenant).await.unwrap().balance
    );

    // Next month opens where this one closed.
    let december = f
        .ledger
        .statement(&f.tenant, Month::parse("2026-12").unwrap())
        .await
        .unwrap();
    assert_eq!(december.opening_balance, statement.closing_balance);
    assert!(december.lines.is_empty());
}
both_stores!(price_change_mid_month_on, price_change_mid_month);

async fn crash_recovery(db: Arc<TestDb>) {
    let options = |replica: &str| tidepool_ledger::LedgerOptions {
        replica_id: replica.to_owned(),
        clock: db.clock.clone(),
        ..tidepool_ledger::LedgerOptions::default()
    };
    let a = Ledger::connect_with(&db.url, options("a")).await.unwrap();
    let f = fixture(a.clone(), Nanos(1_000_000_000)).await;
    let streamed = f.ledger.reserve(&f.request(100, 100)).await.unwrap();
    let silent = f.ledger.reserve(&f.request(100, 100)).await.unwrap();
    let done = f.ledger.reserve(&f.request(100, 100)).await.unwrap();
    f.ledger.checkpoint(streamed.request_id, 10).await.unwrap();
    f.ledger.checkpoint(streamed.request_id, 40).await.unwrap();
    f.ledger.checkpoint(streamed.request_id, 30).await.unwrap(); // never moves back
    f.ledger
        .settle(&f.entry(done.request_id, 100, 100))
        .await
        .unwrap();

    let b = Ledger::connect_with(&db.url, options("b")).await.unwrap();
    let mut elsewhere = f.request(100, 100);
    elsewhere.request_id = RequestId::new();
    let other = b.reserve(&elsewhere).await.unwrap();

    // "Crash" replica a: its handles go away; a new process with the same replica id recovers.
    drop(f.ledger);
    drop(a);
    db.clock.advance(1_000);
    let a2 = Ledger::connect_with(&db.url, options("a")).await.unwrap();
    let report = a2.recover().await.unwrap();
    assert_eq!(
        (report.settled, report.voided, report.already_resolved),
        (1, 1, 0)
    );
    let price = price_v(0, INPUT, OUTPUT);
    let billed = a2.billed_usage(streamed.request_id).await.unwrap().unwrap();
    assert_eq!(billed.cost, cost(100, 40, &price));
    assert_eq!(
        billed.entry.status,
        UsageStatus::Error {
            code: "interrupted".to_owned()
        }
    );
    assert_eq!(
        a2.billed_usage(silent.request_id)
            .await
            .unwrap()
            .unwrap()
            .cost,
        Nanos::ZERO
    );

    // Replica b's open reservation is not a's to resolve; only once stale.
    let tenant = TenantId::new("acme").unwrap();
    assert_eq!(a2.account(&tenant).await.unwrap().reserved, other.hold);
    assert_eq!(
        a2.recover_stale(Duration::from_hours(1))
            .await
            .unwrap()
            .voided,
        0
    );
    db.clock.advance(3_600_001);
    assert_eq!(
        a2.recover_stale(Duration::from_hours(1))
            .await
            .unwrap()
            .voided,
        1
    );
    // b settling late after recovery bills nothing more.
    let late = b
        .settle(&UsageEntry {
            request_id: other.request_id,
            ..billed.entry.clone()
        })
        .await
        .unwrap();
    assert!(!late.first);

    let account = a2.account(&tenant).await.unwrap();
    assert_eq!(account.reserved, Nanos::ZERO);
    let expected = 1_000_000_000 - cost(100, 40, &price).0 - cost(100, 100, &price).0;
    assert_eq!(account.balance, Nanos(expected));
    let statement = a2.statement(&tenant, Month::of_ms(T0_MS)).await.unwrap();
    assert_eq!(statement.closing_balance, account.balance);
}
both_stores!(crash_recovery_on, crash_recovery);

async fn rate_limits(db: Arc<TestDb>) {
    let f = fixture(db.ledger().await, Nanos(1_000_000_000)).await;
    // Start at a window boundary so the test does not straddle two windows.
    db.clock.advance(60_000 - T0_MS.rem_euclid(60_000));
    let key_scope = RateScope::Key {
        key_id: f.key_id.clone(),
    };
    f.ledger
        .set_rate_limits(
            &key_scope,
            RateLimits {
                requests_per_minute: Some(3),
                tokens_per_minute: None,
            },
            &AuditContext::ADMIN,
        )
        .await
        .unwrap();
    for remaining in [2, 1, 0] {
        let r = f.ledger.reserve(&f.request(10, 10)).await.unwrap();
        let window = r.rate_limits.requests.unwrap();
        assert_eq!(
            (window.limit, window.remaining, window.reset_ms),
            (3, remaining, 60_000)
        );
    }
    let err = f.ledger.reserve(&f.request(10, 10)).await.unwrap_err();
    assert!(
        matches!(
            err,
            LedgerError::RateLimited {
                kind: RateKind::Requests,
                retry_after_ms: 60_000,
                ..
            }
        ),
        "{err:?}"
    );
    // The refused request took nothing.
    assert_eq!(
        f.ledger.account(&f.tenant).await.unwrap().reserved.0,
        3 * cost(10, 10, &price_v(0, INPUT, OUTPUT)).0
    );
    db.clock.advance(60_000);
    f.ledger.reserve(&f.request(10, 10)).await.unwrap();

    // Tokens per minute on the model, counted at admission as prompt + max completion.
    let model_scope = RateScope::Model {
        model: f.model.clone(),
    };
    f.ledger
        .set_rate_limits(
            &model_scope,
            RateLimits {
                requests_per_minute: None,
                tokens_per_minute: Some(1000),
            },
            &AuditContext::ADMIN,
        )
        .await
        .unwrap();
    f.ledger
        .set_rate_limits(&key_scope, RateLimits::default(), &AuditContext::ADMIN)
        .await
        .unwrap();
    db.clock.advance(60_000);
    let r = f.ledger.reserve(&f.request(300, 300)).await.unwrap();
    assert_eq!(r.rate_limits.tokens.unwrap().remaining, 400);
    let err = f.ledger.reserve(&f.request(300, 300)).await.unwrap_err();
    assert!(
        matches!(
            err,
            LedgerError::RateLimited {
                kind: RateKind::Tokens,
                ..
            }
        ),
        "{err:?}"
    );
    f.ledger.reserve(&f.request(200, 200)).await.unwrap();
}
both_stores!(rate_limits_on, rate_limits);

/// A change names only the limits it changes; the others stay as they are.
async fn rate_limit_changes_merge(db: Arc<TestDb>) {
    let f = fixture(db.ledger().await, Nanos(1_000_000_000)).await;
    let scope = RateScope::Project {
        tenant: f.tenant.clone(),
        project: ProjectId::default_project(),
    };
    assert_eq!(
        f.ledger.rate_limits(&scope).await.unwrap(),
        RateLimits::default()
    );
    let change = |rpm, tpm| RateLimitsChange {
        requests_per_minute: rpm,
        tokens_per_minute: tpm,
    };
    let limits = |rpm, tpm| RateLimits {
        requests_per_minute: rpm,
        tokens_per_minute: tpm,
    };
    let steps = [
        (change(Some(Some(60)), None), limits(Some(60), None)),
        (change(None, Some(Some(1000))), limits(Some(60), Some(1000))),
        (change(Some(Some(30)), None), limits(Some(30), Some(1000))),
        (change(Some(None), None), limits(None, Some(1000))),
        (change(None, None), limits(None, Some(1000))),
        (change(Some(Some(5)), Some(None)), limits(Some(5), None)),
    ];
    for (step, expected) in steps {
        let now = f
            .ledger
            .change_rate_limits(&scope, step, &AuditContext::ADMIN)
            .await
            .unwrap();
        assert_eq!(now, expected, "{step:?}");
        assert_eq!(f.ledger.rate_limits(&scope).await.unwrap(), expected);
    }
    // A first change of a scope leaves the unnamed limit unlimited.
    let model = RateScope::Model {
        model: f.model.clone(),
    };
    let now = f
        .ledger
        .change_rate_limits(&model, change(None, Some(Some(7))), &AuditContext::ADMIN)
        .await
        .unwrap();
    assert_eq!(now, limits(None, Some(7)));
}
both_stores!(rate_limit_changes_merge_on, rate_limit_changes_merge);

async fn finish_kinds_roundtrip(db: Arc<TestDb>) {
    let f = fixture(db.ledger().await, Nanos(1_000_000_000)).await;
    let r = f.ledger.reserve(&f.request(5, 5)).await.unwrap();
    let s = f
        .ledger
        .finish(&f.entry(r.request_id, 5, 5), Finish::Void)
        .await
        .unwrap();
    assert_eq!(s.state, ReservationState::Voided);
}
both_stores!(finish_kinds_roundtrip_on, finish_kinds_roundtrip);

/// `tidepool bench ledger` runs end to end (a smoke check, not a measurement).
async fn bench_settles_smoke(db: Arc<TestDb>) {
    let result = tidepool_ledger::bench_settles(&db.url, 50, 8)
        .await
        .unwrap();
    assert_eq!((result.settles, result.concurrency), (50, 8));
    assert!(result.settles_per_second > 0);
    assert!(matches!(
        tidepool_ledger::bench_settles(&db.url, 0, 8).await,
        Err(LedgerError::OutOfRange { .. })
    ));
}
both_stores!(bench_settles_smoke_on, bench_settles_smoke);

/// `usage_summary` sees only its scope: tenant, project or key, and month.
async fn usage_scopes(db: Arc<TestDb>) {
    let f = fixture(db.ledger().await, Nanos(1_000_000_000)).await;
    let team = ProjectId::new("team").unwrap();
    f.ledger
        .create_project(&f.tenant, &team, &AuditContext::ADMIN)
        .await
        .unwrap();
    let team_key = f
        .ledger
        .create_key_in_project(&f.tenant, &team, "ci", &AuditContext::ADMIN)
        .await
        .unwrap();
    let price = price_v(0, INPUT, OUTPUT);

    let r1 = f.ledger.reserve(&f.request(100, 100)).await.unwrap();
    f.ledger
        .settle(&f.entry(r1.request_id, 100, 50))
        .await
        .unwrap();
    let mut via_team = f.request(10, 10);
    via_team.key_id = team_key.record.key_id.clone();
    let r2 = f.ledger.reserve(&via_team).await.unwrap();
    assert_eq!(r2.project, team);
    let mut entry = f.entry(r2.request_id, 10, 10);
    entry.key_id = team_key.record.key_id.clone();
    f.ledger.settle(&entry).await.unwrap();
    // Another tenant's usage never shows up.
    let other = fixture_other_tenant(&f.ledger).await;
    let r3 = f.ledger.reserve(&other).await.unwrap();
    assert_ne!(r3.tenant, f.tenant);

    let tenant_usage = f
        .ledger
        .usage_summary(&tidepool_ledger::UsageScope::Tenant(f.tenant.clone()), None)
        .await
        .unwrap();
    assert_eq!(tenant_usage.len(), 1);
    assert_eq!(
        (tenant_usage[0].requests, tenant_usage[0].prompt_tokens),
        (2, 110)
    );
    assert_eq!(
        tenant_usage[0].cost.0,
        cost(100, 50, &price).0 + cost(10, 10, &price).0
    );
    let team_usage = f
        .ledger
        .usage_summary(
            &tidepool_ledger::UsageScope::Project {
                tenant: f.tenant.clone(),
                project: team,
            },
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        (team_usage[0].requests, team_usage[0].cost),
        (1, cost(10, 10, &price))
    );
    let key_usage = f
        .ledger
        .usage_summary(
            &tidepool_ledger::UsageScope::Key {
                tenant: f.tenant.clone(),
                key_id: f.key_id.clone(),
            },
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        (key_usage[0].requests, key_usage[0].completion_tokens),
        (1, 50)
    );
    // A key id under the wrong tenant sees nothing.
    let foreign = tidepool_ledger::UsageScope::Key {
        tenant: r3.tenant.clone(),
        key_id: f.key_id.clone(),
    };
    assert!(
        f.ledger
            .usage_summary(&foreign, None)
            .await
            .unwrap()
            .is_empty()
    );
    let december = Month::parse("2026-12").unwrap();
    let scope = tidepool_ledger::UsageScope::Tenant(f.tenant.clone());
    assert!(
        f.ledger
            .usage_summary(&scope, Some(december))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        f.ledger
            .usage_summary(&scope, Some(Month::of_ms(T0_MS)))
            .await
            .unwrap()
            .len(),
        1
    );
}
both_stores!(usage_scopes_on, usage_scopes);

async fn fixture_other_tenant(ledger: &Ledger) -> ReserveRequest {
    let globex = TenantId::new("globex").unwrap();
    ledger
        .create_tenant(&globex, Currency::USD, &AuditContext::ADMIN)
        .await
        .unwrap();
    ledger
        .credit(&globex, Nanos(1_000_000), "prepaid", &AuditContext::ADMIN)
        .await
        .unwrap();
    let key = ledger
        .create_key(&globex, "k", &AuditContext::ADMIN)
        .await
        .unwrap();
    ReserveRequest {
        request_id: RequestId::new(),
        key_id: key.record.key_id,
        model: ModelId::new(MODEL).unwrap(),
        prompt_tokens: 1,
        completion_tokens_max: 1,
        idempotency_key: None,
        class: tidepool_ledger::ReserveClass::Online,
    }
}

/// Cached prompt tokens a backend did not report are stored as unknown (0 and a flag), billed
/// as uncached input, and counted apart in the usage summary and the statement; known cached
/// tokens are billed at the cached-input price, and both reports price their share.
async fn cached_tokens_known_and_unknown(db: Arc<TestDb>) {
    let f = fixture(db.ledger().await, Nanos(1_000_000_000)).await;
    let price = price_v(0, INPUT, OUTPUT);

    let known = f.ledger.reserve(&f.request(1000, 200)).await.unwrap();
    let mut known_entry = f.entry(known.request_id, 1000, 100);
    known_entry.cached_prompt_tokens = 400;
    let settled = f.ledger.settle(&known_entry).await.unwrap();
    let cached_tokens = BilledTokens {
        prompt_tokens: 1000,
        cached_prompt_tokens: 400,
        completion_tokens: 100,
    };
    assert_eq!(settled.cost, cost_of(cached_tokens, &price).unwrap());
    // 400 cached tokens cost (50 − 25) nano-USD each less than uncached ones.
    assert_eq!(cost(1000, 100, &price).0 - settled.cost.0, 400 * 25);

    let unknown = f.ledger.reserve(&f.request(1000, 200)).await.unwrap();
    let mut unknown_entry = f.entry(unknown.request_id, 1000, 100);
    unknown_entry.cached_prompt_tokens_unknown = true;
    let settled = f.ledger.settle(&unknown_entry).await.unwrap();
    assert_eq!(settled.cost, cost(1000, 100, &price), "billed as uncached");
    let billed = f
        .ledger
        .billed_usage(unknown.request_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(billed.entry, unknown_entry);
    assert!(billed.entry.cached_prompt_tokens_unknown);
    let billed = f
        .ledger
        .billed_usage(known.request_id)
        .await
        .unwrap()
        .unwrap();
    assert!(!billed.entry.cached_prompt_tokens_unknown);

    // A money-free entry keeps the flag too.
    let mut free = f.entry(RequestId::new(), 7, 0);
    free.cached_prompt_tokens_unknown = true;
    assert!(f.ledger.record_usage(&free).await.unwrap());
    assert_eq!(
        f.ledger.usage_entry(free.request_id).await.unwrap(),
        Some(free)
    );

    let summary = f
        .ledger
        .usage_summary(&tidepool_ledger::UsageScope::Tenant(f.tenant.clone()), None)
        .await
        .unwrap();
    assert_eq!(summary.len(), 1, "{summary:?}");
    let row = &summary[0];
    assert_eq!(
        (
            row.requests,
            row.prompt_tokens,
            row.cached_prompt_tokens,
            row.cached_unknown_requests
        ),
        (3, 2007, 400, 2)
    );
    assert_eq!(row.cached_input_cost, Nanos(400 * CACHED / 1_000_000));

    let statement = f
        .ledger
        .statement(&f.tenant, Month::parse("2026-11").unwrap())
        .await
        .unwrap();
    let usage: Vec<_> = statement
        .lines
        .iter()
        .filter_map(|line| match line {
            StatementLine::Usage {
                requests,
                cached_prompt_tokens,
                cached_unknown_requests,
                cached_input_cost,
                ..
            } => Some((
                *requests,
                *cached_prompt_tokens,
                *cached_unknown_requests,
                *cached_input_cost,
            )),
            StatementLine::Credit { .. } => None,
        })
        .collect();
    assert_eq!(usage, [(2, 400, 1, Nanos(10_000))]);
}
both_stores!(
    cached_tokens_known_and_unknown_on,
    cached_tokens_known_and_unknown
);
