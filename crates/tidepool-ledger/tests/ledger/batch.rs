// Group commit: a batch of reservations decides exactly what one-by-one reservations in the
// same order decide, and a settle batch decides its commands in order.
//
// A seeded ChaCha8 RNG draws the interleaved requests of many clients — three tenants (one whose
// account is in another currency than the prices), two projects, five keys (one revoked, one
// that does not exist), three models (one without a price), key and project budgets, RPM/TPM
// limits on a key, a project and a model, idempotency keys from a pool, reused request ids,
// holds that often do not fit — and cuts them into batches of 1 to 48. The same sequence runs
// on two fresh databases of one store: on one each batch is applied by the reserve writer's
// batch path (`reserve_in_one_batch`: one transaction, and no falling back to one by one, so a
// batch the database's own checks refuse fails the test), on the other request by request
// (`reserve`, each its own transaction). Between batches both get the same settles, voids,
// credits and clock steps (some across a rate window or a month). Every outcome (the granted
// reservation, or the error with its fields) and, after every batch, every account and budget
// must be equal. Replay one seed with TIDEPOOL_SEED=<seed>.

#![expect(clippy::too_many_lines, reason = "one scenario, read top to bottom")]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tidepool_core::{Currency, KeyId, ModelId, Nanos, RequestId, TenantId};
use tidepool_ledger::{
    AuditContext, BudgetScope, Finish, Ledger, LedgerError, ProjectId, RESERVE_BATCH_LEN_MAX,
    RateLimits, RateScope, Reservation, ReservationState, ReserveRequest, UsageEntry, UsageStatus,
};

use crate::billing::{CACHED, INPUT, OUTPUT, price_v};
use crate::both_stores;
use crate::common::{T0_MS, TestDb, run};

const REQUESTS_PER_SEED: usize = 400;
const BATCH_LEN_MAX: usize = 48;
const DEFAULT_SEEDS: [u64; 2] = [3, 20_261_206];
const _: () = assert!(BATCH_LEN_MAX <= RESERVE_BATCH_LEN_MAX);

const MODELS: [&str; 3] = ["smollm2-135m-instruct", "gemma-3-270m", "unpriced-model"];
/// Idempotency keys are drawn from a pool of this many, so some are reused.
const IDEMPOTENCY_KEYS_LEN: u32 = 60;

fn seeds() -> Vec<u64> {
    match std::env::var("TIDEPOOL_SEED") {
        Ok(seed) => vec![seed.parse().expect("TIDEPOOL_SEED is a u64")],
        Err(_) => DEFAULT_SEEDS.to_vec(),
    }
}

/// One database's world: its ledger and its key ids (random per database), by index.
struct World {
    ledger: Ledger,
    db: Arc<TestDb>,
    keys: Vec<KeyId>,
}

fn tenant(name: &str) -> TenantId {
    TenantId::new(name).unwrap()
}

