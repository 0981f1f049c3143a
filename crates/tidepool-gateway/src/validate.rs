//! Request validation: loose wire values in, engine types out, or a 400 naming its `param`.
//! Every bound comes from `Limits` or from OpenAI's documented ranges.

use serde_json::Value;
use tidepool_core::Limits;
use tidepool_engine::{ChatMessage, SamplingParams};

use crate::error::ApiError;
use crate::openai::{ChatMessageIn, SamplingFields};

/// OpenAI's temperature range is 0..=2.
const TEMPERATURE_MAX: f64 = 2.0;
/// OpenAI's presence/frequency penalty range is -2..=2.
const PENALTY_ABS_MAX: f64 = 2.0;
/// `max_tokens` of `/v1/completions` when the request sets none (OpenAI's default).
pub(crate) const COMPLETION_MAX_TOKENS_DEFAULT: u32 = 16;

#[expect(
    clippy::cast_possible_truncation,
    reason = "the value is range-checked first; losing f64 precision is intended"
)]
fn to_f32(value: f64) -> f32 {
    value as f32
}

fn in_range(
    param: &'static str,
    value: Option<f64>,
    default: f64,
    ok: impl Fn(f64) -> bool,
    reason: &str,
) -> Result<f32, ApiError> {
    let value = value.unwrap_or(default);
    if value.is_finite() && ok(value) {
        Ok(to_f32(value))
    } else {
        Err(ApiError::invalid_param(param, reason))
    }
}

/// The requested `max_tokens` (`param` names the field it came from), if any.
pub(crate) fn max_tokens(
    param: &'static str,
    value: Option<i64>,
    limits: &Limits,
) -> Result<Option<u32>, ApiError> {
    let Some(value) = value else { return Ok(None) };
    if value < 1 {
        return Err(ApiError::invalid_param(param, "must be at least 1"));
    }
    match u32::try_from(value) {
        Ok(tokens) if tokens <= limits.completion_tokens_max => Ok(Some(tokens)),
        Ok(_) | Err(_) => Err(ApiError::invalid_param(
            param,
            format!("must be at most {}", limits.completion_tokens_max),
        )),
    }
}

/// Sampling parameters; `max_tokens` is filled in by the caller once the prompt length is known.
pub(crate) fn sampling(
    fields: &SamplingFields,
    limits: &Limits,
) -> Result<SamplingParams, ApiError> {
    if let Some(n) = fields.n
        && n != 1
    {
        return Err(ApiError::invalid_param("n", "only n=1 is supported"));
    }
    let temperature = in_range(
        "temperature",
        fields.temperature,
        1.0,
        |t| (0.0..=TEMPERATURE_MAX).contains(&t),
        "must be between 0 and 2",
    )?;
    let top_p = in_range(
        "top_p",
        fields.top_p,
        1.0,
        |p| p > 0.0 && p <= 1.0,
        "must be greater than 0 and at most 1",
    )?;
    let penalty = |t: f64| (-PENALTY_ABS_MAX..=PENALTY_ABS_MAX).contains(&t);
    let presence_penalty = in_range(
        "presence_penalty",
        fields.presence_penalty,
        0.0,
        penalty,
        "must be between -2 and 2",
    )?;
    let frequency_penalty = in_range(
        "frequency_penalty",
        fields.frequency_penalty,
        0.0,
        penalty,
        "must be between -2 and 2",
    )?;
    let top_k = match fields.top_k {
        None => 0,
        Some(k) => u32::try_from(k)
            .ok()
            .filter(|k| i32::try_from(*k).is_ok())
            .ok_or_else(|| ApiError::invalid_param("top_k", "must be between 0 and 2147483647"))?,
    };
    Ok(SamplingParams {
        temperature,
        top_p,
        top_k,
        seed: fields.seed.map(i64::cast_unsigned),
        max_tokens: 0,
        stop: stop(fields.stop.as_ref(), limits)?,
        presence_penalty,
        frequency_penalty,
    })
}

fn stop(value: Option<&Value>, limits: &Limits) -> Result<Vec<String>, ApiError> {
    let list = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(one)) => vec![one.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| item.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                ApiError::invalid_param("stop", "must be a string or an array of strings")
            })?,
        Some(_) => {
            return Err(ApiError::invalid_param(
                "stop",
                "must be a string or an array of strings",
            ));
        }
    };
    let count_max = usize::try_from(limits.stop_sequences_max).unwrap_or(usize::MAX);
    if list.len() > count_max {
        return Err(ApiError::invalid_param(
            "stop",
            format!("at most {count_max} stop sequences"),
        ));
    }
    let bytes_max = usize::try_from(limits.stop_sequence_bytes_max).unwrap_or(usize::MAX);
    if list.iter().any(|s| s.is_empty() || s.len() > bytes_max) {
        return Err(ApiError::invalid_param(
            "stop",
            format!("each stop sequence must be 1 to {bytes_max} bytes"),
        ));
    }
    Ok(list)
}

/// Chat messages as the engine's template wants them.
pub(crate) fn messages(
    messages: &[ChatMessageIn],
    limits: &Limits,
) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "must contain at least one message",
        ));
    }
    let count_max = usize::try_from(limits.chat_messages_max).unwrap_or(usize::MAX);
    if messages.len() > count_max {
        return Err(ApiError::invalid_param(
            "messages",
            format!("at most {count_max} messages"),
        ));
    }
    messages
        .iter()
        .enumerate()
        .map(|(index, message)| {
            let role = match message.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                _ => {
                    return Err(ApiError::invalid_param(
                        "messages",
                        format!("messages[{index}].role must be system, user or assistant"),
                    ));
                }
            };
            let content = content(message.content.as_ref()).ok_or_else(|| {
                ApiError::invalid_param(
                    "messages",
                    format!("messages[{index}].content must be a string or an array of text parts"),
                )
            })?;
            Ok(ChatMessage {
                role: role.to_owned(),
                content,
            })
        })
        .collect()
}

