//! Text generation shared by `/v1/chat/completions` and `/v1/completions`: tokenize, check the
//! context, submit to the engine without waiting, then either collect the whole answer or stream
//! it as SSE. The SSE stream owns the request's [`UsageGuard`], so a client that goes away drops
//! the guard (which settles usage with the tokens delivered) and the `Generation` (which frees
//! the engine slot within one step).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde::Serialize;
use tidepool_core::{ModelId, RequestId};
use tidepool_engine::{
    ChatMessage, EngineError, FinishReason, GenerateRequest, GenerationEvent, RemoteInput,
    RemotePrompt, SamplingParams, TextEngine,
};
use tokio::time::Instant;

use crate::error::ApiError;
use crate::metrics;
use crate::openai::{
    ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatDelta, ChatMessageOut,
    Completion, CompletionChoice, Usage,
};
use crate::state::AppState;
use crate::usage::UsageGuard;

/// Which endpoint's shapes to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flavor {
    Chat,
    Completion,
}

/// A validated text request, ready to submit.
#[derive(Debug)]
pub(crate) struct TextJob {
    pub(crate) flavor: Flavor,
    pub(crate) engine: Arc<dyn TextEngine>,
    pub(crate) model: ModelId,
    pub(crate) prompt_text: String,
    /// The chat messages (chat only), for remote engines that apply their own template.
    pub(crate) messages: Option<Vec<ChatMessage>>,
    pub(crate) params: SamplingParams,
    /// `None`: as many as the context allows (chat), or the completions default.
    pub(crate) max_tokens: Option<u32>,
    pub(crate) stream: bool,
    pub(crate) include_usage: bool,
    /// The client's `Idempotency-Key` header, validated.
    pub(crate) idempotency_key: Option<String>,
}

/// What the client is told and the ledger records, once the engine says `Done`.
#[derive(Debug, Clone, Copy)]
struct Finished {
    finish_reason: FinishReason,
    usage: Usage,
}

