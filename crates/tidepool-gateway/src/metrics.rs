//! Prometheus metrics. The recorder is process-global (installed once, whatever number of
//! `AppState`s a test process builds); every metric is described once with its unit. Label values
//! come from closed sets only: route templates, status codes, configured model ids, token kinds.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub(crate) const REQUESTS_TOTAL: &str = "tidepool_requests_total";
pub(crate) const TOKENS_TOTAL: &str = "tidepool_tokens_total";
/// Prompt tokens served from a cached prefix, per model (part of `tokens_total{kind="prompt"}`):
/// the prefix-cache hit rate is `rate(tidepool_prompt_tokens_cached_total[5m]) /
/// rate(tidepool_tokens_total{kind="prompt"}[5m])`.
pub(crate) const PROMPT_TOKENS_CACHED_TOTAL: &str = "tidepool_prompt_tokens_cached_total";
/// Successful requests whose backend did not report cached prompt tokens, per model.
pub(crate) const PROMPT_CACHE_UNREPORTED_TOTAL: &str =
    "tidepool_prompt_cache_unreported_requests_total";
pub(crate) const TIME_TO_FIRST_TOKEN_SECONDS: &str = "tidepool_time_to_first_token_seconds";
pub(crate) const INTER_TOKEN_LATENCY_SECONDS: &str = "tidepool_inter_token_latency_seconds";
pub(crate) const REQUEST_DURATION_SECONDS: &str = "tidepool_request_duration_seconds";
pub(crate) const USAGE_WRITE_FAILURES_TOTAL: &str = "tidepool_usage_write_failures_total";
pub(crate) const CLIENT_DISCONNECTS_TOTAL: &str = "tidepool_client_disconnects_total";
pub(crate) const BACKEND_UP: &str = "tidepool_backend_up";
pub(crate) const BACKEND_BREAKER_OPEN: &str = "tidepool_backend_breaker_open";
pub(crate) const BACKEND_ATTEMPTS_TOTAL: &str = "tidepool_backend_attempts_total";
pub(crate) const BACKEND_ATTEMPT_DURATION_SECONDS: &str =
    "tidepool_backend_attempt_duration_seconds";
pub(crate) const SETTLEMENTS_PENDING: &str = "tidepool_settlements_pending";
pub(crate) const SETTLEMENTS_DEFERRED_TOTAL: &str = "tidepool_settlements_deferred_total";
pub(crate) const ALERTS_DROPPED_TOTAL: &str = "tidepool_alerts_dropped_total";
pub(crate) const ALERT_DELIVERIES_TOTAL: &str = "tidepool_alert_deliveries_total";

/// The OpenTelemetry `GenAI` server metrics, in their Prometheus form (dots become underscores,
/// the unit `s` becomes the `_seconds` suffix, the annotation `{token}` is dropped), with the
/// bucket boundaries the semantic conventions specify. Labels: `gen_ai_operation_name`,
/// `gen_ai_provider_name`, `gen_ai_request_model` (a served model id or `none`),
/// `gen_ai_token_type` (token usage) and `error_type` (request duration of a failed request: the
/// error's stable `code`). All from closed sets.
pub(crate) const GEN_AI_TIME_TO_FIRST_TOKEN: &str = "gen_ai_server_time_to_first_token_seconds";
pub(crate) const GEN_AI_TIME_PER_OUTPUT_TOKEN: &str = "gen_ai_server_time_per_output_token_seconds";
pub(crate) const GEN_AI_REQUEST_DURATION: &str = "gen_ai_server_request_duration_seconds";
pub(crate) const GEN_AI_TOKEN_USAGE: &str = "gen_ai_client_token_usage";

/// `gen_ai.provider.name` of everything this gateway serves: it is the provider its clients
/// call, whichever engine or backend ran the model.
pub(crate) const GEN_AI_PROVIDER: &str = "tidepool";

const GEN_AI_TIME_TO_FIRST_TOKEN_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];
const GEN_AI_TIME_PER_OUTPUT_TOKEN_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
];
const GEN_AI_REQUEST_DURATION_BUCKETS: &[f64] = &[
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
];
const GEN_AI_TOKEN_USAGE_BUCKETS: &[f64] = &[
    1.0,
    4.0,
    16.0,
    64.0,
    256.0,
    1024.0,
    4096.0,
    16384.0,
    65536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
    67_108_864.0,
];

