//! Traces and logs, through the whole router in-process with the process's real subscriber
//! (`tidepool_telemetry::init`, as `tidepool serve` installs it): an OTLP/HTTP receiver in the
//! test (axum on 127.0.0.1:0, decoding `ExportTraceServiceRequest` protobuf with
//! `opentelemetry-proto`) gets, after one real chat request on SmolLM2, the `chat <model>` span
//! with its `gen_ai.*` attributes and its phase children, in the trace of the client's
//! `traceparent`, and no prompt text anywhere; with the collector down requests still succeed
//! and the dropped spans are counted on `/metrics`; JSON log lines carry the request's id, trace
//! id, tenant and model and never the API key.
//!
//! Each test installs the process-global subscriber, so each needs its own process: nextest
//! runs every test in one (the project's runner). Waits are bounded loops on a condition, never
//! timed assertions.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test helpers outside #[test] fns fail loudly"
)]
#[expect(
    dead_code,
    reason = "the harness is shared by every test file; this one uses part of it"
)]
mod common;

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{Request, StatusCode};
use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use serde_json::{Value, json};
use tidepool_core::{Config, LogFormat, TelemetryConfig, TenantId};
use tidepool_gateway::{AppState, StateOptions, load_models, router};
use tidepool_ledger::{AuditContext, Ledger};
use tower::ServiceExt as _;

const CHAT: &str = "smollm2-135m-instruct";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN_ID: &str = "00f067aa0ba902b7";
/// Text that must never leave the process on a span (no project opted in).
const PROMPT_MARKER: &str = "periwinkle-7f3a";

/// The spans an in-process OTLP/HTTP receiver has been sent.
#[derive(Clone, Default)]
struct Received(Arc<parking_lot::Mutex<Vec<Span>>>);

impl Received {
    fn spans(&self) -> Vec<Span> {
        self.0.lock().clone()
    }
}

async fn collector() -> (String, Received) {
    let received = Received::default();
    let sink = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| {
            let sink = sink.clone();
            async move {
                let request = ExportTraceServiceRequest::decode(body).unwrap();
                let mut spans = sink.0.lock();
                for resource in request.resource_spans {
                    for scope in resource.scope_spans {
                        spans.extend(scope.spans);
                    }
                }
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{address}"), received)
}

fn telemetry_config(endpoint: &str) -> TelemetryConfig {
    TelemetryConfig {
        otlp_endpoint: endpoint.to_owned(),
        export_interval_ms: 50,
        ..TelemetryConfig::default()
    }
}

/// The subscriber with no `OTEL_*` variables (the host's cannot leak in), logs to `writer`.
fn init<W>(config: &TelemetryConfig, writer: W) -> tidepool_telemetry::Telemetry
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    tidepool_telemetry::init(config, &|_| None, writer).unwrap()
}

async fn flush(telemetry: &Arc<tidepool_telemetry::Telemetry>) {
    let telemetry = Arc::clone(telemetry);
    tokio::task::spawn_blocking(move || telemetry.flush())
        .await
        .unwrap();
}

fn attribute<'a>(span: &'a Span, key: &str) -> Option<&'a any_value::Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|value| value.value.as_ref())
}

fn string(span: &Span, key: &str) -> String {
    match attribute(span, key) {
        Some(any_value::Value::StringValue(text)) => text.clone(),
        other => panic!("{}: {key} is {other:?}", span.name),
    }
}

fn int(span: &Span, key: &str) -> i64 {
    match attribute(span, key) {
        Some(any_value::Value::IntValue(value)) => *value,
        other => panic!("{}: {key} is {other:?}", span.name),
    }
}

/// Every string anywhere in an attribute value (lists and maps included).
fn strings_of(value: &AnyValue, out: &mut Vec<String>) {
    match &value.value {
        Some(any_value::Value::StringValue(text)) => out.push(text.clone()),
        Some(any_value::Value::ArrayValue(array)) => {
            for item in &array.values {
                strings_of(item, out);
            }
        }
        Some(any_value::Value::KvlistValue(list)) => {
            for KeyValue { value, .. } in &list.values {
                if let Some(value) = value {
                    strings_of(value, out);
                }
            }
        }
        _ => {}
    }
}

