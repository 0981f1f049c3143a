//! What the `[telemetry]` section and the standard `OTEL_*` variables resolve to. A variable,
//! when set, wins over the file (as the `TIDEPOOL_*` overrides do).

use std::time::Duration;

use tidepool_core::{LogFormat, TelemetryConfig};

use crate::TelemetryError;

/// `OTEL_EXPORTER_OTLP_ENDPOINT`: the collector's base URL (`/v1/traces` is appended).
pub(crate) const ENDPOINT_VAR: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`: the full URL of the traces endpoint.
pub(crate) const TRACES_ENDPOINT_VAR: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
/// `OTEL_EXPORTER_OTLP_PROTOCOL` (and its traces-only twin).
const PROTOCOL_VARS: &[&str] = &[
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
];
const SERVICE_NAME_VAR: &str = "OTEL_SERVICE_NAME";
/// Set: the SDK reads `OTEL_TRACES_SAMPLER` (and `_ARG`) itself, and `sample_ratio` is unused.
pub(crate) const SAMPLER_VAR: &str = "OTEL_TRACES_SAMPLER";
/// The only OTLP encoding spoken.
const PROTOCOL: &str = "http/protobuf";
/// Where OTLP/HTTP takes traces, under the collector's base URL.
const TRACES_PATH: &str = "/v1/traces";

/// The resolved telemetry settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub log_format: LogFormat,
    pub service_name: String,
    /// `None`: tracing is off.
    pub export: Option<TraceExport>,
}

/// Where and how spans are exported.
#[derive(Debug, Clone)]
pub struct TraceExport {
    /// The full URL spans are sent to (`POST`).
    pub endpoint: String,
    /// `None` when `OTEL_TRACES_SAMPLER` decides.
    pub sample_ratio: Option<f64>,
    pub queue_spans_max: usize,
    pub batch_spans_max: usize,
    pub interval: Duration,
    pub timeout: Duration,
}

impl Settings {
    pub fn resolve(
        config: &TelemetryConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, TelemetryError> {
        let set = |name: &str| env(name).filter(|value| !value.trim().is_empty());
        for variable in PROTOCOL_VARS {
            if let Some(value) = set(variable)
                && value.trim() != PROTOCOL
            {
                return Err(TelemetryError::Env {
                    variable,
                    value,
                    reason: "only `http/protobuf` is supported",
                });
            }
        }
        let endpoint = match (set(TRACES_ENDPOINT_VAR), set(ENDPOINT_VAR)) {
            (Some(full), _) => Some(full),
            (None, Some(base)) => Some(traces_url(&base)),
            (None, None) if !config.otlp_endpoint.trim().is_empty() => {
                Some(traces_url(&config.otlp_endpoint))
            }
            (None, None) => None,
        };
        let export = endpoint.map(|endpoint| TraceExport {
            endpoint,
            sample_ratio: set(SAMPLER_VAR).is_none().then_some(config.sample_ratio),
            queue_spans_max: usize::try_from(config.export_queue_spans_max).unwrap_or(usize::MAX),
            batch_spans_max: usize::try_from(config.export_batch_spans_max).unwrap_or(usize::MAX),
            interval: Duration::from_millis(config.export_interval_ms),
            timeout: Duration::from_millis(config.export_timeout_ms),
        });
        Ok(Self {
            log_format: config.log_format,
            service_name: set(SERVICE_NAME_VAR).unwrap_or_else(|| config.service_name.clone()),
            export,
        })
    }
}

/// The traces URL under a collector's base URL.
fn traces_url(base: &str) -> String {
    let base = base.trim().trim_end_matches('/');
    if base.ends_with(TRACES_PATH) {
        base.to_owned()
    } else {
        format!("{base}{TRACES_PATH}")
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn resolve(
        config: &TelemetryConfig,
        vars: &[(&str, &str)],
    ) -> Result<Settings, TelemetryError> {
        let vars: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Settings::resolve(config, &|name| vars.get(name).cloned())
    }

    #[test]
    fn tracing_is_off_without_an_endpoint_and_the_environment_wins() {
        let config = TelemetryConfig::default();
        let off = resolve(&config, &[]).unwrap();
        assert!(off.export.is_none());
        assert_eq!(off.service_name, "tidepool");

        let from_env = resolve(
            &config,
            &[
                (ENDPOINT_VAR, "http://collector:4318/"),
                (SERVICE_NAME_VAR, "gw"),
            ],
        )
        .unwrap();
        let export = from_env.export.unwrap();
        assert_eq!(export.endpoint, "http://collector:4318/v1/traces");
        assert_eq!(export.sample_ratio, Some(1.0));
        assert_eq!(from_env.service_name, "gw");

        let config = TelemetryConfig {
            otlp_endpoint: "http://file:4318".to_owned(),
            sample_ratio: 0.25,
            ..TelemetryConfig::default()
        };
        let from_file = resolve(&config, &[]).unwrap().export.unwrap();
        assert_eq!(from_file.endpoint, "http://file:4318/v1/traces");
        assert_eq!(from_file.sample_ratio, Some(0.25));
        let env_wins = resolve(
            &config,
            &[
                (TRACES_ENDPOINT_VAR, "http://env:4318/v1/traces"),
                (SAMPLER_VAR, "always_off"),
            ],
        )
        .unwrap()
        .export
        .unwrap();
        assert_eq!(env_wins.endpoint, "http://env:4318/v1/traces");
        assert_eq!(env_wins.sample_ratio, None);
    }

    #[test]
    fn other_protocols_are_refused_by_name() {
        let error = resolve(
            &TelemetryConfig::default(),
            &[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")],
        )
        .unwrap_err();
        assert!(
            error.to_string().contains("OTEL_EXPORTER_OTLP_PROTOCOL"),
            "{error}"
        );
        assert!(
            resolve(
                &TelemetryConfig::default(),
                &[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")]
            )
            .is_ok()
        );
    }
}
