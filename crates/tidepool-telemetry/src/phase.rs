//! Spans of phases that ran where no `tracing` span could be open (on an engine thread): built
//! after the fact from two instants, as children of a live span.

use std::time::{Instant, SystemTime};

use opentelemetry::trace::{Span as _, SpanKind, TraceContextExt as _, Tracer as _};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// Exports one span per `(name, start, end)` under `parent`, all on one reading of the wall
/// clock (so phases that touch keep touching); nothing when `parent` is not exported (tracing
/// off, or not sampled).
pub fn phase_spans(parent: &tracing::Span, phases: &[(&'static str, Instant, Instant)]) {
    if phases.is_empty() {
        return;
    }
    let cx = parent.context();
    if !cx.span().span_context().is_sampled() {
        return;
    }
    let (now_instant, now_wall) = now();
    let wall = |at: Instant| {
        now_wall
            .checked_sub(now_instant.saturating_duration_since(at))
            .unwrap_or(now_wall)
    };
    let tracer = opentelemetry::global::tracer(crate::TRACER_NAME);
    for &(name, start, end) in phases {
        let mut span = tracer
            .span_builder(name)
            .with_kind(SpanKind::Internal)
            .with_start_time(wall(start))
            .start_with_context(&tracer, &cx);
        span.end_with_timestamp(wall(end.max(start)));
    }
}

/// The monotonic and the wall clock, read together.
#[expect(
    clippy::disallowed_methods,
    reason = "a span's timestamps are wall-clock time by the OpenTelemetry data model"
)]
fn now() -> (Instant, SystemTime) {
    (Instant::now(), SystemTime::now())
}
