//! `tidepool-telemetry` owns what the server tells the outside about itself besides `/metrics`:
//! the process's `tracing` subscriber (text or JSON log lines on stderr), the OpenTelemetry
//! trace pipeline (spans exported over OTLP/HTTP through a bounded queue, dropped spans counted
//! in `tidepool_telemetry_spans_dropped_total`), and W3C trace context (`traceparent`,
//! `tracestate`) in and out.
//!
//! It knows nothing of requests, models or billing: the gateway names its spans and fields
//! (docs/operations.md, "Traces and logs"); this crate only installs and ships them. Read
//! [`init`] first, then `export` (the bounded queue and the HTTP client) and `propagation`.

mod export;
mod phase;
mod propagation;
mod settings;

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tidepool_core::{LogFormat, TelemetryConfig};
use tracing_subscriber::Layer as _;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Registry};

pub use export::SPANS_DROPPED_TOTAL;
pub use phase::phase_spans;
pub use propagation::{continue_trace, inject, set_list_attribute, set_text_attribute};
pub use settings::{Settings, TraceExport};

/// Describes this crate's metrics (`tidepool_telemetry_spans_dropped_total`) to the process's
/// recorder; call it once the recorder is installed.
pub fn describe_metrics() {
    export::describe();
}

/// The instrumentation scope of every span this process exports.
const TRACER_NAME: &str = "tidepool";

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("telemetry: {variable} = `{value}`: {reason}")]
    Env {
        variable: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("telemetry: cannot build the OTLP exporter: {0}")]
    Exporter(String),
    #[error("telemetry: a tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// The installed telemetry: keep it for the life of the process and call
/// [`Telemetry::shutdown`] once the server has stopped (it exports what is still queued).
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    settings: Settings,
}

impl Telemetry {
    /// Whether spans are exported (an OTLP endpoint is set).
    pub fn is_tracing(&self) -> bool {
        self.provider.is_some()
    }

    /// What was resolved from the configuration and the `OTEL_*` variables.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Exports every finished span now (blocking; call it off the async runtime's threads,
    /// e.g. in `spawn_blocking`). Spans that fail to export are dropped and counted.
    pub fn flush(&self) {
        if let Some(provider) = &self.provider
            && let Err(error) = provider.force_flush()
        {
            tracing::debug!(%error, "telemetry: flushing spans failed");
        }
    }

    /// Exports what is queued and stops the exporter; blocking, bounded by the export timeout.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            let timeout = self
                .settings
                .export
                .as_ref()
                .map_or(Duration::from_secs(1), |export| export.timeout)
                .saturating_mul(2);
            if let Err(error) = provider.shutdown_with_timeout(timeout) {
                tracing::warn!(%error, "telemetry: the span exporter did not shut down cleanly");
            }
        }
    }
}

/// Installs the process's subscriber: log lines to `writer` in `config.log_format`, filtered by
/// `RUST_LOG` (default `info`), and, when an OTLP endpoint is set (`env` first, then
/// `config`), the OpenTelemetry layer exporting spans. `env` reads a variable (the process
/// environment in the binary; a map in tests). Must run inside a tokio runtime, which then
/// carries the export requests.
pub fn init<W>(
    config: &TelemetryConfig,
    env: &dyn Fn(&str) -> Option<String>,
    writer: W,
) -> Result<Telemetry, TelemetryError>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let settings = Settings::resolve(config, env)?;
    let provider = match &settings.export {
        Some(export) => Some(export::provider(export, &settings, env)?),
        None => None,
    };
    // `RUST_LOG` filters log lines only; spans of level info and above are exported whatever
    // it says. Only spans go to OpenTelemetry: log events never become span events, so nothing
    // a log line carries (at any level) is exported.
    let otel = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(TRACER_NAME))
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_level(false)
            .with_tracked_inactivity(false)
            .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
                meta.is_span() && *meta.level() <= tracing::Level::INFO
            }))
    });
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = match settings.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer().with_writer(writer).boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .with_writer(writer)
            .boxed(),
    };
    Registry::default()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInstalled)?;
    if let Some(provider) = &provider {
        opentelemetry::global::set_tracer_provider(provider.clone());
    }
    if let Some(export) = &settings.export {
        tracing::info!(endpoint = %export.endpoint, service = %settings.service_name,
            "telemetry: exporting traces over OTLP/HTTP");
    }
    Ok(Telemetry { provider, settings })
}

/// `init` with the process environment and stderr (stdout carries command output).
pub fn init_stderr(config: &TelemetryConfig) -> Result<Telemetry, TelemetryError> {
    init(config, &|name| std::env::var(name).ok(), std::io::stderr)
}
