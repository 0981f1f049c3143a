//! What the ledger's benchmarks need from inside the crate. `tidepool bench ledger`: settled
//! usages per second through the real group-commit writer — reservations are placed first (not
//! timed); then `settles` settles run with `concurrency` in flight, the way a busy gateway would
//! call them. `tidepool bench rollups`: many usage entries seeded in bulk ([`bench_seed_usage`])
//! on a throwaway database ([`BenchDatabase`]), to time the daily rollup against the raw rows.

use std::time::Duration;

use sqlx::{Connection as _, PgConnection, QueryBuilder};
use tidepool_core::{Currency, KeyId, ModelId, Nanos, RequestId, TenantId};
use tokio::task::JoinSet;

use crate::audit::AuditContext;
use crate::batch_sql::{BatchSql as _, FreeUsageRow, SQLITE_BINDS_MAX, USAGE_BINDS, UsageRow};
use crate::billing::ReserveRequest;
use crate::month::{Day, Month};
use crate::price::{BilledTokens, PriceVersion, cost_of};
use crate::rollup::{USAGE_DAILY_DAYS_MAX, daily_rows};
use crate::store::on_store;
use crate::{Ledger, LedgerError, ProjectId, UsageEntry, UsageStatus};

/// Most settles one bench run may ask for.
pub const BENCH_SETTLES_MAX: u32 = 1_000_000;
/// Most settles in flight at once.
pub const BENCH_CONCURRENCY_MAX: u32 = 4096;

/// One bench result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettleBench {
    pub store: &'static str,
    pub settles: u32,
    pub concurrency: u32,
    /// Wall time of the settle phase.
    pub elapsed: Duration,
    /// Settles per second, rounded down.
    pub settles_per_second: u64,
    /// Reservations per second in the (untimed-for-settles) reserve phase, rounded down.
    pub reserves_per_second: u64,
}

fn per_second(count: u32, elapsed: Duration) -> u64 {
    let nanos = elapsed.as_nanos().max(1);
    let rate = u128::from(count)
        .saturating_mul(1_000_000_000)
        .checked_div(nanos)
        .unwrap_or(0);
    u64::try_from(rate).unwrap_or(u64::MAX)
}

/// The price benches bill at (SmolLM2-class: 0.05 / 0.20 / 0.025 USD per 1M input / output /
/// cached input tokens), in force since the epoch.
pub fn bench_price(model: ModelId) -> PriceVersion {
    PriceVersion {
        model,
        effective_from_ms: 0,
        currency: Currency::USD,
        input_per_mtok: Nanos(50_000_000),
        output_per_mtok: Nanos(200_000_000),
        cached_input_per_mtok: Nanos(25_000_000),
    }
}

/// The usage entry the benches settle a request with: 100 prompt and 50 completion tokens.
pub fn bench_entry(
    request_id: RequestId,
    tenant: &TenantId,
    key_id: &KeyId,
    model: &ModelId,
) -> UsageEntry {
    UsageEntry {
        request_id,
        tenant: tenant.clone(),
        key_id: key_id.clone(),
        model: Some(model.clone()),
        endpoint: "chat.completions".to_owned(),
        prompt_tokens: 100,
        completion_tokens: 50,
        cached_prompt_tokens: 0,
        cached_prompt_tokens_unknown: false,
        status: UsageStatus::Ok,
        latency_ms: 1,
        created_at_ms: 0,
    }
}

/// Runs `f` over `ids` with at most `concurrency` calls in flight.
async fn run_all<F, Fut>(
    ledger: &Ledger,
    ids: &[RequestId],
    concurrency: u32,
    f: F,
) -> Result<(), LedgerError>
where
    F: Fn(Ledger, RequestId) -> Fut,
    Fut: Future<Output = Result<(), LedgerError>> + Send + 'static,
{
    let in_flight_max = usize::try_from(concurrency).unwrap_or(1).max(1);
    let mut tasks = JoinSet::new();
    for id in ids {
        while tasks.len() >= in_flight_max {
            if let Some(done) = tasks.join_next().await {
                done.map_err(|_| LedgerError::WriterFailed)??;
            }
        }
        tasks.spawn(f(ledger.clone(), *id));
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(|_| LedgerError::WriterFailed)??;
    }
    Ok(())
}

