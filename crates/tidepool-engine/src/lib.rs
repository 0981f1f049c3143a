//! `tidepool-engine` owns model execution: the [`TextEngine`] and [`EmbeddingEngine`] traits,
//! the llama.cpp backend (`llama` module, continuous batching on one owning OS thread per
//! model, because a llama.cpp context is not `Send`; `multi`, the pooled engine the runtime
//! drives for many models on one accelerator thread; docs/architecture.md says why both stay),
//! the candle embedding backend (`embed`), a deterministic fake engine with a cost model (`fake`,
//! behind the cargo feature `fake`) for scheduler tests and load benchmarks only, and the raw
//! llama-cpp-2 batched loop (`bench`) that benchmarks use as the engine's baseline, and the
//! watchdog's shared vocabulary (`watchdog`: restart backoff, heartbeat, health, restart notices).
//!
//! It never depends on the gateway, the ledger or the pool, and touches tokio only through
//! `tokio::sync` channels (no runtime). Read [`TextEngine`] and [`GenerationEvent`] first.

mod admission;
pub mod bench;
pub mod embed;
pub mod error;
#[cfg(any(test, feature = "fake"))]
pub mod fake;
pub mod llama;
pub mod multi;
mod output;
mod params;
mod prefix;
pub mod watchdog;

pub use embed::{CandleEmbeddingConfig, CandleEmbeddingEngine};
pub use error::EngineError;
#[cfg(any(test, feature = "fake"))]
pub use fake::{FakeEngine, FakeEngineConfig};
pub use llama::{LlamaEngine, LlamaEngineConfig};
pub use tidepool_core::RequestClass;
use tidepool_core::{ModelId, RequestId, TokenCount};
use tokio::sync::{mpsc, oneshot};

/// A llama.cpp vocabulary token.
pub type TokenId = i32;

/// One chat message after the gateway has validated it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// Per-request sampling, validated by the gateway before it reaches the engine.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 1.0 disables nucleus sampling.
    pub top_p: f32,
    /// 0 disables top-k.
    pub top_k: u32,
    /// Seed of the sequence's sampler; `None` derives one from the request id.
    pub seed: Option<u64>,
    /// Most completion tokens to generate.
    pub max_tokens: TokenCount,
    /// Generation ends before the first occurrence of any of these; the stop text is not returned.
    pub stop: Vec<String>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            max_tokens: 16,
            stop: Vec::new(),
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
        }
    }
}

/// A tokenized prompt ready to run.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub request_id: RequestId,
    /// Empty for remote engines ([`TextEngine::is_remote`]), which take [`Self::remote`].
    pub prompt: Vec<TokenId>,
    pub params: SamplingParams,
    /// What a remote engine sends instead of tokens; local engines ignore it.
    pub remote: Option<RemoteInput>,
    /// Online (the API's calls) or batch (a `/v1/batches` line: idle capacity only).
    pub class: RequestClass,
}

/// The prompt as the client gave it, for an engine that forwards it over HTTP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemotePrompt {
    /// `/v1/completions`.
    Text(String),
    /// `/v1/chat/completions`: the backend applies its own chat template.
    Chat(Vec<ChatMessage>),
}

/// A request for a remote engine: the prompt before tokenization, where it may run, and whether
/// the client sees tokens as they come (a buffered request may be retried after partial output).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteInput {
    pub prompt: RemotePrompt,
    /// Residency: the only regions the request may be sent to; `None`: anywhere.
    pub regions: Option<Vec<String>>,
    /// `true` for non-streamed requests: nothing reaches the client before `Done`.
    pub buffered: bool,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-generation token or a stop sequence.
    Stop,
    /// `max_tokens` or the context limit.
    Length,
}

/// What the engine sends back for one request, in order: zero or more `Chunk`s, then exactly one
/// `Done` or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerationEvent {
    /// New text and the number of generated tokens it accounts for. Text is held back while it
    /// could be the start of a stop sequence or an incomplete UTF-8 character, so `tokens` may be
    /// more than one and `text` may be empty.
    Chunk { text: String, tokens: TokenCount },
    /// Generation ended. `completion_tokens` counts every generated token, including any whose
    /// text was swallowed by a stop sequence.
    Done {
        finish_reason: FinishReason,
        prompt_tokens: TokenCount,
        /// Prompt tokens whose KV was reused from a resident prefix rather than computed (part
        /// of `prompt_tokens`). `None`: not known (a remote backend that does not report it);
        /// the local engines always know.
        cached_prompt_tokens: Option<TokenCount>,
        completion_tokens: TokenCount,
    },
    /// Generation failed after admission.
    Failed(EngineError),
}