/// The same tenants, keys, prices, budgets and limits on a fresh database.
async fn world(db: Arc<TestDb>) -> World {
    let ledger = db.ledger().await;
    let (acme, globex, euro) = (tenant("acme"), tenant("globex"), tenant("euro"));
    ledger
        .create_tenant(&acme, Currency::USD, &AuditContext::ADMIN)
        .await
        .unwrap();
    ledger
        .create_tenant(&globex, Currency::USD, &AuditContext::ADMIN)
        .await
        .unwrap();
    ledger
        .create_tenant(&euro, Currency::parse("EUR").unwrap(), &AuditContext::ADMIN)
        .await
        .unwrap();
    ledger
        .credit(&acme, Nanos(20_000_000), "prepaid", &AuditContext::ADMIN)
        .await
        .unwrap();
    ledger
        .credit(&globex, Nanos(2_500_000), "prepaid", &AuditContext::ADMIN)
        .await
        .unwrap();
    ledger
        .credit(&euro, Nanos(5_000_000), "prepaid", &AuditContext::ADMIN)
        .await
        .unwrap();
    ledger
        .set_price(&price_v(0, INPUT, OUTPUT), &AuditContext::ADMIN)
        .await
        .unwrap();
    let mut gemma = price_v(0, 80_000_000, 300_000_000);
    gemma.model = ModelId::new(MODELS[1]).unwrap();
    gemma.cached_input_per_mtok = Nanos(CACHED);
    ledger
        .set_price(&gemma, &AuditContext::ADMIN)
        .await
        .unwrap();
    let analytics = ProjectId::new("analytics").unwrap();
    ledger
        .create_project(&acme, &analytics, &AuditContext::ADMIN)
        .await
        .unwrap();
    let mut keys = Vec::new();
    for (t, project) in [
        (&acme, ProjectId::default_project()),
        (&acme, analytics.clone()),
        (&globex, ProjectId::default_project()),
        (&euro, ProjectId::default_project()),
        (&acme, ProjectId::default_project()),
    ] {
        let key = ledger
            .create_key_in_project(t, &project, "client", &AuditContext::ADMIN)
            .await
            .unwrap();
        keys.push(key.record.key_id);
    }
    ledger
        .revoke_key(&keys[4], &AuditContext::ADMIN)
        .await
        .unwrap();
    // A key id no database knows.
    keys.push(KeyId("nosuchkey000".to_owned()));
    ledger
        .set_budget(
            &BudgetScope::Key {
                key_id: keys[0].clone(),
            },
            Some(Nanos(7_000_000)),
            &AuditContext::ADMIN,
        )
        .await
        .unwrap();
    ledger
        .set_budget(
            &BudgetScope::Project {
                tenant: acme.clone(),
                project: analytics.clone(),
            },
            Some(Nanos(4_000_000)),
            &AuditContext::ADMIN,
        )
        .await
        .unwrap();
    let limits = [
        (
            RateScope::Key {
                key_id: keys[1].clone(),
            },
            Some(9),
            None,
        ),
        (
            RateScope::Project {
                tenant: acme,
                project: ProjectId::default_project(),
            },
            Some(40),
            Some(90_000),
        ),
        (
            RateScope::Model {
                model: ModelId::new(MODELS[1]).unwrap(),
            },
            None,
            Some(30_000),
        ),
    ];
    for (scope, rpm, tpm) in limits {
        ledger
            .set_rate_limits(
                &scope,
                RateLimits {
                    requests_per_minute: rpm,
                    tokens_per_minute: tpm,
                },
                &AuditContext::ADMIN,
            )
            .await
            .unwrap();
    }
    World { ledger, db, keys }
}

/// A request as drawn: the key by index, so each database gets its own key id.
#[derive(Debug, Clone)]
struct Drawn {
    request_id: RequestId,
    key: usize,
    model: usize,
    prompt_tokens: u32,
    completion_tokens_max: u32,
    idempotency_key: Option<String>,
}

impl World {
    fn request(&self, drawn: &Drawn) -> ReserveRequest {
        ReserveRequest {
            request_id: drawn.request_id,
            key_id: self.keys[drawn.key].clone(),
            model: ModelId::new(MODELS[drawn.model]).unwrap(),
            prompt_tokens: drawn.prompt_tokens,
            completion_tokens_max: drawn.completion_tokens_max,
            idempotency_key: drawn.idempotency_key.clone(),
            class: tidepool_ledger::ReserveClass::Online,
        }
    }

    /// A result as text with this world's key ids replaced by their index, so two worlds'
    /// results compare equal when they agree.
    fn normalized(&self, result: &Result<Reservation, LedgerError>) -> String {
        let mut text = format!("{result:?}");
        for (index, key) in self.keys.iter().enumerate() {
            text = text.replace(&key.0, &format!("<key {index}>"));
        }
        text
    }

    async fn state(&self) -> String {
        let mut out = String::new();
        for name in ["acme", "globex", "euro"] {
            let account = self.ledger.account(&tenant(name)).await.unwrap();
            writeln!(
                out,
                "{name}: balance {} reserved {}",
                account.balance.0, account.reserved.0
            )
            .unwrap();
        }
        let scopes = [
            BudgetScope::Key {
                key_id: self.keys[0].clone(),
            },
            BudgetScope::Key {
                key_id: self.keys[1].clone(),
            },
            BudgetScope::Project {
                tenant: tenant("acme"),
                project: ProjectId::new("analytics").unwrap(),
            },
            BudgetScope::Project {
                tenant: tenant("acme"),
                project: ProjectId::default_project(),
            },
            BudgetScope::Project {
                tenant: tenant("globex"),
                project: ProjectId::default_project(),
            },
        ];
        for (index, scope) in scopes.iter().enumerate() {
            let budget = self.ledger.budget(scope).await.unwrap();
            writeln!(
                out,
                "budget {index}: limit {:?} reserved {} spent {}",
                budget.limit, budget.reserved.0, budget.spent.0
            )
            .unwrap();
        }
        out
    }
}