/// Measures settles per second on `database_url` in a fresh bench tenant (left in the database
/// so its rows can be inspected; its name starts with `bench-`).
pub async fn bench_settles(
    database_url: &str,
    settles: u32,
    concurrency: u32,
) -> Result<SettleBench, LedgerError> {
    if settles == 0 || settles > BENCH_SETTLES_MAX {
        return Err(LedgerError::OutOfRange {
            field: "bench settles",
        });
    }
    if concurrency == 0 || concurrency > BENCH_CONCURRENCY_MAX {
        return Err(LedgerError::OutOfRange {
            field: "bench concurrency",
        });
    }
    let ledger = Ledger::connect(database_url).await?;
    let tenant = TenantId::new(format!("bench-{}", uuid::Uuid::now_v7().simple()))?;
    let model = ModelId::new("bench-model").map_err(tidepool_core::CoreError::from)?;
    let audit = &AuditContext::SYSTEM;
    ledger.create_tenant(&tenant, Currency::USD, audit).await?;
    ledger
        .credit(
            &tenant,
            Nanos(crate::accounts::CREDIT_NANOS_MAX),
            "bench",
            audit,
        )
        .await?;
    ledger.set_price(&bench_price(model.clone()), audit).await?;
    let key = ledger.create_key(&tenant, "bench", audit).await?;
    let key_id = key.record.key_id;

    let ids: Vec<RequestId> = (0..settles).map(|_| RequestId::new()).collect();
    let reserve_start = tokio::time::Instant::now();
    let reserve_key = key_id.clone();
    let reserve_model = model.clone();
    run_all(&ledger, &ids, concurrency, move |l, request_id| {
        let request = ReserveRequest {
            request_id,
            key_id: reserve_key.clone(),
            model: reserve_model.clone(),
            prompt_tokens: 100,
            completion_tokens_max: 100,
            idempotency_key: None,
            class: crate::ReserveClass::Online,
        };
        async move { l.reserve(&request).await.map(drop) }
    })
    .await?;
    let reserve_elapsed = reserve_start.elapsed();

    let start = tokio::time::Instant::now();
    run_all(&ledger, &ids, concurrency, move |l, request_id| {
        let entry = bench_entry(request_id, &tenant, &key_id, &model);
        async move { l.settle(&entry).await.map(drop) }
    })
    .await?;
    let elapsed = start.elapsed();

    Ok(SettleBench {
        store: ledger.store_kind(),
        settles,
        concurrency,
        elapsed,
        settles_per_second: per_second(settles, elapsed),
        reserves_per_second: per_second(settles, reserve_elapsed),
    })
}

/// Most usage rows one [`bench_seed_usage`] call may write.
pub const BENCH_USAGE_ROWS_MAX: u64 = 10_000_000;
/// Most tenants, projects per tenant, keys per project or models [`bench_seed_usage`] spreads
/// rows over.
pub const BENCH_SEED_DIMENSION_MAX: u32 = 64;
/// Usage rows written per transaction while seeding.
const SEED_CHUNK_ROWS: usize = 1_000;
const _: () = assert!(
    SEED_CHUNK_ROWS * USAGE_BINDS < SQLITE_BINDS_MAX,
    "a seed chunk fits SQLite's bind limit"
);
const MS_PER_DAY: u64 = 86_400_000;

/// What [`bench_seed_usage`] writes: `rows` usage entries spread evenly at random (a fixed
/// seed, so every run writes the same figures) over `tenants` × `projects` × `keys_per_project`
/// keys, `models` models and the `days` UTC days ending with `last_day`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageSeed {
    pub rows: u64,
    pub tenants: u32,
    /// Projects per tenant.
    pub projects: u32,
    pub keys_per_project: u32,
    pub models: u32,
    pub days: u32,
    pub last_day: Day,
}

/// What [`bench_seed_usage`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeededUsage {
    /// The bench tenants, named `bench-…`.
    pub tenants: Vec<TenantId>,
    pub rows: u64,
}

