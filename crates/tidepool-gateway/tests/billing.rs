//! Billing through the HTTP surface: every model request reserves its most possible cost before
//! any compute, settles at the exact cost of what was delivered (or voids when nothing was),
//! carries `x-ratelimit-*` headers, honours `Idempotency-Key`, and a tenant with a budget never
//! overspends, whatever the concurrency — on SQLite, on PostgreSQL and with two gateway replicas
//! sharing one PostgreSQL. Plus `GET /v1/usage` scoping and the admin API.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers outside #[test] fns fail loudly"
)]
#[expect(
    dead_code,
    reason = "the harness is shared by every test file; this one uses part of it"
)]
mod common;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::*;
use futures::StreamExt as _;
use serde_json::{Value, json};
use tidepool_core::{Nanos, RequestId, TenantId};
use tidepool_engine::{EngineError, GenerationEvent};
use tidepool_gateway::StateOptions;
use tidepool_ledger::testing::{Kind, TestDb};
use tidepool_ledger::{
    AuditContext, BudgetScope, Ledger, LedgerOptions, Month, ProjectId, RateLimits, RateScope,
    UsageStatus,
};
use tower::ServiceExt as _;

fn chat(model: &str, max_tokens: u32) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": "count to ten please"}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

fn request_id_of(response: &axum::http::Response<Body>) -> RequestId {
    RequestId::parse(response.headers()["x-request-id"].to_str().unwrap()).unwrap()
}

/// Sends a chat POST in the background (for requests the scripted engine must answer first).
fn spawn_post(
    app: &App,
    key: &str,
    body: &Value,
) -> tokio::task::JoinHandle<axum::http::Response<Body>> {
    let router = app.router.clone();
    let request = post("/v1/chat/completions", key, body.to_string());
    tokio::spawn(async move { router.oneshot(request).await.unwrap() })
}

fn with_header(mut request: Request<Body>, name: &'static str, value: &str) -> Request<Body> {
    request.headers_mut().insert(name, value.parse().unwrap());
    request
}

#[tokio::test]
async fn a_request_is_billed_its_exact_cost_at_its_price_snapshot() {
    let app = App::new().await;
    let before = app.balance().await;
    let response = app.post("/v1/chat/completions", &chat(FAKE_CHAT, 8)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let request_id = request_id_of(&response);
    let entry = app.usage_of(&response).await;
    assert_eq!(entry.status, UsageStatus::Ok);
    let body = json(response).await;
    let prompt = u32::try_from(body["usage"]["prompt_tokens"].as_u64().unwrap()).unwrap();
    let completion = u32::try_from(body["usage"]["completion_tokens"].as_u64().unwrap()).unwrap();
    assert_eq!(completion, 8);
    app.settle().await;
    let billed = app.ledger.billed_usage(request_id).await.unwrap().unwrap();
    assert_eq!(billed.cost, Nanos(cost(prompt, completion)));
    assert_eq!(billed.price.unwrap(), price(FAKE_CHAT));
    assert_eq!(before - app.balance().await, cost(prompt, completion));
    assert_eq!(app.reserved().await, 0, "the hold was released");
}

#[tokio::test]
async fn an_unaffordable_request_is_429_insufficient_quota_before_any_compute() {
    let mut app = App::new().await;
    let broke = TenantId::new("broke").unwrap();
    let key = app
        .ledger
        .create_key(&broke, "k", &AuditContext::ADMIN)
        .await
        .unwrap();
    let pending = spawn_post(&app, &key.secret, &chat(SCRIPTED, 4));
    // Whichever comes first: the answer, or the engine receiving the request (a failure).
    let outcome = tokio::select! {
        response = pending => Ok(response.unwrap()),
        submitted = app.submission() => Err(submitted.request.request_id),
    };
    let response = outcome.expect("the engine must never receive an unaffordable request");
    assert_eq!(response.headers()["x-should-retry"], "false");
    let error = expect_error(
        response,
        StatusCode::TOO_MANY_REQUESTS,
        "insufficient_quota",
    )
    .await;
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("may cost up to"),
        "{error}"
    );
    app.settle().await;
    // The same request from a funded tenant reaches the engine.
    let pending = spawn_post(&app, &app.key, &chat(SCRIPTED, 4));
    let submitted = app.submission().await;
    submitted
        .events
        .send(GenerationEvent::Failed(EngineError::Decode { code: 1 }))
        .await
        .unwrap();
    assert_eq!(
        pending.await.unwrap().status(),
        StatusCode::INTERNAL_SERVER_ERROR
    );
}

