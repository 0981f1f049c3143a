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
    /// Not valid TOML, or a key or type the configuration does not have. The message names the
    /// place by line and column and never quotes the file's text (a line may hold a password).
    #[error("config file {path} is not valid: line {line}, column {column}: {message}")]
    ConfigParse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
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
    /// A placement file (`tidepool plan`'s) that cannot be followed; `code` is stable
    /// (`placement_version`, `placement_unknown_model`, …).
    #[error("invalid placement ({code}): {reason}")]
    PlacementInvalid { code: &'static str, reason: String },
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

/// A model id that is not a slug (`ModelId` belongs to `tidepool-pool`): the same
/// [`CoreError::InvalidId`] as every other id.
impl From<tidepool_pool::ids::InvalidId> for CoreError {
    fn from(error: tidepool_pool::ids::InvalidId) -> Self {
        Self::InvalidId {
            value: error.value,
            reason: error.reason,
        }
    }
}

impl CoreError {
    /// A TOML parse error of `text` (read from `path`), by line and column, without the excerpt
    /// of the offending line that `toml`'s own message carries.
    pub fn config_parse(path: &std::path::Path, text: &str, error: &toml::de::Error) -> Self {
        let start = error.span().map_or(0, |span| span.start).min(text.len());
        let before = text.get(..start).unwrap_or_default();
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        Self::ConfigParse {
            path: path.to_owned(),
            line,
            column,
            message: error.message().trim().to_owned(),
        }
    }
}
