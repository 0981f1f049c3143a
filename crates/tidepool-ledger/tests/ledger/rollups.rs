// Daily usage rollups on both stores. A seeded ChaCha8 RNG drives reserve → settle | void (with
// and without partial usage), over-usage capped at the hold, repeated settles, checkpoints and
// crash recovery, the stale sweep of another replica's reservations, money-free entries (with and
// without a model, refused for reserved ids, repeated), hand-made batches with a request finished
// twice, and concurrent settles with a bad one that forces the one-by-one fallback — across
// tenants, projects, keys, models and UTC days, the injected clock stepping through them. An
// in-memory model predicts every rollup row; the rollup table must equal it and equal the raw
// usage entries summed per (tenant, project, key, model, day), exactly, after every seed. Replay
// a failure with TIDEPOOL_SEED=<seed>. Also: the migration backfills the rollup from entries
// written before it, and the read API refuses bad day ranges and too many rows.

#![expect(
    clippy::too_many_lines,
    reason = "one scenario per store, read top to bottom"
)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sqlx::Connection as _;
use tidepool_core::{Currency, KeyId, ModelId, Nanos, RequestId, TenantId};
use tidepool_ledger::price::cost_of;
use tidepool_ledger::{
    AuditContext, BilledTokens, DailyUsage, Day, Finish, Ledger, LedgerError, LedgerOptions,
    PriceVersion, ProjectId, Reservation, ReserveRequest, USAGE_DAILY_DAYS_MAX,
    USAGE_DAILY_ROWS_MAX, UsageEntry, UsageScope, UsageStatus,
};

use crate::both_stores;
use crate::common::{Kind, T0_MS, TestDb};

const STEPS_PER_SEED: u32 = 120;
const DEFAULT_SEEDS: [u64; 3] = [3, 11, 20_261_207];
const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 86_400_000;
/// The stale bound of the sweep in this test.
const STALE: Duration = Duration::from_hours(2);

/// `(tenant, project, key, model, day)`; project and model `""` when absent, as stored.
type RollupKey = (String, String, String, String, i64);
/// `[requests, prompt, cached prompt, completion, cost]`.
type Sums = [i64; 5];

fn seeds() -> Vec<u64> {
    match std::env::var("TIDEPOOL_SEED") {
        Ok(seed) => vec![seed.parse().expect("TIDEPOOL_SEED is a u64")],
        Err(_) => DEFAULT_SEEDS.to_vec(),
    }
}

/// Every row of `usage_daily`, and the raw usage entries summed per rollup key in Rust (the day
/// from `Day::of_ms`, independent of any SQL).
async fn tables(db: &TestDb) -> (BTreeMap<RollupKey, Sums>, BTreeMap<RollupKey, Sums>) {
    type Rolled = (String, String, String, String, i64, i64, i64, i64, i64, i64);
    type Raw = (
        String,
        Option<String>,
        String,
        Option<String>,
        i64,
        i64,
        i64,
        i64,
        i64,
    );
    let rolled_sql = "SELECT tenant_id, project_id, key_id, model, day, requests, prompt_tokens, \
                      cached_prompt_tokens, completion_tokens, cost_nanos FROM usage_daily";
    let raw_sql = "SELECT tenant_id, project_id, key_id, model, created_at_ms, prompt_tokens, \
                   cached_prompt_tokens, completion_tokens, cost_nanos FROM usage_entries";
    let (rolled, raw): (Vec<Rolled>, Vec<Raw>) = match db.kind {
        Kind::Sqlite => {
            let mut c = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
            (
                sqlx::query_as(rolled_sql).fetch_all(&mut c).await.unwrap(),
                sqlx::query_as(raw_sql).fetch_all(&mut c).await.unwrap(),
            )
        }
        Kind::Postgres => {
            let mut c = sqlx::PgConnection::connect(&db.url).await.unwrap();
            (
                sqlx::query_as(rolled_sql).fetch_all(&mut c).await.unwrap(),
                sqlx::query_as(raw_sql).fetch_all(&mut c).await.unwrap(),
            )
        }
    };
    let mut rollup = BTreeMap::new();
    for (t, p, k, m, day, requests, prompt, cached, completion, cost) in rolled {
        let previous = rollup.insert(
            (t, p, k, m, day),
            [requests, prompt, cached, completion, cost],
        );
        assert!(previous.is_none(), "one rollup row per key");
    }
    let mut summed: BTreeMap<RollupKey, Sums> = BTreeMap::new();
    for (t, p, k, m, created_at_ms, prompt, cached, completion, cost) in raw {
        let day = Day::of_ms(created_at_ms).days_since_epoch();
        let key = (t, p.unwrap_or_default(), k, m.unwrap_or_default(), day);
        add(
            summed.entry(key).or_default(),
            [1, prompt, cached, completion, cost],
        );
    }
    (rollup, summed)
}