async fn real_app(telemetry: TelemetryConfig) -> (axum::Router, String, tempfile::TempDir) {
    let text = include_str!("../../../tidepool.toml");
    let mut config = Config::parse(text, Path::new("tidepool.toml")).unwrap();
    config.server.models_dir = Some(tidepool_core::config::default_models_dir());
    config.engine.threads = 2;
    config.models.retain(|m| m.id.as_str() == CHAT);
    for m in &mut config.models {
        m.seqs_max = m.seqs_max.min(4);
        m.context_tokens = m.context_tokens.min(1024);
    }
    app_on(&config, telemetry).await
}

/// The whole router over `config`'s models (local or remote) on a fresh SQLite ledger that has
/// their prices, with `telemetry` on its state; and a key of tenant `acme`, which has credit.
async fn app_on(
    config: &Config,
    telemetry: TelemetryConfig,
) -> (axum::Router, String, tempfile::TempDir) {
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
    tidepool_gateway::sync_prices(config, &ledger)
        .await
        .unwrap();
    let loaded = load_models(config).await.unwrap();
    let mut options = StateOptions::new(config.limits.clone());
    options.pool = loaded.pool;
    options.backends = loaded.backends;
    options.telemetry = telemetry;
    let state = AppState::with_options(loaded.models, ledger, options);
    (router(state), key, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_real_model_chat_is_one_span_with_its_phases_in_the_callers_trace() {
    let (endpoint, received) = collector().await;
    let config = telemetry_config(&endpoint);
    let telemetry = Arc::new(init(&config, std::io::sink));
    let (app, key, _dir) = real_app(config).await;
    let body = json!({
        "model": CHAT,
        "max_tokens": 8,
        "messages": [{"role": "user", "content": format!("Name a sea colour, {PROMPT_MARKER}.")}],
    });
    let request = Request::post("/v1/chat/completions")
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .header("traceparent", format!("00-{TRACE_ID}-{PARENT_SPAN_ID}-01"))
        .body(Body::from(body.to_string()))
        .unwrap();
    let response = app.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    let wanted = [
        "POST /v1/chat/completions",
        "chat smollm2-135m-instruct",
        "reserve",
    ];
    let phases = ["queue wait", "prefill", "decode", "settle"];
    let spans = wait_for_spans(&telemetry, &received, wanted.iter().chain(&phases)).await;
    let named = |name: &str| {
        spans
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| {
                panic!(
                    "no `{name}` span among {:?}",
                    spans.iter().map(|s| &s.name).collect::<Vec<_>>()
                )
            })
            .clone()
    };
    let server = named("POST /v1/chat/completions");
    let chat = named("chat smollm2-135m-instruct");
    // Every span of the request (loading the model made traces of its own).
    for name in wanted.iter().chain(&phases) {
        assert_eq!(
            hex(&named(name).trace_id),
            TRACE_ID,
            "{name} is in the caller's trace"
        );
    }
    assert_eq!(hex(&server.parent_span_id), PARENT_SPAN_ID);
    assert_eq!(server.kind, 2, "SPAN_KIND_SERVER");
    assert_eq!(int(&server, "http.response.status_code"), 200);
    assert_eq!(chat.parent_span_id, server.span_id);

    assert_chat_attributes(&chat);
    for phase in std::iter::once("reserve").chain(phases) {
        let span = named(phase);
        assert_eq!(
            span.parent_span_id, chat.span_id,
            "{phase} is a child of the chat span"
        );
        assert!(
            span.end_time_unix_nano >= span.start_time_unix_nano,
            "{phase}"
        );
    }
    // The phases follow each other: queue wait, prefill, decode.
    assert!(named("queue wait").end_time_unix_nano <= named("prefill").start_time_unix_nano + 1);
    assert!(named("prefill").end_time_unix_nano <= named("decode").start_time_unix_nano + 1);
    assert_no_text(&spans, PROMPT_MARKER);
}

fn assert_chat_attributes(chat: &Span) {
    let chat = chat.clone();
    assert_eq!(string(&chat, "gen_ai.operation.name"), "chat", "operation");
    assert_eq!(
        string(&chat, "gen_ai.provider.name"),
        "tidepool",
        "provider"
    );
    assert_eq!(string(&chat, "gen_ai.request.model"), CHAT, "request model");
    assert_eq!(
        string(&chat, "gen_ai.response.model"),
        CHAT,
        "response model"
    );
    assert!(int(&chat, "gen_ai.usage.input_tokens") > 0, "input tokens");
    let output_tokens = int(&chat, "gen_ai.usage.output_tokens");
    assert!((1..=8).contains(&output_tokens), "{output_tokens}");
    match attribute(&chat, "gen_ai.response.finish_reasons") {
        Some(any_value::Value::ArrayValue(reasons)) => {
            let mut texts = Vec::new();
            for reason in &reasons.values {
                strings_of(reason, &mut texts);
            }
            assert!(texts == ["length"] || texts == ["stop"], "{texts:?}");
        }
        other => panic!("finish reasons: {other:?}"),
    }
    assert_eq!(string(&chat, "tidepool.tenant.id"), "acme", "tenant");
    assert!(!string(&chat, "tidepool.project.id").is_empty(), "project");
    assert!(
        attribute(&chat, "error.type").is_none(),
        "a success has no error.type"
    );
}

/// No string in any attribute of any span contains `text`.
fn assert_no_text(spans: &[Span], text: &str) {
    let mut texts = Vec::new();
    for span in spans {
        for kv in &span.attributes {
            if let Some(value) = &kv.value {
                strings_of(value, &mut texts);
            }
        }
    }
    assert!(!texts.is_empty(), "spans carry string attributes");
    for exported in &texts {
        assert!(!exported.contains(text), "prompt text exported: {exported}");
    }
}

/// The spans received once every one of `names` is among them (flushing, a bounded number of
/// times).
async fn wait_for_spans<'a>(
    telemetry: &Arc<tidepool_telemetry::Telemetry>,
    received: &Received,
    names: impl Iterator<Item = &'a &'a str> + Clone,
) -> Vec<Span> {
    let mut spans = Vec::new();
    for _ in 0..100 {
        flush(telemetry).await;
        spans = received.spans();
        if names
            .clone()
            .all(|name| spans.iter().any(|span| span.name == *name))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    spans
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut text, b| {
        write!(text, "{b:02x}").unwrap();
        text
    })
}

