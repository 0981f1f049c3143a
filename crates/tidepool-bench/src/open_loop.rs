//! The open-loop client of the benchmarks that measure gateways from outside (`bench ledger`,
//! `bench telemetry`): one request every `1 / rate` seconds, whatever the answers do, each timed
//! from when it goes out to its last body byte; the targets take turns pass by pass, the order
//! rotating each round, so the machine's drift hits them all alike.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use crate::common::{ms, percentile};

/// Requests per target before any is timed.
pub(crate) const WARMUP_REQUESTS: u32 = 50;
/// Pause between two passes.
pub(crate) const PASS_GAP: Duration = Duration::from_millis(300);

/// A gateway under test: a name for the logs, its URL and a key.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Target<'a> {
    pub(crate) name: &'a str,
    pub(crate) url: &'a str,
    pub(crate) key: &'a str,
}

/// The client of a run: enough idle connections per target for the open loop's bursts.
pub(crate) fn client() -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
}

/// Each target's latencies over all its passes (ms), and the p99 of each of its passes.
pub(crate) type Interleaved = (Vec<Vec<f64>>, Vec<Vec<f64>>);

/// [`WARMUP_REQUESTS`] untimed requests per target, then `rounds` rounds of one [`pass`] per
/// target, the order rotating each round, [`PASS_GAP`] before each pass.
pub(crate) async fn interleaved(
    client: &reqwest::Client,
    targets: &[Target<'_>],
    body: &Value,
    rounds: u32,
    rate_per_s: u32,
    requests: u32,
) -> anyhow::Result<Interleaved> {
    for target in targets {
        for _ in 0..WARMUP_REQUESTS {
            if let Err(why) = post(client, target.url, target.key, body).await {
                anyhow::bail!("warm-up request to {} failed: {why}", target.url);
            }
        }
    }
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    let mut pass_p99: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    for round in 0..rounds {
        let shift = usize::try_from(round).unwrap_or(0) % targets.len().max(1);
        for index in (0..targets.len()).map(|i| (i + shift) % targets.len()) {
            tokio::time::sleep(PASS_GAP).await;
            let target = targets[index];
            let mut taken =
                pass(client, target.url, target.key, body, rate_per_s, requests).await?;
            pass_p99[index].push(percentile(&mut taken, 99));
            samples[index].extend(taken);
            tracing::info!(round, target = target.name, "open-loop pass done");
        }
    }
    Ok((samples, pass_p99))
}

/// Requests one pass may have outstanding before the target is declared unable to keep up.
pub(crate) const IN_FLIGHT_MAX: usize = 1024;

/// `requests` POSTs of `body` to `url` at `rate_per_s`; the latency of each, in ms. Fails if the
/// target falls [`IN_FLIGHT_MAX`] requests behind or any request fails.
async fn pass(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    body: &Value,
    rate_per_s: u32,
    requests: u32,
) -> anyhow::Result<Vec<f64>> {
    let interval = Duration::from_secs(1) / rate_per_s;
    let start = Instant::now() + Duration::from_millis(10);
    let target: Arc<str> = url.into();
    let key: Arc<str> = key.into();
    let body = Arc::new(body.clone());
    let mut in_flight = tokio::task::JoinSet::new();
    let mut samples = Vec::new();
    let mut failed = Failures::default();
    for index in 0..requests {
        tokio::time::sleep_until(start + interval * index).await;
        while let Some(done) = in_flight.try_join_next() {
            record(done?, &mut samples, &mut failed);
        }
        anyhow::ensure!(
            in_flight.len() < IN_FLIGHT_MAX,
            "{url} did not keep up with {rate_per_s} req/s"
        );
        let (client, target, key, body) = (
            client.clone(),
            Arc::clone(&target),
            Arc::clone(&key),
            Arc::clone(&body),
        );
        in_flight.spawn(async move {
            // Timed from when the request goes out: the client's own timer resolution (a
            // millisecond) is not the target's latency. The sends keep their schedule whatever
            // the answers do, so a slow target still meets the full rate.
            let sent = Instant::now();
            let outcome = post(&client, &target, &key, &body).await;
            (outcome, ms(sent.elapsed()))
        });
    }
    while let Some(done) = in_flight.join_next().await {
        record(done?, &mut samples, &mut failed);
    }
    anyhow::ensure!(
        failed.count == 0,
        "{} requests to {url} failed; the first: {}",
        failed.count,
        failed.first.unwrap_or_default()
    );
    Ok(samples)
}

/// The failed requests of a pass: how many, and what the first one got.
#[derive(Default)]
struct Failures {
    count: u32,
    first: Option<String>,
}

/// The longest part of a failed answer's body kept to say why it failed, in bytes.
const FAILED_BODY_BYTES_MAX: usize = 300;

/// One request: `Ok` when it succeeded with its whole body read, else what went wrong (the
/// status and the start of the body, or the transport error).
async fn post(client: &reqwest::Client, url: &str, key: &str, body: &Value) -> Result<(), String> {
    let response = client
        .post(url)
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .map_err(|error| error.to_string())?;
    let status = response.status();
    let bytes = response.bytes().await.map_err(|error| error.to_string())?;
    if status.is_success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&bytes);
    let end = text
        .char_indices()
        .map(|(i, _)| i)
        .find(|i| *i > FAILED_BODY_BYTES_MAX)
        .unwrap_or(text.len());
    Err(format!("{status} {}", text.get(..end).unwrap_or_default()))
}

fn record(
    (outcome, latency_ms): (Result<(), String>, f64),
    samples: &mut Vec<f64>,
    failed: &mut Failures,
) {
    match outcome {
        Ok(()) => samples.push(latency_ms),
        Err(why) => {
            failed.count = failed.count.saturating_add(1);
            failed.first.get_or_insert(why);
        }
    }
}
