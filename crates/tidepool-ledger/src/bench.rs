//! `tidepool bench ledger`: settled usages per second through the real group-commit writer.
//! Reservations are placed first (not timed); then `settles` settles run with `concurrency` in
//! flight, the way a busy gateway would call them.

use std::time::Duration;

use tidepool_core::{Currency, KeyId, ModelId, Nanos, RequestId, TenantId};
use tokio::task::JoinSet;

use crate::audit::AuditContext;
use crate::billing::ReserveRequest;
use crate::price::PriceVersion;
use crate::{Ledger, LedgerError, UsageEntry, UsageStatus};

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

fn bench_entry(
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
