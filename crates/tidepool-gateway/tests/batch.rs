//! The Batch API in-process: `/v1/files` and `/v1/batches` shapes, validation (every failure
//! with its line number), the runner (driven by `run_pending`, no timers), billing at the batch
//! price outside the RPM windows, cancel, expiry with an injected clock, tenant isolation, and a
//! restart mid-batch that neither duplicates a line nor charges one twice.
//!
//! These tests use the fake and scripted engines on purpose: they check the API's shape, the
//! state machine and the money, not generation (`tests/python/test_batch.py` runs a real model
//! through the official `openai` SDK).

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    reason = "test helpers outside #[test] fns fail loudly; scenarios read top to bottom"
)]
#[expect(
    dead_code,
    reason = "the harness is shared by every test file; this one uses part of it"
)]
mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{App, FAKE_CHAT, SCRIPTED, body_bytes, expect_error, json};
use serde_json::{Value, json};
use tidepool_core::{Limits, TenantId};
use tidepool_engine::{FinishReason, GenerationEvent, RequestClass};
use tidepool_gateway::StateOptions;
use tidepool_ledger::testing::ManualClock;
use tidepool_ledger::{AuditContext, Ledger, RateLimits, RateScope};

const BOUNDARY: &str = "tidepool-test-boundary";

/// A multipart upload of `content` with `purpose`.
fn upload_request(key: &str, purpose: &str, content: &str) -> Request<Body> {
    let body = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n\
         --{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"input.jsonl\"\r\n\
         Content-Type: application/jsonl\r\n\r\n{content}\r\n--{BOUNDARY}--\r\n"
    );
    Request::post("/v1/files")
        .header("authorization", format!("Bearer {key}"))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(Body::from(body))
        .unwrap()
}

async fn upload(app: &App, content: &str) -> String {
    let response = app.send(upload_request(&app.key, "batch", content)).await;
    assert_eq!(response.status(), StatusCode::OK, "upload accepted");
    let file = json(response).await;
    assert_eq!(file["object"], "file", "{file}");
    assert_eq!(file["purpose"], "batch", "{file}");
    assert_eq!(file["bytes"], content.len(), "{file}");
    file["id"].as_str().unwrap().to_owned()
}

fn chat_line(custom_id: &str, model: &str) -> String {
    json!({
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "max_tokens": 4,
                 "messages": [{"role": "user", "content": format!("say {custom_id}")}]},
    })
    .to_string()
}

fn chat_file(lines: usize, model: &str) -> String {
    (0..lines)
        .map(|i| chat_line(&format!("req-{i}"), model))
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

async fn create(app: &App, file_id: &str) -> Value {
    let response = app
        .post(
            "/v1/batches",
            &json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                    "completion_window": "24h", "metadata": {"job": "nightly"}}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK, "batch created");
    json(response).await
}

async fn batch(app: &App, id: &str) -> Value {
    let response = app.get(&format!("/v1/batches/{id}")).await;
    assert_eq!(response.status(), StatusCode::OK, "batch found");
    json(response).await
}

