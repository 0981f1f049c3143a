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
}
