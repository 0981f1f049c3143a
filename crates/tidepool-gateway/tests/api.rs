//! In-process tests of the whole gateway (router + real SQLite ledger + test engines): response
//! shapes, SSE framing, every error path a client can trigger, and metering (exactly one usage
//! row per authenticated request, including a stream whose client disconnects). Nothing here
//! sleeps or asserts on time: tests wait on signals (the task tracker draining, the engine seeing
//! its channel close).

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers outside #[test] fns fail loudly"
)]
mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use base64::Engine as _;
use common::*;
use futures::StreamExt as _;
use serde_json::{Value, json};
use tidepool_engine::{FinishReason, GenerationEvent};
use tidepool_gateway::ERROR_CODES;
use tidepool_ledger::{AuditContext, UsageStatus};

fn chat_body(model: &str, extra: &Value) -> Value {
    let mut body = json!({
        "model": model,
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}],
        "max_tokens": 8,
        "temperature": 0,
    });
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    body
}

#[tokio::test]
async fn health_is_open_and_ok() {
    let app = App::new().await;
    let response = app
        .send(Request::get("/healthz").body(Body::empty()).unwrap())
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(json(response).await, json!({"status": "ok"}));
}

#[tokio::test]
async fn models_lists_every_served_model_with_its_kind() {
    let app = App::new().await;
    let response = app.get("/v1/models").await;
    assert_eq!(response.status(), StatusCode::OK);
    let usage = app.usage_of(&response).await;
    assert_eq!(usage.endpoint, "models");
    assert_eq!(usage.status, UsageStatus::Ok);
    let body = json(response).await;
    assert_eq!(body["object"], "list");
    let ids: Vec<_> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, [FAKE_BASE, FAKE_CHAT, EMBED, SCRIPTED]);
    assert_eq!(body["data"][0]["object"], "model");
    assert_eq!(body["data"][0]["kind"], "completion");
    assert_eq!(body["data"][2]["kind"], "embedding");
}

#[tokio::test]
async fn chat_completion_has_openai_shape_and_is_metered() {
    let app = App::new().await;
    let before = app.balance().await;
    let response = app
        .post(
            "/v1/chat/completions",
            &chat_body(FAKE_CHAT, &json!({"seed": 3})),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let usage = app.usage_of(&response).await;
    let body = json(response).await;
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], FAKE_CHAT);
    assert!(body["created"].as_i64().unwrap() > 1_700_000_000);
    let choice = &body["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["finish_reason"], "length");
    let text = choice["message"]["content"].as_str().unwrap();
    assert_eq!(text.split_whitespace().count(), 8, "{text}");
    // FakeEngine tokens are whitespace words of the rendered template.
    let prompt = "system: be brief\nuser: hello there\nassistant:";
    let prompt_tokens = u32::try_from(prompt.split_whitespace().count()).unwrap();
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": prompt_tokens, "completion_tokens": 8, "total_tokens": prompt_tokens + 8,
               "prompt_tokens_details": {"cached_tokens": 0}})
    );
    assert_eq!(usage.status, UsageStatus::Ok);
    assert_eq!(usage.endpoint, "chat.completions");
    assert_eq!(
        usage.model.as_ref().map(tidepool_core::ModelId::as_str),
        Some(FAKE_CHAT)
    );
    assert_eq!(usage.key_id.0, app.key_id);
    assert_eq!(usage.tenant.as_str(), "acme");
    assert_eq!(
        (usage.prompt_tokens, usage.completion_tokens),
        (prompt_tokens, 8)
    );
    assert_eq!(
        before - app.balance().await,
        cost(prompt_tokens, 8),
        "billed exactly"
    );
    assert_eq!(app.reserved().await, 0, "the hold was released");
}

#[tokio::test]
async fn chat_stream_frames_match_openai_and_the_non_stream_text() {
    let app = App::new().await;
    let whole = json(
        app.post(
            "/v1/chat/completions",
            &chat_body(FAKE_CHAT, &json!({"seed": 5})),
        )
        .await,
    )
    .await;
    let response = app
        .post(
            "/v1/chat/completions",
            &chat_body(
                FAKE_CHAT,
                &json!({"seed": 5, "stream": true, "stream_options": {"include_usage": true}}),
            ),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let headers = Response::from(&response);
    let data = sse_data(&body_bytes(response).await);
    let usage = app.usage_of(&headers).await;
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"
        && c["id"].as_str().unwrap().starts_with("chatcmpl-")));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| {
            c["choices"].get(0)?["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(
        text,
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );
    let finishes: Vec<_> = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0)?["finish_reason"].as_str())
        .collect();
    assert_eq!(finishes, ["length"]);
    // Every chunk carries `usage: null` except the last, which has usage and no choices.
    let (last, rest) = chunks.split_last().unwrap();
    assert!(rest.iter().all(|c| c["usage"].is_null()));
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"], whole["usage"]);
    assert_eq!(usage.status, UsageStatus::Ok);
    assert_eq!(usage.completion_tokens, 8);
}