#[tokio::test]
async fn failure_before_the_first_token_voids_and_bills_nothing() {
    let mut app = App::new().await;
    let before = app.balance().await;
    let body = json!({"model": SCRIPTED, "messages": [{"role": "user", "content": "hi"}],
                      "max_tokens": 8, "stream": true});
    let pending = spawn_post(&app, &app.key, &body);
    let submitted = app.submission().await;
    submitted
        .events
        .send(GenerationEvent::Failed(EngineError::Decode { code: 1 }))
        .await
        .unwrap();
    let response = pending.await.unwrap();
    let request_id = request_id_of(&response);
    let events = sse_data(&body_bytes(response).await);
    assert!(
        events.last().unwrap().contains("internal_error"),
        "{events:?}"
    );
    app.settle().await;
    let billed = app.ledger.billed_usage(request_id).await.unwrap().unwrap();
    assert_eq!(billed.cost, Nanos::ZERO);
    assert!(matches!(billed.entry.status, UsageStatus::Error { .. }));
    assert_eq!(app.balance().await, before);
}

#[tokio::test]
async fn an_engine_refusal_after_admission_voids_the_hold() {
    let app = App::new().await;
    let before = app.balance().await;
    app.scripted
        .overloaded
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let response = app.post("/v1/chat/completions", &chat(SCRIPTED, 4)).await;
    let request_id = request_id_of(&response);
    expect_error(response, StatusCode::TOO_MANY_REQUESTS, "overloaded").await;
    app.settle().await;
    let billed = app.ledger.billed_usage(request_id).await.unwrap().unwrap();
    assert_eq!(billed.cost, Nanos::ZERO);
    assert_eq!(app.balance().await, before);
    assert_eq!(app.reserved().await, 0, "the hold was released");
}

#[tokio::test]
async fn a_disconnected_stream_is_billed_for_the_tokens_delivered() {
    let mut app = App::new().await;
    let before = app.balance().await;
    let body = json!({"model": SCRIPTED, "messages": [{"role": "user", "content": "one two three"}],
                      "max_tokens": 16, "stream": true});
    let pending = spawn_post(&app, &app.key, &body);
    let submitted = app.submission().await;
    let prompt_tokens = u32::try_from(submitted.request.prompt.len()).unwrap();
    let response = pending.await.unwrap();
    let request_id = request_id_of(&response);
    let mut stream = response.into_body().into_data_stream();
    let _role = stream.next().await.unwrap().unwrap();
    for word in ["a", "b", "c"] {
        submitted
            .events
            .send(GenerationEvent::Chunk {
                text: format!(" {word}"),
                tokens: 1,
            })
            .await
            .unwrap();
        let frame = stream.next().await.unwrap().unwrap();
        assert!(String::from_utf8_lossy(&frame).contains(word));
    }
    drop(stream);
    submitted.events.closed().await;
    app.settle().await;
    let billed = app.ledger.billed_usage(request_id).await.unwrap().unwrap();
    assert_eq!(billed.entry.status, UsageStatus::ClientDisconnected);
    assert_eq!(billed.entry.completion_tokens, 3);
    assert_eq!(billed.cost, Nanos(cost(prompt_tokens, 3)));
    assert_eq!(before - app.balance().await, cost(prompt_tokens, 3));
}