fn add(slot: &mut Sums, sums: Sums) {
    for (total, value) in slot.iter_mut().zip(sums) {
        *total += value;
    }
}

/// The rollup equals the raw entries summed per key, exactly, row for row.
pub(crate) async fn assert_rollup_exact(db: &TestDb) {
    let (rollup, summed) = tables(db).await;
    assert_eq!(rollup, summed, "the rollup equals the raw usage entries");
}

/// A tenant with keys in two projects, each of its keys known with its project.
struct TenantKeys {
    tenant: TenantId,
    keys: Vec<(ProjectId, KeyId)>,
}

/// An open reservation the test has not finished, with what recovery will bill.
#[derive(Debug, Clone)]
struct Open {
    reservation: Reservation,
    model: ModelId,
    prompt: u32,
    progress: Option<u32>,
    replica_b: bool,
}

struct World {
    a: Ledger,
    b: Ledger,
    tenants: Vec<TenantKeys>,
    prices: Vec<PriceVersion>,
    expected: BTreeMap<RollupKey, Sums>,
    open: Vec<Open>,
    /// Settled or voided requests, with the entry that finished them (for repeats).
    finished: Vec<UsageEntry>,
}

fn key_of(reservation: &Reservation, model: &ModelId, created_at_ms: i64) -> RollupKey {
    (
        reservation.tenant.as_str().to_owned(),
        reservation.project.as_str().to_owned(),
        reservation.key_id.0.clone(),
        model.as_str().to_owned(),
        Day::of_ms(created_at_ms).days_since_epoch(),
    )
}

fn entry_for(
    reservation: &Reservation,
    model: &ModelId,
    prompt: u32,
    cached: u32,
    completion: u32,
    created_at_ms: i64,
) -> UsageEntry {
    UsageEntry {
        request_id: reservation.request_id,
        tenant: reservation.tenant.clone(),
        key_id: reservation.key_id.clone(),
        model: Some(model.clone()),
        endpoint: "chat.completions".to_owned(),
        prompt_tokens: prompt,
        completion_tokens: completion,
        cached_prompt_tokens: cached,
        cached_prompt_tokens_unknown: false,
        status: UsageStatus::Ok,
        latency_ms: 7,
        created_at_ms,
    }
}

impl World {
    fn now_ms(db: &TestDb) -> i64 {
        use tidepool_ledger::Clock as _;
        db.clock.now_ms()
    }

    /// Reserves on a random key and model (replica b when `on_b`).
    async fn reserve(&self, rng: &mut ChaCha8Rng, on_b: bool) -> (Reservation, ModelId, u32, u32) {
        let tenant = &self.tenants[rng.random_range(0..self.tenants.len())];
        let (_, key_id) = &tenant.keys[rng.random_range(0..tenant.keys.len())];
        let model = self.prices[rng.random_range(0..self.prices.len())]
            .model
            .clone();
        let prompt = rng.random_range(1..3_000);
        let completion_max = rng.random_range(1..1_000);
        let request = ReserveRequest {
            request_id: RequestId::new(),
            key_id: key_id.clone(),
            model: model.clone(),
            prompt_tokens: prompt,
            completion_tokens_max: completion_max,
            idempotency_key: None,
            class: tidepool_ledger::ReserveClass::Online,
        };
        let ledger = if on_b { &self.b } else { &self.a };
        let reservation = ledger.reserve(&request).await.unwrap();
        (reservation, model, prompt, completion_max)
    }

    /// A usage time: mostly now, sometimes up to two days earlier (the entry's own time is what
    /// picks its day).
    fn created_at(rng: &mut ChaCha8Rng, now_ms: i64) -> i64 {
        if rng.random_bool(0.25) {
            now_ms - rng.random_range(0..2 * DAY_MS)
        } else {
            now_ms
        }
    }

    fn count(&mut self, key: RollupKey, entry: &UsageEntry, cost: Nanos) {
        add(
            self.expected.entry(key).or_default(),
            [
                1,
                i64::from(entry.prompt_tokens),
                i64::from(entry.cached_prompt_tokens),
                i64::from(entry.completion_tokens),
                cost.0,
            ],
        );
    }

    /// Recovery's bill for an open reservation: prompt plus checkpointed completion tokens,
    /// else nothing; dated at the reservation's creation.
    fn count_recovered(&mut self, open: &Open) {
        let (prompt, completion) = match open.progress {
            Some(progress) => (open.prompt, progress),
            None => (0, 0),
        };
        let price = self
            .prices
            .iter()
            .find(|p| p.model == open.model)
            .unwrap()
            .clone();
        let cost = if open.progress.is_some() {
            cost_of(
                BilledTokens {
                    prompt_tokens: prompt,
                    cached_prompt_tokens: 0,
                    completion_tokens: completion,
                },
                &price,
            )
            .unwrap()
            .min(open.reservation.hold)
        } else {
            Nanos::ZERO
        };
        let key = key_of(
            &open.reservation,
            &open.model,
            open.reservation.created_at_ms,
        );
        add(
            self.expected.entry(key).or_default(),
            [1, i64::from(prompt), 0, i64::from(completion), cost.0],
        );
    }
}