/// `SplitMix64`: the row generator's hash of a row number (a fixed, seedless sequence).
fn mix(value: u64) -> u64 {
    let mut z = value.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `value % bound` as an index (`bound` > 0).
fn pick(value: u64, bound: u32) -> usize {
    usize::try_from(value.checked_rem(u64::from(bound)).unwrap_or(0)).unwrap_or(0)
}

/// `value % bound` as a `u32` (`bound` > 0).
fn below(value: u64, bound: u32) -> u32 {
    u32::try_from(value.checked_rem(u64::from(bound)).unwrap_or(0)).unwrap_or(0)
}

/// One key of the seed with where it belongs.
#[derive(Debug)]
struct SeedKey {
    tenant: TenantId,
    project: ProjectId,
    key_id: KeyId,
}

fn check_seed(seed: &UsageSeed) -> Result<(), LedgerError> {
    if seed.rows == 0 || seed.rows > BENCH_USAGE_ROWS_MAX {
        return Err(LedgerError::OutOfRange {
            field: "bench usage rows",
        });
    }
    for (value, field) in [
        (seed.tenants, "bench tenants"),
        (seed.projects, "bench projects"),
        (seed.keys_per_project, "bench keys per project"),
        (seed.models, "bench models"),
    ] {
        if value == 0 || value > BENCH_SEED_DIMENSION_MAX {
            return Err(LedgerError::OutOfRange { field });
        }
    }
    if seed.days == 0 || seed.days > USAGE_DAILY_DAYS_MAX {
        return Err(LedgerError::OutOfRange {
            field: "bench days",
        });
    }
    Ok(())
}

/// Writes `seed.rows` billed usage entries and their daily rollup in bulk, for the rollup
/// benchmark: fresh `bench-…` tenants (with USD accounts), their projects and keys, and models
/// `bench-model-<n>` priced at [`bench_price`] are created through the ledger's API; then the
/// entries go in transactions of a thousand, each writing its entries and their rollup with the
/// two statements the settle writer uses. No reservation, balance or budget moves: the entries
/// are history to read back. Ends with `ANALYZE`, so the planner knows the tables' sizes.
#[expect(
    clippy::too_many_lines,
    reason = "accounts, then the entries in batches: one seeding, read top to bottom"
)]
pub async fn bench_seed_usage(
    ledger: &Ledger,
    seed: &UsageSeed,
) -> Result<SeededUsage, LedgerError> {
    check_seed(seed)?;
    let run = uuid::Uuid::now_v7().simple().to_string();
    let run = run.get(run.len().saturating_sub(12)..).unwrap_or("run");
    let mut tenants = Vec::new();
    let mut keys = Vec::new();
    for t in 0..seed.tenants {
        let tenant = TenantId::new(format!("bench-{run}-t{t}"))?;
        ledger
            .create_tenant(&tenant, Currency::USD, &AuditContext::SYSTEM)
            .await?;
        for p in 0..seed.projects {
            let project = ProjectId::new(format!("p{p}"))?;
            ledger
                .create_project(&tenant, &project, &AuditContext::SYSTEM)
                .await?;
            for k in 0..seed.keys_per_project {
                let key = ledger
                    .create_key_in_project(
                        &tenant,
                        &project,
                        &format!("bench-{k}"),
                        &AuditContext::SYSTEM,
                    )
                    .await?;
                keys.push(SeedKey {
                    tenant: tenant.clone(),
                    project: project.clone(),
                    key_id: key.record.key_id,
                });
            }
        }
        tenants.push(tenant);
    }
    let mut prices = Vec::new();
    for m in 0..seed.models {
        let model =
            ModelId::new(format!("bench-model-{m}")).map_err(tidepool_core::CoreError::from)?;
        let price = bench_price(model);
        ledger.set_price(&price, &AuditContext::SYSTEM).await?;
        prices.push(price);
    }
    let keys_per_tenant = seed.projects.saturating_mul(seed.keys_per_project);
    let first_day = seed
        .last_day
        .saturating_add_days(1_i64.saturating_sub(i64::from(seed.days)));
    let mut start: u64 = 0;
    while start < seed.rows {
        let chunk = u64::try_from(SEED_CHUNK_ROWS).unwrap_or(1);
        let end = start.saturating_add(chunk).min(seed.rows);
        let mut generated = Vec::new();
        for row in start..end {
            generated.push(seed_row(
                seed,
                row,
                keys_per_tenant,
                first_day,
                &keys,
                &prices,
            )?);
        }
        write_seed_chunk(ledger, &generated).await?;
        start = end;
    }
    on_store!(&ledger.store, pool => {
        sqlx::query("ANALYZE").execute(pool).await?;
    });
    Ok(SeededUsage {
        tenants,
        rows: seed.rows,
    })
}

/// One generated row: the key and price it is billed to, and its figures.
#[derive(Debug)]
struct SeedRow<'a> {
    key: &'a SeedKey,
    price: &'a PriceVersion,
    request_id: String,
    month: String,
    prompt_tokens: u32,
    cached_prompt_tokens: u32,
    completion_tokens: u32,
    error: bool,
    cost: Nanos,
    created_at_ms: i64,
}

