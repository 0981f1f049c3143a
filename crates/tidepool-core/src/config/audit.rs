//! `[audit]`: the signed checkpoints of the audit log (docs/operations.md § The audit log).

use serde::{Deserialize, Serialize};

/// The environment variable that holds the checkpoint key unless `checkpoint_key_env` names
/// another.
pub const AUDIT_CHECKPOINT_KEY_ENV_DEFAULT: &str = "TIDEPOOL_AUDIT_KEY";

/// `[audit]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// The environment variable holding the HMAC-SHA256 key that signs checkpoints (at least 32
    /// bytes; never in the file, never logged). Unset or empty: no checkpoints are written, and
    /// `tidepool audit verify` says their signatures went unchecked.
    pub checkpoint_key_env: String,
    /// The entry whose sequence number is a multiple of this is checkpointed in the transaction
    /// that appends it.
    pub checkpoint_every_entries: u32,
    /// How often each gateway checkpoints the newest entry while entries exist past the last
    /// checkpoint, in ms.
    pub checkpoint_interval_ms: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            checkpoint_key_env: AUDIT_CHECKPOINT_KEY_ENV_DEFAULT.to_owned(),
            checkpoint_every_entries: 100,
            checkpoint_interval_ms: 60_000,
        }
    }
}

impl AuditConfig {
    pub(super) fn validate(&self, errors: &mut Vec<(String, String)>) {
        let mut invalid = |name: &str, reason: &str| {
            errors.push((format!("audit.{name}"), reason.to_owned()));
        };
        if self.checkpoint_key_env.is_empty() {
            invalid("checkpoint_key_env", "must name an environment variable");
        }
        if self.checkpoint_every_entries == 0 {
            invalid("checkpoint_every_entries", "must be at least 1");
        }
        if self.checkpoint_interval_ms < 1_000 {
            invalid("checkpoint_interval_ms", "must be at least 1000");
        }
    }

    /// The checkpoint key: the bytes of the variable `checkpoint_key_env`; `None` when it is
    /// unset or empty.
    pub fn checkpoint_key(&self) -> Option<Vec<u8>> {
        std::env::var_os(&self.checkpoint_key_env)
            .filter(|value| !value.is_empty())
            .map(std::ffi::OsString::into_encoded_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_named() {
        let mut errors = Vec::new();
        AuditConfig::default().validate(&mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        AuditConfig {
            checkpoint_key_env: String::new(),
            checkpoint_every_entries: 0,
            checkpoint_interval_ms: 999,
        }
        .validate(&mut errors);
        let fields: Vec<&str> = errors.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                "audit.checkpoint_key_env",
                "audit.checkpoint_every_entries",
                "audit.checkpoint_interval_ms"
            ]
        );
    }
}
