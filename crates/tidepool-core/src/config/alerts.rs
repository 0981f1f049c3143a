//! `[[alerts]]` (webhook receivers of operational events) and `[leak_detection]` (the per-key
//! anomaly detector that suspends leaked keys). Defaults are in docs/configuration.md.

use serde::{Deserialize, Serialize};

/// Every event an `[[alerts]]` receiver can subscribe to (docs/operations.md).
pub const ALERT_EVENTS: &[&str] = &[
    "breaker_opened",
    "breaker_closed",
    "engine_restarted",
    "database_lost",
    "database_recovered",
    "key_suspended",
    "budget_reached",
];

/// Most `[[alerts]]` receivers.
pub const ALERT_SINKS_MAX: usize = 16;

/// One webhook receiver (`[[alerts]]`).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertConfig {
    /// Unique among receivers; the outbox rows name their receiver by it.
    pub id: String,
    /// Where events are sent, as a `POST` (`http://` or `https://`).
    pub url: String,
    /// The events sent to this receiver (names from [`ALERT_EVENTS`]).
    pub events: Vec<String>,
    /// The HMAC-SHA256 key of the `X-Tidepool-Signature` header (never logged). Prefer
    /// `secret_env`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Environment variable holding that key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_env: Option<String>,
    /// Limit of one delivery attempt, connect to last byte.
    #[serde(default = "default_alert_timeout_ms")]
    pub timeout_ms: u64,
    /// Attempts per event (first included) before it is given up and marked failed.
    #[serde(default = "default_alert_attempts_max")]
    pub attempts_max: u32,
    /// Delay before the second attempt; doubles with each attempt after.
    #[serde(default = "default_alert_backoff_initial_ms")]
    pub backoff_initial_ms: u64,
    /// Longest delay between two attempts.
    #[serde(default = "default_alert_backoff_max_ms")]
    pub backoff_max_ms: u64,
}

/// The signing secret never reaches a log.
impl std::fmt::Debug for AlertConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertConfig")
            .field("id", &self.id)
            .field("url", &super::redact_url(&self.url))
            .field("events", &self.events)
            .field("secret", &self.secret.as_ref().map(|_| "***"))
            .field("secret_env", &self.secret_env)
            .field("timeout_ms", &self.timeout_ms)
            .field("attempts_max", &self.attempts_max)
            .field("backoff_initial_ms", &self.backoff_initial_ms)
            .field("backoff_max_ms", &self.backoff_max_ms)
            .finish()
    }
}

fn default_alert_timeout_ms() -> u64 {
    5_000
}
fn default_alert_attempts_max() -> u32 {
    8
}
fn default_alert_backoff_initial_ms() -> u64 {
    1_000
}
fn default_alert_backoff_max_ms() -> u64 {
    300_000
}

impl AlertConfig {
    /// Whether this receiver subscribed to `event`.
    pub fn wants(&self, event: &str) -> bool {
        self.events.iter().any(|e| e == event)
    }

    pub(super) fn validate(&self, index: usize, errors: &mut Vec<(String, String)>) {
        let mut invalid = |name: &str, reason: String| {
            errors.push((format!("alerts[{index}].{name}"), reason));
        };
        if self.id.is_empty() || self.id.len() > 64 {
            invalid("id", "must be 1 to 64 bytes".into());
        }
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            invalid("url", "must start with http:// or https://".into());
        }
        if self.events.is_empty() {
            invalid("events", "subscribe to at least one event".into());
        }
        for event in self
            .events
            .iter()
            .filter(|e| !ALERT_EVENTS.contains(&e.as_str()))
        {
            invalid(
                "events",
                format!(
                    "unknown event `{event}` (known: {})",
                    ALERT_EVENTS.join(", ")
                ),
            );
        }
        if self.secret.is_some() && self.secret_env.is_some() {
            invalid("secret_env", "give secret or secret_env, not both".into());
        }
        if self.secret.is_none() && self.secret_env.is_none() {
            invalid(
                "secret",
                "give secret or secret_env (events are signed)".into(),
            );
        }
        if self.timeout_ms == 0 {
            invalid("timeout_ms", "must be at least 1".into());
        }
        if self.attempts_max == 0 {
            invalid("attempts_max", "must be at least 1".into());
        }
        if self.backoff_initial_ms == 0 {
            invalid("backoff_initial_ms", "must be at least 1".into());
        }
        if self.backoff_max_ms < self.backoff_initial_ms {
            invalid(
                "backoff_max_ms",
                "must be at least backoff_initial_ms".into(),
            );
        }
    }
}

