//! Regions, residency, failover and upstream backends across real processes on loopback
//! (docs/regions.md). Every server is the real `tidepool` binary: workers are `tidepool worker`
//! processes with their own SQLite ledger and API key, the gateway a `tidepool serve` whose
//! `[[backends]]` point at them. Workers die by SIGKILL (`Child::kill`), never by a polite
//! shutdown. Assertions read outcomes (status codes, error codes, ledger rows, the workers' own
//! `/metrics`), never timings; waits poll a condition and rely on nextest's slow-timeout as the
//! hang guard.
//!
//! The failover tests use workers on the fake engine (routing is what is under test, and four
//! real models on two cores would only slow them down); the upstream test runs SmolLM2 for real.

#![expect(
    clippy::unwrap_used,
    clippy::panic,
    clippy::too_many_lines,
    reason = "test helpers outside #[test] fns fail loudly; each scenario reads top to bottom"
)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tidepool_core::RequestId;
use tidepool_ledger::{Ledger, LedgerOptions, UsageEntry, UsageStatus};

const BIN: &str = env!("CARGO_BIN_EXE_tidepool");
const POLL: Duration = Duration::from_millis(50);

/// A fresh directory under the system temp dir, removed on drop (the crate has no `tempfile`).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!("tidepool-regions-{}", RequestId::new()));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        drop(std::fs::remove_dir_all(&self.0));
    }
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn models_dir() -> PathBuf {
    tidepool_core::config::default_models_dir()
}

/// One `tidepool` process with its own directory, config and SQLite ledger.
struct Server {
    name: String,
    dir: PathBuf,
    port: u16,
    database_url: String,
    child: Option<Child>,
    env: Vec<(String, String)>,
}