fn entry(reservation: &Reservation, completion_tokens: u32) -> UsageEntry {
    UsageEntry {
        request_id: reservation.request_id,
        tenant: reservation.tenant.clone(),
        key_id: reservation.key_id.clone(),
        model: Some(reservation.price.model.clone()),
        endpoint: "chat.completions".to_owned(),
        prompt_tokens: 10,
        completion_tokens,
        cached_prompt_tokens: 0,
        cached_prompt_tokens_unknown: false,
        status: UsageStatus::Ok,
        latency_ms: 3,
        created_at_ms: T0_MS,
    }
}

fn outcome_kind(result: &Result<Reservation, LedgerError>) -> &'static str {
    match result {
        Ok(_) => "granted",
        Err(LedgerError::InsufficientQuota { .. }) => "insufficient_quota",
        Err(LedgerError::RateLimited { .. }) => "rate_limited",
        Err(LedgerError::DuplicateRequest { .. }) => "duplicate_request",
        Err(LedgerError::IdempotencyKeyReused { .. }) => "idempotency_key_reused",
        Err(LedgerError::KeyRevoked { .. }) => "key_revoked",
        Err(LedgerError::KeyNotFound { .. }) => "key_not_found",
        Err(LedgerError::PriceNotFound { .. }) => "price_not_found",
        Err(LedgerError::CurrencyMismatch { .. }) => "currency_mismatch",
        Err(_) => "other",
    }
}

fn draw(rng: &mut ChaCha8Rng, earlier: &[RequestId]) -> Drawn {
    // Mostly fresh request ids; sometimes one used before (granted or refused, this batch or
    // an earlier one).
    let request_id = if !earlier.is_empty() && rng.random_bool(0.06) {
        earlier[rng.random_range(0..earlier.len())]
    } else {
        RequestId::new()
    };
    Drawn {
        request_id,
        // Keys 0–2 most of the time; 3 (other currency), 4 (revoked), 5 (unknown) sometimes.
        key: match rng.random_range(0..100u32) {
            0..=34 => 0,
            35..=64 => 1,
            65..=89 => 2,
            90..=93 => 3,
            94..=96 => 4,
            _ => 5,
        },
        model: match rng.random_range(0..100u32) {
            0..=59 => 0,
            60..=96 => 1,
            _ => 2,
        },
        prompt_tokens: rng.random_range(0..800),
        completion_tokens_max: rng.random_range(0..800),
        idempotency_key: rng
            .random_bool(0.1)
            .then(|| format!("order-{}", rng.random_range(0..IDEMPOTENCY_KEYS_LEN))),
    }
}

