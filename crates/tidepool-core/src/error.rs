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
    #[error("invalid config: {field}: {reason}")]
    ConfigInvalid { field: String, reason: String },
    #[error("invalid id `{value}`: {reason}")]
    InvalidId { value: String, reason: &'static str },
    #[error("money overflow computing {what}")]
    MoneyOverflow { what: &'static str },
    #[error("`{value}` is not an amount: write whole units with at most 9 decimals, e.g. 12.50")]
    InvalidAmount { value: String },
    #[error("unknown currency code `{code}`")]
    UnknownCurrency { code: String },
}
