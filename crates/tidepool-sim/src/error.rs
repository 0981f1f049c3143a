//! The one error type of `tidepool-sim`.

use std::path::PathBuf;

use tidepool_pool::PoolError;

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("profile {path} is not valid TOML: {source}")]
    ProfileParse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("cannot write the profile as TOML: {reason}")]
    ProfileWrite { reason: String },
    #[error("invalid profile: {field}: {reason}")]
    ProfileInvalid { field: String, reason: &'static str },
    #[error("trace line {line}: {reason}")]
    TraceParse { line: u64, reason: &'static str },
    #[error("invalid workload: {reason}")]
    WorkloadInvalid { reason: &'static str },
    #[error("invalid pool knob: {field}: {reason}")]
    KnobInvalid {
        field: &'static str,
        reason: &'static str,
    },
    #[error("pool rejected the configuration: {0}")]
    Pool(#[from] PoolError),
    #[error("the simulation stalled at {now_ns} ns with {seqs} sequences left (scheduler bug)")]
    Stalled { now_ns: u64, seqs: usize },
    #[error("cannot serialise the report: {0}")]
    Json(#[from] serde_json::Error),
}