fn finish_reason_str(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

fn tokens_of(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// Residency for models this process runs itself: they run in `[server] region`.
fn check_local_residency(state: &AppState, guard: &UsageGuard) -> Result<(), ApiError> {
    match state.residency_for(guard.tenant().as_str(), guard.project().as_str()) {
        Some(regions) if !regions.iter().any(|r| r == state.region()) => {
            tracing::warn!(target: "audit", tenant = %guard.tenant(), project = %guard.project(),
                region = state.region(), regions = ?regions,
                "residency: refused a request, this region is not allowed");
            Err(EngineError::NoBackendInRegion { regions }.into())
        }
        Some(_) | None => Ok(()),
    }
}

/// The prompt and its token count: tokenized here for local engines; for remote ones the text
/// or messages travel as they are and the count is an upper bound (the backend's `usage`
/// settles the exact count).
fn prepare_prompt(
    state: &AppState,
    guard: &UsageGuard,
    job: &mut TextJob,
) -> Result<(Vec<tidepool_engine::TokenId>, u32, Option<RemoteInput>), ApiError> {
    if !job.engine.is_remote() {
        check_local_residency(state, guard)?;
        let prompt = job.engine.tokenize(&job.prompt_text)?;
        let prompt_tokens = tokens_of(prompt.len());
        return Ok((prompt, prompt_tokens, None));
    }
    let prompt = match job.messages.take() {
        Some(messages) => RemotePrompt::Chat(messages),
        None => RemotePrompt::Text(std::mem::take(&mut job.prompt_text)),
    };
    let prompt_tokens = crate::backends::prompt_tokens_bound(&prompt);
    let input = RemoteInput {
        prompt,
        regions: state.residency_for(guard.tenant().as_str(), guard.project().as_str()),
        buffered: !job.stream,
    };
    Ok((Vec::new(), prompt_tokens, Some(input)))
}

/// Tokenizes, checks the context, reserves the most the request can cost and submits. Errors
/// here happen before any response byte.
async fn submit(
    state: &AppState,
    guard: &mut UsageGuard,
    mut job: TextJob,
) -> Result<(TextJob, u32), ApiError> {
    if guard.exports_content() {
        let input = serde_json::json!([{"role": "user",
            "parts": [{"type": "text", "content": job.prompt_text}]}]);
        tidepool_telemetry::set_text_attribute(
            guard.model_span(),
            "gen_ai.input.messages",
            input.to_string(),
        );
    }
    let (prompt, prompt_tokens, remote) = prepare_prompt(state, guard, &mut job)?;
    let context_tokens = job.engine.context_tokens();
    let max_tokens = match job.max_tokens {
        Some(tokens) => tokens,
        None => match job.flavor {
            Flavor::Completion => crate::validate::COMPLETION_MAX_TOKENS_DEFAULT,
            Flavor::Chat => context_tokens
                .saturating_sub(prompt_tokens)
                .min(state.limits().completion_tokens_max)
                .max(1),
        },
    };
    // A remote count is only a bound: the backend checks its own context.
    if remote.is_none() && prompt_tokens.saturating_add(max_tokens) > context_tokens {
        return Err(EngineError::ContextLengthExceeded {
            prompt_tokens,
            max_tokens,
            context_tokens,
        }
        .into());
    }
    job.params.max_tokens = max_tokens;
    guard.set_prompt_tokens(prompt_tokens);
    guard
        .reserve(prompt_tokens, max_tokens, job.idempotency_key.take())
        .await?;
    let request = GenerateRequest {
        remote,
        request_id: guard.request_id(),
        prompt,
        params: job.params.clone(),
        class: guard.request_class(),
    };
    // Within the model request's span: a remote model's routing task continues it.
    let generation = guard.model_span().in_scope(|| job.engine.submit(request))?;
    guard.attach(generation);
    Ok((job, prompt_tokens))
}

/// Waits for the next engine event within the request deadline; once tokens flow, a gap longer
/// than `stream_stall_ms_max` is a stall.
async fn next_event(
    guard: &mut UsageGuard,
    deadline: Instant,
    stall: Option<Duration>,
    limits: (u64, u64),
) -> Result<GenerationEvent, ApiError> {
    let (timeout_ms, stall_ms) = limits;
    let (until, on_timeout) = match stall.map(|stall| Instant::now() + stall) {
        Some(stall_at) if stall_at < deadline => (stall_at, ApiError::Stalled { stall_ms }),
        Some(_) | None => (deadline, ApiError::Timeout { timeout_ms }),
    };
    match tokio::time::timeout_at(until, guard.next_event()).await {
        Ok(Some(event)) => Ok(event),
        // The engine dropped its sender without a final event: it shut down.
        Ok(None) => Err(EngineError::ShutDown.into()),
        Err(_elapsed) => Err(on_timeout),
    }
}

/// Timing of one generation, for TTFT and inter-token metrics.
#[derive(Debug)]
struct Timing {
    model: String,
    started: Instant,
    last_chunk: Option<Instant>,
}

impl Timing {
    fn chunk(&mut self) {
        let now = Instant::now();
        match self.last_chunk {
            None => {
                let ttft = now.duration_since(self.started);
                metrics::time_to_first_token(&self.model, ttft);
                tracing::Span::current().record(
                    "ttft_ms",
                    u64::try_from(ttft.as_millis()).unwrap_or(u64::MAX),
                );
            }
            Some(last) => metrics::inter_token_latency(&self.model, now.duration_since(last)),
        }
        self.last_chunk = Some(now);
    }

    fn stall(&self, stall: Duration) -> Option<Duration> {
        self.last_chunk.map(|_| stall)
    }
}

fn limits_of(state: &AppState) -> (Duration, Duration, (u64, u64)) {
    let limits = state.limits();
    (
        Duration::from_millis(limits.request_timeout_ms),
        Duration::from_millis(limits.stream_stall_ms_max),
        (limits.request_timeout_ms, limits.stream_stall_ms_max),
    )
}

/// A remote stream waits for its first event before the SSE headers go out, so that routing
/// failures (retries exhausted, residency) are an HTTP status, not an event.
async fn first_remote_event(
    state: &AppState,
    guard: &mut UsageGuard,
) -> Result<GenerationEvent, ApiError> {
    let (timeout, _, limits) = limits_of(state);
    let deadline = guard.started() + timeout;
    match next_event(guard, deadline, None, limits).await? {
        GenerationEvent::Failed(error) => Err(error.into()),
        event => Ok(event),
    }
}

/// Runs a validated job to a response. Every outcome is recorded on the guard.
pub(crate) async fn respond(state: AppState, mut guard: UsageGuard, job: TextJob) -> Response {
    tracing::Span::current().record("stream", job.stream);
    let (job, prompt_tokens) = match submit(&state, &mut guard, job).await {
        Ok(submitted) => submitted,
        Err(error) => {
            guard.fail(&error);
            return error.into_response();
        }
    };
    let rate_limits = guard.rate_limits();
    let first = if job.stream && job.engine.is_remote() {
        match first_remote_event(&state, &mut guard).await {
            Ok(event) => Some(event),
            Err(error) => {
                guard.fail(&error);
                return error.into_response();
            }
        }
    } else {
        None
    };
    let mut response = if job.stream {
        let stream = sse_stream(&state, guard, &job, prompt_tokens, first);
        Sse::new(stream)
            .keep_alive(KeepAlive::default())
            .into_response()
    } else {
        match collect(&state, &mut guard, &job).await {
            Ok((text, finished)) => {
                export_output(&guard, &text, finished.finish_reason);
                guard.succeed(
                    finished.usage.prompt_tokens,
                    finished.usage.cached_tokens(),
                    finished.usage.completion_tokens,
                );
                let request_id = guard.request_id();
                let body = whole_body(&state, request_id, &job, text, finished);
                guard.set_batch_body(&body);
                // Billed before it is sent (`settle_before_reply`).
                match guard.settle_before_reply().await {
                    Ok(()) => Json(body).into_response(),
                    Err(error) => error.into_response(),
                }
            }
            Err(error) => {
                guard.fail(&error);
                error.into_response()
            }
        }
    };
    crate::ratelimit::insert_headers(response.headers_mut(), &rate_limits);
    response
}

async fn collect(
    state: &AppState,
    guard: &mut UsageGuard,
    job: &TextJob,
) -> Result<(String, Finished), ApiError> {
    let (timeout, stall, limits) = limits_of(state);
    let deadline = guard.started() + timeout;
    let mut timing = Timing {
        model: job.model.to_string(),
        started: Instant::now(),
        last_chunk: None,
    };
    let mut text = String::new();
    loop {
        match next_event(guard, deadline, timing.stall(stall), limits).await? {
            GenerationEvent::Chunk {
                text: piece,
                tokens: _,
            } => {
                timing.chunk();
                guard.chunk_arrived();
                text.push_str(&piece);
            }
            GenerationEvent::Done {
                finish_reason,
                prompt_tokens,
                cached_prompt_tokens,
                completion_tokens,
            } => {
                guard.set_finish_reason(finish_reason_str(finish_reason));
                let usage = Usage::new(prompt_tokens, completion_tokens, cached_prompt_tokens);
                return Ok((
                    text,
                    Finished {
                        finish_reason,
                        usage,
                    },
                ));
            }
            GenerationEvent::Failed(error) => return Err(error.into()),
        }
    }
}

/// The completion on the model request's span, for a project whose text may be exported.
fn export_output(guard: &UsageGuard, text: &str, finish_reason: FinishReason) {
    if guard.exports_content() {
        let output = serde_json::json!([{"role": "assistant",
            "parts": [{"type": "text", "content": text}],
            "finish_reason": finish_reason_str(finish_reason)}]);
        tidepool_telemetry::set_text_attribute(
            guard.model_span(),
            "gen_ai.output.messages",
            output.to_string(),
        );
    }
}

fn response_id(flavor: Flavor, request_id: RequestId) -> String {
    let prefix = match flavor {
        Flavor::Chat => "chatcmpl-",
        Flavor::Completion => "cmpl-",
    };
    format!("{prefix}{}", request_id.0.simple())
}

/// A whole (non-streamed) answer of either endpoint.
#[derive(Serialize)]
#[serde(untagged)]
enum WholeBody {
    Chat(ChatCompletion),
    Completion(Completion),
}

fn whole_body(
    state: &AppState,
    request_id: RequestId,
    job: &TextJob,
    text: String,
    finished: Finished,
) -> WholeBody {
    let id = response_id(job.flavor, request_id);
    let finish_reason = finish_reason_str(finished.finish_reason);
    match job.flavor {
        Flavor::Chat => WholeBody::Chat(ChatCompletion {
            id,
            object: "chat.completion",
            created: state.now_s(),
            model: job.model.to_string(),
            choices: vec![ChatChoice {
                index: 0,
                message: ChatMessageOut {
                    role: "assistant",
                    content: text,
                },
                logprobs: None,
                finish_reason,
            }],
            usage: finished.usage,
        }),
        Flavor::Completion => WholeBody::Completion(Completion {
            id,
            object: "text_completion",
            created: state.now_s(),
            model: job.model.to_string(),
            choices: vec![CompletionChoice {
                index: 0,
                text,
                logprobs: None,
                finish_reason: Some(finish_reason),
            }],
            usage: Some(Some(finished.usage)),
        }),
    }
}

/// Builds the SSE chunks of one stream.
#[derive(Debug)]
struct Chunker {
    flavor: Flavor,
    id: String,
    created: i64,
    model: String,
    include_usage: bool,
}

fn event(value: &impl Serialize) -> Event {
    match serde_json::to_string(value) {
        Ok(json) => Event::default().data(json),
        Err(error) => {
            tracing::error!(%error, "cannot serialize an SSE chunk");
            Event::default().data(
                r#"{"error":{"message":"internal server error","type":"server_error","param":null,"code":"internal_error"}}"#,
            )
        }
    }
}

impl Chunker {
    #[expect(
        clippy::option_option,
        reason = "absent, `null` and a value are three different things on OpenAI's wire"
    )]
    fn usage_field(&self) -> Option<Option<Usage>> {
        self.include_usage.then_some(None)
    }

    fn chat(&self, delta: ChatDelta, finish_reason: Option<&'static str>) -> Event {
        event(&ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices: vec![ChatChunkChoice {
                index: 0,
                delta,
                logprobs: None,
                finish_reason,
            }],
            usage: self.usage_field(),
        })
    }

    fn completion(&self, text: String, finish_reason: Option<&'static str>) -> Event {
        event(&Completion {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            choices: vec![CompletionChoice {
                index: 0,
                text,
                logprobs: None,
                finish_reason,
            }],
            usage: self.usage_field(),
        })
    }

    /// The first event, if the flavor has one (chat announces the assistant role).
    fn opening(&self) -> Option<Event> {
        match self.flavor {
            Flavor::Chat => Some(self.chat(
                ChatDelta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                },
                None,
            )),
            Flavor::Completion => None,
        }
    }

    fn text(&self, text: String) -> Event {
        match self.flavor {
            Flavor::Chat => self.chat(
                ChatDelta {
                    role: None,
                    content: Some(text),
                },
                None,
            ),
            Flavor::Completion => self.completion(text, None),
        }
    }

    fn finish(&self, reason: FinishReason) -> Event {
        let reason = Some(finish_reason_str(reason));
        match self.flavor {
            Flavor::Chat => self.chat(ChatDelta::default(), reason),
            Flavor::Completion => self.completion(String::new(), reason),
        }
    }

    fn usage(&self, usage: Usage) -> Event {
        match self.flavor {
            Flavor::Chat => event(&ChatCompletionChunk {
                id: self.id.clone(),
                object: "chat.completion.chunk",
                created: self.created,
                model: self.model.clone(),
                choices: Vec::new(),
                usage: Some(Some(usage)),
            }),
            Flavor::Completion => event(&Completion {
                id: self.id.clone(),
                object: "text_completion",
                created: self.created,
                model: self.model.clone(),
                choices: Vec::new(),
                usage: Some(Some(usage)),
            }),
        }
    }
}