/// The leaked-key detector (`[leak_detection]`): per key and per interval, its request count and
/// its spend are compared with that key's own history (EWMA of mean and variance); a z-score
/// above `z_threshold` suspends the key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeakDetectionConfig {
    /// Off by default: a deployment opts in once its keys have a history.
    pub enabled: bool,
    /// Length of one interval, in ms.
    pub interval_ms: u64,
    /// Weight of the newest interval in the EWMA (0 < alpha ≤ 1).
    pub ewma_alpha: f64,
    /// Standard deviations above the key's mean that suspend it.
    pub z_threshold: f64,
    /// Intervals of history a key needs before it can be suspended.
    pub min_history_intervals: u32,
    /// Requests in one interval below which a key is never suspended (quiet keys never trip).
    pub min_requests_per_interval: u32,
    /// Keys tracked at once per replica; beyond it new keys are not tracked.
    pub keys_tracked_max: u32,
}

impl Default for LeakDetectionConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            interval_ms: 60_000,
            ewma_alpha: 0.1,
            z_threshold: 6.0,
            min_history_intervals: 10,
            min_requests_per_interval: 30,
            keys_tracked_max: 100_000,
        }
    }
}

impl LeakDetectionConfig {
    pub(super) fn validate(&self, errors: &mut Vec<(String, String)>) {
        let mut invalid = |name: &str, reason: &str| {
            errors.push((format!("leak_detection.{name}"), reason.to_owned()));
        };
        if self.interval_ms == 0 {
            invalid("interval_ms", "must be at least 1");
        }
        if !(self.ewma_alpha > 0.0 && self.ewma_alpha <= 1.0) {
            invalid("ewma_alpha", "must be in (0, 1]");
        }
        if !(self.z_threshold.is_finite() && self.z_threshold > 0.0) {
            invalid("z_threshold", "must be a positive number");
        }
        if self.min_history_intervals == 0 {
            invalid("min_history_intervals", "must be at least 1");
        }
        if self.min_requests_per_interval == 0 {
            invalid("min_requests_per_interval", "must be at least 1");
        }
        if self.keys_tracked_max == 0 {
            invalid("keys_tracked_max", "must be at least 1");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::Config;

    fn errors(text: &str) -> String {
        match Config::parse(text, Path::new("t.toml")) {
            Ok(_) => String::new(),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn alerts_and_leak_detection_parse_with_their_defaults() {
        let config = Config::parse(
            "[[alerts]]\nid = \"ops\"\nurl = \"https://h/x\"\nevents = [\"key_suspended\"]\n\
             secret_env = \"S\"\n\n[leak_detection]\nenabled = true\n",
            Path::new("t.toml"),
        )
        .unwrap();
        let alert = &config.alerts[0];
        assert_eq!(alert.timeout_ms, 5_000);
        assert_eq!(alert.attempts_max, 8);
        assert!(alert.wants("key_suspended"));
        assert!(!alert.wants("database_lost"));
        assert!(config.leak_detection.enabled);
        assert_eq!(config.leak_detection.min_requests_per_interval, 30);
        let printed = format!("{alert:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        let secret = Config::parse(
            "[[alerts]]\nid = \"ops\"\nurl = \"https://h/x\"\nevents = [\"key_suspended\"]\n\
             secret = \"hunter2\"\n",
            Path::new("t.toml"),
        )
        .unwrap();
        let printed = format!("{:?}", secret.alerts[0]);
        assert!(
            !printed.contains("hunter2"),
            "the secret is never printed: {printed}"
        );
    }

    #[test]
    fn bad_alerts_and_leak_detection_are_refused_with_every_reason() {
        let text = "[[alerts]]\nid = \"ops\"\nurl = \"ftp://h\"\nevents = [\"nope\"]\n\
                    attempts_max = 0\nbackoff_initial_ms = 10\nbackoff_max_ms = 5\n\n\
                    [[alerts]]\nid = \"ops\"\nurl = \"http://h\"\nevents = [\"key_suspended\"]\n\
                    secret = \"a\"\nsecret_env = \"B\"\n\n\
                    [leak_detection]\newma_alpha = 1.5\nz_threshold = 0.0\ninterval_ms = 0\n";
        let errors = errors(text);
        for expected in [
            "alerts[0].url",
            "alerts[0].events: unknown event `nope`",
            "alerts[0].secret",
            "alerts[0].attempts_max",
            "alerts[0].backoff_max_ms",
            "alerts[1].id: duplicate",
            "alerts[1].secret_env",
            "leak_detection.ewma_alpha",
            "leak_detection.z_threshold",
            "leak_detection.interval_ms",
        ] {
            assert!(
                errors.contains(expected),
                "{expected} missing from: {errors}"
            );
        }
    }
}