impl Server {
    fn new(root: &Path, name: &str) -> Self {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let database_url = format!("sqlite://{}", dir.join("tidepool.db").display());
        Self {
            name: name.to_owned(),
            dir,
            port: free_port(),
            database_url,
            child: None,
            env: Vec::new(),
        }
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `tidepool args… --database-url <this server's ledger>`.
    fn cli(&self, args: &[&str]) -> String {
        self.run(&[args, &["--database-url", &self.database_url]].concat())
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new(BIN)
            .args(args)
            .current_dir(&self.dir)
            .env("TIDEPOOL_MODELS_DIR", models_dir())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tidepool {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// A new API key of `tenant` on this server's ledger, with 100 units of credit.
    fn key(&self, tenant: &str) -> String {
        let out = self.cli(&[
            "keys",
            "create",
            "--tenant",
            tenant,
            "--create-tenant",
            "--name",
            "t",
        ]);
        let key = out
            .split_whitespace()
            .find(|w| w.starts_with("tp-"))
            .unwrap()
            .to_owned();
        self.cli(&["credit", "add", "--tenant", tenant, "100"]);
        key
    }

    fn write_config(&self, body: &str) -> PathBuf {
        let path = self.dir.join("tidepool.toml");
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:{}\"\ndatabase_url = \"{}\"\n{body}",
            self.port, self.database_url
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Runs the binary with `args` on this server's config; stdout and stderr go to a log.
    fn spawn(&mut self, args: &[&str]) {
        let log = std::fs::File::create(self.dir.join("server.log")).unwrap();
        let child = Command::new(BIN)
            .args(args)
            .args(["--config", self.dir.join("tidepool.toml").to_str().unwrap()])
            .current_dir(&self.dir)
            .env("TIDEPOOL_MODELS_DIR", models_dir())
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// Waits until `/healthz` answers; fails if the process exits first.
    async fn ready(&mut self) {
        let client = reqwest::Client::new();
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("{} exited with {status}:\n{}", self.name, self.log());
            }
            let url = format!("{}/healthz", self.base());
            if let Ok(response) = client.get(&url).send().await
                && response.status().is_success()
            {
                return;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits for the process to exit and returns its log (for start-up errors).
    fn exit_log(&mut self) -> (bool, String) {
        let status = self.child.as_mut().unwrap().wait().unwrap();
        (status.success(), self.log())
    }

    /// SIGKILL: no shutdown, no drain.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// Chat completions served so far, from this server's own `/metrics`.
    async fn chat_requests_seen(&self) -> u64 {
        let text = reqwest::get(format!("{}/metrics", self.base()))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .filter(|l| {
                l.starts_with("tidepool_requests_total")
                    && l.contains("route=\"/v1/chat/completions\"")
            })
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    }

    async fn usage_entry(&self, request_id: &str) -> UsageEntry {
        let ledger = Ledger::connect_with(
            &self.database_url,
            LedgerOptions {
                replica_id: "test-reader".to_owned(),
                ..LedgerOptions::default()
            },
        )
        .await
        .unwrap();
        let id = RequestId::parse(request_id).unwrap();
        loop {
            if let Some(entry) = ledger.usage_entry(id).await.unwrap() {
                return entry;
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn fake_worker_config() -> &'static str {
    "[billing]\nenforce = false\n\n[[models]]\nid = \"chat\"\nkind = \"chat\"\nbackend = \"fake\"\nfake_decode_step_us = 2000\n"
}

/// Starts a fake-engine worker in `region`; returns it and its API key.
async fn fake_worker(root: &Path, name: &str, region: &str, config: &str) -> (Server, String) {
    let mut worker = Server::new(root, name);
    worker.write_config(config);
    let key = worker.key("gateway");
    worker.spawn(&[
        "worker",
        "--region",
        region,
        "--zone",
        &format!("{region}-a"),
    ]);
    worker.ready().await;
    (worker, key)
}

fn backend_toml(
    id: &str,
    kind: &str,
    worker: &Server,
    region: &str,
    key_file: &Path,
    extra: &str,
) -> String {
    format!(
        "[[backends]]\nid = \"{id}\"\nkind = \"{kind}\"\nurl = \"{}\"\nregion = \"{region}\"\nzone = \"{region}-a\"\napi_key_file = \"{}\"\nmodels = [\"chat\"]\n{extra}\n",
        worker.base(),
        key_file.display()
    )
}

fn write_key(root: &Path, name: &str, key: &str) -> PathBuf {
    let path = root.join(format!("{name}.key"));
    let mut file = std::fs::File::create(&path).unwrap();
    writeln!(file, "{key}").unwrap();
    path
}

const GATEWAY_MODEL: &str = "[[models]]\nid = \"chat\"\nkind = \"chat\"\nbackend = \"remote\"\nprice_input_per_mtok = 1_000_000_000\nprice_output_per_mtok = 2_000_000_000\n\n";

async fn chat(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    body: &Value,
) -> (u16, Value, String) {
    let response = client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let request_id = response
        .headers()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let text = response.text().await.unwrap();
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, value, request_id)
}

/// The `data:` payloads of an SSE body.
fn data_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_process_failover_two_regions_kill_worker_then_region_loses_nothing_and_pins_hold() {
    let root = TempDir::new();
    let root = root.path();
    let mut workers = Vec::new();
    let mut backends = String::new();
    for (name, region) in [("eu1", "eu"), ("eu2", "eu"), ("us1", "us"), ("us2", "us")] {
        let (worker, key) = fake_worker(root, name, region, fake_worker_config()).await;
        let key_file = write_key(root, name, &key);
        backends.push_str(&backend_toml(
            name, "worker", &worker, region, &key_file, "",
        ));
        workers.push(worker);
    }
    let mut gateway = Server::new(root, "gateway");
    gateway.write_config(&format!(
        "region = \"eu\"\nzone = \"eu-a\"\n\n[residency.tenants]\npinned = [\"eu\"]\n\n[routing]\nbreaker_open_ms = 60000\n\n{GATEWAY_MODEL}{backends}"
    ));
    let free_key = gateway.key("free");
    let pinned_key = gateway.key("pinned");
    gateway.spawn(&["serve"]);
    gateway.ready().await;
    let base = gateway.base();
    let client = reqwest::Client::new();
    let body = json!({"model": "chat", "messages": [{"role": "user", "content": "one two three"}], "max_tokens": 16});

    // Steady non-stream load from four clients while workers die.
    let done = Arc::new(AtomicU32::new(0));
    let failed = Arc::new(AtomicU32::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (client, base, key, body) =
            (client.clone(), base.clone(), free_key.clone(), body.clone());
        let (done, failed, stop) = (Arc::clone(&done), Arc::clone(&failed), Arc::clone(&stop));
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let (status, value, _) = chat(&client, &base, &key, &body).await;
                if status == 200 {
                    done.fetch_add(1, Ordering::Relaxed);
                } else {
                    eprintln!("failed: {status} {value}");
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let wait_done = |at_least: u32| {
        let done = Arc::clone(&done);
        async move {
            while done.load(Ordering::Relaxed) < at_least {
                tokio::time::sleep(POLL).await;
            }
        }
    };
    wait_done(40).await;
    workers[0].kill();
    wait_done(80).await;
    workers[1].kill();
    wait_done(160).await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no non-stream request failed"
    );
    assert!(done.load(Ordering::Relaxed) >= 160);

    // Region eu is down: the pinned tenant gets 503 `no_backend_in_region`, and the us workers
    // (which served the failover traffic above) see none of its requests.
    let seen_before = workers[2].chat_requests_seen().await + workers[3].chat_requests_seen().await;
    for stream in [false, true, false, true, false] {
        let mut pinned_body = body.clone();
        pinned_body["stream"] = json!(stream);
        let (status, value, _) = chat(&client, &base, &pinned_key, &pinned_body).await;
        assert_eq!(status, 503, "{value}");
        assert_eq!(value["error"]["code"], "no_backend_in_region", "{value}");
    }
    let seen_after = workers[2].chat_requests_seen().await + workers[3].chat_requests_seen().await;
    assert_eq!(seen_before, seen_after, "no pinned request left region eu");
    assert!(
        seen_after > 0,
        "the us workers did serve the failover traffic"
    );
    // The unpinned tenant is still served, from us.
    let (status, value, _) = chat(&client, &base, &free_key, &body).await;
    assert_eq!(status, 200, "{value}");
    assert!(
        gateway.log().contains("audit"),
        "residency refusals are audited"
    );

    // Visibility: the dead workers' breakers are open, the live ones closed; no key is shown.
    let listing = client
        .get(format!("{base}/v1/backends"))
        .bearer_auth(&free_key)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let listing: Value = serde_json::from_str(&listing).unwrap();
    let data = listing["data"].as_array().unwrap();
    assert_eq!(data.len(), 4);
    for backend in data {
        let dead = backend["region"] == "eu";
        assert_eq!(backend["healthy"], !dead, "{backend}");
        assert_eq!(backend["breaker"] == "closed", !dead, "{backend}");
    }
    assert!(
        !listing.to_string().contains("tp-"),
        "no API key on /v1/backends"
    );
    let cli = gateway.cli_backends(&free_key);
    assert!(cli.contains("us1") && cli.contains("open"), "{cli}");
}

impl Server {
    fn cli_backends(&self, key: &str) -> String {
        self.run(&["backends", "--url", &self.base(), "--api-key", key])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_process_stream_cut_by_worker_crash_ends_with_error_and_bills_delivered_tokens() {
    let root = TempDir::new();
    let root = root.path();
    // 20 ms per token: the stream is still running when the worker dies.
    let slow = "[billing]\nenforce = false\n\n[[models]]\nid = \"chat\"\nkind = \"chat\"\nbackend = \"fake\"\nfake_decode_step_us = 20000\n";
    let (mut worker, key) = fake_worker(root, "w1", "eu", slow).await;
    let key_file = write_key(root, "w1", &key);
    let mut gateway = Server::new(root, "gateway");
    gateway.write_config(&format!(
        "region = \"eu\"\n\n{GATEWAY_MODEL}{}",
        backend_toml("w1", "worker", &worker, "eu", &key_file, "")
    ));
    let tenant_key = gateway.key("acme");
    gateway.spawn(&["serve"]);
    gateway.ready().await;
    let client = reqwest::Client::new();
    let mut response = client
        .post(format!("{}/v1/chat/completions", gateway.base()))
        .bearer_auth(&tenant_key)
        .json(
            &json!({"model": "chat", "messages": [{"role": "user", "content": "a b c"}],
            "max_tokens": 500, "stream": true}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let mut text = String::new();
    let mut killed = false;
    while let Some(bytes) = response.chunk().await.unwrap() {
        text.push_str(&String::from_utf8_lossy(&bytes));
        let content_chunks = data_lines(&text)
            .iter()
            .filter(|d| d.contains("\"content\":\"") && !d.contains("\"content\":\"\""))
            .count();
        if !killed && content_chunks >= 5 {
            worker.kill();
            killed = true;
        }
    }
    assert!(killed, "the stream ended before five tokens:\n{text}");
    let events = data_lines(&text);
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "backend_failed", "{text}");
    assert!(!text.contains("[DONE]"), "a failed stream has no [DONE]");
    let delivered = events
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
        })
        .count();
    let entry = gateway.usage_entry(&request_id).await;
    assert_eq!(
        entry.status,
        UsageStatus::Error {
            code: "backend_failed".to_owned()
        }
    );
    assert_eq!(
        entry.completion_tokens as usize, delivered,
        "billed exactly the delivered tokens"
    );
    assert!((5..500).contains(&delivered), "{delivered}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_process_bad_backend_config_is_a_clear_start_up_error() {
    let root = TempDir::new();
    let root = root.path();
    let unreachable = format!("http://127.0.0.1:{}", free_port());
    let backend = |id: &str| {
        format!(
            "[[backends]]\nid = \"{id}\"\nkind = \"upstream\"\nurl = \"{unreachable}\"\nregion = \"eu\"\nmodels = [\"chat\"]\n"
        )
    };
    let cases = [
        (
            "pin",
            format!(
                "[residency.tenants]\nacme = [\"mars\"]\n\n{GATEWAY_MODEL}{}",
                backend("b1")
            ),
            "unknown region `mars`",
        ),
        (
            "dup",
            format!("{GATEWAY_MODEL}{}{}", backend("b1"), backend("b1")),
            "duplicate backend id `b1`",
        ),
        (
            "unreachable",
            format!("{GATEWAY_MODEL}{}", backend("b1")),
            "did not answer its health probe at start-up",
        ),
    ];
    for (name, config, expected) in cases {
        let mut server = Server::new(root, name);
        server.write_config(&config);
        server.spawn(&["serve"]);
        let (success, log) = server.exit_log();
        assert!(!success, "{name}: must not start");
        assert!(log.contains(expected), "{name}: {log}");
    }
}

/// A second Tidepool process on SmolLM2 acts as the external OpenAI-compatible server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_model_upstream_backend_answers_streams_and_meters_like_local() {
    let root = TempDir::new();
    let root = root.path();
    let mut upstream = Server::new(root, "upstream");
    upstream.write_config(
        "[engine]\nthreads = 2\n\n[billing]\nenforce = false\n\n[[models]]\nid = \"smollm2-135m-instruct\"\nkind = \"chat\"\nfile = \"SmolLM2-135M-Instruct.Q4_1.gguf\"\nseqs_max = 4\n",
    );
    let upstream_key = upstream.key("gateway");
    upstream.spawn(&["serve"]);
    upstream.ready().await;

    let mut gateway = Server::new(root, "gateway");
    gateway.write_config(&format!(
        "region = \"eu\"\n\n[[models]]\nid = \"smol\"\nkind = \"chat\"\nbackend = \"remote\"\nprice_input_per_mtok = 1_000_000_000\nprice_output_per_mtok = 2_000_000_000\n\n[[backends]]\nid = \"ext\"\nkind = \"upstream\"\nurl = \"{}\"\nregion = \"eu\"\napi_key_env = \"TP_TEST_UPSTREAM_KEY\"\nmodels = [\"smol\"]\naliases = {{ smol = \"smollm2-135m-instruct\" }}\ntimeout_ms = 60000\nconcurrency_max = 4\n",
        upstream.base()
    ));
    gateway
        .env
        .push(("TP_TEST_UPSTREAM_KEY".to_owned(), upstream_key.clone()));
    let tenant_key = gateway.key("acme");
    gateway.spawn(&["serve"]);
    gateway.ready().await;
    let client = reqwest::Client::new();
    let messages = json!([{"role": "user", "content": "What is the capital of France?"}]);

    // The same request directly against the upstream: the reference answer and token counts.
    let direct_body = json!({"model": "smollm2-135m-instruct", "messages": messages, "max_tokens": 12, "temperature": 0});
    let (status, direct, _) = chat(&client, &upstream.base(), &upstream_key, &direct_body).await;
    assert_eq!(status, 200, "{direct}");
    let reference = direct["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(!reference.is_empty());

    let body = json!({"model": "smol", "messages": messages, "max_tokens": 12, "temperature": 0});
    let (status, whole, request_id) = chat(&client, &gateway.base(), &tenant_key, &body).await;
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["choices"][0]["message"]["content"], reference);
    assert_eq!(whole["model"], "smol");
    for field in ["prompt_tokens", "completion_tokens"] {
        assert_eq!(
            whole["usage"][field], direct["usage"][field],
            "the upstream's exact {field}"
        );
    }
    let entry = gateway.usage_entry(&request_id).await;
    assert_eq!(entry.status, UsageStatus::Ok);
    assert_eq!(
        u64::from(entry.prompt_tokens),
        direct["usage"]["prompt_tokens"].as_u64().unwrap()
    );
    assert_eq!(
        u64::from(entry.completion_tokens),
        direct["usage"]["completion_tokens"].as_u64().unwrap()
    );

    // Streamed: token by token, the same text, the usage chunk, and the same metering.
    let mut stream_body = body.clone();
    stream_body["stream"] = json!(true);
    stream_body["stream_options"] = json!({"include_usage": true});
    let response = client
        .post(format!("{}/v1/chat/completions", gateway.base()))
        .bearer_auth(&tenant_key)
        .json(&stream_body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let stream_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let text = response.text().await.unwrap();
    let events = data_lines(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
    let chunks: Vec<Value> = events
        .iter()
        .filter_map(|d| serde_json::from_str(d).ok())
        .collect();
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, reference);
    let content_chunks = chunks
        .iter()
        .filter(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|s| !s.is_empty())
        })
        .count();
    assert!(
        content_chunks > 1,
        "passed through chunk by chunk, not as one piece"
    );
    let usage = chunks
        .iter()
        .rev()
        .find(|c| c["usage"].is_object())
        .unwrap();
    for field in ["prompt_tokens", "completion_tokens"] {
        assert_eq!(usage["usage"][field], direct["usage"][field], "{field}");
    }
    let entry = gateway.usage_entry(&stream_id).await;
    assert_eq!(entry.status, UsageStatus::Ok);
    assert_eq!(
        u64::from(entry.completion_tokens),
        direct["usage"]["completion_tokens"].as_u64().unwrap()
    );

    // The secret never shows: not in the gateway's log, not on `/v1/backends`.
    let listing = client
        .get(format!("{}/v1/backends", gateway.base()))
        .bearer_auth(&tenant_key)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(listing.contains("\"ext\"") && !listing.contains(&upstream_key));
    assert!(!gateway.log().contains(&upstream_key));
}