/// `usage_of` needs only the headers; this copies them so the body can still be read.
struct Response;
impl Response {
    fn from(response: &axum::http::Response<Body>) -> axum::http::Response<Body> {
        let mut copy = axum::http::Response::new(Body::empty());
        *copy.headers_mut() = response.headers().clone();
        copy
    }
}

#[tokio::test]
async fn completions_stream_without_include_usage_has_no_usage_field() {
    let app = App::new().await;
    let body = json!({"model": FAKE_BASE, "prompt": ["once upon a time"], "max_tokens": 4, "stream": true});
    let response = app.post("/v1/completions", &body).await;
    assert_eq!(response.status(), StatusCode::OK);
    let data = sse_data(&body_bytes(response).await);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(
        chunks
            .iter()
            .all(|c| c.get("usage").is_none() && c["object"] == "text_completion")
    );
    assert!(
        chunks
            .iter()
            .all(|c| c["id"].as_str().unwrap().starts_with("cmpl-"))
    );
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
    let words: usize = chunks
        .iter()
        .map(|c| {
            c["choices"][0]["text"]
                .as_str()
                .unwrap()
                .split_whitespace()
                .count()
        })
        .sum();
    assert_eq!(words, 4);
}

#[tokio::test]
async fn completions_default_to_sixteen_tokens_and_stop_is_accepted() {
    let app = App::new().await;
    let body = json!({"model": FAKE_CHAT, "prompt": "one two three", "stop": ["zzz"]});
    let body = json(app.post("/v1/completions", &body).await).await;
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["usage"]["completion_tokens"], 16);
    assert_eq!(body["usage"]["prompt_tokens"], 3);
}

