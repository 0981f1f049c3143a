//! Request checks shared by every text engine. The gateway validates too; the engine checks
//! again because a bad value here can abort the process inside llama.cpp.

use tidepool_core::RequestId;

use crate::{EngineError, GenerateRequest, SamplingParams, TokenCount, TokenId};

/// Largest accepted `|presence_penalty|` and `|frequency_penalty|` (OpenAI's range).
const PENALTY_ABS_MAX: f32 = 2.0;
/// Largest accepted temperature (OpenAI's range).
const TEMPERATURE_MAX: f32 = 2.0;

fn invalid(param: &'static str, reason: impl Into<String>) -> EngineError {
    EngineError::InvalidRequest {
        param,
        reason: reason.into(),
    }
}

pub(crate) fn validate_sampling(params: &SamplingParams) -> Result<(), EngineError> {
    if !(params.temperature.is_finite() && (0.0..=TEMPERATURE_MAX).contains(&params.temperature)) {
        return Err(invalid("temperature", "must be between 0 and 2"));
    }
    if !(params.top_p.is_finite() && params.top_p > 0.0 && params.top_p <= 1.0) {
        return Err(invalid("top_p", "must be greater than 0 and at most 1"));
    }
    if i32::try_from(params.top_k).is_err() {
        return Err(invalid("top_k", "too large"));
    }
    for (param, value) in [
        ("presence_penalty", params.presence_penalty),
        ("frequency_penalty", params.frequency_penalty),
    ] {
        if !(value.is_finite() && value.abs() <= PENALTY_ABS_MAX) {
            return Err(invalid(param, "must be between -2 and 2"));
        }
    }
    if params.max_tokens == 0 {
        return Err(invalid("max_tokens", "must be at least 1"));
    }
    if params.stop.iter().any(String::is_empty) {
        return Err(invalid("stop", "stop sequences must not be empty"));
    }
    Ok(())
}

/// Checks a whole request against the model: sampling, prompt tokens and context length.
pub(crate) fn validate_request(
    request: &GenerateRequest,
    vocab_tokens: TokenId,
    context_tokens: TokenCount,
) -> Result<TokenCount, EngineError> {
    validate_sampling(&request.params)?;
    if request.prompt.is_empty() {
        return Err(invalid("prompt", "must contain at least one token"));
    }
    if let Some(bad) = request
        .prompt
        .iter()
        .find(|t| !(0..vocab_tokens).contains(*t))
    {
        return Err(invalid(
            "prompt",
            format!("token id {bad} is outside the vocabulary"),
        ));
    }
    let prompt_tokens = TokenCount::try_from(request.prompt.len()).unwrap_or(TokenCount::MAX);
    let max_tokens = request.params.max_tokens;
    if prompt_tokens.saturating_add(max_tokens) > context_tokens {
        return Err(EngineError::ContextLengthExceeded {
            prompt_tokens,
            max_tokens,
            context_tokens,
        });
    }
    Ok(prompt_tokens)
}

/// The sampler seed: the request's own, or one derived from its id so that retries of the same
/// request id sample the same way.
pub(crate) fn seed_u32(seed: Option<u64>, request_id: RequestId) -> u32 {
    let wide = seed.unwrap_or_else(|| {
        let (high, low) = request_id.0.as_u64_pair();
        high ^ low.rotate_left(17)
    });
    let [b0, b1, b2, b3, b4, b5, b6, b7] = wide.to_le_bytes();
    u32::from_le_bytes([b0, b1, b2, b3]) ^ u32::from_le_bytes([b4, b5, b6, b7])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_sampling_values() {
        let ok = SamplingParams::default();
        assert!(validate_sampling(&ok).is_ok());
        for bad in [
            SamplingParams {
                temperature: f32::NAN,
                ..ok.clone()
            },
            SamplingParams {
                temperature: -0.1,
                ..ok.clone()
            },
            SamplingParams {
                top_p: 0.0,
                ..ok.clone()
            },
            SamplingParams {
                presence_penalty: 3.0,
                ..ok.clone()
            },
            SamplingParams {
                max_tokens: 0,
                ..ok.clone()
            },
            SamplingParams {
                stop: vec![String::new()],
                ..ok.clone()
            },
        ] {
            assert!(
                matches!(
                    validate_sampling(&bad),
                    Err(EngineError::InvalidRequest { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn context_and_vocab_are_checked() {
        let request = GenerateRequest {
            remote: None,
            request_id: RequestId::new(),
            prompt: vec![1, 2, 3],
            params: SamplingParams {
                max_tokens: 8,
                ..SamplingParams::default()
            },
            class: crate::RequestClass::Online,
        };
        assert_eq!(validate_request(&request, 10, 11).ok(), Some(3));
        assert!(matches!(
            validate_request(&request, 10, 10),
            Err(EngineError::ContextLengthExceeded {
                prompt_tokens: 3,
                max_tokens: 8,
                ..
            })
        ));
        assert!(matches!(
            validate_request(&request, 3, 100),
            Err(EngineError::InvalidRequest {
                param: "prompt",
                ..
            })
        ));
    }

    #[test]
    fn explicit_seed_ignores_request_id() {
        let a = seed_u32(Some(7), RequestId::new());
        let b = seed_u32(Some(7), RequestId::new());
        assert_eq!(a, b);
        let id = RequestId::new();
        assert_eq!(seed_u32(None, id), seed_u32(None, id));
    }
}