#[tokio::test]
async fn an_idempotency_key_never_bills_twice() {
    let app = App::new().await;
    let before = app.balance().await;
    let send = || {
        app.send(with_header(
            post(
                "/v1/chat/completions",
                &app.key,
                chat(FAKE_CHAT, 4).to_string(),
            ),
            "idempotency-key",
            "order-42",
        ))
    };
    let first = send().await;
    assert_eq!(first.status(), StatusCode::OK);
    let first_id = request_id_of(&first);
    let second = send().await;
    assert_eq!(second.headers()["x-should-retry"], "false");
    let error = expect_error(second, StatusCode::CONFLICT, "idempotency_key_reused").await;
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains(&first_id.to_string()),
        "{error}"
    );
    app.settle().await;
    let billed = app.ledger.billed_usage(first_id).await.unwrap().unwrap();
    assert_eq!(before - app.balance().await, billed.cost.0);
    // A malformed key is a 400 naming the header.
    let bad = app
        .send(with_header(
            post(
                "/v1/chat/completions",
                &app.key,
                chat(FAKE_CHAT, 4).to_string(),
            ),
            "idempotency-key",
            &"k".repeat(256),
        ))
        .await;
    let error = expect_error(bad, StatusCode::BAD_REQUEST, "invalid_request_error").await;
    assert_eq!(error["param"], "Idempotency-Key");
}

#[tokio::test]
async fn rate_limits_answer_with_openai_headers() {
    let app = App::new().await;
    app.ledger
        .set_rate_limits(
            &RateScope::Key {
                key_id: tidepool_core::KeyId(app.key_id.clone()),
            },
            RateLimits {
                requests_per_minute: Some(2),
                tokens_per_minute: None,
            },
            &AuditContext::ADMIN,
        )
        .await
        .unwrap();
    for remaining in ["1", "0"] {
        let response = app.post("/v1/chat/completions", &chat(FAKE_CHAT, 2)).await;
        assert_eq!(response.status(), StatusCode::OK);
        let headers = response.headers();
        assert_eq!(headers["x-ratelimit-limit-requests"], "2");
        assert_eq!(headers["x-ratelimit-remaining-requests"], remaining);
        assert!(
            headers["x-ratelimit-reset-requests"]
                .to_str()
                .unwrap()
                .ends_with('s')
        );
        assert!(!headers.contains_key("x-ratelimit-limit-tokens"));
    }
    let refused = app.post("/v1/chat/completions", &chat(FAKE_CHAT, 2)).await;
    assert!(refused.headers().contains_key("retry-after"));
    assert_eq!(refused.headers()["x-ratelimit-remaining-requests"], "0");
    assert_eq!(refused.headers()["x-ratelimit-limit-requests"], "2");
    expect_error(
        refused,
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limit_exceeded",
    )
    .await;
}

