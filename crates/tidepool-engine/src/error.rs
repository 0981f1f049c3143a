//! The one error type of `tidepool-engine`.

use std::path::PathBuf;

use tidepool_core::TokenCount;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    #[error("the model's queue is full")]
    Overloaded { retry_after_ms: u32 },
    #[error(
        "{prompt_tokens} prompt tokens + {max_tokens} max_tokens exceed the context of {context_tokens} tokens"
    )]
    ContextLengthExceeded {
        prompt_tokens: TokenCount,
        max_tokens: TokenCount,
        context_tokens: TokenCount,
    },
    #[error("invalid `{param}`: {reason}")]
    InvalidRequest { param: &'static str, reason: String },
    #[error("cannot load model {path}: {reason}")]
    Load { path: PathBuf, reason: String },
    #[error("tokenizer failed: {reason}")]
    Tokenize { reason: String },
    #[error("chat template failed: {reason}")]
    Template { reason: String },
    #[error("llama.cpp decode failed with code {code}")]
    Decode { code: i32 },
    #[error("embedding model failed: {reason}")]
    Embedding { reason: String },
    /// The model can never be resident under the pool's memory budget.
    #[error(
        "the model needs {bytes_needed} bytes of memory but the pool's budget is {memory_bytes_max}"
    )]
    ExceedsMemoryBudget {
        bytes_needed: u64,
        memory_bytes_max: u64,
    },
    /// The scheduler refused something only a bug can cause.
    #[error("scheduler error: {reason}")]
    Scheduler { reason: String },
    #[error("the engine has shut down")]
    ShutDown,
    /// The engine's thread stopped while the request ran and was restarted; what was delivered
    /// stands, the rest is lost (queued requests are admitted again, never failed with this).
    #[error("the engine thread was restarted while the request ran")]
    Restarted,
    /// Residency: no healthy backend of the model runs in the regions the tenant is pinned to.
    /// Never answered by a backend outside them.
    #[error("no backend of this model is available in the allowed regions {regions:?}")]
    NoBackendInRegion { regions: Vec<String> },
    /// Every eligible remote backend failed (or the one streaming failed after its first token).
    #[error("backend `{backend}` failed (HTTP status {status:?})")]
    Backend {
        backend: String,
        /// The backend's HTTP status, if it answered at all.
        status: Option<u16>,
    },
}