async fn setup(db: &TestDb) -> World {
    let options = |replica: &str| LedgerOptions {
        replica_id: replica.to_owned(),
        clock: db.clock.clone(),
        ..LedgerOptions::default()
    };
    let a = Ledger::connect_with(&db.url, options("a")).await.unwrap();
    let b = Ledger::connect_with(&db.url, options("b")).await.unwrap();
    let mut prices = Vec::new();
    for (m, (input, output, cached)) in [
        (50_000_000, 200_000_000, 25_000_000),
        (1_000_000_000, 3_000_000_000, 100_000_000),
        (7, 13, 1),
    ]
    .into_iter()
    .enumerate()
    {
        let price = PriceVersion {
            model: ModelId::new(format!("model-{m}")).unwrap(),
            effective_from_ms: 0,
            currency: Currency::USD,
            input_per_mtok: Nanos(input),
            output_per_mtok: Nanos(output),
            cached_input_per_mtok: Nanos(cached),
        };
        a.set_price(&price, &AuditContext::ADMIN).await.unwrap();
        prices.push(price);
    }
    let mut tenants = Vec::new();
    for t in 0..3 {
        let tenant = TenantId::new(format!("tenant-{t}")).unwrap();
        a.create_tenant(&tenant, Currency::USD, &AuditContext::ADMIN)
            .await
            .unwrap();
        a.credit(
            &tenant,
            Nanos(1_000_000_000_000_000),
            "prepaid",
            &AuditContext::ADMIN,
        )
        .await
        .unwrap();
        let mut keys = Vec::new();
        for project in [
            ProjectId::default_project(),
            ProjectId::new("research").unwrap(),
        ] {
            for k in 0..2 {
                let key = a
                    .create_key_in_project(
                        &tenant,
                        &project,
                        &format!("key-{k}"),
                        &AuditContext::ADMIN,
                    )
                    .await
                    .unwrap();
                keys.push((project.clone(), key.record.key_id));
            }
        }
        tenants.push(TenantKeys { tenant, keys });
    }
    World {
        a,
        b,
        tenants,
        prices,
        expected: BTreeMap::new(),
        open: Vec::new(),
        finished: Vec::new(),
    }
}