#[tokio::test]
async fn missing_malformed_and_unknown_keys_are_401() {
    let app = App::new().await;
    let body = chat_body(FAKE_CHAT, &json!({})).to_string();
    let no_header = Request::post("/v1/chat/completions")
        .body(Body::from(body.clone()))
        .unwrap();
    expect_error(
        app.send(no_header).await,
        StatusCode::UNAUTHORIZED,
        "invalid_api_key",
    )
    .await;
    for key in [
        "nope",
        "tp-nope-nope",
        &format!("{}x", app.key),
        &app.key.replace('-', "_"),
    ] {
        let response = app
            .send(post("/v1/chat/completions", key, body.clone()))
            .await;
        let error = expect_error(response, StatusCode::UNAUTHORIZED, "invalid_api_key").await;
        assert_eq!(error["type"], "authentication_error");
    }
    let models = app
        .send(
            Request::get("/v1/models")
                .header("authorization", "Basic abc")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    expect_error(models, StatusCode::UNAUTHORIZED, "invalid_api_key").await;
}

#[tokio::test]
async fn revoked_key_fails_at_once() {
    let app = App::new().await;
    assert_eq!(app.get("/v1/models").await.status(), StatusCode::OK);
    app.ledger
        .revoke_key(
            &tidepool_core::KeyId(app.key_id.clone()),
            &AuditContext::ADMIN,
        )
        .await
        .unwrap();
    expect_error(
        app.get("/v1/models").await,
        StatusCode::UNAUTHORIZED,
        "invalid_api_key",
    )
    .await;
}

#[tokio::test]
async fn malformed_json_is_an_openai_400_and_is_metered() {
    let app = App::new().await;
    for body in [
        r#"{"model": "x", "#,
        "[]",
        r#"{"model": 1, "messages": []}"#,
        r#"{"messages": []}"#,
    ] {
        let response = app
            .send(post("/v1/chat/completions", &app.key, body.to_owned()))
            .await;
        let usage = app.usage_of(&response).await;
        let error = expect_error(response, StatusCode::BAD_REQUEST, "invalid_request_error").await;
        assert_eq!(error["type"], "invalid_request_error");
        assert_eq!(
            usage.status,
            UsageStatus::Error {
                code: "invalid_request_error".into()
            }
        );
        assert_eq!(usage.model, None);
    }
    // No content type at all still parses (curl -d sends form encoding).
    let request = Request::post("/v1/completions")
        .header("authorization", format!("Bearer {}", app.key))
        .body(Body::from(
            json!({"model": FAKE_BASE, "prompt": "a b", "max_tokens": 1}).to_string(),
        ))
        .unwrap();
    assert_eq!(app.send(request).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn body_over_the_limit_is_413() {
    let limits = tidepool_core::Limits {
        request_body_bytes_max: 2048,
        ..Default::default()
    };
    let app = App::with(limits, |c| c).await;
    let body = json!({"model": FAKE_BASE, "prompt": "a ".repeat(2000)});
    let response = app.post("/v1/completions", &body).await;
    let usage = app.usage_of(&response).await;
    expect_error(response, StatusCode::PAYLOAD_TOO_LARGE, "request_too_large").await;
    assert_eq!(
        usage.status,
        UsageStatus::Error {
            code: "request_too_large".into()
        }
    );
}

#[tokio::test]
async fn unknown_model_is_404_and_kind_mismatches_are_400() {
    let app = App::new().await;
    let response = app
        .post(
            "/v1/chat/completions",
            &chat_body("no-such-model", &json!({})),
        )
        .await;
    let error = expect_error(response, StatusCode::NOT_FOUND, "model_not_found").await;
    assert_eq!(error["param"], "model");
    let stream = app
        .post(
            "/v1/chat/completions",
            &chat_body("no-such-model", &json!({"stream": true})),
        )
        .await;
    expect_error(stream, StatusCode::NOT_FOUND, "model_not_found").await;
    for (path, body) in [
        ("/v1/chat/completions", chat_body(EMBED, &json!({}))),
        ("/v1/chat/completions", chat_body(FAKE_BASE, &json!({}))),
        ("/v1/completions", json!({"model": EMBED, "prompt": "x"})),
        ("/v1/embeddings", json!({"model": FAKE_CHAT, "input": "x"})),
    ] {
        let response = app.post(path, &body).await;
        let usage = app.usage_of(&response).await;
        let error =
            expect_error(response, StatusCode::BAD_REQUEST, "model_endpoint_mismatch").await;
        assert_eq!(error["param"], "model");
        assert_eq!(
            usage.status,
            UsageStatus::Error {
                code: "model_endpoint_mismatch".into()
            }
        );
        assert!(usage.model.is_some());
    }
}

#[tokio::test]
async fn bad_parameters_are_400_naming_the_param() {
    let app = App::new().await;
    for (field, value) in [
        ("temperature", json!(5)),
        ("top_p", json!(0)),
        ("max_tokens", json!(-1)),
        ("max_completion_tokens", json!(0)),
        ("presence_penalty", json!(3)),
        ("frequency_penalty", json!(-3)),
        ("n", json!(2)),
        ("top_k", json!(-5)),
        ("stop", json!(["", "x"])),
        ("messages", json!([])),
        ("messages", json!([{"role": "tool", "content": "x"}])),
    ] {
        let response = app
            .post(
                "/v1/chat/completions",
                &chat_body(FAKE_CHAT, &json!({ field: value })),
            )
            .await;
        let usage = app.usage_of(&response).await;
        let error = expect_error(response, StatusCode::BAD_REQUEST, "invalid_request_error").await;
        assert_eq!(error["param"], field, "{field}");
        assert_eq!(
            usage.status,
            UsageStatus::Error {
                code: "invalid_request_error".into()
            }
        );
    }
    for (field, body) in [
        ("prompt", json!({"model": FAKE_BASE, "prompt": [1, 2, 3]})),
        ("prompt", json!({"model": FAKE_BASE, "prompt": ["a", "b"]})),
    ] {
        let error = expect_error(
            app.post("/v1/completions", &body).await,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
        )
        .await;
        assert_eq!(error["param"], field);
    }
}

#[tokio::test]
async fn prompt_plus_max_tokens_over_the_context_is_context_length_exceeded() {
    let app = App::with(tidepool_core::Limits::default(), |mut c| {
        c.context_tokens = 16;
        c
    })
    .await;
    let body = json!({"model": FAKE_CHAT, "prompt": "word ".repeat(12), "max_tokens": 8});
    let response = app.post("/v1/completions", &body).await;
    let usage = app.usage_of(&response).await;
    expect_error(response, StatusCode::BAD_REQUEST, "context_length_exceeded").await;
    assert_eq!(
        usage.status,
        UsageStatus::Error {
            code: "context_length_exceeded".into()
        }
    );
    // Chat without max_tokens takes what the context leaves.
    let fits = json!({"model": FAKE_CHAT, "messages": [{"role": "user", "content": "a b c"}]});
    let body = json(app.post("/v1/chat/completions", &fits).await).await;
    assert_eq!(body["usage"]["total_tokens"], 16);
}

#[tokio::test]
async fn overload_is_429_with_retry_after() {
    let app = App::new().await;
    app.scripted
        .overloaded
        .store(true, std::sync::atomic::Ordering::Relaxed);
    for stream in [false, true] {
        let response = app
            .post(
                "/v1/chat/completions",
                &chat_body(SCRIPTED, &json!({"stream": stream})),
            )
            .await;
        assert_eq!(response.headers()["retry-after"], "2");
        assert_eq!(response.headers()["retry-after-ms"], "1500");
        let usage = app.usage_of(&response).await;
        let error = expect_error(response, StatusCode::TOO_MANY_REQUESTS, "overloaded").await;
        assert_eq!(error["type"], "rate_limit_error");
        assert_eq!(
            usage.status,
            UsageStatus::Error {
                code: "overloaded".into()
            }
        );
    }
}

#[tokio::test]
async fn disconnect_mid_stream_records_the_delivered_tokens_and_cancels_the_generation() {
    let mut app = App::new().await;
    let body = chat_body(SCRIPTED, &json!({"stream": true, "max_tokens": 40}));
    let response = app.post("/v1/chat/completions", &body).await;
    assert_eq!(response.status(), StatusCode::OK);
    let headers = Response::from(&response);
    let submitted = app.submission().await;
    assert_eq!(submitted.request.params.max_tokens, 40);
    // Three chunks worth 1 + 2 + 1 tokens, and one held-back token with no text yet.
    for (text, tokens) in [("a", 1), (" bc", 2), (" d", 1), ("", 1)] {
        submitted
            .events
            .send(GenerationEvent::Chunk {
                text: text.into(),
                tokens,
            })
            .await
            .unwrap();
    }
    let mut frames = response.into_body().into_data_stream();
    let mut contents = Vec::new();
    while contents.len() < 3 {
        let frame = frames.next().await.unwrap().unwrap();
        for data in sse_data(&frame) {
            let chunk: Value = serde_json::from_str(&data).unwrap();
            if let Some(text) = chunk["choices"][0]["delta"]["content"]
                .as_str()
                .filter(|t| !t.is_empty())
            {
                contents.push(text.to_owned());
            }
        }
    }
    assert_eq!(contents, ["a", " bc", " d"]);
    drop(frames); // the client goes away
    submitted.events.closed().await; // the engine sees the cancellation
    let usage = app.usage_of(&headers).await;
    assert_eq!(usage.status, UsageStatus::ClientDisconnected);
    assert_eq!(usage.completion_tokens, 4);
    assert_eq!(usage.prompt_tokens, 4);
}

#[tokio::test]
async fn disconnect_frees_the_fake_engine_slot() {
    let app = App::with(tidepool_core::Limits::default(), |mut c| {
        c.chunks_buffered_max = 2;
        c.seqs_max = 1;
        c
    })
    .await;
    let body = chat_body(FAKE_CHAT, &json!({"stream": true, "max_tokens": 1000}));
    let response = app.post("/v1/chat/completions", &body).await;
    let headers = Response::from(&response);
    let mut frames = response.into_body().into_data_stream();
    let mut events = 0;
    while events < 4 {
        events += sse_data(&frames.next().await.unwrap().unwrap()).len();
    }
    drop(frames);
    let usage = app.usage_of(&headers).await;
    assert_eq!(usage.status, UsageStatus::ClientDisconnected);
    assert!(
        (2..=4).contains(&usage.completion_tokens),
        "{}",
        usage.completion_tokens
    );
    // The slot comes back: a new request on the single-slot engine completes.
    let done = app
        .post(
            "/v1/chat/completions",
            &chat_body(FAKE_CHAT, &json!({"max_tokens": 2})),
        )
        .await;
    assert_eq!(done.status(), StatusCode::OK);
    assert_eq!(json(done).await["usage"]["completion_tokens"], 2);
}

#[tokio::test]
async fn engine_failure_mid_stream_ends_with_an_error_event_and_is_metered() {
    let mut app = App::new().await;
    let response = app
        .post(
            "/v1/chat/completions",
            &chat_body(SCRIPTED, &json!({"stream": true})),
        )
        .await;
    let headers = Response::from(&response);
    let submitted = app.submission().await;
    submitted
        .events
        .send(GenerationEvent::Chunk {
            text: "hi".into(),
            tokens: 1,
        })
        .await
        .unwrap();
    submitted
        .events
        .send(GenerationEvent::Failed(
            tidepool_engine::EngineError::Decode { code: -3 },
        ))
        .await
        .unwrap();
    let data = sse_data(&body_bytes(response).await);
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "internal_error");
    // The message quotes the request id (a UUID, which may itself contain "-3"), never the
    // engine's error.
    let message = last["error"]["message"].as_str().unwrap().to_lowercase();
    assert!(
        !message.contains("decode") && !message.contains("code -3"),
        "no internal detail: {message}"
    );
    assert!(!data.iter().any(|d| d == "[DONE]"));
    let usage = app.usage_of(&headers).await;
    assert_eq!(
        usage.status,
        UsageStatus::Error {
            code: "internal_error".into()
        }
    );
    assert_eq!(usage.completion_tokens, 1);
}

#[tokio::test]
async fn engine_done_sets_finish_reason_stop_and_usage_from_the_engine() {
    let mut app = App::new().await;
    let router = app.router.clone();
    let request = post(
        "/v1/completions",
        &app.key,
        json!({"model": SCRIPTED, "prompt": "x y", "max_tokens": 5}).to_string(),
    );
    let call = async move { tower::ServiceExt::oneshot(router, request).await.unwrap() };
    let feed = async {
        let s = app.submission().await;
        s.events
            .send(GenerationEvent::Chunk {
                text: "ok".into(),
                tokens: 2,
            })
            .await
            .unwrap();
        s.events
            .send(GenerationEvent::Done {
                finish_reason: FinishReason::Stop,
                prompt_tokens: 2,
                cached_prompt_tokens: Some(1),
                completion_tokens: 3,
            })
            .await
            .unwrap();
        s
    };
    let (response, _submitted) = tokio::join!(call, feed);
    let usage = app.usage_of(&response).await;
    let body = json(response).await;
    assert_eq!(body["choices"][0]["text"], "ok");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5, "prompt_tokens_details": {"cached_tokens": 1}})
    );
    assert_eq!(
        (
            usage.prompt_tokens,
            usage.cached_prompt_tokens,
            usage.completion_tokens
        ),
        (2, 1, 3)
    );
}

