//! The one error enum of `tidepool-pool` (a model id that is not a slug is `ids::InvalidId`,
//! the id vocabulary's own error, which core turns into its `CoreError::InvalidId`).

use crate::ModelId;

use crate::event::{ActionId, SeqId};

/// Errors the pool returns for bad input: admission refusals (the gateway maps them to 4xx/429),
/// invalid configuration and events that do not match anything the pool emitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// The request names a model the pool does not serve (gateway: 404).
    #[error("model `{model}` is not in the pool")]
    ModelNotFound { model: ModelId },
    /// The model can never be resident under this budget (gateway: 400/422, not retryable).
    #[error("model `{model}` needs {bytes_needed} bytes but the pool budget is {memory_bytes_max}")]
    ModelTooLarge {
        model: ModelId,
        bytes_needed: u64,
        memory_bytes_max: u64,
    },
    /// Prompt plus output does not fit one sequence slot of the model's context (gateway: 400).
    #[error("request needs {tokens} tokens but model `{model}` holds at most {seq_tokens_max}")]
    RequestTooLong {
        model: ModelId,
        tokens: u64,
        seq_tokens_max: u32,
    },
    /// The bounded admission queue is full (gateway: 429 with Retry-After).
    #[error("admission queue is full ({admission_queue_len_max} requests waiting)")]
    QueueFull { admission_queue_len_max: u32 },
    /// The bounded batch queue is full (`PoolKnobs::batch_queue_max` batch sequences held).
    #[error("batch queue is full ({batch_queue_max} batch requests held)")]
    BatchQueueFull { batch_queue_max: u32 },
    /// A sequence id was submitted twice.
    /// An operator's unload that cannot happen now (dedicated policy, pinned, loading or busy).
    #[error("model `{model}` cannot be unloaded now: {reason}")]
    ModelBusy {
        model: ModelId,
        reason: &'static str,
    },
    #[error("sequence {seq} already exists")]
    DuplicateSeq { seq: SeqId },
    /// A completion event names an action that is not in flight (driver bug).
    #[error("action {action} is not in flight")]
    UnknownAction { action: ActionId },
    /// A completion event does not match the kind of the action in flight (driver bug).
    #[error("event for action {action} does not match its kind ({expected})")]
    EventMismatch {
        action: ActionId,
        expected: &'static str,
    },
    /// An event carries a time earlier than the pool's clock.
    #[error("event time {now_ns} ns is before the pool clock {clock_ns} ns")]
    TimeWentBackwards { now_ns: u64, clock_ns: u64 },
    /// The configuration is not valid.
    #[error("invalid pool config: {field}: {reason}")]
    InvalidConfig { field: String, reason: &'static str },
}
