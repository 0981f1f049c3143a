//! `x-ratelimit-*` response headers, shaped like OpenAI's: for the tightest requests-per-minute
//! and tokens-per-minute windows that applied to a request, `x-ratelimit-limit-requests`,
//! `x-ratelimit-remaining-requests`, `x-ratelimit-reset-requests` (a Go-style duration such as
//! `850ms`, `12.5s` or `1m0s`) and the same three for `tokens`. No header is sent for a
//! dimension without a limit.

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use tidepool_ledger::{RateLimitStatus, WindowStatus};

/// A duration in milliseconds as OpenAI writes it (`850ms`, `12.5s`, `1m0s`).
pub(crate) fn duration_text(ms: u64) -> String {
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let minutes = ms / 60_000;
    let rest_ms = ms % 60_000;
    let seconds = rest_ms / 1000;
    let millis = rest_ms % 1000;
    let seconds_text = if millis == 0 {
        format!("{seconds}s")
    } else {
        let fraction = format!("{millis:03}");
        format!("{seconds}.{}s", fraction.trim_end_matches('0'))
    };
    if minutes == 0 {
        seconds_text
    } else {
        format!("{minutes}m{seconds_text}")
    }
}

fn insert_window(headers: &mut HeaderMap, dimension: &str, window: WindowStatus) {
    let pairs = [
        ("limit", window.limit.to_string()),
        ("remaining", window.remaining.to_string()),
        ("reset", duration_text(window.reset_ms)),
    ];
    for (what, value) in pairs {
        let name = format!("x-ratelimit-{what}-{dimension}");
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            headers.insert(name, value);
        }
    }
}

/// Adds the headers of `status` to a response.
pub(crate) fn insert_headers(headers: &mut HeaderMap, status: &RateLimitStatus) {
    if let Some(window) = status.requests {
        insert_window(headers, "requests", window);
    }
    if let Some(window) = status.tokens {
        insert_window(headers, "tokens", window);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_openai() {
        assert_eq!(duration_text(0), "0ms");
        assert_eq!(duration_text(850), "850ms");
        assert_eq!(duration_text(1000), "1s");
        assert_eq!(duration_text(12_500), "12.5s");
        assert_eq!(duration_text(59_999), "59.999s");
        assert_eq!(duration_text(60_000), "1m0s");
    }

    #[test]
    fn headers_only_for_limited_dimensions() {
        let mut headers = HeaderMap::new();
        insert_headers(
            &mut headers,
            &RateLimitStatus {
                requests: Some(WindowStatus {
                    limit: 60,
                    remaining: 59,
                    reset_ms: 1500,
                }),
                tokens: None,
            },
        );
        assert_eq!(headers["x-ratelimit-limit-requests"], "60");
        assert_eq!(headers["x-ratelimit-remaining-requests"], "59");
        assert_eq!(headers["x-ratelimit-reset-requests"], "1.5s");
        assert!(!headers.contains_key("x-ratelimit-limit-tokens"));
    }
}
