//! A scaled-out deployment on several hosts (docs/deploy.md, "Several hosts on one machine"):
//! `HAProxy` on one host, two gateway replicas on two more, PostgreSQL on its own host, and a
//! worker in each of two regions, every host a network namespace on one bridge. Under steady
//! mixed load through the load balancer:
//!
//! - a gateway replica dies by SIGKILL: no non-stream request fails (`HAProxy` retries the refused
//!   or emptied ones on the other replica), the streams it carried end early and are billed for
//!   at most the tokens their clients received, once it restarts;
//! - a region's worker dies: unpinned tenants fail over with no failed request, a tenant pinned
//!   to that region gets 503 `no_backend_in_region` and the other region never sees it;
//! - 200 concurrent requests against a budget that fits 50, spread over both replicas: exactly
//!   50 succeed; 60 against a key's limit of 30 per minute: exactly 30; an `Idempotency-Key`
//!   used on both replicas runs once;
//! - every tenant's statement reconciles to the nano-unit with what the clients were served.
//!
//! Workers run the fake engine (routing, failover and billing are under test, not generation).
//! Assertions read outcomes, never timings; the figures the test prints (counts, the longest
//! request around the kill) are for docs/deploy.md.

use std::fmt::Write as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tidepool_core::{RequestId, TenantId};
use tidepool_ledger::testing::ThrowawayPostgres;
use tidepool_ledger::{Ledger, LedgerOptions, UsageStatus};

use crate::harness::{
    POLL, Server, TempDir, backend_toml, content_chunks, fake_worker_config, write_key,
};
use crate::netns::Net;

/// 1,000 nanos per completion token and free prompts: a request's cost is exact and known to
/// the client from its `usage`, and its reservation equals its cost (the budget scenario).
const PRICE_NANOS_PER_TOKEN: u64 = 1_000;
const MODEL: &str = "[[models]]\nid = \"chat\"\nkind = \"chat\"\nbackend = \"remote\"\nprice_input_per_mtok = 0\nprice_output_per_mtok = 1_000_000_000\n\n";
const READY_PATH: &str = "/readyz";
const NON_STREAM_TOKENS: u64 = 8;
const STREAM_TOKENS: u64 = 40;
/// A worker's decode step: streams run ≈ 0.4 s, long enough to be cut by a kill.
const WORKER_DECODE_STEP_US: u32 = 10_000;

/// Load balancer in front of the two gateways: health-checks `/readyz`, and retries a request
/// whose connection was refused or whose server closed without answering on the other replica.
fn haproxy_config(listen: &str, gateways: &[(&str, &str)], errorfile: &Path) -> String {
    let mut servers = String::new();
    for (name, ip) in gateways {
        writeln!(servers, "    server {name} {ip}:8080 check").unwrap();
    }
    format!(
        "global\n    maxconn 4096\n\n\
         defaults\n    mode http\n    timeout connect 1s\n    timeout client 60s\n    timeout server 60s\n\
         \x20   retries 3\n    option redispatch 1\n    retry-on conn-failure empty-response response-timeout\n\
         \x20   errorfile 503 {}\n\n\
         frontend api\n    bind {listen}:8080\n    default_backend gateways\n\n\
         backend gateways\n    balance roundrobin\n    option httpchk GET {READY_PATH}\n    http-check expect status 200\n\
         \x20   default-server inter 250ms fastinter 100ms downinter 250ms fall 2 rise 2\n{servers}",
        errorfile.display()
    )
}

/// What the load balancer answers when no gateway is ready: the gateways' own 503, so a client
/// sees one error shape (and `Retry-After`) whoever answers.
const NO_GATEWAY_503: &str = "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n\
    Retry-After: 1\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n\
    {\"error\":{\"message\":\"no gateway is ready, retry later\",\"type\":\"server_error\",\
    \"param\":null,\"code\":\"unavailable\"}}\n";

/// `HAProxy` in the foreground inside `netns`; killed on drop.
struct Haproxy(Child);

impl Haproxy {
    fn start(dir: &Path, netns: &str, config: &str) -> Self {
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, config).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", netns, "haproxy", "-db", "-f"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("haproxy.log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start haproxy (Debian's haproxy package): {e}"));
        Self(child)
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        drop(self.0.kill());
        drop(self.0.wait());
    }
}