fn content(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(text) => Some(text.clone()),
        Value::Array(parts) => {
            let texts = parts
                .iter()
                .map(|part| {
                    let kind = part.get("type")?.as_str()?;
                    (kind == "text").then(|| part.get("text")?.as_str())?
                })
                .collect::<Option<Vec<_>>>()?;
            Some(texts.join("\n"))
        }
        _ => None,
    }
}

/// A completion prompt: a string, or an array holding exactly one string.
pub(crate) fn prompt(value: &Value) -> Result<String, ApiError> {
    match value {
        Value::String(text) => Ok(text.clone()),
        Value::Array(items) => match items.as_slice() {
            [Value::String(text)] => Ok(text.clone()),
            _ => Err(ApiError::invalid_param(
                "prompt",
                "must be a string or an array of exactly one string",
            )),
        },
        _ => Err(ApiError::invalid_param("prompt", "must be a string")),
    }
}

/// Embedding inputs: a string or an array of 1..=`embedding_inputs_max` non-empty strings.
pub(crate) fn embedding_input(value: &Value, limits: &Limits) -> Result<Vec<String>, ApiError> {
    let inputs = match value {
        Value::String(text) => vec![text.clone()],
        Value::Array(items) => items
            .iter()
            .map(|item| item.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                ApiError::invalid_param("input", "must be a string or an array of strings")
            })?,
        _ => {
            return Err(ApiError::invalid_param(
                "input",
                "must be a string or an array of strings",
            ));
        }
    };
    let count_max = usize::try_from(limits.embedding_inputs_max).unwrap_or(usize::MAX);
    if inputs.is_empty() || inputs.len() > count_max {
        return Err(ApiError::invalid_param(
            "input",
            format!("must hold 1 to {count_max} inputs"),
        ));
    }
    if inputs.iter().any(String::is_empty) {
        return Err(ApiError::invalid_param(
            "input",
            "inputs must not be empty strings",
        ));
    }
    Ok(inputs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(json: &str) -> SamplingFields {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn sampling_ranges_name_their_param() {
        let limits = Limits::default();
        for (json, param) in [
            (r#"{"temperature": 5}"#, "temperature"),
            (r#"{"temperature": -0.1}"#, "temperature"),
            (r#"{"top_p": 0}"#, "top_p"),
            (r#"{"top_p": 1.5}"#, "top_p"),
            (r#"{"presence_penalty": 3}"#, "presence_penalty"),
            (r#"{"frequency_penalty": -2.5}"#, "frequency_penalty"),
            (r#"{"n": 2}"#, "n"),
            (r#"{"top_k": -1}"#, "top_k"),
            (r#"{"stop": 3}"#, "stop"),
            (r#"{"stop": ["a", ""]}"#, "stop"),
            (r#"{"stop": ["a","b","c","d","e"]}"#, "stop"),
        ] {
            let error = sampling(&fields(json), &limits).unwrap_err();
            assert_eq!(error.param(), Some(param), "{json}");
            assert_eq!(error.code(), "invalid_request_error");
        }
        let ok = sampling(
            &fields(r#"{"temperature": 0, "top_p": 1, "stop": "x", "seed": -1, "n": 1}"#),
            &limits,
        )
        .unwrap();
        assert_eq!(ok.stop, vec!["x".to_owned()]);
        assert_eq!(ok.seed, Some(u64::MAX));
        assert_eq!(
            max_tokens("max_tokens", Some(-1), &limits)
                .unwrap_err()
                .param(),
            Some("max_tokens")
        );
        assert!(max_tokens("max_tokens", Some(5000), &limits).is_err());
        assert_eq!(max_tokens("max_tokens", Some(8), &limits).unwrap(), Some(8));
    }

    #[test]
    fn messages_prompts_and_inputs() {
        let limits = Limits::default();
        let parsed: Vec<ChatMessageIn> = serde_json::from_str(
            r#"[{"role":"developer","content":"s"},{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]"#,
        )
        .unwrap();
        let out = messages(&parsed, &limits).unwrap();
        assert_eq!(out[0].role, "system");
        assert_eq!(out[1].content, "a\nb");
        let bad: Vec<ChatMessageIn> =
            serde_json::from_str(r#"[{"role":"tool","content":"x"}]"#).unwrap();
        assert_eq!(
            messages(&bad, &limits).unwrap_err().param(),
            Some("messages")
        );
        let image: Vec<ChatMessageIn> =
            serde_json::from_str(r#"[{"role":"user","content":[{"type":"image_url"}]}]"#).unwrap();
        assert!(messages(&image, &limits).is_err());
        assert!(messages(&[], &limits).is_err());
        assert_eq!(prompt(&serde_json::json!(["x"])).unwrap(), "x");
        assert!(prompt(&serde_json::json!(["x", "y"])).is_err());
        assert!(prompt(&serde_json::json!([1, 2])).is_err());
        assert_eq!(
            embedding_input(&serde_json::json!("a"), &limits)
                .unwrap()
                .len(),
            1
        );
        assert!(embedding_input(&serde_json::json!([]), &limits).is_err());
        assert!(embedding_input(&serde_json::json!([""]), &limits).is_err());
    }
}