/// A backend that does not say how many prompt tokens it served from its cache: the answer
/// has no `prompt_tokens_details`, and the ledger stores the count as unknown (0, flagged),
/// not as a reported 0. (Scripted engine: only the gateway's handling is under test.)
#[tokio::test]
async fn unreported_cached_tokens_are_stored_as_unknown() {
    let mut app = App::new().await;
    let router = app.router.clone();
    let request = post(
        "/v1/completions",
        &app.key,
        json!({"model": SCRIPTED, "prompt": "x y", "max_tokens": 5}).to_string(),
    );
    let call = async move { tower::ServiceExt::oneshot(router, request).await.unwrap() };
    let feed = async {
        let s = app.submission().await;
        s.events
            .send(GenerationEvent::Done {
                finish_reason: FinishReason::Stop,
                prompt_tokens: 2,
                cached_prompt_tokens: None,
                completion_tokens: 3,
            })
            .await
            .unwrap();
        s
    };
    let (response, _submitted) = tokio::join!(call, feed);
    let usage = app.usage_of(&response).await;
    let body = json(response).await;
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5})
    );
    assert_eq!(
        (
            usage.prompt_tokens,
            usage.cached_prompt_tokens,
            usage.cached_prompt_tokens_unknown
        ),
        (2, 0, true)
    );
}