/// `gen_ai.operation.name` of a usage entry's endpoint (the semantic conventions' well-known
/// values); `None` for requests that run no model (`models`, `usage`, admin calls).
pub(crate) fn gen_ai_operation(endpoint: &str) -> Option<&'static str> {
    match endpoint {
        "chat.completions" => Some("chat"),
        "completions" => Some("text_completion"),
        "embeddings" => Some("embeddings"),
        _ => None,
    }
}

/// The `model` label of a request that never resolved a model.
pub(crate) const NO_MODEL_LABEL: &str = "none";

/// Histogram buckets in seconds: 1 ms to 10 minutes.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the global recorder (first call only) and describes every metric.
pub(crate) fn install() {
    HANDLE.get_or_init(|| {
        // A full-name matcher wins over a suffix (the exporter tries them in that order).
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), SECONDS_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full(tidepool_runtime::SWITCH_SECONDS.to_owned()),
                    tidepool_runtime::SWITCH_SECONDS_BUCKETS,
                )
            })
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full(GEN_AI_TIME_TO_FIRST_TOKEN.to_owned()),
                    GEN_AI_TIME_TO_FIRST_TOKEN_BUCKETS,
                )
            })
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full(GEN_AI_TIME_PER_OUTPUT_TOKEN.to_owned()),
                    GEN_AI_TIME_PER_OUTPUT_TOKEN_BUCKETS,
                )
            })
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full(GEN_AI_REQUEST_DURATION.to_owned()),
                    GEN_AI_REQUEST_DURATION_BUCKETS,
                )
            })
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full(GEN_AI_TOKEN_USAGE.to_owned()),
                    GEN_AI_TOKEN_USAGE_BUCKETS,
                )
            });
        let recorder = match builder {
            Ok(builder) => builder.build_recorder(),
            Err(error) => {
                tracing::error!(%error, "cannot configure the Prometheus recorder");
                return None;
            }
        };
        let handle = recorder.handle();
        if let Err(error) = metrics::set_global_recorder(recorder) {
            tracing::error!(%error, "a metrics recorder is already installed; /metrics is empty");
            return None;
        }
        describe();
        tidepool_telemetry::describe_metrics();
        Some(handle)
    });
}