async fn batch_equals_one_by_one(db_batched: Arc<TestDb>) {
    let kind = db_batched.kind;
    run(kind, move |db_single| async move {
        let batched = world(db_batched).await;
        let single = world(db_single).await;
        for seed in seeds() {
            println!("reservation batches: seed {seed} on {kind:?} (replay: TIDEPOOL_SEED={seed})");
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut earlier: Vec<RequestId> = Vec::new();
            // Granted in both (they must agree), by request id: what to settle later.
            let mut open: BTreeMap<RequestId, (Reservation, Reservation)> = BTreeMap::new();
            let mut drawn_total = 0;
            let mut batch_index = 0;
            // Which outcomes the seed produced: the comparison means little without refusals
            // of every kind next to grants.
            let mut seen: BTreeMap<&'static str, u32> = BTreeMap::new();
            while drawn_total < REQUESTS_PER_SEED {
                let len = rng.random_range(1..=BATCH_LEN_MAX);
                let drawn: Vec<Drawn> = (0..len)
                    .map(|_| {
                        let d = draw(&mut rng, &earlier);
                        earlier.push(d.request_id);
                        d
                    })
                    .collect();
                drawn_total += len;
                let ctx = format!("seed {seed} batch {batch_index} ({len} requests)");

                let requests: Vec<ReserveRequest> =
                    drawn.iter().map(|d| batched.request(d)).collect();
                let as_batch = batched
                    .ledger
                    .reserve_in_one_batch(&requests)
                    .await
                    .unwrap();
                let mut one_by_one = Vec::new();
                for d in &drawn {
                    one_by_one.push(single.ledger.reserve(&single.request(d)).await);
                }
                assert_eq!(as_batch.len(), len, "{ctx}");
                let mut granted = 0;
                for (i, (b, s)) in as_batch.iter().zip(&one_by_one).enumerate() {
                    assert_eq!(
                        batched.normalized(b),
                        single.normalized(s),
                        "{ctx}: request {i} ({:?})",
                        drawn[i]
                    );
                    *seen.entry(outcome_kind(b)).or_default() += 1;
                    if let (Ok(b), Ok(s)) = (b, s) {
                        granted += 1;
                        open.insert(b.request_id, (b.clone(), s.clone()));
                    }
                }
                println!("{ctx}: {granted} granted");
                assert_eq!(batched.state().await, single.state().await, "{ctx}: state");

                // The same settles, voids, credits and clock steps on both.
                let settle_count = rng.random_range(0..=open.len().min(30));
                for _ in 0..settle_count {
                    let index = rng.random_range(0..open.len());
                    let id = *open.keys().nth(index).unwrap();
                    let (b, s) = open.remove(&id).unwrap();
                    let completion = rng.random_range(0..500);
                    let void = rng.random_bool(0.2);
                    let (rb, rs) = if void {
                        (
                            batched.ledger.void(&entry(&b, 0)).await,
                            single.ledger.void(&entry(&s, 0)).await,
                        )
                    } else {
                        (
                            batched.ledger.settle(&entry(&b, completion)).await,
                            single.ledger.settle(&entry(&s, completion)).await,
                        )
                    };
                    assert_eq!(format!("{rb:?}"), format!("{rs:?}"), "{ctx}: settle");
                }
                if rng.random_bool(0.1) {
                    let amount = Nanos(rng.random_range(1..1_500_000));
                    let name = ["acme", "globex", "euro"][rng.random_range(0..3)];
                    batched
                        .ledger
                        .credit(&tenant(name), amount, "top-up", &AuditContext::ADMIN)
                        .await
                        .unwrap();
                    single
                        .ledger
                        .credit(&tenant(name), amount, "top-up", &AuditContext::ADMIN)
                        .await
                        .unwrap();
                }
                // Mostly small steps; sometimes past the rate window; rarely into the next month.
                let step_ms = match rng.random_range(0..100u32) {
                    0..=79 => rng.random_range(0..3_000),
                    80..=97 => 60_000,
                    _ => 16 * 24 * 3_600_000,
                };
                batched.db.clock.advance(step_ms);
                single.db.clock.advance(step_ms);
                batch_index += 1;
            }
            println!("seed {seed}: outcomes {seen:?}");
            for kind in [
                "granted",
                "insufficient_quota",
                "rate_limited",
                "duplicate_request",
            ] {
                assert!(
                    seen.contains_key(kind),
                    "seed {seed} never produced {kind}: {seen:?}"
                );
            }
        }
    })
    .await;
}
both_stores!(batch_equals_one_by_one_on, batch_equals_one_by_one);

