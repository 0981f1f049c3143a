//! Real-model tests: the gateway over the real llama.cpp and candle engines, loaded from the
//! models `make models` fetched (`$TIDEPOOL_MODELS_DIR`, default `~/.cache/tidepool/models`).
//! Each test loads only the model it needs. Names contain `real_model` so nextest gives them the
//! whole machine. No timed assertions: waits are on signals or on a condition becoming true.

#![expect(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns fail loudly"
)]
use std::path::{Path, PathBuf};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use futures::StreamExt as _;
use serde_json::{Value, json};
use tidepool_core::{Config, RequestId, TenantId};
use tidepool_gateway::{AppState, ModelEngine, StateOptions, load_models, router};
use tidepool_ledger::{AuditContext, Ledger, UsageEntry, UsageStatus};
use tower::ServiceExt as _;

const CHAT: &str = "smollm2-135m-instruct";
const BASE: &str = "gemma-3-270m";
const EMBED: &str = "all-minilm-l6-v2";

struct RealApp {
    state: AppState,
    router: Router,
    ledger: Ledger,
    key: String,
    _dir: tempfile::TempDir,
}

fn models_dir() -> PathBuf {
    tidepool_core::config::default_models_dir()
}

async fn real_app(model: &str) -> RealApp {
    let text = include_str!("../../../tidepool.toml");
    let mut config = Config::parse(text, Path::new("tidepool.toml")).unwrap();
    config.server.models_dir = Some(models_dir());
    config.engine.threads = 2;
    config.models.retain(|m| m.id.as_str() == model);
    for m in &mut config.models {
        m.seqs_max = m.seqs_max.min(4);
        m.context_tokens = m.context_tokens.min(1024);
    }
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::connect(&format!("sqlite://{}", dir.path().join("l.db").display()))
        .await
        .unwrap();
    let acme = TenantId::new("acme").unwrap();
    let key = ledger
        .create_key(&acme, "real", &AuditContext::ADMIN)
        .await
        .unwrap()
        .secret;
    ledger
        .credit(
            &acme,
            tidepool_core::Nanos(1_000_000_000_000),
            "tests",
            &AuditContext::ADMIN,
        )
        .await
        .unwrap();
    tidepool_gateway::sync_prices(&config, &ledger)
        .await
        .unwrap();
    let loaded = load_models(&config).await.unwrap();
    let mut options = StateOptions::new(config.limits.clone());
    options.pool = loaded.pool;
    options.admin_token = Some(ADMIN_TOKEN.to_owned());
    let state = AppState::with_options(loaded.models, ledger.clone(), options);
    RealApp {
        router: router(state.clone()),
        state,
        ledger,
        key,
        _dir: dir,
    }
}

impl RealApp {
    async fn post(&self, path: &str, body: &Value) -> axum::http::Response<Body> {
        let request = Request::post(path)
            .header("authorization", format!("Bearer {}", self.key))
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        self.router.clone().oneshot(request).await.unwrap()
    }

    async fn usage(&self, request_id: &str) -> UsageEntry {
        let tasks = self.state.tasks();
        tasks.close();
        tasks.wait().await;
        tasks.reopen();
        self.ledger
            .usage_entry(RequestId::parse(request_id).unwrap())
            .await
            .unwrap()
            .unwrap()
    }
}

fn request_id(response: &axum::http::Response<Body>) -> String {
    response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned()
}

async fn json_of(response: axum::http::Response<Body>) -> Value {
    serde_json::from_slice(
        &axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap(),
    )
    .unwrap()
}

