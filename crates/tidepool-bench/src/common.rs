//! Helpers every benchmark shares: percentiles, unit conversions, the local models' file names,
//! the unique prompts, a free loopback port and the wait for a child server's health check. A
//! leaf: it uses no other module of the crate.

use std::time::Duration;

use anyhow::bail;
use tidepool_core::PoolPolicy;
use tokio::process::Child;
use tokio::time::Instant;

/// GGUF of the SmolLM2 family (in the models dir).
pub(crate) const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// GGUF of the Gemma family (in the models dir).
pub(crate) const GEMMA_FILE: &str = "gemma-3-270m-q4_k_m.gguf";

/// Nearest-rank percentile; 0 for no samples.
pub(crate) fn percentile(values: &mut [f64], pct: usize) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let rank = (pct * values.len()).div_ceil(100).clamp(1, values.len());
    values.get(rank - 1).copied().unwrap_or(0.0)
}

/// A duration in milliseconds.
pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[expect(
    clippy::cast_precision_loss,
    reason = "token and request counts far below 2^52"
)]
pub(crate) fn as_f64(value: u64) -> f64 {
    value as f64
}

/// A pool policy by its configuration name.
pub(crate) fn parse_policy(text: &str) -> anyhow::Result<PoolPolicy> {
    match text {
        "token" => Ok(PoolPolicy::Token),
        "swap-lru" => Ok(PoolPolicy::SwapLru),
        "dedicated" => Ok(PoolPolicy::Dedicated),
        other => bail!("unknown policy `{other}` (token, swap-lru, dedicated)"),
    }
}

/// A deterministic prose prompt of roughly `tokens` tokens (about 1.3 tokens per word here),
/// made unique per request so neither server can serve it from a prompt cache.
pub(crate) fn prompt_for(request: u32, tokens: u32) -> String {
    const WORDS: [&str; 16] = [
        "river", "lantern", "harbour", "quiet", "morning", "stone", "bridge", "garden", "winter",
        "letter", "window", "market", "thunder", "orchard", "voyage", "compass",
    ];
    let mut text = format!("Story {request}. Continue this text:");
    let words = tokens * 10 / 13;
    for i in 0..words {
        let index = usize::try_from(i.wrapping_mul(7).wrapping_add(request.wrapping_mul(3)) % 16)
            .unwrap_or(0);
        text.push(' ');
        text.push_str(WORDS.get(index).copied().unwrap_or("sea"));
    }
    text
}

/// A system prompt of about `tokens` tokens (SmolLM2's tokenizer), the same for every request:
/// the shared prefix of the prefix-cache workload.
pub(crate) fn shared_prefix(tokens: u32) -> String {
    let mut text = String::from("You are the harbour master's assistant. Rules follow.");
    // One rule is about 17 tokens.
    for rule in 0..tokens.div_ceil(17) {
        text.push_str(" Rule ");
        text.push_str(&rule.to_string());
        text.push_str(": boats in berth ");
        text.push_str(&rule.to_string());
        text.push_str(" leave before the tide turns and report cargo.");
    }
    text
}

/// A loopback port free right now (a race with other processes is possible but harmless here).
pub(crate) fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Polls `base` + `path` until it answers 2xx, the child exits, or `timeout_s` seconds pass.
pub(crate) async fn wait_healthy(
    base: &str,
    path: &str,
    child: &mut Child,
    timeout_s: u64,
) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(timeout_s);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            bail!("server exited during start-up: {status}");
        }
        if let Ok(response) = client.get(format!("{base}{path}")).send().await
            && response.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("{base} did not become healthy within {timeout_s} s")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert!((percentile(&mut v, 50) - 50.0).abs() < f64::EPSILON);
        assert!((percentile(&mut v, 99) - 99.0).abs() < f64::EPSILON);
        assert!(percentile(&mut [], 50).abs() < f64::EPSILON);
        let mut one = [7.0];
        assert!((percentile(&mut one, 99) - 7.0).abs() < f64::EPSILON);
    }

    #[test]
    fn prompts_differ_per_request_and_scale_with_length() {
        assert_ne!(prompt_for(1, 128), prompt_for(2, 128));
        assert!(prompt_for(1, 256).len() > prompt_for(1, 128).len());
    }
}