/// The JSON lines of a file's content.
async fn content(app: &App, file_id: &str) -> Vec<Value> {
    let response = app.get(&format!("/v1/files/{file_id}/content")).await;
    assert_eq!(response.status(), StatusCode::OK, "content found");
    let bytes = body_bytes(response).await;
    String::from_utf8(bytes)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// What a line's response says it cost at half price (the test prices are 1000 and 2000
/// nano-units per prompt and completion token: halves are exact).
fn half_price_cost(line: &Value) -> i64 {
    let usage = &line["response"]["body"]["usage"];
    usage["prompt_tokens"].as_i64().unwrap() * 500
        + usage["completion_tokens"].as_i64().unwrap() * 1000
}

#[tokio::test]
async fn a_batch_runs_every_line_once_at_the_batch_price_outside_the_rate_limits() {
    let app = App::new().await;
    // One request per minute: online traffic would be refused from the second request on.
    app.ledger
        .set_rate_limits(
            &RateScope::Key {
                key_id: tidepool_core::KeyId(app.key_id.clone()),
            },
            RateLimits {
                requests_per_minute: Some(1),
                tokens_per_minute: None,
            },
            &AuditContext::ADMIN,
        )
        .await
        .unwrap();
    let balance_before = app.balance().await;
    let file_id = upload(&app, &chat_file(12, FAKE_CHAT)).await;
    let created = create(&app, &file_id).await;
    assert_eq!(created["object"], "batch");
    assert_eq!(created["status"], "in_progress");
    assert_eq!(created["request_counts"]["total"], 12);
    assert_eq!(created["metadata"]["job"], "nightly");
    assert!(created["in_progress_at"].is_i64());
    let id = created["id"].as_str().unwrap().to_owned();

    assert_eq!(
        tidepool_gateway::batch::run_pending(&app.state)
            .await
            .unwrap(),
        1
    );
    app.settle().await;
    let done = batch(&app, &id).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        done["request_counts"],
        json!({"total": 12, "completed": 12, "failed": 0})
    );
    assert!(done["finalizing_at"].is_i64() && done["completed_at"].is_i64());
    assert!(done["error_file_id"].is_null());
    let output = content(&app, done["output_file_id"].as_str().unwrap()).await;
    assert_eq!(output.len(), 12);
    let ids: BTreeSet<&str> = output
        .iter()
        .map(|line| line["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 12, "one output line per custom_id");
    let mut cost = 0;
    for (i, line) in output.iter().enumerate() {
        // In line order.
        assert_eq!(line["custom_id"], format!("req-{i}"));
        assert!(line["id"].as_str().unwrap().starts_with("batch_req_"));
        assert_eq!(line["response"]["status_code"], 200);
        assert!(line["response"]["request_id"].is_string());
        assert_eq!(line["response"]["body"]["object"], "chat.completion");
        assert!(line["error"].is_null());
        cost += half_price_cost(line);
    }
    assert!(cost > 0);
    assert_eq!(done["usage"]["cost_nanos"], cost, "{done}");
    assert_eq!(
        balance_before - app.balance().await,
        cost,
        "billed once, at half price"
    );
    assert_eq!(app.reserved().await, 0);
    let acme = TenantId::new("acme").unwrap();
    let (requests, spend) = app
        .ledger
        .batch_usage(&tidepool_ledger::UsageScope::Tenant(acme), None)
        .await
        .unwrap();
    assert_eq!(
        (requests, spend),
        (12, cost),
        "usage entries are marked as batch"
    );

    // The output file is the tenant's, listed with purpose batch_output.
    let list = json(app.get("/v1/files?purpose=batch_output").await).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    let list = json(app.get("/v1/batches?limit=1").await).await;
    assert_eq!(list["data"][0]["id"], id.as_str());
    assert_eq!(list["has_more"], false);
}

#[tokio::test]
async fn a_batch_line_runs_as_a_batch_class_request() {
    let mut app = App::new().await;
    let file_id = upload(&app, &chat_file(1, SCRIPTED)).await;
    let id = create(&app, &file_id).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let state = app.state.clone();
    let runner = tokio::spawn(async move { tidepool_gateway::batch::run_pending(&state).await });
    let submitted = app.submission().await;
    assert_eq!(submitted.request.class, RequestClass::Batch);
    finish(&submitted.events, 3).await;
    runner.await.unwrap().unwrap();
    assert_eq!(batch(&app, &id).await["status"], "completed");
}

/// Answers a scripted generation with `completion` tokens.
async fn finish(events: &tokio::sync::mpsc::Sender<GenerationEvent>, completion: u32) {
    events
        .send(GenerationEvent::Chunk {
            text: "ok".to_owned(),
            tokens: completion,
        })
        .await
        .unwrap();
    events
        .send(GenerationEvent::Done {
            finish_reason: FinishReason::Stop,
            prompt_tokens: 2,
            cached_prompt_tokens: Some(0),
            completion_tokens: completion,
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn validation_reports_every_bad_line_with_its_number_and_code() {
    let app = App::new().await;
    let lines = [
        chat_line("a", FAKE_CHAT), // 1: fine
        "{not json".to_owned(),    // 2
        json!({"method": "POST", "url": "/v1/chat/completions",
               "body": {"model": FAKE_CHAT}})
        .to_string(), // 3: no custom_id
        chat_line("a", FAKE_CHAT), // 4: duplicate
        json!({"custom_id": "e", "method": "POST", "url": "/v1/embeddings",
               "body": {"model": FAKE_CHAT}})
        .to_string(), // 5: url
        chat_line("f", "other-model"), // 6: mixed models
        json!({"custom_id": "g", "method": "GET", "url": "/v1/chat/completions",
               "body": {"model": FAKE_CHAT}})
        .to_string(), // 7: method
        json!({"custom_id": "h", "method": "POST", "url": "/v1/chat/completions",
               "body": {"messages": []}})
        .to_string(), // 8: no body.model
        "[1, 2]".to_owned(),       // 9: not an object
        String::new(),             // 10: blank, skipped
        json!({"custom_id": "k", "method": "POST",
               "url": "/v1/chat/completions"})
        .to_string(), // 11: no body
    ];
    let file_id = upload(&app, &lines.join("\n")).await;
    let failed = create(&app, &file_id).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(failed["failed_at"].is_i64());
    assert_eq!(failed["request_counts"]["total"], 0);
    assert_eq!(failed["errors"]["object"], "list");
    let found: Vec<(u64, String, Value)> = failed["errors"]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
            (
                e["line"].as_u64().unwrap(),
                e["code"].as_str().unwrap().to_owned(),
                e["param"].clone(),
            )
        })
        .collect();
    let expected = vec![
        (2, "invalid_json_line".to_owned(), Value::Null),
        (3, "missing_field".to_owned(), json!("custom_id")),
        (4, "duplicate_custom_id".to_owned(), json!("custom_id")),
        (5, "url_mismatch".to_owned(), json!("url")),
        (6, "mixed_models".to_owned(), json!("body.model")),
        (7, "invalid_method".to_owned(), json!("method")),
        (8, "missing_field".to_owned(), json!("body.model")),
        (9, "invalid_json_line".to_owned(), Value::Null),
        (11, "missing_field".to_owned(), json!("body")),
    ];
    assert_eq!(found, expected);
    // A failed batch is never run.
    assert_eq!(
        tidepool_gateway::batch::run_pending(&app.state)
            .await
            .unwrap(),
        0
    );

    // Too many lines: the first line past the limit is reported.
    let mut options = StateOptions::new(Limits::default());
    options.batch.batch_lines_max = 3;
    let small = on_fresh_sqlite(options, None).await;
    let file_id = upload(&small.app, &chat_file(5, FAKE_CHAT)).await;
    let failed = create(&small.app, &file_id).await;
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["errors"]["data"][0]["code"], "too_many_lines");
    assert_eq!(failed["errors"]["data"][0]["line"], 4);

    // An empty file.
    let file_id = upload(&app, "\n\n").await;
    let failed = create(&app, &file_id).await;
    assert_eq!(failed["errors"]["data"][0]["code"], "empty_file");
    assert!(failed["errors"]["data"][0]["line"].is_null());
}

#[tokio::test]
async fn bad_requests_to_the_files_and_batches_endpoints_have_stable_codes() {
    let mut options = StateOptions::new(Limits::default());
    options.batch.file_bytes_max = 1000;
    let fresh = on_fresh_sqlite(options, None).await;
    let app = &fresh.app;
    let too_large = app
        .send(upload_request(&app.key, "batch", &"x".repeat(1001)))
        .await;
    expect_error(too_large, StatusCode::PAYLOAD_TOO_LARGE, "file_too_large").await;
    let wrong_purpose = app.send(upload_request(&app.key, "fine-tune", "{}")).await;
    expect_error(wrong_purpose, StatusCode::BAD_REQUEST, "invalid_batch_file").await;
    // Nothing was kept of either.
    let list = json(app.get("/v1/files").await).await;
    assert_eq!(list["data"], json!([]));
    let entries = std::fs::read_dir(app.state.files_dir()).map_or(0, Iterator::count);
    assert_eq!(entries, 0, "no partial upload left on disk");

    let missing = app
        .post(
            "/v1/batches",
            &json!({"input_file_id": "file-00", "endpoint": "/v1/chat/completions",
                    "completion_window": "24h"}),
        )
        .await;
    expect_error(missing, StatusCode::NOT_FOUND, "file_not_found").await;
    let file_id = upload(app, &chat_file(1, FAKE_CHAT)).await;
    for (field, value) in [
        ("endpoint", json!("/v1/moderations")),
        ("completion_window", json!("48h")),
    ] {
        let mut body = json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                              "completion_window": "24h"});
        body[field] = value;
        let refused = app.post("/v1/batches", &body).await;
        let error = expect_error(refused, StatusCode::BAD_REQUEST, "invalid_request_error").await;
        assert_eq!(error["param"], field);
    }
    let metadata: serde_json::Map<String, Value> =
        (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
    let refused = app
        .post(
            "/v1/batches",
            &json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                    "completion_window": "24h", "metadata": metadata}),
        )
        .await;
    expect_error(refused, StatusCode::BAD_REQUEST, "invalid_request_error").await;
    expect_error(
        app.get("/v1/batches/batch_nope").await,
        StatusCode::NOT_FOUND,
        "batch_not_found",
    )
    .await;

    // Delete: gone from retrieval and listing.
    let deleted = app
        .send(
            Request::delete(format!("/v1/files/{file_id}"))
                .header("authorization", format!("Bearer {}", app.key))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(
        json(deleted).await,
        json!({"id": file_id, "object": "file", "deleted": true})
    );
    expect_error(
        app.get(&format!("/v1/files/{file_id}")).await,
        StatusCode::NOT_FOUND,
        "file_not_found",
    )
    .await;
}