#[expect(
    clippy::too_many_lines,
    reason = "one description per metric, in one place"
)]
fn describe() {
    describe_counter!(
        REQUESTS_TOTAL,
        Unit::Count,
        "HTTP requests by route template and status code"
    );
    describe_counter!(
        TOKENS_TOTAL,
        Unit::Count,
        "Tokens processed, by model and kind (prompt|completion)"
    );
    describe_counter!(
        PROMPT_TOKENS_CACHED_TOTAL,
        Unit::Count,
        "Prompt tokens served from a cached prefix (KV reused, billed at the cached-input price), by model; part of tidepool_tokens_total{kind=\"prompt\"}"
    );
    describe_counter!(
        PROMPT_CACHE_UNREPORTED_TOTAL,
        Unit::Count,
        "Successful requests whose remote backend did not report cached prompt tokens (billed as uncached input), by model"
    );
    describe_histogram!(
        TIME_TO_FIRST_TOKEN_SECONDS,
        Unit::Seconds,
        "Time from request admission to the first generated token, per model"
    );
    describe_histogram!(
        INTER_TOKEN_LATENCY_SECONDS,
        Unit::Seconds,
        "Time between consecutive generated chunks of one request, per model"
    );
    describe_histogram!(
        REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "Time from request start to its usage being settled, per model"
    );
    describe_counter!(
        USAGE_WRITE_FAILURES_TOTAL,
        Unit::Count,
        "Usage entries that could not be written to the ledger (each one is also logged)"
    );
    describe_counter!(
        CLIENT_DISCONNECTS_TOTAL,
        Unit::Count,
        "Requests whose client went away before the response was complete, per model"
    );
    describe_gauge!(
        BACKEND_UP,
        Unit::Count,
        "1 when a remote backend's last health probe succeeded, by backend, region and zone"
    );
    describe_gauge!(
        BACKEND_BREAKER_OPEN,
        Unit::Count,
        "1 while a remote backend's circuit breaker is open or half-open, by backend"
    );
    describe_counter!(
        BACKEND_ATTEMPTS_TOTAL,
        Unit::Count,
        "Attempts sent to remote backends, by backend and outcome (ok|failed)"
    );
    describe_histogram!(
        BACKEND_ATTEMPT_DURATION_SECONDS,
        Unit::Seconds,
        "Duration of successful attempts on a remote backend, by backend"
    );
    describe_gauge!(
        SETTLEMENTS_PENDING,
        Unit::Count,
        "Usage entries held in memory because the ledger's database was unreachable, retried until it returns"
    );
    describe_counter!(
        SETTLEMENTS_DEFERRED_TOTAL,
        Unit::Count,
        "Usage entries that found the ledger's database unreachable and were kept in memory to retry"
    );
    describe_counter!(
        ALERTS_DROPPED_TOTAL,
        Unit::Count,
        "Alert events dropped before delivery (a full queue, or more held in memory than fit during a database outage), by event"
    );
    describe_counter!(
        ALERT_DELIVERIES_TOTAL,
        Unit::Count,
        "Webhook delivery attempts, by outcome"
    );
    describe_histogram!(
        GEN_AI_TIME_TO_FIRST_TOKEN,
        Unit::Seconds,
        "OpenTelemetry gen_ai.server.time_to_first_token: time to generate the first token of successful responses"
    );
    describe_histogram!(
        GEN_AI_TIME_PER_OUTPUT_TOKEN,
        Unit::Seconds,
        "OpenTelemetry gen_ai.server.time_per_output_token: time per output token after the first, per successful response"
    );
    describe_histogram!(
        GEN_AI_REQUEST_DURATION,
        Unit::Seconds,
        "OpenTelemetry gen_ai.server.request.duration: request start to the last output token"
    );
    describe_histogram!(
        GEN_AI_TOKEN_USAGE,
        Unit::Count,
        "OpenTelemetry gen_ai.client.token.usage: input and output tokens per request, as billed"
    );
}

/// The Prometheus text exposition, or an empty body if no recorder could be installed.
pub(crate) fn render() -> String {
    match HANDLE.get() {
        Some(Some(handle)) => {
            handle.run_upkeep();
            handle.render()
        }
        Some(None) | None => String::new(),
    }
}

pub(crate) fn request(route: &'static str, status: u16) {
    counter!(REQUESTS_TOTAL, "route" => route, "code" => status.to_string()).increment(1);
}

pub(crate) fn tokens(model: &str, prompt_tokens: u32, completion_tokens: u32) {
    let model = model.to_owned();
    counter!(TOKENS_TOTAL, "model" => model.clone(), "kind" => "prompt")
        .increment(u64::from(prompt_tokens));
    counter!(TOKENS_TOTAL, "model" => model, "kind" => "completion")
        .increment(u64::from(completion_tokens));
}

/// A successful request's cached prompt tokens (`None`: its backend did not report them).
pub(crate) fn cached_prompt_tokens(model: &str, cached: Option<u32>) {
    match cached {
        Some(cached) => counter!(PROMPT_TOKENS_CACHED_TOTAL, "model" => model.to_owned())
            .increment(u64::from(cached)),
        None => counter!(PROMPT_CACHE_UNREPORTED_TOTAL, "model" => model.to_owned()).increment(1),
    }
}

pub(crate) fn time_to_first_token(model: &str, elapsed: Duration) {
    histogram!(TIME_TO_FIRST_TOKEN_SECONDS, "model" => model.to_owned())
        .record(elapsed.as_secs_f64());
}

pub(crate) fn inter_token_latency(model: &str, elapsed: Duration) {
    histogram!(INTER_TOKEN_LATENCY_SECONDS, "model" => model.to_owned())
        .record(elapsed.as_secs_f64());
}

pub(crate) fn request_duration(model: &str, elapsed: Duration) {
    histogram!(REQUEST_DURATION_SECONDS, "model" => model.to_owned()).record(elapsed.as_secs_f64());
}

pub(crate) fn usage_write_failure() {
    counter!(USAGE_WRITE_FAILURES_TOTAL).increment(1);
}

pub(crate) fn client_disconnect(model: &str) {
    counter!(CLIENT_DISCONNECTS_TOTAL, "model" => model.to_owned()).increment(1);
}