async fn rollup_matches_raw_usage(db: Arc<TestDb>) {
    let mut world = setup(&db).await;
    // All seeds share one database, so each seed starts from the model of the previous ones.
    for seed in seeds() {
        println!(
            "rollup model: seed {seed} on {:?} (replay: TIDEPOOL_SEED={seed})",
            db.kind
        );
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for step in 0..STEPS_PER_SEED {
            // Time moves on by up to 8 hours; now and then to just before a UTC midnight.
            if rng.random_bool(0.1) {
                let now = World::now_ms(&db);
                let to_midnight = DAY_MS - now.rem_euclid(DAY_MS);
                db.clock.advance(to_midnight - rng.random_range(1..50));
            } else {
                db.clock.advance(rng.random_range(1..8 * HOUR_MS));
            }
            let now_ms = World::now_ms(&db);
            let ctx = format!("seed {seed} step {step}");
            match rng.random_range(0..12) {
                // Settle, sometimes above what was reserved (billed at most the hold).
                0..=2 => {
                    let (r, model, prompt, completion_max) = world.reserve(&mut rng, false).await;
                    let over = rng.random_bool(0.1);
                    let completion = if over {
                        completion_max + rng.random_range(1..500)
                    } else {
                        rng.random_range(0..=completion_max)
                    };
                    let cached = rng.random_range(0..=prompt);
                    let created = World::created_at(&mut rng, now_ms);
                    let entry = entry_for(&r, &model, prompt, cached, completion, created);
                    let s = world.a.settle(&entry).await.unwrap();
                    assert!(s.first, "{ctx}");
                    assert!(s.cost <= r.hold, "{ctx}");
                    world.count(key_of(&r, &model, created), &entry, s.cost);
                    world.finished.push(entry);
                }
                // Void: failed part-way (tokens used, nothing billed) or before any token.
                3 | 4 => {
                    let (r, model, prompt, completion_max) = world.reserve(&mut rng, false).await;
                    let partial = rng.random_bool(0.6);
                    let (p, c) = if partial {
                        (prompt, rng.random_range(1..=completion_max))
                    } else {
                        (0, 0)
                    };
                    let created = World::created_at(&mut rng, now_ms);
                    let mut entry = entry_for(&r, &model, p, 0, c, created);
                    entry.status = UsageStatus::Error {
                        code: "backend_failed".to_owned(),
                    };
                    let s = world.a.void(&entry).await.unwrap();
                    assert_eq!(s.cost, Nanos::ZERO, "{ctx}");
                    world.count(key_of(&r, &model, created), &entry, Nanos::ZERO);
                    world.finished.push(entry);
                }
                // Left open on replica a (maybe checkpointed) or b, for recovery and the sweep.
                5 => {
                    let on_b = rng.random_bool(0.4);
                    let (r, model, prompt, completion_max) = world.reserve(&mut rng, on_b).await;
                    let progress = if rng.random_bool(0.5) {
                        let tokens = rng.random_range(0..=completion_max);
                        let ledger = if on_b { &world.b } else { &world.a };
                        ledger.checkpoint(r.request_id, tokens).await.unwrap();
                        Some(tokens)
                    } else {
                        None
                    };
                    world.open.push(Open {
                        reservation: r,
                        model,
                        prompt,
                        progress,
                        replica_b: on_b,
                    });
                }
                // Replica a restarts: its open reservations are recovered.
                6 => {
                    db.clock.advance(1);
                    let now = World::now_ms(&db);
                    let (mine, rest): (Vec<Open>, Vec<Open>) = std::mem::take(&mut world.open)
                        .into_iter()
                        .partition(|o| !o.replica_b && o.reservation.created_at_ms < now);
                    world.open = rest;
                    let report = world.a.recover().await.unwrap();
                    assert_eq!(
                        report.settled + report.voided,
                        u64::try_from(mine.len()).unwrap(),
                        "{ctx}"
                    );
                    for open in &mine {
                        world.count_recovered(open);
                    }
                }
                // The stale sweep resolves anyone's reservations older than the bound.
                7 => {
                    let stale_ms = i64::try_from(STALE.as_millis()).unwrap();
                    let bound = World::now_ms(&db) - stale_ms;
                    let (stale, rest): (Vec<Open>, Vec<Open>) = std::mem::take(&mut world.open)
                        .into_iter()
                        .partition(|o| o.reservation.created_at_ms < bound);
                    world.open = rest;
                    let report = world.a.recover_stale(STALE).await.unwrap();
                    assert_eq!(
                        report.settled + report.voided,
                        u64::try_from(stale.len()).unwrap(),
                        "{ctx}"
                    );
                    for open in &stale {
                        world.count_recovered(open);
                    }
                }
                // Money-free entries: counted under no project, with or without a model; a
                // repeat and a reserved request id are refused and count nothing.
                8 => {
                    let tenant = &world.tenants[rng.random_range(0..world.tenants.len())];
                    let (_, key_id) = &tenant.keys[rng.random_range(0..tenant.keys.len())];
                    let model = rng.random_bool(0.5).then(|| {
                        world.prices[rng.random_range(0..world.prices.len())]
                            .model
                            .clone()
                    });
                    let created = World::created_at(&mut rng, now_ms);
                    let entry = UsageEntry {
                        request_id: RequestId::new(),
                        tenant: tenant.tenant.clone(),
                        key_id: key_id.clone(),
                        model: model.clone(),
                        endpoint: "chat.completions".to_owned(),
                        prompt_tokens: rng.random_range(0..100),
                        completion_tokens: 0,
                        cached_prompt_tokens: 0,
                        cached_prompt_tokens_unknown: false,
                        status: UsageStatus::Error {
                            code: "rate_limit_exceeded".to_owned(),
                        },
                        latency_ms: 1,
                        created_at_ms: created,
                    };
                    assert!(world.a.record_usage(&entry).await.unwrap(), "{ctx}");
                    assert!(
                        !world.b.record_usage(&entry).await.unwrap(),
                        "{ctx}: repeat"
                    );
                    let key = (
                        tenant.tenant.as_str().to_owned(),
                        String::new(),
                        key_id.0.clone(),
                        model.map(|m| m.as_str().to_owned()).unwrap_or_default(),
                        Day::of_ms(created).days_since_epoch(),
                    );
                    world.count(key, &entry, Nanos::ZERO);
                    if let Some(open) = world.open.first() {
                        let refused = UsageEntry {
                            request_id: open.reservation.request_id,
                            ..entry.clone()
                        };
                        assert!(
                            !world.a.record_usage(&refused).await.unwrap(),
                            "{ctx}: reserved"
                        );
                    }
                }
                // One hand-made batch: several finishes, one request finished twice (counts
                // once), a repeat of an earlier one (counts nothing).
                9 => {
                    let mut items = Vec::new();
                    let mut keys = Vec::new();
                    for _ in 0..rng.random_range(1..6) {
                        let (r, model, prompt, completion_max) =
                            world.reserve(&mut rng, false).await;
                        let finish = if rng.random_bool(0.7) {
                            Finish::Settle
                        } else {
                            Finish::Void
                        };
                        let completion = rng.random_range(0..=completion_max);
                        let created = World::created_at(&mut rng, now_ms);
                        let entry = entry_for(&r, &model, prompt, 0, completion, created);
                        keys.push(key_of(&r, &model, created));
                        items.push((entry, finish));
                    }
                    let (twice, finish) = items[0].clone();
                    items.push((twice, finish));
                    if let Some(earlier) = world.finished.last() {
                        items.push((earlier.clone(), Finish::Settle));
                    }
                    let results = world.a.finish_in_one_batch(&items).await.unwrap();
                    for (index, result) in results.iter().enumerate() {
                        let settlement = result.as_ref().unwrap();
                        if let Some(key) = keys.get(index) {
                            assert!(settlement.first, "{ctx}");
                            let entry = items[index].0.clone();
                            world.count(key.clone(), &entry, settlement.cost);
                            world.finished.push(entry);
                        } else {
                            assert!(!settlement.first, "{ctx}: counted once");
                        }
                    }
                }
                // Concurrent settles through the writer, one naming the wrong model: its batch
                // fails as a whole and is applied one by one; only the good ones count.
                10 => {
                    let mut good = Vec::new();
                    for _ in 0..rng.random_range(2..8) {
                        let (r, model, prompt, completion_max) =
                            world.reserve(&mut rng, false).await;
                        let completion = rng.random_range(0..=completion_max);
                        let created = World::created_at(&mut rng, now_ms);
                        let entry = entry_for(&r, &model, prompt, 0, completion, created);
                        good.push((key_of(&r, &model, created), entry));
                    }
                    let (bad_r, bad_model, prompt, _) = world.reserve(&mut rng, false).await;
                    let wrong = world
                        .prices
                        .iter()
                        .find(|p| p.model != bad_model)
                        .unwrap()
                        .model
                        .clone();
                    let bad = entry_for(&bad_r, &wrong, prompt, 0, 1, now_ms);
                    let mut tasks = tokio::task::JoinSet::new();
                    for (_, entry) in &good {
                        let (ledger, entry) = (world.a.clone(), entry.clone());
                        tasks.spawn(async move { ledger.settle(&entry).await });
                    }
                    let ledger = world.a.clone();
                    let bad_result = tokio::spawn(async move { ledger.settle(&bad).await });
                    let settled: Vec<_> = tasks.join_all().await;
                    assert!(
                        matches!(
                            bad_result.await.unwrap(),
                            Err(LedgerError::ReservationMismatch { .. })
                        ),
                        "{ctx}"
                    );
                    let costs: BTreeMap<RequestId, Nanos> = settled
                        .into_iter()
                        .map(|s| {
                            let s = s.unwrap();
                            (s.request_id, s.cost)
                        })
                        .collect();
                    for (key, entry) in good {
                        world.count(key, &entry, costs[&entry.request_id]);
                        world.finished.push(entry);
                    }
                    // The bad one's reservation is still open: void it for nothing.
                    let mut entry = entry_for(&bad_r, &bad_model, 0, 0, 0, now_ms);
                    entry.status = UsageStatus::Error {
                        code: "backend_failed".to_owned(),
                    };
                    world.a.void(&entry).await.unwrap();
                    world.count(key_of(&bad_r, &bad_model, now_ms), &entry, Nanos::ZERO);
                }
                // A repeated settle changes nothing.
                _ => {
                    if let Some(entry) = world.finished.last() {
                        let mut again = entry.clone();
                        again.completion_tokens += 5;
                        let s = world.a.settle(&again).await.unwrap();
                        assert!(!s.first, "{ctx}");
                    }
                }
            }
        }
        let (rollup, summed) = tables(&db).await;
        assert_eq!(
            rollup, world.expected,
            "seed {seed}: the rollup equals the model"
        );
        assert_eq!(
            summed, world.expected,
            "seed {seed}: the raw entries equal the model"
        );
    }

    // The read API agrees with both, tenant by tenant, and the spend per tenant and month with
    // the per-model summary of the raw entries.
    let days: Vec<i64> = world.expected.keys().map(|k| k.4).collect();
    let (first, last) = (
        Day::from_days_since_epoch(*days.iter().min().unwrap()),
        Day::from_days_since_epoch(*days.iter().max().unwrap()),
    );
    assert!(
        last.days_since_epoch() - first.days_since_epoch() < i64::from(USAGE_DAILY_DAYS_MAX),
        "the run fits one read"
    );
    for tenant in &world.tenants {
        let rows = world
            .a
            .usage_daily(&tenant.tenant, first, last)
            .await
            .unwrap();
        let raw = world
            .a
            .usage_daily_from_entries(&tenant.tenant, first, last)
            .await
            .unwrap();
        assert_eq!(rows, raw, "{}", tenant.tenant);
        let expected: Vec<(RollupKey, Sums)> = world
            .expected
            .iter()
            .filter(|(k, _)| k.0 == tenant.tenant.as_str())
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        let mut got: Vec<(RollupKey, Sums)> = rows.iter().map(|r| as_model(tenant, r)).collect();
        got.sort();
        assert_eq!(got, expected, "{}", tenant.tenant);
        // A window inside the range holds exactly its days.
        let (from, to) = (first.saturating_add_days(3), first.saturating_add_days(9));
        let window = world.a.usage_daily(&tenant.tenant, from, to).await.unwrap();
        assert_eq!(
            window.len(),
            expected
                .iter()
                .filter(|(k, _)| (from.days_since_epoch()..=to.days_since_epoch()).contains(&k.4))
                .count()
        );
        assert!(window.iter().all(|r| r.day >= from && r.day <= to));
    }
    let mut month = first.month();
    while month <= last.month() {
        let spend = world.a.tenant_spend(month).await.unwrap();
        assert_eq!(spend.len(), world.tenants.len());
        for (row, tenant) in spend.iter().zip(&world.tenants) {
            assert_eq!(row.tenant, tenant.tenant);
            let mut sums = Sums::default();
            for (k, v) in &world.expected {
                let day = Day::from_days_since_epoch(k.4);
                if k.0 == tenant.tenant.as_str() && day.month() == month {
                    add(&mut sums, *v);
                }
            }
            assert_eq!(
                [
                    i64::try_from(row.requests).unwrap(),
                    i64::try_from(row.prompt_tokens).unwrap(),
                    i64::try_from(row.cached_prompt_tokens).unwrap(),
                    i64::try_from(row.completion_tokens).unwrap(),
                    row.month_cost.0,
                ],
                sums,
                "{} {month}",
                tenant.tenant
            );
            let summary = world
                .a
                .usage_summary(&UsageScope::Tenant(tenant.tenant.clone()), Some(month))
                .await
                .unwrap();
            assert_eq!(
                summary.iter().map(|m| m.requests).sum::<u64>(),
                row.requests
            );
            assert_eq!(
                summary.iter().map(|m| m.cost.0).sum::<i64>(),
                row.month_cost.0
            );
            let account = world.a.account(&tenant.tenant).await.unwrap();
            assert_eq!(
                (row.currency, row.balance, row.reserved),
                (account.currency, account.balance, account.reserved)
            );
        }
        month = month.next();
    }
}
both_stores!(rollup_matches_raw, rollup_matches_raw_usage);

