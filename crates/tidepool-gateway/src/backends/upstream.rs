//! The upstream client: one attempt's HTTP call to an OpenAI-compatible backend and the parsing
//! of its answer. A streaming client gets a streaming call (`stream: true` with
//! `stream_options.include_usage`) whose SSE becomes `GenerationEvent`s as it arrives; a client
//! that does not stream gets a non-stream call, answered with one JSON body (every
//! OpenAI-compatible server reports `usage` there, not all do in a stream).
//!
//! Token counts come from the backend's `usage` (a remote model has no local tokenizer): the
//! reservation uses an upper bound ([`prompt_tokens_bound`]), the settlement the backend's count.
//! While streaming, every content chunk counts as one delivered token (OpenAI-compatible servers
//! send one chunk per token); the final `Done` carries the backend's exact completion count.

use futures::StreamExt as _;
use serde_json::{Value, json};
use tidepool_core::{ModelId, TokenCount};
use tidepool_engine::{FinishReason, GenerateRequest, GenerationEvent, RemoteInput, RemotePrompt};
use tokio::sync::mpsc;

use super::backend::{Backend, Secret};

/// Bytes of one SSE line from a backend; a longer line fails the attempt.
const SSE_LINE_BYTES_MAX: usize = 1 << 20;
/// Longest non-stream answer body read from a backend, in bytes.
const RESPONSE_BYTES_MAX: usize = 16 << 20;
/// Tokens added to a remote prompt's byte count for the reservation's upper bound (special
/// tokens of a chat template the backend applies).
const PROMPT_TEMPLATE_TOKENS_MAX: u32 = 64;
/// Per chat message, the same.
const MESSAGE_TEMPLATE_TOKENS_MAX: u32 = 8;

/// Upper bound of a remote prompt's tokens, for the reservation: one token per byte (byte-level
/// BPE never does worse) plus room for the backend's chat template.
pub(crate) fn prompt_tokens_bound(prompt: &RemotePrompt) -> TokenCount {
    let (bytes, messages) = match prompt {
        RemotePrompt::Text(text) => (text.len(), 0),
        RemotePrompt::Chat(messages) => (
            messages
                .iter()
                .map(|m| m.role.len().saturating_add(m.content.len()))
                .sum(),
            messages.len(),
        ),
    };
    let bytes = TokenCount::try_from(bytes).unwrap_or(TokenCount::MAX);
    let messages = TokenCount::try_from(messages).unwrap_or(TokenCount::MAX);
    bytes
        .saturating_add(messages.saturating_mul(MESSAGE_TEMPLATE_TOKENS_MAX))
        .saturating_add(PROMPT_TEMPLATE_TOKENS_MAX)
}

/// Why one attempt ended without an answer.
#[derive(Debug)]
pub(super) enum AttemptError {
    /// Connection, timeout, 5xx, a cut stream: counts against the breaker; retryable if nothing
    /// reached the client.
    Failed { status: Option<u16> },
    /// The backend refused this request (4xx): not the backend's fault, not retryable.
    Rejected { status: u16 },
    /// The backend is full (429): try another, without blaming it.
    Busy,
    /// The client went away.
    ClientGone,
}

/// What an attempt's request carries of its trace: `traceparent` from the attempt's span (or,
/// with tracing off, the request's trace id for logs).
#[derive(Debug, Clone, Copy)]
pub(super) struct TraceHeaders<'a> {
    pub(super) span: &'a tracing::Span,
    pub(super) trace_id: Option<&'a str>,
}

/// One request as every attempt sends it, and the channel its events go to.
#[derive(Debug)]
pub(super) struct Call {
    pub(super) model: ModelId,
    pub(super) request: GenerateRequest,
    pub(super) input: RemoteInput,
    pub(super) tx: mpsc::Sender<GenerationEvent>,
}

impl Call {
    fn body(&self, backend: &Backend) -> (&'static str, Value) {
        let params = &self.request.params;
        let model = backend.upstream_model(&self.model);
        // A client that does not stream gets a non-stream call: every OpenAI-compatible server
        // reports `usage` there (some, like llama-cpp-python, never do in a stream).
        let stream = !self.input.buffered;
        let mut body = json!({
            "model": model,
            "stream": stream,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "presence_penalty": params.presence_penalty,
            "frequency_penalty": params.frequency_penalty,
        });
        if stream {
            body["stream_options"] = json!({"include_usage": true});
        }
        if let Some(seed) = params.seed {
            body["seed"] = json!(seed);
        }
        if !params.stop.is_empty() {
            body["stop"] = json!(params.stop);
        }
        match &self.input.prompt {
            RemotePrompt::Text(text) => {
                body["prompt"] = json!(text);
                ("/v1/completions", body)
            }
            RemotePrompt::Chat(messages) => {
                body["messages"] = messages
                    .iter()
                    .map(|m| json!({"role": m.role, "content": m.content}))
                    .collect();
                ("/v1/chat/completions", body)
            }
        }
    }