#[tokio::test]
async fn request_timeout_is_504_and_metered() {
    let limits = tidepool_core::Limits {
        request_timeout_ms: 50,
        ..Default::default()
    };
    let mut app = App::with(limits, |c| c).await;
    let router = app.router.clone();
    let request = post(
        "/v1/chat/completions",
        &app.key,
        chat_body(SCRIPTED, &json!({})).to_string(),
    );
    let call = async move { tower::ServiceExt::oneshot(router, request).await.unwrap() };
    let (response, submitted) = tokio::join!(call, app.submissions.recv());
    let usage = app.usage_of(&response).await;
    let error = expect_error(response, StatusCode::GATEWAY_TIMEOUT, "request_timeout").await;
    assert_eq!(error["type"], "server_error");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains(&usage.request_id.to_string())
    );
    assert_eq!(
        usage.status,
        UsageStatus::Error {
            code: "request_timeout".into()
        }
    );
    submitted.unwrap().events.closed().await;
}

#[tokio::test]
async fn embeddings_float_base64_and_errors() {
    let app = App::new().await;
    let response = app
        .post(
            "/v1/embeddings",
            &json!({"model": EMBED, "input": ["a b", "c"]}),
        )
        .await;
    let usage = app.usage_of(&response).await;
    let body = json(response).await;
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], EMBED);
    assert_eq!(
        body["data"][0],
        json!({"object": "embedding", "index": 0, "embedding": [2.0, 0.5, -0.25]})
    );
    assert_eq!(body["data"][1]["index"], 1);
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 3, "total_tokens": 3})
    );
    assert_eq!(
        (usage.status, usage.prompt_tokens, usage.endpoint.as_str()),
        (UsageStatus::Ok, 3, "embeddings")
    );

    let b64 = json(
        app.post(
            "/v1/embeddings",
            &json!({"model": EMBED, "input": "a b", "encoding_format": "base64"}),
        )
        .await,
    )
    .await;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let floats: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(floats, [2.0, 0.5, -0.25]);

    for (body, param) in [
        (
            json!({"model": EMBED, "input": "a", "encoding_format": "hex"}),
            "encoding_format",
        ),
        (json!({"model": EMBED, "input": []}), "input"),
        (json!({"model": EMBED, "input": [1, 2]}), "input"),
        (
            json!({"model": EMBED, "input": "a", "dimensions": 7}),
            "dimensions",
        ),
    ] {
        let error = expect_error(
            app.post("/v1/embeddings", &body).await,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
        )
        .await;
        assert_eq!(error["param"], param);
    }
    let long = json!({"model": EMBED, "input": "a b c d e f g h i j"});
    expect_error(
        app.post("/v1/embeddings", &long).await,
        StatusCode::BAD_REQUEST,
        "context_length_exceeded",
    )
    .await;
}