/// A running generation. Dropping it cancels the sequence: the engine sees the closed channel
/// within one step and frees the slot.
#[derive(Debug)]
pub struct Generation {
    pub events: mpsc::Receiver<GenerationEvent>,
    /// When the engine took the sequence out of its queue and began its prefill; unset until
    /// then, and always for engines that cannot tell (remote ones). Only for trace spans.
    pub prefill_started: PrefillStart,
}

/// A moment the engine thread sets once and the gateway reads: when a sequence's prefill began.
#[derive(Debug, Clone, Default)]
pub struct PrefillStart(std::sync::Arc<std::sync::OnceLock<std::time::Instant>>);

impl PrefillStart {
    /// Records now, the first time only.
    pub fn mark(&self) {
        // A second mark (a re-prefill after the KV was evicted) keeps the first moment.
        let _first = self.0.set(std::time::Instant::now());
    }

    pub fn get(&self) -> Option<std::time::Instant> {
        self.0.get().copied()
    }
}

/// Live counters of one text engine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Requests admitted but not yet decoding.
    pub queued: u32,
    /// Sequences in the batch.
    pub active: u32,
}

/// A text-generation model. Implementations are cheap to call from async code: nothing here
/// blocks on generation.
pub trait TextEngine: Send + Sync + std::fmt::Debug {
    fn model_id(&self) -> &ModelId;
    /// Longest prompt + completion one sequence may hold.
    fn context_tokens(&self) -> TokenCount;
    /// Renders chat messages with the model's own template, ending with the assistant prefix.
    fn apply_chat_template(&self, messages: &[ChatMessage]) -> Result<String, EngineError>;
    /// Tokenizes text (special tokens in the text are parsed; BOS added if the model wants it).
    fn tokenize(&self, text: &str) -> Result<Vec<TokenId>, EngineError>;
    /// Queues a request without waiting. A full queue is `EngineError::Overloaded`.
    fn submit(&self, request: GenerateRequest) -> Result<Generation, EngineError>;
    fn stats(&self) -> EngineStats;
    /// Whether the model runs elsewhere: it counts tokens itself (the `Done` counts come from the
    /// backend), `tokenize` only estimates an upper bound, and `submit` needs
    /// [`GenerateRequest::remote`].
    fn is_remote(&self) -> bool {
        false
    }
    /// Liveness of the thread that runs this model (`/readyz`); `None` for an engine without
    /// a watched thread of its own (remote models; pooled models, whose accelerator thread the
    /// runtime reports once).
    fn health(&self) -> Option<watchdog::EngineHealth> {
        None
    }
    /// The restart notices of the thread that runs this model; `None` under the same rule as
    /// [`TextEngine::health`] (the pool's accelerator thread: `PoolRuntime::subscribe_restarts`).
    fn restarts(&self) -> Option<tokio::sync::broadcast::Receiver<watchdog::EngineRestart>> {
        None
    }
}

/// Embedding vectors for a batch of inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    /// One L2-normalised vector per input, in input order.
    pub vectors: Vec<Vec<f32>>,
    /// Tokens read across all inputs (after truncation).
    pub prompt_tokens: TokenCount,
}

/// An embedding model.
pub trait EmbeddingEngine: Send + Sync + std::fmt::Debug {
    fn model_id(&self) -> &ModelId;
    fn dimensions(&self) -> usize;
    /// Longest input, in tokens; longer inputs are an `EngineError::ContextLengthExceeded`.
    fn input_tokens_max(&self) -> TokenCount;
    /// Queues a batch without waiting; the answer arrives on the returned channel.
    fn embed(
        &self,
        inputs: Vec<String>,
    ) -> Result<oneshot::Receiver<Result<Embeddings, EngineError>>, EngineError>;
}