/// What one client request saw.
#[derive(Debug, Clone)]
struct Outcome {
    stream: bool,
    status: u16,
    request_id: Option<String>,
    /// Completion tokens the client received (content deltas for streams, `usage` otherwise).
    tokens: u64,
    /// The stream ended with `[DONE]` (non-stream: a 200 body).
    complete: bool,
    started: Instant,
    finished: Instant,
    body: String,
}

/// One request through the load balancer.
async fn request(client: &reqwest::Client, base: &str, key: &str, stream: bool) -> Outcome {
    let tokens = if stream {
        STREAM_TOKENS
    } else {
        NON_STREAM_TOKENS
    };
    let body = json!({"model": "chat", "stream": stream, "max_tokens": tokens,
        "stream_options": if stream { json!({"include_usage": true}) } else { Value::Null },
        "messages": [{"role": "user", "content": "tell me about tide pools"}]});
    let started = Instant::now();
    let sent = client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await;
    let response = match sent {
        Ok(response) => response,
        Err(error) => {
            return Outcome {
                stream,
                status: 0,
                request_id: None,
                tokens: 0,
                complete: false,
                started,
                finished: Instant::now(),
                body: error.to_string(),
            };
        }
    };
    let status = response.status().as_u16();
    let request_id = response
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut response = response;
    let mut text = String::new();
    // A cut connection is an error here: what arrived before it counts.
    while let Ok(Some(bytes)) = response.chunk().await {
        text.push_str(&String::from_utf8_lossy(&bytes));
    }
    let (tokens, complete) = if stream {
        (content_chunks(&text) as u64, text.contains("data: [DONE]"))
    } else {
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        (
            value["usage"]["completion_tokens"].as_u64().unwrap_or(0),
            status == 200,
        )
    };
    Outcome {
        stream,
        status,
        request_id,
        tokens,
        complete,
        started,
        finished: Instant::now(),
        body: text,
    }
}

/// Clients sending requests in a loop until stopped; every outcome is kept.
struct Load {
    stop: Arc<AtomicBool>,
    ok_non_stream: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Outcome>>>,
}

impl Load {
    fn start(base: &str, key: &str, non_stream: usize, stream: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok_non_stream = Arc::new(AtomicUsize::new(0));
        let client = reqwest::Client::new();
        let mut tasks = Vec::new();
        for i in 0..non_stream + stream {
            let (client, base, key) = (client.clone(), base.to_owned(), key.to_owned());
            let (stop, ok) = (Arc::clone(&stop), Arc::clone(&ok_non_stream));
            tasks.push(tokio::spawn(async move {
                let mut outcomes = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let outcome = request(&client, &base, &key, i >= non_stream).await;
                    if !outcome.stream && outcome.status == 200 {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    outcomes.push(outcome);
                }
                outcomes
            }));
        }
        Self {
            stop,
            ok_non_stream,
            tasks,
        }
    }

    fn ok_non_stream(&self) -> usize {
        self.ok_non_stream.load(Ordering::Relaxed)
    }

    async fn until_ok_non_stream(&self, at_least: usize) {
        while self.ok_non_stream() < at_least {
            tokio::time::sleep(POLL).await;
        }
    }

    async fn finish(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        let mut outcomes = Vec::new();
        for task in self.tasks {
            outcomes.extend(task.await.unwrap());
        }
        outcomes
    }
}

/// A gateway replica on `netns`/`ip` with `--replica-id name`.
fn gateway(
    root: &Path,
    name: &str,
    netns: &str,
    ip: &str,
    database_url: &str,
    backends: &str,
) -> Server {
    let mut server = Server::on_host(root, name, netns, ip, database_url);
    server.write_config(&format!(
        "region = \"eu\"\nzone = \"eu-a\"\n\n[billing]\ncheckpoint_tokens = 4\n\n\
         [residency.tenants]\npinned = [\"eu\"]\n\n[routing]\nbreaker_open_ms = 60000\n\n{MODEL}{backends}"
    ));
    server
        .env
        .push(("TIDEPOOL_REPLICA_ID".to_owned(), name.to_owned()));
    server
}

