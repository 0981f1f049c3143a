// Seeded model-based test of the ledger state machine. A seeded ChaCha8 RNG drives random
// operations (credit, reserve, concurrent reserve bursts, settle, void, repeated settles,
// checkpoints, budget changes) against two handles on one store, and a plain in-memory model
// predicts every outcome exactly: which reservations are granted, every cost, the balance, the
// holds and the key budget's spend. Replay a failure with TIDEPOOL_SEED=<seed>.

#![expect(
    clippy::too_many_lines,
    reason = "one state machine, read top to bottom"
)]

use std::collections::BTreeMap;
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tidepool_core::{Nanos, RequestId};
use tidepool_ledger::price::{cost_of, hold_for};
use tidepool_ledger::{AuditContext, BilledTokens, BudgetScope, LedgerError, Month, QuotaScope};

use crate::billing::{INPUT, OUTPUT, fixture, price_v};
use crate::both_stores;
use crate::common::{T0_MS, TestDb};

const OPS_PER_SEED: u32 = 150;
const DEFAULT_SEEDS: [u64; 3] = [1, 7, 20_261_123];

#[derive(Debug, Default)]
struct Model {
    credits: i64,
    spent: i64,
    /// request → (hold, prompt tokens, completion max)
    open: BTreeMap<RequestId, (i64, u32, u32)>,
    /// request → cost billed
    resolved: BTreeMap<RequestId, i64>,
    key_budget: Option<i64>,
}

impl Model {
    fn reserved(&self) -> i64 {
        self.open.values().map(|(h, _, _)| h).sum()
    }
    fn fits(&self, hold: i64) -> Result<(), QuotaScope> {
        if self.credits - self.spent - self.reserved() < hold {
            return Err(QuotaScope::Balance);
        }
        if let Some(limit) = self.key_budget
            && self.spent + self.reserved() + hold > limit
        {
            return Err(QuotaScope::KeyBudget);
        }
        Ok(())
    }
}

fn seeds() -> Vec<u64> {
    match std::env::var("TIDEPOOL_SEED") {
        Ok(seed) => vec![seed.parse().expect("TIDEPOOL_SEED is a u64")],
        Err(_) => DEFAULT_SEEDS.to_vec(),
    }
}