/// A backend's health and breaker gauges (backend ids are configured: a closed set).
pub(crate) fn backend_state(backend: &str, region: &str, zone: &str, up: bool, breaker_open: bool) {
    gauge!(BACKEND_UP, "backend" => backend.to_owned(), "region" => region.to_owned(),
        "zone" => zone.to_owned())
    .set(if up { 1.0 } else { 0.0 });
    gauge!(BACKEND_BREAKER_OPEN, "backend" => backend.to_owned()).set(if breaker_open {
        1.0
    } else {
        0.0
    });
}

pub(crate) fn backend_attempt(backend: &str, outcome: &'static str, elapsed: Option<Duration>) {
    counter!(BACKEND_ATTEMPTS_TOTAL, "backend" => backend.to_owned(), "outcome" => outcome)
        .increment(1);
    if let Some(elapsed) = elapsed {
        histogram!(BACKEND_ATTEMPT_DURATION_SECONDS, "backend" => backend.to_owned())
            .record(elapsed.as_secs_f64());
    }
}

/// A settlement starts (`1.0`) or stops (`-1.0`) waiting in memory for the database.
pub(crate) fn settlements_pending(delta: f64) {
    if delta > 0.0 {
        counter!(SETTLEMENTS_DEFERRED_TOTAL).increment(1);
    }
    gauge!(SETTLEMENTS_PENDING).increment(delta);
}

/// The `GenAI` metrics of one finished model request: its duration (with `error_type` when it
/// failed), its billed tokens, and — for a successful generation — its time to first token and
/// mean time per output token after the first.
pub(crate) struct GenAiRequest<'a> {
    pub(crate) operation: &'static str,
    /// A served model id, or [`NO_MODEL_LABEL`]: never a name taken from the request.
    pub(crate) model: &'a str,
    pub(crate) error_code: Option<&'a str>,
    pub(crate) duration: Duration,
    pub(crate) input_tokens: u32,
    pub(crate) output_tokens: u32,
    pub(crate) first_token: Option<Duration>,
}

pub(crate) fn gen_ai_request(request: &GenAiRequest<'_>) {
    let model = request.model.to_owned();
    let operation = request.operation;
    match request.error_code {
        None => histogram!(GEN_AI_REQUEST_DURATION, "gen_ai_operation_name" => operation,
            "gen_ai_provider_name" => GEN_AI_PROVIDER, "gen_ai_request_model" => model.clone()),
        Some(code) => histogram!(GEN_AI_REQUEST_DURATION, "gen_ai_operation_name" => operation,
            "gen_ai_provider_name" => GEN_AI_PROVIDER, "gen_ai_request_model" => model.clone(),
            "error_type" => code.to_owned()),
    }
    .record(request.duration.as_secs_f64());
    if request.error_code.is_some() {
        return;
    }
    histogram!(GEN_AI_TOKEN_USAGE, "gen_ai_operation_name" => operation,
        "gen_ai_provider_name" => GEN_AI_PROVIDER, "gen_ai_request_model" => model.clone(),
        "gen_ai_token_type" => "input")
    .record(f64::from(request.input_tokens));
    if operation == "embeddings" {
        return;
    }
    histogram!(GEN_AI_TOKEN_USAGE, "gen_ai_operation_name" => operation,
        "gen_ai_provider_name" => GEN_AI_PROVIDER, "gen_ai_request_model" => model.clone(),
        "gen_ai_token_type" => "output")
    .record(f64::from(request.output_tokens));
    let Some(first_token) = request.first_token else {
        return;
    };
    histogram!(GEN_AI_TIME_TO_FIRST_TOKEN, "gen_ai_operation_name" => operation,
        "gen_ai_provider_name" => GEN_AI_PROVIDER, "gen_ai_request_model" => model.clone())
    .record(first_token.as_secs_f64());
    if request.output_tokens > 1 {
        let after_first = request.duration.saturating_sub(first_token);
        histogram!(GEN_AI_TIME_PER_OUTPUT_TOKEN, "gen_ai_operation_name" => operation,
            "gen_ai_provider_name" => GEN_AI_PROVIDER, "gen_ai_request_model" => model)
        .record(after_first.as_secs_f64() / f64::from(request.output_tokens - 1));
    }
}