fn data_lines(bytes: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(bytes)
        .lines()
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn real_model_chat_stream_equals_non_stream_at_temperature_zero() {
    let app = real_app(CHAT).await;
    let body = json!({
        "model": CHAT, "max_tokens": 24, "temperature": 0,
        "messages": [{"role": "user", "content": "Name three colours of the rainbow."}],
    });
    let response = app.post("/v1/chat/completions", &body).await;
    assert_eq!(response.status(), StatusCode::OK);
    let id = request_id(&response);
    let whole = json_of(response).await;
    let text = whole["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(!text.trim().is_empty());
    let usage = app.usage(&id).await;
    assert_eq!(usage.status, UsageStatus::Ok);
    assert_eq!(
        Value::from(usage.completion_tokens),
        whole["usage"]["completion_tokens"]
    );
    assert_eq!(
        Value::from(usage.prompt_tokens),
        whole["usage"]["prompt_tokens"]
    );

    let mut stream_body = body.clone();
    stream_body["stream"] = json!(true);
    stream_body["stream_options"] = json!({"include_usage": true});
    let response = app.post("/v1/chat/completions", &stream_body).await;
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let data = data_lines(&bytes);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let streamed: String = chunks
        .iter()
        .filter_map(|c| {
            c["choices"].get(0)?["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(streamed, text);
    assert_eq!(chunks.last().unwrap()["usage"], whole["usage"]);
}

#[tokio::test]
async fn real_model_completion_on_the_base_model_and_context_limit() {
    let app = real_app(BASE).await;
    let response = app.post("/v1/completions", &json!({"model": BASE, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0})).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body = json_of(response).await;
    assert!(!body["choices"][0]["text"].as_str().unwrap().is_empty());
    assert!(body["usage"]["completion_tokens"].as_u64().unwrap() <= 8);
    let chat = app
        .post(
            "/v1/chat/completions",
            &json!({"model": BASE, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(
        json_of(chat).await["error"]["code"],
        "model_endpoint_mismatch"
    );
    let long = app
        .post(
            "/v1/completions",
            &json!({"model": BASE, "prompt": "word ".repeat(3000), "max_tokens": 8}),
        )
        .await;
    assert_eq!(long.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        json_of(long).await["error"]["code"],
        "context_length_exceeded"
    );
}

#[tokio::test]
async fn real_model_embeddings_rank_a_paraphrase_above_an_unrelated_sentence() {
    let app = real_app(EMBED).await;
    let texts = [
        "A man is eating food.",
        "A man is eating a meal.",
        "The stock market fell sharply today.",
    ];
    let response = app
        .post("/v1/embeddings", &json!({"model": EMBED, "input": texts}))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let body = json_of(response).await;
    let vectors: Vec<Vec<f64>> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            d["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect();
    assert!(vectors.iter().all(|v| v.len() == 384));
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    assert!(dot(&vectors[0], &vectors[1]) > dot(&vectors[0], &vectors[2]) + 0.2);
    assert!(body["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn real_model_disconnect_after_five_chunks_bills_what_was_delivered_and_frees_the_slot() {
    let app = real_app(CHAT).await;
    let body = json!({
        "model": CHAT, "stream": true, "max_tokens": 400, "temperature": 0,
        "messages": [{"role": "user", "content": "Write a very long story about a lighthouse keeper."}],
    });
    let response = app.post("/v1/chat/completions", &body).await;
    let id = request_id(&response);
    let mut frames = response.into_body().into_data_stream();
    let mut delivered = 0;
    while delivered < 5 {
        let frame = frames.next().await.unwrap().unwrap();
        for data in data_lines(&frame) {
            let chunk: Value = serde_json::from_str(&data).unwrap();
            if chunk["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
            {
                delivered += 1;
            }
        }
    }
    drop(frames);
    let usage = app.usage(&id).await;
    assert_eq!(usage.status, UsageStatus::ClientDisconnected);
    assert!(
        (5..=7).contains(&usage.completion_tokens),
        "{}",
        usage.completion_tokens
    );
    let Some(ModelEngine::Text(engine)) = app.state.models().next().map(|m| m.engine.clone())
    else {
        panic!("a text engine");
    };
    // The engine frees the slot within one step of the dropped receiver.
    while engine.stats().active > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

const ADMIN_TOKEN: &str = "real-model-admin-token";

impl RealApp {
    async fn call(&self, method: &str, path: &str, token: &str) -> axum::http::Response<Body> {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {token}"))
            .body(Body::empty())
            .unwrap();
        self.router.clone().oneshot(request).await.unwrap()
    }

    async fn pool_model_state(&self) -> String {
        let pool = json_of(self.call("GET", "/v1/pool", ADMIN_TOKEN).await).await;
        pool["models"][0]["state"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Polls `GET /v1/pool` until the model is in `state` (a wait on state, not a timing test).
    async fn wait_pool_state(&self, state: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_mins(1);
        while self.pool_model_state().await != state {
            assert!(
                std::time::Instant::now() < deadline,
                "model never became {state}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test]
async fn real_model_pool_status_and_operator_load_unload_over_http() {
    let app = real_app("smollm2-135m-instruct").await;
    let body = json!({"model": "smollm2-135m-instruct", "prompt": "Hello", "max_tokens": 4,
        "temperature": 0});
    assert_eq!(app.post("/v1/completions", &body).await.status(), 200);

    // The response ends when the client has its last token; the accelerator thread reports the
    // finished sequence to the pool right after, so wait for the counter (a state, not a time).
    let deadline = std::time::Instant::now() + std::time::Duration::from_mins(1);
    let pool = loop {
        let pool = json_of(app.call("GET", "/v1/pool", ADMIN_TOKEN).await).await;
        if pool["counters"]["requests_finished"] == 1 {
            break pool;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the finished request never reached the pool's counters: {pool}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(pool["object"], "pool");
    assert_eq!(pool["policy"], "swap-lru");
    let model = &pool["models"][0];
    assert_eq!(model["id"], "smollm2-135m-instruct");
    assert_eq!(model["state"], "resident");
    assert!(
        model["weights_bytes"].as_u64().unwrap() > 10_000_000,
        "{model}"
    );
    assert!(model["memory_bytes"].as_u64().unwrap() >= model["weights_bytes"].as_u64().unwrap());
    assert!(pool["memory_bytes_used"].as_u64() <= pool["memory_bytes_max"].as_u64());
    // Its decode steps by batch size: the request's 3 steps after the prefill's first token
    // (fewer if it stopped early), all at batch 1, and the pool-wide counter is their sum.
    let steps = |by: &Value| -> Vec<u64> {
        by["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect()
    };
    let model_steps = steps(&model["decode_by_batch"]);
    assert!((1..=3).contains(&model_steps[0]), "{model}");
    assert!(model_steps[1..].iter().all(|&s| s == 0), "{model}");
    assert_eq!(model_steps, steps(&pool["counters"]["decode_by_batch"]));

    let path = "/admin/models/smollm2-135m-instruct/unload";
    assert_eq!(app.call("POST", path, "wrong").await.status(), 401);
    let response = app.call("POST", path, ADMIN_TOKEN).await;
    assert_eq!(response.status(), 202);
    app.wait_pool_state("cold").await;
    let response = app
        .call(
            "POST",
            "/admin/models/smollm2-135m-instruct/load",
            ADMIN_TOKEN,
        )
        .await;
    assert_eq!(response.status(), 202);
    app.wait_pool_state("resident").await;
    let missing = app
        .call("POST", "/admin/models/nope/load", ADMIN_TOKEN)
        .await;
    assert_eq!(missing.status(), 404);
    assert_eq!(
        json_of(missing).await["error"]["code"],
        "resource_not_found"
    );
    // Served after the round trip, from the reloaded weights.
    assert_eq!(app.post("/v1/completions", &body).await.status(), 200);
    expect_model_requests_audited(&app.ledger).await;
}

/// The operator's unload and load requests are audited, with their request ids; the refused
/// ones are not.
async fn expect_model_requests_audited(ledger: &Ledger) {
    let entries = ledger.list_audit(0, 1000).await.unwrap();
    let models: Vec<_> = entries
        .iter()
        .filter(|e| e.action.starts_with("model."))
        .collect();
    let actions: Vec<(&str, &str)> = models
        .iter()
        .map(|e| (e.action.as_str(), e.target.as_str()))
        .collect();
    assert_eq!(
        actions,
        [
            ("model.unload", "model:smollm2-135m-instruct"),
            ("model.load", "model:smollm2-135m-instruct")
        ],
        "one entry per accepted request"
    );
    assert!(models.iter().all(|e| e.request_id.is_some()), "{models:?}");
}

/// A system prompt of about 600 SmolLM2 tokens, the same every time.
#[expect(clippy::format_collect, reason = "26 short lines, built once per test")]
fn long_system_prompt() -> String {
    let rules: String = (1..=26)
        .map(|rule| {
            format!(
                "Rule {rule}: boats in berth {rule} leave before the tide turns and report their cargo.\n"
            )
        })
        .collect();
    format!("You are the harbour master's assistant. Rules follow.\n{rules}")
}

/// The value of one Prometheus sample line `name{labels} value`, 0 if absent.
fn metric(text: &str, name_and_labels: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse::<u64>().ok())
        .unwrap_or(0)
}

/// The default (pooled) path reuses a repeated ~600-token system prompt: the second request
/// reports cached tokens, answers exactly the same at temperature 0, costs less by exactly the
/// price difference of the cached tokens, and the cached counts agree across the response, the
/// ledger's entries, `/v1/usage`, the statement and `/metrics`; the final stream chunk carries
/// them too.
#[tokio::test]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario followed through response, ledger, usage, statement and metrics"
)]
async fn real_model_repeated_system_prompt_is_cached_billed_at_the_cached_price_and_counted() {
    let app = real_app(CHAT).await;
    assert!(
        app.state.pool().is_some(),
        "the shipped config pools the model"
    );
    let body = json!({
        "model": CHAT, "max_tokens": 16, "temperature": 0,
        "messages": [
            {"role": "system", "content": long_system_prompt()},
            {"role": "user", "content": "Which berth leaves first?"},
        ],
    });
    let mut answers = Vec::new();
    let mut entries = Vec::new();
    for _ in 0..2 {
        let response = app.post("/v1/chat/completions", &body).await;
        assert_eq!(response.status(), StatusCode::OK);
        let id = request_id(&response);
        answers.push(json_of(response).await);
        entries.push(app.usage(&id).await);
    }
    let (first, second) = (&answers[0], &answers[1]);
    let prompt = first["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!((550..=800).contains(&prompt), "{first}");
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert_eq!(cached, prompt - 1, "all but the last prompt token reused");
    assert_eq!(
        second["usage"]["prompt_tokens"], prompt,
        "cached tokens are part of the prompt"
    );
    assert_eq!(
        first["choices"][0]["message"]["content"],
        second["choices"][0]["message"]["content"]
    );
    assert_eq!(
        first["usage"]["completion_tokens"],
        second["usage"]["completion_tokens"]
    );
    let completion = first["usage"]["completion_tokens"].as_u64().unwrap();
    assert_eq!(
        entries
            .iter()
            .map(|e| (
                u64::from(e.cached_prompt_tokens),
                e.cached_prompt_tokens_unknown
            ))
            .collect::<Vec<_>>(),
        [(0, false), (cached, false)]
    );

    // The price book: tidepool.toml's input, cached-input and output prices for SmolLM2.
    let config = Config::parse(include_str!("../../../tidepool.toml"), Path::new("t")).unwrap();
    let model = config
        .models
        .iter()
        .find(|m| m.id.as_str() == CHAT)
        .unwrap();
    let (input, cached_input, output) = (
        u64::try_from(model.price_input_per_mtok.0).unwrap(),
        u64::try_from(model.cached_input_price().0).unwrap(),
        u64::try_from(model.price_output_per_mtok.0).unwrap(),
    );
    assert!(
        cached_input < input,
        "the shipped cached price is a discount"
    );
    let cost = |cached: u64| {
        ((prompt - cached) * input + cached * cached_input + completion * output)
            .div_ceil(1_000_000)
    };
    let (cold, warm) = (cost(0), cost(cached));
    // 602 tokens × (0.05 − 0.025) USD per million = 15,050 nano-USD cheaper.
    assert_eq!(cold - warm, cached * (input - cached_input) / 1_000_000);

    // A streamed third request: the final chunk's usage says the same.
    let mut stream_body = body.clone();
    stream_body["stream"] = json!(true);
    stream_body["stream_options"] = json!({"include_usage": true});
    let response = app.post("/v1/chat/completions", &stream_body).await;
    assert_eq!(response.status(), StatusCode::OK);
    let id = request_id(&response);
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let lines = data_lines(&bytes);
    let last: Value = serde_json::from_str(&lines[lines.len() - 2]).unwrap();
    assert_eq!(
        last["usage"]["prompt_tokens_details"]["cached_tokens"], cached,
        "{last}"
    );
    let third = app.usage(&id).await;
    assert_eq!(u64::from(third.cached_prompt_tokens), cached);

    // `/v1/usage`: the three requests' counts and costs, the cached part priced on its own.
    let response = app.call("GET", "/v1/usage", &app.key).await;
    let usage = json_of(response).await;
    let row = &usage["data"][0];
    assert_eq!(row["model"], CHAT);
    assert_eq!(row["requests"], 3);
    assert_eq!(row["prompt_tokens"], 3 * prompt);
    assert_eq!(row["cached_prompt_tokens"], 2 * cached);
    assert_eq!(row["cached_unknown_requests"], 0);
    assert_eq!(row["cost_nanos"], cold + 2 * warm);
    assert_eq!(
        row["cached_input_cost_nanos"],
        (2 * cached * cached_input).div_ceil(1_000_000)
    );

    // The statement's usage line agrees.
    let month = tidepool_ledger::Month::of_ms(entries[0].created_at_ms);
    let path = format!("/admin/tenants/acme/statement?month={month}");
    let statement = json_of(app.call("GET", &path, ADMIN_TOKEN).await).await;
    let line = statement["lines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["kind"] == "usage")
        .unwrap()
        .clone();
    assert_eq!(line["cached_prompt_tokens"], 2 * cached, "{statement}");
    assert_eq!(line["cached_input_per_mtok_nanos"], cached_input);
    assert_eq!(
        line["amount_nanos"],
        -i64::try_from(cold + 2 * warm).unwrap()
    );

    // `/metrics`: cached prompt tokens per model, next to the prompt-token counter.
    let text = String::from_utf8(
        axum::body::to_bytes(
            app.call("GET", "/metrics", ADMIN_TOKEN).await.into_body(),
            usize::MAX,
        )
        .await
        .unwrap()
        .to_vec(),
    )
    .unwrap();
    let label = format!("{{model=\"{CHAT}\"}}");
    assert_eq!(
        metric(
            &text,
            &format!("tidepool_prompt_tokens_cached_total{label}")
        ),
        2 * cached,
        "{text}"
    );
    let prompt_total = text
        .lines()
        .find(|l| {
            l.starts_with("tidepool_tokens_total{")
                && l.contains(&format!("model=\"{CHAT}\""))
                && l.contains("kind=\"prompt\"")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .unwrap();
    assert_eq!(prompt_total, 3 * prompt);
}