fn seed_row<'a>(
    seed: &UsageSeed,
    row: u64,
    keys_per_tenant: u32,
    first_day: Day,
    keys: &'a [SeedKey],
    prices: &'a [PriceVersion],
) -> Result<SeedRow<'a>, LedgerError> {
    let a = mix(row);
    let b = mix(a);
    let tenant = pick(a, seed.tenants);
    let key_index = tenant
        .saturating_mul(usize::try_from(keys_per_tenant).unwrap_or(0))
        .saturating_add(pick(a >> 8, keys_per_tenant));
    let key = keys.get(key_index).ok_or(LedgerError::Invariant {
        what: "seed key index",
    })?;
    let price = prices
        .get(pick(a >> 16, seed.models))
        .ok_or(LedgerError::Invariant {
            what: "seed model index",
        })?;
    let day = first_day.saturating_add_days(i64::from(below(a >> 24, seed.days)));
    let in_day = i64::try_from((b >> 8).checked_rem(MS_PER_DAY).unwrap_or(0)).unwrap_or(0);
    let created_at_ms = day.start_ms().saturating_add(in_day);
    let prompt_tokens = below(b, 2_000).saturating_add(20);
    let cached_prompt_tokens = below(b >> 12, prompt_tokens.saturating_add(1)) >> 1;
    // One request in fifty fails part-way: it keeps the tokens it used, at no cost.
    let error = below(b >> 40, 50) == 0;
    let completion_tokens = below(b >> 24, 600);
    let cost = if error {
        Nanos::ZERO
    } else {
        cost_of(
            BilledTokens {
                prompt_tokens,
                cached_prompt_tokens,
                completion_tokens,
            },
            price,
        )?
    };
    Ok(SeedRow {
        key,
        price,
        request_id: RequestId::new().to_string(),
        month: Month::of_ms(created_at_ms).to_string(),
        prompt_tokens,
        cached_prompt_tokens,
        completion_tokens,
        error,
        cost,
        created_at_ms,
    })
}

/// One transaction: the chunk's usage entries and what they add to the rollup.
async fn write_seed_chunk(ledger: &Ledger, generated: &[SeedRow<'_>]) -> Result<(), LedgerError> {
    let rows: Vec<UsageRow<'_>> = generated
        .iter()
        .map(|g| UsageRow {
            entry: FreeUsageRow {
                request_id: g.request_id.clone(),
                tenant: g.key.tenant.as_str(),
                key_id: &g.key.key_id.0,
                model: Some(g.price.model.as_str()),
                endpoint: "chat.completions",
                prompt_tokens: i64::from(g.prompt_tokens),
                completion_tokens: i64::from(g.completion_tokens),
                cached_prompt_tokens: i64::from(g.cached_prompt_tokens),
                cached_prompt_tokens_unknown: 0,
                status: if g.error { "error" } else { "ok" },
                error_code: g.error.then_some("backend_failed"),
                latency_ms: 100,
                created_at_ms: g.created_at_ms,
            },
            project: g.key.project.as_str(),
            month: &g.month,
            currency: g.price.currency.as_str(),
            cost_nanos: g.cost.0,
            price_effective_from_ms: g.price.effective_from_ms,
            input_per_mtok_nanos: g.price.input_per_mtok.0,
            output_per_mtok_nanos: g.price.output_per_mtok.0,
            cached_input_per_mtok_nanos: g.price.cached_input_per_mtok.0,
        })
        .collect();
    let daily = daily_rows(&rows)?;
    let _gate = ledger.gate.enter().await;
    on_store!(&ledger.store, pool => {
        let mut tx = pool.begin_with(ledger.store.begin_write_sql()).await?;
        let inserted = tx.insert_usage(&rows).await?;
        if inserted != u64::try_from(rows.len()).unwrap_or(u64::MAX) {
            return Err(LedgerError::Invariant { what: "seeded request ids are fresh" });
        }
        tx.add_usage_daily(&daily).await?;
        tx.commit().await?;
    });
    Ok(())
}

/// A PostgreSQL database made for one benchmark run: `tp_bench_<uuid>` on the server of an
/// admin URL, dropped by [`BenchDatabase::drop_database`].
#[derive(Debug)]
pub struct BenchDatabase {
    /// The new database's URL.
    pub url: String,
    admin_url: String,
    name: String,
}

impl BenchDatabase {
    /// Creates the database next to the one `admin_url` names (a role allowed to create
    /// databases).
    pub async fn create(admin_url: &str) -> Result<Self, LedgerError> {
        let name = format!("tp_bench_{}", uuid::Uuid::now_v7().simple());
        let (base, _) = admin_url
            .rsplit_once('/')
            .ok_or(LedgerError::UnsupportedUrl)?;
        let mut admin = PgConnection::connect(admin_url).await?;
        // Identifiers cannot be bound; `name` is made above of hex digits.
        QueryBuilder::<sqlx::Postgres>::new("CREATE DATABASE ")
            .push(&name)
            .build()
            .execute(&mut admin)
            .await?;
        admin.close().await?;
        Ok(Self {
            url: format!("{base}/{name}"),
            admin_url: admin_url.to_owned(),
            name,
        })
    }

    /// Drops the database, closing whatever connections are still open on it.
    pub async fn drop_database(self) -> Result<(), LedgerError> {
        let mut admin = PgConnection::connect(&self.admin_url).await?;
        QueryBuilder::<sqlx::Postgres>::new("DROP DATABASE IF EXISTS ")
            .push(&self.name)
            .push(" WITH (FORCE)")
            .build()
            .execute(&mut admin)
            .await?;
        admin.close().await?;
        Ok(())
    }
}