#[tokio::test]
async fn embeddings_reserve_an_upper_bound_and_settle_the_exact_count() {
    let app = App::new().await;
    let before = app.balance().await;
    let response = app
        .post(
            "/v1/embeddings",
            &json!({"model": EMBED, "input": ["one two three", "four"]}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let request_id = request_id_of(&response);
    app.settle().await;
    let billed = app.ledger.billed_usage(request_id).await.unwrap().unwrap();
    assert_eq!(billed.entry.prompt_tokens, 4);
    assert_eq!(billed.cost, Nanos(cost(4, 0)));
    assert_eq!(before - app.balance().await, cost(4, 0));
}

#[tokio::test]
async fn usage_is_scoped_to_the_callers_own_tenant() {
    let app = App::new().await;
    let response = app.post("/v1/chat/completions", &chat(FAKE_CHAT, 3)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body = json(response).await;
    let prompt = u32::try_from(body["usage"]["prompt_tokens"].as_u64().unwrap()).unwrap();
    app.settle().await;
    for scope in ["key", "project", "tenant"] {
        let report = json(app.get(&format!("/v1/usage?scope={scope}")).await).await;
        assert_eq!(report["scope"], scope);
        assert_eq!(report["tenant"], "acme");
        assert_eq!(report["currency"], "USD");
        let row = report["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|row| row["model"] == FAKE_CHAT)
            .unwrap_or_else(|| panic!("{report}"));
        assert_eq!(row["requests"], 1);
        assert_eq!(row["completion_tokens"], 3);
        assert_eq!(row["cost_nanos"], cost(prompt, 3));
    }
    // Another tenant's key sees none of acme's traffic, whatever scope it asks for.
    let other = app
        .ledger
        .create_key(&TenantId::new("globex").unwrap(), "k", &AuditContext::ADMIN)
        .await
        .unwrap();
    for scope in ["key", "project", "tenant"] {
        let request = Request::get(format!("/v1/usage?scope={scope}"))
            .header("authorization", format!("Bearer {}", other.secret))
            .body(Body::empty())
            .unwrap();
        let report = json(app.send(request).await).await;
        assert_eq!(report["tenant"], "globex");
        assert!(
            report["data"]
                .as_array()
                .unwrap()
                .iter()
                .all(|row| row["model"] != FAKE_CHAT),
            "{report}"
        );
    }
    let bad = app.get("/v1/usage?scope=everyone").await;
    expect_error(bad, StatusCode::BAD_REQUEST, "invalid_request_error").await;
    let bad = app.get("/v1/usage?month=2026-13").await;
    expect_error(bad, StatusCode::BAD_REQUEST, "invalid_request_error").await;
}

fn admin_request(method: &str, path: &str, token: &str, body: Option<Value>) -> Request<Body> {
    let builder = Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json");
    builder
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
        .unwrap()
}

#[tokio::test]
#[expect(
    clippy::too_many_lines,
    reason = "one tenant's story, read top to bottom"
)]
async fn admin_api_runs_a_tenant_from_credit_to_statement() {
    let app = App::new().await;
    let admin = |method: &str, path: &str, body: Option<Value>| {
        app.send(admin_request(method, path, ADMIN_TOKEN, body))
    };
    // Authentication.
    let wrong = app
        .send(admin_request("GET", "/admin/tenants/acme", "nope", None))
        .await;
    expect_error(wrong, StatusCode::UNAUTHORIZED, "invalid_admin_token").await;
    let user_key = app
        .send(admin_request("GET", "/admin/tenants/acme", &app.key, None))
        .await;
    // An `inference` key administers nothing, not even its own tenant (docs/access.md).
    expect_error(user_key, StatusCode::NOT_FOUND, "not_found").await;

    // A tenant, credit, a key.
    let created = admin(
        "POST",
        "/admin/tenants",
        Some(json!({"tenant": "initech", "currency": "EUR"})),
    )
    .await;
    assert_eq!(created.status(), StatusCode::CREATED);
    assert_eq!(json(created).await["currency"], "EUR");
    let missing = admin("GET", "/admin/tenants/nobody", None).await;
    expect_error(missing, StatusCode::NOT_FOUND, "resource_not_found").await;
    // The admin API has no mapping of its own: the same ledger error raised on any endpoint
    // answers with the same status and code.
    let same = tidepool_gateway::ApiError::from(tidepool_ledger::LedgerError::TenantNotFound {
        tenant: TenantId::new("nobody").unwrap(),
    });
    assert_eq!(
        (same.status(), same.code()),
        (StatusCode::NOT_FOUND, "resource_not_found")
    );
    let bad_amount = admin(
        "POST",
        "/admin/tenants/initech/credits",
        Some(json!({"amount": "1e3"})),
    )
    .await;
    expect_error(bad_amount, StatusCode::BAD_REQUEST, "invalid_request_error").await;
    let credited = json(
        admin(
            "POST",
            "/admin/tenants/initech/credits",
            Some(json!({"amount": "0.5", "note": "welcome"})),
        )
        .await,
    )
    .await;
    assert_eq!(credited["balance_nanos"], 500_000_000);
    let key = json(
        admin(
            "POST",
            "/admin/keys",
            Some(json!({"tenant": "initech", "name": "ci"})),
        )
        .await,
    )
    .await;
    let secret = key["key"].as_str().unwrap().to_owned();
    assert_eq!(key["project"], "default");

    // The models are priced in USD, the account is in EUR: a configuration error, not a
    // silent conversion.
    let mismatch = app
        .send(post(
            "/v1/chat/completions",
            &secret,
            chat(FAKE_CHAT, 2).to_string(),
        ))
        .await;
    assert_eq!(mismatch.status(), StatusCode::INTERNAL_SERVER_ERROR);

    // A USD tenant with a key budget of 5000 nano-units: one small request fits, then not.
    admin("POST", "/admin/tenants", Some(json!({"tenant": "hooli"}))).await;
    admin(
        "POST",
        "/admin/tenants/hooli/credits",
        Some(json!({"amount": "2"})),
    )
    .await;
    let key = json(
        admin(
            "POST",
            "/admin/keys",
            Some(json!({"tenant": "hooli", "name": "ci"})),
        )
        .await,
    )
    .await;
    let secret = key["key"].as_str().unwrap().to_owned();
    let key_id = key["key_id"].as_str().unwrap().to_owned();
    let budget = admin(
        "PUT",
        "/admin/budgets",
        Some(json!({"scope": "key", "key_id": key_id, "limit": "0.000020"})),
    )
    .await;
    assert_eq!(budget.status(), StatusCode::OK);
    assert_eq!(json(budget).await["limit_nanos"], 20_000);
    let ok = app
        .send(post(
            "/v1/chat/completions",
            &secret,
            chat(FAKE_CHAT, 2).to_string(),
        ))
        .await;
    assert_eq!(ok.status(), StatusCode::OK);
    let over = app
        .send(post(
            "/v1/chat/completions",
            &secret,
            chat(FAKE_CHAT, 8).to_string(),
        ))
        .await;
    expect_error(over, StatusCode::TOO_MANY_REQUESTS, "insufficient_quota").await;
    app.settle().await;

    // The statement reconciles to the nano-unit and matches the account.
    let month = Month::of_ms(tidepool_ledger::Clock::now_ms(
        &tidepool_ledger::SystemClock,
    ));
    let statement = json(
        admin(
            "GET",
            &format!("/admin/tenants/hooli/statement?month={month}"),
            None,
        )
        .await,
    )
    .await;
    let lines = statement["lines"].as_array().unwrap();
    assert_eq!(lines.len(), 2, "{statement}");
    let sum: i64 = lines
        .iter()
        .map(|l| l["amount_nanos"].as_i64().unwrap())
        .sum();
    let opening = statement["opening_balance_nanos"].as_i64().unwrap();
    let closing = statement["closing_balance_nanos"].as_i64().unwrap();
    assert_eq!(opening + sum, closing);
    let account = json(admin("GET", "/admin/tenants/hooli", None).await).await;
    assert_eq!(account["balance_nanos"], closing);
    assert_eq!(account["reserved_nanos"], 0);
    let usage = json(admin("GET", "/admin/tenants/hooli/usage", None).await).await;
    assert_eq!(
        usage["total_cost_nanos"].as_i64().unwrap(),
        2_000_000_000 - closing
    );

    // Revocation through the admin API is immediate.
    let revoked = admin("DELETE", &format!("/admin/keys/{key_id}"), None).await;
    assert_eq!(revoked.status(), StatusCode::NO_CONTENT);
    let after = app
        .send(post(
            "/v1/chat/completions",
            &secret,
            chat(FAKE_CHAT, 2).to_string(),
        ))
        .await;
    expect_error(after, StatusCode::UNAUTHORIZED, "invalid_api_key").await;
}

#[tokio::test]
async fn without_an_admin_token_the_admin_api_does_not_exist() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let ledger = Ledger::connect(&url).await.unwrap();
    let state = tidepool_gateway::AppState::with_options(
        Vec::new(),
        ledger,
        StateOptions::new(tidepool_core::Limits::default()),
    );
    let response = tidepool_gateway::router(state)
        .oneshot(admin_request(
            "GET",
            "/admin/tenants/acme",
            ADMIN_TOKEN,
            None,
        ))
        .await
        .unwrap();
    expect_error(response, StatusCode::NOT_FOUND, "not_found").await;
}

/// 200 concurrent requests against a project budget that fits exactly 50 of them: exactly 50
/// succeed and the spend equals (so never exceeds) the budget. `replicas` gateways share the
/// database, each with its own ledger handle (replica id), requests alternating between them.
#[expect(
    clippy::too_many_lines,
    reason = "set-up, burst and checks of one scenario"
)]
async fn two_hundred_against_a_budget_of_fifty(db: Arc<TestDb>, replicas: usize) {
    let mut apps = Vec::new();
    for replica in 0..replicas {
        let ledger = Ledger::connect_with(
            &db.url,
            LedgerOptions {
                replica_id: format!("replica-{replica}"),
                clock: db.clock.clone(),
                ..LedgerOptions::default()
            },
        )
        .await
        .unwrap();
        apps.push(
            App::on(
                ledger,
                None,
                StateOptions::new(tidepool_core::Limits::default()),
                |c| c,
            )
            .await,
        );
    }
    let acme = TenantId::new("acme").unwrap();
    let max_tokens = 4;
    // One probe request measures the exact cost (= hold: the fake engine always generates
    // `max_tokens`), then the budget is set to 50 of them on top of what the probe spent.
    let probe = apps[0]
        .post("/v1/chat/completions", &chat(FAKE_CHAT, max_tokens))
        .await;
    assert_eq!(probe.status(), StatusCode::OK, "the probe request succeeds");
    let probe_body = json(probe).await;
    let prompt = u32::try_from(probe_body["usage"]["prompt_tokens"].as_u64().unwrap()).unwrap();
    let each = cost(prompt, max_tokens);
    apps[0].settle().await;
    let project = BudgetScope::Project {
        tenant: acme.clone(),
        project: ProjectId::default_project(),
    };
    let budget = each * 51;
    apps[0]
        .ledger
        .set_budget(&project, Some(Nanos(budget)), &AuditContext::ADMIN)
        .await
        .unwrap();
    let balance_before = apps[0].balance().await;

    let mut pending = Vec::new();
    for i in 0..200 {
        let app = &apps[i % replicas];
        let request = post(
            "/v1/chat/completions",
            &app.key,
            chat(FAKE_CHAT, max_tokens).to_string(),
        );
        let router = app.router.clone();
        pending.push(tokio::spawn(async move {
            let response = router.oneshot(request).await.unwrap();
            let status = response.status();
            let body = json(response).await;
            (status, body)
        }));
    }
    let mut ok = 0;
    for handle in pending {
        let (status, body) = handle.await.unwrap();
        if status == StatusCode::OK {
            ok += 1;
        } else {
            assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
            assert_eq!(body["error"]["code"], "insufficient_quota", "{body}");
        }
    }
    for app in &apps {
        app.settle().await;
    }
    assert_eq!(ok, 50, "exactly the affordable requests succeed");
    let status = apps[0].ledger.budget(&project).await.unwrap();
    assert_eq!(status.reserved, Nanos::ZERO, "no hold left on the budget");
    assert_eq!(status.spent, Nanos(budget), "spend = budget, never above");
    assert_eq!(
        balance_before - apps[0].balance().await,
        each * 50,
        "the balance paid for exactly the 50"
    );
    let account = apps[0].ledger.account(&acme).await.unwrap();
    assert_eq!(account.reserved, Nanos::ZERO, "no hold left on the account");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_under_concurrency_sqlite() {
    tidepool_ledger::testing::run(Kind::Sqlite, |db| {
        two_hundred_against_a_budget_of_fifty(db, 1)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_under_concurrency_postgres() {
    tidepool_ledger::testing::run(Kind::Postgres, |db| {
        two_hundred_against_a_budget_of_fifty(db, 1)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_under_concurrency_two_replicas_on_postgres() {
    tidepool_ledger::testing::run(Kind::Postgres, |db| {
        two_hundred_against_a_budget_of_fifty(db, 2)
    })
    .await;
}