    /// Sends the request; a 2xx response, or the attempt's error by status.
    async fn open(
        &self,
        backend: &Backend,
        trace: TraceHeaders<'_>,
    ) -> Result<reqwest::Response, AttemptError> {
        let (path, body) = self.body(backend);
        let mut headers = reqwest::header::HeaderMap::new();
        tidepool_telemetry::inject(trace.span, trace.trace_id, &mut headers);
        let mut request = backend
            .client
            .post(format!("{}{path}", backend.url))
            .headers(headers)
            .json(&body);
        if let Some(Secret(key)) = &backend.api_key {
            request = request.bearer_auth(key);
        }
        // A pooled keep-alive connection the backend has just closed fails the send before the
        // backend saw anything (uvicorn-based servers do this): one more try, on another
        // connection, before the attempt counts as failed.
        let again = request.try_clone();
        let response = match request.send().await {
            Ok(response) => response,
            Err(error) => {
                tracing::debug!(backend = %backend.id, %error, "backend send failed; trying once more");
                let Some(again) = again else {
                    return Err(AttemptError::Failed { status: None });
                };
                again.send().await.map_err(|error| {
                    tracing::debug!(backend = %backend.id, %error, "backend send failed");
                    AttemptError::Failed { status: None }
                })?
            }
        };
        let status = response.status();
        if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            return Err(AttemptError::Busy);
        }
        if status.is_server_error() || status == reqwest::StatusCode::REQUEST_TIMEOUT {
            return Err(AttemptError::Failed {
                status: Some(status.as_u16()),
            });
        }
        if !status.is_success() {
            return Err(AttemptError::Rejected {
                status: status.as_u16(),
            });
        }
        Ok(response)
    }

    /// One attempt's request and answer: streamed events go to the client as they arrive (a
    /// buffered call collects the whole answer first). Sets `delivered` once a chunk was sent.
    pub(super) async fn stream_from(
        &self,
        backend: &Backend,
        delivered: &mut bool,
        trace: TraceHeaders<'_>,
    ) -> Result<(), AttemptError> {
        let response = self.open(backend, trace).await?;
        if self.input.buffered {
            return self.finish(whole_answer(backend, response).await?).await;
        }
        let mut reader = SseReader::default();
        let mut buffered = Buffered::default();
        let mut bytes = response.bytes_stream();
        while let Some(next) = bytes.next().await {
            let chunk = next.map_err(|error| {
                tracing::debug!(backend = %backend.id, %error, "backend stream broke");
                AttemptError::Failed { status: None }
            })?;
            for data in reader
                .push(&chunk)
                .ok_or(AttemptError::Failed { status: None })?
            {
                tracing::trace!(backend = %backend.id, %data, "backend event");
                match parse_data(&data) {
                    Parsed::Text(text, finish) => {
                        if finish.is_some() {
                            buffered.finish = finish;
                        }
                        if self.input.buffered {
                            buffered.text.push_str(&text);
                            buffered.tokens = buffered.tokens.saturating_add(1);
                        } else {
                            *delivered = true;
                            self.send(GenerationEvent::Chunk { text, tokens: 1 })
                                .await?;
                        }
                        buffered.chunks = buffered.chunks.saturating_add(1);
                    }
                    Parsed::Finish(reason) => buffered.finish = Some(reason),
                    Parsed::Usage(usage) => buffered.usage = Some(usage),
                    Parsed::Done => return self.finish(buffered).await,
                    Parsed::Error | Parsed::Malformed => {
                        tracing::debug!(backend = %backend.id, data = %data.chars().take(200).collect::<String>(),
                            "backend sent an error or a malformed event");
                        return Err(AttemptError::Failed { status: None });
                    }
                    Parsed::Nothing => {}
                }
            }
        }
        // The connection closed without `[DONE]`: the backend died mid-answer.
        tracing::debug!(backend = %backend.id, "backend stream ended without [DONE]");
        Err(AttemptError::Failed { status: None })
    }

    async fn finish(&self, buffered: Buffered) -> Result<(), AttemptError> {
        let (prompt_tokens, cached_prompt_tokens, completion_tokens) =
            buffered.usage.unwrap_or_else(|| {
                // No `usage` from the backend: completion = the tokens delivered; the prompt is
                // billed at the upper bound it was reserved at (docs/regions.md).
                tracing::warn!(model = %self.model,
                    "backend reported no usage; prompt billed at its reserved upper bound");
                (
                    prompt_tokens_bound(&self.input.prompt),
                    None,
                    buffered.chunks,
                )
            });
        // `[DONE]` without a finish reason is a cut answer, not a complete one (llama-cpp-python
        // ends a stream that way when another request wants its lock): a failed attempt.
        let Some(finish_reason) = buffered.finish else {
            tracing::debug!(model = %self.model, "backend answer ended without a finish reason");
            return Err(AttemptError::Failed { status: None });
        };
        if self.input.buffered && !buffered.text.is_empty() {
            self.send(GenerationEvent::Chunk {
                text: buffered.text,
                tokens: buffered.tokens,
            })
            .await?;
        }
        self.send(GenerationEvent::Done {
            finish_reason,
            prompt_tokens,
            cached_prompt_tokens,
            completion_tokens,
        })
        .await
    }

    async fn send(&self, event: GenerationEvent) -> Result<(), AttemptError> {
        self.tx
            .send(event)
            .await
            .map_err(|_| AttemptError::ClientGone)
    }
}