#[tokio::test]
async fn a_cancelled_batch_gives_its_unfinished_lines_batch_cancelled() {
    let app = App::new().await;
    let balance_before = app.balance().await;
    let file_id = upload(&app, &chat_file(5, FAKE_CHAT)).await;
    let id = create(&app, &file_id).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let cancelling = json(
        app.post(&format!("/v1/batches/{id}/cancel"), &json!({}))
            .await,
    )
    .await;
    assert_eq!(cancelling["status"], "cancelling");
    assert!(cancelling["cancelling_at"].is_i64());
    // Cancelling twice is fine; it is still cancelling.
    let again = json(
        app.post(&format!("/v1/batches/{id}/cancel"), &json!({}))
            .await,
    )
    .await;
    assert_eq!(again["status"], "cancelling");
    // Its runner still reads the input: deleting it is refused until the batch ends.
    let delete_input = || {
        app.send(
            Request::delete(format!("/v1/files/{file_id}"))
                .header("authorization", format!("Bearer {}", app.key))
                .body(Body::empty())
                .unwrap(),
        )
    };
    let in_use = delete_input().await;
    assert_eq!(in_use.headers().get("x-should-retry").unwrap(), "false");
    let error = expect_error(in_use, StatusCode::CONFLICT, "file_in_use").await;
    assert_eq!(error["param"], "file_id", "{error}");
    assert!(
        error["message"].as_str().unwrap().contains(&id),
        "the refusal names the batch: {error}"
    );

    tidepool_gateway::batch::run_pending(&app.state)
        .await
        .unwrap();
    let cancelled = batch(&app, &id).await;
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    assert!(cancelled["cancelled_at"].is_i64());
    assert_eq!(
        cancelled["request_counts"],
        json!({"total": 5, "completed": 0, "failed": 5})
    );
    assert!(cancelled["output_file_id"].is_null());
    let errors = content(&app, cancelled["error_file_id"].as_str().unwrap()).await;
    assert_eq!(errors.len(), 5);
    for line in &errors {
        assert!(line["response"].is_null());
        assert_eq!(line["error"]["code"], "batch_cancelled");
    }
    assert_eq!(
        app.balance().await,
        balance_before,
        "nothing ran, nothing billed"
    );
    let refused = app
        .post(&format!("/v1/batches/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(refused.headers().get("x-should-retry").unwrap(), "false");
    expect_error(refused, StatusCode::CONFLICT, "batch_not_cancellable").await;
    assert_eq!(
        delete_input().await.status(),
        StatusCode::OK,
        "the batch ended"
    );
}

/// An app on a fresh SQLite file in a directory the caller keeps.
struct Fresh {
    app: App,
    _dir: tempfile::TempDir,
}

async fn on_fresh_sqlite(mut options: StateOptions, clock: Option<Arc<ManualClock>>) -> Fresh {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let ledger = match &clock {
        Some(clock) => Ledger::connect_with_clock(&url, clock.clone())
            .await
            .unwrap(),
        None => Ledger::connect(&url).await.unwrap(),
    };
    if let Some(clock) = clock {
        options.clock = clock;
    }
    options.batch.files_dir = Some(dir.path().join("batch-files"));
    Fresh {
        app: App::on(ledger, None, options, |config| config).await,
        _dir: dir,
    }
}

#[tokio::test]
async fn a_batch_past_its_window_expires_with_its_unfinished_lines() {
    let clock = ManualClock::new(tidepool_ledger::testing::T0_MS);
    let fresh = on_fresh_sqlite(StateOptions::new(Limits::default()), Some(clock.clone())).await;
    let app = &fresh.app;
    let file_id = upload(app, &chat_file(3, FAKE_CHAT)).await;
    let created = create(app, &file_id).await;
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(
        created["expires_at"].as_i64().unwrap() - created["created_at"].as_i64().unwrap(),
        86_400
    );
    clock.advance(86_400_000);
    tidepool_gateway::batch::run_pending(&app.state)
        .await
        .unwrap();
    let expired = batch(app, &id).await;
    assert_eq!(expired["status"], "expired", "{expired}");
    assert!(expired["expired_at"].is_i64());
    assert_eq!(
        expired["request_counts"],
        json!({"total": 3, "completed": 0, "failed": 3})
    );
    let errors = content(app, expired["error_file_id"].as_str().unwrap()).await;
    let codes: Vec<&str> = errors
        .iter()
        .map(|line| line["error"]["code"].as_str().unwrap())
        .collect();
    assert_eq!(codes, ["batch_expired"; 3]);
    expect_error(
        app.post(&format!("/v1/batches/{id}/cancel"), &json!({}))
            .await,
        StatusCode::CONFLICT,
        "batch_not_cancellable",
    )
    .await;
}

#[tokio::test]
async fn another_tenants_files_and_batches_are_not_found() {
    let app = App::new().await;
    let file_id = upload(&app, &chat_file(1, FAKE_CHAT)).await;
    let id = create(&app, &file_id).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let globex = TenantId::new("globex").unwrap();
    app.ledger
        .create_tenant(&globex, tidepool_core::Currency::USD, &AuditContext::ADMIN)
        .await
        .unwrap();
    let other = app
        .ledger
        .create_key(&globex, "other", &AuditContext::ADMIN)
        .await
        .unwrap()
        .secret;
    let as_other = |method: &str, path: String| {
        Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {other}"))
            .body(Body::empty())
            .unwrap()
    };
    for (method, path, code) in [
        ("GET", format!("/v1/files/{file_id}"), "file_not_found"),
        (
            "GET",
            format!("/v1/files/{file_id}/content"),
            "file_not_found",
        ),
        ("DELETE", format!("/v1/files/{file_id}"), "file_not_found"),
        ("GET", format!("/v1/batches/{id}"), "batch_not_found"),
        (
            "POST",
            format!("/v1/batches/{id}/cancel"),
            "batch_not_found",
        ),
    ] {
        let response = app.send(as_other(method, path)).await;
        expect_error(response, StatusCode::NOT_FOUND, code).await;
    }
    let files = json(app.send(as_other("GET", "/v1/files".to_owned())).await).await;
    assert_eq!(files["data"], json!([]));
    let batches = json(app.send(as_other("GET", "/v1/batches".to_owned())).await).await;
    assert_eq!(batches["data"], json!([]));
    // A batch naming another tenant's file: not found either.
    let response = app
        .send(common::post(
            "/v1/batches",
            &other,
            json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                   "completion_window": "24h"})
            .to_string(),
        ))
        .await;
    expect_error(response, StatusCode::NOT_FOUND, "file_not_found").await;
    // The owner still sees both.
    assert_eq!(batch(&app, &id).await["id"], id.as_str());
}

