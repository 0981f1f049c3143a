//! W3C trace context: a request's span continues the caller's `traceparent` (and keeps its
//! `tracestate`), and each call to a remote backend carries the current span's `traceparent`,
//! so a worker's spans join the gateway's trace.
//!
//! Log lines carry a trace id whether or not spans are exported: with tracing on it is the
//! span's own (the caller's trace id when one was sent); with tracing off, the caller's trace id
//! when a well-formed `traceparent` came in, else a new random one, which is then sent on to
//! remote backends as the trace of an unsampled `traceparent`.

use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId};
use opentelemetry::{Context, Key, Value};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// Makes `span` (just created, not yet entered) a child of the caller's trace in `headers`,
/// when there is one and spans are exported. Returns the trace id for log lines (32 lowercase
/// hex digits): see the module's comment.
pub fn continue_trace(span: &tracing::Span, headers: &http::HeaderMap) -> String {
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    let remote = parent.span().span_context().trace_id();
    // Without the OpenTelemetry layer (tracing off) this is refused, harmlessly.
    if span.set_parent(parent).is_ok() {
        let own = span.context().span().span_context().trace_id();
        if own != TraceId::INVALID {
            return own.to_string();
        }
    }
    if remote == TraceId::INVALID {
        TraceId::from(rand::random::<u128>().max(1)).to_string()
    } else {
        remote.to_string()
    }
}

/// Writes `traceparent` (and `tracestate`) for a call made within `span` into `headers`. With
/// tracing off, `log_trace_id` (from [`continue_trace`]) travels in an unsampled `traceparent`
/// with a new parent id, so the backend's logs carry the same trace id.
pub fn inject(span: &tracing::Span, log_trace_id: Option<&str>, headers: &mut http::HeaderMap) {
    let mut cx = span.context();
    if !cx.span().span_context().is_valid() {
        let Some(trace_id) = log_trace_id.and_then(|id| TraceId::from_hex(id).ok()) else {
            return;
        };
        let span_id = SpanId::from(rand::random::<u64>().max(1));
        let remote = SpanContext::new(
            trace_id,
            span_id,
            TraceFlags::default(),
            true,
            opentelemetry::trace::TraceState::default(),
        );
        cx = Context::new().with_remote_span_context(remote);
    }
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
}

/// Sets an attribute on `span`'s exported span only: unlike a `tracing` field it never reaches
/// a log line. For text a project opted in to export (`[telemetry] content_projects`).
pub fn set_text_attribute(span: &tracing::Span, key: &'static str, value: String) {
    span.set_attribute(Key::from_static_str(key), Value::from(value));
}

/// Sets a list-of-strings attribute on `span`'s exported span only (a `tracing` field cannot
/// hold a list).
pub fn set_list_attribute(span: &tracing::Span, key: &'static str, values: Vec<String>) {
    let values = values
        .into_iter()
        .map(opentelemetry::StringValue::from)
        .collect();
    span.set_attribute(
        Key::from_static_str(key),
        Value::Array(opentelemetry::Array::String(values)),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn without_tracing_logs_keep_the_callers_trace_id_and_pass_it_on() {
        let mut headers = http::HeaderMap::new();
        headers.insert("traceparent", PARENT.parse().unwrap());
        let span = tracing::Span::none();
        let trace_id = continue_trace(&span, &headers);
        assert_eq!(trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");

        let mut out = http::HeaderMap::new();
        inject(&span, Some(&trace_id), &mut out);
        let sent = out["traceparent"].to_str().unwrap();
        assert!(
            sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{sent}"
        );
        assert!(sent.ends_with("-00"), "unsampled: {sent}");
        assert!(
            !sent.contains("00f067aa0ba902b7"),
            "a new parent id: {sent}"
        );
    }

    #[test]
    fn without_a_caller_trace_a_new_id_is_made_and_garbage_is_ignored() {
        let mut headers = http::HeaderMap::new();
        headers.insert("traceparent", "00-not-a-trace-01".parse().unwrap());
        let span = tracing::Span::none();
        let first = continue_trace(&span, &headers);
        let second = continue_trace(&span, &http::HeaderMap::new());
        assert_eq!(first.len(), 32);
        assert!(first.chars().all(|c| c.is_ascii_hexdigit()), "{first}");
        assert_ne!(first, second);
        assert_ne!(first, "0".repeat(32));
        let mut out = http::HeaderMap::new();
        inject(&span, None, &mut out);
        assert!(out.is_empty());
    }
}
