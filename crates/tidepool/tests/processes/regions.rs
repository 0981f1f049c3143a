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

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::{Value, json};
use tidepool_ledger::UsageStatus;

use crate::harness::{
    ADMIN_TOKEN, GATEWAY_MODEL, POLL, Server, TempDir, backend_toml, chat, content_chunks,
    data_lines, fake_worker, fake_worker_config, free_port, write_key,
};

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
        .bearer_auth(ADMIN_TOKEN)
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
    let cli = gateway.cli_backends();
    assert!(cli.contains("us1") && cli.contains("open"), "{cli}");
}

impl Server {
    fn cli_backends(&self) -> String {
        self.run_with_env(
            &["backends", "--url", &self.base()],
            &[("TIDEPOOL_ADMIN_TOKEN", ADMIN_TOKEN)],
        )
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
    let delivered = content_chunks(&text);
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
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(listing.contains("\"ext\"") && !listing.contains(&upstream_key));
    assert!(!gateway.log().contains(&upstream_key));
}