#[tokio::test]
async fn a_restart_mid_batch_neither_duplicates_nor_double_charges_a_line() {
    const LINES: usize = 6;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let options = || {
        let mut options = StateOptions::new(Limits::default());
        options.batch.files_dir = Some(dir.path().join("batch-files"));
        options.batch.lines_in_flight_max = 1;
        options
    };
    let mut first = App::on(Ledger::connect(&url).await.unwrap(), None, options(), |c| c).await;
    let balance_before = first.balance().await;
    let file_id = upload(&first, &chat_file(LINES, SCRIPTED)).await;
    let id = create(&first, &file_id).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let state = first.state.clone();
    let runner = tokio::spawn(async move { tidepool_gateway::batch::run_pending(&state).await });
    // Two lines answered, the third in flight when the process "dies".
    for _ in 0..2 {
        let submitted = first.submission().await;
        finish(&submitted.events, 3).await;
    }
    let _third = first.submission().await;
    runner.abort();
    assert!(runner.await.unwrap_err().is_cancelled());
    first.settle().await;
    drop(first);

    let mut second = App::on(Ledger::connect(&url).await.unwrap(), None, options(), |c| c).await;
    let state = second.state.clone();
    let runner = tokio::spawn(async move { tidepool_gateway::batch::run_pending(&state).await });
    // Only the lines without a result run again: the third (its first run was voided) on.
    for _ in 2..LINES {
        let submitted = second.submission().await;
        finish(&submitted.events, 3).await;
    }
    runner.await.unwrap().unwrap();
    second.settle().await;
    let done = batch(&second, &id).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        done["request_counts"],
        json!({"total": LINES, "completed": LINES, "failed": 0})
    );
    let output = content(&second, done["output_file_id"].as_str().unwrap()).await;
    let ids: Vec<&str> = output
        .iter()
        .map(|line| line["custom_id"].as_str().unwrap())
        .collect();
    let expected: Vec<String> = (0..LINES).map(|i| format!("req-{i}")).collect();
    assert_eq!(ids, expected, "every line once, in order");
    let cost: i64 = output.iter().map(half_price_cost).sum();
    assert_eq!(cost, 6 * (2 * 500 + 3 * 1000));
    assert_eq!(done["usage"]["cost_nanos"], cost);
    assert_eq!(
        balance_before - second.balance().await,
        cost,
        "each line billed once"
    );
    assert_eq!(second.reserved().await, 0);
}