/// The SSE body. It owns the guard: when the client goes away axum drops this stream, and the
/// guard settles usage as `client_disconnected` with the tokens yielded so far.
fn sse_stream(
    state: &AppState,
    mut guard: UsageGuard,
    job: &TextJob,
    prompt_tokens: u32,
    first: Option<GenerationEvent>,
) -> impl Stream<Item = Result<Event, Infallible>> + use<> {
    let chunker = Chunker {
        flavor: job.flavor,
        id: response_id(job.flavor, guard.request_id()),
        created: state.now_s(),
        model: job.model.to_string(),
        include_usage: job.include_usage,
    };
    let (timeout, stall, limits) = limits_of(state);
    let deadline = guard.started() + timeout;
    let mut timing = Timing {
        model: job.model.to_string(),
        started: Instant::now(),
        last_chunk: None,
    };
    async_stream::stream! {
        if let Some(opening) = chunker.opening() {
            yield Ok(opening);
        }
        // The completion, kept only for a project whose text may be exported.
        let mut exported = guard.exports_content().then(String::new);
        let mut first = first;
        loop {
            let next = match first.take() {
                Some(event) => Ok(event),
                None => next_event(&mut guard, deadline, timing.stall(stall), limits).await,
            };
            match next {
                Ok(GenerationEvent::Chunk { text, tokens }) => {
                    timing.chunk();
                    guard.chunk_arrived();
                                        if let Some(exported) = exported.as_mut() {
                        exported.push_str(&text);
                    }
                    // Counted as delivered when handed to the connection.
                    guard.delivered(tokens);
                    if !text.is_empty() {
                        yield Ok(chunker.text(text));
                    }
                }
                Ok(GenerationEvent::Done { finish_reason, prompt_tokens, cached_prompt_tokens, completion_tokens }) => {
                    let usage = Usage::new(prompt_tokens, completion_tokens, cached_prompt_tokens);
                    if let Some(exported) = exported.take() {
                        export_output(&guard, &exported, finish_reason);
                    }
                    guard.set_finish_reason(finish_reason_str(finish_reason));
                    guard.succeed(prompt_tokens, cached_prompt_tokens, completion_tokens);
                    yield Ok(chunker.finish(finish_reason));
                    if chunker.include_usage {
                        yield Ok(chunker.usage(usage));
                    }
                    yield Ok(Event::default().data("[DONE]"));
                    break;
                }
                Ok(GenerationEvent::Failed(error)) => {
                    let error = ApiError::from(error);
                    error.log();
                    guard.fail(&error);
                    yield Ok(event(&error.body(Some(guard.request_id()))));
                    break;
                }
                Err(error) => {
                    error.log();
                    guard.fail(&error);
                    yield Ok(event(&error.body(Some(guard.request_id()))));
                    break;
                }
            }
        }
        // Keeps `prompt_tokens` meaningful in the span even if the engine never said `Done`.
        tracing::trace!(prompt_tokens, "stream ended");
    }
}