async fn batch_refusals_take_nothing(db: Arc<TestDb>) {
    // One batch: a fitting request, one that does not fit the balance, a duplicate request id,
    // a reused idempotency key, one past the key's RPM, then another fitting request. Only the
    // refused ones fail, each with its own error, and they take nothing.
    let w = world(db).await;
    let r = |key: usize, prompt: u32, idem: Option<&str>| Drawn {
        request_id: RequestId::new(),
        key,
        model: 0,
        prompt_tokens: prompt,
        completion_tokens_max: 100,
        idempotency_key: idem.map(str::to_owned),
    };
    let first = r(2, 100, Some("order-1"));
    let mut duplicate = r(2, 100, None);
    duplicate.request_id = first.request_id;
    let drawn = [
        first.clone(),
        r(2, 1_000_000, None),
        duplicate,
        r(2, 100, Some("order-1")),
        r(2, 100, None),
    ];
    let requests: Vec<ReserveRequest> = drawn.iter().map(|d| w.request(d)).collect();
    let results = w.ledger.reserve_in_one_batch(&requests).await.unwrap();
    let hold = results[0].as_ref().unwrap().hold;
    assert!(matches!(
        results[1],
        Err(LedgerError::InsufficientQuota { needed, .. }) if needed > Nanos(2_500_000)
    ));
    assert!(matches!(
        results[2],
        Err(LedgerError::DuplicateRequest { request_id }) if request_id == first.request_id
    ));
    assert!(matches!(
        &results[3],
        Err(LedgerError::IdempotencyKeyReused { original_request_id, .. })
            if *original_request_id == first.request_id
    ));
    let last = results[4].as_ref().unwrap();
    let account = w.ledger.account(&tenant("globex")).await.unwrap();
    assert_eq!(account.reserved.0, hold.0 + last.hold.0);

    // Key 1 allows 9 requests a minute: the tenth of one batch is refused, rate limited.
    let drawn: Vec<Drawn> = (0..10).map(|_| r(1, 10, None)).collect();
    let requests: Vec<ReserveRequest> = drawn.iter().map(|d| w.request(d)).collect();
    let results = w.ledger.reserve_in_one_batch(&requests).await.unwrap();
    for (i, result) in results.iter().enumerate().take(9) {
        let reservation = result.as_ref().unwrap();
        let remaining = reservation.rate_limits.requests.unwrap().remaining;
        assert_eq!(remaining, 8 - u32::try_from(i).unwrap());
    }
    assert!(matches!(
        results[9],
        Err(LedgerError::RateLimited { limit: 9, .. })
    ));
}
both_stores!(batch_refusals_take_nothing_on, batch_refusals_take_nothing);

async fn settle_batch_decides_in_order(db: Arc<TestDb>) {
    // One settle batch decides its commands in order, as one by one would: a command whose
    // entry is invalid fails while its reservation is open and gets the first outcome once an
    // earlier command of the batch resolved it; a request finished twice counts once; an
    // unknown request is not found; a request resolved before the batch answers `first: false`
    // whatever the command. A command that does not match its reservation (another key) fails
    // alone and moves nothing.
    let one = world(db).await;
    let drawn = |key: usize| Drawn {
        request_id: RequestId::new(),
        key,
        model: 0,
        prompt_tokens: 10,
        completion_tokens_max: 10,
        idempotency_key: None,
    };
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(one.ledger.reserve(&one.request(&drawn(0))).await.unwrap());
    }
    let [res_a, res_b, res_c, res_d, res_e] = <[Reservation; 5]>::try_from(held).unwrap();
    let settled_before = one.ledger.settle(&entry(&res_c, 3)).await.unwrap();
    let invalid = |r: &Reservation| {
        let mut bad = entry(r, 1);
        bad.endpoint = String::new();
        bad
    };
    let mut unknown = entry(&res_a, 1);
    unknown.request_id = RequestId::new();
    let items = [
        (invalid(&res_a), Finish::Settle),
        (entry(&res_a, 5), Finish::Settle),
        (invalid(&res_a), Finish::Void),
        (entry(&res_b, 0), Finish::Void),
        (entry(&res_b, 7), Finish::Settle),
        (unknown, Finish::Settle),
        (invalid(&res_c), Finish::Settle),
        (invalid(&res_d), Finish::Settle),
    ];
    let results = one.ledger.finish_in_one_batch(&items).await.unwrap();
    assert!(matches!(results[0], Err(LedgerError::OutOfRange { .. })));
    let settled_a = results[1].as_ref().unwrap();
    assert_eq!(
        (settled_a.state, settled_a.first),
        (ReservationState::Settled, true)
    );
    let again_a = results[2].as_ref().unwrap();
    assert_eq!(
        (again_a.state, again_a.first, again_a.cost),
        (ReservationState::Settled, false, settled_a.cost)
    );
    let voided_b = results[3].as_ref().unwrap();
    assert_eq!(
        (voided_b.state, voided_b.first, voided_b.cost),
        (ReservationState::Voided, true, Nanos::ZERO)
    );
    let again_b = results[4].as_ref().unwrap();
    assert_eq!(
        (again_b.state, again_b.first),
        (ReservationState::Voided, false)
    );
    assert!(matches!(
        results[5],
        Err(LedgerError::ReservationNotFound { .. })
    ));
    let again_c = results[6].as_ref().unwrap();
    assert_eq!((again_c.first, again_c.cost), (false, settled_before.cost));
    assert!(matches!(results[7], Err(LedgerError::OutOfRange { .. })));
    let acme = one.ledger.account(&tenant("acme")).await.unwrap();
    assert_eq!(
        acme.reserved,
        Nanos(res_d.hold.0 + res_e.hold.0),
        "d and e stay open"
    );

    // A command for e under another key: the batch is refused as a whole (nothing moves; the
    // writer then applies its commands one by one), and alone it fails with its own error.
    let mut wrong = entry(&res_e, 1);
    wrong.key_id = one.keys[1].clone();
    let refused = one
        .ledger
        .finish_in_one_batch(&[
            (wrong.clone(), Finish::Settle),
            (entry(&res_e, 1), Finish::Settle),
        ])
        .await;
    assert!(matches!(
        refused,
        Err(LedgerError::ReservationMismatch { .. })
    ));
    let alone = one
        .ledger
        .finish_in_one_batch(&[(wrong, Finish::Settle)])
        .await
        .unwrap();
    assert!(matches!(
        alone[0],
        Err(LedgerError::ReservationMismatch { .. })
    ));
    let acme = one.ledger.account(&tenant("acme")).await.unwrap();
    assert_eq!(
        acme.reserved,
        Nanos(res_d.hold.0 + res_e.hold.0),
        "nothing moved"
    );
    let settled_e = one.ledger.settle(&entry(&res_e, 1)).await.unwrap();
    assert!(settled_e.first);
}
both_stores!(
    settle_batch_decides_in_order_on,
    settle_batch_decides_in_order
);

