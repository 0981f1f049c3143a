//! The latency of one metered request's two ledger calls when nothing else is in flight: a
//! `reserve`, then its `settle`, then a pause, `calls` times, on a SQLite temp file (or the
//! PostgreSQL database of `TIDEPOOL_BENCH_POSTGRES_URL` with `postgres`); prints p50 / p99 / max
//! of each call in µs. What a lightly loaded gateway's requests wait for in the ledger, without
//! the HTTP hop around it:
//! `cargo run --release -p tidepool-ledger --example bench_calls -- [calls] [pause_ms]
//! [sqlite|postgres]`.

use std::io::Write;
use std::time::{Duration, Instant};

use tidepool_core::{Currency, KeyId, ModelId, Nanos, RequestId, TenantId};
use tidepool_ledger::{
    AuditContext, Ledger, ReserveClass, ReserveRequest, bench_entry, bench_price,
};

/// Most calls of one run.
const CALLS_MAX: usize = 100_000;

fn percentile_us(sorted: &[Duration], q: f64) -> u128 {
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into a short, non-empty list"
    )]
    let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted.get(index).map_or(0, Duration::as_micros)
}

/// A ledger on `url` with a fresh funded tenant, a priced model and a key.
async fn funded(
    url: &str,
) -> Result<(Ledger, TenantId, ModelId, KeyId), Box<dyn std::error::Error>> {
    let ledger = Ledger::connect(url).await?;
    let audit = &AuditContext::SYSTEM;
    let tenant = TenantId::new(format!("bench-{}", uuid::Uuid::now_v7().simple()))?;
    let model = ModelId::new("bench-model")?;
    ledger.create_tenant(&tenant, Currency::USD, audit).await?;
    ledger
        .credit(&tenant, Nanos(1_000_000_000_000), "bench", audit)
        .await?;
    ledger.set_price(&bench_price(model.clone()), audit).await?;
    let key_id = ledger
        .create_key(&tenant, "bench", audit)
        .await?
        .record
        .key_id;
    Ok((ledger, tenant, model, key_id))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let calls: usize = args.next().map_or(Ok(2_000), |a| a.parse())?;
    let pause = Duration::from_millis(args.next().map_or(Ok(5), |a| a.parse())?);
    let store = args.next().unwrap_or_else(|| "sqlite".to_owned());
    if calls == 0 || calls > CALLS_MAX {
        return Err(format!("calls must be 1..={CALLS_MAX}").into());
    }
    let dir = tempfile::tempdir()?;
    let url = if store == "postgres" {
        std::env::var("TIDEPOOL_BENCH_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
    } else {
        format!("sqlite://{}", dir.path().join("calls.db").display())
    };
    let (ledger, tenant, model, key_id) = funded(&url).await?;

    let mut reserves = Vec::with_capacity(calls);
    let mut settles = Vec::with_capacity(calls);
    for _ in 0..calls {
        let request_id = RequestId::new();
        let request = ReserveRequest {
            request_id,
            key_id: key_id.clone(),
            model: model.clone(),
            prompt_tokens: 100,
            completion_tokens_max: 100,
            idempotency_key: None,
            class: ReserveClass::Online,
        };
        let start = Instant::now();
        ledger.reserve(&request).await?;
        reserves.push(start.elapsed());
        let entry = bench_entry(request_id, &tenant, &key_id, &model);
        let start = Instant::now();
        ledger.settle(&entry).await?;
        settles.push(start.elapsed());
        tokio::time::sleep(pause).await;
    }
    let mut out = std::io::stdout().lock();
    for (call, times) in [("reserve", &mut reserves), ("settle", &mut settles)] {
        times.sort_unstable();
        writeln!(
            out,
            "{store:<8} {call:<7} calls={calls} p50_us={} p99_us={} max_us={}",
            percentile_us(times, 0.5),
            percentile_us(times, 0.99),
            times.last().map_or(0, Duration::as_micros)
        )?;
    }
    Ok(())
}