fn as_model(tenant: &TenantKeys, row: &DailyUsage) -> (RollupKey, Sums) {
    (
        (
            tenant.tenant.as_str().to_owned(),
            row.project
                .as_ref()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_default(),
            row.key_id.0.clone(),
            row.model
                .as_ref()
                .map(|m| m.as_str().to_owned())
                .unwrap_or_default(),
            row.day.days_since_epoch(),
        ),
        [
            i64::try_from(row.requests).unwrap(),
            i64::try_from(row.prompt_tokens).unwrap(),
            i64::try_from(row.cached_prompt_tokens).unwrap(),
            i64::try_from(row.completion_tokens).unwrap(),
            row.cost.0,
        ],
    )
}

/// A usage entry written before the rollup existed: tenant, project, key, model, created at,
/// prompt, cached, completion, cost.
type RawEntry = (
    &'static str,
    Option<&'static str>,
    &'static str,
    Option<&'static str>,
    i64,
    i64,
    i64,
    i64,
    i64,
);

/// The migration that creates the rollup: the version, read from the migration files.
const ROLLUP_MIGRATION: i64 = 20_261_207_000_002;

/// Runs `sql` on the test database.
async fn execute(db: &TestDb, sql: &str) {
    match db.kind {
        Kind::Sqlite => {
            let mut c = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
            sqlx::query(sql).execute(&mut c).await.unwrap();
        }
        Kind::Postgres => {
            let mut c = sqlx::PgConnection::connect(&db.url).await.unwrap();
            sqlx::query(sql).execute(&mut c).await.unwrap();
        }
    }
}