async fn ledger_state_machine(db: Arc<TestDb>) {
    let replicas = [db.ledger().await, db.ledger().await];
    let f = fixture(replicas[0].clone(), Nanos::ZERO).await;
    let price = price_v(0, INPUT, OUTPUT);
    let key_scope = BudgetScope::Key {
        key_id: f.key_id.clone(),
    };
    // All seeds share one database, so each seed starts from the model of the previous ones.
    let mut model = Model::default();
    for seed in seeds() {
        println!(
            "ledger state machine: seed {seed} on {:?} (replay: TIDEPOOL_SEED={seed})",
            db.kind
        );
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for step in 0..OPS_PER_SEED {
            let ledger = &replicas[rng.random_range(0..replicas.len())];
            let ctx = format!("seed {seed} step {step}");
            match rng.random_range(0..100u32) {
                0..=9 => {
                    let amount = rng.random_range(1..2_000_000i64);
                    ledger
                        .credit(&f.tenant, Nanos(amount), "top-up", &AuditContext::ADMIN)
                        .await
                        .unwrap();
                    model.credits += amount;
                }
                10..=39 => {
                    let (prompt, completion_max) =
                        (rng.random_range(0..3000), rng.random_range(0..3000));
                    let hold = hold_for(prompt, completion_max, &price).unwrap().0;
                    let result = ledger.reserve(&f.request(prompt, completion_max)).await;
                    match (model.fits(hold), result) {
                        (Ok(()), Ok(r)) => {
                            assert_eq!(r.hold.0, hold, "{ctx}");
                            model
                                .open
                                .insert(r.request_id, (hold, prompt, completion_max));
                        }
                        (
                            Err(scope),
                            Err(LedgerError::InsufficientQuota {
                                scope: got, needed, ..
                            }),
                        ) => {
                            assert_eq!((got, needed.0), (scope, hold), "{ctx}");
                        }
                        (expected, got) => panic!("{ctx}: expected {expected:?}, got {got:?}"),
                    }
                }
                40..=47 => {
                    // A burst of equal reservations, concurrently over both replicas: exactly
                    // as many as fit are granted.
                    let burst = rng.random_range(2..24usize);
                    let hold = hold_for(100, 100, &price).unwrap().0;
                    let mut fit = 0;
                    while fit < burst && model.fits(hold * i64::try_from(fit + 1).unwrap()).is_ok()
                    {
                        fit += 1;
                    }
                    let mut tasks = tokio::task::JoinSet::new();
                    for i in 0..burst {
                        let (l, request) = (replicas[i % 2].clone(), f.request(100, 100));
                        tasks.spawn(async move { (request.request_id, l.reserve(&request).await) });
                    }
                    let mut granted = 0;
                    for (request_id, result) in tasks.join_all().await {
                        match result {
                            Ok(_) => {
                                granted += 1;
                                model.open.insert(request_id, (hold, 100, 100));
                            }
                            Err(LedgerError::InsufficientQuota { .. }) => {}
                            Err(other) => panic!("{ctx}: {other:?}"),
                        }
                    }
                    assert_eq!(granted, fit, "{ctx}: burst of {burst}");
                }
                48..=72 if !model.open.is_empty() => {
                    let index = rng.random_range(0..model.open.len());
                    let (&id, &(_, prompt, completion_max)) = model.open.iter().nth(index).unwrap();
                    let completion = rng.random_range(0..=completion_max);
                    let cached = rng.random_range(0..=prompt);
                    let mut entry = f.entry(id, prompt, completion);
                    entry.cached_prompt_tokens = cached;
                    let tokens = BilledTokens {
                        prompt_tokens: prompt,
                        cached_prompt_tokens: cached,
                        completion_tokens: completion,
                    };
                    let expected = cost_of(tokens, &price).unwrap().0;
                    let s = ledger.settle(&entry).await.unwrap();
                    assert_eq!(
                        (s.cost.0, s.first, s.capped),
                        (expected, true, false),
                        "{ctx}"
                    );
                    model.open.remove(&id);
                    model.resolved.insert(id, expected);
                    model.spent += expected;
                }
                73..=80 if !model.open.is_empty() => {
                    let index = rng.random_range(0..model.open.len());
                    let id = *model.open.keys().nth(index).unwrap();
                    let s = ledger.void(&f.entry(id, 0, 0)).await.unwrap();
                    assert_eq!((s.cost.0, s.first), (0, true), "{ctx}");
                    model.open.remove(&id);
                    model.resolved.insert(id, 0);
                }
                81..=87 if !model.resolved.is_empty() => {
                    let index = rng.random_range(0..model.resolved.len());
                    let (&id, &cost) = model.resolved.iter().nth(index).unwrap();
                    let s = ledger.settle(&f.entry(id, 1, 1)).await.unwrap();
                    assert_eq!((s.cost.0, s.first), (cost, false), "{ctx}: settled twice");
                }
                88..=92 if !model.open.is_empty() => {
                    let id = *model.open.keys().next().unwrap();
                    ledger
                        .checkpoint(id, rng.random_range(0..50))
                        .await
                        .unwrap();
                }
                93..=96 => {
                    let limit = rng
                        .random_bool(0.7)
                        .then(|| model.spent + rng.random_range(0..3_000_000i64));
                    ledger
                        .set_budget(&key_scope, limit.map(Nanos), &AuditContext::ADMIN)
                        .await
                        .unwrap();
                    model.key_budget = limit;
                }
                _ => db.clock.advance(rng.random_range(0..5_000)),
            }

            let account = ledger.account(&f.tenant).await.unwrap();
            assert_eq!(
                account.balance.0,
                model.credits - model.spent,
                "{ctx}: balance"
            );
            assert_eq!(account.reserved.0, model.reserved(), "{ctx}: holds");
            let budget = ledger.budget(&key_scope).await.unwrap();
            assert_eq!(
                (budget.spent.0, budget.reserved.0),
                (model.spent, model.reserved()),
                "{ctx}: budget"
            );
        }
    }
    // Resolve everything; the statement reconciles with the model.
    for id in model.open.keys().copied().collect::<Vec<_>>() {
        replicas[0].void(&f.entry(id, 0, 0)).await.unwrap();
    }
    let statement = replicas[1]
        .statement(&f.tenant, Month::of_ms(T0_MS))
        .await
        .unwrap();
    assert_eq!(statement.opening_balance, Nanos::ZERO);
    assert_eq!(statement.closing_balance.0, model.credits - model.spent);
    let lines: i64 = statement.lines.iter().map(|l| l.amount().0).sum();
    assert_eq!(lines, model.credits - model.spent);
}
both_stores!(ledger_state_machine_on, ledger_state_machine);
