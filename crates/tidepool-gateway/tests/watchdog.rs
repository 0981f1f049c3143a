//! The watchdog end to end: the gateway over the real pooled runtime on SmolLM2-135M (and over
//! the fake engine for the unpooled path), with the accelerator (or engine) thread made to panic
//! mid-stream through the `fault-injection` hook. What must hold: the cut stream ends with a
//! well-formed `engine_restarted` SSE error event and is billed for its delivered tokens only;
//! a request queued behind it runs after the restart; a later request succeeds; the ledger has
//! exactly one entry per request and the balance moved by exactly their costs; the restart is
//! counted on `/metrics` and broadcast; `/readyz` is red while the thread is dead and green after.
//!
//! Names contain `real_model` where a real model loads (nextest gives them the whole machine).
//! No timed assertions: every wait is for a state (a chunk, a queue length, a readiness answer).

#![expect(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns fail loudly"
)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use futures::StreamExt as _;
use serde_json::{Value, json};
use tidepool_core::ModelKind;
use tidepool_core::{Config, Nanos, RequestId, TenantId};
use tidepool_engine::fake::{FakeEngine, FakeEngineConfig};
use tidepool_gateway::{AppState, ServedModel, StateOptions, load_models, router};
use tidepool_ledger::{AuditContext, Ledger, UsageStatus};

/// The operator's token of these tests' apps.
const WATCHDOG_ADMIN_TOKEN: &str = "watchdog-admin-token";
use tidepool_runtime::PoolRuntime;
use tower::ServiceExt as _;

const CHAT: &str = "smollm2-135m-instruct";
const CREDIT: i64 = 1_000_000_000_000;
/// How long any wait for a state may take before the test gives up (a hang guard, not a bound
/// under test).
const STATE_WAIT_MAX: Duration = Duration::from_mins(2);

struct App {
    state: AppState,
    router: Router,
    ledger: Ledger,
    key: String,
    tenant: TenantId,
    _dir: tempfile::TempDir,
}

/// The gateway over `config`'s models (a fresh SQLite ledger, `acme` with credit and a key).
async fn app_of(config: &Config) -> App {
    let loaded = load_models(config).await.unwrap();
    app_with(config, loaded.models, loaded.pool).await
}

/// The gateway over these models, priced as `config` says.
async fn app_with(
    config: &Config,
    models: Vec<ServedModel>,
    pool: Option<Arc<PoolRuntime>>,
) -> App {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::connect(&format!("sqlite://{}", dir.path().join("l.db").display()))
        .await
        .unwrap();
    let tenant = TenantId::new("acme").unwrap();
    let key = ledger
        .create_key(&tenant, "watchdog", &AuditContext::ADMIN)
        .await
        .unwrap()
        .secret;
    ledger
        .credit(&tenant, Nanos(CREDIT), "tests", &AuditContext::ADMIN)
        .await
        .unwrap();
    tidepool_gateway::sync_prices(config, &ledger)
        .await
        .unwrap();
    let mut options = StateOptions::new(config.limits.clone());
    options.admin_token = Some(WATCHDOG_ADMIN_TOKEN.to_owned());
    options.pool = pool;
    let state = AppState::with_options(models, ledger.clone(), options);
    App {
        router: router(state.clone()),
        state,
        ledger,
        key,
        tenant,
        _dir: dir,
    }
}

/// The shipped config with SmolLM2 only, pinned, one sequence at a time (so a second request
/// queues behind the first), with the restart backoff given.
fn pooled_config(restart_backoff_initial_ms: u64) -> Config {
    let text = include_str!("../../../tidepool.toml");
    let mut config = Config::parse(text, Path::new("tidepool.toml")).unwrap();
    config.server.models_dir = Some(tidepool_core::config::default_models_dir());
    config.engine.threads = 2;
    config.engine.restart_backoff_initial_ms = restart_backoff_initial_ms;
    config.engine.restart_backoff_max_ms = restart_backoff_initial_ms.max(30_000);
    config.models.retain(|m| m.id.as_str() == CHAT);
    for m in &mut config.models {
        m.seqs_max = 1;
        m.context_tokens = 1024;
        m.pin = true;
    }
    config
}

impl App {
    fn pool(&self) -> Arc<PoolRuntime> {
        Arc::clone(self.state.pool().unwrap())
    }

    async fn post(&self, path: &str, body: &Value) -> axum::http::Response<Body> {
        let request = Request::post(path)
            .header("authorization", format!("Bearer {}", self.key))
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        self.router.clone().oneshot(request).await.unwrap()
    }