/// A fake-engine worker of `region` on its own host; returns it and the key the gateways use.
async fn worker(root: &Path, name: &str, netns: &str, ip: &str, region: &str) -> (Server, String) {
    let mut server = Server::on_host(root, name, netns, ip, "");
    server.database_url = format!("sqlite://{}", server.dir.join("tidepool.db").display());
    server.write_config(&fake_worker_config().replace(
        "fake_decode_step_us = 2000",
        &format!("fake_decode_step_us = {WORKER_DECODE_STEP_US}"),
    ));
    let key = server.key("gateways");
    server.spawn(&[
        "worker",
        "--region",
        region,
        "--zone",
        &format!("{region}-a"),
    ]);
    server.ready().await;
    (server, key)
}

/// Creates a tenant with 100 units of credit on the shared ledger; returns its key.
fn tenant(admin: &Server, name: &str) -> String {
    admin.key(name)
}

async fn ledger(database_url: &str) -> Ledger {
    Ledger::connect_with(
        database_url,
        LedgerOptions {
            replica_id: "test-reader".to_owned(),
            ..LedgerOptions::default()
        },
    )
    .await
    .unwrap()
}

/// The nanos `tenant` was charged: 100 units of credit minus the balance, once no reservation
/// is open (a response can reach its client a moment before its settlement commits).
async fn charged(ledger: &Ledger, tenant: &str) -> u64 {
    let tenant_id = TenantId::new(tenant).unwrap();
    let account = loop {
        let account = ledger.account(&tenant_id).await.unwrap();
        if account.reserved.0 == 0 {
            break account;
        }
        tokio::time::sleep(POLL).await;
    };
    let credit: i64 = 100_000_000_000;
    u64::try_from(credit - account.balance.0).unwrap()
}

/// `n` concurrent non-stream requests of `key`; how many ended with each (status, error code).
async fn burst(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    n: usize,
) -> std::collections::BTreeMap<(u16, String), usize> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (client, base, key) = (client.clone(), base.to_owned(), key.to_owned());
        tasks.push(tokio::spawn(async move {
            request(&client, &base, &key, false).await
        }));
    }
    let mut counts = std::collections::BTreeMap::new();
    for task in tasks {
        let o = task.await.unwrap();
        let code = serde_json::from_str::<Value>(&o.body).unwrap_or(Value::Null)["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        *counts.entry((o.status, code)).or_insert(0) += 1;
    }
    counts
}

