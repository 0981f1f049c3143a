//! Wire types of the OpenAI-compatible API, shaped exactly like OpenAI's. Request fields whose
//! JSON type varies (`prompt`, `stop`, `input`, message `content`) or whose range we check
//! ourselves (numbers) are read loosely here and validated in `validate`, so a bad value is a
//! 400 that names its `param` rather than a generic JSON error.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `stream_options` of a streaming request.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct StreamOptions {
    /// Send a last chunk with `usage` and empty `choices` before `[DONE]`.
    #[serde(default)]
    pub include_usage: bool,
}

/// A string or an array of strings.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
pub enum StringOrArray {
    One(String),
    Many(Vec<String>),
}

/// One part of an array-valued message `content`; only `text` parts are supported.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

/// Message content: a string or an array of text parts.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// One chat message.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ChatMessageIn {
    /// `system`, `user` or `assistant` (`developer` is read as `system`).
    pub role: String,
    #[schema(value_type = MessageContent)]
    pub content: Option<serde_json::Value>,
    pub name: Option<String>,
}

/// Sampling fields shared by both text endpoints.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct SamplingFields {
    pub max_tokens: Option<i64>,
    /// 0 to 2; 0 is greedy.
    pub temperature: Option<f64>,
    /// Greater than 0, at most 1.
    pub top_p: Option<f64>,
    /// Extension: sample among the k most likely tokens (0 disables).
    pub top_k: Option<i64>,
    pub seed: Option<i64>,
    #[schema(value_type = Option<StringOrArray>)]
    pub stop: Option<serde_json::Value>,
    /// -2 to 2.
    pub presence_penalty: Option<f64>,
    /// -2 to 2.
    pub frequency_penalty: Option<f64>,
    /// Only 1 is supported.
    pub n: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// Accepted and ignored (end-user id for abuse tracking).
    pub user: Option<String>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<ChatMessageIn>,
    /// Preferred over `max_tokens` when both are set.
    pub max_completion_tokens: Option<i64>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct CompletionRequest {
    pub model: String,
    /// A string, or an array holding exactly one string.
    #[schema(value_type = StringOrArray)]
    pub prompt: serde_json::Value,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// `POST /v1/embeddings`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct EmbeddingRequest {
    pub model: String,
    /// A string or an array of strings.
    #[schema(value_type = StringOrArray)]
    pub input: serde_json::Value,
    /// `float` (default) or `base64` (little-endian f32 bytes).
    pub encoding_format: Option<String>,
    /// Accepted only if equal to the model's dimensions.
    pub dimensions: Option<i64>,
    pub user: Option<String>,
}

/// `prompt_tokens_details`.
#[derive(Debug, Clone, Copy, Serialize, ToSchema, PartialEq, Eq)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose KV was reused from a cached prefix (part of `prompt_tokens`, billed
    /// at the cached-input price); 0 when nothing was reused.
    pub cached_tokens: u32,
}

/// Token counts of one request, from the model's own tokenizer.
#[derive(Debug, Clone, Copy, Serialize, ToSchema, PartialEq, Eq)]
pub struct Usage {
    /// Every prompt token, cached ones included (OpenAI's convention).
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    /// Always present for Tidepool's own engines; absent when a remote backend did not say how
    /// many prompt tokens it served from its cache (they are billed as uncached input).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

impl Usage {
    /// `cached_tokens`: `None` when not known.
    pub fn new(prompt_tokens: u32, completion_tokens: u32, cached_tokens: Option<u32>) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
            prompt_tokens_details: cached_tokens
                .map(|cached_tokens| PromptTokensDetails { cached_tokens }),
        }
    }

    /// Cached prompt tokens, if known.
    pub fn cached_tokens(&self) -> Option<u32> {
        self.prompt_tokens_details.map(|d| d.cached_tokens)
    }
}

/// An assistant message in a response.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatMessageOut {
    pub role: &'static str,
    pub content: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChoice {
    pub index: u32,
    pub message: ChatMessageOut,
    #[schema(value_type = Option<Object>)]
    pub logprobs: Option<serde_json::Value>,
    /// `stop` or `length`.
    pub finish_reason: &'static str,
}

/// A non-streamed chat completion.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatCompletion {
    /// `chatcmpl-…`
    pub id: String,
    /// Always `chat.completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: i64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

/// The change a chunk carries.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChunkChoice {
    pub index: u32,
    pub delta: ChatDelta,
    #[schema(value_type = Option<Object>)]
    pub logprobs: Option<serde_json::Value>,
    pub finish_reason: Option<&'static str>,
}

/// One SSE event of a streamed chat completion.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatCompletionChunk {
    pub id: String,
    /// Always `chat.completion.chunk`.
    pub object: &'static str,
    pub created: i64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    /// Present (as `null` until the last chunk) only with `stream_options.include_usage`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Usage>)]
    pub usage: Option<Option<Usage>>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CompletionChoice {
    pub index: u32,
    pub text: String,
    #[schema(value_type = Option<Object>)]
    pub logprobs: Option<serde_json::Value>,
    /// `stop` or `length`; `null` in every streamed chunk but the last.
    pub finish_reason: Option<&'static str>,
}

/// A completion, and also one SSE event of a streamed completion (same shape, as in OpenAI's API).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Completion {
    /// `cmpl-…`
    pub id: String,
    /// Always `text_completion`.
    pub object: &'static str,
    pub created: i64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Usage>)]
    pub usage: Option<Option<Usage>>,
}

/// One embedding: floats, or base64 of little-endian f32 bytes.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(untagged)]
pub enum EmbeddingVector {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct EmbeddingData {
    /// Always `embedding`.
    pub object: &'static str,
    pub index: u32,
    pub embedding: EmbeddingVector,
}

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct EmbeddingUsage {
    pub prompt_tokens: u32,
    pub total_tokens: u32,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct EmbeddingResponse {
    /// Always `list`.
    pub object: &'static str,
    pub data: Vec<EmbeddingData>,
    pub model: String,
    pub usage: EmbeddingUsage,
}

/// One served model.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Model {
    pub id: String,
    /// Always `model`.
    pub object: &'static str,
    pub created: i64,
    pub owned_by: &'static str,
    /// Extension: `chat`, `completion` or `embedding`.
    pub kind: &'static str,
    /// Extension: longest prompt + completion, in tokens.
    pub context_length: u32,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelList {
    /// Always `list`.
    pub object: &'static str,
    pub data: Vec<Model>,
}

/// `GET /healthz`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: &'static str,
}

/// `GET /readyz`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Readiness {
    /// `ready` (200) or `not_ready` (503).
    pub status: &'static str,
    pub checks: ReadinessChecks,
}

/// Each readiness check: `ok`, or why not (never a secret or SQL text).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ReadinessChecks {
    /// The ledger's database answered a trivial query in time.
    pub database: String,
    /// Every migration this binary embeds is applied.
    pub schema: String,
    /// Start-up recovery of open reservations and the price sync have run.
    pub startup: String,
    /// Each watched engine thread, by name (`accelerator` for the pool's thread, else the model
    /// id of an unpooled engine): `ok` when alive with a heartbeat within
    /// `engine.heartbeat_stale_ms`, else `dead: …` (waiting for its restart) or `stuck: …`.
    pub engines: BTreeMap<String, String>,
    /// Each pinned model of the pool (`pin = true`): `ok` when it can be loaded (its file is
    /// there and its last load did not fail), else why not.
    pub pinned_models: BTreeMap<String, String>,
}
