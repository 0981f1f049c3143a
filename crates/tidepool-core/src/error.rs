//! The one error type of `tidepool-core`.

use std::path::PathBuf;

/// Errors raised while loading or validating configuration and parsing core values.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("cannot read config file {path}: {source}")]
    ConfigRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {source}")]
    ConfigParse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    /// Every problem found, not just the first: values out of range, relations that do not
    /// hold, and environment overrides that name no key or do not parse.
    #[error("invalid config ({} {}):{}", .errors.len(), if .errors.len() == 1 { "error" } else { "errors" }, FieldError::lines(.errors))]
    ConfigInvalid { errors: Vec<FieldError> },
    #[error("invalid id `{value}`: {reason}")]
    InvalidId { value: String, reason: &'static str },
    #[error("money overflow computing {what}")]
    MoneyOverflow { what: &'static str },
    #[error("`{value}` is not an amount: write whole units with at most 9 decimals, e.g. 12.50")]
    InvalidAmount { value: String },
    #[error("unknown currency code `{code}`")]
    UnknownCurrency { code: String },
}

/// One problem in the configuration: what it is about (a key such as `pool.ttft_slo_ms` or
/// `models[0].id`, or an environment variable) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    /// Each error on its own line as `field: reason`.
    fn lines(errors: &[Self]) -> String {
        errors.iter().fold(String::new(), |mut out, e| {
            out.push_str("\n  ");
            out.push_str(&e.field);
            out.push_str(": ");
            out.push_str(&e.reason);
            out
        })
    }
}
