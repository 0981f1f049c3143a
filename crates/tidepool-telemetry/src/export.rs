//! The trace pipeline: finished spans enter a bounded queue without ever waiting, a background
//! thread sends them in batches over OTLP/HTTP, and every span that cannot be exported — the
//! queue is full, or its batch failed (collector down, timeout) — is dropped and counted in
//! [`SPANS_DROPPED_TOTAL`]. A request never waits for the collector.
//!
//! The SDK's `BatchSpanProcessor` does the batching; it counts its own drops only privately, so
//! [`Gate`] admits at most `export_queue_spans_max` spans that the exporter has not taken yet
//! (the processor's own queue has the same size and so never overflows), and
//! [`CountingExporter`] counts failed batches. The HTTP requests run on the server's tokio
//! runtime through the workspace's reqwest ([`RuntimeHttpClient`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use metrics::{Unit, counter, describe_counter};
use opentelemetry::Context;
use opentelemetry_http::{HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider, Span, SpanData,
    SpanExporter, SpanProcessor,
};

use crate::TelemetryError;
use crate::settings::{Settings, TraceExport};

/// Counter of spans that were never exported, by `reason` (`queue_full`, `export_failed`).
pub const SPANS_DROPPED_TOTAL: &str = "tidepool_telemetry_spans_dropped_total";

/// Describes this crate's metrics (to whatever recorder the process installed).
pub(crate) fn describe() {
    describe_counter!(
        SPANS_DROPPED_TOTAL,
        Unit::Count,
        "Spans never exported: the export queue was full, or their batch failed to export"
    );
}

fn dropped(reason: &'static str, spans: usize) {
    counter!(SPANS_DROPPED_TOTAL, "reason" => reason)
        .increment(u64::try_from(spans).unwrap_or(u64::MAX));
}

/// The tracer provider: sampler, resource, and the gated batch processor over OTLP/HTTP.
pub(crate) fn provider(
    export: &TraceExport,
    settings: &Settings,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<SdkTracerProvider, TelemetryError> {
    let client = RuntimeHttpClient::new(export.timeout)?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_endpoint(export.endpoint.clone())
        .with_timeout(export.timeout)
        .build()
        .map_err(|error| TelemetryError::Exporter(error.to_string()))?;
    let in_queue = Arc::new(AtomicUsize::new(0));
    let batch = BatchConfigBuilder::default()
        .with_max_queue_size(export.queue_spans_max)
        .with_max_export_batch_size(export.batch_spans_max)
        .with_scheduled_delay(export.interval)
        .build();
    let processor = BatchSpanProcessor::builder(CountingExporter {
        inner: exporter,
        in_queue: Arc::clone(&in_queue),
    })
    .with_batch_config(batch)
    .build();
    let gate = Gate {
        inner: processor,
        in_queue,
        queue_spans_max: export.queue_spans_max,
    };
    let mut resource = Resource::builder();
    // `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` are read by the builder itself.
    if env("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(settings.service_name.clone());
    }
    let mut builder = SdkTracerProvider::builder()
        .with_span_processor(gate)
        .with_resource(resource.build());
    // Without `OTEL_TRACES_SAMPLER` (which the SDK reads itself): new traces by the ratio, a
    // caller's decision followed.
    if let Some(ratio) = export.sample_ratio {
        builder = builder.with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            ratio,
        ))));
    }
    Ok(builder.build())
}

/// Admits a finished span only while fewer than `queue_spans_max` wait for the exporter.
#[derive(Debug)]
struct Gate {
    inner: BatchSpanProcessor,
    in_queue: Arc<AtomicUsize>,
    queue_spans_max: usize,
}

impl SpanProcessor for Gate {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        let admitted = self
            .in_queue
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                (queued < self.queue_spans_max).then_some(queued + 1)
            })
            .is_ok();
        if admitted {
            self.inner.on_end(span);
        } else {
            dropped("queue_full", 1);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The OTLP exporter, releasing the gate's places as it takes batches and counting the spans
/// of every batch that fails.
#[derive(Debug)]
struct CountingExporter<E> {
    inner: E,
    in_queue: Arc<AtomicUsize>,
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len();
        // Saturating: the gate never admitted fewer than the processor hands over.
        let _ = self
            .in_queue
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                Some(queued.saturating_sub(spans))
            });
        let result = self.inner.export(batch).await;
        if let Err(error) = &result {
            dropped("export_failed", spans);
            tracing::debug!(%error, spans, "telemetry: a batch of spans failed to export");
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Longest collector answer read, in bytes (an OTLP answer is a few bytes of protobuf).
const RESPONSE_BYTES_MAX: usize = 64 * 1024;

/// The exporter's HTTP client: the workspace's reqwest, run on the tokio runtime that was
/// current at start-up (the batch processor's thread has none of its own).
#[derive(Debug)]
struct RuntimeHttpClient {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

impl RuntimeHttpClient {
    fn new(timeout: Duration) -> Result<Self, TelemetryError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            TelemetryError::Exporter("telemetry must be set up inside a tokio runtime".to_owned())
        })?;
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|error| TelemetryError::Exporter(error.to_string()))?;
        Ok(Self { client, runtime })
    }
}

#[async_trait::async_trait]
impl HttpClient for RuntimeHttpClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let request = reqwest::Request::try_from(request)?;
        let client = self.client.clone();
        let answer = self.runtime.spawn(async move {
            let response = client.execute(request).await?;
            let status = response.status();
            let headers = response.headers().clone();
            let body = response.bytes().await?;
            Ok::<_, reqwest::Error>((status, headers, body))
        });
        let (status, headers, mut body) = answer.await??;
        if body.len() > RESPONSE_BYTES_MAX {
            body.truncate(RESPONSE_BYTES_MAX);
        }
        let mut response = Response::builder().status(status).body(body)?;
        *response.headers_mut() = headers;
        Ok(response)
    }
}