#[tokio::test]
async fn request_ids_are_echoed_or_created() {
    let app = App::new().await;
    let inbound = "0190d6a4-0000-7000-8000-000000000001";
    let request = Request::get("/healthz")
        .header("x-request-id", inbound)
        .body(Body::empty())
        .unwrap();
    assert_eq!(app.send(request).await.headers()["x-request-id"], inbound);
    let request = Request::get("/healthz")
        .header("x-request-id", "not a uuid")
        .body(Body::empty())
        .unwrap();
    let created = app.send(request).await.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        tidepool_core::RequestId::parse(&created)
            .unwrap()
            .0
            .get_version_num(),
        7
    );
}

#[tokio::test]
async fn unknown_routes_and_methods_get_json_errors() {
    let app = App::new().await;
    expect_error(
        app.get("/v1/nope").await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    let delete = Request::delete("/v1/models").body(Body::empty()).unwrap();
    expect_error(
        app.send(delete).await,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    )
    .await;
}

#[tokio::test]
async fn metrics_expose_requests_tokens_and_latency_histograms() {
    let app = App::new().await;
    let response = app
        .post(
            "/v1/chat/completions",
            &chat_body(FAKE_CHAT, &json!({"stream": true})),
        )
        .await;
    body_bytes(response).await;
    app.settle().await;
    let text = String::from_utf8(body_bytes(app.get_admin("/metrics").await).await).unwrap();
    for needle in [
        "tidepool_requests_total{route=\"/v1/chat/completions\",code=\"200\"}",
        "tidepool_tokens_total{model=\"fake-chat\",kind=\"completion\"}",
        "tidepool_time_to_first_token_seconds_bucket{model=\"fake-chat\"",
        "tidepool_inter_token_latency_seconds_bucket{model=\"fake-chat\"",
        "tidepool_request_duration_seconds_bucket{model=\"fake-chat\"",
        "# HELP tidepool_time_to_first_token_seconds",
    ] {
        assert!(text.contains(needle), "missing {needle} in:\n{text}");
    }
}

#[tokio::test]
async fn metrics_expose_the_gen_ai_histograms_with_the_conventions_buckets() {
    let app = App::new().await;
    for stream in [true, false] {
        let response = app
            .post(
                "/v1/chat/completions",
                &chat_body(FAKE_CHAT, &json!({"stream": stream, "max_tokens": 4})),
            )
            .await;
        assert_eq!(response.status(), StatusCode::OK);
        body_bytes(response).await;
    }
    let response = app
        .post(
            "/v1/embeddings",
            &json!({"model": EMBED, "input": "two words"}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    app.settle().await;
    let text = String::from_utf8(body_bytes(app.get_admin("/metrics").await).await).unwrap();
    let chat = r#"gen_ai_operation_name="chat",gen_ai_provider_name="tidepool",gen_ai_request_model="fake-chat""#;
    for needle in [
        // The first and last boundaries the semantic conventions give each histogram.
        format!(r#"gen_ai_server_time_to_first_token_seconds_bucket{{{chat},le="0.001"}}"#),
        format!(r#"gen_ai_server_time_to_first_token_seconds_bucket{{{chat},le="10"}}"#),
        format!(r#"gen_ai_server_time_per_output_token_seconds_bucket{{{chat},le="0.01"}}"#),
        format!(r#"gen_ai_server_time_per_output_token_seconds_bucket{{{chat},le="2.5"}}"#),
        format!(r#"gen_ai_server_request_duration_seconds_bucket{{{chat},le="81.92"}}"#),
        format!(r"gen_ai_server_request_duration_seconds_count{{{chat}}} 2"),
        format!(
            r#"gen_ai_client_token_usage_bucket{{{chat},gen_ai_token_type="output",le="67108864"}} 2"#
        ),
        format!(r#"gen_ai_client_token_usage_sum{{{chat},gen_ai_token_type="output"}} 8"#),
        r#"gen_ai_client_token_usage_sum{gen_ai_operation_name="embeddings",gen_ai_provider_name="tidepool",gen_ai_request_model="fake-embed",gen_ai_token_type="input"} 2"#.to_owned(),
    ] {
        assert!(text.contains(&needle), "missing {needle} in:\n{text}");
    }
    assert!(
        !text.contains(r#"gen_ai_request_model="fake-embed",gen_ai_token_type="output""#),
        "embeddings have no output tokens"
    );
}

#[tokio::test]
async fn a_thousand_unknown_model_names_add_no_metric_series() {
    let app = App::new().await;
    let series = |text: &str| {
        text.lines()
            .filter(|line| !line.starts_with('#') && !line.is_empty())
            .map(|line| {
                line.rsplit_once(' ')
                    .map_or(line, |(series, _)| series)
                    .to_owned()
            })
            .collect::<std::collections::BTreeSet<_>>()
    };
    let unknown = |i: usize| chat_body(&format!("no-such-model-{i}"), &json!({}));
    // One unknown model first: the series its kind of failure creates, under `model="none"`.
    let first = app.post("/v1/chat/completions", &unknown(0)).await;
    expect_error(first, StatusCode::NOT_FOUND, "model_not_found").await;
    app.settle().await;
    // `/metrics` counts its own requests: the first scrape adds its series.
    body_bytes(app.get_admin("/metrics").await).await;
    let before =
        series(&String::from_utf8(body_bytes(app.get_admin("/metrics").await).await).unwrap());
    for i in 1..=1000 {
        let response = app.post("/v1/chat/completions", &unknown(i)).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
    }
    app.settle().await;
    let text = String::from_utf8(body_bytes(app.get_admin("/metrics").await).await).unwrap();
    let after = series(&text);
    let added: Vec<_> = after.difference(&before).collect();
    assert!(added.is_empty(), "new series: {added:?}");
    assert!(
        !text.contains("no-such-model"),
        "a request's model name became a label"
    );
    assert!(text.contains(r#"gen_ai_request_model="none""#), "{text}");
}

/// A file of this repository. `CARGO_MANIFEST_DIR` is read when the test runs (cargo and nextest
/// set it), not baked in with `env!`: a test binary reused from a clone that shared the target
/// dir must not read (or, with `TIDEPOOL_UPDATE_DOCS`, write) that other tree's files.
fn repo_file(relative: &str) -> std::path::PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR").expect("run the tests with cargo");
    std::path::Path::new(&manifest_dir)
        .join("../..")
        .join(relative)
}

#[test]
fn openapi_json_is_committed_and_current() {
    let path = repo_file("docs/openapi.json");
    let current = tidepool_gateway::openapi_document();
    if std::env::var_os("TIDEPOOL_UPDATE_DOCS").is_some() {
        std::fs::write(&path, &current).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == current,
        "docs/openapi.json is stale: run `TIDEPOOL_UPDATE_DOCS=1 cargo nextest run -p tidepool-gateway openapi`"
    );
}

#[test]
fn errors_md_lists_exactly_the_error_codes() {
    let path = repo_file("docs/errors.md");
    let text = std::fs::read_to_string(path).unwrap();
    // Table rows look like: | `code` | status | type | when |
    let documented: Vec<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("| `")?.split('`').next())
        .collect();
    assert_eq!(documented, ERROR_CODES);
}

/// Residency on local models: this gateway runs in region `eu`; a project pinned to `us` is
/// refused with 503 `no_backend_in_region` (never served here), a project pinned to `eu` and an
/// unpinned project are served, and a tenant pin intersects with a project pin.
#[tokio::test]
async fn residency_pins_projects_and_tenants_to_regions() {
    use tidepool_core::{Nanos, TenantId};
    use tidepool_ledger::ProjectId;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let ledger = tidepool_ledger::Ledger::connect(&url).await.unwrap();
    let mut options = tidepool_gateway::StateOptions::new(tidepool_core::Limits::default());
    options.region = "eu".to_owned();
    let pins = &mut options.residency;
    pins.projects
        .insert("acme/eu-only".to_owned(), vec!["eu".to_owned()]);
    pins.projects
        .insert("acme/us-only".to_owned(), vec!["us".to_owned()]);
    pins.tenants
        .insert("globex".to_owned(), vec!["us".to_owned(), "eu".to_owned()]);
    pins.projects
        .insert("globex/apac".to_owned(), vec!["apac".to_owned()]);
    let app = App::on(ledger, Some(dir), options, |config| config).await;
    let body = json!({"model": FAKE_CHAT, "messages": [{"role": "user", "content": "hi"}]});
    let key_in = |tenant: &str, project: &str| {
        let ledger = app.ledger.clone();
        let (tenant, project) = (tenant.to_owned(), project.to_owned());
        async move {
            let tenant = TenantId::new(tenant).unwrap();
            let project = ProjectId::new(project).unwrap();
            ledger
                .create_key_in_project(&tenant, &project, "pinned", &AuditContext::ADMIN)
                .await
                .unwrap()
                .secret
        }
    };
    let send = |key: String| {
        let request = post("/v1/chat/completions", &key, body.to_string());
        app.send(request)
    };

    // The app's own key is in acme's default project: not pinned.
    assert_eq!(app.post("/v1/chat/completions", &body).await.status(), 200);
    assert_eq!(send(key_in("acme", "eu-only").await).await.status(), 200);
    let refused = send(key_in("acme", "us-only").await).await;
    let refused_id = refused.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let error = expect_error(
        refused,
        StatusCode::SERVICE_UNAVAILABLE,
        "no_backend_in_region",
    )
    .await;
    assert!(error["message"].as_str().unwrap().contains("us"), "{error}");
    // Tenant pin {us, eu} ∩ project pin {apac} = nowhere: refused, even though eu is allowed to
    // the tenant.
    let (apac_key, web_key) = (
        key_in("globex", "apac").await,
        key_in("globex", "web").await,
    );
    let (globex, credit) = (TenantId::new("globex").unwrap(), Nanos(CREDIT_NANOS));
    let admin = &AuditContext::ADMIN;
    let credited = app.ledger.credit(&globex, credit, "tests", admin).await;
    credited.unwrap();
    let nowhere = send(apac_key).await;
    expect_error(
        nowhere,
        StatusCode::SERVICE_UNAVAILABLE,
        "no_backend_in_region",
    )
    .await;
    assert_eq!(send(web_key).await.status(), 200);
    expect_denials_audited(&app, &refused_id).await;
}

/// Each residency refusal of `residency_pins_projects_and_tenants_to_regions` is audited, by the
/// key that was refused, with its request id (`refused_id`: the first one's).
async fn expect_denials_audited(app: &App, refused_id: &str) {
    app.settle().await;
    let entries = app.ledger.list_audit(0, 1000).await.unwrap();
    let denials: Vec<_> = entries
        .iter()
        .filter(|e| e.action == "residency.deny")
        .collect();
    let targets: Vec<&str> = denials.iter().map(|e| e.target.as_str()).collect();
    assert_eq!(
        targets,
        ["project:acme/us-only", "project:globex/apac"],
        "one entry per refusal"
    );
    let first = denials[0];
    assert_eq!(first.request_id.as_deref(), Some(refused_id), "{first:?}");
    assert!(
        matches!(first.actor, tidepool_ledger::AuditActor::Key(_)),
        "{first:?}"
    );
    let details: Value = serde_json::from_str(&first.details).unwrap();
    assert_eq!(details["regions"], json!(["us"]), "{details}");
    assert_eq!(details["model"], FAKE_CHAT, "{details}");
    let verdict = app.ledger.verify_audit_chain(None).await.unwrap();
    assert!(verdict.is_ok(), "{verdict:?}");
}