    /// `GET path` as the operator (`/metrics` is the operator's).
    async fn get(&self, path: &str) -> (StatusCode, String) {
        let request = Request::get(path)
            .header("authorization", format!("Bearer {WATCHDOG_ADMIN_TOKEN}"))
            .body(Body::empty())
            .unwrap();
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    async fn readyz(&self) -> (StatusCode, Value) {
        let (status, body) = self.get("/readyz").await;
        (status, serde_json::from_str(&body).unwrap())
    }

    /// Polls `/readyz` until it answers `status` (a wait on a state).
    async fn wait_readyz(&self, status: StatusCode) -> Value {
        let deadline = Instant::now() + STATE_WAIT_MAX;
        loop {
            let (now, body) = self.readyz().await;
            if now == status {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "readyz never became {status}: {body}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits for every pending ledger write.
    async fn drain(&self) {
        let tasks = self.state.tasks();
        tasks.close();
        tasks.wait().await;
        tasks.reopen();
    }
}

fn request_id(response: &axum::http::Response<Body>) -> RequestId {
    RequestId::parse(response.headers()["x-request-id"].to_str().unwrap()).unwrap()
}

fn data_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_owned))
        .collect()
}

fn content_chunks(lines: &[String]) -> usize {
    lines
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
        })
        .count()
}

fn chat(model: &str, content: &str, max_tokens: u32, stream: bool) -> Value {
    json!({
        "model": model, "stream": stream, "max_tokens": max_tokens, "temperature": 0,
        "messages": [{"role": "user", "content": content}],
    })
}

/// Reads a stream until it has `chunks` content chunks, then calls `cut` once, and reads it to
/// its end. Returns the whole body.
async fn read_cutting(
    response: axum::http::Response<Body>,
    chunks: usize,
    cut: impl FnOnce(),
) -> String {
    let mut frames = response.into_body().into_data_stream();
    let mut text = String::new();
    let mut cut = Some(cut);
    while let Some(frame) = frames.next().await {
        text.push_str(&String::from_utf8_lossy(&frame.unwrap()));
        if content_chunks(&data_lines(&text)) >= chunks
            && let Some(cut) = cut.take()
        {
            cut();
        }
    }
    assert!(
        cut.is_none(),
        "the stream ended before {chunks} chunks:\n{text}"
    );
    text
}