/// The usage entry of request `id`, once its settlement has committed (a response can reach
/// its client a moment before).
async fn entry_of(ledger: &Ledger, id: RequestId) -> tidepool_ledger::UsageEntry {
    loop {
        if let Some(entry) = ledger.usage_entry(id).await.unwrap() {
            return entry;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The longest non-stream request among `outcomes`.
fn longest(outcomes: &[&Outcome]) -> Duration {
    outcomes
        .iter()
        .filter(|o| !o.stream)
        .map(|o| o.finished - o.started)
        .max()
        .unwrap_or_default()
}

fn median_non_stream(outcomes: &[Outcome]) -> Duration {
    let mut latencies: Vec<Duration> = outcomes
        .iter()
        .filter(|o| !o.stream)
        .map(|o| o.finished - o.started)
        .collect();
    latencies.sort();
    latencies
        .get(latencies.len() / 2)
        .copied()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_process_multihost_replicas_regions_budget_and_statement_hold_across_hosts() {
    let root = TempDir::new();
    let root = root.path();
    let mut net = Net::new();
    let (lb, db, gw1_ns, gw2_ns, eu_ns, us_ns) = (
        net.host("lb", 2),
        net.host("db", 5),
        net.host("gw1", 11),
        net.host("gw2", 12),
        net.host("weu", 21),
        net.host("wus", 22),
    );
    let (lb_ip, db_ip, gw1_ip, gw2_ip) = (
        net.address(2),
        net.address(5),
        net.address(11),
        net.address(12),
    );

    // PostgreSQL on its own host, reached by the gateways over the bridge.
    let postgres = ThrowawayPostgres::new_in_netns(&db, db_ip.parse().unwrap()).unwrap();
    let database_url = postgres.url_for("postgres");

    let (mut w_eu, eu_key) = worker(root, "weu", &eu_ns, &net.address(21), "eu").await;
    let (w_us, us_key) = worker(root, "wus", &us_ns, &net.address(22), "us").await;
    let mut backends = String::new();
    for (worker, key, region) in [(&w_eu, &eu_key, "eu"), (&w_us, &us_key, "us")] {
        let key_file = write_key(root, &worker.name, key);
        backends.push_str(&backend_toml(
            &worker.name,
            "worker",
            worker,
            region,
            &key_file,
            "",
        ));
    }
    let mut gw1 = gateway(root, "gw1", &gw1_ns, &gw1_ip, &database_url, &backends);
    let mut gw2 = gateway(root, "gw2", &gw2_ns, &gw2_ip, &database_url, &backends);
    // Both replicas start at once on an empty database: the migrations race and must not fail.
    gw1.spawn(&["serve"]);
    gw2.spawn(&["serve"]);
    gw1.ready_on(READY_PATH).await;
    gw2.ready_on(READY_PATH).await;
    // The probe a container health check runs.
    for gw in [&gw1, &gw2] {
        assert!(gw.succeeds(&["health", "--url", &gw.base(), "--path", READY_PATH]));
    }
    let free_key = tenant(&gw1, "free");
    let pinned_key = tenant(&gw1, "pinned");
    let capped_key = tenant(&gw1, "capped");

    let errorfile = root.join("503.http");
    std::fs::write(&errorfile, NO_GATEWAY_503).unwrap();
    let _haproxy = Haproxy::start(
        root,
        &lb,
        &haproxy_config(&lb_ip, &[("gw1", &gw1_ip), ("gw2", &gw2_ip)], &errorfile),
    );
    let base = format!("http://{lb_ip}:8080");
    let client = reqwest::Client::new();
    loop {
        if let Ok(r) = client.get(format!("{base}{READY_PATH}")).send().await
            && r.status().is_success()
        {
            break;
        }
        tokio::time::sleep(POLL).await;
    }

    // 1. A gateway replica dies under load, then comes back.
    let load = Load::start(&base, &free_key, 4, 2);
    load.until_ok_non_stream(40).await;
    // Round robin may leave no balanced stream on the replica at the kill: one stream is sent
    // to it directly, so at least one is always cut.
    let direct = {
        let (client, base, key) = (client.clone(), gw1.base(), free_key.clone());
        tokio::spawn(async move { request(&client, &base, &key, true).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let killed_at = Instant::now();
    gw1.kill();
    load.until_ok_non_stream(120).await;
    let mut outcomes = load.finish().await;
    let direct = direct.await.unwrap();
    assert!(
        !gw1.succeeds(&["health", "--url", &gw1.base()]),
        "a dead replica fails its health probe"
    );
    assert!(
        !direct.complete,
        "the replica died under the direct stream: {}",
        direct.body
    );
    outcomes.push(direct);
    let failed: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| !o.stream && o.status != 200)
        .collect();
    assert!(
        failed.is_empty(),
        "no non-stream request fails when a replica dies: {:?}",
        failed
            .iter()
            .map(|o| (o.status, &o.body))
            .collect::<Vec<_>>()
    );
    let in_flight_at_kill: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.started <= killed_at && o.finished >= killed_at)
        .collect();
    let longest_across_kill = longest(&in_flight_at_kill);
    let median = median_non_stream(&outcomes);
    let cut: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.stream && o.status == 200 && !o.complete)
        .collect();
    // The restarted replica resolves what its previous life left open before it serves.
    gw1.spawn(&["serve"]);
    gw1.ready_on(READY_PATH).await;
    let reader = ledger(&database_url).await;
    for o in &cut {
        let id = RequestId::parse(o.request_id.as_deref().unwrap()).unwrap();
        let entry = entry_of(&reader, id).await;
        assert_eq!(
            entry.status,
            UsageStatus::Error {
                code: "interrupted".to_owned()
            }
        );
        assert!(
            u64::from(entry.completion_tokens) <= o.tokens,
            "a cut stream is billed for at most what its client received: {} > {}",
            entry.completion_tokens,
            o.tokens
        );
    }
    let mut expected_free_tokens = 0_u64;
    for o in outcomes.iter().filter(|o| o.status == 200) {
        let id = RequestId::parse(o.request_id.as_deref().unwrap()).unwrap();
        let entry = entry_of(&reader, id).await;
        if o.complete {
            assert_eq!(entry.status, UsageStatus::Ok, "{}", o.body);
            assert_eq!(u64::from(entry.completion_tokens), o.tokens, "{}", o.body);
        }
        expected_free_tokens += u64::from(entry.completion_tokens);
    }
    eprintln!(
        "replica kill: {} requests ({} non-stream, {} streams), {} non-stream failed, {} streams cut, \
         {} in flight at the kill; non-stream latency: median {median:?}, longest across the kill {:?}",
        outcomes.len(),
        outcomes.iter().filter(|o| !o.stream).count(),
        outcomes.iter().filter(|o| o.stream).count(),
        failed.len(),
        cut.len(),
        in_flight_at_kill.len(),
        longest_across_kill
    );

    // 2. Region eu loses its worker: unpinned traffic fails over to us, pinned traffic stops.
    let load = Load::start(&base, &free_key, 4, 0);
    load.until_ok_non_stream(30).await;
    let worker_killed_at = Instant::now();
    w_eu.kill();
    let served_before_kill = load.ok_non_stream();
    load.until_ok_non_stream(served_before_kill + 60).await;
    let region_outcomes = load.finish().await;
    let region_failed = region_outcomes.iter().filter(|o| o.status != 200).count();
    let across_worker_kill: Vec<&Outcome> = region_outcomes
        .iter()
        .filter(|o| o.started <= worker_killed_at && o.finished >= worker_killed_at)
        .collect();
    assert_eq!(region_failed, 0, "unpinned traffic fails over to us");
    for o in &region_outcomes {
        let id = RequestId::parse(o.request_id.as_deref().unwrap()).unwrap();
        let entry = entry_of(&reader, id).await;
        assert_eq!(u64::from(entry.completion_tokens), o.tokens);
        expected_free_tokens += o.tokens;
    }
    let us_seen = w_us.chat_requests_seen().await;
    for stream in [false, true, false, true] {
        let o = request(&client, &base, &pinned_key, stream).await;
        assert_eq!(o.status, 503, "{}", o.body);
        let value: Value = serde_json::from_str(&o.body).unwrap();
        assert_eq!(value["error"]["code"], "no_backend_in_region", "{}", o.body);
    }
    assert_eq!(
        w_us.chat_requests_seen().await,
        us_seen,
        "no request of the tenant pinned to eu reached us"
    );
    eprintln!(
        "region loss: {} requests, {region_failed} failed; median {:?}, longest across the kill {:?}",
        region_outcomes.len(),
        median_non_stream(&region_outcomes),
        longest(&across_worker_kill)
    );

    // 3. 200 concurrent requests on both replicas against a budget that fits exactly 50.
    let per_request = NON_STREAM_TOKENS * PRICE_NANOS_PER_TOKEN;
    let budget = 50 * per_request;
    gw1.cli(&[
        "budgets",
        "set",
        "--tenant",
        "capped",
        "--project",
        "default",
        &format!("0.{budget:09}"),
    ]);
    let statuses = burst(&client, &base, &capped_key, 200).await;
    assert_eq!(
        statuses,
        std::collections::BTreeMap::from([
            ((200, String::new()), 50),
            ((429, "insufficient_quota".to_owned()), 150),
        ]),
        "exactly the budget's 50 requests succeed"
    );

    // … and 60 concurrent requests against a key's limit of 30 per minute: exactly 30 pass.
    let created = gw1.cli(&[
        "keys",
        "create",
        "--tenant",
        "limited",
        "--create-tenant",
        "--name",
        "rpm",
    ]);
    let limited_key = created
        .split_whitespace()
        .find(|w| w.starts_with("tp-"))
        .unwrap()
        .to_owned();
    let key_id = created
        .split_whitespace()
        .skip_while(|w| *w != "key_id")
        .nth(1)
        .unwrap()
        .to_owned();
    gw1.cli(&["credit", "add", "--tenant", "limited", "100"]);
    gw1.cli(&["rate-limits", "--key-id", &key_id, "--rpm", "30"]);
    let rpm_statuses = burst(&client, &base, &limited_key, 60).await;
    assert_eq!(
        rpm_statuses,
        std::collections::BTreeMap::from([
            ((200, String::new()), 30),
            ((429, "rate_limit_exceeded".to_owned()), 30),
        ]),
        "the key's 30 requests per minute hold across both replicas"
    );

    // 4. The database goes away: both replicas fail closed (503 with Retry-After, nothing
    // served), their readiness goes red, and they serve again once it is back, unrestarted.
    let postgres = postgres.set_running(false).await;
    let mut outage = Vec::new();
    for stream in [false, true, false, false, true, false] {
        let o = request(&client, &base, &free_key, stream).await;
        let value: Value = serde_json::from_str(&o.body).unwrap_or(Value::Null);
        assert_eq!(o.status, 503, "{}", o.body);
        assert_eq!(value["error"]["code"], "unavailable", "{}", o.body);
        assert_eq!(o.tokens, 0);
        outage.push(o);
    }
    for gw in [&gw1, &gw2] {
        let ready = client
            .get(format!("{}/readyz", gw.base()))
            .send()
            .await
            .unwrap();
        assert_eq!(
            ready.status(),
            503,
            "a replica without its database is not ready"
        );
    }
    let postgres = postgres.set_running(true).await;
    let recovered_at = Instant::now();
    let first_after = loop {
        let o = request(&client, &base, &free_key, false).await;
        if o.status == 200 {
            break o;
        }
        tokio::time::sleep(POLL).await;
    };
    let id = RequestId::parse(first_after.request_id.as_deref().unwrap()).unwrap();
    let entry = entry_of(&reader, id).await;
    expected_free_tokens += u64::from(entry.completion_tokens);
    // The month of the statements below: the servers' clock, read off their own entry.
    let statement_ms = entry.created_at_ms;
    eprintln!(
        "database loss: {} requests during the outage, all 503 `unavailable`; first 200 {:?} after PostgreSQL was back",
        outage.len(),
        first_after.finished - recovered_at
    );

    // 5. One Idempotency-Key sent to each replica directly: it runs once.
    let mut idempotent = Vec::new();
    for replica in [&gw1, &gw2] {
        let response = client
            .post(format!("{}/v1/chat/completions", replica.base()))
            .bearer_auth(&free_key)
            .header("Idempotency-Key", "order-7")
            .json(&json!({"model": "chat", "max_tokens": NON_STREAM_TOKENS,
                "messages": [{"role": "user", "content": "once"}]}))
            .send()
            .await
            .unwrap();
        idempotent.push(response.status().as_u16());
    }
    assert_eq!(
        idempotent,
        [200, 409],
        "the other replica refuses the reused key"
    );
    expected_free_tokens += NON_STREAM_TOKENS;

    // 6. The ledger reconciles with what the clients were served, to the nano-unit.
    let free_charged = charged(&reader, "free").await;
    assert_eq!(free_charged, expected_free_tokens * PRICE_NANOS_PER_TOKEN);
    assert_eq!(charged(&reader, "capped").await, budget);
    assert_eq!(charged(&reader, "pinned").await, 0);
    assert_eq!(
        charged(&reader, "limited").await,
        30 * NON_STREAM_TOKENS * PRICE_NANOS_PER_TOKEN
    );
    for name in ["free", "capped", "pinned", "limited"] {
        let statement = reader
            .statement(
                &TenantId::new(name).unwrap(),
                tidepool_ledger::Month::of_ms(statement_ms),
            )
            .await
            .unwrap();
        let lines: i64 = statement.lines.iter().map(|l| l.amount().0).sum();
        assert_eq!(
            statement.opening_balance.0 + lines,
            statement.closing_balance.0,
            "{name}: opening + lines = closing"
        );
    }
    eprintln!(
        "ledger: free charged {free_charged} nanos for {expected_free_tokens} tokens, capped {budget}, pinned 0, limited {}",
        30 * NON_STREAM_TOKENS * PRICE_NANOS_PER_TOKEN
    );
    drop(postgres);
    drop(net);
}