/// What one attempt collected besides streamed text.
#[derive(Debug, Default)]
struct Buffered {
    text: String,
    tokens: TokenCount,
    chunks: TokenCount,
    finish: Option<FinishReason>,
    usage: Option<BackendUsage>,
}

/// A non-stream answer (`chat.completion` or `text_completion` JSON) as one buffered result.
async fn whole_answer(
    backend: &Backend,
    response: reqwest::Response,
) -> Result<Buffered, AttemptError> {
    let failed = |why: &str| {
        tracing::debug!(backend = %backend.id, why, "backend answer unusable");
        AttemptError::Failed { status: None }
    };
    if response
        .content_length()
        .is_some_and(|n| n > u64::try_from(RESPONSE_BYTES_MAX).unwrap_or(u64::MAX))
    {
        return Err(failed("answer larger than RESPONSE_BYTES_MAX"));
    }
    let bytes = response.bytes().await.map_err(|_| failed("body broke"))?;
    if bytes.len() > RESPONSE_BYTES_MAX {
        return Err(failed("answer larger than RESPONSE_BYTES_MAX"));
    }
    let value: Value = serde_json::from_slice(&bytes).map_err(|_| failed("not JSON"))?;
    if value.get("error").is_some_and(|e| !e.is_null()) {
        return Err(failed("error body"));
    }
    let choice = value
        .pointer("/choices/0")
        .ok_or_else(|| failed("no choices"))?;
    let text = choice
        .pointer("/message/content")
        .or_else(|| choice.get("text"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let finish = finish_reason_of(choice);
    let usage = usage_of(&value);
    let completion = usage.map_or(1, |(_, _, completion)| completion);
    Ok(Buffered {
        tokens: completion,
        chunks: completion,
        text,
        finish,
        usage,
    })
}

/// Splits a byte stream into SSE `data:` payloads.
#[derive(Debug, Default)]
pub(crate) struct SseReader {
    line: Vec<u8>,
}

impl SseReader {
    /// Feeds bytes; returns the complete `data:` payloads, or `None` for a line over
    /// [`SSE_LINE_BYTES_MAX`].
    pub(crate) fn push(&mut self, bytes: &[u8]) -> Option<Vec<String>> {
        let mut out = Vec::new();
        for &byte in bytes {
            if byte == b'\n' {
                let line = std::mem::take(&mut self.line);
                let line = String::from_utf8_lossy(&line);
                let line = line.trim_end_matches('\r');
                if let Some(data) = line.strip_prefix("data:") {
                    out.push(data.trim_start().to_owned());
                }
            } else {
                if self.line.len() >= SSE_LINE_BYTES_MAX {
                    return None;
                }
                self.line.push(byte);
            }
        }
        Some(out)
    }
}

/// One SSE payload of an OpenAI-compatible stream.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Parsed {
    /// Text, and the finish reason when the same chunk ends the choice.
    Text(String, Option<FinishReason>),
    Finish(FinishReason),
    Usage(BackendUsage),
    Done,
    Error,
    Malformed,
    Nothing,
}

/// A backend's usage: every prompt token (cached ones included), the cached ones when the
/// backend said (`None`: not reported, billed as uncached input), completion tokens.
pub(crate) type BackendUsage = (TokenCount, Option<TokenCount>, TokenCount);

/// An answer's (or a chunk's) `usage`, normalised to OpenAI's convention (`prompt_tokens`
/// includes the cached part): OpenAI and vLLM report `prompt_tokens_details.cached_tokens`;
/// Anthropic-style usage reports `cache_read_input_tokens` (and `cache_creation_input_tokens`)
/// *beside* an `input_tokens`/`prompt_tokens` that excludes them, so they are added back.
fn usage_of(value: &Value) -> Option<BackendUsage> {
    let usage = value.get("usage").filter(|u| u.is_object())?;
    let optional = |pointer: &str| {
        usage
            .pointer(pointer)
            .and_then(Value::as_u64)
            .and_then(|n| TokenCount::try_from(n).ok())
    };
    let prompt = optional("/prompt_tokens").or_else(|| optional("/input_tokens"));
    let completion = optional("/completion_tokens")
        .or_else(|| optional("/output_tokens"))
        .unwrap_or(0);
    if let Some(cached) = optional("/prompt_tokens_details/cached_tokens") {
        return Some((prompt.unwrap_or(0), Some(cached), completion));
    }
    if let Some(read) = optional("/cache_read_input_tokens") {
        let created = optional("/cache_creation_input_tokens").unwrap_or(0);
        let prompt = prompt
            .unwrap_or(0)
            .saturating_add(read)
            .saturating_add(created);
        return Some((prompt, Some(read), completion));
    }
    Some((prompt.unwrap_or(0), None, completion))
}

/// A choice's `finish_reason`: `length`, any other reason as `stop`, or none yet.
fn finish_reason_of(choice: &Value) -> Option<FinishReason> {
    match choice.get("finish_reason").and_then(Value::as_str) {
        Some("length") => Some(FinishReason::Length),
        Some(_) => Some(FinishReason::Stop),
        None => None,
    }
}

/// Parses one payload of a chat or completion stream.
pub(crate) fn parse_data(data: &str) -> Parsed {
    if data == "[DONE]" {
        return Parsed::Done;
    }
    let Ok(value) = serde_json::from_str::<Value>(data) else {
        return Parsed::Malformed;
    };
    if value.get("error").is_some() {
        return Parsed::Error;
    }
    if let Some(usage) = usage_of(&value) {
        return Parsed::Usage(usage);
    }
    let Some(choice) = value.pointer("/choices/0") else {
        return Parsed::Nothing;
    };
    let text = choice
        .pointer("/delta/content")
        .or_else(|| choice.get("text"))
        .and_then(Value::as_str)
        .unwrap_or("");
    match (text.is_empty(), finish_reason_of(choice)) {
        (false, finish) => Parsed::Text(text.to_owned(), finish),
        (true, Some(finish)) => Parsed::Finish(finish),
        (true, None) => Parsed::Nothing,
    }
}

#[cfg(test)]
mod tests {
    use tidepool_engine::ChatMessage;

    use super::*;

    #[test]
    fn sse_reader_splits_lines_across_chunks() {
        let mut reader = SseReader::default();
        assert_eq!(reader.push(b"data: {\"a\"").unwrap(), Vec::<String>::new());
        assert_eq!(
            reader
                .push(b":1}\r\n\r\n: keep-alive\ndata: [DONE]\n")
                .unwrap(),
            vec!["{\"a\":1}".to_owned(), "[DONE]".to_owned()]
        );
    }

    #[test]
    fn parses_openai_stream_payloads() {
        assert_eq!(
            parse_data(
                r#"{"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}"#
            ),
            Parsed::Text("Hi".to_owned(), None)
        );
        assert_eq!(
            parse_data(r#"{"choices":[{"index":0,"text":" there","finish_reason":"stop"}]}"#),
            Parsed::Text(" there".to_owned(), Some(FinishReason::Stop))
        );
        assert_eq!(
            parse_data(r#"{"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}"#),
            Parsed::Finish(FinishReason::Length)
        );
        assert_eq!(
            parse_data(
                r#"{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":2}}}"#
            ),
            Parsed::Usage((7, Some(2), 3))
        );
        // No cached count: unknown, not 0.
        assert_eq!(
            parse_data(r#"{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3}}"#),
            Parsed::Usage((7, None, 3))
        );
        // Anthropic-style: the prompt excludes what was read from (or written to) the cache.
        assert_eq!(
            parse_data(
                r#"{"choices":[],"usage":{"input_tokens":5,"output_tokens":3,"cache_read_input_tokens":600,"cache_creation_input_tokens":2}}"#
            ),
            Parsed::Usage((607, Some(600), 3))
        );
        assert_eq!(
            parse_data(r#"{"choices":[{"delta":{"role":"assistant","content":""}}],"usage":null}"#),
            Parsed::Nothing
        );
        assert_eq!(parse_data(r#"{"error":{"code":"x"}}"#), Parsed::Error);
        assert_eq!(parse_data("not json"), Parsed::Malformed);
        assert_eq!(parse_data("[DONE]"), Parsed::Done);
    }

    #[test]
    fn prompt_bound_covers_bytes_and_template() {
        assert_eq!(
            prompt_tokens_bound(&RemotePrompt::Text("abcd".into())),
            4 + PROMPT_TEMPLATE_TOKENS_MAX
        );
        let chat = RemotePrompt::Chat(vec![ChatMessage {
            role: "user".into(),
            content: "hi".into(),
        }]);
        assert_eq!(
            prompt_tokens_bound(&chat),
            6 + MESSAGE_TEMPLATE_TOKENS_MAX + PROMPT_TEMPLATE_TOKENS_MAX
        );
    }
}
