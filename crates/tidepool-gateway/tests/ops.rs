//! What a scaled-out deployment needs from the server, through the whole router in-process:
//! `GET /readyz` (200 on a migrated database; 503 naming the missing migrations before them; 503
//! when the database is gone and 200 again when it is back, on a throwaway PostgreSQL that the
//! test stops and starts), a server whose schema is behind answers model requests 503
//! `unavailable` until start-up recovery has run on the current schema, and on database loss
//! model requests fail closed: 503 `unavailable` with `Retry-After`, the engine never sees them,
//! and once the database is back the usage entries are exactly the successful requests.

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

use std::path::Path;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::*;
use serde_json::{Value, json};
use tidepool_core::{Config, Limits, Nanos, RequestId, TenantId};
use tidepool_gateway::{AppState, StateOptions, UNAVAILABLE_RETRY_AFTER_MS, router};
use tidepool_ledger::testing::{TestDb, ThrowawayPostgres};
use tidepool_ledger::{Ledger, LedgerOptions, UsageStatus};
use tower::ServiceExt as _;

/// Short, so a request on the stopped database gives up quickly (not what is tested).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(1);

fn chat(model: &str, stream: bool) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": "count to ten please"}],
        "max_tokens": 4,
        "stream": stream,
    })
}

async fn readyz(router: &axum::Router) -> (StatusCode, Value) {
    let request = Request::get("/readyz").body(Body::empty()).unwrap();
    let response = router.clone().oneshot(request).await.unwrap();
    (response.status(), json(response).await)
}

fn request_id_of(response: &axum::http::Response<Body>) -> RequestId {
    RequestId::parse(response.headers()["x-request-id"].to_str().unwrap()).unwrap()
}

/// One successful chat request of the fake model per entry of `streams` (streamed or not), read
/// to the end; their request ids.
async fn serve_chats(app: &App, streams: &[bool]) -> Vec<RequestId> {
    let mut served = Vec::new();
    for &stream in streams {
        let response = app
            .post("/v1/chat/completions", &chat(FAKE_CHAT, stream))
            .await;
        assert_eq!(response.status(), StatusCode::OK, "a fake chat is served");
        served.push(request_id_of(&response));
        body_bytes(response).await;
    }
    served
}