async fn usage_batch_writes_each_new_id_once(db: Arc<TestDb>) {
    // One batch of money-free usage entries writes the first entry of each new request id and
    // nothing for an id given again, an id that has a usage row already or an id that has a
    // reservation (its entry is the settlement's); the daily rollup counts what was written.
    let one = world(db).await;
    let reserved = one
        .ledger
        .reserve(&one.request(&Drawn {
            request_id: RequestId::new(),
            key: 0,
            model: 0,
            prompt_tokens: 10,
            completion_tokens_max: 10,
            idempotency_key: None,
        }))
        .await
        .unwrap();
    let fresh = |completion_tokens: u32| {
        let mut e = entry(&reserved, completion_tokens);
        e.request_id = RequestId::new();
        e
    };
    let earlier = fresh(1);
    assert!(one.ledger.record_usage(&earlier).await.unwrap());
    let a = fresh(2);
    let mut a_again = a.clone();
    a_again.completion_tokens = 900;
    let b = fresh(3);
    let written = one
        .ledger
        .record_in_one_batch(&[
            a.clone(),
            a_again,
            earlier.clone(),
            entry(&reserved, 4),
            b.clone(),
        ])
        .await
        .unwrap();
    assert_eq!(written, vec![true, false, false, false, true]);
    assert_eq!(one.ledger.usage_entry(a.request_id).await.unwrap(), Some(a));
    assert_eq!(one.ledger.usage_entry(b.request_id).await.unwrap(), Some(b));
    assert_eq!(
        one.ledger.usage_entry(reserved.request_id).await.unwrap(),
        None
    );
    // The settlement still writes the reserved request's entry.
    assert!(one.ledger.settle(&entry(&reserved, 4)).await.unwrap().first);
    let totals = one.ledger.usage_totals(&reserved.tenant).await.unwrap();
    let requests: u64 = totals.iter().map(|t| t.requests).sum();
    let completion: u64 = totals.iter().map(|t| t.completion_tokens).sum();
    assert_eq!((requests, completion), (4, 1 + 2 + 3 + 4));
}
both_stores!(
    usage_batch_writes_each_new_id_once_on,
    usage_batch_writes_each_new_id_once
);
