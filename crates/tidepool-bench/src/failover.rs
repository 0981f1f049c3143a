//! `tidepool bench failover`: what a worker's death costs the clients of a gateway, and what the
//! gateway's routing costs when nothing dies. Everything runs on loopback, in child processes of
//! this binary: two `tidepool worker`s on the fake engine (routing is under test, not decoding)
//! behind one `tidepool serve` gateway.
//!
//! Failover, per trial: `clients` loops send non-stream requests through the gateway; the victim
//! worker is killed with SIGKILL; we record the time from the kill to the first successful
//! response *sent after the kill*, the time until `/v1/backends` shows the victim's breaker open,
//! and every request that failed (lost). The victim is then restarted on the same port and the
//! next trial waits until the gateway sees it healthy again.
//!
//! Overhead, same run: the same request sequentially against a worker directly and through the
//! gateway; p50/p99 of each and their difference.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::bail;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::common::{ms, percentile};
use crate::process::ChildServer;

#[derive(Debug, clap::Args)]
pub(crate) struct FailoverBenchArgs {
    /// Worker deaths to measure.
    #[arg(long, env = "TIDEPOOL_BENCH_TRIALS", default_value_t = 20)]
    trials: u32,
    /// Concurrent client loops during each trial.
    #[arg(long, env = "TIDEPOOL_BENCH_CLIENTS", default_value_t = 4)]
    clients: u32,
    /// Sequential requests per side for the overhead measurement.
    #[arg(long, env = "TIDEPOOL_BENCH_OVERHEAD_REQUESTS", default_value_t = 300)]
    overhead_requests: u32,
    /// Where the JSON report goes.
    #[arg(
        long,
        env = "TIDEPOOL_BENCH_OUT",
        default_value = "bench/out/failover.json"
    )]
    out: PathBuf,
    /// Seconds to wait for a server to become healthy.
    #[arg(long, default_value_t = 60)]
    startup_timeout_s: u64,
}

#[derive(Debug, Serialize)]
struct TrialReport {
    /// Kill → first successful response to a request sent after the kill.
    recovery_ms: f64,
    /// Kill → `/v1/backends` shows the victim's breaker open.
    detection_ms: f64,
    /// Requests that did not get a 200 during the trial.
    lost: u32,
    /// Requests that got a 200 during the trial.
    served: u32,
}

#[derive(Debug, Serialize)]
struct Report {
    trials: Vec<TrialReport>,
    recovery_ms_p50: f64,
    recovery_ms_max: f64,
    detection_ms_p50: f64,
    detection_ms_max: f64,
    lost_total: u32,
    served_total: u32,
    direct_ms_p50: f64,
    direct_ms_p99: f64,
    gateway_ms_p50: f64,
    gateway_ms_p99: f64,
    overhead_ms_p50: f64,
    overhead_ms_p99: f64,
}

const WORKER_CONFIG: &str = "[billing]\nenforce = false\n\n[[models]]\nid = \"chat\"\nkind = \"chat\"\nbackend = \"fake\"\n";

fn request_body(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "one two three"}], "max_tokens": 8})
}

async fn post(client: &reqwest::Client, base: &str, key: &str, body: &Value) -> bool {
    match client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
    {
        Ok(response) => response.status().is_success() && response.bytes().await.is_ok(),
        Err(_) => false,
    }
}

/// The victim's breaker state on the gateway's `/v1/backends`.
async fn victim_breaker(client: &reqwest::Client, base: &str) -> Option<String> {
    let listing: Value = client
        .get(format!("{base}/v1/backends"))
        .bearer_auth(crate::process::BENCH_ADMIN_TOKEN)
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    let victim = listing["data"]
        .as_array()?
        .iter()
        .find(|b| b["id"] == "victim")?;
    if victim["healthy"] == true {
        victim["breaker"].as_str().map(str::to_owned)
    } else {
        Some("unhealthy".to_owned())
    }
}

pub(crate) async fn run(args: FailoverBenchArgs) -> anyhow::Result<()> {
    let root = std::env::temp_dir().join(format!("tidepool-bench-failover-{}", std::process::id()));
    std::fs::create_dir_all(&root)?;
    let result = run_in(&args, &root).await;
    if let Err(error) = std::fs::remove_dir_all(&root) {
        tracing::warn!(%error, "could not remove the bench directory");
    }
    result
}