async fn migration_backfills_rollup(db: Arc<TestDb>) {
    // The schema as it was before the rollup: every migration older than it.
    let store = match db.kind {
        Kind::Sqlite => "sqlite",
        Kind::Postgres => "postgres",
    };
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("migrations")
        .join(store);
    let mut before = sqlx::migrate::Migrator::new(dir).await.unwrap();
    assert!(
        before
            .migrations
            .iter()
            .any(|m| m.version == ROLLUP_MIGRATION),
        "the rollup migration exists"
    );
    before.migrations = before
        .migrations
        .iter()
        .filter(|m| m.version < ROLLUP_MIGRATION)
        .cloned()
        .collect::<Vec<_>>()
        .into();
    match db.kind {
        Kind::Sqlite => {
            let options: sqlx::sqlite::SqliteConnectOptions = db
                .url
                .parse::<sqlx::sqlite::SqliteConnectOptions>()
                .unwrap()
                .create_if_missing(true);
            let mut c = sqlx::SqliteConnection::connect_with(&options)
                .await
                .unwrap();
            before.run_direct(&mut c).await.unwrap();
        }
        Kind::Postgres => {
            let mut c = sqlx::PgConnection::connect(&db.url).await.unwrap();
            before.run_direct(&mut c).await.unwrap();
        }
    }
    // Entries written before the rollup existed: billed and money-free, with and without a
    // model, on both sides of midnight, before 1970 too.
    let midnight = T0_MS; // 2026-11-15T00:00:00Z
    let rows: [RawEntry; 8] = [
        (
            "acme",
            Some("default"),
            "k1",
            Some("m1"),
            midnight - 1,
            10,
            2,
            5,
            100,
        ),
        (
            "acme",
            Some("default"),
            "k1",
            Some("m1"),
            midnight - DAY_MS,
            20,
            0,
            7,
            300,
        ),
        (
            "acme",
            Some("default"),
            "k1",
            Some("m1"),
            midnight,
            1,
            0,
            1,
            3,
        ),
        (
            "acme",
            Some("default"),
            "k1",
            Some("m1"),
            midnight + DAY_MS - 1,
            4,
            4,
            4,
            4,
        ),
        (
            "acme",
            Some("research"),
            "k2",
            Some("m2"),
            midnight + 5,
            8,
            1,
            2,
            9,
        ),
        ("acme", None, "k1", None, midnight + 6, 3, 0, 0, 0),
        ("acme", None, "k1", Some("m1"), -1, 2, 0, 0, 0),
        (
            "zeta",
            Some("default"),
            "k9",
            Some("m1"),
            -DAY_MS - 1,
            6,
            0,
            3,
            11,
        ),
    ];
    let mut expected: BTreeMap<RollupKey, Sums> = BTreeMap::new();
    for (i, (t, p, k, m, at, prompt, cached, completion, cost)) in rows.iter().enumerate() {
        let text = |v: Option<&str>| v.map_or("NULL".to_owned(), |v| format!("'{v}'"));
        execute(
            &db,
            &format!(
                "INSERT INTO usage_entries (request_id, tenant_id, key_id, model, endpoint, \
                 prompt_tokens, completion_tokens, cached_prompt_tokens, status, error_code, \
                 latency_ms, created_at_ms, project_id, cost_nanos) VALUES ('{}', '{t}', '{k}', \
                 {}, 'chat.completions', {prompt}, {completion}, {cached}, 'ok', NULL, 1, {at}, \
                 {}, {cost})",
                RequestId(uuid::Uuid::from_u128(u128::try_from(i).unwrap() + 1)),
                text(*m),
                text(*p),
            ),
        )
        .await;
        let key = (
            (*t).to_owned(),
            p.unwrap_or_default().to_owned(),
            (*k).to_owned(),
            m.unwrap_or_default().to_owned(),
            Day::of_ms(*at).days_since_epoch(),
        );
        add(
            expected.entry(key).or_default(),
            [1, *prompt, *cached, *completion, *cost],
        );
    }
    assert_eq!(expected.len(), 6, "two pairs of entries share a row");

    // Connecting applies the rest, the rollup's migration among them.
    let ledger = db.ledger().await;
    assert!(ledger.schema_status().await.unwrap().is_current());
    let (rollup, summed) = tables(&db).await;
    assert_eq!(rollup, expected, "the backfill sums every entry by day");
    assert_eq!(summed, expected);

    // The read API sees the backfilled rows, days and absent parts decoded.
    let acme = TenantId::new("acme").unwrap();
    let day = Day::of_ms(midnight);
    let rows = ledger
        .usage_daily(&acme, day.saturating_add_days(-1), day)
        .await
        .unwrap();
    assert_eq!(rows.len(), 4, "{rows:?}");
    assert_eq!(rows[0].day.to_string(), "2026-11-14");
    assert_eq!(rows[0].requests, 2);
    assert_eq!(rows[0].cost, Nanos(400));
    let none: Vec<&DailyUsage> = rows.iter().filter(|r| r.project.is_none()).collect();
    assert_eq!(none.len(), 1);
    assert_eq!(none[0].model, None);
    assert_eq!(none[0].day, day);
    let early = ledger
        .usage_daily(&acme, Day::of_ms(-1), Day::of_ms(-1))
        .await
        .unwrap();
    assert_eq!(early.len(), 1);
    assert_eq!(early[0].day.to_string(), "1969-12-31");
    assert_eq!(early[0].model, Some(ModelId::new("m1").unwrap()));
    // New entries add to the backfilled rows.
    let k1 = KeyId("k1".to_owned());
    let entry = UsageEntry {
        request_id: RequestId::new(),
        tenant: acme.clone(),
        key_id: k1,
        model: None,
        endpoint: "chat.completions".to_owned(),
        prompt_tokens: 1,
        completion_tokens: 0,
        cached_prompt_tokens: 0,
        cached_prompt_tokens_unknown: false,
        status: UsageStatus::Ok,
        latency_ms: 1,
        created_at_ms: midnight + 7,
    };
    assert!(ledger.record_usage(&entry).await.unwrap());
    let rows = ledger.usage_daily(&acme, day, day).await.unwrap();
    let none = rows.iter().find(|r| r.project.is_none()).unwrap();
    assert_eq!((none.requests, none.prompt_tokens), (2, 4));
    assert_rollup_exact(&db).await;
}
both_stores!(migration_backfill, migration_backfills_rollup);