/// A 503 `unavailable` that tells the client when to retry and names no internals.
async fn expect_unavailable(response: axum::http::Response<Body>) {
    let retry_after = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .to_owned();
    let retry_after_ms = response.headers()["retry-after-ms"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(retry_after, "1", "Retry-After in whole seconds");
    assert_eq!(
        retry_after_ms,
        UNAVAILABLE_RETRY_AFTER_MS.to_string(),
        "retry-after-ms"
    );
    let error = expect_error(response, StatusCode::SERVICE_UNAVAILABLE, "unavailable").await;
    let message = error["message"].as_str().unwrap();
    assert!(!message.contains("postgres"), "{message}");
    assert!(!message.contains("127.0.0.1"), "{message}");
}

#[tokio::test]
async fn readyz_is_ready_on_a_migrated_database_without_a_key() {
    let app = App::new().await;
    let (status, body) = readyz(&app.router).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // The fake engines' threads are watched; the scripted engine has no thread of its own and
    // there is no pool (so no pinned model).
    assert_eq!(
        body,
        json!({"status": "ready", "checks": {"database": "ok", "schema": "ok", "startup": "ok",
            "engines": {"fake-base": "ok", "fake-chat": "ok"}, "pinned_models": {}}})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_schema_answers_503_until_migrated_then_starts_up() {
    let db = TestDb::new(tidepool_ledger::testing::Kind::Sqlite).await;
    let options = LedgerOptions {
        migrate: false,
        ..LedgerOptions::default()
    };
    let ledger = Ledger::connect_with(&db.url, options).await.unwrap();
    let state =
        AppState::with_options(vec![], ledger.clone(), StateOptions::new(Limits::default()));
    let router = router(state.clone());
    let config = Config::parse("", Path::new("tidepool.toml")).unwrap();
    let starting = tidepool_gateway::start_up_when_current(&state, config);
    assert!(!state.is_started());

    let (status, body) = readyz(&router).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["status"], "not_ready");
    assert_eq!(body["checks"]["database"], "ok");
    let schema = body["checks"]["schema"].as_str().unwrap();
    assert!(schema.starts_with("behind: missing 2026"), "{schema}");
    assert!(
        body["checks"]["startup"]
            .as_str()
            .unwrap()
            .starts_with("pending"),
        "{body}"
    );
    // Model requests wait for start-up recovery: 503 with Retry-After, before any key check.
    let response = router
        .clone()
        .oneshot(post(
            "/v1/chat/completions",
            "tp-none",
            chat("m", false).to_string(),
        ))
        .await
        .unwrap();
    expect_unavailable(response).await;

    // A migration job runs; the server notices, recovers and lets requests in.
    let report = tidepool_ledger::migrate(&db.url).await.unwrap();
    assert!(report.status.is_current());
    starting.await.unwrap();
    assert!(state.is_started());
    let (status, body) = readyz(&router).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let key = ledger
        .create_key(&TenantId::new("acme").unwrap(), "k")
        .await
        .unwrap();
    let request = Request::get("/v1/models")
        .header("authorization", format!("Bearer {}", key.secret))
        .body(Body::empty())
        .unwrap();
    let response = router.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_loss_fails_closed_and_the_ledger_stays_exact() {
    let cluster = ThrowawayPostgres::spawn().await;
    let db = TestDb::postgres_on(cluster.url()).await;
    let options = LedgerOptions {
        acquire_timeout: Some(ACQUIRE_TIMEOUT),
        ..LedgerOptions::default()
    };
    let ledger = Ledger::connect_with(&db.url, options).await.unwrap();
    let mut app = App::on(ledger, None, StateOptions::new(Limits::default()), |c| c).await;
    let credit = app.balance().await;
    let mut served = Vec::new();
    served.extend(serve_chats(&app, &[false, true, false]).await);
    app.settle().await;
    assert_eq!(readyz(&app.router).await.0, StatusCode::OK);

    // The database goes away.
    let cluster = cluster.set_running(false).await;
    let mut refused = Vec::new();
    for (model, stream) in [(SCRIPTED, false), (SCRIPTED, true), (FAKE_CHAT, false)] {
        let response = app.post("/v1/chat/completions", &chat(model, stream)).await;
        refused.push(request_id_of(&response));
        expect_unavailable(response).await;
    }
    assert!(
        app.submissions.try_recv().is_err(),
        "the engine never sees a request that could not reserve"
    );
    let (status, body) = readyz(&app.router).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["status"], "not_ready");
    assert_ne!(body["checks"]["database"], "ok", "{body}");
    assert!(!body.to_string().contains("postgres://"), "{body}");

    // It comes back: ready again, requests succeed.
    let _cluster = cluster.set_running(true).await;
    let (status, body) = readyz(&app.router).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    served.extend(serve_chats(&app, &[true, false]).await);
    app.settle().await;

    // Exactly one entry per successful request, none for the refused ones; the balance is the
    // credit minus what the successful requests cost.
    let acme = TenantId::new("acme").unwrap();
    let totals = app.ledger.usage_totals(&acme).await.unwrap();
    let requests: u64 = totals.iter().map(|t| t.requests).sum();
    assert_eq!(requests, u64::try_from(served.len()).unwrap(), "{totals:?}");
    let mut billed = 0;
    for request_id in &served {
        let entry = app.ledger.usage_entry(*request_id).await.unwrap().unwrap();
        assert_eq!(entry.status, UsageStatus::Ok);
        let cost = app
            .ledger
            .billed_usage(*request_id)
            .await
            .unwrap()
            .unwrap()
            .cost;
        assert!(cost > Nanos::ZERO);
        billed += cost.0;
    }
    for request_id in &refused {
        assert!(app.ledger.usage_entry(*request_id).await.unwrap().is_none());
    }
    assert_eq!(app.balance().await, credit - billed);
    assert_eq!(app.reserved().await, 0, "no hold left behind");
}