/// The last SSE event is a well-formed OpenAI error with `code`, and there is no `[DONE]`.
fn assert_error_event(text: &str, code: &str) {
    let lines = data_lines(text);
    let last: Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], code, "{text}");
    assert_eq!(last["error"]["type"], "server_error", "{text}");
    assert!(last["error"]["message"].as_str().is_some(), "{text}");
    assert!(!text.contains("[DONE]"), "a failed stream has no [DONE]");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario, checked from the stream to the ledger"
)]
async fn real_model_accelerator_panic_mid_stream_fails_it_cleanly_and_loses_nothing() {
    let app = app_of(&pooled_config(100)).await;
    let pool = app.pool();
    let mut notices = pool.subscribe_restarts();
    let ready = app.wait_readyz(StatusCode::OK).await;
    assert_eq!(ready["checks"]["engines"]["accelerator"], "ok", "{ready}");
    assert_eq!(ready["checks"]["pinned_models"][CHAT], "ok", "{ready}");

    // A: a long stream. B: queued behind it (one sequence at a time), not started.
    let stream = app
        .post(
            "/v1/chat/completions",
            &chat(
                CHAT,
                "Write a very long story about a lighthouse keeper.",
                400,
                true,
            ),
        )
        .await;
    assert_eq!(stream.status(), StatusCode::OK);
    let a = request_id(&stream);
    let queued = {
        let router = app.router.clone();
        let key = app.key.clone();
        tokio::spawn(async move {
            let request = Request::post("/v1/chat/completions")
                .header("authorization", format!("Bearer {key}"))
                .header("content-type", "application/json")
                .body(Body::from(
                    chat(CHAT, "Name three colours.", 12, false).to_string(),
                ))
                .unwrap();
            router.oneshot(request).await.unwrap()
        })
    };
    // B must wait in the pool's queue behind a running A before the panic, or the test would
    // not exercise re-admission.
    let deadline = Instant::now() + STATE_WAIT_MAX;
    loop {
        let status = pool.status();
        let model = &status.models[0];
        if model.in_flight >= 1 && model.queued >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the second request never queued");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let cut_pool = Arc::clone(&pool);
    let text = read_cutting(stream, 3, move || cut_pool.inject_panic()).await;
    assert_error_event(&text, "engine_restarted");
    let delivered = content_chunks(&data_lines(&text));

    // B ran after the restart; C, sent later, too.
    let b_response = queued.await.unwrap();
    assert_eq!(b_response.status(), StatusCode::OK);
    let b = request_id(&b_response);
    let b_body: Value = serde_json::from_slice(
        &axum::body::to_bytes(b_response.into_body(), usize::MAX)
            .await
            .unwrap(),
    )
    .unwrap();
    assert!(
        b_body["choices"][0]["message"]["content"]
            .as_str()
            .is_some_and(|t| !t.is_empty()),
        "{b_body}"
    );
    let c_response = app
        .post("/v1/chat/completions", &chat(CHAT, "Say hello.", 8, true))
        .await;
    assert_eq!(c_response.status(), StatusCode::OK);
    let c = request_id(&c_response);
    let c_text = String::from_utf8_lossy(
        &axum::body::to_bytes(c_response.into_body(), usize::MAX)
            .await
            .unwrap(),
    )
    .into_owned();
    assert!(c_text.contains("[DONE]"), "{c_text}");

    // The restart: broadcast once, counted, and the thread healthy again.
    let notice = notices.recv().await.unwrap();
    assert_eq!(notice.engine, "accelerator");
    assert_eq!(notice.restarts, 1);
    assert_eq!(notice.failed_requests, 1, "{notice:?}");
    assert!(notice.readmitted_requests >= 1, "{notice:?}");
    assert!(notice.reason.contains("injected fault"), "{notice:?}");
    assert_eq!(pool.health().restarts, 1);
    let (_, metrics) = app.get("/metrics").await;
    assert!(
        metrics.contains("tidepool_engine_restarts_total{engine=\"accelerator\"} 1"),
        "{metrics}"
    );
    let ready = app.wait_readyz(StatusCode::OK).await;
    assert_eq!(ready["checks"]["engines"]["accelerator"], "ok", "{ready}");

    // The ledger: one entry per request, the cut stream billed for what it delivered only.
    app.drain().await;
    let totals = app.ledger.usage_totals(&app.tenant).await.unwrap();
    assert_eq!(totals.len(), 1);
    assert_eq!(totals[0].requests, 3, "one entry per request: {totals:?}");
    let billed_a = app.ledger.billed_usage(a).await.unwrap().unwrap();
    assert_eq!(
        billed_a.entry.status,
        UsageStatus::Error {
            code: "engine_restarted".to_owned()
        }
    );
    let cut_tokens = billed_a.entry.completion_tokens;
    assert!(
        (3..400).contains(&cut_tokens),
        "billed {cut_tokens} tokens for a stream cut after {delivered} chunks"
    );
    assert!(
        usize::try_from(cut_tokens).unwrap() >= delivered,
        "every delivered chunk carries at least one token"
    );
    let mut spent = 0_i64;
    for id in [a, b, c] {
        let billed = app.ledger.billed_usage(id).await.unwrap().unwrap();
        assert!(billed.cost.0 > 0, "{billed:?}");
        if id != a {
            assert_eq!(billed.entry.status, UsageStatus::Ok);
        }
        spent += billed.cost.0;
    }
    let account = app.ledger.account(&app.tenant).await.unwrap();
    assert_eq!(account.reserved, Nanos::ZERO, "no reservation left open");
    assert_eq!(
        account.balance,
        Nanos(CREDIT - spent),
        "the balance moved by exactly the three entries' costs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_model_readyz_is_red_while_the_accelerator_thread_is_dead_and_green_after() {
    // A backoff of an hour: the thread stays dead until the test cuts the wait short.
    let app = app_of(&pooled_config(3_600_000)).await;
    let pool = app.pool();
    app.wait_readyz(StatusCode::OK).await;
    pool.inject_panic();
    let red = app.wait_readyz(StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(red["status"], "not_ready");
    let why = red["checks"]["engines"]["accelerator"].as_str().unwrap();
    assert!(why.starts_with("dead"), "{red}");
    assert_eq!(
        red["checks"]["database"], "ok",
        "only the engine check fails"
    );
    assert!(!pool.health().alive);
    // `/healthz` stays "process alive".
    let (healthz, _) = app.get("/healthz").await;
    assert_eq!(healthz, StatusCode::OK);

    pool.restart_now();
    let green = app.wait_readyz(StatusCode::OK).await;
    assert_eq!(green["checks"]["engines"]["accelerator"], "ok", "{green}");
    assert_eq!(green["checks"]["pinned_models"][CHAT], "ok", "{green}");
    let response = app
        .post("/v1/chat/completions", &chat(CHAT, "Say hello.", 4, false))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(pool.health().restarts, 1);
}

/// Waits (bounded) for the gateway's audit entry of `engine`'s first restart, which failed one
/// running request, and checks it and the chain.
async fn expect_restart_audited(ledger: &Ledger, engine: &str) {
    let mut audited = None;
    for _ in 0..200 {
        let entries = ledger.list_audit(0, 100).await.unwrap();
        audited = entries.into_iter().find(|e| e.action == "engine.restart");
        if audited.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(audited.is_some(), "an audit entry for the restart");
    let audited = audited.unwrap();
    assert_eq!(
        audited.actor,
        tidepool_ledger::AuditActor::System,
        "the gateway audits it"
    );
    assert_eq!(audited.target, format!("engine:{engine}"), "{audited:?}");
    let details: Value = serde_json::from_str(&audited.details).unwrap();
    assert_eq!(details["failed_requests"], 1, "{details}");
    assert_eq!(details["restarts"], 1, "{details}");
    assert!(
        ledger.verify_audit_chain(None).await.unwrap().is_ok(),
        "the chain verifies"
    );
}

#[expect(
    clippy::too_many_lines,
    reason = "one fault, then each of its consequences checked in order"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_engine_panic_mid_stream_fails_it_cleanly_and_the_engine_serves_again() {
    let toml = "[pool]\nenabled = false\n\n[[models]]\nid = \"fake-chat\"\nkind = \"chat\"\nbackend = \"fake\"\nprice_input_per_mtok = 1000000000\nprice_output_per_mtok = 2000000000\n";
    let config = Config::parse(toml, Path::new("tidepool.toml")).unwrap();
    // The engine `load_models` would build for it, held here for its fault hook: 5 ms a step,
    // so the stream is still running when the thread panics.
    let mut fake_config = FakeEngineConfig::new(config.models[0].id.clone());
    fake_config.decode_step_cost = Duration::from_millis(5);
    fake_config.watchdog = tidepool_gateway::watchdog_config(&config);
    let fake = FakeEngine::start(fake_config).unwrap();
    let served = ServedModel::text(ModelKind::Chat, Arc::clone(&fake) as _);
    let app = app_with(&config, vec![served], None).await;
    let ready = app.wait_readyz(StatusCode::OK).await;
    assert_eq!(ready["checks"]["engines"]["fake-chat"], "ok", "{ready}");
    let mut notices = fake.subscribe_restarts();
    let watchers = tidepool_gateway::spawn_restart_watch(&app.state);

    let stream = app
        .post(
            "/v1/chat/completions",
            &chat("fake-chat", "a b c", 500, true),
        )
        .await;
    assert_eq!(stream.status(), StatusCode::OK);
    let a = request_id(&stream);
    let hook = Arc::clone(&fake);
    let text = read_cutting(stream, 3, move || hook.inject_panic()).await;
    assert_error_event(&text, "engine_restarted");
    let delivered = content_chunks(&data_lines(&text));

    let notice = notices.recv().await.unwrap();
    assert_eq!(notice.engine, "fake-chat");
    assert_eq!(notice.failed_requests, 1);
    expect_restart_audited(&app.ledger, "fake-chat").await;
    for watcher in watchers {
        watcher.abort();
    }
    let after = app
        .post("/v1/chat/completions", &chat("fake-chat", "d e", 4, false))
        .await;
    assert_eq!(after.status(), StatusCode::OK);
    let b = request_id(&after);

    app.drain().await;
    let billed_a = app.ledger.billed_usage(a).await.unwrap().unwrap();
    assert_eq!(
        billed_a.entry.status,
        UsageStatus::Error {
            code: "engine_restarted".to_owned()
        }
    );
    // The fake engine emits one token per chunk: billed exactly what was delivered.
    assert_eq!(
        usize::try_from(billed_a.entry.completion_tokens).unwrap(),
        delivered
    );
    let billed_b = app.ledger.billed_usage(b).await.unwrap().unwrap();
    assert_eq!(billed_b.entry.status, UsageStatus::Ok);
    let totals = app.ledger.usage_totals(&app.tenant).await.unwrap();
    assert_eq!(totals[0].requests, 2);
    let account = app.ledger.account(&app.tenant).await.unwrap();
    assert_eq!(account.reserved, Nanos::ZERO);
    assert_eq!(
        account.balance,
        Nanos(CREDIT - billed_a.cost.0 - billed_b.cost.0)
    );
    let (_, metrics) = app.get("/metrics").await;
    assert!(
        metrics.contains("tidepool_engine_restarts_total{engine=\"fake-chat\"} 1"),
        "{metrics}"
    );

    // A second panic soon after (well within `restart_backoff_max_ms` of the restart) waits
    // twice as long: the schedule's values, not measured time.
    fake.inject_panic();
    let second = notices.recv().await.unwrap();
    assert_eq!(second.restarts, 2);
    assert_eq!(second.failed_requests, 0, "nothing was running");
    assert_eq!(
        second.backoff,
        notice.backoff * 2,
        "{notice:?} then {second:?}"
    );
    let ready = app.wait_readyz(StatusCode::OK).await;
    assert_eq!(ready["checks"]["engines"]["fake-chat"], "ok", "{ready}");
}