async fn read_limits_and_bad_ranges(db: Arc<TestDb>) {
    let ledger = db.ledger().await;
    let acme = TenantId::new("acme").unwrap();
    ledger
        .create_tenant(&acme, Currency::USD, &AuditContext::ADMIN)
        .await
        .unwrap();
    let day = Day::of_ms(T0_MS);
    let days_error = |result: Result<Vec<DailyUsage>, LedgerError>| {
        matches!(result, Err(LedgerError::OutOfRange { field: "days" }))
    };
    // `from` after `to`, and one day too many.
    assert!(days_error(
        ledger
            .usage_daily(&acme, day, day.saturating_add_days(-1))
            .await
    ));
    let span = i64::from(USAGE_DAILY_DAYS_MAX);
    assert!(days_error(
        ledger
            .usage_daily(&acme, day.saturating_add_days(-span), day)
            .await
    ));
    assert!(days_error(
        ledger
            .usage_daily_from_entries(&acme, day.saturating_add_days(-span), day)
            .await
    ));
    assert!(days_error(
        ledger
            .usage_daily(
                &acme,
                Day::from_days_since_epoch(i64::MIN),
                Day::from_days_since_epoch(i64::MAX)
            )
            .await
    ));
    // The longest range is fine, and empty for a tenant without usage or an unknown one.
    let longest = day.saturating_add_days(1 - span);
    assert!(
        ledger
            .usage_daily(&acme, longest, day)
            .await
            .unwrap()
            .is_empty()
    );
    let nobody = TenantId::new("nobody").unwrap();
    assert!(
        ledger
            .usage_daily(&nobody, day, day)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(Day::parse("2026-02-30").is_err());

    // More rows than one read returns: refused, not cut short; a shorter range reads.
    let keys = u32::try_from(i64::from(USAGE_DAILY_ROWS_MAX) / span + 1).unwrap();
    let first = longest.days_since_epoch();
    let insert = format!(
        "INSERT INTO usage_daily (tenant_id, project_id, key_id, model, day, requests, \
         prompt_tokens, cached_prompt_tokens, completion_tokens, cost_nanos) \
         SELECT 'acme', 'default', 'k' || k, 'm', {first} + d, 1, 1, 0, 1, 1 FROM {} CROSS JOIN {}",
        series(db.kind, "k", 0, keys - 1),
        series(db.kind, "d", 0, USAGE_DAILY_DAYS_MAX - 1),
    );
    execute(&db, &insert).await;
    let too_many = ledger.usage_daily(&acme, longest, day).await;
    assert!(
        matches!(
            too_many,
            Err(LedgerError::OutOfRange {
                field: "usage rows"
            })
        ),
        "{too_many:?}"
    );
    let week = ledger
        .usage_daily(&acme, day.saturating_add_days(-6), day)
        .await
        .unwrap();
    assert_eq!(week.len(), usize::try_from(keys * 7).unwrap());
    // The spend of the month counts those of its days in the range: the 1st to the 15th.
    let spend = ledger.tenant_spend(day.month()).await.unwrap();
    assert_eq!(spend.len(), 1);
    assert_eq!(spend[0].requests, u64::from(keys) * 15);
    assert_eq!(spend[0].month_cost, Nanos(i64::from(keys) * 15));
}
both_stores!(read_limits, read_limits_and_bad_ranges);

/// A table of the integers `from..=to` in one column named `name`, for a `FROM` clause.
fn series(kind: Kind, name: &str, from: u32, to: u32) -> String {
    match kind {
        Kind::Postgres => format!("generate_series({from}, {to}) AS {name}s({name})"),
        Kind::Sqlite => format!(
            "(WITH RECURSIVE s(n) AS (SELECT {from} UNION ALL SELECT n + 1 FROM s WHERE n < {to}) \
             SELECT n AS {name} FROM s) AS {name}s"
        ),
    }
}
