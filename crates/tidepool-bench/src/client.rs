//! The load client: streaming completions over HTTP, read as server-sent events. Every event with
//! non-empty text counts as one token (the servers send one per token). [`data_events`] splits a
//! response into its `data:` JSON events for any caller; [`one_request`] is one request of the
//! pool benchmark's open-loop load, with its status, token arrival times and how it ended.

use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use futures::StreamExt as _;
use tokio::time::Instant;

/// Calls `on_event` with every `data:` event of a streamed response that parses as JSON, as it
/// arrives; stops at the first error `on_event` returns.
pub(crate) async fn data_events(
    response: reqwest::Response,
    mut on_event: impl FnMut(&serde_json::Value) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut bytes = response.bytes_stream();
    let mut buffer = Vec::new();
    while let Some(chunk) = bytes.next().await {
        buffer.extend_from_slice(&chunk?);
        while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buffer.drain(..end + 2).collect();
            let Some(data) = event.strip_prefix(b"data: ") else {
                continue;
            };
            let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
                continue;
            };
            on_event(&value)?;
        }
    }
    Ok(())
}

/// The text of a completion event (empty when it has none).
pub(crate) fn event_text(event: &serde_json::Value) -> &str {
    event
        .pointer("/choices/0/text")
        .and_then(serde_json::Value::as_str)
        .unwrap_or("")
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// The stream ended normally.
    Completed,
    /// Non-2xx, transport error or an error event.
    Failed,
    /// Still running at the rate's deadline; cut.
    TimedOut,
}

/// What one request saw.
#[derive(Debug, Clone)]
pub(crate) struct RequestOutcome {
    pub(crate) output_tokens: u32,
    pub(crate) end: End,
    /// The HTTP status, if a response came.
    pub(crate) status: Option<u16>,
    /// How late the send was against the schedule.
    pub(crate) send_lag: Duration,
    /// Arrival of every token, from the send.
    pub(crate) tokens: Vec<Duration>,
    /// Prompt tokens as the server counted them (the stream's usage chunk).
    pub(crate) prompt_tokens: Option<u32>,
    /// The `code` of the error event that ended the stream, if one did.
    pub(crate) error_code: Option<String>,
}

impl RequestOutcome {
    pub(crate) fn new(output_tokens: u32) -> Self {
        Self {
            output_tokens,
            end: End::Failed,
            status: None,
            send_lag: Duration::ZERO,
            tokens: Vec::new(),
            prompt_tokens: None,
            error_code: None,
        }
    }
}

/// Where a request goes.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) client: reqwest::Client,
    pub(crate) url: Arc<str>,
    pub(crate) key: Arc<str>,
}

/// Sends one streaming completion and records its tokens until it ends or `deadline` passes.
pub(crate) async fn one_request(
    target: Target,
    body: serde_json::Value,
    output_tokens: u32,
    scheduled: Instant,
    deadline: Instant,
) -> RequestOutcome {
    let mut outcome = RequestOutcome::new(output_tokens);
    let sent = Instant::now();
    outcome.send_lag = sent.saturating_duration_since(scheduled);
    let streamed =
        tokio::time::timeout_at(deadline, stream_tokens(&target, &body, sent, &mut outcome)).await;
    outcome.end = match streamed {
        Ok(Ok(())) => End::Completed,
        Ok(Err(error)) => {
            tracing::debug!(%error, "request failed");
            End::Failed
        }
        Err(_) => End::TimedOut,
    };
    outcome
}

/// Streams one completion into `outcome`: its status and the arrival of every event with
/// non-empty text. Errors on a non-2xx status, a transport error or an error event.
async fn stream_tokens(
    target: &Target,
    body: &serde_json::Value,
    sent: Instant,
    outcome: &mut RequestOutcome,
) -> anyhow::Result<()> {
    let response = target
        .client
        .post(&*target.url)
        .bearer_auth(&*target.key)
        .json(body)
        .send()
        .await?;
    let status = response.status();
    outcome.status = Some(status.as_u16());
    if !status.is_success() {
        bail!(
            "HTTP {status}: {}",
            response.text().await.unwrap_or_default()
        );
    }
    data_events(response, |event| {
        if let Some(error) = event.get("error").filter(|e| !e.is_null()) {
            outcome.error_code = Some(
                error
                    .get("code")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or("unknown")
                    .to_owned(),
            );
            bail!("error event: {error}");
        }
        if !event_text(event).is_empty() {
            outcome.tokens.push(sent.elapsed());
        }
        if let Some(prompt) = event
            .pointer("/usage/prompt_tokens")
            .and_then(serde_json::Value::as_u64)
        {
            outcome.prompt_tokens = u32::try_from(prompt).ok();
        }
        Ok(())
    })
    .await
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A request outcome as the load client records it.
    pub(crate) fn outcome(end: End, output_tokens: u32, tokens_ms: &[u64]) -> RequestOutcome {
        RequestOutcome {
            output_tokens,
            end,
            status: Some(200),
            send_lag: Duration::ZERO,
            tokens: tokens_ms
                .iter()
                .map(|&t| Duration::from_millis(t))
                .collect(),
            prompt_tokens: None,
            error_code: None,
        }
    }
}