async fn run_in(args: &FailoverBenchArgs, root: &Path) -> anyhow::Result<()> {
    let timeout_s = args.startup_timeout_s;
    let mut workers = Vec::new();
    let mut backends = String::new();
    for name in ["victim", "survivor"] {
        let mut worker = ChildServer::new(root, name)?;
        worker.write_config(WORKER_CONFIG)?;
        let key = worker.key("gateway").await?;
        let key_file = root.join(format!("{name}.key"));
        std::fs::write(&key_file, &key)?;
        worker
            .start(&["worker", "--region", "a", "--zone", "a-1"], timeout_s)
            .await?;
        writeln!(
            backends,
            "[[backends]]\nid = \"{name}\"\nkind = \"worker\"\nurl = \"{}\"\nregion = \"a\"\nzone = \"a-1\"\napi_key_file = \"{}\"\nmodels = [\"chat\"]\n",
            worker.base(),
            key_file.display()
        )?;
        workers.push((worker, key));
    }
    let mut gateway = ChildServer::new(root, "gateway")?;
    gateway.write_config(&format!(
        "region = \"a\"\n\n[billing]\nenforce = false\n\n[[models]]\nid = \"chat\"\nkind = \"chat\"\nbackend = \"remote\"\n\n{backends}"
    ))?;
    let key = gateway.key("bench").await?;
    gateway.start(&["serve"], timeout_s).await?;
    let client = reqwest::Client::new();
    let base = gateway.base();

    let (direct, via_gateway) = overhead(args, &client, &workers[1], &base, &key).await;
    let mut trials = Vec::new();
    for trial in 0..args.trials {
        let (victim, _) = &mut workers[0];
        let report = one_trial(args, &client, &base, &key, victim).await?;
        tracing::info!(
            trial,
            recovery_ms = report.recovery_ms,
            lost = report.lost,
            "trial done"
        );
        trials.push(report);
        victim
            .start(&["worker", "--region", "a", "--zone", "a-1"], timeout_s)
            .await?;
        let deadline = Instant::now() + Duration::from_secs(timeout_s);
        while victim_breaker(&client, &base).await.as_deref() != Some("closed") {
            if Instant::now() > deadline {
                bail!("the gateway never saw the restarted victim healthy");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let report = summarize(trials, direct, via_gateway);
    write_report(args, &report)?;
    gateway.kill().await?;
    for (mut worker, _) in workers {
        worker.kill().await?;
    }
    Ok(())
}

async fn overhead(
    args: &FailoverBenchArgs,
    client: &reqwest::Client,
    worker: &(ChildServer, String),
    gateway_base: &str,
    gateway_key: &str,
) -> (Vec<f64>, Vec<f64>) {
    let (worker, worker_key) = worker;
    let direct_body = request_body("chat");
    let mut direct = Vec::new();
    let mut via_gateway = Vec::new();
    // Interleaved, so drift on a noisy machine hits both sides alike.
    for _ in 0..args.overhead_requests {
        let started = Instant::now();
        if post(client, &worker.base(), worker_key, &direct_body).await {
            direct.push(ms(started.elapsed()));
        }
        let started = Instant::now();
        if post(client, gateway_base, gateway_key, &direct_body).await {
            via_gateway.push(ms(started.elapsed()));
        }
    }
    (direct, via_gateway)
}

async fn one_trial(
    args: &FailoverBenchArgs,
    client: &reqwest::Client,
    base: &str,
    key: &str,
    victim: &mut ChildServer,
) -> anyhow::Result<TrialReport> {
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU32::new(0));
    let lost = Arc::new(AtomicU32::new(0));
    // Instants as microseconds since `base` plus one; 0: not yet.
    let base_instant = Instant::now();
    let killed_at = Arc::new(AtomicU64::new(0));
    let recovered_at = Arc::new(AtomicU64::new(0));
    let since_base = move |at: Instant| {
        u64::try_from(at.duration_since(base_instant).as_micros())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    };
    let mut loops = tokio::task::JoinSet::new();
    for _ in 0..args.clients {
        let (client, base, key) = (client.clone(), base.to_owned(), key.to_owned());
        let (stop, served, lost) = (Arc::clone(&stop), Arc::clone(&served), Arc::clone(&lost));
        let (killed_at, recovered_at) = (Arc::clone(&killed_at), Arc::clone(&recovered_at));
        loops.spawn(async move {
            let body = request_body("chat");
            while !stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                if post(&client, &base, &key, &body).await {
                    served.fetch_add(1, Ordering::Relaxed);
                    let killed = killed_at.load(Ordering::SeqCst);
                    if killed != 0 && since_base(sent) >= killed {
                        // Only the first success after the kill counts.
                        let _first_success = recovered_at.compare_exchange(
                            0,
                            since_base(Instant::now()),
                            Ordering::SeqCst,
                            Ordering::SeqCst,
                        );
                    }
                } else {
                    lost.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    // Let the load settle on both workers, then kill.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let kill_time = Instant::now();
    killed_at.store(since_base(kill_time), Ordering::SeqCst);
    victim.kill().await?;
    let mut detection = None;
    while detection.is_none() || recovered_at.load(Ordering::SeqCst) == 0 {
        if detection.is_none()
            && victim_breaker(client, base)
                .await
                .is_some_and(|state| state != "closed")
        {
            detection = Some(kill_time.elapsed());
        }
        if kill_time.elapsed() > Duration::from_secs(30) {
            bail!("no recovery within 30 s of the kill");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::Relaxed);
    while loops.join_next().await.is_some() {}
    let recovered_us = recovered_at
        .load(Ordering::SeqCst)
        .saturating_sub(killed_at.load(Ordering::SeqCst));
    Ok(TrialReport {
        recovery_ms: ms(Duration::from_micros(recovered_us)),
        detection_ms: detection.map_or(f64::NAN, ms),
        lost: lost.load(Ordering::Relaxed),
        served: served.load(Ordering::Relaxed),
    })
}

fn summarize(trials: Vec<TrialReport>, mut direct: Vec<f64>, mut gateway: Vec<f64>) -> Report {
    let mut recovery: Vec<f64> = trials.iter().map(|t| t.recovery_ms).collect();
    let mut detection: Vec<f64> = trials.iter().map(|t| t.detection_ms).collect();
    let max = |v: &[f64]| v.iter().copied().fold(0.0_f64, f64::max);
    let direct_ms_p50 = percentile(&mut direct, 50);
    let direct_ms_p99 = percentile(&mut direct, 99);
    let gateway_ms_p50 = percentile(&mut gateway, 50);
    let gateway_ms_p99 = percentile(&mut gateway, 99);
    Report {
        recovery_ms_p50: percentile(&mut recovery, 50),
        recovery_ms_max: max(&recovery),
        detection_ms_p50: percentile(&mut detection, 50),
        detection_ms_max: max(&detection),
        lost_total: trials.iter().map(|t| t.lost).sum(),
        served_total: trials.iter().map(|t| t.served).sum(),
        trials,
        direct_ms_p50,
        direct_ms_p99,
        gateway_ms_p50,
        gateway_ms_p99,
        overhead_ms_p50: gateway_ms_p50 - direct_ms_p50,
        overhead_ms_p99: gateway_ms_p99 - direct_ms_p99,
    }
}

fn write_report(args: &FailoverBenchArgs, report: &Report) -> anyhow::Result<()> {
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(report)?)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "failover over {} trials ({} clients): recovery p50 {:.1} ms, max {:.1} ms; breaker open p50 {:.1} ms, max {:.1} ms; lost {} of {} requests",
        report.trials.len(),
        args.clients,
        report.recovery_ms_p50,
        report.recovery_ms_max,
        report.detection_ms_p50,
        report.detection_ms_max,
        report.lost_total,
        report.lost_total + report.served_total,
    )?;
    writeln!(
        out,
        "gateway overhead over a direct call to the same worker: p50 {:.2} ms ({:.2} vs {:.2}), p99 {:.2} ms ({:.2} vs {:.2})",
        report.overhead_ms_p50,
        report.gateway_ms_p50,
        report.direct_ms_p50,
        report.overhead_ms_p99,
        report.gateway_ms_p99,
        report.direct_ms_p99,
    )?;
    writeln!(out, "report: {}", args.out.display())?;
    Ok(())
}