#[tokio::test]
async fn a_settled_line_that_already_has_a_result_is_voided_not_billed_twice() {
    // Two runs of one line (a lease that lapsed mid-line): the ledger keeps the first result and
    // bills the second nothing.
    let app = App::new().await;
    let balance_before = app.balance().await;
    let file_id = upload(&app, &chat_file(1, FAKE_CHAT)).await;
    let id = create(&app, &file_id).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    tidepool_gateway::batch::run_pending(&app.state)
        .await
        .unwrap();
    app.settle().await;
    let charged = balance_before - app.balance().await;
    assert!(charged > 0);
    // Run the same line again by hand, as a second runner would.
    let ledger = &app.ledger;
    let tenant = TenantId::new("acme").unwrap();
    let request = tidepool_ledger::ReserveRequest {
        request_id: tidepool_core::RequestId::new(),
        key_id: tidepool_core::KeyId(app.key_id.clone()),
        model: common::id(FAKE_CHAT),
        prompt_tokens: 10,
        completion_tokens_max: 10,
        idempotency_key: None,
        class: tidepool_ledger::ReserveClass::Batch {
            discount_ppm: 500_000,
        },
    };
    ledger.reserve(&request).await.unwrap();
    let entry = tidepool_ledger::UsageEntry {
        request_id: request.request_id,
        tenant,
        key_id: request.key_id.clone(),
        model: Some(request.model.clone()),
        endpoint: "chat.completions".to_owned(),
        prompt_tokens: 10,
        completion_tokens: 10,
        cached_prompt_tokens: 0,
        cached_prompt_tokens_unknown: false,
        status: tidepool_ledger::UsageStatus::Ok,
        latency_ms: 1,
        created_at_ms: 1,
    };
    let line = tidepool_ledger::NewBatchLine {
        batch_id: id.clone(),
        custom_id: "req-0".to_owned(),
        line: 1,
        succeeded: true,
        status_code: Some(200),
        body: Some("{}".to_owned()),
        error_code: None,
        error_message: None,
    };
    let settlement = ledger
        .settle_batch_line(&entry, tidepool_ledger::Finish::Settle, &line)
        .await
        .unwrap();
    assert_eq!(settlement.cost.0, 0);
    assert_eq!(balance_before - app.balance().await, charged);
    assert_eq!(app.reserved().await, 0);
    let done = batch(&app, &id).await;
    assert_eq!(done["request_counts"]["completed"], 1);
    assert_eq!(done["usage"]["cost_nanos"], charged);
}