/// The value of a Prometheus counter summed over its labels, from `/metrics`.
async fn counter(app: &App, name: &str) -> f64 {
    let response = app
        .send(
            Request::get("/metrics")
                .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    let text = String::from_utf8(body_bytes(response).await).unwrap();
    text.lines()
        .filter(|line| line.starts_with(name))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_collector_down_requests_succeed_and_dropped_spans_are_counted() {
    // A port nothing listens on any more.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let app = App::new().await;
    let telemetry = Arc::new(init(
        &telemetry_config(&format!("http://{closed}")),
        std::io::sink,
    ));
    assert!(telemetry.is_tracing());
    let before = counter(&app, tidepool_telemetry::SPANS_DROPPED_TOTAL).await;
    for _ in 0..3 {
        let response = app
            .post(
                "/v1/chat/completions",
                &json!({"model": FAKE_CHAT, "max_tokens": 4,
                    "messages": [{"role": "user", "content": "hi"}]}),
            )
            .await;
        assert_eq!(response.status(), StatusCode::OK);
    }
    app.settle().await;
    let mut after = before;
    for _ in 0..100 {
        flush(&telemetry).await;
        after = counter(&app, tidepool_telemetry::SPANS_DROPPED_TOTAL).await;
        if after > before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(after > before, "dropped spans counted: {before} → {after}");
}

/// Log lines, shared with the test.
#[derive(Clone, Default)]
struct Lines(Arc<parking_lot::Mutex<Vec<u8>>>);

impl Write for Lines {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_carry_the_request_and_never_the_key() {
    let lines = Lines::default();
    let config = TelemetryConfig {
        log_format: LogFormat::Json,
        ..TelemetryConfig::default()
    };
    let writer = lines.clone();
    let telemetry = init(&config, move || writer.clone());
    assert!(!telemetry.is_tracing());
    let mut app = App::new().await;
    let request = post(
        "/v1/chat/completions",
        &app.key,
        json!({"model": SCRIPTED, "messages": [{"role": "user", "content": "hi"}]}).to_string(),
    );
    let request = {
        let (mut parts, body) = request.into_parts();
        parts.headers.insert(
            "traceparent",
            format!("00-{TRACE_ID}-{PARENT_SPAN_ID}-01")
                .parse()
                .unwrap(),
        );
        Request::from_parts(parts, body)
    };
    let router = app.router.clone();
    let pending = tokio::spawn(async move { router.oneshot(request).await.unwrap() });
    let submitted = app.submission().await;
    submitted
        .events
        .send(tidepool_engine::GenerationEvent::Failed(
            tidepool_engine::EngineError::Decode { code: -1 },
        ))
        .await
        .unwrap();
    let response = pending.await.unwrap();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    app.settle().await;

    let text = String::from_utf8(lines.0.lock().clone()).unwrap();
    assert!(!text.contains(&app.key), "the API key is never logged");
    let parsed: Vec<Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    let failed = parsed
        .iter()
        .find(|line| line["message"] == "request failed")
        .unwrap_or_else(|| panic!("no `request failed` line in {text}"));
    let request_span = failed["spans"]
        .as_array()
        .and_then(|spans| spans.iter().find(|s| s["name"] == "request"))
        .unwrap_or_else(|| panic!("no request span on {failed}"));
    assert_eq!(request_span["request_id"], request_id.as_str());
    assert_eq!(
        request_span["trace_id"], TRACE_ID,
        "the caller's trace id, tracing off"
    );
    assert_eq!(request_span["tenant"], "acme");
    assert_eq!(request_span["model"], SCRIPTED);
}

/// An OpenAI-compatible upstream that answers at once and keeps each request's `traceparent`.
async fn recording_upstream() -> (String, Arc<parking_lot::Mutex<Vec<String>>>) {
    let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let sink = Arc::clone(&seen);
    let answer = json!({
        "id": "chatcmpl-up", "object": "chat.completion", "created": 0, "model": "remote-chat",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    });
    let app = axum::Router::new()
        .route(
            "/v1/chat/completions",
            axum::routing::post(move |headers: axum::http::HeaderMap, _body: Bytes| {
                let sink = Arc::clone(&sink);
                let answer = answer.clone();
                async move {
                    let parent = headers
                        .get("traceparent")
                        .map(|v| v.to_str().unwrap().to_owned())
                        .unwrap_or_default();
                    sink.lock().push(parent);
                    axum::Json(answer)
                }
            }),
        )
        .route(
            "/v1/models",
            axum::routing::get(|| async {
                axum::Json(json!({"object": "list", "data": [{"id": "remote-chat",
                    "object": "model", "owned_by": "test"}]}))
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{address}"), seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_backend_gets_the_traceparent_of_its_attempt_span() {
    let (endpoint, received) = collector().await;
    let telemetry_config = telemetry_config(&endpoint);
    let telemetry = Arc::new(init(&telemetry_config, std::io::sink));
    let (upstream, seen) = recording_upstream().await;
    let text = format!(
        "[[models]]\nid = \"remote-chat\"\nkind = \"chat\"\nbackend = \"remote\"\n\
         price_input_per_mtok = 1000\nprice_output_per_mtok = 1000\n\n\
         [[backends]]\nid = \"up\"\nkind = \"upstream\"\nurl = \"{upstream}\"\nregion = \"local\"\n\
         models = [\"remote-chat\"]\n"
    );
    let config = Config::parse(&text, Path::new("t.toml")).unwrap();
    let (app, key, _dir) = app_on(&config, telemetry_config).await;
    let body = json!({"model": "remote-chat", "messages": [{"role": "user", "content": "hi"}]});
    let request = Request::post("/v1/chat/completions")
        .header("authorization", format!("Bearer {key}"))
        .header("traceparent", format!("00-{TRACE_ID}-{PARENT_SPAN_ID}-01"))
        .body(Body::from(body.to_string()))
        .unwrap();
    let response = app.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    let sent = seen.lock().clone();
    assert_eq!(sent.len(), 1, "one attempt: {sent:?}");
    let parts: Vec<&str> = sent[0].split('-').collect();
    assert_eq!(parts.len(), 4, "{sent:?}");
    assert_eq!(parts[1], TRACE_ID, "the backend joins the caller's trace");
    let names = ["backend attempt up", "chat remote-chat"];
    let spans = wait_for_spans(&telemetry, &received, names.iter()).await;
    let attempt = spans
        .iter()
        .find(|s| s.name == "backend attempt up")
        .expect("an attempt span");
    let chat = spans
        .iter()
        .find(|s| s.name == "chat remote-chat")
        .expect("a chat span");
    assert_eq!(
        parts[2],
        hex(&attempt.span_id),
        "its parent is the attempt's span"
    );
    assert_eq!(attempt.parent_span_id, chat.span_id);
    assert_eq!(attempt.kind, 3, "SPAN_KIND_CLIENT");
    assert_eq!(string(chat, "gen_ai.provider.name"), "upstream");
}
